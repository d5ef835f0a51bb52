//! The public engine: [`EngineArgs`] in, [`LLMEngine`] out.
//!
//! `LLMEngine` is vLLM's `LLMEngine` in miniature: `add_request`, `step`,
//! `abort`, `has_unfinished`. It owns the tokenizer (prompts in, text out,
//! incremental detokenization) around the token-level
//! [`crate::engine_core::EngineCore`] (model, paged KV cache, scheduler,
//! sampler).
//!
//! ```no_run
//! use omni_engine::{EngineArgs, LLMEngine, Prompt, SamplingParams};
//! # fn main() -> omni_engine::Result<()> {
//! let mut engine = LLMEngine::new(&EngineArgs::default())?; // SmolLM2 on CPU
//! engine.add_request("0", Prompt::Text("The capital of France is".into()), SamplingParams::greedy())?;
//! while engine.has_unfinished() {
//!     for out in engine.step()? {
//!         print!("{}", out.delta_text);
//!     }
//! }
//! # Ok(()) }
//! ```
use std::collections::HashMap;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::block_pool::PrefixCacheStats;
use crate::engine_core::{CoreConfig, EngineCore, EngineLoad, TextEvent};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::linear::WeightPrecision;
use crate::model::{Model, ModelOptions};
use crate::request::{Prompt, ReplyStream, RequestOutput, Sequence, TokenLogprobs};
use crate::sampling_params::SamplingParams;
use crate::scheduler::SchedulerConfig;
use crate::{Detokenizer, Tokenizer};

/// KV budget on CPU when none is given: a quarter of available memory, at
/// most this much, and never more than `max_num_seqs` full-length sequences
/// need. The CPU cache is zeroed at load (`KvCache::new`), so this much is
/// resident from the start: a pipeline whose stages name no budget holds a
/// quarter of what each stage saw available.
const DEFAULT_CPU_KV_BYTES: u64 = 2 << 30;
/// KV budget on CUDA when none is given (tch cannot query free device memory).
const DEFAULT_CUDA_KV_BYTES: u64 = 8 << 30;

/// How to build an engine; field names follow vLLM's `EngineArgs`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineArgs {
    /// Path to a `.gguf` file or an HF folder, or a default model's alias
    /// (`smollm2`, `HuggingFaceTB/SmolLM2-135M-Instruct`).
    pub model: String,
    /// `auto` (bf16 on CUDA, fp32 on CPU), `float32`, `bfloat16`, `float16`.
    pub dtype: Option<String>,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    pub device: Option<String>,
    /// Linear-layer weights: `auto` (`q4` on CPU when fbgemm works, else
    /// native), `native`/`fp32`, `fp16`, `q4` (a GGUF file's quantized
    /// blocks for calls of up to `quant_max_rows` rows, fp16 above and for
    /// matrices stored otherwise). See [`WeightPrecision`].
    pub weight_precision: Option<String>,
    /// With `weight_precision: q4`: the most rows (tokens in a step) a layer
    /// multiplies with the quantized blocks; default
    /// [`crate::linear::QUANT_MAX_ROWS`].
    pub quant_max_rows: Option<usize>,
    /// Sequences in the running batch at most.
    pub max_num_seqs: usize,
    /// Tokens per step at most (prefill chunks and decodes together).
    pub max_num_batched_tokens: usize,
    /// Context length; defaults to the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    /// KV block size in tokens.
    pub block_size: usize,
    /// Reuse the K/V of full blocks whose prefix an earlier request computed
    /// (vLLM's automatic prefix caching; on by default, as in vLLM v1).
    pub enable_prefix_caching: bool,
    /// KV cache budget in bytes; default derived from device memory.
    pub kv_cache_memory_bytes: Option<u64>,
    /// The dtype K and V are stored in: `auto` (the activations' `dtype`),
    /// `float32`, `bfloat16`, `float16`. A 16-bit cache under fp32
    /// activations holds twice the tokens in the same budget and halves
    /// the bytes a decode step's attention reads, at the price of K and V
    /// rounded to 16 bits (logits move; greedy output may part from
    /// transformers' where its top two are that close). Attention that
    /// reads a prompt's own new K/V fresh instead of from the cache (long
    /// prefills; SDPA off the CPU kernel) sees them unrounded, so results
    /// also depend, in their last digits, on which path a step took.
    pub kv_cache_dtype: Option<String>,
    /// Seeds requests that bring no seed of their own.
    pub seed: u64,
    /// libtorch intra-op threads; default: libtorch's choice.
    pub num_threads: Option<usize>,
}

impl Default for EngineArgs {
    fn default() -> Self {
        Self {
            model: "HuggingFaceTB/SmolLM2-135M-Instruct".to_owned(),
            dtype: None,
            device: None,
            weight_precision: None,
            quant_max_rows: None,
            // vLLM's 256 is for GPUs; on a few CPU cores larger batches stop
            // paying once the weights are no longer the bottleneck.
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_model_len: None,
            block_size: 16,
            enable_prefix_caching: true,
            kv_cache_memory_bytes: None,
            kv_cache_dtype: None,
            seed: 0,
            num_threads: None,
        }
    }
}

fn invalid(field: &str, value: impl ToString, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        field: format!("engine_args.{field}"),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// The dtype `field` names (`auto` or absent: `auto`).
fn dtype_named(field: &str, name: Option<&str>, auto: Kind) -> Result<Kind> {
    match name.unwrap_or("auto") {
        "auto" => Ok(auto),
        "float32" | "float" | "fp32" => Ok(Kind::Float),
        "bfloat16" | "bf16" => Ok(Kind::BFloat16),
        "float16" | "half" | "fp16" => Ok(Kind::Half),
        other => Err(invalid(
            field,
            other,
            "expected auto, float32, bfloat16 or float16",
        )),
    }
}

impl EngineArgs {
    /// An engine for `model` with the other fields at their defaults.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            ..Self::default()
        }
    }

    /// The device `device` names.
    pub fn resolve_device(&self) -> Result<Device> {
        let name = self.device.as_deref().unwrap_or("auto");
        match name {
            "auto" => Ok(Device::cuda_if_available()),
            "cpu" => Ok(Device::Cpu),
            _ => {
                let index = match name.strip_prefix("cuda") {
                    Some("") => 0,
                    Some(rest) => rest
                        .strip_prefix(':')
                        .and_then(|n| n.parse::<usize>().ok())
                        .ok_or_else(|| {
                            invalid("device", name, "expected auto, cpu, cuda or cuda:N")
                        })?,
                    None => {
                        return Err(invalid(
                            "device",
                            name,
                            "expected auto, cpu, cuda or cuda:N",
                        ))
                    }
                };
                let count = tch::Cuda::device_count() as usize;
                if index >= count {
                    return Err(invalid(
                        "device",
                        name,
                        format!("{count} CUDA device(s) available"),
                    ));
                }
                Ok(Device::Cuda(index))
            }
        }
    }

    /// The activation dtype `dtype` names on `device`.
    pub fn resolve_dtype(&self, device: Device) -> Result<Kind> {
        let auto = if device.is_cuda() {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        dtype_named("dtype", self.dtype.as_deref(), auto)
    }

    /// The dtype `kv_cache_dtype` names, under activations of `kind`.
    pub fn resolve_kv_cache_dtype(&self, kind: Kind) -> Result<Kind> {
        dtype_named("kv_cache_dtype", self.kv_cache_dtype.as_deref(), kind)
    }

    /// The weight precision `weight_precision` names.
    pub fn resolve_weight_precision(&self, device: Device, kind: Kind) -> Result<WeightPrecision> {
        match self.weight_precision.as_deref().unwrap_or("auto") {
            // Blocks where the file has them and fbgemm's fp16 for the
            // rest and for wide calls (BENCHMARKS.md: faster than fp16 alone
            // up to 4 rows, the same above).
            "auto" => Ok(
                if device == Device::Cpu && kind == Kind::Float && crate::linear::fbgemm_runs() {
                    WeightPrecision::Q4
                } else {
                    WeightPrecision::Native
                },
            ),
            name => {
                let p = WeightPrecision::parse(name)?;
                p.check(device, kind)?;
                Ok(p)
            }
        }
    }

    fn check_limits(&self) -> Result<()> {
        if self.max_num_seqs == 0 {
            return Err(invalid("max_num_seqs", 0, "must be at least 1"));
        }
        if self.max_num_batched_tokens == 0 {
            return Err(invalid("max_num_batched_tokens", 0, "must be at least 1"));
        }
        if self.block_size == 0 || self.block_size > 1024 {
            return Err(invalid(
                "block_size",
                self.block_size,
                "must be in 1..=1024",
            ));
        }
        if let Some(0) = self.num_threads {
            return Err(invalid("num_threads", 0, "must be at least 1"));
        }
        Ok(())
    }
}

fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A language model served with continuous batching.
#[derive(Debug)]
pub struct LLMEngine {
    core: EngineCore,
    tokenizer: Tokenizer,
    model_name: String,
    precision: WeightPrecision,
    detokenizers: HashMap<String, Detokenizer>,
    /// Qwen2.5-Omni's talker: what builds its inputs from the thinker's.
    talker: Option<Talker>,
    /// Qwen2.5-Omni's thinker: its media encoders, when the folder has them.
    media: Option<crate::qwen2_5_omni::ThinkerMedia>,
}

/// What Qwen2.5-Omni's talker needs beyond its decoder to build its inputs
/// from the thinker's states (transformers' `generate`, and vLLM-Omni's
/// `talker_preprocess`).
#[derive(Debug)]
struct Talker {
    /// The thinker's token embeddings, `[thinker vocab, embedding]`.
    thinker_embed: Tensor,
    speakers: crate::qwen2_5_omni::Speakers,
    ids: crate::qwen2_5_omni::TalkerConfig,
}

impl LLMEngine {
    /// Loads the model and tokenizer named by `args.model` and sizes the KV
    /// cache.
    pub fn new(args: &EngineArgs) -> Result<Self> {
        Self::new_part(args, None)
    }

    /// [`LLMEngine::new`] for one part of a checkpoint that holds several
    /// (`model_stage`: Qwen2.5-Omni's `thinker` or `talker`).
    pub fn new_part(args: &EngineArgs, model_stage: Option<&str>) -> Result<Self> {
        args.check_limits()?;
        if let Some(n) = args.num_threads {
            tch::set_num_threads(n as i32);
        }
        let device = args.resolve_device()?;
        let kind = args.resolve_dtype(device)?;
        let kv_kind = args.resolve_kv_cache_dtype(kind)?;
        let precision = args.resolve_weight_precision(device, kind)?;
        let _guard = tch::no_grad_guard();
        tracing::info!(target: "omni::engine", model = %args.model, ?device, ?kind, precision = precision.as_str(), "loading model");
        let heap = LoadHeap::enter();
        let blocks = if precision.keeps_blocks() {
            crate::weights::Blocks::Keep
        } else {
            crate::weights::Blocks::Dequantize
        };
        let loaded =
            crate::loader::load_model_part_with(&args.model, model_stage, device, kind, blocks)?;
        let talker = if loaded.part == "talker" {
            Some(Talker::load(
                &crate::resolve_model_path(&args.model)?,
                kind,
                device,
            )?)
        } else {
            None
        };
        let media = if loaded.part == "thinker" {
            crate::qwen2_5_omni::ThinkerMedia::load(
                &crate::resolve_model_path(&args.model)?,
                kind,
                device,
            )?
        } else {
            None
        };
        let cfg = loaded.config;
        if media.as_ref().is_some_and(|m| m.vision_encoder().is_some())
            && cfg.mrope_section.is_none()
        {
            return Err(invalid(
                "model",
                &args.model,
                "the thinker has a vision encoder but its text_config states no \
                 rope_scaling.mrope_section: images need 3-D rotary positions",
            ));
        }
        let mut weights = loaded.weights;
        let max_model_len = match args.max_model_len {
            None => cfg.max_position_embeddings,
            Some(n) if n >= 2 && n <= cfg.max_position_embeddings => n,
            Some(n) => {
                return Err(invalid(
                    "max_model_len",
                    n,
                    format!(
                        "must be in 2..={} (the model's max_position_embeddings)",
                        cfg.max_position_embeddings
                    ),
                ))
            }
        };
        let model = Model::new(
            &cfg,
            &mut weights,
            &ModelOptions {
                precision,
                quant_max_rows: args.quant_max_rows.unwrap_or(crate::linear::QUANT_MAX_ROWS),
                max_positions: max_model_len,
            },
        )?;
        drop(weights);
        drop(heap);

        let per_block = KvCache::bytes_per_block(&cfg, args.block_size, kv_kind);
        // Never more than every sequence at full length needs.
        let full =
            per_block * (args.max_num_seqs * max_model_len.div_ceil(args.block_size) + 1) as u64;
        let budget = args.kv_cache_memory_bytes.unwrap_or_else(|| {
            let default = if device.is_cuda() {
                DEFAULT_CUDA_KV_BYTES
            } else {
                available_memory_bytes()
                    .map(|m| m / 4)
                    .unwrap_or(DEFAULT_CPU_KV_BYTES)
                    .min(DEFAULT_CPU_KV_BYTES)
            };
            default.min(full)
        });
        let num_blocks = KvCache::num_blocks_for_budget(&cfg, args.block_size, kv_kind, budget)?;
        tracing::info!(
            target: "omni::engine",
            num_blocks,
            block_size = args.block_size,
            kv_kind = ?kv_kind,
            kv_bytes = num_blocks as u64 * per_block,
            max_model_len,
            "kv cache sized"
        );
        let mut eos = cfg.eos_token_ids.clone();
        for t in loaded.tokenizer.eos_token_ids() {
            if !eos.contains(&t) {
                eos.push(t);
            }
        }
        let core = EngineCore::new(
            model,
            CoreConfig {
                scheduler: SchedulerConfig {
                    max_num_seqs: args.max_num_seqs,
                    max_num_batched_tokens: args.max_num_batched_tokens,
                },
                block_size: args.block_size,
                num_blocks,
                kv_kind,
                // The talker's prompts are placeholders for embeddings: equal
                // ids, different inputs, so blocks cannot be shared by id.
                prefix_caching: args.enable_prefix_caching && talker.is_none(),
                max_model_len,
                eos_token_ids: eos,
                seed: args.seed,
                suppressed_tokens: talker
                    .as_ref()
                    .map(|t| vec![t.ids.tts_codec_start_token_id as u32])
                    .unwrap_or_default(),
            },
        )?;
        Ok(Self {
            core,
            tokenizer: loaded.tokenizer,
            model_name: loaded.name,
            precision,
            detokenizers: HashMap::new(),
            talker,
            media,
        })
    }

    /// The model's name, e.g. `SmolLM2-135M-Instruct`.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// Where the model runs.
    pub fn device(&self) -> Device {
        self.core.model().device()
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model (for inspection: config, single-shot logits).
    pub fn model(&self) -> &Model {
        self.core.model()
    }

    /// The precision the linear layers' weights are kept in.
    pub fn weight_precision(&self) -> WeightPrecision {
        self.precision
    }

    /// The context length in tokens.
    pub fn max_model_len(&self) -> usize {
        self.core.max_model_len()
    }

    /// KV cache blocks (including the reserved one).
    pub fn num_kv_blocks(&self) -> usize {
        self.core.num_kv_blocks()
    }

    /// Prefix-cache hits since the engine started.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.core.prefix_cache_stats()
    }

    /// Turns a prompt into token ids as the engine would.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Text(text) => self.tokenizer.encode(text, true),
            Prompt::Chat(messages) => {
                let rendered = self.tokenizer.apply_chat_template(messages, true)?;
                // The template spells out its special tokens itself.
                self.tokenizer.encode(&rendered, false)
            }
            Prompt::TokenIds(ids) => Ok(ids.clone()),
            Prompt::MultiModal(m) => match m.prompt.as_ref() {
                Prompt::MultiModal(_) => Err(Error::InvalidConfig {
                    field: "prompt.prompt".to_owned(),
                    value: "a prompt with multi_modal_data".to_owned(),
                    reason: "media prompts do not nest: give a text, chat or token-id prompt"
                        .to_owned(),
                }),
                inner => self.encode_prompt(inner),
            },
        }
    }

    /// The thinker's media encoders (Qwen2.5-Omni's thinker, when its
    /// folder holds them).
    pub fn media_encoders(&self) -> Option<&crate::qwen2_5_omni::ThinkerMedia> {
        self.media.as_ref()
    }

    /// Queues a request; it joins the running batch at the next step.
    pub fn add_request(
        &mut self,
        request_id: impl Into<String>,
        prompt: Prompt,
        params: SamplingParams,
    ) -> Result<()> {
        let request_id = request_id.into();
        if self.talker.is_some() {
            return Err(Error::InvalidPrompt {
                request_id,
                reason: "Qwen2.5-Omni's talker reads the thinker's states, not a prompt \
                         (in a pipeline, its input processor is thinker2talker)"
                    .to_owned(),
            });
        }
        if self.detokenizers.contains_key(&request_id) {
            return Err(Error::DuplicateRequest(request_id));
        }
        if prompt.media().is_some() && self.media.is_none() {
            return Err(Error::InvalidPrompt {
                request_id,
                reason: format!(
                    "{} reads text only: it has no encoder for multi_modal_data",
                    self.model_name
                ),
            });
        }
        let ids = self.encode_prompt(&prompt)?;
        let (ids, inputs) = match (prompt.media(), &self.media) {
            (Some(data), Some(media)) => {
                let max_len = self.core.max_model_len();
                let expanded = media.expand(&request_id, &ids, data, max_len)?;
                let _guard = tch::no_grad_guard();
                let model = self.core.model();
                let all: Vec<i64> = expanded.ids.iter().map(|&t| i64::from(t)).collect();
                let all = Tensor::from_slice(&all).f_to_device(model.device())?;
                let mut embeds = model.embed(&all)?;
                let mut rows_at = Vec::new();
                for (at, rows) in &expanded.items {
                    let index: Vec<i64> = at.iter().map(|&p| p as i64).collect();
                    let index = Tensor::from_slice(&index).f_to_device(model.device())?;
                    let rows = rows.f_to_device(model.device())?.f_to_kind(embeds.kind())?;
                    let _ = embeds.f_index_copy_(0, &index, &rows)?;
                    rows_at.extend_from_slice(at);
                }
                // The media positions as spans (the states leave them bare).
                rows_at.sort_unstable();
                let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
                for p in rows_at {
                    match ranges.last_mut() {
                        Some(r) if r.end == p => r.end += 1,
                        _ => ranges.push(p..p + 1),
                    }
                }
                let inputs = crate::request::SequenceInputs {
                    prompt: embeds,
                    stream: None,
                    media: ranges,
                    mrope: expanded.positions,
                    mrope_delta: expanded.position_delta,
                };
                (expanded.ids, Some(inputs))
            }
            _ => (ids, None),
        };
        let detok = self.tokenizer.detokenizer(&ids, params.skip_special_tokens);
        self.core
            .add_with_inputs(request_id.clone(), ids, params, inputs)?;
        self.detokenizers.insert(request_id, detok);
        Ok(())
    }

    /// Whether this engine is Qwen2.5-Omni's talker.
    pub fn is_talker(&self) -> bool {
        self.talker.is_some()
    }

    /// Queues a request of Qwen2.5-Omni's talker. `states` are the thinker's
    /// ([`crate::RequestOutput::states`]: per position it read, embedding
    /// plus final hidden state), the first `prompt_len` rows its prompt's,
    /// the rest its generated tokens' (all but the last). As transformers
    /// builds the talker's input:
    ///
    /// * prompt rows: the thinker's prompt states; then the speaker's token
    ///   (thinker embedding) plus the codec pad embedding; then the first
    ///   generated token's state plus the codec BOS embedding;
    /// * each decoding step: the embedding of the code just sampled plus
    ///   the next reply row: the thinker's states of its second to
    ///   second-to-last tokens, then the text end embedding, then the text
    ///   pad embedding for as long as the talker goes on.
    ///
    /// transformers 5.24's `generate` adds the codec pad and BOS embeddings
    /// only when the talker gets an attention mask, which for one unpadded
    /// request it drops; its padded batches, its talker's own forward and
    /// vLLM-Omni add them, and so do we.
    pub fn add_talker_request(
        &mut self,
        request_id: impl Into<String>,
        states: &Tensor,
        prompt_len: usize,
        params: SamplingParams,
    ) -> Result<()> {
        self.add_talker_request_with_positions(request_id, states, prompt_len, None, params)
    }

    /// [`LLMEngine::add_talker_request`] for a thinker prompt with 3-D RoPE
    /// positions (`[3, prompt_len]`, [`RequestOutput::mrope_positions`]):
    /// the talker's prompt takes them, its two extra rows (speaker, first
    /// reply) the next two positions, and later tokens their index plus the
    /// thinker's delta (transformers' `get_rope_index` on the talker's
    /// `input_text_ids`).
    pub fn add_talker_request_with_positions(
        &mut self,
        request_id: impl Into<String>,
        states: &Tensor,
        prompt_len: usize,
        positions: Option<&Tensor>,
        params: SamplingParams,
    ) -> Result<()> {
        let input = TalkerInput {
            states,
            prompt_len,
            positions,
            complete: true,
        };
        self.add_talker(request_id.into(), input, params)
    }

    /// [`LLMEngine::add_talker_request_with_positions`] while the thinker
    /// is still writing: `states` are its states so far (the prompt's and
    /// at least its first generated token's), and the talker runs ahead on
    /// them, waiting (without holding up other requests) whenever it needs
    /// a reply row that has not come yet. Later rows come through
    /// [`LLMEngine::extend_talker_request`]; given all at once, the talker
    /// generates what [`LLMEngine::add_talker_request_with_positions`]
    /// would.
    pub fn start_talker_request(
        &mut self,
        request_id: impl Into<String>,
        states: &Tensor,
        prompt_len: usize,
        positions: Option<&Tensor>,
        params: SamplingParams,
    ) -> Result<()> {
        let input = TalkerInput {
            states,
            prompt_len,
            positions,
            complete: false,
        };
        self.add_talker(request_id.into(), input, params)
    }

    /// More of the thinker's states for a request started with
    /// [`LLMEngine::start_talker_request`] (`[n, hidden]`, may be empty);
    /// `thinker_finished` ends its reply (the text end and pad rows
    /// follow). `false` when the request is no longer here (the talker
    /// finished first, or it was aborted).
    pub fn extend_talker_request(
        &mut self,
        request_id: &str,
        states: &Tensor,
        thinker_finished: bool,
    ) -> Result<bool> {
        let Some(t) = &self.talker else {
            return Err(Error::InvalidPrompt {
                request_id: request_id.to_owned(),
                reason: format!("{} is not Qwen2.5-Omni's talker", self.model_name),
            });
        };
        let mut rows = Vec::with_capacity(3);
        if states.numel() > 0 {
            rows.push(
                states
                    .f_to_device(t.thinker_embed.device())?
                    .f_to_kind(t.thinker_embed.kind())?,
            );
        }
        if thinker_finished {
            rows.push(t.thinker_row(t.ids.tts_text_end_token_id)?);
            rows.push(t.thinker_row(t.ids.tts_text_pad_token_id)?);
        }
        let rows = match rows.len() {
            0 => Tensor::zeros(
                [0, t.thinker_embed.size()[1]],
                (t.thinker_embed.kind(), t.thinker_embed.device()),
            ),
            _ => Tensor::f_cat(&rows, 0)?,
        };
        self.core.extend_stream(request_id, rows, thinker_finished)
    }

    fn add_talker(
        &mut self,
        request_id: String,
        input: TalkerInput<'_>,
        params: SamplingParams,
    ) -> Result<()> {
        let TalkerInput {
            states,
            prompt_len,
            positions,
            complete,
        } = input;
        let Some(t) = &self.talker else {
            return Err(Error::InvalidPrompt {
                request_id,
                reason: format!("{} is not Qwen2.5-Omni's talker", self.model_name),
            });
        };
        let bad = |reason: String| Error::InvalidPrompt {
            request_id: request_id.clone(),
            reason,
        };
        let rows = states.size().first().copied().unwrap_or(0) as usize;
        let width = t.thinker_embed.size()[1];
        if states.dim() != 2
            || states.size()[1] != width
            || rows < prompt_len + 1
            || prompt_len == 0
        {
            return Err(bad(format!(
                "thinker states of shape {:?} for a {prompt_len}-token prompt: expected \
                 [prompt + at least one generated token, {width}]",
                states.size()
            )));
        }
        let speaker = t.speakers.get(params.speaker.as_deref())?;
        let device = t.thinker_embed.device();
        let kind = t.thinker_embed.kind();
        let states = states.f_to_device(device)?.f_to_kind(kind)?;
        let thinker = |id: i64| t.thinker_row(id);
        let codec = |id: i64| -> Result<Tensor> {
            let ids = Tensor::from_slice(&[id]).f_to_device(device)?;
            self.core.model().embed(&ids)
        };
        let p = prompt_len as i64;
        let replies = rows as i64 - p;
        let prompt = Tensor::f_cat(
            &[
                states.f_narrow(0, 0, p)?,
                thinker(speaker.bos_token)?.f_add(&codec(t.ids.tts_codec_pad_token_id)?)?,
                states
                    .f_narrow(0, p, 1)?
                    .f_add(&codec(t.ids.tts_codec_start_token_id)?)?,
            ],
            0,
        )?;
        let mut stream = vec![states.f_narrow(0, p + 1, replies - 1)?];
        if complete {
            stream.push(thinker(t.ids.tts_text_end_token_id)?);
            stream.push(thinker(t.ids.tts_text_pad_token_id)?);
        }
        let stream = ReplyStream::new(Tensor::f_cat(&stream, 0)?, complete);
        let (mrope, mrope_delta) = match positions {
            None => (Vec::new(), 0),
            Some(p) => {
                if p.size() != [3, prompt_len as i64] || p.kind() != Kind::Int64 {
                    return Err(bad(format!(
                        "3-D positions of shape {:?} ({:?}) for a {prompt_len}-token prompt: \
                         expected [3, {prompt_len}] int64",
                        p.size(),
                        p.kind()
                    )));
                }
                let flat: Vec<i64> = Vec::<i64>::try_from(p.f_reshape([-1])?)?;
                let mut rows: Vec<[i64; 3]> = (0..prompt_len)
                    .map(|i| [flat[i], flat[prompt_len + i], flat[2 * prompt_len + i]])
                    .collect();
                // The speaker's and the first reply's rows are text after the
                // prompt's last token; later tokens add the delta of the
                // largest position (transformers' get_rope_index on
                // input_text_ids).
                let last = rows.last().map_or(-1, |p| p[0].max(p[1]).max(p[2]));
                let top = flat.iter().copied().max().unwrap_or(-1).max(last + 2);
                let limit = self.core.max_model_len() as i64;
                let delta = top + 1 - (prompt_len as i64 + 2);
                if flat.iter().any(|&v| v < 0) || top >= limit || delta > 0 {
                    return Err(bad(format!(
                        "3-D positions must lie in 0..{limit} (max_model_len) and not outrun \
                         the tokens; these reach {top} over {} tokens",
                        prompt_len + 2
                    )));
                }
                rows.push([last + 1; 3]);
                rows.push([last + 2; 3]);
                (rows, delta)
            }
        };
        let mut ids = vec![t.ids.tts_codec_mask_token_id as u32; prompt_len];
        ids.push(t.ids.tts_codec_pad_token_id as u32);
        ids.push(t.ids.tts_codec_start_token_id as u32);
        self.core.add_with_inputs(
            request_id,
            ids,
            params,
            Some(crate::request::SequenceInputs {
                prompt,
                stream: Some(stream),
                media: Vec::new(),
                mrope,
                mrope_delta,
            }),
        )
    }

    /// Drops a request wherever it is; `false` if it is unknown or done.
    pub fn abort(&mut self, request_id: &str) -> bool {
        self.detokenizers.remove(request_id);
        self.core.abort(request_id)
    }

    /// Runs one step; one output per request that produced a token (or
    /// finished).
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        let tokenizer = &self.tokenizer;
        let detokenizers = &mut self.detokenizers;
        let mut hook = |seq: &mut Sequence, event: TextEvent| -> Result<()> {
            if let TextEvent::Token { .. } = event {
                // The tokens of new log-probabilities: the last generated
                // token's, and after the prefill the prompt's.
                let first = seq.num_output_tokens() == 1;
                let fresh = seq.logprobs.iter_mut().rev().take(1);
                let prompt = seq.prompt_logprobs.iter_mut().filter(|_| first);
                for lp in fresh.chain(prompt).filter(|lp| lp.decoded.is_empty()) {
                    decode_logprob_tokens(tokenizer, lp);
                }
            }
            if let Some(d) = detokenizers.get_mut(&seq.request_id) {
                let piece = match event {
                    TextEvent::Finish => d.flush(tokenizer)?,
                    TextEvent::Token { with_text: true } => {
                        d.step(tokenizer, seq.tokens[seq.tokens.len() - 1])?
                    }
                    TextEvent::Token { with_text: false } => String::new(),
                };
                seq.text.push_str(&piece);
            }
            Ok(())
        };
        let mut outputs = self.core.step(&mut hook)?;
        for o in &mut outputs {
            if let Some(p) = &mut o.prompt_logprobs {
                p.first_token = self.tokenizer.decode(&[p.first_token_id], false)?;
                p.text = self.tokenizer.decode(&o.prompt_token_ids, false)?;
            }
            if o.finished {
                self.detokenizers.remove(&o.request_id);
            }
        }
        Ok(outputs)
    }

    /// Whether any request is queued or running.
    pub fn has_unfinished(&self) -> bool {
        self.core.has_unfinished()
    }

    /// Whether a step would do anything now: false while every request
    /// held waits for more input ([`LLMEngine::extend_talker_request`]).
    pub fn has_runnable(&self) -> bool {
        self.core.has_runnable()
    }

    /// Requests held and tokens generated so far.
    pub fn load(&self) -> EngineLoad {
        self.core.load()
    }
}

/// glibc malloc settings while a model loads. Loading makes and drops a
/// full-precision copy of every weight (dequantized GGUF blocks, fp32
/// before fp16 packing), megabytes each, and glibc keeps freed arena memory
/// resident. Measured with SmolLM2 and fp16 weights: 816 MB anonymous after
/// loading; 618 MB with the heap trimmed after the load; and a load peak
/// (VmHWM) of 914 MB, 818 MB when every block of 1 MiB or more gets its own
/// mapping during the load, which `free` returns whole. On drop the
/// threshold goes to 32 MiB (glibc's adaptive ceiling) and the heap is
/// trimmed.
///
/// Setting the mmap threshold also freezes glibc's trim threshold (at
/// 128 KiB unless set): every step's freed activations at the top of a heap
/// then went back to the kernel and came back as fresh zeroed pages in the
/// next step (measured: 630k page faults in the stage processes during a
/// 64-prompt pipeline run, 2.5 GB of pages; 144k with the threshold
/// raised). So after the load each arena keeps up to [`STEP_HEAP_KEEP`] of
/// free memory at its top for the next step. The model thread's arena is
/// made of 64 MiB heaps, and glibc unmaps a heap that empties unless the
/// top pad is more than a heap can hold: a prefill step's activations
/// (tens of MB a layer) emptied and refilled heaps layer after layer, each
/// time as fresh pages (measured: a 64-prompt pipeline run's batch took
/// 190-285k page faults, ~150k with the top pad raised too, about what its
/// KV blocks' first touch took before the cache was zeroed at load). Blocks
/// of 32 MiB or more are still mapped and unmapped each time. The settings are process-wide: every
/// thread's arena (the runtime's and the sockets' too) keeps its peak since
/// the load, so resident memory between steps stays near the last big
/// step's instead of shrinking (the stages' peak RSS rose ~35 MB). A later
/// load starts from the load's settings again.
struct LoadHeap;

/// Free memory an arena keeps mapped between steps (see [`LoadHeap`]).
const STEP_HEAP_KEEP: i32 = 256 << 20;

/// glibc's default trim threshold, for the next load.
const DEFAULT_TRIM_THRESHOLD: i32 = 128 << 10;

/// glibc's default top pad, for the next load.
const DEFAULT_TOP_PAD: i32 = 128 << 10;

impl LoadHeap {
    fn enter() -> Self {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator tuning; any thread may call it.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD);
            libc::mallopt(libc::M_TOP_PAD, DEFAULT_TOP_PAD);
        }
        LoadHeap
    }
}

impl Drop for LoadHeap {
    fn drop(&mut self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: as above; malloc_trim only returns free memory.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::malloc_trim(0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, STEP_HEAP_KEEP);
            libc::mallopt(libc::M_TOP_PAD, STEP_HEAP_KEEP);
        }
    }
}

/// The thinker's states a talker request starts from.
struct TalkerInput<'a> {
    states: &'a Tensor,
    prompt_len: usize,
    positions: Option<&'a Tensor>,
    /// The thinker has finished: the reply is whole.
    complete: bool,
}

impl Talker {
    /// The thinker's embedding of `id`, `[1, embedding]`.
    fn thinker_row(&self, id: i64) -> Result<Tensor> {
        let vocab = self.thinker_embed.size()[0];
        if !(0..vocab).contains(&id) {
            return Err(Error::InvalidConfig {
                field: "talker token".to_owned(),
                value: id.to_string(),
                reason: format!("outside the thinker's embedding of {vocab} rows"),
            });
        }
        Ok(self.thinker_embed.f_get(id)?.f_unsqueeze(0)?)
    }

    fn load(dir: &std::path::Path, kind: Kind, device: Device) -> Result<Self> {
        let config = crate::qwen2_5_omni::OmniConfig::read(dir)?;
        let dit = &config.token2wav_config.dit_config;
        let speakers = crate::qwen2_5_omni::Speakers::load(
            &dir.join("spk_dict.pt"),
            dit.enc_emb_dim,
            dit.mel_dim,
        )?;
        let mut w = crate::safetensors::SafetensorsFiles::find(dir)?.load_prefix(
            "thinker.model.embed_tokens.",
            kind,
            device,
        )?;
        Ok(Talker {
            thinker_embed: w.take("weight")?,
            speakers,
            ids: config.talker_config,
        })
    }
}

/// Fills `lp.decoded`: each token alone, special tokens kept; ids past the
/// tokenizer's vocabulary (padding rows of an embedding) have no text.
fn decode_logprob_tokens(tokenizer: &Tokenizer, lp: &mut TokenLogprobs) {
    let ids = std::iter::once(lp.token_id).chain(lp.top.iter().map(|&(t, _)| t));
    lp.decoded = ids
        .map(|t| tokenizer.decode(&[t], false).unwrap_or_default())
        .collect();
}
