//! The default pipeline end to end: two SmolLM2 stages, each in its own
//! `omni-stage` process; both final outputs come back and equal
//! transformers' run of the same two steps by hand (`default-pipeline.json`:
//! stage 1's summarize prompt written out in the fixture script, not made by
//! Omni's processor), and shutdown leaves no process or socket behind.

mod runtime_support;

use std::time::Duration;

use omni_engine::Prompt;
use omni_runtime::{Orchestrator, PipelineConfig, StageEvent, StageOutput};
use omni_tests::{default_pipeline_fixture, json_ids};
use runtime_support::{eventually, greedy, options, pid_alive, TestResult};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_pipeline_runs_both_stages_in_their_own_processes() -> TestResult {
    let fixture = default_pipeline_fixture()?;
    let expected = &fixture["stages"];
    let mut config = PipelineConfig::builtin("default")?;
    // fp32, as the reference: greedy tokens then match exactly (the fp16
    // default could flip a step whose margin is small).
    for s in &mut config.stages {
        s.engine_args.dtype = Some("float32".into());
        s.engine_args.weight_precision = Some("fp32".into());
    }
    let params = greedy(&config, &[24, 12]);
    let orch = Orchestrator::start(config, options()).await?;
    let stages = orch.stages().to_vec();
    assert_eq!(stages.len(), 2);
    let me = std::process::id();
    assert!(stages.iter().all(|s| s.pid != me && pid_alive(s.pid)));
    assert_ne!(stages[0].pid, stages[1].pid);
    assert!(
        stages.iter().all(|s| s.model_name.contains("SmolLM2")),
        "{stages:?}"
    );
    let run_dir = orch.run_dir().to_path_buf();
    assert!(run_dir.is_dir());

    let prompt = Prompt::Text(
        expected[0]["prompt"]
            .as_str()
            .ok_or("fixture prompt")?
            .to_string(),
    );
    let mut rx = orch
        .submit("req-1".to_string(), prompt, params.clone())
        .await?;
    let mut finals: [Option<StageOutput>; 2] = [None, None];
    let mut deltas = [String::new(), String::new()];
    let collect = async {
        while let Some(ev) = rx.recv().await {
            match ev {
                StageEvent::Output { stage_id, output } => {
                    assert!(finals[stage_id].is_none(), "output after the final one");
                    deltas[stage_id].push_str(&output.delta_text);
                    if output.finished {
                        finals[stage_id] = Some(*output);
                    }
                }
                StageEvent::Error(e) => return Err(e),
                _ => {}
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(300), collect).await??;
    let [Some(s0), Some(s1)] = finals else {
        return Err(format!("missing a final output: {finals:?}").into());
    };
    for (i, s) in [&s0, &s1].into_iter().enumerate() {
        assert_eq!(s.stage_id, i);
        assert_eq!(s.request_id, "req-1");
        assert!(
            !s.token_ids.is_empty() && !s.text.trim().is_empty(),
            "stage {i}: {s:?}"
        );
        assert_eq!(
            deltas[i], s.text,
            "stage {i}: deltas concatenate to the text"
        );
        let m = s.metrics.as_ref().ok_or("metrics on the final output")?;
        assert_eq!(m.num_generated_tokens, s.token_ids.len());
        assert!(m.finished_unix_us.is_some());
    }
    assert!(s0.token_ids.len() <= 24 && s1.token_ids.len() <= 12);
    // Stage 1 started from stage 0's finished output.
    let (m0, m1) = (
        s0.metrics.clone().unwrap_or_default(),
        s1.metrics.clone().unwrap_or_default(),
    );
    assert!(m1.arrival_unix_us >= m0.finished_unix_us.unwrap_or(u64::MAX));

    // What transformers made of the same two steps.
    assert_eq!(s0.token_ids, json_ids(&expected[0]["token_ids"]), "stage 0");
    assert_eq!(Some(s0.text.as_str()), expected[0]["text"].as_str());
    assert_eq!(
        m1.num_prompt_tokens,
        json_ids(&expected[1]["prompt_token_ids"]).len(),
        "stage 1's prompt: {:?}",
        expected[1]["rendered"]
    );
    assert_eq!(
        s1.token_ids,
        json_ids(&expected[1]["token_ids"]),
        "stage 1 (prompt {:?})",
        expected[1]["rendered"]
    );

    // A second request reuses the running stages.
    let mut rx = orch
        .submit(
            "req-2".to_string(),
            Prompt::Text("Water boils at".into()),
            greedy(orch.config(), &[4, 4]),
        )
        .await?;
    let mut finished = 0;
    tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(ev) = rx.recv().await {
            if let StageEvent::Output { output, .. } = ev {
                finished += output.finished as usize;
            }
        }
    })
    .await?;
    assert_eq!(finished, 2);

    let pids: Vec<u32> = stages.iter().map(|s| s.pid).collect();
    tokio::time::timeout(Duration::from_secs(60), orch.shutdown()).await??;
    assert!(
        pids.iter().all(|&p| !pid_alive(p)),
        "every stage process exited"
    );
    assert!(
        eventually(Duration::from_secs(5), || !run_dir.exists()).await,
        "run directory removed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_typed_errors() -> TestResult {
    let config = PipelineConfig::builtin("smollm2")?;
    let orch = Orchestrator::start(config, options()).await?;
    // Wrong number of per-stage params.
    let e = orch
        .submit("a".into(), Prompt::Text("hi".into()), vec![])
        .await
        .err()
        .ok_or("accepted 0 params")?;
    assert!(
        matches!(
            e,
            omni_runtime::Error::SamplingParamsCount {
                expected: 1,
                got: 0
            }
        ),
        "{e}"
    );
    // Unknown stage id for profiling, before anything is sent.
    let e = orch
        .start_profile(Some(&[0, 5]))
        .await
        .err()
        .ok_or("accepted stage 5")?;
    assert!(
        matches!(e, omni_runtime::Error::UnknownStage { stage_id: 5, .. }),
        "{e}"
    );
    // A prompt longer than the context (8192) comes back as a typed rejection.
    let mut rx = orch
        .submit(
            "b".into(),
            Prompt::TokenIds(vec![1; 9000]),
            greedy(orch.config(), &[4]),
        )
        .await?;
    let ev = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await?
        .ok_or("stream ended silently")?;
    match ev {
        StageEvent::Error(omni_runtime::Error::RequestRejected {
            stage_id: 0,
            request_id,
            ..
        }) => assert_eq!(request_id, "b"),
        other => return Err(format!("expected a stage error, got {other:?}").into()),
    }
    // Duplicate ids while in flight.
    let _rx = orch
        .submit(
            "c".into(),
            Prompt::Text("Count to ten:".into()),
            greedy(orch.config(), &[64]),
        )
        .await?;
    let e = orch
        .submit(
            "c".into(),
            Prompt::Text("x".into()),
            greedy(orch.config(), &[4]),
        )
        .await
        .err()
        .ok_or("accepted a duplicate id")?;
    assert!(
        matches!(e, omni_runtime::Error::RequestIdInUse(ref id) if id == "c"),
        "{e}"
    );
    orch.abort("c").await?;
    let h = orch.health(0).await?;
    assert_eq!(h.stage_id, 0);
    tokio::time::timeout(Duration::from_secs(60), orch.shutdown()).await??;
    Ok(())
}
