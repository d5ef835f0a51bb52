//! Audio answers as files: mono `f32` samples as a 16-bit PCM WAV (in
//! base64, the form OpenAI's `message.audio.data` carries, or written
//! atomically to a file), WAV files read back, and a spectrogram PNG for
//! people to look at.
use std::io::Write as _;
use std::path::Path;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use omni_core::Audio;

/// RIFF/WAVE, PCM, 16 bit, mono.
pub fn to_wav(audio: &Audio) -> Vec<u8> {
    let data_len = (audio.samples.len() * 2) as u32;
    let rate = audio.sample_rate;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes()); // bytes per second
    out.extend_from_slice(&2u16.to_le_bytes()); // block align
    out.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    push_pcm16(&mut out, &audio.samples);
    out
}

/// Samples as 16-bit little-endian PCM.
fn push_pcm16(out: &mut Vec<u8>, samples: &[f32]) {
    for &s in samples {
        // NaN maps to 0 (`as` saturates and sends NaN to 0).
        let v = (s.clamp(-1.0, 1.0) * 32767.0).round() as i16;
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Samples as 16-bit little-endian PCM in standard base64: a streamed
/// audio delta (OpenAI's `pcm16`).
pub fn to_base64_pcm16(samples: &[f32]) -> String {
    let mut pcm = Vec::with_capacity(samples.len() * 2);
    push_pcm16(&mut pcm, samples);
    base64::engine::general_purpose::STANDARD.encode(pcm)
}

/// [`to_wav`] in standard base64.
pub fn to_base64_wav(audio: &Audio) -> String {
    base64::engine::general_purpose::STANDARD.encode(to_wav(audio))
}

/// Writes `audio` as a WAV file at `path`, atomically: a reader sees no
/// file or the whole file.
pub fn write_wav(path: &Path, audio: &Audio) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&to_wav(audio))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("cannot write {}: {e}", path.display())
    })
}

/// Reads a mono or multi-channel WAV file of 16-bit PCM or 32-bit float
/// samples (the first channel).
pub fn read_wav(path: &Path) -> anyhow::Result<Audio> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let bad = |why: &str| anyhow::anyhow!("{} is not a WAV file Omni reads: {why}", path.display());
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(bad("no RIFF/WAVE header"));
    }
    let (mut format, mut channels, mut rate, mut bits) = (0u16, 0u16, 0u32, 0u16);
    let mut pos = 12;
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let len = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]) as usize;
        let body = pos + 8;
        let end = body
            .checked_add(len)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| bad("a chunk runs past the end"))?;
        let chunk = &bytes[body..end];
        match id {
            b"fmt " if chunk.len() >= 16 => {
                format = u16::from_le_bytes([chunk[0], chunk[1]]);
                channels = u16::from_le_bytes([chunk[2], chunk[3]]);
                rate = u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
                bits = u16::from_le_bytes([chunk[14], chunk[15]]);
            }
            b"data" => {
                if channels == 0 || rate == 0 {
                    return Err(bad("no fmt chunk before the data"));
                }
                let width = usize::from(bits / 8) * usize::from(channels);
                let samples: Vec<f32> = match (format, bits) {
                    (1, 16) => chunk
                        .chunks_exact(width)
                        .map(|f| f32::from(i16::from_le_bytes([f[0], f[1]])) / 32768.0)
                        .collect(),
                    (3, 32) => chunk
                        .chunks_exact(width)
                        .map(|f| f32::from_le_bytes([f[0], f[1], f[2], f[3]]))
                        .collect(),
                    _ => bail!(bad(&format!(
                        "format {format} with {bits}-bit samples (16-bit PCM or 32-bit float)"
                    ))),
                };
                return Ok(Audio {
                    samples,
                    sample_rate: rate,
                });
            }
            _ => {}
        }
        pos = end + (len & 1);
    }
    Err(bad("no data chunk"))
}

/// Writes a spectrogram of `audio` as a PNG: time left to right, frequency
/// (0 to half the sample rate) bottom to top, log power over 80 dB.
pub fn write_spectrogram(path: &Path, audio: &Audio) -> anyhow::Result<()> {
    const N_FFT: usize = 1024;
    const HOP: usize = 256;
    const RANGE_DB: f32 = 80.0;
    let samples = &audio.samples;
    let frames = if samples.len() < N_FFT {
        1
    } else {
        1 + (samples.len() - N_FFT) / HOP
    };
    let bins = N_FFT / 2;
    let window: Vec<f32> = (0..N_FFT)
        .map(|i| 0.5 - 0.5 * (2.0 * std::f32::consts::PI * i as f32 / N_FFT as f32).cos())
        .collect();
    let fft = rustfft::FftPlanner::<f32>::new().plan_fft_forward(N_FFT);
    let mut db = vec![0f32; frames * bins];
    let mut buf = vec![rustfft::num_complex::Complex32::default(); N_FFT];
    for f in 0..frames {
        for (i, b) in buf.iter_mut().enumerate() {
            let x = samples.get(f * HOP + i).copied().unwrap_or(0.0);
            *b = rustfft::num_complex::Complex32::new(x * window[i], 0.0);
        }
        fft.process(&mut buf);
        for k in 0..bins {
            db[f * bins + k] = 10.0 * (buf[k].norm_sqr() + 1e-10).log10();
        }
    }
    let top = db.iter().copied().fold(f32::MIN, f32::max);
    let mut pixels = vec![0u8; frames * bins * 3];
    for k in 0..bins {
        let row = bins - 1 - k;
        for f in 0..frames {
            let v = ((db[f * bins + k] - top + RANGE_DB) / RANGE_DB).clamp(0.0, 1.0);
            let [r, g, b] = colour(v);
            let p = (row * frames + f) * 3;
            pixels[p..p + 3].copy_from_slice(&[r, g, b]);
        }
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), frames as u32, bins as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&pixels)?;
    writer.finish()?;
    Ok(())
}

/// Black through purple and orange to pale yellow (a magma-like ramp).
fn colour(v: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] = [
        [0.0, 0.0, 0.02],
        [0.32, 0.07, 0.47],
        [0.72, 0.21, 0.47],
        [0.98, 0.53, 0.38],
        [0.99, 0.99, 0.75],
    ];
    let x = v * (STOPS.len() - 1) as f32;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let t = x - i as f32;
    let mix = |c: usize| ((STOPS[i][c] * (1.0 - t) + STOPS[i + 1][c] * t) * 255.0).round() as u8;
    [mix(0), mix(1), mix(2)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_wav_reads_back() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("omni-wav-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("a.wav");
        let audio = Audio {
            samples: (0..1000).map(|i| (i as f32 / 50.0).sin() * 0.5).collect(),
            sample_rate: 22_050,
        };
        write_wav(&path, &audio)?;
        let back = read_wav(&path)?;
        assert_eq!(back.sample_rate, 22_050);
        assert_eq!(back.samples.len(), 1000);
        let worst = back
            .samples
            .iter()
            .zip(&audio.samples)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{worst}");
        let png = dir.join("a.png");
        write_spectrogram(&png, &audio)?;
        assert_eq!(&std::fs::read(&png)?[1..4], b"PNG");
        assert!(read_wav(&png).is_err());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn wav_header_and_samples() {
        let audio = Audio {
            samples: vec![0.0, 1.0, -1.0, 2.0],
            sample_rate: 16_000,
        };
        let wav = to_wav(&audio);
        assert_eq!(&wav[0..4], b"RIFF");
        assert_eq!(&wav[8..16], b"WAVEfmt ");
        assert_eq!(wav.len(), 44 + 8);
        assert_eq!(
            u32::from_le_bytes([wav[24], wav[25], wav[26], wav[27]]),
            16_000
        );
        let samples: Vec<i16> = wav[44..]
            .chunks(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(samples, vec![0, 32767, -32767, 32767]);
    }
}
