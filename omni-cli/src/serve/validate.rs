//! Turning an HTTP body into what the pipeline takes: a `Prompt`, one
//! `SamplingParams` per stage, and the final stages to answer with. Every
//! refusal is a 400 that names the field and the value.
//!
//! Sampling fields at the top level of a request apply to every stage, on
//! top of that stage's `default_sampling_params`; vLLM-Omni's
//! `sampling_params_list` gives one object per stage instead.
use base64::Engine as _;
use omni_core::{
    AudioInput, ChatMessage, ContentPart, ImageInput, MultiModalData, Prompt, SamplingParams,
    VideoInput,
};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use omni_core::engine::MAX_LOGPROBS;

use super::api_error::ApiError;
use super::openai::{
    ChatCompletionRequest, CompletionPrompt, CompletionRequest, MessageContent, SamplingFields,
};

/// One content part of a chat message; media parts add their item to
/// `media` and become its placeholder part. `at` names the part in errors.
fn content_part(
    at: &str,
    part: super::openai::ContentPart,
    media: &mut MultiModalData,
) -> Result<ContentPart, ApiError> {
    match part.kind.as_str() {
        "text" => Ok(ContentPart::Text {
            text: part.text.ok_or_else(|| {
                ApiError::bad_param(
                    format!("{at}.text"),
                    format!("{at} is a text part without text"),
                )
            })?,
        }),
        "input_audio" => {
            let audio = part.input_audio.ok_or_else(|| {
                ApiError::bad_param(
                    format!("{at}.input_audio"),
                    format!("{at} is an input_audio part without input_audio {{data, format}}"),
                )
            })?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(audio.data.trim())
                .map_err(|e| {
                    ApiError::bad_param(
                        format!("{at}.input_audio.data"),
                        format!("{at}.input_audio.data is not base64: {e}"),
                    )
                })?;
            media.audio.push(decode_audio(at, &bytes)?);
            Ok(ContentPart::Audio)
        }
        "audio_url" => {
            let url = part.audio_url.map(|u| u.url).ok_or_else(|| {
                ApiError::bad_param(
                    format!("{at}.audio_url"),
                    format!("{at} is an audio_url part without audio_url {{url}}"),
                )
            })?;
            let bytes = data_url(at, "audio_url", &url)?;
            media.audio.push(decode_audio(at, &bytes)?);
            Ok(ContentPart::Audio)
        }
        "image_url" => {
            let url = part.image_url.map(|u| u.url).ok_or_else(|| {
                ApiError::bad_param(
                    format!("{at}.image_url"),
                    format!("{at} is an image_url part without image_url {{url}}"),
                )
            })?;
            let bytes = data_url(at, "image_url", &url)?;
            media.image.push(
                ImageInput::decode(&bytes, at)
                    .map_err(|e| ApiError::bad_param(at.to_owned(), e.to_string()))?,
            );
            Ok(ContentPart::Image)
        }
        "video_url" => {
            let url = part.video_url.map(|u| u.url).ok_or_else(|| {
                ApiError::bad_param(
                    format!("{at}.video_url"),
                    format!("{at} is a video_url part without video_url {{url}}"),
                )
            })?;
            if !url.starts_with("data:image/gif") {
                let shown: String = url.chars().take(40).collect();
                return Err(ApiError::bad_param(
                    format!("{at}.video_url.url"),
                    format!(
                        "{at}: only animated GIFs as data: URLs are taken as video (got \
                         {shown:?}); this server decodes no MP4 or WebM (OmniLLM, AsyncOmni and \
                         omni generate --video take a video as its frames)"
                    ),
                ));
            }
            let bytes = data_url(at, "video_url", &url)?;
            media.video.push(
                VideoInput::decode_gif(&bytes, at)
                    .map_err(|e| ApiError::bad_param(at.to_owned(), e.to_string()))?,
            );
            Ok(ContentPart::Video)
        }
        kind => Err(ApiError::bad_param(
            at.to_owned(),
            format!(
                "content part of type {kind:?} in {at} is not supported: text, input_audio, \
                 audio_url, image_url and video_url parts are"
            ),
        )),
    }
}

fn decode_audio(at: &str, bytes: &[u8]) -> Result<AudioInput, ApiError> {
    AudioInput::decode(bytes, at).map_err(|e| ApiError::bad_param(at.to_owned(), e.to_string()))
}

/// The bytes of a `data:[<type>][;base64],<data>` URL. Other URLs would make
/// the server fetch what a client names; they are refused.
fn data_url(at: &str, kind: &str, url: &str) -> Result<Vec<u8>, ApiError> {
    let param = format!("{at}.{kind}.url");
    let Some(rest) = url.strip_prefix("data:") else {
        let shown: String = url.chars().take(64).collect();
        return Err(ApiError::bad_param(
            param,
            format!(
                "{at}: only data: URLs are accepted (got {shown:?}); this server does not \
                 fetch remote media"
            ),
        ));
    };
    let (meta, data) = rest.split_once(',').ok_or_else(|| {
        ApiError::bad_param(param.clone(), format!("{at}: a data: URL without a comma"))
    })?;
    if !meta.ends_with(";base64") {
        return Err(ApiError::bad_param(
            param,
            format!("{at}: the data: URL is not base64 ({meta:?})"),
        ));
    }
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::bad_param(param, format!("{at}: the data: URL is not base64: {e}")))
}

/// What the server knows about the pipeline when it checks a request.
#[derive(Debug, Clone)]
pub struct PipelineView {
    /// Names the `model` field may take.
    pub served_names: Vec<String>,
    /// Each stage's default sampling params, in stage order.
    pub defaults: Vec<SamplingParams>,
    /// `max_tokens` of a completion that sets none, over the defaults
    /// (vLLM's 16 with `--generation-config vllm`).
    pub completion_max_tokens: Option<usize>,
    /// Each stage's context length, when known.
    pub max_model_len: Vec<Option<usize>>,
    /// `(stage_id, final_output_type)` of every final stage, by stage id.
    pub finals: Vec<(usize, String)>,
}

/// A request ready for the pipeline.
#[derive(Debug, Clone)]
pub struct Plan {
    /// One per prompt of the request (a completion may send a batch).
    pub prompts: Vec<Prompt>,
    pub params: Vec<SamplingParams>,
    /// Samples per prompt: each runs as its own sequence, with the seed
    /// plus its index when a seed is given (vLLM's parallel sampling).
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// The final stages whose outputs become choices, in choice order.
    pub choices: Vec<usize>,
    pub output: OutputOptions,
}

/// How a choice shows what the stages returned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputOptions {
    /// Top alternatives per token when log-probabilities are returned
    /// (completions: `logprobs`; chat: `top_logprobs` with `logprobs`).
    pub logprobs: Option<usize>,
    /// Completions: the prompt comes before the completion.
    pub echo: bool,
    /// `echo` with `max_tokens: 0`: the prompt alone (one token is
    /// generated, as vLLM does, and left out).
    pub echo_only: bool,
    /// Tokens of log-probabilities as `token_id:N`.
    pub tokens_as_ids: bool,
    /// The request asked for `prompt_logprobs` (an echo asks for them on
    /// its own, without showing them so).
    pub prompt_logprobs: bool,
    /// A completion (not a chat) request.
    pub completion: bool,
}

/// The stage that reads the request's prompt: where echo and prompt
/// log-probabilities apply.
pub const ENTRY_STAGE: usize = 0;

/// vLLM's cap on prompts and samples a request may ask for at once; beyond
/// it a request is refused instead of queueing unbounded work.
pub const MAX_CHOICES: usize = 128;

/// Request fields of OpenAI's and vLLM's that Omni does not implement: a
/// request that sets one to anything but a value that asks for nothing
/// ([`asks_nothing`]) is refused, never served as if the field were not
/// there.
const NOT_IMPLEMENTED: [&str; 21] = [
    "suffix",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "use_beam_search",
    "length_penalty",
    "bad_words",
    "allowed_token_ids",
    "truncate_prompt_tokens",
    "prediction",
    "logits_processors",
    "chat_template",
    "add_special_tokens",
];

/// Every field the server reads; others are logged and ignored (vLLM's
/// rule for unknown fields).
const KNOWN: [&str; 39] = [
    "model",
    "prompt",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "best_of",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "skip_special_tokens",
    "sampling_params_list",
    "modalities",
    "min_tokens",
    "audio",
    "logprobs",
    "top_logprobs",
    "echo",
    "logit_bias",
    "prompt_logprobs",
    "include_stop_str_in_output",
    "return_tokens_as_token_ids",
    // Accepted and without effect on the output, as in vLLM.
    "user",
    "metadata",
    "store",
    "service_tier",
    "request_id",
    "priority",
    "spaces_between_special_tokens",
];

/// Whether `value` of field `key` asks for nothing: null, `false`, an empty
/// list or object, `"none"` (`tool_choice`), `{"type": "text"}`
/// (`response_format`), or an endpoint's own default (`add_special_tokens`:
/// true for completions, false for chat). Harnesses send such values.
fn asks_nothing(key: &str, value: &Value, chat: bool) -> bool {
    if key == "add_special_tokens" {
        return value.is_null() || value.as_bool() == Some(!chat);
    }
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Bool(true) => false,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty() || (o.len() == 1 && o.get("type") == Some(&"text".into())),
        Value::String(s) => s == "none",
        Value::Number(_) => false,
    }
}

/// Parses a JSON body: syntax errors and wrong types are 400s naming the
/// position or the field. `chat`: the body is a chat request (whose
/// `echo`, vLLM's message-prepending one, is not implemented).
pub fn parse_body<T: DeserializeOwned>(
    body: &[u8],
    chat: bool,
) -> Result<(T, SamplingFields), ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "empty request body: expected a JSON object",
        ));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(format!(
            "request body must be a JSON object, got {}",
            kind_of(&value)
        )));
    }
    if let Value::Object(fields) = &value {
        let refused = |k: &str| NOT_IMPLEMENTED.contains(&k) || (chat && k == "echo");
        if let Some((k, _)) = fields
            .iter()
            .find(|(k, v)| refused(k) && !asks_nothing(k, v, chat))
        {
            return Err(ApiError::bad_param(
                k.clone(),
                format!("{k} is not supported by this server: leave it out"),
            ));
        }
        let ignored: Vec<&str> = fields
            .keys()
            .map(String::as_str)
            .filter(|k| !KNOWN.contains(k) && !NOT_IMPLEMENTED.contains(k))
            .collect();
        if !ignored.is_empty() {
            tracing::warn!(
                "The following fields were present in the request but ignored: {ignored:?}"
            );
        }
    }
    let req = typed::<T>(&value)?;
    let sampling = typed::<SamplingFields>(&value)?;
    Ok((req, sampling))
}

fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::bad_request(format!("invalid request: {inner}"))
        } else {
            ApiError::bad_param(path.clone(), format!("invalid field {path}: {inner}"))
        }
    })
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl PipelineView {
    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if self.served_names.iter().any(|n| n == model) {
            Ok(())
        } else {
            // vLLM's answer, word for word: clients match on it.
            Err(ApiError::model_not_found(format!(
                "The model `{model}` does not exist."
            )))
        }
    }

    /// A `/v1/completions` body as pipeline inputs, with the model it names.
    pub fn plan_completion(&self, body: &[u8]) -> Result<(Plan, String), ApiError> {
        let (req, sampling) = parse_body::<CompletionRequest>(body, false)?;
        let model = req.model.clone();
        self.completion(req, &sampling).map(|p| (p, model))
    }

    /// A `/v1/chat/completions` body as pipeline inputs, with the model it
    /// names. Decodes the media it carries: call it off the async workers.
    pub fn plan_chat(&self, body: &[u8]) -> Result<(Plan, String), ApiError> {
        let (req, sampling) = parse_body::<ChatCompletionRequest>(body, true)?;
        let model = req.model.clone();
        self.chat(req, &sampling).map(|p| (p, model))
    }

    /// A completion request as pipeline inputs.
    pub fn completion(
        &self,
        req: CompletionRequest,
        sampling: &SamplingFields,
    ) -> Result<Plan, ApiError> {
        self.check_model(&req.model)?;
        let prompts: Vec<Prompt> = match req.prompt {
            CompletionPrompt::Text(t) => vec![Prompt::Text(t)],
            CompletionPrompt::Texts(v) => v.into_iter().map(Prompt::Text).collect(),
            CompletionPrompt::Tokens(ids) => vec![Prompt::TokenIds(ids)],
            CompletionPrompt::TokenBatches(v) => v.into_iter().map(Prompt::TokenIds).collect(),
        };
        if prompts.is_empty() {
            return Err(ApiError::bad_param("prompt", "prompt is an empty list"));
        }
        for (i, p) in prompts.iter().enumerate() {
            let empty = match p {
                Prompt::Text(t) => t.is_empty(),
                Prompt::TokenIds(ids) => ids.is_empty(),
                _ => false,
            };
            if empty {
                let at = if prompts.len() == 1 {
                    "prompt".to_string()
                } else {
                    format!("prompt[{i}]")
                };
                return Err(ApiError::bad_param(at.clone(), format!("{at} is empty")));
            }
        }
        if let Some(k) = req.logprobs.filter(|&k| k > MAX_LOGPROBS) {
            return Err(too_many_logprobs("logprobs", k));
        }
        let echo_only = req.echo && sampling.max_tokens == Some(0);
        let mut sampling = sampling.clone();
        if echo_only {
            // vLLM generates one token and shows the prompt alone.
            sampling.max_tokens = Some(1);
        }
        let output = OutputOptions {
            logprobs: req.logprobs,
            echo: req.echo,
            echo_only,
            tokens_as_ids: sampling.return_tokens_as_token_ids.unwrap_or(false),
            prompt_logprobs: sampling.prompt_logprobs.is_some(),
            completion: true,
        };
        self.plan(
            prompts,
            req.stream,
            req.stream_options.is_some_and(|o| o.include_usage),
            &sampling,
            output,
        )
    }

    /// A chat request as pipeline inputs.
    pub fn chat(
        &self,
        req: ChatCompletionRequest,
        sampling: &SamplingFields,
    ) -> Result<Plan, ApiError> {
        self.check_model(&req.model)?;
        if let Some(k) = req.top_logprobs.filter(|&k| k > MAX_LOGPROBS) {
            return Err(too_many_logprobs("top_logprobs", k));
        }
        if req.top_logprobs.is_some() && !req.logprobs {
            return Err(ApiError::bad_param(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ));
        }
        if req.messages.is_empty() {
            return Err(ApiError::bad_param(
                "messages",
                "messages is empty: send at least one",
            ));
        }
        let mut messages = Vec::with_capacity(req.messages.len());
        let mut media = MultiModalData::default();
        for (i, m) in req.messages.into_iter().enumerate() {
            const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::bad_param(
                    format!("messages[{i}].role"),
                    format!(
                        "unknown role {:?} in messages[{i}]: expected one of {ROLES:?}",
                        m.role
                    ),
                ));
            }
            let content = match m.content {
                None => omni_core::MessageContent::Text(String::new()),
                Some(MessageContent::Text(t)) => omni_core::MessageContent::Text(t),
                Some(MessageContent::Parts(parts)) => {
                    let mut out = Vec::with_capacity(parts.len());
                    for (j, p) in parts.into_iter().enumerate() {
                        let at = format!("messages[{i}].content[{j}]");
                        out.push(content_part(&at, p, &mut media)?);
                    }
                    // Text models' templates read a string: text parts alone
                    // are joined, as vLLM does for them.
                    if out.iter().all(|p| matches!(p, ContentPart::Text { .. })) {
                        omni_core::MessageContent::Parts(out).text().into()
                    } else {
                        omni_core::MessageContent::Parts(out)
                    }
                }
            };
            messages.push(ChatMessage {
                role: m.role,
                content,
            });
        }
        let output = OutputOptions {
            logprobs: req.logprobs.then(|| req.top_logprobs.unwrap_or(0)),
            echo: false,
            echo_only: false,
            tokens_as_ids: sampling.return_tokens_as_token_ids.unwrap_or(false),
            prompt_logprobs: sampling.prompt_logprobs.is_some(),
            completion: false,
        };
        self.plan(
            vec![Prompt::with_media(Prompt::Chat(messages), media)],
            req.stream,
            req.stream_options.is_some_and(|o| o.include_usage),
            sampling,
            output,
        )
    }

    fn plan(
        &self,
        prompts: Vec<Prompt>,
        stream: bool,
        include_usage: bool,
        sampling: &SamplingFields,
        output: OutputOptions,
    ) -> Result<Plan, ApiError> {
        let n = sampling.n.unwrap_or(1);
        if n == 0 {
            return Err(ApiError::bad_param("n", "n must be at least 1, got 0"));
        }
        if let Some(b) = sampling.best_of.filter(|&b| b != n) {
            return Err(ApiError::bad_param(
                "best_of",
                format!(
                    "best_of {b} is not supported (vLLM's V1 engine dropped it too): every \
                     sample is returned; set n to the number of samples you want"
                ),
            ));
        }
        if prompts.len() * n > MAX_CHOICES {
            return Err(ApiError::bad_param(
                "n",
                format!(
                    "{} prompts times n = {n} asks for {} sequences; at most {MAX_CHOICES} per \
                     request",
                    prompts.len(),
                    prompts.len() * n
                ),
            ));
        }
        let mut params = self.sampling_params(sampling)?;
        let token_prompts = prompts.iter().any(|p| matches!(p, Prompt::TokenIds(_)));
        let user_max_tokens = sampling
            .max_tokens
            .or(sampling.max_completion_tokens)
            .is_some()
            || sampling
                .sampling_params_list
                .as_ref()
                .and_then(|l| l.get(ENTRY_STAGE))
                .is_some_and(|v| v.get("max_tokens").is_some_and(|m| !m.is_null()));
        if let Some(entry) = params.get_mut(ENTRY_STAGE) {
            if let Some(k) = output.logprobs {
                entry.logprobs = Some(k);
            }
            // vLLM: an echo brings the prompt's log-probabilities along
            // with the completion's; an echo of token ids needs the prompt's
            // text, which the stage sends with them. A text prompt echoes
            // itself: no prompt logits (nor a skipped prefix cache) for it.
            if output.echo
                && entry.prompt_logprobs.is_none()
                && (output.logprobs.is_some() || token_prompts)
            {
                entry.prompt_logprobs = Some(output.logprobs.unwrap_or(0));
            }
            if user_max_tokens {
                // vLLM's server refuses a max_tokens the client gave that
                // does not fit; a default one stops at the context.
                entry.max_tokens_must_fit = true;
            } else if output.completion && self.completion_max_tokens.is_some() {
                entry.max_tokens = self.completion_max_tokens;
            }
        }
        let choices = self.choices(sampling.modalities.as_deref())?;
        Ok(Plan {
            prompts,
            params,
            n,
            stream,
            include_usage,
            choices,
            output,
        })
    }

    fn choices(&self, modalities: Option<&[String]>) -> Result<Vec<usize>, ApiError> {
        let Some(wanted) = modalities else {
            return Ok(self.finals.iter().map(|(s, _)| *s).collect());
        };
        let picked: Vec<usize> = self
            .finals
            .iter()
            .filter(|(_, kind)| wanted.iter().any(|w| w == kind))
            .map(|(s, _)| *s)
            .collect();
        if picked.is_empty() {
            let have: Vec<&str> = self.finals.iter().map(|(_, k)| k.as_str()).collect();
            return Err(ApiError::bad_param(
                "modalities",
                format!("modalities {wanted:?} are not produced by this pipeline: its final outputs are {have:?}"),
            ));
        }
        Ok(picked)
    }

    /// One `SamplingParams` per stage.
    pub fn sampling_params(&self, f: &SamplingFields) -> Result<Vec<SamplingParams>, ApiError> {
        let per_stage: Vec<Map<String, Value>> = match &f.sampling_params_list {
            Some(list) => {
                if list.len() != self.defaults.len() {
                    return Err(ApiError::bad_param(
                        "sampling_params_list",
                        format!(
                            "sampling_params_list has {} entries but the pipeline has {} stages: give one per stage",
                            list.len(),
                            self.defaults.len()
                        ),
                    ));
                }
                list.iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::Object(m) => Ok(m.clone()),
                        other => Err(ApiError::bad_param(
                            format!("sampling_params_list[{i}]"),
                            format!(
                                "sampling_params_list[{i}] must be an object, got {}",
                                kind_of(other)
                            ),
                        )),
                    })
                    .collect::<Result<_, _>>()?
            }
            None => {
                // Per-request fields that name the entry stage's tokens or
                // prompt stay there; the rest apply to every stage.
                let top = top_level(f)?;
                let mut rest = top.clone();
                rest.remove("prompt_logprobs");
                rest.remove("logit_bias");
                (0..self.defaults.len())
                    .map(|s| {
                        if s == ENTRY_STAGE {
                            top.clone()
                        } else {
                            rest.clone()
                        }
                    })
                    .collect()
            }
        };
        let mut out = Vec::with_capacity(self.defaults.len());
        for (stage_id, (default, overrides)) in self.defaults.iter().zip(per_stage).enumerate() {
            let mut merged = match serde_json::to_value(default) {
                Ok(Value::Object(m)) => m,
                _ => Map::new(),
            };
            merged.extend(overrides);
            let params: SamplingParams = serde_path_to_error::deserialize(Value::Object(merged))
                .map_err(|e| {
                    let path = e.path().to_string();
                    ApiError::bad_param(
                        path.clone(),
                        format!(
                            "invalid sampling param {path} for stage {stage_id}: {}",
                            e.into_inner()
                        ),
                    )
                })?;
            params.validate().map_err(|e| {
                ApiError::bad_request(format!("invalid sampling params for stage {stage_id}: {e}"))
            })?;
            // The prompt's length is the stage's to check (it tokenizes):
            // here only what no prompt could make fit.
            if let (Some(max_tokens), Some(Some(ctx))) =
                (params.max_tokens, self.max_model_len.get(stage_id))
            {
                if max_tokens >= *ctx {
                    return Err(ApiError::bad_param(
                        "max_tokens",
                        format!(
                            "'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. \
                             This model's maximum context length is {ctx} tokens (stage \
                             {stage_id}), and a prompt takes at least one."
                        ),
                    ));
                }
            }
            out.push(params);
        }
        Ok(out)
    }
}

fn too_many_logprobs(field: &str, k: usize) -> ApiError {
    ApiError::bad_param(
        field.to_owned(),
        format!(
            "Requested sample logprobs of {k}, which is greater than max allowed: {MAX_LOGPROBS}"
        ),
    )
}

/// The top-level sampling fields a request set, as `SamplingParams` keys.
fn top_level(f: &SamplingFields) -> Result<Map<String, Value>, ApiError> {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    put(
        "max_tokens",
        f.max_tokens.or(f.max_completion_tokens).map(Value::from),
    );
    put("temperature", f.temperature.map(Value::from));
    put("top_p", f.top_p.map(Value::from));
    put("top_k", f.top_k.map(Value::from));
    put("min_p", f.min_p.map(Value::from));
    // vLLM takes any 64-bit signed seed; the engine's generator takes its
    // bits.
    put("seed", f.seed.map(|s| Value::from(s as u64)));
    put("stop", f.stop.clone().map(|s| Value::from(s.into_vec())));
    put("stop_token_ids", f.stop_token_ids.clone().map(Value::from));
    put("presence_penalty", f.presence_penalty.map(Value::from));
    put("frequency_penalty", f.frequency_penalty.map(Value::from));
    put("repetition_penalty", f.repetition_penalty.map(Value::from));
    put("ignore_eos", f.ignore_eos.map(Value::from));
    put("min_tokens", f.min_tokens.map(Value::from));
    put(
        "include_stop_str_in_output",
        f.include_stop_str_in_output.map(Value::from),
    );
    put("prompt_logprobs", f.prompt_logprobs.map(Value::from));
    if let Some(bias) = &f.logit_bias {
        let mut m = Map::new();
        for (token, &b) in bias {
            let id: u32 = token.trim().parse().map_err(|_| {
                ApiError::bad_param(
                    "logit_bias",
                    format!("logit_bias key {token:?} is not a token id"),
                )
            })?;
            if !b.is_finite() {
                return Err(ApiError::bad_param(
                    "logit_bias",
                    format!("logit_bias[{token:?}] = {b} is not a finite number"),
                ));
            }
            // OpenAI's range; vLLM clamps to it.
            m.insert(id.to_string(), Value::from(b.clamp(-100.0, 100.0)));
        }
        put("logit_bias", Some(Value::Object(m)));
    }
    put(
        "speaker",
        f.audio
            .as_ref()
            .and_then(|a| a.voice.clone())
            .map(Value::from),
    );
    put(
        "skip_special_tokens",
        f.skip_special_tokens.map(Value::from),
    );
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> PipelineView {
        PipelineView {
            served_names: vec!["default".into(), "SmolLM2-135M-Instruct".into()],
            defaults: vec![
                SamplingParams {
                    max_tokens: Some(128),
                    ..SamplingParams::greedy()
                },
                SamplingParams {
                    max_tokens: Some(48),
                    ..SamplingParams::greedy()
                },
            ],
            completion_max_tokens: None,
            max_model_len: vec![Some(8192), Some(8192)],
            finals: vec![(0, "text".into()), (1, "text".into())],
        }
    }

    fn chat(body: &str) -> Result<Plan, ApiError> {
        let (req, sampling) = parse_body::<ChatCompletionRequest>(body.as_bytes(), true)?;
        view().chat(req, &sampling)
    }

    fn completion(body: &str) -> Result<Plan, ApiError> {
        let (req, sampling) = parse_body::<CompletionRequest>(body.as_bytes(), false)?;
        view().completion(req, &sampling)
    }

    fn refused(r: Result<Plan, ApiError>) -> ApiError {
        match r {
            Err(e) => e,
            Ok(p) => panic!("accepted: {p:?}"),
        }
    }

    const MSG: &str = r#""messages":[{"role":"user","content":"hi"}]"#;

    #[test]
    fn top_level_fields_apply_to_every_stage_over_its_defaults() -> Result<(), ApiError> {
        let plan = chat(&format!(
            r#"{{"model":"default",{MSG},"max_tokens":7,"temperature":0.5,"stop":"END","seed":3}}"#
        ))?;
        assert_eq!(plan.params.len(), 2);
        for p in &plan.params {
            assert_eq!(p.max_tokens, Some(7));
            assert_eq!(p.temperature, 0.5);
            assert_eq!(p.stop, vec!["END".to_string()]);
            assert_eq!(p.seed, Some(3));
        }
        assert_eq!(plan.choices, vec![0, 1]);
        assert!(!plan.stream);
        // Without fields: each stage's own defaults.
        let plan = chat(&format!(r#"{{"model":"default",{MSG}}}"#))?;
        assert_eq!(plan.params[0].max_tokens, Some(128));
        assert_eq!(plan.params[1].max_tokens, Some(48));
        Ok(())
    }

    #[test]
    fn sampling_params_list_gives_one_object_per_stage() -> Result<(), ApiError> {
        let plan = chat(&format!(
            r#"{{"model":"default",{MSG},"sampling_params_list":[{{"max_tokens":3}},{{"max_tokens":2,"top_k":5}}],"stream":true,"stream_options":{{"include_usage":true}}}}"#
        ))?;
        assert_eq!(plan.params[0].max_tokens, Some(3));
        assert_eq!(plan.params[1].max_tokens, Some(2));
        assert_eq!(plan.params[1].top_k, 5);
        assert!(plan.stream && plan.include_usage);

        let e = refused(chat(&format!(
            r#"{{"model":"default",{MSG},"sampling_params_list":[{{}}]}}"#
        )));
        assert_eq!(e.param.as_deref(), Some("sampling_params_list"));
        assert!(
            e.message.contains("1 entries") && e.message.contains("2 stages"),
            "{}",
            e.message
        );
        let e = refused(chat(&format!(
            r#"{{"model":"default",{MSG},"sampling_params_list":[{{"max_tokens":"x"}},{{}}]}}"#
        )));
        assert!(
            e.message.contains("max_tokens") && e.message.contains("stage 0"),
            "{}",
            e.message
        );
        Ok(())
    }

    #[test]
    fn malformed_json_and_wrong_types_are_400_naming_the_field() {
        let e = refused(chat("{not json"));
        assert_eq!(e.status.as_u16(), 400);
        assert!(e.message.contains("malformed JSON"), "{}", e.message);
        let e = refused(chat("[1,2]"));
        assert!(e.message.contains("an array"), "{}", e.message);
        let e = refused(chat(&format!(
            r#"{{"model":"default",{MSG},"max_tokens":"ten"}}"#
        )));
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(e.message.contains("ten"), "{}", e.message);
        let e = refused(chat(r#"{"model":"default","messages":"hi"}"#));
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = refused(chat(r#"{"model":"default"}"#));
        assert!(e.message.contains("messages"), "{}", e.message);
        let e = refused(chat(&format!(
            r#"{{"model":"default",{MSG},"stream":"yes"}}"#
        )));
        assert_eq!(e.param.as_deref(), Some("stream"));
    }

    #[test]
    fn semantic_errors_name_the_value() {
        let e = refused(chat(&format!(r#"{{"model":"gpt-4",{MSG}}}"#)));
        assert_eq!(e.message, "The model `gpt-4` does not exist.");
        assert_eq!(e.status.as_u16(), 404);
        assert_eq!(e.kind(), "NotFoundError");
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = refused(chat(&format!(
            r#"{{"model":"default",{MSG},"max_tokens":9000}}"#
        )));
        assert!(
            e.message.contains("9000") && e.message.contains("8192"),
            "{}",
            e.message
        );
        let e = refused(chat(&format!(
            r#"{{"model":"default",{MSG},"temperature":-1}}"#
        )));
        assert!(e.message.contains("-1"), "{}", e.message);
        let e = refused(chat(&format!(r#"{{"model":"default",{MSG},"n":0}}"#)));
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = refused(chat(&format!(
            r#"{{"model":"default",{MSG},"n":2,"best_of":3}}"#
        )));
        assert_eq!(e.param.as_deref(), Some("best_of"));
        let e = refused(chat(&format!(
            r#"{{"model":"default",{MSG},"response_format":{{"type":"json_object"}}}}"#
        )));
        assert_eq!(e.param.as_deref(), Some("response_format"));
        let e = refused(chat(&format!(r#"{{"model":"default",{MSG},"echo":true}}"#)));
        assert_eq!(e.param.as_deref(), Some("echo"));
        let e = refused(completion(
            r#"{"model":"default","prompt":"x","add_special_tokens":false}"#,
        ));
        assert_eq!(e.param.as_deref(), Some("add_special_tokens"));
        // Values that ask for nothing pass.
        chat(&format!(
            r#"{{"model":"default",{MSG},"tools":[],"tool_choice":"none","use_beam_search":false,"response_format":{{"type":"text"}},"add_special_tokens":false,"echo":false}}"#
        ))
        .map_err(|e| format!("{e:?}"))
        .expect("harmless values are accepted");
        let e = refused(chat(&format!(
            r#"{{"model":"default",{MSG},"logprobs":true,"top_logprobs":21}}"#
        )));
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
        let e = refused(chat(&format!(
            r#"{{"model":"default",{MSG},"logit_bias":{{"x":1}}}}"#
        )));
        assert_eq!(e.param.as_deref(), Some("logit_bias"));
        let e = refused(chat(&format!(
            r#"{{"model":"default",{MSG},"seed":18446744073709551615}}"#
        )));
        assert_eq!(e.param.as_deref(), Some("seed"));
        let e = refused(chat(r#"{"model":"default","messages":[]}"#));
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = refused(chat(
            r#"{"model":"default","messages":[{"role":"wizard","content":"x"}]}"#,
        ));
        assert!(e.message.contains("wizard"), "{}", e.message);
        let e = refused(chat(&format!(
            r#"{{"model":"default",{MSG},"modalities":["audio"]}}"#
        )));
        assert!(e.message.contains("audio"), "{}", e.message);
        let e = refused(completion(r#"{"model":"default","prompt":""}"#));
        assert_eq!(e.param.as_deref(), Some("prompt"));
        let e = refused(completion(r#"{"model":"default","prompt":["a",""]}"#));
        assert_eq!(e.param.as_deref(), Some("prompt[1]"));
    }

    #[test]
    fn vllm_fields_reach_the_params() -> Result<(), ApiError> {
        let plan = completion(
            r#"{"model":"default","prompt":["a","b"],"n":3,"seed":-1,"logprobs":2,"echo":true,"max_tokens":0,"include_stop_str_in_output":true,"logit_bias":{"7":250,"9":-3.5},"min_tokens":0,"unknown_field":1}"#,
        )?;
        assert_eq!(plan.prompts.len(), 2);
        assert_eq!(plan.n, 3);
        assert!(plan.output.echo && plan.output.echo_only);
        assert_eq!(plan.output.logprobs, Some(2));
        let p = &plan.params[0];
        assert_eq!(p.seed, Some(u64::MAX), "-1 as its 64 bits");
        assert_eq!(p.max_tokens, Some(1), "echo alone still samples one token");
        assert_eq!(p.logprobs, Some(2));
        assert_eq!(p.prompt_logprobs, Some(2), "echo brings the prompt's");
        assert!(p.include_stop_str_in_output);
        assert_eq!(p.logit_bias.get(&7), Some(&100.0), "clamped");
        assert_eq!(p.logit_bias.get(&9), Some(&-3.5));
        // Only the stage that reads the prompt computes its logprobs.
        assert_eq!(plan.params[1].prompt_logprobs, None);
        let plan = chat(&format!(
            r#"{{"model":"default",{MSG},"logprobs":true,"top_logprobs":3}}"#
        ))?;
        assert_eq!(plan.output.logprobs, Some(3));
        assert_eq!(plan.params[0].logprobs, Some(3));
        Ok(())
    }

    #[test]
    fn prompts_of_every_shape() -> Result<(), ApiError> {
        let first = |body: &str| completion(body).map(|mut p| p.prompts.remove(0));
        assert!(
            matches!(first(r#"{"model":"default","prompt":"hi"}"#)?, Prompt::Text(t) if t == "hi")
        );
        assert!(matches!(
            first(r#"{"model":"default","prompt":["hi"]}"#)?,
            Prompt::Text(_)
        ));
        assert!(
            matches!(first(r#"{"model":"default","prompt":[1,2,3]}"#)?, Prompt::TokenIds(ids) if ids == [1,2,3])
        );
        assert!(
            matches!(first(r#"{"model":"default","prompt":[[1,2],[3]]}"#)?, Prompt::TokenIds(ids) if ids == [1,2])
        );
        let plan = chat(
            r#"{"model":"SmolLM2-135M-Instruct","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        )?;
        match plan.prompts.into_iter().next() {
            Some(Prompt::Chat(m)) => {
                assert_eq!(m.len(), 2);
                assert_eq!(m[1].content, "ab");
            }
            other => panic!("{other:?}"),
        }
        Ok(())
    }
}
