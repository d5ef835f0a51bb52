//! The `noop` backend: tracks start/stop like the others, records and writes
//! nothing. The baseline for measuring what profiling costs.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::{Error, ProfileSession, Profiler, Result};

/// A backend that records nothing. `start` does not touch the directory;
/// `stop` returns no files.
#[derive(Debug, Default)]
pub struct NoopProfiler {
    active: AtomicBool,
}

impl NoopProfiler {
    /// A new, inactive profiler.
    pub fn new() -> Self {
        NoopProfiler::default()
    }
}

#[async_trait::async_trait]
impl Profiler for NoopProfiler {
    fn backend(&self) -> &str {
        "noop"
    }

    async fn start(&self, _session: &ProfileSession) -> Result<()> {
        if self.active.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadyActive {
                backend: "noop".to_owned(),
                reason: "a window is already open".to_owned(),
            });
        }
        Ok(())
    }

    async fn stop(&self) -> Result<Vec<PathBuf>> {
        self.active.store(false, Ordering::Release);
        Ok(Vec::new())
    }

    fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }
}
