//! Shared by the `runtime_*` integration tests: where the worker binary is,
//! options that keep tests bounded, and process checks.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use omni_engine::SamplingParams;
use omni_runtime::{OrchestratorOptions, PipelineConfig};

/// The worker binary: this package's copy of `omni-stage` (same code, one
/// line of `main`), which cargo rebuilds with these tests.
pub fn stage_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_runtime-omni-stage"))
}

/// Generous start-up time (two models load at once on two shared cores),
/// bounded everywhere else.
pub fn options() -> OrchestratorOptions {
    OrchestratorOptions {
        stage_binary: Some(stage_binary()),
        init_timeout: Duration::from_secs(300),
        shutdown_grace: Duration::from_secs(15),
        control_timeout: Duration::from_secs(120),
        ..Default::default()
    }
}

/// Greedy params with these `max_tokens`, one per stage.
pub fn greedy(config: &PipelineConfig, max_tokens: &[usize]) -> Vec<SamplingParams> {
    config
        .stages
        .iter()
        .zip(max_tokens)
        .map(|(_, &m)| SamplingParams {
            temperature: 0.0,
            max_tokens: Some(m),
            ..SamplingParams::default()
        })
        .collect()
}

/// Whether `pid` is a live process (a zombie counts as gone).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Polls `f` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
