//! `cargo bench -p omni-engine --bench engine`: SmolLM2-135M on CPU, our
//! engine (each weight precision) side by side with HF transformers
//! `generate` (fp32, same GGUF weights) and llama.cpp (llama-cpp-python, same
//! GGUF), with the same thread count, in one run.
//!
//! Each engine configuration runs in its own child process, so peak RSS
//! (VmHWM) is its own. Prints a Markdown table (paste it into BENCHMARKS.md).
//!
//! Each row also says how many bytes of weights a decode step reads per
//! token and what share of the read-bandwidth limit (measured in the same
//! run: summing a 1 GiB buffer on the same threads) its single-request rate
//! is.
//!
//! Environment: `OMNI_BENCH_THREADS` (default 2), `OMNI_BENCH_SKIP`
//! (comma list of `hf`, `llamacpp`, `native`, `fp16`, `q4`, `q4-int8`,
//! `q4-ops`: `q4` with `OMNI_FUSED_DECODE=0`),
//! `OMNI_MODEL_DIR`.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use omni_engine::{ChatMessage, EngineArgs, GgufFile, LLMEngine, Prompt, SamplingParams};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const SINGLE_TOKENS: usize = 128;
/// Runs of the single request; its figures are their medians.
const SINGLE_RUNS: usize = 5;
const BATCH_PROMPTS: usize = 16;
const BATCH_TOKENS: usize = 64;
/// Requests of the mixed workload (`OMNI_BENCH_MIXED` overrides, for loaded machines).
fn mixed_requests() -> usize {
    std::env::var("OMNI_BENCH_MIXED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64)
}
const AGREE_TOKENS: usize = 32;

const TOPICS: &[&str] = &[
    "Explain how a bicycle stays upright.",
    "Write a short poem about the sea.",
    "What is the capital of France, and why is it famous?",
    "Give three tips for learning a new language.",
    "Describe the water cycle to a child.",
    "Why is the sky blue?",
    "Summarize the plot of a detective story in a few sentences.",
    "List some healthy breakfast ideas.",
    "How do computers store numbers?",
    "What makes a good friend?",
    "Tell me a fun fact about octopuses.",
    "How does a rainbow form?",
    "Write a haiku about autumn leaves.",
    "What should I pack for a weekend hiking trip?",
    "Explain gravity in simple words.",
    "Describe your ideal city.",
];

fn gguf_path() -> PathBuf {
    // Where `scripts/setup` put it ($OMNI_MODEL_DIR, else the cache); the
    // error when it is missing comes from `main`.
    omni_engine::resolve_model_path("smollm2")
        .unwrap_or_else(|_| omni_engine::model_dir().join(omni_engine::SMOLLM2.file_name))
}

fn threads() -> usize {
    std::env::var("OMNI_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Read bandwidth in GB/s: the best of 5 sums of a 1 GiB fp32 buffer on
/// the bench's threads (what a decode step does with its weights).
fn read_bandwidth_gbs() -> f64 {
    tch::set_num_threads(threads() as i32);
    let n = 1i64 << 28;
    let buf = tch::Tensor::ones([n], (tch::Kind::Float, tch::Device::Cpu));
    let _ = buf.sum(tch::Kind::Float);
    (0..5)
        .map(|_| {
            let t = Instant::now();
            let _ = f64::try_from(buf.sum(tch::Kind::Float));
            (n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// Bytes of weights one decode step reads, per precision: every matrix
/// once (the tied head reads the whole embedding table; a lookup reads a
/// row, left out). `q4`, `q4-int8` and llama.cpp read the blocks as stored, `fp16`
/// two bytes a weight, `native` four.
fn weight_bytes_per_token(gguf: &GgufFile, precision: &str) -> u64 {
    gguf.tensors()
        .iter()
        .filter(|t| t.dims.len() == 2)
        .map(|t| match precision {
            "q4" | "q4-int8" => t.byte_len.unwrap_or(0),
            "fp16" => 2 * t.num_elements(),
            _ => 4 * t.num_elements(),
        })
        .sum()
}

/// Prompts as token ids, so every engine sees exactly the same input.
fn workload(engine: &LLMEngine) -> Res<Value> {
    let chat = |i: usize| -> Res<Vec<u32>> {
        let msg = ChatMessage::new("user", TOPICS[i % TOPICS.len()]);
        Ok(engine.encode_prompt(&Prompt::Chat(vec![msg]))?)
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2024);
    let mixed_prompts = (0..mixed_requests()).map(chat).collect::<Res<Vec<_>>>()?;
    let mixed_tokens: Vec<usize> = (0..mixed_requests())
        .map(|_| rng.random_range(16..=256))
        .collect();
    Ok(json!({
        "gguf": gguf_path(),
        "single": {"prompt": chat(0)?, "max_tokens": SINGLE_TOKENS},
        "batch16": {"prompts": (0..BATCH_PROMPTS).map(chat).collect::<Res<Vec<_>>>()?, "max_tokens": BATCH_TOKENS},
        "mixed": {"prompts": mixed_prompts, "max_tokens": mixed_tokens},
        "agree": {"prompts": (0..8).map(|i| chat(i + 3)).collect::<Res<Vec<_>>>()?, "max_tokens": AGREE_TOKENS},
    }))
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(n),
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

/// Runs requests to completion; returns (wall seconds, tokens per request).
fn serve(engine: &mut LLMEngine, reqs: &[(Vec<u32>, usize)]) -> Res<(f64, Vec<Vec<u32>>)> {
    let t0 = Instant::now();
    for (i, (p, n)) in reqs.iter().enumerate() {
        engine.add_request(i.to_string(), Prompt::TokenIds(p.clone()), greedy(*n))?;
    }
    let mut out = vec![Vec::new(); reqs.len()];
    while engine.has_unfinished() {
        for o in engine.step()? {
            if o.finished {
                let i: usize = o.request_id.parse()?;
                out[i] = o.token_ids;
            }
        }
    }
    Ok((t0.elapsed().as_secs_f64(), out))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

/// Child process: one engine configuration.
fn child(precision: &str, workload_path: &str) -> Res<()> {
    let w: Value = serde_json::from_str(&std::fs::read_to_string(workload_path)?)?;
    let args = EngineArgs {
        model: gguf_path().display().to_string(),
        device: Some("cpu".into()),
        weight_precision: Some(precision.into()),
        num_threads: Some(threads()),
        // The mixed workload repeats its 16 prompts; the references
        // recompute them, so omni does too. `omni bench pipeline` measures
        // prefix caching.
        enable_prefix_caching: false,
        // The CPU cache is zeroed (resident) at load, so peak RSS counts the
        // whole budget: 1 GiB holds every mixed request at its longest at
        // once (64 x (prompt + 256) tokens, ~0.93 GB of SmolLM2's K/V in
        // fp32), where the default (a quarter of memory, at most 2 GiB)
        // would report memory no workload here touches.
        kv_cache_memory_bytes: Some(1 << 30),
        ..EngineArgs::default()
    };
    let mut engine = LLMEngine::new(&args)?;
    let mut res = BTreeMap::new();

    // Single request: TTFT and decode rate from the request's own metrics,
    // the median of SINGLE_RUNS runs (one run is under a second, and this
    // VM's speed moves by a third between seconds).
    let p = ids(&w["single"]["prompt"]);
    serve(&mut engine, &[(p.clone(), 4)])?; // warm-up
    let (mut ttft, mut rate) = (Vec::new(), Vec::new());
    for run in 0..SINGLE_RUNS {
        let id = format!("single-{run}");
        engine.add_request(&id, Prompt::TokenIds(p.clone()), greedy(SINGLE_TOKENS))?;
        let mut last = None;
        while engine.has_unfinished() {
            for o in engine.step()? {
                if o.finished {
                    last = Some(o);
                }
            }
        }
        let o = last.ok_or("single request produced no output")?;
        let m = &o.metrics;
        let first = m.first_token_time.ok_or("no first token")?;
        let done = m.finished_time.ok_or("not finished")?;
        ttft.push((first - m.arrival_time).as_secs_f64() * 1e3);
        rate.push((o.token_ids.len() - 1) as f64 / (done - first).as_secs_f64());
        if run == 0 {
            res.insert("single_tokens", json!(o.token_ids));
        }
    }
    res.insert("single_ttft_ms", json!(median(&mut ttft)));
    res.insert("single_decode_tok_s", json!(median(&mut rate)));

    let b = &w["batch16"];
    let n = b["max_tokens"].as_u64().unwrap_or(64) as usize;
    let reqs: Vec<_> = b["prompts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| (ids(p), n))
        .collect();
    let (dt, outs) = serve(&mut engine, &reqs)?;
    res.insert(
        "batch16_tok_s",
        json!(outs.iter().map(Vec::len).sum::<usize>() as f64 / dt),
    );

    let m = &w["mixed"];
    let lens: Vec<usize> = m["max_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_u64())
        .map(|x| x as usize)
        .collect();
    let reqs: Vec<_> = m["prompts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(ids)
        .zip(lens)
        .collect();
    let (dt, outs) = serve(&mut engine, &reqs)?;
    res.insert(
        "mixed_tok_s",
        json!(outs.iter().map(Vec::len).sum::<usize>() as f64 / dt),
    );
    res.insert("mixed_wall_s", json!(dt));

    let a = &w["agree"];
    let n = a["max_tokens"].as_u64().unwrap_or(32) as usize;
    let reqs: Vec<_> = a["prompts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| (ids(p), n))
        .collect();
    let (_, outs) = serve(&mut engine, &reqs)?;
    res.insert("agree_tokens", json!(outs));
    res.insert("peak_rss_mb", json!(peak_rss_mb()));
    println!("{}", serde_json::to_string(&res)?);
    Ok(())
}

/// Fraction of greedy tokens equal to the reference's, counting each
/// sequence up to its first divergence (after it, the contexts differ).
fn agreement(a: &Value, b: &Value) -> f64 {
    let (a, b) = (a.as_array(), b.as_array());
    let (Some(a), Some(b)) = (a, b) else {
        return f64::NAN;
    };
    let mut same = 0;
    let mut total = 0;
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (ids(x), ids(y));
        total += x.len();
        same += x.iter().zip(&y).take_while(|(p, q)| p == q).count();
    }
    same as f64 / total.max(1) as f64
}

fn run_child(exe: &str, args: &[&str], env: &[(&str, &str)]) -> Value {
    eprintln!("[bench] running {}", args.join(" "));
    match Command::new(exe)
        .args(args)
        .envs(env.iter().copied())
        .output()
    {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            text.lines()
                .rev()
                .find_map(|l| serde_json::from_str(l).ok())
                .unwrap_or_else(|| json!({"error": format!("no JSON in output: {text}")}))
        }
        Ok(o) => {
            json!({"error": format!("{}: {}", o.status, String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or(""))})
        }
        Err(e) => json!({"error": e.to_string()}),
    }
}

fn main() -> Res<()> {
    let argv: Vec<String> = std::env::args().collect();
    if let Some(i) = argv.iter().position(|a| a == "--child") {
        let precision = argv.get(i + 1).ok_or("--child needs a precision")?;
        let path = argv.get(i + 2).ok_or("--child needs a workload path")?;
        return child(precision, path);
    }
    // `cargo bench` passes `--bench`; anything else runs the whole suite too.
    let skip = std::env::var("OMNI_BENCH_SKIP").unwrap_or_default();
    let skip: Vec<&str> = skip.split(',').collect();
    let gguf = gguf_path();
    if !gguf.exists() {
        return Err(format!("{} is missing; run scripts/setup", gguf.display()).into());
    }
    let engine = LLMEngine::new(&EngineArgs {
        model: gguf.display().to_string(),
        device: Some("cpu".into()),
        weight_precision: Some("native".into()),
        // Only its tokenizer and chat template are used: a small cache, not
        // the default one zeroed at load.
        kv_cache_memory_bytes: Some(16 << 20),
        ..EngineArgs::default()
    })?;
    let w = workload(&engine)?;
    drop(engine);
    let dir = tempfile_dir()?;
    let wpath = dir.join("workload.json");
    std::fs::write(&wpath, serde_json::to_string(&w)?)?;
    let wpath_s = wpath.display().to_string();
    let exe = argv[0].clone();
    let t = threads().to_string();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/engine_reference.py");
    let python = std::env::var("OMNI_VENV")
        .map(|v| format!("{v}/bin/python"))
        .unwrap_or_else(|_| "python3".into());

    let mut rows: Vec<(String, Value)> = Vec::new();
    for p in ["native", "fp16", "q4", "q4-int8"] {
        if !skip.contains(&p) {
            rows.push((
                format!("omni {p}"),
                run_child(&exe, &["--child", p, &wpath_s], &[]),
            ));
        }
    }
    // `q4` with a lone decoding token's layers op by op instead of one
    // call each: what the fused decode layer gains, in the same run.
    if !skip.contains(&"q4-ops") {
        rows.push((
            "omni q4, layers op by op".to_owned(),
            run_child(
                &exe,
                &["--child", "q4", &wpath_s],
                &[("OMNI_FUSED_DECODE", "0")],
            ),
        ));
    }
    for (name, which) in [
        ("HF transformers fp32", "hf"),
        ("llama.cpp Q4_1", "llamacpp"),
    ] {
        if skip.contains(&which) {
            continue;
        }
        eprintln!("[bench] running {which}");
        let out = Command::new(&python)
            .arg(&script)
            .arg(which)
            .args(["--workload", &wpath_s, "--threads", &t])
            .output();
        let v = match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout)
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str(l).ok())
                .unwrap_or_else(|| json!({"error": String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("no output").to_owned()})),
            Err(e) => json!({"error": e.to_string()}),
        };
        eprintln!("[bench] {name}: {v}");
        rows.push((name.to_owned(), v));
    }

    let reference = rows
        .iter()
        .find(|(n, _)| n == "omni native")
        .map(|(_, v)| v.clone());
    let bandwidth = read_bandwidth_gbs();
    let file = GgufFile::open(&gguf)?;
    let f = |v: &Value, k: &str, digits: usize| {
        v[k].as_f64()
            .map(|x| format!("{x:.digits$}"))
            .unwrap_or_else(|| "–".into())
    };
    println!(
        "threads: {t}; single = 1 chat prompt x {SINGLE_TOKENS} tokens; batch = {BATCH_PROMPTS} prompts x {BATCH_TOKENS} tokens; mixed = {} requests, output 16..=256 tokens (seed 2024)\n",
        mixed_requests()
    );
    println!("read bandwidth: {bandwidth:.1} GB/s (sum of a 1 GiB buffer on {t} threads)\n");
    println!("| engine | single decode tok/s | weights MB/token | share of bandwidth limit | TTFT ms | 16x64 tok/s | mixed 64 tok/s | mixed wall s | peak RSS MB | greedy agreement vs omni fp32 |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, v) in &rows {
        // The single request decodes at batch one, where `q4-int8` quantizes
        // activations; the batch of 8 does not.
        let single = |r: &Value| {
            format!(
                "{:.1}% (single)",
                100.0 * agreement(&json!([v["single_tokens"]]), &json!([r["single_tokens"]]))
            )
        };
        let agree = match (&reference, name.starts_with("omni")) {
            (Some(r), true) => format!(
                "{:.1}% (8x{AGREE_TOKENS}), {}",
                100.0 * agreement(&v["agree_tokens"], &r["agree_tokens"]),
                single(r)
            ),
            (Some(r), false) => single(r),
            _ => "–".into(),
        };
        if let Some(e) = v["error"].as_str() {
            println!("| {name} | error: {e} |||||||||");
            continue;
        }
        let precision = match name.as_str() {
            "omni native" => Some("native"),
            "omni fp16" => Some("fp16"),
            "omni q4" | "omni q4-int8" | "omni q4, layers op by op" | "llama.cpp Q4_1" => {
                Some("q4")
            }
            _ => None,
        };
        let (mb, share) = match (precision, v["single_decode_tok_s"].as_f64()) {
            (Some(p), Some(rate)) => {
                let bytes = weight_bytes_per_token(&file, p) as f64;
                (
                    format!("{:.0}", bytes / 1e6),
                    format!("{:.0}%", 100.0 * rate * bytes / (bandwidth * 1e9)),
                )
            }
            _ => ("–".into(), "–".into()),
        };
        println!(
            "| {name} | {} | {mb} | {share} | {} | {} | {} | {} | {} | {agree} |",
            f(v, "single_decode_tok_s", 1),
            f(v, "single_ttft_ms", 0),
            f(v, "batch16_tok_s", 1),
            f(v, "mixed_tok_s", 1),
            f(v, "mixed_wall_s", 1),
            f(v, "peak_rss_mb", 0),
        );
    }
    Ok(())
}

/// The middle value (the upper middle of an even count).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn tempfile_dir() -> Res<PathBuf> {
    let dir = std::env::temp_dir().join(format!("omni-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
