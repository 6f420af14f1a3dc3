//! The kafka destination against a real broker started for each test (nisshi,
//! `common/kafka.rs`; it starts in milliseconds): the records known events become (value, key,
//! headers, timestamp, one partition per key, in order), topics taken from the route tag or a
//! header, an event without a topic or with one the broker does not know refused (a
//! configured topic it does not know retried, naming the sink's settings), and a broker that is down at the start retried
//! until it is up, then given every record; a router whose pipeline writes to a kafka sink,
//! fed over QUIC, acking exactly what reached the topic; and a broker killed and restarted in
//! the middle of such a stream, after which every event is in the topic.

#[path = "common/kafka.rs"]
mod kafka;
#[path = "common/stream.rs"]
mod stream;

use kafka::{Broker, Record, create_topic, free_port, now_ms, read_topic};
use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;
use stream::{connect, within};
use weir::config::Config;
use weir::server::Server;
use weir::sinks::{
    Destination, KafkaConfig, KafkaDestination, Outgoing, SendError, SharedBatch, TopicFrom,
};
use weir_client::EncodedBatch;
use weir_format::{BatchBuilder, Event};

const READ_WAIT: Duration = Duration::from_secs(30);

fn config(broker: &str, topic: Option<&str>, topic_from: TopicFrom) -> KafkaConfig {
    KafkaConfig {
        brokers: broker.into(),
        topic: topic.map(str::to_owned),
        topic_from,
        properties: vec![("linger.ms".into(), "2".into())],
        timeout: Duration::from_secs(10),
    }
}

fn all(events: &[Event]) -> Outgoing {
    let mut builder = BatchBuilder::new();
    for event in events {
        builder.push(event);
    }
    let batch = SharedBatch::verify(builder.finish()).expect("built batches verify");
    Outgoing::all(batch, Arc::from("p"))
}

/// A router taking anonymous producers into pipeline `clicks` (`plugin`, then a kafka sink
/// `topic` writing to `topic` on `broker`, with `sink_extra` lines), its data under `dir`.
async fn start_router(
    dir: &std::path::Path,
    plugin: &str,
    broker: &str,
    topic: &str,
    sink_extra: &str,
) -> Server {
    let text = format!(
        r#"
[listener]
listen = "127.0.0.1:0"
data_dir = "{data}"

[auth]
anonymous = true

[pipelines.clicks]
sinks = ["topic"]

[[pipelines.clicks.stages]]
plugin = "{plugin}"

[sinks.topic]
type = "kafka"
brokers = "{broker}"
topic = "{topic}"
{sink_extra}
"#,
        data = dir.join("data").display(),
    );
    let config = Config::parse(&text, dir.join("weir.toml")).expect("a config");
    Server::start(config).await.expect("the router starts")
}

/// Event `i`: keyed `k0`..`k5`, two headers, event time `1_000 + i`.
fn event(i: u64) -> Event {
    Event::new(format!("{{\"n\":{i}}}"), 1_000 + i as i64)
        .with_key(format!("k{}", i % 6))
        .with_header("source", "test")
        .with_header("n", i.to_string())
}

fn n_of(record: &Record) -> u64 {
    let text = String::from_utf8_lossy(&record.value);
    text.trim_start_matches("{\"n\":")
        .trim_end_matches('}')
        .parse()
        .expect("a value written by this test")
}

#[tokio::test(flavor = "multi_thread")]
async fn records_hold_each_event_and_a_key_stays_on_one_partition_in_order() {
    let broker = Broker::start();
    create_topic(&broker.addr(), "clicks", 3).await;
    let mut sink = KafkaDestination::open(
        "events",
        &config(&broker.addr(), Some("clicks"), TopicFrom::Config),
    )
    .expect("a sink");
    assert_eq!(
        sink.describe(),
        format!("kafka {} topic `clicks`", broker.addr())
    );
    let first: Vec<Event> = (0..60).map(event).collect();
    let second: Vec<Event> = (60..120).map(event).collect();
    sink.send(&[all(&first), all(&second)])
        .await
        .expect("delivered");
    sink.close().await.expect("closed");

    let records = read_topic(&broker.addr(), "clicks", 120, READ_WAIT);
    assert_eq!(records.len(), 120, "every event once");
    let mut partitions: BTreeMap<Vec<u8>, i32> = BTreeMap::new();
    let mut last_of_key: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    for record in &records {
        let n = n_of(record);
        let expected = event(n);
        assert_eq!(record.key.as_deref(), expected.key.as_deref());
        assert_eq!(
            record.headers,
            vec![
                ("source".to_owned(), b"test".to_vec()),
                ("n".to_owned(), n.to_string().into_bytes()),
            ]
        );
        assert_eq!(record.timestamp_ms, Some(1_000 + n as i64));
        let key = record.key.clone().expect("keyed");
        let partition = *partitions.entry(key.clone()).or_insert(record.partition);
        assert_eq!(
            record.partition, partition,
            "every record of a key on one partition"
        );
        if let Some(last) = last_of_key.insert(key, n) {
            assert!(last < n, "a key's records in order: {last} then {n}");
        }
    }
    let mut seen: Vec<u64> = records.iter().map(n_of).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..120).collect::<Vec<_>>());
    let used: std::collections::BTreeSet<i32> = partitions.values().copied().collect();
    assert!(
        used.len() > 1,
        "six keys over three partitions: {partitions:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_come_from_the_route_tag_or_a_header_else_the_fallback() {
    let broker = Broker::start();
    for topic in ["us", "fr", "other"] {
        create_topic(&broker.addr(), topic, 1).await;
    }
    let events = [
        Event::new("1", 1).with_route("us"),
        Event::new("2", 2).with_route("fr"),
        Event::new("3", 3),
        Event::new("4", 4).with_route("us"),
    ];
    let mut by_route = KafkaDestination::open(
        "routed",
        &config(&broker.addr(), Some("other"), TopicFrom::Route),
    )
    .expect("a sink");
    by_route.send(&[all(&events)]).await.expect("delivered");
    let values = |topic: &str, want: usize| -> Vec<String> {
        read_topic(&broker.addr(), topic, want, READ_WAIT)
            .iter()
            .map(|r| String::from_utf8_lossy(&r.value).into_owned())
            .collect()
    };
    assert_eq!(values("us", 2), ["1", "4"]);
    assert_eq!(values("fr", 1), ["2"]);
    assert_eq!(values("other", 1), ["3"]);

    let mut by_header = KafkaDestination::open(
        "by-header",
        &config(&broker.addr(), None, TopicFrom::Header("dest".into())),
    )
    .expect("a sink");
    by_header
        .send(&[all(&[Event::new("5", 5).with_header("dest", "fr")])])
        .await
        .expect("delivered");
    assert_eq!(values("fr", 2), ["2", "5"]);
    let refused = by_header.send(&[all(&[Event::new("6", 6)])]).await;
    assert_eq!(
        refused,
        Err(SendError::Reject(
            "sink `by-header`: the event has no topic (no header `dest`) and the sink no `topic` for such events".into()
        ))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_down_at_the_start_is_retried_then_gets_every_record_once() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut down = config(&addr, Some("late"), TopicFrom::Config);
    down.timeout = Duration::from_secs(2);
    let mut sink = KafkaDestination::open("late", &down).expect("a sink opens without a broker");
    let events: Vec<Event> = (0..20).map(event).collect();
    match sink.send(&[all(&events)]).await {
        Err(SendError::Retry(message)) => assert!(
            message.starts_with(&format!("sink `late`: kafka {addr} topic `late`: ")),
            "{message}"
        ),
        other => panic!("a broker that is down is a Retry, got {other:?}"),
    }
    let broker = Broker::start_on(port);
    create_topic(&broker.addr(), "late", 2).await;
    // The runner sends the same delivery again, with backoff, until it is taken.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match sink.send(&[all(&events)]).await {
            Ok(()) => break,
            Err(SendError::Retry(m)) if attempts < 10 => {
                eprintln!("attempt {attempts}: {m}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("not delivered once the broker is up: {e}"),
        }
    }
    let records = read_topic(&broker.addr(), "late", 20, READ_WAIT);
    let mut seen: Vec<u64> = records.iter().map(n_of).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<_>>(), "every record, once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_router_acks_what_its_kafka_sink_wrote_and_nothing_else() {
    let broker = Broker::start();
    create_topic(&broker.addr(), "drops", 4).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_router(dir.path(), "example:drop-bots", &broker.addr(), "drops", "").await;
    assert!(
        server.pipelines()[0].sinks[0].contains(&format!("kafka {} topic `drops`", broker.addr())),
        "{:?}",
        server.pipelines()[0].sinks
    );
    let producer = connect(
        server.local_addr(),
        &server.fingerprint(),
        "kafka-e2e",
        "clicks",
    )
    .await;
    // 10 batches of 50; every tenth event is a bot's and is filtered out.
    for b in 0..10u64 {
        let mut builder = BatchBuilder::new();
        for i in b * 50..(b + 1) * 50 {
            let agent = if i.is_multiple_of(10) {
                "Googlebot"
            } else {
                "Mozilla"
            };
            builder.push(&event(i).with_header("user-agent", agent));
        }
        let batch = EncodedBatch::new(bytes::Bytes::from(builder.finish())).expect("a batch");
        let ack = producer.send_batch(0, &batch).await.expect("sent");
        within("an ack", ack.into_future()).await.expect("acked");
    }
    producer.close().await.expect("closed");
    let stats = server.stats();
    assert_eq!(stats.sinks["topic"].events_out, 450);
    let records = read_topic(&broker.addr(), "drops", 450, READ_WAIT);
    let mut seen: Vec<u64> = records.iter().map(n_of).collect();
    seen.sort_unstable();
    let kept: Vec<u64> = (0..500u64).filter(|i| !i.is_multiple_of(10)).collect();
    assert_eq!(seen, kept, "every kept event once, no bot's");
    let report = server.shutdown().await.expect("a clean stop");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Reads `topic` until every `n` of `0..count` is in it (or the wait is over): the values seen
/// and how many records were read, duplicates included.
fn read_all(addr: &str, topic: &str, count: u64) -> (std::collections::BTreeSet<u64>, usize) {
    let mut want = count as usize;
    loop {
        let records = read_topic(addr, topic, want, READ_WAIT);
        let seen: std::collections::BTreeSet<u64> = records.iter().map(n_of).collect();
        let missing = count as usize - seen.len();
        if missing == 0 || records.len() < want {
            return (seen, records.len());
        }
        want = records.len() + missing;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_killed_and_restarted_mid_stream_loses_no_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start_stored(&dir.path().join("nisshi.db"));
    create_topic(&broker.addr(), "restarts", 4).await;
    let server = start_router(
        dir.path(),
        "example:identity",
        &broker.addr(),
        "restarts",
        "timeout_ms = 3000\nretry_max_ms = 500",
    )
    .await;
    let producer = connect(
        server.local_addr(),
        &server.fingerprint(),
        "kafka-restart",
        "clicks",
    )
    .await;
    // Event times of now: the restarted broker applies its retention (a week) to what it
    // finds, and event(i)'s times are in 1970.
    let now = now_ms();
    let batch = |b: u64| {
        let mut builder = BatchBuilder::new();
        for i in b * 50..(b + 1) * 50 {
            let e = event(i);
            builder.push(&Event {
                timestamp_ms: now + i as i64,
                ..e
            });
        }
        EncodedBatch::new(bytes::Bytes::from(builder.finish())).expect("a batch")
    };
    // 10 batches of 50 acked with the broker up; then it is killed with SIGKILL, 10 more are
    // sent while it is down, and it comes back on the same port and storage 2 s later.
    for b in 0..10u64 {
        let ack = producer.send_batch(0, &batch(b)).await.expect("sent");
        within("an ack", ack.into_future()).await.expect("acked");
    }
    broker.kill();
    let mut acks = Vec::new();
    for b in 10..20u64 {
        acks.push(producer.send_batch(0, &batch(b)).await.expect("sent"));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        server.stats().sinks["topic"].events_out,
        500,
        "nothing is delivered while the broker is down"
    );
    broker.restart();
    for ack in acks {
        within("an ack after the restart", ack.into_future())
            .await
            .expect("acked once the broker is back");
    }
    producer.close().await.expect("closed");
    assert_eq!(server.stats().sinks["topic"].events_out, 1000);
    let (seen, read) = read_all(&broker.addr(), "restarts", 1000);
    let missing: Vec<u64> = (0..1000).filter(|n| !seen.contains(n)).collect();
    assert!(missing.is_empty(), "events not in the topic: {missing:?}");
    eprintln!(
        "{read} records for 1000 events: {} written twice",
        read - 1000
    );
    let report = server.shutdown().await.expect("a clean stop");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_topic_from_an_event_is_refused_and_a_configured_one_retried() {
    let broker = Broker::start();
    create_topic(&broker.addr(), "known", 1).await;
    // A broker that creates no topic on request, and that librdkafka waits for 1 s (not 30)
    // before it takes an unknown topic as such.
    let strict = |topic: &str| {
        let mut c = config(&broker.addr(), Some(topic), TopicFrom::Route);
        c.properties.extend([
            ("allow.auto.create.topics".into(), "false".into()),
            ("topic.metadata.propagation.max.ms".into(), "1000".into()),
        ]);
        c
    };
    let mut sink = KafkaDestination::open("routed", &strict("known")).expect("a sink");
    let prefix = format!("sink `routed`: kafka {} topic `nowhere`: ", broker.addr());
    match sink
        .send(&[all(&[Event::new("1", 1).with_route("nowhere")])])
        .await
    {
        Err(SendError::Reject(message)) => assert!(
            message.starts_with(&prefix) && message.contains("Unknown topic"),
            "{message}"
        ),
        other => panic!("an event's unknown topic is a Reject, got {other:?}"),
    }
    sink.send(&[all(&[Event::new("2", 2)])])
        .await
        .expect("the fallback topic exists");

    let mut misconfigured = KafkaDestination::open("missing", &strict("missing")).expect("a sink");
    match misconfigured.send(&[all(&[Event::new("3", 3)])]).await {
        Err(SendError::Retry(message)) => assert!(
            message.starts_with(&format!(
                "sink `missing`: kafka {} topic `missing`: ",
                broker.addr()
            )) && message.ends_with(
                "(the broker refuses the sink, not these events: check its `topic`, `brokers` and `properties`; retrying)"
            ),
            "{message}"
        ),
        other => panic!("a configured unknown topic is a Retry, got {other:?}"),
    }
    let values: Vec<Vec<u8>> = read_topic(&broker.addr(), "known", 1, READ_WAIT)
        .into_iter()
        .map(|r| r.value)
        .collect();
    assert_eq!(values, [b"2".to_vec()]);
}
