//! Attention on the CPU, read in place from the paged KV cache by the kernel
//! in `csrc/paged_attention.cpp`: no gathered copy of the context, no
//! padding, no mask (why: see that file). Decode rows and the rows of short
//! prefills go through it in one call per layer; and the new K/V are
//! written into the cache by row copies instead of `index_copy_`.
use std::ffi::c_char;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::error::Result;
use crate::shim::from_shim;

extern "C" {
    fn omni_paged_attention(
        q: *const C_tensor,
        k_cache: *const C_tensor,
        v_cache: *const C_tensor,
        block_tables: *const C_tensor,
        row_tables: *const C_tensor,
        context_lens: *const C_tensor,
        block_size: i64,
        scale: f64,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
    fn omni_paged_kv_write(
        k_cache: *const C_tensor,
        v_cache: *const C_tensor,
        slots: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
}

/// Attention of each row of `q` (`[n, heads, head_dim]`) over the first
/// `context_lens[i]` positions of its sequence, read from the caches
/// (`[slots, kv_heads, head_dim]`) through `block_tables[row_tables[i]]`
/// (`[seqs, max_blocks]`, padded with block 0). A decode row attends to
/// its whole sequence; a prefill's rows share one table, each attending up
/// to its own position (causal). Returns `[n, heads, head_dim]`. fp32
/// queries with contiguous heads are read in place, at any row and head
/// stride (a view into the fused q/k/v projection).
pub(crate) fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_tables: &Tensor,
    row_tables: &Tensor,
    context_lens: &Tensor,
    block_size: usize,
) -> Result<Tensor> {
    let head_dim = q.size().last().copied().unwrap_or(1).max(1);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut err = std::ptr::null_mut();
    // SAFETY: every tensor outlives the call; the shim checks shapes and
    // every index before reading.
    let ptr = unsafe {
        omni_paged_attention(
            q.as_ptr(),
            k_cache.as_ptr(),
            v_cache.as_ptr(),
            block_tables.as_ptr(),
            row_tables.as_ptr(),
            context_lens.as_ptr(),
            block_size as i64,
            scale,
            &mut err,
        )
    };
    // SAFETY: straight from the shim.
    unsafe { from_shim(ptr, err, "paged attention") }
}

/// Writes `k` and `v` (`[t, kv_heads, head_dim]`, rows contiguous) into
/// the caches at `slots` (`[t]`), in place; CPU tensors. In the caches'
/// dtype, or fp32 into an fp16 or bf16 cache (rounded as `to_kind` rounds).
pub(crate) fn paged_kv_write(
    k_cache: &Tensor,
    v_cache: &Tensor,
    slots: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<()> {
    let mut err = std::ptr::null_mut();
    // SAFETY: every tensor outlives the call; the shim checks shapes, dtypes
    // and every slot before writing.
    let ptr = unsafe {
        omni_paged_kv_write(
            k_cache.as_ptr(),
            v_cache.as_ptr(),
            slots.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            &mut err,
        )
    };
    // SAFETY: straight from the shim; the handle (the K cache) is dropped.
    unsafe { from_shim(ptr, err, "paged K/V write") }.map(drop)
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

    /// The kernel (its AVX2 build and its portable one, fp32, fp16 and bf16
    /// caches) against ATen: queries read in place from a wider tensor, GQA,
    /// context lengths off the 8-lane loops and across blocks in any order,
    /// and scores large enough that softmax depends on subtracting the max.
    #[test]
    fn matches_attention_over_the_gathered_context() -> Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(11);
        for d in [40i64, 36, 72, 96] {
            check_gathered_context(d)?;
        }
        Ok(())
    }

    /// Sequences of lengths `lens` in a paged cache of fp32 K/V (blocks out
    /// of order, no block shared), with queries read in place from a wider
    /// tensor, GQA (6 heads on 2 kv heads) of width `d`.
    struct Case {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        tables: Vec<Vec<i64>>,
        block_tables: Tensor,
        rows: Tensor,
        lens: Vec<i64>,
        bs: i64,
    }

    impl Case {
        fn new(d: i64, lens: &[i64]) -> Result<Self> {
            let (heads, kv_heads, bs) = (6i64, 2i64, 16i64);
            let num_blocks: i64 = lens.iter().map(|l| (l + bs - 1) / bs).sum::<i64>() + 2;
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
            let rows = Tensor::arange(lens.len() as i64, (Kind::Int64, Device::Cpu));
            let opts = (Kind::Float, Device::Cpu);
            // The queries are a view into a wider row, as in the fused q/k/v
            // projection's output: the kernel reads them in place.
            // Padded heads too, so neither stride is what a contiguous q has.
            let q = Tensor::f_randn([lens.len() as i64, heads + 2 * kv_heads, d + 8], opts)?
                .f_mul_scalar(4.0)?
                .f_narrow(1, 0, heads)?
                .f_narrow(2, 0, d)?;
            let k = Tensor::f_randn([num_blocks * bs, kv_heads, d], opts)?.f_mul_scalar(4.0)?;
            let v = Tensor::f_randn([num_blocks * bs, kv_heads, d], opts)?;
            Ok(Self {
                q,
                k,
                v,
                tables,
                block_tables,
                rows,
                lens: lens.to_vec(),
                bs,
            })
        }

        /// The kernel's answer over the caches `k` and `v`.
        fn attend(&self, k: &Tensor, v: &Tensor) -> Result<Tensor> {
            paged_attention(
                &self.q,
                k,
                v,
                &self.block_tables,
                &self.rows,
                &Tensor::from_slice(&self.lens),
                self.bs as usize,
            )
        }
    }

    /// [`matches_attention_over_the_gathered_context`] at head width `d`:
    /// a multiple of 8 runs the AVX2 build that reduces 8 keys at once (72
    /// and 96 also its 64-lane weighted sum), another the one that reduces
    /// per key (fp32; 16-bit caches take the portable loops there).
    fn check_gathered_context(d: i64) -> Result<()> {
        let _g = tch::no_grad_guard();
        let c = Case::new(d, &[1, 7, 16, 37, 150])?;
        for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
            let (k, v) = (c.k.f_to_kind(kind)?, c.v.f_to_kind(kind)?);
            let want = reference(&c.q, &k, &v, &c.tables, &c.lens, c.bs)?;
            for portable in [false, true] {
                let got = with_kernel_build(portable, || c.attend(&k, &v))?;
                let diff = f64::try_from(got.f_sub(&want)?.f_abs()?.f_max()?)?;
                assert!(
                    diff < 1e-4,
                    "{kind:?} cache, portable {portable}: off by {diff}"
                );
            }
        }
        Ok(())
    }

    /// Fewer rows than threads cut each row's heads among the threads (one
    /// decoding sequence would otherwise run on one): every head's
    /// arithmetic is the same as on one thread, bit for bit, whichever heads
    /// a part holds (parts of 2 heads cross the GQA groups of 3), for both
    /// builds, fp32 and fp16 caches, and the wide build's 64-, 32- and
    /// 8-lane loops (d 64 and 40) as well as the per-key one (d 36).
    #[test]
    fn cutting_heads_among_threads_changes_no_bit() -> Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(13);
        let _restore = crate::RestoreThreads::new();
        for (d, lens) in [
            (64i64, vec![150i64]),
            (40, vec![70]),
            (36, vec![9, 40, 3]),
            (64, vec![1, 33]),
        ] {
            let c = Case::new(d, &lens)?;
            for kind in [Kind::Float, Kind::Half] {
                let (k, v) = (c.k.f_to_kind(kind)?, c.v.f_to_kind(kind)?);
                let want = reference(&c.q, &k, &v, &c.tables, &c.lens, c.bs)?;
                // Every answer stays alive until the end: a freed output
                // could come back as the next call's, already holding the
                // right values where a part was never written.
                let mut answers = Vec::new();
                for portable in [false, true] {
                    tch::set_num_threads(1);
                    let one = with_kernel_build(portable, || c.attend(&k, &v))?;
                    let diff = f64::try_from(one.f_sub(&want)?.f_abs()?.f_max()?)?;
                    assert!(diff < 1e-4, "d {d} {kind:?}: off by {diff}");
                    for n in [2, 3, 4, 5] {
                        tch::set_num_threads(n);
                        let got = with_kernel_build(portable, || c.attend(&k, &v))?;
                        assert!(
                            got.equal(&one),
                            "d {d}, rows {lens:?}, {kind:?}, portable {portable}, \
                             {n} threads: differs from one thread"
                        );
                        answers.push(got);
                    }
                    answers.push(one);
                }
            }
        }
        Ok(())
    }

    /// A prefill's rows share their sequence's table, each attending up to
    /// its own position; rows of two sequences interleave with a decode row.
    #[test]
    fn prefill_rows_attend_causally_through_a_shared_table() -> Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(12);
        let (heads, kv_heads, d, bs) = (4i64, 2i64, 24i64, 8i64);
        let opts = (Kind::Float, Device::Cpu);
        // Sequence 0: blocks 5, 2, 7 (20 positions); sequence 1: block 3.
        let seq_tables = [vec![5i64, 2, 7], vec![3, 0, 0]];
        let block_tables = Tensor::from_slice(&seq_tables.concat()).f_view([2, 3])?;
        // Rows: a decode of sequence 1 (6 positions), then a prefill of
        // sequence 0 from position 14 to 19.
        let row_seq: Vec<i64> = std::iter::once(1).chain([0; 6]).collect();
        let lens: Vec<i64> = std::iter::once(6).chain(15..=20).collect();
        let q = Tensor::f_randn([row_seq.len() as i64, heads, d], opts)?.f_mul_scalar(3.0)?;
        let k = Tensor::f_randn([8 * bs, kv_heads, d], opts)?.f_mul_scalar(3.0)?;
        let v = Tensor::f_randn([8 * bs, kv_heads, d], opts)?;
        let per_row: Vec<Vec<i64>> = row_seq
            .iter()
            .map(|&s| seq_tables[s as usize].clone())
            .collect();
        let want = reference(&q, &k, &v, &per_row, &lens, bs)?;
        for portable in [false, true] {
            let got = with_kernel_build(portable, || {
                paged_attention(
                    &q,
                    &k,
                    &v,
                    &block_tables,
                    &Tensor::from_slice(&row_seq),
                    &Tensor::from_slice(&lens),
                    bs as usize,
                )
            })?;
            let diff = f64::try_from(got.f_sub(&want)?.f_abs()?.f_max()?)?;
            assert!(diff < 1e-4, "portable {portable}: off by {diff}");
        }
        // A row naming a table that is not there is an error, not a read.
        let e = paged_attention(
            &q,
            &k,
            &v,
            &block_tables,
            &Tensor::from_slice(&[1i64, 0, 0, 0, 0, 0, 2]),
            &Tensor::from_slice(&lens),
            bs as usize,
        )
        .map(drop)
        .unwrap_err()
        .to_string();
        assert!(e.contains("row 6 names table 2 of 2"), "{e}");
        Ok(())
    }

    /// The row copies write what `index_copy_` writes, from a strided view
    /// (K and V inside one fused projection), and nowhere else; a slot past
    /// the cache is an error before anything is written.
    #[test]
    fn kv_write_matches_index_copy() -> Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(13);
        let (kvh, d, slots) = (3i64, 16i64, 40i64);
        for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
            let opts = (kind, Device::Cpu);
            let fused = Tensor::f_randn([5, 3 * kvh * d], opts)?;
            let k = fused.f_narrow(1, kvh * d, kvh * d)?.f_view([5, kvh, d])?;
            let v = fused
                .f_narrow(1, 2 * kvh * d, kvh * d)?
                .f_view([5, kvh, d])?;
            let at = Tensor::from_slice(&[7i64, 0, 39, 12, 13]);
            let (kc, vc) = (
                Tensor::f_randn([slots, kvh, d], opts)?,
                Tensor::f_randn([slots, kvh, d], opts)?,
            );
            let (mut kw, mut vw) = (kc.copy(), vc.copy());
            let _ = kw.f_index_copy_(0, &at, &k)?;
            let _ = vw.f_index_copy_(0, &at, &v)?;
            paged_kv_write(&kc, &vc, &at, &k, &v)?;
            assert!(kc.equal(&kw) && vc.equal(&vw), "{kind:?}");

            let before = kc.copy();
            let bad = Tensor::from_slice(&[1i64, 2, 3, 40, 4]);
            let e = paged_kv_write(&kc, &vc, &bad, &k, &v)
                .unwrap_err()
                .to_string();
            assert!(e.contains("slot 40 of row 3"), "{e}");
            assert!(kc.equal(&before));
        }
        Ok(())
    }

    /// fp32 K/V into a 16-bit cache (`kv_cache_dtype`): the row copies
    /// round as `to_kind` does, bit for bit, in both builds: ties, values
    /// past fp16's range, subnormals, infinities and NaN, rows wider than
    /// and off the 8-lane loop.
    #[test]
    fn kv_write_rounds_fp32_into_16_bit_caches_as_to_kind_does() -> Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(14);
        for (kvh, d) in [(3i64, 16i64), (1, 13)] {
            let width = kvh * d;
            let opts = (Kind::Float, Device::Cpu);
            let fused = Tensor::f_randn([6, 3 * width], opts)?.f_mul_scalar(100.0)?;
            let special = [
                // Ties: fp16 (1 + 2^-11 down to 1, 1 + 3 * 2^-11 up), bf16
                // (1 + 2^-8 down, 1 + 3 * 2^-8 up).
                1.0 + 1.0 / 2048.0,
                1.0 + 3.0 / 2048.0,
                1.0 + 1.0 / 256.0,
                1.0 + 3.0 / 256.0,
                70000.0, // past fp16's largest, 65504
                -1e-6,   // an fp16 subnormal
                1e-41,   // an fp32 subnormal
                f32::INFINITY,
                f32::NEG_INFINITY,
                -0.0,
                // NaNs whose bits the rounding alone would turn into 0 or
                // -0 (the NaN case must catch them), and the usual one.
                f32::from_bits(0xffff_ffff),
                f32::from_bits(0x7fff_ffff),
                f32::NAN,
                // bf16's top: its largest exactly, a value that rounds
                // down to it, a tie that rounds up to infinity, and fp32's
                // largest (infinity in both 16-bit types).
                f32::from_bits(0x7f7f_0000),
                f32::from_bits(0x7f7f_7fff),
                f32::from_bits(0x7f7f_8000),
                f32::MAX,
                -f32::MAX,
            ];
            // The values, a row's width at a time, into rows 1.. of both
            // K's and V's part of the fused rows.
            for (r, chunk) in special.chunks(width as usize).enumerate() {
                let row = Tensor::from_slice(chunk).f_unsqueeze(0)?;
                for start in [width, 2 * width] {
                    fused
                        .f_narrow(1, start, chunk.len() as i64)?
                        .f_narrow(0, 1 + r as i64, 1)?
                        .f_copy_(&row)?;
                }
            }
            let k = fused.f_narrow(1, width, width)?.f_view([6, kvh, d])?;
            let v = fused.f_narrow(1, 2 * width, width)?.f_view([6, kvh, d])?;
            let at = Tensor::from_slice(&[7i64, 0, 39, 12, 13, 2]);
            for kind in [Kind::Half, Kind::BFloat16] {
                for portable in [false, true] {
                    let kc = Tensor::f_zeros([40, kvh, d], (kind, Device::Cpu))?;
                    let vc = kc.copy();
                    let (mut kw, mut vw) = (kc.copy(), vc.copy());
                    let _ = kw.f_index_copy_(0, &at, &k.f_to_kind(kind)?)?;
                    let _ = vw.f_index_copy_(0, &at, &v.f_to_kind(kind)?)?;
                    with_kernel_build(portable, || paged_kv_write(&kc, &vc, &at, &k, &v))?;
                    // Bits, so that -0 differs from 0; NaN as NaN (ATen's
                    // vectorized bf16 conversion writes 0xffff, its scalar one
                    // and ours 0x7fc0).
                    let same = |got: &Tensor, want: &Tensor| -> Result<bool> {
                        let nan = want.f_isnan()?;
                        let bits = |t: &Tensor| -> Result<Tensor> {
                            Ok(t.f_view_dtype(Kind::Int16)?.f_masked_fill(&nan, 0)?)
                        };
                        Ok(got.f_isnan()?.equal(&nan) && bits(got)?.equal(&bits(want)?))
                    };
                    assert!(
                        same(&kc, &kw)? && same(&vc, &vw)?,
                        "{kind:?}, width {width}, portable {portable}"
                    );
                }
            }
        }
        // Any other pair of dtypes is an error that names both.
        let cache = Tensor::f_zeros([8, 1, 8], (Kind::Half, Device::Cpu))?;
        let new = Tensor::f_zeros([1, 1, 8], (Kind::BFloat16, Device::Cpu))?;
        let e = paged_kv_write(
            &cache,
            &cache.copy(),
            &Tensor::from_slice(&[1i64]),
            &new,
            &new,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("BFloat16") && e.contains("Half"), "{e}");
        Ok(())
    }
}
