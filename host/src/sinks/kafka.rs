//! The kafka sink: each event becomes one record of a Kafka topic (or of any broker that speaks
//! Kafka's protocol: Redpanda, nisshi), through librdkafka (rdkafka).
//!
//! # The record
//!
//! - **Value**: the event's bytes, verbatim. **Key**: the event's key (none when it has none);
//!   the partition is chosen from the key as Kafka's own clients do (`murmur2_random`: the same
//!   key always goes to the same partition; records without a key are spread).
//! - **Headers**: the event's headers, in order; **timestamp**: its event time.
//! - **Topic**: `topic`, or with `topic_from = "route"` the event's route tag, or with
//!   `topic_from = "header:NAME"` that header's value; an event without one goes to `topic`
//!   when it is set, and is refused (dead-lettered) otherwise.
//!
//! # Delivered
//!
//! A delivery is done once the broker acked every record of it with `acks = all` (every
//! in-sync replica has it). The producer is idempotent (`enable.idempotence = true`): the
//! retries librdkafka makes on its own do not write a record twice. A delivery that failed as
//! a whole is sent again by the sink's runner, so a record may be written twice then (at least
//! once), never lost.
//!
//! # Errors
//!
//! - The broker unreachable, a leader moving, a timeout (`timeout_ms`, default 30 s, the most a
//!   record may wait for its ack), a full local queue: retried, with backoff, by the runner.
//! - A record the broker refuses as such (too large, invalid), or a topic taken from an event
//!   that the broker does not know or that is not a valid topic name: refused
//!   ([`SendError::Reject`]): the runner isolates and dead-letters those events with the
//!   message, which names the sink, the topic and the broker's error.
//! - A configured `topic` the broker does not know, or refuses to the sink (authorization):
//!   retried with a message that says to check the config, so that a config mistake holds the
//!   events instead of dead-lettering them all.

use super::{Destination, OpenError, Outgoing, SendError, SendFuture};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use std::time::Duration;
use weir_format::EventRef;

/// `type = "kafka"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// The brokers to bootstrap from (`host:port,host:port`).
    pub brokers: String,
    /// The topic (with `topic_from`: for events that carry none).
    pub topic: Option<String>,
    /// Where an event's topic comes from, when not the fixed `topic`.
    pub topic_from: TopicFrom,
    /// Further librdkafka settings (security, compression, linger), by name.
    pub properties: Vec<(String, String)>,
    /// The most a record may wait for the broker's ack before its delivery is retried.
    pub timeout: Duration,
}

/// Where an event's topic comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicFrom {
    /// The sink's `topic`.
    Config,
    /// The event's route tag.
    Route,
    /// The value of this header.
    Header(String),
}

impl TopicFrom {
    /// Reads `route` or `header:NAME`.
    pub fn parse(text: &str) -> Result<TopicFrom, String> {
        match text {
            "route" => Ok(TopicFrom::Route),
            _ => match text.strip_prefix("header:") {
                Some(name) if !name.is_empty() => Ok(TopicFrom::Header(name.to_owned())),
                _ => Err(format!(
                    "topic_from = `{text}`: expected `route` or `header:NAME`"
                )),
            },
        }
    }
}

/// The librdkafka settings the sink decides, and why: `properties` may not set them.
const FIXED: [(&str, &str); 7] = [
    ("bootstrap.servers", "give the brokers in `brokers`"),
    ("metadata.broker.list", "give the brokers in `brokers`"),
    ("enable.idempotence", "the producer is always idempotent"),
    (
        "acks",
        "a record is delivered once every in-sync replica has it (`all`)",
    ),
    (
        "request.required.acks",
        "a record is delivered once every in-sync replica has it (`all`)",
    ),
    ("message.timeout.ms", "set it with `timeout_ms`"),
    ("delivery.timeout.ms", "set it with `timeout_ms`"),
];

/// Refuses `properties` that would set what the sink decides.
pub fn check_properties(properties: &[(String, String)]) -> Result<(), String> {
    for (key, _) in properties {
        if let Some((_, why)) = FIXED.iter().find(|(k, _)| k == key) {
            return Err(format!("properties: `{key}` is not yours to set: {why}"));
        }
    }
    Ok(())
}

/// Records queued in librdkafka at most, per sink.
const QUEUE_MESSAGES: &str = "1000000";
/// How long a send waits before trying again when librdkafka's queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);
/// How long closing waits for records still queued.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Produces the events to Kafka; see the module documentation.
pub struct KafkaDestination {
    sink: String,
    config: KafkaConfig,
    producer: FutureProducer,
}

impl KafkaDestination {
    /// Builds the producer (librdkafka checks the settings); nothing connects until the first
    /// record.
    pub fn open(name: &str, config: &KafkaConfig) -> Result<KafkaDestination, OpenError> {
        let producer: FutureProducer =
            client_config(name, config)
                .create()
                .map_err(|e| OpenError {
                    sink: name.to_owned(),
                    what: describe(config),
                    message: e.to_string(),
                })?;
        Ok(KafkaDestination {
            sink: name.to_owned(),
            config: config.clone(),
            producer,
        })
    }

    /// The topic of `event`, or why it has none.
    fn topic<'e>(&'e self, event: &EventRef<'e>) -> Result<&'e str, SendError> {
        let from_event = match &self.config.topic_from {
            TopicFrom::Config => None,
            TopicFrom::Route => event.route(),
            TopicFrom::Header(name) => event
                .headers()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok()),
        };
        from_event
            .filter(|t| !t.is_empty())
            .or(self.config.topic.as_deref())
            .ok_or_else(|| {
                SendError::Reject(format!(
                    "sink `{}`: the event has no topic ({}) and the sink no `topic` for such events",
                    self.sink,
                    match &self.config.topic_from {
                        TopicFrom::Header(name) => format!("no header `{name}`"),
                        _ => "no route tag".to_owned(),
                    }
                ))
            })
    }

    /// What `error` on a record for `topic` means for the delivery.
    fn failure(&self, topic: &str, error: &KafkaError) -> SendError {
        let message = format!(
            "sink `{}`: kafka {} topic `{topic}`: {error}",
            self.sink, self.config.brokers
        );
        let code = error.rdkafka_error_code();
        let from_event = self.config.topic.as_deref() != Some(topic);
        match code {
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord,
            ) => SendError::Reject(message),
            Some(
                RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::InvalidTopic,
            ) if from_event => SendError::Reject(message),
            Some(
                RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed,
            ) => SendError::Retry(format!(
                "{message} (the broker refuses the sink, not these events: check its `topic`, `brokers` and `properties`; retrying)"
            )),
            _ => SendError::Retry(message),
        }
    }

    /// Queues one record; waits while librdkafka's queue is full.
    async fn produce(
        &self,
        topic: &str,
        event: &EventRef<'_>,
    ) -> Result<DeliveryFuture, SendError> {
        let mut record = record(topic, event);
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_WAIT).await;
                }
                Err((e, _)) => return Err(self.failure(topic, &e)),
            }
        }
    }

    async fn deliver(&self, batch: &[Outgoing]) -> Result<(), SendError> {
        let mut pending: Vec<DeliveryFuture> = Vec::new();
        let mut refused: Option<SendError> = None;
        for out in batch {
            for event in out.events() {
                let queued = match self.topic(&event) {
                    Ok(topic) => self.produce(topic, &event).await,
                    Err(e) => Err(e),
                };
                match queued {
                    Ok(queued) => pending.push(queued),
                    Err(e @ SendError::Retry(_)) => return Err(e),
                    Err(e @ SendError::Reject(_)) => {
                        refused.get_or_insert(e);
                    }
                }
            }
        }
        let mut retry: Option<SendError> = None;
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, record))) => match self.failure(record.topic(), &e) {
                    e @ SendError::Retry(_) => {
                        retry.get_or_insert(e);
                    }
                    e @ SendError::Reject(_) => {
                        refused.get_or_insert(e);
                    }
                },
                Err(_) => {
                    retry.get_or_insert(SendError::Retry(format!(
                        "sink `{}`: kafka {}: the producer went away before the broker answered",
                        self.sink, self.config.brokers
                    )));
                }
            }
        }
        match retry.or(refused) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The librdkafka settings of sink `name`'s producer: the sink's own (idempotent, `acks = all`,
/// Kafka's partitioner, the timeout) and its `properties`.
pub fn client_config(name: &str, config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("queue.buffering.max.messages", QUEUE_MESSAGES)
        .set("message.timeout.ms", config.timeout.as_millis().to_string())
        .set("client.id", format!("weir-{name}"));
    for (key, value) in &config.properties {
        client.set(key, value);
    }
    client
}

/// The record of `event` for `topic`: its value, key, headers in order and event time.
pub fn record<'e>(topic: &'e str, event: &EventRef<'e>) -> FutureRecord<'e, [u8], [u8]> {
    let mut headers = OwnedHeaders::new();
    for (name, value) in event.headers() {
        headers = headers.insert(Header {
            key: name,
            value: Some(value),
        });
    }
    let record = FutureRecord::to(topic)
        .payload(event.value())
        .timestamp(event.timestamp_ms())
        .headers(headers);
    match event.key() {
        Some(key) => record.key(key),
        None => record,
    }
}

/// `kafka BROKERS topic T` (or `topic from route`, `topic from header NAME`).
pub fn describe(config: &KafkaConfig) -> String {
    let topic = match (&config.topic_from, &config.topic) {
        (TopicFrom::Config, Some(t)) => format!("topic `{t}`"),
        (TopicFrom::Config, None) => "no topic".to_owned(),
        (TopicFrom::Route, t) => format!("topic from the route tag{}", otherwise(t)),
        (TopicFrom::Header(name), t) => format!("topic from header `{name}`{}", otherwise(t)),
    };
    format!("kafka {} {topic}", config.brokers)
}

fn otherwise(topic: &Option<String>) -> String {
    topic
        .as_ref()
        .map(|t| format!(", else `{t}`"))
        .unwrap_or_default()
}

impl Destination for KafkaDestination {
    fn describe(&self) -> String {
        describe(&self.config)
    }

    fn send<'a>(&'a mut self, batch: &'a [Outgoing]) -> SendFuture<'a> {
        Box::pin(self.deliver(batch))
    }

    fn close(&mut self) -> SendFuture<'_> {
        Box::pin(async move {
            let producer = self.producer.clone();
            let flushed = tokio::task::spawn_blocking(move || producer.flush(CLOSE_WAIT)).await;
            match flushed {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(SendError::Retry(format!(
                    "sink `{}`: kafka {}: records still queued at the stop: {e}",
                    self.sink, self.config.brokers
                ))),
                Err(e) => Err(SendError::Retry(format!(
                    "sink `{}`: kafka {}: flushing at the stop: {e}",
                    self.sink, self.config.brokers
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_from_reads_route_and_a_header() {
        assert_eq!(TopicFrom::parse("route"), Ok(TopicFrom::Route));
        assert_eq!(
            TopicFrom::parse("header:dest"),
            Ok(TopicFrom::Header("dest".into()))
        );
        assert_eq!(
            TopicFrom::parse("header:"),
            Err("topic_from = `header:`: expected `route` or `header:NAME`".into())
        );
    }

    #[test]
    fn properties_cannot_weaken_the_promises() {
        let props = |k: &str| vec![(k.to_owned(), "1".to_owned())];
        assert_eq!(check_properties(&props("linger.ms")), Ok(()));
        assert_eq!(
            check_properties(&props("acks")),
            Err("properties: `acks` is not yours to set: a record is delivered once every in-sync replica has it (`all`)".into())
        );
        assert!(check_properties(&props("enable.idempotence")).is_err());
    }

    #[test]
    fn describe_names_brokers_and_topic() {
        let mut config = KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topic: Some("clicks".into()),
            topic_from: TopicFrom::Config,
            properties: Vec::new(),
            timeout: Duration::from_secs(30),
        };
        assert_eq!(describe(&config), "kafka 127.0.0.1:9092 topic `clicks`");
        config.topic_from = TopicFrom::Header("dest".into());
        assert_eq!(
            describe(&config),
            "kafka 127.0.0.1:9092 topic from header `dest`, else `clicks`"
        );
    }
}
