//! A Kafka broker of a test's own: nisshi (a Kafka-compatible broker from crates.io) on
//! 127.0.0.1 on a free port, in memory (or in a SQLite file, to be restarted), stopped when
//! dropped; and the rdkafka admin and consumer calls the tests read the broker with.
//!
//! `.ci/run` installs nisshi (`cargo +1.96.0 install nisshi …`, once per machine); without it
//! [`Broker::start`] fails, naming `.ci/run`, rather than letting a test pass untested.

// Each test binary that includes this file uses a part of it.
#![allow(dead_code)]

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Headers;
use rdkafka::{Offset, TopicPartitionList};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a broker may take to accept connections.
const READY: Duration = Duration::from_secs(30);

/// A running broker; see the module documentation.
pub struct Broker {
    child: Child,
    port: u16,
    storage: String,
    /// Where the broker runs (nisshi reads a `sqlite://` path relative to it).
    dir: Option<PathBuf>,
}

/// The nisshi program: on `PATH`, else where `cargo install` puts it.
fn nisshi() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("nisshi"))
            .find(|p| p.is_file())
    });
    let installed =
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo/bin/nisshi"));
    on_path
        .or(installed.filter(|p| p.is_file()))
        .unwrap_or_else(|| panic!("nisshi is not installed: .ci/run installs it ({INSTALL})"))
}

/// How `.ci/run` installs nisshi.
const INSTALL: &str =
    "cargo +1.96.0 install nisshi --locked --no-default-features --features dynostore,libsql";

/// Milliseconds since 1970 now: record times a restarted broker's retention keeps.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Broker {
    /// A broker on a free port.
    pub fn start() -> Broker {
        Broker::start_on(free_port())
    }

    /// A broker on `port`, in memory, once it accepts connections.
    pub fn start_on(port: u16) -> Broker {
        Broker::launch(port, "memory://nisshi/".into(), None)
    }

    /// A broker on a free port that keeps its topics, offsets and groups in the SQLite
    /// database `db`, so that [`Broker::restart`] finds them again.
    pub fn start_stored(db: &Path) -> Broker {
        let name = db.file_name().expect("a database file name");
        let dir = db.parent().expect("a database directory").to_owned();
        Broker::launch(
            free_port(),
            format!("sqlite://{}", name.to_string_lossy()),
            Some(dir),
        )
    }

    /// Kills the broker with SIGKILL and starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.kill();
        *self = Broker::launch(
            self.port,
            std::mem::take(&mut self.storage),
            self.dir.take(),
        );
    }

    /// Kills the broker with SIGKILL; [`Broker::restart`] starts it again.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn launch(port: u16, storage: String, dir: Option<PathBuf>) -> Broker {
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::env::temp_dir().join(format!("weir-test-nisshi-{port}.log"));
        let mut command = Command::new(nisshi());
        if let Some(dir) = &dir {
            command.current_dir(dir);
        }
        let child = command
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                &storage,
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("the broker's log file"))
            .spawn()
            .expect("nisshi starts");
        let mut broker = Broker {
            child,
            port,
            storage,
            dir,
        };
        let deadline = Instant::now() + READY;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = broker.child.try_wait() {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                panic!(
                    "nisshi ({}) ended with {status} before listening on {port} (is it installed with the features .ci/run gives it? {INSTALL}): {}",
                    broker.storage,
                    said.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
                );
            }
            assert!(
                Instant::now() < deadline,
                "nisshi did not listen on {port} within {READY:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        broker
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates `topic` with `partitions` partitions on the broker at `addr`. A topic that exists
/// already counts: a producer's metadata request may have created it first (the broker creates
/// topics it is asked about).
pub async fn create_topic(addr: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .create()
        .expect("an admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics answers");
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => panic!("cannot create topic {t}: {e}"),
        }
    }
}

/// One record as read back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Record {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp_ms: Option<i64>,
}

/// Every record of `topic` (all its partitions, from the start), in partition then offset
/// order, once `want` have been read or `wait` has passed.
pub fn read_topic(addr: &str, topic: &str, want: usize, wait: Duration) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("group.id", format!("weir-test-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("the topic's metadata");
    let mut assignment = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            assignment
                .add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("a partition");
        }
    }
    consumer.assign(&assignment).expect("assigned");
    let mut records = Vec::new();
    let deadline = Instant::now() + wait;
    while records.len() < want && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.expect("a record");
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|header| {
                        (
                            header.key.to_owned(),
                            header.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        records.push(Record {
            partition: message.partition(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers,
            timestamp_ms: message.timestamp().to_millis(),
        });
    }
    records.sort_by_key(|r| r.partition);
    records
}

/// Writes `records` (key, value, headers, timestamp) to `topic` with an idempotent producer
/// and waits until the broker acked every one.
pub async fn produce(addr: &str, topic: &str, records: &[Record]) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("enable.idempotence", "true")
        .set("linger.ms", "2")
        .create()
        .expect("a producer");
    let mut waiting = Vec::with_capacity(records.len());
    for r in records {
        let mut headers = OwnedHeaders::new();
        for (name, value) in &r.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        let mut record = FutureRecord::to(topic)
            .partition(r.partition)
            .payload(&r.value)
            .headers(headers);
        if let Some(key) = &r.key {
            record = record.key(key);
        }
        if let Some(ts) = r.timestamp_ms {
            record = record.timestamp(ts);
        }
        waiting.push(
            producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .expect("queued"),
        );
    }
    for delivery in waiting {
        delivery
            .await
            .expect("not cancelled")
            .map_err(|(e, _)| e)
            .expect("acked by the broker");
    }
}

/// The offsets `group` committed on `topic`, by partition (partitions without one left out).
pub fn committed(addr: &str, group: &str, topic: &str, partitions: i32) -> Vec<(i32, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("group.id", group)
        .create()
        .expect("a consumer");
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .expect("the group's offsets");
    committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(at) => Some((e.partition(), at)),
            _ => None,
        })
        .collect()
}

/// The offset after the last record of each partition of `topic`.
pub fn ends(addr: &str, topic: &str, partitions: i32) -> Vec<(i32, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .create()
        .expect("a consumer");
    (0..partitions)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("the partition's watermarks");
            (p, high)
        })
        .collect()
}
