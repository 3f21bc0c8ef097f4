//! The load generator: realistic §1 traffic for demos, tests and benchmarks, with the expected
//! outcome computed alongside ([`expected`]).
//!
//! Traffic: many orgs/projects; single events and `{"batch": [...]}` messages; EdDSA and HS256
//! JWTs and API keys; a chosen share of duplicate copies (re-sent later, sometimes under another
//! credential of the same project); a chosen share of bad messages covering every §3 reason
//! (forged, wrong-kid, `alg: none`, wrong issuer/audience, expired, revoked, scope-less, missing,
//! malformed, oversized) and of bad events inside batches (malformed, too old, in the future);
//! rejected copies of events that are later sent validly; late and slightly-future timestamps.
//! Every message carries a `x-loadgen-id` header so dead-letter records can be matched.

pub mod expected;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use serde_json::{json, Value};

use crate::devkeys::{basic, bearer, sign_hs256_with, signing_input, DevKeys, Tenant};
use crate::meter::MeterDef;
use crate::reject::Reason;
use expected::{Expected, Tracker};

/// Header naming the generated message (for matching dead-letter records).
pub const H_LOADGEN_ID: &str = "x-loadgen-id";

const EVENT_TYPES: &[(&str, u32)] = &[
    ("trace-create", 20),
    ("span-create", 20),
    ("generation-create", 25),
    ("generation-update", 10),
    ("event-create", 10),
    ("score-create", 10),
    ("sdk-log", 5),
];
const MODELS: &[&str] = &["gpt-4o", "gpt-4o-mini", "claude-sonnet-4", "llama-3.1-70b"];

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenConfig {
    /// Stop after at least this many events (all kinds: accepted, duplicate, rejected).
    pub events: u64,
    /// Events per second (0: as fast as the broker takes them).
    pub rate: u64,
    /// Share of events that are copies of an earlier valid event.
    pub dup_ratio: f64,
    /// Share of messages rejected as a whole.
    pub bad_message_ratio: f64,
    /// Share of events inside batches that are bad on their own.
    pub bad_event_ratio: f64,
    /// Share of messages that are `{"batch": [...]}`.
    pub batch_ratio: f64,
    /// Largest batch generated (valid batches; an over-limit one is generated for `too_large`).
    pub max_batch: usize,
    pub seed: u64,
    /// The worker's `ingest.max_message_bytes` (oversized messages exceed it).
    pub max_message_bytes: usize,
    /// The worker's `dedupe.window_secs` (too-old events precede it).
    pub window_secs: u64,
    /// Distinct user ids per project.
    pub users_per_project: u32,
    /// `x-loadgen-id` of the first message (runs into one topic use disjoint ranges).
    pub first_message_id: u64,
    /// Build every message first, then send them paced at `rate`: the sending side then holds
    /// a rate the building side could not (building a message costs more than sending it).
    /// Holds the whole workload in memory (about 0.8 KiB per event).
    pub prebuild: bool,
    /// Send as a transactional producer (`transactional.id`), committing a transaction every
    /// this many messages (0: no transactions). Each commit writes a marker into every partition
    /// the transaction wrote to, so the records' offsets have gaps, as in a topic fed by Kafka
    /// Streams or any exactly-once producer. A transaction must commit within the producer's
    /// `transaction.timeout.ms` (60 s by default): keep N small at low rates.
    pub transaction_messages: u64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            events: 10_000,
            rate: 0,
            dup_ratio: 0.06,
            bad_message_ratio: 0.03,
            bad_event_ratio: 0.02,
            batch_ratio: 0.3,
            max_batch: 20,
            seed: 42,
            transaction_messages: 0,
            max_message_bytes: 1 << 20,
            window_secs: 30 * 24 * 3600,
            users_per_project: 50,
            first_message_id: 0,
            prebuild: false,
        }
    }
}

#[derive(Default)]
struct Deliveries {
    end_offsets: Mutex<BTreeMap<i32, i64>>,
    errors: Mutex<Vec<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        match r {
            Ok(m) => {
                use rdkafka::Message;
                let mut e = self.end_offsets.lock().expect("lock");
                let v = e.entry(m.partition()).or_insert(0);
                *v = (*v).max(m.offset() + 1);
            }
            Err((e, _)) => self.errors.lock().expect("lock").push(e.to_string()),
        }
    }
}

/// A message about to be produced.
struct Out {
    key: String,
    value: Vec<u8>,
    auth: Option<String>,
    events: u64,
}

struct Gen<'k> {
    cfg: GenConfig,
    keys: &'k DevKeys,
    rng: StdRng,
    now: i64,
    next_event: u64,
    /// Per tenant: recently sent valid events (candidates for duplicate copies).
    sent: Vec<Vec<Value>>,
    /// Events whose rejected copy was sent; a valid copy follows later.
    owed: Vec<(usize, Value)>,
    tracker: Tracker,
    /// Valid signed credentials of the current second, by (tenant, kind): signing is
    /// deterministic (Ed25519, HMAC-SHA256) and the claims depend on `now` only, so a cached
    /// token is the very token a fresh signature would give.
    tokens: HashMap<(usize, u8), String>,
    tokens_at: i64,
}

impl<'k> Gen<'k> {
    fn event(&mut self, tenant: usize) -> Value {
        self.next_event += 1;
        let total: u32 = EVENT_TYPES.iter().map(|t| t.1).sum();
        let mut pick = self.rng.gen_range(0..total);
        let ty = EVENT_TYPES
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .expect("weights")
            .0;
        let age = match self.rng.gen_range(0..100) {
            0..=4 => self.rng.gen_range(3600..72 * 3600), // late
            5 => -self.rng.gen_range(0..200),             // slightly ahead (clock skew)
            _ => self.rng.gen_range(0..2 * 3600),
        };
        let ts = self.now - age;
        let t = &self.keys.tenants[tenant];
        let mut body = json!({
            "traceId": format!("t-{}", self.rng.gen_range(0..10_000)),
            "name": "llm-call",
            "metadata": {"env": "prod", "tags": ["a", "b"]},
        });
        if self.rng.gen_bool(0.9) {
            body["userId"] = format!("u-{}-{}", t.project_id, self.rng.gen_range(0..self.cfg.users_per_project)).into();
        }
        if ty.starts_with("generation") {
            body["model"] = (*MODELS.choose(&mut self.rng).expect("models")).into();
            if ty == "generation-create" || self.rng.gen_bool(0.5) {
                body["usage"] = json!({"input": self.rng.gen_range(0..5000u64), "output": self.rng.gen_range(0..2000u64), "unit": "TOKENS"});
            }
        }
        let millis = self.rng.gen_range(0..1000);
        json!({
            "id": format!("{:016x}-{}", self.cfg.seed, self.next_event),
            "type": ty,
            "timestamp": format!("{}.{millis:03}Z", &crate::timestamp::format_rfc3339(ts)[..19]),
            "body": body,
        })
    }

    /// An event that is bad on its own, and why.
    fn bad_event(&mut self, tenant: usize) -> (Value, Reason) {
        let mut e = self.event(tenant);
        let reason = match self.rng.gen_range(0..6) {
            0 => {
                e.as_object_mut().expect("object").remove("id");
                Reason::Malformed
            }
            1 => {
                e["timestamp"] = "yesterday".into();
                Reason::Malformed
            }
            2 => {
                e["type"] = "generation-create".into();
                e["body"]["usage"] = json!({"input": -5});
                Reason::Malformed
            }
            3 => {
                e["timestamp"] =
                    crate::timestamp::format_rfc3339(self.now - self.cfg.window_secs as i64 - 86_400).into();
                Reason::TooOld
            }
            4 => {
                e["timestamp"] = crate::timestamp::format_rfc3339(self.now + 3600).into();
                Reason::FutureTimestamp
            }
            _ => {
                e["id"] = "".into();
                Reason::Malformed
            }
        };
        (e, reason)
    }

    fn valid_auth(&mut self, tenant: usize) -> String {
        let (keys, now) = (self.keys, self.now);
        let t = &keys.tenants[tenant];
        // Drawn as an i32, as before the cache: the draw's type decides how rand consumes the
        // stream, so a seed keeps its workload.
        let kind = self.rng.gen_range(0..3i32) as u8;
        if kind == 2 {
            return basic(t);
        }
        if self.tokens_at != now {
            self.tokens.clear();
            self.tokens_at = now;
        }
        self.tokens
            .entry((tenant, kind))
            .or_insert_with(|| {
                let claims = keys.claims(t, now, 24 * 3600);
                bearer(&if kind == 0 { keys.sign_eddsa(&claims) } else { keys.sign_hs256(&claims) })
            })
            .clone()
    }

    /// A credential or message defect for a whole message, as (auth, value override, reason).
    fn bad_message(&mut self, tenant: usize, value: Vec<u8>) -> (Option<String>, Vec<u8>, Reason) {
        let t: Tenant = self.keys.tenants[tenant].clone();
        let k = self.keys;
        let claims = k.claims(&t, self.now, 3600);
        let with = |key: &str, v: Value| {
            let mut c = claims.clone();
            c[key] = v;
            c
        };
        match self.rng.gen_range(0..13) {
            0 => (None, value, Reason::MissingCredentials),
            1 => {
                // Signature of another payload.
                let good = k.sign_eddsa(&claims);
                let sig = good.rsplit('.').next().expect("sig").to_string();
                let forged =
                    signing_input(&json!({"alg":"EdDSA","kid":k.ed25519_kid}), &with("org_id", "org-evil".into()));
                (Some(bearer(&format!("{forged}.{sig}"))), value, Reason::InvalidCredentials)
            }
            2 => (
                Some(bearer(&sign_hs256_with(
                    &json!({"alg":"HS256","kid":"unknown"}),
                    &claims,
                    b"0123456789abcdef0123456789abcdef",
                ))),
                value,
                Reason::InvalidCredentials,
            ),
            3 => (
                Some(bearer(&format!("{}.", signing_input(&json!({"alg":"none","kid":k.hs256_kid}), &claims)))),
                value,
                Reason::InvalidCredentials,
            ),
            4 => (
                Some(bearer(&k.sign_eddsa(&with("iss", "https://evil.example".into())))),
                value,
                Reason::InvalidCredentials,
            ),
            5 => (Some(bearer(&k.sign_hs256(&with("aud", "someone-else".into())))), value, Reason::InvalidCredentials),
            6 => {
                let mut wrong = t.clone();
                wrong.secret_key = "sk-lf-wrong".into();
                (Some(basic(&wrong)), value, Reason::InvalidCredentials)
            }
            7 => {
                (Some(bearer(&k.sign_eddsa(&with("exp", (self.now - 3600).into())))), value, Reason::ExpiredCredentials)
            }
            8 => {
                let org = &t.org_id;
                let e = k.expired.iter().find(|x| &x.org_id == org).expect("expired key per org").clone();
                (Some(basic(&e)), value, Reason::ExpiredCredentials)
            }
            9 => {
                let org = &t.org_id;
                let r = k.revoked.iter().find(|x| &x.org_id == org).expect("revoked key per org").clone();
                (Some(basic(&r)), value, Reason::RevokedCredentials)
            }
            10 => (Some(bearer(&k.sign_eddsa(&with("scope", "read".into())))), value, Reason::ForbiddenScope),
            11 => {
                let mut v = value;
                v.truncate(v.len() / 2);
                (Some(self.valid_auth(tenant)), v, Reason::Malformed)
            }
            _ => {
                // Oversized: valid JSON padded past the limit.
                let pad = "x".repeat(self.cfg.max_message_bytes + 1);
                let v = format!(r#"{{"id":"big","type":"sdk-log","timestamp":"2026-01-01T00:00:00Z","pad":"{pad}"}}"#);
                (Some(self.valid_auth(tenant)), v.into_bytes(), Reason::TooLarge)
            }
        }
    }

    fn remember_sent(&mut self, tenant: usize, e: &Value) {
        let list = &mut self.sent[tenant];
        if list.len() >= 64 {
            let i = self.rng.gen_range(0..list.len());
            list[i] = e.clone();
        } else {
            list.push(e.clone());
        }
    }

    /// A valid event for `tenant`: an owed one, a duplicate copy, or a fresh one.
    fn good_event(&mut self, tenant: usize) -> Value {
        if let Some(pos) = self.owed.iter().position(|(t, _)| *t == tenant) {
            return self.owed.swap_remove(pos).1;
        }
        if self.rng.gen_bool(self.cfg.dup_ratio) && !self.sent[tenant].is_empty() {
            return self.sent[tenant].choose(&mut self.rng).expect("non-empty").clone();
        }
        self.event(tenant)
    }

    /// The next message; `msg_id` is its `x-loadgen-id`.
    fn message(&mut self, msg_id: u64) -> Out {
        let tenant = self.rng.gen_range(0..self.keys.tenants.len());
        let t = self.keys.tenants[tenant].clone();
        if self.rng.gen_bool(self.cfg.bad_message_ratio) {
            // A rejected message; half the time its event is sent validly later (a rejected copy
            // must not make the valid one a duplicate).
            let e = self.event(tenant);
            if self.rng.gen_bool(0.5) {
                self.owed.push((tenant, e.clone()));
            }
            let (auth, value, reason) = if self.rng.gen_range(0..20) == 0 {
                let batch: Vec<Value> = (0..1001).map(|i| json!({"id": format!("x{i}")})).collect();
                (Some(self.valid_auth(tenant)), json!({"batch": batch}).to_string().into_bytes(), Reason::TooLarge)
            } else {
                self.bad_message(tenant, e.to_string().into_bytes())
            };
            self.tracker.reject(msg_id, None, reason);
            return Out { key: t.project_id, value, auth, events: 1 };
        }
        let auth = self.valid_auth(tenant);
        if self.rng.gen_bool(self.cfg.batch_ratio) {
            let n = self.rng.gen_range(2..=self.cfg.max_batch.max(2));
            let mut batch = Vec::with_capacity(n);
            for i in 0..n {
                if self.rng.gen_bool(self.cfg.bad_event_ratio) {
                    let (e, reason) = self.bad_event(tenant);
                    self.tracker.reject(msg_id, Some(i as u32), reason);
                    batch.push(e);
                } else {
                    let e = self.good_event(tenant);
                    self.tracker.valid(&t.org_id, &t.project_id, &e);
                    self.remember_sent(tenant, &e);
                    batch.push(e);
                }
            }
            return Out {
                key: t.project_id,
                value: json!({"batch": batch}).to_string().into_bytes(),
                auth: Some(auth),
                events: n as u64,
            };
        }
        let e = self.good_event(tenant);
        self.tracker.valid(&t.org_id, &t.project_id, &e);
        self.remember_sent(tenant, &e);
        Out { key: t.project_id, value: e.to_string().into_bytes(), auth: Some(auth), events: 1 }
    }
}

/// Produces the workload to `topic` and returns what the pipeline must make of it.
pub fn generate(
    cfg: &GenConfig,
    keys: &DevKeys,
    meters: Vec<MeterDef>,
    producer_cfg: &ClientConfig,
    topic: &str,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<Expected> {
    let mut pc = producer_cfg.clone();
    pc.set("acks", "all")
        .set("linger.ms", "20")
        .set("message.max.bytes", (cfg.max_message_bytes * 2 + 4096).to_string());
    if cfg.transaction_messages > 0 {
        // One id per producer: two runs under one id would fence each other.
        pc.set(
            "transactional.id",
            format!("tally-loadgen-{topic}-{}-{}-{}", std::process::id(), cfg.seed, cfg.first_message_id),
        );
    }
    let producer: BaseProducer<Deliveries> =
        pc.create_with_context(Deliveries::default()).context("failed to create producer")?;
    let mut tx = Transactions::start(&producer, cfg.transaction_messages)?;
    let mut g = Gen {
        cfg: cfg.clone(),
        keys,
        rng: StdRng::seed_from_u64(cfg.seed),
        now: crate::source::worker::now_secs(),
        next_event: 0,
        sent: vec![Vec::new(); keys.tenants.len()],
        owed: Vec::new(),
        tracker: Tracker::new(meters),
        tokens: HashMap::new(),
        tokens_at: 0,
    };
    let (mut events, mut messages) = (0u64, 0u64);
    let id = |messages: u64| cfg.first_message_id + messages;
    let mut pacer = Pacer::new(cfg.rate);
    let mut sending = Instant::now();
    let mut built: Vec<(u64, Out)> = Vec::new();
    let mut emit = |msg_id: u64, out: Out| -> anyhow::Result<()> {
        if cfg.prebuild {
            built.push((msg_id, out));
        } else {
            send(&producer, topic, msg_id, &out)?;
            tx.sent(&producer)?;
            pacer.sent(out.events);
        }
        Ok(())
    };
    while events < cfg.events || !g.owed.is_empty() {
        if events >= cfg.events {
            // Pay the owed valid copies.
            let (tenant, e) = g.owed.pop().expect("non-empty");
            let t = keys.tenants[tenant].clone();
            g.tracker.valid(&t.org_id, &t.project_id, &e);
            let auth = g.valid_auth(tenant);
            emit(
                id(messages),
                Out { key: t.project_id, value: e.to_string().into_bytes(), auth: Some(auth), events: 1 },
            )?;
            messages += 1;
            events += 1;
            continue;
        }
        if messages % 1000 == 0 {
            g.now = crate::source::worker::now_secs();
            progress(events);
        }
        let out = g.message(id(messages));
        let n = out.events;
        emit(id(messages), out)?;
        messages += 1;
        events += n;
    }
    if cfg.prebuild {
        (pacer, sending) = (Pacer::new(cfg.rate), Instant::now());
    }
    for (msg_id, out) in built {
        send(&producer, topic, msg_id, &out)?;
        tx.sent(&producer)?;
        pacer.sent(out.events);
    }
    tx.finish(&producer)?;
    producer.flush(Duration::from_secs(120)).context("producer flush timed out")?;
    let errors = producer.context().errors.lock().expect("lock").clone();
    if !errors.is_empty() {
        bail!("{} messages were not delivered; first error: {}", errors.len(), errors[0]);
    }
    let end_offsets = producer.context().end_offsets.lock().expect("lock").clone();
    Ok(g.tracker.finish(end_offsets, messages, events, sending.elapsed().as_secs_f64()))
}

/// A transactional producer's transactions: one open at a time, committed every `every` messages.
struct Transactions {
    every: u64,
    in_open: u64,
}

impl Transactions {
    const TIMEOUT: Duration = Duration::from_secs(60);

    fn start(producer: &BaseProducer<Deliveries>, every: u64) -> anyhow::Result<Transactions> {
        if every > 0 {
            producer.init_transactions(Self::TIMEOUT).context("init_transactions")?;
            producer.begin_transaction().context("begin_transaction")?;
        }
        Ok(Transactions { every, in_open: 0 })
    }

    /// After each message sent: commits the open transaction once it holds `every` messages.
    fn sent(&mut self, producer: &BaseProducer<Deliveries>) -> anyhow::Result<()> {
        if self.every == 0 {
            return Ok(());
        }
        self.in_open += 1;
        if self.in_open >= self.every {
            producer.commit_transaction(Self::TIMEOUT).context("commit_transaction")?;
            producer.begin_transaction().context("begin_transaction")?;
            self.in_open = 0;
        }
        Ok(())
    }

    /// Commits the last transaction.
    fn finish(&self, producer: &BaseProducer<Deliveries>) -> anyhow::Result<()> {
        if self.every > 0 {
            producer.commit_transaction(Self::TIMEOUT).context("commit_transaction")?;
        }
        Ok(())
    }
}

/// Holds a send rate: after each message, sleeps until its events are due.
struct Pacer {
    rate: u64,
    start: Instant,
    events: u64,
}

impl Pacer {
    fn new(rate: u64) -> Pacer {
        Pacer { rate, start: Instant::now(), events: 0 }
    }

    fn sent(&mut self, events: u64) {
        self.events += events;
        if self.rate > 0 {
            let due = Duration::from_secs_f64(self.events as f64 / self.rate as f64);
            if let Some(wait) = due.checked_sub(self.start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}

fn send(producer: &BaseProducer<Deliveries>, topic: &str, msg_id: u64, out: &Out) -> anyhow::Result<()> {
    let id = msg_id.to_string();
    let mut headers = OwnedHeaders::new().insert(Header { key: H_LOADGEN_ID, value: Some(id.as_str()) });
    if let Some(a) = &out.auth {
        headers = headers.insert(Header { key: "authorization", value: Some(a.as_str()) });
    }
    let mut record = BaseRecord::to(topic).key(&out.key).payload(&out.value).headers(headers);
    loop {
        match producer.send(record) {
            Ok(()) => break,
            Err((e, r)) if matches!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::QueueFull)) => {
                producer.poll(Duration::from_millis(20));
                record = r;
            }
            Err((e, _)) => bail!("produce failed: {e}"),
        }
    }
    producer.poll(Duration::ZERO);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(keys: &DevKeys) -> Gen<'_> {
        Gen {
            cfg: GenConfig::default(),
            keys,
            rng: StdRng::seed_from_u64(5),
            now: 1_790_000_000,
            next_event: 0,
            sent: vec![Vec::new(); keys.tenants.len()],
            owed: Vec::new(),
            tracker: Tracker::new(Vec::new()),
            tokens: HashMap::new(),
            tokens_at: 0,
        }
    }

    /// The token cache changes nothing: every credential is the one a fresh signature gives,
    /// within a second and across seconds.
    #[test]
    fn cached_credentials_are_the_freshly_signed_ones() {
        let keys = DevKeys::generate(2, 3, "https://auth.tally.test", "tally-ingest");
        let (mut cached, mut fresh) = (gen(&keys), gen(&keys));
        for i in 0..300 {
            let now = 1_790_000_000 + i / 100;
            (cached.now, fresh.now) = (now, now);
            fresh.tokens.clear();
            let tenant = (i % 6) as usize;
            assert_eq!(cached.valid_auth(tenant), fresh.valid_auth(tenant), "call {i}");
        }
        assert!(cached.tokens.len() > 1 && cached.tokens.len() <= 12, "the cache was used: {}", cached.tokens.len());
    }
}
