//! The `ray` backend (`runtime.backend: ray`): the stages run on the nodes
//! of a running Ray cluster, each in a process owned by one Ray actor,
//! placed by one placement group. Ray places and watches; Omni does not
//! schedule anything itself.
//!
//! The cluster is driven by a small Python program that ships inside this
//! crate (`ray_launcher.py`, Ray's supported Python API): the orchestrator
//! writes it into the run directory and runs it as a child (dying with the
//! supervisor thread, as local stages do). They speak JSON lines over the
//! launcher's stdin and stdout:
//!
//! 1. `place`: one bundle per stage (`runtime.resources`) in a placement
//!    group, one actor per bundle; each actor reserves a TCP port on its
//!    node's address and says where it is (`placed`).
//! 2. `launch`: each actor starts `omni-stage` with its launch spec and the
//!    reserved socket (`launched`). From here on the stages talk to each
//!    other and to the orchestrator directly over TCP; nothing goes through
//!    Ray's object store or the launcher.
//! 3. `exited` whenever a stage's process ends or its actor or node dies;
//!    `kill` and `stop` from the orchestrator; `stopped` once the placement
//!    group and every actor are gone.
//!
//! If the launcher itself dies, Ray removes the actors of its job, whose
//! stage processes die with them (parent-death signal), so nothing is left
//! on any node.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::run_dir::RunDir;
use crate::supervisor::{describe, die_with_parent, Cmd, LogTail, Supervisor, SupervisorEvent};

/// The launcher's source, written into the run directory at start-up.
pub(crate) const LAUNCHER_SOURCE: &str = include_str!("ray_launcher.py");

/// The Python interpreter that runs the launcher, when the pipeline names
/// none (`runtime.ray.python`); `python3` when unset.
pub const RAY_PYTHON_ENV: &str = "OMNI_RAY_PYTHON";

/// How often the supervisor thread looks at the launcher's answers.
const POLL: Duration = Duration::from_millis(20);

/// How long a stage the orchestrator had killed may go unconfirmed (its
/// node unreachable, its actor wedged) before it is reported dead anyway.
const KILL_CONFIRM: Duration = Duration::from_secs(5);

/// Time the launcher gets, past the stages' own grace, to remove the
/// placement group and its actors before it is killed (Ray then removes
/// them itself, as for any dead driver).
const TEARDOWN: Duration = Duration::from_secs(25);

/// Where Ray put one stage (part of the launcher's `placed` answer).
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct Placement {
    pub stage_id: usize,
    /// The node's address; the stage listens on `ip:port`.
    pub ip: String,
    pub port: u16,
    /// Host identity (host name and boot id): equal on one machine.
    pub host: String,
    /// Ray's id of the node.
    pub node_id: String,
    /// Whether the stage's actor read the orchestrator's shared-memory
    /// probe file: this host, this user, this `/dev/shm`.
    #[serde(default)]
    pub shares_shm: bool,
}

/// The launcher's own host (the orchestrator's).
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct DriverHost {
    pub ip: String,
    pub host: String,
}

/// The launcher's `placed` answer.
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct Placed {
    pub driver: DriverHost,
    pub stages: Vec<Placement>,
}

/// One line of the launcher's `launched` answer.
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct LaunchedStage {
    pub stage_id: usize,
    pub pid: u32,
}

/// Starts the launcher (`command`, run from the new supervisor thread so
/// that it dies with it) and the thread that relays between it and the
/// orchestrator. `tails[stage_id]` get a stage's last log lines when it
/// exits. Returns once the launcher runs, or the reason it could not start.
pub(crate) fn start(
    run_dir: RunDir,
    grace: Duration,
    events: mpsc::UnboundedSender<SupervisorEvent>,
    command: Command,
    tails: Vec<Arc<LogTail>>,
) -> Result<Supervisor> {
    let (started_tx, started_rx) = std_mpsc::channel();
    let supervisor = Supervisor::start_with("omni-ray-supervisor", move |rx| {
        let program = command.get_program().to_owned();
        let all_exited = events.clone();
        match spawn_launcher(command, tails.clone()) {
            Ok((child, stdin, lines, launcher_log)) => {
                let _ = started_tx.send(Ok(()));
                Relay {
                    child,
                    stdin,
                    lines,
                    launcher_log,
                    tails,
                    events,
                    default_grace: grace,
                    pending: None,
                    live: BTreeSet::new(),
                    killed_for: HashMap::new(),
                    last_error: None,
                    deadline: None,
                }
                .run(rx);
            }
            Err(cause) => {
                let _ = started_tx.send(Err(Error::Ray(format!(
                    "cannot start the launcher with {}: {cause} (set runtime.ray.python or \
                     {RAY_PYTHON_ENV} to a Python that has `ray`)",
                    program.to_string_lossy()
                ))));
            }
        }
        run_dir.remove();
        let _ = all_exited.send(SupervisorEvent::AllExited);
    })?;
    started_rx
        .recv()
        .unwrap_or_else(|_| Err(Error::ShutDown(": the supervisor thread is gone".into())))?;
    Ok(supervisor)
}

type Lines = std_mpsc::Receiver<Value>;

fn spawn_launcher(
    mut command: Command,
    tails: Vec<Arc<LogTail>>,
) -> std::io::Result<(Child, ChildStdin, Lines, Arc<LogTail>)> {
    use std::os::unix::process::CommandExt;
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a terminal's Ctrl-C reaches the
        // orchestrator, which stops the launcher in order, not both at once.
        .process_group(0);
    die_with_parent(&mut command);
    let mut child = command.spawn()?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("no stdin"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout"))?;
    let (tx, lines) = std_mpsc::channel();
    std::thread::Builder::new()
        .name("omni-ray-answers".into())
        .spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v.get("op").and_then(Value::as_str).is_some() => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    _ => tracing::warn!(target: "omni::runtime", "ray launcher: not a protocol line: {line}"),
                }
            }
        })?;
    let log = Arc::new(LogTail::default());
    if let Some(stderr) = child.stderr.take() {
        let log = log.clone();
        std::thread::Builder::new()
            .name("omni-ray-log".into())
            .spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(std::io::stderr(), "[ray] {line}");
                    // A stage's own lines (its actor prefixes them
                    // `[stage N] `) are its tail for start-up errors.
                    match stage_line(&line).and_then(|(n, rest)| Some((tails.get(n)?, rest))) {
                        Some((tail, rest)) => tail.push(rest.to_owned()),
                        None => log.push(line),
                    }
                }
            })?;
    }
    Ok((child, stdin, lines, log))
}

/// The supervisor thread of the Ray backend: relays the orchestrator's
/// commands to the launcher and the launcher's reports back as
/// [`SupervisorEvent`]s, with the local supervisor's meaning (an exit is
/// expected once the pipeline is stopping; the first unexpected one stops
/// the rest).
struct Relay {
    child: Child,
    stdin: ChildStdin,
    lines: Lines,
    launcher_log: Arc<LogTail>,
    tails: Vec<Arc<LogTail>>,
    events: mpsc::UnboundedSender<SupervisorEvent>,
    default_grace: Duration,
    pending: Option<(&'static str, oneshot::Sender<Result<Value>>)>,
    /// Stages launched and not yet reported gone.
    live: BTreeSet<usize>,
    /// Stages the orchestrator had killed: why, and when.
    killed_for: HashMap<usize, (String, Instant)>,
    /// The launcher's last error that no request was waiting for.
    last_error: Option<String>,
    /// Set once the pipeline is stopping: when the stages must be gone.
    deadline: Option<Instant>,
}

impl Relay {
    fn run(mut self, rx: std_mpsc::Receiver<Cmd>) {
        loop {
            match rx.recv_timeout(POLL) {
                Ok(cmd) => self.command(cmd),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    if self.deadline.is_none() {
                        self.stop(self.default_grace, true);
                    }
                    // No commands can come any more; do not spin.
                    std::thread::sleep(POLL);
                }
            }
            while let Ok(line) = self.lines.try_recv() {
                self.on_line(line);
            }
            self.unconfirmed_kills();
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    // Its last lines are read before its exit is judged.
                    while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                        self.on_line(line);
                    }
                    self.launcher_exited(&describe(status));
                    return;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(target: "omni::runtime", "cannot poll the ray launcher: {e}")
                }
            }
            if self
                .deadline
                .is_some_and(|d| Instant::now() >= d + TEARDOWN)
            {
                tracing::warn!(target: "omni::runtime", "the ray launcher did not finish its teardown in time; killing it (Ray removes a dead driver's actors)");
                let _ = self.child.kill();
                let status = self.child.wait().map(describe).unwrap_or_default();
                self.launcher_exited(&status);
                return;
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Ray {
                request,
                expect,
                reply,
            } => {
                if self.deadline.is_some() {
                    let _ = reply.send(Err(Error::ShutDown(": stopping, no new stages".into())));
                } else if let Err(e) = self.write(&request) {
                    let _ = reply.send(Err(e));
                } else {
                    self.pending = Some((expect, reply));
                }
            }
            Cmd::Spawn { reply, .. } => {
                let _ = reply.send(Err(Error::Ray(
                    "ray stages are started by the launcher, not spawned here".into(),
                )));
            }
            Cmd::Stop {
                grace,
                terminate_now,
            } => self.stop(grace, terminate_now),
            Cmd::Kill { stage_id, reason } => {
                if self.deadline.is_none() {
                    tracing::error!(target: "omni::runtime", stage_id, "{reason}; killing it");
                    self.killed_for
                        .insert(stage_id, (reason.clone(), Instant::now()));
                    let _ =
                        self.write(&json!({"op": "kill", "stage_id": stage_id, "reason": reason}));
                }
            }
        }
    }

    fn stop(&mut self, grace: Duration, terminate_now: bool) {
        let d = Instant::now() + grace;
        self.deadline = Some(self.deadline.map_or(d, |old| old.min(d)));
        let _ = self.write(&json!({
            "op": "stop",
            "grace_ms": grace.as_millis() as u64,
            "terminate": terminate_now,
        }));
    }

    fn write(&mut self, v: &Value) -> Result<()> {
        let mut line = v.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .and_then(|()| self.stdin.flush())
            .map_err(|e| Error::Ray(format!("cannot write to the launcher: {e}")))
    }

    /// A stage the orchestrator killed whose exit Ray has not confirmed in
    /// [`KILL_CONFIRM`] (its node unreachable, its actor wedged) is dead to
    /// the pipeline: report it now rather than wait for Ray's own failure
    /// detection, which takes a minute by default. The launcher's stop then
    /// removes its actor whatever its state.
    fn unconfirmed_kills(&mut self) {
        if self.deadline.is_some() {
            return;
        }
        let overdue: Vec<usize> = self
            .killed_for
            .iter()
            .filter(|(s, (_, at))| self.live.contains(s) && at.elapsed() >= KILL_CONFIRM)
            .map(|(s, _)| *s)
            .collect();
        for stage_id in overdue {
            if let Some((reason, _)) = self.killed_for.remove(&stage_id) {
                self.live.remove(&stage_id);
                self.report_exit(
                    stage_id,
                    format!(
                        "{reason}; killed (Ray did not confirm its exit within {KILL_CONFIRM:?})"
                    ),
                );
            }
        }
    }

    fn on_line(&mut self, line: Value) {
        let op = line.get("op").and_then(Value::as_str).unwrap_or_default();
        match op {
            "exited" => {
                let Some(stage_id) = line.get("stage_id").and_then(Value::as_u64) else {
                    return;
                };
                let stage_id = stage_id as usize;
                if let Some(tail) = self.tails.get(stage_id) {
                    for l in line
                        .get("log")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        tail.push(l.as_str().unwrap_or_default().to_owned());
                    }
                }
                let status = line
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_owned();
                let status = match self.killed_for.remove(&stage_id) {
                    Some((reason, _)) => format!("{reason}; killed ({status})"),
                    None => status,
                };
                // Reported once: a stage already reported dead is not again.
                if self.live.remove(&stage_id) {
                    self.report_exit(stage_id, status);
                }
            }
            "error" => {
                let message = line
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .to_owned();
                match self.pending.take() {
                    Some((_, reply)) => {
                        let _ = reply.send(Err(Error::Ray(message)));
                    }
                    None => {
                        tracing::error!(target: "omni::runtime", "ray launcher: {message}");
                        self.last_error = Some(message);
                    }
                }
            }
            "stopped" => {}
            _ => match self.pending.take() {
                Some((expect, reply)) if expect == op => {
                    if op == "launched" {
                        self.live = line
                            .get("stages")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                            .filter_map(|s| s.get("stage_id")?.as_u64())
                            .map(|s| s as usize)
                            .collect();
                    }
                    let _ = reply.send(Ok(line));
                }
                other => {
                    tracing::warn!(target: "omni::runtime", op, "unexpected answer from the ray launcher; ignored");
                    self.pending = other;
                }
            },
        }
    }

    fn report_exit(&mut self, stage_id: usize, status: String) {
        let expected = self.deadline.is_some();
        if expected {
            tracing::debug!(target: "omni::runtime", stage_id, %status, "stage exited");
        } else {
            tracing::error!(target: "omni::runtime", stage_id, %status, "stage died; shutting the pipeline down");
        }
        let _ = self.events.send(SupervisorEvent::Exited {
            stage_id,
            status,
            expected,
        });
        if !expected {
            self.stop(self.default_grace, true);
        }
    }

    fn launcher_exited(&mut self, status: &str) {
        let status = match self.last_error.take() {
            Some(e) => format!("{status}: {e}"),
            None => status.to_owned(),
        };
        let status = status.as_str();
        if let Some((expect, reply)) = self.pending.take() {
            let _ = reply.send(Err(Error::Ray(format!(
                "the launcher exited ({status}) before it answered `{expect}`{}",
                self.launcher_log.render()
            ))));
        }
        for stage_id in std::mem::take(&mut self.live) {
            self.report_exit(stage_id, format!("its Ray launcher exited ({status})"));
        }
    }
}

/// The `place` request: one bundle per stage. `shm_probe`: a file in the
/// orchestrator's shared-memory directory and its contents, which a stage's
/// actor reads back if (and only if) it shares that memory.
pub(crate) fn place_request(
    config: &crate::PipelineConfig,
    shm_probe: Option<(&Path, &str)>,
) -> Value {
    let ray = &config.runtime.ray;
    json!({
        "op": "place",
        "shm_probe": shm_probe.map(|(path, nonce)| json!({"path": path, "nonce": nonce})),
        "stages": config.stages.iter().map(|s| json!({
            "stage_id": s.stage_id,
            "resources": s.runtime.resources,
        })).collect::<Vec<_>>(),
        "strategy": ray.placement_strategy,
        "timeout_s": ray.placement_timeout_s,
    })
}

/// `(N, rest)` of a launcher log line that carries `[stage N] rest` (after
/// Ray's own `(StageActor pid=...)` prefix).
fn stage_line(line: &str) -> Option<(usize, &str)> {
    let at = line.find("[stage ")?;
    let rest = &line[at + "[stage ".len()..];
    let (n, rest) = rest.split_once("] ")?;
    Some((n.parse().ok()?, rest))
}

/// `tcp://ip:port`, IPv6 addresses in brackets.
pub(crate) fn tcp_address(ip: &str, port: u16) -> String {
    if ip.contains(':') && !ip.starts_with('[') {
        format!("tcp://[{ip}]:{port}")
    } else {
        format!("tcp://{ip}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launcher_lines_and_addresses() {
        assert_eq!(
            stage_line("(StageActor pid=12, ip=10.0.0.2) [stage 3] INFO loading"),
            Some((3, "INFO loading"))
        );
        assert_eq!(stage_line("[stage x] no"), None);
        assert_eq!(stage_line("ray_launcher: stopping"), None);
        assert_eq!(tcp_address("10.0.0.2", 5), "tcp://10.0.0.2:5");
        assert_eq!(tcp_address("fe80::1", 5), "tcp://[fe80::1]:5");
    }
}
