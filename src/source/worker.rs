//! The ingest loop: gather a batch → stage it (pure) → resolve unknown keys in ClickHouse →
//! dead-letter the rejections → insert the rows → commit the offsets. Every dependency call is
//! retried with backoff while the consumer keeps polling (partitions paused), so the group keeps
//! us, rebalances are served, and nothing is committed past data that is not written.
//! docs/exactly-once.md walks through every crash point of this loop.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use metrics::{counter, gauge, histogram};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::gaps::{self, Jump, Positions};
use super::rebalance::{Change, Context, DeadLetterAcks, Unlanded};
use super::start::{self, Start, Unread};
use crate::config::IngestConfig;
use crate::dedupe::PartitionState;
use crate::dlq::{DeadLetters, DlqRecord, Failure};
use crate::metrics as m;
use crate::pipeline::{InMessage, Processor, Rejection, Staged};
use crate::retry::Backoff;
use crate::sink::clickhouse::{ChError, ErrorClass};
use crate::sink::flight::Flight;
use crate::sink::mend::{Mend, Mended, Step};
use crate::sink::{EventStore, InsertFailed};
use crate::verify::Credential;

/// Poll slice: how long one `poll` may block, so shutdown and batch deadlines are noticed.
const POLL_SLICE: Duration = Duration::from_millis(100);
/// How long the start check ([`super::start`]) waits for the broker's committed offsets or log
/// start before it gives up checking.
const START_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a jump whose log start is unknown waits for a fetch that tells it, at most.
const UNCHECKED_GAP_TTL: Duration = Duration::from_secs(300);
/// How often a partition whose committed offset could not be read is asked again before a
/// commit ([`start::Unread`]); its commits are held meanwhile.
const UNREAD_RETRY: Duration = Duration::from_secs(15);
/// How often the worker compares its quiet partitions' positions with the offsets it committed
/// ([`Worker::commit_quiet_positions`]).
const QUIET_POSITIONS_EVERY: Duration = Duration::from_secs(1);
/// Jumps waiting for a log start, at most; more are counted unchecked at once.
const MAX_UNCHECKED_GAPS: usize = 1024;
/// Poll slice while nothing is gathered and the previous batch's INSERT runs: how soon a finished
/// INSERT is landed (committed) when no new messages arrive.
const LANDING_SLICE: Duration = Duration::from_millis(5);
/// A batch also closes at this many value bytes.
const BATCH_MAX_BYTES: usize = 64 << 20;
/// First retry delay of a failing dependency call.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// After SIGTERM, how long an unfinished batch may keep waiting for ClickHouse before the worker
/// exits without committing it (it will be redelivered and deduplicated).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// `tally_stalled` reason: ClickHouse refuses the batch's requests (schema, size, type errors).
pub const STALL_CLICKHOUSE: &str = "clickhouse_rejected";
/// `tally_stalled` reason: the broker refuses a dead-letter record (too large, topic missing).
pub const STALL_DEAD_LETTER: &str = "dead_letter_refused";
/// How long to wait for dead-letter acknowledgements per attempt.
const DLQ_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// The batch was given up (shutdown grace passed); nothing of it was committed.
#[derive(Debug)]
pub struct Abandoned;

type Held<'c> = Vec<(BorrowedMessage<'c>, u64)>;

pub struct Worker<'c, S: EventStore + Clone + Send + 'static> {
    consumer: &'c BaseConsumer<Context>,
    dlq: Arc<DeadLetters>,
    store: S,
    processor: Processor,
    cfg: IngestConfig,
    shutdown: Arc<AtomicBool>,
    shutdown_since: Option<Instant>,
    /// Owned partitions and the epoch of their current assignment.
    owned: HashMap<i32, u64>,
    next_epoch: u64,
    states: HashMap<i32, PartitionState>,
    /// Messages that arrived while waiting on a dependency: the next batch starts with them.
    stash: Held<'c>,
    /// Partitions whose batch cannot go through because of an error retrying does not fix, and
    /// why (`tally_stalled{partition,reason}` is 1 for them).
    stalled: BTreeMap<i32, &'static str>,
    /// Per partition assigned and not read from yet: the group's committed offset at the
    /// assignment (negative: none), checked against the first record read ([`super::start`]).
    starts: HashMap<i32, i64>,
    /// Assigned partitions whose committed offset could not be read at the assignment: checked
    /// before their first commit, which is held until then ([`Unread`]).
    unread: Unread,
    /// Offsets written and not committed because their partition's start is unread: (epoch,
    /// next offset) per partition, committed once the start is checked or given up (at a later
    /// land, or by [`Self::housekeeping`] when no batch of the partition comes).
    held_offsets: BTreeMap<i32, (u64, i64)>,
    /// The next offset expected per held partition ([`super::gaps`]).
    positions: Positions,
    /// The topic's name for librdkafka's C API (its cached watermarks).
    topic_c: std::ffi::CString,
    /// Jumps forward whose log start was unknown when they were read (librdkafka's latest fetch
    /// of the partition failed): (partition, from, to, read at), checked again at each poll
    /// until [`UNCHECKED_GAP_TTL`]. Kept across revocations: the log start is the log's.
    unchecked: Vec<(i32, i64, i64, Instant)>,
    /// When [`Self::commit_quiet_positions`] last ran.
    quiet_checked: Instant,
    /// Per owned partition, the offset this worker last committed (or the group's committed
    /// offset read at the assignment): a quiet partition's position beyond it is committed
    /// ([`Self::commit_quiet_positions`]), so a failed commit is made good too.
    committed: HashMap<i32, i64>,
}

impl<'c, S: EventStore + Clone + Send + 'static> Worker<'c, S> {
    pub fn new(
        consumer: &'c BaseConsumer<Context>,
        dlq: Arc<DeadLetters>,
        store: S,
        processor: Processor,
        cfg: IngestConfig,
        shutdown: Arc<AtomicBool>,
    ) -> Self {
        // A topic name holds no NUL (Kafka allows [a-zA-Z0-9._-]).
        let topic_c = std::ffi::CString::new(cfg.kafka.topic.clone()).unwrap_or_default();
        Worker {
            consumer,
            dlq,
            store,
            processor,
            cfg,
            shutdown,
            shutdown_since: None,
            owned: HashMap::new(),
            next_epoch: 1,
            states: HashMap::new(),
            stash: Vec::new(),
            stalled: BTreeMap::new(),
            starts: HashMap::new(),
            unread: Unread::default(),
            held_offsets: BTreeMap::new(),
            positions: Positions::default(),
            topic_c,
            unchecked: Vec::new(),
            quiet_checked: Instant::now(),
            committed: HashMap::new(),
        }
    }

    /// A ClickHouse call failed for a batch of `partitions`: counted by class; an error no retry
    /// can fix (by exception code, [`ChError::class`]) stalls the partitions visibly — metric
    /// and an error log with the cause — while the batch keeps being retried (never skipped,
    /// never committed past) until someone fixes the cause.
    fn clickhouse_failed(&mut self, op: &'static str, e: &ChError, partitions: &[i32], delay: Duration) {
        let class = match e.class() {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        };
        counter!(m::CH_ERRORS, "op" => op, "class" => class).increment(1);
        let retry_ms = delay.as_millis() as u64;
        if e.class() == ErrorClass::Transient {
            warn!(op, error = %e, retry_ms, "clickhouse request failed; retrying");
            return;
        }
        self.stall(partitions, STALL_CLICKHOUSE);
        error!(
            op,
            ?partitions,
            code = e.code(),
            error = %e,
            retry_ms,
            "partition stalled: ClickHouse refuses the request and retrying will not help until the cause is fixed \
             (see README, Troubleshooting); nothing is skipped or committed past it"
        );
    }

    fn stall(&mut self, partitions: &[i32], reason: &'static str) {
        for &p in partitions {
            match self.stalled.insert(p, reason) {
                Some(old) if old == reason => {}
                old => {
                    if let Some(old) = old {
                        m::stalled(p, old, false); // one reason at a time per partition
                    }
                    m::stalled(p, reason, true);
                }
            }
        }
    }

    /// The partitions of a batch this worker still owns (only those can be stalled by it).
    fn owned_of(&self, epochs: &BTreeMap<i32, u64>) -> Vec<i32> {
        epochs.iter().filter(|(p, e)| self.owns(**p, **e)).map(|(p, _)| *p).collect()
    }

    /// The batch of `partitions` went through: whatever stalled them is fixed.
    fn unstall(&mut self, partitions: impl IntoIterator<Item = i32>) {
        for p in partitions {
            if let Some(reason) = self.stalled.remove(&p) {
                m::stalled(p, reason, false);
                info!(partition = p, reason, "partition resumed");
            }
        }
    }

    fn stopping(&mut self) -> bool {
        let s = self.shutdown.load(Ordering::Relaxed);
        if s && self.shutdown_since.is_none() {
            self.shutdown_since = Some(Instant::now());
            info!("shutdown requested: finishing the current batch");
        }
        s
    }

    /// Runs until SIGTERM/SIGINT; returns after the last batch is written and committed.
    ///
    /// Two batches are open at a time: batch N's rows are inserted on a writer thread while
    /// batch N+1 is gathered and staged; then N is landed (retried if it failed, committed) and
    /// only then is N+1 resolved against ClickHouse and sent.
    pub fn run(&mut self) -> anyhow::Result<()> {
        let mut flight: Option<Sent<'c>> = None;
        loop {
            let mut held = std::mem::take(&mut self.stash);
            if self.gather(&mut held, flight.as_ref()) {
                // Shutdown: finish the batch in flight (write, commit) and start nothing new;
                // what was gathered or stashed since is not committed and will be redelivered.
                drop(held);
                if let Some(f) = flight.take() {
                    if self.land(f).is_err() {
                        warn!("batch abandoned at shutdown; it will be redelivered");
                    }
                }
                break;
            }
            if self.cycle(held, &mut flight).is_err() {
                warn!("batch abandoned at shutdown; it will be redelivered");
                break;
            }
        }
        if let Some(f) = flight {
            let _ = f.writer.join();
        }
        info!("stopped: last batch committed");
        Ok(())
    }

    /// Stages `held` (while the previous batch's INSERT is in flight), lands the previous batch,
    /// then sends this one (which keeps its messages until it lands: its dead letters copy them).
    fn cycle(&mut self, held: Held<'c>, flight: &mut Option<Sent<'c>>) -> Result<(), Abandoned> {
        let staged = match held.is_empty() {
            true => None,
            false => match self.stage_batch(&held) {
                Ok(s) => Some(s),
                Err(a) => {
                    if let Some(f) = flight.take() {
                        let _ = f.writer.join();
                    }
                    return Err(a);
                }
            },
        };
        if let Some(f) = flight.take() {
            self.land(f)?;
        }
        if let Some(batch) = staged {
            let mut sent = self.send(&held, batch)?;
            // Kept only for its dead letters: a batch without rejections lets its messages go.
            if !sent.rejections.is_empty() {
                sent.held = held;
            }
            *flight = Some(sent);
        }
        Ok(())
    }

    /// Applies rebalance changes; drops held messages of partitions no longer owned.
    fn apply_changes(&mut self, held: Option<&mut Held<'c>>) {
        let changes = self.consumer.context().take_changes();
        if changes.is_empty() {
            return;
        }
        for c in changes {
            match c {
                Change::Revoked(ps) => {
                    for &p in &ps {
                        self.owned.remove(&p);
                        self.states.remove(&p);
                        self.starts.remove(&p);
                        self.unread.forget(p);
                        self.held_offsets.remove(&p);
                        self.positions.forget(p);
                        self.committed.remove(&p);
                    }
                    self.unstall(ps);
                }
                Change::Assigned(ps) => {
                    self.read_starts(&ps);
                    for p in ps {
                        self.positions.forget(p);
                        self.owned.insert(p, self.next_epoch);
                        self.next_epoch += 1;
                    }
                }
            }
        }
        let owned = &self.owned;
        let keep = |(msg, epoch): &(BorrowedMessage<'c>, u64)| owned.get(&msg.partition()) == Some(epoch);
        self.stash.retain(keep);
        if let Some(h) = held {
            h.retain(keep);
        }
        gauge!(m::PARTITIONS).set(self.owned.len() as f64);
    }

    /// Reads the group's committed offsets of newly assigned `partitions` (one request), for
    /// [`Self::check_start`]. A partition whose offset cannot be read is checked before its first
    /// commit ([`Self::check_unread_starts`]).
    fn read_starts(&mut self, partitions: &[i32]) {
        let topic = &self.cfg.kafka.topic;
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(topic, p);
        }
        match self.consumer.committed_offsets(tpl, START_CHECK_TIMEOUT) {
            Ok(tpl) => {
                for e in tpl.elements_for_topic(topic) {
                    match committed_of(&e) {
                        Some(committed) => {
                            self.starts.insert(e.partition(), committed);
                            self.committed.insert(e.partition(), committed);
                        }
                        None => {
                            warn!(partition = e.partition(), error = ?e.error(),
                                "could not read the committed offset of an assigned partition; where its reading starts is \
                                 checked before its first commit");
                            self.unread.add(e.partition());
                        }
                    }
                }
            }
            Err(e) => {
                warn!(partitions = ?partitions, error = %e,
                    "could not read the committed offsets of assigned partitions; where their reading starts is checked \
                     before their first commit");
                for &p in partitions {
                    self.unread.add(p);
                }
            }
        }
    }

    /// Before committing `partitions`: reads the committed offsets of those whose offsets could
    /// not be read at their assignment, and checks where their reading started
    /// ([`Self::judge_start`]); at most every [`UNREAD_RETRY`] per partition, as the loop waits
    /// on each read. Returns the partitions whose commit is held: still unread. One whose reads
    /// fail for [`UNCHECKED_GAP_TTL`] is given up, counted in `tally_offset_gaps_unchecked_total`
    /// (1) and committed.
    fn check_unread_starts(&mut self, partitions: Vec<i32>) -> Vec<i32> {
        let now = Instant::now();
        let due = self.unread.due(partitions.iter().copied(), now);
        if !due.is_empty() {
            let topic = self.cfg.kafka.topic.clone();
            let mut tpl = TopicPartitionList::new();
            for (p, _) in &due {
                tpl.add_partition(&topic, *p);
            }
            let answer = self.consumer.committed_offsets(tpl, START_CHECK_TIMEOUT);
            let mut failed = Vec::new();
            for &(p, first) in &due {
                let committed = match &answer {
                    Ok(tpl) => {
                        tpl.elements_for_topic(&topic).iter().find(|e| e.partition() == p).and_then(committed_of)
                    }
                    Err(_) => None,
                };
                match committed {
                    Some(committed) => {
                        self.unread.resolved(p);
                        info!(
                            partition = p,
                            committed,
                            first,
                            "where the reading of a partition started was checked before its first commit"
                        );
                        self.judge_start(p, committed, first);
                    }
                    None => failed.push(p),
                }
            }
            let error = answer.err().map(|e| e.to_string());
            if !failed.is_empty() {
                warn!(partitions = ?failed, error = ?error,
                    "committed offsets still unreadable: the partitions' commits are held until their start is checked");
            }
            for p in self.unread.failed(&failed, now, UNREAD_RETRY, UNCHECKED_GAP_TTL) {
                counter!(m::OFFSET_GAPS_UNCHECKED, "partition" => p.to_string()).increment(1);
                warn!(partition = p, error = ?error,
                    "the committed offset of a partition could not be read for 5 minutes since its assignment: where its \
                     reading started is not checked, and its offsets are committed");
            }
        }
        partitions.into_iter().filter(|p| self.unread.holds(*p)).collect()
    }

    /// Commits the offsets held for partitions whose start is checked (or given up) since, when
    /// no later batch of theirs did ([`Self::held_offsets`]): a partition gone quiet is not left
    /// uncommitted. Asks for the committed offsets of those still unread (at most every
    /// [`UNREAD_RETRY`]). Called between batches: each held offset's batch was written.
    fn commit_released(&mut self) {
        self.held_offsets.retain(|p, (epoch, _)| self.owned.get(p) == Some(epoch));
        let ps: Vec<i32> = self.held_offsets.keys().copied().collect();
        let still = self.check_unread_starts(ps);
        let released: Vec<(i32, i64)> =
            self.held_offsets.iter().filter(|(p, _)| !still.contains(p)).map(|(p, (_, o))| (*p, *o)).collect();
        if released.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &released {
            tpl.add_partition_offset(&self.cfg.kafka.topic, *p, Offset::Offset(*o)).expect("valid offset");
            self.held_offsets.remove(p);
        }
        match self.commit_offsets(&tpl) {
            Ok(()) => info!(offsets = ?released, "held offsets committed: the partitions' start is checked"),
            Err(e) => {
                warn!(error = %e, "commit of held offsets failed; the written batches are deduplicated on redelivery")
            }
        }
    }

    /// Checks the first record read from a partition since its assignment against the committed
    /// offset ([`super::start`]): records deleted before the group read them, or a log that
    /// starts over below it, are logged and counted (`tally_offsets_skipped_total`).
    /// Every record read is also noted in [`Self::positions`]: a jump in a held partition's
    /// offsets is checked at once ([`Self::check_jump`]).
    fn check_start(&mut self, msg: &BorrowedMessage<'c>) {
        match self.positions.observe(msg.partition(), msg.offset()) {
            Jump::None => {}
            jump => self.check_jump(msg.partition(), jump),
        }
        if self.starts.is_empty() && self.unread.is_empty() {
            return; // every message but the first of each assignment: no hashing on the hot path
        }
        let (p, first) = (msg.partition(), msg.offset());
        self.unread.observe(p, first);
        let Some(committed) = self.starts.remove(&p) else { return };
        self.judge_start(p, committed, first);
    }

    /// Classifies where partition `p`'s reading started (`first`, the first record read since
    /// its assignment) against the group's `committed` offset ([`super::start`]); logs and counts
    /// what was skipped.
    fn judge_start(&mut self, p: i32, committed: i64, first: i64) {
        // The log start as of librdkafka's latest fetch (no request), else asked for.
        let low = if start::needs_low(committed, first) {
            match self.cached_low(p).map(Ok).unwrap_or_else(|| {
                self.consumer.fetch_watermarks(&self.cfg.kafka.topic, p, START_CHECK_TIMEOUT).map(|(low, _)| low)
            }) {
                Ok(low) => Some(low),
                Err(e) => {
                    counter!(m::OFFSET_GAPS_UNCHECKED, "partition" => p.to_string())
                        .increment((first - committed) as u64);
                    warn!(partition = p, committed, first, error = %e,
                        "could not read the log start of a partition that resumed past its committed offset: the offsets \
                         in between are not checked");
                    None
                }
            }
        } else {
            None
        };
        register_skipped(p);
        match start::classify(committed, first, low) {
            Start::Resumed => {}
            Start::Deleted(n) => {
                skipped(p, "deleted", n);
                error!(partition = p, committed, first, low = ?low, offsets = n,
                    "records deleted from the topic before this group read them (retention or compaction passed the committed \
                     offset): they are not billed (docs/alerts.md#tallyoffsetsskipped)");
            }
            Start::Rewound(n) => {
                skipped(p, "rewound", n);
                error!(partition = p, committed, first, offsets = n,
                    "the partition's log is shorter than the committed offset (unclean leader election, or the topic was \
                     created again): reading starts over below it, and events older than the dedupe window are counted \
                     again (docs/alerts.md#tallyoffsetsskipped)");
            }
        }
    }

    /// Checks a jump in a held partition's offsets ([`super::gaps`]): offsets of a jump forward
    /// below the partition's log start were deleted before this worker read them; a jump back
    /// means the log starts over below the records read. Both are logged and counted
    /// (`tally_offsets_skipped_total`); a jump forward over records that exist (commit markers,
    /// compaction) only in `tally_offset_gaps_checked_total`.
    fn check_jump(&mut self, p: i32, jump: Jump) {
        match jump {
            Jump::None => {}
            Jump::Back(n) => {
                skipped(p, "rewound", n);
                error!(
                    partition = p,
                    offsets = n,
                    "a held partition's log restarted below the records already read (unclean leader election, or the \
                     topic was created again): reading starts over below them, and events older than the dedupe window \
                     are counted again (docs/alerts.md#tallyoffsetsskipped)"
                );
            }
            Jump::Gap { from, to } => match self.cached_low(p) {
                Some(low) => gap_checked(p, from, to, low),
                None if self.unchecked.len() < MAX_UNCHECKED_GAPS => {
                    self.unchecked.push((p, from, to, Instant::now()));
                }
                None => gap_unchecked(p, from, to),
            },
        }
    }

    /// Checks again the jumps whose log start was unknown: once a fetch of the partition told
    /// it, as [`Self::check_jump`] does; after [`UNCHECKED_GAP_TTL`], counted unchecked.
    fn recheck_gaps(&mut self, now: Instant) {
        let waiting = std::mem::take(&mut self.unchecked);
        for (p, from, to, at) in waiting {
            match self.cached_low(p) {
                Some(low) => gap_checked(p, from, to, low),
                None if now.duration_since(at) >= UNCHECKED_GAP_TTL => gap_unchecked(p, from, to),
                None => self.unchecked.push((p, from, to, at)),
            }
        }
    }

    /// The partition's log start as of librdkafka's latest fetch (every Fetch response carries
    /// it), from librdkafka's cache: no request, no wait (`rd_kafka_get_watermark_offsets`).
    /// `None` while unknown.
    fn cached_low(&self, p: i32) -> Option<i64> {
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client handle is valid for the consumer's lifetime, which outlives `self`'s
        // borrow of it; the topic is a NUL-terminated string that outlives the call; the C
        // function only reads librdkafka's cached offsets into the two out-parameters.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                self.consumer.client().native_ptr(),
                self.topic_c.as_ptr(),
                p,
                &mut low,
                &mut high,
            )
        };
        (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && low >= 0).then_some(low)
    }

    fn epoch_of(&self, partition: i32) -> u64 {
        self.owned.get(&partition).copied().unwrap_or(0)
    }

    fn owns(&self, partition: i32, epoch: u64) -> bool {
        self.owned.get(&partition) == Some(&epoch)
    }

    /// Polls until the batch is full or its time is up — or, while nothing is held, until the
    /// batch in `flight` has finished its INSERT and can be landed. Returns whether shutdown
    /// was requested.
    fn gather(&mut self, held: &mut Held<'c>, flight: Option<&Sent<'c>>) -> bool {
        let max_messages = self.cfg.ingest.batch_max_messages;
        let max_wait = Duration::from_millis(self.cfg.ingest.batch_max_wait_ms);
        let mut started: Option<Instant> = (!held.is_empty()).then(Instant::now);
        let mut bytes: usize = held.iter().map(|(m, _)| m.payload_len()).sum();
        loop {
            if self.stopping() {
                return true;
            }
            self.housekeeping();
            // Before the batch-full return: a saturated worker's stash fills a batch while the
            // previous one is written, and returns there without polling.
            if self.quiet_checked.elapsed() >= QUIET_POSITIONS_EVERY {
                // Partitions with records gathered or in flight; every record read of the others
                // is written (the stash is empty while gathering: it was taken into `held`).
                let mut busy: Vec<i32> = held.iter().map(|(m, _)| m.partition()).collect();
                if let Some(f) = flight {
                    busy.extend(f.epochs.keys().chain(f.next.keys()));
                }
                busy.sort_unstable();
                busy.dedup();
                self.commit_quiet_positions(&busy);
                self.quiet_checked = Instant::now();
            }
            if held.len() >= max_messages || bytes >= BATCH_MAX_BYTES {
                return false;
            }
            let slice = match (started, flight) {
                (Some(t), _) => match max_wait.checked_sub(t.elapsed()) {
                    Some(left) if !left.is_zero() => left.min(POLL_SLICE),
                    _ => return false,
                },
                (None, Some(f)) if f.writer.is_finished() => return false,
                (None, Some(_)) => LANDING_SLICE,
                (None, None) => POLL_SLICE,
            };
            let polled = self.consumer.poll(slice);
            // Rebalance callbacks ran inside `poll`: apply them before tagging the message, which
            // belongs to the assignment in force after them.
            self.apply_changes(Some(held));
            match polled {
                Some(Ok(msg)) => {
                    self.check_start(&msg);
                    let epoch = self.epoch_of(msg.partition());
                    bytes += msg.payload_len();
                    held.push((msg, epoch));
                    started.get_or_insert_with(Instant::now);
                }
                Some(Err(e)) => poll_failed(&e, false),
                None => {}
            }
        }
    }

    /// Commits the consumer position of each quiet partition (none of its records gathered,
    /// staged or in flight: every record read of it is written) where it is past the offset
    /// this worker last committed: librdkafka moves the position past a transaction's commit
    /// marker (and an aborted transaction's records, `read_committed`) with no record returned.
    /// `busy`: the partitions with records gathered or in flight, ascending.
    ///
    /// The worker's commits follow the records it read (last + 1), so a partition whose log ends
    /// in a marker kept a committed offset one below its end: librdkafka measures
    /// `consumer_lag` from the committed offset to the last stable offset, so the lag read 1 for
    /// as long as the partition stayed quiet and `TallyPartitionNoProgress` paged after 15
    /// minutes. The offsets passed over are checked as a jump in the records read is
    /// ([`Self::check_jump`]: offsets below the log start are counted deleted), or by the
    /// assignment's start check when nothing was read since. A commit that failed (here or after
    /// a batch) is made good at the next pass. Partitions whose start is unread, stalled or with
    /// held commits are left to those paths.
    fn commit_quiet_positions(&mut self, busy: &[i32]) {
        if self.owned.is_empty() {
            return;
        }
        let positions = match self.consumer.position() {
            Ok(tpl) => tpl,
            Err(e) => {
                debug!(error = %e, "could not read the consumer's positions");
                return;
            }
        };
        let mut tpl = TopicPartitionList::new();
        for e in positions.elements_for_topic(&self.cfg.kafka.topic) {
            let (p, Offset::Offset(position)) = (e.partition(), e.offset()) else { continue };
            if !self.owned.contains_key(&p)
                || busy.binary_search(&p).is_ok()
                || self.unread.holds(p)
                || self.held_offsets.contains_key(&p)
                || self.stalled.contains_key(&p)
            {
                continue;
            }
            match self.positions.advance(p, position) {
                Some(jump) => self.check_jump(p, jump),
                None => match self.starts.get(&p) {
                    // Nothing read since the assignment, and the position moved past the group's
                    // committed offset: checked as a first record there would be.
                    Some(&committed) if committed >= 0 && position > committed => {
                        self.starts.remove(&p);
                        self.judge_start(p, committed, position);
                        self.positions.start_at(p, position);
                    }
                    _ => continue,
                },
            }
            if self.committed.get(&p).is_none_or(|c| position > *c) {
                tpl.add_partition_offset(&self.cfg.kafka.topic, p, Offset::Offset(position)).expect("valid offset");
            }
        }
        if tpl.count() == 0 {
            return;
        }
        let offsets = offsets_of(&tpl);
        match self.commit_offsets(&tpl) {
            Ok(()) => debug!(
                ?offsets,
                "quiet partitions committed at their positions (past transaction markers, or a failed commit)"
            ),
            Err(e) => warn!(error = %e, ?offsets, "commit of quiet partitions' positions failed; retried in a second"),
        }
    }

    /// Commits `tpl` synchronously and counts it (`tally_commits_total`, or
    /// `tally_commit_errors_total`); once the broker took it, notes each offset in
    /// [`Self::committed`]. Callers log the outcome in their own words.
    fn commit_offsets(&mut self, tpl: &TopicPartitionList) -> rdkafka::error::KafkaResult<()> {
        let result = self.consumer.commit(tpl, CommitMode::Sync);
        match &result {
            Ok(()) => {
                counter!(m::COMMITS).increment(1);
                self.committed.extend(offsets_of(tpl));
            }
            Err(_) => counter!(m::COMMIT_ERRORS).increment(1),
        }
        result
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        if !self.unchecked.is_empty() {
            self.recheck_gaps(now);
        }
        if !self.held_offsets.is_empty() {
            self.commit_released();
        }
        let v = &mut self.processor.verifier;
        match v.maybe_reload(now) {
            Ok(true) => {
                counter!(m::KEY_RELOADS, "result" => "changed").increment(1);
                info!("key material reloaded");
            }
            Ok(false) => {}
            Err(e) => {
                counter!(m::KEY_RELOADS, "result" => "error").increment(1);
                error!(error = %e, "key reload failed; keeping the previous keys");
            }
        }
    }

    /// Waits `delay` while serving the group: partitions paused, messages that still arrive are
    /// stashed for the next batch, rebalances applied. Err once the shutdown grace is over.
    fn wait(&mut self, delay: Duration, on: &'static str) -> Result<(), Abandoned> {
        m::waiting(on, true);
        counter!(m::RETRY_SECONDS, "on" => on).increment(delay.as_secs());
        let paused = self.consumer.assignment().ok();
        if let Some(a) = &paused {
            let _ = self.consumer.pause(a);
        }
        let until = Instant::now() + delay;
        while Instant::now() < until {
            self.poll_aside(until.saturating_duration_since(Instant::now()).min(POLL_SLICE));
            self.stopping();
        }
        // Resume what was paused, whether still assigned or not, and what is assigned now.
        // librdkafka keeps a partition's pause across a revocation: one revoked during the wait
        // and assigned to this worker again later was never fetched (the 2-worker bench pass
        // hung so, 2026-11-30: the partitions were paused by a wait on a fenced INSERT's retry,
        // revoked during it, and assigned back after it, when the assignment was empty).
        if let Some(a) = &paused {
            let _ = self.consumer.resume(a);
        }
        if let Ok(a) = self.consumer.assignment() {
            let _ = self.consumer.resume(&a);
        }
        m::waiting(on, false);
        match self.shutdown_since {
            Some(t) if t.elapsed() > SHUTDOWN_GRACE => Err(Abandoned),
            _ => Ok(()),
        }
    }

    /// Polls once while the loop waits for something else: rebalances are applied, a message
    /// that arrives is stashed for the next batch.
    fn poll_aside(&mut self, slice: Duration) {
        let polled = self.consumer.poll(slice);
        self.apply_changes(None);
        match polled {
            Some(Ok(msg)) => {
                self.check_start(&msg);
                let epoch = self.epoch_of(msg.partition());
                self.stash.push((msg, epoch));
            }
            Some(Err(e)) => poll_failed(&e, true),
            None => {}
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(BACKOFF_BASE, Duration::from_millis(self.cfg.ingest.max_backoff_ms))
    }

    /// Loads the dedupe state of every partition in `held` that has none.
    fn ensure_states(&mut self, held: &Held<'c>) -> Result<(), Abandoned> {
        let need: Vec<(i32, u64)> = {
            let mut v: Vec<_> = held
                .iter()
                .map(|(m, e)| (m.partition(), *e))
                .filter(|(p, e)| self.owns(*p, *e) && !self.states.contains_key(p))
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        if need.is_empty() {
            return Ok(());
        }
        // No earlier owner's INSERT may land after the states are read: fence every attempt of
        // the topic still staged that may hold rows of these partitions (a live worker whose
        // attempt is dropped retries it). This worker's own INSERT in flight holds rows only of
        // partitions that had a state when it was sent; if one of them was revoked and assigned
        // back since, it is among `need` and the attempt is fenced too.
        let loading: Vec<i32> = {
            let mut ps: Vec<i32> = need.iter().map(|(p, _)| *p).collect();
            ps.dedup();
            ps
        };
        let mut backoff = self.backoff();
        loop {
            match self.store.fence_partitions(&self.cfg.kafka.topic, &loading) {
                Ok(n) => {
                    if n > 0 {
                        info!(staging_tables = n, "fenced INSERT attempts still staged before loading dedupe state");
                    }
                    break;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    self.clickhouse_failed("fence", &e, &loading, delay);
                    self.wait(delay, "clickhouse")?;
                }
            }
        }
        let d = self.cfg.dedupe.clone();
        let horizon = now_secs() - (d.window_secs + d.replay_slack_secs) as i64;
        for (p, epoch) in need {
            // The messages from here on are decided again; rows of theirs may have landed from an
            // INSERT that never answered (this worker's before a restart, or an earlier owner's).
            let from = held.iter().filter(|(m, e)| m.partition() == p && *e == epoch).map(|(m, _)| m.offset()).min();
            self.mend("assigned", p, epoch, from.unwrap_or(0)..i64::MAX)?;
            let mut backoff = self.backoff();
            loop {
                self.poll_aside(Duration::ZERO); // one request per partition: serve the group between them
                if !self.owns(p, epoch) {
                    break;
                }
                let t = Instant::now();
                let mut state = PartitionState::new(d.bloom_bytes_per_partition, d.recent_keys_per_partition, horizon);
                // From one window before the horizon: a copy at or after the horizon that misses
                // the filter is decided new without a look-up, so the filter must hold every
                // stored copy of its key, whose event time may differ from its own (copies more
                // than a window apart are past the contract's window: "Limits").
                let from = horizon.saturating_sub(d.window_secs as i64);
                match self.store.load_partition(&self.cfg.kafka.topic, p, from, &mut state) {
                    Ok(keys) => {
                        histogram!(m::DEDUPE_LOAD_SECONDS).record(t.elapsed().as_secs_f64());
                        info!(partition = p, keys, ms = t.elapsed().as_millis() as u64, "dedupe state loaded");
                        if self.owns(p, epoch) {
                            self.states.insert(p, state);
                        }
                        break;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        self.clickhouse_failed("load", &e, &[p], delay);
                        self.wait(delay, "clickhouse")?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Ensures the dedupe states and stages the batch's messages still owned. Needs no
    /// ClickHouse round trip unless a partition's state must be loaded.
    fn stage_batch<'h>(&mut self, held: &'h Held<'c>) -> Result<Batch<'h>, Abandoned> {
        self.ensure_states(held)?;
        // The messages of this batch still owned (with state), in poll order.
        let idx: Vec<usize> = (0..held.len())
            .filter(|&i| {
                let (m, e) = &held[i];
                self.owns(m.partition(), *e) && self.states.contains_key(&m.partition())
            })
            .collect();
        let epochs: BTreeMap<i32, u64> = idx.iter().map(|&i| (held[i].0.partition(), held[i].1)).collect();
        let msgs: Vec<InMessage<'h>> = idx.iter().map(|&i| in_message(&held[i].0)).collect();
        counter!(m::MESSAGES).increment(msgs.len() as u64);
        let (hits0, misses0) = (self.processor.verifier.cache_hits, self.processor.verifier.cache_misses);
        let t = Instant::now();
        let staged = self.processor.stage(&msgs, &mut self.states, now_secs()).expect("states ensured above");
        let stage = t.elapsed();
        histogram!(m::STAGE_SECONDS, "stage" => "stage").record(stage.as_secs_f64());
        self.cache_metrics(hits0, misses0);
        // Offsets: every message of the batch ends up written, duplicate or dead-lettered.
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        let mut first: BTreeMap<i32, i64> = BTreeMap::new();
        for &i in &idx {
            let msg = &held[i].0;
            let e = next.entry(msg.partition()).or_insert(0);
            *e = (*e).max(msg.offset() + 1);
            let f = first.entry(msg.partition()).or_insert(i64::MAX);
            *f = (*f).min(msg.offset());
        }
        let timestamps_ms = idx.iter().filter_map(|&i| held[i].0.timestamp().to_millis()).collect();
        Ok(Batch { idx, epochs, first, next, staged, stage, timestamps_ms })
    }

    /// Resolves the batch's unknown keys (the previous batch has landed), queues its dead
    /// letters and starts its INSERT on a writer thread. The dead letters' acknowledgements are
    /// awaited when the batch lands ([`Self::land`]), so the next batch is gathered and staged
    /// meanwhile. The caller moves the batch's messages into the result's `held`.
    fn send<'h>(&mut self, held: &'h Held<'c>, mut b: Batch<'h>) -> Result<Sent<'c>, Abandoned> {
        let t = Instant::now();
        self.resolve_unknown(&mut b.staged, &b.epochs)?;
        let lookup = t.elapsed();
        let records = self.dlq_records(held, &b.idx, &b.staged.rejections);
        let round = self.dlq.round();
        let not_queued = self.dlq.enqueue(&records, &(0..records.len()).collect::<Vec<_>>());
        let dead_letters = match (records.is_empty(), not_queued.is_empty()) {
            (true, _) => DeadLetterAcks::Acknowledged,
            (false, true) => DeadLetterAcks::InRound(round),
            (false, false) => DeadLetterAcks::Unknown,
        };
        let unlanded = self.consumer.context().unlanded.clone();
        // Only partitions still owned at the batch's epochs: one revoked during the land step of
        // the batch before (its rows just dropped by the look-up's `keep_owned`) is not this
        // batch's to commit. Nothing polls between that look-up and here.
        // Nor one whose start is not checked yet: its commit waits for that ([`Unread`]).
        let slot = Unlanded::new(&b.next, &b.epochs, |p, e| self.owns(p, e) && !self.unread.holds(p), dead_letters);
        *unlanded.lock().expect("lock") = Some(slot);
        let t = Instant::now();
        let flight = b.staged.flight(&self.processor.meters, &self.cfg.kafka.topic, now_secs());
        histogram!(m::STAGE_SECONDS, "stage" => "encode").record(t.elapsed().as_secs_f64());
        let writer = {
            let store = self.store.clone();
            let topic = self.cfg.kafka.topic.clone();
            let in_flight = self.consumer.context().gate.begin();
            std::thread::spawn(move || {
                let t = Instant::now();
                let result = if flight.is_empty() { Ok(()) } else { store.insert_events(&topic, &flight) };
                if result.is_ok() {
                    // Before the gate opens: a revocation waiting on it may commit the batch.
                    if let Some(u) = unlanded.lock().expect("lock").as_mut() {
                        u.written = true;
                    }
                }
                drop(in_flight);
                (flight, result, t.elapsed())
            })
        };
        Ok(Sent {
            writer,
            held: Vec::new(),
            idx: b.idx,
            not_queued,
            epochs: b.epochs,
            first: b.first,
            next: b.next,
            duplicates: b.staged.duplicates_by_partition(),
            rejections: std::mem::take(&mut b.staged.rejections),
            stage: b.stage,
            lookup,
            timestamps_ms: b.timestamps_ms,
        })
    }

    /// Waits for a sent batch's INSERT, retries it until it is written (rows that landed in a
    /// failed attempt are found by key and not sent again), then commits its offsets.
    fn land(&mut self, s: Sent<'c>) -> Result<(), Abandoned> {
        // Its dead letters first: queued when the batch was sent, most are acknowledged by now.
        let t = Instant::now();
        let records = self.dlq_records(&s.held, &s.idx, &s.rejections);
        if let Err(a) = self.await_dead_letters(&records, &s.epochs, s.not_queued) {
            let _ = s.writer.join();
            return Err(a);
        }
        for r in records.iter().filter(|r| self.owns(r.partition, s.epochs[&r.partition])) {
            counter!(m::DLQ_RECORDS, "reason" => r.reason.as_str()).increment(1);
        }
        if let Some(u) = self.consumer.context().unlanded.lock().expect("lock").as_mut() {
            u.dead_letters = DeadLetterAcks::Acknowledged;
        }
        let dlq_wait = t.elapsed();
        let t = Instant::now();
        // Keep serving the group while the INSERT runs: a revocation is seen at once (and its
        // callback waits for this very INSERT, rule 3).
        while !s.writer.is_finished() {
            if self.stash.len() < self.cfg.ingest.batch_max_messages && !self.shutdown.load(Ordering::Relaxed) {
                self.poll_aside(LANDING_SLICE);
            } else {
                std::thread::sleep(LANDING_SLICE); // a whole batch is waiting already
            }
        }
        let (mut flight, result, took) = s.writer.join().expect("the writer thread does not panic");
        let waited = t.elapsed();
        let accepted = match result {
            Ok(()) => {
                if !flight.is_empty() {
                    m::insert_latency(took.as_secs_f64(), flight.len());
                }
                flight.len()
            }
            Err(e) => {
                let offsets: BTreeMap<i32, Range<i64>> = s.first.iter().map(|(&p, &f)| (p, f..s.next[&p])).collect();
                self.retry_insert(&mut flight, &s.epochs, &offsets, e)?
            }
        };
        let written_ms = now_millis();
        for t in &s.timestamps_ms {
            histogram!(m::EVENT_LATENCY).record((written_ms - t).max(0) as f64 / 1000.0);
        }
        let t = Instant::now();
        let held = if self.unread.is_empty() {
            Vec::new()
        } else {
            let owned: Vec<i32> = s.next.keys().copied().filter(|p| self.owns(*p, s.epochs[p])).collect();
            self.check_unread_starts(owned)
        };
        for (p, off) in &s.next {
            if self.owns(*p, s.epochs[p]) {
                if held.contains(p) {
                    self.held_offsets.insert(*p, (s.epochs[p], *off));
                } else {
                    self.held_offsets.remove(p);
                }
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (p, off) in &s.next {
            if self.owns(*p, s.epochs[p]) && !held.contains(p) {
                tpl.add_partition_offset(&self.cfg.kafka.topic, *p, Offset::Offset(*off)).expect("valid offset");
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.commit_offsets(&tpl) {
                warn!(error = %e, "offset commit failed; the batch is written and will be deduplicated on redelivery");
            }
        }
        // Landed: a revocation has nothing left to commit for it.
        *self.consumer.context().unlanded.lock().expect("lock") = None;
        let commit = t.elapsed();
        for (stage, d) in [("lookup", s.lookup), ("dlq_wait", dlq_wait), ("insert_wait", waited), ("commit", commit)] {
            histogram!(m::STAGE_SECONDS, "stage" => stage).record(d.as_secs_f64());
        }
        self.unstall(s.epochs.keys().copied().filter(|p| self.owns(*p, s.epochs[p])).collect::<Vec<_>>());
        m::accepted(accepted as u64);
        // Duplicates and rejections of partitions revoked meanwhile are the next owner's to count.
        let owned = |p: i32| self.owns(p, s.epochs[&p]);
        let duplicates: u64 = s.duplicates.iter().filter(|(p, _)| owned(**p)).map(|(_, n)| n).sum();
        m::duplicates(duplicates);
        for r in records.iter().filter(|r| owned(r.partition)) {
            m::rejected(r.reason);
        }
        let (keys, bytes) = self.states.values().fold((0, 0), |(k, b), s| (k + s.keys(), b + s.memory_bytes()));
        gauge!(m::DEDUPE_KEYS).set(keys as f64);
        gauge!(m::DEDUPE_BYTES).set(bytes as f64);
        debug!(
            messages = s.idx.len(),
            accepted,
            duplicates,
            rejected = s.rejections.len(),
            stage_ms = s.stage.as_millis() as u64,
            lookup_ms = s.lookup.as_millis() as u64,
            dlq_wait_ms = dlq_wait.as_millis() as u64,
            insert_ms = took.as_millis() as u64,
            insert_wait_ms = waited.as_millis() as u64,
            commit_ms = commit.as_millis() as u64,
            "batch committed"
        );
        Ok(())
    }

    fn cache_metrics(&self, hits0: u64, misses0: u64) {
        let v = &self.processor.verifier;
        counter!(m::CRED_CACHE_HITS).increment(v.cache_hits - hits0);
        counter!(m::CRED_CACHE_MISSES).increment(v.cache_misses - misses0);
        let total = v.cache_hits + v.cache_misses;
        if total > 0 {
            gauge!(m::CRED_CACHE_HIT_RATIO).set(v.cache_hits as f64 / total as f64);
        }
    }

    fn keep_owned(&self, staged: &mut Staged<'_>, epochs: &BTreeMap<i32, u64>) {
        staged.retain_partitions(|p| self.owns(p, epochs[&p]));
    }

    /// Looks up the keys the in-memory state could not decide on.
    fn resolve_unknown(&mut self, staged: &mut Staged<'_>, epochs: &BTreeMap<i32, u64>) -> Result<(), Abandoned> {
        let mut backoff = self.backoff();
        loop {
            self.keep_owned(staged, epochs);
            let keys = staged.unknown_keys();
            if keys.is_empty() {
                return Ok(());
            }
            match self.store.existing(&keys) {
                Ok(found) => {
                    counter!(m::DEDUPE_LOOKUPS).increment(keys.len() as u64);
                    drop(keys);
                    staged.resolve(&found);
                    return Ok(());
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    drop(keys);
                    self.clickhouse_failed("lookup", &e, &self.owned_of(epochs), delay);
                    self.wait(delay, "clickhouse")?;
                }
            }
        }
    }

    /// The batch's rejections as dead-letter records (original key, value or event span, headers).
    fn dlq_records<'h>(&self, held: &'h Held<'c>, idx: &[usize], rejections: &[Rejection]) -> Vec<DlqRecord<'h>> {
        rejections
            .iter()
            .map(|r| {
                let msg = &held[idx[r.msg]].0;
                let value = msg.payload().unwrap_or_default();
                let value = match &r.span {
                    Some(s) => &value[s.clone()],
                    None => value,
                };
                DlqRecord {
                    key: msg.key(),
                    value,
                    headers: msg.headers(),
                    reason: r.reason,
                    partition: msg.partition(),
                    offset: msg.offset(),
                    batch_index: r.batch_index,
                }
            })
            .collect()
    }

    /// Waits until every record queued by `enqueue` is acknowledged, re-sending failed ones with
    /// backoff (only for partitions still owned).
    fn await_dead_letters(
        &mut self,
        records: &[DlqRecord<'_>],
        epochs: &BTreeMap<i32, u64>,
        mut failed: Vec<(usize, Failure)>,
    ) -> Result<(), Abandoned> {
        let mut backoff = self.backoff();
        failed.extend(self.dlq.wait_acks(DLQ_ACK_TIMEOUT));
        loop {
            failed.retain(|(i, _)| self.owns(records[*i].partition, epochs[&records[*i].partition]));
            if failed.is_empty() {
                return Ok(());
            }
            counter!(m::DLQ_ERRORS).increment(failed.len() as u64);
            let delay = backoff.next_delay();
            let retry_ms = delay.as_millis() as u64;
            let refused: Vec<i32> = {
                let mut v: Vec<i32> =
                    failed.iter().filter(|(_, f)| f.permanent).map(|(i, _)| records[*i].partition).collect();
                v.sort_unstable();
                v.dedup();
                v.retain(|p| self.owns(*p, epochs[p]));
                v
            };
            if refused.is_empty() {
                warn!(failed = failed.len(), error = %failed[0].1.error, retry_ms, "dead-letter write failed; retrying");
            } else {
                self.stall(&refused, STALL_DEAD_LETTER);
                let first = failed.iter().find(|(_, f)| f.permanent).expect("a permanent failure");
                error!(
                    partitions = ?refused,
                    failed = failed.len(),
                    error = %first.1.error,
                    retry_ms,
                    "partition stalled: the broker refuses the dead-letter record and retrying will not help until the \
                     topic or the broker's limits change (see README, Troubleshooting); the source offset is not committed past it"
                );
            }
            self.wait(delay, "broker")?;
            let which: Vec<usize> = failed.into_iter().map(|(i, _)| i).collect();
            failed = self.dlq.enqueue(records, &which);
            failed.extend(self.dlq.wait_acks(DLQ_ACK_TIMEOUT));
        }
    }

    /// After the writer thread's attempt failed: waits, fences the failed attempt (so that it
    /// cannot land later), drops the rows that did land (an attempt may fail after the server
    /// wrote it, or write some months' parts only) and those of partitions no longer owned, and
    /// sends the rest again, until it goes through. Runs on the worker thread, so no rebalance
    /// callback runs during a request. Returns the rows written.
    ///
    /// Rows that landed are rows whose INSERT did not answer: before anything else, their
    /// aggregates are mended (a view's part may be missing, [`crate::sink::mend`]).
    fn retry_insert(
        &mut self,
        flight: &mut Flight,
        epochs: &BTreeMap<i32, u64>,
        offsets: &BTreeMap<i32, Range<i64>>,
        mut failed: InsertFailed,
    ) -> Result<usize, Abandoned> {
        let mut backoff = self.backoff();
        let mut landed = 0;
        loop {
            let delay = backoff.next_delay();
            self.clickhouse_failed("insert", &failed.error, &self.owned_of(epochs), delay);
            self.wait(delay, "clickhouse")?;
            self.fence(&failed.stage, epochs)?;
            let now_landed = self.drop_landed(flight, epochs)?;
            if now_landed > 0 {
                for (&p, range) in offsets {
                    self.mend("retry", p, epochs[&p], range.clone())?;
                }
            }
            landed += now_landed;
            // Serve the group between the requests (a live worker must never stay away from
            // `poll` long enough to be expelled), then send only what is still ours.
            self.poll_aside(Duration::ZERO);
            flight.retain_partitions(|p| self.owns(p, epochs[&p]));
            if flight.is_empty() {
                return Ok(landed);
            }
            let t = Instant::now();
            match self.store.insert_events(&self.cfg.kafka.topic, flight) {
                Ok(()) => {
                    m::insert_latency(t.elapsed().as_secs_f64(), flight.len());
                    return Ok(landed + flight.len());
                }
                Err(f) => failed = f,
            }
        }
    }

    /// Mends the aggregates of `partition`'s rows at `offsets` ([`crate::sink::mend`]), retrying
    /// until ClickHouse answers or the partition is no longer ours at `epoch`. The group is served
    /// before each of the mend's steps, and a step is sent only while the partition is ours. A
    /// mend abandoned after its correction was staged drops the staging table if ClickHouse
    /// answers; otherwise the partition's next load or mend does.
    fn mend(&mut self, when: &'static str, partition: i32, epoch: u64, offsets: Range<i64>) -> Result<(), Abandoned> {
        let d = &self.cfg.dedupe;
        let horizon = now_secs() - (d.window_secs + d.replay_slack_secs) as i64;
        let mut backoff = self.backoff();
        'attempt: while self.owns(partition, epoch) {
            let t = Instant::now();
            let mut mend = Mend::new(&self.cfg.kafka.topic, partition, offsets.clone(), horizon);
            loop {
                // Serve the group before every request; send none for a partition no longer ours.
                self.poll_aside(Duration::ZERO);
                if !self.owns(partition, epoch) {
                    if !mend.stage().is_empty() {
                        let _ = self.store.fence(mend.stage());
                    }
                    return Ok(());
                }
                match self.store.mend_step(&mut mend) {
                    Ok(Step::Done(r)) => {
                        self.mended(when, partition, &r, t.elapsed());
                        return Ok(());
                    }
                    Ok(Step::More) => {}
                    Err(e) => {
                        let delay = backoff.next_delay();
                        self.clickhouse_failed("mend", &e, &[partition], delay);
                        self.wait(delay, "clickhouse")?;
                        continue 'attempt;
                    }
                }
            }
        }
        Ok(())
    }

    /// Logs and counts what a mend found.
    fn mended(&self, when: &'static str, partition: i32, r: &Mended, took: Duration) {
        counter!(m::MENDS, "when" => when).increment(1);
        if r.rows > 0 {
            info!(
                partition,
                when,
                rows = r.rows,
                short = r.short,
                fenced = r.fenced,
                ms = took.as_millis() as u64,
                "unconfirmed rows: their aggregates checked against the ledger"
            );
        }
        if r.short > 0 {
            warn!(partition, aggregates = r.short, added = %r.added, "aggregates short of the ledger mended (an INSERT landed without its views)");
            counter!(m::MENDED).increment(r.short);
        }
        for o in &r.over {
            error!(partition, "aggregate above the ledger, left as it is (see tally-invoicer verify): {o}");
        }
        counter!(m::OVER_LEDGER).increment(r.over.len() as u64);
    }

    /// Drops a failed attempt's staging table, retrying until ClickHouse confirms it.
    fn fence(&mut self, stage: &str, epochs: &BTreeMap<i32, u64>) -> Result<(), Abandoned> {
        let mut backoff = self.backoff();
        loop {
            match self.store.fence(stage) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let delay = backoff.next_delay();
                    self.clickhouse_failed("fence", &e, &self.owned_of(epochs), delay);
                    self.wait(delay, "clickhouse")?;
                }
            }
        }
    }

    /// Removes from `flight` the rows of partitions no longer owned and the rows already present
    /// in ClickHouse (those are written); returns how many were present.
    fn drop_landed(&mut self, flight: &mut Flight, epochs: &BTreeMap<i32, u64>) -> Result<usize, Abandoned> {
        let mut backoff = self.backoff();
        loop {
            flight.retain_partitions(|p| self.owns(p, epochs[&p]));
            let keys = flight.keys();
            if keys.is_empty() {
                return Ok(0);
            }
            match self.store.existing(&keys) {
                Ok(found) => {
                    drop(keys);
                    let n = flight.retain(|_, k| !found.contains(&k));
                    if n > 0 {
                        info!(rows = n, "rows of the failed attempt had landed; not sending them again");
                    }
                    return Ok(n);
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    drop(keys);
                    self.clickhouse_failed("lookup", &e, &self.owned_of(epochs), delay);
                    self.wait(delay, "clickhouse")?;
                }
            }
        }
    }
}

/// A staged batch, not yet resolved or sent.
struct Batch<'h> {
    /// Indices into the held messages of those staged (still owned, in poll order).
    idx: Vec<usize>,
    epochs: BTreeMap<i32, u64>,
    /// Per partition, the batch's first offset.
    first: BTreeMap<i32, i64>,
    /// Per partition, the offset to commit once the batch is written.
    next: BTreeMap<i32, i64>,
    staged: Staged<'h>,
    stage: Duration,
    /// The messages' Kafka timestamps (ms), for `tally_event_to_aggregate_seconds`.
    timestamps_ms: Vec<i64>,
}

/// A batch whose INSERT runs on the writer thread and whose dead letters are queued; both are
/// awaited when it lands.
struct Sent<'c> {
    writer: std::thread::JoinHandle<(Flight, Result<(), InsertFailed>, Duration)>,
    /// The batch's messages, kept until it lands when it has rejections (empty otherwise): a
    /// dead letter that failed is sent again from them.
    held: Held<'c>,
    /// Indices into `held` of the messages staged, in staging order (as in [`Batch`]).
    idx: Vec<usize>,
    /// Dead letters the producer refused to queue (indices into the rejections).
    not_queued: Vec<(usize, Failure)>,
    epochs: BTreeMap<i32, u64>,
    first: BTreeMap<i32, i64>,
    next: BTreeMap<i32, i64>,
    /// Per source partition.
    duplicates: BTreeMap<i32, u64>,
    rejections: Vec<Rejection>,
    stage: Duration,
    lookup: Duration,
    timestamps_ms: Vec<i64>,
}

fn in_message<'a>(msg: &'a BorrowedMessage<'_>) -> InMessage<'a> {
    let authorization = Credential::from_headers(super::headers::raw_headers(msg));
    InMessage {
        partition: msg.partition(),
        offset: msg.offset(),
        timestamp_secs: msg.timestamp().to_millis().map(|ms| ms.div_euclid(1000)),
        value: msg.payload(),
        authorization,
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// How long a starting worker waits for identity providers' first key sets.
const IDP_STARTUP_WAIT: Duration = Duration::from_secs(60);

/// Waits until ClickHouse answers (or shutdown is asked).
fn wait_for_clickhouse(store: &crate::sink::clickhouse::ClickHouse, cfg: &IngestConfig, shutdown: &AtomicBool) {
    let mut backoff = Backoff::new(BACKOFF_BASE, Duration::from_millis(cfg.ingest.max_backoff_ms));
    while let Err(e) = store.ping() {
        if shutdown.load(Ordering::Relaxed) {
            return;
        }
        let delay = backoff.next_delay();
        m::waiting("clickhouse", true);
        warn!(error = %e, retry_ms = delay.as_millis() as u64, "waiting for clickhouse");
        std::thread::sleep(delay);
    }
    m::waiting("clickhouse", false);
}

/// Builds the worker's clients and runs it until shutdown.
pub fn run(cfg: IngestConfig, shutdown: Arc<AtomicBool>) -> anyhow::Result<()> {
    use crate::sink::clickhouse::ClickHouse;
    let meters = crate::meter::Meters::load(&cfg.meters.path).context("failed to load meters")?;
    let store = ClickHouse::new(&cfg.clickhouse);
    wait_for_clickhouse(&store, &cfg, &shutdown);
    if shutdown.load(Ordering::Relaxed) {
        return Ok(());
    }
    let missing = {
        let mut backoff = Backoff::new(BACKOFF_BASE, Duration::from_millis(cfg.ingest.max_backoff_ms));
        loop {
            match crate::sink::schema::missing(&store) {
                Ok(m) => break m,
                Err(e) if e.is_transient() && !shutdown.load(Ordering::Relaxed) => {
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_ms = delay.as_millis() as u64, "waiting to read the schema's migrations");
                    std::thread::sleep(delay);
                }
                Err(e) => return Err(e).context("failed to read the schema's migrations"),
            }
        }
    };
    if !missing.is_empty() {
        anyhow::bail!(
            "the ClickHouse schema lacks migrations {}: run `tally-ingest migrate` (with every worker stopped, \
             `--ingestion-stopped`, for one that re-creates views; docs/clickhouse.md)",
            missing.join(", ")
        );
    }
    let verifier = match cfg.auth.api_keys_store {
        crate::config::ApiKeysStore::File => crate::verify::Verifier::from_config(&cfg.auth),
        crate::config::ApiKeysStore::ClickHouse => crate::verify::Verifier::with_store(
            &cfg.auth,
            crate::verify::store::KeyStore::new(store.clone(), cfg.auth.api_key_pepper.0.as_bytes()),
        ),
    }
    .context("failed to load key material")?;
    // Tokens of an identity provider whose key set was never fetched cannot be verified: wait
    // for it rather than dead-letter its tenants' events.
    let mut verifier = verifier;
    // Bounded: one customer's IdP that never answers must not keep every tenant waiting; past
    // the bound the worker consumes, and that issuer's tokens are refused (dead-lettered, so
    // they can be produced again) until its keys arrive by an unknown-kid refetch or a refresh.
    let mut backoff = Backoff::new(BACKOFF_BASE, Duration::from_millis(cfg.ingest.max_backoff_ms));
    let give_up = Instant::now() + IDP_STARTUP_WAIT;
    loop {
        let pending = verifier.unready_issuers();
        if pending.is_empty() || shutdown.load(Ordering::Relaxed) {
            break;
        }
        if Instant::now() >= give_up {
            error!(issuers = ?pending, "identity providers still unreachable; consuming without their keys");
            break;
        }
        m::waiting("identity_provider", true);
        let delay = backoff.next_delay();
        warn!(issuers = ?pending, retry_ms = delay.as_millis() as u64, "waiting for identity provider key sets");
        std::thread::sleep(delay);
    }
    m::waiting("identity_provider", false);
    let processor = Processor {
        meters,
        verifier,
        limits: crate::pipeline::Limits {
            max_message_bytes: cfg.ingest.max_message_bytes,
            max_future_secs: cfg.ingest.max_future_secs as i64,
            window_secs: cfg.dedupe.window_secs as i64,
        },
        hint: Default::default(),
    };
    let dlq = DeadLetters::new(&super::client_config(&cfg.kafka), &cfg.kafka.dlq_topic, &cfg.kafka.topic)
        .context("failed to create the dead-letter producer")?;
    let dlq = Arc::new(dlq);
    let timeout = Duration::from_secs(cfg.clickhouse.timeout_secs);
    let consumer: BaseConsumer<Context> = super::consumer_config(&cfg.kafka)
        .create_with_context(Context::new(&cfg.kafka.topic, timeout, dlq.clone()))
        .context("failed to create the kafka consumer")?;
    consumer.subscribe(&[&cfg.kafka.topic]).context("failed to subscribe")?;
    info!(topic = %cfg.kafka.topic, group = %cfg.kafka.group_id, "consuming");
    let result = Worker::new(&consumer, dlq, store, processor, cfg, shutdown).run();
    consumer.unsubscribe();
    result
}

/// A jump `from..to` in `partition`'s offsets, against the log start `low`: counted checked, and
/// its offsets below `low` counted deleted and logged.
fn gap_checked(p: i32, from: i64, to: i64, low: i64) {
    counter!(m::OFFSET_GAPS, "partition" => p.to_string()).increment((to - from) as u64);
    let n = gaps::deleted(from, to, low);
    if n > 0 {
        skipped(p, "deleted", n);
        error!(
            partition = p,
            from,
            to,
            low,
            offsets = n,
            "records of a held partition were deleted before this worker read them (retention overtook its position, \
             e.g. while it waited out an outage): they are not billed (docs/alerts.md#tallyoffsetsskipped)"
        );
    }
}

/// The (partition, offset) pairs of `tpl` that hold an offset.
fn offsets_of(tpl: &TopicPartitionList) -> Vec<(i32, i64)> {
    tpl.elements().iter().filter_map(|e| Some((e.partition(), e.offset().to_raw()?))).collect()
}

/// The committed offset of a partition in an OffsetFetch answer (negative: the group has none);
/// `None` if the answer carries an error for it.
fn committed_of(e: &rdkafka::topic_partition_list::TopicPartitionListElem) -> Option<i64> {
    e.error().ok()?;
    Some(match e.offset() {
        Offset::Offset(o) => o,
        _ => -1,
    })
}

/// A jump `from..to` in `partition`'s offsets that could not be checked: counted, and logged.
fn gap_unchecked(p: i32, from: i64, to: i64) {
    counter!(m::OFFSET_GAPS_UNCHECKED, "partition" => p.to_string()).increment((to - from) as u64);
    warn!(partition = p, from, to,
        "a jump in a partition's offsets could not be checked for deleted records: no fetch of the partition told its log \
         start (Fetch v5+, Kafka 0.11+, gives it unless the fetch failed)");
}

/// Registers both series of `tally_offsets_skipped_total` for `partition`, at 0, once its
/// offsets were checked (a scrape shows which partitions were).
fn register_skipped(partition: i32) {
    for reason in ["deleted", "rewound"] {
        counter!(m::OFFSETS_SKIPPED, "partition" => partition.to_string(), "reason" => reason).increment(0);
    }
}

/// Counts `n` offsets of `partition` passed over for `reason` (`deleted` or `rewound`).
fn skipped(partition: i32, reason: &'static str, n: u64) {
    counter!(m::OFFSETS_SKIPPED, "partition" => partition.to_string(), "reason" => reason).increment(n);
}

/// A poll that returned an error: counted; a message the client cannot decode is an ERROR, since
/// it stops its partition until someone acts. librdkafka reports it again on every fetch of the
/// partition, with its offset in the client's error line ("Decompression (codec …) of message at
/// OFFSET … failed", the offset of the batch's first record): a codec it was built without,
/// corrupt data, or a zstd batch that decompresses beyond `receive.message.max.bytes`
/// (docs/alerts.md, TallyPartitionNoProgress).
/// `waiting`: the loop is waiting on something else (ClickHouse, a dead-letter write), when
/// broker errors are expected and logged at debug.
fn poll_failed(e: &rdkafka::error::KafkaError, waiting: bool) {
    counter!(m::BROKER_ERRORS).increment(1);
    if crate::admin::undecodable(e) {
        error!(error = %e, "a message of the source topic cannot be decoded: its partition does not advance");
    } else if waiting {
        debug!(error = %e, "poll failed while waiting");
    } else {
        warn!(error = %e, "poll failed");
    }
}
