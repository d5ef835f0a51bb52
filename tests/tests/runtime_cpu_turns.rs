//! CPU stages whose pools are as wide as the machine take turns stepping:
//! while stage 0 decodes one long request, stage 1 decodes another, and
//! their steps (in the traces both stages write) never overlap, yet stage 1
//! is not starved until stage 0 is done.
//!
//! One test per file: it sets `VLLM_TORCH_PROFILER_DIR`,
//! `OMNI_PROFILER_BACKEND` and `CUDA_VISIBLE_DEVICES` for the stage
//! processes it starts, which must not leak into other tests.
use std::collections::BTreeSet;

use futures::StreamExt;
use omni_core::{AsyncOmni, OmniEngineArgs, SamplingParams};
use omni_tests::{chat, ensure_binaries, err, read_trace, tiny_params, Result};

/// Clock slack between two stage processes' traces: each anchors the wall
/// clock once (see `runtime_clock_skew`). Steps that run at once overlap by
/// whole steps (tens of ms on 2 cores).
const CLOCK_SLACK_US: f64 = 5_000.0;

/// `(start, end)` of every `ProfilerStep#n` range in a stage's files.
fn steps(paths: &[std::path::PathBuf]) -> Result<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    for p in paths {
        let doc = read_trace(p)?;
        for e in doc["traceEvents"].as_array().map_or(&[][..], Vec::as_slice) {
            let name = e["name"].as_str().unwrap_or("");
            if e["ph"] == "X" && name.starts_with("ProfilerStep#") {
                let ts = e["ts"].as_f64().ok_or_else(|| err(format!("no ts: {e}")))?;
                out.push((ts, ts + e["dur"].as_f64().unwrap_or(0.0)));
            }
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_take_turns_and_neither_waits_for_the_other_to_finish() -> Result {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 || std::env::var_os("OMP_NUM_THREADS").is_some() {
        // One thread a stage (or the user's count) needs no turns.
        eprintln!("skipped: {cores} core(s), OMP_NUM_THREADS set or not");
        return Ok(());
    }
    ensure_binaries()?;
    let dir = tempfile::tempdir()?;
    std::env::set_var("VLLM_TORCH_PROFILER_DIR", dir.path());
    std::env::set_var("OMNI_PROFILER_BACKEND", "chrome");
    // On the CPU even where a GPU is: GPU stages take no turns.
    std::env::set_var("CUDA_VISIBLE_DEVICES", "");
    let omni = AsyncOmni::from_engine_args(OmniEngineArgs::new("default")).await?;
    let fixed = |n| SamplingParams {
        ignore_eos: true,
        ..tiny_params(n)
    };
    omni.start_profile(None).await?;
    // `short` leaves stage 0 at once and decodes 24 tokens in stage 1
    // while `long` decodes 64 in stage 0.
    let run = |prompt: &'static str, params: Vec<SamplingParams>, id: &'static str| {
        let omni = &omni;
        async move {
            let mut stream = omni.generate(chat(prompt), params, id).await?;
            let mut finished = BTreeSet::new();
            while let Some(out) = stream.next().await {
                let out = out?;
                if out.finished {
                    finished.insert(out.stage_id);
                }
            }
            Ok::<_, omni_tests::BoxError>(finished)
        }
    };
    let (short, long) = tokio::join!(
        run("What is a star?", vec![fixed(2), fixed(24)], "short"),
        run("What is a planet?", vec![fixed(64), fixed(2)], "long"),
    );
    assert_eq!(short?, BTreeSet::from([0, 1]));
    assert_eq!(long?, BTreeSet::from([0, 1]));
    let traces = omni.stop_profile().await?;
    omni.shutdown().await?;

    let s0 = steps(traces.get(&0).ok_or_else(|| err("no stage 0 trace"))?)?;
    let s1 = steps(traces.get(&1).ok_or_else(|| err("no stage 1 trace"))?)?;
    assert!(
        s0.len() >= 64 && s1.len() >= 24,
        "{} / {} steps",
        s0.len(),
        s1.len()
    );
    for &(a0, a1) in &s0 {
        for &(b0, b1) in &s1 {
            let overlap = a1.min(b1) - a0.max(b0);
            assert!(
                overlap < CLOCK_SLACK_US,
                "stage 0's step at {a0:.0}..{a1:.0} us and stage 1's at {b0:.0}..{b1:.0} us overlap by {overlap:.0} us"
            );
        }
    }
    // Turns alternate: most of stage 1's steps for `short` ran between
    // stage 0's steps for `long`, not after them.
    let s0_end = s0.last().map_or(0.0, |s| s.1);
    let meanwhile = s1.iter().filter(|s| s.1 < s0_end).count();
    assert!(
        meanwhile >= 16,
        "stage 1 ran only {meanwhile} of its {} steps while stage 0 was busy",
        s1.len()
    );
    Ok(())
}
