//! `omni serve`: OpenAI-compatible HTTP over an [`AsyncOmni`] pipeline.
//!
//! Routes: `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions` (SSE with `stream: true`), `GET /health`,
//! `GET /metrics`, `POST /start_profile`, `POST /stop_profile`. Every error
//! answers in OpenAI's error shape; the statuses are chosen in
//! [`api_error`]. SIGTERM or Ctrl-C stops accepting connections, lets the
//! requests in flight finish (up to a drain timeout), then shuts the stage
//! processes down.
mod api_error;
mod handlers;
mod metrics;
mod openai;
mod sse;
mod validate;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use omni_core::AsyncOmni;

pub use api_error::ApiError;
pub use validate::PipelineView;

/// Where the sampling fields a request leaves out come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GenerationConfig {
    /// Each stage's `default_sampling_params` from the pipeline file
    /// (Omni's default: a pipeline is written for its models).
    Pipeline,
    /// vLLM's `--generation-config vllm`: temperature 1, no truncation or
    /// penalties, `max_tokens` 16 for completions and the rest of the
    /// context for chat, for the stage that reads the prompt; later stages
    /// (a talker) keep their pipeline's.
    Vllm,
}

/// What every handler shares.
pub struct AppState {
    /// The pipeline.
    pub omni: AsyncOmni,
    /// What requests are checked against.
    pub view: PipelineView,
    /// Counters and histograms for `/metrics`.
    pub metrics: metrics::Metrics,
    /// Whether `VLLM_TORCH_PROFILER_DIR` was set at start.
    pub profiling_enabled: bool,
    /// Set once shutdown began: new requests get 503.
    pub draining: AtomicBool,
    next_id: AtomicU64,
    /// Start time (UNIX seconds), also a per-run salt for request ids.
    pub created: u64,
    /// What `/v1/models` reports as `root` (the first stage's model).
    pub root: String,
    /// When set, `/v1/*` and the profile endpoints need
    /// `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

impl AppState {
    /// State for a started pipeline. `served_name` is the name clients put
    /// in `model` (the stage models' names are accepted too).
    pub fn new(omni: AsyncOmni, served_name: &str, generation: GenerationConfig) -> Self {
        let mut served_names = vec![served_name.to_string()];
        for m in omni.model_names() {
            if !served_names.contains(&m) {
                served_names.push(m);
            }
        }
        let mut defaults = omni.default_sampling_params().to_vec();
        if generation == GenerationConfig::Vllm {
            // The stage that reads the prompt is the model a vLLM user
            // addresses; later stages (a talker) keep what their pipeline
            // says.
            let vllm = omni_core::SamplingParams::default();
            if let Some(d) = defaults.get_mut(validate::ENTRY_STAGE) {
                d.temperature = vllm.temperature;
                d.top_p = vllm.top_p;
                d.top_k = vllm.top_k;
                d.min_p = vllm.min_p;
                d.repetition_penalty = vllm.repetition_penalty;
                d.presence_penalty = vllm.presence_penalty;
                d.frequency_penalty = vllm.frequency_penalty;
                d.max_tokens = None;
            }
        }
        let view = PipelineView {
            served_names,
            defaults,
            completion_max_tokens: (generation == GenerationConfig::Vllm).then_some(16),
            max_model_len: omni.max_model_lens(),
            finals: omni.final_outputs(),
        };
        let root = omni.model_names().into_iter().next().unwrap_or_default();
        Self {
            omni,
            view,
            metrics: metrics::Metrics::default(),
            profiling_enabled: std::env::var_os("VLLM_TORCH_PROFILER_DIR")
                .is_some_and(|d| !d.is_empty()),
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            created: handlers::unix_now(),
            root,
            api_key: None,
        }
    }

    /// Guards `/v1/*` and the profile endpoints with `key` (vLLM's
    /// `--api-key`); `/health` and `/metrics` stay open.
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        if key.as_deref() == Some("") {
            tracing::warn!("the API key is empty: /v1/* is open to anyone who reaches the port");
        }
        self.api_key = key.filter(|k| !k.is_empty());
        self
    }
}

/// Compares in time that depends on the lengths only, not on where the
/// bytes differ: a guess cannot be refined from response times.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let diff = a
        .iter()
        .zip(b)
        .fold(a.len() ^ b.len(), |acc, (x, y)| acc | usize::from(x ^ y));
    diff == 0
}

/// Refuses a guarded route without the API key.
async fn require_api_key(
    axum::extract::State(st): axum::extract::State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let Some(key) = st.api_key.as_deref() else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    let guarded = path.starts_with("/v1/") || path == "/start_profile" || path == "/stop_profile";
    if !guarded {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 7235).
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
        .unwrap_or_default();
    if same_secret(given.trim().as_bytes(), key.as_bytes()) {
        next.run(request).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

/// The largest request body taken: room for a 300 s clip of 16-bit 16 kHz
/// audio in base64 (12.8 MB; Qwen2.5-Omni's longest) with its JSON around
/// it. Larger bodies are answered 413 before they are read.
pub const MAX_REQUEST_BYTES: usize = 32 << 20;

/// The routes, for a server or for `tower::ServiceExt::oneshot` in tests.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .route("/v1/models", get(handlers::models))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/start_profile", post(handlers::start_profile))
        .route("/stop_profile", post(handlers::stop_profile))
        .fallback(handlers::not_found)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            require_api_key,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(state)
}

/// Connections the kernel queues for the server before it accepts them
/// (clamped by `net.core.somaxconn`). tokio's default, 1024, was too few
/// for 1024 clients connecting at once: found by `omni bench load`, the
/// connections past the queue were reset.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds the server's listening socket (address reuse on, as tokio's
/// `TcpListener::bind`, with [`LISTEN_BACKLOG`]).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves until `shutdown` resolves, drains for at most `drain_timeout`,
/// then stops the pipeline.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain_timeout: Duration,
) -> anyhow::Result<()> {
    use anyhow::Context as _;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(Arc::clone(&state));
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await
    });
    shutdown.await;
    tracing::info!("shutting down: draining requests in flight");
    state.draining.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(());
    let mut server = server;
    match tokio::time::timeout(drain_timeout, &mut server).await {
        Ok(joined) => joined
            .context("server task failed")?
            .context("server failed")?,
        Err(_) => {
            tracing::warn!(
                running = state.omni.num_running(),
                "drain timeout: dropping the requests still in flight"
            );
            server.abort();
            let _ = server.await;
        }
    }
    // Connections are closed, so their clones of the state are gone; an
    // aborted stream may still be dropping, give it a moment.
    let mut state = state;
    for _ in 0..50 {
        match Arc::try_unwrap(state) {
            Ok(st) => {
                st.omni.shutdown().await.context("stopping the pipeline")?;
                tracing::info!("pipeline stopped");
                return Ok(());
            }
            Err(s) => {
                state = s;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    anyhow::bail!("pipeline still in use after the drain; its stages stop as the process exits")
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
