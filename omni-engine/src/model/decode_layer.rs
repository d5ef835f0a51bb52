//! A decoder layer for a lone decoding token in one call: the batch-one
//! decode step on the CPU with the layer's products on GGUF's blocks
//! (`csrc/decode_layer.cpp`; why: see there). Its output is the op-by-op
//! path's bit for bit; `OMNI_FUSED_DECODE=0` turns it off, to measure the
//! difference.
use std::ffi::{c_char, c_void};
use std::ptr;
use std::sync::OnceLock;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::error::Result;
use crate::quant::{Activations, QuantMatrix};
use crate::shim::status_from_shim;

/// `LayerArgs` in `csrc/decode_layer.cpp`, field for field.
#[repr(C)]
struct LayerArgs {
    x: *mut C_tensor,
    h: *mut C_tensor,
    qkv: *const c_void,
    qkv_bias: *const C_tensor,
    o: *const c_void,
    gate_up: *const c_void,
    down: *const c_void,
    post_norm: *const C_tensor,
    next_norm: *const C_tensor,
    eps: f64,
    heads: i64,
    kv_heads: i64,
    cos: *const C_tensor,
    sin: *const C_tensor,
    k_cache: *const C_tensor,
    v_cache: *const C_tensor,
    block_tables: *const C_tensor,
    row_tables: *const C_tensor,
    context_lens: *const C_tensor,
    slots: *const C_tensor,
    block_size: i64,
    scale: f64,
    int8_activations: bool,
}

extern "C" {
    fn omni_decode_layer(args: *const LayerArgs, err: *mut *mut c_char) -> bool;
}

/// A layer's four products, on blocks.
pub(crate) struct LayerBlocks<'a> {
    pub qkv: &'a QuantMatrix,
    pub qkv_bias: Option<&'a Tensor>,
    pub o: &'a QuantMatrix,
    pub gate_up: &'a QuantMatrix,
    pub down: &'a QuantMatrix,
    pub activations: Activations,
}

/// What every layer of one step shares: the token's place in the cache and
/// its rotary rows.
pub(crate) struct DecodeRow<'a> {
    pub heads: i64,
    pub kv_heads: i64,
    pub eps: f64,
    /// `head_dim` values each.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub block_tables: &'a Tensor,
    pub row_tables: &'a Tensor,
    pub context_lens: &'a Tensor,
    pub slots: &'a Tensor,
    pub block_size: usize,
    pub scale: f64,
}

/// Whether the fused layer runs where it applies: yes unless
/// `OMNI_FUSED_DECODE=0` (read once).
pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    #[cfg(test)]
    if let Some(on) = tests::FORCE.with(std::cell::Cell::get) {
        return on;
    }
    *ON.get_or_init(|| std::env::var("OMNI_FUSED_DECODE").map_or(true, |v| v != "0"))
}

/// Runs one layer: `x` (`[1, hidden]`, the residual stream) and `h` (its
/// normed input; the next layer's after, when `next_norm` is given) in
/// place, the token's K/V into the caches.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_layer(
    x: &mut Tensor,
    h: &mut Tensor,
    blocks: &LayerBlocks<'_>,
    post_norm: &Tensor,
    next_norm: Option<&Tensor>,
    k_cache: &Tensor,
    v_cache: &Tensor,
    row: &DecodeRow<'_>,
) -> Result<()> {
    let args = LayerArgs {
        x: x.as_mut_ptr(),
        h: h.as_mut_ptr(),
        qkv: blocks.qkv.handle(),
        qkv_bias: blocks.qkv_bias.map_or(ptr::null(), Tensor::as_ptr),
        o: blocks.o.handle(),
        gate_up: blocks.gate_up.handle(),
        down: blocks.down.handle(),
        post_norm: post_norm.as_ptr(),
        next_norm: next_norm.map_or(ptr::null(), Tensor::as_ptr),
        eps: row.eps,
        heads: row.heads,
        kv_heads: row.kv_heads,
        cos: row.cos.as_ptr(),
        sin: row.sin.as_ptr(),
        k_cache: k_cache.as_ptr(),
        v_cache: v_cache.as_ptr(),
        block_tables: row.block_tables.as_ptr(),
        row_tables: row.row_tables.as_ptr(),
        context_lens: row.context_lens.as_ptr(),
        slots: row.slots.as_ptr(),
        block_size: row.block_size as i64,
        scale: row.scale,
        int8_activations: blocks.activations == Activations::Int8,
    };
    #[cfg(test)]
    tests::CALLS.with(|c| c.set(c.get() + 1));
    let mut err = ptr::null_mut();
    // SAFETY: every pointer in `args` is live for the call (borrowed above;
    // `x` and `h` mutably, so no one else sees them change); the shim checks
    // shapes, dtypes and every index before it reads or writes.
    let ok = unsafe { omni_decode_layer(&args, &mut err) };
    // SAFETY: straight from the shim.
    unsafe { status_from_shim(ok, err, "decode layer") }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell;

    thread_local! {
        /// A test's choice for its own thread, over the environment's.
        pub(crate) static FORCE: Cell<Option<bool>> = const { Cell::new(None) };
        /// Layers this thread ran fused.
        pub(crate) static CALLS: Cell<usize> = const { Cell::new(0) };
    }

    /// Layers this thread has run fused so far.
    pub(crate) fn fused_layers() -> usize {
        CALLS.with(Cell::get)
    }

    /// Runs `f` with the fused layer on or off on this thread.
    pub(crate) fn with_fused_decode<R>(on: bool, f: impl FnOnce() -> R) -> R {
        let before = FORCE.with(|c| c.replace(Some(on)));
        struct Restore(Option<bool>);
        impl Drop for Restore {
            fn drop(&mut self) {
                FORCE.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(before);
        f()
    }
}
