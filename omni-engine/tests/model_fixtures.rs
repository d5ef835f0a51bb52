//! The engine against Hugging Face transformers' outputs (fixtures made by
//! `tests/fixtures/make_fixtures.py`): top-5 logits at the last prompt
//! position within a stated tolerance, and 32 greedy tokens exactly, for the
//! SmolLM2 GGUF and tiny random Llama / Qwen2 / Qwen3 checkpoints.
//!
//! Tolerances (fp32 on CPU vs transformers fp32): 1e-3 absolute on SmolLM2
//! (30 layers of dequantized weights, different matmul blocking), 1e-4 on
//! the tiny models.
use std::path::{Path, PathBuf};

use omni_engine::{EngineArgs, Error, LLMEngine, Prompt, Result, SamplingParams};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fail(msg: String) -> Error {
    Error::InvalidConfig {
        field: "test".into(),
        value: String::new(),
        reason: msg,
    }
}

fn load_json(name: &str) -> Result<Value> {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| fail(format!("{}: {e}", path.display())))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

pub fn engine_for(model: &Path, weight_precision: &str) -> Result<LLMEngine> {
    LLMEngine::new(&engine_args(model, weight_precision))
}

fn engine_args(model: &Path, weight_precision: &str) -> EngineArgs {
    EngineArgs {
        model: model.display().to_string(),
        device: Some("cpu".into()),
        dtype: Some("float32".into()),
        weight_precision: Some(weight_precision.into()),
        max_model_len: Some(512),
        kv_cache_memory_bytes: Some(64 << 20),
        ..EngineArgs::default()
    }
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(n),
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

/// Checks every case of one fixture file; all cases run as one batch.
fn check(fixture: &str, model: &Path, tol: f64) -> Result<()> {
    check_with(fixture, model, "native", tol)
}

fn check_with(fixture: &str, model: &Path, precision: &str, tol: f64) -> Result<()> {
    check_engine(fixture, engine_for(model, precision)?, tol)
}

fn check_engine(fixture: &str, engine: LLMEngine, tol: f64) -> Result<()> {
    check_engine_batched(fixture, engine, tol, true)
}

/// [`check_engine`], the cases decoding as one batch or (`batched` false)
/// one after another, each alone: a lone decoding token's step runs the
/// fused decoder layer where the weights are on blocks.
fn check_engine_batched(
    fixture: &str,
    mut engine: LLMEngine,
    tol: f64,
    batched: bool,
) -> Result<()> {
    let f = load_json(fixture)?;
    let cases = f["cases"].as_array().cloned().unwrap_or_default();
    assert!(!cases.is_empty(), "{fixture}: no cases");
    let mut worst = 0f64;
    let mut finished = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap_or("?");
        let prompt = ids(&case["prompt_token_ids"]);
        let logits = engine.model().last_logits(&prompt)?;
        for pair in case["top5"].as_array().into_iter().flatten() {
            let id = pair[0].as_i64().unwrap_or(-1);
            let want = pair[1].as_f64().unwrap_or(f64::NAN);
            let got = f64::try_from(logits.get(id))?;
            worst = worst.max((got - want).abs());
            assert!(
                (got - want).abs() <= tol,
                "{fixture} {name}: logit of token {id} is {got}, transformers says {want} (tolerance {tol})"
            );
        }
        engine.add_request(name, Prompt::TokenIds(prompt), greedy(32))?;
        if !batched {
            finished.extend(run_to_end(&mut engine)?);
        }
    }
    eprintln!("{fixture}: largest top-5 logit deviation {worst:.5} (tolerance {tol})");
    finished.extend(run_to_end(&mut engine)?);
    let mut done = 0;
    for out in finished {
        done += 1;
        let case = cases
            .iter()
            .find(|c| c["name"].as_str() == Some(out.request_id.as_str()))
            .ok_or_else(|| fail(format!("unknown output {}", out.request_id)))?;
        // Where the reference's top-two margin is under the logit
        // tolerance, a path within it may pick the other token: tokens
        // are asserted up to the first such step (all of them when no
        // step is that close; the fp32 paths' tolerances are below every
        // margin of the fixtures, so they are asserted whole).
        let want = ids(&case["greedy_token_ids"]);
        let margins: Vec<f64> = case["greedy_margins"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        let stable = margins
            .iter()
            .position(|&m| m < tol)
            .unwrap_or(want.len())
            .min(want.len());
        if stable < want.len() {
            eprintln!(
                "{fixture} {}: tokens asserted up to step {stable} of {} (reference margin \
                 {:.4} there, under the tolerance {tol})",
                out.request_id,
                want.len(),
                margins[stable]
            );
        }
        assert_eq!(
            out.token_ids.get(..stable),
            want.get(..stable),
            "{fixture} {}: greedy tokens differ from transformers before any close step",
            out.request_id
        );
    }
    assert_eq!(done, cases.len());
    Ok(())
}

/// Steps `engine` until every request is done; their final outputs.
fn run_to_end(engine: &mut LLMEngine) -> Result<Vec<omni_engine::RequestOutput>> {
    let mut finished = Vec::new();
    while engine.has_unfinished() {
        finished.extend(engine.step()?.into_iter().filter(|o| o.finished));
    }
    Ok(finished)
}

#[test]
fn smollm2_gguf_matches_transformers() -> Result<()> {
    check(
        "smollm2-135m-instruct-q4_1.json",
        &omni_engine::model_dir().join(omni_engine::SMOLLM2.file_name),
        1e-3,
    )
}

/// fp16 weights through fbgemm (for wide calls, the CPU default), fp32 activations. The
/// reference is transformers in fp32, so logits move by the weights'
/// rounding (up to 0.03 here): the greedy tokens must be the same up to the
/// first step whose reference margin is under that (SmolLM2's fixture has
/// steps at 0.0045 and 0.0071, where another CPU's rounding may pick the
/// other token).
#[test]
fn smollm2_gguf_with_fp16_weights_matches_transformers() -> Result<()> {
    check_with(
        "smollm2-135m-instruct-q4_1.json",
        &omni_engine::model_dir().join(omni_engine::SMOLLM2.file_name),
        "fp16",
        0.03,
    )
}

/// GGUF's blocks as stored (`q4`): with every call on the blocks (no fp16
/// copy for wide calls), the product is the dequantized model's up to
/// summation order, so the fp32 tolerance holds and the greedy tokens are
/// transformers' whole.
#[test]
fn smollm2_gguf_with_quantized_blocks_matches_transformers() -> Result<()> {
    check_engine(
        "smollm2-135m-instruct-q4_1.json",
        smollm2_blocks_only("q4")?,
        1e-3,
    )
}

/// SmolLM2's GGUF in `precision` with every call on the blocks (no fp16
/// copy for wide calls).
fn smollm2_blocks_only(precision: &str) -> Result<LLMEngine> {
    LLMEngine::new(&EngineArgs {
        quant_max_rows: Some(usize::MAX),
        ..engine_args(
            &omni_engine::model_dir().join(omni_engine::SMOLLM2.file_name),
            precision,
        )
    })
}

/// Each case decoding alone on the blocks: every step after the prompt's is
/// a lone decoding token, which runs each layer in one call (the fused
/// decode layer, fp32 activations); tokens transformers' whole.
#[test]
fn smollm2_gguf_decoding_alone_on_quantized_blocks_matches_transformers() -> Result<()> {
    check_engine_batched(
        "smollm2-135m-instruct-q4_1.json",
        smollm2_blocks_only("q4")?,
        1e-3,
        false,
    )
}

/// The `q4` default: blocks for decode steps (up to `QUANT_MAX_ROWS` rows),
/// the fp16 copy for prefills; held to the fp16 path's tolerance.
#[test]
fn smollm2_gguf_with_q4_weights_matches_transformers() -> Result<()> {
    check_with(
        "smollm2-135m-instruct-q4_1.json",
        &omni_engine::model_dir().join(omni_engine::SMOLLM2.file_name),
        "q4",
        0.03,
    )
}

/// `q4-int8`, every call on the blocks: a call of one row (here the head on
/// a prompt's last position) multiplies activations quantized to 8 bits per
/// 32, so logits move by that rounding: 0.37 on this fixture
/// (measured; SmolLM2's final hidden state has outliers that coarsen its
/// blocks), held to 0.6. The greedy tokens are transformers' only up to the
/// first step whose reference margin is under that (0 to 9 steps here), as
/// llama.cpp's, which quantizes the same way, part from them early
/// (BENCHMARKS.md); the kernels themselves are checked exactly against the
/// integer products in `quant`'s tests.
#[test]
fn smollm2_gguf_with_int8_activations_matches_transformers() -> Result<()> {
    check_engine(
        "smollm2-135m-instruct-q4_1.json",
        smollm2_blocks_only("q4-int8")?,
        0.6,
    )
}

/// A GGUF that llama.cpp quantized itself (`llama_model_quantize`, Q4_K_M:
/// Q4_K matrices, Q6_K for the head and some of each layer's, a fused q/k/v
/// of mixed types): the K-quant kernels on a whole model, every call on the
/// blocks, against transformers on the file's dequantized weights.
#[test]
fn tiny_kquant_gguf_with_quantized_blocks_matches_transformers() -> Result<()> {
    check_engine("tiny-kquant.json", kquant_blocks_only()?, 1e-3)
}

/// The K-quant GGUF in `q4` with every call on the blocks (no fp16 copy
/// for wide calls).
fn kquant_blocks_only() -> Result<LLMEngine> {
    LLMEngine::new(&EngineArgs {
        quant_max_rows: Some(usize::MAX),
        ..engine_args(&fixtures().join("tiny-kquant.gguf"), "q4")
    })
}

/// The K-quant GGUF's cases decoding alone: the fused decode layer on
/// Q4_K and Q6_K blocks.
#[test]
fn tiny_kquant_gguf_decoding_alone_matches_transformers() -> Result<()> {
    check_engine_batched("tiny-kquant.json", kquant_blocks_only()?, 1e-3, false)
}

/// The same file dequantized at load (fp32): the loader's K-quant path.
#[test]
fn tiny_kquant_gguf_dequantized_matches_transformers() -> Result<()> {
    check_with(
        "tiny-kquant.json",
        &fixtures().join("tiny-kquant.gguf"),
        "fp32",
        1e-4,
    )
}

/// `kv_cache_dtype`: K and V stored in 16 bits under fp32 activations and
/// weights. The same budget holds twice the blocks; logits move by the
/// cache's rounding (the prompts' too: a short prefill's attention reads its
/// own K/V back from the cache), measured against the fp32 cache on the
/// sampled tokens' log-probabilities (SmolLM2, the fixture's prompts, 32
/// greedy steps, on the steps compared: up to 0.004 in fp16 and 0.037 in
/// bf16, measured), held to 0.02 and 0.1. The tokens equal the fp32
/// cache's up to the first step whose top-two margin there is under twice
/// that, and transformers' up to the first step whose reference margin is
/// (`check_engine`; its top-5 logits come from `last_logits`, which keeps
/// its own fp32 cache, so that part repeats the fp32 check).
#[test]
fn smollm2_with_a_16_bit_kv_cache_stays_near_the_fp32_cache() -> Result<()> {
    let path = omni_engine::model_dir().join(omni_engine::SMOLLM2.file_name);
    let args = |kv: &str| EngineArgs {
        kv_cache_dtype: Some(kv.into()),
        ..engine_args(&path, "native")
    };
    let f = load_json("smollm2-135m-instruct-q4_1.json")?;
    let cases = f["cases"].as_array().cloned().unwrap_or_default();
    // Per request: (token, its log-probability, top-two margin) per step.
    type Steps = Vec<(u32, f32, f32)>;
    let run = |kv: &str| -> Result<(usize, Vec<(String, Steps)>)> {
        let mut engine = LLMEngine::new(&args(kv))?;
        for case in &cases {
            engine.add_request(
                case["name"].as_str().unwrap_or("?"),
                Prompt::TokenIds(ids(&case["prompt_token_ids"])),
                SamplingParams {
                    logprobs: Some(2),
                    ..greedy(32)
                },
            )?;
        }
        let mut done = Vec::new();
        while engine.has_unfinished() {
            for out in engine.step()? {
                if out.finished {
                    let steps = out
                        .logprobs
                        .unwrap_or_default()
                        .iter()
                        .map(|t| {
                            let margin = match t.top.as_slice() {
                                [a, b, ..] => a.1 - b.1,
                                _ => f32::INFINITY,
                            };
                            (t.token_id, t.logprob, margin)
                        })
                        .collect();
                    done.push((out.request_id, steps));
                }
            }
        }
        done.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((engine.num_kv_blocks(), done))
    };
    let (fp32_blocks, want) = run("float32")?;
    for (kv, tol) in [("float16", 0.02f64), ("bfloat16", 0.1)] {
        let (blocks, got) = run(kv)?;
        assert!(
            blocks >= 2 * fp32_blocks,
            "{kv}: {blocks} blocks against {fp32_blocks} in fp32 for the same budget"
        );
        let mut worst = 0f64;
        for ((id, w), (_, g)) in want.iter().zip(&got) {
            assert_eq!(w.len(), 32, "{id}");
            for (step, (a, b)) in w.iter().zip(g).enumerate() {
                if f64::from(a.2) < 2.0 * tol {
                    break; // a close step: either token is right
                }
                assert_eq!(a.0, b.0, "{kv} {id}: step {step} picked another token");
                let off = f64::from(a.1 - b.1).abs();
                worst = worst.max(off);
                assert!(
                    off <= tol,
                    "{kv} {id}: step {step}'s log-probability {} against {} with an fp32 \
                     cache (tolerance {tol})",
                    b.1,
                    a.1
                );
            }
        }
        eprintln!("{kv} cache: largest log-probability deviation {worst:.5} (tolerance {tol})");
        check_engine(
            "smollm2-135m-instruct-q4_1.json",
            LLMEngine::new(&args(kv))?,
            2.0 * tol,
        )?;
    }
    let e = LLMEngine::new(&args("int4"))
        .map(drop)
        .unwrap_err()
        .to_string();
    assert!(e.contains("kv_cache_dtype") && e.contains("int4"), "{e}");
    Ok(())
}

#[test]
fn tiny_llama_matches_transformers() -> Result<()> {
    check("tiny-llama.json", &fixtures().join("tiny-llama"), 1e-4)
}

#[test]
fn tiny_qwen2_matches_transformers() -> Result<()> {
    check("tiny-qwen2.json", &fixtures().join("tiny-qwen2"), 1e-4)
}

#[test]
fn tiny_qwen3_matches_transformers() -> Result<()> {
    check("tiny-qwen3.json", &fixtures().join("tiny-qwen3"), 1e-4)
}

/// Text prompts go through the engine's tokenizer to the same ids.
#[test]
fn text_and_chat_prompts_encode_like_transformers() -> Result<()> {
    let f = load_json("tiny-qwen2.json")?;
    let engine = engine_for(&fixtures().join("tiny-qwen2"), "native")?;
    for case in f["cases"].as_array().into_iter().flatten() {
        let prompt = if case["group"] == "chat" {
            let messages = serde_json::from_value(case["messages"].clone())
                .map_err(|e| fail(e.to_string()))?;
            Prompt::Chat(messages)
        } else {
            Prompt::Text(case["prompt"].as_str().unwrap_or_default().to_owned())
        };
        assert_eq!(
            engine.encode_prompt(&prompt)?,
            ids(&case["prompt_token_ids"]),
            "case {}",
            case["name"]
        );
    }
    Ok(())
}
