//! `GET /v1/usage` (PRODUCT.md §11): totals from the same hourly aggregates the invoicer bills.
//!
//! Additive meters are summed exactly (32-bit halves joined as 128 bits, refused past 64 bits,
//! and past 2^53 − 1 in an answer, which is JSON);
//! unique meters merge their hourly sketches over each window (never summed) and are marked
//! approximate. When the query is about one org (named, or the caller's own), every (project
//! group, meter, window) is listed, zeros included, so that "no usage" is stated rather than
//! left to an empty list.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::decode::number::MAX_EXACT_JSON_INTEGER;
use crate::invoice::sql::{exact_sum, num, render, rows};
use crate::meter::{Aggregation, Meters};
use crate::sink::clickhouse::{quote, ChError, ClickHouse};
use crate::timestamp::format_rfc3339;

pub const USAGE_ADDITIVE: &str = include_str!("../../sql/api/usage_additive.sql");
pub const USAGE_UNIQUE: &str = include_str!("../../sql/api/usage_unique.sql");

/// Most windows one answer may hold per (org, project, meter) (a year of hours and then some).
pub const MAX_WINDOWS: i64 = 10_000;

/// How a query's range is cut into windows (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Hour,
    Day,
    Month,
    /// One total over the whole range.
    None,
}

impl Window {
    pub fn parse(s: &str) -> Option<Window> {
        Some(match s {
            "hour" => Window::Hour,
            "day" => Window::Day,
            "month" => Window::Month,
            "none" => Window::None,
            _ => return None,
        })
    }

    /// The SQL expression of a row's window start (UInt32 Unix seconds, UTC) from its `hour`.
    fn sql(self) -> &'static str {
        match self {
            Window::Hour => "toUInt32(hour)",
            Window::Day => "intDiv(toUInt32(hour), 86400) * 86400",
            Window::Month => "toUInt32(toDateTime(toStartOfMonth(hour, 'UTC'), 'UTC'))",
            Window::None => "toUInt32(0)",
        }
    }

    /// The start of the window holding `t`, and the start of the next one (`None`: the range).
    fn bucket(self, t: i64, range: (i64, i64)) -> (i64, i64) {
        match self {
            Window::Hour => (t - t.rem_euclid(3600), t - t.rem_euclid(3600) + 3600),
            Window::Day => (t - t.rem_euclid(86_400), t - t.rem_euclid(86_400) + 86_400),
            // A calendar month is the period of billing anchor day 1.
            Window::Month => super::plans::period_at(t, 1),
            Window::None => range,
        }
    }

    /// The windows of [from, to), each clipped to the range.
    pub fn windows(self, from: i64, to: i64) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        let mut t = from;
        while t < to {
            let (_, next) = self.bucket(t, (from, to));
            out.push((t, next.min(to)));
            t = next;
        }
        out
    }
}

/// A validated usage query. The caller has already narrowed `org` / `project` to what the
/// credential may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    /// Whole hours, Unix seconds, `from < to`.
    pub from: i64,
    pub to: i64,
    pub org: Option<String>,
    pub project: Option<String>,
    /// Empty: every meter.
    pub meters: Vec<String>,
    pub window: Window,
    /// One row per project (`group_by=project_id`) instead of one per org.
    pub by_project: bool,
}

/// Why a query is refused before it reaches ClickHouse (HTTP 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct BadQuery(pub String);

impl UsageQuery {
    /// Checks the range and the meters against `meters`.
    pub fn check(&self, meters: &Meters) -> Result<(), BadQuery> {
        let bad = |s: String| Err(BadQuery(s));
        if self.from % 3600 != 0 || self.to % 3600 != 0 {
            return bad("from and to must be whole hours (usage is kept per hour)".into());
        }
        if self.from >= self.to {
            return bad(format!(
                "empty range: from {} is not before to {}",
                format_rfc3339(self.from),
                format_rfc3339(self.to)
            ));
        }
        if self.from < 0 || self.to > i64::from(u32::MAX) - 3600 {
            return bad("from and to must lie between 1970 and 2106 (ClickHouse DateTime)".into());
        }
        if let Some(m) = self.meters.iter().find(|m| meters.get(m).is_none()) {
            return bad(format!("unknown meter {m:?}"));
        }
        let count = match self.window {
            Window::Hour => (self.to - self.from) / 3600,
            Window::Day => (self.to - self.from) / 86_400 + 1,
            Window::Month => (self.to - self.from) / (28 * 86_400) + 1,
            Window::None => 1,
        };
        if count > MAX_WINDOWS {
            return bad(format!("more than {MAX_WINDOWS} windows: choose a coarser window or a shorter range"));
        }
        Ok(())
    }
}

/// One figure of the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    pub org_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    pub meter: String,
    /// RFC 3339 (UTC); absent with `window=none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_end: Option<String>,
    /// Exact for additive meters; a distinct count (merged sketches) for unique ones.
    pub value: u64,
    /// True for unique meters (≤ 2 % relative error, PRODUCT.md §4).
    pub approximate: bool,
}

/// (org, project or "", meter, window start) → value.
type Figures = BTreeMap<(String, String, String, i64), u64>;

/// Runs `q` (checked with [`UsageQuery::check`]) and returns its rows, ordered by org, project,
/// meter and window.
pub fn usage(ch: &ClickHouse, meters: &Meters, q: &UsageQuery) -> Result<Vec<UsageRow>, ChError> {
    let selected: Vec<&crate::meter::Meter> =
        meters.meters().iter().filter(|m| q.meters.is_empty() || q.meters.contains(&m.name)).collect();
    let mut filters = String::new();
    if let Some(o) = &q.org {
        filters += &format!(" AND org_id = {}", quote(o));
    }
    if let Some(p) = &q.project {
        filters += &format!(" AND project_id = {}", quote(p));
    }
    let list = |kind: bool| -> Vec<String> {
        selected.iter().filter(|m| (m.aggregation == Aggregation::Unique) == kind).map(|m| quote(&m.name)).collect()
    };
    let (day_from, day_to) = whole_days(q);
    let vars = |names: &[String]| {
        vec![
            ("database", ch.database().to_string()),
            ("from", q.from.to_string()),
            ("to", q.to.to_string()),
            ("day_from", day_from.to_string()),
            ("day_to", day_to.to_string()),
            ("project", if q.by_project { "project_id".to_string() } else { "''".to_string() }),
            ("window", q.window.sql().to_string()),
            ("filters", format!("{filters} AND meter IN ({})", names.join(", "))),
        ]
    };
    // The additive and the unique query run at once: an answer waits for the slower one only.
    let run = |template: &str, unique: bool| -> Result<Vec<Vec<String>>, ChError> {
        let names = list(unique);
        if names.is_empty() {
            return Ok(Vec::new());
        }
        rows(ch, &render(template, &vars(&names)))
    };
    let (additive, unique) = std::thread::scope(|s| {
        let unique = s.spawn(|| run(USAGE_UNIQUE, true));
        let additive = run(USAGE_ADDITIVE, false);
        (additive, unique.join().unwrap_or_else(|_| Err(ChError::Response("unique-meter query panicked".into()))))
    });
    let mut figures = Figures::new();
    for r in additive?.into_iter().chain(unique?) {
        if r.len() != 6 {
            return Err(ChError::Response(format!("expected 6 columns, got {r:?}")));
        }
        let what = || format!("{}/{}/{} in the window at {}", r[0], r[1], r[2], r[3]);
        let value = exact_sum(&r[4], &r[5], &what)?;
        // The answer is JSON: a figure its readers could not all hold exactly is refused by name
        // (PRODUCT.md §1), as one beyond 64 bits is (a JavaScript reader would round it).
        if value > MAX_EXACT_JSON_INTEGER {
            return Err(ChError::TotalOverflow(format!(
                "{} = {value} is beyond 2^53 − 1, the largest integer every JSON reader holds exactly",
                what()
            )));
        }
        let start = if q.window == Window::None { q.from } else { num::<i64>(&r[3])?.max(q.from) };
        figures.insert((r[0].clone(), r[1].clone(), r[2].clone(), start), value);
    }
    Ok(answer(q, &selected, figures))
}

/// The whole UTC days [day_from, day_to) of the range that unique meters read from the daily
/// sketches; the hours of [from, day_from) and [day_to, to) come from the hourly ones. With
/// `window=hour`, or no whole day in the range, both are `from`: hourly sketches only.
fn whole_days(q: &UsageQuery) -> (i64, i64) {
    let first = q.from + (86_400 - q.from.rem_euclid(86_400)) % 86_400;
    let last = q.to - q.to.rem_euclid(86_400);
    if q.window == Window::Hour || first >= last {
        (q.from, q.from)
    } else {
        (first, last)
    }
}

/// Turns the figures into rows; with one org in view, missing (project, meter, window) figures
/// are listed as zeros.
fn answer(q: &UsageQuery, selected: &[&crate::meter::Meter], figures: Figures) -> Vec<UsageRow> {
    let windows = q.window.windows(q.from, q.to);
    // Which (org, project) groups to list.
    let mut groups: Vec<(String, String)> = figures.keys().map(|k| (k.0.clone(), k.1.clone())).collect();
    if let Some(org) = &q.org {
        let project = if q.by_project { q.project.clone() } else { Some(String::new()) };
        if let Some(p) = project {
            groups.push((org.clone(), p));
        }
    }
    groups.sort();
    groups.dedup();
    let dense = q.org.is_some();
    let mut out = Vec::new();
    for (org, project) in groups {
        for m in selected {
            for &(start, end) in &windows {
                let key = (org.clone(), project.clone(), m.name.clone(), start);
                let value = match figures.get(&key) {
                    Some(v) => *v,
                    None if dense => 0,
                    None => continue,
                };
                let windowed = q.window != Window::None;
                out.push(UsageRow {
                    org_id: org.clone(),
                    project_id: q.by_project.then(|| project.clone()),
                    meter: m.name.clone(),
                    window_start: windowed.then(|| format_rfc3339(start)),
                    window_end: windowed.then(|| format_rfc3339(end)),
                    value,
                    approximate: m.aggregation == Aggregation::Unique,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::DEFAULT_METERS_TOML;
    use crate::timestamp::parse_rfc3339;

    fn t(s: &str) -> i64 {
        parse_rfc3339(s).unwrap()
    }

    #[test]
    fn windows_are_utc_and_clipped() {
        let w = Window::Month.windows(t("2026-10-31T22:00:00Z"), t("2026-12-02T00:00:00Z"));
        assert_eq!(
            w,
            vec![
                (t("2026-10-31T22:00:00Z"), t("2026-11-01T00:00:00Z")),
                (t("2026-11-01T00:00:00Z"), t("2026-12-01T00:00:00Z")),
                (t("2026-12-01T00:00:00Z"), t("2026-12-02T00:00:00Z")),
            ]
        );
        assert_eq!(Window::Day.windows(t("2026-11-28T05:00:00Z"), t("2026-11-29T05:00:00Z")).len(), 2);
        assert_eq!(Window::Hour.windows(t("2026-11-28T05:00:00Z"), t("2026-11-28T08:00:00Z")).len(), 3);
        assert_eq!(Window::None.windows(0, 7200), vec![(0, 7200)]);
    }

    fn query() -> UsageQuery {
        UsageQuery {
            from: t("2026-11-01T00:00:00Z"),
            to: t("2026-11-02T00:00:00Z"),
            org: Some("o".into()),
            project: None,
            meters: vec![],
            window: Window::Day,
            by_project: false,
        }
    }

    #[test]
    fn unique_meters_read_whole_days_from_the_daily_sketches() {
        let q = |from: &str, to: &str, window| UsageQuery { from: t(from), to: t(to), window, ..query() };
        let days = |from: &str, to: &str, w| {
            let (a, b) = whole_days(&q(from, to, w));
            (format_rfc3339(a), format_rfc3339(b))
        };
        let d = |s: &str| (s.to_string(), s.to_string());
        assert_eq!(
            days("2026-10-30T05:00:00Z", "2026-11-29T13:00:00Z", Window::Day),
            ("2026-10-31T00:00:00Z".to_string(), "2026-11-29T00:00:00Z".to_string())
        );
        assert_eq!(
            days("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z", Window::None),
            ("2026-11-01T00:00:00Z".to_string(), "2026-12-01T00:00:00Z".to_string())
        );
        // No whole day, or hourly windows: hourly sketches only.
        assert_eq!(days("2026-11-01T05:00:00Z", "2026-11-02T04:00:00Z", Window::Month), d("2026-11-01T05:00:00Z"));
        assert_eq!(days("2026-11-01T00:00:00Z", "2026-11-03T00:00:00Z", Window::Hour), d("2026-11-01T00:00:00Z"));
    }

    #[test]
    fn bad_queries_are_named() {
        let meters = Meters::parse(DEFAULT_METERS_TOML).unwrap();
        assert_eq!(query().check(&meters), Ok(()));
        let cases = [
            (UsageQuery { from: query().from + 1, ..query() }, "whole hours"),
            (UsageQuery { to: query().from, ..query() }, "empty range"),
            (UsageQuery { meters: vec!["nope".into()], ..query() }, "unknown meter"),
            (UsageQuery { from: 0, to: 3600 * 20_000, window: Window::Hour, ..query() }, "windows"),
        ];
        for (q, want) in cases {
            let e = q.check(&meters).unwrap_err();
            assert!(e.0.contains(want), "{e}");
        }
    }

    #[test]
    fn one_org_in_view_lists_zeros() {
        let meters = Meters::parse(DEFAULT_METERS_TOML).unwrap();
        let selected: Vec<_> =
            meters.meters().iter().filter(|m| ["events", "unique_users"].contains(&&*m.name)).collect();
        let mut f = Figures::new();
        f.insert(("o".into(), "".into(), "events".into(), query().from), 7);
        let rows = answer(&query(), &selected, f.clone());
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].meter.as_str(), rows[0].value, rows[0].approximate), ("events", 7, false));
        assert_eq!((rows[1].meter.as_str(), rows[1].value, rows[1].approximate), ("unique_users", 0, true));
        assert_eq!(rows[0].window_start.as_deref(), Some("2026-11-01T00:00:00Z"));
        assert_eq!(rows[0].window_end.as_deref(), Some("2026-11-02T00:00:00Z"));
        // Every org (admin, no org named): only what exists.
        let all = UsageQuery { org: None, ..query() };
        assert_eq!(answer(&all, &selected, f).len(), 1);
        // No data at all for a named org: zeros, stated.
        let rows = answer(&query(), &selected, Figures::new());
        assert_eq!(rows.iter().map(|r| r.value).sum::<u64>(), 0);
        assert_eq!(rows.len(), 2);
    }
}
