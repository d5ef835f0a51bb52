//! Offline inference with every stage profiled, as in the profiling
//! guide's "Basic Usage (All Stages)":
//!
//! ```bash
//! export VLLM_TORCH_PROFILER_DIR=/tmp/omni-traces
//! cargo run --example offline_all_stages
//! ```
//!
//! Without `VLLM_TORCH_PROFILER_DIR` it uses `$TMPDIR/omni-traces`.
use omni_core::{OmniEngineArgs, OmniLLM, Prompt, SamplingParams};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = profiler_dir();
    println!("traces go to {}", dir.display());

    let omni_llm = OmniLLM::from_engine_args(OmniEngineArgs::new("default"))?;

    // Start profiling all active stages.
    omni_llm.start_profile(None)?;

    let prompts: Vec<Prompt> = ["What is the tallest mountain?", "Why do cats purr?"]
        .into_iter()
        .map(Prompt::from)
        .collect();
    let sampling_params = SamplingParams {
        max_tokens: Some(32),
        ..SamplingParams::greedy()
    };
    let outputs = omni_llm.generate(prompts, sampling_params)?;

    // Stop profiling and save traces.
    let traces = omni_llm.stop_profile()?;

    for out in &outputs {
        println!(
            "[request {} | stage {}] {}",
            out.request_id,
            out.stage_id,
            out.text.trim()
        );
    }
    for (stage, paths) in &traces {
        for p in paths {
            println!("stage {stage} trace: {}", p.display());
        }
    }
    println!("open them in https://ui.perfetto.dev or chrome://tracing");
    Ok(())
}

/// `$VLLM_TORCH_PROFILER_DIR`, set to a default when missing (before any
/// stage process starts, so they inherit it).
fn profiler_dir() -> std::path::PathBuf {
    match std::env::var_os("VLLM_TORCH_PROFILER_DIR") {
        Some(d) if !d.is_empty() => d.into(),
        _ => {
            let d = std::env::temp_dir().join("omni-traces");
            std::env::set_var("VLLM_TORCH_PROFILER_DIR", &d);
            d
        }
    }
}
