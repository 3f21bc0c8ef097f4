//! Webhook deliveries of threshold notifications: signed per Standard Webhooks
//! (<https://www.standardwebhooks.com>: headers `webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`), retried with
//! capped exponential backoff, every attempt logged in ClickHouse (`webhook_deliveries`). The key
//! is taken from the configured secret as the Standard Webhooks libraries take it
//! ([`signing_key`]), so their verifiers accept our deliveries.
//!
//! Delivery is at least once with a stable `webhook-id`: a notifier that takes over an org re-sends
//! what has no final row in the log, and a crash between the receiver's 2xx and the log row
//! re-sends once more. Receivers deduplicate on `webhook-id` (as Standard Webhooks asks).

use std::collections::HashSet;
use std::sync::mpsc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::ledger::{Kind, Notification};
use crate::sink::clickhouse::{quote, ChError, ClickHouse};
use crate::source::worker::now_secs;

/// Where and how to deliver.
#[derive(Clone)]
pub struct WebhookConfig {
    pub url: String,
    /// HMAC-SHA256 key, from the configured secret by [`signing_key`]. Never logged.
    pub key: Vec<u8>,
    pub max_attempts: u32,
    pub timeout: Duration,
    /// First pause between attempts; doubles up to 60 s.
    pub backoff: Duration,
}

/// Outcomes after which a notification is not sent again.
pub const FINAL_OUTCOMES: &[&str] = &["delivered", "rejected", "gave_up"];

/// Why a configured webhook secret cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a `whsec_` secret must be base64 after the prefix (Standard Webhooks)")]
    NotBase64,
    #[error("the signing key must be at least 16 bytes (it is {0})")]
    TooShort(usize),
}

/// The HMAC key of a configured webhook secret. A Standard Webhooks secret (`whsec_` followed by
/// base64, as its libraries generate and verify with) signs with its base64-decoded bytes; any
/// other secret signs with its own UTF-8 bytes. Either must give at least 16 bytes of key.
/// Errors: [`SecretError`].
pub fn signing_key(secret: &str) -> Result<Vec<u8>, SecretError> {
    let key = match secret.strip_prefix("whsec_") {
        Some(b64) => STANDARD.decode(b64).map_err(|_| SecretError::NotBase64)?,
        None => secret.as_bytes().to_vec(),
    };
    if key.len() < 16 {
        return Err(SecretError::TooShort(key.len()));
    }
    Ok(key)
}

/// The `webhook-signature` header value for `body` sent as `id` at `timestamp`.
pub fn signature(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The JSON body of a notification's webhook (the same for every delivery of one id).
pub fn body(n: &Notification) -> Vec<u8> {
    let ty = match n.kind {
        Kind::Crossed => "entitlement.threshold.crossed",
        Kind::Recovered => "entitlement.threshold.recovered",
    };
    serde_json::to_vec(&serde_json::json!({"type": ty, "timestamp": n.at, "data": n})).expect("serializable")
}

/// Ids among `ids` whose delivery is final in the log.
pub fn settled(ch: &ClickHouse, ids: &[String]) -> Result<HashSet<String>, ChError> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let list: Vec<String> = ids.iter().map(|i| quote(i)).collect();
    let finals: Vec<String> = FINAL_OUTCOMES.iter().map(|o| quote(o)).collect();
    let sql = format!(
        "SELECT DISTINCT id FROM {}.webhook_deliveries WHERE id IN ({}) AND outcome IN ({}) FORMAT TabSeparated",
        ch.database(),
        list.join(", "),
        finals.join(", ")
    );
    Ok(String::from_utf8_lossy(&ch.query(&sql)?).lines().map(str::to_string).collect())
}

/// A queue of deliveries served by one thread.
#[derive(Clone)]
pub struct Webhooks {
    tx: mpsc::Sender<Notification>,
}

impl Webhooks {
    pub fn spawn(cfg: WebhookConfig, ch: ClickHouse) -> Webhooks {
        let (tx, rx) = mpsc::channel::<Notification>();
        std::thread::Builder::new()
            .name("webhooks".into())
            .spawn(move || {
                let agent = ureq::AgentBuilder::new().timeout(cfg.timeout).build();
                for n in rx {
                    deliver(&agent, &cfg, &ch, &n);
                }
            })
            .expect("spawn the webhook thread");
        Webhooks { tx }
    }

    /// Queues `n` (sent in order, one at a time).
    pub fn send(&self, n: Notification) {
        let _ = self.tx.send(n);
    }
}

fn deliver(agent: &ureq::Agent, cfg: &WebhookConfig, ch: &ClickHouse, n: &Notification) {
    let body = body(n);
    let mut pause = cfg.backoff;
    for attempt in 1..=cfg.max_attempts.max(1) {
        let ts = now_secs();
        let result = agent
            .post(&cfg.url)
            .set("content-type", "application/json")
            .set("webhook-id", &n.id)
            .set("webhook-timestamp", &ts.to_string())
            .set("webhook-signature", &signature(&cfg.key, &n.id, ts, &body))
            .send_bytes(&body);
        let (status, error) = match result {
            Ok(r) => (r.status(), String::new()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default().chars().take(500).collect()),
            Err(e) => (0, e.to_string()),
        };
        let last = attempt == cfg.max_attempts.max(1);
        let outcome = match status {
            200..=299 => "delivered",
            // A refusal no retry can change (408 and 429 are retried).
            400..=499 if status != 408 && status != 429 => "rejected",
            _ if last => "gave_up",
            _ => "retrying",
        };
        metrics::counter!("tally_api_webhook_attempts_total", "outcome" => outcome).increment(1);
        log(ch, n, &cfg.url, attempt, status, outcome, &error);
        if outcome != "retrying" {
            if outcome != "delivered" {
                tracing::error!(id = %n.id, org = %n.org_id, status, outcome, error = %error, "webhook not delivered");
            }
            return;
        }
        tracing::warn!(id = %n.id, attempt, status, error = %error, "webhook delivery failed; retrying");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_secs(60));
    }
}

/// Appends an attempt to the delivery log, retrying while ClickHouse is unreachable (bounded: a
/// missing row only means the notification is sent once more by the next owner).
fn log(ch: &ClickHouse, n: &Notification, url: &str, attempt: u32, status: u16, outcome: &str, error: &str) {
    let sql = format!(
        "INSERT INTO {}.webhook_deliveries (id, org_id, url, attempt, status, outcome, error, at) VALUES ({}, {}, {}, {attempt}, {status}, {}, {}, toDateTime({}))",
        ch.database(),
        quote(&n.id),
        quote(&n.org_id),
        quote(url),
        quote(outcome),
        quote(error),
        now_secs()
    );
    for i in 0..10 {
        match ch.execute(&sql, false) {
            Ok(()) => return,
            Err(e) if i == 9 || !e.is_transient() => {
                metrics::counter!("tally_api_webhook_log_errors_total").increment(1);
                tracing::error!(id = %n.id, error = %e, "webhook delivery could not be logged");
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500 << i.min(4))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // Standard Webhooks' reference: HMAC-SHA256 over "{id}.{timestamp}.{body}", base64, "v1,".
        let sig = signature(b"secret", "msg_1", 1_614_265_330, br#"{"test": 2432232314}"#);
        assert!(sig.starts_with("v1,"));
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
        mac.update(br#"msg_1.1614265330.{"test": 2432232314}"#);
        assert_eq!(sig, format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes())));
        assert_ne!(sig, signature(b"other", "msg_1", 1_614_265_330, br#"{"test": 2432232314}"#));
    }

    #[test]
    fn whsec_secrets_sign_as_the_standard_webhooks_libraries_verify() {
        // The reference vector of the Standard Webhooks libraries' tests
        // (github.com/standard-webhooks/standard-webhooks, libraries/*: secret, id, timestamp,
        // payload and the signature they expect).
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, br#"{"test": 2432232314}"#),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        // Other secrets are their own bytes; bad and short ones are named.
        assert_eq!(signing_key("test-webhook-secret-0123456789").unwrap(), b"test-webhook-secret-0123456789");
        assert_eq!(signing_key("whsec_not base64!"), Err(SecretError::NotBase64));
        assert_eq!(signing_key("whsec_c2hvcnQ="), Err(SecretError::TooShort(5)));
        assert_eq!(signing_key("short"), Err(SecretError::TooShort(5)));
    }
}
