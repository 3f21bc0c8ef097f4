//! What the pipeline must produce for a generated workload, computed independently of it: the
//! meters are evaluated on `serde_json::Value`s (not the streaming decoder), and deduplication is
//! a plain set of (org, project, id).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::{Deserialize, Serialize};

use crate::meter::{Aggregation, MeterDef, Types};
use crate::reject::Reason;

/// (org, project, meter, hour) → value.
pub type Totals = BTreeMap<(String, String, String, i64), u64>;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Expected {
    /// Additive meters per (org, project, meter, hour); zero values are absent.
    pub totals: Vec<(String, String, String, i64, u64)>,
    /// Distinct values of unique meters per (org, project, meter, hour).
    pub unique_hourly: Vec<(String, String, String, i64, u64)>,
    /// Distinct values of unique meters per (org, project, meter) over the whole run.
    pub unique_overall: Vec<(String, String, String, u64)>,
    /// Every dead-letter record due: (loadgen message id, batch index, reason).
    pub rejected: Vec<(u64, Option<u32>, String)>,
    /// Next offset per partition after the run (from delivery reports).
    pub end_offsets: BTreeMap<i32, i64>,
    pub messages: u64,
    pub events: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected_events: u64,
    /// Seconds from the first message sent to the last one acknowledged by the broker.
    #[serde(default)]
    pub send_secs: f64,
}

/// Accumulates the expectation while the generator produces.
#[derive(Default)]
pub struct Tracker {
    meters: Vec<MeterDef>,
    seen: HashSet<(String, String, String)>,
    totals: Totals,
    unique_hourly: BTreeMap<(String, String, String, i64), HashSet<String>>,
    unique_overall: BTreeMap<(String, String, String), HashSet<String>>,
    pub rejected: BTreeSet<(u64, Option<u32>, Reason)>,
    pub accepted: u64,
    pub duplicates: u64,
}

fn path<'v>(v: &'v serde_json::Value, p: &str) -> Option<&'v serde_json::Value> {
    p.split('.').try_fold(v, |v, k| v.get(k))
}

impl Tracker {
    pub fn new(meters: Vec<MeterDef>) -> Self {
        Tracker { meters, ..Tracker::default() }
    }

    /// A valid event of (org, project) reached the topic.
    pub fn valid(&mut self, org: &str, project: &str, event: &serde_json::Value) {
        let id = event["id"].as_str().expect("generated events have ids").to_string();
        if !self.seen.insert((org.into(), project.into(), id)) {
            self.duplicates += 1;
            return;
        }
        self.accepted += 1;
        let ts = crate::timestamp::parse_rfc3339(event["timestamp"].as_str().expect("ts")).expect("valid ts");
        let hour = ts - ts.rem_euclid(3600);
        let ty = event["type"].as_str().expect("type");
        for m in &self.meters {
            if let Types::Only(ts) = &m.types {
                if !ts.iter().any(|t| t == ty) {
                    continue;
                }
            }
            let k = (org.to_string(), project.to_string(), m.name.clone());
            match m.aggregation {
                Aggregation::Count => *self.totals.entry((k.0, k.1, k.2, hour)).or_default() += 1,
                Aggregation::Sum => {
                    if let Some(v) = path(event, m.path.as_deref().expect("path")).and_then(|v| v.as_u64()) {
                        if v > 0 {
                            *self.totals.entry((k.0, k.1, k.2, hour)).or_default() += v;
                        }
                    }
                }
                Aggregation::Unique => {
                    if let Some(v) = path(event, m.path.as_deref().expect("path")).and_then(|v| v.as_str()) {
                        self.unique_hourly
                            .entry((k.0.clone(), k.1.clone(), k.2.clone(), hour))
                            .or_default()
                            .insert(v.into());
                        self.unique_overall.entry(k).or_default().insert(v.into());
                    }
                }
            }
        }
    }

    pub fn reject(&mut self, msg_id: u64, batch_index: Option<u32>, reason: Reason) {
        self.rejected.insert((msg_id, batch_index, reason));
    }

    pub fn finish(self, end_offsets: BTreeMap<i32, i64>, messages: u64, events: u64, send_secs: f64) -> Expected {
        Expected {
            send_secs,
            totals: self.totals.into_iter().map(|((o, p, m, h), v)| (o, p, m, h, v)).collect(),
            unique_hourly: self
                .unique_hourly
                .into_iter()
                .map(|((o, p, m, h), s)| (o, p, m, h, s.len() as u64))
                .collect(),
            unique_overall: self.unique_overall.into_iter().map(|((o, p, m), s)| (o, p, m, s.len() as u64)).collect(),
            rejected_events: self.rejected.len() as u64,
            rejected: self.rejected.into_iter().map(|(id, b, r)| (id, b, r.as_str().to_string())).collect(),
            end_offsets,
            messages,
            events,
            accepted: self.accepted,
            duplicates: self.duplicates,
        }
    }
}
