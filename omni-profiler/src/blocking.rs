//! Running the slow end of `stop` (parse, compress, write) off the caller's
//! thread when a tokio runtime is there to do it.

use crate::{Error, Result};

/// Runs `f` on tokio's blocking pool when called inside a tokio runtime, else
/// inline. The work is not cancelled when the awaiting future is dropped, so
/// a window's trace still reaches the disk.
pub(crate) async fn run_blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle
            .spawn_blocking(f)
            .await
            .map_err(|e| Error::Task(e.to_string()))?,
        Err(_) => f(),
    }
}
