//! The model thread of a stage worker: owns the engine and runs its
//! synchronous step loop, as vLLM's `EngineCoreProc.run_busy_loop`. It takes
//! commands from the socket thread through a bounded queue and hands back
//! encoded frames through another; it never touches a socket.
//!
//! Encoding happens here, inside `stage_send` spans, and stage inputs are
//! admitted here inside `stage_recv` spans (the first stage's requests inside
//! `add_request` spans): the torch profiler records only the thread that
//! enabled it, and this is that thread.
//!
//! Profiler windows follow the thread contract of `omni-profiler`: the
//! `start()`/`stop()` futures are created and first polled on this thread
//! (backends do their thread-bound work before their first `.await`); if
//! they are not done by then, the socket thread's runtime finishes them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::sync::mpsc;

use omni_engine::{EngineArgs, FinishReason, Prompt, RequestOutput, SamplingParams, StageEngine};
use omni_profiler::{ProfileSession, Profiler};

use crate::cpu_turn::CpuTurn;
use crate::error::Result;
use crate::processor::{
    InputProcessor, ProcessorInput, SourceOutput, StageInput, THINKER_POSITIONS, THINKER_STATES,
};
use crate::shm::ShmWriter;
use crate::tensor::HostTensor;
use crate::wire::{
    self, AckMsg, Envelope, GenerateMsg, Message, OutputMsg, StageInputMsg, StageMetrics,
    StartProfileMsg, UpstreamOutput,
};

/// Aborted ids remembered, so that a late upstream input for an aborted
/// request is dropped instead of started.
const ABORTED_MEMORY: usize = 4096;

/// Commands from the socket thread.
pub(crate) enum ToModel {
    Generate(GenerateMsg, u64),
    /// A request the socket thread could not read (its media tensors).
    Refuse(String, String),
    Input(StageInputMsg, Vec<(String, HostTensor)>, u64),
    Abort(Vec<String>),
    StartProfile(StartProfileMsg),
    StopProfile(u64),
    Shutdown,
}

/// What the model thread hands back.
pub(crate) enum FromModel {
    Loaded {
        model_name: String,
        device: String,
        max_model_len: usize,
    },
    LoadFailed(String),
    ToOrchestrator(Vec<Bytes>),
    ToStage(usize, Vec<Bytes>),
    Stopped,
}

type ProfileFuture =
    Pin<Box<dyn Future<Output = std::result::Result<Vec<PathBuf>, String>> + Send>>;

struct Req {
    metrics: StageMetrics,
    sent_tokens: usize,
    prompt: Prompt,
    all_params: Vec<SamplingParams>,
    /// One per streamed downstream edge.
    pieces: Vec<OutStream>,
}

/// What a request has sent, and holds for the next piece, on a streamed
/// edge.
struct OutStream {
    to: usize,
    window: usize,
    next_index: u64,
    sent_tokens: usize,
    text: String,
    states: Vec<tch::Tensor>,
    /// The prompt's 3-D positions, until piece 0 takes them.
    positions: Option<tch::Tensor>,
}

/// The pieces of a streamed input that came before the request started.
struct Partial {
    arrival: u64,
    prompt: Prompt,
    params: Vec<SamplingParams>,
    output: UpstreamOutput,
    states: Vec<tch::Tensor>,
    positions: Option<HostTensor>,
}

/// A request whose input comes piece by piece.
enum Inbound {
    /// Not enough for the input processor yet: the pieces so far, merged.
    Gathering {
        next_index: u64,
        so_far: Box<Partial>,
    },
    /// Running in the engine, which takes each later piece's rows.
    Admitted { next_index: u64 },
}

struct Gather {
    arrival: u64,
    prompt: Prompt,
    params: Vec<SamplingParams>,
    outputs: BTreeMap<usize, SourceOutput>,
}

/// Everything the model thread needs, built by the socket thread.
pub(crate) struct ModelThread {
    pub stage_id: usize,
    /// Picks the engine (`vits`: the generation engine; else the LLM engine).
    pub model_stage: Option<String>,
    pub final_output: bool,
    pub sources: Vec<usize>,
    pub downstream: Vec<usize>,
    /// Downstream stages fed piece by piece: `(stage, tokens per piece)`.
    pub streams: Vec<(usize, usize)>,
    pub processor: (String, InputProcessor),
    pub shm: Option<Arc<ShmWriter>>,
    pub out: mpsc::UnboundedSender<FromModel>,
    pub profiler: Arc<dyn Profiler>,
    pub runtime: tokio::runtime::Handle,
    pub counters: Arc<StageCounters>,
    pub profiling: Arc<AtomicBool>,
    /// This host's CPU stages' turn, when they take turns stepping.
    pub cpu_turn: Option<CpuTurn>,
}

/// What the model thread publishes for health answers; the socket thread
/// reads it without waiting on a step. The gauges and the token count are
/// as of the model loop's last iteration (one step behind at most); an
/// abort is counted when it is handled.
#[derive(Debug, Default)]
pub(crate) struct StageCounters {
    /// Requests in the engine or waiting for upstream inputs.
    pub running: AtomicUsize,
    /// Requests the engine itself still holds.
    pub engine_requests: AtomicUsize,
    /// Tokens the engine has sampled since start.
    pub generated_tokens: AtomicU64,
    /// Aborts that found the request still in this stage.
    pub aborted_requests: AtomicU64,
    /// When ([`mono_us`]) the model thread began its current round; 0 while
    /// it waits for work.
    pub busy_since_us: AtomicU64,
    /// The engine's prefix-cache counters.
    pub prefix_cache_queried_tokens: AtomicU64,
    pub prefix_cache_hit_tokens: AtomicU64,
}

struct Loop {
    t: ModelThread,
    reqs: HashMap<String, Req>,
    gather: HashMap<String, Gather>,
    inbound: HashMap<String, Inbound>,
    aborted: HashSet<String>,
    aborted_order: VecDeque<String>,
}

/// Microseconds on a monotonic clock since the first call (never 0): for
/// durations that a wall-clock step (NTP, a resumed VM) must not bend.
pub(crate) fn mono_us() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    start.elapsed().as_micros() as u64 + 1
}

/// Now on the trace clock (µs since the UNIX epoch): arrival times go into
/// trace spans, which line up with the stage's other events only on it.
pub(crate) fn now_us() -> u64 {
    omni_profiler::now_unix_us() as u64
}

pub(crate) fn device_name(d: omni_engine::Device) -> String {
    match d {
        omni_engine::Device::Cpu => "cpu".to_string(),
        omni_engine::Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

impl ModelThread {
    /// Loads the engine, reports, then serves commands until `Shutdown` or
    /// until the socket thread goes away.
    pub(crate) fn run(mut self, args: EngineArgs, mut rx: mpsc::Receiver<ToModel>) {
        let out = self.out.clone();
        let mut cpu_turn = self.cpu_turn.take();
        let mut engine = match StageEngine::new(&args, self.model_stage.as_deref()) {
            Ok(e) => e,
            Err(e) => {
                let _ = out.send(FromModel::LoadFailed(format!(
                    "cannot load model {:?}: {e}",
                    args.model
                )));
                return;
            }
        };
        let _ = out.send(FromModel::Loaded {
            model_name: engine.model_name().to_string(),
            device: device_name(engine.device()),
            max_model_len: engine.max_model_len(),
        });
        let mut l = Loop {
            t: self,
            reqs: HashMap::new(),
            gather: HashMap::new(),
            inbound: HashMap::new(),
            aborted: HashSet::new(),
            aborted_order: VecDeque::new(),
        };
        'serve: loop {
            // A request waiting for its next streamed piece is unfinished
            // but gives a step nothing to do: wait for the piece then.
            let first = if engine.has_runnable() {
                match rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(mpsc::error::TryRecvError::Empty) => None,
                    Err(mpsc::error::TryRecvError::Disconnected) => break 'serve,
                }
            } else {
                l.t.counters.busy_since_us.store(0, Ordering::Relaxed);
                match rx.blocking_recv() {
                    Some(c) => Some(c),
                    None => break 'serve,
                }
            };
            l.t.counters
                .busy_since_us
                .store(mono_us(), Ordering::Relaxed);
            if let Some(c) = first {
                if !l.handle(&mut engine, c) {
                    break 'serve;
                }
                // Drain what queued up meanwhile, so a burst joins one batch.
                while let Ok(c) = rx.try_recv() {
                    if !l.handle(&mut engine, c) {
                        break 'serve;
                    }
                }
            }
            if engine.has_runnable() {
                let turn = cpu_turn.as_mut().map(|t| {
                    let _wait = tracing::info_span!(target: "omni::runtime", "cpu_turn").entered();
                    // The step timeout counts the step, not the wait for
                    // another stage's: waiting reads as idle, so a stage
                    // hung in its step is the one the watchdog kills.
                    l.t.counters.busy_since_us.store(0, Ordering::Relaxed);
                    let turn = t.take();
                    l.t.counters
                        .busy_since_us
                        .store(mono_us(), Ordering::Relaxed);
                    turn
                });
                // What came while this stage waited for the turn joins its
                // step: what another stage sent during its own step is one
                // batch here, and an abort is not stepped once more.
                if turn.is_some() {
                    while let Ok(c) = rx.try_recv() {
                        if !l.handle(&mut engine, c) {
                            break 'serve;
                        }
                    }
                }
                let stepped = engine.has_runnable().then(|| engine.step());
                // Outputs are sent while the next stage computes.
                drop(turn);
                match stepped {
                    Some(Ok(outs)) => {
                        // Requests whose output could not be sent were
                        // failed to their caller: nothing more for them.
                        for id in l.emit(outs) {
                            engine.abort(&id);
                        }
                    }
                    Some(Err(e)) => l.fail_all(&mut engine, &format!("engine step failed: {e}")),
                    None => {}
                }
            }
            let c = &l.t.counters;
            let gathering = l
                .inbound
                .values()
                .filter(|i| matches!(i, Inbound::Gathering { .. }))
                .count();
            c.running
                .store(l.reqs.len() + l.gather.len() + gathering, Ordering::Relaxed);
            let load = engine.load();
            c.engine_requests
                .store(load.unfinished_requests, Ordering::Relaxed);
            c.generated_tokens
                .store(load.generated_tokens, Ordering::Relaxed);
            c.prefix_cache_queried_tokens
                .store(load.prefix_cache.queried_tokens, Ordering::Relaxed);
            c.prefix_cache_hit_tokens
                .store(load.prefix_cache.hit_tokens, Ordering::Relaxed);
        }
        // Shutting down: a window still open is closed so its trace is not lost.
        if l.t.profiler.is_active() {
            let p = l.t.profiler.clone();
            let r = l.t.runtime.block_on(async move { p.stop().await });
            match r {
                Ok(files) => {
                    tracing::info!(target: "omni::runtime", ?files, "profiler window closed at shutdown")
                }
                Err(e) => {
                    tracing::warn!(target: "omni::runtime", "cannot close the profiler window at shutdown: {e}")
                }
            }
        }
        let ids: Vec<String> = l.reqs.keys().cloned().collect();
        for id in ids {
            engine.abort(&id);
        }
        let _ = out.send(FromModel::Stopped);
    }
}

impl Loop {
    fn send(&self, m: FromModel) {
        // The socket thread only goes away at exit; nothing to do then.
        let _ = self.t.out.send(m);
    }

    fn encode_or_log(&self, env: &Envelope) -> Option<Vec<Bytes>> {
        match wire::encode(env, self.t.shm.as_deref()) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!(target: "omni::runtime", "cannot encode {}: {e}", env.message.type_name());
                None
            }
        }
    }

    fn request_error(&self, request_id: &str, message: String) {
        self.report(request_id, message, false);
    }

    /// The request itself is at fault (bad prompt, params, too long).
    fn request_rejected(&self, request_id: &str, message: String) {
        self.report(request_id, message, true);
    }

    fn report(&self, request_id: &str, message: String, rejected: bool) {
        tracing::warn!(target: "omni::runtime", request_id, "{message}");
        let env = Envelope::new(Message::RequestError {
            request_id: request_id.to_string(),
            stage_id: self.t.stage_id,
            message,
            rejected,
        });
        if let Some(f) = self.encode_or_log(&env) {
            self.send(FromModel::ToOrchestrator(f));
        }
    }

    fn ack(&self, seq: u64, r: std::result::Result<Vec<PathBuf>, String>) {
        if let Some(f) = ack_frames(self.t.stage_id, seq, r) {
            self.send(FromModel::ToOrchestrator(f));
        }
    }

    /// Returns false on `Shutdown`.
    fn handle(&mut self, engine: &mut StageEngine, c: ToModel) -> bool {
        match c {
            ToModel::Generate(g, arrival) => self.generate(engine, g, arrival),
            ToModel::Input(m, tensors, arrival) => self.input(engine, m, tensors, arrival),
            ToModel::Refuse(id, reason) => self.request_rejected(&id, reason),
            ToModel::Abort(ids) => {
                for id in ids {
                    // Each place must let go of the id, whether or not an
                    // earlier one held it.
                    let in_engine = engine.abort(&id);
                    let in_stage = self.reqs.remove(&id).is_some();
                    let gathering =
                        self.gather.remove(&id).is_some() | self.inbound.remove(&id).is_some();
                    if in_engine || in_stage || gathering {
                        self.t
                            .counters
                            .aborted_requests
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    if self.aborted.insert(id.clone()) {
                        self.aborted_order.push_back(id);
                        if self.aborted_order.len() > ABORTED_MEMORY {
                            if let Some(old) = self.aborted_order.pop_front() {
                                self.aborted.remove(&old);
                            }
                        }
                    }
                }
            }
            ToModel::StartProfile(m) => self.start_profile(m),
            ToModel::StopProfile(seq) => {
                let p = self.t.profiler.clone();
                let fut: ProfileFuture =
                    Box::pin(async move { p.stop().await.map_err(|e| e.to_string()) });
                self.drive(seq, fut, false);
            }
            ToModel::Shutdown => return false,
        }
        true
    }

    fn start_profile(&mut self, m: StartProfileMsg) {
        let seq = m.seq;
        let options = match serde_json::from_value(m.options) {
            Ok(o) => o,
            Err(e) => return self.ack(seq, Err(format!("bad profiler options: {e}"))),
        };
        let session =
            ProfileSession::new(m.dir, m.process_name, options).with_clock_offset(m.clock_offset);
        let p = self.t.profiler.clone();
        let fut: ProfileFuture = Box::pin(async move {
            p.start(&session)
                .await
                .map(|_| Vec::new())
                .map_err(|e| e.to_string())
        });
        self.drive(seq, fut, true);
    }

    /// Polls a profiler future once here (thread-bound work happens now),
    /// then lets the socket thread's runtime finish it and send the ack.
    fn drive(&self, seq: u64, mut fut: ProfileFuture, starting: bool) {
        let mut cx = Context::from_waker(Waker::noop());
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(r) => {
                self.t
                    .profiling
                    .store(starting && r.is_ok(), Ordering::Relaxed);
                self.ack(seq, r)
            }
            Poll::Pending => {
                let out = self.t.out.clone();
                let stage_id = self.t.stage_id;
                let profiling = self.t.profiling.clone();
                self.t.runtime.spawn(async move {
                    let r = fut.await;
                    profiling.store(starting && r.is_ok(), Ordering::Relaxed);
                    if let Some(f) = ack_frames(stage_id, seq, r) {
                        let _ = out.send(FromModel::ToOrchestrator(f));
                    }
                });
            }
        }
    }

    fn generate(&mut self, engine: &mut StageEngine, g: GenerateMsg, arrival: u64) {
        // Marks the request's arrival in the trace, as `stage_recv` does for
        // the stages downstream.
        let _span = tracing::info_span!(target: "omni::runtime", "add_request", request_ids = %g.request_id, stage = self.t.stage_id, received_us = arrival).entered();
        if !self.t.sources.is_empty() {
            return self.request_error(
                &g.request_id,
                format!(
                    "stage {} takes its input from stages {:?}, not from the user's prompt",
                    self.t.stage_id, self.t.sources
                ),
            );
        }
        self.admit(
            engine,
            g.request_id,
            (StageInput::Prompt(g.prompt.clone()), true),
            g.prompt,
            g.sampling_params,
            arrival,
        );
    }

    fn input(
        &mut self,
        engine: &mut StageEngine,
        m: StageInputMsg,
        tensors: Vec<(String, HostTensor)>,
        arrival: u64,
    ) {
        // `received_us`: when the socket thread took it in; the span starts
        // when this thread gets to it, after the step then running.
        let span = tracing::info_span!(target: "omni::runtime", "stage_recv", request_ids = %m.request_id, from_stage = m.output.stage_id, stage = self.t.stage_id, received_us = arrival, piece = tracing::field::Empty);
        if let Some(p) = m.piece {
            // Pairs this receive with its send in a merged trace.
            span.record("piece", p.index);
        }
        let _span = span.entered();
        let id = m.request_id.clone();
        if self.aborted.contains(&id) {
            return;
        }
        let src = m.output.stage_id;
        if !self.t.sources.contains(&src) {
            return self.request_error(
                &id,
                format!(
                    "stage {src} is not an input source of stage {} (sources: {:?})",
                    self.t.stage_id, self.t.sources
                ),
            );
        }
        if let Some(piece) = m.piece {
            return self.piece(engine, m, piece, tensors, arrival);
        }
        let g = self.gather.entry(id.clone()).or_insert_with(|| Gather {
            arrival,
            prompt: m.prompt.clone(),
            params: m.sampling_params.clone(),
            outputs: BTreeMap::new(),
        });
        g.outputs.insert(
            src,
            SourceOutput {
                output: m.output,
                tensors,
            },
        );
        if g.outputs.len() < self.t.sources.len() {
            return;
        }
        let Some(mut g) = self.gather.remove(&id) else {
            return;
        };
        let sources: Vec<SourceOutput> = self
            .t
            .sources
            .iter()
            .filter_map(|s| g.outputs.remove(s))
            .collect();
        let input = ProcessorInput {
            request_id: &id,
            prompt: &g.prompt,
            sources: &sources,
        };
        // What upstream made of the request is not the caller's input: a
        // processor failure is the pipeline's (a server error), not a
        // rejection.
        match (self.t.processor.1)(&input) {
            Ok(Some(stage_input)) => self.admit(
                engine,
                id,
                (stage_input, true),
                g.prompt,
                g.params,
                g.arrival,
            ),
            Ok(None) => self.finish_empty(engine, id, g.prompt, g.params, g.arrival),
            Err(e) => self.request_error(&id, e.to_string()),
        }
    }

    /// A piece of a streamed input: merged into what came before until the
    /// input processor can start the request, then handed to the engine.
    fn piece(
        &mut self,
        engine: &mut StageEngine,
        m: StageInputMsg,
        piece: wire::StreamPiece,
        tensors: Vec<(String, HostTensor)>,
        arrival: u64,
    ) {
        let id = m.request_id.clone();
        let rows = match tensors
            .iter()
            .find(|(n, _)| n == THINKER_STATES)
            .map(|(_, t)| t.to_tch())
            .transpose()
        {
            Ok(r) => r,
            Err(e) => return self.request_error(&id, format!("cannot read a streamed piece: {e}")),
        };
        let expected = match self.inbound.get(&id) {
            None => 0,
            Some(Inbound::Gathering { next_index, .. } | Inbound::Admitted { next_index }) => {
                *next_index
            }
        };
        if piece.index != expected {
            self.inbound.remove(&id);
            engine.abort(&id);
            self.reqs.remove(&id);
            return self.request_error(
                &id,
                format!(
                    "streamed piece {} from stage {} out of order (expected {expected})",
                    piece.index, m.output.stage_id
                ),
            );
        }
        if let Some(Inbound::Admitted { next_index }) = self.inbound.get_mut(&id) {
            *next_index += 1;
            if piece.last {
                self.inbound.remove(&id);
            }
            // `false`: the request already finished here; nothing to feed.
            let fed =
                engine.extend_streamed_request(&id, &m.output.token_ids, rows.as_ref(), piece.last);
            if let Err(e) = fed {
                engine.abort(&id);
                self.reqs.remove(&id);
                self.inbound.remove(&id);
                self.request_error(&id, e.to_string());
            }
            return;
        }
        if !self.inbound.contains_key(&id) && self.reqs.contains_key(&id) {
            // A first piece for a request this stage already runs (a peer
            // that repeats itself): the running one keeps its input.
            return self.request_error(
                &id,
                format!(
                    "streamed piece {} from stage {} for a request already running in stage {}",
                    piece.index, m.output.stage_id, self.t.stage_id
                ),
            );
        }
        let entry = self
            .inbound
            .entry(id.clone())
            .or_insert_with(|| Inbound::Gathering {
                next_index: 0,
                so_far: Box::new(Partial {
                    arrival,
                    prompt: m.prompt.clone(),
                    params: m.sampling_params.clone(),
                    output: UpstreamOutput {
                        stage_id: m.output.stage_id,
                        ..UpstreamOutput::default()
                    },
                    states: Vec::new(),
                    positions: None,
                }),
            });
        let Inbound::Gathering { next_index, so_far } = entry else {
            return;
        };
        *next_index += 1;
        let Partial {
            output,
            states,
            positions,
            prompt,
            ..
        } = &mut **so_far;
        // Later pieces carry no prompt: the first piece's is the request's.
        let prompt = prompt.clone();
        output.token_ids.extend_from_slice(&m.output.token_ids);
        output.text.push_str(&m.output.text);
        output.finish_reason = m.output.finish_reason;
        states.extend(rows);
        if let Some((_, p)) = tensors.into_iter().find(|(n, _)| n == THINKER_POSITIONS) {
            *positions = Some(p);
        }
        let source = {
            let mut tensors = Vec::new();
            if !states.is_empty() {
                match tch::Tensor::f_cat(states, 0)
                    .map_err(|e| crate::error::Error::from(omni_engine::Error::from(e)))
                    .and_then(|t| HostTensor::from_tch(&t))
                {
                    Ok(t) => tensors.push((THINKER_STATES.to_string(), t)),
                    Err(e) => {
                        self.inbound.remove(&id);
                        return self
                            .request_error(&id, format!("cannot merge streamed states: {e}"));
                    }
                }
            }
            tensors.extend(
                positions
                    .clone()
                    .map(|p| (THINKER_POSITIONS.to_string(), p)),
            );
            SourceOutput {
                output: output.clone(),
                tensors,
            }
        };
        let input = ProcessorInput {
            request_id: &id,
            prompt: &prompt,
            sources: std::slice::from_ref(&source),
        };
        let decided = (self.t.processor.1)(&input);
        let ready = !matches!(decided, Ok(None)) || piece.last;
        if !ready {
            return;
        }
        let Some(Inbound::Gathering { next_index, so_far }) = self.inbound.remove(&id) else {
            return;
        };
        let Partial {
            arrival,
            prompt,
            params,
            ..
        } = *so_far;
        match decided {
            Ok(Some(stage_input)) => {
                if !piece.last {
                    self.inbound
                        .insert(id.clone(), Inbound::Admitted { next_index });
                }
                let input = (stage_input, piece.last);
                self.admit(engine, id.clone(), input, prompt, params, arrival);
                if !self.reqs.contains_key(&id) {
                    // Not admitted (an error was reported): later pieces
                    // have nothing to feed.
                    self.inbound.remove(&id);
                }
            }
            Ok(None) => self.finish_empty(engine, id, prompt, params, arrival),
            Err(e) => self.request_error(&id, e.to_string()),
        }
    }

    /// Reports an error for `id` when it is already running here (the
    /// caller's other request with that id keeps going); `true` then.
    fn refuse_running(&self, id: &str) -> bool {
        let running = self.reqs.contains_key(id);
        if running {
            self.request_error(
                id,
                format!(
                    "request id `{id}` is already running in stage {}",
                    self.t.stage_id
                ),
            );
        }
        running
    }

    /// Finishes a request at once with an empty output, without the model:
    /// the input processor found nothing to do (an empty upstream answer).
    fn finish_empty(
        &mut self,
        engine: &StageEngine,
        id: String,
        original: Prompt,
        all_params: Vec<SamplingParams>,
        arrival: u64,
    ) {
        if self.refuse_running(&id) {
            return;
        }
        let now = now_us();
        let metrics = StageMetrics {
            arrival_unix_us: arrival,
            admitted_unix_us: now,
            ..Default::default()
        };
        let req = self.new_req(metrics, original, all_params);
        self.reqs.insert(id.clone(), req);
        let instant = std::time::Instant::now();
        // A speech stage answers nothing with no audio, at its rate.
        let audio = engine
            .sample_rate()
            .map(|sample_rate| omni_engine::Waveform {
                samples: tch::Tensor::zeros([0], (tch::Kind::Float, tch::Device::Cpu)),
                sample_rate,
            });
        let metrics = omni_engine::RequestMetrics {
            arrival_time: instant,
            first_scheduled_time: Some(instant),
            first_token_time: None,
            finished_time: Some(instant),
            num_prompt_tokens: 0,
            num_generated_tokens: 0,
            num_preemptions: 0,
            num_cached_tokens: 0,
        };
        self.emit(vec![RequestOutput::without_tokens(
            id, audio, true, metrics,
        )]);
    }

    /// Starts `id` in the engine with its input and whether that input is
    /// complete (else more comes on a streamed edge).
    fn admit(
        &mut self,
        engine: &mut StageEngine,
        id: String,
        (input, complete): (StageInput, bool),
        original: Prompt,
        all_params: Vec<SamplingParams>,
        arrival: u64,
    ) {
        if self.refuse_running(&id) {
            return;
        }
        let Some(params) = all_params.get(self.t.stage_id).cloned() else {
            return self.request_error(
                &id,
                format!(
                    "the request carries {} sampling params; stage {} needs one at index {}",
                    all_params.len(),
                    self.t.stage_id,
                    self.t.stage_id
                ),
            );
        };
        let added: omni_engine::Result<()> = match input {
            StageInput::Prompt(prompt) if complete => {
                engine.add_request(id.clone(), prompt, params)
            }
            StageInput::Prompt(prompt) => {
                engine.start_streamed_request(id.clone(), prompt, params, false)
            }
            StageInput::ThinkerStates {
                states,
                prompt_len,
                positions,
            } => match (
                states.to_tch(),
                positions.as_ref().map(HostTensor::to_tch).transpose(),
            ) {
                (Ok(states), Ok(positions)) if complete => engine
                    .add_talker_request_with_positions(
                        id.clone(),
                        &states,
                        prompt_len,
                        positions.as_ref(),
                        params,
                    ),
                (Ok(states), Ok(positions)) => engine.start_talker_request(
                    id.clone(),
                    &states,
                    prompt_len,
                    positions.as_ref(),
                    params,
                ),
                (Err(e), _) | (_, Err(e)) => return self.request_error(&id, e.to_string()),
            },
        };
        if let Err(e) = added {
            // The caller's input at an entry stage, and the caller's
            // sampling params anywhere; downstream, the prompt is what an
            // upstream stage made.
            let callers = matches!(e, omni_engine::Error::InvalidSamplingParams { .. });
            return if self.t.sources.is_empty() || callers {
                self.request_rejected(&id, e.to_string())
            } else {
                self.request_error(&id, e.to_string())
            };
        }
        let metrics = StageMetrics {
            arrival_unix_us: arrival,
            admitted_unix_us: now_us(),
            ..Default::default()
        };
        let req = self.new_req(metrics, original, all_params);
        self.reqs.insert(id, req);
    }

    fn new_req(
        &self,
        metrics: StageMetrics,
        prompt: Prompt,
        all_params: Vec<SamplingParams>,
    ) -> Req {
        Req {
            metrics,
            sent_tokens: 0,
            prompt,
            all_params,
            pieces: self
                .t
                .streams
                .iter()
                .map(|&(to, window)| OutStream {
                    to,
                    window,
                    next_index: 0,
                    sent_tokens: 0,
                    text: String::new(),
                    states: Vec::new(),
                    positions: None,
                })
                .collect(),
        }
    }

    /// Sends each streamed edge of `req` its next piece when `o` completes
    /// one (a window of new tokens, or the end).
    fn send_pieces(&self, o: &RequestOutput, req: &mut Req) {
        if o.finish_reason == Some(FinishReason::Abort) {
            return;
        }
        for edge in &mut req.pieces {
            if let Some(rows) = &o.new_states {
                edge.states.push(rows.shallow_clone());
            }
            if edge.positions.is_none() && edge.next_index == 0 {
                edge.positions = o.mrope_positions.as_ref().map(tch::Tensor::shallow_clone);
            }
            edge.text.push_str(&o.delta_text);
            let fresh = o.token_ids.len().saturating_sub(edge.sent_tokens);
            if !o.finished && fresh < edge.window {
                continue;
            }
            let _span = tracing::info_span!(target: "omni::runtime", "stage_send", request_ids = %o.request_id, stage = self.t.stage_id, to_stages = ?[edge.to], piece = edge.next_index).entered();
            // The prompt and params travel with the first piece only: the
            // receiver keeps them, and a long prompt sent with every token
            // would cost its length per token.
            let first = edge.next_index == 0;
            let mut env = Envelope::new(Message::StageInput(StageInputMsg {
                request_id: o.request_id.clone(),
                prompt: if first {
                    req.prompt.without_media().clone()
                } else {
                    Prompt::TokenIds(Vec::new())
                },
                sampling_params: if first {
                    req.all_params.clone()
                } else {
                    Vec::new()
                },
                output: UpstreamOutput {
                    stage_id: self.t.stage_id,
                    text: std::mem::take(&mut edge.text),
                    token_ids: o.token_ids[edge.sent_tokens.min(o.token_ids.len())..].to_vec(),
                    finish_reason: o.finish_reason,
                },
                piece: Some(wire::StreamPiece {
                    index: edge.next_index,
                    last: o.finished,
                }),
            }));
            let states = std::mem::take(&mut edge.states);
            let tensors = (|| -> Result<Vec<(String, HostTensor)>> {
                let mut t = Vec::new();
                if !states.is_empty() {
                    let rows = tch::Tensor::f_cat(&states, 0).map_err(omni_engine::Error::from)?;
                    t.push((THINKER_STATES.to_string(), HostTensor::from_tch(&rows)?));
                }
                if let Some(p) = edge.positions.take() {
                    t.push((THINKER_POSITIONS.to_string(), HostTensor::from_tch(&p)?));
                }
                Ok(t)
            })();
            edge.next_index += 1;
            edge.sent_tokens = o.token_ids.len();
            let sent = tensors.map_err(|e| e.to_string()).and_then(|t| {
                env.tensors = t;
                self.encode_or_log(&env)
                    .ok_or_else(|| "cannot encode it".to_string())
            });
            match sent {
                Ok(f) => self.send(FromModel::ToStage(edge.to, f)),
                Err(e) => self.request_error(
                    &o.request_id,
                    format!(
                        "cannot send piece {} to stage {}: {e}",
                        edge.next_index - 1,
                        edge.to
                    ),
                ),
            }
        }
    }

    /// Sends each output on (to the caller, to downstream stages). Returns
    /// the requests that failed here (reported to the caller as errors),
    /// for the engine to drop.
    fn emit(&mut self, outs: Vec<RequestOutput>) -> Vec<String> {
        let mut failed = Vec::new();
        let whole = self.sends_whole();
        for o in outs {
            let Some(req) = self.reqs.get_mut(&o.request_id) else {
                continue;
            };
            let now = now_us();
            if req.metrics.first_token_unix_us.is_none() && !o.token_ids.is_empty() {
                req.metrics.first_token_unix_us = Some(now);
            }
            req.metrics.num_prompt_tokens = o.prompt_token_ids.len();
            req.metrics.num_generated_tokens = o.token_ids.len();
            if o.finished {
                req.metrics.finished_unix_us = Some(now);
                let em = &o.metrics;
                let us = |d: std::time::Duration| d.as_micros() as u64;
                req.metrics.queue_us = em
                    .first_scheduled_time
                    .map(|t| us(t.saturating_duration_since(em.arrival_time)));
                req.metrics.compute_us = match (em.first_scheduled_time, em.finished_time) {
                    (Some(a), Some(b)) => Some(us(b.saturating_duration_since(a))),
                    _ => None,
                };
                req.metrics.ttft_us = em.time_to_first_token().map(us);
                req.metrics.num_preemptions = em.num_preemptions;
                req.metrics.num_cached_tokens = em.num_cached_tokens;
            }
            let start = req.sent_tokens.min(o.token_ids.len());
            let delta_ids = o.token_ids[start..].to_vec();
            let delta_logprobs = o
                .logprobs
                .as_ref()
                .map(|lps| lps.get(start..).unwrap_or_default().to_vec());
            req.sent_tokens = o.token_ids.len();
            let hidden = if o.finished {
                match o
                    .hidden_states
                    .as_ref()
                    .map(HostTensor::from_tch)
                    .transpose()
                {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!(target: "omni::runtime", request_id = %o.request_id, "cannot copy hidden states: {e}");
                        None
                    }
                }
            } else {
                None
            };
            let positions = match o
                .mrope_positions
                .as_ref()
                .map(HostTensor::from_tch)
                .transpose()
            {
                Ok(p) => p,
                Err(e) => {
                    self.request_error(
                        &o.request_id,
                        format!("cannot copy the thinker's positions: {e}"),
                    );
                    self.reqs.remove(&o.request_id);
                    continue;
                }
            };
            // The whole states go only to stages fed whole outputs; a
            // streamed edge had them row by row.
            let states = match o
                .states
                .as_ref()
                .filter(|_| whole)
                .map(HostTensor::from_tch)
                .transpose()
            {
                Ok(s) => s,
                Err(e) => {
                    self.request_error(
                        &o.request_id,
                        format!("cannot copy the thinker's states: {e}"),
                    );
                    self.reqs.remove(&o.request_id);
                    continue;
                }
            };
            let audio = match o.audio.as_ref().map(audio_tensors).transpose() {
                Ok(a) => a,
                Err(e) => {
                    self.request_error(&o.request_id, format!("cannot copy the audio: {e}"));
                    self.reqs.remove(&o.request_id);
                    continue;
                }
            };
            if self.t.final_output {
                let msg = Message::Output(OutputMsg {
                    request_id: o.request_id.clone(),
                    stage_id: self.t.stage_id,
                    delta_text: o.delta_text.clone(),
                    delta_token_ids: delta_ids,
                    finished: o.finished,
                    finish_reason: o.finish_reason,
                    stop_reason: o.stop_reason.clone(),
                    delta_logprobs,
                    // Sent once, with the first tokens.
                    prompt_logprobs: o.prompt_logprobs.clone().filter(|_| start == 0),
                    metrics: o.finished.then(|| req.metrics.clone()),
                });
                let mut env = Envelope::new(msg);
                if let Some(h) = &hidden {
                    env.tensors.push(("hidden_states".to_string(), h.clone()));
                }
                env.tensors.extend(audio.iter().flatten().cloned());
                match self.encode_or_log(&env) {
                    Some(f) => self.send(FromModel::ToOrchestrator(f)),
                    None => {
                        // The caller would otherwise wait for an output
                        // that never comes.
                        self.request_error(&o.request_id, "cannot encode its output".into());
                        self.reqs.remove(&o.request_id);
                        if !o.finished {
                            failed.push(o.request_id.clone());
                        }
                        continue;
                    }
                }
            }
            if let Some(mut req) = self.reqs.remove(&o.request_id) {
                if !req.pieces.is_empty() {
                    self.send_pieces(&o, &mut req);
                }
                if !o.finished {
                    self.reqs.insert(o.request_id.clone(), req);
                    continue;
                }
                if whole && o.finish_reason != Some(FinishReason::Abort) {
                    let mut tensors = audio.unwrap_or_default();
                    tensors.extend(states.map(|s| (THINKER_STATES.to_string(), s)));
                    tensors.extend(positions.map(|p| (THINKER_POSITIONS.to_string(), p)));
                    self.forward(&o, req, hidden, tensors);
                }
            }
        }
        failed
    }

    /// Whether a downstream stage takes this stage's whole outputs (an
    /// edge that does not stream).
    fn sends_whole(&self) -> bool {
        self.t
            .downstream
            .iter()
            .any(|d| !self.t.streams.iter().any(|&(s, _)| s == *d))
    }

    /// Sends a finished output straight to every downstream stage.
    fn forward(
        &self,
        o: &RequestOutput,
        req: Req,
        hidden: Option<HostTensor>,
        tensors: Vec<(String, HostTensor)>,
    ) {
        let _span = tracing::info_span!(target: "omni::runtime", "stage_send", request_ids = %o.request_id, stage = self.t.stage_id, to_stages = ?self.t.downstream).entered();
        let msg = Message::StageInput(StageInputMsg {
            request_id: o.request_id.clone(),
            // Downstream stages read the upstream output, not the media.
            prompt: req.prompt.without_media().clone(),
            sampling_params: req.all_params,
            output: UpstreamOutput {
                stage_id: self.t.stage_id,
                text: o.text.clone(),
                token_ids: o.token_ids.clone(),
                finish_reason: o.finish_reason,
            },
            piece: None,
        });
        let mut env = Envelope::new(msg);
        if let Some(h) = hidden {
            env.tensors.push(("hidden_states".to_string(), h));
        }
        env.tensors.extend(tensors);
        // One encoding per receiver: a shared-memory segment is consumed
        // (unlinked) by the stage that reads it.
        let streamed: Vec<usize> = self.t.streams.iter().map(|&(d, _)| d).collect();
        for &d in self.t.downstream.iter().filter(|d| !streamed.contains(d)) {
            match self.encode_or_log(&env) {
                Some(f) => self.send(FromModel::ToStage(d, f)),
                None => self.request_error(
                    &o.request_id,
                    format!("cannot encode the input for stage {d}"),
                ),
            }
        }
    }

    fn fail_all(&mut self, engine: &mut StageEngine, message: &str) {
        let ids: Vec<String> = self.reqs.keys().cloned().collect();
        for id in ids {
            engine.abort(&id);
            self.reqs.remove(&id);
            self.request_error(&id, message.to_string());
        }
    }
}

/// A waveform as the tensors a stage sends: `audio` (`[samples]`, f32) and
/// `sample_rate` (`[1]`, i64), the names the caller's side reads.
fn audio_tensors(w: &omni_engine::Waveform) -> Result<Vec<(String, HostTensor)>> {
    let rate = tch::Tensor::from_slice(&[i64::from(w.sample_rate)]);
    Ok(vec![
        ("audio".to_string(), HostTensor::from_tch(&w.samples)?),
        ("sample_rate".to_string(), HostTensor::from_tch(&rate)?),
    ])
}

fn ack_frames(
    stage_id: usize,
    seq: u64,
    r: std::result::Result<Vec<PathBuf>, String>,
) -> Option<Vec<Bytes>> {
    let (error, files) = match r {
        Ok(f) => (None, f),
        Err(e) => (Some(e), Vec::new()),
    };
    let env = Envelope::new(Message::Ack(AckMsg {
        seq,
        stage_id,
        error,
        files,
    }));
    let frames: Result<Vec<Bytes>> = wire::encode(&env, None);
    frames
        .map_err(|e| tracing::error!(target: "omni::runtime", "cannot encode ack: {e}"))
        .ok()
}
