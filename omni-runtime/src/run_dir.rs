//! The private directory of one running pipeline: its Unix sockets, launch
//! files and shared-memory segments.
//!
//! It lives under `/dev/shm` when that is writable (so that segments are in
//! RAM), else the temp dir, as `omni-<pid>-<nonce>` with mode 0700. The
//! orchestrator removes it at shutdown, and an orphaned worker removes it
//! when its orchestrator died. When every process of a pipeline is killed at
//! once (`kill -9` of the process group, the OOM killer) nobody is left to
//! clean up, and segments in `/dev/shm` hold RAM until reboot. So the owner
//! holds an exclusive `flock` on `owner.lock` inside for its lifetime, which
//! the kernel drops when the process dies however it dies, and every new
//! pipeline removes the directories of its user whose lock it can take.
//! A lock, unlike a PID check, is right across PID namespaces sharing one
//! `/dev/shm` and after PID reuse.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const PREFIX: &str = "omni-";
const LOCK_FILE: &str = "owner.lock";

/// The private directory of one running pipeline; see the module docs.
#[derive(Debug)]
pub(crate) struct RunDir {
    path: PathBuf,
    /// Held (flock) for as long as this value lives.
    _lock: File,
}

impl RunDir {
    /// Removes stale run directories in `parent` (or the default parent),
    /// then creates `<parent>/omni-<pid>-<nonce>`, its `shm/` and its lock.
    pub(crate) fn create(parent: Option<&Path>) -> Result<Self> {
        let parent = match parent {
            Some(p) => p.to_path_buf(),
            None => default_parent(),
        };
        sweep_stale(&parent);
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!("{}-{:x}", std::process::id(), nonce & 0xffff_ffff_ffff);
        // Built under a name the sweep ignores and renamed once locked, so no
        // sweep ever sees it without its lock held.
        let building = parent.join(format!(".{PREFIX}{name}"));
        let path = parent.join(format!("{PREFIX}{name}"));
        let dir_builder = || {
            let mut b = std::fs::DirBuilder::new();
            b.mode(0o700);
            b
        };
        dir_builder()
            .create(&building)
            .map_err(|e| Error::io("cannot create run directory", &building, e))?;
        let set_up = || -> Result<File> {
            let shm = building.join("shm");
            dir_builder()
                .create(&shm)
                .map_err(|e| Error::io("cannot create shared-memory directory", &shm, e))?;
            let lock_path = building.join(LOCK_FILE);
            let lock = File::create(&lock_path)
                .map_err(|e| Error::io("cannot create run directory lock", &lock_path, e))?;
            if !try_lock(&lock) {
                return Err(Error::io(
                    "cannot lock run directory",
                    &lock_path,
                    std::io::Error::last_os_error(),
                ));
            }
            std::fs::rename(&building, &path)
                .map_err(|e| Error::io("cannot create run directory", &path, e))?;
            Ok(lock)
        };
        match set_up() {
            Ok(lock) => Ok(RunDir { path, _lock: lock }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&building);
                Err(e)
            }
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn shm_dir(&self) -> PathBuf {
        self.path.join("shm")
    }

    /// Removes the directory and everything in it (sockets, segments).
    pub(crate) fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(target: "omni::runtime", path = %self.path.display(), "cannot remove run directory: {e}");
            }
        }
    }
}

/// Takes an exclusive `flock` without waiting; false when another open
/// file holds it (or locking failed).
fn try_lock(file: &File) -> bool {
    // SAFETY: flock on a descriptor this `File` owns for the whole call.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Removes the run directories in `parent` that belong to this user and
/// whose owner is gone. Best effort: a directory that cannot be judged (no
/// lock file, another user's, unreadable) is left alone.
fn sweep_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(|n| n.starts_with(PREFIX)) {
            continue;
        }
        let path = entry.path();
        let ours = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if !ours {
            continue;
        }
        // Held by a live owner, or no lock to judge by (a run of an older
        // version, or not ours): leave it.
        let Ok(lock) = File::open(path.join(LOCK_FILE)) else {
            continue;
        };
        if !try_lock(&lock) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(target: "omni::runtime", path = %path.display(), "removed the run directory of a pipeline that died without cleaning up")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(target: "omni::runtime", path = %path.display(), "cannot remove stale run directory: {e}")
            }
        }
    }
}

fn default_parent() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let writable = std::fs::metadata(shm)
        .map(|m| m.is_dir() && !m.permissions().readonly())
        .unwrap_or(false);
    if writable && probe_writable(shm) {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn probe_writable(dir: &Path) -> bool {
    let probe = dir.join(format!(".omni-probe-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_pipeline_removes_only_run_directories_whose_owner_is_gone() {
        let parent = tempfile::tempdir().unwrap();
        let live = RunDir::create(Some(parent.path())).unwrap();
        assert!(live.path().join(LOCK_FILE).is_file() && live.shm_dir().is_dir());

        // An owner that died: its lock file is there, and nobody holds it.
        let dead = parent.path().join("omni-1-dead");
        std::fs::create_dir_all(dead.join("shm")).unwrap();
        std::fs::write(dead.join("shm/segment"), b"tensor bytes").unwrap();
        File::create(dead.join(LOCK_FILE)).unwrap();
        // Nothing to judge by, and not a run directory at all.
        let lockless = parent.path().join("omni-2-nolock");
        std::fs::create_dir(&lockless).unwrap();
        let other = parent.path().join("other");
        std::fs::create_dir(&other).unwrap();
        File::create(other.join(LOCK_FILE)).unwrap();

        let second = RunDir::create(Some(parent.path())).unwrap();
        assert!(!dead.exists(), "the dead owner's directory stays");
        assert!(live.path().is_dir(), "a live owner's directory was removed");
        assert!(lockless.is_dir() && other.is_dir());
        assert_ne!(live.path(), second.path());

        // Once its owner is gone, the next pipeline removes it too.
        let live_path = live.path().to_path_buf();
        drop(live);
        let _third = RunDir::create(Some(parent.path())).unwrap();
        assert!(!live_path.exists());
        assert!(second.path().is_dir());
    }

    #[test]
    fn an_unwritable_parent_is_named_in_the_error() {
        let e = RunDir::create(Some(Path::new("/proc/omni-no-such-parent"))).unwrap_err();
        assert!(e.to_string().contains("/proc/omni-no-such-parent"), "{e}");
    }
}
