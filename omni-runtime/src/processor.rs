//! Input processors: named Rust functions that turn the outputs of a
//! stage's sources into that stage's prompt. A pipeline names one in
//! `custom_process_input_func`, as vLLM-Omni names a Python function
//! (`...stage_input_processors.qwen2_5_omni.thinker2talker`); here the name
//! is looked up in a fixed registry, and a dotted name is looked up by its
//! last segment.
//!
//! A stage without a processor and with one source gets that source's
//! generated token ids as its prompt (vLLM-Omni's default).
//!
//! An upstream output a processor cannot use (an empty answer) is not the
//! caller's fault and not an error: the processor says what it means.
//! `None` means "nothing to do": the stage finishes the request at once with
//! an empty output (no text, no tokens) and passes that on, without running
//! its model. `summarize`, `text2text` and `token_ids` answer an empty
//! upstream output so (the summary of no answer is no summary);
//! `text2speech` gives the voice an empty text, which it speaks as no audio,
//! with its sample rate.

use omni_engine::{ChatMessage, Prompt};

use crate::error::{Error, Result};
use crate::tensor::HostTensor;
use crate::wire::UpstreamOutput;

/// One source's output for the stage being fed.
#[derive(Debug, Clone)]
pub struct SourceOutput {
    /// What the source stage generated.
    pub output: UpstreamOutput,
    /// Its tensors (e.g. `hidden_states`).
    pub tensors: Vec<(String, HostTensor)>,
}

/// Everything a processor sees for one request.
#[derive(Debug, Clone)]
pub struct ProcessorInput<'a> {
    /// The request.
    pub request_id: &'a str,
    /// The user's original prompt.
    pub prompt: &'a Prompt,
    /// The sources' outputs, in `engine_input_source` order: on a streamed
    /// edge, the source's output so far.
    pub sources: &'a [SourceOutput],
}

/// What a processor makes of the sources' outputs for its stage.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StageInput {
    /// A prompt, as the user's would be.
    Prompt(Prompt),
    /// The thinker's states for Qwen2.5-Omni's talker: `[prompt + generated
    /// - 1, hidden]`, the first `prompt_len` rows the prompt's.
    ThinkerStates {
        /// The states (the thinker's `output_states`).
        states: HostTensor,
        /// Rows of the thinker's prompt.
        prompt_len: usize,
        /// The prompt's 3-D RoPE positions, when it had an image.
        positions: Option<HostTensor>,
    },
}

/// An input processor: the stage's input, or `None` when there is nothing
/// to do (see the module's notes). An `Err` is a failure of the pipeline,
/// never the caller's fault.
pub type InputProcessor = fn(&ProcessorInput<'_>) -> Result<Option<StageInput>>;

/// The tensor a thinker stage sends its states as.
pub const THINKER_STATES: &str = "thinker_states";

/// The tensor a thinker stage sends its prompt's 3-D RoPE positions as
/// (`[3, prompt_len]` int64; only for prompts with images).
pub const THINKER_POSITIONS: &str = "thinker_positions";

const REGISTRY: &[(&str, InputProcessor)] = &[
    ("summarize", summarize),
    ("text2speech", text2speech),
    ("text2text", text2text),
    ("thinker2talker", thinker2talker),
    ("token_ids", token_ids),
];

/// Processors that can start their stage on a source's output so far
/// (a streamed edge, `runtime.edges`), with the `model_stage`s whose
/// engines take the rest as it comes: they answer `None` until the piece
/// they need has come.
const STREAMING: &[(&str, &[&str])] = &[
    ("thinker2talker", &["talker"]),
    ("token_ids", &["code2wav"]),
];

/// The `model_stage`s a processor can feed from a streamed edge; `None`
/// when it takes whole outputs only.
pub fn streams_into(name: &str) -> Option<&'static [&'static str]> {
    let short = name.rsplit('.').next().unwrap_or(name);
    STREAMING
        .iter()
        .find(|(n, _)| *n == short)
        .map(|(_, stages)| *stages)
}

/// The processors that take streamed input, with their stages (`name
/// (stage, ...)`), for messages.
pub fn streaming_names() -> Vec<String> {
    STREAMING
        .iter()
        .map(|(n, stages)| format!("{n} (into {})", stages.join(", ")))
        .collect()
}

/// Names of the registered input processors.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|(n, _)| *n).collect()
}

/// The processor called `name` (or whose name is the last dotted segment
/// of `name`).
pub fn lookup(name: &str) -> Option<InputProcessor> {
    let short = name.rsplit('.').next().unwrap_or(name);
    REGISTRY
        .iter()
        .find(|(n, _)| *n == name || *n == short)
        .map(|(_, f)| *f)
}

/// The processor for a stage: its named one, or the default for one source.
pub fn for_stage(name: Option<&str>) -> Result<(String, InputProcessor)> {
    match name {
        None => Ok(("token_ids".to_string(), token_ids)),
        Some(n) => {
            lookup(n)
                .map(|f| (n.to_string(), f))
                .ok_or_else(|| Error::UnknownInputProcessor {
                    name: n.to_string(),
                    known: names().join(", "),
                })
        }
    }
}

fn single<'a>(name: &str, input: &'a ProcessorInput<'_>) -> Result<&'a SourceOutput> {
    match input.sources {
        [one] => Ok(one),
        many => Err(Error::InputProcessor {
            name: name.to_string(),
            request_id: input.request_id.to_string(),
            reason: format!("expects exactly one source stage, got {}", many.len()),
        }),
    }
}

/// The default pipeline's stage 1: a chat prompt asking for a one-sentence
/// summary of the source's text.
fn summarize(input: &ProcessorInput<'_>) -> Result<Option<StageInput>> {
    let src = single("summarize", input)?;
    let text = src.output.text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    Ok(Some(StageInput::Prompt(Prompt::Chat(vec![
        ChatMessage::new(
            "user",
            format!("Summarize the following text in one sentence.\n\nText: {text}"),
        ),
    ]))))
}

/// The source's text as a plain prompt.
fn text2text(input: &ProcessorInput<'_>) -> Result<Option<StageInput>> {
    let src = single("text2text", input)?;
    Ok((!src.output.text.is_empty())
        .then(|| StageInput::Prompt(Prompt::Text(src.output.text.clone()))))
}

/// The source's text, made speakable, for a speech stage (the `speak`
/// pipeline's stage 1). An empty answer gives an empty text, which the
/// voice speaks as no audio at all (with its sample rate), not an error.
fn text2speech(input: &ProcessorInput<'_>) -> Result<Option<StageInput>> {
    let src = single("text2speech", input)?;
    Ok(Some(StageInput::Prompt(Prompt::Text(speakable(
        &src.output.text,
    )))))
}

/// Markdown and symbols a chat answer may hold, as a voice should read
/// them: emphasis, heading and list markers, inline code ticks and table
/// bars go; a link is read by its text and a bare URL as "a link"; a code
/// block is skipped (read as "code omitted"); a list item or heading
/// without closing punctuation gets a period, so it is its own sentence;
/// emoji and other pictographs are dropped.
pub fn speakable(text: &str) -> String {
    let mut lines = Vec::new();
    let mut in_code = false;
    for raw in text.lines() {
        let line = raw.trim();
        if line.starts_with("```") || line.starts_with("~~~") {
            if !in_code {
                lines.push("Code omitted.".to_owned());
            }
            in_code = !in_code;
            continue;
        }
        if in_code || line.is_empty() {
            continue;
        }
        // Table rules (|---|---|) carry nothing to say.
        if line
            .chars()
            .all(|c| matches!(c, '|' | '-' | ':' | ' ' | '='))
        {
            continue;
        }
        let (body, block) = strip_block_marker(line);
        let mut spoken = if body.starts_with('|') {
            // A table row: its cells, as a list.
            body.trim_matches('|')
                .split('|')
                .map(inline)
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            inline(body)
        };
        if spoken.trim().is_empty() {
            continue;
        }
        let ends = spoken.trim_end().chars().last();
        if block && !matches!(ends, Some('.' | '!' | '?' | ':' | ';' | ',')) {
            spoken = format!("{}.", spoken.trim_end());
        }
        lines.push(spoken.trim().to_owned());
    }
    lines.join(" ")
}

/// A line without its heading, list or quote marker; `true` when it had
/// one (it then stands as a sentence of its own).
fn strip_block_marker(line: &str) -> (&str, bool) {
    let trimmed = line.trim_start_matches('>').trim_start();
    if let Some(rest) = trimmed.strip_prefix('#') {
        return (rest.trim_start_matches('#').trim_start(), true);
    }
    for bullet in ["- ", "* ", "+ ", "• "] {
        if let Some(rest) = trimmed.strip_prefix(bullet) {
            return (rest, true);
        }
    }
    let digits = trimmed.chars().take_while(char::is_ascii_digit).count();
    if digits > 0 {
        let rest = &trimmed[digits..];
        if let Some(rest) = rest.strip_prefix(". ").or_else(|| rest.strip_prefix(") ")) {
            return (rest, true);
        }
    }
    (
        trimmed,
        trimmed.len() != line.len() || trimmed.starts_with('|'),
    )
}

/// Inline markdown and symbols of one line.
fn inline(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        // [text](url) -> text
        if c == '[' {
            if let Some(close) = chars[i..].iter().position(|&c| c == ']').map(|p| p + i) {
                if chars.get(close + 1) == Some(&'(') {
                    if let Some(end) = chars[close..].iter().position(|&c| c == ')') {
                        out.extend(&chars[i + 1..close]);
                        i = close + end + 1;
                        continue;
                    }
                }
            }
        }
        let rest: String = chars[i..chars.len().min(i + 8)].iter().collect();
        if rest.starts_with("http://") || rest.starts_with("https://") {
            out.push_str("a link");
            while i < chars.len() && !chars[i].is_whitespace() {
                i += 1;
            }
            continue;
        }
        match c {
            '*' | '`' | '~' | '#' => {}
            // Underscores around words are emphasis; inside one they join it.
            '_' => {
                let inside = i > 0
                    && chars[i - 1].is_alphanumeric()
                    && chars.get(i + 1).is_some_and(|n| n.is_alphanumeric());
                if inside {
                    out.push(' ');
                }
            }
            '|' => out.push_str(", "),
            '&' => out.push_str(" and "),
            c if is_pictograph(c) => {}
            c => out.push(c),
        }
        i += 1;
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Emoji and pictographs, which a voice cannot read.
fn is_pictograph(c: char) -> bool {
    matches!(c as u32,
        0x1F000..=0x1FAFF | 0x2600..=0x27BF | 0x2B00..=0x2BFF | 0xFE0F | 0x200D)
}

/// Qwen2.5-Omni's thinker to talker (vLLM-Omni's `thinker2talker`): the
/// thinker's states, which the talker's engine turns into its input as
/// transformers does. A thinker that generated fewer than two tokens gave
/// the talker nothing to say: no codes (and so no audio). Streamed, it
/// starts the talker once the thinker has written two tokens.
fn thinker2talker(input: &ProcessorInput<'_>) -> Result<Option<StageInput>> {
    let src = single("thinker2talker", input)?;
    let generated = src.output.token_ids.len();
    if generated < 2 {
        return Ok(None);
    }
    let fail = |reason: String| Error::InputProcessor {
        name: "thinker2talker".into(),
        request_id: input.request_id.to_string(),
        reason,
    };
    let (_, states) = src
        .tensors
        .iter()
        .find(|(name, _)| name == THINKER_STATES)
        .ok_or_else(|| {
            fail(format!(
                "stage {} sent no {THINKER_STATES} (its default_sampling_params need \
                 output_states: true)",
                src.output.stage_id
            ))
        })?;
    let rows = states.shape.first().copied().unwrap_or(0);
    let prompt_len = rows
        .checked_sub(generated - 1)
        .filter(|&p| p > 0 && states.shape.len() == 2)
        .ok_or_else(|| {
            fail(format!(
                "{THINKER_STATES} of shape {:?} for {generated} generated tokens",
                states.shape
            ))
        })?;
    let positions = src
        .tensors
        .iter()
        .find(|(name, _)| name == THINKER_POSITIONS)
        .map(|(_, t)| t.clone());
    if let Some(p) = &positions {
        if p.shape != [3, prompt_len] {
            return Err(fail(format!(
                "{THINKER_POSITIONS} of shape {:?} for a {prompt_len}-token prompt",
                p.shape
            )));
        }
    }
    Ok(Some(StageInput::ThinkerStates {
        states: states.clone(),
        prompt_len,
        positions,
    }))
}

/// The source's generated token ids as the prompt. Streamed (the talker's
/// codes to code2wav), it starts the stage on the first ids.
fn token_ids(input: &ProcessorInput<'_>) -> Result<Option<StageInput>> {
    let src = single("token_ids", input)?;
    Ok((!src.output.token_ids.is_empty())
        .then(|| StageInput::Prompt(Prompt::TokenIds(src.output.token_ids.clone()))))
}

#[cfg(test)]
mod tests {
    use super::speakable;

    #[test]
    fn markdown_is_read_sensibly() {
        let answer = "# Why the sky is blue\n\n**Rayleigh scattering** makes _short_ waves \
                      scatter more.\n\n- Blue light scatters\n- Red light passes 🌅\n1. See \
                      [this page](https://example.invalid/x) or https://example.invalid/y\n\n\
                      ```python\nprint('hi')\n```\n| a | b |\n|---|---|\n| 1 & 2 | 3 |";
        assert_eq!(
            speakable(answer),
            "Why the sky is blue. Rayleigh scattering makes short waves scatter more. \
             Blue light scatters. Red light passes. See this page or a link. Code omitted. \
             a, b. 1 and 2, 3."
        );
        assert_eq!(speakable(""), "");
        assert_eq!(
            speakable("snake_case stays a word"),
            "snake case stays a word"
        );
    }
}
