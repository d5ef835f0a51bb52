//! An upstream stage's empty answer is not the client's fault: the request
//! succeeds with a documented result, and failures inside the pipeline are
//! server-side errors naming the stage, never 400.
use omni_core::{ErrorKind, OmniLLM, Prompt};
use omni_tests::{chat, err, http, tiny_params, Result, Server};

/// SmolLM2 ends this raw prompt at once: its first token is EOS.
const ENDS_AT_ONCE: &str = "Why is the sky blue?";

#[test]
fn an_empty_answer_gives_an_empty_summary_through_omni_llm() -> Result {
    let omni = OmniLLM::from_pipeline("default")?;
    let outputs = omni.generate([Prompt::Text(ENDS_AT_ONCE.into())], tiny_params(40))?;
    omni.shutdown()?;
    assert_eq!(outputs.len(), 2, "{outputs:?}");
    for o in &outputs {
        assert!(o.finished, "{o:?}");
        assert_eq!(o.text, "", "stage {}: {o:?}", o.stage_id);
        assert_eq!(
            o.finish_reason,
            Some(omni_core::FinishReason::Stop),
            "stage {}",
            o.stage_id
        );
    }
    // Stage 1 did not run its model on nothing.
    let summary = outputs
        .iter()
        .find(|o| o.stage_id == 1)
        .ok_or("no stage 1")?;
    assert_eq!(summary.token_ids.len(), 0);
    Ok(())
}

#[test]
fn completions_with_an_empty_answer_succeed() -> Result {
    let server = Server::start("default", &[])?;
    let body = format!(r#"{{"model":"default","prompt":"{ENDS_AT_ONCE}","max_tokens":40}}"#);
    let r = http(&server.addr, "POST", "/v1/completions", Some(&body))?;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json()?;
    let choices = v["choices"].as_array().ok_or_else(|| err("no choices"))?;
    assert_eq!(choices.len(), 2, "{v}");
    for c in choices {
        assert_eq!(c["text"], "", "{c}");
        assert_eq!(c["finish_reason"], "stop", "{c}");
    }
    Ok(())
}

/// Stage 1's context holds 32 tokens: a real answer, wrapped in the
/// summarize prompt, does not fit. That is the pipeline's limit, not the
/// client's input.
fn pipeline_with_a_small_stage_1(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let text = std::fs::read_to_string(omni_tests::repo_root().join("pipelines/default.yaml"))?
        .replacen(
            "      model_stage: summarizer",
            "      model_stage: summarizer\n      max_model_len: 32",
            1,
        );
    let path = dir.join("small.yaml");
    std::fs::write(&path, text)?;
    Ok(path)
}

#[test]
fn a_stage_side_failure_is_a_server_error_naming_the_stage() -> Result {
    let dir = tempfile::tempdir()?;
    let file = pipeline_with_a_small_stage_1(dir.path())?;

    let omni = OmniLLM::from_pipeline(&file.to_string_lossy())?;
    let e = omni
        .generate([chat("Tell me about the ocean.")], tiny_params(40))
        .err()
        .ok_or("a 40-token answer fits a 32-token stage 1")?;
    omni.shutdown()?;
    assert_eq!(e.kind(), ErrorKind::StageFailed, "{e}");
    assert!(!e.is_invalid_input(), "{e}");
    assert_eq!(e.stage_id(), Some(1), "{e}");

    // The server names the model after the pipeline it was given.
    let model = file.to_string_lossy();
    let server = Server::start(&model, &[])?;
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"Tell me about the ocean."}}],
            "sampling_params_list":[{{"temperature":0,"max_tokens":40}},{{"temperature":0,"max_tokens":8}}]}}"#
    );
    let r = http(&server.addr, "POST", "/v1/chat/completions", Some(&body))?;
    assert_eq!(r.status, 500, "{}", r.body);
    let v = r.json()?;
    assert_eq!(v["error"]["type"], "server_error", "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("stage 1"), "{message}");
    Ok(())
}
