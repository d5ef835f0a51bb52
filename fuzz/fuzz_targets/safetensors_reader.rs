//! A checkpoint folder whose `model.safetensors` is arbitrary bytes: the
//! loader refuses it with an error naming the file, or loads every tensor
//! it declares.
#![no_main]

use libfuzzer_sys::fuzz_target;
use omni_engine::{Device, Kind, SafetensorsFiles};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("model.safetensors"), data).expect("write");
    let Ok(files) = SafetensorsFiles::find(dir.path()) else {
        return;
    };
    if let Err(e) = files.load(Kind::Float, Device::Cpu) {
        assert!(e.to_string().contains("model.safetensors"), "{e}");
    }
});
