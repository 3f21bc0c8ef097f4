//! Carrier rows: the worker sums each INSERT's hourly aggregates itself, and ClickHouse's
//! materialized views add a few hundred pre-summed rows per INSERT instead of `ARRAY JOIN`-ing
//! every event's meters (issue 9; the argument is docs/exactly-once.md, "Carrier rows").
//!
//! Within one INSERT attempt, the rows of each *group* — one (org_id, project_id, hour) — are
//! summed: each additive meter's values (wrapping at 2^64, as ClickHouse's `sum` does in the
//! views), and the distinct (unique meter, user hash) pairs. The result rides on the group's
//! **last row** in the attempt, the carrier, in five more columns of `events`
//! ([`CARRIER_COLUMNS`]):
//!
//! | `agg_kind` | the row | what the views read |
//! |---|---|---|
//! | 0 ([`SELF_COUNTED`]) | written without carriers (an older worker, a tool, a test) | its own `meters` and `unique_meters` |
//! | 1 ([`COUNTED_BY_CARRIER`]) | counted by its group's carrier | nothing (its `agg_*` arrays are empty) |
//! | 2 ([`CARRIER`]) | the carrier | its `agg_*` arrays: the group's sums and pairs |
//!
//! The per-event columns (`meters`, `meter_values`, `unique_meters`, `unique_hashes`) keep their
//! meaning on every row: the ledger, `tally-invoicer verify`, `explain --events` and the mend
//! read them, never the `agg_*` arrays.
//!
//! The carriers are computed from the attempt's rows as they are sent, never kept from an earlier
//! attempt: after a failed attempt, the rows that landed are dropped and this runs again over the
//! rows that remain ([`crate::sink::flight::Flight::body`]).

use std::collections::HashMap;
use std::ops::Range;

use super::rowbinary::{RowReader, RowWriter, Truncated};

/// The carrier columns of `events`, after [`super::EVENTS_COLUMNS`] in every row tally writes.
pub const CARRIER_COLUMNS: &str = "agg_kind, agg_meters, agg_values, agg_unique_meters, agg_unique_hashes";

/// `agg_kind` of a row that counts itself in the views (the column's default).
pub const SELF_COUNTED: u8 = 0;
/// `agg_kind` of a row counted by its group's carrier.
pub const COUNTED_BY_CARRIER: u8 = 1;
/// `agg_kind` of a carrier: its `agg_*` arrays hold its group's sums and distinct pairs.
pub const CARRIER: u8 = 2;

/// What one row contributes to the aggregates, read back from its RowBinary bytes (the layout of
/// [`super::EVENTS_COLUMNS`], written by [`crate::pipeline::Staged::flight`]).
struct Contribution<'a> {
    org: &'a [u8],
    project: &'a [u8],
    hour: u32,
    /// The rest of the row from `meters` on: (meters, values, unique meters, hashes).
    arrays: RowReader<'a>,
}

impl<'a> Contribution<'a> {
    fn read(row: &'a [u8]) -> Contribution<'a> {
        let mut r = RowReader::new(row);
        let mut read = || -> Result<Contribution<'a>, Truncated> {
            let org = r.string()?;
            let project = r.string()?;
            r.string()?; // event_id
            r.string()?; // type
            r.u32()?; // ts
            let hour = r.u32()?;
            r.u64()?; // key_hash
            Ok(Contribution { org, project, hour, arrays: RowReader::new(r.rest()) })
        };
        read().expect(LAYOUT)
    }
}

/// One group's sums: (meter name, value) pairs in first-seen order, and its distinct
/// (unique meter name, hash) pairs.
#[derive(Default)]
struct Group<'a> {
    sums: Vec<(&'a [u8], u64)>,
    pairs: Vec<(&'a [u8], u64)>,
    last_row: usize,
}

const LAYOUT: &str = "rows are written by this process in the EVENTS_COLUMNS layout";

impl<'a> Group<'a> {
    /// Adds one row's arrays (`meters`, `meter_values`, `unique_meters`, `unique_hashes`).
    fn add(&mut self, mut a: RowReader<'a>, names: &mut Vec<&'a [u8]>) -> Result<(), Truncated> {
        names.clear();
        for _ in 0..a.varint()? {
            names.push(a.string()?);
        }
        a.varint()?;
        for name in names.drain(..) {
            let v = a.u64()?;
            // Meters are few (configured), so a linear search is the cheap look-up.
            match self.sums.iter_mut().find(|(m, _)| *m == name) {
                Some((_, sum)) => *sum = sum.wrapping_add(v),
                None => self.sums.push((name, v)),
            }
        }
        for _ in 0..a.varint()? {
            names.push(a.string()?);
        }
        a.varint()?;
        for name in names.drain(..) {
            self.pairs.push((name, a.u64()?));
        }
        Ok(())
    }
}

/// Writes `rows` of `buf` (each a whole row in the [`super::EVENTS_COLUMNS`] layout) followed by
/// its carrier columns ([`CARRIER_COLUMNS`]): the request body of one INSERT attempt.
pub fn with_carriers<I>(buf: &[u8], rows: I) -> Vec<u8>
where
    I: ExactSizeIterator<Item = Range<usize>> + Clone,
{
    let mut index: HashMap<(&[u8], &[u8], u32), u32> = HashMap::new();
    let mut groups: Vec<Group<'_>> = Vec::new();
    let mut names: Vec<&[u8]> = Vec::new();
    let count = rows.len();
    for (i, r) in rows.clone().enumerate() {
        let c = Contribution::read(&buf[r]);
        let g = *index.entry((c.org, c.project, c.hour)).or_insert_with(|| {
            groups.push(Group::default());
            (groups.len() - 1) as u32
        });
        let group = &mut groups[g as usize];
        group.last_row = i;
        group.add(c.arrays, &mut names).expect(LAYOUT);
    }
    let mut carrier_of: Vec<Option<u32>> = vec![None; count];
    for (g, group) in groups.iter_mut().enumerate() {
        carrier_of[group.last_row] = Some(g as u32);
        group.sums.sort_unstable();
        group.pairs.sort_unstable();
        group.pairs.dedup();
    }
    let mut w = RowWriter { buf: Vec::with_capacity(buf.len() + count * 5 + groups.len() * 64) };
    for (r, carrier) in rows.zip(carrier_of) {
        w.buf.extend_from_slice(&buf[r]);
        match carrier {
            None => w.buf.extend_from_slice(&[COUNTED_BY_CARRIER, 0, 0, 0, 0]),
            Some(g) => {
                let g = &groups[g as usize];
                w.buf.push(CARRIER);
                w.varint(g.sums.len() as u64);
                for (m, _) in &g.sums {
                    w.bytes(m);
                }
                w.varint(g.sums.len() as u64);
                for (_, v) in &g.sums {
                    w.u64(*v);
                }
                w.varint(g.pairs.len() as u64);
                for (m, _) in &g.pairs {
                    w.bytes(m);
                }
                w.varint(g.pairs.len() as u64);
                for (_, h) in &g.pairs {
                    w.u64(*h);
                }
            }
        }
    }
    w.buf
}
