//! `start_profile` refused and failing: a second start while a window is
//! open is the caller's error; a start that fails in one stage names that
//! stage, and the stages that did start record (stop returns their traces).
//!
//! One test per file: it sets `VLLM_TORCH_PROFILER_DIR` for the stage
//! processes it starts, which must not leak into other tests.
use omni_core::{ErrorKind, OmniEngineArgs, OmniLLM};
use omni_tests::{chat, ensure_binaries, err, tiny_params, Result};

#[test]
fn a_second_start_is_refused_and_a_failing_stage_is_named() -> Result {
    ensure_binaries()?;
    let dir = tempfile::tempdir()?;
    std::env::set_var("VLLM_TORCH_PROFILER_DIR", dir.path());
    let omni = OmniLLM::from_engine_args(OmniEngineArgs::new("default"))?;

    omni.start_profile(None)?;
    let e = omni
        .start_profile(Some(&[1]))
        .err()
        .ok_or_else(|| err("a second start_profile was accepted"))?;
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("already profiling"), "{e}");
    omni.generate([chat("Hi.")], vec![tiny_params(2), tiny_params(2)])?;
    let first = omni.stop_profile()?;
    assert_eq!(first.keys().copied().collect::<Vec<_>>(), [0, 1]);

    // Stage 1 cannot write its traces: its folder is now a plain file.
    let stage1_dir = first[&1][0]
        .parent()
        .ok_or_else(|| err("trace without a folder"))?
        .to_path_buf();
    std::fs::remove_dir_all(&stage1_dir)?;
    std::fs::write(&stage1_dir, b"not a folder")?;
    let e = omni
        .start_profile(None)
        .err()
        .ok_or_else(|| err("start_profile succeeded into a file"))?;
    assert_eq!(e.stage_id(), Some(1), "{e}");
    assert!(
        e.to_string().contains("stage 1")
            && e.to_string().contains("stages [0] did start")
            && e.kind() != ErrorKind::InvalidInput,
        "{e}"
    );
    // Stage 0 started and records; stop returns its window alone.
    let e = omni
        .start_profile(Some(&[0]))
        .err()
        .ok_or_else(|| err("stage 0 did not start"))?;
    assert!(
        e.to_string().contains("stage 0 is already profiling"),
        "{e}"
    );
    omni.generate([chat("Hi.")], vec![tiny_params(2), tiny_params(2)])?;
    let partial = omni.stop_profile()?;
    assert_eq!(
        partial.keys().copied().collect::<Vec<_>>(),
        [0],
        "{partial:?}"
    );
    assert_eq!(partial[&0].len(), 1, "{partial:?}");

    // Fixed, stage 1 profiles again.
    std::fs::remove_file(&stage1_dir)?;
    omni.start_profile(Some(&[1]))?;
    let again = omni.stop_profile()?;
    assert_eq!(again.keys().copied().collect::<Vec<_>>(), [1]);
    Ok(())
}
