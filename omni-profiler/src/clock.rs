//! One clock for every trace: microseconds since the UNIX epoch.
//!
//! The wall clock is read once per process and advanced with a monotonic
//! `Instant`, so timestamps within a process never go backwards, and those
//! of different processes (stages) on one host line up to the precision of
//! the system clock. Kineto traces are shifted onto the same epoch base when
//! they are finalized (see `trace_file`).
//!
//! Stages on different hosts have different system clocks: the
//! orchestrator estimates each stage's offset against its own clock and the
//! profiler records it in the trace ([`ClockOffset`](crate::ClockOffset)),
//! which the analysis tools subtract. A test can skew a process's clock on
//! purpose ([`set_clock_skew_for_tests`]) to prove they do.
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

static ANCHOR: OnceLock<(Instant, f64)> = OnceLock::new();

/// Microseconds added to every time this process reports (tests only).
static SKEW_US: AtomicI64 = AtomicI64::new(0);

/// Shifts this process's clock — every trace timestamp, and
/// [`now_unix_us`] — by `skew_us`, as if its system clock were that far off
/// (a stage on another host whose clock is not synchronized). For tests of
/// clock-offset correction only; call it before profiling starts.
#[doc(hidden)]
pub fn set_clock_skew_for_tests(skew_us: i64) {
    SKEW_US.store(skew_us, Ordering::Relaxed);
}

/// The test skew, in microseconds (0 unless a test set one).
pub(crate) fn skew_us() -> f64 {
    SKEW_US.load(Ordering::Relaxed) as f64
}

/// Now, in microseconds since the UNIX epoch: the clock of every trace this
/// process writes. Public so that a process can report it to another that
/// estimates the offset between their clocks.
pub fn now_unix_us() -> f64 {
    now_us()
}

/// Now, in microseconds since the UNIX epoch.
pub(crate) fn now_us() -> f64 {
    let (instant, epoch_us) = ANCHOR.get_or_init(|| {
        let epoch_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64() * 1e6)
            .unwrap_or(0.0);
        (Instant::now(), epoch_us)
    });
    epoch_us + instant.elapsed().as_secs_f64() * 1e6 + skew_us()
}

/// The OS thread id, as Kineto and `perf` report it, so that spans we record
/// land on the same rows as Kineto's events of that thread.
pub(crate) fn os_tid() -> u64 {
    // SAFETY: gettid has no preconditions and cannot fail.
    #[cfg(target_os = "linux")]
    let tid = unsafe { libc::gettid() } as u64;
    #[cfg(not(target_os = "linux"))]
    let tid = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::thread::current().id().hash(&mut h);
        h.finish() & 0xffff_ffff
    };
    tid
}
