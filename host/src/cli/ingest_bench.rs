//! `weir bench --e2e`: ingest throughput over QUIC on loopback, weir against raw quinn, in one
//! run, and weir's ack latency at half of its maximum throughput.
//!
//! Both sides send the same bytes on one connection: the workload's batches framed as weir/1
//! `batch` frames. Raw quinn writes them on one unidirectional stream to a server that reads
//! and discards them (the ceiling: TLS, QUIC, loopback UDP). weir sends them through
//! weir-client to a weir server whose pipeline runs the `identity` plugin into a null sink, and
//! every batch is acked end to end.

use super::loopback;
use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use weir::server::Server;
use weir::workload::WorkloadSpec;
use weir_client::{EncodedBatch, Producer};
use weir_format::frame::{ALPN, batch_header};

/// Arguments of `weir bench --e2e`.
pub struct E2eArgs {
    /// Events to send in each throughput run.
    pub events: u64,
    /// Size of each event's value.
    pub size: usize,
    /// Events per batch.
    pub batch: usize,
    /// Distinct keys.
    pub keys: u64,
}

/// Runs the three measurements and prints them.
pub fn run(args: &E2eArgs) -> Result<()> {
    let (spec, batches) = workload(args.events, args.size, args.keys, args.batch)?;
    let bytes: u64 = batches
        .iter()
        .map(|b| (FRAME_OVERHEAD + b.payload().len()) as u64)
        .sum();
    eprintln!(
        "weir bench --e2e: {} events of {} B in batches of {} ({:.1} MB of frames), one connection on loopback",
        args.events,
        args.size,
        args.batch,
        bytes as f64 / 1e6
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let dir = tempfile::tempdir().context("a temporary data directory")?;
        let server = start_server(dir.path(), E2E_CONFIG).await?;
        let row = |label: &str, took: Duration| {
            println!(
                "  {label:<40}{:>8.3} s{:>8.2} M events/s{:>6.0} MB/s",
                took.as_secs_f64(),
                args.events as f64 / took.as_secs_f64() / 1e6,
                bytes as f64 / took.as_secs_f64() / 1e6
            );
        };
        // Alternate the sides so that neither always runs on a warmer or quieter machine.
        let mut ratios = Vec::new();
        let mut fastest = Duration::MAX;
        for round in 1..=ROUNDS {
            let raw = raw_quinn(&batches).await?;
            let weir = weir_batches(&server, &batches, round).await?;
            row(&format!("round {round}: raw quinn (read, discard)"), raw);
            row(&format!("round {round}: weir (identity, null sink)"), weir);
            ratios.push(raw.as_secs_f64() / weir.as_secs_f64());
            fastest = fastest.min(weir);
        }
        let events = weir_events(&server, &spec).await?;
        row("weir, events encoded by weir-client", events);
        ratios.sort_by(f64::total_cmp);
        println!(
            "  weir / raw quinn: median {:.1}% of the throughput (rounds: {})",
            100.0 * ratios[ratios.len() / 2],
            ratios
                .iter()
                .map(|r| format!("{:.1}%", 100.0 * r))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let rate = args.events as f64 / fastest.as_secs_f64() / 2.0;
        let latency = ack_latency(&server, &batches, rate).await?;
        println!(
            "  ack latency at {:.0} events/s (half of weir's best rate), {} batches: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            rate,
            latency.len(),
            latency.value_at_quantile(0.5) as f64 / 1e3,
            latency.value_at_quantile(0.99) as f64 / 1e3,
            latency.max() as f64 / 1e3
        );
        let report = server.shutdown().await?;
        if !report.problems.is_empty() {
            bail!("the server reported problems: {:?}", report.problems);
        }
        Ok(())
    })
}

/// Throughput rounds, raw quinn and weir alternating (`--fanout`: its three configurations).
pub(super) const ROUNDS: u32 = 5;

/// Length prefix and batch header before each payload.
const FRAME_OVERHEAD: usize = 19;

/// The generated workload (`--events`, `--size`, `--keys`) and its batches of `batch` events, encoded once.
pub(super) fn workload(
    events: u64,
    size: usize,
    keys: u64,
    batch: usize,
) -> Result<(WorkloadSpec, Vec<EncodedBatch>)> {
    if batch == 0 || events == 0 {
        bail!("--events and --batch must be at least 1");
    }
    let spec = WorkloadSpec {
        events,
        value_size: size,
        keys,
        ..WorkloadSpec::default()
    };
    let batches = spec
        .batches(batch)
        .into_iter()
        .map(|payload| EncodedBatch::new(Bytes::from(payload)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((spec, batches))
}

/// The `--e2e` server: pipeline `bench` runs the identity plugin into a null sink.
const E2E_CONFIG: &str = r#"
[listener]
listen = "127.0.0.1:0"
data_dir = "data"

[auth]
anonymous = true

[pipelines.bench]
sinks = ["discard"]

[[pipelines.bench.stages]]
plugin = "example:identity"

[sinks.discard]
type = "null"
"#;

/// A weir server on loopback configured by `text` (relative paths in it are under `dir`); its
/// producers write to pipeline `bench`.
pub(super) async fn start_server(dir: &Path, text: &str) -> Result<Server> {
    Ok(loopback::start(dir, text).await?.0)
}

async fn connect(server: &Server, producer_id: &str) -> Result<Producer> {
    loopback::connect(server, producer_id, "bench").await
}

/// Sends every batch through weir-client as prepared bytes and waits for the last ack.
pub(super) async fn weir_batches(
    server: &Server,
    batches: &[EncodedBatch],
    round: u32,
) -> Result<Duration> {
    let producer = connect(server, &format!("bench-batches-{round}")).await?;
    let start = Instant::now();
    for batch in batches {
        producer.send_batch(0, batch).await?;
    }
    producer.flush().await?;
    let took = start.elapsed();
    producer.close().await?;
    Ok(took)
}

/// Sends every event of the workload through weir-client, which batches and encodes them.
async fn weir_events(server: &Server, spec: &WorkloadSpec) -> Result<Duration> {
    let events: Vec<_> = (0..spec.events).map(|i| spec.event(i)).collect();
    let producer = connect(server, "bench-events").await?;
    let start = Instant::now();
    for event in &events {
        producer.send_to(0, event).await?;
    }
    producer.flush().await?;
    let took = start.elapsed();
    producer.close().await?;
    Ok(took)
}

/// Sends the batches paced at `rate` events/s and records, per batch, the time from handing it
/// to the producer until its ack, in microseconds.
async fn ack_latency(
    server: &Server,
    batches: &[EncodedBatch],
    rate: f64,
) -> Result<Histogram<u64>> {
    let producer = connect(server, "bench-latency").await?;
    let latencies = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let mut waiting = Vec::with_capacity(batches.len());
    let start = Instant::now();
    let mut events = 0u64;
    for batch in batches {
        let due = start + Duration::from_secs_f64(events as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        events += u64::from(batch.events());
        let sent = Instant::now();
        let ack = producer.send_batch(0, batch).await?;
        let latencies = latencies.clone();
        waiting.push(tokio::spawn(async move {
            ack.await?;
            let micros = sent.elapsed().as_micros().max(1) as u64;
            latencies
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .record(micros)?;
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in waiting {
        task.await.context("an ack task")??;
    }
    producer.close().await?;
    let histogram = latencies
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ok(histogram)
}

/// Sends `batches` as weir/1 batch frames on one stream of one fresh loopback connection to a
/// server that reads and discards them; returns the time from the first write until the server
/// has read the last byte. The transport is `weir serve`'s with default limits and one
/// pipeline ([`weir::sources::quic::transport_config`]), so both sides get the same flow control.
async fn raw_quinn(batches: &[EncodedBatch]) -> Result<Duration> {
    let frames = batches
        .iter()
        .enumerate()
        .map(|(sequence, batch)| {
            let header = batch_header(0, sequence as u64, batch.events(), batch.payload().len())?;
            Ok((Bytes::copy_from_slice(&header), batch.payload().clone()))
        })
        .collect::<Result<Vec<_>>>()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .context("generating the benchmark's certificate")?;
    let cert_der: CertificateDer<'static> = cert.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));

    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key)?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut server_config =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
    server_config.transport_config(Arc::new(weir::sources::quic::transport_config(
        weir_format::frame::Limits::DEFAULT,
        1,
    )?));
    let server = quinn::Endpoint::server(server_config, SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let server_addr = server.local_addr()?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der)?;
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_tls)?,
    )));

    let expected: u64 = frames
        .iter()
        .map(|(header, payload)| (header.len() + payload.len()) as u64)
        .sum();
    let reader = tokio::spawn(async move {
        let incoming = server
            .accept()
            .await
            .ok_or_else(|| anyhow!("the raw server closed"))?;
        let connection = incoming.await?;
        let mut stream = connection.accept_uni().await?;
        let mut read = 0u64;
        while let Some(chunk) = stream.read_chunk(usize::MAX, true).await? {
            read += chunk.bytes.len() as u64;
        }
        // Tell the client the last byte is in: it stops its clock when the connection closes.
        connection.close(0u32.into(), b"done");
        server.wait_idle().await;
        Ok::<u64, anyhow::Error>(read)
    });

    let connection = client.connect(server_addr, "localhost")?.await?;
    let start = Instant::now();
    let mut stream = connection.open_uni().await?;
    for (header, payload) in frames {
        stream
            .write_all_chunks(&mut [header.clone(), payload.clone()])
            .await?;
    }
    stream.finish()?;
    connection.closed().await;
    let took = start.elapsed();
    let read = reader.await.context("the raw server task")??;
    if read != expected {
        return Err(anyhow!(
            "raw quinn server read {read} bytes of {expected} sent"
        ));
    }
    client.wait_idle().await;
    Ok(took)
}
