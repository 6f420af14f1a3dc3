//! A sink's runner: its bounded buffer, its `when_full` policy, the disk spill, retries with
//! backoff, and dead letters for refused events.
//!
//! Pipelines [`Sink::offer`] deliveries on their own threads; one tokio task per sink
//! ([`Sink::run`]) takes them out in order, at most `batch_events` events per send, and hands
//! them to the [`Destination`]. What "accepted" means, which is when a producer's batch may be
//! acked, depends on the policy (docs/SINKS.md):
//!
//! | `when_full`   | accepted when                          | buffer full                     |
//! | ------------- | -------------------------------------- | ------------------------------- |
//! | `block`       | delivered to the destination           | the pipeline waits              |
//! | `drop_newest` | in the memory buffer                   | the new events are dropped      |
//! | `drop_oldest` | in the memory buffer                   | the oldest waiting are dropped  |
//! | `spill`       | written and synced to the disk buffer  | the pipeline waits (disk full)  |
//!
//! A `block` delivery carries the pipeline round's [`Ticket`], which counts the round's
//! deliveries not accepted yet; the sink's task marks each done once delivered, and the last
//! one resolves the round (its callback queues the acks). `drop_*` deliveries are accepted at once: a crash loses what
//! is buffered, and a dead destination loses what does not fit, counted in the sink's
//! `dropped` metric. `spill` writes every delivery to the disk log (`spill.rs`) and the task
//! delivers from there, so a restart replays what was not delivered, in order.
//!
//! Retries: a [`SendError::Retry`] is retried forever with exponential backoff (the buffer
//! policy decides what happens to new events meanwhile); once the router is stopping, a few
//! attempts, then what is left is reported. A [`SendError::Reject`] is bisected until the
//! refused events are alone, and each is sent to its pipeline's dead-letter sink with headers
//! naming the error and the sink.

use super::spill::{SpillLog, SpillRecord};
use super::{Destination, Outgoing, Selection, SendError, SharedBatch};
use crate::metrics::SinkMetrics;
use arc_swap::ArcSwap;
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use weir_format::{BatchBuilder, EventRef};

/// What a sink does when its buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Accepted once delivered: the pipeline, and so its producers, go at the sink's pace, and
    /// a dead destination stops the pipeline until it is back. Nothing is lost (the default).
    Block,
    /// Drop the events that do not fit (counted).
    DropNewest,
    /// Drop the oldest buffered events to make room (counted).
    DropOldest,
    /// Write to a disk buffer under the data directory that survives a restart and is
    /// replayed in order; blocks only when the disk buffer is full.
    Spill,
}

impl WhenFull {
    /// The name used in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            WhenFull::Block => "block",
            WhenFull::DropNewest => "drop_newest",
            WhenFull::DropOldest => "drop_oldest",
            WhenFull::Spill => "spill",
        }
    }
}

/// A sink's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferConfig {
    /// The policy when the buffer is full.
    pub when_full: WhenFull,
    /// Most events buffered in memory.
    pub max_events: usize,
    /// Most bytes buffered in memory.
    pub max_bytes: usize,
    /// Most bytes in the disk buffer (`spill`).
    pub spill_bytes: u64,
    /// Most events handed to the destination in one send.
    pub batch_events: usize,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            when_full: WhenFull::Block,
            max_events: 10_000,
            max_bytes: 16 << 20,
            spill_bytes: 1 << 30,
            batch_events: 1000,
        }
    }
}

/// Retries of a failing destination: exponential backoff from `initial` to `max`, forever
/// (a destination that is down is waited for; its buffer's policy decides what happens to
/// new events meanwhile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    /// The first wait.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// Attempts at a failing send once the router is stopping.
const SHUTDOWN_ATTEMPTS: u32 = 3;
/// How long a pipeline waits for room in a full sink before it is worth a warning.
const SLOW_WAIT: Duration = Duration::from_secs(1);
/// How long a pipeline waits for room in a full `block` sink once the router is stopping.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);
/// The longest backoff between attempts once the router is stopping.
const SHUTDOWN_RETRY_WAIT: Duration = Duration::from_secs(1);
/// Records read from the disk buffer at a time.
const SPILL_READ: usize = 64;
/// Segment size of disk buffers.
const SPILL_SEGMENT_BYTES: u64 = 64 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single step: a poisoned lock's data is consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a [`Ticket`] calls once it is resolved: `Ok` when every delivery was accepted, `Err`
/// with the reason when one never will be.
pub type OnResolved = Box<dyn FnOnce(Result<(), String>) + Send>;

/// The deliveries of one pipeline round that are not accepted yet, and what to do once they
/// are.
///
/// A round offers its deliveries (each `block` delivery adds one to the ticket), then
/// [`Ticket::seal`]s it with a callback. The callback runs once, on whichever thread resolves
/// the ticket: the sink task that completes the last delivery, a sink task that gives up
/// ([`Ticket::fail`]), or the sealing thread itself when nothing is pending. No thread waits
/// or polls for it.
#[derive(Default)]
pub struct Ticket {
    state: Mutex<TicketState>,
    resolved: Condvar,
}

#[derive(Default)]
struct TicketState {
    pending: usize,
    sealed: bool,
    /// Why the round will never be accepted (a sink gave up, or the router stopped waiting).
    failed: Option<String>,
    /// Set once the outcome is decided (the callback taken to be run).
    resolved: bool,
    /// Set once the callback returned: what waiters wait for, so that they see its effects.
    finished: bool,
    on_resolved: Option<OnResolved>,
}

impl TicketState {
    /// The callback and its argument, when the ticket can be resolved now.
    fn resolve(&mut self) -> Option<(OnResolved, Result<(), String>)> {
        if self.resolved || !self.sealed {
            return None;
        }
        let result = match &self.failed {
            Some(reason) => Err(reason.clone()),
            None if self.pending == 0 => Ok(()),
            None => return None,
        };
        self.resolved = true;
        let callback = self.on_resolved.take().unwrap_or_else(|| Box::new(|_| {}));
        Some((callback, result))
    }
}

impl Ticket {
    /// A ticket with nothing pending, not sealed.
    pub fn new() -> Arc<Ticket> {
        Arc::new(Ticket::default())
    }

    fn add(&self) {
        lock(&self.state).pending += 1;
    }

    fn update(&self, f: impl FnOnce(&mut TicketState)) {
        let mut state = lock(&self.state);
        f(&mut state);
        let fire = state.resolve();
        drop(state);
        // Outside the lock: the callback may take other locks (a source's acks).
        if let Some((callback, result)) = fire {
            callback(result);
            lock(&self.state).finished = true;
            self.resolved.notify_all();
        }
    }

    fn done(&self) {
        self.update(|s| s.pending = s.pending.saturating_sub(1));
    }

    /// The round will never be accepted: resolves it with `reason` (the first reason given
    /// wins), once sealed.
    pub fn fail(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.update(|s| {
            s.failed.get_or_insert(reason);
        });
    }

    /// No more deliveries will be added: `on_resolved` runs once every delivery is accepted
    /// (now, if none is pending) or once the ticket fails.
    pub fn seal(&self, on_resolved: impl FnOnce(Result<(), String>) + Send + 'static) {
        self.update(|s| {
            s.sealed = true;
            s.on_resolved = Some(Box::new(on_resolved));
        });
    }

    /// Whether the ticket was resolved (its callback ran).
    pub fn is_resolved(&self) -> bool {
        lock(&self.state).finished
    }

    /// Waits until the ticket is resolved (its callback ran) or `deadline` passes; whether it
    /// was resolved.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let mut state = lock(&self.state);
        while !state.finished {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .resolved
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

struct Queued {
    out: Outgoing,
    bytes: usize,
    ticket: Option<Arc<Ticket>>,
    since: Instant,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    events: usize,
    bytes: usize,
    /// Items at the front of `queue` being sent (never dropped by `drop_oldest`).
    in_flight: usize,
    /// No more offers: deliver what is left and stop.
    closed: bool,
}

/// What a reload may change of a running sink without replacing it.
struct Settings {
    /// What it delivers to.
    describe: String,
    /// Its buffer (`when_full` never changes: another policy is another sink).
    buffer: BufferConfig,
    /// Its retries.
    retry: RetryConfig,
}

/// A sink shared by the pipelines that write to it.
pub(crate) struct Sink {
    name: String,
    settings: ArcSwap<Settings>,
    /// A destination to deliver to from the next send on (a reload changed the sink).
    replacement: Mutex<Option<Box<dyn Destination>>>,
    state: Mutex<State>,
    room: Condvar,
    wake: Notify,
    spill: Option<SpillLog>,
    metrics: SinkMetrics,
    stopping: AtomicBool,
    /// When the router began stopping: waits for room end [`SHUTDOWN_WAIT`] after it.
    stopping_since: OnceLock<Instant>,
    /// The task gave up on its destination (while stopping): offers are refused at once.
    gave_up: AtomicBool,
    /// Wakes the task out of a backoff wait when the router begins stopping.
    halt: Notify,
    /// Each pipeline's dead-letter sink, for events the destination refuses.
    dead_letters: Mutex<HashMap<Arc<str>, Arc<Sink>>>,
}

/// What one send takes out of the buffer.
struct Taken {
    outs: Vec<Outgoing>,
    tickets: Vec<Arc<Ticket>>,
    since: Vec<Instant>,
    /// Memory items, or disk records, to remove once delivered.
    count: usize,
}

impl Sink {
    /// A sink named `name` delivering to a destination described as `describe`; `spill_dir`
    /// holds its disk buffer when the policy is `spill`.
    pub fn new(
        name: &str,
        describe: String,
        buffer: BufferConfig,
        retry: RetryConfig,
        spill_dir: &std::path::Path,
        metrics: SinkMetrics,
    ) -> Result<Arc<Sink>, String> {
        let spill = match buffer.when_full {
            WhenFull::Spill => Some(
                SpillLog::open(spill_dir, SPILL_SEGMENT_BYTES)
                    .map_err(|e| format!("sink `{name}`: disk buffer: {e}"))?,
            ),
            _ => None,
        };
        if let Some(spill) = &spill {
            metrics.spill_bytes.set(spill.bytes() as i64);
            if spill.records() > 0 {
                tracing::info!(
                    "sink `{name}`: {} events from before the restart wait in {}; delivering them first",
                    spill.events(),
                    spill_dir.display()
                );
            }
        }
        Ok(Arc::new(Sink {
            name: name.to_owned(),
            settings: ArcSwap::from_pointee(Settings {
                describe,
                buffer,
                retry,
            }),
            replacement: Mutex::new(None),
            state: Mutex::new(State::default()),
            room: Condvar::new(),
            wake: Notify::new(),
            spill,
            metrics,
            stopping: AtomicBool::new(false),
            stopping_since: OnceLock::new(),
            gave_up: AtomicBool::new(false),
            halt: Notify::new(),
            dead_letters: Mutex::new(HashMap::new()),
        }))
    }

    /// The sink's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What it delivers to.
    pub fn describe(&self) -> String {
        self.settings.load().describe.clone()
    }

    /// Its buffer config.
    pub fn buffer(&self) -> BufferConfig {
        self.settings.load().buffer
    }

    fn retry(&self) -> RetryConfig {
        self.settings.load().retry
    }

    /// From the next send on, delivers to `destination` with these buffer limits and retries
    /// (a reload changed the sink; its policy is the same). What is buffered stays buffered and
    /// goes to the new destination; a send under way finishes, and a backoff is cut short.
    pub fn reconfigure(
        &self,
        destination: Box<dyn Destination>,
        buffer: BufferConfig,
        retry: RetryConfig,
    ) {
        self.settings.store(Arc::new(Settings {
            describe: destination.describe(),
            buffer,
            retry,
        }));
        *lock(&self.replacement) = Some(destination);
        // Larger limits may let a waiting pipeline in; a backoff ends for the new destination.
        self.room.notify_all();
        self.halt.notify_waiters();
        self.wake.notify_one();
    }

    /// Its metrics.
    pub fn metrics(&self) -> &SinkMetrics {
        &self.metrics
    }

    /// Where events of `pipeline` that the destination refuses go.
    pub fn set_dead_letters(&self, pipeline: Arc<str>, sink: Arc<Sink>) {
        lock(&self.dead_letters).insert(pipeline, sink);
    }

    /// Whether events this sink's destination refuses may go to `sink`.
    pub fn dead_letters_to(&self, sink: &Arc<Sink>) -> bool {
        lock(&self.dead_letters)
            .values()
            .any(|target| Arc::ptr_eq(target, sink))
    }

    /// The router is stopping: failing sends and full buffers give up after a few attempts.
    pub fn stopping(&self) {
        self.stopping_since.get_or_init(Instant::now);
        self.stopping.store(true, Ordering::Release);
        self.room.notify_all();
        self.halt.notify_waiters();
    }

    /// Completes `wait` after the router began stopping (never, while it runs).
    async fn stopping_for(&self, wait: Duration) {
        loop {
            let halted = self.halt.notified();
            tokio::pin!(halted);
            halted.as_mut().enable();
            if let Some(since) = self.stopping_since.get() {
                tokio::time::sleep_until((*since + wait).into()).await;
                return;
            }
            halted.await;
        }
    }

    /// Why nothing would deliver a memory-buffered offer now: the sink is closed (a dead
    /// letter from a sink still draining at shutdown) or its task gave up.
    fn refusal(&self, state: &State, out: &Outgoing) -> Result<(), String> {
        if state.closed || self.gave_up.load(Ordering::Acquire) {
            return Err(format!(
                "sink `{}` no longer delivers to {}; {} events of pipeline `{}` not accepted",
                self.name,
                self.describe(),
                out.len(),
                out.pipeline()
            ));
        }
        Ok(())
    }

    /// No more offers: the task delivers what is buffered (a disk buffer stays for the next
    /// start if its destination is down) and ends.
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.wake.notify_one();
    }

    /// Takes a delivery, as the policy says (the module doc). A `block` delivery adds to
    /// `ticket`, done once delivered. `Err` when the sink cannot take it (the router is
    /// stopping and the buffer stayed full, or nothing delivers any more): the delivery is not
    /// accepted (its batch must not be acked).
    pub fn offer(&self, out: Outgoing, ticket: &Arc<Ticket>) -> Result<(), String> {
        if out.is_empty() {
            return Ok(());
        }
        let events = out.len();
        if let Some(spill) = &self.spill {
            return self.offer_spill(spill, out);
        }
        let bytes = out.approx_bytes();
        let mut state = lock(&self.state);
        self.refusal(&state, &out)?;
        let fits = |s: &State| {
            s.queue.is_empty()
                || (s.events + events <= self.buffer().max_events
                    && s.bytes + bytes <= self.buffer().max_bytes)
        };
        match self.buffer().when_full {
            WhenFull::Block => {
                state = self.wait_for_room(
                    state,
                    |s| !fits(s),
                    |s| format!("buffer full ({} events, {} bytes)", s.events, s.bytes),
                    &out,
                )?;
                ticket.add();
                self.push(&mut state, out, bytes, Some(ticket.clone()));
            }
            WhenFull::DropNewest => {
                if fits(&state) {
                    self.push(&mut state, out, bytes, None);
                } else {
                    self.metrics.events_in.inc_by(events as u64);
                    self.metrics.dropped.inc_by(events as u64);
                }
            }
            // (`spill` never gets here: it returned above.)
            WhenFull::DropOldest | WhenFull::Spill => {
                // Evict only if that makes room: the events being sent stay.
                let (sending_events, sending_bytes) = state
                    .queue
                    .iter()
                    .take(state.in_flight)
                    .fold((0, 0), |(e, b), q| (e + q.out.len(), b + q.bytes));
                let room = state.in_flight == 0
                    || (sending_events + events <= self.buffer().max_events
                        && sending_bytes + bytes <= self.buffer().max_bytes);
                while room && !fits(&state) && state.queue.len() > state.in_flight {
                    let index = state.in_flight;
                    if let Some(old) = state.queue.remove(index) {
                        state.events -= old.out.len();
                        state.bytes -= old.bytes;
                        self.metrics.dropped.inc_by(old.out.len() as u64);
                    }
                }
                if fits(&state) {
                    self.push(&mut state, out, bytes, None);
                } else {
                    // Everything buffered is being sent: the new events are the oldest left.
                    self.metrics.events_in.inc_by(events as u64);
                    self.metrics.dropped.inc_by(events as u64);
                }
            }
        }
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// Waits while `full`: a pipeline held back by this sink. Warns once the destination has
    /// delivered nothing for [`SLOW_WAIT`] of the wait (a sink that sets the pace, delivering
    /// as fast as it can, is normal backpressure, not news); once the router is stopping,
    /// gives up [`SHUTDOWN_WAIT`] after it began (one deadline for every wait, not one per
    /// offer: a worker's queue may hold a thousand batches).
    fn wait_for_room<'s>(
        &self,
        mut state: MutexGuard<'s, State>,
        full: impl Fn(&State) -> bool,
        describe: impl Fn(&State) -> String,
        out: &Outgoing,
    ) -> Result<MutexGuard<'s, State>, String> {
        let started = Instant::now();
        let mut warned = false;
        // Since when the destination has delivered nothing.
        let mut stalled = (started, self.metrics.events_out.get());
        while full(&state) {
            let delivered = self.metrics.events_out.get();
            if delivered != stalled.1 {
                stalled = (Instant::now(), delivered);
            }
            let waited = started.elapsed();
            if !warned && stalled.0.elapsed() >= SLOW_WAIT {
                warned = true;
                tracing::warn!(
                    "sink `{}`: {}: its pipelines have waited {waited:?} for {} (when_full = {})",
                    self.name,
                    describe(&state),
                    self.describe(),
                    self.buffer().when_full.as_str()
                );
            }
            let past_deadline = self
                .stopping_since
                .get()
                .is_some_and(|since| since.elapsed() >= SHUTDOWN_WAIT);
            if past_deadline {
                return Err(format!(
                    "sink `{}`: {} and {} not taking events; {} events of pipeline `{}` not accepted",
                    self.name,
                    describe(&state),
                    self.describe(),
                    out.len(),
                    out.pipeline()
                ));
            }
            state = self
                .room
                .wait_timeout(state, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(state)
    }

    fn push(&self, state: &mut State, out: Outgoing, bytes: usize, ticket: Option<Arc<Ticket>>) {
        self.metrics.events_in.inc_by(out.len() as u64);
        state.events += out.len();
        state.bytes += bytes;
        state.queue.push_back(Queued {
            out,
            bytes,
            ticket,
            since: Instant::now(),
        });
        self.metrics.buffer_events.set(state.events as i64);
        self.metrics.buffer_bytes.set(state.bytes as i64);
    }

    fn offer_spill(&self, spill: &SpillLog, out: Outgoing) -> Result<(), String> {
        // (A disk buffer takes events even once closed or given up: they wait for the next start.)
        let state = lock(&self.state);
        let full = |_: &State| spill.bytes() >= self.buffer().spill_bytes;
        let describe = |_: &State| {
            format!(
                "disk buffer full ({} bytes, spill_bytes = {})",
                spill.bytes(),
                self.buffer().spill_bytes
            )
        };
        drop(self.wait_for_room(state, full, describe, &out)?);
        let encoded;
        let bytes = match out.selection() {
            Selection::All => out.shared().bytes(),
            Selection::Some(_) => {
                encoded = encode(out.events());
                &encoded
            }
        };
        let mut attempt: u32 = 0;
        loop {
            match spill.append(out.pipeline(), out.len() as u32, bytes) {
                Ok(()) => break,
                Err(e) => {
                    attempt += 1;
                    let message =
                        format!("sink `{}`: cannot write the disk buffer: {e}", self.name);
                    if self.stopping.load(Ordering::Acquire) && attempt >= SHUTDOWN_ATTEMPTS {
                        return Err(message);
                    }
                    tracing::error!("{message} (attempt {attempt}; the pipeline waits)");
                    std::thread::sleep(backoff(&self.retry(), attempt));
                }
            }
        }
        self.metrics.events_in.inc_by(out.len() as u64);
        self.metrics.spill_bytes.set(spill.bytes() as i64);
        self.wake.notify_one();
        Ok(())
    }

    /// Makes every record appended to the disk buffer so far durable, whoever appended it
    /// (called before a round's acks). The log's writer lock orders it after any sync under
    /// way, and it costs nothing when nothing is unsynced.
    pub fn sync(&self) -> Result<(), String> {
        let Some(spill) = &self.spill else {
            return Ok(());
        };
        spill
            .sync()
            .map_err(|e| format!("sink `{}`: cannot sync the disk buffer: {e}", self.name))
    }

    /// Delivers until closed; returns what could not be delivered.
    pub async fn run(self: Arc<Self>, mut destination: Box<dyn Destination>) -> Vec<String> {
        let mut problems = Vec::new();
        loop {
            let Some(taken) = self.take().await else {
                break;
            };
            let delivered = self.deliver(&mut destination, taken.outs.clone()).await;
            if let Err(last) = delivered {
                // From here on offers are refused (under the state lock), so `left` is final.
                self.gave_up.store(true, Ordering::Release);
                let left = self.left();
                let message = match &self.spill {
                    Some(_) => format!(
                        "{last}; {left} events stay in the disk buffer of sink `{}` and are delivered after the next start",
                        self.name
                    ),
                    None => format!(
                        "{last}; {left} buffered events of sink `{}` not delivered",
                        self.name
                    ),
                };
                tracing::error!("{message}");
                problems.push(message);
                // Rounds waiting for these deliveries are not accepted: resolve them now.
                let tickets: Vec<Arc<Ticket>> = lock(&self.state)
                    .queue
                    .iter()
                    .filter_map(|q| q.ticket.clone())
                    .collect();
                for ticket in tickets {
                    ticket.fail(format!(
                        "sink `{}` gave up delivering to {}",
                        self.name,
                        self.describe()
                    ));
                }
                break;
            }
            self.complete(taken, &mut problems).await;
        }
        if let Err(e) = destination.close().await {
            problems.push(format!(
                "sink `{}`: closing {}: {e}",
                self.name,
                self.describe()
            ));
        }
        problems
    }

    /// Events buffered now (memory or disk).
    pub fn buffered(&self) -> u64 {
        self.left()
    }

    /// Events still buffered (memory or disk).
    fn left(&self) -> u64 {
        match &self.spill {
            Some(spill) => spill.events(),
            None => lock(&self.state).events as u64,
        }
    }

    /// The next deliveries, in order; `None` once closed and (for memory) empty. A disk
    /// buffer is left as it is at close: it is replayed at the next start.
    async fn take(self: &Arc<Self>) -> Option<Taken> {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.spill.is_some() {
                // Disk reads: off the async workers.
                let me = Arc::clone(self);
                let read = tokio::task::spawn_blocking(move || {
                    me.spill.as_ref().map_or(Ok(Vec::new()), |spill| {
                        spill.peek(SPILL_READ, me.buffer().batch_events as u64)
                    })
                })
                .await;
                let read: Result<Vec<SpillRecord>, String> = match read {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match read {
                    Ok(records) if !records.is_empty() => {
                        return Some(self.take_records(records));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(
                            "sink `{}`: cannot read the disk buffer: {e} (retrying)",
                            self.name
                        );
                        tokio::time::sleep(backoff(&self.retry(), 5)).await;
                        continue;
                    }
                }
                if lock(&self.state).closed {
                    return None;
                }
            } else {
                let mut state = lock(&self.state);
                if !state.queue.is_empty() {
                    let mut taken = Taken {
                        outs: Vec::new(),
                        tickets: Vec::new(),
                        since: Vec::new(),
                        count: 0,
                    };
                    let mut events = 0;
                    for q in &state.queue {
                        if taken.count > 0 && events + q.out.len() > self.buffer().batch_events {
                            break;
                        }
                        events += q.out.len();
                        taken.outs.push(q.out.clone());
                        taken.tickets.extend(q.ticket.clone());
                        taken.since.push(q.since);
                        taken.count += 1;
                    }
                    state.in_flight = taken.count;
                    return Some(taken);
                }
                if state.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Disk records as deliveries, up to `batch_events` events (at least one record).
    fn take_records(&self, records: Vec<SpillRecord>) -> Taken {
        let mut taken = Taken {
            outs: Vec::new(),
            tickets: Vec::new(),
            since: Vec::new(),
            count: 0,
        };
        let mut events = 0;
        let now = Instant::now();
        for record in records {
            if taken.count > 0 && events + record.events as usize > self.buffer().batch_events {
                break;
            }
            events += record.events as usize;
            taken.count += 1;
            match SharedBatch::verify(record.batch) {
                Ok(batch) => {
                    taken
                        .outs
                        .push(Outgoing::all(batch, Arc::from(record.pipeline.as_str())));
                    taken.since.push(now);
                }
                // The record's checksum matched, so this is a bug, not a torn write; the
                // events cannot be read to dead-letter them.
                Err(e) => tracing::error!(
                    "sink `{}`: a disk buffer record of pipeline `{}` ({} events) does not hold a valid batch and is skipped: {e}",
                    self.name,
                    record.pipeline,
                    record.events
                ),
            }
        }
        taken
    }

    /// Sends with retries and bisection of refused parts, until everything is delivered or
    /// dead-lettered; `Err` with the last error when it gave up (only while stopping).
    async fn deliver(
        &self,
        destination: &mut Box<dyn Destination>,
        outs: Vec<Outgoing>,
    ) -> Result<(), String> {
        let mut work: VecDeque<Vec<Outgoing>> = VecDeque::from([outs]);
        let mut attempt: u32 = 0;
        while let Some(part) = work.front() {
            let events: usize = part.iter().map(Outgoing::len).sum();
            if events == 0 {
                work.pop_front();
                continue;
            }
            if self.switch(destination).await {
                attempt = 0;
            }
            let started = Instant::now();
            let result = destination.send(part).await;
            self.metrics
                .send_latency
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => {
                    self.metrics.events_out.inc_by(events as u64);
                    if attempt > 0 {
                        tracing::info!(
                            "sink `{}`: {} takes events again (after {attempt} failed attempts)",
                            self.name,
                            self.describe()
                        );
                    }
                    attempt = 0;
                    work.pop_front();
                }
                Err(SendError::Retry(message)) => {
                    self.metrics.errors.inc();
                    attempt += 1;
                    if self.stopping.load(Ordering::Acquire) && attempt >= SHUTDOWN_ATTEMPTS {
                        return Err(message);
                    }
                    let wait = backoff(&self.retry(), attempt);
                    if attempt == 1 || attempt.is_power_of_two() {
                        tracing::warn!(
                            "{message} (attempt {attempt}; retrying in {wait:?}; {} events buffered)",
                            self.left()
                        );
                    }
                    // Stopping cuts a long backoff short.
                    let halted = self.halt.notified();
                    tokio::pin!(halted);
                    halted.as_mut().enable();
                    let wait = if self.stopping.load(Ordering::Acquire) {
                        wait.min(SHUTDOWN_RETRY_WAIT)
                    } else {
                        wait
                    };
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = halted => {}
                    }
                }
                Err(SendError::Reject(message)) => {
                    self.metrics.errors.inc();
                    let Some(part) = work.pop_front() else {
                        break;
                    };
                    if events == 1 {
                        self.dead_letter(&part, &message).await?;
                    } else if part.len() > 1 {
                        let mut first = part;
                        let second = first.split_off(first.len() / 2);
                        work.push_front(second);
                        work.push_front(first);
                    } else if let Some((a, b)) = part[0].split() {
                        work.push_front(vec![b]);
                        work.push_front(vec![a]);
                    }
                }
            }
        }
        Ok(())
    }

    /// Takes the destination a reload gave the sink, if any, closing the one it replaces;
    /// whether it did.
    async fn switch(&self, destination: &mut Box<dyn Destination>) -> bool {
        let Some(replacement) = lock(&self.replacement).take() else {
            return false;
        };
        let mut old = std::mem::replace(destination, replacement);
        if let Err(e) = old.close().await {
            tracing::warn!(
                "sink `{}`: closing {} after a reload: {e}",
                self.name,
                old.describe()
            );
        }
        tracing::info!(
            "sink `{}`: delivers to {} from now on",
            self.name,
            destination.describe()
        );
        true
    }

    /// Sends refused events to their pipeline's dead-letter sink.
    async fn dead_letter(&self, part: &[Outgoing], message: &str) -> Result<(), String> {
        for out in part {
            let events = out.len() as u64;
            let target = lock(&self.dead_letters).get(out.pipeline_name()).cloned();
            let Some(target) = target else {
                tracing::error!(
                    "{message}: {events} events of pipeline `{}` refused, and the pipeline has no dead-letter sink in this run; they are lost",
                    out.pipeline()
                );
                continue;
            };
            tracing::warn!(
                "{message}: {events} events of pipeline `{}` sent to dead-letter sink `{}`",
                out.pipeline(),
                target.name
            );
            let mut builder = BatchBuilder::new();
            let extra = [
                ("weir-error", message.as_bytes()),
                ("weir-sink", self.name.as_bytes()),
            ];
            for event in out.events() {
                builder.push_parts(
                    event.key(),
                    event.value(),
                    event.timestamp_ms(),
                    event.headers().chain(extra),
                    event.route(),
                    0,
                );
            }
            // SAFETY: built by BatchBuilder.
            let batch = unsafe { SharedBatch::trusted(builder.finish()) };
            let letter = Outgoing::all(batch, out.pipeline_name().clone());
            // The send counts as done (its round acked, its disk records committed) only once
            // the dead-letter sink accepted the letters. `offer` may block while the sink is
            // full, and `sync` writes to disk: off the async workers. Then the ticket tells.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let waiting = target.clone();
            let offered = tokio::task::spawn_blocking(move || {
                let ticket = Ticket::new();
                target.offer(letter, &ticket)?;
                target.sync()?;
                ticket.seal(move |result| {
                    // The sender waits below; if it stopped waiting, nobody needs to know.
                    let _ = tx.send(result);
                });
                Ok::<(), String>(())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            let accepted = match offered {
                Err(e) => Err(e),
                Ok(()) => tokio::select! {
                    result = rx => result.unwrap_or_else(|_| {
                        Err(format!("dead-letter sink `{}` dropped them", waiting.name))
                    }),
                    () = waiting.stopping_for(SHUTDOWN_WAIT) => Err(format!(
                        "dead-letter sink `{}` did not accept them in time",
                        waiting.name
                    )),
                },
            };
            accepted.map_err(|e| {
                format!(
                    "{message}; its {events} events of pipeline `{}` were not dead-lettered: {e}",
                    out.pipeline()
                )
            })?;
            self.metrics.dead_lettered.inc_by(events);
        }
        Ok(())
    }

    /// Removes delivered deliveries from the buffer and completes their tickets.
    async fn complete(self: &Arc<Self>, taken: Taken, problems: &mut Vec<String>) {
        let now = Instant::now();
        for since in &taken.since {
            self.metrics
                .latency
                .observe(now.duration_since(*since).as_secs_f64());
        }
        if let Some(spill) = &self.spill {
            // A cursor write and maybe a segment deletion: off the async workers.
            let me = Arc::clone(self);
            let count = taken.count;
            let committed = tokio::task::spawn_blocking(move || {
                me.spill
                    .as_ref()
                    .map_or(Ok(()), |spill| spill.commit(count))
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            if let Err(e) = committed {
                let message = format!(
                    "sink `{}`: cannot record delivered events in the disk buffer (they will be delivered again after a restart): {e}",
                    self.name
                );
                tracing::error!("{message}");
                problems.push(message);
            }
            self.metrics.spill_bytes.set(spill.bytes() as i64);
        } else {
            let mut state = lock(&self.state);
            for _ in 0..taken.count {
                if let Some(q) = state.queue.pop_front() {
                    state.events -= q.out.len();
                    state.bytes -= q.bytes;
                }
            }
            state.in_flight = 0;
            self.metrics.buffer_events.set(state.events as i64);
            self.metrics.buffer_bytes.set(state.bytes as i64);
        }
        self.room.notify_all();
        for ticket in taken.tickets {
            ticket.done();
        }
    }
}

/// A batch of the given events.
fn encode<'a>(events: impl Iterator<Item = EventRef<'a>>) -> Vec<u8> {
    let mut builder = BatchBuilder::new();
    for event in events {
        builder.push_ref(&event, 0);
    }
    builder.finish()
}

/// The wait before attempt `attempt + 1`: `initial × 2^(attempt − 1)`, at most `max`.
fn backoff(retry: &RetryConfig, attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(20);
    retry.initial.saturating_mul(factor).min(retry.max)
}

#[cfg(test)]
mod tests;
