//! `diff(a, b)`: what got slower or faster between two profiles of a
//! pipeline, per stage (its steps' time), per operation category (self
//! time) and per operation (total time), each list sorted by the size of
//! the change, so that a regression is at the top.
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::summarize::{ms_tenths as ms, summarize_traces, truncate, StageSummary};
use super::trace_set::load;
use crate::Result;

/// Rows of each list the text output shows; `--json` has them all.
const SHOWN_ROWS: usize = 10;

/// What [`diff`] found between two profiler directories.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProfileDiff {
    /// The profile compared against (before).
    pub a: PathBuf,
    /// The profile compared (after).
    pub b: PathBuf,
    /// Per stage, its steps' time; largest change first.
    pub stages: Vec<StageChange>,
    /// Per stage and operation category (`cpu_op`, `user_annotation`, a
    /// tracing target, ...), the self time of its operations; largest
    /// change first.
    pub categories: Vec<OpChange>,
    /// Per stage and operation, total time; largest change first.
    pub ops: Vec<OpChange>,
}

/// One stage in both profiles. Times in µs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageChange {
    /// From the directory name `stage_<id>_...`.
    pub stage_id: Option<usize>,
    /// The process name in the trace.
    pub name: String,
    /// Engine steps in profile a.
    pub steps_a: usize,
    /// Engine steps in profile b.
    pub steps_b: usize,
    /// Time in engine steps in profile a.
    pub busy_a_us: f64,
    /// Time in engine steps in profile b.
    pub busy_b_us: f64,
    /// `busy_b_us - busy_a_us`.
    pub change_us: f64,
    /// Per step in profile a.
    pub per_step_a_us: Option<f64>,
    /// Per step in profile b.
    pub per_step_b_us: Option<f64>,
}

/// One operation (or category) of one stage in both profiles. Times in µs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpChange {
    /// The stage, when the directory names it.
    pub stage_id: Option<usize>,
    /// The stage's process name.
    pub stage: String,
    /// The operation's name (the category's, in [`ProfileDiff::categories`]).
    pub name: String,
    /// The operation's category.
    pub category: String,
    /// Total (self time, for a category) in profile a.
    pub total_a_us: f64,
    /// The same in profile b.
    pub total_b_us: f64,
    /// `total_b_us - total_a_us`.
    pub change_us: f64,
    /// Per step of the stage in profile a.
    pub per_step_a_us: Option<f64>,
    /// Per step of the stage in profile b.
    pub per_step_b_us: Option<f64>,
}

/// Compares the profiles under `a` and `b` (see [`ProfileDiff`]). Stages
/// are matched by stage id (by process name when a directory names none);
/// a matched stage is shown under its name in `b`.
pub fn diff(a: &Path, b: &Path) -> Result<ProfileDiff> {
    let sa = summarize_traces(a, &load(a)?, usize::MAX);
    let sb = summarize_traces(b, &load(b)?, usize::MAX);
    let mut pairs: BTreeMap<String, (Option<&StageSummary>, Option<&StageSummary>)> =
        BTreeMap::new();
    for s in &sa.stages {
        pairs.entry(stage_key(s)).or_default().0 = Some(s);
    }
    for s in &sb.stages {
        pairs.entry(stage_key(s)).or_default().1 = Some(s);
    }
    let mut stages = Vec::new();
    let mut categories = Vec::new();
    let mut ops = Vec::new();
    for (x, y) in pairs.into_values() {
        let Some(named) = y.or(x) else { continue };
        let steps = |s: Option<&StageSummary>| s.map_or(0, |s| s.steps);
        let per_step = |total: f64, s: Option<&StageSummary>| {
            let n = steps(s);
            (n > 0).then(|| total / n as f64)
        };
        let (busy_a, busy_b) = (busy(x), busy(y));
        stages.push(StageChange {
            stage_id: named.stage_id,
            name: named.name.clone(),
            steps_a: steps(x),
            steps_b: steps(y),
            busy_a_us: busy_a,
            busy_b_us: busy_b,
            change_us: busy_b - busy_a,
            per_step_a_us: per_step(busy_a, x),
            per_step_b_us: per_step(busy_b, y),
        });
        let row = |name: &str, category: &str, ta: f64, tb: f64| OpChange {
            stage_id: named.stage_id,
            stage: named.name.clone(),
            name: name.to_owned(),
            category: category.to_owned(),
            total_a_us: ta,
            total_b_us: tb,
            change_us: tb - ta,
            per_step_a_us: per_step(ta, x),
            per_step_b_us: per_step(tb, y),
        };
        let (cat_a, op_a) = totals(x);
        let (cat_b, op_b) = totals(y);
        for cat in keys(&cat_a, &cat_b) {
            let (ta, tb) = (get(&cat_a, &cat), get(&cat_b, &cat));
            categories.push(row(&cat, &cat, ta, tb));
        }
        for key in keys(&op_a, &op_b) {
            let (ta, tb) = (get(&op_a, &key), get(&op_b, &key));
            ops.push(row(&key.0, &key.1, ta, tb));
        }
    }
    stages.sort_by(|p, q| q.change_us.abs().total_cmp(&p.change_us.abs()));
    categories.sort_by(|p, q| q.change_us.abs().total_cmp(&p.change_us.abs()));
    ops.sort_by(|p, q| q.change_us.abs().total_cmp(&p.change_us.abs()));
    Ok(ProfileDiff {
        a: sa.dir,
        b: sb.dir,
        stages,
        categories,
        ops,
    })
}

fn stage_key(s: &StageSummary) -> String {
    match s.stage_id {
        Some(id) => format!("{id:08}"),
        None => s.name.clone(),
    }
}

/// Time in the stage's steps.
fn busy(s: Option<&StageSummary>) -> f64 {
    s.and_then(|s| s.top_ops.iter().find(|o| o.name == "ProfilerStep#*"))
        .map_or(0.0, |o| o.total_us)
}

type Totals<K> = BTreeMap<K, f64>;

/// The category of a step's own time, outside every operation in it.
const STEP_OUTSIDE_OPS: &str = "(step, outside any op)";

/// Self time per category, total time per (operation, category). Steps
/// are not operations (they are the stage's busy time, and every
/// operation is inside one); their own self time is a category.
fn totals(s: Option<&StageSummary>) -> (Totals<String>, Totals<(String, String)>) {
    let mut cats = Totals::new();
    let mut ops = Totals::new();
    for op in s.map_or(&[][..], |s| s.top_ops.as_slice()) {
        if op.name == "ProfilerStep#*" {
            // Its self time is the step's work outside any recorded
            // operation: a category of its own, so categories add up to the
            // steps' change.
            *cats.entry(STEP_OUTSIDE_OPS.to_owned()).or_insert(0.0) += op.self_us;
            continue;
        }
        *cats.entry(op.category.clone()).or_insert(0.0) += op.self_us;
        ops.insert((op.name.clone(), op.category.clone()), op.total_us);
    }
    (cats, ops)
}

fn keys<K: Ord + Clone>(a: &Totals<K>, b: &Totals<K>) -> Vec<K> {
    let mut k: Vec<K> = a.keys().chain(b.keys()).cloned().collect();
    k.sort();
    k.dedup();
    k
}

fn get<K: Ord>(t: &Totals<K>, k: &K) -> f64 {
    t.get(k).copied().unwrap_or(0.0)
}

fn signed_ms(us: f64) -> String {
    format!("{:+.1}", us / 1000.0)
}

fn per_step(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |us| format!("{:.2}", us / 1000.0))
}

impl fmt::Display for ProfileDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "profile diff: {} (a) -> {} (b); ms, largest change first",
            self.a.display(),
            self.b.display()
        )?;
        writeln!(f)?;
        writeln!(f, "== stages (time in engine steps)")?;
        for s in &self.stages {
            writeln!(
                f,
                "  {:<40} {:>9} -> {:>9} ({:>9})  steps {} -> {}  per step {} -> {}",
                truncate(&s.name, 40),
                ms(s.busy_a_us),
                ms(s.busy_b_us),
                signed_ms(s.change_us),
                s.steps_a,
                s.steps_b,
                per_step(s.per_step_a_us),
                per_step(s.per_step_b_us)
            )?;
        }
        for (title, rows) in [
            ("categories (self time)", &self.categories),
            ("operations (total time)", &self.ops),
        ] {
            writeln!(f)?;
            writeln!(f, "== {title}")?;
            for r in rows.iter().take(SHOWN_ROWS) {
                writeln!(
                    f,
                    "  {:>9}  {:<24} {:<32} {:>9} -> {:>9}  per step {} -> {}",
                    signed_ms(r.change_us),
                    truncate(&r.stage, 24),
                    truncate(&r.name, 32),
                    ms(r.total_a_us),
                    ms(r.total_b_us),
                    per_step(r.per_step_a_us),
                    per_step(r.per_step_b_us)
                )?;
            }
            if rows.len() > SHOWN_ROWS {
                writeln!(
                    f,
                    "  ... {} more (--json lists all)",
                    rows.len() - SHOWN_ROWS
                )?;
            }
        }
        Ok(())
    }
}
