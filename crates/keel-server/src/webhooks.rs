//! Webhook delivery: each subscription receives its workspace's matching events in seq
//! order, signed per the Standard Webhooks spec, retried with backoff, and dead-lettered
//! after `webhooks.max_attempts`; every attempt is logged.
//!
//! One dispatcher per instance runs a worker per subscription. A worker holds the
//! subscription's lease (so with several instances exactly one delivers it), reads events
//! after the subscription's cursor, delivers them one at a time, and moves the cursor past
//! each once it is delivered or dead-lettered — so a restart resumes where it stopped and
//! never skips an event (at-least-once: an event whose delivery succeeded just before a
//! crash may be sent again, with the same `webhook-id`).
//!
//! SSRF: unless `webhooks.allow_private` is set, a URL must not reach loopback, private,
//! link-local or other internal addresses. The check runs when the subscription is created
//! and again inside the HTTP client's resolver on every delivery, so a name that later
//! resolves somewhere internal (DNS rebinding) is refused too; redirects are not followed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use keel_core::config::Webhooks as WebhooksConfig;
use keel_core::event::{Event, EventType, NewEvent, TypeFilter};
use keel_core::id::{DeliveryId, WebhookId};
use keel_store::{Delivery, Outcome, Store, Webhook};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::events::Hub;

/// How long a worker's lease lasts; renewed well before it lapses.
const LEASE: Duration = Duration::from_secs(30);
/// How often the dispatcher looks for new or deleted subscriptions.
const RESCAN: Duration = Duration::from_secs(1);
/// Events read per page.
const PAGE: u32 = 100;
/// Most of an endpoint's answer kept in the delivery log.
const MAX_ERROR: usize = 512;

/// A new signing secret: `whsec_` and 24 random bytes in base64.
pub fn generate_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes)?;
    Ok(format!("whsec_{}", B64.encode(bytes)))
}

/// Checks a secret given by the caller: `whsec_` and base64 of 24 to 64 bytes.
pub fn check_secret(secret: &str) -> Result<(), String> {
    let key = secret
        .strip_prefix("whsec_")
        .ok_or("secret: must start with `whsec_` (or leave it out and Keel makes one)")?;
    let bytes = B64
        .decode(key)
        .map_err(|_| "secret: the part after `whsec_` must be standard base64")?;
    if !(24..=64).contains(&bytes.len()) {
        return Err("secret: must encode 24 to 64 random bytes".to_owned());
    }
    Ok(())
}

/// The `webhook-signature` value for a message: `v1,<base64 HMAC-SHA256>` over
/// `<id>.<timestamp>.<body>`, keyed with the secret's bytes.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let key = B64.decode(secret.strip_prefix("whsec_")?).ok()?;
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key);
    let mut ctx = aws_lc_rs::hmac::Context::with_key(&key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    Some(format!("v1,{}", B64.encode(ctx.sign().as_ref())))
}

/// Whether an address is internal: loopback, private, link-local, shared, unspecified,
/// broadcast, multicast, documentation, or an IPv6 form of one of those.
#[must_use]
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first == 0x2001 && v6.segments()[1] == 0x0db8) // documentation
                || (first == 0x0064 && v6.segments()[1] == 0xff9b) // NAT64 of anything
        }
    }
}

/// Checks a webhook URL: http(s), with a host, and — unless private targets are allowed —
/// resolving only to public addresses. The error says what to fix.
pub async fn check_url(url: &str, allow_private: bool) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("url: not a valid URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "url: must be http:// or https://, got {}://",
            parsed.scheme()
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("url: must not carry credentials; the payload is signed instead".to_owned());
    }
    let host = parsed
        .host_str()
        .ok_or("url: must name a host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if allow_private {
        return Ok(parsed);
    }
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addrs = public_addrs(&host, port).await?;
    if addrs.is_empty() {
        return Err(format!("url: {host} does not resolve"));
    }
    Ok(parsed)
}

/// The addresses `host` resolves to, refusing internal ones (and a name resolving to any).
async fn public_addrs(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("url: cannot resolve {host} ({e})"))?
            .collect(),
    };
    if let Some(bad) = addrs.iter().find(|a| is_internal(a.ip())) {
        return Err(format!(
            "url: {host} resolves to {}, an internal address; webhooks may only reach public \
             addresses (set webhooks.allow_private = true to allow internal ones)",
            bad.ip()
        ));
    }
    Ok(addrs)
}

/// The delivery client's resolver: every connection's addresses pass [`is_internal`].
#[derive(Debug)]
struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = public_addrs(&host, 0)
                .await
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.into() })?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Delivers webhooks; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<DispatcherInner>,
}

struct DispatcherInner {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    config: WebhooksConfig,
    client: reqwest::Client,
    owner: uuid::Uuid,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// A dispatcher over `store`, woken by commits published to `hub`.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        config: &WebhooksConfig,
    ) -> Result<Self, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("Keel-Webhooks/", env!("CARGO_PKG_VERSION")));
        if !config.allow_private {
            builder = builder.dns_resolver(Arc::new(GuardedResolver));
        }
        Ok(Self {
            inner: Arc::new(DispatcherInner {
                store,
                hub,
                config: config.clone(),
                client: builder.build()?,
                owner: uuid::Uuid::now_v7(),
            }),
        })
    }

    /// Runs the dispatcher until `stop` is cancelled.
    pub(crate) fn start(&self, stop: CancellationToken) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move { this.run(stop).await })
    }

    async fn run(self, stop: CancellationToken) {
        let mut workers: HashMap<WebhookId, (CancellationToken, JoinHandle<()>)> = HashMap::new();
        loop {
            match self.inner.store.all_webhooks().await {
                Ok(hooks) => {
                    let live: std::collections::HashSet<WebhookId> =
                        hooks.iter().map(|h| h.id).collect();
                    workers.retain(|id, (token, task)| {
                        let keep = live.contains(id) && !task.is_finished();
                        if !keep {
                            token.cancel();
                        }
                        keep
                    });
                    for hook in hooks {
                        if !workers.contains_key(&hook.id) {
                            let token = stop.child_token();
                            let this = self.clone();
                            let worker_stop = token.clone();
                            let id = hook.id;
                            let task =
                                tokio::spawn(async move { this.work(hook, worker_stop).await });
                            workers.insert(id, (token, task));
                        }
                    }
                    metrics::gauge!("keel_webhook_workers").set(workers.len() as f64);
                }
                Err(e) => tracing::warn!(error = %e, "cannot list webhooks; will retry"),
            }
            tokio::select! {
                () = tokio::time::sleep(RESCAN) => {}
                () = stop.cancelled() => break,
            }
        }
        for (_, (token, task)) in workers {
            token.cancel();
            let _ = task.await;
        }
    }

    /// Delivers one subscription's events in order until stopped or deleted.
    async fn work(self, hook: Webhook, stop: CancellationToken) {
        let filter = TypeFilter::parse(&hook.types).unwrap_or_else(|_| TypeFilter::all());
        // Commits wake the delivery; once the hub is closed (the server is stopping) the
        // lease's re-check alone does.
        let mut wake = Some(self.inner.hub.subscribe(hook.workspace_id));
        loop {
            if stop.is_cancelled() {
                return;
            }
            let until = time::OffsetDateTime::now_utc()
                + time::Duration::try_from(LEASE).unwrap_or(time::Duration::MAX);
            match self
                .inner
                .store
                .lease_webhook(hook.id, self.inner.owner, until)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    // Another instance delivers it; check again later.
                    if sleep_or_stop(LEASE / 3, &stop).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, webhook_id = %hook.id, "cannot take the webhook lease");
                    if sleep_or_stop(Duration::from_secs(1), &stop).await {
                        return;
                    }
                    continue;
                }
            }
            let current = match self.inner.store.webhook(hook.workspace_id, hook.id).await {
                Ok(current) => current,
                Err(keel_store::Error::NotFound { .. }) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a webhook");
                    if sleep_or_stop(Duration::from_secs(1), &stop).await {
                        return;
                    }
                    continue;
                }
            };
            let page = match self
                .inner
                .store
                .events_after(hook.workspace_id, current.cursor_seq, PAGE)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read events for a webhook");
                    if sleep_or_stop(Duration::from_secs(1), &stop).await {
                        return;
                    }
                    continue;
                }
            };
            if page.is_empty() {
                // Wait for a commit to this workspace (or re-check within the lease).
                let woken = async {
                    match wake.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    woken = woken => {
                        if let Err(tokio::sync::broadcast::error::RecvError::Closed) = woken {
                            wake = None;
                        }
                    }
                    () = tokio::time::sleep(LEASE / 3) => {}
                    () = stop.cancelled() => return,
                }
                continue;
            }
            let started = Instant::now();
            let mut cursor = current.cursor_seq;
            for event in page {
                if filter.matches(&event.event_type) {
                    // Advance past what was skipped before a slow delivery.
                    if cursor < event.seq - 1 {
                        let _ = self
                            .inner
                            .store
                            .advance_webhook(hook.id, self.inner.owner, event.seq - 1)
                            .await;
                    }
                    if !self.deliver_with_retries(&current, &event, &stop).await {
                        return;
                    }
                    if !matches!(
                        self.inner
                            .store
                            .advance_webhook(hook.id, self.inner.owner, event.seq)
                            .await,
                        Ok(true)
                    ) {
                        // Lost the lease (or the store failed): start over from the stored cursor.
                        break;
                    }
                }
                cursor = event.seq;
                if started.elapsed() > LEASE / 3 {
                    break;
                }
            }
            if cursor > current.cursor_seq {
                let _ = self
                    .inner
                    .store
                    .advance_webhook(hook.id, self.inner.owner, cursor)
                    .await;
            }
        }
    }

    /// Attempts one event until delivered or dead-lettered; false if stopped first.
    async fn deliver_with_retries(
        &self,
        hook: &Webhook,
        event: &Event,
        stop: &CancellationToken,
    ) -> bool {
        let max = self.inner.config.max_attempts;
        for attempt in 1..=max {
            let delivery = self
                .attempt(hook, event, i64::from(attempt), attempt == max)
                .await;
            let outcome = delivery.outcome;
            let events = dead_letter_event(hook, event, &delivery);
            match self.inner.store.record_delivery(&delivery, &events).await {
                Ok(committed) => self.inner.hub.publish(&committed),
                Err(e) => tracing::warn!(error = %e, "cannot log a webhook delivery"),
            }
            match outcome {
                Outcome::Delivered => return true,
                Outcome::DeadLettered => {
                    tracing::warn!(webhook_id = %hook.id, event_seq = event.seq, attempts = max,
                        "webhook delivery dead-lettered");
                    return true;
                }
                Outcome::Failed => {}
            }
            let exp = self
                .inner
                .config
                .retry_base_delay
                .saturating_mul(1u32 << (attempt - 1).min(16));
            let cap = exp.min(self.inner.config.retry_max_delay);
            let wait = cap.mul_f64(0.5 + fastrand::f64() / 2.0);
            if sleep_or_stop(wait, stop).await {
                return false;
            }
        }
        true
    }

    /// One signed POST of `event` to the webhook, logged as a [`Delivery`].
    pub async fn attempt(
        &self,
        hook: &Webhook,
        event: &Event,
        attempt: i64,
        last: bool,
    ) -> Delivery {
        let started = Instant::now();
        let body = serde_json::to_vec(event).unwrap_or_default();
        let id = event.event_id.to_string();
        let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let result = match sign(&hook.secret, &id, timestamp, &body) {
            None => Err("the stored secret is not valid base64".to_owned()),
            Some(signature) => self
                .inner
                .client
                .post(&hook.url)
                .header("content-type", "application/json")
                .header("webhook-id", &id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature)
                .body(body)
                .send()
                .await
                .map_err(|e| describe(&e)),
        };
        let (status_code, error) = match result {
            Ok(res) if res.status().is_success() => (Some(i64::from(res.status().as_u16())), None),
            Ok(res) => {
                let status = res.status().as_u16();
                let mut text = res.text().await.unwrap_or_default();
                text.truncate(text.floor_char_boundary(MAX_ERROR));
                (
                    Some(i64::from(status)),
                    Some(format!("HTTP {status}: {text}")),
                )
            }
            Err(e) => (None, Some(e)),
        };
        let outcome = match (&error, last) {
            (None, _) => Outcome::Delivered,
            (Some(_), false) => Outcome::Failed,
            (Some(_), true) => Outcome::DeadLettered,
        };
        metrics::counter!("keel_webhook_deliveries_total", "outcome" => outcome.as_str())
            .increment(1);
        Delivery {
            id: DeliveryId::new(),
            webhook_id: hook.id,
            workspace_id: hook.workspace_id,
            event_seq: event.seq,
            event_id: event.event_id,
            event_type: event.event_type.clone(),
            attempt,
            outcome,
            status_code,
            error,
            duration_ms: i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX),
            created_at: time::OffsetDateTime::now_utc(),
        }
    }
}

/// A transport error in words, with its cause chain (e.g. the resolver's SSRF refusal).
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Sleeps; true if `stop` was cancelled first.
async fn sleep_or_stop(wait: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        () = stop.cancelled() => true,
    }
}

/// The `dead_letter.created` event of a delivery that ran out of attempts, committed with
/// its log row. None for other outcomes — and none when the dead-lettered event is itself
/// a `dead_letter.created`, so two failing endpoints subscribed to everything cannot feed
/// each other an endless chain (that case is logged and counted instead).
fn dead_letter_event(hook: &Webhook, event: &Event, delivery: &Delivery) -> Vec<NewEvent> {
    if delivery.outcome != Outcome::DeadLettered {
        return Vec::new();
    }
    if event.event_type == EventType::DeadLetterCreated.as_str() {
        metrics::counter!("keel_webhook_dead_letters_unannounced_total").increment(1);
        return Vec::new();
    }
    vec![
        NewEvent::new(
            EventType::DeadLetterCreated,
            hook.workspace_id,
            serde_json::json!({
                "queue": "webhooks",
                "reason": delivery.error.clone().unwrap_or_default(),
                "attempts": delivery.attempt,
                "job_id": delivery.id.to_string(),
                "webhook_id": hook.id.to_string(),
                "event_id": event.event_id.to_string(),
                "event_seq": event.seq,
                "event_type": event.event_type,
            }),
        )
        .correlated(event.correlation_id.clone()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_standard_webhooks_test_vector() {
        // From the Standard Webhooks spec's reference libraries.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        let signature = sign(secret, id, 1_614_265_330, body).unwrap();
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "255.255.255.255",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn urls_are_checked_for_scheme_and_internal_targets() {
        assert!(
            check_url("ftp://example.com/x", true)
                .await
                .unwrap_err()
                .contains("http")
        );
        assert!(check_url("not a url", true).await.is_err());
        assert!(
            check_url("https://user:pw@example.com/", true)
                .await
                .unwrap_err()
                .contains("credentials")
        );
        for url in [
            "http://127.0.0.1:9/h",
            "http://[::1]/h",
            "http://169.254.169.254/latest",
            "http://10.0.0.1/",
            "http://localhost:8080/",
        ] {
            let err = check_url(url, false).await.unwrap_err();
            assert!(err.contains("internal address"), "{url}: {err}");
        }
        assert!(check_url("http://127.0.0.1:9/h", true).await.is_ok());
    }

    #[tokio::test]
    async fn the_delivery_resolver_refuses_internal_names() {
        let err = public_addrs("localhost", 0).await.unwrap_err();
        assert!(err.contains("internal address"), "{err}");
    }

    #[test]
    fn secrets_are_generated_and_checked() {
        let s = generate_secret().unwrap();
        assert!(check_secret(&s).is_ok(), "{s}");
        assert!(check_secret("nope").is_err());
        assert!(check_secret("whsec_!!!").is_err());
        assert!(check_secret("whsec_c2hvcnQ=").is_err());
    }
}
