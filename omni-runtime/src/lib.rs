//! # omni-runtime
//!
//! One OS process per stage: the `omni-stage` worker binary, ZeroMQ sockets
//! and the versioned wire protocol, the readiness handshake, supervision
//! (crash detection, shutdown, no orphans), the stage graph and the input
//! processors between stages, and the control messages (generate, abort,
//! start/stop profile, shutdown, health).
//!
//! It must not know about HTTP or the public facade (`omni-core`).
//!
//! ```no_run
//! # async fn demo() -> omni_runtime::Result<()> {
//! use omni_runtime::{Orchestrator, OrchestratorOptions, PipelineConfig, StageEvent};
//! let config = PipelineConfig::builtin("default")?;
//! let params = config.default_sampling_params();
//! let orch = Orchestrator::start(config, OrchestratorOptions::default()).await?;
//! let prompt = omni_engine::Prompt::Text("What is the capital of France?".into());
//! let mut events = orch.submit("req-0".into(), prompt, params).await?;
//! while let Some(ev) = events.recv().await {
//!     match ev {
//!         StageEvent::Output { stage_id, output } if output.finished => {
//!             println!("stage {stage_id}: {}", output.text)
//!         }
//!         StageEvent::Error(e) => return Err(e),
//!         _ => {}
//!     }
//! }
//! orch.shutdown().await
//! # }
//! ```
#![warn(missing_docs)]

mod builtin;
mod config;
mod cpu_turn;
mod error;
mod launch;
mod locate;
mod orchestrator;
mod processor;
mod ray;
mod run_dir;
pub mod shm;
mod supervisor;
mod tensor;
mod transport;
pub mod wire;
mod worker;

pub use config::{
    Backend, CpuThreads, FinalOutputType, PipelineConfig, PlacementStrategy, RayConfig,
    RuntimeConfig, StageConfig, StageRuntime, TransportKind, DEFAULT_PROFILER_BACKEND,
    DEFAULT_SHM_THRESHOLD_BYTES, PROFILER_BACKENDS, PROFILER_BACKEND_ENV,
};
pub use error::{Error, Result};
pub use launch::LaunchSpec;
pub use locate::{locate_stage_binary, STAGE_BINARY_ENV, STAGE_BINARY_NAME};
pub use orchestrator::{Orchestrator, OrchestratorOptions, StageEvent, StageInfo, StageOutput};
pub use processor::{
    lookup as input_processor, names as input_processor_names, speakable, InputProcessor,
    ProcessorInput, SourceOutput, StageInput, THINKER_POSITIONS, THINKER_STATES,
};
pub use ray::RAY_PYTHON_ENV;
pub use tensor::{byte_len, DType, HostTensor};
pub use wire::{HealthMsg, StageMetrics, PROTOCOL_VERSION};
pub use worker::{init_worker_tracing, run_stage_worker, stage_main};
