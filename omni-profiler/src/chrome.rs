//! The `chrome` backend: the `tracing` spans of a window, written as a
//! Chrome trace (the JSON Perfetto and chrome://tracing open).
//!
//! Switched on and off inside a running process: the layer installed once by
//! [`crate::tracing_layer`] records into the process's span recorder only
//! while a window is open, so nothing is recorded between windows and each
//! window gives one file.
//!
//! Why not the `tracing-chrome` crate behind a `reload` layer: its layer
//! caches its channel sender and a thread index in thread-locals on first
//! use, so after the first window every thread but the one that built the
//! new layer sends into the closed channel of the old one (their spans are
//! lost) and thread names are never written again; its timestamps also
//! count from the layer's creation, not from the epoch.
use std::path::PathBuf;
use std::sync::Mutex;

use crate::blocking::run_blocking;
use crate::layer::layer_installed;
use crate::recorder::SpanCapture;
use crate::trace_file::{chrome_trace, prepare_trace_dir, write_trace};
use crate::{Error, ProfileSession, Profiler, Result};

struct Window {
    capture: SpanCapture,
    session: ProfileSession,
}

/// The `chrome` backend. Needs [`crate::tracing_layer`] in the process's
/// subscriber (start fails with [`Error::LayerNotInstalled`] otherwise).
#[derive(Default)]
pub struct ChromeProfiler {
    window: Mutex<Option<Window>>,
}

impl std::fmt::Debug for ChromeProfiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChromeProfiler")
            .field("active", &self.is_active())
            .finish()
    }
}

impl ChromeProfiler {
    /// A new, inactive profiler.
    pub fn new() -> Self {
        ChromeProfiler::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Window>> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl Profiler for ChromeProfiler {
    fn backend(&self) -> &str {
        "chrome"
    }

    async fn start(&self, session: &ProfileSession) -> Result<()> {
        let mut window = self.lock();
        if window.is_some() {
            return Err(Error::AlreadyActive {
                backend: "chrome".to_owned(),
                reason: "a window is already open".to_owned(),
            });
        }
        if !layer_installed() {
            return Err(Error::LayerNotInstalled);
        }
        prepare_trace_dir(&session.dir)?;
        let capture = SpanCapture::start_inner("chrome", false)?;
        *window = Some(Window {
            capture,
            session: session.clone(),
        });
        Ok(())
    }

    async fn stop(&self) -> Result<Vec<PathBuf>> {
        // Recording stops here, before the first await (thread contract).
        let Some(window) = self.lock().take() else {
            return Ok(Vec::new());
        };
        let captured = window.capture.finish();
        let session = window.session;
        let path = run_blocking(move || {
            let trace = chrome_trace(&captured, &session);
            write_trace(&session, "chrome", &trace)
        })
        .await?;
        Ok(vec![path])
    }

    fn is_active(&self) -> bool {
        self.lock().is_some()
    }
}
