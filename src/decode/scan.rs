//! The hot path's reader of message values: a hand-written JSON scanner that does, for the shapes
//! producers send, what [`super::decode_message_captured`] does through serde, in one pass and
//! without serde's per-token machinery.
//!
//! It validates every byte it passes over (RFC 8259 grammar: strings without raw control
//! characters and with well-formed escapes, numbers, literals, whitespace; UTF-8 is checked once
//! for the whole value), walks the [`PathTree`] like the serde reader, checks repeated keys on the
//! walked objects and reads leaves with the same functions ([`number::meter_value`]).
//!
//! It only ever answers for values it reads completely. Anything else is a [`Fallback`]: the
//! caller reads the value again the serde way, which decides (and names what is wrong). That is:
//! invalid JSON; a value that is not an object; a key with an escape; a captured string with an
//! escape (they may need surrogate repair); a number where an object is walked (serde parses it as
//! `f64`, which can fail); a batch element that is not an object; an empty batch, more than
//! `max_events` events, or `batch` beside event fields; nesting deeper than [`MAX_DEPTH`]; a walked
//! object with more than [`MAX_SCANNED_KEYS`] keys. So on
//! every value it accepts, its answer is the serde reader's: the unit tests, the differential
//! property test and the `decode` fuzz target check exactly that. `benches/pipeline.rs` shows why
//! it exists (docs/measurements.md, "The scanner").

use std::borrow::Cow;

use super::{number, Captured, Message, Node, PathTree, EVENT_FIELDS};

/// The scanner does not answer for this value: read it the serde way.
#[derive(Debug, PartialEq, Eq)]
pub struct Fallback;

type Scan<T> = Result<T, Fallback>;

/// Deepest nesting the scanner follows (serde_json refuses beyond 128).
pub const MAX_DEPTH: u32 = 100;

/// Most keys of one walked object the scanner checks for repeats, each new key against the ones
/// before it; an object with more is a [`Fallback`], and the serde reader checks it with a hash
/// set. It keeps one value's cost linear in its size: a 1 MiB object of 100,000 short keys would
/// otherwise take ~5·10⁹ comparisons, seconds of a worker's time for one message (found by a
/// review).
pub const MAX_SCANNED_KEYS: usize = 64;

/// Reads `value` like [`super::decode_message_captured`]: a single event's captures into `caps`
/// (reset by the caller), a batch's into `events` (cleared first, [`PathTree::slots`] per event).
/// `keys` is scratch for the keys of walked objects (reused between calls to save allocations).
pub fn scan_message<'a>(
    value: &'a [u8],
    tree: &PathTree,
    caps: &mut [Captured<'a>],
    keys: &mut Vec<&'a [u8]>,
    events: &mut Vec<Captured<'a>>,
    max_events: usize,
) -> Scan<Message<'a>> {
    events.clear();
    keys.clear();
    let text = std::str::from_utf8(value).map_err(|_| Fallback)?;
    let mut s = Scanner { text, b: value, i: 0, depth: 0, keys };
    s.ws();
    s.expect(b'{')?;
    let root = &tree.root;
    let base = s.keys.len();
    let mut batch = None;
    let mut event_field = false;
    s.ws();
    if !s.eat(b'}') {
        loop {
            let key = s.key(base)?;
            if key == b"batch" {
                batch = Some(s.batch(root, tree.slots, events, max_events)?);
            } else {
                let child = root.child_bytes(key);
                event_field |= child.is_some() || EVENT_FIELDS.iter().any(|f| same_key(f.as_bytes(), key));
                s.entry(child, caps)?;
            }
            if s.next_entry()? {
                break;
            }
        }
    }
    s.ws();
    if s.i != s.b.len() {
        return Err(Fallback);
    }
    match batch {
        None => Ok(Message::Single),
        Some(_) if event_field => Err(Fallback),
        Some(n) => Ok(Message::Captured(n)),
    }
}

struct Scanner<'a, 'k> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
    depth: u32,
    /// Keys of the objects being walked, innermost last.
    keys: &'k mut Vec<&'a [u8]>,
}

/// Whether `b` ends a run of plain string bytes: `"`, `\` or a control character.
#[inline(always)]
fn special(b: u8) -> bool {
    b == b'"' || b == b'\\' || b < 0x20
}

/// `a == b` for object keys, without a call to `memcmp` for the short ones (most keys are under
/// 16 bytes, and every walked key is compared with its object's earlier keys and its tree node's
/// children).
#[inline(always)]
pub(crate) fn same_key(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let n = a.len();
    if n >= 8 {
        // Two (possibly overlapping) 8-byte words cover 8..=16 bytes; longer keys go on to
        // the slice comparison.
        let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().expect("8 bytes"));
        if word(a, 0) != word(b, 0) || word(a, n - 8) != word(b, n - 8) {
            return false;
        }
        return n <= 16 || a[8..n - 8] == b[8..n - 8];
    }
    // Shorter keys the same way with narrower words (a byte loop here was most of the tree
    // look-up's instructions: callgrind, benches/pipeline.rs).
    if n >= 4 {
        let word = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().expect("4 bytes"));
        return word(a, 0) == word(b, 0) && word(a, n - 4) == word(b, n - 4);
    }
    if n >= 2 {
        let word = |s: &[u8], at: usize| u16::from_le_bytes(s[at..at + 2].try_into().expect("2 bytes"));
        return word(a, 0) == word(b, 0) && word(a, n - 2) == word(b, n - 2);
    }
    n == 0 || a[0] == b[0]
}

impl<'a> Scanner<'a, '_> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    #[inline]
    fn expect(&mut self, c: u8) -> Scan<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(Fallback)
        }
    }

    /// Skips JSON whitespace (RFC 8259 §2: space, tab, line feed, carriage return).
    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    /// After a value in an object: `,` (more entries; true is returned for `}`).
    #[inline]
    fn next_entry(&mut self) -> Scan<bool> {
        self.ws();
        match self.peek() {
            Some(b',') => {
                self.i += 1;
                self.ws();
                Ok(false)
            }
            Some(b'}') => {
                self.i += 1;
                Ok(true)
            }
            _ => Err(Fallback),
        }
    }

    /// First special byte at or after `i` (or the end), 8 bytes at a time (SWAR: the classic
    /// "has a zero byte" test on the word XORed with `"` and with `\\`, and a borrow test for bytes
    /// below 0x20; a borrow can only mark bytes above a true hit, so the lowest mark is exact).
    #[inline(always)]
    fn find_special(&self, mut i: usize) -> usize {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        let b = self.b;
        while let Some(chunk) = b.get(i..i + 8) {
            let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            let q = w ^ (ONES * u64::from(b'"'));
            let e = w ^ (ONES * u64::from(b'\\'));
            let mask =
                ((q.wrapping_sub(ONES) & !q) | (e.wrapping_sub(ONES) & !e) | (w.wrapping_sub(ONES * 0x20) & !w)) & HIGH;
            if mask != 0 {
                return i + (mask.trailing_zeros() / 8) as usize;
            }
            i += 8;
        }
        while i < b.len() && !special(b[i]) {
            i += 1;
        }
        i
    }

    /// Reads a string whose opening quote is at `i`; returns where its contents (between the
    /// quotes) start and end, and whether it holds an escape. Escapes are checked for form only
    /// (`\uXXXX` with any four hex digits), as serde_json does for strings it skips.
    // Always inlined: called for every key and string (tens per event), its call and return
    // were half of its own instructions (callgrind, benches/pipeline.rs).
    #[inline(always)]
    fn string(&mut self) -> Scan<(usize, usize, bool)> {
        let start = self.i + 1;
        let mut i = start;
        let mut escaped = false;
        loop {
            i = self.find_special(i);
            match self.b.get(i) {
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    match self.b.get(i + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                        Some(b'u') => {
                            let hex = self.b.get(i + 2..i + 6).ok_or(Fallback)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return Err(Fallback);
                            }
                            i += 6;
                        }
                        _ => return Err(Fallback),
                    }
                }
                // A control character, or the end of the value.
                _ => return Err(Fallback),
            }
        }
        self.i = i + 1;
        Ok((start, i, escaped))
    }

    /// Reads an object key (and the `:` after it) of a walked object whose keys start at `base`
    /// in `keys`; a repeated key is a [`Fallback`] (the serde reader refuses the value), and so is
    /// a key past the object's first [`MAX_SCANNED_KEYS`].
    // Always inlined: its call and return were a fifth of its own instructions (callgrind,
    // benches/pipeline.rs).
    #[inline(always)]
    fn key(&mut self, base: usize) -> Scan<&'a [u8]> {
        if self.peek() != Some(b'"') {
            return Err(Fallback);
        }
        let (start, end, escaped) = self.string()?;
        let b: &'a [u8] = self.b;
        let key = &b[start..end];
        let earlier = &self.keys[base..];
        if escaped || earlier.len() >= MAX_SCANNED_KEYS || earlier.iter().any(|k| same_key(k, key)) {
            return Err(Fallback);
        }
        self.keys.push(key);
        self.ws();
        self.expect(b':')?;
        self.ws();
        Ok(key)
    }

    /// Reads a number token (RFC 8259 §6) at `i`; returns its text.
    fn number(&mut self) -> Scan<&'a str> {
        let b = self.b;
        let start = self.i;
        let mut i = start;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        // The end of the run of digits at `i`; at least one digit is required.
        let digits = |i: usize| {
            let end = i + b[i.min(b.len())..].iter().take_while(|c| c.is_ascii_digit()).count();
            if end == i {
                Err(Fallback)
            } else {
                Ok(end)
            }
        };
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => i = digits(i)?,
            _ => return Err(Fallback),
        }
        if b.get(i) == Some(&b'.') {
            i = digits(i + 1)?;
        }
        if let Some(b'e' | b'E') = b.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = b.get(i) {
                i += 1;
            }
            i = digits(i)?;
        }
        self.i = i;
        Ok(&self.text[start..i])
    }

    fn literal(&mut self, word: &[u8]) -> Scan<()> {
        if self.b.get(self.i..self.i + word.len()) == Some(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(Fallback)
        }
    }

    fn enter(&mut self) -> Scan<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            Err(Fallback)
        } else {
            Ok(())
        }
    }

    /// Skips (and checks) any value.
    fn skip(&mut self) -> Scan<()> {
        match self.peek() {
            Some(b'"') => self.string().map(drop),
            Some(b'{') => {
                self.enter()?;
                self.i += 1;
                self.ws();
                if !self.eat(b'}') {
                    loop {
                        if self.peek() != Some(b'"') {
                            return Err(Fallback);
                        }
                        self.string()?;
                        self.ws();
                        self.expect(b':')?;
                        self.ws();
                        self.skip()?;
                        if self.next_entry()? {
                            break;
                        }
                    }
                }
                self.depth -= 1;
                Ok(())
            }
            Some(b'[') => {
                self.enter()?;
                self.i += 1;
                self.ws();
                if !self.eat(b']') {
                    loop {
                        self.skip()?;
                        self.ws();
                        match self.peek() {
                            Some(b',') => {
                                self.i += 1;
                                self.ws();
                            }
                            Some(b']') => {
                                self.i += 1;
                                break;
                            }
                            _ => return Err(Fallback),
                        }
                    }
                }
                self.depth -= 1;
                Ok(())
            }
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number().map(drop),
            _ => Err(Fallback),
        }
    }

    /// The value of an entry of a walked object, whose key leads to `child` in the tree (or
    /// nowhere: then the value is skipped).
    fn entry(&mut self, child: Option<&Node>, caps: &mut [Captured<'a>]) -> Scan<()> {
        let Some(child) = child else { return self.skip() };
        match child.slot {
            Some(slot) => caps[slot] = self.leaf()?,
            None => match self.peek() {
                Some(b'{') => self.object(child, caps)?,
                Some(b'n') => self.literal(b"null")?,
                // Serde reads such a number as `f64`, which may fail: let it decide.
                Some(b'-' | b'0'..=b'9') => return Err(Fallback),
                Some(b'"') => {
                    if self.string()?.2 {
                        return Err(Fallback);
                    }
                    child.mark_other(caps);
                }
                _ => {
                    self.skip()?;
                    child.mark_other(caps);
                }
            },
        }
        Ok(())
    }

    /// Walks an object (at `{`) along `node`.
    fn object(&mut self, node: &Node, caps: &mut [Captured<'a>]) -> Scan<()> {
        self.enter()?;
        self.i += 1;
        let base = self.keys.len();
        self.ws();
        if !self.eat(b'}') {
            loop {
                let key = self.key(base)?;
                self.entry(node.child_bytes(key), caps)?;
                if self.next_entry()? {
                    break;
                }
            }
        }
        self.keys.truncate(base);
        self.depth -= 1;
        Ok(())
    }

    /// A value at a leaf path, read as [`super::leaf`] reads it.
    fn leaf(&mut self) -> Scan<Captured<'a>> {
        Ok(match self.peek() {
            Some(b'"') => match self.string()? {
                // Both ends sit next to ASCII quotes, so both are character boundaries.
                (start, end, false) => Captured::Str(Cow::Borrowed(&self.text[start..end])),
                // Escapes may need surrogate repair: the serde reader does that.
                (_, _, true) => return Err(Fallback),
            },
            Some(b'1'..=b'9') => match self.plain_integer() {
                Some(v) => v,
                None => number::meter_value(self.number()?).map_or(Captured::Other, Captured::U64),
            },
            Some(b'-' | b'0') => number::meter_value(self.number()?).map_or(Captured::Other, Captured::U64),
            Some(b'n') => {
                self.literal(b"null")?;
                Captured::Missing
            }
            _ => {
                self.skip()?;
                Captured::Other
            }
        })
    }

    /// A number at `i` (a digit 1–9) with no fraction or exponent — how meter values are sent —
    /// read as its digits are scanned, to what [`number::meter_value`] makes of it: its value
    /// up to [`number::MAX_METER_VALUE`], [`Captured::Other`] above. `None` (nothing consumed)
    /// for a fraction or an exponent: the caller reads the token the general way.
    #[inline(always)]
    fn plain_integer(&mut self) -> Option<Captured<'a>> {
        // 16 digits hold every value up to MAX_METER_VALUE (2^53 − 1 has 16) without overflow;
        // a longer integer without a leading zero is at least 10^16, above it.
        const MAX_DIGITS: usize = 16;
        let (b, start) = (self.b, self.i);
        let mut i = start;
        let mut v: u64 = 0;
        while let Some(&d) = b.get(i).filter(|d| d.is_ascii_digit()) {
            if i - start < MAX_DIGITS {
                v = v * 10 + u64::from(d - b'0');
            }
            i += 1;
        }
        if let Some(b'.' | b'e' | b'E') = b.get(i) {
            return None;
        }
        self.i = i;
        Some(if i - start <= MAX_DIGITS && v <= number::MAX_METER_VALUE { Captured::U64(v) } else { Captured::Other })
    }

    /// The `batch` array: every element an event object, walked along `root`.
    fn batch(&mut self, root: &Node, slots: usize, events: &mut Vec<Captured<'a>>, max: usize) -> Scan<usize> {
        self.expect(b'[')?;
        let mut n = 0;
        loop {
            self.ws();
            if self.peek() != Some(b'{') || n == max {
                return Err(Fallback);
            }
            let start = events.len();
            events.resize(start + slots, Captured::Missing);
            self.object(root, &mut events[start..])?;
            n += 1;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(n);
                }
                _ => return Err(Fallback),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{decode_event, decode_message};
    use super::*;

    fn tree() -> PathTree {
        let mut t = PathTree::new();
        for p in ["body.usage.input", "body.usage.output", "body.userId"] {
            t.add(p).unwrap();
        }
        t
    }

    #[test]
    fn same_key_is_slice_equality() {
        // Every length around the word boundaries, equal and differing at every position.
        for n in 0..40usize {
            let a: Vec<u8> = (0..n as u8).map(|i| b'a' + i % 26).collect();
            assert!(same_key(&a, &a.clone()), "{n}");
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 0x20;
                assert!(!same_key(&a, &b), "{n} {at}");
            }
            assert!(!same_key(&a, &a[..n.saturating_sub(1)]) || n == 0);
        }
    }

    proptest::proptest! {
        #[test]
        fn same_key_agrees_with_eq(a in proptest::collection::vec(0u8..4, 0..40), b in proptest::collection::vec(0u8..4, 0..40)) {
            proptest::prop_assert_eq!(same_key(&a, &b), a == b);
        }
    }

    /// The serde reader's answer: Ok(one capture array per event) or Err for a refused value.
    fn serde_reading(v: &str, t: &PathTree) -> Result<Vec<Vec<Captured<'static>>>, ()> {
        let mut caps = vec![Captured::Missing; t.slots()];
        match decode_message(v.as_bytes(), t, &mut caps) {
            Ok(Message::Single) => Ok(vec![caps.into_iter().map(Captured::into_owned).collect()]),
            Ok(Message::Batch(raws)) => raws
                .iter()
                .map(|raw| {
                    let mut c = vec![Captured::Missing; t.slots()];
                    decode_event(raw, t, &mut c).map_err(drop)?;
                    Ok(c.into_iter().map(Captured::into_owned).collect())
                })
                .collect(),
            _ => Err(()),
        }
    }

    fn scanned(v: &str, t: &PathTree) -> Scan<Vec<Vec<Captured<'static>>>> {
        let mut caps = vec![Captured::Missing; t.slots()];
        let mut events = Vec::new();
        match scan_message(v.as_bytes(), t, &mut caps, &mut Vec::new(), &mut events, 1000)? {
            Message::Single => Ok(vec![caps.into_iter().map(Captured::into_owned).collect()]),
            Message::Captured(n) => {
                assert_eq!(events.len(), n * t.slots());
                Ok(events.chunks(t.slots()).map(|c| c.iter().cloned().map(Captured::into_owned).collect()).collect())
            }
            Message::Batch(_) => unreachable!("the scanner reads batches in place"),
        }
    }

    #[test]
    fn common_shapes_are_read_in_one_pass_as_serde_reads_them() {
        let t = tree();
        for v in [
            r#"{"id":"e1","type":"generation-create","timestamp":"2026-11-28T10:15:02Z","body":{"userId":"u-42","usage":{"input":812,"output":96,"unit":"TOKENS"},"metadata":{"a":[1,2.5e3,-0.0,true,false,null,{"x":"y\n\"z\u00e9"}]}}}"#,
            "{ \"id\" : \"a\" ,\n\t\"type\":\"t\", \"body\" : null, \"extra\": [ ] , \"e2\" : { } }\r\n",
            r#"{"batch":[{"id":"a","type":"t","body":{"usage":{"input":1e3,"output":12.0}}},{"id":"b","type":"t","body":[1]}],"metadata":{"sdk":"js"}}"#,
            r#"{"id":"a","type":"t","body":{"usage":{"input":-1,"output":1.5},"userId":7}}"#,
            r#"{"id":"a","type":"t","body":{"usage":"lots","userId":{"k":1}}}"#,
            r#"{"id":"a","type":"t","body":{"usage":{"input":9007199254740992,"output":true}}}"#,
            r#"{"id":"","type":"t","body":true}"#,
            r#"{"id":"a","type":"t","metadata":{"k":1,"k":2},"body":{"input":[{"x":1,"x":2}]}}"#,
            r#"{}"#,
        ] {
            assert_eq!(scanned(v, &t), Ok(serde_reading(v, &t).unwrap()), "{v}");
        }
    }

    #[test]
    fn what_it_does_not_answer_for_is_left_to_serde() {
        let t = tree();
        for v in [
            // Invalid JSON.
            "",
            "{",
            r#"{"id":"a"} x"#,
            r#"{"id":"a",}"#,
            r#"{"id":01}"#,
            r#"{"id":1.}"#,
            r#"{"id":-}"#,
            r#"{"id":"a\x"}"#,
            r#"{"id":"a\u12G4"}"#,
            "{\"id\":\"a\u{1}\"}",
            r#"{"id":tru}"#,
            r#"[{"id":"a"}]"#,
            // Valid, but serde decides.
            r#"{"id":"a","id":"b"}"#,
            r#"{"id":"a","type":"t","body":{"usage":{"input":1,"input":2}}}"#,
            r#"{"i\u0064":"a"}"#,
            r#"{"id":"a\n"}"#,
            r#"{"id":"a","body":1e400}"#,
            r#"{"batch":[]}"#,
            r#"{"batch":[{"id":"a"}, 5]}"#,
            r#"{"batch":[{"id":"a"}],"id":"b"}"#,
            r#"{"batch":{}}"#,
        ] {
            assert_eq!(scanned(v, &t), Err(Fallback), "{v}");
        }
        // Depth: within the limit it answers, beyond it serde decides.
        let deep = |d: usize| format!(r#"{{"id":"a","x":{}1{}}}"#, "[".repeat(d), "]".repeat(d));
        assert!(scanned(&deep(MAX_DEPTH as usize), &t).is_ok());
        assert_eq!(scanned(&deep(MAX_DEPTH as usize + 1), &t), Err(Fallback));
        // More events than the limit.
        let mut caps = vec![Captured::Missing; t.slots()];
        let v = br#"{"batch":[{"id":"a"},{"id":"b"}]}"#;
        assert!(scan_message(v, &t, &mut caps, &mut Vec::new(), &mut Vec::new(), 1).is_err());
        assert!(matches!(
            scan_message(v, &t, &mut caps, &mut Vec::new(), &mut Vec::new(), 2),
            Ok(Message::Captured(2))
        ));
    }

    /// Walked objects with up to [`MAX_SCANNED_KEYS`] keys are the scanner's; past that, at the top
    /// level, in `body` or in a batch's event, serde decides, and reads them as the scanner would.
    #[test]
    fn objects_with_many_keys_are_read_by_serde() {
        let t = tree();
        let keys = |n: usize| (0..n).map(|i| format!(r#","k{i}":{i}"#)).collect::<String>();
        let shapes = |n: usize| {
            let (k, n_body) = (keys(n - 3), keys(n - 1));
            [
                format!(r#"{{"id":"a","type":"t","timestamp":"2026-12-01T10:00:00Z"{k}}}"#),
                format!(r#"{{"id":"a","body":{{"usage":{{"input":5}}{n_body}}}}}"#),
                format!(r#"{{"batch":[{{"id":"a"}},{{"id":"b","type":"t","timestamp":"x"{k}}}]}}"#),
            ]
        };
        for v in shapes(MAX_SCANNED_KEYS) {
            assert!(scanned(&v, &t).is_ok(), "{v}");
            assert_eq!(scanned(&v, &t).map_err(drop), serde_reading(&v, &t));
        }
        for v in shapes(MAX_SCANNED_KEYS + 1) {
            assert_eq!(scanned(&v, &t), Err(Fallback), "{v}");
            assert!(serde_reading(&v, &t).is_ok(), "serde reads it: {v}");
        }
        // A repeat past the limit is still refused (by serde).
        let v = format!(r#"{{"id":"a"{},"k0":1}}"#, keys(MAX_SCANNED_KEYS + 10));
        assert_eq!(serde_reading(&v, &t), Err(()));
    }

    /// Captured integers around every limit of the plain-integer path read as `meter_value`
    /// (and serde) read them: up to 2^53 − 1 a value, above it not; fractions and exponents,
    /// which leave that path, alike.
    #[test]
    fn captured_integers_read_as_meter_values() {
        let t = tree();
        for n in [
            "1",
            "7",
            "10",
            "812",
            "9999999999999999",
            "9007199254740991",
            "9007199254740992",
            "10000000000000000",
            "18446744073709551615",
            "18446744073709551616",
            "123456789012345678901234567890",
            "1.0",
            "1.5",
            "12e2",
            "1E-1",
            "9007199254740991.0",
            "0",
            "-0",
            "-5",
        ] {
            let v = format!(r#"{{"id":"a","type":"t","body":{{"usage":{{"input":{n},"output":3}}}}}}"#);
            let got = scanned(&v, &t).unwrap();
            assert_eq!(got, serde_reading(&v, &t).unwrap(), "{n}");
            let want = number::meter_value(n).map_or(Captured::Other, Captured::U64);
            assert!(got[0].contains(&want), "{n}: {:?}", got[0]);
        }
    }

    #[test]
    fn long_strings_cross_the_8_byte_words() {
        let t = tree();
        for n in 0..40 {
            let s = "x".repeat(n);
            let v = format!(r#"{{"id":"{s}","meta":"{s}\"{s}","type":"t"}}"#);
            assert_eq!(scanned(&v, &t), Ok(serde_reading(&v, &t).unwrap()), "{v}");
            let bad = format!("{{\"id\":\"{s}\u{1f}{s}\"}}");
            assert_eq!(scanned(&bad, &t), Err(Fallback));
        }
    }
}
