//! The kafka source against a real broker started for each test (nisshi, `common/kafka.rs`):
//! records become events exactly (key, value, timestamp, headers; a record whose header name
//! is not UTF-8 becomes a dead letter), offsets are committed once the sinks accepted the
//! events and not before (a router whose sink cannot deliver commits nothing, and after it is
//! killed the next member of the group reads every record), two routers in one group share
//! the partitions across rebalances without losing a record, and of three `weir serve`s in one
//! group on six partitions, one killed with -9 mid-stream and restarted, none loses a record
//! (the records read twice are counted and printed); a broker that is down when the router
//! starts is reported in one line and read in full once it is up, and one killed with -9
//! mid-stream and restarted on its storage is reported and waited for, with no record lost; a
//! topic that does not exist yet is reported, then read in full once it is created; a
//! reload that restarts the
//! pipeline keeps the source feeding it (a change of the source itself waits for a restart,
//! and the removal of its pipeline is refused); `weir demo --kafka` runs; a source paused by a
//! full pipeline resumes after a rebalance; a checkpointed aggregate fed by Kafka, killed
//! with -9 mid-stream, counts every record exactly once (what the group reads again below the
//! checkpoint's position is skipped); and three such routers in one group with fixed instance
//! ids (static membership), one killed with -9 and restarted, write the window results of one
//! router.

#[path = "common/kafka.rs"]
mod kafka;
#[path = "common/serve.rs"]
mod serve;

use kafka::{Broker, Record, committed, create_topic, ends, now_ms, produce};
use serve::WeirServe;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use weir::config::Config;
use weir::server::Server;
use weir_format::Event;

/// How long a test waits for records to arrive before it fails.
const ARRIVE: Duration = Duration::from_secs(60);

/// Record `n` of a test: on partition `n % partitions`, keyed `k{n % 6}`, a header `n`,
/// event time `1_000 + n`.
fn record(n: u64, partitions: i32) -> Record {
    Record {
        partition: (n % partitions as u64) as i32,
        key: Some(format!("k{}", n % 6).into_bytes()),
        value: format!("{{\"n\":{n}}}").into_bytes(),
        headers: vec![("n".into(), n.to_string().into_bytes())],
        timestamp_ms: Some(1_000 + n as i64),
    }
}

/// The config of a router whose kafka source feeds pipeline `p`, which writes to `sink` (a
/// TOML sink table body) and its dead letters to `dead.jsonl`.
fn config_text(dir: &Path, broker: &str, topic: &str, group: &str, sink: &str) -> String {
    format!(
        r#"
[listener]
listen = "127.0.0.1:0"
data_dir = "{data}"

[sources.orders]
type = "kafka"
brokers = "{broker}"
topic = "{topic}"
group = "{group}"
pipeline = "p"
batch_events = 64
rebalance_wait_ms = 5000
# A member that dies is noticed in 6 s (not librdkafka's 45 s); a topic created after the
# source subscribed is found within a second.
properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500", "topic.metadata.refresh.interval.ms" = "1000" }}

[pipelines.p]
sinks = ["out"]
dead_letters = "dead"

[sinks.out]
{sink}

[sinks.dead]
type = "file"
path = "{dead}"
"#,
        data = dir.join("data").display(),
        dead = dir.join("dead.jsonl").display(),
    )
}

fn file_sink(path: &Path) -> String {
    format!("type = \"file\"\npath = \"{}\"", path.display())
}

async fn start(dir: &Path, text: &str) -> Server {
    let path = write_config(dir, text);
    let config = Config::load(&path).expect("a valid config");
    Server::start(config).await.expect("the router starts")
}

/// The events in a file sink's file (none when it does not exist yet).
fn events(path: &Path) -> Vec<Event> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| weir_format::json::parse_line(line, 0).expect("a JSON line"))
        .collect()
}

/// Waits until `count()` reaches `want`, failing after [`ARRIVE`].
async fn wait_for(what: &str, want: usize, count: impl Fn() -> usize) {
    let deadline = Instant::now() + ARRIVE;
    loop {
        let have = count();
        if have >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {have} of {want} after {ARRIVE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `text` written as `dir/weir.toml`; its path.
fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("weir.toml");
    std::fs::write(&path, text).expect("config written");
    path
}

/// The `n` of each event, sorted.
fn sorted_ns<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<u64> {
    let mut ns: Vec<u64> = events.into_iter().map(n_of).collect();
    ns.sort_unstable();
    ns
}

fn n_of(event: &Event) -> u64 {
    let text = String::from_utf8_lossy(&event.value);
    text.trim_start_matches("{\"n\":")
        .trim_end_matches('}')
        .parse()
        .expect("a value written by this test")
}

#[tokio::test(flavor = "multi_thread")]
async fn records_become_events_and_offsets_are_committed_once_the_sinks_took_them() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("a temp dir");
    create_topic(&broker.addr(), "orders", 3).await;
    let records: Vec<Record> = (0..600).map(|n| record(n, 3)).collect();
    produce(&broker.addr(), "orders", &records).await;
    // A record without a value (a tombstone) is an event with an empty value.
    let mut tombstone = record(600, 3);
    tombstone.value.clear();
    produce(&broker.addr(), "orders", &[tombstone]).await;
    // A header name that is not UTF-8 cannot be an event's: a dead letter.
    produce_bad_header(&broker.addr(), "orders", 601).await;

    let out = dir.path().join("out.jsonl");
    let server = start(
        dir.path(),
        &(config_text(
            dir.path(),
            &broker.addr(),
            "orders",
            "router",
            &file_sink(&out),
        ) + "\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t0ken\"\n"),
    )
    .await;
    wait_for("events in the sink", 601, || events(&out).len()).await;
    wait_for("dead letters", 1, || {
        events(&dir.path().join("dead.jsonl")).len()
    })
    .await;
    // Caught up: every partition's lag is 0 (librdkafka reports it every second).
    let caught_up = |p: i32| {
        format!(
            "weir_source_kafka_lag{{source=\"kafka/orders\",topic=\"orders\",partition=\"{p}\"}} 0\n"
        )
    };
    wait_for("the lag of every partition at 0", 3, || {
        let text = server.metrics().render();
        (0..3).filter(|&p| text.contains(&caught_up(p))).count()
    })
    .await;
    // `weir top` shows the source, its partitions and their lag.
    let admin = server.admin_addr().expect("an admin endpoint").to_string();
    let top = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["top", "--once", "--admin", &admin, "--token", "t0ken"])
            .output()
            .expect("weir top runs")
    })
    .await
    .expect("joined");
    let screen = String::from_utf8_lossy(&top.stdout);
    assert!(top.status.success(), "{screen}");
    let line = screen
        .lines()
        .find(|l| l.starts_with("orders "))
        .unwrap_or_else(|| panic!("no source line: {screen}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    // Name, batches/s, batches, lag, pipeline, partitions.
    assert_eq!(cells[3], "0", "{line}");
    assert_eq!(cells[4], "p", "{line}");
    assert_eq!(cells[5], "orders[0,1,2]", "{line}");
    assert!(
        line.ends_with(&format!(
            "/ kafka {} topics orders as group router",
            broker.addr()
        )),
        "{line}"
    );
    let report = server.shutdown().await.expect("a graceful stop");
    assert!(report.problems.is_empty(), "{:?}", report.problems);

    let got = events(&out);
    assert_eq!(got.len(), 601, "every record once");
    let mut by_n: BTreeMap<u64, &Event> = BTreeMap::new();
    for event in &got {
        if event.value.is_empty() {
            assert_eq!(event.key.as_deref(), Some(&b"k0"[..]));
            assert_eq!(event.timestamp_ms, 1_600);
            continue;
        }
        assert!(by_n.insert(n_of(event), event).is_none(), "a duplicate");
    }
    assert_eq!(by_n.len(), 600);
    for (n, event) in by_n {
        assert_eq!(
            event.key.as_deref(),
            Some(format!("k{}", n % 6).as_bytes()),
            "key of {n}"
        );
        assert_eq!(event.timestamp_ms, 1_000 + n as i64, "time of {n}");
        assert_eq!(event.header("n"), Some(n.to_string().as_bytes()));
    }
    // Order holds per partition: the ns of one partition arrive rising.
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for event in got.iter().filter(|e| !e.value.is_empty()) {
        let n = n_of(event);
        if let Some(before) = last.insert(n % 3, n) {
            assert!(before < n, "partition {} went {before} then {n}", n % 3);
        }
    }

    let dead = events(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 1);
    let letter = &dead[0];
    assert_eq!(letter.value, b"{\"n\":601}");
    assert_eq!(
        letter.header("weir-error"),
        Some(&b"kafka record cannot be an event: header 0's name is not UTF-8"[..])
    );
    assert_eq!(letter.header("weir-source"), Some(&b"orders"[..]));
    assert_eq!(letter.header("kafka-topic"), Some(&b"orders"[..]));
    // Partition 0 held records 0, 3, …, 597 (offsets 0 to 199) and the tombstone (200).
    assert_eq!(letter.header("kafka-partition"), Some(&b"0"[..]));
    assert_eq!(letter.header("kafka-offset"), Some(&b"201"[..]));

    // Everything the sinks took is committed: the group resumes after the last record.
    assert_eq!(
        committed(&broker.addr(), "router", "orders", 3),
        ends(&broker.addr(), "orders", 3)
    );
}

/// Produces record `n` with one header whose name is the bytes ff fe (not UTF-8). rdkafka's
/// safe API only takes `&str` names, so the header is added through librdkafka's own call.
async fn produce_bad_header(addr: &str, topic: &str, n: u64) {
    use rdkafka::ClientConfig;
    use rdkafka::bindings as rdsys;
    use rdkafka::message::{BorrowedHeaders, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .create()
        .expect("a producer");
    let headers = OwnedHeaders::new();
    let name = [0xffu8, 0xfe];
    let value = b"x";
    // SAFETY: `as_borrowed` is a view of the native header list `headers` owns, which lives
    // until the record is sent; librdkafka copies the name and value.
    let err = unsafe {
        rdsys::rd_kafka_header_add(
            (headers.as_borrowed() as *const BorrowedHeaders)
                .cast_mut()
                .cast(),
            name.as_ptr().cast(),
            name.len() as isize,
            value.as_ptr().cast(),
            value.len() as isize,
        )
    };
    assert_eq!(err, rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    let value = format!("{{\"n\":{n}}}");
    producer
        .send(
            FutureRecord::to(topic)
                .partition(0)
                .key("k")
                .payload(&value)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("acked");
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_a_sink_did_not_accept_is_committed_and_the_next_member_reads_it_all() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("a temp dir");
    create_topic(&broker.addr(), "pending", 2).await;
    let records: Vec<Record> = (0..200).map(|n| record(n, 2)).collect();
    produce(&broker.addr(), "pending", &records).await;

    // A router whose sink's destination is down: it reads, and can commit nothing.
    let dead_port = kafka::free_port();
    let first = tempfile::tempdir().expect("a temp dir");
    let config = first.path().join("weir.toml");
    std::fs::write(
        &config,
        config_text(
            first.path(),
            &broker.addr(),
            "pending",
            "group",
            &format!(
                "type = \"http\"\nurl = \"http://127.0.0.1:{dead_port}/\"\nwhen_full = \"block\"\nretry_max_ms = 200"
            ),
        ),
    )
    .expect("config written");
    let mut router = WeirServe::start_logging(&config, "info").await;
    router
        .logged("partitions assigned: pending[0], pending[1]")
        .await;
    // It read the records and handed them to its pipeline; the sink retries.
    router.logged("http://127.0.0.1").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        committed(&broker.addr(), "group", "pending", 2),
        vec![],
        "offsets committed that no sink accepted"
    );
    router.kill();

    // The next member of the group reads every record.
    let out = dir.path().join("out.jsonl");
    let server = start(
        dir.path(),
        &config_text(
            dir.path(),
            &broker.addr(),
            "pending",
            "group",
            &file_sink(&out),
        ),
    )
    .await;
    wait_for("events in the sink", 200, || events(&out).len()).await;
    server.shutdown().await.expect("a graceful stop");
    let ns = sorted_ns(&events(&out));
    assert_eq!(ns, (0..200).collect::<Vec<_>>());
    assert_eq!(
        committed(&broker.addr(), "group", "pending", 2),
        ends(&broker.addr(), "pending", 2)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_members_share_the_partitions_across_rebalances_and_lose_nothing() {
    let broker = Broker::start();
    create_topic(&broker.addr(), "shared", 4).await;
    let (a, b) = (
        tempfile::tempdir().expect("a temp dir"),
        tempfile::tempdir().expect("a temp dir"),
    );
    let (out_a, out_b) = (a.path().join("out.jsonl"), b.path().join("out.jsonl"));
    let config = |dir: &Path, out: &Path| {
        config_text(dir, &broker.addr(), "shared", "pair", &file_sink(out))
    };
    let total = || events(&out_a).len() + events(&out_b).len();
    let mut produced = 0u64;
    let mut chunk = async |n: u64| {
        let records: Vec<Record> = (produced..produced + n).map(|i| record(i, 4)).collect();
        produce(&broker.addr(), "shared", &records).await;
        produced += n;
        produced as usize
    };

    let router_a = start(a.path(), &config(a.path(), &out_a)).await;
    let want = chunk(500).await;
    wait_for("the first chunk", want, total).await;
    // B joins: once the group rebalanced, records reach both.
    let router_b = start(b.path(), &config(b.path(), &out_b)).await;
    let deadline = Instant::now() + ARRIVE;
    while events(&out_b).is_empty() {
        assert!(
            Instant::now() < deadline,
            "B got no partition within {ARRIVE:?}"
        );
        let want = chunk(20).await;
        wait_for("records while B joins", want, total).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let want = chunk(500).await;
    wait_for("the second chunk", want, total).await;
    let shared_a = events(&out_a).len();
    let shared_b = events(&out_b).len();
    // A leaves: B takes every partition.
    router_a.shutdown().await.expect("a graceful stop");
    let want = chunk(500).await;
    wait_for("the third chunk", want, total).await;
    router_b.shutdown().await.expect("a graceful stop");

    let mut ns = sorted_ns(events(&out_a).iter().chain(&events(&out_b)));
    let read = ns.len();
    ns.dedup();
    assert_eq!(
        ns,
        (0..produced).collect::<Vec<_>>(),
        "every record at least once"
    );
    println!(
        "two members: {read} events for {produced} records; while both ran A took {shared_a}, B {shared_b}; at the end B {}",
        events(&out_b).len()
    );
    // Graceful stops commit everything: a rebalance with nothing in flight reads nothing twice.
    assert_eq!(
        read as u64, produced,
        "records read twice across graceful rebalances"
    );
    assert_eq!(
        committed(&broker.addr(), "pair", "shared", 4),
        ends(&broker.addr(), "shared", 4)
    );
}

/// Events in a file written by a router killed with -9: its last line may be torn.
fn events_of_killed(path: &Path) -> Vec<Event> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, line)| match weir_format::json::parse_line(line, 0) {
            Ok(event) => Some(event),
            Err(e) if i + 1 == lines.len() => {
                println!("a torn last line in {}: {e}", path.display());
                None
            }
            Err(e) => panic!("line {} of {}: {e}", i + 1, path.display()),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_members_one_killed_and_restarted_lose_no_record() {
    const RECORDS: u64 = 6_000;
    let broker = Broker::start();
    create_topic(&broker.addr(), "stream", 6).await;
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("a temp dir"))
        .collect();
    // A dead member is noticed within its session timeout (6 s, `config_text`).
    let config = |dir: &Path, out: &str| {
        config_text(
            dir,
            &broker.addr(),
            "stream",
            "trio",
            &file_sink(&dir.join(out)),
        )
    };
    let write = |dir: &Path, out: &str| write_config(dir, &config(dir, out));
    let mut routers = Vec::new();
    for dir in &dirs {
        routers.push(WeirServe::start(&write(dir.path(), "out.jsonl")).await);
    }
    let outputs = |dirs: &[tempfile::TempDir]| -> Vec<Event> {
        let mut all = Vec::new();
        for dir in dirs {
            all.extend(events(&dir.path().join("out.jsonl")));
            all.extend(events_of_killed(&dir.path().join("killed.jsonl")));
            all.extend(events(&dir.path().join("restarted.jsonl")));
        }
        all
    };
    let distinct = |dirs: &[tempfile::TempDir]| {
        let mut ns = sorted_ns(&outputs(dirs));
        ns.dedup();
        ns.len()
    };

    let mut produced = 0u64;
    let mut killed = false;
    while produced < RECORDS {
        let records: Vec<Record> = (produced..produced + 200).map(|n| record(n, 6)).collect();
        produce(&broker.addr(), "stream", &records).await;
        produced += 200;
        if produced == RECORDS / 2 && !killed {
            // Router 1 goes down hard mid-stream, with whatever it had not committed.
            wait_for("the first half", (RECORDS / 3) as usize, || distinct(&dirs)).await;
            routers[1].kill();
            std::fs::rename(
                dirs[1].path().join("out.jsonl"),
                dirs[1].path().join("killed.jsonl"),
            )
            .expect("the killed router's output set aside");
            killed = true;
        }
        if produced == 2 * RECORDS / 3 {
            // And comes back on the same data directory.
            routers[1] = WeirServe::start(&write(dirs[1].path(), "restarted.jsonl")).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for("every record", RECORDS as usize, || distinct(&dirs)).await;
    for router in routers {
        router.stop().await;
    }
    let all = outputs(&dirs);
    let mut ns = sorted_ns(&all);
    let read = ns.len() as u64;
    ns.dedup();
    assert_eq!(ns, (0..RECORDS).collect::<Vec<_>>(), "a record missing");
    println!(
        "three members, one killed with -9 and restarted: {read} events for {RECORDS} records, {} read twice",
        read - RECORDS
    );
    assert_eq!(
        committed(&broker.addr(), "trio", "stream", 6),
        ends(&broker.addr(), "stream", 6)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_down_at_the_start_is_waited_for_and_then_read_in_full() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let port = kafka::free_port();
    let brokers = format!("127.0.0.1:{port}");
    let out = dir.path().join("out.jsonl");
    let path = write_config(
        dir.path(),
        &config_text(dir.path(), &brokers, "late", "waiting", &file_sink(&out)),
    );
    // The router starts with nothing listening on the brokers' port, and says so.
    let router = WeirServe::start_logging(&path, "warn").await;
    let complaint = router
        .logged(&format!("kafka source `orders` (brokers {brokers})"))
        .await;
    assert!(complaint.contains("Connection refused"), "{complaint}");
    // The broker comes up: every record is read.
    let broker = Broker::start_on(port);
    create_topic(&broker.addr(), "late", 2).await;
    let records: Vec<Record> = (0..300).map(|n| record(n, 2)).collect();
    produce(&broker.addr(), "late", &records).await;
    wait_for("events in the sink", 300, || events(&out).len()).await;
    router.stop().await;
    let ns = sorted_ns(&events(&out));
    assert_eq!(ns, (0..300).collect::<Vec<_>>());
    assert_eq!(
        committed(&broker.addr(), "waiting", "late", 2),
        ends(&broker.addr(), "late", 2)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_topic_is_reported_and_read_once_it_exists() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("a temp dir");
    let out = dir.path().join("out.jsonl");
    let path = write_config(
        dir.path(),
        &config_text(
            dir.path(),
            &broker.addr(),
            "later",
            "later",
            &file_sink(&out),
        ),
    );
    // The consumer asks for no topic to be created (librdkafka's default for consumers).
    let router = WeirServe::start_logging(&path, "warn").await;
    let complaint = router
        .logged(&format!(
            "kafka source `orders` (brokers {}): Subscribed topic not available: later",
            broker.addr()
        ))
        .await;
    assert!(complaint.contains("Unknown topic"), "{complaint}");
    create_topic(&broker.addr(), "later", 2).await;
    let records: Vec<Record> = (0..200).map(|n| record(n, 2)).collect();
    produce(&broker.addr(), "later", &records).await;
    wait_for("events in the sink", 200, || events(&out).len()).await;
    router.stop().await;
    let ns = sorted_ns(&events(&out));
    assert_eq!(ns, (0..200).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_killed_mid_stream_is_waited_for_and_no_record_is_lost() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut broker = Broker::start_stored(&dir.path().join("nisshi.db"));
    let brokers = broker.addr();
    create_topic(&brokers, "midway", 2).await;
    let out = dir.path().join("out.jsonl");
    let path = write_config(
        dir.path(),
        &config_text(dir.path(), &brokers, "midway", "midway", &file_sink(&out)),
    );
    let router = WeirServe::start_logging(&path, "warn").await;
    // Times of now: the restarted broker applies its retention (a week) to what it finds.
    let now = now_ms();
    let recent = |n: u64| Record {
        timestamp_ms: Some(now + n as i64),
        ..record(n, 2)
    };
    let first: Vec<Record> = (0..300).map(recent).collect();
    produce(&brokers, "midway", &first).await;
    wait_for("the first events in the sink", 300, || events(&out).len()).await;
    // SIGKILL: no goodbye to the router's consumer; it says what it cannot reach.
    broker.kill();
    let complaint = router
        .logged(&format!("kafka source `orders` (brokers {brokers})"))
        .await;
    assert!(
        complaint.contains("Connection refused") || complaint.contains("Disconnected"),
        "{complaint}"
    );
    broker.restart();
    let second: Vec<Record> = (300..600).map(recent).collect();
    produce(&brokers, "midway", &second).await;
    wait_for("every event in the sink", 600, || {
        events(&out)
            .iter()
            .map(n_of)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    })
    .await;
    router.stop().await;
    let ns: Vec<u64> = events(&out).iter().map(n_of).collect();
    let distinct: std::collections::BTreeSet<u64> = ns.iter().copied().collect();
    assert_eq!(distinct, (0..600).collect());
    eprintln!(
        "{} events for 600 records: {} read twice across the broker's restart",
        ns.len(),
        ns.len() - 600
    );
    assert_eq!(
        committed(&brokers, "midway", "midway", 2),
        ends(&brokers, "midway", 2)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn weir_demo_kafka_counts_every_record_the_edge_wrote_across_two_central_routers() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("a temp dir");
    let addr = broker.addr();
    let demo_dir = dir.path().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["demo", "--kafka", &addr, "--events", "20000", "--dir"])
            .arg(&demo_dir)
            .env("WEIR_LOG", "warn")
            .output()
            .expect("weir demo runs")
    })
    .await
    .expect("joined");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("edge: 20000 events in over QUIC, 18000 written to weir-demo-"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "the window results of both count 18000 events: every record the edge wrote, once"
        ),
        "{stdout}"
    );
    // Each central router took a share.
    for name in ["central-1", "central-2"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no line for {name}: {stdout}"));
        assert!(!line.starts_with(&format!("{name}: 0 records")), "{line}");
    }
    for config in ["edge.toml", "central-1.toml", "central-2.toml"] {
        weir::config::Config::load(dir.path().join(config)).expect("the demo's configs are valid");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_restarts_the_pipeline_keeps_the_source_feeding_it() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("a temp dir");
    create_topic(&broker.addr(), "reloaded", 3).await;
    let out = dir.path().join("out.jsonl");
    let text = config_text(
        dir.path(),
        &broker.addr(),
        "reloaded",
        "reloading",
        &file_sink(&out),
    );
    let server = start(dir.path(), &text).await;
    let path = dir.path().join("weir.toml");
    let records = |from: u64| -> Vec<Record> { (from..from + 500).map(|n| record(n, 3)).collect() };
    produce(&broker.addr(), "reloaded", &records(0)).await;
    wait_for("the first records", 500, || events(&out).len()).await;

    // A stage added: the pipeline is restarted, the source goes on feeding its successor.
    let with_stage = text.replace(
        "dead_letters = \"dead\"\n",
        "dead_letters = \"dead\"\n\n[[pipelines.p.stages]]\nplugin = \"example:identity\"\n",
    );
    assert_ne!(with_stage, text);
    std::fs::write(&path, &with_stage).expect("config written");
    let (addr, second) = (broker.addr(), records(500));
    let producing = produce(&addr, "reloaded", &second);
    let (report, ()) = tokio::join!(server.reload(), producing);
    let report = report.expect("the reload applies");
    assert!(
        report
            .changes
            .iter()
            .any(|c| c.starts_with("pipeline `p`: restarted")),
        "{:?}",
        report.changes
    );
    wait_for("the records across the restart", 1000, || {
        events(&out).len()
    })
    .await;

    // The source itself needs a restart to change; removing its pipeline is refused.
    std::fs::write(
        &path,
        with_stage.replace("batch_events = 64", "batch_events = 32"),
    )
    .expect("config written");
    let report = server.reload().await.expect("the reload applies");
    assert_eq!(
        report.restart,
        vec!["[sources.orders]: changed".to_owned()],
        "{report:?}"
    );
    let without = with_stage
        .split("[sources.orders]")
        .next()
        .expect("the listener")
        .to_owned()
        + "[pipelines.q]\nsinks = [\"out\"]\ndead_letters = \"dead\"\n\n[sinks.out]\n"
        + &file_sink(&out)
        + &format!(
            "\n\n[sinks.dead]\ntype = \"file\"\npath = \"{}\"\n",
            dir.path().join("dead.jsonl").display()
        );
    std::fs::write(&path, without).expect("config written");
    let refused = server.reload().await.expect_err("refused");
    assert_eq!(
        refused.to_string(),
        "pipeline `p` is fed by source `orders`, which runs until the router restarts: keep the pipeline, or restart the router to remove both"
    );

    server.shutdown().await.expect("a graceful stop");
    let ns = sorted_ns(&events(&out));
    assert_eq!(ns, (0..1000).collect::<Vec<_>>(), "every record once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_paused_by_a_full_pipeline_resumes_after_a_rebalance() {
    let broker = Broker::start();
    create_topic(&broker.addr(), "paced", 4).await;
    let records: Vec<Record> = (0..2000).map(|n| record(n, 4)).collect();
    produce(&broker.addr(), "paced", &records).await;
    // Router A: a pipeline queue of one batch, and a sink whose destination is down, with a
    // small buffer: A reads a little, its pipeline fills, its source pauses.
    let (a, b) = (
        tempfile::tempdir().expect("a temp dir"),
        tempfile::tempdir().expect("a temp dir"),
    );
    let receiver_port = kafka::free_port();
    let http = format!(
        "type = \"http\"\nurl = \"http://127.0.0.1:{receiver_port}/\"\nwhen_full = \"block\"\nbuffer_events = 64\nbatch_events = 64\nretry_max_ms = 100"
    );
    let text = config_text(a.path(), &broker.addr(), "paced", "paced", &http).replace(
        "[sources.orders]",
        "[limits]\nmax_in_flight = 1\nmax_producers_per_pipeline = 1\n\n[sources.orders]",
    );
    let router_a = start(a.path(), &text).await;
    let deadline = Instant::now() + ARRIVE;
    while router_a.stats().events_accepted < 64 {
        assert!(Instant::now() < deadline, "A read nothing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let taken = router_a.stats().events_accepted;
    assert!(
        taken < 2000,
        "A's pipeline took {taken} records: it never filled"
    );

    // B joins while A is paused: the partitions are shared out again.
    let out_b = b.path().join("out.jsonl");
    let router_b = start(
        b.path(),
        &config_text(
            b.path(),
            &broker.addr(),
            "paced",
            "paced",
            &file_sink(&out_b),
        ),
    )
    .await;
    wait_for("B's share", 1, || events(&out_b).len()).await;

    // A's destination comes up: A takes its partitions up again where it paused.
    let received = a.path().join("received.jsonl");
    let receiver = weir::receiver::Receiver::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], receiver_port)),
        weir::receiver::ReceiverOptions {
            output: Some(received.clone()),
            ..weir::receiver::ReceiverOptions::default()
        },
    )
    .await
    .expect("the receiver starts");
    let distinct = || {
        let mut ns = sorted_ns(events(&received).iter().chain(&events(&out_b)));
        ns.dedup();
        ns.len()
    };
    wait_for("every record", 2000, distinct).await;
    router_a.shutdown().await.expect("a graceful stop");
    router_b.shutdown().await.expect("a graceful stop");
    receiver.stop().await;
    assert!(
        !events(&received).is_empty(),
        "A delivered nothing after its destination came up"
    );
    assert_eq!(
        committed(&broker.addr(), "paced", "paced", 4),
        ends(&broker.addr(), "paced", 4)
    );
}

/// The config of a router whose kafka source feeds a checkpointed count-sum (one-second
/// tumbling windows of event time) writing to `windows.jsonl`.
fn aggregate_config(dir: &Path, broker: &str, topic: &str) -> String {
    config_text(
        dir,
        broker,
        topic,
        "totals",
        &file_sink(&dir.join("windows.jsonl")),
    )
    .replace(
        "dead_letters = \"dead\"\n",
        "dead_letters = \"dead\"\n\n[[pipelines.p.stages]]\nplugin = \"example:count-sum\"\nwindow = \"tumbling:1s\"\n",
    )
}

/// Record `n` of the aggregate tests: key `k{n % keys}` on partition `n % keys % partitions`
/// (a key stays on one partition), amount `n`, event time `step_ms` apart.
fn amount(n: u64, keys: u64, partitions: u64, step_ms: i64) -> Record {
    let key = n % keys;
    Record {
        partition: (key % partitions) as i32,
        key: Some(format!("k{key}").into_bytes()),
        value: format!("{{\"amount\":{n}}}").into_bytes(),
        headers: vec![],
        timestamp_ms: Some(1_000_000 + step_ms * n as i64),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpointed_aggregate_killed_with_9_counts_every_record_once() {
    const RECORDS: u64 = 2_000;
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("a temp dir");
    create_topic(&broker.addr(), "amounts", 1).await;
    let path = write_config(
        dir.path(),
        &aggregate_config(dir.path(), &broker.addr(), "amounts"),
    );
    let windows = dir.path().join("windows.jsonl");

    let mut router = WeirServe::start(&path).await;
    // Records keep coming, 100 at a time, through the crash and the restart.
    let producing = {
        let addr = broker.addr();
        tokio::spawn(async move {
            for chunk in (0..RECORDS).collect::<Vec<_>>().chunks(100) {
                let records: Vec<Record> = chunk.iter().map(|n| amount(*n, 4, 1, 100)).collect();
                produce(&addr, "amounts", &records).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // A record far ahead closes every window of the stream.
            produce(&addr, "amounts", &[amount(RECORDS + 1_000, 4, 1, 100)]).await;
        })
    };
    // Some windows closed and written: the router is in the middle of the stream.
    wait_for("the first windows", 20, || events_of_killed(&windows).len()).await;
    router.kill();
    // Restarted on the same data directory: the checkpoint holds the open windows and where
    // the partition stands; what the group reads again below that is skipped.
    let router = WeirServe::start(&path).await;
    producing.await.expect("the producer");
    let expected_windows = (RECORDS as usize / 10) * 4;
    let distinct_windows = || {
        let mut seen: Vec<(Option<Vec<u8>>, i64)> = events_of_killed(&windows)
            .iter()
            .map(|e| (e.key.clone(), e.timestamp_ms))
            .collect();
        seen.sort();
        seen.dedup();
        seen.len()
    };
    wait_for("every window", expected_windows, distinct_windows).await;
    router.stop().await;

    // Each (key, window) once or, where the crash came between a window's write and its
    // checkpoint, twice with the same result; none counts a record twice or misses one.
    let mut results: BTreeMap<(Vec<u8>, i64), String> = BTreeMap::new();
    for event in events_of_killed(&windows) {
        let key = (
            event.key.clone().expect("a keyed window"),
            event.timestamp_ms,
        );
        let value = String::from_utf8(event.value.clone()).expect("JSON");
        if let Some(before) = results.insert(key.clone(), value.clone()) {
            assert_eq!(
                before, value,
                "window {key:?} written twice with different results"
            );
        }
    }
    assert_eq!(results.len(), expected_windows);
    for ((key, end), value) in &results {
        let k: u64 = String::from_utf8_lossy(&key[1..]).parse().expect("k0..k3");
        let start = 1_000_000 + 1_000 * ((end + 1 - 1_000_000) / 1_000 - 1);
        let ns: Vec<u64> = (0..RECORDS)
            .filter(|n| n % 4 == k && (1_000_000 + 100 * *n as i64) / 1_000 == start / 1_000)
            .collect();
        let result: serde_json::Value = serde_json::from_str(value).expect("a count-sum result");
        assert_eq!(
            result["count"],
            ns.len() as u64,
            "count of {key:?} ending {end}"
        );
        assert_eq!(
            result["sum"].as_f64(),
            Some(ns.iter().sum::<u64>() as f64),
            "sum of {key:?} ending {end}"
        );
    }
}

/// Record `n` of the keyed test: twelve keys on six partitions, 10 ms apart.
fn keyed(n: u64) -> Record {
    amount(n, 12, 6, 10)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_members_with_fixed_instance_ids_one_killed_give_the_window_results_of_one_router() {
    const RECORDS: u64 = 3_000;
    let broker = Broker::start();
    create_topic(&broker.addr(), "keyed", 6).await;
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("a temp dir"))
        .collect();
    // Static membership: a member restarted within its session timeout takes its own
    // partitions back, with no rebalance, and its checkpoint holds their open windows. Each
    // window allows an hour of lateness: partitions read at different speeds make no event
    // late.
    let paths: Vec<std::path::PathBuf> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            let text = aggregate_config(dir.path(), &broker.addr(), "keyed")
                .replace(
                    "\"session.timeout.ms\" = \"6000\"",
                    &format!(
                        "\"session.timeout.ms\" = \"30000\", \"group.instance.id\" = \"router-{i}\""
                    ),
                )
                .replace("tumbling:1s", "tumbling:1s,lateness:1h");
            write_config(dir.path(), &text)
        })
        .collect();
    let mut routers = Vec::new();
    for path in &paths {
        routers.push(WeirServe::start(path).await);
    }
    let committed_total = || -> i64 {
        committed(&broker.addr(), "totals", "keyed", 6)
            .iter()
            .map(|(_, offset)| (*offset).max(0))
            .sum()
    };
    for chunk in (0..RECORDS).collect::<Vec<_>>().chunks(100) {
        let records: Vec<Record> = chunk.iter().copied().map(keyed).collect();
        produce(&broker.addr(), "keyed", &records).await;
        if chunk[0] == RECORDS / 2 {
            // Router 1 goes down hard mid-stream, its windows open, and comes back on the same
            // data directory and instance id.
            wait_for("a third committed", (RECORDS / 3) as usize, || {
                committed_total() as usize
            })
            .await;
            routers[1].kill();
            std::fs::rename(
                dirs[1].path().join("windows.jsonl"),
                dirs[1].path().join("killed.jsonl"),
            )
            .ok();
            routers[1] = WeirServe::start(&paths[1]).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A record far ahead on every partition closes every window of every router.
    let closing: Vec<Record> = (0..6).map(|p| keyed(p + 1_000_000_000)).collect();
    produce(&broker.addr(), "keyed", &closing).await;

    let mut expected: BTreeMap<(String, i64), (u64, u64)> = BTreeMap::new();
    for n in 0..RECORDS {
        let t = 1_000_000 + 10 * n as i64;
        let window = expected
            .entry((format!("k{}", n % 12), t / 1_000 * 1_000 + 999))
            .or_default();
        window.0 += 1;
        window.1 += n;
    }
    let written = || -> Vec<Event> {
        let mut all = Vec::new();
        for dir in &dirs {
            all.extend(events_of_killed(&dir.path().join("windows.jsonl")));
            all.extend(events_of_killed(&dir.path().join("killed.jsonl")));
        }
        all
    };
    let distinct = || {
        let mut seen: Vec<(Option<Vec<u8>>, i64)> = written()
            .iter()
            .map(|e| (e.key.clone(), e.timestamp_ms))
            .collect();
        seen.sort();
        seen.dedup();
        seen.len()
    };
    wait_for("every window", expected.len(), distinct).await;
    for router in routers {
        router.stop().await;
    }
    // Every window once or, across the crash, twice with the same result: as one router
    // would have written them.
    let mut results: BTreeMap<(String, i64), (u64, u64)> = BTreeMap::new();
    let mut twice = 0;
    for event in written() {
        let key = String::from_utf8(event.key.clone().expect("a keyed window")).expect("UTF-8");
        let value: serde_json::Value = serde_json::from_slice(&event.value).expect("JSON");
        let result = (
            value["count"].as_u64().expect("a count"),
            value["sum"].as_f64().expect("a sum") as u64,
        );
        if let Some(before) = results.insert((key.clone(), event.timestamp_ms), result) {
            assert_eq!(
                before, result,
                "window {key} ending {} written with two results",
                event.timestamp_ms
            );
            twice += 1;
        }
    }
    assert_eq!(results, expected);
    println!(
        "three members with fixed instance ids, one killed with -9: {} windows exact, {twice} written twice",
        expected.len()
    );
}
