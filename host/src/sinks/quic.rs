//! The quic destination: forwards a pipeline's output to a pipeline of another weir router
//! (tiers: edge → central), as a producer of that router (weir-client, docs/PROTOCOL.md).
//!
//! Decisions:
//!
//! - **Delivered means acked downstream.** `send` returns `Ok` once the downstream router acked
//!   every forwarded batch, that is once its own sinks hold the events.
//! - **Whole batches travel as they are.** A delivery of every event of a batch is forwarded as
//!   the same FlatBuffers bytes, shared with the other sinks, not copied (weir-client verifies
//!   them once more). Selected events are copied into new batches with
//!   [`BatchBuilder::push_ref`] (no owned `Event` in between); consecutive selections share a
//!   batch, up to 8192 events and about 1 MiB, so that a sink taking
//!   a few events of many batches does not send many tiny batches.
//! - **The downstream's limits.** A router announces its most events per batch and its largest
//!   frame in its `welcome`; weir-client refuses a batch over them before numbering it, naming
//!   the limits. The destination then encodes the delivery again in batches within them
//!   (halving a batch whose size it underestimated) and remembers the limits for the
//!   connection. An event that does not fit in a batch on its own is rejected (the runner
//!   dead-letters it).
//! - **One producer, kept.** The producer (one QUIC connection, one producer id, numbered
//!   batches) lives across sends. After a lost connection weir-client reconnects and resends the
//!   unacked batches under their numbers, which the downstream drops if it had them already: a
//!   network blip within a send costs nothing and duplicates nothing (a downstream that
//!   restarted forgets the numbers, and processes again what it had not acked). When the acks
//!   do not come within 30 s, `send` returns `Retry` but keeps the producer and remembers what
//!   it queued; the runner's retry of the same deliveries then waits for those acks instead of
//!   forwarding the events again. The producer is dropped and a new one connected only when it
//!   stopped (a refusal, reconnecting gave up) or when the next send is not a retry of the
//!   queued deliveries (after a rejection the runner sends parts): batches the old producer had
//!   queued that the downstream processed are then forwarded again. Delivery is at least once,
//!   with duplicates only in those cases.
//! - **A refused connection is retried, loudly.** A wrong token, an unknown or forbidden
//!   pipeline, a certificate that is not the pinned one, another router using the same producer
//!   id: these are configuration mistakes, here or downstream, not properties of the events.
//!   Dead-lettering every event until someone notices would be worse than holding them, so they
//!   are `Retry` (the sink's buffer and `when_full` policy apply) with an error that says so (a
//!   refusal is also logged at error level, with what to fix). Only the downstream's refusal of
//!   batch content (`INVALID_BATCH`, `FRAME_TOO_LARGE`, `TOO_MANY_EVENTS`) and an event larger
//!   than the downstream takes are `Reject`.

use super::{Destination, OpenError, Outgoing, Selection, SendError, SendFuture, SharedBatch};

use bytes::Bytes;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use weir_client::{ClientError, ConnectOptions, EncodedBatch, ErrorCode, Producer, Trust};
use weir_format::frame::BATCH_HEADER_BYTES;
use weir_format::{BatchBuilder, EventRef};

/// `type = "quic"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicConfig {
    /// The downstream router's address (`host:port`).
    pub address: String,
    /// The downstream pipeline.
    pub pipeline: String,
    /// The producer id this router uses downstream.
    pub producer_id: String,
    /// Token for the downstream router, if it needs one.
    pub token: Option<String>,
    /// SHA-256 fingerprint of the downstream's certificate (as `weir serve` prints it).
    pub pin: Option<String>,
    /// CA certificates (PEM) that sign the downstream's certificate.
    pub ca: Option<PathBuf>,
    /// Name expected in the downstream's certificate; default: the host of `address`.
    pub server_name: Option<String>,
}

/// How long resolving the address and connecting (QUIC, TLS, `hello` → `welcome`) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a send waits for the downstream's acks (and for room in the producer's buffer).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Most events in a batch the destination builds (the downstream's limit caps it further).
const BATCH_EVENTS: usize = 8192;

/// Target size of a batch the destination builds, estimated (the downstream's frame limit caps
/// it further).
const BATCH_BYTES: usize = 1024 * 1024;

/// Forwards deliveries to a pipeline of another weir router.
pub struct QuicDestination {
    name: String,
    address: String,
    pipeline: String,
    producer_id: String,
    token: Option<String>,
    trust: Trust,
    server_name: String,
    connect_timeout: Duration,
    ack_timeout: Duration,
    /// The connected producer, if any.
    producer: Option<Producer>,
    /// Deliveries whose batches `producer` queued and the downstream has not acked yet (a send
    /// that timed out): a retry of them waits for their acks instead of sending them again.
    queued: Vec<Outgoing>,
    batcher: Batcher,
}

impl std::fmt::Debug for QuicDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicDestination")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("pipeline", &self.pipeline)
            .field("producer_id", &self.producer_id)
            .field("connected", &self.producer.is_some())
            .field("queued", &self.queued.len())
            .finish_non_exhaustive()
    }
}

impl QuicDestination {
    /// Checks sink `name`'s config (the address is `host:port`, the pin is a fingerprint, the
    /// CA file holds certificates) without connecting: the first send connects.
    pub fn open(name: &str, config: &QuicConfig) -> Result<QuicDestination, OpenError> {
        let what = format!("quic {} pipeline `{}`", config.address, config.pipeline);
        let fail = |message: String| OpenError {
            sink: name.to_owned(),
            what: what.clone(),
            message,
        };
        let host = host_of(&config.address).ok_or_else(|| {
            fail(format!(
                "address `{}` is not host:port (e.g. central.example:4433)",
                config.address
            ))
        })?;
        let trust = match (&config.pin, &config.ca) {
            (Some(pin), _) => {
                Trust::Pinned(weir_client::tls::parse_fingerprint(pin).map_err(fail)?)
            }
            (None, Some(ca)) => {
                let certs = CertificateDer::pem_file_iter(ca)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| fail(format!("cannot read CA file `{}`: {e}", ca.display())))?;
                if certs.is_empty() {
                    return Err(fail(format!(
                        "CA file `{}` holds no certificate",
                        ca.display()
                    )));
                }
                Trust::CaFile(ca.clone())
            }
            (None, None) => {
                return Err(fail(
                    "no `pin` (the downstream's fingerprint, as `weir serve` prints it) and no `ca`"
                        .into(),
                ));
            }
        };
        Ok(QuicDestination {
            name: name.to_owned(),
            address: config.address.clone(),
            pipeline: config.pipeline.clone(),
            producer_id: config.producer_id.clone(),
            token: config.token.clone(),
            trust,
            server_name: config
                .server_name
                .clone()
                .unwrap_or_else(|| host.to_owned()),
            connect_timeout: CONNECT_TIMEOUT,
            ack_timeout: ACK_TIMEOUT,
            producer: None,
            queued: Vec::new(),
            batcher: Batcher::default(),
        })
    }

    /// How many of `deliveries` the current producer queued already (a retry after a timeout);
    /// drops the producer, and forgets what it queued, when it stopped or when `deliveries` is
    /// not a retry of what it queued.
    fn resume(&mut self, deliveries: &[Outgoing]) -> usize {
        let alive = self.producer.as_ref().is_some_and(|p| p.error().is_none());
        let retry = self.queued.len() <= deliveries.len()
            && self.queued.iter().zip(deliveries).all(|(a, b)| same(a, b));
        if alive && retry {
            return self.queued.len();
        }
        if alive {
            tracing::info!(
                sink = %self.name,
                "other deliveries than the {} waiting for acks: reconnecting without those (the runner sends their events again)",
                self.queued.len()
            );
        }
        self.producer = None;
        self.queued.clear();
        0
    }

    /// Resolves the address and connects to the first of its addresses that answers.
    async fn connect(&self) -> Result<Producer, SendError> {
        let lookup = tokio::net::lookup_host(self.address.as_str());
        let addrs: Vec<SocketAddr> = match tokio::time::timeout(self.connect_timeout, lookup).await
        {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => {
                return Err(SendError::Retry(format!(
                    "sink `{}`: cannot resolve `{}`: {e}",
                    self.name, self.address
                )));
            }
            Err(_) => {
                return Err(SendError::Retry(format!(
                    "sink `{}`: cannot resolve `{}` within {} ms",
                    self.name,
                    self.address,
                    self.connect_timeout.as_millis()
                )));
            }
        };
        let mut failures = Vec::new();
        for addr in addrs {
            let mut options = ConnectOptions::new(addr, &self.producer_id, [&self.pipeline])
                .trust(self.trust.clone())
                .server_name(&self.server_name)
                .handshake_timeout(self.connect_timeout);
            if let Some(token) = &self.token {
                options = options.token(token.as_bytes());
            }
            match Producer::connect(options).await {
                Ok(producer) => return Ok(producer),
                Err(error) => failures.push(self.failure(&error)),
            }
        }
        // One address is the common case: its error as is; several: every one of them.
        Err(match failures.len() {
            0 => SendError::Retry(format!(
                "sink `{}`: `{}` resolves to no address",
                self.name, self.address
            )),
            1 => failures.remove(0),
            _ => SendError::Retry(
                failures
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        })
    }

    /// What a weir-client error means for the deliveries (see the module's decisions).
    fn failure(&self, error: &ClientError) -> SendError {
        let name = &self.name;
        match error {
            ClientError::EncodedBatchOverLimits { .. }
            | ClientError::EventTooLarge { .. }
            | ClientError::EventExceedsBuffer { .. }
            | ClientError::InvalidEncodedBatch(_) => SendError::Reject(format!(
                "sink `{name}`: {} cannot take the event: {error}",
                self.describe()
            )),
            ClientError::Server {
                code: ErrorCode::InvalidBatch | ErrorCode::FrameTooLarge | ErrorCode::TooManyEvents,
                ..
            } => SendError::Reject(format!("sink `{name}`: {error}")),
            ClientError::Refused { .. } | ClientError::Closed { .. } => {
                let message = format!(
                    "sink `{name}`: {error} (the downstream refuses this router as producer `{}` of pipeline `{}`: fix the sink's token, producer_id or pipeline, or the downstream's config; events are kept and retried)",
                    self.producer_id, self.pipeline
                );
                tracing::error!("{message}");
                SendError::Retry(message)
            }
            _ => SendError::Retry(format!("sink `{name}`: {error}")),
        }
    }
}

impl Destination for QuicDestination {
    fn describe(&self) -> String {
        format!("quic {} pipeline `{}`", self.address, self.pipeline)
    }

    fn send<'a>(&'a mut self, deliveries: &'a [Outgoing]) -> SendFuture<'a> {
        Box::pin(async move {
            if self.queued.is_empty() && deliveries.iter().all(Outgoing::is_empty) {
                return Ok(());
            }
            let skip = self.resume(deliveries);
            let producer = match self.producer.take() {
                Some(producer) => producer,
                None => {
                    let producer = self.connect().await?;
                    self.batcher.limits = None;
                    producer
                }
            };
            let batcher = &mut self.batcher;
            let queued = &mut self.queued;
            let forward = async {
                batcher
                    .queue(&producer, &deliveries[skip..], queued)
                    .await?;
                producer.flush().await
            };
            match tokio::time::timeout(self.ack_timeout, forward).await {
                Ok(Ok(())) => {
                    self.queued.clear();
                    self.producer = Some(producer);
                    Ok(())
                }
                Ok(Err(error)) => {
                    let failure = self.failure(&error);
                    if producer.error().is_none() {
                        // Refused before it was queued (too large): the producer is fine.
                        self.producer = Some(producer);
                    } else {
                        self.queued.clear();
                    }
                    Err(failure)
                }
                Err(_) => {
                    let stats = producer.stats();
                    self.producer = Some(producer);
                    Err(SendError::Retry(format!(
                        "sink `{}`: {} did not ack the forwarded events within {} ms ({} of {} events acked since connecting; a retry waits for the same acks)",
                        self.name,
                        self.address,
                        self.ack_timeout.as_millis(),
                        stats.events_acked,
                        stats.events_sent
                    )))
                }
            }
        })
    }

    fn close(&mut self) -> SendFuture<'_> {
        Box::pin(async move {
            self.queued.clear();
            let Some(producer) = self.producer.take() else {
                return Ok(());
            };
            match tokio::time::timeout(self.ack_timeout, producer.close()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(self.failure(&error)),
                Err(_) => Err(SendError::Retry(format!(
                    "sink `{}`: {} did not ack within {} ms while closing",
                    self.name,
                    self.address,
                    self.ack_timeout.as_millis()
                ))),
            }
        })
    }
}

/// The host of `host:port` (without the brackets of an IPv6 address); `None` without a port.
fn host_of(address: &str) -> Option<&str> {
    let (host, port) = address.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

/// Whether two deliveries are the same events of the same batch. Comparing the buffers'
/// addresses is sound because a delivery keeps its batch alive: while `a` exists, no other
/// batch can have its address.
fn same(a: &Outgoing, b: &Outgoing) -> bool {
    std::ptr::eq(a.shared().bytes(), b.shared().bytes())
        && match (a.selection(), b.selection()) {
            (Selection::All, Selection::All) => true,
            (Selection::Some(x), Selection::Some(y)) => x == y,
            _ => false,
        }
}

/// The events of `delivery` in order, as [`Outgoing::events`] yields them, in an iterator
/// that may be held across an `.await` of a `Send` future.
fn events(delivery: &Outgoing) -> impl Iterator<Item = EventRef<'_>> + Send {
    let batch = delivery.shared().batch();
    let (all, some) = match delivery.selection() {
        Selection::All => (Some(0..batch.len()), None),
        Selection::Some(indices) => (None, Some(indices.iter().map(|&i| i as usize))),
    };
    all.into_iter()
        .flatten()
        .chain(some.into_iter().flatten())
        .filter_map(move |i| batch.get(i))
}

/// A shared batch as the owner of [`Bytes`]: forwarding it does not copy it.
struct Shared(SharedBatch);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// An estimate of the bytes `event` takes in a batch, to size the batches the destination
/// builds (the downstream's frame limit is checked on the real size).
fn estimated_bytes(event: &EventRef<'_>) -> usize {
    let headers: usize = event
        .headers()
        .map(|(name, value)| 32 + name.len() + value.len())
        .sum();
    64 + event.key().map_or(0, <[u8]>::len)
        + event.value().len()
        + event.route().map_or(0, str::len)
        + headers
}

/// The downstream's batch limits, as weir-client reported them.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_events: u32,
    max_frame_bytes: u32,
}

/// Turns deliveries into batches for the producer.
#[derive(Default)]
struct Batcher {
    builder: BatchBuilder,
    /// The downstream's limits, once a batch went over them on this connection.
    limits: Option<Limits>,
}

impl Batcher {
    /// Events and estimated bytes of a batch the batcher builds.
    fn targets(&self) -> (usize, usize) {
        match self.limits {
            None => (BATCH_EVENTS, BATCH_BYTES),
            Some(limits) => (
                BATCH_EVENTS.min(limits.max_events as usize),
                BATCH_BYTES
                    .min((limits.max_frame_bytes as usize).saturating_sub(BATCH_HEADER_BYTES)),
            ),
        }
    }

    /// Whether a whole batch is within the downstream's limits as far as they are known.
    fn fits(&self, batch: &SharedBatch) -> bool {
        self.limits.is_none_or(|limits| {
            batch.batch().len() <= limits.max_events as usize
                && batch.bytes().len() + BATCH_HEADER_BYTES <= limits.max_frame_bytes as usize
        })
    }

    /// Queues `deliveries` on `producer` in order, adding each one to `queued` once every event
    /// of it is in a queued batch.
    async fn queue<'d>(
        &mut self,
        producer: &Producer,
        deliveries: &'d [Outgoing],
        queued: &mut Vec<Outgoing>,
    ) -> Result<(), ClientError> {
        // Selected events waiting for a batch, and their estimated bytes.
        let mut group: Vec<EventRef<'d>> = Vec::new();
        let mut group_bytes = 0;
        // `deliveries[..done]` are in `queued`; `deliveries[..through]` are in queued batches
        // or in `group`.
        let mut done = 0;
        let mut through = 0;
        for (i, delivery) in deliveries.iter().enumerate() {
            if matches!(delivery.selection(), Selection::All) && self.fits(delivery.shared()) {
                self.queue_group(producer, &mut group).await?;
                group_bytes = 0;
                queued.extend_from_slice(&deliveries[done..through]);
                done = through;
                if self.forward(producer, delivery.shared()).await? {
                    through = i + 1;
                    queued.extend_from_slice(&deliveries[done..through]);
                    done = through;
                    continue;
                }
            }
            let (mut max_events, mut max_bytes) = self.targets();
            for event in events(delivery) {
                let bytes = estimated_bytes(&event);
                if !group.is_empty()
                    && (group.len() >= max_events || group_bytes + bytes > max_bytes)
                {
                    self.queue_group(producer, &mut group).await?;
                    group_bytes = 0;
                    queued.extend_from_slice(&deliveries[done..through]);
                    done = through;
                    (max_events, max_bytes) = self.targets();
                }
                group.push(event);
                group_bytes += bytes;
            }
            through = i + 1;
        }
        self.queue_group(producer, &mut group).await?;
        queued.extend_from_slice(&deliveries[done..through]);
        Ok(())
    }

    /// Queues a whole batch as it is; `false` when it is over the downstream's limits (now
    /// known), so that nothing was queued and its events must be batched anew.
    async fn forward(
        &mut self,
        producer: &Producer,
        batch: &SharedBatch,
    ) -> Result<bool, ClientError> {
        if batch.batch().is_empty() {
            return Ok(true);
        }
        let encoded = EncodedBatch::new(Bytes::from_owner(Shared(batch.clone())))?;
        match producer.send_batch(0, &encoded).await {
            Ok(_) => Ok(true),
            Err(ClientError::EncodedBatchOverLimits {
                max_events,
                max_frame_bytes,
                ..
            }) => {
                self.limits = Some(Limits {
                    max_events,
                    max_frame_bytes,
                });
                Ok(false)
            }
            Err(error) => Err(error),
        }
    }

    /// Queues the events of `group` (and empties it) as one batch, or as several when the
    /// downstream's limits say it is too large: halves, in order, until they fit. A single
    /// event over the limits is an error.
    async fn queue_group(
        &mut self,
        producer: &Producer,
        group: &mut Vec<EventRef<'_>>,
    ) -> Result<(), ClientError> {
        // Ranges (start, end) of `group` still to queue, the next one last.
        let mut ranges = vec![(0, group.len())];
        while let Some((start, end)) = ranges.pop() {
            if start == end {
                continue;
            }
            for event in &group[start..end] {
                self.builder.push_ref(event, event.source());
            }
            let encoded = EncodedBatch::new(Bytes::from(self.builder.finish()))?;
            match producer.send_batch(0, &encoded).await {
                Ok(_) => {}
                Err(ClientError::EncodedBatchOverLimits {
                    max_events,
                    max_frame_bytes,
                    ..
                }) if end - start > 1 => {
                    self.limits = Some(Limits {
                        max_events,
                        max_frame_bytes,
                    });
                    let middle = start + (end - start) / 2;
                    ranges.push((middle, end));
                    ranges.push((start, middle));
                }
                Err(error) => return Err(error),
            }
        }
        group.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::server::Server;
    use std::path::PathBuf;
    use std::sync::Arc;
    use weir_format::Event;
    use weir_format::json::event_ref_to_line;

    /// The bound of every wait in these tests.
    const WAIT: Duration = Duration::from_secs(30);

    /// A downstream router: pipeline `central` writes to `out.jsonl`; producer `edge-1`.
    struct Downstream {
        server: Server,
        dir: tempfile::TempDir,
    }

    impl Downstream {
        async fn start(limits: &str) -> Downstream {
            let dir = tempfile::tempdir().expect("tempdir");
            Downstream::start_in(dir, "127.0.0.1:0", limits).await
        }

        /// Starts in `dir` (its certificate and file sink are kept across restarts).
        async fn start_in(dir: tempfile::TempDir, listen: &str, limits: &str) -> Downstream {
            let text = format!(
                r#"
[listener]
listen = "{listen}"
data_dir = "data"

[limits]
{limits}

[[producers]]
id = "edge-1"
token = "edge-token"

[pipelines.central]
sinks = ["out"]

[sinks.out]
type = "file"
path = "out.jsonl"
"#
            );
            let config = Config::parse(&text, dir.path().join("weir.toml")).expect("valid config");
            let server = tokio::time::timeout(WAIT, Server::start(config))
                .await
                .expect("the downstream starts within 30 s")
                .expect("the downstream starts");
            Downstream { server, dir }
        }

        /// The lines of the downstream's file sink.
        fn lines(&self) -> Vec<String> {
            let path: PathBuf = self.dir.path().join("out.jsonl");
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect()
        }

        /// The sink's config to forward to this router.
        fn config(&self) -> QuicConfig {
            QuicConfig {
                address: self.server.local_addr().to_string(),
                pipeline: "central".into(),
                producer_id: "edge-1".into(),
                token: Some("edge-token".into()),
                pin: Some(self.server.fingerprint()),
                ca: None,
                server_name: None,
            }
        }

        fn batches_accepted(&self) -> u64 {
            self.server.stats().pipelines["central"].batches_accepted
        }

        /// Stops gracefully; returns the directory, to start again in it.
        async fn stop(self) -> tempfile::TempDir {
            tokio::time::timeout(WAIT, self.server.shutdown())
                .await
                .expect("the downstream stops within 30 s")
                .expect("the downstream stops");
            self.dir
        }
    }

    fn batch(events: &[Event]) -> SharedBatch {
        SharedBatch::verify(weir_format::encode(events)).expect("encoded batches verify")
    }

    /// `n` events with every field set, values `{prefix}-{i}`.
    fn events(prefix: &str, n: usize) -> Vec<Event> {
        (0..n)
            .map(|i| {
                Event::new(
                    format!(r#"{{"n":"{prefix}-{i}"}}"#),
                    1_700_000_000_000 + i as i64,
                )
                .with_key(format!("k{i}"))
                .with_header("origin", format!("edge-{i}"))
                .with_route(format!("r{}", i % 2))
            })
            .collect()
    }

    /// The lines the downstream's file sink writes for `events`.
    fn lines_of<'e>(events: impl IntoIterator<Item = &'e Event>) -> Vec<String> {
        let events: Vec<Event> = events.into_iter().cloned().collect();
        let batch = batch(&events);
        batch
            .batch()
            .iter()
            .map(|e| event_ref_to_line(&e))
            .collect()
    }

    fn pipeline() -> Arc<str> {
        "edge".into()
    }

    fn some(batch: &SharedBatch, indices: &[u32]) -> Outgoing {
        Outgoing::new(batch.clone(), Selection::Some(indices.into()), pipeline())
    }

    async fn send(
        destination: &mut QuicDestination,
        deliveries: &[Outgoing],
    ) -> Result<(), SendError> {
        tokio::time::timeout(WAIT + WAIT, destination.send(deliveries))
            .await
            .expect("send returns within its own timeouts")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn selections_and_whole_batches_are_in_the_downstream_file_once_send_returns() {
        let downstream = Downstream::start("").await;
        let mut destination = QuicDestination::open("edge", &downstream.config()).expect("opens");
        assert_eq!(
            destination.describe(),
            format!("quic {} pipeline `central`", downstream.server.local_addr())
        );
        let a = events("a", 5);
        let b = events("b", 2);
        let (batch_a, batch_b) = (batch(&a), batch(&b));
        let deliveries = [
            some(&batch_a, &[1, 3]),
            some(&batch_a, &[4]),
            Outgoing::all(batch_b.clone(), pipeline()),
            some(&batch_a, &[0]),
        ];
        send(&mut destination, &deliveries)
            .await
            .expect("delivered");
        assert_eq!(
            downstream.lines(),
            lines_of([&a[1], &a[3], &a[4], &b[0], &b[1], &a[0]])
        );
        // The two selections before the whole batch share one batch; the whole batch travels
        // as it is; the last selection is a third batch.
        assert_eq!(downstream.batches_accepted(), 3);
        send(&mut destination, &[Outgoing::all(batch_a, pipeline())])
            .await
            .expect("delivered on the same connection");
        assert_eq!(downstream.lines().len(), 11);
        assert_eq!(downstream.lines()[6..], lines_of(&a));
        tokio::time::timeout(WAIT, destination.close())
            .await
            .expect("closes within 30 s")
            .expect("closes");
        downstream.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deliveries_over_the_downstream_limits_are_split_in_order() {
        let downstream = Downstream::start("max_events_per_frame = 2").await;
        let mut destination = QuicDestination::open("edge", &downstream.config()).expect("opens");
        let a = events("a", 5);
        let batch_a = batch(&a);
        send(
            &mut destination,
            &[Outgoing::all(batch_a.clone(), pipeline())],
        )
        .await
        .expect("delivered");
        assert_eq!(downstream.lines(), lines_of(&a));
        assert_eq!(downstream.batches_accepted(), 3);
        send(&mut destination, &[some(&batch_a, &[0, 2, 3])])
            .await
            .expect("delivered");
        assert_eq!(downstream.lines()[5..], lines_of([&a[0], &a[2], &a[3]]));
        assert_eq!(downstream.batches_accepted(), 5);
        downstream.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_over_the_frame_limit_is_rejected_and_a_retry_of_the_rest_is_not_forwarded_twice()
     {
        let downstream =
            Downstream::start("max_frame_bytes = 1024\nmax_events_per_frame = 100").await;
        let mut destination = QuicDestination::open("edge", &downstream.config()).expect("opens");
        let small = events("small", 2);
        let big = vec![Event::new(vec![b'x'; 2000], 7)];
        let (small_batch, big_batch) = (batch(&small), batch(&big));
        let deliveries = [
            Outgoing::all(small_batch.clone(), pipeline()),
            Outgoing::all(big_batch.clone(), pipeline()),
        ];
        let error = send(&mut destination, &deliveries)
            .await
            .expect_err("the big event does not fit");
        assert_eq!(
            error,
            SendError::Reject(format!(
                "sink `edge`: quic {} pipeline `central` cannot take the event: encoded batch of 1 events and {} frame bytes exceeds the server's limits (100 events, 1024 bytes)",
                downstream.server.local_addr(),
                big_batch.bytes().len() + BATCH_HEADER_BYTES
            ))
        );
        // The runner retries the part without the refused event: it was queued already, so
        // the destination waits for its ack instead of forwarding it again.
        send(&mut destination, &deliveries[..1])
            .await
            .expect("delivered");
        assert_eq!(downstream.lines(), lines_of(&small));
        assert_eq!(downstream.batches_accepted(), 1);
        downstream.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_after_an_ack_timeout_waits_for_the_same_acks_and_forwards_nothing_twice() {
        let downstream = Downstream::start("").await;
        let addr = downstream.server.local_addr();
        let mut destination = QuicDestination::open("edge", &downstream.config()).expect("opens");
        let a = events("a", 3);
        let batch_a = batch(&a);
        send(&mut destination, &[some(&batch_a, &[0, 1])])
            .await
            .expect("delivered");
        let dir = downstream.stop().await;

        // Nothing acks while the downstream is down: the send times out, the producer stays
        // (reconnecting) with the batch queued.
        destination.ack_timeout = Duration::from_secs(1);
        let deliveries = [some(&batch_a, &[2])];
        assert_eq!(
            send(&mut destination, &deliveries).await,
            Err(SendError::Retry(format!(
                "sink `edge`: {addr} did not ack the forwarded events within 1000 ms (2 of 3 events acked since connecting; a retry waits for the same acks)"
            )))
        );

        // Back on the same address and certificate: the retry waits for the batch the producer
        // resends after reconnecting, instead of queueing it a second time.
        let downstream = Downstream::start_in(dir, &addr.to_string(), "").await;
        destination.ack_timeout = ACK_TIMEOUT;
        send(&mut destination, &deliveries)
            .await
            .expect("delivered after the downstream came back");
        assert_eq!(downstream.lines(), lines_of(&a));
        assert_eq!(downstream.batches_accepted(), 1);
        downstream.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_downstream_that_is_not_running_is_retried_naming_its_address() {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|socket| socket.local_addr())
            .expect("a free port")
            .port();
        let config = QuicConfig {
            address: format!("127.0.0.1:{port}"),
            pipeline: "central".into(),
            producer_id: "edge-1".into(),
            token: None,
            pin: Some("ab".repeat(32)),
            ca: None,
            server_name: None,
        };
        let mut destination = QuicDestination::open("edge", &config).expect("opens");
        destination.connect_timeout = Duration::from_secs(1);
        let a = events("a", 1);
        let error = send(&mut destination, &[Outgoing::all(batch(&a), pipeline())])
            .await
            .expect_err("nothing listens");
        assert_eq!(
            error,
            SendError::Retry(format!(
                "sink `edge`: cannot connect to 127.0.0.1:{port}: no welcome within 1000 ms"
            ))
        );
        assert!(destination.producer.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_pin_or_token_is_retried_with_what_to_fix() {
        let downstream = Downstream::start("").await;
        let a = events("a", 1);
        let deliveries = [Outgoing::all(batch(&a), pipeline())];
        let addr = downstream.server.local_addr();

        let pin = "00".repeat(32);
        let config = QuicConfig {
            pin: Some(pin.clone()),
            ..downstream.config()
        };
        let mut destination = QuicDestination::open("edge", &config).expect("opens");
        assert_eq!(
            send(&mut destination, &deliveries).await,
            Err(SendError::Retry(format!(
                "sink `edge`: cannot connect to {addr}: server certificate has fingerprint {}, but the pinned fingerprint is {pin} (is this the fingerprint `weir serve` printed?)",
                downstream.server.fingerprint()
            )))
        );

        let config = QuicConfig {
            token: Some("wrong".into()),
            ..downstream.config()
        };
        let mut destination = QuicDestination::open("edge", &config).expect("opens");
        assert_eq!(
            send(&mut destination, &deliveries).await,
            Err(SendError::Retry(format!(
                "sink `edge`: refused by {addr}: UNAUTHENTICATED (0x03): producer `edge-1`: wrong token (the downstream refuses this router as producer `edge-1` of pipeline `central`: fix the sink's token, producer_id or pipeline, or the downstream's config; events are kept and retried)"
            )))
        );
        assert!(downstream.lines().is_empty());
        downstream.stop().await;
    }

    #[test]
    fn open_checks_the_config_without_connecting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = QuicConfig {
            address: "127.0.0.1:9".into(),
            pipeline: "central".into(),
            producer_id: "edge-1".into(),
            token: None,
            pin: Some("ab".repeat(32)),
            ca: None,
            server_name: None,
        };
        let error = |config: QuicConfig| {
            QuicDestination::open("edge", &config)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert_eq!(error(config.clone()), Ok(()));
        assert_eq!(
            error(QuicConfig {
                pin: Some("abc".into()),
                ..config.clone()
            }),
            Err("sink `edge`: cannot open quic 127.0.0.1:9 pipeline `central`: fingerprint `abc` is not 64 hex digits (the SHA-256 of the certificate)".into())
        );
        assert_eq!(
            error(QuicConfig {
                address: "central.example".into(),
                ..config.clone()
            }),
            Err("sink `edge`: cannot open quic central.example pipeline `central`: address `central.example` is not host:port (e.g. central.example:4433)".into())
        );
        let missing = dir.path().join("missing.pem");
        assert_eq!(
            error(QuicConfig {
                pin: None,
                ca: Some(missing.clone()),
                ..config.clone()
            })
            .map_err(|e| e.starts_with(&format!(
                "sink `edge`: cannot open quic 127.0.0.1:9 pipeline `central`: cannot read CA file `{}`: ",
                missing.display()
            ))),
            Err(true)
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        assert_eq!(
            error(QuicConfig {
                pin: None,
                ca: Some(empty.clone()),
                ..config.clone()
            }),
            Err(format!(
                "sink `edge`: cannot open quic 127.0.0.1:9 pipeline `central`: CA file `{}` holds no certificate",
                empty.display()
            ))
        );
        assert_eq!(
            error(QuicConfig {
                pin: None,
                ..config
            }),
            Err("sink `edge`: cannot open quic 127.0.0.1:9 pipeline `central`: no `pin` (the downstream's fingerprint, as `weir serve` prints it) and no `ca`".into())
        );
        assert_eq!(host_of("[::1]:4433"), Some("::1"));
        assert_eq!(host_of("central.example:4433"), Some("central.example"));
        assert_eq!(host_of(":4433"), None);
        assert_eq!(host_of("central.example:http"), None);
    }

    #[test]
    fn a_retry_is_recognised_by_its_batch_and_selection() {
        let a = events("a", 3);
        let batch_a = batch(&a);
        let twin = batch(&a);
        assert!(same(&some(&batch_a, &[0, 2]), &some(&batch_a, &[0, 2])));
        assert!(same(
            &Outgoing::all(batch_a.clone(), pipeline()),
            &Outgoing::all(batch_a.clone(), pipeline())
        ));
        assert!(!same(&some(&batch_a, &[0, 2]), &some(&batch_a, &[0])));
        assert!(!same(
            &some(&batch_a, &[0, 1, 2]),
            &Outgoing::all(batch_a.clone(), pipeline())
        ));
        assert!(!same(
            &Outgoing::all(batch_a, pipeline()),
            &Outgoing::all(twin, pipeline())
        ));
    }
}
