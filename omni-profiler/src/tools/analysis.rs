//! `analyze(dir)`: which stage holds the pipeline back. Per stage, how its
//! profiled windows split into busy (engine steps) and idle time, the idle
//! time by cause, and how full its batches were; the bottleneck; per
//! request, the part of its latency that dominated.
//!
//! Idle time is classified at each moment by where the requests were:
//! - *holding*: the stage holds a request it is still computing but is not
//!   stepping (between steps: scheduling, input processing, its socket);
//! - *blocked*: every request it holds is computed and waits to be taken
//!   downstream (only visible as send time while queues are unbounded);
//! - *starved*: it holds nothing, but a request that will come to it is
//!   upstream or in transit;
//! - *empty*: no work anywhere that will reach it.
//!
//! A request counts as upstream from its arrival at the first stage that
//! was profiled: with only some stages profiled, the first of them is never
//! starved.
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::summarize::{
    is_engine_step, ms_tenths as ms, summarize_traces, truncate, RequestSummary, Summary,
};
use super::trace_set::{load, ranges, request_ids_of, StageTrace};
use crate::Result;

/// How many operations per stage the text output shows (`--json` has all).
const SHOWN_OPS: usize = 8;

/// Below this busy share, even the busiest stage idles most of the time.
const UNDER_LOADED: f64 = 0.5;

/// Roles of stages whose output is audio (the `model_stage` in a process
/// name `stage <id> (<role>) <model>`).
const AUDIO_ROLES: [&str; 3] = ["code2wav", "vocoder", "vits"];

/// What [`analyze`] found under a directory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Analysis {
    /// Top operations per stage and each request's path (see [`Summary`]).
    pub summary: Summary,
    /// Each stage's load, in stage order.
    pub stages: Vec<StageLoad>,
    /// The stage that limits the pipeline, when any stage stepped.
    pub bottleneck: Option<Bottleneck>,
    /// Per request, what its latency was mostly made of.
    pub requests: Vec<CriticalPath>,
}

/// One stage's time over its profiled windows. Times in µs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageLoad {
    /// From the directory name `stage_<id>_...`.
    pub stage_id: Option<usize>,
    /// The process name in the trace.
    pub name: String,
    /// The windows' length, summed (each file is one window: from the
    /// profiler's start to its stop, or from the first event to the last in
    /// traces that do not record the window).
    pub window_us: f64,
    /// Engine steps (`ProfilerStep#<n>`).
    pub busy_us: f64,
    /// The rest of the window, by cause.
    pub idle: Idle,
    /// How full the steps were.
    pub occupancy: Occupancy,
}

impl StageLoad {
    /// Busy time as a share of the window, 0 to 1.
    pub fn busy_share(&self) -> f64 {
        share(self.busy_us, self.window_us)
    }
}

/// Idle time by cause (see the module docs). µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Idle {
    /// Holding a request it is still computing, between steps.
    pub holding_us: f64,
    /// Holding only computed requests that wait to be taken downstream.
    pub blocked_us: f64,
    /// Holding nothing while a request bound for it is upstream or in transit.
    pub starved_us: f64,
    /// Nothing held and nothing coming.
    pub empty_us: f64,
}

/// Sequences and tokens per engine step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Occupancy {
    /// Steps recorded.
    pub steps: usize,
    /// Requests a step computed (from the step's `request_ids`).
    pub sequences: Option<Spread>,
    /// Tokens a step's forward passes took in (their `num_tokens`).
    pub tokens: Option<Spread>,
}

/// Minimum, median and maximum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// The smallest value.
    pub min: f64,
    /// The middle value (the mean of the two middle ones for an even count).
    pub median: f64,
    /// The largest value.
    pub max: f64,
}

/// The stage whose busy share is highest, with the numbers that say so.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bottleneck {
    /// From the directory name `stage_<id>_...`.
    pub stage_id: Option<usize>,
    /// The process name in the trace.
    pub name: String,
    /// One line: its busy share, and how the other stages spent their idle
    /// time.
    pub evidence: String,
}

/// The part of one request's latency that dominated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CriticalPath {
    /// The request id, as the stages name it.
    pub request_id: String,
    /// From its arrival at the first stage to its departure from the last.
    pub total_us: f64,
    /// The largest of its transfers, queues and computes.
    pub dominant: Option<PathPart>,
    /// From its arrival at the first stage to the end of the first step
    /// that computed it in the last stage it reached.
    pub first_output_us: Option<f64>,
    /// The same, when that last stage makes audio: time to first audio.
    pub first_audio_us: Option<f64>,
}

/// One piece of a request's latency.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathPart {
    /// The stage, when the directory names it.
    pub stage_id: Option<usize>,
    /// The stage's process name.
    pub stage: String,
    /// `transfer`, `queue` or `compute`.
    pub kind: &'static str,
    /// Its length, µs.
    pub us: f64,
    /// Of the request's total, 0 to 1.
    pub share: f64,
}

/// One engine step of one stage.
struct Step {
    ts: f64,
    end: f64,
    ids: Vec<String>,
    tokens: Option<f64>,
}

/// What one stage recorded, in time order.
struct StageTimeline {
    windows: Vec<(f64, f64)>,
    steps: Vec<Step>,
}

/// Reads every trace under `dir` and analyzes it (see [`Analysis`]).
pub fn analyze(dir: &Path) -> Result<Analysis> {
    let traces = load(dir)?;
    let summary = summarize_traces(dir, &traces, usize::MAX);
    let timelines = timelines(&traces);
    let stages: Vec<StageLoad> = summary
        .stages
        .iter()
        .zip(&timelines)
        .enumerate()
        .map(|(si, (s, tl))| StageLoad {
            stage_id: s.stage_id,
            name: s.name.clone(),
            window_us: tl.windows.iter().map(|(a, b)| b - a).sum(),
            busy_us: union(tl.steps.iter().map(|st| (st.ts, st.end)).collect())
                .iter()
                .map(|(a, b)| b - a)
                .sum(),
            idle: idle(si, tl, &summary),
            occupancy: occupancy(&tl.steps),
        })
        .collect();
    let bottleneck = bottleneck(&stages);
    // Per stage, each request's first step's end (steps are in time order).
    let first_steps: Vec<HashMap<&str, f64>> = timelines
        .iter()
        .map(|tl| {
            let mut m = HashMap::new();
            for st in &tl.steps {
                for id in &st.ids {
                    m.entry(id.as_str()).or_insert(st.end);
                }
            }
            m
        })
        .collect();
    let requests = summary
        .requests
        .iter()
        .map(|r| critical_path(r, &summary, &first_steps))
        .collect();
    Ok(Analysis {
        summary,
        stages,
        bottleneck,
        requests,
    })
}

/// Windows and steps per stage, in the order [`summarize_traces`] lists
/// stages (by stage key, as the traces are sorted).
fn timelines(traces: &[StageTrace]) -> Vec<StageTimeline> {
    let mut out: Vec<StageTimeline> = Vec::new();
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for trace in traces {
        let si = *index.entry(trace.stage_key.as_str()).or_insert_with(|| {
            out.push(StageTimeline {
                windows: Vec::new(),
                steps: Vec::new(),
            });
            out.len() - 1
        });
        let tl = &mut out[si];
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        let (mut first_step, mut last_step) = (f64::INFINITY, f64::NEG_INFINITY);
        let mut forwards: Vec<(f64, f64)> = Vec::new();
        for r in ranges(&trace.events) {
            lo = lo.min(r.ts);
            hi = hi.max(r.end());
            if is_engine_step(r.name, r.cat) {
                first_step = first_step.min(r.ts);
                last_step = last_step.max(r.end());
                tl.steps.push(Step {
                    ts: r.ts,
                    end: r.end(),
                    ids: r.args.map(request_ids_of).unwrap_or_default(),
                    tokens: None,
                });
            } else if r.name == "forward" {
                if let Some(n) = r
                    .args
                    .and_then(|a| a.get("num_tokens"))
                    .and_then(Value::as_f64)
                {
                    forwards.push((r.ts, n));
                }
            }
        }
        // The recorded window, else (older traces) its first event to its
        // last; a step a little outside the recorded bounds widens it.
        match trace.window {
            Some((start, stop)) => tl
                .windows
                .push((start.min(first_step), stop.max(last_step))),
            None if hi > lo => tl.windows.push((lo, hi)),
            None => {}
        }
        tl.steps.sort_by(|a, b| a.ts.total_cmp(&b.ts));
        for (ts, n) in forwards {
            if let Some(i) = step_index(&tl.steps, ts) {
                *tl.steps[i].tokens.get_or_insert(0.0) += n;
            }
        }
    }
    for tl in &mut out {
        // Windows of one stage do not overlap unless files were copied
        // together from two runs; counting such time once keeps shares sane.
        tl.windows = union(std::mem::take(&mut tl.windows));
        tl.steps.sort_by(|a, b| a.ts.total_cmp(&b.ts));
    }
    out
}

/// Overlapping intervals merged, sorted by start.
fn union(mut spans: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(spans.len());
    for (a, b) in spans {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// The index of the step (sorted by start) whose range holds `t`; steps of
/// one stage run one after another.
fn step_index(steps: &[Step], t: f64) -> Option<usize> {
    let i = steps.partition_point(|s| s.ts <= t).checked_sub(1)?;
    (t < steps[i].end).then_some(i)
}

/// One request as one stage sees it, for classifying that stage's idle time.
struct Visit {
    /// When the request reached the pipeline's first stage.
    entered: f64,
    arrived: f64,
    left: f64,
    /// End of the last step that computed it here.
    computed: Option<f64>,
}

fn visits(si: usize, tl: &StageTimeline, summary: &Summary) -> Vec<Visit> {
    let stage = &summary.stages[si];
    let mut last_step: HashMap<&str, f64> = HashMap::new();
    for step in &tl.steps {
        for id in &step.ids {
            let e = last_step.entry(id.as_str()).or_insert(step.end);
            *e = e.max(step.end);
        }
    }
    summary
        .requests
        .iter()
        .filter_map(|r| {
            let here = r
                .stages
                .iter()
                .find(|s| s.stage_id == stage.stage_id && s.stage == stage.name)?;
            Some(Visit {
                entered: r.stages.first().map_or(here.arrived_us, |s| s.arrived_us),
                arrived: here.arrived_us,
                left: here.left_us,
                computed: last_step.get(r.request_id.as_str()).copied(),
            })
        })
        .collect()
}

/// The stage's time outside its steps, split by cause at every moment
/// something changed (a step, an arrival, a departure).
fn idle(si: usize, tl: &StageTimeline, summary: &Summary) -> Idle {
    let visits = visits(si, tl, summary);
    let mut out = Idle::default();
    for &(lo, hi) in &tl.windows {
        let mut cuts: Vec<f64> = vec![lo, hi];
        for s in &tl.steps {
            cuts.extend([s.ts, s.end]);
        }
        for v in &visits {
            cuts.extend([v.entered, v.arrived, v.left]);
            cuts.extend(v.computed);
        }
        cuts.retain(|t| (lo..=hi).contains(t));
        cuts.sort_by(f64::total_cmp);
        cuts.dedup();
        for pair in cuts.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let mid = (a + b) / 2.0;
            if step_index(&tl.steps, mid).is_some() {
                continue;
            }
            let held: Vec<&Visit> = visits
                .iter()
                .filter(|v| v.arrived <= mid && mid < v.left)
                .collect();
            let bucket = if !held.is_empty() {
                if held.iter().all(|v| v.computed.is_some_and(|c| c <= mid)) {
                    &mut out.blocked_us
                } else {
                    &mut out.holding_us
                }
            } else if visits.iter().any(|v| v.entered <= mid && mid < v.arrived) {
                &mut out.starved_us
            } else {
                &mut out.empty_us
            };
            *bucket += b - a;
        }
    }
    out
}

fn spread(mut v: Vec<f64>) -> Option<Spread> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        min: v[0],
        median,
        max: v[n - 1],
    })
}

fn occupancy(steps: &[Step]) -> Occupancy {
    Occupancy {
        steps: steps.len(),
        sequences: spread(
            steps
                .iter()
                .filter(|s| !s.ids.is_empty())
                .map(|s| s.ids.len() as f64)
                .collect(),
        ),
        tokens: spread(steps.iter().filter_map(|s| s.tokens).collect()),
    }
}

fn share(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        part / whole
    } else {
        0.0
    }
}

fn pct(part: f64, whole: f64) -> String {
    format!("{:.0}%", 100.0 * share(part, whole))
}

/// The stage busy the largest share of its window; the evidence says how
/// the others spent theirs (starved: waiting on it or on a stage before
/// it; empty: nothing left for them).
fn bottleneck(stages: &[StageLoad]) -> Option<Bottleneck> {
    let top = stages
        .iter()
        .filter(|s| s.occupancy.steps > 0)
        .max_by(|a, b| a.busy_share().total_cmp(&b.busy_share()))?;
    let others: Vec<String> = stages
        .iter()
        .filter(|s| !std::ptr::eq(*s, top))
        .map(|s| {
            format!(
                "{} busy {}, starved {}, empty {}",
                short_name(s),
                pct(s.busy_us, s.window_us),
                pct(s.idle.starved_us, s.window_us),
                pct(s.idle.empty_us, s.window_us)
            )
        })
        .collect();
    let mut evidence = format!(
        "{} busy {} of its window (holding {}, blocked {})",
        short_name(top),
        pct(top.busy_us, top.window_us),
        pct(top.idle.holding_us, top.window_us),
        pct(top.idle.blocked_us, top.window_us)
    );
    if top.busy_share() < UNDER_LOADED {
        // The busiest stage still idles most of the time: more load, not
        // a faster stage, is what this profile asks for.
        evidence.insert_str(0, "under-loaded: ");
    }
    if !others.is_empty() {
        evidence.push_str(" while ");
        evidence.push_str(&others.join("; "));
    }
    Some(Bottleneck {
        stage_id: top.stage_id,
        name: top.name.clone(),
        evidence,
    })
}

/// `stage 1 (summarizer)` of `stage 1 (summarizer) SmolLM2-135M-Instruct`.
fn short_name(s: &StageLoad) -> String {
    match s.name.find(')') {
        Some(i) if s.name.starts_with("stage ") => s.name[..=i].to_owned(),
        _ => match s.stage_id {
            Some(id) => format!("stage {id}"),
            None => s.name.clone(),
        },
    }
}

fn role_of(name: &str) -> Option<&str> {
    let open = name.find('(')?;
    let close = name[open..].find(')')? + open;
    Some(&name[open + 1..close])
}

fn critical_path(
    r: &RequestSummary,
    summary: &Summary,
    first_steps: &[HashMap<&str, f64>],
) -> CriticalPath {
    let mut dominant: Option<PathPart> = None;
    for s in &r.stages {
        let parts = [
            ("transfer", s.transfer_us.unwrap_or(0.0)),
            ("queue", s.queue_us),
            ("compute", s.compute_us),
        ];
        for (kind, us) in parts {
            if dominant.as_ref().is_none_or(|d| us > d.us) && us > 0.0 {
                dominant = Some(PathPart {
                    stage_id: s.stage_id,
                    stage: s.stage.clone(),
                    kind,
                    us,
                    share: share(us, r.total_us),
                });
            }
        }
    }
    let entered = r.stages.first().map(|s| s.arrived_us);
    let last = r.stages.last();
    let first_output_us = last.zip(entered).and_then(|(last, entered)| {
        let si = summary
            .stages
            .iter()
            .position(|s| s.stage_id == last.stage_id && s.name == last.stage)?;
        first_steps[si]
            .get(r.request_id.as_str())
            .map(|end| end - entered)
    });
    let audio = last
        .and_then(|l| role_of(&l.stage))
        .is_some_and(|role| AUDIO_ROLES.contains(&role));
    CriticalPath {
        request_id: r.request_id.clone(),
        total_us: r.total_us,
        dominant,
        first_output_us,
        first_audio_us: first_output_us.filter(|_| audio),
    }
}

/// Requests listed in the text output; `--json` has them all.
const SHOWN_REQUESTS: usize = 8;

impl fmt::Display for Analysis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            self.summary.display_compact(SHOWN_OPS, SHOWN_REQUESTS)
        )?;
        writeln!(f)?;
        writeln!(f, "== load (share of the profiled windows)")?;
        writeln!(
            f,
            "   idle: holding = between its own steps, blocked = waiting to hand over, starved = \
             waiting on upstream, empty = nothing coming"
        )?;
        writeln!(f, "   batch: sequences and tokens per step, min/median/max")?;
        for s in &self.stages {
            let o = &s.occupancy;
            let seqs = o.sequences.map_or("-".to_owned(), |p| {
                format!("{}/{}/{}", p.min, p.median, p.max)
            });
            let toks = o.tokens.map_or("-".to_owned(), |p| {
                format!("{}/{}/{}", p.min, p.median, p.max)
            });
            writeln!(
                f,
                "  {:<40} window {:>8} ms  busy {:>4}  holding {:>4}  blocked {:>4}  starved {:>4}  \
                 empty {:>4}  batch seqs {seqs} tokens {toks}",
                truncate(&s.name, 40),
                ms(s.window_us),
                pct(s.busy_us, s.window_us),
                pct(s.idle.holding_us, s.window_us),
                pct(s.idle.blocked_us, s.window_us),
                pct(s.idle.starved_us, s.window_us),
                pct(s.idle.empty_us, s.window_us),
            )?;
        }
        match &self.bottleneck {
            Some(b) => writeln!(f, "bottleneck: {}", b.evidence)?,
            None => writeln!(f, "bottleneck: none (no stage recorded a step)")?,
        }
        if !self.requests.is_empty() {
            writeln!(f)?;
            writeln!(f, "== critical path per request (ms)")?;
            for r in self.requests.iter().take(SHOWN_REQUESTS) {
                let dominant = r.dominant.as_ref().map_or("-".to_owned(), |d| {
                    format!(
                        "{} {} {} ({:.0}%)",
                        truncate(&d.stage, 24),
                        d.kind,
                        ms(d.us),
                        100.0 * d.share
                    )
                });
                let first = match (r.first_audio_us, r.first_output_us) {
                    (Some(a), _) => format!("  first audio {}", ms(a)),
                    (None, Some(o)) => format!("  first output of the last stage {}", ms(o)),
                    _ => String::new(),
                };
                writeln!(
                    f,
                    "  {}  total {}  mostly {dominant}{first}",
                    r.request_id,
                    ms(r.total_us)
                )?;
            }
            if self.requests.len() > SHOWN_REQUESTS {
                writeln!(
                    f,
                    "  ... {} more (--json lists every request)",
                    self.requests.len() - SHOWN_REQUESTS
                )?;
            }
        }
        Ok(())
    }
}
