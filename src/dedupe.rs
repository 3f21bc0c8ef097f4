//! Exact deduplication by (org_id, project_id, id), with memory bounded by configuration.
//!
//! ClickHouse's narrow `events` table is the authority on what was already counted; this module
//! only decides, without I/O, which events certainly are new or certainly are duplicates, and
//! leaves the rest to one batched ClickHouse look-up:
//!
//! * an exact cache of recently remembered keys (128-bit hashes, 4-way set-associative, bounded
//!   by count; a key may be evicted early, never held wrongly): hit ⇒ duplicate;
//! * a Bloom filter over every key in ClickHouse for the partition whose event time is at or after
//!   one dedupe window before the filter's horizon (copies of one id may carry different times):
//!   for an event at or after the horizon, miss ⇒ new (a Bloom filter has no false negatives);
//! * anything else (a Bloom hit, or an event older than the horizon) ⇒ [`Verdict::Unknown`].
//!
//! A full filter only makes look-ups more frequent; it never makes the answer wrong. The state is
//! per Kafka partition (all copies of an event share a partition because messages are keyed by
//! project) and is rebuilt from ClickHouse whenever a partition is assigned.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::LazyLock;

/// The identity of an event (org_id, project_id, id), in two 64-bit halves over the same bytes,
/// `len(org_id) as u32 LE ‖ len(project_id) as u32 LE ‖ org_id ‖ project_id ‖ id` (lengths
/// first, so that ("ab","c") and ("a","bc") differ):
///
/// * the low half is the low 64 bits of XXH3-128 of those bytes: it is stored in ClickHouse
///   (`events.key_hash`) and fed to the Bloom filter, so it must never change;
/// * the high half is a keyed hash of them (`std`'s `RandomState`, SipHash-1-3 today, with a key
///   drawn at random once per process), never stored.
///
/// Why keyed: XXH3 is not collision-resistant. With its public default secret, two different ids
/// with one XXH3-128 digest take a few lines to compute (its 16-byte mixer is a product that is
/// the same with its two operands swapped; `a_crafted_xxh3_collision_is_two_keys` builds one).
/// The recent keys and the batch's key set decide "duplicate" on the whole 128 bits without
/// asking ClickHouse, so with an unkeyed digest a producer could have its own events, or another
/// tenant's on the same partition, taken for copies and left unbilled. A collision must now also
/// hold under a key the producer never sees. A collision of the low half alone is a Bloom-filter
/// hit, which only asks ClickHouse, and ClickHouse compares the ids themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventKey(pub u128);

impl std::hash::Hash for EventKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(self.0);
    }
}

/// A set of event keys that does not hash them again.
pub type KeySet = HashSet<EventKey, BuildXxh>;

/// The key of [`EventKey`]'s high half: random, drawn once per process.
static PROCESS_KEY: LazyLock<RandomState> = LazyLock::new(RandomState::new);

impl EventKey {
    /// The key of (org_id, project_id, id) in this process (see [`EventKey`]).
    pub fn new(org_id: &str, project_id: &str, id: &str) -> Self {
        Self::keyed_with(&PROCESS_KEY, [org_id.as_bytes(), project_id.as_bytes(), id.as_bytes()])
    }

    fn keyed_with(key: &RandomState, parts: [&[u8]; 3]) -> Self {
        // One-shot hashing of the concatenation (the same digests as streaming it, and about
        // twice as fast for these short inputs); the streaming form for the rare long one.
        let mut buf = [0u8; 256];
        let n = 8 + parts.iter().map(|p| p.len()).sum::<usize>();
        if n > buf.len() {
            return Self::streamed(key, parts);
        }
        buf[..4].copy_from_slice(&(parts[0].len() as u32).to_le_bytes());
        buf[4..8].copy_from_slice(&(parts[1].len() as u32).to_le_bytes());
        let mut at = 8;
        for p in parts {
            buf[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        let bytes = &buf[..n];
        let mut keyed = key.build_hasher();
        keyed.write(bytes);
        Self::from_halves(xxhash_rust::xxh3::xxh3_128(bytes) as u64, keyed.finish())
    }

    fn streamed(key: &RandomState, parts: [&[u8]; 3]) -> Self {
        let mut stored = xxhash_rust::xxh3::Xxh3::new();
        let mut keyed = key.build_hasher();
        let lengths = [(parts[0].len() as u32).to_le_bytes(), (parts[1].len() as u32).to_le_bytes()];
        for bytes in lengths.iter().map(|l| &l[..]).chain(parts) {
            stored.update(bytes);
            keyed.write(bytes);
        }
        Self::from_halves(stored.digest128() as u64, keyed.finish())
    }

    fn from_halves(stored: u64, keyed: u64) -> Self {
        EventKey((keyed as u128) << 64 | stored as u128)
    }

    /// The 64-bit hash stored in ClickHouse (`events.key_hash`) and fed to the Bloom filter.
    pub fn short(self) -> u64 {
        self.0 as u64
    }
}

/// What the in-memory state can say about an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    New,
    Duplicate,
    /// Ask ClickHouse.
    Unknown,
}

/// `n` values whose bytes are all zero, from the allocator's zeroed memory (`alloc_zeroed`,
/// like `calloc`): pages fresh from the kernel are already zero and are not written here, only
/// faulted in when a key first reaches them. `vec![T::default(); n]` writes every byte of the
/// megabytes of a partition's state at its assignment, then the kernel zeroes each page again as
/// the write faults it in: that was ~20 % of a worker's CPU in `benches/ingest.rs` (perf,
/// docs/measurements.md, "The dedupe state's allocation").
fn zeroed<T: Zeroed>(n: usize) -> Vec<T> {
    let layout = std::alloc::Layout::array::<T>(n).expect("a dedupe state within the address space");
    if layout.size() == 0 {
        return Vec::new();
    }
    // SAFETY: the layout's size is not zero (checked above).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: `ptr` comes from the global allocator with `T`'s alignment and the size of `n`
    // values of `T` (the layout a `Vec<T>` of capacity `n` frees with), and all `n` values are
    // initialized: `Zeroed` is implemented only for the state's plain integer arrays below, for
    // which all-zero bytes are a valid value (the one `Default` gives). (`Box::new_zeroed_slice`
    // says this in one call, from Rust 1.92; the Dockerfile builds with 1.90.)
    unsafe { Vec::from_raw_parts(ptr, n, n) }
}

/// Types whose all-zero bytes are a valid value equal to their `Default`.
trait Zeroed: Default {}
impl Zeroed for Block {}
impl Zeroed for Set {}

/// A blocked Bloom filter over 64-bit key hashes: the high bits pick one 512-bit block (one
/// cache line), [`HASHES`] bits are set inside it. One cache miss per check instead of one per
/// hash, for a false-positive rate slightly above a classic filter's of the same size.
#[derive(Debug, Clone)]
pub struct Bloom {
    blocks: Vec<Block>,
    block_mask: u64,
    inserted: u64,
}

/// One block of the filter: 512 bits, aligned to a cache line (64 bytes) so that a check reads
/// one line.
#[derive(Debug, Clone, Copy, Default)]
#[repr(align(64))]
struct Block([u64; 8]);

/// Bits set per key.
const HASHES: u32 = 8;

impl Bloom {
    /// A filter of at most `bytes` bytes (rounded down to a power of two, at least 1 KiB).
    pub fn with_bytes(bytes: usize) -> Self {
        let budget = bytes.max(1024) / 64;
        let blocks = 1usize << (usize::BITS - 1 - budget.leading_zeros());
        Bloom { blocks: zeroed(blocks), block_mask: blocks as u64 - 1, inserted: 0 }
    }

    /// The block and, for each of the [`HASHES`] bits, (word, bit) inside it.
    #[inline]
    fn locate(&self, h: u64) -> (usize, u64) {
        // Block from the high bits (the low ones feed the in-block positions).
        let block = ((h >> 32) ^ (h >> 17)) & self.block_mask;
        (block as usize, h.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    #[inline]
    pub fn insert(&mut self, h: u64) {
        let (b, mut x) = self.locate(h);
        let block = &mut self.blocks[b].0;
        for _ in 0..HASHES {
            let bit = (x >> 55) as usize; // 9 bits: 0..512
            block[bit >> 6] |= 1 << (bit & 63);
            x = x.rotate_left(9).wrapping_mul(0xff51_afd7_ed55_8ccd) | 1;
        }
        self.inserted += 1;
    }

    #[inline]
    pub fn may_contain(&self, h: u64) -> bool {
        let (b, mut x) = self.locate(h);
        let block = &self.blocks[b].0;
        for _ in 0..HASHES {
            let bit = (x >> 55) as usize;
            if block[bit >> 6] & (1 << (bit & 63)) == 0 {
                return false;
            }
            x = x.rotate_left(9).wrapping_mul(0xff51_afd7_ed55_8ccd) | 1;
        }
        true
    }

    pub fn bytes(&self) -> usize {
        self.blocks.len() * 64
    }

    /// Reads the block `h` maps to (a cache line), see [`PartitionState::touch`].
    #[inline]
    pub fn touch(&self, h: u64) -> u64 {
        self.blocks[self.locate(h).0].0[0]
    }

    pub fn inserted(&self) -> u64 {
        self.inserted
    }
}

/// Four keys: one set of [`Recent`], one cache line.
#[derive(Debug, Clone, Copy, Default)]
#[repr(align(64))]
struct Set([u128; 4]);

/// An exact cache of recently remembered keys, bounded by count: 4-way set-associative, one
/// cache line per set, each set first-in first-out. A key it holds was remembered (no false
/// positives: keys are compared whole); a remembered key may be evicted early, when four newer
/// keys land in its set (a miss only sends the event on to the Bloom filter and ClickHouse).
///
/// It replaced a hash set with a FIFO queue of the last N keys: that cost three cache misses per
/// remembered key (the set's control bytes, its slot, the evicted key's slot) against one here,
/// whose address is known from the key alone, so that deduplication's first pass over a block of
/// events can touch it ahead (docs/measurements.md, "The dedupe state's cache lines"). The key 0
/// marks an empty slot; a key whose 128-bit hash is 0 is simply never cached.
#[derive(Debug, Clone)]
struct Recent {
    sets: Vec<Set>,
    /// `64 − log2(sets)`: a key's set is the top bits of its mixed high half (see [`Recent::at`]).
    shift: u32,
}

/// Keys are already uniform hashes: hashing them again is wasted work. Use for sets of
/// [`EventKey`] and of their `u128`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildXxh;

impl std::hash::BuildHasher for BuildXxh {
    type Hasher = PassThrough;
    fn build_hasher(&self) -> PassThrough {
        PassThrough(0)
    }
}

#[derive(Debug, Clone, Default)]
pub struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = (v as u64) ^ ((v >> 64) as u64);
    }
}

impl Recent {
    /// Room for at most `cap` keys (rounded down to a power of two of sets of four; none below 4).
    fn new(cap: usize) -> Self {
        let sets = match cap / 4 {
            0 => 0,
            n => 1usize << (usize::BITS - 1 - n.leading_zeros()),
        };
        Recent { sets: zeroed(sets), shift: 64 - sets.max(1).trailing_zeros() }
    }

    /// The index of the set `k` belongs in: the top bits of its keyed high half times an odd
    /// constant (Fibonacci hashing, so that the index depends on every bit of the half; when the
    /// half was XXH3's, five of 35 ids `e<n>` of one tenant fell in one of 128 sets by its own
    /// low bits). The Bloom filter reads the low half.
    #[inline]
    fn at(&self, k: u128) -> usize {
        ((k >> 64) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).checked_shr(self.shift).unwrap_or(0) as usize
    }

    /// The set `k` belongs in (none when the cache holds nothing).
    #[inline]
    fn set_of(&self, k: u128) -> Option<&Set> {
        self.sets.get(self.at(k))
    }

    #[inline]
    fn contains(&self, k: u128) -> bool {
        k != 0 && self.set_of(k).is_some_and(|s| s.0.contains(&k))
    }

    #[inline]
    fn insert(&mut self, k: u128) {
        let at = self.at(k);
        let Some(set) = self.sets.get_mut(at) else { return };
        if k == 0 || set.0.contains(&k) {
            return;
        }
        set.0.copy_within(0..3, 1);
        set.0[0] = k;
    }

    /// Reads the set `k` belongs in, so that its cache line is loaded (see [`PartitionState::touch`]).
    #[inline]
    fn touch(&self, k: u128) -> u128 {
        self.set_of(k).map_or(0, |s| s.0[0])
    }

    fn bytes(&self) -> usize {
        self.sets.len() * std::mem::size_of::<Set>()
    }

    /// Keys held (slots not empty).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.sets.iter().map(|s| s.0.iter().filter(|&&k| k != 0).count()).sum()
    }
}

/// Dedupe state of one Kafka partition.
#[derive(Debug, Clone)]
pub struct PartitionState {
    bloom: Bloom,
    recent: Recent,
    /// Events with an event time before this (Unix seconds) are not covered by the filter.
    horizon: i64,
}

impl PartitionState {
    /// An empty state covering events at or after `horizon`; fill it with [`Self::load`] with
    /// every stored key whose event time is at or after `horizon` − the dedupe window.
    pub fn new(bloom_bytes: usize, recent_keys: usize, horizon: i64) -> Self {
        PartitionState { bloom: Bloom::with_bytes(bloom_bytes), recent: Recent::new(recent_keys), horizon }
    }

    /// Adds a key hash read back from ClickHouse.
    pub fn load(&mut self, key_hash: u64) {
        self.bloom.insert(key_hash);
    }

    /// What is known about `key` (an event at `ts`), without I/O.
    #[inline]
    pub fn check(&self, key: EventKey, ts: i64) -> Verdict {
        if self.recent.contains(key.0) {
            Verdict::Duplicate
        } else if ts >= self.horizon && !self.bloom.may_contain(key.short()) {
            Verdict::New
        } else {
            Verdict::Unknown
        }
    }

    /// Records that `key` is now counted (or about to be, in the batch being built).
    #[inline]
    pub fn remember(&mut self, key: EventKey) {
        self.bloom.insert(key.short());
        self.recent.insert(key.0);
    }

    /// Reads the two cache lines [`Self::check`] of `key` will read (its Bloom block and its
    /// recent set), and returns a value made from them that means nothing: a loop of these, with
    /// no dependency between iterations, has the CPU fetch many lines at once, where checks made
    /// one event at a time wait for each miss in turn ([`crate::pipeline`]'s deduplication).
    #[inline]
    pub fn touch(&self, key: EventKey) -> u64 {
        self.bloom.touch(key.short()) ^ self.recent.touch(key.0) as u64
    }

    /// Memory held, in bytes: the Bloom filter and the recent keys' sets.
    pub fn memory_bytes(&self) -> usize {
        self.bloom.bytes() + self.recent.bytes()
    }

    pub fn keys(&self) -> u64 {
        self.bloom.inserted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn key_components_are_length_delimited() {
        assert_ne!(EventKey::new("ab", "c", "d"), EventKey::new("a", "bc", "d"));
        assert_ne!(EventKey::new("a", "b", "cd"), EventKey::new("a", "bc", "d"));
        assert_eq!(EventKey::new("o", "p", "i"), EventKey::new("o", "p", "i"));
    }

    #[test]
    fn one_shot_keys_equal_streamed_keys() {
        // The low half is stored in ClickHouse: pinned across versions and processes. The fast
        // form must give exactly the streamed form's halves.
        let pinned = 0x5718_3459_0607_73d8;
        assert_eq!(EventKey::new("org-1", "proj-2", "evt-3").short(), pinned);
        let parts: [&[u8]; 3] = [b"org-1", b"proj-2", b"evt-3"];
        assert_eq!(EventKey::streamed(&PROCESS_KEY, parts), EventKey::new("org-1", "proj-2", "evt-3"));
        for len in [0, 1, 15, 16, 17, 100, 128, 200, 247, 248, 249, 300] {
            let id = "x".repeat(len);
            for (o, p) in [("o", "p"), ("org-with-a-long-name", "project-with-a-long-name"), ("", "")] {
                let parts = [o.as_bytes(), p.as_bytes(), id.as_bytes()];
                assert_eq!(EventKey::new(o, p, &id), EventKey::streamed(&PROCESS_KEY, parts), "{o} {p} {len}");
            }
        }
    }

    #[test]
    fn the_stored_half_is_the_same_under_every_process_key_and_the_other_is_not() {
        let parts: [&[u8]; 3] = [b"org-1", b"proj-2", b"evt-3"];
        let (a, b) = (RandomState::new(), RandomState::new());
        let (ka, kb) = (EventKey::keyed_with(&a, parts), EventKey::keyed_with(&b, parts));
        assert_eq!((ka.short(), kb.short()), (0x5718_3459_0607_73d8, 0x5718_3459_0607_73d8));
        assert_ne!(ka.0 >> 64, kb.0 >> 64);
        assert_eq!(EventKey::streamed(&a, parts), ka);
    }

    #[test]
    fn a_crafted_xxh3_collision_is_two_keys() {
        // XXH3-128 of a 32-byte input (its 17-to-128-byte path) mixes the last 16 bytes, as words
        // w2 and w3, into one lane as mul128_fold64(w2 ^ s2, w3 ^ s3) and into the other as
        // w2 + w3, and nowhere else (so for 48 to 128 bytes too), where s2 and s3 are
        // words 2 and 3 of the public default secret (the XXH3 specification's kSecret). Swap
        // the product's operands, keep the sum (the same bits in each position), and a second
        // id has the same digest.
        let (s2, s3) = (0xdb97_9083_e96d_d4de_u64, 0x1f67_b3b7_a4a4_4072_u64);
        let d = s2 ^ s3;
        let e = 0x0101_0101_0101_0101 & !d;
        let w2 = u64::from_le_bytes(*b"evt-0001");
        let id = |a: u64, b: u64| [a.to_le_bytes(), b.to_le_bytes()].concat();
        let (first, second) = (id(w2, w2 ^ d ^ e), id(w2 ^ e, w2 ^ d));
        assert_ne!(first, second);
        // XXH3-128 of the key's input, written out here independently of `EventKey`.
        let digest = |org: &str, project: &str, id: &[u8]| {
            let lengths = [(org.len() as u32).to_le_bytes(), (project.len() as u32).to_le_bytes()];
            xxhash_rust::xxh3::xxh3_128(
                &[&lengths[0][..], &lengths[1], org.as_bytes(), project.as_bytes(), id].concat(),
            )
        };
        assert_eq!(
            digest("orgA", "prj1", &first),
            digest("orgA", "prj1", &second),
            "the construction collides in XXH3-128"
        );

        let key = |id: &[u8]| EventKey::keyed_with(&PROCESS_KEY, [b"orgA", b"prj1", id]);
        assert_eq!(key(&first).short(), key(&second).short(), "the stored half collides too");
        assert_ne!(key(&first), key(&second));
        // Neither the recent keys nor a batch's key set take the second for a copy of the
        // first; the Bloom filter's hit on the stored half sends it to ClickHouse.
        let mut state = PartitionState::new(1 << 16, 1024, 0);
        state.remember(key(&first));
        assert_eq!(state.check(key(&second), 10), Verdict::Unknown);
        let batch: KeySet = [key(&first)].into_iter().collect();
        assert!(!batch.contains(&key(&second)));

        // The same construction with printable UTF-8 (found by a search over w2 and e): ids a
        // producer can send, whatever org and project ids lead the input, when the input is 32
        // bytes long or 48 to 128 (`field_inputs::ids_with_one_xxh3_digest_are_two_events` sends them).
        let first = std::str::from_utf8(b"\x7c\x3b\xe5\x9e\x9e\x51\xcc\x89\xd0\xaf\x2c\xd3\xaa\x72\x3c\x4c").unwrap();
        let second = std::str::from_utf8(b"\x7c\x3b\xe5\x9e\x9e\x51\xcc\x88\xd0\xaf\x2c\xd3\xaa\x72\x3c\x4d").unwrap();
        for (org, project) in [("orgA", "prj1"), ("organisation-0001", "project-000017")] {
            assert_eq!(digest(org, project, first.as_bytes()), digest(org, project, second.as_bytes()), "{org}");
            assert_ne!(EventKey::new(org, project, first), EventKey::new(org, project, second));
        }
    }

    #[test]
    fn zeroed_state_is_the_default_state() {
        assert!(zeroed::<Block>(1000).iter().all(|b| b.0 == Block::default().0));
        assert!(zeroed::<Set>(1000).iter().all(|s| s.0 == Set::default().0));
        assert!(zeroed::<Block>(0).is_empty());
    }

    #[test]
    fn bloom_sizes_are_bounded_by_the_budget() {
        assert_eq!(Bloom::with_bytes(1 << 20).bytes(), 1 << 20);
        assert_eq!(Bloom::with_bytes(3 << 20).bytes(), 2 << 20);
        assert_eq!(Bloom::with_bytes(1).bytes(), 1024);
    }

    #[test]
    fn bloom_false_positive_rate_is_near_design() {
        // 1 MiB = 8 Mbit for 800k keys: ~10 bits/key → ~1 % for a blocked filter.
        let mut b = Bloom::with_bytes(1 << 20);
        for i in 0..800_000u64 {
            b.insert(EventKey::new("o", "p", &i.to_string()).short());
        }
        let fp =
            (800_000..900_000u64).filter(|i| b.may_contain(EventKey::new("o", "p", &i.to_string()).short())).count();
        assert!(fp < 2_000, "false positives {fp} / 100000");
    }

    #[test]
    fn recent_keys_are_held_exactly_within_their_bound() {
        let mut r = Recent::new(4 * 1024);
        assert_eq!(r.bytes(), 1024 * 64);
        let keys: Vec<u128> = (0..10_000u64).map(|i| EventKey::new("o", "p", &i.to_string()).0).collect();
        for (i, &k) in keys.iter().enumerate() {
            r.insert(k);
            r.insert(k); // again: still held once
            assert!(r.contains(k));
            assert!(r.len() <= (i + 1).min(4 * 1024));
        }
        assert!(r.len() > 3 * 1024, "a full cache holds nearly its bound: {}", r.len());
        // The newest quarter of the bound is nearly all held (a set evicts only after 4 newer keys).
        let held = keys[keys.len() - 1024..].iter().filter(|&&k| r.contains(k)).count();
        assert!(held > 1000, "{held} of the newest 1024 keys held");
        // Never a key that was not inserted; never the empty-slot marker.
        assert!(!(10_000..20_000u64).any(|i| r.contains(EventKey::new("o", "p", &i.to_string()).0)));
        r.insert(0);
        assert!(!r.contains(0));
        // Below one set: nothing is kept.
        let mut none = Recent::new(3);
        none.insert(keys[0]);
        assert!(!none.contains(keys[0]) && none.bytes() == 0);
        assert_eq!(Recent::new(262_144).bytes(), 4 << 20);
        assert_eq!(Recent::new(262_143).bytes(), 2 << 20);
        // One set: every key goes to it.
        let mut one = Recent::new(4);
        for &k in &keys[..6] {
            one.insert(k);
        }
        assert!(keys[2..6].iter().all(|&k| one.contains(k)) && !one.contains(keys[1]));
    }

    /// Keys of one tenant whose ids differ in a few characters spread over the sets: 40 such keys
    /// in 128 sets of four are all held (when the high half was XXH3's, its low bits, used
    /// directly, put five of them in one set and evicted the first). The keyed half is random
    /// per process, so the test builds its keys with a fixed-seed hash in its place.
    #[test]
    fn similar_keys_spread_over_the_sets() {
        for (org, project) in [("org-1", "proj-1"), ("org-1-1d2f", "proj-1-1-9a0c"), ("o", "p")] {
            let mut r = Recent::new(512);
            // The high half as a keyed hash under one fixed key (the process's own key is random,
            // and a test must not depend on it): similar ids must not share sets.
            let keys: Vec<u128> = (0..40)
                .map(|i| {
                    let id = format!("e{i}");
                    let stored = EventKey::new(org, project, &id).short();
                    let bytes = [org.as_bytes(), project.as_bytes(), id.as_bytes()].concat();
                    EventKey::from_halves(stored, xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, 0x5eed)).0
                })
                .collect();
            for &k in &keys {
                r.insert(k);
            }
            let lost: Vec<usize> = (0..40).filter(|&i| !r.contains(keys[i])).collect();
            assert!(lost.is_empty(), "{org}/{project}: ids {lost:?} evicted");
        }
    }

    #[test]
    fn old_events_are_always_checked() {
        let s = PartitionState::new(1024, 16, 1000);
        assert_eq!(s.check(EventKey::new("o", "p", "x"), 999), Verdict::Unknown);
        assert_eq!(s.check(EventKey::new("o", "p", "x"), 1000), Verdict::New);
    }

    proptest! {
        /// Against an exact model: a key reported New was never remembered, a key reported
        /// Duplicate was, whatever the (tiny) memory budget.
        #[test]
        fn verdicts_never_contradict_the_truth(ops in proptest::collection::vec((0u32..300, any::<bool>()), 1..2000),
                                               recent in 0usize..50) {
            let mut s = PartitionState::new(1024, recent, 0);
            let mut truth = HashSet::new();
            for (id, remember) in ops {
                let k = EventKey::new("org", "proj", &id.to_string());
                match s.check(k, 10) {
                    Verdict::New => prop_assert!(!truth.contains(&id)),
                    Verdict::Duplicate => prop_assert!(truth.contains(&id)),
                    Verdict::Unknown => {}
                }
                if remember {
                    s.remember(k);
                    truth.insert(id);
                }
            }
        }
    }
}
