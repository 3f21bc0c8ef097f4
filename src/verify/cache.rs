//! The credential cache: every verdict keyed by the full `authorization` header value.
//!
//! Two levels, both exact (a value is found only by comparing it whole, so no hash collision can
//! attribute one tenant's events to another):
//!
//! * the map, of at most `entries` values, hashed with SipHash and a random key: the values are
//!   chosen by producers (API keys) and by customers' identity providers (JWTs), so their hash
//!   must not be predictable (HashDoS);
//! * a direct-mapped front of [`FRONT_SLOTS`] recent values, whose slot is read from the value's
//!   length and last 8 bytes (a JWT's signature, an API key's secret). Found there, a value costs
//!   a comparison instead of SipHash over its few hundred bytes: the hash was a tenth of the
//!   core's instructions on single-event messages (docs/measurements.md, "The credential
//!   cache's front"). A producer who picks values that share a slot only evicts them from the
//!   front: each look-up is still one comparison, then the map.
//!
//! The front holds copies of map entries and is emptied with the map, so it never answers what
//! the map would not.

use std::collections::HashMap;

use super::{Checked, Denied};

/// A verification's outcome, as cached.
pub type Verdict = Result<Checked, Denied>;

/// Slots of the front (a power of two). Each holds one value and its verdict: a few hundred bytes.
pub const FRONT_SLOTS: usize = 1024;

/// Longest value the front holds, in bytes; longer ones are found in the map only, so the front's
/// memory stays under `FRONT_SLOTS` × this (4 MiB) whatever headers producers send.
pub const FRONT_MAX_VALUE: usize = 4096;

/// Bytes of values the map holds per entry it may hold, on average: the map is emptied when its
/// values would pass `entries` × this, as when it holds `entries` values. Nothing but the
/// broker's message size bounds an `authorization` header, and refusals are cached too, so
/// without it a producer sending padded, ever-different headers (a valid JWT
/// followed by a different run of spaces each time, or no credential at all) grew the map by a
/// header per message, up to 100,000 headers of a megabyte (found by a review). Real credentials
/// are a few hundred bytes: API key pairs ~100, JWTs 300–1,500.
pub const MAP_BYTES_PER_ENTRY: usize = 2048;

/// See the module documentation.
pub struct CredentialCache {
    map: HashMap<Box<[u8]>, Verdict>,
    entries: usize,
    /// Bytes of the values in `map`, and their bound (`entries` × [`MAP_BYTES_PER_ENTRY`]).
    bytes: usize,
    max_bytes: usize,
    /// Per slot: the value (its buffer reused) and its verdict, `None` when empty.
    front: Vec<(Vec<u8>, Option<Verdict>)>,
}

impl CredentialCache {
    /// A cache of at most `entries` values (at least 1) and `entries` × [`MAP_BYTES_PER_ENTRY`]
    /// bytes of them.
    pub fn new(entries: usize) -> Self {
        CredentialCache {
            map: HashMap::new(),
            entries: entries.max(1),
            bytes: 0,
            max_bytes: entries.max(1).saturating_mul(MAP_BYTES_PER_ENTRY),
            front: (0..FRONT_SLOTS).map(|_| (Vec::new(), None)).collect(),
        }
    }

    /// The front slot of `value`: its length and last 8 bytes, mixed.
    fn slot(value: &[u8]) -> usize {
        let n = value.len();
        let mut tail = [0u8; 8];
        let from = n.saturating_sub(8);
        tail[..n - from].copy_from_slice(&value[from..]);
        let h = (u64::from_le_bytes(tail) ^ (n as u64).rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> (64 - FRONT_SLOTS.trailing_zeros())) as usize
    }

    /// The cached verdict of `value`, if there is one.
    pub fn get(&mut self, value: &[u8]) -> Option<&Verdict> {
        if value.len() > FRONT_MAX_VALUE {
            return self.map.get(value);
        }
        let i = Self::slot(value);
        if matches!(&self.front[i], (v, Some(_)) if v.as_slice() == value) {
            return self.front[i].1.as_ref();
        }
        let verdict = self.map.get(value)?.clone();
        Some(Self::put(&mut self.front[i], value, verdict))
    }

    /// Puts `value` and its verdict in its front slot `slot` (the slot's buffer reused).
    fn put<'s>(slot: &'s mut (Vec<u8>, Option<Verdict>), value: &[u8], verdict: Verdict) -> &'s Verdict {
        slot.0.clear();
        slot.0.extend_from_slice(value);
        slot.1.insert(verdict)
    }

    /// Caches the verdict of `value` (emptying the cache first when it is full, by count or by
    /// bytes) and returns it.
    pub fn insert(&mut self, value: &[u8], verdict: Verdict) -> &Verdict {
        if !self.map.contains_key(value) {
            if self.map.len() >= self.entries || self.bytes.saturating_add(value.len()) > self.max_bytes {
                self.clear();
            }
            self.bytes += value.len();
        }
        let verdict = self.map.entry(value.into()).or_insert(verdict);
        if value.len() > FRONT_MAX_VALUE {
            return verdict;
        }
        Self::put(&mut self.front[Self::slot(value)], value, verdict.clone())
    }

    /// Forgets every verdict (after a key change or a revocation).
    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
        for slot in &mut self.front {
            slot.1 = None;
        }
    }

    /// Values cached.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reject::Reason;
    use crate::verify::{Principal, Scopes};

    fn checked(org: &str) -> Verdict {
        Ok(Checked {
            principal: Principal { org_id: org.into(), project_id: "p".into() },
            not_before: None,
            expires_at: None,
            leeway: false,
            scopes: Scopes::INGEST,
            revoked: false,
        })
    }

    fn org(v: Option<&Verdict>) -> Option<String> {
        v.map(|v| v.as_ref().map_or_else(|d| format!("denied {:?}", d.0), |c| c.principal.org_id.to_string()))
    }

    #[test]
    fn values_sharing_a_front_slot_keep_their_own_verdicts() {
        // Same length, same last 8 bytes: one front slot, two tenants.
        let (a, b) = (b"Bearer aaaa.bbbb.SAMETAIL".as_slice(), b"Bearer xxxx.yyyy.SAMETAIL".as_slice());
        assert_eq!(CredentialCache::slot(a), CredentialCache::slot(b));
        let mut c = CredentialCache::new(100);
        assert!(c.get(a).is_none());
        assert_eq!(org(Some(c.insert(a, checked("org-a")))).as_deref(), Some("org-a"));
        assert!(c.get(b).is_none(), "a value is found only by comparing it whole");
        c.insert(b, checked("org-b"));
        for _ in 0..3 {
            // Each look-up evicts the other from the front; the map answers it exactly.
            assert_eq!(org(c.get(a)).as_deref(), Some("org-a"));
            assert_eq!(org(c.get(b)).as_deref(), Some("org-b"));
        }
        // A denial shares the slot too, and is answered as a denial.
        let d = b"Bearer zzzz.wwww.SAMETAIL".as_slice();
        c.insert(d, Err(Denied(Reason::InvalidCredentials)));
        assert_eq!(org(c.get(d)).as_deref(), Some("denied InvalidCredentials"));
        assert_eq!(org(c.get(a)).as_deref(), Some("org-a"));
        assert_eq!(c.len(), 3);
        // Values longer than the front holds are answered by the map alone.
        let long = [b"Bearer ".as_slice(), &vec![b'x'; FRONT_MAX_VALUE]].concat();
        c.insert(&long, checked("org-long"));
        assert_eq!(org(c.get(&long)).as_deref(), Some("org-long"));
        assert!(c.front.iter().all(|(v, _)| v.len() <= FRONT_MAX_VALUE));
    }

    #[test]
    fn clearing_empties_the_front_too() {
        let mut c = CredentialCache::new(100);
        let values: Vec<Vec<u8>> = (0..50).map(|i| format!("Basic key-{i}:secret-{i}").into_bytes()).collect();
        for (i, v) in values.iter().enumerate() {
            c.insert(v, checked(&format!("org-{i}")));
        }
        for (i, v) in values.iter().enumerate() {
            assert_eq!(org(c.get(v)), Some(format!("org-{i}")));
        }
        c.clear();
        assert!(c.is_empty());
        assert!(values.iter().all(|v| c.get(v).is_none()), "nothing is answered after a clear");
        // Short values (under 8 bytes) have slots too.
        c.insert(b"x", checked("short"));
        assert_eq!(org(c.get(b"x")).as_deref(), Some("short"));
        assert!(c.get(b"").is_none() && c.get(b"y").is_none());
    }

    /// Padded headers, each different, cannot grow the map past its byte bound: it starts again,
    /// and what it holds is still answered exactly.
    #[test]
    fn headers_of_any_length_keep_the_map_within_its_bytes() {
        let mut c = CredentialCache::new(100);
        let max = 100 * MAP_BYTES_PER_ENTRY;
        for i in 0..50 {
            let padded = [b"Bearer a.b.c".as_slice(), &vec![b' '; 20_000 + i]].concat();
            c.insert(&padded, Err(Denied(Reason::InvalidCredentials)));
            assert!(c.bytes <= max && c.map.keys().map(|k| k.len()).sum::<usize>() == c.bytes);
            assert_eq!(org(c.get(&padded)).as_deref(), Some("denied InvalidCredentials"));
        }
        assert!(c.len() < 50, "the map was emptied on the way");
        // The same value again adds nothing.
        let v = b"Basic pk:sk".as_slice();
        c.insert(v, checked("o"));
        let bytes = c.bytes;
        c.insert(v, checked("o"));
        assert_eq!(c.bytes, bytes);
        // A value longer than the whole bound is cached alone.
        let huge = vec![b'x'; max + 1];
        c.insert(&huge, checked("huge"));
        assert_eq!((c.len(), org(c.get(&huge)).as_deref()), (1, Some("huge")));
    }

    #[test]
    fn a_full_cache_starts_again() {
        let mut c = CredentialCache::new(2);
        c.insert(b"one", checked("1"));
        c.insert(b"two", checked("2"));
        c.insert(b"three", checked("3"));
        assert_eq!(c.len(), 1);
        assert!(c.get(b"one").is_none() && c.get(b"two").is_none(), "the front was emptied with the map");
        assert_eq!(org(c.get(b"three")).as_deref(), Some("3"));
    }
}
