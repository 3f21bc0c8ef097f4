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

/// Largest look-up statement, in bytes. ClickHouse refuses a query longer than its
/// `max_query_size` setting (default 262,144 bytes; error code 62) whatever the rest of the
/// request, so look-ups are split by their size in bytes, never by a count of keys: ids of up to
/// 128 bytes and tenant ids of up to 256 bytes (each up to 4× longer once quoted) always fit.
pub const LOOKUP_QUERY_BYTES: usize = 196_608;
/// Most keys per look-up statement, whatever their size: each tuple of literals is several AST
/// elements on older servers (`max_ast_elements`, default 50,000; 18.16 does not fold a tuple of
/// literals into one), so short keys are capped by count as well as by bytes.
pub const LOOKUP_QUERY_KEYS: usize = 2_000;

const LOOKUP_HEAD: &str = "SELECT org_id, project_id, event_id FROM events WHERE (org_id, project_id, event_id) IN (";
const LOOKUP_TAIL: &str = ") FORMAT RowBinary";

/// The look-up statements for `keys`, each at most `max_bytes` long and of at most
/// [`LOOKUP_QUERY_KEYS`] keys (a single key longer than `max_bytes` still gets a statement of
/// its own).
pub fn lookup_queries(keys: &[(&str, &str, &str)], max_bytes: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut sql = String::new();
    let mut tuple = String::new();
    let mut in_statement = 0;
    for (o, p, id) in keys {
        tuple.clear();
        tuple.push('(');
        tuple.push_str(&quote(o));
        tuple.push(',');
        tuple.push_str(&quote(p));
        tuple.push(',');
        tuple.push_str(&quote(id));
        tuple.push(')');
        if !sql.is_empty()
            && (sql.len() + 1 + tuple.len() + LOOKUP_TAIL.len() > max_bytes || in_statement == LOOKUP_QUERY_KEYS)
        {
            sql.push_str(LOOKUP_TAIL);
            out.push(std::mem::take(&mut sql));
            in_statement = 0;
        }
        in_statement += 1;
        if sql.is_empty() {
            sql.push_str(LOOKUP_HEAD);
        } else {
            sql.push(',');
        }
        sql.push_str(&tuple);
    }
    if !sql.is_empty() {
        sql.push_str(LOOKUP_TAIL);
        out.push(sql);
    }
    out
}

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
        for sql in lookup_queries(keys, LOOKUP_QUERY_BYTES) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 7, row 9's kind: every look-up statement fits the byte budget, whatever the keys.
    #[test]
    fn lookups_are_split_by_bytes() {
        let long_id = "i".repeat(128);
        let nasty_id = "\'\n\0".repeat(32); // quoting doubles it and more
        let org = "o".repeat(crate::verify::MAX_TENANT_ID_BYTES);
        let ctl = "\u{1}".repeat(1) + &"\u{2}".repeat(255);
        let ids: Vec<String> = (0..6000).map(|i| format!("{long_id}{i}")[..128].to_string()).collect();
        let mut keys: Vec<(&str, &str, &str)> = ids.iter().map(|id| ("org-1", "proj-1", id.as_str())).collect();
        keys.push((&org, &ctl, &nasty_id));
        let queries = lookup_queries(&keys, LOOKUP_QUERY_BYTES);
        assert!(queries.len() >= 4, "6,000 keys of 128 bytes do not fit in one statement");
        for q in &queries {
            assert!(q.len() <= LOOKUP_QUERY_BYTES, "{} bytes", q.len());
            assert!(q.starts_with(LOOKUP_HEAD) && q.ends_with(LOOKUP_TAIL));
        }
        let tuples: usize = queries.iter().map(|q| q.matches("),(").count() + 1).sum();
        assert_eq!(tuples, keys.len(), "every key is asked about exactly once");
        // Short keys are capped by count (AST size on old servers).
        let short: Vec<String> = (0..5_000).map(|i| format!("e{i}")).collect();
        let keys_short: Vec<(&str, &str, &str)> = short.iter().map(|id| ("o", "p", id.as_str())).collect();
        let q = lookup_queries(&keys_short, LOOKUP_QUERY_BYTES);
        assert_eq!(q.len(), 3);
        assert!(q.iter().all(|q| q.matches("),(").count() < LOOKUP_QUERY_KEYS));
        // A tiny budget still makes progress: one key per statement.
        assert_eq!(lookup_queries(&keys[..3], 10).len(), 3);
        assert!(lookup_queries(&[], LOOKUP_QUERY_BYTES).is_empty());
    }
}
