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
//! tch does not bind fbgemm; `csrc/fbgemm_fp16.cpp` packs weights for
//! fbgemm's fp16 GEMM and runs it on the intra-op threads, and this file
//! calls it through [`crate::shim`].
use std::ffi::{c_char, c_void};
use std::ptr::NonNull;

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::error::{Error, Result};
use crate::shim::{from_shim, handle_from_shim};

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
    fn omni_fp16_pack(weight: *const C_tensor, err: *mut *mut c_char) -> *mut c_void;
    fn omni_fp16_free(packed: *mut c_void);
    fn omni_fp16_linear(
        input: *const C_tensor,
        packed: *const c_void,
        bias: *const C_tensor,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
}

/// A weight packed for fbgemm's fp16 GEMM (memory fbgemm owns).
#[derive(Debug)]
struct PackedFp16(NonNull<c_void>);

// SAFETY: the packed matrix is never written after packing; fbgemm's GEMM
// only reads it, from any thread.
unsafe impl Send for PackedFp16 {}
// SAFETY: as above.
unsafe impl Sync for PackedFp16 {}

impl PackedFp16 {
    fn new(weight: &Tensor) -> Result<Self> {
        let w = weight.f_to_kind(Kind::Float)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: `w` is a live tensor for the duration of the call.
        let ptr = unsafe { omni_fp16_pack(w.as_ptr(), &mut err) };
        // SAFETY: straight from the shim.
        Ok(Self(unsafe {
            handle_from_shim(ptr, err, "fbgemm fp16 pack")
        }?))
    }
}

impl Drop for PackedFp16 {
    fn drop(&mut self) {
        // SAFETY: made by omni_fp16_pack, freed once.
        unsafe { omni_fp16_free(self.0.as_ptr()) }
    }
}

#[derive(Debug)]
enum Storage {
    Dense(Tensor),
    /// Packed once at load; the GEMM splits its output columns between the
    /// intra-op threads.
    PackedFp16(PackedFp16),
}

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
            WeightPrecision::Fp16 => Storage::PackedFp16(PackedFp16::new(&weight)?),
        };
        Ok(Self { weight, bias })
    }

    /// `x`: `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Storage::Dense(w) => Ok(x.f_linear(w, self.bias.as_ref())?),
            Storage::PackedFp16(packed) => {
                let bias = self.bias.as_ref().map_or(std::ptr::null(), |b| b.as_ptr());
                let mut err = std::ptr::null_mut();
                // SAFETY: `x`, `packed` and `bias` (which may be null)
                // outlive the call.
                let ptr =
                    unsafe { omni_fp16_linear(x.as_ptr(), packed.0.as_ptr(), bias, &mut err) };
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

    /// The GEMM splits output columns between the intra-op threads: widths
    /// that are not a multiple of fbgemm's 16-column blocks (the last thread
    /// takes the fringe), many input rows (fbgemm blocks rows by 120) and a
    /// 3-d input must come out as the dense product does.
    #[test]
    fn threaded_fp16_linear_covers_every_output() -> Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(1);
        let threads = tch::get_num_threads();
        tch::set_num_threads(2);
        let result = (|| -> Result<()> {
            for (rows, inp, out) in [(1, 64, 1001), (130, 96, 200), (7, 576, 1536), (3, 40, 9)] {
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
    fn a_weight_fbgemm_cannot_pack_is_an_error() -> Result<()> {
        let w = Tensor::f_zeros([8], (Kind::Float, Device::Cpu))?;
        let e = Linear::new(w, None, WeightPrecision::Fp16).expect_err("1-d weight");
        assert!(e.to_string().contains("weight must be 2-d"), "{e}");
        Ok(())
    }

    #[test]
    fn unknown_precision_is_named() {
        match WeightPrecision::parse("int3") {
            Err(Error::InvalidConfig { value, .. }) => assert_eq!(value, "int3"),
            other => panic!("{other:?}"),
        }
    }
}
