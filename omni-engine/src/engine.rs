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
use tch::{Device, Kind};

use crate::block_pool::PrefixCacheStats;
use crate::engine_core::{CoreConfig, EngineCore};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::linear::WeightPrecision;
use crate::model::{Model, ModelOptions};
use crate::request::{Prompt, RequestOutput, Sequence};
use crate::sampling_params::SamplingParams;
use crate::scheduler::SchedulerConfig;
use crate::{Detokenizer, Tokenizer};

/// KV budget on CPU when none is given: a quarter of available memory, at
/// most this much (pages are only touched as blocks get used).
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
    /// Linear-layer weights: `auto` (fp16 on CPU when fbgemm works, else
    /// native), `native`/`fp32`, `fp16`. See [`WeightPrecision`].
    pub weight_precision: Option<String>,
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
            // vLLM's 256 is for GPUs; on a few CPU cores larger batches stop
            // paying once the weights are no longer the bottleneck.
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_model_len: None,
            block_size: 16,
            enable_prefix_caching: true,
            kv_cache_memory_bytes: None,
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
        let name = self.dtype.as_deref().unwrap_or("auto");
        match name {
            "auto" => Ok(if device.is_cuda() {
                Kind::BFloat16
            } else {
                Kind::Float
            }),
            "float32" | "float" | "fp32" => Ok(Kind::Float),
            "bfloat16" | "bf16" => Ok(Kind::BFloat16),
            "float16" | "half" | "fp16" => Ok(Kind::Half),
            _ => Err(invalid(
                "dtype",
                name,
                "expected auto, float32, bfloat16 or float16",
            )),
        }
    }

    /// The weight precision `weight_precision` names.
    pub fn resolve_weight_precision(&self, device: Device, kind: Kind) -> Result<WeightPrecision> {
        match self.weight_precision.as_deref().unwrap_or("auto") {
            "auto" => Ok(
                if device == Device::Cpu && kind == Kind::Float && fp16_linear_works() {
                    WeightPrecision::Fp16
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

/// Whether fbgemm's fp16 kernels run on this CPU (AVX2).
fn fp16_linear_works() -> bool {
    let w = tch::Tensor::ones([8, 8], (Kind::Float, Device::Cpu));
    crate::linear::Linear::new(w, None, WeightPrecision::Fp16).is_ok()
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
}

impl LLMEngine {
    /// Loads the model and tokenizer named by `args.model` and sizes the KV
    /// cache.
    pub fn new(args: &EngineArgs) -> Result<Self> {
        args.check_limits()?;
        if let Some(n) = args.num_threads {
            tch::set_num_threads(n as i32);
        }
        let device = args.resolve_device()?;
        let kind = args.resolve_dtype(device)?;
        let precision = args.resolve_weight_precision(device, kind)?;
        let _guard = tch::no_grad_guard();
        tracing::info!(target: "omni::engine", model = %args.model, ?device, ?kind, precision = precision.as_str(), "loading model");
        let heap = LoadHeap::enter();
        let loaded = crate::load_model(&args.model, device, kind)?;
        let cfg = loaded.config;
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
                max_positions: max_model_len,
            },
        )?;
        drop(weights);
        drop(heap);

        let per_block = KvCache::bytes_per_block(&cfg, args.block_size, kind);
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
        let num_blocks = KvCache::num_blocks_for_budget(&cfg, args.block_size, kind, budget)?;
        tracing::info!(
            target: "omni::engine",
            num_blocks,
            block_size = args.block_size,
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
                prefix_caching: args.enable_prefix_caching,
                max_model_len,
                eos_token_ids: eos,
                seed: args.seed,
            },
        )?;
        Ok(Self {
            core,
            tokenizer: loaded.tokenizer,
            model_name: loaded.name,
            precision,
            detokenizers: HashMap::new(),
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
        }
    }

    /// Queues a request; it joins the running batch at the next step.
    pub fn add_request(
        &mut self,
        request_id: impl Into<String>,
        prompt: Prompt,
        params: SamplingParams,
    ) -> Result<()> {
        let request_id = request_id.into();
        if self.detokenizers.contains_key(&request_id) {
            return Err(Error::DuplicateRequest(request_id));
        }
        let ids = self.encode_prompt(&prompt)?;
        let detok = self.tokenizer.detokenizer(&ids, params.skip_special_tokens);
        self.core.add(request_id.clone(), ids, params)?;
        self.detokenizers.insert(request_id, detok);
        Ok(())
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
        let mut hook = |seq: &mut Sequence, finishing: bool| -> Result<()> {
            if let Some(d) = detokenizers.get_mut(&seq.request_id) {
                let piece = if finishing {
                    d.flush(tokenizer)?
                } else {
                    d.step(tokenizer, seq.tokens[seq.tokens.len() - 1])?
                };
                seq.text.push_str(&piece);
            }
            Ok(())
        };
        let outputs = self.core.step(&mut hook)?;
        for o in &outputs {
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
struct LoadHeap;

impl LoadHeap {
    fn enter() -> Self {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator tuning; any thread may call it.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
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
        }
    }
}
