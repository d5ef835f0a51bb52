//! Images and videos into Qwen2.5-Omni's thinker, against transformers on the tiny
//! checkpoint (`make_qwen_omni_media_fixture.py`): the image processor's
//! patches (resized, normalised, laid out), the vision encoder's rows
//! (windowed and full attention, 2-D rotary, merger), the 3-D rotary
//! positions of the expanded prompt, the thinker's greedy tokens, and the
//! talker's codes on 3-D positions.
mod qwen_omni_support;

use omni_engine::{ChatMessage, ImageInput, MultiModalData, Prompt, SamplingParams, VideoInput};
use qwen_omni_support::{engine, fixtures, ids, json, max_abs, run, sidecar, Result};
use serde_json::Value;
use tch::Tensor;

fn picture() -> Result<ImageInput> {
    Ok(ImageInput::read(&fixtures().join("media/picture.png"))?)
}

fn image_prompt(refs: &Value, image: ImageInput) -> Result<Prompt> {
    let messages: Vec<ChatMessage> =
        serde_json::from_value(refs["image_prompt"]["messages"].clone())?;
    Ok(Prompt::with_media(
        Prompt::Chat(messages),
        MultiModalData {
            image: vec![image],
            ..MultiModalData::default()
        },
    ))
}

#[test]
fn patches_rows_and_positions_equal_transformers() -> Result {
    let refs = json("media.json")?;
    let thinker = engine("thinker")?;
    let media = thinker.media_encoders().ok_or("no encoders")?;
    let processor = media.image_processor().ok_or("no image processor")?;
    let image = picture()?;
    let patches = processor.process(&image, "picture")?;
    let grid: Vec<i64> = refs["image"]["image_grid_thw"]
        .as_array()
        .ok_or("grid")?
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    assert_eq!(patches.grid.to_vec(), grid, "patch grid");
    let theirs = sidecar(&refs["image"]["pixel_values"])?;
    let err = max_abs(&(&patches.pixel_values - &theirs));
    eprintln!("pixel values: max abs error {err:e}");
    assert!(err < 1e-4, "pixel values off by {err}");

    let rows = media
        .vision_encoder()
        .ok_or("no vision encoder")?
        .forward(&theirs, patches.grid)?;
    let want = sidecar(&refs["image"]["encoder_output"])?;
    assert_eq!(rows.size(), want.size(), "encoder rows");
    let err = max_abs(&(&rows - &want)) / max_abs(&want);
    eprintln!("vision encoder: max abs error {err:e} of the peak");
    assert!(err < 1e-4, "vision encoder off by {err} of its peak");

    let case = &refs["image_prompt"];
    let unexpanded = thinker.encode_prompt(&image_prompt(&refs, picture()?)?)?;
    let data = MultiModalData {
        image: vec![image],
        ..MultiModalData::default()
    };
    let expanded = media.expand("p", &unexpanded, &data, thinker.max_model_len())?;
    assert_eq!(expanded.ids, ids(&case["prompt_ids"]), "expanded ids");
    let rows: Vec<Vec<i64>> = serde_json::from_value(case["position_ids"].clone())?;
    let want: Vec<[i64; 3]> = (0..rows[0].len())
        .map(|i| [rows[0][i], rows[1][i], rows[2][i]])
        .collect();
    assert_eq!(expanded.positions, want, "3-D positions");
    assert_eq!(
        expanded.position_delta,
        case["rope_delta"].as_i64().ok_or("rope_delta")?,
        "position delta"
    );
    Ok(())
}

/// Runs `prompt` through the thinker (greedy, the case's length, states
/// on) and checks its expanded ids, 3-D positions and tokens against the
/// case; then the talker from its states and positions, whose greedy codes
/// must be the case's. The thinker's output comes back for more checks.
fn thinker_then_talker(
    name: &str,
    case: &Value,
    prompt: Prompt,
) -> Result<omni_engine::RequestOutput> {
    let n = case["max_new_tokens"].as_u64().ok_or("max_new_tokens")? as usize;
    let mut thinker = engine("thinker")?;
    thinker.add_request(
        name,
        prompt,
        SamplingParams {
            max_tokens: Some(n),
            min_tokens: n,
            output_states: true,
            ..SamplingParams::greedy()
        },
    )?;
    let mut out = run(&mut thinker)?;
    let o = out.remove(name).ok_or("no thinker output")?;
    assert_eq!(
        o.prompt_token_ids,
        ids(&case["prompt_ids"]),
        "{name}: expanded prompt ids"
    );
    let positions = o.mrope_positions.as_ref().ok_or("no 3-D positions")?;
    let want: Vec<Vec<i64>> = serde_json::from_value(case["position_ids"].clone())?;
    let want = Tensor::from_slice(&want.concat()).reshape([3, -1]);
    assert!(positions.equal(&want), "{name}: 3-D positions");
    assert_eq!(
        o.token_ids,
        ids(&case["generated_ids"]),
        "{name}: thinker tokens"
    );

    let m = case["talker_max_new_tokens"].as_u64().ok_or("talker max")? as usize;
    let mut talker = engine("talker")?;
    talker.add_talker_request_with_positions(
        name,
        o.states.as_ref().ok_or("no states")?,
        o.prompt_token_ids.len(),
        Some(positions),
        SamplingParams {
            max_tokens: Some(m),
            min_tokens: m,
            speaker: case["speaker"].as_str().map(str::to_owned),
            ..SamplingParams::greedy()
        },
    )?;
    let codes = run(&mut talker)?;
    assert_eq!(
        codes[name].token_ids,
        ids(&case["talker_codes"]),
        "{name}: talker codes"
    );
    Ok(o)
}

#[test]
fn image_prompts_give_transformers_tokens_and_codes() -> Result {
    let refs = json("media.json")?;
    let case = &refs["image_prompt"];
    let o = thinker_then_talker("image", case, image_prompt(&refs, picture()?)?)?;
    // The states the talker read: the image rows leave their embedding out.
    let states = o.states.as_ref().ok_or("no thinker states")?;
    let prefill = sidecar(&case["talker_prefill_embeds"])?;
    let p = o.prompt_token_ids.len() as i64;
    let ours = Tensor::cat(&[states.narrow(0, 0, p), states.narrow(0, p, 1)], 0);
    let theirs = Tensor::cat(&[prefill.narrow(0, 0, p), prefill.narrow(0, p + 1, 1)], 0);
    let err = max_abs(&(&ours - &theirs)) / max_abs(&theirs);
    assert!(err < 1e-4, "thinker states off by {err} of their peak");
    Ok(())
}

#[test]
fn bad_images_are_named() -> Result {
    let refs = json("media.json")?;
    let mut thinker = engine("thinker")?;
    let png = std::fs::read(fixtures().join("media/picture.png"))?;
    for (name, bytes) in [
        ("truncated.png", &png[..png.len() / 2]),
        ("text.png", b"not a picture".as_slice()),
        ("empty.png", b"".as_slice()),
    ] {
        let e = ImageInput::decode(bytes, name)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with(&format!("media input {name}:")),
            "{name}: {e}"
        );
    }
    // A sliver: its aspect ratio is past what the processor takes.
    let sliver = ImageInput::new(300, 1, vec![128; 900])?;
    let e = thinker
        .add_request(
            "sliver",
            image_prompt(&refs, sliver)?,
            SamplingParams::greedy(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("multi_modal_data.image[0]") && e.contains("aspect ratio"),
        "{e}"
    );
    assert!(
        ImageInput::new(2, 2, vec![0; 11]).is_err(),
        "a short buffer"
    );
    Ok(())
}

fn video(refs: &Value) -> Result<VideoInput> {
    let frames = refs["video"]["frames"]
        .as_array()
        .ok_or("no frames")?
        .iter()
        .map(|f| {
            Ok(ImageInput::read(
                &fixtures().join(f.as_str().ok_or("frame")?),
            )?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(VideoInput::new(
        frames,
        refs["video"]["fps"].as_f64().ok_or("fps")?,
    )?)
}

#[test]
fn videos_equal_transformers_from_patches_to_codes() -> Result {
    let refs = json("media.json")?;
    let thinker = engine("thinker")?;
    let clip = video(&refs)?;
    {
        let media = thinker.media_encoders().ok_or("no encoders")?;
        let processor = media.image_processor().ok_or("no image processor")?;
        let patches = processor.process_video(&clip, "video")?;
        let grid: Vec<i64> = serde_json::from_value(refs["video"]["video_grid_thw"].clone())?;
        assert_eq!(
            patches.grid.to_vec(),
            grid,
            "video grid (frames padded to pairs)"
        );
        let stride = refs["video"]["pixel_values_sample_stride"]
            .as_i64()
            .ok_or("stride")?;
        let sample = patches.pixel_values.reshape([-1]).slice(0, 0, None, stride);
        let want = sidecar(&refs["video"]["pixel_values_sample"])?;
        let err = max_abs(&(&sample - &want));
        eprintln!("video pixel values (every {stride}th): max abs error {err:e}");
        assert!(err < 1e-4, "video pixel values off by {err}");
        let rows = media
            .vision_encoder()
            .ok_or("no vision encoder")?
            .forward(&patches.pixel_values, patches.grid)?;
        let want = sidecar(&refs["video"]["encoder_output"])?;
        let err = max_abs(&(&rows - &want)) / max_abs(&want);
        eprintln!("vision encoder on video: max abs error {err:e} of the peak");
        assert!(err < 1e-4, "video rows off by {err} of their peak");
    }

    let case = &refs["video_prompt"];
    let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone())?;
    let prompt = Prompt::with_media(
        Prompt::Chat(messages),
        MultiModalData {
            video: vec![clip],
            ..MultiModalData::default()
        },
    );
    // Its time row advances 25 positions a second.
    thinker_then_talker("video", case, prompt)?;
    Ok(())
}

#[test]
fn an_animated_gif_is_a_video() -> Result {
    let refs = json("media.json")?;
    let bytes = std::fs::read(fixtures().join("media/video.gif"))?;
    let gif = VideoInput::decode_gif(&bytes, "video.gif")?;
    let png = video(&refs)?;
    assert_eq!(gif.frames.len(), png.frames.len(), "frames");
    assert_eq!(gif.fps, png.fps, "fps from the frame delay");
    assert_eq!(
        (gif.frames[0].width, gif.frames[0].height),
        (png.frames[0].width, png.frames[0].height)
    );
    let e = VideoInput::decode_gif(&bytes[..bytes.len() / 2], "half.gif")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.starts_with("media input half.gif:"), "{e}");
    Ok(())
}

#[test]
fn bad_videos_are_named() {
    let frame = |w: u32| ImageInput::new(w, 4, vec![0; w as usize * 12]).ok();
    let (Some(a), Some(b)) = (frame(4), frame(6)) else {
        panic!("frames");
    };
    for (video, says) in [
        (VideoInput::new(vec![], 2.0), "no frames"),
        (VideoInput::new(vec![a.clone(), b], 2.0), "one size"),
        (VideoInput::new(vec![a.clone()], 0.0), "fps 0"),
        (VideoInput::new(vec![a; 769], 2.0), "at most 768"),
    ] {
        let e = video.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(says), "{e}");
    }
}

#[test]
fn a_video_with_its_sound_equals_transformers() -> Result {
    let refs = json("media.json")?;
    let speech = omni_engine::AudioInput::read(&fixtures().join("media/speech_16k.wav"))?;
    // The whole clip with the 5 frames (interleaved), and a short sound with
    // 2 frames (it ends below the frames' largest position).
    for name in ["video_with_audio_prompt", "video_with_short_audio_prompt"] {
        let case = &refs[name];
        let mut clip = video(&refs)?;
        let mut sound = speech.clone();
        if let Some(f) = case["frames"].as_u64() {
            clip.frames.truncate(f as usize);
        }
        if let Some(n) = case["samples"].as_u64() {
            sound.samples.truncate(n as usize);
        }
        let messages: Vec<ChatMessage> =
            serde_json::from_value(refs["video_prompt"]["messages"].clone())?;
        let prompt = Prompt::with_media(
            Prompt::Chat(messages),
            MultiModalData {
                video: vec![clip],
                audio: vec![sound],
                use_audio_in_video: true,
                ..MultiModalData::default()
            },
        );
        thinker_then_talker(name, case, prompt)?;
    }
    Ok(())
}

#[test]
fn videos_whose_positions_cannot_be_placed_are_refused() -> Result {
    let refs = json("media.json")?;
    let mut thinker = engine("thinker")?;
    let messages: Vec<ChatMessage> =
        serde_json::from_value(refs["video_prompt"]["messages"].clone())?;
    let err = |r: omni_engine::Result<()>| r.err().map(|e| e.to_string()).unwrap_or_default();

    // At 0.1 fps a temporal patch is 20 s: the time row outruns the tokens.
    let mut slow = video(&refs)?;
    slow.fps = 0.1;
    let prompt = Prompt::with_media(
        Prompt::Chat(messages),
        MultiModalData {
            video: vec![slow],
            ..MultiModalData::default()
        },
    );
    let e = err(thinker.add_request("slow", prompt, SamplingParams::greedy()));
    assert!(e.contains("rotary positions reach"), "{e}");

    // A video with its sound needs the <|vision_bos|> the template writes.
    let video_token = 613; // the fixture's <|VIDEO|>
    let bare = Prompt::with_media(
        Prompt::TokenIds(vec![video_token, 5, 6]),
        MultiModalData {
            video: vec![video(&refs)?],
            audio: vec![omni_engine::AudioInput::read(
                &fixtures().join("media/speech_16k.wav"),
            )?],
            use_audio_in_video: true,
            ..MultiModalData::default()
        },
    );
    let e = err(thinker.add_request("bare", bare, SamplingParams::greedy()));
    assert!(e.contains("must follow <|vision_bos|>"), "{e}");
    assert!(!thinker.has_unfinished(), "a refused request was queued");
    Ok(())
}
