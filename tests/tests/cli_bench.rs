//! Every `omni bench` subcommand once, on the smallest inputs it takes, so
//! a benchmark cannot rot between the runs that fill BENCHMARKS.md. Each
//! must exit 0 and print its result in the shape it documents (JSON lines,
//! or a Markdown table). The Python references that need transformers are
//! left out (the test set-up does not install it); Piper's onnxruntime
//! reference runs.
use std::process::{Command, Output};

use omni_tests::{err, omni_bin, repo_root, Result};

fn bench(args: &[&str]) -> Result<String> {
    let out: Output = Command::new(omni_bin()?)
        .arg("bench")
        .args(args)
        .current_dir(repo_root())
        .env_remove("OMNI_PROFILER_BACKEND")
        .env_remove("VLLM_TORCH_PROFILER_DIR")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(err(format!(
            "omni bench {args:?}: {}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(stdout)
}

/// The JSON objects among the lines (each benchmark prints one per row).
fn json_rows(stdout: &str) -> Result<Vec<serde_json::Value>> {
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    if rows.is_empty() {
        return Err(err(format!("no JSON rows in:\n{stdout}")));
    }
    Ok(rows)
}

/// A Markdown table: a header row and at least one data row after `|---`.
fn table_rows(stdout: &str) -> Result<usize> {
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('|')).collect();
    match lines
        .iter()
        .position(|l| l.starts_with("|--") || l.starts_with("| --"))
    {
        Some(sep) if sep >= 1 && lines.len() > sep + 1 => Ok(lines.len() - sep - 1),
        _ => Err(err(format!("no Markdown table in:\n{stdout}"))),
    }
}

#[test]
fn bench_pipeline() -> Result {
    let out = bench(&[
        "pipeline",
        "--pipeline",
        "smollm2",
        "--prompts",
        "1",
        "--max-tokens",
        "2",
        "--reference",
        "none",
        "--json",
    ])?;
    let rows = json_rows(&out)?;
    let system = |r: &serde_json::Value| r["system"].as_str().unwrap_or_default().to_owned();
    let omni: Vec<_> = rows.iter().filter(|r| system(r) == "omni").collect();
    assert_eq!(omni.len(), 1, "{out}");
    // The run's work is counted (SmolLM2 is a decoder it knows) and the
    // GEMM yardstick ran before the batch and after it, each time at the
    // batch size and at 512 rows; the batch is compared with the larger.
    let rate = |r: &serde_json::Value| r["gflop_per_s"].as_f64().unwrap_or(f64::NAN);
    assert!(rate(omni[0]) > 0.0, "{out}");
    let gemm: Vec<_> = rows.iter().filter(|r| system(r) == "gemm").collect();
    assert_eq!(gemm.len(), 4, "{out}");
    assert!(gemm.iter().all(|r| rate(r) > 0.0), "{out}");
    let when: Vec<_> = gemm.iter().map(|r| r["before_batch"].as_u64()).collect();
    assert_eq!(when, [Some(1), Some(1), None, None], "{out}");
    let peak = omni[0]["gemm_peak_gflop_per_s"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let best = gemm.iter().map(|r| rate(r)).fold(0.0, f64::max);
    assert_eq!(peak, best, "{out}");
    let share = omni[0]["share_of_gemm_peak"].as_f64().unwrap_or(f64::NAN);
    assert!((share - rate(omni[0]) / peak).abs() < 1e-9, "{out}");
    Ok(())
}

#[test]
fn bench_profile() -> Result {
    let out = bench(&[
        "profile",
        "--pipeline",
        "smollm2",
        "--prompts",
        "1",
        "--max-tokens",
        "2",
        "--rounds",
        "1",
        "--json",
    ])?;
    assert!(
        json_rows(&out)?.len() >= 2,
        "one row per configuration:\n{out}"
    );
    Ok(())
}

#[test]
fn bench_serve() -> Result {
    let out = bench(&[
        "serve",
        "--pipeline",
        "smollm2",
        "--concurrency",
        "1",
        "--requests-per-client",
        "1",
        "--max-tokens",
        "2",
        "--json",
    ])?;
    assert_eq!(json_rows(&out)?.len(), 1, "{out}");
    Ok(())
}

/// The load test's short form: 64 clients against a bound of 16 in
/// flight, then a 10 s soak. It exits 0 only if every request was answered
/// or refused with 429 + Retry-After, no stage held a request afterwards,
/// and memory stayed within its margin; the bound must have refused some.
#[test]
fn bench_load() -> Result {
    let out = bench(&[
        "load",
        "--clients",
        "64",
        "--max-pending-requests",
        "16",
        "--max-tokens",
        "4",
        "--soak-seconds",
        "10",
        "--warmup-seconds",
        "3",
        "--soak-clients",
        "4",
        // Debug builds settle slowly on two cores; the margin is for
        // release runs (RELIABILITY.md).
        "--rss-margin-pct",
        "25",
    ])?;
    let row = out
        .lines()
        .find(|l| l.starts_with("| 64 |"))
        .ok_or_else(|| err(format!("no row for 64 clients:\n{out}")))?;
    let cols: Vec<&str> = row.split('|').map(str::trim).collect();
    // | clients | requests | answered | 429 | left | errors | ...
    let n = |i: usize| cols[i].parse::<usize>().unwrap_or(usize::MAX);
    assert_eq!(n(2), 64, "{row}");
    assert_eq!(n(3) + n(4) + n(5), 64, "{row}");
    assert_eq!(n(6), 0, "{row}");
    assert!(
        n(4) > 0,
        "64 clients against a bound of 16 got no 429: {row}"
    );
    assert!(out.contains("soak: 4 clients"), "{out}");
    Ok(())
}

#[test]
fn bench_voice() -> Result {
    let out = bench(&["voice", "--concurrency", "1", "--rounds", "1", "--json"])?;
    let systems: Vec<String> = json_rows(&out)?
        .iter()
        .filter_map(|r| r["system"].as_str().map(str::to_owned))
        .collect();
    assert!(
        ["omni", "onnxruntime", "omni speak"]
            .iter()
            .all(|s| systems.iter().any(|x| x == s)),
        "Omni, the reference and the speak pipeline: {out}"
    );
    Ok(())
}

#[test]
fn bench_audio() -> Result {
    let out = bench(&[
        "audio",
        "--concurrency",
        "1",
        "--rounds",
        "1",
        "--thinker-tokens",
        "2",
        "--talker-tokens",
        "2",
        "--mel-frames",
        "10",
        "--no-reference",
    ])?;
    assert!(table_rows(&out)? >= 1, "{out}");
    Ok(())
}

#[test]
fn bench_encoder() -> Result {
    let out = bench(&[
        "encoder",
        "--seconds",
        "1",
        "--images",
        "32x32",
        "--rounds",
        "1",
        "--no-reference",
    ])?;
    assert!(table_rows(&out)? >= 1, "{out}");
    Ok(())
}
