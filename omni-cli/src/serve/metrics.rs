//! `GET /metrics`: Prometheus text exposition of what the server did.
//!
//! Counters of requests (by endpoint and status) and tokens, per-stage
//! latency histograms (queue, compute, end to end up to that stage's final
//! output), time to first token, and queue depth: requests accepted and not
//! yet finished, overall and per final stage. Hand-written: a handful of
//! series do not justify a metrics framework.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency buckets.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is `+Inf`.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += s;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()];
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct State {
    /// `(endpoint, status)` → count.
    requests: BTreeMap<(String, u16), u64>,
    prompt_tokens: u64,
    generation_tokens: u64,
    running: i64,
    /// Final stage → requests accepted that the stage has not finished.
    stage_pending: BTreeMap<usize, i64>,
    stage_queue: BTreeMap<usize, Histogram>,
    stage_compute: BTreeMap<usize, Histogram>,
    stage_e2e: BTreeMap<usize, Histogram>,
    ttft: Histogram,
    e2e: Histogram,
}

/// The server's metrics. Cheap to update from handlers: one short lock, never
/// held across an `.await`.
#[derive(Debug, Default)]
pub struct Metrics {
    state: Mutex<State>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // Metrics stay usable after a panic elsewhere: counts may be off by
        // one, which is better than failing every request.
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }

    /// A request answered on `endpoint` with `status`.
    pub fn request_done(&self, endpoint: &str, status: u16) {
        self.with(|s| {
            *s.requests
                .entry((endpoint.to_string(), status))
                .or_default() += 1
        });
    }

    /// A request entered the pipeline; `final_stages` will report on it.
    pub fn request_started(&self, final_stages: &[usize]) {
        self.with(|s| {
            s.running += 1;
            for &st in final_stages {
                *s.stage_pending.entry(st).or_default() += 1;
            }
        });
    }

    /// A request left the pipeline (finished, failed or aborted);
    /// `unfinished` lists the final stages that never finished it.
    pub fn request_ended(&self, unfinished: &[usize], e2e: Option<Duration>) {
        self.with(|s| {
            s.running -= 1;
            for &st in unfinished {
                *s.stage_pending.entry(st).or_default() -= 1;
            }
            if let Some(d) = e2e {
                s.e2e.observe(d);
            }
        });
    }

    /// The first token of a request reached the server.
    pub fn first_token(&self, ttft: Duration) {
        self.with(|s| s.ttft.observe(ttft));
    }

    /// A final stage finished a request.
    pub fn stage_finished(
        &self,
        stage_id: usize,
        queue: Duration,
        compute: Duration,
        e2e: Duration,
        prompt_tokens: usize,
        generated_tokens: usize,
    ) {
        self.with(|s| {
            *s.stage_pending.entry(stage_id).or_default() -= 1;
            s.stage_queue.entry(stage_id).or_default().observe(queue);
            s.stage_compute
                .entry(stage_id)
                .or_default()
                .observe(compute);
            s.stage_e2e.entry(stage_id).or_default().observe(e2e);
            s.prompt_tokens += prompt_tokens as u64;
            s.generation_tokens += generated_tokens as u64;
        });
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let s = self.with(|s| {
            // Render from a copy so the lock is held only for the clone.
            State {
                requests: s.requests.clone(),
                prompt_tokens: s.prompt_tokens,
                generation_tokens: s.generation_tokens,
                running: s.running,
                stage_pending: s.stage_pending.clone(),
                stage_queue: s.stage_queue.clone(),
                stage_compute: s.stage_compute.clone(),
                stage_e2e: s.stage_e2e.clone(),
                ttft: s.ttft.clone(),
                e2e: s.e2e.clone(),
            }
        });
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP omni_requests_total HTTP requests answered, by endpoint and status."
        );
        let _ = writeln!(out, "# TYPE omni_requests_total counter");
        for ((endpoint, status), n) in &s.requests {
            let _ = writeln!(
                out,
                "omni_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP omni_prompt_tokens_total Prompt tokens read by final stages."
        );
        let _ = writeln!(out, "# TYPE omni_prompt_tokens_total counter");
        let _ = writeln!(out, "omni_prompt_tokens_total {}", s.prompt_tokens);
        let _ = writeln!(
            out,
            "# HELP omni_generation_tokens_total Tokens generated by final stages."
        );
        let _ = writeln!(out, "# TYPE omni_generation_tokens_total counter");
        let _ = writeln!(out, "omni_generation_tokens_total {}", s.generation_tokens);
        let _ = writeln!(
            out,
            "# HELP omni_requests_running Requests in the pipeline now."
        );
        let _ = writeln!(out, "# TYPE omni_requests_running gauge");
        let _ = writeln!(out, "omni_requests_running {}", s.running);
        let _ = writeln!(
            out,
            "# HELP omni_stage_queue_depth Requests accepted that a final stage has not finished."
        );
        let _ = writeln!(out, "# TYPE omni_stage_queue_depth gauge");
        for (st, n) in &s.stage_pending {
            let _ = writeln!(out, "omni_stage_queue_depth{{stage=\"{st}\"}} {n}");
        }
        let hists = [
            (
                "omni_stage_queue_time_seconds",
                "Time a request waited in a stage's queue.",
                &s.stage_queue,
            ),
            (
                "omni_stage_compute_time_seconds",
                "Time a stage computed on a request.",
                &s.stage_compute,
            ),
            (
                "omni_stage_e2e_latency_seconds",
                "From arrival to a final stage's last output.",
                &s.stage_e2e,
            ),
        ];
        for (name, help, per_stage) in hists {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} histogram");
            for (st, h) in per_stage {
                h.render(&mut out, name, &format!("stage=\"{st}\""));
            }
        }
        let _ = writeln!(
            out,
            "# HELP omni_time_to_first_token_seconds From arrival to the first streamed token."
        );
        let _ = writeln!(out, "# TYPE omni_time_to_first_token_seconds histogram");
        s.ttft
            .render(&mut out, "omni_time_to_first_token_seconds", "");
        let _ = writeln!(
            out,
            "# HELP omni_e2e_request_latency_seconds From arrival to the end of a request."
        );
        let _ = writeln!(out, "# TYPE omni_e2e_request_latency_seconds histogram");
        s.e2e
            .render(&mut out, "omni_e2e_request_latency_seconds", "");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request_started(&[0, 1]);
        m.stage_finished(
            0,
            Duration::from_millis(2),
            Duration::from_millis(300),
            Duration::from_millis(310),
            5,
            7,
        );
        m.request_done("/v1/completions", 200);
        let text = m.render();
        assert!(
            text.contains("omni_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1"),
            "{text}"
        );
        assert!(text.contains("omni_generation_tokens_total 7"), "{text}");
        assert!(
            text.contains("omni_stage_queue_depth{stage=\"0\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("omni_stage_queue_depth{stage=\"1\"} 1"),
            "{text}"
        );
        assert!(text.contains("omni_requests_running 1"), "{text}");
        // 0.3 s falls in the 0.5 bucket: cumulative counts from there on.
        assert!(
            text.contains("omni_stage_compute_time_seconds_bucket{stage=\"0\",le=\"0.25\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("omni_stage_compute_time_seconds_bucket{stage=\"0\",le=\"0.5\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("omni_stage_compute_time_seconds_bucket{stage=\"0\",le=\"+Inf\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("omni_stage_compute_time_seconds_count{stage=\"0\"} 1"),
            "{text}"
        );
    }
}
