//! `cargo bench -p omni-engine --bench quant`: where `weight_precision: q4`
//! should hand a step from GGUF's blocks to the fp16 copy.
//!
//! SmolLM2-135M on CPU, decode steps of B sequences (B = 1..48), three
//! engines in one process on the same threads: `fp16` (fbgemm), `q4` with
//! every call on the blocks (`quant_max_rows` unbounded), and `q4` as
//! shipped (`QUANT_MAX_ROWS`). Each row is the best of 3 rounds of 16 decode
//! steps after the prompts are in; prefix caching off. Prints a Markdown
//! table and the smallest B at which fp16 beats the blocks.
//!
//! Environment: `OMNI_BENCH_THREADS` (default 2), `OMNI_MODEL_DIR`.
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use omni_engine::{ChatMessage, EngineArgs, LLMEngine, Prompt, SamplingParams, QUANT_MAX_ROWS};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const BATCHES: [usize; 9] = [1, 2, 3, 4, 6, 8, 12, 16, 48];
const STEPS: usize = 16;

fn threads() -> usize {
    std::env::var("OMNI_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
}

fn engine(precision: &str, max_rows: Option<usize>) -> Res<LLMEngine> {
    let model = omni_engine::resolve_model_path("smollm2")?;
    Ok(LLMEngine::new(&EngineArgs {
        model: model.display().to_string(),
        device: Some("cpu".into()),
        weight_precision: Some(precision.into()),
        quant_max_rows: max_rows,
        num_threads: Some(threads()),
        enable_prefix_caching: false,
        ..EngineArgs::default()
    })?)
}

/// Decode tokens per second of `batch` sequences: the prompts are run
/// first, then `STEPS` steps of one token per sequence are timed.
fn decode_rate(engine: &mut LLMEngine, batch: usize, round: usize) -> Res<f64> {
    for i in 0..batch {
        let msg = ChatMessage::new("user", format!("Tell me about the number {i}."));
        engine.add_request(
            format!("r{round}-{i}"),
            Prompt::Chat(vec![msg]),
            SamplingParams {
                max_tokens: Some(STEPS + 1),
                ignore_eos: true,
                ..SamplingParams::greedy()
            },
        )?;
    }
    // Prefill (and the first token) until every sequence has one token.
    let mut started = 0;
    while started < batch {
        started += engine
            .step()?
            .iter()
            .filter(|o| o.token_ids.len() == 1)
            .count();
    }
    let t = Instant::now();
    let mut tokens = 0;
    while engine.has_unfinished() {
        tokens += engine.step()?.len();
    }
    Ok(tokens as f64 / t.elapsed().as_secs_f64())
}

/// The kernels alone: `x W^T` for one activation row against SmolLM2's
/// matrix shapes in Q4_1 (and its Q8_0 head), random blocks, per build:
/// GB/s of blocks read and weights per ns (best of 20 calls).
fn kernels() -> Res<()> {
    use omni_engine::quant::{
        with_kernel_build, Activations, KernelBuild, QuantMatrix, QuantizedTensor,
    };
    use omni_engine::GgmlType;
    tch::set_num_threads(threads() as i32);
    let shapes = [
        ("qkv 960x576 Q4_1", GgmlType::Q4_1, 960, 576),
        ("gate_up 3072x576 Q4_1", GgmlType::Q4_1, 3072, 576),
        ("down 576x1536 Q4_1", GgmlType::Q4_1, 576, 1536),
        ("head 49152x576 Q8_0", GgmlType::Q8_0, 49152, 576),
    ];
    println!("| matrix | build | activations | rows | us/call | GB/s | weights/ns |");
    println!("|---|---|---|---|---|---|---|");
    for (name, ty, n, k) in shapes {
        let (elems, bytes) = ty.block().ok_or("layout")?;
        let row_bytes = k as u64 / elems * bytes;
        // Random bytes with a small finite fp16 scale in every block.
        let mut raw: Vec<u8> = (0..n as u64 * row_bytes)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect();
        for blk in raw.chunks_mut(bytes as usize) {
            blk[0] = 0x00;
            blk[1] = 0x20;
        }
        let q = QuantizedTensor {
            ggml_type: ty,
            shape: [n, k],
            bytes: tch::Tensor::from_slice(&raw).reshape([n, row_bytes as i64]),
        };
        let m = QuantMatrix::new(&[&q])?;
        let runs = KernelBuild::detected()
            .up_to()
            .into_iter()
            .flat_map(|b| [(b, Activations::Fp32), (b, Activations::Int8)]);
        for (build, activations) in runs {
            for rows in [1i64, 2, 4] {
                let x = tch::Tensor::randn([rows, k], (tch::Kind::Float, tch::Device::Cpu));
                let best = with_kernel_build(build, || -> Res<f64> {
                    let mut best = f64::MAX;
                    for _ in 0..20 {
                        let t = Instant::now();
                        let _ = m.linear_with(&x, None, activations)?;
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    Ok(best)
                })?;
                let total = (n as u64 * row_bytes) as f64;
                println!(
                    "| {name} | {build:?} | {activations:?} | {rows} | {:.0} | {:.1} | {:.2} |",
                    best * 1e6,
                    total / best / 1e9,
                    (n * k) as f64 / best / 1e9
                );
            }
        }
    }
    println!();
    Ok(())
}

fn main() -> Res<()> {
    kernels()?;
    if std::env::var("OMNI_BENCH_KERNELS_ONLY").is_ok() {
        return Ok(());
    }
    let configs = [
        ("fp16", "fp16", None),
        ("q4, blocks only", "q4", Some(usize::MAX)),
        ("q4 (shipped)", "q4", None),
        ("q4-int8, blocks only", "q4-int8", Some(usize::MAX)),
        ("q4-int8 (shipped)", "q4-int8", None),
    ];
    let bar = ProgressBar::new((configs.len() * BATCHES.len()) as u64).with_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut table: Vec<Vec<f64>> = Vec::new();
    for (name, precision, max_rows) in configs {
        bar.set_message(name);
        let mut e = engine(precision, max_rows)?;
        decode_rate(&mut e, 2, 0)?; // warm-up
        let mut row = Vec::new();
        for &b in &BATCHES {
            let best = (1..=3)
                .map(|r| decode_rate(&mut e, b, r))
                .collect::<Res<Vec<f64>>>()?
                .into_iter()
                .fold(0.0, f64::max);
            row.push(best);
            bar.inc(1);
        }
        table.push(row);
    }
    bar.finish_and_clear();
    println!(
        "threads: {}; decode tok/s, best of 3 rounds of {STEPS} steps; QUANT_MAX_ROWS = {QUANT_MAX_ROWS}\n",
        threads()
    );
    print!("| engine |");
    for b in BATCHES {
        print!(" B={b} |");
    }
    println!();
    println!("|---|{}", "---|".repeat(BATCHES.len()));
    for ((name, _, _), row) in configs.iter().zip(&table) {
        print!("| {name} |");
        for v in row {
            print!(" {v:.1} |");
        }
        println!();
    }
    let crossover = BATCHES
        .iter()
        .zip(table[0].iter().zip(&table[1]))
        .find(|(_, (fp16, q4))| fp16 > q4)
        .map(|(b, _)| *b);
    match crossover {
        Some(b) => println!("\nfp16 first beats the blocks at B = {b}"),
        None => println!(
            "\nthe blocks stay ahead of fp16 up to B = {}",
            BATCHES[BATCHES.len() - 1]
        ),
    }
    Ok(())
}
