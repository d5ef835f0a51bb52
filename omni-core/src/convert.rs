//! The seam between the runtime's types and the public API: every place
//! where `omni-core` reads a runtime type field by field lives here, so a
//! change in the runtime touches one file.
use std::time::Duration;

use omni_engine::{Prompt, SamplingParams};
use omni_runtime::{
    DType, FinalOutputType, OrchestratorOptions, PipelineConfig, StageEvent, StageInfo, StageOutput,
};

use crate::{Audio, OmniEngineArgs, OmniMetrics, OmniRequestOutput, StageMetrics};

/// Each stage's default sampling params, in stage order.
pub(crate) fn default_sampling_params(config: &PipelineConfig) -> Vec<SamplingParams> {
    config.default_sampling_params()
}

/// Each stage's context length, as its engine reported it at start-up.
pub(crate) fn max_model_lens(stages: &[StageInfo]) -> Vec<Option<usize>> {
    // 0: a stage without a context limit (a generation stage).
    stages
        .iter()
        .map(|s| (s.max_model_len > 0).then_some(s.max_model_len))
        .collect()
}

/// The orchestrator's options from the caller's arguments.
pub(crate) fn orchestrator_options(args: &OmniEngineArgs) -> OrchestratorOptions {
    let mut options = OrchestratorOptions::default();
    if let Some(t) = args.init_timeout {
        options.init_timeout = t;
    }
    if let Some(bin) = &args.stage_binary {
        options.stage_binary = Some(bin.clone());
    }
    // Stage workers log through the same filter as the caller.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        options.worker_env.push(("RUST_LOG".into(), filter));
    }
    options
}

/// Whether a prompt has nothing in it.
pub(crate) fn prompt_is_empty(prompt: &Prompt) -> bool {
    match prompt {
        Prompt::Text(t) => t.is_empty(),
        Prompt::Chat(messages) => messages.is_empty(),
        Prompt::TokenIds(ids) => ids.is_empty(),
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// The stage and output of an output event; `None` for events the public
/// API does not surface.
pub(crate) fn stage_output(event: StageEvent) -> Option<(usize, StageOutput)> {
    match event {
        StageEvent::Output { stage_id, output } => Some((stage_id, *output)),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Sample rate of audio tensors that do not state one: the default
/// vocoder (HiFi-GAN `fcm_base2-L-16k`) runs at 16 kHz.
const DEFAULT_SAMPLE_RATE: u32 = 16_000;

/// Metrics of one stage for one request. The runtime sends timestamps
/// (microseconds since the UNIX epoch, one clock for all stages) on a
/// stage's last output only; before that, `previous` (if any) is kept and
/// the token count follows the stream.
pub(crate) fn stage_metrics(
    stage_id: usize,
    output: &StageOutput,
    previous: Option<&StageMetrics>,
) -> StageMetrics {
    let us = |a: u64, b: u64| Duration::from_micros(b.saturating_sub(a));
    match &output.metrics {
        // The engine's own queue/compute split when the stage sends it;
        // otherwise from the stage's timestamps.
        Some(m) => StageMetrics {
            stage_id,
            queue_time: m.queue_us.map_or_else(
                || us(m.arrival_unix_us, m.admitted_unix_us),
                Duration::from_micros,
            ),
            compute_time: m.compute_us.map_or_else(
                || {
                    m.finished_unix_us
                        .map_or(Duration::ZERO, |f| us(m.admitted_unix_us, f))
                },
                Duration::from_micros,
            ),
            time_to_first_token: m
                .ttft_us
                .map(Duration::from_micros)
                .or_else(|| m.first_token_unix_us.map(|t| us(m.arrival_unix_us, t))),
            num_prompt_tokens: m.num_prompt_tokens,
            num_cached_tokens: m.num_cached_tokens,
            num_generated_tokens: m.num_generated_tokens,
        },
        None => {
            let mut m = previous.cloned().unwrap_or_default();
            m.stage_id = stage_id;
            m.num_generated_tokens = output.token_ids.len();
            m
        }
    }
}

/// Whether an output of an audio stage carries samples.
pub(crate) fn has_audio(output: &StageOutput) -> bool {
    output.final_output_type == FinalOutputType::Audio
        && output
            .tensors
            .iter()
            .any(|(name, t)| (name == "audio" || name == "waveform") && t.numel() > 0)
}

/// Audio samples from an output's tensors (`audio`, else the first one).
fn audio(output: &StageOutput) -> Option<Audio> {
    let tensor = output
        .tensors
        .iter()
        .find(|(name, _)| name == "audio" || name == "waveform")
        .or_else(|| output.tensors.first())
        .map(|(_, t)| t)?;
    let samples: Vec<f32> = match tensor.dtype {
        DType::F32 => tensor
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        _ => {
            let t = tensor.to_tch().ok()?;
            let t = t.f_to_kind(tch::Kind::Float).ok()?.f_flatten(0, -1).ok()?;
            Vec::<f32>::try_from(&t).ok()?
        }
    };
    let sample_rate = output
        .tensors
        .iter()
        .find(|(name, _)| name == "sample_rate")
        .and_then(|(_, t)| t.to_tch().ok())
        .and_then(|t| t.f_int64_value(&[0]).ok())
        .and_then(|r| u32::try_from(r).ok())
        .unwrap_or(DEFAULT_SAMPLE_RATE);
    Some(Audio {
        samples,
        sample_rate,
    })
}

/// The public output of one stage output.
pub(crate) fn request_output(
    request_id: &str,
    stage_id: usize,
    output: StageOutput,
    metrics: OmniMetrics,
) -> OmniRequestOutput {
    let delta_audio = match output.final_output_type {
        FinalOutputType::Audio => audio(&output),
        _ => None,
    };
    let num_prompt_tokens = metrics.stage(stage_id).map_or(0, |m| m.num_prompt_tokens);
    OmniRequestOutput {
        request_id: request_id.to_string(),
        stage_id,
        final_output_type: output.final_output_type.to_string(),
        finished: output.finished,
        finish_reason: output.finish_reason,
        stop_reason: output.stop_reason,
        num_prompt_tokens,
        logprobs: output.logprobs,
        prompt_logprobs: output.prompt_logprobs.map(|p| *p),
        text: output.text,
        delta_text: output.delta_text,
        token_ids: output.token_ids,
        // The caller's stream puts the pieces together.
        audio: None,
        delta_audio,
        metrics,
    }
}

/// One line per stage of a pipeline config, for listings.
pub fn describe_stages(config: &PipelineConfig) -> Vec<String> {
    config
        .stages
        .iter()
        .map(|s| {
            let inputs = if s.engine_input_source.is_empty() {
                "the prompt".to_string()
            } else {
                let ids: Vec<String> = s
                    .engine_input_source
                    .iter()
                    .map(|i| format!("stage {i}"))
                    .collect();
                ids.join(", ")
            };
            format!(
                "stage {} ({}): model {}, input: {}{}{}",
                s.stage_id,
                s.model_stage.as_deref().unwrap_or("-"),
                s.engine_args.model,
                inputs,
                s.custom_process_input_func
                    .as_deref()
                    .map_or(String::new(), |f| format!(" via {f}")),
                if s.final_output {
                    format!(", final output: {}", s.final_output_type)
                } else {
                    String::new()
                }
            )
        })
        .collect()
}

/// Whether a runtime error was caused by the caller's input.
pub(crate) fn runtime_is_invalid_input(e: &omni_runtime::Error) -> bool {
    use omni_runtime::Error as E;
    matches!(
        e,
        E::UnknownStage { .. }
            | E::RequestIdInUse(_)
            | E::SamplingParamsCount { .. }
            | E::InvalidSamplingParams { .. }
            | E::RequestRejected { .. }
            | E::UnknownPipeline { .. }
            | E::Config { .. }
            | E::ConfigSyntax { .. }
            | E::ConfigRead { .. }
    ) || matches!(e, E::Profiler(msg) if profiler_refusal(msg))
}

/// Profiler errors that refuse a call rather than report a failure: the
/// runtime words them as messages, so they are told apart by their text
/// ("already profiling", the directory variable unset).
fn profiler_refusal(msg: &str) -> bool {
    msg.contains("already profiling") || msg.contains("VLLM_TORCH_PROFILER_DIR")
}

/// The stage a runtime error names, if any.
pub(crate) fn runtime_stage_id(e: &omni_runtime::Error) -> Option<usize> {
    use omni_runtime::Error as E;
    match e {
        E::UnknownStage { stage_id, .. }
        | E::Spawn { stage_id, .. }
        | E::StageInitTimeout { stage_id, .. }
        | E::StageFailedToStart { stage_id, .. }
        | E::StageDied { stage_id, .. }
        | E::Stage { stage_id, .. }
        | E::InvalidSamplingParams { stage_id, .. }
        | E::RequestRejected { stage_id, .. }
        | E::Timeout { stage_id, .. } => Some(*stage_id),
        _ => None,
    }
}
