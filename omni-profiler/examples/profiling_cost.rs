//! What profiling costs, in one process, side by side in one run: a
//! decode-like step (SmolLM2-135M's shapes: 30 layers of attention
//! projections and MLP on one token, about 270 MFLOP) marked with the
//! engine's spans, timed under five configurations, interleaved round by
//! round so that machine noise hits all of them alike:
//!
//! * `no layer`      — a subscriber without the profiler layer;
//! * `layer, off`    — the profiler layer installed, no window open;
//! * `noop`          — the layer and an open `noop` window;
//! * `chrome`        — an open `chrome` window (spans recorded);
//! * `torch`         — an open `torch` window (Kineto records every op).
//!
//! Also the latency of `start` and `stop` (stop includes writing the trace),
//! and, robust to a noisy machine, the cost of one span (enter + exit with
//! three fields, as `forward`) under each configuration: the minimum over
//! repetitions of a tight loop. The step has 5 spans, so a configuration's
//! share of a step is 5 x that cost / the step time.
//! Run: `cargo run -p omni-profiler --example profiling_cost [steps] [rounds]`.
use std::time::Instant;

use omni_profiler::{backend_by_name, ProfileOptions, ProfileSession, Profiler, Result};
use tch::{Device, Kind, Tensor};
use tracing_subscriber::prelude::*;

const HIDDEN: i64 = 576;
const INTER: i64 = 1536;
const LAYERS: usize = 30;

struct Weights {
    layers: Vec<[Tensor; 7]>,
}

impl Weights {
    fn new(device: Device) -> Self {
        let w = |a: i64, b: i64| Tensor::randn([a, b], (Kind::Float, device)) * 0.02;
        let layers = (0..LAYERS)
            .map(|_| {
                [
                    w(HIDDEN, HIDDEN),
                    w(HIDDEN, 192),
                    w(HIDDEN, 192),
                    w(HIDDEN, HIDDEN),
                    w(HIDDEN, INTER),
                    w(HIDDEN, INTER),
                    w(INTER, HIDDEN),
                ]
            })
            .collect();
        Weights { layers }
    }
}

fn step(n: u64, weights: &Weights, device: Device) {
    let _step = tracing::info_span!(target: "omni::engine", "step", step = n).entered();
    tracing::info_span!(target: "omni::engine", "schedule").in_scope(|| {});
    let h = tracing::info_span!(target: "omni::engine", "forward",
                                phase = "decode", batch_size = 1u64, num_tokens = 1u64)
    .in_scope(|| {
        let mut h = Tensor::randn([1, HIDDEN], (Kind::Float, device));
        for [q, k, v, o, gate, up, down] in &weights.layers {
            let _k = h.matmul(k);
            let _v = h.matmul(v);
            h = h.matmul(q).matmul(o) + &h;
            let mlp = (h.matmul(gate).silu() * h.matmul(up)).matmul(down);
            h += mlp;
        }
        h
    });
    let _token =
        tracing::info_span!(target: "omni::engine", "sample").in_scope(|| h.argmax(-1, false));
    tracing::info_span!(target: "omni::runtime", "stage_send", request_ids = "req-0")
        .in_scope(|| {});
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(30);
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let device = Device::cuda_if_available();
    let _guard = tch::no_grad_guard();
    let weights = Weights::new(device);
    let plain = tracing_subscriber::registry();
    let with_layer = tracing_subscriber::registry().with(omni_profiler::tracing_layer());
    let with_layer = tracing::Dispatch::new(with_layer);
    let plain = tracing::Dispatch::new(plain);
    let root = std::env::temp_dir().join(format!("omni-profiling-cost-{}", std::process::id()));
    let session = ProfileSession::for_stage(
        &root,
        0,
        "bench",
        "smollm2-shapes",
        ProfileOptions::default(),
    );

    let configs = ["no layer", "layer, off", "noop", "chrome", "torch"];
    let mut per_step: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut start_ms: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut stop_ms: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    // Warm-up: allocator, kernels, Kineto's first init.
    tracing::dispatcher::with_default(&with_layer, || {
        for n in 0..3 {
            step(n, &weights, device)
        }
    });
    for _round in 0..rounds {
        for (i, config) in configs.iter().enumerate() {
            let dispatch = if i == 0 { &plain } else { &with_layer };
            let profiler: Option<std::sync::Arc<dyn Profiler>> = match *config {
                "noop" | "chrome" | "torch" => Some(backend_by_name(config)?),
                _ => None,
            };
            let _default = tracing::dispatcher::set_default(dispatch);
            if let Some(p) = &profiler {
                let t = Instant::now();
                p.start(&session).await?;
                start_ms[i].push(t.elapsed().as_secs_f64() * 1e3);
            }
            let t = Instant::now();
            for n in 0..steps {
                step(n as u64, &weights, device);
            }
            per_step[i].push(t.elapsed().as_secs_f64() * 1e3 / steps as f64);
            if let Some(p) = &profiler {
                let t = Instant::now();
                p.stop().await?;
                stop_ms[i].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let base = median(&mut per_step[0].clone());
    let off = median(&mut per_step[1].clone());
    println!("device {device:?}, {steps} steps x {rounds} rounds, median of rounds");
    println!(
        "| configuration | ms/step | tokens/s | vs no layer | vs layer off | start ms | stop ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (i, config) in configs.iter().enumerate() {
        let ms = median(&mut per_step[i]);
        let fmt_lat = |v: &mut Vec<f64>| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.2}", median(v))
            }
        };
        println!(
            "| {config} | {ms:.2} | {:.1} | {:+.1}% | {:+.1}% | {} | {} |",
            1e3 / ms,
            (ms / base - 1.0) * 100.0,
            (ms / off - 1.0) * 100.0,
            fmt_lat(&mut start_ms[i]),
            fmt_lat(&mut stop_ms[i]),
        );
    }

    // Per-span cost: a tight loop of spans, minimum over repetitions.
    const SPANS: usize = 100_000;
    println!();
    println!("| configuration | ns per span | share of a {base:.1} ms step (5 spans) |");
    println!("|---|---:|---:|");
    let mut no_layer_ns = 0.0;
    for (i, config) in configs.iter().enumerate() {
        let dispatch = if i == 0 { &plain } else { &with_layer };
        let profiler: Option<std::sync::Arc<dyn Profiler>> = match *config {
            "noop" | "chrome" | "torch" => Some(backend_by_name(config)?),
            _ => None,
        };
        let _default = tracing::dispatcher::set_default(dispatch);
        let mut best = f64::INFINITY;
        for _rep in 0..5 {
            if let Some(p) = &profiler {
                p.start(&session).await?;
            }
            let t = Instant::now();
            for n in 0..SPANS {
                let _f = tracing::info_span!(target: "omni::engine", "forward",
                                             phase = "decode", batch_size = n, num_tokens = 1u64)
                .entered();
            }
            best = best.min(t.elapsed().as_secs_f64() * 1e9 / SPANS as f64);
            if let Some(p) = &profiler {
                p.stop().await?;
            }
        }
        if i == 0 {
            no_layer_ns = best;
        }
        println!(
            "| {config} | {best:.0} | {:.4}% |",
            5.0 * (best - no_layer_ns) / (base * 1e6) * 100.0
        );
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
