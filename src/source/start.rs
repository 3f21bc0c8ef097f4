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
/// coordinator did not answer, or answered with an error for them): their start is checked
/// later, before this worker's first commit of the partition overwrites the committed offset,
/// which is the evidence. Until then their offsets are not committed (not at revocation either:
/// the next owner then checks the start itself). Reads are retried at most every `retry` (the
/// loop waits on each), and a partition whose reads keep failing for `ttl` is given up.
#[derive(Debug, Default)]
pub struct Unread {
    parts: BTreeMap<i32, UnreadPartition>,
}

#[derive(Debug, Default)]
struct UnreadPartition {
    /// Offset of the first record read since the assignment.
    first: Option<i64>,
    /// When a read before a commit first failed.
    failing_since: Option<Instant>,
    /// No read before this.
    next_try: Option<Instant>,
}

impl Unread {
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// `p` was assigned and its committed offset could not be read.
    pub fn add(&mut self, p: i32) {
        self.parts.insert(p, UnreadPartition::default());
    }

    /// `p` was revoked: its next owner checks its start.
    pub fn forget(&mut self, p: i32) {
        self.parts.remove(&p);
    }

    /// A record of `p` at `offset` was read.
    pub fn observe(&mut self, p: i32, offset: i64) {
        if let Some(u @ UnreadPartition { first: None, .. }) = self.parts.get_mut(&p) {
            u.first = Some(offset);
        }
    }

    /// Whether `p`'s offsets must not be committed yet.
    pub fn holds(&self, p: i32) -> bool {
        self.parts.contains_key(&p)
    }

    /// Of `partitions` (about to be committed), those to read now, with their first offsets:
    /// read from, and not retried too recently.
    pub fn due(&self, partitions: impl IntoIterator<Item = i32>, now: Instant) -> Vec<(i32, i64)> {
        partitions
            .into_iter()
            .filter_map(|p| {
                let u = self.parts.get(&p)?;
                u.next_try.is_none_or(|t| now >= t).then_some((p, u.first?))
            })
            .collect()
    }

    /// `p`'s committed offset was read: it is no longer held.
    pub fn resolved(&mut self, p: i32) {
        self.parts.remove(&p);
    }

    /// The committed offsets of `due` could not be read: each is tried again after `retry`;
    /// those whose reads have failed for `ttl` are given up (no longer held; returned, to be
    /// counted).
    pub fn failed(&mut self, due: &[i32], now: Instant, retry: Duration, ttl: Duration) -> Vec<i32> {
        let mut given_up = Vec::new();
        for p in due {
            let Some(u) = self.parts.get_mut(p) else { continue };
            let since = *u.failing_since.get_or_insert(now);
            if now.duration_since(since) >= ttl {
                given_up.push(*p);
            } else {
                u.next_try = Some(now + retry);
            }
        }
        for p in &given_up {
            self.parts.remove(p);
        }
        given_up
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unread_start_is_held_until_read_or_given_up() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let (retry, ttl) = (Duration::from_secs(15), Duration::from_secs(300));
        let mut u = Unread::default();
        assert!(u.is_empty() && !u.holds(3));
        u.add(3);
        u.add(4);
        assert!(u.holds(3) && u.holds(4));
        // Nothing read yet: nothing to check (nothing of it to commit either).
        assert!(u.due([3, 4], t0).is_empty());
        u.observe(3, 120);
        u.observe(3, 121);
        assert_eq!(u.due([3, 4, 5], t0), [(3, 120)], "the first record read, not the latest");
        // The coordinator still does not answer: held, not asked again before `retry`.
        assert!(u.failed(&[3], at(400), retry, ttl).is_empty(), "the time counts from the first failed read");
        assert!(u.holds(3));
        assert!(u.due([3], at(414)).is_empty());
        assert_eq!(u.due([3], at(415)), [(3, 120)]);
        assert!(u.failed(&[3], at(415), retry, ttl).is_empty());
        assert_eq!(u.failed(&[3], at(700), retry, ttl), [3], "given up after failing for the ttl");
        assert!(!u.holds(3) && u.holds(4));
        // Read at last; or revoked (the next owner checks it).
        u.observe(4, 7);
        u.resolved(4);
        assert!(u.is_empty());
        u.add(5);
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
