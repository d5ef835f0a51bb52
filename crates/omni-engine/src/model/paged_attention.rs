//! Decode attention on the CPU, read in place from the paged KV cache by the
//! kernel in `csrc/paged_attention.cpp`: no gathered copy of the context, no
//! padding, no mask (why: see that file).
use std::ffi::c_char;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::error::Result;
use crate::shim::from_shim;

extern "C" {
    fn omni_paged_decode_attention(
        q: *const C_tensor,
        k_cache: *const C_tensor,
        v_cache: *const C_tensor,
        block_tables: *const C_tensor,
        context_lens: *const C_tensor,
        block_size: i64,
        scale: f64,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
}

/// `q`: `[n, heads, head_dim]`, one query token per sequence; the caches
/// `[slots, kv_heads, head_dim]`; `block_tables` `[n, max_blocks]` and
/// `context_lens` `[n]` (int64, keys per sequence including the new one).
/// Returns `[n, heads, head_dim]`. The kernel checks every index first: a
/// table that points outside the cache is an error, not a bad read.
pub(crate) fn paged_decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_tables: &Tensor,
    context_lens: &Tensor,
    block_size: usize,
) -> Result<Tensor> {
    let head_dim = q.size().last().copied().unwrap_or(1).max(1);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut err = std::ptr::null_mut();
    // SAFETY: every tensor outlives the call; the shim only reads them.
    let ptr = unsafe {
        omni_paged_decode_attention(
            q.as_ptr(),
            k_cache.as_ptr(),
            v_cache.as_ptr(),
            block_tables.as_ptr(),
            context_lens.as_ptr(),
            block_size as i64,
            scale,
            &mut err,
        )
    };
    // SAFETY: straight from the shim.
    unsafe { from_shim(ptr, err, "paged decode attention") }
}
