//! What the thinker reads besides text: each `<|AUDIO|>` placeholder of a
//! prompt stands for one clip of the prompt's media; it is expanded to one
//! token per row the audio encoder makes of the clip, and those rows replace
//! the placeholders' embeddings (transformers' `Qwen2_5OmniProcessor` then
//! `Qwen2_5OmniThinkerModel.forward`). Audio-only prompts keep plain 1-D
//! positions, as `get_rope_index` gives them.
use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::audio_encoder::{AudioEncoder, AudioEncoderConfig};
use super::config::OmniConfig;
use crate::error::{Error, Result};
use crate::media::{MultiModalData, WhisperFeatureExtractor};
use crate::safetensors::SafetensorsFiles;

/// The special ids of `thinker_config` that frame media.
#[derive(Debug, Clone, Deserialize)]
struct MediaIds {
    #[serde(default = "d_audio")]
    audio_token_index: u32,
}

fn d_audio() -> u32 {
    151_646
}

/// A prompt with its media placeholders expanded and encoded.
#[derive(Debug)]
pub struct ExpandedPrompt {
    /// The prompt's ids, each placeholder repeated once per encoder row.
    pub ids: Vec<u32>,
    /// Per media item: where its rows start in `ids`, and the rows
    /// (`[n, hidden]`, on the encoder's device).
    pub items: Vec<(usize, Tensor)>,
}

/// The thinker's media encoders and pre-processing.
#[derive(Debug)]
pub struct ThinkerMedia {
    audio: AudioEncoder,
    features: WhisperFeatureExtractor,
    ids: MediaIds,
}

impl ThinkerMedia {
    /// The encoders of the Qwen2.5-Omni folder `dir`, or `None` when its
    /// checkpoint holds none (`thinker.audio_tower.*`).
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Option<Self>> {
        let config = OmniConfig::read(dir)?;
        let thinker = &config.thinker_config;
        let parse = |field: &str| -> Result<serde_json::Value> {
            Ok(thinker.get(field).cloned().unwrap_or(serde_json::json!({})))
        };
        let bad = |field: &str, e: serde_json::Error| Error::ModelConfig {
            path: dir.join("config.json"),
            field: format!("thinker_config.{field}"),
            reason: e.to_string(),
        };
        let audio_cfg: AudioEncoderConfig =
            serde_json::from_value(parse("audio_config")?).map_err(|e| bad("audio_config", e))?;
        let ids: MediaIds = serde_json::from_value(thinker.clone()).map_err(|e| bad("*", e))?;
        let mut w =
            SafetensorsFiles::find(dir)?.load_prefix("thinker.audio_tower.", kind, device)?;
        if w.is_empty() {
            return Ok(None);
        }
        let audio = AudioEncoder::load(&mut w, &audio_cfg)?;
        let features = WhisperFeatureExtractor::from_dir(dir, audio_cfg.num_mel_bins)?;
        Ok(Some(ThinkerMedia {
            audio,
            features,
            ids,
        }))
    }

    /// The audio encoder.
    pub fn audio_encoder(&self) -> &AudioEncoder {
        &self.audio
    }

    /// The audio feature extractor.
    pub fn feature_extractor(&self) -> &WhisperFeatureExtractor {
        &self.features
    }

    /// The placeholder id of one audio clip.
    pub fn audio_token(&self) -> u32 {
        self.ids.audio_token_index
    }

    /// Expands the placeholders of `ids` for `data` and encodes the media.
    /// Errors name the request and the item.
    pub fn expand(
        &self,
        request_id: &str,
        ids: &[u32],
        data: &MultiModalData,
    ) -> Result<ExpandedPrompt> {
        let bad = |reason: String| Error::InvalidPrompt {
            request_id: request_id.to_owned(),
            reason,
        };
        let audio_token = self.ids.audio_token_index;
        let placeholders = ids.iter().filter(|&&t| t == audio_token).count();
        if placeholders != data.audio.len() {
            return Err(bad(format!(
                "the prompt has {placeholders} audio placeholder(s) (<|AUDIO|>, id \
                 {audio_token}) for {} audio clip(s) in multi_modal_data; a chat message's \
                 {{\"type\": \"audio\"}} part renders one",
                data.audio.len()
            )));
        }
        let mut out = Vec::with_capacity(ids.len());
        let mut items = Vec::with_capacity(data.audio.len());
        let mut clips = data.audio.iter().enumerate();
        for &t in ids {
            if t != audio_token {
                out.push(t);
                continue;
            }
            let Some((i, clip)) = clips.next() else {
                return Err(bad("more audio placeholders than clips".to_owned()));
            };
            let name = format!("multi_modal_data.audio[{i}]");
            let features = self
                .features
                .extract(clip, &name)
                .map_err(|e| bad(e.to_string()))?;
            let rows = self.audio.forward(&features)?;
            let n = rows.size()[0] as usize;
            items.push((out.len(), rows));
            out.extend(std::iter::repeat_n(audio_token, n));
        }
        Ok(ExpandedPrompt { ids: out, items })
    }
}
