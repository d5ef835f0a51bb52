//! One entry point from a model reference to what the engine needs.
//!
//! [`ModelSource::open`] takes a path to a `.gguf` file or a Hugging Face
//! folder, or an alias of a default model (`smollm2`,
//! `HuggingFaceTB/SmolLM2-135M-Instruct`), reads the configuration and
//! keeps the file open; [`ModelSource::load_weights`] and
//! [`ModelSource::tokenizer`] then build the rest. [`load_model`] does all
//! three.
use std::path::{Path, PathBuf};

use tch::{Device, Kind};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::model_files::resolve_model_path;
use crate::safetensors::SafetensorsFiles;
use crate::tokenizer::Tokenizer;
use crate::weights::{Blocks, Weights};

enum Format {
    Gguf(GgufFile),
    Hf(SafetensorsFiles),
}

/// An opened model: its configuration read, its weights not yet loaded.
pub struct ModelSource {
    path: PathBuf,
    name: String,
    config: ModelConfig,
    format: Format,
    /// The part of a checkpoint that holds several models (Qwen2.5-Omni's
    /// `thinker`, `talker`); empty for a whole model.
    part: String,
}

impl std::fmt::Debug for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSource")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("format", &self.format_name())
            .finish()
    }
}

impl ModelSource {
    /// Opens a `.gguf` file, a Hugging Face folder, or a default model by
    /// alias (checked against its size and SHA-256 first).
    pub fn open(name_or_path: &str) -> Result<Self> {
        Self::open_part(name_or_path, None)
    }

    /// Opens `name_or_path`; `model_stage` picks the part of a checkpoint
    /// that holds several models (Qwen2.5-Omni: `thinker` or `talker`; a
    /// whole model ignores it).
    pub fn open_part(name_or_path: &str, model_stage: Option<&str>) -> Result<Self> {
        let path = resolve_model_path(name_or_path)?;
        if path.is_dir() {
            if !path.join("config.json").is_file() {
                return Err(Error::ModelFile {
                    path: path.clone(),
                    reason: "a folder without config.json is not a Hugging Face checkpoint".into(),
                });
            }
            let mut part = String::new();
            let config = if is_qwen_omni(&path) {
                part = match model_stage {
                    Some(p @ ("thinker" | "talker")) => p.to_owned(),
                    other => {
                        return Err(Error::InvalidConfig {
                            field: "engine_args.model_stage".to_owned(),
                            value: format!("{other:?}"),
                            reason: format!(
                                "{} is a Qwen2.5-Omni folder: its decoders are `thinker` and \
                                 `talker` (`code2wav` runs in the generation engine)",
                                path.display()
                            ),
                        })
                    }
                };
                ModelConfig::from_qwen_omni_dir(&path, &part)?
            } else {
                ModelConfig::from_hf_dir(&path)?
            };
            let files = SafetensorsFiles::find(&path)?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string());
            return Ok(Self {
                path,
                name,
                config,
                format: Format::Hf(files),
                part,
            });
        }
        let gguf = GgufFile::open(&path).map_err(|e| match e {
            // A file that is not GGUF at all deserves a clearer word.
            Error::Format { reason, .. }
                if reason.starts_with("bad magic") || reason.starts_with("truncated: magic") =>
            {
                Error::ModelFile {
                    path: path.clone(),
                    reason: format!("neither a GGUF file nor a Hugging Face folder ({reason})"),
                }
            }
            other => other,
        })?;
        let config = gguf.model_config()?;
        Ok(Self {
            name: gguf_model_name(&path),
            path,
            config,
            format: Format::Gguf(gguf),
            part: String::new(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The model's name, e.g. `SmolLM2-135M-Instruct` (a GGUF file name
    /// without its quantization suffix, or the folder name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The resolved file or folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `gguf` or `safetensors`.
    pub fn format_name(&self) -> &'static str {
        match self.format {
            Format::Gguf(_) => "gguf",
            Format::Hf(_) => "safetensors",
        }
    }

    /// The open GGUF file, for callers that want its raw quantized blocks.
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.format {
            Format::Gguf(g) => Some(g),
            Format::Hf(_) => None,
        }
    }

    /// Loads every weight under its Hugging Face name, converted to `kind`
    /// and placed on `device`.
    pub fn load_weights(&self, kind: Kind, device: Device) -> Result<Weights> {
        self.load_weights_with(kind, device, Blocks::Dequantize)
    }

    /// [`ModelSource::load_weights`], keeping a GGUF file's quantized blocks
    /// when `blocks` says so (safetensors folders have none).
    pub fn load_weights_with(&self, kind: Kind, device: Device, blocks: Blocks) -> Result<Weights> {
        let _span = tracing::info_span!(target: "omni::engine", "load_weights", model = %self.name)
            .entered();
        let weights = match &self.format {
            Format::Gguf(g) => g.load_weights_with(&self.config, kind, device, blocks)?,
            Format::Hf(files) if self.part.is_empty() => files.load(kind, device)?,
            Format::Hf(files) => {
                let mut w = files.load_prefix(&format!("{}.", self.part), kind, device)?;
                // The talker's own names for a decoder's pieces.
                for (from, to) in [
                    ("codec_head.weight", "lm_head.weight"),
                    ("thinker_to_talker_proj.weight", "model.input_proj.weight"),
                    ("thinker_to_talker_proj.bias", "model.input_proj.bias"),
                ] {
                    if w.contains(from) {
                        let t = w.take(from)?;
                        w.insert(to, t);
                    }
                }
                w
            }
        };
        tracing::info!(target: "omni::engine", tensors = weights.len(), ?kind, ?device, "weights loaded");
        Ok(weights)
    }

    /// The model's tokenizer (from `tokenizer.json` or GGUF metadata).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match &self.format {
            Format::Gguf(g) => Tokenizer::from_gguf(g),
            Format::Hf(_) => Tokenizer::from_hf_dir(&self.path),
        }
    }
}

/// Everything [`load_model`] produces.
#[derive(Debug)]
pub struct LoadedModel {
    /// See [`ModelSource::name`].
    pub name: String,
    /// The model's configuration.
    pub config: ModelConfig,
    /// Weights under Hugging Face names.
    pub weights: Weights,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The part of the checkpoint loaded (`thinker`, `talker`; empty for a
    /// whole model).
    pub part: String,
}

/// Opens `name_or_path` and loads weights and tokenizer.
pub fn load_model(name_or_path: &str, device: Device, kind: Kind) -> Result<LoadedModel> {
    load_model_part(name_or_path, None, device, kind)
}

/// [`load_model`] of one part of a checkpoint (see [`ModelSource::open_part`]).
pub fn load_model_part(
    name_or_path: &str,
    model_stage: Option<&str>,
    device: Device,
    kind: Kind,
) -> Result<LoadedModel> {
    load_model_part_with(name_or_path, model_stage, device, kind, Blocks::Dequantize)
}

/// [`load_model_part`], keeping quantized blocks as `blocks` says.
pub fn load_model_part_with(
    name_or_path: &str,
    model_stage: Option<&str>,
    device: Device,
    kind: Kind,
    blocks: Blocks,
) -> Result<LoadedModel> {
    let source = ModelSource::open_part(name_or_path, model_stage)?;
    let tokenizer = source.tokenizer()?;
    let weights = source.load_weights_with(kind, device, blocks)?;
    Ok(LoadedModel {
        name: source.name,
        config: source.config,
        weights,
        tokenizer,
        part: source.part,
    })
}

/// `SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct`.
/// Whether `dir/config.json` is a Qwen2.5-Omni checkpoint's.
fn is_qwen_omni(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["model_type"] == "qwen2_5_omni")
}

fn gguf_model_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // llama.cpp names files `<model>.<quant>` or `<model>-<quant>`.
    for sep in ['.', '-'] {
        if let Some((model, tag)) = stem.rsplit_once(sep) {
            let t = tag.to_ascii_uppercase();
            let is_quant = (t.starts_with('Q') || t.starts_with("IQ"))
                && t.chars()
                    .nth(1 + usize::from(t.starts_with("IQ")))
                    .is_some_and(|c| c.is_ascii_digit())
                || matches!(t.as_str(), "F16" | "F32" | "BF16");
            if is_quant && !model.is_empty() {
                return model.to_owned();
            }
        }
    }
    stem
}

#[cfg(test)]
mod tests {
    use super::gguf_model_name;
    use std::path::Path;

    #[test]
    fn gguf_names_lose_their_quant_tag() {
        assert_eq!(
            gguf_model_name(Path::new("/m/SmolLM2-135M-Instruct.Q4_1.gguf")),
            "SmolLM2-135M-Instruct"
        );
        assert_eq!(
            gguf_model_name(Path::new("qwen2.5-0.5b-instruct-q8_0.gguf")),
            "qwen2.5-0.5b-instruct"
        );
        assert_eq!(
            gguf_model_name(Path::new("Llama-3.2-1B.IQ4_XS.gguf")),
            "Llama-3.2-1B"
        );
        assert_eq!(
            gguf_model_name(Path::new("tiny-quants.gguf")),
            "tiny-quants"
        );
        assert_eq!(gguf_model_name(Path::new("model-f16.gguf")), "model");
    }
}
