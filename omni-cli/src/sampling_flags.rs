//! Sampling flags shared by `generate` and `bench`: the fields of vLLM's
//! `SamplingParams`. Flags that are given apply to every stage, on top of
//! each stage's `default_sampling_params`; `--stage-params` gives one JSON
//! object per stage instead.
use clap::Args;
use omni_core::{SamplingParams, StageSamplingParams};

use crate::BadInput;

/// Sampling flags.
#[derive(Args, Debug, Clone, Default)]
pub struct SamplingFlags {
    /// Most tokens each stage generates.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability
    /// reaches this.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens (-1 or 0: off).
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<i32>,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Penalty (> 1) or bonus (< 1) for tokens already present.
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Seed for sampling: the same seed gives the same tokens.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this string is generated (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Generate at least this many tokens (end-of-sequence and stop token
    /// ids are held back until then).
    #[arg(long)]
    pub min_tokens: Option<usize>,
    /// The voice of speech stages that have several (Qwen2.5-Omni:
    /// Chelsie, Ethan; the model's default when unset).
    #[arg(long)]
    pub speaker: Option<String>,
    /// One JSON object of sampling params per stage, as a JSON array, e.g.
    /// '[{"max_tokens":32},{"max_tokens":16}]' (wins over the flags above).
    #[arg(long, value_name = "JSON")]
    pub stage_params: Option<String>,
}

impl SamplingFlags {
    /// Per-stage params: each stage's defaults with the given flags on top.
    pub fn resolve(&self, defaults: &[SamplingParams]) -> anyhow::Result<StageSamplingParams> {
        if let Some(json) = &self.stage_params {
            let list: Vec<SamplingParams> = serde_json::from_str(json).map_err(|e| {
                BadInput(format!(
                    "--stage-params {json:?} is not a JSON array of sampling params: {e}"
                ))
            })?;
            return Ok(StageSamplingParams::PerStage(list));
        }
        let per_stage = defaults
            .iter()
            .map(|d| {
                let mut p = d.clone();
                if let Some(v) = self.max_tokens {
                    p.max_tokens = Some(v);
                }
                if let Some(v) = self.temperature {
                    p.temperature = v;
                }
                if let Some(v) = self.top_p {
                    p.top_p = v;
                }
                if let Some(v) = self.top_k {
                    p.top_k = v;
                }
                if let Some(v) = self.min_p {
                    p.min_p = v;
                }
                if let Some(v) = self.repetition_penalty {
                    p.repetition_penalty = v;
                }
                if let Some(v) = self.seed {
                    p.seed = Some(v);
                }
                if !self.stop.is_empty() {
                    p.stop = self.stop.clone();
                }
                if self.ignore_eos {
                    p.ignore_eos = true;
                }
                if let Some(v) = self.min_tokens {
                    p.min_tokens = v;
                }
                if let Some(v) = &self.speaker {
                    p.speaker = Some(v.clone());
                }
                p
            })
            .collect();
        Ok(StageSamplingParams::PerStage(per_stage))
    }
}
