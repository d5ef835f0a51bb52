//! Choosing a backend by name: the built-in `torch`, `chrome` and `noop`,
//! plus any a program registers with [`register_backend`].
//!
//! Precedence, as [`backend_from_env`] applies it: the
//! `OMNI_PROFILER_BACKEND` environment variable, then the configured name
//! (a pipeline's or a stage's config field), then [`DEFAULT_BACKEND`].
use std::sync::{Arc, Mutex};

use crate::{ChromeProfiler, Error, NoopProfiler, Profiler, Result, TorchProfiler};

/// Environment variable that overrides the configured backend, in every
/// stage (e.g. `OMNI_PROFILER_BACKEND=chrome`).
pub const BACKEND_ENV: &str = "OMNI_PROFILER_BACKEND";

/// The backend used when neither the environment nor the config names one:
/// `torch`, as vLLM profiles with the PyTorch profiler.
pub const DEFAULT_BACKEND: &str = "torch";

/// The names of the built-in backends.
pub const BUILTIN_BACKENDS: &[&str] = &["torch", "chrome", "noop"];

/// Makes a fresh instance of a registered backend.
pub type BackendFactory = Arc<dyn Fn() -> Arc<dyn Profiler> + Send + Sync>;

static REGISTRY: Mutex<Vec<(String, BackendFactory)>> = Mutex::new(Vec::new());

/// Registers a backend of the program's own under `name`, so that
/// [`backend_by_name`] and [`backend_from_env`] (and so a stage config or
/// `OMNI_PROFILER_BACKEND`) can choose it. A later registration of the same
/// name replaces the earlier one; built-in names cannot be replaced.
pub fn register_backend(name: &str, factory: BackendFactory) -> Result<()> {
    let name = name.trim().to_ascii_lowercase();
    if name.is_empty() || BUILTIN_BACKENDS.contains(&name.as_str()) {
        return Err(Error::UnknownBackend {
            name: name.clone(),
            origin: "register_backend (empty or built-in name)".to_owned(),
            choices: "any other name".to_owned(),
        });
    }
    let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    registry.retain(|(n, _)| *n != name);
    registry.push((name, factory));
    Ok(())
}

fn choices() -> String {
    let registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    BUILTIN_BACKENDS
        .iter()
        .map(|s| (*s).to_owned())
        .chain(registry.iter().map(|(n, _)| n.clone()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn lookup(name: &str, origin: &str) -> Result<Arc<dyn Profiler>> {
    let key = name.trim().to_ascii_lowercase();
    match key.as_str() {
        "torch" => return Ok(Arc::new(TorchProfiler::new())),
        "chrome" => return Ok(Arc::new(ChromeProfiler::new())),
        "noop" => return Ok(Arc::new(NoopProfiler::new())),
        _ => {}
    }
    let factory = {
        let registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        registry
            .iter()
            .find(|(n, _)| *n == key)
            .map(|(_, f)| Arc::clone(f))
    };
    match factory {
        Some(factory) => Ok(factory()),
        None => Err(Error::UnknownBackend {
            name: name.to_owned(),
            origin: origin.to_owned(),
            choices: choices(),
        }),
    }
}

/// A new instance of the backend called `name` (case-insensitive):
/// `torch`, `chrome`, `noop`, or a registered one. Unknown names are an
/// error listing the choices.
pub fn backend_by_name(name: &str) -> Result<Arc<dyn Profiler>> {
    lookup(name, "backend name")
}

/// The backend for a stage: `OMNI_PROFILER_BACKEND` when set and not empty,
/// else `configured` (the stage's or pipeline's config field), else
/// [`DEFAULT_BACKEND`]. The error of an unknown name says which source held
/// it.
pub fn backend_from_env(configured: Option<&str>) -> Result<Arc<dyn Profiler>> {
    match std::env::var(BACKEND_ENV) {
        Ok(name) if !name.trim().is_empty() => {
            lookup(&name, &format!("environment variable {BACKEND_ENV}"))
        }
        _ => match configured {
            Some(name) if !name.trim().is_empty() => lookup(name, "profiler backend config field"),
            _ => lookup(DEFAULT_BACKEND, "default"),
        },
    }
}
