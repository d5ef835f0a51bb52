//! `OmniEngineArgs`: what `OmniLLM::from_engine_args` and
//! `AsyncOmni::from_engine_args` need to start a pipeline.
//!
//! Mirrors vLLM-Omni, where `OmniLLM(model=..., stage_configs_path=...)`
//! picks the stage configs for a model: here `model` names a built-in
//! pipeline (`default`, `smollm2`, ... see `PipelineConfig::builtin_names`)
//! or a pipeline file (YAML or JSON), and `stage_configs_path`, when set,
//! wins over it.
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The built-in pipeline used when nothing else is named.
pub const DEFAULT_PIPELINE: &str = "default";

/// Arguments that start a pipeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OmniEngineArgs {
    /// A built-in pipeline name or the path of a pipeline file.
    pub model: String,
    /// A pipeline file; when set it is used instead of `model`.
    pub stage_configs_path: Option<PathBuf>,
    /// How long to wait for every stage to load its model and report ready.
    /// `None`: the runtime's default.
    #[serde(with = "opt_secs")]
    pub init_timeout: Option<Duration>,
    /// The `omni-stage` worker binary; `None`: the runtime looks next to the
    /// current executable, then on `PATH`.
    pub stage_binary: Option<PathBuf>,
    /// When set, every stage loads this model instead of its config's
    /// `engine_args.model` (a pipeline written for one model family run on
    /// your copy of it, e.g. `qwen2_5_omni` on a Qwen2.5-Omni folder).
    pub model_path: Option<String>,
    /// At most this many requests in flight (streams alive and unfinished);
    /// past it `AsyncOmni::generate` refuses with `Error::Overloaded`
    /// instead of queueing without bound. `None`: no bound.
    pub max_pending_requests: Option<usize>,
    /// When set, the stages run on this backend instead of the pipeline's
    /// own `runtime.backend` (e.g. a built-in pipeline on a Ray cluster).
    pub backend: Option<omni_runtime::Backend>,
}

impl Default for OmniEngineArgs {
    fn default() -> Self {
        Self {
            model: DEFAULT_PIPELINE.to_string(),
            stage_configs_path: None,
            init_timeout: None,
            stage_binary: None,
            model_path: None,
            max_pending_requests: None,
            backend: None,
        }
    }
}

impl OmniEngineArgs {
    /// Arguments for a built-in pipeline name or a pipeline file.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            ..Self::default()
        }
    }

    /// What the pipeline is called in messages: the file when one is given,
    /// the model otherwise.
    pub fn pipeline_name(&self) -> String {
        match &self.stage_configs_path {
            Some(p) => p.display().to_string(),
            None => self.model.clone(),
        }
    }
}

/// `Option<Duration>` as seconds (a float) in config files.
mod opt_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let secs = Option::<f64>::deserialize(d)?;
        match secs {
            None => Ok(None),
            Some(s) if s.is_finite() && s > 0.0 => Ok(Some(Duration::from_secs_f64(s))),
            Some(s) => Err(serde::de::Error::custom(format!(
                "init_timeout {s} is not a positive number of seconds"
            ))),
        }
    }
}
