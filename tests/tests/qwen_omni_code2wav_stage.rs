//! Qwen2.5-Omni's code2wav as a pipeline stage in its own process, on the
//! tiny checkpoint: codec ids in (as `prompt_token_ids`), a seeded
//! waveform out equal to transformers', batched requests equal alone, and
//! bad input named.
use omni_core::{OmniLLM, Prompt, SamplingParams, StageSamplingParams};
use omni_tests::{err, repo_root, Result};
use serde_json::Value;

fn fixture() -> std::path::PathBuf {
    repo_root().join("omni-engine/tests/fixtures/qwen2_5_omni")
}

fn pipeline(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let yaml = format!(
        "name: code2wav\nstage_args:\n  - stage_id: 0\n    engine_args:\n      model: {}\n      \
         model_stage: code2wav\n    final_output: true\n    final_output_type: audio\n",
        fixture().join("tiny").display()
    );
    let path = dir.join("code2wav.yaml");
    std::fs::write(&path, yaml)?;
    Ok(path)
}

fn samples(entry: &Value) -> Result<Vec<f32>> {
    omni_tests::read_f32(&fixture().join(entry["file"].as_str().ok_or("no file")?))
}

#[test]
fn seeded_speech_equals_transformers_alone_and_batched() -> Result {
    let refs: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("references.json"))?)?;
    let dir = tempfile::tempdir()?;
    let omni = OmniLLM::from_pipeline(&pipeline(dir.path())?.to_string_lossy())?;
    let cases: Vec<&Value> = refs["talker"]["cases"]
        .as_array()
        .ok_or("no cases")?
        .iter()
        .collect();
    let request = |case: &Value| -> Result<(Prompt, SamplingParams, Vec<f32>)> {
        let v = &case["hf_generate"];
        let codes: Vec<u32> = v["codes"]
            .as_array()
            .ok_or("no codes")?
            .iter()
            .filter_map(|c| c.as_u64().map(|c| c as u32))
            .collect();
        let params = SamplingParams {
            seed: v["token2wav"]["seed"].as_u64(),
            speaker: case["speaker"].as_str().map(str::to_owned),
            ..SamplingParams::default()
        };
        Ok((
            Prompt::TokenIds(codes),
            params,
            samples(&v["token2wav"]["wav"])?,
        ))
    };
    let check = |name: &str, got: &omni_core::OmniRequestOutput, want: &[f32]| -> Result {
        let audio = got
            .audio
            .as_ref()
            .ok_or_else(|| err(format!("{name}: no audio")))?;
        assert_eq!(audio.sample_rate, 24_000, "{name}");
        omni_tests::assert_waveform(name, &audio.samples, want, 0.01)
    };
    // Alone.
    for case in &cases {
        let (prompt, params, want) = request(case)?;
        let out = omni.generate([prompt], params)?;
        check(case["name"].as_str().unwrap_or("?"), &out[0], &want)?;
    }
    // All of one voice at once (one seed, as every request draws its own
    // noise from it): each equals its run alone.
    let chelsie: Vec<&&Value> = cases.iter().filter(|c| c["speaker"] == "Chelsie").collect();
    assert!(chelsie.len() >= 3);
    let mut prompts = Vec::new();
    let mut wants = Vec::new();
    let mut shared = None;
    for case in &chelsie {
        let (prompt, p, want) = request(case)?;
        prompts.push(prompt);
        wants.push(want);
        shared = Some(p);
    }
    let outs = omni.generate(prompts, shared.ok_or("no params")?)?;
    assert_eq!(outs.len(), wants.len());
    // In the order of the prompts.
    for (i, (out, want)) in outs.iter().zip(&wants).enumerate() {
        check(&format!("batched {i} ({})", out.request_id), out, want)?;
    }

    // Codes outside the codec vocabulary, an unknown voice: named.
    let e = omni
        .generate(
            [Prompt::TokenIds(vec![3, 900, 4])],
            SamplingParams::default(),
        )
        .err()
        .ok_or("code 900 was accepted")?;
    assert!(
        e.to_string().contains("900") && e.to_string().contains("stage 0"),
        "{e}"
    );
    let bad_voice = SamplingParams {
        speaker: Some("Nobody".into()),
        ..SamplingParams::default()
    };
    let e = omni
        .generate(
            [Prompt::TokenIds(vec![3, 4])],
            StageSamplingParams::Same(bad_voice),
        )
        .err()
        .ok_or("an unknown voice was accepted")?;
    assert!(
        e.to_string().contains("Nobody") && e.to_string().contains("Chelsie"),
        "{e}"
    );
    omni.shutdown()?;
    Ok(())
}
