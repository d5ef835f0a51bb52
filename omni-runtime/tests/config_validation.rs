//! Pipeline configs: the built-ins load, vLLM-Omni's layout parses, and
//! every kind of bad config is an error that names file, field and value.

use omni_runtime::{
    Backend, CpuThreads, Error, FinalOutputType, PipelineConfig, PlacementStrategy, TransportKind,
};

fn yaml(text: &str) -> Result<PipelineConfig, Error> {
    PipelineConfig::from_yaml_str(text, "test.yaml", "test")
}

/// The error's (field, value, reason), or a failure if it is not a field error.
fn field_error(r: Result<PipelineConfig, Error>) -> Result<(String, String, String), String> {
    match r {
        Err(Error::Config {
            file,
            field,
            value,
            reason,
        }) => {
            assert_eq!(file, "test.yaml");
            Ok((field, value, reason))
        }
        Err(other) => Err(format!("expected a config field error, got: {other}")),
        Ok(c) => Err(format!(
            "expected an error, got a config with {} stages",
            c.stages.len()
        )),
    }
}

#[test]
fn builtins_load_and_are_listed() -> Result<(), Error> {
    assert_eq!(
        PipelineConfig::builtin_names(),
        &["default", "smollm2", "speak", "piper", "qwen2_5_omni"]
    );
    // Every built-in parses, and its stages chain as their comments say.
    let speak = PipelineConfig::builtin("speak")?;
    assert_eq!(speak.stages[1].model_stage.as_deref(), Some("vits"));
    assert_eq!(
        speak.stages[1].custom_process_input_func.as_deref(),
        Some("text2speech")
    );
    assert_eq!(PipelineConfig::builtin("piper")?.stages.len(), 1);
    let omni = PipelineConfig::builtin("qwen2_5_omni")?;
    let stages: Vec<Option<&str>> = omni
        .stages
        .iter()
        .map(|s| s.model_stage.as_deref())
        .collect();
    assert_eq!(stages, [Some("thinker"), Some("talker"), Some("code2wav")]);
    assert!(omni.stages[0].default_sampling_params.output_states);
    assert_eq!(
        omni.stages[1].custom_process_input_func.as_deref(),
        Some("thinker2talker")
    );
    assert_eq!(omni.stages[2].engine_input_source, vec![1]);
    let d = PipelineConfig::builtin("default")?;
    assert_eq!(d.stages.len(), 2);
    assert_eq!(d.stages[1].engine_input_source, vec![0]);
    assert_eq!(
        d.stages[1].custom_process_input_func.as_deref(),
        Some("summarize")
    );
    assert!(d
        .stages
        .iter()
        .all(|s| s.final_output && s.final_output_type == FinalOutputType::Text));
    assert_eq!(d.entry_stages(), vec![0]);
    assert_eq!(d.downstream_of(0), vec![1]);
    let s = PipelineConfig::resolve("smollm2")?;
    assert_eq!(s.stages.len(), 1);
    assert_eq!(s.source, "builtin:smollm2");
    Ok(())
}

#[test]
fn unknown_pipeline_lists_builtins() {
    let e = PipelineConfig::resolve("no-such-pipeline")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no-such-pipeline") && e.contains("default") && e.contains("smollm2"),
        "{e}"
    );
}

#[test]
fn vllm_omni_layout_parses() -> Result<(), Error> {
    // Shaped like vllm_omni/model_executor/stage_configs/qwen2_5_omni.yaml.
    let c = yaml(
        r#"
stage_args:
  - stage_id: 0
    engine_args:
      model_stage: thinker
      model_arch: Qwen2_5OmniForConditionalGeneration
      worker_cls: vllm_omni.worker.AR_gpu_worker.ARGPUWorker
      gpu_memory_utilization: 0.32
      enforce_eager: true
      engine_output_type: latent
      model: smollm2
    final_output: true
    final_output_type: text
  - stage_id: 1
    engine_args: {model_stage: talker, model: smollm2}
    engine_input_source: [0]
    custom_process_input_func: vllm_omni.model_executor.stage_input_processors.text2text
    runtime: {address: "tcp://127.0.0.1:5999"}
    profiler: chrome
"#,
    )?;
    assert_eq!(c.stages[0].model_stage.as_deref(), Some("thinker"));
    assert_eq!(c.stages[1].model_stage.as_deref(), Some("talker"));
    assert!(!c.stages[1].final_output);
    assert_eq!(
        c.profiler_backend(1),
        std::env::var("OMNI_PROFILER_BACKEND").unwrap_or_else(|_| "chrome".into())
    );
    Ok(())
}

#[test]
fn json_parses_like_yaml() -> Result<(), Error> {
    let c = PipelineConfig::from_json_str(
        r#"{"stage_args": [{"stage_id": 0, "engine_args": {"model": "smollm2"}, "final_output": true}],
            "runtime": {"transport": "tcp"}}"#,
        "p.json",
        "p",
    )?;
    assert_eq!(c.runtime.transport, TransportKind::Tcp);
    Ok(())
}

#[test]
fn yaml_syntax_error_names_file() {
    match yaml("stage_args: [") {
        Err(Error::ConfigSyntax { file, format, .. }) => {
            assert_eq!(file, "test.yaml");
            assert_eq!(format, "yaml");
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
}

#[test]
fn unknown_source_stage() -> Result<(), String> {
    let (field, value, reason) = field_error(yaml(
        "stage_args:\n  - {stage_id: 0, final_output: true}\n  - {stage_id: 1, engine_input_source: [7]}\n",
    ))?;
    assert_eq!(field, "stage_args[1].engine_input_source[0]");
    assert_eq!(value, "7");
    assert!(reason.contains("unknown stage"), "{reason}");
    Ok(())
}

#[test]
fn duplicate_stage_id() -> Result<(), String> {
    let (field, value, reason) = field_error(yaml(
        "stage_args:\n  - {stage_id: 0, final_output: true}\n  - {stage_id: 0}\n",
    ))?;
    assert_eq!(
        (field.as_str(), value.as_str()),
        ("stage_args[1].stage_id", "0")
    );
    assert!(reason.contains("duplicate"), "{reason}");
    Ok(())
}

#[test]
fn cycle_is_spelled_out() -> Result<(), String> {
    let (field, _value, reason) = field_error(yaml(
        "stage_args:\n  - {stage_id: 0, final_output: true}\n  - {stage_id: 1, engine_input_source: [2]}\n  - {stage_id: 2, engine_input_source: [1]}\n",
    ))?;
    assert!(field.ends_with("engine_input_source"), "{field}");
    assert!(
        reason.contains("cycle")
            && (reason.contains("1 -> 2 -> 1") || reason.contains("2 -> 1 -> 2")),
        "{reason}"
    );
    Ok(())
}

#[test]
fn no_final_output() -> Result<(), String> {
    let (field, _, reason) = field_error(yaml("stage_args:\n  - {stage_id: 0}\n"))?;
    assert!(field.contains("final_output"), "{field}");
    assert!(reason.contains("final_output"), "{reason}");
    Ok(())
}

#[test]
fn self_loop_and_no_entry() -> Result<(), String> {
    let (field, value, reason) = field_error(yaml(
        "stage_args:\n  - {stage_id: 0, final_output: true, engine_input_source: [0]}\n",
    ))?;
    assert_eq!(
        (field.as_str(), value.as_str()),
        ("stage_args[0].engine_input_source[0]", "0")
    );
    assert!(reason.contains("own input"), "{reason}");
    Ok(())
}

#[test]
fn bad_values_name_field_and_value() -> Result<(), String> {
    let (field, value, _) = field_error(yaml(
        "stage_args:\n  - {stage_id: 0, final_output: true, final_output_type: smell}\n",
    ))?;
    assert_eq!(
        (field.as_str(), value.as_str()),
        ("stage_args[0].final_output_type", "\"smell\"")
    );

    let (field, value, _) = field_error(yaml("stage_args:\n  - {stage_id: zero}\n"))?;
    assert_eq!(
        (field.as_str(), value.as_str()),
        ("stage_args[0].stage_id", "\"zero\"")
    );

    let (field, value, reason) = field_error(yaml(
        "stage_args:\n  - {stage_id: 0, final_output: true, custom_process_input_func: summarize}\n",
    ))?;
    assert_eq!(
        (field.as_str(), value.as_str()),
        ("stage_args[0].custom_process_input_func", "\"summarize\"")
    );
    assert!(reason.contains("entry stage"), "{reason}");

    let (field, value, reason) = field_error(yaml(
        "stage_args:\n  - {stage_id: 0, final_output: true}\n  - {stage_id: 1, engine_input_source: [0], custom_process_input_func: nope}\n",
    ))?;
    assert_eq!(
        (field.as_str(), value.as_str()),
        ("stage_args[1].custom_process_input_func", "\"nope\"")
    );
    assert!(
        reason.contains("summarize"),
        "known processors listed: {reason}"
    );

    let (field, _, reason) = field_error(yaml(
        "stage_args:\n  - {stage_id: 0, final_output: true, colour: red}\n",
    ))?;
    assert_eq!(field, "stage_args[0].colour");
    assert!(reason.contains("unknown"), "{reason}");

    let (field, value, _) = field_error(yaml(
        "stage_args:\n  - {stage_id: 0, final_output: true, profiler: perf}\n",
    ))?;
    assert_eq!(
        (field.as_str(), value.as_str()),
        ("stage_args[0].profiler", "\"perf\"")
    );

    let (field, value, _) = field_error(yaml(
        "runtime: {transport: carrier-pigeon}\nstage_args:\n  - {stage_id: 0, final_output: true}\n",
    ))?;
    assert_eq!(
        (field.as_str(), value.as_str()),
        ("runtime.transport", "\"carrier-pigeon\"")
    );

    let (field, value, _) = field_error(yaml(
        "stage_args:\n  - {stage_id: 0, final_output: true, default_sampling_params: {max_tokens: lots}}\n",
    ))?;
    assert_eq!(
        (field.as_str(), value.as_str()),
        (
            "stage_args[0].default_sampling_params.max_tokens",
            "\"lots\""
        )
    );

    let (field, value, _) = field_error(yaml(
        "stage_args:\n  - {stage_id: 0, final_output: true, engine_args: {max_num_seqs: -3}}\n",
    ))?;
    assert_eq!(
        (field.as_str(), value.as_str()),
        ("stage_args[0].engine_args.max_num_seqs", "-3")
    );
    Ok(())
}

#[test]
fn stage_round_trips_through_launch_json() -> Result<(), Error> {
    let c = PipelineConfig::builtin("default")?;
    for s in &c.stages {
        let back = omni_runtime::StageConfig::from_json("launch", "stage", &s.to_json()?)?;
        assert_eq!(back.stage_id, s.stage_id);
        assert_eq!(back.model_stage, s.model_stage);
        assert_eq!(back.engine_input_source, s.engine_input_source);
        assert_eq!(back.custom_process_input_func, s.custom_process_input_func);
        assert_eq!(back.final_output_type, s.final_output_type);
        assert_eq!(back.engine_args.model, s.engine_args.model);
        assert_eq!(
            back.default_sampling_params.max_tokens,
            s.default_sampling_params.max_tokens
        );
    }
    Ok(())
}

#[test]
fn files_load_from_disk() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("mine.yml");
    std::fs::write(
        &p,
        "stage_args:\n  - {stage_id: 0, final_output: true, engine_args: {model: smollm2}}\n",
    )?;
    let c = PipelineConfig::resolve(p.to_str().ok_or("path")?)?;
    assert_eq!(c.name, "mine");
    match PipelineConfig::load(&dir.path().join("missing.yaml")) {
        Err(Error::ConfigRead { path, .. }) => assert!(path.ends_with("missing.yaml")),
        other => return Err(format!("expected a read error, got {other:?}").into()),
    }
    Ok(())
}

#[test]
fn streamed_edges_are_checked() -> Result<(), String> {
    let two = "stage_args:\n  - {stage_id: 0}\n  - {stage_id: 1, engine_input_source: [0], final_output: true, custom_process_input_func: thinker2talker, engine_args: {model_stage: talker}}\n";
    let ok = yaml(&format!(
        "{two}runtime:\n  edges:\n    - {{from: 0, to: 1, window_size: 4}}\n"
    ))
    .map_err(|e| e.to_string())?;
    assert_eq!(ok.streamed_edges_from(0), vec![(1, 4)]);
    assert!(ok.streamed_edges_from(1).is_empty());
    // -1 (and an edge not listed) is the whole output.
    let whole = yaml(&format!(
        "{two}runtime:\n  edges:\n    - {{from: 0, to: 1}}\n"
    ))
    .map_err(|e| e.to_string())?;
    assert!(whole.streamed_edges_from(0).is_empty());
    for (edges, want_value, want_reason) in [
        (
            "{from: 1, to: 0, window_size: 1}",
            "\"from\":1",
            "does not take input from stage 1",
        ),
        (
            "{from: 0, to: 7, window_size: 1}",
            "\"to\":7",
            "unknown stage 7",
        ),
        (
            "{from: 0, to: 1, window_size: 0}",
            "\"window_size\":0",
            "window_size must be -1",
        ),
        (
            "{from: 0, to: 1, window_size: -3}",
            "\"window_size\":-3",
            "window_size must be -1",
        ),
    ] {
        let (field, value, reason) =
            field_error(yaml(&format!("{two}runtime:\n  edges:\n    - {edges}\n")))?;
        assert_eq!(field, "runtime.edges[0]");
        assert!(value.contains(want_value), "{value}");
        assert!(reason.contains(want_reason), "{reason}");
    }
    let (field, _, reason) = field_error(yaml(&format!(
        "{two}runtime:\n  edges:\n    - {{from: 0, to: 1, window_size: 1}}\n    - {{from: 0, to: 1, window_size: 2}}\n"
    )))?;
    assert_eq!(field, "runtime.edges[1]");
    assert!(reason.contains("twice"), "{reason}");
    // A processor that needs the whole output cannot take pieces.
    let (_, _, reason) = field_error(yaml(
        "stage_args:\n  - {stage_id: 0}\n  - {stage_id: 1, engine_input_source: [0], final_output: true, custom_process_input_func: summarize}\nruntime:\n  edges:\n    - {from: 0, to: 1, window_size: 1}\n",
    ))?;
    assert!(
        reason.contains("\"summarize\"") && reason.contains("thinker2talker"),
        "{reason}"
    );
    // A processor that streams feeds only the engines that take pieces:
    // the talker's states, code2wav's codes.
    let (_, _, reason) = field_error(yaml(
        "stage_args:\n  - {stage_id: 0}\n  - {stage_id: 1, engine_input_source: [0], final_output: true}\nruntime:\n  edges:\n    - {from: 0, to: 1, window_size: 4}\n",
    ))?;
    assert!(
        reason.contains("model_stage -") && reason.contains("code2wav"),
        "{reason}"
    );
    // Unknown keys of an edge are named.
    let e = yaml(&format!(
        "{two}runtime:\n  edges:\n    - {{from: 0, to: 1, window: 2}}\n"
    ))
    .err()
    .ok_or("an unknown edge key was accepted")?;
    assert!(e.to_string().contains("window"), "{e}");
    Ok(())
}

/// `runtime.cpu_threads` takes `all` (the default) or `split`; anything
/// else is named.
#[test]
fn cpu_threads_is_all_or_split() -> Result<(), String> {
    let one = "stage_args:\n  - {stage_id: 0, final_output: true}\n";
    let default = yaml(one).map_err(|e| e.to_string())?;
    assert_eq!(default.runtime.cpu_threads, CpuThreads::All);
    let split =
        yaml(&format!("{one}runtime:\n  cpu_threads: split\n")).map_err(|e| e.to_string())?;
    assert_eq!(split.runtime.cpu_threads, CpuThreads::Split);
    let e = yaml(&format!("{one}runtime:\n  cpu_threads: half\n"))
        .err()
        .ok_or("cpu_threads: half was accepted")?;
    assert!(e.to_string().contains("half"), "{e}");
    let builtin = PipelineConfig::builtin("qwen2_5_omni").map_err(|e| e.to_string())?;
    assert_eq!(builtin.runtime.cpu_threads, CpuThreads::Split);
    Ok(())
}

#[test]
fn the_ray_backend_is_configured_and_checked() -> Result<(), String> {
    let two = "stage_args:\n  - {stage_id: 0}\n  - {stage_id: 1, engine_input_source: [0], final_output: true}\n";
    let local = yaml(two).map_err(|e| e.to_string())?;
    assert_eq!(local.runtime.backend, Backend::Local);
    let ray = yaml(
        "runtime:\n  backend: ray\n  ray: {address: '10.0.0.1:6379', placement_strategy: STRICT_SPREAD}\n\
         stage_args:\n  - {stage_id: 0, runtime: {resources: {GPU: 1, thinker_node: 1}}}\n\
         \x20 - {stage_id: 1, engine_input_source: [0], final_output: true, runtime: {resources: {CPU: 2}}}\n",
    )
    .map_err(|e| e.to_string())?;
    assert_eq!(ray.runtime.backend, Backend::Ray);
    assert_eq!(
        ray.runtime.ray.placement_strategy,
        PlacementStrategy::StrictSpread
    );
    assert_eq!(ray.runtime.ray.address.as_deref(), Some("10.0.0.1:6379"));
    assert_eq!(ray.stages[0].runtime.resources.get("GPU"), Some(&1.0));
    // The resources reach the worker with the rest of the stage.
    let back = omni_runtime::StageConfig::from_json(
        "launch.json",
        "stage",
        &ray.stages[0].to_json().map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    assert_eq!(back.runtime.resources, ray.stages[0].runtime.resources);
    // The example files the README points at load and say what they mean.
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/ray");
    let default = PipelineConfig::load(&examples.join("default-two-nodes.yaml"))
        .map_err(|e| e.to_string())?;
    let qwen = PipelineConfig::load(&examples.join("qwen2_5_omni-two-nodes.yaml"))
        .map_err(|e| e.to_string())?;
    for c in [&default, &qwen] {
        assert_eq!(c.runtime.backend, Backend::Ray);
        assert!(c.stages.iter().all(|s| !s.runtime.resources.is_empty()));
    }
    assert_eq!(
        default.runtime.ray.placement_strategy,
        PlacementStrategy::StrictSpread
    );
    assert_eq!(qwen.stages[1].runtime.resources.get("GPU"), Some(&0.5));
    assert_eq!(
        qwen.streamed_edges_from(0),
        PipelineConfig::builtin("qwen2_5_omni")
            .map_err(|e| e.to_string())?
            .streamed_edges_from(0)
    );

    let with = |runtime: &str, stage0: &str| {
        yaml(&format!(
            "runtime: {runtime}\nstage_args:\n  - {{stage_id: 0, {stage0}}}\n  - {{stage_id: 1, engine_input_source: [0], final_output: true}}\n"
        ))
    };
    let (f, v, r) = field_error(with("{backend: ray}", "runtime: {resources: {GPU: -1}}"))?;
    assert!(
        f == "stage_args[0].runtime.resources" && v.contains("-1") && r.contains("at least 0"),
        "{f} {v} {r}"
    );
    let (f, v, r) = field_error(with(
        "{backend: ray}",
        "runtime: {address: 'tcp://10.0.0.2:5000'}",
    ))?;
    assert!(
        f == "stage_args[0].runtime.address" && v.contains("10.0.0.2") && r.contains("node"),
        "{f} {v} {r}"
    );
    let (f, _, _) = field_error(with(
        "{backend: ray, ray: {placement_timeout_s: 0}}",
        "final_output: false",
    ))?;
    assert_eq!(f, "runtime.ray.placement_timeout_s");
    let (f, _, _) = field_error(with(
        "{backend: ray, ray: {python: ''}}",
        "final_output: false",
    ))?;
    assert_eq!(f, "runtime.ray.python");
    for (bad, named) in [
        ("{backend: slurm}", "slurm"),
        ("{ray: {placement_strategy: RANDOM}}", "RANDOM"),
        ("{ray: {nodes: 2}}", "nodes"),
    ] {
        let e = with(bad, "final_output: false")
            .err()
            .ok_or(format!("{bad} was accepted"))?;
        assert!(e.to_string().contains(named), "{bad}: {e}");
    }
    Ok(())
}
