//! The invoicer's ClickHouse queries (`sql/invoicer/*.sql`, also run on chDB in CI) and the
//! TabSeparated parsing of their answers.

use std::collections::BTreeMap;

use crate::sink::clickhouse::{quote, ChError, ClickHouse};

pub const UNIQUE_PERIOD: &str = include_str!("../../sql/invoicer/unique_period.sql");
pub const USAGE_ADDITIVE: &str = include_str!("../../sql/invoicer/usage_additive.sql");
pub const USAGE_UNIQUE: &str = include_str!("../../sql/invoicer/usage_unique.sql");
pub const VERIFY_AGGREGATES_ADDITIVE: &str = include_str!("../../sql/invoicer/verify_aggregates_additive.sql");
pub const VERIFY_AGGREGATES_UNIQUE: &str = include_str!("../../sql/invoicer/verify_aggregates_unique.sql");
pub const VERIFY_EVENTS: &str = include_str!("../../sql/invoicer/verify_events.sql");
pub const VERIFY_DAILY_SKETCHES: &str = include_str!("../../sql/invoicer/verify_daily_sketches.sql");
pub const LEDGER_READ: &str = include_str!("../../sql/invoicer/ledger_read.sql");
pub const EXPLAIN_PROJECTS: &str = include_str!("../../sql/invoicer/explain_projects.sql");
pub const EXPLAIN_PROJECTS_UNIQUE: &str = include_str!("../../sql/invoicer/explain_projects_unique.sql");
pub const EXPLAIN_EVENTS: &str = include_str!("../../sql/invoicer/explain_events.sql");
pub const OVERFLOW_HOURS: &str = include_str!("../../sql/invoicer/overflow_hours.sql");

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

/// Keyed figures: (org, project, meter, hour) → exact value. 128 bits: a figure of the per-event
/// rows may need more than 64 (PRODUCT.md §1), and the caller decides what to refuse.
pub type Figures = BTreeMap<(String, String, String, i64), u128>;

pub fn figures(ch: &ClickHouse, sql: &str) -> Result<Figures, ChError> {
    let mut out = Figures::new();
    for r in rows(ch, sql)? {
        if r.len() != 6 {
            return Err(ChError::Response(format!("expected 6 columns, got {r:?}")));
        }
        // Both halves are sums of at most 2^64 rows of 32-bit values: a u128 cannot wrap.
        *out.entry((r[0].clone(), r[1].clone(), r[2].clone(), num(&r[3])?)).or_default() += split_total(&r[4], &r[5])?;
    }
    Ok(out)
}

/// The exact total of a sum the queries return split into 32-bit halves (`value_hi`, `value_lo`:
/// each the exact sum of the high and low halves of the values).
pub fn split_total(hi: &str, lo: &str) -> Result<u128, ChError> {
    let (hi, lo): (u64, u64) = (num(hi)?, num(lo)?);
    Ok((u128::from(hi) << 32) + u128::from(lo))
}

/// `total` as a 64-bit figure, or [`ChError::TotalOverflow`] naming `what` when it needs more
/// than 64 bits: a total anywhere in the invoicer is either exact or refused, never wrapped
/// (PRODUCT.md §1).
pub fn fits(total: u128, what: &dyn Fn() -> String) -> Result<u64, ChError> {
    u64::try_from(total).map_err(|_| ChError::TotalOverflow(format!("{} = {total} does not fit in 64 bits", what())))
}

/// `a + b`, or [`ChError::TotalOverflow`] naming `what` (PRODUCT.md §1).
pub fn add(a: u64, b: u64, what: &dyn Fn() -> String) -> Result<u64, ChError> {
    fits(u128::from(a) + u128::from(b), what)
}

/// [`split_total`] then [`fits`].
pub fn exact_sum(hi: &str, lo: &str, what: &dyn Fn() -> String) -> Result<u64, ChError> {
    fits(split_total(hi, lo)?, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_sums_join_exactly_or_refuse() {
        let what = || "o/p/m".to_string();
        assert_eq!(exact_sum("0", "12", &what).unwrap(), 12);
        // 2^53 − 1 twice: hi and lo halves.
        let v: u64 = (1 << 53) - 1;
        let (hi, lo) = (2 * (v >> 32), 2 * (v & 0xFFFF_FFFF));
        assert_eq!(exact_sum(&hi.to_string(), &lo.to_string(), &what).unwrap(), 2 * v);
        assert_eq!(exact_sum("4294967295", "4294967295", &what).unwrap(), u64::MAX);
        // u64::MAX + 1 (e.g. 18446744073709551615 and 1, issue 7 row 5): refused by name.
        let err = exact_sum("4294967295", "4294967296", &what).unwrap_err();
        assert!(matches!(err, ChError::TotalOverflow(_)), "{err}");
        assert!(err.to_string().contains("o/p/m") && err.to_string().contains("18446744073709551616"), "{err}");
        assert_eq!(err.class(), crate::sink::clickhouse::ErrorClass::Permanent);
    }

    #[test]
    fn templates_render_and_fields_unescape() {
        let sql = render(
            VERIFY_AGGREGATES_ADDITIVE,
            &[("database", "db".into()), ("from", "0".into()), ("to", "3600".into())],
        );
        assert!(!sql.contains("${") && !sql.contains("--"), "{sql}");
        assert!(sql.contains("db.usage_hourly"));
        assert_eq!(unescape(r"a\tb\\c\nd"), "a\tb\\c\nd");
    }
}
