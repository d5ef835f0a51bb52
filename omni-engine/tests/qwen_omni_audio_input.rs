//! Audio into Qwen2.5-Omni's thinker, against transformers on the tiny
//! checkpoint (`make_qwen_omni_media_fixture.py`): the Whisper features of a
//! spoken clip, the audio encoder's rows, the expanded prompt ids, the
//! thinker's greedy tokens, and the talker's codes from the thinker's states
//! with the audio rows' embeddings left out.
mod qwen_omni_support;

use omni_engine::{
    AudioInput, ChatMessage, EngineArgs, LLMEngine, MultiModalData, Prompt, SamplingParams,
};
use qwen_omni_support::{engine, fixtures, ids, json, max_abs, run, sidecar, Result};
use serde_json::Value;
use tch::Tensor;

fn clip() -> Result<AudioInput> {
    Ok(AudioInput::read(&fixtures().join("media/speech_16k.wav"))?)
}

fn audio_prompt(refs: &Value, audio: AudioInput) -> Result<Prompt> {
    let messages: Vec<ChatMessage> =
        serde_json::from_value(refs["audio_prompt"]["messages"].clone())?;
    Ok(Prompt::with_media(
        Prompt::Chat(messages),
        MultiModalData {
            audio: vec![audio],
            ..MultiModalData::default()
        },
    ))
}

#[test]
fn features_and_encoder_rows_equal_transformers() -> Result {
    let refs = json("media.json")?;
    let thinker = engine("thinker")?;
    let media = thinker
        .media_encoders()
        .ok_or("the thinker loaded no encoder")?;
    let audio = clip()?;
    assert_eq!(
        audio.samples.len() as u64,
        refs["audio"]["num_samples"].as_u64().ok_or("num_samples")?
    );
    let ours = media
        .feature_extractor()
        .ok_or("no feature extractor")?
        .extract(&audio, "clip")?;
    let theirs = sidecar(&refs["audio"]["features"])?;
    assert_eq!(ours.size(), theirs.size(), "feature frames");
    let err = max_abs(&(&ours - &theirs));
    eprintln!("log-mel features: max abs error {err:e}");
    assert!(err < 1e-4, "log-mel features off by {err}");

    // The encoder on transformers' own features, so its error is its own.
    let rows = media
        .audio_encoder()
        .ok_or("no audio encoder")?
        .forward(&theirs)?;
    let want = sidecar(&refs["audio"]["encoder_output"])?;
    assert_eq!(rows.size(), want.size(), "encoder rows");
    let err = max_abs(&(&rows - &want)) / max_abs(&want);
    eprintln!("audio encoder: max abs error {err:e} of the peak");
    assert!(err < 1e-4, "encoder output off by {err} of its peak");
    Ok(())
}

#[test]
fn audio_prompts_give_transformers_tokens_and_codes() -> Result {
    let refs = json("media.json")?;
    let case = &refs["audio_prompt"];
    let n = case["max_new_tokens"].as_u64().ok_or("max_new_tokens")? as usize;
    let mut thinker = engine("thinker")?;
    let params = SamplingParams {
        max_tokens: Some(n),
        min_tokens: n,
        output_states: true,
        ..SamplingParams::greedy()
    };
    // Twice in one batch, and a silent clip of the same prompt: equal ids,
    // so blocks shared by ids alone would give one of them the other's K/V.
    thinker.add_request("a", audio_prompt(&refs, clip()?)?, params.clone())?;
    thinker.add_request("b", audio_prompt(&refs, clip()?)?, params.clone())?;
    let silent = AudioInput::new(vec![0.0; 16_000], 16_000);
    thinker.add_request("silence", audio_prompt(&refs, silent)?, params.clone())?;
    let out = run(&mut thinker)?;
    let want_ids = ids(&case["prompt_ids"]);
    let want_tokens = ids(&case["generated_ids"]);
    for id in ["a", "b"] {
        assert_eq!(
            out[id].prompt_token_ids, want_ids,
            "{id}: expanded prompt ids"
        );
        assert_eq!(out[id].token_ids, want_tokens, "{id}: thinker tokens");
    }
    assert_ne!(
        out["silence"].token_ids, want_tokens,
        "a silent clip answers as the spoken one: the audio rows are not read"
    );

    // The states the talker reads: the audio rows leave their embedding out.
    let o = &out["a"];
    let states = o.states.as_ref().ok_or("no thinker states")?;
    let prefill = sidecar(&case["talker"]["hf_generate"]["prefill_embeds"])?;
    let p = o.prompt_token_ids.len() as i64;
    let ours = Tensor::cat(&[states.narrow(0, 0, p), states.narrow(0, p, 1)], 0);
    let theirs = Tensor::cat(&[prefill.narrow(0, 0, p), prefill.narrow(0, p + 1, 1)], 0);
    let err = max_abs(&(&ours - &theirs)) / max_abs(&theirs);
    assert!(err < 1e-4, "thinker states off by {err} of their peak");

    let m = case["talker_max_new_tokens"].as_u64().ok_or("talker max")? as usize;
    let mut talker = engine("talker")?;
    talker.add_talker_request(
        "a",
        states,
        o.prompt_token_ids.len(),
        SamplingParams {
            max_tokens: Some(m),
            min_tokens: m,
            speaker: case["speaker"].as_str().map(str::to_owned),
            ..SamplingParams::greedy()
        },
    )?;
    let codes = run(&mut talker)?;
    assert_eq!(
        codes["a"].token_ids,
        ids(&case["talker"]["with_codec_prefix"]["codes"]),
        "talker codes"
    );
    Ok(())
}

#[test]
fn bad_media_is_named() -> Result {
    let refs = json("media.json")?;
    let mut thinker = engine("thinker")?;
    let greedy = SamplingParams::greedy();
    let err = |r: omni_engine::Result<()>| r.err().map(|e| e.to_string()).unwrap_or_default();

    // Two clips for one placeholder.
    let messages: Vec<ChatMessage> =
        serde_json::from_value(refs["audio_prompt"]["messages"].clone())?;
    let two = Prompt::with_media(
        Prompt::Chat(messages),
        MultiModalData {
            audio: vec![clip()?, clip()?],
            ..MultiModalData::default()
        },
    );
    let e = err(thinker.add_request("two", two, greedy.clone()));
    assert!(
        e.contains("1 audio placeholder") && e.contains("2 audio item"),
        "{e}"
    );

    // Too short for the encoder, too long for the processor, not finite.
    for (name, audio, says) in [
        (
            "short",
            AudioInput::new(vec![0.1; 100], 16_000),
            "too short",
        ),
        (
            "long",
            AudioInput::new(vec![0.0; 16_000 * 301], 16_000),
            "at most 300 s",
        ),
        (
            "nan",
            AudioInput::new(vec![f32::NAN; 16_000], 16_000),
            "not a finite",
        ),
        (
            "rate",
            AudioInput::new(vec![0.0; 16_000], 0),
            "sample rate 0 Hz is outside",
        ),
    ] {
        let e = err(thinker.add_request(name, audio_prompt(&refs, audio)?, greedy.clone()));
        assert!(
            e.contains("multi_modal_data.audio[0]") && e.contains(says),
            "{name}: {e}"
        );
    }
    // Within the processor's limit but past the context: refused before
    // any encoder runs, with the count.
    let long = AudioInput::new(vec![0.0; 16_000 * 200], 16_000);
    let e = err(thinker.add_request("context", audio_prompt(&refs, long)?, greedy.clone()));
    assert!(
        e.contains("5000 of them for its media") && e.contains("max_model_len"),
        "{e}"
    );
    assert!(!thinker.has_unfinished(), "a refused request was queued");

    // Files: truncated, not audio at all, empty, a WAV stating 0 Hz (which
    // the fuzzer found panicking inside symphonia).
    let wav = std::fs::read(fixtures().join("media/speech_16k.wav"))?;
    let mut zero_hz = wav.clone();
    assert_eq!(&zero_hz[12..16], b"fmt ", "the fixture's first chunk");
    zero_hz[24..28].fill(0);
    // symphonia finds a header past leading junk.
    let junk_zero_hz = [b"'".as_slice(), &zero_hz].concat();
    // A megabyte of RIFF/WAVE headers, each a chunk of the ones before: the
    // 0 Hz check walks a bounded number of chunks (it took time quadratic
    // in the size before, minutes here), and the input is still refused.
    let riffs = b"RIFF\x04\x00\x00\x00WAVE".repeat(90_000);
    for (name, bytes, says) in [
        ("truncated.wav", &wav[..30], ""),
        ("text.wav", b"hello, this is not audio".as_slice(), ""),
        ("empty.wav", b"".as_slice(), "empty"),
        ("zero.wav", &zero_hz, "sample rate 0 Hz"),
        ("junk.wav", &junk_zero_hz, "sample rate 0 Hz"),
        ("riffs.wav", &riffs, ""),
    ] {
        let e = AudioInput::decode(bytes, name)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with(&format!("media input {name}:")) && e.contains(says),
            "{name}: {e}"
        );
    }

    // A model without encoders.
    let mut text_only = LLMEngine::new(&EngineArgs {
        model: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-qwen2")
            .to_string_lossy()
            .into_owned(),
        dtype: Some("float32".into()),
        kv_cache_memory_bytes: Some(8 << 20),
        ..EngineArgs::default()
    })?;
    let prompt = Prompt::with_media(
        Prompt::TokenIds(vec![1, 2, 3]),
        MultiModalData {
            audio: vec![clip()?],
            ..MultiModalData::default()
        },
    );
    let e = err(text_only.add_request("t", prompt, greedy));
    assert!(e.contains("no encoder for multi_modal_data"), "{e}");
    Ok(())
}
