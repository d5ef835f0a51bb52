//! Qwen2.5-Omni's code2wav, second half: BigVGAN (Lee et al., "BigVGAN: A
//! Universal Neural Vocoder with Large-Scale Training", 2023), a mel
//! spectrogram in, a waveform out; transformers'
//! `Qwen2_5OmniToken2WavBigVGANModel`.
//!
//! The DiT's log-mel is first mapped to the vocoder's range (decibels over
//! 115 dB, to [-1, 1]). Then `conv_pre`, and per upsampling stage a
//! transposed convolution followed by the mean of its AMP blocks; each AMP
//! block applies SnakeBeta (`x + sin^2(x e^alpha) / e^beta`) anti-aliased:
//! upsampled 2x and downsampled 2x around the activation with a 12-tap
//! Kaiser-windowed sinc filter. Then a last activation, `conv_post` and a
//! clamp to [-1, 1]. Filters are computed here, as transformers computes
//! them (they are not in the checkpoint).
use tch::{Device, Kind, Tensor};

use super::config::BigVganConfig;
use crate::error::Result;
use crate::weights::Weights;

/// Resampling around each activation: 2x with a 12-tap filter.
const RATIO: i64 = 2;
const FILTER_TAPS: i64 = 12;
const SNAKE_EPS: f64 = 1e-9;

/// transformers' `kaiser_sinc_filter1d(cutoff, half_width, kernel_size)`.
fn kaiser_sinc_filter(cutoff: f64, half_width: f64, taps: i64) -> Tensor {
    let half = taps / 2;
    let delta_f = 4.0 * half_width;
    let attenuation = 2.285 * (half - 1) as f64 * std::f64::consts::PI * delta_f + 7.95;
    let beta = if attenuation > 50.0 {
        0.1102 * (attenuation - 8.7)
    } else if attenuation >= 21.0 {
        0.5842 * (attenuation - 21.0).powf(0.4) + 0.07886 * (attenuation - 21.0)
    } else {
        0.0
    };
    let window = Tensor::kaiser_window_beta(taps, false, beta, (Kind::Float, Device::Cpu));
    let t = if taps % 2 == 0 {
        Tensor::arange_start(-half, half, (Kind::Float, Device::Cpu)) + 0.5
    } else {
        Tensor::arange(taps, (Kind::Float, Device::Cpu)) - half as f64
    };
    let filter = (t * (2.0 * cutoff)).sinc() * window * (2.0 * cutoff);
    let sum = filter.sum(Kind::Float);
    (filter / sum).view([1, 1, taps])
}

struct Conv {
    w: Tensor,
    b: Option<Tensor>,
    padding: i64,
    dilation: i64,
}

impl Conv {
    fn load(w: &mut Weights, name: &str, padding: i64, dilation: i64) -> Result<Self> {
        let (w, b) = w.take_weight_bias(name)?;
        Ok(Conv {
            w,
            b,
            padding,
            dilation,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv1d(
            &self.w,
            self.b.as_ref(),
            [1],
            [self.padding],
            [self.dilation],
            1,
        )
    }
}

/// SnakeBeta between a 2x upsampling and a 2x downsampling.
struct Activation {
    /// `[1, C, 1]`: e^alpha and 1 / (e^beta + eps).
    alpha: Tensor,
    inv_beta: Tensor,
}

impl Activation {
    fn load(w: &mut Weights, name: &str) -> Result<Self> {
        let alpha = w.take(&format!("{name}.act.alpha"))?;
        let beta = w.take(&format!("{name}.act.beta"))?;
        Ok(Activation {
            alpha: alpha.exp().view([1, -1, 1]),
            inv_beta: (beta.exp() + SNAKE_EPS).reciprocal().view([1, -1, 1]),
        })
    }

    fn forward(&self, x: &Tensor, filters: &Filters) -> Tensor {
        let channels = x.size()[1];
        // Up: replicate-pad, transposed conv with stride 2, crop.
        let pad = FILTER_TAPS / RATIO - 1;
        let crop_left = pad * RATIO + (FILTER_TAPS - RATIO) / 2;
        let crop_right = pad * RATIO + (FILTER_TAPS - RATIO + 1) / 2;
        let up = x.replication_pad1d([pad, pad]).conv_transpose1d(
            &filters.filter.expand([channels, 1, FILTER_TAPS], false),
            None::<&Tensor>,
            [RATIO],
            [0],
            [0],
            channels,
            [1],
        ) * RATIO as f64;
        let len = up.size()[2];
        let up = up.narrow(2, crop_left, len - crop_left - crop_right);
        let act = &up + (&up * &self.alpha).sin().square() * &self.inv_beta;
        // Down: replicate-pad, conv with stride 2.
        act.replication_pad1d([FILTER_TAPS / 2 - 1, FILTER_TAPS / 2])
            .conv1d(
                &filters.filter.expand([channels, 1, FILTER_TAPS], false),
                None::<&Tensor>,
                [RATIO],
                [0],
                [1],
                channels,
            )
    }
}

struct Filters {
    filter: Tensor,
}

struct AmpBlock {
    convs1: Vec<Conv>,
    convs2: Vec<Conv>,
    acts: Vec<Activation>,
}

impl AmpBlock {
    fn forward(&self, x: &Tensor, f: &Filters) -> Tensor {
        let mut x = x.shallow_clone();
        for (i, (c1, c2)) in self.convs1.iter().zip(&self.convs2).enumerate() {
            let y = c1.forward(&self.acts[2 * i].forward(&x, f));
            let y = c2.forward(&self.acts[2 * i + 1].forward(&y, f));
            // Not `+=`: x may share storage with the caller's tensor.
            x = y + &x;
        }
        x
    }
}

/// The vocoder, on one device, in f32.
pub struct BigVgan {
    conv_pre: Conv,
    ups: Vec<(Tensor, Tensor, i64, i64)>,
    blocks: Vec<AmpBlock>,
    per_stage: usize,
    act_post: Activation,
    conv_post: Conv,
    filters: Filters,
    hop: i64,
}

impl std::fmt::Debug for BigVgan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BigVgan")
            .field("stages", &self.ups.len())
            .field("hop", &self.hop)
            .finish_non_exhaustive()
    }
}

impl BigVgan {
    /// Takes the vocoder's weights (`code2wav_bigvgan_model.*` without the prefix).
    pub fn load(w: &mut Weights, cfg: &BigVganConfig, device: Device) -> Result<Self> {
        let mut ups = Vec::with_capacity(cfg.upsample_rates.len());
        for (i, (&rate, &k)) in cfg
            .upsample_rates
            .iter()
            .zip(&cfg.upsample_kernel_sizes)
            .enumerate()
        {
            ups.push((
                w.take(&format!("ups.{i}.0.weight"))?,
                w.take(&format!("ups.{i}.0.bias"))?,
                rate,
                (k - rate) / 2,
            ));
        }
        let per_stage = cfg.resblock_kernel_sizes.len();
        let mut blocks = Vec::with_capacity(ups.len() * per_stage);
        for stage in 0..ups.len() {
            for (j, (&k, dilations)) in cfg
                .resblock_kernel_sizes
                .iter()
                .zip(&cfg.resblock_dilation_sizes)
                .enumerate()
            {
                let name = format!("resblocks.{}", stage * per_stage + j);
                let mut convs1 = Vec::new();
                let mut convs2 = Vec::new();
                for (n, &d) in dilations.iter().enumerate() {
                    convs1.push(Conv::load(
                        w,
                        &format!("{name}.convs1.{n}"),
                        (k * d - d) / 2,
                        d,
                    )?);
                    convs2.push(Conv::load(
                        w,
                        &format!("{name}.convs2.{n}"),
                        (k - 1) / 2,
                        1,
                    )?);
                }
                let acts = (0..2 * dilations.len())
                    .map(|n| Activation::load(w, &format!("{name}.activations.{n}")))
                    .collect::<Result<Vec<_>>>()?;
                blocks.push(AmpBlock {
                    convs1,
                    convs2,
                    acts,
                });
            }
        }
        Ok(BigVgan {
            conv_pre: Conv::load(w, "conv_pre", 3, 1)?,
            ups,
            blocks,
            per_stage,
            act_post: Activation::load(w, "activation_post")?,
            conv_post: Conv::load(w, "conv_post", 3, 1)?,
            filters: Filters {
                filter: kaiser_sinc_filter(0.5 / RATIO as f64, 0.6 / RATIO as f64, FILTER_TAPS)
                    .to_device(device),
            },
            hop: cfg.upsample_rates.iter().product(),
        })
    }

    /// Samples per mel frame.
    pub fn hop(&self) -> i64 {
        self.hop
    }

    /// The waveform (`[frames * hop]`, in [-1, 1]) of a log-mel
    /// `[mel_dim, frames]`.
    pub fn forward(&self, mel: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        // process_mel_spectrogram: log-mel -> dB (floor -115 dB) - 20 -> [-1, 1].
        let min_level = (-115.0f64 / 20.0 * 10f64.ln()).exp();
        let db = mel.exp().clamp_min(min_level).log10() * 20.0 - 20.0;
        let x = ((db + 115.0) / 115.0 * 2.0 - 1.0)
            .clamp(-1.0, 1.0)
            .unsqueeze(0);
        let mut x = self.conv_pre.forward(&x);
        for (stage, (w, b, rate, pad)) in self.ups.iter().enumerate() {
            x = x.conv_transpose1d(w, Some(b), [*rate], [*pad], [0], 1, [1]);
            let mut sum: Option<Tensor> = None;
            for block in &self.blocks[stage * self.per_stage..(stage + 1) * self.per_stage] {
                let y = block.forward(&x, &self.filters);
                sum = Some(match sum {
                    Some(s) => s + y,
                    None => y,
                });
            }
            x = sum.unwrap_or(x) / self.per_stage as f64;
        }
        let x = self.act_post.forward(&x, &self.filters);
        self.conv_post.forward(&x).clamp(-1.0, 1.0).flatten(0, -1)
    }
}
