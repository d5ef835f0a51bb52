//! Stages whose clocks disagree (as on different hosts) still give one
//! timeline: the orchestrator estimates each stage's clock offset from its
//! health exchanges, the stage records it in its trace, and `merge` /
//! `summarize` take it out, so a request's arrows run forward.
//!
//! Stage 1 runs with its trace clock skewed 3 s behind
//! (`OMNI_TEST_CLOCK_SKEW_US`, a test-only hook). One test per file: it
//! sets `VLLM_TORCH_PROFILER_DIR` for the stage processes it starts.

mod runtime_support;

use std::time::Duration;

use omni_engine::Prompt;
use omni_runtime::{Orchestrator, PipelineConfig, StageEvent};
use omni_tests::{read_trace, trace_files};
use runtime_support::{greedy, options, TestResult};
use serde_json::Value;

const SKEW_US: f64 = -3_000_000.0;

/// `(first ts, last end)` of the `name` spans in `trace`.
fn span_times(trace: &Value, name: &str) -> Vec<(f64, f64)> {
    trace["traceEvents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["ph"] == "X" && e["name"] == name)
        .filter_map(|e| {
            let ts = e["ts"].as_f64()?;
            Some((ts, ts + e["dur"].as_f64().unwrap_or(0.0)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_with_a_skewed_clock_still_gives_forward_flows() -> TestResult {
    let dir = tempfile::tempdir()?;
    std::env::set_var("VLLM_TORCH_PROFILER_DIR", dir.path());
    let config = PipelineConfig::builtin("default")?;
    let params = greedy(&config, &[6, 4]);
    let mut opts = options();
    opts.worker_env
        .push(("OMNI_TEST_CLOCK_SKEW_US".into(), format!("1:{SKEW_US}")));
    let orch = Orchestrator::start(config, opts).await?;

    // The estimate: stage 1 is 3 s behind within the estimate's own bound
    // (half its round trip) plus 1 ms for the processes' clock anchors;
    // stage 0 shares our clock.
    for (stage, want) in [(0, 0.0), (1, SKEW_US)] {
        let c = orch.clock_offset(stage).ok_or("an offset after start-up")?;
        assert!(
            (c.offset_us - want).abs() <= c.error_us + 1000.0,
            "stage {stage}: {c:?}, want {want}"
        );
    }

    orch.start_profile(None).await?;
    let mut rx = orch
        .submit(
            "skewed".into(),
            Prompt::Text("What is a star?".into()),
            params,
        )
        .await?;
    let mut finished = 0;
    tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(ev) = rx.recv().await {
            match ev {
                StageEvent::Output { output, .. } => finished += output.finished as usize,
                StageEvent::Error(e) => return Err(e),
                _ => {}
            }
        }
        Ok(())
    })
    .await??;
    assert_eq!(finished, 2);
    let files = orch.stop_profile().await?;
    orch.shutdown().await?;

    let stage_trace = |s: usize| -> omni_tests::Result<Value> {
        read_trace(files.get(&s).and_then(|f| f.first()).ok_or("a trace")?)
    };
    let (t0, t1) = (stage_trace(0)?, stage_trace(1)?);
    let recorded = t1["omni"]["clock_offset_us"]
        .as_f64()
        .ok_or("offset in the header")?;
    assert!((recorded - SKEW_US).abs() < 100_000.0, "{recorded}");
    // The skew is real in the files: stage 1 took the request in, on its
    // own clock, before stage 0 began to send it.
    let send = span_times(&t0, "stage_send");
    let recv = span_times(&t1, "stage_recv");
    assert!(!send.is_empty() && !recv.is_empty(), "{send:?} {recv:?}");
    assert!(
        recv[0].1 < send[0].0,
        "raw times: send {send:?}, recv {recv:?}"
    );

    // Merged: every arrow runs forward, and the request has one.
    let out = dir.path().join("merged.json");
    omni_profiler::tools::merge(dir.path(), &out)?;
    let merged = read_trace(&out)?;
    let flows = omni_tests::request_flows(&merged);
    assert!(!flows.is_empty(), "no arrow from stage 0 to stage 1");
    assert!(flows.iter().all(|(s, f)| s <= f), "{flows:?}");
    // And summarize puts the hand-over between the stages, not 3 s before.
    let summary = omni_profiler::tools::summarize(dir.path())?;
    let req = summary
        .requests
        .iter()
        .find(|r| r.request_id.starts_with("skewed"))
        .ok_or("the request in the summary")?;
    let transfer = req
        .stages
        .get(1)
        .and_then(|s| s.transfer_us)
        .ok_or("stage 1's transfer")?;
    assert!((0.0..1_000_000.0).contains(&transfer), "{transfer}");
    assert_eq!(trace_files(dir.path()).len(), 3, "two traces and the merge");
    Ok(())
}
