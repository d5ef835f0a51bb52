//! The `speak` pipeline end to end: SmolLM2 answers in one process, the
//! Piper voice speaks the answer in another; the WAV is checked with
//! Python's `wave` and its duration against Piper's own tools
//! (piper-phonemize + onnxruntime) speaking the same transcript.

use omni_tests::{err, run_python, Result, Server};
use serde_json::Value;

/// What `tests/python/speech_check.py` reports for a WAV and its transcript.
fn check_speech(wav: &std::path::Path, transcript: &str) -> Result<Value> {
    let out = run_python("speech_check.py", &[&wav.to_string_lossy(), transcript])?;
    Ok(serde_json::from_str(out.trim())?)
}

fn assert_spoken(report: &Value) {
    assert_eq!(report["sample_rate"], 22050, "{report}");
    assert_eq!(report["channels"], 1, "{report}");
    assert_eq!(report["sample_width"], 2, "{report}");
    let ours = report["duration"].as_f64().unwrap_or(0.0);
    let theirs = report["onnxruntime_duration"].as_f64().unwrap_or(0.0);
    assert!(
        theirs > 0.5,
        "the transcript is too short to judge: {report}"
    );
    assert!(
        (ours - theirs).abs() <= 0.1 * theirs,
        "duration {ours:.3} s is not within 10% of onnxruntime's {theirs:.3} s: {report}"
    );
    assert!(
        report["rms"].as_f64().unwrap_or(0.0) > 0.01,
        "silent: {report}"
    );
}

#[test]
fn generate_speaks_the_answer_into_a_wav() -> Result {
    let dir = tempfile::tempdir()?;
    let lines = omni_tests::generate_json(
        &[
            "--pipeline",
            "speak",
            "--prompt",
            "Why is the sky blue?",
            "--max-tokens",
            "32",
        ],
        dir.path(),
    )?;
    assert_eq!(lines.len(), 2, "{lines:?}");
    let (text, speech) = (&lines[0], &lines[1]);
    assert_eq!(text["final_output_type"], "text");
    assert_eq!(speech["final_output_type"], "audio");
    // The voice speaks what stage 0 answered.
    let answer = text["text"].as_str().ok_or_else(|| err("no answer text"))?;
    assert!(!answer.trim().is_empty(), "{text}");
    assert_eq!(speech["text"].as_str(), Some(answer.trim()), "{speech}");
    let audio = &speech["audio"];
    assert_eq!(audio["sample_rate"], 22050, "{audio}");
    let path = audio["path"].as_str().ok_or_else(|| err("no WAV path"))?;
    let report = check_speech(std::path::Path::new(path), answer)?;
    assert_eq!(
        audio["num_samples"].as_f64(),
        Some((report["duration"].as_f64().unwrap_or(0.0) * 22050.0).round()),
        "{audio} vs {report}"
    );
    assert_spoken(&report);
    Ok(())
}

#[test]
fn serve_answers_with_message_audio() -> Result {
    let server = Server::start("speak", &[])?;
    let dir = tempfile::tempdir()?;
    let wav = dir.path().join("answer.wav");
    let out = run_python(
        "openai_audio.py",
        &[
            &format!("http://{}/v1", server.addr),
            "speak",
            &wav.to_string_lossy(),
        ],
    )?;
    let r: Value = serde_json::from_str(out.trim())?;
    let choices = r["choices"].as_array().ok_or_else(|| err("no choices"))?;
    assert_eq!(choices.len(), 2, "{r}");
    let answer = choices[0]["content"]
        .as_str()
        .ok_or_else(|| err("no text"))?;
    let audio = &choices[1]["audio"];
    assert!(audio["id"].as_str().is_some_and(|id| !id.is_empty()), "{r}");
    assert!(audio["expires_at"].as_u64().is_some(), "{r}");
    assert_eq!(audio["transcript"].as_str(), Some(answer.trim()), "{r}");
    assert_spoken(&check_speech(&wav, answer)?);
    Ok(())
}
