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

#[cfg(test)]
mod tests {
    use super::*;

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
