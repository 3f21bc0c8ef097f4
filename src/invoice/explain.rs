//! `tally-invoicer explain` (PRODUCT.md §7, Audit): from an invoice line — a Stripe customer, a
//! meter and a period — down to the Stripe writes behind it (identifier, value, run, time,
//! status), the buckets and projects behind each write, and with `--events` the event ids behind
//! one hour, paged, from the narrow `events` table.
//!
//! For additive meters every level adds up: the line's `tally` is the sum of its buckets', a
//! bucket's `tally` the sum of its projects'; the line's `billed` (what Stripe should hold) is
//! the sum of its buckets', a bucket's `billed` the sum of its writes' `counted`; an hour's
//! events, all pages together, sum to the hour's `tally`. Unique meters are distinct counts:
//! their per-project counts are shown but do not add up (sketches merge, never sum).

use std::collections::BTreeMap;

use base64::Engine;
use serde::Serialize;

use super::config::{Granularity, StripeMode};
use super::ledger::{Action, Ledger, Outcome, Push};
use super::period::Period;
use super::reconcile::Env;
use super::report::{csv, Format};
use super::sql::{self, exact_sum, num, render, rows};
use super::stripe::{legacy, meters};
use crate::meter::Aggregation;
use crate::sink::clickhouse::{quote, ChError};
use crate::timestamp::format_rfc3339;

/// Largest page of events.
pub const MAX_EVENTS_PAGE: u32 = 100_000;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExplainError {
    #[error("{0}")]
    Usage(String),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] ChError),
}

/// The invoice line.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub customer: String,
    pub org_ids: Vec<String>,
    pub meter: String,
    /// `sum` (additive) or `unique`.
    pub kind: &'static str,
    pub stripe_target: String,
    pub period_from: String,
    pub period_to: String,
    /// tally's usage: the sum of the buckets' (additive) or the merged distinct count (unique).
    pub tally: u64,
    /// What Stripe should hold according to the ledger: the sum of the buckets' `billed`.
    pub billed: u64,
    /// Stripe's own figure for the line, when Stripe could be read.
    pub stripe: Option<u64>,
    pub stripe_error: Option<String>,
}

/// One project's usage in a bucket.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectLine {
    pub project_id: String,
    pub value: u64,
}

/// One Stripe write of a bucket, as the ledger holds it.
#[derive(Debug, Clone, Serialize)]
pub struct WriteLine {
    /// The meter event `identifier` (and Idempotency-Key).
    pub push_id: String,
    pub action: &'static str,
    pub seq: u32,
    pub value: u64,
    /// What this write contributes to the bucket's `billed`: a live push its value; a cancelled
    /// push, a cancel, a repair (it replaces usage Stripe lost), a refused or pending write 0; for
    /// unique meters the latest value set.
    pub counted: u64,
    /// done, cancelled, superseded, failed or pending.
    pub state: &'static str,
    pub run_id: String,
    /// When the outcome was recorded (the intent while pending), RFC 3339.
    pub at: String,
    /// The timestamp sent to Stripe.
    pub event_ts: String,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BucketLine {
    pub org_id: String,
    pub bucket_start: String,
    pub bucket_end: String,
    pub tally: u64,
    pub billed: u64,
    pub projects: Vec<ProjectLine>,
    pub writes: Vec<WriteLine>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Explain {
    pub line: Line,
    pub buckets: Vec<BucketLine>,
}

/// What to explain.
pub struct Query<'a> {
    pub customer: &'a str,
    pub meter: &'a str,
    pub period: Period,
    pub granularity: Granularity,
}

struct Resolved {
    orgs: Vec<String>,
    meter: String,
    unique: bool,
    target: String,
}

/// The orgs billed to `customer`, and the tally meter `meter` names (a tally meter name, or the
/// Stripe meter id / event name / subscription item it is mapped to).
fn resolve(env: &Env, customer: &str, meter: &str) -> Result<Resolved, ExplainError> {
    let orgs: Vec<String> =
        env.mapping.customers.keys().filter(|o| env.mapping.customer(o) == Some(customer)).cloned().collect();
    if orgs.is_empty() {
        return Err(ExplainError::Usage(format!("no org is mapped to Stripe customer {customer:?}")));
    }
    let legacy = env.cfg.stripe.mode == StripeMode::Legacy;
    let mut found = None;
    for def in env.meters.meters() {
        let (target, event_name) = if legacy {
            (env.mapping.item(&orgs[0], &def.name).unwrap_or_default().to_string(), String::new())
        } else {
            env.mapping
                .meter(&orgs[0], &def.name)
                .map(|m| (m.stripe_meter.clone(), m.event_name.clone().unwrap_or_default()))
                .unwrap_or_default()
        };
        if def.name == meter
            || (!target.is_empty() && target == meter)
            || (!event_name.is_empty() && event_name == meter)
        {
            found = Some(Resolved {
                orgs: orgs.clone(),
                meter: def.name.clone(),
                unique: def.aggregation == Aggregation::Unique,
                target,
            });
            break;
        }
    }
    found.ok_or_else(|| ExplainError::Usage(format!("{meter:?} is neither a tally meter nor mapped to one")))
}

fn orgs_sql(orgs: &[String]) -> String {
    orgs.iter().map(|o| quote(o)).collect::<Vec<_>>().join(", ")
}

/// Builds the drill-down of one invoice line.
pub fn explain(env: &Env, q: &Query) -> Result<Explain, ExplainError> {
    let r = resolve(env, q.customer, q.meter)?;
    let period = q.period;
    let g = q.granularity;
    period.check_granularity(g).map_err(ExplainError::Usage)?;
    if !r.unique {
        // An hour whose events total more than 64 bits has wrapped aggregates: refused by name.
        super::usage::refuse_wrapped_hours(env.ch, period, &r.orgs, &r.meter)?;
    }
    let db = env.ch.database().to_string();
    let vars = vec![
        ("database", db),
        ("from", period.from.to_string()),
        ("to", period.to.to_string()),
        ("meter", quote(&r.meter)),
        ("orgs", orgs_sql(&r.orgs)),
        ("bucket_secs", g.secs().to_string()),
    ];
    type BKey = (String, i64, i64);
    let mut buckets: BTreeMap<BKey, BucketLine> = BTreeMap::new();
    let mut bucket = |org: &str, start: i64, end: i64| -> BKey {
        let k = (org.to_string(), start, end);
        buckets.entry(k.clone()).or_insert_with(|| BucketLine {
            org_id: org.to_string(),
            bucket_start: format_rfc3339(start),
            bucket_end: format_rfc3339(end),
            tally: 0,
            billed: 0,
            projects: Vec::new(),
            writes: Vec::new(),
        });
        k
    };
    let mut keys_projects: Vec<(BKey, ProjectLine)> = Vec::new();
    if r.unique {
        for row in rows(env.ch, &render(sql::EXPLAIN_PROJECTS_UNIQUE, &vars))? {
            let k = bucket(&row[0], period.from, period.to);
            keys_projects.push((k, ProjectLine { project_id: row[1].clone(), value: num(&row[2])? }));
        }
    } else {
        for row in rows(env.ch, &render(sql::EXPLAIN_PROJECTS, &vars))? {
            let start: i64 = num(&row[2])?;
            let value = exact_sum(&row[3], &row[4], &|| format!("{}/{}/{} at {}", row[0], row[1], r.meter, row[2]))?;
            let k = bucket(&row[0], start, start + g.secs());
            keys_projects.push((k, ProjectLine { project_id: row[1].clone(), value }));
        }
    }
    let mode = if env.cfg.stripe.mode == StripeMode::Legacy { "legacy" } else { "meters" };
    let ledger = Ledger::new(env.ch, mode, &env.cfg.stripe.account, &env.run_id, env.ch_wait);
    let pushes: Vec<Push> = ledger
        .read(period.from, period.to)?
        .into_iter()
        .filter(|p| r.orgs.contains(&p.entry.org_id) && p.entry.meter == r.meter)
        .collect();
    let mut by_bucket: BTreeMap<BKey, Vec<&Push>> = BTreeMap::new();
    for p in &pushes {
        let e = &p.entry;
        let (start, end) = if r.unique {
            if (e.bucket_start, e.bucket_end) != (period.from, period.to) {
                continue; // a distinct count of another period
            }
            (period.from, period.to)
        } else {
            let b = Period::bucket_of(e.bucket_start, g);
            (b, b + g.secs())
        };
        by_bucket.entry(bucket(&e.org_id, start, end)).or_default().push(p);
    }
    for (k, p) in keys_projects {
        let b = buckets.get_mut(&k).expect("bucket created above");
        b.tally = sql::add(b.tally, p.value, &|| format!("{}/{} in the bucket at {}", k.0, r.meter, b.bucket_start))?;
        b.projects.push(p);
    }
    if r.unique {
        // The org's figure is the sketches merged across projects, not their sum.
        for ((org, _), v) in super::usage::unique_period(env.ch, period)? {
            if let Some(b) = buckets.get_mut(&(org.clone(), period.from, period.to)) {
                if r.orgs.contains(&org) {
                    b.tally = v;
                }
            }
        }
    }
    for (k, ps) in by_bucket {
        let b = buckets.get_mut(&k).expect("bucket created above");
        b.writes = writes(&ps);
        b.billed = b.writes.iter().map(|w| w.counted).sum();
    }
    let over_period = || format!("{}/{} over the period", q.customer, r.meter);
    let tally = buckets.values().try_fold(0, |t, b| sql::add(t, b.tally, &over_period))?;
    let billed = buckets.values().try_fold(0, |t, b| sql::add(t, b.billed, &over_period))?;
    let (stripe, stripe_error) = match stripe_figure(env, &r, q.customer, period) {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    };
    Ok(Explain {
        line: Line {
            customer: q.customer.to_string(),
            org_ids: r.orgs.clone(),
            meter: r.meter.clone(),
            kind: if r.unique { "unique" } else { "sum" },
            stripe_target: r.target.clone(),
            period_from: format_rfc3339(period.from),
            period_to: format_rfc3339(period.to),
            tally,
            billed,
            stripe,
            stripe_error,
        },
        buckets: buckets.into_values().collect(),
    })
}

/// The ledger's writes of one bucket, each with what it contributes to the bucket's `billed`.
fn writes(ps: &[&Push]) -> Vec<WriteLine> {
    let cancelled_by: BTreeMap<&str, &str> = ps
        .iter()
        .filter(|p| p.entry.action == Action::Cancel && p.outcome == Outcome::Done)
        .map(|p| (p.entry.cancels.as_str(), p.entry.push_id.as_str()))
        .collect();
    let latest_set = ps
        .iter()
        .filter(|p| p.entry.action == Action::Set && p.outcome == Outcome::Done)
        .max_by_key(|p| p.entry.seq)
        .map(|p| p.entry.push_id.as_str());
    let mut out: Vec<WriteLine> = ps
        .iter()
        .map(|p| {
            let e = &p.entry;
            let (state, counted, note) = match (&p.outcome, e.action) {
                (Outcome::Pending, _) => ("pending", 0, "outcome unknown; the next --apply resends it".to_string()),
                (Outcome::Failed(d), _) => ("failed", 0, d.clone()),
                (Outcome::Done, Action::Push) => match cancelled_by.get(e.push_id.as_str()) {
                    Some(c) => ("cancelled", 0, format!("cancelled by {c}")),
                    None => ("done", e.value, String::new()),
                },
                (Outcome::Done, Action::Cancel) => ("done", 0, format!("cancels {}", e.cancels)),
                (Outcome::Done, Action::Repair) => ("done", 0, format!("replaces usage Stripe lost; {}", e.reason)),
                (Outcome::Done, Action::Set) if Some(e.push_id.as_str()) == latest_set => {
                    ("done", e.value, e.reason.clone())
                }
                (Outcome::Done, Action::Set) => ("superseded", 0, e.reason.clone()),
            };
            WriteLine {
                push_id: e.push_id.clone(),
                action: e.action.as_str(),
                seq: e.seq,
                value: e.value,
                counted,
                state,
                run_id: p.run_id.clone(),
                at: format_rfc3339(p.done_at.unwrap_or(p.intent_at)),
                event_ts: format_rfc3339(e.event_ts),
                note,
            }
        })
        .collect();
    out.sort_by_key(|w| w.seq);
    out
}

/// Stripe's figure for the whole line: the meter's summary over the period (the `last` value
/// for unique meters), or in legacy mode the item's usage record summaries.
fn stripe_figure(env: &Env, r: &Resolved, customer: &str, period: Period) -> Result<u64, String> {
    if r.target.is_empty() {
        return Err("no Stripe meter or item mapped".into());
    }
    if env.cfg.stripe.api_key.is_empty() {
        return Err("not read: no stripe.api_key".into());
    }
    let v = match env.cfg.stripe.mode {
        StripeMode::Meters => meters::summaries(env.stripe, &r.target, customer, period.from, period.to, None)
            .map(|s| s.iter().map(|(_, v)| v.max(0.0).round() as u64).sum()),
        StripeMode::Legacy => {
            legacy::usage_total(env.stripe, &r.target, period.from, period.to).map(|t| t.max(0) as u64)
        }
    };
    v.map_err(|e| e.to_string())
}

/// One event behind an hour.
#[derive(Debug, Clone, Serialize)]
pub struct EventLine {
    pub org_id: String,
    pub project_id: String,
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub ts: String,
    /// The event's value for the meter (additive meters); `None` for unique meters.
    pub value: Option<u64>,
}

/// One page of the events behind one hour of an invoice line.
#[derive(Debug, Clone, Serialize)]
pub struct EventsPage {
    pub customer: String,
    pub meter: String,
    pub hour: String,
    pub project_id: Option<String>,
    pub events: Vec<EventLine>,
    /// Sum of this page's values (additive meters).
    pub page_value: u64,
    /// The hour's usage from the aggregates (additive meters; the pages together sum to it).
    pub hour_tally: u64,
    /// Pass as `--after` for the next page; `None` on the last page.
    pub next_after: Option<String>,
}

/// What `--events` asks for.
pub struct EventsQuery<'a> {
    pub customer: &'a str,
    pub meter: &'a str,
    pub hour: i64,
    pub project: Option<&'a str>,
    pub limit: u32,
    /// The cursor printed as `next_after` by the previous page.
    pub after: Option<&'a str>,
}

fn cursor(org: &str, project: &str, event: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{org}\0{project}\0{event}"))
}

fn parse_cursor(s: &str) -> Result<(String, String, String), ExplainError> {
    let bad = || ExplainError::Usage(format!("--after {s:?} is not a cursor printed as next_after"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s.trim()).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let mut it = text.split('\0');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(o), Some(p), Some(e), None) => Ok((o.into(), p.into(), e.into())),
        _ => Err(bad()),
    }
}

/// One page of the events behind one hour, in the events table's key order.
pub fn events(env: &Env, q: &EventsQuery) -> Result<EventsPage, ExplainError> {
    if q.hour % 3600 != 0 {
        return Err(ExplainError::Usage("--events takes a whole hour".into()));
    }
    if !(1..=MAX_EVENTS_PAGE).contains(&q.limit) {
        return Err(ExplainError::Usage(format!("--limit must be between 1 and {MAX_EVENTS_PAGE}")));
    }
    let r = resolve(env, q.customer, q.meter)?;
    let hour = Period { from: q.hour, to: q.hour + 3600 };
    if !r.unique {
        super::usage::refuse_wrapped_hours(env.ch, hour, &r.orgs, &r.meter)?;
    }
    let (ao, ap, ae) = match q.after {
        Some(c) => parse_cursor(c)?,
        None => (String::new(), String::new(), String::new()),
    };
    let arrays = if r.unique { "unique_meters AS m, unique_hashes AS v" } else { "meters AS m, meter_values AS v" };
    let vars = vec![
        ("database", env.ch.database().to_string()),
        ("arrays", arrays.to_string()),
        ("meter", quote(&r.meter)),
        ("orgs", orgs_sql(&r.orgs)),
        ("hour", q.hour.to_string()),
        ("project_filter", q.project.map(|p| format!("AND project_id = {}", quote(p))).unwrap_or_default()),
        ("after_org", quote(&ao)),
        ("after_project", quote(&ap)),
        ("after_event", quote(&ae)),
        ("limit", q.limit.to_string()),
    ];
    let mut events = Vec::new();
    for row in rows(env.ch, &render(sql::EXPLAIN_EVENTS, &vars))? {
        events.push(EventLine {
            org_id: row[0].clone(),
            project_id: row[1].clone(),
            event_id: row[2].clone(),
            kind: row[3].clone(),
            ts: format_rfc3339(num(&row[4])?),
            value: if r.unique { None } else { Some(num(&row[5])?) },
        });
    }
    let page_value = events
        .iter()
        .filter_map(|e| e.value)
        .try_fold(0, |t, v| sql::add(t, v, &|| format!("{}/{} on this page", q.customer, r.meter)))?;
    let next_after = (events.len() == q.limit as usize)
        .then(|| events.last().map(|e| cursor(&e.org_id, &e.project_id, &e.event_id)))
        .flatten();
    let hour_tally = if r.unique {
        0
    } else {
        let vars = vec![
            ("database", env.ch.database().to_string()),
            ("from", hour.from.to_string()),
            ("to", hour.to.to_string()),
            ("meter", quote(&r.meter)),
            ("orgs", orgs_sql(&r.orgs)),
            ("bucket_secs", "3600".to_string()),
        ];
        let mut total = 0u64;
        for row in rows(env.ch, &render(sql::EXPLAIN_PROJECTS, &vars))? {
            if q.project.is_none_or(|p| p == row[1]) {
                let what = || format!("{}/{} at {}", row[0], row[1], row[2]);
                total = sql::add(total, exact_sum(&row[3], &row[4], &what)?, &what)?;
            }
        }
        total
    };
    Ok(EventsPage {
        customer: q.customer.to_string(),
        meter: r.meter,
        hour: format_rfc3339(q.hour),
        project_id: q.project.map(str::to_string),
        events,
        page_value,
        hour_tally,
        next_after,
    })
}

impl Explain {
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Json => serde_json::to_string_pretty(self).expect("explain serializes") + "\n",
            Format::Csv => {
                let mut out = String::from(
                    "level,org_id,bucket_start,bucket_end,project_id,push_id,action,seq,value,counted,state,run_id,at,event_ts,note\n",
                );
                let l = &self.line;
                let row = |fields: [String; 15]| fields.join(",") + "\n";
                let e = String::new;
                out.push_str(&row([
                    "line".into(),
                    csv(&l.org_ids.join(" ")),
                    csv(&l.period_from),
                    csv(&l.period_to),
                    e(),
                    e(),
                    e(),
                    e(),
                    l.tally.to_string(),
                    l.billed.to_string(),
                    e(),
                    e(),
                    e(),
                    e(),
                    csv(&format!("{} {} stripe={}", l.customer, l.meter, opt(l.stripe))),
                ]));
                for b in &self.buckets {
                    let head =
                        |level: &str| [level.to_string(), csv(&b.org_id), csv(&b.bucket_start), csv(&b.bucket_end)];
                    let [a, o, s, t] = head("bucket");
                    out.push_str(&row([
                        a,
                        o,
                        s,
                        t,
                        e(),
                        e(),
                        e(),
                        e(),
                        b.tally.to_string(),
                        b.billed.to_string(),
                        e(),
                        e(),
                        e(),
                        e(),
                        e(),
                    ]));
                    for p in &b.projects {
                        let [a, o, s, t] = head("project");
                        out.push_str(&row([
                            a,
                            o,
                            s,
                            t,
                            csv(&p.project_id),
                            e(),
                            e(),
                            e(),
                            p.value.to_string(),
                            e(),
                            e(),
                            e(),
                            e(),
                            e(),
                            e(),
                        ]));
                    }
                    for w in &b.writes {
                        let [a, o, s, t] = head("write");
                        out.push_str(&row([
                            a,
                            o,
                            s,
                            t,
                            e(),
                            csv(&w.push_id),
                            w.action.into(),
                            w.seq.to_string(),
                            w.value.to_string(),
                            w.counted.to_string(),
                            w.state.into(),
                            csv(&w.run_id),
                            csv(&w.at),
                            csv(&w.event_ts),
                            csv(&w.note),
                        ]));
                    }
                }
                out
            }
            Format::Table => {
                let l = &self.line;
                let mut out = format!(
                    "{} {} ({}) {}..{}: tally {}, billed {} (ledger), Stripe {}{}\n",
                    l.customer,
                    l.meter,
                    l.kind,
                    l.period_from,
                    l.period_to,
                    l.tally,
                    l.billed,
                    opt(l.stripe),
                    l.stripe_error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
                );
                for b in &self.buckets {
                    out.push_str(&format!(
                        "  {} {}..{}  tally {}  billed {}\n",
                        b.org_id, b.bucket_start, b.bucket_end, b.tally, b.billed
                    ));
                    for p in &b.projects {
                        out.push_str(&format!("      project {:<24} {:>12}\n", p.project_id, p.value));
                    }
                    for w in &b.writes {
                        out.push_str(&format!(
                            "      {} #{} {:<7} {:>12} counted {:>12}  {:<10} run {} at {}  {}\n",
                            w.push_id, w.seq, w.action, w.value, w.counted, w.state, w.run_id, w.at, w.note
                        ));
                    }
                }
                out
            }
        }
    }
}

impl EventsPage {
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Json => serde_json::to_string_pretty(self).expect("page serializes") + "\n",
            Format::Csv => {
                let mut out = String::from("org_id,project_id,event_id,type,ts,value\n");
                for e in &self.events {
                    out.push_str(&format!(
                        "{},{},{},{},{},{}\n",
                        csv(&e.org_id),
                        csv(&e.project_id),
                        csv(&e.event_id),
                        csv(&e.kind),
                        e.ts,
                        opt(e.value)
                    ));
                }
                out
            }
            Format::Table => {
                let mut out = format!(
                    "{} {} hour {}: {} event(s) on this page, value {} (hour total {})\n",
                    self.customer,
                    self.meter,
                    self.hour,
                    self.events.len(),
                    self.page_value,
                    self.hour_tally
                );
                for e in &self.events {
                    out.push_str(&format!(
                        "  {} {} {} {} {} {}\n",
                        e.org_id,
                        e.project_id,
                        e.event_id,
                        e.kind,
                        e.ts,
                        opt(e.value)
                    ));
                }
                if let Some(n) = &self.next_after {
                    out.push_str(&format!("next page: --after {n}\n"));
                }
                out
            }
        }
    }
}

fn opt(v: Option<u64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_any_ids() {
        for (o, p, e) in [("org", "proj", "ev-1"), ("o,\"x", "p\nq", "é/\\'"), ("", "", "")] {
            assert_eq!(parse_cursor(&cursor(o, p, e)).unwrap(), (o.into(), p.into(), e.into()));
        }
        assert!(parse_cursor("not a cursor!").is_err());
        assert!(parse_cursor(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("a\0b")).is_err());
    }
}
