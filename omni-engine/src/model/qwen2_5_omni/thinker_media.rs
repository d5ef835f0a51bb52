//! What the thinker reads besides text: each `<|AUDIO|>`, `<|IMAGE|>` or
//! `<|VIDEO|>` placeholder of a prompt stands for the next clip, image or
//! video of the prompt's media; it is expanded to one token per row its encoder makes,
//! and those rows replace the placeholders' embeddings (transformers'
//! `Qwen2_5OmniProcessor`, then `Qwen2_5OmniThinkerModel.forward`). With an
//! image or a video in the prompt, positions become 3-D (`get_rope_index`):
//! its rows sit on a (time, height, width) grid from the position after the
//! text before it (a video's time advancing `position_id_per_seconds` a
//! second), and text goes on after the grid's largest position. Audio
//! interleaved with a video's frames (`use_audio_in_video`) is not done.
use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::audio_encoder::{AudioEncoder, AudioEncoderConfig};
use super::config::OmniConfig;
use super::vision_encoder::{VisionEncoder, VisionEncoderConfig};
use crate::error::{Error, Result};
use crate::media::{ImageProcessor, MultiModalData, WhisperFeatureExtractor};
use crate::safetensors::SafetensorsFiles;

/// The special ids of `thinker_config` that stand for media.
#[derive(Debug, Clone, Deserialize)]
struct MediaIds {
    #[serde(default = "d_audio")]
    audio_token_index: u32,
    #[serde(default = "d_image")]
    image_token_index: u32,
    #[serde(default = "d_video")]
    video_token_index: u32,
    /// Rotary positions a second of video advances the temporal row.
    #[serde(default = "d_pps")]
    position_id_per_seconds: f64,
}

fn d_audio() -> u32 {
    151_646
}
fn d_image() -> u32 {
    151_655
}
fn d_video() -> u32 {
    151_656
}
fn d_pps() -> f64 {
    25.0
}

/// A prompt with its media placeholders expanded and encoded.
#[derive(Debug)]
pub struct ExpandedPrompt {
    /// The prompt's ids, each placeholder repeated once per encoder row.
    pub ids: Vec<u32>,
    /// Per media item: where its rows start in `ids`, and the rows
    /// (`[n, hidden]`, on the encoder's device).
    pub items: Vec<(usize, Tensor)>,
    /// 3-D RoPE positions of every prompt token when the prompt holds an
    /// image; empty when plain positions are exact.
    pub positions: Vec<[i64; 3]>,
    /// What a later token adds to its index: the largest position plus one,
    /// minus the prompt's length.
    pub position_delta: i64,
}

/// The thinker's media encoders and pre-processing.
#[derive(Debug)]
pub struct ThinkerMedia {
    audio: Option<(AudioEncoder, WhisperFeatureExtractor)>,
    vision: Option<(VisionEncoder, ImageProcessor)>,
    ids: MediaIds,
}

/// One encoded item, in prompt order.
enum Item {
    Audio,
    Image([i64; 3]),
    /// The grid and the temporal positions of its frames' patches.
    Video([i64; 3], Vec<i64>),
}

impl ThinkerMedia {
    /// The encoders of the Qwen2.5-Omni folder `dir`, or `None` when its
    /// checkpoint holds neither `thinker.audio_tower.*` nor
    /// `thinker.visual.*`.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Option<Self>> {
        let config = OmniConfig::read(dir)?;
        let thinker = &config.thinker_config;
        let section = |field: &str| thinker.get(field).cloned().unwrap_or(serde_json::json!({}));
        let bad = |field: &str, e: serde_json::Error| Error::ModelConfig {
            path: dir.join("config.json"),
            field: format!("thinker_config.{field}"),
            reason: e.to_string(),
        };
        let ids: MediaIds = serde_json::from_value(thinker.clone()).map_err(|e| bad("*", e))?;
        let files = SafetensorsFiles::find(dir)?;
        let mut aw = files.load_prefix("thinker.audio_tower.", kind, device)?;
        let audio = if aw.is_empty() {
            None
        } else {
            let cfg: AudioEncoderConfig = serde_json::from_value(section("audio_config"))
                .map_err(|e| bad("audio_config", e))?;
            Some((
                AudioEncoder::load(&mut aw, &cfg)?,
                WhisperFeatureExtractor::from_dir(dir, cfg.num_mel_bins)?,
            ))
        };
        let mut vw = files.load_prefix("thinker.visual.", kind, device)?;
        let vision = if vw.is_empty() {
            None
        } else {
            let cfg: VisionEncoderConfig = serde_json::from_value(section("vision_config"))
                .map_err(|e| bad("vision_config", e))?;
            Some((
                VisionEncoder::load(&mut vw, &cfg)?,
                ImageProcessor::from_dir(dir)?,
            ))
        };
        if audio.is_none() && vision.is_none() {
            return Ok(None);
        }
        Ok(Some(ThinkerMedia { audio, vision, ids }))
    }

    /// The audio encoder, when the checkpoint has one.
    pub fn audio_encoder(&self) -> Option<&AudioEncoder> {
        self.audio.as_ref().map(|(e, _)| e)
    }

    /// The audio feature extractor, when the checkpoint has an audio encoder.
    pub fn feature_extractor(&self) -> Option<&WhisperFeatureExtractor> {
        self.audio.as_ref().map(|(_, f)| f)
    }

    /// The vision encoder, when the checkpoint has one.
    pub fn vision_encoder(&self) -> Option<&VisionEncoder> {
        self.vision.as_ref().map(|(e, _)| e)
    }

    /// The image processor, when the checkpoint has a vision encoder.
    pub fn image_processor(&self) -> Option<&ImageProcessor> {
        self.vision.as_ref().map(|(_, p)| p)
    }

    /// The placeholder id of one audio clip.
    pub fn audio_token(&self) -> u32 {
        self.ids.audio_token_index
    }

    /// The placeholder id of one image.
    pub fn image_token(&self) -> u32 {
        self.ids.image_token_index
    }

    /// Expands the placeholders of `ids` for `data`, encodes the media and
    /// places every token. A prompt that would not leave a token of room
    /// in `max_len` is refused before any encoder runs. Errors name the
    /// request and the item.
    pub fn expand(
        &self,
        request_id: &str,
        ids: &[u32],
        data: &MultiModalData,
        max_len: usize,
    ) -> Result<ExpandedPrompt> {
        let bad = |reason: String| Error::InvalidPrompt {
            request_id: request_id.to_owned(),
            reason,
        };
        let (audio_token, image_token) = (self.ids.audio_token_index, self.ids.image_token_index);
        let video_token = self.ids.video_token_index;
        for (what, token, items, part) in [
            ("audio", audio_token, data.audio.len(), "<|AUDIO|>"),
            ("image", image_token, data.image.len(), "<|IMAGE|>"),
            ("video", video_token, data.video.len(), "<|VIDEO|>"),
        ] {
            let placeholders = ids.iter().filter(|&&t| t == token).count();
            if placeholders != items {
                return Err(bad(format!(
                    "the prompt has {placeholders} {what} placeholder(s) ({part}, id {token}) \
                     for {items} {what} item(s) in multi_modal_data; a chat message's \
                     {{\"type\": \"{what}\"}} part renders one"
                )));
            }
        }
        if !data.audio.is_empty() && self.audio.is_none() {
            return Err(bad("this checkpoint has no audio encoder".to_owned()));
        }
        if (!data.image.is_empty() || !data.video.is_empty()) && self.vision.is_none() {
            return Err(bad("this checkpoint has no vision encoder".to_owned()));
        }
        // Rows each item will take, from its size alone.
        let mut media_rows = 0i64;
        if let Some((_, features)) = &self.audio {
            for (i, clip) in data.audio.iter().enumerate() {
                let name = format!("multi_modal_data.audio[{i}]");
                features
                    .check(clip, &name)
                    .map_err(|e| bad(e.to_string()))?;
                media_rows += AudioEncoder::output_len(features.frames_for(clip)).max(0);
            }
        }
        if let Some((_, processor)) = &self.vision {
            for (i, image) in data.image.iter().enumerate() {
                let name = format!("multi_modal_data.image[{i}]");
                let [t, h, w] = processor
                    .grid_for(image, &name)
                    .map_err(|e| bad(e.to_string()))?;
                media_rows += t * h * w / processor.merge_unit();
            }
            for (i, video) in data.video.iter().enumerate() {
                let name = format!("multi_modal_data.video[{i}]");
                let [t, h, w] = processor
                    .video_grid_for(video, &name)
                    .map_err(|e| bad(e.to_string()))?;
                media_rows += t * h * w / processor.merge_unit();
            }
        }
        let text = ids.len() - data.audio.len() - data.image.len() - data.video.len();
        let total = text as i64 + media_rows;
        if total >= max_len as i64 {
            return Err(bad(format!(
                "the prompt would take {total} tokens ({media_rows} of them for its media); the \
                 context holds {max_len} (max_model_len), leaving no room to generate"
            )));
        }
        let mut out = Vec::with_capacity(total as usize);
        let mut items = Vec::with_capacity(data.audio.len() + data.image.len());
        let mut kinds = Vec::with_capacity(items.capacity());
        let (mut clips, mut images) =
            (data.audio.iter().enumerate(), data.image.iter().enumerate());
        let mut videos = data.video.iter().enumerate();
        for &t in ids {
            let rows = if t == audio_token {
                let (Some((enc, features)), Some((i, clip))) = (&self.audio, clips.next()) else {
                    return Err(bad("more audio placeholders than clips".to_owned()));
                };
                let name = format!("multi_modal_data.audio[{i}]");
                let f = features
                    .extract(clip, &name)
                    .map_err(|e| bad(e.to_string()))?;
                kinds.push(Item::Audio);
                enc.forward(&f)?
            } else if t == image_token {
                let (Some((enc, processor)), Some((i, image))) = (&self.vision, images.next())
                else {
                    return Err(bad("more image placeholders than images".to_owned()));
                };
                let name = format!("multi_modal_data.image[{i}]");
                let p = processor
                    .process(image, &name)
                    .map_err(|e| bad(e.to_string()))?;
                kinds.push(Item::Image(p.grid));
                enc.forward(&p.pixel_values, p.grid)?
            } else if t == video_token {
                let (Some((enc, processor)), Some((i, video))) = (&self.vision, videos.next())
                else {
                    return Err(bad("more video placeholders than videos".to_owned()));
                };
                let name = format!("multi_modal_data.video[{i}]");
                let p = processor
                    .process_video(video, &name)
                    .map_err(|e| bad(e.to_string()))?;
                // transformers: (arange(t) * second_per_grid * position_id_per_seconds).long(), in f32.
                let spg = processor.second_per_grid(video) as f32;
                let pps = self.ids.position_id_per_seconds as f32;
                let times = (0..p.grid[0])
                    .map(|k| (k as f32 * spg * pps) as i64)
                    .collect();
                kinds.push(Item::Video(p.grid, times));
                enc.forward(&p.pixel_values, p.grid)
                    .map_err(|e| bad(format!("{name}: the vision encoder failed: {e}")))?
            } else {
                out.push(t);
                continue;
            };
            let n = rows.size()[0] as usize;
            items.push((out.len(), rows));
            out.extend(std::iter::repeat_n(t, n));
        }
        let merge = self
            .vision
            .as_ref()
            .map_or(1, |(e, _)| e.config().spatial_merge_size);
        let (positions, position_delta) = if kinds
            .iter()
            .any(|k| matches!(k, Item::Image(_) | Item::Video(..)))
        {
            let starts: Vec<usize> = items.iter().map(|(s, _)| *s).collect();
            rope_positions(out.len(), &starts, &kinds, merge)
        } else {
            (Vec::new(), 0)
        };
        Ok(ExpandedPrompt {
            ids: out,
            items,
            positions,
            position_delta,
        })
    }
}

/// transformers' `get_rope_index` for text, audio and images: every token
/// outside an image takes the next position in all three rows; an image's
/// rows sit on its merged grid, from the next position on; the next
/// position after it is its largest plus one.
fn rope_positions(
    len: usize,
    starts: &[usize],
    kinds: &[Item],
    merge: i64,
) -> (Vec<[i64; 3]>, i64) {
    let mut out = Vec::with_capacity(len);
    let mut next = 0i64;
    let mut item = 0;
    while out.len() < len {
        match (starts.get(item), kinds.get(item)) {
            (Some(&s), Some(Item::Image([_, h, w]))) if s == out.len() => {
                // An image is one frame (the processor's grid has t = 1):
                // every row sits at time 0 of its grid.
                let (lh, lw) = (h / merge, w / merge);
                for y in 0..lh {
                    for x in 0..lw {
                        out.push([next, next + y, next + x]);
                    }
                }
                next += lh.max(lw);
                item += 1;
            }
            (Some(&s), Some(Item::Video([_, h, w], times))) if s == out.len() => {
                let (lh, lw) = (h / merge, w / merge);
                let mut top = next;
                for &t in times {
                    for y in 0..lh {
                        for x in 0..lw {
                            let p = [next + t, next + y, next + x];
                            top = top.max(p[0]).max(p[1]).max(p[2]);
                            out.push(p);
                        }
                    }
                }
                next = top + 1;
                item += 1;
            }
            (Some(&s), Some(Item::Audio)) if s == out.len() => {
                // Audio rows are placed as text is; the item only ends here.
                item += 1;
            }
            _ => {
                out.push([next; 3]);
                next += 1;
            }
        }
    }
    let delta = next - len as i64;
    (out, delta)
}
