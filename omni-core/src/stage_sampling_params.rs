//! `StageSamplingParams`: the sampling params of one request across the
//! pipeline's stages.
//!
//! vLLM-Omni takes either one `SamplingParams` for every stage or a
//! `sampling_params_list` with one entry per stage; a request that names
//! none uses each stage's `default_sampling_params` from the pipeline file.
use omni_engine::SamplingParams;

use crate::{Error, Result};

/// Sampling params for every stage of a request.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
// Made once per request and read at once: boxing `Same` would only cost
// every caller a `Box::new`.
#[allow(clippy::large_enum_variant)]
pub enum StageSamplingParams {
    /// Each stage's `default_sampling_params` from the pipeline config.
    #[default]
    Defaults,
    /// The same params for every stage.
    Same(SamplingParams),
    /// One entry per stage, in stage order.
    PerStage(Vec<SamplingParams>),
}

impl From<SamplingParams> for StageSamplingParams {
    fn from(p: SamplingParams) -> Self {
        Self::Same(p)
    }
}

impl From<&SamplingParams> for StageSamplingParams {
    fn from(p: &SamplingParams) -> Self {
        Self::Same(p.clone())
    }
}

impl From<Vec<SamplingParams>> for StageSamplingParams {
    fn from(p: Vec<SamplingParams>) -> Self {
        Self::PerStage(p)
    }
}

impl From<&[SamplingParams]> for StageSamplingParams {
    fn from(p: &[SamplingParams]) -> Self {
        Self::PerStage(p.to_vec())
    }
}

impl<const N: usize> From<[SamplingParams; N]> for StageSamplingParams {
    fn from(p: [SamplingParams; N]) -> Self {
        Self::PerStage(p.to_vec())
    }
}

impl From<Option<SamplingParams>> for StageSamplingParams {
    fn from(p: Option<SamplingParams>) -> Self {
        p.map_or(Self::Defaults, Self::Same)
    }
}

impl StageSamplingParams {
    /// One validated `SamplingParams` per stage. `defaults` holds each
    /// stage's default params, in stage order.
    pub fn resolve(&self, defaults: &[SamplingParams]) -> Result<Vec<SamplingParams>> {
        let per_stage = match self {
            Self::Defaults => defaults.to_vec(),
            Self::Same(p) => vec![p.clone(); defaults.len()],
            Self::PerStage(list) if list.len() == defaults.len() => list.clone(),
            Self::PerStage(list) => {
                return Err(Error::SamplingParamsCount {
                    expected: defaults.len(),
                    got: list.len(),
                })
            }
        };
        for (stage_id, p) in per_stage.iter().enumerate() {
            p.validate()
                .map_err(|cause| Error::InvalidSamplingParams { stage_id, cause })?;
        }
        Ok(per_stage)
    }
}
