//! How one request wants its tokens chosen: vLLM's `SamplingParams`.
//!
//! Field names, meanings and defaults follow vLLM
//! (`vllm/sampling_params.py`), so a JSON body written for vLLM deserializes
//! here unchanged. [`SamplingParams::validate`] rejects values vLLM rejects,
//! naming the field and the value. This module knows nothing of models or
//! tensors; the sampler (`sampler.rs`) applies the parameters.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Temperatures below this are greedy, as in vLLM (`_SAMPLING_EPS`).
pub(crate) const SAMPLING_EPS: f32 = 1e-5;

/// The most top log-probabilities a request may ask for per token.
pub const MAX_LOGPROBS: usize = 20;

/// The most stop strings a request may give, and the longest: each is
/// searched for after every token.
pub const MAX_STOP_STRINGS: usize = 64;
/// See [`MAX_STOP_STRINGS`]; in bytes.
pub const MAX_STOP_STRING_BYTES: usize = 1024;

/// Sampling parameters of one request (vLLM's names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Completions per prompt; only 1 is supported.
    pub n: usize,
    /// Penalises tokens that already appeared in the output (additive, -2..=2).
    pub presence_penalty: f32,
    /// Penalises tokens by how often they appeared in the output (-2..=2).
    pub frequency_penalty: f32,
    /// Divides positive logits (multiplies negative ones) of tokens seen in the
    /// prompt or output; 1 = off (> 0).
    pub repetition_penalty: f32,
    /// Softmax temperature; 0 = greedy (>= 0).
    pub temperature: f32,
    /// Nucleus sampling: smallest set of tokens whose probability reaches this
    /// (0 < top_p <= 1).
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 or -1 = off.
    pub top_k: i32,
    /// Drop tokens less likely than `min_p` times the most likely one (0..=1).
    pub min_p: f32,
    /// Seed of this request's own random generator: the same seed gives the
    /// same tokens whatever else is in the batch.
    pub seed: Option<u64>,
    /// Tokens to generate at most; `None` = until the context is full. A
    /// request whose prompt leaves less room stops at the context's end
    /// (`Length`), as in vLLM's engine, unless `max_tokens_must_fit`.
    pub max_tokens: Option<usize>,
    /// Refuse the request (`Error::ContextLengthExceeded`, vLLM's text)
    /// when the prompt and `max_tokens` do not fit the context, instead of
    /// cutting it there: what vLLM's OpenAI server does with a `max_tokens`
    /// the client gave. Not in vLLM's `SamplingParams`; Omni's server sets it.
    pub max_tokens_must_fit: bool,
    /// Tokens to generate at least: until then the model's end-of-sequence
    /// tokens and `stop_token_ids` are never sampled (vLLM's `min_tokens`,
    /// HF's `min_new_tokens`).
    pub min_tokens: usize,
    /// Stop when the output text contains one of these (excluded from the text).
    pub stop: Vec<String>,
    /// Stop when one of these tokens is generated (kept in `token_ids`;
    /// its text is left out of `text` unless `include_stop_str_in_output`).
    pub stop_token_ids: Vec<u32>,
    /// Keep the stop string that ended the output in `text` (and the text
    /// of a stopping token: an end-of-sequence or a `stop_token_ids` one),
    /// as vLLM's `include_stop_str_in_output`.
    pub include_stop_str_in_output: bool,
    /// Added to these tokens' logits before sampling (OpenAI's and vLLM's
    /// `logit_bias`: -100 bans a token, 100 forces it). Log-probabilities
    /// stay those of the raw logits. In JSON, an object keyed by token ids.
    #[serde(with = "token_id_keys")]
    pub logit_bias: BTreeMap<u32, f32>,
    /// Keep going past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Return this many top log-probabilities per generated token (plus the
    /// chosen token's); `None` = none.
    pub logprobs: Option<usize>,
    /// Return the log-probability of every prompt token but the first
    /// (under the model, given the tokens before it) and this many top
    /// alternatives per position, computed in the prefill. A request asking
    /// for them computes its whole prompt: it takes nothing from the prefix
    /// cache (as in vLLM).
    pub prompt_logprobs: Option<usize>,
    /// Leave special tokens out of the text.
    pub skip_special_tokens: bool,
    /// Return the final-norm hidden state of the position that produced each
    /// generated token (`[num_generated, hidden]`), when the request finishes.
    /// Not in vLLM; downstream stages of omni pipelines need it.
    pub output_hidden_states: bool,
    /// Return, on finish, per position the model read (the prompt, then
    /// each generated token fed back) its input embedding plus its
    /// final-norm hidden state, `[prompt + generated - 1, hidden]`: the
    /// thinker's output that Qwen2.5-Omni's talker reads. Not in vLLM.
    pub output_states: bool,
    /// Speech stages (Piper VITS): spread of the sampled latent; `None` =
    /// the voice's default (0.667 for Piper voices). 0 with `noise_w` 0 is
    /// deterministic. Not in vLLM; Piper's name.
    pub noise_scale: Option<f32>,
    /// Speech stages: duration multiplier, > 1 speaks slower; `None` = the
    /// voice's default (1).
    pub length_scale: Option<f32>,
    /// Speech stages: spread of the duration predictor's noise; `None` =
    /// the voice's default (0.8).
    pub noise_w: Option<f32>,
    /// Speech stages with several voices (Qwen2.5-Omni's code2wav): the
    /// voice, by name; `None` = the model's default. Not in vLLM.
    pub speaker: Option<String>,
}

impl Default for SamplingParams {
    /// vLLM's defaults: temperature 1, no truncation, no penalties, 16 tokens.
    fn default() -> Self {
        Self {
            n: 1,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            max_tokens: Some(16),
            max_tokens_must_fit: false,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            include_stop_str_in_output: false,
            logit_bias: BTreeMap::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            skip_special_tokens: true,
            output_hidden_states: false,
            output_states: false,
            noise_scale: None,
            length_scale: None,
            noise_w: None,
            speaker: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), otherwise the defaults.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Whether tokens are chosen by argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature < SAMPLING_EPS
    }

    /// Checks every field against the range vLLM accepts; the error names the
    /// field and the value.
    pub fn validate(&self) -> Result<()> {
        fn bad(field: &'static str, value: impl ToString, reason: &str) -> Result<()> {
            Err(Error::InvalidSamplingParams {
                field,
                value: value.to_string(),
                reason: reason.to_owned(),
            })
        }
        if self.n != 1 {
            return bad(
                "n",
                self.n,
                "an engine request is one sequence: submit n requests, sample i with seed + i, as `omni serve` does",
            );
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(
                "presence_penalty",
                self.presence_penalty,
                "must be in [-2, 2]",
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(
                "frequency_penalty",
                self.frequency_penalty,
                "must be in [-2, 2]",
            );
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                self.repetition_penalty,
                "must be a finite number > 0",
            );
        }
        for (field, value) in [("noise_scale", self.noise_scale), ("noise_w", self.noise_w)] {
            if let Some(v) = value.filter(|v| !(*v >= 0.0 && v.is_finite() && *v <= 10.0)) {
                return bad(field, v, "must be a finite number in [0, 10]");
            }
        }
        if let Some(v) = self
            .length_scale
            .filter(|v| !(*v > 0.0 && v.is_finite() && *v <= 10.0))
        {
            return bad("length_scale", v, "must be a finite number in (0, 10]");
        }
        if let Some(max) = self.max_tokens.filter(|&m| self.min_tokens > m) {
            return bad(
                "min_tokens",
                self.min_tokens,
                &format!("must be at most max_tokens = {max}"),
            );
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                self.temperature,
                "must be a finite number >= 0",
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "must be in (0, 1]");
        }
        if self.top_k < -1 {
            return bad("top_k", self.top_k, "must be -1 or 0 (off) or at least 1");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "must be in [0, 1]");
        }
        if self.max_tokens == Some(0) {
            return bad("max_tokens", 0, "must be at least 1");
        }
        for (field, k) in [
            ("logprobs", self.logprobs),
            ("prompt_logprobs", self.prompt_logprobs),
        ] {
            if let Some(k) = k.filter(|&k| k > MAX_LOGPROBS) {
                return bad(field, k, &format!("must be at most {MAX_LOGPROBS}"));
            }
        }
        if let Some((t, b)) = self.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
            return bad(
                "logit_bias",
                format!("{{{t}: {b}}}"),
                "biases must be finite",
            );
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return bad(
                "stop",
                format!("{} strings", self.stop.len()),
                &format!("at most {MAX_STOP_STRINGS} stop strings"),
            );
        }
        if let Some(i) = self
            .stop
            .iter()
            .position(|s| s.len() > MAX_STOP_STRING_BYTES)
        {
            return bad(
                "stop",
                format!("[{i}] of {} bytes", self.stop[i].len()),
                &format!("stop strings must be at most {MAX_STOP_STRING_BYTES} bytes"),
            );
        }
        if let Some(i) = self.stop.iter().position(String::is_empty) {
            return bad(
                "stop",
                format!("[{i}] = \"\""),
                "stop strings must not be empty",
            );
        }
        Ok(())
    }

    /// Whether `top_k` truncates at all.
    pub(crate) fn top_k_enabled(&self) -> Option<usize> {
        (self.top_k >= 1).then_some(self.top_k as usize)
    }
}

/// A map keyed by token ids as JSON writes it: keys are strings. (Through
/// `serde_json::Value`, which the wire decodes from, integer keys would not
/// parse back.)
mod token_id_keys {
    use std::collections::BTreeMap;

    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &BTreeMap<u32, f32>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().map(|(k, v)| (k.to_string(), v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u32, f32>, D::Error> {
        BTreeMap::<String, f32>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| {
                k.trim()
                    .parse()
                    .map(|id| (id, v))
                    .map_err(|_| D::Error::custom(format!("{k:?} is not a token id")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_vllm_s_and_valid() -> Result<()> {
        let p = SamplingParams::default();
        p.validate()?;
        assert_eq!(p.temperature, 1.0);
        assert_eq!(p.max_tokens, Some(16));
        assert!(SamplingParams::greedy().is_greedy());
        let from_json: SamplingParams =
            serde_json::from_str(r#"{"temperature": 0.5, "top_k": 40, "stop": ["\n"]}"#)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
        assert_eq!(from_json.top_k, 40);
        assert_eq!(from_json.top_p, 1.0);
        // Token-id keys survive a trip through `Value` (the wire's path).
        let mut p = SamplingParams::default();
        p.logit_bias.insert(30, -2.5);
        let v = serde_json::to_value(&p).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let back: SamplingParams =
            serde_json::from_value(v).map_err(|e| Error::Tokenizer(e.to_string()))?;
        assert_eq!(back, p);
        Ok(())
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let cases: Vec<(SamplingParams, &str, &str)> = vec![
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
                "0",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
                "1.5",
            ),
            (
                SamplingParams {
                    temperature: -0.1,
                    ..Default::default()
                },
                "temperature",
                "-0.1",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
                "NaN",
            ),
            (
                SamplingParams {
                    max_tokens: Some(0),
                    ..Default::default()
                },
                "max_tokens",
                "0",
            ),
            (
                SamplingParams {
                    top_k: -2,
                    ..Default::default()
                },
                "top_k",
                "-2",
            ),
            (
                SamplingParams {
                    min_p: 1.5,
                    ..Default::default()
                },
                "min_p",
                "1.5",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
                "0",
            ),
            (
                SamplingParams {
                    presence_penalty: 3.0,
                    ..Default::default()
                },
                "presence_penalty",
                "3",
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..Default::default()
                },
                "frequency_penalty",
                "-3",
            ),
            (
                SamplingParams {
                    n: 2,
                    ..Default::default()
                },
                "n",
                "2",
            ),
            (
                SamplingParams {
                    logprobs: Some(100),
                    ..Default::default()
                },
                "logprobs",
                "100",
            ),
            (
                SamplingParams {
                    stop: vec!["x".into(); 65],
                    ..Default::default()
                },
                "stop",
                "65 strings",
            ),
            (
                SamplingParams {
                    stop: vec!["y".repeat(1025)],
                    ..Default::default()
                },
                "stop",
                "[0] of 1025 bytes",
            ),
        ];
        for (p, field, value) in cases {
            match p.validate() {
                Err(Error::InvalidSamplingParams {
                    field: f, value: v, ..
                }) => {
                    assert_eq!((f, v.as_str()), (field, value));
                }
                other => panic!("{field}: expected an error, got {other:?}"),
            }
        }
    }
}
