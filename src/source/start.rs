//! Where a partition's reading starts after an assignment, checked against the group's committed
//! offset: where librdkafka can pass records over without anything in tally seeing it
//! (docs/exactly-once.md, Limits, "Retention below the committed offset"; the same can happen to
//! a partition a worker keeps while retention overtakes its position is checked by [`super::gaps`]).
//!
//! librdkafka fetches from the committed offset. When that offset is out of range it moves to the
//! log start (`auto.offset.reset=earliest`, the only value tally allows) and only logs it:
//! - the log start has passed the committed offset (retention deleted records this group never
//!   counted, after a worker stopped or stalled for longer than the topic's `retention.ms`): the
//!   records in between are gone, never billed;
//! - the committed offset is past the log end (an unclean leader election truncated the log, or
//!   the topic was deleted and created again): reading starts over from the log start, and events
//!   already counted are read again (the dedupe window drops those it still holds).
//!
//! Neither can be undone by the worker: the records are gone, or the log was rewritten. What it
//! can do is say so, by partition and count, the moment it happens (`tally_offsets_skipped_total`,
//! alert `TallyOffsetsSkipped`). A gap between the committed offset and the first record is
//! otherwise normal (a transaction's commit marker, a compacted record) when the log start has
//! not passed the committed offset.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What the first record read after an assignment says about the records before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Reading resumed where the group left off, or only past records that were not deleted
    /// (commit markers, compaction): nothing to say.
    Resumed,
    /// The log start (`low`) had passed the committed offset: this many offsets were deleted
    /// before the group read them.
    Deleted(u64),
    /// The first record is before the committed offset: this many offsets are read again.
    Rewound(u64),
}

/// Classifies the first record (`first`, its offset) read after an assignment, given the group's
/// committed offset of the partition (`committed`, negative when the group has none) and, when
/// `first > committed`, the partition's log start (`low`; `None` when it could not be read).
pub fn classify(committed: i64, first: i64, low: Option<i64>) -> Start {
    if committed < 0 || first == committed {
        return Start::Resumed;
    }
    if first < committed {
        return Start::Rewound((committed - first) as u64);
    }
    match low {
        Some(low) if low > committed => Start::Deleted((low.min(first) - committed) as u64),
        _ => Start::Resumed,
    }
}

/// Whether [`classify`] needs the partition's log start for these offsets.
pub fn needs_low(committed: i64, first: i64) -> bool {
    committed >= 0 && first > committed
}

/// Assigned partitions whose committed offset could not be read at the assignment (the group
/// coordinator did not answer in time): their start is checked later, before this worker's first
/// commit of the partition overwrites the committed offset, which is the evidence. Until then
/// their offsets are not committed (not at revocation either: the next owner then checks the
/// start itself). Given up after a while, counted as unchecked.
#[derive(Debug, Default)]
pub struct Unread {
    /// Partition → (offset of the first record read since the assignment, when first unread).
    parts: BTreeMap<i32, (Option<i64>, Instant)>,
}

impl Unread {
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// `p` was assigned and its committed offset could not be read.
    pub fn add(&mut self, p: i32, now: Instant) {
        self.parts.insert(p, (None, now));
    }

    /// `p` was revoked: its next owner checks its start.
    pub fn forget(&mut self, p: i32) {
        self.parts.remove(&p);
    }

    /// A record of `p` at `offset` was read.
    pub fn observe(&mut self, p: i32, offset: i64) {
        if let Some((first @ None, _)) = self.parts.get_mut(&p) {
            *first = Some(offset);
        }
    }

    /// Whether `p`'s offsets must not be committed yet.
    pub fn holds(&self, p: i32) -> bool {
        self.parts.contains_key(&p)
    }

    /// Of `partitions` (about to be committed), those to check now, with their first offsets.
    pub fn due(&self, partitions: impl IntoIterator<Item = i32>) -> Vec<(i32, i64)> {
        partitions.into_iter().filter_map(|p| Some((p, self.parts.get(&p)?.0?))).collect()
    }

    /// `p`'s committed offset was read: it is no longer held.
    pub fn resolved(&mut self, p: i32) {
        self.parts.remove(&p);
    }

    /// The committed offsets of `due` could not be read again: those unread for `ttl` or longer
    /// are given up (no longer held; returned, to be counted), the others stay held.
    pub fn failed(&mut self, due: &[i32], now: Instant, ttl: Duration) -> Vec<i32> {
        let old: Vec<i32> = due
            .iter()
            .copied()
            .filter(|p| self.parts.get(p).is_some_and(|(_, at)| now.duration_since(*at) >= ttl))
            .collect();
        for p in &old {
            self.parts.remove(p);
        }
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unread_start_is_held_until_read_or_given_up() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(300);
        let mut u = Unread::default();
        assert!(u.is_empty() && !u.holds(3));
        u.add(3, t0);
        u.add(4, t0);
        assert!(u.holds(3) && u.holds(4));
        // Nothing read yet: nothing to check (nothing of it to commit either).
        assert!(u.due([3, 4]).is_empty());
        u.observe(3, 120);
        u.observe(3, 121);
        assert_eq!(u.due([3, 4, 5]), [(3, 120)], "the first record read, not the latest");
        // The coordinator still does not answer: held, until the ttl.
        assert!(u.failed(&[3], t0 + Duration::from_secs(10), ttl).is_empty());
        assert!(u.holds(3));
        assert_eq!(u.failed(&[3], t0 + ttl, ttl), [3]);
        assert!(!u.holds(3) && u.holds(4));
        // Read at last; or revoked (the next owner checks it).
        u.observe(4, 7);
        u.resolved(4);
        assert!(u.is_empty());
        u.add(5, t0);
        u.forget(5);
        assert!(u.is_empty());
    }

    #[test]
    fn reading_where_the_group_left_off_says_nothing() {
        assert_eq!(classify(100, 100, None), Start::Resumed);
        // No committed offset: a new group starts at the log start, whatever it is.
        assert_eq!(classify(-1001, 5_000, Some(5_000)), Start::Resumed);
        assert!(!needs_low(-1001, 5_000) && !needs_low(100, 100) && !needs_low(100, 7));
    }

    #[test]
    fn a_gap_over_records_that_still_exist_says_nothing() {
        // A commit marker at 100 (transactional producer) or compacted records: the log starts
        // at or before the committed offset.
        assert!(needs_low(100, 101));
        assert_eq!(classify(100, 101, Some(0)), Start::Resumed);
        assert_eq!(classify(100, 140, Some(100)), Start::Resumed);
        // The log start could not be read: nothing is claimed.
        assert_eq!(classify(100, 140, None), Start::Resumed);
    }

    #[test]
    fn retention_past_the_committed_offset_is_counted() {
        // Committed 100; retention moved the log start to 250; reading resumed there.
        assert_eq!(classify(100, 250, Some(250)), Start::Deleted(150));
        // The log start moved again between the fetch and the read of it: only what was passed
        // over before the first record counts.
        assert_eq!(classify(100, 250, Some(400)), Start::Deleted(150));
        // A log start at 101 with the first record at 130 (a gap after it): one offset deleted.
        assert_eq!(classify(100, 130, Some(101)), Start::Deleted(1));
    }

    #[test]
    fn a_log_shorter_than_the_committed_offset_is_counted() {
        assert_eq!(classify(5_000, 0, None), Start::Rewound(5_000));
        assert_eq!(classify(5_000, 4_990, Some(0)), Start::Rewound(10));
    }
}
