//! What the in-process benches share (`weir bench --e2e`, `--fanout`, `--deploy`,
//! `--checkpoint`): a router on loopback started from a config text, stopped with its problems
//! reported, producers connected to it, and a stream of batches with a bounded number unacked.

use anyhow::{Result, bail};
use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};
use weir::config::Config;
use weir::server::Server;
use weir_client::{ConnectOptions, EncodedBatch, Producer};

/// A router configured by `text` (relative paths in it are under `dir`), and how long its
/// start took.
pub(super) async fn start(dir: &Path, text: &str) -> Result<(Server, Duration)> {
    let config = Config::parse(text, dir.join("bench.toml"))?;
    let started = Instant::now();
    let server = Server::start(config).await?;
    Ok((server, started.elapsed()))
}

/// Stops `server`; a problem it reports (a sink that could not flush) is an error.
pub(super) async fn stop(server: Server) -> Result<()> {
    let report = server.shutdown().await?;
    if !report.problems.is_empty() {
        bail!("the router reported problems: {:?}", report.problems);
    }
    Ok(())
}

/// A producer `id` connected to `pipeline` of `server`, pinning its certificate.
pub(super) async fn connect(server: &Server, id: &str, pipeline: &str) -> Result<Producer> {
    let options =
        ConnectOptions::new(server.local_addr(), id, [pipeline]).pin(&server.fingerprint())?;
    Ok(Producer::connect(options).await?)
}

/// Sends the batches `next` gives into pipeline 0 until it gives none, at most `in_flight`
/// unacked (the oldest ack is awaited before more are sent), then waits for every ack.
pub(super) async fn stream(
    producer: &Producer,
    in_flight: usize,
    mut next: impl FnMut() -> Result<Option<EncodedBatch>>,
) -> Result<()> {
    let mut acks = VecDeque::new();
    while let Some(batch) = next()? {
        acks.push_back(producer.send_batch(0, &batch).await?);
        if acks.len() > in_flight
            && let Some(oldest) = acks.pop_front()
        {
            oldest.await?;
        }
    }
    producer.flush().await?;
    Ok(())
}
