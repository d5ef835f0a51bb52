//! # omni-core
//!
//! Omni's public API: `OmniLLM` (blocking) and `AsyncOmni` (tokio,
//! streaming) over multi-stage pipelines, engine args and pipeline config,
//! `SamplingParams` and `OmniRequestOutput`. It re-exports what a user needs,
//! so that it is the one dependency for pipelines.
//!
//! It must not know about HTTP or command-line parsing.
#![warn(missing_docs)]
