//! Fault injection: a random stage of the `default` pipeline, and of
//! `qwen2_5_omni` (the tiny checkpoint; thinker -> talker -> code2wav,
//! streaming between stages), is SIGKILLed or SIGSTOPped at a random moment
//! while 16 requests run through it (and while `stop_profile` writes the
//! traces, in every other trial). Fixed seed, bounded time. Each trial
//! checks that
//!
//! - every request's channel ends (its outputs or an error naming the
//!   stage) within a stated bound: a stopped stage is caught by the health
//!   watchdog, never waited on;
//! - what was delivered is intact: a request that finished has every
//!   final stage's last output, each text stage's text the concatenation of
//!   its deltas, each audio stage's pieces real audio;
//! - every worker is gone and the run directory removed;
//! - no trace file is half written (each is whole JSON);
//! - a pipeline started afterwards serves a request.
//!
//! `OMNI_FAULT_TRIALS` (default 2 per pipeline, the README's test command)
//! sets the number of trials, `OMNI_FAULT_SEED` the seed and
//! `OMNI_FAULT_PIPELINES` the pipelines (default `default,qwen2_5_omni`);
//! RELIABILITY.md has the 50-trial runs.

mod runtime_support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use omni_engine::{Prompt, SamplingParams};
use omni_runtime::{
    Error, FinalOutputType, Orchestrator, OrchestratorOptions, PipelineConfig, StageEvent,
};
use runtime_support::{eventually, greedy, options, pid_alive, TestResult};

/// Every request of a trial ends within this after the fault.
const BOUND: Duration = Duration::from_secs(45);

/// SplitMix64: a seeded sequence without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn opts() -> OrchestratorOptions {
    OrchestratorOptions {
        health_interval: Duration::from_millis(500),
        health_timeout: Duration::from_secs(3),
        control_timeout: Duration::from_secs(10),
        shutdown_grace: Duration::from_secs(5),
        ..options()
    }
}

/// What one request's channel gave.
#[derive(Default)]
struct Seen {
    deltas: HashMap<usize, String>,
    finals: HashMap<usize, String>,
    /// Samples of audio per stage, over all its outputs.
    audio: HashMap<usize, usize>,
    /// Whether every audio sample was finite.
    audio_finite: bool,
    error: Option<Error>,
}

/// The pipeline a trial runs, ready to start.
fn pipeline(name: &str) -> Result<PipelineConfig, Box<dyn std::error::Error + Send + Sync>> {
    let mut config = PipelineConfig::builtin(name)?;
    if name == "qwen2_5_omni" {
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../omni-engine/tests/fixtures/qwen2_5_omni/tiny");
        for s in &mut config.stages {
            s.engine_args.model = tiny.display().to_string();
        }
    }
    Ok(config)
}

/// Request `i`'s params: lengths vary, so some requests finish before the
/// fault; the last is long, so the fault always finds one in flight.
fn request_params(config: &PipelineConfig, i: usize) -> Vec<SamplingParams> {
    let long = i == 15;
    let first = if long { 400 } else { 4 + 6 * (i % 5) };
    if config.name == "qwen2_5_omni" {
        // Thinker (exactly `first` tokens, its states to the talker),
        // talker (exactly 24 codes), code2wav (its seeded default). The
        // tiny thinker writes 400 tokens in well under a second: the long
        // request keeps every stage busy for seconds instead.
        let (first, codes) = if long { (2000, 400) } else { (first, 24) };
        let exactly = |n: usize| SamplingParams {
            max_tokens: Some(n),
            min_tokens: n,
            ..SamplingParams::greedy()
        };
        return vec![
            SamplingParams {
                output_states: true,
                ..exactly(first)
            },
            exactly(codes),
            config.stages[2].default_sampling_params.clone(),
        ];
    }
    let mut params = greedy(config, &[first, 6]);
    params[0].ignore_eos = long;
    params
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_stage_faults_never_hang_lose_or_leave_anything() -> TestResult {
    let trials = env_u64("OMNI_FAULT_TRIALS", 2);
    let seed = env_u64("OMNI_FAULT_SEED", 2026);
    let mut rng = Rng(seed);
    let traces = tempfile::tempdir()?;
    // The stages read it when a window opens; nothing else here profiles.
    std::env::set_var("VLLM_TORCH_PROFILER_DIR", traces.path());
    let pipelines =
        std::env::var("OMNI_FAULT_PIPELINES").unwrap_or_else(|_| "default,qwen2_5_omni".into());
    for (name, trial) in pipelines
        .split(',')
        .flat_map(|p| (0..trials).map(move |t| (p.trim().to_owned(), t)))
    {
        let config = pipeline(&name)?;
        let victim = rng.below(config.stages.len() as u64) as usize;
        let signal = if rng.below(2) == 0 {
            libc::SIGKILL
        } else {
            libc::SIGSTOP
        };
        let delay = Duration::from_millis(rng.below(2500));
        let profiled = trial % 2 == 1;
        let what = format!(
            "{name} trial {trial} (seed {seed}): {} of stage {victim} after {delay:?}{}",
            if signal == libc::SIGKILL {
                "SIGKILL"
            } else {
                "SIGSTOP"
            },
            if profiled {
                ", during stop_profile"
            } else {
                ""
            }
        );
        eprintln!("fault injection: {what}");
        let final_types: HashMap<usize, FinalOutputType> = config
            .stages
            .iter()
            .filter(|s| s.final_output)
            .map(|s| (s.stage_id, s.final_output_type))
            .collect();
        let orch = Orchestrator::start(config, opts()).await?;
        let pids: Vec<u32> = orch.stages().iter().map(|s| s.pid).collect();
        let run_dir = orch.run_dir().to_path_buf();
        if profiled {
            orch.start_profile(None).await?;
        }
        let mut receivers = Vec::new();
        for i in 0..16 {
            let params = request_params(orch.config(), i);
            let rx = orch
                .submit(
                    format!("r{i}"),
                    Prompt::Text(format!("Say something about the number {i}.")),
                    params,
                )
                .await?;
            receivers.push(rx);
        }
        let collect = receivers.into_iter().map(|mut rx| async move {
            let mut seen = Seen {
                audio_finite: true,
                ..Seen::default()
            };
            while let Some(ev) = rx.recv().await {
                match ev {
                    StageEvent::Output { stage_id, output } => {
                        seen.deltas
                            .entry(stage_id)
                            .or_default()
                            .push_str(&output.delta_text);
                        for (_, t) in output.tensors.iter().filter(|(n, _)| n == "audio") {
                            *seen.audio.entry(stage_id).or_default() += t.numel();
                            seen.audio_finite &= t
                                .to_tch()
                                .map(|t| t.isfinite().all().int64_value(&[]) == 1)
                                .unwrap_or(false);
                        }
                        if output.finished {
                            seen.finals.insert(stage_id, output.text.clone());
                        }
                    }
                    StageEvent::Error(e) => seen.error = Some(e),
                    _ => {}
                }
            }
            seen
        });
        let collected = tokio::spawn(futures::future::join_all(collect));
        tokio::time::sleep(delay).await;
        assert!(
            !collected.is_finished(),
            "{what}: every request ended before the fault"
        );
        let fault_at = Instant::now();
        let kill = || {
            // SAFETY: plain kill(2) of a child process we own.
            assert_eq!(
                unsafe { libc::kill(pids[victim] as libc::pid_t, signal) },
                0,
                "{what}"
            );
        };
        if profiled {
            // The stage is hit while the traces are being written; the stop
            // fails or not, depending on the moment, but it returns.
            let (stopped, ()) =
                tokio::join!(tokio::time::timeout(BOUND, orch.stop_profile()), async {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    kill();
                });
            stopped
                .map_err(|_| format!("{what}: stop_profile still waiting after {BOUND:?}"))?
                .ok();
        } else {
            kill();
        }
        let left = BOUND.saturating_sub(fault_at.elapsed());
        let seen = tokio::time::timeout(left, collected)
            .await
            .map_err(|_| format!("{what}: a request was still waiting after {BOUND:?}"))??;
        eprintln!(
            "fault injection: {what}: every request ended {:?} after the fault, {} of 16 complete",
            fault_at.elapsed(),
            seen.iter().filter(|s| s.error.is_none()).count()
        );
        for (i, s) in seen.iter().enumerate() {
            match &s.error {
                None => {
                    // Finished before the fault reached it: whole.
                    assert_eq!(
                        s.finals.len(),
                        final_types.len(),
                        "{what}: r{i} lacks a final output"
                    );
                    for (stage, text) in &s.finals {
                        match final_types.get(stage) {
                            Some(FinalOutputType::Audio) => assert!(
                                s.audio.get(stage).is_some_and(|&n| n > 0) && s.audio_finite,
                                "{what}: r{i} stage {stage}: no audio, or not finite"
                            ),
                            _ => assert_eq!(
                                s.deltas.get(stage),
                                Some(text),
                                "{what}: r{i} stage {stage}: deltas and text differ"
                            ),
                        }
                    }
                }
                Some(e) => assert!(
                    e.to_string().contains("stage"),
                    "{what}: r{i}'s error names no stage: {e}"
                ),
            }
        }
        tokio::time::timeout(BOUND, orch.shutdown()).await??;
        assert!(
            eventually(Duration::from_secs(30), || pids
                .iter()
                .all(|&p| !pid_alive(p)))
            .await,
            "{what}: workers {pids:?} still there"
        );
        assert!(
            eventually(Duration::from_secs(10), || !run_dir.exists()).await,
            "{what}: run directory {} left behind",
            run_dir.display()
        );
        // Trace files are written under a temporary name and renamed: none
        // may be left half written under either name.
        let mut pending = vec![traces.path().to_path_buf()];
        while let Some(d) = pending.pop() {
            for e in std::fs::read_dir(&d)?.flatten() {
                let p = e.path();
                if p.is_dir() {
                    pending.push(p);
                } else {
                    assert!(
                        p.extension().is_none_or(|x| x != "tmp"),
                        "{what}: {} left behind",
                        p.display()
                    );
                }
            }
        }
        for t in omni_tests::trace_files(traces.path()) {
            let bytes = std::fs::read(&t)?;
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| format!("{what}: {} is not whole JSON: {e}", t.display()))?;
            assert!(v["traceEvents"].is_array(), "{what}: {}", t.display());
        }
    }
    // After the faults, a new pipeline serves.
    let orch = Orchestrator::start(PipelineConfig::builtin("default")?, opts()).await?;
    let mut rx = orch
        .submit(
            "after".into(),
            Prompt::Text("Hi.".into()),
            greedy(orch.config(), &[4, 4]),
        )
        .await?;
    let mut finished = 0;
    while let Some(ev) = tokio::time::timeout(BOUND, rx.recv()).await? {
        match ev {
            StageEvent::Output { output, .. } => finished += usize::from(output.finished),
            StageEvent::Error(e) => return Err(format!("after the faults: {e}").into()),
            _ => {}
        }
    }
    assert_eq!(finished, 2);
    orch.shutdown().await?;
    Ok(())
}
