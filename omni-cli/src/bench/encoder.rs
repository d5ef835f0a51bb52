//! `omni bench encoder`: Qwen2.5-Omni's audio input path (Whisper log-mel
//! features, then the thinker's audio encoder) on a spoken clip tiled to
//! several lengths, per second of audio, side by side in the same run with
//! transformers' feature extractor and audio tower on the same samples.
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use omni_core::engine::qwen2_5_omni::ThinkerMedia;
use omni_core::engine::tch::{Device, Kind};
use omni_core::AudioInput;
use serde::Deserialize;

use super::PythonFlags;
use crate::progress;

const HF_AUDIO_ENCODER_PY: &str = include_str!("../../bench/hf_audio_encoder.py");

/// Flags of `omni bench encoder`.
#[derive(Args, Debug)]
pub struct EncoderBench {
    /// The Qwen2.5-Omni folder (default: the tiny test checkpoint).
    #[arg(long, default_value = "omni-engine/tests/fixtures/qwen2_5_omni/tiny")]
    pub model_path: String,
    /// The clip, tiled to each length (default: the fixture's spoken
    /// sentence, 16 kHz).
    #[arg(
        long,
        default_value = "omni-engine/tests/fixtures/qwen2_5_omni/media/speech_16k.wav"
    )]
    pub audio: String,
    /// Clip lengths in seconds.
    #[arg(long, value_delimiter = ',', default_value = "4,30,120")]
    pub seconds: Vec<f64>,
    /// Rounds per length (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Skip the transformers reference.
    #[arg(long)]
    pub no_reference: bool,
    #[command(flatten)]
    pub python: PythonFlags,
}

#[derive(Debug, Deserialize)]
struct Round {
    system: String,
    seconds: f64,
    features_s: f64,
    encoder_s: f64,
    rows: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub(super) fn run(b: EncoderBench) -> anyhow::Result<()> {
    let dir = omni_core::engine::resolve_model_path(&b.model_path)?;
    let media = ThinkerMedia::load(&dir, Kind::Float, Device::Cpu)
        .with_context(|| format!("loading the encoders of {}", dir.display()))?
        .with_context(|| format!("{} holds no media encoder", dir.display()))?;
    let clip = AudioInput::read(std::path::Path::new(&b.audio))?;
    let (Some(features), Some(encoder)) = (media.feature_extractor(), media.audio_encoder()) else {
        anyhow::bail!("{} holds no audio encoder", dir.display());
    };
    let bar = progress::spinner(format!(
        "omni: features + audio encoder, {} lengths x {} rounds",
        b.seconds.len(),
        b.rounds
    ));
    let mut rounds = Vec::new();
    for &seconds in &b.seconds {
        let n = (seconds * f64::from(clip.sample_rate)) as usize;
        let samples: Vec<f32> = clip.samples.iter().copied().cycle().take(n).collect();
        let audio = AudioInput::new(samples, clip.sample_rate);
        // One untimed run first: allocator and kernel caches warm up.
        drop(encoder.forward(&features.extract(&audio, &b.audio)?)?);
        for _ in 0..b.rounds {
            let t0 = Instant::now();
            let mel = features.extract(&audio, &b.audio)?;
            let t1 = Instant::now();
            let rows = encoder.forward(&mel)?;
            let t2 = Instant::now();
            rounds.push(Round {
                system: "omni".into(),
                seconds,
                features_s: (t1 - t0).as_secs_f64(),
                encoder_s: (t2 - t1).as_secs_f64(),
                rows: rows.size()[0] as usize,
            });
        }
    }
    bar.finish_and_clear();
    if !b.no_reference {
        let seconds: Vec<String> = b.seconds.iter().map(f64::to_string).collect();
        let args: Vec<std::ffi::OsString> = vec![
            dir.into_os_string(),
            b.audio.clone().into(),
            "--seconds".into(),
            seconds.join(",").into(),
            "--rounds".into(),
            b.rounds.to_string().into(),
            "--threads".into(),
            b.python.threads.to_string().into(),
        ];
        rounds.extend(b.python.run_reference::<Round>(
            "transformers reference",
            HF_AUDIO_ENCODER_PY,
            &args,
            "transformers (OMNI_BENCH_DEPS=1 scripts/setup) or --no-reference",
        )?);
    }
    println!(
        "| clip | system | encoder rows | features (ms) | encoder (ms) | total per audio second (ms/s) |"
    );
    println!("|---|---|---|---|---|---|");
    for &seconds in &b.seconds {
        for system in ["omni", "transformers"] {
            let mine: Vec<&Round> = rounds
                .iter()
                .filter(|r| r.system == system && r.seconds == seconds)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let f = median(mine.iter().map(|r| r.features_s).collect());
            let e = median(mine.iter().map(|r| r.encoder_s).collect());
            let total = median(mine.iter().map(|r| r.features_s + r.encoder_s).collect());
            println!(
                "| {seconds} s | {system} | {} | {:.1} | {:.1} | {:.2} |",
                mine[0].rows,
                f * 1e3,
                e * 1e3,
                total * 1e3 / seconds
            );
        }
    }
    Ok(())
}
