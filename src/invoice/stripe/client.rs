//! The Stripe transport: async-stripe's typed requests go through [`StripeHttp`], which adds the
//! discipline billing needs and async-stripe's own client does not give a caller control of:
//! a deterministic `Idempotency-Key` on every POST (refused without one), a client-side rate
//! limit shared by all threads, retries with capped jittered backoff on 429/5xx/network errors
//! that honour `Stripe-Should-Retry`, `Stripe-Account` for connected accounts, and an API key that
//! never reaches a log line, an error or a report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use stripe_client_core::{CustomizedStripeRequest, StripeBlockingClient, StripeClientErr, StripeMethod};

use crate::invoice::config::StripeConfig;
use crate::invoice::metrics as m;
use crate::retry::Backoff;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StripeError {
    /// Stripe answered with an error object.
    #[error("stripe {status} {kind}{}: {message}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Api { status: u16, kind: String, code: Option<String>, param: Option<String>, message: String },
    /// No answer: connection refused/reset/dropped, timeout.
    #[error("stripe unreachable: {0}")]
    Transport(String),
    #[error("stripe response could not be read: {0}")]
    Decode(String),
    #[error("stripe client: {0}")]
    Client(String),
}

/// The words of Stripe's refusal of a meter event whose `identifier` is taken ("An event already
/// exists with identifier …"; see [`StripeError::is_duplicate_identifier`]).
pub const DUPLICATE_IDENTIFIER_TEXT: &str = "already exists with identifier";

impl StripeError {
    /// Whether Stripe refused a meter event because its `identifier` is already taken: proof that
    /// an earlier attempt of the same push landed (the identifier is the push id). Real Stripe
    /// answers `400 invalid_request_error` with the message "An event already exists with
    /// identifier …", no `code`, and `Stripe-Should-Retry: false` (as seen in production by
    /// langfuse/langfuse#16292); `resource_already_exists` and `duplicate_meter_event`, codes
    /// Stripe uses for other duplicates, are taken too. Until 2026-12-01 only
    /// `resource_already_exists` was, which is what the emulator answered: against real Stripe a
    /// resend whose Idempotency-Key Stripe no longer held was recorded as refused, and
    /// `--retry-failed` would have pushed it again (found by a review).
    pub fn is_duplicate_identifier(&self) -> bool {
        match self {
            StripeError::Api { status: 400, kind, code, message, .. } if kind == "invalid_request_error" => {
                matches!(code.as_deref(), Some("resource_already_exists" | "duplicate_meter_event"))
                    || message.contains(DUPLICATE_IDENTIFIER_TEXT)
            }
            _ => false,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            StripeError::Api { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// The request parameter Stripe's error names (`error.param`), e.g. `timestamp`.
    pub fn param(&self) -> Option<&str> {
        match self {
            StripeError::Api { param, .. } => param.as_deref(),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            StripeError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the outcome of the request is unknown (it may or may not have been applied).
    /// An `idempotency_error` says the key was already used: the first use may have landed.
    pub fn is_indeterminate(&self) -> bool {
        match self {
            StripeError::Transport(_) | StripeError::Decode(_) => true,
            StripeError::Api { status, kind, .. } => {
                *status == 409 || *status == 429 || *status >= 500 || kind == "idempotency_error"
            }
            StripeError::Client(_) => false,
        }
    }
}

impl StripeClientErr for StripeError {
    fn deserialize_err(msg: impl std::fmt::Display) -> Self {
        StripeError::Decode(msg.to_string())
    }
}

/// A token bucket shared by all request threads.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub fn new(per_sec: u32) -> Self {
        let per_sec = f64::from(per_sec.max(1));
        RateLimiter { per_sec, state: Mutex::new((per_sec.min(10.0), Instant::now())) }
    }

    /// Blocks until a request may be sent.
    pub fn acquire(&self) {
        loop {
            let wait = {
                let mut s = self.state.lock().expect("rate limiter lock");
                let now = Instant::now();
                let burst = self.per_sec.clamp(1.0, 10.0);
                s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.per_sec).min(burst);
                s.1 = now;
                if s.0 >= 1.0 {
                    s.0 -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - s.0) / self.per_sec)
            };
            std::thread::sleep(wait);
        }
    }
}

/// The raw answer of one attempt.
struct Answer {
    status: u16,
    should_retry: Option<bool>,
    /// `Idempotent-Replayed: true`: the answer is one Stripe stored under the Idempotency-Key.
    replayed: bool,
    body: String,
}

pub struct StripeHttp {
    agent: ureq::Agent,
    base: String,
    authorization: String,
    secret: String,
    account: Option<String>,
    /// Sent as `Stripe-Version` (the typed responses follow this version); `None` = account default.
    version: Option<String>,
    limiter: RateLimiter,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    requests: AtomicU64,
}

impl std::fmt::Debug for StripeHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeHttp").field("base", &self.base).field("account", &self.account).finish_non_exhaustive()
    }
}

impl StripeHttp {
    pub fn new(cfg: &StripeConfig, pin_version: bool) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout(Duration::from_secs(cfg.timeout_secs))
            .max_idle_connections_per_host(cfg.concurrency.max(1) * 2)
            .build();
        StripeHttp {
            agent,
            base: cfg.api_base.clone(),
            authorization: format!("Bearer {}", cfg.api_key),
            secret: cfg.api_key.clone(),
            account: (!cfg.account.is_empty()).then(|| cfg.account.clone()),
            version: pin_version.then(|| stripe_client_core::VERSION.to_string()),
            limiter: RateLimiter::new(cfg.max_requests_per_sec),
            max_attempts: cfg.max_attempts,
            initial_backoff: Duration::from_millis(cfg.initial_backoff_ms),
            max_backoff: Duration::from_millis(cfg.max_backoff_ms),
            requests: AtomicU64::new(0),
        }
    }

    /// HTTP requests sent so far (every attempt counts).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Removes the secret from any text that leaves this module.
    fn redact(&self, s: &str) -> String {
        if self.secret.is_empty() {
            s.to_string()
        } else {
            s.replace(&self.secret, "[redacted]")
        }
    }

    /// Sends one request with retries. `path` is below `v1` (`/billing/meter_events`).
    pub fn send(
        &self,
        method: StripeMethod,
        path: &str,
        query: Option<&str>,
        form: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<String, StripeError> {
        let post = matches!(method, StripeMethod::Post);
        if post && idempotency_key.is_none() {
            return Err(StripeError::Client(format!("refusing POST {path} without an Idempotency-Key")));
        }
        let endpoint = endpoint_label(path);
        let renewable = post && renewable_after_5xx(path, form.unwrap_or(""));
        let mut key = idempotency_key.map(str::to_string);
        let mut backoff = Backoff::new(self.initial_backoff, self.max_backoff);
        let mut attempt = 0;
        // A renewed key always gets one attempt of its own, even past `max_attempts`: every run
        // starts with the push's own key, which may hold a stored 500 for 24 hours.
        let mut attempts_allowed = self.max_attempts;
        loop {
            attempt += 1;
            self.limiter.acquire();
            self.requests.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let result = self.attempt(method, path, query, form, key.as_deref());
            metrics::histogram!(m::STRIPE_REQUEST_SECONDS, "endpoint" => endpoint)
                .record(started.elapsed().as_secs_f64());
            let (err, retry) = match result {
                Ok(a) if (200..300).contains(&a.status) => {
                    metrics::counter!(m::STRIPE_REQUESTS, "endpoint" => endpoint, "status" => status_class(a.status))
                        .increment(1);
                    return Ok(a.body);
                }
                Ok(a) => {
                    metrics::counter!(m::STRIPE_REQUESTS, "endpoint" => endpoint, "status" => status_class(a.status))
                        .increment(1);
                    let mut retry = match a.should_retry {
                        Some(r) => r,
                        None => matches!(a.status, 409 | 429 | 500..=599),
                    };
                    if renewable && a.replayed && (500..=599).contains(&a.status) {
                        // A 5xx that Stripe kept under the key (a fresh one is retried as it
                        // is): it would give it to every resend for 24 hours, so the next
                        // attempt goes under a key of its own.
                        let base = idempotency_key.unwrap_or_default();
                        let renewed = format!("{base}{RENEWED_KEY_SEPARATOR}{:016x}", rand::random::<u64>());
                        tracing::warn!(endpoint, status = a.status, key = base, renewed = %renewed,
                            "stripe answered 5xx; the resend goes under a new Idempotency-Key (the request itself makes it harmless)");
                        metrics::counter!(m::STRIPE_KEYS_RENEWED, "endpoint" => endpoint).increment(1);
                        key = Some(renewed);
                        attempts_allowed = attempts_allowed.max(attempt + 1);
                        retry = true;
                    }
                    (self.api_error(a.status, &a.body), retry)
                }
                Err(e) => {
                    metrics::counter!(m::STRIPE_REQUESTS, "endpoint" => endpoint, "status" => "network").increment(1);
                    (e, true)
                }
            };
            if !retry || attempt >= attempts_allowed {
                metrics::counter!(m::STRIPE_ERRORS, "endpoint" => endpoint).increment(1);
                return Err(err);
            }
            metrics::counter!(m::STRIPE_RETRIES, "endpoint" => endpoint).increment(1);
            let delay = backoff.next_delay();
            tracing::debug!(endpoint, attempt, delay_ms = delay.as_millis() as u64, error = %err, "stripe request retried");
            std::thread::sleep(delay);
        }
    }

    fn attempt(
        &self,
        method: StripeMethod,
        path: &str,
        query: Option<&str>,
        form: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<Answer, StripeError> {
        let mut url = format!("{}v1{}", self.base, path);
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(q);
        }
        let verb = match method {
            StripeMethod::Get => "GET",
            StripeMethod::Post => "POST",
            StripeMethod::Delete => "DELETE",
        };
        let mut req = self
            .agent
            .request(verb, &url)
            .set("Authorization", &self.authorization)
            .set("User-Agent", "tally-invoicer");
        if let Some(v) = &self.version {
            req = req.set("Stripe-Version", v);
        }
        if let Some(a) = &self.account {
            req = req.set("Stripe-Account", a);
        }
        if let Some(k) = idempotency_key {
            req = req.set("Idempotency-Key", k);
        }
        let res = match form {
            Some(body) => req.set("Content-Type", "application/x-www-form-urlencoded").send_string(body),
            None if matches!(method, StripeMethod::Post) => {
                req.set("Content-Type", "application/x-www-form-urlencoded").send_string("")
            }
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(StripeError::Transport(self.redact(&t.to_string()))),
        };
        let status = resp.status();
        let should_retry = resp.header("Stripe-Should-Retry").and_then(|v| v.trim().parse::<bool>().ok());
        let replayed = resp.header("Idempotent-Replayed").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let body = resp.into_string().map_err(|e| StripeError::Transport(format!("reading the answer: {e}")))?;
        Ok(Answer { status, should_retry, replayed, body })
    }

    fn api_error(&self, status: u16, body: &str) -> StripeError {
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        let e = &v["error"];
        let text = |k: &str| e.get(k).and_then(serde_json::Value::as_str).map(|s| self.redact(s));
        StripeError::Api {
            status,
            kind: text("type").unwrap_or_else(|| "unknown".into()),
            code: text("code"),
            param: text("param"),
            message: text("message").unwrap_or_else(|| format!("HTTP {status}")),
        }
    }

    /// Every item of a Stripe list at `path` (below `v1`) with the `query` filters, page after
    /// page (`limit=100`, `starting_after` the last id of the page; Stripe: "Pagination").
    pub fn list_all<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &str,
        id: impl Fn(&T) -> String,
    ) -> Result<Vec<T>, StripeError> {
        #[derive(serde::Deserialize)]
        struct Page<T> {
            data: Vec<T>,
            has_more: bool,
        }
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut q = format!("{query}{}limit=100", if query.is_empty() { "" } else { "&" });
            if let Some(a) = &after {
                q.push_str(&format!("&starting_after={}", crate::stripe_emu::form::encode(a)));
            }
            let body = self.send(StripeMethod::Get, path, Some(&q), None, None)?;
            let page: Page<T> = serde_json::from_str(&body).map_err(|e| StripeError::Decode(e.to_string()))?;
            after = page.data.last().map(&id);
            let more = page.has_more;
            out.extend(page.data);
            if !more || after.is_none() {
                return Ok(out);
            }
        }
    }
}

/// What separates a request's own Idempotency-Key from the random part of a renewed one
/// ([`renewable_after_5xx`]).
pub const RENEWED_KEY_SEPARATOR: &str = ".r";

/// Whether a POST may be resent under a new Idempotency-Key after a 5xx answer because the request
/// itself makes a second copy harmless, whatever the key:
/// - a meter event (`/billing/meter_events`) with an `identifier`: Stripe refuses a second event
///   with a taken identifier (unique within a rolling 24 hours at least; Stripe API reference,
///   "Create a billing meter event", `identifier`), and
///   [`StripeError::is_duplicate_identifier`] reads that refusal as the push done;
/// - a usage record with `action=set` (`/subscription_items/{id}/usage_records`), which replaces
///   the quantity at its timestamp (Stripe API reference, "Create a usage record").
///
/// Why a new key at all: Stripe saves the first answer of a request that started executing under
/// its Idempotency-Key, "including 500 errors", and gives it to every request with that key for 24
/// hours (Stripe API reference, "Idempotent requests"). A push whose first answer was a stored 500
/// would fail the same way on every resend for a day. The key is renewed when a 5xx comes back
/// marked `Idempotent-Replayed: true` (a stored one); a fresh 5xx is retried under the same key
/// first, so that an answer lost after the write is replayed rather than met as a taken
/// identifier. A renewed key always gets one attempt, even past `stripe.max_attempts`. An
/// `increment`, a cancel, a customer or a subscription keeps its key: resent under a new one it
/// could be applied twice.
pub fn renewable_after_5xx(path: &str, form: &str) -> bool {
    let mut fields = form.split('&');
    if path == "/billing/meter_events" {
        fields.any(|f| f.strip_prefix("identifier=").is_some_and(|v| !v.is_empty()))
    } else if path.starts_with("/subscription_items/") && path.ends_with("/usage_records") {
        fields.any(|f| f == "action=set")
    } else {
        false
    }
}

/// async-stripe's typed requests run through the same discipline.
impl StripeBlockingClient for StripeHttp {
    type Err = StripeError;

    fn execute(&self, req: CustomizedStripeRequest) -> Result<Bytes, StripeError> {
        let (rb, cfg) = req.into_pieces();
        let key = cfg.request_strategy.and_then(|s| s.get_key()).map(|k| k.into_inner());
        self.send(rb.method, &rb.path, rb.query.as_deref(), rb.body.as_deref(), key.as_deref()).map(Bytes::from)
    }
}

/// Path fragments and their metric labels, most specific first.
const ENDPOINTS: &[(&str, &str)] = &[
    ("/billing/meter_events", "meter_events"),
    ("/billing/meter_event_adjustments", "meter_event_adjustments"),
    ("/event_summaries", "meter_event_summaries"),
    ("/billing/meters", "meters"),
    ("/usage_records", "usage_records"),
    ("/usage_record_summaries", "usage_record_summaries"),
    ("/customers", "customers"),
    ("/subscription", "subscriptions"),
];

/// A bounded label for a path (ids left out).
fn endpoint_label(path: &str) -> &'static str {
    ENDPOINTS.iter().find(|(fragment, _)| path.contains(fragment)).map_or("other", |(_, label)| label)
}

fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        409 => "409",
        429 => "429",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::{renewable_after_5xx, StripeError};

    fn api(status: u16, kind: &str, code: Option<&str>, message: &str) -> StripeError {
        StripeError::Api { status, kind: kind.into(), code: code.map(Into::into), param: None, message: message.into() }
    }

    /// Only a request that is harmless twice whatever its key goes under a new key after a 5xx.
    #[test]
    fn only_requests_harmless_twice_renew_their_key() {
        let event = "event_name=tokens&identifier=tally_ab12&payload%5Bvalue%5D=3&timestamp=1";
        assert!(renewable_after_5xx("/billing/meter_events", event));
        assert!(!renewable_after_5xx("/billing/meter_events", "event_name=tokens&payload%5Bvalue%5D=3"));
        assert!(!renewable_after_5xx("/billing/meter_events", "event_name=tokens&identifier="));
        assert!(renewable_after_5xx("/subscription_items/si_1/usage_records", "quantity=5&timestamp=1&action=set"));
        assert!(!renewable_after_5xx(
            "/subscription_items/si_1/usage_records",
            "quantity=5&timestamp=1&action=increment"
        ));
        assert!(!renewable_after_5xx("/billing/meter_event_adjustments", "event_name=tokens&type=cancel"));
        assert!(!renewable_after_5xx("/customers", "name=identifier%3Dx&identifier=y"));
    }

    /// Real Stripe's refusal of a taken identifier has no code (langfuse/langfuse#16292); the
    /// coded duplicates count too; other 400s, and the same text in another error, do not.
    #[test]
    fn a_taken_identifier_is_recognised_in_stripes_own_words() {
        let real = "An event already exists with identifier tracing:org-1:1795860000.";
        assert!(api(400, "invalid_request_error", None, real).is_duplicate_identifier());
        assert!(api(400, "invalid_request_error", Some("resource_already_exists"), "x").is_duplicate_identifier());
        assert!(api(400, "invalid_request_error", Some("duplicate_meter_event"), "x").is_duplicate_identifier());
        let timestamp = "Timestamp must be within the past 35 calendar days.";
        assert!(
            !api(400, "invalid_request_error", Some("timestamp_outside_window"), timestamp).is_duplicate_identifier()
        );
        assert!(!api(400, "idempotency_error", None, real).is_duplicate_identifier());
        assert!(!api(500, "api_error", None, real).is_duplicate_identifier());
        assert!(!StripeError::Transport(real.into()).is_duplicate_identifier());
    }
}
