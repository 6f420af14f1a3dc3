//! One producer connection: the handshake (PROTOCOL §6), the control stream's writer (welcome,
//! acks, errors, goaway) and reader, and one task per batch stream.
//!
//! A batch stream's task only frames: it decodes batch frames (limits checked at the header)
//! and hands each to its pipeline's worker, which verifies and runs it. It reads at most
//! `max_in_flight` batches that are not acked yet (a permit per batch, given back by the worker
//! after the ack): past that it stops reading, the stream's QUIC flow-control window fills and
//! the producer's writes block.

use super::worker::{Item, PipelineHandle, Work, lock};
use super::{Shared, WaitGuard, bump};
use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// The state of one accepted connection that its streams and the workers share.
pub(crate) struct ConnState {
    /// The producer id.
    pub producer: Arc<str>,
    /// Its pipelines, in `hello` order.
    pub pipelines: Vec<Arc<PipelineHandle>>,
    outbox: Mutex<OutboxState>,
    wake: Notify,
}

impl ConnState {
    fn push(&self, f: impl FnOnce(&mut OutboxState)) {
        f(&mut lock(&self.outbox));
        self.wake.notify_one();
    }

    /// Queues an `error` frame.
    pub fn error(&self, code: ErrorCode, stream: u64, message: String) {
        self.push(|o| {
            o.errors.push(ErrorFrame {
                code,
                stream,
                message: truncate(message),
            })
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

/// One batch stream, as its task and the worker share it.
pub(crate) struct StreamShared {
    /// QUIC stream id.
    pub id: u64,
    /// The pipeline index (in the connection's `hello`) the stream carries.
    pub index: u16,
    conn: Arc<ConnState>,
    shared: Arc<Shared>,
    permits: Semaphore,
    failed: AtomicBool,
    stop: Mutex<Option<ErrorCode>>,
    wake: Notify,
}

impl StreamShared {
    /// Whether the stream failed (its later batches are discarded).
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Fails the stream: an `error` frame on the control stream, then `STOP_SENDING` with
    /// the code (by the stream's task). Only the first failure counts.
    pub fn fail(&self, code: ErrorCode, message: String) {
        if self.failed.swap(true, Ordering::AcqRel) {
            return;
        }
        bump(&self.shared.counters.stream_errors, 1);
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
        let index = self.index;
        self.conn.push(|o| {
            let entry = o.acks.entry(index).or_insert(next);
            *entry = (*entry).max(next);
        });
    }

    /// Gives back the permit of one batch (processed, acked or discarded).
    pub fn release(&self) {
        self.permits.add_permits(1);
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
                let s = p.welcome_state(&hello.producer_id);
                PipelineState {
                    next_sequence: s.next,
                    acked_below: s.acked,
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
    bump(&shared.counters.connections_accepted, 1);
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
        let Some(pipeline) = shared.pipelines.get(name) else {
            return Err((
                ErrorCode::UnknownPipeline,
                format!("pipeline `{name}`: unknown"),
            ));
        };
        if let Some(allowed) = &pipeline.allowed
            && !allowed.iter().any(|p| p == id)
        {
            return Err((
                ErrorCode::Unauthorized,
                format!("pipeline `{name}`: producer `{id}` may not write to it"),
            ));
        }
        pipelines.push(pipeline.clone());
    }
    let state = Arc::new(ConnState {
        producer: Arc::from(id),
        pipelines,
        outbox: Mutex::new(OutboxState::default()),
        wake: Notify::new(),
    });
    shared.register(conn, state.clone())?;
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
    bump(&shared.counters.connections_refused, 1);
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
    loop {
        tokio::select! {
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
    /// The worker failed the stream (it sent the `error` frame already).
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
        index: 0,
        conn: conn.clone(),
        shared: shared.clone(),
        permits: Semaphore::new(shared.limits.protocol.max_in_flight as usize),
        failed: AtomicBool::new(false),
        stop: Mutex::new(None),
        wake: Notify::new(),
    });
    let end = read_loop(&shared, &conn, &mut recv, &mut stop, stream).await;
    match end {
        End::Quiet => {}
        End::Failed(error, message) => {
            bump(&shared.counters.stream_errors, 1);
            tracing::warn!(
                "producer `{}`, stream {id}: {message} ({error:?})",
                conn.producer
            );
            conn.error(error, id, message);
            let _ = recv.stop(code(error));
        }
        End::Stopped(error) => {
            let _ = recv.stop(code(error));
        }
    }
    drop(guard);
}

async fn read_loop(
    shared: &Shared,
    conn: &ConnState,
    recv: &mut RecvStream,
    stop: &mut watch::Receiver<bool>,
    mut stream: Arc<StreamShared>,
) -> End {
    let limits = shared.limits.protocol;
    let mut decoder = Decoder::batch_stream(limits, conn.pipelines.len());
    let mut pipeline: Option<u16> = None;
    let mut rest = Bytes::new();
    // Chunks read from quinn and not decoded yet: `chunks[next..filled]`.
    let mut chunks: Vec<Bytes> = vec![Bytes::new(); READ_CHUNKS];
    let (mut next, mut filled) = (0, 0);
    // Whether this task holds the permit of the frame it is reading.
    let mut holding = false;
    loop {
        if !holding {
            match stream.permits.try_acquire() {
                Ok(permit) => permit.forget(),
                Err(_) => tokio::select! {
                    permit = stream.permits.acquire() => match permit {
                        Ok(permit) => permit.forget(),
                        Err(_) => return End::Quiet,
                    },
                    _ = stream.wake.notified() => return stopped(&stream),
                    _ = stopping(stop) => return End::Quiet,
                },
            }
            holding = true;
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
                _ = stream.wake.notified() => return stopped(&stream),
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
        holding = false;
        bump(&shared.counters.batches_received, 1);
        match pipeline {
            None => {
                pipeline = Some(frame.pipeline);
                // The worker reads the index through the Arc: set it before the first batch
                // leaves this task.
                if let Some(s) = Arc::get_mut(&mut stream) {
                    s.index = frame.pipeline;
                }
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
        let item = Item {
            frame,
            producer: conn.producer.clone(),
            stream: stream.clone(),
        };
        tokio::select! {
            sent = handle.tx.send(Work::Batch(item)) => if sent.is_err() {
                return End::Failed(
                    ErrorCode::InternalError,
                    format!("pipeline `{}` has stopped", handle.name),
                );
            },
            _ = stopping(stop) => return End::Quiet,
        }
    }
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
