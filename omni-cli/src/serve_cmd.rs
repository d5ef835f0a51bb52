//! `omni serve`: start a pipeline and serve it over OpenAI's HTTP API.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use omni_core::{AsyncOmni, OmniEngineArgs};

use crate::{progress, serve};

/// Serve a pipeline over OpenAI's HTTP API (completions, chat, SSE
/// streaming), with /health, /metrics and, when VLLM_TORCH_PROFILER_DIR is
/// set, POST /start_profile and /stop_profile (body: {"stages": [0, 1]}).
///
/// SIGTERM or Ctrl-C stops accepting requests, lets those in flight finish
/// (up to --drain-timeout), then stops every stage process.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  omni serve --pipeline default --port 8000
  curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
      -d '{\"model\":\"default\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":16}'
  VLLM_TORCH_PROFILER_DIR=/tmp/traces omni serve --pipeline default &
  curl -X POST localhost:8000/start_profile -d '{\"stages\":[0]}'")]
pub struct ServeArgs {
    /// A built-in pipeline (see `omni pipelines`) or a pipeline file.
    #[arg(long, default_value = omni_core::DEFAULT_PIPELINE)]
    pub pipeline: String,
    /// Run every stage on this model instead of the pipeline's own (e.g. a
    /// Qwen2.5-Omni folder for `--pipeline qwen2_5_omni`).
    #[arg(long, value_name = "PATH")]
    pub model_path: Option<String>,
    /// Where the stages run: `local` (child processes of this one) or `ray`
    /// (the nodes of the Ray cluster at `RAY_ADDRESS`); the pipeline's own
    /// `runtime.backend` when absent.
    #[arg(long, value_enum)]
    pub backend: Option<crate::BackendArg>,
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name clients use; defaults to the pipeline's name.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Seconds to let requests in flight finish after SIGTERM.
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout: f64,
    /// Where sampling fields a request leaves out come from: `pipeline`
    /// (each stage's default_sampling_params in the pipeline file) or
    /// `vllm` (vLLM's defaults: temperature 1, no truncation, max_tokens 16
    /// for completions and the rest of the context for chat).
    #[arg(long, value_enum, default_value_t = serve::GenerationConfig::Pipeline)]
    pub generation_config: serve::GenerationConfig,
    /// Require `Authorization: Bearer <KEY>` on /v1/* and the profile
    /// endpoints (/health and /metrics stay open), as vLLM's --api-key.
    #[arg(long, env = "OMNI_API_KEY", value_name = "KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests in flight at most (a request with n samples or several
    /// prompts counts each); past it the server answers 429 with
    /// Retry-After instead of queueing without bound.
    #[arg(long, default_value_t = 256)]
    pub max_pending_requests: usize,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("omni-serve")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(serve_async(args))
}

async fn serve_async(args: ServeArgs) -> anyhow::Result<()> {
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs as _;
            (args.host.as_str(), args.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|()| crate::BadInput(format!("--host {:?} is not an address", args.host)))?;
    if !(args.drain_timeout.is_finite() && args.drain_timeout >= 0.0) {
        return Err(crate::BadInput(format!(
            "--drain-timeout {} must be a non-negative number of seconds",
            args.drain_timeout
        ))
        .into());
    }
    // Bind first: a busy port should fail before models load for seconds.
    let listener = serve::bind(addr).with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    let bar = progress::spinner(format!(
        "starting pipeline {:?}: spawning stages, loading models",
        args.pipeline
    ));
    if args.max_pending_requests == 0 {
        return Err(crate::BadInput("--max-pending-requests must be at least 1".into()).into());
    }
    let omni = AsyncOmni::from_engine_args(OmniEngineArgs {
        model_path: args.model_path.clone(),
        backend: args.backend.map(Into::into),
        max_pending_requests: Some(args.max_pending_requests),
        ..OmniEngineArgs::new(&args.pipeline)
    })
    .await;
    bar.finish_and_clear();
    let omni = omni.context("cannot start the pipeline")?;
    let served = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| args.pipeline.clone());
    let state = Arc::new(
        serve::AppState::new(omni, &served, args.generation_config)
            .with_api_key(args.api_key.clone()),
    );
    tracing::info!(
        model = %served,
        profiling = state.profiling_enabled,
        "serving on http://{local}"
    );
    // Tests and scripts wait for this line (the port may have been 0).
    println!("omni serve: listening on http://{local}");
    serve::serve(
        listener,
        state,
        serve::shutdown_signal(),
        Duration::from_secs_f64(args.drain_timeout),
    )
    .await
}
