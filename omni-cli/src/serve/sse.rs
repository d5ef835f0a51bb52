//! OpenAI's response formats for one request, built from the pipeline's
//! outputs: the `data:` payloads of a stream, and the choices of a whole
//! answer.
//!
//! A request runs one sequence per prompt and sample (`n`); each chosen
//! final stage of each sequence is one choice, at index
//! `(prompt · n + sample) · stages + stage position`. With one final stage
//! (`smollm2`) that is exactly vLLM's index. A chat stream opens each choice
//! with a chunk whose delta carries `role: "assistant"`, then content
//! deltas, then a chunk with an empty delta, the `finish_reason` and the
//! `stop_reason`. With `stream_options.include_usage` a last chunk has no
//! choices and the `usage`; the stream ends with `data: [DONE]`.
//!
//! Log-probabilities come in OpenAI's shapes: completions' `tokens`,
//! `token_logprobs`, `top_logprobs` (token text → log-probability, the
//! chosen token's included) and `text_offset` (characters, as vLLM counts
//! them); chat's `content[]` with `token`, `logprob`, `bytes` and
//! `top_logprobs`. An echo puts the prompt (and its log-probabilities, the
//! first token's `null`) before the completion of the stage that read it.
use std::collections::BTreeMap;

use omni_core::{
    FinishReason, OmniRequestOutput, Prompt, PromptLogprobs, StopReason, TokenLogprobs,
};
use serde::Serialize;

use super::openai::{
    AudioOut, ChatChoice, ChatChunkChoice, ChatDelta, ChatLogprobs, ChatMessageOut,
    ChatTokenLogprob, ChatTopLogprob, Chunk, CompletionChoice, CompletionChunkChoice,
    CompletionLogprobs, PromptLogprobsOut, Usage, VllmLogprob,
};
use super::validate::{OutputOptions, Plan, ENTRY_STAGE};
use crate::audio;

/// The payload that ends every stream.
pub const DONE: &str = "[DONE]";

/// Which endpoint's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `chat.completion(.chunk)`.
    Chat,
    /// `text_completion`.
    Completion,
}

/// `finish_reason` as OpenAI spells it.
pub fn finish_reason(r: Option<&FinishReason>) -> Option<String> {
    r.and_then(|r| serde_json::to_value(r).ok())
        .and_then(|v| v.as_str().map(str::to_string))
}

fn stop_reason(r: Option<&StopReason>) -> Option<serde_json::Value> {
    r.and_then(|r| serde_json::to_value(r).ok())
}

/// What one choice has shown so far.
#[derive(Debug, Default)]
struct Choice {
    stage_id: usize,
    modality: String,
    /// Whether anything of it was seen (choices of stages that never
    /// answered are left out of a whole answer).
    seen: bool,
    role_sent: bool,
    echoed: bool,
    logprobs_sent: usize,
    /// `text_offset` of the next token.
    offset: usize,
    text: String,
    completion_lp: CompletionLogprobs,
    chat_lp: Vec<ChatTokenLogprob>,
    finish_reason: Option<String>,
    stop_reason: Option<serde_json::Value>,
    audio: Option<AudioOut>,
    completion_tokens: usize,
    prompt_logprobs: Option<PromptLogprobsOut>,
}

/// One token to show with its log-probability: the token's own text, and
/// its log-probabilities unless nothing predicts it (a prompt's first).
struct Shown<'a> {
    token_id: u32,
    text: &'a str,
    lp: Option<&'a TokenLogprobs>,
}

/// What one output adds to a choice.
#[derive(Default)]
struct Delta {
    text: String,
    completion_lp: CompletionLogprobs,
    chat_lp: Vec<ChatTokenLogprob>,
    audio: Option<AudioOut>,
    finish_reason: Option<String>,
    stop_reason: Option<serde_json::Value>,
}

/// Builds the chunks and choices of one request.
#[derive(Debug)]
pub struct ChunkBuilder {
    flavor: Flavor,
    id: String,
    created: u64,
    model: String,
    /// Final stage → its position among the chosen ones.
    stage_pos: BTreeMap<usize, usize>,
    n: usize,
    opts: OutputOptions,
    /// A stream makes payloads and keeps nothing; a whole answer keeps
    /// each choice and makes no payload (nobody would read them).
    stream: bool,
    /// Per prompt, the text an echo shows (`None`: the stage's reading of
    /// the token ids).
    echo_text: Vec<Option<String>>,
    choices: Vec<Choice>,
    /// Per sequence: prompt tokens of the earliest stage that reported
    /// (stage, prompt tokens, of those cached).
    prompt_tokens: Vec<Option<(usize, usize, usize)>>,
}

impl ChunkBuilder {
    /// The chunks of `plan`'s answer: its chosen final stages, its
    /// prompts, each run `n` times, and its output options.
    pub fn new(flavor: Flavor, id: String, created: u64, model: String, plan: &Plan) -> Self {
        let (stages, prompts, n, opts) = (&plan.choices, &plan.prompts, plan.n, plan.output);
        let sequences = prompts.len() * n;
        let choices = (0..sequences * stages.len())
            .map(|i| Choice {
                stage_id: stages[i % stages.len()],
                ..Choice::default()
            })
            .collect();
        Self {
            flavor,
            id,
            created,
            model,
            stage_pos: stages.iter().enumerate().map(|(i, &s)| (s, i)).collect(),
            n,
            opts,
            stream: plan.stream,
            echo_text: prompts
                .iter()
                .map(|p| match p {
                    Prompt::Text(t) => Some(t.clone()),
                    _ => None,
                })
                .collect(),
            choices,
            prompt_tokens: vec![None; sequences],
        }
    }

    /// The model name the chunks carry.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Usage so far: prompt tokens once per prompt (not per sample),
    /// completion tokens of every choice.
    pub fn usage(&self) -> Usage {
        let (mut prompt, mut cached) = (0, 0);
        for (seq, p) in self.prompt_tokens.iter().enumerate() {
            if let (0, Some((_, n, c))) = (seq % self.n, p) {
                prompt += n;
                cached += c;
            }
        }
        let completion = self.choices.iter().map(|c| c.completion_tokens).sum();
        Usage::new(prompt, cached, completion)
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

    /// Takes output `out` of sequence `seq`; returns the stream payloads it
    /// adds (none for stages not chosen, nor for a whole answer, whose
    /// choices it keeps instead).
    pub fn on_output(&mut self, seq: usize, out: &OmniRequestOutput) -> Vec<String> {
        // Prompt tokens arrive with a stage's last output; the earliest
        // stage's count is the sequence's prompt.
        if let Some(p) = self.prompt_tokens.get_mut(seq) {
            if out.num_prompt_tokens > 0 && p.is_none_or(|(stage, _, _)| out.stage_id <= stage) {
                let cached = out
                    .metrics
                    .stage(out.stage_id)
                    .map_or(0, |m| m.num_cached_tokens);
                *p = Some((out.stage_id, out.num_prompt_tokens, cached));
            }
        }
        let Some(&pos) = self.stage_pos.get(&out.stage_id) else {
            return Vec::new();
        };
        let index = seq * self.stage_pos.len() + pos;
        let delta = self.delta(index, seq, out);
        let Some(c) = self.choices.get_mut(index) else {
            return Vec::new();
        };
        c.seen = true;
        c.completion_tokens = out.token_ids.len();
        if self.stream {
            let role_sent = std::mem::replace(&mut c.role_sent, true);
            let stage_id = c.stage_id;
            return self.payloads(index, stage_id, role_sent, delta);
        }
        c.modality.clone_from(&out.final_output_type);
        c.text.push_str(&delta.text);
        extend_completion_lp(&mut c.completion_lp, delta.completion_lp);
        c.chat_lp.extend(delta.chat_lp);
        if delta.audio.is_some() {
            c.audio = delta.audio;
        }
        if let Some(p) = out
            .prompt_logprobs
            .as_ref()
            .filter(|_| self.opts.prompt_logprobs)
        {
            c.prompt_logprobs = Some(vllm_prompt_logprobs(p, self.opts));
        }
        if delta.finish_reason.is_some() {
            c.finish_reason = delta.finish_reason;
            c.stop_reason = delta.stop_reason;
        }
        Vec::new()
    }

    /// What `out` adds to choice `index`, and the choice's bookkeeping.
    fn delta(&mut self, index: usize, seq: usize, out: &OmniRequestOutput) -> Delta {
        let opts = self.opts;
        let echo_text = self.echo_text.get(seq / self.n).cloned().flatten();
        let Some(c) = self.choices.get_mut(index) else {
            return Delta::default();
        };
        let mut d = Delta::default();
        let mut shown: Vec<Shown<'_>> = Vec::new();
        if opts.echo && out.stage_id == ENTRY_STAGE && !c.echoed {
            let prompt = out.prompt_logprobs.as_ref();
            if let Some(text) = echo_text.or_else(|| prompt.map(|p| p.text.clone())) {
                c.echoed = true;
                d.text.push_str(&text);
                if let Some(p) = prompt.filter(|_| opts.logprobs.is_some()) {
                    shown.push(Shown {
                        token_id: p.first_token_id,
                        text: &p.first_token,
                        lp: None,
                    });
                    shown.extend(p.tokens.iter().map(|lp| Shown {
                        token_id: lp.token_id,
                        text: lp.text(),
                        lp: Some(lp),
                    }));
                }
            }
        }
        if !opts.echo_only {
            d.text.push_str(&out.delta_text);
            if let Some(lps) = &out.logprobs {
                let fresh = lps.get(c.logprobs_sent..).unwrap_or_default();
                c.logprobs_sent = lps.len();
                shown.extend(fresh.iter().map(|lp| Shown {
                    token_id: lp.token_id,
                    text: lp.text(),
                    lp: Some(lp),
                }));
            }
        }
        if let Some(k) = opts.logprobs {
            match self.flavor {
                Flavor::Completion => {
                    d.completion_lp = completion_logprobs(&shown, k, opts, &mut c.offset);
                }
                Flavor::Chat => d.chat_lp = chat_logprobs(&shown, k, opts),
            }
        }
        if out.finished {
            d.finish_reason =
                finish_reason(out.finish_reason.as_ref()).or(Some("stop".to_string()));
            d.stop_reason = stop_reason(out.stop_reason.as_ref());
            if let Some(a) = out.audio.as_ref().filter(|_| !self.stream) {
                d.audio = Some(AudioOut {
                    id: format!("audio-{}-{}-{}", self.id, index, out.stage_id),
                    data: audio::to_base64_wav(a),
                    expires_at: self.created + 3600,
                    transcript: out.text.clone(),
                    sample_rate: None,
                });
            }
        }
        // A stream sends each piece as it is spoken.
        if let Some(a) = out
            .delta_audio
            .as_ref()
            .filter(|a| self.stream && !a.samples.is_empty())
        {
            d.audio = Some(AudioOut {
                id: format!("audio-{}-{}-{}", self.id, index, out.stage_id),
                data: audio::to_base64_pcm16(&a.samples),
                expires_at: self.created + 3600,
                transcript: String::new(),
                sample_rate: Some(a.sample_rate),
            });
        }
        d
    }

    fn payloads(&self, index: usize, stage_id: usize, role_sent: bool, d: Delta) -> Vec<String> {
        let logprobs = self.opts.logprobs.is_some();
        let mut payloads = Vec::new();
        match self.flavor {
            Flavor::Completion => {
                let has_lp = !d.completion_lp.tokens.is_empty();
                if !d.text.is_empty() || has_lp || d.finish_reason.is_some() {
                    payloads.push(self.chunk(
                        vec![CompletionChunkChoice {
                            index,
                            text: d.text,
                            logprobs: logprobs.then_some(d.completion_lp),
                            finish_reason: d.finish_reason,
                            stop_reason: d.stop_reason,
                            stage_id,
                        }],
                        None,
                    ));
                }
            }
            Flavor::Chat => {
                if !role_sent {
                    payloads.push(self.chat_chunk(
                        index,
                        stage_id,
                        ChatDelta {
                            role: Some("assistant"),
                            content: Some(String::new()),
                            audio: None,
                        },
                        None,
                        None,
                        None,
                    ));
                }
                if !d.text.is_empty() || d.audio.is_some() || !d.chat_lp.is_empty() {
                    let content = (!d.text.is_empty()).then_some(d.text);
                    payloads.push(self.chat_chunk(
                        index,
                        stage_id,
                        ChatDelta {
                            role: None,
                            content,
                            audio: d.audio,
                        },
                        logprobs.then_some(ChatLogprobs { content: d.chat_lp }),
                        None,
                        None,
                    ));
                }
                if d.finish_reason.is_some() {
                    payloads.push(self.chat_chunk(
                        index,
                        stage_id,
                        ChatDelta::default(),
                        None,
                        d.finish_reason,
                        d.stop_reason,
                    ));
                }
            }
        }
        payloads
    }

    fn chat_chunk(
        &self,
        index: usize,
        stage_id: usize,
        delta: ChatDelta,
        logprobs: Option<ChatLogprobs>,
        finish_reason: Option<String>,
        stop_reason: Option<serde_json::Value>,
    ) -> String {
        self.chunk(
            vec![ChatChunkChoice {
                index,
                delta,
                logprobs,
                finish_reason,
                stop_reason,
                stage_id,
            }],
            None,
        )
    }

    /// The last chunk with `usage` and no choices.
    pub fn usage_chunk(&self) -> String {
        self.chunk(Vec::<CompletionChunkChoice>::new(), Some(self.usage()))
    }

    /// A whole completion answer's choices: every choice that was seen, by
    /// index.
    pub fn completion_choices(&self) -> Vec<CompletionChoice> {
        let logprobs = self.opts.logprobs.is_some();
        self.seen()
            .map(|(index, c)| CompletionChoice {
                index,
                text: c.text.clone(),
                logprobs: logprobs.then(|| c.completion_lp.clone()),
                finish_reason: c.finish_reason.clone(),
                stop_reason: c.stop_reason.clone(),
                prompt_logprobs: c.prompt_logprobs.clone(),
                stage_id: c.stage_id,
                modality: c.modality.clone(),
            })
            .collect()
    }

    /// A whole chat answer's choices: every choice that was seen, by index.
    pub fn chat_choices(&self) -> Vec<ChatChoice> {
        let logprobs = self.opts.logprobs.is_some();
        self.seen()
            .map(|(index, c)| ChatChoice {
                index,
                message: ChatMessageOut {
                    role: "assistant",
                    content: c.audio.is_none().then(|| c.text.clone()),
                    audio: c.audio.clone(),
                },
                logprobs: logprobs.then(|| ChatLogprobs {
                    content: c.chat_lp.clone(),
                }),
                finish_reason: c.finish_reason.clone(),
                stop_reason: c.stop_reason.clone(),
                prompt_logprobs: c.prompt_logprobs.clone(),
                stage_id: c.stage_id,
                modality: c.modality.clone(),
            })
            .collect()
    }

    fn seen(&self) -> impl Iterator<Item = (usize, &Choice)> {
        self.choices.iter().enumerate().filter(|(_, c)| c.seen)
    }
}

fn token_string(s: &Shown<'_>, opts: OutputOptions) -> String {
    if opts.tokens_as_ids {
        format!("token_id:{}", s.token_id)
    } else {
        s.text.to_owned()
    }
}

fn top_string(lp: &TokenLogprobs, i: usize, opts: OutputOptions) -> String {
    if opts.tokens_as_ids {
        format!("token_id:{}", lp.top[i].0)
    } else {
        lp.top_text(i).to_owned()
    }
}

/// Completions' shape for `shown`; `offset` is the running `text_offset`.
fn completion_logprobs(
    shown: &[Shown<'_>],
    k: usize,
    opts: OutputOptions,
    offset: &mut usize,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for s in shown {
        let token = token_string(s, opts);
        out.text_offset.push(*offset);
        *offset += token.chars().count();
        out.token_logprobs.push(s.lp.map(|lp| lp.logprob));
        out.top_logprobs.push(s.lp.map(|lp| {
            // The chosen token, then the k most likely (vLLM's dict).
            let mut top = BTreeMap::new();
            top.insert(token.clone(), lp.logprob);
            for i in 0..lp.top.len().min(k) {
                top.entry(top_string(lp, i, opts)).or_insert(lp.top[i].1);
            }
            top
        }));
        out.tokens.push(token);
    }
    out
}

/// Chat's shape for the generated tokens in `shown`.
fn chat_logprobs(shown: &[Shown<'_>], k: usize, opts: OutputOptions) -> Vec<ChatTokenLogprob> {
    shown
        .iter()
        .filter_map(|s| {
            let lp = s.lp?;
            let token = token_string(s, opts);
            Some(ChatTokenLogprob {
                bytes: Some(token.as_bytes().to_vec()),
                logprob: lp.logprob,
                top_logprobs: (0..lp.top.len().min(k))
                    .map(|i| {
                        let t = top_string(lp, i, opts);
                        ChatTopLogprob {
                            bytes: Some(t.as_bytes().to_vec()),
                            logprob: lp.top[i].1,
                            token: t,
                        }
                    })
                    .collect(),
                token,
            })
        })
        .collect()
}

/// vLLM's `prompt_logprobs`: the first token `null`, then per token its own
/// log-probability and its top alternatives, by token id.
fn vllm_prompt_logprobs(p: &PromptLogprobs, opts: OutputOptions) -> PromptLogprobsOut {
    let text = |t: u32, s: &str| {
        if opts.tokens_as_ids {
            format!("token_id:{t}")
        } else {
            s.to_owned()
        }
    };
    std::iter::once(None)
        .chain(p.tokens.iter().map(|lp| {
            let mut m = BTreeMap::new();
            for (i, &(t, l)) in lp.top.iter().enumerate() {
                let entry = VllmLogprob {
                    logprob: l,
                    rank: Some(i + 1),
                    decoded_token: text(t, lp.top_text(i)),
                };
                m.insert(t.to_string(), entry);
            }
            m.entry(lp.token_id.to_string())
                .or_insert_with(|| VllmLogprob {
                    logprob: lp.logprob,
                    rank: None,
                    decoded_token: text(lp.token_id, lp.text()),
                });
            Some(m)
        }))
        .collect()
}

fn extend_completion_lp(into: &mut CompletionLogprobs, more: CompletionLogprobs) {
    into.text_offset.extend(more.text_offset);
    into.token_logprobs.extend(more.token_logprobs);
    into.tokens.extend(more.tokens);
    into.top_logprobs.extend(more.top_logprobs);
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

    /// A streaming request's builder.
    fn builder(flavor: Flavor, stages: &[usize], n: usize, output: OutputOptions) -> ChunkBuilder {
        builder_for(true, flavor, stages, n, output)
    }

    /// A whole answer's builder: it keeps the choices.
    fn whole(flavor: Flavor, stages: &[usize], n: usize, output: OutputOptions) -> ChunkBuilder {
        builder_for(false, flavor, stages, n, output)
    }

    fn builder_for(
        stream: bool,
        flavor: Flavor,
        stages: &[usize],
        n: usize,
        output: OutputOptions,
    ) -> ChunkBuilder {
        let plan = Plan {
            prompts: vec![Prompt::Text("Hi there".into())],
            params: Vec::new(),
            n,
            stream,
            include_usage: false,
            choices: stages.to_vec(),
            output,
        };
        ChunkBuilder::new(flavor, "id-1".into(), 7, "m".into(), &plan)
    }

    /// Log-probabilities, shared as an output carries them.
    fn lps(entries: Vec<TokenLogprobs>) -> Option<std::sync::Arc<Vec<TokenLogprobs>>> {
        Some(std::sync::Arc::new(entries))
    }

    fn lp(token_id: u32, logprob: f32, text: &str, top: &[(u32, f32, &str)]) -> TokenLogprobs {
        TokenLogprobs {
            token_id,
            logprob,
            top: top.iter().map(|&(t, l, _)| (t, l)).collect(),
            decoded: std::iter::once(text)
                .chain(top.iter().map(|&(_, _, s)| s))
                .map(str::to_owned)
                .collect(),
        }
    }

    #[test]
    fn completion_logprobs_echo_and_sample_indices() {
        let opts = OutputOptions {
            logprobs: Some(1),
            echo: true,
            ..OutputOptions::default()
        };
        let mut b = builder(Flavor::Completion, &[0], 2, opts);
        let mut o = output(0, " A", " A", 1, false);
        o.logprobs = lps(vec![lp(9, -0.5, " A", &[(9, -0.5, " A")])]);
        o.prompt_logprobs = Some(omni_core::PromptLogprobs {
            first_token_id: 3,
            first_token: "Hi".into(),
            tokens: vec![lp(4, -2.0, " there", &[(5, -1.0, "!")])],
            text: "Hi there".into(),
        });
        // Sample 1 of the prompt is choice 1.
        let c = parse(&b.on_output(1, &o));
        let choice = &c[0]["choices"][0];
        assert_eq!(choice["index"], 1);
        assert_eq!(choice["text"], "Hi there A");
        let l = &choice["logprobs"];
        assert_eq!(l["tokens"], serde_json::json!(["Hi", " there", " A"]));
        assert_eq!(l["token_logprobs"], serde_json::json!([null, -2.0, -0.5]));
        assert_eq!(l["text_offset"], serde_json::json!([0, 2, 8]));
        assert_eq!(l["top_logprobs"][0], serde_json::Value::Null);
        // The chosen token and the top 1, as a dict.
        assert_eq!(
            l["top_logprobs"][1],
            serde_json::json!({" there": -2.0, "!": -1.0})
        );
        // The next output adds its token only; the echo is not repeated.
        let mut o2 = output(0, " B", " A B", 2, true);
        o2.logprobs = lps(vec![
            lp(9, -0.5, " A", &[(9, -0.5, " A")]),
            lp(8, -0.25, " B", &[(8, -0.25, " B")]),
        ]);
        o2.stop_reason = Some(StopReason::Text("C".into()));
        let c = parse(&b.on_output(1, &o2));
        assert_eq!(c[0]["choices"][0]["text"], " B");
        assert_eq!(
            c[0]["choices"][0]["logprobs"]["text_offset"],
            serde_json::json!([10])
        );
        assert_eq!(c[0]["choices"][0]["stop_reason"], "C");
        // The same outputs, answered whole.
        let mut w = whole(Flavor::Completion, &[0], 2, opts);
        assert!(w.on_output(1, &o).is_empty() && w.on_output(1, &o2).is_empty());
        let all = w.completion_choices();
        assert_eq!(all.len(), 1, "only the sample that answered");
        assert_eq!(all[0].text, "Hi there A B");
        assert_eq!(all[0].logprobs.as_ref().map(|l| l.tokens.len()), Some(4));
        // Prompt tokens count once per prompt, not per sample.
        assert_eq!(b.usage().prompt_tokens, 0);
        b.on_output(0, &o2);
        assert_eq!(b.usage().prompt_tokens, 5);
        assert_eq!(b.usage().completion_tokens, 4);
    }

    #[test]
    fn chat_logprobs_carry_bytes_and_top_alternatives() {
        let opts = OutputOptions {
            logprobs: Some(1),
            tokens_as_ids: false,
            ..OutputOptions::default()
        };
        let mut b = builder(Flavor::Chat, &[0], 1, opts);
        let mut o = output(0, "é", "é", 1, true);
        o.logprobs = lps(vec![lp(7, -0.1, "é", &[(7, -0.1, "é"), (2, -3.0, "x")])]);
        let c = parse(&b.on_output(0, &o));
        let content = &c[1]["choices"][0]["logprobs"]["content"][0];
        assert_eq!(content["token"], "é");
        assert_eq!(content["bytes"], serde_json::json!([195, 169]));
        assert_eq!(content["top_logprobs"].as_array().map(Vec::len), Some(1));
        let mut w = whole(Flavor::Chat, &[0], 1, opts);
        w.on_output(0, &o);
        let choices = w.chat_choices();
        assert_eq!(
            choices[0].logprobs.as_ref().map(|l| l.content.len()),
            Some(1)
        );
    }

    fn parse(payloads: &[String]) -> Vec<serde_json::Value> {
        payloads
            .iter()
            .map(|p| serde_json::from_str(p).expect("chunk is JSON"))
            .collect()
    }

    #[test]
    fn chat_chunks_open_with_role_carry_deltas_and_close_with_finish_reason() {
        let mut b = builder(Flavor::Chat, &[0, 1], 1, OutputOptions::default());
        let first = parse(&b.on_output(0, &output(0, "Hel", "Hel", 1, false)));
        assert_eq!(first.len(), 2);
        assert_eq!(first[0]["object"], "chat.completion.chunk");
        assert_eq!(first[0]["id"], "id-1");
        assert_eq!(first[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first[1]["choices"][0]["delta"]["content"], "Hel");
        assert!(first[1]["choices"][0]["delta"].get("role").is_none());
        assert!(first[1]["choices"][0]["finish_reason"].is_null());

        let last = parse(&b.on_output(0, &output(0, "lo", "Hello", 2, true)));
        assert_eq!(last[0]["choices"][0]["delta"]["content"], "lo");
        assert_eq!(last[1]["choices"][0]["finish_reason"], "length");
        assert_eq!(last[1]["choices"][0]["delta"], serde_json::json!({}));

        // Stage 1 is choice 1 and opens with its own role chunk.
        let s1 = parse(&b.on_output(0, &output(1, "Hi", "Hi", 1, true)));
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
        let mut b = builder(Flavor::Completion, &[1], 1, OutputOptions::default());
        assert!(
            b.on_output(0, &output(0, "x", "x", 1, true)).is_empty(),
            "stage 0 is not a choice"
        );
        let c = parse(&b.on_output(0, &output(1, " sky", " sky", 1, false)));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0]["object"], "text_completion");
        assert_eq!(c[0]["choices"][0]["index"], 0);
        assert_eq!(c[0]["choices"][0]["text"], " sky");
        // An output with no new text and not finished adds nothing.
        assert!(b.on_output(0, &output(1, "", " sky", 1, false)).is_empty());
        assert_eq!(b.usage().completion_tokens, 1);
    }
}
