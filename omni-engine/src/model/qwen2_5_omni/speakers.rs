//! Qwen2.5-Omni's voices: `spk_dict.pt`, a `torch.save` pickle mapping a
//! speaker's name to its `cond` (`[1, enc_emb_dim]`, the DiT's speaker
//! condition), `ref_mel` (`[1, frames, mel_dim]`, the reference mel the
//! ECAPA encoder reads) and `bos_token` (the thinker-vocabulary id that
//! opens the talker's reply). Read as shipped, with libtorch's unpickler.
use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::pickle::{self, PickleValue};

/// One voice.
#[derive(Debug)]
pub struct Speaker {
    /// Its name, e.g. `Chelsie`.
    pub name: String,
    /// `[1, enc_emb_dim]`, f32.
    pub cond: Tensor,
    /// `[1, frames, mel_dim]`, f32.
    pub ref_mel: Tensor,
    /// The talker's speaker token (thinker vocabulary).
    pub bos_token: i64,
}

/// The voices of one model, in the file's order.
#[derive(Debug)]
pub struct Speakers {
    speakers: Vec<Speaker>,
}

/// The speaker a request gets when it names none: `Chelsie` when present
/// (Qwen2.5-Omni's default voice), else the first in the file.
pub const DEFAULT_SPEAKER: &str = "Chelsie";

impl Speakers {
    /// Reads `spk_dict.pt`, checking each voice's shapes against the DiT's
    /// `enc_emb_dim` and `mel_dim`.
    pub fn load(path: &Path, enc_emb_dim: i64, mel_dim: i64) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::ModelFile {
                path: path.to_path_buf(),
                reason: "missing: Qwen2.5-Omni's voices (spk_dict.pt) belong in the model folder"
                    .to_owned(),
            });
        }
        let bad = |reason: String| Error::Format {
            path: path.to_path_buf(),
            format: "spk_dict.pt",
            reason,
        };
        let mut speakers: Vec<Speaker> = Vec::new();
        for (key, value) in pickle::load(path)? {
            let Some((name, field)) = key.split_once('.') else {
                continue;
            };
            let index = match speakers.iter().position(|s| s.name == name) {
                Some(i) => i,
                None => {
                    speakers.push(Speaker {
                        name: name.to_owned(),
                        cond: Tensor::new(),
                        ref_mel: Tensor::new(),
                        bos_token: -1,
                    });
                    speakers.len() - 1
                }
            };
            let s = &mut speakers[index];
            match (field, value) {
                ("cond", PickleValue::Tensor(t)) => s.cond = t.to_kind(Kind::Float),
                ("ref_mel", PickleValue::Tensor(t)) => s.ref_mel = t.to_kind(Kind::Float),
                ("bos_token", PickleValue::Int(i)) => s.bos_token = i,
                ("bos_token", PickleValue::Tensor(t)) if t.numel() == 1 => {
                    s.bos_token = t.int64_value(&[])
                }
                _ => {}
            }
        }
        if speakers.is_empty() {
            return Err(bad("no speaker in it".to_owned()));
        }
        for s in &mut speakers {
            if !s.cond.defined() || s.cond.numel() != enc_emb_dim as usize {
                return Err(bad(format!(
                    "speaker {:?}: cond must hold enc_emb_dim = {enc_emb_dim} values",
                    s.name
                )));
            }
            s.cond = s.cond.reshape([1, enc_emb_dim]);
            let size = if s.ref_mel.defined() {
                s.ref_mel.size()
            } else {
                vec![]
            };
            let frames = match size.as_slice() {
                [1, t, m] | [t, m] if *m == mel_dim && *t > 0 => *t,
                _ => {
                    return Err(bad(format!(
                        "speaker {:?}: ref_mel has shape {size:?}, expected [1, frames, {mel_dim}]",
                        s.name
                    )))
                }
            };
            s.ref_mel = s.ref_mel.reshape([1, frames, mel_dim]);
            if s.bos_token < 0 {
                return Err(bad(format!("speaker {:?}: no bos_token", s.name)));
            }
        }
        Ok(Speakers { speakers })
    }

    /// The voice called `name`; `None` picks the default. An unknown name
    /// is an error that lists the known ones.
    pub fn get(&self, name: Option<&str>) -> Result<&Speaker> {
        match name {
            Some(name) => self
                .speakers
                .iter()
                .find(|s| s.name == name)
                .ok_or_else(|| Error::InvalidSamplingParams {
                    field: "speaker",
                    value: name.to_owned(),
                    reason: format!(
                        "not one of this model's voices ({})",
                        self.names().join(", ")
                    ),
                }),
            None => Ok(self
                .speakers
                .iter()
                .find(|s| s.name == DEFAULT_SPEAKER)
                .unwrap_or(&self.speakers[0])),
        }
    }

    /// The voices' names, in the file's order.
    pub fn names(&self) -> Vec<&str> {
        self.speakers.iter().map(|s| s.name.as_str()).collect()
    }
}
