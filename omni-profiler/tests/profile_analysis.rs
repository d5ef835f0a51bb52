//! `analyze` on two hand-written stage traces whose every interval is known:
//! each idle bucket, busy time, batch occupancy, the bottleneck and the
//! request's critical path come out to the microsecond.
use omni_profiler::tools::analyze;
use serde_json::{json, Value};

/// µs since the UNIX epoch where both windows open.
const T0: f64 = 1_700_000_000_000_000.0;

fn x(name: &str, ts: f64, dur: f64, args: Value) -> Value {
    json!({"ph": "X", "name": name, "cat": "user_annotation", "pid": 7, "tid": 1,
           "ts": T0 + ts, "dur": dur, "args": args})
}

fn write(dir: &std::path::Path, stage: usize, role: &str, events: Vec<Value>) {
    write_skewed(dir, stage, role, events, None);
}

/// A stage's trace as a process whose clock is `skew` µs ahead would write
/// it: every time shifted, and, when `recorded`, the offset in its header.
fn write_skewed(
    dir: &std::path::Path,
    stage: usize,
    role: &str,
    mut events: Vec<Value>,
    skew: Option<(f64, bool)>,
) {
    let d = dir.join(format!("stage_{stage}_m"));
    std::fs::create_dir_all(&d).unwrap();
    let shift = skew.map_or(0.0, |(s, _)| s);
    for e in &mut events {
        e["ts"] = (e["ts"].as_f64().unwrap() + shift).into();
        if let Some(r) = e.pointer_mut("/args/received_us") {
            *r = (r.as_f64().unwrap() + shift).into();
        }
    }
    let mut trace = json!({
        "traceEvents": events,
        "omni": {"backend": "chrome", "process_name": format!("stage {stage} ({role}) m"),
                 "pid": 7, "window": {"start_us": T0 + shift, "stop_us": T0 + shift + 1000.0}},
    });
    if let Some((s, true)) = skew {
        trace["omni"]["clock_offset_us"] = s.into();
        trace["omni"]["clock_offset_error_us"] = 20.0.into();
    }
    std::fs::write(d.join("t.json"), trace.to_string()).unwrap();
}

fn two_stages(dir: &std::path::Path, skew: Option<(f64, bool)>) {
    write(
        dir,
        0,
        "thinker",
        vec![
            x(
                "add_request",
                100.0,
                1.0,
                json!({"request_ids": "r1", "received_us": T0 + 100.0}),
            ),
            x("ProfilerStep#0", 200.0, 100.0, json!({"request_ids": "r1"})),
            x(
                "stage_send",
                500.0,
                10.0,
                json!({"request_ids": "r1", "stage": 0}),
            ),
        ],
    );
    write_skewed(
        dir,
        1,
        "code2wav",
        vec![
            x(
                "stage_recv",
                520.0,
                1.0,
                json!({"request_ids": "r1", "from_stage": 0, "received_us": T0 + 515.0}),
            ),
            x("ProfilerStep#0", 600.0, 250.0, json!({"request_ids": "r1"})),
        ],
        skew,
    );
}

/// The flow arrows of a merged trace: (start ts, finish ts).
fn flows(dir: &std::path::Path) -> Vec<(f64, f64)> {
    let out = dir.join("merged.json");
    omni_profiler::tools::merge(dir, &out).unwrap();
    let merged: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let events = merged["traceEvents"].as_array().unwrap();
    let at = |ph: &str, id: &Value| {
        events
            .iter()
            .find(|e| e["ph"] == ph && e["cat"] == "request" && &e["id"] == id)
            .map(|e| e["ts"].as_f64().unwrap())
    };
    events
        .iter()
        .filter(|e| e["ph"] == "s" && e["cat"] == "request")
        .map(|s| (s["ts"].as_f64().unwrap(), at("f", &s["id"]).unwrap()))
        .collect()
}

#[test]
fn a_stage_clock_offset_recorded_in_its_trace_is_taken_out() {
    // Stage 1's clock runs 5 s behind the orchestrator's (another host).
    for skew in [-5e6, 5e6] {
        let dir = tempfile::tempdir().unwrap();
        two_stages(dir.path(), Some((skew, true)));
        let f = flows(dir.path());
        assert!(
            f.len() == 1 && f[0].0 <= f[0].1 && (T0 + 520.0..=T0 + 521.0).contains(&f[0].1),
            "skew {skew}: {f:?}"
        );
        let a = analyze(dir.path()).unwrap();
        let r = &a.requests[0];
        let s = &a.summary.requests[0].stages[1];
        assert!(
            (r.total_us - 750.0).abs() < 1e-6
                && s.transfer_us.is_some_and(|t| (t - 15.0).abs() < 1e-6),
            "skew {skew}: {r:#?} {s:#?}"
        );
    }
    // The same traces without the offset in the header: the arrow would run
    // backwards, so merge draws none, and the request spans 5 s.
    let dir = tempfile::tempdir().unwrap();
    two_stages(dir.path(), Some((-5e6, false)));
    assert!(flows(dir.path()).is_empty());
    let unskewed = tempfile::tempdir().unwrap();
    two_stages(unskewed.path(), None);
    assert_eq!(flows(unskewed.path()).len(), 1);
}

#[test]
fn every_interval_of_two_known_stages_is_classified() {
    let dir = tempfile::tempdir().unwrap();
    // Stage 0: r1 arrives at 100, steps at 200-300 (5 tokens) and 400-500
    // (1 token), is sent at 500-510.
    write(
        dir.path(),
        0,
        "thinker",
        vec![
            x(
                "add_request",
                100.0,
                1.0,
                json!({"request_ids": "r1", "received_us": T0 + 100.0}),
            ),
            x("ProfilerStep#0", 200.0, 100.0, json!({"request_ids": "r1"})),
            x("forward", 210.0, 80.0, json!({"num_tokens": 5})),
            x("ProfilerStep#1", 400.0, 100.0, json!({"request_ids": "r1"})),
            x("forward", 410.0, 80.0, json!({"num_tokens": 1})),
            x("stage_send", 500.0, 10.0, json!({"request_ids": "r1"})),
        ],
    );
    // Stage 1 (speaks): its socket takes r1 at 515, one step 600-850.
    write(
        dir.path(),
        1,
        "code2wav",
        vec![
            x(
                "stage_recv",
                520.0,
                1.0,
                json!({"request_ids": "r1", "received_us": T0 + 515.0}),
            ),
            x("ProfilerStep#0", 600.0, 250.0, json!({"request_ids": "r1"})),
            x("forward", 610.0, 230.0, json!({"num_tokens": 3})),
        ],
    );
    let a = analyze(dir.path()).unwrap();
    let close = |x: f64, y: f64| (x - y).abs() < 1e-6;
    let (s0, s1) = (&a.stages[0], &a.stages[1]);
    // Stage 0: empty before r1 and after it left (100 + 490), holding while
    // r1 waits for and between its steps (100 + 100), blocked while it is
    // sent (10), busy 200.
    let i = s0.idle;
    assert!(
        close(s0.window_us, 1000.0)
            && close(s0.busy_us, 200.0)
            && close(i.empty_us, 590.0)
            && close(i.holding_us, 200.0)
            && close(i.blocked_us, 10.0)
            && close(i.starved_us, 0.0),
        "{s0:#?}"
    );
    // Stage 1: empty before r1 entered the pipeline (100) and after it left
    // (150), starved while r1 was upstream or in transit (415), holding it
    // before its step (85), busy 250.
    let i = s1.idle;
    assert!(
        close(s1.busy_us, 250.0)
            && close(i.empty_us, 250.0)
            && close(i.starved_us, 415.0)
            && close(i.holding_us, 85.0)
            && close(i.blocked_us, 0.0),
        "{s1:#?}"
    );
    let tokens = s0.occupancy.tokens.unwrap();
    assert!(
        s0.occupancy.steps == 2
            && (tokens.min, tokens.median, tokens.max) == (1.0, 3.0, 5.0)
            && s0.occupancy.sequences.unwrap().max == 1.0,
        "{:#?}",
        s0.occupancy
    );
    let b = a.bottleneck.as_ref().unwrap();
    assert!(
        b.stage_id == Some(1)
            && b.evidence
                .starts_with("under-loaded: stage 1 (code2wav) busy 25%"),
        "{b:?}"
    );
    // r1: 100 to 850; stage 1's compute (250) dominates; its first audio is
    // the end of stage 1's first step.
    let r = &a.requests[0];
    let d = r.dominant.as_ref().unwrap();
    assert!(
        close(r.total_us, 750.0)
            && d.stage_id == Some(1)
            && d.kind == "compute"
            && close(d.us, 250.0)
            && r.first_audio_us.is_some_and(|t| close(t, 750.0)),
        "{r:#?}"
    );
    let s = &a.summary.requests[0].stages[1];
    assert!(
        s.transfer_us.is_some_and(|t| close(t, 15.0)) && close(s.queue_us, 85.0),
        "{s:#?}"
    );
}
