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

    /// Notes that the consumer's position in `partition` (the next offset it will return)
    /// reached `position` with no record returned in between, as librdkafka moves it over a
    /// transaction's marker (or the aborted records, `read_committed`) after the last record:
    /// the jump over offsets without a record, as [`Self::observe`] gives it for a record at
    /// `position`; [`Jump::None`] when nothing was skipped. `None` (nothing noted) when nothing
    /// was read since the assignment (the assignment's start check decides), and for a position
    /// below the next offset expected (a log that restarted below is seen when its records are
    /// read, as [`Jump::Back`]).
    pub fn advance(&mut self, partition: i32, position: i64) -> Option<Jump> {
        let next = self.next.get_mut(usize::try_from(partition).ok()?)?;
        if *next < 0 || position < *next {
            return None;
        }
        let from = std::mem::replace(next, position);
        Some(if position == from { Jump::None } else { Jump::Gap { from, to: position } })
    }

    /// Starts `partition` at `position` when nothing was read from it since the assignment (its
    /// start was checked against `position` instead of a first record): its first record is then
    /// checked for a jump like any other.
    pub fn start_at(&mut self, partition: i32, position: i64) {
        let Ok(i) = usize::try_from(partition) else { return };
        if i >= self.next.len() {
            self.next.resize(i + 1, -1);
        }
        if self.next[i] < 0 {
            self.next[i] = position;
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
    fn a_position_moved_past_markers_is_a_gap_once() {
        let mut p = Positions::default();
        assert_eq!(p.advance(2, 50), None, "nothing read since the assignment: the start check decides");
        p.observe(2, 10);
        assert_eq!(p.advance(2, 11), Some(Jump::None), "the position right after the last record");
        assert_eq!(p.advance(2, 12), Some(Jump::Gap { from: 11, to: 12 }), "a commit marker at 11");
        assert_eq!(p.advance(2, 12), Some(Jump::None), "noted: not counted again");
        assert_eq!(p.observe(2, 12), Jump::None, "the next record follows the position");
        assert_eq!(p.advance(2, 5), None, "below the next offset expected: left to the records");
        assert_eq!(p.observe(2, 13), Jump::None, "and nothing changed");
        assert_eq!(p.advance(-1, 5), None);
        assert_eq!(p.advance(99, 5), None, "never held");

        p.start_at(7, 30);
        assert_eq!(p.observe(7, 32), Jump::Gap { from: 30, to: 32 }, "checked from the position the start was");
        p.start_at(7, 100);
        assert_eq!(p.observe(7, 33), Jump::None, "a partition already read keeps its next offset");
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
