//! `OmniLLM` on the default pipeline (two SmolLM2 stages, each its own
//! process): outputs in prompt order with per-stage metrics (prefix-cache
//! hits included), the answer
//! stage agreeing with the engine run in-process, and typed errors for bad
//! input.
use omni_core::{Error, OmniEngineArgs, OmniLLM, SamplingParams, StageSamplingParams};
use omni_tests::{chat, ensure_binaries, tiny_params, Result};

fn start() -> Result<OmniLLM> {
    ensure_binaries()?;
    Ok(OmniLLM::from_engine_args(OmniEngineArgs::new("default"))?)
}

#[test]
fn generate_returns_final_outputs_in_prompt_order_with_stage_metrics() -> Result {
    let omni = start()?;
    assert_eq!(omni.stages().len(), 2);
    assert_eq!(omni.final_stage_ids(), &[0, 1]);
    let prompts = [
        "What is the capital of France?",
        "Name a colour.",
        "Count to three.",
    ];
    let params = vec![tiny_params(8), tiny_params(6)];
    let outputs = omni.generate(prompts.iter().map(|p| chat(p)), params)?;

    // Every final output of every prompt, by prompt then by stage.
    let order: Vec<(String, usize)> = outputs
        .iter()
        .map(|o| (o.request_id.clone(), o.stage_id))
        .collect();
    let first: u64 = outputs[0].request_id.parse()?;
    let expected: Vec<(String, usize)> = (0..3u64)
        .flat_map(|i| [((first + i).to_string(), 0), ((first + i).to_string(), 1)])
        .collect();
    assert_eq!(order, expected);

    for out in &outputs {
        assert!(out.finished, "{out:?}");
        assert_eq!(out.final_output_type, "text");
        assert!(
            !out.token_ids.is_empty(),
            "stage {} generated nothing",
            out.stage_id
        );
        let limit = if out.stage_id == 0 { 8 } else { 6 };
        assert!(
            out.token_ids.len() <= limit,
            "{} tokens > max_tokens {limit}",
            out.token_ids.len()
        );
        assert!(
            !out.text.trim().is_empty(),
            "stage {} text is empty",
            out.stage_id
        );
        let own = out
            .metrics
            .stage(out.stage_id)
            .ok_or_else(|| omni_tests::err(format!("no metrics for stage {}", out.stage_id)))?;
        assert_eq!(own.num_generated_tokens, out.token_ids.len());
        assert!(own.num_prompt_tokens > 0);
        assert!(
            !own.compute_time.is_zero(),
            "stage {} compute time is zero",
            out.stage_id
        );
        assert!(out.metrics.e2e_latency >= own.compute_time.min(out.metrics.e2e_latency));
        // The chat template's system prompt is shared: after the first
        // prompt, each stage's prefix cache holds at least its first block.
        if out.request_id == outputs[0].request_id {
            assert_eq!(own.num_cached_tokens, 0, "{own:?}");
        } else {
            assert!(own.num_cached_tokens >= 16, "{own:?}");
            assert!(own.num_cached_tokens < own.num_prompt_tokens, "{own:?}");
        }
    }
    // Stage 1's output carries stage 0's metrics too: its time went through both.
    let s1 = &outputs[1];
    assert!(s1.metrics.stage(0).is_some(), "{:?}", s1.metrics);
    assert!(s1.metrics.e2e_latency >= outputs[0].metrics.e2e_latency);
    omni.shutdown()?;
    Ok(())
}

#[test]
fn answer_stage_matches_the_engine_in_process() -> Result {
    // Greedy decoding is deterministic: stage 0 in its own process must
    // produce exactly what omni-engine produces in this one.
    let prompt = chat("Why is the sky blue?");
    let params = tiny_params(10);
    // The same engine args as the pipeline's stage 0.
    let config = omni_core::PipelineConfig::builtin("default")?;
    let mut engine = omni_core::engine::LLMEngine::new(&config.stages[0].engine_args)?;
    engine.add_request("ref", prompt.clone(), params.clone())?;
    let mut reference = None;
    while engine.has_unfinished() {
        for out in engine.step()? {
            if out.finished {
                reference = Some(out.token_ids);
            }
        }
    }
    let reference = reference.ok_or_else(|| omni_tests::err("engine produced no output"))?;
    drop(engine);

    let omni = start()?;
    let outputs = omni.generate([prompt], vec![params, tiny_params(4)])?;
    assert_eq!(outputs[0].stage_id, 0);
    assert_eq!(outputs[0].token_ids, reference);
    Ok(())
}

#[test]
fn bad_input_gets_typed_errors_naming_the_value() -> Result {
    let omni = start()?;
    let none: Vec<String> = Vec::new();
    assert!(matches!(
        omni.generate(none, tiny_params(4)),
        Err(Error::EmptyPrompts)
    ));

    let three = vec![tiny_params(4), tiny_params(4), tiny_params(4)];
    match omni.generate(["hi"], three) {
        Err(
            e @ Error::SamplingParamsCount {
                expected: 2,
                got: 3,
            },
        ) => {
            let msg = e.to_string();
            assert!(msg.contains('3') && msg.contains('2'), "{msg}");
        }
        other => panic!("expected SamplingParamsCount, got {other:?}"),
    }

    match omni.start_profile(Some(&[1, 7])) {
        Err(e @ Error::UnknownStage { stage_id: 7, .. }) => assert!(e.to_string().contains('7')),
        other => panic!("expected UnknownStage 7, got {other:?}"),
    }

    let bad = SamplingParams {
        top_p: 1.5,
        ..tiny_params(4)
    };
    match omni.generate(["hi"], bad) {
        Err(e @ Error::InvalidSamplingParams { .. }) => {
            assert!(e.to_string().contains("1.5"), "{e}");
            assert!(e.is_invalid_input());
        }
        other => panic!("expected InvalidSamplingParams, got {other:?}"),
    }

    match omni.generate([""], StageSamplingParams::Defaults) {
        Err(Error::EmptyPrompt { index: 0 }) => {}
        other => panic!("expected EmptyPrompt, got {other:?}"),
    }

    // The pipeline still works after refusing all of that.
    let outputs = omni.generate(["Say hi."], tiny_params(3))?;
    assert_eq!(outputs.len(), 2);
    Ok(())
}

#[test]
fn unknown_pipeline_is_an_error_naming_it() -> Result {
    match OmniLLM::from_engine_args(OmniEngineArgs::new("no-such-pipeline")) {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("no-such-pipeline"), "{msg}");
        }
        Ok(_) => panic!("a pipeline named no-such-pipeline started"),
    }
    Ok(())
}

/// A user's own pipeline file, passed by path as `stage_configs_path`:
/// stage 0 answers (ending with EOS); stage 1 takes its text (`text2text`,
/// the EOS gone), stage 2 its token ids (`token_ids`, the EOS kept). Every
/// stage's tokens equal transformers' run of the same steps
/// (`default-pipeline.json`), at fp32 as the reference.
#[test]
fn a_users_pipeline_file_runs_the_text_and_token_id_processors() -> Result {
    ensure_binaries()?;
    let fixture = &omni_tests::default_pipeline_fixture()?["processors"];
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("mine.yaml");
    let stage = |id: usize, extra: &str| {
        format!(
            "  - stage_id: {id}
    engine_args:
      model: smollm2
      dtype: float32
      weight_precision: fp32
      kv_cache_memory_bytes: 67108864
    final_output: true
    final_output_type: text
{extra}"
        )
    };
    std::fs::write(
        &path,
        format!(
            "name: mine\nstage_args:\n{}{}{}",
            stage(0, ""),
            stage(
                1,
                "    engine_input_source: [0]\n    custom_process_input_func: text2text\n"
            ),
            stage(
                2,
                "    engine_input_source: [0]\n    custom_process_input_func: token_ids\n"
            ),
        ),
    )?;
    let omni = OmniLLM::from_engine_args(OmniEngineArgs {
        stage_configs_path: Some(path.clone()),
        ..OmniEngineArgs::new("mine")
    })?;
    let greedy = |n: usize| SamplingParams {
        temperature: 0.0,
        max_tokens: Some(n),
        ..SamplingParams::default()
    };
    let prompt = fixture["answer"]["prompt"].as_str().unwrap_or_default();
    let outputs = omni.generate(
        [omni_core::Prompt::Text(prompt.into())],
        vec![greedy(40), greedy(8), greedy(8)],
    )?;
    let expected = [
        &fixture["answer"],
        &fixture["text2text"],
        &fixture["token_ids"],
    ];
    assert_ne!(
        expected[1]["prompt_token_ids"], expected[2]["prompt_token_ids"],
        "the fixture no longer tells the two processors apart"
    );
    assert_eq!(outputs.len(), 3, "{outputs:?}");
    for (out, want) in outputs.iter().zip(expected) {
        let m = out
            .metrics
            .stage(out.stage_id)
            .ok_or("the stage metrics on its final output")?;
        assert_eq!(
            (m.num_prompt_tokens, &out.token_ids),
            (
                omni_tests::json_ids(&want["prompt_token_ids"]).len(),
                &omni_tests::json_ids(&want["token_ids"])
            ),
            "stage {}",
            out.stage_id
        );
    }
    omni.shutdown()?;

    // The same file loaded by the caller and handed over as a config.
    let config = omni_core::PipelineConfig::load(&path)?;
    let omni = OmniLLM::from_config(config, &OmniEngineArgs::new("mine"))?;
    assert_eq!(omni.final_stage_ids(), &[0, 1, 2]);
    let again = omni.generate(
        [omni_core::Prompt::Text(prompt.into())],
        vec![greedy(40), greedy(8), greedy(8)],
    )?;
    let ids = |o: &[omni_core::OmniRequestOutput]| -> Vec<Vec<u32>> {
        o.iter().map(|o| o.token_ids.clone()).collect()
    };
    assert_eq!(ids(&again), ids(&outputs));
    omni.shutdown()?;
    Ok(())
}
