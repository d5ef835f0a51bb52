//! A backend of your own: implement [`Profiler`], register it under a name,
//! and anything that picks backends by name (a stage config's profiler
//! field, `OMNI_PROFILER_BACKEND`, `backend_by_name`) can use it.
//!
//! This one keeps per-span statistics (count, total and max time by span
//! name) instead of a timeline, and writes them as one JSON file per window,
//! atomically, next to where the built-in backends put their traces. It
//! gets the engine's spans from [`SpanCapture`], the recorder the built-in
//! `chrome` backend uses, so it needs no `tracing` layer of its own.
//!
//! Run: `cargo run -p omni-profiler --example custom_backend` (writes under
//! `$VLLM_TORCH_PROFILER_DIR`, or a temporary directory when unset).
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use omni_profiler::{
    backend_by_name, prepare_trace_dir, profiler_dir_from_env, register_backend, write_trace,
    Error, ProfileOptions, ProfileSession, Profiler, Result, SpanCapture,
};
use serde_json::json;
use tracing_subscriber::prelude::*;

/// Span statistics per window.
#[derive(Default)]
struct SpanStatsProfiler {
    window: Mutex<Option<(SpanCapture, ProfileSession)>>,
}

#[async_trait::async_trait]
impl Profiler for SpanStatsProfiler {
    fn backend(&self) -> &str {
        "spanstats"
    }

    async fn start(&self, session: &ProfileSession) -> Result<()> {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if window.is_some() {
            return Err(Error::AlreadyActive {
                backend: "spanstats".into(),
                reason: "a window is already open".into(),
            });
        }
        // Same contract as the built-ins: fail at start on a bad directory.
        prepare_trace_dir(&session.dir)?;
        *window = Some((SpanCapture::start("spanstats")?, session.clone()));
        Ok(())
    }

    async fn stop(&self) -> Result<Vec<PathBuf>> {
        let taken = self.window.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some((capture, session)) = taken else {
            return Ok(Vec::new()); // stop without start: nothing to write
        };
        let captured = capture.finish(); // recording ends before any await
        let mut stats: BTreeMap<String, (u64, f64, f64)> = BTreeMap::new();
        for span in &captured.spans {
            let Some(dur) = span.dur_us else { continue };
            let name = if span.name.starts_with("ProfilerStep#") {
                "ProfilerStep#*".to_owned()
            } else {
                span.name.clone()
            };
            let entry = stats.entry(name).or_default();
            entry.0 += 1;
            entry.1 += dur;
            entry.2 = entry.2.max(dur);
        }
        let rows: Vec<_> = stats
            .into_iter()
            .map(|(name, (count, total, max))| {
                json!({"name": name, "count": count, "total_us": total, "max_us": max})
            })
            .collect();
        // A JSON object with `traceEvents` (empty here), so the trace tools
        // and viewers still accept the file.
        let doc =
            json!({"traceEvents": [], "process_name": session.process_name, "span_stats": rows});
        let path = write_trace(&session, "spanstats", &doc)?;
        Ok(vec![path])
    }

    fn is_active(&self) -> bool {
        self.window.lock().map(|w| w.is_some()).unwrap_or(false)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    tracing_subscriber::registry()
        .with(omni_profiler::tracing_layer())
        .init();
    register_backend(
        "spanstats",
        Arc::new(|| Arc::new(SpanStatsProfiler::default()) as Arc<dyn Profiler>),
    )?;

    let tmp;
    let root = match profiler_dir_from_env() {
        Ok(root) => root,
        Err(_) => {
            tmp = std::env::temp_dir().join(format!("omni-spanstats-{}", std::process::id()));
            tmp.clone()
        }
    };
    let session =
        ProfileSession::for_stage(&root, 0, "demo", "my-model", ProfileOptions::from_env()?);
    let profiler = backend_by_name("spanstats")?;
    profiler.start(&session).await?;
    for step in 0..3u64 {
        let _step = tracing::info_span!(target: "omni::engine", "step", step).entered();
        let _fwd = tracing::info_span!(target: "omni::engine", "forward", phase = "decode",
                                       batch_size = 1u64, num_tokens = 1u64)
        .entered();
        let x = tch::Tensor::randn([128, 128], (tch::Kind::Float, tch::Device::Cpu));
        let _ = x.matmul(&x);
    }
    for path in profiler.stop().await? {
        println!("{}", path.display());
        println!(
            "{}",
            std::fs::read_to_string(&path).map_err(|e| Error::Io { path, cause: e })?
        );
    }
    Ok(())
}
