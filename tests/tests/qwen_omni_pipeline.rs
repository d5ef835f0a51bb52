//! The built-in `qwen2_5_omni` pipeline end to end on the tiny checkpoint:
//! thinker, talker and code2wav in three processes, the thinker's states
//! handed over by `thinker2talker`, against transformers' references.
use omni_core::{OmniEngineArgs, OmniLLM, Prompt, SamplingParams, StageSamplingParams};
use omni_tests::{err, json_ids, repo_root, Result};
use serde_json::Value;

fn fixture() -> std::path::PathBuf {
    repo_root().join("omni-engine/tests/fixtures/qwen2_5_omni")
}

fn samples(entry: &Value) -> Result<Vec<f32>> {
    omni_tests::read_f32(&fixture().join(entry["file"].as_str().ok_or("no file")?))
}

fn start() -> Result<OmniLLM> {
    Ok(OmniLLM::from_engine_args(OmniEngineArgs {
        model_path: Some(fixture().join("tiny").to_string_lossy().into_owned()),
        ..OmniEngineArgs::new("qwen2_5_omni")
    })?)
}

/// The pipeline with every tensor between stages (the thinker's states,
/// the talker's codes) sent through shared memory rather than in the
/// message: a one-byte threshold.
fn start_through_shared_memory() -> Result<OmniLLM> {
    let mut config = omni_core::PipelineConfig::builtin("qwen2_5_omni")?;
    for stage in &mut config.stages {
        stage.engine_args.model = fixture().join("tiny").to_string_lossy().into_owned();
    }
    config.runtime.shm_threshold_bytes = Some(1);
    Ok(OmniLLM::from_config(
        config,
        &OmniEngineArgs::new("qwen2_5_omni"),
    )?)
}

/// The pipeline with its thinker -> talker edge sending the whole output
/// once the thinker is done (`window_size: -1`) instead of streaming it.
fn start_unstreamed() -> Result<OmniLLM> {
    let mut config = omni_core::PipelineConfig::builtin("qwen2_5_omni")?;
    for stage in &mut config.stages {
        stage.engine_args.model = fixture().join("tiny").to_string_lossy().into_owned();
    }
    assert!(
        !config.streamed_edges_from(0).is_empty(),
        "qwen2_5_omni streams thinker -> talker by default"
    );
    for edge in &mut config.runtime.edges {
        edge.window_size = -1;
    }
    Ok(OmniLLM::from_config(
        config,
        &OmniEngineArgs::new("qwen2_5_omni"),
    )?)
}

/// What the fixture script ran (see `omni_tests::qwen_params`).
fn params(refs: &Value, speaker: &str, seed: u64) -> Result<StageSamplingParams> {
    let n = refs["thinker"]["max_new_tokens"].as_u64().ok_or("n")? as usize;
    let m = refs["talker"]["max_new_tokens"].as_u64().ok_or("m")? as usize;
    Ok(omni_tests::qwen_params(n, m, speaker, Some(seed)))
}

#[test]
fn text_and_speech_equal_transformers() -> Result {
    speech_equals_transformers(start()?)
}

#[test]
fn text_and_speech_equal_transformers_with_tensors_in_shared_memory() -> Result {
    speech_equals_transformers(start_through_shared_memory()?)
}

#[test]
fn text_and_speech_equal_transformers_unstreamed() -> Result {
    speech_equals_transformers(start_unstreamed()?)
}

/// With the pipeline's own (sampled, seeded) parameters and a few prompts
/// at once, the streamed pipeline (talker fed as the thinker writes,
/// code2wav speaking chunk by chunk) gives the unstreamed pipeline's answer:
/// the same text, the same talker codes (the talker's draws are its
/// request's own), and audio within code2wav's chunking tolerance (0.5% of
/// the peak; see the engine's chunked code2wav test). The talker is made a
/// final stage here so its codes can be compared.
#[test]
fn a_streamed_pipeline_answers_as_an_unstreamed_one() -> Result {
    let prompts: Vec<Prompt> = ["Hi.", "Tell me a story about a cat.", "Why?"]
        .into_iter()
        .map(|t| Prompt::Text(t.to_owned()))
        .collect();
    // The pipeline's defaults, shorter.
    let mut params: Vec<SamplingParams> = omni_core::PipelineConfig::builtin("qwen2_5_omni")?
        .stages
        .iter()
        .map(|s| s.default_sampling_params.clone())
        .collect();
    params[0].max_tokens = Some(20);
    params[1].max_tokens = Some(60);
    // Per prompt: thinker tokens, talker codes, samples.
    type Answer = (Vec<u32>, Vec<u32>, Vec<f32>);
    let run = |streamed: bool| -> Result<Vec<Answer>> {
        let mut config = omni_core::PipelineConfig::builtin("qwen2_5_omni")?;
        for stage in &mut config.stages {
            stage.engine_args.model = fixture().join("tiny").to_string_lossy().into_owned();
        }
        config.stages[1].final_output = true;
        if !streamed {
            for edge in &mut config.runtime.edges {
                edge.window_size = -1;
            }
        }
        let omni = OmniLLM::from_config(config, &OmniEngineArgs::new("qwen2_5_omni"))?;
        let outs = omni.generate(
            prompts.clone(),
            StageSamplingParams::PerStage(params.clone()),
        )?;
        omni.shutdown()?;
        let mut answers = Vec::new();
        for i in 0..prompts.len() {
            let of = |stage: usize| {
                outs.iter()
                    .filter(|o| o.stage_id == stage)
                    .nth(i)
                    .ok_or_else(|| err(format!("no output of stage {stage} for prompt {i}")))
            };
            let audio = of(2)?.audio.as_ref().ok_or("no audio")?;
            answers.push((
                of(0)?.token_ids.clone(),
                of(1)?.token_ids.clone(),
                audio.samples.clone(),
            ));
        }
        Ok(answers)
    };
    let streamed = run(true)?;
    let whole = run(false)?;
    for (i, (s, w)) in streamed.iter().zip(&whole).enumerate() {
        assert_eq!(s.0, w.0, "prompt {i}: thinker tokens");
        assert_eq!(s.1, w.1, "prompt {i}: talker codes");
        assert!(!s.2.is_empty(), "prompt {i}: no audio");
        omni_tests::assert_waveform(&format!("prompt {i}"), &s.2, &w.2, 0.005)?;
    }
    Ok(())
}

fn speech_equals_transformers(omni: OmniLLM) -> Result {
    let refs: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("references.json"))?)?;
    for case in refs["talker"]["cases"].as_array().ok_or("no cases")? {
        let name = case["name"].as_str().unwrap_or("?");
        let p = case["prompt_index"].as_u64().ok_or("prompt_index")? as usize;
        let thinker = &refs["thinker"]["cases"][p];
        let speaker = case["speaker"].as_str().ok_or("speaker")?;
        let v = &case["with_codec_prefix"];
        let seed = v["token2wav"]["seed"].as_u64().ok_or("seed")?;
        let outs = omni.generate(
            [Prompt::TokenIds(json_ids(&thinker["prompt_ids"]))],
            params(&refs, speaker, seed)?,
        )?;
        let text = outs
            .iter()
            .find(|o| o.stage_id == 0)
            .ok_or("no text output")?;
        assert_eq!(
            text.token_ids,
            json_ids(&thinker["generated_ids"]),
            "{name}: thinker tokens"
        );
        let speech = outs
            .iter()
            .find(|o| o.stage_id == 2)
            .ok_or("no audio output")?;
        let audio = speech
            .audio
            .as_ref()
            .ok_or_else(|| err(format!("{name}: no audio")))?;
        assert_eq!(audio.sample_rate, 24_000);
        let want = samples(&v["token2wav"]["wav"])?;
        omni_tests::assert_waveform(name, &audio.samples, &want, 0.01)?;
    }
    omni.shutdown()?;
    Ok(())
}

/// `omni generate` and `omni serve` (the official `openai` client asking
/// for text and audio) run the same pipeline; the audio opens with
/// Python's `wave`.
#[test]
fn cli_and_server_speak() -> Result {
    let model = fixture().join("tiny").to_string_lossy().into_owned();
    let dir = tempfile::tempdir()?;
    let lines = omni_tests::generate_json(
        &[
            "--pipeline",
            "qwen2_5_omni",
            "--model-path",
            &model,
            "--prompt",
            "Hello there.",
            "--max-tokens",
            "16",
            "--speaker",
            "Ethan",
        ],
        dir.path(),
    )?;
    let text = lines
        .iter()
        .find(|l| l["stage_id"] == 0)
        .ok_or("no text line")?;
    assert_eq!(
        text["token_ids"].as_array().map(Vec::len),
        Some(16),
        "{text}"
    );
    let audio = lines
        .iter()
        .find(|l| l["stage_id"] == 2)
        .ok_or("no audio line")?;
    assert_eq!(audio["audio"]["sample_rate"], 24_000, "{audio}");
    // The time to first audio is reported, within the request's time.
    let ttfa = audio["metrics"]["time_to_first_audio"]
        .as_f64()
        .ok_or("no time to first audio")?;
    let e2e = audio["metrics"]["e2e_latency"].as_f64().ok_or("no e2e")?;
    assert!(ttfa > 0.0 && ttfa <= e2e, "{audio}");
    let path = audio["audio"]["path"].as_str().ok_or("no path")?;
    assert!(std::path::Path::new(path).is_file(), "{audio}");

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
            ],
        )?
        .trim(),
    )?;
    let choices = r["choices"].as_array().ok_or("no choices")?;
    assert_eq!(choices.len(), 2, "{r}");
    let spoken = &choices[1];
    assert_eq!(spoken["wav"]["sample_rate"], 24_000, "{r}");
    assert_eq!(spoken["wav"]["channels"], 1, "{r}");
    assert!(spoken["wav"]["frames"].as_u64().unwrap_or(0) > 0, "{r}");

    // Streamed, the audio comes as PCM pieces (`delta.audio.data`) as it is
    // spoken; put together they are the whole answer's samples.
    let r: Value = serde_json::from_str(
        omni_tests::run_python(
            "openai_audio_stream.py",
            &[
                &format!("http://{}/v1", server.addr),
                "qwen2_5_omni",
                "Ethan",
            ],
        )?
        .trim(),
    )?;
    assert!(r["pieces"].as_u64().unwrap_or(0) > 1, "{r}");
    assert_eq!(r["rates"], serde_json::json!([24_000]), "{r}");
    assert_eq!(r["equal"], true, "{r}");
    let order = r["order"].as_array().ok_or("no order")?;
    assert!(order.contains(&"text".into()), "{r}");

    // Interleaved: with a 2000-token answer the first audio delta comes
    // before the last text delta (the order of the events, not a clock).
    let r: Value = serde_json::from_str(
        omni_tests::run_python(
            "openai_audio_stream.py",
            &[
                &format!("http://{}/v1", server.addr),
                "qwen2_5_omni",
                "Ethan",
                "long",
            ],
        )?
        .trim(),
    )?;
    let order = r["order"].as_array().ok_or("no order")?;
    let first_audio = order.iter().position(|k| k == "audio");
    let last_text = order.iter().rposition(|k| k == "text");
    match (first_audio, last_text) {
        (Some(a), Some(t)) => assert!(
            a < t,
            "the first audio delta (#{a}) came after the last text delta (#{t}) of {}",
            order.len()
        ),
        _ => panic!("no audio or no text deltas: {first_audio:?} {last_text:?}"),
    }
    Ok(())
}

/// `AsyncOmni` streams the thinker's text as it is written, and the audio
/// after it, equal to transformers' waveform.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_omni_streams_the_text_then_the_audio() -> Result {
    use futures::StreamExt;
    omni_tests::ensure_binaries()?;
    let refs: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("references.json"))?)?;
    let omni = omni_core::AsyncOmni::from_engine_args(OmniEngineArgs {
        model_path: Some(fixture().join("tiny").to_string_lossy().into_owned()),
        ..OmniEngineArgs::new("qwen2_5_omni")
    })
    .await?;
    let case = &refs["talker"]["cases"][0];
    let thinker = &refs["thinker"]["cases"][0];
    let seed = case["with_codec_prefix"]["token2wav"]["seed"]
        .as_u64()
        .ok_or("seed")?;
    let mut stream = omni
        .generate(
            Prompt::TokenIds(json_ids(&thinker["prompt_ids"])),
            params(&refs, "Chelsie", seed)?,
            "omni-0".to_owned(),
        )
        .await?;
    let mut order = Vec::new();
    let mut token_ids = Vec::new();
    let mut audio = None;
    while let Some(out) = stream.next().await {
        let out = out?;
        order.push(out.stage_id);
        if out.stage_id == 0 && out.finished {
            token_ids = out.token_ids.clone();
        }
        if out.stage_id == 2 {
            audio = out.audio.clone();
        }
    }
    assert_eq!(token_ids, json_ids(&thinker["generated_ids"]));
    assert!(
        order.iter().filter(|&&s| s == 0).count() > 1,
        "the text was not streamed: {order:?}"
    );
    assert_eq!(order.last(), Some(&2), "the audio comes last: {order:?}");
    let audio = audio.ok_or("no audio")?;
    let want = samples(&case["with_codec_prefix"]["token2wav"]["wav"])?;
    omni_tests::assert_waveform("streamed", &audio.samples, &want, 0.01)?;
    omni.shutdown().await?;
    Ok(())
}

/// Streamed, the first audio reaches the caller while the thinker is still
/// writing: the talker starts on the thinker's first tokens, and code2wav
/// speaks each chunk of codes as it comes. Asserted from the order of the
/// outputs: a long answer (2000 thinker tokens against 80 codes, which the
/// talker makes by the thinker's 82nd token) leaves a wide margin: the
/// first audio came after 193 of 2000 thinker tokens here (2 cores shared
/// by three stage processes). The pieces, in order, are the
/// whole waveform the last output carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_audio_comes_before_the_thinker_is_done() -> Result {
    use futures::StreamExt;
    let omni = tiny_async_omni().await?;
    let (n, m) = (2000, 80);
    let params = long_answer(n, m);
    let mut stream = omni
        .generate(
            Prompt::Text("Hello there.".into()),
            params,
            "early".to_owned(),
        )
        .await?;
    let mut events = Vec::new();
    let mut pieces: Vec<f32> = Vec::new();
    let mut whole = None;
    // Thinker tokens written when the first audio came.
    let mut written = 0;
    while let Some(out) = stream.next().await {
        let out = out?;
        if out.stage_id == 2 {
            let piece = out
                .delta_audio
                .as_ref()
                .ok_or("an audio output without its piece")?;
            pieces.extend_from_slice(&piece.samples);
            if !piece.samples.is_empty() {
                events.push("audio");
            }
            if out.finished {
                whole = out.audio.clone();
            }
        } else if out.stage_id == 0 && events.is_empty() {
            written = out.token_ids.len();
        }
        if out.stage_id == 0 && out.finished {
            assert_eq!(out.token_ids.len(), n);
            events.push("thinker done");
        }
    }
    omni.shutdown().await?;
    eprintln!("first audio after {written} of {n} thinker tokens");
    let first_audio = events.iter().position(|&e| e == "audio");
    let thinker_done = events.iter().position(|&e| e == "thinker done");
    assert!(
        first_audio.is_some() && first_audio < thinker_done,
        "the first audio did not come before the thinker finished: {events:?}"
    );
    // The first piece, then the rest (a step makes up to 8 chunks).
    assert!(
        events.iter().filter(|&&e| e == "audio").count() >= 2,
        "the audio came in one piece: {events:?}"
    );
    let whole = whole.ok_or("no whole audio on the last output")?;
    assert_eq!(whole.sample_rate, 24_000);
    assert_eq!(whole.samples, pieces, "the pieces are not the whole");
    // 80 codes, 2 frames a code, the vocoder's hop of 16 samples.
    assert_eq!(whole.samples.len(), m * 2 * 16);
    Ok(())
}

/// A long spoken answer: the thinker writes `n` tokens, the talker `m`
/// codes.
fn long_answer(n: usize, m: usize) -> StageSamplingParams {
    StageSamplingParams::PerStage(vec![
        SamplingParams {
            max_tokens: Some(n),
            min_tokens: n,
            output_states: true,
            ..SamplingParams::greedy()
        },
        SamplingParams {
            max_tokens: Some(m),
            min_tokens: m,
            ..SamplingParams::greedy()
        },
        SamplingParams {
            seed: Some(3),
            ..SamplingParams::default()
        },
    ])
}

async fn tiny_async_omni() -> Result<omni_core::AsyncOmni> {
    omni_tests::ensure_binaries()?;
    Ok(omni_core::AsyncOmni::from_engine_args(OmniEngineArgs {
        model_path: Some(fixture().join("tiny").to_string_lossy().into_owned()),
        ..OmniEngineArgs::new("qwen2_5_omni")
    })
    .await?)
}

/// Reads `stream` until its first piece of audio.
async fn until_first_audio(stream: &mut omni_core::OmniStream) -> Result {
    use futures::StreamExt;
    while let Some(out) = stream.next().await {
        if out?.delta_audio.is_some_and(|a| !a.samples.is_empty()) {
            return Ok(());
        }
    }
    Err(err("the stream ended before any audio"))
}

/// Dropping a stream while its audio is coming stops the request in every
/// stage (the talker waiting for the thinker's next states, code2wav
/// between chunks): each stage soon holds no request, and the pipeline
/// answers the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cancelled_mid_speech_stops_in_every_stage() -> Result {
    use futures::StreamExt;
    let omni = tiny_async_omni().await?;
    let mut stream = omni
        .generate(
            Prompt::Text("Hello.".into()),
            long_answer(2000, 400),
            "gone".to_owned(),
        )
        .await?;
    until_first_audio(&mut stream).await?;
    drop(stream);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut held = Vec::new();
        for s in 0..3 {
            held.push(omni.stage_health(s).await?.running_requests);
        }
        if held.iter().all(|&n| n == 0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stages still hold the cancelled request after 20 s: {held:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut next = omni
        .generate(
            Prompt::Text("Hi.".into()),
            long_answer(8, 16),
            "next".to_owned(),
        )
        .await?;
    let mut spoke = false;
    while let Some(out) = next.next().await {
        spoke |= out?.audio.is_some();
    }
    assert!(spoke, "the next request got no audio");
    omni.shutdown().await?;
    Ok(())
}

/// Each stage killed while the pipeline speaks (the thinker still writing,
/// the talker running ahead of it, code2wav between chunks): the stream
/// ends with an error naming the stage, within seconds, never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_dying_mid_speech_ends_the_stream_with_an_error() -> Result {
    use futures::StreamExt;
    for victim in 0..3 {
        let omni = tiny_async_omni().await?;
        let pid = omni.stages()[victim].pid;
        let mut stream = omni
            .generate(
                Prompt::Text("Hello.".into()),
                long_answer(2000, 400),
                format!("dies-{victim}"),
            )
            .await?;
        until_first_audio(&mut stream).await?;
        // SAFETY: plain kill(2) of a stage process this test started.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while let Some(out) = stream.next().await {
                if let Err(e) = out {
                    return Some(e.to_string());
                }
            }
            None
        })
        .await
        .map_err(|_| err(format!("the stream hung after stage {victim} died")))?;
        let e = ended.ok_or_else(|| {
            err(format!(
                "stage {victim} died and the stream ended without an error"
            ))
        })?;
        assert!(e.contains(&format!("stage {victim}")), "{e}");
        let _ = omni.shutdown().await;
    }
    Ok(())
}

/// The profile tools on the three-stage speech pipeline: `summarize` names
/// code2wav (the only stage with real work on the tiny checkpoint) as the
/// bottleneck and reports each request's time to first audio.
#[test]
fn profile_analysis_reports_time_to_first_audio() -> Result {
    let model = fixture().join("tiny").to_string_lossy().into_owned();
    let dir = tempfile::tempdir()?;
    let traces = dir.path().join("traces").to_string_lossy().into_owned();
    let out = std::process::Command::new(omni_tests::omni_bin()?)
        .args([
            "generate",
            "--pipeline",
            "qwen2_5_omni",
            "--model-path",
            &model,
            "--prompt",
            "Hello",
            "--max-tokens",
            "48",
            "--min-tokens",
            "48",
            "--profile",
            "--profile-dir",
            &traces,
            "--output-dir",
        ])
        .arg(dir.path().join("out"))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let analysis = omni_core::profile_tools::analyze(std::path::Path::new(&traces))?;
    assert_eq!(analysis.stages.len(), 3, "{analysis}");
    let bottleneck = analysis.bottleneck.as_ref().ok_or("no bottleneck")?;
    assert!(
        bottleneck.name.starts_with("stage 2 (code2wav)"),
        "{analysis}"
    );
    assert_eq!(analysis.requests.len(), 1, "{analysis}");
    let r = &analysis.requests[0];
    assert!(
        r.first_audio_us
            .is_some_and(|t| t > 0.0 && t <= r.total_us + 1.0),
        "{analysis}"
    );

    // The merged timeline shows the streaming: an arrow per piece from the
    // thinker to the talker and from the talker to code2wav, and the
    // talker at work on the request before the thinker's last step for it.
    let merged = dir.path().join("merged.json");
    omni_core::profile_tools::merge(std::path::Path::new(&traces), &merged)?;
    let trace: Value = serde_json::from_str(&std::fs::read_to_string(&merged)?)?;
    let events = trace["traceEvents"].as_array().ok_or("no events")?;
    let process_of = |name: &str| -> Option<u64> {
        events.iter().find_map(|e| {
            (e["ph"] == "M"
                && e["name"] == "process_name"
                && e["args"]["name"].as_str().is_some_and(|n| n.contains(name)))
            .then(|| e["pid"].as_u64())
            .flatten()
        })
    };
    let (thinker, talker) = (
        process_of("thinker").ok_or("no thinker process")?,
        process_of("talker").ok_or("no talker process")?,
    );
    let arrows_into = |pid: u64| {
        events
            .iter()
            .filter(|e| e["ph"] == "f" && e["cat"] == "request" && e["pid"] == pid)
            .count()
    };
    assert!(
        arrows_into(talker) >= 24,
        "{} arrows into the talker",
        arrows_into(talker)
    );
    let code2wav = process_of("code2wav").ok_or("no code2wav process")?;
    assert!(
        arrows_into(code2wav) >= 6,
        "{} arrows into code2wav",
        arrows_into(code2wav)
    );
    let steps = |pid: u64| -> Vec<(f64, f64)> {
        events
            .iter()
            .filter(|e| {
                e["pid"] == pid
                    && e["ph"] == "X"
                    && e["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("ProfilerStep#"))
            })
            .filter_map(|e| Some((e["ts"].as_f64()?, e["ts"].as_f64()? + e["dur"].as_f64()?)))
            .collect()
    };
    let talker_first = steps(talker)
        .iter()
        .map(|s| s.0)
        .fold(f64::INFINITY, f64::min);
    let thinker_last = steps(thinker).iter().map(|s| s.1).fold(0.0, f64::max);
    assert!(
        talker_first < thinker_last,
        "the talker's first step ({talker_first}) came after the thinker's last ({thinker_last})"
    );
    Ok(())
}
