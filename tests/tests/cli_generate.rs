//! The `omni` binary: `generate` (text and JSON), profiling from the
//! command line and the profile tools, `pipelines`, help, exit codes.
use std::process::{Command, Output};

use omni_tests::{err, omni_bin, read_trace, trace_files, Result, DEFAULT_STAGE_NAMES};

fn omni(args: &[&str]) -> Result<Output> {
    Ok(Command::new(omni_bin()?)
        .args(args)
        .env_remove("VLLM_TORCH_PROFILER_DIR")
        .env_remove("RUST_LOG")
        .env_remove("KINETO_LOG_LEVEL")
        .output()?)
}

/// The `error:` line of a failed run.
fn error_line(out: &Output) -> String {
    text(&out.stderr)
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default()
        .to_owned()
}

/// Fails when a part of an error chain (`a: b: c`) says what another part
/// already said: a `Display` that repeats its source's text.
fn assert_says_each_thing_once(line: &str) {
    let parts: Vec<&str> = line.split(": ").map(str::trim).collect();
    for (i, a) in parts.iter().enumerate() {
        for b in &parts[i + 1..] {
            assert!(
                a.len() < 12 || !b.contains(a),
                "{a:?} is said twice in: {line}"
            );
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn generate_json_prints_every_final_output() -> Result {
    let out = omni(&[
        "generate",
        "--pipeline",
        "default",
        "--prompt",
        "Name a planet.",
        "--prompt",
        "Name a metal.",
        "--max-tokens",
        "5",
        "--json",
    ])?;
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    let keys: Vec<(String, u64)> = lines
        .iter()
        .map(|v| {
            (
                v["request_id"].as_str().unwrap_or("").to_string(),
                v["stage_id"].as_u64().unwrap_or(9),
            )
        })
        .collect();
    assert_eq!(
        keys,
        vec![
            ("0".into(), 0),
            ("0".into(), 1),
            ("1".into(), 0),
            ("1".into(), 1)
        ],
        "{lines:?}"
    );
    for v in &lines {
        assert_eq!(v["finished"], true);
        assert!(
            v["text"].as_str().is_some_and(|t| !t.trim().is_empty()),
            "{v}"
        );
        let n = v["token_ids"].as_array().map_or(0, Vec::len);
        assert!((1..=5).contains(&n), "{v}");
        assert!(
            v["metrics"]["stages"]
                .as_array()
                .is_some_and(|s| !s.is_empty()),
            "{v}"
        );
    }
    Ok(())
}

#[test]
fn generate_with_profile_writes_traces_and_the_tools_read_them() -> Result {
    let dir = tempfile::tempdir()?;
    let traces = dir.path().join("traces");
    let traces_arg = traces.to_string_lossy().into_owned();
    let out = omni(&[
        "generate",
        "--prompt",
        "Hello!",
        "--max-tokens",
        "4",
        "--profile",
        "--profile-dir",
        &traces_arg,
        "--profile-stages",
        "0,1",
    ])?;
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    // A normal profiled run, at the default log level, piped: no alarming
    // lines (Kineto's start-up on the wrong thread, its USDT and GPU probe
    // messages) and no colour codes.
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("ERROR"), "an ERROR line:\n{stderr}");
    assert!(!stderr.contains("USDT"), "a Kineto USDT line:\n{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "escape codes in piped logs:\n{stderr}"
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("ui.perfetto.dev"), "{stdout}");
    let files = trace_files(&traces);
    assert!(
        !files.is_empty(),
        "no trace written under {}",
        traces.display()
    );
    let mut stages = Vec::new();
    for f in &files {
        let stage_dir = f
            .parent()
            .and_then(|d| d.file_name())
            .and_then(|n| n.to_str())
            .unwrap_or("");
        stages.push(stage_dir.split('_').nth(1).unwrap_or("").to_owned());
        assert!(
            stdout.contains(&f.display().to_string()),
            "{} not printed:\n{stdout}",
            f.display()
        );
        read_trace(f)?;
    }
    assert_eq!(
        stages,
        ["0", "1"],
        "one trace per selected stage: {files:?}"
    );

    // --profile-stages picks: stage 1 alone.
    let only_1 = dir.path().join("only_1");
    let only_1_arg = only_1.to_string_lossy().into_owned();
    let out = omni(&[
        "generate",
        "--prompt",
        "Hello!",
        "--max-tokens",
        "2",
        "--profile",
        "--profile-dir",
        &only_1_arg,
        "--profile-stages",
        "1",
    ])?;
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let picked: Vec<String> = trace_files(&only_1)
        .iter()
        .filter_map(|f| f.parent()?.file_name()?.to_str().map(str::to_owned))
        .collect();
    assert!(
        !picked.is_empty() && picked.iter().all(|d| d.starts_with("stage_1_")),
        "--profile-stages 1 wrote {picked:?}"
    );

    // The summary: each stage's header, then the one request through both
    // stages, with a transfer into stage 1 and compute in each.
    let out = omni(&["profile", "summarize", &traces_arg])?;
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let summary = text(&out.stdout);
    for name in DEFAULT_STAGE_NAMES {
        assert!(
            summary.contains(&format!("== {name} (1 file(s), ")),
            "no header for {name}:\n{summary}"
        );
    }
    let lines: Vec<&str> = summary.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("  0#0  total "))
        .ok_or_else(|| err(format!("no line for request 0#0:\n{summary}")))?;
    let columns = |line: &str| -> Option<(String, Vec<String>)> {
        let (stage, rest) = line.trim_start().split_once(" transfer ")?;
        let mut values = vec![];
        let mut rest = format!("transfer {rest}");
        for key in ["transfer", "queue", "compute", "in stage"] {
            let r = rest.trim_start().strip_prefix(key)?.trim_start().to_owned();
            let end = r.find("  ").unwrap_or(r.len());
            values.push(r[..end].to_owned());
            rest = r[end..].to_owned();
        }
        Some((stage.trim().to_owned(), values))
    };
    let (s0, v0) = lines
        .get(at + 1)
        .and_then(|l| columns(l))
        .ok_or_else(|| err(summary.clone()))?;
    let (s1, v1) = lines
        .get(at + 2)
        .and_then(|l| columns(l))
        .ok_or_else(|| err(summary.clone()))?;
    let num = |v: &str| v.parse::<f64>().ok();
    assert!(
        s0 == DEFAULT_STAGE_NAMES[0]
            && v0[0] == "-"
            && num(&v0[2]).is_some_and(|c| c > 0.0)
            && s1.starts_with("stage 1 (summarizer) ")
            && num(&v1[0]).is_some_and(|t| t >= 0.0)
            && num(&v1[2]).is_some_and(|c| c > 0.0),
        "request 0#0's stages: {s0} {v0:?}, {s1} {v1:?}\n{summary}"
    );

    // The merged timeline: both stages as named processes, and one flow
    // arrow from stage 0's send of the request to stage 1's receipt.
    let merged = dir.path().join("merged.json");
    let merged_arg = merged.to_string_lossy().into_owned();
    let out = omni(&["profile", "merge", &traces_arg, "-o", &merged_arg])?;
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let doc = read_trace(&merged)?;
    let events = doc["traceEvents"].as_array().map_or(&[][..], Vec::as_slice);
    let pid_of = |name: &str| -> Vec<&serde_json::Value> {
        events
            .iter()
            .filter(|e| e["ph"] == "M" && e["name"] == "process_name" && e["args"]["name"] == name)
            .map(|e| &e["pid"])
            .collect()
    };
    let (p0, p1) = (
        pid_of(DEFAULT_STAGE_NAMES[0]),
        pid_of(DEFAULT_STAGE_NAMES[1]),
    );
    assert!(
        p0.len() == 1 && p1.len() == 1 && p0 != p1,
        "stage processes: {p0:?} {p1:?}"
    );
    let flows: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["cat"] == "request" && (e["ph"] == "s" || e["ph"] == "f"))
        .collect();
    let [start, finish] = flows[..] else {
        return Err(err(format!("expected one flow (s, f), got {flows:?}")));
    };
    assert!(
        start["ph"] == "s"
            && finish["ph"] == "f"
            && start["name"] == "0#0"
            && finish["name"] == "0#0"
            && start["id"] == finish["id"]
            && &start["pid"] == p0[0]
            && &finish["pid"] == p1[0]
            && finish["bp"] == "e"
            && finish["ts"].as_f64() >= start["ts"].as_f64(),
        "flow: {start} -> {finish}"
    );
    Ok(())
}

/// Three typical errors, printed whole: each names the bad value once.
#[test]
fn errors_say_each_thing_once() -> Result {
    let dir = tempfile::tempdir()?;
    let typo = dir.path().join("typo.yaml");
    std::fs::write(
        &typo,
        "name: typo\nstage_args:\n  - stage_id: 0\n    engine_args: {model: smollm2}\n",
    )?;
    let typo_arg = typo.to_string_lossy().into_owned();
    let missing = dir.path().join("missing.yaml");
    let missing_arg = missing.to_string_lossy().into_owned();
    let cases: [(&[&str], &str); 3] = [
        (
            &["generate", "--pipeline", &typo_arg, "--prompt", "hi"],
            "typo.yaml",
        ),
        (
            &["generate", "--pipeline", &missing_arg, "--prompt", "hi"],
            "missing.yaml",
        ),
        (
            &[
                "generate",
                "--prompt",
                "hi",
                "--temperature=-1",
                "--max-tokens",
                "1",
            ],
            "temperature",
        ),
    ];
    for (args, named) in cases {
        let out = omni(args)?;
        assert_eq!(out.status.code(), Some(2), "stderr:\n{}", text(&out.stderr));
        let line = error_line(&out);
        assert!(line.contains(named), "{named:?} not named in: {line}");
        assert_eq!(line.matches(named).count(), 1, "{named:?} twice in: {line}");
        assert_says_each_thing_once(&line);
    }
    Ok(())
}

#[test]
fn bad_input_exits_2_with_the_value_named() -> Result {
    let out = omni(&[
        "generate",
        "--pipeline",
        "no-such-pipeline",
        "--prompt",
        "hi",
    ])?;
    assert_eq!(out.status.code(), Some(2), "stderr:\n{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no-such-pipeline"),
        "{}",
        text(&out.stderr)
    );

    let out = omni(&["generate", "--prompt", ""])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("empty"), "{}", text(&out.stderr));

    let out = omni(&["generate", "--prompt", "hi", "--profile"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("VLLM_TORCH_PROFILER_DIR"),
        "{}",
        text(&out.stderr)
    );

    let out = omni(&["generate"])?;
    assert_eq!(
        out.status.code(),
        Some(2),
        "missing --prompt is a usage error"
    );

    let out = omni(&["profile", "summarize", "/no/such/dir"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/no/such/dir"));
    Ok(())
}

#[test]
fn pipelines_and_help() -> Result {
    let out = omni(&["pipelines"])?;
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("default") && stdout.contains("smollm2"),
        "{stdout}"
    );
    assert!(stdout.contains("stage 1"), "{stdout}");
    for cmd in [
        &["generate", "--help"][..],
        &["serve", "--help"],
        &["pipelines", "--help"],
        &["profile", "summarize", "--help"],
        &["profile", "merge", "--help"],
        &["bench", "pipeline", "--help"],
        &["bench", "serve", "--help"],
    ] {
        let out = omni(cmd)?;
        assert!(out.status.success(), "{cmd:?}");
        let help = text(&out.stdout);
        if !help.contains("Example") {
            return Err(err(format!("{cmd:?} help has no example:\n{help}")));
        }
    }
    let out = omni(&["--version"])?;
    assert!(text(&out.stdout).starts_with("omni "));
    Ok(())
}
