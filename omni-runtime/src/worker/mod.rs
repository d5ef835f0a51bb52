//! The stage worker (`omni-stage`): one process per stage.
//!
//! Start-up: read the launch spec, start the model thread (it loads the
//! engine), meanwhile connect a DEALER to the orchestrator, bind the input
//! ROUTER, connect a DEALER to every downstream stage; when all is done,
//! send `Ready{stage_id, model_name, pid, device, protocol_version}`.
//!
//! Serving: this (socket) thread runs a small tokio runtime; it decodes
//! messages and passes them to the model thread through a bounded queue,
//! answers `Health` itself, and sends what the model thread hands back:
//! final outputs to the orchestrator, stage outputs directly to the
//! downstream stages. A message it cannot decode gets a `ProtocolError`
//! reply and changes nothing else.
//!
//! Exit: on `Shutdown`, on SIGTERM (also what the parent-death signal sends),
//! or when `getppid()` shows the orchestrator is gone; a worker that outlives
//! its orchestrator also removes the run directory nobody else will.

mod model;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use zeromq::{DealerSendHalf, DealerSocket, RouterSendHalf, RouterSocket, Socket, SocketRecv};

use crate::config::StageConfig;
use crate::cpu_turn::CpuTurn;
use crate::error::{Error, Result};
use crate::launch::LaunchSpec;
use crate::processor;
use crate::shm::ShmWriter;
use crate::transport::{self, send_frames, RunToken};
use crate::wire::{
    self, DecodeContext, Envelope, HealthMsg, Message, ReadyMsg, Rejected, PROTOCOL_VERSION,
};

use model::{mono_us, now_us, FromModel, ModelThread, StageCounters, ToModel};

/// How often the worker checks that its orchestrator is still its parent.
const PARENT_CHECK: Duration = Duration::from_millis(250);

/// How long the model thread gets to wind down (and flush a trace) at exit,
/// unless the launch file says (the orchestrator's grace, which must not run
/// out first).
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Installs the worker's `tracing` subscriber: logs to stderr (filtered by
/// `RUST_LOG`, default `info`) and the profiler layer, which turns engine
/// and runtime spans into ranges of whichever profiler backend is active.
pub fn init_worker_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_filter(filter);
    let _ = tracing_subscriber::registry()
        .with(omni_profiler::tracing_layer())
        .with(fmt)
        .try_init();
}

/// The whole `omni-stage` program: parses `--launch FILE`, installs the
/// tracing subscriber, runs the worker, and exits with 0 after a clean
/// shutdown, 1 on an error (printed to stderr), 2 on bad arguments. A
/// custom worker binary (e.g. one that registers its own profiler backend
/// first) can end its `main` with this.
pub fn stage_main() -> ! {
    let mut args = std::env::args_os().skip(1);
    let launch = match (args.next(), args.next(), args.next()) {
        (Some(flag), Some(path), None) if flag == "--launch" => std::path::PathBuf::from(path),
        (Some(flag), None, None) if flag == "--version" => {
            println!(
                "omni-stage {} (wire protocol {PROTOCOL_VERSION})",
                env!("CARGO_PKG_VERSION")
            );
            std::process::exit(0);
        }
        _ => {
            eprintln!("usage: omni-stage --launch FILE   (started by the Omni orchestrator)");
            std::process::exit(2);
        }
    };
    init_worker_tracing();
    let code = match run_stage_worker(&launch) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("omni-stage: error: {e}");
            1
        }
    };
    // Detached helper threads (a stuck model step, library threads) must
    // not keep the process alive after the stage has stopped.
    std::process::exit(code);
}

/// Dies (SIGTERM) with the process that started this one, and takes the
/// signals its parent may have blocked. The local supervisor asks for the
/// same between fork and exec; a Ray actor cannot (Python code between fork
/// and exec is unsafe in its many-threaded process), so the stage asks
/// itself, before any other thread exists; the parent check that follows
/// covers a parent that died first.
fn die_with_parent() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on this thread's own mask and this process.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGTERM as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            tracing::warn!(target: "omni::runtime", "cannot ask for a parent-death signal: {}", std::io::Error::last_os_error());
        }
    }
}

/// Test-only: skews some stages' trace clocks, as if they ran on hosts
/// whose clocks are off: `stage:microseconds[,stage:microseconds...]`.
pub const TEST_CLOCK_SKEW_ENV: &str = "OMNI_TEST_CLOCK_SKEW_US";

/// This stage's skew from [`TEST_CLOCK_SKEW_ENV`], if it names the stage.
fn test_clock_skew(stage_id: usize) -> Result<Option<i64>> {
    let Ok(text) = std::env::var(TEST_CLOCK_SKEW_ENV) else {
        return Ok(None);
    };
    for item in text.split(',').filter(|i| !i.trim().is_empty()) {
        let parsed = item.split_once(':').and_then(|(s, us)| {
            Some((
                s.trim().parse::<usize>().ok()?,
                us.trim().parse::<i64>().ok()?,
            ))
        });
        match parsed {
            Some((s, us)) if s == stage_id => return Ok(Some(us)),
            Some(_) => {}
            None => {
                return Err(Error::Config {
                    file: "environment".into(),
                    field: TEST_CLOCK_SKEW_ENV.into(),
                    value: format!("{item:?}"),
                    reason: "expected stage:microseconds".into(),
                })
            }
        }
    }
    Ok(None)
}

/// Runs a stage worker from its launch file until it is told to stop.
/// This is all `omni-stage` does; a custom worker binary can call it too.
pub fn run_stage_worker(launch_file: &Path) -> Result<()> {
    let spec = LaunchSpec::read(launch_file)?;
    let stage = StageConfig::from_json(&launch_file.display().to_string(), "stage", &spec.stage)?;
    die_with_parent();
    // The orchestrator may have died before we got here; PR_SET_PDEATHSIG
    // would then never fire.
    if parent_gone(spec.parent_pid) {
        // Nobody else is left to remove the run directory.
        let _ = std::fs::remove_dir_all(&spec.run_dir);
        return Err(Error::ShutDown(format!(
            ": orchestrator (pid {}) is gone",
            spec.parent_pid
        )));
    }
    if let Some(skew) = test_clock_skew(stage.stage_id)? {
        tracing::warn!(target: "omni::runtime", stage_id = stage.stage_id, skew_us = skew, "{TEST_CLOCK_SKEW_ENV} is set: this stage's trace clock is skewed on purpose (tests only)");
        omni_profiler::set_clock_skew_for_tests(skew);
    }
    if spec.profiler_backend == "torch" {
        // Here, on the main thread, before any other exists: Kineto runs
        // its start-up only on the thread that loaded libtorch.
        if let Err(e) = omni_profiler::init_main_thread() {
            tracing::warn!("stage {}: {e}", stage.stage_id);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("omni-stage-{}-io", stage.stage_id))
        .enable_all()
        .build()
        .map_err(|e| Error::io("cannot start the tokio runtime", launch_file, e))?;
    let handle = runtime.handle().clone();
    let (parent, run_dir) = (spec.parent_pid, spec.run_dir.clone());
    let r = runtime.block_on(async {
        let r = serve(spec, stage, handle).await;
        // Set-up can also fail *because* the orchestrator died (its socket
        // refused a connect) before its death signal reached the guard in
        // `serve`: the directory is then ours to remove, as the guard's.
        if r.is_err() && orphaned_after_signal(parent, Duration::from_secs(3)).await {
            let _ = std::fs::remove_dir_all(&run_dir);
        }
        r
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    r
}

fn parent_gone(parent: u32) -> bool {
    // SAFETY: getppid has no preconditions.
    (unsafe { libc::getppid() }) as u32 != parent
}

enum Incoming {
    Control(Vec<Bytes>),
    Input(Bytes, Vec<Bytes>),
    Downstream(usize, Vec<Bytes>),
}

struct Io {
    stage_id: usize,
    ctrl: DealerSendHalf,
    ctrl_endpoint: String,
    input: RouterSendHalf,
    input_endpoint: String,
    downstream: HashMap<usize, (DealerSendHalf, String)>,
    to_model: mpsc::Sender<ToModel>,
    rejected: Arc<AtomicU64>,
    counters: Arc<StageCounters>,
    profiling: Arc<AtomicBool>,
}

async fn serve(spec: LaunchSpec, stage: StageConfig, handle: tokio::runtime::Handle) -> Result<()> {
    let stage_id = stage.stage_id;
    // Watch SIGTERM from the start, connects and the model's load
    // included: the death signal of an orchestrator killed meanwhile would
    // otherwise end this process before it removes the run directory nobody
    // else will. Until the stage is ready a signal ends the process here.
    let setup_guard = {
        let (mut term, mut int) = watch_stop_signals()?;
        let (parent, run_dir) = (spec.parent_pid, spec.run_dir.clone());
        tokio::spawn(async move {
            // Also an orchestrator gone without a signal reaching us.
            let orphaned = async {
                while !parent_gone(parent) {
                    tokio::time::sleep(PARENT_CHECK).await;
                }
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                () = orphaned => {}
            }
            tracing::info!(target: "omni::runtime", stage_id, "signal before ready: stopping");
            // A killed orchestrator's exit (unmapping a loaded libtorch) can
            // take seconds on a busy machine; nobody waits on this stage yet.
            if orphaned_after_signal(parent, Duration::from_secs(3)).await {
                let _ = std::fs::remove_dir_all(&run_dir);
            }
            std::process::exit(0);
        })
    };
    // Before this process opens anything else: the input socket it inherited.
    let inherited = spec
        .input_listener_fd
        .map(|fd| transport::inherited_listener(fd, &spec.input_address))
        .transpose()?;
    let pid = std::process::id();
    let profiler = omni_profiler::backend_by_name(&spec.profiler_backend)
        .map_err(|e| Error::Profiler(e.to_string()))?;
    let shm = match (&spec.shm_dir, spec.shm_threshold_bytes) {
        (Some(d), Some(t)) => Some(Arc::new(ShmWriter::new(
            d.clone(),
            &format!("s{stage_id}-{pid}"),
            t,
        ))),
        _ => None,
    };
    let (to_model, to_model_rx) = mpsc::channel(1024);
    // Unbounded by design: the model thread never blocks handing its
    // outputs over, so it cannot wait on a socket loop that waits on it
    // (the socket loop awaits room in `to_model`). It grows only while the
    // sockets cannot take what the engine makes (a peer that stopped
    // reading); the requests in flight, which the server bounds, bound it.
    let (from_model_tx, mut from_model) = mpsc::unbounded_channel();
    let counters = Arc::new(StageCounters::default());
    let profiling = Arc::new(AtomicBool::new(false));
    let mut args = stage.engine_args.clone();
    if let Some(d) = &stage.runtime.devices {
        args.device = Some(d.clone());
    }
    if args.num_threads.is_none() && matches!(args.resolve_device(), Ok(tch::Device::Cpu)) {
        args.num_threads = spec.cpu_threads;
    }
    tracing::info!(target: "omni::runtime", stage_id, threads = ?args.num_threads, "intra-op threads (none: libtorch's default)");
    let model = ModelThread {
        stage_id,
        model_stage: stage.model_stage.clone(),
        final_output: stage.final_output,
        sources: stage.engine_input_source.clone(),
        downstream: spec.downstream.iter().map(|(d, _)| *d).collect(),
        streams: spec.streams.clone(),
        processor: processor::for_stage(stage.custom_process_input_func.as_deref())?,
        shm: shm.clone(),
        out: from_model_tx,
        profiler,
        runtime: handle,
        counters: counters.clone(),
        profiling: profiling.clone(),
        cpu_turn: match &spec.cpu_turn {
            Some(path) if matches!(args.resolve_device(), Ok(tch::Device::Cpu)) => {
                tracing::info!(target: "omni::runtime", stage_id, "taking turns with this host's other CPU stages, a step at a time: their threads together exceed its cores");
                Some(CpuTurn::open(path)?)
            }
            Some(_) | None => None,
        },
    };
    let model_thread = std::thread::Builder::new()
        .name(format!("omni-stage-{stage_id}-model"))
        .spawn(move || model.run(args, to_model_rx))
        .map_err(|e| Error::io("cannot start the model thread", "omni-stage", e))?;

    // Sockets, while the model loads.
    let connect_timeout = Duration::from_millis(spec.connect_timeout_ms.max(1000));
    let (incoming_tx, mut incoming) = mpsc::channel::<Incoming>(1024);
    let mut opts = transport::socket_options();
    let token = RunToken::parse(&spec.token)?;
    let identity = token
        .identity(&transport::stage_role(stage_id))
        .parse()
        .map_err(|e| Error::socket(&spec.orchestrator_address, e))?;
    opts.peer_identity(identity)
        .connect_timeout(connect_timeout);
    let mut ctrl = DealerSocket::with_options(opts);
    ctrl.connect(&spec.orchestrator_address)
        .await
        .map_err(|e| Error::socket(&spec.orchestrator_address, e))?;
    let (ctrl_tx, mut ctrl_rx) = ctrl.split();
    let tx = incoming_tx.clone();
    tokio::spawn(async move {
        while let Ok(m) = ctrl_rx.recv().await {
            if tx.send(Incoming::Control(m.into_vec())).await.is_err() {
                break;
            }
        }
    });

    let mut input = RouterSocket::with_options(transport::socket_options());
    let bound = match inherited {
        Some(listener) => input.bind_listener(listener).await,
        None => input.bind(&spec.input_address).await,
    };
    let input_endpoint = bound
        .map_err(|e| Error::socket(&spec.input_address, e))?
        .to_string();
    let (input_tx, mut input_rx) = input.split();
    let tx = incoming_tx.clone();
    let (input_token, refused_at) = (token.clone(), input_endpoint.clone());
    tokio::spawn(async move {
        let refusals = transport::Refusals::default();
        while let Ok(m) = input_rx.recv().await {
            let mut frames = m.into_vec();
            if frames.is_empty() {
                continue;
            }
            let id = frames.remove(0);
            if input_token.role_of(&id).is_none() {
                refusals.refuse(&refused_at, &id);
                continue;
            }
            if tx.send(Incoming::Input(id, frames)).await.is_err() {
                break;
            }
        }
    });

    let mut downstream = HashMap::new();
    for (d, addr) in &spec.downstream {
        let mut o = transport::socket_options();
        let upstream = token
            .identity(&format!("stage-{stage_id}-to-{d}"))
            .parse()
            .map_err(|e| Error::socket(addr, e))?;
        o.connect_timeout(connect_timeout).peer_identity(upstream);
        let mut s = DealerSocket::with_options(o);
        s.connect(addr)
            .await
            .map_err(|e| Error::socket(addr, format!("cannot reach stage {d}: {e}")))?;
        let (send, mut recv) = s.split();
        let tx = incoming_tx.clone();
        let d = *d;
        tokio::spawn(async move {
            while let Ok(m) = recv.recv().await {
                if tx
                    .send(Incoming::Downstream(d, m.into_vec()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        downstream.insert(d, (send, addr.clone()));
    }
    drop(incoming_tx);

    let mut io = Io {
        stage_id,
        ctrl: ctrl_tx,
        ctrl_endpoint: spec.orchestrator_address.clone(),
        input: input_tx,
        input_endpoint,
        downstream,
        to_model,
        rejected: Arc::new(AtomicU64::new(0)),
        counters,
        profiling,
    };
    let ctx = DecodeContext {
        shm_dir: spec.shm_dir.clone(),
        ..Default::default()
    };

    let (model_name, device, max_model_len) = match from_model.recv().await {
        Some(FromModel::Loaded {
            model_name,
            device,
            max_model_len,
        }) => (model_name, device, max_model_len),
        Some(FromModel::LoadFailed(e)) => {
            tracing::error!(target: "omni::runtime", stage_id, "{e}");
            let _ = model_thread.join();
            return Err(Error::Stage {
                stage_id,
                message: e,
            });
        }
        _ => {
            return Err(Error::Stage {
                stage_id,
                message: "the model thread ended before loading".into(),
            })
        }
    };
    // The serving loop watches the signals from here on (watched before the
    // guard goes, so none falls between the two).
    let (mut sigterm, mut sigint) = watch_stop_signals()?;
    setup_guard.abort();
    let ready = Message::Ready(ReadyMsg {
        stage_id,
        model_name: model_name.clone(),
        pid,
        device: device.clone(),
        protocol_version: PROTOCOL_VERSION,
        max_model_len,
    });
    io.send_ctrl(wire::encode_message(ready)?).await?;
    tracing::info!(target: "omni::runtime", stage_id, model = %model_name, %device, "stage ready");

    let mut parent_check = tokio::time::interval(PARENT_CHECK);
    let mut stopping: Option<tokio::time::Instant> = None;
    let mut orphaned = false;
    let mut by_signal = false;
    let stop_grace = match spec.stop_grace_ms {
        0 => STOP_GRACE,
        ms => Duration::from_millis(ms),
    };
    loop {
        let stop_deadline =
            stopping.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400));
        tokio::select! {
            inc = incoming.recv(), if stopping.is_none() => {
                match inc {
                    Some(inc) => {
                        if io.incoming(inc, &ctx).await {
                            stopping = Some(begin_stop(&io, stop_grace).await);
                        }
                    }
                    None => stopping = Some(begin_stop(&io, stop_grace).await),
                }
            }
            out = from_model.recv() => match out {
                Some(FromModel::ToOrchestrator(f)) => {
                    if let Err(e) = io.send_ctrl(f).await {
                        tracing::warn!(target: "omni::runtime", stage_id, "{e}");
                    }
                }
                Some(FromModel::ToStage(d, f)) => io.send_stage(d, f).await,
                Some(FromModel::Stopped) | None => break,
                Some(FromModel::Loaded { .. }) | Some(FromModel::LoadFailed(_)) => {}
            },
            _ = sigterm.recv(), if stopping.is_none() => {
                tracing::info!(target: "omni::runtime", stage_id, "SIGTERM: shutting down");
                orphaned = parent_gone(spec.parent_pid);
                by_signal = true;
                stopping = Some(begin_stop(&io, stop_grace).await);
            }
            _ = sigint.recv(), if stopping.is_none() => {
                orphaned = parent_gone(spec.parent_pid);
                by_signal = true;
                stopping = Some(begin_stop(&io, stop_grace).await);
            }
            _ = parent_check.tick() => {
                if stopping.is_none() && parent_gone(spec.parent_pid) {
                    tracing::warn!(target: "omni::runtime", stage_id, parent = spec.parent_pid, "orchestrator is gone; exiting");
                    orphaned = true;
                    stopping = Some(begin_stop(&io, stop_grace).await);
                }
            }
            _ = tokio::time::sleep_until(stop_deadline), if stopping.is_some() => {
                tracing::warn!(target: "omni::runtime", stage_id, "model thread did not stop in time; exiting anyway");
                break;
            }
        }
    }
    if by_signal && !orphaned {
        orphaned = orphaned_after_signal(spec.parent_pid, Duration::from_millis(500)).await;
    }
    if orphaned {
        // Nobody else is left to clean up after the pipeline.
        let _ = std::fs::remove_dir_all(&spec.run_dir);
    }
    tracing::info!(target: "omni::runtime", stage_id, "stage stopped");
    Ok(())
}

/// SIGTERM and SIGINT, watched from now on.
fn watch_stop_signals() -> Result<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate())
        .map_err(|e| Error::io("cannot watch SIGTERM", "omni-stage", e))?;
    let int = signal(SignalKind::interrupt())
        .map_err(|e| Error::io("cannot watch SIGINT", "omni-stage", e))?;
    Ok((term, int))
}

/// Whether the orchestrator is gone, given a moment after a signal:
/// PR_SET_PDEATHSIG fires when its spawning *thread* dies, which may be a
/// moment before its whole process is gone (we are then reparented to a
/// sibling thread, same pid).
async fn orphaned_after_signal(parent: u32, within: Duration) -> bool {
    let until = tokio::time::Instant::now() + within;
    loop {
        if parent_gone(parent) {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn begin_stop(io: &Io, grace: Duration) -> tokio::time::Instant {
    // The deadline counts from now: a full queue must not stretch it past
    // the orchestrator's own.
    let deadline = tokio::time::Instant::now() + grace;
    let _ = tokio::time::timeout_at(deadline, io.to_model.send(ToModel::Shutdown)).await;
    deadline
}

impl Io {
    async fn send_ctrl(&mut self, frames: Vec<Bytes>) -> Result<()> {
        send_frames(&mut self.ctrl, None, frames, &self.ctrl_endpoint).await
    }

    async fn send_stage(&mut self, d: usize, frames: Vec<Bytes>) {
        match self.downstream.get_mut(&d) {
            Some((sock, addr)) => {
                if let Err(e) = send_frames(sock, None, frames, addr).await {
                    tracing::error!(target: "omni::runtime", stage_id = self.stage_id, to = d, "{e}");
                }
            }
            None => {
                tracing::error!(target: "omni::runtime", stage_id = self.stage_id, to = d, "no socket to that stage")
            }
        }
    }

    async fn forward(&self, c: ToModel) {
        let _ = self.to_model.send(c).await;
    }

    fn health(&self, seq: u64) -> Message {
        Message::HealthReply(HealthMsg {
            seq,
            stage_id: self.stage_id,
            pid: std::process::id(),
            running_requests: self.counters.running.load(Ordering::Relaxed),
            engine_requests: self.counters.engine_requests.load(Ordering::Relaxed),
            generated_tokens: self.counters.generated_tokens.load(Ordering::Relaxed),
            aborted_requests: self.counters.aborted_requests.load(Ordering::Relaxed),
            rejected_messages: self.rejected.load(Ordering::Relaxed),
            profiling: self.profiling.load(Ordering::Relaxed),
            clock_us: omni_profiler::now_unix_us(),
            prefix_cache_queried_tokens: self
                .counters
                .prefix_cache_queried_tokens
                .load(Ordering::Relaxed),
            prefix_cache_hit_tokens: self
                .counters
                .prefix_cache_hit_tokens
                .load(Ordering::Relaxed),
            model_busy_ms: match self.counters.busy_since_us.load(Ordering::Relaxed) {
                0 => 0,
                since => mono_us().saturating_sub(since) / 1000,
            },
        })
    }

    fn protocol_error(&self, seq: Option<u64>, reason: String) -> Vec<Bytes> {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "omni::runtime", stage_id = self.stage_id, "rejected a message: {reason}");
        wire::encode_message(Message::ProtocolError {
            stage_id: self.stage_id,
            seq,
            reason,
        })
        .unwrap_or_default()
    }

    /// Tells the orchestrator that request `id` failed in this stage.
    async fn fail_request(&mut self, id: String, message: String) {
        let m = Message::RequestError {
            request_id: id,
            stage_id: self.stage_id,
            message,
            rejected: false,
        };
        if let Ok(f) = wire::encode_message(m) {
            let _ = self.send_ctrl(f).await;
        }
    }

    /// Handles one incoming message; returns true when the stage must stop.
    async fn incoming(&mut self, inc: Incoming, ctx: &DecodeContext) -> bool {
        let arrival = now_us();
        match inc {
            Incoming::Control(frames) => match wire::decode(frames, ctx) {
                Ok(Envelope { message, tensors }) => match message {
                    // A non-entry stage answers with a request error from the model thread.
                    Message::Generate(mut g) => match wire::attach_media(&mut g.prompt, &tensors) {
                        Ok(()) => self.forward(ToModel::Generate(g, arrival)).await,
                        Err(e) => {
                            self.rejected.fetch_add(1, Ordering::Relaxed);
                            self.forward(ToModel::Refuse(g.request_id, e.to_string()))
                                .await
                        }
                    },
                    Message::Abort { request_ids } => {
                        self.forward(ToModel::Abort(request_ids)).await
                    }
                    Message::StartProfile(m) => self.forward(ToModel::StartProfile(m)).await,
                    Message::StopProfile { seq } => self.forward(ToModel::StopProfile(seq)).await,
                    Message::Health { seq } => {
                        if let Ok(f) = wire::encode_message(self.health(seq)) {
                            let _ = self.send_ctrl(f).await;
                        }
                    }
                    Message::Shutdown => return true,
                    other => {
                        let f = self.protocol_error(
                            None,
                            format!(
                                "a stage does not accept {:?} messages from the orchestrator",
                                other.type_name()
                            ),
                        );
                        let _ = self.send_ctrl(f).await;
                    }
                },
                Err(Rejected {
                    seq,
                    request_id,
                    error,
                }) => {
                    if let Some(id) = request_id {
                        // A generate the stage cannot read must fail its
                        // request, or the caller waits for ever.
                        self.fail_request(id, format!("request rejected: {error}"))
                            .await;
                    }
                    let f = self.protocol_error(seq, error);
                    let _ = self.send_ctrl(f).await;
                }
            },
            Incoming::Input(identity, frames) => {
                let reply = match wire::decode(frames, ctx) {
                    Ok(Envelope { message, tensors }) => match message {
                        Message::StageInput(m) => {
                            self.forward(ToModel::Input(m, tensors, arrival)).await;
                            None
                        }
                        Message::Health { seq } => wire::encode_message(self.health(seq)).ok(),
                        other => Some(self.protocol_error(
                            None,
                            format!(
                                "the input socket takes stage_input and health messages, not {:?}",
                                other.type_name()
                            ),
                        )),
                    },
                    Err(Rejected {
                        seq,
                        request_id,
                        error,
                    }) => {
                        if let Some(id) = request_id {
                            // A real request whose input was mangled must not hang.
                            self.fail_request(id, format!("stage input rejected: {error}"))
                                .await;
                        }
                        Some(self.protocol_error(seq, error))
                    }
                };
                if let Some(f) = reply {
                    let ep = self.input_endpoint.clone();
                    if let Err(e) = send_frames(&mut self.input, Some(identity), f, &ep).await {
                        tracing::debug!(target: "omni::runtime", stage_id = self.stage_id, "cannot answer on the input socket: {e}");
                    }
                }
            }
            Incoming::Downstream(d, frames) => {
                if let Ok(Envelope {
                    message: Message::ProtocolError { reason, .. },
                    ..
                }) = wire::decode(frames, ctx)
                {
                    tracing::error!(target: "omni::runtime", stage_id = self.stage_id, to = d, "stage {d} rejected our message: {reason}");
                }
            }
        }
        false
    }
}
