//! Fan-out end to end: weir-client → QUIC → `weir serve` (drop-bots → geo-enrich) → several
//! sinks with conditions, each checked for exactly the events it must hold.
//!
//! - [`each_sink_gets_exactly_the_events_its_condition_selects`]: a file taking everything, an
//!   http receiver taking two routes and a PostgreSQL table taking a header, all `block`: once
//!   the producer's batches are acked, every sink holds its events, in order.
//! - [`unmatched_events_go_to_their_sink_or_are_dropped_and_counted`]: `unmatched = "SINK"`
//!   and `unmatched = "drop"`, with the Prometheus counters.
//! - The http receiver stopped mid-stream and restarted on the same port, for three
//!   `when_full` policies of the http sink: [`spill_keeps_acking_and_delivers_everything_after_the_outage`],
//!   [`drop_newest_keeps_the_buffer_and_drops_the_rest`],
//!   [`block_stops_acking_until_the_receiver_is_back`].
//! - [`spilled_events_survive_kill_9_and_are_delivered_after_the_restart`]: the `weir` binary
//!   killed with SIGKILL while its spill sink's destination is down, then started again.
//!
//! Expected events come from the workload's definition (`weir::workload`: the country codes
//! cycle US, FR, DE, JP, ZZ; one event in ten is a crawler) and the plugins' documented rules
//! (drop-bots drops user agents containing `bot`, `crawler` or `spider`; geo-enrich adds the
//! `country` header and the lowercased code as the route tag when its table knows the code),
//! never from the system under test. Every wait polls with a deadline and fails naming what it
//! waited for and what it saw last; nothing asserts on timing.

#[path = "common/postgres.rs"]
mod postgres;
#[path = "common/serve.rs"]
mod serve;

use bytes::Bytes;
use serve::WeirServe;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weir::config::Config;
use weir::receiver::{Receiver, ReceiverOptions};
use weir::server::{Server, SinkStats};
use weir::workload::WorkloadSpec;
use weir_client::{ConnectOptions, EncodedBatch, Producer};

/// The bound of every wait: long for a loaded 2-core CI machine, short enough to fail clearly.
const WAIT: Duration = Duration::from_secs(120);
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(10);

/// geo-enrich's table in every config: ZZ is missing, so ZZ events get no route and no header.
const TABLE: [(&str, &str); 4] = [
    ("US", "United States"),
    ("FR", "France"),
    ("DE", "Germany"),
    ("JP", "Japan"),
];

/// Events each test produces.
const EVENTS: u64 = 20_000;
/// Events per producer batch: a multiple of 10, so that every batch holds the same mix (two
/// FR and two DE events in every ten).
const BATCH: usize = 500;
/// Events of each batch routed to `fr` or `de`.
const EU_PER_BATCH: usize = BATCH / 10 * 4;
/// Batches sent before the receiver is stopped.
const FIRST_BATCHES: usize = 10;
/// `buffer_events` of the http sink in the outage tests: a whole number of batches' EU events.
const BUFFER_EVENTS: usize = 1000;

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// Polls `check` until it returns `Ok`; on timeout, panics with `what` and the last `Err`
/// (what was seen instead).
async fn wait_for<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        match check() {
            Ok(value) => return value,
            Err(seen) if Instant::now() >= deadline => {
                panic!("timed out after {WAIT:?} waiting for {what}; last seen: {seen}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the sinks must get

/// An event as drop-bots → geo-enrich leave it, by the fields the sinks' conditions look at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Out {
    /// The `path` field of its value (`/p/N`, unique per event): which event it is.
    path: String,
    /// Its route tag.
    route: Option<String>,
    /// Its `country` header.
    country: Option<String>,
}

impl Out {
    /// From a JSON line of the file sink, or an event object the http sink posted.
    fn from_json(event: &serde_json::Value) -> Out {
        let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        Out {
            path: text(&event["value"]["path"])
                .unwrap_or_else(|| panic!("an event with a `path` in its value: {event}")),
            route: text(&event["route"]),
            country: text(&event["headers"]["country"]),
        }
    }

    /// As `psql` prints `path|route|country` (NULL as the empty string).
    fn row(&self) -> String {
        format!(
            "{}|{}|{}",
            self.path,
            self.route.as_deref().unwrap_or(""),
            self.country.as_deref().unwrap_or("")
        )
    }

    fn is_eu(&self) -> bool {
        matches!(self.route.as_deref(), Some("fr" | "de"))
    }
}

fn workload() -> WorkloadSpec {
    WorkloadSpec {
        events: EVENTS,
        value_size: 200,
        keys: 1000,
        ..WorkloadSpec::default()
    }
}

/// What the pipeline outputs for events `range` of `spec`, in order, by the plugins' rules.
fn model(spec: &WorkloadSpec, range: Range<u64>) -> Vec<Out> {
    range
        .filter_map(|i| {
            let event = spec.event(i);
            let agent = String::from_utf8_lossy(event.header("user-agent").unwrap_or_default())
                .to_ascii_lowercase();
            if ["bot", "crawler", "spider"]
                .iter()
                .any(|m| agent.contains(m))
            {
                return None;
            }
            let value: serde_json::Value =
                serde_json::from_slice(&event.value).expect("workload values are JSON");
            let code = value["country_code"].as_str().expect("a country code");
            let name = TABLE.iter().find(|(c, _)| *c == code).map(|(_, n)| *n);
            Some(Out {
                path: value["path"].as_str().expect("a path").to_owned(),
                route: name.map(|_| code.to_ascii_lowercase()),
                country: name.map(str::to_owned),
            })
        })
        .collect()
}

/// The events of the batches `batches` (of [`BATCH`] events each).
fn model_batches(spec: &WorkloadSpec, batches: Range<usize>) -> Vec<Out> {
    model(
        spec,
        (batches.start * BATCH) as u64..(batches.end * BATCH) as u64,
    )
}

fn eu_events(outs: &[Out]) -> Vec<Out> {
    outs.iter().filter(|o| o.is_eu()).cloned().collect()
}

/// Compares without printing thousands of events: the first difference, then the count.
fn assert_same(what: &str, got: &[Out], expected: &[Out]) {
    if let Some(i) = (0..got.len().min(expected.len())).find(|&i| got[i] != expected[i]) {
        panic!(
            "{what}: event {} of {} differs:\n  got      {:?}\n  expected {:?}",
            i + 1,
            got.len(),
            got[i],
            expected[i]
        );
    }
    assert_eq!(got.len(), expected.len(), "{what}: number of events");
}

fn read_outs(path: &Path) -> Vec<Out> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .map(|line| {
            let json = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: a JSON line: {e}: {line}", path.display()));
            Out::from_json(&json)
        })
        .collect()
}

fn received(receiver: &Receiver) -> Vec<Out> {
    receiver.received().iter().map(Out::from_json).collect()
}

fn sink(server: &Server, name: &str) -> SinkStats {
    server
        .stats()
        .sinks
        .get(name)
        .cloned()
        .unwrap_or_else(|| panic!("no sink `{name}` in the stats"))
}

// ---------------------------------------------------------------------------------------------
// Setup

/// The two stages of pipeline `pipeline`, as config text.
fn stages(pipeline: &str) -> String {
    let table: Vec<String> = TABLE
        .iter()
        .map(|(code, name)| format!("{code} = \"{name}\""))
        .collect();
    format!(
        r#"
[[pipelines.{pipeline}.stages]]
plugin = "example:drop-bots"

[[pipelines.{pipeline}.stages]]
plugin = "example:geo-enrich"
with = {{ table = {{ {} }} }}
"#,
        table.join(", ")
    )
}

/// A config listening on `listen` with anonymous producers, data in `data/`, and `rest`.
fn config_text(listen: &str, rest: &str) -> String {
    format!(
        r#"
[listener]
listen = "{listen}"
data_dir = "data"

[auth]
anonymous = true
{rest}"#
    )
}

/// An in-process server of `text` (listening on a free port) in a new temporary directory.
async fn start_server(rest: &str) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::parse(
        &config_text("127.0.0.1:0", rest),
        dir.path().join("weir.toml"),
    )
    .expect("a valid config");
    let server = within("the server to start", Server::start(config))
        .await
        .expect("the server starts");
    (dir, server)
}

async fn connect(addr: SocketAddr, fingerprint: &str, pipelines: &[&str]) -> Producer {
    let options = ConnectOptions::new(addr, "fanout", pipelines.iter().copied())
        .pin(fingerprint)
        .expect("a valid fingerprint");
    within("the producer to connect", Producer::connect(options))
        .await
        .expect("the producer connects")
}

/// The workload as encoded batches of [`BATCH`] events.
fn batches(spec: &WorkloadSpec) -> Vec<EncodedBatch> {
    spec.batches(BATCH)
        .into_iter()
        .map(|b| EncodedBatch::new(Bytes::from(b)).expect("a valid batch"))
        .collect()
}

/// Queues `batches` for pipeline `pipeline` (waiting while the producer's buffer is full).
async fn send(producer: &Producer, pipeline: u16, batches: &[EncodedBatch]) {
    for batch in batches {
        producer
            .send_batch(pipeline, batch)
            .await
            .expect("the producer takes the batch");
    }
}

fn local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn keep() -> ReceiverOptions {
    ReceiverOptions {
        keep: true,
        ..ReceiverOptions::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Routing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sink_gets_exactly_the_events_its_condition_selects() {
    let pg = tokio::task::spawn_blocking(postgres::PgServer::start)
        .await
        .expect("PostgreSQL starts");
    let receiver = Receiver::start(local(), keep())
        .await
        .expect("the receiver starts");
    let (dir, server) = start_server(&format!(
        r#"
[pipelines.clicks]
sinks = [
    "archive",
    {{ sink = "eu", route = ["fr", "de"] }},
    {{ sink = "japan", header = {{ country = "Japan" }} }},
]
{}
[sinks.archive]
type = "file"
path = "archive.jsonl"
fsync = "never"

[sinks.eu]
type = "http"
url = "{}"

[sinks.japan]
type = "postgres"
url = "{}"
table = "japan"
"#,
        stages("clicks"),
        receiver.url(),
        pg.conninfo()
    ))
    .await;
    let spec = workload();
    let producer = connect(server.local_addr(), &server.fingerprint(), &["clicks"]).await;
    send(&producer, 0, &batches(&spec)).await;
    within("every ack", producer.flush())
        .await
        .expect("every batch acked");

    let expected = model(&spec, 0..spec.events);
    let eu = eu_events(&expected);
    let japan: Vec<Out> = expected
        .iter()
        .filter(|o| o.country.as_deref() == Some("Japan"))
        .cloned()
        .collect();
    assert_eq!(
        (expected.len(), eu.len(), japan.len()),
        (18_000, 8_000, 4_000),
        "the model: 9 events in 10 are not crawlers, 2 of them FR, 2 DE, 2 JP"
    );
    // Every sink is `block`: an acked batch is delivered to every sink that selects events of
    // it, so no wait is needed.
    assert_same(
        "the archive file",
        &read_outs(&dir.path().join("archive.jsonl")),
        &expected,
    );
    assert_same("the http receiver", &received(&receiver), &eu);
    let rows = tokio::task::block_in_place(|| {
        assert_eq!(pg.psql("SELECT count(*) FROM japan"), "4000");
        pg.psql(
            "SELECT value->>'path', route, headers->>'country' FROM japan ORDER BY timestamp_ms",
        )
    });
    let rows: Vec<&str> = rows.lines().collect();
    let expected_rows: Vec<String> = japan.iter().map(Out::row).collect();
    assert_eq!(rows.len(), expected_rows.len(), "rows in table japan");
    assert!(
        rows.iter().zip(&expected_rows).all(|(a, b)| a == b),
        "the rows of table japan are the JP events in order: first rows {:?}, expected {:?}",
        &rows[..3],
        &expected_rows[..3]
    );

    let delivered = |n: u64| SinkStats {
        events_in: n,
        events_out: n,
        ..SinkStats::default()
    };
    let stats = server.stats();
    assert_eq!(
        stats.sinks.keys().collect::<Vec<_>>(),
        ["archive", "clicks/dead-letters", "eu", "japan"]
    );
    assert_eq!(stats.sinks["archive"], delivered(18_000));
    assert_eq!(stats.sinks["eu"], delivered(8_000));
    assert_eq!(stats.sinks["japan"], delivered(4_000));
    assert_eq!(stats.sinks["clicks/dead-letters"], delivered(0));
    assert_eq!(stats.pipelines["clicks"].events_accepted, EVENTS);
    assert_eq!(stats.pipelines["clicks"].events_out, 18_000);

    within("the producer to close", producer.close())
        .await
        .expect("close");
    let report = within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.stats.sinks, stats.sinks, "nothing more at shutdown");
    receiver.stop().await;
}

/// The value of the series `series` (name and labels, as printed) in a Prometheus exposition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_destination_refuses_are_dead_lettered_with_the_error() {
    let receiver = Receiver::start(local(), keep())
        .await
        .expect("the receiver starts");
    receiver.answer_with(hyper::StatusCode::BAD_REQUEST, "no thanks");
    let (dir, server) = start_server(&format!(
        r#"
[pipelines.clicks]
sinks = ["archive", {{ sink = "eu", route = ["fr", "de"] }}]
{}
[sinks.archive]
type = "file"
path = "archive.jsonl"
fsync = "never"

[sinks.eu]
type = "http"
url = "{}"
"#,
        stages("clicks"),
        receiver.url(),
    ))
    .await;
    // Two batches: every request fails, so the runner halves each send down to single events.
    let spec = WorkloadSpec {
        events: 2 * BATCH as u64,
        ..workload()
    };
    let producer = connect(server.local_addr(), &server.fingerprint(), &["clicks"]).await;
    send(&producer, 0, &batches(&spec)).await;
    within("every ack", producer.flush())
        .await
        .expect("refused events are accepted once dead-lettered");
    let expected = eu_events(&model(&spec, 0..spec.events));
    let letters = dir.path().join("data/dead-letters/clicks.jsonl");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&letters)
        .expect("the dead-letter file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let got: Vec<Out> = lines.iter().map(Out::from_json).collect();
    assert_same("dead letters", &got, &expected);
    let error = format!(
        "sink `eu`: {} answered 400 Bad Request: no thanks",
        receiver.url()
    );
    for line in &lines {
        assert_eq!(line["headers"]["weir-error"], error.as_str(), "{line}");
        assert_eq!(line["headers"]["weir-sink"], "eu", "{line}");
    }
    let eu = sink(&server, "eu");
    assert_eq!(
        (eu.events_in, eu.events_out, eu.dead_lettered, eu.buffered),
        (expected.len() as u64, 0, expected.len() as u64, 0)
    );
    assert_eq!(receiver.events(), 0);
    assert_eq!(read_outs(&dir.path().join("archive.jsonl")).len(), 900);
    producer.close().await.expect("close");
    let report = within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    assert_eq!(report.problems, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_round_is_not_accepted_no_later_ack_covers_it() {
    // Nothing listens where the http sink posts: its first round waits until shutdown, when
    // the sink gives up. The next batch is all crawlers: nothing for any sink, so its round is
    // accepted at once, but an ack for it would be cumulative and cover the first one.
    let url = format!("http://{}/ingest", free_tcp_addr());
    let (_dir, server) = start_server(&format!(
        r#"
[pipelines.clicks]
sinks = ["eu"]

[[pipelines.clicks.stages]]
plugin = "example:drop-bots"

[sinks.eu]
type = "http"
url = "{url}"
retry_initial_ms = 10
retry_max_ms = 50
"#
    ))
    .await;
    let event = |i: i64, agent: &str| {
        weir_format::Event::new(format!("{{\"path\":\"/p/{i}\"}}"), i)
            .with_header("user-agent", agent)
    };
    let encode = |events: Vec<weir_format::Event>| {
        let mut builder = weir_format::BatchBuilder::new();
        for e in &events {
            builder.push(e);
        }
        EncodedBatch::new(Bytes::from(builder.finish())).expect("a valid batch")
    };
    let people = encode((0..3).map(|i| event(i, "curl/8")).collect());
    let crawlers = encode((3..6).map(|i| event(i, "Googlebot/2.1")).collect());
    let producer = connect(server.local_addr(), &server.fingerprint(), &["clicks"]).await;
    send(&producer, 0, &[people]).await;
    wait_for("the first batch processed", || {
        let stats = server.stats();
        if stats.batches_accepted == 1 {
            Ok(())
        } else {
            Err(format!("{stats:?}"))
        }
    })
    .await;
    // The first round waits for the sink; the worker goes on: the second batch is processed
    // and accepted at once (nothing of it for any sink), but not acked.
    send(&producer, 0, &[crawlers]).await;
    wait_for("the second batch processed", || {
        let stats = server.stats();
        if stats.batches_received == 2 && stats.batches_accepted == 2 {
            Ok(())
        } else {
            Err(format!("{stats:?}"))
        }
    })
    .await;
    let report = within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    assert_eq!(report.stats.batches_accepted, 2, "{report:?}");
    assert_eq!(report.stats.batches_acked, 0, "{report:?}");
    assert_eq!(producer.stats().batches_acked, 0);
    let gave_up = format!(
        "pipeline `clicks`: sink `eu` gave up delivering to {}; its batches are not acked",
        url
    );
    // The second batch is a round of its own unless it reached the worker before the first
    // round was sealed (a loaded machine): then one round holds both, and nothing is withheld
    // behind a rejected batch. Either way nothing is acked.
    let withheld = "pipeline `clicks`: 1 later batch not acked: an earlier batch was not accepted, and an ack would cover it too";
    let (first, rest) = report.problems.split_first().expect("problems");
    assert_eq!(first, &gave_up, "{:?}", report.problems);
    let sink = match rest {
        [w, sink] if w == withheld => sink,
        [sink] => sink,
        _ => panic!("unexpected problems: {:?}", report.problems),
    };
    assert!(
        sink.ends_with("; 3 buffered events of sink `eu` not delivered"),
        "{:?}",
        report.problems
    );
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in the metrics:\n{text}"))
        .parse()
        .unwrap_or_else(|e| panic!("series {series}: not a whole number: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_events_go_to_their_sink_or_are_dropped_and_counted() {
    let (dir, server) = start_server(&format!(
        r#"
[metrics]
listen = "127.0.0.1:0"

[pipelines.routed]
sinks = [{{ sink = "japan", route = "jp" }}]
unmatched = "rest"
{}
[pipelines.dropping]
sinks = [{{ sink = "japan", header = {{ country = "Japan" }} }}]
unmatched = "drop"
{}
[sinks.japan]
type = "file"
path = "japan.jsonl"
fsync = "never"

[sinks.rest]
type = "file"
path = "rest.jsonl"
fsync = "never"
"#,
        stages("routed"),
        stages("dropping")
    ))
    .await;
    let spec = workload();
    let producer = connect(
        server.local_addr(),
        &server.fingerprint(),
        &["routed", "dropping"],
    )
    .await;
    for batch in batches(&spec) {
        send(&producer, 0, std::slice::from_ref(&batch)).await;
        send(&producer, 1, &[batch]).await;
    }
    within("every ack", producer.flush())
        .await
        .expect("every batch acked");

    let expected = model(&spec, 0..spec.events);
    let japan: Vec<Out> = expected
        .iter()
        .filter(|o| o.route.as_deref() == Some("jp"))
        .cloned()
        .collect();
    let rest: Vec<Out> = expected
        .iter()
        .filter(|o| o.route.as_deref() != Some("jp"))
        .cloned()
        .collect();
    assert_eq!(
        (japan.len(), rest.len()),
        (4_000, 14_000),
        "the model: 9 events in 10 are not crawlers, 2 of them JP"
    );
    // Both pipelines write to `japan`, in an order between them that is not defined: compare
    // sorted, each event twice.
    let mut got = read_outs(&dir.path().join("japan.jsonl"));
    got.sort();
    let mut twice: Vec<Out> = japan.iter().chain(&japan).cloned().collect();
    twice.sort();
    assert_same("the japan file", &got, &twice);
    assert_same(
        "the unmatched sink's file",
        &read_outs(&dir.path().join("rest.jsonl")),
        &rest,
    );

    let metrics_addr = server
        .metrics_addr()
        .expect("[metrics] listen is configured");
    let text = within(
        "the metrics endpoint",
        reqwest::get(format!("http://{metrics_addr}/metrics")),
    )
    .await
    .expect("the metrics endpoint answers")
    .text()
    .await
    .expect("a text body");
    let series =
        |name: &str, pipeline: &str| metric(&text, &format!("{name}{{pipeline=\"{pipeline}\"}}"));
    assert_eq!(
        [
            series("weir_pipeline_unmatched_events_total", "routed"),
            series("weir_pipeline_unmatched_dropped_events_total", "routed"),
            series("weir_pipeline_unmatched_events_total", "dropping"),
            series("weir_pipeline_unmatched_dropped_events_total", "dropping"),
        ],
        [14_000, 0, 14_000, 14_000]
    );
    let stats = server.stats();
    assert_eq!(stats.sinks["japan"].events_out, 8_000);
    assert_eq!(stats.sinks["rest"].events_out, 14_000);

    within("the producer to close", producer.close())
        .await
        .expect("close");
    let report = within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

// ---------------------------------------------------------------------------------------------
// The http receiver stops mid-stream

/// A server whose pipeline `clicks` writes everything to a file sink and the FR and DE events
/// to an http sink with `when_full`, a producer, and the receiver behind the http sink.
struct Outage {
    dir: tempfile::TempDir,
    server: Server,
    producer: Arc<Producer>,
    spec: WorkloadSpec,
    batches: Vec<EncodedBatch>,
    /// Where the receiver listens, first and after the restart.
    addr: SocketAddr,
    /// Events the receiver took before it was stopped.
    before: Vec<Out>,
}

impl Outage {
    /// Starts everything, sends the first [`FIRST_BATCHES`] batches, waits until every sink
    /// delivered them, and stops the receiver.
    async fn start(when_full: &str) -> Outage {
        let receiver = Receiver::start(local(), keep())
            .await
            .expect("the receiver starts");
        let (dir, server) = start_server(&format!(
            r#"
[pipelines.clicks]
sinks = ["archive", {{ sink = "eu", route = ["fr", "de"] }}]
{}
[sinks.archive]
type = "file"
path = "archive.jsonl"
fsync = "never"

[sinks.eu]
type = "http"
url = "{}"
when_full = "{when_full}"
buffer_events = {BUFFER_EVENTS}
retry_initial_ms = 10
retry_max_ms = 100
"#,
            stages("clicks"),
            receiver.url()
        ))
        .await;
        let spec = workload();
        let batches = batches(&spec);
        let producer =
            Arc::new(connect(server.local_addr(), &server.fingerprint(), &["clicks"]).await);
        // One batch at a time, each delivered before the next: a slow (not dead) receiver
        // must not fill the buffer here, or `drop_newest` would rightly drop some already.
        for (i, batch) in batches[..FIRST_BATCHES].iter().enumerate() {
            send(&producer, 0, std::slice::from_ref(batch)).await;
            within("the first part's acks", producer.flush())
                .await
                .expect("the first part acked");
            let delivered = ((i + 1) * EU_PER_BATCH) as u64;
            wait_for("the http sink to deliver the batch", || {
                let eu = sink(&server, "eu");
                if eu.events_out == delivered {
                    Ok(())
                } else {
                    Err(format!("eu {eu:?}"))
                }
            })
            .await;
        }
        let first = model_batches(&spec, 0..FIRST_BATCHES);
        let first_eu = eu_events(&first).len() as u64;
        assert_eq!(first_eu, (FIRST_BATCHES * EU_PER_BATCH) as u64);
        // Nothing in flight when the receiver stops: what it has is exactly the first part.
        wait_for("the http sink to deliver the first part", || {
            let eu = sink(&server, "eu");
            let got = receiver.events();
            if eu.events_out == first_eu && eu.buffered == 0 && got == first_eu {
                Ok(())
            } else {
                Err(format!("eu {eu:?}, receiver {got} events"))
            }
        })
        .await;
        let before = received(&receiver);
        assert_same("the receiver before the stop", &before, &eu_events(&first));
        let addr = receiver.local_addr();
        within("the receiver to stop", receiver.stop()).await;
        Outage {
            dir,
            server,
            producer,
            spec,
            batches,
            addr,
            before,
        }
    }

    /// Every event the pipeline outputs.
    fn all(&self) -> Vec<Out> {
        model(&self.spec, 0..self.spec.events)
    }

    /// Starts the receiver again on its port.
    async fn restart(&self) -> Receiver {
        within(
            "the receiver to restart",
            Receiver::start(self.addr, keep()),
        )
        .await
        .expect("the receiver starts again on the same port")
    }

    /// Waits until the file sink delivered `lines` events, then checks the file holds exactly
    /// the first `lines` events of the model.
    async fn archive_reaches(&self, lines: usize) {
        wait_for(&format!("the archive to deliver {lines} events"), || {
            let archive = sink(&self.server, "archive");
            if archive.events_out == lines as u64 {
                Ok(())
            } else {
                Err(format!("archive {archive:?}"))
            }
        })
        .await;
        assert_same(
            "the archive file",
            &read_outs(&self.dir.path().join("archive.jsonl")),
            &self.all()[..lines],
        );
    }

    /// Waits until the restarted receiver took `expected` and the http sink holds nothing,
    /// checks that it took exactly those events, then shuts everything down cleanly.
    async fn finish(self, receiver: Receiver, expected: &[Out], stats: SinkStats) {
        let total = self.before.len() + expected.len();
        wait_for("the http sink to deliver everything", || {
            let eu = sink(&self.server, "eu");
            let got = receiver.events();
            if got >= expected.len() as u64 && eu.buffered == 0 && eu.events_out == total as u64 {
                Ok(())
            } else {
                Err(format!("eu {eu:?}, restarted receiver {got} events"))
            }
        })
        .await;
        within("the producer to close", self.producer.close())
            .await
            .expect("close");
        let report = within("shutdown", self.server.shutdown())
            .await
            .expect("shutdown");
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        let eu = &report.stats.sinks["eu"];
        assert!(eu.errors > 0, "sends failed while the receiver was down");
        assert_eq!(
            SinkStats {
                errors: 0,
                ..eu.clone()
            },
            stats,
            "the http sink's counters"
        );
        assert_same(
            "the restarted receiver (no loss, no duplicate)",
            &received(&receiver),
            expected,
        );
        receiver.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spill_keeps_acking_and_delivers_everything_after_the_outage() {
    let outage = Outage::start("spill").await;
    let rest = &outage.batches[FIRST_BATCHES..];
    send(&outage.producer, 0, rest).await;
    // `spill` accepts what is synced to disk: every batch is acked while the receiver is down.
    within(
        "every ack while the receiver is down",
        outage.producer.flush(),
    )
    .await
    .expect("every batch acked");
    assert_eq!(outage.producer.stats().events_acked, EVENTS);
    let all = outage.all();
    let later = eu_events(&model_batches(
        &outage.spec,
        FIRST_BATCHES..outage.batches.len(),
    ));
    assert_eq!(later.len(), 6_000);
    // The other sink never stalled: the archive has everything, the receiver still down.
    outage.archive_reaches(all.len()).await;
    let eu = sink(&outage.server, "eu");
    assert_eq!(
        (eu.events_in, eu.events_out, eu.dropped, eu.buffered),
        (8_000, 2_000, 0, 6_000),
        "the http sink holds every later event on disk: {eu:?}"
    );
    let spill = outage.dir.path().join("data/spill/eu");
    let segments = std::fs::read_dir(&spill)
        .unwrap_or_else(|e| panic!("reading {}: {e}", spill.display()))
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".spill"))
        .count();
    assert!(segments > 0, "a disk buffer segment in {}", spill.display());

    let receiver = outage.restart().await;
    outage
        .finish(
            receiver,
            &later,
            SinkStats {
                events_in: 8_000,
                events_out: 8_000,
                ..SinkStats::default()
            },
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_newest_keeps_the_buffer_and_drops_the_rest() {
    let outage = Outage::start("drop_newest").await;
    send(&outage.producer, 0, &outage.batches[FIRST_BATCHES..]).await;
    // `drop_newest` accepts what is in memory (or dropped): every batch is acked.
    within(
        "every ack while the receiver is down",
        outage.producer.flush(),
    )
    .await
    .expect("every batch acked");
    outage.archive_reaches(outage.all().len()).await;
    // The first deliveries after the stop fill the buffer (the one being retried counts: it
    // stays buffered until delivered); every later one is dropped whole.
    let later = eu_events(&model_batches(
        &outage.spec,
        FIRST_BATCHES..outage.batches.len(),
    ));
    let kept = &later[..BUFFER_EVENTS];
    let dropped = (later.len() - BUFFER_EVENTS) as u64;
    assert_eq!(dropped, 5_000);
    let eu = sink(&outage.server, "eu");
    assert_eq!(
        (eu.events_in, eu.events_out, eu.dropped, eu.buffered),
        // Offered events all count in: in = out + dropped + buffered.
        (8_000, 2_000, dropped, BUFFER_EVENTS as u64),
        "the http sink's counters while the receiver is down: {eu:?}"
    );

    let receiver = outage.restart().await;
    outage
        .finish(
            receiver,
            kept,
            SinkStats {
                events_in: 8_000,
                events_out: 3_000,
                dropped,
                ..SinkStats::default()
            },
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_stops_acking_until_the_receiver_is_back() {
    let outage = Outage::start("block").await;
    let first_events = (FIRST_BATCHES * BATCH) as u64;
    let sender = {
        let producer = outage.producer.clone();
        let rest = outage.batches[FIRST_BATCHES..].to_vec();
        tokio::spawn(async move {
            send(&producer, 0, &rest).await;
            producer.flush().await
        })
    };
    // `block` accepts what is delivered: the round holding the first later batch waits for
    // the receiver, and every later batch holds EU events, so no later batch is acked.
    let stuck = wait_for("the http sink to take later events and fail", || {
        let eu = sink(&outage.server, "eu");
        if eu.events_in > 2_000 && eu.errors >= 3 {
            Ok(eu)
        } else {
            Err(format!("eu {eu:?}"))
        }
    })
    .await;
    // Once the pipeline has offered all it will (its counts stay put over several more failed
    // attempts), nothing of the later batches is acked and the producer is held back.
    let mut seen = (stuck, sink(&outage.server, "archive"));
    let (eu, archive) = within("the pipeline to stop offering", async {
        loop {
            let errors = seen.0.errors;
            wait_for("five more failed attempts", || {
                let eu = sink(&outage.server, "eu");
                if eu.errors >= errors + 5 {
                    Ok(())
                } else {
                    Err(format!("eu {eu:?}"))
                }
            })
            .await;
            let now = (sink(&outage.server, "eu"), sink(&outage.server, "archive"));
            if (now.0.events_in, now.1.events_in) == (seen.0.events_in, seen.1.events_in) {
                return now;
            }
            seen = now;
        }
    })
    .await;
    assert_eq!(
        outage.producer.stats().events_acked,
        first_events,
        "no batch acked while the receiver is down"
    );
    assert!(!sender.is_finished(), "the producer is held back");
    assert_eq!(eu.events_out, 2_000, "nothing delivered: {eu:?}");
    assert!(
        eu.buffered > 0 && eu.buffered <= BUFFER_EVENTS as u64,
        "the http sink holds what the pipeline offered, within its buffer: {eu:?}"
    );
    assert!(
        archive.events_in < outage.all().len() as u64,
        "the pipeline stopped for the archive too: {archive:?}"
    );

    let receiver = outage.restart().await;
    within("every ack after the restart", sender)
        .await
        .expect("the sending task")
        .expect("every batch acked");
    assert_eq!(outage.producer.stats().events_acked, EVENTS);
    outage.archive_reaches(outage.all().len()).await;
    let later = eu_events(&model_batches(
        &outage.spec,
        FIRST_BATCHES..outage.batches.len(),
    ));
    outage
        .finish(
            receiver,
            &later,
            SinkStats {
                events_in: 8_000,
                events_out: 8_000,
                ..SinkStats::default()
            },
        )
        .await;
}

// ---------------------------------------------------------------------------------------------
// kill -9 with a spill sink's destination down

/// A loopback TCP address nothing listens on now.
fn free_tcp_addr() -> SocketAddr {
    std::net::TcpListener::bind(local())
        .and_then(|listener| listener.local_addr())
        .expect("a free port on 127.0.0.1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spilled_events_survive_kill_9_and_are_delivered_after_the_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver_addr = free_tcp_addr();
    let config: PathBuf = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        config_text(
            "127.0.0.1:0",
            &format!(
                r#"
[pipelines.clicks]
sinks = [{{ sink = "eu", route = ["fr", "de"] }}]
unmatched = "drop"
{}
[sinks.eu]
type = "http"
url = "http://{receiver_addr}/ingest"
when_full = "spill"
retry_initial_ms = 10
retry_max_ms = 100
"#,
                stages("clicks")
            ),
        ),
    )
    .expect("write the config");
    let spec = workload();
    let expected = eu_events(&model(&spec, 0..spec.events));
    assert_eq!(expected.len(), 8_000, "the model: 2 FR and 2 DE in 10");

    let mut first = WeirServe::start(&config).await;
    let producer = connect(first.addr, &first.fingerprint, &["clicks"]).await;
    send(&producer, 0, &batches(&spec)).await;
    // Acked means synced to the disk buffer: the receiver was never up.
    within("every ack", producer.flush())
        .await
        .expect("every batch acked");
    assert_eq!(producer.stats().events_acked, EVENTS);
    first.kill();
    drop(producer);

    let receiver = Receiver::start(receiver_addr, keep())
        .await
        .expect("the receiver starts");
    let second = WeirServe::start(&config).await;
    wait_for("the restarted weir to deliver the spilled events", || {
        let got = receiver.events();
        if got >= expected.len() as u64 {
            Ok(())
        } else {
            Err(format!("the receiver has {got} events"))
        }
    })
    .await;
    let summary = second.stop().await;
    assert_eq!(
        summary,
        "weir serve: stopped; 0 batches (0 events) accepted, 0 acked, 0 duplicate events dropped, 0 events out, 0 dead letters"
    );
    // Stopped: nothing more can arrive.
    assert_same(
        "the receiver (every spilled event once, in order)",
        &received(&receiver),
        &expected,
    );
    receiver.stop().await;
}
