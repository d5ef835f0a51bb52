//! `omni bench load`: the server under floods of concurrent clients and a
//! steady soak. Every request must end as the server promises (answered,
//! or refused with 429 + `Retry-After` past `--max-pending-requests`); a
//! client that hangs up mid-stream must leave no request behind in any
//! stage; and in the soak every process's resident memory must stay within
//! a stated margin of what it held after warm-up. Any other outcome makes
//! the command fail, so a script can run it as a check.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use omni_core::{AsyncOmni, OmniEngineArgs};

use super::{bench_prompt, LocalServer};
use crate::http_client::{self, ClientKind, Outcome};
use crate::{progress, serve};

/// Flags of `omni bench load`.
#[derive(Args, Debug)]
pub struct LoadBench {
    /// A built-in pipeline or a pipeline file.
    #[arg(long, default_value = omni_core::DEFAULT_PIPELINE)]
    pub pipeline: String,
    /// Concurrent clients per flood, e.g. 64,256,1024; each sends one
    /// request, all at once. Clients cycle through streaming, whole
    /// (non-streaming), streaming again, and streaming that hangs up after
    /// the first event.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    pub clients: Vec<usize>,
    /// max_tokens of every request (all stages).
    #[arg(long, default_value_t = 8)]
    pub max_tokens: usize,
    /// The server's bound on requests in flight (as `omni serve
    /// --max-pending-requests`); past it clients get 429.
    #[arg(long, default_value_t = 256)]
    pub max_pending_requests: usize,
    /// Length of the steady soak after the floods, in seconds (0: none).
    #[arg(long, default_value_t = 0)]
    pub soak_seconds: u64,
    /// Clients of the soak, each sending requests back to back.
    #[arg(long, default_value_t = 16)]
    pub soak_clients: usize,
    /// The start of the soak not held to the memory margin (allocators
    /// and caches settle), in seconds.
    #[arg(long, default_value_t = 60)]
    pub warmup_seconds: u64,
    /// How far above its size at the end of warm-up a process's resident
    /// memory may go during the soak, in percent.
    #[arg(long, default_value_t = 10.0)]
    pub rss_margin_pct: f64,
    /// How long after a flood every stage must hold no request, in seconds.
    #[arg(long, default_value_t = 60)]
    pub settle_seconds: u64,
}

/// What a run of clients came to.
#[derive(Debug, Default)]
struct Tally {
    answered: usize,
    overloaded: usize,
    left: usize,
    /// Unexpected outcomes, with the client that saw them.
    errors: Vec<String>,
    /// Wall time of each answered request.
    latencies: Vec<Duration>,
}

impl Tally {
    fn add(&mut self, client: usize, r: anyhow::Result<(Outcome, Duration)>) {
        match r {
            Ok((Outcome::Answered, t)) => {
                self.answered += 1;
                self.latencies.push(t);
            }
            Ok((Outcome::Overloaded, _)) => self.overloaded += 1,
            Ok((Outcome::LeftMidStream, _)) => self.left += 1,
            Err(e) => self.errors.push(format!("client {client}: {e:#}")),
        }
    }

    fn requests(&self) -> usize {
        self.answered + self.overloaded + self.left + self.errors.len()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let Some(last) = sorted.len().checked_sub(1) else {
            return 0.0;
        };
        let i = ((last as f64) * p).round() as usize;
        sorted[i.min(last)].as_secs_f64() * 1000.0
    }
}

/// The kind of client number `i`: two of four stream to the end, one
/// takes a whole answer, one hangs up mid-stream.
fn kind_of(i: usize) -> ClientKind {
    match i % 4 {
        1 => ClientKind::Whole,
        3 => ClientKind::Leave,
        _ => ClientKind::Stream,
    }
}

/// Resident set size of `pid` in bytes (`VmRSS`), None once it is gone.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The processes whose memory is watched: this one (the server, with the
/// load's own clients, which hold little) and each stage, by name.
fn watched(omni: &AsyncOmni) -> Vec<(String, u32)> {
    let mut out = vec![("server".to_owned(), std::process::id())];
    out.extend(
        omni.stages()
            .iter()
            .map(|s| (format!("stage {}", s.stage_id), s.pid)),
    );
    out
}

/// Samples every watched process's RSS every `every` until `stop` fires;
/// returns the samples per process, in order, with their time.
fn sample_rss(
    procs: Vec<(String, u32)>,
    every: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<BTreeMap<String, Vec<(Duration, u64)>>> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut samples: BTreeMap<String, Vec<(Duration, u64)>> = BTreeMap::new();
        loop {
            for (name, pid) in &procs {
                if let Some(b) = rss_bytes(*pid) {
                    samples
                        .entry(name.clone())
                        .or_default()
                        .push((start.elapsed(), b));
                }
            }
            tokio::select! {
                _ = &mut stop => return samples,
                () = tokio::time::sleep(every) => {}
            }
        }
    })
}

/// Waits until every stage holds no request and the server has no request
/// running; the error says who still holds some.
async fn settled(state: &serve::AppState, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let mut held = Vec::new();
        for s in state.omni.stages() {
            held.push(state.omni.stage_health(s.stage_id).await?.running_requests);
        }
        let running = state.omni.num_running();
        if running == 0 && held.iter().all(|&n| n == 0) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{within:?} after the clients finished, the server still runs {running} requests and the stages hold {held:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

pub(super) async fn run(b: LoadBench) -> anyhow::Result<()> {
    if b.max_pending_requests == 0 {
        return Err(crate::BadInput("--max-pending-requests must be at least 1".into()).into());
    }
    if b.clients.contains(&0) || (b.soak_seconds > 0 && b.soak_clients == 0) {
        return Err(crate::BadInput("client counts must be at least 1".into()).into());
    }
    raise_open_file_limit();
    let server = LocalServer::start(OmniEngineArgs {
        max_pending_requests: Some(b.max_pending_requests),
        ..OmniEngineArgs::new(&b.pipeline)
    })
    .await?;
    let procs = watched(&server.state.omni);
    let result = drive(&b, &server.addr, &server.state, procs).await;
    result.and(server.stop().await)
}

/// The request body of client `i`.
fn body(b: &LoadBench, i: usize) -> serde_json::Value {
    serde_json::json!({
        "model": b.pipeline,
        "messages": [{"role": "user", "content": bench_prompt(i)}],
        "max_tokens": b.max_tokens,
        "ignore_eos": true,
    })
}

/// The longest a request may take before it counts as an error: a wedged
/// server must end the run, not hang it.
const REQUEST_DEADLINE: Duration = Duration::from_secs(300);

async fn one_request(
    addr: String,
    body: serde_json::Value,
    kind: ClientKind,
) -> anyhow::Result<(Outcome, Duration)> {
    let start = Instant::now();
    let request = http_client::post_as(&addr, "/v1/chat/completions", &body, kind);
    let outcome = tokio::time::timeout(REQUEST_DEADLINE, request)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {REQUEST_DEADLINE:?}"))??;
    Ok((outcome, start.elapsed()))
}

async fn drive(
    b: &LoadBench,
    addr: &str,
    state: &serve::AppState,
    procs: Vec<(String, u32)>,
) -> anyhow::Result<()> {
    // Warm-up: one request of each kind.
    for i in 0..4 {
        one_request(addr.to_owned(), body(b, i), kind_of(i))
            .await
            .with_context(|| format!("warm-up request {i}"))?;
    }
    settled(state, Duration::from_secs(b.settle_seconds)).await?;
    println!("| clients | requests | answered | 429 | left mid-stream | errors | wall s | p50 ms | p99 ms | peak RSS MiB (server, stages) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut failures = Vec::new();
    for &c in &b.clients {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let sampler = sample_rss(procs.clone(), Duration::from_millis(250), stopped);
        let bar = progress::spinner(format!("{c} concurrent clients"));
        let start = Instant::now();
        let tasks: Vec<_> = (0..c)
            .map(|i| tokio::spawn(one_request(addr.to_owned(), body(b, i), kind_of(i))))
            .collect();
        let mut tally = Tally::default();
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("client task: {e}")));
            tally.add(i, r);
        }
        let wall = start.elapsed().as_secs_f64();
        let settle = settled(state, Duration::from_secs(b.settle_seconds)).await;
        let _ = stop.send(());
        let samples = sampler.await.context("memory sampler")?;
        bar.finish_and_clear();
        let peaks: Vec<String> = samples
            .values()
            .map(|s| format!("{:.0}", mib(s.iter().map(|(_, b)| *b).max().unwrap_or(0))))
            .collect();
        println!(
            "| {c} | {} | {} | {} | {} | {} | {wall:.1} | {:.0} | {:.0} | {} |",
            tally.requests(),
            tally.answered,
            tally.overloaded,
            tally.left,
            tally.errors.len(),
            tally.percentile_ms(0.5),
            tally.percentile_ms(0.99),
            peaks.join(", ")
        );
        failures.extend(
            tally
                .errors
                .iter()
                .take(5)
                .map(|e| format!("{c} clients: {e}")),
        );
        if let Err(e) = settle {
            failures.push(format!("{c} clients: {e:#}"));
        }
    }
    if b.soak_seconds > 0 {
        failures.extend(soak(b, addr, state, procs).await?);
    }
    if failures.is_empty() {
        Ok(())
    } else {
        bail!(
            "the server broke its promises:\n  {}",
            failures.join("\n  ")
        )
    }
}

/// The steady soak; returns what failed.
async fn soak(
    b: &LoadBench,
    addr: &str,
    state: &serve::AppState,
    procs: Vec<(String, u32)>,
) -> anyhow::Result<Vec<String>> {
    let length = Duration::from_secs(b.soak_seconds);
    let warmup = Duration::from_secs(b.warmup_seconds.min(b.soak_seconds));
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let sampler = sample_rss(procs, Duration::from_secs(1), stopped);
    let bar = progress::bar(b.soak_seconds, format!("soak: {} clients", b.soak_clients));
    let start = Instant::now();
    let clients: Vec<_> = (0..b.soak_clients)
        .map(|client| {
            let addr = addr.to_owned();
            let bodies: Vec<_> = (0..64).map(|i| body(b, i)).collect();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut n = 0usize;
                while start.elapsed() < length {
                    let i = client + n * 7;
                    let r = one_request(addr.clone(), bodies[i % bodies.len()].clone(), kind_of(i))
                        .await;
                    tally.add(client, r);
                    n += 1;
                }
                tally
            })
        })
        .collect();
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                bar.set_position(start.elapsed().as_secs().min(length.as_secs()));
            }
        })
    };
    let mut total = Tally::default();
    for c in clients {
        let t = c.await.context("soak client")?;
        total.answered += t.answered;
        total.overloaded += t.overloaded;
        total.left += t.left;
        total.errors.extend(t.errors);
        total.latencies.extend(t.latencies);
    }
    ticker.abort();
    bar.finish_and_clear();
    let wall = start.elapsed();
    let settle = settled(state, Duration::from_secs(b.settle_seconds)).await;
    let _ = stop.send(());
    let samples = sampler.await.context("memory sampler")?;
    let mut failures: Vec<String> = total
        .errors
        .iter()
        .take(5)
        .map(|e| format!("soak: {e}"))
        .collect();
    if let Err(e) = settle {
        failures.push(format!("soak: {e:#}"));
    }
    println!();
    println!(
        "soak: {} clients for {:.0} s: {} requests, {} answered, {} 429, {} left mid-stream, {} errors; p50 {:.0} ms, p99 {:.0} ms",
        b.soak_clients,
        wall.as_secs_f64(),
        total.requests(),
        total.answered,
        total.overloaded,
        total.left,
        total.errors.len(),
        total.percentile_ms(0.5),
        total.percentile_ms(0.99),
    );
    println!();
    println!(
        "| process | RSS MiB after warm-up | max after | last | growth % (margin {:.0}%) |",
        b.rss_margin_pct
    );
    println!("|---|---:|---:|---:|---:|");
    for (name, s) in &samples {
        let Some(&(_, base)) = s.iter().find(|(t, _)| *t >= warmup) else {
            failures.push(format!("soak: no memory sample of {name} after warm-up"));
            continue;
        };
        let after: Vec<u64> = s
            .iter()
            .filter(|(t, _)| *t >= warmup)
            .map(|(_, b)| *b)
            .collect();
        let max = after.iter().copied().max().unwrap_or(base);
        let last = after.last().copied().unwrap_or(base);
        let growth = (max as f64 / base.max(1) as f64 - 1.0) * 100.0;
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {growth:.1} |",
            mib(base),
            mib(max),
            mib(last)
        );
        if growth > b.rss_margin_pct {
            failures.push(format!(
                "soak: {name} grew {growth:.1}% after warm-up ({:.0} -> {:.0} MiB), past the {:.0}% margin",
                mib(base),
                mib(max),
                b.rss_margin_pct
            ));
        }
    }
    if total.answered == 0 {
        failures.push("soak: no request was answered".into());
    }
    Ok(failures)
}

/// A flood of 1024 clients in this process holds two descriptors per
/// request (client and server ends); the usual soft limit of 1024 would
/// refuse connections. Raise it to the hard limit.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(
                    "cannot raise the open-file limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}
