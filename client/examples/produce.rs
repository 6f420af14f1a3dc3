//! Streams generated events into a pipeline of a running `weir serve` and waits for every ack.
//!
//! ```text
//! weir serve --config examples/weir.toml       # prints the address and the fingerprint
//! cargo run -p weir-client --example produce -- 127.0.0.1:4433 FINGERPRINT metrics 100000
//! ```
//!
//! Arguments: server address, certificate fingerprint, pipeline, number of events (default
//! 10 000). The token, if the server wants one, comes from `WEIR_TOKEN`.

use std::time::{Duration, Instant};

use weir_client::{ClientError, ConnectOptions, Event, Producer};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: produce ADDR FINGERPRINT PIPELINE [EVENTS]";
    let addr = args.next().ok_or(usage)?.parse()?;
    let pin = args.next().ok_or(usage)?;
    let pipeline = args.next().ok_or(usage)?;
    let events: u64 = args.next().map_or(Ok(10_000), |n| n.parse())?;

    let mut options = ConnectOptions::new(addr, "example-producer", [pipeline.as_str()])
        .pin(&pin)?
        .linger(Duration::from_millis(5));
    if let Ok(token) = std::env::var("WEIR_TOKEN") {
        options = options.token(token);
    }
    let producer = Producer::connect(options).await?;
    let started = Instant::now();

    // The first event on its own, awaiting its ack: end-to-end latency of one event.
    let first = Event::new(r#"{"n":0}"#, now_ms()).with_key("example");
    producer.send(&pipeline, first).await?.await?;
    println!("first event acked after {:?}", started.elapsed());

    // The rest at full speed: `send` only waits when the buffer of unacked data is full.
    let index = producer.pipeline_index(&pipeline)?;
    for n in 1..events {
        let event = Event::new(format!(r#"{{"n":{n}}}"#), now_ms()).with_key("example");
        producer.send_to(index, &event).await?;
    }
    producer.flush().await?;
    let stats = producer.stats();
    println!(
        "{} events acked in {} batches, {:.0} events/s, {} reconnects",
        stats.events_acked,
        stats.batches_acked,
        stats.events_acked as f64 / started.elapsed().as_secs_f64(),
        stats.reconnects
    );
    producer.close().await.map_err(|e: ClientError| e.into())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
