//! Where traces go: `<root>/stage_<id>_<safe model name>/`, and how a model
//! name is made safe to be one path component.
use std::path::{Path, PathBuf};

/// Longest path component we produce; file systems allow 255 bytes, and the
/// `stage_<id>_` prefix and the trace file names need room too.
const MAX_COMPONENT: usize = 96;

/// The directory of stage `stage_id`'s traces: `root/stage_<id>_<name>`,
/// where `<name>` is [`safe_path_component`] of `model_name`. Always a
/// direct child of `root`, whatever `model_name` holds (`org/model`,
/// `../x`, an empty or a very long name).
pub fn stage_trace_dir(root: &Path, stage_id: usize, model_name: &str) -> PathBuf {
    root.join(format!(
        "stage_{stage_id}_{}",
        safe_path_component(model_name)
    ))
}

/// `name` as one safe path component: ASCII letters, digits, `-`, `_` and
/// `.` are kept, every other character (path separators included) becomes
/// `_`; leading dots are replaced (no `.`, `..` or hidden names); empty
/// becomes `model`; a name longer than 96 bytes is cut and suffixed with a
/// hash of the whole name, so distinct long names stay distinct.
///
/// `HuggingFaceTB/SmolLM2-135M-Instruct` -> `HuggingFaceTB_SmolLM2-135M-Instruct`,
/// `../x` -> `__x`.
pub fn safe_path_component(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let leading_dots = out.len() - out.trim_start_matches('.').len();
    if leading_dots > 0 {
        out.replace_range(..leading_dots, &"_".repeat(leading_dots));
    }
    if out.is_empty() {
        out.push_str("model");
    }
    if out.len() > MAX_COMPONENT {
        let hash = fnv1a(name.as_bytes());
        // Only ASCII is left, so any byte index is a char boundary.
        out.truncate(MAX_COMPONENT - 17);
        out.push_str(&format!("-{hash:016x}"));
    }
    out
}

/// FNV-1a, 64 bit: stable across builds and platforms (std's hasher is not
/// guaranteed to be), and plenty to tell long names apart.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Who wrote a trace, as PyTorch's `tensorboard_trace_handler` names its
/// files (`<host>_<pid>`), made path safe.
pub(crate) fn worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned());
    safe_path_component(&format!("{host}_{}", std::process::id()))
}
