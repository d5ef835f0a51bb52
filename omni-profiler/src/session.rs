//! [`ProfileSession`]: where one window of one stage goes and what it records.
use std::path::{Path, PathBuf};

use crate::{stage_trace_dir, ProfileOptions};

/// One start/stop window of one stage (or of any process profiling itself).
#[derive(Debug, Clone, PartialEq, Eq)]
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
        }
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
