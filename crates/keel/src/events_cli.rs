//! `keel events validate` and `keel events tail`.

use std::io::BufRead as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;

use crate::{note, out};

/// Checks a file of events (JSON Lines; `-` for stdin) against the published schemas and
/// reports each bad line. Fails if any line is bad.
pub fn validate(path: &Path) -> anyhow::Result<()> {
    let reader: Box<dyn std::io::BufRead> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        ))
    };
    let (mut total, mut bad) = (0usize, 0usize);
    for (index, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        total += 1;
        let number = index + 1;
        let problems = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(event) => keel_server::schemas::validate(&event).err(),
            Err(e) => Some(vec![format!("not JSON: {e}")]),
        };
        if let Some(problems) = problems {
            bad += 1;
            for p in problems {
                out(&format!("line {number}: {p}"));
            }
        }
    }
    if bad > 0 {
        anyhow::bail!("{bad} of {total} events are invalid");
    }
    out(&format!("{total} events, all valid"));
    Ok(())
}

/// Follows a server's event stream and prints each event as a JSON line, reconnecting
/// from the last one seen when the stream ends.
pub async fn tail(
    url: &str,
    key: &str,
    types: Option<&str>,
    after: Option<i64>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()?;
    let mut last = after;
    let base = url.trim_end_matches('/');
    loop {
        let mut target = reqwest::Url::parse(&format!("{base}/v1/events"))
            .with_context(|| format!("{base} is not a valid URL"))?;
        if let Some(types) = types {
            target.query_pairs_mut().append_pair("types", types);
        }
        let mut request = client.get(target).bearer_auth(key);
        if let Some(seq) = last {
            request = request.header("last-event-id", seq.to_string());
        }
        let response = tokio::select! {
            r = request.send() => r,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        match response {
            Ok(r) if r.status().is_success() => {
                let mut body = r.bytes_stream();
                let mut buffer: Vec<u8> = Vec::new();
                loop {
                    let chunk = tokio::select! {
                        c = body.next() => c,
                        _ = tokio::signal::ctrl_c() => return Ok(()),
                    };
                    let Some(Ok(chunk)) = chunk else { break };
                    buffer.extend_from_slice(&chunk);
                    while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                        let frame: Vec<u8> = buffer.drain(..end + 2).collect();
                        let text = String::from_utf8_lossy(&frame);
                        let mut closed = false;
                        for line in text.lines() {
                            if let Some(id) = line.strip_prefix("id: ") {
                                last = id.trim().parse().ok().or(last);
                            } else if line == "event: stream.closed" {
                                closed = true;
                            } else if let Some(data) = line.strip_prefix("data: ")
                                && !closed
                            {
                                out(data);
                            }
                        }
                    }
                }
            }
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                // A caller's mistake will not fix itself: stop and say why.
                if status.is_client_error() {
                    anyhow::bail!("{base}/v1/events answered {status}: {body}");
                }
                note(&format!("{base}/v1/events answered {status}; reconnecting"));
            }
            Err(e) => note(&format!(
                "cannot reach {base}/v1/events ({e}); reconnecting"
            )),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
