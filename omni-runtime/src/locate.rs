//! Finding the `omni-stage` worker binary. A library user's own program
//! must be able to run pipelines, so this cannot rely on being run from the
//! `omni` CLI. The search order:
//!
//! 1. an explicit path ([`OrchestratorOptions::stage_binary`](crate::OrchestratorOptions));
//! 2. the `OMNI_STAGE_BIN` environment variable;
//! 3. next to the current executable, then in its parent directory (test
//!    binaries live in `target/debug/deps/`, the worker in `target/debug/`);
//! 4. every directory of `PATH`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The worker binary's file name.
pub const STAGE_BINARY_NAME: &str = "omni-stage";

/// The environment variable that names the worker binary.
pub const STAGE_BINARY_ENV: &str = "OMNI_STAGE_BIN";

/// Finds the worker binary; `explicit` wins, and must exist when given.
pub fn locate_stage_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    let mut searched = Vec::new();
    if let Some(p) = explicit {
        if is_executable(p) {
            return Ok(p.to_path_buf());
        }
        searched.push(format!(
            "{} (OrchestratorOptions::stage_binary)",
            p.display()
        ));
        return Err(Error::StageBinaryNotFound {
            searched: searched.join(", "),
        });
    }
    if let Some(v) = std::env::var_os(STAGE_BINARY_ENV) {
        let p = PathBuf::from(&v);
        if is_executable(&p) {
            return Ok(p);
        }
        // An explicit setting that is wrong is an error, not a hint to look elsewhere.
        return Err(Error::StageBinaryNotFound {
            searched: format!("{} ({STAGE_BINARY_ENV})", p.display()),
        });
    }
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        for _ in 0..2 {
            let Some(d) = dir else { break };
            let candidate = d.join(STAGE_BINARY_NAME);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
            searched.push(d.display().to_string());
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let candidate = d.join(STAGE_BINARY_NAME);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
        searched.push("PATH".to_string());
    }
    Err(Error::StageBinaryNotFound {
        searched: searched.join(", "),
    })
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
