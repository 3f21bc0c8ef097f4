//! `GET /v1/entitlements/{org_id}` (PRODUCT.md §11): each limited meter of the org's plan with
//! its use in the current period, read from the same aggregates as `/v1/usage` and the invoicer.

use serde::{Deserialize, Serialize};

use super::plans::{period_at, Enforcement, Entitlement, OrgPlan};
use super::usage::{usage, UsageQuery, Window};
use crate::meter::Meters;
use crate::sink::clickhouse::{ChError, ClickHouse};
use crate::timestamp::format_rfc3339;

/// Where an org stands on one meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Below every threshold under 100 %.
    Ok,
    /// At or past a threshold under 100 %, below the limit.
    Warning,
    /// At or past the limit of a soft entitlement: still served.
    Exceeded,
    /// At or past the limit of a hard entitlement: `has_access` is false.
    Blocked,
}

/// The state for `used` against `e`: the limit is reached when `used >= limit`.
pub fn state(e: &Entitlement, used: u64) -> State {
    let reached = |percent: u32| u128::from(used) * 100 >= u128::from(e.limit) * u128::from(percent);
    if reached(100) {
        match e.enforcement {
            Enforcement::Hard => State::Blocked,
            Enforcement::Soft => State::Exceeded,
        }
    } else if e.thresholds.iter().any(|&t| t < 100 && reached(t)) {
        State::Warning
    } else {
        State::Ok
    }
}

/// The highest threshold `used` has reached (percent), if any.
pub fn highest_reached(e: &Entitlement, used: u64) -> Option<u32> {
    e.thresholds.iter().rev().copied().find(|&t| u128::from(used) * 100 >= u128::from(e.limit) * u128::from(t))
}

/// One meter of the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterEntitlement {
    pub meter: String,
    pub limit: u64,
    pub used: u64,
    /// `limit − used`, 0 once the limit is reached.
    pub remaining: u64,
    pub period_start: String,
    pub period_end: String,
    pub state: State,
    pub has_access: bool,
    pub enforcement: Enforcement,
    /// Percents of the limit that notify when crossed.
    pub thresholds: Vec<u32>,
    /// True for unique meters (a distinct count, ≤ 2 % relative error).
    pub approximate: bool,
}

/// Every limited meter of `org`'s plan, for the period holding `now` (Unix seconds).
pub fn entitlements(
    ch: &ClickHouse,
    meters: &Meters,
    org: &str,
    plan: &OrgPlan,
    now: i64,
) -> Result<Vec<MeterEntitlement>, ChError> {
    let (start, end) = period_at(now, plan.anchor_day);
    if plan.meters.is_empty() {
        return Ok(Vec::new());
    }
    let q = UsageQuery {
        from: start,
        to: end,
        org: Some(org.to_string()),
        project: None,
        meters: plan.meters.keys().cloned().collect(),
        window: Window::None,
        by_project: false,
    };
    let rows = usage(ch, meters, &q)?;
    Ok(plan
        .meters
        .iter()
        .map(|(name, e)| {
            let row = rows.iter().find(|r| &r.meter == name);
            let used = row.map_or(0, |r| r.value);
            let state = state(e, used);
            MeterEntitlement {
                meter: name.clone(),
                limit: e.limit,
                used,
                remaining: e.limit.saturating_sub(used),
                period_start: format_rfc3339(start),
                period_end: format_rfc3339(end),
                state,
                has_access: state != State::Blocked,
                enforcement: e.enforcement,
                thresholds: e.thresholds.clone(),
                approximate: row.is_some_and(|r| r.approximate),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_the_thresholds() {
        let hard = Entitlement { limit: 1000, enforcement: Enforcement::Hard, thresholds: vec![80, 100, 120] };
        assert_eq!(state(&hard, 0), State::Ok);
        assert_eq!(state(&hard, 799), State::Ok);
        assert_eq!(state(&hard, 800), State::Warning);
        assert_eq!(state(&hard, 999), State::Warning);
        assert_eq!(state(&hard, 1000), State::Blocked);
        let soft = Entitlement { enforcement: Enforcement::Soft, ..hard.clone() };
        assert_eq!(state(&soft, 5000), State::Exceeded);
        assert_eq!(highest_reached(&hard, 1199), Some(100));
        assert_eq!(highest_reached(&hard, 1200), Some(120));
        assert_eq!(highest_reached(&hard, 10), None);
        // No overflow at the top of the range.
        let big = Entitlement { limit: u64::MAX, enforcement: Enforcement::Soft, thresholds: vec![50] };
        assert_eq!(state(&big, u64::MAX / 2 + 1), State::Warning);
        assert_eq!(state(&big, u64::MAX), State::Exceeded);
        let zero = Entitlement { limit: 0, enforcement: Enforcement::Hard, thresholds: vec![] };
        assert_eq!(state(&zero, 0), State::Blocked);
    }
}
