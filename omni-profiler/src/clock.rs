//! One clock for every trace: microseconds since the UNIX epoch.
//!
//! The wall clock is read once per process and advanced with a monotonic
//! `Instant`, so timestamps within a process never go backwards, and those
//! of different processes (stages) on one host line up to the precision of
//! the system clock. Kineto traces are shifted onto the same epoch base when
//! they are finalized (see `trace_file`).
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

static ANCHOR: OnceLock<(Instant, f64)> = OnceLock::new();

/// Now, in microseconds since the UNIX epoch.
pub(crate) fn now_us() -> f64 {
    let (instant, epoch_us) = ANCHOR.get_or_init(|| {
        let epoch_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64() * 1e6)
            .unwrap_or(0.0);
        (Instant::now(), epoch_us)
    });
    epoch_us + instant.elapsed().as_secs_f64() * 1e6
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
