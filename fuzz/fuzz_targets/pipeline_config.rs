//! The pipeline file parser (YAML and JSON) on arbitrary text: an error
//! that names the field, or a config that passes its own validation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use omni_runtime::PipelineConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for parsed in [
        PipelineConfig::from_yaml_str(text, "fuzz.yaml", "fuzz"),
        PipelineConfig::from_json_str(text, "fuzz.json", "fuzz"),
    ] {
        match parsed {
            Ok(config) => {
                config.validate().expect("a parsed config is valid");
                for s in &config.stages {
                    s.to_json().expect("a parsed stage serializes");
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
});
