//! Trace tools over a profiler directory (`$VLLM_TORCH_PROFILER_DIR`, or one
//! stage's directory in it): [`summarize`] (top operations per stage, where
//! each request's time went), [`analyze`] (that, plus which stage limits
//! the pipeline: busy and idle time by cause, batch occupancy, each
//! request's critical path), [`diff`] (what got slower or faster between
//! two profiles) and [`merge`] (one timeline of all stages with flow arrows
//! that follow each request from stage to stage). `omni profile
//! summarize|diff|merge` wrap them.
//!
//! They read any Chrome trace (`.json`, `.json.gz`) the backends write: the
//! stage comes from the directory name (`stage_<id>_<model>`) and the
//! process name in the trace; requests are followed through the ranges that
//! name them (field `request_ids`, or `request_id`): `add_request` and
//! `stage_recv` (arrival), `ProfilerStep#<n>` (the engine steps that
//! computed them) and `stage_send`.
mod analysis;
mod diff;
mod merge;
mod summarize;
mod trace_set;

pub use analysis::{
    analyze, Analysis, Bottleneck, CriticalPath, Idle, Occupancy, PathPart, Spread, StageLoad,
};
pub use diff::{diff, OpChange, ProfileDiff, StageChange};
pub use merge::merge;
pub use summarize::{
    summarize, Compact, OpStat, RequestStage, RequestSummary, StageSummary, Summary,
};
pub use trace_set::request_ids_of;
