//! Incremental detokenization for streaming.
//!
//! Decoding each new token on its own would break multi-byte characters
//! (byte-level BPE splits an emoji over several tokens) and lose the spaces
//! some decoders add between tokens. Instead, as vLLM's
//! `detokenize_incrementally` does, we decode a short window of recent ids
//! twice, with and without the newest token, and emit the difference, but
//! only once the window no longer ends in an incomplete character
//! (U+FFFD). Each step costs a window decode, not a full one.
use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// How many prompt tokens seed the window, so that the first generated
/// token is decoded in context (vLLM's `INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET`).
const PROMPT_CONTEXT: usize = 5;

/// Streaming text of one generation.
#[derive(Debug, Clone)]
pub struct Detokenizer {
    /// The seed from the prompt, then every generated id.
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix_offset: usize,
    /// End of what has been emitted (window text before it is already out).
    read_offset: usize,
    skip_special_tokens: bool,
}

impl Detokenizer {
    /// A detokenizer for a generation that continues `prompt_ids`.
    pub fn new(_tokenizer: &Tokenizer, prompt_ids: &[u32], skip_special_tokens: bool) -> Self {
        let seed = &prompt_ids[prompt_ids.len().saturating_sub(PROMPT_CONTEXT)..];
        Self {
            ids: seed.to_vec(),
            prefix_offset: 0,
            read_offset: seed.len(),
            skip_special_tokens,
        }
    }

    /// Adds one generated token; returns the text it completes (possibly
    /// empty while a character is still incomplete). Never returns part of
    /// a character.
    pub fn step(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<String> {
        // A model's embedding may have rows the tokenizer has no token for
        // (Qwen2's and Qwen2.5-Omni's have); such an id has no text, as in
        // transformers' decode.
        if token as usize >= tokenizer.vocab_size() {
            return Ok(String::new());
        }
        self.ids.push(token);
        let prefix = tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if text.len() <= prefix.len() || text.ends_with('\u{fffd}') {
            return Ok(String::new());
        }
        let delta = delta_after(&prefix, &text);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(delta)
    }

    /// Whatever is still held back at the end of generation (an incomplete
    /// character comes out as U+FFFD, as a full decode shows it).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(delta_after(&prefix, &text))
    }
}

/// `text` minus its common prefix with `prefix`, cut at a character boundary.
fn delta_after(prefix: &str, text: &str) -> String {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest.to_owned();
    }
    // The window's head decoded differently with more context: emit from
    // the first character that differs.
    let common = prefix
        .char_indices()
        .zip(text.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(prefix.len().min(text.len()));
    text.get(common..).unwrap_or_default().to_owned()
}
