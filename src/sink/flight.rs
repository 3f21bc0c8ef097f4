//! A batch's encoded rows on their way to ClickHouse, owned — they borrow nothing from the Kafka
//! messages — so that batch N's insert runs on a writer thread while batch N+1 is gathered and
//! staged (docs/exactly-once.md, "The loop").
//!
//! Every row starts with its dedupe key, `org_id, project_id, event_id` as RowBinary `String`s
//! ([`crate::sink::EVENTS_COLUMNS`]), so the keys needed to re-check a failed attempt are read
//! back from the rows themselves.

use std::ops::Range;

use crate::dedupe::EventKey;
use crate::sink::rowbinary::{RowReader, RowWriter};

/// What the flight keeps of a row besides its bytes: its partition (for revocations) and what its
/// group's carrier needs ([`crate::sink::carrier`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct RowMeta<'a> {
    /// The row's source partition.
    pub partition: i32,
    /// Rows with equal `group` must have equal (org_id, project_id, hour): they are summed into
    /// one carrier. (Rows of one (org, project, hour) may be in several groups.)
    pub group: u64,
    /// The row's `meters`/`meter_values` as (index into the flight's meter names, value).
    pub additive: &'a [(u16, u64)],
    /// The row's `unique_meters`/`unique_hashes` as (index into the meter names, hash).
    pub unique: &'a [(u16, u64)],
}

/// One row: its bytes in `buf`, its partition and group, its ranges in the meter arrays.
#[derive(Debug, Clone)]
struct Row {
    bytes: Range<usize>,
    partition: i32,
    group: u64,
    additive: Range<u32>,
    unique: Range<u32>,
}

/// RowBinary rows of `events` and, per row, its byte range, source partition and what its
/// group's carrier needs.
#[derive(Debug, Default)]
pub struct Flight {
    /// The rows, one after the other, without their carrier columns ([`Flight::body`] adds them).
    pub buf: Vec<u8>,
    rows: Vec<Row>,
    additive: Vec<(u16, u64)>,
    unique: Vec<(u16, u64)>,
    /// Meter names, indexed by the `u16`s of the meter arrays.
    names: Vec<String>,
}

impl Flight {
    /// Encodes rows with `encode`, which appends one whole row per call of its `row` callback
    /// (`row(w, meta)` is called after the row's bytes are written; `meta`'s meter indices index
    /// `names`). `capacity` is (rows, bytes) expected: the buffers are sized for it up front, as
    /// growing a batch's megabytes by doubling copies them again and again (benches/pipeline.rs).
    pub fn encode(
        names: Vec<String>,
        capacity: (usize, usize),
        encode: impl FnOnce(&mut RowWriter, &mut dyn FnMut(&RowWriter, RowMeta<'_>)),
    ) -> Flight {
        let mut w = RowWriter { buf: Vec::with_capacity(capacity.1) };
        let (mut rows, mut additive, mut unique) =
            (Vec::with_capacity(capacity.0), Vec::with_capacity(capacity.0), Vec::with_capacity(capacity.0));
        let mut start = 0;
        encode(&mut w, &mut |w: &RowWriter, m: RowMeta<'_>| {
            let a = additive.len() as u32..(additive.len() + m.additive.len()) as u32;
            let u = unique.len() as u32..(unique.len() + m.unique.len()) as u32;
            additive.extend_from_slice(m.additive);
            unique.extend_from_slice(m.unique);
            rows.push(Row {
                bytes: start..w.buf.len(),
                partition: m.partition,
                group: m.group,
                additive: a,
                unique: u,
            });
            start = w.buf.len();
        });
        Flight { buf: w.buf, rows, additive, unique, names }
    }

    /// The body of the attempt's `INSERT … FORMAT RowBinary` request: every row left to write,
    /// each followed by its carrier columns, computed from exactly these rows
    /// ([`crate::sink::carrier`]; columns [`crate::sink::EVENTS_COLUMNS`] then
    /// [`crate::sink::carrier::CARRIER_COLUMNS`]).
    pub fn body(&self) -> Vec<u8> {
        let rows: Vec<(Range<usize>, RowMeta<'_>)> = self
            .rows
            .iter()
            .map(|r| {
                let meta = RowMeta {
                    partition: r.partition,
                    group: r.group,
                    additive: &self.additive[r.additive.start as usize..r.additive.end as usize],
                    unique: &self.unique[r.unique.start as usize..r.unique.end as usize],
                };
                (r.bytes.clone(), meta)
            })
            .collect();
        super::carrier::with_carriers(&self.buf, &rows, &self.names)
    }

    /// Rows left to write.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The dedupe key (org, project, event id) of every row, in row order.
    pub fn keys(&self) -> Vec<(&str, &str, &str)> {
        self.rows.iter().map(|r| key_of(&self.buf[r.bytes.clone()])).collect()
    }

    /// Keeps the rows for which `keep(partition, key)` holds; returns how many were removed.
    pub fn retain(&mut self, mut keep: impl FnMut(i32, EventKey) -> bool) -> usize {
        let before = self.rows.len();
        let mut buf = Vec::with_capacity(self.buf.len());
        let mut rows = Vec::with_capacity(self.rows.len());
        for r in &self.rows {
            let row = &self.buf[r.bytes.clone()];
            let (o, pr, id) = key_of(row);
            if keep(r.partition, EventKey::new(o, pr, id)) {
                rows.push(Row { bytes: buf.len()..buf.len() + row.len(), ..r.clone() });
                buf.extend_from_slice(row);
            }
        }
        self.buf = buf;
        self.rows = rows;
        before - self.rows.len()
    }

    /// Keeps the rows of the partitions for which `owned` holds.
    pub fn retain_partitions(&mut self, owned: impl Fn(i32) -> bool) -> usize {
        if self.rows.iter().all(|r| owned(r.partition)) {
            return 0;
        }
        self.retain(|p, _| owned(p))
    }
}

/// The first three RowBinary strings of a row written by this process (valid UTF-8 by
/// construction: they were `&str`s).
fn key_of(row: &[u8]) -> (&str, &str, &str) {
    let mut r = RowReader::new(row);
    let mut s = || std::str::from_utf8(r.string().expect("a row starts with its key")).expect("keys are UTF-8");
    (s(), s(), s())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flight(rows: &[(&str, &str, &str, i32)]) -> Flight {
        Flight::encode(Vec::new(), (0, 0), |w, row| {
            for (o, p, id, part) in rows {
                w.string(o);
                w.string(p);
                w.string(id);
                w.u64(7);
                row(w, RowMeta { partition: *part, ..Default::default() });
            }
        })
    }

    #[test]
    fn keys_are_read_back_and_rows_dropped_whole() {
        let long = "é".repeat(200); // a length prefix of two varint bytes
        let mut f = flight(&[("o1", "p1", "a", 0), ("o1", "p2", &long, 1), ("o2", "p1", "c", 0)]);
        assert_eq!(f.keys(), vec![("o1", "p1", "a"), ("o1", "p2", long.as_str()), ("o2", "p1", "c")]);
        let landed = EventKey::new("o1", "p1", "a");
        assert_eq!(f.retain(|_, k| k != landed), 1);
        assert_eq!(f.keys(), vec![("o1", "p2", long.as_str()), ("o2", "p1", "c")]);
        assert_eq!(f.buf, flight(&[("o1", "p2", &long, 1), ("o2", "p1", "c", 0)]).buf);
        assert_eq!(f.retain_partitions(|p| p == 1), 1);
        assert_eq!(f.keys(), vec![("o1", "p2", long.as_str())]);
        assert_eq!(f.retain_partitions(|_| false), 1);
        assert!(f.is_empty() && f.buf.is_empty());
    }
}
