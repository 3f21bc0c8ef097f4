//! End to end on the real services (`scripts/start.sh`): one topic of generated traffic, and in
//! the same run
//!
//! * the raw consume of it (librdkafka, nothing done with the messages),
//! * `tally-ingest` with 1 worker, then with 2, from partitions assigned to caught up,
//! * a replay: a new group re-reading the already-counted events,
//! * the same narrow rows inserted into a plain copy of `events` (no views) and into the whole
//!   schema (the views that keep the hourly aggregates, reading the worker's carrier rows); and,
//!   for comparison, the whole schema with schema 006's views (before 007 filtered them) and the
//!   same pair for the schema before carrier rows,
//!
//! each as a ratio to its yardstick. Totals are checked against the generator after every run, so
//! a fast wrong answer cannot pass. Results go to stdout and, as JSON, to `target/bench/ingest.json`
//! (`scripts/bench.sh` turns them into `docs/benchmarks.md` and its plot).
//!
//! `BENCH_EVENTS` (default 1,000,000) and `BENCH_ROUNDS` (default 2) size a run.
//! `BENCH_FIRST_ONLY` (set to anything) stops after the rounds' raw consumes and first passes, for
//! comparing two worker binaries run after run (docs/measurements.md, "librdkafka on mimalloc").

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::process::Child;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use common::World;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The production defaults for batching and dedupe memory (the test harness shrinks them).
const PRODUCTION: [(&str, &str); 4] = [
    ("TALLY_INGEST_BATCH_MAX_MESSAGES", "20000"),
    ("TALLY_INGEST_BATCH_MAX_WAIT_MS", "250"),
    ("TALLY_DEDUPE_BLOOM_BYTES_PER_PARTITION", "16777216"),
    ("TALLY_DEDUPE_RECENT_KEYS_PER_PARTITION", "262144"),
];

/// CPU seconds (user + system) that the processes in `pids` have used so far, from
/// `/proc/<pid>/stat` (Linux, proc(5): fields 14 and 15, in clock ticks).
fn cpu_secs(pids: &[u32]) -> f64 {
    let ticks: f64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0);
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| {
            // The command name may hold spaces: fields are counted after its closing parenthesis.
            let rest: Vec<&str> = stat[stat.rfind(')').unwrap_or(0) + 1..].split_whitespace().collect();
            let tick = |i: usize| rest.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (tick(11) + tick(12)) / ticks
        })
        .sum()
}

/// Processes whose command name (`/proc/<pid>/comm`) starts with `name`.
fn pids_named(name: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with(name)))
        .collect()
}

/// CPU seconds used during a pass, per process kind.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    /// The tally-ingest workers (or, for a raw consume, the bench process itself).
    consumer: f64,
    clickhouse: f64,
    broker: f64,
}

impl Cpu {
    fn now(consumers: &[u32]) -> Cpu {
        Cpu {
            consumer: cpu_secs(consumers),
            clickhouse: cpu_secs(&pids_named("clickhouse")),
            broker: cpu_secs(&pids_named("tansu")),
        }
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            consumer: self.consumer - before.consumer,
            clickhouse: self.clickhouse - before.clickhouse,
            broker: self.broker - before.broker,
        }
    }

    fn json(self) -> serde_json::Value {
        json!({ "consumer": self.consumer, "clickhouse": self.clickhouse, "broker": self.broker })
    }
}

/// Reads every partition from the beginning up to `end` and does nothing with the messages.
fn raw_consume(world: &World, end: &BTreeMap<i32, i64>) -> (f64, Cpu) {
    let mut cfg = tally::source::consumer_config(&world.kafka);
    cfg.set("group.id", format!("raw-{}", world.name)).set("enable.auto.commit", "false");
    let c: BaseConsumer = cfg.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in end.keys() {
        tpl.add_partition_offset(&world.kafka.topic, *p, Offset::Beginning).unwrap();
    }
    let me = [std::process::id()];
    let cpu0 = Cpu::now(&me);
    let t = Instant::now();
    c.assign(&tpl).unwrap();
    let mut left: BTreeMap<i32, i64> = end.iter().filter(|(_, o)| **o > 0).map(|(p, o)| (*p, *o)).collect();
    let mut bytes = 0usize;
    while !left.is_empty() {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            bytes += m.payload_len();
            if left.get(&m.partition()).is_some_and(|e| m.offset() + 1 >= *e) {
                left.remove(&m.partition());
            }
        }
        assert!(t.elapsed() < Duration::from_secs(600), "raw consume did not finish");
    }
    std::hint::black_box(bytes);
    let secs = t.elapsed().as_secs_f64();
    (secs, Cpu::now(&me).since(cpu0))
}

/// One pass of `ingest`.
struct Pass {
    /// Seconds from the first assignment until every partition's committed offset reached the end.
    secs: f64,
    /// Seconds from the start of the first worker to its first assignment (the group join).
    join: f64,
    /// CPU used from the first assignment until caught up.
    cpu: Cpu,
    /// With several workers: seconds from the first assignment until every worker holds its
    /// share (the rebalance that brought in the others is over), and the rows in `events` by
    /// then (written, committed or not: a batch that landed just before a revocation is not
    /// committed, and its next owner only reads it again).
    settled: Option<(f64, u64)>,
}

/// How a pass's workers join their group.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// The first worker alone; the others once it holds its partitions (a rebalance follows).
    OneThenOthers,
    /// The others 1 s after the first, within tansu's hold of the group's first JoinGroup round
    /// (half the session timeout, 3 s): as replicas of one deployment start, in one round.
    Together,
}

/// Starts `workers` workers in group `group` and waits until they caught up with `end`.
fn ingest(world: &World, group: &str, workers: usize, end: &BTreeMap<i32, i64>) -> Pass {
    ingest_as(world, group, workers, end, Start::OneThenOthers)
}

/// [`ingest`], the workers joining as `how` says. Times run from the first assignment of any.
fn ingest_as(world: &World, group: &str, workers: usize, end: &BTreeMap<i32, i64>, how: Start) -> Pass {
    let t0 = Instant::now();
    // Group ids are global on the broker: one per world and pass.
    let group = &format!("{}-{group}", world.name);
    let labels: Vec<String> = (0..workers).map(|i| format!("{group}-{i}")).collect();
    let start = |l: &str| {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(world.log_path(l)).unwrap();
        world.cli(&["run"]).envs(PRODUCTION).env("TALLY_KAFKA_GROUP_ID", group).stderr(log).spawn().unwrap()
    };
    // The first worker alone, then the others as soon as it has its partitions: tansu can leave a
    // brand-new group without an assignment when its first members join at the same instant, so
    // the rebalance that hands them their share is part of the measured time.
    let mut children: Vec<Child> = vec![start(&labels[0])];
    if how == Start::Together {
        std::thread::sleep(Duration::from_secs(1));
        children.extend(labels[1..].iter().map(|l| start(l)));
    }
    while labels.iter().all(|l| world.assignments(l) == 0) {
        assert!(t0.elapsed() < Duration::from_secs(120), "no assignment");
        std::thread::sleep(Duration::from_millis(5));
    }
    let cpu0 = Cpu::now(&children.iter().map(Child::id).collect::<Vec<_>>());
    let assigned = Instant::now();
    if how == Start::OneThenOthers {
        children.extend(labels[1..].iter().map(|l| start(l)));
    }
    let mut cfg = tally::source::client_config(&world.kafka);
    cfg.set("group.id", group).set("enable.auto.commit", "false");
    let c: BaseConsumer = cfg.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in end.keys() {
        tpl.add_partition(&world.kafka.topic, *p);
    }
    let mut settled = None;
    loop {
        let got = c.committed_offsets(tpl.clone(), Duration::from_secs(10)).unwrap();
        if workers > 1
            && settled.is_none()
            && held_partitions(world, &labels[0]) >= 2
            && labels[1..].iter().all(|l| held_partitions(world, l) >= 1)
        {
            let rows = world.scalar("SELECT count() FROM events");
            settled = Some((assigned.elapsed().as_secs_f64(), rows));
        }
        let done = got.elements().iter().all(|e| match e.offset() {
            Offset::Offset(o) => o >= end[&e.partition()],
            _ => end[&e.partition()] == 0,
        });
        if done {
            break;
        }
        assert!(assigned.elapsed() < Duration::from_secs(900), "not caught up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let caught_up = assigned.elapsed().as_secs_f64();
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    // Workers started after the assignment used nothing before it; CPU of the others before it
    // was taken off by `cpu0`.
    let cpu = Cpu::now(&pids).since(cpu0);
    common::stop_all(children);
    Pass { secs: caught_up, join: (assigned - t0).as_secs_f64(), cpu, settled }
}

/// How many non-empty assignments the worker logging to `label` has received.
fn held_partitions(world: &World, label: &str) -> usize {
    let log = std::fs::read(world.log_path(label)).unwrap_or_default();
    String::from_utf8_lossy(&log).lines().filter(|l| l.contains("partitions assigned") && !l.contains("=[]")).count()
}

/// The narrow rows of `world`, in arrival order, as RowBinary chunks of `per` rows of `columns`.
fn export_rows(world: &World, per: u64, columns: &str) -> Vec<Vec<u8>> {
    let n = world.scalar("SELECT count() FROM events");
    (0..n.div_ceil(per))
        .map(|i| {
            world
                .ch
                .query(&format!(
                    "SELECT {columns} FROM events ORDER BY src_partition, src_offset, batch_index LIMIT {per} OFFSET {} FORMAT RowBinary",
                    i * per
                ))
                .unwrap()
        })
        .collect()
}

/// Inserts `chunks` (RowBinary of `columns`) into a fresh database made of `schema`: wall seconds,
/// and the CPU seconds (user + system) the ClickHouse server used meanwhile, its work.
fn insert_into(world: &World, db: &str, schema: &[String], columns: &str, chunks: &[Vec<u8>]) -> (f64, f64) {
    let ch = &world.ch;
    ch.execute(&format!("DROP DATABASE IF EXISTS {db}"), false).unwrap();
    for sql in schema {
        ch.execute(&sql.replace("${database}", db), false).unwrap();
    }
    let server = pids_named("clickhouse");
    let (t, cpu) = (Instant::now(), cpu_secs(&server));
    for c in chunks {
        ch.insert(&format!("INSERT INTO {db}.events ({columns}) FORMAT RowBinary"), c).unwrap();
    }
    let (s, cpu) = (t.elapsed().as_secs_f64(), cpu_secs(&server) - cpu);
    ch.execute(&format!("DROP DATABASE {db}"), false).unwrap();
    (s, cpu)
}

/// The statements of the built-in migrations up to and including `last` (split as
/// `tally-ingest migrate` splits them); with `plain`, only those that make the database and the
/// `events` table (no aggregate table, no view).
fn schema(last: &str, plain: bool) -> Vec<String> {
    tally::sink::schema::BUILTIN
        .iter()
        .take_while(|(name, _)| *name <= last)
        .flat_map(|(_, sql)| tally::sink::schema::statements(sql))
        .filter(|s| {
            !plain
                || s.starts_with("CREATE DATABASE")
                || s.starts_with("CREATE TABLE IF NOT EXISTS ${database}.events\n")
                || s.starts_with("ALTER TABLE ${database}.events")
        })
        .collect()
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::MAX, f64::min)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let events = env_or("BENCH_EVENTS", 1_000_000);
    let rounds = env_or("BENCH_ROUNDS", 2) as usize;
    let first_only = std::env::var_os("BENCH_FIRST_ONLY").is_some();
    let world = World::tenants("bench", 10, 6);
    let t = Instant::now();
    let e = world.generate(&world.gen_config(events, 7));
    let produce_s = t.elapsed().as_secs_f64();
    let bytes: u64 = world.scalar("SELECT 0"); // keeps the connection warm
    std::hint::black_box(bytes);
    println!("generated {} events in {} messages ({} accepted) in {produce_s:.1} s", e.events, e.messages, e.accepted);

    let mut raw = Vec::new();
    let mut first = Vec::new();
    let mut join = Vec::new();
    let mut replay = Vec::new();
    // CPU seconds of the best raw consume and of the best first pass.
    let (mut raw_cpu, mut first_cpu) = ((f64::MAX, Cpu::default()), (f64::MAX, Cpu::default()));
    for r in 0..rounds {
        let (s, cpu) = raw_consume(&world, &e.end_offsets);
        raw.push(s);
        if s < raw_cpu.0 {
            raw_cpu = (s, cpu);
        }
        println!("raw consume: {:.2} s (CPU: consumer {:.2} s, broker {:.2} s)", s, cpu.consumer, cpu.broker);
        // A first pass needs an empty store: every round but the first starts from a fresh database.
        if r > 0 {
            reset_store(&world);
        }
        let Pass { secs: s, join: j, cpu, .. } = ingest(&world, &format!("first{r}"), 1, &e.end_offsets);
        world.assert_totals(&e);
        first.push(s);
        join.push(j);
        if s < first_cpu.0 {
            first_cpu = (s, cpu);
        }
        println!(
            "tally-ingest, 1 worker, first pass: {s:.2} s (+{j:.1} s to the first assignment; CPU: worker {:.2} s, \
             ClickHouse {:.2} s, broker {:.2} s)",
            cpu.consumer, cpu.clickhouse, cpu.broker
        );
        if first_only {
            continue;
        }
        let s = ingest(&world, &format!("replay{r}"), 1, &e.end_offsets).secs;
        world.assert_totals(&e);
        replay.push(s);
        println!("tally-ingest, 1 worker, replay: {s:.2} s");
    }
    if first_only {
        world.delete_topics();
        return;
    }
    reset_store(&world);
    let two_pass = ingest(&world, "two", 2, &e.end_offsets);
    world.assert_totals(&e);
    let two = two_pass.secs;
    // After the rebalance: the two workers' time per row left to write, against the one
    // worker's time per row over the pass (tansu holds every JoinGroup for half the session
    // timeout, docs/services.md, so the rebalance itself costs ~3 s in which nobody fetches).
    let rows_total = world.scalar("SELECT count() FROM events");
    let (settled_s, settled_rows, two_after) = match two_pass.settled {
        Some((secs, rows)) if rows < rows_total => {
            let after = ((two - secs) / (rows_total - rows) as f64) / (min(&first) / rows_total as f64);
            println!(
                "tally-ingest, 2 workers, first pass: {two:.2} s (both workers held partitions after {secs:.2} s, \
                 with {rows} of {rows_total} rows written; then {:.2} s for the rest: {after:.2}× the best 1-worker \
                 pass's time per row)",
                two - secs
            );
            (Some(secs), Some(rows), Some(after))
        }
        _ => {
            println!("tally-ingest, 2 workers, first pass: {two:.2} s (caught up before both workers held partitions)");
            (None, None, None)
        }
    };

    // Two workers started as one deployment's replicas: both in the group's first join round.
    reset_store(&world);
    let together = ingest_as(&world, "together", 2, &e.end_offsets, Start::Together);
    world.assert_totals(&e);
    let rebalances = held_partitions(&world, &format!("{}-together-0", world.name))
        + held_partitions(&world, &format!("{}-together-1", world.name));
    println!(
        "tally-ingest, 2 workers started together: {:.2} s ({:.2}× the best 1-worker pass; {rebalances} non-empty \
         assignments between them, 2 = one join round)",
        together.secs,
        together.secs / min(&first)
    );

    // The narrow rows of the last first pass, in the same run: as a worker wrote them (carrier
    // columns included) into today's schema, against the plain insert of the narrow rows (the
    // per-event columns, into a copy of `events` without views); and, to see what each part costs,
    // the rows with their carrier columns into a plain copy, and the narrow rows into the schema
    // before carrier rows (views over every event's meters, schemas/001 + 005), and with schema
    // 006's views (before 007 filtered out the rows counted by carriers).
    let rows = rows_total;
    let all = format!("{}, {}", tally::sink::EVENTS_COLUMNS, tally::sink::carrier::CARRIER_COLUMNS);
    let (chunks, chunks_before) =
        (export_rows(&world, 75_000, &all), export_rows(&world, 75_000, tally::sink::EVENTS_COLUMNS));
    let last = tally::sink::schema::BUILTIN.last().unwrap().0;
    let targets = [
        ("plain", schema("005_unique_daily.sql", true), &tally::sink::EVENTS_COLUMNS.to_string(), &chunks_before),
        ("plain_carriers", schema(last, true), &all, &chunks),
        ("full", schema(last, false), &all, &chunks),
        ("full_006", schema("006_carriers.sql", false), &all, &chunks),
        (
            "full_before",
            schema("005_unique_daily.sql", false),
            &tally::sink::EVENTS_COLUMNS.to_string(),
            &chunks_before,
        ),
    ];
    let mut inserts: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut insert_cpu: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    // Inserts are short and noisy: more rounds, interleaved.
    for _ in 0..rounds.max(5) {
        for (name, schema, columns, chunks) in &targets {
            let db = format!("{}_{name}", world.ch.database());
            let (s, cpu) = insert_into(&world, &db, schema, columns, chunks);
            inserts.entry(name).or_default().push(s);
            insert_cpu.entry(name).or_default().push(cpu);
        }
    }
    let (plain_s, full_s) = (&inserts["plain"], &inserts["full"]);
    println!(
        "insert {rows} narrow rows: plain {:.2} s, with the aggregates {:.2} s (plain with the carrier columns {:.2} s; \
         with schema 006's views {:.2} s; the schema before carrier rows, views over every event's meters: {:.2} s)",
        min(plain_s),
        min(full_s),
        min(&inserts["plain_carriers"]),
        min(&inserts["full_006"]),
        min(&inserts["full_before"])
    );
    println!(
        "ClickHouse CPU for those inserts: plain {:.2} s, with the aggregates {:.2} s (plain with the carrier columns \
         {:.2} s; 006's views {:.2} s; before carrier rows {:.2} s)",
        min(&insert_cpu["plain"]),
        min(&insert_cpu["full"]),
        min(&insert_cpu["plain_carriers"]),
        min(&insert_cpu["full_006"]),
        min(&insert_cpu["full_before"])
    );

    // Latency: one worker consumes from the end of the topic while new traffic arrives at a
    // steady rate, and reports each message's event-to-aggregate latency.
    let max_rate = e.events as f64 / min(&first);
    let lat = latency(&world, &e, (max_rate / 2.0) as u64);
    let rate = lat.3;
    println!(
        "latency at {rate:.0} events/s sent ({:.2}× the first pass's rate): p50 ≤ {} s, p99 ≤ {} s over {} messages",
        rate / max_rate,
        lat.0,
        lat.1,
        lat.2
    );

    let (raw_b, first_b, replay_b, plain_b, full_b) = (min(&raw), min(&first), min(&replay), min(plain_s), min(full_s));
    let out = json!({
        "events": e.events, "messages": e.messages, "accepted": e.accepted, "rows": rows,
        "produce_s": produce_s,
        "raw_consume_s": raw, "first_pass_s": first, "first_join_s": join, "replay_s": replay,
        "two_workers_s": two, "two_workers_settled_s": settled_s, "two_workers_settled_rows": settled_rows,
        "two_workers_together_s": together.secs, "two_workers_together_assignments": rebalances,
        "insert_plain_s": plain_s, "insert_full_s": full_s,
        "insert_plain_with_carrier_columns_s": inserts["plain_carriers"], "insert_full_before_carriers_s": inserts["full_before"],
        "insert_full_006_views_s": inserts["full_006"],
        // The ClickHouse server's CPU seconds during each of those inserts (the work, not the wait).
        "insert_cpu_s": insert_cpu,
        "ratios": {
            "first_pass_vs_raw_consume": first_b / raw_b,
            "two_workers_vs_one": two / first_b,
            "two_workers_vs_one_after_the_rebalance": two_after,
            "two_workers_together_vs_one": together.secs / first_b,
            "replay_rate_vs_first_pass": first_b / replay_b,
            "aggregates_vs_plain_insert": full_b / plain_b,
            "aggregates_vs_plain_insert_cpu": min(&insert_cpu["full"]) / min(&insert_cpu["plain"]),
            "aggregates_vs_plain_insert_before_carriers_cpu": min(&insert_cpu["full_before"]) / min(&insert_cpu["plain"]),
            "aggregates_vs_plain_insert_before_carriers": min(&inserts["full_before"]) / plain_b,
            "carrier_columns_vs_plain_insert": min(&inserts["plain_carriers"]) / plain_b,
            "aggregates_vs_plain_insert_006_views": min(&inserts["full_006"]) / plain_b,
            "aggregates_vs_plain_insert_006_views_cpu": min(&insert_cpu["full_006"]) / min(&insert_cpu["plain"]),
        },
        "events_per_s": { "first_pass": e.events as f64 / first_b, "replay": e.events as f64 / replay_b },
        // Where the 2 cores go: CPU seconds of the best raw consume and of the best first pass.
        "cpu_s": { "raw_consume": raw_cpu.1.json(), "first_pass": first_cpu.1.json() },
        "latency": { "rate_events_per_s": rate, "vs_max_rate": rate / max_rate,
                     "p50_le_s": lat.0, "p99_le_s": lat.1, "messages": lat.2 },
    });
    println!("{}", serde_json::to_string_pretty(&out["ratios"]).unwrap());
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write("target/bench/ingest.json", serde_json::to_string_pretty(&out).unwrap()).unwrap();
    world.delete_topics();
}

/// Sends `rate` events/s for 10 s while one worker consumes from the end of the topic (a new
/// group whose offsets are committed at `before`'s end offsets: everything before is counted);
/// the messages are built before the clock starts, as building them costs more than sending.
/// Returns the upper bounds of the buckets holding p50 and p99 of
/// `tally_event_to_aggregate_seconds`, how many messages it counted, and the rate achieved
/// (events/s from the first message sent to the last acknowledged).
fn latency(world: &World, before: &tally::loadgen::expected::Expected, rate: u64) -> (f64, f64, u64, f64) {
    let metrics = common::free_addr();
    let group = format!("{}-latency", world.name);
    let label = group.clone();
    {
        let mut cfg = tally::source::client_config(&world.kafka);
        cfg.set("group.id", &group).set("enable.auto.commit", "false");
        let c: BaseConsumer = cfg.create().unwrap();
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &before.end_offsets {
            tpl.add_partition_offset(&world.kafka.topic, *p, Offset::Offset(*o)).unwrap();
        }
        c.commit(&tpl, rdkafka::consumer::CommitMode::Sync).unwrap();
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(world.log_path(&label)).unwrap();
    let worker = world
        .cli(&["run"])
        .envs(PRODUCTION)
        .env("TALLY_KAFKA_GROUP_ID", &group)
        .env("TALLY_METRICS_LISTEN", &metrics)
        .stderr(log)
        .spawn()
        .unwrap();
    assert!(world.wait_assigned(&label, Duration::from_secs(120)), "latency worker joined");
    let gen = tally::loadgen::GenConfig {
        rate,
        prebuild: true,
        first_message_id: 10_000_000,
        ..world.gen_config(rate * 10, 8)
    };
    let e = world.generate(&gen);
    let kafka = tally::config::KafkaConfig { group_id: group, ..world.kafka.clone() };
    tally::admin::wait_committed(&kafka, &e.end_offsets, Duration::from_secs(300)).unwrap();
    let text = common::scrape(&metrics);
    common::stop_all(vec![worker]);
    let mut all = before.clone();
    common::merge(&mut all, &e);
    world.assert_totals(&all);
    // Cumulative buckets → the smallest upper bound holding the quantile.
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with("tally_event_to_aggregate_seconds_bucket"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let n: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, n))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    let q = |q: f64| buckets.iter().find(|(_, n)| *n >= q * total).map_or(f64::NAN, |b| b.0);
    (q(0.5), q(0.99), total as u64, e.events as f64 / e.send_secs)
}

/// Empties the tables (not the topic) so that the next pass counts everything anew.
fn reset_store(world: &World) {
    for t in ["events", "usage_hourly_agg", "usage_unique_hourly", "usage_unique_daily"] {
        world.ch.execute(&format!("TRUNCATE TABLE {t}"), true).unwrap();
    }
}
