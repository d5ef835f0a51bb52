//! `AsyncOmni` on the default pipeline: streaming deltas, concurrent
//! requests, abort in every stage, duplicate request ids.
use std::collections::BTreeMap;

use futures::StreamExt;
use omni_core::{AsyncOmni, Error, OmniEngineArgs, SamplingParams, StageHealth};
use omni_tests::{chat, ensure_binaries, err, tiny_params, Result};

/// Long enough that a request left to run would still be generating when
/// `abort_reached_the_stages` gives up (about 40 tokens/s on these CPUs).
const LONG: usize = 4000;

/// At most this many tokens after `abort` returned: the step in flight and
/// the one before the counters were last published, with room to spare.
const AFTER_ABORT: u64 = 16;

/// Waits (bounded) until each stage's own counters show the abort: its
/// engine holds nothing, and `aborts[s]` more aborts found their request
/// in stage `s` than in `before` (read before the request). Returns the
/// tokens each stage generated since `at_abort` (read when the abort was
/// sent). A stage that ignored the abort would keep its request and
/// generate until `LONG`, so neither check can pass by waiting.
async fn abort_reached_the_stages(
    omni: &AsyncOmni,
    before: &[StageHealth],
    at_abort: &[StageHealth],
    aborts: &[u64],
) -> Result<Vec<u64>> {
    let mut now = Vec::new();
    for _ in 0..600 {
        now = health(omni).await?;
        let settled = now.iter().zip(before).zip(aborts).all(|((h, b), &a)| {
            h.running_requests == 0
                && h.engine_requests == 0
                && h.aborted_requests - b.aborted_requests == a
        });
        if settled {
            return Ok(now
                .iter()
                .zip(at_abort)
                .map(|(h, b)| h.generated_tokens - b.generated_tokens)
                .collect());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(err(format!(
        "a minute after the abort the stages report {now:?} (before: {before:?}, aborts expected: {aborts:?})"
    )))
}

async fn health(omni: &AsyncOmni) -> Result<Vec<StageHealth>> {
    let mut out = Vec::new();
    for s in 0..omni.stages().len() {
        out.push(omni.stage_health(s).await?);
    }
    Ok(out)
}

async fn start() -> Result<AsyncOmni> {
    ensure_binaries()?;
    Ok(AsyncOmni::from_engine_args(OmniEngineArgs::new("default")).await?)
}

fn long(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..tiny_params(max_tokens)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_deltas_concatenate_to_the_final_text() -> Result {
    let omni = start().await?;
    // Four requests at once share the stages' batches.
    let mut tasks = Vec::new();
    let omni = std::sync::Arc::new(omni);
    for (i, q) in [
        "Describe rain.",
        "What is 2+2?",
        "Name a fruit.",
        "Say hello.",
    ]
    .iter()
    .enumerate()
    {
        let omni = std::sync::Arc::clone(&omni);
        let prompt = chat(q);
        tasks.push(tokio::spawn(async move {
            let mut stream = omni
                .generate(
                    prompt,
                    vec![tiny_params(12), tiny_params(8)],
                    format!("stream-{i}"),
                )
                .await?;
            let mut deltas: BTreeMap<usize, String> = BTreeMap::new();
            let mut finals: BTreeMap<usize, String> = BTreeMap::new();
            let mut outputs = 0;
            while let Some(out) = stream.next().await {
                let out = out?;
                outputs += 1;
                deltas
                    .entry(out.stage_id)
                    .or_default()
                    .push_str(&out.delta_text);
                assert!(out.text.starts_with(deltas[&out.stage_id].as_str()) || out.finished);
                if out.finished {
                    assert!(
                        finals.insert(out.stage_id, out.text.clone()).is_none(),
                        "stage finished twice"
                    );
                }
            }
            Ok::<_, omni_tests::BoxError>((deltas, finals, outputs))
        }));
    }
    for t in tasks {
        let (deltas, finals, outputs) = t.await??;
        assert_eq!(finals.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
        for (stage, text) in &finals {
            assert_eq!(
                &deltas[stage], text,
                "stage {stage}: deltas do not add up to the text"
            );
            assert!(!text.is_empty());
        }
        // Stage 0 streamed: more than one output per stage on average.
        assert!(outputs > 2, "only {outputs} outputs: nothing was streamed");
    }
    assert_eq!(omni.num_running(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_stops_a_request_in_every_stage() -> Result {
    let omni = start().await?;

    // Abort while stage 0 generates: stage 1 never produces anything.
    let before = health(&omni).await?;
    let mut stream = omni
        .generate(chat("Tell a long story."), vec![long(LONG), long(8)], "a")
        .await?;
    let first = stream.next().await.ok_or_else(|| err("no output"))??;
    assert_eq!(first.stage_id, 0);
    assert!(omni.abort("a").await?);
    let at_abort = health(&omni).await?;
    let mut rest = Vec::new();
    while let Some(out) = stream.next().await {
        rest.push(out?);
    }
    assert!(
        rest.iter().all(|o| o.stage_id == 0),
        "stage 1 ran after abort: {rest:?}"
    );
    assert!(
        !omni.abort("a").await?,
        "an ended request is still abortable"
    );
    let generated = abort_reached_the_stages(&omni, &before, &at_abort, &[1, 0]).await?;
    assert!(
        generated[0] < AFTER_ABORT && generated[1] == 0,
        "tokens generated per stage after the abort of \"a\": {generated:?}"
    );

    // Abort while stage 1 generates (stage 0 done after 2 tokens).
    let before = health(&omni).await?;
    let mut stream = omni
        .generate(chat("Hi."), vec![long(2), long(LONG)], "b")
        .await?;
    loop {
        let out = stream
            .next()
            .await
            .ok_or_else(|| err("stream ended before stage 1 started"))??;
        if out.stage_id == 1 {
            break;
        }
    }
    assert!(omni.abort("b").await?);
    let at_abort = health(&omni).await?;
    while stream.next().await.transpose()?.is_some() {}
    assert_eq!(omni.num_running(), 0);
    let generated = abort_reached_the_stages(&omni, &before, &at_abort, &[0, 1]).await?;
    assert!(
        generated[0] == 0 && generated[1] < AFTER_ABORT,
        "tokens generated per stage after the abort of \"b\": {generated:?}"
    );

    // Dropping a stream aborts too; the id is free again afterwards and the
    // pipeline serves the next request.
    let before = health(&omni).await?;
    let mut stream = omni
        .generate(chat("Count."), vec![long(LONG), long(8)], "c")
        .await?;
    stream.next().await.ok_or_else(|| err("no output"))??;
    drop(stream);
    let at_abort = health(&omni).await?;
    assert_eq!(omni.num_running(), 0);
    let generated = abort_reached_the_stages(&omni, &before, &at_abort, &[1, 0]).await?;
    assert!(
        generated[0] < AFTER_ABORT && generated[1] == 0,
        "tokens generated per stage after dropping \"c\": {generated:?}"
    );
    let mut stream = omni
        .generate(chat("Count."), vec![tiny_params(3), tiny_params(3)], "c")
        .await?;
    let mut finished = 0;
    while let Some(out) = stream.next().await {
        finished += usize::from(out?.finished);
    }
    assert_eq!(finished, 2);

    // The id reused the moment its stream is dropped: the abort of the old
    // request must not reach the new one (it went out by the caller's id
    // after the id was free; found when tried). Both stages finish it.
    for round in 0..3 {
        let mut old = omni
            .generate(chat("Count."), vec![long(LONG), long(8)], "d")
            .await?;
        old.next().await.ok_or_else(|| err("no output"))??;
        drop(old);
        let mut new = omni
            .generate(chat("Hi."), vec![tiny_params(3), tiny_params(3)], "d")
            .await?;
        let mut finished = Vec::new();
        while let Some(out) = new.next().await {
            let out = out?;
            if out.finished {
                finished.push(out.stage_id);
            }
        }
        assert_eq!(
            finished,
            [0, 1],
            "round {round}: the new \"d\" was cut short"
        );
    }
    omni.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_request_id_and_bad_params_are_refused() -> Result {
    let omni = start().await?;
    let stream = omni
        .generate(chat("Tell a story."), vec![long(64), long(4)], "dup")
        .await?;
    match omni
        .generate(chat("Hi"), vec![tiny_params(2), tiny_params(2)], "dup")
        .await
    {
        Err(e @ Error::DuplicateRequestId(_)) => assert!(e.to_string().contains("dup"), "{e}"),
        Err(e) => return Err(err(format!("expected DuplicateRequestId, got {e}"))),
        Ok(_) => return Err(err("a second request with id dup was accepted")),
    }
    match omni
        .generate(chat("Hi"), vec![tiny_params(2)], "other")
        .await
    {
        Err(Error::SamplingParamsCount {
            expected: 2,
            got: 1,
        }) => {}
        Err(e) => return Err(err(format!("expected SamplingParamsCount, got {e}"))),
        Ok(_) => {
            return Err(err(
                "one sampling params for two stages was accepted as per-stage",
            ))
        }
    }
    match omni.generate(chat("Hi"), tiny_params(2), "").await {
        Err(Error::EmptyRequestId) => {}
        Err(e) => return Err(err(format!("expected EmptyRequestId, got {e}"))),
        Ok(_) => return Err(err("an empty request id was accepted")),
    }
    match omni.start_profile(Some(&[2])).await {
        Err(Error::UnknownStage {
            stage_id: 2,
            num_stages: 2,
        }) => {}
        Err(e) => return Err(err(format!("expected UnknownStage, got {e}"))),
        Ok(()) => return Err(err("stage 2 of a 2-stage pipeline was accepted")),
    }
    drop(stream);
    Ok(())
}
