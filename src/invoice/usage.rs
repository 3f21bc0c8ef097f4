//! tally's side of an invoice: totals read from ClickHouse, and the check that the aggregates
//! agree with the per-event rows they were built from.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::period::Period;
use super::sql::{self, figures, num, org_filter, period_vars, render, rows, split_total, Figures};
use crate::sink::clickhouse::{quote, ChError, ClickHouse};
use crate::timestamp::format_rfc3339;

/// One line of `tally-invoicer usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    pub org_id: String,
    pub project_id: String,
    pub meter: String,
    pub value: u64,
    /// `sum` for additive meters, `unique` for distinct counts over the period.
    pub kind: &'static str,
}

/// A figure whose exact total needs more than 64 bits: refused by name, never shown or billed
/// (PRODUCT.md §1). It refuses its own (org, project, meter), not the other tenants' figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Overflow {
    pub org_id: String,
    pub project_id: String,
    pub meter: String,
    /// Start of the hour whose total overflows (Unix seconds; RFC 3339 when serialized); `None`
    /// when each hour fits and the period's total does not.
    #[serde(serialize_with = "rfc3339")]
    pub hour: Option<i64>,
    /// The exact total, from the per-event rows (hours) or the aggregates (period).
    pub total: u128,
}

impl Overflow {
    /// The named error ([`ChError::TotalOverflow`]) that reports it.
    pub fn error(&self) -> ChError {
        let at =
            self.hour.map_or_else(|| " over the period".to_string(), |h| format!(" at hour {}", format_rfc3339(h)));
        let what = || format!("{}/{}/{}{at}", self.org_id, self.project_id, self.meter);
        sql::fits(self.total, &what).expect_err("an overflow does not fit in 64 bits")
    }
}

fn rfc3339<S: serde::Serializer>(hour: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    hour.map(format_rfc3339).serialize(s)
}

/// `tally-invoicer usage`: the totals that fit in 64 bits, and the ones refused.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub rows: Vec<UsageRow>,
    /// (org, project, meter) figures with an hour, or a period total, beyond 64 bits.
    pub refused: Vec<Overflow>,
}

/// Totals per (org, project, meter) over `period`; unique meters merged across hours. A figure
/// with an hour beyond 64 bits in the per-event rows, or a period total beyond 64 bits, is in
/// [`Usage::refused`] instead of [`Usage::rows`]: the aggregates cannot tell (ClickHouse's `sum`
/// wraps, in the materialized view too), so the hours are checked against the events first.
pub fn usage(ch: &ClickHouse, period: Period, org: Option<&str>) -> Result<Usage, ChError> {
    let mut vars = period_vars(ch, period.from, period.to);
    vars.push(("org_filter", org_filter(org)));
    let mut out = Usage { refused: overflow_hours(ch, &vars)?, ..Usage::default() };
    let refused: BTreeSet<(String, String, String)> =
        out.refused.iter().map(|o| (o.org_id.clone(), o.project_id.clone(), o.meter.clone())).collect();
    for (template, kind) in [(sql::USAGE_ADDITIVE, "sum"), (sql::USAGE_UNIQUE, "unique")] {
        for r in rows(ch, &render(template, &vars))? {
            let (org_id, project_id, meter) = (r[0].clone(), r[1].clone(), r[2].clone());
            if refused.contains(&(org_id.clone(), project_id.clone(), meter.clone())) {
                continue;
            }
            let total = split_total(&r[3], &r[4])?;
            match u64::try_from(total) {
                Ok(value) => out.rows.push(UsageRow { org_id, project_id, meter, value, kind }),
                Err(_) => out.refused.push(Overflow { org_id, project_id, meter, hour: None, total }),
            }
        }
    }
    out.rows.sort_by(|a, b| (&a.org_id, &a.project_id, &a.meter).cmp(&(&b.org_id, &b.project_id, &b.meter)));
    Ok(out)
}

/// The first (org, project, `meter`, hour) of `orgs` in `period` whose total in the per-event
/// rows needs more than 64 bits, as the [`ChError::TotalOverflow`] that refuses it: the
/// aggregates of such an hour wrapped, so nothing read from them for these orgs and `meter` may
/// be shown.
pub fn refuse_wrapped_hours(ch: &ClickHouse, period: Period, orgs: &[String], meter: &str) -> Result<(), ChError> {
    let mut vars = period_vars(ch, period.from, period.to);
    let orgs: Vec<String> = orgs.iter().map(|o| quote(o)).collect();
    vars.push(("org_filter", format!("AND org_id IN ({}) AND meter = {}", orgs.join(", "), quote(meter))));
    overflow_hours(ch, &vars)?.first().map_or(Ok(()), |o| Err(o.error()))
}

/// Every (org, project, meter, hour) of the period whose total in the per-event rows needs more
/// than 64 bits.
fn overflow_hours(ch: &ClickHouse, vars: &[(&str, String)]) -> Result<Vec<Overflow>, ChError> {
    rows(ch, &render(sql::OVERFLOW_HOURS, vars))?
        .into_iter()
        .map(|r| {
            Ok(Overflow {
                total: split_total(&r[4], &r[5])?,
                hour: Some(num(&r[3])?),
                org_id: r[0].clone(),
                project_id: r[1].clone(),
                meter: r[2].clone(),
            })
        })
        .collect()
}

/// Distinct counts per (org, meter) over the whole period.
pub fn unique_period(ch: &ClickHouse, period: Period) -> Result<BTreeMap<(String, String), u64>, ChError> {
    let vars = period_vars(ch, period.from, period.to);
    let mut out = BTreeMap::new();
    for r in rows(ch, &render(sql::UNIQUE_PERIOD, &vars))? {
        out.insert((r[0].clone(), r[1].clone()), num(&r[2])?);
    }
    Ok(out)
}

/// A (org, project, meter, hour or day) where the aggregates and the events disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub org_id: String,
    pub project_id: String,
    pub meter: String,
    /// RFC 3339 start of the hour (or, with `window = "day"`, of the UTC day).
    pub hour: String,
    /// `hour`: the hourly aggregates (`usage_hourly_agg`, `usage_unique_hourly`), which bill;
    /// `day`: the daily unique-meter sketches (`usage_unique_daily`), which only tally-api reads.
    pub window: &'static str,
    /// Exact sums of the rows on each side (128 bits: nothing here wraps).
    pub aggregates: u128,
    pub events: u128,
}

/// What [`verify`] found: the figures that disagree, the figures too large to compare (their
/// exact total, from the per-event rows, needs more than 64 bits, which the aggregates cannot
/// hold), how many figures were compared, and the aggregates' figures themselves.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    pub mismatches: Vec<Mismatch>,
    pub overflows: Vec<Overflow>,
    pub compared: usize,
    /// The additive aggregates as read (`usage_hourly_agg`, before the events): (org, project,
    /// meter, hour) → exact sum. Never a distinct count, whatever the meter's name.
    pub aggregates: Figures,
}

/// Compares every (org, project, meter, hour) of the period, the aggregates read first.
pub fn verify(ch: &ClickHouse, period: Period) -> Result<Verification, ChError> {
    let vars = period_vars(ch, period.from, period.to);
    let additive = figures(ch, &render(sql::VERIFY_AGGREGATES_ADDITIVE, &vars))?;
    let mut agg = additive.clone();
    // A name in both tables (a meter whose aggregation changed) adds up here as in the events.
    for (k, v) in figures(ch, &render(sql::VERIFY_AGGREGATES_UNIQUE, &vars))? {
        *agg.entry(k).or_default() += v;
    }
    let ev = figures(ch, &render(sql::VERIFY_EVENTS, &vars))?;
    Ok(Verification { aggregates: additive, ..compare(&agg, &ev, "hour") })
}

/// The keys where `agg` and `ev` differ (a missing key counts as 0), the keys whose events
/// total needs more than 64 bits, and how many keys there are.
fn compare(agg: &Figures, ev: &Figures, window: &'static str) -> Verification {
    let mut keys: Vec<_> = agg.keys().chain(ev.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Verification::default();
    for k in keys {
        let (a, e) = (agg.get(k).copied().unwrap_or(0), ev.get(k).copied().unwrap_or(0));
        let (org_id, project_id, meter) = (k.0.clone(), k.1.clone(), k.2.clone());
        if e > u128::from(u64::MAX) {
            out.overflows.push(Overflow { org_id, project_id, meter, hour: Some(k.3), total: e });
            continue;
        }
        out.compared += 1;
        if a != e {
            let hour = format_rfc3339(k.3);
            out.mismatches.push(Mismatch { org_id, project_id, meter, hour, window, aggregates: a, events: e });
        }
    }
    out
}

/// Compares the daily unique-meter sketches of every UTC day that meets the period with the
/// per-event rows (mismatches with `window = "day"`; distinct counts cannot overflow).
/// Not part of [`verify`]: the invoicer bills from the hourly aggregates, so a daily sketch out of
/// step (a server crash between the views of one insert) is reported, not a reason to stop billing.
/// The repair is in docs/clickhouse.md.
pub fn verify_daily_sketches(ch: &ClickHouse, period: Period) -> Result<Verification, ChError> {
    let mut vars = period_vars(ch, period.from, period.to);
    vars.push(("day_from", period.from.div_euclid(86_400).saturating_mul(86_400).to_string()));
    vars.push(("day_to", (period.to + 86_399).div_euclid(86_400).saturating_mul(86_400).to_string()));
    let (mut sketch, mut events) = (Figures::new(), Figures::new());
    for r in rows(ch, &render(sql::VERIFY_DAILY_SKETCHES, &vars))? {
        if r.len() != 6 {
            return Err(ChError::Response(format!("expected 6 columns, got {r:?}")));
        }
        let side = if r[0] == "sketch" { &mut sketch } else { &mut events };
        side.insert((r[1].clone(), r[2].clone(), r[3].clone(), num::<i64>(&r[4])?), num::<u128>(&r[5])?);
    }
    Ok(compare(&sketch, &events, "day"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2^64 − 1 is a figure like any other; one more is an overflow, named with its exact value and
    /// never compared or counted as a mismatch (the aggregates cannot hold it).
    #[test]
    fn figures_past_64_bits_are_overflows_not_mismatches() {
        let max = u128::from(u64::MAX);
        let key = |m: &str| ("o".to_string(), "p".to_string(), m.to_string(), 7200);
        let agg: Figures = [(key("a"), max), (key("b"), max), (key("c"), 0), (key("d"), 5)].into();
        let ev: Figures = [(key("a"), max), (key("b"), max - 1), (key("c"), max + 1), (key("d"), 5)].into();
        let v = compare(&agg, &ev, "hour");
        assert_eq!(v.compared, 3);
        assert_eq!(v.mismatches.len(), 1);
        assert_eq!(
            (v.mismatches[0].meter.as_str(), v.mismatches[0].aggregates, v.mismatches[0].events),
            ("b", max, max - 1)
        );
        assert_eq!(
            v.overflows,
            [Overflow {
                org_id: "o".into(),
                project_id: "p".into(),
                meter: "c".into(),
                hour: Some(7200),
                total: max + 1
            }]
        );
        let e = v.overflows[0].error().to_string();
        assert!(
            e.starts_with("total_overflow") && e.contains("o/p/c at hour 1970-01-01T02:00:00Z = 18446744073709551616"),
            "{e}"
        );
        let period = Overflow { hour: None, ..v.overflows[0].clone() };
        assert!(period.error().to_string().contains("o/p/c over the period = "), "{}", period.error());
    }
}
