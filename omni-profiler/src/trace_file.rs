//! Trace files: preparing a stage's directory, building the Chrome trace
//! JSON object every backend writes, and writing it atomically under a name
//! no other window uses.
use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::layout::{safe_path_component, worker_name};
use crate::recorder::{CapturedSpans, SpanRecord};
use crate::{Error, ProfileSession, Result};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates `dir` (and its parents) and checks that a file can be written in
/// it, so that an unwritable directory fails when a window starts, with an
/// error naming the path ([`Error::TraceDirNotWritable`]), not when the
/// window's trace is lost at stop.
pub fn prepare_trace_dir(dir: &Path) -> Result<()> {
    let not_writable = |cause| Error::TraceDirNotWritable {
        path: dir.to_path_buf(),
        cause,
    };
    std::fs::create_dir_all(dir).map_err(not_writable)?;
    let probe = tmp_path(dir, "probe");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|mut f| f.write_all(b"{}"))
        .map_err(not_writable)?;
    std::fs::remove_file(&probe).map_err(not_writable)?;
    Ok(())
}

/// A hidden temporary name in `dir` no other thread or process uses.
pub(crate) fn tmp_path(dir: &Path, what: &str) -> PathBuf {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".omni-{what}-{}-{n}.tmp", std::process::id()))
}

/// Removes the hidden temporary files that process `pid`, now gone, left in
/// `dir` ([`write_trace`]'s, a backend's): a stage killed while writing a
/// trace leaves one, never a file under a trace's name. Returns what it
/// removed; a directory that cannot be read removes nothing.
pub fn remove_unfinished(dir: &Path, pid: u32) -> Vec<PathBuf> {
    let marker = format!("-{pid}-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(".omni-") && n.ends_with(".tmp") && n.contains(&marker)
            })
        })
        .filter(|p| std::fs::remove_file(p).is_ok())
        .collect()
}

/// Writes one window's trace into `session.dir` and returns its path.
///
/// The name follows PyTorch's `tensorboard_trace_handler`:
/// `<host>_<pid>.<epoch ms>.<kind>.trace.json` (`.json.gz` when
/// `session.options.use_gzip`); the built-in backends use kind `pt`
/// (`torch`, so TensorBoard's plugin picks the files up) and `chrome`.
///
/// Atomic and never overwriting: the bytes go to a hidden temporary file,
/// are synced, then hard-linked to the final name, which fails rather than
/// replace an existing file (the millisecond part is then bumped). A reader
/// sees either no file or the whole file, and no earlier window's file is
/// ever replaced, even by another process or after a restart.
pub fn write_trace(session: &ProfileSession, kind: &str, trace: &Value) -> Result<PathBuf> {
    let dir = &session.dir;
    let mut bytes = serde_json::to_vec(trace).map_err(|e| Error::InvalidTrace {
        path: dir.clone(),
        reason: format!("cannot serialize trace: {e}"),
    })?;
    if session.options.use_gzip {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&bytes)
            .and_then(|_| gz.finish())
            .map(|out| bytes = out)
            .map_err(|e| Error::io(dir, e))?;
    }
    // Checked at start, but a long window gives time to remove it; the
    // window's data is worth recreating it for.
    std::fs::create_dir_all(dir).map_err(|e| Error::TraceDirNotWritable {
        path: dir.clone(),
        cause: e,
    })?;
    let tmp = tmp_path(dir, "trace");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    let result = link_unique(dir, kind, session.options.use_gzip, &tmp);
    let _ = std::fs::remove_file(&tmp);
    result
}

fn link_unique(dir: &Path, kind: &str, gzip: bool, tmp: &Path) -> Result<PathBuf> {
    let worker = worker_name();
    let kind = safe_path_component(kind);
    let ext = if gzip { "json.gz" } else { "json" };
    let mut ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    for _ in 0..10_000 {
        let path = dir.join(format!("{worker}.{ms}.{kind}.trace.{ext}"));
        match std::fs::hard_link(tmp, &path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => ms += 1,
            Err(_) => {
                // A file system without hard links: rename is still atomic,
                // but only replaces nothing if the name is free.
                if path.exists() {
                    ms += 1;
                    continue;
                }
                std::fs::rename(tmp, &path).map_err(|e| Error::io(&path, e))?;
                return Ok(path);
            }
        }
    }
    Err(Error::io(
        dir,
        std::io::Error::other("no free trace file name after 10000 tries"),
    ))
}

fn metadata_event(name: &str, pid: u64, tid: u64, value: Value) -> Value {
    json!({"ph": "M", "name": name, "pid": pid, "tid": tid, "ts": 0, "args": value})
}

fn span_event(span: &SpanRecord, pid: u64, cat: &str) -> Value {
    let mut e = json!({
        "name": span.name,
        "cat": cat,
        "pid": pid,
        "tid": span.tid,
        "ts": span.start_us,
    });
    match span.dur_us {
        Some(dur) => {
            e["ph"] = "X".into();
            e["dur"] = dur.into();
        }
        None => {
            e["ph"] = "i".into();
            e["s"] = "t".into();
        }
    }
    if !span.args.is_empty() {
        e["args"] = Value::Object(span.args.clone());
    }
    e
}

/// Records the window's bounds (µs since the UNIX epoch, the events'
/// clock) in the trace's `omni` header: the window holds idle time before
/// the first event and after the last, which analysis counts.
pub(crate) fn set_window(trace: &mut Value, start_us: f64, stop_us: f64) {
    trace["omni"]["window"] = json!({ "start_us": start_us, "stop_us": stop_us });
}

/// Top-level keys every trace carries besides `traceEvents`.
pub(crate) fn omni_info(session: &ProfileSession, backend: &str) -> Value {
    let mut info = json!({
        "backend": backend,
        "process_name": session.process_name,
        "pid": std::process::id(),
        "clock": "ts in microseconds since the UNIX epoch",
    });
    if let Some(c) = session.clock_offset {
        // Kept out of `ts` so that the file stays this process's own record;
        // the analysis tools subtract it (`tools::trace_set`).
        info["clock_offset_us"] = c.offset_us.into();
        info["clock_offset_error_us"] = c.error_us.into();
    }
    info
}

/// Turns the trace Kineto saved at `raw` into the window's trace:
///
/// * `ts` shifted by Kineto's `baseTimeNanoseconds` (Kineto writes times
///   relative to it) so that they are microseconds since the UNIX epoch,
///   like every other backend; `baseTimeNanoseconds` becomes 0;
/// * this process's `process_name` set to the session's;
/// * `flops` (the shim's side file, with `with_flops`) added to the `args`
///   of the ops they belong to, as PyTorch's Python side reports them;
/// * the fields of our spans (`phase`, `batch_size`, `request_ids`...) added
///   to the `args` of Kineto's matching `user_annotation` ranges; spans
///   Kineto did not see are added as `user_annotation` events of their own.
pub(crate) fn finalize_kineto(
    raw: &Path,
    flops: Option<&Path>,
    captured: &CapturedSpans,
    session: &ProfileSession,
) -> Result<Value> {
    let text = std::fs::read(raw).map_err(|e| Error::io(raw, e))?;
    let mut trace: Value = serde_json::from_slice(&text).map_err(|e| Error::InvalidTrace {
        path: raw.to_path_buf(),
        reason: format!("kineto wrote invalid json: {e}"),
    })?;
    let obj = trace.as_object_mut().ok_or_else(|| Error::InvalidTrace {
        path: raw.to_path_buf(),
        reason: "kineto trace is not a json object".to_owned(),
    })?;
    let base_ns = obj
        .get("baseTimeNanoseconds")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    // Kineto reads the system clock itself: a test skew applies here too.
    let base_us = base_ns as f64 / 1000.0 + crate::clock::skew_us();
    let flops = match flops {
        Some(path) => read_flops(path)?,
        None => HashMap::new(),
    };
    obj.insert("baseTimeNanoseconds".into(), 0.into());
    // It names our temporary file.
    obj.remove("traceName");
    let pid = u64::from(std::process::id());
    let mut events = match obj.remove("traceEvents") {
        Some(Value::Array(events)) => events,
        _ => Vec::new(),
    };

    let mut named_process = false;
    let mut named_threads = BTreeSet::new();
    // (tid, name) -> indices of Kineto's user ranges, for matching.
    let mut ranges: HashMap<(u64, String), Vec<usize>> = HashMap::new();
    for (i, e) in events.iter_mut().enumerate() {
        if let Some(ts) = e.get("ts").and_then(Value::as_f64) {
            if !flops.is_empty() {
                // Kineto writes ts relative to the base, in µs with ns
                // decimals: exact enough to find the op's start again.
                let start_ns = base_ns as i128 + (ts * 1000.0).round() as i128;
                let name = e.get("name").and_then(Value::as_str).unwrap_or_default();
                if let Some(f) = flops.get(name).and_then(|v| {
                    v.iter()
                        .find(|(ns, _)| (*ns as i128 - start_ns).abs() <= 1_000)
                }) {
                    merge_args(e, &Map::from_iter([("flops".to_owned(), f.1.into())]));
                }
            }
            e["ts"] = (ts + base_us).into();
        }
        let ph = e.get("ph").and_then(Value::as_str).unwrap_or_default();
        let name = e.get("name").and_then(Value::as_str).unwrap_or_default();
        let e_pid = e.get("pid").and_then(Value::as_u64);
        let tid = e.get("tid").and_then(Value::as_u64);
        if ph == "M" && name == "process_name" && e_pid == Some(pid) {
            e["args"] = json!({"name": session.process_name});
            named_process = true;
        } else if ph == "M" && name == "thread_name" {
            if let Some(tid) = tid {
                named_threads.insert(tid);
            }
        } else if ph == "X" && e.get("cat").and_then(Value::as_str) == Some("user_annotation") {
            if let Some(tid) = tid {
                ranges.entry((tid, name.to_owned())).or_default().push(i);
            }
        }
    }
    if !named_process {
        events.push(metadata_event(
            "process_name",
            pid,
            0,
            json!({"name": session.process_name}),
        ));
    }

    // Our spans, grouped like Kineto's ranges, each group in start order.
    let mut ours: HashMap<(u64, String), Vec<&SpanRecord>> = HashMap::new();
    for s in &captured.spans {
        ours.entry((s.tid, s.name.clone())).or_default().push(s);
    }
    let mut extra = Vec::new();
    for (key, mut spans) in ours {
        spans.sort_by(|a, b| a.start_us.total_cmp(&b.start_us));
        let mut kineto: Vec<usize> = ranges.remove(&key).unwrap_or_default();
        kineto.sort_by(|a, b| ts_of(&events[*a]).total_cmp(&ts_of(&events[*b])));
        // Matched by order, not by time (a preempted thread can put
        // milliseconds between our clock read and the range's): the spans
        // that opened a Kineto range are, in start order, the first of
        // Kineto's ranges of that name on that thread. Kineto may have more
        // at the end (ranges still open when the recorder closed).
        let mut kineto = kineto.into_iter();
        for span in spans {
            let slot = if span.kineto_range {
                kineto.next()
            } else {
                None
            };
            match slot {
                Some(i) => merge_args(&mut events[i], &span.args),
                None => {
                    extra.push(span_event(span, pid, "user_annotation"));
                    if !named_threads.contains(&span.tid) {
                        if let Some(name) = captured.threads.get(&span.tid) {
                            extra.push(metadata_event(
                                "thread_name",
                                pid,
                                span.tid,
                                json!({"name": name}),
                            ));
                        }
                        named_threads.insert(span.tid);
                    }
                }
            }
        }
    }
    events.extend(extra);
    obj.insert("traceEvents".into(), Value::Array(events));
    let mut info = omni_info(session, "torch");
    info["dropped_spans"] = captured.dropped.into();
    obj.insert("omni".into(), info);
    Ok(trace)
}

/// The shim's flops side file: name -> [(start ns, flops)].
fn read_flops(path: &Path) -> Result<HashMap<String, Vec<(u64, u64)>>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, '\t');
        let (Some(ns), Some(flops), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if let (Ok(ns), Ok(flops)) = (ns.parse(), flops.parse()) {
            out.entry(name.to_owned()).or_default().push((ns, flops));
        }
    }
    Ok(out)
}

fn ts_of(e: &Value) -> f64 {
    e.get("ts").and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn merge_args(e: &mut Value, args: &Map<String, Value>) {
    if args.is_empty() {
        return;
    }
    if !e.get("args").is_some_and(Value::is_object) {
        e["args"] = Value::Object(Map::new());
    }
    if let Some(target) = e.get_mut("args").and_then(Value::as_object_mut) {
        for (k, v) in args {
            // Kineto's own keys (External id, Input Dims...) win.
            target.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
}

/// Reads a trace file (`.json` or `.json.gz`) into a JSON value.
pub(crate) fn read_trace(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut out)
            .map_err(|e| Error::InvalidTrace {
                path: path.to_path_buf(),
                reason: format!("bad gzip data: {e}"),
            })?;
        out
    } else {
        bytes
    };
    let value: Value = serde_json::from_slice(&text).map_err(|e| Error::InvalidTrace {
        path: path.to_path_buf(),
        reason: format!("not json: {e}"),
    })?;
    // A bare array is the other form the Chrome trace format allows.
    Ok(match value {
        Value::Array(events) => json!({ "traceEvents": events }),
        Value::Object(_) => value,
        _ => {
            return Err(Error::InvalidTrace {
                path: path.to_path_buf(),
                reason: "neither a json object nor an array of events".to_owned(),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the gone process's hidden temporaries go: not another pid's
    /// (one whose digits start the same), not a finished trace.
    #[test]
    fn remove_unfinished_takes_only_that_process_temporaries() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let names = [
            ".omni-kineto-123-0.tmp",
            ".omni-trace-123-7.tmp",
            ".omni-kineto-1234-0.tmp",
            "host_123.1700000000000.pt.trace.json",
        ];
        for n in names {
            std::fs::write(dir.path().join(n), b"{")?;
        }
        let mut removed: Vec<String> = remove_unfinished(dir.path(), 123)
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect();
        removed.sort();
        assert_eq!(removed, [".omni-kineto-123-0.tmp", ".omni-trace-123-7.tmp"]);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())?
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".omni-kineto-1234-0.tmp",
                "host_123.1700000000000.pt.trace.json"
            ]
        );
        assert!(remove_unfinished(&dir.path().join("missing"), 123).is_empty());
        Ok(())
    }
}
