//! `omni bench pipeline`: the pipeline through OmniLLM, then the same stages
//! in HF transformers one after the other, in one invocation.
use anyhow::{bail, Context as _};
use omni_core::engine::{ModelConfig, ModelSource, WeightPrecision};
use omni_core::{OmniRequestOutput, PipelineConfig, DEFAULT_PIPELINE};
use serde::Deserialize;

use super::{run_batch_outputs, start, PipelineBench, Reference};
use crate::progress;

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
    /// The floating-point work the stages did (omni's rows only).
    #[serde(default)]
    flops: Option<u64>,
    /// The GEMM peak measured right before and right after this batch, the
    /// larger (omni's rows, when every stage is a decoder on the CPU).
    #[serde(default)]
    peak: Option<f64>,
}

impl Row {
    fn prompts_per_s(&self) -> f64 {
        self.prompts as f64 / self.wall_s
    }

    fn tok_per_s(&self) -> f64 {
        self.tokens as f64 / self.wall_s
    }

    fn gflop_per_s(&self) -> Option<f64> {
        self.flops.map(|f| f as f64 / self.wall_s / 1e9)
    }

    /// The sustained rate's share of the GEMM peak around this batch.
    fn share_of_peak(&self) -> Option<f64> {
        Some(self.gflop_per_s()? / self.peak?)
    }

    fn json(&self, system: &str) -> serde_json::Value {
        serde_json::json!({"system": system, "prompts": self.prompts, "wall_s": self.wall_s,
            "prompts_per_s": self.prompts_per_s(), "tok_per_s": self.tok_per_s(), "tokens": self.tokens,
            "gflop_per_s": self.gflop_per_s(), "gemm_peak_gflop_per_s": self.peak,
            "share_of_gemm_peak": self.share_of_peak()})
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
    let models = stage_models(&config);
    // The yardstick is a CPU measurement: a pipeline with a stage on a GPU
    // reports its rate without one, and so does one with a stage whose work
    // is not counted.
    let yardstick_model = match models.iter().flatten().next() {
        Some(m) if all_on_cpu(&config) && models.iter().all(Option::is_some) => Some(m),
        _ => None,
    };
    let (start_s, ours, yardsticks) = measure(
        config,
        &b,
        &format!("pipeline {:?} ({backend})", b.pipeline),
        &models,
        yardstick_model,
    )?;
    let (reference_start_s, reference, label) = match b.reference {
        Reference::Hf => (None, hf_reference(&b)?, "HF"),
        Reference::Local => {
            let (s, rows, _) = measure(
                reference_config,
                &b,
                &format!("pipeline {:?} (local)", b.pipeline),
                &models,
                None,
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
        for (i, y) in yardsticks.iter().enumerate() {
            for &(rows, g) in &y.rates {
                println!(
                    "{}",
                    serde_json::json!({"system": "gemm", "precision": y.precision,
                        "threads": y.threads, "rows": rows, "gflop_per_s": g,
                        "before_batch": b.prompts.get(i)})
                );
            }
        }
        return Ok(());
    }
    match reference_start_s {
        Some(r) => println!("start-up: omni ({backend}) {start_s:.2} s, {label} {r:.2} s\n"),
        None => println!("start-up: omni ({backend}) {start_s:.2} s\n"),
    }
    if let Some(first) = yardsticks.first() {
        println!(
            "GEMM rate of the model's layer GEMMs alone ({}, {} threads), measured before \
             each batch and after the last; a batch's peak is the largest rate measured \
             right before or right after it:",
            first.precision, first.threads
        );
        for (i, y) in yardsticks.iter().enumerate() {
            let rates: Vec<String> = y
                .rates
                .iter()
                .map(|(rows, g)| format!("{g:.1} GFLOP/s at {rows} rows"))
                .collect();
            let when = match b.prompts.get(i) {
                Some(n) => format!("before the {n}-prompt batch"),
                None => "after the last batch".to_owned(),
            };
            println!("  {when}: {}", rates.join(", "));
        }
        println!();
    }
    println!(
        "| prompts | omni wall s | omni prompts/s | omni tok/s | omni GFLOP/s | GEMM peak | of GEMM peak | {label} wall s | {label} prompts/s | {label} tok/s | omni / {label} |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
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
        let gflops = r
            .gflop_per_s()
            .map(|g| format!("{g:.1}"))
            .unwrap_or_default();
        let peak = r.peak.map(|p| format!("{p:.1}")).unwrap_or_default();
        let share = r
            .share_of_peak()
            .map(|s| format!("{:.0}%", 100.0 * s))
            .unwrap_or_default();
        println!(
            "| {} | {:.2} | {:.2} | {:.1} | {gflops} | {peak} | {share} | {hw} | {hp} | {ht} | {x} |",
            r.prompts,
            r.wall_s,
            r.prompts_per_s(),
            r.tok_per_s()
        );
    }
    Ok(())
}

/// Starts the pipeline (timed: spawning or placing the stages and loading
/// the models), warms it up, and runs every batch size. With a
/// `yardstick_model`, the GEMM peak is measured before each batch and after
/// the last, with the stages idle: this VM-class machine's speed drifts by a
/// third within minutes, so one measurement at the end compared each batch
/// with a machine that was no longer the one that ran it.
fn measure(
    config: PipelineConfig,
    b: &PipelineBench,
    label: &str,
    models: &[Option<ModelConfig>],
    yardstick_model: Option<&ModelConfig>,
) -> anyhow::Result<(f64, Vec<Row>, Vec<Yardstick>)> {
    let started = std::time::Instant::now();
    let omni = start(config, label.to_owned())?;
    let start_s = started.elapsed().as_secs_f64();
    // Warm-up: first-call costs (allocator, kernels) out of the numbers.
    run_batch_outputs(&omni, 1, 4).context("warm-up")?;
    // Every batch size's rows and 512 (where fbgemm is at its best), each
    // time, so the runs' rates compare with the same set.
    let mut yardstick_rows = b.prompts.clone();
    yardstick_rows.push(512);
    yardstick_rows.sort_unstable();
    yardstick_rows.dedup();
    // The yardstick's weights are made once, measured around every batch.
    let gemms = yardstick_model.map(YardstickGemms::new).transpose()?;
    let yardstick = || -> anyhow::Result<Option<Yardstick>> {
        gemms
            .as_ref()
            .map(|g| g.measure(&yardstick_rows))
            .transpose()
    };
    let mut yardsticks: Vec<Yardstick> = yardstick()?.into_iter().collect();
    let mut rows = Vec::new();
    for &n in &b.prompts {
        let (wall_s, outputs) = run_batch_outputs(&omni, n, b.max_tokens)?;
        let tokens = outputs.iter().map(|o| o.token_ids.len()).sum();
        let flops = run_flops(models, &outputs);
        tracing::info!(prompts = n, wall_s, tokens, flops, label, "omni batch done");
        let before = yardsticks.last().map(Yardstick::peak);
        let after = yardstick()?;
        let peak = [before, after.as_ref().map(Yardstick::peak)]
            .into_iter()
            .flatten()
            .reduce(f64::max);
        yardsticks.extend(after);
        rows.push(Row {
            prompts: n,
            wall_s,
            tokens,
            flops,
            peak,
        });
    }
    omni.shutdown().context("stopping the pipeline")?;
    Ok((start_s, rows, yardsticks))
}

/// Each stage's decoder, for counting the work of a run; None for a stage
/// whose model is not one (a vocoder, a voice): its work is not counted, and
/// a run through it reports no FLOP rate.
fn stage_models(config: &PipelineConfig) -> Vec<Option<ModelConfig>> {
    config
        .stages
        .iter()
        .map(|s| {
            ModelSource::open_part(&s.engine_args.model, s.model_stage.as_deref())
                .map(|m| m.config().clone())
                .map_err(|e| {
                    tracing::info!(stage = s.stage_id, error = %e, "not counting this stage's FLOPs");
                })
                .ok()
        })
        .collect()
}

/// Whether every stage runs on the CPU (`runtime.devices` over
/// `engine_args.device`, as the stages resolve them).
fn all_on_cpu(config: &PipelineConfig) -> bool {
    config.stages.iter().all(|s| {
        let mut args = s.engine_args.clone();
        if let Some(d) = &s.runtime.devices {
            args.device = Some(d.clone());
        }
        matches!(args.resolve_device(), Ok(omni_core::engine::Device::Cpu))
    })
}

/// The work the stages did for `outputs`, from each stage's last token
/// counts for each request ([`ModelConfig::request_flops`]); None when a
/// stage that reported has no decoder to count.
fn run_flops(models: &[Option<ModelConfig>], outputs: &[OmniRequestOutput]) -> Option<u64> {
    let mut last = std::collections::HashMap::new();
    for o in outputs {
        for m in &o.metrics.stages {
            let e = last.entry((o.request_id.as_str(), m.stage_id)).or_insert(m);
            // Later outputs carry later counts: on a tie the later wins.
            if m.num_generated_tokens >= e.num_generated_tokens {
                *e = m;
            }
        }
    }
    last.values()
        .map(|m| {
            let model = models.get(m.stage_id)?.as_ref()?;
            Some(model.request_flops(
                m.num_prompt_tokens,
                m.num_cached_tokens,
                m.num_generated_tokens,
            ))
        })
        .sum()
}

/// How long the yardstick measures at least, per row count.
const YARDSTICK_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// The GEMM rate the cores give the model's layers alone.
struct Yardstick {
    precision: &'static str,
    threads: i32,
    /// (rows of activations, GFLOP/s).
    rates: Vec<(usize, f64)>,
}

impl Yardstick {
    /// The best rate at any row count.
    fn peak(&self) -> f64 {
        self.rates.iter().map(|&(_, g)| g).fold(0.0, f64::max)
    }
}

/// The model's layer GEMMs ([`omni_core::engine::LayerGemms`]) with fp16
/// weights where fbgemm runs (what the engine's CPU default uses for calls of
/// more than a few rows), else fp32.
struct YardstickGemms {
    gemms: omni_core::engine::LayerGemms,
    precision: WeightPrecision,
}

impl YardstickGemms {
    fn new(model: &ModelConfig) -> anyhow::Result<Self> {
        let mut precision = WeightPrecision::Fp16;
        let gemms = progress::with_spinner(
            "GEMM yardstick: making the layers".to_owned(),
            |_: &omni_core::engine::LayerGemms| "GEMM yardstick: layers made".to_owned(),
            || match omni_core::engine::LayerGemms::new(model, precision) {
                Err(e) if precision == WeightPrecision::Fp16 => {
                    tracing::info!(error = %e, "fp16 GEMM unavailable; measuring fp32");
                    precision = WeightPrecision::Native;
                    omni_core::engine::LayerGemms::new(model, precision)
                }
                r => r,
            },
        )
        .context("making the GEMM yardstick's layers")?;
        Ok(Self { gemms, precision })
    }

    /// The rate at each row count, on libtorch's default intra-op threads
    /// (what a stage gets with `cpu_threads: all`).
    fn measure(&self, rows: &[usize]) -> anyhow::Result<Yardstick> {
        let label = format!("GEMM peak at {rows:?} rows");
        let rates = progress::with_spinner(
            label.clone(),
            |_: &Vec<f64>| format!("{label}: measured"),
            || self.gemms.gflops(rows, 5, YARDSTICK_TIME),
        )
        .context("measuring the GEMM peak")?;
        Ok(Yardstick {
            precision: self.precision.as_str(),
            threads: omni_core::engine::tch::get_num_threads(),
            rates: rows.iter().copied().zip(rates).collect(),
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use omni_core::StageMetrics;

    fn metrics(stage_id: usize, prompt: usize, cached: usize, generated: usize) -> StageMetrics {
        let mut m = StageMetrics::default();
        m.stage_id = stage_id;
        m.num_prompt_tokens = prompt;
        m.num_cached_tokens = cached;
        m.num_generated_tokens = generated;
        m
    }

    fn tiny() -> ModelConfig {
        ModelConfig {
            architecture: omni_core::engine::Architecture::Llama,
            vocab_size: 100,
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            attention_bias: false,
            qk_norm: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            embedding_size: None,
            mrope_section: None,
        }
    }

    /// Each (request, stage) counts once, at its latest token counts, from
    /// whichever output carried them; a stage without a decoder makes the
    /// whole count unknown rather than low.
    #[test]
    fn a_run_counts_each_stage_of_each_request_once() {
        let cfg = tiny();
        let output = |id: &str, stage: usize, stages: Vec<StageMetrics>| {
            let mut o = OmniRequestOutput::new(id.into(), stage, "text".into());
            o.metrics.stages = stages;
            o
        };
        let outputs = vec![
            // Stage 0's own output, then stage 1's carrying stage 0's again.
            output("a", 0, vec![metrics(0, 10, 4, 3)]),
            output("a", 1, vec![metrics(0, 10, 4, 3), metrics(1, 20, 0, 5)]),
            // A streamed output seen before its stage finished.
            output("b", 0, vec![metrics(0, 7, 0, 1)]),
            output("b", 0, vec![metrics(0, 7, 0, 2)]),
        ];
        let want =
            cfg.request_flops(10, 4, 3) + cfg.request_flops(20, 0, 5) + cfg.request_flops(7, 0, 2);
        let models = vec![Some(cfg.clone()), Some(cfg.clone())];
        assert_eq!(run_flops(&models, &outputs), Some(want));
        assert_eq!(run_flops(&[Some(cfg), None], &outputs), None);
    }
}
