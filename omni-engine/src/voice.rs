//! A Piper voice as it ships: `<name>.onnx` (the VITS model) and
//! `<name>.onnx.json` beside it (sample rate, espeak-ng voice,
//! `phoneme_id_map`, default inference scales).
//!
//! Text is spoken sentence by sentence, as Piper does: each sentence is its
//! own forward pass (memory stays bounded however long the text is) and
//! the sentences are joined with Piper's default 0.2 s of silence.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::{Vits, VitsScales};
use crate::model_files::{resolve_model_path, verify, PIPER_JOE, PIPER_JOE_CONFIG};
use crate::phonemize::{PhonemizedSentence, Phonemizer};
use crate::sampling_params::SamplingParams;

/// Silence between sentences, as Piper's `--sentence_silence` default.
const SENTENCE_SILENCE_SECS: f64 = 0.2;

#[derive(Debug, Deserialize)]
struct ConfigFile {
    audio: AudioSection,
    espeak: EspeakSection,
    #[serde(default)]
    inference: InferenceSection,
    phoneme_id_map: HashMap<String, Vec<i64>>,
    #[serde(default = "one")]
    num_speakers: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Deserialize)]
struct AudioSection {
    sample_rate: u32,
}

#[derive(Debug, Deserialize)]
struct EspeakSection {
    voice: String,
}

/// Piper's defaults when the config leaves them out.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct InferenceSection {
    noise_scale: f64,
    length_scale: f64,
    noise_w: f64,
}

impl Default for InferenceSection {
    fn default() -> Self {
        InferenceSection {
            noise_scale: 0.667,
            length_scale: 1.0,
            noise_w: 0.8,
        }
    }
}

/// A loaded Piper voice.
#[derive(Debug)]
pub struct PiperVoice {
    name: String,
    vits: Vits,
    phonemizer: Phonemizer,
    sample_rate: u32,
    defaults: VitsScales,
}

/// `<model>.json`: Piper's config beside its `.onnx`.
fn config_path(model: &Path) -> PathBuf {
    let mut p = model.as_os_str().to_owned();
    p.push(".json");
    PathBuf::from(p)
}

impl PiperVoice {
    /// Loads the voice `model` (a path to its `.onnx`, or an alias such as
    /// `piper-joe`) onto `device`.
    pub fn load(model: &str, device: Device) -> Result<Self> {
        let onnx = resolve_model_path(model)?;
        let json = config_path(&onnx);
        if PIPER_JOE.aliases.contains(&model) {
            verify(&json, &PIPER_JOE_CONFIG)?;
        }
        let bad = |reason: String| Error::ModelConfig {
            path: json.clone(),
            field: "voice config".to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(&json).map_err(|e| {
            bad(format!(
                "cannot read the Piper config that belongs beside {} ({e})",
                onnx.display()
            ))
        })?;
        let config: ConfigFile = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not a Piper voice config: {e}")))?;
        if config.num_speakers != 1 {
            return Err(bad(format!(
                "num_speakers = {}: multi-speaker voices are not supported yet",
                config.num_speakers
            )));
        }
        if config.audio.sample_rate == 0 {
            return Err(bad("audio.sample_rate = 0".to_owned()));
        }
        let mut id_map = HashMap::with_capacity(config.phoneme_id_map.len());
        for (phoneme, ids) in config.phoneme_id_map {
            let mut chars = phoneme.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => {
                    id_map.insert(c, ids);
                }
                _ => {
                    return Err(bad(format!(
                        "phoneme_id_map key {phoneme:?} is not one code point"
                    )))
                }
            }
        }
        let phonemizer = Phonemizer::new(&config.espeak.voice, id_map)?;
        tracing::info!(target: "omni::engine", voice = %onnx.display(), ?device, "loading voice");
        let vits = Vits::load(&onnx, device)?;
        let name = onnx
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| model.to_owned());
        let i = &config.inference;
        Ok(PiperVoice {
            name,
            vits,
            phonemizer,
            sample_rate: config.audio.sample_rate,
            defaults: VitsScales {
                noise_scale: i.noise_scale,
                length_scale: i.length_scale,
                noise_w: i.noise_w,
            },
        })
    }

    /// The voice's name, e.g. `en_US-joe-medium`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Samples per second of what it speaks.
    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// The model.
    pub fn vits(&self) -> &Vits {
        &self.vits
    }

    /// The voice's phonemizer.
    pub fn phonemizer(&self) -> &Phonemizer {
        &self.phonemizer
    }

    /// The scales a request asks for, the voice's defaults where it asks
    /// nothing.
    pub fn scales(&self, params: &SamplingParams) -> VitsScales {
        let or = |v: Option<f32>, d: f64| v.map_or(d, f64::from);
        VitsScales {
            noise_scale: or(params.noise_scale, self.defaults.noise_scale),
            length_scale: or(params.length_scale, self.defaults.length_scale),
            noise_w: or(params.noise_w, self.defaults.noise_w),
        }
    }

    /// `text` as sentences of phoneme ids.
    pub fn phonemize(&self, text: &str) -> Result<Vec<PhonemizedSentence>> {
        self.phonemizer.phonemize(text)
    }

    /// Speaks `sentences` (`[samples]`, f32, CPU). The noise is the
    /// request's own: standard normals from a generator seeded with `seed`
    /// (not libtorch's global one, which other threads of the process may
    /// draw from meanwhile), drawn in Piper's order on the CPU, so a seed
    /// gives the same waveform on any device and whatever else runs.
    pub fn synthesize(
        &self,
        sentences: &[PhonemizedSentence],
        scales: VitsScales,
        seed: u64,
    ) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut noise = |shape: &[i64]| {
            let n: i64 = shape.iter().product();
            // Box-Muller: two uniforms in (0, 1] to two standard normals.
            let mut values = Vec::with_capacity(n as usize + 1);
            while (values.len() as i64) < n {
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random::<f64>();
                let r = (-2.0 * u1.ln()).sqrt();
                let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
                values.push((r * c) as f32);
                values.push((r * s) as f32);
            }
            values.truncate(n as usize);
            Tensor::from_slice(&values).view(shape)
        };
        let gap = (SENTENCE_SILENCE_SECS * f64::from(self.sample_rate)).round() as i64;
        let mut parts = Vec::with_capacity(sentences.len() * 2);
        for (i, s) in sentences.iter().enumerate() {
            if i > 0 && gap > 0 {
                parts.push(Tensor::zeros([gap], (Kind::Float, Device::Cpu)));
            }
            parts.push(self.vits.infer(&s.ids, scales, &mut noise)?);
        }
        Ok(if parts.is_empty() {
            Tensor::zeros([0], (Kind::Float, Device::Cpu))
        } else {
            Tensor::cat(&parts, 0)
        })
    }
}
