//! Supervision with real processes: a stage SIGKILLed (either one) or
//! exiting with a failure status mid-request fails the request with an
//! error naming the stage and how it ended, the other stage exits and the
//! run directory goes; so does a stage stopped (SIGSTOP) mid-request, caught
//! by the health watchdog, and one whose model thread outlives the step
//! timeout; a stopped stage times out control calls and is
//! SIGKILLed after the shutdown grace; an orchestrator SIGKILLed leaves no worker
//! behind; when every process is SIGKILLed at once, the next pipeline removes
//! what they left; start-up failures name the stage and clean up.

mod runtime_support;

use std::io::BufRead;
use std::time::Duration;

use omni_engine::Prompt;
use omni_runtime::{Error, Orchestrator, OrchestratorOptions, PipelineConfig, StageEvent};
use runtime_support::{eventually, greedy, options, pid_alive, TestResult};

/// Stage `victim` of the default pipeline gets `signal` while a request
/// streams from stage 0: the request fails with `StageDied` for that stage,
/// its status described as `status`; every stage process exits, the run
/// directory goes, and the pipeline refuses new work with the same cause.
async fn a_stage_death_fails_the_request_and_cleans_up(
    victim: usize,
    signal: libc::c_int,
    status_says: &str,
) -> TestResult {
    a_stage_failure_fails_the_request_and_cleans_up(victim, Some(signal), status_says, options())
        .await
}

/// As above, with `signal` (none: the stage is left alone) and options.
async fn a_stage_failure_fails_the_request_and_cleans_up(
    victim: usize,
    signal: Option<libc::c_int>,
    status_says: &str,
    opts: OrchestratorOptions,
) -> TestResult {
    let config = PipelineConfig::builtin("default")?;
    let orch = Orchestrator::start(config, opts).await?;
    let pids: Vec<u32> = orch.stages().iter().map(|s| s.pid).collect();
    let run_dir = orch.run_dir().to_path_buf();
    // Stage 0 streams long enough (EOS ignored) that the request is surely
    // in flight when the stage dies.
    let mut params = greedy(orch.config(), &[2000, 8]);
    params[0].ignore_eos = true;
    let mut rx = orch
        .submit(
            "victim".into(),
            Prompt::Text("Write a long story about a dragon.".into()),
            params,
        )
        .await?;
    let first = tokio::time::timeout(Duration::from_secs(120), rx.recv())
        .await?
        .ok_or("no output")?;
    // Without a signal the failure may come before any output (a step
    // timeout can strike in the prefill).
    let early = match first {
        StageEvent::Output { stage_id: 0, .. } => None,
        StageEvent::Error(e) if signal.is_none() => Some(e),
        other => return Err(format!("expected an output of stage 0, got {other:?}").into()),
    };
    if let Some(signal) = signal {
        // SAFETY: plain kill(2) of a child process we own.
        assert_eq!(
            unsafe { libc::kill(pids[victim] as libc::pid_t, signal) },
            0
        );
    }

    let err = match early {
        Some(e) => e,
        None => tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(ev) = rx.recv().await {
                if let StageEvent::Error(e) = ev {
                    return Some(e);
                }
            }
            None
        })
        .await?
        .ok_or("stream ended without an error")?,
    };
    match &err {
        Error::StageDied { stage_id, status } if *stage_id == victim => {
            assert!(status.contains(status_says), "{status}")
        }
        other => return Err(format!("expected StageDied for stage {victim}, got {other}").into()),
    }
    assert!(
        err.to_string().contains(&format!("stage {victim}")),
        "{err}"
    );
    assert!(rx.recv().await.is_none(), "nothing after the error");

    assert!(
        eventually(Duration::from_secs(30), || pids
            .iter()
            .all(|&p| !pid_alive(p)))
        .await,
        "all stage processes gone"
    );
    assert!(
        eventually(Duration::from_secs(10), || !run_dir.exists()).await,
        "run directory removed"
    );
    // The pipeline refuses new work with the same cause.
    let e = orch
        .submit(
            "after".into(),
            Prompt::Text("hi".into()),
            greedy(orch.config(), &[4, 4]),
        )
        .await
        .err()
        .ok_or("accepted after death")?;
    assert!(
        matches!(e, Error::StageDied { stage_id, .. } if stage_id == victim),
        "{e}"
    );
    tokio::time::timeout(Duration::from_secs(30), orch.shutdown()).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_stage_1_fails_the_request_and_cleans_up() -> TestResult {
    a_stage_death_fails_the_request_and_cleans_up(1, libc::SIGKILL, "killed by signal 9 (SIGKILL)")
        .await
}

/// The stage the request is in, and the pipeline's entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_stage_0_fails_the_request_and_cleans_up() -> TestResult {
    a_stage_death_fails_the_request_and_cleans_up(0, libc::SIGKILL, "killed by signal 9 (SIGKILL)")
        .await
}

/// A stage that exits by itself with a failure status (the test worker
/// exits with status 3 on SIGUSR1) is a death like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_exiting_with_status_3_fails_the_request_and_cleans_up() -> TestResult {
    a_stage_death_fails_the_request_and_cleans_up(1, libc::SIGUSR1, "exit status 3").await
}

/// Shutdown with a request in flight ends its channel with an error (the
/// channel used to stay open forever: its pump held the orchestrator).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_the_requests_in_flight() -> TestResult {
    let config = PipelineConfig::builtin("smollm2")?;
    let orch = Orchestrator::start(config, options()).await?;
    let mut params = greedy(orch.config(), &[2000]);
    params[0].ignore_eos = true;
    let mut rx = orch
        .submit(
            "inflight".into(),
            Prompt::Text("Tell a story.".into()),
            params,
        )
        .await?;
    tokio::time::timeout(Duration::from_secs(120), rx.recv())
        .await?
        .ok_or("no output")?;
    let shutdown = tokio::spawn(orch.shutdown());
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        let mut error = None;
        while let Some(ev) = rx.recv().await {
            if let StageEvent::Error(e) = ev {
                error = Some(e);
            }
        }
        error
    })
    .await?;
    assert!(
        matches!(&ended, Some(Error::ShutDown(m)) if m.contains("in flight")),
        "{ended:?}"
    );
    tokio::time::timeout(Duration::from_secs(60), shutdown).await???;
    Ok(())
}

/// A stage stopped mid-request (SIGSTOP: the whole process, its socket
/// thread included) answers no health check: the watchdog kills it after
/// `health_timeout` and the request fails naming why, instead of waiting
/// forever (found when tried: `omni generate` still ran after 91 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_stage_fails_the_request_within_the_health_timeout() -> TestResult {
    let opts = OrchestratorOptions {
        health_interval: Duration::from_millis(500),
        health_timeout: Duration::from_secs(2),
        ..options()
    };
    a_stage_failure_fails_the_request_and_cleans_up(
        1,
        Some(libc::SIGSTOP),
        "stage 1 did not answer a health check within 2s (stopped or hung); killed",
        opts,
    )
    .await
}

/// A model thread that stays on one round longer than `step_timeout` (its
/// socket thread still answering) is killed the same way. Each step of the
/// streaming stage takes milliseconds at least, so a step timeout of 1 ms
/// is exceeded by a working stage: what a stuck one looks like.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_thread_past_the_step_timeout_fails_the_request() -> TestResult {
    let opts = OrchestratorOptions {
        health_interval: Duration::from_millis(200),
        step_timeout: Duration::from_millis(1),
        ..options()
    };
    a_stage_failure_fails_the_request_and_cleans_up(
        0,
        None,
        "stage 0's model thread has been on one step for",
        opts,
    )
    .await
}

/// A stopped stage (SIGSTOP) answers no control message: the call fails
/// with `Timeout` after `control_timeout`, and once the stage runs again
/// the next call gets its own answer (the late one is dropped). At shutdown
/// a stage that stays stopped past the grace is SIGKILLed: shutdown returns
/// after the grace, the process is gone and the run directory removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_stage_times_out_control_calls_and_is_killed_after_the_grace() -> TestResult {
    let config = PipelineConfig::builtin("smollm2")?;
    let grace = Duration::from_secs(2);
    let orch = Orchestrator::start(
        config,
        OrchestratorOptions {
            control_timeout: Duration::from_secs(2),
            shutdown_grace: grace,
            // The watchdog would kill the stopped stage, and its checks
            // would take sequence numbers this test counts.
            health_interval: Duration::from_secs(3600),
            ..options()
        },
    )
    .await?;
    let pid = orch.stages()[0].pid;
    let run_dir = orch.run_dir().to_path_buf();
    let signal = |sig| {
        // SAFETY: plain kill(2) of a child process we own.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0);
    };
    let before = orch.health(0).await?;
    assert_eq!(before.pid, pid);

    signal(libc::SIGSTOP);
    let e = tokio::time::timeout(Duration::from_secs(30), orch.health(0))
        .await?
        .err()
        .ok_or("a stopped stage answered")?;
    assert!(
        matches!(
            e,
            Error::Timeout {
                stage_id: 0,
                what: "health",
                ..
            }
        ),
        "{e}"
    );
    signal(libc::SIGCONT);
    let h = tokio::time::timeout(Duration::from_secs(30), orch.health(0)).await??;
    // Its own answer (calls are numbered), not the late one to the call
    // that timed out.
    assert_eq!((h.stage_id, h.pid, h.seq), (0, pid, before.seq + 2));

    signal(libc::SIGSTOP);
    let asked = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(60), orch.shutdown()).await??;
    assert!(
        asked.elapsed() >= grace,
        "shutdown returned after {:?}, within the grace of {grace:?}",
        asked.elapsed()
    );
    // Only SIGKILL ends a stopped process.
    assert!(
        eventually(Duration::from_secs(10), || !pid_alive(pid)).await,
        "the stopped stage is still there"
    );
    assert!(
        eventually(Duration::from_secs(10), || !run_dir.exists()).await,
        "run directory removed"
    );
    Ok(())
}

/// Starts `runtime-orchestrator-host` (run directory under `parent` when
/// given) and waits for it to report ready: the host, its run directory and
/// its workers' pids.
fn start_host(
    parent: Option<&std::path::Path>,
) -> Result<
    (std::process::Child, std::path::PathBuf, Vec<u32>),
    Box<dyn std::error::Error + Send + Sync>,
> {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_runtime-orchestrator-host"));
    cmd.arg("smollm2");
    if let Some(p) = parent {
        cmd.arg(p);
    }
    let mut host = cmd
        .env("OMNI_STAGE_BIN", runtime_support::stage_binary())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = host.stdout.take().ok_or("no stdout")?;
    // The host prints one line once every stage is ready (or fails).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(l) => l,
        Err(_) => {
            let _ = host.kill();
            return Err("orchestrator host did not report ready".into());
        }
    };
    let mut words = line.split_whitespace();
    if words.next() != Some("READY") {
        let _ = host.kill();
        return Err(format!("host said: {line}").into());
    }
    let run_dir = std::path::PathBuf::from(words.next().ok_or("no run dir")?);
    let pids: Vec<u32> = words.map(str::parse).collect::<Result<_, _>>()?;
    assert!(!pids.is_empty() && pids.iter().all(|&p| pid_alive(p)));
    Ok((host, run_dir, pids))
}

#[test]
fn sigkill_of_the_orchestrator_takes_its_workers_down() -> TestResult {
    let (mut host, run_dir, pids) = start_host(None)?;
    host.kill()?; // SIGKILL: no destructor, no clean-up code runs in the host
    host.wait()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let gone = rt.block_on(eventually(Duration::from_secs(30), || {
        pids.iter().all(|&p| !pid_alive(p))
    }));
    assert!(gone, "workers {pids:?} outlived their orchestrator");
    let cleaned = rt.block_on(eventually(Duration::from_secs(10), || !run_dir.exists()));
    assert!(
        cleaned,
        "an orphaned worker removes the run directory {}",
        run_dir.display()
    );
    Ok(())
}

/// The orchestrator SIGKILLed while its stages still load their models:
/// the workers, told by their parent-death signal, leave and remove the run
/// directory (they used to die of that signal before watching it, leaving
/// the directory behind).
#[test]
fn sigkill_of_the_orchestrator_while_stages_load_leaves_nothing() -> TestResult {
    let parent = tempfile::tempdir()?;
    let mut host = std::process::Command::new(env!("CARGO_BIN_EXE_runtime-orchestrator-host"))
        .arg("smollm2")
        .arg(parent.path())
        .env("OMNI_STAGE_BIN", runtime_support::stage_binary())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let host_pid = host.id();
    // The workers' logs come through the host's stderr: kill once the
    // stage says it loads its model (its process is up and watching; before
    // exec, a signal simply ends it, with nothing to clean up yet).
    let stderr = host.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(|l| l.ok())
        {
            if line.contains("loading model") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(120)).is_err() {
        let _ = host.kill();
        return Err("no stage started loading".into());
    }
    let workers = omni_tests::child_pids(host_pid);
    assert!(!workers.is_empty(), "no worker under the host");
    let run_dirs = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(parent.path())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    assert_eq!(run_dirs().len(), 1, "one run directory while loading");
    host.kill()?;
    host.wait()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let gone = rt.block_on(eventually(Duration::from_secs(30), || {
        workers.iter().all(|&p| !pid_alive(p))
    }));
    assert!(gone, "workers {workers:?} outlived their orchestrator");
    let cleaned = rt.block_on(eventually(Duration::from_secs(10), || {
        run_dirs().is_empty()
    }));
    assert!(cleaned, "left behind: {:?}", run_dirs());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_killed_outright_is_cleaned_up_by_the_next_one() -> TestResult {
    let parent = tempfile::tempdir()?;
    let (mut host, run_dir, pids) = start_host(Some(parent.path()))?;
    // Freeze every process first, so none can clean up (a worker would on
    // its orchestrator's death), then kill them all: `kill -9` of the whole
    // process group, or the OOM killer.
    let all: Vec<libc::pid_t> = pids
        .iter()
        .map(|&p| p as libc::pid_t)
        .chain([host.id() as libc::pid_t])
        .collect();
    for sig in [libc::SIGSTOP, libc::SIGKILL] {
        for &p in &all {
            // SAFETY: plain kill(2) of processes this test started.
            assert_eq!(unsafe { libc::kill(p, sig) }, 0);
        }
    }
    host.wait()?;
    assert!(
        eventually(Duration::from_secs(30), || pids
            .iter()
            .all(|&p| !pid_alive(p)))
        .await
    );
    assert!(run_dir.is_dir(), "nobody was left to remove it");

    // The next pipeline under the same parent removes it before it starts
    // (this one then fails fast, which is beside the point).
    let opts = OrchestratorOptions {
        run_dir_parent: Some(parent.path().to_path_buf()),
        init_timeout: Duration::from_millis(1),
        ..options()
    };
    let _ = Orchestrator::start(PipelineConfig::builtin("smollm2")?, opts).await;
    assert!(!run_dir.exists(), "{} is still there", run_dir.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_failures_name_the_stage_and_clean_up() -> TestResult {
    let parent = tempfile::tempdir()?;
    // A worker binary that does not exist.
    let opts = OrchestratorOptions {
        stage_binary: Some(parent.path().join("no-such-omni-stage")),
        run_dir_parent: Some(parent.path().to_path_buf()),
        ..options()
    };
    let e = Orchestrator::start(PipelineConfig::builtin("smollm2")?, opts)
        .await
        .err()
        .ok_or("started without a binary")?;
    assert!(matches!(e, Error::StageBinaryNotFound { .. }), "{e}");
    assert!(
        e.to_string().contains("no-such-omni-stage") && e.to_string().contains("OMNI_STAGE_BIN"),
        "{e}"
    );

    // A model that does not exist: the stage exits and says why.
    let mut config = PipelineConfig::builtin("smollm2")?;
    config.stages[0].engine_args.model = parent.path().join("missing.gguf").display().to_string();
    let opts = OrchestratorOptions {
        run_dir_parent: Some(parent.path().to_path_buf()),
        ..options()
    };
    let e = Orchestrator::start(config, opts)
        .await
        .err()
        .ok_or("started with a missing model")?;
    match &e {
        Error::StageFailedToStart {
            stage_id: 0, log, ..
        } => assert!(log.contains("missing.gguf"), "{e}"),
        other => {
            return Err(format!("expected StageFailedToStart for stage 0, got {other}").into())
        }
    }

    // A stage that cannot be ready in time.
    let opts = OrchestratorOptions {
        run_dir_parent: Some(parent.path().to_path_buf()),
        init_timeout: Duration::from_millis(1),
        ..options()
    };
    let e = Orchestrator::start(PipelineConfig::builtin("smollm2")?, opts)
        .await
        .err()
        .ok_or("ready in 1 ms?")?;
    assert!(
        matches!(e, Error::StageInitTimeout { stage_id: 0, .. }),
        "{e}"
    );

    // Every failed start removed its run directory.
    nothing_left_in(parent.path()).await;
    Ok(())
}

/// Waits (up to 20 s) until `parent` holds no run directory.
async fn nothing_left_in(parent: &std::path::Path) {
    let empty = eventually(Duration::from_secs(20), || {
        std::fs::read_dir(parent)
            .map(|d| d.count() == 0)
            .unwrap_or(false)
    })
    .await;
    assert!(empty, "leftovers in {}", parent.display());
}

/// Starts `config` (with `worker_env` and `init_timeout`) expecting it to
/// fail; returns the error and checks nothing is left in the run directory
/// parent.
async fn start_fails(
    config: PipelineConfig,
    worker_env: Vec<(String, String)>,
    init_timeout: Duration,
) -> Result<Error, Box<dyn std::error::Error + Send + Sync>> {
    let parent = tempfile::tempdir()?;
    let opts = OrchestratorOptions {
        run_dir_parent: Some(parent.path().to_path_buf()),
        worker_env,
        init_timeout,
        ..options()
    };
    let started = std::time::Instant::now();
    let e = match Orchestrator::start(config, opts).await {
        Ok(orch) => {
            orch.shutdown().await?;
            return Err("the pipeline started".into());
        }
        Err(e) => e,
    };
    assert!(
        started.elapsed() < init_timeout + Duration::from_secs(30),
        "the failure took {:?}, past the init timeout",
        started.elapsed()
    );
    nothing_left_in(parent.path()).await;
    Ok(e)
}

/// The log of a stage that failed to start, or what the error was instead.
fn failed_stage_log(e: &Error, stage: usize) -> Result<String, String> {
    match e {
        Error::StageFailedToStart { stage_id, log, .. } if *stage_id == stage => Ok(log.clone()),
        other => Err(format!(
            "expected StageFailedToStart for stage {stage}, got {other}"
        )),
    }
}

/// Weights that are cut short or not the file they claim to be, and a load
/// that never ends: each fails the start with an error naming the stage
/// and the file, within the init timeout, and leaves no process or run
/// directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_hanging_weights_fail_the_start_naming_the_stage() -> TestResult {
    let dir = tempfile::tempdir()?;
    let smollm2 = omni_engine::resolve_model_path("smollm2")?;
    let patient = Duration::from_secs(300);

    // A GGUF cut in half, as an interrupted download leaves it (the header
    // and tensor table whole, the data short).
    let truncated = dir.path().join("truncated.gguf");
    std::fs::copy(&smollm2, &truncated)?;
    let len = std::fs::metadata(&truncated)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)?
        .set_len(len / 2)?;
    let mut config = PipelineConfig::builtin("smollm2")?;
    config.stages[0].engine_args.model = truncated.display().to_string();
    let e = start_fails(config, Vec::new(), patient).await?;
    let log = failed_stage_log(&e, 0)?;
    assert!(
        log.contains("truncated.gguf") && log.contains("the file is truncated"),
        "{log}"
    );

    // The known default model with the right size and the wrong bytes.
    let models = dir.path().join("models");
    std::fs::create_dir(&models)?;
    let fake = std::fs::File::create(models.join(omni_engine::SMOLLM2.file_name))?;
    fake.set_len(omni_engine::SMOLLM2.size)?;
    drop(fake);
    let env = vec![("OMNI_MODEL_DIR".to_owned(), models.display().to_string())];
    let e = start_fails(PipelineConfig::builtin("smollm2")?, env, patient).await?;
    let log = failed_stage_log(&e, 0)?;
    assert!(
        log.contains("sha256") && log.contains(omni_engine::SMOLLM2.sha256),
        "{log}"
    );

    // A Hugging Face folder with one safetensors shard cut in half.
    let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../omni-engine/tests/fixtures/qwen2_5_omni/tiny");
    let copy = dir.path().join("qwen-cut");
    std::fs::create_dir(&copy)?;
    for f in std::fs::read_dir(&tiny)? {
        let f = f?;
        std::fs::copy(f.path(), copy.join(f.file_name()))?;
    }
    let shard = copy.join("model-00001-of-00003.safetensors");
    let len = std::fs::metadata(&shard)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)?
        .set_len(len / 2)?;
    let mut config = PipelineConfig::builtin("qwen2_5_omni")?;
    for s in &mut config.stages {
        s.engine_args.model = copy.display().to_string();
    }
    let e = start_fails(config, Vec::new(), patient).await?;
    match &e {
        Error::StageFailedToStart { log, .. } => assert!(
            log.contains("model-00001-of-00003.safetensors") && log.contains("safetensors"),
            "{log}"
        ),
        other => return Err(format!("expected StageFailedToStart, got {other}").into()),
    }

    // A model file whose read never ends (a FIFO nobody writes, as a hung
    // network mount): the init timeout ends the start, naming the stage.
    let fifo = dir.path().join("hang.gguf");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())?;
    // SAFETY: mkfifo reads a NUL-terminated path.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        return Err(format!("mkfifo: {}", std::io::Error::last_os_error()).into());
    }
    let mut config = PipelineConfig::builtin("smollm2")?;
    config.stages[0].engine_args.model = fifo.display().to_string();
    let e = start_fails(config, Vec::new(), Duration::from_secs(10)).await?;
    assert!(
        matches!(e, Error::StageInitTimeout { stage_id: 0, .. }),
        "{e}"
    );
    Ok(())
}
