//! The Kafka source: a member of a consumer group that feeds one pipeline
//! (`[sources.NAME] type = "kafka"`, docs/SERVE.md).
//!
//! Decisions:
//!
//! - **One thread per source**, running an rdkafka `BaseConsumer` (librdkafka fetches in its
//!   own threads; the source thread polls, builds batches and hands them over). Rebalance
//!   callbacks run on that thread, inside `poll`, so they see the source's state as it is
//!   between two records.
//! - **Batches are per partition**: a partition's records, in offset order, up to
//!   `batch_events`, handed over once full or `batch_ms` after their first record. Order holds
//!   per partition, and each batch carries its [`Position`] (`kafka/GROUP/TOPIC/PARTITION`, the
//!   offset after it) for a checkpointed pipeline.
//! - **Commits follow the sinks** (`offsets.rs`): a partition's offset moves past a batch only
//!   once it and every earlier batch of the partition were accepted by the sinks, the same
//!   completion that acks a QUIC batch. Commits are asynchronous, at most every
//!   [`COMMIT_EVERY`], synchronous on a rebalance and at the stop. At least once across crashes
//!   and rebalances; nothing committed that a sink did not accept. A batch the pipeline refused
//!   (the router stopping) holds its partition's offset where it is.
//! - **Rebalances**: when partitions are revoked the source stops taking their records, waits
//!   (at most `rebalance_wait_ms`) for their batches in flight to be accepted, commits them and
//!   lets the partitions go; records it read and did not hand over are dropped uncommitted,
//!   for the next owner to read.
//! - **Backpressure**: when the pipeline's queue is full the source pauses its partitions
//!   (librdkafka stops fetching) and keeps polling, so that it stays in the group and serves
//!   rebalances; it resumes once the batch waiting got in.
//! - **A checkpointed pipeline** resumes where its window state is: records below the
//!   checkpoint's position of their partition are skipped (counted as duplicates) and
//!   committed.
//! - **Records become events** as they are: key, value (a null value is empty), timestamp
//!   (create or log-append time; none: the time read), headers in order (a null value is
//!   empty). A record with a header name that is not UTF-8 cannot be an event: it goes to the
//!   pipeline's dead-letter sink with `weir-error`, `weir-source` and `kafka-topic`,
//!   `kafka-partition`, `kafka-offset` headers, and is committed like the others.
//! - **Broker trouble** (down, unknown topic) is librdkafka's to retry; the source logs each
//!   distinct problem at most every [`LOG_EVERY`], naming the source.

pub mod config;
mod offsets;

use crate::admin::status::{PartitionStatus, SourceStatus};
use crate::metrics::{Counter, Metrics};
use crate::pipeline::{Completion, Input, PipelineInput, Position};
use crate::sinks::SharedBatch;
use anyhow::{Context as _, Result, anyhow};
use config::KafkaSourceConfig;
use offsets::{Offsets, Partition};
use rdkafka::bindings as rdsys;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use weir_format::{BatchBuilder, Event};

/// How often, at most, accepted offsets are committed while records flow.
pub const COMMIT_EVERY: Duration = Duration::from_millis(200);
/// The same problem is logged at most this often per source.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// A partition's batch is handed over once its records hold this many bytes, whatever
/// `batch_events` says (a batch is one buffer, and a QUIC batch is at most 64 MiB).
const BATCH_BYTES: usize = 16 << 20;
/// How often librdkafka reports the partitions' lag (its statistics).
const LAG_EVERY: Duration = Duration::from_secs(1);
/// How long a poll waits when nothing is due sooner.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// How often a source whose pipeline is full tries to hand its batch over again.
const FULL_RETRY: Duration = Duration::from_millis(2);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a batch's completion reports to the source thread.
struct Done {
    partition: Partition,
    id: u64,
    result: Result<(), String>,
}

/// The state the source thread shares with its consumer's callbacks and with the router.
struct Shared {
    config: KafkaSourceConfig,
    /// The pipeline's queue (replaced when a reload restarts the pipeline).
    input: Mutex<PipelineInput>,
    /// No record is taken from now on.
    stopping: AtomicBool,
    /// The pipelines stopped: commit what was accepted and leave the group.
    closing: AtomicBool,
    offsets: Mutex<Offsets>,
    done_tx: Sender<Done>,
    done_rx: Mutex<Receiver<Done>>,
    /// Partitions revoked since the source thread last looked.
    revoked: Mutex<Vec<Partition>>,
    /// Rebalances so far (each may change the assignment being paused or resumed).
    rebalances: AtomicU64,
    /// When each kind of problem was last logged.
    last_log: Mutex<HashMap<String, Instant>>,
    /// Where the partitions' lag goes, and the source's label there.
    metrics: Arc<Metrics>,
    label: String,
    /// The partitions it owns now.
    assigned: Mutex<Vec<Partition>>,
}

impl Shared {
    /// Logs `message` unless the same was logged less than [`LOG_EVERY`] ago.
    fn warn(&self, message: String) {
        self.warn_as(message.clone(), message);
    }

    /// Logs `message` unless a problem of the same `kind` was logged less than [`LOG_EVERY`]
    /// ago (librdkafka's reasons for one problem vary from one report to the next).
    fn warn_as(&self, kind: String, message: String) {
        let mut last = lock(&self.last_log);
        let now = Instant::now();
        last.retain(|_, at| now.duration_since(*at) < LOG_EVERY);
        if last.contains_key(&kind) {
            return;
        }
        tracing::warn!("{message}");
        last.insert(kind, now);
    }

    /// Applies the completions reported so far; with `wait`, first waits that long at most for
    /// one.
    fn drain_done(&self, wait: Option<Duration>) {
        let rx = lock(&self.done_rx);
        let mut offsets = lock(&self.offsets);
        if let Some(wait) = wait {
            match rx.recv_timeout(wait) {
                Ok(done) => self.apply(&mut offsets, done),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
            }
        }
        while let Ok(done) = rx.try_recv() {
            self.apply(&mut offsets, done);
        }
    }

    fn apply(&self, offsets: &mut Offsets, done: Done) {
        let accepted = done.result.is_ok();
        if offsets.resolved(&done.partition, done.id, accepted)
            && let Err(reason) = done.result
        {
            let at = offsets.stuck_at(&done.partition).unwrap_or(-1);
            self.warn(format!(
                "kafka source `{}`: a batch of {} was not accepted ({reason}); the partition's committed offset stays at {}, and its records from there are read again by its next owner",
                self.config.name,
                done.partition,
                if at < 0 {
                    "its last commit".to_owned()
                } else {
                    at.to_string()
                }
            ));
        }
    }

    /// Commits what was accepted (of `only`, when given).
    fn commit(
        &self,
        consumer: &BaseConsumer<Callbacks>,
        only: Option<&[Partition]>,
        mode: CommitMode,
    ) {
        // A synchronous commit (a rebalance, the stop) also sends what an asynchronous one
        // still in flight carries: if that one fails, nothing would send it again.
        let offsets = lock(&self.offsets).take_commit(only, matches!(mode, CommitMode::Sync));
        if offsets.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for (p, next) in &offsets {
            if let Err(e) = list.add_partition_offset(&p.topic, p.partition, Offset::Offset(*next))
            {
                self.warn(format!(
                    "kafka source `{}`: cannot commit {p} at {next}: {e}",
                    self.config.name
                ));
            }
        }
        if let Err(e) = consumer.commit(&list, mode) {
            self.warn(format!(
                "kafka source `{}`: cannot commit offsets ({}): {e}; they are committed with the next ones",
                self.config.name,
                describe(&offsets)
            ));
            lock(&self.offsets).commit_failed(&offsets);
        }
    }

    /// Revoked partitions: wait (bounded) for their batches in flight, commit, let them go.
    fn revoke(&self, consumer: &BaseConsumer<Callbacks>, partitions: Vec<Partition>) {
        let deadline = Instant::now() + self.config.rebalance_wait;
        loop {
            self.drain_done(None);
            let left = lock(&self.offsets).pending(&partitions);
            if left == 0 {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                self.warn(format!(
                    "kafka source `{}`: {left} batches of the revoked partitions were not accepted within {} ms; their records are read again by the partitions' next owner",
                    self.config.name,
                    self.config.rebalance_wait.as_millis()
                ));
                break;
            }
            self.drain_done(Some(deadline - now));
        }
        self.commit(consumer, Some(&partitions), CommitMode::Sync);
        lock(&self.offsets).release(&partitions);
        lock(&self.assigned).retain(|p| !partitions.contains(p));
        lock(&self.revoked).extend(partitions);
    }
}

/// The consumer's callbacks: logs, rebalances and commit results, into the source's state.
struct Callbacks {
    shared: Arc<Shared>,
}

impl ClientContext for Callbacks {
    /// librdkafka's own lines are detail: what goes wrong also reaches [`Callbacks::error`]
    /// or the poll, which say it once.
    fn log(&self, _level: RDKafkaLogLevel, facility: &str, message: &str) {
        tracing::debug!(
            "kafka source `{}`: {facility}: {message}",
            self.shared.config.name
        );
    }

    /// librdkafka's statistics: the lag of each partition being fetched (`-1` for the others,
    /// which are left out).
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (&partition, p) in &t.partitions {
                if partition >= 0 && p.consumer_lag >= 0 {
                    self.shared
                        .metrics
                        .kafka_lag(&self.shared.label, topic, partition)
                        .set(p.consumer_lag);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.shared.warn_as(
            format!("{:?}", error.rdkafka_error_code()),
            format!(
                "kafka source `{}` (brokers {}): {reason} ({error})",
                self.shared.config.name, self.shared.config.brokers
            ),
        );
    }
}

impl ConsumerContext for Callbacks {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let partitions = partitions(list);
                tracing::info!(
                    "kafka source `{}`: partitions revoked: {}",
                    self.shared.config.name,
                    names(&partitions)
                );
                self.shared.revoke(consumer, partitions);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => self.shared.warn(format!(
                "kafka source `{}`: rebalance failed: {e}",
                self.shared.config.name
            )),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.shared.rebalances.fetch_add(1, Ordering::Relaxed);
        if let Rebalance::Assign(list) = rebalance {
            let assigned = partitions(list);
            tracing::info!(
                "kafka source `{}`: partitions assigned: {}",
                self.shared.config.name,
                names(&assigned)
            );
            let mut owned = lock(&self.shared.assigned);
            owned.extend(assigned);
            owned.sort();
            owned.dedup();
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, list: &TopicPartitionList) {
        if let Err(e) = result {
            let offsets: Vec<(Partition, i64)> = list
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(at) => Some((
                        Partition {
                            topic: e.topic().into(),
                            partition: e.partition(),
                        },
                        at,
                    )),
                    _ => None,
                })
                .collect();
            self.shared.warn(format!(
                "kafka source `{}`: commit of {} failed: {e}; they are committed with the next ones",
                self.shared.config.name,
                describe(&offsets)
            ));
            lock(&self.shared.offsets).commit_failed(&offsets);
        }
    }
}

fn partitions(list: &TopicPartitionList) -> Vec<Partition> {
    list.elements()
        .iter()
        .map(|e| Partition {
            topic: e.topic().into(),
            partition: e.partition(),
        })
        .collect()
}

fn names(partitions: &[Partition]) -> String {
    if partitions.is_empty() {
        return "none".into();
    }
    partitions
        .iter()
        .map(Partition::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe(offsets: &[(Partition, i64)]) -> String {
    offsets
        .iter()
        .map(|(p, at)| format!("{p} at {at}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The checkpoint position key of a partition read by `group`.
fn position_key(group: &str, partition: &Partition) -> String {
    format!("kafka/{group}/{}/{}", partition.topic, partition.partition)
}

/// A record's headers as an event's, or why they cannot be.
fn headers<'m>(message: &'m BorrowedMessage<'_>) -> Result<Vec<(&'m str, &'m [u8])>, String> {
    let mut out = Vec::new();
    let mut list: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: the message pointer is valid while `message` lives; librdkafka sets `list` to
    // the message's own headers (or reports that it has none), which live as long.
    let err = unsafe { rdsys::rd_kafka_message_headers(message.ptr(), &mut list) };
    if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || list.is_null() {
        return Ok(out);
    }
    // SAFETY: `list` is the message's header list (above).
    let count = unsafe { rdsys::rd_kafka_header_cnt(list) };
    for index in 0..count {
        let mut name = std::ptr::null();
        let mut value = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: `index` is below the count; librdkafka points `name` at a NUL-terminated
        // string and `value` at `size` bytes (or null), both owned by the message.
        let err = unsafe {
            rdsys::rd_kafka_header_get_all(list, index, &mut name, &mut value, &mut size)
        };
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            return Err(format!("header {index} cannot be read"));
        }
        // SAFETY: as above.
        let name = unsafe { CStr::from_ptr(name) }
            .to_str()
            .map_err(|_| format!("header {index}'s name is not UTF-8"))?;
        let value: &[u8] = if value.is_null() {
            &[]
        } else {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }
        };
        out.push((name, value));
    }
    Ok(out)
}

/// A batch built and not handed over yet.
struct Ready {
    partition: Partition,
    id: u64,
    next: i64,
    input: Input,
}

/// A partition's records read and not built into a batch yet.
struct Pending<'c> {
    messages: Vec<BorrowedMessage<'c>>,
    /// Their keys' and values' bytes.
    bytes: usize,
    since: Instant,
}

/// What the source thread keeps between polls.
struct Reader<'c> {
    shared: &'c Arc<Shared>,
    consumer: &'c BaseConsumer<Callbacks>,
    /// Batches handed over.
    batches: Counter,
    /// Records skipped because the checkpoint holds them.
    duplicates: Counter,
    pending: BTreeMap<Partition, Pending<'c>>,
    ready: VecDeque<Ready>,
    builder: BatchBuilder,
    /// Where a checkpointed pipeline resumes, by partition.
    resume: HashMap<Partition, i64>,
    /// The topics' names, one allocation each.
    topics: Vec<Arc<str>>,
    next_id: u64,
    /// Whether fetching is paused, and the rebalances seen when it last paused or resumed.
    paused: bool,
    seen_rebalances: u64,
}

impl<'c> Reader<'c> {
    fn run(&mut self) {
        let mut last_commit = Instant::now();
        while !self.shared.stopping.load(Ordering::Acquire) {
            let blocked = !self.hand_over();
            self.pace(blocked);
            let timeout = if blocked { FULL_RETRY } else { self.next_due() };
            match self.consumer.poll(timeout) {
                Some(Ok(message)) => self.take(message),
                // Logged once per kind with the error callback's reports of the same codes.
                Some(Err(e)) => self.shared.warn_as(
                    format!("{:?}", e.rdkafka_error_code()),
                    format!(
                        "kafka source `{}` (topics {}): {e}",
                        self.shared.config.name,
                        self.shared.config.topics.join(", ")
                    ),
                ),
                None => {}
            }
            self.forget_revoked();
            self.build_due(false);
            if last_commit.elapsed() >= COMMIT_EVERY {
                // Completions are applied here, once per commit, not once per record.
                self.shared.drain_done(None);
                self.shared.commit(self.consumer, None, CommitMode::Async);
                last_commit = Instant::now();
            }
        }
        // Read and not handed over: not committed, read again later.
        self.pending.clear();
        self.ready.clear();
        self.finish();
    }

    /// Hands over the batches ready, in order; `false` when the pipeline's queue is full.
    fn hand_over(&mut self) -> bool {
        while let Some(ready) = self.ready.pop_front() {
            let input = lock(&self.shared.input).clone();
            let Ready {
                partition,
                id,
                next,
                input: batch,
            } = ready;
            match input.try_send(batch) {
                Ok(()) => {
                    lock(&self.shared.offsets).handed(&partition, id, next);
                    self.batches.inc();
                }
                Err(batch) => {
                    self.ready.push_front(Ready {
                        partition,
                        id,
                        next,
                        input: batch,
                    });
                    return false;
                }
            }
        }
        true
    }

    /// Pauses fetching while the pipeline is full, resumes once it is not. librdkafka keeps a
    /// partition's pause across a rebalance (given up paused, it comes back paused), so after
    /// any rebalance the whole assignment is paused or resumed again.
    fn pace(&mut self, blocked: bool) {
        let rebalances = self.shared.rebalances.load(Ordering::Relaxed);
        let rebalanced = rebalances != self.seen_rebalances;
        if blocked == self.paused && !rebalanced {
            return;
        }
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let result = if blocked {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        match result {
            Ok(()) => {
                self.paused = blocked;
                self.seen_rebalances = rebalances;
            }
            Err(e) => self.shared.warn(format!(
                "kafka source `{}`: cannot {} fetching: {e}",
                self.shared.config.name,
                if blocked { "pause" } else { "resume" }
            )),
        }
    }

    /// How long the next poll may wait: until the oldest partition's batch is due.
    fn next_due(&self) -> Duration {
        let linger = self.shared.config.linger;
        self.pending
            .values()
            .map(|p| linger.saturating_sub(p.since.elapsed()))
            .min()
            .unwrap_or(IDLE_POLL)
            .min(IDLE_POLL)
    }

    fn take(&mut self, message: BorrowedMessage<'c>) {
        let partition = Partition {
            topic: self.topic(message.topic()),
            partition: message.partition(),
        };
        if !self.resume.is_empty()
            && self
                .resume
                .get(&partition)
                .is_some_and(|at| message.offset() < *at)
        {
            self.next_id += 1;
            lock(&self.shared.offsets).skipped(&partition, self.next_id, message.offset() + 1);
            self.duplicates.inc();
            return;
        }
        let pending = self
            .pending
            .entry(partition.clone())
            .or_insert_with(|| Pending {
                messages: Vec::with_capacity(self.shared.config.batch_events),
                bytes: 0,
                since: Instant::now(),
            });
        pending.bytes += message.payload_len() + message.key().map_or(0, <[u8]>::len);
        pending.messages.push(message);
        if (pending.messages.len() >= self.shared.config.batch_events
            || pending.bytes >= BATCH_BYTES)
            && let Some(pending) = self.pending.remove(&partition)
        {
            self.build(partition, pending.messages);
        }
    }

    /// The source's own copy of a topic's name (records carry it as text: no allocation per
    /// record).
    fn topic(&mut self, name: &str) -> Arc<str> {
        if let Some(topic) = self.topics.iter().find(|t| ***t == *name) {
            return topic.clone();
        }
        let topic: Arc<str> = name.into();
        self.topics.push(topic.clone());
        topic
    }

    /// Drops what was read of partitions revoked meanwhile (their next owner reads it).
    fn forget_revoked(&mut self) {
        let revoked = std::mem::take(&mut *lock(&self.shared.revoked));
        if revoked.is_empty() {
            return;
        }
        for p in &revoked {
            self.shared
                .metrics
                .forget_kafka_lag(&self.shared.label, &p.topic, p.partition);
        }
        self.pending.retain(|p, _| !revoked.contains(p));
        self.ready.retain(|r| !revoked.contains(&r.partition));
    }

    /// Builds the batches whose linger is over (all of them with `all`).
    fn build_due(&mut self, all: bool) {
        let linger = self.shared.config.linger;
        let due: Vec<Partition> = self
            .pending
            .iter()
            .filter(|(_, p)| all || p.since.elapsed() >= linger)
            .map(|(partition, _)| partition.clone())
            .collect();
        for partition in due {
            if let Some(pending) = self.pending.remove(&partition) {
                self.build(partition, pending.messages);
            }
        }
    }

    /// One partition's records as a batch, ready to hand over.
    fn build(&mut self, partition: Partition, messages: Vec<BorrowedMessage<'c>>) {
        let Some(last) = messages.last() else {
            return;
        };
        let next = last.offset() + 1;
        let config = &self.shared.config;
        let mut rejected = Vec::new();
        let mut event_next = Vec::with_capacity(messages.len());
        let now = crate::utc::now_ms();
        for message in &messages {
            let timestamp = message.timestamp().to_millis().unwrap_or(now);
            match headers(message) {
                Ok(headers) => {
                    self.builder.push_parts(
                        message.key(),
                        message.payload().unwrap_or_default(),
                        timestamp,
                        headers,
                        None,
                        0,
                    );
                    event_next.push(u64::try_from(message.offset() + 1).unwrap_or(0));
                }
                Err(problem) => {
                    let mut event = Event::new(message.payload().unwrap_or_default(), timestamp);
                    if let Some(key) = message.key() {
                        event = event.with_key(key);
                    }
                    rejected.push(
                        event
                            .with_header(
                                "weir-error",
                                format!("kafka record cannot be an event: {problem}"),
                            )
                            .with_header("weir-source", config.name.as_str())
                            .with_header("kafka-topic", &*partition.topic)
                            .with_header("kafka-partition", partition.partition.to_string())
                            .with_header("kafka-offset", message.offset().to_string()),
                    );
                }
            }
        }
        // SAFETY: built by a `BatchBuilder`.
        let batch = unsafe { SharedBatch::trusted(self.builder.finish()) };
        self.next_id += 1;
        let id = self.next_id;
        let tx = self.shared.done_tx.clone();
        let done_partition = partition.clone();
        let completion = Completion::new(move |result| {
            let _ = tx.send(Done {
                partition: done_partition,
                id,
                result,
            });
        });
        let position = Position {
            key: position_key(&config.group, &partition).into(),
            next: u64::try_from(next).unwrap_or(0),
        };
        self.ready.push_back(Ready {
            partition,
            id,
            next,
            input: Input {
                batch,
                completion,
                position: Some(position),
                rejected,
                batch_ms: None,
                event_next: Some(event_next),
            },
        });
    }

    /// After the last record taken: waits for the batches in flight (the pipelines are being
    /// stopped, which resolves them) until the router closes the source, then commits what
    /// was accepted. Keeps serving the group meanwhile, fetching nothing.
    fn finish(&mut self) {
        if let Ok(assignment) = self.consumer.assignment() {
            let _ = self.consumer.pause(&assignment);
        }
        while !self.shared.closing.load(Ordering::Acquire)
            && lock(&self.shared.offsets).pending_total() > 0
        {
            self.shared.drain_done(Some(Duration::from_millis(50)));
            // Nothing is fetched (paused); records already read are dropped uncommitted.
            let _ = self.consumer.poll(Duration::ZERO);
        }
        self.shared.drain_done(None);
        self.shared.commit(self.consumer, None, CommitMode::Sync);
    }
}

/// A running Kafka source.
pub struct KafkaSource {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("name", &self.shared.config.name)
            .finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// Creates the consumer (librdkafka checks the settings), subscribes and starts the
    /// source's thread; it joins the group and reads from there. `positions` are the
    /// pipeline's checkpointed positions (the source takes its own).
    pub fn start(
        config: &KafkaSourceConfig,
        input: PipelineInput,
        positions: &[Position],
        metrics: &Arc<Metrics>,
    ) -> Result<KafkaSource> {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            config: config.clone(),
            input: Mutex::new(input),
            stopping: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            offsets: Mutex::new(Offsets::default()),
            done_tx,
            done_rx: Mutex::new(done_rx),
            revoked: Mutex::new(Vec::new()),
            rebalances: AtomicU64::new(0),
            last_log: Mutex::new(HashMap::new()),
            metrics: metrics.clone(),
            label: format!("kafka/{}", config.name),
            assigned: Mutex::new(Vec::new()),
        });
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group)
            .set("client.id", format!("weir-{}", config.name))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", config.start.as_str())
            .set("statistics.interval.ms", LAG_EVERY.as_millis().to_string());
        for (key, value) in &config.properties {
            client.set(key, value);
        }
        let consumer: BaseConsumer<Callbacks> = client
            .create_with_context(Callbacks {
                shared: shared.clone(),
            })
            .map_err(|e| anyhow!("kafka source `{}`: {e}", config.name))?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|e| {
            anyhow!(
                "kafka source `{}`: cannot subscribe to {}: {e}",
                config.name,
                topics.join(", ")
            )
        })?;
        let prefix = format!("kafka/{}/", config.group);
        let resume: HashMap<Partition, i64> = positions
            .iter()
            .filter_map(|p| {
                let rest = p.key.strip_prefix(&prefix)?;
                let (topic, partition) = rest.rsplit_once('/')?;
                Some((
                    Partition {
                        topic: topic.into(),
                        partition: partition.parse().ok()?,
                    },
                    i64::try_from(p.next).ok()?,
                ))
            })
            .collect();
        let thread_shared = shared.clone();
        let batches = metrics.source(&shared.label).batches_received;
        let duplicates = metrics.pipeline(&config.pipeline).duplicates_dropped;
        let thread = std::thread::Builder::new()
            .name(format!("kafka-{}", config.name))
            .spawn(move || {
                let mut reader = Reader {
                    shared: &thread_shared,
                    consumer: &consumer,
                    batches,
                    duplicates,
                    pending: BTreeMap::new(),
                    ready: VecDeque::new(),
                    builder: BatchBuilder::new(),
                    resume,
                    topics: Vec::new(),
                    next_id: 0,
                    paused: false,
                    seen_rebalances: 0,
                };
                reader.run();
                drop(reader);
                // Leaves the group (its revoke commits nothing new) and closes.
                drop(consumer);
            })
            .with_context(|| format!("kafka source `{}`: cannot start its thread", config.name))?;
        tracing::info!(
            "kafka source `{}`: consuming {} from {} as group `{}` into pipeline `{}`",
            config.name,
            config.topics.join(", "),
            config.brokers,
            config.group,
            config.pipeline
        );
        Ok(KafkaSource {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The source's name.
    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// The pipeline it feeds.
    pub fn pipeline(&self) -> &str {
        &self.shared.config.pipeline
    }

    /// What it reads, what it handed over, and the partitions it owns with their lag, as the
    /// metrics have them.
    pub fn status(&self) -> SourceStatus {
        let config = &self.shared.config;
        let metrics = &self.shared.metrics;
        SourceStatus {
            name: config.name.clone(),
            describe: format!(
                "kafka {} topics {} as group {}",
                config.brokers,
                config.topics.join(","),
                config.group
            ),
            pipeline: config.pipeline.clone(),
            batches: metrics.source(&self.shared.label).batches_received.get(),
            partitions: lock(&self.shared.assigned)
                .iter()
                .map(|p| PartitionStatus {
                    topic: p.topic.to_string(),
                    partition: p.partition,
                    lag: metrics
                        .kafka_lag(&self.shared.label, &p.topic, p.partition)
                        .get(),
                })
                .collect(),
        }
    }

    /// The pipeline was restarted: its batches go to `input` from now on.
    pub fn restart(&self, input: PipelineInput) {
        *lock(&self.shared.input) = input;
    }

    /// Takes no record from now on (what was read and not handed over is read again later).
    pub fn stop_reading(&self) {
        self.shared.stopping.store(true, Ordering::Release);
    }

    /// After the pipelines stopped: commits what the sinks accepted, leaves the group and
    /// waits for the source's thread.
    pub async fn close(&self) {
        self.stop_reading();
        self.shared.closing.store(true, Ordering::Release);
        let thread = lock(&self.thread).take();
        if let Some(thread) = thread {
            let name = self.shared.config.name.clone();
            if let Ok(Err(_)) = tokio::task::spawn_blocking(move || thread.join()).await {
                tracing::error!("kafka source `{name}`: its thread panicked");
            }
        }
    }
}
