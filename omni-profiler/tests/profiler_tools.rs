//! summarize and merge over traces the backends wrote: stage 0 recorded with
//! torch, stage 1 with chrome, a request passing from one to the other.
mod common;

use std::collections::HashSet;

use common::{check, events, install_layer, ranges_named, read_trace, serial};
use omni_profiler::tools::{merge, summarize};
use omni_profiler::{backend_by_name, Error, ProfileOptions, ProfileSession, Result};
use serde_json::Value;

#[tokio::test]
async fn merge_and_summarize_follow_requests_across_stages() -> Result<()> {
    install_layer();
    let _serial = serial().await;
    let root = tempfile::tempdir().map_err(|e| common::io(std::path::Path::new("tmp"), e))?;
    let opts = ProfileOptions::default();
    let s0 = ProfileSession::for_stage(root.path(), 0, "thinker", "SmolLM2-135M-Instruct", opts);
    let s1 = ProfileSession::for_stage(root.path(), 1, "talker", "SmolLM2-135M-Instruct", opts);

    let torch = backend_by_name("torch")?;
    torch.start(&s0).await?;
    let add_request = |id: &str| {
        let _a =
            tracing::info_span!(target: "omni::runtime", "add_request", request_ids = id).entered();
    };
    add_request("req-1");
    common::engine_step(1, "req-1");
    add_request("req-2");
    common::engine_step(2, "req-1,req-2");
    torch.stop().await?;
    // Stage 1's socket takes both in now; its model thread gets to them at
    // its first step, after the profiler has started.
    let received = common::now_us().floor();

    let chrome = backend_by_name("chrome")?;
    chrome.start(&s1).await?;
    {
        let _r = tracing::info_span!(target: "omni::runtime", "stage_recv",
            request_ids = "req-1,req-2", received_us = received as u64)
        .entered();
    }
    common::engine_step(1, "req-1,req-2");
    let stage1_files = chrome.stop().await?;
    let stage1_step = stage1_files
        .iter()
        .map(|f| read_trace(f))
        .collect::<Result<Vec<_>>>()?
        .iter()
        .flat_map(|t| ranges_named(t, "ProfilerStep#1"))
        .find_map(|e| e["ts"].as_f64());

    // Summary: both stages, ops by total time, both requests through both stages.
    let summary = summarize(root.path())?;
    check(summary.stages.len() == 2, format!("{summary:#?}"))?;
    check(
        summary.stages[0].stage_id == Some(0) && summary.stages[1].stage_id == Some(1),
        "order",
    )?;
    check(
        summary.stages[0].name == "stage 0 (thinker) SmolLM2-135M-Instruct",
        "stage name",
    )?;
    check(
        summary.stages[0].steps == 2 && summary.stages[1].steps == 1,
        "steps",
    )?;
    let ops0: Vec<&str> = summary.stages[0]
        .top_ops
        .iter()
        .map(|o| o.name.as_str())
        .collect();
    check(
        ops0.contains(&"forward") && ops0.iter().any(|o| o.starts_with("aten::")),
        format!("{ops0:?}"),
    )?;
    let totals: Vec<f64> = summary.stages[0]
        .top_ops
        .iter()
        .map(|o| o.total_us)
        .collect();
    check(
        totals.windows(2).all(|w| w[0] >= w[1]),
        "sorted by total time",
    )?;
    check(
        summary.stages[0]
            .top_ops
            .iter()
            .all(|o| o.self_us <= o.total_us + 1e-6),
        "self <= total",
    )?;
    let ids: Vec<&str> = summary
        .requests
        .iter()
        .map(|r| r.request_id.as_str())
        .collect();
    check(ids == ["req-1", "req-2"], format!("{ids:?}"))?;
    let r1 = &summary.requests[0];
    check(r1.stages.len() == 2, format!("{r1:#?}"))?;
    check(
        r1.stages[0].stage_id == Some(0) && r1.stages[1].stage_id == Some(1),
        "stage order",
    )?;
    check(
        r1.stages[1].transfer_us.is_some_and(|t| t > 0.0),
        "transfer into stage 1",
    )?;
    check(
        r1.stages[1].arrived_us == received,
        format!("arrival when the socket took it in: {r1:#?}"),
    )?;
    check(
        stage1_step.is_some_and(|ts| {
            r1.stages[1].queue_us > 0.0 && (r1.stages[1].queue_us - (ts - received)).abs() < 1.0
        }),
        format!("the wait for the model thread's step is queue time: {stage1_step:?} {r1:#?}"),
    )?;
    check(r1.stages[1].compute_us > 0.0, "compute in stage 1")?;
    // Compute is the steps that name the request: req-2 was in one step of
    // stage 0, req-1 in that one and the one before; stage 1's single step
    // had both.
    let r2 = &summary.requests[1];
    check(
        r2.stages[0].compute_us > 0.0 && r1.stages[0].compute_us > r2.stages[0].compute_us,
        format!("{r1:#?} {r2:#?}"),
    )?;
    check(
        r2.stages[1].compute_us == r1.stages[1].compute_us,
        "one shared step in stage 1",
    )?;
    check(
        r2.stages[0].arrived_us > r1.stages[0].arrived_us
            && r2.stages[0].left_us >= r2.stages[0].arrived_us + r2.stages[0].compute_us,
        format!("{r2:#?}"),
    )?;
    check(
        r1.stages[1].arrived_us >= r1.stages[0].left_us - 1.0,
        "stage 1 after stage 0",
    )?;
    let text = summary.to_string();
    check(
        text.contains("req-1") && text.contains("stage 1 (talker)") && text.contains("forward"),
        text,
    )?;

    // Merge: one trace, distinct processes per stage, flows stage 0 -> 1.
    let out = root.path().join("merged.json");
    check(merge(root.path(), &out)? == out, "returns out")?;
    let merged = read_trace(&out)?;
    let evs = events(&merged);
    let procs: Vec<(Value, String)> = evs
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "process_name")
        .map(|e| {
            (
                e["pid"].clone(),
                e["args"]["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let pid_of = |label: &str| {
        procs
            .iter()
            .find(|(_, n)| n.starts_with(label))
            .map(|(p, _)| p.clone())
    };
    let (p0, p1) = (pid_of("stage 0 (thinker)"), pid_of("stage 1 (talker)"));
    check(
        p0.is_some() && p1.is_some() && p0 != p1,
        format!("{procs:?}"),
    )?;
    let starts: Vec<&Value> = evs
        .iter()
        .filter(|e| e["ph"] == "s" && e["cat"] == "request")
        .collect();
    let finishes: Vec<&Value> = evs
        .iter()
        .filter(|e| e["ph"] == "f" && e["cat"] == "request")
        .collect();
    check(
        starts.len() == 2 && finishes.len() == 2,
        format!("{starts:?}"),
    )?;
    let names: HashSet<&str> = starts.iter().filter_map(|e| e["name"].as_str()).collect();
    check(
        names == HashSet::from(["req-1", "req-2"]),
        format!("{names:?}"),
    )?;
    for s in &starts {
        let f = finishes.iter().find(|f| f["id"] == s["id"]);
        check(
            f.is_some_and(|f| {
                f["pid"] == *p1.as_ref().unwrap_or(&Value::Null)
                    && f["ts"].as_f64() >= s["ts"].as_f64()
            }),
            format!("flow {s} -> {f:?}"),
        )?;
        check(
            s["pid"] == *p0.as_ref().unwrap_or(&Value::Null),
            "flow starts in stage 0",
        )?;
    }
    // The merged file is ignored by a later summary or merge of the same dir.
    check(
        summarize(root.path())?.stages.len() == 2,
        "merged output not re-read",
    )?;

    let empty = tempfile::tempdir().map_err(|e| common::io(std::path::Path::new("tmp"), e))?;
    check(
        matches!(summarize(empty.path()), Err(Error::NoTraces { .. })),
        "empty dir",
    )?;
    Ok(())
}
