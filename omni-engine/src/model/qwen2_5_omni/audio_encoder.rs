//! The thinker's audio encoder (transformers' `Qwen2_5OmniAudioEncoder`): a
//! Whisper-style encoder over log-mel features. The features are cut into
//! chunks of `2 * n_window` frames; each chunk goes through two
//! convolutions (the second halves time) and gets sinusoidal positions from
//! 0; the transformer layers attend within a chunk only; then pairs of
//! frames are averaged, normed and projected to the thinker's width, one row
//! per `<|AUDIO|>` placeholder.
use serde::Deserialize;
use tch::{Kind, Tensor};

use super::layers::{attention_within, LayerNorm, Linear};
use crate::error::{Error, Result};
use crate::weights::Weights;

/// `thinker_config.audio_config`; defaults are transformers' (the 7B
/// model's).
#[derive(Debug, Clone, Deserialize)]
pub struct AudioEncoderConfig {
    /// Mel bins of the input features.
    #[serde(default = "d_mels")]
    pub num_mel_bins: i64,
    /// Transformer layers.
    #[serde(default = "d_layers")]
    pub encoder_layers: usize,
    /// Attention heads.
    #[serde(default = "d_heads")]
    pub encoder_attention_heads: i64,
    /// MLP width.
    #[serde(default = "d_ffn")]
    pub encoder_ffn_dim: i64,
    /// Width.
    #[serde(default = "d_model")]
    pub d_model: i64,
    /// Output width (the thinker's hidden size).
    #[serde(default = "d_output")]
    pub output_dim: i64,
    /// Rows of the sinusoidal position table.
    #[serde(default = "d_positions")]
    pub max_source_positions: i64,
    /// Half a chunk, in feature frames.
    #[serde(default = "d_window")]
    pub n_window: i64,
    /// The MLP's activation.
    #[serde(default = "d_act")]
    pub activation_function: String,
}

fn d_mels() -> i64 {
    128
}
fn d_layers() -> usize {
    32
}
fn d_heads() -> i64 {
    20
}
fn d_ffn() -> i64 {
    5120
}
fn d_model() -> i64 {
    1280
}
fn d_output() -> i64 {
    3584
}
fn d_positions() -> i64 {
    1500
}
fn d_window() -> i64 {
    100
}
fn d_act() -> String {
    "gelu".to_owned()
}

struct Layer {
    attn_norm: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    mlp_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// The audio encoder, f32 or the engine's dtype, on the engine's device.
pub struct AudioEncoder {
    cfg: AudioEncoderConfig,
    conv1: (Tensor, Tensor),
    conv2: (Tensor, Tensor),
    /// `[max_source_positions, d_model]`: sin then cos.
    positions: Tensor,
    layers: Vec<Layer>,
    ln_post: LayerNorm,
    proj: Linear,
}

impl std::fmt::Debug for AudioEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioEncoder")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// transformers' `SinusoidsPositionEmbedding`, computed with the same ops in
/// the same order (f32), so the table is bit-identical.
fn sinusoids(length: i64, channels: i64) -> Result<Tensor> {
    let half = channels / 2;
    let increment = (10_000f64).ln() / (half - 1) as f64;
    let inv = Tensor::f_arange(half, (Kind::Float, tch::Device::Cpu))?
        .f_mul_scalar(-increment)?
        .f_exp()?;
    let t = Tensor::f_arange(length, (Kind::Int64, tch::Device::Cpu))?.f_unsqueeze(1)?;
    let scaled = t.f_mul(&inv.f_unsqueeze(0)?)?;
    Ok(Tensor::f_cat(&[scaled.f_sin()?, scaled.f_cos()?], 1)?)
}

impl AudioEncoder {
    /// Loads it from the checkpoint's `thinker.audio_tower.*` tensors (with
    /// that prefix stripped).
    pub fn load(w: &mut Weights, cfg: &AudioEncoderConfig) -> Result<Self> {
        if cfg.activation_function != "gelu" {
            return Err(Error::InvalidConfig {
                field: "thinker_config.audio_config.activation_function".to_owned(),
                value: cfg.activation_function.clone(),
                reason: "only gelu is supported".to_owned(),
            });
        }
        if cfg.n_window < 1 || cfg.encoder_attention_heads < 1 {
            return Err(Error::InvalidConfig {
                field: "thinker_config.audio_config.n_window".to_owned(),
                value: format!("{} (heads {})", cfg.n_window, cfg.encoder_attention_heads),
                reason: "n_window and encoder_attention_heads must be at least 1".to_owned(),
            });
        }
        if cfg.d_model % cfg.encoder_attention_heads != 0 || cfg.d_model % 2 != 0 {
            return Err(Error::InvalidConfig {
                field: "thinker_config.audio_config.d_model".to_owned(),
                value: cfg.d_model.to_string(),
                reason: format!(
                    "must be even and divisible by encoder_attention_heads ({})",
                    cfg.encoder_attention_heads
                ),
            });
        }
        let conv = |w: &mut Weights, name: &str| -> Result<(Tensor, Tensor)> {
            Ok((
                w.take(&format!("{name}.weight"))?,
                w.take(&format!("{name}.bias"))?,
            ))
        };
        let conv1 = conv(w, "conv1")?;
        let conv2 = conv(w, "conv2")?;
        let device = conv1.0.device();
        let kind = conv1.0.kind();
        let mut layers = Vec::with_capacity(cfg.encoder_layers);
        for l in 0..cfg.encoder_layers {
            let p = format!("layers.{l}");
            layers.push(Layer {
                attn_norm: LayerNorm::load(w, &format!("{p}.self_attn_layer_norm"))?,
                q: Linear::load(w, &format!("{p}.self_attn.q_proj"))?,
                k: Linear::load(w, &format!("{p}.self_attn.k_proj"))?,
                v: Linear::load(w, &format!("{p}.self_attn.v_proj"))?,
                out: Linear::load(w, &format!("{p}.self_attn.out_proj"))?,
                mlp_norm: LayerNorm::load(w, &format!("{p}.final_layer_norm"))?,
                fc1: Linear::load(w, &format!("{p}.fc1"))?,
                fc2: Linear::load(w, &format!("{p}.fc2"))?,
            });
        }
        Ok(AudioEncoder {
            positions: sinusoids(cfg.max_source_positions, cfg.d_model)?
                .f_to_kind(kind)?
                .f_to_device(device)?,
            cfg: cfg.clone(),
            conv1,
            conv2,
            layers,
            ln_post: LayerNorm::load(w, "ln_post")?,
            proj: Linear::load(w, "proj")?,
        })
    }

    /// The config it was built from.
    pub fn config(&self) -> &AudioEncoderConfig {
        &self.cfg
    }

    /// Output rows (placeholder tokens) for `frames` feature frames
    /// (`_get_feat_extract_output_lengths`).
    pub fn output_len(frames: i64) -> i64 {
        let after_conv = (frames - 1).div_euclid(2) + 1;
        (after_conv - 2).div_euclid(2) + 1
    }

    /// `[tokens, output_dim]` for one clip's features `[num_mel_bins,
    /// frames]` (any device or dtype; computed in the encoder's).
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let size = features.size();
        if size.len() != 2 || size[0] != self.cfg.num_mel_bins || size[1] < 3 {
            return Err(Error::InvalidConfig {
                field: "audio features".to_owned(),
                value: format!("{size:?}"),
                reason: format!(
                    "expected [{}, frames >= 3] (num_mel_bins, frames)",
                    self.cfg.num_mel_bins
                ),
            });
        }
        let frames = size[1];
        let chunk = 2 * self.cfg.n_window;
        let (device, kind) = (self.conv1.0.device(), self.conv1.0.kind());
        let x = features.f_to_device(device)?.f_to_kind(kind)?;
        // Chunks of `chunk` frames, the last one shorter, zero-padded into
        // one batch.
        let mut lens = vec![chunk; (frames / chunk) as usize];
        if frames % chunk != 0 {
            lens.push(frames % chunk);
        }
        let max_len = lens.iter().copied().max().unwrap_or(chunk);
        let mut padded = Vec::with_capacity(lens.len());
        let mut start = 0;
        for &len in &lens {
            let part = x.f_narrow(1, start, len)?;
            padded.push(part.f_constant_pad_nd([0, max_len - len])?);
            start += len;
        }
        let padded = Tensor::f_stack(&padded, 0)?;
        let len_t = Tensor::from_slice(&lens).f_to_device(device)?;
        let mask = Tensor::f_arange(max_len, (Kind::Int64, device))?
            .f_unsqueeze(0)?
            .f_lt_tensor(&len_t.f_unsqueeze(1)?)?
            .f_unsqueeze(1)?
            .f_to_kind(kind)?;
        let h = padded
            .f_conv1d(&self.conv1.0, Some(&self.conv1.1), [1], [1], [1], 1)?
            .f_gelu("none")?
            .f_mul(&mask)?;
        let h = h
            .f_conv1d(&self.conv2.0, Some(&self.conv2.1), [2], [1], [1], 1)?
            .f_gelu("none")?
            .f_transpose(1, 2)?;
        let t = h.size()[1];
        if t > self.cfg.max_source_positions {
            return Err(Error::InvalidConfig {
                field: "thinker_config.audio_config.max_source_positions".to_owned(),
                value: self.cfg.max_source_positions.to_string(),
                reason: format!("shorter than a chunk of {t} positions (n_window)"),
            });
        }
        let h = h.f_add(&self.positions.f_narrow(0, 0, t)?.f_unsqueeze(0)?)?;
        // Each chunk's valid rows, in order, on one axis.
        let after: Vec<i64> = lens.iter().map(|&l| (l - 1) / 2 + 1).collect();
        let mut rows = Vec::new();
        for (c, &a) in after.iter().enumerate() {
            rows.extend((0..a).map(|r| c as i64 * t + r));
        }
        let rows = Tensor::from_slice(&rows).f_to_device(device)?;
        let mut h = h
            .f_reshape([-1, self.cfg.d_model])?
            .f_index_select(0, &rows)?;
        for layer in &self.layers {
            let a = self.attention(layer, &layer.attn_norm.forward(&h)?, &after)?;
            h = h.f_add(&a)?;
            let m = layer.mlp_norm.forward(&h)?;
            let m = layer.fc2.forward(&layer.fc1.forward(&m)?.f_gelu("none")?)?;
            h = h.f_add(&m)?;
        }
        // Average pooling over pairs of the whole clip's rows.
        let total: i64 = after.iter().sum();
        let pooled = (total - 2).div_euclid(2) + 1;
        let even = Tensor::f_arange_start_step(0, 2 * pooled, 2, (Kind::Int64, device))?;
        let h = h
            .f_index_select(0, &even)?
            .f_add(&h.f_index_select(0, &even.f_add_scalar(1)?)?)?
            .f_div_scalar(2)?;
        self.proj.forward(&self.ln_post.forward(&h)?)
    }

    /// Self-attention within each chunk (`lens` rows each, in order).
    fn attention(&self, layer: &Layer, x: &Tensor, lens: &[i64]) -> Result<Tensor> {
        let heads = self.cfg.encoder_attention_heads;
        let d = self.cfg.d_model / heads;
        let split = |t: Tensor| -> Result<Tensor> {
            // [rows, width] -> [heads, rows, head_dim]
            Ok(t.f_view([-1, heads, d])?.f_transpose(0, 1)?)
        };
        let q = split(layer.q.forward(x)?)?;
        let k = split(layer.k.forward(x)?)?;
        let v = split(layer.v.forward(x)?)?;
        let o = attention_within(&q, &k, &v, lens)?;
        layer.out.forward(&o)
    }
}
