//! Supervision of the stage processes: one dedicated OS thread spawns every
//! worker, watches them, and stops them.
//!
//! Why a thread of its own: workers are started with
//! `prctl(PR_SET_PDEATHSIG, SIGTERM)` so they die with the orchestrator even
//! when it is SIGKILLed, but Linux sends that signal when the *thread* that
//! forked the child exits, not the process. Spawning from a tokio worker or
//! a caller's thread could kill the stages when that thread ends; this
//! thread lives exactly as long as the children. (Workers also poll
//! `getppid()` as a second guard.)
//!
//! When a child exits while the pipeline runs, the supervisor reports it and
//! terminates the others (SIGTERM, then SIGKILL after the grace period); once
//! every child is reaped it removes the run directory and reports that too.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::run_dir::RunDir;

/// How often children are polled for exit. Short, so in-flight requests of
/// a dead stage fail promptly.
const POLL: Duration = Duration::from_millis(20);

/// Lines of a worker's stderr kept for error messages.
const LOG_TAIL_LINES: usize = 25;

/// The last lines a worker wrote to stderr.
#[derive(Debug, Default)]
pub(crate) struct LogTail(Mutex<VecDeque<String>>);

impl LogTail {
    pub(crate) fn push(&self, line: String) {
        if let Ok(mut q) = self.0.lock() {
            if q.len() == LOG_TAIL_LINES {
                q.pop_front();
            }
            q.push_back(line);
        }
    }

    /// The lines, each on its own line after a header, or "" when empty.
    pub(crate) fn render(&self) -> String {
        let q = match self.0.lock() {
            Ok(q) => q,
            Err(p) => p.into_inner(),
        };
        if q.is_empty() {
            return String::new();
        }
        let mut s = String::from("; its last log lines:");
        for l in q.iter() {
            s.push_str("\n  ");
            s.push_str(l);
        }
        s
    }
}

/// What the supervisor reports to the orchestrator.
#[derive(Debug)]
pub(crate) enum SupervisorEvent {
    /// A worker exited; `expected` when the pipeline was stopping.
    Exited {
        stage_id: usize,
        status: String,
        expected: bool,
    },
    /// Every worker is gone and the run directory removed.
    AllExited,
}

pub(crate) enum Cmd {
    Spawn {
        stage_id: usize,
        command: Box<Command>,
        reply: oneshot::Sender<Result<(u32, Arc<LogTail>)>>,
    },
    Stop {
        grace: Duration,
        terminate_now: bool,
    },
    Kill {
        stage_id: usize,
        reason: String,
    },
    /// One request to the Ray launcher (`crate::ray`), answered by its
    /// line whose `op` is `expect`.
    Ray {
        request: serde_json::Value,
        expect: &'static str,
        reply: oneshot::Sender<Result<serde_json::Value>>,
    },
}

struct Watched {
    stage_id: usize,
    child: Child,
    terminated: bool,
    /// Why the supervisor killed it, when it did (reported with its exit).
    killed_for: Option<String>,
}

/// Handle to the supervisor thread.
pub(crate) struct Supervisor {
    cmd: std_mpsc::Sender<Cmd>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// A supervisor whose thread is `body` (it owns `run_dir` and removes it
    /// at the end): [`start`](Self::start)'s, or the Ray backend's.
    pub(crate) fn start_with(
        name: &str,
        body: impl FnOnce(std_mpsc::Receiver<Cmd>) + Send + 'static,
    ) -> Result<Self> {
        let (tx, rx) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(rx))
            .map_err(|e| Error::io("cannot start the supervisor thread", name.to_owned(), e))?;
        Ok(Supervisor {
            cmd: tx,
            thread: Some(thread),
        })
    }

    /// Sends `request` to the Ray launcher and waits (at most `timeout`) for
    /// its answer, the line whose `op` is `expect`.
    pub(crate) async fn ray_call(
        &self,
        request: serde_json::Value,
        expect: &'static str,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Ray {
                request,
                expect,
                reply,
            })
            .map_err(|_| Error::ShutDown(": the supervisor thread is gone".into()))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::ShutDown(": the supervisor thread is gone".into())),
            Err(_) => Err(Error::Ray(format!(
                "the launcher did not answer `{expect}` within {timeout:?}"
            ))),
        }
    }

    /// Starts the thread; it owns `run_dir` and removes it at the end.
    pub(crate) fn start(
        run_dir: RunDir,
        grace: Duration,
        events: mpsc::UnboundedSender<SupervisorEvent>,
    ) -> Result<Self> {
        Self::start_with("omni-supervisor", move |rx| {
            supervise(rx, run_dir, grace, events)
        })
    }

    /// Spawns a worker from the supervisor thread.
    pub(crate) async fn spawn(
        &self,
        stage_id: usize,
        command: Command,
    ) -> Result<(u32, Arc<LogTail>)> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Spawn {
                stage_id,
                command: Box::new(command),
                reply,
            })
            .map_err(|_| Error::ShutDown(": the supervisor thread is gone".into()))?;
        rx.await
            .map_err(|_| Error::ShutDown(": the supervisor thread is gone".into()))?
    }

    /// Asks every worker to be gone within `grace` (SIGTERM at once when
    /// `terminate_now`, SIGKILL at the deadline); returns at once.
    pub(crate) fn stop(&self, grace: Duration, terminate_now: bool) {
        let _ = self.cmd.send(Cmd::Stop {
            grace,
            terminate_now,
        });
    }

    /// A handle that kills one stage (SIGKILL, which also ends a stopped
    /// process) with a reason its exit is reported with; the exit then
    /// counts as a death, as any other.
    pub(crate) fn killer(&self) -> StageKiller {
        StageKiller {
            cmd: self.cmd.clone(),
        }
    }

    /// Waits until the thread has reaped every worker and removed the run
    /// directory (blocking).
    pub(crate) fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Kills one stage through the supervisor thread (see [`Supervisor::killer`]).
#[derive(Clone)]
pub(crate) struct StageKiller {
    cmd: std_mpsc::Sender<Cmd>,
}

impl StageKiller {
    pub(crate) fn kill(&self, stage_id: usize, reason: String) {
        let _ = self.cmd.send(Cmd::Kill { stage_id, reason });
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop(Duration::from_secs(5), true);
            self.join();
        }
    }
}

fn supervise(
    rx: std_mpsc::Receiver<Cmd>,
    run_dir: RunDir,
    default_grace: Duration,
    events: mpsc::UnboundedSender<SupervisorEvent>,
) {
    let mut children: Vec<Watched> = Vec::new();
    // Set once the pipeline is stopping: the moment to SIGKILL what is left.
    let mut deadline: Option<Instant> = None;
    loop {
        match rx.recv_timeout(POLL) {
            Ok(Cmd::Spawn {
                stage_id,
                command,
                reply,
            }) => {
                if deadline.is_some() {
                    let _ = reply.send(Err(Error::ShutDown(": stopping, no new stages".into())));
                } else {
                    let _ = reply.send(spawn_child(stage_id, *command, &mut children));
                }
            }
            Ok(Cmd::Stop {
                grace,
                terminate_now,
            }) => {
                let d = Instant::now() + grace;
                deadline = Some(deadline.map_or(d, |old| old.min(d)));
                if terminate_now {
                    terminate_all(&mut children);
                }
            }
            Ok(Cmd::Ray { reply, .. }) => {
                let _ = reply.send(Err(Error::Ray(
                    "this pipeline's stages are local processes".into(),
                )));
            }
            Ok(Cmd::Kill { stage_id, reason }) => {
                // A stage being stopped is left to the stop's deadline.
                if deadline.is_none() {
                    for w in children.iter_mut().filter(|w| w.stage_id == stage_id) {
                        tracing::error!(target: "omni::runtime", stage_id, "{reason}; killing it");
                        w.killed_for = Some(reason.clone());
                        let _ = w.child.kill();
                    }
                }
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                if deadline.is_none() {
                    deadline = Some(Instant::now() + default_grace);
                    terminate_all(&mut children);
                }
            }
        }
        let mut i = 0;
        while i < children.len() {
            match children[i].child.try_wait() {
                Ok(Some(status)) => {
                    let w = children.swap_remove(i);
                    let expected = deadline.is_some();
                    let status = match &w.killed_for {
                        Some(reason) => format!("{reason}; killed ({})", describe(status)),
                        None => describe(status),
                    };
                    if expected {
                        tracing::debug!(target: "omni::runtime", stage_id = w.stage_id, %status, "stage exited");
                    } else {
                        tracing::error!(target: "omni::runtime", stage_id = w.stage_id, %status, "stage died; shutting the pipeline down");
                    }
                    let _ = events.send(SupervisorEvent::Exited {
                        stage_id: w.stage_id,
                        status,
                        expected,
                    });
                    if !expected {
                        deadline = Some(Instant::now() + default_grace);
                        terminate_all(&mut children);
                    }
                }
                Ok(None) => i += 1,
                Err(e) => {
                    tracing::warn!(target: "omni::runtime", stage_id = children[i].stage_id, "cannot poll stage process: {e}");
                    i += 1;
                }
            }
        }
        if let Some(d) = deadline {
            if Instant::now() >= d {
                for w in children.iter_mut() {
                    tracing::warn!(target: "omni::runtime", stage_id = w.stage_id, "stage did not exit in time; killing it");
                    let _ = w.child.kill();
                }
                for mut w in children.drain(..) {
                    let status = w
                        .child
                        .wait()
                        .map(describe)
                        .unwrap_or_else(|e| format!("unknown ({e})"));
                    let _ = events.send(SupervisorEvent::Exited {
                        stage_id: w.stage_id,
                        status,
                        expected: true,
                    });
                }
            }
            if children.is_empty() {
                run_dir.remove();
                let _ = events.send(SupervisorEvent::AllExited);
                return;
            }
        }
    }
}

/// Makes the process `command` starts die with this thread (SIGTERM), and
/// never outlive this process even if it dies between fork and exec.
pub(crate) fn die_with_parent(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between
    // fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl; then nobody
            // would ever signal us.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

fn spawn_child(
    stage_id: usize,
    mut command: Command,
    children: &mut Vec<Watched>,
) -> Result<(u32, Arc<LogTail>)> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    die_with_parent(&mut command);
    let program = command.get_program().to_owned();
    let mut child = command.spawn().map_err(|cause| Error::Spawn {
        stage_id,
        path: program.into(),
        cause,
    })?;
    let pid = child.id();
    let tail = Arc::new(LogTail::default());
    if let Some(stderr) = child.stderr.take() {
        let tail = tail.clone();
        // Forward the worker's log with a prefix, and keep its last lines for
        // start-up errors.
        let _ = std::thread::Builder::new()
            .name(format!("omni-stage-{stage_id}-log"))
            .spawn(move || {
                let reader = BufReader::new(stderr);
                for line in reader.lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(std::io::stderr(), "[stage {stage_id}] {line}");
                    tail.push(line);
                }
            });
    }
    children.push(Watched {
        stage_id,
        child,
        terminated: false,
        killed_for: None,
    });
    Ok((pid, tail))
}

fn terminate_all(children: &mut [Watched]) {
    for w in children.iter_mut() {
        if !w.terminated {
            // SAFETY: plain kill(2) on our own child's pid, which stays
            // reserved until we reap it.
            unsafe {
                libc::kill(w.child.id() as libc::pid_t, libc::SIGTERM);
            }
            w.terminated = true;
        }
    }
}

/// "exit status 1", "killed by signal 9 (SIGKILL)".
pub(crate) fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit status {code}");
    }
    match status.signal() {
        Some(sig) => format!("killed by signal {sig} ({})", signal_name(sig)),
        None => status.to_string(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGINT => "SIGINT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGHUP => "SIGHUP",
        libc::SIGPIPE => "SIGPIPE",
        _ => "signal",
    }
}
