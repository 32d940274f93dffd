//! Calling tools. HTTP tools: the model's arguments are checked against the tool's JSON
//! Schema first (invalid ones go back to the model as the result, so it can correct
//! itself); every attempt carries the step's `Idempotency-Key`, the same on retries and
//! after a crash resume; retryable failures (connection, timeout, 429, 5xx) are retried
//! with backoff; a circuit breaker per tool stops hammering a tool that is down. A tool
//! failure is a result for the model, never a crash of the run.

use std::time::{Duration, Instant};

use keel_llm::breaker::Breaker;
use serde_json::Value;

use crate::spec::{HttpTool, expand_env};

/// Most bytes of a tool's answer read.
const MAX_BODY: usize = 1024 * 1024;
/// Most characters of an answer handed to the model.
const MAX_CONTENT: usize = 64 * 1024;

/// What a tool call came to.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Whether the tool succeeded.
    pub ok: bool,
    /// What the model is told (the answer, or the error).
    pub content: String,
    /// The tool's HTTP status, if it answered.
    pub status: Option<u16>,
    /// Attempts made.
    pub attempts: u32,
    /// Time taken.
    pub duration: Duration,
}

impl Outcome {
    /// A failure before any call was made.
    #[must_use]
    pub fn refused(content: String) -> Self {
        Self {
            ok: false,
            content,
            status: None,
            attempts: 0,
            duration: Duration::ZERO,
        }
    }
}

/// Compiled validators, by their schema's text: compiling one costs far more than checking
/// arguments with it, and a tool's schema is the same on every call. Bounded: emptied when
/// full (as the engine's other caches are).
static VALIDATORS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<jsonschema::Validator>>>,
> = std::sync::LazyLock::new(Default::default);

/// Most validators kept.
const VALIDATORS_KEPT: usize = 1024;

/// The compiled validator of `schema`.
fn validator(schema: &Value) -> Result<std::sync::Arc<jsonschema::Validator>, String> {
    let key = schema.to_string();
    let lock = || {
        VALIDATORS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if let Some(v) = lock().get(&key) {
        return Ok(v.clone());
    }
    let compiled = std::sync::Arc::new(
        jsonschema::validator_for(schema)
            .map_err(|e| format!("the tool's schema is invalid: {e}"))?,
    );
    let mut cache = lock();
    if cache.len() >= VALIDATORS_KEPT {
        cache.clear();
    }
    cache.insert(key, compiled.clone());
    Ok(compiled)
}

/// The model's arguments, parsed and checked against `schema`; the error says what to fix
/// (it is what the model sees).
pub fn check_arguments(schema: &Value, arguments: &str) -> Result<Value, String> {
    let value: Value = if arguments.trim().is_empty() {
        Value::Object(serde_json::Map::new())
    } else {
        serde_json::from_str(arguments)
            .map_err(|e| format!("the arguments are not valid JSON ({e}); send a JSON object"))?
    };
    let validator = validator(schema)?;
    let problems: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("{at}: {e}")
            }
        })
        .collect();
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(format!(
            "the arguments do not match the tool's schema: {}; call the tool again with corrected arguments",
            problems.join("; ")
        ))
    }
}

/// Calls an HTTP tool with `arguments`, retrying per the tool's policy.
pub async fn call_http(
    client: &reqwest::Client,
    tool: &HttpTool,
    arguments: &Value,
    idempotency_key: &str,
    breaker: &Breaker,
    env: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Outcome {
    let started = Instant::now();
    let mut headers = reqwest::header::HeaderMap::new();
    for (name, value) in &tool.headers {
        let value = match expand_env(value, env) {
            Ok(v) => v,
            Err(e) => return Outcome::refused(format!("tool {} is misconfigured: {e}", tool.name)),
        };
        let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(name.as_bytes()),
            reqwest::header::HeaderValue::from_str(&value),
        ) else {
            return Outcome::refused(format!("tool {} has an invalid header {name:?}", tool.name));
        };
        headers.insert(name, value);
    }
    let method =
        reqwest::Method::from_bytes(tool.method.as_bytes()).unwrap_or(reqwest::Method::POST);
    let mut attempt = 0;
    loop {
        attempt += 1;
        if !breaker.allow() {
            return Outcome {
                ok: false,
                content: format!(
                    "tool {} is unavailable (its circuit breaker is open after repeated failures); try later or another way",
                    tool.name
                ),
                status: None,
                attempts: attempt - 1,
                duration: started.elapsed(),
            };
        }
        let mut url = match reqwest::Url::parse(&tool.url) {
            Ok(url) => url,
            Err(e) => {
                return Outcome::refused(format!("tool {} has an invalid URL: {e}", tool.name));
            }
        };
        let with_query = method == reqwest::Method::GET || method == reqwest::Method::DELETE;
        if with_query && let Some(map) = arguments.as_object() {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in map {
                pairs.append_pair(k, &v.as_str().map_or_else(|| v.to_string(), str::to_owned));
            }
        }
        let mut request = client
            .request(method.clone(), url)
            .headers(headers.clone())
            .header("idempotency-key", idempotency_key)
            .timeout(tool.timeout);
        if !with_query {
            request = request.json(arguments);
        }
        let (retryable, outcome, retry_after) = match request.send().await {
            Ok(response) => {
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let body = read_capped(response).await;
                let ok = status.is_success();
                let retryable = status.as_u16() == 429 || status.is_server_error();
                let content = match (&body, ok) {
                    (Ok(text), true) => truncate(text),
                    (Ok(text), false) => format!("HTTP {}: {}", status.as_u16(), truncate(text)),
                    (Err(e), _) => format!(
                        "HTTP {}: the answer could not be read: {e}",
                        status.as_u16()
                    ),
                };
                let ok = ok && body.is_ok();
                (
                    retryable,
                    Outcome {
                        ok,
                        content,
                        status: Some(status.as_u16()),
                        attempts: attempt,
                        duration: started.elapsed(),
                    },
                    retry_after,
                )
            }
            Err(e) => {
                let what = if e.is_timeout() {
                    format!("timed out after {:?}", tool.timeout)
                } else if e.is_connect() {
                    "could not connect".to_owned()
                } else {
                    "the request failed".to_owned()
                };
                (
                    true,
                    Outcome {
                        ok: false,
                        content: format!("tool {} failed: {what}", tool.name),
                        status: None,
                        attempts: attempt,
                        duration: started.elapsed(),
                    },
                    None,
                )
            }
        };
        if outcome.ok {
            breaker.record_success();
            return outcome;
        }
        if !retryable {
            // The tool answered (a 4xx): it is up; the call itself was wrong.
            breaker.record_success();
            return outcome;
        }
        breaker.record_failure();
        if attempt > tool.retries {
            return outcome;
        }
        let delay = retry_after
            .map(|d| d.min(Duration::from_secs(10)))
            .unwrap_or_else(|| backoff(attempt));
        tokio::time::sleep(delay).await;
    }
}

/// The wait before attempt `attempt + 1` of a tool call: exponential from 200 ms, capped at
/// 5 s, with full jitter.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1 << attempt.saturating_sub(1).min(5));
    base.min(Duration::from_secs(5)).mul_f64(fastrand::f64())
}

async fn read_capped(mut response: reqwest::Response) -> Result<String, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(format!("the answer is larger than {MAX_BODY} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

pub(crate) fn truncate(text: &str) -> String {
    if text.len() <= MAX_CONTENT {
        return text.to_owned();
    }
    let end = text.floor_char_boundary(MAX_CONTENT);
    format!("{}… (truncated, {} bytes in all)", &text[..end], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked_against_the_schema_with_every_problem_named() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city"],
        });
        assert_eq!(
            check_arguments(&schema, r#"{"city":"Oslo","days":2}"#).unwrap()["city"],
            "Oslo"
        );
        let err = check_arguments(&schema, r#"{"days":0}"#).unwrap_err();
        assert!(err.contains("city") && err.contains("/days"), "{err}");
        let err = check_arguments(&schema, "{not json").unwrap_err();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn long_answers_are_cut_on_a_character_boundary() {
        let text = "é".repeat(MAX_CONTENT);
        let cut = truncate(&text);
        assert!(cut.len() < text.len() && cut.contains("truncated"));
    }
}
