//! The model's tokenizer: text <-> token ids, special tokens and the chat
//! template.
//!
//! Two sources, one type: a Hugging Face folder (`tokenizer.json` +
//! `tokenizer_config.json`), or a GGUF file's `tokenizer.ggml.*` metadata,
//! from which we build the same byte-level BPE `tokenizer.json` that
//! transformers' GGUF converter builds (`integrations/gguf/
//! gguf_tokenizer_mapping.py`), so token ids match transformers exactly.
//! Encoding and decoding run in the `tokenizers` crate.
//!
//! [`Tokenizer`] is cheap to clone (shared), so detokenizers and requests
//! can hold one.
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value as Json};

use crate::chat_template::ChatTemplate;
use crate::detokenizer::Detokenizer;
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, GgufValue};

/// llama.cpp's `tokenizer.ggml.token_type` for control tokens.
const TOKEN_TYPE_CONTROL: i64 = 3;
/// ... and for user-defined (added, not special) tokens.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Split regexes for GGUF `tokenizer.ggml.pre` values whose vocabularies
/// were not learned with GPT-2's regex (transformers'
/// `GGUF_PRE_TOKENIZER_SPLITS`). Any other value uses GPT-2's.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_regex(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "dbrx" | "smaug-bpe" => Some(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

struct Inner {
    tok: tokenizers::Tokenizer,
    source: PathBuf,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    /// Template variables: `bos_token`, `eos_token`, `unk_token`, `pad_token`.
    special_tokens: BTreeMap<String, String>,
    special_ids: HashSet<u32>,
    chat_template: Option<ChatTemplate>,
    vocab_size: usize,
}

/// A model's tokenizer (shared; clones are cheap).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.inner.source)
            .field("vocab_size", &self.inner.vocab_size)
            .field("bos_token_id", &self.inner.bos_token_id)
            .field("eos_token_ids", &self.inner.eos_token_ids)
            .finish()
    }
}

fn tok_err(source: &Path, what: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{}: {what}", source.display()))
}

/// A token written in `tokenizer_config.json`: `"<s>"` or `{"content": "<s>", ...}`.
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads a Hugging Face folder's `tokenizer.json`, with special tokens
    /// and the chat template from `tokenizer_config.json` when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::ModelFile {
                path,
                reason: "missing (the folder has no tokenizer.json)".into(),
            });
        }
        let tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| tok_err(&path, e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| Error::Format {
                path: cfg_path.clone(),
                format: "tokenizer_config.json",
                reason: e.to_string(),
            })?
        } else {
            Json::Null
        };
        let mut special_tokens = BTreeMap::new();
        for name in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(t) = token_text(cfg.get(name)) {
                special_tokens.insert(name.to_owned(), t);
            }
        }
        let id_of = |name: &str| -> Result<Option<u32>> {
            match special_tokens.get(name) {
                None => Ok(None),
                Some(t) => tok.token_to_id(t).map(Some).ok_or_else(|| {
                    tok_err(&cfg_path, format!("{name} {t:?} is not in the vocabulary"))
                }),
            }
        };
        let bos_token_id = id_of("bos_token")?;
        let eos_token_ids = id_of("eos_token")?.into_iter().collect();
        let template_src = match cfg.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            // A list of named templates: the one called "default".
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(str::to_owned),
            _ => None,
        };
        // transformers 5 may keep the template in its own file.
        let template_src = match template_src {
            Some(s) => Some(s),
            None => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.is_file() {
                    Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
                } else {
                    None
                }
            }
        };
        Self::build(
            tok,
            path,
            bos_token_id,
            eos_token_ids,
            special_tokens,
            template_src,
        )
    }

    /// Builds the byte-level BPE a GGUF file describes in its
    /// `tokenizer.ggml.*` metadata, as transformers does.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let path = gguf.path().to_owned();
        let field = |key: &str, reason: String| Error::ModelConfig {
            path: path.clone(),
            field: key.to_owned(),
            reason,
        };
        let model = gguf
            .get("tokenizer.ggml.model")
            .and_then(GgufValue::as_str)
            .ok_or_else(|| field("tokenizer.ggml.model", "missing".into()))?;
        if model != "gpt2" {
            return Err(field(
                "tokenizer.ggml.model",
                format!("unsupported tokenizer {model:?} (supported: \"gpt2\", byte-level BPE)"),
            ));
        }
        let strings = |key: &str| -> Result<Vec<&str>> {
            let arr = gguf
                .get(key)
                .and_then(GgufValue::as_array)
                .ok_or_else(|| field(key, "missing or not an array".into()))?;
            arr.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str().ok_or_else(|| {
                        field(
                            key,
                            format!("element {i} is a {}, not a string", v.type_name()),
                        )
                    })
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match gguf
            .get("tokenizer.ggml.token_type")
            .and_then(GgufValue::as_array)
        {
            Some(arr) => arr.iter().map(|v| v.as_i64().unwrap_or(0)).collect(),
            None => Vec::new(),
        };
        let id = |key: &str| -> Result<Option<u32>> {
            match gguf.get(key) {
                None => Ok(None),
                Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                    Some(n) if (n as usize) < tokens.len() => Ok(Some(n)),
                    _ => Err(field(
                        key,
                        format!("{v:?} is not a token id below {}", tokens.len()),
                    )),
                },
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let mut eos_token_ids = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(i) = id(key)? {
                if !eos_token_ids.contains(&i) {
                    eos_token_ids.push(i);
                }
            }
        }
        let add_bos = gguf
            .get("tokenizer.ggml.add_bos_token")
            .and_then(GgufValue::as_bool)
            .unwrap_or(false);

        // Tokens are stored as text; a byte-level vocabulary spells them in
        // GPT-2's byte alphabet already, anything else is re-spelled.
        let (byte_to_char, alphabet) = byte_alphabet();
        let spell = |t: &str| -> String {
            if t.chars().all(|c| alphabet.contains(&c)) {
                t.to_owned()
            } else {
                t.bytes().map(|b| byte_to_char[b as usize]).collect()
            }
        };
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(spell(t), json!(i));
        }
        let merges: Vec<Json> = merges
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').unwrap_or((m, ""));
                json!([a, b])
            })
            .collect();
        let mut added = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let ty = types.get(i).copied().unwrap_or(1);
            let in_alphabet = t.chars().all(|c| alphabet.contains(&c));
            // A control token spelled outside the byte alphabet is a
            // llama.cpp mislabel; transformers skips it, so do we.
            let special = ty == TOKEN_TYPE_CONTROL && in_alphabet;
            if special || ty == TOKEN_TYPE_USER_DEFINED {
                added.push(json!({
                    "id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special,
                }));
            }
        }
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let pre = gguf
            .get("tokenizer.ggml.pre")
            .and_then(GgufValue::as_str)
            .unwrap_or("default");
        let pre_tokenizer = match split_regex(pre) {
            Some(re) => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]}),
            None => byte_level(true),
        };
        let post_processor = match (add_bos, bos) {
            (true, Some(b)) => {
                let bt = tokens[b as usize];
                let mut specials = serde_json::Map::new();
                specials.insert(bt.to_owned(), json!({"id": bt, "ids": [b], "tokens": [bt]}));
                json!({"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bt, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bt, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": bt, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": specials})
            }
            _ => Json::Null,
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        let tok: tokenizers::Tokenizer = serde_json::from_value(spec).map_err(|e| {
            tok_err(
                &path,
                format!("cannot build a BPE tokenizer from tokenizer.ggml.*: {e}"),
            )
        })?;
        let mut special_tokens = BTreeMap::new();
        for (name, key) in [
            ("bos_token", "tokenizer.ggml.bos_token_id"),
            ("eos_token", "tokenizer.ggml.eos_token_id"),
            ("unk_token", "tokenizer.ggml.unknown_token_id"),
            ("pad_token", "tokenizer.ggml.padding_token_id"),
        ] {
            if let Some(i) = id(key)? {
                special_tokens.insert(name.to_owned(), tokens[i as usize].to_owned());
            }
        }
        let template = gguf
            .get("tokenizer.chat_template")
            .and_then(GgufValue::as_str)
            .map(str::to_owned);
        Self::build(tok, path, bos, eos_token_ids, special_tokens, template)
    }

    fn build(
        tok: tokenizers::Tokenizer,
        source: PathBuf,
        bos_token_id: Option<u32>,
        eos_token_ids: Vec<u32>,
        special_tokens: BTreeMap<String, String>,
        template: Option<String>,
    ) -> Result<Self> {
        let chat_template = match template {
            Some(src) => Some(ChatTemplate::new(&src).map_err(|e| tok_err(&source, e))?),
            None => None,
        };
        let special_ids = tok
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let vocab_size = tok.get_vocab_size(true);
        Ok(Self {
            inner: Arc::new(Inner {
                tok,
                source,
                bos_token_id,
                eos_token_ids,
                special_tokens,
                special_ids,
                chat_template,
                vocab_size,
            }),
        })
    }

    /// Token ids of `text`. With `add_special_tokens`, the tokenizer's own
    /// post-processing applies (e.g. a BOS when the model wants one), as
    /// transformers' `tokenizer(text)` does. Special tokens written in the
    /// text (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .tok
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot encode {:?}: {e}", preview(text))))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; with `skip_special_tokens` special tokens are left
    /// out. An id outside the vocabulary is an error naming it.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.inner.vocab_size) {
            return Err(Error::Tokenizer(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.inner.vocab_size
            )));
        }
        self.inner
            .tok
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot decode {ids:?}: {e}")))
    }

    /// Renders `messages` (any serializable list of `{role, content}`, e.g.
    /// `ChatMessage`s) with the model's chat template, as transformers'
    /// `apply_chat_template(tokenize=False)`. Tokenize the result with
    /// `encode(text, false)`: the template writes the special tokens itself.
    pub fn apply_chat_template<M: serde::Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.inner.chat_template.as_ref().ok_or_else(|| {
            Error::Tokenizer(format!(
                "{} has no chat template; send a text prompt instead",
                self.inner.source.display()
            ))
        })?;
        template.render(messages, add_generation_prompt, &self.inner.special_tokens)
    }

    /// The chat template's source, when the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.inner.chat_template.as_ref().map(ChatTemplate::source)
    }

    /// Tokens that end generation (the tokenizer's EOS, plus end-of-turn
    /// tokens a GGUF names).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids.clone()
    }

    /// The beginning-of-sequence token, when the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos_token_id
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    /// The id of a token's text (e.g. `"<|im_end|>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.tok.token_to_id(token)
    }

    /// The text of a token id, as the vocabulary spells it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.tok.id_to_token(id)
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.special_ids.contains(&id)
    }

    /// An incremental detokenizer for one generation (see [`Detokenizer`]).
    pub fn detokenizer(&self, prompt_ids: &[u32], skip_special_tokens: bool) -> Detokenizer {
        Detokenizer::new(self, prompt_ids, skip_special_tokens)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn hf_tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.inner.tok
    }
}

/// GPT-2's reversible byte -> printable character map (`bytes_to_unicode`)
/// and the set of characters it produces.
fn byte_alphabet() -> ([char; 256], HashSet<char>) {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        map[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\u{fffd}');
            n += 1;
            c
        };
    }
    let set = map.iter().copied().collect();
    (map, set)
}

fn preview(text: &str) -> String {
    let mut s: String = text.chars().take(40).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}
