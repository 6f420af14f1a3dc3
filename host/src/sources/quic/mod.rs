//! QUIC ingest: the server half of the `weir/1` protocol (docs/PROTOCOL.md), `weir serve`.
//!
//! [`Server::start`] binds a quinn endpoint (rustls, ALPN `weir/1`), compiles the pipelines'
//! plugins, opens their sinks, starts one worker thread per pipeline and returns; producers
//! connect at once. [`Server::shutdown`] stops gracefully (PROTOCOL §12). [`Server::stats`]
//! reads the counters.
//!
//! Decisions (docs/SERVE.md has the user's view):
//!
//! - **Tasks and threads.** One task per connection (handshake, then accepting streams), one
//!   task writing its control stream (welcome, coalesced acks, errors, goaway), one task per
//!   batch stream that only frames (no per-event work, payloads copied once from quinn's
//!   `Bytes` into the frame), and one OS thread per pipeline that verifies, runs the stages,
//!   writes and flushes the sinks, then acks (see `worker.rs`). wasmtime never blocks a tokio
//!   worker.
//! - **Backpressure and memory.** A connection's stream tasks read at most `max_in_flight`
//!   batches of a pipeline that are not acked (and one first frame per stream); then they stop
//!   reading and QUIC flow control pushes back. quinn's windows come from the limits: stream
//!   receive window = `max_frame_bytes + 4` (one whole frame in flight), connection receive
//!   window = that × the streams a connection may open (the pipelines configured + 1). Per
//!   connection the server holds at most `max_in_flight` frames per pipeline read or being
//!   read, and per batch stream the chunks taken from quinn and not decoded yet (within one
//!   window) and quinn's own buffer (one window), so the memory held for producers is at most
//!   `max_connections × (pipelines + 1) × (max_in_flight + 2) × (max_frame_bytes + 4)`
//!   plus 64 KiB per control stream, whatever the producers do.
//! - **Sequence state** is per (producer id, pipeline) and lives with the pipeline, in memory
//!   (PROTOCOL §11: exactly once while the process lives, at least once across a crash).
//! - **Over `max_connections`**, a new connection is refused at the QUIC level before TLS
//!   (transport error `CONNECTION_REFUSED`): a flood costs no handshake and leaves the others
//!   alone.

pub mod config;
mod connection;
mod tls;
mod worker;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::config::{PipelineConfig, PluginSource};
use crate::pipeline::route::{Condition, Unmatched};
use crate::pipeline::{Chain, Stage};
use crate::runtime::{Limits, Plugin, Runtime, RuntimeConfig, StageConfig};
use crate::sinks::runner::Sink;
use crate::sinks::{self, FileDestination};
use crate::sinks::{BufferConfig, FileConfig, Fsync, RetryConfig, WhenFull};
use anyhow::{Context, Result, bail};
use config::ServerLimits;
use connection::ConnState;
use quinn::{Connection, Endpoint, VarInt};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use weir_format::frame::{ErrorCode, LENGTH_BYTES, MAX_PIPELINES};
use worker::{PipelineCore, PipelineHandle, UnmatchedOut, Work, Worker, lock};

/// How often the server pings an idle connection (quinn's idle timeout is 30 s).
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// How long shutdown waits for the connections to close after their last ack.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Server-wide counters.
#[derive(Default)]
pub(crate) struct Counters {
    connections_accepted: AtomicU64,
    connections_refused: AtomicU64,
    connections_over_limit: AtomicU64,
    batches_received: AtomicU64,
    stream_errors: AtomicU64,
}

/// Counters of one pipeline.
#[derive(Default)]
pub(crate) struct PipelineCounters {
    batches_accepted: AtomicU64,
    events_accepted: AtomicU64,
    duplicates_dropped: AtomicU64,
    batches_discarded: AtomicU64,
    batches_acked: AtomicU64,
    events_out: AtomicU64,
    dead_letters: AtomicU64,
    late_events: AtomicU64,
}

/// A snapshot of a pipeline's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Batches verified and accepted (their sequence consumed).
    pub batches_accepted: u64,
    /// Events in the accepted batches.
    pub events_accepted: u64,
    /// Batches dropped unverified as duplicates (a sequence already accepted).
    pub duplicates_dropped: u64,
    /// Batches read after their stream failed, dropped unprocessed.
    pub batches_discarded: u64,
    /// Accepted batches acked (accepted by every sink that takes events of them).
    pub batches_acked: u64,
    /// Events the last stage output (fanned out to the sinks).
    pub events_out: u64,
    /// Dead letters written to the dead-letter sink.
    pub dead_letters: u64,
    /// Late events written to the dead-letter sink.
    pub late_events: u64,
}

impl PipelineCounters {
    fn snapshot(&self) -> PipelineStats {
        PipelineStats {
            batches_accepted: read(&self.batches_accepted),
            events_accepted: read(&self.events_accepted),
            duplicates_dropped: read(&self.duplicates_dropped),
            batches_discarded: read(&self.batches_discarded),
            batches_acked: read(&self.batches_acked),
            events_out: read(&self.events_out),
            dead_letters: read(&self.dead_letters),
            late_events: read(&self.late_events),
        }
    }
}

/// A snapshot of the server's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections whose `hello` was accepted (`welcome` sent).
    pub connections_accepted: u64,
    /// Connections refused in the handshake (`refuse` sent).
    pub connections_refused: u64,
    /// Connections refused at the QUIC level because `max_connections` were open.
    pub connections_over_limit: u64,
    /// Batch frames read off streams (duplicates and later-failed ones included).
    pub batches_received: u64,
    /// Batch streams failed with an error (framing, limits, invalid batch, gap).
    pub stream_errors: u64,
    /// Sum over the pipelines.
    pub batches_accepted: u64,
    /// Sum over the pipelines.
    pub events_accepted: u64,
    /// Sum over the pipelines.
    pub duplicates_dropped: u64,
    /// Sum over the pipelines.
    pub batches_acked: u64,
    /// Sum over the pipelines.
    pub events_out: u64,
    /// Sum over the pipelines.
    pub dead_letters: u64,
    /// Per pipeline, by name.
    pub pipelines: BTreeMap<String, PipelineStats>,
    /// Per sink, by name (dead-letter files included, named `PIPELINE/dead-letters`).
    pub sinks: BTreeMap<String, SinkStats>,
}

/// A snapshot of a sink's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Events accepted into its buffer (memory or disk).
    pub events_in: u64,
    /// Events delivered to its destination.
    pub events_out: u64,
    /// Events dropped by its `when_full` policy.
    pub dropped: u64,
    /// Failed send attempts.
    pub errors: u64,
    /// Events its destination refused, sent to the dead-letter sink.
    pub dead_lettered: u64,
    /// Events buffered now (memory or disk).
    pub buffered: u64,
}

/// What a graceful shutdown did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// The counters once everything stopped.
    pub stats: Stats,
    /// Problems met while stopping (a sink that could not flush, windows not flushed); empty
    /// when everything accepted was written and acked.
    pub problems: Vec<String>,
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

/// What every task of the server shares.
pub(crate) struct Shared {
    limits: ServerLimits,
    pipelines: HashMap<String, Arc<PipelineHandle>>,
    tokens: HashMap<String, Vec<u8>>,
    allow_anonymous: bool,
    counters: Counters,
    shutting_down: AtomicBool,
    registry: Mutex<HashMap<String, Registered>>,
    stop_reading: watch::Sender<bool>,
    streams: WaitGroup,
    connections: WaitGroup,
    /// Every sink, by name (pipelines' default dead-letter files included).
    sinks: BTreeMap<String, Arc<Sink>>,
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
        match self.tokens.get(id) {
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
                None if self.allow_anonymous => Ok(()),
                None => refuse(format!(
                    "producer `{id}`: no token and no client certificate"
                )),
            },
        }
    }

    /// Registers an admitted connection: the producer limits, then shutdown, then the
    /// newest-wins rule (PROTOCOL §6).
    fn register(
        &self,
        conn: &Connection,
        state: Arc<ConnState>,
    ) -> Result<(), (ErrorCode, String)> {
        let mut registry = lock(&self.registry);
        let id = state.producer.clone();
        for pipeline in &state.pipelines {
            let connected = registry
                .iter()
                .filter(|(other, r)| {
                    other.as_str() != &*id
                        && r.state.pipelines.iter().any(|p| Arc::ptr_eq(p, pipeline))
                })
                .count();
            let limit = self.limits.max_producers_per_pipeline as usize;
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

    fn stats(&self) -> Stats {
        let c = &self.counters;
        let mut stats = Stats {
            connections_accepted: read(&c.connections_accepted),
            connections_refused: read(&c.connections_refused),
            connections_over_limit: read(&c.connections_over_limit),
            batches_received: read(&c.batches_received),
            stream_errors: read(&c.stream_errors),
            ..Stats::default()
        };
        for (name, p) in &self.pipelines {
            let s = p.counters.snapshot();
            stats.batches_accepted += s.batches_accepted;
            stats.events_accepted += s.events_accepted;
            stats.duplicates_dropped += s.duplicates_dropped;
            stats.batches_acked += s.batches_acked;
            stats.events_out += s.events_out;
            stats.dead_letters += s.dead_letters;
            stats.pipelines.insert(name.clone(), s);
        }
        for (name, sink) in &self.sinks {
            let m = sink.metrics();
            stats.sinks.insert(
                name.clone(),
                SinkStats {
                    events_in: m.events_in.get(),
                    events_out: m.events_out.get(),
                    dropped: m.dropped.get(),
                    errors: m.errors.get(),
                    dead_lettered: m.dead_lettered.get(),
                    buffered: sink.buffered(),
                },
            );
        }
        stats
    }
}

/// Compares secrets without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A pipeline as the server runs it, for printing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineInfo {
    /// Its name.
    pub name: String,
    /// Its stages: name, plugin name and version.
    pub stages: Vec<String>,
    /// The sinks it writes to.
    pub sinks: Vec<String>,
    /// Where its dead letters go.
    pub dead_letters: String,
}

/// A running `weir serve`.
pub struct Server {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    local_addr: SocketAddr,
    fingerprint: String,
    cert_path: PathBuf,
    cert_generated: bool,
    pipelines: Vec<PipelineInfo>,
    workers: Vec<std::thread::JoinHandle<()>>,
    runners: Vec<(Arc<Sink>, tokio::task::JoinHandle<Vec<String>>)>,
    metrics: Arc<Metrics>,
    metrics_server: Option<crate::metrics::MetricsServer>,
    stop_accept: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds the listener, loads the certificate (generating it once when no TLS is
    /// configured), compiles every plugin, opens every sink, starts the pipeline workers and
    /// the accept loop, and returns: producers can connect at once.
    pub async fn start(config: Config) -> Result<Server> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
        let tls = tls::setup(&config)?;

        let stage_count: usize = config.pipelines.iter().map(|p| p.stages.len()).sum();
        let max_memory = config
            .pipelines
            .iter()
            .flat_map(|p| &p.stages)
            .map(|s| s.memory_bytes)
            .max()
            .unwrap_or(0)
            .max(RuntimeConfig::default().max_memory_bytes);
        let runtime = Runtime::new(RuntimeConfig {
            max_instances: u32::try_from(2 * stage_count + 2).unwrap_or(u32::MAX),
            max_memory_bytes: max_memory,
            ..RuntimeConfig::default()
        })?;

        let metrics = Metrics::new();
        let mut sinks: BTreeMap<String, Arc<Sink>> = BTreeMap::new();
        let mut destinations = Vec::new();
        for sink in &config.sinks {
            let destination = sinks::open(sink)?;
            let handle = Sink::new(
                &sink.name,
                destination.describe(),
                sink.buffer,
                sink.retry,
                &config.data_dir.join("spill").join(&sink.name),
                metrics.sink(&sink.name),
            )
            .map_err(anyhow::Error::msg)?;
            sinks.insert(sink.name.clone(), handle.clone());
            destinations.push((handle, destination));
        }
        let mut plugins: HashMap<String, Plugin> = HashMap::new();
        let mut handles = HashMap::new();
        let mut workers = Vec::new();
        let mut infos = Vec::new();
        for pipeline in &config.pipelines {
            let (handle, worker, info) = build_pipeline(
                &config,
                pipeline,
                &runtime,
                &mut plugins,
                &mut sinks,
                &mut destinations,
                &metrics,
            )?;
            handles.insert(pipeline.name.clone(), handle);
            infos.push(info);
            workers.push(worker);
        }
        let metrics_server = match config.metrics {
            Some(addr) => Some(
                crate::metrics::serve(addr, metrics.clone())
                    .await
                    .with_context(|| format!("cannot serve metrics on {addr}"))?,
            ),
            None => None,
        };

        let server_config = server_config(&config, tls.config)?;
        let endpoint = Endpoint::server(server_config, config.listener.listen)
            .with_context(|| format!("cannot listen on {}", config.listener.listen))?;
        let local_addr = endpoint.local_addr().context("listener address")?;

        let shared = Arc::new(Shared {
            limits: config.listener.limits,
            pipelines: handles,
            tokens: config
                .listener
                .producers
                .iter()
                .map(|p| (p.id.clone(), p.token.clone()))
                .collect(),
            allow_anonymous: config.listener.allow_anonymous,
            counters: Counters::default(),
            shutting_down: AtomicBool::new(false),
            registry: Mutex::new(HashMap::new()),
            stop_reading: watch::Sender::new(false),
            streams: WaitGroup::default(),
            connections: WaitGroup::default(),
            sinks,
        });
        let mut threads = Vec::new();
        for worker in workers {
            let name = format!("weir-{}", worker.handle.name);
            threads.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || worker.run())
                    .context("cannot start a pipeline thread")?,
            );
        }
        // After everything that can fail: a runner holds its sink (and its disk buffer's lock)
        // until shutdown.
        let runners = destinations
            .into_iter()
            .map(|(sink, destination)| (sink.clone(), tokio::spawn(sink.run(destination))))
            .collect();
        let (stop_accept, stop_rx) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(shared.clone(), endpoint.clone(), stop_rx));
        Ok(Server {
            shared,
            endpoint,
            local_addr,
            fingerprint: tls.fingerprint,
            cert_path: tls.cert_path,
            cert_generated: tls.generated,
            pipelines: infos,
            workers: threads,
            runners,
            metrics,
            metrics_server,
            stop_accept,
            accept,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The SHA-256 fingerprint (64 hex digits) of the certificate the server presents.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// The certificate file the server presents.
    pub fn cert_path(&self) -> &std::path::Path {
        &self.cert_path
    }

    /// Whether the certificate is the self-signed one generated into the data directory.
    pub fn cert_generated(&self) -> bool {
        self.cert_generated
    }

    /// The pipelines, in config order.
    pub fn pipelines(&self) -> &[PipelineInfo] {
        &self.pipelines
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// The metrics (what the Prometheus endpoint serves).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The address of the Prometheus endpoint, when `[metrics]` configures one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(|m| m.local_addr())
    }

    /// Stops gracefully (PROTOCOL §12): `goaway` to every producer, new connections refused
    /// with `SHUTTING_DOWN`, no further batch read; every batch already read is processed,
    /// aggregate windows are flushed, sinks flushed and everything accepted acked; then each
    /// connection closes with `NO_ERROR` and the endpoint closes.
    pub async fn shutdown(self) -> Result<ShutdownReport> {
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

        let mut problems = Vec::new();
        for pipeline in shared.pipelines.values() {
            // A round waiting for its sinks gives up too, instead of blocking shutdown.
            pipeline.stopping_since.get_or_init(std::time::Instant::now);
            pipeline.stopping.store(true, Ordering::Release);
        }
        for sink in shared.sinks.values() {
            sink.stopping();
        }
        // Every worker finishes at once (their last rounds wait in parallel, not in turn).
        let mut replies = Vec::new();
        for (name, pipeline) in &shared.pipelines {
            let (reply, done) = oneshot::channel();
            if pipeline.tx.send(Work::Shutdown(reply)).await.is_err() {
                problems.push(format!("pipeline `{name}`: its worker had stopped"));
                continue;
            }
            replies.push((name, done));
        }
        for (name, done) in replies {
            match done.await {
                Ok(mut p) => problems.append(&mut p),
                Err(_) => problems.push(format!("pipeline `{name}`: its worker stopped")),
            }
        }

        // Every pipeline is done: the sinks deliver what they buffer, then end; a sink only
        // once every sink that may still dead-letter into it has ended (the config has no
        // dead-letter loops).
        let mut left = self.runners;
        while !left.is_empty() {
            let fed: Vec<bool> = left
                .iter()
                .map(|(sink, _)| {
                    left.iter()
                        .any(|(other, _)| !Arc::ptr_eq(other, sink) && other.dead_letters_to(sink))
                })
                .collect();
            let all = fed.iter().all(|f| *f);
            let (now, later): (Vec<_>, Vec<_>) =
                left.into_iter().zip(fed).partition(|(_, fed)| all || !fed);
            for ((sink, _), _) in &now {
                sink.close();
            }
            for ((_, runner), _) in now {
                match runner.await {
                    Ok(mut p) => problems.append(&mut p),
                    Err(e) => problems.push(format!("a sink's task failed: {e}")),
                }
            }
            left = later.into_iter().map(|(runner, _)| runner).collect();
        }
        if let Some(server) = self.metrics_server {
            server.stop().await;
        }

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
        let workers = self.workers;
        tokio::task::spawn_blocking(move || {
            for worker in workers {
                if worker.join().is_err() {
                    tracing::error!("a pipeline thread panicked");
                }
            }
        })
        .await
        .context("joining the pipeline threads")?;
        Ok(ShutdownReport {
            stats: self.shared.stats(),
            problems,
        })
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
            bump(&shared.counters.connections_over_limit, 1);
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
fn server_config(config: &Config, tls: rustls::ServerConfig) -> Result<quinn::ServerConfig> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .context("TLS config unusable for QUIC")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(
        config.listener.limits.protocol,
        config.pipelines.len(),
    )?));
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

/// Compiles (once per source) and instantiates a pipeline's stages and wires its sinks.
#[allow(clippy::too_many_arguments)]
fn build_pipeline(
    config: &Config,
    pipeline: &PipelineConfig,
    runtime: &Runtime,
    plugins: &mut HashMap<String, Plugin>,
    sinks: &mut BTreeMap<String, Arc<Sink>>,
    destinations: &mut Vec<(Arc<Sink>, Box<dyn sinks::Destination>)>,
    metrics: &Metrics,
) -> Result<(Arc<PipelineHandle>, Worker, PipelineInfo)> {
    let name = &pipeline.name;
    let mut stages = Vec::new();
    let mut stage_names = Vec::new();
    for spec in &pipeline.stages {
        let key = spec.plugin.to_string();
        let plugin = match plugins.get(&key) {
            Some(plugin) => plugin.clone(),
            None => {
                let plugin = match &spec.plugin {
                    PluginSource::Example(example) => {
                        let Some((_, bytes)) =
                            crate::examples::ALL.iter().find(|(n, _)| n == example)
                        else {
                            bail!("pipeline `{name}`: unknown plugin `example:{example}`");
                        };
                        runtime.load_bytes(example, bytes)
                    }
                    PluginSource::File(path) => runtime.load_file(path),
                }
                .with_context(|| format!("pipeline `{name}`, stage `{}`", spec.name))?;
                plugins.insert(key, plugin.clone());
                plugin
            }
        };
        let mut stage_config = StageConfig::new(spec.name.clone()).limits(Limits {
            memory_bytes: spec.memory_bytes,
            deadline: spec.deadline,
            ..Limits::default()
        });
        for (key, json) in &spec.with {
            stage_config = stage_config.with_json(key.clone(), json.clone());
        }
        let stage = Stage::new(&plugin, stage_config, spec.window)
            .with_context(|| format!("pipeline `{name}`, stage `{}`", spec.name))?;
        stage_names.push(format!(
            "{} ({} {} {})",
            spec.name,
            plugin.kind(),
            spec.plugin,
            plugin.version()
        ));
        stages.push(stage);
    }
    let find = |sink: &str| -> Result<Arc<Sink>> {
        match sinks.get(sink) {
            Some(s) => Ok(s.clone()),
            None => bail!("pipeline `{name}`: unknown sink `{sink}`"),
        }
    };
    let mut routes = Vec::new();
    let mut described = Vec::new();
    for route in &pipeline.sinks {
        let sink = find(&route.sink)?;
        described.push(describe_route(&sink, Some(&route.condition)));
        routes.push((sink, route.condition.clone()));
    }
    let unmatched = match &pipeline.unmatched {
        Unmatched::Impossible => UnmatchedOut::Impossible,
        Unmatched::Drop => {
            described.push("unmatched events: dropped (counted)".into());
            UnmatchedOut::Drop
        }
        Unmatched::Sink(sink) => {
            let sink = find(sink)?;
            described.push(format!(
                "unmatched events → {}",
                describe_route(&sink, None)
            ));
            UnmatchedOut::Sink(sink)
        }
    };
    let dead_letters = match &pipeline.dead_letters {
        Some(sink) => find(sink)?,
        None => {
            let path = config
                .data_dir
                .join("dead-letters")
                .join(format!("{name}.jsonl"));
            let sink_name = format!("{name}/dead-letters");
            let destination = FileDestination::open(
                &sink_name,
                &FileConfig {
                    path,
                    fsync: Fsync::OnAck,
                    rotate_bytes: None,
                    rotate_interval: None,
                },
            )?;
            let sink = Sink::new(
                &sink_name,
                sinks::Destination::describe(&destination),
                BufferConfig {
                    when_full: WhenFull::Block,
                    ..BufferConfig::default()
                },
                RetryConfig::default(),
                &config.data_dir.join("spill").join(&sink_name),
                metrics.sink(&sink_name),
            )
            .map_err(anyhow::Error::msg)?;
            sinks.insert(sink_name, sink.clone());
            destinations.push((sink.clone(), Box::new(destination)));
            sink
        }
    };
    let dead_name = describe_route(&dead_letters, None);
    let pipeline_name: Arc<str> = Arc::from(name.as_str());
    for (sink, _) in &routes {
        sink.set_dead_letters(pipeline_name.clone(), dead_letters.clone());
    }
    if let UnmatchedOut::Sink(sink) = &unmatched {
        sink.set_dead_letters(pipeline_name.clone(), dead_letters.clone());
    }
    let capacity = (config.listener.limits.protocol.max_in_flight as usize)
        .saturating_mul(config.listener.limits.max_producers_per_pipeline as usize)
        .clamp(1, 65_536);
    let (tx, rx) = mpsc::channel(capacity);
    let core = Arc::new(PipelineCore {
        name: name.clone(),
        sequences: Mutex::new(HashMap::new()),
        current: Mutex::new(HashMap::new()),
        counters: PipelineCounters::default(),
        stopping: AtomicBool::new(false),
        stopping_since: std::sync::OnceLock::new(),
    });
    let handle = Arc::new(PipelineHandle {
        core: core.clone(),
        allowed: pipeline.producers.clone(),
        tx,
    });
    let info = PipelineInfo {
        name: name.clone(),
        stages: stage_names,
        sinks: described,
        dead_letters: dead_name,
    };
    Ok((
        handle,
        Worker {
            handle: core,
            chain: Chain::new(stages),
            name: pipeline_name,
            routes,
            unmatched,
            dead_letters,
            metrics: metrics.pipeline(name),
            stage_metrics: pipeline
                .stages
                .iter()
                .map(|s| metrics.stage(name, &s.name))
                .collect(),
            rx,
            withhold_acks: false,
        },
        info,
    ))
}

/// `NAME: DESTINATION, when_full = POLICY`, and the condition when there is one.
fn describe_route(sink: &Sink, condition: Option<&Condition>) -> String {
    let condition = match condition {
        None | Some(Condition::All) => String::new(),
        Some(Condition::Route(tags)) => format!(" (route {})", tags.join(" or ")),
        Some(Condition::Headers(headers)) => {
            let h: Vec<String> = headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!(" (header {})", h.join(" and "))
        }
    };
    format!(
        "{}{condition}: {}, when_full = {}",
        sink.name(),
        sink.describe(),
        sink.buffer().when_full.as_str()
    )
}
