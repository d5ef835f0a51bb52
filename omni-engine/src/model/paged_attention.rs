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

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::model::fused::with_kernel_build;

    /// Attention of each sequence from its gathered keys and values, with
    /// ATen ops: softmax(q k^T * scale) v per query head, GQA by repeat.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        tables: &[Vec<i64>],
        lens: &[i64],
        bs: i64,
    ) -> Result<Tensor> {
        let (heads, d) = (q.size()[1], q.size()[2]);
        let group = heads / k.size()[1];
        let mut rows = Vec::new();
        for (s, table) in tables.iter().enumerate() {
            let slots: Vec<i64> = (0..lens[s])
                .map(|t| table[(t / bs) as usize] * bs + t % bs)
                .collect();
            let slots = Tensor::from_slice(&slots);
            // [ctx, kv_heads, d] -> [heads, ctx, d]
            let gather = |c: &Tensor| -> Result<Tensor> {
                Ok(c.f_index_select(0, &slots)?
                    .f_to_kind(Kind::Float)?
                    .f_repeat_interleave_self_int(group, Some(1), None)?
                    .f_transpose(0, 1)?)
            };
            let (ks, vs) = (gather(k)?, gather(v)?);
            let qs = q.f_get(s as i64)?.f_unsqueeze(1)?; // [heads, 1, d]
            let scores = qs
                .f_matmul(&ks.f_transpose(1, 2)?)?
                .f_mul_scalar(1.0 / (d as f64).sqrt())?;
            let probs = scores.f_softmax(-1, Kind::Float)?;
            rows.push(probs.f_matmul(&vs)?.f_squeeze_dim(1)?);
        }
        Ok(Tensor::f_stack(&rows, 0)?)
    }

    /// The kernel (its AVX2 build and its portable one, fp32 and fp16
    /// caches) against ATen: GQA, context lengths off the 8-lane loops and
    /// across blocks in any order, and scores large enough that softmax
    /// depends on subtracting the max.
    #[test]
    fn matches_attention_over_the_gathered_context() -> Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(11);
        let (heads, kv_heads, d, bs, num_blocks) = (6i64, 2i64, 40i64, 16i64, 12i64);
        let lens = [1i64, 7, 16, 37, 150];
        // Tables: blocks out of order, and sequences sharing none.
        let mut next = (0..num_blocks).rev();
        let tables: Vec<Vec<i64>> = lens
            .iter()
            .map(|l| {
                (0..(l + bs - 1) / bs)
                    .map(|_| next.next().unwrap_or(0))
                    .collect()
            })
            .collect();
        let _ = next.count();
        let max_blocks = tables.iter().map(Vec::len).max().unwrap_or(1);
        let flat: Vec<i64> = tables
            .iter()
            .flat_map(|t| {
                t.iter()
                    .copied()
                    .chain(std::iter::repeat(0))
                    .take(max_blocks)
            })
            .collect();
        let block_tables =
            Tensor::from_slice(&flat).f_view([lens.len() as i64, max_blocks as i64])?;
        let context_lens = Tensor::from_slice(&lens);
        let opts = (Kind::Float, Device::Cpu);
        let q = Tensor::f_randn([lens.len() as i64, heads, d], opts)?.f_mul_scalar(4.0)?;
        let k = Tensor::f_randn([num_blocks * bs, kv_heads, d], opts)?.f_mul_scalar(4.0)?;
        let v = Tensor::f_randn([num_blocks * bs, kv_heads, d], opts)?;

        for kind in [Kind::Float, Kind::Half] {
            let (k, v) = (k.f_to_kind(kind)?, v.f_to_kind(kind)?);
            let want = reference(&q, &k, &v, &tables, &lens, bs)?;
            for portable in [false, true] {
                let got = with_kernel_build(portable, || {
                    paged_decode_attention(&q, &k, &v, &block_tables, &context_lens, bs as usize)
                })?;
                let diff = f64::try_from(got.f_sub(&want)?.f_abs()?.f_max()?)?;
                assert!(
                    diff < 1e-4,
                    "{kind:?} cache, portable {portable}: off by {diff}"
                );
            }
        }
        Ok(())
    }
}
