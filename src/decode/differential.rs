//! Differential property test: the streaming decoder against a reference reading of the same
//! rules built on `serde_json::Value`, on generated documents (key orders, whitespace, escapes,
//! numbers in several JSON forms, repeated keys, wrong types at every read path).
//!
//! `serde_json::Value` keeps the last of repeated keys, so the reference detects repeats from the
//! generated document itself; everything else (strings, escapes, numbers) comes from `Value`.

use proptest::prelude::*;
use serde_json::Value;

use super::*;

/// A generated JSON value; objects may repeat keys.
#[derive(Debug, Clone)]
enum Doc {
    Obj(Vec<(String, Doc)>),
    Arr(Vec<Doc>),
    Str(String),
    /// Number text, exactly representable in `f64` (so `Value` reads it exactly).
    Num(String),
    Bool(bool),
    Null,
}

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..1_000_000_000).prop_map(|v| v.to_string()),
        Just("9007199254740991".to_string()),
        Just("9007199254740992".to_string()),
        Just("18446744073709551615".to_string()),
        (0u64..1_000_000).prop_map(|v| format!("{v}.0")),
        (0u64..1_000_000).prop_map(|v| format!("{v}.000")),
        (0u64..1_000_000).prop_map(|v| format!("{v}.5")),
        (1u64..10, 0u32..4).prop_map(|(d, e)| format!("{d}e{e}")),
        (1u64..10, 0u32..4).prop_map(|(d, e)| format!("{d}E+{e}")),
        (1u64..1000).prop_map(|v| format!("-{v}")),
        Just("-0".to_string()),
        Just("-0.0".to_string()),
        (1u64..100).prop_map(|v| format!("{v}e-1")),
    ]
}

fn text() -> impl Strategy<Value = String> {
    "[a-z0-9 é😀\"\\\\/\n-]{0,8}"
}

fn leaf() -> impl Strategy<Value = Doc> {
    prop_oneof![
        3 => number().prop_map(Doc::Num),
        3 => text().prop_map(Doc::Str),
        1 => any::<bool>().prop_map(Doc::Bool),
        1 => Just(Doc::Null),
    ]
}

/// An object whose keys come from `keys` (some repeated), values from `value`.
fn object(keys: &'static [&'static str], value: BoxedStrategy<Doc>) -> BoxedStrategy<Doc> {
    proptest::collection::vec((proptest::sample::select(keys), value), 0..6)
        .prop_map(|entries| Doc::Obj(entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
        .boxed()
}

fn usage() -> BoxedStrategy<Doc> {
    prop_oneof![4 => object(&["input", "output", "total"], leaf().boxed()), 1 => leaf()].boxed()
}

fn body() -> BoxedStrategy<Doc> {
    let value = prop_oneof![3 => leaf(), 2 => usage(), 1 => proptest::collection::vec(leaf(), 0..3).prop_map(Doc::Arr)];
    prop_oneof![5 => object(&["usage", "userId", "model", "input", "usage"], value.boxed()), 1 => leaf()].boxed()
}

fn event() -> BoxedStrategy<Doc> {
    let value = prop_oneof![
        3 => text().prop_map(Doc::Str),
        1 => leaf(),
        3 => body(),
    ];
    (
        proptest::collection::vec(
            (proptest::sample::select(&["id", "type", "timestamp", "body", "extra"][..]), value.boxed()),
            0..7,
        ),
        text(),
        text(),
        body(),
    )
        .prop_map(|(mut entries, id, ty, b)| {
            // Usually the fields an event needs, in random positions among the others.
            entries.insert(0, ("id", Doc::Str(id)));
            entries.push(("type", Doc::Str(ty)));
            entries.push(("body", b));
            Doc::Obj(entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
        })
        .boxed()
}

/// Renders with whitespace and optional `\uXXXX` escapes of ASCII letters in keys and strings.
fn render(d: &Doc, ws: &str, escape: bool, out: &mut String) {
    let string = |s: &str, out: &mut String| {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '/' if escape => out.push_str("\\/"),
                c if escape && c.is_ascii_lowercase() => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if escape && (c as u32) > 0xFFFF => {
                    let mut b = [0u16; 2];
                    for u in c.encode_utf16(&mut b) {
                        out.push_str(&format!("\\u{u:04X}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    };
    match d {
        Doc::Obj(entries) => {
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(ws);
                string(k, out);
                out.push_str(ws);
                out.push(':');
                out.push_str(ws);
                render(v, ws, escape, out);
            }
            out.push_str(ws);
            out.push('}');
        }
        Doc::Arr(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(ws);
                render(v, ws, escape, out);
            }
            out.push(']');
        }
        Doc::Str(s) => string(s, out),
        Doc::Num(n) => out.push_str(n),
        Doc::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Doc::Null => out.push_str("null"),
    }
}

/// Whether an object the decoder walks repeats a key: the top level, and along `body.usage`.
fn repeats_a_walked_key(d: &Doc, depth_path: &[&str]) -> bool {
    let Doc::Obj(entries) = d else { return false };
    let mut seen = std::collections::HashSet::new();
    if entries.iter().any(|(k, _)| !seen.insert(k.as_str())) {
        return true;
    }
    match depth_path.split_first() {
        Some((next, rest)) => entries.iter().filter(|(k, _)| k == next).any(|(_, v)| repeats_a_walked_key(v, rest)),
        None => false,
    }
}

/// The reference reading of one path of a `Value`.
fn reference_leaf(v: Option<&Value>) -> Captured<'static> {
    match v {
        None | Some(Value::Null) => Captured::Missing,
        Some(Value::String(s)) => Captured::Str(Cow::Owned(s.clone())),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                if u <= number::MAX_METER_VALUE {
                    return Captured::U64(u);
                }
                return Captured::Other;
            }
            if n.as_i64().is_some() {
                return Captured::Other; // negative
            }
            let f = n.as_f64().expect("a number");
            if f.fract() == 0.0 && (0.0..=number::MAX_METER_VALUE as f64).contains(&f) {
                Captured::U64(f as u64)
            } else {
                Captured::Other
            }
        }
        Some(_) => Captured::Other,
    }
}

/// Reads `path` from `v`: a non-object on the way makes the leaf `Other` (`null` makes it missing).
fn reference_path(v: &Value, path: &[&str]) -> Captured<'static> {
    let mut cur = v;
    for (i, key) in path.iter().enumerate() {
        match cur {
            Value::Object(m) => match m.get(*key) {
                Some(next) if i + 1 == path.len() => return reference_leaf(Some(next)),
                Some(next) => cur = next,
                None => return Captured::Missing,
            },
            Value::Null => return Captured::Missing,
            _ => return Captured::Other,
        }
    }
    reference_leaf(Some(cur))
}

const PATHS: [&str; 6] = ["id", "type", "timestamp", "body.usage.input", "body.usage.output", "body.userId"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn streaming_decoder_agrees_with_a_value_reading(doc in event(), ws in proptest::sample::select(vec!["", " ", "\n\t "]), escape in any::<bool>()) {
        let mut t = PathTree::new();
        for p in &PATHS[3..] {
            t.add(p).unwrap();
        }
        let mut text = String::new();
        render(&doc, ws, escape, &mut text);
        let mut caps = vec![Captured::Missing; t.slots()];
        let ours = decode_message(text.as_bytes(), &t, &mut caps).map(|_| ());
        let number_walked = escape || walks_a_number(&doc, &["body", "usage"]);
        scanner_agrees(&text, &t, if ours.is_ok() { Some(&caps) } else { None }, number_walked)?;
        // The same document without escapes: the scanner must answer unless serde refuses it.
        let (plain_doc, mut plain) = (plain(&doc), String::new());
        render(&plain_doc, ws, false, &mut plain);
        let mut plain_caps = vec![Captured::Missing; t.slots()];
        let serde_plain = decode_message(plain.as_bytes(), &t, &mut plain_caps).is_ok();
        let number_walked = walks_a_number(&plain_doc, &["body", "usage"]);
        scanner_agrees(&plain, &t, serde_plain.then_some(&plain_caps), number_walked)?;
        if repeats_a_walked_key(&doc, &["body", "usage"]) {
            prop_assert_eq!(ours, Err(Malformed), "{}", text);
            return Ok(());
        }
        let value: Value = serde_json::from_str(&text).expect("generated JSON is valid");
        prop_assert_eq!(ours, Ok(()), "{}", text);
        for (slot, path) in PATHS.iter().enumerate() {
            let parts: Vec<&str> = path.split('.').collect();
            prop_assert_eq!(&caps[slot], &reference_path(&value, &parts), "{} in {}", path, text);
        }
    }
}

/// The scanner ([`scan::scan_message`]) on a single event: where it answers, the serde reader
/// (`serde`: its captures, or None if it refused the value) took the value with the same captures;
/// it answers for every value serde takes, except those with escaped keys (`escape_or_number`
/// also covers an escaped string or a number where an object is walked) or escaped captures.
fn scanner_agrees(
    text: &str,
    t: &PathTree,
    serde: Option<&Vec<Captured<'_>>>,
    escape_or_number: bool,
) -> Result<(), TestCaseError> {
    let mut caps = vec![Captured::Missing; t.slots()];
    match scan::scan_message(text.as_bytes(), t, &mut caps, &mut Vec::new(), &mut Vec::new(), 1000) {
        Ok(Message::Single) => prop_assert_eq!(Some(&caps), serde, "{}", text),
        Ok(_) => prop_assert!(false, "an event scanned as a batch: {}", text),
        Err(scan::Fallback) => prop_assert!(serde.is_none_or(|c| escape_or_number || escaped(c)), "{}", text),
    }
    Ok(())
}

/// The document with every character that renders as an escape removed from its strings.
fn plain(d: &Doc) -> Doc {
    match d {
        Doc::Obj(e) => Doc::Obj(e.iter().map(|(k, v)| (k.clone(), plain(v))).collect()),
        Doc::Arr(a) => Doc::Arr(a.iter().map(plain).collect()),
        Doc::Str(s) => Doc::Str(s.replace(['"', '\\', '\n'], "")),
        other => other.clone(),
    }
}

/// The document with only the first of any repeated key in every object.
fn first_keys(d: &Doc) -> Doc {
    match d {
        Doc::Obj(e) => {
            let mut seen = std::collections::HashSet::new();
            Doc::Obj(
                e.iter().filter(|(k, _)| seen.insert(k.clone())).map(|(k, v)| (k.clone(), first_keys(v))).collect(),
            )
        }
        Doc::Arr(a) => Doc::Arr(a.iter().map(first_keys).collect()),
        other => other.clone(),
    }
}

/// Whether serde read a captured string with an escape (it owns exactly those).
fn escaped(caps: &[Captured<'_>]) -> bool {
    caps.iter().any(|c| matches!(c, Captured::Str(Cow::Owned(_))))
}

/// Whether a number, or a string rendered with an escape, stands where the decoder walks an
/// object (`body`, `body.usage`): the scanner leaves both to serde (which reads such a number as
/// `f64`, and such a string after surrogate repair).
fn walks_a_number(d: &Doc, path: &[&str]) -> bool {
    let (Doc::Obj(entries), Some((next, rest))) = (d, path.split_first()) else { return false };
    entries.iter().filter(|(k, _)| k == next).any(|(_, v)| match v {
        Doc::Num(_) => true,
        Doc::Str(s) => s.contains(['"', '\\', '\n']),
        _ => walks_a_number(v, rest),
    })
}

/// One element of a generated batch: mostly events, sometimes a value that is not an object.
fn batch_item() -> impl Strategy<Value = Doc> {
    prop_oneof![8 => event(), 1 => Just(Doc::Null), 1 => Just(Doc::Num("5".to_string())), 1 => Just(Doc::Arr(vec![]))]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// The one-pass batch reading (`decode_message_captured`) succeeds exactly where the two-pass
    /// one finds every event well-formed (and the batch no larger than its limit), with the same
    /// captures event by event; everything else is left to the two-pass reading.
    #[test]
    fn one_pass_batches_agree_with_two_passes(items in proptest::collection::vec(batch_item(), 1..5), ws in proptest::sample::select(vec!["", " ", "\n"]), escape in any::<bool>(), max in 1usize..5) {
        let mut t = PathTree::new();
        for p in &PATHS[3..] {
            t.add(p).unwrap();
        }
        // Half of the cases are well-formed batches without escapes, where the scanner must answer.
        let (items, max) = if escape {
            (items, max)
        } else {
            let events: Vec<Doc> = items.iter().filter(|d| matches!(d, Doc::Obj(_))).map(|d| first_keys(&plain(d))).collect();
            let events = if events.is_empty() { vec![Doc::Obj(vec![("id".into(), Doc::Str("a".into()))])] } else { events };
            let max = max.max(events.len());
            (events, max)
        };
        let mut text = String::new();
        let items_walk_a_number = items.iter().any(|d| walks_a_number(d, &["body", "usage"]));
        render(&Doc::Obj(vec![("batch".to_string(), Doc::Arr(items))]), ws, escape, &mut text);
        let mut caps = vec![Captured::Missing; t.slots()];
        let two: Vec<Result<Vec<Captured<'_>>, Malformed>> = match decode_message(text.as_bytes(), &t, &mut caps) {
            Ok(Message::Batch(raws)) => raws
                .iter()
                .map(|raw| {
                    let mut c = vec![Captured::Missing; t.slots()];
                    decode_event(raw, &t, &mut c).map(|()| c)
                })
                .collect(),
            _ => unreachable!("a generated batch is well-formed at the top"),
        };
        let mut events = Vec::new();
        let one = decode_message_captured(text.as_bytes(), &t, &mut caps, &mut Vec::new(), &mut events, max);
        // The scanner answers only where the serde one-pass reading does, and the same way.
        let mut scanned = Vec::new();
        match scan::scan_message(text.as_bytes(), &t, &mut caps, &mut Vec::new(), &mut scanned, max) {
            Ok(Message::Captured(n)) => {
                prop_assert!(matches!(one, Ok(Message::Captured(m)) if m == n), "{}", text);
                prop_assert_eq!(&scanned, &events, "{}", text);
            }
            Ok(_) => prop_assert!(false, "a batch scanned as something else: {}", text),
            // Escapes in keys or captured strings are left to serde.
            Err(scan::Fallback) => {
                prop_assert!(one.is_err() || escape || items_walk_a_number || escaped(&events), "{}", text)
            }
        }
        if two.len() <= max && two.iter().all(Result::is_ok) {
            prop_assert!(matches!(one, Ok(Message::Captured(n)) if n == two.len()), "{}", text);
            for (chunk, want) in events.chunks_exact(t.slots()).zip(&two) {
                prop_assert_eq!(chunk, want.as_ref().unwrap().as_slice(), "{}", text);
            }
        } else {
            prop_assert!(one.is_err(), "{}", text);
        }
    }
}
