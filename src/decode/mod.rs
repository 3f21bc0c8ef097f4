//! Decoding of Kafka message values (§1): one event object or `{"batch": [...]}`.
//!
//! Only the fields something reads are extracted: a [`PathTree`] lists them (`id`, `type`,
//! `timestamp` and every meter's path) and the decoder walks the JSON once, borrowing strings from
//! the message where they have no escapes and skipping every other field without building a DOM.
//!
//! The rules of PRODUCT.md §1 ("Reading JSON like a billing system must") are enforced here:
//! * a key that appears twice in an object the decoder walks (the top level, a batch event, and
//!   every object along a read path such as `body` and `body.usage`) makes the value
//!   [`Malformed`]: what is billed must never depend on which copy a parser keeps (serde_json
//!   keeps the last one, other parsers the first);
//! * numbers at read paths are read exactly from their text ([`number`]), never through `f64`;
//! * a value with `batch` and event fields, `batch` twice, or an empty or non-array `batch` is
//!   [`Malformed`];
//! * escaped unpaired surrogates are repaired before decoding ([`surrogates::repair`]).

use std::borrow::Cow;
use std::fmt;

pub mod number;
pub mod scan;
pub mod surrogates;

#[cfg(test)]
mod differential;

use std::collections::HashSet;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Slot of `id` in the capture array.
pub const SLOT_ID: usize = 0;
/// Slot of `type`.
pub const SLOT_TYPE: usize = 1;
/// Slot of `timestamp`.
pub const SLOT_TIMESTAMP: usize = 2;

/// A value found at a path of interest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Captured<'a> {
    /// Absent (or JSON `null`).
    #[default]
    Missing,
    /// A non-negative integer-valued number of at most [`number::MAX_METER_VALUE`], in any
    /// JSON form (`12`, `12.0`, `1e3`).
    U64(u64),
    /// A string, borrowed from the message when it has no escapes.
    Str(Cow<'a, str>),
    /// Present with another type (negative, fractional or too large a number, bool, object, array).
    Other,
}

impl Captured<'_> {
    /// The same value, owning its string.
    pub fn into_owned(self) -> Captured<'static> {
        match self {
            Captured::Missing => Captured::Missing,
            Captured::U64(v) => Captured::U64(v),
            Captured::Str(s) => Captured::Str(Cow::Owned(s.into_owned())),
            Captured::Other => Captured::Other,
        }
    }
}

/// The set of JSON paths to extract, as a tree of object keys.
#[derive(Debug, Clone, Default)]
pub struct PathTree {
    root: Node,
    slots: usize,
}

#[derive(Debug, Clone, Default)]
struct Node {
    children: Vec<(Box<str>, Node)>,
    slot: Option<usize>,
    /// Bit `n` set when a child's key is `n` bytes long (bit 63: 63 bytes or more), so that most
    /// keys of a walked object that lead nowhere are told apart without a comparison.
    lengths: u64,
}

/// The bit of [`Node::lengths`] for a key of `len` bytes.
#[inline(always)]
fn length_bit(len: usize) -> u64 {
    1 << len.min(63)
}

impl Node {
    fn child(&self, key: &str) -> Option<&Node> {
        self.child_bytes(key.as_bytes())
    }

    #[inline]
    fn child_bytes(&self, key: &[u8]) -> Option<&Node> {
        if self.lengths & length_bit(key.len()) == 0 {
            return None;
        }
        self.children.iter().find(|(k, _)| scan::same_key(k.as_bytes(), key)).map(|(_, n)| n)
    }

    fn mark_other(&self, caps: &mut [Captured<'_>]) {
        if let Some(s) = self.slot {
            caps[s] = Captured::Other;
        }
        for (_, c) in &self.children {
            c.mark_other(caps);
        }
    }
}

/// Why a path cannot be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("path {path:?}: {reason}")]
pub struct PathError {
    pub path: String,
    pub reason: &'static str,
}

impl PathTree {
    /// A tree holding `id`, `type` and `timestamp` at slots 0, 1, 2.
    pub fn new() -> Self {
        let mut t = PathTree::default();
        for p in ["id", "type", "timestamp"] {
            t.add(p).expect("fixed paths are valid");
        }
        t
    }

    /// Adds a dotted path (`body.usage.input`) and returns its slot; adding a path twice returns
    /// the same slot. A path may not be a prefix of another one.
    pub fn add(&mut self, path: &str) -> Result<usize, PathError> {
        let err = |reason| PathError { path: path.to_string(), reason };
        if path.is_empty() || path.split('.').any(str::is_empty) {
            return Err(err("must be dot-separated non-empty keys"));
        }
        let mut node = &mut self.root;
        for key in path.split('.') {
            if node.slot.is_some() {
                return Err(err("a prefix of it is already a leaf path"));
            }
            let i = match node.children.iter().position(|(k, _)| &**k == key) {
                Some(i) => i,
                None => {
                    node.lengths |= length_bit(key.len());
                    node.children.push((key.into(), Node::default()));
                    node.children.len() - 1
                }
            };
            node = &mut node.children[i].1;
        }
        if let Some(s) = node.slot {
            return Ok(s);
        }
        if !node.children.is_empty() {
            return Err(err("it is a prefix of another path"));
        }
        node.slot = Some(self.slots);
        self.slots += 1;
        Ok(self.slots - 1)
    }

    /// Number of slots a capture array needs.
    pub fn slots(&self) -> usize {
        self.slots
    }
}

/// What the top level of a message value is.
pub enum Message<'a> {
    /// One event; its captures are in the array passed to [`decode_message`].
    Single,
    /// `{"batch": [...]}`: the raw events, to decode one by one with [`decode_event`].
    Batch(Vec<&'a RawValue>),
    /// `{"batch": [...]}` read in one pass by [`decode_message_captured`]: this many events, whose
    /// captures fill its `events` buffer, [`PathTree::slots`] per event, in batch order.
    Captured(usize),
}

/// The value is not JSON, or not of the shape §1 describes.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

/// Decodes a message value. For a single event, `caps` (length [`PathTree::slots`], reset by the
/// caller) receives its fields.
pub fn decode_message<'a>(
    value: &'a [u8],
    tree: &PathTree,
    caps: &mut [Captured<'a>],
) -> Result<Message<'a>, Malformed> {
    decode_message_with(value, tree, caps, &mut Vec::new())
}

/// [`decode_message`] with a reusable scratch for the keys of the objects being walked (empty
/// before and after the call), so that the hot path does not allocate it per message.
pub fn decode_message_with<'a>(
    value: &'a [u8],
    tree: &PathTree,
    caps: &mut [Captured<'a>],
    seen: &mut Vec<Cow<'a, str>>,
) -> Result<Message<'a>, Malformed> {
    // One UTF-8 check of the whole value (std's is fast on ASCII) instead of one per string the
    // parser returns; the parser then reads from a `&str` and validates nothing again.
    let value = std::str::from_utf8(value).map_err(|_| Malformed)?;
    decode_top(value, tree, caps, seen, None)
}

/// [`decode_message_with`] reading a batch in the same pass: each event is walked where it
/// stands and its captures are appended to `events` (cleared first), [`PathTree::slots`] per
/// event, instead of being collected as raw text to parse a second time. Returns
/// [`Message::Single`] or [`Message::Captured`].
///
/// It succeeds only where the two-pass reading ([`decode_message_with`], then [`decode_event`]
/// per event) finds every event well-formed, and then with the same captures. Any value that the
/// two-pass reading rejects, or in which it would reject an event (an event that is not an
/// object or repeats a key), or with more than `max_events` events, is an `Err` here: the caller
/// reads it again the two-pass way, which names what is wrong, event by event. Rejections are
/// rare, so nearly every batch is parsed once.
pub fn decode_message_captured<'a>(
    value: &'a [u8],
    tree: &PathTree,
    caps: &mut [Captured<'a>],
    seen: &mut Vec<Cow<'a, str>>,
    events: &mut Vec<Captured<'a>>,
    max_events: usize,
) -> Result<Message<'a>, Malformed> {
    events.clear();
    let value = std::str::from_utf8(value).map_err(|_| Malformed)?;
    decode_top(value, tree, caps, seen, Some(BatchOut { events, slots: tree.slots, max_events }))
}

fn decode_top<'a>(
    value: &'a str,
    tree: &PathTree,
    caps: &mut [Captured<'a>],
    seen: &mut Vec<Cow<'a, str>>,
    batch: Option<BatchOut<'_, 'a>>,
) -> Result<Message<'a>, Malformed> {
    let mut de = serde_json::Deserializer::from_str(value);
    seen.clear();
    let out = TopSeed { node: &tree.root, caps, seen, batch }.deserialize(&mut de).map_err(|_| Malformed)?;
    de.end().map_err(|_| Malformed)?;
    match out {
        Top::Batch(b) if !b.is_empty() => Ok(Message::Batch(b)),
        Top::Captured(n) if n > 0 => Ok(Message::Captured(n)),
        Top::Object => Ok(Message::Single),
        Top::Batch(_) | Top::Captured(_) | Top::NotObject => Err(Malformed),
    }
}

/// Where a one-pass batch goes (see [`decode_message_captured`]).
struct BatchOut<'c, 'a> {
    events: &'c mut Vec<Captured<'a>>,
    slots: usize,
    max_events: usize,
}

/// Reads a `batch` array in place: each event walked along the tree into its own slots.
struct BatchSeed<'t, 'c, 'a> {
    node: &'t Node,
    out: BatchOut<'c, 'a>,
    seen: &'c mut Vec<Cow<'a, str>>,
}

impl<'de, 't, 'c> DeserializeSeed<'de> for BatchSeed<'t, 'c, 'de> {
    type Value = usize;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, 't, 'c> Visitor<'de> for BatchSeed<'t, 'c, 'de> {
    type Value = usize;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of event objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let BatchOut { events, slots, max_events } = self.out;
        let mut n = 0;
        loop {
            let start = events.len();
            events.resize(start + slots, Captured::Missing);
            let seed = NodeSeed { node: self.node, caps: &mut events[start..], seen: &mut *self.seen };
            match seq.next_element_seed(seed)? {
                None => {
                    events.truncate(start);
                    return Ok(n);
                }
                Some(Walked::Object) if n < max_events => n += 1,
                // Not an object, or too many: the two-pass reading says which events are wrong.
                Some(_) => return Err(de::Error::custom("an event the two-pass reading must judge")),
            }
        }
    }
}

/// Decodes one event of a batch into `caps` (reset by the caller).
pub fn decode_event<'a>(raw: &'a RawValue, tree: &PathTree, caps: &mut [Captured<'a>]) -> Result<(), Malformed> {
    decode_event_with(raw, tree, caps, &mut Vec::new())
}

/// [`decode_event`] with a reusable scratch (see [`decode_message_with`]).
pub fn decode_event_with<'a>(
    raw: &'a RawValue,
    tree: &PathTree,
    caps: &mut [Captured<'a>],
    seen: &mut Vec<Cow<'a, str>>,
) -> Result<(), Malformed> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    seen.clear();
    let walked = NodeSeed { node: &tree.root, caps, seen }.deserialize(&mut de).map_err(|_| Malformed)?;
    if walked == Walked::Object {
        Ok(())
    } else {
        Err(Malformed)
    }
}

/// Top-level keys of an event object (§1): a value holding one of them and `batch` is malformed.
const EVENT_FIELDS: [&str; 4] = ["id", "type", "timestamp", "body"];

/// Objects with more keys than this check duplicates with a hash set instead of a scan.
const SCAN_KEYS: usize = 16;

/// The keys of the objects being walked, innermost last: finds a key repeated in one object.
/// (A fingerprint per key to skip string comparisons was measured slower: keys are short.)
struct Seen<'s, 'de> {
    stack: &'s mut Vec<Cow<'de, str>>,
    base: usize,
    set: Option<HashSet<Cow<'de, str>>>,
}

impl<'s, 'de> Seen<'s, 'de> {
    fn open(stack: &'s mut Vec<Cow<'de, str>>) -> Self {
        let base = stack.len();
        Seen { stack, base, set: None }
    }

    /// Records `key`; an error if this object already had it. (`&Cow`, not `&str`: cloning it
    /// keeps a borrowed key borrowed from the input for the object's whole walk.)
    #[allow(clippy::ptr_arg)]
    fn insert<E: de::Error>(&mut self, key: &Cow<'de, str>) -> Result<(), E> {
        let dup = match &mut self.set {
            Some(set) => !set.insert(key.clone()),
            None => {
                let dup = self.stack[self.base..].iter().any(|k| k == key);
                self.stack.push(key.clone());
                if self.stack.len() - self.base > SCAN_KEYS {
                    self.set = Some(self.stack.drain(self.base..).collect());
                }
                dup
            }
        };
        if dup {
            Err(E::custom(format_args!("duplicate key {key:?}")))
        } else {
            Ok(())
        }
    }
}

impl Drop for Seen<'_, '_> {
    fn drop(&mut self) {
        self.stack.truncate(self.base);
    }
}

/// An object key, borrowed when possible.
struct Key<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

enum Top<'a> {
    Object,
    NotObject,
    Batch(Vec<&'a RawValue>),
    Captured(usize),
}

struct TopSeed<'t, 'c, 'b, 'a> {
    node: &'t Node,
    caps: &'c mut [Captured<'a>],
    seen: &'c mut Vec<Cow<'a, str>>,
    /// Read a batch in place (one pass) rather than as raw events.
    batch: Option<BatchOut<'b, 'a>>,
}

impl<'de, 't, 'c, 'b> DeserializeSeed<'de> for TopSeed<'t, 'c, 'b, 'de> {
    type Value = Top<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Top<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 't, 'c, 'b> Visitor<'de> for TopSeed<'t, 'c, 'b, 'de> {
    type Value = Top<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event object or {\"batch\": [...]}")
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Top<'de>, A::Error> {
        let mut batch = None;
        let mut event_field = false;
        let mut seen = Seen::open(self.seen);
        while let Some(Key(key)) = map.next_key()? {
            seen.insert(&key)?;
            if key == "batch" {
                batch = Some(match self.batch.take() {
                    Some(out) => Top::Captured(map.next_value_seed(BatchSeed {
                        node: self.node,
                        out,
                        seen: &mut *seen.stack,
                    })?),
                    // A second `batch` is refused above (a repeated key), so one `take` suffices.
                    None => Top::Batch(map.next_value::<Vec<&'de RawValue>>()?),
                });
            } else {
                event_field |= EVENT_FIELDS.contains(&&*key) || self.node.child(&key).is_some();
                visit_entry(&mut map, self.node, &key, self.caps, seen.stack)?;
            }
        }
        match batch {
            Some(_) if event_field => Err(de::Error::custom("both batch and event fields")),
            Some(b) => Ok(b),
            None => Ok(Top::Object),
        }
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Top<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Top::NotObject)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }
    fn visit_str<E>(self, _: &str) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }
    fn visit_unit<E>(self) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }
}

fn visit_entry<'de, A: MapAccess<'de>>(
    map: &mut A,
    node: &Node,
    key: &str,
    caps: &mut [Captured<'de>],
    seen: &mut Vec<Cow<'de, str>>,
) -> Result<(), A::Error> {
    match node.child(key) {
        Some(child) => match child.slot {
            Some(slot) => caps[slot] = leaf(map.next_value::<&'de RawValue>()?),
            None => {
                map.next_value_seed(NodeSeed { node: child, caps, seen })?;
            }
        },
        None => {
            map.next_value::<IgnoredAny>()?;
        }
    }
    Ok(())
}

/// What a walked value turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walked {
    Object,
    Null,
    Other,
}

/// Walks an object along the tree.
struct NodeSeed<'t, 'c, 'a> {
    node: &'t Node,
    caps: &'c mut [Captured<'a>],
    seen: &'c mut Vec<Cow<'a, str>>,
}

impl<'de, 't, 'c> DeserializeSeed<'de> for NodeSeed<'t, 'c, 'de> {
    type Value = Walked;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Walked, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 't, 'c> NodeSeed<'t, 'c, 'de> {
    fn not_object<E>(self) -> Result<Walked, E> {
        self.node.mark_other(self.caps);
        Ok(Walked::Other)
    }
}

impl<'de, 't, 'c> Visitor<'de> for NodeSeed<'t, 'c, 'de> {
    type Value = Walked;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Walked, A::Error> {
        let mut seen = Seen::open(self.seen);
        while let Some(Key(key)) = map.next_key()? {
            seen.insert(&key)?;
            visit_entry(&mut map, self.node, &key, self.caps, seen.stack)?;
        }
        Ok(Walked::Object)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Walked, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.not_object()
    }
    fn visit_unit<E>(self) -> Result<Walked, E> {
        Ok(Walked::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Walked, E> {
        self.not_object()
    }
    fn visit_i64<E>(self, _: i64) -> Result<Walked, E> {
        self.not_object()
    }
    fn visit_u64<E>(self, _: u64) -> Result<Walked, E> {
        self.not_object()
    }
    fn visit_f64<E>(self, _: f64) -> Result<Walked, E> {
        self.not_object()
    }
    fn visit_str<E>(self, _: &str) -> Result<Walked, E> {
        self.not_object()
    }
}

/// Reads a value at a leaf path from its raw text: strings (borrowed when they have no escapes),
/// numbers exactly ([`number::meter_value`]), `null` as missing, anything else as [`Captured::Other`].
fn leaf(raw: &RawValue) -> Captured<'_> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => {
            let inner = &text[1..text.len() - 1];
            if !inner.contains('\\') {
                Captured::Str(Cow::Borrowed(inner))
            } else {
                // Unpaired surrogates are repaired here, where the string is read (PRODUCT.md §1);
                // elsewhere the parser skips them, or fails and the caller repairs the value.
                let fixed = surrogates::repair(text.as_bytes());
                let text = fixed.as_deref().map_or(text, |f| std::str::from_utf8(f).expect("repair keeps UTF-8"));
                match serde_json::from_str::<String>(text) {
                    Ok(s) => Captured::Str(Cow::Owned(s)),
                    Err(_) => Captured::Other,
                }
            }
        }
        Some(b'-' | b'0'..=b'9') => match number::meter_value(text) {
            Ok(v) => Captured::U64(v),
            Err(_) => Captured::Other,
        },
        Some(b'n') => Captured::Missing,
        _ => Captured::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (PathTree, usize, usize) {
        let mut t = PathTree::new();
        let input = t.add("body.usage.input").unwrap();
        let user = t.add("body.userId").unwrap();
        (t, input, user)
    }

    #[test]
    fn single_event_fields_are_borrowed() {
        let (t, input, user) = tree();
        let v = br#"{"id":"e1","type":"generation-create","extra":{"a":[1,2]},"timestamp":"2026-11-28T10:15:02Z",
                     "body":{"userId":"u-42","usage":{"input":812,"output":96}}}"#;
        let mut caps = vec![Captured::Missing; t.slots()];
        assert!(matches!(decode_message(v, &t, &mut caps), Ok(Message::Single)));
        assert!(matches!(&caps[SLOT_ID], Captured::Str(Cow::Borrowed("e1"))));
        assert_eq!(caps[SLOT_TYPE], Captured::Str("generation-create".into()));
        assert_eq!(caps[input], Captured::U64(812));
        assert_eq!(caps[user], Captured::Str("u-42".into()));
    }

    /// The length filter of a node's children never hides a child: keys of every length from 1
    /// to 100 bytes (63 and over share one bit), found among siblings of other lengths, and a
    /// key of a present length but other bytes not found.
    #[test]
    fn children_are_found_at_every_key_length() {
        for n in 1..=100usize {
            let mut t = PathTree::new();
            let key = "k".repeat(n);
            let slot = t.add(&format!("body.{key}")).unwrap();
            t.add(&format!("body.{}", "q".repeat(n % 7 + 70))).unwrap();
            let body = t.root.child("body").unwrap();
            assert_eq!(body.child(&key).and_then(|c| c.slot), Some(slot), "{n}");
            assert!(body.child(&"x".repeat(n)).is_none(), "{n}");
            assert!(body.child(&"k".repeat(n + 1)).is_none() || n + 1 == n % 7 + 70, "{n}");
        }
    }

    #[test]
    fn batch_yields_raw_events() {
        let (t, input, _) = tree();
        let v = br#"{"batch":[{"id":"a","type":"x","timestamp":"t","body":{"usage":{"input":-1}}}, 7, {"id":"b"}]}"#;
        let mut caps = vec![Captured::Missing; t.slots()];
        let Ok(Message::Batch(events)) = decode_message(v, &t, &mut caps) else { panic!("batch expected") };
        assert_eq!(events.len(), 3);
        let mut c = vec![Captured::Missing; t.slots()];
        decode_event(events[0], &t, &mut c).unwrap();
        assert_eq!(c[input], Captured::Other);
        assert_eq!(decode_event(events[1], &t, &mut vec![Captured::Missing; t.slots()]), Err(Malformed));
    }

    #[test]
    fn wrong_types_are_marked() {
        let (t, input, user) = tree();
        for (body, want_input, want_user) in [
            (r#"{"usage":{"input":1.5},"userId":3}"#, Captured::Other, Captured::U64(3)),
            (r#"{"usage":"lots"}"#, Captured::Other, Captured::Missing),
            (r#"{"usage":{"input":null}}"#, Captured::Missing, Captured::Missing),
            (r#"null"#, Captured::Missing, Captured::Missing),
            (r#"{"usage":{"input":18446744073709551615}}"#, Captured::Other, Captured::Missing),
            (r#"{"usage":{"input":9007199254740992}}"#, Captured::Other, Captured::Missing),
            (r#"{"usage":{"input":9007199254740991}}"#, Captured::U64(9007199254740991), Captured::Missing),
            (r#"{"usage":{"input":12.0}}"#, Captured::U64(12), Captured::Missing),
            (r#"{"usage":{"input":1e3}}"#, Captured::U64(1000), Captured::Missing),
            (r#"{"usage":{"input":-0}}"#, Captured::U64(0), Captured::Missing),
            (r#"{"usage":{"input":12.000000000000000001}}"#, Captured::Other, Captured::Missing),
            (r#"{"usage":{"input":true},"userId":null}"#, Captured::Other, Captured::Missing),
        ] {
            let v = format!(r#"{{"id":"e","type":"t","timestamp":"x","body":{body}}}"#);
            let mut caps = vec![Captured::Missing; t.slots()];
            decode_message(v.as_bytes(), &t, &mut caps).unwrap();
            assert_eq!((&caps[input], &caps[user]), (&want_input, &want_user), "{body}");
        }
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let (t, ..) = tree();
        let v = br#"{"id":"a\"b\u00e9","type":"t"}"#;
        let mut caps = vec![Captured::Missing; t.slots()];
        decode_message(v, &t, &mut caps).unwrap();
        assert_eq!(caps[SLOT_ID], Captured::Str("a\"b\u{e9}".into()));
    }

    #[test]
    fn invalid_json_and_non_objects_are_malformed() {
        let (t, ..) = tree();
        for v in [&b"{"[..], b"[]", b"42", b"\"x\"", b"{\"id\":\"a\"} trailing", b"{\"batch\": 5}", b"\xff"] {
            let mut caps = vec![Captured::Missing; t.slots()];
            assert!(decode_message(v, &t, &mut caps).is_err(), "{:?}", String::from_utf8_lossy(v));
        }
    }

    fn decode(v: &str) -> Result<Vec<Captured<'_>>, Malformed> {
        let (t, ..) = tree();
        let mut caps = vec![Captured::Missing; t.slots()];
        match decode_message(v.as_bytes(), &t, &mut caps)? {
            Message::Single => Ok(caps),
            Message::Batch(events) => {
                for e in events {
                    let mut c = vec![Captured::Missing; t.slots()];
                    decode_event(e, &t, &mut c)?;
                }
                // All well-formed: the one-pass reading takes the same batch.
                let (mut flat, mut c) = (Vec::new(), vec![Captured::Missing; t.slots()]);
                let one = decode_message_captured(v.as_bytes(), &t, &mut c, &mut Vec::new(), &mut flat, 1000);
                assert!(matches!(one, Ok(Message::Captured(_))), "{v}");
                Ok(Vec::new())
            }
            Message::Captured(_) => unreachable!("decode_message reads batches in two passes"),
        }
    }

    #[test]
    fn duplicate_keys_on_walked_objects_are_malformed() {
        for v in [
            r#"{"id":"b","type":"t","body":{"usage":{"input":812,"output":96}},"body":{"model":"gpt-4o"}}"#,
            r#"{"id":"a","id":"b","type":"t"}"#,
            r#"{"id":"a","type":"t","extra":1,"extra":2}"#,
            r#"{"id":"a","type":"t","body":{"usage":{"input":1,"input":2}}}"#,
            r#"{"id":"a","type":"t","body":{"usage":{"output":1,"output":2}}}"#,
            r#"{"id":"a","type":"t","body":{"model":"x","model":"y"}}"#,
            r#"{"id":"a","type":"t","body":{},"body":{}}"#,
            r#"{"batch":[{"id":"a"}],"batch":[{"id":"b"}]}"#,
            r#"{"batch":[{"id":"a","type":"t","type":"u"}]}"#,
        ] {
            assert_eq!(decode(v).err(), Some(Malformed), "{v}");
        }
        // Keys repeated inside values nothing walks are not looked at; a repeat across objects is fine.
        for v in [
            r#"{"id":"a","type":"t","metadata":{"k":1,"k":2}}"#,
            r#"{"id":"a","type":"t","body":{"input":[{"x":1,"x":2}],"usage":{"input":1}}}"#,
            r#"{"id":"a","type":"t","body":{"id":"x","usage":{"id":"y"}}}"#,
        ] {
            assert!(decode(v).is_ok(), "{v}");
        }
        // Many keys (the hash-set path).
        let many: String = (0..40).map(|i| format!(r#""k{i}":{i},"#)).collect();
        assert!(decode(&format!(r#"{{{many}"id":"a","type":"t"}}"#)).is_ok());
        assert!(decode(&format!(r#"{{{many}"id":"a","type":"t","k7":0}}"#)).is_err());
    }

    #[test]
    fn batch_shapes_that_bill_nothing_are_malformed() {
        for v in [
            r#"{"id":"c","type":"trace-create","timestamp":"2026-11-28T10:15:02Z","batch":[]}"#,
            r#"{"batch":[],"id":"c"}"#,
            r#"{"batch":[{"id":"a","type":"t"}],"body":{}}"#,
            r#"{"batch":[]}"#,
            r#"{"batch":{}}"#,
            r#"{"batch":null}"#,
            r#"{"batch":"x"}"#,
        ] {
            assert_eq!(decode(v).err(), Some(Malformed), "{v}");
        }
        // Wrapper fields that are not event fields (Langfuse sends `metadata`) are ignored.
        assert!(decode(r#"{"batch":[{"id":"a","type":"t"}],"metadata":{"sdk":"js"}}"#).is_ok());
    }

    #[test]
    fn paths_must_not_nest_in_leaves() {
        let mut t = PathTree::new();
        t.add("body.usage").unwrap();
        assert!(t.add("body.usage.input").is_err());
        assert!(t.add("body").is_err());
        assert!(t.add("a..b").is_err());
        assert_eq!(t.add("body.usage").unwrap(), 3);
    }
}
