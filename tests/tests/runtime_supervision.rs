//! Supervision with real processes: a stage SIGKILLed mid-request fails the
//! request with an error naming the stage and signal, the other stage exits
//! and the run directory goes; an orchestrator SIGKILLed leaves no worker
//! behind; when every process is SIGKILLed at once, the next pipeline removes
//! what they left; start-up failures name the stage and clean up.

mod runtime_support;

use std::io::BufRead;
use std::time::Duration;

use omni_engine::Prompt;
use omni_runtime::{Error, Orchestrator, OrchestratorOptions, PipelineConfig, StageEvent};
use runtime_support::{eventually, greedy, options, pid_alive, TestResult};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_stage_1_fails_the_request_and_cleans_up() -> TestResult {
    let config = PipelineConfig::builtin("default")?;
    let orch = Orchestrator::start(config, options()).await?;
    let pids: Vec<u32> = orch.stages().iter().map(|s| s.pid).collect();
    let run_dir = orch.run_dir().to_path_buf();
    // Stage 0 streams long enough (EOS ignored) that the request is surely
    // in flight when stage 1 dies.
    let mut params = greedy(orch.config(), &[200, 8]);
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
    assert!(
        matches!(first, StageEvent::Output { stage_id: 0, .. }),
        "{first:?}"
    );
    // SAFETY: plain kill(2) of a child process we own.
    assert_eq!(
        unsafe { libc::kill(pids[1] as libc::pid_t, libc::SIGKILL) },
        0
    );

    let err = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ev) = rx.recv().await {
            if let StageEvent::Error(e) = ev {
                return Some(e);
            }
        }
        None
    })
    .await?
    .ok_or("stream ended without an error")?;
    match &err {
        Error::StageDied {
            stage_id: 1,
            status,
        } => assert!(status.contains("SIGKILL"), "{status}"),
        other => return Err(format!("expected StageDied for stage 1, got {other}").into()),
    }
    assert!(err.to_string().contains("stage 1"), "{err}");
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
    assert!(matches!(e, Error::StageDied { stage_id: 1, .. }), "{e}");
    tokio::time::timeout(Duration::from_secs(30), orch.shutdown()).await??;
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
    let empty = eventually(Duration::from_secs(20), || {
        std::fs::read_dir(parent.path())
            .map(|d| d.count() == 0)
            .unwrap_or(false)
    })
    .await;
    assert!(empty, "leftovers in {}", parent.path().display());
    Ok(())
}
