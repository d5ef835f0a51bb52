//! `summarize(dir)`: per stage the top operations by total time, and per
//! request where its time went, stage by stage.
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::trace_set::{load, ranges, request_ids_of, Range, StageTrace};
use crate::Result;

/// How many operations [`StageSummary::top_ops`] keeps.
const TOP_OPS: usize = 20;

/// How many of them the text output shows.
const SHOWN_OPS: usize = 15;

/// What [`summarize`] found under a directory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The directory summarized.
    pub dir: PathBuf,
    /// One entry per stage, in stage order.
    pub stages: Vec<StageSummary>,
    /// One entry per request named by a range (`request_ids`), in order of
    /// first appearance.
    pub requests: Vec<RequestSummary>,
}

/// One stage's profile (all its windows together).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageSummary {
    /// From the directory name `stage_<id>_...`.
    pub stage_id: Option<usize>,
    /// The process name in the trace, e.g. `stage 0 (thinker) SmolLM2-135M-Instruct`.
    pub name: String,
    /// The trace files read.
    pub files: Vec<PathBuf>,
    /// Number of engine steps (`ProfilerStep#<n>` ranges).
    pub steps: usize,
    /// Time covered by the stage's ranges, summed over its windows, in µs.
    pub span_us: f64,
    /// The operations (ranges, by name) with the most total time, most first.
    pub top_ops: Vec<OpStat>,
}

/// Time spent in one operation (all ranges of one name) in one stage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpStat {
    /// Range name (`aten::mm`, `forward`, `ProfilerStep#*` for all steps).
    pub name: String,
    /// Trace category (`cpu_op`, `user_annotation`, `kernel`, a tracing target...).
    pub category: String,
    /// Number of ranges.
    pub count: usize,
    /// Sum of their durations, µs (a range's children included).
    pub total_us: f64,
    /// Sum of their self time, µs (children on the same thread excluded).
    pub self_us: f64,
}

/// Where one request's time went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestSummary {
    /// The request id.
    pub request_id: String,
    /// The stages it went through, in order of arrival.
    pub stages: Vec<RequestStage>,
    /// From its arrival at the first stage to its departure from the last, µs.
    pub total_us: f64,
}

/// One request in one stage. Times in µs.
///
/// Derived from ranges that name the request (field `request_ids`): it
/// *arrives* when the stage's socket took it in (field `received_us` of the
/// first `stage_recv`, or in the first stage `add_request`, naming it; else
/// when that range ends); *compute* sums the engine steps
/// (`ProfilerStep#<n>`) that name it (steps are batched: other requests
/// share them); *queue* runs from arrival to the first of those steps; it
/// *leaves* when the last step or `stage_send` naming it ends.
///
/// Traces whose steps name no requests (older ones) fall back to time:
/// arrival at the start of the step in which a stage without `stage_recv`
/// first mentions it, departure at its last `stage_send`, and every step
/// in between counted as its compute.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestStage {
    /// Stage id, when the directory names it.
    pub stage_id: Option<usize>,
    /// Stage name (process name).
    pub stage: String,
    /// Arrival, µs since the UNIX epoch.
    pub arrived_us: f64,
    /// Departure, µs since the UNIX epoch.
    pub left_us: f64,
    /// Waiting for the first step.
    pub queue_us: f64,
    /// Engine steps while in the stage.
    pub compute_us: f64,
    /// From the previous stage starting to send it to this stage having
    /// received it; `None` for the first stage.
    pub transfer_us: Option<f64>,
}

struct Mention {
    stage: usize,
    kind: Kind,
    ts: f64,
    end: f64,
    /// When the stage's socket took the request in (`received_us`), which
    /// can be well before the model thread got to it (`ts`).
    received: Option<f64>,
}

impl Mention {
    /// When the stage had the request: its socket's time if recorded, else
    /// the end of the range.
    fn arrival(&self) -> f64 {
        self.received.unwrap_or(self.end)
    }
}

#[derive(PartialEq, Clone, Copy)]
enum Kind {
    Send,
    Recv,
    /// The first stage took the request from the orchestrator.
    Arrive,
    /// An engine step that computed the request.
    Step,
    Other,
}

/// Reads every trace under `dir` and summarizes it (see [`Summary`]).
pub fn summarize(dir: &Path) -> Result<Summary> {
    Ok(summarize_traces(dir, &load(dir)?, TOP_OPS))
}

/// [`summarize`] over traces already loaded, keeping `keep_ops` operations
/// per stage.
pub(crate) fn summarize_traces(dir: &Path, traces: &[StageTrace], keep_ops: usize) -> Summary {
    // Stage key -> index in `stages`; traces are sorted by stage.
    let mut stage_index: BTreeMap<String, usize> = BTreeMap::new();
    let mut stages: Vec<StageSummary> = Vec::new();
    let mut op_stats: Vec<HashMap<(String, String), OpStat>> = Vec::new();
    let mut steps_of: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut mentions: BTreeMap<String, Vec<Mention>> = BTreeMap::new();
    let mut first_seen: HashMap<String, f64> = HashMap::new();

    for trace in traces {
        let si = *stage_index
            .entry(trace.stage_key.clone())
            .or_insert_with(|| {
                stages.push(StageSummary {
                    stage_id: trace.stage_id,
                    name: trace.process_name.clone(),
                    files: Vec::new(),
                    steps: 0,
                    span_us: 0.0,
                    top_ops: Vec::new(),
                });
                op_stats.push(HashMap::new());
                steps_of.push(Vec::new());
                stages.len() - 1
            });
        let stage = &mut stages[si];
        stage.files.push(trace.path.clone());
        let all: Vec<Range<'_>> = ranges(&trace.events).collect();
        let (lo, hi) = all
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
                (lo.min(r.ts), hi.max(r.end()))
            });
        if hi > lo {
            stage.span_us += hi - lo;
        }
        let self_times = self_times(&all);
        for (r, self_us) in all.iter().zip(self_times) {
            if r.cat == "Trace" {
                // Kineto's range over the whole window, not an operation.
                continue;
            }
            let is_step = is_engine_step(r.name, r.cat);
            if is_step {
                stage.steps += 1;
                steps_of[si].push((r.ts, r.end()));
            }
            let name = if is_step { "ProfilerStep#*" } else { r.name };
            let stat = op_stats[si]
                .entry((name.to_owned(), r.cat.to_owned()))
                .or_insert_with(|| OpStat {
                    name: name.to_owned(),
                    category: r.cat.to_owned(),
                    count: 0,
                    total_us: 0.0,
                    self_us: 0.0,
                });
            stat.count += 1;
            stat.total_us += r.dur;
            stat.self_us += self_us;
            let Some(args) = r.args else { continue };
            let ids = request_ids_of(args);
            if ids.is_empty() {
                continue;
            }
            let kind = match r.name {
                "stage_send" => Kind::Send,
                "stage_recv" => Kind::Recv,
                "add_request" => Kind::Arrive,
                _ if is_step => Kind::Step,
                _ => Kind::Other,
            };
            let received = args
                .get("received_us")
                .and_then(Value::as_f64)
                .filter(|t| *t <= r.end());
            for id in ids {
                let seen = first_seen.entry(id.clone()).or_insert(r.ts);
                *seen = seen.min(r.ts);
                mentions.entry(id).or_default().push(Mention {
                    stage: si,
                    kind,
                    ts: r.ts,
                    end: r.end(),
                    received,
                });
            }
        }
    }
    for (stage, stats) in stages.iter_mut().zip(op_stats) {
        let mut ops: Vec<OpStat> = stats.into_values().collect();
        ops.sort_by(|a, b| b.total_us.total_cmp(&a.total_us).then(a.name.cmp(&b.name)));
        ops.truncate(keep_ops);
        stage.top_ops = ops;
    }
    for steps in &mut steps_of {
        steps.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    let mut requests: Vec<RequestSummary> = mentions
        .into_iter()
        .map(|(id, ms)| request_summary(id, &ms, &stages, &steps_of))
        .collect();
    requests.sort_by(|a, b| {
        let fa = first_seen
            .get(&a.request_id)
            .copied()
            .unwrap_or(f64::INFINITY);
        let fb = first_seen
            .get(&b.request_id)
            .copied()
            .unwrap_or(f64::INFINITY);
        fa.total_cmp(&fb).then(a.request_id.cmp(&b.request_id))
    });
    Summary {
        dir: dir.to_path_buf(),
        stages,
        requests,
    }
}

/// Self time of each range: its duration minus its direct children's on the
/// same thread (ranges nest per thread in Chrome traces).
fn self_times(all: &[Range<'_>]) -> Vec<f64> {
    let mut out: Vec<f64> = all.iter().map(|r| r.dur).collect();
    let mut by_thread: HashMap<(String, String), Vec<usize>> = HashMap::new();
    for (i, r) in all.iter().enumerate() {
        by_thread
            .entry((r.pid.to_string(), r.tid.to_string()))
            .or_default()
            .push(i);
    }
    for mut idx in by_thread.into_values() {
        // Parents first: earlier start, then longer.
        idx.sort_by(|&a, &b| {
            all[a]
                .ts
                .total_cmp(&all[b].ts)
                .then(all[b].dur.total_cmp(&all[a].dur))
        });
        let mut stack: Vec<usize> = Vec::new();
        for i in idx {
            while let Some(&top) = stack.last() {
                if all[i].ts >= all[top].end() {
                    stack.pop();
                } else {
                    break;
                }
            }
            if let Some(&parent) = stack.last() {
                out[parent] -= all[i].dur.min(all[parent].end() - all[i].ts);
            }
            stack.push(i);
        }
    }
    out.iter_mut().for_each(|v| *v = v.max(0.0));
    out
}

/// Queue and compute of a request from time alone, for traces whose steps
/// do not name their requests: the steps from the first one after arrival
/// until it left.
fn steps_between(steps: &[(f64, f64)], arrived_us: f64, left_us: f64) -> (f64, f64) {
    let first_step = steps
        .iter()
        .find(|(s, _)| *s >= arrived_us)
        .map(|(s, _)| *s);
    match first_step {
        Some(start) if start <= left_us => {
            let compute = steps
                .iter()
                .filter(|(s, _)| *s >= start && *s < left_us)
                .map(|(s, e)| e.min(left_us) - s)
                .sum();
            (start - arrived_us, compute)
        }
        _ => (0.0, 0.0),
    }
}

fn request_summary(
    request_id: String,
    mentions: &[Mention],
    stages: &[StageSummary],
    steps_of: &[Vec<(f64, f64)>],
) -> RequestSummary {
    let mut by_stage: BTreeMap<usize, Vec<&Mention>> = BTreeMap::new();
    for m in mentions {
        by_stage.entry(m.stage).or_default().push(m);
    }
    let sends: Vec<&Mention> = mentions.iter().filter(|m| m.kind == Kind::Send).collect();
    let mut out: Vec<RequestStage> = Vec::new();
    for (si, ms) in by_stage {
        let first_recv = ms
            .iter()
            .filter(|m| m.kind == Kind::Recv)
            .min_by(|a, b| a.ts.total_cmp(&b.ts));
        let first_arrival = ms
            .iter()
            .filter(|m| m.kind == Kind::Recv || m.kind == Kind::Arrive)
            .min_by(|a, b| a.ts.total_cmp(&b.ts));
        let its_steps: Vec<&&Mention> = ms.iter().filter(|m| m.kind == Kind::Step).collect();
        let steps = &steps_of[si];
        let arrived_us = match first_arrival {
            Some(r) => r.arrival(),
            None => {
                // It was there by the start of the step in which it is
                // first mentioned.
                let first = ms.iter().map(|m| m.ts).fold(f64::INFINITY, f64::min);
                steps
                    .iter()
                    .find(|(s, e)| *s <= first && first <= *e)
                    .map_or(first, |(s, _)| *s)
            }
        };
        let leaving: Vec<&&Mention> = ms
            .iter()
            .filter(|m| m.kind == Kind::Send || m.kind == Kind::Step)
            .collect();
        let left_us = if leaving.is_empty() {
            ms.iter().map(|m| m.end).fold(arrived_us, f64::max)
        } else {
            leaving.iter().map(|m| m.end).fold(arrived_us, f64::max)
        };
        let (queue_us, compute_us) = if its_steps.is_empty() {
            steps_between(steps, arrived_us, left_us)
        } else {
            let first = its_steps.iter().map(|m| m.ts).fold(f64::INFINITY, f64::min);
            let compute = its_steps.iter().map(|m| m.end - m.ts).sum();
            ((first - arrived_us).max(0.0), compute)
        };
        let transfer_us = first_recv.and_then(|r| {
            let received = r.arrival();
            sends
                .iter()
                .filter(|s| s.stage != si && s.ts <= received)
                .map(|s| s.ts)
                .fold(None, |acc: Option<f64>, t| {
                    Some(acc.map_or(t, |a| a.max(t)))
                })
                .map(|sent| received - sent)
        });
        out.push(RequestStage {
            stage_id: stages[si].stage_id,
            stage: stages[si].name.clone(),
            arrived_us,
            left_us,
            queue_us,
            compute_us,
            transfer_us,
        });
    }
    out.sort_by(|a, b| a.arrived_us.total_cmp(&b.arrived_us));
    let total_us = match (out.first(), out.last()) {
        (Some(first), Some(last)) => last.left_us - first.arrived_us,
        _ => 0.0,
    };
    RequestSummary {
        request_id,
        stages: out,
        total_us,
    }
}

fn ms(us: f64) -> String {
    format!("{:.3}", us / 1000.0)
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, SHOWN_OPS, usize::MAX)
    }
}

/// A [`Summary`] shown with at most so many operations per stage and
/// requests.
pub struct Compact<'a> {
    summary: &'a Summary,
    max_ops: usize,
    max_requests: usize,
}

impl fmt::Display for Compact<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.summary.write(f, self.max_ops, self.max_requests)
    }
}

impl Summary {
    /// The summary with its top `max_ops` operations per stage and its
    /// first `max_requests` requests only (the rest counted), for output
    /// that should fit a screen.
    pub fn display_compact(&self, max_ops: usize, max_requests: usize) -> Compact<'_> {
        Compact {
            summary: self,
            max_ops,
            max_requests,
        }
    }

    fn write(
        &self,
        f: &mut fmt::Formatter<'_>,
        max_ops: usize,
        max_requests: usize,
    ) -> fmt::Result {
        writeln!(f, "profile summary of {}", self.dir.display())?;
        for stage in &self.stages {
            writeln!(f)?;
            writeln!(
                f,
                "== {} ({} file(s), {} step(s), {} ms recorded)",
                stage.name,
                stage.files.len(),
                stage.steps,
                ms(stage.span_us)
            )?;
            writeln!(
                f,
                "  {:>10} {:>10} {:>8}  {:<16} name",
                "total ms", "self ms", "count", "category"
            )?;
            for op in stage.top_ops.iter().take(max_ops) {
                writeln!(
                    f,
                    "  {:>10} {:>10} {:>8}  {:<16} {}",
                    ms(op.total_us),
                    ms(op.self_us),
                    op.count,
                    truncate(&op.category, 16),
                    op.name
                )?;
            }
        }
        if !self.requests.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "== requests (ms; transfer = from the sender's stage_send to this stage's socket, queue = to its first step, compute = the steps that computed it)"
            )?;
            for req in self.requests.iter().take(max_requests) {
                writeln!(f, "  {}  total {}", req.request_id, ms(req.total_us))?;
                for s in &req.stages {
                    let transfer = s.transfer_us.map(ms).unwrap_or_else(|| "-".to_owned());
                    writeln!(
                        f,
                        "    {:<40} transfer {:>9}  queue {:>9}  compute {:>9}  in stage {:>9}",
                        truncate(&s.stage, 40),
                        transfer,
                        ms(s.queue_us),
                        ms(s.compute_us),
                        ms(s.left_us - s.arrived_us)
                    )?;
                }
            }
            if self.requests.len() > max_requests {
                writeln!(
                    f,
                    "  ... {} more (--json lists every request)",
                    self.requests.len() - max_requests
                )?;
            }
        }
        Ok(())
    }
}

/// An engine step on the host. Kineto mirrors each step range on the GPU
/// streams (`gpu_user_annotation`); counting those would count steps twice.
pub(crate) fn is_engine_step(name: &str, category: &str) -> bool {
    name.starts_with("ProfilerStep#") && category != "gpu_user_annotation"
}

/// Milliseconds to a tenth, for the analysis and diff tables (the summary's
/// own columns keep microsecond precision).
pub(crate) fn ms_tenths(us: f64) -> String {
    format!("{:.1}", us / 1000.0)
}

pub(crate) fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        s.chars().take(n.saturating_sub(1)).chain(['…']).collect()
    }
}
