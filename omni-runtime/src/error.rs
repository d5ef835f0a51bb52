//! The runtime's one error type. Messages are lowercase and name the bad
//! value and where it came from (file and field, stage, socket address).
//!
//! # Wrapped errors: the message says it once
//!
//! A variant that wraps another error puts that error's text in its own
//! message and does **not** return it from `source()` (no `#[source]`, no
//! `#[from]`, and no field named `source`, which thiserror would take as the
//! source): `to_string()` stays complete on one line, and a chain printer
//! (anyhow's `{:#}`) does not print the inner text a second time. The
//! wrapped error is kept in a field named `cause` (or the tuple field), and
//! conversions for `?` are written out by hand.

use std::path::PathBuf;
use std::time::Duration;

/// Result alias for the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in pipelines, stage processes and the wire.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A pipeline file could not be read.
    #[error("cannot read pipeline config {path}: {cause}")]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// What the OS said (in the message, not a `source()`).
        cause: std::io::Error,
    },
    /// A pipeline file is not valid YAML/JSON.
    #[error("pipeline config {file} is not valid {format}: {reason}")]
    ConfigSyntax {
        /// The file (or `builtin:<name>`).
        file: String,
        /// "yaml" or "json".
        format: &'static str,
        /// The parser's message (with line and column).
        reason: String,
    },
    /// A field of a pipeline config has a bad value.
    #[error("pipeline config {file}: field `{field}` = {value}: {reason}")]
    Config {
        /// The file (or `builtin:<name>`).
        file: String,
        /// The field path, e.g. `stage_args[1].engine_input_source[0]`.
        field: String,
        /// The offending value, rendered as JSON (shortened).
        value: String,
        /// Why it is wrong.
        reason: String,
    },
    /// No built-in pipeline has this name and no file has this path.
    #[error(
        "unknown pipeline `{name}`: not a file and not a built-in pipeline (built-ins: {known})"
    )]
    UnknownPipeline {
        /// What the caller asked for.
        name: String,
        /// The built-in names, comma separated.
        known: String,
    },
    /// A stage id that the pipeline does not have.
    #[error("unknown stage id {stage_id} (this pipeline has stages {known})")]
    UnknownStage {
        /// The bad id.
        stage_id: usize,
        /// The pipeline's stage ids, comma separated.
        known: String,
    },
    /// An input processor name that is not registered.
    #[error("unknown input processor `{name}` (known: {known})")]
    UnknownInputProcessor {
        /// The name from `custom_process_input_func`.
        name: String,
        /// The registered names, comma separated.
        known: String,
    },
    /// An input processor could not build the next stage's prompt.
    #[error("input processor `{name}` failed for request `{request_id}`: {reason}")]
    InputProcessor {
        /// The processor.
        name: String,
        /// The request.
        request_id: String,
        /// Why.
        reason: String,
    },
    /// A wire message that does not follow the protocol.
    #[error("bad wire message: {0}")]
    Wire(String),
    /// A ZeroMQ socket operation failed.
    #[error("socket {endpoint}: {reason}")]
    Socket {
        /// The address.
        endpoint: String,
        /// The socket's error.
        reason: String,
    },
    /// A shared-memory segment could not be created, read or removed.
    #[error("shared memory segment {path}: {reason}")]
    SharedMemory {
        /// The segment's file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A file-system operation of the runtime (run directory, launch file).
    #[error("{what} {path}: {cause}")]
    Io {
        /// What the runtime was doing.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// What the OS said (in the message, not a `source()`).
        cause: std::io::Error,
    },
    /// The `omni-stage` worker binary was not found.
    #[error(
        "cannot find the `omni-stage` worker binary (looked in: {searched}); build it with \
         `cargo build -p omni-runtime --bin omni-stage`, then set OMNI_STAGE_BIN or \
         OrchestratorOptions::stage_binary to its path, or put it on PATH"
    )]
    StageBinaryNotFound {
        /// Every place that was tried.
        searched: String,
    },
    /// A stage process could not be spawned.
    #[error("cannot spawn stage {stage_id} ({path}): {cause}")]
    Spawn {
        /// The stage.
        stage_id: usize,
        /// The binary.
        path: PathBuf,
        /// What the OS said (in the message, not a `source()`).
        cause: std::io::Error,
    },
    /// A stage did not send `Ready` in time.
    #[error("stage {stage_id} did not become ready within {timeout:?}{log}")]
    StageInitTimeout {
        /// The stage.
        stage_id: usize,
        /// The init timeout.
        timeout: Duration,
        /// The last lines the stage logged (with a leading newline), or empty.
        log: String,
    },
    /// A stage process exited before it was ready.
    #[error("stage {stage_id} exited during start-up ({status}){log}")]
    StageFailedToStart {
        /// The stage.
        stage_id: usize,
        /// How it exited.
        status: String,
        /// The last lines the stage logged (with a leading newline), or empty.
        log: String,
    },
    /// A stage process exited while the pipeline was running.
    #[error("stage {stage_id} died ({status}); the pipeline has been shut down")]
    StageDied {
        /// The stage.
        stage_id: usize,
        /// How it exited (exit code or signal).
        status: String,
    },
    /// A stage reported an error for a request or a command.
    #[error("stage {stage_id}: {message}")]
    Stage {
        /// The stage.
        stage_id: usize,
        /// The stage's message.
        message: String,
    },
    /// A stage refused a request (prompt too long, bad prompt or params):
    /// the caller's input is at fault.
    #[error("stage {stage_id} rejected request `{request_id}`: {message}")]
    RequestRejected {
        /// The stage.
        stage_id: usize,
        /// The request.
        request_id: String,
        /// Why.
        message: String,
    },
    /// `submit` with an id that is already in flight.
    #[error("request id `{0}` is already in flight")]
    RequestIdInUse(String),
    /// `submit` with the wrong number of per-stage sampling params.
    #[error("got {got} sampling params for a pipeline of {expected} stages (give one per stage)")]
    SamplingParamsCount {
        /// Number of stages.
        expected: usize,
        /// Number given.
        got: usize,
    },
    /// Sampling params that the engine rejects.
    #[error("sampling params for stage {stage_id}: {reason}")]
    InvalidSamplingParams {
        /// The stage.
        stage_id: usize,
        /// The engine's message.
        reason: String,
    },
    /// A profiler operation failed.
    #[error("profiler: {0}")]
    Profiler(String),
    /// The Ray backend could not place or start the stages (the launcher's
    /// message: the cluster, a resource, a node, a path).
    #[error("ray backend: {0}")]
    Ray(String),
    /// An engine error inside a stage worker (in the message, not a
    /// `source()`).
    #[error("engine: {0}")]
    Engine(omni_engine::Error),
    /// A stage did not answer a control message in time.
    #[error("stage {stage_id} did not answer {what} within {timeout:?}")]
    Timeout {
        /// The stage.
        stage_id: usize,
        /// The command.
        what: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The pipeline is shut down (or shutting down); nothing more is accepted.
    #[error("the pipeline is shut down{0}")]
    ShutDown(String),
}

/// `?` on engine calls; by hand, as `#[from]` would also make the engine's
/// error a `source()` and print it twice in a chain.
impl From<omni_engine::Error> for Error {
    fn from(e: omni_engine::Error) -> Self {
        Error::Engine(e)
    }
}

impl Error {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            cause,
        }
    }

    pub(crate) fn socket(endpoint: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Socket {
            endpoint: endpoint.into(),
            reason: reason.to_string(),
        }
    }
}
