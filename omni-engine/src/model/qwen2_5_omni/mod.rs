//! Qwen2.5-Omni (Qwen Team, "Qwen2.5-Omni Technical Report", 2025): a
//! thinker (a Qwen2 decoder) writes the answer, a talker (a second decoder
//! fed with the thinker's states) turns it into codec ids, and code2wav (a
//! flow-matching DiT and a BigVGAN vocoder) turns those into a waveform.
//! One Hugging Face folder holds all three (`config.json` with
//! `thinker_config`, `talker_config`, `token2wav_config`; safetensors under
//! `thinker.`, `talker.`, `token2wav.`; the voices in `spk_dict.pt`), and
//! each stage of the `qwen2_5_omni` pipeline loads its part of it.
//!
//! Reference: transformers' `models/qwen2_5_omni/modeling_qwen2_5_omni.py`.
mod audio_encoder;
mod bigvgan;
mod chunked;
mod config;
mod dit;
mod layers;
mod speakers;
mod thinker_media;
mod vision_encoder;

use std::path::Path;

use tch::{Device, Kind, Tensor};

pub use audio_encoder::{AudioEncoder, AudioEncoderConfig};
pub use bigvgan::BigVgan;
pub use chunked::{ChunkPlan, CodeStream, VOCODER_CONTEXT};
pub use config::{BigVganConfig, DitConfig, OmniConfig, TalkerConfig, Token2WavConfig};
pub use dit::{Dit, DitInput, SampleOptions};
pub use speakers::{Speaker, Speakers, DEFAULT_SPEAKER};
pub use thinker_media::{ExpandedPrompt, ThinkerMedia};
pub use vision_encoder::{VisionEncoder, VisionEncoderConfig};

use crate::error::{Error, Result};
use crate::safetensors::SafetensorsFiles;

/// Qwen2.5-Omni speaks at 24 kHz (100 mel frames a second, 240 samples a
/// frame with the released vocoder); the config does not state it.
pub const SAMPLE_RATE: u32 = 24_000;

/// code2wav: codec ids and a voice in, a waveform out.
#[derive(Debug)]
pub struct Token2Wav {
    name: String,
    dit: Dit,
    bigvgan: BigVgan,
    speakers: Speakers,
    /// The talker's codec begin / end / pad ids, which frame its output.
    codec_bos: i64,
    codec_stops: [i64; 2],
    device: Device,
}

impl Token2Wav {
    /// Loads code2wav and the voices from a Qwen2.5-Omni folder onto
    /// `device` (always f32, as transformers runs it).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let config = OmniConfig::read(dir)?;
        let t2w = &config.token2wav_config;
        let speakers = Speakers::load(
            &dir.join("spk_dict.pt"),
            t2w.dit_config.enc_emb_dim,
            t2w.dit_config.mel_dim,
        )?;
        let files = SafetensorsFiles::find(dir)?;
        let mut dit_w = files.load_prefix("token2wav.code2wav_dit_model.", Kind::Float, device)?;
        let mut voc_w =
            files.load_prefix("token2wav.code2wav_bigvgan_model.", Kind::Float, device)?;
        if dit_w.is_empty() || voc_w.is_empty() {
            return Err(Error::Weight {
                name: "token2wav.*".to_owned(),
                reason: format!(
                    "{} holds no code2wav weights (token2wav.code2wav_dit_model.*, \
                     token2wav.code2wav_bigvgan_model.*)",
                    dir.display()
                ),
            });
        }
        let dit = Dit::load(&mut dit_w, &t2w.dit_config, device)?;
        let bigvgan = BigVgan::load(&mut voc_w, &t2w.bigvgan_config, device)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "qwen2_5_omni".to_owned());
        let talker = &config.talker_config;
        Ok(Token2Wav {
            name,
            dit,
            bigvgan,
            speakers,
            codec_bos: talker.tts_codec_start_token_id,
            codec_stops: [talker.tts_codec_end_token_id, talker.tts_codec_pad_token_id],
            device,
        })
    }

    /// The model folder's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it runs.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The voices.
    pub fn speakers(&self) -> &Speakers {
        &self.speakers
    }

    /// The DiT.
    pub fn dit(&self) -> &Dit {
        &self.dit
    }

    /// The vocoder.
    pub fn bigvgan(&self) -> &BigVgan {
        &self.bigvgan
    }

    /// Whether `codes` codes fit the DiT (its `max_position_embeddings` mel
    /// frames); the reason when they do not.
    pub fn check_length(&self, codes: usize) -> std::result::Result<(), String> {
        let frames = codes as i64 * self.dit.repeats();
        let limit = self.dit.max_frames();
        if frames > limit {
            return Err(format!(
                "{codes} codes make {frames} mel frames; code2wav takes at most {limit} \
                 (dit_config.max_position_embeddings)"
            ));
        }
        Ok(())
    }

    /// The codes of a talker's output: without a leading codec BOS and
    /// from the first codec end (or pad, an end in transformers' `generate`)
    /// on.
    pub fn codes_of_talker_output<'a>(&self, ids: &'a [i64]) -> &'a [i64] {
        let ids = ids.strip_prefix(&[self.codec_bos]).unwrap_or(ids);
        let end = ids
            .iter()
            .position(|c| self.codec_stops.contains(c))
            .unwrap_or(ids.len());
        &ids[..end]
    }

    /// The waveform (`[samples]`, f32, CPU) of `codes` in the voice
    /// `speaker` (default: [`DEFAULT_SPEAKER`]). The initial noise is
    /// libtorch's CPU generator seeded with `seed`, drawn as transformers
    /// draws it (`torch.manual_seed(seed); torch.randn([1, frames, mel])`),
    /// so a seeded run equals transformers' sample by sample, on any device.
    pub fn synthesize(&self, codes: &[i64], speaker: Option<&str>, seed: u64) -> Result<Tensor> {
        let voice = self.speakers.get(speaker)?;
        let limit = self.dit.num_codes();
        if let Some(bad) = codes.iter().find(|&&c| c < 0 || c >= limit) {
            return Err(Error::InvalidConfig {
                field: "codec id".to_owned(),
                value: bad.to_string(),
                reason: format!("outside the codec vocabulary 0..{limit} of code2wav"),
            });
        }
        if codes.is_empty() {
            return Ok(Tensor::zeros([0], (Kind::Float, Device::Cpu)));
        }
        let frames = codes.len() as i64 * self.dit.repeats();
        let noise = seeded_noise(seed, frames, self.dit.mel_dim());
        let mel = self.dit.sample(
            &Tensor::from_slice(codes),
            &voice.cond,
            &voice.ref_mel,
            &noise,
            SampleOptions::default(),
        )?;
        Ok(self.bigvgan.forward(&mel).to_device(Device::Cpu))
    }
}

/// `[1, frames, mel_dim]` standard normal noise from libtorch's CPU
/// generator seeded with `seed`, as transformers draws it
/// (`torch.manual_seed(seed); torch.randn(...)`): seeding and drawing under
/// one lock, so another thread of this process cannot draw in between.
fn seeded_noise(seed: u64, frames: i64, mel_dim: i64) -> Tensor {
    static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _lock = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed as i64);
    Tensor::randn([1, frames, mel_dim], (Kind::Float, Device::Cpu))
}
