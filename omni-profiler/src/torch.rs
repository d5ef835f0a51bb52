//! The `torch` backend: libtorch's own Kineto profiler (what
//! `torch.profiler.profile` drives in Python), through the C++ shim.
//!
//! CPU activities always, CUDA activities when a GPU is present;
//! `record_shapes`, `with_stack`, `profile_memory` and `with_flops` from the
//! session's options. While it records, the tracing layer opens a
//! `RecordFunction` range for every span (`ProfilerStep#<n>` for steps), and
//! the spans' fields are merged into those ranges' `args` when the trace is
//! finalized.
//!
//! Kineto runs in its default thread-local mode, as `torch.profiler` does:
//! the torch ops of the thread that called `start` are recorded, and `stop`
//! must be called on that thread (elsewhere it returns [`Error::Kineto`] and
//! the window stays open). Spans of other threads still reach the trace, as
//! `user_annotation` events taken from the span recorder.
use std::path::PathBuf;
use std::sync::Mutex;

use crate::blocking::run_blocking;
use crate::clock::now_us;
use crate::recorder::{CaptureMode, SpanCapture};
use crate::trace_file::{finalize_kineto, prepare_trace_dir, set_window, tmp_path, write_trace};
use crate::{kineto, Error, ProfileSession, Profiler, Result};

/// Prepares libtorch's profiler (Kineto) for the `torch` backend. Call it
/// once, early, on the process's main thread (the thread that loaded
/// libtorch), before a window is opened on any thread; later calls do
/// nothing.
///
/// Kineto runs its start-up only on the thread that loaded libtorch; left
/// to the first window, opened on a model or runtime thread, it prints
/// `ERROR: External init callback must run in same thread as registerClient`.
/// This also quiets Kineto's own log (`KINETO_LOG_LEVEL`, default here 6:
/// nothing; a value set in the environment is kept, and 4 shows Kineto's
/// errors), which otherwise prints `USDT` lines at every start and stop and,
/// on a machine without a GPU, `gpuGetDeviceCount failed`.
pub fn init_main_thread() -> Result<()> {
    kineto::init()
}

struct Window {
    capture: SpanCapture,
    session: ProfileSession,
    /// Kineto (thread-local mode) can only be disabled where it was enabled.
    thread: std::thread::ThreadId,
    started_us: f64,
}

/// The `torch` (Kineto) backend. Works without [`crate::tracing_layer`] too;
/// the trace then holds torch's ops but no engine ranges.
#[derive(Default)]
pub struct TorchProfiler {
    window: Mutex<Option<Window>>,
}

impl std::fmt::Debug for TorchProfiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchProfiler")
            .field("active", &self.is_active())
            .finish()
    }
}

impl TorchProfiler {
    /// A new, inactive profiler.
    pub fn new() -> Self {
        TorchProfiler::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Window>> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl Profiler for TorchProfiler {
    fn backend(&self) -> &str {
        "torch"
    }

    async fn start(&self, session: &ProfileSession) -> Result<()> {
        let mut window = self.lock();
        if window.is_some() {
            return Err(Error::AlreadyActive {
                backend: "torch".to_owned(),
                reason: "a window is already open".to_owned(),
            });
        }
        prepare_trace_dir(&session.dir)?;
        // The recorder first: it refuses when another backend records, before
        // Kineto (process-global too) is touched.
        let capture = SpanCapture::start_inner("torch", CaptureMode::WithTorchRanges)?;
        // Done already where the process called init_main_thread; else at
        // least Kineto's log level is set before it starts.
        kineto::init()?;
        kineto::start(&session.options, tch::Cuda::is_available())?;
        *window = Some(Window {
            capture,
            session: session.clone(),
            thread: std::thread::current().id(),
            started_us: now_us(),
        });
        Ok(())
    }

    async fn stop(&self) -> Result<Vec<PathBuf>> {
        let window = {
            let mut slot = self.lock();
            match slot.as_ref() {
                None => return Ok(Vec::new()),
                Some(w) if w.thread != std::thread::current().id() => {
                    return Err(Error::Kineto(
                        "stop() must run on the thread that called start() (Kineto records \
                         per thread); the window stays open"
                            .to_owned(),
                    ));
                }
                Some(_) => slot.take(),
            }
        };
        let Some(window) = window else {
            return Ok(Vec::new());
        };
        // Thread-bound part, before the first await: close the ranges'
        // source, disable Kineto, save its raw trace.
        let stopped_us = now_us();
        let started_us = window.started_us;
        let captured = window.capture.finish();
        let session = window.session;
        let raw = tmp_path(&session.dir, "kineto");
        let flops = session
            .options
            .with_flops
            .then(|| tmp_path(&session.dir, "flops"));
        let saved = kineto::stop_and_save(&raw, flops.as_deref());
        let path = run_blocking(move || {
            let result = saved.and_then(|()| {
                let mut trace = finalize_kineto(&raw, flops.as_deref(), &captured, &session)?;
                set_window(&mut trace, started_us, stopped_us);
                write_trace(&session, "pt", &trace)
            });
            let _ = std::fs::remove_file(&raw);
            if let Some(flops) = &flops {
                let _ = std::fs::remove_file(flops);
            }
            result
        })
        .await?;
        Ok(vec![path])
    }

    fn is_active(&self) -> bool {
        self.lock().is_some()
    }
}
