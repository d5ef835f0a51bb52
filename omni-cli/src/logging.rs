//! Logging: `RUST_LOG` through `EnvFilter`, to stderr, with a default that
//! shows Omni's own progress and everyone's warnings. Colours only when
//! stderr is a terminal: piped to a file or CI, logs are plain text.
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// What is logged when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "warn,omni_cli=info,omni_core=info";

/// Installs the global subscriber (once).
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
