//! The ClickHouse side of ingest: the narrow `events` table is written here, and read back for
//! deduplication. The hourly aggregates follow from it through materialized views.

pub mod clickhouse;
pub mod retention;
pub mod rowbinary;
pub mod schema;

use std::collections::HashSet;

use crate::dedupe::{EventKey, PartitionState};
use clickhouse::{quote, ChError, ClickHouse};
use rowbinary::RowReader;

/// Column order of the RowBinary rows produced by [`crate::pipeline`].
pub const EVENTS_COLUMNS: &str = "org_id, project_id, event_id, type, ts, hour, key_hash, meters, meter_values, \
     unique_meters, unique_hashes, src_topic, src_partition, src_offset, batch_index, ingested_at";

/// Keys asked about per look-up query.
const LOOKUP_CHUNK: usize = 2_000;

/// What the ingest loop needs from storage. [`ClickHouse`] is the real one; tests may fake it.
pub trait EventStore {
    /// Which of `keys` (org, project, id) already have a row.
    fn existing(&self, keys: &[(&str, &str, &str)]) -> Result<HashSet<EventKey>, ChError>;
    /// Feeds every stored key hash of `topic`/`partition` with event time ≥ `horizon` to `state`.
    fn load_partition(
        &self,
        topic: &str,
        partition: i32,
        horizon: i64,
        state: &mut PartitionState,
    ) -> Result<u64, ChError>;
    /// Inserts RowBinary rows (one insert; one part per month of event time).
    fn insert_events(&self, rows: &[u8]) -> Result<(), ChError>;
}

impl EventStore for ClickHouse {
    fn existing(&self, keys: &[(&str, &str, &str)]) -> Result<HashSet<EventKey>, ChError> {
        let mut found = HashSet::new();
        for chunk in keys.chunks(LOOKUP_CHUNK) {
            let mut sql = String::with_capacity(chunk.len() * 64 + 128);
            sql.push_str("SELECT org_id, project_id, event_id FROM events WHERE (org_id, project_id, event_id) IN (");
            for (i, (o, p, id)) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push(',');
                }
                sql.push('(');
                sql.push_str(&quote(o));
                sql.push(',');
                sql.push_str(&quote(p));
                sql.push(',');
                sql.push_str(&quote(id));
                sql.push(')');
            }
            sql.push_str(") FORMAT RowBinary");
            let body = self.query(&sql)?;
            let mut r = RowReader::new(&body);
            let bad = |e: rowbinary::Truncated| ChError::Response(e.to_string());
            while !r.is_empty() {
                let (o, p, id) = (r.string().map_err(bad)?, r.string().map_err(bad)?, r.string().map_err(bad)?);
                let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                found.insert(EventKey::new(&s(o), &s(p), &s(id)));
            }
        }
        Ok(found)
    }

    fn load_partition(
        &self,
        topic: &str,
        partition: i32,
        horizon: i64,
        state: &mut PartitionState,
    ) -> Result<u64, ChError> {
        let horizon = horizon.max(0);
        let sql = format!(
            "SELECT key_hash FROM events WHERE src_topic = {} AND src_partition = {partition} \
             AND hour >= toDateTime({}) AND ts >= toDateTime({horizon}) FORMAT RowBinary",
            quote(topic),
            horizon - horizon % 3600,
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

    fn insert_events(&self, rows: &[u8]) -> Result<(), ChError> {
        self.insert(&format!("INSERT INTO events ({EVENTS_COLUMNS}) FORMAT RowBinary"), rows)
    }
}
