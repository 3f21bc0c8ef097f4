//! Escaped unpaired UTF-16 surrogates (`"\ud83d"`): valid JSON (RFC 8259 §8.2), sent by
//! JavaScript producers that cut a string mid-emoji, but not representable in a Rust `str`.
//!
//! PRODUCT.md §1: they are replaced by U+FFFD before anything is hashed or stored, and the event is
//! billed normally. [`repair`] rewrites each unpaired `\uD800`–`\uDFFF` escape of a message value
//! as `\uFFFD`: six bytes for six bytes, so every byte offset into the value (the span of a batch
//! event, for instance) stays valid for the original. Properly paired surrogates are left alone.
//! Messages without such escapes (nearly all) are not copied.

use memchr::memmem;

/// The value with every unpaired surrogate escape replaced by `\uFFFD`, or `None` if it has none.
pub fn repair(value: &[u8]) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    let finder = memmem::Finder::new(b"\\u");
    let mut pos = 0;
    while let Some(found) = finder.find(&value[pos..]) {
        let at = pos + found;
        pos = at + 2;
        // A real escape only if the backslash is not itself escaped (an odd run of backslashes).
        let run = value[..=at].iter().rev().take_while(|&&c| c == b'\\').count();
        if run % 2 == 0 {
            continue;
        }
        let Some(unit) = hex4(value, at + 2) else { continue };
        match unit {
            0xD800..=0xDBFF => {
                // A high surrogate is paired only if a low one follows at once.
                if value.get(at + 6..at + 8) == Some(b"\\u") && matches!(hex4(value, at + 8), Some(0xDC00..=0xDFFF)) {
                    pos = at + 12;
                    continue;
                }
            }
            0xDC00..=0xDFFF => {} // a low surrogate here has no high one before it
            _ => {
                pos = at + 6;
                continue;
            }
        }
        let buf = out.get_or_insert_with(|| value.to_vec());
        buf[at + 2..at + 6].copy_from_slice(b"FFFD");
        pos = at + 6;
    }
    out
}

fn hex4(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at + 4)?;
    let mut v = 0u16;
    for &c in s {
        v = v << 4 | (c as char).to_digit(16)? as u16;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::repair;

    fn fixed(s: &str) -> Option<String> {
        repair(s.as_bytes()).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn lone_surrogates_become_replacement_characters() {
        assert_eq!(fixed(r#"{"u":"u-\ud83d"}"#).as_deref(), Some(r#"{"u":"u-\uFFFD"}"#));
        assert_eq!(fixed(r#"{"u":"\udE00x"}"#).as_deref(), Some(r#"{"u":"\uFFFDx"}"#));
        assert_eq!(fixed(r#"["\ud83d\ud83d\ude00"]"#).as_deref(), Some(r#"["\uFFFD\ud83d\ude00"]"#));
        assert_eq!(fixed(r#"["\ud83d\n"]"#).as_deref(), Some(r#"["\uFFFD\n"]"#));
        assert_eq!(fixed(r#"["\\\ud83d"]"#).as_deref(), Some(r#"["\\\uFFFD"]"#));
        assert_eq!(fixed(r#"["\ud83d"#).as_deref(), Some(r#"["\uFFFD"#));
    }

    #[test]
    fn everything_else_is_left_alone() {
        for s in [r#"{"u":"\ud83d\ude00"}"#, r#"{"u":"\\ud83d"}"#, r#"{"u":"\u00e9\u0041"}"#, r#"{"u":"\ud8"}"#, "{}"] {
            assert_eq!(fixed(s), None, "{s}");
        }
    }

    #[test]
    fn repaired_values_parse_and_keep_their_length() {
        let s = r#"{"a":"x\udc00y","b\ud800":1}"#;
        let r = repair(s.as_bytes()).unwrap();
        assert_eq!(r.len(), s.len());
        let v: serde_json::Value = serde_json::from_slice(&r).unwrap();
        assert_eq!(v["a"], "x\u{fffd}y");
        assert_eq!(v["b\u{fffd}"], 1);
    }
}
