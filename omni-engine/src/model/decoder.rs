//! The decoder-only transformer of the Llama family (Llama 2/3, Mistral,
//! SmolLM2), Qwen2 and Qwen3, as one implementation.
//!
//! References: Touvron et al., "Llama 2" (<https://arxiv.org/abs/2307.09288>),
//! and transformers' `modeling_llama.py`, `modeling_qwen2.py`,
//! `modeling_qwen3.py`. The three differ only in data: Qwen2 adds biases to
//! the q/k/v projections ([`ModelConfig::attention_bias`]), Qwen3 adds an
//! RMSNorm over each query and key head before RoPE
//! ([`ModelConfig::qk_norm`]); everything else (pre-norm residual blocks,
//! RoPE, grouped-query attention, SwiGLU MLP, tied or separate LM head) is
//! shared. One file driven by [`ModelConfig`] keeps the hot path in one place
//! instead of three copies that drift apart (candle's `rope_is_neox` style).
//!
//! Layout choices for speed: q/k/v are one fused matmul, gate/up another;
//! the LM head only runs on the rows that are sampled; attention reads the
//! paged cache through the index tensors of [`ForwardBatch`].
use tch::{Device, Kind, Tensor};

use super::batch::{ForwardBatch, RowGroup, RowKeys};
use super::decode_layer::{self, decode_layer, DecodeRow, LayerBlocks};
use super::fused::Kernels;
use super::paged_attention::{paged_attention, paged_kv_write};
use super::rotary::Rotary;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::linear::{Linear, WeightPrecision};
use crate::quant::QuantMatrix;
use crate::weights::{LinearWeight, Weights};

/// How to build a [`Model`] from its weights.
#[derive(Debug, Clone, Copy)]
pub struct ModelOptions {
    /// Precision of the linear layers' weights.
    pub precision: WeightPrecision,
    /// With [`WeightPrecision::Q4`] (or `Q4Int8`): the most rows a call multiplies with
    /// the blocks (wider ones run the fp16 copy).
    pub quant_max_rows: usize,
    /// Positions the rotary tables cover (the engine's `max_model_len`).
    pub max_positions: usize,
}

/// What one forward pass returns, one row per entry that wanted logits.
#[derive(Debug)]
pub struct ModelOutput {
    /// `[rows, vocab]`, fp32.
    pub logits: Tensor,
    /// Final-norm hidden states `[rows, hidden]` (the LM head's input).
    pub hidden: Tensor,
    /// For the batch's `state_rows`: input embedding plus final-norm hidden
    /// state, `[rows, hidden]`.
    pub states: Option<Tensor>,
    /// For the batch's `prompt_logit_rows`: final-norm hidden states
    /// `[rows, hidden]`, for [`Model::logits`] a slice at a time (a long
    /// prompt's logits at once would take gigabytes).
    pub prompt_hidden: Option<Tensor>,
}

#[derive(Debug)]
struct Layer {
    input_layernorm: Tensor,
    /// q, k and v projections stacked: `[(heads + 2 kv_heads) * head_dim, hidden]`.
    qkv_proj: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    o_proj: Linear,
    post_attention_layernorm: Tensor,
    /// gate and up projections stacked: `[2 * intermediate, hidden]`.
    gate_up_proj: Linear,
    down_proj: Linear,
}

/// The token embedding table.
#[derive(Debug)]
enum Embedding {
    Dense(Tensor),
    /// GGUF blocks, rows dequantized as they are looked up.
    Blocks(QuantMatrix),
}

impl Embedding {
    fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Embedding::Dense(t) => Ok(t.f_index_select(0, ids)?),
            Embedding::Blocks(m) => m.rows(ids),
        }
    }
}

/// A loaded decoder.
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    embed_tokens: Embedding,
    /// Projects embeddings of `embedding_size` to the hidden size
    /// (Qwen2.5-Omni's talker: `thinker_to_talker_proj`).
    input_proj: Option<Linear>,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rotary: Rotary,
    /// `[head_dim]`: the RoPE position row (temporal, height, width) of
    /// each column, when the model has multimodal RoPE.
    mrope_columns: Option<Tensor>,
    device: Device,
    kind: Kind,
}

/// A tensor of `shape`, dense (dequantized if the loader kept it in blocks).
fn take(w: &mut Weights, name: &str, shape: &[i64]) -> Result<Tensor> {
    take_linear(w, name, shape)?.into_dense()
}

/// A linear layer's weight, kept in blocks if the loader kept it so.
fn take_linear(w: &mut Weights, name: &str, shape: &[i64]) -> Result<LinearWeight> {
    let t = w.take_linear(name)?;
    if t.shape() != shape {
        return Err(Error::Weight {
            name: name.to_owned(),
            reason: format!("has shape {:?}, the config implies {shape:?}", t.shape()),
        });
    }
    Ok(t)
}

impl Layer {
    fn new(w: &mut Weights, i: usize, cfg: &ModelConfig, opts: &ModelOptions) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let linear =
            |parts, bias| Linear::from_parts(parts, bias, opts.precision, opts.quant_max_rows);
        let (h, d) = (cfg.hidden_size as i64, cfg.head_dim as i64);
        let (nh, nkv) = (
            cfg.num_attention_heads as i64,
            cfg.num_key_value_heads as i64,
        );
        let inter = cfg.intermediate_size as i64;
        let attn = format!("{p}.self_attn");
        let qkv = vec![
            take_linear(w, &format!("{attn}.q_proj.weight"), &[nh * d, h])?,
            take_linear(w, &format!("{attn}.k_proj.weight"), &[nkv * d, h])?,
            take_linear(w, &format!("{attn}.v_proj.weight"), &[nkv * d, h])?,
        ];
        let qkv_bias = if cfg.attention_bias {
            let qb = take(w, &format!("{attn}.q_proj.bias"), &[nh * d])?;
            let kb = take(w, &format!("{attn}.k_proj.bias"), &[nkv * d])?;
            let vb = take(w, &format!("{attn}.v_proj.bias"), &[nkv * d])?;
            Some(Tensor::f_cat(&[qb, kb, vb], 0)?)
        } else {
            None
        };
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(take(w, &format!("{attn}.q_norm.weight"), &[d])?),
                Some(take(w, &format!("{attn}.k_norm.weight"), &[d])?),
            )
        } else {
            (None, None)
        };
        let o = take_linear(w, &format!("{attn}.o_proj.weight"), &[h, nh * d])?;
        let mlp = format!("{p}.mlp");
        let gate_up = vec![
            take_linear(w, &format!("{mlp}.gate_proj.weight"), &[inter, h])?,
            take_linear(w, &format!("{mlp}.up_proj.weight"), &[inter, h])?,
        ];
        let down = take_linear(w, &format!("{mlp}.down_proj.weight"), &[h, inter])?;
        Ok(Self {
            input_layernorm: take(w, &format!("{p}.input_layernorm.weight"), &[h])?,
            qkv_proj: linear(qkv, qkv_bias)?,
            q_norm,
            k_norm,
            o_proj: linear(vec![o], None)?,
            post_attention_layernorm: take(
                w,
                &format!("{p}.post_attention_layernorm.weight"),
                &[h],
            )?,
            gate_up_proj: linear(gate_up, None)?,
            down_proj: linear(vec![down], None)?,
        })
    }
}

impl Model {
    /// Builds the decoder from `weights` (HF names, already in the engine's
    /// dtype and on its device), taking the tensors it uses.
    pub fn new(cfg: &ModelConfig, weights: &mut Weights, opts: &ModelOptions) -> Result<Self> {
        let (v, h) = (cfg.vocab_size as i64, cfg.hidden_size as i64);
        if cfg.num_attention_heads % cfg.num_key_value_heads.max(1) != 0
            || cfg.num_key_value_heads == 0
        {
            return Err(Error::InvalidConfig {
                field: "num_key_value_heads".to_owned(),
                value: cfg.num_key_value_heads.to_string(),
                reason: format!(
                    "must divide num_attention_heads = {}",
                    cfg.num_attention_heads
                ),
            });
        }
        let e = cfg.embedding_size.map_or(h, |e| e as i64);
        let embed = take_linear(weights, "model.embed_tokens.weight", &[v, e])?;
        let (device, kind) = match &embed {
            LinearWeight::Dense(t) => (t.device(), t.kind()),
            // Kept in blocks only for fp32 on the CPU.
            LinearWeight::Quantized(_) => (Device::Cpu, Kind::Float),
        };
        opts.precision.check(device, kind)?;
        let input_proj = if cfg.embedding_size.is_some() {
            let w = take_linear(weights, "model.input_proj.weight", &[h, e])?;
            let b = if weights.contains("model.input_proj.bias") {
                Some(take(weights, "model.input_proj.bias", &[h])?)
            } else {
                None
            };
            Some(Linear::from_parts(
                vec![w],
                b,
                opts.precision,
                opts.quant_max_rows,
            )?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            layers.push(Layer::new(weights, i, cfg, opts)?);
        }
        let norm = take(weights, "model.norm.weight", &[h])?;
        let tied = input_proj.is_none()
            && (cfg.tie_word_embeddings || !weights.contains("lm_head.weight"));
        let head = if tied {
            match &embed {
                LinearWeight::Dense(t) => LinearWeight::Dense(t.shallow_clone()),
                LinearWeight::Quantized(q) => LinearWeight::Quantized(q.shallow_clone()),
            }
        } else {
            take_linear(weights, "lm_head.weight", &[v, h])?
        };
        let lm_head = Linear::from_parts(vec![head], None, opts.precision, opts.quant_max_rows)?;
        let embed_tokens = match embed {
            LinearWeight::Dense(t) => Embedding::Dense(t),
            LinearWeight::Quantized(q) => Embedding::Blocks(QuantMatrix::new(&[&q])?),
        };
        let rotary = Rotary::new(cfg, opts.max_positions, kind, device)?;
        // For each column of a head, which of the three positions rotates
        // it: the sections in order over the first half, again over the second.
        let mrope_columns = match &cfg.mrope_section {
            Some(sections) => {
                let half: Vec<i64> = sections
                    .iter()
                    .enumerate()
                    .flat_map(|(row, &n)| std::iter::repeat_n(row as i64, n))
                    .collect();
                let cols = [half.as_slice(), half.as_slice()].concat();
                Some(Tensor::from_slice(&cols).f_to_device(device)?)
            }
            None => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            input_proj,
            layers,
            norm,
            lm_head,
            rotary,
            mrope_columns,
            device,
            kind,
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Where its weights live.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Its activations' dtype.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// A KV cache for this model, in its activations' dtype.
    pub fn new_cache(&self, num_blocks: usize, block_size: usize) -> Result<KvCache> {
        self.new_cache_of(num_blocks, block_size, self.kind)
    }

    /// A KV cache for this model that stores K and V as `kind`
    /// (`kv_cache_dtype`): converted to it after RoPE, and read back in the
    /// queries' dtype (fp32 inside the CPU kernel).
    pub fn new_cache_of(
        &self,
        num_blocks: usize,
        block_size: usize,
        kind: Kind,
    ) -> Result<KvCache> {
        KvCache::new(&self.cfg, num_blocks, block_size, kind, self.device)
    }

    /// Runs the tokens of `batch`, writing their K/V into `cache`, and
    /// returns logits and hidden states of the rows that wanted them.
    pub fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<ModelOutput> {
        let _guard = tch::no_grad_guard();
        let t = batch.num_tokens as i64;
        let (nh, nkv, d) = (
            self.cfg.num_attention_heads as i64,
            self.cfg.num_key_value_heads as i64,
            self.cfg.head_dim as i64,
        );
        let eps = self.cfg.rms_norm_eps;
        let (cos, sin) = match (&batch.mrope_positions, &self.mrope_columns) {
            (Some(_), None) => {
                return Err(Error::InvalidConfig {
                    field: "rope_scaling.mrope_section".to_owned(),
                    value: "none".to_owned(),
                    reason: "a sequence has 3-D rotary positions, and this model has no \
                             multimodal RoPE"
                        .to_owned(),
                })
            }
            (Some(p), Some(cols)) => {
                let max = batch.mrope_max;
                if max >= self.rotary.len() {
                    return Err(Error::InvalidConfig {
                        field: "rotary position".to_owned(),
                        value: max.to_string(),
                        reason: format!(
                            "past the {} positions of the rotary tables (max_model_len)",
                            self.rotary.len()
                        ),
                    });
                }
                self.rotary.tables_3d(p, cols)?
            }
            _ => self.rotary.tables(&batch.positions)?,
        };
        // The residual stream; owned here, so the norms add into it in place.
        let mut x = self.embed_tokens.lookup(&batch.input_ids)?;
        if let Some((rows, values)) = &batch.embeds {
            let _ = x.f_index_copy_(0, rows, &values.f_to_kind(x.kind())?)?;
        }
        let embedded = match &batch.state_rows {
            Some(rows) => {
                let mut e = x.f_index_select(0, rows)?;
                if let Some(bare) = &batch.bare_state_rows {
                    let _ = e.f_index_fill_(0, bare, 0.0)?;
                }
                Some(e)
            }
            None => None,
        };
        if let Some(proj) = &self.input_proj {
            x = proj.forward(&x)?;
        }
        let ops = Kernels::for_tensor(&x);
        let mut h = match self.layers.first() {
            Some(first) => ops.rms_norm(&x, &first.input_layernorm, eps)?,
            None => x.shallow_clone(),
        };
        if let Some((blocks, [block_tables, row_tables, context_lens])) =
            self.lone_decode(batch, &x, cache)
        {
            let row = DecodeRow {
                heads: nh,
                kv_heads: nkv,
                eps,
                cos: &cos,
                sin: &sin,
                block_tables,
                row_tables,
                context_lens,
                slots: &batch.slots,
                block_size: cache.block_size(),
                scale: 1.0 / (d as f64).sqrt(),
            };
            for (l, (layer, blocks)) in self.layers.iter().zip(&blocks).enumerate() {
                decode_layer(
                    &mut x,
                    &mut h,
                    blocks,
                    &layer.post_attention_layernorm,
                    self.layers.get(l + 1).map(|next| &next.input_layernorm),
                    &cache.k[l],
                    &cache.v[l],
                    &row,
                )?;
            }
        } else {
            for (l, layer) in self.layers.iter().enumerate() {
                let qkv = layer.qkv_proj.forward(&h)?;
                let v = qkv
                    .f_narrow(1, (nh + nkv) * d, nkv * d)?
                    .f_view([t, nkv, d])?;
                // Queries and keys rotate together (one RoPE for both) unless
                // Qwen3's per-head norms must touch them separately first.
                let qk = qkv
                    .f_narrow(1, 0, (nh + nkv) * d)?
                    .f_view([t, nh + nkv, d])?;
                let qk = match (&layer.q_norm, &layer.k_norm) {
                    (Some(qn), Some(kn)) => {
                        let norm = |x: Tensor, w: &Tensor| -> Result<Tensor> {
                            let heads = x.size()[1];
                            let flat = x.f_reshape([-1, d])?;
                            Ok(ops.rms_norm(&flat, w, eps)?.f_view([t, heads, d])?)
                        };
                        Tensor::f_cat(
                            &[
                                norm(qk.f_narrow(1, 0, nh)?, qn)?,
                                norm(qk.f_narrow(1, nh, nkv)?, kn)?,
                            ],
                            1,
                        )?
                    }
                    _ => qk,
                };
                let qk = ops.rope(qk, &cos, &sin)?;
                let q = qk.f_narrow(1, 0, nh)?;
                let k = qk.f_narrow(1, nh, nkv)?;
                // New K/V in the cache's dtype; the CPU kernel's row copies
                // round fp32 into a 16-bit cache themselves.
                let rounds_itself =
                    batch.paged && k.kind() == Kind::Float && cache.kind() != Kind::Float;
                let stored = |x: &Tensor| -> Result<Tensor> {
                    if rounds_itself {
                        Ok(x.shallow_clone())
                    } else {
                        in_kind(x.shallow_clone(), cache.kind())
                    }
                };
                let (k_new, v_new) = (stored(&k)?, stored(&v)?);
                if batch.paged {
                    paged_kv_write(&cache.k[l], &cache.v[l], &batch.slots, &k_new, &v_new)?;
                } else {
                    let _ = cache.k[l].f_index_copy_(0, &batch.slots, &k_new)?;
                    let _ = cache.v[l].f_index_copy_(0, &batch.slots, &v_new)?;
                }
                let attn = self.attention(batch, cache, l, &q, &k, &v)?;
                let o = layer.o_proj.forward(&attn)?;
                h = ops.add_rms_norm(&mut x, &o, &layer.post_attention_layernorm, eps)?;

                let act = ops.silu_and_mul(&layer.gate_up_proj.forward(&h)?)?;
                let down = layer.down_proj.forward(&act)?;
                match self.layers.get(l + 1) {
                    Some(next) => {
                        h = ops.add_rms_norm(&mut x, &down, &next.input_layernorm, eps)?
                    }
                    None => {
                        let _ = x.f_add_(&down)?;
                    }
                }
            }
        }
        let states = match (&batch.state_rows, embedded) {
            (Some(rows), Some(e)) => {
                let h = ops.rms_norm(&x.f_index_select(0, rows)?, &self.norm, eps)?;
                Some(h.f_add(&e)?)
            }
            _ => None,
        };
        let prompt_hidden = match &batch.prompt_logit_rows {
            Some(rows) => Some(ops.rms_norm(&x.f_index_select(0, rows)?, &self.norm, eps)?),
            None => None,
        };
        let rows = x.f_index_select(0, &batch.logits_rows)?;
        let hidden = ops.rms_norm(&rows, &self.norm, eps)?;
        let logits = self.lm_head.forward(&hidden)?.f_to_kind(Kind::Float)?;
        Ok(ModelOutput {
            logits,
            hidden,
            states,
            prompt_hidden,
        })
    }

    /// For a step of one decoding token that the fused layer runs
    /// ([`decode_layer`]): every layer's blocks, and the row's block tables,
    /// table and context length. `None` sends the step op by op: other
    /// devices and dtypes, more tokens, prefills, Qwen3's q/k norms, a
    /// product that is not on blocks at one row, or `OMNI_FUSED_DECODE=0`.
    fn lone_decode<'s, 'b>(
        &'s self,
        batch: &'b ForwardBatch,
        x: &Tensor,
        cache: &KvCache,
    ) -> Option<(Vec<LayerBlocks<'s>>, [&'b Tensor; 3])> {
        let keys = match &batch.batched {
            Some(RowGroup {
                count: 1,
                keys:
                    RowKeys::Paged {
                        block_tables,
                        row_tables,
                        context_lens,
                    },
            }) => [block_tables, row_tables, context_lens],
            _ => return None,
        };
        let fits = batch.num_tokens == 1
            && batch.paged
            && batch.prefills.is_empty()
            && Kernels::for_tensor(x) == Kernels::Fused
            && x.is_contiguous()
            && matches!(cache.kind(), Kind::Float | Kind::Half | Kind::BFloat16)
            && decode_layer::enabled();
        if !fits {
            return None;
        }
        let blocks = self
            .layers
            .iter()
            .map(|layer| {
                if layer.q_norm.is_some() || layer.k_norm.is_some() {
                    return None;
                }
                let (qkv, activations) = layer.qkv_proj.blocks_for(1)?;
                // The kernel adds a bias as fp32 values, one per column.
                let qkv_bias = layer.qkv_proj.bias();
                if let Some(b) = qkv_bias {
                    let fits = b.kind() == Kind::Float
                        && b.device() == Device::Cpu
                        && b.is_contiguous()
                        && b.numel() as i64 == qkv.out_features();
                    if !fits {
                        return None;
                    }
                }
                let on_blocks = |linear: &'s Linear| match linear.blocks_for(1) {
                    Some((m, a)) if a == activations && linear.bias().is_none() => Some(m),
                    _ => None,
                };
                Some(LayerBlocks {
                    qkv,
                    qkv_bias,
                    o: on_blocks(&layer.o_proj)?,
                    gate_up: on_blocks(&layer.gate_up_proj)?,
                    down: on_blocks(&layer.down_proj)?,
                    activations,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some((blocks, keys))
    }

    /// Logits `[rows, vocab]` (fp32) of final-norm hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?.f_to_kind(Kind::Float)?)
    }

    /// The embeddings of `ids` (`[n, embedding]`).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.lookup(ids)
    }

    /// Attention of every group in the batch; `[tokens, heads * head_dim]`
    /// in the batch's flat order.
    fn attention(
        &self,
        batch: &ForwardBatch,
        cache: &KvCache,
        l: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let (nh, nkv, d) = (
            self.cfg.num_attention_heads as i64,
            self.cfg.num_key_value_heads as i64,
            self.cfg.head_dim as i64,
        );
        let gqa = nh != nkv;
        let mut parts = Vec::with_capacity(1 + batch.prefills.len());
        if let Some(g) = &batch.batched {
            let qd = q.f_narrow(0, 0, g.count)?;
            let o = match &g.keys {
                RowKeys::Paged {
                    block_tables,
                    row_tables,
                    context_lens,
                } => paged_attention(
                    &qd,
                    &cache.k[l],
                    &cache.v[l],
                    block_tables,
                    row_tables,
                    context_lens,
                    cache.block_size(),
                )?,
                RowKeys::Gathered { ctx, gather, mask } => {
                    let gathered = |c: &Tensor| -> Result<Tensor> {
                        Ok(in_kind(c.f_index_select(0, gather)?, q.kind())?
                            .f_view([g.count, *ctx, nkv, d])?
                            .f_transpose(1, 2)?)
                    };
                    Tensor::f_scaled_dot_product_attention(
                        &qd.f_unsqueeze(2)?, // [n, nh, 1, d]
                        &gathered(&cache.k[l])?,
                        &gathered(&cache.v[l])?,
                        Some(mask),
                        0.0,
                        false,
                        None::<f64>,
                        gqa,
                    )?
                }
            };
            parts.push(o.f_reshape([g.count, nh * d])?);
        }
        for p in &batch.prefills {
            let qp = q
                .f_narrow(0, p.offset, p.len)?
                .f_transpose(0, 1)?
                .f_unsqueeze(0)?;
            let o = match &p.cached {
                None => {
                    let kp = k
                        .f_narrow(0, p.offset, p.len)?
                        .f_transpose(0, 1)?
                        .f_unsqueeze(0)?;
                    let vp = v
                        .f_narrow(0, p.offset, p.len)?
                        .f_transpose(0, 1)?
                        .f_unsqueeze(0)?;
                    Tensor::f_scaled_dot_product_attention::<Tensor>(
                        &qp,
                        &kp,
                        &vp,
                        None,
                        0.0,
                        true,
                        None::<f64>,
                        gqa,
                    )?
                }
                Some((gather, mask)) => {
                    let kp = in_kind(cache.k[l].f_index_select(0, gather)?, q.kind())?
                        .f_transpose(0, 1)?
                        .f_unsqueeze(0)?;
                    let vp = in_kind(cache.v[l].f_index_select(0, gather)?, q.kind())?
                        .f_transpose(0, 1)?
                        .f_unsqueeze(0)?;
                    Tensor::f_scaled_dot_product_attention(
                        &qp,
                        &kp,
                        &vp,
                        Some(mask),
                        0.0,
                        false,
                        None::<f64>,
                        gqa,
                    )?
                }
            };
            // [1, nh, len, d] -> [len, nh * d]
            parts.push(
                o.f_squeeze_dim(0)?
                    .f_transpose(0, 1)?
                    .f_reshape([p.len, nh * d])?,
            );
        }
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    }

    /// Logits `[vocab]` after `tokens`, from a fresh single-use cache: the
    /// model alone, without scheduler or sampler (for tests and inspection).
    pub fn last_logits(&self, tokens: &[u32]) -> Result<Tensor> {
        let block_size = 16;
        let blocks = tokens.len().div_ceil(block_size) + 1;
        let mut cache = self.new_cache(blocks, block_size)?;
        let table: Vec<u32> = (1..blocks as u32).collect();
        let entry = super::batch::BatchEntry::text(tokens, 0, &table);
        let batch = ForwardBatch::new(&[entry], block_size, self.device)?;
        let out = self.forward(&batch, &mut cache)?;
        Ok(out.logits.f_squeeze_dim(0)?)
    }
}

/// `x` in `kind` (cached K or V in the queries' dtype, or new K/V in the
/// cache's).
fn in_kind(x: Tensor, kind: Kind) -> Result<Tensor> {
    Ok(if x.kind() == kind {
        x
    } else {
        x.f_to_kind(kind)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Architecture;
    use crate::model::batch::{BatchEntry, DecodePath};
    use crate::model::decode_layer::tests::{fused_layers, with_fused_decode};
    use crate::model::testing::{random_weights, tiny_config};

    /// Logits of three sequences (5, 18 and 150 tokens) whose blocks are
    /// scattered, every step by `path`: a first step of two short prompts
    /// and the long one's first 140 tokens (past the paged kernel's prefill
    /// limit: SDPA on either path); a mixed step of the long one's next 9
    /// tokens (a prefill over a cached prefix) beside the short ones'
    /// decodes; then the long one's decode. The logits of the last two steps.
    fn decode_logits(arch: Architecture, path: DecodePath, kv: Kind) -> Result<Tensor> {
        let cfg = tiny_config(arch);
        let mut w = random_weights(&cfg, 7)?;
        let opts = ModelOptions {
            precision: WeightPrecision::Native,
            quant_max_rows: crate::linear::QUANT_MAX_ROWS,
            max_positions: 256,
        };
        let model = Model::new(&cfg, &mut w, &opts)?;
        let bs = 4;
        let mut cache = model.new_cache_of(60, bs, kv)?;
        // Interleaved, out-of-order blocks: reading in place must follow
        // the table, not assume neighbours.
        let long: Vec<u32> = (0..38).map(|b| 59 - (b * 7) % 38).collect();
        let tables: [Vec<u32>; 3] = [vec![17, 3], vec![20, 2, 11, 21, 8], long];
        let prompts: Vec<Vec<u32>> = [5usize, 18, 150]
            .iter()
            .enumerate()
            .map(|(s, &n)| {
                (0..n as u32)
                    .map(|i| 3 + (i * 11 + s as u32 * 5) % 97)
                    .collect()
            })
            .collect();
        let entry = |s: usize, from: usize, to: usize, logits: bool| BatchEntry {
            wants_logits: logits,
            ..BatchEntry::text(&prompts[s][from..to], from, &tables[s])
        };
        let step = |entries: &[BatchEntry], cache: &mut KvCache| -> Result<Tensor> {
            let batch = ForwardBatch::with_decode_path(entries, bs, Device::Cpu, path)?;
            Ok(model.forward(&batch, cache)?.logits)
        };
        drop(step(
            &[
                entry(0, 0, 4, false),
                entry(1, 0, 17, false),
                entry(2, 0, 140, false),
            ],
            &mut cache,
        )?);
        let mixed = step(
            &[
                entry(0, 4, 5, true),
                entry(2, 140, 149, false),
                entry(1, 17, 18, true),
            ],
            &mut cache,
        )?;
        let last = step(&[entry(2, 149, 150, true)], &mut cache)?;
        Ok(Tensor::f_cat(&[mixed, last], 0)?)
    }

    /// The paged kernel (decodes and short prefills, the latter over a
    /// cached prefix too, K/V written by row copies) gives what gathered
    /// SDPA and `index_copy_` give.
    #[test]
    fn paged_attention_matches_gathered_sdpa() -> Result<()> {
        // Llama and Qwen2 have GQA (4 heads on 2 kv heads) here; Qwen3 adds
        // q/k norms before the cache.
        for arch in [
            Architecture::Llama,
            Architecture::Qwen2,
            Architecture::Qwen3,
        ] {
            let paged = decode_logits(arch, DecodePath::Paged, Kind::Float)?;
            let gathered = decode_logits(arch, DecodePath::Gathered, Kind::Float)?;
            let vocab = tiny_config(arch).vocab_size as i64;
            assert_eq!(paged.size(), [3, vocab]);
            let diff = f64::try_from(paged.f_sub(&gathered)?.f_abs()?.f_max()?)?;
            assert!(diff < 1e-4, "{arch:?}: paged and gathered differ by {diff}");
        }
        Ok(())
    }

    /// `kv_cache_dtype`: K and V stored in 16 bits under fp32 activations,
    /// written converted on either path and read back widened (the paged
    /// kernel's 16-bit loads; `index_select` then a conversion before SDPA,
    /// also over a cached prefix). The paths differ where a short prefill
    /// attends: the kernel reads its own new K/V back rounded, SDPA uses
    /// them fresh; so they agree to the cache's rounding, not exactly.
    #[test]
    fn a_16_bit_cache_reads_back_on_either_path() -> Result<()> {
        let arch = Architecture::Llama;
        let exact = decode_logits(arch, DecodePath::Paged, Kind::Float)?;
        let max_abs = |a: &Tensor, b: &Tensor| -> Result<f64> {
            Ok(f64::try_from(a.f_sub(b)?.f_abs()?.f_max()?)?)
        };
        // Measured here: fp16 5.6e-3 between the paths and 6.4e-3 from the
        // fp32 cache, bf16 2.8e-2 and 1.0e-1.
        for (kind, tol) in [(Kind::Half, 2e-2), (Kind::BFloat16, 3e-1)] {
            let paged = decode_logits(arch, DecodePath::Paged, kind)?;
            let gathered = decode_logits(arch, DecodePath::Gathered, kind)?;
            let (between, off) = (max_abs(&paged, &gathered)?, max_abs(&paged, &exact)?);
            eprintln!("{kind:?}: paths {between:.2e} apart, {off:.2e} from the fp32 cache");
            assert!(
                between < tol,
                "{kind:?}: paged and gathered differ by {between}"
            );
            assert!(off < tol, "{kind:?}: {off} from the fp32 cache's logits");
            // The cache really held 16-bit values.
            assert!(off > 0.0, "{kind:?}: exactly the fp32 cache's logits");
        }
        Ok(())
    }

    /// Logits of one 9-token prompt with `mrope` positions (or plain ones).
    fn mrope_logits(mrope: Option<&[[i64; 3]]>, sections: [usize; 3]) -> Result<Tensor> {
        let mut cfg = tiny_config(Architecture::Qwen2);
        cfg.mrope_section = Some(sections.to_vec());
        let mut w = random_weights(&cfg, 11)?;
        let opts = ModelOptions {
            precision: WeightPrecision::Native,
            quant_max_rows: crate::linear::QUANT_MAX_ROWS,
            max_positions: 64,
        };
        let model = Model::new(&cfg, &mut w, &opts)?;
        let mut cache = model.new_cache(8, 4)?;
        let tokens: Vec<u32> = (0..9).map(|t| 3 + 7 * t).collect();
        let table = [1u32, 2, 3];
        let entry = BatchEntry {
            mrope: mrope.map(|prompt| crate::model::MropePositions { prompt, delta: 0 }),
            ..BatchEntry::text(&tokens, 0, &table)
        };
        Ok(model
            .forward(&ForwardBatch::new(&[entry], 4, Device::Cpu)?, &mut cache)?
            .logits)
    }

    #[test]
    fn equal_3d_positions_rotate_as_plain_ones_and_unequal_ones_do_not() -> Result<()> {
        // head_dim 16: 8 frequencies split 2 / 3 / 3 between t, h and w.
        let plain = mrope_logits(None, [2, 3, 3])?;
        let equal: Vec<[i64; 3]> = (0..9).map(|i| [i; 3]).collect();
        let same = mrope_logits(Some(&equal), [2, 3, 3])?;
        let diff = f64::try_from(plain.f_sub(&same)?.f_abs()?.f_max()?)?;
        assert!(
            diff < 1e-5,
            "equal rows differ from plain positions by {diff}"
        );
        // A 2 x 2 grid in the middle: only the sections of the rows that
        // differ can change the result.
        let mut grid = equal.clone();
        for (k, (y, x)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
            grid[3 + k] = [3, 3 + y, 3 + x];
        }
        for (k, p) in grid.iter_mut().enumerate().skip(7) {
            *p = [k as i64 - 2; 3];
        }
        let moved = mrope_logits(Some(&grid), [2, 3, 3])?;
        let diff = f64::try_from(plain.f_sub(&moved)?.f_abs()?.f_max()?)?;
        assert!(
            diff > 1e-3,
            "3-D positions left the logits unchanged ({diff})"
        );
        Ok(())
    }

    #[test]
    fn a_block_table_outside_the_cache_is_an_error() -> Result<()> {
        let cache = Tensor::f_zeros([8 * 4, 2, 16], (Kind::Float, Device::Cpu))?;
        let q = Tensor::f_zeros([1, 4, 16], (Kind::Float, Device::Cpu))?;
        let lens = Tensor::from_slice(&[6i64]);
        let bad = Tensor::from_slice(&[1i64, 8]).f_view([1, 2])?;
        let rows = Tensor::from_slice(&[0i64]);
        let e = paged_attention(&q, &cache, &cache, &bad, &rows, &lens, 4)
            .expect_err("block 8 of 8 must be refused");
        assert!(e.to_string().contains("block 8"), "{e}");
        let short = Tensor::from_slice(&[1i64]).f_view([1, 1])?;
        let e = paged_attention(&q, &cache, &cache, &short, &rows, &lens, 4)
            .expect_err("6 tokens do not fit one block of 4");
        assert!(e.to_string().contains("context length 6"), "{e}");
        Ok(())
    }

    /// The model of the GGUF at `path` with its blocks kept (`precision`).
    fn gguf_model(path: &std::path::Path, precision: WeightPrecision) -> Result<Model> {
        let source = crate::loader::ModelSource::open(&path.to_string_lossy())?;
        let mut w =
            source.load_weights_with(Kind::Float, Device::Cpu, crate::weights::Blocks::Keep)?;
        Model::new(source.config(), &mut w, &block_options(precision))
    }

    fn block_options(precision: WeightPrecision) -> ModelOptions {
        ModelOptions {
            precision,
            quant_max_rows: crate::linear::QUANT_MAX_ROWS,
            max_positions: 256,
        }
    }

    /// A tiny Qwen2 (q/k/v biases, GQA) whose layer matrices are random
    /// blocks: Q4_0, Q4_1 and Q8_0, a fused q/k/v of two types.
    fn random_block_model(precision: WeightPrecision) -> Result<Model> {
        use crate::gguf::GgmlType;
        use crate::quant::tests::{random_blocks, Lcg};
        let cfg = tiny_config(Architecture::Qwen2);
        let mut w = random_weights(&cfg, 5)?;
        let mut rng = Lcg(3);
        for l in 0..cfg.num_hidden_layers {
            for (part, ty) in [
                ("self_attn.q_proj", GgmlType::Q4_0),
                ("self_attn.k_proj", GgmlType::Q4_0),
                ("self_attn.v_proj", GgmlType::Q8_0),
                ("self_attn.o_proj", GgmlType::Q8_0),
                ("mlp.gate_proj", GgmlType::Q4_1),
                ("mlp.up_proj", GgmlType::Q4_1),
                ("mlp.down_proj", GgmlType::Q4_0),
            ] {
                let name = format!("model.layers.{l}.{part}.weight");
                let shape = w.take(&name)?.size();
                w.insert_quantized(name, random_blocks(ty, shape[0], shape[1], &mut rng));
            }
        }
        Model::new(&cfg, &mut w, &block_options(precision))
    }

    /// Logits of a prompt's last position and then of `steps` greedy
    /// decode steps of that sequence alone, in a cache of `kv`.
    fn lone_decode_logits(model: &Model, kv: Kind, steps: usize) -> Result<Tensor> {
        let bs = 4;
        let mut cache = model.new_cache_of(16, bs, kv)?;
        // Blocks out of order: the fused layer must follow the table.
        let table: Vec<u32> = (0..16).map(|b| 15 - (b * 5) % 16).collect();
        let vocab = model.config().vocab_size as u32;
        let mut tokens: Vec<u32> = (0..11).map(|i| 1 + (i * 37) % (vocab - 1)).collect();
        let mut all = Vec::new();
        let mut from = 0;
        for _ in 0..=steps {
            let entry = BatchEntry {
                wants_logits: true,
                ..BatchEntry::text(&tokens[from..], from, &table)
            };
            let batch = ForwardBatch::new(&[entry], bs, Device::Cpu)?;
            let logits = model.forward(&batch, &mut cache)?.logits;
            from = tokens.len();
            tokens.push(i64::try_from(logits.f_argmax(-1, false)?.f_get(0)?)? as u32);
            all.push(logits);
        }
        Ok(Tensor::f_cat(&all, 0)?)
    }

    /// A lone decoding token's layers in one call (`decode_layer`) give the
    /// op-by-op path's logits bit for bit: K-quant blocks (llama.cpp's own
    /// Q4_K_M of a tiny model, a fused q/k/v of mixed types), SmolLM2's
    /// Q4_1 and a random-block Qwen2 (q/k/v biases), with fp32 and int8
    /// activations; fp32, fp16 and bf16 caches; one to three threads (the
    /// attention's heads and each product's columns cut among them); the
    /// AVX2 and portable builds of the elementwise kernels, the widest build
    /// of the products.
    #[test]
    fn the_fused_decode_layer_is_the_op_by_op_path_bit_for_bit() -> Result<()> {
        let _threads = crate::RestoreThreads::new();
        let kquant = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-kquant.gguf");
        let smollm2 = crate::model_dir().join(crate::SMOLLM2.file_name);
        let (q4, int8) = (WeightPrecision::Q4, WeightPrecision::Q4Int8);
        let cases = [
            ("tiny-kquant", q4, Kind::Float, 3, false),
            ("tiny-kquant", q4, Kind::Half, 2, true),
            ("tiny-kquant", q4, Kind::BFloat16, 1, false),
            ("smollm2", q4, Kind::Float, 2, false),
            ("smollm2", int8, Kind::Float, 3, false),
            ("smollm2", int8, Kind::Half, 1, true),
            ("qwen2", q4, Kind::Float, 2, false),
            ("qwen2", int8, Kind::BFloat16, 3, true),
        ];
        for (name, precision, kv, threads, portable) in cases {
            let model = match name {
                "tiny-kquant" => gguf_model(&kquant, precision)?,
                "smollm2" => gguf_model(&smollm2, precision)?,
                _ => random_block_model(precision)?,
            };
            tch::set_num_threads(threads);
            // Other tests switch the kernels' builds process-wide; these
            // hold the switches for the two runs.
            let (fused, op_by_op) = crate::model::with_kernel_build(portable, || {
                let build = crate::quant::KernelBuild::detected();
                crate::quant::with_kernel_build(build, || -> Result<_> {
                    let run = |on| -> Result<(Tensor, usize)> {
                        let before = fused_layers();
                        let logits = with_fused_decode(on, || lone_decode_logits(&model, kv, 6))?;
                        Ok((logits, fused_layers() - before))
                    };
                    let ((fused, layers), (op_by_op, none)) = (run(true)?, run(false)?);
                    // Six steps of every layer, none of them op by op.
                    let want = 6 * model.layers.len();
                    assert!(layers == want && none == 0, "{name}: {layers} / {none}");
                    Ok((fused, op_by_op))
                })
            })?;
            let what = format!(
                "{name} {precision:?} {kv:?} cache, {threads} threads, portable {portable}"
            );
            assert_eq!(fused.size()[0], 7, "{what}");
            assert!(
                fused.equal(&op_by_op),
                "{what}: the fused layer's logits differ by up to {}",
                f64::try_from(fused.f_sub(&op_by_op)?.f_abs()?.f_max()?)?
            );
        }
        Ok(())
    }

    /// A slot, context or block the cache does not have is an error that
    /// names it, raised before any thread reads or writes.
    #[test]
    fn the_fused_decode_layer_refuses_indices_outside_the_cache() -> Result<()> {
        let model = random_block_model(WeightPrecision::Q4)?;
        let cfg = model.config().clone();
        let cache = model.new_cache_of(4, 4, Kind::Float)?;
        let layer = &model.layers[0];
        fn on_blocks(l: &Linear) -> &QuantMatrix {
            l.blocks_for(1)
                .map(|(m, _)| m)
                .expect("the fixture's matrices are on blocks")
        }
        let blocks = LayerBlocks {
            qkv: on_blocks(&layer.qkv_proj),
            qkv_bias: layer.qkv_proj.bias(),
            o: on_blocks(&layer.o_proj),
            gate_up: on_blocks(&layer.gate_up_proj),
            down: on_blocks(&layer.down_proj),
            activations: crate::quant::Activations::Fp32,
        };
        let hidden = cfg.hidden_size as i64;
        let d = cfg.head_dim as i64;
        let ones = Tensor::f_ones([d], (Kind::Float, Device::Cpu))?;
        let run = |table: &[i64], len: i64, slot: i64| -> Result<()> {
            let mut x = Tensor::f_zeros([1, hidden], (Kind::Float, Device::Cpu))?;
            let mut h = x.copy();
            let tables = Tensor::from_slice(table).f_view([1, -1])?;
            let row = DecodeRow {
                heads: cfg.num_attention_heads as i64,
                kv_heads: cfg.num_key_value_heads as i64,
                eps: 1e-5,
                cos: &ones,
                sin: &ones,
                block_tables: &tables,
                row_tables: &Tensor::from_slice(&[0i64]),
                context_lens: &Tensor::from_slice(&[len]),
                slots: &Tensor::from_slice(&[slot]),
                block_size: 4,
                scale: 0.125,
            };
            let norm = &layer.post_attention_layernorm;
            decode_layer(
                &mut x,
                &mut h,
                &blocks,
                norm,
                None,
                &cache.k[0],
                &cache.v[0],
                &row,
            )
        };
        run(&[0, 1], 6, 5)?;
        for (table, len, slot, named) in [
            (&[0i64, 1][..], 6, 16, "slot 16"),
            (&[0, 1], 9, 5, "context length 9"),
            (&[0, 4], 6, 5, "block 4"),
        ] {
            let e = run(table, len, slot).expect_err(named);
            assert!(e.to_string().contains(named), "{named}: {e}");
        }
        Ok(())
    }
}
