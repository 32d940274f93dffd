//! A lean HTTP/1.1 client for one server-sent-events stream, for the benchmarks.
//!
//! A bench's thousand SSE clients share the machine's two cores with the server they
//! measure, so what each costs per event is taken from the server. A general HTTP client
//! hands every chunk from its connection task to the reader through a channel (two task
//! wake-ups and copies per event); this one reads the socket in the reader's own task and
//! decodes the chunked body in place: one wake-up and one `read` per batch of events.
//!
//! It speaks just enough HTTP/1.1: a GET with headers, the status line, `Content-Length`
//! or chunked bodies. Anything else is an error.

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Most bytes of a response head.
const MAX_HEAD: usize = 16 * 1024;

/// An open response: its status, and its body to read.
pub(crate) struct Response {
    pub(crate) status: u16,
    stream: TcpStream,
    /// Bytes read from the socket and not yet decoded.
    buf: Vec<u8>,
    start: usize,
    body: Framing,
}

enum Framing {
    /// `Transfer-Encoding: chunked`: bytes left in the current chunk, and whether its
    /// closing CRLF is still to be skipped.
    Chunked { left: usize, crlf: bool, done: bool },
    /// `Content-Length`: bytes left.
    Length(usize),
}

/// Sends `GET path` to `addr` with `headers` and reads the response head.
pub(crate) async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Response> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(name);
        request.push_str(": ");
        request.push_str(value);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;

    let mut buf = Vec::with_capacity(64 * 1024);
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            bail!("response head longer than {MAX_HEAD} bytes");
        }
        if read_more(&mut stream, &mut buf).await? == 0 {
            bail!("the server closed the connection before answering");
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    let body = match (chunked, length) {
        (true, _) => Framing::Chunked {
            left: 0,
            crlf: false,
            done: false,
        },
        (false, Some(n)) => Framing::Length(n),
        (false, None) => bail!("response has neither chunked encoding nor a length"),
    };
    Ok(Response {
        status,
        stream,
        buf,
        start: head_end,
        body,
    })
}

impl Response {
    /// Appends the next decoded body bytes to `out`: at least one byte, or `false` at the
    /// body's end. Waits for the socket only when nothing buffered decodes.
    pub(crate) async fn read(&mut self, out: &mut Vec<u8>) -> anyhow::Result<bool> {
        loop {
            let before = out.len();
            if self.decode(out)? {
                return Ok(false);
            }
            if out.len() > before {
                return Ok(true);
            }
            // Keep what is left of the buffer at its front, then read more after it.
            self.buf.drain(..self.start);
            self.start = 0;
            if read_more(&mut self.stream, &mut self.buf).await? == 0 {
                bail!("the server closed the connection mid-body");
            }
        }
    }

    /// The whole (short) body, as text: for error answers.
    pub(crate) async fn text(mut self) -> String {
        let mut out = Vec::new();
        while out.len() < 64 * 1024 {
            match self.read(&mut out).await {
                Ok(true) => {}
                Ok(false) | Err(_) => break,
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Decodes what the buffer holds into `out`; true once the body has ended.
    fn decode(&mut self, out: &mut Vec<u8>) -> anyhow::Result<bool> {
        loop {
            let avail = &self.buf[self.start..];
            match &mut self.body {
                Framing::Length(left) => {
                    if *left == 0 {
                        return Ok(true);
                    }
                    let n = avail.len().min(*left);
                    out.extend_from_slice(&avail[..n]);
                    self.start += n;
                    *left -= n;
                    return Ok(false);
                }
                Framing::Chunked { done: true, .. } => return Ok(true),
                Framing::Chunked { left, crlf, done } => {
                    if *left > 0 {
                        let n = avail.len().min(*left);
                        if n == 0 {
                            return Ok(false);
                        }
                        out.extend_from_slice(&avail[..n]);
                        self.start += n;
                        *left -= n;
                        *crlf = *left == 0;
                        continue;
                    }
                    if *crlf {
                        if avail.len() < 2 {
                            return Ok(false);
                        }
                        if &avail[..2] != b"\r\n" {
                            bail!("chunk not followed by CRLF");
                        }
                        self.start += 2;
                        *crlf = false;
                        continue;
                    }
                    let Some(eol) = find(avail, b"\r\n") else {
                        if avail.len() > 1024 {
                            bail!("chunk size line too long");
                        }
                        return Ok(false);
                    };
                    let line = std::str::from_utf8(&avail[..eol]).context("chunk size")?;
                    let size = line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(size, 16)
                        .with_context(|| format!("bad chunk size {line:?}"))?;
                    self.start += eol + 2;
                    if size == 0 {
                        *done = true;
                        return Ok(true);
                    }
                    *left = size;
                }
            }
        }
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 16 * 1024 {
        buf.reserve(64 * 1024);
    }
    stream.read_buf(buf).await
}

/// Where `needle` first occurs in `hay`.
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpListener;

    use super::*;

    /// Serves one canned response, written in the given pieces.
    async fn serve(pieces: Vec<&'static [u8]>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = vec![0u8; 4096];
            let _ = s.read(&mut req).await.unwrap();
            for p in pieces {
                s.write_all(p).await.unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_across_reads() {
        let addr = serve(vec![
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            b"5\r\nhel",
            b"lo\r\n",
            b"7;ext=1\r\n, world\r\n0\r\n\r\n",
        ])
        .await;
        let mut res = get(addr, "/x", &[("accept", "text/event-stream")])
            .await
            .unwrap();
        assert_eq!(res.status, 200);
        let mut out = Vec::new();
        while res.read(&mut out).await.unwrap() {}
        assert_eq!(out, b"hello, world");
    }

    #[tokio::test]
    async fn length_bodies_and_statuses_are_read() {
        let addr = serve(vec![
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbu",
            b"sy",
        ])
        .await;
        let res = get(addr, "/x", &[]).await.unwrap();
        assert_eq!(res.status, 503);
        assert_eq!(res.text().await, "busy");
    }
}
