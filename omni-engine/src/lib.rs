//! # omni-engine
//!
//! The engine inside every stage: models on libtorch (`tch`), weight loading
//! (GGUF, Hugging Face safetensors folders), the tokenizer and chat template,
//! a paged KV cache with prefix caching, a continuous-batching scheduler, the
//! sampler and the incremental detokenizer.
//!
//! It stands alone: depend on `omni-engine` only to run a model in-process.
//! It must not know about processes, sockets or profiler backends; it marks
//! its phases with `tracing` spans (`step`, `schedule`, `forward`, `sample`)
//! and whoever installs a subscriber decides what to do with them.
#![warn(missing_docs)]

mod block_pool;
mod chat_template;
mod config;
mod detokenizer;
mod engine;
mod engine_core;
mod error;
mod generation;
mod gguf;
mod kv_cache;
mod linear;
mod loader;
mod media;
mod mel;
mod model;
mod model_files;
mod onnx;
mod phonemize;
mod pickle;
pub mod quant;
mod request;
mod safetensors;
mod sampler;
mod sampling_params;
mod scheduler;
mod shim;
mod tokenizer;
mod vocoder;
mod voice;
mod weights;

pub use block_pool::{BlockPool, PrefixCacheStats};
pub use chat_template::ChatTemplate;
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use detokenizer::Detokenizer;
pub use engine::{EngineArgs, LLMEngine};
pub use engine_core::EngineLoad;
pub use error::{Error, Result};
pub use generation::{GenerationEngine, GenerationModel, StageEngine, GENERATION_STAGES};
pub use gguf::{
    dequantize_bytes, hf_name as gguf_to_hf_name, GgmlType, GgufFile, GgufTensorInfo, GgufValue,
};
pub use kv_cache::KvCache;
pub use linear::{LayerGemms, WeightPrecision, QUANT_MAX_ROWS};
pub use loader::{load_model, LoadedModel, ModelSource};
pub use media::{
    AudioInput, ImageInput, ImagePatches, ImageProcessor, MultiModalData, VideoInput,
    WhisperFeatureExtractor, MAX_IMAGE_PIXELS, MAX_VIDEO_FRAMES,
};
pub use mel::{resample, MelConfig};
pub use model::qwen2_5_omni;
pub use model::{
    BatchEntry, ForwardBatch, Model, ModelOptions, ModelOutput, MropePositions, Vits, VitsDims,
    VitsScales,
};
pub use model_files::{
    known_model, model_dir, resolve_model_path, sha256_file, verify as verify_model_file,
    KnownModelFile, HIFIGAN, KNOWN_MODEL_FILES, PIPER_JOE, PIPER_JOE_CONFIG, SMOLLM2,
};
pub use onnx::{OnnxFile, OnnxNode};
pub use phonemize::{PhonemizedSentence, Phonemizer};
pub use request::{
    ChatMessage, ContentPart, FinishReason, MessageContent, MultiModalPrompt, Prompt,
    PromptLogprobs, RequestMetrics, RequestOutput, StopReason, TokenLogprobs, Waveform,
};
pub use safetensors::SafetensorsFiles;
pub use sampling_params::{SamplingParams, MAX_LOGPROBS};
pub use scheduler::SchedulerConfig;
pub use tch;
pub use tch::{Device, Kind};
pub use tokenizer::Tokenizer;
pub use vocoder::Vocoder;
pub use voice::PiperVoice;
pub use weights::{Blocks, LinearWeight, Weights};

/// For tests that change libtorch's intra-op threads: sets them back as they
/// were when it was made, when dropped, so a failing assertion leaves no
/// thread count behind for the tests after it.
#[cfg(test)]
pub(crate) struct RestoreThreads(i32);

#[cfg(test)]
impl RestoreThreads {
    pub(crate) fn new() -> Self {
        Self(tch::get_num_threads())
    }
}

#[cfg(test)]
impl Drop for RestoreThreads {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}

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
