//! [`Producer`]: the async producer over QUIC. It keeps the [`ProducerCore`] behind a mutex:
//! [`Producer::send`] calls the core inline (no channel hop per event) and wakes the driver task
//! only when a batch is opened (to arm its linger timer) or closed (to write it). The driver
//! (see `driver.rs`) owns the connection: it writes due batches, applies acks, and reconnects.

use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use weir_format::Event;

use crate::driver;
use crate::options::ConnectOptions;
use crate::producer::{ClientError, Completed, EncodedBatch, ProducerCore, SendOutcome};

/// Counters of a producer since it connected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Events taken by [`Producer::send`].
    pub events_sent: u64,
    /// Events whose batch the server acknowledged.
    pub events_acked: u64,
    /// Batch frames handed to QUIC (resends after a reconnect included).
    pub batches_sent: u64,
    /// Batches the server acknowledged.
    pub batches_acked: u64,
    /// Bytes of batch frames handed to QUIC (headers included, resends included).
    pub bytes_sent: u64,
    /// Connections re-established after a loss.
    pub reconnects: u64,
}

/// State shared by the producer handle, its ack futures and the driver task.
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    /// Wakes the driver: a batch opened or closed, a flush, a shutdown.
    pub(crate) wake: Notify,
    /// Bumped after acks, a fatal error or a shutdown: wakes senders waiting for room and ack
    /// futures.
    pub(crate) progress: watch::Sender<u64>,
    /// The pipeline names, by index.
    pub(crate) pipelines: Vec<String>,
    /// The server's address, for messages.
    pub(crate) server: String,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes everything waiting for acks or room; call after changing the state.
    pub(crate) fn bump(&self) {
        self.progress.send_modify(|generation| *generation += 1);
    }
}

/// The producer's mutable state.
pub(crate) struct State {
    pub(crate) core: ProducerCore,
    /// Per pipeline: every sequence below is acked.
    pub(crate) acked_below: Vec<u64>,
    /// Per pipeline: (sequence, events) of every open or unacked batch, in order.
    pub(crate) pending: Vec<VecDeque<(u64, u64)>>,
    /// The error every later operation fails with.
    pub(crate) fatal: Option<ClientError>,
    /// Set by [`Producer::close`] (after its flush) or by dropping the producer: the driver
    /// closes the connection and stops.
    pub(crate) shutdown: bool,
    pub(crate) stats: Stats,
}

impl State {
    /// Records `events` queued in batch `sequence` of `pipeline`; returns whether the driver
    /// must look at the core (a batch was opened or closed).
    fn record(&mut self, pipeline: u16, sequence: u64, events: u64) -> bool {
        let index = usize::from(pipeline);
        self.stats.events_sent += events;
        let pending = &mut self.pending[index];
        let opened = match pending.back_mut() {
            Some((last, count)) if *last == sequence => {
                *count += events;
                false
            }
            _ => {
                pending.push_back((sequence, events));
                true
            }
        };
        let closed = self.core.next_sequence(pipeline) != Some(sequence);
        opened || closed
    }

    /// Applies released batches: moves the acked bound, counts acked events and batches.
    pub(crate) fn complete(&mut self, completed: &Completed, acked_below: u64) {
        let index = usize::from(completed.pipeline);
        let Some(bound) = self.acked_below.get_mut(index) else {
            return;
        };
        *bound = (*bound).max(acked_below).max(completed.sequences.end);
        let bound = *bound;
        let pending = &mut self.pending[index];
        while let Some(&(sequence, events)) = pending.front() {
            if sequence >= bound {
                break;
            }
            pending.pop_front();
            self.stats.events_acked += events;
            self.stats.batches_acked += 1;
        }
    }

    /// Makes `error` the producer's fatal error (the first one wins).
    pub(crate) fn fail(&mut self, error: ClientError) {
        if self.fatal.is_none() {
            self.fatal = Some(error);
        }
    }

    /// Whether `sequence` of `pipeline` is acked, or the error that means it never will be.
    fn ack_status(&self, pipeline: u16, sequence: u64) -> Option<Result<(), ClientError>> {
        if self.acked_below[usize::from(pipeline)] > sequence {
            return Some(Ok(()));
        }
        self.fatal.clone().map(Err)
    }
}

/// A producer connected to a weir server: see the crate documentation for an example.
///
/// `send` takes `&self`, so one producer can be shared between tasks (e.g. in an `Arc`).
/// Dropping it without [`Producer::close`] closes the connection at once; events not yet acked
/// then fail with [`ClientError::ProducerClosed`].
pub struct Producer {
    shared: Arc<Shared>,
    driver: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("server", &self.shared.server)
            .field("pipelines", &self.shared.pipelines)
            .finish_non_exhaustive()
    }
}

impl Producer {
    /// Connects (QUIC, TLS, `hello` → `welcome`) and starts the driver task on the current
    /// tokio runtime. A first connection that fails, or is refused, is an error here; later
    /// losses are retried by the [`ReconnectPolicy`](crate::ReconnectPolicy).
    pub async fn connect(options: ConnectOptions) -> Result<Producer, ClientError> {
        if Instant::now()
            .checked_add(options.producer.linger.saturating_mul(2))
            .is_none()
        {
            return Err(ClientError::InvalidConfig(format!(
                "linger of {:?} is too long",
                options.producer.linger
            )));
        }
        let core = ProducerCore::new(options.producer.clone())?;
        let (client_config, pin) = options.quinn_config()?;
        let pipelines = options.producer.pipelines.clone();
        let count = pipelines.len();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                core,
                acked_below: vec![0; count],
                pending: vec![VecDeque::new(); count],
                fatal: None,
                shutdown: false,
                stats: Stats::default(),
            }),
            wake: Notify::new(),
            progress: watch::Sender::new(0),
            pipelines,
            server: options.addr.to_string(),
        });
        let driver = driver::Driver::connect(shared.clone(), options, client_config, pin).await?;
        let handle = tokio::spawn(driver.run());
        Ok(Producer {
            shared,
            driver: Mutex::new(Some(handle)),
        })
    }

    /// The index of pipeline `name` (its position in the options' pipelines).
    pub fn pipeline_index(&self, name: &str) -> Result<u16, ClientError> {
        self.shared
            .pipelines
            .iter()
            .position(|p| p == name)
            .map(|i| i as u16)
            .ok_or_else(|| ClientError::UnknownPipelineName(name.to_string()))
    }

    /// Queues `event` for `pipeline`, waiting while the buffer of unacked data is full
    /// (backpressure; nothing is dropped). The returned [`AckFuture`] resolves once the server
    /// acknowledged the event's batch; it can be dropped without affecting delivery (use
    /// [`Producer::flush`] to wait for everything).
    pub async fn send(&self, pipeline: &str, event: Event) -> Result<AckFuture, ClientError> {
        let index = self.pipeline_index(pipeline)?;
        self.send_to(index, &event).await
    }

    /// [`Producer::send`] with the pipeline's index ([`Producer::pipeline_index`]) and a
    /// borrowed event: the cheapest way to send at high rates.
    pub async fn send_to(&self, pipeline: u16, event: &Event) -> Result<AckFuture, ClientError> {
        self.queue(pipeline, |core| {
            core.send(pipeline, event, Instant::now())
                .map(|outcome| (outcome, 1))
        })
        .await
    }

    /// Queues an already encoded batch as one batch of `pipeline`, without decoding or
    /// re-encoding its events: for forwarding batches read elsewhere, or sending the same
    /// prepared bytes many times. Waits while the buffer is full, like [`Producer::send`].
    pub async fn send_batch(
        &self,
        pipeline: u16,
        batch: &EncodedBatch,
    ) -> Result<AckFuture, ClientError> {
        let events = u64::from(batch.events());
        self.queue(pipeline, |core| {
            core.send_batch(pipeline, batch)
                .map(|outcome| (outcome, events))
        })
        .await
    }

    /// Runs `attempt` on the core until it queues (the outcome and the events it queued),
    /// waiting for room while it answers [`SendOutcome::Full`].
    async fn queue(
        &self,
        pipeline: u16,
        mut attempt: impl FnMut(&mut ProducerCore) -> Result<(SendOutcome, u64), ClientError>,
    ) -> Result<AckFuture, ClientError> {
        if usize::from(pipeline) >= self.shared.pipelines.len() {
            return Err(ClientError::UnknownPipeline {
                index: pipeline,
                count: self.shared.pipelines.len(),
            });
        }
        loop {
            let mut progress = {
                let mut state = self.shared.lock();
                if let Some(error) = &state.fatal {
                    return Err(error.clone());
                }
                if state.shutdown {
                    return Err(ClientError::ProducerClosed);
                }
                match attempt(&mut state.core) {
                    Ok((SendOutcome::Queued { sequence }, events)) => {
                        let wake = state.record(pipeline, sequence, events);
                        drop(state);
                        if wake {
                            self.shared.wake.notify_one();
                        }
                        return Ok(AckFuture {
                            shared: self.shared.clone(),
                            pipeline,
                            sequence,
                        });
                    }
                    Ok((SendOutcome::Full, _)) => self.shared.progress.subscribe(),
                    Err(
                        error @ (ClientError::BatchTooLarge { .. }
                        | ClientError::SequencesExhausted(_)),
                    ) => {
                        // The core lost the batch it closed: nothing may be sent after it.
                        state.fail(error.clone());
                        drop(state);
                        self.shared.bump();
                        self.shared.wake.notify_one();
                        return Err(error);
                    }
                    Err(error) => return Err(error),
                }
            };
            // Woken by an ack (room in the buffer), a fatal error or a shutdown.
            if progress.changed().await.is_err() {
                return Err(ClientError::ProducerClosed);
            }
        }
    }

    /// Sends every open batch now and waits until every event sent before this call is acked.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let targets: Vec<Option<u64>> = {
            let mut state = self.shared.lock();
            if let Some(error) = &state.fatal {
                return Err(error.clone());
            }
            if let Err(error) = state.core.flush() {
                state.fail(error.clone());
                drop(state);
                self.shared.bump();
                return Err(error);
            }
            state
                .pending
                .iter()
                .map(|p| p.back().map(|&(sequence, _)| sequence))
                .collect()
        };
        self.shared.wake.notify_one();
        for (index, target) in targets.into_iter().enumerate() {
            if let Some(sequence) = target {
                wait_acked(&self.shared, index as u16, sequence).await?;
            }
        }
        Ok(())
    }

    /// Flushes, then closes the connection with `NO_ERROR` and stops the driver. Later sends
    /// fail with [`ClientError::ProducerClosed`].
    pub async fn close(&self) -> Result<(), ClientError> {
        let flushed = self.flush().await;
        {
            let mut state = self.shared.lock();
            state.shutdown = true;
        }
        self.shared.wake.notify_one();
        let handle = self
            .driver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle
            && let Err(error) = handle.await
        {
            tracing::warn!(%error, "producer driver task failed");
        }
        flushed
    }

    /// The producer's counters.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats
    }

    /// The error that stopped the producer, if one did.
    pub fn error(&self) -> Option<ClientError> {
        self.shared.lock().fatal.clone()
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_one();
    }
}

/// Resolves when `sequence` of `pipeline` is acked, or with the error that stopped the producer.
async fn wait_acked(shared: &Shared, pipeline: u16, sequence: u64) -> Result<(), ClientError> {
    loop {
        // Subscribe before looking, so that a change after the look wakes us.
        let mut progress = shared.progress.subscribe();
        if let Some(status) = shared.lock().ack_status(pipeline, sequence) {
            return status;
        }
        if progress.changed().await.is_err() {
            return Err(ClientError::ProducerClosed);
        }
    }
}

/// The acknowledgement of one sent event: `.await` it (or call [`AckFuture::wait`]) to learn
/// when the server holds the event in every required sink. Cheap to create and to drop.
pub struct AckFuture {
    shared: Arc<Shared>,
    pipeline: u16,
    sequence: u64,
}

impl fmt::Debug for AckFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckFuture")
            .field("pipeline", &self.pipeline)
            .field("sequence", &self.sequence)
            .finish()
    }
}

impl AckFuture {
    /// The pipeline index of the event.
    pub fn pipeline(&self) -> u16 {
        self.pipeline
    }

    /// The sequence of the batch holding the event.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// Whether the event is acked already (without waiting).
    pub fn is_acked(&self) -> bool {
        matches!(
            self.shared.lock().ack_status(self.pipeline, self.sequence),
            Some(Ok(()))
        )
    }

    /// Waits until the event's batch is acked (`Ok`) or the producer failed (`Err`).
    pub async fn wait(self) -> Result<(), ClientError> {
        wait_acked(&self.shared, self.pipeline, self.sequence).await
    }
}

impl IntoFuture for AckFuture {
    type Output = Result<(), ClientError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<(), ClientError>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}
