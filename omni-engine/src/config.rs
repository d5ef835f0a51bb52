//! The runtime model configuration and the architecture registry.
//!
//! Both loaders (GGUF metadata, Hugging Face `config.json`) produce a
//! [`ModelConfig`]; model code reads only this. Decisions that vary by model
//! live here as data (e.g. [`ModelConfig::qk_norm`] for Qwen3), so that one
//! decoder implementation serves the Llama family, Qwen2 and Qwen3.

/// The decoder families the engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Architecture {
    /// Llama, Mistral, SmolLM2: pre-norm decoder, RoPE, SwiGLU, GQA.
    Llama,
    /// Qwen2: Llama plus biases on the q/k/v projections.
    Qwen2,
    /// Qwen3: Llama plus RMSNorm on queries and keys per head.
    Qwen3,
}

impl Architecture {
    /// Looks up an HF `architectures` entry (`LlamaForCausalLM`, ...) or a
    /// GGUF `general.architecture` value (`llama`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" | "MistralForCausalLM" | "llama" | "mistral" => {
                Some(Architecture::Llama)
            }
            "Qwen2ForCausalLM" | "qwen2" => Some(Architecture::Qwen2),
            "Qwen3ForCausalLM" | "qwen3" => Some(Architecture::Qwen3),
            _ => None,
        }
    }

    /// The names [`Architecture::from_name`] accepts, for error messages.
    pub const SUPPORTED: &'static str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, \
         Qwen3ForCausalLM (GGUF: llama, mistral, qwen2, qwen3)";
}

/// How rotary position frequencies are rescaled for long contexts, as the
/// `rope_scaling` field of `config.json` states it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// Overall scale.
        factor: f64,
        /// Wavelengths above `original_max / low_freq_factor` are scaled fully.
        low_freq_factor: f64,
        /// Wavelengths below `original_max / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was trained with.
        original_max_position_embeddings: usize,
    },
}

/// Everything model code needs to build a decoder, whatever file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The decoder family.
    pub architecture: Architecture,
    /// Rows of the embedding and of the LM head.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's gate/up projections.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head (usually `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE rescaling, when the config states one.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// The LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
    /// Queries and keys are RMS-normalised per head before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Beginning-of-sequence token, when the model has one.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Width of the token embeddings when it differs from `hidden_size`
    /// (Qwen2.5-Omni's talker: its inputs are projected to the hidden size
    /// by `input_proj`); `None` = `hidden_size`.
    pub embedding_size: Option<usize>,
    /// Multimodal RoPE (Qwen2-VL, Qwen2.5-Omni): how many of a head's
    /// rotary frequencies follow the temporal, height and width position;
    /// sums to `head_dim / 2`. Text alone has three equal positions, so it
    /// only matters for prompts with images or video.
    pub mrope_section: Option<Vec<usize>>,
}

/// `config.json` of a Hugging Face checkpoint, as far as the engine reads it.
/// Fields are `Option`s so that a missing one is reported by name.
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    /// The classic layout: `{"rope_type" | "type": ..., "factor": ...}`.
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5's layout: `rope_theta` plus the scaling fields.
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

/// `generation_config.json`: only the stop tokens matter to the engine.
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct HfGenerationConfig {
    eos_token_id: Option<serde_json::Value>,
}

fn config_err(path: &std::path::Path, field: &str, reason: impl Into<String>) -> crate::Error {
    crate::Error::ModelConfig {
        path: path.to_owned(),
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// A token id field that may be an integer, a list of integers or null.
fn token_ids(
    path: &std::path::Path,
    field: &str,
    v: Option<&serde_json::Value>,
) -> crate::Result<Vec<u32>> {
    let one = |x: &serde_json::Value| -> crate::Result<u32> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| config_err(path, field, format!("expected a token id, found {x}")))
    };
    match v {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => items.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

impl ModelConfig {
    /// Reads a Hugging Face folder's `config.json` (and, when present,
    /// `generation_config.json` for extra stop tokens). Errors name the file
    /// and the field.
    pub fn from_hf_dir(dir: &std::path::Path) -> crate::Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| crate::Error::io(&path, e))?;
        let hf = parse_hf(&path, &text)?;
        let mut cfg = Self::from_hf_config(&path, &hf)?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let text =
                std::fs::read_to_string(&gen_path).map_err(|e| crate::Error::io(&gen_path, e))?;
            let gen: HfGenerationConfig =
                serde_json::from_str(&text).map_err(|e| crate::Error::Format {
                    path: gen_path.clone(),
                    format: "generation_config.json",
                    reason: e.to_string(),
                })?;
            // generate() stops on generation_config's list when it has one.
            for id in token_ids(&gen_path, "eos_token_id", gen.eos_token_id.as_ref())? {
                if !cfg.eos_token_ids.contains(&id) {
                    cfg.eos_token_ids.push(id);
                }
            }
        }
        Ok(cfg)
    }

    /// The config of one part of a Qwen2.5-Omni folder: `thinker` (its
    /// `thinker_config.text_config`) or `talker` (`talker_config`), both
    /// Qwen2 decoders. The talker's end-of-speech ids (codec end and pad,
    /// as transformers' `generate` stops on both) are its EOS.
    pub fn from_qwen_omni_dir(dir: &std::path::Path, part: &str) -> crate::Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| crate::Error::io(&path, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| crate::Error::Format {
                path: path.clone(),
                format: "config.json",
                reason: e.to_string(),
            })?;
        let (field, section) = match part {
            "thinker" => (
                "thinker_config.text_config",
                &value["thinker_config"]["text_config"],
            ),
            "talker" => ("talker_config", &value["talker_config"]),
            other => {
                return Err(config_err(
                    &path,
                    "model_stage",
                    format!("{other:?} is not a decoder of Qwen2.5-Omni (thinker, talker)"),
                ))
            }
        };
        let mut section = section.clone();
        let Some(map) = section.as_object_mut() else {
            return Err(config_err(&path, field, "missing"));
        };
        // Both parts are Qwen2 decoders (q/k/v biases, RMSNorm, SwiGLU); for
        // text their M-RoPE positions are plain 1-D positions.
        map.insert(
            "architectures".into(),
            serde_json::json!(["Qwen2ForCausalLM"]),
        );
        if part == "talker" {
            let ids: Vec<serde_json::Value> = ["tts_codec_end_token_id", "tts_codec_pad_token_id"]
                .iter()
                .filter_map(|k| map.get(*k).cloned())
                .collect();
            map.insert("eos_token_id".into(), serde_json::Value::Array(ids));
        }
        let embedding_size = map
            .get("embedding_size")
            .and_then(serde_json::Value::as_u64);
        let hf: HfConfig = serde_path_to_error::deserialize(section).map_err(|e| {
            config_err(
                &path,
                &format!("{field}.{}", e.path()),
                e.inner().to_string(),
            )
        })?;
        let mut cfg = Self::from_hf_config(&path, &hf)?;
        cfg.embedding_size = embedding_size
            .map(|e| e as usize)
            .filter(|&e| e != cfg.hidden_size);
        Ok(cfg)
    }

    /// Parses the text of a `config.json`; `path` names it in errors.
    pub fn from_config_json(path: &std::path::Path, text: &str) -> crate::Result<Self> {
        let hf = parse_hf(path, text)?;
        Self::from_hf_config(path, &hf)
    }

    fn from_hf_config(path: &std::path::Path, hf: &HfConfig) -> crate::Result<Self> {
        let req = |v: Option<usize>, field: &str| -> crate::Result<usize> {
            match v {
                Some(0) => Err(config_err(path, field, "must be positive, found 0")),
                Some(n) => Ok(n),
                None => Err(config_err(path, field, "missing")),
            }
        };
        let arch_name = match (&hf.architectures, &hf.model_type) {
            (Some(list), _) if !list.is_empty() => list[0].clone(),
            (_, Some(model_type)) => model_type.clone(),
            _ => {
                return Err(config_err(
                    path,
                    "architectures",
                    "missing (and no model_type)",
                ))
            }
        };
        let architecture = Architecture::from_name(&arch_name).ok_or_else(|| {
            crate::Error::UnknownArchitecture {
                name: arch_name.clone(),
                source_name: format!("{} (architectures)", path.display()),
                supported: Architecture::SUPPORTED.to_owned(),
            }
        })?;
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                return Err(config_err(
                    path,
                    "hidden_act",
                    format!("unsupported activation {act:?} (supported: \"silu\")"),
                ));
            }
        }
        let hidden_size = req(hf.hidden_size, "hidden_size")?;
        let num_attention_heads = req(hf.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = hf.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(config_err(
                path,
                "num_key_value_heads",
                format!(
                    "{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
                ),
            ));
        }
        let head_dim = match hf.head_dim {
            Some(d) => req(Some(d), "head_dim")?,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(config_err(
                        path,
                        "hidden_size",
                        format!("{hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        let (rope_theta, rope_scaling) = rope(path, hf)?;
        let mrope_section = mrope_section(path, hf, head_dim)?;
        let bos = token_ids(path, "bos_token_id", hf.bos_token_id.as_ref())?;
        Ok(ModelConfig {
            architecture,
            vocab_size: req(hf.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: req(hf.intermediate_size, "intermediate_size")?,
            num_hidden_layers: req(hf.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            // LlamaConfig, Qwen2Config and Qwen3Config all default to untied.
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            // Qwen2 always has q/k/v biases; the others only when the config says.
            attention_bias: architecture == Architecture::Qwen2
                || hf.attention_bias.unwrap_or(false),
            qk_norm: architecture == Architecture::Qwen3,
            bos_token_id: bos.first().copied(),
            eos_token_ids: token_ids(path, "eos_token_id", hf.eos_token_id.as_ref())?,
            embedding_size: None,
            mrope_section,
        })
    }
}

/// `config.json`'s text as [`HfConfig`]; a value of the wrong type is an
/// error naming its field (`hidden_size`, `rope_scaling.factor`).
fn parse_hf(path: &std::path::Path, text: &str) -> crate::Result<HfConfig> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            crate::Error::Format {
                path: path.to_owned(),
                format: "config.json",
                reason: inner.to_string(),
            }
        } else {
            config_err(path, &field, inner.to_string())
        }
    })
}

/// `mrope_section` of the RoPE parameters, checked against the head width.
fn mrope_section(
    path: &std::path::Path,
    hf: &HfConfig,
    head_dim: usize,
) -> crate::Result<Option<Vec<usize>>> {
    let (params, field) = match (&hf.rope_parameters, &hf.rope_scaling) {
        (Some(p), _) if !p.is_null() => (p, "rope_parameters"),
        (_, Some(s)) if !s.is_null() => (s, "rope_scaling"),
        _ => return Ok(None),
    };
    let Some(v) = params.get("mrope_section") else {
        return Ok(None);
    };
    let field = format!("{field}.mrope_section");
    let sections: Vec<usize> = serde_json::from_value(v.clone())
        .map_err(|_| config_err(path, &field, format!("expected a list of sizes, found {v}")))?;
    if sections.len() != 3 || sections.iter().sum::<usize>() != head_dim / 2 {
        return Err(config_err(
            path,
            &field,
            format!(
                "{sections:?}: expected three sizes (temporal, height, width) summing to \
                 head_dim / 2 = {}",
                head_dim / 2
            ),
        ));
    }
    Ok(Some(sections))
}

/// RoPE base and scaling from either layout: classic (`rope_theta`,
/// `rope_scaling`) or transformers 5 (`rope_parameters`).
fn rope(path: &std::path::Path, hf: &HfConfig) -> crate::Result<(f64, Option<RopeScaling>)> {
    let (params, field) = match (&hf.rope_parameters, &hf.rope_scaling) {
        (Some(p), _) if !p.is_null() => (Some(p), "rope_parameters"),
        (_, Some(s)) if !s.is_null() => (Some(s), "rope_scaling"),
        _ => (None, "rope_scaling"),
    };
    let num = |key: &str| -> crate::Result<Option<f64>> {
        match params.and_then(|p| p.get(key)) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                config_err(
                    path,
                    &format!("{field}.{key}"),
                    format!("expected a number, found {v}"),
                )
            }),
        }
    };
    let need = |key: &str| -> crate::Result<f64> {
        num(key)?.ok_or_else(|| config_err(path, &format!("{field}.{key}"), "missing"))
    };
    let theta = match num("rope_theta")? {
        Some(t) => t,
        None => hf.rope_theta.unwrap_or(10_000.0),
    };
    let Some(params) = params else {
        return Ok((theta, None));
    };
    if !params.is_object() {
        return Err(config_err(
            path,
            field,
            format!("expected an object, found {params}"),
        ));
    }
    let rope_type = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let scaling = match rope_type {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: need("factor")?,
        }),
        "llama3" => {
            let original = need("original_max_position_embeddings")?;
            if original < 1.0 || original.fract() != 0.0 {
                return Err(config_err(
                    path,
                    &format!("{field}.original_max_position_embeddings"),
                    format!("expected a positive integer, found {original}"),
                ));
            }
            Some(RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: original as usize,
            })
        }
        other => {
            return Err(config_err(
                path,
                &format!("{field}.rope_type"),
                format!("unsupported rope type {other:?} (supported: default, linear, llama3)"),
            ))
        }
    };
    Ok((theta, scaling))
}

/// The floating-point work of the decoder, as the engine schedules it: what
/// `omni bench pipeline` divides by wall time. A multiply-add counts two.
impl ModelConfig {
    /// One token through every decoder layer's matrix products (q/k/v, o,
    /// the SwiGLU MLP's three), without attention and the LM head.
    pub fn layer_flops_per_token(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = (self.num_attention_heads * self.head_dim) as u64;
        let kv = (self.num_key_value_heads * self.head_dim) as u64;
        let mlp = 3 * h * self.intermediate_size as u64;
        let per_layer = h * (q + 2 * kv) + q * h + mlp;
        2 * per_layer * self.num_hidden_layers as u64
    }

    /// One row through the LM head.
    pub fn head_flops_per_row(&self) -> u64 {
        2 * self.hidden_size as u64 * self.vocab_size as u64
    }

    /// One token's attention (scores and weighted sum, every layer) over
    /// `context` positions, its own included.
    pub fn attention_flops(&self, context: u64) -> u64 {
        let q = (self.num_attention_heads * self.head_dim) as u64;
        4 * q * context * self.num_hidden_layers as u64
    }

    /// What the engine computes for a request of `prompt` tokens, `cached`
    /// of them found in the prefix cache, that generated `generated` tokens:
    /// the uncached prompt and every generated token but the last go through
    /// the layers, each attending to everything before it; the head runs on
    /// sampled rows only (one per generated token). A preempted request's
    /// recomputation is not counted: it is work, not progress.
    pub fn request_flops(&self, prompt: usize, cached: usize, generated: usize) -> u64 {
        let first = cached.min(prompt) as u64;
        // Positions first..end go through the layers.
        let end = (prompt + generated.saturating_sub(1)) as u64;
        let tokens = end.saturating_sub(first);
        // Position p attends to p + 1 positions: sum of first+1 ..= end.
        let contexts = (first + 1 + end) * tokens / 2;
        tokens * self.layer_flops_per_token()
            + self.attention_flops(contexts)
            + generated as u64 * self.head_flops_per_row()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M's shapes.
    fn smollm2() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            attention_bias: false,
            qk_norm: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            embedding_size: None,
            mrope_section: None,
        }
    }

    #[test]
    fn smollm2_work_per_token_is_twice_its_parameters() {
        let c = smollm2();
        // 30 layers x (576 x (576 + 2 x 192) + 576 x 576 + 3 x 576 x 1536)
        // = 106,168,320 weights of the layers; the tied head 28,311,552.
        assert_eq!(c.layer_flops_per_token(), 2 * 106_168_320);
        assert_eq!(c.head_flops_per_row(), 2 * 28_311_552);
        assert_eq!(c.attention_flops(10), 4 * 576 * 10 * 30);
    }

    #[test]
    fn a_request_counts_its_uncached_prompt_and_its_generated_tokens() {
        let c = smollm2();
        let (l, a, h) = (
            c.layer_flops_per_token(),
            c.attention_flops(1),
            c.head_flops_per_row(),
        );
        // 4 prompt tokens, none cached, 3 generated: positions 0..=5 go
        // through the layers (the last generated token does not), attending
        // to 1+2+...+6 = 21 positions; three sampled rows.
        assert_eq!(c.request_flops(4, 0, 3), 6 * l + 21 * a + 3 * h);
        // Two of the prompt cached: positions 2..=5, contexts 3+4+5+6.
        assert_eq!(c.request_flops(4, 2, 3), 4 * l + 18 * a + 3 * h);
        // One generated token: the prompt only.
        assert_eq!(c.request_flops(4, 0, 1), 4 * l + 10 * a + h);
        assert_eq!(c.request_flops(4, 4, 0), 0);
    }
}
