//! `OmniLLM` profiling as in the profiling guide: all stages, then stage 1
//! only.
//!
//! One test per file: it sets `VLLM_TORCH_PROFILER_DIR` for the stage
//! processes it starts, which must not leak into other tests.
use omni_core::{OmniEngineArgs, OmniLLM};
use omni_tests::{
    assert_window, chat, ensure_binaries, now_us, tiny_params, trace_files, Result,
    DEFAULT_STAGE_NAMES,
};

#[test]
fn start_profile_all_stages_then_selected_stage() -> Result {
    ensure_binaries()?;
    let dir = tempfile::tempdir()?;
    std::env::set_var("VLLM_TORCH_PROFILER_DIR", dir.path());
    let omni = OmniLLM::from_engine_args(OmniEngineArgs::new("default"))?;

    // A request before the window must not show in it.
    omni.generate([chat("Hello.")], vec![tiny_params(3), tiny_params(3)])?;
    let start = now_us();
    omni.start_profile(None)?;
    let outputs = omni.generate(
        [chat("What is a star?")],
        vec![tiny_params(6), tiny_params(4)],
    )?;
    assert_eq!(outputs.len(), 2);
    let all = omni.stop_profile()?;
    let window = (start, now_us());
    assert_eq!(
        all.keys().copied().collect::<Vec<_>>(),
        vec![0, 1],
        "{all:?}"
    );
    let id = outputs[0].request_id.as_str();
    for (&stage, paths) in &all {
        assert_eq!(paths.len(), 1, "{paths:?}");
        assert_window(stage, paths, window, DEFAULT_STAGE_NAMES[stage], &[id])?;
    }

    let start = now_us();
    omni.start_profile(Some(&[1]))?;
    let outputs = omni.generate(
        [chat("What is a planet?")],
        vec![tiny_params(6), tiny_params(4)],
    )?;
    let only_1 = omni.stop_profile()?;
    let window = (start, now_us());
    assert_eq!(
        only_1.keys().copied().collect::<Vec<_>>(),
        vec![1],
        "{only_1:?}"
    );
    let id = outputs[0].request_id.as_str();
    assert_window(1, &only_1[&1], window, DEFAULT_STAGE_NAMES[1], &[id])?;
    // On disk: stage 0 has its one window, stage 1 two.
    let files = trace_files(dir.path());
    let count = |stage: usize| {
        files
            .iter()
            .filter(|p| {
                p.parent()
                    .and_then(|d| d.file_name())
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("stage_{stage}_")))
            })
            .count()
    };
    assert_eq!((count(0), count(1)), (1, 2), "{files:?}");

    // stop without start: nothing recorded, nothing written.
    let none = omni.stop_profile()?;
    assert!(none.values().all(Vec::is_empty), "{none:?}");
    Ok(())
}
