//! Crashes and restarts that producers barely notice, and that aggregates do not notice at all:
//! `weir serve` as a child process, killed with SIGKILL while a producer streams, started
//! again on the same data directory; and its config reloaded the three ways an operator does.

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

/// A router with a pipeline `clicks` into a file synced before every ack, and `sums`
/// (count-sum on `workers` workers) into another.
fn write_config(dir: &Path, listen: SocketAddr, workers: usize) -> std::path::PathBuf {
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

[pipelines.sums]
sinks = ["sums"]
workers = {workers}

[[pipelines.sums.stages]]
plugin = "example:count-sum"
window = "tumbling:1s"

[sinks.out]
type = "file"
path = "{out}"
fsync = "on_ack"

[sinks.sums]
type = "file"
path = "{sums}"
fsync = "on_ack"
"#,
            data = dir.join("data").display(),
            out = dir.join("out.jsonl").display(),
            sums = dir.join("sums.jsonl").display(),
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
    let config = write_config(dir.path(), free_udp_addr(), 2);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_serve_reloads_on_a_saved_file_on_sighup_and_on_weir_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), free_udp_addr(), 2);
    let admin = "\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"reload-token\"\n";
    let text = std::fs::read_to_string(&config).expect("the config") + admin;
    std::fs::write(&config, &text).expect("write the config");
    let server = WeirServe::start_logging(&config, "info").await;
    let admin = server
        .banner
        .iter()
        .find_map(|line| line.strip_prefix("admin: "))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the admin address in the banner")
        .to_owned();
    let reload = || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["reload", "--admin", &admin, "--token", "reload-token"])
            .env("WEIR_LOG", "warn")
            .output()
            .expect("weir reload runs");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let streaming = Streaming::start(server.addr, &server.fingerprint, "clicks", 100).await;

    // Saved: a second sink, watched into place.
    let copy = text.replace("sinks = [\"out\"]", "sinks = [\"out\", \"copy\"]")
        + "\n[sinks.copy]\ntype = \"file\"\npath = \"copy.jsonl\"\n";
    std::fs::write(&config, &copy).expect("save the config");
    server
        .logged("the config file changed:   sink `copy`: added")
        .await;
    acked(&streaming, streaming.producer.stats().batches_acked + 20).await;
    // SIGHUP: read again, nothing new.
    server.signal("-HUP");
    server
        .logged(&format!("SIGHUP: {}: no changes", config.display()))
        .await;
    // weir reload: the same, answered on the terminal.
    assert_eq!(
        reload(),
        (
            Some(0),
            format!("{}: no changes\n", config.display()),
            String::new()
        )
    );
    // A config that does not validate: refused, and the running one serves on. (Written
    // under another name first: the file watch must not see it half written.)
    let broken = copy.replace("[\"out\", \"copy\"]", "[\"out\", \"nowhere\"]");
    let line = broken
        .lines()
        .position(|l| l.contains("nowhere"))
        .expect("the line")
        + 1;
    let (code, stdout, stderr) = {
        let staged = dir.path().join("staged.toml");
        std::fs::write(&staged, &broken).expect("stage");
        std::fs::rename(&staged, &config).expect("swap the config");
        server
            .logged(
                "the config file changed: config not reloaded, the running config is unchanged: ",
            )
            .await;
        reload()
    };
    assert_eq!((code, stdout.as_str()), (Some(1), ""));
    assert_eq!(
        stderr,
        format!(
            "error: {}:{line}:17: pipeline `clicks`: unknown sink `nowhere` (configured sinks: `out`, `sums`, `copy`)\n",
            config.display()
        )
    );
    acked(&streaming, streaming.producer.stats().batches_acked + 20).await;
    let (_, sent) = streaming.finish().await;
    let summary = server.stop().await;
    assert!(summary.starts_with("weir serve: stopped;"), "{summary}");
    let out = written(&dir.path().join("out.jsonl"));
    assert_eq!(out.len() as u64, sent * BATCH);
    let copied: BTreeSet<u64> = written(&dir.path().join("copy.jsonl"))
        .iter()
        .map(batch_of)
        .collect();
    let first = *copied.first().expect("copied");
    assert_eq!(
        copied,
        (first..sent).collect(),
        "every batch from the reload on"
    );
}

/// Batch `n` for `sums`: [`BATCH`] events, keyed `k0`..`k3`, one millisecond apart in event
/// time, each with an `amount` of 1 to 7.
fn amounts(n: u64) -> weir_client::EncodedBatch {
    let mut b = weir_format::BatchBuilder::new();
    for i in 0..BATCH {
        let t = n * BATCH + i;
        b.push(
            &Event::new(format!("{{\"amount\":{}}}", amount(t)), t as i64)
                .with_key(format!("k{}", t % 4)),
        );
    }
    weir_client::EncodedBatch::new(bytes::Bytes::from(b.finish())).expect("a batch")
}

fn amount(t: u64) -> u64 {
    t % 7 + 1
}

/// What count-sum writes for batches `0..batches` of [`amounts`] once every window finished:
/// per (key, one-second window), the count and the sum.
fn expected_windows(batches: u64) -> BTreeSet<(String, i64, u64, u64)> {
    let mut windows: std::collections::BTreeMap<(String, i64), (u64, u64)> =
        std::collections::BTreeMap::new();
    for t in 0..batches * BATCH {
        let w = windows
            .entry((format!("k{}", t % 4), (t / 1000 * 1000) as i64))
            .or_default();
        w.0 += 1;
        w.1 += amount(t);
    }
    windows
        .into_iter()
        .map(|((key, start), (count, sum))| (key, start, count, sum))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_three_times_during_a_stream_changes_no_window_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = free_udp_addr();
    let config = write_config(dir.path(), listen, 2);
    let mut server = WeirServe::start(&config).await;
    let streaming =
        Streaming::start_with(server.addr, &server.fingerprint, "sums", 1500, amounts).await;
    // Each restart runs `sums` on another number of workers: the checkpoint's windows are
    // shared out by key again, and what each worker count folded stays folded once.
    for (at, workers) in [(200, 3), (600, 1), (1000, 2)] {
        acked(&streaming, at).await;
        server.kill();
        write_config(dir.path(), listen, workers);
        server = WeirServe::start(&config).await;
    }
    let (producer, sent) = streaming.finish().await;
    // Event time far ahead finishes every window of the stream.
    let mut close = weir_format::BatchBuilder::new();
    close.push(&Event::new("{\"amount\":0}", 10_000_000).with_key("close"));
    producer
        .send_batch(
            0,
            &weir_client::EncodedBatch::new(bytes::Bytes::from(close.finish())).expect("a batch"),
        )
        .await
        .expect("queued")
        .await
        .expect("acked");
    let expected = expected_windows(sent);
    let seen = || -> Vec<(String, i64, u64, u64)> {
        std::fs::read_to_string(dir.path().join("sums.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
                (
                    v["key"].as_str().expect("a key").to_owned(),
                    v["value"]["start_ms"].as_i64().expect("a start"),
                    v["value"]["count"].as_u64().expect("a count"),
                    v["value"]["sum"].as_f64().expect("a sum") as u64,
                )
            })
            .collect()
    };
    within("every window written", async {
        while seen().iter().collect::<BTreeSet<_>>().len() < expected.len() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    server.stop().await;
    let seen = seen();
    let distinct: BTreeSet<(String, i64, u64, u64)> = seen.iter().cloned().collect();
    // Every window once or, across a crash, twice with the same value: never another value,
    // never missing.
    assert_eq!(distinct, expected);
    let windows: BTreeSet<(&str, i64)> = seen.iter().map(|w| (w.0.as_str(), w.1)).collect();
    assert_eq!(windows.len(), distinct.len(), "a window with two values");
    println!(
        "{} window results for {} windows across three kill -9",
        seen.len(),
        expected.len()
    );
}
