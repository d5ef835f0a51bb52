//! Media a prompt carries into a model that reads more than text (vLLM's
//! `multi_modal_data`), how files of it are decoded, and the Whisper log-mel
//! features that audio encoders read.
//!
//! Decoding: WAV, FLAC, MP3 and Ogg Vorbis through `symphonia` (pure Rust);
//! channels are averaged to mono, as `librosa.load(mono=True)` does.
//! Features: transformers' `WhisperFeatureExtractor` (its torch path), so a
//! clip's features equal the Python processor's to float rounding.
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::mel::MelConfig;

/// Media items of one prompt, by modality, in prompt order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiModalData {
    /// Audio clips, one per audio placeholder of the prompt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audio: Vec<AudioInput>,
    /// Images, one per image placeholder of the prompt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image: Vec<ImageInput>,
    /// Videos, one per video placeholder of the prompt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub video: Vec<VideoInput>,
    /// The audio clips are the videos' sound, one per video in order,
    /// interleaved with their frames in time (Qwen2.5-Omni's
    /// `use_audio_in_video`); the prompt then has no audio placeholders.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_audio_in_video: bool,
}

impl MultiModalData {
    /// Whether it holds no item.
    pub fn is_empty(&self) -> bool {
        self.audio.is_empty() && self.image.is_empty() && self.video.is_empty()
    }
}

/// One image: 8-bit RGB pixels, row-major (`height * width * 3` bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInput {
    /// Pixels across.
    pub width: u32,
    /// Pixels down.
    pub height: u32,
    /// `height * width * 3` bytes, R G B per pixel, rows top to bottom.
    pub rgb: Vec<u8>,
}

impl ImageInput {
    /// An image of `rgb` bytes; errors when their count is not `width *
    /// height * 3`.
    pub fn new(width: u32, height: u32, rgb: Vec<u8>) -> Result<Self> {
        let image = Self { width, height, rgb };
        image.check("image")?;
        Ok(image)
    }

    /// Bytes `width x height` RGB pixels take, when that fits memory.
    pub fn byte_len(width: u32, height: u32) -> Option<usize> {
        (width as usize)
            .checked_mul(height as usize)?
            .checked_mul(3)
    }

    /// That the pixels fill the stated size and stay within
    /// [`MAX_IMAGE_PIXELS`]; `name` names the image in the error.
    pub fn check(&self, name: &str) -> Result<()> {
        let (w, h) = (self.width, self.height);
        if u64::from(w) * u64::from(h) > MAX_IMAGE_PIXELS {
            return Err(media_error(
                name,
                format!("{w} x {h} pixels; at most {MAX_IMAGE_PIXELS} are taken"),
            ));
        }
        match Self::byte_len(w, h) {
            Some(n) if n > 0 && n == self.rgb.len() => Ok(()),
            _ => Err(media_error(
                name,
                format!(
                    "{w} x {h} RGB needs {} bytes, got {}",
                    u64::from(w) * u64::from(h) * 3,
                    self.rgb.len()
                ),
            )),
        }
    }

    /// Decodes an image file's bytes (PNG, JPEG, WebP, GIF, BMP) to RGB
    /// (alpha dropped, grey expanded, as PIL's `convert("RGB")`); `name`
    /// names the input in errors. Refuses more than `MAX_IMAGE_PIXELS`.
    pub fn decode(bytes: &[u8], name: &str) -> Result<Self> {
        if bytes.is_empty() {
            return Err(media_error(name, "the image is empty (0 bytes)"));
        }
        let open = || {
            image::ImageReader::new(std::io::Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| media_error(name, format!("cannot read it: {e}")))
        };
        let unreadable = |e: image::ImageError| {
            media_error(
                name,
                format!("not an image this build reads (PNG, JPEG, WebP, GIF, BMP): {e}"),
            )
        };
        let (w, h) = open()?.into_dimensions().map_err(unreadable)?;
        if u64::from(w) * u64::from(h) > MAX_IMAGE_PIXELS {
            return Err(media_error(
                name,
                format!("{w} x {h} pixels; at most {MAX_IMAGE_PIXELS} are taken"),
            ));
        }
        let mut reader = open()?;
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(MAX_IMAGE_PIXELS * 4 * 2);
        reader.limits(limits);
        let img = reader
            .decode()
            .map_err(|e| media_error(name, format!("truncated or corrupt: {e}")))?;
        let rgb = img.to_rgb8();
        Self::new(rgb.width(), rgb.height(), rgb.into_raw())
    }

    /// Reads and decodes an image file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            cause: e,
        })?;
        Self::decode(&bytes, &path.display().to_string())
    }
}

/// One video: its frames as sampled (all of one size), `fps` of them a
/// second (vLLM's `(frames, metadata)`): a folder of images, an animated
/// GIF, or frames a caller decoded. No MP4 or WebM is decoded here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoInput {
    /// The frames, in time order.
    pub frames: Vec<ImageInput>,
    /// Frames per second (Qwen2.5-Omni's processor assumes 2).
    pub fps: f64,
}

/// The most frames a video may have (transformers' `max_frames`).
pub const MAX_VIDEO_FRAMES: usize = 768;

/// The most pixels all frames of a video may have together (about 400 MB of
/// RGB): frames beyond the processor's own bounds are scaled down anyway.
pub const MAX_VIDEO_PIXELS: u64 = 128 << 20;

/// Frame rates taken: from a frame every ten seconds to 240 a second.
pub const VIDEO_FPS: std::ops::RangeInclusive<f64> = 0.1..=240.0;

impl VideoInput {
    /// A video of `frames` at `fps`; errors when it has none, too many,
    /// frames of different sizes, or a rate that is not positive.
    pub fn new(frames: Vec<ImageInput>, fps: f64) -> Result<Self> {
        let video = Self { frames, fps };
        video.check("video")?;
        Ok(video)
    }

    /// That the frames exist, agree in size and are within limits.
    pub fn check(&self, name: &str) -> Result<()> {
        if !VIDEO_FPS.contains(&self.fps) {
            return Err(media_error(
                name,
                format!(
                    "fps {} is outside {}..={}",
                    self.fps,
                    VIDEO_FPS.start(),
                    VIDEO_FPS.end()
                ),
            ));
        }
        let Some(first) = self.frames.first() else {
            return Err(media_error(name, "the video has no frames"));
        };
        if self.frames.len() > MAX_VIDEO_FRAMES {
            return Err(media_error(
                name,
                format!(
                    "{} frames; at most {MAX_VIDEO_FRAMES} are taken",
                    self.frames.len()
                ),
            ));
        }
        let pixels = u64::from(first.width) * u64::from(first.height) * self.frames.len() as u64;
        if pixels > MAX_VIDEO_PIXELS {
            return Err(media_error(
                name,
                format!("{pixels} pixels in all frames; at most {MAX_VIDEO_PIXELS} are taken"),
            ));
        }
        for (i, f) in self.frames.iter().enumerate() {
            f.check(&format!("{name} frame {i}"))?;
            if (f.width, f.height) != (first.width, first.height) {
                return Err(media_error(
                    name,
                    format!(
                        "frame {i} is {} x {}, frame 0 {} x {}: all frames must be one size",
                        f.width, f.height, first.width, first.height
                    ),
                ));
            }
        }
        Ok(())
    }

    /// An animated GIF's frames as a video, `fps` from its first frame's
    /// delay (2 when it states none; later delays are not looked at): the
    /// one video container decoded here (no pure-Rust MP4/WebM decoder
    /// fits). `name` names it in errors.
    pub fn decode_gif(bytes: &[u8], name: &str) -> Result<Self> {
        use image::AnimationDecoder as _;
        use image::ImageDecoder as _;
        let mut decoder = image::codecs::gif::GifDecoder::new(std::io::Cursor::new(bytes))
            .map_err(|e| media_error(name, format!("not a GIF: {e}")))?;
        let (w, h) = decoder.dimensions();
        if u64::from(w) * u64::from(h) > MAX_IMAGE_PIXELS {
            return Err(media_error(
                name,
                format!("{w} x {h} frames; at most {MAX_IMAGE_PIXELS} pixels a frame are taken"),
            ));
        }
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(MAX_IMAGE_PIXELS * 4 * 2);
        decoder
            .set_limits(limits)
            .map_err(|e| media_error(name, format!("too large: {e}")))?;
        let mut frames = Vec::new();
        let mut delay_ms = None;
        for frame in decoder.into_frames() {
            let frame =
                frame.map_err(|e| media_error(name, format!("truncated or corrupt: {e}")))?;
            if frames.len() == MAX_VIDEO_FRAMES
                || (frames.len() as u64 + 1) * u64::from(w) * u64::from(h) > MAX_VIDEO_PIXELS
            {
                return Err(media_error(
                    name,
                    format!(
                        "more than {MAX_VIDEO_FRAMES} frames or {MAX_VIDEO_PIXELS} pixels in all"
                    ),
                ));
            }
            let (num, den) = frame.delay().numer_denom_ms();
            delay_ms.get_or_insert(f64::from(num) / f64::from(den.max(1)));
            let rgba = frame.into_buffer();
            let (w, h) = (rgba.width(), rgba.height());
            let rgb: Vec<u8> = rgba
                .into_raw()
                .chunks_exact(4)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect();
            frames.push(ImageInput::new(w, h, rgb)?);
        }
        let fps = match delay_ms {
            Some(ms) if ms > 0.0 => 1000.0 / ms,
            _ => 2.0,
        };
        let video = Self { frames, fps };
        video.check(name)?;
        Ok(video)
    }

    /// The image files of a folder, in file-name order, as the frames of a
    /// video at `fps` (files that are not PNG, JPEG, WebP, GIF or BMP by
    /// their extension are passed over).
    pub fn read_dir(dir: &Path, fps: f64) -> Result<Self> {
        let io = |e: std::io::Error| Error::Io {
            path: dir.to_path_buf(),
            cause: e,
        };
        let mut paths: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .map_err(io)?;
        paths.retain(|p| {
            p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                ["png", "jpg", "jpeg", "webp", "gif", "bmp"]
                    .contains(&e.to_ascii_lowercase().as_str())
            })
        });
        paths.sort();
        let name = dir.display().to_string();
        if paths.len() > MAX_VIDEO_FRAMES {
            return Err(media_error(
                &name,
                format!(
                    "{} frames; at most {MAX_VIDEO_FRAMES} are taken",
                    paths.len()
                ),
            ));
        }
        let frames = paths
            .iter()
            .map(|p| ImageInput::read(p))
            .collect::<Result<Vec<_>>>()?;
        let video = Self { frames, fps };
        video.check(&name)?;
        Ok(video)
    }
}

/// The most pixels a decoded image may have (the processor scales larger
/// ones down to its `max_pixels` anyway; this bounds the decoder's memory).
pub const MAX_IMAGE_PIXELS: u64 = 64 << 20;

/// One audio clip: mono samples in `[-1, 1]` at `sample_rate` Hz (vLLM's
/// `(array, sampling_rate)` pair).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioInput {
    /// Mono samples.
    pub samples: Vec<f32>,
    /// Samples per second.
    pub sample_rate: u32,
}

impl AudioInput {
    /// Mono `samples` at `sample_rate` Hz.
    pub fn new(samples: Vec<f32>, sample_rate: u32) -> Self {
        Self {
            samples,
            sample_rate,
        }
    }

    /// Length in seconds.
    pub fn duration_secs(&self) -> f64 {
        self.samples.len() as f64 / f64::from(self.sample_rate.max(1))
    }

    /// Decodes an audio file's bytes (WAV, FLAC, MP3, Ogg Vorbis); `name`
    /// names the input in errors (a path, `input_audio[0]`, ...).
    pub fn decode(bytes: &[u8], name: &str) -> Result<Self> {
        decode_audio(bytes.to_vec(), name)
    }

    /// Reads and decodes an audio file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            cause: e,
        })?;
        decode_audio(bytes, &path.display().to_string())
    }
}

/// The longest audio decoded, seconds (at most 48 kHz's worth of samples):
/// twice Qwen2.5-Omni's longest clip, so a model's own limit names the
/// problem; it bounds what a compressed file may expand to.
pub const MAX_AUDIO_SECONDS: u64 = 600;

/// Sample rates taken, Hz.
pub const AUDIO_RATES: std::ops::RangeInclusive<u32> = 1_000..=384_000;

fn check_rate(rate: u32, name: &str) -> Result<()> {
    if !AUDIO_RATES.contains(&rate) {
        return Err(media_error(
            name,
            format!(
                "sample rate {rate} Hz is outside {}..={} Hz",
                AUDIO_RATES.start(),
                AUDIO_RATES.end()
            ),
        ));
    }
    Ok(())
}

fn media_error(input: &str, reason: impl Into<String>) -> Error {
    Error::Media {
        input: input.to_owned(),
        reason: reason.into(),
    }
}

fn decode_audio(bytes: Vec<u8>, name: &str) -> Result<AudioInput> {
    if bytes.is_empty() {
        return Err(media_error(name, "the audio is empty (0 bytes)"));
    }
    // symphonia 0.5's WAV reader panics on a format chunk that states 0 Hz
    // (it builds a time base of 1/0); its other readers check the rate.
    if wav_states_zero_rate(&bytes) {
        check_rate(0, name)?;
    }
    // Any other panic in a decoder is still an error about this input, not
    // the end of the request's thread (where unwinding is on).
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_audio_unchecked(bytes, name)
    }))
    .unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(media_error(
            name,
            format!("the audio decoder failed on it: {why}"),
        ))
    })
}

/// Where symphonia's probe stops looking for a format's start (its
/// `PROBE_SEARCH_LIMIT`), plus its 16-byte window.
const PROBE_SEARCH_LIMIT: usize = (1 << 20) + 16;

/// The most chunks [`wav_states_zero_rate`] walks in all: a crafted input of
/// many RIFF headers would otherwise cost time quadratic in its size. Past
/// it the scan stops (decoding still runs under `catch_unwind`).
const MAX_CHUNK_STEPS: usize = 1 << 20;

/// Whether a format chunk states 0 Hz in a RIFF/WAVE header that
/// symphonia's probe may take (any that starts within its search limit: it
/// looks past leading junk and metadata), walking each header's chunks as
/// symphonia does (padded to even lengths) up to its data chunk.
fn wav_states_zero_rate(bytes: &[u8]) -> bool {
    let word = |at: usize| -> Option<u32> {
        let b = bytes.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    // The rate of the format chunk at or after `*at`, or None at the data
    // chunk or the end; `*at` moves past the chunk read.
    let next_rate = |riff: usize, at: &mut usize| -> Option<Option<u32>> {
        *at = at.checked_add((*at - riff) & 1)?;
        let tag = bytes.get(*at..at.checked_add(4)?)?;
        let len = word(at.checked_add(4)?)? as usize;
        let body = at.checked_add(8)?;
        *at = body.checked_add(len)?;
        match tag {
            b"data" => None,
            b"fmt " if len >= 16 => Some(word(body.checked_add(4)?)),
            _ => Some(None),
        }
    };
    let searched = &bytes[..bytes.len().min(PROBE_SEARCH_LIMIT + 12)];
    let headers = searched
        .windows(12)
        .enumerate()
        .filter(|(at, w)| *at <= PROBE_SEARCH_LIMIT && &w[..4] == b"RIFF" && &w[8..] == b"WAVE");
    let mut steps = 0;
    for (riff, _) in headers {
        let mut at = riff + 12;
        while let Some(rate) = next_rate(riff, &mut at) {
            steps += 1;
            if steps > MAX_CHUNK_STEPS {
                return false;
            }
            if rate == Some(0) {
                return true;
            }
        }
    }
    false
}

fn decode_audio_unchecked(bytes: Vec<u8>, name: &str) -> Result<AudioInput> {
    use symphonia::core::audio::SampleBuffer;
    use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
    use symphonia::core::errors::Error as SymError;
    use symphonia::core::formats::FormatOptions;
    use symphonia::core::io::MediaSourceStream;
    use symphonia::core::meta::MetadataOptions;
    use symphonia::core::probe::Hint;

    let stream = MediaSourceStream::new(Box::new(std::io::Cursor::new(bytes)), Default::default());
    let probed = symphonia::default::get_probe()
        .format(
            &Hint::new(),
            stream,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| {
            media_error(
                name,
                format!("not an audio file this build reads (WAV, FLAC, MP3, Ogg Vorbis): {e}"),
            )
        })?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| media_error(name, "the file holds no audio track"))?;
    let track_id = track.id;
    let rate = track
        .codec_params
        .sample_rate
        .ok_or_else(|| media_error(name, "the audio track states no sample rate"))?;
    check_rate(rate, name)?;
    let cap = MAX_AUDIO_SECONDS * u64::from(rate.min(48_000));
    if track.codec_params.n_frames.is_some_and(|n| n > cap) {
        return Err(media_error(
            name,
            format!("longer than {cap} samples ({MAX_AUDIO_SECONDS} s at up to 48 kHz)"),
        ));
    }
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| media_error(name, format!("cannot decode its audio: {e}")))?;
    let mut samples = Vec::new();
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(media_error(name, format!("truncated or corrupt: {e}"))),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            // A damaged packet is skipped, as players do; a file of nothing
            // but damage ends with no samples below.
            Err(SymError::DecodeError(_)) => continue,
            Err(e) => return Err(media_error(name, format!("truncated or corrupt: {e}"))),
        };
        let spec = *decoded.spec();
        let channels = spec.channels.count().max(1);
        let mut buf = SampleBuffer::<f32>::new(decoded.capacity() as u64, spec);
        buf.copy_interleaved_ref(decoded);
        samples.extend(
            buf.samples()
                .chunks_exact(channels)
                .map(|frame| frame.iter().sum::<f32>() / channels as f32),
        );
        // A header can understate the length: stop at the cap while decoding.
        if samples.len() as u64 > cap {
            return Err(media_error(
                name,
                format!("longer than {cap} samples ({MAX_AUDIO_SECONDS} s at up to 48 kHz)"),
            ));
        }
    }
    if samples.is_empty() {
        return Err(media_error(name, "the file decodes to no samples"));
    }
    Ok(AudioInput::new(samples, rate))
}

/// transformers' `WhisperFeatureExtractor`, as a model's
/// `preprocessor_config.json` sets it: log-mel features of 16 kHz audio.
#[derive(Debug)]
pub struct WhisperFeatureExtractor {
    mel: MelConfig,
    /// `[feature_size, n_fft / 2 + 1]`.
    filters: Tensor,
    /// Longest clip, seconds (`chunk_length`; transformers cuts longer ones
    /// off, we refuse them).
    chunk_length: u32,
}

#[derive(Debug, Deserialize)]
struct PreprocessorConfig {
    #[serde(default)]
    feature_size: Option<i64>,
    #[serde(default = "d_rate")]
    sampling_rate: u32,
    #[serde(default = "d_hop")]
    hop_length: i64,
    #[serde(default = "d_n_fft")]
    n_fft: i64,
    #[serde(default = "d_chunk")]
    chunk_length: u32,
    #[serde(default)]
    dither: f64,
}

fn d_rate() -> u32 {
    16_000
}
fn d_hop() -> i64 {
    160
}
fn d_n_fft() -> i64 {
    400
}
fn d_chunk() -> u32 {
    30
}

impl WhisperFeatureExtractor {
    /// The extractor `dir/preprocessor_config.json` describes (Whisper's
    /// defaults where it is missing), with `num_mel_bins` from the model's
    /// config when the file does not state `feature_size`.
    pub fn from_dir(dir: &Path, num_mel_bins: i64) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let cfg: PreprocessorConfig = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| Error::ModelConfig {
                path: path.clone(),
                field: "preprocessor_config".to_owned(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::from_str("{}")
                .map_err(|e| Error::ModelConfig {
                    path: path.clone(),
                    field: "preprocessor_config".to_owned(),
                    reason: e.to_string(),
                })?,
            Err(e) => return Err(Error::Io { path, cause: e }),
        };
        let bad = |field: &str, reason: &str| Error::ModelConfig {
            path: path.clone(),
            field: field.to_owned(),
            reason: reason.to_owned(),
        };
        if cfg.dither != 0.0 {
            return Err(bad(
                "dither",
                "dithering draws noise; only 0.0 is supported",
            ));
        }
        if cfg.n_fft < 2 || cfg.hop_length < 1 || cfg.sampling_rate == 0 || cfg.chunk_length == 0 {
            return Err(bad(
                "n_fft/hop_length/sampling_rate/chunk_length",
                "must be positive",
            ));
        }
        let feature_size = cfg.feature_size.unwrap_or(num_mel_bins);
        if feature_size != num_mel_bins {
            return Err(bad(
                "feature_size",
                &format!("{feature_size} mel bins, but the audio encoder reads {num_mel_bins}"),
            ));
        }
        let mel = MelConfig {
            sample_rate: cfg.sampling_rate,
            n_fft: cfg.n_fft,
            win_length: cfg.n_fft,
            hop_length: cfg.hop_length,
            n_mels: feature_size,
            f_min: 0.0,
            f_max: 8_000.0,
            floor: 1e-10,
        };
        Ok(Self {
            filters: mel.filterbank()?,
            mel,
            chunk_length: cfg.chunk_length,
        })
    }

    /// The rate the features are computed at; other rates are resampled.
    pub fn sample_rate(&self) -> u32 {
        self.mel.sample_rate
    }

    /// The longest clip taken, seconds.
    pub fn max_seconds(&self) -> u32 {
        self.chunk_length
    }

    /// Mel bins per frame.
    pub fn feature_size(&self) -> i64 {
        self.mel.n_mels
    }

    /// Feature frames `audio` will have (what the processor's attention mask
    /// keeps), before computing them.
    pub fn frames_for(&self, audio: &AudioInput) -> i64 {
        let n =
            crate::mel::resampled_len(audio.samples.len(), audio.sample_rate, self.mel.sample_rate);
        (n as i64 + self.mel.hop_length - 1) / self.mel.hop_length
    }

    /// That `audio` is a clip this extractor takes: a sample rate in
    /// [`AUDIO_RATES`], at most `chunk_length` seconds, finite samples, and
    /// at least the three feature frames the encoder needs.
    pub fn check(&self, audio: &AudioInput, name: &str) -> Result<()> {
        check_rate(audio.sample_rate, name)?;
        // A rate sharing no large divisor with ours needs a filter table per
        // phase: past ~64 MB of it, ask for the clip at a common rate.
        const MAX_TAPS: u64 = 8 << 20;
        if crate::mel::resample_table_len(audio.sample_rate, self.mel.sample_rate) > MAX_TAPS {
            return Err(media_error(
                name,
                format!(
                    "sample rate {} Hz is too far from a multiple of {} Hz to resample here; \
                     resample the clip to a common rate (e.g. 16 or 48 kHz) first",
                    audio.sample_rate, self.mel.sample_rate
                ),
            ));
        }
        let limit = u64::from(self.chunk_length);
        if audio.duration_secs() > limit as f64 {
            return Err(media_error(
                name,
                format!(
                    "{:.2} s of audio; this model takes at most {limit} s a clip \
                     (chunk_length of its preprocessor_config.json)",
                    audio.duration_secs()
                ),
            ));
        }
        if let Some(i) = audio.samples.iter().position(|s| !s.is_finite()) {
            return Err(media_error(
                name,
                format!("sample {i} is not a finite number"),
            ));
        }
        if self.frames_for(audio) < 3 {
            let hop = self.mel.hop_length;
            return Err(media_error(
                name,
                format!(
                    "{} samples at {} Hz ({:.4} s) is too short: the audio encoder needs at \
                     least {:.4} s",
                    audio.samples.len(),
                    audio.sample_rate,
                    audio.duration_secs(),
                    (2 * hop + 1) as f64 / f64::from(self.mel.sample_rate)
                ),
            ));
        }
        Ok(())
    }

    /// `[feature_size, frames]`: the features of the clip's valid frames
    /// (transformers pads every clip to `chunk_length` seconds and returns a
    /// `feature_attention_mask`; these are the frames the mask keeps, with
    /// the same values). `name` names the input in errors.
    pub fn extract(&self, audio: &AudioInput, name: &str) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.check(audio, name)?;
        let rate = self.mel.sample_rate;
        let samples = if audio.sample_rate == rate {
            audio.samples.clone()
        } else {
            crate::mel::resample(&audio.samples, audio.sample_rate, rate)
        };
        let (n_fft, hop) = (self.mel.n_fft, self.mel.hop_length);
        let n = samples.len() as i64;
        // Frames the processor's attention mask keeps: one per hop started
        // (at least 3: `check` saw to it).
        let frames = (n + hop - 1) / hop;
        // transformers pads to `chunk_length` seconds with zeros before its
        // centred STFT. Zeros one window past the end give the same frames
        // (the reflection at the end then mirrors zeros), and every frame
        // further on is silence, which never raises the maximum below.
        let padded_len = (n + n_fft).min(i64::from(self.chunk_length) * i64::from(rate));
        let padded_len = padded_len.max(n);
        let mut x = samples;
        x.resize(padded_len as usize, 0.0);
        // torch.stft(center=True) reflect-pads n_fft / 2 on both sides; tch
        // cannot ask for centring (it always sends align_to_window), so the
        // padding is done here, as stft does it.
        let half = n_fft / 2;
        let x = Tensor::from_slice(&x)
            .f_view([1, 1, padded_len])?
            .f_reflection_pad1d([half, half])?
            .f_view([-1])?;
        let window = Tensor::f_hann_window(n_fft, (Kind::Float, Device::Cpu))?;
        let spec = x.f_stft_center(
            n_fft,
            Some(hop),
            None::<i64>,
            Some(&window),
            false,
            "reflect",
            false,
            true,
            true,
            false,
        )?;
        let total = spec.size()[1];
        let magnitudes = spec
            .f_narrow(1, 0, total - 1)?
            .f_abs()?
            .f_pow_tensor_scalar(2)?
            .f_contiguous()?;
        let log_spec = self
            .filters
            .f_matmul(&magnitudes)?
            .f_clamp_min(1e-10)?
            .f_log10()?;
        let max = log_spec.f_max()?.double_value(&[]);
        let log_spec = log_spec.f_clamp_min(max - 8.0)?;
        let features = log_spec.f_add_scalar(4.0)?.f_div_scalar(4.0)?;
        Ok(features.f_narrow(1, 0, frames.min(total - 1))?)
    }
}

/// transformers' `Qwen2VLImageProcessor` (its torchvision backend, which
/// transformers 5 picks): resize so both sides are multiples of
/// `patch_size * merge_size` within `[min_pixels, max_pixels]` (bicubic,
/// antialiased, rounded back to 8 bits), rescale and normalise, and lay the
/// patches out merge-group-major with the frame repeated
/// `temporal_patch_size` times.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    min_pixels: u64,
    max_pixels: u64,
    patch_size: i64,
    merge_size: i64,
    temporal_patch_size: i64,
    mean: [f64; 3],
    std: [f64; 3],
    rescale: f64,
}

#[derive(Debug, Deserialize)]
struct ImageProcessorConfig {
    #[serde(default)]
    min_pixels: Option<u64>,
    #[serde(default)]
    max_pixels: Option<u64>,
    #[serde(default)]
    size: Option<serde_json::Value>,
    #[serde(default = "d_patch")]
    patch_size: i64,
    #[serde(default = "d_merge")]
    merge_size: i64,
    #[serde(default = "d_temporal")]
    temporal_patch_size: i64,
    #[serde(default = "d_mean")]
    image_mean: [f64; 3],
    #[serde(default = "d_std")]
    image_std: [f64; 3],
    #[serde(default = "d_rescale")]
    rescale_factor: f64,
}

fn d_patch() -> i64 {
    14
}
fn d_merge() -> i64 {
    2
}
fn d_temporal() -> i64 {
    2
}
fn d_mean() -> [f64; 3] {
    [0.48145466, 0.4578275, 0.40821073]
}
fn d_std() -> [f64; 3] {
    [0.26862954, 0.26130258, 0.27577711]
}
fn d_rescale() -> f64 {
    1.0 / 255.0
}

/// Qwen2.5-Omni's processor bounds video frames by these pixel counts
/// (its `videos_kwargs`, not `preprocessor_config.json`).
pub const VIDEO_MIN_PIXELS: u64 = 128 * 28 * 28;
/// See [`VIDEO_MIN_PIXELS`].
pub const VIDEO_MAX_PIXELS: u64 = 768 * 28 * 28;

/// One image as the vision encoder reads it.
#[derive(Debug)]
pub struct ImagePatches {
    /// `[t * h * w, channels * temporal_patch_size * patch_size²]`.
    pub pixel_values: Tensor,
    /// Patches along time, height and width.
    pub grid: [i64; 3],
}

impl ImageProcessor {
    /// The processor `dir/preprocessor_config.json` describes
    /// (transformers' defaults where it is silent).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "{}".to_owned(),
            Err(e) => return Err(Error::Io { path, cause: e }),
        };
        let bad = |field: &str, reason: String| Error::ModelConfig {
            path: path.clone(),
            field: field.to_owned(),
            reason,
        };
        let cfg: ImageProcessorConfig =
            serde_json::from_str(&text).map_err(|e| bad("preprocessor_config", e.to_string()))?;
        let size = |key: &str| {
            cfg.size
                .as_ref()
                .and_then(|s| s.get(key))
                .and_then(serde_json::Value::as_u64)
        };
        let min_pixels = cfg.min_pixels.or(size("shortest_edge")).unwrap_or(56 * 56);
        let max_pixels = cfg
            .max_pixels
            .or(size("longest_edge"))
            .unwrap_or(28 * 28 * 1280);
        if cfg.patch_size < 1 || cfg.merge_size < 1 || cfg.temporal_patch_size < 1 {
            return Err(bad(
                "patch_size/merge_size/temporal_patch_size",
                "must be positive".to_owned(),
            ));
        }
        if min_pixels == 0 || min_pixels > max_pixels {
            return Err(bad(
                "min_pixels",
                format!("{min_pixels}: must be at least 1 and at most max_pixels {max_pixels}"),
            ));
        }
        Ok(Self {
            min_pixels,
            max_pixels,
            patch_size: cfg.patch_size,
            merge_size: cfg.merge_size,
            temporal_patch_size: cfg.temporal_patch_size,
            mean: cfg.image_mean,
            std: cfg.image_std,
            rescale: cfg.rescale_factor,
        })
    }

    /// transformers' `smart_resize`: the size an image of `height x width`
    /// is resized to.
    pub fn target_size(&self, height: u32, width: u32, name: &str) -> Result<(i64, i64)> {
        self.smart_resize(height, width, self.min_pixels, self.max_pixels, name)
    }

    /// `smart_resize` within `[min_pixels, max_pixels]`.
    fn smart_resize(
        &self,
        height: u32,
        width: u32,
        min_pixels: u64,
        max_pixels: u64,
        name: &str,
    ) -> Result<(i64, i64)> {
        let (h, w) = (f64::from(height), f64::from(width));
        if h.max(w) / h.min(w) > 200.0 {
            return Err(media_error(
                name,
                format!("{width} x {height}: the aspect ratio must be below 200"),
            ));
        }
        let factor = (self.patch_size * self.merge_size) as f64;
        // Python's round() rounds halves to even.
        let round = |x: f64| -> f64 { x.round_ties_even() };
        let (mut hb, mut wb) = (round(h / factor) * factor, round(w / factor) * factor);
        let (min, max) = (min_pixels as f64, max_pixels as f64);
        if hb * wb > max {
            let beta = (h * w / max).sqrt();
            hb = factor.max((h / beta / factor).floor() * factor);
            wb = factor.max((w / beta / factor).floor() * factor);
        } else if hb * wb < min {
            let beta = (min / (h * w)).sqrt();
            hb = (h * beta / factor).ceil() * factor;
            wb = (w * beta / factor).ceil() * factor;
        }
        Ok((hb as i64, wb as i64))
    }

    /// Patches per merged row (the vision encoder's output rows per
    /// `merge_size`² patches).
    pub fn merge_unit(&self) -> i64 {
        self.merge_size * self.merge_size
    }

    /// The patch grid `(t, h, w)` of `image`, before computing it.
    pub fn grid_for(&self, image: &ImageInput, name: &str) -> Result<[i64; 3]> {
        let (th, tw) = self.target_size(image.height, image.width, name)?;
        Ok([1, th / self.patch_size, tw / self.patch_size])
    }

    /// The patch grid `(t, h, w)` of `video`, before computing it.
    pub fn video_grid_for(&self, video: &VideoInput, name: &str) -> Result<[i64; 3]> {
        video.check(name)?;
        let f = &video.frames[0];
        let (th, tw) =
            self.smart_resize(f.height, f.width, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS, name)?;
        let t =
            (video.frames.len() as i64 + self.temporal_patch_size - 1) / self.temporal_patch_size;
        Ok([t, th / self.patch_size, tw / self.patch_size])
    }

    /// Seconds one temporal patch of `video` spans (transformers'
    /// `video_second_per_grid`).
    pub fn second_per_grid(&self, video: &VideoInput) -> f64 {
        self.temporal_patch_size as f64 / video.fps
    }

    /// The patches of `video` (transformers' `Qwen2VLVideoProcessor` as
    /// `Qwen2_5OmniProcessor` calls it: frames resized within its own pixel
    /// bounds, the last frame repeated to fill a temporal patch); `name`
    /// names it in errors.
    pub fn process_video(&self, video: &VideoInput, name: &str) -> Result<ImagePatches> {
        let _guard = tch::no_grad_guard();
        let [gt, gh, gw] = self.video_grid_for(video, name)?;
        let f0 = &video.frames[0];
        let (h, w) = (i64::from(f0.height), i64::from(f0.width));
        let (p, m, tp) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (th, tw) = (gh * p, gw * p);
        let frames: Vec<Tensor> = video
            .frames
            .iter()
            .map(|f| Tensor::from_slice(&f.rgb).f_view([h, w, 3]))
            .collect::<std::result::Result<_, _>>()?;
        // transformers reshapes the frames to one contiguous [T, C, H, W]
        // batch before the 8-bit resize (a copy, unlike a single image's
        // channels-last view).
        let x = Tensor::f_stack(&frames, 0)?
            .f_permute([0, 3, 1, 2])?
            .f_contiguous()?;
        let x = if (th, tw) == (h, w) {
            x
        } else {
            x.f_internal_upsample_bicubic2d_aa([th, tw], false, None, None)?
        };
        let x = self.normalize(&x.f_to_kind(Kind::Float)?)?;
        let t = x.size()[0];
        let x = if t % tp == 0 {
            x
        } else {
            let last = x
                .f_narrow(0, t - 1, 1)?
                .f_expand([tp - t % tp, -1, -1, -1], false)?;
            Tensor::f_cat(&[x, last], 0)?
        };
        let patches = x
            .f_reshape([1, gt, tp, 3, gh / m, m, p, gw / m, m, p])?
            .f_permute([0, 1, 4, 7, 5, 8, 3, 2, 6, 9])?
            .f_reshape([gt * gh * gw, 3 * tp * p * p])?;
        Ok(ImagePatches {
            pixel_values: patches,
            grid: [gt, gh, gw],
        })
    }

    /// Rescale and normalise fused, as transformers does:
    /// `(x - mean / rescale) / (std / rescale)` on `[n, 3, h, w]` f32.
    fn normalize(&self, x: &Tensor) -> Result<Tensor> {
        let per_channel = |v: [f64; 3]| -> Result<Tensor> {
            let t = Tensor::from_slice(&v.map(|c| c as f32)).f_mul_scalar(1.0 / self.rescale)?;
            Ok(t.f_view([1, 3, 1, 1])?)
        };
        Ok(x.f_sub(&per_channel(self.mean)?)?
            .f_div(&per_channel(self.std)?)?)
    }

    /// The patches of `image`; `name` names it in errors.
    pub fn process(&self, image: &ImageInput, name: &str) -> Result<ImagePatches> {
        let _guard = tch::no_grad_guard();
        image.check(name)?;
        let (h, w) = (i64::from(image.height), i64::from(image.width));
        let (th, tw) = self.target_size(image.height, image.width, name)?;
        // torchvision resizes 8-bit pixels natively on the CPU (libtorch's
        // integer antialiasing kernel), on the channels-last view of the
        // decoded rows, as here; on other devices it goes through f32 and
        // rounds back, so the resize runs on the CPU wherever the model is.
        let x = Tensor::from_slice(&image.rgb)
            .f_view([h, w, 3])?
            .f_permute([2, 0, 1])?
            .f_unsqueeze(0)?;
        let x = if (th, tw) == (h, w) {
            x
        } else {
            x.f_internal_upsample_bicubic2d_aa([th, tw], false, None, None)?
        };
        let x = self.normalize(&x.f_to_kind(Kind::Float)?)?;
        let (p, m, tp) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (gh, gw) = (th / p, tw / p);
        let patches = x
            .f_reshape([1, 3, gh / m, m, p, gw / m, m, p])?
            .f_permute([0, 2, 5, 3, 6, 1, 4, 7])?
            .f_unsqueeze(6)?
            .f_expand([-1, -1, -1, -1, -1, -1, tp, -1, -1], false)?
            .f_reshape([gh * gw, 3 * tp * p * p])?;
        Ok(ImagePatches {
            pixel_values: patches,
            grid: [1, gh, gw],
        })
    }
}
