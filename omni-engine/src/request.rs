//! A request's public shapes (what goes in, what comes out) and its private
//! life inside the engine (the sequence the scheduler moves around).
//!
//! A [`Sequence`] is the unit the scheduler and the KV cache deal in: its
//! tokens (prompt then output), how many of them already have K/V in the
//! cache, and its block table. Preemption throws the cached part away and
//! sets `num_computed_tokens` back to 0; the tokens stay, so the request is
//! recomputed, not restarted.
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::block_pool::BlockHash;
use crate::media::MultiModalData;
use crate::sampling_params::SamplingParams;

/// One part of a chat message's content (OpenAI's and Hugging Face's
/// content parts). A media part stands for the next item of its modality in
/// the prompt's [`MultiModalData`]; the chat template renders its
/// placeholder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ContentPart {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// The next audio clip.
    Audio,
    /// The next image.
    Image,
    /// The next video.
    Video,
}

/// A chat message's content: text, or a list of parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Text and media parts, in order.
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// The text parts, joined.
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(t) => t.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    ContentPart::Text { text } => Some(text.as_str()),
                    _ => None,
                })
                .collect(),
        }
    }
}

impl From<String> for MessageContent {
    fn from(s: String) -> Self {
        MessageContent::Text(s)
    }
}

impl From<&str> for MessageContent {
    fn from(s: &str) -> Self {
        MessageContent::Text(s.to_owned())
    }
}

impl PartialEq<&str> for MessageContent {
    fn eq(&self, other: &&str) -> bool {
        matches!(self, MessageContent::Text(t) if t == other)
    }
}

/// One message of a chat prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message: text, or text and media parts.
    pub content: MessageContent,
}

impl ChatMessage {
    /// A text message from `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: MessageContent::Text(content.into()),
        }
    }

    /// A message of text and media parts from `role`.
    pub fn with_parts(role: impl Into<String>, parts: Vec<ContentPart>) -> Self {
        Self {
            role: role.into(),
            content: MessageContent::Parts(parts),
        }
    }
}

/// What a request asks the model to continue.
///
/// Serialized untagged, so JSON reads naturally: `"text"`,
/// `[{"role": "user", "content": "hi"}]`, `[1, 2, 3]`, or with media
/// `{"prompt": ..., "multi_modal_data": {"audio": [...]}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum Prompt {
    /// Raw text, tokenized with the model's special tokens (BOS when it has one).
    Text(String),
    /// A conversation, rendered with the model's chat template and a
    /// generation prompt.
    Chat(Vec<ChatMessage>),
    /// Token ids, used as given.
    TokenIds(Vec<u32>),
    /// A prompt and the media its placeholders stand for (vLLM's
    /// `{"prompt": ..., "multi_modal_data": ...}`).
    MultiModal(MultiModalPrompt),
}

/// A prompt with media (see [`Prompt::MultiModal`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiModalPrompt {
    /// The text, chat or ids, with one placeholder per media item.
    pub prompt: Box<Prompt>,
    /// The media, by modality.
    pub multi_modal_data: MultiModalData,
}

impl Prompt {
    /// `prompt` with `data` (`prompt` itself when `data` is empty).
    pub fn with_media(prompt: Prompt, data: MultiModalData) -> Prompt {
        if data.is_empty() {
            return prompt;
        }
        Prompt::MultiModal(MultiModalPrompt {
            prompt: Box::new(prompt),
            multi_modal_data: data,
        })
    }

    /// The media it carries, if any.
    pub fn media(&self) -> Option<&MultiModalData> {
        match self {
            Prompt::MultiModal(m) => Some(&m.multi_modal_data),
            _ => None,
        }
    }

    /// The prompt without its media.
    pub fn without_media(&self) -> &Prompt {
        match self {
            Prompt::MultiModal(m) => m.prompt.without_media(),
            p => p,
        }
    }
}

impl From<&str> for Prompt {
    fn from(s: &str) -> Self {
        Prompt::Text(s.to_owned())
    }
}

impl From<String> for Prompt {
    fn from(s: String) -> Self {
        Prompt::Text(s)
    }
}

impl From<Vec<u32>> for Prompt {
    fn from(ids: Vec<u32>) -> Self {
        Prompt::TokenIds(ids)
    }
}

/// Why a request stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens`, or the context (or the whole KV cache) is full.
    Length,
    /// The caller aborted it.
    Abort,
}

impl FinishReason {
    /// The lowercase name (as in OpenAI's and vLLM's `finish_reason`).
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What ended a request that finished with [`FinishReason::Stop`] on
/// something the request asked for (vLLM's `stop_reason`); an
/// end-of-sequence token of the model has none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StopReason {
    /// One of `SamplingParams::stop_token_ids`.
    TokenId(u32),
    /// One of `SamplingParams::stop`.
    Text(String),
}

/// Log-probabilities around one token: a generated one, or a prompt token
/// (`SamplingParams::prompt_logprobs`).
///
/// Log-probabilities are those of the model's raw distribution (vLLM's
/// default `logprobs_mode`, `raw_logprobs`): before logit bias, penalties,
/// temperature and truncation. An impossible token's is -9999 (vLLM's
/// server's floor), never -inf.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// The token.
    pub token_id: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first
    /// (`SamplingParams::logprobs` of them).
    pub top: Vec<(u32, f32)>,
    /// The text of `token_id` alone, then of each `top` token, decoded
    /// with special tokens kept (what OpenAI's `tokens` show); filled by
    /// the engine that holds the tokenizer, empty before.
    #[serde(default)]
    pub decoded: Vec<String>,
}

impl TokenLogprobs {
    /// The text of `token_id` (empty when not decoded).
    pub fn text(&self) -> &str {
        self.decoded.first().map_or("", String::as_str)
    }

    /// The text of `top[i]` (empty when not decoded).
    pub fn top_text(&self, i: usize) -> &str {
        self.decoded.get(i + 1).map_or("", String::as_str)
    }
}

/// The log-probabilities of a prompt's tokens, each given the tokens before
/// it (nothing predicts the first), and the prompt as text: what an echo of
/// the prompt shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptLogprobs {
    /// The prompt's first token.
    pub first_token_id: u32,
    /// Its text alone (special tokens kept; empty before decoding).
    pub first_token: String,
    /// Per later prompt token, in order.
    pub tokens: Vec<TokenLogprobs>,
    /// The whole prompt decoded, special tokens kept (empty before
    /// decoding).
    pub text: String,
}

/// Timings and counts of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestMetrics {
    /// When `add_request` accepted it.
    pub arrival_time: Instant,
    /// When it was first part of a step.
    pub first_scheduled_time: Option<Instant>,
    /// When its first token was sampled.
    pub first_token_time: Option<Instant>,
    /// When it finished.
    pub finished_time: Option<Instant>,
    /// Prompt length in tokens.
    pub num_prompt_tokens: usize,
    /// Tokens generated so far.
    pub num_generated_tokens: usize,
    /// How often it was preempted (its KV cache dropped and recomputed).
    pub num_preemptions: usize,
    /// Prompt tokens whose K/V came from the prefix cache when it was first
    /// scheduled (vLLM's `num_cached_tokens`).
    pub num_cached_tokens: usize,
}

impl RequestMetrics {
    pub(crate) fn new(num_prompt_tokens: usize) -> Self {
        Self {
            arrival_time: Instant::now(),
            first_scheduled_time: None,
            first_token_time: None,
            finished_time: None,
            num_prompt_tokens,
            num_generated_tokens: 0,
            num_preemptions: 0,
            num_cached_tokens: 0,
        }
    }

    /// Time to first token, once there is one.
    pub fn time_to_first_token(&self) -> Option<std::time::Duration> {
        self.first_token_time.map(|t| t - self.arrival_time)
    }
}

/// Mono audio a generation stage made.
#[derive(Debug)]
pub struct Waveform {
    /// `[samples]`, f32 in `[-1, 1]`, on the CPU.
    pub samples: Tensor,
    /// Samples per second.
    pub sample_rate: u32,
}

/// What [`crate::LLMEngine::step`] (or a generation engine's) reports for a
/// request that progressed.
#[derive(Debug)]
pub struct RequestOutput {
    /// The caller's id.
    pub request_id: String,
    /// The prompt as tokens.
    pub prompt_token_ids: Vec<u32>,
    /// All tokens generated so far.
    pub token_ids: Vec<u32>,
    /// All text generated so far (stop strings trimmed).
    pub text: String,
    /// Text added by this step; never splits a UTF-8 character.
    pub delta_text: String,
    /// Whether the request is done.
    pub finished: bool,
    /// Why it finished.
    pub finish_reason: Option<FinishReason>,
    /// The stop string or stop token id that ended it, if one did.
    pub stop_reason: Option<StopReason>,
    /// Per generated token, when `SamplingParams::logprobs` asked for them.
    pub logprobs: Option<Vec<TokenLogprobs>>,
    /// When `SamplingParams::prompt_logprobs` asked for them: on the
    /// request's first output and its last.
    pub prompt_logprobs: Option<PromptLogprobs>,
    /// `[num_generated, hidden]` on the CPU, on finish, when
    /// `SamplingParams::output_hidden_states` asked for it.
    pub hidden_states: Option<Tensor>,
    /// `[positions read, hidden]` on the CPU, on finish, when
    /// `SamplingParams::output_states` asked for it: per prompt token and
    /// per generated token fed back (all but the last), its input embedding
    /// plus its final-norm hidden state (what Qwen2.5-Omni's talker reads).
    pub states: Option<Tensor>,
    /// The rows of `states` added since the previous output (every output,
    /// finished or not, with `output_states`): what a stage streams to the
    /// next while it is still generating.
    pub new_states: Option<Tensor>,
    /// `[3, prompt tokens]` int64 on the CPU, on the first output and on
    /// finish, with `output_states`,
    /// when the prompt had multimodal RoPE positions (an image): what
    /// Qwen2.5-Omni's talker continues its own positions from.
    pub mrope_positions: Option<Tensor>,
    /// The waveform, on finish, from a speech stage.
    pub audio: Option<Waveform>,
    /// Timings and counts.
    pub metrics: RequestMetrics,
}

impl RequestOutput {
    /// An output with no tokens or text: a speech stage's `audio` (all of
    /// it, or a streamed piece), or nothing at all (a stage that had
    /// nothing to do); finished with reason `stop` when `finished`.
    pub fn without_tokens(
        request_id: String,
        audio: Option<Waveform>,
        finished: bool,
        metrics: RequestMetrics,
    ) -> Self {
        RequestOutput {
            request_id,
            prompt_token_ids: Vec::new(),
            token_ids: Vec::new(),
            text: String::new(),
            delta_text: String::new(),
            finished,
            finish_reason: finished.then_some(FinishReason::Stop),
            logprobs: None,
            stop_reason: None,
            prompt_logprobs: None,
            hidden_states: None,
            states: None,
            new_states: None,
            mrope_positions: None,
            audio,
            metrics,
        }
    }
}

/// Input embeddings of a sequence whose tokens are not (only) ids of the
/// model's vocabulary: Qwen2.5-Omni's talker reads the thinker's states, its
/// thinker reads media through placeholders.
#[derive(Debug)]
pub(crate) struct SequenceInputs {
    /// `[prompt_len, embedding]`: the prompt positions' embeddings, used in
    /// place of their (placeholder) ids' embeddings.
    pub prompt: Tensor,
    /// Rows added to the embeddings of fed-back generated tokens; none for
    /// a thinker.
    pub stream: Option<ReplyStream>,
    /// Prompt positions that hold media rows (encoder outputs): their
    /// states leave the embedding out (see [`crate::BatchEntry::bare_states`]).
    pub media: Vec<std::ops::Range<usize>>,
    /// Multimodal RoPE positions of the prompt and the delta of later
    /// tokens (see [`crate::MropePositions`]); empty: plain positions.
    pub mrope: Vec<[i64; 3]>,
    /// See [`crate::MropePositions::delta`].
    pub mrope_delta: i64,
}

/// Rows added to the embedding of each generated token when it is fed
/// back: the j-th token gets row `j`, and once the stream is closed, tokens
/// past its end get its last row (Qwen2.5-Omni's talker reads the thinker's
/// reply so, then the text pad for as long as it goes on).
///
/// An open stream may still grow while its sequence runs (the thinker is
/// still writing): a token whose row has not arrived waits, and the
/// sequence is not scheduled until it does. Rows are kept in the chunks they
/// came in, so growing never copies what is there.
#[derive(Debug)]
pub(crate) struct ReplyStream {
    chunks: Vec<Tensor>,
    /// First row of each chunk.
    starts: Vec<usize>,
    len: usize,
    closed: bool,
}

impl ReplyStream {
    /// A stream of `rows` (`[n, embedding]`); a closed one needs a row.
    pub fn new(rows: Tensor, closed: bool) -> Self {
        let mut s = ReplyStream {
            chunks: Vec::new(),
            starts: Vec::new(),
            len: 0,
            closed: false,
        };
        s.push(rows, closed);
        s
    }

    /// Appends `rows` (may be empty), closing the stream when `close`.
    pub fn push(&mut self, rows: Tensor, close: bool) {
        let n = rows.size().first().copied().unwrap_or(0).max(0) as usize;
        if n > 0 {
            self.starts.push(self.len);
            self.chunks.push(rows);
            self.len += n;
        }
        self.closed |= close;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// How many generated tokens can be fed back now: all of them once the
    /// stream is closed (`None`), else one per row.
    pub fn ready_tokens(&self) -> Option<usize> {
        (!self.closed).then_some(self.len)
    }

    /// The rows of generated tokens `tokens` (`[tokens.len(), embedding]`),
    /// each run of rows from one chunk taken as one slice.
    pub fn rows(&self, tokens: std::ops::Range<usize>) -> Result<Tensor, tch::TchError> {
        if self.len == 0 {
            // The scheduler never feeds a token without its row.
            return Err(tch::TchError::Shape(
                "a reply stream with no rows was asked for one".to_owned(),
            ));
        }
        let last = self.len - 1;
        let mut parts: Vec<Tensor> = Vec::new();
        let mut j = tokens.start;
        while j < tokens.end {
            let row = j.min(last);
            let c = self.starts.partition_point(|&s| s <= row) - 1;
            let offset = row - self.starts[c];
            // Past the end, every token takes the last row.
            let run = if j >= last {
                1
            } else {
                (tokens.end - j).min(self.starts[c] + chunk_rows(&self.chunks[c]) - row)
            };
            parts.push(self.chunks[c].f_narrow(0, offset as i64, run as i64)?);
            j += run;
        }
        Tensor::f_cat(&parts, 0)
    }
}

fn chunk_rows(t: &Tensor) -> usize {
    t.size()[0] as usize
}

/// Where a sequence is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SequenceStatus {
    /// Queued (new or preempted); holds no KV blocks.
    Waiting,
    /// In the running batch; holds KV blocks for `num_computed_tokens`.
    Running,
    /// Done; its blocks are freed.
    Finished(FinishReason),
}

/// One request inside the engine.
#[derive(Debug)]
pub(crate) struct Sequence {
    pub request_id: String,
    pub prompt_len: usize,
    /// Prompt tokens, then generated tokens.
    pub tokens: Vec<u32>,
    pub params: SamplingParams,
    pub status: SequenceStatus,
    /// Tokens whose K/V are in the cache (always a prefix of `tokens`).
    pub num_computed_tokens: usize,
    /// Physical KV blocks holding this sequence's tokens, in order.
    pub block_table: Vec<u32>,
    /// Prefix-cache hashes of the leading full blocks of `tokens`, as far as
    /// they were needed (a function of `tokens`, so preemption keeps them).
    pub block_hashes: Vec<BlockHash>,
    /// The request's own generator, so its draws do not depend on the batch.
    pub rng: ChaCha20Rng,
    /// Admission order; earlier requests keep their place under preemption.
    pub arrival_index: u64,
    pub logprobs: Vec<TokenLogprobs>,
    /// With `params.prompt_logprobs`: per prompt position after the first,
    /// as its prefill computed them.
    pub prompt_logprobs: Vec<TokenLogprobs>,
    /// Set when a stop string or stop token ended the sequence.
    pub stop_reason: Option<StopReason>,
    /// One `[hidden]` row per generated token, when requested.
    pub hidden_states: Vec<Tensor>,
    /// Embeddings that stand in for token ids' (see [`SequenceInputs`]).
    pub inputs: Option<SequenceInputs>,
    /// With `params.output_states`: per position the model read, in order,
    /// its input embedding plus its final-norm hidden state.
    pub states: Vec<Tensor>,
    /// Rows of `states` already given out as `new_states`.
    pub states_sent: usize,
    pub metrics: RequestMetrics,
    /// Output text so far (kept by the engine's detokenizing hook).
    pub text: String,
    /// Bytes of `text` already reported in a `delta_text`.
    pub emitted_len: usize,
    /// Bytes of `text` already searched for stop strings.
    pub stop_checked: usize,
}

impl Sequence {
    pub(crate) fn new(
        request_id: String,
        prompt: Vec<u32>,
        params: SamplingParams,
        rng_seed: u64,
        arrival_index: u64,
    ) -> Self {
        let prompt_len = prompt.len();
        Self {
            request_id,
            prompt_len,
            tokens: prompt,
            params,
            status: SequenceStatus::Waiting,
            num_computed_tokens: 0,
            block_table: Vec::new(),
            block_hashes: Vec::new(),
            rng: ChaCha20Rng::seed_from_u64(rng_seed),
            arrival_index,
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            stop_reason: None,
            hidden_states: Vec::new(),
            inputs: None,
            states: Vec::new(),
            states_sent: 0,
            metrics: RequestMetrics::new(prompt_len),
            text: String::new(),
            emitted_len: 0,
            stop_checked: 0,
        }
    }

    pub(crate) fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    pub(crate) fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub(crate) fn num_output_tokens(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens that still need a forward pass before the next sample.
    pub(crate) fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed_tokens
    }

    /// Of those, the ones a step can compute now: a token whose reply row
    /// has not arrived yet waits (see [`ReplyStream`]).
    pub(crate) fn num_schedulable(&self) -> usize {
        let n = self.num_uncomputed();
        match self
            .inputs
            .as_ref()
            .and_then(|i| i.stream.as_ref())
            .and_then(ReplyStream::ready_tokens)
        {
            Some(rows) => n.min((self.prompt_len + rows).saturating_sub(self.num_computed_tokens)),
            None => n,
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        matches!(self.status, SequenceStatus::Finished(_))
    }
}
