//! The wire decoder against hostile input (property tests), and the round
//! trip of every message shape, inline and through shared memory.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::json;

use omni_runtime::shm::ShmWriter;
use omni_runtime::wire::{
    self, AckMsg, DecodeContext, Envelope, Limits, Message, OutputMsg, PROTOCOL_VERSION,
};
use omni_runtime::{DType, HostTensor};

fn ctx(dir: Option<&std::path::Path>) -> DecodeContext {
    DecodeContext {
        shm_dir: dir.map(|d| d.to_path_buf()),
        limits: Limits::default(),
        slots: Default::default(),
    }
}

fn header(v: serde_json::Value) -> Bytes {
    Bytes::from(v.to_string())
}

fn f32_tensor(values: &[f32], shape: Vec<usize>) -> HostTensor {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    HostTensor::new(DType::F32, shape, Bytes::from(bytes)).expect("consistent tensor")
}

fn reason(frames: Vec<Bytes>) -> String {
    match wire::decode(frames, &ctx(None)) {
        Ok(e) => panic!("decoded garbage into {:?}", e.message.type_name()),
        Err(r) => r.error,
    }
}

#[test]
fn rejects_each_kind_of_bad_message_with_a_reason() {
    assert!(reason(vec![]).contains("empty"));
    assert!(reason(vec![Bytes::from_static(b"\xff\x00garbage")]).contains("not JSON"));
    assert!(reason(vec![header(json!([1, 2]))]).contains("JSON object"));
    assert!(
        reason(vec![header(json!({"type": "health", "body": {"seq": 1}}))])
            .contains("protocol version")
    );
    assert!(reason(vec![header(
        json!({"v": 99, "type": "health", "body": {"seq": 1}})
    )])
    .contains("unsupported protocol version 99"));
    assert!(reason(vec![header(json!({"v": 1, "type": "teleport"}))])
        .contains("unknown message type \"teleport\""));
    let r = reason(vec![header(
        json!({"v": 1, "type": "health", "body": {"seq": "one"}}),
    )]);
    assert!(r.contains("seq") && r.contains("health"), "{r}");
    // A tensor that declares more bytes than its shape needs.
    let r = reason(vec![
        header(json!({"v": 1, "type": "health", "body": {"seq": 1},
                      "tensors": [{"name": "x", "dtype": "f32", "shape": [2], "nbytes": 12}]})),
        Bytes::from(vec![0u8; 12]),
    ]);
    assert!(r.contains("need 8"), "{r}");
    // A frame shorter than declared.
    let r = reason(vec![
        header(json!({"v": 1, "type": "health", "body": {"seq": 1},
                      "tensors": [{"name": "x", "dtype": "f32", "shape": [2], "nbytes": 8}]})),
        Bytes::from(vec![0u8; 4]),
    ]);
    assert!(r.contains("its frame has 4"), "{r}");
    // A shape whose byte size overflows.
    let r = reason(vec![header(
        json!({"v": 1, "type": "health", "body": {"seq": 1},
        "tensors": [{"name": "x", "dtype": "f64", "shape": [u64::MAX / 2, 4], "nbytes": 0}]}),
    )]);
    assert!(r.contains("overflow"), "{r}");
    // Oversized: declared beyond the cap.
    let r = reason(vec![header(
        json!({"v": 1, "type": "health", "body": {"seq": 1},
        "tensors": [{"name": "x", "dtype": "u8", "shape": [1u64 << 40], "nbytes": 1u64 << 40}]}),
    )]);
    assert!(r.contains("exceeds the limit"), "{r}");
    // Extra frames.
    let r = reason(vec![
        header(json!({"v": 1, "type": "shutdown"})),
        Bytes::from_static(b"x"),
    ]);
    assert!(r.contains("frames after the header"), "{r}");
    // Shared memory where none is allowed, and a path-escaping handle.
    let r = reason(vec![header(
        json!({"v": 1, "type": "health", "body": {"seq": 1},
        "tensors": [{"name": "x", "dtype": "u8", "shape": [4], "nbytes": 4, "shm": {"name": "a", "len": 4}}]}),
    )]);
    assert!(r.contains("shared memory"), "{r}");
    let dir = tempfile::tempdir().expect("tempdir");
    let escaping = vec![header(json!({"v": 1, "type": "health", "body": {"seq": 1},
        "tensors": [{"name": "x", "dtype": "u8", "shape": [4], "nbytes": 4, "shm": {"name": "../etc/passwd", "len": 4}}]}))];
    let r = wire::decode(escaping, &ctx(Some(dir.path())))
        .err()
        .map(|r| r.error)
        .unwrap_or_default();
    assert!(r.contains("not a plain segment file name"), "{r}");
    // Oversized header.
    let big = format!(
        "{{\"v\":1,\"type\":\"shutdown\",\"pad\":\"{}\"}}",
        "x".repeat(Limits::default().max_header_bytes)
    );
    assert!(reason(vec![Bytes::from(big)]).contains("exceeds the limit"));
}

#[test]
fn rejection_keeps_the_seq_for_the_reply() {
    let r = wire::decode(
        vec![header(
            json!({"v": 7, "type": "stop_profile", "body": {"seq": 42}}),
        )],
        &ctx(None),
    )
    .expect_err("version 7 is rejected");
    assert_eq!(r.seq, Some(42));
}

#[test]
fn round_trip_inline_and_shared_memory() -> Result<(), omni_runtime::Error> {
    let dir = tempfile::tempdir().map_err(|e| omni_runtime::Error::Wire(e.to_string()))?;
    // Pool off: every big tensor gets a one-shot segment (pooled slots are
    // covered below).
    let writer = ShmWriter::new(dir.path(), "t", 64).with_pool_bytes(0);
    let small = f32_tensor(&[1.0, 2.0, 3.0], vec![3]);
    let big_vals: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let big = f32_tensor(&big_vals, vec![10, 100]);
    let env = Envelope {
        message: Message::Output(OutputMsg {
            request_id: "r1".into(),
            stage_id: 1,
            delta_text: "héllo".into(),
            delta_token_ids: vec![1, 2, 3],
            finished: true,
            finish_reason: None,
            stop_reason: Some(omni_engine::StopReason::Text("é".into())),
            delta_logprobs: Some(vec![omni_engine::TokenLogprobs {
                token_id: 2,
                logprob: -9999.0,
                top: vec![(2, -9999.0), (3, -0.5)],
                decoded: vec!["b".into(), "b".into(), "c".into()],
            }]),
            prompt_logprobs: None,
            metrics: None,
        }),
        tensors: vec![
            ("small".into(), small.clone()),
            ("hidden_states".into(), big.clone()),
        ],
    };
    let frames = wire::encode(&env, Some(&writer))?;
    // The small tensor rides inline, the big one only as a handle.
    assert_eq!(frames.len(), 2);
    assert_eq!(
        std::fs::read_dir(dir.path())
            .map(|d| d.count())
            .unwrap_or(0),
        1
    );
    let back = wire::decode(frames, &ctx(Some(dir.path())))
        .map_err(|r| omni_runtime::Error::Wire(r.error))?;
    assert_eq!(back.tensor("small"), Some(&small));
    assert_eq!(back.tensor("hidden_states"), Some(&big));
    match back.message {
        Message::Output(o) => {
            assert_eq!(o.request_id, "r1");
            assert_eq!(o.delta_text, "héllo");
            assert_eq!(o.delta_token_ids, vec![1, 2, 3]);
        }
        other => panic!("got {}", other.type_name()),
    }
    // The receiver removed the segment once mapped.
    assert_eq!(
        std::fs::read_dir(dir.path())
            .map(|d| d.count())
            .unwrap_or(99),
        0
    );
    // And the tensor survives the trip through libtorch.
    let t = big.to_tch()?;
    assert_eq!(HostTensor::from_tch(&t)?, big);

    // With the pool (the default), the same envelope goes through a slot,
    // twice: the second message reuses the slot the first one freed.
    let pooled = ShmWriter::new(dir.path(), "p", 64);
    for _ in 0..2 {
        let frames = wire::encode(&env, Some(&pooled))?;
        let back = wire::decode(frames, &ctx(Some(dir.path())))
            .map_err(|r| omni_runtime::Error::Wire(r.error))?;
        assert_eq!(back.tensor("hidden_states"), Some(&big));
    }
    assert_eq!(
        std::fs::read_dir(dir.path())
            .map(|d| d.count())
            .unwrap_or(99),
        1,
        "one slot serves both messages"
    );
    Ok(())
}

#[test]
fn protocol_version_is_in_every_header() -> Result<(), omni_runtime::Error> {
    let frames = wire::encode_message(Message::Ack(AckMsg {
        seq: 3,
        stage_id: 0,
        error: None,
        files: vec![],
    }))?;
    let v: serde_json::Value =
        serde_json::from_slice(&frames[0]).map_err(|e| omni_runtime::Error::Wire(e.to_string()))?;
    assert_eq!(v["v"], json!(PROTOCOL_VERSION));
    assert_eq!(v["type"], json!("ack"));
    Ok(())
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        "[a-z_]{0,12}".prop_map(serde_json::Value::from),
        prop::sample::select(wire::MESSAGE_TYPES.to_vec()).prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "v",
                    "type",
                    "body",
                    "tensors",
                    "seq",
                    "name",
                    "dtype",
                    "shape",
                    "nbytes",
                    "shm",
                    "len",
                    "request_id"
                ])
                .prop_map(String::from),
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary bytes in any number of frames: an error, never a panic.
    #[test]
    fn random_frames_never_panic(frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..256), 0..5)) {
        let frames: Vec<Bytes> = frames.into_iter().map(Bytes::from).collect();
        let _ = wire::decode(frames, &ctx(None));
    }

    /// Structured-looking JSON headers with protocol words in them: decode or
    /// reject, never panic, and a decoded message re-encodes.
    #[test]
    fn random_headers_never_panic(v in arb_json(), extra in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..3)) {
        let mut frames = vec![Bytes::from(v.to_string())];
        frames.extend(extra.into_iter().map(Bytes::from));
        if let Ok(env) = wire::decode(frames, &ctx(None)) {
            prop_assert!(wire::encode(&env, None).is_ok());
        }
    }

    /// Valid envelopes with random tensors survive the round trip exactly;
    /// a flipped byte in the header is decoded or rejected, never a panic.
    #[test]
    fn tensors_round_trip(
        shape in prop::collection::vec(0usize..6, 0..4),
        dtype in prop::sample::select(vec![DType::U8, DType::I32, DType::I64, DType::F16, DType::Bf16, DType::F32, DType::F64, DType::Bool]),
        seq in any::<u64>(),
        flip in any::<prop::sample::Index>(),
    ) {
        let n: usize = shape.iter().product::<usize>() * dtype.size();
        let data: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        let t = HostTensor::new(dtype, shape, Bytes::from(data)).expect("consistent");
        let env = Envelope { message: Message::Health { seq }, tensors: vec![("t".into(), t.clone())] };
        let frames = wire::encode(&env, None).expect("encodes");
        let back = wire::decode(frames.clone(), &ctx(None)).expect("decodes");
        prop_assert_eq!(back.tensor("t"), Some(&t));
        let mut head = frames[0].to_vec();
        let i = flip.index(head.len());
        head[i] ^= 0x5a;
        let mut bad = frames;
        bad[0] = Bytes::from(head);
        let _ = wire::decode(bad, &ctx(None));
    }
}
