//! The engine's one error type.
//!
//! # Wrapped errors: the message says it once
//!
//! A variant that wraps another error puts that error's text in its own
//! message and does **not** return it from `source()` (no `#[source]`, no
//! `#[from]`, and no field named `source`, which thiserror would take as the
//! source): `to_string()` stays complete on one line, and a chain printer
//! (anyhow's `{:#}`) does not print the inner text a second time. The
//! wrapped error is kept in a field named `cause` (or the tuple field), and
//! conversions for `?` are written out by hand.
use std::path::PathBuf;

/// Everything that can go wrong inside the engine. Messages are lowercase and
/// name the bad value and where it came from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said (in the message, not a `source()`).
        cause: std::io::Error,
    },
    /// A model file is missing or does not match its checksum.
    #[error("model file {path}: {reason}; fetch it again with `scripts/setup`")]
    ModelFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A weights file (GGUF, safetensors) is malformed.
    #[error("{path}: malformed {format} file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// `gguf`, `safetensors`, `config.json`, ...
        format: &'static str,
        /// What is wrong, naming the offending field or offset.
        reason: String,
    },
    /// A model configuration file (`config.json`, GGUF metadata) has a
    /// missing, mistyped or unsupported field.
    #[error("{path}: field {field}: {reason}")]
    ModelConfig {
        /// The file.
        path: PathBuf,
        /// The field, e.g. `rope_scaling.rope_type` or `llama.block_count`.
        field: String,
        /// What is wrong, naming the bad value.
        reason: String,
    },
    /// The model's architecture is not in the registry.
    #[error("unknown architecture {name:?} in {source_name}; supported: {supported}")]
    UnknownArchitecture {
        /// The name the file gives.
        name: String,
        /// Where the name came from (file and field).
        source_name: String,
        /// The architectures the registry knows.
        supported: String,
    },
    /// A tensor uses a quantization the loader cannot dequantize.
    #[error("tensor {tensor:?} in {path}: unsupported quantization {kind}")]
    UnsupportedQuantization {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The GGML type name or id.
        kind: String,
    },
    /// A weight the architecture needs is absent or has the wrong shape.
    #[error("weight {name:?}: {reason}")]
    Weight {
        /// The checkpoint name of the tensor.
        name: String,
        /// Missing, or which shape was expected.
        reason: String,
    },
    /// A configuration value is out of range or inconsistent.
    #[error("invalid {field} = {value}: {reason}")]
    InvalidConfig {
        /// The field, e.g. `engine_args.device`.
        field: String,
        /// The value as given.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A sampling parameter is out of range.
    #[error("invalid sampling parameter {field} = {value}: {reason}")]
    InvalidSamplingParams {
        /// The vLLM field name, e.g. `top_p`.
        field: &'static str,
        /// The value as given.
        value: String,
        /// The accepted range.
        reason: String,
    },
    /// A prompt cannot be served (empty, too long, bad token ids).
    #[error("request {request_id:?}: invalid prompt: {reason}")]
    InvalidPrompt {
        /// The request.
        request_id: String,
        /// Why.
        reason: String,
    },
    /// A prompt, with the tokens asked for, does not fit the context. The
    /// texts are vLLM's (its OpenAI server's `_validate_input`), so clients
    /// that parse them keep working.
    #[error("{}", context_message(*prompt_tokens, *max_tokens, *max_model_len))]
    ContextLengthExceeded {
        /// The request.
        request_id: String,
        /// Tokens of the prompt.
        prompt_tokens: usize,
        /// Tokens asked for; `None` when the prompt alone fills the context.
        max_tokens: Option<usize>,
        /// The engine's context length.
        max_model_len: usize,
    },
    /// A media input (an audio clip, an image) that cannot be read or used.
    #[error("media input {input}: {reason}")]
    Media {
        /// Names the input: a path, `multi_modal_data.audio[0]`, ...
        input: String,
        /// Why.
        reason: String,
    },
    /// A request id is already in use.
    #[error("request id {0:?} is already in use")]
    DuplicateRequest(String),
    /// Tokenization, detokenization or chat templating failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Text could not be turned into phonemes (espeak-ng missing, unknown voice).
    #[error("phonemizer: {0}")]
    Phonemizer(String),
    /// libtorch reported an error (in the message, not a `source()`).
    #[error("libtorch: {0}")]
    Torch(tch::TchError),
}

/// `?` on libtorch calls; by hand, as `#[from]` would also make the
/// `TchError` a `source()` and print it twice in a chain.
impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error::Torch(e)
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
}

fn context_message(prompt: usize, max_tokens: Option<usize>, max_model_len: usize) -> String {
    match max_tokens {
        None => format!(
            "This model's maximum context length is {max_model_len} tokens. However, your \
             request has {prompt} input tokens. Please reduce the length of the input messages."
        ),
        Some(m) => format!(
            "'max_tokens' or 'max_completion_tokens' is too large: {m}. This model's maximum \
             context length is {max_model_len} tokens and your request has {prompt} input \
             tokens ({m} > {max_model_len} - {prompt})."
        ),
    }
}
