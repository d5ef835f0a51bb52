//! The patch on `tracing-chrome` (vendor/tracing-chrome/OMNI-PATCH.md),
//! tested on the crate itself, as a user of `tracing` meets it.
//!
//! Upstream 0.7.2 caches the first layer's channel sender per thread: a
//! thread that outlives that layer (an engine's model thread, a runtime
//! worker) sends its spans into the closed channel of the old layer, so a
//! second trace lacks them. With the patch reverted, the first test fails in
//! window 1 with "the worker's span is missing".
use std::error::Error;
use std::path::Path;
use std::sync::mpsc;

use serde_json::Value;
use tracing::Dispatch;
use tracing_chrome::{ChromeLayerBuilder, TimeBase};
use tracing_subscriber::prelude::*;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn read_events(path: &Path) -> Result<Vec<Value>> {
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

fn begun(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["ph"] == "B")
        .filter_map(|e| e["name"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_thread_that_outlives_a_layer_writes_into_the_next_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (to_worker, work) = mpsc::channel::<Option<Dispatch>>();
    let (done, worked) = mpsc::channel::<()>();
    // One long-lived thread, as an engine's model thread is.
    let worker = std::thread::Builder::new()
        .name("worker".to_owned())
        .spawn(move || {
            while let Ok(Some(dispatch)) = work.recv() {
                tracing::dispatcher::with_default(&dispatch, || {
                    tracing::info_span!("work").in_scope(|| {});
                });
                drop(dispatch);
                if done.send(()).is_err() {
                    return;
                }
            }
        })?;
    for window in 0..3 {
        let path = dir.path().join(format!("window{window}.json"));
        let (layer, guard) = ChromeLayerBuilder::new().file(&path).build();
        let dispatch = Dispatch::new(tracing_subscriber::registry().with(layer));
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::info_span!("main").in_scope(|| {});
        });
        to_worker.send(Some(dispatch))?;
        worked.recv()?;
        drop(guard);
        let events = read_events(&path)?;
        let names = begun(&events);
        assert!(
            names.iter().any(|n| n == "main"),
            "window {window}: the main thread's span is missing: {names:?}"
        );
        assert!(
            names.iter().any(|n| n == "work"),
            "window {window}: the worker's span is missing: {names:?}"
        );
        // Each trace names the threads that wrote into it.
        let thread_names: Vec<&str> = events
            .iter()
            .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
            .filter_map(|e| e["args"]["name"].as_str())
            .collect();
        assert!(
            thread_names.contains(&"worker"),
            "window {window}: no thread name for the worker: {thread_names:?}"
        );
    }
    to_worker.send(None)?;
    worker.join().map_err(|_| "worker panicked")?;
    Ok(())
}

#[test]
fn epoch_time_base_and_typed_args() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("trace.json");
    let before_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64()
        * 1e6;
    let (layer, guard) = ChromeLayerBuilder::new()
        .file(&path)
        .include_args(true)
        .time_base(TimeBase::UnixEpoch)
        .build();
    let dispatch = Dispatch::new(tracing_subscriber::registry().with(layer));
    tracing::dispatcher::with_default(&dispatch, || {
        let span = tracing::info_span!(
            "step",
            step = 7u64,
            delta = -3i64,
            ratio = 0.5f64,
            ok = true,
            request_ids = tracing::field::Empty
        );
        let _entered = span.enter();
        span.record("request_ids", "a,b");
    });
    drop(dispatch);
    drop(guard);
    let after_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64()
        * 1e6;
    let events = read_events(&path)?;
    let begin = events
        .iter()
        .find(|e| e["ph"] == "B" && e["name"] == "step")
        .ok_or("no B event for the step")?;
    let end = events
        .iter()
        .find(|e| e["ph"] == "E" && e["name"] == "step")
        .ok_or("no E event for the step")?;
    let ts = begin["ts"].as_f64().ok_or("no ts")?;
    assert!(
        ts >= before_us - 1e3 && ts <= after_us + 1e3,
        "ts {ts} is not µs since the epoch ({before_us}..{after_us})"
    );
    let args = &begin["args"];
    assert_eq!(args["step"], 7, "{args}");
    assert_eq!(args["delta"], -3, "{args}");
    assert_eq!(args["ratio"], 0.5, "{args}");
    assert_eq!(args["ok"], true, "{args}");
    // Recorded after entry: on the exit event, as a plain string.
    assert_eq!(end["args"]["request_ids"], "a,b", "{}", end["args"]);
    Ok(())
}
