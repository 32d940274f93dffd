//! The exact-match response cache. A request is cacheable when it is deterministic
//! (temperature 0, one choice) or the caller opts in; its key is the SHA-256 of the
//! workspace and the canonical JSON of everything that shapes the answer (route,
//! messages, tools, sampling parameters), so workspaces never share entries. Whole
//! answers and streams are cached separately; a cached stream is replayed as a stream.
//! Errors are never cached (only a finished, successful answer is ever `put`).
//!
//! Two stores: a bounded in-process LRU with a TTL and a byte budget (the default), and
//! Redis when configured, shared by every instance.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::types::{ChatChunk, ChatRequest, ChatResponse};

/// A cache key: SHA-256 of the workspace and the canonical request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key([u8; 32]);

impl Key {
    /// The key for `request` in `workspace`. `stream` answers are keyed apart from whole ones.
    #[must_use]
    pub fn new(workspace: &str, request: &ChatRequest) -> Self {
        let mut canonical = request.clone();
        let stream = canonical.is_stream();
        canonical.stream = None;
        canonical.stream_options = None;
        // serde_json's maps are ordered, so this serialisation is canonical.
        let body = serde_json::to_vec(&canonical).unwrap_or_default();
        let mut hasher = Sha256::new();
        hasher.update(workspace.as_bytes());
        hasher.update([0, u8::from(stream)]);
        hasher.update(&body);
        Self(hasher.finalize().into())
    }

    /// Hex form, for Redis keys.
    #[must_use]
    pub fn hex(&self) -> String {
        use std::fmt::Write as _;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }
}

/// Whether a request's answer may be reused: temperature 0 with a single choice.
#[must_use]
pub fn is_deterministic(request: &ChatRequest) -> bool {
    let single = request.extra.get("n").is_none_or(|n| n.as_u64() == Some(1));
    request.temperature == Some(0.0) && single
}

/// A cached answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Cached {
    /// A whole answer.
    Whole(ChatResponse),
    /// A stream's chunks, in order.
    Stream(Vec<ChatChunk>),
}

/// The in-process LRU.
#[derive(Debug)]
pub struct Memory {
    ttl: Duration,
    max_bytes: usize,
    max_entry_bytes: usize,
    inner: Mutex<Lru>,
}

#[derive(Debug, Default)]
struct Lru {
    map: HashMap<Key, Slot>,
    order: BTreeMap<u64, Key>,
    tick: u64,
    bytes: usize,
}

#[derive(Debug)]
struct Slot {
    value: Arc<Cached>,
    size: usize,
    expires: Instant,
    tick: u64,
}

impl Lru {
    fn remove(&mut self, key: &Key) {
        if let Some(slot) = self.map.remove(key) {
            self.order.remove(&slot.tick);
            self.bytes -= slot.size;
        }
    }
}

impl Memory {
    /// An empty cache.
    #[must_use]
    pub fn new(ttl: Duration, max_bytes: usize, max_entry_bytes: usize) -> Self {
        Self {
            ttl,
            max_bytes,
            max_entry_bytes,
            inner: Mutex::new(Lru::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // Every update leaves the maps consistent before it can panic, so a poisoned
        // lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached answer, if present and fresh; marks it recently used.
    pub fn get(&self, key: &Key) -> Option<Arc<Cached>> {
        let mut lru = self.lock();
        let now = Instant::now();
        let expired = lru.map.get(key).map(|slot| slot.expires <= now)?;
        if expired {
            lru.remove(key);
            return None;
        }
        lru.tick += 1;
        let tick = lru.tick;
        let slot = lru.map.get_mut(key)?;
        let old = std::mem::replace(&mut slot.tick, tick);
        let value = slot.value.clone();
        lru.order.remove(&old);
        lru.order.insert(tick, *key);
        Some(value)
    }

    /// Stores an answer of `size` bytes, evicting the least recently used entries to stay
    /// within the budget. Entries over `max_entry_bytes` are not stored.
    pub fn put(&self, key: Key, value: Cached, size: usize) -> bool {
        if size > self.max_entry_bytes || size > self.max_bytes {
            return false;
        }
        let mut lru = self.lock();
        lru.remove(&key);
        lru.tick += 1;
        let tick = lru.tick;
        lru.map.insert(
            key,
            Slot {
                value: Arc::new(value),
                size,
                expires: Instant::now() + self.ttl,
                tick,
            },
        );
        lru.order.insert(tick, key);
        lru.bytes += size;
        while lru.bytes > self.max_bytes {
            let Some((_, oldest)) = lru.order.pop_first() else {
                break;
            };
            if let Some(slot) = lru.map.remove(&oldest) {
                lru.bytes -= slot.size;
            }
        }
        true
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A Redis client for `url`: `redis://` in the clear, `rediss://` over TLS, verified
/// against `ca_file` (PEM) when given, else against the system's certificate authorities.
pub fn redis_client(url: &str, ca_file: Option<&std::path::Path>) -> Result<redis::Client, String> {
    match ca_file {
        None => redis::Client::open(url).map_err(|e| format!("redis.url is not usable: {e}")),
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("redis.ca_file {} cannot be read: {e}", path.display()))?;
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
            .map_err(|e| format!("redis.url with redis.ca_file is not usable: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, json};

    use super::*;
    use crate::types::Message;

    fn request(content: &str, temperature: Option<f64>) -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            messages: vec![Message {
                role: "user".into(),
                content: Some(json!(content)),
                tool_calls: None,
                tool_call_id: None,
                extra: Map::new(),
            }],
            stream: None,
            stream_options: None,
            temperature,
            tools: None,
            extra: Map::new(),
        }
    }

    fn answer(text: &str) -> Cached {
        Cached::Stream(vec![ChatChunk {
            id: text.into(),
            object: "chat.completion.chunk".into(),
            created: 0,
            model: "m".into(),
            choices: Vec::new(),
            usage: None,
            extra: Map::new(),
        }])
    }

    #[test]
    fn keys_depend_on_workspace_content_and_stream_but_not_field_order() {
        let a = request("hi", Some(0.0));
        assert_eq!(Key::new("ws1", &a), Key::new("ws1", &a.clone()));
        assert_ne!(
            Key::new("ws1", &a),
            Key::new("ws2", &a),
            "workspaces never share entries"
        );
        assert_ne!(
            Key::new("ws1", &a),
            Key::new("ws1", &request("hello", Some(0.0)))
        );
        let mut streamed = a.clone();
        streamed.stream = Some(true);
        assert_ne!(Key::new("ws1", &a), Key::new("ws1", &streamed));
        let mut x = a.clone();
        x.extra.insert("top_p".into(), json!(1));
        x.extra.insert("seed".into(), json!(7));
        let mut y = a.clone();
        y.extra.insert("seed".into(), json!(7));
        y.extra.insert("top_p".into(), json!(1));
        assert_eq!(Key::new("ws1", &x), Key::new("ws1", &y));
    }

    #[test]
    fn only_deterministic_requests_qualify() {
        assert!(is_deterministic(&request("x", Some(0.0))));
        assert!(
            !is_deterministic(&request("x", None)),
            "OpenAI's default temperature is 1"
        );
        assert!(!is_deterministic(&request("x", Some(0.7))));
        let mut n2 = request("x", Some(0.0));
        n2.extra.insert("n".into(), json!(2));
        assert!(!is_deterministic(&n2));
    }

    #[test]
    fn the_byte_budget_evicts_least_recently_used_first() {
        let cache = Memory::new(Duration::from_secs(60), 300, 200);
        let k = |s: &str| Key::new("ws", &request(s, Some(0.0)));
        assert!(cache.put(k("a"), answer("a"), 100));
        assert!(cache.put(k("b"), answer("b"), 100));
        assert!(cache.put(k("c"), answer("c"), 100));
        assert!(cache.get(&k("a")).is_some(), "touch a: b is now the oldest");
        assert!(cache.put(k("d"), answer("d"), 100));
        assert_eq!(cache.bytes(), 300);
        assert!(cache.get(&k("b")).is_none(), "b evicted");
        for key in ["a", "c", "d"] {
            assert!(cache.get(&k(key)).is_some(), "{key} kept");
        }
        assert!(
            !cache.put(k("big"), answer("big"), 201),
            "over max_entry_bytes"
        );
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let cache = Memory::new(Duration::from_millis(30), 1000, 1000);
        let key = Key::new("ws", &request("a", Some(0.0)));
        cache.put(key, answer("a"), 10);
        assert!(cache.get(&key).is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(cache.get(&key).is_none());
        assert_eq!(cache.bytes(), 0, "expired entries free their bytes");
    }
}

/// The response cache the gateway consults: in-process by default, Redis when configured.
#[derive(Debug)]
pub struct ResponseCache {
    backend: Backend,
    ttl: Duration,
    max_entry_bytes: usize,
}

enum Backend {
    Memory(Memory),
    Redis(redis::aio::ConnectionManager),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Memory(_) => "Memory",
            Backend::Redis(_) => "Redis",
        })
    }
}

/// Longest a cache lookup or write may take before it counts as a miss: a slow cache must
/// never slow the request it was meant to speed up.
const REDIS_TIMEOUT: Duration = Duration::from_millis(100);

impl ResponseCache {
    /// An in-process cache.
    #[must_use]
    pub fn in_memory(ttl: Duration, max_bytes: usize, max_entry_bytes: usize) -> Self {
        Self {
            backend: Backend::Memory(Memory::new(ttl, max_bytes, max_entry_bytes)),
            ttl,
            max_entry_bytes,
        }
    }

    /// A cache in Redis at `url` (`ca_file`: see [`redis_client`]), shared by every
    /// instance.
    pub async fn redis(
        url: &str,
        ca_file: Option<&std::path::Path>,
        ttl: Duration,
        max_entry_bytes: usize,
    ) -> Result<Self, String> {
        let client = redis_client(url, ca_file)?;
        let connect = client.get_connection_manager();
        let manager = match tokio::time::timeout(Duration::from_secs(3), connect).await {
            Ok(Ok(manager)) => manager,
            Ok(Err(e)) => return Err(format!("cannot connect to Redis: {e}")),
            Err(_) => return Err("cannot connect to Redis: no answer within 3s".to_owned()),
        };
        Ok(Self {
            backend: Backend::Redis(manager),
            ttl,
            max_entry_bytes,
        })
    }

    /// Which store backs the cache: `memory` or `redis`.
    #[must_use]
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Memory(_) => "memory",
            Backend::Redis(_) => "redis",
        }
    }

    fn redis_key(key: &Key) -> String {
        format!("keel:cache:v1:{}", key.hex())
    }

    /// The cached answer for `key`, if any. A cache that fails is a miss.
    pub async fn get(&self, key: &Key) -> Option<Arc<Cached>> {
        let hit = match &self.backend {
            Backend::Memory(memory) => memory.get(key),
            Backend::Redis(manager) => {
                let mut conn = manager.clone();
                let mut cmd = redis::cmd("GET");
                cmd.arg(Self::redis_key(key));
                match tokio::time::timeout(
                    REDIS_TIMEOUT,
                    cmd.query_async::<Option<Vec<u8>>>(&mut conn),
                )
                .await
                {
                    Ok(Ok(Some(bytes))) => {
                        serde_json::from_slice::<Cached>(&bytes).ok().map(Arc::new)
                    }
                    Ok(Ok(None)) => None,
                    Ok(Err(e)) => {
                        cache_error("get", &e.to_string());
                        None
                    }
                    Err(_) => {
                        cache_error("get", "timed out");
                        None
                    }
                }
            }
        };
        metrics::counter!("keel_llm_cache_lookups_total", "result" => if hit.is_some() { "hit" } else { "miss" })
            .increment(1);
        hit
    }

    /// Stores a finished, successful answer.
    pub async fn put(&self, key: Key, value: Cached) {
        let Ok(bytes) = serde_json::to_vec(&value) else {
            return;
        };
        if bytes.len() > self.max_entry_bytes {
            return;
        }
        match &self.backend {
            Backend::Memory(memory) => {
                if memory.put(key, value, bytes.len()) {
                    metrics::gauge!("keel_llm_cache_bytes").set(memory.bytes() as f64);
                    metrics::gauge!("keel_llm_cache_entries").set(memory.len() as f64);
                }
            }
            Backend::Redis(manager) => {
                let mut conn = manager.clone();
                let ttl_ms = u64::try_from(self.ttl.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1);
                let mut cmd = redis::cmd("SET");
                cmd.arg(Self::redis_key(&key))
                    .arg(bytes)
                    .arg("PX")
                    .arg(ttl_ms);
                match tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async::<()>(&mut conn)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => cache_error("set", &e.to_string()),
                    Err(_) => cache_error("set", "timed out"),
                }
            }
        }
    }
}

fn cache_error(op: &'static str, error: &str) {
    metrics::counter!("keel_llm_cache_errors_total", "op" => op).increment(1);
    tracing::warn!(op, error, "response cache unavailable; treated as a miss");
}
