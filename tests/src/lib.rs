//! Workspace-level integration tests for Omni: real processes, real
//! sockets, real models and real trace files. The tests live in `tests/`;
//! this library holds what they share: finding (and building) the `omni`
//! and `omni-stage` binaries, running `omni serve` on a free loopback port,
//! a small HTTP/1.1 client that reads server-sent events, the venv's
//! Python, process-tree inspection, and trace-file checks.
//!
//! Waits here are bounded (they fail with a message instead of hanging) but
//! no test asserts on how fast something is: the machines are noisy.
#![warn(missing_docs)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Error type of the helpers: tests `?` it into `Box<dyn Error>`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Result of the helpers and of the tests.
pub type Result<T = (), E = BoxError> = std::result::Result<T, E>;

/// Builds an error from a message.
pub fn err(msg: impl Into<String>) -> BoxError {
    msg.into().into()
}

/// How long a pipeline may take to start (two stage processes loading a
/// model on a busy 2-core machine); a bound against hangs, not a speed check.
pub const START_TIMEOUT: Duration = Duration::from_secs(600);

/// The workspace's target profile directory (`target/debug`), found from
/// the running test binary (`target/debug/deps/<test>`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    dir
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Builds the `omni` and `omni-stage` binaries (once per test process) so
/// tests run the current sources: `cargo test` does not build binaries of
/// other packages.
pub fn ensure_binaries() -> Result<()> {
    static BUILT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.current_dir(repo_root())
                .args(["build", "--bin", "omni", "--bin", "omni-stage"]);
            if target_dir().ends_with("release") {
                cmd.arg("--release");
            }
            let out = cmd
                .output()
                .map_err(|e| format!("cannot run cargo build: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "cargo build --bin omni --bin omni-stage failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })
        .clone()
        .map_err(err)
}

/// The `omni` binary, built.
pub fn omni_bin() -> Result<PathBuf> {
    ensure_binaries()?;
    let p = target_dir().join("omni");
    if p.is_file() {
        Ok(p)
    } else {
        Err(err(format!("{} is missing after the build", p.display())))
    }
}

/// The venv's Python (where `scripts/setup` put torch and, with
/// `OMNI_TEST_DEPS=1`, the `openai` client).
pub fn python() -> PathBuf {
    let venv = std::env::var_os("OMNI_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            std::env::var_os("OMNI_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache/omni"))
                .join("py")
        });
    venv.join("bin/python")
}

/// Greedy sampling with few tokens: tests stay small on 2 shared cores.
pub fn tiny_params(max_tokens: usize) -> omni_core::SamplingParams {
    omni_core::SamplingParams {
        max_tokens: Some(max_tokens),
        ..omni_core::SamplingParams::greedy()
    }
}

/// A JSON list of token ids (as the fixture references write them).
pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect()
        })
        .unwrap_or_default()
}

/// A user chat message as a prompt.
pub fn chat(text: &str) -> omni_core::Prompt {
    omni_core::Prompt::Chat(vec![omni_core::ChatMessage {
        role: "user".into(),
        content: text.into(),
    }])
}

/// Pids of the direct children of `pid` (from `/proc`).
pub fn child_pids(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // Fields after the `(comm)`, which may itself hold spaces.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `omni-engine/tests/fixtures/default-pipeline.json`: transformers' run of
/// the `default` pipeline's steps (and of the `text2text` and `token_ids`
/// processors) by hand, made by the fixture script.
pub fn default_pipeline_fixture() -> Result<serde_json::Value> {
    let path = repo_root().join("omni-engine/tests/fixtures/default-pipeline.json");
    Ok(serde_json::from_slice(&std::fs::read(&path)?)?)
}

/// The value of one series (name with its labels, as Prometheus' text
/// format writes it: `omni_x{stage="0"}`) in a `/metrics` body.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Every trace file under `dir`, recursively.
pub fn trace_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".json") || n.ends_with(".json.gz"))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Reads a Chrome trace (`.json` or `.json.gz`) and checks it is a JSON
/// object with a non-empty `traceEvents` list; returns the document.
pub fn read_trace(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path)?;
    let text = if path.extension().is_some_and(|e| e == "gz") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&bytes[..]).read_to_string(&mut s)?;
        s
    } else {
        String::from_utf8(bytes)?
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| err(format!("{} is not JSON: {e}", path.display())))?;
    let n = v["traceEvents"].as_array().map_or(0, Vec::len);
    if n == 0 {
        return Err(err(format!("{} has no traceEvents", path.display())));
    }
    Ok(v)
}

/// A running `omni serve`, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Server {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Lines the server printed on stderr (logs), for failure messages.
    stderr: std::sync::Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `omni serve --pipeline PIPELINE --port 0` with extra
    /// environment variables and waits until it listens.
    pub fn start(pipeline: &str, env: &[(&str, &Path)]) -> Result<Self> {
        Self::start_with(pipeline, &[], env)
    }

    /// [`Server::start`] with more `omni serve` arguments.
    pub fn start_with(pipeline: &str, args: &[&str], env: &[(&str, &Path)]) -> Result<Self> {
        let mut cmd = Command::new(omni_bin()?);
        cmd.args([
            "serve",
            "--pipeline",
            pipeline,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .args(args)
        .env_remove("VLLM_TORCH_PROFILER_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| err("no stdout"))?;
        let stderr = child.stderr.take().ok_or_else(|| err("no stderr"))?;
        let log = std::sync::Arc::new(Mutex::new(Vec::new()));
        let log2 = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if let Ok(mut l) = log2.lock() {
                    l.push(line);
                }
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if let Some(addr) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let mut server = Server {
            child,
            addr: String::new(),
            stderr: log,
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => {
                server.addr = addr;
                Ok(server)
            }
            Err(_) => Err(err(format!(
                "omni serve did not start listening; its log:\n{}",
                server.log()
            ))),
        }
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        self.stderr.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(err(format!(
                    "omni serve did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.terminate(Duration::from_secs(30));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header lines, lowercase names.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: String,
}

impl HttpResponse {
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .map_err(|e| err(format!("body is not JSON ({e}): {}", self.body)))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of a server-sent-events body.
    pub fn sse_data(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_string)
            .collect()
    }
}

/// One HTTP/1.1 request with `Connection: close`; reads the whole answer.
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<HttpResponse> {
    http_with(addr, method, path, body, &[])
}

/// [`http`] with extra header lines (`("Authorization", "Bearer k")`).
pub fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<HttpResponse> {
    let mut conn = HttpConn::open_with(addr, method, path, body, headers)?;
    let mut body = String::new();
    while let Some(line) = conn.next_line()? {
        body.push_str(&line);
        body.push('\n');
    }
    Ok(HttpResponse {
        status: conn.status,
        headers: conn.headers,
        body,
    })
}

/// An open HTTP response read line by line (for SSE), de-chunked.
pub struct HttpConn {
    reader: BufReader<TcpStream>,
    /// Status code.
    pub status: u16,
    /// Header lines, lowercase names.
    pub headers: Vec<(String, String)>,
    chunked: bool,
    remaining_in_chunk: usize,
    done: bool,
    pending: Vec<u8>,
}

impl HttpConn {
    /// Sends the request and reads the status line and headers.
    pub fn open(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<Self> {
        Self::open_with(addr, method, path, body, &[])
    }

    /// [`HttpConn::open`] with extra header lines.
    pub fn open_with(
        addr: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(START_TIMEOUT))?;
        let mut w = stream.try_clone()?;
        let body = body.unwrap_or("");
        let extra: String = extra.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        write!(
            w,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
            body.len()
        )?;
        w.flush()?;
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line)?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| err(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                break;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        Ok(Self {
            reader,
            status,
            headers,
            chunked,
            remaining_in_chunk: 0,
            done: false,
            pending: Vec::new(),
        })
    }

    fn read_more(&mut self) -> Result<bool> {
        if self.done {
            return Ok(false);
        }
        if !self.chunked {
            let mut buf = [0u8; 4096];
            let n = self.reader.read(&mut buf)?;
            self.pending.extend_from_slice(&buf[..n]);
            if n == 0 {
                self.done = true;
            }
            return Ok(n > 0);
        }
        if self.remaining_in_chunk == 0 {
            let mut size_line = String::new();
            if self.reader.read_line(&mut size_line)? == 0 {
                self.done = true;
                return Ok(false);
            }
            if size_line.trim().is_empty() {
                // The CRLF after the previous chunk's data.
                size_line.clear();
                if self.reader.read_line(&mut size_line)? == 0 {
                    self.done = true;
                    return Ok(false);
                }
            }
            let hex = size_line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(hex, 16)
                .map_err(|e| err(format!("bad chunk size {size_line:?}: {e}")))?;
            if size == 0 {
                self.done = true;
                return Ok(false);
            }
            self.remaining_in_chunk = size;
        }
        let mut buf = vec![0u8; self.remaining_in_chunk.min(8192)];
        let n = self.reader.read(&mut buf)?;
        if n == 0 {
            self.done = true;
            return Ok(false);
        }
        self.remaining_in_chunk -= n;
        self.pending.extend_from_slice(&buf[..n]);
        Ok(true)
    }

    /// The next line of the body (without the newline); `None` at the end.
    pub fn next_line(&mut self) -> Result<Option<String>> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                let s = String::from_utf8_lossy(&line[..i]);
                return Ok(Some(s.trim_end_matches('\r').to_string()));
            }
            if !self.read_more()? {
                if self.pending.is_empty() {
                    return Ok(None);
                }
                let s = String::from_utf8_lossy(&self.pending).to_string();
                self.pending.clear();
                return Ok(Some(s));
            }
        }
    }

    /// The next SSE `data:` payload; `None` at the end of the body.
    pub fn next_data(&mut self) -> Result<Option<String>> {
        while let Some(line) = self.next_line()? {
            if let Some(d) = line
                .strip_prefix("data: ")
                .or_else(|| line.strip_prefix("data:"))
            {
                return Ok(Some(d.to_string()));
            }
        }
        Ok(None)
    }
}

/// Runs a Python script from `tests/python/` with the venv's Python and
/// returns its stdout; fails with its stderr.
pub fn run_python(script: &str, args: &[&str]) -> Result<String> {
    let path = repo_root().join("tests/python").join(script);
    let out = Command::new(python()).arg(&path).args(args).output()?;
    if !out.status.success() {
        return Err(err(format!(
            "{} failed ({}):\n{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Little-endian f32 samples of a file.
pub fn read_f32(path: &Path) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Fails unless `got` has `want`'s length and is within `tolerance` of its
/// peak everywhere; `what` names the comparison.
pub fn assert_waveform(what: &str, got: &[f32], want: &[f32], tolerance: f32) -> Result {
    if got.len() != want.len() {
        return Err(err(format!(
            "{what}: {} samples, expected {}",
            got.len(),
            want.len()
        )));
    }
    let peak = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    if worst > tolerance * peak {
        return Err(err(format!("{what}: off by {worst} (peak {peak})")));
    }
    Ok(())
}

/// Runs `omni generate ARGS --json --output-dir DIR` (no profiling) and
/// returns its JSON lines; fails with its stderr when it fails.
pub fn generate_json(args: &[&str], output_dir: &Path) -> Result<Vec<serde_json::Value>> {
    let out = Command::new(omni_bin()?)
        .arg("generate")
        .args(args)
        .arg("--json")
        .arg("--output-dir")
        .arg(output_dir)
        .env_remove("VLLM_TORCH_PROFILER_DIR")
        .output()?;
    if !out.status.success() {
        return Err(err(format!(
            "omni generate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?)
}

/// Microseconds since the UNIX epoch, the clock trace timestamps use.
pub fn now_us() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// The stages' process names in the `default` pipeline's traces.
pub const DEFAULT_STAGE_NAMES: [&str; 2] = [
    "stage 0 (answer) SmolLM2-135M-Instruct",
    "stage 1 (summarizer) SmolLM2-135M-Instruct",
];

/// What one stage recorded in one profiler window, read from its files.
#[derive(Debug, Default)]
pub struct WindowContents {
    /// Names the files give their own process (`process_name` metadata of
    /// the pid the file's `omni` header names).
    pub process_names: BTreeSet<String>,
    /// `ProfilerStep#n` ranges.
    pub steps: usize,
    /// Callers' request ids the steps name (the `#n` the orchestrator adds
    /// per submission taken off).
    pub step_requests: BTreeSet<String>,
    /// `forward` ranges.
    pub forwards: usize,
}

/// Clock slack between the test and the stage processes, which anchor the
/// wall clock once and advance it monotonically.
const WINDOW_SLACK_US: f64 = 50_000.0;

/// Reads a stage's trace files from one window and checks that every timed
/// event lies within `[start_us, stop_us]` (the test's clock read before
/// `start_profile` and after `stop_profile` returned).
pub fn window_contents(paths: &[PathBuf], start_us: f64, stop_us: f64) -> Result<WindowContents> {
    let mut out = WindowContents::default();
    for path in paths {
        let doc = read_trace(path)?;
        let pid = doc["omni"]["pid"].clone();
        let events = doc["traceEvents"].as_array().map_or(&[][..], Vec::as_slice);
        let mut outside = Vec::new();
        for e in events {
            let name = e["name"].as_str().unwrap_or("");
            let ph = e["ph"].as_str().unwrap_or("");
            if ph == "M" {
                if name == "process_name" && e["pid"] == pid {
                    if let Some(n) = e["args"]["name"].as_str() {
                        out.process_names.insert(n.to_owned());
                    }
                }
                continue;
            }
            let Some(ts) = e["ts"].as_f64() else {
                return Err(err(format!(
                    "{}: event without a numeric ts: {e}",
                    path.display()
                )));
            };
            let end = ts + e["dur"].as_f64().unwrap_or(0.0);
            if ts < start_us - WINDOW_SLACK_US || end > stop_us + WINDOW_SLACK_US {
                outside.push(format!(
                    "{name} at {:.1} ms .. {:.1} ms",
                    (ts - start_us) / 1e3,
                    (end - start_us) / 1e3
                ));
            }
            if ph != "X" {
                continue;
            }
            if name.starts_with("ProfilerStep#") {
                out.steps += 1;
                let ids = match &e["args"]["request_ids"] {
                    serde_json::Value::String(s) => s.clone(),
                    _ => String::new(),
                };
                for id in ids.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                    let caller = id.rsplit_once('#').map_or(id, |(c, _)| c);
                    out.step_requests.insert(caller.to_owned());
                }
            } else if name == "forward" {
                out.forwards += 1;
            }
        }
        if !outside.is_empty() {
            return Err(err(format!(
                "{}: {} event(s) outside the window of {:.1} ms, e.g. {:?}",
                path.display(),
                outside.len(),
                (stop_us - start_us) / 1e3,
                &outside[..outside.len().min(5)]
            )));
        }
    }
    Ok(out)
}

/// Checks a stage's window: its process name, and that its steps name
/// exactly the requests in `requests` (every one, no other) with a
/// `forward` range inside.
pub fn assert_window(
    stage: usize,
    paths: &[PathBuf],
    (start_us, stop_us): (f64, f64),
    process_name: &str,
    requests: &[&str],
) -> Result<WindowContents> {
    let w = window_contents(paths, start_us, stop_us)?;
    let want: BTreeSet<String> = requests.iter().map(|r| (*r).to_owned()).collect();
    if w.process_names != BTreeSet::from([process_name.to_owned()])
        || w.step_requests != want
        || w.forwards == 0
    {
        return Err(err(format!(
            "stage {stage}: expected process {process_name:?}, steps naming {want:?} and \
             forward ranges; the window holds {w:?} ({paths:?})"
        )));
    }
    Ok(w)
}

/// Qwen2.5-Omni's three stages as its fixture script ran them: thinker and
/// talker greedy with fixed lengths (transformers' min = max new tokens,
/// `n` and `m`), the thinker's states handed on, code2wav seeded; the
/// voice opens the talker and speaks in code2wav.
pub fn qwen_params(
    n: usize,
    m: usize,
    speaker: &str,
    seed: Option<u64>,
) -> omni_core::StageSamplingParams {
    use omni_core::SamplingParams;
    omni_core::StageSamplingParams::PerStage(vec![
        SamplingParams {
            max_tokens: Some(n),
            min_tokens: n,
            output_states: true,
            ..SamplingParams::greedy()
        },
        SamplingParams {
            max_tokens: Some(m),
            min_tokens: m,
            speaker: Some(speaker.to_owned()),
            ..SamplingParams::greedy()
        },
        SamplingParams {
            seed,
            speaker: Some(speaker.to_owned()),
            ..SamplingParams::default()
        },
    ])
}

/// The request arrows of a merged trace (`omni profile merge`): each flow's
/// (start ts, finish ts).
pub fn request_flows(merged: &serde_json::Value) -> Vec<(f64, f64)> {
    let events = merged["traceEvents"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    events
        .iter()
        .filter(|e| e["ph"] == "s" && e["cat"] == "request")
        .filter_map(|s| {
            let f = events
                .iter()
                .find(|f| f["ph"] == "f" && f["cat"] == "request" && f["id"] == s["id"])?;
            Some((s["ts"].as_f64()?, f["ts"].as_f64()?))
        })
        .collect()
}
