//! Backends other than torch, the file layout and the options: real windows,
//! real files.
mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{check, install_layer, list, names, ranges_named, read_trace, serial};
use omni_profiler::{
    backend_by_name, profiler_dir_from, register_backend, safe_path_component, stage_trace_dir,
    Error, ProfileOptions, ProfileSession, Profiler, Result, SpanCapture,
};
use serde_json::Value;

fn session(dir: &std::path::Path, gzip: bool) -> ProfileSession {
    let options = ProfileOptions {
        use_gzip: gzip,
        ..ProfileOptions::default()
    };
    ProfileSession::for_stage(dir, 0, "thinker", "SmolLM2-135M-Instruct", options)
}

#[tokio::test]
async fn chrome_two_windows_give_two_files_with_events_only_inside() -> Result<()> {
    install_layer();
    let _serial = serial().await;
    let root = tempfile::tempdir().map_err(|e| common::io(std::path::Path::new("tmp"), e))?;
    let s = session(root.path(), false);
    let chrome = backend_by_name("chrome")?;
    check(chrome.backend() == "chrome", "backend name")?;

    tracing::info_span!(target: "omni::engine", "before_any_window").in_scope(|| {});
    chrome.start(&s).await?;
    check(chrome.is_active(), "active after start")?;
    let t0 = common::now_us();
    common::engine_step(1, "req-a,req-b");
    chrome.stop().await?;
    tracing::info_span!(target: "omni::engine", "between_windows").in_scope(|| {});
    chrome.start(&s).await?;
    common::engine_step(2, "req-c");
    let second = chrome.stop().await?;
    let t1 = common::now_us();
    check(!chrome.is_active(), "inactive after stop")?;
    check(second.len() == 1, "one file per window")?;

    let files: Vec<PathBuf> = list(&s.dir)?;
    check(files.len() == 2, format!("two files, got {files:?}"))?;
    let mut steps = Vec::new();
    for f in &files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        check(
            name.ends_with(".chrome.trace.json") && !name.starts_with('.'),
            name,
        )?;
        let trace = read_trace(f)?;
        let all = names(&trace);
        check(
            !all.iter()
                .any(|n| n == "before_any_window" || n == "between_windows"),
            "nothing recorded outside windows",
        )?;
        for span in ["schedule", "forward", "sample", "stage_send"] {
            check(all.iter().any(|n| n == span), format!("{span} in {name}"))?;
        }
        let fwd = ranges_named(&trace, "forward");
        check(fwd.len() == 1, "one forward")?;
        check(
            fwd[0]["args"]["phase"] == "decode"
                && fwd[0]["args"]["batch_size"] == 2
                && fwd[0]["args"]["num_tokens"] == 2,
            format!("forward args {}", fwd[0]),
        )?;
        let ts = fwd[0]["ts"].as_f64().unwrap_or(0.0);
        check(ts >= t0 - 1e6 && ts <= t1 + 1e6, "ts in µs since the epoch")?;
        let pname = trace["traceEvents"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "process_name")
            .map(|e| e["args"]["name"].clone());
        check(
            pname == Some(Value::from("stage 0 (thinker) SmolLM2-135M-Instruct")),
            "process name",
        )?;
        steps.extend(all.into_iter().filter(|n| n.starts_with("ProfilerStep#")));
    }
    steps.sort();
    check(
        steps == ["ProfilerStep#1", "ProfilerStep#2"],
        format!("steps {steps:?}"),
    )?;
    Ok(())
}

/// The bug the vendored `tracing-chrome` patch fixes, as the engine meets it:
/// its model thread lives across windows, and its steps must reach each one,
/// under its thread name, with the fields recorded after the step began.
#[tokio::test]
async fn chrome_windows_after_the_first_keep_a_long_lived_threads_steps() -> Result<()> {
    install_layer();
    let _serial = serial().await;
    let root = tempfile::tempdir().map_err(|e| common::io(std::path::Path::new("tmp"), e))?;
    let s = session(root.path(), false);
    let chrome = backend_by_name("chrome")?;
    let (to_model, steps) = std::sync::mpsc::channel::<u64>();
    let (done, stepped) = std::sync::mpsc::channel::<()>();
    let model = std::thread::Builder::new()
        .name("model".to_owned())
        .spawn(move || {
            for step in steps {
                common::engine_step(step, &format!("req-{step}"));
                if done.send(()).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| common::io(std::path::Path::new("spawn"), e))?;
    let mut files = Vec::new();
    for step in 1..=3u64 {
        chrome.start(&s).await?;
        to_model
            .send(step)
            .map_err(|e| Error::Task(e.to_string()))?;
        stepped.recv().map_err(|e| Error::Task(e.to_string()))?;
        files.extend(chrome.stop().await?);
    }
    drop(to_model);
    model
        .join()
        .map_err(|_| Error::Task("model thread panicked".to_owned()))?;
    check(files.len() == 3, format!("three files, got {files:?}"))?;
    for (i, f) in files.iter().enumerate() {
        let step = i as u64 + 1;
        let trace = read_trace(f)?;
        let ranges = ranges_named(&trace, &format!("ProfilerStep#{step}"));
        check(
            ranges.len() == 1,
            format!("window {step}: one step range in {f:?}"),
        )?;
        check(
            ranges[0]["args"]["request_ids"] == format!("req-{step}").as_str(),
            format!("window {step}: request ids {}", ranges[0]),
        )?;
        let tid = ranges[0]["tid"].clone();
        let thread = common::events(&trace)
            .into_iter()
            .find(|e| e["ph"] == "M" && e["name"] == "thread_name" && e["tid"] == tid);
        check(
            thread.is_some_and(|t| t["args"]["name"] == "model"),
            format!("window {step}: the step's thread is named"),
        )?;
    }
    Ok(())
}

#[tokio::test]
async fn gzip_writes_json_gz_and_names_never_collide() -> Result<()> {
    install_layer();
    let _serial = serial().await;
    let root = tempfile::tempdir().map_err(|e| common::io(std::path::Path::new("tmp"), e))?;
    let s = session(root.path(), true);
    let chrome = backend_by_name("chrome")?;
    let mut written = Vec::new();
    // Windows closer together than the millisecond in the name.
    for step in 0..3 {
        chrome.start(&s).await?;
        common::engine_step(step, "r");
        written.extend(chrome.stop().await?);
    }
    let files = list(&s.dir)?;
    check(
        files.len() == 3,
        format!("three files, no leftovers: {files:?}"),
    )?;
    let mut sorted = written.clone();
    sorted.sort();
    check(sorted == files, "stop returns what is on disk")?;
    for f in &files {
        let name = f.to_string_lossy();
        check(name.ends_with(".chrome.trace.json.gz"), name.to_string())?;
        let trace = read_trace(f)?;
        check(trace["traceEvents"].is_array(), "gzip json object")?;
    }
    Ok(())
}

#[tokio::test]
async fn start_twice_and_stop_without_start_are_defined() -> Result<()> {
    install_layer();
    let _serial = serial().await;
    let root = tempfile::tempdir().map_err(|e| common::io(std::path::Path::new("tmp"), e))?;
    let s = session(root.path(), false);
    for backend in ["chrome", "noop"] {
        let p = backend_by_name(backend)?;
        check(
            p.stop().await?.is_empty(),
            "stop without start: Ok(no files)",
        )?;
        p.start(&s).await?;
        match p.start(&s).await {
            Err(Error::AlreadyActive { backend: b, .. }) => check(b == backend, "names backend")?,
            other => check(false, format!("{backend}: start twice gave {other:?}"))?,
        }
        check(p.is_active(), "still active after refused start")?;
        p.stop().await?;
        check(p.stop().await?.is_empty(), "second stop: Ok(no files)")?;
    }
    // One recording backend per process: a second chrome instance is refused
    // while the first records.
    let a = backend_by_name("chrome")?;
    let b = backend_by_name("chrome")?;
    a.start(&s).await?;
    let refused = b.start(&s).await;
    a.stop().await?;
    check(
        matches!(refused, Err(Error::AlreadyActive { .. })),
        format!("{refused:?}"),
    )?;
    Ok(())
}

#[tokio::test]
async fn unwritable_dir_fails_at_start_naming_the_path() -> Result<()> {
    install_layer();
    let _serial = serial().await;
    let root = tempfile::tempdir().map_err(|e| common::io(std::path::Path::new("tmp"), e))?;
    // A regular file where a directory should be: fails even for root.
    let blocker = root.path().join("not_a_dir");
    std::fs::write(&blocker, b"x").map_err(|e| common::io(&blocker, e))?;
    let s = session(&blocker, false);
    for backend in ["chrome", "torch"] {
        let p = backend_by_name(backend)?;
        match p.start(&s).await {
            Err(e @ Error::TraceDirNotWritable { .. }) => {
                let msg = e.to_string();
                check(msg.contains(&s.dir.display().to_string()), msg)?;
            }
            other => check(
                false,
                format!("{backend}: expected TraceDirNotWritable, got {other:?}"),
            )?,
        }
        check(!p.is_active(), "not active after failed start")?;
    }
    Ok(())
}

#[test]
fn profiler_dir_and_options_from_env_values() -> Result<()> {
    check(
        matches!(profiler_dir_from(None), Err(Error::ProfilerDirUnset)),
        "unset",
    )?;
    check(
        matches!(
            profiler_dir_from(Some("".as_ref())),
            Err(Error::ProfilerDirUnset)
        ),
        "empty",
    )?;
    let msg = Error::ProfilerDirUnset.to_string();
    check(msg.contains("VLLM_TORCH_PROFILER_DIR"), msg)?;
    check(
        profiler_dir_from(Some("/x/y".as_ref()))? == std::path::Path::new("/x/y"),
        "set",
    )?;

    let opts = ProfileOptions::from_lookup(|v| match v {
        "VLLM_TORCH_PROFILER_RECORD_SHAPES" => Some("1".into()),
        "VLLM_TORCH_PROFILER_WITH_STACK" => Some("true".into()),
        "VLLM_TORCH_PROFILER_USE_GZIP" => Some("0".into()),
        _ => None,
    })?;
    check(
        opts.record_shapes
            && opts.with_stack
            && !opts.use_gzip
            && !opts.with_flops
            && !opts.profile_memory,
        format!("{opts:?}"),
    )?;
    let bad = ProfileOptions::from_lookup(|v| {
        (v == "VLLM_TORCH_PROFILER_WITH_FLOPS").then(|| "maybe".to_owned())
    });
    match bad {
        Err(e @ Error::InvalidEnv { .. }) => {
            let msg = e.to_string();
            check(
                msg.contains("VLLM_TORCH_PROFILER_WITH_FLOPS") && msg.contains("maybe"),
                msg,
            )?
        }
        other => check(false, format!("{other:?}"))?,
    }
    Ok(())
}

#[test]
fn model_names_cannot_escape_the_profiler_dir() -> Result<()> {
    let root = std::path::Path::new("/traces");
    let long = "x".repeat(1000);
    for name in [
        "org/model",
        "../x",
        "..",
        ".",
        "",
        "a\\b",
        "../../etc/passwd",
        "é/ü",
        &long,
    ] {
        let dir = stage_trace_dir(root, 7, name);
        check(dir.parent() == Some(root), format!("{name:?} -> {dir:?}"))?;
        let comp = dir.file_name().and_then(|c| c.to_str()).unwrap_or_default();
        check(
            comp.starts_with("stage_7_") && comp.len() <= 120,
            comp.to_owned(),
        )?;
        check(
            !comp.contains('/') && !comp.contains('\\') && comp != ".." && comp != ".",
            comp.to_owned(),
        )?;
    }
    check(safe_path_component("org/model") == "org_model", "org/model")?;
    check(safe_path_component("") == "model", "empty")?;
    check(
        safe_path_component(&long) != safe_path_component(&format!("{long}y")),
        "long names stay distinct",
    )?;
    check(
        stage_trace_dir(root, 0, "SmolLM2-135M-Instruct")
            == root.join("stage_0_SmolLM2-135M-Instruct"),
        "plain names unchanged",
    )?;
    Ok(())
}

#[test]
fn unknown_backend_lists_the_choices() -> Result<()> {
    match backend_by_name("perfetto") {
        Err(e @ Error::UnknownBackend { .. }) => {
            let msg = e.to_string();
            check(
                msg.contains("perfetto")
                    && msg.contains("torch")
                    && msg.contains("chrome")
                    && msg.contains("noop"),
                msg,
            )
        }
        Err(other) => check(false, format!("{other}")),
        Ok(p) => check(false, format!("got backend {}", p.backend())),
    }
}

/// A user's backend: keeps span names and durations, writes them as JSON.
struct SpanListProfiler {
    capture: std::sync::Mutex<Option<(SpanCapture, ProfileSession)>>,
}

#[async_trait::async_trait]
impl Profiler for SpanListProfiler {
    fn backend(&self) -> &str {
        "spanlist"
    }
    async fn start(&self, session: &ProfileSession) -> Result<()> {
        let mut slot = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Err(Error::AlreadyActive {
                backend: "spanlist".into(),
                reason: "open".into(),
            });
        }
        omni_profiler::prepare_trace_dir(&session.dir)?;
        *slot = Some((SpanCapture::start("spanlist")?, session.clone()));
        Ok(())
    }
    async fn stop(&self) -> Result<Vec<PathBuf>> {
        let taken = self
            .capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some((capture, session)) = taken else {
            return Ok(vec![]);
        };
        let spans = capture.finish();
        let list: Vec<Value> = spans
            .spans
            .iter()
            .map(|s| serde_json::json!({"name": s.name, "dur_us": s.dur_us}))
            .collect();
        let path = omni_profiler::write_trace(
            &session,
            "spanlist",
            &serde_json::json!({"traceEvents": [], "spans": list}),
        )?;
        Ok(vec![path])
    }
    fn is_active(&self) -> bool {
        self.capture.lock().map(|s| s.is_some()).unwrap_or(false)
    }
}

#[tokio::test]
async fn custom_backend_plugs_in_by_name() -> Result<()> {
    install_layer();
    let _serial = serial().await;
    register_backend(
        "SpanList",
        Arc::new(|| {
            Arc::new(SpanListProfiler {
                capture: std::sync::Mutex::new(None),
            }) as Arc<dyn Profiler>
        }),
    )?;
    check(
        register_backend("torch", Arc::new(|| backend_by_name("noop").expect("noop"))).is_err(),
        "built-in names are reserved",
    )?;
    let root = tempfile::tempdir().map_err(|e| common::io(std::path::Path::new("tmp"), e))?;
    let s = session(root.path(), false);
    let p = backend_by_name("spanlist")?;
    check(p.backend() == "spanlist", "name")?;
    p.start(&s).await?;
    common::engine_step(5, "r1");
    let files = p.stop().await?;
    check(files.len() == 1, "one file")?;
    let out = read_trace(&files[0])?;
    let spans: Vec<&str> = out["spans"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    check(
        spans.contains(&"forward") && spans.contains(&"ProfilerStep#5"),
        format!("{spans:?}"),
    )?;
    Ok(())
}
