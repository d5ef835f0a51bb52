//! The [`Profiler`] trait every backend implements (built-in or a user's).
use std::path::PathBuf;

use crate::{ProfileSession, Result};

/// A profiling backend: records one start/stop window at a time and writes
/// it as trace files.
///
/// The methods are async so that `stop` may do I/O (serialize, compress,
/// rename, upload) without blocking the caller's loop.
///
/// # Thread contract
///
/// Some profilers record only the thread that enabled them (Kineto does by
/// default). Callers create the `start()`/`stop()` futures on the thread that
/// runs the model (the stage worker's model thread) and poll them there until
/// their first `Pending`; implementations do all thread-bound work (enable or
/// disable the profiler, switch recording on or off) before their first
/// `.await`. The rest may finish on another thread: the futures are `Send`.
///
/// # Defined results
///
/// * `start` while this profiler is active returns [`crate::Error::AlreadyActive`].
/// * `stop` while inactive returns `Ok(vec![])`: there is nothing to write.
/// * `stop` returns only after every file it lists is complete on disk (written
///   atomically, see [`crate::write_trace`]).
#[async_trait::async_trait]
pub trait Profiler: Send + Sync {
    /// The backend's name: `"torch"`, `"chrome"`, `"noop"`, or a user's.
    fn backend(&self) -> &str;
    /// Starts recording one window into `session.dir`. Errors if already
    /// active, or if `session.dir` cannot be created and written (the error
    /// names the path).
    async fn start(&self, session: &ProfileSession) -> Result<()>;
    /// Stops recording and returns the files written for this window.
    async fn stop(&self) -> Result<Vec<PathBuf>>;
    /// Whether a window is open.
    fn is_active(&self) -> bool;
}
