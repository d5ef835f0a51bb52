//! # omni-profiler
//!
//! Cross-stage profiling: the [`Profiler`] trait that backends implement,
//! the `torch` (libtorch Kineto, through a C++ shim), `chrome` (the
//! `tracing-chrome` layer, switched on per window) and `noop` backends, trace file naming and
//! atomic writing, a `tracing` layer that turns engine spans into ranges of
//! the active backend, and trace tools ([`tools::summarize`],
//! [`tools::merge`]).
//!
//! It must not know about models or processes: a stage worker drives it, and
//! so can a user profiling their own libtorch code.
//!
//! ## Use
//!
//! ```no_run
//! # async fn demo() -> omni_profiler::Result<()> {
//! use omni_profiler::{backend_by_name, profiler_dir_from_env, ProfileOptions, ProfileSession};
//! use tracing_subscriber::prelude::*;
//!
//! // Once per process, on the main thread: Kineto's start-up, and the layer
//! // that forwards spans to whichever backend is active.
//! omni_profiler::init_main_thread()?;
//! tracing_subscriber::registry().with(omni_profiler::tracing_layer()).init();
//!
//! let root = profiler_dir_from_env()?; // VLLM_TORCH_PROFILER_DIR
//! let session = ProfileSession::for_stage(&root, 0, "thinker", "SmolLM2-135M-Instruct",
//!                                         ProfileOptions::from_env()?);
//! let profiler = backend_by_name("torch")?;
//! profiler.start(&session).await?;
//! {
//!     let _step = tracing::info_span!(target: "omni::engine", "step", step = 1u64).entered();
//!     let x = tch::Tensor::randn([64, 64], (tch::Kind::Float, tch::Device::Cpu));
//!     let _y = x.matmul(&x);
//! }
//! let files = profiler.stop().await?; // one Chrome trace, complete on disk
//! # let _ = files; Ok(()) }
//! ```
//!
//! ## Semantics every backend shares
//!
//! * `start` while active: [`Error::AlreadyActive`]. Only one recording
//!   backend (`torch`, `chrome`) can be active in a process at a time, since
//!   Kineto and the span recorder are process-wide.
//! * `stop` while inactive: `Ok(vec![])` (nothing was recorded, nothing is
//!   written). This makes "stop every stage that is recording" a plain loop.
//! * One file per start/stop window under [`ProfileSession::dir`], never
//!   overwriting an earlier window (see [`write_trace`]).
//! * Every trace is a JSON object with `traceEvents`; `ts` is in microseconds
//!   since the UNIX epoch, so traces of different processes line up.
//! * The engine's `step` span is named `ProfilerStep#<n>` (as PyTorch's
//!   profiler names steps), in every backend.
#![warn(missing_docs)]

mod backend;
mod blocking;
mod chrome;
mod clock;
mod error;
mod kineto;
mod layer;
mod layout;
mod noop;
mod options;
mod profiler;
mod recorder;
mod session;
pub mod tools;
mod torch;
mod trace_file;

pub use backend::{
    backend_by_name, backend_from_env, register_backend, BackendFactory, BACKEND_ENV,
    BUILTIN_BACKENDS, DEFAULT_BACKEND,
};
pub use chrome::ChromeProfiler;
pub use clock::{now_unix_us, set_clock_skew_for_tests};
pub use error::{Error, Result};
pub use layer::{tracing_layer, ProfilerLayer, FILTER_ENV};
pub use layout::{safe_path_component, stage_trace_dir};
pub use noop::NoopProfiler;
pub use options::{profiler_dir_from, profiler_dir_from_env, ProfileOptions, PROFILER_DIR_ENV};
pub use profiler::Profiler;
pub use recorder::{CapturedSpans, SpanCapture, SpanRecord};
pub use session::{ClockOffset, ProfileSession};
pub use torch::{init_main_thread, TorchProfiler};
pub use trace_file::{prepare_trace_dir, remove_unfinished, write_trace};
