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
//!
//! A fresh segment per message costs more than its copy: the kernel
//! allocates and zeroes every page on write and frees them on unlink
//! (measured: ~1.2 GB/s whatever the size, a quarter of `memcpy`). So each
//! writer also keeps a small pool of **slots**, files that live as long as the
//! run directory and stay mapped by the writer. A slot's first 64 bytes hold
//! a state word that both processes map: the writer claims a free slot
//! (free -> busy), copies into pages that are already there and sends the
//! slot's name; the receiver maps the slot and frees it when the last view of
//! its bytes is dropped. When no slot is free (receivers still hold them) or
//! the pool is at its size limit, the writer falls back to a fresh segment:
//! it never waits for a receiver. A receiver that dies holding a slot only
//! shrinks its writer's pool.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use memmap2::{MmapOptions, MmapRaw};

use bytes::Bytes;

use crate::error::{Error, Result};

/// What travels in a message instead of the bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShmHandle {
    /// File name inside the shared-memory directory (no path separators).
    pub name: String,
    /// Number of bytes in the segment.
    pub len: usize,
    /// Whether the name is a pooled slot (bytes after the slot header,
    /// freed rather than removed by the receiver) instead of a segment.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pooled: bool,
}

/// Bytes before a slot's data: its state word, padded to a cache line.
const SLOT_HEADER: usize = 64;
const SLOT_FREE: u32 = 0;
const SLOT_BUSY: u32 = 1;
/// Most slots one writer keeps. A sender runs ahead of its receiver by as
/// many messages as it has slots before it falls back to (slow) segments:
/// with 16, a stream of 1 MB messages ran out of slots in about half the
/// runs and fell from ~22 to ~12 GB/s. The pool's byte cap still bounds the
/// memory for large payloads.
const MAX_SLOTS: usize = 64;
/// Default cap on the bytes one writer keeps in slots.
pub const DEFAULT_POOL_BYTES: usize = 1 << 30;
/// Smallest slot: small payloads share a size class.
const MIN_SLOT_BYTES: usize = 1 << 20;

/// The state word at the start of a slot mapping.
///
/// # Safety
/// `map` must be a live mapping of at least `SLOT_HEADER` bytes (mappings
/// are page-aligned, so the word is aligned).
unsafe fn slot_state(map: &MmapRaw) -> &AtomicU32 {
    // SAFETY: per the contract; other processes touch the word only
    // through atomics too.
    unsafe { &*(map.as_mut_ptr() as *const AtomicU32) }
}

/// A slot the writer owns.
#[derive(Debug)]
struct Slot {
    name: String,
    map: MmapRaw,
    capacity: usize,
}

/// Writes segments into one directory; names are unique per writer.
#[derive(Debug)]
pub struct ShmWriter {
    dir: PathBuf,
    prefix: String,
    counter: AtomicU64,
    threshold: usize,
    pool_bytes: usize,
    slots: Mutex<Vec<Slot>>,
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
            pool_bytes: DEFAULT_POOL_BYTES,
            slots: Mutex::new(Vec::new()),
        }
    }

    /// Caps the bytes kept in pooled slots (0: every payload gets a fresh
    /// segment).
    pub fn with_pool_bytes(mut self, bytes: usize) -> Self {
        self.pool_bytes = bytes;
        self
    }

    /// Whether a payload of `len` bytes should go through shared memory.
    pub fn wants(&self, len: usize) -> bool {
        len >= self.threshold
    }

    /// The directory segments live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Copies `data` into a free slot, or else into a new segment.
    pub fn write(&self, data: &[u8]) -> Result<ShmHandle> {
        if let Some(h) = self.write_pooled(data)? {
            return Ok(h);
        }
        self.write_segment(data)
    }

    /// `None` when no slot is free and the pool may not grow.
    fn write_pooled(&self, data: &[u8]) -> Result<Option<ShmHandle>> {
        if data.len() > self.pool_bytes {
            return Ok(None);
        }
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // The smallest free slot that fits: big slots stay for big payloads.
        let mut best: Option<usize> = None;
        for (i, s) in slots.iter().enumerate() {
            // SAFETY: the writer's own live mapping, larger than the header.
            let free = unsafe { slot_state(&s.map) }.load(Ordering::Acquire) == SLOT_FREE;
            if free
                && s.capacity >= data.len()
                && best.is_none_or(|b| slots[b].capacity > s.capacity)
            {
                best = Some(i);
            }
        }
        let slot = match best {
            // SAFETY: as above. Only this writer moves a slot out of free.
            Some(i) => {
                unsafe { slot_state(&slots[i].map) }.store(SLOT_BUSY, Ordering::Relaxed);
                &slots[i]
            }
            None => {
                let capacity = data.len().next_power_of_two().max(MIN_SLOT_BYTES);
                let held: usize = slots.iter().map(|s| s.capacity).sum();
                if slots.len() >= MAX_SLOTS || held + capacity > self.pool_bytes {
                    return Ok(None);
                }
                let slot = self.new_slot(capacity)?;
                slots.push(slot);
                &slots[slots.len() - 1]
            }
        };
        // SAFETY: the slot is busy, so no receiver reads it; the mapping
        // holds SLOT_HEADER + capacity >= SLOT_HEADER + len bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                slot.map.as_mut_ptr().add(SLOT_HEADER),
                data.len(),
            );
        }
        Ok(Some(ShmHandle {
            name: slot.name.clone(),
            len: data.len(),
            pooled: true,
        }))
    }

    /// A new slot file, mapped, in the busy state.
    fn new_slot(&self, capacity: usize) -> Result<Slot> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-slot{n}.shm", self.prefix);
        let path = self.dir.join(&name);
        let err = |reason: String| Error::SharedMemory {
            path: path.clone(),
            reason,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| err(format!("cannot create: {e}")))?;
        let len = SLOT_HEADER + capacity;
        // Reserve the pages now: on a full tmpfs, writing through the
        // mapping of a merely sized file raises SIGBUS and kills the stage;
        // fallocate says ENOSPC instead (the caller then sends inline).
        // SAFETY: a valid descriptor and a non-negative range.
        let r = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        if r != 0 {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(err(format!(
                "cannot reserve {len} bytes: {}",
                std::io::Error::from_raw_os_error(r)
            )));
        }
        let map = MmapOptions::new()
            .map_raw(&file)
            .map_err(|e| err(format!("cannot map: {e}")))?;
        // SAFETY: a fresh mapping of more than SLOT_HEADER bytes.
        unsafe { slot_state(&map) }.store(SLOT_BUSY, Ordering::Relaxed);
        Ok(Slot {
            name,
            map,
            capacity,
        })
    }

    /// Copies `data` into a new segment, which its receiver removes.
    fn write_segment(&self, data: &[u8]) -> Result<ShmHandle> {
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
            pooled: false,
        })
    }
}

/// Most slot mappings one receiver keeps (a pipeline's writers hold
/// `MAX_SLOTS` each); past it the cache starts over.
const MAX_MAPPED_SLOTS: usize = 8 * MAX_SLOTS;

/// The slots a receiver has mapped, by file name. Each slot is mapped once
/// and serves every message that names it (its writer never resizes it), so
/// a message costs its copy and not a map and unmap. Owned by the
/// receiver's decode context: the mappings go when the receiver does.
#[derive(Debug, Clone, Default)]
pub struct SlotMaps(Arc<Mutex<HashMap<String, Arc<MmapRaw>>>>);

impl SlotMaps {
    fn get_or_map(&self, path: &Path, name: &str) -> Result<Arc<MmapRaw>> {
        let mut maps = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = maps.get(name) {
            return Ok(Arc::clone(m));
        }
        let err = |reason: String| Error::SharedMemory {
            path: path.to_path_buf(),
            reason,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| err(format!("cannot open: {e}")))?;
        let size = file
            .metadata()
            .map_err(|e| err(format!("cannot stat: {e}")))?
            .len();
        if size < SLOT_HEADER as u64 {
            return Err(err(format!(
                "slot holds {size} bytes, less than its header"
            )));
        }
        // SAFETY of the mapping's use: the slot lives in the run directory
        // (mode 0700, only this pipeline's processes); its writer changes
        // neither its size nor, while it is busy, its bytes.
        let map = Arc::new(
            MmapOptions::new()
                .populate()
                .map_raw(&file)
                .map_err(|e| err(format!("cannot map: {e}")))?,
        );
        if maps.len() >= MAX_MAPPED_SLOTS {
            maps.clear();
        }
        maps.insert(name.to_string(), Arc::clone(&map));
        Ok(map)
    }
}

/// The bytes of a busy slot; dropping the last view frees the slot for its
/// writer.
struct SlotView {
    map: Arc<MmapRaw>,
    len: usize,
}

impl AsRef<[u8]> for SlotView {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `take_slot` checked that the mapping holds SLOT_HEADER +
        // len bytes; the writer leaves a busy slot alone, and it stays busy
        // until this view is dropped.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(SLOT_HEADER), self.len) }
    }
}

impl Drop for SlotView {
    fn drop(&mut self) {
        // SAFETY: a live mapping larger than the header.
        unsafe { slot_state(&self.map) }.store(SLOT_FREE, Ordering::Release);
    }
}

/// Maps the segment named by `handle` in `dir`, removes its file, and
/// returns its bytes; a pooled slot is mapped once through `slots` and
/// freed when the returned bytes are dropped. The name and length come from a peer: the name must
/// be a plain file name and the file must hold exactly `len` bytes.
pub fn take(dir: &Path, handle: &ShmHandle, slots: &SlotMaps) -> Result<Bytes> {
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
    if handle.pooled {
        return take_slot(&path, handle, slots);
    }
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

/// A view of the `len` bytes of a busy slot.
fn take_slot(path: &Path, handle: &ShmHandle, slots: &SlotMaps) -> Result<Bytes> {
    let map = slots.get_or_map(path, &handle.name)?;
    let err = |reason: String| Error::SharedMemory {
        path: path.to_path_buf(),
        reason,
    };
    if map.len() < SLOT_HEADER + handle.len {
        return Err(err(format!(
            "slot holds {} bytes, less than its header and the {} the message declares",
            map.len(),
            handle.len
        )));
    }
    // SAFETY: a live mapping larger than the header.
    if unsafe { slot_state(&map) }.load(Ordering::Acquire) != SLOT_BUSY {
        return Err(err(
            "the slot is not busy: the message is stale or not from its writer".into(),
        ));
    }
    Ok(Bytes::from_owner(SlotView {
        map,
        len: handle.len,
    }))
}

/// What a stage may do with the orchestrator's shared-memory directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShmAccess {
    /// Another host: every tensor travels in its messages.
    None,
    /// This host, but a stage it sends to is not: it reads what stages of
    /// this host put there, and writes nothing.
    Read,
    /// This host, and so is every stage it sends to (and the orchestrator,
    /// which takes the final outputs).
    ReadWrite,
}

/// Each stage's [`ShmAccess`], from whether it runs on the orchestrator's
/// host (every local stage; a Ray stage whose actor read the orchestrator's
/// probe file back). Shared memory is one machine's memory: never assumed
/// across nodes.
pub(crate) fn shm_access(config: &crate::PipelineConfig, on_our_host: &[bool]) -> Vec<ShmAccess> {
    let here = |i: usize| on_our_host.get(i).copied().unwrap_or(false);
    config
        .stages
        .iter()
        .map(|s| {
            if config.runtime.shm_threshold_bytes.is_none() || !here(s.stage_id) {
                ShmAccess::None
            } else if config.downstream_of(s.stage_id).into_iter().all(here) {
                ShmAccess::ReadWrite
            } else {
                ShmAccess::Read
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    #[test]
    fn slots_are_reused_once_the_receiver_drops_its_view() -> Result<()> {
        let d = dir();
        let maps = SlotMaps::default();
        let w = ShmWriter::new(d.path(), "w", 1);
        let a = w.write(&[1u8; 1000])?;
        assert!(a.pooled);
        let first = take(d.path(), &a, &maps)?;
        assert_eq!(&first[..], &[1u8; 1000][..]);
        // Still held: the next payload gets another slot.
        let b = w.write(&[2u8; 10])?;
        assert_ne!(a.name, b.name);
        drop(take(d.path(), &b, &maps)?);
        drop(first);
        // Both free now: the smallest that fits is reused, nothing new is made.
        let c = w.write(&[3u8; 2000])?;
        assert!(c.name == a.name || c.name == b.name, "{c:?}");
        assert_eq!(&take(d.path(), &c, &maps)?[..], &[3u8; 2000][..]);
        assert_eq!(
            std::fs::read_dir(d.path()).map(|r| r.count()).unwrap_or(0),
            2
        );
        Ok(())
    }

    #[test]
    fn a_full_pool_falls_back_to_segments() -> Result<()> {
        let d = dir();
        let maps = SlotMaps::default();
        let w = ShmWriter::new(d.path(), "w", 1).with_pool_bytes(MIN_SLOT_BYTES);
        let a = w.write(&[1u8; 100])?;
        let held = take(d.path(), &a, &maps)?;
        let b = w.write(&[2u8; 100])?;
        assert!(a.pooled && !b.pooled, "{a:?} {b:?}");
        assert_eq!(&take(d.path(), &b, &maps)?[..], &[2u8; 100][..]);
        drop(held);
        let none = ShmWriter::new(d.path(), "x", 1).with_pool_bytes(0);
        assert!(!none.write(&[0u8; 10])?.pooled);
        Ok(())
    }

    #[test]
    fn a_free_or_short_slot_is_refused() -> Result<()> {
        let d = dir();
        let maps = SlotMaps::default();
        let w = ShmWriter::new(d.path(), "w", 1);
        let a = w.write(&[1u8; 64])?;
        drop(take(d.path(), &a, &maps)?);
        // Taken twice: the slot is free again, so the second is stale.
        let e = take(d.path(), &a, &maps).expect_err("a free slot was taken");
        assert!(e.to_string().contains("not busy"), "{e}");
        let long = ShmHandle {
            len: 4 << 20,
            ..w.write(&[1u8; 64])?
        };
        let e = take(d.path(), &long, &maps).expect_err("a length past the slot was taken");
        assert!(e.to_string().contains("less than"), "{e}");
        Ok(())
    }

    #[test]
    fn shared_memory_only_where_every_reader_shares_the_host() -> crate::Result<()> {
        // thinker -> talker -> code2wav; the talker on another host.
        let mut config = crate::PipelineConfig::builtin("qwen2_5_omni")?;
        assert_eq!(
            shm_access(&config, &[true, false, true]),
            [ShmAccess::Read, ShmAccess::None, ShmAccess::ReadWrite]
        );
        assert_eq!(
            shm_access(&config, &[true, true, true]),
            [ShmAccess::ReadWrite; 3]
        );
        assert_eq!(
            shm_access(&config, &[false, false, true]),
            [ShmAccess::None, ShmAccess::None, ShmAccess::ReadWrite]
        );
        config.runtime.shm_threshold_bytes = None;
        assert_eq!(shm_access(&config, &[true; 3]), [ShmAccess::None; 3]);
        Ok(())
    }
}
