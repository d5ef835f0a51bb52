//! A model's tensors by checkpoint name, whatever file they came from.
//!
//! Loaders store tensors under Hugging Face names
//! (`model.layers.0.self_attn.q_proj.weight`), already converted into the
//! engine's dtype and placed on its device, so model code never knows whether
//! the file was GGUF or safetensors.
use std::collections::HashMap;

use tch::Tensor;

use crate::error::{Error, Result};

/// Named tensors of one model.
#[derive(Debug, Default)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a tensor.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Borrows a tensor; the error names the missing weight.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::Weight {
            name: name.to_owned(),
            reason: "missing from the checkpoint".to_owned(),
        })
    }

    /// Removes and returns a tensor (so its memory is owned by the model).
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.tensors.remove(name).ok_or_else(|| Error::Weight {
            name: name.to_owned(),
            reason: "missing from the checkpoint".to_owned(),
        })
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
        self.tensors.contains_key(name)
    }

    /// The names present, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// How many tensors there are.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}
