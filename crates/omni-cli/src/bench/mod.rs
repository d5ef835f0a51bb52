//! `omni bench`: end-to-end pipeline throughput and serving latency. These
//! are benchmarks, not tests: they print numbers (and JSON with --json) for
//! BENCHMARKS.md.
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use omni_core::{AsyncOmni, ChatMessage, OmniEngineArgs, OmniLLM, Prompt};

use crate::sampling_flags::SamplingFlags;
use crate::{http_client, progress, serve};

/// Benchmarks: pipeline throughput, serving latency.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// End-to-end throughput (prompts/s, generated tok/s over all final
    /// stages) of a pipeline run through OmniLLM, for batches of prompts.
    #[command(
        after_help = "Example:\n  omni bench pipeline --pipeline default --prompts 16,64 --max-tokens 32 --ignore-eos"
    )]
    Pipeline(PipelineBench),
    /// Requests/s and time to first token of `omni serve` (started in
    /// process on a loopback port) at several numbers of concurrent
    /// streaming clients.
    #[command(
        after_help = "Example:\n  omni bench serve --pipeline default --concurrency 1,8,32 --max-tokens 16"
    )]
    Serve(ServeBench),
}

/// Flags of `omni bench pipeline`.
#[derive(Args, Debug)]
pub struct PipelineBench {
    /// A built-in pipeline or a pipeline file.
    #[arg(long, default_value = omni_core::DEFAULT_PIPELINE)]
    pub pipeline: String,
    /// Batch sizes to run, e.g. 16,64.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    pub prompts: Vec<usize>,
    /// Print one JSON object per batch size.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sampling: SamplingFlags,
}

/// Flags of `omni bench serve`.
#[derive(Args, Debug)]
pub struct ServeBench {
    /// A built-in pipeline or a pipeline file.
    #[arg(long, default_value = omni_core::DEFAULT_PIPELINE)]
    pub pipeline: String,
    /// Numbers of concurrent clients, e.g. 1,8,32.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub concurrency: Vec<usize>,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 2)]
    pub requests_per_client: usize,
    /// max_tokens of every request (all stages).
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Print one JSON object per concurrency.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Pipeline(b) => pipeline(b),
        BenchCommand::Serve(b) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(serve_bench(b))
        }
    }
}

/// Varied questions, so batches are not one prompt repeated.
const TOPICS: [&str; 16] = [
    "the ocean",
    "volcanoes",
    "honey bees",
    "the moon",
    "bicycles",
    "rainbows",
    "coffee",
    "penguins",
    "libraries",
    "thunderstorms",
    "chess",
    "bread",
    "glaciers",
    "owls",
    "trains",
    "gardens",
];

/// The i-th benchmark prompt.
pub fn bench_prompt(i: usize) -> String {
    format!(
        "Tell me one interesting fact about {}.",
        TOPICS[i % TOPICS.len()]
    )
}

fn pipeline(b: PipelineBench) -> anyhow::Result<()> {
    let omni = progress::with_spinner(
        format!("starting pipeline {:?}", b.pipeline),
        |_: &OmniLLM| "pipeline ready".to_string(),
        || OmniLLM::from_engine_args(OmniEngineArgs::new(&b.pipeline)),
    )
    .with_context(|| format!("starting pipeline {:?}", b.pipeline))?;
    let params = b.sampling.resolve(omni.default_sampling_params())?;
    // Warm-up: first-call costs (allocator, kernels) out of the numbers.
    omni.generate([chat(&bench_prompt(0))], params.clone())
        .context("warm-up")?;
    if !b.json {
        println!("| prompts | wall s | prompts/s | generated tok/s | tokens |");
        println!("|---:|---:|---:|---:|---:|");
    }
    for &n in &b.prompts {
        let prompts: Vec<Prompt> = (0..n).map(|i| chat(&bench_prompt(i))).collect();
        let start = Instant::now();
        let outputs = omni
            .generate(prompts, params.clone())
            .context("generating")?;
        let wall = start.elapsed().as_secs_f64();
        let tokens: usize = outputs.iter().map(|o| o.token_ids.len()).sum();
        if b.json {
            println!(
                "{}",
                serde_json::json!({"system": "omni", "prompts": n, "wall_s": wall,
                    "prompts_per_s": n as f64 / wall, "tok_per_s": tokens as f64 / wall, "tokens": tokens})
            );
        } else {
            println!(
                "| {n} | {wall:.2} | {:.2} | {:.1} | {tokens} |",
                n as f64 / wall,
                tokens as f64 / wall
            );
        }
    }
    omni.shutdown().context("stopping the pipeline")?;
    Ok(())
}

fn chat(text: &str) -> Prompt {
    Prompt::Chat(vec![ChatMessage {
        role: "user".into(),
        content: text.into(),
    }])
}

async fn serve_bench(b: ServeBench) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding loopback")?;
    let addr = listener.local_addr()?.to_string();
    let bar = progress::spinner(format!("starting pipeline {:?}", b.pipeline));
    let omni = AsyncOmni::from_engine_args(OmniEngineArgs::new(&b.pipeline)).await;
    bar.finish_and_clear();
    let omni = omni.with_context(|| format!("starting pipeline {:?}", b.pipeline))?;
    let state = Arc::new(serve::AppState::new(omni, &b.pipeline));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve::serve(
        listener,
        state,
        async move {
            let _ = stop_rx.await;
        },
        Duration::from_secs(30),
    ));
    let body = |i: usize| {
        serde_json::json!({
            "model": b.pipeline,
            "messages": [{"role": "user", "content": bench_prompt(i)}],
            "max_tokens": b.max_tokens,
            "ignore_eos": true,
            "stream": true,
        })
    };
    // Warm-up.
    http_client::post_stream(&addr, "/v1/chat/completions", &body(0)).await?;
    if !b.json {
        println!("| clients | requests | wall s | requests/s | TTFT mean ms | TTFT p50 ms | TTFT max ms |");
        println!("|---:|---:|---:|---:|---:|---:|---:|");
    }
    for &c in &b.concurrency {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for client in 0..c {
            let addr = addr.clone();
            let bodies: Vec<_> = (0..b.requests_per_client)
                .map(|r| body(client * 7 + r))
                .collect();
            tasks.push(tokio::spawn(async move {
                let mut ttfts = Vec::new();
                for body in bodies {
                    let t = http_client::post_stream(&addr, "/v1/chat/completions", &body).await?;
                    ttfts.push(t.ttft.unwrap_or(t.total));
                }
                anyhow::Ok(ttfts)
            }));
        }
        let mut ttfts = Vec::new();
        for t in tasks {
            ttfts.extend(t.await.context("client task")??);
        }
        let wall = start.elapsed().as_secs_f64();
        ttfts.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mean = ttfts.iter().map(|d| ms(*d)).sum::<f64>() / ttfts.len().max(1) as f64;
        let p50 = ttfts.get(ttfts.len() / 2).map_or(0.0, |d| ms(*d));
        let max = ttfts.last().map_or(0.0, |d| ms(*d));
        let n = ttfts.len();
        if b.json {
            println!(
                "{}",
                serde_json::json!({"clients": c, "requests": n, "wall_s": wall, "requests_per_s": n as f64 / wall,
                    "ttft_mean_ms": mean, "ttft_p50_ms": p50, "ttft_max_ms": max})
            );
        } else {
            println!(
                "| {c} | {n} | {wall:.2} | {:.2} | {mean:.0} | {p50:.0} | {max:.0} |",
                n as f64 / wall
            );
        }
    }
    let _ = stop_tx.send(());
    server.await.context("server task")??;
    Ok(())
}
