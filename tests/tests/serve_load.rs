//! A bounded load test: 32 concurrent streaming clients on loopback, small
//! `max_tokens`; every request completes without an error.
use omni_tests::{err, http, HttpConn, Result, Server};

#[test]
fn thirty_two_concurrent_streaming_clients_all_complete() -> Result {
    let server = Server::start("default", &[])?;
    let addr = server.addr.clone();
    let results: Vec<Result<(String, usize)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let addr = addr.clone();
                s.spawn(move || -> Result<(String, usize)> {
                    let body = format!(
                        r#"{{"model":"default","messages":[{{"role":"user","content":"Give me a word about {i}."}}],"max_tokens":4,"stream":true}}"#
                    );
                    let mut conn = HttpConn::open(&addr, "POST", "/v1/chat/completions", Some(&body))?;
                    if conn.status != 200 {
                        return Err(err(format!("client {i}: status {}", conn.status)));
                    }
                    let mut last = String::new();
                    let mut finishes = 0;
                    while let Some(d) = conn.next_data()? {
                        if d != "[DONE]" {
                            let v: serde_json::Value = serde_json::from_str(&d)?;
                            if v.get("error").is_some() {
                                return Err(err(format!("client {i}: {d}")));
                            }
                            finishes += v["choices"]
                                .as_array()
                                .map_or(0, |cs| cs.iter().filter(|c| !c["finish_reason"].is_null()).count());
                        }
                        last = d;
                    }
                    Ok((last, finishes))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(err("client thread panicked")))
            })
            .collect()
    });
    for (i, r) in results.into_iter().enumerate() {
        let (last, finishes) =
            r.map_err(|e| err(format!("client {i}: {e}; server log:\n{}", server.log())))?;
        assert_eq!(last, "[DONE]", "client {i}");
        assert_eq!(finishes, 2, "client {i}: both final stages must finish");
    }
    let m = http(&addr, "GET", "/metrics", None)?;
    assert!(
        m.body
            .contains("omni_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 32"),
        "{}",
        m.body
    );
    assert!(m.body.contains("omni_requests_running 0"), "{}", m.body);
    Ok(())
}
