//! The core without I/O: decode + verify + validate + meter + dedupe + RowBinary encode (the
//! rows and their carrier columns, as the INSERT's body), on one core. `cargo bench --bench pipeline` prints events/s for single-event and batch messages.
//! `BENCH_EVENTS` (default 1,000,000) and `BENCH_ROUNDS` (default 3) shrink a run, e.g. to count
//! instructions under `valgrind --tool=callgrind` (repeatable where wall time is not).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tally::decode::scan::scan_message;
use tally::decode::Captured;
use tally::dedupe::PartitionState;
use tally::devkeys::{basic, bearer, DevKeys};
use tally::meter::{Meters, DEFAULT_METERS_TOML};
use tally::pipeline::{InMessage, Limits, Processor};
use tally::verify::Verifier;

const NOW: i64 = 1_795_860_000;

fn event(i: u64, project: usize) -> String {
    let ty = ["trace-create", "span-create", "generation-create", "generation-update", "event-create", "score-create"]
        [(i % 6) as usize];
    format!(
        r#"{{"id":"evt-{i:012}","type":"{ty}","timestamp":"2026-11-28T09:{:02}:{:02}.123Z","body":{{"traceId":"t-{}","name":"llm-call","userId":"u-{project}-{}","model":"gpt-4o","usage":{{"input":{},"output":{},"unit":"TOKENS"}},"metadata":{{"env":"prod"}}}}}}"#,
        i / 60 % 60,
        i % 60,
        i % 1000,
        i % 50,
        i % 5000,
        i % 700
    )
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    // As the binaries run (no transparent huge pages): the core measured the same either way.
    tally::disable_transparent_huge_pages();
    let dir = std::env::temp_dir().join(format!("tally-bench-{}", std::process::id()));
    let keys = DevKeys::generate(10, 6, "https://issuer.bench", "tally-ingest");
    keys.write(&dir).unwrap();
    let auth = keys.auth_config(&dir);
    let creds: Vec<String> = keys
        .tenants
        .iter()
        .enumerate()
        .map(|(i, t)| if i % 2 == 0 { bearer(&keys.sign_eddsa(&keys.claims(t, NOW, 3600))) } else { basic(t) })
        .collect();

    let mut results = Vec::new();
    for (label, per_message) in [("single-event messages", 1usize), ("batches of 50 events", 50)] {
        let total: u64 = env_or("BENCH_EVENTS", 1_000_000);
        let values: Vec<String> = (0..total / per_message as u64)
            .map(|m| {
                let first = m * per_message as u64;
                if per_message == 1 {
                    event(first, (m % 60) as usize)
                } else {
                    let evs: Vec<String> =
                        (first..first + per_message as u64).map(|i| event(i, (m % 60) as usize)).collect();
                    format!(r#"{{"batch":[{}]}}"#, evs.join(","))
                }
            })
            .collect();
        let msgs: Vec<InMessage> = values
            .iter()
            .enumerate()
            .map(|(i, v)| InMessage {
                partition: 0,
                offset: i as i64,
                timestamp_secs: Some(NOW),
                value: Some(v.as_bytes()),
                authorization: tally::verify::Credential::One(creds[i % creds.len()].as_bytes()),
            })
            .collect();
        let mut p = Processor {
            meters: Meters::parse(DEFAULT_METERS_TOML).unwrap(),
            verifier: Verifier::from_config(&auth).unwrap(),
            limits: Limits { max_message_bytes: 1 << 20, max_future_secs: 300, window_secs: 30 * 86_400 },
            hint: Default::default(),
        };
        let mut best = f64::MAX;
        let mut carriers = f64::MAX;
        let mut dedupe_bytes_per_key = 0.0;
        for _ in 0..env_or("BENCH_ROUNDS", 3) {
            let mut states = HashMap::new();
            states.insert(0, PartitionState::new(16 << 20, 262_144, 0));
            let t = Instant::now();
            let mut n = 0;
            let mut in_carriers = Duration::ZERO;
            for chunk in msgs.chunks(50_000 / per_message) {
                let mut staged = p.stage(chunk, &mut states, NOW).unwrap();
                staged.resolve(&HashSet::new());
                let flight = staged.flight(&p.meters, "trace-events", NOW);
                let c = Instant::now();
                // Read as the HTTP client reads it, into a small buffer (std::io::copy's).
                let mut body = flight.body();
                let len = body.len();
                assert_eq!(std::io::copy(&mut body, &mut std::io::sink()).unwrap() as usize, len);
                in_carriers += c.elapsed();
                n += flight.len();
            }
            assert_eq!(n as u64, total);
            let took = t.elapsed().as_secs_f64();
            if took < best {
                (best, carriers) = (took, in_carriers.as_secs_f64());
            }
            let st = &states[&0];
            dedupe_bytes_per_key = st.memory_bytes() as f64 / st.keys().max(1) as f64;
        }
        // The yardstick (issue 9): a plain serde_json validation pass over the same bytes.
        let mut yard = f64::MAX;
        for _ in 0..env_or("BENCH_ROUNDS", 3) {
            let t = Instant::now();
            for v in &values {
                let _: serde::de::IgnoredAny = serde_json::from_slice(std::hint::black_box(v.as_bytes())).unwrap();
            }
            yard = yard.min(t.elapsed().as_secs_f64());
        }
        // The scanner alone (decode of every value, no verify, dedupe, meter or encode).
        let tree = p.meters.tree();
        let mut scan = f64::MAX;
        for _ in 0..env_or("BENCH_ROUNDS", 3) {
            let (mut caps, mut keys, mut events) = (vec![Captured::Missing; tree.slots()], Vec::new(), Vec::new());
            let t = Instant::now();
            for v in &values {
                caps.fill(Captured::Missing);
                let m = scan_message(std::hint::black_box(v.as_bytes()), tree, &mut caps, &mut keys, &mut events, 1000);
                assert!(m.is_ok());
            }
            scan = scan.min(t.elapsed().as_secs_f64());
        }
        let bytes: usize = values.iter().map(String::len).sum();
        println!(
            "{label:<24} {:>10.0} events/s  ({:.0} MB/s of JSON, best of the rounds, 1 core, {} events); \
             serde_json IgnoredAny over the same bytes: {:.0} events/s; core / yardstick = {:.2}; \
             the scanner alone: {:.0} events/s; carrier rows {:.0} % of the core",
            total as f64 / best,
            bytes as f64 / best / 1e6,
            total,
            total as f64 / yard,
            yard / best,
            total as f64 / scan,
            100.0 * carriers / best
        );
        results.push(serde_json::json!({
            "messages": label, "events": total, "core_events_per_s": total as f64 / best,
            "yardstick_events_per_s": total as f64 / yard, "core_vs_yardstick": yard / best,
            "scanner_events_per_s": total as f64 / scan, "carriers_share_of_core": carriers / best,
            "dedupe_bytes_per_key": dedupe_bytes_per_key,
        }));
    }
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write("target/bench/core.json", serde_json::to_string_pretty(&results).unwrap()).unwrap();
}
