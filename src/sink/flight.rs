//! A batch's encoded rows on their way to ClickHouse, owned — they borrow nothing from the Kafka
//! messages — so that batch N's insert runs on a writer thread while batch N+1 is gathered and
//! staged (docs/exactly-once.md, "The loop").
//!
//! Every row starts with its dedupe key, `org_id, project_id, event_id` as RowBinary `String`s
//! ([`crate::sink::EVENTS_COLUMNS`]), so the keys needed to re-check a failed attempt are read
//! back from the rows themselves.

use std::io::Read;
use std::ops::Range;

use crate::dedupe::EventKey;
use crate::sink::carrier::{self, Carriers};
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

/// What a [`Flight`] is sized for up front ([`Flight::encode`]): its rows, their bytes (near
/// enough), and their additive and unique meter entries.
#[derive(Debug, Clone, Copy, Default)]
pub struct Capacity {
    pub rows: usize,
    pub bytes: usize,
    pub additive: usize,
    pub unique: usize,
}

/// RowBinary rows of `events` and, per row, its byte range, source partition and what its
/// group's carrier needs.
#[derive(Debug, Default)]
pub struct Flight {
    /// The rows, one after the other, each ending in the carrier columns of a row counted by its
    /// group's carrier ([`Carriers::COUNTED`]); [`Flight::body`] puts each group's carrier in its
    /// last row's place.
    pub buf: Vec<u8>,
    rows: Vec<Row>,
    additive: Vec<(u16, u64)>,
    unique: Vec<(u16, u64)>,
    /// Meter names, indexed by the `u16`s of the meter arrays.
    names: Vec<String>,
}

impl Flight {
    /// Encodes rows with `encode`, which appends one whole row per call of its `row` callback
    /// (`row(w, meta)` is called after the row's bytes in the [`crate::sink::EVENTS_COLUMNS`]
    /// layout are written, and appends the carrier columns; `meta`'s meter indices index `names`).
    /// `capacity` is what the rows are expected to hold: the buffers are sized for it up front, as
    /// growing a batch's megabytes by doubling copies them again and again and touches fresh
    /// pages (benches/pipeline.rs).
    pub fn encode(
        names: Vec<String>,
        capacity: Capacity,
        encode: impl FnOnce(&mut RowWriter, &mut dyn FnMut(&mut RowWriter, RowMeta<'_>)),
    ) -> Flight {
        let mut w = RowWriter { buf: Vec::with_capacity(capacity.bytes) };
        let (mut rows, mut additive, mut unique) = (
            Vec::with_capacity(capacity.rows),
            Vec::with_capacity(capacity.additive),
            Vec::with_capacity(capacity.unique),
        );
        let mut start = 0;
        encode(&mut w, &mut |w: &mut RowWriter, m: RowMeta<'_>| {
            w.buf.extend_from_slice(Carriers::COUNTED);
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
    /// [`crate::sink::carrier::CARRIER_COLUMNS`]). Read, not built: the rows are not copied into
    /// a second buffer of the batch's size ([`Body`]).
    pub fn body(&self) -> Body<'_> {
        let carriers = carrier::carriers(self.rows.iter().map(|r| self.meta(r)), &self.names);
        let len = self.buf.len() + carriers.bytes.len() - carriers.rows.len() * Carriers::COUNTED.len();
        Body { flight: self, carriers, len, at: 0, carrier: 0, in_carrier: 0 }
    }

    fn meta(&self, r: &Row) -> RowMeta<'_> {
        RowMeta {
            partition: r.partition,
            group: r.group,
            additive: &self.additive[r.additive.start as usize..r.additive.end as usize],
            unique: &self.unique[r.unique.start as usize..r.unique.end as usize],
        }
    }

    /// Rows left to write.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The source partitions of the rows left to write, ascending, each once.
    pub fn partitions(&self) -> Vec<i32> {
        let mut ps: Vec<i32> = self.rows.iter().map(|r| r.partition).collect();
        ps.sort_unstable();
        ps.dedup();
        ps
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

/// An INSERT attempt's request body, read in order: the flight's rows as they are in its buffer,
/// except that each group's last row ends in the group's carrier columns ([`Carriers`]) instead
/// of [`Carriers::COUNTED`]. It is read in runs of whole rows between carriers, copied once into
/// the HTTP client's buffer, where a body built whole copied every row into a fresh buffer of the
/// batch's size first (docs/measurements.md, "The INSERT body").
#[derive(Debug)]
pub struct Body<'f> {
    flight: &'f Flight,
    carriers: Carriers,
    len: usize,
    /// Where reading is: the offset in the flight's buffer, the next carrier (of
    /// `carriers.rows`) and how much of it was read.
    at: usize,
    carrier: usize,
    in_carrier: usize,
}

impl Body<'_> {
    /// Bytes in the whole body (its `Content-Length`), however much was read.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The rest of the body as one buffer (for tests and tools).
    pub fn into_vec(mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        self.read_to_end(&mut out).expect("reading memory cannot fail");
        out
    }
}

impl Read for Body<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let (buf, rows) = (&self.flight.buf, &self.flight.rows);
        let mut n = 0;
        while n < out.len() {
            // The rows up to the next carrier's place (the end of its row, less the columns of a
            // counted row), then the carrier.
            let next = self.carriers.rows.get(self.carrier);
            let until = next.map_or(buf.len(), |(row, _)| rows[*row].bytes.end - Carriers::COUNTED.len());
            let from = match next {
                _ if self.at < until => &buf[self.at..until],
                Some((_, range)) => &self.carriers.bytes[range.start + self.in_carrier..range.end],
                None => break,
            };
            let take = from.len().min(out.len() - n);
            out[n..n + take].copy_from_slice(&from[..take]);
            n += take;
            if self.at < until {
                self.at += take;
            } else {
                self.in_carrier += take;
                if take == from.len() {
                    // The carrier is read: go on after its row.
                    (self.at, self.carrier, self.in_carrier) = (until + Carriers::COUNTED.len(), self.carrier + 1, 0);
                }
            }
        }
        Ok(n)
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
        Flight::encode(Vec::new(), Capacity::default(), |w, row| {
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
        assert_eq!(f.partitions(), vec![0, 1]);
        let landed = EventKey::new("o1", "p1", "a");
        assert_eq!(f.retain(|_, k| k != landed), 1);
        assert_eq!(f.keys(), vec![("o1", "p2", long.as_str()), ("o2", "p1", "c")]);
        assert_eq!(f.buf, flight(&[("o1", "p2", &long, 1), ("o2", "p1", "c", 0)]).buf);
        assert_eq!(f.retain_partitions(|p| p == 1), 1);
        assert_eq!(f.keys(), vec![("o1", "p2", long.as_str())]);
        assert_eq!(f.partitions(), vec![1], "an attempt names only the partitions of the rows it still sends");
        assert_eq!(f.retain_partitions(|_| false), 1);
        assert!(f.is_empty() && f.buf.is_empty());
        assert!(f.body().is_empty() && f.body().into_vec().is_empty());
    }

    /// The body read in pieces of any size is the flight's rows with each group's last row
    /// ending in the group's carrier, every other row in the columns of a counted row.
    #[test]
    fn the_body_is_the_rows_with_each_groups_carrier_in_its_last_row() {
        let names = vec!["tokens".to_string(), "users".to_string()];
        // (group, tokens, user hash): groups interleaved, one of them a single row.
        let rows: Vec<(u64, u64, u64)> = vec![(1, 5, 9), (2, 7, 9), (1, 11, 8), (3, 1, 9), (2, 2, 9), (1, 4, 9)];
        // Per row: its one (meter, value) sum entry and its one (meter, hash) unique entry.
        type Entries = [(u16, u64); 1];
        let metas: Vec<(Entries, Entries)> = rows.iter().map(|&(_, v, h)| ([(0, v)], [(1, h)])).collect();
        let f = Flight::encode(names.clone(), Capacity::default(), |w, row| {
            for (i, (&(g, _, _), (add, uniq))) in rows.iter().zip(&metas).enumerate() {
                w.string("o");
                w.string("p");
                w.string(&format!("event-{i}-{}", "x".repeat(i * 40)));
                row(w, RowMeta { partition: 0, group: g, additive: add, unique: uniq });
            }
        });
        let carriers = carrier::carriers(
            rows.iter().zip(&metas).map(|(&(g, _, _), (a, u))| RowMeta {
                partition: 0,
                group: g,
                additive: a,
                unique: u,
            }),
            &names,
        );
        assert_eq!(carriers.rows.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![3, 4, 5], "each group's last row");
        let mut want = Vec::new();
        for (i, r) in f.rows.iter().enumerate() {
            let row = &f.buf[r.bytes.clone()];
            assert!(row.ends_with(Carriers::COUNTED));
            want.extend_from_slice(&row[..row.len() - Carriers::COUNTED.len()]);
            match carriers.rows.iter().find(|(last, _)| *last == i) {
                Some((_, range)) => want.extend_from_slice(&carriers.bytes[range.clone()]),
                None => want.extend_from_slice(Carriers::COUNTED),
            }
        }
        assert_eq!(f.body().len(), want.len());
        assert_eq!(f.body().into_vec(), want);
        for piece in [1, 2, 5, 6, 7, 64, 1 << 16] {
            let mut body = f.body();
            let (mut got, mut buf) = (Vec::new(), vec![0u8; piece]);
            loop {
                let n = body.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                assert!(n == piece || got.len() + n == want.len(), "a read fills its buffer until the end");
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, want, "read {piece} bytes at a time");
        }
    }
}
