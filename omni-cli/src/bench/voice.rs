//! `omni bench voice`: the Piper VITS stage against Piper's own Python path
//! (piper-phonemize + onnxruntime on the same `.onnx`), in one invocation,
//! at several numbers of concurrent requests; and the `speak` pipeline's
//! time to first audio.
use anyhow::{bail, Context as _};
use clap::Args;
use omni_core::{OmniLLM, PipelineConfig, Prompt, SamplingParams};
use serde::Deserialize;

use super::{chat, start, PythonFlags};

/// The reference, fed to the interpreter on stdin.
const PIPER_ORT_PY: &str = include_str!("../../bench/piper_ort.py");

/// Sentences of everyday length (4 to 20 words), varied, spoken by both.
const SENTENCES: [&str; 8] = [
    "The sky looks blue because air scatters short wavelengths of sunlight more than long ones.",
    "Honey bees visit thousands of flowers to make a single spoonful of honey.",
    "A compiler turns source code into instructions a processor can run.",
    "Trains were once the fastest way to cross a continent.",
    "Owls can turn their heads much further than people can.",
    "Bread rises because yeast fills the dough with tiny bubbles of gas.",
    "Glaciers move slowly, but they shape whole valleys over thousands of years.",
    "Chess has more possible games than there are atoms in the observable universe.",
];

/// Flags of `omni bench voice`.
#[derive(Args, Debug)]
pub struct VoiceBench {
    /// Concurrent requests per round, e.g. 1,8.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub concurrency: Vec<usize>,
    /// Rounds per concurrency (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Skip Piper's onnxruntime reference.
    #[arg(long)]
    pub no_reference: bool,
    #[command(flatten)]
    pub python: PythonFlags,
    /// Print one JSON object per row.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Deserialize)]
struct Round {
    concurrency: usize,
    wall_s: f64,
    audio_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Piper's default scales, seeded, so both systems speak alike.
fn voice_params() -> SamplingParams {
    SamplingParams {
        seed: Some(0),
        ..SamplingParams::default()
    }
}

fn texts(n: usize) -> Vec<Prompt> {
    (0..n)
        .map(|i| Prompt::Text(SENTENCES[i % SENTENCES.len()].to_owned()))
        .collect()
}

fn omni_rounds(b: &VoiceBench) -> anyhow::Result<Vec<Round>> {
    let omni = start(
        PipelineConfig::resolve("piper").context("pipeline piper")?,
        "the piper pipeline".to_owned(),
    )?;
    omni.generate(texts(1), voice_params()).context("warm-up")?;
    let mut rounds = Vec::new();
    for &c in &b.concurrency {
        for _ in 0..b.rounds {
            let t = std::time::Instant::now();
            let outs = omni
                .generate(texts(c), voice_params())
                .context("speaking")?;
            let wall_s = t.elapsed().as_secs_f64();
            let audio_s = outs
                .iter()
                .filter_map(|o| o.audio.as_ref())
                .map(|a| a.duration().as_secs_f64())
                .sum();
            rounds.push(Round {
                concurrency: c,
                wall_s,
                audio_s,
            });
        }
    }
    omni.shutdown().context("stopping the pipeline")?;
    Ok(rounds)
}

fn reference_rounds(b: &VoiceBench) -> anyhow::Result<Vec<Round>> {
    let voice = omni_core::engine::resolve_model_path("piper-joe")
        .context("locating the Piper voice for the reference")?;
    let concurrency: Vec<String> = b.concurrency.iter().map(usize::to_string).collect();
    let args: Vec<std::ffi::OsString> = vec![
        voice.into(),
        serde_json::to_string(&SENTENCES)?.into(),
        "--concurrency".into(),
        concurrency.join(",").into(),
        "--rounds".into(),
        b.rounds.to_string().into(),
        "--threads".into(),
        b.python.threads.to_string().into(),
    ];
    b.python.run_reference(
        "Piper's onnxruntime reference",
        PIPER_ORT_PY,
        &args,
        "onnxruntime and piper-phonemize (OMNI_BENCH_DEPS=1 scripts/setup) or --no-reference",
    )
}

/// Time to first audio of the `speak` pipeline: from submitting a
/// one-sentence question to the spoken answer's arrival, per request.
fn time_to_first_audio(omni: &OmniLLM, concurrency: usize) -> anyhow::Result<Vec<f64>> {
    let prompts: Vec<Prompt> = (0..concurrency)
        .map(|_| chat("What is the capital of France? Answer in one short sentence."))
        .collect();
    let params = omni
        .default_sampling_params()
        .iter()
        .cloned()
        .map(|mut p| {
            p.max_tokens = p.max_tokens.map(|m| m.min(24));
            p
        })
        .collect();
    let outs = omni
        .generate(prompts, omni_core::StageSamplingParams::PerStage(params))
        .context("asking the speak pipeline")?;
    Ok(outs
        .iter()
        .filter(|o| o.audio.is_some())
        .map(|o| o.metrics.e2e_latency.as_secs_f64())
        .collect())
}

pub(super) fn run(b: VoiceBench) -> anyhow::Result<()> {
    if b.concurrency.is_empty() || b.concurrency.contains(&0) || b.rounds == 0 {
        bail!(
            "--concurrency {:?} and --rounds {} must be at least 1",
            b.concurrency,
            b.rounds
        );
    }
    let ours = omni_rounds(&b)?;
    let theirs = if b.no_reference {
        Vec::new()
    } else {
        reference_rounds(&b)?
    };
    let speak = start(
        PipelineConfig::resolve("speak").context("pipeline speak")?,
        "the speak pipeline".to_owned(),
    )?;
    time_to_first_audio(&speak, 1).context("warm-up")?;
    let mut ttfa = Vec::new();
    for &c in &b.concurrency {
        let mut all = Vec::new();
        for _ in 0..b.rounds {
            all.extend(time_to_first_audio(&speak, c)?);
        }
        ttfa.push((
            c,
            median(all.clone()),
            all.iter().copied().fold(0.0, f64::max),
        ));
    }
    speak.shutdown().context("stopping the pipeline")?;

    let summary = |rounds: &[Round], c: usize| {
        let rows: Vec<&Round> = rounds.iter().filter(|r| r.concurrency == c).collect();
        let wall = median(rows.iter().map(|r| r.wall_s).collect());
        let audio = median(rows.iter().map(|r| r.audio_s).collect());
        (wall, audio, audio / wall)
    };
    if b.json {
        for &c in &b.concurrency {
            for (system, rounds) in [("omni", &ours), ("onnxruntime", &theirs)] {
                if rounds.is_empty() {
                    continue;
                }
                let (wall, audio, speed) = summary(rounds, c);
                println!(
                    "{}",
                    serde_json::json!({"system": system, "concurrency": c,
                    "wall_s": wall, "audio_s": audio, "audio_s_per_wall_s": speed})
                );
            }
        }
        for (c, med, max) in &ttfa {
            println!(
                "{}",
                serde_json::json!({"system": "omni speak", "concurrency": c,
                "time_to_first_audio_median_s": med, "time_to_first_audio_max_s": max})
            );
        }
        return Ok(());
    }
    println!("| concurrent | omni wall s | omni audio s | omni audio s / wall s | onnxruntime wall s | onnxruntime audio s | onnxruntime audio s / wall s | omni / onnxruntime |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &c in &b.concurrency {
        let (w, a, s) = summary(&ours, c);
        let reference = (!theirs.is_empty()).then(|| summary(&theirs, c));
        let (rw, ra, rs, x) = match reference {
            Some((rw, ra, rs)) => (
                format!("{rw:.3}"),
                format!("{ra:.2}"),
                format!("{rs:.1}"),
                format!("{:.2}x", s / rs),
            ),
            None => Default::default(),
        };
        println!("| {c} | {w:.3} | {a:.2} | {s:.1} | {rw} | {ra} | {rs} | {x} |");
    }
    println!();
    println!("| speak pipeline, concurrent questions | time to first audio, median s | max s |");
    println!("|---:|---:|---:|");
    for (c, med, max) in &ttfa {
        println!("| {c} | {med:.3} | {max:.3} |");
    }
    Ok(())
}
