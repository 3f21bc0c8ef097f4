use super::*;
use crate::devkeys::{basic, bearer, DevKeys};
use crate::meter::DEFAULT_METERS_TOML;

const NOW: i64 = 1_795_860_000;

struct Fx {
    keys: DevKeys,
    p: Processor,
    states: HashMap<i32, PartitionState>,
}

fn fx(name: &str) -> Fx {
    let dir = std::env::temp_dir().join(format!("tally-pipeline-{name}-{}", std::process::id()));
    let keys = DevKeys::generate(2, 2, "https://issuer.test", "tally-ingest");
    keys.write(&dir).unwrap();
    let auth = keys.auth_config(&dir);
    let p = Processor {
        meters: Meters::parse(DEFAULT_METERS_TOML).unwrap(),
        verifier: Verifier::from_config(&auth).unwrap(),
        limits: Limits { max_message_bytes: 4096, max_future_secs: 300, window_secs: 86_400 },
    };
    let mut states = HashMap::new();
    states.insert(0, PartitionState::new(4096, 1000, 0));
    Fx { keys, p, states }
}

fn ev(id: &str, ty: &str, ts: i64, body: &str) -> String {
    format!(r#"{{"id":"{id}","type":"{ty}","timestamp":"{}","body":{body}}}"#, crate::timestamp::format_rfc3339(ts))
}

/// (rejections as (batch index, reason), duplicates, rows written, RowBinary).
type RunResult = (Vec<(Option<u32>, Reason)>, u64, usize, Vec<u8>);

impl Fx {
    fn auth(&self) -> String {
        bearer(&self.keys.sign_eddsa(&self.keys.claims(&self.keys.tenants[0], NOW, 3600)))
    }
    fn run(&mut self, values: &[(Option<&str>, &str)]) -> RunResult {
        let msgs: Vec<InMessage> = values
            .iter()
            .enumerate()
            .map(|(i, (auth, v))| InMessage {
                partition: 0,
                offset: i as i64,
                timestamp_secs: Some(NOW),
                value: Some(v.as_bytes()),
                authorization: auth.map(str::as_bytes).into(),
            })
            .collect();
        let mut staged = self.p.stage(&msgs, &mut self.states, NOW).unwrap();
        staged.resolve(&HashSet::new());
        let mut w = RowWriter::default();
        let n = staged.encode(&mut w, &self.p.meters, "t", NOW);
        let rej = staged.rejections.iter().map(|r| (r.batch_index, r.reason)).collect();
        (rej, staged.duplicates, n, w.buf)
    }
}

#[test]
fn every_message_level_reason() {
    let mut f = fx("reasons");
    let good = f.auth();
    let t = &f.keys.tenants[0];
    let mut no_scope = f.keys.claims(t, NOW, 3600);
    no_scope["scope"] = "read".into();
    let no_scope = bearer(&f.keys.sign_eddsa(&no_scope));
    let expired = bearer(&f.keys.sign_eddsa(&f.keys.claims(t, NOW - 7200, 60)));
    let revoked = basic(&f.keys.revoked[0]);
    let e = ev("a", "trace-create", NOW, "{}");
    let big = "x".repeat(5000);
    let cases: Vec<(Option<&str>, String, Reason)> = vec![
        (None, e.clone(), Reason::MissingCredentials),
        (Some("Bearer abc.def.ghi"), e.clone(), Reason::InvalidCredentials),
        (Some(&expired), e.clone(), Reason::ExpiredCredentials),
        (Some(&revoked), e.clone(), Reason::RevokedCredentials),
        (Some(&no_scope), e.clone(), Reason::ForbiddenScope),
        (Some(&good), "{not json".into(), Reason::Malformed),
        (Some(&good), format!(r#"{{"id":"{big}"}}"#), Reason::TooLarge),
        (Some(&good), ev("a", "trace-create", NOW - 86_401, "{}"), Reason::TooOld),
        (Some(&good), ev("a", "trace-create", NOW + 301, "{}"), Reason::FutureTimestamp),
        (Some(&good), ev("", "trace-create", NOW, "{}"), Reason::Malformed),
        (Some(&good), ev(&"i".repeat(129), "trace-create", NOW, "{}"), Reason::Malformed),
        (Some(&good), ev("a", "", NOW, "{}"), Reason::Malformed),
        (Some(&good), r#"{"id":"a","type":"t","timestamp":"noon"}"#.into(), Reason::Malformed),
        (Some(&good), ev("a", "generation-create", NOW, r#"{"usage":{"input":-3}}"#), Reason::Malformed),
    ];
    for (auth, value, want) in cases {
        let (rej, dups, n, _) = f.run(&[(auth, &value)]);
        assert_eq!((rej, dups, n), (vec![(None, want)], 0, 0), "{value:.80}");
    }
    // Limits are inclusive.
    let (rej, _, n, _) = f.run(&[
        (Some(&good), &ev("edge1", "t", NOW - 86_400, "{}")),
        (Some(&good), &ev("edge2", "t", NOW + 300, "{}")),
    ]);
    assert_eq!((rej, n), (vec![], 2));
}

#[test]
fn batch_events_are_judged_one_by_one() {
    let mut f = fx("batch");
    let good = f.auth();
    let bad_event = ev("b2", "generation-create", NOW, r#"{"usage":{"input":1.5}}"#);
    let value = format!(
        r#"{{"batch":[{},{},{},7,{}]}}"#,
        ev("b1", "trace-create", NOW, "{}"),
        bad_event,
        ev("b3", "span-create", NOW + 3600, "{}"),
        ev("b4", "span-create", NOW, "{}"),
    );
    let msgs = [InMessage {
        partition: 0,
        offset: 9,
        timestamp_secs: Some(NOW),
        value: Some(value.as_bytes()),
        authorization: Credential::One(good.as_bytes()),
    }];
    let staged = f.p.stage(&msgs, &mut f.states, NOW).unwrap();
    let rej: Vec<_> = staged.rejections.iter().map(|r| (r.batch_index, r.reason)).collect();
    assert_eq!(rej, [(Some(1), Reason::Malformed), (Some(2), Reason::FutureTimestamp), (Some(3), Reason::Malformed)]);
    let span = staged.rejections[0].span.clone().unwrap();
    assert_eq!(&value[span], bad_event);
    assert_eq!(staged.accepted(), 2);

    let too_many = format!(r#"{{"batch":[{}]}}"#, vec![r#"{"id":"x"}"#; 1001].join(","));
    f.p.limits.max_message_bytes = 1 << 20;
    let (rej, ..) = f.run(&[(Some(&good), &too_many)]);
    assert_eq!(rej, [(None, Reason::TooLarge)]);
}

#[test]
fn duplicates_are_dropped_and_the_first_valid_copy_wins() {
    let mut f = fx("dups");
    let good = f.auth();
    let first = ev("d1", "generation-create", NOW, r#"{"usage":{"input":10}}"#);
    let second = ev("d1", "generation-create", NOW, r#"{"usage":{"input":99}}"#);
    // A rejected copy first (no credentials), then two valid ones: one counted, one duplicate.
    let (rej, dups, n, rows) = f.run(&[(None, &first), (Some(&good), &first), (Some(&good), &second)]);
    assert_eq!((rej.len(), dups, n), (1, 1, 1));
    assert!(rows.windows(8).any(|w| w == 10u64.to_le_bytes()), "the first valid copy's value is written");
    // A later batch: the in-memory state remembers it.
    let (_, dups, n, _) = f.run(&[(Some(&good), &first)]);
    assert_eq!((dups, n), (1, 0));
    // The same id in another project is another event.
    let other = basic(&f.keys.tenants[1]);
    let (_, dups, n, _) = f.run(&[(Some(&other), &first)]);
    assert_eq!((dups, n), (0, 1));
}

#[test]
fn copies_in_one_batch_are_caught_even_with_no_recent_set() {
    let mut f = fx("nobound");
    f.states.insert(0, PartitionState::new(1024, 0, 0));
    let good = f.auth();
    let fillers: Vec<String> = (0..3000).map(|i| ev(&format!("f{i}"), "trace-create", NOW, "{}")).collect();
    let dup = ev("twice", "trace-create", NOW, "{}");
    let mut values: Vec<(Option<&str>, &str)> = vec![(Some(&good), &dup)];
    values.extend(fillers.iter().map(|v| (Some(good.as_str()), v.as_str())));
    values.push((Some(&good), &dup));
    let (_, dups, n, _) = f.run(&values);
    assert_eq!((dups, n), (1, 3001));
}

#[test]
fn unknown_events_are_resolved_by_the_store() {
    let mut f = fx("unknown");
    // A state whose horizon is after the events: every event must be checked in the store.
    f.states.insert(0, PartitionState::new(4096, 0, NOW + 1));
    let good = f.auth();
    let (a, b) = (ev("u1", "trace-create", NOW, "{}"), ev("u2", "trace-create", NOW, "{}"));
    let msgs: Vec<_> = [&a, &b]
        .iter()
        .enumerate()
        .map(|(i, v)| InMessage {
            partition: 0,
            offset: i as i64,
            timestamp_secs: Some(NOW),
            value: Some(v.as_bytes()),
            authorization: Credential::One(good.as_bytes()),
        })
        .collect();
    let mut staged = f.p.stage(&msgs, &mut f.states, NOW).unwrap();
    let unknown = staged.unknown_keys();
    assert_eq!(unknown.len(), 2);
    let found: HashSet<_> = [EventKey::new(unknown[0].0, unknown[0].1, "u1")].into();
    staged.resolve(&found);
    assert_eq!((staged.accepted(), staged.duplicates), (1, 1));
}

#[test]
fn a_partition_without_state_is_an_error() {
    let mut f = fx("nostate");
    let good = f.auth();
    let v = ev("x", "t", NOW, "{}");
    let msgs = [InMessage {
        partition: 3,
        offset: 0,
        timestamp_secs: None,
        value: Some(v.as_bytes()),
        authorization: Credential::One(good.as_bytes()),
    }];
    assert!(f.p.stage(&msgs, &mut f.states, NOW).is_err());
}
