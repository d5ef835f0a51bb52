//! The GGUF reader on arbitrary bytes: header, metadata and tensor table,
//! then what the engine reads from them (model config, tokenizer).
#![no_main]

use libfuzzer_sys::fuzz_target;
use omni_engine::{GgufFile, Tokenizer};

fuzz_target!(|data: &[u8]| {
    let Ok(gguf) = GgufFile::from_bytes(data.to_vec(), "fuzz.gguf") else {
        return;
    };
    for t in gguf.tensors() {
        let _ = t.shape();
        let _ = t.num_elements();
    }
    let _ = gguf.architecture();
    let _ = gguf.model_config();
    let _ = Tokenizer::from_gguf(&gguf);
});
