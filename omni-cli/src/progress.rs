//! A spinner on stderr while a pipeline starts (stage processes spawn and
//! load their models: seconds). Hidden when stderr is not a terminal.
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Shows a spinner with `message` until the returned bar is finished.
pub fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
        bar.set_style(style);
    }
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Runs `f` under a spinner; the bar ends with `done` or is cleared on error.
pub fn with_spinner<T, E>(
    message: String,
    done: impl FnOnce(&T) -> String,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let bar = spinner(message);
    let result = f();
    match &result {
        Ok(v) => bar.finish_with_message(done(v)),
        Err(_) => bar.finish_and_clear(),
    }
    result
}

/// A bar of `len` steps with `message`, for long work of known length.
pub fn bar(len: u64, message: String) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}]") {
        bar.set_style(style);
    }
    bar.set_message(message);
    bar
}
