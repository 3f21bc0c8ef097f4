//! RFC 3339 timestamps to Unix seconds, without allocation (the hot path parses one per event).

/// Parses an RFC 3339 §5.6 `date-time` into Unix seconds (the fraction is truncated), exactly
/// as the grammar allows (PRODUCT.md §1): `YYYY-MM-DD`, `T` or `t`, `HH:MM:SS`, an optional
/// fraction of any length, `Z`, `z` or `±HH:MM`. Second `60` is accepted only where a leap second
/// can stand — 23:59:60 in UTC, after applying the offset — and read as 23:59:59; anywhere else
/// it is refused, like every other form the grammar does not allow (a space for `T`, a missing
/// offset, `+0100`).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    parse_rfc3339_with(s, &mut HourCache::default())
}

/// The date and hour of the last timestamp [`parse_rfc3339_with`] read: its first 13 bytes
/// (`YYYY-MM-DDTHH`), validated, and their days since the epoch and hour. The events of a
/// batch are mostly of a few hours, so most timestamps skip the date's checks and the calendar
/// arithmetic (callgrind, benches/pipeline.rs).
#[derive(Debug, Clone, Copy, Default)]
pub struct HourCache {
    prefix: [u8; 13],
    days: i64,
    hour: i64,
    valid: bool,
}

/// [`parse_rfc3339`], reading the date and hour from `cache` when `s` starts as the timestamp
/// it last read did: the same result for every input, whatever the cache holds.
#[inline]
pub fn parse_rfc3339_with(s: &str, cache: &mut HourCache) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let prefix: &[u8; 13] = b[..13].try_into().expect("13 bytes");
    if !(cache.valid && *prefix == cache.prefix) {
        let (days, hour) = date_hour(b)?;
        *cache = HourCache { prefix: *prefix, days, hour, valid: true };
    }
    let (days, hour) = (cache.days, cache.hour);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (minute, second) = (two_digits(b, 14)?, two_digits(b, 17)?);
    if minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (two_digits(b, i + 1)?, two_digits(b, i + 4)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    if second == 60 && (hour * 60 + minute - offset / 60).rem_euclid(1440) != 23 * 60 + 59 {
        return None;
    }
    Some(days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset)
}

/// The date and hour of the first 13 bytes of `b` (at least 20 long): `YYYY-MM-DD`, `T` or `t`,
/// `HH`, checked; as days since the epoch and the hour.
fn date_hour(b: &[u8]) -> Option<(i64, i64)> {
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    let year = two_digits(b, 0)? * 100 + two_digits(b, 2)?;
    let (month, day, hour) = (two_digits(b, 5)?, two_digits(b, 8)?, two_digits(b, 11)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) || hour > 23 {
        return None;
    }
    Some((days_from_civil(year, month, day), hour))
}

/// The two ASCII digits at `b[i..i + 2]` (the caller checked the length) as a number.
#[inline(always)]
fn two_digits(b: &[u8], i: usize) -> Option<i64> {
    let (h, l) = (b[i].wrapping_sub(b'0'), b[i + 1].wrapping_sub(b'0'));
    if h < 10 && l < 10 {
        Some(i64::from(h * 10 + l))
    } else {
        None
    }
}

/// Days in month `m` (1–12) of year `y`, proleptic Gregorian.
pub fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Latest second RFC 3339 can write (9999-12-31T23:59:59Z): its years have four digits.
pub const MAX_RFC3339_SECS: i64 = 253_402_300_799;

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// algorithm, the inverse of [`days_from_civil`]).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (for reports and the load generator). Any
/// value formats as its own instant; outside years 0000–9999 (which RFC 3339 cannot write) the
/// year has a sign or more digits, so it can never be read back as another instant.
pub fn format_rfc3339(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let year = if (0..=9999).contains(&y) { format!("{y:04}") } else { format!("{y:+05}") };
    format!("{year}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_sdks_send() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-28T10:15:02.120Z"), Some(1_795_860_902));
        assert_eq!(parse_rfc3339("2026-11-28T11:15:02+01:00"), Some(1_795_860_902));
        assert_eq!(parse_rfc3339("2026-11-28T09:15:02.999999-01:00"), Some(1_795_860_902));
        assert_eq!(parse_rfc3339("2024-02-29T00:00:00Z"), Some(1_709_164_800));
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "2026-11-28",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-28T10:15:02",
            "2026-11-28T10:15:02.Z",
            "2026-11-28T25:00:00Z",
            "2026-11-28T10:15:02+0100",
            "yesterday at noon!!",
            "2026-11-28 10:15:02Z",
            "2026-11-28T10:15:60Z",
            "2016-12-31T23:59:60+01:00",
            "2016-12-31T23:58:60Z",
            "2026-11-28T10:15:02+24:00",
            "2026-11-28T10:15:02+01:60",
            "2026-11-28T10:15:02.1.2Z",
            "2026-11-28T10:15:02Zz",
            "+2026-11-28T10:15:02Z",
            "2026-11-28T10:15:02\u{0}Z",
        ] {
            assert_eq!(parse_rfc3339(s), None, "{s}");
        }
    }

    #[test]
    fn lower_case_separators_fractions_and_leap_seconds() {
        assert_eq!(parse_rfc3339("2026-11-28t10:15:02z"), Some(1_795_860_902));
        assert_eq!(parse_rfc3339("2026-11-28T10:15:02.123456789012345678901234567890Z"), Some(1_795_860_902));
        assert_eq!(parse_rfc3339("2026-11-28T10:15:02-00:00"), Some(1_795_860_902));
        // 23:59:60 UTC is read as 23:59:59, in UTC or at any offset that puts it there.
        let end_2016 = parse_rfc3339("2016-12-31T23:59:59Z").unwrap();
        assert_eq!(parse_rfc3339("2016-12-31T23:59:60Z"), Some(end_2016));
        assert_eq!(parse_rfc3339("2016-12-31T18:59:60-05:00"), Some(end_2016));
        assert_eq!(parse_rfc3339("2017-01-01T05:29:60+05:30"), Some(end_2016));
    }

    proptest::proptest! {
        /// Differential: on every input both accept, this parser and the `time` crate's RFC 3339
        /// parser agree to the second; and this parser never accepts what `time` refuses, except
        /// a leap second at 23:59:60 UTC on a day that is not a month's last (the contract is
        /// "where a leap second can stand", `time` narrows it to month ends).
        #[test]
        fn agrees_with_the_time_crate(
            y in 0i64..=9999, mo in 0i64..=13, d in 0i64..=32, h in 0i64..=25, mi in 0i64..=61, sec in 0i64..=61,
            frac in proptest::option::of("[0-9]{1,12}"),
            sep in proptest::sample::select(vec!['T', 't', ' ', 'x']),
            off in proptest::sample::select(vec!["Z".to_string(), "z".into(), "+00:00".into(), "-05:00".into(),
                "+05:30".into(), "+23:59".into(), "-23:59".into(), "+24:00".into(), "+01:60".into(), "".into(), "+0100".into()]),
        ) {
            let s = format!(
                "{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{sec:02}{}{off}",
                frac.map(|f| format!(".{f}")).unwrap_or_default()
            );
            let ours = parse_rfc3339(&s);
            let reference = time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                .ok()
                .map(|t| t.unix_timestamp());
            match (ours, reference) {
                (Some(a), Some(b)) => proptest::prop_assert_eq!(a, b, "{}", s),
                (Some(_), None) => proptest::prop_assert!(sec == 60, "accepted what time refuses: {}", s),
                (None, Some(_)) => proptest::prop_assert!(sep != 'T' && sep != 't', "refused: {}", s),
                (None, None) => {}
            }
        }
    }

    proptest::proptest! {
        /// The cache changes nothing: a sequence of timestamps read through one cache (valid and
        /// invalid ones, sharing date-hour prefixes or not) reads each as it reads alone.
        #[test]
        fn the_hour_cache_changes_no_result(
            stamps in proptest::collection::vec(
                (0usize..4, 0i64..=61, 0i64..=61, proptest::sample::select(vec!["Z", "+01:00", "-23:59", "z", "", "+24:00"]),
                 proptest::sample::select(vec!["", ".5", ".", "x"])),
                1..40,
            ),
        ) {
            // A few prefixes: valid ones that differ in the hour, the day or the separator, a
            // leap day, an invalid date and an invalid hour.
            let prefixes = ["2016-12-31T23", "2016-12-31t23", "2024-02-29T00", "2026-02-30T10"];
            let mut cache = HourCache::default();
            for (p, mi, sec, off, frac) in stamps {
                let s = format!("{}:{mi:02}:{sec:02}{frac}{off}", prefixes[p]);
                proptest::prop_assert_eq!(parse_rfc3339_with(&s, &mut cache), parse_rfc3339(&s), "{}", s);
                let h = format!("2016-12-31T{:02}:{mi:02}:{sec:02}{off}", 20 + p);
                proptest::prop_assert_eq!(parse_rfc3339_with(&h, &mut cache), parse_rfc3339(&h), "{}", h);
            }
        }
    }

    #[test]
    fn round_trips_with_format() {
        for secs in [0, 1_795_860_902, 951_782_400, 4_102_444_799, -62_167_219_200, MAX_RFC3339_SECS, -1] {
            assert_eq!(parse_rfc3339(&format_rfc3339(secs)), Some(secs), "{secs}");
        }
        assert_eq!(format_rfc3339(MAX_RFC3339_SECS + 1), "+10000-01-01T00:00:00Z");
        assert_eq!(parse_rfc3339(&format_rfc3339(MAX_RFC3339_SECS + 1)), None);
        assert_eq!(format_rfc3339(-62_167_219_201), "-0001-12-31T23:59:59Z");
        assert!(format_rfc3339(i64::MIN).starts_with('-') && format_rfc3339(i64::MAX).starts_with('+'));
    }

    proptest::proptest! {
        #[test]
        fn formats_like_the_time_crate(secs in -62_167_219_200i64..=MAX_RFC3339_SECS) {
            let t = time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
            let want = t.format(&time::format_description::well_known::Rfc3339).unwrap();
            proptest::prop_assert_eq!(format_rfc3339(secs), want);
        }
    }
}
