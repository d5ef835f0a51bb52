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
    /// Each stage's context length, when known.
    pub max_model_len: Vec<Option<usize>>,
    /// `(stage_id, final_output_type)` of every final stage, by stage id.
    pub finals: Vec<(usize, String)>,
}

/// A request ready for the pipeline.
#[derive(Debug, Clone)]
pub struct Plan {
    pub prompt: Prompt,
    pub params: Vec<SamplingParams>,
    pub stream: bool,
    pub include_usage: bool,
    /// The final stages whose outputs become choices, in choice order.
    pub choices: Vec<usize>,
}

/// Parses a JSON body: syntax errors and wrong types are 400s naming the
/// position or the field.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<(T, SamplingFields), ApiError> {
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
            Err(ApiError::bad_param(
                "model",
                format!(
                    "unknown model {model:?}: this server serves {:?}",
                    self.served_names
                ),
            ))
        }
    }

    /// A completion request as pipeline inputs.
    pub fn completion(
        &self,
        req: CompletionRequest,
        sampling: &SamplingFields,
    ) -> Result<Plan, ApiError> {
        self.check_model(&req.model)?;
        if req.echo {
            return Err(ApiError::bad_param("echo", "echo is not supported"));
        }
        if req.logprobs.is_some() {
            return Err(ApiError::bad_param(
                "logprobs",
                "logprobs are not supported yet",
            ));
        }
        let prompt = match req.prompt {
            CompletionPrompt::Text(t) => Prompt::Text(t),
            CompletionPrompt::Texts(mut v) if v.len() == 1 => Prompt::Text(v.remove(0)),
            CompletionPrompt::Tokens(ids) => Prompt::TokenIds(ids),
            CompletionPrompt::TokenBatches(mut v) if v.len() == 1 => Prompt::TokenIds(v.remove(0)),
            CompletionPrompt::Texts(v) => return Err(batch_error(v.len())),
            CompletionPrompt::TokenBatches(v) => return Err(batch_error(v.len())),
        };
        let empty = match &prompt {
            Prompt::Text(t) => t.is_empty(),
            Prompt::TokenIds(ids) => ids.is_empty(),
            _ => false,
        };
        if empty {
            return Err(ApiError::bad_param("prompt", "prompt is empty"));
        }
        self.plan(
            prompt,
            req.stream,
            req.stream_options.is_some_and(|o| o.include_usage),
            sampling,
        )
    }

    /// A chat request as pipeline inputs.
    pub fn chat(
        &self,
        req: ChatCompletionRequest,
        sampling: &SamplingFields,
    ) -> Result<Plan, ApiError> {
        self.check_model(&req.model)?;
        if req.logprobs {
            return Err(ApiError::bad_param(
                "logprobs",
                "logprobs are not supported yet",
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
        self.plan(
            Prompt::with_media(Prompt::Chat(messages), media),
            req.stream,
            req.stream_options.is_some_and(|o| o.include_usage),
            sampling,
        )
    }

    fn plan(
        &self,
        prompt: Prompt,
        stream: bool,
        include_usage: bool,
        sampling: &SamplingFields,
    ) -> Result<Plan, ApiError> {
        let params = self.sampling_params(sampling)?;
        let choices = self.choices(sampling.modalities.as_deref())?;
        Ok(Plan {
            prompt,
            params,
            stream,
            include_usage,
            choices,
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
        if f.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_param(
                "n",
                format!("n {} is not supported: only n = 1", f.n.unwrap_or_default()),
            ));
        }
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
            None => vec![top_level(f); self.defaults.len()],
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
            if let (Some(max_tokens), Some(Some(ctx))) =
                (params.max_tokens, self.max_model_len.get(stage_id))
            {
                if max_tokens > *ctx {
                    return Err(ApiError::bad_param(
                        "max_tokens",
                        format!(
                            "max_tokens {max_tokens} is more than the context length {ctx} of stage {stage_id}"
                        ),
                    ));
                }
            }
            out.push(params);
        }
        Ok(out)
    }
}

fn batch_error(n: usize) -> ApiError {
    ApiError::bad_param(
        "prompt",
        format!("a batch of {n} prompts is not supported: send one prompt per request"),
    )
}

/// The top-level sampling fields a request set, as `SamplingParams` keys.
fn top_level(f: &SamplingFields) -> Map<String, Value> {
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
    put("seed", f.seed.map(Value::from));
    put("stop", f.stop.clone().map(|s| Value::from(s.into_vec())));
    put("stop_token_ids", f.stop_token_ids.clone().map(Value::from));
    put("presence_penalty", f.presence_penalty.map(Value::from));
    put("frequency_penalty", f.frequency_penalty.map(Value::from));
    put("repetition_penalty", f.repetition_penalty.map(Value::from));
    put("ignore_eos", f.ignore_eos.map(Value::from));
    put("min_tokens", f.min_tokens.map(Value::from));
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
    m
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
            max_model_len: vec![Some(8192), Some(8192)],
            finals: vec![(0, "text".into()), (1, "text".into())],
        }
    }

    fn chat(body: &str) -> Result<Plan, ApiError> {
        let (req, sampling) = parse_body::<ChatCompletionRequest>(body.as_bytes())?;
        view().chat(req, &sampling)
    }

    fn completion(body: &str) -> Result<Plan, ApiError> {
        let (req, sampling) = parse_body::<CompletionRequest>(body.as_bytes())?;
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
        assert!(e.message.contains("gpt-4"), "{}", e.message);
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
        let e = refused(chat(&format!(r#"{{"model":"default",{MSG},"n":2}}"#)));
        assert_eq!(e.param.as_deref(), Some("n"));
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
        let e = refused(completion(r#"{"model":"default","prompt":["a","b"]}"#));
        assert!(e.message.contains("2 prompts"), "{}", e.message);
    }

    #[test]
    fn prompts_of_every_shape() -> Result<(), ApiError> {
        assert!(
            matches!(completion(r#"{"model":"default","prompt":"hi"}"#)?.prompt, Prompt::Text(t) if t == "hi")
        );
        assert!(matches!(
            completion(r#"{"model":"default","prompt":["hi"]}"#)?.prompt,
            Prompt::Text(_)
        ));
        assert!(
            matches!(completion(r#"{"model":"default","prompt":[1,2,3]}"#)?.prompt, Prompt::TokenIds(ids) if ids == [1,2,3])
        );
        let plan = chat(
            r#"{"model":"SmolLM2-135M-Instruct","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        )?;
        match plan.prompt {
            Prompt::Chat(m) => {
                assert_eq!(m.len(), 2);
                assert_eq!(m[1].content, "ab");
            }
            other => panic!("{other:?}"),
        }
        Ok(())
    }
}
