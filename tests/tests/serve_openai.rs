//! `omni serve` on a free loopback port, driven by the official `openai`
//! Python client (streaming and not) and by raw HTTP for error cases,
//! health, metrics and profiling.
use std::path::PathBuf;

use omni_tests::{
    assert_window, err, http, metric, now_us, python, run_python, trace_files, wait_until,
    HttpConn, Result, Server, DEFAULT_STAGE_NAMES,
};

fn chat_body(model: &str, extra: &str) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"Say something."}}]{extra}}}"#
    )
}

#[test]
fn openai_python_client_streaming_and_not() -> Result {
    let has_openai = std::process::Command::new(python())
        .args(["-c", "import openai"])
        .status()?;
    if !has_openai.success() {
        return Err(err(
            "the openai package is missing: run OMNI_TEST_DEPS=1 scripts/setup",
        ));
    }
    let server = Server::start("default", &[])?;
    let out = run_python(
        "openai_client.py",
        &[&format!("http://{}/v1", server.addr), "default"],
    )?;
    let r: serde_json::Value = serde_json::from_str(out.trim())?;

    let models = r["models"].as_array().ok_or_else(|| err("no models"))?;
    assert!(models.iter().any(|m| m == "default"), "{r}");

    // One choice per final stage: the answer and its summary.
    let chat = &r["chat"];
    assert_eq!(chat["object"], "chat.completion");
    let choices = chat["choices"]
        .as_array()
        .ok_or_else(|| err("no choices"))?;
    assert_eq!(choices.len(), 2, "{chat}");
    for (i, c) in choices.iter().enumerate() {
        // Each choice says which stage made it (vLLM-Omni), in stage order.
        assert_eq!(c["stage_id"], i, "{c}");
        assert_eq!(c["modality"], "text", "{c}");
        assert_eq!(c["role"], "assistant");
        assert!(c["content"].as_str().is_some_and(|s| !s.is_empty()), "{c}");
        assert!(
            c["finish_reason"] == "stop" || c["finish_reason"] == "length",
            "{c}"
        );
    }
    let usage = &chat["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap_or(0) > 0, "{usage}");
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap_or(0);
    assert!((1..=16).contains(&completion_tokens), "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap_or(0) + completion_tokens)
    );

    // Streaming gives the same greedy texts, chunk by chunk.
    let s = &r["chat_stream"];
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(s["texts"][i.to_string()], c["content"], "choice {i}: {s}");
        assert_eq!(s["roles"][i.to_string()], "assistant");
        assert_eq!(s["finish"][i.to_string()], c["finish_reason"]);
    }
    assert!(s["chunks"].as_u64().unwrap_or(0) > 4, "{s}");
    assert_eq!(
        s["usage"]["completion_tokens"].as_u64(),
        Some(completion_tokens),
        "{s}"
    );
    // The same prompt a second time: its leading blocks come from the
    // answer stage's prefix cache.
    let cached = |u: &serde_json::Value| u["prompt_tokens_details"]["cached_tokens"].as_u64();
    assert_eq!(cached(usage), Some(0), "{usage}");
    assert!(cached(&s["usage"]).unwrap_or(0) >= 16, "{s}");

    let comp = &r["completion"];
    assert_eq!(comp["object"], "text_completion");
    let texts = comp["texts"].as_array().ok_or_else(|| err("no texts"))?;
    assert_eq!(texts.len(), 2, "{comp}");
    assert_eq!(r["completion_stream"]["texts"]["0"], texts[0], "{r}");

    // sampling_params_list: 3 + 2 tokens at most.
    assert!(
        r["extras"]["tokens"][0]
            .as_u64()
            .is_some_and(|n| (1..=5).contains(&n)),
        "{r}"
    );

    assert_eq!(r["unknown_model"]["status"], 404, "{r}");
    assert_eq!(
        r["unknown_model"]["message"], "The model `no-such-model` does not exist.",
        "{r}"
    );
    Ok(())
}

#[test]
fn raw_http_errors_health_and_metrics() -> Result {
    let server = Server::start("default", &[])?;
    let a = server.addr.as_str();

    let h = http(a, "GET", "/health", None)?;
    assert_eq!(h.status, 200);

    let cases: [(&str, &str, &str); 7] = [
        ("/v1/chat/completions", "{not json", "malformed"),
        (
            "/v1/chat/completions",
            &chat_body("default", r#","max_tokens":"ten""#),
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            &chat_body(
                "default",
                r#","tools":[{"type":"function","function":{"name":"f"}}]"#,
            ),
            "tools",
        ),
        (
            "/v1/chat/completions",
            &chat_body("default", r#","max_tokens":100000000"#),
            "100000000",
        ),
        (
            "/v1/chat/completions",
            &chat_body("default", r#","temperature":-1"#),
            "-1",
        ),
        (
            "/v1/chat/completions",
            &chat_body("default", r#","sampling_params_list":[{}]"#),
            "1 entries",
        ),
        (
            "/v1/completions",
            r#"{"model":"default","prompt":""}"#,
            "prompt",
        ),
    ];
    for (path, body, named) in cases {
        let r = http(a, "POST", path, Some(body))?;
        assert_eq!(r.status, 400, "{body} -> {} {}", r.status, r.body);
        let e = r.json()?;
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        assert_eq!(e["error"]["code"], 400);
        let msg = e["error"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains(named),
            "{body}: message {msg:?} does not name {named:?}"
        );
    }
    // An unknown model: vLLM's 404, word for word.
    let r = http(
        a,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body("gpt-4", "")),
    )?;
    assert_eq!(r.status, 404, "{}", r.body);
    let e = r.json()?;
    assert_eq!(e["error"]["type"], "NotFoundError", "{e}");
    assert_eq!(e["error"]["message"], "The model `gpt-4` does not exist.");
    let r = http(a, "GET", "/v1/nope", None)?;
    assert_eq!(r.status, 404);
    assert!(r.json()?["error"]["message"].is_string());
    // Profiling is off without VLLM_TORCH_PROFILER_DIR: a clear refusal.
    let r = http(a, "POST", "/start_profile", None)?;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("VLLM_TORCH_PROFILER_DIR"), "{}", r.body);

    // One good request, then the metrics show it.
    let r = http(
        a,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body("default", r#","max_tokens":3"#)),
    )?;
    assert_eq!(r.status, 200, "{}", r.body);
    let m = http(a, "GET", "/metrics", None)?;
    assert_eq!(m.status, 200);
    for needle in [
        "omni_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 1",
        "omni_requests_total{endpoint=\"/v1/chat/completions\",status=\"400\"}",
        "omni_stage_e2e_latency_seconds_count{stage=\"0\"} 1",
        "omni_stage_e2e_latency_seconds_count{stage=\"1\"} 1",
        "omni_stage_queue_depth{stage=\"1\"} 0",
        "omni_requests_running 0",
    ] {
        assert!(
            m.body.contains(needle),
            "metrics lack {needle}:\n{}",
            m.body
        );
    }
    Ok(())
}

#[test]
fn profile_endpoints_toggle_while_serving() -> Result {
    let dir = tempfile::tempdir()?;
    let server = Server::start("default", &[("VLLM_TORCH_PROFILER_DIR", dir.path())])?;
    let a = server.addr.as_str();

    let r = http(a, "POST", "/start_profile", Some(r#"{"stages":[9]}"#))?;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains('9'));
    let r = http(a, "POST", "/start_profile", Some(r#"{"stages":"all"}"#))?;
    assert_eq!(r.status, 400, "{}", r.body);

    // A streaming request is in flight while profiling starts and stops.
    let mut conn = HttpConn::open(
        a,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body(
            "default",
            r#","max_tokens":200,"ignore_eos":true,"stream":true"#,
        )),
    )?;
    assert_eq!(conn.status, 200);
    let first = conn.next_data()?.ok_or_else(|| err("no first chunk"))?;
    let first: serde_json::Value = serde_json::from_str(&first)?;
    let id = first["id"]
        .as_str()
        .ok_or_else(|| err("chunk without id"))?;
    let start = now_us();
    let r = http(a, "POST", "/start_profile", Some(r#"{"stages":[0]}"#))?;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http(a, "POST", "/start_profile", Some(r#"{"stages":[0]}"#))?;
    assert_eq!(r.status, 400, "a second start: {}", r.body);
    assert!(r.body.contains("already profiling"), "{}", r.body);
    // Stage 0 steps the request under the profiler: its own token count
    // moves on after the window opened.
    let tokens = || {
        http(a, "GET", "/metrics", None)
            .ok()
            .and_then(|m| metric(&m.body, r#"omni_stage_generated_tokens_total{stage="0"}"#))
    };
    let opened = tokens().ok_or_else(|| err("no token count for stage 0"))?;
    assert!(
        wait_until(std::time::Duration::from_secs(60), || tokens()
            .is_some_and(|t| t >= opened + 3.0)),
        "stage 0 generated nothing with the profiler on"
    );
    let r = http(a, "POST", "/stop_profile", None)?;
    assert_eq!(r.status, 200, "{}", r.body);
    let window = (start, now_us());
    let traces = r.json()?;
    let stage0 = traces["traces"]["0"]
        .as_array()
        .ok_or_else(|| err(format!("no stage 0 traces: {traces}")))?;
    assert!(!stage0.is_empty());
    assert!(
        traces["traces"]
            .get("1")
            .is_none_or(|v| v.as_array().is_some_and(Vec::is_empty)),
        "{traces}"
    );
    let paths = |v: &[serde_json::Value]| -> Vec<PathBuf> {
        v.iter()
            .map(|p| PathBuf::from(p.as_str().unwrap_or("")))
            .collect()
    };
    assert_window(0, &paths(stage0), window, DEFAULT_STAGE_NAMES[0], &[id])?;
    // The request in flight finished normally.
    let mut last = String::new();
    while let Some(d) = conn.next_data()? {
        assert!(!d.contains("\"error\""), "{d}");
        last = d;
    }
    assert_eq!(last, "[DONE]");

    // A whole-pipeline window with an empty body.
    let start = now_us();
    assert_eq!(http(a, "POST", "/start_profile", Some(""))?.status, 200);
    let r = http(
        a,
        "POST",
        "/v1/completions",
        Some(r#"{"model":"default","prompt":"Hi","max_tokens":2}"#),
    )?;
    assert_eq!(r.status, 200, "{}", r.body);
    let done = r.json()?;
    let id = done["id"]
        .as_str()
        .ok_or_else(|| err("completion without id"))?;
    let r = http(a, "POST", "/stop_profile", Some("{}"))?;
    assert_eq!(r.status, 200, "{}", r.body);
    let window = (start, now_us());
    let traces = r.json()?;
    for stage in 0..2 {
        let files = traces["traces"][stage.to_string()]
            .as_array()
            .ok_or_else(|| err(format!("no stage {stage} traces: {traces}")))?;
        assert_window(
            stage,
            &paths(files),
            window,
            DEFAULT_STAGE_NAMES[stage],
            &[id],
        )?;
    }
    assert_eq!(trace_files(dir.path()).len(), 3);
    Ok(())
}

#[test]
fn client_disconnect_aborts_and_sigterm_leaves_no_stage_processes() -> Result {
    let mut server = Server::start("default", &[])?;
    let a = server.addr.clone();
    let stages = omni_tests::child_pids(server.pid());
    assert!(
        stages.len() >= 2,
        "expected stage processes under omni serve, found {stages:?}"
    );

    // A client that goes away mid-stream: the request leaves the pipeline.
    // Long enough that, left to run, it would outlast the wait below; the
    // stages' own counters must show the abort and few tokens.
    const LONG: u32 = 4000;
    let mut conn = HttpConn::open(
        &a,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body(
            "default",
            &format!(r#","max_tokens":{LONG},"ignore_eos":true,"stream":true"#),
        )),
    )?;
    conn.next_data()?.ok_or_else(|| err("no first chunk"))?;
    drop(conn);
    let generated = |m: &str, s: usize| {
        metric(
            m,
            &format!(r#"omni_stage_generated_tokens_total{{stage="{s}"}}"#),
        )
    };
    let at_disconnect = generated(&http(&a, "GET", "/metrics", None)?.body, 0).unwrap_or(0.0);
    let settled = |m: &str| {
        let v = |s: &str| metric(m, s);
        v("omni_requests_running") == Some(0.0)
            && v(r#"omni_stage_aborted_requests_total{stage="0"}"#) == Some(1.0)
            && v(r#"omni_stage_aborted_requests_total{stage="1"}"#) == Some(0.0)
            && (0..2).all(|s| {
                v(&format!(r#"omni_stage_engine_requests{{stage="{s}"}}"#)) == Some(0.0)
                    && v(&format!(r#"omni_stage_running_requests{{stage="{s}"}}"#)) == Some(0.0)
            })
    };
    let gone = wait_until(std::time::Duration::from_secs(120), || {
        http(&a, "GET", "/metrics", None).is_ok_and(|m| settled(&m.body))
    });
    let m = http(&a, "GET", "/metrics", None)?.body;
    assert!(gone, "the disconnected request is still running:\n{m}");
    // The server sees the disconnect at its next write: a few tokens later,
    // whatever the machine's speed.
    let after = generated(&m, 0).map(|g| g - at_disconnect);
    assert!(
        after.is_some_and(|g| g < 32.0) && generated(&m, 1) == Some(0.0),
        "tokens generated after the disconnect: stage 0 {after:?}, stage 1 {:?}",
        generated(&m, 1)
    );

    // SIGTERM while a request streams: it completes, then everything exits.
    let mut conn = HttpConn::open(
        &a,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body(
            "default",
            r#","max_tokens":12,"ignore_eos":true,"stream":true"#,
        )),
    )?;
    conn.next_data()?.ok_or_else(|| err("no first chunk"))?;
    let status = std::thread::scope(|s| {
        let reader = s.spawn(move || -> Result<String> {
            let mut last = String::new();
            while let Some(d) = conn.next_data()? {
                last = d;
            }
            Ok(last)
        });
        let status = server.terminate(std::time::Duration::from_secs(120));
        (status, reader.join())
    });
    let (status, last) = status;
    let status = status?;
    assert!(
        status.success(),
        "omni serve exited with {status}; log:\n{}",
        server.log()
    );
    let last = last.map_err(|_| err("reader panicked"))??;
    assert_eq!(last, "[DONE]", "the request in flight did not finish");
    let leftover: Vec<u32> = stages
        .into_iter()
        .filter(|&p| omni_tests::alive(p))
        .collect();
    assert!(
        leftover.is_empty(),
        "stage processes left after SIGTERM: {leftover:?}"
    );
    Ok(())
}
