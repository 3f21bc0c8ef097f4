// Test tables spell their shapes out where they are written.
#![allow(clippy::type_complexity)]

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
        hint: Default::default(),
    };
    let mut states = HashMap::new();
    states.insert(0, PartitionState::new(4096, 1000, 0));
    Fx { keys, p, states }
}

fn ev(id: &str, ty: &str, ts: i64, body: &str) -> String {
    format!(r#"{{"id":"{id}","type":"{ty}","timestamp":"{}","body":{body}}}"#, crate::timestamp::format_rfc3339(ts))
}

/// A message of `partition` at `offset`, stamped `NOW`, with one `authorization` header.
fn message<'a>(partition: i32, offset: i64, value: &'a str, authorization: &'a str) -> InMessage<'a> {
    InMessage {
        partition,
        offset,
        timestamp_secs: Some(NOW),
        value: Some(value.as_bytes()),
        authorization: Credential::One(authorization.as_bytes()),
    }
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
        let flight = staged.flight(&self.p.meters, "t", NOW);
        let rej = staged.rejections.iter().map(|r| (r.batch_index, r.reason)).collect();
        (rej, staged.duplicates, flight.len(), flight.buf)
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

/// Every event an object, none repeating a key: the batch is read in one pass, and the events
/// refused while staging still dead-letter with their own text.
#[test]
fn one_pass_batches_keep_each_refused_events_text() {
    let mut f = fx("onepass");
    let good = f.auth();
    let fractional = ev("c2", "generation-create", NOW, r#"{"usage":{"input":1.5}}"#);
    let future = ev("c3", "span-create", NOW + 3600, "{}");
    let value = format!(
        r#"{{"batch":[{}, {},{} ,{}]}}"#,
        ev("c1", "trace-create", NOW, "{}"),
        fractional,
        future,
        ev("c4", "span-create", NOW, "{}"),
    );
    let mut caps = vec![Captured::Missing; f.p.meters.tree().slots()];
    let one = crate::decode::decode_message_captured(
        value.as_bytes(),
        f.p.meters.tree(),
        &mut caps,
        &mut Vec::new(),
        &mut Vec::new(),
        MAX_BATCH_EVENTS,
    );
    assert!(matches!(one, Ok(Message::Captured(4))));
    let msgs = [InMessage {
        partition: 0,
        offset: 3,
        timestamp_secs: Some(NOW),
        value: Some(value.as_bytes()),
        authorization: Credential::One(good.as_bytes()),
    }];
    let staged = f.p.stage(&msgs, &mut f.states, NOW).unwrap();
    let rej: Vec<_> = staged.rejections.iter().map(|r| (r.batch_index, r.reason)).collect();
    assert_eq!(rej, [(Some(1), Reason::Malformed), (Some(2), Reason::FutureTimestamp)]);
    assert_eq!(&value[staged.rejections[0].span.clone().unwrap()], fractional);
    assert_eq!(&value[staged.rejections[1].span.clone().unwrap()], future);
    assert_eq!(staged.accepted(), 2);
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
    let msgs: Vec<_> = [&a, &b].iter().enumerate().map(|(i, v)| message(0, i as i64, v, &good)).collect();
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

/// Stages one message per value (same credential) and returns what each bills, or why not.
fn outcomes(f: &mut Fx, values: &[&str]) -> Vec<Result<Vec<(String, u64)>, Reason>> {
    let good = f.auth();
    let msgs: Vec<InMessage> = values
        .iter()
        .enumerate()
        .map(|(i, v)| InMessage {
            partition: 0,
            offset: 1000 + i as i64,
            timestamp_secs: Some(NOW),
            value: Some(v.as_bytes()),
            authorization: Credential::One(good.as_bytes()),
        })
        .collect();
    let mut staged = f.p.stage(&msgs, &mut f.states, NOW).unwrap();
    staged.resolve(&HashSet::new());
    let billed = staged.billed(&f.p.meters, &msgs);
    (0..values.len())
        .map(|i| {
            if let Some(r) = staged.rejections.iter().find(|r| r.msg == i) {
                return Err(r.reason);
            }
            let b = billed.iter().find(|b| b.msg == i).expect("billed or rejected, never neither");
            let mut v: Vec<(String, u64)> = b.additive.iter().map(|(m, v)| (m.to_string(), *v)).collect();
            v.extend(b.unique.iter().map(|(m, h)| (m.to_string(), *h)));
            Ok(v)
        })
        .collect()
}

fn ts(secs: i64) -> String {
    crate::timestamp::format_rfc3339(secs)
}

/// Issue 7, rows 1–6: the inputs real producers send, each with the value the contract requires.
#[test]
fn field_inputs_bill_what_the_contract_says() {
    let mut f = fx("field");
    let t = ts(NOW);
    let gen = |v: &[(&str, u64)]| -> Result<Vec<(String, u64)>, Reason> {
        let mut out = vec![("events".to_string(), 1), ("observations".to_string(), 1)];
        out.extend(v.iter().map(|(m, x)| (m.to_string(), *x)));
        Ok(out)
    };
    let rows = [
        // Row 1: 12.0 is the integer 12.
        format!(
            r#"{{"id":"a","type":"generation-create","timestamp":"{t}","body":{{"usage":{{"input":12.0,"output":3}}}}}}"#
        ),
        // Row 2: 1e3 is 1000.
        format!(
            r#"{{"id":"a2","type":"generation-create","timestamp":"{t}","body":{{"usage":{{"input":1e3,"output":3}}}}}}"#
        ),
        // Row 3: two `body` keys: malformed, never merged.
        format!(
            r#"{{"id":"b","type":"generation-create","timestamp":"{t}","body":{{"usage":{{"input":812,"output":96}}}},"body":{{"model":"gpt-4o"}}}}"#
        ),
        // Row 4: event fields and an empty batch: malformed, never silently nothing.
        format!(r#"{{"id":"c","type":"trace-create","timestamp":"{t}","batch":[]}}"#),
        // Row 5: above 2^53 − 1: malformed (and a second event of the hour bills 1).
        format!(
            r#"{{"id":"e1","type":"generation-create","timestamp":"{t}","body":{{"usage":{{"input":18446744073709551615}}}}}}"#
        ),
        format!(r#"{{"id":"e2","type":"generation-create","timestamp":"{t}","body":{{"usage":{{"input":1}}}}}}"#),
        // Row 6: a lone surrogate: billed, the user id hashed after U+FFFD replacement.
        format!(
            r#"{{"id":"d","type":"generation-create","timestamp":"{t}","body":{{"userId":"u-\ud83d","usage":{{"input":812,"output":96}}}}}}"#
        ),
    ];
    let got = outcomes(&mut f, &rows.iter().map(String::as_str).collect::<Vec<_>>());
    let hash = crate::meter::unique_hash("u-\u{fffd}");
    assert_eq!(
        got,
        [
            gen(&[("input_tokens", 12), ("output_tokens", 3)]),
            gen(&[("input_tokens", 1000), ("output_tokens", 3)]),
            Err(Reason::Malformed),
            Err(Reason::Malformed),
            Err(Reason::Malformed),
            gen(&[("input_tokens", 1)]),
            gen(&[("input_tokens", 812), ("output_tokens", 96), ("unique_users", hash)]),
        ]
    );
}

/// The kinds beyond the rows: every numeric form on every meter path, repeated keys anywhere
/// along a read path, surrogates in any string (read or not), batch wrappers.
#[test]
fn field_input_kinds() {
    let mut f = fx("kinds");
    let t = ts(NOW);
    let e =
        |id: &str, body: &str| format!(r#"{{"id":"{id}","type":"generation-create","timestamp":"{t}","body":{body}}}"#);
    let cases: Vec<(String, Result<Vec<(String, u64)>, Reason>)> = vec![
        (e("n1", r#"{"usage":{"output":1.2e1}}"#), Ok(vec![("output_tokens".into(), 12)])),
        (e("n2", r#"{"usage":{"output":-0}}"#), Ok(vec![])),
        (e("n3", r#"{"usage":{"output":1200e-2}}"#), Ok(vec![("output_tokens".into(), 12)])),
        (e("n4", r#"{"usage":{"output":9007199254740991}}"#), Ok(vec![("output_tokens".into(), 9007199254740991)])),
        (e("n5", r#"{"usage":{"output":9007199254740992}}"#), Err(Reason::Malformed)),
        (e("n6", r#"{"usage":{"output":12.5}}"#), Err(Reason::Malformed)),
        (e("n7", r#"{"usage":{"output":12.000000000000000001}}"#), Err(Reason::Malformed)),
        (e("n8", r#"{"usage":{"input":-1e0}}"#), Err(Reason::Malformed)),
        (e("n9", r#"{"usage":{"input":"12"}}"#), Err(Reason::Malformed)),
        (e("k1", r#"{"usage":{"input":1,"input":1}}"#), Err(Reason::Malformed)),
        (e("k2", r#"{"usage":{"input":1},"usage":{"input":1}}"#), Err(Reason::Malformed)),
        (e("k3", r#"{"userId":"a","userId":"b"}"#), Err(Reason::Malformed)),
        (format!(r#"{{"id":"k4","id":"k5","type":"trace-create","timestamp":"{t}"}}"#), Err(Reason::Malformed)),
        (format!(r#"{{"id":"k6","type":"trace-create","timestamp":"{t}","timestamp":"{t}"}}"#), Err(Reason::Malformed)),
        // Surrogates in a field nothing reads, in a key, and a proper pair.
        (e("s1", r#"{"input":"cut \udc00 here","usage":{"input":5}}"#), Ok(vec![("input_tokens".into(), 5)])),
        (e("s2", r#"{"\ud800":1,"usage":{"input":5}}"#), Ok(vec![("input_tokens".into(), 5)])),
        (e("s3", r#"{"userId":"\ud83d\ude00"}"#), Ok(vec![("unique_users".into(), crate::meter::unique_hash("😀"))])),
        // An id with a lone surrogate is the id with U+FFFD.
        (format!(r#"{{"id":"s4\ud83d","type":"trace-create","timestamp":"{t}"}}"#), Ok(vec![("traces".into(), 1)])),
    ];
    let values: Vec<&str> = cases.iter().map(|(v, _)| v.as_str()).collect();
    let got = outcomes(&mut f, &values);
    for ((v, want), got) in cases.iter().zip(got) {
        let want = want.clone().map(|extra| {
            let mut w = vec![("events".to_string(), 1)];
            if v.contains("generation-create") {
                w.push(("observations".to_string(), 1));
            }
            w.extend(extra);
            w
        });
        assert_eq!(got, want, "{v}");
    }
    // The repaired id is stored as the replaced string.
    let good = f.auth();
    let v = format!(r#"{{"id":"x\udc00y","type":"trace-create","timestamp":"{t}"}}"#);
    let msgs = [InMessage {
        partition: 0,
        offset: 5000,
        timestamp_secs: Some(NOW),
        value: Some(v.as_bytes()),
        authorization: Credential::One(good.as_bytes()),
    }];
    let staged = f.p.stage(&msgs, &mut f.states, NOW).unwrap();
    assert_eq!(staged.billed(&f.p.meters, &msgs)[0].id, "x\u{fffd}y");
}

/// A batch with a repaired surrogate keeps its dead-letter spans on the original bytes.
#[test]
fn repaired_batches_keep_their_spans() {
    let mut f = fx("spans");
    let good = f.auth();
    let bad = r#"{"id":"q\ud83d","type":"generation-create","timestamp":"x"}"#;
    let v = format!(r#"{{"batch":[{},{bad}]}}"#, ev("ok\\ud83d", "trace-create", NOW, "{}"));
    let msgs = [InMessage {
        partition: 0,
        offset: 1,
        timestamp_secs: Some(NOW),
        value: Some(v.as_bytes()),
        authorization: Credential::One(good.as_bytes()),
    }];
    let staged = f.p.stage(&msgs, &mut f.states, NOW).unwrap();
    assert_eq!(staged.accepted(), 1);
    assert_eq!(&v[staged.rejections[0].span.clone().unwrap()], bad);
}

/// Issue 7 row 6 inside a batch, with the surrogate in a key the decoder reads: billed like the
/// same event sent alone.
#[test]
fn surrogates_in_batch_events_bill_like_single_events() {
    let mut f = fx("batchsurr");
    let t = ts(NOW);
    let event =
        format!(r#"{{"id":"bs1","type":"trace-create","timestamp":"{t}","body":{{"userId":"u","n\ud83d":1}}}}"#);
    let alone = outcomes(&mut f, &[&event.replace("bs1", "bs0")]);
    let batched = outcomes(&mut f, &[&format!(r#"{{"batch":[{event}]}}"#)]);
    let want = Ok(vec![
        ("events".to_string(), 1),
        ("traces".to_string(), 1),
        ("unique_users".to_string(), crate::meter::unique_hash("u")),
    ]);
    assert_eq!((alone[0].clone(), batched[0].clone()), (want.clone(), want));
}

/// Producer-controlled message timestamps of any size never overflow the time checks, and rows
/// never hold an event time ClickHouse `DateTime` cannot.
#[test]
fn extreme_message_timestamps_are_refused_not_wrapped() {
    let mut f = fx("times");
    // A token valid at any message time: no `iat`/`nbf`, `exp` far beyond every test time.
    let mut c = f.keys.claims(&f.keys.tenants[0], NOW, 0);
    c["exp"] = i64::MAX.into();
    c.as_object_mut().unwrap().retain(|k, _| k != "iat" && k != "nbf");
    let good = bearer(&f.keys.sign_eddsa(&c));
    for (at, event_ts, want) in [
        (i64::MAX - 1, "9999-12-31T23:59:59Z", Some(Reason::TooOld)),
        (i64::MIN, "1970-01-01T00:00:00Z", Some(Reason::FutureTimestamp)),
        // Beyond what `DateTime` (UInt32) holds, whatever the message time says.
        (u32::MAX as i64, "2106-02-07T06:00:00Z", Some(Reason::FutureTimestamp)),
        (u32::MAX as i64, "2106-02-07T05:00:00Z", None),
        (-10, "1969-12-31T23:59:59Z", Some(Reason::TooOld)),
    ] {
        let v = format!(r#"{{"id":"t{at}","type":"trace-create","timestamp":"{event_ts}"}}"#);
        let msgs = [InMessage {
            partition: 0,
            offset: 1,
            timestamp_secs: Some(at),
            value: Some(v.as_bytes()),
            authorization: Credential::One(good.as_bytes()),
        }];
        let staged = f.p.stage(&msgs, &mut f.states, NOW).unwrap();
        assert_eq!(staged.rejections.first().map(|r| r.reason), want, "{at} {event_ts}");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// Deduplication, decided after staging (`Staged::deduplicate`), is what deciding event by
    /// event in staging order gives: a copy is a duplicate if its key was remembered by its
    /// partition in an earlier batch or was accepted earlier in this batch (in any partition); the
    /// partitions interleave within batches, so the state switches back and forth. Batches cross
    /// the blocks it decides in (128 events). With a small recent-key cache, keys are evicted and
    /// their copies are looked up: then each partition has ids of its own (copies of an event
    /// share a partition) and the look-up finds the keys of earlier batches, as ClickHouse would.
    #[test]
    fn deduplication_decides_in_staging_order(
        batches in proptest::collection::vec(proptest::collection::vec((0i32..3, 0u32..160), 1..300), 1..4),
        recent in proptest::prop_oneof![proptest::strategy::Just(1usize << 14), 0usize..40],
    ) {
        let mut f = fx("dedupe-order");
        for p in 0..3 {
            f.states.insert(p, PartitionState::new(1 << 16, recent, 0));
        }
        let good = f.auth();
        let shared = recent == 1 << 14;
        let name = |p: i32, id: u32| if shared { format!("e{id}") } else { format!("p{p}-e{id}") };
        let mut remembered: HashSet<(i32, String)> = HashSet::new();
        let mut store: HashSet<EventKey> = HashSet::new();
        for batch in batches {
            let names: Vec<String> = batch.iter().map(|&(p, id)| name(p, id)).collect();
            let values: Vec<String> = names.iter().map(|n| ev(n, "trace-create", NOW, "{}")).collect();
            let msgs: Vec<InMessage> =
                batch.iter().zip(&values).enumerate().map(|(i, ((p, _), v))| message(*p, i as i64, v, &good)).collect();
            let mut staged = f.p.stage(&msgs, &mut f.states, NOW).unwrap();
            // With shared ids, the cache is large enough that nothing is evicted (and a Bloom false
            // positive is new to the store).
            let empty = HashSet::new();
            staged.resolve(if shared { &empty } else { &store });
            let mut in_batch = HashSet::new();
            let mut want_new = Vec::new();
            for (i, (p, n)) in batch.iter().map(|b| b.0).zip(&names).enumerate() {
                if !in_batch.contains(n) && !remembered.contains(&(p, n.clone())) {
                    in_batch.insert(n.clone());
                    want_new.push(i);
                }
            }
            for &i in &want_new {
                remembered.insert((batch[i].0, names[i].clone()));
                let t = &f.keys.tenants[0];
                store.insert(EventKey::new(&t.org_id, &t.project_id, &names[i]));
            }
            let billed: Vec<usize> = staged.billed(&f.p.meters, &msgs).iter().map(|b| b.msg).collect();
            proptest::prop_assert_eq!(&billed, &want_new);
            proptest::prop_assert_eq!(staged.duplicates as usize, batch.len() - want_new.len());
            let mut want_dup = std::collections::BTreeMap::new();
            for (_, (p, _)) in batch.iter().enumerate().filter(|(i, _)| !want_new.contains(i)) {
                *want_dup.entry(*p).or_insert(0u64) += 1;
            }
            proptest::prop_assert_eq!(staged.duplicates_by_partition(), want_dup);
        }
    }
}

/// One row of an INSERT body ([`crate::sink::flight::Flight::body`]): its bytes before the
/// carrier columns, (org, project, hour), and its carrier columns.
struct BodyRow {
    base: Vec<u8>,
    group: (String, String, u32),
    /// The row's own `meters`/`meter_values` and `unique_meters`/`unique_hashes`: the ledger.
    own: (Vec<(String, u64)>, Vec<(String, u64)>),
    /// `agg_additive`: how many of the entries are sums.
    additive: i32,
    sums: Vec<(String, u64)>,
    pairs: Vec<(String, u64)>,
}

/// Reads an INSERT body in the columns `EVENTS_COLUMNS, CARRIER_COLUMNS`.
fn body_rows(body: &[u8]) -> Vec<BodyRow> {
    use crate::sink::rowbinary::RowReader;
    let mut r = RowReader::new(body);
    let mut out = Vec::new();
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
    while !r.is_empty() {
        let start = r.rest();
        let (org, project) = (text(r.string().unwrap()), text(r.string().unwrap()));
        r.string().unwrap();
        r.string().unwrap();
        r.u32().unwrap();
        let hour = r.u32().unwrap();
        r.u64().unwrap();
        let arrays = |r: &mut RowReader| -> Vec<(String, u64)> {
            let names: Vec<String> = (0..r.varint().unwrap()).map(|_| text(r.string().unwrap())).collect();
            assert_eq!(r.varint().unwrap() as usize, names.len());
            names.into_iter().map(|n| (n, r.u64().unwrap())).collect()
        };
        let own = (arrays(&mut r), arrays(&mut r));
        r.string().unwrap();
        r.u32().unwrap();
        r.u64().unwrap();
        r.u32().unwrap(); // batch_index: Int32, 4 bytes
        r.u32().unwrap();
        let base = start[..start.len() - r.rest().len()].to_vec();
        let additive = i32::from_le_bytes(r.rest()[..4].try_into().unwrap());
        r = RowReader::new(&r.rest()[4..]);
        let mut entries = arrays(&mut r);
        let pairs = entries.split_off(additive as usize);
        let sums = entries;
        out.push(BodyRow { base, group: (org, project, hour), own, additive, sums, pairs });
    }
    out
}

/// Checks an INSERT body against the model: the rows of `flight` in order, unchanged, each
/// billing in its own `meters` columns (the ledger) what the model says; in each
/// (org, project, hour) group, the last row is the carrier with the group's per-meter sums and
/// its distinct (meter, hash) pairs of those columns, and every other row has `agg_additive` 0
/// and empty arrays.
fn check_carriers(
    flight: &crate::sink::flight::Flight,
    expected: &[((String, String, u32), Vec<(String, u64)>, Vec<(String, u64)>)],
) {
    let rows = body_rows(&flight.body().into_vec());
    assert_eq!(
        rows.iter().flat_map(|r| r.base.iter().copied().chain([0; 6])).collect::<Vec<u8>>(),
        flight.buf,
        "the rows themselves are unchanged (in the flight, each ends in the columns of a counted row)"
    );
    assert_eq!(rows.len(), expected.len());
    let mut want: std::collections::BTreeMap<
        (String, String, u32),
        (std::collections::BTreeMap<String, u64>, std::collections::BTreeSet<(String, u64)>),
    > = Default::default();
    for (row, (g, add, uniq)) in rows.iter().zip(expected) {
        // Each row's own columns bill what the model says; the carriers must equal their sums.
        assert_eq!((&row.own.0, &row.own.1), (add, uniq));
        let (add, uniq) = &row.own;
        let w = want.entry(g.clone()).or_default();
        for (m, v) in add {
            *w.0.entry(m.clone()).or_default() += v;
        }
        w.1.extend(uniq.iter().cloned());
    }
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.group, expected[i].0);
        let last = rows[i + 1..].iter().all(|r| r.group != row.group);
        if last {
            let (sums, pairs) = want.remove(&row.group).expect("one carrier per group");
            assert_eq!(row.additive as usize, sums.len());
            let mut got = row.sums.clone();
            got.sort();
            assert_eq!(got, sums.into_iter().collect::<Vec<_>>());
            assert_eq!(row.pairs, pairs.into_iter().collect::<Vec<_>>());
        } else {
            assert_eq!(row.additive, 0);
            assert!(row.sums.is_empty() && row.pairs.is_empty());
        }
    }
    assert!(want.is_empty());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// The carriers of an INSERT body (`Flight::body`) hold, per (org, project, hour), exactly
    /// what its accepted events bill (`Staged::billed`): summed additive meters, distinct unique
    /// pairs; before and after rows are dropped for a retry (the carriers are recomputed from
    /// the rows that remain).
    #[test]
    fn carriers_sum_what_their_groups_bill(
        events in proptest::collection::vec((0usize..8, 0i64..3, 0u8..3, 0u64..1u64 << 53, 0u32..4), 1..60),
        keep in proptest::collection::vec(proptest::bool::ANY, 60),
    ) {
        let mut f = fx("carriers");
        // Two credentials per tenant (a JWT and an API key): one group all the same.
        let auths: Vec<String> = f.keys.tenants.iter()
            .flat_map(|t| [bearer(&f.keys.sign_eddsa(&f.keys.claims(t, NOW, 3600))), basic(t)]).collect();
        let values: Vec<String> = events.iter().enumerate().map(|(i, (_, h, ty, v, user))| {
            let ty = ["generation-create", "trace-create", "score-create"][*ty as usize];
            ev(&format!("e{i}"), ty, NOW - h * 3600, &format!(r#"{{"userId":"u{user}","usage":{{"input":{v},"output":{}}}}}"#, v / 3))
        }).collect();
        let msgs: Vec<InMessage> = events.iter().zip(&values).enumerate()
            .map(|(i, ((t, ..), v))| message(0, i as i64, v, &auths[*t % auths.len()])).collect();
        let mut staged = f.p.stage(&msgs, &mut f.states, NOW).unwrap();
        staged.resolve(&HashSet::new());
        let billed = staged.billed(&f.p.meters, &msgs);
        proptest::prop_assert_eq!(billed.len(), events.len());
        let expected: Vec<_> = billed.iter().map(|b| {
            let t = &f.keys.tenants[events[b.msg].0 % auths.len() / 2];
            let hour = (NOW - events[b.msg].1 * 3600) as u32;
            let own = |v: &[(&str, u64)]| v.iter().map(|(m, x)| (m.to_string(), *x)).collect::<Vec<_>>();
            ((t.org_id.clone(), t.project_id.clone(), hour - hour % 3600), own(&b.additive), own(&b.unique))
        }).collect();
        let mut flight = staged.flight(&f.p.meters, "t", NOW);
        check_carriers(&flight, &expected);
        // A retry sends what did not land: the carriers are those of the remaining rows.
        let mut i = 0;
        flight.retain(|_, _| { i += 1; keep[i - 1] });
        let kept: Vec<_> = expected.into_iter().zip(&keep).filter(|(_, k)| **k).map(|(e, _)| e).collect();
        check_carriers(&flight, &kept);
    }
}
