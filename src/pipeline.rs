//! The pure step between source and sink: messages in, RowBinary rows and rejections out.
//!
//! `stage` decodes, verifies, validates, meters and deduplicates in memory; the events it cannot
//! decide on are listed by `unknown_keys` for one batched ClickHouse look-up, whose answer goes to
//! `resolve`; `encode` then writes the rows of the new events. No I/O happens here.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use crate::decode::scan::{scan_message, Fallback};
use crate::decode::{
    self, decode_event_with, decode_message_captured, decode_message_with, Captured, Malformed, Message, SLOT_ID,
    SLOT_TIMESTAMP, SLOT_TYPE,
};
use crate::dedupe::{EventKey, KeySet, PartitionState, Verdict};
use crate::meter::{Contribution, Meters};
use crate::reject::Reason;
use crate::sink::flight::{Capacity, Flight, RowMeta};
use crate::sink::rowbinary::RowWriter;
use crate::timestamp::{parse_rfc3339_with, HourCache};
use crate::verify::{Credential, Principal, Verifier};
use serde_json::value::RawValue;

/// Most events a `{"batch": [...]}` message may hold (§1).
pub const MAX_BATCH_EVENTS: usize = 1000;
/// Events deduplicated per block ([`Staged::deduplicate`]): their cache lines (a few per event)
/// fit in the CPU's first two cache levels between the two passes over the block.
const DEDUPE_BLOCK: usize = 128;
/// Longest event id, in bytes (§1).
pub const MAX_ID_BYTES: usize = 128;
/// Latest event time a row can hold: ClickHouse `DateTime` is UInt32 seconds (2106-02-07).
pub const MAX_EVENT_TIME: i64 = u32::MAX as i64 - 3600;

/// A Kafka message as the pipeline sees it (borrowed from the consumer's buffers).
#[derive(Debug, Clone, Copy)]
pub struct InMessage<'a> {
    pub partition: i32,
    pub offset: i64,
    /// The message timestamp (Unix seconds). Credential expiry and event-time limits are judged
    /// against it, so that a redelivery decides exactly as the first delivery did.
    pub timestamp_secs: Option<i64>,
    pub value: Option<&'a [u8]>,
    /// The message's `authorization` header(s), see [`Credential::from_headers`].
    pub authorization: Credential<'a>,
}

/// Limits of §3.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_future_secs: i64,
    pub window_secs: i64,
}

/// One dead-letter record to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Index of the message in the staged slice.
    pub msg: usize,
    /// Position in `{"batch": [...]}`, for a single bad event of a batch.
    pub batch_index: Option<u32>,
    pub reason: Reason,
    /// Byte range of the bad event inside the message value (batch events only).
    pub span: Option<Range<usize>>,
}

struct StagedEvent<'a> {
    partition: i32,
    offset: i64,
    principal: u32,
    batch_index: i32,
    id: Cow<'a, str>,
    ty: Cow<'a, str>,
    ts: i64,
    key: EventKey,
    additive: Range<u32>,
    unique: Range<u32>,
    verdict: Verdict,
}

/// The outcome of [`Processor::stage`].
#[derive(Default)]
pub struct Staged<'a> {
    events: Vec<StagedEvent<'a>>,
    principals: Vec<Principal>,
    additive: Vec<(u16, u64)>,
    unique: Vec<(u16, u64)>,
    pub rejections: Vec<Rejection>,
    /// Duplicates found so far (in memory, then by [`Staged::resolve`]).
    pub duplicates: u64,
    /// The date and hour of the last event timestamp read.
    hours: HourCache,
}

/// Holds what staging needs besides the messages.
pub struct Processor {
    pub meters: Meters,
    pub verifier: Verifier,
    pub limits: Limits,
    /// The last staged batch's counts, to size the next one's buffers.
    pub hint: StageHint,
}

/// Fewer bytes than any staged event takes in a message (`{"id":"x","type":"t","timestamp":`
/// and an RFC 3339 time are 56): a batch of `b` bytes holds at most `b / 32` events. It caps
/// the estimates of [`StageHint::scaled`] only; a vector grows past it if it must.
const MIN_EVENT_BYTES: usize = 32;

/// How many events, additive entries and unique entries the last staged batch held, and for how
/// many messages. A batch's buffers are sized from it up front: growing them by doubling copied
/// each buffer and touched fresh pages every batch (perf of a worker's first pass, 2026-12-01:
/// ~5 % of its samples in `realloc`'s copies and the kernel's page zeroing under `stage`).
#[derive(Debug, Clone, Copy, Default)]
pub struct StageHint {
    pub messages: usize,
    pub events: usize,
    pub additive: usize,
    pub unique: usize,
}

impl StageHint {
    /// `n` scaled from the last batch's `messages` to `messages`, plus 1/8 for the variation
    /// between batches; never more than twice `n` (a batch of many messages after one of a few
    /// huge ones must not ask for much more than the last batch held), nor more than `bytes`
    /// (this batch's message values) could hold at [`MIN_EVENT_BYTES`] each (a batch of sparse
    /// messages after one of dense ones); 0 before the first batch.
    fn scaled(&self, n: usize, messages: usize, bytes: usize) -> usize {
        if self.messages == 0 {
            return 0;
        }
        let per = n as f64 / self.messages as f64;
        ((per * messages as f64 * 1.125) as usize).min(n.saturating_mul(2)).min(bytes / MIN_EVENT_BYTES)
    }

    /// Records `staged`'s counts for `messages` messages; an empty batch keeps the last hint.
    fn record(&mut self, messages: usize, staged: &Staged<'_>) {
        if messages > 0 {
            *self = StageHint {
                messages,
                events: staged.events.len(),
                additive: staged.additive.len(),
                unique: staged.unique.len(),
            };
        }
    }
}

/// A message names a partition whose dedupe state was not loaded.
#[derive(Debug, thiserror::Error)]
#[error("no dedupe state for partition {0}")]
pub struct MissingState(pub i32);

impl Processor {
    /// Stages `msgs`; `now` (Unix seconds) stands in for messages without a timestamp.
    ///
    /// Every message ends up either with rows or duplicates in the result, or with rejections
    /// naming a reason (never neither): a `{"batch": [...]}` message is billed event by event.
    pub fn stage<'a>(
        &mut self,
        msgs: &[InMessage<'a>],
        states: &mut HashMap<i32, PartitionState>,
        now: i64,
    ) -> Result<Staged<'a>, MissingState> {
        // Sized up front, from the last batch's proportions (at least one event per message):
        // growing these while staging cost page faults and copies (benches/pipeline.rs).
        let (h, n) = (self.hint, msgs.len());
        let bytes: usize = msgs.iter().map(|m| m.value.map_or(0, <[u8]>::len)).sum();
        let mut out = Staged {
            events: Vec::with_capacity(h.scaled(h.events, n, bytes).max(n)),
            principals: Vec::with_capacity(n),
            additive: Vec::with_capacity(h.scaled(h.additive, n, bytes)),
            unique: Vec::with_capacity(h.scaled(h.unique, n, bytes)),
            ..Staged::default()
        };
        let mut caps: Vec<Captured<'a>> = vec![Captured::Missing; self.meters.tree().slots()];
        let mut seen = Vec::new();
        let mut keys = Vec::new();
        let mut batch_caps: Vec<Captured<'a>> = Vec::new();
        let mut contribution = Contribution::default();
        let mut known: Option<i32> = None;
        for (i, m) in msgs.iter().enumerate() {
            let at = m.timestamp_secs.unwrap_or(now);
            let Some(value) = m.value else {
                out.reject(i, Reason::Malformed);
                continue;
            };
            if value.len() > self.limits.max_message_bytes {
                out.reject(i, Reason::TooLarge);
                continue;
            }
            let principal = match self.verifier.verify(m.authorization, at) {
                Ok(p) => p,
                Err(reason) => {
                    out.reject(i, reason);
                    continue;
                }
            };
            // Consecutive messages are mostly of one partition: the map is asked once per run.
            if known != Some(m.partition) {
                if !states.contains_key(&m.partition) {
                    return Err(MissingState(m.partition));
                }
                known = Some(m.partition);
            }
            let p = out.push_principal(principal);
            let msg = MsgCtx { index: i, m, principal: p, at };
            caps.fill(Captured::Missing);
            // One pass over the value; a batch's events are walked in place. Anything it cannot
            // take as it is (a malformed value or event, an escape to repair, a batch too large)
            // is read again the two-pass way below, which judges it event by event.
            let tree = self.meters.tree();
            // The scanner reads what producers send; what it does not answer for is read by
            // serde (below), which decides.
            match scan_message(value, tree, &mut caps, &mut keys, &mut batch_caps, MAX_BATCH_EVENTS) {
                Ok(Message::Captured(n)) => {
                    self.stage_captured_batch(&mut out, value, &batch_caps, n, &mut contribution, msg);
                    continue;
                }
                Ok(Message::Single) => {
                    let single = Ok(Message::Single);
                    self.stage_value(&mut out, value, single, &mut caps, &mut seen, &mut contribution, msg, Cow::clone);
                    continue;
                }
                Ok(Message::Batch(_)) | Err(Fallback) => caps.fill(Captured::Missing),
            }
            let decoded = decode_message_captured(value, tree, &mut caps, &mut seen, &mut batch_caps, MAX_BATCH_EVENTS);
            if let Ok(Message::Captured(n)) = decoded {
                self.stage_captured_batch(&mut out, value, &batch_caps, n, &mut contribution, msg);
                continue;
            }
            let decoded = match decoded {
                Ok(single) => Ok(single),
                Err(_) => {
                    caps.fill(Captured::Missing);
                    decode_message_with(value, tree, &mut caps, &mut seen)
                }
            };
            // A value the parser refused may hold an unpaired surrogate escape where it reads a
            // key (strings it reads as values are repaired where they are read, strings it skips
            // are not checked): then it is decoded again from a copy with them replaced by U+FFFD,
            // of the same length (spans stay valid for the original); what is kept of it is owned.
            // Nearly every message takes the first path, its strings borrowed from the consumer.
            let fixed = if decoded.is_err() { decode::surrogates::repair(value) } else { None };
            match fixed {
                None => {
                    self.stage_value(&mut out, value, decoded, &mut caps, &mut seen, &mut contribution, msg, Cow::clone)
                }
                Some(fixed) => {
                    let mut fixed_caps = vec![Captured::Missing; caps.len()];
                    let mut fixed_seen = Vec::new();
                    let decoded = decode_message_with(&fixed, self.meters.tree(), &mut fixed_caps, &mut fixed_seen);
                    let own = |s: &Cow<'_, str>| Cow::Owned(s.to_string());
                    let scratch = (&mut fixed_caps, &mut fixed_seen);
                    self.stage_value(&mut out, &fixed, decoded, scratch.0, scratch.1, &mut contribution, msg, own);
                }
            }
        }
        out.deduplicate(states);
        self.hint.record(msgs.len(), &out);
        Ok(out)
    }

    /// Stages one decoded message value (a single event or a batch). `own` turns a captured
    /// string into one that lives as long as the staged batch.
    #[allow(clippy::too_many_arguments)]
    fn stage_value<'a, 'v>(
        &self,
        out: &mut Staged<'a>,
        value: &'v [u8],
        decoded: Result<Message<'v>, Malformed>,
        caps: &mut [Captured<'v>],
        seen: &mut Vec<Cow<'v, str>>,
        contribution: &mut Contribution,
        msg: MsgCtx<'_, 'a>,
        own: impl Fn(&Cow<'v, str>) -> Cow<'a, str>,
    ) {
        match decoded {
            Err(_) => out.reject(msg.index, Reason::Malformed),
            Ok(Message::Batch(events)) if events.len() > MAX_BATCH_EVENTS => out.reject(msg.index, Reason::TooLarge),
            // Only `decode_message_captured` returns it, and `stage` stages it itself.
            Ok(Message::Captured(_)) => unreachable!("a one-pass batch is staged by stage_captured_batch"),
            Ok(Message::Single) => {
                let ev = EventCtx { m: msg.m, principal: msg.principal, batch_index: -1, at: msg.at };
                if let Err(reason) = self.stage_event(out, caps, contribution, ev, &own) {
                    out.reject(msg.index, reason);
                }
            }
            Ok(Message::Batch(events)) => {
                for (j, raw) in events.iter().enumerate() {
                    caps.fill(Captured::Missing);
                    let ev = EventCtx { m: msg.m, principal: msg.principal, batch_index: j as i32, at: msg.at };
                    let result = match decode_event_with(raw, self.meters.tree(), caps, seen) {
                        Ok(()) => self.stage_event(out, caps, contribution, ev, &own),
                        // As for a whole value: an unpaired surrogate in a key the parser read.
                        Err(_) => match decode::surrogates::repair(raw.get().as_bytes()) {
                            None => Err(Reason::Malformed),
                            Some(fixed) => self.stage_repaired_event(out, &fixed, caps.len(), contribution, ev),
                        },
                    };
                    if let Err(reason) = result {
                        let start = raw.get().as_ptr() as usize - value.as_ptr() as usize;
                        out.rejections.push(Rejection {
                            msg: msg.index,
                            batch_index: Some(j as u32),
                            reason,
                            span: Some(start..start + raw.get().len()),
                        });
                    }
                }
            }
        }
    }

    /// Stages the `n` events of a batch read in one pass ([`decode_message_captured`]; their
    /// captures in `events`, one slot array each). An event refused here is dead-lettered with
    /// its own text: the spans of those events come from reading the value's batch as raw events,
    /// which only messages with a refused event pay for.
    #[allow(clippy::too_many_arguments)]
    fn stage_captured_batch<'a>(
        &self,
        out: &mut Staged<'a>,
        value: &'a [u8],
        events: &[Captured<'a>],
        n: usize,
        contribution: &mut Contribution,
        msg: MsgCtx<'_, 'a>,
    ) {
        let first = out.rejections.len();
        for (j, caps) in events.chunks_exact(events.len() / n).enumerate() {
            let ev = EventCtx { m: msg.m, principal: msg.principal, batch_index: j as i32, at: msg.at };
            if let Err(reason) = self.stage_event(out, caps, contribution, ev, &Cow::clone) {
                out.rejections.push(Rejection { msg: msg.index, batch_index: Some(j as u32), reason, span: None });
            }
        }
        if out.rejections.len() == first {
            return;
        }
        let mut scratch = vec![Captured::Missing; self.meters.tree().slots()];
        let raws = match decode_message_with(value, self.meters.tree(), &mut scratch, &mut Vec::new()) {
            Ok(Message::Batch(raws)) if raws.len() == n => raws,
            // Cannot happen (the one pass accepts a subset of what the two passes accept); if it
            // did, the dead-letter records would carry the whole message, still with the index.
            _ => {
                debug_assert!(false, "a value read in one pass as a batch reads as the same batch in two");
                return;
            }
        };
        for r in &mut out.rejections[first..] {
            let raw = raws[r.batch_index.expect("an event's rejection") as usize].get();
            let start = raw.as_ptr() as usize - value.as_ptr() as usize;
            r.span = Some(start..start + raw.len());
        }
    }

    /// Stages one batch event from a repaired copy of its text (strings kept are owned).
    fn stage_repaired_event<'a>(
        &self,
        out: &mut Staged<'a>,
        fixed: &[u8],
        slots: usize,
        contribution: &mut Contribution,
        ev: EventCtx<'_, 'a>,
    ) -> Result<(), Reason> {
        let text = std::str::from_utf8(fixed).map_err(|_| Reason::Malformed)?;
        let raw: &RawValue = serde_json::from_str(text).map_err(|_| Reason::Malformed)?;
        let mut caps = vec![Captured::Missing; slots];
        decode_event_with(raw, self.meters.tree(), &mut caps, &mut Vec::new()).map_err(|_| Reason::Malformed)?;
        self.stage_event(out, &caps, contribution, ev, &|s: &Cow<'_, str>| Cow::Owned(s.to_string()))
    }

    fn stage_event<'a, 'v>(
        &self,
        out: &mut Staged<'a>,
        caps: &[Captured<'v>],
        contribution: &mut Contribution,
        ev: EventCtx<'_, 'a>,
        own: &impl Fn(&Cow<'v, str>) -> Cow<'a, str>,
    ) -> Result<(), Reason> {
        let (Captured::Str(id), Captured::Str(ty), Captured::Str(ts)) =
            (&caps[SLOT_ID], &caps[SLOT_TYPE], &caps[SLOT_TIMESTAMP])
        else {
            return Err(Reason::Malformed);
        };
        if id.is_empty() || id.len() > MAX_ID_BYTES || ty.is_empty() {
            return Err(Reason::Malformed);
        }
        let ts = parse_rfc3339_with(ts, &mut out.hours).ok_or(Reason::Malformed)?;
        contribution.clear();
        self.meters.apply(ty, caps, contribution).map_err(|_| Reason::Malformed)?;
        // `at` is the producer's message timestamp: any i64. The rows store ClickHouse
        // `DateTime` (UInt32 seconds), so event times outside it are refused, never clamped.
        if ts < ev.at.saturating_sub(self.limits.window_secs) || ts < 0 {
            return Err(Reason::TooOld);
        }
        if ts > ev.at.saturating_add(self.limits.max_future_secs) || ts > MAX_EVENT_TIME {
            return Err(Reason::FutureTimestamp);
        }
        let principal = &out.principals[ev.principal as usize];
        let key = EventKey::new(&principal.org_id, &principal.project_id, id);
        let a0 = out.additive.len() as u32;
        out.additive.extend_from_slice(&contribution.additive);
        let u0 = out.unique.len() as u32;
        out.unique.extend_from_slice(&contribution.unique);
        out.events.push(StagedEvent {
            partition: ev.m.partition,
            offset: ev.m.offset,
            principal: ev.principal,
            batch_index: ev.batch_index,
            id: own(id),
            ty: own(ty),
            ts,
            key,
            additive: a0..out.additive.len() as u32,
            unique: u0..out.unique.len() as u32,
            // Decided by `Staged::deduplicate` before `stage` returns.
            verdict: Verdict::Unknown,
        });
        Ok(())
    }
}

/// One accepted event's contribution, see [`Staged::billed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Billed<'m> {
    pub id: String,
    pub msg: usize,
    pub additive: Vec<(&'m str, u64)>,
    pub unique: Vec<(&'m str, u64)>,
}

/// Which message is being staged.
#[derive(Clone, Copy)]
struct MsgCtx<'m, 'a> {
    index: usize,
    m: &'m InMessage<'a>,
    principal: u32,
    at: i64,
}

/// Where an event comes from.
#[derive(Clone, Copy)]
struct EventCtx<'m, 'a> {
    m: &'m InMessage<'a>,
    principal: u32,
    batch_index: i32,
    at: i64,
}

impl<'a> Staged<'a> {
    fn reject(&mut self, msg: usize, reason: Reason) {
        self.rejections.push(Rejection { msg, batch_index: None, reason, span: None });
    }

    /// Decides every staged event against the partitions' dedupe states, in staging order
    /// (each decision sees the keys remembered before it, as if it were made while staging).
    ///
    /// Done apart from staging, in two passes over each block of [`DEDUPE_BLOCK`] events, for
    /// speed: the state's Bloom filter and recent keys are far larger than the CPU caches, and
    /// one event's staging is thousands of instructions, so inline look-ups miss the cache one
    /// after the other. The first pass only reads the cache lines each check will read
    /// ([`PartitionState::touch`], and the batch's key set), in a short loop without dependencies
    /// whose misses the CPU overlaps; the second finds those lines cached. Blocks, not the whole
    /// batch: a batch's lines (tens of megabytes) would be evicted before the second pass read
    /// them (docs/measurements.md, "The core" and "The dedupe state's cache lines").
    fn deduplicate(&mut self, states: &mut HashMap<i32, PartitionState>) {
        // Keys accepted in this batch: exact, whatever the bound of the partition's recent set, so
        // two copies in one batch are never both sent (the store cannot know about either yet).
        let mut batch_keys = KeySet::with_capacity_and_hasher(self.events.len(), Default::default());
        for block in self.events.chunks_mut(DEDUPE_BLOCK) {
            let mut warm = 0u64;
            let mut last: Option<(i32, &PartitionState)> = None;
            for e in block.iter() {
                let state = match last {
                    Some((p, s)) if p == e.partition => s,
                    _ => {
                        let s = &states[&e.partition];
                        last = Some((e.partition, s));
                        s
                    }
                };
                warm ^= state.touch(e.key) ^ u64::from(batch_keys.contains(&e.key));
            }
            std::hint::black_box(warm);
            let mut last: Option<(i32, &mut PartitionState)> = None;
            for e in block.iter_mut() {
                if last.as_ref().is_none_or(|(p, _)| *p != e.partition) {
                    last = Some((e.partition, states.get_mut(&e.partition).expect("checked while staging")));
                }
                let state = &mut last.as_mut().expect("set above").1;
                let verdict = if batch_keys.contains(&e.key) { Verdict::Duplicate } else { state.check(e.key, e.ts) };
                e.verdict = verdict;
                if verdict == Verdict::Duplicate {
                    self.duplicates += 1;
                } else {
                    state.remember(e.key);
                    batch_keys.insert(e.key);
                }
            }
        }
    }

    fn push_principal(&mut self, p: Principal) -> u32 {
        self.principals.push(p);
        (self.principals.len() - 1) as u32
    }

    /// Keys the in-memory state could not decide on: look them up in ClickHouse.
    pub fn unknown_keys(&self) -> Vec<(&str, &str, &str)> {
        self.keys_with(Verdict::Unknown)
    }

    fn keys_with(&self, verdict: Verdict) -> Vec<(&str, &str, &str)> {
        self.events
            .iter()
            .filter(|e| e.verdict == verdict)
            .map(|e| {
                let p = &self.principals[e.principal as usize];
                (&*p.org_id, &*p.project_id, &*e.id)
            })
            .collect()
    }

    /// Applies the look-up: the unknown events found in storage are duplicates.
    pub fn resolve(&mut self, found: &HashSet<EventKey>) {
        for e in &mut self.events {
            if e.verdict == Verdict::Unknown {
                if found.contains(&e.key) {
                    e.verdict = Verdict::Duplicate;
                    self.duplicates += 1;
                } else {
                    e.verdict = Verdict::New;
                }
            }
        }
    }

    /// Keys of the rows still to insert (after [`Staged::resolve`]).
    pub fn pending_keys(&self) -> Vec<(&str, &str, &str)> {
        self.keys_with(Verdict::New)
    }

    /// After a failed insert: rows found in storage did land; they are not sent again (and are
    /// not duplicates). Returns how many.
    pub fn mark_written(&mut self, found: &HashSet<EventKey>) -> usize {
        let mut n = 0;
        for e in &mut self.events {
            if e.verdict == Verdict::New && found.contains(&e.key) {
                e.verdict = Verdict::Duplicate;
                n += 1;
            }
        }
        n
    }

    /// Drops the events of partitions for which `owned` is false (their new owner redoes them).
    pub fn retain_partitions(&mut self, owned: impl Fn(i32) -> bool) {
        self.events.retain(|e| owned(e.partition));
    }

    /// The duplicates per source partition: the events whose verdict is "duplicate" (in memory
    /// or by [`Staged::resolve`]), so that a worker counts only those of partitions it still owns.
    pub fn duplicates_by_partition(&self) -> BTreeMap<i32, u64> {
        let mut out = BTreeMap::new();
        for e in self.events.iter().filter(|e| e.verdict == Verdict::Duplicate) {
            *out.entry(e.partition).or_insert(0) += 1;
        }
        out
    }

    /// Events that will be inserted (new, or not yet resolved).
    pub fn accepted(&self) -> usize {
        self.events.iter().filter(|e| e.verdict != Verdict::Duplicate).count()
    }

    /// What the accepted events bill, per event in staging order: (event id, message index in
    /// the staged slice, additive (meter, value) pairs, unique (meter, hash) pairs). For tests,
    /// fuzz targets and tools; the hot path writes rows with [`Staged::flight`].
    pub fn billed<'m>(&self, meters: &'m Meters, msgs: &[InMessage<'_>]) -> Vec<Billed<'m>> {
        self.events
            .iter()
            .filter(|e| e.verdict != Verdict::Duplicate)
            .map(|e| Billed {
                id: e.id.to_string(),
                msg: msgs.iter().position(|m| m.partition == e.partition && m.offset == e.offset).unwrap_or(usize::MAX),
                additive: self.additive[e.additive.start as usize..e.additive.end as usize]
                    .iter()
                    .map(|(m, v)| (meters.name(*m), *v))
                    .collect(),
                unique: self.unique[e.unique.start as usize..e.unique.end as usize]
                    .iter()
                    .map(|(m, h)| (meters.name(*m), *h))
                    .collect(),
            })
            .collect()
    }

    /// The rows of the accepted events as an owned [`Flight`]: per row its bytes, partition, and
    /// what it bills for its group's carrier (grouped by (org, project, hour)).
    pub fn flight(&self, meters: &Meters, topic: &str, ingested_at: i64) -> Flight {
        let names = meters.meters().iter().map(|m| m.name.clone()).collect();
        // The rows' size, near enough: their strings, meter entries and fixed-width columns.
        let mut capacity = Capacity::default();
        for e in self.events.iter().filter(|e| e.verdict != Verdict::Duplicate) {
            let p = &self.principals[e.principal as usize];
            let (additive, unique) = (e.additive.len(), e.unique.len());
            capacity.bytes += p.org_id.len()
                + p.project_id.len()
                + e.id.len()
                + e.ty.len()
                + topic.len()
                + (additive + unique) * 24
                + 64;
            capacity.rows += 1;
            capacity.additive += additive;
            capacity.unique += unique;
        }
        Flight::encode(names, capacity, |w, row| {
            self.encode_rows(w, meters, topic, ingested_at, row);
        })
    }

    /// Writes the rows of the accepted events in the [`crate::sink::EVENTS_COLUMNS`] layout,
    /// calling `row(w, meta)` after each row.
    fn encode_rows(
        &self,
        w: &mut RowWriter,
        meters: &Meters,
        topic: &str,
        ingested_at: i64,
        row: &mut dyn FnMut(&mut RowWriter, RowMeta<'_>),
    ) {
        // One number per (org, project): the carriers' groups are (tenant, hour). Consecutive
        // messages of one credential share their `Arc`s, and skip the look-up. The ids are those
        // of verified principals, a few per batch: foldhash, randomly seeded, is enough for them
        // (SipHash here was ~3 % of the core's instructions on single-event messages: callgrind,
        // benches/pipeline.rs).
        let mut tenants: HashMap<(&str, &str), u32, foldhash::fast::RandomState> = HashMap::default();
        let mut tenant_of: Vec<u32> = Vec::with_capacity(self.principals.len());
        for (i, p) in self.principals.iter().enumerate() {
            let same = i > 0 && {
                let q = &self.principals[i - 1];
                Arc::ptr_eq(&p.org_id, &q.org_id) && Arc::ptr_eq(&p.project_id, &q.project_id)
            };
            let t = if same {
                tenant_of[i - 1]
            } else {
                let n = tenants.len() as u32;
                *tenants.entry((&p.org_id, &p.project_id)).or_insert(n)
            };
            tenant_of.push(t);
        }
        for e in self.events.iter().filter(|e| e.verdict != Verdict::Duplicate) {
            let p = &self.principals[e.principal as usize];
            w.string(&p.org_id);
            w.string(&p.project_id);
            w.string(&e.id);
            w.string(&e.ty);
            w.datetime(e.ts);
            // The hour as written (clamped), so that rows of one group hold one hour.
            let hour = w.datetime(e.ts - e.ts.rem_euclid(3600));
            w.u64(e.key.short());
            let add = &self.additive[e.additive.start as usize..e.additive.end as usize];
            w.varint(add.len() as u64);
            for (m, _) in add {
                w.string(meters.name(*m));
            }
            w.varint(add.len() as u64);
            for (_, v) in add {
                w.u64(*v);
            }
            let uniq = &self.unique[e.unique.start as usize..e.unique.end as usize];
            w.varint(uniq.len() as u64);
            for (m, _) in uniq {
                w.string(meters.name(*m));
            }
            w.varint(uniq.len() as u64);
            for (_, h) in uniq {
                w.u64(*h);
            }
            w.string(topic);
            w.u32(e.partition as u32);
            w.u64(e.offset as u64);
            w.i32(e.batch_index);
            w.datetime(ingested_at);
            let group = u64::from(tenant_of[e.principal as usize]) << 32 | u64::from(hour);
            row(w, RowMeta { partition: e.partition, group, additive: add, unique: uniq });
        }
    }
}

#[cfg(test)]
mod tests;
