//! Carrier rows: the worker sums each INSERT's hourly aggregates itself, and ClickHouse's
//! materialized views add a few hundred pre-summed rows per INSERT instead of `ARRAY JOIN`-ing
//! every event's meters (issue 9; the argument is docs/exactly-once.md, "Carrier rows").
//!
//! Within one INSERT attempt, the rows of each *group* — one (org_id, project_id, hour) — are
//! summed: each additive meter's values (wrapping at 2^64, as ClickHouse's `sum` does in the
//! views), and the distinct (unique meter, user hash) pairs. The result rides on the group's
//! **last row** in the attempt, the carrier, in three more columns of `events`
//! ([`CARRIER_COLUMNS`]): `agg_meters Array(String)` and `agg_values Array(UInt64)` hold the sums
//! as (meter, value) entries followed by the pairs as (meter, hash) entries, and `agg_additive
//! Int32` says how many entries are sums:
//!
//! | `agg_additive` | the row | what the views read |
//! |---|---|---|
//! | −1 ([`SELF_COUNTED`], the column's default) | written without carriers (an older worker, a tool, a test) | its own `meters` and `unique_meters` |
//! | 0 with empty arrays | counted by its group's carrier | nothing |
//! | n ≥ 0 | the carrier | entries `1..=n` of its `agg_*` arrays as sums, the rest as unique pairs |
//!
//! (Three columns, not five: each stored column costs ClickHouse on every row of every insert;
//! on the same rows, separate arrays for sums and pairs plus a kind column measured +18 % over the
//! plain insert, and this layout +8 %; docs/measurements.md, "Carrier rows".)
//!
//! The per-event columns (`meters`, `meter_values`, `unique_meters`, `unique_hashes`) keep their
//! meaning on every row: the ledger, `tally-invoicer verify`, `explain --events` and the mend
//! read them, never the `agg_*` arrays.
//!
//! The carriers are computed from the attempt's rows as they are sent, never kept from an earlier
//! attempt: after a failed attempt, the rows that landed are dropped and this runs again over the
//! rows that remain ([`crate::sink::flight::Flight::body`]).
//!
//! What a row bills is handed over by the encoder with the row ([`RowMeta`]: meter indices and
//! values, the same ones its `meters` columns were written from), so nothing is parsed back; the
//! rows are grouped in one pass (a hash map from group to its sums, pairs and last row).

use std::collections::HashMap;
use std::ops::Range;

use super::flight::RowMeta;
use super::rowbinary::RowWriter;

/// The carrier columns of `events`, after [`super::EVENTS_COLUMNS`] in every row tally writes.
pub const CARRIER_COLUMNS: &str = "agg_additive, agg_meters, agg_values";

/// `agg_additive` of a row that counts itself in the views (the column's default).
pub const SELF_COUNTED: i32 = -1;

/// Each group's carrier columns for one attempt's rows: the bytes of every carrier, one after
/// the other, and per carrier its row (ascending) and its range in those bytes.
#[derive(Debug, Default)]
pub struct Carriers {
    pub bytes: Vec<u8>,
    pub rows: Vec<(usize, Range<usize>)>,
}

impl Carriers {
    /// The carrier columns of a row counted by its group's carrier: `agg_additive` 0 (Int32,
    /// little endian) and two empty arrays.
    pub const COUNTED: &'static [u8] = &[0, 0, 0, 0, 0, 0];
}

/// Sums `rows` (what each row of one INSERT attempt bills, in row order) per group into the
/// carrier columns ([`CARRIER_COLUMNS`]) of each group's last row. Meter indices index `names`.
/// Sums wrap at 2^64, as ClickHouse's `sum` of `UInt64` does in the views. Every other row keeps
/// the [`Carriers::COUNTED`] columns [`crate::sink::flight::Flight::encode`] ends each row with;
/// [`crate::sink::flight::Body`] puts rows and carriers together as the request body.
pub fn carriers<'m>(rows: impl Iterator<Item = RowMeta<'m>>, names: &[String]) -> Carriers {
    // One pass over the rows: each group's per-meter sums, unique pairs and last row.
    // Groups are found by hashing (consecutive rows mostly share one, and skip the look-up);
    // sorting the rows by group instead cost a third of this function (callgrind,
    // benches/pipeline.rs). A group key is the encoder's tenant number and an hour, at most ~720
    // hours per tenant in the accepted window: foldhash, randomly seeded, is enough for them.
    struct Group {
        sums: Vec<(u16, u64)>,
        pairs: Vec<(u16, u64)>,
        last: usize,
    }
    let mut index: HashMap<u64, usize, foldhash::fast::RandomState> = HashMap::default();
    let mut groups: Vec<Group> = Vec::new();
    let mut current: Option<(u64, usize)> = None;
    for (i, meta) in rows.enumerate() {
        let g = match current {
            Some((key, g)) if key == meta.group => g,
            _ => {
                let n = groups.len();
                let g = *index.entry(meta.group).or_insert(n);
                if g == n {
                    groups.push(Group { sums: Vec::new(), pairs: Vec::new(), last: i });
                }
                current = Some((meta.group, g));
                g
            }
        };
        let group = &mut groups[g];
        for &(m, v) in meta.additive {
            // A group's distinct meters are few (at most the configured meters): a short scan.
            match group.sums.iter_mut().find(|(k, _)| *k == m) {
                Some((_, sum)) => *sum = sum.wrapping_add(v),
                None => group.sums.push((m, v)),
            }
        }
        group.pairs.extend_from_slice(meta.unique);
        group.last = i;
    }
    let mut out = Carriers { bytes: Vec::new(), rows: Vec::with_capacity(groups.len()) };
    let mut w = RowWriter::default();
    for Group { mut sums, mut pairs, last } in groups {
        // The sums in meter order (as the views and the tests expect them).
        sums.sort_unstable_by_key(|&(m, _)| m);
        pairs.sort_unstable();
        pairs.dedup();
        let start = w.buf.len();
        w.i32(sums.len() as i32);
        let n = (sums.len() + pairs.len()) as u64;
        w.varint(n);
        for &(m, _) in sums.iter().chain(&pairs) {
            w.string(&names[m as usize]);
        }
        w.varint(n);
        for &(_, s) in &sums {
            w.u64(s);
        }
        for &(_, h) in &pairs {
            w.u64(h);
        }
        out.rows.push((last, start..w.buf.len()));
    }
    out.rows.sort_unstable_by_key(|(row, _)| *row);
    out.bytes = w.buf;
    out
}
