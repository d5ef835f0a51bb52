//! Model code: the decoder ([`Model`]), its rotary tables, its fused CPU
//! kernels, and the per-step index tensors ([`ForwardBatch`]) that connect
//! it to the paged KV cache.
//!
//! Models know tensors, configs and the cache layout; they know nothing of
//! requests, sampling or scheduling.
mod batch;
mod decode_layer;
mod decoder;
mod fused;
mod paged_attention;
pub mod qwen2_5_omni;
mod rotary;
mod vits;

pub use batch::{BatchEntry, ForwardBatch, MropePositions};
pub use decoder::{Model, ModelOptions, ModelOutput};
pub use vits::{Vits, VitsDims, VitsScales};

#[cfg(test)]
pub(crate) use fused::with_kernel_build;

/// Tiny random models for unit tests of everything above the model.
#[cfg(test)]
pub(crate) mod testing {
    use tch::Tensor;

    use crate::config::{Architecture, ModelConfig};
    use crate::error::Result;
    use crate::weights::Weights;

    /// A 2-layer GQA config; `arch` switches biases / q-k norm on.
    pub fn tiny_config(arch: Architecture) -> ModelConfig {
        ModelConfig {
            architecture: arch,
            vocab_size: 101,
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 512,
            tie_word_embeddings: arch == Architecture::Llama,
            attention_bias: arch == Architecture::Qwen2,
            qk_norm: arch == Architecture::Qwen3,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            embedding_size: None,
            mrope_section: None,
        }
    }

    /// Seeded random weights with HF names for `cfg`. Drawn from a private
    /// generator: libtorch's global one is shared by tests running in
    /// parallel threads.
    pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Result<Weights> {
        use rand::{Rng, SeedableRng};
        let mut g = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (h, d, v) = (
            cfg.hidden_size as i64,
            cfg.head_dim as i64,
            cfg.vocab_size as i64,
        );
        let (nh, nkv) = (
            cfg.num_attention_heads as i64,
            cfg.num_key_value_heads as i64,
        );
        let i = cfg.intermediate_size as i64;
        let mut w = Weights::new();
        let mut rand = |name: String, shape: &[i64], scale: f64| -> Result<()> {
            let n: i64 = shape.iter().product();
            // Uniform with the variance of N(0, scale^2).
            let a = scale * 3f64.sqrt();
            let vals: Vec<f32> = (0..n).map(|_| g.random_range(-a..a) as f32).collect();
            w.insert(name, Tensor::from_slice(&vals).f_view(shape)?);
            Ok(())
        };
        rand("model.embed_tokens.weight".into(), &[v, h], 1.0)?;
        if !cfg.tie_word_embeddings {
            rand("lm_head.weight".into(), &[v, h], 0.5)?;
        }
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            rand(format!("{p}.self_attn.q_proj.weight"), &[nh * d, h], 0.2)?;
            rand(format!("{p}.self_attn.k_proj.weight"), &[nkv * d, h], 0.2)?;
            rand(format!("{p}.self_attn.v_proj.weight"), &[nkv * d, h], 0.2)?;
            rand(format!("{p}.self_attn.o_proj.weight"), &[h, nh * d], 0.1)?;
            if cfg.attention_bias {
                rand(format!("{p}.self_attn.q_proj.bias"), &[nh * d], 0.1)?;
                rand(format!("{p}.self_attn.k_proj.bias"), &[nkv * d], 0.1)?;
                rand(format!("{p}.self_attn.v_proj.bias"), &[nkv * d], 0.1)?;
            }
            if cfg.qk_norm {
                rand(format!("{p}.self_attn.q_norm.weight"), &[d], 1.0)?;
                rand(format!("{p}.self_attn.k_norm.weight"), &[d], 1.0)?;
            }
            rand(format!("{p}.mlp.gate_proj.weight"), &[i, h], 0.2)?;
            rand(format!("{p}.mlp.up_proj.weight"), &[i, h], 0.2)?;
            rand(format!("{p}.mlp.down_proj.weight"), &[h, i], 0.1)?;
            rand(format!("{p}.input_layernorm.weight"), &[h], 1.0)?;
            rand(format!("{p}.post_attention_layernorm.weight"), &[h], 1.0)?;
        }
        rand("model.norm.weight".into(), &[h], 1.0)?;
        Ok(w)
    }
}
