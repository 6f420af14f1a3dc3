//! One producer connection: the handshake (PROTOCOL §6), the control stream's writer (welcome,
//! acks, errors, goaway) and reader, and one task per batch stream.
//!
//! A batch stream's task decodes batch frames (limits checked at the header) and admits each
//! into its pipeline (`pipeline.rs`: sequence check, verification, hand-over). The connection
//! reads at most `max_in_flight` batches of a pipeline that are not acked yet (a permit per
//! batch from the connection's semaphore of that pipeline, given back when the pipeline
//! resolves the batch or at once for a duplicate),
//! whatever streams they come on: past that it stops reading, the stream's QUIC flow-control
//! window fills and the producer's writes block. A stream's first frame says which pipeline it
//! carries, so it is read under one of the connection's first-frame permits (one more than its
//! pipelines), traded for a pipeline permit once decoded: a producer cannot queue more by
//! opening, finishing or resetting streams.

use super::pipeline::{Admitted, QuicPipeline, lock};
use super::{Shared, WaitGuard};
use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use weir_format::frame::{
    self, Decoder, ErrorCode, ErrorFrame, Frame, Goaway, Hello, PipelineState, Refuse, Welcome,
};

/// Most chunks (received STREAM frames, about a packet each) taken from quinn at once.
const READ_CHUNKS: usize = 64;
/// How long a closing connection waits for the producer to receive its last control frames.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How often a connection looks whether the producer was heard from.
const HEARD_TICK: Duration = Duration::from_secs(1);
/// Most `error` frames queued and not sent: more means the producer fails streams faster than
/// it reads its control stream, and its connection is closed (the queue stays bounded).
const MAX_QUEUED_ERRORS: usize = 64;

/// The QUIC code of an error code.
pub(crate) fn code(code: ErrorCode) -> VarInt {
    VarInt::from_u32(u32::from(code.to_u16()))
}

/// What the control stream's writer sends next.
#[derive(Default)]
struct OutboxState {
    /// Highest ack per pipeline index not sent yet.
    acks: BTreeMap<u16, u64>,
    /// Highest ack sent per pipeline index (acks only grow).
    sent: BTreeMap<u16, u64>,
    errors: Vec<ErrorFrame>,
    goaway: Option<String>,
    /// Finish the control stream and close the connection with this code and reason.
    close: Option<(ErrorCode, String)>,
}

/// The state of one accepted connection that its streams and the pipelines' completions share.
pub(crate) struct ConnState {
    /// The producer id.
    pub producer: Arc<str>,
    /// The connection.
    conn: Connection,
    /// Its pipelines, in `hello` order.
    pub pipelines: Vec<Arc<QuicPipeline>>,
    /// Per pipeline (same order): `max_in_flight` permits, one per batch read and not acked.
    permits: Vec<Semaphore>,
    /// Streams reading their first frame (pipeline unknown yet): one more than the pipelines.
    first_frames: Semaphore,
    outbox: Mutex<OutboxState>,
    wake: Notify,
    /// When a datagram from the producer was last seen (checked every [`HEARD_TICK`]; a live
    /// producer answers the server's keep-alive pings).
    heard: Mutex<Instant>,
}

impl ConnState {
    /// How long the producer has not been heard from.
    pub fn quiet_for(&self) -> Duration {
        lock(&self.heard).elapsed()
    }

    /// Closes the connection of a producer that stopped answering, at once: its slot goes to
    /// another producer.
    pub fn evict(&self, reason: &str) {
        self.conn
            .close(code(ErrorCode::TooManyProducers), reason.as_bytes());
    }

    fn push(&self, f: impl FnOnce(&mut OutboxState)) {
        f(&mut lock(&self.outbox));
        self.wake.notify_one();
    }

    /// Queues an `error` frame; closes the connection instead when [`MAX_QUEUED_ERRORS`] are
    /// queued already.
    pub fn error(&self, error: ErrorCode, stream: u64, message: String) {
        let mut outbox = lock(&self.outbox);
        if outbox.errors.len() >= MAX_QUEUED_ERRORS {
            drop(outbox);
            let reason = format!(
                "{MAX_QUEUED_ERRORS} error frames not sent yet: the producer does not read its control stream"
            );
            tracing::warn!("producer `{}`: {reason}", self.producer);
            self.conn
                .close(code(ErrorCode::ProtocolViolation), reason.as_bytes());
            return;
        }
        outbox.errors.push(ErrorFrame {
            code: error,
            stream,
            message: truncate(message),
        });
        drop(outbox);
        self.wake.notify_one();
    }

    /// Queues an ack for pipeline `index` (acks only grow; queued ones coalesce).
    pub fn ack(&self, index: u16, next: u64) {
        self.push(|o| {
            let entry = o.acks.entry(index).or_insert(next);
            *entry = (*entry).max(next);
        });
    }

    /// Queues a `goaway`.
    pub fn goaway(&self, message: &str) {
        self.push(|o| o.goaway = Some(message.to_owned()));
    }

    /// Asks the writer to send what is queued, then close the connection.
    pub fn close(&self, code: ErrorCode, reason: &str) {
        self.push(|o| {
            o.close.get_or_insert((code, reason.to_owned()));
        });
    }
}

/// Messages are limited to [`frame::MAX_MESSAGE_BYTES`]: cut at a character boundary.
fn truncate(mut message: String) -> String {
    if message.len() > frame::MAX_MESSAGE_BYTES {
        let mut end = frame::MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}

/// One batch stream, as its task and its batches' completions share it.
pub(crate) struct StreamShared {
    /// QUIC stream id.
    pub id: u64,
    /// The pipeline index (in the connection's `hello`) the stream carries, set by the stream's
    /// task before its first batch leaves it.
    index: AtomicU16,
    conn: Arc<ConnState>,
    shared: Arc<Shared>,
    failed: AtomicBool,
    stop: Mutex<Option<ErrorCode>>,
    wake: Notify,
}

impl StreamShared {
    /// The producer id of the stream's connection.
    pub fn producer(&self) -> &Arc<str> {
        &self.conn.producer
    }

    /// Fails the stream: an `error` frame on the control stream, then `STOP_SENDING` with
    /// the code (by the stream's task). Only the first failure counts.
    pub fn fail(&self, code: ErrorCode, message: String) {
        if self.failed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared.metrics.stream_errors.inc();
        tracing::warn!(
            "producer `{}`, stream {}: {message} ({code:?})",
            self.conn.producer,
            self.id
        );
        self.conn.error(code, self.id, message);
        *lock(&self.stop) = Some(code);
        self.wake.notify_one();
    }

    /// Queues an ack for the stream's pipeline.
    pub fn ack(&self, next: u64) {
        self.conn.ack(self.index.load(Ordering::Acquire), next);
    }

    /// Gives back the permit of one batch (processed, acked or discarded).
    pub fn release(&self) {
        let index = usize::from(self.index.load(Ordering::Acquire));
        if let Some(permits) = self.conn.permits.get(index) {
            permits.add_permits(1);
        }
    }
}

/// Runs one incoming connection to its end.
pub(crate) async fn run(shared: Arc<Shared>, incoming: quinn::Incoming, guard: WaitGuard) {
    let remote = incoming.remote_address();
    let deadline = Instant::now() + shared.limits.handshake_timeout;
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("connection from {remote} failed: {e}");
            return;
        }
    };
    let conn = match tokio::time::timeout_at(deadline, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!("handshake with {remote} failed: {e}");
            return;
        }
        Err(_) => {
            tracing::info!("handshake with {remote} timed out");
            return;
        }
    };
    let timeout_ms = shared.limits.handshake_timeout.as_millis();
    let no_hello = |conn: &Connection| {
        let reason = format!("no hello within {timeout_ms} ms");
        tracing::info!("{remote}: {reason}");
        conn.close(code(ErrorCode::ProtocolViolation), reason.as_bytes());
    };
    let (mut send, mut recv) = match tokio::time::timeout_at(deadline, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            tracing::debug!("{remote}: {e}");
            return;
        }
        Err(_) => return no_hello(&conn),
    };
    let mut decoder = Decoder::control_from_client();
    let hello = match tokio::time::timeout_at(deadline, read_hello(&mut recv, &mut decoder)).await {
        Ok(Ok(Some(hello))) => hello,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            refuse(&shared, &conn, &mut send, e.code(), e.to_string()).await;
            return;
        }
        Err(_) => return no_hello(&conn),
    };
    let version = match frame::negotiate_version(hello.version) {
        Ok(v) => v,
        Err(e) => {
            refuse(&shared, &conn, &mut send, e.code(), e.to_string()).await;
            return;
        }
    };
    let (state, pipelines) = match admit(&shared, &conn, &hello) {
        Ok(admitted) => admitted,
        Err((code, message)) => {
            refuse(&shared, &conn, &mut send, code, message).await;
            return;
        }
    };
    let welcome = Frame::Welcome(Welcome {
        version,
        limits: shared.limits.protocol,
        pipelines: state
            .pipelines
            .iter()
            .map(|p| {
                let (next_sequence, acked_below) = p.welcome_state(&hello.producer_id);
                PipelineState {
                    next_sequence,
                    acked_below,
                }
            })
            .collect(),
    });
    let mut bytes = Vec::new();
    let written = match frame::encode(&welcome, &mut bytes) {
        Ok(()) => send.write_all(&bytes).await.is_ok(),
        Err(e) => {
            tracing::error!("cannot encode welcome: {e}");
            false
        }
    };
    shared.metrics.connections_accepted.inc();
    tracing::info!(
        "producer `{}` connected from {remote} (pipelines: {})",
        hello.producer_id,
        pipelines.join(", ")
    );
    if written {
        serve(&shared, &conn, &state, send, recv, decoder).await;
    }
    shared.unregister(&hello.producer_id, conn.stable_id());
    tracing::info!("producer `{}` disconnected", hello.producer_id);
    drop(guard);
}

/// Reads the `hello`; `None` when the stream or connection ended first.
async fn read_hello(
    recv: &mut RecvStream,
    decoder: &mut Decoder,
) -> Result<Option<Hello>, frame::ProtocolError> {
    loop {
        let chunk = match recv
            .read_chunk(frame::MAX_CONTROL_FRAME_BYTES as usize, true)
            .await
        {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => {
                decoder.finish()?;
                return Ok(None);
            }
            Err(_) => return Ok(None),
        };
        let mut input: &[u8] = &chunk;
        if let Some(frame) = decoder.decode(&mut input)? {
            if !input.is_empty() {
                // Bytes after `hello`: the decoder names the frame that follows.
                decoder.decode(&mut input)?;
            }
            if let Frame::Hello(hello) = frame {
                return Ok(Some(hello));
            }
        }
    }
}

/// Checks the `hello` (PROTOCOL §6, after framing and version) and registers the connection.
fn admit(
    shared: &Arc<Shared>,
    conn: &Connection,
    hello: &Hello,
) -> Result<(Arc<ConnState>, Vec<String>), (ErrorCode, String)> {
    let id = hello.producer_id.as_str();
    shared.authenticate(conn, id, &hello.token)?;
    let mut pipelines = Vec::with_capacity(hello.pipelines.len());
    for name in &hello.pipelines {
        let Some(pipeline) = shared.pipeline(name) else {
            return Err((
                ErrorCode::UnknownPipeline,
                format!("pipeline `{name}`: unknown"),
            ));
        };
        if !pipeline.allows(id) {
            return Err((
                ErrorCode::Unauthorized,
                format!("pipeline `{name}`: producer `{id}` may not write to it"),
            ));
        }
        pipelines.push(pipeline);
    }
    let in_flight = shared.limits.protocol.max_in_flight as usize;
    let state = Arc::new(ConnState {
        producer: Arc::from(id),
        conn: conn.clone(),
        permits: pipelines
            .iter()
            .map(|_| Semaphore::new(in_flight))
            .collect(),
        first_frames: Semaphore::new(pipelines.len() + 1),
        pipelines,
        outbox: Mutex::new(OutboxState::default()),
        wake: Notify::new(),
        heard: Mutex::new(Instant::now()),
    });
    shared.register(conn, state.clone())?;
    // Before `welcome` reads the sequence state: acks of batches accepted on an earlier
    // connection that complete from now on reach this one too (PROTOCOL §9, reconnect).
    for (index, pipeline) in (0u16..).zip(&state.pipelines) {
        pipeline.set_current(state.producer.clone(), &state, index);
    }
    Ok((state, hello.pipelines.clone()))
}

/// Sends `refuse`, waits (bounded) for the producer to receive it, and closes the connection.
async fn refuse(
    shared: &Shared,
    conn: &Connection,
    send: &mut SendStream,
    error: ErrorCode,
    message: String,
) {
    shared.metrics.connections_refused.inc();
    tracing::info!("refused {}: {message} ({error:?})", conn.remote_address());
    let message = truncate(message);
    let mut bytes = Vec::new();
    let refused = Frame::Refuse(Refuse {
        code: error,
        message: message.clone(),
    });
    if frame::encode(&refused, &mut bytes).is_ok() && send.write_all(&bytes).await.is_ok() {
        let _ = send.finish();
        let _ = tokio::time::timeout(CLOSE_GRACE, send.stopped()).await;
    }
    conn.close(code(error), message.as_bytes());
}

/// Serves an admitted connection until it closes.
async fn serve(
    shared: &Arc<Shared>,
    conn: &Connection,
    state: &Arc<ConnState>,
    send: SendStream,
    recv: RecvStream,
    decoder: Decoder,
) {
    let writer = tokio::spawn(write_control(conn.clone(), state.clone(), send));
    let reader = tokio::spawn(read_control(conn.clone(), state.clone(), recv, decoder));
    let mut stop = shared.stop_reading.subscribe();
    let mut tick = tokio::time::interval(HEARD_TICK);
    let mut datagrams = conn.stats().udp_rx.datagrams;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = conn.stats().udp_rx.datagrams;
                if now != datagrams {
                    datagrams = now;
                    *lock(&state.heard) = Instant::now();
                }
            }
            stream = conn.accept_uni() => match stream {
                Ok(recv) => {
                    let guard = shared.streams.guard();
                    tokio::spawn(read_batches(shared.clone(), state.clone(), recv, shared.stop_reading.subscribe(), guard));
                }
                Err(_) => break,
            },
            _ = stopping(&mut stop) => {
                // Shutdown: no new streams; wait for the writer to close the connection.
                let _ = conn.closed().await;
                break;
            }
        }
    }
    reader.abort();
    // The writer ends when the connection closes.
    let _ = writer.await;
}

/// Writes queued control frames until the connection closes (or a close is requested).
async fn write_control(conn: Connection, state: Arc<ConnState>, mut send: SendStream) {
    let mut bytes = Vec::new();
    loop {
        let notified = state.wake.notified();
        let (close, frames) = {
            let mut o = lock(&state.outbox);
            let mut frames = Vec::new();
            for e in o.errors.drain(..) {
                frames.push(Frame::Error(e));
            }
            let acks = std::mem::take(&mut o.acks);
            for (pipeline, next) in acks {
                let sent = o.sent.entry(pipeline).or_insert(0);
                if next > *sent {
                    *sent = next;
                    frames.push(Frame::Ack(frame::Ack { pipeline, next }));
                }
            }
            if let Some(message) = o.goaway.take() {
                frames.push(Frame::Goaway(Goaway { message }));
            }
            (o.close.clone(), frames)
        };
        bytes.clear();
        for f in &frames {
            if let Err(e) = frame::encode(f, &mut bytes) {
                tracing::error!("cannot encode a control frame: {e}");
            }
        }
        if !bytes.is_empty() && send.write_all(&bytes).await.is_err() {
            return;
        }
        if let Some((error, reason)) = close {
            let _ = send.finish();
            let _ = tokio::time::timeout(CLOSE_GRACE, send.stopped()).await;
            conn.close(code(error), reason.as_bytes());
            return;
        }
        tokio::select! {
            _ = notified => {}
            _ = conn.closed() => return,
        }
    }
}

/// Reads the control stream after `hello`: any frame is a protocol violation that closes the
/// connection; the producer finishing its half is it leaving (nothing to do).
async fn read_control(
    conn: Connection,
    state: Arc<ConnState>,
    mut recv: RecvStream,
    mut decoder: Decoder,
) {
    loop {
        match recv
            .read_chunk(frame::MAX_CONTROL_FRAME_BYTES as usize, true)
            .await
        {
            Ok(Some(chunk)) => {
                let mut input: &[u8] = &chunk.bytes;
                if let Err(e) = decoder.decode(&mut input) {
                    let message = e.to_string();
                    tracing::warn!("producer `{}`: control stream: {message}", state.producer);
                    state.error(e.code(), 0, message.clone());
                    state.close(e.code(), &message);
                    return;
                }
            }
            Ok(None) => return,
            Err(_) => {
                conn.close(code(ErrorCode::NoError), b"");
                return;
            }
        }
    }
}

/// Why a batch stream's reading ended.
enum End {
    /// Finished, reset, or the connection is gone: nothing to say.
    Quiet,
    /// A protocol error on the stream.
    Failed(ErrorCode, String),
    /// The stream was failed (its `error` frame is queued already).
    Stopped(ErrorCode),
}

/// Reads one batch stream until it ends, fails, or the server stops reading.
async fn read_batches(
    shared: Arc<Shared>,
    conn: Arc<ConnState>,
    mut recv: RecvStream,
    mut stop: watch::Receiver<bool>,
    guard: WaitGuard,
) {
    let id = u64::from(recv.id());
    let stream = Arc::new(StreamShared {
        id,
        index: AtomicU16::new(0),
        conn: conn.clone(),
        shared: shared.clone(),
        failed: AtomicBool::new(false),
        stop: Mutex::new(None),
        wake: Notify::new(),
    });
    let end = read_loop(&shared, &conn, &mut recv, &mut stop, &stream).await;
    let error = match end {
        End::Quiet => None,
        End::Failed(error, message) => {
            // Only the first failure counts: the stream may have been failed already.
            stream.fail(error, message);
            Some(lock(&stream.stop).unwrap_or(error))
        }
        End::Stopped(error) => Some(error),
    };
    if let Some(error) = error {
        // The stream may be gone already (finished or reset): nothing left to stop then.
        let _ = recv.stop(code(error));
    }
    drop(guard);
}

async fn read_loop(
    shared: &Shared,
    conn: &ConnState,
    recv: &mut RecvStream,
    stop: &mut watch::Receiver<bool>,
    stream: &Arc<StreamShared>,
) -> End {
    let limits = shared.limits.protocol;
    let mut decoder = Decoder::batch_stream(limits, conn.pipelines.len());
    let mut pipeline: Option<u16> = None;
    let mut rest = Bytes::new();
    // Chunks read from quinn and not decoded yet: `chunks[next..filled]`.
    let mut chunks: Vec<Bytes> = vec![Bytes::new(); READ_CHUNKS];
    let (mut next, mut filled) = (0, 0);
    // The permit of the frame being read: of the stream's pipeline once it is known, before
    // that one of the connection's first frames. Given back if the stream ends first.
    let mut holding: Option<Permit<'_>> = None;
    loop {
        if holding.is_none() {
            let permits = match pipeline {
                // The index was checked with the stream's first frame.
                Some(index) => conn.permits.get(usize::from(index)),
                None => Some(&conn.first_frames),
            };
            if let Some(permits) = permits {
                match acquire(permits, stream, stop).await {
                    Ok(permit) => holding = Some(permit),
                    Err(end) => return end,
                }
            }
        }
        if rest.is_empty() && next < filled {
            rest = std::mem::take(&mut chunks[next]);
            next += 1;
        }
        if rest.is_empty() {
            tokio::select! {
                read = recv.read_chunks(&mut chunks) => match read {
                    Ok(Some(n)) => {
                        (next, filled) = (0, n);
                        continue;
                    }
                    Ok(None) => {
                        return match decoder.finish() {
                            Ok(()) => End::Quiet,
                            Err(e) => End::Failed(e.code(), e.to_string()),
                        };
                    }
                    Err(quinn::ReadError::Reset(code)) => {
                        if decoder.buffered() > 0 {
                            tracing::info!(
                                "producer `{}`, stream {}: reset with code {code} inside a frame; its {} bytes are discarded",
                                conn.producer,
                                stream.id,
                                decoder.buffered()
                            );
                        }
                        return End::Quiet;
                    }
                    Err(_) => return End::Quiet,
                },
                _ = stream.wake.notified() => return stopped(stream),
                _ = stopping(stop) => return End::Quiet,
            }
        }
        let mut input: &[u8] = &rest;
        let decoded = decoder.decode(&mut input);
        let consumed = rest.len() - input.len();
        rest = rest.slice(consumed..);
        let frame = match decoded {
            Ok(Some(Frame::Batch(frame))) => frame,
            Ok(Some(_)) | Ok(None) => continue,
            Err(e) => return End::Failed(e.code(), e.to_string()),
        };
        shared.metrics.batches_received.inc();
        let first = pipeline.is_none();
        match pipeline {
            None => {
                pipeline = Some(frame.pipeline);
                // Set before the first batch leaves this task (the channel orders it).
                stream.index.store(frame.pipeline, Ordering::Release);
            }
            Some(index) if index != frame.pipeline => {
                let names = |i: u16| {
                    conn.pipelines
                        .get(usize::from(i))
                        .map_or_else(String::new, |p| p.name.clone())
                };
                return End::Failed(
                    ErrorCode::ProtocolViolation,
                    format!(
                        "batch for pipeline index {} (`{}`) on a stream of pipeline index {index} (`{}`): one pipeline per stream",
                        frame.pipeline,
                        names(frame.pipeline),
                        names(index)
                    ),
                );
            }
            Some(_) => {}
        }
        let Some(handle) = conn.pipelines.get(usize::from(frame.pipeline)) else {
            return End::Failed(
                ErrorCode::ProtocolViolation,
                format!("batch for pipeline index {}", frame.pipeline),
            );
        };
        let permit = match holding.take() {
            Some(permit) if !first => permit,
            // A stream's first frame trades its first-frame permit, kept while it waits, for
            // one of its pipeline.
            first_frame => match conn.permits.get(usize::from(frame.pipeline)) {
                Some(permits) => match acquire(permits, stream, stop).await {
                    Ok(permit) => {
                        drop(first_frame);
                        permit
                    }
                    Err(end) => return end,
                },
                None => return End::Quiet,
            },
        };
        let admitted = tokio::select! {
            admitted = handle.admit(frame, stream) => admitted,
            _ = stopping(stop) => return End::Quiet,
        };
        match admitted {
            // The permit went with the batch: its completion gives it back.
            Admitted::Taken => std::mem::forget(permit),
            Admitted::Duplicate => drop(permit),
            Admitted::Failed | Admitted::Removed => {
                drop(permit);
                return stopped(stream);
            }
            Admitted::Stopped => {
                return End::Failed(
                    ErrorCode::InternalError,
                    format!("pipeline `{}` has stopped", handle.name),
                );
            }
        }
    }
}

/// A permit held by a stream task; given back when dropped.
struct Permit<'a>(&'a Semaphore);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.add_permits(1);
    }
}

/// Waits for a permit of `permits`; `Err` when the stream must end first (it was failed,
/// or the server stops reading).
async fn acquire<'a>(
    permits: &'a Semaphore,
    stream: &StreamShared,
    stop: &mut watch::Receiver<bool>,
) -> Result<Permit<'a>, End> {
    match permits.try_acquire() {
        Ok(permit) => permit.forget(),
        Err(_) => tokio::select! {
            permit = permits.acquire() => match permit {
                Ok(permit) => permit.forget(),
                Err(_) => return Err(End::Quiet),
            },
            _ = stream.wake.notified() => return Err(stopped(stream)),
            _ = stopping(stop) => return Err(End::Quiet),
        },
    }
    Ok(Permit(permits))
}

fn stopped(stream: &StreamShared) -> End {
    let error = lock(&stream.stop).unwrap_or(ErrorCode::InternalError);
    End::Stopped(error)
}

/// Completes once the server stops reading (shutdown).
pub(crate) async fn stopping(stop: &mut watch::Receiver<bool>) {
    // An error means the server is gone: stop too.
    let _ = stop.wait_for(|s| *s).await;
}
