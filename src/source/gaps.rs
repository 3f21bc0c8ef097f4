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
//! The first two look the same in the offsets. So every forward jump is kept as a gap, and gaps
//! are checked against the partition's log start ([`deleted_below`]) at most once per
//! [`CHECK_INTERVAL`]: offsets of a gap below the log start were records the worker never read
//! and that are gone. A jump back is counted at once. A marker or a compacted record reached by
//! retention within one interval of being passed would be counted as deleted too: that needs the
//! worker to read at the very edge of retention, where records are being lost anyway.

use std::time::{Duration, Instant};

/// How often pending gaps are checked against the log start (one `ListOffsets` request per
/// partition with gaps).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Gaps kept waiting for a check at most; past it, a check is due at once.
pub const MAX_PENDING: usize = 1024;

/// Offsets `from..to` of a partition that no record was read for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub partition: i32,
    pub from: i64,
    pub to: i64,
}

/// What one record's offset says about the records before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jump {
    /// The next offset, or the first record since the partition was assigned.
    None,
    /// Offsets were passed over: kept as a [`Gap`] for the next check.
    Gap,
    /// The offset is this far below the next one expected: the log starts over below the
    /// worker's position.
    Back(u64),
}

/// The next offset expected per held partition, and the gaps not checked yet.
#[derive(Debug)]
pub struct Positions {
    /// Indexed by partition; negative: nothing read since the assignment. A vector, not a map:
    /// this is read for every record.
    next: Vec<i64>,
    pending: Vec<Gap>,
    last_check: Instant,
}

impl Default for Positions {
    fn default() -> Self {
        Positions { next: Vec::new(), pending: Vec::new(), last_check: Instant::now() }
    }
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
            self.pending.push(Gap { partition, from: expected, to: offset });
            Jump::Gap
        }
    }

    /// Forgets `partition` (assigned anew, or revoked): its next record starts over, and its
    /// gaps are dropped (the assignment's own start check covers what comes next).
    pub fn forget(&mut self, partition: i32) {
        if let Some(n) = usize::try_from(partition).ok().and_then(|i| self.next.get_mut(i)) {
            *n = -1;
        }
        self.pending.retain(|g| g.partition != partition);
    }

    /// Whether gaps wait and a check is due at `now`.
    #[inline]
    pub fn due(&self, now: Instant) -> bool {
        !self.pending.is_empty()
            && (self.pending.len() >= MAX_PENDING || now.duration_since(self.last_check) >= CHECK_INTERVAL)
    }

    /// The gaps to check now, by partition; the next check is due [`CHECK_INTERVAL`] after `now`.
    pub fn take(&mut self, now: Instant) -> Vec<Gap> {
        self.last_check = now;
        let mut gaps = std::mem::take(&mut self.pending);
        gaps.sort_by_key(|g| (g.partition, g.from));
        gaps
    }

    /// Puts back gaps whose check failed (the log start could not be read), for the next check;
    /// beyond [`MAX_PENDING`] the oldest are dropped, and their number returned.
    pub fn put_back(&mut self, mut gaps: Vec<Gap>) -> usize {
        gaps.append(&mut self.pending);
        let dropped = gaps.len().saturating_sub(MAX_PENDING);
        gaps.drain(..dropped);
        self.pending = gaps;
        dropped
    }
}

/// How many offsets of `gaps` (of one partition) lie below the partition's log start `low`:
/// records the worker never read that are gone.
pub fn deleted_below(gaps: &[Gap], low: i64) -> u64 {
    gaps.iter().map(|g| (g.to.min(low) - g.from).max(0) as u64).sum()
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
        assert!(!p.due(Instant::now() + CHECK_INTERVAL));
    }

    #[test]
    fn forward_jumps_are_kept_and_checked_once_per_interval() {
        let mut p = Positions::default();
        let t0 = Instant::now();
        p.observe(1, 10);
        assert_eq!(p.observe(1, 12), Jump::Gap, "a commit marker at 11");
        p.observe(2, 500);
        assert_eq!(p.observe(2, 900), Jump::Gap);
        assert_eq!(p.observe(1, 13), Jump::None);
        assert!(p.due(t0 + CHECK_INTERVAL), "gaps wait and the interval passed");
        let gaps = p.take(t0 + CHECK_INTERVAL);
        assert_eq!(gaps, vec![Gap { partition: 1, from: 11, to: 12 }, Gap { partition: 2, from: 501, to: 900 }]);
        assert!(!p.due(t0 + CHECK_INTERVAL * 3), "nothing pending after the check");
        p.observe(1, 20);
        assert!(!p.due(t0 + CHECK_INTERVAL + Duration::from_secs(1)), "once per interval");
        assert!(p.due(t0 + CHECK_INTERVAL * 2));
    }

    #[test]
    fn a_jump_back_is_counted_at_once() {
        let mut p = Positions::default();
        p.observe(0, 1_000);
        assert_eq!(p.observe(0, 40), Jump::Back(961), "the next offset expected was 1,001");
        assert_eq!(p.observe(0, 41), Jump::None);
    }

    #[test]
    fn a_forgotten_partition_starts_over_without_its_gaps() {
        let mut p = Positions::default();
        p.observe(4, 10);
        p.observe(4, 20);
        p.observe(5, 10);
        p.observe(5, 20);
        p.forget(4);
        assert_eq!(p.observe(4, 5), Jump::None, "not a jump back: assigned anew");
        assert_eq!(p.take(Instant::now()), vec![Gap { partition: 5, from: 11, to: 20 }]);
        p.forget(99); // never held: nothing to do
    }

    #[test]
    fn too_many_gaps_make_a_check_due_and_failed_checks_keep_the_newest() {
        let mut p = Positions::default();
        let t0 = Instant::now();
        p.take(t0);
        for i in 0..MAX_PENDING as i64 {
            p.observe(0, 2 * i);
        }
        assert!(!p.due(t0), "one short");
        p.observe(0, 2 * MAX_PENDING as i64);
        assert!(p.due(t0), "full: due before the interval");
        let gaps = p.take(t0);
        assert_eq!(gaps.len(), MAX_PENDING);
        p.observe(0, 2 * MAX_PENDING as i64 + 2);
        assert_eq!(p.put_back(gaps), 1, "the oldest is dropped");
        let kept = p.take(t0);
        assert_eq!(kept.len(), MAX_PENDING);
        assert_eq!(
            kept.last(),
            Some(&Gap { partition: 0, from: 2 * MAX_PENDING as i64 + 1, to: 2 * MAX_PENDING as i64 + 2 })
        );
        assert_eq!(kept[0].from, 3, "the gap 1..2 went");
    }

    #[test]
    fn only_offsets_below_the_log_start_are_deleted() {
        let gaps = [
            Gap { partition: 0, from: 11, to: 12 },
            Gap { partition: 0, from: 100, to: 250 },
            Gap { partition: 0, from: 400, to: 401 },
        ];
        assert_eq!(deleted_below(&gaps, 0), 0, "the log starts before every gap: markers, compaction");
        assert_eq!(deleted_below(&gaps, 11), 0);
        assert_eq!(deleted_below(&gaps, 12), 1);
        assert_eq!(deleted_below(&gaps, 180), 1 + 80, "retention reached into the second gap");
        assert_eq!(deleted_below(&gaps, 250), 1 + 150, "the reset landed on the log start");
        assert_eq!(deleted_below(&gaps, 10_000), 1 + 150 + 1);
    }
}
