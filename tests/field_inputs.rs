//! Issue 7 end to end: what real producers send, on the real services (tansu, ClickHouse 18.16).
//! Each message of the issue's table is produced to the source topic with its exact value and
//! headers; the aggregates, the narrow rows and the dead-letter topic must say what the contract
//! (PRODUCT.md §1–§3) requires. Requires `scripts/start.sh` (run by `scripts/test.sh`).

mod common;

use std::time::{Duration, Instant};

use common::{brokers, end_offsets, merge, produce_at, produce_with_headers, tokio_block_on, Running, World};
use rdkafka::config::ClientConfig;
use tally::devkeys::{basic, bearer};
use tally::loadgen::H_LOADGEN_ID;

/// Rows 1–8 of the issue's table, one message each (row 5 is two), in one run.
#[test]
fn field_inputs_are_billed_as_the_contract_says() {
    let w = World::new("field");
    let worker = Running(Some(w.worker("1")));
    assert!(w.wait_assigned("1", Duration::from_secs(60)));
    let now = tally::source::worker::now_secs();
    let t = tally::timestamp::format_rfc3339(now);
    let hour = now - now.rem_euclid(3600);
    let (a, b, c) = (w.keys.tenants[0].clone(), w.keys.tenants[1].clone(), w.keys.tenants[2].clone());
    let a_key = basic(&a);
    // Row 7: a valid token whose `exp` is i64::MAX.
    let mut far = w.keys.claims(&c, now, 0);
    far["exp"] = i64::MAX.into();
    let far = bearer(&w.keys.sign_eddsa(&far));
    let b_jwt = bearer(&w.keys.sign_eddsa(&w.keys.claims(&b, now, 3600)));

    let gen =
        |id: &str, body: &str| format!(r#"{{"id":"{id}","type":"generation-create","timestamp":"{t}","body":{body}}}"#);
    // (message id, value, headers, the project it must be attributed to)
    type Case<'a> = (u64, String, Vec<(&'a str, &'a str)>, &'a str);
    let messages: Vec<Case> = vec![
        (1, gen("a", r#"{"usage":{"input":12.0,"output":3}}"#), vec![("authorization", &a_key)], &a.project_id),
        (2, gen("a2", r#"{"usage":{"input":1e3,"output":3}}"#), vec![("authorization", &a_key)], &a.project_id),
        (
            3,
            format!(
                r#"{{"id":"b","type":"generation-create","timestamp":"{t}","body":{{"usage":{{"input":812,"output":96}}}},"body":{{"model":"gpt-4o"}}}}"#
            ),
            vec![("authorization", &a_key)],
            &a.project_id,
        ),
        (
            4,
            format!(r#"{{"id":"c","type":"trace-create","timestamp":"{t}","batch":[]}}"#),
            vec![("authorization", &a_key)],
            &a.project_id,
        ),
        (51, gen("e1", r#"{"usage":{"input":18446744073709551615}}"#), vec![("authorization", &a_key)], &a.project_id),
        (52, gen("e2", r#"{"usage":{"input":1}}"#), vec![("authorization", &a_key)], &a.project_id),
        (
            6,
            gen("d", r#"{"userId":"u-\ud83d","usage":{"input":812,"output":96}}"#),
            vec![("authorization", &a_key)],
            &a.project_id,
        ),
        (
            7,
            format!(r#"{{"id":"j","type":"trace-create","timestamp":"{t}"}}"#),
            vec![("authorization", &far)],
            &c.project_id,
        ),
        (
            8,
            format!(r#"{{"id":"h","type":"trace-create","timestamp":"{t}"}}"#),
            vec![("authorization", &a_key), ("Authorization", &b_jwt)],
            &a.project_id,
        ),
    ];
    let mut produced = Vec::new();
    for (tag, value, headers, key) in &messages {
        let tag = tag.to_string();
        let mut h = headers.clone();
        h.push((H_LOADGEN_ID, &tag));
        produced.push(produce_with_headers(&w.kafka.topic, key, value.as_bytes(), &h));
    }
    tally::admin::wait_committed(&w.kafka, &end_offsets(&produced), Duration::from_secs(120)).unwrap();
    worker.stop();

    let usage = w.usage_hourly();
    let get = |p: &str, m: &str| usage.get(&(a.org_id.clone(), p.to_string(), m.to_string(), hour)).copied();
    // Rows 1, 2, 5 (second event) and 6 are billed; 3, 4 and 5 (first event) are not.
    assert_eq!(get(&a.project_id, "input_tokens"), Some(12 + 1000 + 1 + 812), "input_tokens of tenant A");
    assert_eq!(get(&a.project_id, "output_tokens"), Some(3 + 3 + 96), "output_tokens of tenant A");
    assert_eq!(get(&a.project_id, "events"), Some(4));
    assert_eq!(get(&a.project_id, "observations"), Some(4));
    assert_eq!(get(&a.project_id, "traces"), None, "row 8 billed nobody");
    // Row 7: accepted for tenant C.
    let c_events = usage.get(&(c.org_id.clone(), c.project_id.clone(), "events".to_string(), hour)).copied();
    assert_eq!(c_events, Some(1), "row 7: a far-future exp is valid");
    // Row 8: tenant B got nothing either.
    assert!(usage.keys().all(|(_, p, ..)| p != &b.project_id), "row 8 billed nobody");
    // Row 6: the user id hashed after U+FFFD replacement.
    let hashes = w.rows(&format!(
        "SELECT arrayJoin(unique_hashes) FROM events WHERE project_id = '{}' AND event_id = 'd'",
        a.project_id
    ));
    assert_eq!(hashes, vec![vec![tally::meter::unique_hash("u-\u{fffd}").to_string()]]);
    // Nothing wrapped: every aggregate is far below 2^53.
    assert!(usage.values().all(|v| *v < 1 << 53));

    let mut dl: Vec<(u64, Option<u32>, String)> = w.dead_letters();
    dl.sort();
    assert_eq!(
        dl,
        vec![
            (3, None, "malformed".to_string()),
            (4, None, "malformed".to_string()),
            (8, None, "invalid_credentials".to_string()),
            (51, None, "malformed".to_string()),
        ]
    );
}

/// Row 9: 6,000 events with 128-byte ids counted once, then re-read by a second consumer group
/// (a replay): the dedupe look-up is split by bytes, the replay finishes, all 6,000 are
/// recognised as duplicates and the totals do not move.
#[test]
fn a_replay_of_long_ids_finishes_and_counts_nothing_twice() {
    let w = World::new("longids");
    let metrics = common::free_addr();
    let first = Running(Some(w.worker("first")));
    assert!(w.wait_assigned("first", Duration::from_secs(60)));
    let now = tally::source::worker::now_secs();
    let t = tally::timestamp::format_rfc3339(now);
    let tenant = w.keys.tenants[0].clone();
    let auth = basic(&tenant);
    let mut produced = Vec::new();
    for chunk in 0..24 {
        let events: Vec<String> = (0..250)
            .map(|i| {
                let n = chunk * 250 + i;
                // 128 bytes, quotes and backslashes included (they grow when quoted in SQL).
                let id = format!("{n:06}-{}", "x'\\".repeat(50))[..128].to_string();
                let id = serde_json::to_string(&id).unwrap();
                format!(r#"{{"id":{id},"type":"trace-create","timestamp":"{t}"}}"#)
            })
            .collect();
        let value = format!(r#"{{"batch":[{}]}}"#, events.join(","));
        assert!(value.len() < 65536, "{} bytes", value.len());
        produced.push(produce_with_headers(
            &w.kafka.topic,
            &tenant.project_id,
            value.as_bytes(),
            &[("authorization", &auth)],
        ));
    }
    let target = end_offsets(&produced);
    tally::admin::wait_committed(&w.kafka, &target, Duration::from_secs(120)).unwrap();
    first.stop();
    let before = w.usage_hourly();
    let events_key =
        (tenant.org_id.clone(), tenant.project_id.clone(), "events".to_string(), now - now.rem_euclid(3600));
    assert_eq!(before.get(&events_key), Some(&6000));
    assert_eq!(w.scalar("SELECT count() FROM events"), 6000);

    // The replay: a new group reads the topic from the start.
    let replay_group = format!("{}-replay", w.kafka.group_id);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(w.log_path("replay")).unwrap();
    let replay = Running(Some(
        w.cli(&["run"])
            .env("TALLY_KAFKA_GROUP_ID", &replay_group)
            .env("TALLY_METRICS_LISTEN", &metrics)
            .stderr(log)
            .spawn()
            .unwrap(),
    ));
    assert!(w.wait_assigned("replay", Duration::from_secs(60)));
    let started = Instant::now();
    let replay_cfg = tally::config::KafkaConfig { group_id: replay_group, ..w.kafka.clone() };
    tally::admin::wait_committed(&replay_cfg, &target, Duration::from_secs(120)).unwrap();
    let took = started.elapsed();
    let m = common::scrape(&metrics);
    replay.stop();
    assert_eq!(common::sum_samples(&m, "tally_events_total", "outcome=\"duplicate\"") as u64, 6000);
    assert_eq!(common::sum_samples(&m, "tally_events_total", "outcome=\"accepted\"") as u64, 0);
    assert!(common::sum_samples(&m, "tally_dedupe_lookups_total", "") >= 6000.0, "the look-up path was taken");
    assert_eq!(common::sum_samples(&m, "tally_clickhouse_errors_total", ""), 0.0, "no look-up failed");
    assert_eq!(w.usage_hourly(), before, "the replay changed no total");
    assert_eq!(w.scalar("SELECT count() FROM events"), 6000);
    eprintln!(
        "[measure] replay of 6,000 events with 128-byte ids: caught up {:.1}s after assignment",
        took.as_secs_f64()
    );
}

/// No silent stalls: while ClickHouse refuses the batch's requests (here the `events` table is
/// renamed away: exception code 60), the partition is reported stalled (metric, error log with
/// the code), nothing is committed past the batch, and once the cause is fixed the worker
/// resumes by itself and every total is exact.
#[test]
fn a_permanent_clickhouse_error_stalls_visibly_and_resumes() {
    let metrics = common::free_addr();
    let w = World::with("stall", &common::clickhouse_url(), &metrics);
    let worker = Running(Some(w.worker("1")));
    assert!(w.wait_assigned("1", Duration::from_secs(60)));
    let first = w.generate(&w.gen_config(2_000, 41));
    w.wait_caught_up(&first);
    let committed_before = tally::admin::committed(&w.kafka).unwrap();

    let db = format!("it_{}", w.name);
    w.ch.execute(&format!("RENAME TABLE {db}.events TO {db}.events_away"), false).unwrap();
    let second = w.generate(&tally::loadgen::GenConfig { first_message_id: 1_000_000, ..w.gen_config(3_000, 42) });
    let deadline = Instant::now() + Duration::from_secs(60);
    let stalled = loop {
        let m = common::scrape(&metrics);
        let s = common::sum_samples(&m, "tally_stalled", "reason=\"clickhouse_rejected\"");
        if s >= 1.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "no stalled partition reported:\n{m}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(common::sum_samples(&stalled, "tally_clickhouse_errors_total", "class=\"permanent\"") >= 1.0);
    assert_eq!(tally::admin::committed(&w.kafka).unwrap(), committed_before, "nothing committed past the stuck batch");
    let log = String::from_utf8_lossy(&std::fs::read(w.log_path("1")).unwrap()).into_owned();
    let line = log.lines().find(|l| l.contains("partition stalled")).expect("an error log line names the stall");
    assert!(line.contains("code=60"), "the exception code is logged: {line}");

    // Fixed: the table is back. The worker resumes by itself.
    w.ch.execute(&format!("RENAME TABLE {db}.events_away TO {db}.events"), false).unwrap();
    w.wait_caught_up(&second);
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::sum_samples(&common::scrape(&metrics), "tally_stalled", "") != 0.0 {
        assert!(Instant::now() < deadline, "tally_stalled did not clear after recovery");
        std::thread::sleep(Duration::from_millis(250));
    }
    worker.stop();
    let mut all = first.clone();
    merge(&mut all, &second);
    w.assert_totals(&all);
    w.assert_dead_letters(&all, false);
}

/// The `INSERT … SELECT` that moves an attempt's rows into `events` runs the views on several
/// threads, yet reads its staging table in one stream, in row order (docs/exactly-once.md,
/// "Carrier rows", point 2): a staging table of 32 blocks is copied with the move's own settings,
/// each row numbered in the order the copy read it (`rowNumberInAllBlocks()`, one counter for the
/// whole query). With `max_threads = 4` alone, three copies measured 29,000–31,000 rows out of
/// place.
#[test]
fn the_move_reads_its_staging_table_in_row_order() {
    let w = World::new("moveorder");
    w.ch.execute("CREATE TABLE probe_in (n UInt64) ENGINE = Memory", true).unwrap();
    w.ch.execute("CREATE TABLE probe_out (n UInt64, read UInt64) ENGINE = Memory", true).unwrap();
    for i in 0..32 {
        // One INSERT, one block.
        w.ch.execute(
            &format!("INSERT INTO probe_in SELECT number + {} FROM system.numbers LIMIT 1000", i * 1000),
            true,
        )
        .unwrap();
    }
    assert_eq!(w.scalar("SELECT uniqExact(blockNumber()) FROM probe_in"), 32, "the staging table holds 32 blocks");
    w.ch.execute_with(
        "INSERT INTO probe_out SELECT n, rowNumberInAllBlocks() FROM probe_in",
        &tally::sink::MOVE_SETTINGS,
    )
    .unwrap();
    assert_eq!(w.scalar("SELECT count() FROM probe_out"), 32_000);
    assert_eq!(w.scalar("SELECT countIf(n != read) FROM probe_out"), 0, "rows read out of order");
}

/// Two copies of one event id whose event times straddle the dedupe state's horizon
/// (`now − window − replay_slack`), 20 minutes apart, the second decided by a worker whose state
/// was loaded after the first was counted: the second is a duplicate. A copy at or after the
/// horizon that misses the Bloom filter is decided new without a look-up, so the load reads keys
/// from one window before the horizon (docs/exactly-once.md, "The dedupe authority is
/// ClickHouse, not memory"). Found by a review; fails when the load reads from the horizon (the
/// second copy was counted too).
#[test]
fn copies_straddling_the_horizon_are_counted_once() {
    let w = World::new("straddle");
    let now = tally::source::worker::now_secs();
    // The test configuration's window (7 days) and the default replay slack (7 days).
    let horizon = now - 7 * 86_400 - 7 * 86_400;
    let t = w.keys.tenants[0].clone();
    let auth = basic(&t);
    let copy = |ts: i64, tag: &str| {
        let v = format!(
            r#"{{"id":"straddler","type":"trace-create","timestamp":"{}"}}"#,
            tally::timestamp::format_rfc3339(ts)
        );
        // Stamped with its event's time (as backfilling producers do): within the window of it.
        let headers = [("authorization", auth.as_str()), (H_LOADGEN_ID, tag)];
        produce_at(&w.kafka.topic, &t.project_id, v.as_bytes(), &headers, Some((ts + 10) * 1000))
    };
    let first = copy(horizon - 600, "1");
    let worker = Running(Some(w.worker("1")));
    tally::admin::wait_committed(&w.kafka, &end_offsets(&[first]), Duration::from_secs(120)).unwrap();
    worker.stop();
    // A new worker loads the partition's state; the second copy is 20 minutes younger.
    let second = copy(horizon + 600, "2");
    let worker = Running(Some(w.worker("2")));
    tally::admin::wait_committed(&w.kafka, &end_offsets(&[first, second]), Duration::from_secs(120)).unwrap();
    worker.stop();
    assert_eq!(w.scalar("SELECT count() FROM events"), 1, "one narrow row");
    assert_eq!(billed_events(&w), 1, "counted once");
    assert!(w.dead_letters().is_empty(), "neither copy was rejected");
}

/// Events billed over every tenant and hour (the `events` meter's aggregates).
fn billed_events(w: &World) -> u64 {
    w.usage_hourly().iter().filter(|(k, _)| k.2 == "events").map(|(_, v)| v).sum()
}

/// Two ids of one tenant whose XXH3-128 digests are equal (built from XXH3's public default
/// secret: `dedupe::tests::a_crafted_xxh3_collision_is_two_keys`) are two events, both billed.
/// Until the event key's high half was keyed, the second was taken in memory for a copy of the
/// first (the batch's key set or the recent keys) and left unbilled: one narrow row.
#[test]
fn ids_with_one_xxh3_digest_are_two_events() {
    let w = World::new("xxh3");
    let t = w.keys.tenants[0].clone();
    // The last 16 bytes of the hashed input are mixed only by the round this construction
    // defeats when the input is 32 bytes long, or 48 to 128 (`EventKey`'s input: two u32
    // lengths, org_id, project_id, id); the filler brings it there.
    let prefix = 8 + t.org_id.len() + t.project_id.len();
    assert!(prefix <= 112, "the fixture's tenant ids fit the construction");
    let filler = "x".repeat(32usize.saturating_sub(prefix));
    let tail = |bytes: &[u8]| format!("{filler}{}", std::str::from_utf8(bytes).unwrap());
    let first = tail(b"\x7c\x3b\xe5\x9e\x9e\x51\xcc\x89\xd0\xaf\x2c\xd3\xaa\x72\x3c\x4c");
    let second = tail(b"\x7c\x3b\xe5\x9e\x9e\x51\xcc\x88\xd0\xaf\x2c\xd3\xaa\x72\x3c\x4d");
    let input = |id: &str| {
        let lengths = [(t.org_id.len() as u32).to_le_bytes(), (t.project_id.len() as u32).to_le_bytes()];
        [&lengths[0][..], &lengths[1], t.org_id.as_bytes(), t.project_id.as_bytes(), id.as_bytes()].concat()
    };
    assert_ne!(first, second);
    assert_eq!(
        xxhash_rust::xxh3::xxh3_128(&input(&first)),
        xxhash_rust::xxh3::xxh3_128(&input(&second)),
        "the two ids collide in XXH3-128"
    );
    let auth = basic(&t);
    let now = tally::source::worker::now_secs();
    let sent: Vec<_> = [&first, &second]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let v = serde_json::json!({"id": id, "type": "trace-create", "timestamp": tally::timestamp::format_rfc3339(now)});
            let tag = i.to_string();
            let headers = [("authorization", auth.as_str()), (H_LOADGEN_ID, tag.as_str())];
            produce_at(&w.kafka.topic, &t.project_id, v.to_string().as_bytes(), &headers, None)
        })
        .collect();
    let worker = Running(Some(w.worker("1")));
    tally::admin::wait_committed(&w.kafka, &end_offsets(&sent), Duration::from_secs(120)).unwrap();
    worker.stop();
    assert_eq!(w.scalar("SELECT count() FROM events"), 2, "two narrow rows");
    assert_eq!(billed_events(&w), 2, "both billed");
    assert!(w.dead_letters().is_empty(), "neither was rejected");
}

/// The views on ClickHouse 18.16 add what each kind of row bills (schemas/006_carriers.sql and
/// 007_carrier_filters.sql; src/sink/carrier.rs): a row counted by its carrier adds nothing, a
/// carrier adds its entries (sums first, then unique pairs; sums only; pairs only, with
/// `agg_additive` 0), and a row written without carrier columns adds its own meters. The carriers'
/// entries differ from their rows' own meters on purpose, so the test tells which the views read.
/// The same rows go through a database at 006 first (one day), then, after the upgrade to 007,
/// again (the next day, so that each day's sketch holds one pass only): 006's views add the same,
/// the upgrade keeps what they added, and 007's views add the next day's alike.
/// `scripts/check_chdb.py` checks the same rows on ClickHouse 24.8 and current.
#[test]
fn the_views_add_what_each_kind_of_row_bills() {
    use tally::sink::schema::{self, StopIngestion};
    let w = World::new("viewrows");
    let all = schema::load(None).unwrap();
    let at_006: Vec<_> = all.iter().filter(|(n, _)| n.as_str() < "007").cloned().collect();
    w.ch.execute(&format!("DROP DATABASE {}", w.ch.database()), false).unwrap();
    assert_eq!(schema::migrate(&w.ch, &at_006, StopIngestion::Apply).unwrap().len(), at_006.len());
    assert_eq!(schema::missing(&w.ch).unwrap(), ["007_carrier_filters.sql"]);
    let first = 1_796_097_600;
    let second = first + 86_400;
    insert_each_kind_of_row(&w, first);
    assert_each_kind_of_row_billed(&w, &[first]);
    let applied = schema::migrate(&w.ch, &all, StopIngestion::Apply).unwrap();
    assert_eq!(applied, ["007_carrier_filters.sql"]);
    assert_each_kind_of_row_billed(&w, &[first]);
    insert_each_kind_of_row(&w, second);
    assert_each_kind_of_row_billed(&w, &[first, second]);
}

/// Inserts, for `hour`, each kind of row that [`the_views_add_what_each_kind_of_row_bills`] checks.
fn insert_each_kind_of_row(w: &World, hour: u32) {
    let cols = "org_id, project_id, event_id, type, ts, hour, key_hash, meters, meter_values, unique_meters, \
                unique_hashes, src_topic, src_partition, src_offset, batch_index, ingested_at";
    let row = |project: &str, id: &str, meters: &str, unique: &str, carrier: &str| {
        format!("('o', '{project}', '{id}-{hour}', 't', {hour}, {hour}, 1, {meters}, {unique}, 'topic', 0, 0, -1, {hour}{carrier})")
    };
    let counted = ", 0, [], []";
    let insert = |carrier_columns: bool, rows: &[String]| {
        let cols =
            if carrier_columns { format!("{cols}, agg_additive, agg_meters, agg_values") } else { cols.to_string() };
        w.ch.execute(&format!("INSERT INTO events ({cols}) VALUES {}", rows.join(", ")), true).unwrap();
    };
    // Project pc: two counted rows and their carrier (2 sums, 3 pairs).
    insert(
        true,
        &[
            row("pc", "c1", "['events', 'input_tokens'], [1, 5]", "['unique_users'], [7]", counted),
            row("pc", "c2", "['events', 'input_tokens'], [1, 6]", "['unique_users'], [8]", counted),
            row(
                "pc",
                "c3",
                "['events', 'input_tokens'], [1, 7]",
                "['unique_users'], [7]",
                ", 2, ['events', 'input_tokens', 'unique_users', 'unique_users', 'unique_users'], [30, 180, 7, 8, 10]",
            ),
        ],
    );
    // Project pc again: a row written without carrier columns counts itself (agg_additive -1).
    insert(false, &[row("pc", "c4", "['events'], [1]", "['unique_users'], [9]", "")]);
    // A carrier with sums only (pd) and one with pairs only (pe: agg_additive 0, entries present).
    insert(
        true,
        &[
            row("pd", "d1", "['events'], [1]", "[], []", ", 2, ['events', 'input_tokens'], [5, 50]"),
            row(
                "pe",
                "e1",
                "['events'], [1]",
                "['unique_users'], [21]",
                ", 0, ['unique_users', 'unique_users'], [21, 22]",
            ),
        ],
    );
}

/// The three aggregate tables hold exactly what [`insert_each_kind_of_row`] bills, for each of
/// `hours` (each in a day of its own).
fn assert_each_kind_of_row_billed(w: &World, hours: &[u32]) {
    let key = |p: &str, m: &str, hour: u32| ("o".to_string(), p.to_string(), m.to_string(), i64::from(hour));
    let sums = hours.iter().flat_map(|&h| {
        [
            (key("pc", "events", h), 31),
            (key("pc", "input_tokens", h), 180),
            (key("pd", "events", h), 5),
            (key("pd", "input_tokens", h), 50),
        ]
    });
    assert_eq!(w.usage_hourly(), sums.collect());
    let unique = hours.iter().flat_map(|&h| [(key("pc", "unique_users", h), 4), (key("pe", "unique_users", h), 2)]);
    assert_eq!(w.unique_hourly(), unique.collect());
    let daily: Vec<Vec<String>> = w.rows(
        "SELECT project_id, meter, toUInt32(day), uniqCombinedMerge(state) FROM usage_unique_daily \
         GROUP BY project_id, meter, day ORDER BY project_id, day",
    );
    let days: Vec<String> = hours.iter().map(|h| (h / 86_400 * 86_400).to_string()).collect();
    let want: Vec<[&str; 4]> = [("pc", "4"), ("pe", "2")]
        .into_iter()
        .flat_map(|(p, n)| days.iter().map(move |d| [p, "unique_users", d.as_str(), n]))
        .collect();
    assert_eq!(daily, want);
}

/// A mend's correction staged in a Memory table that a server restart emptied is not taken for
/// added: its `INSERT … SELECT` checks the staging table's count and fails (code 395), and the
/// next mend fences that table and adds the shortfall once (docs/exactly-once.md, "Rows that
/// landed without their aggregates are mended"). Without the check the move copied nothing, the
/// mend reported the shortfall added, and the aggregates stayed short.
#[test]
fn a_correction_emptied_by_a_restart_is_read_again() {
    use tally::sink::clickhouse::ChError;
    use tally::sink::mend::{Mend, Mended, Step};
    let w = World::new("emptied");
    let views = ["usage_hourly_mv", "usage_unique_hourly_mv", "usage_unique_daily_mv"];
    for v in views {
        w.ch.execute(&format!("DETACH TABLE {v}"), true).unwrap();
    }
    // Two rows of partition 0 that landed without their views (they count themselves: no carrier).
    let hour = 1_796_097_600;
    w.ch.execute(
        &format!(
            "INSERT INTO events (org_id, project_id, event_id, type, ts, hour, key_hash, meters, meter_values, \
             src_topic, src_partition, src_offset, batch_index, ingested_at) VALUES \
             ('o', 'p', 'e1', 't', {hour}, {hour}, 1, ['events', 'input_tokens'], [1, 7], 'topic', 0, 0, -1, {hour}), \
             ('o', 'p', 'e2', 't', {hour}, {hour}, 2, ['events', 'input_tokens'], [1, 5], 'topic', 0, 1, -1, {hour})"
        ),
        true,
    )
    .unwrap();
    for v in views {
        w.ch.execute(&format!("ATTACH TABLE {v}"), true).unwrap();
    }
    let run = |m: &mut Mend| -> Mended {
        loop {
            if let Step::Done(r) = m.step(&w.ch).unwrap() {
                return r;
            }
        }
    };
    let mut first = Mend::new("topic", 0, 0..i64::MAX, 0);
    while !first.adds_next() {
        assert_eq!(first.step(&w.ch).unwrap(), Step::More);
    }
    // The restart: the Memory table is there, its rows are not.
    w.ch.execute(&format!("TRUNCATE TABLE {}", first.stage()), true).unwrap();
    let err = first.step(&w.ch).unwrap_err();
    assert!(matches!(err, ChError::Server { code: Some(395), .. }), "{err}");
    assert!(w.usage_hourly().is_empty(), "nothing added");
    let r = run(&mut Mend::new("topic", 0, 0..i64::MAX, 0));
    assert_eq!((r.rows, r.short, r.added, r.fenced), (2, 2, 14, 1), "{r:?}");
    let key = |m: &str| ("o".to_string(), "p".to_string(), m.to_string(), hour);
    assert_eq!(w.usage_hourly(), [(key("events"), 2), (key("input_tokens"), 12)].into());
    // Whole now: a mend of the same rows adds nothing.
    let r = run(&mut Mend::new("topic", 0, 0..i64::MAX, 0));
    assert_eq!((r.rows, r.short, r.fenced), (2, 0, 0), "{r:?}");
    assert_eq!(
        w.scalar("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name LIKE 'events_stage_%'"),
        0
    );
}

/// Dedupe look-ups (and the re-check after a failed INSERT) find exactly the stored keys, whatever
/// they hold: 128-byte ids, 256-byte tenant ids, quotes, backslashes, control characters, and
/// thousands of keys in one look-up (they travel as ClickHouse external data, not SQL).
#[test]
fn lookups_find_every_kind_of_key() {
    use tally::sink::EventStore;
    let w = World::new("lookups");
    let org = "o".repeat(tally::verify::MAX_TENANT_ID_BYTES);
    let ctl = format!("\u{1}'\\\n\t\u{7f}{}", "\u{2}".repeat(250));
    let long_id = "é".repeat(64); // 128 bytes
    let nasty_id = "'\n\0\\".repeat(32);
    let ids: Vec<String> = (0..6000).map(|i| long_id[..120].to_string() + &format!("{i:08}")).collect();
    let mut stored: Vec<(&str, &str, &str)> = vec![(&org, &ctl, &nasty_id), ("org-1", "proj-1", "")];
    stored.extend(ids.iter().step_by(3).map(|id| ("org-1", "proj-1", id.as_str())));
    let rows = tally::sink::flight::Flight::encode(Vec::new(), Default::default(), |rows, row| {
        for (i, (o, p, id)) in stored.iter().enumerate() {
            for s in [o, p, id, &"span-create"] {
                rows.string(s);
            }
            rows.datetime(1_795_000_000);
            rows.datetime(1_795_000_000 - 1_795_000_000 % 3600);
            rows.u64(tally::dedupe::EventKey::new(o, p, id).short());
            for _ in 0..4 {
                rows.varint(0); // no meters, no unique meters
            }
            rows.string("t");
            rows.u32(3); // src_partition: the partition its staging table names
            rows.u64(i as u64);
            rows.i32(-1);
            rows.datetime(1_795_000_000);
            row(rows, tally::sink::flight::RowMeta { partition: 3, group: i as u64, ..Default::default() });
        }
    });
    // An attempt whose staging table does not hold every row sent (as after a server restart,
    // which empties Memory tables) fails and writes nothing; its staging table is left for the fence.
    let topic = &w.kafka.topic;
    let short = w.ch.insert_attempt(topic, &rows.partitions(), rows.body(), stored.len() + 1).unwrap_err();
    assert_eq!(short.error.code(), Some(395), "{:?}", short.error);
    assert_eq!(w.scalar("SELECT count() FROM events"), 0);
    // Its staging table is left for a fence, and names partition 3: a state load of other
    // partitions leaves it alone, but fences a table of an older version, which names none.
    let old = format!("{}{:032x}", tally::sink::stage::stage_prefix(topic), 1u128);
    w.ch.execute(&format!("CREATE TABLE {old} AS events ENGINE = Memory"), true).unwrap();
    assert_eq!(w.ch.fence_partitions(topic, &[0, 1, 2, 4]).unwrap(), 1, "only the unnamed attempt is fenced");
    assert_eq!(w.scalar(&format!("SELECT count() FROM system.tables WHERE name = '{}'", short.stage)), 1);
    assert_eq!(w.ch.fence_partitions(topic, &[2, 3]).unwrap(), 1, "the failed attempt's staging table is fenced");
    assert_eq!(w.scalar(&format!("SELECT count() FROM system.tables WHERE name = '{}'", short.stage)), 0);
    w.ch.insert_events(topic, &rows).unwrap();
    assert_eq!(w.ch.fence_partitions(topic, &[3]).unwrap(), 0, "a written attempt leaves no staging table");

    let mut asked: Vec<(&str, &str, &str)> = ids.iter().map(|id| ("org-1", "proj-1", id.as_str())).collect();
    asked.extend([(&*org, &*ctl, &*nasty_id), (&*org, &*ctl, "x"), ("org-1", "proj-1", ""), ("org-1", "proj-2", "")]);
    let found = w.ch.existing(&asked).unwrap();
    let expected: std::collections::HashSet<_> =
        stored.iter().map(|(o, p, id)| tally::dedupe::EventKey::new(o, p, id)).collect();
    assert_eq!(found.len(), stored.len(), "{} of {} stored keys found", found.len(), stored.len());
    assert_eq!(found, expected);
    assert!(w.ch.existing(&[]).unwrap().is_empty());
}

/// A fence returns only once a move out of the fenced staging table is over. On current
/// ClickHouse (Atomic databases) `DROP TABLE` returns at once while a query that opened the table
/// goes on writing (found by a review): a retry's re-check, or a new owner's dedupe-state load,
/// would then miss rows that land after it. Here a slow INSERT … SELECT runs under the move's
/// query id of an attempt of partition 3 (18.16's own `DROP` would wait for a real reader, so
/// the query id is what is tested): a fence of other partitions does not wait for it, and a
/// fence of partition 3 — asked again, as the worker does, while it answers `MoveRunning` —
/// returns after every row of it landed (without the wait: 0 of 6 rows).
#[test]
fn a_fence_waits_for_a_move_still_running() {
    use tally::sink::EventStore;
    let w = World::new("movewait");
    let topic = w.kafka.topic.clone();
    let stage = tally::sink::stage::stage_name(&topic, &[3]);
    w.ch.execute("CREATE TABLE probe (n UInt64) ENGINE = MergeTree ORDER BY n", true).unwrap();
    // Six one-row blocks, each after a second's sleep: ~6 s in all.
    let slow = {
        let ch = w.ch.clone();
        let id = format!("{stage}_move");
        std::thread::spawn(move || {
            ch.execute_with(
                "INSERT INTO probe SELECT number + sleep(1) FROM system.numbers LIMIT 6",
                &[("query_id", &id), ("max_block_size", "1")],
            )
        })
    };
    let running = format!("SELECT count() FROM system.processes WHERE query_id = '{stage}_move'");
    while w.scalar(&running) == 0 {
        assert!(!slow.is_finished(), "the slow move ended before it was seen running: {:?}", slow.join());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Attempts of other partitions are not waited for (a wait of more than 2 s fails).
    w.ch.fence_partitions(&topic, &[0, 4]).expect("a fence of other partitions does not wait");
    let mut still_running = 0;
    loop {
        match w.ch.fence_partitions(&topic, &[3]) {
            Ok(_) => break,
            Err(tally::sink::clickhouse::ChError::MoveRunning(id)) => {
                assert_eq!(id, format!("{stage}_move"));
                still_running += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(w.scalar("SELECT count() FROM probe"), 6, "rows landed after the fence returned");
    assert!(still_running >= 1, "a 6 s move outlasts one 2 s wait");
    slow.join().unwrap().unwrap();
}

/// Kafka header names are bytes: a producer may send one that is not UTF-8. The worker reads
/// names as bytes (`source::headers`), bills the valid message and dead-letters the malformed one
/// with its headers copied whole; `tally-ingest dead-letters` (`admin::read_dead_letters`) then
/// lists it. Until it read names as bytes too, the listing panicked on such a dead letter
/// (rdkafka 0.38's `Headers::iter` unwraps a UTF-8 conversion; found by a review).
#[test]
fn header_names_that_are_not_utf8_pass_through() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let w = World::new("rawnames");
    let t = w.keys.tenants[0].clone();
    let auth = basic(&t);
    let p: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let mut sent = Vec::new();
    for (tag, value) in
        [("1", r#"{"id":"n1","type":"trace-create","timestamp":"2026-11-28T10:00:00Z"}"#), ("2", "{not json")]
    {
        let h = OwnedHeaders::new()
            .insert(Header { key: "authorization", value: Some(auth.as_str()) })
            .insert(Header { key: H_LOADGEN_ID, value: Some(tag) });
        let name: &[u8] = b"x-\xff\xfe-name";
        // SAFETY: `as_borrowed` is the headers' own pointer; `rd_kafka_header_add` copies the
        // name and value (lengths given) into the list, which `h` goes on owning.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_header_add(
                h.as_borrowed() as *const _ as *mut rdkafka::bindings::rd_kafka_headers_t,
                name.as_ptr().cast(),
                name.len() as isize,
                b"v".as_ptr().cast(),
                1,
            )
        };
        assert_eq!(err, rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
        let record = FutureRecord::to(&w.kafka.topic).key(&t.project_id).payload(value).headers(h);
        let d = tokio_block_on(p.send(record, Duration::from_secs(30))).map_err(|(e, _)| e).unwrap();
        sent.push((d.partition, d.offset));
    }
    let worker = Running(Some(w.worker("1")));
    tally::admin::wait_committed(&w.kafka, &end_offsets(&sent), Duration::from_secs(120)).unwrap();
    worker.stop();
    assert_eq!(billed_events(&w), 1, "the valid message is billed");
    assert_eq!(w.dead_letters(), vec![(2, None, "malformed".to_string())], "the malformed one is listed");
}

/// Producers compress: Kafka clients offer gzip, snappy, lz4 and zstd (`compression.type`), and
/// the broker stores the batches as the producer sent them, so the worker's client decodes them. A
/// message of every codec, produced by an independent client (confluent-kafka's own librdkafka,
/// `scripts/venv.sh`), is billed once. Until rdkafka was built with `zstd`, the zstd message
/// stalled its partition: "Decompression (codec 0x4) … Not implemented" on every poll, nothing
/// committed past it.
#[test]
fn messages_of_every_compression_codec_are_billed() {
    let w = World::new("codecs");
    let codecs = ["none", "gzip", "snappy", "lz4", "zstd"];
    let messages: Vec<(&str, String)> = codecs.iter().map(|c| (*c, format!("{{'id': 'codec-{c}'}}"))).collect();
    let sent = produce_compressed(&w, &messages);
    assert_eq!(sent.len(), codecs.len());
    let worker = Running(Some(w.worker("1")));
    // Without zstd in the worker's librdkafka, the zstd message stalled its partition here.
    tally::admin::wait_committed(&w.kafka, &end_offsets(&sent), Duration::from_secs(120)).unwrap();
    worker.stop();
    let ids: Vec<String> =
        w.rows("SELECT event_id FROM events FINAL ORDER BY event_id").into_iter().map(|r| r[0].clone()).collect();
    assert!(w.dead_letters().is_empty(), "none was rejected");
    assert_eq!(billed_events(&w), codecs.len() as u64, "each billed once");
    let mut want: Vec<String> = codecs.iter().map(|c| format!("codec-{c}")).collect();
    want.sort();
    assert_eq!(ids, want, "one row per codec");
}

/// Produces one message per `(codec, fields)` with confluent-kafka (its own librdkafka, every
/// codec; `scripts/venv.sh`), as tenant 0 of `w`: a `trace-create` event stamped now, updated
/// with `fields` (a Python dict expression). Returns each message's (partition, offset).
fn produce_compressed(w: &World, messages: &[(&str, String)]) -> Vec<(i32, i64)> {
    let t = &w.keys.tenants[0];
    let now = tally::timestamp::format_rfc3339(tally::source::worker::now_secs());
    let sends: String = messages.iter().map(|(codec, fields)| format!("send({codec:?}, {fields})\n")).collect();
    let script = format!(
        r#"
import json, sys
from confluent_kafka import Producer
out = []
def send(codec, fields):
    p = Producer({{"bootstrap.servers": "{brokers}", "compression.type": codec, "linger.ms": 0,
                  "message.max.bytes": 1000000000}})
    v = {{"type": "trace-create", "timestamp": "{now}"}}
    v.update(fields)
    p.produce("{topic}", key="{key}", value=json.dumps(v), headers=[("authorization", {auth:?})],
              on_delivery=lambda e, m: out.append((e, m.partition(), m.offset())))
    if p.flush(60) != 0:
        sys.exit("a message was not delivered in 60 s")
{sends}
for e, part, off in out:
    if e is not None: sys.exit(str(e))
    print(part, off)
"#,
        brokers = common::brokers(),
        topic = w.kafka.topic,
        key = t.project_id,
        auth = basic(t),
    );
    let root = env!("CARGO_MANIFEST_DIR");
    let venv = std::process::Command::new(format!("{root}/scripts/venv.sh")).output().unwrap();
    assert!(venv.status.success(), "scripts/venv.sh: {}", String::from_utf8_lossy(&venv.stderr));
    let python = String::from_utf8(venv.stdout).unwrap().trim().to_string();
    let out = std::process::Command::new(python).arg("-c").arg(&script).output().unwrap();
    assert!(out.status.success(), "producer: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (p, o) = l.split_once(' ').unwrap();
            (p.parse().unwrap(), o.parse().unwrap())
        })
        .collect()
}

/// A message far over `ingest.max_message_bytes` that came compressed (200 MB of repeats, a few
/// hundred KB in gzip) is dead-lettered whole as `too_large`, and its dead letter can be read back
/// with the client's default settings: the dead-letter producer compresses with lz4, which
/// librdkafka decompresses without the `receive.message.max.bytes` cap it puts on zstd (with zstd
/// the listing below failed on it).
#[test]
fn a_compressed_message_far_over_the_limit_is_dead_lettered_and_readable() {
    let w = World::new("bomb");
    let sent = produce_compressed(&w, &[("gzip", "{'id': 'huge', 'pad': '0' * 200_000_000}".to_string())]);
    let worker = Running(Some(w.worker("1")));
    tally::admin::wait_committed(&w.kafka, &end_offsets(&sent), Duration::from_secs(120)).unwrap();
    worker.stop();
    let letters = tally::admin::read_dead_letters(&w.kafka, None, Duration::from_secs(4)).unwrap();
    let got: Vec<(&str, i32, i64)> =
        letters.iter().map(|d| (d.reason.as_str(), d.source_partition, d.source_offset)).collect();
    assert_eq!(got, [("too_large", sent[0].0, sent[0].1)]);
    assert_eq!(w.scalar("SELECT count() FROM events"), 0, "nothing billed");
}
