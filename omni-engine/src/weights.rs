//! A model's tensors by checkpoint name, whatever file they came from.
//!
//! Loaders store tensors under Hugging Face names
//! (`model.layers.0.self_attn.q_proj.weight`), already converted into the
//! engine's dtype and placed on its device, so model code never knows whether
//! the file was GGUF or safetensors. A GGUF loader asked to keep [`Blocks`]
//! stores quantized matrices as the file has them instead; whoever takes
//! one as a plain tensor gets it dequantized.
use std::collections::HashMap;

use tch::Tensor;

use crate::error::{Error, Result};
use crate::quant::QuantizedTensor;

/// What a loader does with quantized matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Blocks {
    /// Dequantize every tensor into the engine's dtype.
    #[default]
    Dequantize,
    /// Keep the blocks of every matrix the quantized kernels read
    /// ([`crate::quant::KERNEL_TYPES`]; fp32 on the CPU only).
    Keep,
}

/// A linear layer's weight: dense, or in quantized blocks.
#[derive(Debug)]
pub enum LinearWeight {
    /// In the engine's dtype, on its device.
    Dense(Tensor),
    /// As the GGUF file stores it.
    Quantized(QuantizedTensor),
}

impl LinearWeight {
    /// `[rows, cols]`.
    pub fn shape(&self) -> Vec<i64> {
        match self {
            LinearWeight::Dense(t) => t.size(),
            LinearWeight::Quantized(q) => q.shape.to_vec(),
        }
    }

    /// The weight as a dense tensor (quantized blocks dequantized to fp32).
    pub fn into_dense(self) -> Result<Tensor> {
        match self {
            LinearWeight::Dense(t) => Ok(t),
            LinearWeight::Quantized(q) => q.dequantize(),
        }
    }
}

/// Named tensors of one model.
#[derive(Debug, Default)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    quantized: HashMap<String, QuantizedTensor>,
}

impl Weights {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a tensor.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        let name = name.into();
        self.quantized.remove(&name);
        self.tensors.insert(name, tensor);
    }

    /// Adds or replaces a matrix kept in quantized blocks.
    pub fn insert_quantized(&mut self, name: impl Into<String>, tensor: QuantizedTensor) {
        let name = name.into();
        self.tensors.remove(&name);
        self.quantized.insert(name, tensor);
    }

    /// Borrows a dense tensor; the error names the missing weight (a
    /// matrix kept in blocks is not dense: see [`Weights::take`]).
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| {
            if self.quantized.contains_key(name) {
                Error::Weight {
                    name: name.to_owned(),
                    reason: "kept in quantized blocks: take it (dequantized) or take_linear it"
                        .to_owned(),
                }
            } else {
                missing(name)
            }
        })
    }

    /// Removes and returns a tensor (so its memory is owned by the model),
    /// dequantized to fp32 if it was kept in blocks.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.take_linear(name)?.into_dense()
    }

    /// Removes and returns a matrix as stored: in blocks when kept so.
    pub fn take_linear(&mut self, name: &str) -> Result<LinearWeight> {
        if let Some(t) = self.tensors.remove(name) {
            return Ok(LinearWeight::Dense(t));
        }
        self.quantized
            .remove(name)
            .map(LinearWeight::Quantized)
            .ok_or_else(|| missing(name))
    }

    /// Another handle to a matrix kept in blocks, if it is (a tied head
    /// shares its embedding's blocks).
    pub fn quantized(&self, name: &str) -> Option<QuantizedTensor> {
        self.quantized.get(name).map(QuantizedTensor::shallow_clone)
    }

    /// Takes `<name>.weight` and, when present, `<name>.bias`.
    pub fn take_weight_bias(&mut self, name: &str) -> Result<(Tensor, Option<Tensor>)> {
        let weight = self.take(&format!("{name}.weight"))?;
        let bias = format!("{name}.bias");
        let bias = if self.contains(&bias) {
            Some(self.take(&bias)?)
        } else {
            None
        };
        Ok((weight, bias))
    }

    /// Whether a tensor is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.quantized.contains_key(name)
    }

    /// The names present, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors
            .keys()
            .chain(self.quantized.keys())
            .map(String::as_str)
    }

    /// How many tensors there are.
    pub fn len(&self) -> usize {
        self.tensors.len() + self.quantized.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn missing(name: &str) -> Error {
    Error::Weight {
        name: name.to_owned(),
        reason: "missing from the checkpoint".to_owned(),
    }
}
