//! The non-autoregressive engine: stages that turn a whole input into a
//! whole output in one forward pass (speech from text: a Piper voice;
//! speech from codec ids: Qwen2.5-Omni's code2wav), with no KV cache and no
//! sampling loop.
//!
//! It has the step interface of [`LLMEngine`] so that a stage worker drives
//! either the same way ([`StageEngine`]): `add_request` checks and prepares
//! a request (a bad one is refused there, not mid-batch), `step` runs the
//! oldest waiting request, one forward, and reports it finished with its
//! waveform. The engine marks its phases with the
//! same `tracing` spans as the LLM engine (`step` named `ProfilerStep#<n>`
//! in traces, with the `request_ids` it ran, and a `forward` per request).
//!
//! Batching: each request (and each sentence in it) is its own forward.
//! Padding a batch of sentences to one length changes what the HiFi-GAN
//! decoder's convolutions see at the end of the shorter ones, so batched
//! output would differ from unbatched; on a CPU the decoder's convolutions
//! already use every core at batch 1.
use std::collections::VecDeque;
use std::time::Instant;

use rand::Rng;
use tch::Device;

use crate::engine::{EngineArgs, LLMEngine};
use crate::engine_core::EngineLoad;
use crate::error::{Error, Result};
use crate::model::qwen2_5_omni::{CodeStream, Token2Wav};
use crate::model::VitsScales;
use crate::phonemize::PhonemizedSentence;
use crate::request::{Prompt, RequestMetrics, RequestOutput, Waveform};
use crate::sampling_params::SamplingParams;
use crate::vocoder::Vocoder;
use crate::voice::PiperVoice;

/// The `model_stage` names a generation engine runs: `vits` (a Piper voice
/// `.onnx`), `code2wav` (a Qwen2.5-Omni folder) and `vocoder` (a
/// TorchScript vocoder: log-mel in).
pub const GENERATION_STAGES: &[&str] = &["vits", "code2wav", "vocoder"];

/// A model the generation engine runs.
#[derive(Debug)]
#[non_exhaustive]
pub enum GenerationModel {
    /// A Piper VITS voice: text in, speech out.
    Vits(Box<PiperVoice>),
    /// Qwen2.5-Omni's code2wav: the talker's codec ids in, speech out.
    Code2Wav(Box<Token2Wav>),
    /// A TorchScript vocoder: log-mel frames in, speech out.
    Vocoder(Box<Vocoder>),
}

/// What one request asks of the model, prepared at `add_request`.
#[derive(Debug)]
enum Job {
    Speak {
        sentences: Vec<PhonemizedSentence>,
        scales: VitsScales,
    },
    Codes {
        codes: Vec<i64>,
        speaker: Option<String>,
    },
    Mel(tch::Tensor),
    /// Codes that come while the talker generates, spoken chunk by chunk.
    CodeStream(Box<CodeStream>),
}

/// Streamed requests whose chunks one step runs together at most.
const MAX_STREAM_BATCH: usize = 16;

/// One request, prepared.
#[derive(Debug)]
struct Pending {
    request_id: String,
    text: String,
    job: Job,
    seed: u64,
    metrics: RequestMetrics,
}

impl Job {
    /// The ids the model reads (phoneme ids, codec ids).
    fn input_ids(&self) -> Vec<u32> {
        match self {
            Job::Speak { sentences, .. } => sentences
                .iter()
                .flat_map(|s| s.ids.iter().map(|&i| i as u32))
                .collect(),
            Job::Codes { codes, .. } => codes.iter().map(|&c| c as u32).collect(),
            Job::Mel(_) | Job::CodeStream(_) => Vec::new(),
        }
    }
}

/// The non-autoregressive engine.
#[derive(Debug)]
pub struct GenerationEngine {
    model: GenerationModel,
    waiting: VecDeque<Pending>,
    steps: u64,
}

impl GenerationEngine {
    /// Loads the model `args.model` for `model_stage` (one of
    /// [`GENERATION_STAGES`]).
    pub fn new(args: &EngineArgs, model_stage: &str) -> Result<Self> {
        if let Some(n) = args.num_threads {
            tch::set_num_threads(n as i32);
        }
        let device = args.resolve_device()?;
        let model = match model_stage {
            "vits" => GenerationModel::Vits(Box::new(PiperVoice::load(&args.model, device)?)),
            "code2wav" => GenerationModel::Code2Wav(Box::new(Token2Wav::load(
                &crate::resolve_model_path(&args.model)?,
                device,
            )?)),
            "vocoder" => GenerationModel::Vocoder(Box::new(Vocoder::load(&args.model, device)?)),
            other => {
                return Err(Error::InvalidConfig {
                    field: "engine_args.model_stage".to_owned(),
                    value: other.to_owned(),
                    reason: format!(
                        "not a generation stage (expected one of {})",
                        GENERATION_STAGES.join(", ")
                    ),
                })
            }
        };
        Ok(GenerationEngine {
            model,
            waiting: VecDeque::new(),
            steps: 0,
        })
    }

    /// The model's name.
    pub fn model_name(&self) -> &str {
        match &self.model {
            GenerationModel::Vits(v) => v.name(),
            GenerationModel::Code2Wav(t) => t.name(),
            GenerationModel::Vocoder(v) => v.name(),
        }
    }

    /// Where it runs.
    pub fn device(&self) -> Device {
        match &self.model {
            GenerationModel::Vits(v) => v.vits().device(),
            GenerationModel::Code2Wav(t) => t.device(),
            GenerationModel::Vocoder(v) => v.device(),
        }
    }

    /// Samples per second of its output.
    pub fn sample_rate(&self) -> u32 {
        match &self.model {
            GenerationModel::Vits(v) => v.sample_rate(),
            GenerationModel::Code2Wav(_) => crate::qwen2_5_omni::SAMPLE_RATE,
            GenerationModel::Vocoder(v) => v.sample_rate(),
        }
    }

    /// The model.
    pub fn model(&self) -> &GenerationModel {
        &self.model
    }

    /// Checks and prepares a request (text to phonemes, scales, seed); it
    /// runs at a later step.
    pub fn add_request(
        &mut self,
        request_id: impl Into<String>,
        prompt: Prompt,
        params: SamplingParams,
    ) -> Result<()> {
        let request_id = request_id.into();
        if self.waiting.iter().any(|p| p.request_id == request_id) {
            return Err(Error::DuplicateRequest(request_id));
        }
        params.validate()?;
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        let (text, job) = match &self.model {
            GenerationModel::Vits(voice) => {
                let text = Self::text_of(prompt, &request_id, voice.name())?;
                let job = Job::Speak {
                    sentences: voice.phonemize(&text)?,
                    scales: voice.scales(&params),
                };
                (text, job)
            }
            GenerationModel::Code2Wav(t2w) => {
                let Prompt::TokenIds(ids) = prompt else {
                    return Err(Error::InvalidPrompt {
                        request_id,
                        reason: "code2wav speaks codec ids (the talker's output, or \
                                 prompt_token_ids), not text"
                            .to_owned(),
                    });
                };
                let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
                let codes = t2w.codes_of_talker_output(&ids).to_vec();
                let limit = t2w.dit().num_codes();
                if let Some(bad) = codes.iter().find(|&&c| c >= limit) {
                    return Err(Error::InvalidPrompt {
                        request_id,
                        reason: format!(
                            "codec id {bad} is outside code2wav's vocabulary 0..{limit}"
                        ),
                    });
                }
                // An unknown voice or too many codes fail here, naming the
                // value, not in the middle of a step.
                t2w.speakers().get(params.speaker.as_deref())?;
                t2w.check_length(codes.len())
                    .map_err(|reason| Error::InvalidPrompt {
                        request_id: request_id.clone(),
                        reason,
                    })?;
                let job = Job::Codes {
                    codes,
                    speaker: params.speaker.clone(),
                };
                (String::new(), job)
            }
            GenerationModel::Vocoder(v) => {
                return Err(Error::InvalidPrompt {
                    request_id,
                    reason: format!(
                        "{} turns log-mel frames into speech; it takes a mel \
                         (an upstream stage's `mel` tensor), not a prompt",
                        v.name()
                    ),
                })
            }
        };
        self.waiting.push_back(Pending {
            request_id,
            text,
            job,
            seed,
            metrics: RequestMetrics::new(0),
        });
        Ok(())
    }

    /// The text a voice speaks: a text prompt, or a chat's user turns.
    fn text_of(prompt: Prompt, request_id: &str, model: &str) -> Result<String> {
        Ok(match prompt {
            Prompt::Text(t) => t,
            Prompt::Chat(messages) => messages
                .into_iter()
                .filter(|m| m.role == "user")
                .map(|m| m.content.text())
                .collect::<Vec<_>>()
                .join("\n"),
            Prompt::TokenIds(_) => {
                return Err(Error::InvalidPrompt {
                    request_id: request_id.to_owned(),
                    reason: format!("{model} speaks text; token ids have no text to speak"),
                })
            }
            _ => {
                return Err(Error::InvalidPrompt {
                    request_id: request_id.to_owned(),
                    reason: format!("{model} speaks text; it reads no multi_modal_data"),
                })
            }
        })
    }

    /// Queues a request of a vocoder: a log-mel `[n_mels, frames]` in the
    /// settings of [`Vocoder::mel_config`].
    pub fn add_mel_request(
        &mut self,
        request_id: impl Into<String>,
        mel: &tch::Tensor,
        params: SamplingParams,
    ) -> Result<()> {
        let request_id = request_id.into();
        let GenerationModel::Vocoder(v) = &self.model else {
            return Err(Error::InvalidPrompt {
                request_id,
                reason: format!("{} does not take a mel", self.model_name()),
            });
        };
        let n_mels = v.mel_config().n_mels;
        if mel.dim() != 2 || mel.size()[0] != n_mels || mel.size()[1] == 0 {
            return Err(Error::InvalidPrompt {
                request_id,
                reason: format!(
                    "a mel of shape {:?}; {} takes [{n_mels}, frames]",
                    mel.size(),
                    v.name()
                ),
            });
        }
        if self.waiting.iter().any(|p| p.request_id == request_id) {
            return Err(Error::DuplicateRequest(request_id));
        }
        self.waiting.push_back(Pending {
            request_id,
            text: String::new(),
            job: Job::Mel(mel.to_kind(tch::Kind::Float)),
            seed: params.seed.unwrap_or(0),
            metrics: RequestMetrics::new(0),
        });
        Ok(())
    }

    /// Starts a request whose codes come while the talker generates them
    /// (a streamed edge): `prompt` holds the codes so far (token ids),
    /// `complete` that no more follow. Its audio comes out piece by piece
    /// as chunks of codes are ready (see [`crate::qwen2_5_omni::ChunkPlan`]);
    /// only code2wav takes one.
    pub fn start_streamed_request(
        &mut self,
        request_id: impl Into<String>,
        prompt: Prompt,
        params: SamplingParams,
        complete: bool,
    ) -> Result<()> {
        let request_id = request_id.into();
        if self.waiting.iter().any(|p| p.request_id == request_id) {
            return Err(Error::DuplicateRequest(request_id));
        }
        params.validate()?;
        let GenerationModel::Code2Wav(t2w) = &self.model else {
            return Err(Error::InvalidPrompt {
                request_id,
                reason: format!(
                    "{} takes whole inputs only; stream its input edge with window_size: -1",
                    self.model_name()
                ),
            });
        };
        let Prompt::TokenIds(ids) = prompt else {
            return Err(Error::InvalidPrompt {
                request_id,
                reason: "code2wav speaks codec ids, not text".to_owned(),
            });
        };
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        let mut stream = t2w.start_stream(params.speaker.as_deref(), seed)?;
        let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        t2w.push_codes(&mut stream, &ids, complete)
            .map_err(|e| Error::InvalidPrompt {
                request_id: request_id.clone(),
                reason: e.to_string(),
            })?;
        self.waiting.push_back(Pending {
            request_id,
            text: String::new(),
            job: Job::CodeStream(Box::new(stream)),
            seed,
            metrics: RequestMetrics::new(0),
        });
        Ok(())
    }

    /// More codes for a request of [`GenerationEngine::start_streamed_request`];
    /// `last`: no more follow. `false` when the request is not here.
    pub fn extend_streamed_request(
        &mut self,
        request_id: &str,
        token_ids: &[u32],
        last: bool,
    ) -> Result<bool> {
        let GenerationModel::Code2Wav(t2w) = &self.model else {
            return Ok(false);
        };
        let Some(p) = self.waiting.iter_mut().find(|p| p.request_id == request_id) else {
            return Ok(false);
        };
        let Job::CodeStream(stream) = &mut p.job else {
            return Err(Error::InvalidPrompt {
                request_id: request_id.to_owned(),
                reason: "it was not started as a streamed request".to_owned(),
            });
        };
        let ids: Vec<i64> = token_ids.iter().map(|&i| i64::from(i)).collect();
        t2w.push_codes(stream, &ids, last)
            .map_err(|e| Error::InvalidPrompt {
                request_id: request_id.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(true)
    }

    /// Whether a request can run now: a whole one, or a streamed one with a
    /// chunk of codes ready.
    fn runnable(&self, p: &Pending) -> bool {
        match (&self.model, &p.job) {
            (GenerationModel::Code2Wav(t2w), Job::CodeStream(s)) => t2w.piece_ready(s),
            _ => true,
        }
    }

    /// Whether a step would do anything now (a streamed request waiting
    /// for codes is unfinished but not runnable).
    pub fn has_runnable(&self) -> bool {
        self.waiting.iter().any(|p| self.runnable(p))
    }

    /// Drops a waiting request; `false` if it is unknown or done.
    pub fn abort(&mut self, request_id: &str) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|p| p.request_id != request_id);
        self.waiting.len() != before
    }

    /// Whether any request waits.
    pub fn has_unfinished(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Requests waiting; a generation model samples no tokens.
    pub fn load(&self) -> EngineLoad {
        EngineLoad {
            unfinished_requests: self.waiting.len(),
            ..EngineLoad::default()
        }
    }

    /// Runs the oldest waiting request (one forward); its output is
    /// finished and carries its waveform.
    ///
    /// One request a step, not a batch of them: each is its own forward
    /// anyway (see the module's notes), and a step's outputs leave together,
    /// so a batch would hold every answer back until the last one of it is
    /// spoken (the main job's first answer waited 2.8 s for the other two).
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        self.steps += 1;
        let next = self.waiting.iter().position(|p| self.runnable(p));
        let streams = next.is_some_and(|i| matches!(self.waiting[i].job, Job::CodeStream(_)));
        // Streams' chunks run together (one DiT batch per window length);
        // a whole request runs alone (see the module's notes).
        let batch: Vec<Pending> = if streams {
            let mut taken = Vec::new();
            let mut i = 0;
            while i < self.waiting.len() && taken.len() < MAX_STREAM_BATCH {
                let ready = matches!(self.waiting[i].job, Job::CodeStream(_))
                    && self.runnable(&self.waiting[i]);
                match ready.then(|| self.waiting.remove(i)).flatten() {
                    Some(p) => taken.push(p),
                    None => i += 1,
                }
            }
            taken
        } else {
            next.and_then(|i| self.waiting.remove(i))
                .into_iter()
                .collect()
        };
        let ids: Vec<&str> = batch.iter().map(|p| p.request_id.as_str()).collect();
        let _step = tracing::info_span!(target: "omni::engine", "step", step = self.steps,
            request_ids = ids.join(",").as_str(), batch_size = batch.len())
        .entered();
        let sample_rate = self.sample_rate();
        if streams {
            return self.stream_pieces(batch, sample_rate);
        }
        let mut outputs = Vec::with_capacity(batch.len());
        for mut p in batch {
            let now = Instant::now();
            p.metrics.first_scheduled_time.get_or_insert(now);
            let prompt_token_ids = p.job.input_ids();
            let num_ids = prompt_token_ids.len();
            let samples = {
                let _f = tracing::info_span!(target: "omni::engine", "forward",
                    phase = "generate", request_ids = p.request_id.as_str(), num_tokens = num_ids)
                .entered();
                match (&self.model, &p.job) {
                    (GenerationModel::Vits(voice), Job::Speak { sentences, scales }) => {
                        voice.synthesize(sentences, *scales, p.seed)?
                    }
                    (GenerationModel::Code2Wav(t2w), Job::Codes { codes, speaker }) => {
                        t2w.synthesize(codes, speaker.as_deref(), p.seed)?
                    }
                    (GenerationModel::Vocoder(v), Job::Mel(mel)) => v.synthesize(mel)?,
                    (_, Job::CodeStream(_)) => unreachable!("streams run in stream_pieces"),
                    _ => unreachable!("add_request prepares the job its model runs"),
                }
            };
            let done = Instant::now();
            p.metrics.first_token_time = Some(done);
            p.metrics.finished_time = Some(done);
            p.metrics.num_prompt_tokens = num_ids;
            // The phoneme or codec ids stand for the prompt's tokens; the
            // text is the transcript of what was spoken (for a voice).
            let audio = Waveform {
                samples,
                sample_rate,
            };
            outputs.push(RequestOutput {
                prompt_token_ids,
                delta_text: p.text.clone(),
                text: p.text,
                ..RequestOutput::without_tokens(p.request_id, Some(audio), true, p.metrics)
            });
        }
        Ok(outputs)
    }
}

impl GenerationEngine {
    /// Runs the next chunk of each streamed request: its piece of audio, as
    /// an unfinished output (none while the vocoder holds the chunk back),
    /// or the last piece as the finished one. Unfinished requests go to the
    /// back of the queue, so streams take turns with whole requests.
    fn stream_pieces(
        &mut self,
        mut batch: Vec<Pending>,
        sample_rate: u32,
    ) -> Result<Vec<RequestOutput>> {
        let GenerationModel::Code2Wav(t2w) = &self.model else {
            return Ok(Vec::new());
        };
        let now = Instant::now();
        let pieces = {
            let ids: Vec<String> = batch.iter().map(|p| p.request_id.clone()).collect();
            let mut streams: Vec<&mut CodeStream> = batch
                .iter_mut()
                .filter_map(|p| match &mut p.job {
                    Job::CodeStream(s) => Some(&mut **s),
                    _ => None,
                })
                .collect();
            let codes: usize = streams.iter().map(|s| s.num_codes()).sum();
            let _f = tracing::info_span!(target: "omni::engine", "forward",
                phase = "generate", request_ids = ids.join(",").as_str(), num_tokens = codes)
            .entered();
            t2w.next_pieces(&mut streams)?
        };
        let done = Instant::now();
        let mut outputs = Vec::new();
        for (mut p, piece) in batch.into_iter().zip(pieces) {
            p.metrics.first_scheduled_time.get_or_insert(now);
            let Job::CodeStream(stream) = &p.job else {
                continue;
            };
            let finished = stream.is_finished();
            let num_codes = stream.num_codes();
            let samples = match piece {
                Some(s) if s.numel() > 0 || finished => s,
                _ => {
                    self.waiting.push_back(p);
                    continue;
                }
            };
            p.metrics.first_token_time.get_or_insert(done);
            p.metrics.num_prompt_tokens = num_codes;
            if finished {
                p.metrics.finished_time = Some(done);
            }
            let audio = Waveform {
                samples,
                sample_rate,
            };
            outputs.push(RequestOutput::without_tokens(
                p.request_id.clone(),
                Some(audio),
                finished,
                p.metrics,
            ));
            if !finished {
                self.waiting.push_back(p);
            }
        }
        Ok(outputs)
    }
}

/// The engine a stage runs: the paged, continuously batched LLM engine, or
/// the generation engine, picked by `engine_args.model_stage`.
#[derive(Debug)]
pub enum StageEngine {
    /// Autoregressive text (and codec) stages.
    Llm(Box<LLMEngine>),
    /// Non-autoregressive stages (speech).
    Generation(Box<GenerationEngine>),
}

impl StageEngine {
    /// Loads the engine `model_stage` calls for: a generation engine for
    /// [`GENERATION_STAGES`], the LLM engine otherwise.
    pub fn new(args: &EngineArgs, model_stage: Option<&str>) -> Result<Self> {
        match model_stage {
            Some(stage) if GENERATION_STAGES.contains(&stage) => Ok(StageEngine::Generation(
                Box::new(GenerationEngine::new(args, stage)?),
            )),
            _ => Ok(StageEngine::Llm(Box::new(LLMEngine::new_part(
                args,
                model_stage,
            )?))),
        }
    }

    /// The model's name.
    pub fn model_name(&self) -> &str {
        match self {
            StageEngine::Llm(e) => e.model_name(),
            StageEngine::Generation(e) => e.model_name(),
        }
    }

    /// Where it runs.
    pub fn device(&self) -> Device {
        match self {
            StageEngine::Llm(e) => e.device(),
            StageEngine::Generation(e) => e.device(),
        }
    }

    /// Samples per second, for a stage that makes audio.
    pub fn sample_rate(&self) -> Option<u32> {
        match self {
            StageEngine::Llm(_) => None,
            StageEngine::Generation(e) => Some(e.sample_rate()),
        }
    }

    /// The longest prompt plus output, in tokens (0: no such limit).
    pub fn max_model_len(&self) -> usize {
        match self {
            StageEngine::Llm(e) => e.max_model_len(),
            StageEngine::Generation(_) => 0,
        }
    }

    /// See [`LLMEngine::add_request`].
    pub fn add_request(
        &mut self,
        request_id: impl Into<String>,
        prompt: Prompt,
        params: SamplingParams,
    ) -> Result<()> {
        match self {
            StageEngine::Llm(e) => e.add_request(request_id, prompt, params),
            StageEngine::Generation(e) => e.add_request(request_id, prompt, params),
        }
    }

    /// Whether it is Qwen2.5-Omni's talker (its requests come with the
    /// thinker's states: [`LLMEngine::add_talker_request`]).
    pub fn is_talker(&self) -> bool {
        matches!(self, StageEngine::Llm(e) if e.is_talker())
    }

    /// See [`LLMEngine::add_talker_request_with_positions`].
    pub fn add_talker_request_with_positions(
        &mut self,
        request_id: impl Into<String>,
        states: &tch::Tensor,
        prompt_len: usize,
        positions: Option<&tch::Tensor>,
        params: SamplingParams,
    ) -> Result<()> {
        let request_id = request_id.into();
        self.talker(&request_id)?
            .add_talker_request_with_positions(request_id, states, prompt_len, positions, params)
    }

    /// See [`LLMEngine::start_talker_request`].
    pub fn start_talker_request(
        &mut self,
        request_id: impl Into<String>,
        states: &tch::Tensor,
        prompt_len: usize,
        positions: Option<&tch::Tensor>,
        params: SamplingParams,
    ) -> Result<()> {
        let request_id = request_id.into();
        self.talker(&request_id)?
            .start_talker_request(request_id, states, prompt_len, positions, params)
    }

    /// See [`LLMEngine::extend_talker_request`].
    pub fn extend_talker_request(
        &mut self,
        request_id: &str,
        states: &tch::Tensor,
        thinker_finished: bool,
    ) -> Result<bool> {
        self.talker(request_id)?
            .extend_talker_request(request_id, states, thinker_finished)
    }

    fn talker(&mut self, request_id: &str) -> Result<&mut LLMEngine> {
        match self {
            StageEngine::Llm(e) => Ok(e),
            StageEngine::Generation(e) => Err(Error::InvalidPrompt {
                request_id: request_id.to_owned(),
                reason: format!("{} is not Qwen2.5-Omni's talker", e.model_name()),
            }),
        }
    }

    /// See [`GenerationEngine::add_mel_request`].
    pub fn add_mel_request(
        &mut self,
        request_id: impl Into<String>,
        mel: &tch::Tensor,
        params: SamplingParams,
    ) -> Result<()> {
        match self {
            StageEngine::Generation(e) => e.add_mel_request(request_id, mel, params),
            StageEngine::Llm(e) => Err(Error::InvalidPrompt {
                request_id: request_id.into(),
                reason: format!("{} does not take a mel", e.model_name()),
            }),
        }
    }

    /// See [`LLMEngine::abort`].
    pub fn abort(&mut self, request_id: &str) -> bool {
        match self {
            StageEngine::Llm(e) => e.abort(request_id),
            StageEngine::Generation(e) => e.abort(request_id),
        }
    }

    /// See [`LLMEngine::step`].
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        match self {
            StageEngine::Llm(e) => e.step(),
            StageEngine::Generation(e) => e.step(),
        }
    }

    /// See [`LLMEngine::has_unfinished`].
    pub fn has_unfinished(&self) -> bool {
        match self {
            StageEngine::Llm(e) => e.has_unfinished(),
            StageEngine::Generation(e) => e.has_unfinished(),
        }
    }

    /// See [`LLMEngine::has_runnable`].
    pub fn has_runnable(&self) -> bool {
        match self {
            StageEngine::Llm(e) => e.has_runnable(),
            StageEngine::Generation(e) => e.has_runnable(),
        }
    }

    /// See [`GenerationEngine::start_streamed_request`] (only code2wav
    /// takes a streamed prompt; a talker starts on states).
    pub fn start_streamed_request(
        &mut self,
        request_id: impl Into<String>,
        prompt: Prompt,
        params: SamplingParams,
        complete: bool,
    ) -> Result<()> {
        match self {
            StageEngine::Generation(e) => {
                e.start_streamed_request(request_id, prompt, params, complete)
            }
            StageEngine::Llm(e) => Err(Error::InvalidPrompt {
                request_id: request_id.into(),
                reason: format!(
                    "{} takes whole prompts only; stream its input edge with window_size: -1",
                    e.model_name()
                ),
            }),
        }
    }

    /// More input for a request started on a streamed edge: a talker's
    /// thinker `states` rows ([`LLMEngine::extend_talker_request`]), or
    /// code2wav's codes ([`GenerationEngine::extend_streamed_request`]);
    /// `last`: nothing follows. `false` when the request is no longer here.
    pub fn extend_streamed_request(
        &mut self,
        request_id: &str,
        token_ids: &[u32],
        states: Option<&tch::Tensor>,
        last: bool,
    ) -> Result<bool> {
        match self {
            StageEngine::Llm(e) => {
                let none = tch::Tensor::zeros([0], tch::kind::FLOAT_CPU);
                e.extend_talker_request(request_id, states.unwrap_or(&none), last)
            }
            StageEngine::Generation(e) => e.extend_streamed_request(request_id, token_ids, last),
        }
    }

    /// See [`LLMEngine::load`].
    pub fn load(&self) -> EngineLoad {
        match self {
            StageEngine::Llm(e) => e.load(),
            StageEngine::Generation(e) => e.load(),
        }
    }
}
