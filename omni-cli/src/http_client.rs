//! A minimal HTTP/1.1 client over loopback TCP for `omni bench serve`:
//! one request per connection, `Content-Length` or chunked bodies, and
//! server-sent events read as they arrive. Enough to drive our own server
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

/// POSTs `body` to `path` with `stream: true` and reads the SSE answer to
/// `data: [DONE]`.
pub async fn post_stream(
    addr: &str,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<StreamTiming> {
    let start = Instant::now();
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (read, mut write) = stream.into_split();
    let body = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    write.write_all(head.as_bytes()).await?;
    write.write_all(body.as_bytes()).await?;
    let mut reader = BufReader::new(read);
    let mut status = String::new();
    reader.read_line(&mut status).await?;
    if !status.starts_with("HTTP/1.1 200") {
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest).await;
        bail!("{path} answered {}: {rest}", status.trim());
    }
    let mut chunked = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            bail!("connection closed in the headers");
        }
        let l = line.trim().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if l == "transfer-encoding: chunked" {
            chunked = true;
        }
    }
    let mut body_reader = BodyReader {
        reader,
        chunked,
        buf: Vec::new(),
        pos: 0,
    };
    let mut ttft = None;
    while let Some(line) = body_reader.line().await? {
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
        let has_text = v["choices"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["delta"]["content"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty())
                    || c["text"].as_str().is_some_and(|s| !s.is_empty())
            })
        });
        if has_text {
            ttft.get_or_insert_with(|| start.elapsed());
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
                return Ok(None);
            }
        }
    }
}
