//! The stage wire decoder on arbitrary frames: never a panic, never an
//! allocation the declared sizes did not pass the limits for; what it
//! accepts encodes again and decodes to the same message.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use omni_runtime::wire::{self, DecodeContext};

/// Frames as `[len: u16 LE][bytes]...`; the rest of the input is the last
/// frame (so a seed can be one JSON header with nothing before it).
fn frames(mut data: &[u8]) -> Vec<Bytes> {
    let mut out = Vec::new();
    while data.len() >= 2 && out.len() < 8 {
        let n = usize::from(u16::from_le_bytes([data[0], data[1]]));
        if n > data.len() - 2 {
            break;
        }
        out.push(Bytes::copy_from_slice(&data[2..2 + n]));
        data = &data[2 + n..];
    }
    out.push(Bytes::copy_from_slice(data));
    out
}

fuzz_target!(|data: &[u8]| {
    let ctx = DecodeContext::default();
    let Ok(env) = wire::decode(frames(data), &ctx) else {
        return;
    };
    let again = wire::encode(&env, None).expect("an accepted message encodes again");
    let first = format!("{:?}", env.message);
    match wire::decode(again, &ctx) {
        Ok(back) => assert_eq!(
            format!("{:?}", back.message),
            first,
            "the message changed on a round trip"
        ),
        // A number past f32's range reads as infinity, which JSON cannot
        // write back (it becomes null); sampling-param validation refuses
        // such values before any use. Nothing else may fail to come back.
        Err(r) => assert!(
            first.contains("inf") || first.contains("NaN"),
            "a re-encoded message does not decode: {}",
            r.error
        ),
    }
});
