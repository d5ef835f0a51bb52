//! Loading every trace under a directory, with the stage each belongs to.
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::trace_file::read_trace;
use crate::{Error, Result};

/// One trace file and what we know of its stage.
pub(crate) struct StageTrace {
    /// Stage id from the directory name `stage_<id>_...`, when it has one.
    pub stage_id: Option<usize>,
    /// The stage's directory name (or the file's parent's), the stage's key.
    pub stage_key: String,
    /// The process name the trace gives its own process.
    pub process_name: String,
    /// The pid of the process that wrote it (from `omni.pid`, or the
    /// process named like the stage).
    pub main_pid: Option<Value>,
    /// The window's bounds, µs, when the backend recorded them (`omni.window`).
    pub window: Option<(f64, f64)>,
    pub path: PathBuf,
    pub events: Vec<Value>,
}

/// A complete (`X`) event, the part of it the tools use.
pub(crate) struct Range<'a> {
    pub name: &'a str,
    pub cat: &'a str,
    pub ts: f64,
    pub dur: f64,
    pub pid: &'a Value,
    pub tid: &'a Value,
    pub args: Option<&'a Map<String, Value>>,
}

impl Range<'_> {
    pub fn end(&self) -> f64 {
        self.ts + self.dur
    }
}

pub(crate) fn ranges(events: &[Value]) -> impl Iterator<Item = Range<'_>> {
    static NULL: Value = Value::Null;
    events.iter().filter_map(|e| {
        if e.get("ph").and_then(Value::as_str) != Some("X") {
            return None;
        }
        Some(Range {
            name: e.get("name").and_then(Value::as_str).unwrap_or_default(),
            cat: e.get("cat").and_then(Value::as_str).unwrap_or_default(),
            ts: e.get("ts").and_then(Value::as_f64)?,
            dur: e.get("dur").and_then(Value::as_f64).unwrap_or(0.0),
            pid: e.get("pid").unwrap_or(&NULL),
            tid: e.get("tid").unwrap_or(&NULL),
            args: e.get("args").and_then(Value::as_object),
        })
    })
}

/// The request ids a span names in its `request_ids` (a list, or a string
/// of ids separated by commas or spaces, brackets and quotes ignored) or
/// `request_id` field.
pub fn request_ids_of(args: &Map<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    for key in ["request_ids", "request_id"] {
        match args.get(key) {
            Some(Value::Array(items)) => {
                for item in items {
                    match item {
                        Value::String(s) => push_split(&mut out, s),
                        Value::Null => {}
                        other => out.push(other.to_string()),
                    }
                }
            }
            Some(Value::String(s)) => push_split(&mut out, s),
            Some(Value::Number(n)) => out.push(n.to_string()),
            _ => {}
        }
    }
    out
}

fn push_split(out: &mut Vec<String>, s: &str) {
    for part in s.split(|c: char| c == ',' || c.is_whitespace()) {
        let id = part.trim_matches(|c: char| matches!(c, '[' | ']' | '"' | '\'' | '(' | ')'));
        if !id.is_empty() && !out.iter().any(|o| o == id) {
            out.push(id.to_owned());
        }
    }
}

fn is_trace_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.') && (name.ends_with(".json") || name.ends_with(".json.gz"))
}

fn collect(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            if depth > 0 {
                collect(&path, depth - 1, out)?;
            }
        } else if is_trace_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// `stage_<id>_...` -> id.
fn stage_id_of(dir_name: &str) -> Option<usize> {
    let rest = dir_name.strip_prefix("stage_")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Every trace under `dir` (the profiler root with its `stage_*`
/// directories, one stage's directory, or any folder of traces), sorted by
/// stage, then file name.
pub(crate) fn load(dir: &Path) -> Result<Vec<StageTrace>> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        ));
    }
    let mut files = Vec::new();
    collect(dir, 2, &mut files)?;
    if files.is_empty() {
        return Err(Error::NoTraces {
            path: dir.to_path_buf(),
        });
    }
    let mut traces: Vec<StageTrace> = Vec::with_capacity(files.len());
    for path in files {
        let mut trace = read_trace(&path)?;
        if trace.pointer("/omni/merged_from").is_some() {
            // An earlier `merge` output saved next to the stage directories.
            continue;
        }
        let stage_key = path
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let events = match trace.get_mut("traceEvents").map(Value::take) {
            Some(Value::Array(events)) => events,
            _ => {
                return Err(Error::InvalidTrace {
                    path,
                    reason: "no traceEvents array".to_owned(),
                })
            }
        };
        let omni = trace.get("omni");
        // The writer's clock minus the orchestrator's (stages on other
        // hosts): every time goes onto the orchestrator's clock, so that a
        // request's arrows between stages run forward.
        let offset = omni
            .and_then(|o| o.get("clock_offset_us"))
            .and_then(Value::as_f64)
            .filter(|o| o.is_finite())
            .unwrap_or(0.0);
        let mut events = events;
        if offset != 0.0 {
            for e in &mut events {
                if let Some(ts) = e.get("ts").and_then(Value::as_f64) {
                    e["ts"] = (ts - offset).into();
                }
                // The one argument that holds a time of the stage's clock.
                if let Some(r) = e.pointer_mut("/args/received_us") {
                    if let Some(t) = r.as_f64() {
                        *r = (t - offset).into();
                    }
                }
            }
        }
        let main_pid = omni.and_then(|o| o.get("pid")).cloned();
        let window = omni.and_then(|o| {
            let w = o.get("window")?;
            let start = w.get("start_us")?.as_f64()? - offset;
            let stop = w.get("stop_us")?.as_f64()? - offset;
            (stop >= start).then_some((start, stop))
        });
        let process_name = omni
            .and_then(|o| o.get("process_name"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| process_name_in(&events, main_pid.as_ref()))
            .unwrap_or_else(|| stage_key.clone());
        traces.push(StageTrace {
            stage_id: stage_id_of(&stage_key),
            stage_key,
            process_name,
            main_pid,
            window,
            path,
            events,
        });
    }
    if traces.is_empty() {
        return Err(Error::NoTraces {
            path: dir.to_path_buf(),
        });
    }
    traces.sort_by(|a, b| {
        (a.stage_id.is_none(), a.stage_id, &a.stage_key, &a.path).cmp(&(
            b.stage_id.is_none(),
            b.stage_id,
            &b.stage_key,
            &b.path,
        ))
    });
    Ok(traces)
}

fn process_name_in(events: &[Value], pid: Option<&Value>) -> Option<String> {
    events
        .iter()
        .filter(|e| {
            e.get("ph").and_then(Value::as_str) == Some("M")
                && e.get("name").and_then(Value::as_str) == Some("process_name")
                && pid.is_none_or(|p| e.get("pid") == Some(p))
        })
        .find_map(|e| e.pointer("/args/name").and_then(Value::as_str))
        .map(str::to_owned)
}
