//! The one error type of `omni-core`.
//!
//! Errors caused by the caller's input (prompts, sampling params, stage ids,
//! request ids) are separate variants that name the bad value, so a server
//! can answer them with a client error while pipeline failures become
//! server errors. [`Error::is_invalid_input`] and [`Error::stage_id`] make
//! that classification without matching on every variant.
//!
//! # Wrapped errors: the message says it once
//!
//! A variant that wraps another error puts that error's text in its own
//! message and does **not** return it from `source()` (no `#[source]`, no
//! `#[from]`, and no field named `source`, which thiserror would take as the
//! source): the one-line `to_string()` that HTTP error bodies use stays
//! complete, and a chain printer (anyhow's `{:#}`) does not print the inner
//! text a second time. The wrapped error is kept in a field named `cause`.
//! [`Error::Runtime`] is `transparent`: its message is the runtime's, once.
use std::path::PathBuf;

use crate::convert::{runtime_is_invalid_input, runtime_stage_id};

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is ([`Error::kind`]), so that callers
/// can tell "you sent a bad request" from "a stage failed on it".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller's input was refused (prompt, sampling params, stage ids,
    /// request id, pipeline config): fix the request.
    InvalidInput,
    /// A stage failed on a request it had accepted (its model, an input
    /// processor between stages, a deadline); the request was valid.
    StageFailed,
    /// The pipeline cannot serve: a stage process is gone or did not start,
    /// or the pipeline is shutting down.
    Unavailable,
    /// The pipeline holds as many requests as it was told to: retry later
    /// (a server answers 429).
    Overloaded,
    /// Anything else (I/O, the runtime itself).
    Internal,
}

/// Everything that can go wrong in `OmniLLM` and `AsyncOmni`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `generate` was called with no prompts.
    #[error("empty prompt list: generate needs at least one prompt")]
    EmptyPrompts,
    /// A prompt has no content (empty text, no messages, no token ids).
    #[error("prompt {index} is empty")]
    EmptyPrompt {
        /// Position of the prompt in the caller's list.
        index: usize,
    },
    /// Per-stage sampling params whose count is not the number of stages.
    #[error(
        "{got} per-stage sampling params given for a pipeline of {expected} stages: \
         pass one SamplingParams for all stages or exactly one per stage"
    )]
    SamplingParamsCount {
        /// Number of stages in the pipeline.
        expected: usize,
        /// Number of sampling params the caller gave.
        got: usize,
    },
    /// Sampling params that the engine rejects.
    #[error("invalid sampling params for stage {stage_id}: {cause}")]
    InvalidSamplingParams {
        /// The stage the params were meant for.
        stage_id: usize,
        /// The engine's reason, naming the field and value (in the message,
        /// not a `source()`).
        cause: omni_engine::Error,
    },
    /// A stage id that the pipeline does not have.
    #[error(
        "unknown stage id {stage_id}: the pipeline has {num_stages} stage(s), ids 0..{num_stages}"
    )]
    UnknownStage {
        /// The id the caller asked for.
        stage_id: usize,
        /// Number of stages in the pipeline.
        num_stages: usize,
    },
    /// `AsyncOmni::generate` with a request id that is still running.
    #[error("duplicate request id {0:?}: a request with this id is still running")]
    DuplicateRequestId(String),
    /// An empty request id.
    #[error("empty request id: give every request a non-empty id")]
    EmptyRequestId,
    /// `AsyncOmni::generate` past `max_pending_requests`.
    #[error(
        "overloaded: {running} requests in flight, the limit (max_pending_requests) is \
         {limit}; retry later"
    )]
    Overloaded {
        /// Requests in flight.
        running: usize,
        /// The bound.
        limit: usize,
    },
    /// A request whose outputs stopped before every final stage finished,
    /// without an abort.
    #[error("request {request_id:?} ended before stage {stage_id} produced its final output")]
    Incomplete {
        /// The request.
        request_id: String,
        /// The first final stage that did not finish.
        stage_id: usize,
    },
    /// The pipeline could not be configured (file, name, fields).
    // The runtime's errors name the file or pipeline already.
    #[error("{cause}")]
    Pipeline {
        /// The name or path the caller gave.
        pipeline: String,
        /// What the runtime found wrong (in the message, not a `source()`).
        cause: omni_runtime::Error,
    },
    /// An error from the runtime (stage processes, sockets, profiling).
    #[error(transparent)]
    Runtime(#[from] omni_runtime::Error),
    /// The blocking `OmniLLM` could not build its tokio runtime.
    #[error("cannot start the tokio runtime of OmniLLM: {0}")]
    TokioRuntime(std::io::Error),
    /// A file the caller named cannot be read.
    #[error("cannot read {path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error (in the message, not a `source()`).
        cause: std::io::Error,
    },
}

impl Error {
    /// What kind of failure this is: the caller's input, a stage failing
    /// on an accepted request, a pipeline that cannot serve, or anything
    /// else. A server picks its status by it (400, 500, 503, 500).
    pub fn kind(&self) -> ErrorKind {
        use omni_runtime::Error as R;
        if self.is_invalid_input() {
            return ErrorKind::InvalidInput;
        }
        match self {
            Error::Overloaded { .. } => ErrorKind::Overloaded,
            Error::Incomplete { .. } => ErrorKind::StageFailed,
            Error::Runtime(R::Stage { .. } | R::Timeout { .. } | R::InputProcessor { .. }) => {
                ErrorKind::StageFailed
            }
            Error::Runtime(
                R::StageDied { .. }
                | R::ShutDown(_)
                | R::StageFailedToStart { .. }
                | R::StageInitTimeout { .. },
            ) => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }

    /// Whether the caller's input caused the error (a server answers these
    /// with 400), as opposed to a failure of the pipeline itself.
    pub fn is_invalid_input(&self) -> bool {
        match self {
            Error::EmptyPrompts
            | Error::EmptyPrompt { .. }
            | Error::SamplingParamsCount { .. }
            | Error::InvalidSamplingParams { .. }
            | Error::UnknownStage { .. }
            | Error::DuplicateRequestId(_)
            | Error::EmptyRequestId => true,
            Error::Runtime(e) => runtime_is_invalid_input(e),
            _ => false,
        }
    }

    /// The stage the error happened in, when one is known.
    pub fn stage_id(&self) -> Option<usize> {
        match self {
            Error::InvalidSamplingParams { stage_id, .. }
            | Error::UnknownStage { stage_id, .. }
            | Error::Incomplete { stage_id, .. } => Some(*stage_id),
            Error::Runtime(e) => runtime_stage_id(e),
            _ => None,
        }
    }
}
