//! Piper's VITS voices on libtorch: phoneme ids in, a waveform out.
//!
//! VITS: Kim et al., "Conditional Variational Autoencoder with Adversarial
//! Learning for End-to-End Text-to-Speech" (2021). The inference path is
//! Piper's (`rhasspy/piper`, `src/python/piper_train/vits/models.py`
//! `SynthesizerTrn.infer`, with `attentions.py`, `modules.py`,
//! `transforms.py`), as its `export_onnx.py` exports it:
//!
//! 1. text encoder: embedding × √hidden, transformer layers with relative
//!    position attention (window ±w) and a convolutional FFN, LayerNorm
//!    over channels; a 1×1 projection gives the prior's mean and log-scale;
//! 2. stochastic duration predictor, reversed: noise × `noise_w` through the
//!    conv flows (rational-quadratic splines, the first one dropped, as
//!    Piper drops "a useless vflow") and an elementwise affine flow gives
//!    log-durations; `ceil(exp(logw) × length_scale)` frames per phoneme;
//! 3. the prior expanded along the durations, sampled with `noise_scale`,
//!    through the residual coupling flows in reverse (mean-only);
//! 4. the HiFi-GAN generator: transposed convolutions and multi-receptive
//!    field residual blocks, `tanh`.
//!
//! Weights come from the voice's `.onnx` as it ships. Named initializers
//! are the PyTorch state-dict paths; anonymous ones (`onnx::Conv_*`, the
//! weight-normed flow convolutions the exporter folded, and the embedding,
//! which the exporter stored as `sid`) are named by the node that consumes
//! them (`/flow/flows.0/enc/in_layers.0/Conv` input 1 →
//! `flow.flows.0.enc.in_layers.0.weight`). Every size comes from the
//! weights' shapes; strides, paddings and dilations from the nodes'
//! attributes. Nothing depends on one voice's sizes.
use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::onnx::OnnxFile;

/// Fixed in Piper's code (`transforms.py`, `attentions.py`, `models.py`).
const LAYER_NORM_EPS: f64 = 1e-5;
const SPLINE_TAIL_BOUND: f64 = 5.0;
const SPLINE_MIN_BIN: f64 = 1e-3;
const SPLINE_MIN_DERIVATIVE: f64 = 1e-3;
const SPLINE_SEARCH_EPS: f64 = 1e-6;
const GENERATOR_SLOPE: f64 = 0.1;
const GENERATOR_FINAL_SLOPE: f64 = 0.01;

/// Sizes of one voice, all read from its weights.
#[derive(Debug, Clone, PartialEq)]
pub struct VitsDims {
    /// Phoneme ids the embedding knows.
    pub n_vocab: i64,
    /// Encoder width.
    pub hidden: i64,
    /// Latent channels (prior, flows, generator input).
    pub inter: i64,
    /// Encoder layers.
    pub n_layers: usize,
    /// Attention heads.
    pub n_heads: i64,
    /// Relative attention window (±).
    pub window: i64,
    /// FFN kernel size.
    pub ffn_kernel: i64,
    /// Spline bins of the duration predictor's flows.
    pub num_bins: i64,
    /// Duration predictor width.
    pub dp_filter: i64,
    /// DDSConv layers of the duration predictor.
    pub dds_layers: usize,
    /// Conv flows of the duration predictor that run at inference, highest first.
    pub dp_flows: Vec<usize>,
    /// Coupling flows, highest first.
    pub flows: Vec<usize>,
    /// WaveNet layers per coupling flow.
    pub wn_layers: usize,
    /// Generator upsampling strides.
    pub upsample_rates: Vec<i64>,
    /// Residual blocks per upsampling stage.
    pub num_kernels: usize,
    /// `true`: ResBlock1 (`convs1`/`convs2`), else ResBlock2 (`convs`).
    pub resblock1: bool,
    /// Samples per frame: the product of `upsample_rates`.
    pub hop: i64,
}

/// How much randomness and how slow: Piper's three inference scales.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VitsScales {
    /// Spread of the prior sample (0: its mean).
    pub noise_scale: f64,
    /// Duration multiplier (> 1: slower speech).
    pub length_scale: f64,
    /// Spread of the duration predictor's noise (0: deterministic).
    pub noise_w: f64,
}

/// One convolution as the graph runs it.
#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: i64,
    padding: i64,
    dilation: i64,
    groups: i64,
    transposed: bool,
    /// A transposed convolution's weight split into its `stride` phases
    /// (`[stride * out, in, k / stride]`), when it can run as one ordinary
    /// convolution (see [`Conv::polyphase`]).
    phases: Option<Tensor>,
}

impl Conv {
    /// The polyphase form of a transposed convolution with stride `s` and
    /// kernel `k = m * s`: output sample `q * s + r` is an ordinary
    /// convolution of the input with taps `r, r + s, ...` of the kernel,
    /// so all `s` phases are one `conv1d` with `s` times the output
    /// channels, interleaved after. On the CPU, libtorch's transposed 1-D
    /// convolution took 2-4x longer than this for the HiFi-GAN decoder's
    /// long upsampling layers.
    fn polyphase(weight: &Tensor, stride: i64, groups: i64, dilation: i64) -> Option<Tensor> {
        let size = weight.size();
        let (cin, cout, k) = (size[0], size[1], size[2]);
        if groups != 1 || dilation != 1 || stride < 2 || k % stride != 0 {
            return None;
        }
        let m = k / stride;
        Some(
            weight
                .view([cin, cout, m, stride])
                .permute([3, 1, 0, 2])
                .flip([-1])
                .reshape([stride * cout, cin, m])
                .contiguous(),
        )
    }

    fn transposed_by_phases(&self, x: &Tensor, phases: &Tensor) -> Tensor {
        let (s, p) = (self.stride, self.padding);
        let cout = phases.size()[0] / s;
        let m = phases.size()[2];
        let b = x.size()[0];
        let y = x
            .constant_pad_nd([m - 1, m - 1])
            .conv1d(phases, None::<&Tensor>, [1], [0], [1], 1);
        let n = y.size()[2];
        let y = y
            .view([b, s, cout, n])
            .permute([0, 2, 3, 1])
            .reshape([b, cout, n * s])
            .narrow(2, p, n * s - 2 * p);
        match &self.bias {
            Some(bias) => y + bias.view([1, -1, 1]),
            None => y,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        if let Some(phases) = &self.phases {
            return self.transposed_by_phases(x, phases);
        }
        if self.transposed {
            x.conv_transpose1d(
                &self.weight,
                self.bias.as_ref(),
                [self.stride],
                [self.padding],
                [0],
                self.groups,
                [self.dilation],
            )
        } else {
            x.conv1d(
                &self.weight,
                self.bias.as_ref(),
                [self.stride],
                [self.padding],
                [self.dilation],
                self.groups,
            )
        }
    }
}

/// A Piper VITS voice, on one device.
#[derive(Debug)]
pub struct Vits {
    dims: VitsDims,
    params: HashMap<String, Tensor>,
    convs: HashMap<String, Conv>,
    device: Device,
}

fn weight_error(name: &str, reason: impl Into<String>) -> Error {
    Error::Weight {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

/// The largest `i` such that `<prefix><i><suffix>` is a key, plus one.
fn count_indexed<'a>(keys: impl Iterator<Item = &'a String>, prefix: &str) -> Vec<usize> {
    let mut found: Vec<usize> = keys
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

impl Vits {
    /// Loads the voice in `onnx_path` onto `device`.
    pub fn load(onnx_path: &Path, device: Device) -> Result<Self> {
        let file = OnnxFile::read(onnx_path)?;
        let mut params: HashMap<String, Tensor> = HashMap::new();
        const MODULES: [&str; 4] = ["enc_p.", "dec.", "flow.", "dp."];
        for (name, t) in &file.initializers {
            if MODULES.iter().any(|m| name.starts_with(m)) {
                params.insert(name.clone(), t.shallow_clone());
            }
        }
        let mut attrs: HashMap<String, (&str, i64, i64, i64, i64)> = HashMap::new();
        for node in &file.nodes {
            let module = node.module_path();
            let init = |i: usize| node.inputs.get(i).and_then(|n| file.initializers.get(n));
            match node.op_type.as_str() {
                "Conv" | "ConvTranspose" => {
                    let first = |key: &str, default: i64| {
                        node.ints
                            .get(key)
                            .and_then(|v| v.first().copied())
                            .unwrap_or(default)
                    };
                    let group = node.int.get("group").copied().unwrap_or(1);
                    attrs.insert(
                        module.clone(),
                        (
                            node.op_type.as_str(),
                            first("strides", 1),
                            first("pads", 0),
                            first("dilations", 1),
                            group,
                        ),
                    );
                    for (i, suffix) in [(1, "weight"), (2, "bias")] {
                        if let Some(t) = init(i) {
                            params
                                .entry(format!("{module}.{suffix}"))
                                .or_insert_with(|| t.shallow_clone());
                        }
                    }
                }
                "Gather" => {
                    if let Some(t) = init(0).filter(|t| t.dim() == 2) {
                        params.insert(format!("{module}.weight"), t.shallow_clone());
                    }
                }
                _ => {}
            }
        }
        // The exporter folded exp(-logs) of the duration predictor's affine
        // flow into a constant.
        if let Some(t) = file.initializers.get("/dp/flows.0/Exp_output_0") {
            params.insert("dp.flows.0.exp_neg_logs".to_owned(), t.shallow_clone());
        } else if let Some(logs) = params.get("dp.flows.0.logs") {
            let t = logs.neg().exp();
            params.insert("dp.flows.0.exp_neg_logs".to_owned(), t);
        }
        let dims = dims(&params, &attrs)?;
        let params: HashMap<String, Tensor> = params
            .into_iter()
            .map(|(k, v)| (k, v.to_kind(Kind::Float).to_device(device)))
            .collect();
        let mut convs = HashMap::new();
        for (module, (op, stride, padding, dilation, groups)) in attrs {
            let transposed = op == "ConvTranspose";
            let Some(weight) = params.get(&format!("{module}.weight")) else {
                return Err(weight_error(
                    &format!("{module}.weight"),
                    format!("{} node without a weight in {}", op, onnx_path.display()),
                ));
            };
            convs.insert(
                module.clone(),
                Conv {
                    weight: weight.shallow_clone(),
                    bias: params
                        .get(&format!("{module}.bias"))
                        .map(Tensor::shallow_clone),
                    stride,
                    padding,
                    dilation,
                    groups,
                    transposed,
                    phases: transposed
                        .then(|| Conv::polyphase(weight, stride, groups, dilation))
                        .flatten(),
                },
            );
        }
        let vits = Vits {
            dims,
            params,
            convs,
            device,
        };
        vits.check_complete()?;
        Ok(vits)
    }

    /// The voice's sizes.
    pub fn dims(&self) -> &VitsDims {
        &self.dims
    }

    /// The device it runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Every parameter and convolution the forward pass reads, so that a
    /// file missing one fails at load, naming it, not mid-request.
    fn check_complete(&self) -> Result<()> {
        let d = &self.dims;
        let mut need_params = vec!["enc_p.emb.weight".to_owned(), "dp.flows.0.m".to_owned()];
        let mut need_convs = vec![
            "enc_p.proj".to_owned(),
            "dp.pre".to_owned(),
            "dp.proj".to_owned(),
            "dec.conv_pre".to_owned(),
            "dec.conv_post".to_owned(),
        ];
        for l in 0..d.n_layers {
            let a = format!("enc_p.encoder.attn_layers.{l}");
            for c in ["conv_q", "conv_k", "conv_v", "conv_o"] {
                need_convs.push(format!("{a}.{c}"));
            }
            need_params.push(format!("{a}.emb_rel_k"));
            need_params.push(format!("{a}.emb_rel_v"));
            for n in ["norm_layers_1", "norm_layers_2"] {
                need_params.push(format!("enc_p.encoder.{n}.{l}.gamma"));
                need_params.push(format!("enc_p.encoder.{n}.{l}.beta"));
            }
            for c in ["conv_1", "conv_2"] {
                need_params.push(format!("enc_p.encoder.ffn_layers.{l}.{c}.weight"));
            }
        }
        for f in &d.dp_flows {
            need_convs.push(format!("dp.flows.{f}.pre"));
            need_convs.push(format!("dp.flows.{f}.proj"));
        }
        for f in &d.flows {
            need_convs.push(format!("flow.flows.{f}.pre"));
            need_convs.push(format!("flow.flows.{f}.post"));
            for i in 0..d.wn_layers {
                need_convs.push(format!("flow.flows.{f}.enc.in_layers.{i}"));
                need_convs.push(format!("flow.flows.{f}.enc.res_skip_layers.{i}"));
            }
        }
        for i in 0..d.upsample_rates.len() {
            need_convs.push(format!("dec.ups.{i}"));
        }
        if let Some(missing) = need_params.iter().find(|p| !self.params.contains_key(*p)) {
            return Err(weight_error(missing, "missing from the voice"));
        }
        if let Some(missing) = need_convs.iter().find(|c| !self.convs.contains_key(*c)) {
            return Err(weight_error(
                &format!("{missing}.weight"),
                "no such convolution in the voice",
            ));
        }
        Ok(())
    }

    fn p(&self, name: &str) -> &Tensor {
        // check_complete ran at load: every name asked for exists.
        &self.params[name]
    }

    fn conv(&self, module: &str, x: &Tensor) -> Tensor {
        self.convs[module].forward(x)
    }

    /// The waveform for one sentence's phoneme ids (`[samples]`, f32, on the
    /// CPU), and its number of frames. `noise` draws the two standard
    /// normal tensors (the duration predictor's `[1, 2, T]`, then the
    /// prior's `[1, inter, frames]`): Piper's only random draws.
    pub fn infer(
        &self,
        ids: &[i64],
        scales: VitsScales,
        noise: &mut dyn FnMut(&[i64]) -> Tensor,
    ) -> Result<Tensor> {
        let d = &self.dims;
        if ids.is_empty() {
            return Err(Error::InvalidConfig {
                field: "phoneme ids".to_owned(),
                value: "[]".to_owned(),
                reason: "nothing to speak".to_owned(),
            });
        }
        if let Some(bad) = ids.iter().find(|&&i| i < 0 || i >= d.n_vocab) {
            return Err(Error::InvalidConfig {
                field: "phoneme id".to_owned(),
                value: bad.to_string(),
                reason: format!("the voice knows ids 0..{}", d.n_vocab),
            });
        }
        let _guard = tch::no_grad_guard();
        let dev = self.device;
        let t = ids.len() as i64;
        let ids = Tensor::from_slice(ids).view([1, t]).to_device(dev);
        let x_mask = Tensor::ones([1, 1, t], (Kind::Float, dev));

        // 1. Text encoder.
        let emb = Tensor::embedding(self.p("enc_p.emb.weight"), &ids, -1, false, false);
        let mut x = (emb * (d.hidden as f64).sqrt()).transpose(1, 2) * &x_mask;
        for l in 0..d.n_layers {
            let y = self.attention(l, &x);
            x = self.layer_norm(&format!("enc_p.encoder.norm_layers_1.{l}"), &(x + y));
            let y = self.ffn(l, &x, &x_mask);
            x = self.layer_norm(&format!("enc_p.encoder.norm_layers_2.{l}"), &(x + y));
        }
        let x = x * &x_mask;
        let stats = self.conv("enc_p.proj", &x) * &x_mask;
        let m_p = stats.narrow(1, 0, d.inter);
        let logs_p = stats.narrow(1, d.inter, d.inter);

        // 2. Durations from the stochastic duration predictor, reversed.
        let h = self.conv("dp.pre", &x);
        let h = self.dds_conv("dp.convs", &h, &x_mask, None);
        let g = self.conv("dp.proj", &h) * &x_mask;
        let mut z = noise(&[1, 2, t]).to_device(dev) * scales.noise_w;
        for &f in &d.dp_flows {
            z = z.flip([1]);
            z = self.conv_flow_reverse(&format!("dp.flows.{f}"), &z, &x_mask, &g);
        }
        z = z.flip([1]);
        z = (z - self.p("dp.flows.0.m")) * self.p("dp.flows.0.exp_neg_logs") * &x_mask;
        let logw = z.narrow(1, 0, 1);
        let w_ceil = (logw.exp() * &x_mask * scales.length_scale).ceil();
        let frames: Vec<i64> = Vec::<f32>::try_from(w_ceil.flatten(0, -1).to_device(Device::Cpu))
            .map_err(Error::from)?
            .into_iter()
            .map(|v| v as i64)
            .collect();
        let sum: i64 = frames.iter().sum();
        // Piper's max(1): durations that all round to 0 give one frame.
        let total = sum.max(1);

        // 3. The prior along the durations, sampled, through the flows.
        let repeats = Tensor::from_slice(&frames).to_device(dev);
        let expand = |s: &Tensor| {
            if sum == 0 {
                s.narrow(2, 0, 1).zeros_like()
            } else {
                s.repeat_interleave_self_tensor(&repeats, Some(2), Some(total))
            }
        };
        let m = expand(&m_p);
        let logs = expand(&logs_p);
        let eps = noise(&[1, d.inter, total]).to_device(dev);
        let mut z = &m + eps * logs.exp() * scales.noise_scale;
        let y_mask = Tensor::ones([1, 1, total], (Kind::Float, dev));
        for &f in &d.flows {
            z = z.flip([1]);
            z = self.coupling_reverse(&format!("flow.flows.{f}"), &z, &y_mask);
        }

        // 4. HiFi-GAN.
        let wav = self.generate(&(z * &y_mask))?;
        Ok(wav.flatten(0, -1).to_device(Device::Cpu))
    }

    fn layer_norm(&self, name: &str, x: &Tensor) -> Tensor {
        let c = x.size()[1];
        x.transpose(1, -1)
            .layer_norm(
                [c],
                Some(self.p(&format!("{name}.gamma"))),
                Some(self.p(&format!("{name}.beta"))),
                LAYER_NORM_EPS,
                false,
            )
            .transpose(1, -1)
    }

    fn attention(&self, layer: usize, x: &Tensor) -> Tensor {
        let d = &self.dims;
        let a = format!("enc_p.encoder.attn_layers.{layer}");
        let (b, t) = (x.size()[0], x.size()[2]);
        let kc = d.hidden / d.n_heads;
        let heads = |name: &str| {
            self.conv(&format!("{a}.{name}"), x)
                .view([b, d.n_heads, kc, t])
                .transpose(2, 3)
        };
        let q = heads("conv_q") / (kc as f64).sqrt();
        let k = heads("conv_k");
        let v = heads("conv_v");
        let mut scores = q.matmul(&k.transpose(-2, -1));
        let rel_k = self.relative_embeddings(self.p(&format!("{a}.emb_rel_k")), t);
        scores += rel_to_abs(&q.matmul(&rel_k.unsqueeze(0).transpose(-2, -1)));
        // One unpadded sentence: Piper's attention mask (fill -1e4 where
        // padded) masks nothing.
        let p = scores.softmax(-1, Kind::Float);
        let mut out = p.matmul(&v);
        let rel_v = self.relative_embeddings(self.p(&format!("{a}.emb_rel_v")), t);
        out += abs_to_rel(&p).matmul(&rel_v.unsqueeze(0));
        let out = out.transpose(2, 3).contiguous().view([b, d.hidden, t]);
        self.conv(&format!("{a}.conv_o"), &out)
    }

    /// `[1, 2L-1, kc]`: the embeddings of relative positions -(L-1)..L-1,
    /// zero beyond the window.
    fn relative_embeddings(&self, emb: &Tensor, length: i64) -> Tensor {
        let w = self.dims.window;
        let pad = (length - (w + 1)).max(0);
        let start = ((w + 1) - length).max(0);
        let emb = if pad > 0 {
            emb.constant_pad_nd([0, 0, pad, pad])
        } else {
            emb.shallow_clone()
        };
        emb.narrow(1, start, 2 * length - 1)
    }

    fn ffn(&self, layer: usize, x: &Tensor, mask: &Tensor) -> Tensor {
        let f = format!("enc_p.encoder.ffn_layers.{layer}");
        let k = self.dims.ffn_kernel;
        let (left, right) = ((k - 1) / 2, k / 2);
        let y = self
            .conv(
                &format!("{f}.conv_1"),
                &(x * mask).constant_pad_nd([left, right]),
            )
            .relu();
        self.conv(
            &format!("{f}.conv_2"),
            &(y * mask).constant_pad_nd([left, right]),
        ) * mask
    }

    /// Dilated depth-separable convolutions (`modules.DDSConv`).
    fn dds_conv(&self, name: &str, x: &Tensor, mask: &Tensor, g: Option<&Tensor>) -> Tensor {
        let mut x = match g {
            Some(g) => x + g,
            None => x.shallow_clone(),
        };
        for i in 0..self.dims.dds_layers {
            let y = self.conv(&format!("{name}.convs_sep.{i}"), &(&x * mask));
            let y = self
                .layer_norm(&format!("{name}.norms_1.{i}"), &y)
                .gelu("none");
            let y = self.conv(&format!("{name}.convs_1x1.{i}"), &y);
            let y = self
                .layer_norm(&format!("{name}.norms_2.{i}"), &y)
                .gelu("none");
            // Not `+=`: x may share storage with the caller's tensor.
            x = y + &x;
        }
        x * mask
    }

    /// `modules.ConvFlow`, reversed.
    fn conv_flow_reverse(&self, name: &str, x: &Tensor, mask: &Tensor, g: &Tensor) -> Tensor {
        let d = &self.dims;
        let x0 = x.narrow(1, 0, 1);
        let x1 = x.narrow(1, 1, 1);
        let h = self.conv(&format!("{name}.pre"), &x0);
        let h = self.dds_conv(&format!("{name}.convs"), &h, mask, Some(g));
        let h = self.conv(&format!("{name}.proj"), &h) * mask;
        let (b, t) = (x0.size()[0], x0.size()[2]);
        let h = h.reshape([b, 1, -1, t]).permute([0, 1, 3, 2]);
        let scale = (d.dp_filter as f64).sqrt();
        let k = d.num_bins;
        let widths = h.narrow(-1, 0, k) / scale;
        let heights = h.narrow(-1, k, k) / scale;
        let derivatives = h.narrow(-1, 2 * k, k - 1);
        let x1 = spline_inverse(&x1, &widths, &heights, &derivatives);
        Tensor::cat(&[x0, x1], 1) * mask
    }

    /// A mean-only residual coupling layer (`modules.ResidualCouplingLayer`), reversed.
    fn coupling_reverse(&self, name: &str, x: &Tensor, mask: &Tensor) -> Tensor {
        let half = x.size()[1] / 2;
        let x0 = x.narrow(1, 0, half);
        let x1 = x.narrow(1, half, half);
        let h = self.conv(&format!("{name}.pre"), &x0) * mask;
        let h = self.wavenet(&format!("{name}.enc"), &h, mask);
        let m = self.conv(&format!("{name}.post"), &h) * mask;
        Tensor::cat(&[x0, (x1 - m) * mask], 1)
    }

    /// `modules.WN`: gated dilated convolutions with residual and skip paths.
    fn wavenet(&self, name: &str, x: &Tensor, mask: &Tensor) -> Tensor {
        let hidden = x.size()[1];
        let n = self.dims.wn_layers;
        let mut x = x.shallow_clone();
        let mut out = x.zeros_like();
        for i in 0..n {
            let xi = self.conv(&format!("{name}.in_layers.{i}"), &x);
            let acts = xi.narrow(1, 0, hidden).tanh() * xi.narrow(1, hidden, hidden).sigmoid();
            let rs = self.conv(&format!("{name}.res_skip_layers.{i}"), &acts);
            if i + 1 < n {
                x = (x + rs.narrow(1, 0, hidden)) * mask;
                out += rs.narrow(1, hidden, hidden);
            } else {
                out += rs;
            }
        }
        out * mask
    }

    /// The HiFi-GAN generator (`models.Generator`).
    fn generate(&self, z: &Tensor) -> Result<Tensor> {
        let d = &self.dims;
        let mut o = self.conv("dec.conv_pre", z);
        for (i, _) in d.upsample_rates.iter().enumerate() {
            o = self.conv(&format!("dec.ups.{i}"), &leaky_relu(&o, GENERATOR_SLOPE)?);
            let mut sum: Option<Tensor> = None;
            for j in 0..d.num_kernels {
                let r = self.resblock(&format!("dec.resblocks.{}", i * d.num_kernels + j), &o)?;
                sum = Some(match sum {
                    Some(s) => s + r,
                    None => r,
                });
            }
            o = sum.unwrap_or(o) / d.num_kernels as f64;
        }
        let o = leaky_relu(&o, GENERATOR_FINAL_SLOPE)?;
        Ok(self.conv("dec.conv_post", &o).tanh())
    }

    fn resblock(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        let mut x = x.shallow_clone();
        if self.dims.resblock1 {
            for j in 0..3 {
                let xt = leaky_relu(&x, GENERATOR_SLOPE)?;
                let xt = self.conv(&format!("{name}.convs1.{j}"), &xt);
                let xt = leaky_relu(&xt, GENERATOR_SLOPE)?;
                x = self.conv(&format!("{name}.convs2.{j}"), &xt) + x;
            }
        } else {
            for j in 0..2 {
                let xt = leaky_relu(&x, GENERATOR_SLOPE)?;
                x = self.conv(&format!("{name}.convs.{j}"), &xt) + x;
            }
        }
        Ok(x)
    }
}

/// `leaky_relu(x, slope)` in one pass (the engine's shim: tch's binding has
/// no slope).
fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    crate::shim::leaky_relu(x, slope)
}

/// `[b, h, L, 2L-1]` relative logits to `[b, h, L, L]` absolute ones
/// (`attentions.MultiHeadAttention._relative_position_to_absolute_position`).
fn rel_to_abs(x: &Tensor) -> Tensor {
    let s = x.size();
    let (b, h, l) = (s[0], s[1], s[2]);
    let x = x.constant_pad_nd([0, 1]).reshape([b, h, l * 2 * l]);
    let x = x
        .constant_pad_nd([0, l - 1])
        .reshape([b, h, l + 1, 2 * l - 1]);
    x.narrow(2, 0, l).narrow(3, l - 1, l)
}

/// `[b, h, L, L]` absolute weights to `[b, h, L, 2L-1]` relative ones.
fn abs_to_rel(x: &Tensor) -> Tensor {
    let s = x.size();
    let (b, h, l) = (s[0], s[1], s[2]);
    let x = x
        .constant_pad_nd([0, l - 1])
        .reshape([b, h, l * l + l * (l - 1)]);
    let x = x.constant_pad_nd([l, 0]).reshape([b, h, l, 2 * l]);
    x.narrow(3, 1, 2 * l - 1)
}

/// Inverse of the unconstrained rational-quadratic spline with linear tails
/// (`transforms.unconstrained_rational_quadratic_spline`, `inverse=True`;
/// Durkan et al., "Neural Spline Flows", 2019): identity outside
/// ±tail_bound, a monotone rational-quadratic inside.
fn spline_inverse(inputs: &Tensor, uw: &Tensor, uh: &Tensor, ud: &Tensor) -> Tensor {
    let k = uw.size()[uw.dim() - 1];
    let bound = SPLINE_TAIL_BOUND;
    let inside = inputs.ge(-bound).logical_and(&inputs.le(bound));
    // The edge derivatives are exactly 1, matching the linear tails.
    let edge = ((1.0 - SPLINE_MIN_DERIVATIVE).exp() - 1.0).ln();
    let ud = ud.constant_pad_nd([1, 1]);
    let last = ud.size()[ud.dim() - 1] - 1;
    let _ = ud.narrow(-1, 0, 1).fill_(edge);
    let _ = ud.narrow(-1, last, 1).fill_(edge);

    let bins = |u: &Tensor| {
        let w = u.softmax(-1, Kind::Float) * (1.0 - SPLINE_MIN_BIN * k as f64) + SPLINE_MIN_BIN;
        let cum = w.cumsum(-1, Kind::Float).constant_pad_nd([1, 0]) * (2.0 * bound) - bound;
        let n = cum.size()[cum.dim() - 1];
        let _ = cum.narrow(-1, 0, 1).fill_(-bound);
        let _ = cum.narrow(-1, n - 1, 1).fill_(bound);
        let widths = cum.narrow(-1, 1, n - 1) - cum.narrow(-1, 0, n - 1);
        (cum, widths)
    };
    let (cumwidths, widths) = bins(uw);
    let (cumheights, heights) = bins(uh);
    let derivatives = ud.softplus() + SPLINE_MIN_DERIVATIVE;

    let locations = cumheights.copy();
    let n = locations.size()[locations.dim() - 1];
    let _ = locations
        .narrow(-1, n - 1, 1)
        .g_add_scalar_(SPLINE_SEARCH_EPS);
    let idx = (inputs
        .unsqueeze(-1)
        .ge_tensor(&locations)
        .sum_dim_intlist(-1, false, Kind::Int64)
        - 1)
    .clamp(0, k - 1)
    .unsqueeze(-1);
    let at = |t: &Tensor| t.gather(-1, &idx, false).squeeze_dim(-1);
    let in_cumwidths = at(&cumwidths);
    let in_widths = at(&widths);
    let in_cumheights = at(&cumheights);
    let in_heights = at(&heights);
    let in_delta = at(&(&heights / &widths));
    let d0 = at(&derivatives);
    let d1 = at(&derivatives.narrow(-1, 1, k));

    let y = inputs - &in_cumheights;
    let s = &d0 + &d1 - &in_delta * 2.0;
    let a = &y * &s + &in_heights * (&in_delta - &d0);
    let b = &in_heights * &d0 - &y * &s;
    let c = -(&in_delta * &y);
    let disc = &b * &b - &a * &c * 4.0;
    let theta = (&c * 2.0) / (-&b - disc.sqrt());
    let out = theta * in_widths + in_cumwidths;
    out.where_self(&inside, inputs)
}

/// The voice's sizes from its parameters and its convolutions' attributes.
fn dims(
    params: &HashMap<String, Tensor>,
    attrs: &HashMap<String, (&str, i64, i64, i64, i64)>,
) -> Result<VitsDims> {
    let shape = |name: &str| -> Result<Vec<i64>> {
        params
            .get(name)
            .map(Tensor::size)
            .ok_or_else(|| weight_error(name, "missing from the voice"))
    };
    let emb = shape("enc_p.emb.weight")?;
    let (n_vocab, hidden) = (emb[0], emb[1]);
    let n_layers = count_indexed(params.keys(), "enc_p.encoder.attn_layers.").len();
    let rel = shape("enc_p.encoder.attn_layers.0.emb_rel_k")?;
    let (window, k_channels) = ((rel[1] - 1) / 2, rel[2]);
    if k_channels == 0 || hidden % k_channels != 0 {
        return Err(weight_error(
            "enc_p.encoder.attn_layers.0.emb_rel_k",
            format!("head width {k_channels} does not divide the hidden size {hidden}"),
        ));
    }
    let ffn_kernel = shape("enc_p.encoder.ffn_layers.0.conv_1.weight")?[2];
    let inter = shape("enc_p.proj.weight")?[0] / 2;
    let mut dp_flows: Vec<usize> = count_indexed(params.keys(), "dp.flows.")
        .into_iter()
        .filter(|&f| f != 0)
        .collect();
    dp_flows.reverse();
    let first_dp = *dp_flows
        .first()
        .ok_or_else(|| weight_error("dp.flows.*", "no conv flow in the duration predictor"))?;
    let num_bins = (shape(&format!("dp.flows.{first_dp}.proj.weight"))?[0] + 1) / 3;
    let dp_filter = shape("dp.pre.weight")?[0];
    let dds_layers = count_indexed(params.keys(), "dp.convs.convs_sep.").len();
    let mut flows = count_indexed(params.keys(), "flow.flows.");
    flows.reverse();
    let first_flow = *flows
        .first()
        .ok_or_else(|| weight_error("flow.flows.*", "no coupling flow"))?;
    let wn_layers = count_indexed(
        attrs.keys(),
        &format!("flow.flows.{first_flow}.enc.in_layers."),
    )
    .len();
    let n_ups = count_indexed(attrs.keys(), "dec.ups.").len();
    let upsample_rates: Vec<i64> = (0..n_ups)
        .map(|i| attrs.get(&format!("dec.ups.{i}")).map_or(1, |a| a.1))
        .collect();
    let n_resblocks = count_indexed(params.keys(), "dec.resblocks.").len();
    if n_ups == 0 || n_resblocks % n_ups != 0 {
        return Err(weight_error(
            "dec.resblocks.*",
            format!("{n_resblocks} residual blocks for {n_ups} upsampling stages"),
        ));
    }
    Ok(VitsDims {
        n_vocab,
        hidden,
        inter,
        n_layers,
        n_heads: hidden / k_channels,
        window,
        ffn_kernel,
        num_bins,
        dp_filter,
        dds_layers,
        dp_flows,
        flows,
        wn_layers,
        hop: upsample_rates.iter().product(),
        upsample_rates,
        num_kernels: n_resblocks / n_ups,
        resblock1: params.contains_key("dec.resblocks.0.convs1.0.weight"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polyphase form equals libtorch's transposed convolution, with
    /// and without padding and bias, at odd lengths.
    #[test]
    fn polyphase_transposed_convolution_equals_conv_transpose1d() {
        tch::manual_seed(0);
        for (cin, cout, k, s, p, len, bias) in [
            (8, 4, 16, 8, 4, 13, true),
            (6, 3, 8, 4, 2, 7, false),
            (5, 5, 4, 2, 1, 1, true),
            (4, 2, 6, 3, 0, 9, true),
        ] {
            let weight = Tensor::randn([cin, cout, k], (Kind::Float, Device::Cpu));
            let b = bias.then(|| Tensor::randn([cout], (Kind::Float, Device::Cpu)));
            let x = Tensor::randn([2, cin, len], (Kind::Float, Device::Cpu));
            let phases = Conv::polyphase(&weight, s, 1, 1);
            assert!(phases.is_some());
            let conv = Conv {
                weight: weight.shallow_clone(),
                bias: b,
                stride: s,
                padding: p,
                dilation: 1,
                groups: 1,
                transposed: true,
                phases,
            };
            let fast = conv.forward(&x);
            let reference = x.conv_transpose1d(&weight, conv.bias.as_ref(), [s], [p], [0], 1, [1]);
            assert_eq!(fast.size(), reference.size(), "k {k} s {s} p {p} len {len}");
            let err = (fast - reference).abs().max().double_value(&[]);
            assert!(err < 1e-4, "k {k} s {s} p {p} len {len}: {err}");
        }
        assert!(Conv::polyphase(
            &Tensor::zeros([2, 2, 11], (Kind::Float, Device::Cpu)),
            5,
            1,
            1
        )
        .is_none());
    }
}
