//! Message decoding (PRODUCT.md §1), single events and batches, against an independent reading
//! that keeps every key (so repeated keys are visible), on any input:
//! * decoding never merges repeated keys: whenever an object the decoder walks repeats a key,
//!   the value (or that batch event) is malformed;
//! * whatever it accepts, it reads exactly as the reference does (strings after U+FFFD repair,
//!   numbers as exact integers of at most 2^53 − 1);
//! * a batch is never silently nothing: an accepted batch has at least one event;
//! * the hot path's scanner answers only where the serde reading does, and with its captures.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use serde::de::{self, Deserializer as _, MapAccess, SeqAccess, Visitor};
use tally::decode::scan::scan_message;
use tally::decode::{
    decode_event, decode_message, decode_message_captured, number, surrogates, Captured, Message, PathTree,
};

/// A JSON value that keeps repeated keys and number texts.
#[derive(Debug)]
enum Lossless {
    Obj(Vec<(String, Lossless)>),
    Arr(Vec<Lossless>),
    Str(String),
    Num(String),
    Other,
    Null,
}

struct V;
impl<'de> Visitor<'de> for V {
    type Value = Lossless;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("json")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Lossless, A::Error> {
        let mut out = Vec::new();
        while let Some(k) = m.next_key::<String>()? {
            out.push((k, m.next_value_seed(Seed)?));
        }
        Ok(Lossless::Obj(out))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Lossless, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = s.next_element_seed(Seed)? {
            out.push(v);
        }
        Ok(Lossless::Arr(out))
    }
    fn visit_str<E>(self, v: &str) -> Result<Lossless, E> {
        Ok(Lossless::Str(v.to_string()))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Lossless, E> {
        Ok(Lossless::Other)
    }
    fn visit_unit<E>(self) -> Result<Lossless, E> {
        Ok(Lossless::Null)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Lossless, E> {
        Err(de::Error::custom("numbers are read raw"))
    }
}

struct Seed;
impl<'de> de::DeserializeSeed<'de> for Seed {
    type Value = Lossless;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Lossless, D::Error> {
        // Numbers keep their text: read every value raw first, then parse non-numbers.
        let raw: &serde_json::value::RawValue = de::Deserialize::deserialize(d)?;
        let t = raw.get();
        if t.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
            return Ok(Lossless::Num(t.to_string()));
        }
        let mut inner = serde_json::Deserializer::from_str(t);
        inner.deserialize_any(V).map_err(de::Error::custom)
    }
}

fn parse(text: &str) -> Option<Lossless> {
    let mut d = serde_json::Deserializer::from_str(text);
    let v = de::DeserializeSeed::deserialize(Seed, &mut d).ok()?;
    d.end().ok()?;
    Some(v)
}

const PATHS: [&str; 6] = ["id", "type", "timestamp", "body.usage.input", "body.usage.output", "body.userId"];

fn repeats(entries: &[(String, Lossless)]) -> bool {
    let mut seen = std::collections::HashSet::new();
    entries.iter().any(|(k, _)| !seen.insert(k.as_str()))
}

fn get<'a>(entries: &'a [(String, Lossless)], key: &str) -> Option<&'a Lossless> {
    entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// The reference reading of one event object: Err(()) if malformed by the decoding rules
/// (a repeated key on a walked object), else the captures at `PATHS`.
/// A number beyond the range of `f64` where the decoder expects an object (`"body": 1e400`): the
/// one place the JSON parser's number limit shows (a documented limit, docs/inputs.md).
fn huge(v: Option<&Lossless>) -> bool {
    matches!(v, Some(Lossless::Num(n)) if n.parse::<f64>().map_or(true, f64::is_infinite))
}

fn reference(ev: &Lossless) -> Result<Vec<Captured<'static>>, ()> {
    let Lossless::Obj(top) = ev else { return Err(()) };
    if repeats(top) || huge(get(top, "body")) {
        return Err(());
    }
    if let Some(Lossless::Obj(body)) = get(top, "body") {
        if repeats(body) || huge(get(body, "usage")) {
            return Err(());
        }
        if let Some(Lossless::Obj(usage)) = get(body, "usage") {
            if repeats(usage) {
                return Err(());
            }
        }
    }
    Ok(PATHS
        .iter()
        .map(|p| {
            let mut cur = Some(ev);
            for key in p.split('.') {
                cur = match cur {
                    Some(Lossless::Obj(e)) => get(e, key),
                    Some(Lossless::Null) | None => return Captured::Missing,
                    Some(_) => return Captured::Other,
                };
            }
            match cur {
                None | Some(Lossless::Null) => Captured::Missing,
                Some(Lossless::Str(s)) => Captured::Str(Cow::Owned(s.clone())),
                Some(Lossless::Num(n)) => number::meter_value(n).map_or(Captured::Other, Captured::U64),
                Some(_) => Captured::Other,
            }
        })
        .collect())
}

/// The one-pass batch reading takes a value exactly when the two-pass reading finds a batch of
/// well-formed events (at most the limit), with the same captures; a single event alike.
fn one_pass_agrees(value: &[u8], tree: &PathTree) {
    const MAX: usize = 8;
    let (mut caps, mut flat) = (vec![Captured::Missing; tree.slots()], Vec::new());
    let one = decode_message_captured(value, tree, &mut caps, &mut Vec::new(), &mut flat, MAX);
    // The hot path's scanner answers only as the serde one-pass reading does.
    let (mut scan_caps, mut scan_flat) = (vec![Captured::Missing; tree.slots()], Vec::new());
    match scan_message(value, tree, &mut scan_caps, &mut Vec::new(), &mut scan_flat, MAX) {
        Ok(Message::Single) => {
            assert!(matches!(one, Ok(Message::Single)), "scanned a value serde does not read as one event");
            assert_eq!(scan_caps, caps);
        }
        Ok(Message::Captured(n)) => {
            assert!(matches!(one, Ok(Message::Captured(m)) if m == n), "scanned a batch serde does not read so");
            assert_eq!(scan_flat, flat);
        }
        Ok(Message::Batch(_)) => unreachable!("the scanner reads batches in place"),
        Err(_) => {}
    }
    let mut two_caps = vec![Captured::Missing; tree.slots()];
    match decode_message(value, tree, &mut two_caps) {
        Ok(Message::Single) => {
            assert!(matches!(one, Ok(Message::Single)), "a single event not read in one pass");
            assert_eq!(caps, two_caps);
        }
        Ok(Message::Batch(raws)) => {
            let events: Vec<_> = raws
                .iter()
                .map(|raw| {
                    let mut c = vec![Captured::Missing; tree.slots()];
                    decode_event(raw, tree, &mut c).map(|()| c)
                })
                .collect();
            if events.len() <= MAX && events.iter().all(Result::is_ok) {
                assert!(matches!(one, Ok(Message::Captured(n)) if n == events.len()), "batch not read in one pass");
                for (chunk, want) in flat.chunks_exact(tree.slots()).zip(&events) {
                    assert_eq!(chunk, want.as_ref().unwrap().as_slice());
                }
            } else {
                assert!(one.is_err(), "one pass took a batch the two passes refuse events of");
            }
        }
        Ok(Message::Captured(_)) => unreachable!("decode_message reads batches in two passes"),
        Err(_) => assert!(one.is_err(), "one pass took a value the two passes refuse"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut tree = PathTree::new();
    for p in &PATHS[3..] {
        tree.add(p).unwrap();
    }
    let repaired = surrogates::repair(data);
    let value: &[u8] = repaired.as_deref().unwrap_or(data);
    if let Some(r) = &repaired {
        assert_eq!(r.len(), data.len(), "repair keeps every offset");
    }
    one_pass_agrees(value, &tree);
    let mut caps = vec![Captured::Missing; tree.slots()];
    let ours = decode_message(value, &tree, &mut caps);
    let lossless = std::str::from_utf8(value).ok().and_then(parse);
    match (ours, lossless) {
        (Ok(Message::Single), Some(doc)) => {
            let want = reference(&doc).expect("accepted although a walked object repeats a key");
            assert_eq!(caps, want);
        }
        (Ok(Message::Batch(events)), Some(Lossless::Obj(top))) => {
            assert!(!events.is_empty(), "an empty batch must be malformed");
            assert!(!repeats(&top), "a repeated top-level key was accepted");
            let Some(Lossless::Arr(items)) = get(&top, "batch") else { panic!("batch without an array") };
            assert_eq!(items.len(), events.len());
            for (raw, item) in events.iter().zip(items) {
                let mut c = vec![Captured::Missing; tree.slots()];
                match (decode_event(raw, &tree, &mut c), reference(item)) {
                    (Ok(()), Ok(want)) => assert_eq!(c, want),
                    (Err(_), Err(())) => {}
                    (ours, theirs) => panic!("batch event {raw}: decoder {ours:?}, reference {theirs:?}"),
                }
            }
        }
        (Ok(_), other) => panic!("accepted what is not a JSON object: {other:?}"),
        (Err(_), Some(Lossless::Obj(top))) => {
            // Refused a JSON object: it must break a rule (repeats, batch shape, not an event).
            let batch = get(&top, "batch");
            let event_field = top.iter().any(|(k, _)| ["id", "type", "timestamp", "body"].contains(&k.as_str()));
            let ok_batch = matches!(batch, Some(Lossless::Arr(a)) if !a.is_empty()) && !event_field;
            let single = batch.is_none();
            assert!(
                repeats(&top)
                    || (single && reference(&Lossless::Obj(top.iter().map(|(k, v)| (k.clone(), clone(v))).collect())).is_err())
                    || (!single && !ok_batch),
                "refused a valid value"
            );
        }
        (Err(_), _) => {}
    }
});

fn clone(v: &Lossless) -> Lossless {
    match v {
        Lossless::Obj(e) => Lossless::Obj(e.iter().map(|(k, v)| (k.clone(), clone(v))).collect()),
        Lossless::Arr(a) => Lossless::Arr(a.iter().map(clone).collect()),
        Lossless::Str(s) => Lossless::Str(s.clone()),
        Lossless::Num(n) => Lossless::Num(n.clone()),
        Lossless::Other => Lossless::Other,
        Lossless::Null => Lossless::Null,
    }
}
