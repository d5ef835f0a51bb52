//! OpenAI's streaming format: the `data:` payloads of server-sent events for
//! one request, built from the pipeline's outputs.
//!
//! Each final stage is one choice (`index` = its position among the chosen
//! final stages). A chat stream opens each choice with a chunk whose delta
//! carries `role: "assistant"`, then content deltas, then a chunk with an
//! empty delta and the `finish_reason`. With `stream_options.include_usage`
//! a last chunk has no choices and the `usage`; the stream ends with
//! `data: [DONE]`.
use std::collections::BTreeMap;

use omni_core::{FinishReason, OmniRequestOutput};
use serde::Serialize;

use super::openai::{AudioOut, ChatChunkChoice, ChatDelta, Chunk, CompletionChunkChoice, Usage};
use crate::audio;

/// The payload that ends every stream.
pub const DONE: &str = "[DONE]";

/// Which endpoint's chunk format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `chat.completion.chunk`.
    Chat,
    /// `text_completion`.
    Completion,
}

/// Builds the chunks of one request.
#[derive(Debug)]
pub struct ChunkBuilder {
    flavor: Flavor,
    id: String,
    created: u64,
    model: String,
    /// Final stage → choice index; stages not chosen are left out.
    choice: BTreeMap<usize, usize>,
    role_sent: Vec<bool>,
    /// Prompt tokens of the earliest stage that reported: (stage, prompt
    /// tokens, of those cached).
    prompt_tokens: Option<(usize, usize, usize)>,
    /// Tokens generated so far per chosen stage.
    completion_tokens: BTreeMap<usize, usize>,
}

/// `finish_reason` as OpenAI spells it.
pub fn finish_reason(r: Option<&FinishReason>) -> Option<String> {
    r.and_then(|r| serde_json::to_value(r).ok())
        .and_then(|v| v.as_str().map(str::to_string))
}

impl ChunkBuilder {
    /// `stages` are the chosen final stages, in choice order.
    pub fn new(flavor: Flavor, id: String, created: u64, model: String, stages: &[usize]) -> Self {
        Self {
            flavor,
            id,
            created,
            model,
            choice: stages.iter().enumerate().map(|(i, &s)| (s, i)).collect(),
            role_sent: vec![false; stages.len()],
            prompt_tokens: None,
            completion_tokens: BTreeMap::new(),
        }
    }

    /// The model name the chunks carry.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Usage so far.
    pub fn usage(&self) -> Usage {
        let (prompt, cached) = self.prompt_tokens.map_or((0, 0), |(_, n, c)| (n, c));
        Usage::new(prompt, cached, self.completion_tokens.values().sum())
    }

    fn chunk<C: Serialize>(&self, choices: Vec<C>, usage: Option<Usage>) -> String {
        let object = match self.flavor {
            Flavor::Chat => "chat.completion.chunk",
            Flavor::Completion => "text_completion",
        };
        let chunk = Chunk {
            id: self.id.clone(),
            object,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        };
        serde_json::to_string(&chunk).unwrap_or_default()
    }

    /// The payloads one output adds (none for stages not chosen).
    pub fn on_output(&mut self, out: &OmniRequestOutput) -> Vec<String> {
        // Prompt tokens arrive with a stage's last output; the earliest
        // stage's count is the request's prompt.
        if out.num_prompt_tokens > 0
            && self
                .prompt_tokens
                .is_none_or(|(stage, _, _)| out.stage_id <= stage)
        {
            let cached = out
                .metrics
                .stage(out.stage_id)
                .map_or(0, |m| m.num_cached_tokens);
            self.prompt_tokens = Some((out.stage_id, out.num_prompt_tokens, cached));
        }
        let Some(&index) = self.choice.get(&out.stage_id) else {
            return Vec::new();
        };
        self.completion_tokens
            .insert(out.stage_id, out.token_ids.len());
        let finish = if out.finished {
            finish_reason(out.finish_reason.as_ref()).or(Some("stop".to_string()))
        } else {
            None
        };
        let mut payloads = Vec::new();
        match self.flavor {
            Flavor::Completion => {
                if !out.delta_text.is_empty() || finish.is_some() {
                    payloads.push(self.chunk(
                        vec![CompletionChunkChoice {
                            index,
                            text: out.delta_text.clone(),
                            logprobs: None,
                            finish_reason: finish,
                        }],
                        None,
                    ));
                }
            }
            Flavor::Chat => {
                if !self.role_sent[index] {
                    self.role_sent[index] = true;
                    payloads.push(self.chat_chunk(
                        index,
                        ChatDelta {
                            role: Some("assistant"),
                            content: Some(String::new()),
                            audio: None,
                        },
                        None,
                    ));
                }
                let audio = match (&out.audio, out.finished) {
                    (Some(a), true) => Some(AudioOut {
                        id: format!("audio-{}-{}", self.id, out.stage_id),
                        data: audio::to_base64_wav(a),
                        expires_at: self.created + 3600,
                        transcript: String::new(),
                    }),
                    _ => None,
                };
                if !out.delta_text.is_empty() || audio.is_some() {
                    let content = (!out.delta_text.is_empty()).then(|| out.delta_text.clone());
                    payloads.push(self.chat_chunk(
                        index,
                        ChatDelta {
                            role: None,
                            content,
                            audio,
                        },
                        None,
                    ));
                }
                if finish.is_some() {
                    payloads.push(self.chat_chunk(index, ChatDelta::default(), finish));
                }
            }
        }
        payloads
    }

    fn chat_chunk(&self, index: usize, delta: ChatDelta, finish_reason: Option<String>) -> String {
        self.chunk(
            vec![ChatChunkChoice {
                index,
                delta,
                logprobs: None,
                finish_reason,
            }],
            None,
        )
    }

    /// The last chunk with `usage` and no choices.
    pub fn usage_chunk(&self) -> String {
        self.chunk(Vec::<CompletionChunkChoice>::new(), Some(self.usage()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omni_core::OmniRequestOutput;

    fn output(
        stage_id: usize,
        delta: &str,
        text: &str,
        tokens: usize,
        finished: bool,
    ) -> OmniRequestOutput {
        let mut o = OmniRequestOutput::new("r".into(), stage_id, "text".into());
        o.delta_text = delta.into();
        o.text = text.into();
        o.token_ids = vec![1; tokens];
        o.num_prompt_tokens = 5;
        let mut m = omni_core::StageMetrics::default();
        m.stage_id = stage_id;
        m.num_cached_tokens = 2 + stage_id;
        o.metrics.stages.push(m);
        o.finished = finished;
        o.finish_reason = finished.then_some(FinishReason::Length);
        o
    }

    fn parse(payloads: &[String]) -> Vec<serde_json::Value> {
        payloads
            .iter()
            .map(|p| serde_json::from_str(p).expect("chunk is JSON"))
            .collect()
    }

    #[test]
    fn chat_chunks_open_with_role_carry_deltas_and_close_with_finish_reason() {
        let mut b = ChunkBuilder::new(
            Flavor::Chat,
            "chatcmpl-1".into(),
            7,
            "default".into(),
            &[0, 1],
        );
        let first = parse(&b.on_output(&output(0, "Hel", "Hel", 1, false)));
        assert_eq!(first.len(), 2);
        assert_eq!(first[0]["object"], "chat.completion.chunk");
        assert_eq!(first[0]["id"], "chatcmpl-1");
        assert_eq!(first[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first[1]["choices"][0]["delta"]["content"], "Hel");
        assert!(first[1]["choices"][0]["delta"].get("role").is_none());
        assert!(first[1]["choices"][0]["finish_reason"].is_null());

        let last = parse(&b.on_output(&output(0, "lo", "Hello", 2, true)));
        assert_eq!(last[0]["choices"][0]["delta"]["content"], "lo");
        assert_eq!(last[1]["choices"][0]["finish_reason"], "length");
        assert_eq!(last[1]["choices"][0]["delta"], serde_json::json!({}));

        // Stage 1 is choice 1 and opens with its own role chunk.
        let s1 = parse(&b.on_output(&output(1, "Hi", "Hi", 1, true)));
        assert_eq!(s1[0]["choices"][0]["index"], 1);
        assert_eq!(s1[0]["choices"][0]["delta"]["role"], "assistant");

        let usage: serde_json::Value = serde_json::from_str(&b.usage_chunk()).expect("JSON");
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(usage["usage"]["prompt_tokens"], 5);
        assert_eq!(usage["usage"]["completion_tokens"], 3);
        assert_eq!(usage["usage"]["total_tokens"], 8);
        // Cached tokens of the stage that read the prompt: stage 0.
        assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
    }

    #[test]
    fn completion_chunks_and_unchosen_stages() {
        let mut b = ChunkBuilder::new(Flavor::Completion, "cmpl-1".into(), 7, "m".into(), &[1]);
        assert!(
            b.on_output(&output(0, "x", "x", 1, true)).is_empty(),
            "stage 0 is not a choice"
        );
        let c = parse(&b.on_output(&output(1, " sky", " sky", 1, false)));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0]["object"], "text_completion");
        assert_eq!(c[0]["choices"][0]["index"], 0);
        assert_eq!(c[0]["choices"][0]["text"], " sky");
        // An output with no new text and not finished adds nothing.
        assert!(b.on_output(&output(1, "", " sky", 1, false)).is_empty());
        assert_eq!(b.usage().completion_tokens, 1);
    }
}
