//! Rotary position embeddings (RoPE, Su et al. 2021,
//! <https://arxiv.org/abs/2104.09864>), computed once at load.
//!
//! The tables follow transformers' `LlamaRotaryEmbedding` and
//! `_compute_llama3_parameters` / `_compute_linear_scaling_rope_parameters`:
//! inverse frequencies `theta^(-2i/d)` (rescaled as `rope_scaling` says),
//! angles in fp32, then cos/sin cast to the model's dtype. Rotation uses the
//! "rotate half" layout of HF checkpoints (GGUF loaders un-permute q/k into
//! it), so the first and second halves of each head form the pairs.
use tch::{Device, Kind, Tensor};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::Result;

/// cos/sin tables for every position up to the context length.
///
/// Stored over the full head width as `cos ‖ cos` and `-sin ‖ sin`, so that
/// a rotation is `x * cos + swap_halves(x) * sin`: four tensor ops instead of
/// eight (op count matters on CPU at batch 1).
#[derive(Debug)]
pub(crate) struct Rotary {
    /// `[max_positions, head_dim]`.
    cos: Tensor,
    /// `[max_positions, head_dim]`, first half negated.
    sin: Tensor,
}

fn inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    match &cfg.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl Rotary {
    pub fn new(
        cfg: &ModelConfig,
        max_positions: usize,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        // transformers computes inv_freq in fp32 from an fp32 arange; do the
        // same so angles match to the last bit at long positions.
        let inv: Vec<f32> = inv_freq(cfg).into_iter().map(|f| f as f32).collect();
        let inv = Tensor::from_slice(&inv);
        let pos = Tensor::f_arange(max_positions as i64, (Kind::Float, Device::Cpu))?;
        let angles = pos.f_unsqueeze(1)?.f_mul(&inv.f_unsqueeze(0)?)?;
        let (cos, sin) = (angles.f_cos()?, angles.f_sin()?);
        let cos = Tensor::f_cat(&[&cos, &cos], 1)?;
        let sin = Tensor::f_cat(&[&sin.f_neg()?, &sin], 1)?;
        Ok(Self {
            cos: cos.f_to_kind(kind)?.f_to_device(device)?,
            sin: sin.f_to_kind(kind)?.f_to_device(device)?,
        })
    }

    /// cos and signed sin for `positions` (`[tokens]`, int64), shaped
    /// `[tokens, 1, head_dim]` to broadcast over heads.
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let cos = self.cos.f_index_select(0, positions)?.f_unsqueeze(1)?;
        let sin = self.sin.f_index_select(0, positions)?.f_unsqueeze(1)?;
        Ok((cos, sin))
    }

    /// cos and signed sin for 3-D positions (`[3, tokens]`, int64: temporal,
    /// height, width), shaped `[tokens, 1, head_dim]`. Column `c` of a head
    /// takes the row `row_of_column[c]` names (transformers'
    /// `apply_multimodal_rotary_pos_emb`: the frequencies in `mrope_section`
    /// order, in both halves).
    pub fn tables_3d(
        &self,
        positions: &Tensor,
        row_of_column: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let gather = |table: &Tensor| -> Result<Tensor> {
            let rows: Vec<Tensor> = (0..3)
                .map(|r| table.f_index_select(0, &positions.f_get(r)?))
                .collect::<std::result::Result<_, _>>()?;
            // [3, tokens, head_dim] -> pick a row per column.
            let stacked = Tensor::f_stack(&rows, 0)?;
            let index = row_of_column
                .f_view([1, 1, -1])?
                .f_expand([1, stacked.size()[1], stacked.size()[2]], false)?;
            Ok(stacked
                .f_gather(0, &index, false)?
                .f_squeeze_dim(0)?
                .f_unsqueeze(1)?)
        };
        Ok((gather(&self.cos)?, gather(&self.sin)?))
    }

    /// Positions the tables cover.
    pub fn len(&self) -> i64 {
        self.cos.size()[0]
    }

    /// Rotates `x` (`[tokens, heads, head_dim]`): HF's
    /// `x * cos + rotate_half(x) * sin`.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.size()[2] / 2;
        let swapped = Tensor::f_cat(&[x.f_narrow(2, half, half)?, x.f_narrow(2, 0, half)?], 2)?;
        Ok(x.f_mul(cos)?.f_add(&swapped.f_mul(sin)?)?)
    }
}
