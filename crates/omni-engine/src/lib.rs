//! # omni-engine
//!
//! The engine inside every stage: models on libtorch (`tch`), weight loading
//! (GGUF, Hugging Face safetensors folders), the tokenizer and chat template,
//! a paged KV cache, a continuous-batching scheduler, the sampler and the
//! incremental detokenizer.
//!
//! It stands alone: depend on `omni-engine` only to run a model in-process.
//! It must not know about processes, sockets or profiler backends; it marks
//! its phases with `tracing` spans (`step`, `schedule`, `forward`, `sample`)
//! and whoever installs a subscriber decides what to do with them.
#![warn(missing_docs)]

mod config;
// Wired into the public `LLMEngine` once the loaders (engine-load) land.
#[allow(dead_code)]
mod engine_core;
mod error;
mod kv_cache;
mod linear;
mod model;
mod request;
mod sampler;
mod sampling_params;
mod scheduler;
mod weights;

pub use config::{Architecture, ModelConfig, RopeScaling};
pub use error::{Error, Result};
pub use kv_cache::{BlockAllocator, KvCache};
pub use linear::WeightPrecision;
pub use model::{BatchEntry, ForwardBatch, Model, ModelOptions, ModelOutput};
pub use request::{
    ChatMessage, FinishReason, Prompt, RequestMetrics, RequestOutput, TokenLogprobs,
};
pub use sampling_params::{SamplingParams, MAX_LOGPROBS};
pub use scheduler::SchedulerConfig;
pub use tch::{Device, Kind};
pub use weights::Weights;

#[cfg(test)]
mod tests {
    #[test]
    fn tch_tensor_op_on_cpu() -> Result<(), tch::TchError> {
        let a = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let b = a.f_mul(&a)?.f_sum(tch::Kind::Float)?;
        assert_eq!(f32::try_from(&b)?, 14.0);
        Ok(())
    }
}
