//! `omni bench audio`: the `qwen2_5_omni` pipeline (thinker, talker and
//! code2wav, three processes) on a Qwen2.5-Omni folder, at several numbers
//! of concurrent requests, streamed between stages (its default) and not,
//! side by side in the same invocation with transformers running the same
//! folder stage after stage: throughput, time to first audio and total
//! time per request; and the HiFi-GAN TorchScript vocoder stage against the
//! same TorchScript file in PyTorch.
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::Args;
use omni_core::engine::{tch, GenerationEngine, ModelSource};
use omni_core::{
    ChatMessage, OmniEngineArgs, OmniLLM, PipelineConfig, Prompt, SamplingParams,
    StageSamplingParams,
};
use serde::Deserialize;

use super::PythonFlags;

const HF_OMNI_AUDIO_PY: &str = include_str!("../../bench/hf_omni_audio.py");

/// Everyday questions, as chat turns.
const QUESTIONS: [&str; 4] = [
    "Tell me a short story about the sea.",
    "What is the weather like on Mars?",
    "Count from one to five.",
    "Why do cats purr?",
];

/// Flags of `omni bench audio`.
#[derive(Args, Debug)]
pub struct AudioBench {
    /// The Qwen2.5-Omni folder (default: the tiny test checkpoint).
    #[arg(long, default_value = "omni-engine/tests/fixtures/qwen2_5_omni/tiny")]
    pub model_path: String,
    /// Concurrent requests per round, e.g. 1,8.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub concurrency: Vec<usize>,
    /// Rounds per concurrency (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Tokens the thinker writes (exactly: min = max).
    #[arg(long, default_value_t = 32)]
    pub thinker_tokens: usize,
    /// Codes the talker writes (exactly: min = max).
    #[arg(long, default_value_t = 64)]
    pub talker_tokens: usize,
    /// Mel frames the vocoder turns into audio (100 a second).
    #[arg(long, default_value_t = 500)]
    pub mel_frames: i64,
    /// Skip the transformers / PyTorch references.
    #[arg(long)]
    pub no_reference: bool,
    #[command(flatten)]
    pub python: PythonFlags,
}

#[derive(Debug, Deserialize)]
struct Round {
    system: String,
    part: String,
    concurrency: usize,
    wall_s: f64,
    audio_s: f64,
    /// Per request: seconds to its first audio and to its end (the
    /// reference makes all audio at the end: both are the round's wall).
    #[serde(default)]
    first_audio_s: Vec<f64>,
    #[serde(default)]
    total_s: Vec<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The questions as the thinker's token ids (its chat template, rendered
/// by Omni's tokenizer), so both systems read the same ids.
fn prompts(model: &str) -> anyhow::Result<Vec<Vec<u32>>> {
    let tok = ModelSource::open_part(model, Some("thinker"))
        .with_context(|| format!("opening {model}"))?
        .tokenizer()?;
    QUESTIONS
        .iter()
        .map(|q| {
            let messages = [ChatMessage::new("user", *q)];
            let text = tok.apply_chat_template(&messages, true)?;
            Ok(tok.encode(&text, false)?)
        })
        .collect()
}

pub(super) fn run(b: AudioBench) -> anyhow::Result<()> {
    if b.concurrency.is_empty() || b.concurrency.contains(&0) || b.rounds == 0 {
        bail!(
            "--concurrency {:?} and --rounds {} must be at least 1",
            b.concurrency,
            b.rounds
        );
    }
    let ids = prompts(&b.model_path)?;
    let params = StageSamplingParams::PerStage(vec![
        SamplingParams {
            max_tokens: Some(b.thinker_tokens),
            min_tokens: b.thinker_tokens,
            output_states: true,
            ..SamplingParams::greedy()
        },
        SamplingParams {
            max_tokens: Some(b.talker_tokens),
            min_tokens: b.talker_tokens,
            ..SamplingParams::greedy()
        },
        SamplingParams {
            seed: Some(0),
            ..SamplingParams::default()
        },
    ]);
    let batch = |c: usize| -> Vec<Prompt> {
        (0..c)
            .map(|i| Prompt::TokenIds(ids[i % ids.len()].clone()))
            .collect()
    };
    let mut rounds = Vec::new();
    // Per concurrency: per stage, median compute seconds per request.
    let mut stage_times: Vec<(usize, [f64; 3])> = Vec::new();
    for (system, streamed) in [("omni", true), ("omni-unstreamed", false)] {
        let mut config = PipelineConfig::builtin("qwen2_5_omni")?;
        for stage in &mut config.stages {
            stage.engine_args.model.clone_from(&b.model_path);
        }
        if !streamed {
            for edge in &mut config.runtime.edges {
                edge.window_size = -1;
            }
        }
        let args = OmniEngineArgs::new("qwen2_5_omni");
        let label = format!("starting qwen2_5_omni ({system})");
        let omni = crate::progress::with_spinner(
            label,
            |_: &OmniLLM| "qwen2_5_omni ready".to_owned(),
            || OmniLLM::from_config(config, &args),
        )?;
        omni.generate(batch(1), params.clone()).context("warm-up")?;
        for &c in &b.concurrency {
            let mut per_stage: [Vec<f64>; 3] = Default::default();
            for _ in 0..b.rounds {
                let t = Instant::now();
                let outs = omni.generate(batch(c), params.clone())?;
                let wall_s = t.elapsed().as_secs_f64();
                let spoken: Vec<_> = outs.iter().filter(|o| o.audio.is_some()).collect();
                if let Some(o) = spoken.first() {
                    for (s, times) in per_stage.iter_mut().enumerate() {
                        if let Some(m) = o.metrics.stage(s) {
                            times.push(m.compute_time.as_secs_f64());
                        }
                    }
                }
                rounds.push(Round {
                    system: system.into(),
                    part: "pipeline".into(),
                    concurrency: c,
                    wall_s,
                    audio_s: spoken
                        .iter()
                        .filter_map(|o| o.audio.as_ref())
                        .map(|a| a.duration().as_secs_f64())
                        .sum(),
                    first_audio_s: spoken
                        .iter()
                        .filter_map(|o| o.metrics.time_to_first_audio)
                        .map(|t| t.as_secs_f64())
                        .collect(),
                    total_s: spoken
                        .iter()
                        .map(|o| o.metrics.e2e_latency.as_secs_f64())
                        .collect(),
                });
            }
            if streamed {
                stage_times.push((c, per_stage.map(median)));
            }
        }
        omni.shutdown()?;
    }

    // The HiFi-GAN stage's engine, in this process.
    let mut voc = GenerationEngine::new(&omni_core::EngineArgs::new("hifigan"), "vocoder")?;
    tch::manual_seed(0);
    let mel =
        tch::Tensor::randn([80, b.mel_frames], (tch::Kind::Float, tch::Device::Cpu)) * 2.0 - 5.0;
    for r in 0..=b.rounds {
        voc.add_mel_request(r.to_string(), &mel, SamplingParams::default())?;
        let t = Instant::now();
        let out = voc.step()?;
        let wall_s = t.elapsed().as_secs_f64();
        let samples = out[0].audio.as_ref().map_or(0, |a| a.samples.size()[0]);
        if r > 0 {
            rounds.push(Round {
                system: "omni".into(),
                part: "vocoder".into(),
                concurrency: 1,
                wall_s,
                audio_s: samples as f64 / 16_000.0,
                first_audio_s: Vec::new(),
                total_s: Vec::new(),
            });
        }
    }

    if !b.no_reference {
        rounds.extend(reference(&b, &ids)?);
    }
    let summary = |system: &str, part: &str, c: usize| -> Option<(f64, f64)> {
        let rows: Vec<&Round> = rounds
            .iter()
            .filter(|r| r.system == system && r.part == part && r.concurrency == c)
            .collect();
        (!rows.is_empty()).then(|| {
            (
                median(rows.iter().map(|r| r.wall_s).collect()),
                median(rows.iter().map(|r| r.audio_s).collect()),
            )
        })
    };
    println!("| concurrent | omni wall s | omni audio s | omni audio s / wall s | transformers wall s | transformers audio s | transformers audio s / wall s | omni / transformers |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &c in &b.concurrency {
        let Some((w, a)) = summary("omni", "pipeline", c) else {
            continue;
        };
        let (rw, ra, rs, x) = match summary("transformers", "pipeline", c) {
            Some((rw, ra)) => (
                format!("{rw:.3}"),
                format!("{ra:.2}"),
                format!("{:.2}", ra / rw),
                format!("{:.2}x", rw / w),
            ),
            None => Default::default(),
        };
        println!(
            "| {c} | {w:.3} | {a:.2} | {:.2} | {rw} | {ra} | {rs} | {x} |",
            a / w
        );
    }
    println!();
    // Time to first audio and to the end, per request: medians over every
    // request of every round.
    let latency = |system: &str, c: usize, pick: fn(&Round) -> Vec<f64>| -> Option<f64> {
        let v: Vec<f64> = rounds
            .iter()
            .filter(|r| r.system == system && r.part == "pipeline" && r.concurrency == c)
            .flat_map(pick)
            .collect();
        (!v.is_empty()).then(|| median(v))
    };
    println!("| concurrent | system | time to first audio s | total s | audio s / wall s |");
    println!("|---:|---|---:|---:|---:|");
    for &c in &b.concurrency {
        for (system, label) in [
            ("omni", "omni, streamed (default)"),
            ("omni-unstreamed", "omni, whole outputs between stages"),
            ("transformers", "transformers"),
        ] {
            let (Some((w, a)), Some(first), Some(total)) = (
                summary(system, "pipeline", c),
                latency(system, c, |r| r.first_audio_s.clone()),
                latency(system, c, |r| r.total_s.clone()),
            ) else {
                continue;
            };
            println!("| {c} | {label} | {first:.3} | {total:.3} | {:.2} |", a / w);
        }
    }
    println!();
    // The talker is no final stage, so it reports no metrics of its own to
    // the caller; its share is the rest of the request's time.
    println!("| concurrent | thinker compute s / request | code2wav compute s / request |");
    println!("|---:|---:|---:|");
    for (c, t) in &stage_times {
        println!("| {c} | {:.3} | {:.3} |", t[0], t[2]);
    }
    println!();
    println!(
        "| HiFi-GAN vocoder, {} frames | wall s | audio s / wall s |",
        b.mel_frames
    );
    println!("|---|---:|---:|");
    for (system, label) in [
        ("omni", "omni (generation engine, tch::CModule)"),
        ("torchscript", "PyTorch (torch.jit.load)"),
    ] {
        if let Some((w, a)) = summary(system, "vocoder", 1) {
            println!("| {label} | {w:.3} | {:.1} |", a / w);
        }
    }
    Ok(())
}

fn reference(b: &AudioBench, ids: &[Vec<u32>]) -> anyhow::Result<Vec<Round>> {
    let vocoder = omni_core::engine::resolve_model_path("hifigan")?;
    let concurrency: Vec<String> = b.concurrency.iter().map(usize::to_string).collect();
    let mut args: Vec<std::ffi::OsString> = vec![
        b.model_path.clone().into(),
        serde_json::to_string(ids)?.into(),
        "--concurrency".into(),
        concurrency.join(",").into(),
    ];
    for (flag, value) in [
        ("--rounds", b.rounds.to_string()),
        ("--threads", b.python.threads.to_string()),
        ("--thinker-tokens", b.thinker_tokens.to_string()),
        ("--talker-tokens", b.talker_tokens.to_string()),
        ("--mel-frames", b.mel_frames.to_string()),
    ] {
        args.push(flag.into());
        args.push(value.into());
    }
    args.push("--vocoder".into());
    args.push(vocoder.into());
    b.python.run_reference(
        "transformers reference",
        HF_OMNI_AUDIO_PY,
        &args,
        "transformers (OMNI_BENCH_DEPS=1 scripts/setup) or --no-reference",
    )
}
