//! Offline inference profiling only stage 1, as in the profiling guide's
//! "Selective Stage Profiling":
//!
//! ```bash
//! export VLLM_TORCH_PROFILER_DIR=/tmp/omni-traces
//! cargo run --example offline_selected_stage
//! ```
//!
//! Without `VLLM_TORCH_PROFILER_DIR` it uses `$TMPDIR/omni-traces`.
use omni_core::{OmniEngineArgs, OmniLLM, SamplingParams};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("VLLM_TORCH_PROFILER_DIR").is_none_or(|d| d.is_empty()) {
        std::env::set_var(
            "VLLM_TORCH_PROFILER_DIR",
            std::env::temp_dir().join("omni-traces"),
        );
    }
    let omni_llm = OmniLLM::from_engine_args(OmniEngineArgs::new("default"))?;

    // Only profile stage 1 (the summarizer).
    omni_llm.start_profile(Some(&[1]))?;

    // One SamplingParams per stage: a longer answer, a short summary.
    let per_stage = vec![
        SamplingParams {
            max_tokens: Some(48),
            ..SamplingParams::greedy()
        },
        SamplingParams {
            max_tokens: Some(24),
            ..SamplingParams::greedy()
        },
    ];
    let outputs = omni_llm.generate(["Explain what a compiler does."], per_stage)?;
    let traces = omni_llm.stop_profile()?;

    for out in &outputs {
        let m = out.metrics.stage(out.stage_id);
        println!(
            "[stage {}] {} ({} tokens, compute {:.2}s)",
            out.stage_id,
            out.text.trim(),
            out.token_ids.len(),
            m.map_or(0.0, |m| m.compute_time.as_secs_f64())
        );
    }
    for (stage, paths) in &traces {
        for p in paths {
            println!("stage {stage} trace: {}", p.display());
        }
    }
    Ok(())
}
