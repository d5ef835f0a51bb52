//! The tokenizer and chat template on arbitrary user text (Qwen2's BPE and
//! template, from the tiny checkpoint in the repository): encoding never
//! fails, decoding gives the text back, the streaming detokenizer agrees
//! with the whole decode, and a chat renders.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use omni_engine::Tokenizer;

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../omni-engine/tests/fixtures/qwen2_5_omni/tiny");
        Tokenizer::from_hf_dir(&dir).expect("the tiny checkpoint's tokenizer")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let tok = tokenizer();
    let ids = tok.encode(text, false).expect("any text encodes");
    let whole = tok.decode(&ids, false).expect("its own ids decode");
    let mut stream = tok.detokenizer(&[], false);
    let mut streamed = String::new();
    for &id in &ids {
        streamed.push_str(&stream.step(tok, id).expect("a step decodes"));
    }
    streamed.push_str(&stream.flush(tok).expect("the rest decodes"));
    assert_eq!(streamed, whole, "streamed and whole decodes differ");
    let messages = serde_json::json!([
        {"role": "system", "content": "You are a fuzzer."},
        {"role": "user", "content": text},
    ]);
    let _ = tok.apply_chat_template(messages.as_array().expect("array"), true);
});
