//! The `tracing` layer that forwards spans to whichever backend is active.
//!
//! Engine and runtime code mark their phases with `tracing` spans only
//! (`step`, `schedule`, `forward`, `sample`, `add_request`, `stage_send`,
//! `stage_recv`, `cpu_turn`: the wait for this host's other CPU stages); a
//! process installs [`tracing_layer`] once, next to its log
//! output, and every backend sees those spans:
//!
//! * each finished span goes to the span recorder while a `torch` (or a
//!   custom backend's) window is open; `torch` merges their fields into
//!   Kineto's ranges;
//! * while the `chrome` backend records, every callback also goes to the
//!   window's `tracing-chrome` layer (see `chrome.rs`);
//! * while the `torch` backend records, each span also opens a Kineto
//!   `RecordFunction` range (`USER_SCOPE`, as `torch.profiler.record_function`
//!   does), so aten ops nest under `forward` in the trace;
//! * the engine's `step` span (field `step`) is named `ProfilerStep#<n>`, as
//!   `torch.profiler.profile.step()` names steps, so HolisticTraceAnalysis and
//!   TensorBoard's profiler plugin find the steps.
//!
//! When no window is open the layer costs an atomic load per span callback.
use std::cell::RefCell;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span;
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{Filtered, Targets};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::chrome::ChromeSlot;
use crate::clock::{now_us, os_tid};
use crate::kineto;
use crate::recorder::{SpanRecord, RECORDER};

/// Overrides which spans the profiler sees (`tracing_subscriber::filter::Targets`
/// syntax, e.g. `info` or `omni=debug,info`). Default `info`: the engine's
/// spans are at INFO. Independent of `RUST_LOG`, as long as the process's
/// log filter is a per-layer filter on its log layer, not a global one.
pub const FILTER_ENV: &str = "OMNI_PROFILER_FILTER";

/// The layer a process installs once in its subscriber, e.g.
/// `tracing_subscriber::registry().with(fmt_layer.with_filter(env_filter)).with(omni_profiler::tracing_layer())`.
///
/// It carries its own filter ([`FILTER_ENV`], default `info`). Give your log
/// layer its `EnvFilter` as a per-layer filter (`.with_filter(...)`): a
/// global filter would hide engine spans from the profiler when `RUST_LOG`
/// is quieter than `info`. An invalid `OMNI_PROFILER_FILTER` falls back to
/// `info` with a warning rather than failing the process's start.
pub fn tracing_layer<S>() -> impl Layer<S> + Send + Sync + 'static
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync + 'static,
{
    let filter = match std::env::var(FILTER_ENV) {
        Ok(spec) if !spec.trim().is_empty() => spec.parse::<Targets>().unwrap_or_else(|e| {
            tracing::warn!("ignoring {FILTER_ENV}={spec:?} ({e}); using \"info\"");
            Targets::new().with_default(tracing::Level::INFO)
        }),
        _ => Targets::new().with_default(tracing::Level::INFO),
    };
    let filtered: Filtered<ProfilerLayer<S>, Targets, S> = ProfilerLayer::new().with_filter(filter);
    filtered
}

/// The unfiltered layer behind [`tracing_layer`], for a subscriber that
/// filters by itself.
pub struct ProfilerLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    chrome: ChromeSlot<S>,
}

impl<S> ProfilerLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    /// A new layer (all layers share the process's one recorder; the
    /// `chrome` backend uses the one installed last).
    pub fn new() -> Self {
        ProfilerLayer {
            chrome: ChromeSlot::new(),
        }
    }
}

impl<S> Default for ProfilerLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<S> std::fmt::Debug for ProfilerLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfilerLayer").finish_non_exhaustive()
    }
}

/// A span's fields, kept in the span's extensions while a window is open.
#[derive(Debug, Default, Clone)]
struct SpanFields {
    args: Map<String, Value>,
    step: Option<u64>,
}

/// An entered span on this thread.
struct Frame {
    id: span::Id,
    window: u64,
    start_us: f64,
    name: String,
    target: &'static str,
    /// Open Kineto range; ended (dropped) on exit, on this thread.
    range: Option<kineto::Range>,
}

thread_local! {
    static STACK: RefCell<Vec<Frame>> = const { RefCell::new(Vec::new()) };
}

struct FieldVisitor<'a>(&'a mut SpanFields);

impl FieldVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        self.0.args.insert(field.name().to_owned(), value);
    }
}

impl Visit for FieldVisitor<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "step" {
            self.0.step = Some(value);
        }
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "step" {
            self.0.step = u64::try_from(value).ok();
        }
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

impl<S> Layer<S> for ProfilerLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync + 'static,
{
    fn on_layer(&mut self, subscriber: &mut S) {
        self.chrome.on_layer(subscriber);
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.chrome.on_new_span(attrs, id, ctx.clone());
        if !RECORDER.active() {
            return;
        }
        let mut fields = SpanFields::default();
        attrs.record(&mut FieldVisitor(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        self.chrome.on_record(id, values, ctx.clone());
        if !RECORDER.active() {
            return;
        }
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            match ext.get_mut::<SpanFields>() {
                Some(fields) => values.record(&mut FieldVisitor(fields)),
                None => {
                    let mut fields = SpanFields::default();
                    values.record(&mut FieldVisitor(&mut fields));
                    ext.insert(fields);
                }
            }
        }
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.chrome.on_enter(id, ctx.clone());
        if !RECORDER.active() {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        let meta = span.metadata();
        // Only the step number here; the args are read at exit.
        let step = span.extensions().get::<SpanFields>().and_then(|f| f.step);
        let name = match (meta.name(), step) {
            ("step", Some(n)) => format!("ProfilerStep#{n}"),
            (name, _) => name.to_owned(),
        };
        let range = if RECORDER.torch_ranges() {
            kineto::Range::begin(&name)
        } else {
            None
        };
        let frame = Frame {
            id: id.clone(),
            window: RECORDER.window(),
            start_us: now_us(),
            name,
            target: meta.target(),
            range,
        };
        STACK.with(|stack| stack.borrow_mut().push(frame));
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        // Runs even when no window is open: a frame pushed during a window
        // that has since closed still holds a Kineto range to end here, on
        // the thread that opened it.
        self.chrome.on_exit(id, ctx.clone());
        let frame = STACK.with(|stack| {
            let mut stack = stack.borrow_mut();
            let pos = stack.iter().rposition(|f| f.id == *id)?;
            Some(stack.remove(pos))
        });
        let Some(mut frame) = frame else { return };
        let end_us = now_us();
        let kineto_range = frame.range.take().is_some();
        if RECORDER.active() && frame.window == RECORDER.window() {
            // Read at exit, not entry: fields recorded while the span ran
            // (the engine records a step's requests once it has scheduled
            // them) belong to the range too.
            let args = ctx
                .span(id)
                .and_then(|s| s.extensions().get::<SpanFields>().map(|f| f.args.clone()))
                .unwrap_or_default();
            RECORDER.push(
                frame.window,
                SpanRecord {
                    name: frame.name,
                    target: frame.target.to_owned(),
                    start_us: frame.start_us,
                    dur_us: Some(end_us - frame.start_us),
                    tid: os_tid(),
                    args,
                    kineto_range,
                },
            );
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        self.chrome.on_event(event, ctx);
        if !RECORDER.active() {
            return;
        }
        let window = RECORDER.window();
        let mut fields = SpanFields::default();
        event.record(&mut FieldVisitor(&mut fields));
        let name = match fields.args.remove("message") {
            Some(Value::String(m)) => m.chars().take(160).collect(),
            Some(other) => other.to_string(),
            None => event.metadata().name().to_owned(),
        };
        RECORDER.push(
            window,
            SpanRecord {
                name,
                target: event.metadata().target().to_owned(),
                start_us: now_us(),
                dur_us: None,
                tid: os_tid(),
                args: fields.args,
                kineto_range: false,
            },
        );
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.chrome.on_close(id, ctx);
    }
}
