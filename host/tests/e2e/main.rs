//! End to end over loopback: weir-client → QUIC → `weir serve` → drop-bots → geo-enrich → file
//! sink, with the example plugins, a million events, and the file compared line by line with
//! what the same plugins make of the same events in-process.
//!
//! - [`a_million_events_arrive_exactly_once`]: no loss, no duplicate, in order.
//! - [`a_cut_connection_reconnects_without_loss_or_duplicate`]: the path is blacked out
//!   mid-stream (a UDP relay drops every datagram), the client times out, reconnects and
//!   resends its unacked batches; the server drops those it had accepted.
//! - [`nothing_acked_is_lost_when_the_server_is_killed`]: `weir serve` killed with -9 mid-stream
//!   and restarted; every event is in the file, and the only duplicates are of batches that
//!   were unacked at the crash (docs/PROTOCOL.md §11: at least once across a crash).
//!
//! Every wait is bounded and fails naming what it waited for; nothing asserts on timing.

mod relay;

use relay::Relay;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use weir::config::Config;
use weir::pipeline::{Chain, Stage};
use weir::runtime::{Runtime, RuntimeConfig, StageConfig};
use weir::server::Server;
use weir::workload::WorkloadSpec;
use weir_client::{ConnectOptions, Producer, ReconnectPolicy};
use weir_format::Batch;
use weir_format::json::event_ref_to_line;

/// The bound of every wait.
const WAIT: Duration = Duration::from_secs(300);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

const TABLE: &str = r#"{ US = "United States", FR = "France", DE = "Germany", JP = "Japan" }"#;

fn config_text(listen: &str) -> String {
    format!(
        r#"
[listener]
listen = "{listen}"
data_dir = "data"

[auth]
anonymous = true

[pipelines.clicks]
sinks = ["out"]

[[pipelines.clicks.stages]]
plugin = "example:drop-bots"

[[pipelines.clicks.stages]]
plugin = "example:geo-enrich"
with = {{ table = {TABLE} }}

[sinks.out]
type = "file"
path = "data/clicks.jsonl"
fsync = "never"
"#
    )
}

fn workload(events: u64) -> WorkloadSpec {
    WorkloadSpec {
        events,
        value_size: 256,
        keys: 1000,
        ..WorkloadSpec::default()
    }
}

/// The lines the file sink must hold: the same plugins run in-process over the workload.
fn expected_lines(spec: &WorkloadSpec) -> Vec<String> {
    let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
    let stage = |name: &str, bytes: &[u8], config: StageConfig| {
        let plugin = runtime.load_bytes(name, bytes).expect(name);
        Stage::new(&plugin, config, None).expect(name)
    };
    let table = serde_json::json!({
        "US": "United States", "FR": "France", "DE": "Germany", "JP": "Japan"
    });
    let mut chain = Chain::new(vec![
        stage(
            "drop-bots",
            weir::examples::DROP_BOTS,
            StageConfig::new("drop-bots"),
        ),
        stage(
            "geo-enrich",
            weir::examples::GEO_ENRICH,
            StageConfig::new("geo-enrich").with("table", table),
        ),
    ]);
    let mut lines = Vec::new();
    for batch in spec.batches(4096) {
        let output = chain.process(&batch).expect("the chain runs");
        assert!(output.dead_letters.is_empty(), "no dead letters expected");
        let out = output.events.to_batch(&batch);
        let out = Batch::verify(&out).expect("valid output");
        lines.extend(out.iter().map(|e| event_ref_to_line(&e)));
    }
    lines
}

/// Streams the workload through `producer` and waits until every event is acked.
async fn send_all(producer: &Producer, spec: &WorkloadSpec) {
    let pipeline = producer.pipeline_index("clicks").expect("pipeline");
    for i in 0..spec.events {
        producer
            .send_to(pipeline, &spec.event(i))
            .await
            .expect("send");
    }
    within("every ack", producer.flush()).await.expect("flush");
}

fn read_lines(path: &Path) -> Vec<String> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines().map(str::to_owned).collect()
}

/// Compares without printing a million lines: the count, then the first difference.
fn assert_same_lines(got: &[String], expected: &[String]) {
    if let Some(i) = (0..got.len().min(expected.len())).find(|&i| got[i] != expected[i]) {
        panic!(
            "line {} differs:\n  got      {}\n  expected {}",
            i + 1,
            got[i],
            expected[i]
        );
    }
    assert_eq!(
        got.len(),
        expected.len(),
        "number of lines in the file sink"
    );
}

fn options(addr: SocketAddr, fingerprint: &str, producer_id: &str) -> ConnectOptions {
    ConnectOptions::new(addr, producer_id, ["clicks"])
        .pin(fingerprint)
        .expect("fingerprint")
}

/// Options that notice a dead path within half a second and retry every 50 to 200 ms.
fn reconnecting(addr: SocketAddr, fingerprint: &str, producer_id: &str) -> ConnectOptions {
    options(addr, fingerprint, producer_id)
        .idle_timeout(Duration::from_millis(500))
        .keep_alive(Some(Duration::from_millis(100)))
        .reconnect(ReconnectPolicy {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            give_up_after: Some(Duration::from_secs(120)),
        })
}

/// An in-process server on a free loopback port, in a temporary directory.
async fn start_server() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config =
        Config::parse(&config_text("127.0.0.1:0"), dir.path().join("weir.toml")).expect("config");
    let server = within("server start", Server::start(config))
        .await
        .expect("server starts");
    (dir, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_events_arrive_exactly_once() {
    let (dir, server) = start_server().await;
    let spec = workload(1_000_000);
    let producer = within(
        "connect",
        Producer::connect(options(server.local_addr(), &server.fingerprint(), "e2e")),
    )
    .await
    .expect("connect");
    send_all(&producer, &spec).await;
    within("close", producer.close()).await.expect("close");
    let report = within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let stats = &report.stats.pipelines["clicks"];
    assert_eq!(stats.events_accepted, spec.events);
    assert_eq!(stats.duplicates_dropped, 0);

    let expected = expected_lines(&spec);
    assert_eq!(expected.len(), 900_000, "drop-bots drops one event in ten");
    assert_same_lines(
        &read_lines(&dir.path().join("data/clicks.jsonl")),
        &expected,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_reconnects_without_loss_or_duplicate() {
    let (dir, server) = start_server().await;
    let spec = workload(1_000_000);
    let relay = Relay::start(server.local_addr()).await;
    let producer = within(
        "connect",
        Producer::connect(reconnecting(relay.addr(), &server.fingerprint(), "e2e-cut")),
    )
    .await
    .expect("connect");

    let cut = async {
        // Black out once a third of the events is acked, long past the idle timeout.
        within("a third of the events acked", async {
            while producer.stats().events_acked < spec.events / 3 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        relay.black_out(Duration::from_secs(2)).await;
    };
    tokio::join!(send_all(&producer, &spec), cut);
    let client_stats = producer.stats();
    within("close", producer.close()).await.expect("close");
    let report = within("shutdown", server.shutdown())
        .await
        .expect("shutdown");

    assert!(relay.dropped() > 0, "the black-out dropped datagrams");
    assert!(
        client_stats.reconnects >= 1,
        "the client reconnected: {client_stats:?}"
    );
    assert_eq!(client_stats.events_acked, spec.events);
    let stats = &report.stats.pipelines["clicks"];
    assert_eq!(
        stats.events_accepted, spec.events,
        "each event accepted once"
    );
    assert_same_lines(
        &read_lines(&dir.path().join("data/clicks.jsonl")),
        &expected_lines(&spec),
    );
}

/// A free UDP port on loopback, so that a restarted server listens where the client reconnects.
fn free_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr").port()
}

/// Runs `weir serve` and waits until it prints its fingerprint.
fn spawn_server(dir: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["serve", "--config"])
        .arg(dir.join("weir.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run weir serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let fingerprint = loop {
        let line = lines
            .next()
            .expect("weir serve printed its fingerprint before exiting")
            .expect("read weir serve's output");
        if let Some(hex) = line
            .split_whitespace()
            .find(|word| word.len() == 64 && word.chars().all(|c| c.is_ascii_hexdigit()))
        {
            break hex.to_owned();
        }
    };
    // Keep draining its output so that it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, fingerprint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acked_is_lost_when_the_server_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = workload(200_000);
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    std::fs::write(dir.path().join("weir.toml"), config_text(&addr.to_string())).expect("config");
    let root = dir.path().to_path_buf();
    let (mut first, fingerprint) = tokio::task::spawn_blocking(move || spawn_server(&root))
        .await
        .expect("start weir serve");
    let producer = within(
        "connect",
        Producer::connect(reconnecting(addr, &fingerprint, "e2e-kill")),
    )
    .await
    .expect("connect");

    let dir_path: PathBuf = dir.path().to_path_buf();
    let crash = async {
        within("a quarter of the events acked", async {
            while producer.stats().events_acked < spec.events / 4 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        first.kill().expect("kill -9 weir serve");
        first.wait().expect("reap weir serve");
        let at_crash = producer.stats();
        let (second, again) = tokio::task::spawn_blocking(move || spawn_server(&dir_path))
            .await
            .expect("restart weir serve");
        assert_eq!(
            again, fingerprint,
            "the certificate is reused from the data dir"
        );
        (at_crash, second)
    };
    let ((at_crash, mut second), ()) = tokio::join!(crash, send_all(&producer, &spec));
    let after = producer.stats();
    within("close", producer.close()).await.expect("close");
    second.kill().expect("stop the second server");
    second.wait().expect("reap");

    assert!(after.reconnects >= 1, "{after:?}");
    assert_eq!(after.events_acked, spec.events);
    // Everything is there at least once, in order per first occurrence; duplicates are only
    // events unacked at the crash.
    let expected = expected_lines(&spec);
    let got = read_lines(&dir.path().join("data/clicks.jsonl"));
    let unacked_at_crash = at_crash.events_sent - at_crash.events_acked;
    let mut seen = std::collections::HashSet::new();
    let firsts: Vec<&String> = got.iter().filter(|line| seen.insert(*line)).collect();
    let duplicates = got.len() - firsts.len();
    assert!(
        duplicates as u64 <= unacked_at_crash,
        "{duplicates} duplicate lines, but only {unacked_at_crash} events were unacked at the crash"
    );
    assert_eq!(firsts.len(), expected.len(), "every event arrived");
    assert!(
        firsts.iter().zip(&expected).all(|(a, b)| *a == b),
        "events arrived in order"
    );
}
