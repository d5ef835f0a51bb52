//! OpenAI's HTTP wire types for `/v1/completions`, `/v1/chat/completions`
//! and `/v1/models`, with vLLM's and vLLM-Omni's extra request fields
//! (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`,
//! `sampling_params_list`, `modalities`).
//!
//! Requests accept what OpenAI's clients send; fields the server does not
//! know are logged and ignored (vLLM's rule), fields it knows but does not
//! implement are refused ([`super::validate`]); wrong types are errors.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One string.
    One(String),
    /// Several strings.
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The prompt of a completion request.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum CompletionPrompt {
    /// Text.
    Text(String),
    /// A batch of texts: one choice (or `n`) per prompt.
    Texts(Vec<String>),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A batch of token-id lists.
    TokenBatches(Vec<Vec<u32>>),
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct SamplingFields {
    pub max_tokens: Option<usize>,
    /// Chat's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub n: Option<usize>,
    /// vLLM's V0 `best_of`; V1 (and Omni) run `n` samples only.
    pub best_of: Option<usize>,
    /// Any 64-bit signed integer, as vLLM takes (`torch.long`'s range).
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    /// vLLM-Omni: one sampling-params object per stage; wins over the
    /// fields above.
    pub sampling_params_list: Option<Vec<serde_json::Value>>,
    /// vLLM-Omni: which final output types to return (`text`, `audio`);
    /// all final stages when absent.
    pub modalities: Option<Vec<String>>,
    /// vLLM's `min_tokens`.
    pub min_tokens: Option<usize>,
    /// vLLM's `include_stop_str_in_output`.
    pub include_stop_str_in_output: Option<bool>,
    /// OpenAI's `logit_bias`: token id (as a string) → bias, clamped to
    /// [-100, 100].
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// vLLM's `prompt_logprobs`: top log-probabilities per prompt token.
    pub prompt_logprobs: Option<usize>,
    /// vLLM's `return_tokens_as_token_ids`: logprob tokens as `token_id:N`.
    pub return_tokens_as_token_ids: Option<bool>,
    /// OpenAI's audio output options: `voice` picks the speaker of stages
    /// that have several (Qwen2.5-Omni); `format` must be `wav`.
    pub audio: Option<AudioParams>,
}

/// `audio` of a chat request.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct AudioParams {
    pub voice: Option<String>,
    pub format: Option<String>,
}

/// `stream_options` of a streaming request.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: CompletionPrompt,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Top log-probabilities per generated token (with the chosen one's).
    pub logprobs: Option<usize>,
    /// Return the prompt before the completion (with its log-probabilities
    /// when `logprobs` is set).
    #[serde(default)]
    pub echo: bool,
}

/// One chat message as clients send it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ChatMessageIn {
    pub role: String,
    /// Text or a list of content parts; `null` for e.g. tool-call turns.
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// A message's content.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts: `text`, `input_audio`, `audio_url`, `image_url`,
    /// `video_url`.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    /// OpenAI's audio input: base64 file bytes and their format.
    pub input_audio: Option<InputAudio>,
    /// vLLM's audio part: a URL (only `data:` URLs are fetched).
    pub audio_url: Option<UrlPart>,
    /// OpenAI's image part: a URL (only `data:` URLs are fetched).
    pub image_url: Option<UrlPart>,
    /// vLLM's video part: a URL (only `data:` URLs of animated GIFs).
    pub video_url: Option<UrlPart>,
}

/// `{"data": base64, "format": "wav"}`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct InputAudio {
    pub data: String,
    #[serde(default)]
    pub format: Option<String>,
}

/// `{"url": ...}`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct UrlPart {
    pub url: String,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Return the chosen tokens' log-probabilities.
    #[serde(default)]
    pub logprobs: bool,
    /// With `logprobs`: this many alternatives per token (0-20).
    pub top_logprobs: Option<usize>,
}

/// `usage` of a response.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`, as OpenAI reports it.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct PromptTokensDetails {
    /// Prompt tokens the first stage's prefix cache already held.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, cached_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// `logprobs` of a completion choice (OpenAI's legacy shape), one entry
/// per token; a prompt's first token has no log-probability.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    /// Character offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
    pub token_logprobs: Vec<Option<f32>>,
    pub tokens: Vec<String>,
    /// The top alternatives per token, token text → log-probability.
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
}

/// One alternative in a chat choice's `logprobs`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
}

/// One token in a chat choice's `logprobs.content`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// `logprobs` of a chat choice.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

/// What a choice says about the stop: the stop string or token id that
/// ended it (vLLM's `stop_reason`); `null` otherwise.
pub type StopReasonOut = Option<serde_json::Value>;

/// One entry of vLLM's `prompt_logprobs` (keyed by token id).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VllmLogprob {
    pub logprob: f32,
    /// 1 for the most likely token; `null` when outside the returned top.
    pub rank: Option<usize>,
    pub decoded_token: String,
}

/// vLLM's `prompt_logprobs`: per prompt token (the first `null`), its
/// own and the top alternatives, token id → log-probability.
pub type PromptLogprobsOut = Vec<Option<BTreeMap<String, VllmLogprob>>>;

/// One choice of a completion response.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
    pub stop_reason: StopReasonOut,
    /// vLLM's, when the request asked for `prompt_logprobs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobsOut>,
    /// vLLM-Omni: the stage this choice comes from.
    pub stage_id: usize,
    /// What the stage outputs (`text`, `audio`).
    pub modality: String,
}

/// `POST /v1/completions` answer.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

/// `message.audio` of a chat answer from an audio stage, or `delta.audio`
/// of a streamed one.
#[derive(Debug, Clone, Serialize)]
pub struct AudioOut {
    pub id: String,
    /// Base64 of a WAV file (a whole answer), or of a piece of 16-bit
    /// little-endian mono PCM (a stream's delta, OpenAI's `pcm16`).
    pub data: String,
    pub expires_at: u64,
    pub transcript: String,
    /// A stream's PCM sample rate (OpenAI's `pcm16` is 24 kHz, as
    /// Qwen2.5-Omni's; other voices differ), on streamed deltas only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_rate: Option<u32>,
}

/// The assistant's message.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio: Option<AudioOut>,
}

/// One choice of a chat answer.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    pub stop_reason: StopReasonOut,
    /// vLLM's, when the request asked for `prompt_logprobs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobsOut>,
    /// vLLM-Omni: the stage this choice comes from.
    pub stage_id: usize,
    /// What the stage outputs (`text`, `audio`).
    pub modality: String,
}

/// `POST /v1/chat/completions` answer.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// `delta` of a chat chunk.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio: Option<AudioOut>,
}

/// One choice of a chat chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: StopReasonOut,
    pub stage_id: usize,
}

/// One choice of a completion chunk.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChunkChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: StopReasonOut,
    pub stage_id: usize,
}

/// A streamed chunk: `chat.completion.chunk` or `text_completion`.
#[derive(Debug, Clone, Serialize)]
pub struct Chunk<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    /// Only on the last chunk, when `stream_options.include_usage` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub root: String,
    /// The first stage's context length (vLLM's field).
    pub max_model_len: Option<usize>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// Body of `/start_profile` and `/stop_profile`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileRequest {
    pub stages: Option<Vec<usize>>,
}
