//! Qwen2.5-Omni's code2wav, first half: a diffusion transformer (DiT) that
//! turns the talker's codec ids into a mel spectrogram by flow matching.
//!
//! As transformers' `Qwen2_5OmniToken2WavDiTModel` (`modeling_qwen2_5_omni.py`):
//! * the input of each step is `proj(cat[x, ECAPA(ref_mel), code_embed,
//!   cond])`: the noisy mel, the speaker encoder's summary of the voice's
//!   reference mel (an ECAPA-TDNN: Desplanques et al., 2020), the codec
//!   embedding repeated `repeats` frames per code, and the voice's `cond`;
//! * transformer blocks with adaLN-zero modulation by the time step, rotary
//!   positions on the first head only (as the checkpoint was trained), and
//!   attention restricted to blocks of `block_size` frames (layers named in
//!   `look_ahead_layers` / `look_backward_layers` also see the next /
//!   previous block);
//! * classifier-free guidance: each evaluation runs a batch of two, the
//!   second without the voice (zero `cond` and reference mel) and with every
//!   code replaced by id 0; `v = c + (c - u) * guidance_scale`;
//! * an ODE from noise (t = 0) to mel (t = 1) solved with the 3/8-rule
//!   Runge-Kutta method on `num_steps` time points warped by the sway
//!   coefficient: `t + sway * (cos(pi t / 2) - 1 + t)`.
//!
//! The only random draw is the initial noise, one standard normal
//! `[1, frames, mel_dim]` tensor drawn by the caller.
use tch::{Device, Kind, Tensor};

use super::config::DitConfig;
use crate::error::{Error, Result};
use crate::weights::Weights;

/// How the ODE is solved; the default is transformers' (`sample`'s
/// defaults): 10 time points, guidance 0.5, sway -1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOptions {
    /// Time points (intervals + 1).
    pub num_steps: usize,
    /// Classifier-free guidance strength.
    pub guidance_scale: f64,
    /// Sway sampling coefficient of the time points.
    pub sway_coefficient: f64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            num_steps: 10,
            guidance_scale: 0.5,
            sway_coefficient: -1.0,
        }
    }
}

const LAYER_NORM_EPS: f64 = 1e-6;
const POOLING_EPS: f64 = 1e-12;
/// Width of the time step's sinusoidal embedding.
const TIME_FREQ_DIM: i64 = 256;

struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    fn load(w: &mut Weights, name: &str) -> Result<Self> {
        let (w, b) = w.take_weight_bias(name)?;
        Ok(Linear { w, b })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.w, self.b.as_ref())
    }
}

/// A convolution with "same" reflect padding, as the ECAPA layers use.
struct Conv {
    w: Tensor,
    b: Option<Tensor>,
    dilation: i64,
}

impl Conv {
    fn load(w: &mut Weights, name: &str, dilation: i64) -> Result<Self> {
        let (w, b) = w.take_weight_bias(name)?;
        Ok(Conv { w, b, dilation })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let k = self.w.size()[2];
        let total = self.dilation * (k - 1);
        let x = if total > 0 {
            x.reflection_pad1d([total / 2, total - total / 2])
        } else {
            x.shallow_clone()
        };
        x.conv1d(&self.w, self.b.as_ref(), [1], [0], [self.dilation], 1)
    }

    /// Conv then ReLU (`TimeDelayNetBlock`).
    fn tdnn(&self, x: &Tensor) -> Tensor {
        self.forward(x).relu()
    }
}

/// An SE-Res2Net block of the ECAPA encoder.
struct SeRes2Net {
    tdnn1: Conv,
    res2net: Vec<Conv>,
    scale: i64,
    tdnn2: Conv,
    se1: Conv,
    se2: Conv,
}

impl SeRes2Net {
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.tdnn1.tdnn(x);
        let parts = y.chunk(self.scale, 1);
        let mut outs: Vec<Tensor> = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let out = match i {
                0 => part.shallow_clone(),
                1 => self.res2net[0].tdnn(part),
                _ => self.res2net[i - 1].tdnn(&(part + &outs[i - 1])),
            };
            outs.push(out);
        }
        let y = self.tdnn2.tdnn(&Tensor::cat(&outs, 1));
        let s = self
            .se2
            .forward(&self.se1.forward(&y.mean_dim(2, true, Kind::Float)).relu())
            .sigmoid();
        y * s + x
    }
}

/// ECAPA-TDNN speaker encoder: a reference mel to `[batch, enc_dim]`.
struct Ecapa {
    first: Conv,
    blocks: Vec<SeRes2Net>,
    mfa: Conv,
    asp_tdnn: Conv,
    asp_conv: Conv,
    fc: Conv,
}

impl Ecapa {
    fn load(w: &mut Weights, cfg: &DitConfig) -> Result<Self> {
        let p = "input_embed.spk_encoder";
        let n = cfg.enc_channels.len();
        let mut blocks = Vec::with_capacity(n - 2);
        for i in 1..n - 1 {
            let b = format!("{p}.blocks.{i}");
            let res2net = (0..cfg.enc_res2net_scale - 1)
                .map(|j| {
                    Conv::load(
                        w,
                        &format!("{b}.res2net_block.blocks.{j}.conv"),
                        cfg.enc_dilations[i],
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            blocks.push(SeRes2Net {
                tdnn1: Conv::load(w, &format!("{b}.tdnn1.conv"), 1)?,
                res2net,
                scale: cfg.enc_res2net_scale,
                tdnn2: Conv::load(w, &format!("{b}.tdnn2.conv"), 1)?,
                se1: Conv::load(w, &format!("{b}.se_block.conv1"), 1)?,
                se2: Conv::load(w, &format!("{b}.se_block.conv2"), 1)?,
            });
        }
        Ok(Ecapa {
            first: Conv::load(w, &format!("{p}.blocks.0.conv"), cfg.enc_dilations[0])?,
            blocks,
            mfa: Conv::load(w, &format!("{p}.mfa.conv"), cfg.enc_dilations[n - 1])?,
            asp_tdnn: Conv::load(w, &format!("{p}.asp.tdnn.conv"), 1)?,
            asp_conv: Conv::load(w, &format!("{p}.asp.conv"), 1)?,
            fc: Conv::load(w, &format!("{p}.fc"), 1)?,
        })
    }

    /// `mel`: `[batch, frames, mel_dim]`.
    fn forward(&self, mel: &Tensor) -> Tensor {
        let mut x = self.first.tdnn(&mel.transpose(1, 2));
        let mut outs = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            x = b.forward(&x);
            outs.push(x.shallow_clone());
        }
        let m = self.mfa.tdnn(&Tensor::cat(&outs, 1));
        // Attentive statistics pooling; every frame is valid.
        let frames = m.size()[2];
        let stats =
            |weights: &Tensor| {
                let mean = (&m * weights).sum_dim_intlist(2, false, Kind::Float);
                let var = (weights * (&m - mean.unsqueeze(2)).pow_tensor_scalar(2))
                    .sum_dim_intlist(2, false, Kind::Float);
                (mean, var.clamp_min(POOLING_EPS).sqrt())
            };
        let uniform = Tensor::full(
            [1, 1, frames],
            1.0 / frames as f64,
            (Kind::Float, m.device()),
        );
        let (mean, std) = stats(&uniform);
        let context = Tensor::cat(
            &[
                m.shallow_clone(),
                mean.unsqueeze(2).repeat([1, 1, frames]),
                std.unsqueeze(2).repeat([1, 1, frames]),
            ],
            1,
        );
        let attention = self
            .asp_conv
            .forward(&self.asp_tdnn.tdnn(&context).tanh())
            .softmax(2, Kind::Float);
        let (mean, std) = stats(&attention);
        let pooled = Tensor::cat(&[mean, std], 1).unsqueeze(2);
        self.fc.forward(&pooled).squeeze_dim(-1)
    }
}

struct Block {
    attn_norm: Linear,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    ff_in: Linear,
    ff_out: Linear,
    look_ahead: i64,
    look_back: i64,
}

/// The DiT, on one device, in f32.
pub struct Dit {
    cfg: DitConfig,
    time_in: Linear,
    time_out: Linear,
    codec_embed: Tensor,
    input_proj: Linear,
    ecapa: Ecapa,
    blocks: Vec<Block>,
    norm_out: Linear,
    proj_out: Linear,
    device: Device,
}

impl std::fmt::Debug for Dit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dit")
            .field("layers", &self.blocks.len())
            .field("hidden_size", &self.cfg.hidden_size)
            .finish_non_exhaustive()
    }
}

/// One sequence to sample: its codes and voice, and its initial noise.
#[derive(Debug)]
pub struct DitInput<'a> {
    /// `[n]` i64.
    pub codes: &'a Tensor,
    /// `[1, enc_emb_dim]`.
    pub cond: &'a Tensor,
    /// `[1, frames, mel_dim]`.
    pub ref_mel: &'a Tensor,
    /// `[1, n * repeats, mel_dim]`, standard normal.
    pub noise: &'a Tensor,
}

/// What does not change across the ODE's evaluations of one batch.
struct Conditioning {
    /// Sequences in the batch.
    batch: i64,
    /// `[2 batch, frames, hidden]` (the guided rows, then the unguided
    /// ones): the input projection of everything but the
    /// noisy mel (ECAPA of the voice and of zeros; the codes' embeddings
    /// and code 0's; the voice's cond and zeros), with its bias. The same
    /// at each of the ODE's evaluations, so projected once: each
    /// evaluation adds only the mel's part.
    constant: Tensor,
    /// Per layer, `[frames, frames]` bool: which keys a query may see.
    masks: Vec<Tensor>,
    /// Rotary tables for head 0, `[frames, head_dim]`.
    cos: Tensor,
    sin: Tensor,
}

impl Dit {
    /// Takes the DiT's weights (`code2wav_dit_model.*` without the prefix).
    pub fn load(w: &mut Weights, cfg: &DitConfig, device: Device) -> Result<Self> {
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let b = format!("transformer_blocks.{i}");
            blocks.push(Block {
                attn_norm: Linear::load(w, &format!("{b}.attn_norm.linear"))?,
                to_q: Linear::load(w, &format!("{b}.attn.to_q"))?,
                to_k: Linear::load(w, &format!("{b}.attn.to_k"))?,
                to_v: Linear::load(w, &format!("{b}.attn.to_v"))?,
                to_out: Linear::load(w, &format!("{b}.attn.to_out.0"))?,
                ff_in: Linear::load(w, &format!("{b}.ff.ff.0"))?,
                ff_out: Linear::load(w, &format!("{b}.ff.ff.3"))?,
                look_ahead: i64::from(cfg.look_ahead_layers.contains(&i)),
                look_back: i64::from(cfg.look_backward_layers.contains(&i)),
            });
        }
        let codec_embed = w.take("text_embed.codec_embed.weight")?;
        if codec_embed.size()[0] < cfg.num_embeds + 1 {
            return Err(Error::Weight {
                name: "text_embed.codec_embed.weight".to_owned(),
                reason: format!(
                    "{} rows; num_embeds = {} needs {}",
                    codec_embed.size()[0],
                    cfg.num_embeds,
                    cfg.num_embeds + 1
                ),
            });
        }
        Ok(Dit {
            time_in: Linear::load(w, "time_embed.time_mlp.0")?,
            time_out: Linear::load(w, "time_embed.time_mlp.2")?,
            codec_embed,
            input_proj: Linear::load(w, "input_embed.proj")?,
            ecapa: Ecapa::load(w, cfg)?,
            blocks,
            norm_out: Linear::load(w, "norm_out.linear")?,
            proj_out: Linear::load(w, "proj_out")?,
            cfg: cfg.clone(),
            device,
        })
    }

    /// Codec ids the embedding knows: `0..=num_embeds`.
    pub fn num_codes(&self) -> i64 {
        self.cfg.num_embeds + 1
    }

    /// Mel frames per attention block.
    pub fn block_size(&self) -> i64 {
        self.cfg.block_size
    }

    /// Mel frames per code.
    pub fn repeats(&self) -> i64 {
        self.cfg.repeats
    }

    /// The longest mel (frames) it takes.
    pub fn max_frames(&self) -> i64 {
        self.cfg.max_position_embeddings
    }

    /// Mel bins.
    pub fn mel_dim(&self) -> i64 {
        self.cfg.mel_dim
    }

    /// `codes` is `[batch, n]`; `conds` and `ref_mels` one per sequence.
    fn conditioning(
        &self,
        codes: &Tensor,
        conds: &[&Tensor],
        ref_mels: &[&Tensor],
    ) -> Conditioning {
        let cfg = &self.cfg;
        let dev = self.device;
        let batch = codes.size()[0];
        let frames = codes.size()[1] * cfg.repeats;
        let embed =
            |ids: &Tensor| {
                Tensor::embedding(&self.codec_embed, ids, -1, false, false)
                    .repeat_interleave_self_int(cfg.repeats, Some(1), None::<i64>)
            };
        let code_emb = embed(codes);
        let null_emb = embed(&codes.zeros_like());
        // Voices' reference mels may differ in length: one ECAPA pass each.
        let (mut voiced, mut silent) = (Vec::new(), Vec::new());
        for ref_mel in ref_mels {
            let ref_mel = ref_mel.to_device(dev);
            let mels = Tensor::cat(&[ref_mel.shallow_clone(), ref_mel.zeros_like()], 0);
            let e = self.ecapa.forward(&mels);
            voiced.push(e.narrow(0, 0, 1));
            silent.push(e.narrow(0, 1, 1));
        }
        voiced.extend(silent);
        let ecapa = Tensor::cat(&voiced, 0).unsqueeze(1).repeat([1, frames, 1]);
        let cond = Tensor::cat(
            &conds
                .iter()
                .map(|c| c.to_device(dev).reshape([1, 1, -1]))
                .collect::<Vec<_>>(),
            0,
        )
        .repeat([1, frames, 1]);
        let cond = Tensor::cat(&[cond.shallow_clone(), cond.zeros_like()], 0);
        let block =
            Tensor::arange(frames, (Kind::Int64, dev)).divide_scalar_mode(cfg.block_size, "floor");
        let diff = block.unsqueeze(0) - block.unsqueeze(1);
        let masks = self
            .blocks
            .iter()
            .map(|b| diff.ge(-b.look_back).logical_and(&diff.le(b.look_ahead)))
            .collect();
        let half = cfg.head_dim / 2;
        let inv_freq = (Tensor::arange_start_step(0, cfg.head_dim, 2, (Kind::Float, dev))
            / cfg.head_dim as f64
            * cfg.rope_theta.ln())
        .exp()
        .reciprocal();
        let pos = Tensor::arange(frames, (Kind::Float, dev));
        let freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[freqs.shallow_clone(), freqs], 1);
        debug_assert_eq!(emb.size()[1], 2 * half);
        let codes = Tensor::cat(&[code_emb, null_emb], 0);
        let rest = Tensor::cat(&[ecapa, codes, cond], 2);
        let mel_dim = cfg.mel_dim;
        let w = &self.input_proj.w;
        let w_rest = w.narrow(1, mel_dim, w.size()[1] - mel_dim);
        let constant = rest.linear(&w_rest, self.input_proj.b.as_ref());
        Conditioning {
            batch,
            constant,
            masks,
            cos: emb.cos(),
            sin: emb.sin(),
        }
    }

    /// One evaluation of the guided velocity at time `t` for `x`
    /// (`[batch, frames, mel_dim]`).
    fn velocity(&self, c: &Conditioning, x: &Tensor, t: f32, guidance: f64) -> Tensor {
        let cfg = &self.cfg;
        // Time embedding: sinusoids of 1000 t (sin first), then an MLP.
        let half = TIME_FREQ_DIM / 2;
        let step = (10000f64).ln() / (half - 1) as f64;
        let freqs = (Tensor::arange(half, (Kind::Float, self.device)) * -step).exp();
        // One time for every row: its embedding broadcasts over the batch.
        let t = Tensor::from_slice(&[t]).to_device(self.device);
        let arg = t.unsqueeze(1) * 1000.0 * freqs.unsqueeze(0);
        let te = Tensor::cat(&[arg.sin(), arg.cos()], 1);
        let temb = self.time_out.forward(&self.time_in.forward(&te).silu());
        let temb_act = temb.silu();

        // proj(cat[x, rest]) = x W_x^T + (rest W_rest^T + b).
        let w_x = self.input_proj.w.narrow(1, 0, cfg.mel_dim);
        let mut h = x.linear(&w_x, None::<&Tensor>).repeat([2, 1, 1]) + &c.constant;
        let (b, n) = (h.size()[0], h.size()[1]);
        let d = cfg.hidden_size;
        let norm =
            |x: &Tensor| x.layer_norm([d], None::<&Tensor>, None::<&Tensor>, LAYER_NORM_EPS, false);
        for (block, mask) in self.blocks.iter().zip(&c.masks) {
            let m = block.attn_norm.forward(&temb_act).chunk(6, 1);
            let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
            let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);
            let y = norm(&h) * (scale_msa.unsqueeze(1) + 1.0) + shift_msa.unsqueeze(1);
            let heads = |l: &Linear| {
                l.forward(&y)
                    .view([b, n, cfg.num_attention_heads, cfg.head_dim])
                    .transpose(1, 2)
            };
            let q = self.rotate_first_head(&heads(&block.to_q), c);
            let k = self.rotate_first_head(&heads(&block.to_k), c);
            let v = heads(&block.to_v);
            let attn = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(mask),
                0.0,
                false,
                None,
                false,
            );
            let attn = attn.transpose(1, 2).reshape([b, n, -1]);
            h += gate_msa.unsqueeze(1) * block.to_out.forward(&attn);
            let y = norm(&h) * (scale_mlp.unsqueeze(1) + 1.0) + shift_mlp.unsqueeze(1);
            let ff = block.ff_out.forward(&block.ff_in.forward(&y).gelu("tanh"));
            h += gate_mlp.unsqueeze(1) * ff;
        }
        let m = self.norm_out.forward(&temb_act).chunk(2, 1);
        let (scale, shift) = (&m[0], &m[1]);
        let h = norm(&h) * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1);
        let out = self.proj_out.forward(&h);
        let guided = out.narrow(0, 0, c.batch);
        let null = out.narrow(0, c.batch, c.batch);
        &guided + (&guided - null) * guidance
    }

    /// Rotary positions on head 0 only, in the de-interleaved layout
    /// transformers 5 uses (`(x0, x2, ..., x1, x3, ...)`, then rotate-half);
    /// the other heads pass unchanged.
    fn rotate_first_head(&self, x: &Tensor, c: &Conditioning) -> Tensor {
        let dim = self.cfg.head_dim;
        let first = x.narrow(1, 0, 1);
        let even = first.slice(-1, 0, dim, 2);
        let odd = first.slice(-1, 1, dim, 2);
        let first = Tensor::cat(&[even, odd], -1);
        let half = dim / 2;
        let rotated_half = Tensor::cat(
            &[-first.narrow(-1, half, half), first.narrow(-1, 0, half)],
            -1,
        );
        let first = &first * &c.cos + rotated_half * &c.sin;
        Tensor::cat(&[first, x.narrow(1, 1, x.size()[1] - 1)], 1)
    }

    /// The mel (`[mel_dim, frames]`) for `codes` (`[n]`, i64) spoken by a
    /// voice (`cond` `[1, enc_emb_dim]`, `ref_mel` `[1, frames, mel_dim]`),
    /// from `noise` (`[1, n * repeats, mel_dim]`, standard normal).
    pub fn sample(
        &self,
        codes: &Tensor,
        cond: &Tensor,
        ref_mel: &Tensor,
        noise: &Tensor,
        options: SampleOptions,
    ) -> Result<Tensor> {
        let input = DitInput {
            codes,
            cond,
            ref_mel,
            noise,
        };
        Ok(self.sample_batch(&[input], options)?.squeeze_dim(0))
    }

    /// [`Dit::sample`] for several sequences of one length at once (the
    /// chunks of several streams): `[batch, mel_dim, frames]`. Each row
    /// equals its sequence sampled alone, up to the float rounding of the
    /// larger matrix products.
    pub fn sample_batch(&self, inputs: &[DitInput<'_>], options: SampleOptions) -> Result<Tensor> {
        let SampleOptions {
            num_steps,
            guidance_scale,
            sway_coefficient: sway,
        } = options;
        let n = inputs.first().map_or(0, |i| i.codes.size()[0]);
        if let Some(other) = inputs.iter().find(|i| i.codes.size()[0] != n) {
            return Err(Error::InvalidConfig {
                field: "codes".to_owned(),
                value: format!("{} codes", other.codes.size()[0]),
                reason: format!("a batch of the DiT takes sequences of one length ({n} codes)"),
            });
        }
        let frames = n * self.cfg.repeats;
        if frames > self.cfg.max_position_embeddings {
            return Err(Error::InvalidConfig {
                field: "codes".to_owned(),
                value: format!("{n} codes"),
                reason: format!(
                    "{frames} mel frames exceed dit_config.max_position_embeddings = {}",
                    self.cfg.max_position_embeddings
                ),
            });
        }
        let _guard = tch::no_grad_guard();
        let codes = Tensor::stack(
            &inputs
                .iter()
                .map(|i| i.codes.shallow_clone())
                .collect::<Vec<_>>(),
            0,
        )
        .to_device(self.device);
        let conds: Vec<&Tensor> = inputs.iter().map(|i| i.cond).collect();
        let ref_mels: Vec<&Tensor> = inputs.iter().map(|i| i.ref_mel).collect();
        let c = self.conditioning(&codes, &conds, &ref_mels);
        let noise = Tensor::cat(
            &inputs
                .iter()
                .map(|i| i.noise.shallow_clone())
                .collect::<Vec<_>>(),
            0,
        );
        // The time points as transformers computes them, in f32.
        let steps = num_steps.max(2);
        let times: Vec<f32> = (0..steps)
            .map(|i| {
                let t = i as f32 / (steps - 1) as f32;
                t + sway as f32 * ((std::f32::consts::PI / 2.0 * t).cos() - 1.0 + t)
            })
            .collect();
        let mut y = noise.to_device(self.device).to_kind(Kind::Float);
        let f = |t: f32, y: &Tensor| self.velocity(&c, y, t, guidance_scale);
        for pair in times.windows(2) {
            let (t0, t1) = (pair[0], pair[1]);
            let dt = t1 - t0;
            let third = 1.0f32 / 3.0;
            let k1 = f(t0, &y);
            let k2 = f(t0 + dt * third, &(&y + &k1 * f64::from(dt * third)));
            let k3 = f(
                t0 + dt * (2.0 * third),
                &(&y + (&k2 - &k1 * f64::from(third)) * f64::from(dt)),
            );
            let k4 = f(t1, &(&y + (&k1 - &k2 + &k3) * f64::from(dt)));
            y = &y + (k1 + (k2 + k3) * 3.0 + k4) * f64::from(dt) / 8.0;
        }
        Ok(y.transpose(1, 2))
    }
}
