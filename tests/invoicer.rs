//! `tally-invoicer` end to end: data through the real ingest path (tansu + ClickHouse 18.16),
//! reconciled with the project's Stripe emulator. Requires `scripts/start.sh`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::{clickhouse_url, stop_all, World};
use rand::Rng;
use serde_json::Value;
use tally::invoice::config::StripeConfig;
use tally::invoice::stripe::{legacy, meters, StripeHttp};
use tally::loadgen::expected::Expected;
use tally::stripe_emu::{Emulator, Faults};

const KEY: &str = "sk_test_tally_it";
const ADDITIVE: [&str; 6] = ["events", "traces", "observations", "scores", "input_tokens", "output_tokens"];

/// (org, meter, hour) → value.
type Hourly = BTreeMap<(String, String, i64), u64>;

/// An ingested world, an emulator, and the invoicer pointed at both.
struct Billing {
    w: World,
    emu: Emulator,
    from: i64,
    to: i64,
    /// Expected additive totals per (org, meter, hour), summed over the generator's runs.
    expected: BTreeMap<(String, String, i64), u64>,
    runs: u64,
}

fn day(t: i64) -> i64 {
    t - t.rem_euclid(86_400)
}

fn arg_time(t: i64) -> String {
    tally::timestamp::format_rfc3339(t)
}

impl Billing {
    fn new(name: &str, orgs: usize, projects: usize, events: u64) -> Billing {
        let w = World::tenants(name, orgs, projects);
        let now = tally::invoice::reconcile::now_secs();
        let mut b = Billing {
            w,
            emu: Emulator::start("127.0.0.1:0", KEY, 11).unwrap(),
            // A month of hourly buckets ending tomorrow.
            from: day(now) - 30 * 86_400,
            to: day(now) + 86_400,
            expected: BTreeMap::new(),
            runs: 0,
        };
        b.ingest(events);
        b
    }

    /// Produces `events` more through the real path and waits until the worker committed them.
    fn ingest(&mut self, events: u64) -> Expected {
        self.runs += 1;
        let mut cfg = self.w.gen_config(events, 100 + self.runs);
        cfg.first_message_id = self.runs * 10_000_000;
        let e = self.w.generate(&cfg);
        let worker = self.w.worker(&format!("ingest{}", self.runs));
        self.w.wait_caught_up(&e);
        stop_all(vec![worker]);
        for (org, _, meter, hour, v) in &e.totals {
            *self.expected.entry((org.clone(), meter.clone(), *hour)).or_default() += v;
        }
        e
    }

    fn mapping(&self, account: &str) -> PathBuf {
        self.w.dir.join(format!("billing{account}.toml"))
    }

    fn invoicer(&self, account: &str, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tally-invoicer"));
        c.args(args)
            .env("TALLY_CLICKHOUSE_URL", clickhouse_url())
            .env("TALLY_CLICKHOUSE_DATABASE", self.w.ch.database())
            .env("TALLY_METERS_PATH", self.w.dir.join("meters.toml"))
            .env("TALLY_STRIPE_API_BASE", self.emu.base_url())
            .env("TALLY_STRIPE_API_KEY", KEY)
            .env("TALLY_STRIPE_ACCOUNT", account)
            .env("TALLY_BILLING_MAPPING_PATH", self.mapping(account))
            .env("TALLY_METRICS_LISTEN", "")
            .env("TALLY_STRIPE_MAX_REQUESTS_PER_SEC", "5000")
            .env("TALLY_STRIPE_CONCURRENCY", "4")
            .env("TALLY_STRIPE_MAX_ATTEMPTS", "10")
            .env("TALLY_STRIPE_INITIAL_BACKOFF_MS", "5")
            .env("TALLY_STRIPE_MAX_BACKOFF_MS", "200")
            .env("RUST_LOG", "warn");
        c
    }

    fn period_args(&self) -> Vec<String> {
        vec!["--from".into(), arg_time(self.from), "--to".into(), arg_time(self.to)]
    }

    fn run(&self, account: &str, cmd: &str, extra: &[&str]) -> Output {
        let mut args: Vec<String> = vec![cmd.to_string()];
        args.extend(self.period_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.invoicer(account, &refs).output().unwrap()
    }

    /// `reconcile --format json [extra]`: (exit code, report).
    /// `reconcile <period> --format json --no-progress EXTRA`, to run or to spawn.
    fn reconcile_cmd(&self, account: &str, extra: &[&str]) -> Command {
        let mut args: Vec<String> = vec!["reconcile".into()];
        args.extend(self.period_args());
        args.extend(["--format", "json", "--no-progress"].iter().chain(extra).map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.invoicer(account, &refs)
    }

    /// `reconcile … EXTRA`: (exit code, report).
    fn reconcile(&self, account: &str, extra: &[&str]) -> (i32, Value) {
        report_of(self.reconcile_cmd(account, extra).output().unwrap())
    }

    /// Waits until the emulator has created at least `n` meter events (a run is pushing).
    fn wait_pushes(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.emu.stats().meter_events_created < n {
            assert!(Instant::now() < deadline, "the run never started pushing");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn provision(&self, account: &str, extra: &[&str]) {
        let m = self.mapping(account);
        let mut args = vec!["--write-mapping", m.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = self.run(account, "provision", &args);
        assert!(out.status.success(), "provision: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn client(&self, account: &str) -> StripeHttp {
        let cfg: StripeConfig = toml::from_str(&format!(
            "api_base = \"{}\"\napi_key = \"{KEY}\"\naccount = \"{account}\"\nmax_requests_per_sec = 5000\n",
            self.emu.base_url()
        ))
        .unwrap();
        StripeHttp::new(&cfg, true)
    }

    fn billing(&self, account: &str) -> tally::invoice::mapping::Mapping {
        tally::invoice::mapping::Mapping::load(&self.mapping(account)).unwrap()
    }

    /// tally's additive totals per (org, meter, hour) in the period, from the generator.
    fn want_additive(&self) -> BTreeMap<(String, String, i64), u64> {
        self.expected
            .iter()
            .filter(|((_, _, h), v)| *h >= self.from && *h < self.to && **v > 0)
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// tally's distinct counts per org over the period (merged sketches).
    fn want_unique(&self) -> BTreeMap<String, u64> {
        self.w
            .rows(&format!(
                "SELECT org_id, uniqCombinedMerge(state) FROM usage_unique_hourly WHERE hour >= toDateTime({}) AND hour < toDateTime({}) GROUP BY org_id",
                self.from, self.to
            ))
            .into_iter()
            .map(|r| (r[0].clone(), r[1].parse().unwrap()))
            .collect()
    }

    /// Stripe's summaries for every (customer, meter): additive per hour, unique over the period.
    fn stripe_additive(&self, account: &str) -> (Hourly, BTreeMap<String, u64>) {
        let c = self.client(account);
        let map = self.billing(account);
        let mut add = BTreeMap::new();
        let mut uniq = BTreeMap::new();
        for (org, cus) in &map.customers {
            for meter in ADDITIVE {
                let mm = map.meter(org, meter).unwrap();
                for (start, v) in
                    meters::summaries(&c, &mm.stripe_meter, cus, self.from, self.to, Some("hour")).unwrap()
                {
                    if v > 0.0 {
                        add.insert((org.clone(), meter.to_string(), start), v as u64);
                    }
                }
            }
            let mm = map.meter(org, "unique_users").unwrap();
            let s = meters::summaries(&c, &mm.stripe_meter, cus, self.from, self.to, None).unwrap();
            if s[0].1 > 0.0 {
                uniq.insert(org.clone(), s[0].1 as u64);
            }
        }
        (add, uniq)
    }

    fn assert_stripe_equals_tally(&self, account: &str) {
        let (add, uniq) = self.stripe_additive(account);
        let want = self.want_additive();
        let diff: Vec<_> = want.keys().chain(add.keys()).filter(|k| want.get(*k) != add.get(*k)).take(10).collect();
        assert!(diff.is_empty(), "{} of {} (org, meter, hour) differ, e.g. {diff:?}", diff.len(), want.len());
        let wu: BTreeMap<String, u64> = self.want_unique().into_iter().filter(|(_, v)| *v > 0).collect();
        assert_eq!(uniq, wu, "unique_users per customer over the period");
    }

    fn emulator_events(&self, account: &str) -> Vec<Value> {
        let url = format!("{}_emulator/meter_events?account={account}", self.emu.base_url());
        let v: Value = serde_json::from_str(&ureq::get(&url).call().unwrap().into_string().unwrap()).unwrap();
        v["data"].as_array().unwrap().clone()
    }

    fn ledger_done(&self, account: &str) -> u64 {
        self.w.scalar(&format!(
            "SELECT uniqExact(push_id) FROM stripe_ledger WHERE state = 'done' AND action != 'cancel' AND account = '{account}'"
        ))
    }
}

/// (exit code, JSON report) of a finished `reconcile --format json`.
fn report_of(out: Output) -> (i32, Value) {
    let code = out.status.code().unwrap_or(-1);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "no report (exit {code}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, report)
}

fn rows_with<'a>(report: &'a Value, status: &str) -> Vec<&'a Value> {
    report["rows"].as_array().unwrap().iter().filter(|r| r["status"] == status).collect()
}

/// A month for 200 orgs × all meters: dry run plans, `--apply` makes every Stripe summary equal
/// tally's totals, a second run pushes nothing; late events are pushed as exactly the difference.
#[test]
fn reconciles_a_month_for_200_orgs_exactly() {
    let mut b = Billing::new("inv200", 200, 1, 40_000);
    b.provision("", &[]);
    assert_eq!(b.billing("").customers.len(), 200);

    let out = b.run("", "verify", &[]);
    assert!(out.status.success(), "verify: {}", String::from_utf8_lossy(&out.stdout));
    // `usage` merges unique meters across hours and equals the generator's totals for additive ones.
    let out = b.run("", "usage", &["--format", "json"]);
    let usage: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut by_org_meter: BTreeMap<(String, String), u64> = BTreeMap::new();
    for r in usage.iter().filter(|r| r["kind"] == "sum") {
        *by_org_meter
            .entry((r["org_id"].as_str().unwrap().into(), r["meter"].as_str().unwrap().into()))
            .or_default() += r["value"].as_u64().unwrap();
    }
    let mut want: BTreeMap<(String, String), u64> = BTreeMap::new();
    for ((o, m, _), v) in b.want_additive() {
        *want.entry((o, m)).or_default() += v;
    }
    assert_eq!(by_org_meter, want);

    let (code, dry) = b.reconcile("", &[]);
    assert_eq!(code, 2, "a dry run with deltas exits 2");
    assert_eq!(dry["summary"]["writes_done"], 0);
    assert_eq!(b.emu.stats().meter_events_created, 0, "a dry run pushes nothing");

    let textfile = b.w.dir.join("invoicer.prom");
    let t = Instant::now();
    let (code, rep) = b.reconcile("", &["--apply", "--metrics-textfile", textfile.to_str().unwrap()]);
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(code, 0, "{}", serde_json::to_string_pretty(&rep["problems"]).unwrap());
    b.assert_stripe_equals_tally("");
    let s = &rep["summary"];
    eprintln!(
        "[measure] reconcile --apply, {} orgs, {} buckets: {} writes ({} pushes, {} sets) with {} Stripe requests in {secs:.1} s (report says {:.1} s)",
        b.billing("").customers.len(),
        s["buckets"],
        s["writes_done"],
        s["pushes_done"],
        s["sets_done"],
        s["stripe_requests"],
        s["elapsed_secs"].as_f64().unwrap()
    );
    assert_eq!(s["writes_done"].as_u64().unwrap(), b.emu.stats().meter_events_created);
    let prom = std::fs::read_to_string(&textfile).unwrap();
    assert!(
        prom.contains("tally_invoicer_pushes_total") && prom.contains("tally_invoicer_last_success_timestamp_seconds"),
        "{prom}"
    );

    // A second run finds nothing to do.
    let (code, again) = b.reconcile("", &["--apply"]);
    assert_eq!((code, again["summary"]["writes_done"].as_u64()), (0, Some(0)));
    assert!(rows_with(&again, "ok").len() == again["rows"].as_array().unwrap().len());
    eprintln!(
        "[measure] dry run before: {} Stripe requests in {:.2} s; second --apply: {} writes, {} Stripe requests in {:.2} s",
        dry["summary"]["stripe_requests"],
        dry["summary"]["elapsed_secs"].as_f64().unwrap(),
        again["summary"]["writes_done"],
        again["summary"]["stripe_requests"],
        again["summary"]["elapsed_secs"].as_f64().unwrap()
    );
    // The hourly pushes nest into days: a daily comparison agrees too.
    let (code, daily) = b.reconcile("", &["--granularity", "day"]);
    assert_eq!(code, 0, "{}", daily["problems"]);
    // Customers found by their metadata (`tally_org_id`) instead of the file: the same mapping.
    let text = std::fs::read_to_string(b.mapping("")).unwrap();
    let meters_only = &text[text.find("\n[meters.").unwrap()..];
    std::fs::write(b.w.dir.join("billing-metadata.toml"), meters_only).unwrap();
    let (code, rep) = report_of(
        b.reconcile_cmd("", &[])
            .env("TALLY_BILLING_MAPPING_PATH", b.w.dir.join("billing-metadata.toml"))
            .env("TALLY_BILLING_CUSTOMER_SOURCE", "metadata")
            .output()
            .unwrap(),
    );
    assert_eq!((code, rep["summary"]["rows"].as_u64()), (0, Some(1400)), "{}", rep["problems"]);

    // A pre-aggregated Stripe meter (`event_time_window`) keeps only the last event of each hour:
    // the hourly deltas would replace one another. Mapped to one, the run refuses by name and
    // pushes nothing (until 2026-12-01 it did not read the setting).
    let windowed = ureq::post(&format!("{}/v1/billing/meters", b.emu.base_url()))
        .set("Authorization", &format!("Bearer {KEY}"))
        .send_form(&[
            ("display_name", "events, hourly last"),
            ("event_name", "tally_events_windowed"),
            ("default_aggregation[formula]", "sum"),
            ("event_time_window", "hour"),
            ("customer_mapping[event_payload_key]", "stripe_customer_id"),
            ("customer_mapping[type]", "by_id"),
            ("value_settings[event_payload_key]", "value"),
        ])
        .unwrap()
        .into_string()
        .unwrap();
    let windowed: Value = serde_json::from_str(&windowed).unwrap();
    let events_meter = b.billing("").meter("", "events").unwrap().stripe_meter.clone();
    let remapped = text.replace(&events_meter, windowed["id"].as_str().unwrap());
    std::fs::write(b.w.dir.join("billing-windowed.toml"), remapped).unwrap();
    let posts = b.emu.stats().posts;
    let out = b
        .reconcile_cmd("", &["--apply"])
        .env("TALLY_BILLING_MAPPING_PATH", b.w.dir.join("billing-windowed.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is pre-aggregated (event_time_window = hour)"), "{stderr}");
    assert_eq!(b.emu.stats().posts, posts, "nothing pushed");

    // Late events: the next run pushes exactly the difference.
    let before: BTreeMap<(String, String, i64), u64> = b.want_additive();
    let seen: BTreeSet<String> =
        b.emulator_events("").iter().map(|e| e["identifier"].as_str().unwrap().to_string()).collect();
    b.ingest(4_000);
    let (code, late) = b.reconcile("", &["--apply"]);
    assert_eq!(code, 0, "{}", late["problems"]);
    b.assert_stripe_equals_tally("");
    let map = b.billing("");
    let org_of: HashMap<&str, &str> = map.customers.iter().map(|(o, c)| (c.as_str(), o.as_str())).collect();
    let mut pushed: BTreeMap<(String, String, i64), u64> = BTreeMap::new();
    for e in b.emulator_events("").iter().filter(|e| !seen.contains(e["identifier"].as_str().unwrap())) {
        let meter = e["event_name"].as_str().unwrap().trim_start_matches("tally_").to_string();
        if meter == "unique_users" {
            continue;
        }
        let ts = e["timestamp"].as_i64().unwrap();
        *pushed
            .entry((org_of[e["customer"].as_str().unwrap()].to_string(), meter, ts - ts.rem_euclid(3600)))
            .or_default() += e["value"].as_u64().unwrap();
    }
    let delta: BTreeMap<(String, String, i64), u64> = b
        .want_additive()
        .into_iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(&k).copied().unwrap_or(0);
            (d > 0).then_some((k, d))
        })
        .collect();
    assert!(!delta.is_empty());
    assert_eq!(pushed, delta, "the late run pushed exactly the difference per (org, meter, hour)");
}

/// SIGKILL the invoicer at random moments of `--apply` (5 times), then with the emulator
/// injecting 429s, 500s and dropped answers after the write (and 3 more kills), then with answers
/// dropped after the write and no Idempotency-Key kept (3 more kills: every resend of a landed
/// push meets its own identifier, refused as real Stripe refuses it): after reruns to completion
/// no identifier was pushed twice, the ledger and Stripe agree one to one, and every summary
/// equals tally. (Until the invoicer knew real Stripe's answer to a taken identifier, such a
/// resend was recorded as refused: the forgetful account's reruns ended in exit 1.) Last, with
/// Stripe failing writes while executing (half of them after the write) with a 500 it keeps under
/// the Idempotency-Key and gives every resend with that key for 24 hours (2 kills): each resend
/// goes under a new key, the identifier kept. (With the key kept, a push whose first answer was
/// such a 500 stayed pending run after run.)
#[test]
fn crashes_and_stripe_faults_push_nothing_twice() {
    let b = Billing::new("invcrash", 60, 1, 16_000);
    let mut rng = rand::thread_rng();
    for (account, kills, faults) in [
        ("", 5, Faults::default()),
        ("acct_faults", 3, Faults { rate_429: 0.1, rate_500: 0.1, rate_drop_after_write: 0.1, ..Faults::default() }),
        (
            "acct_forgetful",
            3,
            Faults { rate_drop_after_write: 0.1, forget_idempotency_keys: true, ..Faults::default() },
        ),
        ("acct_stored_500", 2, Faults { rate_500_stored: 0.2, rate_drop_after_write: 0.05, ..Faults::default() }),
    ] {
        b.provision(account, &[]);
        b.emu.set_faults(faults.clone());
        let conflicts_before = b.emu.stats().identifier_conflicts;
        let mut killed_mid_run = 0;
        for _ in 0..kills {
            // Slow enough (300 requests/s) that a kill lands in the middle of the writes: wait
            // until this run has started writing, then kill it at a random moment.
            let posts = b.emu.stats().posts;
            let mut child: Child = b
                .reconcile_cmd(account, &["--apply"])
                .env("TALLY_STRIPE_MAX_REQUESTS_PER_SEC", "300")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while b.emu.stats().posts == posts && child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "the run never started writing");
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..800)));
            if child.try_wait().unwrap().is_none() {
                killed_mid_run += 1;
            }
            common::sigkill(&mut child);
        }
        let before_final = b.emu.stats().meter_events_created;
        let mut reruns = 0;
        let report = loop {
            reruns += 1;
            let (code, rep) = b.reconcile(account, &["--apply"]);
            if code == 0 {
                break rep;
            }
            // Under injected faults a request may exhaust its attempts: it stays pending, and the
            // next run resends it.
            assert!(code == 1 && reruns < 6, "exit {code}: {}", rep["problems"]);
        };
        b.emu.set_faults(Faults::default());
        b.assert_stripe_equals_tally(account);
        let events = b.emulator_events(account);
        let ids: BTreeSet<&str> = events.iter().map(|e| e["identifier"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), events.len(), "no identifier pushed twice");
        assert_eq!(b.ledger_done(account), events.len() as u64, "every push Stripe holds is in the ledger, once");
        let (code, again) = b.reconcile(account, &["--apply"]);
        assert_eq!((code, again["summary"]["writes_done"].as_u64()), (0, Some(0)));
        let stats = b.emu.stats();
        eprintln!(
            "[measure] account {account:?}: {kills} kills ({killed_mid_run} while writing), {reruns} final run(s); {} meter events ({before_final} in total before the final run); \
             emulator so far: {} idempotent replays, {} identifier conflicts, {} injected 429, {} injected 500, {} dropped answers; last run {} requests",
            events.len(),
            stats.idempotent_replays,
            stats.identifier_conflicts,
            stats.injected_429,
            stats.injected_500,
            stats.injected_drops,
            report["summary"]["stripe_requests"]
        );
        assert!(killed_mid_run >= kills - 1, "the kills landed while the runs were writing");
        if account == "acct_faults" {
            assert!(stats.injected_429 > 0 && stats.injected_500 > 0 && stats.injected_drops > 0, "{stats:?}");
            assert!(stats.idempotent_replays > 0, "answers lost after the write were replayed: {stats:?}");
        }
        if account == "acct_forgetful" {
            assert!(stats.identifier_conflicts > conflicts_before, "resends met their own identifiers: {stats:?}");
        }
        if account == "acct_stored_500" {
            assert!(stats.stored_500 > 0, "{stats:?}");
        }
    }
}

fn delete_project(w: &World, org: &str, project: &str) {
    for t in ["events", "usage_hourly_agg", "usage_unique_hourly", "usage_unique_daily"] {
        w.ch.execute(
            &format!("ALTER TABLE {}.{t} DELETE WHERE org_id = '{org}' AND project_id = '{project}'", w.ch.database()),
            false,
        )
        .unwrap();
    }
    wait_mutations(w);
}

fn wait_mutations(w: &World) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while w
        .scalar(&format!("SELECT count() FROM system.mutations WHERE database = '{}' AND is_done = 0", w.ch.database()))
        > 0
    {
        assert!(Instant::now() < deadline, "mutations did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Over-reports: a correction in tally within 24 h is cancelled and pushed again at the right
/// value; usage another system pushed is reported (`stripe_ahead`, needs a credit); after 24 h
/// Stripe refuses the cancel and the row says `needs_credit` — never ignored.
#[test]
fn over_reports_are_cancelled_or_credited() {
    let b = Billing::new("invover", 12, 2, 8_000);
    b.provision("", &[]);
    let (code, _) = b.reconcile("", &["--apply"]);
    assert_eq!(code, 0);

    // A correction in tally: org-001's first project is removed (e.g. refunded test traffic).
    delete_project(&b.w, "org-001", "proj-001-00");
    assert!(b.run("", "verify", &[]).status.success(), "aggregates and events agree after the correction");
    let (code, rep) = b.reconcile("", &["--apply"]);
    assert_eq!(code, 0, "{}", rep["problems"]);
    let corrected = rows_with(&rep, "corrected");
    assert!(!corrected.is_empty() && corrected.iter().all(|r| r["org_id"] == "org-001"), "{corrected:?}");
    assert!(corrected.iter().any(|r| r["delta_pushed"].as_i64().unwrap() < 0));
    assert!(b.emu.stats().adjustments_created > 0);
    let tally_now: BTreeMap<(String, String, i64), u64> = b
        .w
        .rows(&format!(
            "SELECT org_id, meter, intDiv(toUInt32(hour), 3600) * 3600, sum(value) FROM usage_hourly WHERE hour >= toDateTime({}) AND hour < toDateTime({}) GROUP BY org_id, meter, hour",
            b.from, b.to
        ))
        .into_iter()
        .filter(|r| r[3] != "0")
        .map(|r| ((r[0].clone(), r[1].clone(), r[2].parse().unwrap()), r[3].parse().unwrap()))
        .collect();
    let (stripe, _) = b.stripe_additive("");
    assert_eq!(stripe, tally_now, "after the correction Stripe equals the corrected tally");

    // Usage pushed by another system: reported, not ignored, not "fixed" silently.
    let map = b.billing("");
    let cus = &map.customers["org-002"];
    let mm = map.meter("org-002", "events").unwrap();
    let hour =
        b.w.scalar("SELECT toUInt32(max(hour)) FROM usage_hourly WHERE org_id = 'org-002' AND meter = 'events'") as i64;
    let info = meters::retrieve_meter(&b.client(""), &mm.stripe_meter).unwrap();
    meters::create_meter_event(&b.client(""), &info, cus, 7, hour + 60, "other-system-1").unwrap();
    let (code, rep) = b.reconcile("", &[]);
    assert_eq!(code, 2);
    let ahead = rows_with(&rep, "stripe_ahead");
    assert_eq!(ahead.len(), 1, "{}", rep["rows"]);
    assert_eq!(
        (ahead[0]["org_id"].as_str(), ahead[0]["meter"].as_str(), ahead[0]["needs_credit"].as_u64()),
        (Some("org-002"), Some("events"), Some(7))
    );

    // After 24 h Stripe no longer cancels: the over-report needs a credit note.
    ureq::post(&format!("{}_emulator/clock", b.emu.base_url())).send_string("advance_secs=90000").unwrap();
    let (before, _) = b.stripe_additive("");
    delete_project(&b.w, "org-003", "proj-003-01");
    let (code, rep) = b.reconcile("", &["--apply"]);
    assert_eq!(code, 2, "drift remains: {}", rep["problems"]);
    let credit = rows_with(&rep, "needs_credit");
    assert!(
        !credit.is_empty()
            && credit.iter().all(|r| r["org_id"] == "org-003" && r["needs_credit"].as_u64().unwrap() > 0),
        "{credit:?}"
    );
    let (after, _) = b.stripe_additive("");
    assert_eq!(before, after, "nothing was cancelled or pushed for the uncancellable over-report");

    // Hours older than Stripe's 35 days are reported, not pushed.
    let old = (b.from - 10 * 86_400) / 3600 * 3600;
    b.w.ch
        .execute(
            &format!(
                "INSERT INTO {}.events (org_id, project_id, event_id, type, ts, hour, key_hash, meters, meter_values, \
                 unique_meters, unique_hashes, src_topic, src_partition, src_offset, batch_index, ingested_at) VALUES \
                 ('org-004', 'proj-004-00', 'old-1', 'trace-create', {old}, {old}, 1, ['events', 'traces'], [1, 1], [], [], 't', 0, 0, -1, now())",
                b.w.ch.database()
            ),
            false,
        )
        .unwrap();
    let wide = ["--from", &arg_time(day(old)), "--to", &arg_time(b.to)];
    let out =
        b.invoicer("", &[&["reconcile", "--apply", "--format", "json"][..], &wide[..]].concat()).output().unwrap();
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(2));
    let old_rows: Vec<&Value> = rows_with(&rep, "too_old_for_stripe");
    assert_eq!(old_rows.len(), 2, "events and traces of org-004: {}", rep["rows"]);
    assert!(old_rows.iter().all(|r| r["org_id"] == "org-004"));
    // Only the distinct counts of this new, longer period were pushed; nothing was refused.
    let s = &rep["summary"];
    assert_eq!((s["pushes_done"].as_u64(), s["writes_failed"].as_u64()), (Some(0), Some(0)), "{s}");

    // Aggregates that disagree with their events block every push, and `verify` says where.
    let hour = b.w.scalar("SELECT toUInt32(max(hour)) FROM usage_hourly WHERE org_id = 'org-005'");
    b.w.ch
        .execute(
            &format!(
                "INSERT INTO {}.usage_hourly_agg VALUES ('org-005', 'proj-005-00', 'events', {hour}, 5)",
                b.w.ch.database()
            ),
            false,
        )
        .unwrap();
    let created = b.emu.stats().meter_events_created;
    let out = b.run("", "verify", &["--format", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mm = v["mismatches"].as_array().unwrap();
    assert_eq!(mm.len(), 1, "{v}");
    assert_eq!((mm[0]["org_id"].as_str(), mm[0]["meter"].as_str()), (Some("org-005"), Some("events")));
    assert_eq!(mm[0]["aggregates"].as_u64().unwrap(), mm[0]["events"].as_u64().unwrap() + 5);
    let out = b.run("", "reconcile", &["--apply", "--format", "json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to push"));
    assert_eq!(b.emu.stats().meter_events_created, created, "money never moves on disagreeing aggregates");

    // A daily sketch out of step with its events (as a crash between the views of one insert
    // leaves it) is reported by `verify` too, as a day; the daily repair below fixes it.
    let day = hour - hour.rem_euclid(86_400);
    b.w.ch
        .execute(
            &format!(
                "INSERT INTO {}.usage_unique_daily SELECT 'org-005', 'proj-005-00', 'unique_users', \
                 toDateTime({day}), uniqCombinedState(toUInt64(424242))",
                b.w.ch.database()
            ),
            false,
        )
        .unwrap();
    let out = b.run("", "verify", &["--format", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mm = v["mismatches"].as_array().unwrap();
    let windows: Vec<_> = mm.iter().map(|m| (m["window"].as_str().unwrap(), m["meter"].as_str().unwrap())).collect();
    assert_eq!(windows, [("hour", "events"), ("day", "unique_users")], "{v}");
    assert_eq!(mm[1]["aggregates"].as_u64().unwrap(), mm[1]["events"].as_u64().unwrap() + 1, "{v}");

    // The repair documented in docs/clickhouse.md rebuilds the hour from the events.
    let (db, at) =
        (b.w.ch.database(), format!("org_id = 'org-005' AND project_id = 'proj-005-00' AND hour = toDateTime({hour})"));
    for t in ["usage_hourly_agg", "usage_unique_hourly"] {
        b.w.ch.execute(&format!("ALTER TABLE {db}.{t} DELETE WHERE {at}"), false).unwrap();
    }
    wait_mutations(&b.w);
    for (table, value, arrays) in [
        ("usage_hourly_agg", "sum(v)", "meters AS meter, meter_values AS v"),
        ("usage_unique_hourly", "uniqCombinedState(v)", "unique_meters AS meter, unique_hashes AS v"),
    ] {
        b.w.ch
            .execute(
                &format!(
                    "INSERT INTO {db}.{table} SELECT org_id, project_id, meter, hour, {value} FROM \
                     (SELECT org_id, project_id, hour, meters, meter_values, unique_meters, unique_hashes \
                      FROM {db}.events FINAL WHERE {at}) \
                     ARRAY JOIN {arrays} GROUP BY org_id, project_id, meter, hour"
                ),
                false,
            )
            .unwrap();
    }
    // The daily sketches of that project's day, rebuilt from the day's narrow rows.
    let in_day = format!("org_id = 'org-005' AND project_id = 'proj-005-00' AND day = toDateTime({day})");
    b.w.ch.execute(&format!("ALTER TABLE {db}.usage_unique_daily DELETE WHERE {in_day}"), false).unwrap();
    wait_mutations(&b.w);
    b.w.ch
        .execute(
            &format!(
                "INSERT INTO {db}.usage_unique_daily SELECT org_id, project_id, meter, \
                 toDateTime(intDiv(toUInt32(hour), 86400) * 86400) AS day, uniqCombinedState(h) FROM \
                 (SELECT org_id, project_id, hour, unique_meters, unique_hashes FROM {db}.events FINAL \
                  WHERE org_id = 'org-005' AND project_id = 'proj-005-00' \
                  AND hour >= toDateTime({day}) AND hour < toDateTime({})) \
                 ARRAY JOIN unique_meters AS meter, unique_hashes AS h GROUP BY org_id, project_id, meter, day",
                day + 86_400
            ),
            false,
        )
        .unwrap();
    let out = b.run("", "verify", &[]);
    assert!(out.status.success(), "after the repair: {}", String::from_utf8_lossy(&out.stdout));
}

fn legacy_cmd(b: &Billing, extra: &[&str]) -> Command {
    let mut c = b.reconcile_cmd("acct_legacy", extra);
    c.env("TALLY_STRIPE_MODE", "legacy");
    c
}

fn legacy_run(b: &Billing, extra: &[&str]) -> (i32, Value) {
    report_of(legacy_cmd(b, extra).output().unwrap())
}

/// Legacy usage records: the same totals, per subscription item over the period; rerun-safe.
#[test]
fn legacy_usage_records_match_totals() {
    let mut b = Billing::new("invlegacy", 30, 1, 8_000);
    let start = arg_time(b.from);
    b.provision("acct_legacy", &["--legacy-start", &start]);
    let (code, _) = legacy_run(&b, &[]);
    assert_eq!(code, 2);
    let (code, rep) = legacy_run(&b, &["--apply"]);
    assert_eq!(code, 0, "{}", rep["problems"]);
    assert!(b.emu.stats().usage_records_created > 0);

    let c = b.client("acct_legacy");
    let map = b.billing("acct_legacy");
    let mut want: BTreeMap<(String, String), u64> = BTreeMap::new();
    for ((o, m, _), v) in b.want_additive() {
        *want.entry((o, m)).or_default() += v;
    }
    for (o, v) in b.want_unique() {
        want.insert((o, "unique_users".into()), v);
    }
    let mut got = BTreeMap::new();
    for org in map.subscription_items.keys() {
        for meter in ADDITIVE.iter().chain(["unique_users"].iter()) {
            let item = map.item(org, meter).unwrap();
            let total = legacy::usage_total(&c, item, b.from, b.to).unwrap() as u64;
            if total > 0 {
                got.insert((org.clone(), meter.to_string()), total);
            }
        }
    }
    want.retain(|_, v| *v > 0);
    assert_eq!(got, want, "usage record summaries equal tally per (org, meter) over the period");
    let (code, again) = legacy_run(&b, &["--apply"]);
    assert_eq!((code, again["summary"]["writes_done"].as_u64()), (0, Some(0)));

    // A Stripe that holds none of the usage records the ledger says were accepted (an account
    // restored empty): each item's billing period is compared with the ledger, and repaired.
    b.emu = Emulator::start("127.0.0.1:0", KEY, 13).unwrap();
    b.provision("acct_legacy", &["--legacy-start", &start]);
    let (code, rep) = legacy_run(&b, &[]);
    assert_eq!(code, 0, "within the settle time: lag, {}", rep["problems"]);
    let settled = |b: &Billing, extra: &[&str]| -> (i32, Value) {
        report_of(legacy_cmd(b, extra).env("TALLY_STRIPE_SETTLE_SECS", "0").output().unwrap())
    };
    let (code, rep) = settled(&b, &[]);
    let missing = problems_with(&rep, "stripe_missing");
    let unbilled: u64 = missing.iter().map(|m| m.2).sum();
    assert_eq!((code, missing.len()), (2, want.len()), "one per subscription item with usage: {}", rep["problems"]);
    assert_eq!(unbilled, want.values().sum::<u64>());
    let (code, rep) = settled(&b, &["--apply", "--repair-missing"]);
    assert_eq!(code, 0, "{}", rep["problems"]);
    let c = b.client("acct_legacy");
    for ((org, meter), v) in &want {
        let item = map.item(org, meter).unwrap();
        assert_eq!(legacy::usage_total(&c, item, b.from, b.to).unwrap() as u64, *v, "{org} {meter} repaired");
    }
    eprintln!(
        "[measure] legacy Stripe restarted empty: {} items stripe_missing ({unbilled} units), exit 2; --apply --repair-missing: {} repairs, exit 0",
        missing.len(),
        rep["summary"]["repairs_done"]
    );
    let (code, again) = settled(&b, &["--apply", "--repair-missing"]);
    assert_eq!((code, again["summary"]["writes_done"].as_u64()), (0, Some(0)), "{}", again["problems"]);
}

/// ClickHouse cut in the middle of `--apply` (refused connections, requests in flight reset): the
/// run waits, resumes when it is back and ends reconciled; the ledger and Stripe agree one to one.
#[test]
fn clickhouse_outage_during_apply_is_waited_out() {
    let b = Billing::new("invchdown", 30, 1, 8_000);
    b.provision("", &[]);
    let upstream = clickhouse_url().trim_start_matches("http://").to_string();
    let proxy = common::proxy::Proxy::start(&upstream);
    let t = Instant::now();
    let child = b
        .reconcile_cmd("", &["--apply"])
        .env("TALLY_CLICKHOUSE_URL", format!("http://{}", proxy.addr))
        .env("TALLY_STRIPE_MAX_REQUESTS_PER_SEC", "300")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Cut once pushes are under way (the emulator has seen some), for 3 seconds.
    b.wait_pushes(50);
    proxy.cut();
    let cut_at = b.emu.stats().meter_events_created;
    std::thread::sleep(Duration::from_secs(3));
    proxy.restore();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("waiting for clickhouse"), "the outage was noticed and waited out: {stderr}");
    eprintln!("[measure] outage of 3 s after {cut_at} pushes; run took {:.1} s", t.elapsed().as_secs_f64());
    b.assert_stripe_equals_tally("");
    assert_eq!(b.ledger_done("") as usize, b.emulator_events("").len());
    let (code, again) = b.reconcile("", &["--apply"]);
    assert_eq!((code, again["summary"]["writes_done"].as_u64()), (0, Some(0)));
}

/// Stripe stops answering in the middle of `--apply`: the run stops writing after a few writes
/// without an answer (instead of retrying every remaining one), exits 1 with the writes pending;
/// the next run, with Stripe back, completes exactly.
#[test]
fn stripe_outage_stops_the_run_and_the_next_run_completes() {
    let b = Billing::new("invstripedown", 30, 1, 8_000);
    b.provision("", &[]);
    let child = b
        .reconcile_cmd("", &["--apply"])
        .env("TALLY_STRIPE_MAX_REQUESTS_PER_SEC", "300")
        .env("TALLY_STRIPE_MAX_ATTEMPTS", "3")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    b.wait_pushes(50);
    b.emu.set_faults(Faults { rate_500: 1.0, ..Faults::default() });
    let out = child.wait_with_output().unwrap();
    let stats = b.emu.stats();
    b.emu.set_faults(Faults::default());
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        rep["summary"]["aborted"].as_str().is_some_and(|s| s.contains("Stripe stopped answering")),
        "{}",
        rep["summary"]
    );
    let pending = rep["summary"]["writes_pending"].as_u64().unwrap();
    // 8 writes in a row without an answer (2 × concurrency), 3 attempts each, plus the ones in
    // flight (a success answered just before the switch may restart the count once). Without the
    // breaker every remaining write (> 1,000 here) would be tried 3 times.
    assert!(stats.injected_500 <= 100, "the run stopped hammering a Stripe that is down: {stats:?}");
    assert!(pending > 0);
    eprintln!(
        "[measure] Stripe down after {} writes: stopped after {} failed requests, {pending} writes pending",
        50, stats.injected_500
    );
    let (code, rep) = b.reconcile("", &["--apply"]);
    assert_eq!(code, 0, "{}", rep["problems"]);
    b.assert_stripe_equals_tally("");
    assert_eq!(b.ledger_done("") as usize, b.emulator_events("").len());
}

/// PRODUCT.md §1: no total may wrap, and one tenant's extreme events refuse only that tenant's
/// figure. Org A sends through Kafka what any producer with a valid credential can: 2,048 events
/// with `usage.input` 2^53 − 1 (the largest value ingest accepts) and one with 2,048, in one
/// project-hour. They sum to exactly 2^64 more than A's other input there, and ClickHouse's own
/// `sum` wraps that hour. `usage` and `verify` name A's figure (`total_overflow`, exit 1) and
/// still show everything else; `explain` refuses A's line; `reconcile --apply` reports (A, input_tokens) as `total_overflow`
/// (exit 1), writes nothing for it, and makes every other (org, meter) of both orgs equal in
/// Stripe; a rerun writes nothing more. Until the refusal was per (org, meter), the whole run
/// was refused: nothing was pushed for anyone until the rows were deleted by hand.
#[test]
fn a_total_beyond_64_bits_refuses_only_its_own_figure() {
    let b = Billing::new("overflow", 2, 1, 400);
    b.provision("", &[]);
    let (a, other) = (b.w.keys.tenants[0].clone(), b.w.keys.tenants[1].clone());
    let hour = day(tally::invoice::reconcile::now_secs());
    let huge: u64 = (1 << 53) - 1;
    let events: Vec<Value> = (0..2049)
        .map(|i| {
            serde_json::json!({
                "id": format!("huge-{i}"),
                "type": "generation-create",
                "timestamp": arg_time(hour + 60),
                "body": {"usage": {"input": if i < 2048 { huge } else { 2048 }}},
            })
        })
        .collect();
    let auth = tally::devkeys::basic(&a);
    let sent: Vec<(i32, i64)> = events
        .chunks(500)
        .map(|c| {
            let v = serde_json::json!({ "batch": c }).to_string();
            common::produce_with_headers(&b.w.kafka.topic, &a.project_id, v.as_bytes(), &[("authorization", &auth)])
        })
        .collect();
    let worker = b.w.worker("hostile");
    tally::admin::wait_committed(&b.w.kafka, &common::end_offsets(&sent), Duration::from_secs(120)).unwrap();
    stop_all(vec![worker]);
    assert_eq!(b.w.scalar("SELECT count() FROM events FINAL WHERE event_id LIKE 'huge-%'"), 2049, "all accepted");

    let before = b.expected.get(&(a.org_id.clone(), "input_tokens".into(), hour)).copied().unwrap_or(0);
    let exact = (1u128 << 64) + u128::from(before);
    let wrapped = b.w.scalar(&format!(
        "SELECT sum(value) FROM usage_hourly WHERE org_id = '{}' AND meter = 'input_tokens' AND hour = toDateTime({hour})",
        a.org_id
    ));
    assert_eq!(u128::from(wrapped), exact % (1 << 64), "ClickHouse's own sum wrapped: the invoicer must not show it");
    let named = |cmd: &str, stderr: &str| {
        assert!(stderr.contains("total_overflow"), "{cmd}: {stderr}");
        let figure = format!("{}/{}/input_tokens at hour {} = {exact}", a.org_id, a.project_id, arg_time(hour));
        assert!(stderr.contains(&figure), "{cmd} names the figure {figure}: {stderr}");
        assert!(!stderr.contains(&*other.org_id), "{cmd} refuses nothing of the other org: {stderr}");
    };

    // The aggregates the other figures are checked against (equal to the per-event rows: verify).
    let mut want: Hourly = BTreeMap::new();
    for ((org, _, meter, h), v) in b.w.usage_hourly() {
        if h >= b.from && h < b.to && v > 0 && !(org == a.org_id && meter == "input_tokens") {
            *want.entry((org, meter, h)).or_default() += v;
        }
    }

    let out = b.run("", "usage", &["--format", "json"]);
    assert_eq!(out.status.code(), Some(1));
    named("usage", &String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let shown = |org: &str, meter: &str| -> Option<u64> {
        rows.iter().find(|r| r["org_id"] == org && r["meter"] == meter).map(|r| r["value"].as_u64().unwrap())
    };
    assert_eq!(shown(&a.org_id, "input_tokens"), None, "the refused figure is not shown");
    for (org, meter) in [(&a.org_id, "events"), (&a.org_id, "output_tokens"), (&other.org_id, "input_tokens")] {
        let total: u64 = want.iter().filter(|(k, _)| k.0 == *org && k.1 == meter).map(|(_, v)| v).sum();
        assert_eq!(shown(org, meter), Some(total), "usage shows {org}/{meter}");
    }

    let out = b.run("", "verify", &[]);
    assert_eq!(out.status.code(), Some(1));
    named("verify", &String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("aggregates equal the per-event rows"));

    let (code, rep) = b.reconcile("", &["--apply"]);
    assert_eq!(code, 1, "{}", rep["problems"]);
    let refused = rows_with(&rep, "total_overflow");
    assert_eq!(refused.len(), 1, "{}", rep["rows"]);
    assert_eq!((&refused[0]["org_id"], &refused[0]["meter"]), (&Value::from(&*a.org_id), &Value::from("input_tokens")));
    assert!(refused[0]["tally"].is_null(), "the refused total is not shown: {}", refused[0]);
    named("reconcile", refused[0]["note"].as_str().unwrap());
    let rows = rep["rows"].as_array().unwrap();
    assert!(
        rows.iter().filter(|r| r["status"] != "total_overflow").all(|r| r["status"] == "pushed"),
        "{}",
        rep["rows"]
    );
    let (add, uniq) = b.stripe_additive("");
    assert_eq!(add, want, "Stripe holds every other (org, meter, hour), and nothing of the refused pair");
    assert_eq!(uniq, b.want_unique().into_iter().filter(|(_, v)| *v > 0).collect(), "unique_users per customer");

    // The audit refuses the line, and the hour's events page; the other org's line adds up.
    let customers = b.billing("").customers;
    let (cus_a, cus_other) = (&customers[&a.org_id], &customers[&other.org_id]);
    for extra in [vec![], vec!["--events".to_string(), arg_time(hour)]] {
        let mut args = vec!["--customer", cus_a.as_str(), "--meter", "input_tokens"];
        args.extend(extra.iter().map(String::as_str));
        let out = b.run("", "explain", &args);
        assert_eq!(out.status.code(), Some(1), "explain {extra:?}");
        named("explain", &String::from_utf8_lossy(&out.stderr));
    }
    let line = explain(&b, cus_other, "input_tokens", &[]);
    let total: u64 = want.iter().filter(|(k, _)| k.0 == other.org_id && k.1 == "input_tokens").map(|(_, v)| v).sum();
    assert_eq!(line["line"]["tally"].as_u64(), Some(total), "{}", line["line"]);

    let pushed = b.emulator_events("").len();
    let (code, rep) = b.reconcile("", &["--apply"]);
    assert_eq!(code, 1);
    assert_eq!(rows_with(&rep, "total_overflow").len(), 1);
    assert_eq!(b.emulator_events("").len(), pushed, "a rerun writes nothing more");
}

/// Moves the emulator's clock (Stripe's "now") on by `secs`.
fn advance_stripe_clock(b: &Billing, secs: i64) {
    ureq::post(&format!("{}_emulator/clock", b.emu.base_url())).send_string(&format!("advance_secs={secs}")).unwrap();
}

/// The `problems` of a report with the given status: (org, meter, unbilled) each.
fn problems_with(report: &Value, status: &str) -> Vec<(String, String, u64)> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["status"] == status)
        .map(|p| {
            (p["org_id"].as_str().unwrap().into(), p["meter"].as_str().unwrap().into(), p["unbilled"].as_u64().unwrap())
        })
        .collect()
}

/// PRODUCT.md §7, "exit 0 means Stripe is right". After `--apply`, Stripe loses accepted usage:
/// one meter event cancelled through Stripe's public API, one dropped by the emulator as Stripe's
/// asynchronous validation would, and one org's `last` value dropped. Within the settle time the
/// buckets are `stripe_lagging` (exit 0); after it they are `stripe_missing` with the amounts,
/// exit 2 on every run, until `--apply --repair-missing` pushes exactly the missing amounts
/// under new identifiers; then exit 0 and Stripe equals tally. Then a Stripe that holds none of
/// the ledger's pushes (an emulator restarted empty): every bucket is missing, and repaired.
#[test]
fn usage_stripe_lost_is_missing_after_the_settle_time_and_repaired() {
    let mut b = Billing::new("invmissing", 20, 1, 6_000);
    b.provision("", &[]);
    let (code, rep) = b.reconcile("", &["--apply"]);
    assert_eq!(code, 0, "{}", rep["problems"]);
    let client = b.client("");
    let map = b.billing("");
    let org_of: HashMap<String, String> = map.customers.iter().map(|(o, c)| (c.clone(), o.clone())).collect();
    let events = b.emulator_events("");
    let additive: Vec<&Value> = events.iter().filter(|e| e["event_name"] != "tally_unique_users").collect();
    let (cancelled, dropped) = (additive[0], additive[additive.len() / 2]);
    let unique = events.iter().find(|e| e["event_name"] == "tally_unique_users").unwrap();
    meters::cancel_meter_event(
        &client,
        cancelled["event_name"].as_str().unwrap(),
        cancelled["identifier"].as_str().unwrap(),
        "outside-cancel-1",
    )
    .unwrap();
    for e in [dropped, unique] {
        let url = format!("{}_emulator/drop_meter_event", b.emu.base_url());
        ureq::post(&url).send_string(&format!("identifier={}", e["identifier"].as_str().unwrap())).unwrap();
    }
    advance_stripe_clock(&b, 3 * 3600);
    let lost = |e: &Value| -> (String, String, u64) {
        let org = org_of[e["customer"].as_str().unwrap()].clone();
        (org, e["event_name"].as_str().unwrap().trim_start_matches("tally_").to_string(), e["value"].as_u64().unwrap())
    };
    let mut want: Vec<(String, String, u64)> = vec![lost(cancelled), lost(dropped), lost(unique)];
    want.sort();

    // Within the settle time (default 2 h after the push): Stripe may still be catching up.
    let (code, rep) = b.reconcile("", &[]);
    assert_eq!(code, 0, "{}", rep["problems"]);
    assert_eq!(rows_with(&rep, "stripe_lagging").len(), 3, "{}", rep["rows"]);

    // After it (settle time 0: the pushes are settled): missing, with the amounts, on every run.
    let settled = |b: &Billing, extra: &[&str]| -> (i32, Value) {
        report_of(b.reconcile_cmd("", extra).env("TALLY_STRIPE_SETTLE_SECS", "0").output().unwrap())
    };
    let posts = b.emu.stats().posts;
    for extra in [&[][..], &["--apply"][..], &["--repair-missing"][..]] {
        let (code, rep) = settled(&b, extra);
        let mut got =
            problems_with(&rep, if extra == ["--repair-missing"] { "would_repair" } else { "stripe_missing" });
        got.sort();
        assert_eq!((code, &got), (2, &want), "{extra:?}: {}", rep["problems"]);
        eprintln!(
            "[measure] Stripe lost 3 pushes: `reconcile {}` exit {code}, {} bucket(s) reported ({:?})",
            extra.join(" "),
            got.len(),
            got.iter().map(|g| g.2).collect::<Vec<_>>()
        );
    }
    assert_eq!(b.emu.stats().posts, posts, "reporting wrote nothing to Stripe");
    // The drift gauges carry the missing buckets and amounts.
    let textfile = b.w.dir.join("missing.prom");
    let (code, _) = settled(&b, &["--metrics-textfile", textfile.to_str().unwrap()]);
    let prom = std::fs::read_to_string(&textfile).unwrap();
    let total: u64 = want.iter().map(|w| w.2).sum();
    assert_eq!(code, 2);
    for line in [
        "tally_invoicer_drift_buckets{status=\"stripe_missing\"} 3".to_string(),
        format!("tally_invoicer_drift_value{{status=\"stripe_missing\"}} {total}"),
        format!("tally_invoicer_unbilled_value {total}"),
    ] {
        assert!(prom.lines().any(|l| l == line), "{line} in\n{prom}");
    }

    let (code, rep) = settled(&b, &["--apply", "--repair-missing"]);
    assert_eq!(code, 0, "{}", rep["problems"]);
    assert_eq!(rep["summary"]["repairs_done"].as_u64(), Some(3), "{}", rep["summary"]);
    assert_eq!(rep["summary"]["sets_done"].as_u64(), Some(1), "the lost last value set again: {}", rep["summary"]);
    let repaired: Vec<(&str, &str)> = rows_with(&rep, "repaired")
        .iter()
        .map(|r| (r["org_id"].as_str().unwrap(), r["meter"].as_str().unwrap()))
        .collect();
    let mut want_pairs: Vec<(&str, &str)> = want.iter().map(|w| (w.0.as_str(), w.1.as_str())).collect();
    want_pairs.dedup();
    assert_eq!(repaired, want_pairs);
    b.assert_stripe_equals_tally("");
    let repaired: Vec<Vec<String>> = b.w.rows(
        "SELECT action, toString(value), detail FROM stripe_ledger WHERE state = 'intent' AND detail LIKE 'repair:%' ORDER BY action, value",
    );
    assert_eq!(repaired.len(), 3, "each repair says why in the ledger: {repaired:?}");
    let mut amounts: Vec<u64> = repaired.iter().map(|r| r[1].parse().unwrap()).collect();
    amounts.sort();
    let mut lost_amounts: Vec<u64> = want.iter().map(|w| w.2).collect();
    lost_amounts.sort();
    assert_eq!(amounts, lost_amounts, "exactly the missing amounts");
    let ids: BTreeSet<String> =
        b.emulator_events("").iter().map(|e| e["identifier"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), b.emulator_events("").len(), "new identifiers, none reused");
    for extra in [&["--apply", "--repair-missing"][..], &[][..]] {
        let (code, rep) = settled(&b, extra);
        assert_eq!((code, rep["summary"]["writes_done"].as_u64()), (0, Some(0)), "{}", rep["problems"]);
    }

    // A Stripe that holds none of the ledger's pushes.
    b.emu = Emulator::start("127.0.0.1:0", KEY, 12).unwrap();
    b.provision("", &[]);
    let (code, rep) = b.reconcile("", &[]);
    assert_eq!(code, 0, "within the settle time: lag, {}", rep["problems"]);
    let (code, rep) = settled(&b, &[]);
    let missing = problems_with(&rep, "stripe_missing");
    let buckets = rep["summary"]["buckets"].as_u64().unwrap();
    let nonzero = b.want_additive().len() as u64 + b.want_unique().values().filter(|v| **v > 0).count() as u64;
    assert_eq!((code, missing.len() as u64), (2, nonzero), "every bucket with usage is missing");
    let unbilled: u64 = missing.iter().map(|m| m.2).sum();
    // The three buckets repaired above lost their repair too: those wait for a person
    // (--retry-failed); the rest would be repaired.
    let (code, rep) = settled(&b, &["--repair-missing"]);
    let again = problems_with(&rep, "stripe_missing");
    assert_eq!((code, again.len(), problems_with(&rep, "would_repair").len() as u64), (2, 3, nonzero - 3));
    assert!(rep["problems"].to_string().contains("earlier repair"), "{}", rep["problems"]);
    // Repairs are crash-safe like every push: SIGKILL two repair runs while they write.
    let mut rng = rand::thread_rng();
    for _ in 0..2 {
        let posts = b.emu.stats().posts;
        let mut child = b
            .reconcile_cmd("", &["--apply", "--repair-missing", "--retry-failed"])
            .env("TALLY_STRIPE_SETTLE_SECS", "0")
            .env("TALLY_STRIPE_MAX_REQUESTS_PER_SEC", "300")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while b.emu.stats().posts == posts && child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the repair run never started writing");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..800)));
        common::sigkill(&mut child);
    }
    let killed_at = b.emu.stats().meter_events_created;
    let (code, rep) = settled(&b, &["--apply", "--repair-missing", "--retry-failed"]);
    assert_eq!(code, 0, "{}", rep["problems"]);
    b.assert_stripe_equals_tally("");
    let events = b.emulator_events("");
    let ids: BTreeSet<&str> = events.iter().map(|e| e["identifier"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), events.len(), "no repair identifier twice");
    assert!(
        killed_at > 0 && killed_at < events.len() as u64,
        "the kills landed mid-repair: {killed_at} of {}",
        events.len()
    );
    eprintln!(
        "[measure] Stripe restarted empty: {buckets} buckets, {} stripe_missing ({unbilled} units), exit 2; \
         --apply --repair-missing: {} repairs + {} sets, exit 0",
        missing.len(),
        rep["summary"]["repairs_done"],
        rep["summary"]["sets_done"]
    );
    let (code, rep) = settled(&b, &["--apply", "--repair-missing"]);
    assert_eq!((code, rep["summary"]["writes_done"].as_u64()), (0, Some(0)));
}

/// PRODUCT.md §7, closed periods. Legacy subscriptions whose billing period ends 2 h from now;
/// usage for the current hours; Stripe's clock moved 3 h on (the period rolled over). Every
/// bucket is reported `period_closed` with its amount, exit 2, and no write is attempted — on the
/// first run and on the second. Usage pushed before the roll-over stays counted; late usage for
/// the closed period is reported, not sent.
#[test]
fn legacy_usage_after_the_period_rolled_over_is_reported_not_resent() {
    let mut b = Billing::new("invclosed", 10, 1, 3_000);
    let now = tally::invoice::reconcile::now_secs();
    let period_end = now + 2 * 3600;
    let start = arg_time(period_end - tally::stripe_emu::state::PERIOD_SECS);
    b.provision("acct_closed", &["--legacy-start", &start]);
    let run = |extra: &[&str]| -> (i32, Value) {
        report_of(b.reconcile_cmd("acct_closed", extra).env("TALLY_STRIPE_MODE", "legacy").output().unwrap())
    };
    advance_stripe_clock(&b, 3 * 3600);
    let posts = b.emu.stats().posts;
    let tally_total: u64 = b.want_additive().values().sum::<u64>() + b.want_unique().values().sum::<u64>();
    let textfile = b.w.dir.join("closed.prom");
    for round in 1..=2 {
        let (code, rep) = run(&["--apply", "--metrics-textfile", textfile.to_str().unwrap()]);
        let closed = problems_with(&rep, "period_closed");
        let unbilled: u64 = closed.iter().map(|c| c.2).sum();
        assert_eq!(code, 2, "{}", rep["problems"]);
        assert_eq!(rep["problems"].as_array().unwrap().len(), closed.len(), "only period_closed: {}", rep["problems"]);
        assert_eq!(unbilled, tally_total, "the amounts are tally's whole usage");
        assert!(rows_with(&rep, "failed").is_empty());
        assert_eq!(b.emu.stats().posts, posts, "run {round}: no write attempted");
        let prom = std::fs::read_to_string(&textfile).unwrap();
        for line in [
            format!("tally_invoicer_drift_buckets{{status=\"period_closed\"}} {}", closed.len()),
            format!("tally_invoicer_drift_value{{status=\"period_closed\"}} {unbilled}"),
        ] {
            assert!(prom.lines().any(|l| l == line), "{line} in\n{prom}");
        }
        eprintln!(
            "[measure] legacy period rolled over, run {round}: {} buckets period_closed ({unbilled} units), exit {code}, {} Stripe writes",
            closed.len(),
            b.emu.stats().posts - posts
        );
    }

    // Pushed before a roll-over: counted; late usage for the closed period: reported, not sent.
    let start = arg_time(now + 2 * 3600 + 3 * 3600 - tally::stripe_emu::state::PERIOD_SECS);
    b.provision("acct_late", &["--legacy-start", &start]);
    let late = |b: &Billing, extra: &[&str]| -> (i32, Value) {
        report_of(b.reconcile_cmd("acct_late", extra).env("TALLY_STRIPE_MODE", "legacy").output().unwrap())
    };
    let (code, rep) = late(&b, &["--apply"]);
    assert_eq!(code, 0, "{}", rep["problems"]);
    let before = b.want_additive();
    b.ingest(600);
    advance_stripe_clock(&b, 3 * 3600);
    let posts = b.emu.stats().posts;
    let (code, rep) = late(&b, &["--apply"]);
    let closed: u64 = problems_with(&rep, "period_closed").iter().map(|c| c.2).sum();
    let grown: u64 = b.want_additive().iter().map(|(k, v)| v - before.get(k).copied().unwrap_or(0)).sum();
    assert_eq!(code, 2, "{}", rep["problems"]);
    assert!(closed >= grown && grown > 0, "the late usage is reported: {closed} >= {grown}");
    assert_eq!(b.emu.stats().posts, posts, "and not sent");
    let (code, _) = late(&b, &["--apply"]);
    assert_eq!((code, b.emu.stats().posts), (2, posts));
}

/// PRODUCT.md §7, closed periods, meters mode. Subscriptions bill the Stripe meters
/// (`provision --subscription-start`); Stripe finalizes a period's cycle invoice an hour after the
/// period ends. One account's period ended 20 minutes ago (its invoice is a draft): every bucket
/// is pushed and billed. Another's ended a day ago (its invoice is final): buckets that end by
/// then are reported `period_closed` with their amounts and never sent — Stripe would take the
/// meter events, but no invoice would bill them — while later buckets (the one straddling the
/// period's end included, written at the end) are pushed; exit 2, on every run. Late usage: the
/// draft account takes it all, the final one only after the period's end.
#[test]
fn meters_usage_after_the_invoice_is_finalized_is_reported_not_sent() {
    use tally::stripe_emu::state::PERIOD_SECS;
    let mut b = Billing::new("invfinal", 10, 1, 3_000);
    let now = tally::invoice::reconcile::now_secs();
    let draft_start = arg_time(now - 1200 - PERIOD_SECS);
    b.provision("acct_draft", &["--subscription-start", &draft_start]);
    let end = now - 86_400 + 1234; // not on a whole hour: one bucket straddles it
    b.provision("acct_final", &["--subscription-start", &arg_time(end - PERIOD_SECS)]);

    // What is billed, and what is not, of the usage so far: (before the period's end, after).
    let split = |want: &Hourly| -> (Hourly, Hourly) { want.clone().into_iter().partition(|(k, _)| k.2 + 3600 <= end) };
    let check_final = |b: &Billing, round: &str| -> u64 {
        let posts = b.emu.stats().posts;
        let (code, rep) = b.reconcile("acct_final", &["--apply"]);
        let closed = problems_with(&rep, "period_closed");
        assert_eq!(code, 2, "{}", rep["problems"]);
        assert_eq!(rep["problems"].as_array().unwrap().len(), closed.len(), "only period_closed: {}", rep["problems"]);
        assert!(
            closed.iter().all(|c| ADDITIVE.contains(&c.1.as_str())),
            "the unique meter's value is set after the end"
        );
        let (before, after) = split(&b.want_additive());
        let unbilled: u64 = closed.iter().map(|c| c.2).sum();
        assert_eq!(unbilled, before.values().sum::<u64>(), "{round}: the closed amounts are the usage before the end");
        let (add, _) = b.stripe_additive("acct_final");
        assert_eq!(add, after, "{round}: Stripe holds exactly the usage after the end");
        let (code, rep) = b.reconcile("acct_final", &["--apply"]);
        assert_eq!(code, 2, "{}", rep["problems"]);
        assert_eq!(problems_with(&rep, "period_closed"), closed, "{round}: reported again, the same");
        eprintln!(
            "[measure] meters mode, invoice final, {round}: {} buckets period_closed ({unbilled} units), {} pushed after \
             the end, {} Stripe writes",
            closed.len(),
            after.len(),
            b.emu.stats().posts - posts
        );
        unbilled
    };

    let (code, rep) = b.reconcile("acct_draft", &["--apply"]);
    assert_eq!(code, 0, "{}", rep["problems"]);
    b.assert_stripe_equals_tally("acct_draft");
    let (before, after) = split(&b.want_additive());
    assert!(!before.is_empty() && !after.is_empty(), "usage on both sides of the end");
    let unbilled = check_final(&b, "first runs");

    // Late usage: billed in full while the invoice is a draft; after the end only, once final.
    b.ingest(1_000);
    let (code, rep) = b.reconcile("acct_draft", &["--apply"]);
    assert_eq!(code, 0, "{}", rep["problems"]);
    b.assert_stripe_equals_tally("acct_draft");
    let grown = check_final(&b, "late usage");
    assert!(grown > unbilled, "late usage before the end is reported: {grown} > {unbilled}");
}

/// Meters mode: a write for a billing period counts on the period's invoice only if it arrived
/// before Stripe finalized it (`status_transitions.finalized_at`). An earlier run left two writes
/// of the closed period pending (its intents, no answers: a crash), one of them planned after the
/// finalization (a slow run); the next run, after the finalization, resends both. The one planned
/// after is `period_closed` with exactly its value; the one planned before and answered after is
/// `unresolved` (exit 1) until a person records when it landed (a `done` row, detail `landed`).
#[test]
fn meters_writes_landing_after_the_finalization_are_not_counted_as_billed() {
    use tally::invoice::ledger::LANDED_BY_HAND;
    use tally::stripe_emu::state::{FINALIZE_AFTER_SECS, PERIOD_SECS};
    let b = Billing::new("invlanded", 3, 1, 1_500);
    let acct = "acct_landed";
    // The period ended almost an hour ago: Stripe finalizes its invoice in 60 s.
    let fin = tally::invoice::reconcile::now_secs() + 60;
    let end = fin - FINALIZE_AFTER_SECS;
    b.provision(acct, &["--subscription-start", &arg_time(end - PERIOD_SECS)]);
    // No margin: every bucket is planned while the invoice is a draft; writes within 5 s of the
    // finalization are not judged.
    let reconcile = |extra: &[&str]| {
        report_of(
            b.reconcile_cmd(acct, extra)
                .env("TALLY_STRIPE_FINALIZE_MARGIN_SECS", "0")
                .env("TALLY_STRIPE_LANDING_TOLERANCE_SECS", "5")
                .output()
                .unwrap(),
        )
    };
    let (code, rep) = reconcile(&["--apply"]);
    assert_eq!(code, 0, "{}", rep["problems"]);
    b.assert_stripe_equals_tally(acct);
    assert!(tally::invoice::reconcile::now_secs() < fin - 5, "the run ended before the finalization");

    // Two pushes of the closed period, as a run that died after their intents leaves them.
    let db = b.w.ch.database();
    let picked = b.w.rows(&format!(
        "SELECT push_id, org_id, meter, toString(value) FROM stripe_ledger WHERE account = '{acct}' AND state = 'done' \
         AND action = 'push' AND bucket_end <= toDateTime({end}) ORDER BY value DESC, push_id LIMIT 2"
    ));
    assert_eq!(picked.len(), 2, "pushes before the period's end");
    let (unsure, late) = (&picked[0], &picked[1]);
    let cols = "push_id, state, action, mode, account, org_id, customer, meter, target, event_name, bucket_start, \
                bucket_end, seq, value, cancels, event_ts, run_id, detail, recorded_at";
    let copy = |id: &str, state: &str, detail: &str, at: i64| {
        b.w.ch
            .execute(
                &format!(
                    "INSERT INTO {db}.stripe_ledger ({cols}) SELECT push_id, '{state}', action, mode, account, org_id, \
                     customer, meter, target, event_name, bucket_start, bucket_end, seq, value, cancels, event_ts, \
                     'test', '{detail}', toDateTime({at}) FROM {db}.stripe_ledger WHERE push_id = '{id}' AND \
                     state = 'intent' LIMIT 1"
                ),
                false,
            )
            .unwrap();
    };
    // The late one's intent is dated after the finalization.
    copy(&late[0], "intent", "", fin + 10);
    b.w.ch
        .execute(
            &format!(
                "ALTER TABLE {db}.stripe_ledger DELETE WHERE push_id IN ('{}', '{}') AND (state = 'done' OR \
                 (push_id = '{}' AND recorded_at < toDateTime({fin})))",
                unsure[0], late[0], late[0]
            ),
            false,
        )
        .unwrap();
    wait_mutations(&b.w);
    while tally::invoice::reconcile::now_secs() <= fin + 11 {
        std::thread::sleep(Duration::from_millis(500));
    }

    // Resent after the finalization: Stripe holds both again, no invoice bills the late one.
    let value = |r: &Vec<String>| r[3].parse::<u64>().unwrap();
    let check = |code: i32, rep: &Value, unresolved: Vec<(String, String, u64)>| {
        assert_eq!(code, if unresolved.is_empty() { 2 } else { 1 }, "{}", rep["problems"]);
        assert_eq!(problems_with(rep, "unresolved"), unresolved);
        assert_eq!(problems_with(rep, "period_closed"), [(late[1].clone(), late[2].clone(), value(late))]);
        assert_eq!(rep["problems"].as_array().unwrap().len(), 1 + unresolved.len(), "{}", rep["problems"]);
    };
    let (code, rep) = reconcile(&["--apply"]);
    check(code, &rep, vec![(unsure[1].clone(), unsure[2].clone(), 0)]);
    b.assert_stripe_equals_tally(acct);
    let note = rep["problems"].as_array().unwrap().iter().find(|p| p["status"] == "unresolved").unwrap();
    assert!(note["note"].as_str().unwrap().contains(&unsure[0]), "{note}");
    let (code, rep) = reconcile(&[]);
    check(code, &rep, vec![(unsure[1].clone(), unsure[2].clone(), 0)]);

    // A person finds the uncertain write on the invoice: it landed before the finalization.
    copy(&unsure[0], "done", LANDED_BY_HAND, fin - 10);
    let (code, rep) = reconcile(&["--apply"]);
    check(code, &rep, vec![]);
    eprintln!(
        "[measure] meters mode, writes landing after the finalization: late {} units period_closed, uncertain resolved by hand",
        value(late)
    );
}

/// `tally-invoicer explain --format json` for one (customer, meter).
fn explain(b: &Billing, customer: &str, meter: &str, extra: &[&str]) -> Value {
    let mut args: Vec<String> = vec!["explain".into()];
    args.extend(b.period_args());
    args.extend(["--customer", customer, "--meter", meter, "--format", "json"].iter().map(|s| s.to_string()));
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = b.invoicer("", &refs).output().unwrap();
    assert!(out.status.success(), "explain: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// PRODUCT.md §7, Audit: `explain` drills from an invoice line to the Stripe writes, the buckets
/// and projects behind them and the events behind an hour; for a reconciled month that went
/// through late events (a second push of the same hours) and a correction (cancels and re-pushes),
/// the totals agree at every level, with tally, with Stripe's summaries and with the meter
/// events Stripe holds.
#[test]
fn explain_adds_up_at_every_level() {
    let mut b = Billing::new("invexplain", 4, 2, 4_000);
    b.provision("", &[]);
    assert_eq!(b.reconcile("", &["--apply"]).0, 0);
    b.ingest(1_500);
    assert_eq!(b.reconcile("", &["--apply"]).0, 0, "late events pushed");
    delete_project(&b.w, "org-001", "proj-001-00");
    let (code, rep) = b.reconcile("", &["--apply"]);
    assert_eq!(code, 0, "{}", rep["problems"]);
    assert!(!rows_with(&rep, "corrected").is_empty(), "a correction was cancelled and re-pushed");

    let map = b.billing("");
    let events = b.emulator_events("");
    let tally: BTreeMap<(String, String), u64> = b
        .w
        .rows(&format!(
            "SELECT org_id, meter, sum(value) FROM usage_hourly WHERE hour >= toDateTime({}) AND hour < toDateTime({}) GROUP BY org_id, meter",
            b.from, b.to
        ))
        .into_iter()
        .map(|r| ((r[0].clone(), r[1].clone()), r[2].parse().unwrap()))
        .collect();
    let (mut late_buckets, mut cancels, mut cancelled, mut levels) = (0, 0, 0, 0);
    let mut busiest: Option<(String, String, String, u64)> = None;
    for (org, customer) in &map.customers {
        for meter in ADDITIVE.iter().chain(["unique_users"].iter()) {
            let x = explain(&b, customer, meter, &[]);
            let line = &x["line"];
            let buckets = x["buckets"].as_array().unwrap();
            assert_eq!(line["org_ids"], serde_json::json!([org]));
            let billed: u64 = buckets.iter().map(|b| u(&b["billed"])).sum();
            assert_eq!(u(&line["billed"]), billed, "line billed = Σ buckets");
            for bk in buckets {
                let writes = bk["writes"].as_array().unwrap();
                assert_eq!(u(&bk["billed"]), writes.iter().map(|w| u(&w["counted"])).sum::<u64>(), "bucket = Σ writes");
                levels += 2;
                if *meter != "unique_users" {
                    let projects: u64 = bk["projects"].as_array().unwrap().iter().map(|p| u(&p["value"])).sum();
                    assert_eq!(u(&bk["tally"]), projects, "bucket tally = Σ projects");
                    assert_eq!(u(&bk["tally"]), u(&bk["billed"]), "reconciled bucket {bk}");
                    let pushes = writes.iter().filter(|w| w["action"] == "push").count();
                    late_buckets += usize::from(pushes >= 2);
                    cancels += writes.iter().filter(|w| w["action"] == "cancel").count();
                    cancelled += writes.iter().filter(|w| w["state"] == "cancelled").count();
                    if busiest.as_ref().is_none_or(|x| u(&bk["tally"]) > x.3) && *meter == "events" {
                        let hour = bk["bucket_start"].as_str().unwrap().to_string();
                        busiest = Some((customer.clone(), meter.to_string(), hour, u(&bk["tally"])));
                    }
                }
                // Every counted write is a meter event Stripe holds, uncancelled, with that value.
                for w in writes.iter().filter(|w| u(&w["counted"]) > 0) {
                    let e = events.iter().find(|e| e["identifier"] == w["push_id"]).expect("pushed");
                    assert_eq!((e["cancelled"].as_bool(), u(&e["value"])), (Some(false), u(&w["value"])));
                }
            }
            if *meter != "unique_users" {
                assert_eq!(u(&line["tally"]), buckets.iter().map(|b| u(&b["tally"])).sum::<u64>(), "line = Σ buckets");
            }
            let want = tally.get(&(org.clone(), meter.to_string())).copied().unwrap_or(0);
            let held: u64 = events
                .iter()
                .filter(|e| {
                    e["customer"] == customer.as_str()
                        && e["event_name"] == format!("tally_{meter}")
                        && e["cancelled"] == false
                        && *meter != "unique_users"
                })
                .map(|e| u(&e["value"]))
                .sum();
            if *meter != "unique_users" {
                assert_eq!((u(&line["tally"]), billed, held), (want, want, want), "{org} {meter}");
            }
            assert_eq!(line["stripe"].as_u64(), Some(u(&line["tally"])), "Stripe's summary for {org} {meter}");
        }
    }
    assert!(
        late_buckets > 0 && cancels > 0 && cancels == cancelled,
        "late {late_buckets}, cancels {cancels}/{cancelled}"
    );

    // The events behind the busiest hour, 7 per page: all pages sum to the hour's tally.
    let (customer, meter, hour, hour_tally) = busiest.unwrap();
    let (mut after, mut sum, mut ids, mut pages) = (None::<String>, 0u64, BTreeSet::new(), 0);
    loop {
        let mut extra = vec!["--events".to_string(), hour.clone(), "--limit".into(), "7".into()];
        if let Some(a) = &after {
            extra.extend(["--after".to_string(), a.clone()]);
        }
        let refs: Vec<&str> = extra.iter().map(String::as_str).collect();
        let page = explain(&b, &customer, &meter, &refs);
        pages += 1;
        assert_eq!(u(&page["hour_tally"]), hour_tally);
        let evs = page["events"].as_array().unwrap();
        assert_eq!(u(&page["page_value"]), evs.iter().map(|e| u(&e["value"])).sum::<u64>());
        sum += u(&page["page_value"]);
        for e in evs {
            assert!(ids.insert(e["event_id"].as_str().unwrap().to_string()), "an event on two pages");
        }
        match page["next_after"].as_str() {
            Some(a) => after = Some(a.to_string()),
            None => break,
        }
    }
    assert_eq!(sum, hour_tally, "the hour's events sum to its tally");
    eprintln!(
        "[measure] explain: {} customers x 7 meters, {levels} bucket-level sums checked, {late_buckets} buckets with late pushes, \
         {cancels} cancels; busiest hour {hour}: {} events in {pages} pages of 7 sum to {hour_tally}",
        map.customers.len(),
        ids.len()
    );
    // CSV and table render the same figures.
    let out = b
        .invoicer(
            "",
            &[
                &["explain", "--customer", &customer, "--meter", &meter][..],
                &b.period_args().iter().map(String::as_str).collect::<Vec<_>>()[..],
                &["--format", "csv"][..],
            ]
            .concat(),
        )
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("level,org_id,") && text.lines().nth(1).unwrap().starts_with("line,"), "{text}");
}
