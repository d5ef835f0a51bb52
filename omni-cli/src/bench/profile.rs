//! `omni bench profile`: what profiling costs a running pipeline. One
//! pipeline per backend stays up; every round runs the same batch on each
//! configuration in turn, so drift on a noisy machine hits all of them.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::Args;
use omni_core::{OmniLLM, PipelineConfig};

use super::{run_batch, start};

/// Flags of `omni bench profile`.
#[derive(Args, Debug)]
pub struct ProfileBench {
    /// A built-in pipeline or a pipeline file.
    #[arg(long, default_value = omni_core::DEFAULT_PIPELINE)]
    pub pipeline: String,
    /// Prompts per batch.
    #[arg(long, default_value_t = 16)]
    pub prompts: usize,
    /// Tokens every stage generates per prompt (greedy, EOS ignored).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Rounds; each runs one batch per configuration.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Print one JSON object per configuration.
    #[arg(long)]
    pub json: bool,
}

/// A measured configuration: which backend the stages run, and whether a
/// profiler window is open during the batch.
struct Config {
    label: &'static str,
    backend: &'static str,
    window: bool,
}

const CONFIGS: [Config; 4] = [
    Config {
        label: "compiled in, off (torch backend, no window)",
        backend: "torch",
        window: false,
    },
    Config {
        label: "noop backend, window open",
        backend: "noop",
        window: true,
    },
    Config {
        label: "chrome backend, recording",
        backend: "chrome",
        window: true,
    },
    Config {
        label: "torch backend (Kineto), recording",
        backend: "torch",
        window: true,
    },
];

#[derive(Default)]
struct Samples {
    tok_per_s: Vec<f64>,
    start_ms: Vec<f64>,
    stop_ms: Vec<f64>,
    trace_mb: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(super) fn run(b: ProfileBench) -> anyhow::Result<()> {
    if b.prompts == 0 || b.max_tokens == 0 || b.rounds == 0 {
        bail!(
            "--prompts {}, --max-tokens {}, --rounds {}: each must be at least 1",
            b.prompts,
            b.max_tokens,
            b.rounds
        );
    }
    // The backend is what this benchmark varies: an override would make
    // every configuration the same.
    if let Some(v) = std::env::var_os(omni_core::profiler::BACKEND_ENV) {
        bail!(
            "{}={v:?} is set and would override every configuration's backend; unset it",
            omni_core::profiler::BACKEND_ENV
        );
    }
    // Traces need a directory; a private one is made (and removed) when the
    // user did not name one.
    let own_dir = match omni_core::profiler::profiler_dir_from_env() {
        Ok(_) => None,
        Err(_) => {
            let d = std::env::temp_dir().join(format!("omni-bench-profile-{}", std::process::id()));
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            // Still single-threaded here: no other thread reads the environment.
            std::env::set_var(omni_core::profiler::PROFILER_DIR_ENV, &d);
            Some(d)
        }
    };
    let result = measure(&b);
    if let Some(d) = own_dir {
        let _ = std::fs::remove_dir_all(d);
    }
    let samples = result?;

    if b.json {
        for (c, s) in CONFIGS.iter().zip(&samples) {
            println!(
                "{}",
                serde_json::json!({"config": c.label, "backend": c.backend, "window": c.window,
                    "tok_per_s": s.tok_per_s, "start_ms": s.start_ms, "stop_ms": s.stop_ms,
                    "trace_mb": s.trace_mb})
            );
        }
        return Ok(());
    }
    let base = median(&samples[0].tok_per_s);
    println!(
        "| configuration | tok/s (median of {}) | vs off | start_profile ms | stop_profile ms | trace MB |",
        b.rounds
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (c, s) in CONFIGS.iter().zip(&samples) {
        let t = median(&s.tok_per_s);
        let ms = |v: &[f64]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1}", median(v))
            }
        };
        println!(
            "| {} | {t:.1} | {:+.1}% | {} | {} | {} |",
            c.label,
            (t / base - 1.0) * 100.0,
            ms(&s.start_ms),
            ms(&s.stop_ms),
            ms(&s.trace_mb)
        );
    }
    Ok(())
}

fn measure(b: &ProfileBench) -> anyhow::Result<Vec<Samples>> {
    let base = PipelineConfig::resolve(&b.pipeline)
        .with_context(|| format!("pipeline {:?}", b.pipeline))?;
    // One pipeline per backend, all up at once (idle ones cost no CPU).
    let mut pipelines: BTreeMap<&str, OmniLLM> = BTreeMap::new();
    for c in &CONFIGS {
        if pipelines.contains_key(c.backend) {
            continue;
        }
        let mut config = base.clone();
        config.profiler = Some(c.backend.to_string());
        for s in &mut config.stages {
            s.profiler = None;
        }
        let omni = start(
            config,
            format!("{:?} with the {} backend", b.pipeline, c.backend),
        )?;
        super::run_batch(&omni, 1, 4).context("warm-up")?;
        pipelines.insert(c.backend, omni);
    }
    let mut samples: Vec<Samples> = CONFIGS.iter().map(|_| Samples::default()).collect();
    for round in 0..b.rounds {
        for (c, s) in CONFIGS.iter().zip(samples.iter_mut()) {
            let omni = &pipelines[c.backend];
            if c.window {
                let t = Instant::now();
                omni.start_profile(None).context("start_profile")?;
                s.start_ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let (wall, tokens) = run_batch(omni, b.prompts, b.max_tokens)?;
            s.tok_per_s.push(tokens as f64 / wall);
            if c.window {
                let t = Instant::now();
                let files = omni.stop_profile().context("stop_profile")?;
                s.stop_ms.push(t.elapsed().as_secs_f64() * 1e3);
                let bytes: u64 = files
                    .values()
                    .flatten()
                    .map(|p: &PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
                    .sum();
                s.trace_mb.push(bytes as f64 / 1e6);
            }
            tracing::info!(
                round,
                config = c.label,
                tok_per_s = s.tok_per_s.last().copied().unwrap_or(0.0),
                "batch done"
            );
        }
    }
    for (_, omni) in pipelines {
        omni.shutdown().context("stopping a pipeline")?;
    }
    Ok(samples)
}
