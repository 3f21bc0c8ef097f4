//! A stateful Stripe emulator: the subset of Stripe's API that invoicing uses, shaped by the
//! OpenAPI spec in `../shared/stripe/`, with Stripe's rules (Bearer auth, form bodies, error JSON,
//! `Idempotency-Key` replay, identifier uniqueness, time windows) and switchable faults.
//!
//! Not Stripe: `/_emulator/*` endpoints (no auth) let tests inject faults, move the clock and read
//! what was recorded.

pub mod form;
pub mod state;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::httpd::{self as http, Reply, Request};
use state::{invalid, Account, ApiError};

/// Stripe keeps idempotent results for 24 hours.
const IDEMPOTENCY_TTL_SECS: i64 = 24 * 3600;

/// Fault injection, each a probability per `/v1/` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Answer 429 with `Stripe-Should-Retry: true` before doing anything.
    pub rate_429: f64,
    /// Answer 500 with `Stripe-Should-Retry: true` before doing anything.
    pub rate_500: f64,
    /// POSTs only: do the write, then drop the connection without answering.
    pub rate_drop_after_write: f64,
    /// Meter events only: accept the event (200), then drop it as Stripe's asynchronous
    /// validation would: it never counts in a summary.
    pub rate_async_drop: f64,
    /// Keep no Idempotency-Key: every request runs afresh, as after Stripe forgot a key (it keeps
    /// them 24 hours). A resent meter event then meets its own `identifier` and is refused.
    pub forget_idempotency_keys: bool,
    /// POSTs with an Idempotency-Key not seen before: the request starts executing (half of the
    /// time its write is done), then fails with a 500 that is saved under the key, as Stripe saves
    /// "the resulting status code and body of the first request made for any given idempotency
    /// key, … including 500 errors" (Stripe API reference, "Idempotent requests"): every resend
    /// with that key gets the same 500 for 24 hours.
    pub rate_500_stored: f64,
}

/// What the emulator counted (for tests and the demo).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    pub requests: u64,
    pub posts: u64,
    pub unauthorized: u64,
    pub injected_429: u64,
    pub injected_500: u64,
    pub stored_500: u64,
    pub injected_drops: u64,
    pub idempotent_replays: u64,
    pub meter_events_created: u64,
    pub identifier_conflicts: u64,
    pub adjustments_created: u64,
    pub usage_records_created: u64,
    pub meter_events_dropped: u64,
}

struct Saved {
    fingerprint: String,
    status: u16,
    body: Value,
    at: i64,
}

struct Inner {
    accounts: HashMap<String, Account>,
    idempotency: HashMap<(String, String), Saved>,
    faults: Faults,
    rng: StdRng,
    clock_offset_secs: i64,
    stats: Stats,
}

struct Shared {
    api_key: String,
    inner: Mutex<Inner>,
}

/// A running emulator; stops when dropped.
pub struct Emulator {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Emulator {
    /// Listens on `addr` (port 0 picks a free one) and serves in a background thread.
    pub fn start(addr: &str, api_key: &str, seed: u64) -> std::io::Result<Emulator> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            api_key: api_key.to_string(),
            inner: Mutex::new(Inner {
                accounts: HashMap::new(),
                idempotency: HashMap::new(),
                faults: Faults::default(),
                rng: StdRng::seed_from_u64(seed),
                clock_offset_secs: 0,
                stats: Stats::default(),
            }),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let handler = {
            let shared = Arc::clone(&shared);
            Arc::new(move |req: Request| handle(&shared, req))
        };
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || http::serve(listener, stop, handler))
        };
        Ok(Emulator { addr, stop, thread: Some(thread), shared })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to configure as `stripe.api_base`.
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn set_faults(&self, faults: Faults) {
        self.shared.inner.lock().expect("emulator lock").faults = faults;
    }

    pub fn stats(&self) -> Stats {
        self.shared.inner.lock().expect("emulator lock").stats.clone()
    }

    /// Blocks until stopped from another thread (for the binary).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn now_real() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn error_reply(e: ApiError) -> Reply {
    Reply::json(e.status, &e.body)
}

fn authorized(shared: &Shared, req: &Request) -> bool {
    let Some(h) = req.header("authorization") else { return false };
    if let Some(token) = h.strip_prefix("Bearer ") {
        return token.trim() == shared.api_key;
    }
    if let Some(b) = h.strip_prefix("Basic ") {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD.decode(b.trim()).unwrap_or_default();
        let s = String::from_utf8_lossy(&decoded);
        return s.split(':').next() == Some(shared.api_key.as_str());
    }
    false
}

fn handle(shared: &Shared, req: Request) -> Reply {
    let mut inner = shared.inner.lock().expect("emulator lock");
    if let Some(admin) = req.path.strip_prefix("/_emulator/") {
        return handle_admin(&mut inner, admin, &req);
    }
    inner.stats.requests += 1;
    if !authorized(shared, &req) {
        inner.stats.unauthorized += 1;
        let e = json!({"error": {"type": "invalid_request_error",
            "message": "Invalid API Key provided. You did not provide a valid API key in the Authorization header (Bearer)."}});
        return Reply::json(401, &e);
    }
    let post = req.method == "POST";
    if post {
        inner.stats.posts += 1;
    }
    let roll: f64 = inner.rng.gen();
    let f = inner.faults.clone();
    if roll < f.rate_429 {
        inner.stats.injected_429 += 1;
        let e = json!({"error": {"type": "invalid_request_error", "code": "rate_limit",
            "message": "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits."}});
        return Reply::json(429, &e).with_header("Stripe-Should-Retry", "true");
    }
    if roll < f.rate_429 + f.rate_500 {
        inner.stats.injected_500 += 1;
        let e =
            json!({"error": {"type": "api_error", "message": "An unknown error occurred (injected by the emulator)."}});
        return Reply::json(500, &e).with_header("Stripe-Should-Retry", "true");
    }
    let now = now_real() + inner.clock_offset_secs;
    let account = req.header("stripe-account").unwrap_or("").to_string();
    let body = String::from_utf8_lossy(&req.body).into_owned();
    let key = if post { req.header("idempotency-key").map(str::to_string) } else { None };
    // Stripe compares the parameters, not the bytes: the same form in another order is the same request.
    let fingerprint = format!("{} {} {}", req.method, req.path, form::parse(&body));
    if let Some(k) = &key {
        inner.idempotency.retain(|_, s| now - s.at < IDEMPOTENCY_TTL_SECS);
        if let Some(saved) = inner.idempotency.get(&(account.clone(), k.clone())) {
            if saved.fingerprint != fingerprint {
                let e = json!({"error": {"type": "idempotency_error",
                    "message": format!("Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{k}' if you meant to execute a different request.")}});
                return Reply::json(400, &e);
            }
            let (status, body) = (saved.status, saved.body.clone());
            inner.stats.idempotent_replays += 1;
            return Reply::json(status, &body)
                .with_header("Idempotent-Replayed", "true")
                .with_header("Idempotency-Key", k);
        }
    }
    let params = form::parse(if post { &body } else { &req.query });
    // Drawn for every request, so that the other faults' draws do not depend on this one's rate.
    let (stored_roll, write_roll): (f64, f64) = (inner.rng.gen(), inner.rng.gen());
    let stored_500 = key.is_some() && stored_roll < f.rate_500_stored;
    let result = if stored_500 && write_roll < 0.5 {
        Err(stored_500_error())
    } else {
        let acct = inner.accounts.entry(account.clone()).or_default();
        route(acct, &req.method, &req.path, &params, now)
    };
    let (status, out) = match result {
        Ok(_) if stored_500 => {
            let e = stored_500_error();
            (e.status, e.body)
        }
        Ok(v) => (200, v),
        Err(e) => (e.status, e.body),
    };
    if stored_500 {
        inner.stats.stored_500 += 1;
    }
    if status == 200 {
        match req.path.as_str() {
            "/v1/billing/meter_events" => {
                inner.stats.meter_events_created += 1;
                let drop_roll: f64 = inner.rng.gen();
                if drop_roll < f.rate_async_drop {
                    let id = out["identifier"].as_str().unwrap_or_default().to_string();
                    if let Some(acct) = inner.accounts.get_mut(&account) {
                        if acct.drop_meter_event(&id).is_ok() {
                            inner.stats.meter_events_dropped += 1;
                        }
                    }
                }
            }
            "/v1/billing/meter_event_adjustments" => inner.stats.adjustments_created += 1,
            p if p.ends_with("/usage_records") => inner.stats.usage_records_created += 1,
            _ => {}
        }
    } else if out
        .pointer("/error/message")
        .and_then(Value::as_str)
        .is_some_and(|m| m.contains(crate::invoice::stripe::client::DUPLICATE_IDENTIFIER_TEXT))
        && req.path == "/v1/billing/meter_events"
    {
        inner.stats.identifier_conflicts += 1;
    }
    if let Some(k) = key.filter(|_| !f.forget_idempotency_keys) {
        inner.idempotency.insert((account, k), Saved { fingerprint, status, body: out.clone(), at: now });
    }
    if post && roll < f.rate_429 + f.rate_500 + f.rate_drop_after_write {
        inner.stats.injected_drops += 1;
        return Reply::Drop;
    }
    Reply::json(status, &out).with_header("Request-Id", &format!("req_emu{}", inner.stats.requests))
}

/// The 500 of a request that failed while executing ([`Faults::rate_500_stored`]).
fn stored_500_error() -> ApiError {
    ApiError {
        status: 500,
        body: json!({"error": {"type": "api_error",
            "message": "An unknown error occurred while processing the request (injected by the emulator; saved under the Idempotency-Key)."}}),
    }
}

fn route(a: &mut Account, method: &str, path: &str, p: &Value, now: i64) -> Result<Value, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segs.as_slice()) {
        ("POST", ["v1", "customers"]) => a.create_customer(p, now),
        ("GET", ["v1", "customers"]) => a.list_customers(p),
        ("GET", ["v1", "customers", "search"]) => a.search_customers(p),
        ("GET", ["v1", "customers", id]) => a.customer(id),
        ("POST", ["v1", "billing", "meters"]) => a.create_meter(p, now),
        ("GET", ["v1", "billing", "meters"]) => a.list_meters(p),
        ("GET", ["v1", "billing", "meters", id]) => a.meter(id),
        ("GET", ["v1", "billing", "meters", id, "event_summaries"]) => a.event_summaries(id, p),
        ("POST", ["v1", "billing", "meter_events"]) => a.create_meter_event(p, now),
        ("POST", ["v1", "billing", "meter_event_adjustments"]) => a.create_adjustment(p, now),
        ("POST", ["v1", "prices"]) => a.create_price(p, now),
        ("POST", ["v1", "subscriptions"]) => a.create_subscription(p, now),
        ("GET", ["v1", "subscriptions"]) => a.list_subscriptions(p, now),
        ("GET", ["v1", "invoices"]) => a.list_invoices(p, now),
        ("GET", ["v1", "subscriptions", id]) => a.subscription(id, now),
        ("POST", ["v1", "subscription_items"]) => a.create_item(p, now),
        ("GET", ["v1", "subscription_items"]) => a.list_items(p),
        ("GET", ["v1", "subscription_items", id]) => a.item(id),
        ("POST", ["v1", "subscription_items", id, "usage_records"]) => a.create_usage_record(id, p, now),
        ("GET", ["v1", "subscription_items", id, "usage_record_summaries"]) => a.usage_summaries(id, p),
        _ => Err(ApiError {
            status: 404,
            body: json!({"error": {"type": "invalid_request_error",
                "message": format!("Unrecognized request URL ({method}: {path}).")}}),
        }),
    }
}

fn handle_admin(inner: &mut Inner, what: &str, req: &Request) -> Reply {
    let p = form::parse(if req.method == "POST" { std::str::from_utf8(&req.body).unwrap_or("") } else { &req.query });
    let account = p.get("account").and_then(Value::as_str).unwrap_or("").to_string();
    match (req.method.as_str(), what) {
        ("POST", "faults") => {
            let get = |k: &str| p.get(k).and_then(Value::as_str).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            inner.faults = Faults {
                rate_429: get("rate_429"),
                rate_500: get("rate_500"),
                rate_drop_after_write: get("rate_drop_after_write"),
                rate_async_drop: get("rate_async_drop"),
                forget_idempotency_keys: p.get("forget_idempotency_keys").and_then(Value::as_str) == Some("true"),
                rate_500_stored: get("rate_500_stored"),
            };
            Reply::json(200, &serde_json::to_value(&inner.faults).expect("json"))
        }
        ("POST", "clock") => {
            let by: i64 = p.get("advance_secs").and_then(Value::as_str).and_then(|v| v.parse().ok()).unwrap_or(0);
            inner.clock_offset_secs += by;
            Reply::json(
                200,
                &json!({"now": now_real() + inner.clock_offset_secs, "offset_secs": inner.clock_offset_secs}),
            )
        }
        ("POST", "drop_meter_event") => {
            let id = p.get("identifier").and_then(Value::as_str).unwrap_or("").to_string();
            match inner.accounts.entry(account).or_default().drop_meter_event(&id) {
                Ok(v) => {
                    inner.stats.meter_events_dropped += 1;
                    Reply::json(200, &v)
                }
                Err(e) => error_reply(e),
            }
        }
        ("GET", "stats") => Reply::json(200, &serde_json::to_value(&inner.stats).expect("json")),
        ("GET", "meter_events") => {
            let events: Vec<Value> = inner
                .accounts
                .get(&account)
                .map(|a| {
                    a.events()
                        .iter()
                        .map(|e| {
                            json!({"identifier": e.identifier, "event_name": e.event_name, "customer": e.customer,
                                "value": e.value, "timestamp": e.timestamp, "created": e.created, "cancelled": e.cancelled,
                                "dropped": e.dropped})
                        })
                        .collect()
                })
                .unwrap_or_default();
            Reply::json(200, &json!({ "data": events }))
        }
        _ => error_reply(invalid(format!("unknown emulator endpoint {} /_emulator/{what}", req.method), None, None)),
    }
}
