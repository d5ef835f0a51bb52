//! The wire fuzzer's seed corpus (`fuzz/seeds/wire_decode`) is what the
//! encoder makes of representative messages, in the fuzz target's framing
//! (`[len: u16 LE][frame]...` then the last frame). This test keeps the
//! seeds in step with the format: it fails when they differ from what the
//! encoder makes now; `OMNI_WRITE_FUZZ_SEEDS=1` rewrites them.

use std::path::PathBuf;

use bytes::Bytes;
use omni_engine::{Prompt, SamplingParams};
use omni_runtime::wire::{
    self, DecodeContext, Envelope, GenerateMsg, Message, StageInputMsg, StreamPiece, UpstreamOutput,
};
use omni_runtime::{DType, HostTensor};

fn seeds() -> Vec<(&'static str, Envelope)> {
    let plain = |message| Envelope {
        message,
        tensors: Vec::new(),
    };
    let states: Vec<u8> = (0..2 * 4 * 4).map(|i| i as u8).collect();
    let hidden =
        HostTensor::new(DType::F32, vec![2, 4], Bytes::from(states)).expect("a 2x4 f32 tensor");
    vec![
        ("health", plain(Message::Health { seq: 7 })),
        (
            "generate",
            plain(Message::Generate(GenerateMsg {
                request_id: "req-1#0".into(),
                prompt: Prompt::Text("Hello there".into()),
                sampling_params: vec![SamplingParams::default(), SamplingParams::greedy()],
            })),
        ),
        (
            "abort",
            plain(Message::Abort {
                request_ids: vec!["a#1".into(), "b#2".into()],
            }),
        ),
        (
            "stage_input_with_states",
            Envelope {
                message: Message::StageInput(StageInputMsg {
                    request_id: "req-2#1".into(),
                    prompt: Prompt::TokenIds(vec![1, 2, 3]),
                    sampling_params: vec![SamplingParams::default(); 3],
                    output: UpstreamOutput {
                        stage_id: 0,
                        text: "Hi".into(),
                        token_ids: vec![4, 5],
                        finish_reason: None,
                    },
                    piece: Some(StreamPiece {
                        index: 0,
                        last: false,
                    }),
                }),
                tensors: vec![("hidden_states".into(), hidden)],
            },
        ),
    ]
}

/// The fuzz target's framing of `frames`.
fn framed(frames: &[Bytes]) -> Vec<u8> {
    let mut out = Vec::new();
    let (last, rest) = frames.split_last().expect("a message has a frame");
    for f in rest {
        let n = u16::try_from(f.len()).expect("seed frames are small");
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(f);
    }
    out.extend_from_slice(last);
    out
}

#[test]
fn the_wire_fuzz_seeds_are_current() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/wire_decode");
    let write = std::env::var_os("OMNI_WRITE_FUZZ_SEEDS").is_some();
    if write {
        std::fs::create_dir_all(&dir)?;
    }
    for (name, env) in seeds() {
        let frames = wire::encode(&env, None)?;
        // Each seed decodes as it is.
        let back = wire::decode(frames.clone(), &DecodeContext::default()).map_err(|r| r.error)?;
        assert_eq!(back.message.type_name(), env.message.type_name());
        let bytes = framed(&frames);
        let path = dir.join(name);
        if write {
            std::fs::write(&path, &bytes)?;
        } else {
            let on_disk = std::fs::read(&path).map_err(|e| {
                format!(
                    "{}: {e} (OMNI_WRITE_FUZZ_SEEDS=1 writes it)",
                    path.display()
                )
            })?;
            assert!(
                on_disk == bytes,
                "{} is stale: run this test with OMNI_WRITE_FUZZ_SEEDS=1",
                path.display()
            );
        }
    }
    Ok(())
}
