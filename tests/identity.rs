//! Credentials for real deployments (PRODUCT.md §2): the API key lifecycle end to end — keys
//! created, rotated and revoked with `tally-ingest keys` in the shared ClickHouse key store,
//! honoured by two workers within `auth.reload_interval`. Requires `scripts/start.sh`.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{clickhouse_url, end_offsets, produce_with_headers, Running, World, PARTITIONS};
use serde_json::Value;

const PEPPER: &str = "it-pepper-0123456789abcdef0123456789abcdef";

fn with_store(mut c: Command) -> Command {
    c.env("TALLY_AUTH_API_KEYS_STORE", "clickhouse")
        .env("TALLY_AUTH_API_KEY_PEPPER", PEPPER)
        .env("TALLY_CLICKHOUSE_URL", clickhouse_url());
    c
}

fn keys(w: &World, args: &[&str]) -> Output {
    let mut a = vec!["keys"];
    a.extend_from_slice(args);
    let out = with_store(w.cli(&a)).output().unwrap();
    assert!(out.status.success(), "keys {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Produces `n` messages under `auth`, with loadgen ids `first..`, keyed to spread over every
/// partition; returns their (partition, offset).
fn send(w: &World, auth: &str, prefix: &str, first: u64, n: u64) -> Vec<(i32, i64)> {
    let now = tally::timestamp::format_rfc3339(tally::source::worker::now_secs());
    (first..first + n)
        .map(|i| {
            let id = i.to_string();
            let value = format!(r#"{{"id":"{prefix}-{i}","type":"trace-create","timestamp":"{now}"}}"#);
            produce_with_headers(
                &w.kafka.topic,
                &format!("k{i}"),
                value.as_bytes(),
                &[("authorization", auth), (tally::loadgen::H_LOADGEN_ID, &id)],
            )
        })
        .collect()
}

/// A key created with the CLI is accepted by both workers; rotated, the old and the new secret
/// both work during the grace and only the new one after it; revoked, it is refused by both
/// within the reload interval; every change is an audit row; no secret (nor the pepper) is in any
/// log line of the run or in `list`.
#[test]
fn api_keys_are_created_rotated_and_revoked_across_two_workers() {
    let w = World::new("keys");
    let created = keys(
        &w,
        &[
            "create",
            "--org",
            "org-k",
            "--project",
            "proj-k",
            "--reason",
            "onboarding",
            "--actor",
            "alice",
            "--format",
            "json",
        ],
    );
    let first = json(&created);
    let (pk, old_secret, old_auth) = (
        first["public_key"].as_str().unwrap().to_string(),
        first["secret"].as_str().unwrap().to_string(),
        first["authorization"].as_str().unwrap().to_string(),
    );
    let workers: Vec<Running> = ["a", "b"]
        .iter()
        .map(|l| {
            let log = std::fs::OpenOptions::new().create(true).append(true).open(w.log_path(l)).unwrap();
            Running(Some(with_store(w.cli(&["run"])).stderr(log).spawn().unwrap()))
        })
        .collect();
    for l in ["a", "b"] {
        assert!(w.wait_assigned(l, Duration::from_secs(60)), "worker {l} got partitions");
    }
    let accepted =
        |prefix: &str| w.scalar(&format!("SELECT count() FROM events FINAL WHERE event_id LIKE '{prefix}-%'"));
    let wait = |produced: &[(i32, i64)]| {
        tally::admin::wait_committed(&w.kafka, &end_offsets(produced), Duration::from_secs(90)).unwrap();
    };

    // Created: accepted on every partition, so by both workers.
    let p1 = send(&w, &old_auth, "created", 1, 40);
    wait(&p1);
    let parts: BTreeSet<i32> = p1.iter().map(|p| p.0).collect();
    assert_eq!(parts.len() as i32, PARTITIONS, "the messages reach every partition");
    assert_eq!(accepted("created"), 40);
    assert_eq!(
        w.scalar("SELECT uniqExact(src_partition) FROM events WHERE event_id LIKE 'created-%' AND org_id = 'org-k' AND project_id = 'proj-k'"),
        PARTITIONS as u64,
        "attributed to the key's org and project on every partition"
    );

    // Rotated with a 6 s grace: both secrets work during it.
    let rotated = keys(
        &w,
        &[
            "rotate",
            "--public-key",
            &pk,
            "--grace-secs",
            "6",
            "--reason",
            "scheduled rotation",
            "--actor",
            "bob",
            "--format",
            "json",
        ],
    );
    let grace_end = tally::source::worker::now_secs() + 6;
    let second = json(&rotated);
    let (new_secret, new_auth) =
        (second["secret"].as_str().unwrap().to_string(), second["authorization"].as_str().unwrap().to_string());
    assert_ne!(new_secret, old_secret);
    std::thread::sleep(Duration::from_millis(2_500)); // > auth.reload_interval (1 s)
    let mut p2 = send(&w, &old_auth, "grace-old", 101, 20);
    p2.extend(send(&w, &new_auth, "grace-new", 121, 20));
    wait(&p2);
    assert_eq!((accepted("grace-old"), accepted("grace-new")), (20, 20), "both secrets during the grace");

    // After the grace: the old secret is refused, the new one accepted.
    while tally::source::worker::now_secs() <= grace_end {
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut p3 = send(&w, &old_auth, "after-old", 201, 10);
    p3.extend(send(&w, &new_auth, "after-new", 211, 10));
    wait(&p3);
    assert_eq!((accepted("after-old"), accepted("after-new")), (0, 10));

    // Revoked: refused by both workers within the reload interval.
    let t = Instant::now();
    keys(&w, &["revoke", "--public-key", &pk, "--reason", "leaked in a CI log", "--actor", "carol"]);
    std::thread::sleep(Duration::from_millis(2_500));
    let p4 = send(&w, &new_auth, "revoked", 301, 20);
    wait(&p4);
    assert_eq!(accepted("revoked"), 0);
    let refused: BTreeSet<i32> = p4.iter().map(|p| p.0).collect();
    assert_eq!(refused.len() as i32, PARTITIONS, "refused on every partition, so by both workers");
    for r in workers {
        r.stop();
    }

    let dl = w.dead_letters();
    let reason_of = |lo: u64, hi: u64| -> BTreeSet<String> {
        dl.iter().filter(|(id, _, _)| (lo..hi).contains(id)).map(|(_, _, r)| r.clone()).collect()
    };
    assert_eq!(dl.iter().filter(|(id, _, _)| (201..211).contains(id)).count(), 10);
    assert_eq!(reason_of(201, 211), BTreeSet::from(["expired_credentials".to_string()]));
    assert_eq!(dl.iter().filter(|(id, _, _)| (301..321).contains(id)).count(), 20);
    assert_eq!(reason_of(301, 321), BTreeSet::from(["revoked_credentials".to_string()]));
    assert_eq!(dl.len(), 30, "nothing else refused: {dl:?}");

    // The audit trail: who, when, what, why.
    let audit = json(&keys(&w, &["audit", "--public-key", &pk, "--format", "json"]));
    let rows: Vec<(String, String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().into(),
                r["actor"].as_str().unwrap().into(),
                r["reason"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("create".into(), "alice".into(), "onboarding".into()),
            ("rotate".into(), "bob".into(), "scheduled rotation".into()),
            ("revoke".into(), "carol".into(), "leaked in a CI log".into())
        ]
    );
    let list = keys(&w, &["list", "--format", "json"]);
    let listed = json(&list);
    assert_eq!((listed[0]["public_key"].as_str(), listed[0]["status"].as_str()), (Some(pk.as_str()), Some("revoked")));

    // No secret, no hash and no pepper anywhere but the two `create`/`rotate` outputs.
    let hmac = |s: &str| hex::encode(tally::verify::api_key::hmac_secret(PEPPER.as_bytes(), s));
    let mut texts: Vec<(String, String)> = ["a", "b"]
        .iter()
        .map(|l| {
            (format!("worker {l} log"), String::from_utf8_lossy(&std::fs::read(w.log_path(l)).unwrap()).into_owned())
        })
        .collect();
    texts.push(("keys list".into(), String::from_utf8_lossy(&list.stdout).into_owned()));
    texts.push(("keys audit".into(), audit.to_string()));
    for out in [&created, &rotated] {
        texts.push(("keys stderr".into(), String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    for (what, text) in &texts {
        for secret in [
            old_secret.as_str(),
            new_secret.as_str(),
            PEPPER,
            &hmac(&old_secret),
            &hmac(&new_secret),
            &old_auth[6..],
            &new_auth[6..],
        ] {
            assert!(!text.contains(secret), "{what} holds a secret");
        }
    }
    let lines: usize = texts.iter().map(|(_, t)| t.lines().count()).sum();
    eprintln!(
        "[measure] key lifecycle on 2 workers: 40 accepted after create, 20 + 20 during a 6 s grace, old refused / new accepted after it, \
         20 sent 2.5 s after revoke all refused (run {:.1} s); 3 audit rows; {lines} log/output lines searched, no secret",
        t.elapsed().as_secs_f64()
    );
}
