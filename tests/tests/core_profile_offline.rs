//! `OmniLLM` profiling as in the profiling guide: all stages, then stage 1
//! only.
//!
//! One test per file: it sets `VLLM_TORCH_PROFILER_DIR` for the stage
//! processes it starts, which must not leak into other tests.
use omni_core::{OmniEngineArgs, OmniLLM};
use omni_tests::{chat, ensure_binaries, read_trace, tiny_params, trace_files, Result};

#[test]
fn start_profile_all_stages_then_selected_stage() -> Result {
    ensure_binaries()?;
    let dir = tempfile::tempdir()?;
    std::env::set_var("VLLM_TORCH_PROFILER_DIR", dir.path());
    let omni = OmniLLM::from_engine_args(OmniEngineArgs::new("default"))?;

    omni.start_profile(None)?;
    let outputs = omni.generate(
        [chat("What is a star?")],
        vec![tiny_params(6), tiny_params(4)],
    )?;
    assert_eq!(outputs.len(), 2);
    let all = omni.stop_profile()?;
    assert_eq!(
        all.keys().copied().collect::<Vec<_>>(),
        vec![0, 1],
        "{all:?}"
    );
    for paths in all.values() {
        assert_eq!(paths.len(), 1, "{paths:?}");
        read_trace(&paths[0])?;
    }

    omni.start_profile(Some(&[1]))?;
    omni.generate(
        [chat("What is a planet?")],
        vec![tiny_params(6), tiny_params(4)],
    )?;
    let only_1 = omni.stop_profile()?;
    assert_eq!(
        only_1.keys().copied().collect::<Vec<_>>(),
        vec![1],
        "{only_1:?}"
    );
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
