//! `merge(dir, out)`: one Chrome trace of all stages, each stage its own
//! process, with flow arrows from each `stage_send` of a request to the
//! `stage_recv` that took it in the next stage (one per piece on a streamed
//! edge).
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::trace_set::{load, request_ids_of};
use crate::{Error, Result};

/// Flow ids of the files' own flows (Kineto's CPU->GPU arrows) are shifted by
/// file index times this, ours start above all of them, so none collide.
const FILE_ID_STRIDE: u64 = 1 << 32;

struct Endpoint {
    stage: usize,
    ts: f64,
    end: f64,
    pid: u64,
    tid: Value,
    /// The piece of a streamed input (`piece` arg), when the span has one.
    piece: Option<u64>,
    /// The sending stage's id: a send's `stage` arg, a receive's
    /// `from_stage`, when the span has it.
    sender: Option<u64>,
}

/// Merges every trace under `dir` into one Chrome trace at `out` (gzip when
/// `out` ends in `.gz`), written atomically (temporary file, then rename;
/// an existing `out` is replaced). Returns `out`.
///
/// Each (stage, process) becomes one process of the merged trace, named
/// after the stage and sorted by stage id; all windows of a stage share it.
/// Times are µs since the UNIX epoch in every backend, each stage's moved
/// onto the orchestrator's clock by the offset its trace records
/// (`omni.clock_offset_us`, stages on other hosts), so stages line up. For each request, a flow arrow (`ph` `s`/`f`, category
/// `request`) goes from the latest `stage_send` naming it in one stage to
/// each `stage_recv` naming it in another stage that ended after the send
/// began; on a streamed edge, from the send of the same piece (`piece`
/// arg), so each piece has its arrow.
pub fn merge(dir: &Path, out: &Path) -> Result<PathBuf> {
    let traces = load(dir)?;
    let mut pid_map: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut events: Vec<Value> = Vec::new();
    let mut seen_meta: HashSet<String> = HashSet::new();
    let mut sends: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
    let mut recvs: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
    let mut stage_of_key: BTreeMap<String, usize> = BTreeMap::new();

    for (file_index, trace) in traces.iter().enumerate() {
        let next_stage = stage_of_key.len();
        let stage = *stage_of_key
            .entry(trace.stage_key.clone())
            .or_insert(next_stage);
        for e in &trace.events {
            let mut e = e.clone();
            let orig_pid = e.get("pid").map(Value::to_string).unwrap_or_default();
            let key = (trace.stage_key.clone(), orig_pid.clone());
            let is_new = !pid_map.contains_key(&key);
            let next_pid = pid_map.len() as u64 + 1;
            let pid = *pid_map.entry(key).or_insert(next_pid);
            if is_new {
                let is_main = trace.main_pid.as_ref().map(Value::to_string) == Some(orig_pid)
                    || trace.main_pid.is_none();
                let name = if is_main {
                    trace.process_name.clone()
                } else {
                    let own = trace_process_name(&trace.events, e.get("pid"))
                        .unwrap_or_else(|| "device".to_owned());
                    format!("{}: {own}", trace.process_name)
                };
                events.push(
                    json!({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                                   "args": {"name": name}}),
                );
                let sort = trace.stage_id.unwrap_or(usize::MAX / 2) as u64 * 1000 + pid;
                events.push(
                    json!({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                                   "args": {"sort_index": sort}}),
                );
            }
            e["pid"] = pid.into();
            let ph = e
                .get("ph")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let name = e
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            match ph.as_str() {
                "M" => {
                    if name == "process_name" || name == "process_sort_index" {
                        continue;
                    }
                    let key = format!(
                        "{pid}/{}/{name}",
                        e.get("tid").map(Value::to_string).unwrap_or_default()
                    );
                    if !seen_meta.insert(key) {
                        continue;
                    }
                }
                "s" | "t" | "f" => {
                    if let Some(id) = e.get("id").and_then(Value::as_u64) {
                        e["id"] = (id % FILE_ID_STRIDE + file_index as u64 * FILE_ID_STRIDE).into();
                    }
                }
                "X" if name == "stage_send" || name == "stage_recv" => {
                    let ts = e.get("ts").and_then(Value::as_f64);
                    let dur = e.get("dur").and_then(Value::as_f64).unwrap_or(0.0);
                    if let (Some(ts), Some(args)) = (ts, e.get("args").and_then(Value::as_object)) {
                        let target = if name == "stage_send" {
                            &mut sends
                        } else {
                            &mut recvs
                        };
                        for id in request_ids_of(args) {
                            target.entry(id).or_default().push(Endpoint {
                                stage,
                                ts,
                                end: ts + dur,
                                pid,
                                tid: e.get("tid").cloned().unwrap_or(Value::Null),
                                piece: args.get("piece").and_then(Value::as_u64),
                                sender: args
                                    .get(if name == "stage_send" {
                                        "stage"
                                    } else {
                                        "from_stage"
                                    })
                                    .and_then(Value::as_u64),
                            });
                        }
                    }
                }
                _ => {}
            }
            events.push(e);
        }
    }

    // Flow arrows: each receive pairs with the latest send of that request in
    // another stage that began before the receive ended.
    let mut flow_id = traces.len() as u64 * FILE_ID_STRIDE;
    for (request, recv_list) in &recvs {
        let Some(send_list) = sends.get(request) else {
            continue;
        };
        for recv in recv_list {
            let send = send_list
                .iter()
                .filter(|s| {
                    s.stage != recv.stage
                        && s.ts <= recv.end
                        && s.piece == recv.piece
                        && (s.sender.is_none() || recv.sender.is_none() || s.sender == recv.sender)
                })
                .max_by(|a, b| a.ts.total_cmp(&b.ts));
            let Some(send) = send else { continue };
            flow_id += 1;
            events.push(
                json!({"ph": "s", "id": flow_id, "cat": "request", "name": request,
                               "pid": send.pid, "tid": send.tid, "ts": send.ts}),
            );
            // Bound to the receive's enclosing slice; a point inside it, so
            // the arrow lands on the receive even when it is short.
            let at = recv.ts + (recv.end - recv.ts) / 2.0;
            events.push(
                json!({"ph": "f", "bp": "e", "id": flow_id, "cat": "request",
                               "name": request, "pid": recv.pid, "tid": recv.tid, "ts": at}),
            );
        }
    }

    let files: Vec<String> = traces
        .iter()
        .map(|t| t.path.display().to_string())
        .collect();
    let merged = json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "omni": {"merged_from": files, "clock": "ts in microseconds since the UNIX epoch"},
    });
    write_atomic(out, &merged)?;
    Ok(out.to_path_buf())
}

fn trace_process_name(events: &[Value], pid: Option<&Value>) -> Option<String> {
    events
        .iter()
        .filter(|e| {
            e.get("ph").and_then(Value::as_str) == Some("M")
                && e.get("name").and_then(Value::as_str) == Some("process_name")
                && e.get("pid") == pid
        })
        .find_map(|e| e.pointer("/args/name").and_then(Value::as_str))
        .map(str::to_owned)
}

fn write_atomic(out: &Path, value: &Value) -> Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut bytes = serde_json::to_vec(value).map_err(|e| Error::InvalidTrace {
        path: out.to_path_buf(),
        reason: format!("cannot serialize merged trace: {e}"),
    })?;
    if out.extension().is_some_and(|e| e == "gz") {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&bytes)
            .and_then(|_| gz.finish())
            .map(|b| bytes = b)
            .map_err(|e| Error::io(out, e))?;
    }
    let tmp = crate::trace_file::tmp_path(&parent, "merge");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, out)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(out, e)
    })
}
