//! The period an invoicer command covers and its buckets.

use crate::timestamp::{days_from_civil, days_in_month, format_rfc3339, parse_rfc3339};

use super::config::Granularity;

/// A half-open UTC range [from, to) of whole hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub from: i64,
    pub to: i64,
}

/// Parses `2026-11-29T13:00:00Z` (any RFC 3339), `2026-11-29T13` or `2026-11-29` (midnight UTC):
/// four-digit years, two-digit months, days and hours, and only days the month has
/// (`2026-02-31` is refused, not read as March 3rd; until 2026-12-01 it was, found by a review).
pub fn parse_time(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Some(t) = parse_rfc3339(s) {
        return Ok(t);
    }
    let digits = |t: &str, n: usize| -> Option<i64> {
        (t.len() == n && t.bytes().all(|b| b.is_ascii_digit())).then(|| t.parse().ok()).flatten()
    };
    let date = |d: &str| -> Option<i64> {
        let mut it = d.split('-');
        let (y, m, dd) = (digits(it.next()?, 4)?, digits(it.next()?, 2)?, digits(it.next()?, 2)?);
        if it.next().is_some() || !(1..=12).contains(&m) || !(1..=days_in_month(y, m)).contains(&dd) {
            return None;
        }
        Some(days_from_civil(y, m, dd) * 86_400)
    };
    if let Some((d, h)) = s.split_once('T') {
        if let (Some(day), Some(h)) = (date(d), digits(h, 2)) {
            if (0..24).contains(&h) {
                return Ok(day + h * 3600);
            }
        }
    } else if let Some(day) = date(s) {
        return Ok(day);
    }
    Err(format!("invalid time {s:?}: expected RFC 3339 (2026-11-29T13:00:00Z), 2026-11-29T13 or 2026-11-29"))
}

impl Period {
    /// From `--month YYYY-MM` or `--from/--to`.
    pub fn from_args(month: Option<&str>, from: Option<&str>, to: Option<&str>) -> Result<Period, String> {
        let p = match (month, from, to) {
            (Some(m), None, None) => {
                let (y, mo) = m
                    .split_once('-')
                    .and_then(|(y, mo)| Some((y.parse::<i64>().ok()?, mo.parse::<i64>().ok()?)))
                    .filter(|(_, mo)| (1..=12).contains(mo))
                    .ok_or_else(|| format!("invalid --month {m:?}: expected YYYY-MM"))?;
                let (ny, nm) = if mo == 12 { (y + 1, 1) } else { (y, mo + 1) };
                Period { from: days_from_civil(y, mo, 1) * 86_400, to: days_from_civil(ny, nm, 1) * 86_400 }
            }
            (None, Some(f), Some(t)) => Period { from: parse_time(f)?, to: parse_time(t)? },
            (Some(_), _, _) => return Err("--month excludes --from/--to".into()),
            _ => return Err("give --month YYYY-MM, or both --from and --to".into()),
        };
        if p.from >= p.to {
            return Err(format!(
                "empty period: --from {} is not before --to {}",
                format_rfc3339(p.from),
                format_rfc3339(p.to)
            ));
        }
        if p.from % 3600 != 0 || p.to % 3600 != 0 {
            return Err("--from and --to must be whole hours (UTC)".into());
        }
        Ok(p)
    }

    /// Checks that buckets of `g` tile the period exactly.
    pub fn check_granularity(&self, g: Granularity) -> Result<(), String> {
        if self.from % g.secs() != 0 || self.to % g.secs() != 0 {
            return Err(format!("with day granularity --from and --to must be midnights (UTC); got {self}"));
        }
        Ok(())
    }

    pub fn bucket_of(t: i64, g: Granularity) -> i64 {
        t - t.rem_euclid(g.secs())
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{}", format_rfc3339(self.from), format_rfc3339(self.to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_ranges() {
        let p = Period::from_args(Some("2026-11"), None, None).unwrap();
        assert_eq!(format_rfc3339(p.from), "2026-11-01T00:00:00Z");
        assert_eq!(format_rfc3339(p.to), "2026-12-01T00:00:00Z");
        let p = Period::from_args(Some("2026-12"), None, None).unwrap();
        assert_eq!(format_rfc3339(p.to), "2027-01-01T00:00:00Z");
        let p = Period::from_args(None, Some("2026-11-29T13"), Some("2026-11-30")).unwrap();
        assert_eq!(format_rfc3339(p.from), "2026-11-29T13:00:00Z");
        assert!(p.check_granularity(Granularity::Day).is_err());
        assert!(p.check_granularity(Granularity::Hour).is_ok());
    }

    #[test]
    fn bad_periods_are_explained() {
        assert!(Period::from_args(Some("2026-13"), None, None).unwrap_err().contains("YYYY-MM"));
        assert!(Period::from_args(None, Some("2026-11-02"), Some("2026-11-01")).unwrap_err().contains("empty"));
        assert!(Period::from_args(None, Some("2026-11-01T10:30:00Z"), Some("2026-11-02"))
            .unwrap_err()
            .contains("whole hours"));
        assert!(Period::from_args(None, Some("2026-11-01"), None).is_err());
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
    }

    /// Only dates the calendar has, in one spelling each (found by a review: `2026-02-31` was
    /// read as March 3rd, `2026-1-5` and `2026-11-29T+5` were taken, and a 14-digit year
    /// overflowed).
    #[test]
    fn impossible_or_loose_dates_are_refused() {
        assert_eq!(parse_time("2028-02-29").map(format_rfc3339), Ok("2028-02-29T00:00:00Z".into()));
        assert_eq!(parse_time("2026-12-31T23").map(format_rfc3339), Ok("2026-12-31T23:00:00Z".into()));
        for bad in [
            "2026-02-29",
            "2026-02-31",
            "2026-04-31",
            "2026-1-5",
            "2026-01-05T5",
            "2026-11-29T+5",
            "2026-11-29T24",
            "99999999999999-01-01",
            "+2026-01-01",
            "2026-00-10",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
