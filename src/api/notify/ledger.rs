//! What an org's record on `tally.entitlements` holds, and which notifications are due (pure).
//!
//! The record is the org's whole current state (so the compacted topic is a block/allow list)
//! plus every notification of its recent periods: the latest record of an org is therefore also
//! the ledger of what was notified, and compaction never loses it. A notification is identified
//! by (org, meter, period start, threshold, n), n counting the transitions of that threshold in
//! that period (1 = the first crossing, 2 = a recovery after a correction, 3 = crossed again…):
//! the same transition always gets the same id, whoever computes it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::entitlements::MeterEntitlement;

/// Crossed upwards, or back below after a correction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Crossed,
    Recovered,
}

/// One threshold notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// Stable id (hex), the webhook's `webhook-id`: receivers deduplicate on it.
    pub id: String,
    pub kind: Kind,
    pub org_id: String,
    pub meter: String,
    /// Percent of the limit.
    pub threshold: u32,
    /// Which transition of this threshold in this period (1, 2, …; odd = crossed).
    pub n: u32,
    pub period_start: String,
    pub period_end: String,
    /// Use and limit when it was decided.
    pub used: u64,
    pub limit: u64,
    /// RFC 3339, when it was decided.
    pub at: String,
    /// The org's `has_access` as of this notification (part of the webhook: a re-send carries
    /// the same body).
    pub has_access: bool,
}

/// The value of an org's record on the topic (key: the org id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgRecord {
    pub org_id: String,
    /// Increases by one with every record of the org.
    pub seq: u64,
    pub plan: Option<String>,
    /// False when a hard limit is reached: the ingestion fleet's block list.
    pub has_access: bool,
    pub meters: Vec<MeterEntitlement>,
    /// The notification this record announces (`null`: only `has_access` changed, e.g. a new
    /// period started).
    pub notification: Option<Notification>,
    /// Every notification of the org's current and previous periods, this one included.
    pub notifications: Vec<Notification>,
}

/// The id of a transition: hex SHA-256 of its identifying fields, 32 characters.
pub fn notification_id(org: &str, meter: &str, period_start: &str, threshold: u32, n: u32) -> String {
    let mut h = Sha256::new();
    for part in [org, meter, period_start, &threshold.to_string(), &n.to_string()] {
        h.update(part.len().to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// The thresholds that notify: the configured ones and the limit itself (100 %), whose crossing
/// changes `has_access` of a hard entitlement.
fn thresholds(e: &MeterEntitlement) -> Vec<u32> {
    let mut t = e.thresholds.clone();
    t.push(100);
    t.sort_unstable();
    t.dedup();
    t
}

fn reached(e: &MeterEntitlement, percent: u32) -> bool {
    u128::from(e.used) * 100 >= u128::from(e.limit) * u128::from(percent)
}

/// The records to write for `org` now: one per due notification, in order (crossings upwards,
/// then recoveries downwards, meter by meter), then one more if `has_access` still differs from
/// the last record's. `last` is the org's latest record, if any; `keep_after` drops older
/// periods' notifications (RFC 3339 period ends before it).
pub fn due(
    org: &str,
    plan: Option<&str>,
    meters: &[MeterEntitlement],
    last: Option<&OrgRecord>,
    now: &str,
    keep_after: &str,
) -> Vec<OrgRecord> {
    let mut seq = last.map_or(0, |r| r.seq);
    let mut notes: Vec<Notification> = last
        .map(|r| r.notifications.iter().filter(|n| n.period_end.as_str() > keep_after).cloned().collect())
        .unwrap_or_default();
    let has_access = meters.iter().all(|m| m.has_access);
    let mut out = Vec::new();
    let record = |notes: &Vec<Notification>, notification: Option<Notification>, seq: &mut u64| {
        *seq += 1;
        OrgRecord {
            org_id: org.to_string(),
            seq: *seq,
            plan: plan.map(str::to_string),
            has_access,
            meters: meters.to_vec(),
            notification,
            notifications: notes.clone(),
        }
    };
    for m in meters {
        let count = |notes: &[Notification], t: u32| {
            notes.iter().filter(|n| n.meter == m.meter && n.period_start == m.period_start && n.threshold == t).count()
                as u32
        };
        let ts = thresholds(m);
        let ups = ts.iter().copied().filter(|&t| reached(m, t));
        let downs = ts.iter().rev().copied().filter(|&t| !reached(m, t));
        for (t, kind) in ups.map(|t| (t, Kind::Crossed)).chain(downs.map(|t| (t, Kind::Recovered))) {
            let done = count(&notes, t);
            let notified = done % 2 == 1;
            if notified == (kind == Kind::Crossed) {
                continue;
            }
            let n = done + 1;
            let note = Notification {
                id: notification_id(org, &m.meter, &m.period_start, t, n),
                kind,
                org_id: org.to_string(),
                meter: m.meter.clone(),
                threshold: t,
                n,
                period_start: m.period_start.clone(),
                period_end: m.period_end.clone(),
                used: m.used,
                limit: m.limit,
                at: now.to_string(),
                has_access,
            };
            notes.push(note.clone());
            out.push(record(&notes, Some(note), &mut seq));
        }
    }
    let last_access = out.last().map(|r| r.has_access).or(last.map(|r| r.has_access)).unwrap_or(true);
    if last_access != has_access || (last.is_none() && out.is_empty() && !has_access) {
        out.push(record(&notes, None, &mut seq));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::entitlements::State;
    use crate::api::plans::Enforcement;

    fn m(used: u64, period: &str) -> MeterEntitlement {
        let limit = 1000;
        let state = if used >= limit {
            State::Blocked
        } else if used >= 800 {
            State::Warning
        } else {
            State::Ok
        };
        MeterEntitlement {
            meter: "events".into(),
            limit,
            used,
            remaining: limit.saturating_sub(used),
            period_start: period.into(),
            period_end: format!("{period}+1"),
            state,
            has_access: state != State::Blocked,
            enforcement: Enforcement::Hard,
            thresholds: vec![80, 100, 120],
            approximate: false,
        }
    }

    /// (kind, threshold, n) of a record's notification, and its `has_access`.
    type Shape = (Option<(Kind, u32, u32)>, bool);

    fn kinds(rs: &[OrgRecord]) -> Vec<Shape> {
        rs.iter().map(|r| (r.notification.as_ref().map(|n| (n.kind, n.threshold, n.n)), r.has_access)).collect()
    }

    #[test]
    fn each_crossing_once_and_recoveries_after_corrections() {
        let p = "2026-11-01T00:00:00Z";
        let step = |used, last: Option<&OrgRecord>| due("o", Some("free"), &[m(used, p)], last, "now", "");
        assert!(step(500, None).is_empty(), "nothing reached, access unchanged: no record");
        let a = step(850, None);
        assert_eq!(kinds(&a), vec![(Some((Kind::Crossed, 80, 1)), true)]);
        assert!(step(900, a.last()).is_empty(), "80 % already notified");
        let b = step(1250, a.last());
        assert_eq!(kinds(&b), vec![(Some((Kind::Crossed, 100, 1)), false), (Some((Kind::Crossed, 120, 1)), false)]);
        assert_eq!(b[1].seq, 3);
        assert_eq!(b[1].notifications.len(), 3);
        // A correction takes usage back under 100 %: recoveries, highest first.
        let c = step(810, b.last());
        assert_eq!(kinds(&c), vec![(Some((Kind::Recovered, 120, 2)), true), (Some((Kind::Recovered, 100, 2)), true)]);
        // Crossing again is a new notification with its own id.
        let d = step(1000, c.last());
        assert_eq!(kinds(&d), vec![(Some((Kind::Crossed, 100, 3)), false)]);
        assert_ne!(d[0].notification.as_ref().unwrap().id, b[0].notification.as_ref().unwrap().id);
        // Ids depend only on what they identify.
        assert_eq!(b[0].notification.as_ref().unwrap().id, notification_id("o", "events", p, 100, 1));
    }

    #[test]
    fn a_new_period_restores_access_with_a_record_of_its_own() {
        let b = due("o", None, &[m(1200, "2026-11-01")], None, "now", "");
        assert!(!b.last().unwrap().has_access);
        let next = due("o", None, &[m(0, "2026-12-01")], b.last(), "now", "2026-11-01+0");
        assert_eq!(kinds(&next), vec![(None, true)]);
        assert_eq!(next[0].notifications.len(), 3, "the previous period's notifications are kept");
        let later = due("o", None, &[m(0, "2026-12-01")], next.last(), "now", "2026-12-01");
        assert!(later.is_empty());
    }
}
