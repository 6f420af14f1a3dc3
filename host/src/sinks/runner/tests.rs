//! A full `block` buffer: what the log says about a pipeline waiting for room, with a
//! destination that delivers steadily (the sink sets the pace: nothing to say) and one that
//! stalls (a warning, once per wait). The pipeline is the test's thread, offering; the runner
//! runs on a tokio runtime of its own.

use super::*;
use crate::metrics::Metrics;
use crate::sinks::SendFuture;
use std::io::Write;

/// A destination that takes `pause` per send, once `open`.
struct Paced {
    pause: Duration,
    open: tokio::sync::watch::Receiver<bool>,
}

impl Destination for Paced {
    fn describe(&self) -> String {
        "paced".into()
    }

    fn send<'a>(&'a mut self, _: &'a [Outgoing]) -> SendFuture<'a> {
        Box::pin(async move {
            // The test keeps the sender while the sink runs.
            let _ = self.open.wait_for(|open| *open).await;
            tokio::time::sleep(self.pause).await;
            Ok(())
        })
    }
}

/// What the log receives, for the thread that installs it.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Twice: offers four batches of one event, then one of four, to a sink buffering four events,
/// each send taking `pause` once the destination opens (after `opens_after`). The batch of four
/// waits until the four before it are delivered. Returns what was logged.
fn offers_with(pause: Duration, opens_after: Duration) -> String {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = Metrics::new();
    let sink = Sink::new(
        "paced",
        "paced".into(),
        BufferConfig {
            max_events: 4,
            batch_events: 1,
            ..BufferConfig::default()
        },
        RetryConfig::default(),
        dir.path(),
        metrics.sink("paced"),
    )
    .expect("a sink");
    let (open, open_rx) = tokio::sync::watch::channel(opens_after.is_zero());
    let runner = runtime.spawn(sink.clone().run(Box::new(Paced {
        pause,
        open: open_rx,
    })));
    runtime.spawn(async move {
        tokio::time::sleep(opens_after).await;
        open.send_replace(true);
        // Held until the runner ends.
        open.closed().await;
    });
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .finish();
    let batch = |n: i64| {
        SharedBatch::verify(weir_format::encode(
            &(0..n)
                .map(|i| weir_format::Event::new(format!("{i}"), i))
                .collect::<Vec<_>>(),
        ))
        .expect("a batch")
    };
    tracing::subscriber::with_default(subscriber, || {
        let ticket = Ticket::new();
        for _ in 0..2 {
            for n in [1, 1, 1, 1, 4] {
                sink.offer(Outgoing::all(batch(n), Arc::from("p")), &ticket)
                    .expect("taken");
            }
        }
    });
    sink.close();
    let problems = runtime.block_on(runner).expect("the runner");
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(sink.metrics().events_out.get(), 16);
    String::from_utf8(lock(&log.0).clone()).expect("UTF-8")
}

#[test]
fn a_sink_that_sets_the_pace_is_not_news() {
    // The batch of four waits for four sends of 300 ms: 1.2 s, with a delivery every 300 ms.
    let log = offers_with(Duration::from_millis(300), Duration::ZERO);
    assert_eq!(log, "");
}

#[test]
fn a_destination_that_delivers_nothing_for_a_second_is_logged_once_per_wait() {
    let log = offers_with(Duration::from_millis(10), Duration::from_millis(1500));
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].starts_with(" WARN weir::sinks::runner: sink `paced`: buffer full (4 events, ")
            && lines[0].contains("for paced (when_full = block)"),
        "{log}"
    );
}

/// A destination that is down: every send fails, to be retried.
struct Down;

impl Destination for Down {
    fn describe(&self) -> String {
        "down".into()
    }

    fn send<'a>(&'a mut self, _: &'a [Outgoing]) -> SendFuture<'a> {
        Box::pin(async { Err(SendError::Retry("down: connection refused".into())) })
    }
}

/// A destination that records the values it delivers.
struct Recording(Arc<Mutex<Vec<String>>>);

impl Destination for Recording {
    fn describe(&self) -> String {
        "recording".into()
    }

    fn send<'a>(&'a mut self, batch: &'a [Outgoing]) -> SendFuture<'a> {
        Box::pin(async move {
            let mut seen = lock(&self.0);
            for out in batch {
                seen.extend(
                    out.events()
                        .map(|e| String::from_utf8_lossy(e.value()).into_owned()),
                );
            }
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconfigured_sink_delivers_what_it_holds_to_its_new_destination() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = Metrics::new();
    let sink = Sink::new(
        "s",
        "down".into(),
        BufferConfig::default(),
        RetryConfig {
            initial: Duration::from_secs(30),
            max: Duration::from_secs(30),
        },
        dir.path(),
        metrics.sink("s"),
    )
    .expect("a sink");
    let runner = tokio::spawn(sink.clone().run(Box::new(Down)));
    let ticket = Ticket::new();
    let (tx, resolved) = tokio::sync::oneshot::channel();
    let batch = SharedBatch::verify(weir_format::encode(&[
        weir_format::Event::new("a", 1),
        weir_format::Event::new("b", 2),
    ]))
    .expect("a batch");
    sink.offer(Outgoing::all(batch, Arc::from("p")), &ticket)
        .expect("taken");
    ticket.seal(move |result| {
        let _ = tx.send(result);
    });
    // The first attempt failed; the next one is 30 s away.
    while sink.metrics().errors.get() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let bigger = BufferConfig {
        max_events: 20_000,
        ..BufferConfig::default()
    };
    sink.reconfigure(
        Box::new(Recording(seen.clone())),
        bigger,
        RetryConfig::default(),
    );
    assert_eq!(sink.describe(), "recording");
    assert_eq!(sink.buffer().max_events, 20_000);
    let result = tokio::time::timeout(Duration::from_secs(10), resolved)
        .await
        .expect("delivered long before the backoff ends")
        .expect("resolved");
    assert_eq!(result, Ok(()));
    assert_eq!(*lock(&seen), ["a", "b"]);
    sink.close();
    assert_eq!(runner.await.expect("the runner"), Vec::<String>::new());
}
