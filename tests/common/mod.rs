//! Harness for end-to-end tests on the real services (started by scripts/start.sh): unique
//! topics, database and group per test; addresses from env vars with localhost defaults.

#![allow(dead_code)]

pub mod proxy;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

use tally::config::KafkaConfig;
use tally::devkeys::DevKeys;
use tally::loadgen::expected::Expected;
use tally::loadgen::{GenConfig, H_LOADGEN_ID};
use tally::meter::DEFAULT_METERS_TOML;
use tally::sink::clickhouse::ClickHouse;

pub const PARTITIONS: i32 = 6;

pub fn brokers() -> String {
    std::env::var("TALLY_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The development services' state directory (`scripts/lib.sh`: `TALLYDEV_STATE_DIR`, else
/// `.local` in the checkout).
pub fn state_dir() -> PathBuf {
    std::env::var("TALLYDEV_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".local"))
}

/// Sends `signal` ("KILL", "TERM") to the shared ClickHouse server (the pid `scripts/start.sh`
/// recorded) and waits until it is gone (at most 60 s).
fn signal_clickhouse_server(signal: &str) {
    let pid = std::fs::read_to_string(state_dir().join("clickhouse/pid")).expect("ClickHouse pid file");
    let pid = pid.trim();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(String::from_utf8_lossy(&cmdline).contains("clickhouse-server"), "pid {pid} is ClickHouse");
    assert!(Command::new("kill").args([&format!("-{signal}"), pid]).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(std::time::Instant::now() < deadline, "ClickHouse did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the shared ClickHouse server with `signal` and starts it again when dropped
/// (`scripts/start.sh` is idempotent and returns once it answers), so that a test failing while
/// it is down does not leave it down for every later test.
#[allow(dead_code)]
pub struct ClickHouseDown;

impl ClickHouseDown {
    #[allow(dead_code)]
    pub fn with(signal: &str) -> ClickHouseDown {
        signal_clickhouse_server(signal);
        ClickHouseDown
    }
}

impl Drop for ClickHouseDown {
    fn drop(&mut self) {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/start.sh");
        let ok =
            Command::new("bash").arg(script).stdout(std::process::Stdio::null()).status().is_ok_and(|s| s.success());
        if !ok && !std::thread::panicking() {
            panic!("scripts/start.sh failed to start ClickHouse again");
        }
    }
}

pub fn clickhouse_url() -> String {
    std::env::var("TALLY_TEST_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

/// One test's isolated world: topics, group, database, keys and config file.
pub struct World {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub keys: DevKeys,
    pub kafka: KafkaConfig,
    pub ch: ClickHouse,
    /// Bootstrap servers of this world's broker (host:port).
    pub brokers: String,
}

impl World {
    pub fn new(name: &str) -> World {
        World::with(name, &clickhouse_url(), "127.0.0.1:0")
    }

    /// A world whose workers reach ClickHouse at `ch_url` and serve metrics on `metrics`.
    pub fn with(name: &str, ch_url: &str, metrics: &str) -> World {
        World::build(name, ch_url, metrics, 10, 6, &brokers(), PARTITIONS)
    }

    /// A world on its own broker (`brokers`), with topics of `partitions` partitions.
    pub fn on_broker(name: &str, brokers: &str, partitions: i32) -> World {
        World::build(name, &clickhouse_url(), "127.0.0.1:0", 10, 6, brokers, partitions)
    }

    /// Deletes this world's topic and dead-letter topic. The development broker keeps every
    /// record in memory until its topic is deleted: a benchmark's 1 M events are 818 MB of JSON,
    /// and with many runs' topics left behind (13 GB measured) the kernel's memory monitor
    /// (`kdamond`) took a core of this 2-core machine (docs/measurements.md, "librdkafka on
    /// mimalloc").
    pub fn delete_topics(&self) {
        let names = [self.kafka.topic.as_str(), self.kafka.dlq_topic.as_str()];
        let admin = admin(&self.brokers);
        for r in tokio_block_on(admin.delete_topics(&names, &admin_options())).unwrap() {
            r.unwrap();
        }
    }

    /// A world with `orgs` × `projects_per_org` tenants.
    pub fn tenants(name: &str, orgs: usize, projects_per_org: usize) -> World {
        World::build(name, &clickhouse_url(), "127.0.0.1:0", orgs, projects_per_org, &brokers(), PARTITIONS)
    }

    fn build(
        name: &str,
        ch_url: &str,
        metrics: &str,
        orgs: usize,
        projects_per_org: usize,
        brokers: &str,
        partitions: i32,
    ) -> World {
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() % 100_000_000;
        let name = format!("{name}_{}_{stamp}", std::process::id());
        let dir = std::env::temp_dir().join(format!("tally-it-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let keys = DevKeys::generate(orgs, projects_per_org, "https://auth.tally.test", "tally-ingest");
        keys.write(&dir).unwrap();
        std::fs::write(dir.join("meters.toml"), DEFAULT_METERS_TOML).unwrap();
        let topic = format!("events-{name}");
        let dlq = format!("rejected-{name}");
        let config = dir.join("ingest.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[kafka]
brokers = "{brokers}"
topic = "{topic}"
dlq_topic = "{dlq}"
group_id = "group-{name}"
[kafka.options]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
"topic.metadata.refresh.interval.ms" = "2000"
[clickhouse]
url = "{ch_url}"
database = "it_{name}"
timeout_secs = 30
[auth]
jwks_path = "{dir}/jwks.json"
api_keys_path = "{dir}/api_keys.json"
issuer = "https://auth.tally.test"
reload_interval_secs = 1
[dedupe]
window_secs = 604800
bloom_bytes_per_partition = 65536
recent_keys_per_partition = 2000
[meters]
path = "{dir}/meters.toml"
[metrics]
listen = "{metrics}"
[ingest]
max_message_bytes = 65536
batch_max_messages = 5000
batch_max_wait_ms = 200
max_backoff_ms = 2000
"#,
                dir = dir.display(),
            ),
        )
        .unwrap();
        let cfg = tally::config::IngestConfig::load(Some(&config), Vec::new()).unwrap();
        create_topics_on(brokers, &[&topic, &dlq], partitions);
        let direct = tally::config::ClickHouseConfig { url: clickhouse_url(), ..cfg.clickhouse.clone() };
        let w = World {
            name,
            dir,
            config,
            keys,
            kafka: cfg.kafka.clone(),
            ch: ClickHouse::new(&direct),
            brokers: brokers.to_string(),
        };
        let status = w.cli(&["migrate"]).env("TALLY_CLICKHOUSE_URL", clickhouse_url()).status().unwrap();
        assert!(status.success(), "migrate failed");
        w
    }

    /// `tally-ingest --config <world> ARGS`, logging at `info` (`TALLY_TEST_RUST_LOG` overrides it,
    /// e.g. `info,tally::source::worker=debug` for every batch's stage times).
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tally-ingest"));
        let log = std::env::var("TALLY_TEST_RUST_LOG").unwrap_or_else(|_| "info,librdkafka=error".into());
        c.arg("--config").arg(&self.config).args(args).env("RUST_LOG", log);
        c
    }

    /// Starts a worker, logging to `<dir>/worker-<label>.log`.
    pub fn worker(&self, label: &str) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(label)).unwrap();
        self.cli(&["run"]).stderr(log).spawn().unwrap()
    }

    /// Starts a worker serving its metrics on `metrics` (host:port).
    pub fn worker_with_metrics(&self, label: &str, metrics: &str) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(label)).unwrap();
        self.cli(&["run"]).env("TALLY_METRICS_LISTEN", metrics).stderr(log).spawn().unwrap()
    }

    pub fn log_path(&self, label: &str) -> PathBuf {
        self.dir.join(format!("worker-{label}.log"))
    }

    /// Waits until the worker logging to `label` has been assigned partitions.
    pub fn wait_assigned(&self, label: &str, timeout: Duration) -> bool {
        self.wait_assignments(label, 1, timeout)
    }

    /// How many assignments the worker logging to `label` has received.
    pub fn assignments(&self, label: &str) -> usize {
        let log = std::fs::read(self.log_path(label)).unwrap_or_default();
        String::from_utf8_lossy(&log).matches("partitions assigned").count()
    }

    /// Waits until the worker logging to `label` has received at least `n` assignments.
    pub fn wait_assignments(&self, label: &str, n: usize, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.assignments(label) >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Waits until the worker logging to `label` has had no new assignment for 1 s (the group is
    /// stable: tansu keeps a member that leaves during a join round, docs/services.md); returns
    /// its assignments by then.
    pub fn wait_stable(&self, label: &str) -> usize {
        let mut stable = (self.assignments(label), std::time::Instant::now());
        while stable.1.elapsed() < Duration::from_secs(1) {
            let now = self.assignments(label);
            if now != stable.0 {
                stable = (now, std::time::Instant::now());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        stable.0
    }

    /// Stops `leaving` (SIGTERM, clean exit) and waits until `staying` was assigned again, i.e.
    /// the group finished the rebalance — so that nobody leaves in the middle of a join round,
    /// which tansu turns into a member that never goes away (docs/services.md).
    pub fn stop_then_settle(&self, leaving: Child, staying: &str) {
        let before = self.assignments(staying);
        stop_all(vec![leaving]);
        assert!(
            self.wait_assignments(staying, before + 1, Duration::from_secs(60)),
            "{staying} was not reassigned after its peer left"
        );
    }

    pub fn gen_config(&self, events: u64, seed: u64) -> GenConfig {
        GenConfig { events, seed, max_message_bytes: 65536, window_secs: 604_800, ..GenConfig::default() }
    }

    pub fn generate(&self, cfg: &GenConfig) -> Expected {
        let defs = tally::meter::parse_defs(DEFAULT_METERS_TOML).unwrap();
        let mut pc = ClientConfig::new();
        pc.set("bootstrap.servers", &self.brokers);
        tally::loadgen::generate(cfg, &self.keys, defs, &pc, &self.kafka.topic, |_| {}).unwrap()
    }

    pub fn wait_caught_up(&self, e: &Expected) {
        tally::admin::wait_committed(&self.kafka, &e.end_offsets, Duration::from_secs(600)).unwrap();
    }

    pub fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        let body = self.ch.query(&format!("{sql} FORMAT TabSeparated")).unwrap();
        String::from_utf8(body).unwrap().lines().map(|l| l.split('\t').map(str::to_string).collect()).collect()
    }

    /// `usage_hourly` as (org, project, meter, hour) → value.
    pub fn usage_hourly(&self) -> BTreeMap<(String, String, String, i64), u64> {
        self.rows("SELECT org_id, project_id, meter, toUInt32(hour), value FROM usage_hourly")
            .into_iter()
            .map(|r| ((r[0].clone(), r[1].clone(), r[2].clone(), r[3].parse().unwrap()), r[4].parse().unwrap()))
            .collect()
    }

    /// Unique meters per (org, project, meter, hour) from the sketches.
    pub fn unique_hourly(&self) -> BTreeMap<(String, String, String, i64), u64> {
        self.rows("SELECT org_id, project_id, meter, toUInt32(hour), uniqCombinedMerge(state) FROM usage_unique_hourly GROUP BY org_id, project_id, meter, hour")
            .into_iter()
            .map(|r| ((r[0].clone(), r[1].clone(), r[2].clone(), r[3].parse().unwrap()), r[4].parse().unwrap()))
            .collect()
    }

    /// Unique meters per (org, project, meter), merged across all hours.
    pub fn unique_overall(&self) -> BTreeMap<(String, String, String), u64> {
        self.rows("SELECT org_id, project_id, meter, uniqCombinedMerge(state) FROM usage_unique_hourly GROUP BY org_id, project_id, meter")
            .into_iter()
            .map(|r| ((r[0].clone(), r[1].clone(), r[2].clone()), r[3].parse().unwrap()))
            .collect()
    }

    pub fn scalar(&self, sql: &str) -> u64 {
        self.rows(sql)[0][0].parse().unwrap()
    }

    /// The dead-letter topic as (loadgen id, batch index, reason) records.
    pub fn dead_letters(&self) -> Vec<(u64, Option<u32>, String)> {
        tally::admin::read_dead_letters(&self.kafka, Some(H_LOADGEN_ID), Duration::from_secs(4))
            .unwrap()
            .into_iter()
            .map(|d| (d.tag.expect("loadgen id header copied").parse().unwrap(), d.batch_index, d.reason))
            .collect()
    }

    /// Asserts every aggregate and the narrow table against the expectation.
    pub fn assert_totals(&self, e: &Expected) {
        let want: BTreeMap<_, _> =
            e.totals.iter().map(|(o, p, m, h, v)| ((o.clone(), p.clone(), m.clone(), *h), *v)).collect();
        let got = self.usage_hourly();
        if got != want {
            let diff: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(*v))
                .map(|(k, v)| format!("{k:?}: want {v} got {:?}", got.get(k)))
                .chain(
                    got.iter().filter(|(k, _)| !want.contains_key(*k)).map(|(k, v)| format!("{k:?}: unexpected {v}")),
                )
                .take(20)
                .collect();
            panic!("usage_hourly differs from the expected totals in {} keys, e.g.:\n{}", diff.len(), diff.join("\n"));
        }
        // No duplicate row ever reached the narrow table.
        assert_eq!(self.scalar("SELECT count() FROM events"), e.accepted, "narrow rows");
        assert_eq!(
            self.scalar("SELECT count() FROM (SELECT DISTINCT org_id, project_id, event_id FROM events)"),
            e.accepted
        );
        // Unique meters within 2 % (exact below the sketch's exact-mode size).
        let uh = self.unique_hourly();
        for (o, p, m, h, n) in &e.unique_hourly {
            let g = uh.get(&(o.clone(), p.clone(), m.clone(), *h)).copied().unwrap_or(0);
            assert!((g as f64 - *n as f64).abs() <= (*n as f64 * 0.02).max(0.0), "{o}/{p}/{m}@{h}: unique {g} vs {n}");
        }
        if !e.unique_hourly.is_empty() {
            assert_eq!(uh.len(), e.unique_hourly.len());
        }
        let uo = self.unique_overall();
        for (o, p, m, n) in &e.unique_overall {
            let g = uo[&(o.clone(), p.clone(), m.clone())];
            assert!((g as f64 - *n as f64).abs() <= *n as f64 * 0.02, "{o}/{p}/{m}: unique {g} vs {n}");
        }
    }

    /// Asserts the dead-letter topic holds exactly the expected rejections (as a set; with
    /// `exact_count`, also with no repeated record).
    pub fn assert_dead_letters(&self, e: &Expected, exact_count: bool) {
        let got = self.dead_letters();
        let want: BTreeSet<_> = e.rejected.iter().cloned().collect();
        let got_set: BTreeSet<_> = got.iter().cloned().collect();
        let missing: Vec<_> = want.difference(&got_set).take(10).collect();
        let extra: Vec<_> = got_set.difference(&want).take(10).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "dead letters differ: missing {missing:?}, unexpected {extra:?}"
        );
        if exact_count {
            assert_eq!(got.len(), want.len(), "each rejection dead-lettered exactly once");
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test world kept for inspection: {} (database it_{})", self.dir.display(), self.name);
        }
    }
}

pub fn create_topics(names: &[&str]) {
    create_topics_on(&brokers(), names, PARTITIONS)
}

/// Creates `names` with `partitions` partitions each on the broker at `brokers`.
pub fn create_topics_on(brokers: &str, names: &[&str], partitions: i32) {
    let topics: Vec<NewTopic> =
        names.iter().map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1))).collect();
    for r in tokio_block_on(admin(brokers).create_topics(&topics, &admin_options())).unwrap() {
        r.unwrap();
    }
}

/// An admin client of the broker at `brokers`.
fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap()
}

/// Topic creation and deletion wait up to 10 s for the broker.
fn admin_options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))
}

pub fn tokio_block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

pub fn sigterm(child: &Child) {
    unsafe_kill(child.id(), "TERM");
}

pub fn sigkill(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

fn unsafe_kill(pid: u32, sig: &str) {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success());
}

/// Sends SIGTERM to all at once and asserts each exits cleanly (status 0) within a minute.
///
/// All at once: a worker stopped while the others are still running makes them rejoin, and one
/// stopped in the middle of that join is kept as a phantom member by tansu (docs/services.md).
pub fn stop_all(children: Vec<Child>) {
    for c in &children {
        sigterm(c);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for mut child in children {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "worker exited with {status}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "worker did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Produces one message (value, authorization header, loadgen id) and waits for its ack.
pub fn produce_one(topic: &str, key: &str, value: &str, auth: &str, loadgen_id: u64) {
    let id = loadgen_id.to_string();
    produce_with_headers(topic, key, value.as_bytes(), &[("authorization", auth), (tally::loadgen::H_LOADGEN_ID, &id)]);
}

/// A free local port (bound, then released).
pub fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

/// GET http://<addr>/metrics.
pub fn scrape(addr: &str) -> String {
    ureq::get(&format!("http://{addr}/metrics")).call().map(|r| r.into_string().unwrap()).unwrap_or_default()
}

/// The sum of the samples of `metric` (exact name) whose line contains `labels`.
pub fn sum_samples(text: &str, metric: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(labels))
        .filter(|l| l.split(['{', ' ']).next() == Some(metric))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of the first sample of `metric` whose line contains `labels`.
pub fn sample(text: &str, metric: &str, labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(metric) && l.contains(labels))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Produces one message with exactly `headers` (in order, names as given) and returns its
/// (partition, offset) once acknowledged.
pub fn produce_with_headers(topic: &str, key: &str, value: &[u8], headers: &[(&str, &str)]) -> (i32, i64) {
    produce_at(topic, key, value, headers, None)
}

/// [`produce_with_headers`] with the message's timestamp (Unix milliseconds) set by the producer,
/// as a producer that stamps messages with their events' time does (`None`: the send time).
pub fn produce_at(topic: &str, key: &str, value: &[u8], headers: &[(&str, &str)], at_ms: Option<i64>) -> (i32, i64) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header { key: k, value: Some(*v) });
    }
    let mut record = FutureRecord::to(topic).key(key).payload(value).headers(h);
    if let Some(ms) = at_ms {
        record = record.timestamp(ms);
    }
    let delivery = tokio_block_on(p.send(record, Duration::from_secs(30)));
    let d = delivery.map_err(|(e, _)| e).unwrap();
    (d.partition, d.offset)
}

/// The committed-offset target covering every (partition, offset) in `produced`.
pub fn end_offsets(produced: &[(i32, i64)]) -> BTreeMap<i32, i64> {
    let mut m = BTreeMap::new();
    for &(p, o) in produced {
        let e = m.entry(p).or_insert(0);
        *e = (*e).max(o + 1);
    }
    m
}

/// A worker that is SIGKILLed if the test panics before stopping it (an orphan would keep
/// running, and keep the test runner's output pipe open).
pub struct Running(pub Option<Child>);

impl Running {
    /// SIGTERM and a clean exit, as [`stop_all`].
    pub fn stop(mut self) {
        stop_all(self.0.take().into_iter().collect());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The expectation of two runs into one topic (distinct seeds: no shared ids).
pub fn merge(a: &mut tally::loadgen::expected::Expected, b: &tally::loadgen::expected::Expected) {
    use std::collections::BTreeMap;
    let mut t: BTreeMap<_, u64> =
        a.totals.iter().map(|(o, p, m, h, v)| ((o.clone(), p.clone(), m.clone(), *h), *v)).collect();
    for (o, p, m, h, v) in &b.totals {
        *t.entry((o.clone(), p.clone(), m.clone(), *h)).or_default() += v;
    }
    a.totals = t.into_iter().map(|((o, p, m, h), v)| (o, p, m, h, v)).collect();
    // Unique counts of two runs cannot be added; this test leaves them to the others.
    a.unique_hourly.clear();
    a.unique_overall.clear();
    a.rejected.extend(b.rejected.iter().cloned());
    for (p, o) in &b.end_offsets {
        let e = a.end_offsets.entry(*p).or_insert(0);
        *e = (*e).max(*o);
    }
    a.accepted += b.accepted;
    a.duplicates += b.duplicates;
}

/// A tansu broker (memory storage) listening on a free port and advertising `advertised`.
pub struct Broker(Child);

impl Broker {
    pub fn start(listen: &str, advertised: &str) -> Broker {
        let tansu = state_dir().join("bin/tansu");
        let child = Command::new(&tansu)
            .args(["broker", "--listener-url", &format!("tcp://{listen}")])
            .args(["--advertised-listener-url", &format!("tcp://{advertised}")])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (scripts/start.sh installs it)", tansu.display()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(listen).is_err() {
            assert!(Instant::now() < deadline, "tansu did not come up on {listen}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Broker(child)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
