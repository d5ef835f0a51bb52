//! What the orchestrator tells a worker when it starts it: written as JSON
//! into the run directory and passed as `omni-stage --launch FILE`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// A stage worker's start-up instructions.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchSpec {
    /// The stage, in the pipeline file's layout ([`StageConfig::to_json`](crate::StageConfig::to_json)).
    pub stage: Value,
    /// The pipeline's name (for logs and trace process names).
    pub pipeline: String,
    /// Number of stages in the pipeline (sampling params are one per stage).
    pub num_stages: usize,
    /// The orchestrator's ROUTER; the worker connects a DEALER to it.
    pub orchestrator_address: String,
    /// The run's secret, which every socket of the run presents in its
    /// peer identity (see `transport`): 32 hex digits.
    pub token: String,
    /// The address this stage's input ROUTER binds.
    pub input_address: String,
    /// A socket already listening on `input_address` that the stage
    /// inherits (TCP ports the orchestrator chose); absent: bind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_listener_fd: Option<i32>,
    /// Stages that take this stage's output: `(stage_id, input address)`.
    pub downstream: Vec<(usize, String)>,
    /// Downstream stages this stage streams to: `(stage_id, tokens per
    /// piece)` (`runtime.edges`).
    #[serde(default)]
    pub streams: Vec<(usize, usize)>,
    /// Shared-memory directory for large tensors, when stages share a host.
    pub shm_dir: Option<PathBuf>,
    /// Tensors of at least this many bytes go through shared memory.
    pub shm_threshold_bytes: Option<usize>,
    /// The orchestrator's pid: the worker exits when its parent is not this.
    pub parent_pid: u32,
    /// The run directory (removed by a worker that outlives its orchestrator).
    pub run_dir: PathBuf,
    /// How long to wait for downstream sockets, in milliseconds.
    pub connect_timeout_ms: u64,
    /// The profiler backend (`torch`, `chrome`, `noop`).
    pub profiler_backend: String,
    /// How long the worker gives its model thread to stop (closing an open
    /// trace included), in milliseconds: within the orchestrator's own
    /// shutdown grace, after which it kills the worker. 0: the worker's
    /// default.
    #[serde(default)]
    pub stop_grace_ms: u64,
    /// Intra-op threads for this stage when it runs on the CPU and its
    /// `engine_args.num_threads` names none: this host's cores split among
    /// the stages that may run on them, so that several busy stages do not
    /// each spin a pool as wide as the machine. Absent: libtorch's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_threads: Option<usize>,
    /// The file through which this host's CPU stages take turns, one
    /// engine step at a time, when their intra-op threads together exceed
    /// its cores (see `runtime.cpu_threads`); the local backend's only, and
    /// used only by a stage that runs on the CPU. Absent: no turns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_turn: Option<PathBuf>,
}

impl LaunchSpec {
    /// Writes the spec to `path` (mode 0600, via a temporary file and rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Wire(format!("cannot encode launch spec: {e}")))?;
        let tmp = path.with_extension("json.tmp");
        // Only the owner reads it: it holds the run's token.
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&text)
        };
        write().map_err(|e| Error::io("cannot write launch spec", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io("cannot write launch spec", path, e))
    }

    /// Reads a spec written by [`write`](Self::write).
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read(path).map_err(|e| Error::io("cannot read launch spec", path, e))?;
        serde_json::from_slice(&text).map_err(|e| Error::ConfigSyntax {
            file: path.display().to_string(),
            format: "json",
            reason: e.to_string(),
        })
    }
}
