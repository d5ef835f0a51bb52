//! Linear layers and the precision their weights are kept in.
//!
//! On CPU, decoding one token multiplies every weight once, so at small
//! batch sizes the speed is set by the bytes of weights read per token, not
//! by FLOPs. fp32 weights cap SmolLM2-135M at ~17 tok/s here; fbgemm's
//! fp16-weight kernel (`fbgemm_linear_fp16_weight_fp32_activation`, weights
//! packed once at load, activations and accumulation in fp32) halves the
//! bytes and measured 2.4x faster at batch 1. GGUF's quantized blocks
//! ([`crate::quant`]) read a third of fp16's bytes again, but dequantize
//! every weight once per 4 activation rows, so past a few rows fbgemm's
//! packed fp16 is faster: [`WeightPrecision::Q4`] keeps both and picks per
//! call by the number of rows. libtorch's int8/int4 weight-only CPU kernels
//! were slower than fp32 on an AVX2 machine, so they are not offered.
//!
//! tch does not bind fbgemm; `csrc/fbgemm_fp16.cpp` packs weights for
//! fbgemm's fp16 GEMM and runs it on the intra-op threads, and this file
//! calls it through [`crate::shim`].
use std::ffi::{c_char, c_void};
use std::ptr::NonNull;

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::error::{Error, Result};
use crate::quant::{Activations, QuantMatrix, QuantizedTensor};
use crate::shim::{from_shim, handle_from_shim};
use crate::weights::LinearWeight;

/// Most rows of activations a [`WeightPrecision::Q4`] (or `Q4Int8`) layer
/// multiplies with its blocks; wider calls run its fp16 copy (the crossover measured with
/// `cargo bench -p omni-engine --bench quant`, BENCHMARKS.md).
/// `EngineArgs::quant_max_rows` overrides it.
pub const QUANT_MAX_ROWS: usize = 4;

/// How weight matrices of linear layers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WeightPrecision {
    /// In the engine's dtype (fp32 on CPU, bf16 on CUDA): exact.
    Native,
    /// fp16 weights packed for fbgemm, fp32 activations (CPU with AVX2 only).
    Fp16,
    /// GGUF's quantized blocks as the file stores them (Q4_0, Q4_1, Q8_0,
    /// Q4_K, Q6_K), fp32 activations (CPU). Calls with many rows (prefill,
    /// big batches) run an fp16 copy where fbgemm runs; matrices the file
    /// does not store in those blocks (a safetensors model's, all of them)
    /// are fp16 where fbgemm runs and fp32 elsewhere. A decode row's logits
    /// therefore depend, in their last digits, on how many rows share its
    /// step (blocks exactly, or the fp16 copy's rounding).
    Q4,
    /// As [`WeightPrecision::Q4`], but in calls of one row (a decode step
    /// at batch one) Q4_0, Q4_1 and Q8_0 blocks multiply activations
    /// quantized to 8 bits per 32 elements, as llama.cpp does, in integer
    /// dot products ([`crate::quant::Activations::Int8`]): faster there,
    /// and the logits move by the activations' rounding, so greedy output
    /// is transformers' only up to steps whose top two are that close (the
    /// fixtures' tests state how close). K-quant blocks keep fp32
    /// activations.
    Q4Int8,
}

impl WeightPrecision {
    /// Names accepted by [`WeightPrecision::parse`].
    pub const NAMES: &'static str = "native (alias fp32), fp16, q4 (alias gguf), q4-int8";

    /// Parses `EngineArgs::weight_precision` (`auto` is resolved by the engine).
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "native" | "fp32" | "float32" => Ok(WeightPrecision::Native),
            "fp16" | "float16" => Ok(WeightPrecision::Fp16),
            "q4" | "gguf" | "quantized" => Ok(WeightPrecision::Q4),
            "q4-int8" | "q4_int8" => Ok(WeightPrecision::Q4Int8),
            _ => Err(Error::InvalidConfig {
                field: "engine_args.weight_precision".to_owned(),
                value: name.to_owned(),
                reason: format!("expected auto or one of {}", Self::NAMES),
            }),
        }
    }

    /// The canonical name.
    pub fn as_str(&self) -> &'static str {
        match self {
            WeightPrecision::Native => "native",
            WeightPrecision::Fp16 => "fp16",
            WeightPrecision::Q4 => "q4",
            WeightPrecision::Q4Int8 => "q4-int8",
        }
    }

    /// Whether GGUF's blocks are kept as the file stores them.
    pub fn keeps_blocks(&self) -> bool {
        matches!(self, WeightPrecision::Q4 | WeightPrecision::Q4Int8)
    }

    /// How kept blocks multiply their activations.
    fn activations(&self) -> Activations {
        match self {
            WeightPrecision::Q4Int8 => Activations::Int8,
            _ => Activations::Fp32,
        }
    }

    /// Whether this precision can run with activations of `kind` on `device`.
    pub fn check(&self, device: Device, kind: Kind) -> Result<()> {
        match self {
            WeightPrecision::Native => Ok(()),
            WeightPrecision::Fp16 | WeightPrecision::Q4 | WeightPrecision::Q4Int8
                if device == Device::Cpu && kind == Kind::Float =>
            {
                Ok(())
            }
            WeightPrecision::Fp16 | WeightPrecision::Q4 | WeightPrecision::Q4Int8 => {
                Err(Error::InvalidConfig {
                    field: "engine_args.weight_precision".to_owned(),
                    value: self.as_str().to_owned(),
                    reason: format!(
                        "{} weights need fp32 activations on the CPU, not {kind:?} on {device:?}",
                        self.as_str()
                    ),
                })
            }
        }
    }
}

extern "C" {
    fn omni_fp16_pack(weight: *const C_tensor, err: *mut *mut c_char) -> *mut c_void;
    fn omni_fp16_free(packed: *mut c_void);
    fn omni_fp16_linear(
        input: *const C_tensor,
        packed: *const c_void,
        bias: *const C_tensor,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
}

/// A weight packed for fbgemm's fp16 GEMM (memory fbgemm owns).
#[derive(Debug)]
struct PackedFp16(NonNull<c_void>);

// SAFETY: the packed matrix is never written after packing; fbgemm's GEMM
// only reads it, from any thread.
unsafe impl Send for PackedFp16 {}
// SAFETY: as above.
unsafe impl Sync for PackedFp16 {}

impl PackedFp16 {
    fn new(weight: &Tensor) -> Result<Self> {
        let w = weight.f_to_kind(Kind::Float)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: `w` is a live tensor for the duration of the call.
        let ptr = unsafe { omni_fp16_pack(w.as_ptr(), &mut err) };
        // SAFETY: straight from the shim.
        Ok(Self(unsafe {
            handle_from_shim(ptr, err, "fbgemm fp16 pack")
        }?))
    }
}

impl Drop for PackedFp16 {
    fn drop(&mut self) {
        // SAFETY: made by omni_fp16_pack, freed once.
        unsafe { omni_fp16_free(self.0.as_ptr()) }
    }
}

#[derive(Debug)]
enum Storage {
    Dense(Tensor),
    /// Packed once at load; the GEMM splits its output columns between the
    /// intra-op threads.
    PackedFp16(PackedFp16),
    /// GGUF blocks, and for calls of more than `max_rows` rows an fp16
    /// copy (when fbgemm runs here).
    Quantized {
        blocks: QuantMatrix,
        wide: Option<PackedFp16>,
        max_rows: usize,
        activations: Activations,
    },
}

/// `y = x W^T + b` with the weight in the chosen precision.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Storage,
    bias: Option<Tensor>,
}

impl Linear {
    /// Takes a `[out, in]` weight in the engine's dtype.
    pub fn new(weight: Tensor, bias: Option<Tensor>, precision: WeightPrecision) -> Result<Self> {
        let weight = match precision {
            WeightPrecision::Native => Storage::Dense(weight),
            WeightPrecision::Fp16 => Storage::PackedFp16(PackedFp16::new(&weight)?),
            // Not stored in blocks: fp16 where fbgemm runs, else as it is.
            WeightPrecision::Q4 | WeightPrecision::Q4Int8 if fbgemm_runs() => {
                Storage::PackedFp16(PackedFp16::new(&weight)?)
            }
            WeightPrecision::Q4 | WeightPrecision::Q4Int8 => Storage::Dense(weight),
        };
        Ok(Self { weight, bias })
    }

    /// Stacks the rows of `parts` (a fused projection) into one layer. With
    /// a precision that keeps blocks ([`WeightPrecision::keeps_blocks`]) and
    /// every part in blocks the blocks are kept;
    /// otherwise the parts are made dense and stacked.
    /// Calls of more than `max_rows` rows run an fp16 copy of the blocks.
    pub fn from_parts(
        parts: Vec<LinearWeight>,
        bias: Option<Tensor>,
        precision: WeightPrecision,
        max_rows: usize,
    ) -> Result<Self> {
        let blocks: Vec<&QuantizedTensor> = parts
            .iter()
            .filter_map(|p| match p {
                LinearWeight::Quantized(q) => Some(q),
                LinearWeight::Dense(_) => None,
            })
            .collect();
        if precision.keeps_blocks() && !blocks.is_empty() && blocks.len() == parts.len() {
            let blocks = QuantMatrix::new(&blocks)?;
            // The fp16 copy for wide calls, packed from the dequantized
            // blocks (the dense fp32 matrix lives only while packing).
            let wide = if fbgemm_runs() {
                Some(PackedFp16::new(&blocks.dequantize()?)?)
            } else {
                None
            };
            return Ok(Self {
                weight: Storage::Quantized {
                    blocks,
                    wide,
                    max_rows,
                    activations: precision.activations(),
                },
                bias,
            });
        }
        let dense = parts
            .into_iter()
            .map(LinearWeight::into_dense)
            .collect::<Result<Vec<_>>>()?;
        let weight = if dense.len() == 1 {
            dense.into_iter().next().unwrap_or_else(|| unreachable!())
        } else {
            Tensor::f_cat(&dense, 0)?
        };
        Self::new(weight, bias, precision)
    }

    /// The blocks a call of `rows` rows multiplies, and how it takes its
    /// activations; `None` when such a call runs another storage.
    pub fn blocks_for(&self, rows: usize) -> Option<(&QuantMatrix, Activations)> {
        match &self.weight {
            Storage::Quantized {
                blocks,
                wide,
                max_rows,
                activations,
            } if wide.is_none() || rows <= *max_rows => Some((blocks, *activations)),
            _ => None,
        }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x`: `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Storage::Dense(w) => Ok(x.f_linear(w, self.bias.as_ref())?),
            Storage::PackedFp16(packed) => packed.linear(x, self.bias.as_ref()),
            Storage::Quantized {
                blocks,
                wide,
                max_rows,
                activations,
            } => {
                let rows = match x.size().last() {
                    Some(&n) if n > 0 => x.numel() / n as usize,
                    _ => 0,
                };
                match wide {
                    Some(packed) if rows > *max_rows => packed.linear(x, self.bias.as_ref()),
                    _ => blocks.linear_with(x, self.bias.as_ref(), *activations),
                }
            }
        }
    }
}

impl PackedFp16 {
    fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        let mut err = std::ptr::null_mut();
        // SAFETY: `x`, the packed matrix and `bias` (which may be null)
        // outlive the call.
        let ptr = unsafe { omni_fp16_linear(x.as_ptr(), self.0.as_ptr(), bias, &mut err) };
        // SAFETY: straight from the shim.
        unsafe { from_shim(ptr, err, "fbgemm fp16 linear") }
    }
}

/// The most layer weights [`LayerGemms`] makes (~256 MB in fp16).
const YARDSTICK_PARAMS: i64 = 128 << 20;

/// The model's own layer GEMMs, the yardstick for a whole run's FLOP rate
/// (`omni bench pipeline`): one forward pass's matrix products (fused q/k/v,
/// o, fused gate/up, down, in every layer, each layer its own random weights
/// so they stream from memory as the model's do), kept in a precision as the
/// engine keeps them. Attention, the LM head and everything between the
/// products are left out: this is what the cores give the GEMMs alone. A big
/// model's pass runs its first layers only (at most `YARDSTICK_PARAMS`
/// weights, far past any cache, so they still stream from memory): the
/// yardstick's weights live beside the pipeline's.
pub struct LayerGemms {
    /// Each product's weights and input width.
    layers: Vec<(Linear, i64)>,
    /// The FLOPs of one token through `layers`.
    flops_per_token: f64,
}

impl LayerGemms {
    /// Makes the layers' random weights, packed for `precision`.
    pub fn new(config: &crate::ModelConfig, precision: WeightPrecision) -> Result<Self> {
        let _g = tch::no_grad_guard();
        let h = config.hidden_size as i64;
        let q = (config.num_attention_heads * config.head_dim) as i64;
        let kv = (config.num_key_value_heads * config.head_dim) as i64;
        let inter = config.intermediate_size as i64;
        let shapes = [(q + 2 * kv, h), (h, q), (2 * inter, h), (h, inter)];
        let per_layer: i64 = shapes.iter().map(|&(out, inp)| out * inp).sum();
        let used = config
            .num_hidden_layers
            .min((YARDSTICK_PARAMS / per_layer.max(1)).max(1) as usize);
        let mut layers = Vec::with_capacity(used * shapes.len());
        for _ in 0..used {
            for &(out, inp) in &shapes {
                let w =
                    Tensor::f_randn([out, inp], (Kind::Float, Device::Cpu))?.f_mul_scalar(0.02)?;
                layers.push((Linear::new(w, None, precision)?, inp));
            }
        }
        Ok(Self {
            layers,
            flops_per_token: config.layer_flops_per_token() as f64 * used as f64
                / config.num_hidden_layers.max(1) as f64,
        })
    }

    /// The rate on each of `rows` rows of activations, on the caller's
    /// intra-op threads: the best pass per row count, in GFLOP/s, of at least
    /// `rounds` passes and of as many as `min_time` holds (a pass at a few
    /// rows takes milliseconds, and a handful of them can all fall into a
    /// moment when something else holds the cores).
    pub fn gflops(
        &self,
        rows: &[usize],
        rounds: usize,
        min_time: std::time::Duration,
    ) -> Result<Vec<f64>> {
        let _g = tch::no_grad_guard();
        rows.iter()
            .map(|&n| {
                let mut inputs: Vec<(i64, Tensor)> = Vec::new();
                for &(_, inp) in &self.layers {
                    if !inputs.iter().any(|(w, _)| *w == inp) {
                        inputs.push((
                            inp,
                            Tensor::f_randn([n as i64, inp], (Kind::Float, Device::Cpu))?,
                        ));
                    }
                }
                let input = |width: i64| inputs.iter().find(|(w, _)| *w == width).map(|(_, x)| x);
                let mut best = f64::INFINITY;
                let began = std::time::Instant::now();
                let mut passes = 0;
                while passes < rounds.max(1) || began.elapsed() < min_time {
                    let start = std::time::Instant::now();
                    for (layer, inp) in &self.layers {
                        if let Some(x) = input(*inp) {
                            drop(layer.forward(x)?);
                        }
                    }
                    best = best.min(start.elapsed().as_secs_f64());
                    passes += 1;
                }
                Ok(n as f64 * self.flops_per_token / best / 1e9)
            })
            .collect()
    }
}

/// Whether fbgemm's fp16 kernels run on this CPU (AVX2).
pub(crate) fn fbgemm_runs() -> bool {
    static RUNS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *RUNS.get_or_init(|| {
        let w = Tensor::ones([8, 8], (Kind::Float, Device::Cpu));
        PackedFp16::new(&w).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp16_linear_is_close_to_fp32() -> Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(0);
        let w = Tensor::f_randn([48, 32], (Kind::Float, Device::Cpu))?;
        let b = Tensor::f_randn([48], (Kind::Float, Device::Cpu))?;
        let x = Tensor::f_randn([5, 32], (Kind::Float, Device::Cpu))?;
        let dense = Linear::new(
            w.shallow_clone(),
            Some(b.shallow_clone()),
            WeightPrecision::Native,
        )?;
        let packed = Linear::new(w, Some(b), WeightPrecision::Fp16)?;
        let a = dense.forward(&x)?;
        let c = packed.forward(&x)?;
        assert_eq!(a.size(), c.size());
        let diff = f64::try_from(a.f_sub(&c)?.f_abs()?.f_max()?)?;
        assert!(diff < 0.05, "max diff {diff}");
        Ok(())
    }

    /// The GEMM splits output columns between the intra-op threads (and wide
    /// matrices into parts of at most 4096 columns): widths
    /// that are not a multiple of fbgemm's 16-column blocks (the last thread
    /// takes the fringe), many input rows (fbgemm blocks rows by 120) and a
    /// 3-d input must come out as the dense product does.
    #[test]
    fn threaded_fp16_linear_covers_every_output() -> Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(1);
        let threads = tch::get_num_threads();
        tch::set_num_threads(2);
        let result = (|| -> Result<()> {
            // The last two are cut into more parts than threads (columns past
            // 2 x 4096), with a fringe of columns off the 16-column blocks.
            for (rows, inp, out) in [
                (1, 64, 1001),
                (130, 96, 200),
                (7, 576, 1536),
                (3, 40, 9),
                (5, 32, 9003),
                (1, 48, 12301),
            ] {
                let w = Tensor::f_randn([out, inp], (Kind::Float, Device::Cpu))?;
                let x = Tensor::f_randn([1, rows, inp], (Kind::Float, Device::Cpu))?;
                let dense = Linear::new(w.shallow_clone(), None, WeightPrecision::Native)?;
                let packed = Linear::new(w, None, WeightPrecision::Fp16)?;
                let a = dense.forward(&x)?;
                let c = packed.forward(&x)?;
                assert_eq!(a.size(), c.size());
                // fp16 weights: relative error ~1e-3 of each dot product.
                let scale = f64::try_from(a.f_abs()?.f_max()?)?;
                let diff = f64::try_from(a.f_sub(&c)?.f_abs()?.f_max()?)?;
                assert!(
                    diff < 0.01 * scale,
                    "{rows}x{inp}x{out}: max diff {diff} of {scale}"
                );
            }
            Ok(())
        })();
        tch::set_num_threads(threads);
        result
    }

    #[test]
    fn a_weight_fbgemm_cannot_pack_is_an_error() -> Result<()> {
        let w = Tensor::f_zeros([8], (Kind::Float, Device::Cpu))?;
        let e = Linear::new(w, None, WeightPrecision::Fp16).expect_err("1-d weight");
        assert!(e.to_string().contains("weight must be 2-d"), "{e}");
        Ok(())
    }

    #[test]
    fn unknown_precision_is_named() {
        match WeightPrecision::parse("int3") {
            Err(Error::InvalidConfig { value, .. }) => assert_eq!(value, "int3"),
            other => panic!("{other:?}"),
        }
    }
}
