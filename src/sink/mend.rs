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
//! steps through a [`Mend`] ([`EventStore::mend_step`](super::EventStore::mend_step)) for the partition from
//! the first offset it will re-decide. That:
//!
//! 1. merges the unique-meter sketches of those rows into the hourly and daily tables again (a
//!    sketch is a union: hashes already there change nothing);
//! 2. compares, for every (org, project, hour) those rows fall in, the additive aggregate with the
//!    ledger's exact sum (`events FINAL`) and inserts each shortfall as one more row of the
//!    SummingMergeTree.
//!
//! Both steps are idempotent: run again (after a crash in the middle of them), step 1 adds
//! nothing and step 2 finds no shortfall. Step 2's INSERT is the one request that is not: a copy of
//! it that reached the server late — after its client timed out and the mend read the shortfall
//! again — would add the shortfall twice. So it is fenced like an INSERT of events (docs/exactly-once.md,
//! "Zombie writers"): the shortfall goes into a Memory staging table named for the partition
//! ([`super::stage::stage_name`]), then `INSERT … SELECT` into `usage_hourly_agg`, then `DROP`; and
//! every mend that finds rows first drops every staging table that may hold the partition's rows
//! ([`super::EventStore::fence_partitions`]), as the partition's next owner does before its load.
//! Once that `DROP` has returned, an earlier correction has landed whole or never will.
//!
//! A mend is a [`Mend`], run one step at a time ([`Mend::step`]): the worker serves the consumer
//! group before each step and stops when the partition is no longer its own. A step is one
//! request, except the fence: one listing, then one `DROP` per staging table found (docs/exactly-once.md,
//! "Zombie writers": how long a worker may go without a poll). The comparison is exact because nobody else writes those
//! (org, project) hours meanwhile: a project's messages are on one partition (keyed by project id,
//! docs/exactly-once.md "Limits"), the partition has one owner, and that owner has no INSERT of it
//! in flight while it mends. An aggregate *above* the ledger is not something a crash can cause; it
//! is reported (error log, `tally_aggregates_over_ledger_total`), never "mended" downwards.

use crate::invoice::sql::{num, render, rows};

use super::clickhouse::{quote, ChError, ClickHouse};
use super::rowbinary::RowWriter;
use super::stage::stage_name;
use super::{fenced_or, move_query_id, move_whole, EventStore};

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
    /// Staging tables dropped before the shortfall was read: those that may hold the partition's
    /// rows — earlier corrections or INSERT attempts that failed on the client's side, of this
    /// worker or another — and any without a partition list (an older version's, or one listing
    /// too many partitions).
    pub fenced: usize,
}

/// A mend of `topic`/`partition`'s rows at some offsets (see the module documentation), as a
/// sequence of single ClickHouse requests; [`Mend::step`] makes the next one.
#[derive(Debug)]
pub struct Mend {
    topic: String,
    partition: i32,
    vars: Vec<(&'static str, String)>,
    next: Next,
    out: Mended,
    /// The correction's rows (RowBinary of `usage_hourly_agg`'s columns) and its staging table.
    correction: Vec<u8>,
    stage: String,
}

/// The request a [`Mend`] makes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Count,
    Fence,
    UniqueHourly,
    UniqueDaily,
    Additive,
    Create,
    Fill,
    Move,
    Drop,
}

/// What [`Mend::step`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// One request made; more to come.
    More,
    /// The mend is complete.
    Done(Mended),
}

impl Mend {
    /// A mend of `topic`/`partition`'s rows at `offsets`. `horizon` (Unix seconds) bounds the
    /// event times read, as the dedupe state load does: every accepted event is younger.
    pub fn new(topic: &str, partition: i32, offsets: std::ops::Range<i64>, horizon: i64) -> Self {
        let horizon = horizon.max(0);
        Mend {
            topic: topic.to_string(),
            partition,
            vars: vec![
                ("topic", quote(topic)),
                ("partition", partition.to_string()),
                ("from_offset", offsets.start.max(0).to_string()),
                ("to_offset", offsets.end.max(0).to_string()),
                ("horizon_hour", (horizon - horizon % 3600).to_string()),
            ],
            next: Next::Count,
            out: Mended::default(),
            correction: Vec::new(),
            stage: String::new(),
        }
    }

    /// The queries' variables in `database`, `touched` (the rows' (org, project, hour)) last.
    fn vars(&self, database: &str) -> Vec<(&'static str, String)> {
        let mut vars = self.vars.clone();
        vars.push(("database", database.to_string()));
        let touched = render(TOUCHED, &vars);
        vars.push(("touched", touched));
        vars
    }

    /// Whether the next step adds the correction to `usage_hourly_agg` (its `INSERT … SELECT`).
    pub fn adds_next(&self) -> bool {
        self.next == Next::Move
    }

    /// Makes the next request. Errors: any ClickHouse error; the mend is then abandoned, and a new
    /// [`Mend`] of the same rows starts over (every step before the correction is idempotent, and
    /// the new mend fences the correction staged by this one before it reads the shortfall).
    pub fn step(&mut self, ch: &ClickHouse) -> Result<Step, ChError> {
        let vars = self.vars(ch.database());
        match self.next {
            Next::Count => {
                let touched = &vars.last().expect("touched is the last variable").1;
                let count = rows(ch, &format!("SELECT count() FROM ({touched})"))?;
                self.out.rows = num(count.first().and_then(|r| r.first()).map(String::as_str).unwrap_or("0"))?;
                if self.out.rows == 0 {
                    return Ok(Step::Done(std::mem::take(&mut self.out)));
                }
                self.next = Next::Fence;
            }
            Next::Fence => {
                self.out.fenced = ch.fence_partitions(&self.topic, &[self.partition])?;
                self.next = Next::UniqueHourly;
            }
            Next::UniqueHourly => {
                ch.execute(&render(UNIQUE_HOURLY, &vars), true)?;
                self.next = Next::UniqueDaily;
            }
            Next::UniqueDaily => {
                ch.execute(&render(UNIQUE_DAILY, &vars), true)?;
                self.next = Next::Additive;
            }
            Next::Additive => {
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
                        self.out.short += 1;
                        self.out.added += u128::from(truth - have);
                    } else {
                        self.out
                            .over
                            .push(format!("{}/{}/{} at {hour}: aggregate {have}, ledger {truth}", r[0], r[1], r[2]));
                    }
                }
                if self.out.short == 0 {
                    return Ok(Step::Done(std::mem::take(&mut self.out)));
                }
                self.correction = w.buf;
                self.next = Next::Create;
            }
            Next::Create => {
                self.stage = stage_name(&self.topic, &[self.partition]);
                ch.execute(&format!("CREATE TABLE {} AS usage_hourly_agg ENGINE = Memory", self.stage), true)?;
                self.next = Next::Fill;
            }
            Next::Fill => {
                ch.insert(
                    &format!("INSERT INTO {} ({CORRECTION_COLUMNS}) FORMAT RowBinary", self.stage),
                    &self.correction,
                )
                .map_err(|e| fenced_or(e, &self.stage))?;
                self.next = Next::Move;
            }
            Next::Move => {
                // Fails unless the staging table still holds every row (emptied by a restart, it
                // must not report the shortfall mended; the next mend reads it again).
                let sql = move_whole("usage_hourly_agg", CORRECTION_COLUMNS, &self.stage, self.out.short as usize);
                // Named, so that a fence finds it running ([`super::wait_for_moves`]).
                let query_id = move_query_id(&self.stage);
                ch.execute_with(&sql, &[("query_id", &query_id)]).map_err(|e| fenced_or(e, &self.stage))?;
                self.next = Next::Drop;
            }
            Next::Drop => {
                // Added. A staging table left behind (this DROP failed) is empty of consequences:
                // its one INSERT … SELECT is done; the next fence of the partition drops it.
                if let Err(e) = ch.drop_stage(&self.stage) {
                    tracing::debug!(error = %e, stage = self.stage, "correction's staging table not dropped; the next fence drops it");
                }
                return Ok(Step::Done(std::mem::take(&mut self.out)));
            }
        }
        Ok(Step::More)
    }

    /// The staging table of this mend's correction, named at the step that creates it (empty
    /// before): to drop when the mend is abandoned (the partition is no longer the caller's).
    pub fn stage(&self) -> &str {
        &self.stage
    }
}

/// The columns of a correction, as `usage_hourly_agg` names them.
const CORRECTION_COLUMNS: &str = "org_id, project_id, meter, hour, value";
