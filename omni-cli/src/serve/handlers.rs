//! The HTTP handlers: OpenAI endpoints, health, metrics and profiling.
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use omni_core::{OmniRequestOutput, StageHealth, StageSamplingParams};

use super::api_error::ApiError;
use super::openai::{
    ChatCompletionResponse, CompletionResponse, ModelCard, ModelList, ProfileRequest,
};
use super::sse::{ChunkBuilder, Flavor, DONE};
use super::validate::Plan;
use super::AppState;

type St = State<Arc<AppState>>;

/// `GET /health`: 200 while serving; 503 once draining, or once a stage
/// died (naming it), so a load balancer stops sending requests that could
/// only fail.
pub async fn health(State(st): St) -> Response {
    if st.draining.load(Ordering::Relaxed) {
        return ApiError::unavailable("server is shutting down").into_response();
    }
    match st.omni.check_serving() {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Per-stage series read from each stage's health answer.
type StageSeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&StageHealth) -> u64,
);

const STAGE_SERIES: [StageSeries; 6] = [
    (
        "omni_stage_running_requests",
        "Requests a stage holds (in its engine or waiting for input).",
        "gauge",
        |h| h.running_requests as u64,
    ),
    (
        "omni_stage_engine_requests",
        "Requests a stage's engine holds (queued, running or finishing).",
        "gauge",
        |h| h.engine_requests as u64,
    ),
    (
        "omni_stage_generated_tokens_total",
        "Tokens a stage's engine has sampled since it started, aborted requests included.",
        "counter",
        |h| h.generated_tokens,
    ),
    (
        "omni_stage_prefix_cache_queried_tokens_total",
        "Prompt tokens a stage looked up in its prefix cache.",
        "counter",
        |h| h.prefix_cache_queried_tokens,
    ),
    (
        "omni_stage_prefix_cache_hit_tokens_total",
        "Prompt tokens whose K/V a stage's prefix cache held (shared, not computed).",
        "counter",
        |h| h.prefix_cache_hit_tokens,
    ),
    (
        "omni_stage_aborted_requests_total",
        "Aborts that found their request still in the stage.",
        "counter",
        |h| h.aborted_requests,
    ),
];

/// How long `/metrics` waits for a stage's health answer: the stages are
/// asked at once, so a scrape answers within this (a scraper gives up after
/// 10 s) even when a stage is stuck; such a stage shows as down.
const STAGE_HEALTH_WAIT: Duration = Duration::from_secs(3);

/// `GET /metrics`: the server's own series, plus what each stage reports
/// about itself right now (alive, requests it holds, tokens, aborts).
pub async fn metrics(State(st): St) -> Response {
    let mut text = st.metrics.render();
    let mut up = String::from(
        "# HELP omni_stage_up Whether the stage answered a health check.\n# TYPE omni_stage_up gauge\n",
    );
    let mut series: Vec<String> = STAGE_SERIES
        .iter()
        .map(|(name, help, kind, _)| format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"))
        .collect();
    let asks = st.omni.stages().iter().map(|stage| {
        let id = stage.stage_id;
        let omni = &st.omni;
        async move {
            // A dropped call leaves nothing behind in the orchestrator.
            let answer = tokio::time::timeout(STAGE_HEALTH_WAIT, omni.stage_health(id))
                .await
                .unwrap_or(Err(omni_core::Error::Runtime(
                    omni_core::runtime::Error::Timeout {
                        stage_id: id,
                        what: "health",
                        timeout: STAGE_HEALTH_WAIT,
                    },
                )));
            (id, answer)
        }
    });
    for (id, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(h) => {
                up.push_str(&format!("omni_stage_up{{stage=\"{id}\"}} 1\n"));
                for ((name, _, _, value), out) in STAGE_SERIES.iter().zip(&mut series) {
                    out.push_str(&format!("{name}{{stage=\"{id}\"}} {}\n", value(&h)));
                }
            }
            Err(e) => {
                tracing::warn!(stage = id, error = %e, "health check failed");
                up.push_str(&format!("omni_stage_up{{stage=\"{id}\"}} 0\n"));
            }
        }
    }
    text.push_str(&up);
    for s in series {
        text.push_str(&s);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `GET /v1/models`.
pub async fn models(State(st): St) -> Json<ModelList> {
    let data = st
        .view
        .served_names
        .iter()
        .map(|id| ModelCard {
            id: id.clone(),
            object: "model",
            created: st.created,
            owned_by: "omni",
            root: st.root.clone(),
            max_model_len: st.view.max_model_len.first().copied().flatten(),
        })
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}

/// `POST /v1/completions`.
pub async fn completions(State(st): St, body: Bytes) -> Response {
    const EP: &str = "/v1/completions";
    let plan = st.view.plan_completion(&body);
    respond(&st, EP, Flavor::Completion, plan).await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(st): St, body: Bytes) -> Response {
    const EP: &str = "/v1/chat/completions";
    // Media parts are decoded here (megabytes of audio or pixels): off the
    // async workers, so other connections keep being served meanwhile.
    let state = Arc::clone(&st);
    let plan = tokio::task::spawn_blocking(move || state.view.plan_chat(&body))
        .await
        .unwrap_or_else(|e| {
            Err(ApiError::internal(format!(
                "reading the request failed: {e}"
            )))
        });
    respond(&st, EP, Flavor::Chat, plan).await
}

async fn respond(
    st: &Arc<AppState>,
    endpoint: &'static str,
    flavor: Flavor,
    plan: Result<(Plan, String), ApiError>,
) -> Response {
    let result = match plan {
        Ok((plan, model)) => run(st, endpoint, flavor, plan, model).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(resp) => resp,
        Err(e) => {
            st.metrics.request_done(endpoint, e.status.as_u16());
            e.into_response()
        }
    }
}

/// Tracks one request in the metrics until it leaves the pipeline, however
/// it leaves (finished, failed, or dropped because the client went away).
struct InFlight {
    st: Arc<AppState>,
    start: Instant,
    unfinished: Vec<usize>,
    first_token: bool,
    ok: bool,
}

impl InFlight {
    fn new(st: &Arc<AppState>, finals: Vec<usize>) -> Self {
        st.metrics.request_started(&finals);
        Self {
            st: Arc::clone(st),
            start: Instant::now(),
            unfinished: finals,
            first_token: false,
            ok: false,
        }
    }

    fn observe(&mut self, out: &OmniRequestOutput) {
        if !self.first_token && !out.token_ids.is_empty() {
            self.first_token = true;
            self.st.metrics.first_token(self.start.elapsed());
        }
        if out.finished && self.unfinished.contains(&out.stage_id) {
            self.unfinished.retain(|&s| s != out.stage_id);
            let m = out.metrics.stage(out.stage_id);
            self.st.metrics.stage_finished(
                out.stage_id,
                m.map_or(Duration::ZERO, |m| m.queue_time),
                m.map_or(Duration::ZERO, |m| m.compute_time),
                out.metrics.e2e_latency,
                out.num_prompt_tokens,
                out.token_ids.len(),
            );
            self.ok = self.unfinished.is_empty();
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let e2e = self.ok.then(|| self.start.elapsed());
        self.st.metrics.request_ended(&self.unfinished, e2e);
    }
}

async fn run(
    st: &Arc<AppState>,
    endpoint: &'static str,
    flavor: Flavor,
    plan: Plan,
    model: String,
) -> Result<Response, ApiError> {
    if st.draining.load(Ordering::Relaxed) {
        return Err(ApiError::unavailable("server is shutting down"));
    }
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let prefix = match flavor {
        Flavor::Chat => "chatcmpl",
        Flavor::Completion => "cmpl",
    };
    let request_id = format!("{prefix}-{:x}{n:06x}", st.created);
    let builder = ChunkBuilder::new(flavor, request_id.clone(), unix_now(), model, &plan);
    // One pipeline request per prompt and sample, all submitted before any
    // is read: the stages batch them, and samples of one prompt share its
    // KV blocks through the prefix cache (vLLM's parallel sampling). Ids as
    // vLLM's: `<id>-<prompt>`, `<sample>_<id>-<prompt>`.
    let sequences = plan.prompts.len() * plan.n;
    if let Some(limit) = st.omni.max_pending_requests().filter(|&l| sequences > l) {
        // Could never be served: not a matter of retrying later.
        return Err(ApiError::bad_param(
            "n",
            format!(
                "{sequences} sequences (prompts × n) in one request, more than this server \
                 runs at once (--max-pending-requests {limit})"
            ),
        ));
    }
    let mut streams = Vec::with_capacity(sequences);
    for (p, prompt) in plan.prompts.into_iter().enumerate() {
        for i in 0..plan.n {
            let mut id = if sequences / plan.n == 1 {
                request_id.clone()
            } else {
                format!("{request_id}-{p}")
            };
            if plan.n > 1 {
                id = format!("{i}_{id}");
            }
            let params = plan
                .params
                .iter()
                .map(|s| {
                    let mut s = s.clone();
                    s.seed = s.seed.map(|seed| seed.wrapping_add(i as u64));
                    s
                })
                .collect();
            let in_flight = InFlight::new(st, st.view.finals.iter().map(|(s, _)| *s).collect());
            let stream = st
                .omni
                .generate(prompt.clone(), StageSamplingParams::PerStage(params), id)
                .await?;
            let seq = p * plan.n + i;
            streams.push(
                stream
                    .scan(in_flight, move |in_flight, out| {
                        if let Ok(o) = &out {
                            in_flight.observe(o);
                        }
                        futures::future::ready(Some((seq, out)))
                    })
                    .boxed(),
            );
        }
    }
    let mut outputs = futures::stream::select_all(streams);
    if plan.stream {
        // A stage refuses a sequence (its prompt too long for the context,
        // say) before it makes anything: wait for every sequence's first
        // output so that a refusal is an HTTP status, as vLLM answers, not
        // an error event after a 200.
        let mut first = Vec::new();
        let mut started = std::collections::HashSet::new();
        while started.len() < sequences {
            match outputs.next().await {
                Some((seq, Ok(out))) => {
                    started.insert(seq);
                    first.push((seq, out));
                }
                Some((_, Err(e))) => return Err(e.into()),
                None => break,
            }
        }
        st.metrics.request_done(endpoint, 200);
        let events = sse_events(outputs, first, builder, plan.include_usage);
        let sse = Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(2)));
        return Ok(sse.into_response());
    }
    let resp = collect(outputs, builder, request_id, flavor).await?;
    st.metrics.request_done(endpoint, 200);
    Ok(resp)
}

/// Every sequence's outputs, tagged with the sequence's number.
type Outputs = futures::stream::SelectAll<
    futures::stream::BoxStream<'static, (usize, omni_core::Result<OmniRequestOutput>)>,
>;

/// A non-streaming answer: one choice per sequence and chosen final stage.
async fn collect(
    mut outputs: Outputs,
    mut builder: ChunkBuilder,
    id: String,
    flavor: Flavor,
) -> Result<Response, ApiError> {
    while let Some((seq, out)) = outputs.next().await {
        builder.on_output(seq, &out?);
    }
    let usage = builder.usage();
    let created = unix_now();
    let model = builder.model().to_string();
    Ok(match flavor {
        Flavor::Completion => Json(CompletionResponse {
            id,
            object: "text_completion",
            created,
            model,
            choices: builder.completion_choices(),
            usage,
        })
        .into_response(),
        Flavor::Chat => Json(ChatCompletionResponse {
            id,
            object: "chat.completion",
            created,
            model,
            choices: builder.chat_choices(),
            usage,
        })
        .into_response(),
    })
}

/// The SSE events of a streaming answer. Dropping this stream (the client
/// went away) drops every sequence's `OmniStream`, which aborts them in
/// every stage.
fn sse_events(
    outputs: Outputs,
    first: Vec<(usize, OmniRequestOutput)>,
    mut builder: ChunkBuilder,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    struct S {
        outputs: Outputs,
        builder: ChunkBuilder,
        include_usage: bool,
        queue: VecDeque<String>,
        ended: bool,
    }
    let queue = first
        .iter()
        .flat_map(|(seq, out)| builder.on_output(*seq, out))
        .collect();
    let state = S {
        outputs,
        builder,
        include_usage,
        queue,
        ended: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.queue.pop_front() {
                return Some((Ok(Event::default().data(data)), s));
            }
            if s.ended {
                return None;
            }
            match s.outputs.next().await {
                Some((seq, Ok(out))) => {
                    let payloads = s.builder.on_output(seq, &out);
                    s.queue.extend(payloads);
                }
                Some((_, Err(e))) => {
                    // Headers are gone already: report in the stream, as
                    // vLLM does, then end it properly.
                    let e = ApiError::from(e);
                    tracing::error!(error = %e.message, "stream failed");
                    s.queue.push_back(e.body().to_string());
                    s.queue.push_back(DONE.to_string());
                    s.ended = true;
                }
                None => {
                    if s.include_usage {
                        let chunk = s.builder.usage_chunk();
                        s.queue.push_back(chunk);
                    }
                    s.queue.push_back(DONE.to_string());
                    s.ended = true;
                }
            }
        }
    })
}

/// `POST /start_profile`, optional body `{"stages": [0, 1]}`.
pub async fn start_profile(State(st): St, body: Bytes) -> Response {
    let result = async {
        let req = profile_body(&st, &body)?;
        st.omni.start_profile(req.stages.as_deref()).await?;
        Ok::<_, ApiError>(Json(
            serde_json::json!({"status": "started", "stages": req.stages}),
        ))
    }
    .await;
    finish_profile(&st, "/start_profile", result)
}

/// `POST /stop_profile`: answers `{"traces": {"0": [paths], ...}}`.
pub async fn stop_profile(State(st): St, body: Bytes) -> Response {
    let result = async {
        // The body is accepted for symmetry with /start_profile; stop ends
        // every window that is open.
        profile_body(&st, &body)?;
        let traces = st.omni.stop_profile().await?;
        let traces: BTreeMap<String, Vec<String>> = traces
            .into_iter()
            .map(|(s, paths)| {
                (
                    s.to_string(),
                    paths.iter().map(|p| p.display().to_string()).collect(),
                )
            })
            .collect();
        Ok::<_, ApiError>(Json(
            serde_json::json!({"status": "stopped", "traces": traces}),
        ))
    }
    .await;
    finish_profile(&st, "/stop_profile", result)
}

fn profile_body(st: &AppState, body: &[u8]) -> Result<ProfileRequest, ApiError> {
    if !st.profiling_enabled {
        return Err(ApiError::bad_request(
            "profiling is disabled: start the server with VLLM_TORCH_PROFILER_DIR set",
        ));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ProfileRequest::default());
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ApiError::bad_param(
            path.clone(),
            format!("invalid field {path}: {}", e.into_inner()),
        )
    })
}

fn finish_profile(
    st: &AppState,
    endpoint: &str,
    result: Result<Json<serde_json::Value>, ApiError>,
) -> Response {
    match result {
        Ok(body) => {
            st.metrics.request_done(endpoint, 200);
            body.into_response()
        }
        Err(e) => {
            st.metrics.request_done(endpoint, e.status.as_u16());
            e.into_response()
        }
    }
}

/// Unknown routes: OpenAI's error shape, 404.
pub async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::not_found(format!("no route for {uri}")).into_response()
}

/// Seconds since the UNIX epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
