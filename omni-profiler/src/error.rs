//! The crate's error type.
//!
//! # Wrapped errors: the message says it once
//!
//! A variant that wraps another error puts that error's text in its own
//! message and does **not** return it from `source()` (no `#[source]`, no
//! `#[from]`, and no field named `source`, which thiserror would take as the
//! source): `to_string()` stays complete on one line, and a chain printer
//! (anyhow's `{:#}`) does not print the inner text a second time. The
//! wrapped error is kept in a field named `cause`.
use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while profiling or reading traces.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `VLLM_TORCH_PROFILER_DIR` is unset or empty.
    #[error(
        "profiling is disabled: VLLM_TORCH_PROFILER_DIR is not set (set it to a writable \
         directory to record traces)"
    )]
    ProfilerDirUnset,
    /// An environment variable holds a value we cannot parse.
    #[error("invalid value {value:?} in environment variable {var}: expected {expected}")]
    InvalidEnv {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// The trace directory cannot be created or written.
    #[error("trace directory {path} is not writable: {cause}")]
    TraceDirNotWritable {
        /// The directory.
        path: PathBuf,
        /// Why (in the message, not a `source()`).
        cause: std::io::Error,
    },
    /// `start` on a profiler (or while another recording backend) is active.
    #[error("cannot start the {backend} profiler: {reason}")]
    AlreadyActive {
        /// The backend that was asked to start.
        backend: String,
        /// What is already recording.
        reason: String,
    },
    /// A backend name nobody registered.
    #[error("unknown profiler backend {name:?} (from {origin}): expected one of {choices}")]
    UnknownBackend {
        /// The name asked for.
        name: String,
        /// Where it came from (an env var, a config field, an argument).
        origin: String,
        /// The registered names, comma separated.
        choices: String,
    },
    /// The chrome backend records `tracing` spans, so it needs the layer.
    #[error(
        "the chrome profiler records tracing spans but omni_profiler::tracing_layer() is not \
         installed in this process's tracing subscriber"
    )]
    LayerNotInstalled,
    /// libtorch's Kineto profiler failed.
    #[error("torch (kineto) profiler: {0}")]
    Kineto(String),
    /// File I/O on a trace or a trace directory.
    #[error("i/o error on {path}: {cause}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause (in the message, not a `source()`).
        cause: std::io::Error,
    },
    /// A trace file that is not a Chrome trace we can read.
    #[error("invalid trace file {path}: {reason}")]
    InvalidTrace {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A directory given to the trace tools holds no trace.
    #[error("no trace files (*.json, *.json.gz) found under {path}")]
    NoTraces {
        /// The directory.
        path: PathBuf,
    },
    /// A finishing task died (panicked or was cancelled).
    #[error("profiler task failed: {0}")]
    Task(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
}
