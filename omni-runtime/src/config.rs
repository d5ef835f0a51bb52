//! Pipeline configuration: which stages exist, what each runs, and how they
//! are wired. Field names follow vLLM-Omni's stage configs
//! (`vllm_omni/model_executor/stage_configs/*.yaml`): a list `stage_args`
//! of stages with `stage_id`, `engine_args` (with `model_stage`),
//! `engine_input_source`, `custom_process_input_func`, `final_output`,
//! `final_output_type`, `default_sampling_params` and `runtime`.
//!
//! Files are YAML or JSON. They are parsed into a JSON value first and then
//! field by field, so that every error names the file, the field path and
//! the bad value (`stage_args[1].engine_input_source[0] = 7: ...`).
//!
//! This module knows nothing of processes or sockets; it only describes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use omni_engine::{EngineArgs, SamplingParams};

use crate::builtin;
use crate::error::{Error, Result};
use crate::processor;

/// What a final-output stage produces, as vLLM-Omni's `final_output_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum FinalOutputType {
    /// Generated text (and token ids).
    Text,
    /// Audio samples (a tensor).
    Audio,
    /// Hidden states or other latents (a tensor).
    Latent,
    /// An image (a tensor).
    Image,
}

impl FinalOutputType {
    /// The config spelling (`text`, `audio`, `latent`, `image`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinalOutputType::Text => "text",
            FinalOutputType::Audio => "audio",
            FinalOutputType::Latent => "latent",
            FinalOutputType::Image => "image",
        }
    }
}

impl std::fmt::Display for FinalOutputType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How stages talk to each other and to the orchestrator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum TransportKind {
    /// Unix domain sockets in a private run directory (one host).
    #[default]
    Ipc,
    /// TCP, so a stage can listen on an address other hosts reach.
    Tcp,
}

/// Profiler backends a stage worker can run (`omni_profiler::backend_by_name`).
pub const PROFILER_BACKENDS: &[&str] = &["torch", "chrome", "noop"];

/// The environment variable that overrides every stage's profiler backend.
pub const PROFILER_BACKEND_ENV: &str = "OMNI_PROFILER_BACKEND";

/// The default backend, as in vLLM (`torch.profiler`).
pub const DEFAULT_PROFILER_BACKEND: &str = "torch";

/// Default threshold above which a tensor between stages on one host goes
/// through shared memory instead of a socket frame (as vLLM-Omni: 64 KiB).
pub const DEFAULT_SHM_THRESHOLD_BYTES: usize = 64 * 1024;

/// Pipeline-wide runtime settings (`runtime:` at the top level).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// `ipc` (default) or `tcp`.
    pub transport: TransportKind,
    /// Host the orchestrator and stages listen on with `tcp` (default 127.0.0.1).
    pub host: String,
    /// Tensors at least this large travel through shared memory between
    /// stages on one host; `null` turns shared memory off.
    pub shm_threshold_bytes: Option<usize>,
    /// Edges that stream (as vLLM-Omni's `runtime.edges`): the upstream
    /// stage sends its output every `window_size` new tokens while it is
    /// still generating, and the downstream stage starts on the first
    /// pieces. An edge not listed, or with `window_size: -1`, sends the
    /// whole output once it is finished.
    pub edges: Vec<EdgeConfig>,
    /// How the stages on one host share its cores when they run on the CPU
    /// and their `engine_args.num_threads` names no count.
    pub cpu_threads: CpuThreads,
    /// Who starts and watches the stage processes: `local` (children of
    /// this process, on this host) or `ray` (placed on the nodes of a Ray
    /// cluster).
    pub backend: Backend,
    /// Settings of the `ray` backend.
    pub ray: RayConfig,
}

/// Who starts and watches the stage processes (`runtime.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Backend {
    /// Child processes of the orchestrator, on its host.
    #[default]
    Local,
    /// One Ray actor per stage, each owning its stage's process, placed by
    /// a placement group on the nodes of a running Ray cluster (`RAY_ADDRESS`
    /// or `runtime.ray.address`). Stages talk over `tcp://` on their nodes'
    /// addresses, whatever `runtime.transport` says.
    Ray,
}

/// How a Ray placement group spreads the stages' bundles over the nodes
/// (Ray's own strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PlacementStrategy {
    /// As few nodes as possible, more when needed (Ray's default).
    #[default]
    Pack,
    /// Over as many nodes as possible.
    Spread,
    /// All on one node, or fail.
    StrictPack,
    /// Each on its own node, or fail.
    StrictSpread,
}

/// `runtime.ray`: where the Ray cluster is and how stages are placed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RayConfig {
    /// The cluster (`ray://...`, `HOST:PORT` or `auto`); `RAY_ADDRESS`,
    /// then `auto` (a cluster started on this host), when absent.
    pub address: Option<String>,
    /// How the stages' bundles spread over the nodes.
    pub placement_strategy: PlacementStrategy,
    /// How long the cluster may take to find room for every bundle.
    pub placement_timeout_s: u64,
    /// The Python interpreter that runs Omni's launcher (it needs `ray`);
    /// `OMNI_RAY_PYTHON`, then `python3`, when absent.
    pub python: Option<String>,
    /// The address the stages reach this process on; the address Ray
    /// knows this host by when absent.
    pub orchestrator_host: Option<String>,
}

impl Default for RayConfig {
    fn default() -> Self {
        RayConfig {
            address: None,
            placement_strategy: PlacementStrategy::Pack,
            placement_timeout_s: 120,
            python: None,
            orchestrator_host: None,
        }
    }
}

/// Intra-op threads of the CPU stages on one host (`runtime.cpu_threads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuThreads {
    /// Every stage's pool as wide as the machine (libtorch's default). When
    /// two or more CPU stages' pools together exceed the cores, the local
    /// backend's CPU stages take turns, one engine step at a time, so the
    /// pools never spin at each other's barriers: each step gets every
    /// core. A long step (a whole VITS utterance, a long prefill) holds the
    /// other stages that long. Measured on 2 cores before the turns, the
    /// `default` pipeline ran 1.6x the tokens/s of `split`.
    #[default]
    All,
    /// The cores divided among the stages (at least one each). Best when
    /// stages are busy at once, as with streamed edges: measured on 2 cores,
    /// `qwen2_5_omni`'s first audio came 2x sooner than with `all` before
    /// the turns (and a debug build's 10-100x), pools that spin waiting on
    /// each other being the difference; `all` with turns is not yet
    /// measured there. `OMP_NUM_THREADS`, when set, wins over both.
    Split,
}

/// One pipeline edge's streaming (`runtime.edges[]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// The upstream stage.
    pub from: usize,
    /// The downstream stage (it lists `from` in its `engine_input_source`).
    pub to: usize,
    /// New tokens per piece; -1: the whole output, once finished.
    #[serde(default = "whole_output")]
    pub window_size: i64,
}

fn whole_output() -> i64 {
    -1
}

impl EdgeConfig {
    /// Tokens per piece when the edge streams.
    pub fn window(&self) -> Option<usize> {
        usize::try_from(self.window_size).ok().filter(|&w| w > 0)
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            transport: TransportKind::Ipc,
            host: "127.0.0.1".to_string(),
            shm_threshold_bytes: Some(DEFAULT_SHM_THRESHOLD_BYTES),
            edges: Vec::new(),
            cpu_threads: CpuThreads::All,
            backend: Backend::Local,
            ray: RayConfig::default(),
        }
    }
}

/// Per-stage runtime settings (`runtime:` inside a stage).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StageRuntime {
    /// Address the stage's input socket binds, e.g. `tcp://0.0.0.0:5601`;
    /// chosen by the orchestrator when absent.
    pub address: Option<String>,
    /// Device override (`cpu`, `cuda:1`), as vLLM-Omni's `runtime.devices`;
    /// wins over `engine_args.device`.
    pub devices: Option<String>,
    /// With the `ray` backend: the resources of this stage's bundle in the
    /// placement group, e.g. `{"GPU": 1}` or a custom resource
    /// (`{"CPU": 1}` when empty). Ignored by the `local` backend.
    pub resources: BTreeMap<String, f64>,
}

/// One stage of a pipeline.
#[derive(Debug, Clone)]
pub struct StageConfig {
    /// Position of the stage in the pipeline (0, 1, ...).
    pub stage_id: usize,
    /// The role of the model in the pipeline (`thinker`, `talker`, ...);
    /// shown in traces and logs.
    pub model_stage: Option<String>,
    /// What the stage's engine loads and how it batches.
    pub engine_args: EngineArgs,
    /// Stages whose outputs are this stage's input; empty for an entry stage
    /// (it receives the user's prompt).
    pub engine_input_source: Vec<usize>,
    /// Name of the input processor that turns the sources' outputs into this
    /// stage's prompt (see [`input_processor_names`](crate::input_processor_names)).
    pub custom_process_input_func: Option<String>,
    /// Whether the orchestrator receives this stage's outputs.
    pub final_output: bool,
    /// What the final output is.
    pub final_output_type: FinalOutputType,
    /// Sampling params used when the caller gives none.
    pub default_sampling_params: SamplingParams,
    /// Address and device overrides.
    pub runtime: StageRuntime,
    /// Profiler backend of this stage (`torch`, `chrome`, `noop`); the
    /// pipeline's when absent.
    pub profiler: Option<String>,
}

impl StageConfig {
    /// A stage that runs `engine_args` on the user's prompt and returns text.
    pub fn new(stage_id: usize, engine_args: EngineArgs) -> Self {
        StageConfig {
            stage_id,
            model_stage: None,
            engine_args,
            engine_input_source: Vec::new(),
            custom_process_input_func: None,
            final_output: true,
            final_output_type: FinalOutputType::Text,
            default_sampling_params: SamplingParams::default(),
            runtime: StageRuntime::default(),
            profiler: None,
        }
    }

    /// The stage as a JSON object in the file layout (what the orchestrator
    /// hands to the worker process).
    pub fn to_json(&self) -> Result<Value> {
        let mut engine_args = engine_args_to_json(&self.engine_args);
        if let (Some(stage), Some(map)) = (&self.model_stage, engine_args.as_object_mut()) {
            map.insert("model_stage".into(), Value::String(stage.clone()));
        }
        let params = serde_json::to_value(&self.default_sampling_params)
            .map_err(|e| Error::Wire(format!("cannot serialize default_sampling_params: {e}")))?;
        let runtime = serde_json::to_value(&self.runtime)
            .map_err(|e| Error::Wire(format!("cannot serialize runtime: {e}")))?;
        let mut m = Map::new();
        m.insert("stage_id".into(), self.stage_id.into());
        m.insert("engine_args".into(), engine_args);
        m.insert(
            "engine_input_source".into(),
            self.engine_input_source.clone().into(),
        );
        if let Some(f) = &self.custom_process_input_func {
            m.insert("custom_process_input_func".into(), f.clone().into());
        }
        m.insert("final_output".into(), self.final_output.into());
        m.insert(
            "final_output_type".into(),
            self.final_output_type.as_str().into(),
        );
        m.insert("default_sampling_params".into(), params);
        m.insert("runtime".into(), runtime);
        if let Some(p) = &self.profiler {
            m.insert("profiler".into(), p.clone().into());
        }
        Ok(Value::Object(m))
    }

    /// Parses one stage object (file layout); `file` and `field` name where
    /// it came from in errors.
    pub fn from_json(file: &str, field: &str, value: &Value) -> Result<Self> {
        parse_stage(file, field, value)
    }
}

/// A whole pipeline: its stages and runtime settings.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// The pipeline's name (built-in name or file stem).
    pub name: String,
    /// Where it came from (a path or `builtin:<name>`); used in errors.
    pub source: String,
    /// The stages, `stages[i].stage_id == i`.
    pub stages: Vec<StageConfig>,
    /// Transport and shared-memory settings.
    pub runtime: RuntimeConfig,
    /// Profiler backend for every stage that does not name its own.
    pub profiler: Option<String>,
}

impl PipelineConfig {
    /// A one-stage pipeline running `engine_args` (what `OmniLLM::from_engine_args` uses).
    pub fn single_stage(engine_args: EngineArgs) -> Self {
        PipelineConfig {
            name: "single".to_string(),
            source: "engine_args".to_string(),
            stages: vec![StageConfig::new(0, engine_args)],
            runtime: RuntimeConfig::default(),
            profiler: None,
        }
    }

    /// Loads and validates a YAML (`.yaml`, `.yml`) or JSON (`.json`) file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|cause| Error::ConfigRead {
            path: path.to_path_buf(),
            cause,
        })?;
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".to_string());
        let file = path.display().to_string();
        if is_json {
            Self::from_json_str(&text, &file, &name)
        } else {
            Self::from_yaml_str(&text, &file, &name)
        }
    }

    /// Parses and validates YAML text; `file` and `name` label it.
    pub fn from_yaml_str(text: &str, file: &str, name: &str) -> Result<Self> {
        let value: Value = serde_yaml_ng::from_str(text).map_err(|e| Error::ConfigSyntax {
            file: file.to_string(),
            format: "yaml",
            reason: e.to_string(),
        })?;
        Self::from_value(&value, file, name)
    }

    /// Parses and validates JSON text; `file` and `name` label it.
    pub fn from_json_str(text: &str, file: &str, name: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::ConfigSyntax {
            file: file.to_string(),
            format: "json",
            reason: e.to_string(),
        })?;
        Self::from_value(&value, file, name)
    }

    /// Parses and validates a JSON value in the file layout.
    pub fn from_value(value: &Value, file: &str, name: &str) -> Result<Self> {
        let top = value
            .as_object()
            .ok_or_else(|| config_err(file, "(top level)", value, "expected a mapping"))?;
        let mut name = name.to_string();
        let mut runtime = RuntimeConfig::default();
        let mut profiler = None;
        let mut stages_value = None;
        for (key, v) in top {
            match key.as_str() {
                "stage_args" | "stages" => stages_value = Some((key.as_str(), v)),
                "name" => name = typed(file, "name", v)?,
                "runtime" => runtime = typed(file, "runtime", v)?,
                "profiler" => profiler = typed(file, "profiler", v)?,
                // Free text, ignored (vLLM-Omni files carry comments as keys sometimes).
                "description" => {}
                other => {
                    return Err(config_err(
                        file,
                        other,
                        v,
                        "unknown field (expected stage_args, name, runtime, profiler, description)",
                    ))
                }
            }
        }
        let (key, stages_value) = stages_value.ok_or_else(|| {
            config_err(
                file,
                "stage_args",
                &Value::Null,
                "missing: a pipeline needs a list of stages",
            )
        })?;
        let list = stages_value
            .as_array()
            .ok_or_else(|| config_err(file, key, stages_value, "expected a list of stages"))?;
        let stages = list
            .iter()
            .enumerate()
            .map(|(i, v)| parse_stage(file, &format!("{key}[{i}]"), v))
            .collect::<Result<Vec<_>>>()?;
        let config = PipelineConfig {
            name,
            source: file.to_string(),
            stages,
            runtime,
            profiler,
        };
        config.validate()?;
        Ok(config)
    }

    /// A pipeline shipped with Omni (see [`builtin_names`](Self::builtin_names)).
    pub fn builtin(name: &str) -> Result<Self> {
        let text = builtin::text(name).ok_or_else(|| Error::UnknownPipeline {
            name: name.to_string(),
            known: Self::builtin_names().join(", "),
        })?;
        Self::from_yaml_str(text, &format!("builtin:{name}"), name)
    }

    /// Names of the built-in pipelines.
    pub fn builtin_names() -> &'static [&'static str] {
        builtin::NAMES
    }

    /// A built-in name, or else a path to a YAML/JSON file.
    pub fn resolve(name_or_path: &str) -> Result<Self> {
        if builtin::text(name_or_path).is_some() {
            return Self::builtin(name_or_path);
        }
        let path = Path::new(name_or_path);
        if path.is_file() {
            return Self::load(path);
        }
        Err(Error::UnknownPipeline {
            name: name_or_path.to_string(),
            known: Self::builtin_names().join(", "),
        })
    }

    /// The stage with this id.
    pub fn stage(&self, stage_id: usize) -> Result<&StageConfig> {
        self.stages
            .get(stage_id)
            .ok_or_else(|| Error::UnknownStage {
                stage_id,
                known: self.stage_ids(),
            })
    }

    /// Every stage's `default_sampling_params`, in stage order.
    pub fn default_sampling_params(&self) -> Vec<SamplingParams> {
        self.stages
            .iter()
            .map(|s| s.default_sampling_params.clone())
            .collect()
    }

    fn validate_edges(&self, file: &str) -> Result<()> {
        let mut seen = BTreeSet::new();
        for (k, e) in self.runtime.edges.iter().enumerate() {
            let field = format!("runtime.edges[{k}]");
            let value = serde_json::to_value(e).unwrap_or(Value::Null);
            let fail = |reason: &str| Err(config_err(file, &field, &value, reason));
            let Some(to) = self.stages.get(e.to) else {
                return fail(&format!(
                    "unknown stage {} (this pipeline has stages {})",
                    e.to,
                    self.stage_ids()
                ));
            };
            if !to.engine_input_source.contains(&e.from) {
                return fail(&format!(
                    "stage {} does not take input from stage {} (its engine_input_source is {:?})",
                    e.to, e.from, to.engine_input_source
                ));
            }
            if !seen.insert((e.from, e.to)) {
                return fail("edge listed twice");
            }
            if e.window_size != -1 && e.window_size < 1 {
                return fail("window_size must be -1 (whole output) or at least 1 token");
            }
            if e.window().is_none() {
                continue;
            }
            if to.engine_input_source.len() != 1 {
                return fail("only a stage with one source can take a streamed input");
            }
            let processor = to
                .custom_process_input_func
                .as_deref()
                .unwrap_or("token_ids");
            let Some(stages) = processor::streams_into(processor) else {
                return fail(&format!(
                    "stage {}'s input processor {processor:?} takes whole outputs only \
                     (processors that stream: {})",
                    e.to,
                    processor::streaming_names().join(", ")
                ));
            };
            let model_stage = to.model_stage.as_deref().unwrap_or("-");
            if !stages.contains(&model_stage) {
                return fail(&format!(
                    "stage {} (model_stage {model_stage}) cannot take its input piece by piece \
                     through {processor:?}, which feeds {} stages only",
                    e.to,
                    stages.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// The streaming edges out of `stage_id`: `(downstream stage, tokens
    /// per piece)`.
    pub fn streamed_edges_from(&self, stage_id: usize) -> Vec<(usize, usize)> {
        self.runtime
            .edges
            .iter()
            .filter(|e| e.from == stage_id)
            .filter_map(|e| e.window().map(|w| (e.to, w)))
            .collect()
    }

    /// Stages that receive the user's prompt (no `engine_input_source`).
    pub fn entry_stages(&self) -> Vec<usize> {
        self.stages
            .iter()
            .filter(|s| s.engine_input_source.is_empty())
            .map(|s| s.stage_id)
            .collect()
    }

    /// Stages whose `engine_input_source` names `stage_id`.
    pub fn downstream_of(&self, stage_id: usize) -> Vec<usize> {
        self.stages
            .iter()
            .filter(|s| s.engine_input_source.contains(&stage_id))
            .map(|s| s.stage_id)
            .collect()
    }

    /// The profiler backend a stage runs: `OMNI_PROFILER_BACKEND`, else the
    /// stage's `profiler`, else the pipeline's, else `torch`.
    pub fn profiler_backend(&self, stage_id: usize) -> String {
        if let Ok(v) = std::env::var(PROFILER_BACKEND_ENV) {
            if !v.trim().is_empty() {
                return v.trim().to_string();
            }
        }
        self.stages
            .get(stage_id)
            .and_then(|s| s.profiler.clone())
            .or_else(|| self.profiler.clone())
            .unwrap_or_else(|| DEFAULT_PROFILER_BACKEND.to_string())
    }

    pub(crate) fn stage_ids(&self) -> String {
        let ids: Vec<String> = self.stages.iter().map(|s| s.stage_id.to_string()).collect();
        if ids.is_empty() {
            "none".to_string()
        } else {
            ids.join(", ")
        }
    }

    /// Checks the graph and the values: stage ids 0..n in order without
    /// duplicates, sources that exist, no cycles, at least one entry and one
    /// final-output stage, known input processors and profiler backends,
    /// sampling params the engine accepts, addresses that match the transport.
    pub fn validate(&self) -> Result<()> {
        let file = self.source.as_str();
        if self.stages.is_empty() {
            return Err(config_err(
                file,
                "stage_args",
                &Value::Array(vec![]),
                "a pipeline needs at least one stage",
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, s) in self.stages.iter().enumerate() {
            let field = format!("stage_args[{i}].stage_id");
            if !seen.insert(s.stage_id) {
                return Err(config_err(
                    file,
                    &field,
                    &s.stage_id.into(),
                    "duplicate stage id",
                ));
            }
        }
        for (i, s) in self.stages.iter().enumerate() {
            if s.stage_id != i {
                return Err(config_err(
                    file,
                    &format!("stage_args[{i}].stage_id"),
                    &s.stage_id.into(),
                    &format!("stage ids must be 0, 1, 2, ... in list order (expected {i})"),
                ));
            }
        }
        let n = self.stages.len();
        for (i, s) in self.stages.iter().enumerate() {
            let mut sources = BTreeSet::new();
            for (j, &src) in s.engine_input_source.iter().enumerate() {
                let field = format!("stage_args[{i}].engine_input_source[{j}]");
                if src >= n {
                    return Err(config_err(
                        file,
                        &field,
                        &src.into(),
                        &format!(
                            "unknown stage (this pipeline has stages {})",
                            self.stage_ids()
                        ),
                    ));
                }
                if src == s.stage_id {
                    return Err(config_err(
                        file,
                        &field,
                        &src.into(),
                        "a stage cannot be its own input",
                    ));
                }
                if !sources.insert(src) {
                    return Err(config_err(file, &field, &src.into(), "stage listed twice"));
                }
            }
            if let Some(name) = &s.custom_process_input_func {
                let field = format!("stage_args[{i}].custom_process_input_func");
                if s.engine_input_source.is_empty() {
                    return Err(config_err(
                        file,
                        &field,
                        &name.clone().into(),
                        "an entry stage (no engine_input_source) has no stage input to process",
                    ));
                }
                if processor::lookup(name).is_none() {
                    return Err(config_err(
                        file,
                        &field,
                        &name.clone().into(),
                        &format!(
                            "unknown input processor (known: {})",
                            processor::names().join(", ")
                        ),
                    ));
                }
            } else if s.engine_input_source.len() > 1 {
                return Err(config_err(
                    file,
                    &format!("stage_args[{i}].engine_input_source"),
                    &s.engine_input_source.clone().into(),
                    "a stage with several sources needs a custom_process_input_func to combine them",
                ));
            }
            if let Some(p) = &s.profiler {
                check_backend(file, &format!("stage_args[{i}].profiler"), p)?;
            }
            for (name, amount) in &s.runtime.resources {
                if name.trim().is_empty() || !amount.is_finite() || *amount < 0.0 {
                    return Err(config_err(
                        file,
                        &format!("stage_args[{i}].runtime.resources"),
                        &serde_json::json!({ name: amount }),
                        "a resource is a non-empty name and an amount of at least 0",
                    ));
                }
            }
            let resources = &s.runtime.resources;
            if !resources.is_empty() && resources.values().all(|&a| a == 0.0) {
                return Err(config_err(
                    file,
                    &format!("stage_args[{i}].runtime.resources"),
                    &serde_json::to_value(resources).unwrap_or(Value::Null),
                    "a bundle must ask for something (leave it empty for {\"CPU\": 1})",
                ));
            }
            if self.runtime.backend == Backend::Ray {
                if let Some(addr) = &s.runtime.address {
                    return Err(config_err(
                        file,
                        &format!("stage_args[{i}].runtime.address"),
                        &addr.clone().into(),
                        "with runtime.backend: ray each stage listens on its node's address, \
                         chosen when it is placed; remove the address",
                    ));
                }
            }
            if let Some(addr) = &s.runtime.address {
                check_address(
                    file,
                    &format!("stage_args[{i}].runtime.address"),
                    addr,
                    self.runtime.transport,
                )?;
            }
            s.default_sampling_params.validate().map_err(|e| {
                config_err(
                    file,
                    &format!("stage_args[{i}].default_sampling_params"),
                    &serde_json::to_value(&s.default_sampling_params).unwrap_or(Value::Null),
                    &e.to_string(),
                )
            })?;
        }
        if let Some(p) = &self.profiler {
            check_backend(file, "profiler", p)?;
        }
        self.validate_edges(file)?;
        if let Some(cycle) = find_cycle(&self.stages) {
            let path: Vec<String> = cycle.iter().map(|s| s.to_string()).collect();
            return Err(config_err(
                file,
                &format!("stage_args[{}].engine_input_source", cycle[0]),
                &Value::from(self.stages[cycle[0]].engine_input_source.clone()),
                &format!("the stages form a cycle: {}", path.join(" -> ")),
            ));
        }
        if self.entry_stages().is_empty() {
            return Err(config_err(
                file,
                "stage_args[*].engine_input_source",
                &Value::Null,
                "no entry stage: at least one stage must have an empty engine_input_source",
            ));
        }
        if !self.stages.iter().any(|s| s.final_output) {
            return Err(config_err(
                file,
                "stage_args[*].final_output",
                &Value::Bool(false),
                "no stage has final_output: true, so a request would return nothing",
            ));
        }
        let ray = &self.runtime.ray;
        if !(1..=86_400).contains(&ray.placement_timeout_s) {
            return Err(config_err(
                file,
                "runtime.ray.placement_timeout_s",
                &ray.placement_timeout_s.into(),
                "must be 1 to 86400 seconds",
            ));
        }
        for (field, value) in [
            ("runtime.ray.address", &ray.address),
            ("runtime.ray.python", &ray.python),
            ("runtime.ray.orchestrator_host", &ray.orchestrator_host),
        ] {
            if let Some(v) = value.as_ref().filter(|v| v.trim().is_empty()) {
                return Err(config_err(file, field, &v.clone().into(), "empty"));
            }
        }
        if self.runtime.host.trim().is_empty() {
            return Err(config_err(
                file,
                "runtime.host",
                &self.runtime.host.clone().into(),
                "empty host",
            ));
        }
        Ok(())
    }
}

/// `EngineArgs` in its file layout. Written out field by field (the engine
/// only derives `Deserialize`); the exhaustive destructuring makes a new
/// engine field a compile error here instead of a silently dropped setting.
fn engine_args_to_json(a: &EngineArgs) -> Value {
    let EngineArgs {
        model,
        dtype,
        device,
        weight_precision,
        quant_max_rows,
        max_num_seqs,
        max_num_batched_tokens,
        max_model_len,
        block_size,
        enable_prefix_caching,
        kv_cache_memory_bytes,
        kv_cache_dtype,
        seed,
        num_threads,
    } = a;
    serde_json::json!({
        "model": model,
        "dtype": dtype,
        "device": device,
        "weight_precision": weight_precision,
        "quant_max_rows": quant_max_rows,
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max_num_batched_tokens,
        "max_model_len": max_model_len,
        "block_size": block_size,
        "enable_prefix_caching": enable_prefix_caching,
        "kv_cache_memory_bytes": kv_cache_memory_bytes,
        "kv_cache_dtype": kv_cache_dtype,
        "seed": seed,
        "num_threads": num_threads,
    })
}

/// A cycle in the `engine_input_source` graph, as stage ids from a stage
/// back to itself.
fn find_cycle(stages: &[StageConfig]) -> Option<Vec<usize>> {
    // Iterative DFS with colours: 0 = new, 1 = on the stack, 2 = done.
    let n = stages.len();
    let mut colour = vec![0u8; n];
    let mut parent = vec![usize::MAX; n];
    for start in 0..n {
        if colour[start] != 0 {
            continue;
        }
        let mut stack = vec![(start, 0usize)];
        colour[start] = 1;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            let sources = &stages[node].engine_input_source;
            if *next < sources.len() {
                let src = sources[*next];
                *next += 1;
                if src >= n {
                    continue;
                }
                match colour[src] {
                    0 => {
                        colour[src] = 1;
                        parent[src] = node;
                        stack.push((src, 0));
                    }
                    1 => {
                        // Walk back from `node` to `src` to spell the cycle.
                        let mut cycle = vec![src];
                        let mut cur = node;
                        while cur != src && cur != usize::MAX {
                            cycle.push(cur);
                            cur = parent[cur];
                        }
                        cycle.push(src);
                        cycle.reverse();
                        return Some(cycle);
                    }
                    _ => {}
                }
            } else {
                colour[node] = 2;
                stack.pop();
            }
        }
    }
    None
}

fn check_backend(file: &str, field: &str, name: &str) -> Result<()> {
    if PROFILER_BACKENDS.contains(&name) {
        Ok(())
    } else {
        Err(config_err(
            file,
            field,
            &name.into(),
            &format!(
                "unknown profiler backend (known: {})",
                PROFILER_BACKENDS.join(", ")
            ),
        ))
    }
}

fn check_address(file: &str, field: &str, addr: &str, transport: TransportKind) -> Result<()> {
    let ok = match transport {
        TransportKind::Tcp => addr.starts_with("tcp://"),
        TransportKind::Ipc => addr.starts_with("ipc://") || addr.starts_with("tcp://"),
    };
    if ok {
        Ok(())
    } else {
        Err(config_err(
            file,
            field,
            &addr.into(),
            "expected tcp://HOST:PORT (or ipc://PATH with the ipc transport)",
        ))
    }
}

fn parse_stage(file: &str, field: &str, value: &Value) -> Result<StageConfig> {
    let obj = value
        .as_object()
        .ok_or_else(|| config_err(file, field, value, "expected a mapping (one stage)"))?;
    let f = |name: &str| format!("{field}.{name}");
    let stage_id_value = obj
        .get("stage_id")
        .ok_or_else(|| config_err(file, &f("stage_id"), &Value::Null, "missing"))?;
    let stage_id: usize = typed(file, &f("stage_id"), stage_id_value)?;
    let mut stage = StageConfig::new(stage_id, EngineArgs::default());
    stage.final_output = false;
    let mut final_output_type = None;
    for (key, v) in obj {
        let field = f(key);
        match key.as_str() {
            "stage_id" => {}
            "engine_args" => {
                let (model_stage, args) = parse_engine_args(file, &field, v)?;
                stage.model_stage = model_stage;
                stage.engine_args = args;
            }
            "engine_input_source" => {
                stage.engine_input_source = if v.is_null() {
                    Vec::new()
                } else {
                    typed(file, &field, v)?
                }
            }
            "custom_process_input_func" => {
                stage.custom_process_input_func = typed(file, &field, v)?
            }
            "final_output" => stage.final_output = typed(file, &field, v)?,
            "final_output_type" => final_output_type = typed(file, &field, v)?,
            "default_sampling_params" => {
                stage.default_sampling_params = typed_fieldwise(file, &field, v)?
            }
            "runtime" => stage.runtime = typed(file, &field, v)?,
            "profiler" => stage.profiler = typed(file, &field, v)?,
            other => {
                return Err(config_err(
                    file,
                    &field,
                    v,
                    &format!(
                        "unknown stage field `{other}` (expected stage_id, engine_args, \
                         engine_input_source, custom_process_input_func, final_output, \
                         final_output_type, default_sampling_params, runtime, profiler)"
                    ),
                ))
            }
        }
    }
    stage.final_output_type = final_output_type.unwrap_or(FinalOutputType::Text);
    Ok(stage)
}

/// `engine_args` minus vLLM-Omni's stage keys, into the engine's args.
fn parse_engine_args(file: &str, field: &str, v: &Value) -> Result<(Option<String>, EngineArgs)> {
    let mut map = v
        .as_object()
        .cloned()
        .ok_or_else(|| config_err(file, field, v, "expected a mapping of engine args"))?;
    let model_stage = match map.remove("model_stage") {
        Some(s) => typed(file, &format!("{field}.model_stage"), &s)?,
        None => None,
    };
    // vLLM-Omni keys that describe Python classes or GPU fractions; they have
    // no meaning for this engine, so they are accepted and ignored rather than
    // making every vLLM-Omni file fail.
    for key in [
        "model_arch",
        "worker_cls",
        "scheduler_cls",
        "engine_output_type",
        "enforce_eager",
        "trust_remote_code",
        "gpu_memory_utilization",
    ] {
        map.remove(key);
    }
    let args = typed_fieldwise(file, field, &Value::Object(map))?;
    Ok((model_stage, args))
}

/// Deserializes `v` into `T`; errors name `file`, `field` plus the path
/// inside `v`, and the bad value.
pub(crate) fn typed<T: DeserializeOwned>(file: &str, field: &str, v: &Value) -> Result<T> {
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let inner = e.path().clone();
        let mut full = field.to_string();
        let mut bad = v;
        for seg in inner.iter() {
            match seg {
                serde_path_to_error::Segment::Seq { index } => {
                    full.push_str(&format!("[{index}]"));
                    bad = bad.get(*index).unwrap_or(bad);
                }
                serde_path_to_error::Segment::Map { key } => {
                    full.push('.');
                    full.push_str(key);
                    bad = bad.get(key.as_str()).unwrap_or(bad);
                }
                _ => {}
            }
        }
        config_err(file, &full, bad, &e.into_inner().to_string())
    })
}

/// Like [`typed`] for a struct with defaults: when the whole object fails,
/// each key is tried alone, so the error names the key that is wrong even
/// when the deserializer's message does not.
fn typed_fieldwise<T: DeserializeOwned>(file: &str, field: &str, v: &Value) -> Result<T> {
    match typed::<T>(file, field, v) {
        Ok(t) => Ok(t),
        Err(whole) => {
            if let Some(map) = v.as_object() {
                for (key, value) in map {
                    let mut one = Map::new();
                    one.insert(key.clone(), value.clone());
                    if let Err(e) = typed::<T>(file, field, &Value::Object(one)) {
                        return Err(match e {
                            Error::Config { reason, .. } => {
                                config_err(file, &format!("{field}.{key}"), value, &reason)
                            }
                            other => other,
                        });
                    }
                }
            }
            Err(whole)
        }
    }
}

pub(crate) fn config_err(file: &str, field: &str, value: &Value, reason: &str) -> Error {
    let mut rendered = value.to_string();
    if rendered.len() > 120 {
        let mut cut = 117;
        while !rendered.is_char_boundary(cut) {
            cut -= 1;
        }
        rendered.truncate(cut);
        rendered.push_str("...");
    }
    Error::Config {
        file: file.to_string(),
        field: field.to_string(),
        value: rendered,
        reason: reason.to_string(),
    }
}
