//! What the thinker reads besides text: each `<|AUDIO|>`, `<|IMAGE|>` or
//! `<|VIDEO|>` placeholder of a prompt stands for the next clip, image or
//! video of the prompt's media; it is expanded to one token per row its encoder makes,
//! and those rows replace the placeholders' embeddings (transformers'
//! `Qwen2_5OmniProcessor`, then `Qwen2_5OmniThinkerModel.forward`). With an
//! image or a video in the prompt, positions become 3-D (`get_rope_index`):
//! its rows sit on a (time, height, width) grid from the position after the
//! text before it (a video's time advancing `position_id_per_seconds` a
//! second), and text goes on after the grid's largest position. A video's
//! sound (`use_audio_in_video`) is interleaved with its frames in time.
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
    /// Seconds of a video and its sound interleaved at a time.
    #[serde(default = "d_spc")]
    seconds_per_chunk: f64,
    #[serde(default = "d_audio_start")]
    audio_start_token_id: u32,
    #[serde(default = "d_audio_end")]
    audio_end_token_id: u32,
    #[serde(default = "d_vision_start")]
    vision_start_token_id: u32,
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
fn d_spc() -> f64 {
    2.0
}
fn d_audio_start() -> u32 {
    151_647
}
fn d_audio_end() -> u32 {
    151_648
}
fn d_vision_start() -> u32 {
    151_652
}

/// A prompt with its media placeholders expanded and encoded.
#[derive(Debug)]
pub struct ExpandedPrompt {
    /// The prompt's ids, each placeholder repeated once per encoder row.
    pub ids: Vec<u32>,
    /// Per encoder output: the positions in `ids` its rows fill, in order,
    /// and the rows (`[n, hidden]`, on the encoder's device).
    pub items: Vec<(Vec<usize>, Tensor)>,
    /// 3-D RoPE positions of every prompt token when the prompt holds an
    /// image or a video; empty when plain positions are exact.
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

/// How the tokens a placeholder expands to are placed on the 3-D rotary
/// positions (transformers' `get_rope_index`).
enum Placement {
    /// One after the other, as text (audio).
    Sequential,
    /// On a grid: each token's offset from the next free position; the
    /// next free position after it is its largest plus one (images, video).
    Grid(Vec<[i64; 3]>),
    /// A video with its sound (`use_audio_in_video`): `<|audio_bos|>`
    /// shares the position of the `<|vision_bos|>` before it; the inner
    /// tokens sit at their offsets from the position after it; then
    /// `<|audio_eos|>` and the `<|vision_eos|>` after it share the position
    /// after the largest of the *last chunk* laid out (transformers'
    /// `llm_pos_ids_list[-1].max() + 1`), whose length is the `usize`.
    WithSound(Vec<[i64; 3]>, usize),
}

/// What one placeholder becomes.
struct Expansion {
    /// The tokens in its place.
    ids: Vec<u32>,
    /// Encoder outputs and the offsets (in `ids`) their rows fill.
    rows: Vec<(Vec<usize>, Tensor)>,
    place: Placement,
}

/// transformers' `get_chunked_index`: where the values of `times`
/// (non-decreasing) cross each multiple of `per_chunk`, as spans.
fn chunk_spans(times: &[f64], per_chunk: f64) -> Vec<std::ops::Range<usize>> {
    let (mut spans, mut start, mut chunk) = (Vec::new(), 0, 1.0);
    for (i, &t) in times.iter().enumerate() {
        if t >= chunk * per_chunk {
            spans.push(start..i);
            start = i;
            chunk += 1.0;
        }
    }
    spans.push(start..times.len());
    spans
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
        let with_sound = data.use_audio_in_video;
        if with_sound && data.audio.len() != data.video.len() {
            return Err(bad(format!(
                "use_audio_in_video pairs each video with its sound: {} video(s), {} audio clip(s)",
                data.video.len(),
                data.audio.len()
            )));
        }
        // With use_audio_in_video the clips are the videos' sound, placed
        // with them; the prompt names only the videos.
        let standalone_audio = if with_sound { 0 } else { data.audio.len() };
        for (what, token, items, part) in [
            ("audio", audio_token, standalone_audio, "<|AUDIO|>"),
            ("image", image_token, data.image.len(), "<|IMAGE|>"),
            ("video", video_token, data.video.len(), "<|VIDEO|>"),
        ] {
            let placeholders = ids.iter().filter(|&&t| t == token).count();
            if with_sound && token == audio_token && placeholders > 0 {
                return Err(bad(format!(
                    "with use_audio_in_video the audio clips are the videos' sound: the prompt \
                     must have no audio placeholder ({part}), and has {placeholders}"
                )));
            }
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
        let text = ids.len() - standalone_audio - data.image.len() - data.video.len()
            + if with_sound { 2 * data.video.len() } else { 0 };
        let total = text as i64 + media_rows;
        if total >= max_len as i64 {
            return Err(bad(format!(
                "the prompt would take {total} tokens ({media_rows} of them for its media); the \
                 context holds {max_len} (max_model_len), leaving no room to generate"
            )));
        }
        let mut out = Vec::with_capacity(total as usize);
        let mut items = Vec::new();
        let mut segments: Vec<(usize, usize, Placement)> = Vec::new();
        let (mut clips, mut images) =
            (data.audio.iter().enumerate(), data.image.iter().enumerate());
        let mut videos = data.video.iter().enumerate();
        for &t in ids {
            let e = if t == audio_token {
                let Some(clip) = clips.next() else {
                    return Err(bad("more audio placeholders than clips".to_owned()));
                };
                self.audio_expansion(clip, &bad)?
            } else if t == image_token {
                let Some(image) = images.next() else {
                    return Err(bad("more image placeholders than images".to_owned()));
                };
                self.image_expansion(image, &bad)?
            } else if t == video_token {
                let Some((i, video)) = videos.next() else {
                    return Err(bad("more video placeholders than videos".to_owned()));
                };
                let sound = if with_sound { clips.next() } else { None };
                if sound.is_some() && out.last() != Some(&self.ids.vision_start_token_id) {
                    return Err(bad(format!(
                        "with use_audio_in_video, <|VIDEO|> must follow <|vision_bos|> (id {}), \
                         as the chat template writes it",
                        self.ids.vision_start_token_id
                    )));
                }
                self.video_expansion((i, video), sound, &bad)?
            } else {
                out.push(t);
                continue;
            };
            let start = out.len();
            for (offsets, rows) in e.rows {
                items.push((offsets.iter().map(|o| start + o).collect(), rows));
            }
            segments.push((start, e.ids.len(), e.place));
            out.extend(e.ids);
        }
        let (positions, position_delta) = if segments
            .iter()
            .any(|(_, _, p)| !matches!(p, Placement::Sequential))
        {
            rope_positions(out.len(), &segments)
        } else {
            (Vec::new(), 0)
        };
        // A video's time row can outrun its tokens (a low fps): the rotary
        // tables end at max_model_len, and later tokens add the delta.
        let top = positions.iter().flatten().copied().max().unwrap_or(0);
        if positions.iter().flatten().any(|&p| p < 0) || top >= max_len as i64 || position_delta > 0
        {
            return Err(bad(format!(
                "the media's rotary positions reach {top} over {} tokens; they must stay \
                 below max_model_len {max_len} and not outrun the tokens (a video's fps too low?)",
                out.len()
            )));
        }
        Ok(ExpandedPrompt {
            ids: out,
            items,
            positions,
            position_delta,
        })
    }
}

impl ThinkerMedia {
    fn merge(&self) -> i64 {
        self.vision
            .as_ref()
            .map_or(1, |(e, _)| e.config().spatial_merge_size)
    }

    fn audio_rows(
        &self,
        (i, clip): (usize, &crate::media::AudioInput),
        bad: &dyn Fn(String) -> Error,
    ) -> Result<Tensor> {
        let Some((enc, features)) = &self.audio else {
            return Err(bad("this checkpoint has no audio encoder".to_owned()));
        };
        let name = format!("multi_modal_data.audio[{i}]");
        let f = features
            .extract(clip, &name)
            .map_err(|e| bad(e.to_string()))?;
        enc.forward(&f)
            .map_err(|e| bad(format!("{name}: the audio encoder failed: {e}")))
    }

    fn audio_expansion(
        &self,
        clip: (usize, &crate::media::AudioInput),
        bad: &dyn Fn(String) -> Error,
    ) -> Result<Expansion> {
        let rows = self.audio_rows(clip, bad)?;
        let n = rows.size()[0] as usize;
        Ok(Expansion {
            ids: vec![self.ids.audio_token_index; n],
            rows: vec![((0..n).collect(), rows)],
            place: Placement::Sequential,
        })
    }

    fn image_expansion(
        &self,
        (i, image): (usize, &crate::media::ImageInput),
        bad: &dyn Fn(String) -> Error,
    ) -> Result<Expansion> {
        let Some((enc, processor)) = &self.vision else {
            return Err(bad("this checkpoint has no vision encoder".to_owned()));
        };
        let name = format!("multi_modal_data.image[{i}]");
        let p = processor
            .process(image, &name)
            .map_err(|e| bad(e.to_string()))?;
        let rows = enc
            .forward(&p.pixel_values, p.grid)
            .map_err(|e| bad(format!("{name}: the vision encoder failed: {e}")))?;
        // An image is one frame: every row sits at time 0 of its grid.
        let grid = grid_offsets(p.grid, &[0], self.merge());
        let n = grid.len();
        Ok(Expansion {
            ids: vec![self.ids.image_token_index; n],
            rows: vec![((0..n).collect(), rows)],
            place: Placement::Grid(grid),
        })
    }

    fn video_expansion(
        &self,
        (i, video): (usize, &crate::media::VideoInput),
        sound: Option<(usize, &crate::media::AudioInput)>,
        bad: &dyn Fn(String) -> Error,
    ) -> Result<Expansion> {
        let Some((enc, processor)) = &self.vision else {
            return Err(bad("this checkpoint has no vision encoder".to_owned()));
        };
        let name = format!("multi_modal_data.video[{i}]");
        let p = processor
            .process_video(video, &name)
            .map_err(|e| bad(e.to_string()))?;
        let rows = enc
            .forward(&p.pixel_values, p.grid)
            .map_err(|e| bad(format!("{name}: the vision encoder failed: {e}")))?;
        // transformers places frames at (arange(t) * second_per_grid *
        // position_id_per_seconds).long(), in f32; its processor chunks
        // them by the unrounded values.
        let spg = processor.second_per_grid(video);
        let pps = self.ids.position_id_per_seconds;
        let times: Vec<i64> = (0..p.grid[0])
            .map(|k| (k as f32 * spg as f32 * pps as f32) as i64)
            .collect();
        let grid = grid_offsets(p.grid, &times, self.merge());
        let video_token = self.ids.video_token_index;
        let Some(clip) = sound else {
            let n = grid.len();
            return Ok(Expansion {
                ids: vec![video_token; n],
                rows: vec![((0..n).collect(), rows)],
                place: Placement::Grid(grid),
            });
        };
        // Interleave the frames and the sound chunk by chunk of
        // seconds_per_chunk (transformers' replace_video_with_audio_token).
        let sound_rows = self.audio_rows(clip, bad)?;
        let per_frame = grid.len() as i64 / p.grid[0];
        let unrounded: Vec<f64> = (0..grid.len() as i64)
            .map(|r| (r / per_frame) as f64 * spg * pps)
            .collect();
        let n_audio = sound_rows.size()[0] as usize;
        let audio_times: Vec<f64> = (0..n_audio).map(|k| k as f64).collect();
        let per_chunk = (pps * self.ids.seconds_per_chunk).trunc();
        let (v_spans, a_spans) = (
            chunk_spans(&unrounded, per_chunk),
            chunk_spans(&audio_times, per_chunk),
        );
        let mut ids = vec![self.ids.audio_start_token_id];
        let (mut video_at, mut audio_at) = (Vec::new(), Vec::new());
        let mut inner = Vec::with_capacity(grid.len() + n_audio);
        let mut last_piece = 0;
        for j in 0..v_spans.len().max(a_spans.len()) {
            if let Some(span) = v_spans.get(j).filter(|s| !s.is_empty()) {
                last_piece = span.len();
                for r in span.clone() {
                    video_at.push(ids.len());
                    ids.push(video_token);
                    inner.push(grid[r]);
                }
            }
            if let Some(span) = a_spans.get(j).filter(|s| !s.is_empty()) {
                last_piece = span.len();
                for k in span.clone() {
                    audio_at.push(ids.len());
                    ids.push(self.ids.audio_token_index);
                    inner.push([k as i64; 3]);
                }
            }
        }
        ids.push(self.ids.audio_end_token_id);
        Ok(Expansion {
            ids,
            rows: vec![(video_at, rows), (audio_at, sound_rows)],
            place: Placement::WithSound(inner, last_piece),
        })
    }
}

/// Offsets `(t, h, w)` of a vision item's merged rows from its first
/// position: frame by frame, row by row.
fn grid_offsets([_, h, w]: [i64; 3], times: &[i64], merge: i64) -> Vec<[i64; 3]> {
    let (lh, lw) = (h / merge, w / merge);
    let mut out = Vec::with_capacity(times.len() * (lh * lw) as usize);
    for &t in times {
        for y in 0..lh {
            for x in 0..lw {
                out.push([t, y, x]);
            }
        }
    }
    out
}

/// transformers' `get_rope_index`: every token outside a placed segment
/// takes the next position in all three rows; segments place theirs as
/// [`Placement`] says.
fn rope_positions(len: usize, segments: &[(usize, usize, Placement)]) -> (Vec<[i64; 3]>, i64) {
    let mut out: Vec<[i64; 3]> = Vec::with_capacity(len);
    let mut next = 0i64;
    let mut seg = segments.iter().peekable();
    let max3 = |p: &[i64; 3]| p[0].max(p[1]).max(p[2]);
    while out.len() < len {
        let Some((_, n, place)) = seg.next_if(|(s, _, _)| *s == out.len()) else {
            out.push([next; 3]);
            next += 1;
            continue;
        };
        match place {
            Placement::Sequential => {
                for _ in 0..*n {
                    out.push([next; 3]);
                    next += 1;
                }
            }
            Placement::Grid(offsets) => {
                let mut top = next;
                for o in offsets {
                    let p = [next + o[0], next + o[1], next + o[2]];
                    top = top.max(max3(&p));
                    out.push(p);
                }
                next = top + 1;
            }
            Placement::WithSound(offsets, last_piece) => {
                // <|audio_bos|> at the <|vision_bos|>'s position.
                out.push([next - 1; 3]);
                let placed: Vec<[i64; 3]> = offsets
                    .iter()
                    .map(|o| [next + o[0], next + o[1], next + o[2]])
                    .collect();
                let end = placed[placed.len().saturating_sub(*last_piece)..]
                    .iter()
                    .map(max3)
                    .max()
                    .unwrap_or(next - 1)
                    + 1;
                out.extend(placed);
                // <|audio_eos|> here, and the <|vision_eos|> after it, at `end`.
                out.push([end; 3]);
                next = end;
            }
        }
    }
    // transformers: the prompt's largest position plus one, minus its length.
    let top = out.iter().map(max3).max().unwrap_or(-1);
    (out, top + 1 - len as i64)
}
