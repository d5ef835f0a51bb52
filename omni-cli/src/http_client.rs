//! A minimal HTTP/1.1 client over loopback TCP for `omni bench serve` and
//! `omni bench load`: one request per connection, `Content-Length` or
//! chunked bodies, and server-sent events read as they arrive. Enough to drive our own server
//! without pulling in a client stack.
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// What a streamed request measured.
#[derive(Debug, Clone, Copy)]
pub struct StreamTiming {
    /// From sending the request to the first content delta.
    pub ttft: Option<Duration>,
    /// From sending the request to `[DONE]`.
    pub total: Duration,
}

/// A response whose status line and headers have been read.
struct Response {
    status: u16,
    /// Header names lowercased, values trimmed.
    headers: Vec<(String, String)>,
    body: BodyReader,
    /// Held open until the response is dropped: dropping it half-closes
    /// the connection, which the server takes for a client that left.
    _write: tokio::net::tcp::OwnedWriteHalf,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The whole body (for error messages and whole answers).
    async fn text(mut self) -> anyhow::Result<String> {
        let mut out = String::new();
        while let Some(line) = self.body.line().await? {
            out.push_str(&line);
            out.push('\n');
        }
        Ok(out)
    }
}

/// POSTs `body` (JSON) to `path` on a fresh connection and reads the
/// response head.
async fn post(addr: &str, path: &str, body: &serde_json::Value) -> anyhow::Result<Response> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (read, mut write) = stream.into_split();
    let body = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: text/event-stream, application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    write.write_all(head.as_bytes()).await?;
    write.write_all(body.as_bytes()).await?;
    let mut reader = BufReader::new(read);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).await?;
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            bail!("connection closed in the headers");
        }
        let line = line.trim();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    Ok(Response {
        status,
        headers,
        _write: write,
        body: BodyReader {
            reader,
            chunked,
            buf: Vec::new(),
            pos: 0,
        },
    })
}

/// Whether an SSE event or a whole answer carries text.
fn has_text(v: &serde_json::Value) -> bool {
    v["choices"].as_array().is_some_and(|cs| {
        cs.iter().any(|c| {
            c["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
                || c["text"].as_str().is_some_and(|s| !s.is_empty())
                || c["message"]["content"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty())
        })
    })
}

/// POSTs `body` to `path` with `stream: true` and reads the SSE answer to
/// `data: [DONE]`.
pub async fn post_stream(
    addr: &str,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<StreamTiming> {
    let start = Instant::now();
    let mut response = post(addr, path, body).await?;
    if response.status != 200 {
        let status = response.status;
        bail!("{path} answered {status}: {}", response.text().await?);
    }
    let mut ttft = None;
    while let Some(line) = response.body.line().await? {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return Ok(StreamTiming {
                ttft,
                total: start.elapsed(),
            });
        }
        let v: serde_json::Value =
            serde_json::from_str(data).with_context(|| format!("bad SSE data {data:?}"))?;
        if v.get("error").is_some() {
            bail!("stream error: {data}");
        }
        if has_text(&v) {
            ttft.get_or_insert_with(|| start.elapsed());
        }
    }
    bail!("stream ended without [DONE]")
}

/// How a load-test request ended, short of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The whole answer came, with text.
    Answered,
    /// 429 with a `Retry-After` header: the server's bound, as promised.
    Overloaded,
    /// The client hung up after the first event, as it was told to.
    LeftMidStream,
}

/// What a load-test client does with its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// `stream: false`: one JSON answer.
    Whole,
    /// `stream: true`, read to `[DONE]`.
    Stream,
    /// `stream: true`, hang up after the first event.
    Leave,
}

/// POSTs `body` (its `stream` set by `kind`) and reads the answer as `kind`
/// says. Any status other than 200 and a well-formed 429, any error event
/// and any answer without text is an error.
pub async fn post_as(
    addr: &str,
    path: &str,
    body: &serde_json::Value,
    kind: ClientKind,
) -> anyhow::Result<Outcome> {
    let mut body = body.clone();
    body["stream"] = serde_json::Value::Bool(kind != ClientKind::Whole);
    let mut response = post(addr, path, &body).await?;
    match response.status {
        200 => {}
        429 => {
            let retry = response.header("retry-after").map(str::to_owned);
            let text = response.text().await?;
            return match retry.as_deref().map(str::parse::<u64>) {
                Some(Ok(_)) => Ok(Outcome::Overloaded),
                _ => bail!("429 without a Retry-After of whole seconds ({retry:?}): {text}"),
            };
        }
        status => bail!("{path} answered {status}: {}", response.text().await?),
    }
    if kind == ClientKind::Whole {
        let text = response.text().await?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("bad answer {text:?}"))?;
        if v.get("error").is_some() || !has_text(&v) {
            bail!("answer without text: {text}");
        }
        return Ok(Outcome::Answered);
    }
    let mut text = false;
    while let Some(line) = response.body.line().await? {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            if !text {
                bail!("a stream without text");
            }
            return Ok(Outcome::Answered);
        }
        let v: serde_json::Value =
            serde_json::from_str(data).with_context(|| format!("bad SSE data {data:?}"))?;
        if v.get("error").is_some() {
            bail!("stream error: {data}");
        }
        text |= has_text(&v);
        if kind == ClientKind::Leave {
            // Dropping the response closes the connection mid-stream.
            return Ok(Outcome::LeftMidStream);
        }
    }
    bail!("stream ended without [DONE]")
}

/// Reads the body line by line, undoing chunked encoding.
struct BodyReader {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    chunked: bool,
    /// Decoded bytes not yet returned.
    buf: Vec<u8>,
    pos: usize,
}

impl BodyReader {
    async fn fill(&mut self) -> anyhow::Result<bool> {
        self.buf.drain(..self.pos);
        self.pos = 0;
        if !self.chunked {
            let mut tmp = [0u8; 4096];
            let n = self.reader.read(&mut tmp).await?;
            self.buf.extend_from_slice(&tmp[..n]);
            return Ok(n > 0);
        }
        let mut size_line = String::new();
        if self.reader.read_line(&mut size_line).await? == 0 {
            return Ok(false);
        }
        let size_hex = size_line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_line:?}"))?;
        if size == 0 {
            return Ok(false);
        }
        let start = self.buf.len();
        self.buf.resize(start + size, 0);
        self.reader.read_exact(&mut self.buf[start..]).await?;
        let mut crlf = [0u8; 2];
        self.reader.read_exact(&mut crlf).await?;
        Ok(true)
    }

    async fn line(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            if let Some(i) = self.buf[self.pos..].iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&self.buf[self.pos..self.pos + i])
                    .trim_end_matches('\r')
                    .to_string();
                self.pos += i + 1;
                return Ok(Some(line));
            }
            if !self.fill().await? {
                // The body may end without a newline (a JSON answer).
                if self.pos < self.buf.len() {
                    let rest = String::from_utf8_lossy(&self.buf[self.pos..]).into_owned();
                    self.pos = self.buf.len();
                    return Ok(Some(rest));
                }
                return Ok(None);
            }
        }
    }
}
