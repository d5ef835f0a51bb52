//! Inter-stage transfer of tensor payloads, 1 KB to 64 MB, side by side in
//! one run: a plain `memcpy` of the same bytes (the limit), the wire format
//! over ZeroMQ `ipc://` and `tcp://` loopback (tensor bytes in frames), the
//! `ipc://` path with shared memory above 64 KiB (what stages on one host
//! use), and a Python `multiprocessing.Queue` pickle transfer (how
//! vLLM-Omni first moved data between stages).
//!
//! ```text
//! cargo bench -p omni-runtime --bench transport            # prints a markdown table
//! OMNI_BENCH_PYTHON=python3 cargo bench -p omni-runtime --bench transport
//! ```
//!
//! Throughput: one sender streams N messages of one tensor to one receiver
//! that decodes each and reads its bytes; time from the first send to the
//! last decode, on a second stream after an untimed first one (the steady
//! state of a long-running stage). Latency: ping-pong of one message (the
//! receiver echoes a tiny ack), median one-way time (half the round trip).

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use zeromq::{DealerSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use omni_runtime::shm::ShmWriter;
use omni_runtime::wire::{self, DecodeContext, Envelope, Message};
use omni_runtime::{DType, HostTensor};

const SIZES: &[usize] = &[1 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20];

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Ipc,
    Tcp,
    IpcShm,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Ipc => "zmq ipc:// (frames)",
            Mode::Tcp => "zmq tcp:// loopback",
            Mode::IpcShm => "ipc:// + shm > 64 KiB",
        }
    }
}

fn count_for(size: usize) -> usize {
    // About 256 MiB per measurement, at least 8 messages, at most 2000.
    ((256usize << 20) / size).clamp(8, 2000)
}

fn human(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{} MB", size >> 20)
    } else {
        format!("{} KB", size >> 10)
    }
}

/// Reads every page of the payload, as a consumer would.
fn touch(data: &[u8]) -> u64 {
    data.iter().step_by(4096).map(|&b| b as u64).sum::<u64>()
        + data.last().copied().unwrap_or(0) as u64
}

fn memcpy_gbps(size: usize) -> f64 {
    let src = vec![7u8; size];
    let mut dst = vec![0u8; size];
    let n = count_for(size);
    dst.copy_from_slice(&src);
    let t = Instant::now();
    for _ in 0..n {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    }
    (size * n) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn envelope(size: usize) -> Envelope {
    let data = Bytes::from(vec![3u8; size]);
    let t = HostTensor::new(DType::U8, vec![size], data).expect("consistent tensor");
    Envelope {
        message: Message::Health { seq: 0 },
        tensors: vec![("payload".into(), t)],
    }
}

struct Pair {
    tx: DealerSocket,
    rx: RouterSocket,
    shm: Option<ShmWriter>,
    ctx: DecodeContext,
    _dir: tempfile::TempDir,
}

async fn pair(mode: Mode) -> Pair {
    let dir = tempfile::tempdir_in(if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    })
    .expect("temp dir");
    let mut rx = RouterSocket::new();
    let addr = match mode {
        Mode::Tcp => "tcp://127.0.0.1:0".to_string(),
        _ => format!("ipc://{}/b.sock", dir.path().display()),
    };
    let ep = rx.bind(&addr).await.expect("bind").to_string();
    let mut tx = DealerSocket::new();
    tx.connect(&ep).await.expect("connect");
    let shm = (mode == Mode::IpcShm).then(|| ShmWriter::new(dir.path(), "bench", 64 << 10));
    let ctx = DecodeContext {
        shm_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    Pair {
        tx,
        rx,
        shm,
        ctx,
        _dir: dir,
    }
}

async fn send_stream(tx: &mut DealerSocket, env: &Envelope, shm: Option<&ShmWriter>, n: usize) {
    for _ in 0..n {
        let frames = wire::encode(env, shm).expect("encode");
        tx.send(ZmqMessage::try_from(frames).expect("frames"))
            .await
            .expect("send");
    }
}

/// GB/s of N one-way messages.
async fn throughput(mode: Mode, size: usize) -> f64 {
    let Pair {
        mut tx,
        mut rx,
        shm,
        ctx,
        _dir,
    } = pair(mode).await;
    let n = count_for(size);
    let env = envelope(size);
    // The same stream twice, the second one timed: a long-running stage is
    // in the steady state (socket buffers grown, shared-memory slots
    // faulted in), not paying first-use costs on every message.
    let (warm_tx, warm_rx) = tokio::sync::oneshot::channel();
    let recv = tokio::spawn(async move {
        let mut total = 0u64;
        let mut warm_tx = Some(warm_tx);
        for i in 0..2 * n {
            if i == n {
                if let Some(w) = warm_tx.take() {
                    let _ = w.send(());
                }
            }
            let mut frames = rx.recv().await.expect("recv").into_vec();
            frames.remove(0); // identity
            let e = wire::decode(frames, &ctx).expect("decode");
            total += touch(&e.tensors[0].1.data);
        }
        total
    });
    send_stream(&mut tx, &env, shm.as_ref(), n).await;
    warm_rx.await.expect("warm-up");
    let t = Instant::now();
    send_stream(&mut tx, &env, shm.as_ref(), n).await;
    black_box(recv.await.expect("receiver"));
    (size * n) as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Median one-way latency in microseconds (half a round trip).
async fn latency(mode: Mode, size: usize) -> f64 {
    let Pair {
        mut tx,
        mut rx,
        shm,
        ctx,
        _dir,
    } = pair(mode).await;
    let iters = if size >= 16 << 20 { 8 } else { 50 };
    let env = envelope(size);
    let echo = tokio::spawn(async move {
        for _ in 0..iters {
            let mut frames = rx.recv().await.expect("recv").into_vec();
            let id = frames.remove(0);
            let e = wire::decode(frames, &ctx).expect("decode");
            black_box(touch(&e.tensors[0].1.data));
            let ack = ZmqMessage::try_from(vec![id, Bytes::from_static(b"ok")]).expect("frames");
            rx.send(ack).await.expect("ack");
        }
    });
    let mut rtts = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let frames = wire::encode(&env, shm.as_ref()).expect("encode");
        tx.send(ZmqMessage::try_from(frames).expect("frames"))
            .await
            .expect("send");
        tx.recv().await.expect("ack");
        rtts.push(t.elapsed());
    }
    echo.await.expect("echo");
    rtts.sort();
    rtts[rtts.len() / 2].as_secs_f64() * 1e6 / 2.0
}

const PY: &str = r#"
import multiprocessing as mp, sys, time, json
def child(q, size, n):
    data = b"\x03" * size
    for _ in range(n):
        q.put(data)
def main():
    sizes = [int(s) for s in sys.argv[1].split(",")]
    counts = [int(s) for s in sys.argv[2].split(",")]
    out = {}
    for size, n in zip(sizes, counts):
        q = mp.Queue(maxsize=8)
        p = mp.Process(target=child, args=(q, size, n))
        p.start()
        first = q.get()
        t = time.perf_counter()
        total = len(first)
        for _ in range(n - 1):
            total += len(q.get())
        dt = time.perf_counter() - t
        p.join()
        out[size] = (n - 1) * size / dt / 1e9
    print(json.dumps(out))
if __name__ == "__main__":
    main()
"#;

fn python_gbps() -> Option<Vec<f64>> {
    let python = std::env::var("OMNI_BENCH_PYTHON").unwrap_or_else(|_| {
        let venv = std::env::var("OMNI_VENV").unwrap_or_else(|_| {
            format!(
                "{}/.cache/omni/py",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        let p = format!("{venv}/bin/python");
        if std::path::Path::new(&p).exists() {
            p
        } else {
            "python3".to_string()
        }
    });
    let sizes: Vec<String> = SIZES.iter().map(|s| s.to_string()).collect();
    let counts: Vec<String> = SIZES
        .iter()
        .map(|&s| (count_for(s).min(400) + 1).to_string())
        .collect();
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(PY)
        .arg(sizes.join(","))
        .arg(counts.join(","))
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "python benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    SIZES
        .iter()
        .map(|s| v.get(s.to_string()).and_then(|x| x.as_f64()))
        .collect()
}

/// `OMNI_BENCH_SIZES=1048576,16777216` runs only those payload sizes.
fn selected(size: usize) -> bool {
    match std::env::var("OMNI_BENCH_SIZES") {
        Ok(v) if !v.trim().is_empty() => v.split(',').any(|s| s.trim() == size.to_string()),
        _ => true,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let modes = [Mode::Ipc, Mode::Tcp, Mode::IpcShm];
    let py = python_gbps();
    println!("\nThroughput, GB/s (one sender, one receiver that decodes and reads every page):\n");
    println!(
        "| payload | memcpy | {} | {} | {} | Python mp.Queue | best / memcpy | best / Python |",
        modes[0].name(),
        modes[1].name(),
        modes[2].name()
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (i, &size) in SIZES.iter().enumerate() {
        if !selected(size) {
            continue;
        }
        let mc = memcpy_gbps(size);
        let r: Vec<f64> = modes
            .iter()
            .map(|&m| rt.block_on(throughput(m, size)))
            .collect();
        let best = r.iter().cloned().fold(0.0, f64::max);
        let p = py.as_ref().map(|v| v[i]);
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.0}% | {} |",
            human(size),
            mc,
            r[0],
            r[1],
            r[2],
            p.map_or("n/a".into(), |x| format!("{x:.2}")),
            100.0 * best / mc,
            p.map_or("n/a".into(), |x| format!("{:.1}x", best / x)),
        );
    }
    println!("\nOne-way latency, microseconds (median of a ping-pong, half the round trip):\n");
    println!(
        "| payload | {} | {} | {} |",
        modes[0].name(),
        modes[1].name(),
        modes[2].name()
    );
    println!("|---|---|---|---|");
    for &size in SIZES.iter().filter(|&&s| selected(s)) {
        let r: Vec<f64> = modes
            .iter()
            .map(|&m| rt.block_on(latency(m, size)))
            .collect();
        println!(
            "| {} | {:.0} | {:.0} | {:.0} |",
            human(size),
            r[0],
            r[1],
            r[2]
        );
    }
}
