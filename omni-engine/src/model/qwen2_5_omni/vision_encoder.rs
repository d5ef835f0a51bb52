//! The thinker's vision encoder (transformers' `Qwen2_5OmniVisionEncoder`,
//! Qwen2.5-VL's): patches of `temporal_patch_size` frames by `patch_size`
//! pixels embedded by a 3-D convolution, 2-D rotary positions (height and
//! width), transformer blocks that attend within windows of
//! `window_size` pixels except the `fullatt_block_indexes` ones (whole
//! frame), and a merger that turns each `spatial_merge_size`² group of
//! patches into one row of the thinker's width.
use serde::Deserialize;
use tch::{Kind, Tensor};

use super::layers::{attention_within, Linear};
use crate::error::{Error, Result};
use crate::weights::Weights;

/// `thinker_config.vision_config`; defaults are transformers' (the 7B
/// model's).
#[derive(Debug, Clone, Deserialize)]
pub struct VisionEncoderConfig {
    /// Blocks.
    #[serde(default = "d_depth")]
    pub depth: usize,
    /// Width.
    #[serde(default = "d_hidden")]
    pub hidden_size: i64,
    /// MLP activation.
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// MLP width.
    #[serde(default = "d_inter")]
    pub intermediate_size: i64,
    /// Attention heads.
    #[serde(default = "d_heads")]
    pub num_heads: i64,
    /// Colour channels.
    #[serde(default = "d_channels")]
    pub in_channels: i64,
    /// Pixels per patch side.
    #[serde(default = "d_patch")]
    pub patch_size: i64,
    /// Patches per merged row, per side.
    #[serde(default = "d_merge")]
    pub spatial_merge_size: i64,
    /// Frames per patch.
    #[serde(default = "d_temporal")]
    pub temporal_patch_size: i64,
    /// Attention window side, pixels.
    #[serde(default = "d_window")]
    pub window_size: i64,
    /// Blocks that attend over the whole frame.
    #[serde(default = "d_fullatt")]
    pub fullatt_block_indexes: Vec<usize>,
    /// Output width (the thinker's hidden size).
    #[serde(default = "d_out")]
    pub out_hidden_size: i64,
    /// RoPE base (transformers 5 may nest it in `rope_parameters`).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers 5's RoPE parameters.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
}

fn d_depth() -> usize {
    32
}
fn d_hidden() -> i64 {
    1280
}
fn d_act() -> String {
    "silu".to_owned()
}
fn d_inter() -> i64 {
    3420
}
fn d_heads() -> i64 {
    16
}
fn d_channels() -> i64 {
    3
}
fn d_patch() -> i64 {
    14
}
fn d_merge() -> i64 {
    2
}
fn d_temporal() -> i64 {
    2
}
fn d_window() -> i64 {
    112
}
fn d_fullatt() -> Vec<usize> {
    vec![7, 15, 23, 31]
}
fn d_out() -> i64 {
    3584
}

const RMS_EPS: f64 = 1e-6;

/// transformers' `Qwen2_5OmniRMSNorm`: in f32, then the weight.
fn rms_norm(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let kind = x.kind();
    let xf = x.f_to_kind(Kind::Float)?;
    let var = xf
        .f_pow_tensor_scalar(2)?
        .f_mean_dim(-1, true, Kind::Float)?;
    let normed = xf.f_mul(&var.f_add_scalar(RMS_EPS)?.f_rsqrt()?)?;
    Ok(w.f_mul(&normed.f_to_kind(kind)?)?)
}

struct Block {
    norm1: Tensor,
    norm2: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    proj: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The vision encoder.
pub struct VisionEncoder {
    cfg: VisionEncoderConfig,
    patch_embed: Tensor,
    blocks: Vec<Block>,
    merger_norm: Tensor,
    merger_fc1: Linear,
    merger_fc2: Linear,
    /// `[head_dim / 4]`: the axial RoPE's inverse frequencies.
    inv_freq: Tensor,
}

impl std::fmt::Debug for VisionEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionEncoder")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Where a frame's patches go in window order, and the windows' lengths
/// (in patches), as transformers' `get_vision_window_index`.
struct Windows {
    /// Merged-row order: the merged row at `index[i]` comes `i`-th.
    index: Vec<i64>,
    /// Patches per window, in order.
    lens: Vec<i64>,
}

impl VisionEncoder {
    /// Loads it from the checkpoint's `thinker.visual.*` tensors (with that
    /// prefix stripped).
    pub fn load(w: &mut Weights, cfg: &VisionEncoderConfig) -> Result<Self> {
        let bad = |field: &str, value: String, reason: &str| Error::InvalidConfig {
            field: format!("thinker_config.vision_config.{field}"),
            value,
            reason: reason.to_owned(),
        };
        if cfg.patch_size < 1 || cfg.temporal_patch_size < 1 || cfg.num_heads < 1 {
            return Err(bad(
                "patch_size",
                format!(
                    "{} (temporal {}, heads {})",
                    cfg.patch_size, cfg.temporal_patch_size, cfg.num_heads
                ),
                "patch_size, temporal_patch_size and num_heads must be at least 1",
            ));
        }
        if cfg.hidden_act != "silu" {
            return Err(bad(
                "hidden_act",
                cfg.hidden_act.clone(),
                "only silu is supported",
            ));
        }
        if cfg.hidden_size % cfg.num_heads != 0 || (cfg.hidden_size / cfg.num_heads) % 4 != 0 {
            return Err(bad(
                "hidden_size",
                cfg.hidden_size.to_string(),
                "must split into heads whose width is a multiple of 4 (axial RoPE)",
            ));
        }
        let unit = cfg.spatial_merge_size * cfg.patch_size;
        if cfg.spatial_merge_size < 1 || cfg.window_size < unit || cfg.window_size % unit != 0 {
            return Err(bad(
                "window_size",
                cfg.window_size.to_string(),
                "must be a positive multiple of spatial_merge_size * patch_size",
            ));
        }
        let mut blocks = Vec::with_capacity(cfg.depth);
        for l in 0..cfg.depth {
            let p = format!("blocks.{l}");
            blocks.push(Block {
                norm1: w.take(&format!("{p}.norm1.weight"))?,
                norm2: w.take(&format!("{p}.norm2.weight"))?,
                q: Linear::load(w, &format!("{p}.attn.q"))?,
                k: Linear::load(w, &format!("{p}.attn.k"))?,
                v: Linear::load(w, &format!("{p}.attn.v"))?,
                proj: Linear::load(w, &format!("{p}.attn.proj"))?,
                gate: Linear::load(w, &format!("{p}.mlp.gate_proj"))?,
                up: Linear::load(w, &format!("{p}.mlp.up_proj"))?,
                down: Linear::load(w, &format!("{p}.mlp.down_proj"))?,
            });
        }
        let patch_embed = w.take("patch_embed.proj.weight")?;
        let device = patch_embed.device();
        let theta = cfg
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(serde_json::Value::as_f64)
            .or(cfg.rope_theta)
            .unwrap_or(10_000.0);
        // transformers: 1 / base^(arange(0, dim/2, 2) / (dim/2)), in f32.
        let spatial = cfg.hidden_size / cfg.num_heads / 2;
        let inv_freq = Tensor::f_arange_start_step(0, spatial, 2, (Kind::Float, tch::Device::Cpu))?
            .f_div_scalar(spatial as f64)?;
        let inv_freq = Tensor::f_full([1], theta, (Kind::Float, tch::Device::Cpu))?
            .f_pow(&inv_freq)?
            .f_reciprocal()?
            .f_to_device(device)?;
        Ok(VisionEncoder {
            cfg: cfg.clone(),
            patch_embed,
            blocks,
            merger_norm: w.take("merger.ln_q.weight")?,
            merger_fc1: Linear::load(w, "merger.mlp.0")?,
            merger_fc2: Linear::load(w, "merger.mlp.2")?,
            inv_freq,
        })
    }

    /// The config it was built from.
    pub fn config(&self) -> &VisionEncoderConfig {
        &self.cfg
    }

    /// Values per patch row of `pixel_values`.
    pub fn patch_len(&self) -> i64 {
        self.cfg.in_channels
            * self.cfg.temporal_patch_size
            * self.cfg.patch_size
            * self.cfg.patch_size
    }

    fn windows(&self, t: i64, h: i64, w: i64) -> Windows {
        let m = self.cfg.spatial_merge_size;
        let win = self.cfg.window_size / m / self.cfg.patch_size;
        let (lh, lw) = (h / m, w / m);
        let (nh, nw) = ((lh + win - lh % win) / win, (lw + win - lw % win) / win);
        let mut index = Vec::with_capacity((t * lh * lw) as usize);
        let mut lens = Vec::new();
        for f in 0..t {
            for wy in 0..nh {
                for wx in 0..nw {
                    let before = index.len();
                    for y in wy * win..((wy + 1) * win).min(lh) {
                        for x in wx * win..((wx + 1) * win).min(lw) {
                            index.push(f * lh * lw + y * lw + x);
                        }
                    }
                    let n = (index.len() - before) as i64;
                    if n > 0 {
                        lens.push(n * m * m);
                    }
                }
            }
        }
        Windows { index, lens }
    }

    /// Merged rows `[t * h * w / merge², out_hidden_size]` of one image or
    /// video's patches (`pixel_values` `[t * h * w, patch_len]`, in the
    /// processor's order) on a grid of `(t, h, w)` patches.
    pub fn forward(&self, pixel_values: &Tensor, grid: [i64; 3]) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let [t, h, w] = grid;
        let cfg = &self.cfg;
        let m = cfg.spatial_merge_size;
        let n = t * h * w;
        if t < 1
            || h < m
            || w < m
            || h % m != 0
            || w % m != 0
            || pixel_values.size() != [n, self.patch_len()]
        {
            return Err(Error::InvalidConfig {
                field: "pixel_values".to_owned(),
                value: format!("{:?} for grid {grid:?}", pixel_values.size()),
                reason: format!(
                    "expected [t*h*w, {}] with h and w multiples of {m}",
                    self.patch_len()
                ),
            });
        }
        let device = self.patch_embed.device();
        let kind = self.patch_embed.kind();
        let x = pixel_values.f_to_device(device)?.f_to_kind(kind)?.f_view([
            -1,
            cfg.in_channels,
            cfg.temporal_patch_size,
            cfg.patch_size,
            cfg.patch_size,
        ])?;
        let k = [cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size];
        let x = x
            .f_conv3d(
                &self.patch_embed,
                None::<Tensor>,
                k,
                [0, 0, 0],
                [1, 1, 1],
                1,
            )?
            .f_view([n, cfg.hidden_size])?;

        // 2-D positions, merge-block-major, repeated per frame.
        let mut hw = Vec::with_capacity(2 * n as usize);
        for _ in 0..t {
            for by in 0..h / m {
                for bx in 0..w / m {
                    for dy in 0..m {
                        for dx in 0..m {
                            hw.push((by * m + dy) as f32);
                            hw.push((bx * m + dx) as f32);
                        }
                    }
                }
            }
        }
        let pos = Tensor::from_slice(&hw)
            .f_view([n, 2])?
            .f_to_device(device)?;
        let freqs = pos.f_unsqueeze(-1)?.f_mul(&self.inv_freq)?; // [n, 2, head_dim / 4]
        let freqs = freqs.f_view([n, -1])?; // h freqs then w freqs
        let angles = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        let (cos, sin) = (angles.f_cos()?, angles.f_sin()?);

        // Window order, in units of merge groups.
        let windows = self.windows(t, h, w);
        let unit = m * m;
        let order = Tensor::from_slice(&windows.index).f_to_device(device)?;
        let permute = |x: &Tensor| -> Result<Tensor> {
            let width = x.size()[1];
            Ok(x.f_view([n / unit, unit, width])?
                .f_index_select(0, &order)?
                .f_view([n, width])?)
        };
        let mut x = permute(&x)?;
        let cos = permute(&cos)?.f_unsqueeze(1)?;
        let sin = permute(&sin)?.f_unsqueeze(1)?;
        let frames = vec![h * w; t as usize];
        for (l, block) in self.blocks.iter().enumerate() {
            let lens = if cfg.fullatt_block_indexes.contains(&l) {
                &frames
            } else {
                &windows.lens
            };
            let a = self.attention(block, &rms_norm(&x, &block.norm1)?, &cos, &sin, lens)?;
            x = x.f_add(&a)?;
            let y = rms_norm(&x, &block.norm2)?;
            let y = block.down.forward(
                &block
                    .gate
                    .forward(&y)?
                    .f_silu()?
                    .f_mul(&block.up.forward(&y)?)?,
            )?;
            x = x.f_add(&y)?;
        }
        let merged = rms_norm(&x, &self.merger_norm)?.f_view([n / unit, -1])?;
        let merged = self
            .merger_fc2
            .forward(&self.merger_fc1.forward(&merged)?.f_gelu("none")?)?;
        let reverse = order.f_argsort(0, false)?;
        Ok(merged.f_index_select(0, &reverse)?)
    }

    fn attention(
        &self,
        block: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        lens: &[i64],
    ) -> Result<Tensor> {
        let heads = self.cfg.num_heads;
        let d = self.cfg.hidden_size / heads;
        let rope = |t: Tensor| -> Result<Tensor> {
            let t = t.f_view([-1, heads, d])?;
            let kind = t.kind();
            let t = t.f_to_kind(Kind::Float)?;
            let half = d / 2;
            let rotated = Tensor::f_cat(
                &[t.f_narrow(2, half, half)?.f_neg()?, t.f_narrow(2, 0, half)?],
                2,
            )?;
            Ok(t.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)?.f_to_kind(kind)?)
        };
        let q = rope(block.q.forward(x)?)?.f_transpose(0, 1)?;
        let k = rope(block.k.forward(x)?)?.f_transpose(0, 1)?;
        let v = block
            .v
            .forward(x)?
            .f_view([-1, heads, d])?
            .f_transpose(0, 1)?;
        let o = attention_within(&q, &k, &v, lens)?;
        block.proj.forward(&o)
    }
}
