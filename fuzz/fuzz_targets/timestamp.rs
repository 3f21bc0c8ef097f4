//! RFC 3339 timestamps (PRODUCT.md §1) against the `time` crate's parser, on any input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use time::format_description::well_known::Rfc3339;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let ours = tally::timestamp::parse_rfc3339(s);
    let reference = time::OffsetDateTime::parse(s, &Rfc3339).ok().map(|t| t.unix_timestamp());
    match (ours, reference) {
        // Both accept: the same second.
        (Some(a), Some(b)) => assert_eq!(a, b, "{s:?}"),
        // We accept, `time` refuses: only a leap second at 23:59:60 UTC on a day that is not a
        // month's last (the contract allows it wherever 23:59:60 UTC stands).
        (Some(a), None) => {
            assert_eq!(&s[17..19], "60", "accepted what time refuses: {s:?}");
            assert_eq!(a.rem_euclid(86_400), 86_399, "a leap second not at 23:59:60 UTC: {s:?}");
        }
        // `time` accepts, we refuse: only a separator other than T/t (time takes any byte).
        (None, Some(_)) => assert!(!matches!(s.as_bytes()[10], b'T' | b't'), "refused what RFC 3339 allows: {s:?}"),
        (None, None) => {}
    }
    // Whatever we accept (in years 0000–9999 UTC) is an instant that formats back to itself.
    if let Some(a) = ours.filter(|a| (-62_167_219_200..=tally::timestamp::MAX_RFC3339_SECS).contains(a)) {
        if let Some(l) = s.as_bytes().get(17..19) {
            if l != b"60" {
                assert_eq!(tally::timestamp::parse_rfc3339(&tally::timestamp::format_rfc3339(a)), Some(a), "{s:?}");
            }
        }
    }
});
