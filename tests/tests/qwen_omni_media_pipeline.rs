//! Audio and images in, text and speech out, through the three processes
//! of the `qwen2_5_omni` pipeline on the tiny checkpoint: `OmniLLM` against
//! transformers' thinker tokens and code2wav waveform for a spoken clip and
//! for a picture (the talker on 3-D positions handed over by the thinker),
//! and for a video given as frames, `omni generate --audio/--image/--video`,
//! and `omni serve` taking `input_audio` and `image_url` parts from the
//! official `openai` client.
use omni_core::{
    AudioInput, ChatMessage, ImageInput, MultiModalData, OmniEngineArgs, OmniLLM, Prompt,
    StageSamplingParams, VideoInput,
};
use omni_tests::{err, json_ids, repo_root, Result};
use serde_json::Value;

fn fixture() -> std::path::PathBuf {
    repo_root().join("omni-engine/tests/fixtures/qwen2_5_omni")
}

fn clip_path() -> std::path::PathBuf {
    fixture().join("media/speech_16k.wav")
}

/// Greedy thinker and talker of the case's fixed lengths, code2wav seeded.
fn params(case: &Value, seed: Option<u64>) -> Result<StageSamplingParams> {
    let n = case["max_new_tokens"].as_u64().ok_or("n")? as usize;
    let m = case["talker_max_new_tokens"].as_u64().ok_or("m")? as usize;
    let speaker = case["speaker"].as_str().ok_or("speaker")?;
    Ok(omni_tests::qwen_params(n, m, speaker, seed))
}

/// Runs `prompt` as `case` says; checks the thinker's tokens and prompt
/// length and the waveform against the references.
fn check_case(omni: &OmniLLM, name: &str, case: &Value, t2w: &Value, prompt: Prompt) -> Result {
    let outs = omni.generate([prompt], params(case, t2w["seed"].as_u64())?)?;
    let text = outs.iter().find(|o| o.stage_id == 0).ok_or("no text")?;
    assert_eq!(
        text.token_ids,
        json_ids(&case["generated_ids"]),
        "{name}: thinker tokens"
    );
    let thinker_metrics = text
        .metrics
        .stages
        .iter()
        .find(|s| s.stage_id == 0)
        .ok_or("no stage 0 metrics")?;
    assert_eq!(
        thinker_metrics.num_prompt_tokens,
        json_ids(&case["prompt_ids"]).len(),
        "{name}: the thinker read the expanded prompt"
    );
    let speech = outs.iter().find(|o| o.stage_id == 2).ok_or("no audio")?;
    let audio = speech.audio.as_ref().ok_or("no waveform")?;
    let want =
        omni_tests::read_f32(&fixture().join(t2w["wav"]["file"].as_str().ok_or("no wav file")?))?;
    omni_tests::assert_waveform(name, &audio.samples, &want, 0.01)
}

#[test]
fn spoken_pictured_and_filmed_questions_get_transformers_answers() -> Result {
    let refs: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("media.json"))?)?;
    let omni = OmniLLM::from_engine_args(OmniEngineArgs {
        model_path: Some(fixture().join("tiny").to_string_lossy().into_owned()),
        ..OmniEngineArgs::new("qwen2_5_omni")
    })?;

    let case = &refs["audio_prompt"];
    let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone())?;
    let prompt = Prompt::with_media(
        Prompt::Chat(messages),
        MultiModalData {
            audio: vec![AudioInput::read(&clip_path())?],
            ..MultiModalData::default()
        },
    );
    let t2w = &case["talker"]["with_codec_prefix"]["token2wav"];
    check_case(&omni, "audio prompt", case, t2w, prompt)?;

    // The talker's codes depend on the 3-D positions the thinker hands it.
    let case = &refs["image_prompt"];
    let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone())?;
    let prompt = Prompt::with_media(
        Prompt::Chat(messages),
        MultiModalData {
            image: vec![ImageInput::read(&fixture().join("media/picture.png"))?],
            ..MultiModalData::default()
        },
    );
    check_case(&omni, "image prompt", case, &case["token2wav"], prompt)?;

    // A video: its frames cross to the thinker's process, its time row
    // advances 25 positions a second.
    let case = &refs["video_prompt"];
    let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone())?;
    let frames = refs["video"]["frames"]
        .as_array()
        .ok_or("no frames")?
        .iter()
        .map(|f| {
            Ok(ImageInput::read(
                &fixture().join(f.as_str().ok_or("frame")?),
            )?)
        })
        .collect::<Result<Vec<_>>>()?;
    let prompt = Prompt::with_media(
        Prompt::Chat(messages),
        MultiModalData {
            video: vec![VideoInput::new(
                frames,
                refs["video"]["fps"].as_f64().ok_or("fps")?,
            )?],
            ..MultiModalData::default()
        },
    );
    check_case(&omni, "video prompt", case, &case["token2wav"], prompt)?;

    // A clip the engine refuses (too short) is the caller's error, named.
    let short = Prompt::with_media(
        Prompt::Chat(vec![ChatMessage::with_parts(
            "user",
            vec![omni_core::ContentPart::Audio],
        )]),
        MultiModalData {
            audio: vec![AudioInput::new(vec![0.0; 10], 16_000)],
            ..MultiModalData::default()
        },
    );
    let e = omni
        .generate([short], StageSamplingParams::Defaults)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("multi_modal_data.audio[0]") && e.contains("too short"),
        "{e}"
    );
    // An image whose pixels do not fill its size is refused by the stage
    // that reads it, as an error of its request, not a hang.
    let torn = Prompt::with_media(
        Prompt::Chat(vec![ChatMessage::with_parts(
            "user",
            vec![omni_core::ContentPart::Image],
        )]),
        MultiModalData {
            image: vec![ImageInput {
                width: 10,
                height: 10,
                rgb: vec![0; 5],
            }],
            ..MultiModalData::default()
        },
    );
    let e = omni
        .generate([torn], StageSamplingParams::Defaults)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("media.image.0"), "{e}");
    omni.shutdown()?;
    Ok(())
}

#[test]
fn cli_and_server_take_media() -> Result {
    let model = fixture().join("tiny").to_string_lossy().into_owned();
    let clip = clip_path().to_string_lossy().into_owned();
    let picture = fixture()
        .join("media/picture.png")
        .to_string_lossy()
        .into_owned();
    let frames = fixture().join("media/video").to_string_lossy().into_owned();
    let dir = tempfile::tempdir()?;
    let lines = omni_tests::generate_json(
        &[
            "--pipeline",
            "qwen2_5_omni",
            "--model-path",
            &model,
            "--audio",
            &clip,
            "--image",
            &picture,
            "--video",
            &frames,
            "--prompt",
            "What is said in this clip?",
            "--max-tokens",
            "8",
        ],
        dir.path(),
    )?;
    let text = lines
        .iter()
        .find(|l| l["stage_id"] == 0)
        .ok_or("no text line")?;
    let prompt_tokens = text["metrics"]["stages"][0]["num_prompt_tokens"]
        .as_u64()
        .ok_or_else(|| err(format!("no prompt token count in {text}")))?;
    let media_tokens = refs_media_tokens()?;
    assert!(
        prompt_tokens > media_tokens,
        "{prompt_tokens} prompt tokens: the clip's, picture's and video's {media_tokens} are not in"
    );
    let audio = lines
        .iter()
        .find(|l| l["stage_id"] == 2)
        .ok_or("no audio line")?;
    assert!(
        audio["audio"]["num_samples"].as_u64().unwrap_or(0) > 0,
        "{audio}"
    );

    // A file that is not audio is named before any stage starts.
    let bad = dir.path().join("notes.wav");
    std::fs::write(&bad, "not audio")?;
    let out = std::process::Command::new(omni_tests::omni_bin()?)
        .args([
            "generate",
            "--pipeline",
            "qwen2_5_omni",
            "--model-path",
            &model,
        ])
        .args(["--prompt", "hi", "--audio"])
        .arg(&bad)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("notes.wav"), "{stderr}");

    let server = omni_tests::Server::start_with("qwen2_5_omni", &["--model-path", &model], &[])?;
    let wav = dir.path().join("served.wav");
    let r: Value = serde_json::from_str(
        omni_tests::run_python(
            "openai_audio.py",
            &[
                &format!("http://{}/v1", server.addr),
                "qwen2_5_omni",
                &wav.to_string_lossy(),
                "Ethan",
                &clip,
                &picture,
                &fixture().join("media/video.gif").to_string_lossy(),
            ],
        )?
        .trim(),
    )?;
    let choices = r["choices"].as_array().ok_or("no choices")?;
    assert_eq!(choices.len(), 2, "{r}");
    assert!(choices[1]["wav"]["frames"].as_u64().unwrap_or(0) > 0, "{r}");

    // A remote URL is refused, not fetched; broken base64 is named.
    for (part, says) in [
        (
            serde_json::json!({"type": "audio_url", "audio_url": {"url": "http://example.invalid/a.wav"}}),
            "only data: URLs",
        ),
        (
            serde_json::json!({"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}),
            "input_audio.data is not base64",
        ),
        (
            serde_json::json!({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}),
            "decodes no MP4",
        ),
        (
            serde_json::json!({"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}),
            "only data: URLs",
        ),
        (
            serde_json::json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}),
            "not an image",
        ),
    ] {
        let body = serde_json::json!({
            "model": "qwen2_5_omni",
            "messages": [{"role": "user", "content": [part]}],
        });
        let r = omni_tests::http(
            &server.addr,
            "POST",
            "/v1/chat/completions",
            Some(&body.to_string()),
        )?;
        let answer = r.json()?;
        assert_eq!(r.status, 400, "{answer}");
        let msg = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("messages[0].content[0]") && msg.contains(says),
            "{answer}"
        );
    }
    Ok(())
}

fn refs_media_tokens() -> Result<u64> {
    let refs: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("media.json"))?)?;
    let audio = refs["audio_prompt"]["num_audio_tokens"]
        .as_u64()
        .ok_or_else(|| err("num_audio_tokens"))?;
    let image = refs["image_prompt"]["num_image_tokens"]
        .as_u64()
        .ok_or_else(|| err("num_image_tokens"))?;
    let video = refs["video_prompt"]["num_video_tokens"]
        .as_u64()
        .ok_or_else(|| err("num_video_tokens"))?;
    Ok(audio + image + video)
}
