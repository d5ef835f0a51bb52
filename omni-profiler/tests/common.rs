//! Helpers shared by the profiler's integration tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use omni_profiler::{Error, Result};
use serde_json::Value;
use tracing_subscriber::prelude::*;

/// Installs the profiler layer once per test binary.
pub fn install_layer() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::registry()
            .with(omni_profiler::tracing_layer())
            .try_init();
    });
}

/// Recording backends share one process-wide recorder: tests that open
/// windows take this lock so they do not run at once.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Reads a `.json` or `.json.gz` trace.
pub fn read_trace(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    let text = if path.to_string_lossy().ends_with(".gz") {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut out)
            .map_err(|e| io(path, e))?;
        out
    } else {
        bytes
    };
    serde_json::from_slice(&text).map_err(|e| Error::InvalidTrace {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

pub fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        cause: e,
    }
}

pub fn events(trace: &Value) -> Vec<Value> {
    trace
        .get("traceEvents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

pub fn names(trace: &Value) -> Vec<String> {
    events(trace)
        .iter()
        .filter_map(|e| e.get("name").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

/// Complete events named `name`.
pub fn ranges_named(trace: &Value, name: &str) -> Vec<Value> {
    events(trace)
        .into_iter()
        .filter(|e| {
            e.get("ph").and_then(Value::as_str) == Some("X")
                && e.get("name").and_then(Value::as_str) == Some(name)
        })
        .collect()
}

/// Files in `dir`, hidden ones included, sorted.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    out.sort();
    Ok(out)
}

/// Fails the test with a message (tests return `Result`).
pub fn check(cond: bool, what: impl Into<String>) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Task(format!("check failed: {}", what.into())))
    }
}

/// Microseconds since the UNIX epoch, now.
pub fn now_us() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e6)
        .unwrap_or(0.0)
}

/// One engine-like step with real tch ops, marked as the engine marks it.
pub fn engine_step(step: u64, request_ids: &str) {
    use tch::{Device, Kind, Tensor};
    {
        // As `LLMEngine::step`: the scheduled requests are recorded once the
        // schedule is made, and outputs are sent after the step.
        let step_span = tracing::info_span!(target: "omni::engine", "step", step,
            request_ids = tracing::field::Empty)
        .entered();
        {
            let _s = tracing::info_span!(target: "omni::engine", "schedule").entered();
        }
        step_span.record("request_ids", request_ids);
        let logits = {
            let _f = tracing::info_span!(target: "omni::engine", "forward",
                phase = "decode", batch_size = 2u64, num_tokens = 2u64)
            .entered();
            let x = Tensor::randn([16, 32], (Kind::Float, Device::Cpu));
            let w = Tensor::randn([32, 8], (Kind::Float, Device::Cpu));
            x.matmul(&w).relu()
        };
        let _s = tracing::info_span!(target: "omni::engine", "sample").entered();
        let _ = logits.argmax(-1, false);
    }
    let _send = tracing::info_span!(target: "omni::runtime", "stage_send", request_ids).entered();
}
