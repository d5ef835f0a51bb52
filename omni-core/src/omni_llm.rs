//! `OmniLLM`: the pipeline for blocking (offline) code.
//!
//! A thin blocking shell around [`AsyncOmni`] with a tokio runtime of its
//! own: `generate` submits every prompt at once (the stages batch them) and
//! returns when all final outputs are in. Do not call it from inside an
//! async runtime; use `AsyncOmni` there.
//!
//! ```no_run
//! # fn run() -> omni_core::Result<()> {
//! use omni_core::{OmniEngineArgs, OmniLLM, SamplingParams};
//!
//! let omni_llm = OmniLLM::from_engine_args(OmniEngineArgs::new("default"))?;
//! omni_llm.start_profile(None)?;
//! let params = SamplingParams { max_tokens: Some(32), ..SamplingParams::greedy() };
//! let outputs = omni_llm.generate(["What is Rust?", "Name a colour."], params)?;
//! let traces = omni_llm.stop_profile()?;
//! for out in &outputs {
//!     println!("[{} stage {}] {}", out.request_id, out.stage_id, out.text);
//! }
//! # Ok(()) }
//! ```
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use omni_engine::Prompt;
use omni_runtime::{PipelineConfig, StageInfo};

use crate::{AsyncOmni, Error, OmniEngineArgs, OmniRequestOutput, Result, StageSamplingParams};

/// A running pipeline, driven from blocking code.
pub struct OmniLLM {
    /// `None` only after shutdown.
    omni: Option<AsyncOmni>,
    next_request: AtomicU64,
    /// Declared last so it drops after `omni`: stage clean-up needs it.
    runtime: tokio::runtime::Runtime,
}

impl OmniLLM {
    /// Starts the pipeline that `args` names and waits until every stage is
    /// ready.
    pub fn from_engine_args(args: OmniEngineArgs) -> Result<Self> {
        let runtime = build_runtime()?;
        let omni = runtime.block_on(AsyncOmni::from_engine_args(args))?;
        Ok(Self::with(runtime, omni))
    }

    /// Starts a built-in pipeline (`default`, `smollm2`, ...) or a pipeline
    /// file.
    pub fn from_pipeline(name_or_path: &str) -> Result<Self> {
        Self::from_engine_args(OmniEngineArgs::new(name_or_path))
    }

    /// Starts a pipeline from a config built in code.
    pub fn from_config(config: PipelineConfig, args: &OmniEngineArgs) -> Result<Self> {
        let runtime = build_runtime()?;
        let omni = runtime.block_on(AsyncOmni::from_config(config, args))?;
        Ok(Self::with(runtime, omni))
    }

    fn with(runtime: tokio::runtime::Runtime, omni: AsyncOmni) -> Self {
        Self {
            omni: Some(omni),
            next_request: AtomicU64::new(0),
            runtime,
        }
    }

    fn omni(&self) -> &AsyncOmni {
        // Only `shutdown(self)` and `drop` take it out, and both consume self.
        self.omni.as_ref().expect("OmniLLM used after shutdown")
    }

    /// The stages, in stage order.
    pub fn stages(&self) -> &[StageInfo] {
        self.omni().stages()
    }

    /// Each stage's model name, in stage order.
    pub fn model_names(&self) -> Vec<String> {
        self.omni().model_names()
    }

    /// Each stage's default sampling params, in stage order.
    pub fn default_sampling_params(&self) -> &[omni_engine::SamplingParams] {
        self.omni().default_sampling_params()
    }

    /// Ids of the stages whose outputs `generate` returns.
    pub fn final_stage_ids(&self) -> &[usize] {
        self.omni().final_stage_ids()
    }

    /// Runs every prompt through the pipeline and returns the final output
    /// of every final stage: ordered by prompt, then by stage id. All prompts
    /// are in flight at once, so the stages batch them. `sampling_params` is
    /// one `SamplingParams` for all stages, a list with one per stage, or
    /// `StageSamplingParams::Defaults`.
    pub fn generate<P: Into<Prompt>>(
        &self,
        prompts: impl IntoIterator<Item = P>,
        sampling_params: impl Into<StageSamplingParams>,
    ) -> Result<Vec<OmniRequestOutput>> {
        let prompts: Vec<Prompt> = prompts.into_iter().map(Into::into).collect();
        if prompts.is_empty() {
            return Err(Error::EmptyPrompts);
        }
        if let Some(index) = prompts.iter().position(crate::convert::prompt_is_empty) {
            return Err(Error::EmptyPrompt { index });
        }
        let params: StageSamplingParams = sampling_params.into();
        // Resolve once, so a wrong count fails before anything is sent.
        let per_stage = params.resolve(self.omni().default_sampling_params())?;
        let omni = self.omni();
        let first_id = self
            .next_request
            .fetch_add(prompts.len() as u64, Ordering::Relaxed);
        self.runtime.block_on(async {
            let mut streams = Vec::with_capacity(prompts.len());
            for (i, prompt) in prompts.into_iter().enumerate() {
                let id = (first_id + i as u64).to_string();
                streams.push(
                    omni.generate(prompt, StageSamplingParams::PerStage(per_stage.clone()), id)
                        .await?,
                );
            }
            // Drive all streams together; an error in one drops the rest,
            // which aborts them in every stage.
            let per_prompt =
                futures::future::try_join_all(streams.into_iter().map(collect_final)).await?;
            Ok(per_prompt.into_iter().flatten().collect())
        })
    }

    /// Starts profiling the given stages (all when `None`), e.g.
    /// `start_profile(Some(&[1]))` for stage 1 only.
    pub fn start_profile(&self, stages: Option<&[usize]>) -> Result<()> {
        self.runtime.block_on(self.omni().start_profile(stages))
    }

    /// Stops profiling; returns the trace files written, per stage.
    pub fn stop_profile(&self) -> Result<BTreeMap<usize, Vec<PathBuf>>> {
        self.runtime.block_on(self.omni().stop_profile())
    }

    /// Stops every stage process and waits for them to exit (dropping
    /// `OmniLLM` does the same, ignoring errors).
    pub fn shutdown(mut self) -> Result<()> {
        match self.omni.take() {
            Some(omni) => self.runtime.block_on(omni.shutdown()),
            None => Ok(()),
        }
    }
}

impl Drop for OmniLLM {
    fn drop(&mut self) {
        if let Some(omni) = self.omni.take() {
            if let Err(e) = self.runtime.block_on(omni.shutdown()) {
                tracing::warn!(error = %e, "pipeline shutdown failed");
            }
        }
    }
}

/// The finished output of each final stage of one request, by stage id.
async fn collect_final(mut stream: crate::OmniStream) -> Result<Vec<OmniRequestOutput>> {
    let mut finals: Vec<OmniRequestOutput> = Vec::new();
    while let Some(out) = stream.next().await {
        let out = out?;
        if out.finished {
            finals.push(out);
        }
    }
    finals.sort_by_key(|o| o.stage_id);
    Ok(finals)
}

fn build_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("omni-llm")
        .enable_all()
        .build()
        .map_err(Error::TokioRuntime)
}
