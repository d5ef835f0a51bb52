//! Continuous batching changes nothing about greedy outputs: requests of
//! mixed prompt lengths, joining mid-run, under a KV budget so small that
//! sequences get preempted and recomputed, with prefix caching on (the
//! default), produce exactly the tokens they produce alone with it off. Also:
//! a seeded sampled run repeats exactly.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use omni_engine::{
    EngineArgs, Error, Kind, KvCache, LLMEngine, Prompt, RequestOutput, Result, SamplingParams,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn smollm2() -> PathBuf {
    omni_engine::model_dir().join(omni_engine::SMOLLM2.file_name)
}

fn fail(msg: String) -> Error {
    Error::InvalidConfig {
        field: "test".into(),
        value: String::new(),
        reason: msg,
    }
}

fn prompts(fixture: &str) -> Result<Vec<(String, Vec<u32>)>> {
    let path = fixtures().join(fixture);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let f: Value = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
    Ok(f["cases"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let ids = c["prompt_token_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect();
            (c["name"].as_str().unwrap_or("?").to_owned(), ids)
        })
        .collect())
}

fn engine(
    model: &Path,
    max_num_seqs: usize,
    max_batched: usize,
    kv_bytes: u64,
    prefix_caching: bool,
) -> Result<LLMEngine> {
    LLMEngine::new(&EngineArgs {
        model: model.display().to_string(),
        device: Some("cpu".into()),
        dtype: Some("float32".into()),
        weight_precision: Some("native".into()),
        max_num_seqs,
        max_num_batched_tokens: max_batched,
        max_model_len: Some(256),
        block_size: 8,
        kv_cache_memory_bytes: Some(kv_bytes),
        enable_prefix_caching: prefix_caching,
        ..EngineArgs::default()
    })
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(n),
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

/// Feeds request `i` at step `join[i]`, runs to the end, returns finals.
fn run(
    engine: &mut LLMEngine,
    reqs: &[(String, Vec<u32>, SamplingParams, usize)],
) -> Result<HashMap<String, RequestOutput>> {
    let mut done = HashMap::new();
    let mut step = 0usize;
    while done.len() < reqs.len() {
        for (id, p, params, at) in reqs {
            if *at == step {
                engine.add_request(id.clone(), Prompt::TokenIds(p.clone()), params.clone())?;
            }
        }
        for out in engine.step()? {
            if out.finished {
                done.insert(out.request_id.clone(), out);
            }
        }
        step += 1;
        assert!(step < 100_000, "the engine never finished");
    }
    Ok(done)
}

fn batched_equals_alone(model: &Path, fixture: &str) -> Result<()> {
    let cases = prompts(fixture)?;
    let mut reqs: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, (name, p))| (name.clone(), p.clone(), greedy(8 + 4 * (i % 5)), 3 * i))
        .collect();
    // The longest prompt again, late, once whole and once with a new tail:
    // both find its leading blocks in the prefix cache.
    let long = cases.iter().map(|c| &c.1).max_by_key(|p| p.len());
    let long = long.cloned().unwrap_or_default();
    let mut tail = long.clone();
    tail.extend([28, 330, 17]);
    let late = 3 * reqs.len() + 1;
    reqs.push(("repeat".into(), long.clone(), greedy(8), late));
    reqs.push(("extend".into(), tail, greedy(8), late + 1));

    let mut alone_engine = engine(model, 1, 2048, 64 << 20, false)?;
    let per_block = KvCache::bytes_per_block(alone_engine.model().config(), 8, Kind::Float);
    // Room for the longest request alone (plus the reserved block and one
    // spare), far from enough for all of them at once.
    let longest = reqs
        .iter()
        .map(|r| r.1.len() + r.2.max_tokens.unwrap_or(0))
        .max()
        .unwrap_or(0);
    let kv_tight = (longest.div_ceil(8) as u64 + 2) * per_block;
    let mut alone = HashMap::new();
    for r in &reqs {
        let mut r = r.clone();
        r.3 = 0;
        alone.extend(run(&mut alone_engine, &[r])?);
    }
    // Everyone, joining over time, prefills chunked by a 16-token budget.
    let mut e = engine(model, 16, 16, 64 << 20, true)?;
    let batched = run(&mut e, &reqs)?;
    let full_blocks = (long.len() - 1) / 8 * 8;
    for id in ["repeat", "extend"] {
        assert_eq!(
            batched[id].metrics.num_cached_tokens, full_blocks,
            "{fixture} {id}: the prefix cache missed"
        );
    }
    // A KV cache far too small for everyone at once.
    let mut e = engine(model, 16, 256, kv_tight, true)?;
    let tight = run(&mut e, &reqs)?;
    assert!(
        tight.values().any(|o| o.metrics.num_preemptions > 0),
        "{fixture}: the tiny KV budget never forced a preemption"
    );
    for (id, a) in &alone {
        assert!(!a.token_ids.is_empty());
        assert_eq!(
            a.token_ids, batched[id].token_ids,
            "{fixture} {id}: batched differs"
        );
        assert_eq!(
            a.token_ids, tight[id].token_ids,
            "{fixture} {id}: preempted differs"
        );
        assert_eq!(a.text, tight[id].text, "{fixture} {id}: text differs");
    }
    Ok(())
}

#[test]
fn smollm2_batched_joining_and_preempted_match_one_at_a_time() -> Result<()> {
    batched_equals_alone(&smollm2(), "smollm2-135m-instruct-q4_1.json")
}

#[test]
fn tiny_qwen3_batched_joining_and_preempted_match_one_at_a_time() -> Result<()> {
    batched_equals_alone(&fixtures().join("tiny-qwen3"), "tiny-qwen3.json")
}

#[test]
fn seeded_sampling_repeats_exactly() -> Result<()> {
    let cases = prompts("smollm2-135m-instruct-q4_1.json")?;
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        top_k: 40,
        repetition_penalty: 1.1,
        seed: Some(7),
        max_tokens: Some(24),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let target = ("sampled".to_owned(), cases[0].1.clone(), params, 0);
    let mut e = engine(&smollm2(), 8, 256, 64 << 20, true)?;
    let first = run(&mut e, std::slice::from_ref(&target))?;
    let second = run(&mut e, std::slice::from_ref(&target))?;
    // Same request inside a busy batch, joining late.
    let mut busy: Vec<_> = cases
        .iter()
        .skip(1)
        .take(5)
        .map(|(n, p)| (n.clone(), p.clone(), greedy(16), 0))
        .collect();
    busy.push((target.0.clone(), target.1.clone(), target.2.clone(), 2));
    let batched = run(&mut e, &busy)?;
    let greedy_run = run(
        &mut e,
        &[(target.0.clone(), target.1.clone(), greedy(24), 0)],
    )?;
    assert_eq!(first["sampled"].token_ids.len(), 24);
    assert_eq!(first["sampled"].token_ids, second["sampled"].token_ids);
    assert_eq!(first["sampled"].token_ids, batched["sampled"].token_ids);
    assert_ne!(first["sampled"].token_ids, greedy_run["sampled"].token_ids);
    Ok(())
}
