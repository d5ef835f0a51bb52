//! `omni bench serve`: requests/s and time to first token of the HTTP
//! server at several numbers of concurrent streaming clients.
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use omni_core::OmniEngineArgs;

use super::{bench_prompt, LocalServer};
use crate::http_client;

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

pub(super) async fn run(b: ServeBench) -> anyhow::Result<()> {
    let server = LocalServer::start(OmniEngineArgs::new(&b.pipeline)).await?;
    let addr = server.addr.clone();
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
    server.stop().await
}
