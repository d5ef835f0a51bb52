//! # omni-profiler
//!
//! Cross-stage profiling: the [`Profiler`] trait that backends implement,
//! the `torch` (libtorch Kineto, through a C++ shim), `chrome`
//! (`tracing-chrome`) and `noop` backends, trace file naming and atomic
//! writing, a `tracing` layer that turns engine spans into ranges of the
//! active backend, and trace tools (summary, merge).
//!
//! It must not know about models or processes: a stage worker drives it, and
//! so can a user profiling their own libtorch code.
#![warn(missing_docs)]
