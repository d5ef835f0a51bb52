//! Qwen2.5-Omni's `config.json`: one file for the thinker, the talker and
//! token2wav (`thinker_config`, `talker_config`, `token2wav_config` with its
//! `dit_config` and `bigvgan_config`), mirrored field by field from
//! transformers' `configuration_qwen2_5_omni.py`; defaults are its class
//! defaults (the 7B model's values). Every size the engine uses comes from
//! here, never from the real model's numbers.
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The whole `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct OmniConfig {
    /// `model_type`: `qwen2_5_omni`.
    #[serde(default)]
    pub model_type: String,
    /// The thinker (its `text_config` is the text decoder).
    pub thinker_config: serde_json::Value,
    /// The talker.
    pub talker_config: TalkerConfig,
    /// code2wav: the DiT and BigVGAN.
    pub token2wav_config: Token2WavConfig,
}

/// The talker's special ids (the decoder's own sizes are read by the
/// decoder's config parser).
#[derive(Debug, Clone, Deserialize)]
pub struct TalkerConfig {
    /// Codec vocabulary size.
    pub vocab_size: usize,
    /// Codec begin-of-speech: fed, never sampled.
    #[serde(default = "d_codec_bos")]
    pub tts_codec_start_token_id: i64,
    /// Codec end-of-speech.
    #[serde(default = "d_codec_eos")]
    pub tts_codec_end_token_id: i64,
    /// Codec pad (also an end of speech in transformers' `generate`).
    #[serde(default = "d_codec_pad")]
    pub tts_codec_pad_token_id: i64,
    /// Codec mask (the prompt positions' placeholder).
    #[serde(default = "d_codec_mask")]
    pub tts_codec_mask_token_id: i64,
    /// Text end (thinker vocabulary).
    #[serde(default = "d_text_eos")]
    pub tts_text_end_token_id: i64,
    /// Text pad (thinker vocabulary).
    #[serde(default = "d_text_pad")]
    pub tts_text_pad_token_id: i64,
}

fn d_codec_bos() -> i64 {
    8293
}
fn d_codec_eos() -> i64 {
    8294
}
fn d_codec_pad() -> i64 {
    8292
}
fn d_codec_mask() -> i64 {
    8296
}
fn d_text_eos() -> i64 {
    151861
}
fn d_text_pad() -> i64 {
    151859
}

/// `token2wav_config`.
#[derive(Debug, Clone, Deserialize)]
pub struct Token2WavConfig {
    /// The flow-matching DiT.
    pub dit_config: DitConfig,
    /// The vocoder.
    pub bigvgan_config: BigVganConfig,
}

/// `dit_config` (transformers' `Qwen2_5OmniDiTConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct DitConfig {
    /// Model width.
    #[serde(default = "d_dit_hidden")]
    pub hidden_size: i64,
    /// Transformer blocks.
    #[serde(default = "d_dit_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads.
    #[serde(default = "d_dit_heads")]
    pub num_attention_heads: i64,
    /// Width of one head.
    #[serde(default = "d_dit_head_dim")]
    pub head_dim: i64,
    /// MLP width multiplier.
    #[serde(default = "d_ff_mult")]
    pub ff_mult: f64,
    /// Codec embedding width.
    #[serde(default = "d_emb_dim")]
    pub emb_dim: i64,
    /// Frames per attention block.
    #[serde(default = "d_block_size")]
    pub block_size: i64,
    /// Layers that also see the next block.
    #[serde(default = "d_look_ahead")]
    pub look_ahead_layers: Vec<usize>,
    /// Layers that also see the previous block (transformers spells the
    /// config field `look_backward_layers`).
    #[serde(default = "d_look_back")]
    pub look_backward_layers: Vec<usize>,
    /// Mel frames per codec token.
    #[serde(default = "d_repeats")]
    pub repeats: i64,
    /// Codec ids the embedding covers (it has one row more).
    #[serde(default = "d_num_embeds")]
    pub num_embeds: i64,
    /// Mel bins.
    #[serde(default = "d_mel_dim")]
    pub mel_dim: i64,
    /// Speaker condition width (`spk_dict.pt`'s `cond`).
    #[serde(default = "d_enc_emb_dim")]
    pub enc_emb_dim: i64,
    /// ECAPA output width.
    #[serde(default = "d_enc_dim")]
    pub enc_dim: i64,
    /// ECAPA channels per block (first, SE-Res2Net blocks, multi-layer aggregation).
    #[serde(default = "d_enc_channels")]
    pub enc_channels: Vec<i64>,
    /// ECAPA kernel sizes.
    #[serde(default = "d_enc_kernels")]
    pub enc_kernel_sizes: Vec<i64>,
    /// ECAPA dilations.
    #[serde(default = "d_enc_dilations")]
    pub enc_dilations: Vec<i64>,
    /// Res2Net scale.
    #[serde(default = "d_res2net_scale")]
    pub enc_res2net_scale: i64,
    /// Longest mel (frames) the rotary table covers.
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: i64,
    /// Rotary base.
    #[serde(default = "d_dit_rope_theta")]
    pub rope_theta: f64,
}

fn d_dit_hidden() -> i64 {
    1024
}
fn d_dit_layers() -> usize {
    22
}
fn d_dit_heads() -> i64 {
    16
}
fn d_dit_head_dim() -> i64 {
    64
}
fn d_ff_mult() -> f64 {
    2.0
}
fn d_emb_dim() -> i64 {
    512
}
fn d_block_size() -> i64 {
    24
}
fn d_look_ahead() -> Vec<usize> {
    vec![10]
}
fn d_look_back() -> Vec<usize> {
    vec![0, 20]
}
fn d_repeats() -> i64 {
    2
}
fn d_num_embeds() -> i64 {
    8193
}
fn d_mel_dim() -> i64 {
    80
}
fn d_enc_emb_dim() -> i64 {
    192
}
fn d_enc_dim() -> i64 {
    128
}
fn d_enc_channels() -> Vec<i64> {
    vec![256, 256, 256, 256, 768]
}
fn d_enc_kernels() -> Vec<i64> {
    vec![5, 3, 3, 3, 1]
}
fn d_enc_dilations() -> Vec<i64> {
    vec![1, 2, 3, 4, 1]
}
fn d_res2net_scale() -> i64 {
    2
}
fn d_max_pos() -> i64 {
    32768
}
fn d_dit_rope_theta() -> f64 {
    10000.0
}

/// `bigvgan_config`.
#[derive(Debug, Clone, Deserialize)]
pub struct BigVganConfig {
    /// Mel bins in.
    #[serde(default = "d_mel_dim")]
    pub mel_dim: i64,
    /// Channels after `conv_pre`; halved by every upsampling.
    #[serde(default = "d_up_init")]
    pub upsample_initial_channel: i64,
    /// AMP block kernel sizes (one block of each per stage).
    #[serde(default = "d_rb_kernels")]
    pub resblock_kernel_sizes: Vec<i64>,
    /// AMP block dilations, three per block.
    #[serde(default = "d_rb_dilations")]
    pub resblock_dilation_sizes: Vec<Vec<i64>>,
    /// Upsampling strides.
    #[serde(default = "d_up_rates")]
    pub upsample_rates: Vec<i64>,
    /// Upsampling kernel sizes.
    #[serde(default = "d_up_kernels")]
    pub upsample_kernel_sizes: Vec<i64>,
}

fn d_up_init() -> i64 {
    1536
}
fn d_rb_kernels() -> Vec<i64> {
    vec![3, 7, 11]
}
fn d_rb_dilations() -> Vec<Vec<i64>> {
    vec![vec![1, 3, 5]; 3]
}
fn d_up_rates() -> Vec<i64> {
    vec![5, 3, 2, 2, 2, 2]
}
fn d_up_kernels() -> Vec<i64> {
    vec![11, 7, 4, 4, 4, 4]
}

impl OmniConfig {
    /// Reads `<dir>/config.json`, refusing a folder that is not Qwen2.5-Omni.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let bad = |field: &str, reason: String| Error::ModelConfig {
            path: path.clone(),
            field: field.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad("(file)", format!("not JSON: {e}")))?;
        let model_type = value
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if model_type != "qwen2_5_omni" {
            return Err(bad(
                "model_type",
                format!("{model_type:?}: not a Qwen2.5-Omni folder (expected \"qwen2_5_omni\")"),
            ));
        }
        let config: OmniConfig = serde_path_to_error::deserialize(&value)
            .map_err(|e| bad(&e.path().to_string(), e.inner().to_string()))?;
        config.check(&path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, reason: String| Error::ModelConfig {
            path: PathBuf::from(path),
            field: field.to_owned(),
            reason,
        };
        let d = &self.token2wav_config.dit_config;
        if d.enc_channels.len() != d.enc_kernel_sizes.len()
            || d.enc_channels.len() != d.enc_dilations.len()
            || d.enc_channels.len() < 3
        {
            return Err(bad(
                "token2wav_config.dit_config.enc_channels",
                "enc_channels, enc_kernel_sizes and enc_dilations must have one length, at least 3"
                    .to_owned(),
            ));
        }
        if d.num_attention_heads <= 0 || d.head_dim % 2 != 0 || d.block_size <= 0 {
            return Err(bad(
                "token2wav_config.dit_config",
                format!(
                    "{} heads of width {} with block_size {}: heads must be positive, \
                     the head width even and block_size positive",
                    d.num_attention_heads, d.head_dim, d.block_size
                ),
            ));
        }
        let b = &self.token2wav_config.bigvgan_config;
        if b.upsample_rates.len() != b.upsample_kernel_sizes.len()
            || b.resblock_kernel_sizes.len() != b.resblock_dilation_sizes.len()
            || b.resblock_dilation_sizes.iter().any(|d| d.len() != 3)
        {
            return Err(bad(
                "token2wav_config.bigvgan_config",
                "one kernel per upsampling rate, one dilation list (of 3) per resblock kernel"
                    .to_owned(),
            ));
        }
        if b.upsample_initial_channel >> b.upsample_rates.len() == 0 {
            return Err(bad(
                "token2wav_config.bigvgan_config.upsample_initial_channel",
                format!(
                    "{} channels cannot be halved {} times",
                    b.upsample_initial_channel,
                    b.upsample_rates.len()
                ),
            ));
        }
        Ok(())
    }
}
