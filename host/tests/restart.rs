//! Crashes and restarts that producers barely notice: `weir serve` as a child process, killed
//! with SIGKILL while a producer streams, started again on the same data directory.

#[path = "common/serve.rs"]
mod serve;
#[path = "common/stream.rs"]
mod stream;

use serve::{WeirServe, free_udp_addr};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use stream::{BATCH, Streaming, batch_of, within};
use weir_format::Event;

/// A router with one pipeline, `clicks`, into a file synced before every ack.
fn write_config(dir: &Path, listen: SocketAddr) -> std::path::PathBuf {
    let config = dir.join("weir.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[listener]
listen = "{listen}"
data_dir = "{data}"

[auth]
anonymous = true

[pipelines.clicks]
sinks = ["out"]

[sinks.out]
type = "file"
path = "{out}"
fsync = "on_ack"
"#,
            data = dir.join("data").display(),
            out = dir.join("out.jsonl").display(),
        ),
    )
    .expect("write the config");
    config
}

fn written(path: &Path) -> Vec<Event> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| weir_format::json::parse_line(l, 0).expect("a JSON line"))
        .collect()
}

/// Waits until the producer has `n` batches acked; how long that took.
async fn acked(streaming: &Streaming, n: u64) -> Duration {
    let started = Instant::now();
    within("acks", async {
        while streaming.producer.stats().batches_acked < n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_streaming_through_kill_9_and_a_restart_resumes_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), free_udp_addr());
    let mut first = WeirServe::start(&config).await;
    let streaming = Streaming::start(first.addr, &first.fingerprint, "clicks", 400).await;
    acked(&streaming, 100).await;

    first.kill();
    let before = streaming.producer.stats().batches_acked;
    let second = WeirServe::start(&config).await;
    // The restarted router's stateless resets end the old connection at once: the producer
    // reconnects within its first backoffs instead of waiting out its 30 s idle timeout.
    let resumed = acked(&streaming, before + 1).await;
    println!(
        "acks resumed {} ms after the restarted router printed its banner",
        resumed.as_millis()
    );
    assert!(
        resumed < Duration::from_secs(10),
        "acks resumed only after {resumed:?}: the producer waited for its idle timeout"
    );

    let (producer, sent) = streaming.finish().await;
    assert!(producer.stats().reconnects >= 1, "{:?}", producer.stats());
    let summary = second.stop().await;
    assert!(summary.starts_with("weir serve: stopped;"), "{summary}");
    // Everything acked is in the file; a batch taken before the kill and not acked may be
    // there twice (at least once across a crash).
    let events = written(&dir.path().join("out.jsonl"));
    let batches: BTreeSet<u64> = events.iter().map(batch_of).collect();
    assert_eq!(batches, (0..sent).collect::<BTreeSet<u64>>(), "every batch");
    let distinct: BTreeSet<&[u8]> = events.iter().map(|e| e.value.as_ref()).collect();
    assert_eq!(distinct.len() as u64, sent * BATCH, "every event");
}
