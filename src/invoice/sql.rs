//! The invoicer's ClickHouse queries (`sql/invoicer/*.sql`, also run on chDB in CI) and the
//! TabSeparated parsing of their answers.

use std::collections::BTreeMap;

use crate::sink::clickhouse::{quote, ChError, ClickHouse};

pub const ADDITIVE_BUCKETS: &str = include_str!("../../sql/invoicer/additive_buckets.sql");
pub const UNIQUE_PERIOD: &str = include_str!("../../sql/invoicer/unique_period.sql");
pub const USAGE_ADDITIVE: &str = include_str!("../../sql/invoicer/usage_additive.sql");
pub const USAGE_UNIQUE: &str = include_str!("../../sql/invoicer/usage_unique.sql");
pub const VERIFY_AGGREGATES: &str = include_str!("../../sql/invoicer/verify_aggregates.sql");
pub const VERIFY_EVENTS: &str = include_str!("../../sql/invoicer/verify_events.sql");
pub const LEDGER_READ: &str = include_str!("../../sql/invoicer/ledger_read.sql");

/// Fills `${name}` placeholders. Values are inserted verbatim: quote strings with [`quote`].
pub fn render(template: &str, vars: &[(&str, String)]) -> String {
    let mut sql: String = template.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
    for (k, v) in vars {
        sql = sql.replace(&format!("${{{k}}}"), v);
    }
    sql
}

/// Runs `sql` with `FORMAT TabSeparated` and returns the unescaped fields of each row.
pub fn rows(ch: &ClickHouse, sql: &str) -> Result<Vec<Vec<String>>, ChError> {
    let body = ch.query(&format!("{sql}\nFORMAT TabSeparated"))?;
    let text = String::from_utf8_lossy(&body);
    Ok(text.lines().filter(|l| !l.is_empty()).map(|l| l.split('\t').map(unescape).collect()).collect())
}

/// Undoes TabSeparated escaping (`\t`, `\n`, `\\`, ...).
pub fn unescape(s: &str) -> String {
    if !s.contains('\\') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some(o) => out.push(o),
            None => out.push('\\'),
        }
    }
    out
}

pub fn num<T: std::str::FromStr>(s: &str) -> Result<T, ChError> {
    s.parse().map_err(|_| ChError::Response(format!("not a number: {s:?}")))
}

/// The common variables of a period query.
pub fn period_vars(ch: &ClickHouse, from: i64, to: i64) -> Vec<(&'static str, String)> {
    vec![("database", ch.database().to_string()), ("from", from.to_string()), ("to", to.to_string())]
}

/// `AND org_id = '...'` or nothing.
pub fn org_filter(org: Option<&str>) -> String {
    org.map(|o| format!("AND org_id = {}", quote(o))).unwrap_or_default()
}

/// Keyed figures: (org, project, meter, hour) → value.
pub type Figures = BTreeMap<(String, String, String, i64), u64>;

pub fn figures(ch: &ClickHouse, sql: &str) -> Result<Figures, ChError> {
    let mut out = Figures::new();
    for r in rows(ch, sql)? {
        if r.len() != 5 {
            return Err(ChError::Response(format!("expected 5 columns, got {r:?}")));
        }
        let v: u64 = num(&r[4])?;
        *out.entry((r[0].clone(), r[1].clone(), r[2].clone(), num(&r[3])?)).or_default() += v;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_and_fields_unescape() {
        let sql = render(
            ADDITIVE_BUCKETS,
            &[("database", "db".into()), ("from", "0".into()), ("to", "3600".into()), ("bucket_secs", "3600".into())],
        );
        assert!(!sql.contains("${") && !sql.contains("--"), "{sql}");
        assert!(sql.contains("db.usage_hourly"));
        assert_eq!(unescape(r"a\tb\\c\nd"), "a\tb\\c\nd");
    }
}
