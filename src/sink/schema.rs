//! `tally-ingest migrate`: applies `schemas/*.sql` in name order, each file once, idempotently.

use std::path::Path;

use super::clickhouse::{quote, ChError, ClickHouse};

/// The codes of "column with this name already exists" on an `ADD COLUMN`: 44 (ILLEGAL_COLUMN)
/// on ClickHouse 18.16, 15 (DUPLICATE_COLUMN) on current versions (chDB 26.9; found by a review:
/// with 44 alone, a migration interrupted after an `ADD COLUMN` failed on every rerun there).
/// `scripts/check_chdb.py` reads this list and checks the code current ClickHouse gives.
pub const COLUMN_EXISTS: [u32; 2] = [44, 15];

/// The migrations compiled into the binary, so that `migrate` works from any directory.
pub const BUILTIN: &[(&str, &str)] = &[
    ("001_events.sql", include_str!("../../schemas/001_events.sql")),
    ("002_stripe_ledger.sql", include_str!("../../schemas/002_stripe_ledger.sql")),
    ("003_api_keys.sql", include_str!("../../schemas/003_api_keys.sql")),
    ("004_webhook_deliveries.sql", include_str!("../../schemas/004_webhook_deliveries.sql")),
    ("005_unique_daily.sql", include_str!("../../schemas/005_unique_daily.sql")),
    ("006_carriers.sql", include_str!("../../schemas/006_carriers.sql")),
    ("007_carrier_filters.sql", include_str!("../../schemas/007_carrier_filters.sql")),
];

/// The line that marks a migration which drops and re-creates materialized views: an INSERT into
/// `events` between a view's `DROP` and its `CREATE` would miss that view, and nothing would ever
/// mend it (the INSERT answered 200). Such a migration runs only with ingestion stopped, or on a
/// database whose `events` table is created by the same run.
pub const STOP_INGESTION_MARK: &str = "-- tally: stop-ingestion";

/// What [`migrate`] does with a pending migration marked [`STOP_INGESTION_MARK`] on a database
/// that already had `events` before the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopIngestion {
    /// The operator says every `tally-ingest` worker is stopped (`migrate --ingestion-stopped`).
    Apply,
    /// Fail with [`MigrateError::IngestionMayRun`] (`tally-ingest migrate` without the flag).
    Refuse,
    /// Leave it pending for `tally-ingest migrate` (the invoicer: it reads nothing such a
    /// migration changes).
    Skip,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    #[error("failed to read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("migration {file}: {source}")]
    Apply { file: String, source: ChError },
    /// A migration that re-creates views is pending and the workers may be inserting.
    #[error(
        "migration {file} drops and re-creates the aggregates' materialized views, and an INSERT in between would \
         not be counted: stop every tally-ingest worker, then run `tally-ingest migrate --ingestion-stopped` \
         (docs/clickhouse.md, \"Upgrading\")"
    )]
    IngestionMayRun { file: String },
}

/// Splits a SQL file into statements (on `;` at the end of a line; `--` comments dropped).
pub fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in sql.lines() {
        let l = line.trim_end();
        if l.trim_start().starts_with("--") {
            continue;
        }
        cur.push_str(l);
        cur.push('\n');
        if l.ends_with(';') {
            let s = cur.trim().trim_end_matches(';').trim().to_string();
            if !s.is_empty() {
                out.push(s);
            }
            cur.clear();
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

/// Reads migrations from `dir` if given, else the built-in ones.
pub fn load(dir: Option<&Path>) -> Result<Vec<(String, String)>, MigrateError> {
    let Some(dir) = dir else {
        return Ok(BUILTIN.iter().map(|(n, s)| (n.to_string(), s.to_string())).collect());
    };
    let read_err = |e| MigrateError::Read { path: dir.display().to_string(), source: e };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p)
                .map_err(|source| MigrateError::Read { path: p.display().to_string(), source })?;
            Ok((p.file_name().expect("file").to_string_lossy().into_owned(), text))
        })
        .collect()
}

/// The names of the migrations recorded in `<db>.schema_migrations` (none if it does not exist).
pub fn applied(ch: &ClickHouse) -> Result<Vec<String>, ChError> {
    if !table_exists(ch, "schema_migrations")? {
        return Ok(Vec::new());
    }
    let db = ch.database();
    let done = ch.query(&format!("SELECT name FROM {db}.schema_migrations FORMAT TabSeparated"))?;
    Ok(String::from_utf8_lossy(&done).lines().map(str::to_string).collect())
}

/// Whether `ch`'s database has a table `name`.
fn table_exists(ch: &ClickHouse, name: &str) -> Result<bool, ChError> {
    let n = ch.query(&format!(
        "SELECT count() FROM system.tables WHERE database = {} AND name = {} FORMAT TabSeparated",
        quote(ch.database()),
        quote(name)
    ))?;
    Ok(String::from_utf8_lossy(&n).trim() != "0")
}

/// The built-in migrations not recorded in `ch`'s database: a worker refuses to start while any
/// is missing, rather than write rows the schema cannot take or views do not count.
pub fn missing(ch: &ClickHouse) -> Result<Vec<&'static str>, ChError> {
    let done = applied(ch)?;
    Ok(BUILTIN.iter().map(|(n, _)| *n).filter(|n| !done.iter().any(|d| d == n)).collect())
}

/// Applies the migrations not yet recorded in `<db>.schema_migrations`; returns the applied names.
/// A migration marked [`STOP_INGESTION_MARK`] is applied freely when the database had no `events`
/// table before this run (no worker can be writing), else as `stop` says; [`StopIngestion::Skip`]
/// leaves it and every migration after it pending.
pub fn migrate(
    ch: &ClickHouse,
    migrations: &[(String, String)],
    stop: StopIngestion,
) -> Result<Vec<String>, MigrateError> {
    let db = ch.database().to_string();
    let apply = |file: &str, sql: &str| -> Result<(), MigrateError> {
        ch.execute(sql, false).map_err(|source| MigrateError::Apply { file: file.to_string(), source })
    };
    apply("(bootstrap)", &format!("CREATE DATABASE IF NOT EXISTS {db}"))?;
    apply(
        "(bootstrap)",
        &format!(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (name String, applied_at DateTime) \
             ENGINE = MergeTree() ORDER BY name"
        ),
    )?;
    let bootstrap = |source| MigrateError::Apply { file: "(bootstrap)".into(), source };
    let done = applied(ch).map_err(bootstrap)?;
    // New: no `events` table before this run, so no worker can be inserting into it.
    let fresh = !table_exists(ch, "events").map_err(bootstrap)?;
    let mut applied = Vec::new();
    for (name, sql) in migrations {
        if done.contains(name) {
            continue;
        }
        if sql.lines().any(|l| l.trim() == STOP_INGESTION_MARK) && !fresh {
            match stop {
                StopIngestion::Apply => {}
                StopIngestion::Refuse => return Err(MigrateError::IngestionMayRun { file: name.clone() }),
                StopIngestion::Skip => {
                    // Later migrations may build on it: they wait too.
                    tracing::warn!(migration = %name, "left, with any after it, for `tally-ingest migrate --ingestion-stopped`");
                    break;
                }
            }
        }
        for stmt in statements(&sql.replace("${database}", &db)) {
            match apply(name, &stmt) {
                // ClickHouse 18.16 has no `ADD COLUMN IF NOT EXISTS`: a run interrupted between
                // an `ADD COLUMN` and the record finds its columns there and goes on.
                Err(MigrateError::Apply { source, .. })
                    if source.code().is_some_and(|c| COLUMN_EXISTS.contains(&c))
                        && stmt.starts_with("ALTER TABLE")
                        && stmt.contains("ADD COLUMN") => {}
                r => r?,
            }
        }
        apply(name, &format!("INSERT INTO {db}.schema_migrations VALUES ({}, now())", quote(name)))?;
        applied.push(name.clone());
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    #[test]
    fn builtin_migration_splits_into_statements() {
        let s = super::statements(super::BUILTIN[0].1);
        assert_eq!(s.len(), 7);
        assert!(s.iter().all(|x| !x.ends_with(';') && !x.contains("--")));
    }
}
