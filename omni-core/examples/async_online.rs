//! Online (async) inference with profiling toggled while requests stream,
//! as in the profiling guide's "Online Inference (Async)":
//!
//! ```bash
//! export VLLM_TORCH_PROFILER_DIR=/tmp/omni-traces
//! cargo run --example async_online
//! ```
//!
//! Without `VLLM_TORCH_PROFILER_DIR` it uses `$TMPDIR/omni-traces`.
use futures::StreamExt;
use omni_core::{AsyncOmni, OmniEngineArgs, Prompt, SamplingParams};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("VLLM_TORCH_PROFILER_DIR").is_none_or(|d| d.is_empty()) {
        std::env::set_var(
            "VLLM_TORCH_PROFILER_DIR",
            std::env::temp_dir().join("omni-traces"),
        );
    }
    let async_omni = AsyncOmni::from_engine_args(OmniEngineArgs::new("default")).await?;

    async_omni.start_profile(None).await?;

    let sampling_params = SamplingParams {
        max_tokens: Some(32),
        ..SamplingParams::greedy()
    };
    let prompt = Prompt::from("Write a haiku about the sea.");
    let mut stream = async_omni
        .generate(prompt, sampling_params, "request-0")
        .await?;
    let mut current_stage = None;
    while let Some(output) = stream.next().await {
        let output = output?;
        if current_stage != Some(output.stage_id) {
            current_stage = Some(output.stage_id);
            print!("\n[stage {}] ", output.stage_id);
        }
        print!("{}", output.delta_text);
    }
    println!();

    let traces = async_omni.stop_profile().await?;
    for (stage, paths) in &traces {
        for p in paths {
            println!("stage {stage} trace: {}", p.display());
        }
    }
    async_omni.shutdown().await?;
    Ok(())
}
