//! The runtime model configuration and the architecture registry.
//!
//! Both loaders (GGUF metadata, Hugging Face `config.json`) produce a
//! [`ModelConfig`]; model code reads only this. Decisions that vary by model
//! live here as data (e.g. [`ModelConfig::qk_norm`] for Qwen3), so that one
//! decoder implementation serves the Llama family, Qwen2 and Qwen3.

/// The decoder families the engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Architecture {
    /// Llama, Mistral, SmolLM2: pre-norm decoder, RoPE, SwiGLU, GQA.
    Llama,
    /// Qwen2: Llama plus biases on the q/k/v projections.
    Qwen2,
    /// Qwen3: Llama plus RMSNorm on queries and keys per head.
    Qwen3,
}

impl Architecture {
    /// Looks up an HF `architectures` entry (`LlamaForCausalLM`, ...) or a
    /// GGUF `general.architecture` value (`llama`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" | "MistralForCausalLM" | "llama" | "mistral" => {
                Some(Architecture::Llama)
            }
            "Qwen2ForCausalLM" | "qwen2" => Some(Architecture::Qwen2),
            "Qwen3ForCausalLM" | "qwen3" => Some(Architecture::Qwen3),
            _ => None,
        }
    }

    /// The names [`Architecture::from_name`] accepts, for error messages.
    pub const SUPPORTED: &'static str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, \
         Qwen3ForCausalLM (GGUF: llama, mistral, qwen2, qwen3)";
}

/// How rotary position frequencies are rescaled for long contexts, as the
/// `rope_scaling` field of `config.json` states it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// Overall scale.
        factor: f64,
        /// Wavelengths above `original_max / low_freq_factor` are scaled fully.
        low_freq_factor: f64,
        /// Wavelengths below `original_max / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was trained with.
        original_max_position_embeddings: usize,
    },
}

/// Everything model code needs to build a decoder, whatever file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The decoder family.
    pub architecture: Architecture,
    /// Rows of the embedding and of the LM head.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's gate/up projections.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head (usually `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE rescaling, when the config states one.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// The LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
    /// Queries and keys are RMS-normalised per head before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Beginning-of-sequence token, when the model has one.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
}
