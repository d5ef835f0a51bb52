//! A real worker fed garbage on its input socket answers every message with
//! a protocol error, counts them, and still serves the next valid request;
//! a peer without the run's token is not heard at all.

mod runtime_support;

use std::time::Duration;

use bytes::Bytes;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use omni_engine::Prompt;
use omni_runtime::wire::{self, DecodeContext, Message};
use omni_runtime::{Orchestrator, PipelineConfig, StageEvent};
use runtime_support::{greedy, options, TestResult};

fn msg(frames: Vec<Bytes>) -> Result<ZmqMessage, String> {
    ZmqMessage::try_from(frames).map_err(|e| e.to_string())
}

fn garbage() -> Vec<Vec<Bytes>> {
    let b = |s: &'static [u8]| Bytes::from_static(s);
    vec![
        vec![b(b"\x00\x01\x02 not json at all")],
        vec![b(b"{\"v\": 1, \"type\": \"teleport\"}")],
        vec![b(b"{\"v\": 999, \"type\": \"health\", \"body\": {\"seq\": 5}}")],
        vec![b(b"{\"v\": 1, \"type\": \"stage_input\", \"body\": {\"request_id\": 3}}")],
        vec![
            b(br#"{"v": 1, "type": "health", "body": {"seq": 6}, "tensors": [{"name": "x", "dtype": "f32", "shape": [1000000000, 1000000000], "nbytes": 4}]}"#),
            b(b"abcd"),
        ],
        vec![b(br#"{"v": 1, "type": "health", "body": {"seq": 7}, "tensors": [{"name": "x", "dtype": "u8", "shape": [8], "nbytes": 8}]}"#)],
        // Valid, but not something a stage's input socket takes.
        wire::encode_message(Message::Shutdown).unwrap_or_default(),
    ]
}

/// Runs one greedy request of `max_tokens` through the pipeline and checks
/// that it finishes with text.
async fn serves_a_request(orch: &Orchestrator, id: &str, max_tokens: usize) -> TestResult {
    let mut rx = orch
        .submit(
            id.into(),
            Prompt::Text("One plus one is".into()),
            greedy(orch.config(), &[max_tokens]),
        )
        .await?;
    let mut text = None;
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(ev) = rx.recv().await {
            match ev {
                StageEvent::Output { output, .. } if output.finished => text = Some(output.text),
                StageEvent::Error(e) => return Err(e),
                _ => {}
            }
        }
        Ok(())
    })
    .await??;
    assert!(text.is_some_and(|t| !t.is_empty()), "{id}: no text");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_error_replies_and_the_worker_keeps_serving() -> TestResult {
    let config = PipelineConfig::builtin("smollm2")?;
    let orch = Orchestrator::start(config, options()).await?;
    let address = orch.stages()[0].input_address.clone();
    let mut sock = peer(Some(orch.peer_identity("garbage-test")))?;
    sock.connect(&address).await?;
    let ctx = DecodeContext::default();
    let bad = garbage();
    for (i, frames) in bad.iter().enumerate() {
        sock.send(msg(frames.clone())?).await?;
        let reply = tokio::time::timeout(Duration::from_secs(30), sock.recv()).await??;
        let env = wire::decode(reply.into_vec(), &ctx).map_err(|r| r.error)?;
        match env.message {
            Message::ProtocolError {
                stage_id: 0,
                reason,
                seq,
            } => {
                assert!(!reason.is_empty(), "garbage #{i}");
                if i == 2 {
                    assert_eq!(seq, Some(5), "the reply carries the rejected seq");
                    assert!(reason.contains("999"), "{reason}");
                }
            }
            other => return Err(format!("garbage #{i} answered with {}", other.type_name()).into()),
        }
    }
    // The worker counted them, and answers health on the same socket.
    sock.send(msg(wire::encode_message(Message::Health { seq: 77 })?)?)
        .await?;
    let reply = tokio::time::timeout(Duration::from_secs(30), sock.recv()).await??;
    match wire::decode(reply.into_vec(), &ctx)
        .map_err(|r| r.error)?
        .message
    {
        Message::HealthReply(h) => {
            assert_eq!(h.seq, 77);
            assert_eq!(h.rejected_messages, bad.len() as u64);
        }
        other => return Err(format!("health answered with {}", other.type_name()).into()),
    }

    // And it still serves a valid request.
    serves_a_request(&orch, "after-garbage", 6).await?;
    let pid = orch.stages()[0].pid;
    assert!(runtime_support::pid_alive(pid));
    tokio::time::timeout(Duration::from_secs(60), orch.shutdown()).await??;
    Ok(())
}

/// A DEALER presenting `identity` (none: the socket's random one).
fn peer(
    identity: Option<String>,
) -> Result<DealerSocket, Box<dyn std::error::Error + Send + Sync>> {
    let mut o = zeromq::SocketOptions::default();
    if let Some(id) = identity {
        o.peer_identity(id.parse()?);
    }
    Ok(DealerSocket::with_options(o))
}

/// Whether a health request sent on `sock` is answered within `wait`.
async fn answers_health(
    sock: &mut DealerSocket,
    seq: u64,
    wait: Duration,
) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    sock.send(msg(wire::encode_message(Message::Health { seq })?)?)
        .await?;
    match tokio::time::timeout(wait, sock.recv()).await {
        Err(_) => Ok(false),
        Ok(reply) => {
            let env =
                wire::decode(reply?.into_vec(), &DecodeContext::default()).map_err(|r| r.error)?;
            match env.message {
                Message::HealthReply(h) if h.seq == seq => Ok(true),
                other => Err(format!("health answered with {}", other.type_name()).into()),
            }
        }
    }
}

/// Over `tcp://`, where anyone who reaches a port can connect: peers that
/// do not present the run's token are not heard, by a stage's input socket
/// (no answer, nothing counted) nor by the orchestrator (a forged error
/// for a request in flight changes nothing), while a peer with the token
/// is answered and obeyed, so the refusals are the token's doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_the_run_token_are_not_heard() -> TestResult {
    let mut config = PipelineConfig::builtin("smollm2")?;
    config.runtime.transport = omni_runtime::TransportKind::Tcp;
    let orch = Orchestrator::start(config, options()).await?;
    let input = orch.stages()[0].input_address.clone();
    let quiet = Duration::from_secs(2);
    for (who, identity) in [
        ("no identity", None),
        (
            "the identity stages had before tokens",
            Some("stage-0".to_owned()),
        ),
        ("a wrong token", Some(format!("{}.x", "0".repeat(32)))),
    ] {
        let mut sock = peer(identity)?;
        sock.connect(&input).await?;
        sock.send(msg(garbage()[0].clone())?).await?;
        assert!(
            !answers_health(&mut sock, 1, quiet).await?,
            "a peer with {who} was answered"
        );
    }
    let mut trusted = peer(Some(orch.peer_identity("token-test")))?;
    trusted.connect(&input).await?;
    assert!(answers_health(&mut trusted, 2, Duration::from_secs(30)).await?);
    let h = orch.health(0).await?;
    assert_eq!(h.rejected_messages, 0, "a foreign peer's garbage was read");

    // The orchestrator's socket: a forged error for each request in flight.
    let spec = omni_runtime::LaunchSpec::read(&orch.run_dir().join("stage-0.json"))?;
    let forge = |request_id: String| {
        wire::encode_message(Message::RequestError {
            request_id,
            stage_id: 0,
            message: "forged".into(),
            rejected: false,
        })
    };
    let victim = |id: &'static str| {
        orch.submit(
            id.into(),
            omni_engine::Prompt::Text("One plus one is".into()),
            greedy(orch.config(), &[64]),
        )
    };
    let mut foreign = peer(Some("stage-0".to_owned()))?;
    foreign.connect(&spec.orchestrator_address).await?;
    let mut rx = victim("victim").await?;
    for n in 0..4 {
        foreign.send(msg(forge(format!("victim#{n}"))?)?).await?;
    }
    let mut finished = false;
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(ev) = rx.recv().await {
            match ev {
                StageEvent::Output { output, .. } => finished |= output.finished,
                StageEvent::Error(e) => return Err(e),
                _ => {}
            }
        }
        Ok(())
    })
    .await??;
    assert!(finished, "the request did not finish");
    let mut forger = peer(Some(orch.peer_identity("forger")))?;
    forger.connect(&spec.orchestrator_address).await?;
    let mut rx = victim("victim-2").await?;
    for n in 0..8 {
        forger.send(msg(forge(format!("victim-2#{n}"))?)?).await?;
    }
    let mut forged = false;
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(ev) = rx.recv().await {
            if let StageEvent::Error(e) = ev {
                forged = e.to_string().contains("forged");
            }
        }
    })
    .await?;
    assert!(
        forged,
        "a peer with the token was not heard: the test proves nothing"
    );
    tokio::time::timeout(Duration::from_secs(60), orch.shutdown()).await??;
    Ok(())
}

/// A ZMTP 3.0 greeting (NULL mechanism, not as-server) and a READY command
/// announcing a DEALER: what a real peer sends before its first message.
fn zmtp_handshake() -> Vec<u8> {
    let mut g = vec![0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3; // version 3.0
    g[12..16].copy_from_slice(b"NULL");
    let mut body = Vec::new();
    body.push(5u8);
    body.extend_from_slice(b"READY");
    body.push(11u8);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&6u32.to_be_bytes());
    body.extend_from_slice(b"DEALER");
    g.push(0x04); // command, short frame
    g.push(body.len() as u8);
    g.extend_from_slice(&body);
    g
}

/// On `tcp://` anyone who reaches the port can send a frame header. One
/// that announces a 2^40-byte message must cost the worker nothing: its
/// socket refuses the frame before reserving memory for it (without the cap
/// the worker aborts on the failed allocation), drops that peer, and goes
/// on serving everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_frame_header_on_tcp_is_refused_and_the_worker_keeps_serving() -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut config = PipelineConfig::builtin("smollm2")?;
    config.runtime.transport = omni_runtime::TransportKind::Tcp;
    let orch = Orchestrator::start(config, options()).await?;
    let address = orch.stages()[0].input_address.clone();
    let host_port = address
        .strip_prefix("tcp://")
        .ok_or_else(|| format!("stage input {address:?} is not tcp://"))?;
    // The stage serves on the socket the orchestrator bound when it chose
    // the port: inherited (its launch spec names the descriptor), never let
    // go of for another process to take in between.
    let pid = orch.stages()[0].pid;
    let spec = omni_runtime::LaunchSpec::read(&orch.run_dir().join("stage-0.json"))?;
    let fd = spec
        .input_listener_fd
        .ok_or("the launch spec names no inherited listener")?;
    let held = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))?;
    let port: u16 = host_port.rsplit(':').next().unwrap_or("").parse()?;
    let listening = listening_socket(port)?;
    assert_eq!(
        held.to_string_lossy(),
        format!("socket:[{listening}]"),
        "the worker's descriptor {fd} is not the socket listening on port {port}"
    );
    let mut raw = tokio::net::TcpStream::connect(host_port).await?;
    let mut frames = zmtp_handshake();
    frames.push(0x02); // a message frame, long length, last
    frames.extend_from_slice(&(1u64 << 40).to_be_bytes());
    frames.extend_from_slice(b"only the start of a terabyte");
    raw.write_all(&frames).await?;
    // The worker hangs up on this peer: the read ends (after its greeting
    // and READY) instead of waiting for the rest of the terabyte.
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), raw.read_to_end(&mut sink))
        .await?
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::ConnectionReset => Ok(0),
            _ => Err(e),
        })?;

    assert!(runtime_support::pid_alive(pid), "the worker died");
    serves_a_request(&orch, "after-huge-frame", 4).await?;
    tokio::time::timeout(Duration::from_secs(60), orch.shutdown()).await??;
    Ok(())
}

/// The inode of the socket listening on `port` (from `/proc/net/tcp{,6}`).
fn listening_socket(port: u16) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    const LISTEN: &str = "0A";
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)?.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && cols.get(3) == Some(&LISTEN) {
                return Ok(cols.get(9).ok_or("short line")?.parse()?);
            }
        }
    }
    Err(format!("nothing listens on port {port}").into())
}
