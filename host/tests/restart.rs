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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_serve_reloads_on_a_saved_file_on_sighup_and_on_weir_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), free_udp_addr());
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
            "error: {}:{line}:17: pipeline `clicks`: unknown sink `nowhere` (configured sinks: `out`, `copy`)\n",
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
