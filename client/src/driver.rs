//! The driver task of a [`Producer`](crate::Producer): owns the QUIC endpoint and connection,
//! the control stream (writes `hello`, reads `welcome`/`refuse`, `ack`, `error`, `goaway`) and
//! one writer task per pipeline's batch stream; feeds the [`ProducerCore`](crate::ProducerCore)
//! its frames and timeouts; reconnects with backoff after a retryable loss.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt, WriteError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use weir_format::frame::{self, Decoder, ErrorCode, Frame, MAX_CONTROL_FRAME_BYTES, encode};

use crate::client::{Shared, State};
use crate::options::{ConnectOptions, ReconnectPolicy};
use crate::producer::{ClientError, Transmit, code_label};
use crate::tls::PinnedServerVerifier;

/// How long after a batch stream was stopped the driver waits for the `error` frame that
/// explains it (the server sends it first, but on another stream, so it may arrive later).
const STOP_EXPLANATION_WAIT: Duration = Duration::from_secs(2);

/// How long a connection may go without a datagram from the server while batches wait for
/// acks before it is given up for a new one: a live server acks within milliseconds and pings
/// every second, so this much silence means it is gone (a crash, a restart whose resets are
/// not reaching us yet because QUIC's probe timeouts have backed off), and reconnecting beats
/// waiting out the idle timeout.
const SILENCE: Duration = Duration::from_secs(1);
/// How often a connection looks for that silence.
const SILENCE_CHECK: Duration = Duration::from_millis(250);

/// Why a connection ended.
enum Failure {
    /// Reconnect (after backoff); the text says why, for logs and the give-up error.
    Retry(String),
    /// The server refused the `hello` with a code that says to come back later (its
    /// producer limit, a shutdown): retried with backoff, even on the first connection.
    Busy(String),
    /// Stop: every pending operation fails with this error.
    Fatal(ClientError),
}

/// The QUIC side of a producer: endpoint, configuration, the current connection.
pub(crate) struct Driver {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    tls: Tls,
    addr: SocketAddr,
    server_name: String,
    reconnect: ReconnectPolicy,
    handshake_timeout: Duration,
    session: Session,
}

/// The client configuration and, when pinning, the verifier that explains a rejection.
struct Tls {
    config: quinn::ClientConfig,
    pin: Option<Arc<PinnedServerVerifier>>,
}

/// One connection after its `welcome`.
struct Session {
    conn: Connection,
    /// The control stream's send half, kept open for the connection's life (finishing it
    /// means the producer is leaving).
    _control_send: SendStream,
    control_recv: RecvStream,
    decoder: Decoder,
    /// Frames decoded after `welcome` from the handshake's last chunk.
    queued: VecDeque<Frame>,
    /// Per pipeline: the channel to its writer task, once it has one.
    writers: Vec<Option<mpsc::UnboundedSender<Transmit>>>,
    writer_tasks: Vec<JoinHandle<()>>,
    failures_tx: mpsc::UnboundedSender<(u16, WriteError)>,
    failures_rx: mpsc::UnboundedReceiver<(u16, WriteError)>,
    /// Per pipeline: one past the highest sequence handed to a writer on this connection.
    written_below: Vec<u64>,
    /// `goaway` received: write nothing more, wait for the acks, then reconnect.
    draining: Option<String>,
    /// A batch stream the server stopped, waiting for its `error` frame until the deadline.
    stopped: Option<(u16, ErrorCode, Instant)>,
    /// Datagrams received from the server when last counted, and since when that count holds.
    heard: (u64, Instant),
    /// When to count them next.
    silence_check: Instant,
}

impl Drop for Session {
    fn drop(&mut self) {
        for task in &self.writer_tasks {
            task.abort();
        }
    }
}

impl Driver {
    /// Makes the endpoint and the first connection; any failure is returned as is.
    pub(crate) async fn connect(
        shared: Arc<Shared>,
        options: ConnectOptions,
        config: quinn::ClientConfig,
        pin: Option<Arc<PinnedServerVerifier>>,
    ) -> Result<Driver, ClientError> {
        let tls = Tls { config, pin };
        let bind: SocketAddr = if options.addr.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = Endpoint::client(bind).map_err(|e| ClientError::Connect {
            server: shared.server.clone(),
            message: format!("cannot open a UDP socket on {bind}: {e}"),
        })?;
        let server_name = options.tls_server_name();
        let started = Instant::now();
        let mut delay = options.reconnect.initial_backoff;
        let session = loop {
            match open_session(
                &shared,
                &endpoint,
                &tls,
                options.addr,
                &server_name,
                options.handshake_timeout,
            )
            .await
            {
                Ok(session) => break session,
                Err(Failure::Fatal(error)) => return Err(error),
                // No server there, or no answer: said at once.
                Err(Failure::Retry(message)) => {
                    return Err(ClientError::Connect {
                        server: shared.server.clone(),
                        message,
                    });
                }
                // A server that says "later" is asked again, as a reconnect would.
                Err(Failure::Busy(last)) => {
                    if let Some(limit) = options.reconnect.give_up_after
                        && started.elapsed() + delay >= limit
                    {
                        return Err(ClientError::GaveUp {
                            server: shared.server.clone(),
                            seconds: started.elapsed().as_secs(),
                            last,
                        });
                    }
                    tracing::warn!(server = %shared.server, "{last}; trying again in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2).min(options.reconnect.max_backoff);
                }
            }
        };
        Ok(Driver {
            shared,
            endpoint,
            tls,
            addr: options.addr,
            server_name,
            reconnect: options.reconnect,
            handshake_timeout: options.handshake_timeout,
            session,
        })
    }

    /// Runs until shutdown or a fatal error.
    pub(crate) async fn run(mut self) {
        loop {
            let failure = match self.session.run(&self.shared).await {
                Ok(()) => {
                    self.session
                        .conn
                        .close(VarInt::from_u32(0), b"producer closing");
                    self.stop(ClientError::ProducerClosed);
                    self.endpoint.wait_idle().await;
                    return;
                }
                Err(failure) => failure,
            };
            let reason = match failure {
                Failure::Fatal(error) => {
                    let code = match &error {
                        ClientError::Protocol { .. } => ErrorCode::ProtocolViolation,
                        _ => ErrorCode::NoError,
                    };
                    self.session
                        .conn
                        .close(VarInt::from(code.to_u16()), error.to_string().as_bytes());
                    self.stop(error);
                    self.endpoint.wait_idle().await;
                    return;
                }
                Failure::Retry(reason) | Failure::Busy(reason) => reason,
            };
            tracing::info!(server = %self.shared.server, %reason, "connection lost, reconnecting");
            self.session
                .conn
                .close(VarInt::from_u32(0), b"reconnecting");
            self.shared.lock().core.on_disconnect();
            match self.reconnect(reason).await {
                Ok(session) => {
                    self.session = session;
                    self.shared.lock().stats.reconnects += 1;
                }
                Err(error) => {
                    self.stop(error);
                    self.endpoint.wait_idle().await;
                    return;
                }
            }
        }
    }

    /// Fails what is pending with `error` (unless everything is acked) and wakes every waiter.
    fn stop(&self, error: ClientError) {
        {
            let mut state = self.shared.lock();
            if !state.core.is_idle() || !matches!(error, ClientError::ProducerClosed) {
                state.fail(error);
            }
            state.shutdown = true;
        }
        self.shared.bump();
    }

    /// Connects again with backoff until a `welcome`, a fatal failure, a shutdown or the
    /// policy's deadline.
    async fn reconnect(&self, mut last: String) -> Result<Session, ClientError> {
        let started = Instant::now();
        let mut delay = self.reconnect.initial_backoff;
        loop {
            if self.shared.lock().shutdown {
                return Err(ClientError::ProducerClosed);
            }
            if let Some(limit) = self.reconnect.give_up_after
                && started.elapsed() >= limit
            {
                return Err(ClientError::GaveUp {
                    server: self.shared.server.clone(),
                    seconds: started.elapsed().as_secs(),
                    last,
                });
            }
            // Sends keep waking the driver while it is disconnected: one sleep across wake-ups.
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    () = self.shared.wake.notified() => {
                        if self.shared.lock().shutdown {
                            return Err(ClientError::ProducerClosed);
                        }
                    }
                }
            }
            delay = delay.saturating_mul(2).min(self.reconnect.max_backoff);
            match open_session(
                &self.shared,
                &self.endpoint,
                &self.tls,
                self.addr,
                &self.server_name,
                self.handshake_timeout,
            )
            .await
            {
                Ok(session) => return Ok(session),
                Err(Failure::Fatal(error)) => return Err(error),
                Err(Failure::Retry(reason) | Failure::Busy(reason)) => {
                    tracing::debug!(server = %self.shared.server, %reason, "reconnect failed");
                    last = reason;
                }
            }
        }
    }
}

/// Connects, sends `hello` and applies the `welcome`.
async fn open_session(
    shared: &Arc<Shared>,
    endpoint: &Endpoint,
    tls: &Tls,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> Result<Session, Failure> {
    let handshake = handshake(shared, endpoint, tls, addr, server_name);
    let (conn, control_send, control_recv, decoder, welcome, queued) =
        match tokio::time::timeout(timeout, handshake).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(Failure::Retry(format!(
                    "no welcome within {} ms",
                    timeout.as_millis()
                )));
            }
        };
    let count = shared.pipelines.len();
    {
        let mut state = shared.lock();
        let completed = match state.core.on_welcome(&welcome) {
            Ok(completed) => completed,
            Err(error) => {
                conn.close(
                    VarInt::from(ErrorCode::ProtocolViolation.to_u16()),
                    error.to_string().as_bytes(),
                );
                return Err(Failure::Fatal(ClientError::Protocol {
                    server: shared.server.clone(),
                    message: error.to_string(),
                }));
            }
        };
        for (completed, pipeline) in completed.iter().map(|c| (c, usize::from(c.pipeline))) {
            let acked_below = welcome.pipelines.get(pipeline).map_or(0, |p| p.acked_below);
            state.complete(completed, acked_below);
        }
    }
    shared.bump();
    let (failures_tx, failures_rx) = mpsc::unbounded_channel();
    Ok(Session {
        conn,
        _control_send: control_send,
        control_recv,
        decoder,
        queued,
        writers: vec![None; count],
        writer_tasks: Vec::new(),
        failures_tx,
        failures_rx,
        written_below: vec![0; count],
        draining: None,
        stopped: None,
        heard: (0, Instant::now()),
        silence_check: Instant::now() + SILENCE_CHECK,
    })
}

type Handshake = (
    Connection,
    SendStream,
    RecvStream,
    Decoder,
    frame::Welcome,
    VecDeque<Frame>,
);

async fn handshake(
    shared: &Shared,
    endpoint: &Endpoint,
    tls: &Tls,
    addr: SocketAddr,
    server_name: &str,
) -> Result<Handshake, Failure> {
    let server = &shared.server;
    let connecting = endpoint
        .connect_with(tls.config.clone(), addr, server_name)
        .map_err(|e| {
            Failure::Fatal(ClientError::Connect {
                server: server.clone(),
                message: e.to_string(),
            })
        })?;
    let conn = connecting.await.map_err(|e| {
        match tls.pin.as_ref().and_then(|pin| pin.take_mismatch()) {
            Some(mismatch) => Failure::Fatal(ClientError::Connect {
                server: server.clone(),
                message: mismatch.to_string(),
            }),
            None => classify(server, &e, true),
        }
    })?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| classify(server, &e, true))?;
    let hello = shared.lock().core.hello();
    let mut bytes = Vec::new();
    encode(&Frame::Hello(hello), &mut bytes)
        .map_err(|e| Failure::Fatal(ClientError::InvalidConfig(format!("hello: {e}"))))?;
    if let Err(error) = send.write_all(&bytes).await {
        return Err(match error {
            WriteError::ConnectionLost(e) => classify(server, &e, true),
            other => Failure::Retry(format!("control stream: {other}")),
        });
    }
    let mut decoder = Decoder::control_from_server();
    loop {
        let chunk = match recv
            .read_chunk(MAX_CONTROL_FRAME_BYTES as usize, true)
            .await
        {
            Ok(Some(chunk)) => chunk,
            Ok(None) => {
                return Err(closed_or(&conn, server, "control stream ended before welcome").await);
            }
            Err(quinn::ReadError::ConnectionLost(e)) => return Err(classify(server, &e, true)),
            Err(other) => return Err(Failure::Retry(format!("control stream: {other}"))),
        };
        let mut input: &[u8] = &chunk.bytes;
        let mut welcome = None;
        let mut queued = VecDeque::new();
        while !input.is_empty() {
            match decoder.decode(&mut input) {
                Ok(Some(Frame::Welcome(w))) => welcome = Some(w),
                Ok(Some(Frame::Refuse(refuse))) => {
                    return Err(refusal(server, refuse.code, refuse.message));
                }
                Ok(Some(other)) => queued.push_back(other),
                Ok(None) => {}
                Err(error) => {
                    return Err(Failure::Fatal(ClientError::Protocol {
                        server: server.clone(),
                        message: error.to_string(),
                    }));
                }
            }
        }
        if let Some(welcome) = welcome {
            return Ok((conn, send, recv, decoder, welcome, queued));
        }
    }
}

/// A refusal: fatal unless its code says to retry.
fn refusal(server: &str, code: ErrorCode, message: String) -> Failure {
    if code.is_retryable() {
        Failure::Busy(format!("refused: {}: {message}", code_label(code)))
    } else {
        Failure::Fatal(ClientError::Refused {
            server: server.to_string(),
            code,
            message,
        })
    }
}

/// What a lost connection means. During the handshake, a close by the server is its refusal,
/// and a TLS failure (a certificate that is not the pinned one, a client certificate the server
/// rejects) is fatal: retrying cannot change it.
fn classify(server: &str, error: &ConnectionError, handshake: bool) -> Failure {
    match error {
        ConnectionError::ApplicationClosed(close) => {
            let code = ErrorCode::from_u16(
                u16::try_from(close.error_code.into_inner()).unwrap_or(u16::MAX),
            );
            let message = String::from_utf8_lossy(&close.reason).into_owned();
            if code.is_retryable() && handshake {
                refusal(server, code, message)
            } else if code.is_retryable() {
                Failure::Retry(format!(
                    "closed by the server: {}: {message}",
                    code_label(code)
                ))
            } else if handshake {
                refusal(server, code, message)
            } else {
                Failure::Fatal(ClientError::Closed {
                    server: server.to_string(),
                    code,
                    message,
                })
            }
        }
        ConnectionError::TransportError(e) if handshake && is_crypto(u64::from(e.code)) => {
            Failure::Fatal(ClientError::Connect {
                server: server.to_string(),
                message: e.to_string(),
            })
        }
        ConnectionError::ConnectionClosed(close)
            if handshake && is_crypto(u64::from(close.error_code)) =>
        {
            Failure::Fatal(ClientError::Connect {
                server: server.to_string(),
                message: format!("the server rejected the TLS handshake: {close}"),
            })
        }
        other => Failure::Retry(other.to_string()),
    }
}

/// QUIC transport error codes 0x100..=0x1ff carry a TLS alert.
fn is_crypto(code: u64) -> bool {
    (0x100..0x200).contains(&code)
}

/// After the control stream ended or failed: the connection's close reason if it is closing
/// (the server closes right after a refusal), otherwise `what` as a retryable failure.
async fn closed_or(conn: &Connection, server: &str, what: &str) -> Failure {
    match tokio::time::timeout(STOP_EXPLANATION_WAIT, conn.closed()).await {
        Ok(error) => classify(server, &error, false),
        Err(_) => Failure::Retry(what.to_string()),
    }
}

impl Session {
    /// Runs the connection until it fails (`Err`) or the producer shuts down with everything
    /// acked (`Ok`).
    async fn run(&mut self, shared: &Arc<Shared>) -> Result<(), Failure> {
        let server = shared.server.clone();
        while let Some(frame) = self.queued.pop_front() {
            self.on_frame(shared, frame)?;
        }
        loop {
            let deadline = {
                let mut state = shared.lock();
                if state.shutdown {
                    return Ok(());
                }
                if let Some(reason) = &self.draining
                    && self.drained(&state)
                {
                    return Err(Failure::Retry(format!("server going away: {reason}")));
                }
                self.pump(&mut state)?;
                let linger = state.core.poll_timeout();
                let stop = self.stopped.map(|(_, _, at)| at + STOP_EXPLANATION_WAIT);
                match (linger, stop) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            if let Some((pipeline, code, at)) = self.stopped
                && at.elapsed() >= STOP_EXPLANATION_WAIT
            {
                return Err(stream_failure(
                    &server,
                    code,
                    0,
                    format!(
                        "batch stream of pipeline `{}` stopped by the server",
                        shared.pipelines[usize::from(pipeline)]
                    ),
                ));
            }
            tokio::select! {
                biased;
                read = self.control_recv.read_chunk(MAX_CONTROL_FRAME_BYTES as usize, true) => {
                    match read {
                        Ok(Some(chunk)) => {
                            let mut input: &[u8] = &chunk.bytes;
                            while !input.is_empty() {
                                match self.decoder.decode(&mut input) {
                                    Ok(Some(frame)) => self.on_frame(shared, frame)?,
                                    Ok(None) => {}
                                    Err(error) => {
                                        return Err(Failure::Fatal(ClientError::Protocol {
                                            server,
                                            message: error.to_string(),
                                        }));
                                    }
                                }
                            }
                        }
                        Ok(None) => {
                            return Err(closed_or(&self.conn, &server, "control stream ended").await);
                        }
                        Err(quinn::ReadError::ConnectionLost(e)) => {
                            return Err(classify(&server, &e, false));
                        }
                        Err(other) => return Err(Failure::Retry(format!("control stream: {other}"))),
                    }
                }
                Some((pipeline, error)) = self.failures_rx.recv() => {
                    self.on_write_failure(&server, pipeline, error)?;
                }
                error = self.conn.closed() => return Err(classify(&server, &error, false)),
                () = shared.wake.notified() => {}
                () = sleep_until(deadline), if deadline.is_some() => {}
                () = sleep_until(Some(self.silence_check)) => {
                    self.silence_check = Instant::now() + SILENCE_CHECK;
                    let waiting = !self.drained(&shared.lock());
                    self.check_silence(waiting)?;
                }
            }
        }
    }

    /// Gives the connection up when the server has sent nothing for [`SILENCE`] while
    /// batches wait for acks (`waiting`).
    fn check_silence(&mut self, waiting: bool) -> Result<(), Failure> {
        let datagrams = self.conn.stats().udp_rx.datagrams;
        if datagrams != self.heard.0 || !waiting {
            self.heard = (datagrams, Instant::now());
            return Ok(());
        }
        if self.heard.1.elapsed() >= SILENCE {
            return Err(Failure::Retry(format!(
                "no answer from the server for {} ms with batches unacked",
                self.heard.1.elapsed().as_millis()
            )));
        }
        Ok(())
    }

    /// Whether every batch written on this connection is acked.
    fn drained(&self, state: &State) -> bool {
        self.written_below
            .iter()
            .zip(&state.acked_below)
            .all(|(written, acked)| acked >= written)
    }

    /// Closes batches due by linger and hands every transmittable batch to its writer.
    fn pump(&mut self, state: &mut State) -> Result<(), Failure> {
        let now = Instant::now();
        if state.core.poll_timeout().is_some_and(|due| due <= now)
            && let Err(error) = state.core.handle_timeout(now)
        {
            state.fail(error.clone());
            return Err(Failure::Fatal(error));
        }
        if self.draining.is_some() {
            return Ok(());
        }
        while let Some(transmit) = state.core.poll_transmit() {
            let index = usize::from(transmit.pipeline);
            state.stats.batches_sent += 1;
            state.stats.bytes_sent += (transmit.header.len() + transmit.payload.len()) as u64;
            self.written_below[index] = self.written_below[index].max(transmit.sequence + 1);
            let writer = self.writers[index].get_or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                let task = tokio::spawn(write_batches(
                    self.conn.clone(),
                    transmit.pipeline,
                    rx,
                    self.failures_tx.clone(),
                ));
                self.writer_tasks.push(task);
                tx
            });
            if writer.send(transmit).is_err() {
                // The writer stopped: its failure is in `failures_rx`, handled next.
                break;
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, shared: &Arc<Shared>, frame: Frame) -> Result<(), Failure> {
        let server = &shared.server;
        match frame {
            Frame::Ack(ack) => {
                {
                    let mut state = shared.lock();
                    match state.core.on_ack(ack) {
                        Ok(completed) => state.complete(&completed, ack.next),
                        Err(error) => {
                            return Err(Failure::Fatal(ClientError::Protocol {
                                server: server.clone(),
                                message: error.to_string(),
                            }));
                        }
                    }
                }
                shared.bump();
                Ok(())
            }
            Frame::Error(error) => Err(stream_failure(
                server,
                error.code,
                error.stream,
                error.message,
            )),
            Frame::Goaway(goaway) => {
                tracing::info!(%server, message = %goaway.message, "server going away");
                self.draining = Some(goaway.message);
                Ok(())
            }
            other => Err(Failure::Fatal(ClientError::Protocol {
                server: server.clone(),
                message: format!(
                    "unexpected frame type 0x{:02x} after welcome",
                    other.frame_type()
                ),
            })),
        }
    }

    fn on_write_failure(
        &mut self,
        server: &str,
        pipeline: u16,
        error: WriteError,
    ) -> Result<(), Failure> {
        match error {
            WriteError::Stopped(code) => {
                let code =
                    ErrorCode::from_u16(u16::try_from(code.into_inner()).unwrap_or(u16::MAX));
                // The `error` frame explaining it is on its way on the control stream.
                self.stopped.get_or_insert((pipeline, code, Instant::now()));
                Ok(())
            }
            WriteError::ConnectionLost(e) => Err(classify(server, &e, false)),
            other => Err(Failure::Retry(format!("batch stream: {other}"))),
        }
    }
}

/// An `error` from the server (or a stopped stream): reconnect if its code allows it.
fn stream_failure(server: &str, code: ErrorCode, stream: u64, message: String) -> Failure {
    if code.is_retryable() {
        Failure::Retry(format!(
            "error on stream {stream}: {}: {message}",
            code_label(code)
        ))
    } else {
        Failure::Fatal(ClientError::Server {
            server: server.to_string(),
            code,
            stream,
            message,
        })
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// Writes one pipeline's batches, in order, on one unidirectional stream: header then payload,
/// the payload being the core's `Bytes` (no copy).
async fn write_batches(
    conn: Connection,
    pipeline: u16,
    mut batches: mpsc::UnboundedReceiver<Transmit>,
    failures: mpsc::UnboundedSender<(u16, WriteError)>,
) {
    let mut stream = match conn.open_uni().await {
        Ok(stream) => stream,
        Err(error) => {
            let _ = failures.send((pipeline, WriteError::ConnectionLost(error)));
            return;
        }
    };
    while let Some(transmit) = batches.recv().await {
        let mut chunks = [Bytes::copy_from_slice(&transmit.header), transmit.payload];
        if let Err(error) = stream.write_all_chunks(&mut chunks).await {
            let _ = failures.send((pipeline, error));
            return;
        }
    }
}
