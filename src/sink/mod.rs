//! The ClickHouse side of ingest: the narrow `events` table is written here, and read back for
//! deduplication. The hourly aggregates follow from it through materialized views.

pub mod carrier;
pub mod clickhouse;
pub mod flight;
pub mod mend;
pub mod retention;
pub mod rowbinary;
pub mod schema;
pub mod stage;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::dedupe::{EventKey, PartitionState};
use carrier::CARRIER_COLUMNS;
use clickhouse::{quote, ChError, ClickHouse};
use flight::{Body, Flight};
use rowbinary::{RowReader, RowWriter};
use stage::{stage_covers, stage_name, stage_prefix, STAGE_PREFIX};

/// Column order of the RowBinary rows produced by [`crate::pipeline`].
pub const EVENTS_COLUMNS: &str = "org_id, project_id, event_id, type, ts, hour, key_hash, meters, meter_values, \
     unique_meters, unique_hashes, src_topic, src_partition, src_offset, batch_index, ingested_at";

/// The dedupe look-up. The keys travel as the external table `keys` (RowBinary, one request per
/// look-up whatever their number or size): they are data, not SQL, so ClickHouse parses nothing
/// per key, `max_query_size` and `max_ast_elements` do not apply, and the `IN` set is matched
/// against the primary key's index. Measured 4.3× faster than literal tuples on a replay
/// (docs/benchmarks.md).
const LOOKUP_BY_TABLE: &str =
    "SELECT org_id, project_id, event_id FROM events WHERE (org_id, project_id, event_id) IN keys FORMAT RowBinary";

/// What the ingest loop needs from storage. [`ClickHouse`] is the real one; tests may fake it.
pub trait EventStore {
    /// Which of `keys` (org, project, id) already have a row.
    fn existing(&self, keys: &[(&str, &str, &str)]) -> Result<HashSet<EventKey>, ChError>;
    /// Feeds every stored key hash of `topic`/`partition` with event time ≥ `from` (Unix
    /// seconds) to `state`. The worker reads from one dedupe window before the state's horizon
    /// (docs/exactly-once.md, "The dedupe authority is ClickHouse, not memory").
    fn load_partition(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        state: &mut PartitionState,
    ) -> Result<u64, ChError>;
    /// Inserts the rows of `flight` (`topic`'s events), with their carrier columns computed from
    /// exactly these rows ([`Flight::body`]), as one fenced attempt (see [`InsertFailed`]).
    fn insert_events(&self, topic: &str, flight: &Flight) -> Result<(), InsertFailed>;
    /// Drops a failed attempt's staging table and waits until no move out of it is running
    /// ([`wait_for_moves`]): once this returns Ok, the attempt has either moved its rows into
    /// `events` or never will (a request of it still on its way fails).
    fn fence(&self, stage: &str) -> Result<(), ChError>;
    /// Fences every attempt of `topic` still staged, by any worker, that may hold rows of one of
    /// `partitions` ([`stage::stage_covers`]) — INSERT attempts of events and the mend's
    /// corrections alike: run before those partitions' dedupe states are loaded, so that no
    /// earlier owner's INSERT of them can land after the load, and by a mend before it reads a
    /// shortfall ([`mend`]). Attempts of other partitions (this worker's own INSERT in flight
    /// among them) are left alone. Like [`EventStore::fence`], it returns only once no move out
    /// of a fenced attempt is running. Returns how many staging tables were dropped.
    fn fence_partitions(&self, topic: &str, partitions: &[i32]) -> Result<usize, ChError>;
    /// Makes the next request of `mend`, which makes the aggregates of a partition's rows whole
    /// whether or not the INSERTs that wrote them ran their materialized views: run before
    /// messages whose rows may have landed unconfirmed are decided again ([`mend`]). The caller
    /// serves the consumer group between the steps.
    fn mend_step(&self, mend: &mut mend::Mend) -> Result<mend::Step, ChError>;
}

/// Settings of the `INSERT … SELECT` that moves an attempt's rows from its staging table into
/// `events` (docs/exactly-once.md, "Carrier rows"):
/// - `parallel_view_processing`: the three materialized views run on concurrent threads once the
///   `events` part is written, instead of one after the other; their pool has
///   `min(max_threads, views)` threads (ClickHouse 18.16's `PushingToViewsBlockOutputStream`), hence
///   `max_threads = 4`. Measured: the move's median 126 → 106 ms for 75,000 rows
///   (docs/measurements.md, "Fences scoped to partitions, commits at revocation, views in parallel").
/// - `max_streams_to_max_threads_ratio = 0.25`: the SELECT still reads the staging table in
///   `max_threads × ratio` = 1 stream, so blocks are read in row order, as with `max_threads = 1`
///   (`field_inputs::the_move_reads_its_staging_table_in_row_order` checks it on the server).
pub const MOVE_SETTINGS: [(&str, &str); 3] =
    [("max_threads", "4"), ("max_streams_to_max_threads_ratio", "0.25"), ("parallel_view_processing", "1")];

/// Settings of the fill of a staging table (`INSERT INTO <stage> … FORMAT RowBinary`), each set to
/// the attempt's row count, so that the staging table holds the rows as **one block** on every
/// version (docs/exactly-once.md, "Carrier rows", point 1):
/// - `max_insert_block_size`: the parser cuts a block at this many rows (the only cut 18.16
///   makes);
/// - `min_insert_block_size_rows`: current ClickHouse's parser also cuts a block once
///   `min_insert_block_size_rows` *and* `min_insert_block_size_bytes` are both reached (1,048,449
///   rows and 256 MiB by default); with the first at the row count, never before the last row.
///   Without it, a batch of 1.2 M rows was staged as two blocks on chDB 26.9, and the move wrote
///   the part with every carrier before the part with most of the rows they count (found by a
///   review; `scripts/check_chdb.py` stages with server defaults that cut every 1,000 rows).
pub const FILL_ROW_SETTINGS: [&str; 2] = ["max_insert_block_size", "min_insert_block_size_rows"];

/// A failed INSERT attempt: the error, and the staging table to [`EventStore::fence`] before
/// looking for rows of the attempt that landed.
///
/// An attempt is `CREATE TABLE <stage> AS events ENGINE = Memory`, the rows into `<stage>`,
/// `INSERT INTO events SELECT … FROM <stage>` (the materialized views run here; it fails unless
/// the staging table holds every row sent), `DROP TABLE <stage>`. Its rows can reach `events`
/// only through its own staging table, so dropping that table and waiting for a move already
/// reading it fences the attempt: any request of the attempt that reaches the server afterwards —
/// held by a proxy past the client's timeout, or sent by a worker that was killed or expelled —
/// finds no table and fails. ClickHouse 18.16 has no insert deduplication token; this is the
/// fence it allows. (On 18.16 the `DROP` itself waits for the move; on current ClickHouse, whose
/// databases are Atomic, it returns at once and the move goes on: hence [`wait_for_moves`].)
#[derive(Debug)]
pub struct InsertFailed {
    pub error: ChError,
    pub stage: String,
}

/// `error` of a request that reads or writes the staging table `stage`, as
/// [`ChError::Fenced`] when it says that table is gone although its attempt never dropped it:
/// someone fenced it (60 UNKNOWN_TABLE, or 218 TABLE_IS_DROPPED during the `DROP`). A transient
/// error: the attempt re-checks and retries, or stops if its partitions went elsewhere. Any other
/// missing table is a real error, classified by its code.
pub(crate) fn fenced_or(error: ChError, stage: &str) -> ChError {
    match &error {
        ChError::Server { code: Some(60 | 218), body, .. } if body.contains(stage) => {
            ChError::Fenced(stage.to_string())
        }
        _ => error,
    }
}

/// `INSERT INTO table (columns) SELECT columns FROM stage` that fails (code 395, transient)
/// unless `stage` still holds the `count` rows sent to it: a Memory table comes back empty after
/// a server restart, and copying nothing must fail, not succeed.
///
/// The check is a scalar subquery, `(SELECT throwIf(count() != n) FROM stage)`: ClickHouse runs
/// it while it analyses the query, and `count()` makes one row even of an empty table. A
/// `throwIf` in the `WHERE` over the copied rows instead is never called when there is no row
/// on current ClickHouse (it is not folded to a constant there, as 18.16 folds it), so an
/// emptied staging table moved nothing and answered 200 (chDB, scripts/check_chdb.py; found by a
/// review).
pub(crate) fn move_whole(table: &str, columns: &str, stage: &str, count: usize) -> String {
    format!(
        "INSERT INTO {table} ({columns}) SELECT {columns} FROM {stage} \
         WHERE (SELECT throwIf(count() != {count}) FROM {stage}) = 0"
    )
}

/// The `query_id` of the move out of `stage` ([`move_whole`]): the staging table's name and
/// `_move`, unique per attempt (each attempt stages under a fresh name), so that a fence can find
/// the move among the server's running queries ([`wait_for_moves`]).
pub(crate) fn move_query_id(stage: &str) -> String {
    format!("{stage}{MOVE_SUFFIX}")
}

/// What a move's `query_id` adds to its staging table's name ([`move_query_id`]).
const MOVE_SUFFIX: &str = "_move";

/// How long one fence waits for the moves it fenced to end before it fails with
/// [`ChError::MoveRunning`] (its caller asks again, serving the consumer group in between).
const MOVE_WAIT: Duration = Duration::from_secs(2);

/// Waits until no running query of the server (`system.processes`) is a move ([`move_query_id`])
/// out of a staging table for which `fenced(stage)` holds; fails with [`ChError::MoveRunning`]
/// after [`MOVE_WAIT`].
///
/// Why it is needed: the fence is "drop the staging table", and its argument is that no move
/// of the attempt runs after it. ClickHouse 18.16 (Ordinary databases) makes the `DROP` wait for
/// a query that reads the table. Current ClickHouse creates Atomic databases, where `DROP TABLE`
/// only unlinks the name and returns, while a query that already opened the table keeps reading
/// it and writing into `events` (`DROP … SYNC` would wait, and 18.16 refuses its syntax). Why it
/// is enough: a query is in `system.processes` from before it opens its tables until its
/// parts are written; one that had not opened the staging table when the `DROP` returned
/// cannot find it any more.
pub(crate) fn wait_for_moves(ch: &ClickHouse, fenced: impl Fn(&str) -> bool) -> Result<(), ChError> {
    let t = Instant::now();
    loop {
        let body = ch.query(&format!(
            "SELECT query_id FROM system.processes WHERE startsWith(query_id, '{STAGE_PREFIX}') \
             AND endsWith(query_id, '{MOVE_SUFFIX}') FORMAT TabSeparated"
        ))?;
        let running = String::from_utf8_lossy(&body).into_owned();
        let Some(id) = running.lines().find(|id| id.strip_suffix(MOVE_SUFFIX).is_some_and(&fenced)).map(str::to_string)
        else {
            return Ok(());
        };
        if t.elapsed() >= MOVE_WAIT {
            return Err(ChError::MoveRunning(id));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl ClickHouse {
    /// `DROP TABLE IF EXISTS stage`, without waiting for a move out of it: after that move's
    /// own answer, or as the first step of a fence.
    pub(crate) fn drop_stage(&self, stage: &str) -> Result<(), ChError> {
        self.execute(&format!("DROP TABLE IF EXISTS {stage}"), true)
    }

    /// One fenced INSERT attempt of `count` rows: `body` is RowBinary in the columns
    /// [`EVENTS_COLUMNS`] then [`CARRIER_COLUMNS`] ([`Flight::body`]). See [`InsertFailed`] for
    /// the four requests, and docs/exactly-once.md ("Carrier rows") for the two settings:
    /// - the staging table is filled as **one block** ([`FILL_ROW_SETTINGS`] = `count`), so
    ///   `events` receives it as one block: one part per month, carriers and the rows they count
    ///   in the same part;
    /// - the `INSERT … SELECT` reads it in one stream ([`MOVE_SETTINGS`]), so that even a server
    ///   that split it would write blocks in row order, each carrier after its group's rows.
    ///
    /// `partitions` are the source partitions of the rows in `body`: the staging table's name
    /// carries them, so that only a dedupe-state load of one of them fences the attempt
    /// ([`stage`]).
    pub fn insert_attempt(
        &self,
        topic: &str,
        partitions: &[i32],
        mut body: Body<'_>,
        count: usize,
    ) -> Result<(), InsertFailed> {
        let stage = stage_name(topic, partitions);
        let failed = |error: ChError| InsertFailed { error: fenced_or(error, &stage), stage: stage.clone() };
        // The first request: nothing can be missing yet, so a code 60 here is a real error.
        self.execute(&format!("CREATE TABLE {stage} AS events ENGINE = Memory"), true)
            .map_err(|error| InsertFailed { error, stage: stage.clone() })?;
        let block = count.max(1).to_string();
        let fill: Vec<(&str, &str)> = FILL_ROW_SETTINGS.iter().map(|name| (*name, block.as_str())).collect();
        self.insert_read(
            &format!("INSERT INTO {stage} ({EVENTS_COLUMNS}, {CARRIER_COLUMNS}) FORMAT RowBinary"),
            body.len(),
            &mut body,
            &fill,
        )
        .map_err(failed)?;
        // Fails unless the staging table still holds every row (emptied by a server restart).
        let query_id = move_query_id(&stage);
        let settings: Vec<(&str, &str)> =
            MOVE_SETTINGS.iter().copied().chain([("query_id", query_id.as_str())]).collect();
        self.execute_with(
            &move_whole("events", &format!("{EVENTS_COLUMNS}, {CARRIER_COLUMNS}"), &stage, count),
            &settings,
        )
        .map_err(failed)?;
        // Written. A staging table left behind (this DROP failed) is empty of consequences: its
        // one INSERT … SELECT is done; the next state load or fence drops it.
        if let Err(e) = self.drop_stage(&stage) {
            tracing::debug!(error = %e, stage, "staging table not dropped; the next state load drops it");
        }
        Ok(())
    }
}

impl EventStore for ClickHouse {
    fn existing(&self, keys: &[(&str, &str, &str)]) -> Result<HashSet<EventKey>, ChError> {
        let mut found = HashSet::new();
        if keys.is_empty() {
            return Ok(found);
        }
        let mut w = RowWriter::default();
        for (o, p, id) in keys {
            w.string(o);
            w.string(p);
            w.string(id);
        }
        let body = self.query_with_table(LOOKUP_BY_TABLE, "keys", "o String, p String, e String", &w.buf)?;
        let mut r = RowReader::new(&body);
        let bad = |e: rowbinary::Truncated| ChError::Response(e.to_string());
        while !r.is_empty() {
            let (o, p, id) = (r.string().map_err(bad)?, r.string().map_err(bad)?, r.string().map_err(bad)?);
            let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            found.insert(EventKey::new(&s(o), &s(p), &s(id)));
        }
        Ok(found)
    }

    fn load_partition(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        state: &mut PartitionState,
    ) -> Result<u64, ChError> {
        let from = from.max(0);
        let sql = format!(
            "SELECT key_hash FROM events WHERE src_topic = {} AND src_partition = {partition} \
             AND hour >= toDateTime({}) AND ts >= toDateTime({from}) FORMAT RowBinary",
            quote(topic),
            from - from % 3600,
        );
        let body = self.query(&sql)?;
        if body.len() % 8 != 0 {
            return Err(ChError::Response("key_hash response is not a multiple of 8 bytes".into()));
        }
        for chunk in body.chunks_exact(8) {
            state.load(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        Ok(body.len() as u64 / 8)
    }

    fn insert_events(&self, topic: &str, flight: &Flight) -> Result<(), InsertFailed> {
        self.insert_attempt(topic, &flight.partitions(), flight.body(), flight.len())
    }

    fn fence(&self, stage: &str) -> Result<(), ChError> {
        self.drop_stage(stage)?;
        wait_for_moves(self, |s| s == stage)
    }

    fn mend_step(&self, mend: &mut mend::Mend) -> Result<mend::Step, ChError> {
        mend.step(self)
    }

    fn fence_partitions(&self, topic: &str, partitions: &[i32]) -> Result<usize, ChError> {
        let body = self.query(&format!(
            "SELECT name FROM system.tables WHERE database = currentDatabase() AND startsWith(name, {}) \
             FORMAT TabSeparated",
            quote(&stage_prefix(topic))
        ))?;
        let names = String::from_utf8_lossy(&body).into_owned();
        let mut n = 0;
        for name in names.lines().filter(|l| !l.is_empty() && stage_covers(topic, l, partitions)) {
            self.drop_stage(name)?;
            n += 1;
        }
        // Every move of the topic that may hold rows of these partitions, whether its table was
        // listed now or dropped by an earlier fence whose wait ran out.
        let prefix = stage_prefix(topic);
        wait_for_moves(self, |stage| stage.starts_with(&prefix) && stage_covers(topic, stage, partitions))?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only "this very staging table is gone" is a fence; another missing table, or another
    /// error, keeps its own class.
    #[test]
    fn only_the_attempts_own_missing_table_is_a_fence() {
        let stage = stage_name("events", &[3]);
        let server = |code, body: &str| ChError::Server { status: 404, code: Some(code), body: body.to_string() };
        for code in [60, 218] {
            let gone = server(code, &format!("Code: {code}. DB::Exception: Table db.{stage} doesn't exist."));
            assert!(matches!(fenced_or(gone, &stage), ChError::Fenced(s) if s == stage), "{code}");
            let other = server(code, "Code: 60. DB::Exception: Table db.usage_hourly_agg doesn't exist.");
            assert!(matches!(fenced_or(other, &stage), ChError::Server { .. }), "{code}");
        }
        let timeout = server(159, &format!("Code: 159. Timeout reading {stage}"));
        assert!(matches!(fenced_or(timeout, &stage), ChError::Server { code: Some(159), .. }));
    }
}
