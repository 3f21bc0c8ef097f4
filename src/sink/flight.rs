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

/// RowBinary rows of `events` and, per row, its byte range and source partition.
#[derive(Debug, Default)]
pub struct Flight {
    /// The rows, one after the other, without their carrier columns ([`Flight::body`] adds them).
    pub buf: Vec<u8>,
    rows: Vec<(Range<usize>, i32)>,
}

impl Flight {
    /// Encodes rows with `encode`, which appends one whole row per call of its `row` callback
    /// (`row(partition)` is called after the row's bytes are written).
    pub fn encode(encode: impl FnOnce(&mut RowWriter, &mut dyn FnMut(&RowWriter, i32))) -> Flight {
        let mut w = RowWriter::default();
        let mut rows = Vec::new();
        let mut start = 0;
        encode(&mut w, &mut |w: &RowWriter, partition: i32| {
            rows.push((start..w.buf.len(), partition));
            start = w.buf.len();
        });
        Flight { buf: w.buf, rows }
    }

    /// The body of the attempt's `INSERT … FORMAT RowBinary` request: every row left to write,
    /// each followed by its carrier columns, computed from exactly these rows
    /// ([`crate::sink::carrier`]; columns [`crate::sink::EVENTS_COLUMNS`] then
    /// [`crate::sink::carrier::CARRIER_COLUMNS`]).
    pub fn body(&self) -> Vec<u8> {
        super::carrier::with_carriers(&self.buf, self.rows.iter().map(|(r, _)| r.clone()))
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
        self.rows.iter().map(|(r, _)| key_of(&self.buf[r.clone()])).collect()
    }

    /// Keeps the rows for which `keep(partition, key)` holds; returns how many were removed.
    pub fn retain(&mut self, mut keep: impl FnMut(i32, EventKey) -> bool) -> usize {
        let before = self.rows.len();
        let mut buf = Vec::with_capacity(self.buf.len());
        let mut rows = Vec::with_capacity(self.rows.len());
        for (r, p) in &self.rows {
            let row = &self.buf[r.clone()];
            let (o, pr, id) = key_of(row);
            if keep(*p, EventKey::new(o, pr, id)) {
                rows.push((buf.len()..buf.len() + row.len(), *p));
                buf.extend_from_slice(row);
            }
        }
        self.buf = buf;
        self.rows = rows;
        before - self.rows.len()
    }

    /// Keeps the rows of the partitions for which `owned` holds.
    pub fn retain_partitions(&mut self, owned: impl Fn(i32) -> bool) -> usize {
        if self.rows.iter().all(|(_, p)| owned(*p)) {
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
        Flight::encode(|w, row| {
            for (o, p, id, part) in rows {
                w.string(o);
                w.string(p);
                w.string(id);
                w.u64(7);
                row(w, *part);
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
