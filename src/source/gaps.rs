//! Jumps in a partition's offsets while a worker holds it: where retention can overtake a
//! partition that stays assigned (docs/exactly-once.md, Limits, "Retention below the committed
//! offset"; [`super::start`] checks the first record after an assignment).
//!
//! Offsets of the records a consumer reads from one partition rise by one, except where the log
//! has no record for an offset the consumer can see:
//! - a transaction's commit or abort marker, or the aborted records themselves (`read_committed`),
//!   and records removed by compaction: normal, nothing is lost;
//! - records deleted by retention before this worker read them: librdkafka's fetch gets
//!   `OFFSET_OUT_OF_RANGE`, moves to the log start (`auto.offset.reset=earliest`) and only logs
//!   it. This happens to a worker that keeps its partitions while it cannot read them for longer
//!   than the topic's `retention.ms` (a ClickHouse outage is waited out with the partitions held);
//! - a jump back: the log was truncated below the worker's position (unclean leader election, the
//!   topic created again) and librdkafka starts over from the log start. Records are read again.
//!
//! The first two look the same in the offsets. So a forward jump is checked, when it is read,
//! against the partition's log start as of librdkafka's latest fetch (each Fetch response carries
//! it, KIP-107; read from librdkafka's cache, no request): offsets of the jump below the log start
//! were records this worker never read and that are gone ([`deleted`]). The log start can be a
//! little ahead of the record being read (librdkafka fetches ahead of the application), so a
//! marker that retention reached in between would be counted too: that needs the worker to read
//! at the very edge of retention, where records are being lost anyway.

/// What one record's offset says about the records before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jump {
    /// The next offset, or the first record since the partition was assigned.
    None,
    /// No record was read for offsets `from..to` (`to` is this record's offset).
    Gap { from: i64, to: i64 },
    /// The offset is this far below the next one expected: the log starts over below the
    /// worker's position.
    Back(u64),
}

/// The next offset expected per held partition.
#[derive(Debug, Default)]
pub struct Positions {
    /// Indexed by partition; negative: nothing read since the assignment. A vector, not a map:
    /// this is read for every record.
    next: Vec<i64>,
}

impl Positions {
    /// Notes the record at `offset` of `partition` (in the order the consumer returned them).
    #[inline]
    pub fn observe(&mut self, partition: i32, offset: i64) -> Jump {
        let Ok(i) = usize::try_from(partition) else { return Jump::None };
        if i >= self.next.len() {
            self.next.resize(i + 1, -1);
        }
        let expected = std::mem::replace(&mut self.next[i], offset + 1);
        if expected < 0 || offset == expected {
            Jump::None
        } else if offset < expected {
            Jump::Back((expected - offset) as u64)
        } else {
            Jump::Gap { from: expected, to: offset }
        }
    }

    /// Forgets `partition` (assigned anew, or revoked): its next record starts over (the
    /// assignment's own start check covers it).
    pub fn forget(&mut self, partition: i32) {
        if let Some(n) = usize::try_from(partition).ok().and_then(|i| self.next.get_mut(i)) {
            *n = -1;
        }
    }
}

/// How many offsets of the jump `from..to` lie below the partition's log start `low`: records
/// the worker never read that are gone.
pub fn deleted(from: i64, to: i64, low: i64) -> u64 {
    (to.min(low) - from).max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_offsets_and_first_records_are_no_jump() {
        let mut p = Positions::default();
        assert_eq!(p.observe(3, 100), Jump::None, "the first record since the assignment");
        assert_eq!(p.observe(3, 101), Jump::None);
        assert_eq!(p.observe(0, 7), Jump::None, "another partition");
        assert_eq!(p.observe(3, 102), Jump::None);
        assert_eq!(p.observe(-1, 5), Jump::None, "no such partition: ignored");
    }

    #[test]
    fn forward_jumps_are_gaps() {
        let mut p = Positions::default();
        p.observe(1, 10);
        assert_eq!(p.observe(1, 12), Jump::Gap { from: 11, to: 12 }, "a commit marker at 11");
        p.observe(2, 500);
        assert_eq!(p.observe(2, 900), Jump::Gap { from: 501, to: 900 });
        assert_eq!(p.observe(1, 13), Jump::None);
    }

    #[test]
    fn a_jump_back_is_counted() {
        let mut p = Positions::default();
        p.observe(0, 1_000);
        assert_eq!(p.observe(0, 40), Jump::Back(961), "the next offset expected was 1,001");
        assert_eq!(p.observe(0, 41), Jump::None);
    }

    #[test]
    fn a_forgotten_partition_starts_over() {
        let mut p = Positions::default();
        p.observe(4, 10);
        p.observe(5, 10);
        p.forget(4);
        assert_eq!(p.observe(4, 5), Jump::None, "not a jump back: assigned anew");
        assert_eq!(p.observe(5, 20), Jump::Gap { from: 11, to: 20 }, "the other partition is kept");
        p.forget(99); // never held: nothing to do
    }

    #[test]
    fn only_offsets_below_the_log_start_are_deleted() {
        assert_eq!(deleted(11, 12, 0), 0, "the log starts before the gap: a marker, compaction");
        assert_eq!(deleted(11, 12, 11), 0);
        assert_eq!(deleted(11, 12, 12), 1);
        assert_eq!(deleted(100, 250, 180), 80, "retention reached into the gap");
        assert_eq!(deleted(100, 250, 250), 150, "the reset landed on the log start");
        assert_eq!(deleted(100, 250, 10_000), 150, "the log start moved on since: only the gap counts");
    }
}
