//! Retention of the narrow `events` table (ClickHouse 18.16 has no TTL): whole months of event
//! time are dropped once every event in them is older than `clickhouse.events_retention_days`.

use super::clickhouse::{ChError, ClickHouse};

/// Month partitions (`YYYYMM`) among `partitions` that lie entirely before `cutoff` (Unix secs).
pub fn expired(partitions: &[u32], cutoff: i64) -> Vec<u32> {
    partitions
        .iter()
        .copied()
        .filter(|&p| {
            let (y, m) = (i64::from(p / 100), i64::from(p % 100));
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (1..=12).contains(&m) && crate::timestamp::days_from_civil(ny, nm, 1) * 86_400 <= cutoff
        })
        .collect()
}

/// Drops the expired month partitions of `events` (or only lists them with `dry_run`).
pub fn prune(ch: &ClickHouse, retention_days: u64, now: i64, dry_run: bool) -> Result<Vec<u32>, ChError> {
    let body = ch.query(&format!(
        "SELECT DISTINCT partition FROM system.parts WHERE database = {} AND table = 'events' AND active FORMAT TabSeparated",
        super::clickhouse::quote(ch.database())
    ))?;
    let parts: Vec<u32> = String::from_utf8_lossy(&body).lines().filter_map(|l| l.trim().parse().ok()).collect();
    let drop = expired(&parts, now - retention_days as i64 * 86_400);
    if !dry_run {
        for p in &drop {
            ch.execute(&format!("ALTER TABLE events DROP PARTITION {p}"), true)?;
        }
    }
    Ok(drop)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_whole_months_before_the_cutoff_expire() {
        let cutoff = crate::timestamp::parse_rfc3339("2026-03-01T00:00:00Z").unwrap();
        assert_eq!(super::expired(&[202512, 202601, 202602, 202603, 202604], cutoff), [202512, 202601, 202602]);
        let mid = crate::timestamp::parse_rfc3339("2026-02-15T00:00:00Z").unwrap();
        assert_eq!(super::expired(&[202601, 202602], mid), [202601]);
        assert_eq!(super::expired(&[202613, 0], i64::MAX / 2), Vec::<u32>::new());
    }
}
