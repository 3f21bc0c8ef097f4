//! The whole pure step (decode, verify from cache, validate, meter, dedupe), on any message
//! value, single or batch: every message is either billed or rejected with a reason, never
//! neither and never both; every event of a batch likewise; nothing billed carries a meter value
//! above 2^53 − 1; staging the same message twice bills it once.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use tally::dedupe::PartitionState;
use tally::devkeys::{basic, DevKeys};
use tally::meter::{Meters, DEFAULT_METERS_TOML};
use tally::pipeline::{InMessage, Limits, Processor};
use tally::verify::{Credential, Verifier};

const NOW: i64 = 1_795_860_000;

fn keys() -> &'static (DevKeys, std::path::PathBuf) {
    static K: OnceLock<(DevKeys, std::path::PathBuf)> = OnceLock::new();
    K.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tally-fuzz-pipeline-{}", std::process::id()));
        let keys = DevKeys::generate(1, 1, "https://issuer.test", "tally-ingest");
        keys.write(&dir).unwrap();
        (keys, dir)
    })
}

/// One processor for the whole run (its credential cache warm, as in a worker).
fn processor() -> &'static Mutex<Processor> {
    static P: OnceLock<Mutex<Processor>> = OnceLock::new();
    P.get_or_init(|| {
        let (keys, dir) = keys();
        Mutex::new(Processor {
            meters: Meters::parse(DEFAULT_METERS_TOML).unwrap(),
            verifier: Verifier::from_config(&keys.auth_config(dir)).unwrap(),
            limits: Limits { max_message_bytes: 1 << 20, max_future_secs: 300, window_secs: 86_400 },
            hint: Default::default(),
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let (keys, _) = keys();
    let mut guard = processor().lock().unwrap_or_else(|e| e.into_inner());
    let p = &mut *guard;
    let auth = basic(&keys.tenants[0]);
    let msg = InMessage {
        partition: 0,
        offset: 7,
        timestamp_secs: Some(NOW),
        value: Some(data),
        authorization: Credential::One(auth.as_bytes()),
    };
    let mut states = HashMap::from([(0, PartitionState::new(4096, 1000, 0))]);
    let msgs = [msg, InMessage { offset: 8, ..msg }];
    let mut staged = p.stage(&msgs, &mut states, NOW).unwrap();
    staged.resolve(&HashSet::new());
    let billed = staged.billed(&p.meters, &msgs);
    for (i, _) in msgs.iter().enumerate() {
        let whole = staged.rejections.iter().filter(|r| r.msg == i && r.batch_index.is_none()).count();
        let events = staged.rejections.iter().filter(|r| r.msg == i && r.batch_index.is_some()).count();
        let billed_here = billed.iter().filter(|b| b.msg == i).count();
        assert!(whole <= 1, "one reason per message");
        if whole == 1 {
            assert_eq!((events, billed_here), (0, 0), "a rejected message bills nothing");
        }
        if i == 0 {
            assert!(whole + events + billed_here > 0, "message neither billed nor rejected");
        } else {
            // The second copy: everything it would bill is a duplicate of the first.
            assert_eq!(billed_here, 0, "a redelivered message billed again");
        }
        // A batch event is rejected at most once.
        let mut seen = HashSet::new();
        for r in staged.rejections.iter().filter(|r| r.msg == i) {
            if let Some(b) = r.batch_index {
                assert!(seen.insert(b), "batch event {b} rejected twice");
                let span = r.span.clone().expect("a batch event's span");
                assert!(span.end <= data.len());
            }
        }
    }
    for b in &billed {
        assert!(b.additive.iter().all(|(_, v)| *v <= tally::decode::number::MAX_METER_VALUE && *v > 0));
        assert!(!b.id.is_empty() && b.id.len() <= tally::pipeline::MAX_ID_BYTES);
    }
    // Either the message bills events, or every event it had was judged. Every billed event is
    // a row of the INSERT body, with its carrier columns (6 bytes at least, as in the flight).
    let flight = staged.flight(&p.meters, "t", NOW);
    assert_eq!(flight.len(), billed.len());
    let whole = flight.body().into_vec();
    assert!(whole.len() >= flight.buf.len());
    assert_eq!(whole.len(), flight.body().len());
    // Read as an HTTP client reads it, in small pieces: the same bytes.
    let (mut body, mut pieces, mut piece) = (flight.body(), Vec::new(), [0u8; 7]);
    loop {
        let n = std::io::Read::read(&mut body, &mut piece).unwrap();
        if n == 0 {
            break;
        }
        pieces.extend_from_slice(&piece[..n]);
    }
    assert_eq!(pieces, whole);
});
