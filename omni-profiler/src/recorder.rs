//! The process-wide span recorder: while a window is open, the tracing layer
//! appends every finished span and event here; the backend that opened the
//! window takes them when it closes it.
//!
//! One recorder per process, because spans come from every thread and the
//! layer is installed once. Hence one recording backend at a time: a second
//! [`SpanCapture::start`] fails with [`Error::AlreadyActive`] naming the
//! owner, instead of two backends silently splitting the spans.
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// Cap on spans kept per window (a few hundred bytes each), so a window left
/// open for hours cannot exhaust memory; spans beyond it are counted.
const MAX_SPANS: usize = 4_000_000;

/// One finished span (a complete range) or event (an instant), as the
/// tracing layer saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanRecord {
    /// The span's name (`ProfilerStep#<n>` for the engine's `step` span), or
    /// an event's message.
    pub name: String,
    /// The `tracing` target, e.g. `omni::engine`.
    pub target: String,
    /// Start, in microseconds since the UNIX epoch.
    pub start_us: f64,
    /// Duration in microseconds; `None` for an event (an instant).
    pub dur_us: Option<f64>,
    /// OS thread id.
    pub tid: u64,
    /// The span's fields (`phase`, `batch_size`, `num_tokens`,
    /// `request_ids`...).
    pub args: Map<String, Value>,
    /// Whether the span opened a Kineto `RecordFunction` range (so the torch
    /// trace holds it already).
    pub(crate) kineto_range: bool,
}

/// Everything one window recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CapturedSpans {
    /// Spans and events, in the order they finished.
    pub spans: Vec<SpanRecord>,
    /// OS thread id -> thread name, for every thread that recorded.
    pub threads: BTreeMap<u64, String>,
    /// Spans dropped because the window hit its cap.
    pub dropped: u64,
}

struct Inner {
    owner: Option<String>,
    captured: CapturedSpans,
}

pub(crate) struct Recorder {
    active: AtomicBool,
    torch_ranges: AtomicBool,
    window: AtomicU64,
    inner: Mutex<Inner>,
}

pub(crate) static RECORDER: Recorder = Recorder {
    active: AtomicBool::new(false),
    torch_ranges: AtomicBool::new(false),
    window: AtomicU64::new(0),
    inner: Mutex::new(Inner {
        owner: None,
        captured: CapturedSpans {
            spans: Vec::new(),
            threads: BTreeMap::new(),
            dropped: 0,
        },
    }),
};

thread_local! {
    /// The window in which this thread last registered its name.
    static NAMED_IN: Cell<u64> = const { Cell::new(0) };
}

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a window is open (the layer's fast path when profiling is off).
    #[inline]
    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Whether spans should also become Kineto `RecordFunction` ranges.
    #[inline]
    pub(crate) fn torch_ranges(&self) -> bool {
        self.torch_ranges.load(Ordering::Acquire)
    }

    /// The current window's number (0: none yet).
    #[inline]
    pub(crate) fn window(&self) -> u64 {
        self.window.load(Ordering::Acquire)
    }

    fn begin(&self, owner: &str, mode: CaptureMode) -> Result<u64> {
        let mut inner = self.lock();
        if let Some(current) = &inner.owner {
            return Err(Error::AlreadyActive {
                backend: owner.to_owned(),
                reason: format!("the {current} profiler is already recording in this process"),
            });
        }
        inner.owner = Some(owner.to_owned());
        inner.captured = CapturedSpans::default();
        let window = self.window.fetch_add(1, Ordering::AcqRel) + 1;
        self.torch_ranges
            .store(mode == CaptureMode::WithTorchRanges, Ordering::Release);
        self.active
            .store(mode != CaptureMode::ClaimOnly, Ordering::Release);
        Ok(window)
    }

    fn end(&self, window: u64) -> CapturedSpans {
        let mut inner = self.lock();
        if self.window() != window || inner.owner.is_none() {
            return CapturedSpans::default();
        }
        self.active.store(false, Ordering::Release);
        self.torch_ranges.store(false, Ordering::Release);
        inner.owner = None;
        std::mem::take(&mut inner.captured)
    }

    /// Appends a finished span of window `window` (dropped if that window
    /// has closed meanwhile).
    pub(crate) fn push(&self, window: u64, record: SpanRecord) {
        let tid = record.tid;
        let mut inner = self.lock();
        if !self.active() || self.window() != window {
            return;
        }
        if NAMED_IN.with(|w| w.replace(window)) != window {
            let name = std::thread::current()
                .name()
                .map(|n| format!("{n} ({tid})"))
                .unwrap_or_else(|| format!("thread {tid}"));
            inner.captured.threads.insert(tid, name);
        }
        if inner.captured.spans.len() < MAX_SPANS {
            inner.captured.spans.push(record);
        } else {
            inner.captured.dropped += 1;
        }
    }
}

/// What a [`SpanCapture`] does while it is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CaptureMode {
    /// Record every span.
    Record,
    /// Record every span, and open a Kineto range for each (`torch`).
    WithTorchRanges,
    /// Record nothing: only own the process's one recording slot, for a
    /// backend that takes the spans through a layer of its own (`chrome`).
    ClaimOnly,
}

/// An open recording window over the tracing layer's spans: what the
/// built-in `chrome` and `torch` backends use, and what a custom backend can
/// use to get the engine's spans without writing a `tracing` layer.
///
/// At most one capture is open per process. Dropping it without
/// [`SpanCapture::finish`] discards what it recorded.
#[derive(Debug)]
pub struct SpanCapture {
    window: u64,
    finished: bool,
}

impl SpanCapture {
    /// Opens a window owned by backend `owner`. Fails with
    /// [`Error::AlreadyActive`] when another capture is open.
    pub fn start(owner: &str) -> Result<Self> {
        Self::start_inner(owner, CaptureMode::Record)
    }

    pub(crate) fn start_inner(owner: &str, mode: CaptureMode) -> Result<Self> {
        let window = RECORDER.begin(owner, mode)?;
        Ok(SpanCapture {
            window,
            finished: false,
        })
    }

    /// Closes the window and returns what it recorded.
    pub fn finish(mut self) -> CapturedSpans {
        self.finished = true;
        RECORDER.end(self.window)
    }
}

impl Drop for SpanCapture {
    fn drop(&mut self) {
        if !self.finished {
            RECORDER.end(self.window);
        }
    }
}
