//! The built-in pipelines. The YAML files live in the repository's
//! `pipelines/` folder (so users can read and copy them) and are embedded
//! here, so a library user gets them without the repository.

/// Names of the built-in pipelines, in the order `omni pipelines` lists them.
pub(crate) const NAMES: &[&str] = &["default", "smollm2", "speak", "piper", "qwen2_5_omni"];

/// The YAML text of a built-in pipeline.
pub(crate) fn text(name: &str) -> Option<&'static str> {
    match name {
        "default" => Some(include_str!("../../pipelines/default.yaml")),
        "smollm2" => Some(include_str!("../../pipelines/smollm2.yaml")),
        "speak" => Some(include_str!("../../pipelines/speak.yaml")),
        "piper" => Some(include_str!("../../pipelines/piper.yaml")),
        "qwen2_5_omni" => Some(include_str!("../../pipelines/qwen2_5_omni.yaml")),
        _ => None,
    }
}
