//! The torch (Kineto) backend on real tch ops inside engine-like spans.
mod common;

use common::{check, events, install_layer, list, ranges_named, read_trace, serial};
use omni_profiler::{backend_by_name, Error, ProfileOptions, ProfileSession, Result};
use serde_json::Value;

#[tokio::test]
async fn torch_trace_has_steps_engine_ranges_and_aten_ops() -> Result<()> {
    install_layer();
    let _serial = serial().await;
    let root = tempfile::tempdir().map_err(|e| common::io(std::path::Path::new("tmp"), e))?;
    let options = ProfileOptions {
        record_shapes: true,
        ..ProfileOptions::default()
    };
    let s = ProfileSession::for_stage(root.path(), 1, "talker", "org/model", options);
    let torch = backend_by_name("torch")?;
    check(torch.backend() == "torch", "name")?;

    let t0 = common::now_us();
    torch.start(&s).await?;
    // Start twice is refused, and so is a second recording backend.
    check(
        matches!(torch.start(&s).await, Err(Error::AlreadyActive { .. })),
        "start twice",
    )?;
    let chrome = backend_by_name("chrome")?;
    check(
        matches!(chrome.start(&s).await, Err(Error::AlreadyActive { .. })),
        "chrome while torch",
    )?;
    for step in 1..=2 {
        common::engine_step(step, "req-1,req-2");
    }
    // A span on another thread: recorded too (all threads are profiled).
    std::thread::spawn(|| {
        let _recv =
            tracing::info_span!(target: "omni::runtime", "stage_recv", request_ids = "req-3")
                .entered();
        let _ = tch::Tensor::ones([4], (tch::Kind::Float, tch::Device::Cpu)) + 1;
    })
    .join()
    .map_err(|_| Error::Task("thread panicked".into()))?;
    let files = torch.stop().await?;
    let t1 = common::now_us();
    check(!torch.is_active(), "inactive")?;
    check(torch.stop().await?.is_empty(), "stop without start")?;

    check(files.len() == 1, format!("{files:?}"))?;
    check(
        list(&s.dir)? == files,
        "only the trace in the stage dir (no temporaries)",
    )?;
    check(s.dir.ends_with("stage_1_org_model"), format!("{:?}", s.dir))?;
    let name = files[0].to_string_lossy().to_string();
    check(name.ends_with(".pt.trace.json"), name.clone())?;
    let trace = read_trace(&files[0])?;
    check(
        trace["traceEvents"].is_array(),
        "json object with traceEvents",
    )?;

    for step in ["ProfilerStep#1", "ProfilerStep#2"] {
        let r = ranges_named(&trace, step);
        check(r.len() == 1, format!("{step}: {r:?}"))?;
        check(
            r[0]["cat"] == "user_annotation",
            format!("{step} is a user range"),
        )?;
        // Recorded after the range opened, as the engine records them.
        check(
            r[0]["args"]["request_ids"] == "req-1,req-2",
            format!("{step} names its requests: {}", r[0]),
        )?;
    }
    for span in ["schedule", "forward", "sample", "stage_send", "stage_recv"] {
        check(
            !ranges_named(&trace, span).is_empty(),
            format!("{span} range"),
        )?;
    }
    let fwd = ranges_named(&trace, "forward");
    check(
        fwd.iter()
            .all(|f| f["args"]["phase"] == "decode" && f["args"]["batch_size"] == 2),
        format!("forward args merged: {:?}", fwd[0]["args"]),
    )?;
    let send = &ranges_named(&trace, "stage_send")[0];
    check(
        send["args"]["request_ids"] == "req-1,req-2",
        format!("{send}"),
    )?;
    let recv = &ranges_named(&trace, "stage_recv")[0];
    check(recv["args"]["request_ids"] == "req-3", format!("{recv}"))?;

    let all = events(&trace);
    let aten: Vec<&Value> = all
        .iter()
        .filter(|e| {
            e["name"]
                .as_str()
                .is_some_and(|n| n == "aten::mm" || n == "aten::matmul")
        })
        .collect();
    check(!aten.is_empty(), "aten matmul ops")?;
    check(
        aten.iter().any(|e| e["args"]["Input Dims"].is_array()),
        "record_shapes honoured",
    )?;
    // The matmul happened inside a forward range, on one clock.
    let inside = fwd.iter().any(|f| {
        let (s, d) = (
            f["ts"].as_f64().unwrap_or(0.0),
            f["dur"].as_f64().unwrap_or(0.0),
        );
        aten.iter()
            .any(|a| a["ts"].as_f64().is_some_and(|t| t >= s && t <= s + d))
    });
    check(inside, "aten ops nest in forward")?;
    for e in ranges_named(&trace, "ProfilerStep#1") {
        let ts = e["ts"].as_f64().unwrap_or(0.0);
        check(
            ts >= t0 - 1e6 && ts <= t1 + 1e6,
            format!("ts {ts} not in [{t0}, {t1}]"),
        )?;
    }
    let pname = all
        .iter()
        .find(|e| e["name"] == "process_name" && e["pid"] == std::process::id())
        .map(|e| e["args"]["name"].clone());
    check(
        pname == Some(Value::from("stage 1 (talker) org/model")),
        format!("{pname:?}"),
    )?;
    check(trace["baseTimeNanoseconds"] == 0, "no second time base")?;
    Ok(())
}

#[tokio::test]
async fn torch_options_memory_flops_stack_and_gzip_are_honoured() -> Result<()> {
    install_layer();
    let _serial = serial().await;
    let root = tempfile::tempdir().map_err(|e| common::io(std::path::Path::new("tmp"), e))?;
    let options = ProfileOptions {
        profile_memory: true,
        with_flops: true,
        with_stack: true,
        use_gzip: true,
        ..ProfileOptions::default()
    };
    let s = ProfileSession::for_stage(root.path(), 0, "", "m", options);
    let torch = backend_by_name("torch")?;
    torch.start(&s).await?;
    common::engine_step(7, "r");
    let files = torch.stop().await?;
    check(
        files.len() == 1 && files[0].to_string_lossy().ends_with(".pt.trace.json.gz"),
        format!("{files:?}"),
    )?;
    let trace = read_trace(&files[0])?;
    let all = events(&trace);
    check(
        all.iter().any(|e| e["name"] == "[memory]"),
        "profile_memory: [memory] events",
    )?;
    check(
        all.iter()
            .any(|e| e["name"] == "aten::mm" && e["args"]["flops"].is_number()),
        format!(
            "with_flops: flops on aten::mm: {:?}",
            all.iter().find(|e| e["name"] == "aten::mm")
        ),
    )?;
    check(!ranges_named(&trace, "ProfilerStep#7").is_empty(), "step")?;
    Ok(())
}

#[tokio::test]
async fn torch_stop_on_another_thread_is_refused_and_window_stays_open() -> Result<()> {
    install_layer();
    let _serial = serial().await;
    let root = tempfile::tempdir().map_err(|e| common::io(std::path::Path::new("tmp"), e))?;
    let s = ProfileSession::for_stage(
        root.path(),
        2,
        "code2wav",
        "vocoder",
        ProfileOptions::default(),
    );
    let torch = backend_by_name("torch")?;
    torch.start(&s).await?;
    common::engine_step(1, "r");
    let other = torch.clone();
    let refused = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| Error::Task(e.to_string()))
            .and_then(|rt| rt.block_on(other.stop()))
    })
    .join()
    .map_err(|_| Error::Task("thread panicked".into()))?;
    check(
        matches!(&refused, Err(Error::Kineto(m)) if m.contains("thread")),
        format!("{refused:?}"),
    )?;
    check(torch.is_active(), "window still open")?;
    let files = torch.stop().await?;
    check(files.len() == 1, "stopped on the right thread")?;
    check(
        !ranges_named(&read_trace(&files[0])?, "ProfilerStep#1").is_empty(),
        "step recorded",
    )?;
    Ok(())
}
