//! tally's side of an invoice: totals read from ClickHouse, and the check that the aggregates
//! agree with the per-event rows they were built from.

use std::collections::BTreeMap;

use serde::Serialize;

use super::period::Period;
use super::sql::{self, exact_sum, figures, num, org_filter, period_vars, render, rows, Figures};
use crate::sink::clickhouse::{ChError, ClickHouse};
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

/// Totals per (org, project, meter) over `period`; unique meters merged across hours.
pub fn usage(ch: &ClickHouse, period: Period, org: Option<&str>) -> Result<Vec<UsageRow>, ChError> {
    let mut vars = period_vars(ch, period.from, period.to);
    vars.push(("org_filter", org_filter(org)));
    refuse_overflow(ch, &vars)?;
    let mut out = Vec::new();
    for (template, kind) in [(sql::USAGE_ADDITIVE, "sum"), (sql::USAGE_UNIQUE, "unique")] {
        for r in rows(ch, &render(template, &vars))? {
            let value = exact_sum(&r[3], &r[4], &|| format!("{}/{}/{} over the period", r[0], r[1], r[2]))?;
            out.push(UsageRow { org_id: r[0].clone(), project_id: r[1].clone(), meter: r[2].clone(), value, kind });
        }
    }
    out.sort_by(|a, b| (&a.org_id, &a.project_id, &a.meter).cmp(&(&b.org_id, &b.project_id, &b.meter)));
    Ok(out)
}

/// [`ChError::TotalOverflow`] if any hour of the period has a total beyond 64 bits in the
/// per-event rows. The aggregates cannot tell (ClickHouse's `sum` wraps, in the materialized view
/// too), so what is shown from them is checked against the events first.
fn refuse_overflow(ch: &ClickHouse, vars: &[(&str, String)]) -> Result<(), ChError> {
    match rows(ch, &render(sql::OVERFLOW_HOURS, vars))?.first() {
        None => Ok(()),
        Some(r) => {
            let what =
                || format!("{}/{}/{} at hour {}", r[0], r[1], r[2], num(&r[3]).map_or(r[3].clone(), format_rfc3339));
            exact_sum(&r[4], &r[5], &what).map(|_| ())
        }
    }
}

/// Additive totals per (org, meter, bucket start).
pub fn additive_buckets(
    ch: &ClickHouse,
    period: Period,
    bucket_secs: i64,
) -> Result<BTreeMap<(String, String, i64), u64>, ChError> {
    let mut vars = period_vars(ch, period.from, period.to);
    vars.push(("bucket_secs", bucket_secs.to_string()));
    let mut out = BTreeMap::new();
    for r in rows(ch, &render(sql::ADDITIVE_BUCKETS, &vars))? {
        let value = exact_sum(&r[3], &r[4], &|| format!("{}/{} in the bucket at {}", r[0], r[1], r[2]))?;
        out.insert((r[0].clone(), r[1].clone(), num(&r[2])?), value);
    }
    Ok(out)
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
    pub aggregates: u64,
    pub events: u64,
}

/// Compares every (org, project, meter, hour) of the period; returns the mismatches and the
/// number of figures compared.
pub fn verify(ch: &ClickHouse, period: Period) -> Result<(Vec<Mismatch>, usize), ChError> {
    let vars = period_vars(ch, period.from, period.to);
    let agg = figures(ch, &render(sql::VERIFY_AGGREGATES, &vars))?;
    let ev = figures(ch, &render(sql::VERIFY_EVENTS, &vars))?;
    Ok(compare(&agg, &ev, "hour"))
}

/// The keys where `agg` and `ev` differ (a missing key counts as 0), and how many keys there are.
fn compare(agg: &Figures, ev: &Figures, window: &'static str) -> (Vec<Mismatch>, usize) {
    let mut keys: Vec<_> = agg.keys().chain(ev.keys()).collect();
    keys.sort();
    keys.dedup();
    let compared = keys.len();
    let out = keys
        .into_iter()
        .filter_map(|k| {
            let (a, e) = (agg.get(k).copied().unwrap_or(0), ev.get(k).copied().unwrap_or(0));
            (a != e).then(|| Mismatch {
                org_id: k.0.clone(),
                project_id: k.1.clone(),
                meter: k.2.clone(),
                hour: format_rfc3339(k.3),
                window,
                aggregates: a,
                events: e,
            })
        })
        .collect();
    (out, compared)
}

/// Compares the daily unique-meter sketches of every UTC day that meets the period with the
/// per-event rows; returns the mismatches (`window = "day"`) and the number of figures compared.
/// Not part of [`verify`]: the invoicer bills from the hourly aggregates, so a daily sketch out of
/// step (a server crash between the views of one insert) is reported, not a reason to stop billing.
/// The repair is in docs/clickhouse.md.
pub fn verify_daily_sketches(ch: &ClickHouse, period: Period) -> Result<(Vec<Mismatch>, usize), ChError> {
    let mut vars = period_vars(ch, period.from, period.to);
    vars.push(("day_from", period.from.div_euclid(86_400).saturating_mul(86_400).to_string()));
    vars.push(("day_to", (period.to + 86_399).div_euclid(86_400).saturating_mul(86_400).to_string()));
    let (mut sketch, mut events) = (Figures::new(), Figures::new());
    for r in rows(ch, &render(sql::VERIFY_DAILY_SKETCHES, &vars))? {
        if r.len() != 6 {
            return Err(ChError::Response(format!("expected 6 columns, got {r:?}")));
        }
        let side = if r[0] == "sketch" { &mut sketch } else { &mut events };
        side.insert((r[1].clone(), r[2].clone(), r[3].clone(), num::<i64>(&r[4])?), num::<u64>(&r[5])?);
    }
    Ok(compare(&sketch, &events, "day"))
}
