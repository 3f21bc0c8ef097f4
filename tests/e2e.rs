//! End to end on the real services: tansu (Kafka protocol) and ClickHouse 18.16.
//! Requires `scripts/start.sh` (the test command `scripts/test.sh` runs it).

mod common;

use std::time::{Duration, Instant};

use common::{sigkill, stop, World};
use rand::Rng;

/// ≥ 100,000 events over 60 projects, ≥ 5 % duplicates and every rejection reason, consumed by
/// two concurrent workers: `usage_hourly` equals the expectation for every (org, project, meter,
/// hour), and the dead-letter topic holds exactly the rejected messages/events with their reasons.
#[test]
fn two_workers_count_exactly() {
    let w = World::new("exact");
    let workers = [w.worker(1), w.worker(2)];
    let t = Instant::now();
    let e = w.generate(&w.gen_config(100_000, 7));
    assert!(e.events >= 100_000);
    assert!(e.duplicates as f64 >= 0.05 * e.events as f64, "duplicates {} of {}", e.duplicates, e.events);
    let reasons: std::collections::BTreeSet<_> = e.rejected.iter().map(|r| r.2.clone()).collect();
    assert_eq!(reasons.len(), 9, "every reason is exercised: {reasons:?}");
    w.wait_caught_up(&e);
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "[measure] {} events ({} messages) produced and ingested by 2 workers in {secs:.1}s = {:.0} events/s (accepted {}, duplicates {}, rejected {})",
        e.events, e.messages, e.events as f64 / secs, e.accepted, e.duplicates, e.rejected_events
    );
    for wk in workers {
        stop(wk);
    }
    w.assert_totals(&e);
    w.assert_dead_letters(&e, true);
}

/// The same run while one worker is SIGKILLed at random moments (≥ 5 times) and restarted, the
/// other keeps running; then the group is reset to the earliest offsets and everything is
/// consumed again: the totals never change.
#[test]
fn crashes_and_replays_change_nothing() {
    let w = World::new("crash");
    let steady = w.worker(1);
    let mut victim = w.worker(2);
    let gen = common::World::gen_config(&w, 100_000, 11);
    let gen = tally::loadgen::GenConfig { rate: 8_000, ..gen };
    let (e, kills) = std::thread::scope(|s| {
        let producer = s.spawn(|| w.generate(&gen));
        let mut rng = rand::thread_rng();
        let mut kills = 0;
        while kills < 5 || !producer.is_finished() {
            std::thread::sleep(Duration::from_millis(rng.gen_range(700..2500)));
            sigkill(&mut victim);
            kills += 1;
            if rng.gen_bool(0.5) {
                std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
            }
            victim = w.worker(2);
        }
        (producer.join().unwrap(), kills)
    });
    w.wait_caught_up(&e);
    eprintln!("[measure] crash run: {kills} SIGKILLs of one of 2 workers, {} events, {} accepted, {} duplicates", e.events, e.accepted, e.duplicates);
    w.assert_totals(&e);
    w.assert_dead_letters(&e, false);
    stop(steady);
    stop(victim);

    // Replay everything from the earliest offset: nothing changes.
    let status = w.cli(&["offsets", "--reset-to-earliest"]).status().unwrap();
    assert!(status.success());
    let committed = tally::admin::committed(&w.kafka).unwrap();
    assert!(committed.values().all(|&o| o == 0), "reset: {committed:?}");
    let again = [w.worker(3), w.worker(4)];
    w.wait_caught_up(&e);
    for wk in again {
        stop(wk);
    }
    w.assert_totals(&e);
    w.assert_dead_letters(&e, false);
    eprintln!("[measure] replay from earliest: totals of {} (org, project, meter, hour) keys unchanged", e.totals.len());
}
