//! `AsyncOmni`: the pipeline on tokio, for servers and other async callers.
//!
//! Every request streams the outputs of each final-output stage as they are
//! produced; many requests run at once and share the stages' running
//! batches (each stage's engine batches whatever is in flight). Profiling
//! can be switched on and off while requests stream, as in vLLM-Omni's
//! `await async_omni.start_profile()`.
//!
//! ```no_run
//! # async fn run() -> omni_core::Result<()> {
//! use futures::StreamExt;
//! use omni_core::{AsyncOmni, OmniEngineArgs, Prompt, SamplingParams};
//!
//! let omni = AsyncOmni::from_engine_args(OmniEngineArgs::new("default")).await?;
//! let params = SamplingParams { max_tokens: Some(16), ..SamplingParams::greedy() };
//! let mut stream = omni.generate(Prompt::Text("Hi".into()), params, "req-0").await?;
//! while let Some(output) = stream.next().await {
//!     let output = output?;
//!     print!("{}", output.delta_text);
//! }
//! omni.shutdown().await?;
//! # Ok(()) }
//! ```
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use omni_engine::{Prompt, SamplingParams};
use omni_runtime::{HealthMsg as StageHealth, Orchestrator, PipelineConfig, StageEvent, StageInfo};
use tokio::sync::mpsc;

use crate::convert;
use crate::{
    Audio, Error, OmniEngineArgs, OmniMetrics, OmniRequestOutput, Result, StageMetrics,
    StageSamplingParams,
};

/// A running pipeline, driven from async code.
///
/// Dropping it (or calling [`AsyncOmni::shutdown`]) stops every stage
/// process.
pub struct AsyncOmni {
    inner: Arc<Inner>,
}

/// What the pipeline and every stream of it share.
struct Inner {
    orchestrator: Orchestrator,
    stages: Vec<StageInfo>,
    /// Each stage's `default_sampling_params`, in stage order.
    defaults: Vec<SamplingParams>,
    /// Each stage's context length, when known, in stage order.
    max_model_lens: Vec<Option<usize>>,
    /// Ids of stages with `final_output: true`, ascending.
    final_stages: Vec<usize>,
    /// Request ids whose stream is alive and unfinished.
    running: Mutex<HashSet<String>>,
    /// `OmniEngineArgs::max_pending_requests`.
    max_pending: Option<usize>,
    /// Running request ids that [`AsyncOmni::abort`] was called for: their
    /// streams end quietly instead of reporting an incomplete request.
    aborted: Mutex<HashSet<String>>,
    /// Where a dropped stream spawns the abort of its request (a stream may
    /// be dropped outside any runtime context, e.g. by `OmniLLM`).
    handle: tokio::runtime::Handle,
    name: String,
}

impl Inner {
    fn running(&self) -> MutexGuard<'_, HashSet<String>> {
        // A poisoned set is still a correct set: the panicking thread only
        // inserted or removed one id.
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn aborted(&self) -> MutexGuard<'_, HashSet<String>> {
        self.aborted.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_stages(&self, stages: &[usize]) -> Result<()> {
        let num_stages = self.stages.len();
        match stages.iter().find(|&&s| s >= num_stages) {
            Some(&stage_id) => Err(Error::UnknownStage {
                stage_id,
                num_stages,
            }),
            None => Ok(()),
        }
    }
}

impl AsyncOmni {
    /// Starts the pipeline that `args` names: spawns every stage process and
    /// waits until each has loaded its model.
    pub async fn from_engine_args(args: OmniEngineArgs) -> Result<Self> {
        let name = args.pipeline_name();
        let mut config = match &args.stage_configs_path {
            Some(path) => PipelineConfig::load(path),
            None => PipelineConfig::resolve(&args.model),
        }
        .map_err(|cause| Error::Pipeline {
            pipeline: name.clone(),
            cause,
        })?;
        if let Some(model) = &args.model_path {
            for stage in &mut config.stages {
                stage.engine_args.model = model.clone();
            }
        }
        if let Some(backend) = args.backend {
            config.runtime.backend = backend;
        }
        Self::from_config(config, &args).await
    }

    /// Starts a built-in pipeline (`default`, `smollm2`, ...) or a pipeline
    /// file.
    pub async fn from_pipeline(name_or_path: &str) -> Result<Self> {
        Self::from_engine_args(OmniEngineArgs::new(name_or_path)).await
    }

    /// Starts a pipeline from a config built in code; `args` supplies the
    /// options (timeouts, worker binary), its `model` is only a name.
    pub async fn from_config(config: PipelineConfig, args: &OmniEngineArgs) -> Result<Self> {
        let name = args.pipeline_name();
        let defaults = convert::default_sampling_params(&config);
        let options = convert::orchestrator_options(args);
        let orchestrator = Orchestrator::start(config, options).await?;
        let stages = orchestrator.stages().to_vec();
        let max_model_lens = convert::max_model_lens(&stages);
        let final_stages = stages
            .iter()
            .filter(|s| s.final_output)
            .map(|s| s.stage_id)
            .collect();
        tracing::info!(pipeline = %name, stages = stages.len(), "pipeline ready");
        Ok(Self {
            inner: Arc::new(Inner {
                orchestrator,
                stages,
                defaults,
                max_model_lens,
                final_stages,
                running: Mutex::default(),
                max_pending: args.max_pending_requests,
                aborted: Mutex::default(),
                handle: tokio::runtime::Handle::current(),
                name,
            }),
        })
    }

    /// The pipeline's name (a built-in name or the file it came from).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The stages, in stage order: model, final output type, process id.
    pub fn stages(&self) -> &[StageInfo] {
        &self.inner.stages
    }

    /// Ids of the stages whose outputs the caller receives.
    pub fn final_stage_ids(&self) -> &[usize] {
        &self.inner.final_stages
    }

    /// Each stage's default sampling params, in stage order.
    pub fn default_sampling_params(&self) -> &[SamplingParams] {
        &self.inner.defaults
    }

    /// Each stage's model name, in stage order.
    pub fn model_names(&self) -> Vec<String> {
        self.inner
            .stages
            .iter()
            .map(|s| s.model_name.clone())
            .collect()
    }

    /// Each stage's context length, when known, in stage order.
    pub fn max_model_lens(&self) -> Vec<Option<usize>> {
        self.inner.max_model_lens.clone()
    }

    /// `(stage_id, final_output_type)` of every final stage, by stage id.
    pub fn final_outputs(&self) -> Vec<(usize, String)> {
        self.inner
            .stages
            .iter()
            .filter(|s| s.final_output)
            .map(|s| (s.stage_id, s.final_output_type.to_string()))
            .collect()
    }

    /// Whether the pipeline can take requests; else why not (a stage that
    /// died, naming it and how; or shutdown). Answered from this process's
    /// state, without asking the stages.
    pub fn check_serving(&self) -> Result<()> {
        Ok(self.inner.orchestrator.check_serving()?)
    }

    /// `OmniEngineArgs::max_pending_requests`: the most requests in
    /// flight at once, when bounded.
    pub fn max_pending_requests(&self) -> Option<usize> {
        self.inner.max_pending
    }

    /// Number of requests streaming now.
    pub fn num_running(&self) -> usize {
        self.inner.running().len()
    }

    /// Submits one request and returns the stream of its outputs: every
    /// final stage's outputs as they come, each stage's last one with
    /// `finished: true`. The stream ends after the last final stage
    /// finished. Dropping the stream early aborts the request in every
    /// stage.
    pub async fn generate(
        &self,
        prompt: impl Into<Prompt>,
        sampling_params: impl Into<StageSamplingParams>,
        request_id: impl Into<String>,
    ) -> Result<OmniStream> {
        let request_id = request_id.into();
        let prompt = prompt.into();
        if request_id.is_empty() {
            return Err(Error::EmptyRequestId);
        }
        if convert::prompt_is_empty(&prompt) {
            return Err(Error::EmptyPrompt { index: 0 });
        }
        let sampling_params: StageSamplingParams = sampling_params.into();
        let params = sampling_params.resolve(&self.inner.defaults)?;
        {
            let mut running = self.inner.running();
            if running.contains(&request_id) {
                return Err(Error::DuplicateRequestId(request_id));
            }
            if let Some(limit) = self.inner.max_pending.filter(|&l| running.len() >= l) {
                return Err(Error::Overloaded {
                    running: running.len(),
                    limit,
                });
            }
            running.insert(request_id.clone());
        }
        // From here the stream owns the id: dropping it releases the id.
        let start = Instant::now();
        let mut stream = OmniStream {
            inner: Arc::clone(&self.inner),
            request_id: request_id.clone(),
            rx: None,
            start,
            first_output: None,
            pending: self.inner.final_stages.clone(),
            stage_metrics: Vec::new(),
            audio: Vec::new(),
            first_audio: None,
            done: false,
        };
        match self
            .inner
            .orchestrator
            .submit(request_id, prompt, params)
            .await
        {
            Ok(rx) => stream.rx = Some(rx),
            Err(e) => {
                // Nothing reached the stages: release the id, abort nothing.
                stream.finish();
                return Err(e.into());
            }
        }
        Ok(stream)
    }

    /// Aborts a request in every stage. Returns whether it was running; its
    /// stream ends without an error.
    pub async fn abort(&self, request_id: &str) -> Result<bool> {
        if !self.inner.running().contains(request_id) {
            return Ok(false);
        }
        self.inner.aborted().insert(request_id.to_string());
        self.inner.orchestrator.abort(request_id).await?;
        Ok(true)
    }

    /// Starts profiling the given stages (all when `None`) and returns once
    /// every one of them records. Needs `VLLM_TORCH_PROFILER_DIR`; unknown
    /// stage ids are an error before any stage is touched. Requests keep
    /// streaming meanwhile. If one stage fails to start, those that started
    /// record until [`stop_profile`](Self::stop_profile) (the error names
    /// them).
    pub async fn start_profile(&self, stages: Option<&[usize]>) -> Result<()> {
        if let Some(stages) = stages {
            self.inner.check_stages(stages)?;
        }
        self.inner.orchestrator.start_profile(stages).await?;
        Ok(())
    }

    /// Asks one stage whether it is alive and how many requests it holds
    /// (`running_requests`).
    pub async fn stage_health(&self, stage_id: usize) -> Result<StageHealth> {
        self.inner.check_stages(&[stage_id])?;
        Ok(self.inner.orchestrator.health(stage_id).await?)
    }

    /// Stops profiling and returns, per stage, the trace files written (all
    /// complete on disk). Without an active profile: an empty map.
    pub async fn stop_profile(&self) -> Result<BTreeMap<usize, Vec<PathBuf>>> {
        Ok(self.inner.orchestrator.stop_profile().await?)
    }

    /// Stops every stage process and waits for them to exit. Streams still
    /// alive keep the pipeline up until they are dropped; the stages then
    /// stop as the last of them goes.
    pub async fn shutdown(self) -> Result<()> {
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => Ok(inner.orchestrator.shutdown().await?),
            Err(_) => Ok(()),
        }
    }
}

/// The outputs of one request, as they are produced. See
/// [`AsyncOmni::generate`].
#[must_use = "a stream does nothing unless polled; dropping it aborts the request"]
pub struct OmniStream {
    inner: Arc<Inner>,
    request_id: String,
    /// `None` only while the request is being submitted.
    rx: Option<mpsc::Receiver<StageEvent>>,
    start: Instant,
    first_output: Option<Duration>,
    first_audio: Option<Duration>,
    /// Final stages that have not finished yet.
    pending: Vec<usize>,
    /// Metrics of every stage that reported, in stage order.
    stage_metrics: Vec<StageMetrics>,
    /// Per audio stage, the pieces so far (the whole goes out at its end).
    audio: Vec<(usize, Audio)>,
    done: bool,
}

impl OmniStream {
    /// The request's id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    fn finish(&mut self) {
        self.done = true;
        self.inner.running().remove(&self.request_id);
        self.inner.aborted().remove(&self.request_id);
    }

    /// Adds `out`'s piece of audio to its stage's, and on the stage's last
    /// output hands over the whole (the one piece as it is, when there was
    /// only one).
    fn gather_audio(&mut self, out: &mut OmniRequestOutput) {
        let Some(piece) = &out.delta_audio else {
            return;
        };
        let at = self.audio.iter().position(|(s, _)| *s == out.stage_id);
        if !out.finished {
            match at {
                Some(i) => self.audio[i].1.samples.extend_from_slice(&piece.samples),
                None => self.audio.push((out.stage_id, piece.clone())),
            }
            return;
        }
        out.audio = Some(match at {
            Some(i) => {
                let (_, mut whole) = self.audio.swap_remove(i);
                whole.samples.extend_from_slice(&piece.samples);
                whole
            }
            None => piece.clone(),
        });
    }

    fn on_event(&mut self, event: StageEvent) -> Option<Result<OmniRequestOutput>> {
        match event {
            StageEvent::Error(e) => {
                self.finish();
                Some(Err(e.into()))
            }
            event => {
                let (stage_id, output) = convert::stage_output(event)?;
                let now = self.start.elapsed();
                let first = *self.first_output.get_or_insert(now);
                if self.first_audio.is_none() && convert::has_audio(&output) {
                    self.first_audio = Some(now);
                }
                match self
                    .stage_metrics
                    .binary_search_by_key(&stage_id, |m| m.stage_id)
                {
                    Ok(i) => {
                        let m =
                            convert::stage_metrics(stage_id, &output, Some(&self.stage_metrics[i]));
                        self.stage_metrics[i] = m;
                    }
                    Err(i) => {
                        let m = convert::stage_metrics(stage_id, &output, None);
                        self.stage_metrics.insert(i, m);
                    }
                }
                let mut out = convert::request_output(
                    &self.request_id,
                    stage_id,
                    output,
                    OmniMetrics {
                        e2e_latency: now,
                        time_to_first_output: Some(first),
                        time_to_first_audio: self.first_audio,
                        stages: self.stage_metrics.clone(),
                    },
                );
                self.gather_audio(&mut out);
                if out.finished {
                    self.pending.retain(|&s| s != stage_id);
                    if self.pending.is_empty() {
                        self.finish();
                    }
                }
                Some(Ok(out))
            }
        }
    }
}

impl Stream for OmniStream {
    type Item = Result<OmniRequestOutput>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let Some(rx) = this.rx.as_mut() else {
                return Poll::Ready(None);
            };
            match rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(event)) => {
                    if let Some(item) = this.on_event(event) {
                        return Poll::Ready(Some(item));
                    }
                }
                Poll::Ready(None) => {
                    let aborted = this.inner.aborted().contains(&this.request_id);
                    let missing = this.pending.first().copied();
                    this.finish();
                    return match missing {
                        Some(stage_id) if !aborted => Poll::Ready(Some(Err(Error::Incomplete {
                            request_id: this.request_id.clone(),
                            stage_id,
                        }))),
                        _ => Poll::Ready(None),
                    };
                }
            }
        }
    }
}

impl Drop for OmniStream {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // The caller lost interest (e.g. an HTTP client disconnected): free
        // the stages' batch slots now rather than letting them run on.
        // The orchestrator lets go of the id now, before this returns, and
        // aborts this submission by its own wire id: a new request that
        // reuses the id at once is not touched.
        let abort = self.inner.orchestrator.release(&self.request_id);
        self.finish();
        let request_id = std::mem::take(&mut self.request_id);
        tracing::debug!(request_id = %request_id, "stream dropped before the end: aborting");
        self.inner.handle.spawn(async move {
            if let Err(e) = abort.await {
                tracing::warn!(request_id = %request_id, error = %e, "abort after drop failed");
            }
        });
    }
}
