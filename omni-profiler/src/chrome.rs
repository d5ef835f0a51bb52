//! The `chrome` backend: the `tracing` spans of a window, written by the
//! [`tracing-chrome`](https://crates.io/crates/tracing-chrome) layer as the
//! Chrome trace Perfetto and chrome://tracing open.
//!
//! Switched on and off inside a running process. [`crate::tracing_layer`]
//! carries a [`ChromeSlot`], an empty place for a `tracing-chrome` layer:
//! `start` builds a fresh `ChromeLayer` writing to a hidden file in the
//! stage's trace directory and puts it in the slot; `stop` takes it out,
//! lets its writer thread finish the file, and turns that file into the
//! window's trace ([`finalize_chrome`]). Between windows the slot costs one
//! atomic load per span callback.
//!
//! `tracing-chrome` 0.7.2 is vendored with a patch (`vendor/tracing-chrome`,
//! see its `OMNI-PATCH.md`): upstream caches the layer's channel sender and
//! thread index per thread, so with a second layer every thread but the one
//! that built it kept sending into the first layer's closed channel and its
//! spans were lost; it also counted time from the layer's creation, which
//! would not line up with the other stages' traces.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use serde_json::{json, Value};
use tracing::field::{Field, Visit};
use tracing::span;
use tracing::{Event, Subscriber};
use tracing_chrome::{ChromeLayer, ChromeLayerBuilder, EventOrSpan, FlushGuard, TimeBase};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::blocking::run_blocking;
use crate::clock::now_us;
use crate::recorder::{CaptureMode, SpanCapture};
use crate::trace_file::{omni_info, prepare_trace_dir, set_window, tmp_path, write_trace};
use crate::{Error, ProfileSession, Profiler, Result};

/// Longest name an event (an instant) gets from its message.
const MAX_EVENT_NAME: usize = 160;

/// What the profiler needs of the installed slot, without knowing the
/// subscriber type the slot was built for.
trait ChromeControl: Send + Sync {
    /// Builds a `tracing-chrome` layer writing to `file` and starts feeding
    /// it every span; the guard finishes the file when dropped.
    fn open(&self, file: std::fs::File) -> FlushGuard;
    /// Stops feeding the layer and drops it.
    fn close(&self);
}

/// The slot of the process's subscriber (the last one installed).
static SLOT: OnceLock<Mutex<Option<Arc<dyn ChromeControl>>>> = OnceLock::new();

fn installed_slot() -> Option<Arc<dyn ChromeControl>> {
    SLOT.get()?
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// The place in [`crate::tracing_layer`] where the `chrome` backend puts a
/// `tracing-chrome` layer while a window is open.
pub(crate) struct ChromeSlot<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    inner: Arc<SlotInner<S>>,
}

struct SlotInner<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    active: AtomicBool,
    layer: RwLock<Option<ChromeLayer<S>>>,
}

impl<S> ChromeSlot<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    pub(crate) fn new() -> Self {
        ChromeSlot {
            inner: Arc::new(SlotInner {
                active: AtomicBool::new(false),
                layer: RwLock::new(None),
            }),
        }
    }

    /// Runs `f` with the open window's layer, if any.
    #[inline]
    fn with_layer(&self, f: impl FnOnce(&ChromeLayer<S>)) {
        if !self.inner.active.load(Ordering::Acquire) {
            return;
        }
        let layer = self.inner.layer.read().unwrap_or_else(|e| e.into_inner());
        if let Some(layer) = layer.as_ref() {
            f(layer);
        }
    }
}

/// The engine's step number, kept on a `step` span so that `tracing-chrome`
/// names it `ProfilerStep#<n>`, as `torch.profiler` names steps.
struct StepNumber(u64);

struct StepVisitor(Option<u64>);

impl Visit for StepVisitor {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "step" {
            self.0 = Some(value);
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "step" {
            self.0 = u64::try_from(value).ok();
        }
    }
    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

/// An event's `message` field, which names its instant in the trace.
struct MessageVisitor(Option<String>);

impl Visit for MessageVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = Some(value.chars().take(MAX_EVENT_NAME).collect());
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}").chars().take(MAX_EVENT_NAME).collect());
        }
    }
}

fn trace_name<S>(item: &EventOrSpan<'_, '_, S>) -> String
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    match item {
        EventOrSpan::Span(span) => match span.extensions().get::<StepNumber>() {
            Some(StepNumber(n)) => format!("ProfilerStep#{n}"),
            None => span.metadata().name().to_owned(),
        },
        EventOrSpan::Event(event) => {
            let mut message = MessageVisitor(None);
            event.record(&mut message);
            message
                .0
                .unwrap_or_else(|| event.metadata().name().to_owned())
        }
    }
}

impl<S> ChromeControl for SlotInner<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync + 'static,
{
    fn open(&self, file: std::fs::File) -> FlushGuard {
        let (layer, guard) = ChromeLayerBuilder::<S>::new()
            .writer(std::io::BufWriter::new(file))
            .include_args(true)
            .include_locations(false)
            .time_base(TimeBase::UnixEpoch)
            .name_fn(Box::new(trace_name::<S>))
            .build();
        *self.layer.write().unwrap_or_else(|e| e.into_inner()) = Some(layer);
        self.active.store(true, Ordering::Release);
        guard
    }

    fn close(&self) {
        self.active.store(false, Ordering::Release);
        // Under the write lock: no callback is inside the layer when it drops.
        self.layer.write().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl<S> Layer<S> for ChromeSlot<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync + 'static,
{
    fn on_layer(&mut self, _subscriber: &mut S) {
        let control: Arc<dyn ChromeControl> = self.inner.clone();
        *SLOT
            .get_or_init(|| Mutex::new(None))
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(control);
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.with_layer(|layer| {
            if attrs.metadata().name() == "step" {
                let mut step = StepVisitor(None);
                attrs.record(&mut step);
                if let (Some(n), Some(span)) = (step.0, ctx.span(id)) {
                    span.extensions_mut().insert(StepNumber(n));
                }
            }
            layer.on_new_span(attrs, id, ctx)
        });
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        self.with_layer(|layer| layer.on_record(id, values, ctx));
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.with_layer(|layer| layer.on_enter(id, ctx));
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.with_layer(|layer| layer.on_exit(id, ctx));
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        self.with_layer(|layer| layer.on_event(event, ctx));
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.with_layer(|layer| layer.on_close(id, ctx));
    }
}

struct Window {
    /// Holds the process's one recording slot (see the recorder).
    claim: SpanCapture,
    session: ProfileSession,
    /// The file `tracing-chrome` writes, hidden in the trace directory.
    raw: PathBuf,
    guard: FlushGuard,
    started_us: f64,
}

/// The `chrome` backend. Needs [`crate::tracing_layer`] in the process's
/// subscriber (start fails with [`Error::LayerNotInstalled`] otherwise).
#[derive(Default)]
pub struct ChromeProfiler {
    window: Mutex<Option<Window>>,
}

impl std::fmt::Debug for ChromeProfiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChromeProfiler")
            .field("active", &self.is_active())
            .finish()
    }
}

impl ChromeProfiler {
    /// A new, inactive profiler.
    pub fn new() -> Self {
        ChromeProfiler::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Window>> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl Profiler for ChromeProfiler {
    fn backend(&self) -> &str {
        "chrome"
    }

    async fn start(&self, session: &ProfileSession) -> Result<()> {
        let mut window = self.lock();
        if window.is_some() {
            return Err(Error::AlreadyActive {
                backend: "chrome".to_owned(),
                reason: "a window is already open".to_owned(),
            });
        }
        let Some(slot) = installed_slot() else {
            return Err(Error::LayerNotInstalled);
        };
        prepare_trace_dir(&session.dir)?;
        let claim = SpanCapture::start_inner("chrome", CaptureMode::ClaimOnly)?;
        let raw = tmp_path(&session.dir, "chrome");
        let file = std::fs::File::create(&raw).map_err(|e| Error::io(&raw, e))?;
        let guard = slot.open(file);
        *window = Some(Window {
            claim,
            session: session.clone(),
            raw,
            guard,
            started_us: now_us(),
        });
        Ok(())
    }

    async fn stop(&self) -> Result<Vec<PathBuf>> {
        let Some(window) = self.lock().take() else {
            return Ok(Vec::new());
        };
        let stopped_us = now_us();
        if let Some(slot) = installed_slot() {
            slot.close();
        }
        let Window {
            claim,
            session,
            raw,
            guard,
            started_us,
        } = window;
        // The slot is free for another backend once the layer is out.
        claim.finish();
        let path = run_blocking(move || {
            // Joins the writer thread: the raw file is complete after this.
            drop(guard);
            let result = finalize_chrome(&raw, &session).and_then(|mut trace| {
                set_window(&mut trace, started_us, stopped_us);
                write_trace(&session, "chrome", &trace)
            });
            let _ = std::fs::remove_file(&raw);
            result
        })
        .await?;
        Ok(vec![path])
    }

    fn is_active(&self) -> bool {
        self.lock().is_some()
    }
}

/// Turns what `tracing-chrome` wrote at `raw` (a JSON array of `B`/`E`
/// pairs, instants and thread names, all with `pid` 1) into the window's
/// trace, in the shape every backend writes:
///
/// * each `B`/`E` pair of a thread becomes one complete (`X`) event whose
///   `args` are the span's fields at exit (fields recorded while the span
///   ran, such as a step's `request_ids`, included); an `E` without its `B`
///   (the span was entered before the window opened) and a `B` without its
///   `E` (still open at stop) are left out: nothing outside the window;
/// * `pid` is this process's, and a `process_name` event names the stage;
/// * an `omni` object says which backend, process and clock.
pub(crate) fn finalize_chrome(raw: &Path, session: &ProfileSession) -> Result<Value> {
    let invalid = |reason: String| Error::InvalidTrace {
        path: raw.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(raw).map_err(|e| Error::io(raw, e))?;
    let events: Vec<Value> = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("tracing-chrome wrote invalid json: {e}")))?;
    let pid = u64::from(std::process::id());
    let mut out = Vec::with_capacity(events.len() / 2 + 2);
    out.push(
        json!({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "ts": 0,
                    "args": {"name": session.process_name}}),
    );
    // Per thread, the spans entered and not yet exited.
    let mut open: std::collections::HashMap<u64, Vec<Value>> = Default::default();
    let mut complete = Vec::new();
    for mut e in events {
        let ph = e.get("ph").and_then(Value::as_str).unwrap_or("").to_owned();
        let tid = e.get("tid").and_then(Value::as_u64).unwrap_or(0);
        e["pid"] = pid.into();
        match ph.as_str() {
            "B" => open.entry(tid).or_default().push(e),
            "E" => {
                let stack = open.entry(tid).or_default();
                let same = |b: &Value| b.get("name") == e.get("name");
                if stack.last().is_some_and(same) {
                    let mut begin = stack.pop().unwrap_or_default();
                    let start = begin.get("ts").and_then(Value::as_f64).unwrap_or(0.0);
                    let end = e.get("ts").and_then(Value::as_f64).unwrap_or(start);
                    begin["ph"] = "X".into();
                    begin["dur"] = (end - start).max(0.0).into();
                    if let Some(args) = e.get("args").filter(|a| a.is_object()) {
                        begin["args"] = args.clone();
                    }
                    complete.push(begin);
                }
            }
            "M" => out.push(e),
            _ => complete.push(e),
        }
    }
    complete.sort_by(|a, b| {
        let ts = |e: &Value| e.get("ts").and_then(Value::as_f64).unwrap_or(0.0);
        ts(a).total_cmp(&ts(b))
    });
    out.extend(complete);
    let mut info = omni_info(session, "chrome");
    info["writer"] = "tracing-chrome".into();
    info["open_at_stop"] = open.values().map(Vec::len).sum::<usize>().into();
    Ok(json!({
        "traceEvents": out,
        "displayTimeUnit": "ms",
        "omni": info,
    }))
}
