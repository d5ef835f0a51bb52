//! Profiling toggled on and off with `AsyncOmni` while 8 requests stream:
//! every stage writes a trace of the steps inside the window, and every
//! request completes.
//!
//! One test per file: it sets `VLLM_TORCH_PROFILER_DIR` for the stage
//! processes it starts, which must not leak into other tests.
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use omni_core::{AsyncOmni, OmniEngineArgs, SamplingParams};
use omni_tests::{
    assert_window, chat, ensure_binaries, err, now_us, tiny_params, window_contents, Result,
    DEFAULT_STAGE_NAMES,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiling_toggled_while_8_requests_stream_loses_no_request() -> Result {
    ensure_binaries()?;
    let dir = tempfile::tempdir()?;
    std::env::set_var("VLLM_TORCH_PROFILER_DIR", dir.path());
    let omni = Arc::new(AsyncOmni::from_engine_args(OmniEngineArgs::new("default")).await?);

    let params = SamplingParams {
        ignore_eos: true,
        ..tiny_params(96)
    };
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel::<()>(8);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let omni = Arc::clone(&omni);
        let params = vec![params.clone(), tiny_params(6)];
        let first_tx = first_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = omni
                .generate(
                    chat(&format!("Tell me about the number {i}.")),
                    params,
                    format!("p{i}"),
                )
                .await?;
            let mut finished = BTreeSet::new();
            let mut n = 0;
            while let Some(out) = stream.next().await {
                let out = out?;
                n += 1;
                if n == 1 {
                    let _ = first_tx.send(()).await;
                }
                if out.finished {
                    finished.insert(out.stage_id);
                }
            }
            Ok::<_, omni_tests::BoxError>(finished)
        }));
    }
    drop(first_tx);
    // Every request is streaming before the profiler starts.
    for _ in 0..8 {
        first_rx
            .recv()
            .await
            .ok_or_else(|| err("a request ended before streaming"))?;
    }
    let start = now_us();
    omni.start_profile(None).await?;
    // Stage 0 steps its batch of eight under the profiler (two steps, by its
    // own token count); stop while the requests are still in flight.
    let opened = omni.stage_health(0).await?.generated_tokens;
    let mut stepped = false;
    for _ in 0..1200 {
        if omni.stage_health(0).await?.generated_tokens >= opened + 16 {
            stepped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(stepped, "stage 0 generated nothing with the profiler on");
    let traces = omni.stop_profile().await?;
    let window = (start, now_us());

    for t in tasks {
        let finished = t.await??;
        assert_eq!(
            finished,
            BTreeSet::from([0, 1]),
            "a request lost a stage's final output"
        );
    }
    assert_eq!(
        traces.keys().copied().collect::<Vec<_>>(),
        vec![0, 1],
        "{traces:?}"
    );
    for (stage, paths) in &traces {
        assert!(!paths.is_empty(), "stage {stage} wrote no trace");
        for p in paths {
            assert!(
                p.starts_with(dir.path()),
                "{} is outside the profiler dir",
                p.display()
            );
            let dir_name = p
                .parent()
                .and_then(|d| d.file_name())
                .and_then(|n| n.to_str())
                .unwrap_or("");
            assert!(
                dir_name.starts_with(&format!("stage_{stage}_")),
                "{} not in stage_{stage}_*",
                p.display()
            );
        }
    }
    // Stage 0 stepped all eight requests in the window; stage 1 at most
    // them (it may not have started any yet).
    let ids: BTreeSet<String> = (0..8).map(|i| format!("p{i}")).collect();
    assert_window(
        0,
        &traces[&0],
        window,
        DEFAULT_STAGE_NAMES[0],
        &ids.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let w1 = window_contents(&traces[&1], window.0, window.1)?;
    assert!(
        w1.process_names == BTreeSet::from([DEFAULT_STAGE_NAMES[1].to_owned()])
            && w1.step_requests.is_subset(&ids),
        "stage 1's first window: {w1:?}"
    );

    // A second window during more traffic gives a second file per stage.
    let start = now_us();
    omni.start_profile(Some(&[1])).await?;
    let mut stream = omni
        .generate(chat("Hi."), vec![tiny_params(4), tiny_params(4)], "after")
        .await?;
    while let Some(out) = stream.next().await {
        out?;
    }
    let second = omni.stop_profile().await?;
    let window = (start, now_us());
    assert_eq!(
        second.keys().copied().collect::<Vec<_>>(),
        vec![1],
        "{second:?}"
    );
    for p in &second[&1] {
        assert!(
            !traces[&1].contains(p),
            "window 2 overwrote {}",
            p.display()
        );
    }
    assert_window(1, &second[&1], window, DEFAULT_STAGE_NAMES[1], &["after"])?;
    Ok(())
}
