//! Profiling your own libtorch code with omni-profiler alone: two windows
//! recorded as if by two stages (stage 0 with the `torch` backend, stage 1
//! with `chrome`), a request passed between them, then the trace tools:
//! the summary printed and all stages merged into one timeline.
//!
//! Run: `VLLM_TORCH_PROFILER_DIR=/tmp/traces cargo run -p omni-profiler --example profile_tch`
//! (a temporary directory when the variable is unset). Open the merged file
//! in <https://ui.perfetto.dev>.
use omni_profiler::tools::{merge, summarize};
use omni_profiler::{
    backend_by_name, profiler_dir_from_env, ProfileOptions, ProfileSession, Result,
};
use tch::{Device, Kind, Tensor};
use tracing_subscriber::prelude::*;

/// One engine step, marked with the spans the engine uses.
fn step(n: u64, w: &Tensor, request_ids: &str) {
    let _step = tracing::info_span!(target: "omni::engine", "step", step = n).entered();
    tracing::info_span!(target: "omni::engine", "schedule").in_scope(|| {});
    let logits = tracing::info_span!(target: "omni::engine", "forward",
                                     phase = "decode", batch_size = 2u64, num_tokens = 2u64)
    .in_scope(|| {
        let x = Tensor::randn([2, 256], (Kind::Float, Device::cuda_if_available()));
        x.matmul(w).relu()
    });
    let _token =
        tracing::info_span!(target: "omni::engine", "sample").in_scope(|| logits.argmax(-1, false));
    tracing::info_span!(target: "omni::runtime", "stage_send", request_ids).in_scope(|| {});
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    // On the main thread, first: Kineto starts up only where libtorch loaded.
    omni_profiler::init_main_thread()?;
    tracing_subscriber::registry()
        .with(omni_profiler::tracing_layer())
        .init();
    let root = profiler_dir_from_env().unwrap_or_else(|_| {
        std::env::temp_dir().join(format!("omni-profile-demo-{}", std::process::id()))
    });
    let options = ProfileOptions::from_env()?;
    let w = Tensor::randn([256, 256], (Kind::Float, Device::cuda_if_available()));

    let s0 = ProfileSession::for_stage(&root, 0, "thinker", "demo-model", options);
    let torch = backend_by_name("torch")?;
    torch.start(&s0).await?;
    for n in 1..=3 {
        step(n, &w, "req-0,req-1");
    }
    println!("stage 0: {:?}", torch.stop().await?);

    let s1 = ProfileSession::for_stage(&root, 1, "talker", "demo-model", options);
    let chrome = backend_by_name("chrome")?;
    chrome.start(&s1).await?;
    tracing::info_span!(target: "omni::runtime", "stage_recv", request_ids = "req-0,req-1")
        .in_scope(|| {});
    for n in 1..=2 {
        step(n, &w, "req-0,req-1");
    }
    println!("stage 1: {:?}", chrome.stop().await?);

    println!("{}", summarize(&root)?);
    let merged = merge(&root, &root.join("merged.json"))?;
    println!("merged: {}", merged.display());
    Ok(())
}
