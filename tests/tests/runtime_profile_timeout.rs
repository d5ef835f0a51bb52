//! A `stop_profile` that times out (the stage is stopped) leaves the stage
//! marked as recording, so the next `stop_profile` asks it again (it used
//! to be forgotten: a window it never closed stayed open until shutdown).
//! Once it runs again, the late stop closes its window: the trace is on
//! disk, whole, and a new window opens.
//!
//! One test per file: it sets `VLLM_TORCH_PROFILER_DIR`.

mod runtime_support;

use std::time::Duration;

use omni_runtime::{Error, Orchestrator, OrchestratorOptions, PipelineConfig};
use runtime_support::{options, TestResult};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_stop_profile_can_be_retried() -> TestResult {
    let dir = tempfile::tempdir()?;
    std::env::set_var("VLLM_TORCH_PROFILER_DIR", dir.path());
    let orch = Orchestrator::start(
        PipelineConfig::builtin("smollm2")?,
        OrchestratorOptions {
            control_timeout: Duration::from_secs(2),
            // The watchdog would kill the stopped stage; not its test.
            health_interval: Duration::from_secs(3600),
            ..options()
        },
    )
    .await?;
    let pid = orch.stages()[0].pid as libc::pid_t;
    orch.start_profile(None).await?;
    // SAFETY: plain kill(2) of a child process we own.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let e = orch
        .stop_profile()
        .await
        .err()
        .ok_or("a stopped stage closed its window")?;
    assert!(
        matches!(
            e,
            Error::Timeout {
                stage_id: 0,
                what: "stop_profile",
                ..
            }
        ),
        "{e}"
    );
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let files = orch.stop_profile().await?;
    assert!(files.contains_key(&0), "stage 0 was forgotten: {files:?}");
    let traces = omni_tests::trace_files(dir.path());
    assert!(!traces.is_empty(), "no trace written");
    for t in &traces {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(t)?)?;
        assert!(v["traceEvents"].is_array(), "{}", t.display());
    }
    orch.start_profile(None).await?;
    let again = orch.stop_profile().await?;
    assert!(again.get(&0).is_some_and(|f| !f.is_empty()), "{again:?}");
    orch.shutdown().await?;
    Ok(())
}
