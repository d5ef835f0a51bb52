//! What guards `omni serve` in production: `--api-key` on `/v1/*` and the
//! profile endpoints (health and metrics open), and `--max-pending-requests`,
//! past which a request is answered 429 with `Retry-After` instead of
//! queueing without bound (one that could never fit is a 400).
use omni_tests::{http, http_with, HttpConn, Result, Server};

const KEY: &str = "s3cret-key";

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[test]
fn api_key_and_pending_bound() -> Result {
    let server = Server::start_with(
        "smollm2",
        &["--api-key", KEY, "--max-pending-requests", "1"],
        &[],
    )?;
    let a = server.addr.as_str();
    let auth = bearer(KEY);
    let with_key = [("Authorization", auth.as_str())];

    // Open without a key: what a load balancer and a scraper read.
    assert_eq!(http(a, "GET", "/health", None)?.status, 200);
    assert_eq!(http(a, "GET", "/metrics", None)?.status, 200);

    // Guarded: no key, a wrong key, a key of another length.
    let body = r#"{"model":"smollm2","prompt":"The sky is","max_tokens":2}"#;
    for headers in [
        vec![],
        vec![("Authorization", "Bearer s3cret-kex")],
        vec![("Authorization", "Bearer s3cret")],
        vec![("Authorization", KEY)],
    ] {
        let r = http_with(a, "POST", "/v1/completions", Some(body), &headers)?;
        assert_eq!(r.status, 401, "{headers:?}: {}", r.body);
        assert_eq!(r.json()?["error"]["type"], "authentication_error");
    }
    assert_eq!(http(a, "GET", "/v1/models", None)?.status, 401);
    assert_eq!(http(a, "POST", "/start_profile", None)?.status, 401);
    let r = http_with(a, "GET", "/v1/models", None, &with_key)?;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http_with(a, "POST", "/v1/completions", Some(body), &with_key)?;
    assert_eq!(r.status, 200, "{}", r.body);

    // One request in flight holds the only slot: the next is 429.
    let long = r#"{"model":"smollm2","prompt":"Tell a story.","max_tokens":2000,"ignore_eos":true,"stream":true}"#;
    let mut held = HttpConn::open_with(a, "POST", "/v1/completions", Some(long), &with_key)?;
    assert_eq!(held.status, 200);
    let first = held.next_line()?.unwrap_or_default();
    assert!(first.starts_with("data:"), "{first}");
    let r = http_with(a, "POST", "/v1/completions", Some(body), &with_key)?;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()?["error"]["type"], "rate_limit_error");
    assert!(r.body.contains("max_pending_requests"), "{}", r.body);
    // A request of n = 2 could never run with one slot: a 400, not a 429
    // to retry forever.
    drop(held);
    let mut freed = false;
    for _ in 0..100 {
        let r = http_with(a, "POST", "/v1/completions", Some(body), &with_key)?;
        if r.status == 200 {
            freed = true;
            break;
        }
        assert_eq!(r.status, 429, "{}", r.body);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(freed, "the slot was not freed after the client went away");
    let two = r#"{"model":"smollm2","prompt":"The sky is","max_tokens":2,"n":2}"#;
    let r = http_with(a, "POST", "/v1/completions", Some(two), &with_key)?;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("--max-pending-requests 1"), "{}", r.body);
    // The scheme's case does not matter.
    let lower = format!("bearer {KEY}");
    let r = http_with(a, "GET", "/v1/models", None, &[("Authorization", &lower)])?;
    assert_eq!(r.status, 200, "{}", r.body);
    Ok(())
}
