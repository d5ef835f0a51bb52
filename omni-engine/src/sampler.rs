//! Turns each sequence's logits into its next token.
//!
//! Order of operations follows vLLM's v1 sampler: log-probabilities come
//! from the raw logits; then repetition / frequency / presence penalties;
//! greedy requests take the argmax; the others are divided by the
//! temperature, truncated by `min_p`, then `top_k` and `top_p`, and drawn from
//! with the request's own ChaCha20 generator. Because every request owns its
//! generator, a seeded request draws the same numbers whatever else shares
//! the batch.
//!
//! The batch's logits are copied to the host once; the per-row work runs in
//! Rust (vocabularies are ~50k-150k entries, a few hundred microseconds per
//! row). A batch that is all greedy without penalties or log-probabilities
//! takes one argmax of every row instead (on the device; the shim's kernel
//! for fp32 on the CPU).
use std::ffi::c_char;

use rand::Rng;
use rand_chacha::ChaCha20Rng;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::error::Result;
use crate::request::TokenLogprobs;
use crate::sampling_params::SamplingParams;
use crate::shim::from_shim;

/// What the sampler needs to know about one row.
pub(crate) struct SampleInput<'a> {
    pub params: &'a SamplingParams,
    pub prompt: &'a [u32],
    pub output: &'a [u32],
    pub rng: &'a mut ChaCha20Rng,
}

/// One row's result.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sampled {
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
}

extern "C" {
    fn omni_argmax_rows(x: *const C_tensor, err: *mut *mut c_char) -> *mut C_tensor;
}

/// Each row's argmax (`[rows]`, int64) of `logits` (`[rows, vocab]`), as
/// `torch.argmax(-1)`: the first maximum, or the first NaN. fp32 rows on the
/// CPU take the shim's kernel (`csrc/fused.cpp`: ATen's ran each row on one
/// thread, 2.8 ms of a 64-sequence decode step), the rest ATen's.
fn argmax_rows(logits: &Tensor) -> Result<Tensor> {
    let cpu_rows = logits.device() == Device::Cpu
        && logits.kind() == Kind::Float
        && logits.dim() == 2
        && logits.stride()[1] == 1
        && logits.size()[1] > 0;
    if !cpu_rows {
        return Ok(logits.f_argmax(-1, false)?);
    }
    let mut err = std::ptr::null_mut();
    // SAFETY: `logits` outlives the call, which only reads it.
    let ptr = unsafe { omni_argmax_rows(logits.as_ptr(), &mut err) };
    // SAFETY: straight from the shim.
    unsafe { from_shim(ptr, err, "argmax_rows") }
}

fn needs_host(p: &SamplingParams) -> bool {
    !p.is_greedy()
        || p.logprobs.is_some()
        || p.repetition_penalty != 1.0
        || p.presence_penalty != 0.0
        || p.frequency_penalty != 0.0
        || !p.logit_bias.is_empty()
}

/// Samples one token per input: input `k` reads row `rows[k]` of `logits`
/// (`[n, vocab]`, any device/dtype). The rows are not gathered into input
/// order first: at 64 sequences that copy of SmolLM2's logits (12 MB; a
/// 152k vocabulary makes it 39 MB) took up to a sixth of a decode step.
pub(crate) fn sample(
    logits: &Tensor,
    rows: &[usize],
    inputs: &mut [SampleInput<'_>],
) -> Result<Vec<Sampled>> {
    if inputs.is_empty() {
        return Ok(Vec::new());
    }
    debug_assert_eq!(rows.len(), inputs.len(), "one logits row per input");
    if !inputs.iter().any(|i| needs_host(i.params)) {
        let ids = argmax_rows(logits)?.f_to_kind(Kind::Int64)?;
        let ids = Vec::<i64>::try_from(ids.f_to_device(Device::Cpu)?)?;
        return Ok(rows
            .iter()
            .map(|&r| Sampled {
                token: ids[r] as u32,
                logprobs: None,
            })
            .collect());
    }
    let vocab = logits.size()[1] as usize;
    let host = logits
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?;
    let flat = Vec::<f32>::try_from(host.f_view([-1])?)?;
    let mut out = Vec::with_capacity(inputs.len());
    for (&r, input) in rows.iter().zip(inputs.iter_mut()) {
        out.push(sample_row(&flat[r * vocab..(r + 1) * vocab], input));
    }
    Ok(out)
}

fn argmax(xs: &[f32]) -> usize {
    // First maximum, like torch.argmax; NaN never wins.
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in xs.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best
}

fn log_softmax(xs: &[f32]) -> Vec<f32> {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = xs.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    xs.iter().map(|&x| x - lse).collect()
}

fn top_logprobs(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..logprobs.len()).collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k - 1, |&a, &b| logprobs[b].total_cmp(&logprobs[a]));
    idx.truncate(k);
    idx.sort_by(|&a, &b| logprobs[b].total_cmp(&logprobs[a]).then(a.cmp(&b)));
    idx.into_iter()
        .map(|i| (i as u32, finite_logprob(logprobs[i])))
        .collect()
}

/// vLLM's server shows an impossible token's log-probability as -9999, and
/// JSON has no -inf: the engine reports it so from the start.
fn finite_logprob(lp: f32) -> f32 {
    lp.max(-9999.0)
}

fn apply_penalties(logits: &mut [f32], p: &SamplingParams, prompt: &[u32], output: &[u32]) {
    let vocab = logits.len();
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; vocab];
        for &t in prompt.iter().chain(output) {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        for (l, s) in logits.iter_mut().zip(seen) {
            if s {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
    }
}

fn sample_row(raw: &[f32], input: &mut SampleInput<'_>) -> Sampled {
    let p = input.params;
    let logprobs_all = p.logprobs.map(|_| log_softmax(raw));
    let mut logits = raw.to_vec();
    for (&t, &b) in &p.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += b;
        }
    }
    apply_penalties(&mut logits, p, input.prompt, input.output);

    let token = if p.is_greedy() {
        argmax(&logits)
    } else {
        sample_random(&mut logits, p, input.rng)
    };
    let logprobs = logprobs_all.map(|lp| TokenLogprobs {
        token_id: token as u32,
        logprob: finite_logprob(lp[token]),
        top: top_logprobs(&lp, p.logprobs.unwrap_or(0)),
        decoded: Vec::new(),
    });
    Sampled {
        token: token as u32,
        logprobs,
    }
}

/// Log-probabilities of the tokens that follow each row of `logits`
/// (`[rows, vocab]`): row `i` is the distribution `next[i]` was read from;
/// with the `k` most likely tokens of each row.
pub(crate) fn next_token_logprobs(
    logits: &Tensor,
    next: &[u32],
    k: usize,
) -> Result<Vec<TokenLogprobs>> {
    // On the logits' device; only k + 1 values per row come to the host.
    let lp = logits.f_log_softmax(-1, Kind::Float)?;
    let ids: Vec<i64> = next.iter().map(|&t| i64::from(t)).collect();
    let ids = Tensor::from_slice(&ids)
        .f_to_device(lp.device())?
        .f_view([-1, 1])?;
    let host = |t: Tensor| -> Result<Tensor> { Ok(t.f_to_device(Device::Cpu)?.f_contiguous()?) };
    let chosen = Vec::<f32>::try_from(host(lp.f_gather(1, &ids, false)?.f_view([-1])?)?)?;
    let k = k.min(lp.size()[1] as usize);
    let (values, indices) = if k > 0 {
        let (v, i) = lp.f_topk(k as i64, -1, true, true)?;
        (
            Vec::<f32>::try_from(host(v.f_view([-1])?)?)?,
            Vec::<i64>::try_from(host(i.f_view([-1])?)?)?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(next
        .iter()
        .enumerate()
        .map(|(r, &t)| TokenLogprobs {
            token_id: t,
            logprob: finite_logprob(chosen[r]),
            top: (r * k..(r + 1) * k)
                .map(|j| (indices[j] as u32, finite_logprob(values[j])))
                .collect(),
            decoded: Vec::new(),
        })
        .collect())
}

/// Temperature, min-p, top-k, top-p, then one draw.
fn sample_random(logits: &mut [f32], p: &SamplingParams, rng: &mut ChaCha20Rng) -> usize {
    let inv_t = 1.0 / p.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Unnormalised probabilities, relative to the best token (which has 1).
    let mut probs: Vec<f32> = logits
        .iter()
        .map(|&l| {
            let x = ((l - max) * inv_t).exp();
            if x.is_finite() {
                x
            } else {
                0.0
            }
        })
        .collect();
    if p.min_p > 0.0 {
        // Relative to the most likely token, whose weight is exactly 1 here.
        for x in probs.iter_mut() {
            if *x < p.min_p {
                *x = 0.0;
            }
        }
    }
    // Candidates sorted by weight, best first; only as many as top-k / top-p
    // can keep (partial selection keeps this cheap for large vocabularies).
    let mut cand: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
    if cand.is_empty() {
        return argmax(logits);
    }
    let by_weight = |a: &usize, b: &usize| probs[*b].total_cmp(&probs[*a]).then(a.cmp(b));
    if let Some(k) = p.top_k_enabled() {
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, by_weight);
            cand.truncate(k);
        }
    }
    if p.top_p < 1.0 {
        let total: f64 = cand.iter().map(|&i| probs[i] as f64).sum();
        let target = p.top_p as f64 * total;
        // Grow a sorted head until it holds top_p of the mass.
        let mut head = 64.min(cand.len());
        loop {
            if head < cand.len() {
                cand.select_nth_unstable_by(head - 1, by_weight);
            }
            cand[..head].sort_by(by_weight);
            let mut acc = 0.0f64;
            let mut keep = None;
            for (j, &i) in cand[..head].iter().enumerate() {
                acc += probs[i] as f64;
                if acc >= target {
                    keep = Some(j + 1);
                    break;
                }
            }
            if let Some(keep) = keep {
                cand.truncate(keep);
                break;
            }
            if head == cand.len() {
                break;
            }
            head = (head * 8).min(cand.len());
        }
    }
    cand.sort_by(by_weight);
    let total: f64 = cand.iter().map(|&i| probs[i] as f64).sum();
    let u: f64 = rng.random::<f64>() * total;
    let mut acc = 0.0f64;
    for &i in &cand {
        acc += probs[i] as f64;
        if u < acc {
            return i;
        }
    }
    cand[cand.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The shim's argmax against ATen's on rows that try it, at widths
    /// below the 8- and 32-lane loops, past them with a fringe, and SmolLM2's
    /// vocabulary: ties (the first wins), a NaN in the fringe only, in lanes
    /// 16-31 only, and early (the first NaN wins, as in torch), all -inf,
    /// signed zeros, the maximum last; strided rows, and enough rows to run
    /// on several threads; the AVX2 build and the portable one.
    #[test]
    fn argmax_rows_equals_torch_argmax() -> Result<()> {
        for portable in [false, true] {
            crate::model::with_kernel_build(portable, || -> Result<()> {
                tch::manual_seed(11);
                for (rows, n) in [(1i64, 1i64), (8, 7), (8, 20), (8, 45), (64, 49152 + 5)] {
                    let wide = Tensor::f_randn([rows, n + 3], (Kind::Float, Device::Cpu))?;
                    let x = wide.f_narrow(1, 2, n)?;
                    let set = |row: i64, at: i64, v: f64| -> Result<()> {
                        let _ = x.f_get(row)?.f_narrow(0, at, 1)?.f_fill_(v)?;
                        Ok(())
                    };
                    let mut expect = Vec::new();
                    if rows >= 8 {
                        let tie = n / 3;
                        set(0, tie, 1e9)?;
                        set(0, tie + 1, 1e9)?;
                        set(1, n - 2, f64::NAN)?;
                        let lane = 20.min(n - 1);
                        set(2, lane, f64::NAN)?;
                        set(2, n - 1, f64::NAN)?;
                        let _ = x.f_get(3)?.f_fill_(f64::NEG_INFINITY)?;
                        let _ = x.f_get(4)?.f_fill_(-1.0)?;
                        let zero = 3.min(n - 3);
                        set(4, zero, -0.0)?;
                        set(4, zero + 2, 0.0)?;
                        set(5, n - 1, 1e9)?;
                        set(6, 1, f64::NAN)?;
                        set(6, n - 3, f64::NAN)?;
                        expect = vec![tie, n - 2, lane, 0, zero, n - 1, 1];
                    }
                    let got = Vec::<i64>::try_from(argmax_rows(&x)?)?;
                    let want = Vec::<i64>::try_from(x.f_argmax(-1, false)?)?;
                    assert_eq!(got, want, "{rows} rows of {n}, portable: {portable}");
                    assert_eq!(&got[..expect.len()], expect, "{rows} rows of {n}");
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    fn draw(row: &[f32], p: &SamplingParams, seed: u64, n: usize) -> Vec<u32> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        for _ in 0..n {
            let mut input = SampleInput {
                params: p,
                prompt: &[],
                output: &[],
                rng: &mut rng,
            };
            out.push(sample_row(row, &mut input).token);
        }
        out
    }

    /// Pearson's chi-square of `counts` against `probs` (expected counts
    /// `n * p`).
    fn chi_square(counts: &[usize], probs: &[f64], n: usize) -> f64 {
        counts
            .iter()
            .zip(probs)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    #[test]
    fn seeded_draws_follow_the_softmax_and_top_k_renormalises() {
        // Six tokens; 4000 draws. With 5 degrees of freedom the chi-square
        // exceeds 30 with probability ~1e-5: a sampler off by a few percent
        // on any token (a wrong temperature, an off-by-one in the cumulative
        // sum) lands far above it; the seeds are fixed, so this cannot flake.
        let row = [2.0f32, 1.0, 0.5, 0.0, -1.0, 1.5];
        let n = 4000;
        for (temperature, top_k) in [(1.0, -1), (0.7, -1), (1.3, 3)] {
            let p = params(|p| {
                p.temperature = temperature;
                p.top_k = top_k;
            });
            let mut scaled: Vec<f64> = row
                .iter()
                .map(|&l| f64::from(l) / f64::from(temperature))
                .collect();
            if top_k > 0 {
                let mut sorted = scaled.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let kth = sorted[top_k as usize - 1];
                for v in &mut scaled {
                    if *v < kth {
                        *v = f64::NEG_INFINITY;
                    }
                }
            }
            let z: f64 = scaled.iter().map(|v| v.exp()).sum();
            let probs: Vec<f64> = scaled.iter().map(|v| v.exp() / z).collect();
            let mut counts = vec![0usize; row.len()];
            for t in draw(&row, &p, 2024, n) {
                counts[t as usize] += 1;
            }
            // Tokens outside top-k must never be drawn; the rest follow the
            // renormalised softmax.
            let (kept_counts, kept_probs): (Vec<usize>, Vec<f64>) = counts
                .iter()
                .zip(&probs)
                .filter_map(|(&c, &p)| {
                    if p == 0.0 {
                        assert_eq!(c, 0, "T={temperature} k={top_k}: a masked token was drawn");
                        None
                    } else {
                        Some((c, p))
                    }
                })
                .unzip();
            let x2 = chi_square(&kept_counts, &kept_probs, n);
            assert!(
                x2 < 30.0,
                "T={temperature} k={top_k}: chi-square {x2:.1} of {counts:?} against {probs:?}"
            );
        }
    }

    #[test]
    fn same_seed_same_tokens_and_truncation_holds() -> Result<()> {
        // Distinct values, so the best token is unique.
        let row: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 1009) as f32 / 100.0)
            .collect();
        let p = params(|p| p.temperature = 1.5);
        assert_eq!(draw(&row, &p, 7, 50), draw(&row, &p, 7, 50));
        assert_ne!(draw(&row, &p, 7, 50), draw(&row, &p, 8, 50));

        let top1 = argmax(&row) as u32;
        let p = params(|p| p.top_k = 1);
        assert!(draw(&row, &p, 1, 20).iter().all(|&t| t == top1));
        let p = params(|p| p.top_p = 1e-6);
        assert!(draw(&row, &p, 1, 20).iter().all(|&t| t == top1));
        let p = params(|p| p.min_p = 1.0);
        assert!(draw(&row, &p, 1, 20).iter().all(|&t| t == top1));

        // top_k = 3 only ever yields the three best.
        let mut best: Vec<usize> = (0..row.len()).collect();
        best.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let top3: Vec<u32> = best[..3].iter().map(|&i| i as u32).collect();
        let p = params(|p| p.top_k = 3);
        assert!(draw(&row, &p, 3, 200).iter().all(|t| top3.contains(t)));
        Ok(())
    }

    #[test]
    fn penalties_and_logprobs() -> Result<()> {
        let row = vec![2.0f32, 1.9, -1.0, 0.5];
        let p = params(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 2.0;
            p.logprobs = Some(2);
        });
        let mut rng = ChaCha20Rng::seed_from_u64(0);
        let mut input = SampleInput {
            params: &p,
            prompt: &[0],
            output: &[],
            rng: &mut rng,
        };
        let s = sample_row(&row, &mut input);
        // token 0 is penalised to 1.0, so 1 wins; logprobs stay raw.
        assert_eq!(s.token, 1);
        let lp = s
            .logprobs
            .ok_or(crate::Error::Tokenizer("no logprobs".into()))?;
        assert_eq!(lp.top.len(), 2);
        assert_eq!(lp.top[0].0, 0);
        assert!((lp.top.iter().map(|t| t.1.exp()).sum::<f32>()) < 1.0);

        let p = params(|p| {
            p.temperature = 0.0;
            p.presence_penalty = 0.2;
            p.frequency_penalty = 0.1;
        });
        let mut input = SampleInput {
            params: &p,
            prompt: &[],
            output: &[0, 0],
            rng: &mut rng,
        };
        assert_eq!(sample_row(&row, &mut input).token, 1);
        Ok(())
    }

    #[test]
    fn each_input_reads_its_own_logits_row_on_both_paths() -> Result<()> {
        // Row r's best token is (r + 1) % 3.
        let logits =
            Tensor::from_slice(&[0.1f32, 0.9, 0.3, 0.2, 0.1, 0.7, 0.8, 0.2, 0.1]).f_view([3, 3])?;
        let greedy = SamplingParams::greedy();
        // Log-probabilities send the rows to the host path.
        let host = SamplingParams {
            logprobs: Some(1),
            ..SamplingParams::greedy()
        };
        for params in [&greedy, &host] {
            let mut rngs: Vec<ChaCha20Rng> = (0..3).map(ChaCha20Rng::seed_from_u64).collect();
            let mut inputs: Vec<SampleInput<'_>> = rngs
                .iter_mut()
                .map(|rng| SampleInput {
                    params,
                    prompt: &[],
                    output: &[],
                    rng,
                })
                .collect();
            // A 3-cycle, so reading rows by the inverse mapping fails too.
            for rows in [[0usize, 1, 2], [2, 0, 1]] {
                let got: Vec<u32> = sample(&logits, &rows, &mut inputs)?
                    .iter()
                    .map(|s| s.token)
                    .collect();
                let want: Vec<u32> = rows.iter().map(|&r| ((r + 1) % 3) as u32).collect();
                assert_eq!(got, want, "rows {rows:?}, logprobs {:?}", params.logprobs);
            }
        }
        Ok(())
    }
}
