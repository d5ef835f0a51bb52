//! Input processors: named Rust functions that turn the outputs of a
//! stage's sources into that stage's prompt. A pipeline names one in
//! `custom_process_input_func`, as vLLM-Omni names a Python function
//! (`...stage_input_processors.qwen2_5_omni.thinker2talker`); here the name
//! is looked up in a fixed registry, and a dotted name is looked up by its
//! last segment.
//!
//! A stage without a processor and with one source gets that source's
//! generated token ids as its prompt (vLLM-Omni's default).

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
    /// The sources' outputs, in `engine_input_source` order.
    pub sources: &'a [SourceOutput],
}

/// An input processor.
pub type InputProcessor = fn(&ProcessorInput<'_>) -> Result<Prompt>;

const REGISTRY: &[(&str, InputProcessor)] = &[
    ("summarize", summarize),
    ("text2text", text2text),
    ("token_ids", token_ids),
];

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
fn summarize(input: &ProcessorInput<'_>) -> Result<Prompt> {
    let src = single("summarize", input)?;
    let text = src.output.text.trim();
    if text.is_empty() {
        return Err(Error::InputProcessor {
            name: "summarize".into(),
            request_id: input.request_id.to_string(),
            reason: format!(
                "stage {} produced no text to summarize",
                src.output.stage_id
            ),
        });
    }
    Ok(Prompt::Chat(vec![ChatMessage {
        role: "user".to_string(),
        content: format!("Summarize the following text in one sentence.\n\nText: {text}"),
    }]))
}

/// The source's text as a plain prompt.
fn text2text(input: &ProcessorInput<'_>) -> Result<Prompt> {
    let src = single("text2text", input)?;
    Ok(Prompt::Text(src.output.text.clone()))
}

/// The source's generated token ids as the prompt.
fn token_ids(input: &ProcessorInput<'_>) -> Result<Prompt> {
    let src = single("token_ids", input)?;
    if src.output.token_ids.is_empty() {
        return Err(Error::InputProcessor {
            name: "token_ids".into(),
            request_id: input.request_id.to_string(),
            reason: format!("stage {} generated no tokens", src.output.stage_id),
        });
    }
    Ok(Prompt::TokenIds(src.output.token_ids.clone()))
}
