//! Names of the staging tables that fence INSERT attempts (docs/exactly-once.md, "Zombie
//! writers"), and which partitions' rows an attempt may hold.
//!
//! A name is `events_stage_<xxh3 of topic, 16 hex>_<random, 32 hex>_p<partitions>`, the
//! partitions being the source partitions of the attempt's rows, ascending, joined by `_`
//! (`…_p0_3_11`). A dedupe-state load fences only the attempts that may hold rows of a partition
//! it loads ([`stage_covers`]): before names carried partitions, every load dropped every attempt
//! of the topic, and a worker's own INSERT in flight for other partitions was fenced and retried
//! in every first pass (docs/measurements.md, "Fences scoped to partitions").
//!
//! The mend's corrections of `usage_hourly_agg` are staged under the same names (one partition
//! each), with that table's columns instead of `events`'s, so that the same fences cover them
//! ([`super::mend`]). Only the attempt that created a staging table reads it.
//!
//! A name without the list (one of an older version, or an attempt whose list would be longer
//! than [`MAX_PARTITIONS_CHARS`]) may hold rows of any partition, so every load fences it. A
//! name is always a plain identifier (`[a-z0-9_]`), so it needs no quoting in SQL.

/// Longest partition list a name carries, in characters (`0_3_11` is 6): with it a name is at
/// most 160 bytes, well under the 255-byte file names that hold a table's metadata.
pub const MAX_PARTITIONS_CHARS: usize = 96;

/// What every staging table's name starts with, whatever its topic.
pub const STAGE_PREFIX: &str = "events_stage_";

/// Prefix of the staging tables of `topic`'s INSERT attempts: `events_stage_<xxh3 of topic>_`.
pub fn stage_prefix(topic: &str) -> String {
    format!("{STAGE_PREFIX}{:016x}_", xxhash_rust::xxh3::xxh3_64(topic.as_bytes()))
}

/// A fresh staging table name for an attempt of `topic` holding rows of `partitions` (any order,
/// repeats allowed). A list longer than [`MAX_PARTITIONS_CHARS`] is left out: the attempt then
/// counts as holding every partition.
pub fn stage_name(topic: &str, partitions: &[i32]) -> String {
    let mut ps = partitions.to_vec();
    ps.sort_unstable();
    ps.dedup();
    let list = ps.iter().map(i32::to_string).collect::<Vec<_>>().join("_");
    let random = format!("{}{:032x}", stage_prefix(topic), rand::random::<u128>());
    if ps.is_empty() || list.len() > MAX_PARTITIONS_CHARS {
        random
    } else {
        format!("{random}_p{list}")
    }
}

/// The partitions an attempt named `name` may hold rows of: `Some(list)` for a name of `topic`
/// that carries its list, `None` when any partition is possible (no list, or a list that does not
/// parse). Call only with names that start with [`stage_prefix`]`(topic)`.
pub fn stage_partitions(topic: &str, name: &str) -> Option<Vec<i32>> {
    let rest = name.strip_prefix(&stage_prefix(topic))?;
    let list = rest.get(32..)?.strip_prefix("_p")?;
    list.split('_').map(|p| p.parse::<i32>().ok().filter(|p| *p >= 0)).collect()
}

/// Whether the attempt named `name` may hold rows of one of `partitions`: then a load of those
/// partitions' dedupe state must fence it first.
pub fn stage_covers(topic: &str, name: &str, partitions: &[i32]) -> bool {
    match stage_partitions(topic, name) {
        Some(held) => held.iter().any(|p| partitions.contains(p)),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_their_partitions_and_parse_back() {
        let n = stage_name("events", &[11, 0, 3, 3]);
        assert!(n.starts_with(&stage_prefix("events")), "{n}");
        assert!(n.ends_with("_p0_3_11"), "{n}");
        assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{n}");
        assert_eq!(stage_partitions("events", &n), Some(vec![0, 3, 11]));
        assert!(stage_covers("events", &n, &[5, 11]));
        assert!(!stage_covers("events", &n, &[1, 2, 4, 5, 10, 12]));
        assert!(!stage_covers("events", &n, &[]));
        assert_ne!(stage_name("events", &[0]), stage_name("events", &[0]), "every attempt has its own table");
    }

    #[test]
    fn names_without_a_list_cover_every_partition() {
        // An older version's name: prefix and random part only.
        let old = format!("{}{:032x}", stage_prefix("events"), 7u128);
        assert_eq!(stage_partitions("events", &old), None);
        assert!(stage_covers("events", &old, &[0]));
        // A list too long to carry is left out.
        let many: Vec<i32> = (0..1000).collect();
        let n = stage_name("events", &many);
        assert!(n.len() <= stage_prefix("events").len() + 32, "{n}");
        assert!(stage_covers("events", &n, &[999]));
        let longest = stage_name("events", &(0..35).collect::<Vec<_>>());
        assert_eq!(stage_partitions("events", &longest).map(|v| v.len()), Some(35), "{longest}");
        assert!(longest.len() <= 160, "{}", longest.len());
        // A list that does not parse, or names a negative partition, is no list.
        for bad in ["_p", "_p1__2", "_px", "_p-1", "_p1_", "x"] {
            assert!(stage_covers("events", &format!("{old}{bad}"), &[5]), "{bad}");
        }
        // An attempt with no rows has no list either (it is never sent; if it were, it would be fenced).
        assert_eq!(stage_partitions("events", &stage_name("events", &[])), None);
    }
}
