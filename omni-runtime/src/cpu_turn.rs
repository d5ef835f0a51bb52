//! Turns on the CPU between the stage processes of one host.
//!
//! With `runtime.cpu_threads: all` every CPU stage's intra-op pool is as
//! wide as the machine. Two stages stepping at once then put twice as many
//! OpenMP threads as there are cores on the machine, and each thread that
//! reaches one of a step's ~300 fork-join barriers spins for a thread the
//! other process has preempted: measured on 2 cores, a 32 ms decode step
//! took 290 ms while the next stage's first step ran beside it. So the CPU
//! stages take turns, one engine step a turn: each step gets every core,
//! and a step's outputs are sent while the next stage computes.
//!
//! The turn is an exclusive `flock` on one file of the run directory: the
//! kernel drops it when its holder's file closes, however the holder dies,
//! so a stage that dies mid-step stalls nobody. (A stage stopped mid-step,
//! SIGSTOP, holds it until the orchestrator's watchdog kills the stage.)
//! `flock` is not fair: a stage that gives the turn back and asks again at
//! once can beat the one the kernel has just woken, and a busy stage would
//! starve the next. So the file also holds two counters, mapped shared: the
//! stages waiting for the turn, and the turns taken. A stage that gives the
//! turn back while another waits lets one turn go by before it next asks,
//! for at most [`HANDOFF`]; it waits at its next `take`, so its outputs go
//! out meanwhile, and a stage with nothing left to step never waits. With
//! three or more stages the woken waiters race: turns alternate, but not
//! first come, first served. A waiter that dies waiting leaves the count
//! high, and every handoff then waits the whole bound; a stage's death ends
//! the pipeline's run anyway.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The turn file's name in the run directory.
pub(crate) const FILE_NAME: &str = "cpu.turn";

/// The counters' bytes: `waiting`, then `taken`, each a `u32`.
const LEN: u64 = 8;

/// The longest a stage that gives the turn back waits for a waiting stage
/// to take it before asking again itself. A woken waiter takes it within
/// microseconds when a core is free; the bound only matters when the
/// counted waiter died waiting.
const HANDOFF: Duration = Duration::from_millis(10);

/// How often the giver looks whether the turn was taken.
const HANDOFF_POLL: Duration = Duration::from_micros(50);

/// Creates the turn file at `path` (the orchestrator, before it starts
/// the stages): zeroed counters, readable and writable by this user only.
pub(crate) fn create(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("cannot create the CPU turn file", path, e))?;
    file.set_len(LEN)
        .map_err(|e| Error::io("cannot size the CPU turn file", path, e))
}

/// One stage's handle on the turn (see the module docs). Taking the turn
/// needs `&mut self`: a process holds it through one open file, and a
/// second take on the same file would not exclude the first.
#[derive(Debug)]
pub(crate) struct CpuTurn {
    path: PathBuf,
    file: File,
    counters: memmap2::MmapRaw,
    /// [`HANDOFF`], but for tests that must not depend on the scheduler.
    handoff: Duration,
    /// The turns-taken count when this stage gave the turn back while
    /// another waited: its next `take` first waits for the count to move.
    owed: Option<u32>,
    /// Locking failed once: steps run without the turn from then on
    /// (reported once).
    broken: bool,
}

/// The turn, held until dropped.
#[derive(Debug)]
pub(crate) struct Turn<'a> {
    owner: &'a mut CpuTurn,
    /// False when locking failed: the step runs without the turn rather
    /// than not at all (already reported).
    held: bool,
}

impl CpuTurn {
    /// Opens the turn file the orchestrator created at `path`.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("cannot open the CPU turn file", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("cannot read the CPU turn file", path, e))?
            .len();
        if len < LEN {
            return Err(Error::io(
                "CPU turn file is too short",
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{len} bytes, expected {LEN}"),
                ),
            ));
        }
        let counters = memmap2::MmapOptions::new()
            .len(LEN as usize)
            .map_raw(&file)
            .map_err(|e| Error::io("cannot map the CPU turn file", path, e))?;
        Ok(CpuTurn {
            path: path.to_path_buf(),
            file,
            counters,
            handoff: HANDOFF,
            owed: None,
            broken: false,
        })
    }

    fn counter(&self, index: usize) -> &AtomicU32 {
        debug_assert!((index + 1) * 4 <= LEN as usize);
        // SAFETY: the mapping is LEN bytes long, page aligned and lives as
        // long as `self`; `index` stays inside it (both callers pass a
        // constant), so the pointer is in bounds and 4-byte aligned.
        // Every process touches these bytes only through atomics, and
        // nobody shrinks the file (ours, mode 0600, in the run directory).
        unsafe { &*(self.counters.as_mut_ptr().add(index * 4) as *const AtomicU32) }
    }

    /// Stages waiting for the turn (or about to).
    fn waiting(&self) -> &AtomicU32 {
        self.counter(0)
    }

    /// Turns taken so far, by any stage (wraps).
    fn taken(&self) -> &AtomicU32 {
        self.counter(1)
    }

    /// Waits for the turn and takes it.
    pub(crate) fn take(&mut self) -> Turn<'_> {
        if self.broken {
            return Turn {
                owner: self,
                held: false,
            };
        }
        if let Some(taken) = self.owed.take() {
            let until = Instant::now() + self.handoff;
            while self.taken().load(Ordering::SeqCst) == taken && Instant::now() < until {
                std::thread::sleep(HANDOFF_POLL);
            }
        }
        self.waiting().fetch_add(1, Ordering::SeqCst);
        let held = loop {
            // SAFETY: flock on a descriptor this `File` owns for the call.
            if unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                break true;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!(target: "omni::runtime", path = %self.path.display(), "cannot take the CPU turn; this stage steps without it from now on: {e}");
                break false;
            }
        };
        self.waiting().fetch_sub(1, Ordering::SeqCst);
        if held {
            self.taken().fetch_add(1, Ordering::SeqCst);
        } else {
            self.broken = true;
        }
        Turn { owner: self, held }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let taken = self.owner.taken().load(Ordering::SeqCst);
        // SAFETY: flock on a descriptor the owner's `File` holds open.
        unsafe { libc::flock(self.owner.file.as_raw_fd(), libc::LOCK_UN) };
        if self.owner.waiting().load(Ordering::SeqCst) > 0 {
            self.owner.owed = Some(taken);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn turn_file() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        create(&path).unwrap();
        (dir, path)
    }

    /// A second holder waits until the first gives the turn back, and
    /// the first, asking again while the second waits, comes after it.
    #[test]
    fn turns_exclude_each_other_and_alternate() {
        let (_dir, path) = turn_file();
        let mut a = CpuTurn::open(&path).unwrap();
        let mut b = CpuTurn::open(&path).unwrap();
        // However slowly the scheduler wakes `b`, `a` waits for it.
        a.handoff = Duration::from_secs(60);
        let (log_tx, log) = mpsc::channel();
        let turn = a.take();
        let b_log = log_tx.clone();
        let waiter = std::thread::spawn(move || {
            let _t = b.take();
            b_log.send("b").unwrap();
            // Holds the turn long enough that `a` must wait for it.
            std::thread::sleep(Duration::from_millis(50));
            b_log.send("b done").unwrap();
        });
        // `b` is counted as waiting before `a` gives the turn back, so the
        // handoff below must let `b` go first.
        let deadline = Instant::now() + Duration::from_secs(10);
        while turn.owner.waiting().load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the second holder never waited");
            std::thread::sleep(Duration::from_millis(1));
        }
        log_tx.send("a").unwrap();
        drop(turn);
        let again = a.take();
        log_tx.send("a again").unwrap();
        drop(again);
        waiter.join().unwrap();
        let order: Vec<&str> = log.try_iter().collect();
        assert_eq!(order, ["a", "b", "b done", "a again"]);
    }

    /// Whether `turn` gets the turn within 10 s (on another thread, so a
    /// hang fails the test instead of stalling it).
    fn takes_the_turn(mut turn: CpuTurn) -> bool {
        let (done_tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            let held = turn.take().held;
            let _ = done_tx.send(held);
        });
        done.recv_timeout(Duration::from_secs(10)) == Ok(true)
    }

    /// A holder that dies (its file closed, as at process exit, without
    /// giving the turn back) does not keep it.
    #[test]
    fn a_dead_holder_loses_the_turn() {
        let (_dir, path) = turn_file();
        let mut dead = CpuTurn::open(&path).unwrap();
        std::mem::forget(dead.take());
        drop(dead);
        let alive = CpuTurn::open(&path).unwrap();
        assert!(takes_the_turn(alive), "the dead holder kept the turn");
    }

    /// A waiter that died waiting (counted, never served) costs a handoff
    /// its bound, not a hang.
    #[test]
    fn a_dead_waiter_costs_at_most_the_handoff() {
        let (_dir, path) = turn_file();
        let mut a = CpuTurn::open(&path).unwrap();
        a.handoff = Duration::from_millis(20);
        a.waiting().fetch_add(1, Ordering::SeqCst);
        drop(a.take());
        assert!(a.owed.is_some(), "a waiter was counted");
        assert!(takes_the_turn(a), "the dead waiter hung the handoff");
    }

    #[test]
    fn a_short_or_missing_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.turn");
        let e = CpuTurn::open(&missing).unwrap_err().to_string();
        assert!(e.contains("nope.turn"), "{e}");
        let short = dir.path().join("short.turn");
        std::fs::write(&short, [0u8; 3]).unwrap();
        let e = CpuTurn::open(&short).unwrap_err().to_string();
        assert!(e.contains("short.turn") && e.contains("3 bytes"), "{e}");
        assert!(create(&short).is_err(), "create must not reuse a file");
    }
}
