//! `omni bench encoder`: Qwen2.5-Omni's media input paths, side by side in
//! the same run with transformers on the same inputs: audio (Whisper log-mel
//! features, then the thinker's audio encoder) on a spoken clip tiled to
//! several lengths, per second of audio; and images (the Qwen2-VL image
//! processor, then the vision encoder) on a drawn picture at several sizes,
//! per image.
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use omni_core::engine::qwen2_5_omni::ThinkerMedia;
use omni_core::engine::tch::{Device, Kind};
use omni_core::{AudioInput, ImageInput};
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
    /// Image sizes, WIDTHxHEIGHT (a pattern both sides draw alike).
    #[arg(long, value_delimiter = ',', default_value = "640x480,1280x720")]
    pub images: Vec<String>,
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
    /// `audio` or `image`.
    kind: String,
    /// Seconds of audio, or the image's `WxH`.
    input: String,
    /// Feature extraction or image processing.
    features_s: f64,
    encoder_s: f64,
    rows: usize,
}

/// The benchmark picture of `w x h` pixels: a pattern the Python reference
/// draws the same way.
fn pattern(w: u32, h: u32) -> anyhow::Result<ImageInput> {
    let mut rgb = Vec::with_capacity(w as usize * h as usize * 3);
    for y in 0..h as u64 {
        for x in 0..w as u64 {
            rgb.extend([
                ((x * 7 + y * 3) % 256) as u8,
                ((x * y) % 256) as u8,
                ((x + 2 * y) % 256) as u8,
            ]);
        }
    }
    Ok(ImageInput::new(w, h, rgb)?)
}

fn parse_size(s: &str) -> anyhow::Result<(u32, u32)> {
    let (w, h) = s
        .split_once('x')
        .with_context(|| format!("--images {s:?}: expected WIDTHxHEIGHT"))?;
    Ok((w.parse()?, h.parse()?))
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
                kind: "audio".into(),
                input: seconds.to_string(),
                features_s: (t1 - t0).as_secs_f64(),
                encoder_s: (t2 - t1).as_secs_f64(),
                rows: rows.size()[0] as usize,
            });
        }
    }
    if let (Some(processor), Some(vision)) = (media.image_processor(), media.vision_encoder()) {
        for size in &b.images {
            let (w, h) = parse_size(size)?;
            let image = pattern(w, h)?;
            let warm = processor.process(&image, size)?;
            drop(vision.forward(&warm.pixel_values, warm.grid)?);
            for _ in 0..b.rounds {
                let t0 = Instant::now();
                let p = processor.process(&image, size)?;
                let t1 = Instant::now();
                let rows = vision.forward(&p.pixel_values, p.grid)?;
                let t2 = Instant::now();
                rounds.push(Round {
                    system: "omni".into(),
                    kind: "image".into(),
                    input: size.clone(),
                    features_s: (t1 - t0).as_secs_f64(),
                    encoder_s: (t2 - t1).as_secs_f64(),
                    rows: rows.size()[0] as usize,
                });
            }
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
            "--images".into(),
            b.images.join(",").into(),
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
        "| input | system | encoder rows | features or patches (ms) | encoder (ms) | total (ms) | per audio second (ms/s) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let inputs: Vec<(String, String)> = b
        .seconds
        .iter()
        .map(|s| ("audio".to_owned(), s.to_string()))
        .chain(b.images.iter().map(|s| ("image".to_owned(), s.clone())))
        .collect();
    for (kind, input) in &inputs {
        for system in ["omni", "transformers"] {
            let mine: Vec<&Round> = rounds
                .iter()
                .filter(|r| r.system == system && &r.kind == kind && &r.input == input)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let f = median(mine.iter().map(|r| r.features_s).collect());
            let e = median(mine.iter().map(|r| r.encoder_s).collect());
            let total = median(mine.iter().map(|r| r.features_s + r.encoder_s).collect());
            let (label, per_second) = match kind.as_str() {
                "audio" => {
                    let secs: f64 = input.parse().unwrap_or(f64::NAN);
                    (
                        format!("{input} s audio"),
                        format!("{:.2}", total * 1e3 / secs),
                    )
                }
                _ => (format!("{input} image"), "-".to_owned()),
            };
            println!(
                "| {label} | {system} | {} | {:.1} | {:.1} | {:.1} | {per_second} |",
                mine[0].rows,
                f * 1e3,
                e * 1e3,
                total * 1e3,
            );
        }
    }
    Ok(())
}
