//! Bad input gives typed errors that name the value; the engine keeps
//! working afterwards.
use std::path::{Path, PathBuf};

use omni_engine::{EngineArgs, Error, LLMEngine, Prompt, Result, SamplingParams};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

fn args() -> EngineArgs {
    EngineArgs {
        model: tiny().display().to_string(),
        device: Some("cpu".into()),
        max_model_len: Some(64),
        kv_cache_memory_bytes: Some(16 << 20),
        ..EngineArgs::default()
    }
}

fn message(r: Result<impl std::fmt::Debug>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_engine_args_name_the_field_and_value() -> Result<()> {
    let cases: Vec<(EngineArgs, &str)> = vec![
        (
            EngineArgs {
                dtype: Some("float8".into()),
                ..args()
            },
            "engine_args.dtype = float8",
        ),
        (
            EngineArgs {
                device: Some("tpu".into()),
                ..args()
            },
            "engine_args.device = tpu",
        ),
        (
            EngineArgs {
                device: Some("cuda:99".into()),
                ..args()
            },
            "engine_args.device = cuda:99",
        ),
        (
            EngineArgs {
                weight_precision: Some("int3".into()),
                ..args()
            },
            "engine_args.weight_precision = int3",
        ),
        (
            EngineArgs {
                max_num_seqs: 0,
                ..args()
            },
            "engine_args.max_num_seqs = 0",
        ),
        (
            EngineArgs {
                block_size: 0,
                ..args()
            },
            "engine_args.block_size = 0",
        ),
        (
            EngineArgs {
                kv_cache_memory_bytes: Some(10),
                ..args()
            },
            "kv_cache_memory_bytes = 10",
        ),
        (
            EngineArgs {
                max_model_len: Some(1 << 30),
                ..args()
            },
            "max_model_len = 1073741824",
        ),
    ];
    for (a, want) in cases {
        let e = message(LLMEngine::new(&a));
        assert!(e.contains(want), "{e:?} does not contain {want:?}");
    }
    let e = message(LLMEngine::new(&EngineArgs::new("/nonexistent/model.gguf")));
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");
    Ok(())
}

#[test]
fn bad_requests_are_rejected_and_the_engine_keeps_going() -> Result<()> {
    let mut e = LLMEngine::new(&args())?;
    let vocab = e.model().config().vocab_size as u32;
    let ok = || SamplingParams {
        max_tokens: Some(4),
        ..SamplingParams::greedy()
    };

    let m = message(e.add_request("a", Prompt::TokenIds(vec![]), ok()));
    assert!(m.contains("\"a\"") && m.contains("empty"), "{m}");
    let m = message(e.add_request("a", Prompt::TokenIds(vec![5, vocab + 3]), ok()));
    assert!(m.contains(&format!("token id {}", vocab + 3)), "{m}");
    let m = message(e.add_request("a", Prompt::TokenIds(vec![5; 100]), ok()));
    assert!(m.contains("100 input tokens") && m.contains("64"), "{m}");
    let bad: Vec<(SamplingParams, &str)> = vec![
        (SamplingParams { top_p: 0.0, ..ok() }, "top_p = 0"),
        (SamplingParams { top_p: 1.5, ..ok() }, "top_p = 1.5"),
        (
            SamplingParams {
                temperature: -1.0,
                ..ok()
            },
            "temperature = -1",
        ),
        (
            SamplingParams {
                max_tokens: Some(0),
                ..ok()
            },
            "max_tokens = 0",
        ),
        (SamplingParams { top_k: -5, ..ok() }, "top_k = -5"),
        (SamplingParams { n: 3, ..ok() }, "n = 3"),
    ];
    for (p, want) in bad {
        let m = message(e.add_request("a", Prompt::TokenIds(vec![5, 6]), p));
        assert!(m.contains(want), "{m:?} does not contain {want:?}");
    }
    e.add_request("a", Prompt::Text("The quick brown fox".into()), ok())?;
    assert!(matches!(
        e.add_request("a", Prompt::TokenIds(vec![5]), ok()),
        Err(Error::DuplicateRequest(id)) if id == "a"
    ));
    let mut finished = None;
    while e.has_unfinished() {
        for o in e.step()? {
            if o.finished {
                finished = Some(o);
            }
        }
    }
    let out = finished.ok_or_else(|| Error::Tokenizer("no output".into()))?;
    assert_eq!(out.token_ids.len(), 4);
    // The id is free again once the request finished.
    e.add_request("a", Prompt::TokenIds(vec![5, 6]), ok())?;
    assert!(e.abort("a"));
    assert!(!e.abort("a"));
    assert!(!e.has_unfinished());
    Ok(())
}
