//! Large tensors between stages on one host go through POSIX shared memory:
//! the sender writes the bytes into a file of a private tmpfs directory (the
//! run directory, under `/dev/shm` when there is one) and sends only the
//! file's name; the receiver maps the file, unlinks it at once, and hands out
//! a zero-copy view. ZeroMQ frames of many megabytes move at under 1 GB/s
//! with the `zeromq` crate, while a tmpfs write plus a mapping runs near
//! `memcpy` speed (vLLM-Omni does the same above 64 KiB).
//!
//! Clean-up: the receiver removes a segment as soon as it has mapped it; a
//! segment whose receiver died is removed with the run directory.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::error::{Error, Result};

/// What travels in a message instead of the bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShmHandle {
    /// File name inside the shared-memory directory (no path separators).
    pub name: String,
    /// Number of bytes in the segment.
    pub len: usize,
}

/// Writes segments into one directory; names are unique per writer.
#[derive(Debug)]
pub struct ShmWriter {
    dir: PathBuf,
    prefix: String,
    counter: AtomicU64,
    threshold: usize,
}

impl ShmWriter {
    /// A writer into `dir` for payloads of at least `threshold` bytes;
    /// `prefix` (e.g. `s0-1234`) keeps names of different writers apart.
    pub fn new(dir: impl Into<PathBuf>, prefix: &str, threshold: usize) -> Self {
        ShmWriter {
            dir: dir.into(),
            prefix: prefix.to_string(),
            counter: AtomicU64::new(0),
            threshold: threshold.max(1),
        }
    }

    /// Whether a payload of `len` bytes should go through shared memory.
    pub fn wants(&self, len: usize) -> bool {
        len >= self.threshold
    }

    /// The directory segments live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Copies `data` into a new segment.
    pub fn write(&self, data: &[u8]) -> Result<ShmHandle> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{n}.shm", self.prefix);
        let path = self.dir.join(&name);
        let err = |reason: String| Error::SharedMemory {
            path: path.clone(),
            reason,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| err(format!("cannot create: {e}")))?;
        if let Err(e) = file.write_all(data) {
            let _ = std::fs::remove_file(&path);
            return Err(err(format!("cannot write {} bytes: {e}", data.len())));
        }
        Ok(ShmHandle {
            name,
            len: data.len(),
        })
    }
}

/// Maps the segment named by `handle` in `dir`, removes its file, and
/// returns its bytes. The name and length come from a peer: the name must
/// be a plain file name and the file must hold exactly `len` bytes.
pub fn take(dir: &Path, handle: &ShmHandle) -> Result<Bytes> {
    let name = &handle.name;
    let plain = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !plain {
        return Err(Error::Wire(format!(
            "shared-memory handle name {name:?} is not a plain segment file name"
        )));
    }
    let path = dir.join(name);
    let err = |reason: String| Error::SharedMemory {
        path: path.clone(),
        reason,
    };
    let file = std::fs::File::open(&path).map_err(|e| err(format!("cannot open: {e}")))?;
    let actual = file
        .metadata()
        .map_err(|e| err(format!("cannot stat: {e}")))?
        .len();
    if actual != handle.len as u64 {
        let _ = std::fs::remove_file(&path);
        return Err(err(format!(
            "segment holds {actual} bytes but the message declares {}",
            handle.len
        )));
    }
    if handle.len == 0 {
        let _ = std::fs::remove_file(&path);
        return Ok(Bytes::new());
    }
    // SAFETY: the segment lives in the run directory (mode 0700, only this
    // user's processes of this pipeline write there); its writer never
    // touches a segment after sending its handle, and we unlink it right
    // away, so nobody can modify or truncate it while mapped.
    let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
        .map_err(|e| err(format!("cannot map: {e}")))?;
    std::fs::remove_file(&path).map_err(|e| err(format!("cannot remove after mapping: {e}")))?;
    Ok(Bytes::from_owner(map))
}
