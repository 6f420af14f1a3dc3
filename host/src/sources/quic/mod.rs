//! The QUIC source: the server half of the `weir/1` protocol (docs/PROTOCOL.md).
//!
//! [`QuicSource::start`] binds a quinn endpoint (rustls, ALPN `weir/1`) for the pipelines it
//! is given and starts accepting; producers connect at once. It turns batch frames into
//! verified batches for the pipelines, and the pipelines' completions into cumulative acks.
//! [`QuicSource::stop_reading`] and [`QuicSource::close`] are the two halves of a graceful stop
//! (PROTOCOL §12), around the pipelines' own stop.
//!
//! Decisions (docs/SERVE.md has the user's view):
//!
//! - **Tasks.** One task per connection (handshake, then accepting streams), one task writing
//!   its control stream (welcome, coalesced acks, errors, goaway), and one task per batch
//!   stream that decodes frames (payloads copied once from quinn's `Bytes` into the frame),
//!   checks sequences and verifies batches (`pipeline.rs`), and hands them to the pipeline's
//!   worker. Acks are queued by the batches' completions, on whatever thread resolves them.
//! - **Backpressure and memory.** A connection's stream tasks read at most `max_in_flight`
//!   batches of a pipeline that are not acked (and one first frame per stream); then they stop
//!   reading and QUIC flow control pushes back. quinn's windows come from the limits: stream
//!   receive window = `max_frame_bytes + 4` (one whole frame in flight), connection receive
//!   window = that × the streams a connection may open (the pipelines configured + 1). Per
//!   connection the server holds at most `max_in_flight` frames per pipeline read or in the
//!   pipeline, and per batch stream the chunks taken from quinn and not decoded yet (within
//!   one window) and quinn's own buffer (one window), so the memory held for producers is at
//!   most `max_connections × (pipelines + 1) × (max_in_flight + 2) × (max_frame_bytes + 4)`
//!   plus 64 KiB per control stream, whatever the producers do.
//! - **Sequence state** is per (producer id, pipeline) and lives here, in memory (PROTOCOL §11:
//!   exactly once while the process lives, at least once across a crash). A batch's sequence
//!   is taken when it enters the pipeline; the acked mark moves as the pipeline accepts
//!   batches, in sequence order (`sequence.rs`).
//! - **Restarts.** The endpoint's keys (stateless resets, connection IDs) are kept in the data
//!   directory (`reset.rs`), so a restarted server's resets end its producers' old
//!   connections at once and they reconnect within their first backoff, instead of waiting
//!   out the idle timeout.
//! - **Over `max_connections`**, a new connection is refused at the QUIC level before TLS
//!   (transport error `CONNECTION_REFUSED`): a flood costs no handshake and leaves the others
//!   alone.

pub mod config;
mod connection;
mod pipeline;
mod reset;
mod sequence;
mod tls;

use crate::metrics::{Metrics, SourceMetrics};
use crate::pipeline::{PipelineInput, Position};
use anyhow::{Context, Result};
use config::{ListenerConfig, ServerLimits};
use connection::ConnState;
use pipeline::{QuicPipeline, lock};
use quinn::{Connection, Endpoint, TokioRuntime, VarInt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use weir_format::frame::{ErrorCode, LENGTH_BYTES, MAX_PIPELINES};

/// How often the server pings an idle connection (quinn's idle timeout is 30 s): a live
/// producer's answer is how a connection knows it is not dead (`connection.rs`).
const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// A producer not heard from for this long (several keep-alive pings unanswered) gives its
/// slot on a full pipeline to a producer that connects.
const DEAD_AFTER: Duration = Duration::from_secs(4);
/// How long closing waits for the connections to close after their last ack.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// The source's name in the metrics.
pub const SOURCE: &str = "quic";

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Counts live tasks of one kind and lets shutdown wait for them.
#[derive(Clone, Default)]
pub(crate) struct WaitGroup {
    inner: Arc<(AtomicUsize, Notify)>,
}

/// One live task of a [`WaitGroup`]; dropping it ends the task's count.
pub(crate) struct WaitGuard {
    group: WaitGroup,
}

impl WaitGroup {
    fn guard(&self) -> WaitGuard {
        self.inner.0.fetch_add(1, Ordering::AcqRel);
        WaitGuard {
            group: self.clone(),
        }
    }

    fn count(&self) -> usize {
        self.inner.0.load(Ordering::Acquire)
    }

    async fn wait(&self) {
        loop {
            let notified = self.inner.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if self.group.inner.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.group.inner.1.notify_waiters();
        }
    }
}

struct Registered {
    conn: Connection,
    state: Arc<ConnState>,
}

/// What every task of the source shares.
pub(crate) struct Shared {
    limits: ServerLimits,
    pipelines: RwLock<HashMap<String, Arc<QuicPipeline>>>,
    /// Producer tokens and whether anonymous producers are welcome (a reload may change them).
    auth: RwLock<Auth>,
    metrics: SourceMetrics,
    shutting_down: AtomicBool,
    registry: Mutex<HashMap<String, Registered>>,
    stop_reading: watch::Sender<bool>,
    streams: WaitGroup,
    connections: WaitGroup,
}

/// Who may connect.
struct Auth {
    tokens: HashMap<String, Vec<u8>>,
    allow_anonymous: bool,
}

impl Auth {
    fn of(listener: &ListenerConfig) -> Auth {
        Auth {
            tokens: listener
                .producers
                .iter()
                .map(|p| (p.id.clone(), p.token.clone()))
                .collect(),
            allow_anonymous: listener.allow_anonymous,
        }
    }
}

impl Shared {
    /// Checks the producer's token or client certificate.
    fn authenticate(
        &self,
        conn: &Connection,
        id: &str,
        token: &[u8],
    ) -> Result<(), (ErrorCode, String)> {
        let refuse = |message: String| Err((ErrorCode::Unauthenticated, message));
        let certificate = || tls::certificate_names(conn, id);
        let auth = read(&self.auth);
        match auth.tokens.get(id) {
            Some(expected) if !token.is_empty() => {
                if constant_time_eq(token, expected) {
                    Ok(())
                } else {
                    refuse(format!("producer `{id}`: wrong token"))
                }
            }
            Some(_) => match certificate() {
                Some(true) => Ok(()),
                Some(false) => refuse(format!(
                    "producer `{id}`: no token, and the client certificate is not valid for this producer id"
                )),
                None => refuse(format!("producer `{id}`: no token")),
            },
            None if !token.is_empty() => refuse(format!(
                "producer `{id}`: unknown producer (no token is configured for it)"
            )),
            None => match certificate() {
                Some(true) => Ok(()),
                Some(false) => refuse(format!(
                    "producer `{id}`: the client certificate is not valid for this producer id"
                )),
                None if auth.allow_anonymous => Ok(()),
                None => refuse(format!(
                    "producer `{id}`: no token and no client certificate"
                )),
            },
        }
    }

    /// Registers an admitted connection: the producer limits (on a full pipeline, producers
    /// not heard from for [`DEAD_AFTER`] are evicted first), then shutdown, then the
    /// newest-wins rule (PROTOCOL §6).
    fn register(
        &self,
        conn: &Connection,
        state: Arc<ConnState>,
    ) -> Result<(), (ErrorCode, String)> {
        let mut registry = lock(&self.registry);
        let id = state.producer.clone();
        let limit = self.limits.max_producers_per_pipeline as usize;
        for pipeline in &state.pipelines {
            let holders = |registry: &HashMap<String, Registered>| -> Vec<String> {
                registry
                    .iter()
                    .filter(|(other, r)| {
                        other.as_str() != &*id
                            && r.state.pipelines.iter().any(|p| Arc::ptr_eq(p, pipeline))
                    })
                    .map(|(other, _)| other.clone())
                    .collect()
            };
            let mut connected = holders(&registry);
            if connected.len() >= limit {
                // A producer that vanished (no close, no answer to pings) gives its slot up.
                for other in &connected {
                    if let Some(r) = registry.get(other)
                        && r.state.quiet_for() >= DEAD_AFTER
                    {
                        let reason = format!(
                            "producer `{other}`: not heard from for {} s; its slot on pipeline `{}` went to producer `{id}`",
                            r.state.quiet_for().as_secs(),
                            pipeline.name
                        );
                        tracing::info!("{reason}");
                        r.state.evict(&reason);
                        registry.remove(other);
                    }
                }
                connected = holders(&registry);
            }
            let connected = connected.len();
            if connected >= limit {
                return Err((
                    ErrorCode::TooManyProducers,
                    format!(
                        "pipeline `{}`: {connected} producers connected, the limit is {limit} (max_producers_per_pipeline)",
                        pipeline.name
                    ),
                ));
            }
        }
        if self.shutting_down.load(Ordering::Acquire) {
            return Err((
                ErrorCode::ShuttingDown,
                "the server is shutting down".into(),
            ));
        }
        let previous = registry.insert(
            id.to_string(),
            Registered {
                conn: conn.clone(),
                state,
            },
        );
        if let Some(previous) = previous {
            let reason = format!(
                "producer `{id}` connected again from {}",
                conn.remote_address()
            );
            tracing::info!("{reason}: closing its previous connection (superseded)");
            previous
                .conn
                .close(connection::code(ErrorCode::Superseded), reason.as_bytes());
        }
        Ok(())
    }

    fn unregister(&self, id: &str, stable_id: usize) {
        let mut registry = lock(&self.registry);
        if registry
            .get(id)
            .is_some_and(|r| r.conn.stable_id() == stable_id)
        {
            registry.remove(id);
        }
    }

    /// The pipeline producers name `name`.
    fn pipeline(&self, name: &str) -> Option<Arc<QuicPipeline>> {
        read(&self.pipelines).get(name).cloned()
    }
}

/// Compares secrets without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A pipeline the source feeds: its queue, who may write to it, and where its producers
/// resume.
pub struct PipelineEntry {
    /// The pipeline's queue.
    pub input: PipelineInput,
    /// Producers allowed to write; `None`: every authenticated producer.
    pub allowed: Option<Vec<String>>,
    /// Where producers resume (a checkpoint's positions; empty: from their first batch).
    pub positions: Vec<Position>,
}

impl PipelineEntry {
    /// The pipeline as the source feeds it, by name.
    fn into_quic(self, metrics: &Metrics) -> (String, Arc<QuicPipeline>) {
        let name = self.input.name().to_owned();
        let quic = QuicPipeline::new(
            self.input,
            self.allowed,
            metrics.pipeline(&name),
            &self.positions,
        );
        (name, Arc::new(quic))
    }
}

/// The running QUIC source.
pub struct QuicSource {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    crypto: Arc<quinn::crypto::rustls::QuicServerConfig>,
    local_addr: SocketAddr,
    fingerprint: String,
    cert_path: PathBuf,
    cert_generated: bool,
    stop_accept: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for QuicSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicSource")
            .field("local_addr", &self.local_addr)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl QuicSource {
    /// Loads the certificate (generating it once into `data_dir` when no TLS is configured),
    /// binds the listener and starts accepting producers for `pipelines`.
    pub fn start(
        listener: &ListenerConfig,
        data_dir: &Path,
        pipelines: Vec<PipelineEntry>,
        metrics: &Metrics,
    ) -> Result<QuicSource> {
        let tls = tls::setup(listener, data_dir)?;
        let crypto = Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls.config)
                .context("TLS config unusable for QUIC")?,
        );
        let server_config = server_config(listener.limits.protocol, pipelines.len(), &crypto)?;
        let endpoint_config = reset::endpoint_config(data_dir)?;
        let socket = std::net::UdpSocket::bind(listener.listen)
            .with_context(|| format!("cannot listen on {}", listener.listen))?;
        let endpoint = Endpoint::new(
            endpoint_config,
            Some(server_config),
            socket,
            Arc::new(TokioRuntime),
        )
        .with_context(|| format!("cannot listen on {}", listener.listen))?;
        let local_addr = endpoint.local_addr().context("listener address")?;
        let pipelines = pipelines
            .into_iter()
            .map(|entry| entry.into_quic(metrics))
            .collect();
        let shared = Arc::new(Shared {
            limits: listener.limits,
            pipelines: RwLock::new(pipelines),
            auth: RwLock::new(Auth::of(listener)),
            metrics: metrics.source(SOURCE),
            shutting_down: AtomicBool::new(false),
            registry: Mutex::new(HashMap::new()),
            stop_reading: watch::Sender::new(false),
            streams: WaitGroup::default(),
            connections: WaitGroup::default(),
        });
        let (stop_accept, stop_rx) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(shared.clone(), endpoint.clone(), stop_rx));
        Ok(QuicSource {
            shared,
            endpoint,
            crypto,
            local_addr,
            fingerprint: tls.fingerprint,
            cert_path: tls.cert_path,
            cert_generated: tls.generated,
            stop_accept,
            accept,
        })
    }

    /// The address the source listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The SHA-256 fingerprint (64 hex digits) of the certificate the server presents.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// The certificate file the server presents.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Whether the certificate is the self-signed one generated into the data directory.
    pub fn cert_generated(&self) -> bool {
        self.cert_generated
    }

    /// A handle through which a reload changes what the source feeds.
    pub fn control(&self) -> QuicControl {
        QuicControl {
            shared: self.shared.clone(),
            endpoint: self.endpoint.clone(),
            crypto: self.crypto.clone(),
        }
    }

    /// The first half of a graceful stop (PROTOCOL §12): `goaway` to every producer, new
    /// connections refused with `SHUTTING_DOWN`, no further batch read; returns once every
    /// stream task has handed over what it read. The pipelines then finish those batches.
    pub async fn stop_reading(&self) {
        let shared = &self.shared;
        let connections: Vec<Arc<ConnState>> = {
            let registry = lock(&shared.registry);
            shared.shutting_down.store(true, Ordering::Release);
            registry.values().map(|r| r.state.clone()).collect()
        };
        tracing::info!("shutting down: {} producers connected", connections.len());
        for conn in &connections {
            conn.goaway("shutting down");
        }
        shared.stop_reading.send_replace(true);
        shared.streams.wait().await;
    }

    /// Batches that stay unacked because an earlier batch of the same producer was not
    /// accepted, as problems (after the pipelines stopped).
    pub fn withheld(&self) -> Vec<String> {
        let pipelines: Vec<Arc<QuicPipeline>> =
            read(&self.shared.pipelines).values().cloned().collect();
        let mut problems: Vec<(String, String)> = pipelines
            .iter()
            .filter_map(|p| {
                let n = p.withheld();
                let batches = if n == 1 { "batch" } else { "batches" };
                (n > 0).then(|| {
                    (
                        p.name.clone(),
                        format!(
                            "pipeline `{}`: {n} later {batches} not acked: an earlier batch was not accepted, and an ack would cover it too",
                            p.name
                        ),
                    )
                })
            })
            .collect();
        problems.sort();
        problems.into_iter().map(|(_, p)| p).collect()
    }

    /// The second half of a graceful stop: each connection sends what is queued (the last
    /// acks) and closes with `NO_ERROR`, then the endpoint closes.
    pub async fn close(self) {
        let shared = &self.shared;
        let connections: Vec<Arc<ConnState>> = lock(&shared.registry)
            .values()
            .map(|r| r.state.clone())
            .collect();
        for conn in &connections {
            conn.close(ErrorCode::NoError, "shutting down");
        }
        if tokio::time::timeout(CLOSE_WAIT, shared.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close in time");
        }
        self.stop_accept.send_replace(true);
        let _ = self.accept.await;
        self.endpoint.close(VarInt::from_u32(0), b"shutting down");
        let _ = tokio::time::timeout(CLOSE_WAIT, self.endpoint.wait_idle()).await;
    }
}

/// What a reload changes of a running QUIC source: the pipelines it feeds, who may write to
/// them, and who may connect. Connections made from then on see the change; a connection
/// already made keeps its pipelines, except that a removed one refuses its batches.
#[derive(Clone)]
pub struct QuicControl {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    crypto: Arc<quinn::crypto::rustls::QuicServerConfig>,
}

impl QuicControl {
    /// Feeds a new pipeline.
    pub fn add(&self, entry: PipelineEntry, metrics: &Metrics) -> Result<()> {
        let (name, quic) = entry.into_quic(metrics);
        write(&self.shared.pipelines).insert(name, quic);
        self.resize()
    }

    /// A reload removed pipeline `name`: its batches are refused from now on with
    /// `UNKNOWN_PIPELINE`, and new connections cannot name it.
    pub fn remove(&self, name: &str) -> Result<()> {
        if let Some(pipeline) = write(&self.shared.pipelines).remove(name) {
            pipeline.remove();
        }
        self.resize()
    }

    /// Pipeline `name` has a new worker: its batches go to `input` from now on.
    pub fn restart(&self, name: &str, input: PipelineInput) {
        if let Some(pipeline) = self.shared.pipeline(name) {
            pipeline.set_input(input);
        }
    }

    /// Producers allowed on pipeline `name` from now on; `None`: every authenticated one.
    pub fn set_allowed(&self, name: &str, allowed: Option<Vec<String>>) {
        if let Some(pipeline) = self.shared.pipeline(name) {
            pipeline.set_allowed(allowed);
        }
    }

    /// Producer tokens and `anonymous` from now on.
    pub fn set_auth(&self, listener: &ListenerConfig) {
        *write(&self.shared.auth) = Auth::of(listener);
    }

    /// New connections may open a batch stream per pipeline: the transport follows the
    /// number of pipelines.
    fn resize(&self) -> Result<()> {
        let pipelines = read(&self.shared.pipelines).len();
        let config = server_config(self.shared.limits.protocol, pipelines, &self.crypto)?;
        self.endpoint.set_server_config(Some(config));
        Ok(())
    }
}

async fn accept_loop(shared: Arc<Shared>, endpoint: Endpoint, mut stop: watch::Receiver<bool>) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = connection::stopping(&mut stop) => return,
        };
        let Some(incoming) = incoming else { return };
        if shared.connections.count() >= shared.limits.max_connections as usize {
            shared.metrics.connections_over_limit.inc();
            tracing::warn!(
                "refused a connection from {}: {} connections open (max_connections)",
                incoming.remote_address(),
                shared.limits.max_connections
            );
            incoming.refuse();
            continue;
        }
        let guard = shared.connections.guard();
        tokio::spawn(connection::run(shared.clone(), incoming, guard));
    }
}

/// quinn's server config: the TLS config plus [`transport_config`].
fn server_config(
    limits: weir_format::frame::Limits,
    pipelines: usize,
    crypto: &Arc<quinn::crypto::rustls::QuicServerConfig>,
) -> Result<quinn::ServerConfig> {
    let mut server = quinn::ServerConfig::with_crypto(crypto.clone());
    server.transport_config(Arc::new(transport_config(limits, pipelines)?));
    Ok(server)
}

/// The QUIC transport `weir serve` runs with `limits` and `pipelines` pipelines: one control
/// stream, a batch stream per pipeline, a stream window of one maximum frame and a connection
/// window of one per stream (the flow control that pushes back on producers, PROTOCOL §8).
/// `weir bench --e2e` gives its raw-quinn baseline the same.
pub fn transport_config(
    limits: weir_format::frame::Limits,
    pipelines: usize,
) -> Result<quinn::TransportConfig> {
    let streams = pipelines.clamp(1, MAX_PIPELINES) as u32 + 1;
    let stream_window = u64::from(limits.max_frame_bytes) + LENGTH_BYTES as u64;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(1))
        .max_concurrent_uni_streams(VarInt::from_u32(streams))
        .stream_receive_window(VarInt::from_u64(stream_window).context("stream window")?)
        .receive_window(
            VarInt::from_u64(stream_window * u64::from(streams)).context("connection window")?,
        )
        // A producer with nothing to send stays connected; a dead one still times out.
        .keep_alive_interval(Some(KEEP_ALIVE));
    Ok(transport)
}
