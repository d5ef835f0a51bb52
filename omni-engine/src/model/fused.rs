//! The decoder's elementwise steps: RMSNorm (with the residual add before
//! it), the MLP's SiLU-and-mul, and RoPE. For fp32 on the CPU each is one
//! pass of a kernel in `csrc/fused.cpp` (why: see that file); elsewhere
//! (CUDA, bf16) they are ATen's composite ops, which tests hold the kernels
//! to.
use std::ffi::c_char;

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use super::rotary::Rotary;
use crate::error::Result;
use crate::shim::from_shim;

extern "C" {
    fn omni_rms_norm(
        x: *const C_tensor,
        w: *const C_tensor,
        eps: f64,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
    fn omni_add_rms_norm(
        x: *mut C_tensor,
        delta: *const C_tensor,
        w: *const C_tensor,
        eps: f64,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
    #[cfg(test)]
    fn omni_fused_force_portable(on: bool);
    fn omni_silu_and_mul(gu: *const C_tensor, err: *mut *mut c_char) -> *mut C_tensor;
    fn omni_rope_(
        x: *mut C_tensor,
        cos: *const C_tensor,
        sin: *const C_tensor,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
}

/// Which implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernels {
    /// The fused CPU kernels (fp32 on the CPU only).
    Fused,
    /// ATen's composite ops.
    Composite,
}

impl Kernels {
    /// Fused where they apply.
    pub fn for_tensor(t: &Tensor) -> Self {
        if t.device() == Device::Cpu && t.kind() == Kind::Float {
            Kernels::Fused
        } else {
            Kernels::Composite
        }
    }

    /// `x / sqrt(mean(x^2) + eps) * w` over the last dim of `x` `[rows, n]`.
    pub fn rms_norm(self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        match self {
            Kernels::Fused => {
                let mut err = std::ptr::null_mut();
                // SAFETY: the tensors outlive the call, which only reads them.
                let ptr = unsafe { omni_rms_norm(x.as_ptr(), w.as_ptr(), eps, &mut err) };
                // SAFETY: straight from the shim.
                unsafe { from_shim(ptr, err, "rms_norm") }
            }
            Kernels::Composite => {
                let d = *x.size().last().unwrap_or(&0);
                Ok(x.f_rms_norm([d], Some(w), eps)?)
            }
        }
    }

    /// `x += delta` in place, then [`Kernels::rms_norm`] of the new `x`
    /// (the residual stream and the next sublayer's input).
    pub fn add_rms_norm(
        self,
        x: &mut Tensor,
        delta: &Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<Tensor> {
        match self {
            Kernels::Fused => {
                let mut err = std::ptr::null_mut();
                // SAFETY: the tensors outlive the call; `x` is borrowed
                // mutably, so no one else sees it change.
                let ptr = unsafe {
                    omni_add_rms_norm(x.as_mut_ptr(), delta.as_ptr(), w.as_ptr(), eps, &mut err)
                };
                // SAFETY: straight from the shim.
                unsafe { from_shim(ptr, err, "add_rms_norm") }
            }
            Kernels::Composite => {
                let _ = x.f_add_(delta)?;
                self.rms_norm(x, w, eps)
            }
        }
    }

    /// `silu(gate) * up` of `gu` `[rows, 2n]` (gate then up), `[rows, n]`.
    pub fn silu_and_mul(self, gu: &Tensor) -> Result<Tensor> {
        match self {
            Kernels::Fused => {
                let mut err = std::ptr::null_mut();
                // SAFETY: `gu` outlives the call, which only reads it.
                let ptr = unsafe { omni_silu_and_mul(gu.as_ptr(), &mut err) };
                // SAFETY: straight from the shim.
                unsafe { from_shim(ptr, err, "silu_and_mul") }
            }
            Kernels::Composite => {
                let n = gu.size().last().copied().unwrap_or(0) / 2;
                Ok(gu
                    .f_narrow(-1, 0, n)?
                    .f_silu()?
                    .f_mul(&gu.f_narrow(-1, n, n)?)?)
            }
        }
    }

    /// Rotates `x` (`[tokens, heads, head_dim]`) by the tables of
    /// [`Rotary::tables`]; in place when fused. Returns the rotated tensor.
    pub fn rope(self, x: Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        match self {
            Kernels::Fused => {
                let mut x = x;
                let mut err = std::ptr::null_mut();
                // SAFETY: the tensors outlive the call; `x` is owned here.
                let ptr =
                    unsafe { omni_rope_(x.as_mut_ptr(), cos.as_ptr(), sin.as_ptr(), &mut err) };
                // SAFETY: straight from the shim (a new handle to `x`).
                unsafe { from_shim(ptr, err, "rope") }
            }
            Kernels::Composite => Rotary::apply(&x, cos, sin),
        }
    }
}

/// Runs `f` with the portable loops of every CPU kernel (`portable`), or
/// with their AVX2 builds where the CPU has them, so tests check both.
#[cfg(test)]
pub(crate) fn with_kernel_build<R>(portable: bool, f: impl FnOnce() -> R) -> R {
    // The flag is process-wide: callers take turns, so a test that asked for
    // the portable loops runs them (another test's reset could otherwise
    // switch it back mid-call). Kernels called outside this run either build;
    // the two agree far within any test's tolerance.
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = TURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: sets an atomic flag.
    unsafe { omni_fused_force_portable(portable) };
    let r = f();
    // SAFETY: as above.
    unsafe { omni_fused_force_portable(false) };
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: &[i64]) -> Result<Tensor> {
        Ok(Tensor::f_randn(shape, (Kind::Float, Device::Cpu))?)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        assert_eq!(a.size(), b.size());
        Ok(f64::try_from(a.f_sub(b)?.f_abs()?.f_max()?)?)
    }

    /// Every kernel against ATen's composite, on shapes with a fringe past
    /// the 8-lane loops, strided rows, and enough rows to run in parallel;
    /// the AVX2 build and the portable one.
    #[test]
    fn fused_kernels_match_the_composite_ops() -> Result<()> {
        for portable in [false, true] {
            with_kernel_build(portable, compare_with_composite)?;
        }
        Ok(())
    }

    fn compare_with_composite() -> Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(3);
        let (f, c) = (Kernels::Fused, Kernels::Composite);
        for (rows, n) in [(1, 576), (5, 13), (300, 576)] {
            // Strided rows: every other row of a wider tensor's columns.
            let wide = randn(&[rows, n + 7])?;
            let x = wide.f_narrow(1, 3, n)?;
            let w = randn(&[n])?;
            let eps = 1e-5;
            assert!(max_diff(&f.rms_norm(&x, &w, eps)?, &c.rms_norm(&x, &w, eps)?)? < 1e-5);

            let delta = randn(&[rows, n])?;
            let mut xf = x.contiguous().copy();
            let mut xc = x.contiguous().copy();
            let hf = f.add_rms_norm(&mut xf, &delta, &w, eps)?;
            let hc = c.add_rms_norm(&mut xc, &delta, &w, eps)?;
            assert!(max_diff(&xf, &xc)? == 0.0, "residual add differs");
            assert!(max_diff(&hf, &hc)? < 1e-5);

            // Large magnitudes reach exp's clamps: silu(-100) is ~0, not NaN.
            let gu = randn(&[rows, 2 * n])?.f_mul_scalar(4.0)?;
            let _ = gu.f_narrow(1, 0, 1)?.f_fill_(-100.0)?;
            let a = f.silu_and_mul(&gu)?;
            let b = c.silu_and_mul(&gu)?;
            let scale = f64::try_from(b.f_abs()?.f_max()?)?;
            assert!(max_diff(&a, &b)? <= 1e-6 * scale.max(1.0), "silu_and_mul");
            assert_eq!(f64::try_from(a.f_isnan()?.f_any()?)?, 0.0);
        }
        for (tokens, heads, d) in [(1, 12, 64), (7, 3, 10), (200, 12, 64)] {
            // Heads of a wider row (q and k inside the fused qkv output).
            let qkv = randn(&[tokens, (heads + 2) * d])?;
            let x = qkv.f_narrow(1, 0, heads * d)?.f_view([tokens, heads, d])?;
            let cos = randn(&[tokens, 1, d])?;
            let sin = randn(&[tokens, 1, d])?;
            let want = c.rope(x.copy(), &cos, &sin)?;
            let got = f.rope(x.shallow_clone(), &cos, &sin)?;
            assert!(max_diff(&got, &want)? < 1e-5);
            // In place: the fused output is the caller's storage.
            assert!(max_diff(&x, &want)? < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors_naming_them() -> Result<()> {
        let f = Kernels::Fused;
        let x = randn(&[2, 8])?;
        let e = f
            .rms_norm(&x, &randn(&[7])?, 1e-5)
            .expect_err("7 weights for 8");
        assert!(e.to_string().contains("weight must be 8"), "{e}");
        let e = f.silu_and_mul(&randn(&[2, 7])?).expect_err("odd width");
        assert!(e.to_string().contains("odd"), "{e}");
        let cos = randn(&[2, 1, 4])?;
        let e = f
            .rope(randn(&[3, 1, 4])?, &cos, &cos)
            .expect_err("3 tokens, tables for 2");
        assert!(e.to_string().contains("cos/sin"), "{e}");
        Ok(())
    }
}
