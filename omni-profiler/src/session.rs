//! [`ProfileSession`]: where one window of one stage goes and what it records.
use std::path::{Path, PathBuf};

use crate::{stage_trace_dir, ProfileOptions};

/// One start/stop window of one stage (or of any process profiling itself).
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileSession {
    /// Directory the window's trace goes to, normally
    /// `$VLLM_TORCH_PROFILER_DIR/stage_<id>_<safe model name>/` (see
    /// [`stage_trace_dir`]). Created at start when missing.
    pub dir: PathBuf,
    /// The process name shown by trace viewers, e.g.
    /// `stage 0 (thinker) SmolLM2-135M-Instruct`.
    pub process_name: String,
    /// What to record and how to write it.
    pub options: ProfileOptions,
    /// How far this process's clock is ahead of the reference clock (the
    /// orchestrator's), when known: written into the trace's `omni` header
    /// and subtracted by `merge`, `summarize` and `analyze`.
    pub clock_offset: Option<ClockOffset>,
}

/// One process's clock against a reference clock, estimated NTP-style from
/// the exchange with the least round trip: `offset_us` = this clock minus
/// the reference, within ± `error_us` (half that round trip).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClockOffset {
    /// This process's clock minus the reference clock, µs.
    pub offset_us: f64,
    /// The estimate's bound, µs (half the round trip it came from).
    pub error_us: f64,
}

impl ClockOffset {
    /// The estimate from one exchange: the reference sent at `sent_us` and
    /// got the answer at `received_us` (its clock); the process read
    /// `remote_us` on its own clock in between.
    pub fn from_exchange(sent_us: f64, remote_us: f64, received_us: f64) -> Self {
        let round_trip = (received_us - sent_us).max(0.0);
        ClockOffset {
            offset_us: remote_us - (sent_us + received_us) / 2.0,
            error_us: round_trip / 2.0,
        }
    }
}

impl ProfileSession {
    /// A session writing to `dir`, labelled `process_name`.
    pub fn new(
        dir: impl Into<PathBuf>,
        process_name: impl Into<String>,
        options: ProfileOptions,
    ) -> Self {
        ProfileSession {
            dir: dir.into(),
            process_name: process_name.into(),
            options,
            clock_offset: None,
        }
    }

    /// The same session, its trace recording `offset` (see [`ClockOffset`]).
    pub fn with_clock_offset(mut self, offset: Option<ClockOffset>) -> Self {
        self.clock_offset = offset;
        self
    }

    /// The session of stage `stage_id` under the profiler root `root`:
    /// directory `stage_<id>_<safe model name>`, process name
    /// `stage <id> (<model_stage>) <model_name>` (without the parenthesis
    /// when `model_stage` is empty).
    pub fn for_stage(
        root: &Path,
        stage_id: usize,
        model_stage: &str,
        model_name: &str,
        options: ProfileOptions,
    ) -> Self {
        let process_name = if model_stage.is_empty() {
            format!("stage {stage_id} {model_name}")
        } else {
            format!("stage {stage_id} ({model_stage}) {model_name}")
        };
        ProfileSession::new(
            stage_trace_dir(root, stage_id, model_name),
            process_name,
            options,
        )
    }
}
