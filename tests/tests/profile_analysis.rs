//! `omni profile summarize` and `omni profile diff` on traces recorded here,
//! by both backends: the default pipeline with stage 1 made the slow one
//! (it generates many more tokens than stage 0) must name stage 1 as the
//! bottleneck, stage 0 as left with nothing to do and stage 1 as starved
//! while stage 0 worked; a second profile in which stage 1 ran three times
//! the tokens must put stage 1 first in the diff; the JSON of both validates
//! against the documented schemas.
//!
//! One test per file: it sets `VLLM_TORCH_PROFILER_DIR` and
//! `OMNI_PROFILER_BACKEND` for the stage processes it starts.
use std::path::Path;
use std::process::Command;

use omni_core::profile_tools::{analyze, diff};
use omni_core::{OmniEngineArgs, OmniLLM, SamplingParams};
use omni_tests::{
    chat, ensure_binaries, err, omni_bin, repo_root, run_python, tiny_params, Result,
};

fn long(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..tiny_params(max_tokens)
    }
}

/// One profiled run of four prompts into `dir`, stage 1 generating
/// `stage1_tokens` each.
fn record(omni: &OmniLLM, dir: &Path, stage1_tokens: usize) -> Result {
    std::env::set_var("VLLM_TORCH_PROFILER_DIR", dir);
    omni.start_profile(None)?;
    let prompts = [
        "Name a fruit.",
        "Name a colour.",
        "Name a city.",
        "Name a tree.",
    ];
    let outputs = omni.generate(
        prompts.iter().map(|p| chat(p)),
        vec![long(4), long(stage1_tokens)],
    )?;
    assert_eq!(outputs.len(), 8);
    omni.stop_profile()?;
    Ok(())
}

fn omni_profile(args: &[&str]) -> Result<String> {
    let out = Command::new(omni_bin()?)
        .arg("profile")
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(err(format!(
            "omni profile {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The JSON `omni profile ... --json` printed, checked by the `jsonschema`
/// package against `omni-profiler/schema/<schema>`.
fn validate(json: &str, schema: &str, dir: &Path) -> Result {
    let doc = dir.join(format!("{schema}.doc.json"));
    std::fs::write(&doc, json)?;
    let schema = repo_root().join("omni-profiler/schema").join(schema);
    run_python(
        "validate_json.py",
        &[&schema.to_string_lossy(), &doc.to_string_lossy()],
    )?;
    Ok(())
}

fn check_backend(backend: &str) -> Result {
    let root = tempfile::tempdir()?;
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    std::env::set_var("OMNI_PROFILER_BACKEND", backend);
    std::env::set_var("VLLM_TORCH_PROFILER_DIR", &a);
    let omni = OmniLLM::from_engine_args(OmniEngineArgs::new("default"))?;
    // The first window of a process is slower (the profiler's own start-up,
    // first kernels): a throwaway one first, so a and b differ by the work.
    record(&omni, &root.path().join("warm-up"), 4)?;
    record(&omni, &a, 24)?;
    record(&omni, &b, 72)?;
    omni.shutdown()?;

    let analysis = analyze(&a)?;
    let stage = |id: usize| {
        analysis
            .stages
            .iter()
            .find(|s| s.stage_id == Some(id))
            .ok_or_else(|| err(format!("{backend}: no stage {id} in {analysis:#?}")))
    };
    let (s0, s1) = (stage(0)?, stage(1)?);
    let bottleneck = analysis
        .bottleneck
        .as_ref()
        .ok_or_else(|| err(format!("{backend}: no bottleneck")))?;
    assert_eq!(bottleneck.stage_id, Some(1), "{backend}: {analysis}");
    // Stage 0 is done after 4 tokens and nothing more comes; stage 1 waits
    // on stage 0 at first.
    assert!(
        s0.idle.empty_us > s0.idle.starved_us && s1.idle.starved_us > 0.0,
        "{backend}: {analysis}"
    );
    assert!(s1.busy_share() > s0.busy_share(), "{backend}: {analysis}");
    // Four prompts, batched together in stage 0.
    let seqs = s0
        .occupancy
        .sequences
        .ok_or_else(|| err(format!("{backend}: no batch sizes")))?;
    assert_eq!(seqs.max, 4.0, "{backend}: {analysis}");
    assert_eq!(analysis.requests.len(), 4, "{backend}: {analysis}");
    for r in &analysis.requests {
        let d = r
            .dominant
            .as_ref()
            .ok_or_else(|| err(format!("{backend}: {r:?}")))?;
        assert!(
            d.stage_id == Some(1) && d.kind == "compute" && r.first_output_us.is_some(),
            "{backend}: {r:?}"
        );
    }

    let d = diff(&a, &b)?;
    assert_eq!(d.stages[0].stage_id, Some(1), "{backend}: {d}");
    assert!(
        d.stages[0].change_us > 0.0 && d.stages[0].steps_b > d.stages[0].steps_a,
        "{backend}: {d}"
    );

    // The CLI: the same in one screen of text, and JSON as documented.
    let (a_arg, b_arg) = (a.to_string_lossy(), b.to_string_lossy());
    let text = omni_profile(&["summarize", &a_arg])?;
    assert!(
        text.contains("bottleneck: stage 1 (summarizer) busy") && text.lines().count() <= 60,
        "{backend}:\n{text}"
    );
    validate(
        &omni_profile(&["summarize", &a_arg, "--json"])?,
        "analysis.schema.json",
        root.path(),
    )?;
    let text = omni_profile(&["diff", &a_arg, &b_arg])?;
    let first_stage = text
        .lines()
        .skip_while(|l| !l.starts_with("== stages"))
        .nth(1)
        .unwrap_or("");
    assert!(
        first_stage.trim_start().starts_with("stage 1 (summarizer)"),
        "{backend}:\n{text}"
    );
    validate(
        &omni_profile(&["diff", &a_arg, &b_arg, "--json"])?,
        "diff.schema.json",
        root.path(),
    )?;
    Ok(())
}

#[test]
fn the_slow_stage_is_the_bottleneck_and_leads_the_diff_with_either_backend() -> Result {
    ensure_binaries()?;
    check_backend("torch")?;
    check_backend("chrome")
}
