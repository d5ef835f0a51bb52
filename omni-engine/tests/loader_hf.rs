//! Hugging Face folders: config.json (both rope layouts), sharded and
//! single safetensors, bf16 storage, and every way a folder can be broken.
use std::path::{Path, PathBuf};

use omni_engine::{Architecture, Device, Error, Kind, ModelConfig, ModelSource, RopeScaling};

#[path = "fixtures/reference.rs"]
mod reference;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixture(name: &str) -> PathBuf {
    reference::fixtures_dir().join(name)
}

fn open(path: &Path) -> omni_engine::Result<ModelSource> {
    ModelSource::open(path.to_str().unwrap_or_default())
}

/// A copy of a fixture folder we may break.
fn copy_fixture(name: &str) -> Result<tempfile::TempDir, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    for e in std::fs::read_dir(fixture(name))? {
        let e = e?;
        std::fs::copy(e.path(), dir.path().join(e.file_name()))?;
    }
    Ok(dir)
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) -> TestResult {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

#[test]
fn tiny_llama_sharded_with_llama3_rope() -> TestResult {
    let src = open(&fixture("tiny-llama"))?;
    assert_eq!(src.name(), "tiny-llama");
    assert_eq!(src.format_name(), "safetensors");
    let c = src.config();
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers
        ),
        (619, 64, 128, 2)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (4, 2, 16)
    );
    assert_eq!(c.rope_theta, 10000.0);
    assert_eq!(
        c.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64
        })
    );
    assert!(!c.tie_word_embeddings && !c.attention_bias && !c.qk_norm);
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.clone()),
        (Some(1), vec![2])
    );
    let w = src.load_weights(Kind::Float, Device::Cpu)?;
    // 2 layers x 9 tensors + embed + norm + lm_head, from 4 shards.
    assert_eq!(w.len(), 21);
    assert_eq!(w.get("lm_head.weight")?.size(), [619, 64]);
    assert_eq!(
        w.get("model.layers.1.self_attn.k_proj.weight")?.size(),
        [32, 64]
    );
    Ok(())
}

#[test]
fn tiny_qwen2_has_biases_and_ties() -> TestResult {
    let src = open(&fixture("tiny-qwen2"))?;
    let c = src.config();
    assert_eq!(c.architecture, Architecture::Qwen2);
    assert_eq!(c.rope_theta, 1_000_000.0);
    assert_eq!(c.rope_scaling, None);
    assert!(c.tie_word_embeddings && c.attention_bias && !c.qk_norm);
    let w = src.load_weights(Kind::Float, Device::Cpu)?;
    assert_eq!(w.get("model.layers.0.self_attn.q_proj.bias")?.size(), [64]);
    assert!(!w.contains("lm_head.weight"));
    Ok(())
}

#[test]
fn tiny_qwen3_bf16_loads_exactly_into_any_dtype() -> TestResult {
    let src = open(&fixture("tiny-qwen3"))?;
    let c = src.config();
    assert_eq!(c.architecture, Architecture::Qwen3);
    // head_dim is stated, and differs from hidden / heads.
    assert_eq!(
        (c.head_dim, c.hidden_size / c.num_attention_heads),
        (32, 16)
    );
    assert!(c.qk_norm && c.tie_word_embeddings && !c.attention_bias);
    assert_eq!(c.rope_theta, 1_000_000.0);
    let f = src.load_weights(Kind::Float, Device::Cpu)?;
    let b = src.load_weights(Kind::BFloat16, Device::Cpu)?;
    assert_eq!(
        f.get("model.layers.0.self_attn.q_norm.weight")?.size(),
        [32]
    );
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(f.get(q)?.size(), [128, 64]);
    assert_eq!(f.get(q)?.kind(), Kind::Float);
    assert_eq!(b.get(q)?.kind(), Kind::BFloat16);
    // bf16 -> f32 is exact, so both loads hold the same numbers.
    assert!(f.get(q)?.equal(&b.get(q)?.to_kind(Kind::Float)));
    Ok(())
}

#[test]
fn transformers5_rope_parameters_layout() -> TestResult {
    let text = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        "eos_token_id": [5, 6]}"#;
    let c = ModelConfig::from_config_json(Path::new("x/config.json"), text)?;
    assert_eq!(c.rope_theta, 500.0);
    assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
    assert_eq!(c.num_key_value_heads, 2);
    assert_eq!(c.eos_token_ids, vec![5, 6]);
    Ok(())
}

fn config_error(text: &str) -> String {
    match ModelConfig::from_config_json(Path::new("m/config.json"), text) {
        Err(e) => e.to_string(),
        Ok(c) => panic!("accepted {text}: {c:?}"),
    }
}

#[test]
fn config_errors_name_the_file_and_field() {
    let base = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2"#;
    let e = config_error(&format!(
        r#"{{"architectures": ["MambaForCausalLM"], {base}}}"#
    ));
    assert!(
        e.contains("MambaForCausalLM") && e.contains("m/config.json"),
        "{e}"
    );
    let e = config_error(r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 10}"#);
    assert!(
        e.contains("m/config.json") && e.contains("hidden_size") && e.contains("missing"),
        "{e}"
    );
    let e = config_error(&format!(
        r#"{{"architectures": ["LlamaForCausalLM"], {base}, "rope_scaling": {{"rope_type": "yarn", "factor": 4.0}}}}"#
    ));
    assert!(
        e.contains("rope_scaling.rope_type") && e.contains("yarn"),
        "{e}"
    );
    let e = config_error(&format!(
        r#"{{"architectures": ["LlamaForCausalLM"], {base}, "rope_scaling": {{"rope_type": "llama3", "factor": 8.0}}}}"#
    ));
    assert!(
        e.contains("rope_scaling.original_max_position_embeddings") && e.contains("missing"),
        "{e}"
    );
    let e = config_error(&format!(
        r#"{{"architectures": ["LlamaForCausalLM"], {base}, "num_key_value_heads": 3}}"#
    ));
    assert!(e.contains("num_key_value_heads") && e.contains('3'), "{e}");
    let e = config_error(&format!(
        r#"{{"architectures": ["LlamaForCausalLM"], {base}, "hidden_act": "gelu"}}"#
    ));
    assert!(e.contains("hidden_act") && e.contains("gelu"), "{e}");
    let e = config_error(r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": "big"}"#);
    assert!(
        e.contains("config.json") && e.contains("hidden_size") && e.contains("big"),
        "{e}"
    );
}

#[test]
fn unknown_architecture_in_a_folder() -> TestResult {
    let dir = copy_fixture("tiny-qwen2")?;
    edit_config(dir.path(), |v| {
        v["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
    })?;
    match open(dir.path()) {
        Err(Error::UnknownArchitecture {
            name, source_name, ..
        }) => {
            assert_eq!(name, "GPT2LMHeadModel");
            assert!(source_name.contains("config.json"));
        }
        other => panic!("expected UnknownArchitecture, got {other:?}"),
    }
    Ok(())
}

#[test]
fn missing_shard_and_truncated_weights_are_errors() -> TestResult {
    let dir = copy_fixture("tiny-llama")?;
    std::fs::remove_file(dir.path().join("model-00002-of-00004.safetensors"))?;
    match open(dir.path()) {
        Err(Error::ModelFile { path, .. }) => {
            assert!(path.ends_with("model-00002-of-00004.safetensors"))
        }
        other => panic!("expected ModelFile, got {other:?}"),
    }

    let dir = copy_fixture("tiny-qwen2")?;
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st)?;
    std::fs::write(&st, &bytes[..bytes.len() / 2])?;
    let src = open(dir.path())?;
    match src.load_weights(Kind::Float, Device::Cpu) {
        Err(Error::Format { path, format, .. }) => {
            assert_eq!(format, "safetensors");
            assert_eq!(path, st);
        }
        other => panic!("expected a safetensors format error, got {other:?}"),
    }
    // Garbage header length.
    std::fs::write(&st, u64::MAX.to_le_bytes())?;
    assert!(matches!(
        src.load_weights(Kind::Float, Device::Cpu),
        Err(Error::Format { .. })
    ));
    // Shapes no tensor can take: one the safetensors crate refuses itself
    // (its size overflows), one it accepts (0 elements, so 0 bytes) with a
    // dimension past i64. Both are errors naming the file; the second
    // names the tensor too.
    for (shape, names_tensor) in [
        ("[1099511627776,1099511627776,1099511627776]", false),
        ("[9223372036854775808,0]", true),
    ] {
        let header = format!(r#"{{"w":{{"dtype":"F32","shape":{shape},"data_offsets":[0,0]}}}}"#);
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        std::fs::write(&st, &file)?;
        match src.load_weights(Kind::Float, Device::Cpu) {
            Err(Error::Format { path, reason, .. }) => {
                assert_eq!(path, st);
                assert!(!names_tensor || reason.contains("\"w\""), "{reason}");
            }
            other => panic!("expected a safetensors format error for {shape}, got {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn index_naming_a_tensor_its_shard_lacks() -> TestResult {
    let dir = copy_fixture("tiny-llama")?;
    let p = dir.path().join("model.safetensors.index.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
    v["weight_map"]["model.layers.9.mlp.up_proj.weight"] =
        serde_json::json!("model-00001-of-00004.safetensors");
    std::fs::write(&p, v.to_string())?;
    match open(dir.path())?.load_weights(Kind::Float, Device::Cpu) {
        Err(Error::Weight { name, .. }) => assert_eq!(name, "model.layers.9.mlp.up_proj.weight"),
        other => panic!("expected a Weight error, got {other:?}"),
    }
    // A shard name that leaves the folder.
    v["weight_map"]["x"] = serde_json::json!("../model.safetensors");
    std::fs::write(&p, v.to_string())?;
    assert!(matches!(open(dir.path()), Err(Error::Format { .. })));
    Ok(())
}

#[test]
fn paths_that_are_not_models() -> TestResult {
    match ModelSource::open("/no/such/model.gguf") {
        Err(Error::ModelFile { path, reason }) => {
            assert_eq!(path, Path::new("/no/such/model.gguf"));
            assert!(reason.contains("smollm2"), "{reason}");
        }
        other => panic!("expected ModelFile, got {other:?}"),
    }
    let dir = tempfile::tempdir()?;
    assert!(matches!(open(dir.path()), Err(Error::ModelFile { .. })));
    let not_gguf = dir.path().join("notes.txt");
    std::fs::write(&not_gguf, "hello, this is not a model")?;
    match open(&not_gguf) {
        Err(Error::ModelFile { reason, .. }) => assert!(reason.contains("GGUF"), "{reason}"),
        other => panic!("expected ModelFile, got {other:?}"),
    }
    Ok(())
}
