//! `omni bench pipeline`: the pipeline through OmniLLM, then the same stages
//! in HF transformers one after the other, in one invocation.
use anyhow::{bail, Context as _};
use omni_core::{PipelineConfig, DEFAULT_PIPELINE};
use serde::Deserialize;

use super::{run_batch, start, PipelineBench, Reference};

/// The reference: HF transformers running the default pipeline's two
/// stages, fed to the interpreter on stdin so an installed `omni` needs no
/// file beside it.
const HF_PIPELINE_PY: &str = include_str!("../../bench/hf_pipeline.py");

/// One batch size's result, from either system.
#[derive(Debug, Deserialize)]
struct Row {
    prompts: usize,
    wall_s: f64,
    tokens: usize,
}

impl Row {
    fn prompts_per_s(&self) -> f64 {
        self.prompts as f64 / self.wall_s
    }

    fn tok_per_s(&self) -> f64 {
        self.tokens as f64 / self.wall_s
    }

    fn json(&self, system: &str) -> serde_json::Value {
        serde_json::json!({"system": system, "prompts": self.prompts, "wall_s": self.wall_s,
            "prompts_per_s": self.prompts_per_s(), "tok_per_s": self.tok_per_s(), "tokens": self.tokens})
    }
}

pub(super) fn run(b: PipelineBench) -> anyhow::Result<()> {
    if b.prompts.is_empty() || b.prompts.contains(&0) {
        bail!(
            "--prompts {:?}: every batch size must be at least 1",
            b.prompts
        );
    }
    if b.max_tokens == 0 {
        bail!("--max-tokens 0: every stage must generate at least one token");
    }
    if b.reference == Reference::Hf && b.pipeline != DEFAULT_PIPELINE {
        bail!(
            "--reference hf reproduces the built-in `{DEFAULT_PIPELINE}` pipeline only, not {:?}; pass --reference none",
            b.pipeline
        );
    }
    let mut config = PipelineConfig::resolve(&b.pipeline)
        .with_context(|| format!("pipeline {:?}", b.pipeline))?;
    if let Some(backend) = b.backend {
        config.runtime.backend = backend.into();
    }
    let backend = serde_json::to_value(config.runtime.backend)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let reference_config = {
        let mut c = config.clone();
        if c.runtime.backend == omni_core::runtime::Backend::Ray {
            // Ray gives an actor's processes as many threads as its bundle
            // has CPUs (OMP_NUM_THREADS; 1 when the stage names none): the
            // local run gets the same, so the difference is the backend's.
            for s in &mut c.stages {
                let cpus = s.runtime.resources.get("CPU").copied().unwrap_or(1.0);
                s.engine_args
                    .num_threads
                    .get_or_insert((cpus.floor() as usize).max(1));
            }
        }
        c.runtime.backend = omni_core::runtime::Backend::Local;
        c
    };
    let (start_s, ours) = measure(
        config,
        &b,
        &format!("pipeline {:?} ({backend})", b.pipeline),
    )?;
    let (reference_start_s, reference, label) = match b.reference {
        Reference::Hf => (None, hf_reference(&b)?, "HF"),
        Reference::Local => {
            let (s, rows) = measure(
                reference_config,
                &b,
                &format!("pipeline {:?} (local)", b.pipeline),
            )?;
            (Some(s), rows, "local")
        }
        Reference::None => (None, Vec::new(), "-"),
    };

    if b.json {
        for r in &ours {
            let mut j = r.json("omni");
            j["backend"] = backend.clone().into();
            j["start_s"] = start_s.into();
            println!("{j}");
        }
        for r in &reference {
            let mut j = r.json(if label == "HF" { "hf" } else { "omni-local" });
            if let Some(s) = reference_start_s {
                j["start_s"] = s.into();
            }
            println!("{j}");
        }
        return Ok(());
    }
    match reference_start_s {
        Some(r) => println!("start-up: omni ({backend}) {start_s:.2} s, {label} {r:.2} s\n"),
        None => println!("start-up: omni ({backend}) {start_s:.2} s\n"),
    }
    println!(
        "| prompts | omni wall s | omni prompts/s | omni tok/s | {label} wall s | {label} prompts/s | {label} tok/s | omni / {label} |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &ours {
        let hf = reference.iter().find(|h| h.prompts == r.prompts);
        let (hw, hp, ht, x) = match hf {
            Some(h) => (
                format!("{:.2}", h.wall_s),
                format!("{:.2}", h.prompts_per_s()),
                format!("{:.1}", h.tok_per_s()),
                format!("{:.2}x", h.wall_s / r.wall_s),
            ),
            None => Default::default(),
        };
        println!(
            "| {} | {:.2} | {:.2} | {:.1} | {hw} | {hp} | {ht} | {x} |",
            r.prompts,
            r.wall_s,
            r.prompts_per_s(),
            r.tok_per_s()
        );
    }
    Ok(())
}

/// Starts the pipeline (timed: spawning or placing the stages and loading
/// the models), warms it up, and runs every batch size.
fn measure(
    config: PipelineConfig,
    b: &PipelineBench,
    label: &str,
) -> anyhow::Result<(f64, Vec<Row>)> {
    let started = std::time::Instant::now();
    let omni = start(config, label.to_owned())?;
    let start_s = started.elapsed().as_secs_f64();
    // Warm-up: first-call costs (allocator, kernels) out of the numbers.
    run_batch(&omni, 1, 4).context("warm-up")?;
    let mut rows = Vec::new();
    for &n in &b.prompts {
        let (wall_s, tokens) = run_batch(&omni, n, b.max_tokens)?;
        tracing::info!(prompts = n, wall_s, tokens, label, "omni batch done");
        rows.push(Row {
            prompts: n,
            wall_s,
            tokens,
        });
    }
    omni.shutdown().context("stopping the pipeline")?;
    Ok((start_s, rows))
}

fn hf_reference(b: &PipelineBench) -> anyhow::Result<Vec<Row>> {
    let gguf = omni_core::engine::resolve_model_path("smollm2")
        .context("locating the SmolLM2 GGUF for the HF reference")?;
    let sizes: Vec<String> = b.prompts.iter().map(usize::to_string).collect();
    let args: Vec<std::ffi::OsString> = vec![
        gguf.into(),
        "--prompts".into(),
        sizes.join(",").into(),
        "--max-tokens".into(),
        b.max_tokens.to_string().into(),
        "--threads".into(),
        b.python.threads.to_string().into(),
    ];
    b.python.run_reference(
        "HF transformers reference",
        HF_PIPELINE_PY,
        &args,
        "transformers and gguf (OMNI_BENCH_DEPS=1 scripts/setup) or --reference none",
    )
}
