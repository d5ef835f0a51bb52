//! # omni-core
//!
//! Omni's public API: [`OmniLLM`] (blocking) and [`AsyncOmni`] (tokio,
//! streaming) over multi-stage pipelines, the arguments that start them
//! ([`OmniEngineArgs`], [`PipelineConfig`]), [`SamplingParams`] and
//! [`OmniRequestOutput`]. It re-exports what a user needs, so that it is the
//! one dependency for pipelines; the layers below are reachable as
//! [`engine`], [`runtime`] and [`profiler`].
//!
//! It mirrors vLLM-Omni's Python API, profiling included:
//!
//! ```no_run
//! # fn run() -> omni_core::Result<()> {
//! use omni_core::{OmniEngineArgs, OmniLLM, SamplingParams};
//!
//! // export VLLM_TORCH_PROFILER_DIR=/tmp/omni-traces
//! let omni_llm = OmniLLM::from_engine_args(OmniEngineArgs::new("default"))?;
//! omni_llm.start_profile(None)?; // all stages; Some(&[1]) for stage 1 only
//! let outputs = omni_llm.generate(["Why is the sky blue?"], SamplingParams::greedy())?;
//! let traces = omni_llm.stop_profile()?; // stage id -> trace files
//! # Ok(()) }
//! ```
//!
//! It must not know about HTTP or command-line parsing.
#![warn(missing_docs)]

mod async_omni;
mod convert;
mod engine_args;
mod error;
mod omni_llm;
mod request_output;
mod stage_sampling_params;

pub use async_omni::{AsyncOmni, OmniStream};
pub use convert::describe_stages;
pub use engine_args::{OmniEngineArgs, DEFAULT_PIPELINE};
pub use error::{Error, ErrorKind, Result};
pub use omni_llm::OmniLLM;
pub use request_output::{Audio, FinishReason, OmniMetrics, OmniRequestOutput, StageMetrics};
pub use stage_sampling_params::StageSamplingParams;

pub use omni_engine::{
    AudioInput, ChatMessage, ContentPart, EngineArgs, ImageInput, MessageContent, MultiModalData,
    MultiModalPrompt, Prompt, PromptLogprobs, SamplingParams, StopReason, TokenLogprobs,
    VideoInput,
};
pub use omni_profiler::tools as profile_tools;
pub use omni_runtime::{
    FinalOutputType, HealthMsg as StageHealth, PipelineConfig, StageConfig, StageInfo,
};

/// The engine layer (`omni-engine`): models, tokenizer, scheduler.
pub use omni_engine as engine;
/// The profiler layer (`omni-profiler`): backends and trace tools.
pub use omni_profiler as profiler;
/// The runtime layer (`omni-runtime`): stage processes and the orchestrator.
pub use omni_runtime as runtime;
