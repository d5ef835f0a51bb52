//! The orchestrator: lives in the user's process, starts one `omni-stage`
//! process per stage, hands requests to the entry stages, receives the final
//! outputs, and drives profiling and shutdown.
//!
//! Requests flow stage to stage directly (each worker sends its output to
//! the stages whose `engine_input_source` names it); the orchestrator only
//! sees what final-output stages stream back. One tokio task receives every
//! worker's messages and the supervisor's reports and routes them to the
//! per-request channels and pending control calls; no lock is held across
//! an `.await`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use zeromq::{RouterSendHalf, Socket, SocketRecv};

use omni_engine::{
    FinishReason, Prompt, PromptLogprobs, SamplingParams, StopReason, TokenLogprobs,
};
use omni_profiler::ClockOffset;

use crate::config::{Backend, CpuThreads, FinalOutputType, PipelineConfig, TransportKind};
use crate::error::{Error, Result};
use crate::launch::LaunchSpec;
use crate::locate::locate_stage_binary;
use crate::run_dir::RunDir;
use crate::shm::{shm_access, ShmAccess};
use crate::supervisor::{LogTail, Supervisor, SupervisorEvent};
use crate::tensor::HostTensor;
use crate::transport::{self, RunToken};
use crate::wire::{
    self, AckMsg, DecodeContext, Envelope, GenerateMsg, HealthMsg, Message, ReadyMsg, StageMetrics,
    StartProfileMsg, PROTOCOL_VERSION,
};

/// How the orchestrator starts and supervises its stages.
#[derive(Debug, Clone)]
pub struct OrchestratorOptions {
    /// The `omni-stage` binary; found automatically when `None` (see
    /// [`locate_stage_binary`](crate::locate_stage_binary)).
    pub stage_binary: Option<PathBuf>,
    /// How long every stage may take to load its model and connect.
    pub init_timeout: Duration,
    /// How long stages get to exit after `Shutdown` before they are killed.
    pub shutdown_grace: Duration,
    /// How long a stage may take to answer a control command (profile, health).
    pub control_timeout: Duration,
    /// How often every stage's health is checked while the pipeline runs.
    pub health_interval: Duration,
    /// A stage that does not answer a health check in this time (stopped,
    /// or its process wedged) is killed and reported dead, so callers get
    /// an error instead of waiting forever.
    pub health_timeout: Duration,
    /// A stage whose model thread has been on one round (one engine step,
    /// with its commands and outputs) this long is killed and reported
    /// dead. Generous: one step of a long prefill on a CPU takes seconds.
    pub step_timeout: Duration,
    /// Where the private run directory is created (default: `/dev/shm`, else
    /// the temp dir).
    pub run_dir_parent: Option<PathBuf>,
    /// Capacity of each request's event channel.
    pub event_buffer: usize,
    /// Extra environment for the workers (e.g. `RUST_LOG`).
    pub worker_env: Vec<(String, String)>,
}

impl Default for OrchestratorOptions {
    fn default() -> Self {
        OrchestratorOptions {
            stage_binary: None,
            init_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(10),
            control_timeout: Duration::from_secs(120),
            health_interval: Duration::from_secs(5),
            health_timeout: Duration::from_secs(10),
            step_timeout: Duration::from_secs(300),
            run_dir_parent: None,
            event_buffer: 256,
            worker_env: Vec::new(),
        }
    }
}

/// A running stage, as it reported itself at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct StageInfo {
    /// The stage.
    pub stage_id: usize,
    /// The model's role (`engine_args.model_stage`).
    pub model_stage: Option<String>,
    /// The engine's model name.
    pub model_name: String,
    /// Whether its outputs come back to the caller.
    pub final_output: bool,
    /// What those outputs are.
    pub final_output_type: FinalOutputType,
    /// The worker's pid.
    pub pid: u32,
    /// The engine's device (`cpu`, `cuda:0`).
    pub device: String,
    /// The engine's context length in tokens.
    pub max_model_len: usize,
    /// The address of the stage's input socket.
    pub input_address: String,
    /// The Ray node the stage runs on (`runtime.backend: ray`).
    pub ray_node_id: Option<String>,
}

/// One streamed output of a final-output stage for one request.
#[derive(Debug, Clone)]
pub struct StageOutput {
    /// The request.
    pub request_id: String,
    /// The stage.
    pub stage_id: usize,
    /// What the stage produces.
    pub final_output_type: FinalOutputType,
    /// All text generated so far.
    pub text: String,
    /// Text added by this output.
    pub delta_text: String,
    /// All token ids generated so far.
    pub token_ids: Vec<u32>,
    /// Token ids added by this output.
    pub delta_token_ids: Vec<u32>,
    /// Whether this is the stage's last output for the request.
    pub finished: bool,
    /// Why it finished.
    pub finish_reason: Option<FinishReason>,
    /// The stop string or stop token id that ended it, if one did.
    pub stop_reason: Option<StopReason>,
    /// Log-probabilities of every token so far, when the request asked.
    /// Shared with the orchestrator, which appends to it in place once the
    /// caller has dropped the previous output (no copy per token).
    pub logprobs: Option<Arc<Vec<TokenLogprobs>>>,
    /// Prompt log-probabilities, when the request asked; on the stage's
    /// first output.
    pub prompt_logprobs: Option<Box<PromptLogprobs>>,
    /// Timing and token counts, on the last output.
    pub metrics: Option<StageMetrics>,
    /// Tensors the stage returned with this output (hidden states, audio, ...):
    /// on the last output, or each streamed piece's own on every output.
    pub tensors: Vec<(String, HostTensor)>,
}

/// What a request's receiver yields.
#[derive(Debug)]
#[non_exhaustive]
pub enum StageEvent {
    /// An output of a final-output stage.
    Output {
        /// The stage.
        stage_id: usize,
        /// The output (boxed: it is large next to an error).
        output: Box<StageOutput>,
    },
    /// The request failed (a stage died or reported an error); nothing
    /// follows.
    Error(Error),
}

/// What a final stage generated for a request so far.
#[derive(Debug, Default)]
struct Generated {
    text: String,
    token_ids: Vec<u32>,
    logprobs: Option<Arc<Vec<TokenLogprobs>>>,
}

struct RequestState {
    /// The caller's id; on the wire the request travels under a wire id
    /// (see [`State::requests`]).
    request_id: String,
    events: mpsc::UnboundedSender<StageEvent>,
    text: HashMap<usize, Generated>,
    remaining_final: BTreeSet<usize>,
}

enum Reply {
    Ack(AckMsg),
    Health(HealthMsg),
}

struct Pending {
    tx: oneshot::Sender<Result<Reply>>,
}

#[derive(Default)]
struct State {
    /// Requests in flight by wire id: the caller's id plus `#<n>`, unique for
    /// the orchestrator's life. Stages remember aborted ids (to drop a late
    /// input); a caller reusing an id after an abort must not be mistaken for
    /// the aborted request, or a stage would silently drop it and the caller
    /// wait forever.
    requests: HashMap<String, RequestState>,
    /// Caller's id -> wire id, for the requests in flight.
    wire_ids: HashMap<String, String>,
    pending: HashMap<u64, Pending>,
    /// Set when a stage died: `(stage_id, status)`.
    dead: Option<(usize, String)>,
    shutting_down: bool,
    profiling: BTreeSet<usize>,
    /// Every trace directory a stage was sent, to clear what a stage
    /// killed mid-write leaves there once it has exited.
    trace_dirs: BTreeSet<(usize, PathBuf)>,
    /// Each stage's recent clock-offset estimates (health exchanges).
    clocks: HashMap<usize, ClockSamples>,
}

/// The last few clock-offset estimates of one stage. The best is the one
/// from the shortest round trip (NTP's minimum filter: queueing delays only
/// ever lengthen an exchange, and its error bound is half its round trip);
/// only recent ones count, so a drifting clock is followed.
#[derive(Default)]
struct ClockSamples(std::collections::VecDeque<ClockOffset>);

impl ClockSamples {
    const KEEP: usize = 16;

    fn push(&mut self, c: ClockOffset) {
        if self.0.len() == Self::KEEP {
            self.0.pop_front();
        }
        self.0.push_back(c);
    }

    fn best(&self) -> Option<ClockOffset> {
        self.0
            .iter()
            .copied()
            .min_by(|a, b| a.error_us.total_cmp(&b.error_us))
    }
}

/// Health exchanges per stage at start-up, for a first clock estimate.
const CLOCK_PROBES_AT_START: usize = 8;

struct Inner {
    config: PipelineConfig,
    opts: OrchestratorOptions,
    sender: RouterSendHalf,
    endpoint: String,
    state: Mutex<State>,
    seq: AtomicU64,
    /// Numbers the wire ids of submitted requests.
    submissions: AtomicU64,
    stages: Vec<StageInfo>,
    final_stages: BTreeSet<usize>,
    /// Where final-output tensors in shared memory are found.
    shm_dir: Option<PathBuf>,
    /// The run's secret: stages present it, foreign peers are dropped.
    token: RunToken,
    /// Whether each stage runs on this host (every local one; a Ray stage
    /// whose actor read our shared-memory probe).
    on_our_host: Vec<bool>,
}

/// Owns the stage processes of one pipeline. Dropping it shuts the stages
/// down (blocking up to the grace period); prefer [`shutdown`](Self::shutdown).
pub struct Orchestrator {
    inner: Arc<Inner>,
    supervisor: Option<Supervisor>,
    event_task: Option<JoinHandle<()>>,
    recv_task: Option<JoinHandle<()>>,
    watchdog_task: Option<JoinHandle<()>>,
    run_dir: PathBuf,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("pipeline", &self.inner.config.name)
            .field("stages", &self.inner.stages)
            .field("run_dir", &self.run_dir)
            .finish()
    }
}

impl State {
    /// Ends every request and control call in flight with `error`.
    fn fail_all(&mut self, error: impl Fn() -> Error) {
        self.wire_ids.clear();
        for (_, req) in self.requests.drain() {
            let _ = req.events.send(StageEvent::Error(error()));
        }
        for (_, p) in self.pending.drain() {
            let _ = p.tx.send(Err(error()));
        }
    }

    /// Forgets a request by wire id.
    fn remove(&mut self, wire_id: &str) -> Option<RequestState> {
        let req = self.requests.remove(wire_id)?;
        if self.wire_ids.get(&req.request_id).map(String::as_str) == Some(wire_id) {
            self.wire_ids.remove(&req.request_id);
        }
        Some(req)
    }
}

/// Each CPU stage's share of this host's cores with
/// `runtime.cpu_threads: split` (see [`LaunchSpec::cpu_threads`]): the cores
/// divided among the stages not placed on a CUDA device, at least one each.
/// None with `all`, or when the user sets `OMP_NUM_THREADS` (for us or for
/// the workers): theirs wins.
fn cpu_thread_share(config: &PipelineConfig, worker_env: &[(String, String)]) -> Option<usize> {
    if config.runtime.cpu_threads != CpuThreads::Split || user_omp_threads(worker_env).is_some() {
        return None;
    }
    let on_cpu = cpu_stages(config).count();
    Some((host_cores() / on_cpu.max(1)).max(1))
}

fn host_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `OMP_NUM_THREADS` as the user set it for the workers (which wins) or
/// for us, which the workers inherit.
fn user_omp_threads(worker_env: &[(String, String)]) -> Option<String> {
    worker_env
        .iter()
        .rev()
        .find(|(k, _)| k == "OMP_NUM_THREADS")
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var_os("OMP_NUM_THREADS").map(|v| v.to_string_lossy().into_owned()))
}

/// Whether stage `s` is not placed on a CUDA device. A stage that names no
/// device (or `auto`) counts: the orchestrator does not probe for CUDA, and
/// each stage, which does, takes turns only when it runs on the CPU.
fn on_cpu(s: &crate::StageConfig) -> bool {
    let device = s
        .runtime
        .devices
        .as_deref()
        .or(s.engine_args.device.as_deref());
    !device.is_some_and(|d| d.starts_with("cuda"))
}

fn cpu_stages(config: &PipelineConfig) -> impl Iterator<Item = &crate::StageConfig> {
    config.stages.iter().filter(|s| on_cpu(s))
}

/// Whether this host's CPU stages take turns stepping (see
/// `crate::cpu_turn`): with `runtime.cpu_threads: all`, two or more CPU
/// stages whose intra-op threads together exceed the cores, one of them
/// with more than one thread. A stage's
/// threads are its `engine_args.num_threads`, else `OMP_NUM_THREADS` (the
/// workers' or ours), else every core. With `split` the pools already fit
/// the cores side by side, and a turn would leave cores idle.
fn cpu_turns_needed(config: &PipelineConfig, worker_env: &[(String, String)]) -> bool {
    if config.runtime.cpu_threads != CpuThreads::All {
        return false;
    }
    let cores = host_cores();
    let omp = user_omp_threads(worker_env)
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0);
    let threads: Vec<usize> = cpu_stages(config)
        .map(|s| s.engine_args.num_threads.or(omp).unwrap_or(cores))
        .collect();
    pools_oversubscribe(&threads, cores)
}

/// Whether intra-op pools of `threads` each, running at once, oversubscribe
/// `cores` in a way turns fix. Single-threaded pools have no barriers to
/// spin at: the kernel's time slices share the cores among them better than
/// turns would.
fn pools_oversubscribe(threads: &[usize], cores: usize) -> bool {
    threads.len() >= 2 && threads.iter().any(|&t| t > 1) && threads.iter().sum::<usize>() > cores
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Variables of this process a stage started by Ray sees, as a local
/// child would inherit them (Ray's workers have the environment their node
/// was started with, not ours). Not `CUDA_*`: Ray sets the visible devices
/// of each actor.
/// Nor `OMP_*`: Ray sets an actor's threads to its bundle's CPUs.
const FORWARDED_ENV_PREFIXES: &[&str] = &["OMNI_", "VLLM_", "RUST_LOG", "RUST_BACKTRACE", "HF_"];

/// This process's forwarded variables, then `worker_env` (which wins).
fn forwarded_env(worker_env: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| FORWARDED_ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
        .collect();
    env.extend(worker_env.iter().cloned());
    env
}

/// What [`Orchestrator::start`] needs to start the stages, whichever the
/// backend.
struct Launch<'a> {
    config: &'a PipelineConfig,
    opts: &'a OrchestratorOptions,
    binary: &'a std::path::Path,
    run_path: &'a std::path::Path,
    token: &'a RunToken,
    cpu_threads: Option<usize>,
}

/// The stages, started (not yet ready).
struct Started {
    supervisor: Supervisor,
    router: zeromq::RouterSocket,
    /// The orchestrator's socket's address, as the stages reach it.
    endpoint: String,
    /// Each stage's input address, in stage order.
    inputs: Vec<String>,
    /// Each stage's last log lines, in stage order.
    tails: Vec<Arc<LogTail>>,
    /// Each stage's Ray node, in stage order (empty when local).
    ray_nodes: Vec<String>,
    /// Whether each stage runs on this host, in stage order.
    on_our_host: Vec<bool>,
}

impl Launch<'_> {
    /// The orchestrator's socket, bound to `bind_addr`.
    async fn bind(bind_addr: &str) -> Result<(zeromq::RouterSocket, String)> {
        let mut router = zeromq::RouterSocket::with_options(transport::socket_options());
        let endpoint = router
            .bind(bind_addr)
            .await
            .map_err(|e| Error::socket(bind_addr, e))?
            .to_string();
        Ok((router, endpoint))
    }

    /// Stage `s`'s launch spec; `access` says what it may do with the
    /// shared-memory directory `shm_dir`.
    fn spec(
        &self,
        s: &crate::StageConfig,
        endpoint: &str,
        inputs: &[String],
        shm_dir: &std::path::Path,
        access: ShmAccess,
    ) -> Result<LaunchSpec> {
        let config = self.config;
        Ok(LaunchSpec {
            stage: s.to_json()?,
            pipeline: config.name.clone(),
            num_stages: config.stages.len(),
            orchestrator_address: endpoint.to_owned(),
            token: self.token.as_str().to_owned(),
            input_address: inputs[s.stage_id].clone(),
            input_listener_fd: None,
            downstream: config
                .downstream_of(s.stage_id)
                .into_iter()
                .map(|d| (d, inputs[d].clone()))
                .collect(),
            streams: config.streamed_edges_from(s.stage_id),
            shm_threshold_bytes: config
                .runtime
                .shm_threshold_bytes
                .filter(|_| access == ShmAccess::ReadWrite),
            shm_dir: (access != ShmAccess::None).then(|| shm_dir.to_path_buf()),
            parent_pid: std::process::id(),
            run_dir: self.run_path.to_path_buf(),
            connect_timeout_ms: self.opts.init_timeout.as_millis() as u64,
            profiler_backend: config.profiler_backend(s.stage_id),
            // Three quarters of ours: the worker gives up on its model
            // thread (and says so) before we kill it.
            stop_grace_ms: (self.opts.shutdown_grace.as_millis() as u64 * 3 / 4).max(1),
            cpu_threads: self.cpu_threads,
            cpu_turn: None,
        })
    }

    /// Every stage a child process of this one, on this host.
    async fn local(
        &self,
        run_dir: RunDir,
        sup_tx: mpsc::UnboundedSender<SupervisorEvent>,
    ) -> Result<Started> {
        let config = self.config;
        let shm_dir = run_dir.shm_dir();
        let supervisor = Supervisor::start(run_dir, self.opts.shutdown_grace, sup_tx)?;
        let transport_kind = config.runtime.transport;
        let host = config.runtime.host.clone();
        let bind_addr = transport::orchestrator_address(transport_kind, self.run_path, &host)?;
        let (router, endpoint) = Self::bind(&bind_addr).await?;

        let mut inputs = Vec::with_capacity(config.stages.len());
        let mut listeners = Vec::with_capacity(config.stages.len());
        for s in &config.stages {
            let (addr, listener) = match (&s.runtime.address, transport_kind) {
                (Some(a), _) => (a.clone(), None),
                (None, TransportKind::Ipc) => (
                    transport::ipc_address(self.run_path, &format!("stage-{}.sock", s.stage_id))?,
                    None,
                ),
                (None, TransportKind::Tcp) => {
                    let (a, l) = transport::reserve_tcp_address(&host)?;
                    (a, Some(l))
                }
            };
            inputs.push(addr);
            listeners.push(listener);
        }

        // Every stage this orchestrator spawns runs on this host.
        let access = shm_access(config, &vec![true; config.stages.len()]);
        let cpu_turn = if cpu_turns_needed(config, &self.opts.worker_env) {
            let path = self.run_path.join(crate::cpu_turn::FILE_NAME);
            crate::cpu_turn::create(&path)?;
            Some(path)
        } else {
            None
        };
        let mut tails: Vec<Arc<LogTail>> = Vec::new();
        for s in &config.stages {
            let mut spec = self.spec(s, &endpoint, &inputs, &shm_dir, access[s.stage_id])?;
            spec.input_listener_fd = listeners[s.stage_id]
                .as_ref()
                .map(std::os::fd::AsRawFd::as_raw_fd);
            if on_cpu(s) {
                spec.cpu_turn.clone_from(&cpu_turn);
            }
            let spec_path = self.run_path.join(format!("stage-{}.json", s.stage_id));
            spec.write(&spec_path)?;
            let mut cmd = Command::new(self.binary);
            cmd.arg("--launch").arg(&spec_path);
            for (k, v) in &self.opts.worker_env {
                cmd.env(k, v);
            }
            // The stage owns its port from here; this process lets go of it
            // when the command is dropped, after the fork.
            if let Some(l) = listeners[s.stage_id].take() {
                transport::inherit_listener(&mut cmd, l);
            }
            let (pid, tail) = supervisor.spawn(s.stage_id, cmd).await?;
            tracing::info!(target: "omni::runtime", stage_id = s.stage_id, pid, "stage process started");
            tails.push(tail);
        }
        Ok(Started {
            supervisor,
            router,
            endpoint,
            inputs,
            on_our_host: vec![true; config.stages.len()],
            tails,
            ray_nodes: Vec::new(),
        })
    }

    /// Every stage on a node of a Ray cluster, in a process its own actor
    /// owns (see [`crate::ray`]).
    async fn on_ray(
        &self,
        run_dir: RunDir,
        sup_tx: mpsc::UnboundedSender<SupervisorEvent>,
    ) -> Result<Started> {
        let config = self.config;
        let ray = &config.runtime.ray;
        let shm_dir = run_dir.shm_dir();
        let script = self.run_path.join("omni_ray_launcher.py");
        // A probe only a process that shares our shared memory reads back.
        let probe = shm_dir.join(".ray-probe");
        let nonce = RunToken::generate()?.as_str().to_owned();
        let written = std::fs::write(&script, crate::ray::LAUNCHER_SOURCE)
            .map_err(|e| Error::io("cannot write the ray launcher", &script, e))
            .and_then(|()| {
                std::fs::write(&probe, &nonce)
                    .map_err(|e| Error::io("cannot write the shared-memory probe", &probe, e))
            });
        if let Err(e) = written {
            run_dir.remove();
            return Err(e);
        }
        let python = ray
            .python
            .clone()
            .or_else(|| std::env::var(crate::ray::RAY_PYTHON_ENV).ok())
            .unwrap_or_else(|| "python3".into());
        let mut cmd = Command::new(python);
        cmd.arg(&script);
        if let Some(address) = &ray.address {
            cmd.env("RAY_ADDRESS", address);
        }
        let tails: Vec<Arc<LogTail>> = config.stages.iter().map(|_| Arc::default()).collect();
        let supervisor = crate::ray::start(
            run_dir,
            self.opts.shutdown_grace,
            sup_tx,
            cmd,
            tails.clone(),
        )?;
        // Connecting to the cluster and placing the bundles, on top of the
        // placement's own limit.
        let answer_within = Duration::from_secs(ray.placement_timeout_s) + self.opts.init_timeout;
        let placed = supervisor
            .ray_call(
                crate::ray::place_request(config, Some((&probe, &nonce))),
                "placed",
                answer_within,
            )
            .await?;
        let placed: crate::ray::Placed = serde_json::from_value(placed)
            .map_err(|e| Error::Ray(format!("bad `placed` answer: {e}")))?;
        let mut at: Vec<Option<&crate::ray::Placement>> = vec![None; config.stages.len()];
        for p in &placed.stages {
            if let Some(slot) = at.get_mut(p.stage_id) {
                *slot = Some(p);
            }
        }
        let at: Vec<&crate::ray::Placement> = at
            .into_iter()
            .enumerate()
            .map(|(i, p)| p.ok_or_else(|| Error::Ray(format!("stage {i} was not placed"))))
            .collect::<Result<_>>()?;
        for p in &at {
            tracing::info!(target: "omni::runtime", stage_id = p.stage_id, node = %p.node_id, ip = %p.ip, port = p.port, "stage placed");
        }
        let host = ray
            .orchestrator_host
            .clone()
            .unwrap_or(placed.driver.ip.clone());
        let (router, endpoint) = Self::bind(&crate::ray::tcp_address(&host, 0)).await?;
        let inputs: Vec<String> = at
            .iter()
            .map(|p| crate::ray::tcp_address(&p.ip, p.port))
            .collect();
        let on_our_host: Vec<bool> = at
            .iter()
            .map(|p| p.shares_shm && p.host == placed.driver.host)
            .collect();
        let access = shm_access(config, &on_our_host);
        let mut specs = serde_json::Map::new();
        for s in &config.stages {
            let spec = self.spec(s, &endpoint, &inputs, &shm_dir, access[s.stage_id])?;
            let spec = serde_json::to_value(&spec)
                .map_err(|e| Error::Wire(format!("cannot encode launch spec: {e}")))?;
            specs.insert(s.stage_id.to_string(), spec);
        }
        let launched = supervisor
            .ray_call(
                json!({
                    "op": "launch",
                    "binary": self.binary,
                    "env": forwarded_env(&self.opts.worker_env),
                    "specs": specs,
                }),
                "launched",
                self.opts.init_timeout,
            )
            .await?;
        for l in launched["stages"].as_array().into_iter().flatten() {
            if let Ok(l) = serde_json::from_value::<crate::ray::LaunchedStage>(l.clone()) {
                tracing::info!(target: "omni::runtime", stage_id = l.stage_id, pid = l.pid, "stage process started by its ray actor");
            }
        }
        Ok(Started {
            supervisor,
            router,
            endpoint,
            inputs,
            tails,
            ray_nodes: at.iter().map(|p| p.node_id.clone()).collect(),
            on_our_host,
        })
    }
}

impl Orchestrator {
    /// Validates `config`, spawns one worker per stage, and waits until all
    /// are ready (or one fails, or `init_timeout` passes; the error names
    /// the stage).
    pub async fn start(config: PipelineConfig, opts: OrchestratorOptions) -> Result<Self> {
        config.validate()?;
        let binary = locate_stage_binary(opts.stage_binary.as_deref())?;
        let run_dir = RunDir::create(opts.run_dir_parent.as_deref())?;
        let run_path = run_dir.path().to_path_buf();
        let shm_dir = run_dir.shm_dir();
        let shm_enabled = config.runtime.shm_threshold_bytes.is_some();
        let (sup_tx, mut sup_rx) = mpsc::unbounded_channel();
        let token = RunToken::generate()?;
        let launch = Launch {
            config: &config,
            opts: &opts,
            binary: &binary,
            run_path: &run_path,
            token: &token,
            // Ray gives each stage its bundle's CPUs as threads; this host's
            // cores are not the nodes'.
            cpu_threads: match config.runtime.backend {
                Backend::Ray => None,
                Backend::Local => cpu_thread_share(&config, &opts.worker_env),
            },
        };
        // From here on the supervisor owns the run directory: any error
        // below drops it, which stops the workers and removes the directory.
        let Started {
            supervisor,
            router,
            endpoint,
            inputs,
            tails,
            ray_nodes,
            on_our_host,
        } = match config.runtime.backend {
            Backend::Ray => launch.on_ray(run_dir, sup_tx).await?,
            Backend::Local => launch.local(run_dir, sup_tx).await?,
        };
        let (sender, mut receiver) = router.split();
        let (msg_tx, mut msg_rx) = mpsc::channel::<(Bytes, Vec<Bytes>)>(1024);
        let recv_endpoint = endpoint.clone();
        let recv_token = token.clone();
        let recv_task = tokio::spawn(async move {
            let refusals = transport::Refusals::default();
            loop {
                match receiver.recv().await {
                    Ok(m) => {
                        let mut frames = m.into_vec();
                        if frames.is_empty() {
                            continue;
                        }
                        let identity = frames.remove(0);
                        let Some(role) = recv_token.role_of(&identity) else {
                            refusals.refuse(&recv_endpoint, &identity);
                            continue;
                        };
                        let role = identity.slice_ref(role);
                        if msg_tx.send((role, frames)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(target: "omni::runtime", endpoint = %recv_endpoint, "orchestrator socket closed: {e}");
                        break;
                    }
                }
            }
        });

        // Handshake: every stage must say Ready before anything else happens.
        let ctx = DecodeContext::default();
        let mut ready: BTreeMap<usize, ReadyMsg> = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + opts.init_timeout;
        let n = config.stages.len();
        let fail = |e: Error| -> Error {
            supervisor.stop(Duration::from_secs(2), true);
            e
        };
        while ready.len() < n {
            tokio::select! {
                m = msg_rx.recv() => {
                    let Some((_identity, frames)) = m else {
                        recv_task.abort();
                        return Err(fail(Error::socket(&endpoint, "closed during start-up")));
                    };
                    match wire::decode(frames, &ctx) {
                        Ok(Envelope { message: Message::Ready(r), .. }) => {
                            if r.protocol_version != PROTOCOL_VERSION {
                                recv_task.abort();
                                return Err(fail(Error::Stage { stage_id: r.stage_id, message: format!(
                                    "speaks protocol version {} but this orchestrator speaks {PROTOCOL_VERSION}; rebuild omni-stage", r.protocol_version) }));
                            }
                            if r.stage_id >= n {
                                tracing::warn!(target: "omni::runtime", stage_id = r.stage_id, "ready from an unknown stage; ignored");
                                continue;
                            }
                            tracing::info!(target: "omni::runtime", stage_id = r.stage_id, model = %r.model_name, device = %r.device, pid = r.pid, "stage ready");
                            ready.insert(r.stage_id, r);
                        }
                        Ok(other) => tracing::debug!(target: "omni::runtime", kind = other.message.type_name(), "message before ready; ignored"),
                        Err(rej) => tracing::warn!(target: "omni::runtime", "bad message during start-up: {}", rej.error),
                    }
                }
                ev = sup_rx.recv() => {
                    if let Some(SupervisorEvent::Exited { stage_id, status, .. }) = ev {
                        recv_task.abort();
                        let log = tails.get(stage_id).map(|t| t.render()).unwrap_or_default();
                        return Err(fail(Error::StageFailedToStart { stage_id, status, log }));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    recv_task.abort();
                    let stage_id = (0..n).find(|i| !ready.contains_key(i)).unwrap_or(0);
                    let log = tails.get(stage_id).map(|t| t.render()).unwrap_or_default();
                    return Err(fail(Error::StageInitTimeout { stage_id, timeout: opts.init_timeout, log }));
                }
            }
        }

        let stages: Vec<StageInfo> = config
            .stages
            .iter()
            .map(|s| {
                let r = &ready[&s.stage_id];
                StageInfo {
                    stage_id: s.stage_id,
                    model_stage: s.model_stage.clone(),
                    model_name: r.model_name.clone(),
                    final_output: s.final_output,
                    final_output_type: s.final_output_type,
                    pid: r.pid,
                    device: r.device.clone(),
                    max_model_len: r.max_model_len,
                    input_address: inputs[s.stage_id].clone(),
                    ray_node_id: ray_nodes.get(s.stage_id).cloned(),
                }
            })
            .collect();
        let final_stages = config
            .stages
            .iter()
            .filter(|s| s.final_output)
            .map(|s| s.stage_id)
            .collect();
        let inner = Arc::new(Inner {
            config,
            opts,
            sender,
            endpoint,
            state: Mutex::new(State::default()),
            seq: AtomicU64::new(1),
            submissions: AtomicU64::new(0),
            stages,
            final_stages,
            shm_dir: shm_enabled.then_some(shm_dir),
            token,
            on_our_host,
        });
        let event_task = tokio::spawn(event_loop(inner.clone(), msg_rx, sup_rx));
        // A first estimate of every stage's clock before anything is traced
        // (the watchdog's health checks refine it as the pipeline runs).
        futures::future::join_all((0..n).map(|s| {
            let inner = &inner;
            async move {
                for _ in 0..CLOCK_PROBES_AT_START {
                    if inner.probe(s, inner.opts.health_timeout).await.is_err() {
                        break;
                    }
                }
            }
        }))
        .await;
        let watchdog_task = tokio::spawn(watchdog(inner.clone(), supervisor.killer()));
        Ok(Orchestrator {
            inner,
            supervisor: Some(supervisor),
            event_task: Some(event_task),
            recv_task: Some(recv_task),
            watchdog_task: Some(watchdog_task),
            run_dir: run_path,
        })
    }

    /// The stages, in stage order.
    pub fn stages(&self) -> &[StageInfo] {
        &self.inner.stages
    }

    /// A ZMTP peer identity this run's sockets admit (they drop messages
    /// from any other peer), for a tool of the process that started the
    /// pipeline, such as a test, to talk to a stage's input socket as a
    /// peer of the run would. `role` names the peer in logs.
    pub fn peer_identity(&self, role: &str) -> String {
        // Never a stage's own identity: the ROUTER would route that
        // stage's traffic to the newcomer.
        self.inner.token.identity(&format!("tool-{role}"))
    }

    /// The pipeline this orchestrator runs.
    pub fn config(&self) -> &PipelineConfig {
        &self.inner.config
    }

    /// Whether the pipeline can take requests: the stage death or shutdown
    /// that stopped it otherwise (answered at once, from state this
    /// process holds).
    pub fn check_serving(&self) -> Result<()> {
        self.inner.check_alive(&lock(&self.inner.state))
    }

    /// The private run directory (sockets, launch files, shared memory);
    /// removed when the pipeline stops.
    pub fn run_dir(&self) -> &std::path::Path {
        &self.run_dir
    }

    /// Starts a request: sends it to every entry stage and returns a channel
    /// of the final-output stages' streamed outputs; the channel closes after
    /// every final-output stage has finished, or after one error.
    /// `params` holds one `SamplingParams` per stage, in stage order.
    pub async fn submit(
        &self,
        request_id: String,
        prompt: Prompt,
        params: Vec<SamplingParams>,
    ) -> Result<mpsc::Receiver<StageEvent>> {
        let n = self.inner.stages.len();
        if params.len() != n {
            return Err(Error::SamplingParamsCount {
                expected: n,
                got: params.len(),
            });
        }
        for (stage_id, p) in params.iter().enumerate() {
            p.validate().map_err(|e| Error::InvalidSamplingParams {
                stage_id,
                reason: e.to_string(),
            })?;
        }
        let (utx, mut urx) = mpsc::unbounded_channel();
        let n = self.inner.submissions.fetch_add(1, Ordering::Relaxed);
        let wire_id = format!("{request_id}#{n}");
        {
            let mut st = lock(&self.inner.state);
            self.inner.check_alive(&st)?;
            if st.wire_ids.contains_key(&request_id) {
                return Err(Error::RequestIdInUse(request_id));
            }
            st.wire_ids.insert(request_id.clone(), wire_id.clone());
            st.requests.insert(
                wire_id.clone(),
                RequestState {
                    request_id,
                    events: utx,
                    text: HashMap::new(),
                    remaining_final: self.inner.final_stages.clone(),
                },
            );
        }
        let mut prompt = prompt;
        let encoded = wire::detach_media(&mut prompt).and_then(|tensors| {
            let message = Message::Generate(GenerateMsg {
                request_id: wire_id.clone(),
                prompt,
                sampling_params: params,
            });
            wire::encode(&wire::Envelope { message, tensors }, None)
        });
        let frames = match encoded {
            Ok(f) => f,
            Err(e) => {
                lock(&self.inner.state).remove(&wire_id);
                return Err(e);
            }
        };
        for stage_id in self.inner.config.entry_stages() {
            if let Err(e) = self.inner.send(stage_id, frames.clone()).await {
                lock(&self.inner.state).remove(&wire_id);
                return Err(e);
            }
        }
        // The caller's channel is bounded; a pump per request keeps a slow
        // reader from stalling the shared event loop, and aborts the request
        // in every stage when the caller drops its receiver.
        let (tx, rx) = mpsc::channel(self.inner.opts.event_buffer.max(1));
        let inner = self.inner.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = urx.recv() => {
                        let Some(ev) = ev else { break };
                        if tx.send(ev).await.is_err() {
                            let _ = inner.abort_wire(&wire_id).await;
                            break;
                        }
                    }
                    // Noticed at once, not at the next output (which a
                    // request still in a non-final stage may not make for
                    // long).
                    () = tx.closed() => {
                        let _ = inner.abort_wire(&wire_id).await;
                        break;
                    }
                }
            }
        });
        Ok(rx)
    }

    /// Lets go of a request whose caller is gone: its id is free for a new
    /// request as soon as this returns, and the returned future aborts the
    /// old submission (by its own wire id, so a new request that reuses the
    /// id is left alone). For `Drop` impls, which cannot await.
    pub fn release(&self, request_id: &str) -> impl Future<Output = Result<()>> + Send + 'static {
        let wire_id = lock(&self.inner.state).wire_ids.remove(request_id);
        let inner = self.inner.clone();
        async move {
            match wire_id {
                Some(w) => inner.abort_wire(&w).await,
                None => Ok(()),
            }
        }
    }

    /// Aborts a request in every stage; its channel closes. Unknown or
    /// finished ids are not an error (the request may have just finished).
    pub async fn abort(&self, request_id: &str) -> Result<()> {
        self.inner.abort(request_id).await
    }

    /// Asks one stage whether it is alive and how busy it is.
    pub async fn health(&self, stage_id: usize) -> Result<HealthMsg> {
        self.inner.check_stage(stage_id)?;
        match self
            .inner
            .probe(stage_id, self.inner.opts.control_timeout)
            .await?
        {
            Reply::Health(h) => Ok(h),
            Reply::Ack(_) => Err(Error::Wire("health answered with an ack".into())),
        }
    }

    /// How far stage `stage_id`'s trace clock is ahead of this process's,
    /// estimated from health exchanges (at start-up, then every
    /// `health_interval`): the best of the recent ones. `None` for an
    /// unknown stage or before any answer.
    pub fn clock_offset(&self, stage_id: usize) -> Option<ClockOffset> {
        lock(&self.inner.state)
            .clocks
            .get(&stage_id)
            .and_then(ClockSamples::best)
    }

    /// Opens a profiler window in the selected stages (all when `None`),
    /// sending `StartProfile` to all of them at once and returning when every
    /// one has acknowledged. Needs `VLLM_TORCH_PROFILER_DIR`; traces go to
    /// `$VLLM_TORCH_PROFILER_DIR/stage_<id>_<model>/`.
    ///
    /// Errors, before any stage is touched: an unknown stage id; the
    /// directory variable unset; a selected stage already profiling. If a
    /// stage fails to start, the others that started stay recording until
    /// [`stop_profile`](Self::stop_profile).
    pub async fn start_profile(&self, stages: Option<&[usize]>) -> Result<()> {
        let selected: Vec<usize> = match stages {
            Some(ids) => {
                for &id in ids {
                    self.inner.check_stage(id)?;
                }
                let set: BTreeSet<usize> = ids.iter().copied().collect();
                set.into_iter().collect()
            }
            None => (0..self.inner.stages.len()).collect(),
        };
        let root =
            omni_profiler::profiler_dir_from_env().map_err(|e| Error::Profiler(e.to_string()))?;
        let options = omni_profiler::ProfileOptions::from_env()
            .map_err(|e| Error::Profiler(e.to_string()))?;
        let options = serde_json::to_value(options)
            .map_err(|e| Error::Profiler(format!("cannot encode profiler options: {e}")))?;
        {
            let st = lock(&self.inner.state);
            self.inner.check_alive(&st)?;
            if let Some(id) = selected.iter().find(|id| st.profiling.contains(id)) {
                return Err(Error::Profiler(format!(
                    "stage {id} is already profiling; call stop_profile first"
                )));
            }
        }
        let calls = selected.iter().map(|&stage_id| {
            let info = &self.inner.stages[stage_id];
            let dir = omni_profiler::stage_trace_dir(&root, stage_id, &info.model_name);
            let process_name = match &info.model_stage {
                Some(role) => format!("stage {stage_id} ({role}) {}", info.model_name),
                None => format!("stage {stage_id} {}", info.model_name),
            };
            let options = options.clone();
            // Only an offset its own error bound cannot explain: a stage on
            // this host shares our clock, and a noise-sized shift could turn
            // a hand-over's arrow around.
            let clock_offset = self
                .clock_offset(stage_id)
                .filter(|c| c.offset_us.abs() > c.error_us);
            async move {
                let r = self
                    .inner
                    .call(stage_id, "start_profile", move |seq| {
                        Message::StartProfile(StartProfileMsg {
                            seq,
                            dir,
                            process_name,
                            options,
                            clock_offset,
                        })
                    })
                    .await;
                (stage_id, r)
            }
        });
        let results = futures::future::join_all(calls).await;
        let mut first_err = None;
        let mut started = Vec::new();
        for (stage_id, r) in results {
            match r {
                Ok(Reply::Ack(AckMsg { error: None, .. })) => {
                    let dir = omni_profiler::stage_trace_dir(
                        &root,
                        stage_id,
                        &self.inner.stages[stage_id].model_name,
                    );
                    let mut st = lock(&self.inner.state);
                    st.profiling.insert(stage_id);
                    st.trace_dirs.insert((stage_id, dir));
                    started.push(stage_id);
                }
                Ok(Reply::Ack(AckMsg { error: Some(e), .. })) => {
                    first_err.get_or_insert(Error::Stage {
                        stage_id,
                        message: format!("start_profile: {e}"),
                    });
                }
                Ok(Reply::Health(_)) => {
                    first_err.get_or_insert(Error::Wire(
                        "start_profile answered with a health reply".into(),
                    ));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            None => Ok(()),
            // Say what the caller now has to close.
            Some(Error::Stage { stage_id, message }) if !started.is_empty() => Err(Error::Stage {
                stage_id,
                message: format!(
                    "{message} (stages {started:?} did start and record until stop_profile)"
                ),
            }),
            Some(e) => Err(e),
        }
    }

    /// Closes the profiler window of every stage that is recording, waits
    /// until each has written its trace, and returns the files per stage.
    /// Without a window open it returns an empty map (and touches nothing).
    pub async fn stop_profile(&self) -> Result<BTreeMap<usize, Vec<PathBuf>>> {
        let selected: Vec<usize> = {
            let st = lock(&self.inner.state);
            self.inner.check_alive(&st)?;
            st.profiling.iter().copied().collect()
        };
        let calls = selected.iter().map(|&stage_id| async move {
            let r = self
                .inner
                .call(stage_id, "stop_profile", |seq| Message::StopProfile { seq })
                .await;
            (stage_id, r)
        });
        let results = futures::future::join_all(calls).await;
        let mut files = BTreeMap::new();
        let mut first_err = None;
        for (stage_id, r) in results {
            // A stage that answered is done with its window (or had none);
            // one that did not may still record: it stays marked, so a
            // later stop_profile asks it again.
            if matches!(r, Ok(Reply::Ack(_))) {
                lock(&self.inner.state).profiling.remove(&stage_id);
            }
            match r {
                Ok(Reply::Ack(AckMsg {
                    error: None,
                    files: f,
                    ..
                })) => {
                    files.insert(stage_id, f);
                }
                Ok(Reply::Ack(AckMsg { error: Some(e), .. })) => {
                    first_err.get_or_insert(Error::Stage {
                        stage_id,
                        message: format!("stop_profile: {e}"),
                    });
                }
                Ok(Reply::Health(_)) => {
                    first_err.get_or_insert(Error::Wire(
                        "stop_profile answered with a health reply".into(),
                    ));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(files), Err)
    }

    /// Sends `Shutdown` to every stage, waits for them to exit (killing any
    /// that outlive the grace period), and removes the run directory.
    pub async fn shutdown(mut self) -> Result<()> {
        let dead = {
            let mut st = lock(&self.inner.state);
            st.shutting_down = true;
            // Every caller still waiting gets an error, not a silent hang.
            st.fail_all(|| Error::ShutDown(": shut down with this request in flight".into()));
            st.dead.clone()
        };
        if let Some(mut sup) = self.supervisor.take() {
            // Tell the supervisor first, so exits that follow count as expected.
            sup.stop(self.inner.opts.shutdown_grace, false);
            if dead.is_none() {
                let frames = wire::encode_message(Message::Shutdown)?;
                for s in 0..self.inner.stages.len() {
                    let _ = self.inner.send(s, frames.clone()).await;
                }
            }
            tokio::task::spawn_blocking(move || sup.join())
                .await
                .map_err(|e| Error::ShutDown(format!(": supervisor thread failed: {e}")))?;
            self.remove_unfinished_traces();
        }
        self.stop_tasks();
        Ok(())
    }

    /// Once every stage has exited: the temporary files of traces a stage
    /// was killed while writing (its window is lost; no half file may stay).
    fn remove_unfinished_traces(&self) {
        let dirs = std::mem::take(&mut lock(&self.inner.state).trace_dirs);
        for (stage_id, dir) in dirs {
            // A pid names a process of this host only: the temporaries of a
            // stage on another node are on that node's disk, and a pid
            // there may be a live writer's here.
            if !self.inner.on_our_host[stage_id] {
                continue;
            }
            for f in omni_profiler::remove_unfinished(&dir, self.inner.stages[stage_id].pid) {
                tracing::warn!(target: "omni::runtime", stage_id, file = %f.display(), "removed a trace the stage did not finish writing");
            }
        }
    }

    fn stop_tasks(&mut self) {
        if let Some(t) = self.watchdog_task.take() {
            t.abort();
        }
        if let Some(t) = self.event_task.take() {
            t.abort();
        }
        if let Some(t) = self.recv_task.take() {
            t.abort();
        }
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        if let Some(mut sup) = self.supervisor.take() {
            let mut st = lock(&self.inner.state);
            st.shutting_down = true;
            st.fail_all(|| Error::ShutDown(": dropped with this request in flight".into()));
            drop(st);
            // No runtime may be available in Drop; SIGTERM is the worker's
            // Shutdown (it finishes the same way).
            sup.stop(self.inner.opts.shutdown_grace, true);
            sup.join();
            self.remove_unfinished_traces();
        }
        self.stop_tasks();
    }
}

impl Inner {
    fn check_alive(&self, st: &State) -> Result<()> {
        if let Some((stage_id, status)) = &st.dead {
            return Err(Error::StageDied {
                stage_id: *stage_id,
                status: status.clone(),
            });
        }
        if st.shutting_down {
            return Err(Error::ShutDown(String::new()));
        }
        Ok(())
    }

    fn check_stage(&self, stage_id: usize) -> Result<()> {
        if stage_id < self.stages.len() {
            Ok(())
        } else {
            Err(Error::UnknownStage {
                stage_id,
                known: self.config.stage_ids(),
            })
        }
    }

    async fn send(&self, stage_id: usize, frames: Vec<Bytes>) -> Result<()> {
        let identity = Bytes::from(self.token.identity(&transport::stage_role(stage_id)));
        let mut sender = self.sender.clone();
        transport::send_frames(&mut sender, Some(identity), frames, &self.endpoint).await
    }

    async fn abort(&self, request_id: &str) -> Result<()> {
        let wire_id = lock(&self.state).wire_ids.get(request_id).cloned();
        match wire_id {
            Some(w) => self.abort_wire(&w).await,
            None => Ok(()),
        }
    }

    /// Aborts one submission; a later request that reuses its caller's id is
    /// another submission and is left alone.
    async fn abort_wire(&self, wire_id: &str) -> Result<()> {
        let known = lock(&self.state).remove(wire_id).is_some();
        if !known {
            return Ok(());
        }
        let frames = wire::encode_message(Message::Abort {
            request_ids: vec![wire_id.to_string()],
        })?;
        // Every stage at once, each bounded: one that cannot be reached (or
        // is stopped) holds up neither the others nor the caller.
        let sends = (0..self.stages.len()).map(|s| {
            let frames = frames.clone();
            async move {
                match tokio::time::timeout(self.opts.health_timeout, self.send(s, frames)).await {
                    Ok(r) => r,
                    Err(_) => Err(Error::Timeout {
                        stage_id: s,
                        what: "abort",
                        timeout: self.opts.health_timeout,
                    }),
                }
            }
        });
        let results = futures::future::join_all(sends).await;
        results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
    }

    async fn call(
        &self,
        stage_id: usize,
        what: &'static str,
        build: impl FnOnce(u64) -> Message,
    ) -> Result<Reply> {
        self.call_within(stage_id, what, build, self.opts.control_timeout)
            .await
    }

    /// [`Inner::call`] with its own timeout. The pending entry goes with the
    /// call however it ends, a cancelled (dropped) call included.
    async fn call_within(
        &self,
        stage_id: usize,
        what: &'static str,
        build: impl FnOnce(u64) -> Message,
        timeout: Duration,
    ) -> Result<Reply> {
        struct Forget<'a>(&'a Inner, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                lock(&self.0.state).pending.remove(&self.1);
            }
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = lock(&self.state);
            self.check_alive(&st)?;
            st.pending.insert(seq, Pending { tx });
        }
        let _forget = Forget(self, seq);
        let frames = wire::encode_message(build(seq))?;
        // The send counts too: a stopped stage's full socket would hold it.
        let exchange = async {
            self.send(stage_id, frames).await?;
            rx.await
                .unwrap_or_else(|_| Err(Error::ShutDown(String::new())))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                stage_id,
                what,
                timeout,
            }),
        }
    }

    /// A health exchange with `stage_id` that also estimates its clock's
    /// offset from ours (see [`ClockOffset::from_exchange`]).
    async fn probe(&self, stage_id: usize, timeout: Duration) -> Result<Reply> {
        let sent = omni_profiler::now_unix_us();
        let r = self
            .call_within(stage_id, "health", |seq| Message::Health { seq }, timeout)
            .await;
        let received = omni_profiler::now_unix_us();
        if let Ok(Reply::Health(h)) = &r {
            if h.clock_us > 0.0 && h.clock_us.is_finite() {
                lock(&self.state)
                    .clocks
                    .entry(stage_id)
                    .or_default()
                    .push(ClockOffset::from_exchange(sent, h.clock_us, received));
            }
        }
        r
    }

    fn stage_type(&self, stage_id: usize) -> FinalOutputType {
        self.stages
            .get(stage_id)
            .map(|s| s.final_output_type)
            .unwrap_or(FinalOutputType::Text)
    }

    /// Routes one decoded message from a worker.
    fn dispatch(&self, identity: &[u8], env: Envelope, pending_aborts: &mut Vec<String>) {
        let Envelope { message, tensors } = env;
        let mut st = lock(&self.state);
        match message {
            Message::Output(o) => {
                let finished;
                {
                    let Some(req) = st.requests.get_mut(&o.request_id) else {
                        return; // aborted or failed meanwhile
                    };
                    let acc = req.text.entry(o.stage_id).or_default();
                    acc.text.push_str(&o.delta_text);
                    acc.token_ids.extend_from_slice(&o.delta_token_ids);
                    if let Some(lps) = o.delta_logprobs {
                        Arc::make_mut(acc.logprobs.get_or_insert_with(Default::default))
                            .extend(lps);
                    }
                    let out = StageOutput {
                        request_id: req.request_id.clone(),
                        stage_id: o.stage_id,
                        final_output_type: self.stage_type(o.stage_id),
                        text: acc.text.clone(),
                        delta_text: o.delta_text,
                        token_ids: acc.token_ids.clone(),
                        delta_token_ids: o.delta_token_ids,
                        finished: o.finished,
                        finish_reason: o.finish_reason,
                        stop_reason: o.stop_reason,
                        logprobs: acc.logprobs.clone(),
                        prompt_logprobs: o.prompt_logprobs.map(Box::new),
                        metrics: o.metrics,
                        tensors,
                    };
                    let _ = req.events.send(StageEvent::Output {
                        stage_id: o.stage_id,
                        output: Box::new(out),
                    });
                    if o.finished {
                        req.remaining_final.remove(&o.stage_id);
                    }
                    finished = req.remaining_final.is_empty()
                        || (o.finished && o.finish_reason == Some(FinishReason::Abort));
                }
                if finished {
                    st.remove(&o.request_id);
                    // With streamed edges a final stage can finish while a
                    // stage before it still works on the request (code2wav
                    // done at a codec pad, the talker not yet stopped):
                    // nothing it makes is wanted any more.
                    if !self.config.runtime.edges.is_empty() {
                        pending_aborts.push(o.request_id.clone());
                    }
                }
            }
            Message::RequestError {
                request_id,
                stage_id,
                message,
                rejected,
            } => {
                if let Some(req) = st.remove(&request_id) {
                    let e = if rejected {
                        Error::RequestRejected {
                            stage_id,
                            request_id: req.request_id.clone(),
                            message,
                        }
                    } else {
                        Error::Stage {
                            stage_id,
                            message: format!("request `{}`: {message}", req.request_id),
                        }
                    };
                    let _ = req.events.send(StageEvent::Error(e));
                    pending_aborts.push(request_id);
                }
            }
            Message::Ack(a) => {
                if let Some(p) = st.pending.remove(&a.seq) {
                    let _ = p.tx.send(Ok(Reply::Ack(a)));
                }
            }
            Message::HealthReply(h) => {
                if let Some(p) = st.pending.remove(&h.seq) {
                    let _ = p.tx.send(Ok(Reply::Health(h)));
                }
            }
            Message::ProtocolError {
                stage_id,
                seq,
                reason,
            } => {
                tracing::warn!(target: "omni::runtime", stage_id, "stage rejected a message: {reason}");
                if let Some(p) = seq.and_then(|s| st.pending.remove(&s)) {
                    let _ = p.tx.send(Err(Error::Stage {
                        stage_id,
                        message: format!("rejected the command: {reason}"),
                    }));
                }
            }
            Message::Ready(r) => {
                tracing::warn!(target: "omni::runtime", stage_id = r.stage_id, "unexpected second ready; ignored");
            }
            other => {
                tracing::warn!(target: "omni::runtime", from = %String::from_utf8_lossy(identity), kind = other.type_name(), "unexpected message from a stage; ignored");
            }
        }
    }

    /// A stage died while the pipeline ran: fail everything in flight.
    fn stage_died(&self, stage_id: usize, status: String) {
        let mut st = lock(&self.state);
        if st.shutting_down || st.dead.is_some() {
            return;
        }
        st.dead = Some((stage_id, status.clone()));
        st.fail_all(|| Error::StageDied {
            stage_id,
            status: status.clone(),
        });
        tracing::error!(target: "omni::runtime", stage_id, %status, "stage died; failed every request in flight");
    }
}

/// Checks every stage's health every `health_interval` while the pipeline
/// serves. A stage that does not answer within `health_timeout` (a stopped
/// or wedged process) or whose model thread is stuck on one round past
/// `step_timeout` is killed with the reason: its exit then fails every
/// request in flight as any stage death does, and shutdown stays clean.
async fn watchdog(inner: Arc<Inner>, killer: crate::supervisor::StageKiller) {
    let mut tick = tokio::time::interval(inner.opts.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if inner.check_alive(&lock(&inner.state)).is_err() {
            return;
        }
        let checks = (0..inner.stages.len()).map(|s| {
            let inner = &inner;
            async move {
                let r = inner.probe(s, inner.opts.health_timeout).await;
                (s, r)
            }
        });
        for (stage_id, r) in futures::future::join_all(checks).await {
            let step_limit = inner.opts.step_timeout.as_millis() as u64;
            let reason = match r {
                Err(Error::Timeout { timeout, .. }) => format!(
                    "stage {stage_id} did not answer a health check within {timeout:?} \
                     (stopped or hung)"
                ),
                Ok(Reply::Health(h)) if h.model_busy_ms > step_limit => format!(
                    "stage {stage_id}'s model thread has been on one step for {} s (more than \
                     the step timeout of {:?})",
                    h.model_busy_ms / 1000,
                    inner.opts.step_timeout
                ),
                _ => continue,
            };
            // Not while the pipeline is stopping: its grace decides then.
            if inner.check_alive(&lock(&inner.state)).is_err() {
                return;
            }
            killer.kill(stage_id, reason);
        }
    }
}

async fn event_loop(
    inner: Arc<Inner>,
    mut msgs: mpsc::Receiver<(Bytes, Vec<Bytes>)>,
    mut sup: mpsc::UnboundedReceiver<SupervisorEvent>,
) {
    // Final outputs may carry shared-memory tensors from stages on this host.
    let ctx = DecodeContext {
        shm_dir: inner.shm_dir.clone(),
        ..Default::default()
    };
    let mut sup_open = true;
    let mut msgs_open = true;
    while sup_open || msgs_open {
        tokio::select! {
            m = msgs.recv(), if msgs_open => {
                let Some((identity, frames)) = m else {
                    msgs_open = false;
                    continue;
                };
                match wire::decode(frames, &ctx) {
                    Ok(env) => {
                        let mut aborts = Vec::new();
                        inner.dispatch(&identity, env, &mut aborts);
                        for id in aborts {
                            if let Ok(frames) = wire::encode_message(Message::Abort { request_ids: vec![id] }) {
                                for s in 0..inner.stages.len() {
                                    let _ = inner.send(s, frames.clone()).await;
                                }
                            }
                        }
                    }
                    Err(rej) => {
                        tracing::warn!(target: "omni::runtime", from = %String::from_utf8_lossy(&identity), "bad message from a stage: {}", rej.error);
                        if let Some(id) = rej.request_id {
                            let mut st = lock(&inner.state);
                            if let Some(req) = st.remove(&id) {
                                let _ = req.events.send(StageEvent::Error(Error::Wire(rej.error)));
                            }
                        }
                    }
                }
            }
            ev = sup.recv(), if sup_open => {
                match ev {
                    Some(SupervisorEvent::Exited { stage_id, status, expected }) => {
                        if !expected {
                            inner.stage_died(stage_id, status);
                        }
                    }
                    Some(SupervisorEvent::AllExited) | None => sup_open = false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three_stages(cpu_threads: CpuThreads, devices: [Option<&str>; 3]) -> PipelineConfig {
        let mut config = PipelineConfig::builtin("qwen2_5_omni").expect("built-in pipeline");
        config.runtime.cpu_threads = cpu_threads;
        for (s, d) in config.stages.iter_mut().zip(devices) {
            s.runtime.devices = d.map(str::to_owned);
        }
        config
    }

    #[test]
    fn split_divides_the_cores_among_the_cpu_stages() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let user_set = std::env::var_os("OMP_NUM_THREADS").is_some();
        let expect = |n: usize| (!user_set).then_some(n);
        let all_cpu = three_stages(CpuThreads::Split, [None, Some("cpu"), None]);
        assert_eq!(cpu_thread_share(&all_cpu, &[]), expect((cores / 3).max(1)));
        // Stages on a GPU do not take a share of the host's cores.
        let one_cpu = three_stages(CpuThreads::Split, [Some("cuda:0"), Some("cuda:1"), None]);
        assert_eq!(cpu_thread_share(&one_cpu, &[]), expect(cores));
        // `all`, or the user's OMP_NUM_THREADS, leave libtorch its default.
        let all = three_stages(CpuThreads::All, [None, None, None]);
        assert_eq!(cpu_thread_share(&all, &[]), None);
        let env = [("OMP_NUM_THREADS".to_owned(), "4".to_owned())];
        assert_eq!(cpu_thread_share(&all_cpu, &env), None);
    }

    #[test]
    fn pools_oversubscribe_when_wider_than_the_cores_together() {
        // Two or three pools as wide as the machine.
        assert!(pools_oversubscribe(&[2, 2], 2));
        assert!(pools_oversubscribe(&[8, 8, 8], 8));
        // One pool has nobody to take turns with.
        assert!(!pools_oversubscribe(&[8], 8));
        // Single threads run at once, however many.
        assert!(!pools_oversubscribe(&[1, 1, 1], 2));
        // Pools that fit side by side run at once.
        assert!(!pools_oversubscribe(&[2, 1, 1], 4));
        assert!(pools_oversubscribe(&[2, 1, 1], 3));
    }

    #[test]
    fn only_all_counts_the_cpu_stages_pools() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let omp = |n: usize| [("OMP_NUM_THREADS".to_owned(), n.to_string())];
        let all = three_stages(CpuThreads::All, [None, None, None]);
        assert_eq!(cpu_turns_needed(&all, &omp(cores)), cores > 1);
        assert!(!cpu_turns_needed(&all, &omp(1)));
        // Stages on a GPU have no pool on the host.
        let one = three_stages(CpuThreads::All, [Some("cuda:0"), Some("cuda:0"), None]);
        assert!(!cpu_turns_needed(&one, &omp(cores)));
        // The stages' own `num_threads` wins over OMP_NUM_THREADS.
        let mut own = three_stages(CpuThreads::All, [None, None, None]);
        for s in &mut own.stages {
            s.engine_args.num_threads = Some(1);
        }
        assert!(!cpu_turns_needed(&own, &omp(cores.max(2))));
        // `split` already divides the cores.
        let split = three_stages(CpuThreads::Split, [None, None, None]);
        assert!(!cpu_turns_needed(&split, &omp(cores.max(2))));
    }
}
