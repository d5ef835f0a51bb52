//! [`ProfileOptions`] and the profiler directory, read from vLLM's
//! `VLLM_TORCH_PROFILER_*` environment variables.
use std::ffi::OsStr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The variable naming the root directory of all traces (as in vLLM).
pub const PROFILER_DIR_ENV: &str = "VLLM_TORCH_PROFILER_DIR";

const RECORD_SHAPES_ENV: &str = "VLLM_TORCH_PROFILER_RECORD_SHAPES";
const WITH_STACK_ENV: &str = "VLLM_TORCH_PROFILER_WITH_STACK";
const WITH_PROFILE_MEMORY_ENV: &str = "VLLM_TORCH_PROFILER_WITH_PROFILE_MEMORY";
const WITH_FLOPS_ENV: &str = "VLLM_TORCH_PROFILER_WITH_FLOPS";
const USE_GZIP_ENV: &str = "VLLM_TORCH_PROFILER_USE_GZIP";

/// What a window records and how its file is written. All off by default,
/// as in vLLM. Only the `torch` backend can record shapes, stacks, memory
/// and flops; other backends ignore those four.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProfileOptions {
    /// Record operator input shapes (`VLLM_TORCH_PROFILER_RECORD_SHAPES`).
    pub record_shapes: bool,
    /// Record call stacks (`VLLM_TORCH_PROFILER_WITH_STACK`).
    pub with_stack: bool,
    /// Record tensor memory (de)allocations (`VLLM_TORCH_PROFILER_WITH_PROFILE_MEMORY`).
    pub profile_memory: bool,
    /// Estimate FLOPs of matmuls and convolutions (`VLLM_TORCH_PROFILER_WITH_FLOPS`).
    pub with_flops: bool,
    /// Write `.json.gz` instead of `.json` (`VLLM_TORCH_PROFILER_USE_GZIP`).
    pub use_gzip: bool,
}

impl ProfileOptions {
    /// Reads the `VLLM_TORCH_PROFILER_*` variables. Unset or empty means
    /// off; `1`/`true`/`yes`/`on` and `0`/`false`/`no`/`off` (any case) are
    /// accepted; anything else is an error naming the variable and value.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// As [`ProfileOptions::from_env`], reading variables through `lookup`
    /// (for a config layer, or tests that must not touch the process env).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let flag = |var: &str| parse_flag(var, lookup(var));
        Ok(ProfileOptions {
            record_shapes: flag(RECORD_SHAPES_ENV)?,
            with_stack: flag(WITH_STACK_ENV)?,
            profile_memory: flag(WITH_PROFILE_MEMORY_ENV)?,
            with_flops: flag(WITH_FLOPS_ENV)?,
            use_gzip: flag(USE_GZIP_ENV)?,
        })
    }
}

fn parse_flag(var: &str, value: Option<String>) -> Result<bool> {
    let Some(value) = value else {
        return Ok(false);
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "0" | "false" | "no" | "off" => Ok(false),
        "1" | "true" | "yes" | "on" => Ok(true),
        _ => Err(Error::InvalidEnv {
            var: var.to_owned(),
            value,
            expected: "1/true/yes/on or 0/false/no/off",
        }),
    }
}

/// The root trace directory from `VLLM_TORCH_PROFILER_DIR`.
///
/// Unset or empty: [`Error::ProfilerDirUnset`] (profiling is off). Whether
/// the directory can be written is checked when a window starts, so that the
/// error names the stage directory actually used.
pub fn profiler_dir_from_env() -> Result<PathBuf> {
    profiler_dir_from(std::env::var_os(PROFILER_DIR_ENV).as_deref())
}

/// As [`profiler_dir_from_env`], from a value the caller read (a config
/// field, or a test that must not touch the process env).
pub fn profiler_dir_from(value: Option<&OsStr>) -> Result<PathBuf> {
    match value {
        Some(v) if !v.is_empty() => Ok(PathBuf::from(v)),
        _ => Err(Error::ProfilerDirUnset),
    }
}
