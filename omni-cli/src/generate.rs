//! `omni generate`: run prompts through a pipeline and print every final
//! output, optionally profiling the run.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use omni_core::{
    AudioInput, ChatMessage, ContentPart, ImageInput, MultiModalData, OmniEngineArgs, OmniLLM,
    Prompt, VideoInput,
};

use crate::sampling_flags::SamplingFlags;
use crate::{audio, progress, BadInput};

/// Run prompts through a pipeline and print each final stage's output.
///
/// All prompts are submitted at once, so the stages batch them. With
/// --profile every stage (or those named by --profile-stages) records a
/// trace under $VLLM_TORCH_PROFILER_DIR (or --profile-dir).
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  omni generate --pipeline default --prompt 'Why is the sky blue?' --max-tokens 48
  omni generate --pipeline smollm2 --prompt 'Once upon a time' --raw --json
  VLLM_TORCH_PROFILER_DIR=/tmp/traces omni generate --pipeline default \\
      --prompt 'Hi' --profile --profile-stages 1
  omni generate --pipeline speak --prompt 'Why is the sky blue?' --output-dir answers/
  omni generate --pipeline qwen2_5_omni --model-path ~/Qwen2.5-Omni-7B \\
      --prompt 'Hello!' --speaker Ethan --output-dir answers/
  omni generate --pipeline qwen2_5_omni --model-path ~/Qwen2.5-Omni-7B \\
      --audio question.wav --prompt 'Answer the question in the clip.'
  omni generate --pipeline qwen2_5_omni --model-path ~/Qwen2.5-Omni-7B \\
      --image photo.png --prompt 'Describe this picture.' --output-dir answers/")]
pub struct GenerateArgs {
    /// A built-in pipeline (see `omni pipelines`) or a pipeline file.
    #[arg(long, default_value = omni_core::DEFAULT_PIPELINE)]
    pub pipeline: String,
    /// A prompt (repeatable).
    #[arg(long = "prompt", required_unless_present = "prompt_token_ids")]
    pub prompts: Vec<String>,
    /// A prompt given as token ids, e.g. 1,2,3 (repeatable; sent as they
    /// are, after the text prompts).
    #[arg(long = "prompt-token-ids", value_name = "IDS")]
    pub prompt_token_ids: Vec<String>,
    /// An audio clip for every prompt (repeatable; WAV, FLAC, MP3 or Ogg
    /// Vorbis, any rate, mixed down to mono). A chat prompt's user message
    /// gets one audio part per clip before its text; a --raw or token-id
    /// prompt must hold the model's placeholders itself (<|AUDIO|> for
    /// Qwen2.5-Omni). Only models with an audio encoder take it.
    #[arg(long = "audio", value_name = "FILE")]
    pub audio: Vec<PathBuf>,
    /// An image for every prompt (repeatable; PNG, JPEG, WebP, GIF, BMP).
    /// A chat prompt's user message gets one image part per file, after
    /// the audio parts and before its text; --raw and token-id prompts
    /// must hold <|IMAGE|> placeholders (framed by <|vision_bos|> and
    /// <|vision_eos|>) themselves.
    #[arg(long = "image", value_name = "FILE")]
    pub images: Vec<PathBuf>,
    /// A video for every prompt (repeatable), as a folder of its frames
    /// (image files, in file-name order) sampled at --video-fps: Omni
    /// decodes no video container (extract frames with e.g. `ffmpeg -i
    /// clip.mp4 -vf fps=2 dir/%04d.png`). A chat prompt's user message gets
    /// one video part per folder, after the image parts.
    #[arg(long = "video", value_name = "DIR")]
    pub videos: Vec<PathBuf>,
    /// Frames per second of the --video folders (Qwen2.5-Omni's processor
    /// assumes 2).
    #[arg(long, default_value_t = 2.0, value_name = "FPS")]
    pub video_fps: f64,
    /// The --audio clips are the --video folders' sound, one per video in
    /// order: the thinker reads each video's frames and sound interleaved
    /// in time (Qwen2.5-Omni's use_audio_in_video), and the chat message
    /// gets no audio parts of its own.
    #[arg(long, requires = "videos")]
    pub use_audio_in_video: bool,
    /// Run every stage on this model instead of the pipeline's own (e.g. a
    /// Qwen2.5-Omni folder for `--pipeline qwen2_5_omni`).
    #[arg(long, value_name = "PATH")]
    pub model_path: Option<String>,
    /// Where the stages run: `local` (child processes of this one) or `ray`
    /// (the nodes of the Ray cluster at `RAY_ADDRESS`); the pipeline's own
    /// `runtime.backend` when absent.
    #[arg(long, value_enum)]
    pub backend: Option<crate::BackendArg>,
    /// Send prompts as raw text instead of a user chat message.
    #[arg(long)]
    pub raw: bool,
    /// Print one JSON object per output, one per line.
    #[arg(long)]
    pub json: bool,
    /// Profile the run (needs VLLM_TORCH_PROFILER_DIR or --profile-dir).
    #[arg(long)]
    pub profile: bool,
    /// Profile only these stages, e.g. 0,1.
    #[arg(long, value_delimiter = ',', requires = "profile")]
    pub profile_stages: Option<Vec<usize>>,
    /// Where traces go; sets VLLM_TORCH_PROFILER_DIR for the stages.
    #[arg(long, requires = "profile")]
    pub profile_dir: Option<PathBuf>,
    /// Write each audio output as a WAV file here (16-bit PCM, mono; one
    /// file per prompt and stage, `prompt<i>_stage<s>.wav`), and print its
    /// path. Created when missing.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingFlags,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if args.profile {
        crate::profile::set_profiler_dir(args.profile_dir.as_deref())?;
    }
    if let Some((i, _)) = args.prompts.iter().enumerate().find(|(_, p)| p.is_empty()) {
        return Err(BadInput(format!("--prompt number {} is empty", i + 1)).into());
    }
    if let Some(dir) = &args.output_dir {
        std::fs::create_dir_all(dir).map_err(|e| {
            BadInput(format!(
                "--output-dir {}: cannot create it ({e})",
                dir.display()
            ))
        })?;
    }
    let clips = args
        .audio
        .iter()
        .map(|path| AudioInput::read(path).map_err(|e| BadInput(format!("--audio: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let pictures = args
        .images
        .iter()
        .map(|path| ImageInput::read(path).map_err(|e| BadInput(format!("--image: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let films = args
        .videos
        .iter()
        .map(|dir| {
            VideoInput::read_dir(dir, args.video_fps).map_err(|e| BadInput(format!("--video: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if args.use_audio_in_video && clips.len() != films.len() {
        return Err(BadInput(format!(
            "--use-audio-in-video pairs each --video with one --audio: {} video(s), {} clip(s)",
            films.len(),
            clips.len()
        ))
        .into());
    }
    let media = || MultiModalData {
        audio: clips.clone(),
        image: pictures.clone(),
        video: films.clone(),
        use_audio_in_video: args.use_audio_in_video,
    };
    let audio_parts = if args.use_audio_in_video {
        0
    } else {
        clips.len()
    };
    let omni = progress::with_spinner(
        format!(
            "starting pipeline {:?}: spawning stages, loading models",
            args.pipeline
        ),
        |o: &OmniLLM| {
            format!(
                "pipeline {:?} ready: {} stage(s)",
                args.pipeline,
                o.stages().len()
            )
        },
        || {
            OmniLLM::from_engine_args(OmniEngineArgs {
                model_path: args.model_path.clone(),
                backend: args.backend.map(Into::into),
                ..OmniEngineArgs::new(&args.pipeline)
            })
        },
    )
    .context("cannot start the pipeline")?;
    let params = args.sampling.resolve(omni.default_sampling_params())?;
    let mut prompts: Vec<Prompt> = args
        .prompts
        .iter()
        .map(|p| {
            let prompt = if args.raw {
                Prompt::Text(p.clone())
            } else if clips.is_empty() && pictures.is_empty() && films.is_empty() {
                Prompt::Chat(vec![ChatMessage::new("user", p.clone())])
            } else {
                let mut parts = vec![ContentPart::Audio; audio_parts];
                parts.extend(vec![ContentPart::Image; pictures.len()]);
                parts.extend(vec![ContentPart::Video; films.len()]);
                parts.push(ContentPart::Text { text: p.clone() });
                Prompt::Chat(vec![ChatMessage::with_parts("user", parts)])
            };
            Prompt::with_media(prompt, media())
        })
        .collect();
    for (i, list) in args.prompt_token_ids.iter().enumerate() {
        let ids = list
            .split(',')
            .map(|t| t.trim().parse::<u32>())
            .collect::<std::result::Result<Vec<u32>, _>>()
            .map_err(|e| {
                BadInput(format!(
                    "--prompt-token-ids number {} ({list:?}): not a comma-separated list of token ids ({e})",
                    i + 1
                ))
            })?;
        prompts.push(Prompt::with_media(Prompt::TokenIds(ids), media()));
    }
    if args.profile {
        omni.start_profile(args.profile_stages.as_deref())
            .context("starting the profiler")?;
    }
    let outputs = omni.generate(prompts, params).context("generating")?;
    let traces = if args.profile {
        Some(omni.stop_profile().context("stopping the profiler")?)
    } else {
        None
    };
    for out in &outputs {
        // Request ids are the prompts' indexes, assigned here: safe in a
        // file name.
        let wav = match (&out.audio, &args.output_dir) {
            (Some(audio), Some(dir)) => {
                let path = dir.join(format!(
                    "prompt{}_stage{}.wav",
                    out.request_id, out.stage_id
                ));
                audio::write_wav(&path, audio)?;
                Some(path)
            }
            _ => None,
        };
        if args.json {
            let mut v = serde_json::to_value(out)?;
            if let Some(audio) = &out.audio {
                v["audio"] = serde_json::json!({
                    "path": wav,
                    "sample_rate": audio.sample_rate,
                    "num_samples": audio.samples.len(),
                });
            }
            println!("{v}");
            continue;
        }
        let prompt_index: usize = out.request_id.parse().unwrap_or(0);
        let stage = omni.stages().get(out.stage_id);
        println!(
            "=== prompt {} | stage {} ({}) | {} | {} tokens | finish: {} ===",
            prompt_index,
            out.stage_id,
            stage.map_or(String::new(), |_| omni.model_names()[out.stage_id].clone()),
            out.final_output_type,
            out.token_ids.len(),
            out.finish_reason
                .as_ref()
                .and_then(|r| serde_json::to_value(r).ok())
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| "-".into()),
        );
        println!("{}", out.text.trim());
        if let Some(audio) = &out.audio {
            let place = wav.as_ref().map_or_else(
                || "(not written: give --output-dir)".to_owned(),
                |p| p.display().to_string(),
            );
            println!(
                "audio: {place} ({:.2} s at {} Hz)",
                audio.duration().as_secs_f64(),
                audio.sample_rate
            );
        }
        let m: Vec<String> = out
            .metrics
            .stages
            .iter()
            .map(|s| {
                format!(
                    "stage {}: queue {:.3}s compute {:.3}s, {} prompt ({} cached) + {} generated tokens",
                    s.stage_id,
                    s.queue_time.as_secs_f64(),
                    s.compute_time.as_secs_f64(),
                    s.num_prompt_tokens,
                    s.num_cached_tokens,
                    s.num_generated_tokens
                )
            })
            .collect();
        let first_audio = out
            .metrics
            .time_to_first_audio
            .filter(|_| out.audio.is_some())
            .map_or(String::new(), |t| {
                format!(", first audio after {:.3}s", t.as_secs_f64())
            });
        println!(
            "--- {:.3}s end to end{first_audio}; {}",
            out.metrics.e2e_latency.as_secs_f64(),
            m.join("; ")
        );
        println!();
    }
    if let Some(traces) = traces {
        crate::profile::print_traces(&traces, args.json);
    }
    omni.shutdown().context("stopping the pipeline")?;
    Ok(())
}
