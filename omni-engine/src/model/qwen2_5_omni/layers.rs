//! Layers the thinker's encoders share: linear and layer-norm weights as the
//! checkpoint names them, and attention confined to consecutive spans of a
//! sequence (audio chunks, image windows and frames), as transformers runs
//! it without flash attention: one attention per span.
use tch::Tensor;

use crate::error::Result;
use crate::weights::Weights;

/// `nn.Linear`: `<name>.weight`, and `<name>.bias` when the checkpoint has
/// one.
pub(super) struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    pub(super) fn load(w: &mut Weights, name: &str) -> Result<Self> {
        let (w, b) = w.take_weight_bias(name)?;
        Ok(Linear { w, b })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.w, self.b.as_ref())?)
    }
}

/// `nn.LayerNorm` with its default epsilon.
pub(super) struct LayerNorm {
    w: Tensor,
    b: Tensor,
}

impl LayerNorm {
    const EPS: f64 = 1e-5;

    pub(super) fn load(w: &mut Weights, name: &str) -> Result<Self> {
        Ok(LayerNorm {
            w: w.take(&format!("{name}.weight"))?,
            b: w.take(&format!("{name}.bias"))?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let width = *x.size().last().unwrap_or(&0);
        Ok(x.f_layer_norm([width], Some(&self.w), Some(&self.b), Self::EPS, false)?)
    }
}

/// Attention of `q`, `k`, `v` (`[heads, rows, head_dim]`) within each span
/// of `lens` consecutive rows (non-causal, softmax scale `head_dim^-0.5`);
/// `[rows, heads * head_dim]`.
pub(super) fn attention_within(q: &Tensor, k: &Tensor, v: &Tensor, lens: &[i64]) -> Result<Tensor> {
    let mut outs = Vec::with_capacity(lens.len());
    let mut start = 0;
    for &len in lens {
        let part =
            |t: &Tensor| -> Result<Tensor> { Ok(t.f_narrow(1, start, len)?.f_unsqueeze(0)?) };
        let o = Tensor::f_scaled_dot_product_attention::<Tensor>(
            &part(q)?,
            &part(k)?,
            &part(v)?,
            None,
            0.0,
            false,
            None,
            false,
        )?;
        outs.push(o.f_squeeze_dim(0)?);
        start += len;
    }
    let o = Tensor::f_cat(&outs, 1)?;
    let (heads, d) = (q.size()[0], q.size()[2]);
    Ok(o.f_transpose(0, 1)?.f_reshape([-1, heads * d])?)
}
