//! Linear layers and the precision their weights are kept in.
//!
//! On CPU, decoding one token multiplies every weight once, so at small
//! batch sizes the speed is set by the bytes of weights read per token, not
//! by FLOPs. fp32 weights cap SmolLM2-135M at ~17 tok/s here; fbgemm's
//! fp16-weight kernel (`fbgemm_linear_fp16_weight_fp32_activation`, weights
//! packed once at load, activations and accumulation in fp32) halves the
//! bytes and measured 2.4x faster at batch 1. libtorch's int8/int4
//! weight-only CPU kernels were slower than fp32 on this AVX2 machine, so they
//! are not offered.
//!
//! tch does not bind the `fbgemm_*` operators; `csrc/fbgemm_fp16.cpp`
//! exposes them with C linkage and this file calls them through
//! [`crate::shim`].
use std::ffi::c_char;

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::error::{Error, Result};
use crate::shim::from_shim;

/// How weight matrices of linear layers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WeightPrecision {
    /// In the engine's dtype (fp32 on CPU, bf16 on CUDA): exact.
    Native,
    /// fp16 weights packed for fbgemm, fp32 activations (CPU with AVX2 only).
    Fp16,
}

impl WeightPrecision {
    /// Names accepted by [`WeightPrecision::parse`].
    pub const NAMES: &'static str = "native (alias fp32), fp16";

    /// Parses `EngineArgs::weight_precision` (`auto` is resolved by the engine).
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "native" | "fp32" | "float32" => Ok(WeightPrecision::Native),
            "fp16" | "float16" => Ok(WeightPrecision::Fp16),
            _ => Err(Error::InvalidConfig {
                field: "engine_args.weight_precision".to_owned(),
                value: name.to_owned(),
                reason: format!("expected auto or one of {}", Self::NAMES),
            }),
        }
    }

    /// The canonical name.
    pub fn as_str(&self) -> &'static str {
        match self {
            WeightPrecision::Native => "native",
            WeightPrecision::Fp16 => "fp16",
        }
    }

    /// Whether this precision can run with activations of `kind` on `device`.
    pub fn check(&self, device: Device, kind: Kind) -> Result<()> {
        match self {
            WeightPrecision::Native => Ok(()),
            WeightPrecision::Fp16 if device == Device::Cpu && kind == Kind::Float => Ok(()),
            WeightPrecision::Fp16 => Err(Error::InvalidConfig {
                field: "engine_args.weight_precision".to_owned(),
                value: self.as_str().to_owned(),
                reason: format!(
                    "fp16 weights need fp32 activations on the CPU, not {kind:?} on {device:?}"
                ),
            }),
        }
    }
}

extern "C" {
    fn omni_fbgemm_pack_fp16(weight: *const C_tensor, err: *mut *mut c_char) -> *mut C_tensor;
    fn omni_fbgemm_linear_fp16(
        input: *const C_tensor,
        shards: *const *const C_tensor,
        num_shards: i64,
        bias: *const C_tensor,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
}

#[derive(Debug)]
enum Storage {
    Dense(Tensor),
    /// Shards of the weight's output rows, in order, each packed; they run
    /// in parallel (one per intra-op thread at load time).
    PackedFp16(Vec<Tensor>),
}

/// Output rows per shard below which splitting a weight does not pay.
const MIN_SHARD_ROWS: i64 = 64;

/// `y = x W^T + b` with the weight in the chosen precision.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Storage,
    bias: Option<Tensor>,
}

impl Linear {
    /// Takes a `[out, in]` weight in the engine's dtype.
    pub fn new(weight: Tensor, bias: Option<Tensor>, precision: WeightPrecision) -> Result<Self> {
        let weight = match precision {
            WeightPrecision::Native => Storage::Dense(weight),
            WeightPrecision::Fp16 => {
                let w = weight.f_to_kind(Kind::Float)?;
                let out_features = w.size().first().copied().unwrap_or(0);
                let threads = i64::from(tch::get_num_threads().max(1));
                let shards = threads.min(out_features / MIN_SHARD_ROWS).max(1);
                let mut packed = Vec::new();
                for shard in w.f_chunk(shards, 0)? {
                    let shard = shard.f_contiguous()?;
                    let mut err = std::ptr::null_mut();
                    // SAFETY: `shard` is a live tensor for the duration of the call.
                    let ptr = unsafe { omni_fbgemm_pack_fp16(shard.as_ptr(), &mut err) };
                    // SAFETY: straight from the shim.
                    packed.push(unsafe { from_shim(ptr, err, "fbgemm_pack_gemm_matrix_fp16") }?);
                }
                Storage::PackedFp16(packed)
            }
        };
        Ok(Self { weight, bias })
    }

    /// `x`: `[tokens, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Storage::Dense(w) => Ok(x.f_linear(w, self.bias.as_ref())?),
            Storage::PackedFp16(shards) => {
                let x = x.f_contiguous()?;
                let bias = self.bias.as_ref().map_or(std::ptr::null(), |b| b.as_ptr());
                let ptrs: Vec<*const C_tensor> = shards.iter().map(|s| s.as_ptr()).collect();
                let mut err = std::ptr::null_mut();
                // SAFETY: all tensors outlive the call; `ptrs` holds
                // `ptrs.len()` live tensors; bias may be null.
                let ptr = unsafe {
                    omni_fbgemm_linear_fp16(
                        x.as_ptr(),
                        ptrs.as_ptr(),
                        ptrs.len() as i64,
                        bias,
                        &mut err,
                    )
                };
                // SAFETY: straight from the shim.
                unsafe { from_shim(ptr, err, "fbgemm fp16 linear") }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp16_linear_is_close_to_fp32() -> Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(0);
        let w = Tensor::f_randn([48, 32], (Kind::Float, Device::Cpu))?;
        let b = Tensor::f_randn([48], (Kind::Float, Device::Cpu))?;
        let x = Tensor::f_randn([5, 32], (Kind::Float, Device::Cpu))?;
        let dense = Linear::new(
            w.shallow_clone(),
            Some(b.shallow_clone()),
            WeightPrecision::Native,
        )?;
        let packed = Linear::new(w, Some(b), WeightPrecision::Fp16)?;
        let a = dense.forward(&x)?;
        let c = packed.forward(&x)?;
        assert_eq!(a.size(), c.size());
        let diff = f64::try_from(a.f_sub(&c)?.f_abs()?.f_max()?)?;
        assert!(diff < 0.05, "max diff {diff}");
        Ok(())
    }

    /// Weights are split into shards of output rows that run on the
    /// intra-op threads: uneven shards, many input rows (fbgemm blocks rows
    /// by 120) and a 3-d input must come out as the dense product does.
    #[test]
    fn threaded_fp16_linear_covers_every_output() -> Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(1);
        let threads = tch::get_num_threads();
        tch::set_num_threads(2);
        let result = (|| -> Result<()> {
            for (rows, inp, out) in [(1, 64, 1001), (130, 96, 200), (7, 576, 1536)] {
                let w = Tensor::f_randn([out, inp], (Kind::Float, Device::Cpu))?;
                let x = Tensor::f_randn([1, rows, inp], (Kind::Float, Device::Cpu))?;
                let dense = Linear::new(w.shallow_clone(), None, WeightPrecision::Native)?;
                let packed = Linear::new(w, None, WeightPrecision::Fp16)?;
                let a = dense.forward(&x)?;
                let c = packed.forward(&x)?;
                assert_eq!(a.size(), c.size());
                // fp16 weights: relative error ~1e-3 of each dot product.
                let scale = f64::try_from(a.f_abs()?.f_max()?)?;
                let diff = f64::try_from(a.f_sub(&c)?.f_abs()?.f_max()?)?;
                assert!(
                    diff < 0.01 * scale,
                    "{rows}x{inp}x{out}: max diff {diff} of {scale}"
                );
            }
            Ok(())
        })();
        tch::set_num_threads(threads);
        result
    }

    #[test]
    fn unknown_precision_is_named() {
        match WeightPrecision::parse("int3") {
            Err(Error::InvalidConfig { value, .. }) => assert_eq!(value, "int3"),
            other => panic!("{other:?}"),
        }
    }
}
