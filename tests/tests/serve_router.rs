//! The HTTP handlers through axum's `Router` without a socket
//! (`tower::ServiceExt::oneshot`), against a real `AsyncOmni` on the default
//! pipeline.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::http::{Request, StatusCode};
use omni_cli::serve::{router, AppState, GenerationConfig};
use omni_core::{AsyncOmni, OmniEngineArgs};
use omni_tests::{ensure_binaries, err, Result};
use tower::ServiceExt;

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: &str,
) -> Result<(StatusCode, String)> {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))?;
    let resp = app.clone().oneshot(req).await?;
    let status = resp.status();
    let bytes = to_bytes(resp.into_body(), 16 << 20).await?;
    Ok((status, String::from_utf8(bytes.to_vec())?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_serves_models_chat_streaming_and_errors() -> Result {
    ensure_binaries()?;
    let omni = AsyncOmni::from_engine_args(OmniEngineArgs::new("default")).await?;
    let state = Arc::new(AppState::new(omni, "default", GenerationConfig::Pipeline));
    let app = router(Arc::clone(&state));

    let (status, body) = call(&app, "GET", "/v1/models", "").await?;
    assert_eq!(status, StatusCode::OK);
    let models: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(models["data"][0]["id"], "default", "{models}");

    let chat = r#"{"model":"default","messages":[{"role":"user","content":"Hi!"}],"max_tokens":3}"#;
    let (status, body) = call(&app, "POST", "/v1/chat/completions", chat).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(2), "{v}");
    assert!(
        v["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| (1..=6).contains(&n)),
        "{v}"
    );

    let stream = r#"{"model":"default","messages":[{"role":"user","content":"Hi!"}],"max_tokens":3,"stream":true}"#;
    let (status, body) = call(&app, "POST", "/v1/chat/completions", stream).await?;
    assert_eq!(status, StatusCode::OK);
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let mut text = [String::new(), String::new()];
    for d in &data[..data.len() - 1] {
        let c: serde_json::Value = serde_json::from_str(d)?;
        assert_eq!(c["object"], "chat.completion.chunk");
        for choice in c["choices"].as_array().ok_or_else(|| err("no choices"))? {
            let i = choice["index"].as_u64().unwrap_or(9) as usize;
            if let Some(s) = choice["delta"]["content"].as_str() {
                text[i].push_str(s);
            }
        }
    }
    // Greedy: the streamed texts equal the non-streamed ones.
    assert_eq!(
        text[0],
        v["choices"][0]["message"]["content"].as_str().unwrap_or("")
    );
    assert_eq!(
        text[1],
        v["choices"][1]["message"]["content"].as_str().unwrap_or("")
    );

    let (status, body) = call(
        &app,
        "POST",
        "/v1/completions",
        r#"{"model":"default","prompt":"#,
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let e: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(e["error"]["type"], "invalid_request_error");

    let (status, body) = call(&app, "GET", "/health", "").await?;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Once shutdown begins: not healthy, and no new work.
    state.draining.store(true, Ordering::SeqCst);
    let (status, body) = call(&app, "GET", "/health", "").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (status, body) = call(&app, "POST", "/v1/chat/completions", chat).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(e["error"]["type"], "server_error", "{e}");
    Ok(())
}

/// A stage that dies while a request runs: that request is answered 503
/// (the pipeline can no longer serve; README, "Errors"), naming the stage
/// and the signal, and so are the next one and `/health`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_dying_mid_request_is_503_naming_the_stage() -> Result {
    ensure_binaries()?;
    let omni = AsyncOmni::from_engine_args(OmniEngineArgs::new("default")).await?;
    let victim = omni.stage_health(1).await?.pid;
    let state = Arc::new(AppState::new(omni, "default", GenerationConfig::Pipeline));
    let app = router(Arc::clone(&state));
    let long = r#"{"model":"default","messages":[{"role":"user","content":"Tell a long story."}],"max_tokens":4000,"ignore_eos":true}"#;
    let request = {
        let app = app.clone();
        tokio::spawn(async move { call(&app, "POST", "/v1/chat/completions", long).await })
    };
    // In stage 0's engine, by the stage's own count.
    let mut running = false;
    for _ in 0..600 {
        if state.omni.stage_health(0).await?.engine_requests == 1 {
            running = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(running, "the request never reached stage 0");
    // SAFETY: plain kill(2) of a stage process this test started.
    assert_eq!(
        unsafe { libc::kill(victim as libc::pid_t, libc::SIGKILL) },
        0
    );
    let (status, body) =
        tokio::time::timeout(std::time::Duration::from_secs(60), request).await???;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body.contains("stage 1") && body.contains("SIGKILL"),
        "{body}"
    );
    let chat = r#"{"model":"default","messages":[{"role":"user","content":"Hi!"}],"max_tokens":3}"#;
    let (status, body) = call(&app, "POST", "/v1/chat/completions", chat).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("stage 1"), "{body}");
    // Not healthy any more: a load balancer must stop sending requests.
    let (status, body) = call(&app, "GET", "/health", "").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body.contains("stage 1") && body.contains("SIGKILL"),
        "{body}"
    );
    Ok(())
}
