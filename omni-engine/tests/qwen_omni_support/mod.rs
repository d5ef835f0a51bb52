//! What the Qwen2.5-Omni tests share: the tiny checkpoint's fixtures and
//! references, an engine for one of its parts, and a loop that runs an
//! engine dry.
#![allow(dead_code)] // each test binary uses its own part of it

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use omni_engine::{EngineArgs, LLMEngine, RequestOutput};
use serde_json::Value;
use tch::Tensor;

pub type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// `tests/fixtures/qwen2_5_omni`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_5_omni")
}

/// A JSON file of the fixtures (`references.json`, `media.json`).
pub fn json(name: &str) -> Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        fixtures().join(name),
    )?)?)
}

/// A JSON list of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect()
        })
        .unwrap_or_default()
}

/// A float32 sidecar (`{"file", "shape"}`) as a tensor of its shape.
pub fn sidecar(entry: &Value) -> Result<Tensor> {
    let shape: Vec<i64> = entry["shape"]
        .as_array()
        .ok_or("no shape")?
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    let bytes = std::fs::read(fixtures().join(entry["file"].as_str().ok_or("no file")?))?;
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(Tensor::from_slice(&v).reshape(&shape))
}

/// The largest absolute value.
pub fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

/// An fp32 engine for `stage` (`thinker`, `talker`) of the tiny checkpoint.
pub fn engine(stage: &str) -> Result<LLMEngine> {
    let args = EngineArgs {
        model: fixtures().join("tiny").to_string_lossy().into_owned(),
        dtype: Some("float32".into()),
        weight_precision: Some("native".into()),
        kv_cache_memory_bytes: Some(8 << 20),
        ..EngineArgs::default()
    };
    Ok(LLMEngine::new_part(&args, Some(stage))?)
}

/// Runs every request to its end; the final outputs by request id.
pub fn run(e: &mut LLMEngine) -> Result<HashMap<String, RequestOutput>> {
    let mut done = HashMap::new();
    while e.has_unfinished() {
        for o in e.step()? {
            if o.finished {
                done.insert(o.request_id.clone(), o);
            }
        }
    }
    Ok(done)
}
