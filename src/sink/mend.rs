//! Mending the aggregates of rows that landed without an answer.
//!
//! ClickHouse writes a table and its materialized views' targets as separate parts, in every
//! version: a server killed between them leaves narrow rows in `events` whose contributions to
//! `usage_hourly_agg`, `usage_unique_hourly` or `usage_unique_daily` are missing. The narrow rows
//! stop the events from being written again (they are duplicates now), so the gap would stay.
//!
//! Such rows are always *unconfirmed*: their INSERT never answered 200 (an answered INSERT ran its
//! views), so their offsets were never committed. Whoever decides about those messages next — the
//! worker retrying the failed attempt, or the partition's next owner loading its state — first
//! calls [`EventStore::mend_aggregates`](super::EventStore::mend_aggregates) for the partition from
//! the first offset it will re-decide. That:
//!
//! 1. merges the unique-meter sketches of those rows into the hourly and daily tables again (a
//!    sketch is a union: hashes already there change nothing);
//! 2. compares, for every (org, project, hour) those rows fall in, the additive aggregate with the
//!    ledger's exact sum (`events FINAL`) and inserts each shortfall as one more row of the
//!    SummingMergeTree.
//!
//! Both steps are idempotent: run again (after a crash in the middle of them), step 1 adds
//! nothing and step 2 finds no shortfall. The comparison is exact because nobody else writes those
//! (org, project) hours meanwhile: a project's messages are on one partition (keyed by project id,
//! docs/exactly-once.md "Limits"), the partition has one owner, and that owner has no INSERT of it
//! in flight while it mends. An aggregate *above* the ledger is not something a crash can cause; it
//! is reported (error log, `tally_aggregates_over_ledger_total`), never "mended" downwards.

use crate::invoice::sql::{num, render, rows};

use super::clickhouse::{quote, ChError, ClickHouse};
use super::rowbinary::RowWriter;

const TOUCHED: &str = include_str!("../../sql/ingest/mend_touched.sql");
const ADDITIVE: &str = include_str!("../../sql/ingest/mend_additive.sql");
const UNIQUE_HOURLY: &str = include_str!("../../sql/ingest/mend_unique_hourly.sql");
const UNIQUE_DAILY: &str = include_str!("../../sql/ingest/mend_unique_daily.sql");

/// What a mend found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Mended {
    /// Unconfirmed rows found (0: nothing to mend, and nothing was written).
    pub rows: u64,
    /// (org, project, meter, hour) additive aggregates that were short, and by how much in all.
    pub short: u64,
    pub added: u128,
    /// (org, project, meter, hour) additive aggregates above the ledger, described (left as they
    /// are: a crash cannot cause them; `tally-invoicer verify` reports them too).
    pub over: Vec<String>,
}

/// Mends the aggregates of `topic`/`partition`'s rows at `offsets` (see the module
/// documentation). `horizon` (Unix seconds) bounds the event times read, as the dedupe state load
/// does: every accepted event is younger. Errors: any ClickHouse error (retry: every step is
/// idempotent).
pub fn mend_aggregates(
    ch: &ClickHouse,
    topic: &str,
    partition: i32,
    offsets: std::ops::Range<i64>,
    horizon: i64,
) -> Result<Mended, ChError> {
    let horizon = horizon.max(0);
    let mut vars = vec![
        ("database", ch.database().to_string()),
        ("topic", quote(topic)),
        ("partition", partition.to_string()),
        ("from_offset", offsets.start.max(0).to_string()),
        ("to_offset", offsets.end.max(0).to_string()),
        ("horizon_hour", (horizon - horizon % 3600).to_string()),
    ];
    let touched = render(TOUCHED, &vars);
    let count = rows(ch, &format!("SELECT count() FROM ({touched})"))?;
    let n: u64 = num(count.first().and_then(|r| r.first()).map(String::as_str).unwrap_or("0"))?;
    let mut out = Mended { rows: n, ..Mended::default() };
    if n == 0 {
        return Ok(out);
    }
    ch.execute(&render(UNIQUE_HOURLY, &vars), true)?;
    ch.execute(&render(UNIQUE_DAILY, &vars), true)?;
    vars.push(("touched", touched));
    let mut w = RowWriter::default();
    for r in rows(ch, &render(ADDITIVE, &vars))? {
        if r.len() != 6 {
            return Err(ChError::Response(format!("mend: expected 6 columns, got {r:?}")));
        }
        let (hour, truth, have): (u32, u64, u64) = (num(&r[3])?, num(&r[4])?, num(&r[5])?);
        if truth > have {
            w.string(&r[0]);
            w.string(&r[1]);
            w.string(&r[2]);
            w.u32(hour);
            w.u64(truth - have);
            out.short += 1;
            out.added += u128::from(truth - have);
        } else {
            out.over.push(format!("{}/{}/{} at {hour}: aggregate {have}, ledger {truth}", r[0], r[1], r[2]));
        }
    }
    if out.short > 0 {
        ch.insert(
            &format!(
                "INSERT INTO {}.usage_hourly_agg (org_id, project_id, meter, hour, value) FORMAT RowBinary",
                ch.database()
            ),
            &w.buf,
        )?;
    }
    Ok(out)
}
