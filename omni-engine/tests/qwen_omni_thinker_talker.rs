//! Qwen2.5-Omni's thinker and talker on the paged engine, from the tiny
//! checkpoint's folder, against transformers' references: the thinker's
//! greedy tokens and the states it hands the talker, the talker's greedy
//! codes given those states.
mod qwen_omni_support;

use std::collections::HashMap;

use omni_engine::{EngineArgs, LLMEngine, SamplingParams};
use qwen_omni_support::{engine, fixtures, ids, json, max_abs, run, sidecar, Result};
use tch::Tensor;

#[test]
fn thinker_then_talker_equal_transformers() -> Result {
    let refs = json("references.json")?;
    let cases = refs["thinker"]["cases"]
        .as_array()
        .ok_or("no thinker cases")?;
    let n = refs["thinker"]["max_new_tokens"]
        .as_u64()
        .ok_or("max_new_tokens")? as usize;

    // The thinker, all prompts in one batch, greedy, exactly n tokens (as
    // transformers' min_new_tokens = max_new_tokens).
    let mut thinker = engine("thinker")?;
    let params = SamplingParams {
        max_tokens: Some(n),
        min_tokens: n,
        output_states: true,
        ..SamplingParams::greedy()
    };
    for (i, c) in cases.iter().enumerate() {
        thinker.add_request(
            i.to_string(),
            omni_engine::Prompt::TokenIds(ids(&c["prompt_ids"])),
            params.clone(),
        )?;
    }
    let out = run(&mut thinker)?;
    for (i, c) in cases.iter().enumerate() {
        let o = &out[&i.to_string()];
        assert_eq!(
            o.token_ids,
            ids(&c["generated_ids"]),
            "thinker tokens of {}",
            c["name"]
        );
    }

    // The talker, from the thinker's states, greedy, 16 codes.
    let talker_refs = &refs["talker"];
    let m = talker_refs["max_new_tokens"]
        .as_u64()
        .ok_or("talker max_new_tokens")? as usize;
    let mut talker = engine("talker")?;
    for case in talker_refs["cases"].as_array().ok_or("no talker cases")? {
        let p = case["prompt_index"].as_u64().ok_or("prompt_index")? as usize;
        let o = &out[&p.to_string()];
        let states = o.states.as_ref().ok_or("no thinker states")?;
        let prompt_len = o.prompt_token_ids.len();
        assert_eq!(
            states.size()[0] as usize,
            prompt_len + n - 1,
            "one state per position read"
        );

        // The states are what transformers feeds the talker (prompt rows, first reply row).
        let prefill = sidecar(
            &case["hf_generate"]["prefill_embeds"]["file"]
                .is_string()
                .then(|| case["hf_generate"]["prefill_embeds"].clone())
                .ok_or("no prefill sidecar")?,
        )?;
        let p_len = prompt_len as i64;
        let ours = Tensor::cat(&[states.narrow(0, 0, p_len), states.narrow(0, p_len, 1)], 0);
        let theirs = Tensor::cat(
            &[prefill.narrow(0, 0, p_len), prefill.narrow(0, p_len + 1, 1)],
            0,
        );
        let err = max_abs(&(&ours - &theirs)) / max_abs(&theirs);
        assert!(
            err < 1e-4,
            "{}: thinker states off by {err} of their peak",
            case["name"]
        );

        let talker_params = SamplingParams {
            max_tokens: Some(m),
            min_tokens: m,
            speaker: case["speaker"].as_str().map(str::to_owned),
            ..SamplingParams::greedy()
        };
        talker.add_talker_request(
            case["name"].as_str().unwrap_or("?"),
            states,
            prompt_len,
            talker_params,
        )?;
    }
    let codes = run(&mut talker)?;
    for case in talker_refs["cases"].as_array().ok_or("no talker cases")? {
        let name = case["name"].as_str().unwrap_or("?");
        let want = ids(&case["with_codec_prefix"]["codes"]);
        assert_eq!(codes[name].token_ids, want, "talker codes of {name}");
    }
    Ok(())
}

#[test]
fn a_part_the_folder_lacks_is_named() -> Result {
    for stage in [Some("vision"), None] {
        let args = EngineArgs {
            model: fixtures().join("tiny").to_string_lossy().into_owned(),
            ..EngineArgs::default()
        };
        let e = LLMEngine::new_part(&args, stage)
            .err()
            .ok_or("a Qwen2.5-Omni folder loaded without a decoder part")?;
        let msg = e.to_string();
        assert!(
            msg.contains("model_stage") && msg.contains("thinker"),
            "{msg}"
        );
        if let Some(s) = stage {
            assert!(msg.contains(s), "{msg}");
        }
    }
    // The talker reads states, not prompts.
    let mut talker = engine("talker")?;
    let e = talker
        .add_request(
            "x",
            omni_engine::Prompt::TokenIds(vec![1, 2]),
            SamplingParams::default(),
        )
        .err()
        .ok_or("the talker took a prompt")?;
    assert!(e.to_string().contains("thinker2talker"), "{e}");
    Ok(())
}

/// The talker started on the thinker's first states and fed the rest as the
/// thinker writes them (one thinker step, then one talker step) generates
/// the codes it generates from the whole reply; it starts before the
/// thinker is done and waits, without stepping, when it gets ahead.
#[test]
fn a_talker_fed_as_the_thinker_writes_gives_the_same_codes() -> Result {
    let refs = json("references.json")?;
    let cases = refs["thinker"]["cases"]
        .as_array()
        .ok_or("no thinker cases")?;
    let n = refs["thinker"]["max_new_tokens"]
        .as_u64()
        .ok_or("max_new_tokens")? as usize;
    let talker_refs = &refs["talker"];
    let m = talker_refs["max_new_tokens"]
        .as_u64()
        .ok_or("talker max_new_tokens")? as usize;
    let talker_cases = talker_refs["cases"].as_array().ok_or("no talker cases")?;

    let mut thinker = engine("thinker")?;
    let mut talker = engine("talker")?;
    let params = SamplingParams {
        max_tokens: Some(n),
        min_tokens: n,
        output_states: true,
        ..SamplingParams::greedy()
    };
    for (i, c) in cases.iter().enumerate() {
        thinker.add_request(
            i.to_string(),
            omni_engine::Prompt::TokenIds(ids(&c["prompt_ids"])),
            params.clone(),
        )?;
    }
    // Per thinker request: the states so far, until its talkers start.
    let mut pending: HashMap<String, Vec<Tensor>> = HashMap::new();
    let mut started: HashMap<String, usize> = HashMap::new();
    let mut codes = HashMap::new();
    let mut first_code_before_thinker_done = 0;
    let mut waited = false;
    while thinker.has_unfinished() || talker.has_unfinished() {
        for o in thinker.step()? {
            let fresh = o
                .new_states
                .unwrap_or_else(|| Tensor::zeros([0, 1], tch::kind::FLOAT_CPU));
            let generated = o.token_ids.len();
            let mine: Vec<_> = talker_cases
                .iter()
                .filter(|c| {
                    c["prompt_index"].as_u64().map(|p| p.to_string()) == Some(o.request_id.clone())
                })
                .collect();
            if started.contains_key(&o.request_id) {
                for c in &mine {
                    let name = c["name"].as_str().ok_or("name")?;
                    talker.extend_talker_request(name, &fresh, o.finished)?;
                }
                continue;
            }
            pending.entry(o.request_id.clone()).or_default().push(fresh);
            if generated < 2 {
                continue;
            }
            let states = Tensor::cat(&pending.remove(&o.request_id).unwrap_or_default(), 0);
            let prompt_len = states.size()[0] as usize - (generated - 1);
            for c in &mine {
                let name = c["name"].as_str().ok_or("name")?;
                let p = SamplingParams {
                    max_tokens: Some(m),
                    min_tokens: m,
                    speaker: c["speaker"].as_str().map(str::to_owned),
                    ..SamplingParams::greedy()
                };
                if o.finished {
                    talker.add_talker_request(name, &states, prompt_len, p)?;
                } else {
                    talker.start_talker_request(name, &states, prompt_len, None, p)?;
                }
            }
            started.insert(o.request_id.clone(), prompt_len);
        }
        // Two talker steps per thinker step: the talker gets ahead.
        for _ in 0..2 {
            if talker.has_unfinished() && !talker.has_runnable() {
                waited = true;
                break;
            }
            for o in talker.step()? {
                if o.token_ids.len() == 1 && thinker.has_unfinished() {
                    first_code_before_thinker_done += 1;
                }
                if o.finished {
                    codes.insert(o.request_id.clone(), o.token_ids);
                }
            }
        }
    }
    for case in talker_cases {
        let name = case["name"].as_str().unwrap_or("?");
        let want = ids(&case["with_codec_prefix"]["codes"]);
        assert_eq!(
            codes.get(name),
            Some(&want),
            "streamed talker codes of {name}"
        );
    }
    assert_eq!(
        first_code_before_thinker_done,
        talker_cases.len(),
        "every talker began before its thinker finished"
    );
    assert!(waited, "the talker never got ahead of the thinker");
    Ok(())
}

/// A talker request that waits for the thinker's next states does not hold
/// up the others: with one request stalled after its first two states and
/// another fed whole, the engine keeps stepping the second to the end (its
/// codes as transformers'), and only then says it has nothing runnable
/// while the stalled one is still unfinished.
#[test]
fn a_talker_waiting_for_states_does_not_block_other_requests() -> Result {
    let refs = json("references.json")?;
    let case = &refs["thinker"]["cases"][0];
    let n = refs["thinker"]["max_new_tokens"]
        .as_u64()
        .ok_or("max_new_tokens")? as usize;
    let talker_refs = &refs["talker"];
    let m = talker_refs["max_new_tokens"]
        .as_u64()
        .ok_or("talker max_new_tokens")? as usize;
    let talker_case = talker_refs["cases"]
        .as_array()
        .ok_or("no talker cases")?
        .iter()
        .find(|c| c["prompt_index"] == 0)
        .ok_or("no talker case for prompt 0")?;

    // The thinker's states for the whole answer.
    let mut thinker = engine("thinker")?;
    thinker.add_request(
        "0",
        omni_engine::Prompt::TokenIds(ids(&case["prompt_ids"])),
        SamplingParams {
            max_tokens: Some(n),
            min_tokens: n,
            output_states: true,
            ..SamplingParams::greedy()
        },
    )?;
    let mut rows = Vec::new();
    let mut generated = 0;
    while thinker.has_unfinished() {
        for o in thinker.step()? {
            rows.extend(o.new_states);
            generated = o.token_ids.len();
        }
    }
    let states = Tensor::cat(&rows, 0);
    let prompt_len = states.size()[0] as usize - (generated - 1);

    let mut talker = engine("talker")?;
    let params = SamplingParams {
        max_tokens: Some(m),
        min_tokens: m,
        speaker: talker_case["speaker"].as_str().map(str::to_owned),
        ..SamplingParams::greedy()
    };
    // Stalled: the prompt and the first two tokens' states, never more.
    let head = states.narrow(0, 0, prompt_len as i64 + 1);
    talker.start_talker_request("stalled", &head, prompt_len, None, params.clone())?;
    talker.add_talker_request("whole", &states, prompt_len, params)?;
    let mut codes = None;
    let mut stalled_codes = 0;
    let mut steps = 0;
    while codes.is_none() {
        assert!(
            talker.has_runnable(),
            "after {steps} steps the whole request could not run"
        );
        for o in talker.step()? {
            // The stalled one speaks as far as its states go, never to the end.
            if o.request_id == "stalled" {
                assert!(!o.finished, "the stalled request finished");
                stalled_codes = o.token_ids.len();
            } else if o.finished {
                codes = Some(o.token_ids);
            }
        }
        steps += 1;
        assert!(steps <= 10 * m, "the whole request never finished");
    }
    let name = talker_case["name"].as_str().unwrap_or("?");
    assert_eq!(
        codes,
        Some(ids(&talker_case["with_codec_prefix"]["codes"])),
        "codes of {name} beside a stalled request"
    );
    assert!(
        stalled_codes >= 1 && stalled_codes < m,
        "the stalled request made {stalled_codes} codes of {m}"
    );
    assert!(talker.has_unfinished(), "the stalled request is gone");
    assert!(
        !talker.has_runnable(),
        "only the stalled request is left, and it waits for states"
    );
    Ok(())
}
