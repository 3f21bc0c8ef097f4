//! Threshold notifications, exactly once per (org, meter, period, threshold, transition), across
//! restarts and API replicas (PRODUCT.md §11; the argument is in docs/api.md, "Notifications").
//!
//! * **One owner per org.** Every replica joins the consumer group `notify.group_id` on the topic
//!   `notify.topic` (`tally.entitlements`); an org belongs to the partition Kafka's default
//!   partitioner gives its id ([`partition::partition_of`]), and only the replica assigned that
//!   partition evaluates the org.
//! * **The topic is the ledger.** An org's record holds its whole state and every notification of
//!   its recent periods ([`ledger::OrgRecord`]). On assignment the owner writes a barrier record to
//!   the partition and reads the partition from its start until it reads that barrier: it then
//!   knows every record written before it owned the partition, its own earlier incarnations' and
//!   the previous owner's included, and evaluates nothing before.
//! * **Decide, write, then remember.** A due notification ([`ledger::due`]) is written to the
//!   topic and counted as sent only once the broker acknowledged it. A write whose outcome is
//!   unknown (timeout, lost acknowledgement) makes the owner read up to a new barrier before
//!   deciding again: if the record landed, it is found and not written twice.
//! * **Webhooks** go out after the record is acknowledged, signed, retried, logged
//!   ([`webhook`]); a new owner re-sends those without a final row in the log, with the same id.

pub mod ledger;
pub mod partition;
pub mod webhook;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;

use super::config::{ApiConfig, NotifyConfig};
use super::entitlements::entitlements;
use super::http::AppState;
use crate::sink::clickhouse::ChError;
use crate::source::worker::now_secs;
use crate::timestamp::format_rfc3339;
use ledger::{due, OrgRecord};
use partition::partition_of;
use webhook::{settled, WebhookConfig, Webhooks};

/// Header that marks a barrier record (key "", which no org id can be).
pub const BARRIER_HEADER: &str = "tally-barrier";

/// A partition this replica owns.
struct Owned {
    /// The barrier it waits for; `None` once read (the partition's ledger is complete).
    barrier: Option<String>,
    /// A barrier is due but not yet written (written, or retried, every loop).
    needs_barrier: bool,
    /// Webhooks of the partition's taken-over notifications still to re-send (retried every
    /// loop until the delivery log could be read).
    resend: bool,
}

/// Starts the notifier thread (if `notify.enabled`).
pub fn spawn(cfg: &ApiConfig, state: Arc<AppState>) -> anyhow::Result<()> {
    if !cfg.notify.enabled {
        return Ok(());
    }
    let mut n = Notifier::new(cfg, state)?;
    std::thread::Builder::new().name("notifier".into()).spawn(move || n.run())?;
    Ok(())
}

struct Notifier {
    state: Arc<AppState>,
    cfg: NotifyConfig,
    consumer: BaseConsumer,
    producer: FutureProducer,
    rt: tokio::runtime::Runtime,
    /// Distinguishes this process's barriers from any other's.
    nonce: String,
    barriers: u64,
    owned: BTreeMap<i32, Owned>,
    /// Latest record per org of the owned partitions.
    ledger: HashMap<String, OrgRecord>,
    webhooks: Option<Webhooks>,
}

/// Why a round stopped early; the next round starts over from the ledger.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("ClickHouse: {0}")]
    ClickHouse(#[from] ChError),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("partition {0} was revoked")]
    Revoked(i32),
}

impl Notifier {
    fn new(cfg: &ApiConfig, state: Arc<AppState>) -> anyhow::Result<Notifier> {
        let n = &cfg.notify;
        let kafka = crate::config::KafkaConfig { group_id: n.group_id.clone(), ..cfg.kafka.clone() };
        let mut c = crate::source::consumer_config(&kafka);
        // Never commits: every assignment reads its partition from the start (the ledger).
        c.set("client.id", "tally-api-notifier")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "0");
        let mut p = crate::source::client_config(&kafka);
        // No retries inside librdkafka: a retried append whose first answer was lost would put the
        // record on the topic twice unseen. Every unacknowledged write instead sends the owner
        // back to a barrier read (step 4 of the design), which finds a record that did land.
        p.set("client.id", "tally-api-notifier")
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .set("message.send.max.retries", "0")
            .set("message.timeout.ms", "10000");
        let webhooks = (!n.webhook_url.is_empty()).then(|| {
            Webhooks::spawn(
                WebhookConfig {
                    url: n.webhook_url.clone(),
                    key: webhook::signing_key(&n.webhook_secret.0).expect("checked by ApiConfig::validate"),
                    max_attempts: n.webhook_max_attempts,
                    timeout: Duration::from_millis(n.webhook_timeout_ms),
                    backoff: Duration::from_millis(n.webhook_backoff_ms),
                },
                state.ch.clone(),
            )
        });
        Ok(Notifier {
            state,
            cfg: n.clone(),
            consumer: c.create()?,
            producer: p.create()?,
            rt: tokio::runtime::Builder::new_current_thread().enable_all().build()?,
            nonce: format!("{:016x}", rand::random::<u64>()),
            barriers: 0,
            owned: BTreeMap::new(),
            ledger: HashMap::new(),
            webhooks,
        })
    }

    fn run(&mut self) {
        if let Err(e) = self.consumer.subscribe(&[&self.cfg.topic]) {
            tracing::error!(error = %e, topic = %self.cfg.topic, "notifier cannot subscribe; notifications are off");
            return;
        }
        let every = Duration::from_millis(self.cfg.interval_ms);
        let mut next = Instant::now();
        loop {
            self.pump(Duration::from_millis(100));
            if let Err(e) = self.sync_assignment() {
                tracing::warn!(error = %e, "notifier: assignment not settled");
                continue;
            }
            let ready = !self.owned.is_empty() && self.owned.values().all(|o| o.barrier.is_none());
            if ready && Instant::now() >= next {
                next = Instant::now() + every;
                let started = Instant::now();
                match self.evaluate() {
                    Ok(n) => {
                        metrics::histogram!("tally_api_notify_round_seconds").record(started.elapsed().as_secs_f64());
                        if n > 0 {
                            tracing::info!(records = n, "notifier: records written");
                        }
                    }
                    Err(e) => {
                        metrics::counter!("tally_api_notify_round_errors_total").increment(1);
                        tracing::warn!(error = %e, "notifier: round stopped; the next one starts over");
                    }
                }
            }
        }
    }

    /// Reads what the broker has for the owned partitions (barriers, records).
    fn pump(&mut self, wait: Duration) {
        let mut timeout = wait;
        for _ in 0..10_000 {
            let Some(result) = self.consumer.poll(timeout) else { return };
            timeout = Duration::ZERO;
            let m = match result {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "notifier: consumer error");
                    return;
                }
            };
            let p = m.partition();
            let Some(owned) = self.owned.get_mut(&p) else { continue };
            let key = m.key().unwrap_or_default();
            if key.is_empty() {
                let mark = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == BARRIER_HEADER).and_then(|h| h.value).map(|v| v.to_vec()));
                if mark.is_some() && mark.as_deref() == owned.barrier.as_deref().map(str::as_bytes) {
                    owned.barrier = None;
                    owned.resend = true;
                    tracing::info!(partition = p, "notifier: partition ready");
                }
                continue;
            }
            match serde_json::from_slice::<OrgRecord>(m.payload().unwrap_or_default()) {
                Ok(r) => {
                    let newer = self.ledger.get(&r.org_id).is_none_or(|l| r.seq > l.seq);
                    if newer {
                        self.ledger.insert(r.org_id.clone(), r);
                    }
                }
                Err(e) => {
                    tracing::warn!(partition = p, offset = m.offset(), error = %e, "notifier: unreadable record skipped")
                }
            }
        }
    }

    fn partitions(&self) -> Result<i32, RoundError> {
        let md = self
            .consumer
            .fetch_metadata(Some(&self.cfg.topic), Duration::from_secs(5))
            .map_err(|e| RoundError::Kafka(e.to_string()))?;
        let n = md.topics().iter().find(|t| t.name() == self.cfg.topic).map_or(0, |t| t.partitions().len());
        if n == 0 {
            return Err(RoundError::Kafka(format!("topic {} has no partitions", self.cfg.topic)));
        }
        Ok(n as i32)
    }

    /// Follows the group's assignment: new partitions get a barrier, revoked ones are forgotten.
    fn sync_assignment(&mut self) -> Result<(), RoundError> {
        let assigned: BTreeSet<i32> = self
            .consumer
            .assignment()
            .map_err(|e| RoundError::Kafka(e.to_string()))?
            .elements()
            .iter()
            .filter(|e| e.topic() == self.cfg.topic)
            .map(|e| e.partition())
            .collect();
        let gone: Vec<i32> = self.owned.keys().filter(|p| !assigned.contains(p)).copied().collect();
        if !gone.is_empty() {
            let n = self.partitions()?;
            for p in &gone {
                self.owned.remove(p);
            }
            self.ledger.retain(|org, _| !gone.contains(&partition_of(org.as_bytes(), n)));
            tracing::info!(partitions = ?gone, "notifier: partitions revoked");
        }
        for p in assigned {
            if let std::collections::btree_map::Entry::Vacant(e) = self.owned.entry(p) {
                e.insert(Owned { barrier: None, needs_barrier: true, resend: false });
                tracing::info!(partition = p, "notifier: partition assigned; reading its records up to a barrier");
            }
        }
        let due: Vec<i32> = self.owned.iter().filter(|(_, o)| o.needs_barrier).map(|(p, _)| *p).collect();
        for p in due {
            self.barrier(p)?;
        }
        let resend: Vec<i32> = self.owned.iter().filter(|(_, o)| o.resend).map(|(p, _)| *p).collect();
        for p in resend {
            self.resend(p);
        }
        Ok(())
    }

    /// Writes a barrier to `p`; the partition is not evaluated until it is read back. A barrier
    /// that could not be written stays due (`needs_barrier`) and is tried again next loop.
    fn barrier(&mut self, p: i32) -> Result<(), RoundError> {
        self.barriers += 1;
        let mark = format!("{}-{}", self.nonce, self.barriers);
        let Some(o) = self.owned.get_mut(&p) else { return Ok(()) };
        o.barrier = Some(mark.clone());
        o.needs_barrier = true;
        let headers = OwnedHeaders::new().insert(Header { key: BARRIER_HEADER, value: Some(mark.as_bytes()) });
        let record = FutureRecord::to(&self.cfg.topic).partition(p).key("").payload("").headers(headers);
        self.rt
            .block_on(self.producer.send(record, Duration::from_secs(10)))
            .map_err(|(e, _)| RoundError::Kafka(format!("barrier to partition {p}: {e}")))?;
        if let Some(o) = self.owned.get_mut(&p) {
            o.needs_barrier = false;
        }
        Ok(())
    }

    /// A partition's ledger is complete: re-sends its notifications whose webhook never settled
    /// (same id, same body). Stays due while the delivery log cannot be read.
    fn resend(&mut self, p: i32) {
        let Some(webhooks) = &self.webhooks else {
            if let Some(o) = self.owned.get_mut(&p) {
                o.resend = false;
            }
            return;
        };
        let Ok(n) = self.partitions() else { return };
        let mine: Vec<&OrgRecord> =
            self.ledger.values().filter(|r| partition_of(r.org_id.as_bytes(), n) == p).collect();
        let ids: Vec<String> = mine.iter().flat_map(|r| r.notifications.iter().map(|n| n.id.clone())).collect();
        match settled(&self.state.ch, &ids) {
            Ok(done) => {
                for r in mine {
                    for note in r.notifications.iter().filter(|n| !done.contains(&n.id)) {
                        webhooks.send(note.clone());
                    }
                }
                if let Some(o) = self.owned.get_mut(&p) {
                    o.resend = false;
                }
            }
            Err(e) => tracing::warn!(error = %e, "notifier: delivery log unreadable; re-sends of taken-over orgs wait"),
        }
    }

    /// Orgs with a plan that may have usage: those named in the plans file, and (with a default
    /// plan) every org with usage in the kept periods.
    fn candidates(&self, now: i64) -> Result<BTreeSet<String>, ChError> {
        let plans = &self.state.plans;
        let mut orgs: BTreeSet<String> = plans.assigned().map(|(o, _)| o.to_string()).collect();
        orgs.extend(self.ledger.keys().cloned());
        if plans.has_default() {
            let sql = format!(
                "SELECT DISTINCT org_id FROM {}.usage_hourly_agg WHERE hour >= toDateTime({}) FORMAT TabSeparated",
                self.state.ch.database(),
                now - 32 * 86_400
            );
            let body = self.state.ch.query(&sql)?;
            orgs.extend(String::from_utf8_lossy(&body).lines().map(crate::invoice::sql::unescape));
        }
        Ok(orgs)
    }

    /// One round over the owned orgs; returns the records written.
    fn evaluate(&mut self) -> Result<usize, RoundError> {
        let n = self.partitions()?;
        let now = now_secs();
        let keep_after = format_rfc3339(now - i64::from(self.cfg.keep_days) * 86_400);
        let mut written = 0;
        for org in self.candidates(now)? {
            let p = partition_of(org.as_bytes(), n);
            if !self.owned.contains_key(&p) {
                continue;
            }
            let plan = self.state.plans.for_org(&org);
            let items = match plan.map(|plan| entitlements(&self.state.ch, &self.state.meters, &org, plan, now)) {
                None => Vec::new(),
                Some(Ok(items)) => items,
                // A figure of this org beyond 64 bits (PRODUCT.md §1) refuses this org's
                // evaluation, named and counted, not the round of every other org.
                Some(Err(e @ ChError::TotalOverflow(_))) => {
                    metrics::counter!("tally_api_notify_orgs_refused_total", "reason" => "total_overflow").increment(1);
                    tracing::error!(org = %org, error = %e, "org skipped this round: its usage cannot be read exactly");
                    continue;
                }
                Some(Err(e)) => return Err(e.into()),
            };
            let records = due(
                &org,
                plan.map(|p| p.plan.as_str()),
                &items,
                self.ledger.get(&org),
                &format_rfc3339(now),
                &keep_after,
            );
            for r in records {
                self.write(p, r)?;
                written += 1;
            }
            // Serve the group between orgs (a rebalance is noticed here, not after the round).
            self.pump(Duration::ZERO);
            self.sync_assignment()?;
        }
        Ok(written)
    }

    /// Writes one record of `p` if `p` is still owned and its ledger complete; remembers it only
    /// once acknowledged. An unknown outcome re-reads the partition up to a new barrier.
    fn write(&mut self, p: i32, r: OrgRecord) -> Result<(), RoundError> {
        if self.owned.get(&p).is_none_or(|o| o.barrier.is_some()) {
            return Err(RoundError::Revoked(p));
        }
        let value = serde_json::to_vec(&r).expect("serializable");
        let record = FutureRecord::to(&self.cfg.topic).partition(p).key(r.org_id.as_str()).payload(&value);
        match self.rt.block_on(self.producer.send(record, Duration::from_secs(10))) {
            Ok(_) => {
                if let Some(note) = &r.notification {
                    metrics::counter!("tally_api_notifications_total", "kind" => match note.kind {
                        ledger::Kind::Crossed => "crossed",
                        ledger::Kind::Recovered => "recovered",
                    })
                    .increment(1);
                    tracing::info!(org = %r.org_id, meter = %note.meter, threshold = note.threshold, kind = ?note.kind, id = %note.id, "notification");
                    if let Some(w) = &self.webhooks {
                        w.send(note.clone());
                    }
                }
                self.ledger.insert(r.org_id.clone(), r);
                Ok(())
            }
            Err((e, _)) => {
                // It may have landed: find out before deciding again.
                self.barrier(p)?;
                Err(RoundError::Kafka(format!("record of {} not acknowledged: {e}", r.org_id)))
            }
        }
    }
}
