//! `omni serve` answers as vLLM's OpenAI server does: each row of the
//! parity table (context length, stop tokens and strings, `stop_reason`,
//! `n`, `best_of`, logprobs in OpenAI's shapes against transformers,
//! `prompt_logprobs`, `echo`, `min_tokens`, `logit_bias`, prompt batches,
//! seeds, unknown models and fields) through the official `openai` client
//! (`tests/python/openai_parity.py`), on SmolLM2 at fp32 as the reference.
//! And `--generation-config` picks where omitted fields come from.
use std::path::Path;

use omni_tests::{err, http, metric, repo_root, run_python, Result, Server};

/// SmolLM2 alone at fp32, answering 5 tokens unless told otherwise.
const PIPELINE: &str = "name: smollm2-fp32
description: SmolLM2 at fp32, for reference comparisons
stage_args:
  - stage_id: 0
    engine_args:
      model: smollm2
      kv_cache_memory_bytes: 268435456
      model_stage: llm
      dtype: float32
      weight_precision: fp32
    final_output: true
    final_output_type: text
    default_sampling_params:
      temperature: 0.0
      max_tokens: 5
";

fn start(dir: &Path, args: &[&str]) -> Result<Server> {
    let path = dir.join("smollm2-fp32.yaml");
    std::fs::write(&path, PIPELINE)?;
    let path = path.to_str().ok_or_else(|| err("temp path is not UTF-8"))?;
    let mut all = vec!["--served-model-name", "smollm2"];
    all.extend_from_slice(args);
    Server::start_with(path, &all, &[])
}

#[test]
fn every_row_behaves_as_vllm_s_server() -> Result {
    let dir = tempfile::tempdir()?;
    let server = start(dir.path(), &[])?;
    let fixture = repo_root().join("omni-engine/tests/fixtures/smollm2-logprobs.json");
    let out = run_python(
        "openai_parity.py",
        &[
            &format!("http://{}/v1", server.addr),
            "smollm2",
            fixture
                .to_str()
                .ok_or_else(|| err("fixture path is not UTF-8"))?,
        ],
    )?;
    let r: serde_json::Value = serde_json::from_str(out.trim())?;
    let rows: Vec<&str> = r["rows"]
        .as_array()
        .ok_or_else(|| err("no rows"))?
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for row in [
        "context_length",
        "stop_token_ids",
        "stop_reason",
        "include_stop_str_in_output",
        "stop_string",
        "skip_special_tokens_false",
        "stream_stop_string",
        "logprobs_completion",
        "logprobs_chat",
        "prompt_logprobs",
        "echo",
        "min_tokens",
        "logit_bias",
        "n",
        "best_of",
        "prompt_list",
        "seed",
        "unknown_model",
        "not_implemented",
        "unknown_field",
    ] {
        assert!(rows.contains(&row), "row {row} did not run: {r}");
    }
    let failures = r["failures"]
        .as_array()
        .ok_or_else(|| err("no failures list"))?;
    assert!(failures.is_empty(), "{:#}", r["failures"]);
    n_samples_share_the_prompt_s_blocks(&server)?;
    Ok(())
}

/// `n` samples run as sequences of one batch: all but the first take the
/// prompt's full blocks from the prefix cache instead of computing them.
fn n_samples_share_the_prompt_s_blocks(server: &Server) -> Result {
    let hits = || -> Result<f64> {
        let m = http(&server.addr, "GET", "/metrics", None)?;
        metric(
            &m.body,
            "omni_stage_prefix_cache_hit_tokens_total{stage=\"0\"}",
        )
        .ok_or_else(|| err(format!("no prefix-cache series in\n{}", m.body)))
    };
    // A prompt never sent before, of more than four 16-token blocks.
    let prompt = "Seven lighthouse keepers counted the ships that passed their rocks each \
                  night, wrote the numbers in a ledger, and argued about the totals over \
                  breakfast until the winter storms ended the season. "
        .repeat(3);
    let before = hits()?;
    let body = format!(
        r#"{{"model":"smollm2","prompt":"{prompt}","max_tokens":2,"n":4,"temperature":1,"seed":3}}"#
    );
    let r = http(&server.addr, "POST", "/v1/completions", Some(&body))?;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json()?;
    let prompt_tokens = v["usage"]["prompt_tokens"].as_f64().unwrap_or(0.0);
    assert!(prompt_tokens > 64.0, "{v}");
    let shared = hits()? - before;
    // Three samples each reuse at least the first four blocks.
    assert!(shared >= 3.0 * 64.0, "{shared} prompt tokens shared: {v}");
    Ok(())
}

/// Completion tokens of a request that sets no `max_tokens` (EOS ignored,
/// so the default alone stops it).
fn default_length(server: &Server) -> Result<u64> {
    let r = http(
        &server.addr,
        "POST",
        "/v1/completions",
        Some(r#"{"model":"smollm2","prompt":"The sky is","ignore_eos":true,"temperature":0}"#),
    )?;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()?["usage"]["completion_tokens"]
        .as_u64()
        .ok_or_else(|| err(format!("no usage in {}", r.body)))
}

#[test]
fn generation_config_picks_the_defaults_of_omitted_fields() -> Result {
    let dir = tempfile::tempdir()?;
    // Omni's default: the pipeline file's 5 tokens.
    let server = start(dir.path(), &[])?;
    assert_eq!(default_length(&server)?, 5);
    drop(server);
    // vLLM's: 16 for a completion.
    let server = start(dir.path(), &["--generation-config", "vllm"])?;
    assert_eq!(default_length(&server)?, 16);
    Ok(())
}
