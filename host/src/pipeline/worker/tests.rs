//! The worker's rounds, completions and stops, driven by a test source (batches handed to the
//! pipeline's input with completions that report back) into test sinks (destinations that
//! record what they deliver and hold deliveries until a test lets them through). No sockets;
//! real plugins where a stage is needed; every wait bounded.

use super::*;
use crate::metrics::Metrics;
use crate::pipeline::fanout::UnmatchedOut;
use crate::pipeline::route::Condition;
use crate::pipeline::{Stage, WindowConfig};
use crate::runtime::{Limits, Runtime, RuntimeConfig, StageConfig};
use crate::sinks::runner::Sink;
use crate::sinks::{BufferConfig, Destination, Outgoing, RetryConfig, SendFuture};
use tokio::sync::watch;
use weir_format::encode;

mod plugins {
    include!(concat!(env!("OUT_DIR"), "/plugin_paths.rs"));
}

/// The bound of every wait.
const WAIT: Duration = Duration::from_secs(20);

/// One delivered event: its value, and the `weir-error` and `weir-stage` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Delivered {
    key: Option<String>,
    value: String,
    error: Option<String>,
    stage: Option<String>,
    versions: Option<String>,
    /// Events in the batch the delivery shares (a selection's batch holds more).
    shared: usize,
}

/// A destination that records every event it delivers, once its gate is open.
struct Probe {
    delivered: Arc<Mutex<Vec<Delivered>>>,
    gate: watch::Receiver<bool>,
}

impl Destination for Probe {
    fn describe(&self) -> String {
        "probe".into()
    }

    fn send<'a>(&'a mut self, batch: &'a [Outgoing]) -> SendFuture<'a> {
        Box::pin(async move {
            // The test keeps the gate's sender for as long as the sink runs.
            let _ = self.gate.wait_for(|open| *open).await;
            let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
            let mut delivered = lock(&self.delivered);
            for out in batch {
                for event in out.events() {
                    delivered.push(Delivered {
                        key: text(event.key()),
                        value: String::from_utf8_lossy(event.value()).into_owned(),
                        error: text(event.header("weir-error")),
                        stage: text(event.header("weir-stage")),
                        versions: text(event.header("weir-versions")),
                        shared: out.shared().batch().len(),
                    });
                }
            }
            Ok(())
        })
    }
}

/// A sink with a [`Probe`] destination, its runner spawned.
struct TestSink {
    sink: Arc<Sink>,
    delivered: Arc<Mutex<Vec<Delivered>>>,
    gate: watch::Sender<bool>,
}

impl TestSink {
    fn start(name: &str, open: bool, metrics: &Metrics, dir: &std::path::Path) -> TestSink {
        let (gate, gate_rx) = watch::channel(open);
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let sink = Sink::new(
            name,
            "probe".into(),
            BufferConfig::default(),
            RetryConfig::default(),
            &dir.join(name),
            metrics.sink(name),
        )
        .expect("a sink");
        let probe = Probe {
            delivered: delivered.clone(),
            gate: gate_rx,
        };
        tokio::spawn(sink.clone().run(Box::new(probe)));
        TestSink {
            sink,
            delivered,
            gate,
        }
    }

    fn delivered(&self) -> Vec<Delivered> {
        lock(&self.delivered).clone()
    }
}

/// A running pipeline with an `out` sink (taking every event, or those its condition
/// selects), a dead-letter sink, and with a condition a `rest` sink for the unmatched events.
struct Harness {
    pipeline: Pipeline,
    out: TestSink,
    dead: TestSink,
    rest: Option<TestSink>,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn start(stages: Vec<Stage>, config: WorkerConfig, out_open: bool) -> Harness {
        Harness::start_with(stages, config, out_open, None)
    }

    fn start_with(
        stages: Vec<Stage>,
        config: WorkerConfig,
        out_open: bool,
        version_header: Option<&str>,
    ) -> Harness {
        Harness::start_routed(
            vec![stages],
            config,
            out_open,
            version_header,
            Condition::All,
        )
    }

    /// A pipeline on one worker per stage list of `lanes`.
    fn start_routed(
        lanes: Vec<Vec<Stage>>,
        config: WorkerConfig,
        out_open: bool,
        version_header: Option<&str>,
        condition: Condition,
    ) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Metrics::new();
        let out = TestSink::start("out", out_open, &metrics, dir.path());
        let dead = TestSink::start("dead", true, &metrics, dir.path());
        let rest = (condition != Condition::All)
            .then(|| TestSink::start("rest", true, &metrics, dir.path()));
        let unmatched = match &rest {
            Some(rest) => UnmatchedOut::Sink(rest.sink.clone()),
            None => UnmatchedOut::Impossible,
        };
        let stage_metrics = lanes[0]
            .iter()
            .map(|s| metrics.stage("p", s.name()))
            .collect();
        let pipeline = Pipeline::spawn(WorkerSetup {
            name: "p".into(),
            chains: lanes.into_iter().map(Chain::new).collect(),
            fanout: Fanout::new(
                Arc::from("p"),
                vec![(out.sink.clone(), condition)],
                unmatched,
                dead.sink.clone(),
            ),
            metrics: metrics.pipeline("p"),
            stage_metrics,
            queue: 16,
            config,
            registry: metrics.clone(),
            version_header: version_header.map(str::to_owned),
            checkpoint: None,
            resumed: Resumed::default(),
            tap: Default::default(),
        })
        .expect("a worker thread");
        Harness {
            pipeline,
            out,
            dead,
            rest,
            metrics,
            _dir: dir,
        }
    }

    /// Hands a batch to the pipeline, as a source would; the receiver gets its outcome.
    async fn send(&self, events: &[Event]) -> oneshot::Receiver<Result<(), String>> {
        self.send_at(None, events).await
    }

    /// Hands a batch of the stream `position` names to the pipeline.
    async fn send_at(
        &self,
        position: Option<Position>,
        events: &[Event],
    ) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        let batch = SharedBatch::verify(encode(events)).expect("a valid batch");
        let completion = Completion::new(move |result| {
            let _ = tx.send(result);
        });
        self.pipeline
            .input()
            .send(Input {
                batch,
                completion,
                position,
                rejected: Vec::new(),
                batch_ms: None,
                event_next: None,
            })
            .await
            .expect("the pipeline takes batches");
        rx
    }

    /// Waits until `out` delivered `n` events; what it delivered.
    async fn delivered(&self, n: usize) -> Vec<Delivered> {
        within("the deliveries", async {
            loop {
                let delivered = self.out.delivered();
                if delivered.len() >= n {
                    return delivered;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
    }

    /// Waits until the pipeline took `n` batches in.
    async fn processed(&self, n: u64) {
        let batches = self.metrics.pipeline("p").batches_in;
        within("the batches processed", async {
            while batches.get() < n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
    }
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

async fn outcome(rx: oneshot::Receiver<Result<(), String>>) -> Result<(), String> {
    within("a completion", rx)
        .await
        .expect("resolved, not dropped")
}

fn fast() -> WorkerConfig {
    WorkerConfig {
        stage_attempts: 3,
        stage_backoff: Duration::from_millis(1),
        stop_sync_attempts: 1,
        stop_wait: Duration::from_millis(300),
    }
}

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig {
        max_instances: 8,
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

fn stage(runtime: &Runtime, path: &str, name: &str, window: Option<WindowConfig>) -> Stage {
    let plugin = runtime.load_file(path).expect("plugin loads");
    let config = StageConfig::new(name).limits(Limits {
        max_calls_per_instance: 1,
        ..Limits::default()
    });
    Stage::new(&plugin, config, window).expect("stage")
}

fn minute() -> Option<WindowConfig> {
    Some(WindowConfig::tumbling(Duration::from_secs(60)))
}

fn values(delivered: &[Delivered]) -> Vec<String> {
    delivered.iter().map(|d| d.value.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_resolve_when_the_sinks_accept_and_the_worker_never_waits_for_them() {
    let h = Harness::start(Vec::new(), fast(), false);
    let first = h.send(&[Event::new("a", 1), Event::new("b", 2)]).await;
    h.processed(1).await;
    // The sink holds the first batch; the worker goes on with the second.
    let mut second = h.send(&[Event::new("c", 3)]).await;
    h.processed(2).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        second.try_recv(),
        Err(oneshot::error::TryRecvError::Empty),
        "not accepted while the sink holds it"
    );
    assert!(h.out.delivered().is_empty());
    h.out.gate.send_replace(true);
    assert_eq!(outcome(first).await, Ok(()));
    assert_eq!(outcome(second).await, Ok(()));
    assert_eq!(values(&h.out.delivered()), ["a", "b", "c"]);
    assert_eq!(h.pipeline.stop().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_filter_kept_reaches_the_sinks_as_a_selection_routed_as_usual() {
    let runtime = runtime();
    let gold = Condition::Headers(vec![("tier".into(), "gold".into())]);
    let h = Harness::start_routed(
        vec![vec![stage(&runtime, plugins::EVEN_KEY, "even", None)]],
        fast(),
        true,
        None,
        gold,
    );
    // even-key keeps k0, k2 and k4; of those only k0 is gold.
    let events: Vec<Event> = ["a", "b", "c", "d", "e", "f"]
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let event = Event::new(*v, i as i64).with_key(format!("k{i}"));
            match i {
                0 | 1 | 3 => event.with_header("tier", "gold"),
                _ => event,
            }
        })
        .collect();
    assert_eq!(outcome(h.send(&events).await).await, Ok(()));
    assert_eq!(values(&h.out.delivered()), ["a"]);
    let rest = h.rest.as_ref().expect("a rest sink");
    assert_eq!(values(&rest.delivered()), ["c", "e"]);
    assert!(
        h.out
            .delivered()
            .iter()
            .chain(&rest.delivered())
            .all(|d| d.shared == 6),
        "the input batch, not a copy"
    );
    assert!(h.dead.delivered().is_empty());
    let metrics = h.metrics.pipeline("p");
    assert_eq!((metrics.events_in.get(), metrics.events_out.get()), (6, 3));
    assert_eq!(metrics.unmatched.get(), 2);

    // Keeping fewer than one event in four, the kept events are copied into a batch of their
    // own: a few events in a sink's buffer do not hold a large batch in memory.
    let events: Vec<Event> = (0..8)
        .map(|i| Event::new(format!("v{i}"), i).with_key(format!("k{}", 2 * i + 1)))
        .chain([Event::new("gold", 8)
            .with_key("k0")
            .with_header("tier", "gold")])
        .collect();
    assert_eq!(outcome(h.send(&events).await).await, Ok(()));
    let delivered = h.out.delivered();
    assert_eq!(values(&delivered), ["a", "gold"]);
    assert_eq!(delivered[1].shared, 1);
    assert_eq!(h.pipeline.stop().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_cannot_run_resumes_where_it_failed_and_nothing_runs_twice() {
    let runtime = runtime();
    let sums = stage(&runtime, plugins::COUNT_SUM, "sums", minute());
    let mut tail = stage(&runtime, plugins::IDENTITY, "tail", None);
    // The tail's next three starts fail: one here, then two attempts inside the worker.
    tail.instance_mut().failing_starts = 3;
    assert!(tail.instance_mut().recycle().is_err());
    let h = Harness::start(vec![sums, tail], fast(), true);

    let a = h
        .send(&[Event::new(r#"{"amount":1}"#, 1_000).with_key("a")])
        .await;
    assert_eq!(outcome(a).await, Ok(()));
    // Event time passes the minute: `sums` finishes window a and folds b, then `tail` cannot
    // start twice. The worker runs `tail` again on what `sums` output, not `sums` again.
    let b = h
        .send(&[Event::new(r#"{"amount":2}"#, 61_000).with_key("b")])
        .await;
    assert_eq!(outcome(b).await, Ok(()));
    assert_eq!(h.pipeline.stop().await, Vec::<String>::new());

    let windows: Vec<serde_json::Value> = h
        .out
        .delivered()
        .iter()
        .map(|d| serde_json::from_str(&d.value).expect("JSON"))
        .collect();
    let counts: Vec<(i64, f64)> = windows
        .iter()
        .map(|w| {
            (
                w["start_ms"].as_i64().expect("start"),
                w["count"].as_f64().expect("count"),
            )
        })
        .collect();
    assert_eq!(counts, [(0, 1.0), (60_000, 1.0)], "each event folded once");
    assert!(h.dead.delivered().is_empty());
    let tail = h.metrics.stage("p", "tail");
    assert_eq!((tail.events_in.get(), tail.events_out.get()), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_never_runs_again_turns_its_input_into_dead_letters_once() {
    let runtime = runtime();
    let marks = stage(&runtime, plugins::PANIC_ON_MARK, "marks", None);
    let mut sums = stage(&runtime, plugins::COUNT_SUM, "sums", minute());
    sums.instance_mut().starts_left = Some(0);
    assert!(sums.instance_mut().recycle().is_err());
    let h = Harness::start(vec![marks, sums], fast(), true);
    let batch = h
        .send(&[
            Event::new(r#"{"amount":1}"#, 1_000).with_key("a"),
            Event::new("poison", 2_000).with_key("a"),
            Event::new(r#"{"amount":3}"#, 3_000).with_key("a"),
        ])
        .await;
    assert_eq!(
        outcome(batch).await,
        Ok(()),
        "dead letters count as accepted"
    );
    assert_eq!(h.pipeline.stop().await, Vec::<String>::new());
    assert!(h.out.delivered().is_empty());
    let dead = h.dead.delivered();
    let stages: Vec<(&str, &str)> = dead
        .iter()
        .map(|d| (d.value.as_str(), d.stage.as_deref().unwrap_or("")))
        .collect();
    assert_eq!(
        stages,
        [
            ("poison", "marks"),
            (r#"{"amount":1}"#, "sums"),
            (r#"{"amount":3}"#, "sums"),
        ],
        "each event dead-lettered once, by the stage that could not take it"
    );
    let error = dead[1].error.as_deref().unwrap_or_default();
    assert!(
        error.starts_with("cannot run: plugin `count_sum` ")
            && error.ends_with(": cannot instantiate: instance pool exhausted (test)"),
        "{error}"
    );
    assert_eq!(h.metrics.pipeline("p").dead_letters.get(), 3);
    // The poison event made `marks` run its batch event by event, once.
    assert_eq!(h.metrics.stage("p", "marks").retried.get(), 1);
    assert_eq!(h.metrics.stage("p", "sums").retried.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_processes_what_is_queued_and_rejects_what_the_sinks_never_accept() {
    let h = Harness::start(Vec::new(), fast(), false);
    let mut outcomes = Vec::new();
    for i in 0..5 {
        outcomes.push(h.send(&[Event::new(format!("{i}"), i)]).await);
    }
    let problems = h.pipeline.stop().await;
    assert_eq!(
        problems,
        [
            "pipeline `p`: a sink did not accept the last batches in 300ms; its batches are not acked"
        ]
    );
    for outcome in outcomes {
        assert_eq!(
            outcome.await.expect("resolved"),
            Err("a sink did not accept the last batches in 300ms".to_string())
        );
    }
    assert_eq!(
        h.metrics.pipeline("p").batches_in.get(),
        5,
        "every queued batch processed"
    );
    assert!(
        h.pipeline.input().is_closed(),
        "no batch taken after a stop"
    );
}

/// Swaps stage 0 for `replacement` on probation for `batches` batches; the swap's outcome and
/// the verdict's receiver.
async fn swap(
    h: &Harness,
    replacement: Stage,
    batches: u64,
) -> (
    Result<Swapped, Box<SwapRefused>>,
    oneshot::Receiver<Verdict>,
) {
    let (done, swapped) = oneshot::channel();
    let (verdict, judged) = oneshot::channel();
    h.pipeline
        .controller()
        .swap(
            0,
            Swap {
                stage: 0,
                replacement,
                probation: batches,
                on_change: StateChange::Refuse,
                done,
                verdict: Some(verdict),
                shared: Arc::default(),
            },
        )
        .expect("the worker runs");
    (within("the swap", swapped).await.expect("answered"), judged)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_happen_between_batches_and_verdicts_reach_the_deployer() {
    let runtime = runtime();
    let old = stage(&runtime, plugins::IDENTITY, "s", None);
    let old_version = old.plugin().version().to_owned();
    let h = Harness::start_with(vec![old], fast(), true, Some("weir-versions"));
    assert_eq!(outcome(h.send(&[Event::new("a", 1)]).await).await, Ok(()));

    // A version that fails where the old one does not: rolled back on its first batch.
    let bad = stage(&runtime, plugins::PANIC_ON_MARK, "s", None);
    let bad_version = bad.plugin().version().to_owned();
    let (swapped, judged) = swap(&h, bad, 3).await;
    let swapped = swapped.map_err(|e| e.message).expect("swapped");
    assert!(swapped.previous.is_none(), "kept for the probation");
    assert!(swapped.pause < WAIT);
    assert_eq!(
        outcome(h.send(&[Event::new("poison", 2)]).await).await,
        Ok(())
    );
    let verdict = within("the verdict", judged).await.expect("a verdict");
    assert!(
        matches!(&verdict, Verdict::RolledBack { version, restored, batches: 0, .. } if *version == bad_version && *restored == old_version),
        "{verdict:?}"
    );

    // The same version again, now on a batch it takes: it passes.
    let good = stage(&runtime, plugins::PANIC_ON_MARK, "s", None);
    let (swapped, judged) = swap(&h, good, 1).await;
    assert!(swapped.is_ok());
    assert_eq!(outcome(h.send(&[Event::new("b", 3)]).await).await, Ok(()));
    let verdict = within("the verdict", judged).await.expect("a verdict");
    assert_eq!(
        verdict,
        Verdict::Passed {
            stage: 0,
            version: bad_version.clone(),
            batches: 1
        }
    );
    assert_eq!(h.pipeline.stop().await, Vec::<String>::new());

    let tagged: Vec<(String, Option<String>)> = h
        .out
        .delivered()
        .into_iter()
        .map(|d| (d.value, d.versions))
        .collect();
    assert_eq!(
        tagged,
        [
            ("a".to_owned(), Some(format!("s={old_version}"))),
            ("poison".to_owned(), Some(format!("s={old_version}"))),
            ("b".to_owned(), Some(format!("s={bad_version}"))),
        ],
        "each event tagged by the version whose output it is"
    );
    assert!(
        h.dead.delivered().is_empty(),
        "the bad deploy dead-lettered nothing"
    );
    let metrics = h.metrics.stage("p", "s");
    assert_eq!((metrics.swaps.get(), metrics.rollbacks.get()), (2, 1));
    let batches = |v: &str| h.metrics.stage_version("p", "s", v).batches.get();
    assert_eq!((batches(&old_version), batches(&bad_version)), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_outputs_take_effect_between_two_rounds_and_never_split_a_batch() {
    let h = Harness::start(Vec::new(), fast(), true);
    let other = TestSink::start("other", true, &h.metrics, h._dir.path());
    let first = h.send(&[Event::new("a", 1), Event::new("b", 2)]).await;
    assert_eq!(outcome(first).await, Ok(()));
    within(
        "the new outputs",
        h.pipeline.controller().outputs(Outputs {
            fanout: Fanout::new(
                Arc::from("p"),
                vec![(other.sink.clone(), Condition::All)],
                UnmatchedOut::Impossible,
                h.dead.sink.clone(),
            ),
            version_header: None,
        }),
    )
    .await
    .expect("taken");
    let second = h.send(&[Event::new("c", 3), Event::new("d", 4)]).await;
    assert_eq!(outcome(second).await, Ok(()));
    assert_eq!(values(&h.out.delivered()), ["a", "b"]);
    assert_eq!(values(&other.delivered()), ["c", "d"]);
    assert_eq!(h.pipeline.stop().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_worker_processes_its_queue_flushes_its_windows_and_never_fails_a_round() {
    let runtime = runtime();
    let sums = stage(&runtime, plugins::COUNT_SUM, "sums", minute());
    // The sink holds its deliveries: retiring must not wait for it, nor give up on it.
    let h = Harness::start(vec![sums], fast(), false);
    let mut outcomes = Vec::new();
    for i in 0..5 {
        outcomes.push(
            h.send(&[Event::new(format!(r#"{{"amount":{i}}}"#), 1_000 + i).with_key("k")])
                .await,
        );
    }
    within("the worker to retire", h.pipeline.retire()).await;
    assert_eq!(
        h.metrics.pipeline("p").batches_in.get(),
        5,
        "the whole queue"
    );
    assert!(h.pipeline.input().is_closed(), "no more batches taken");
    // Folded batches are accepted at once (an aggregate's results come with its windows).
    for o in outcomes {
        assert_eq!(outcome(o).await, Ok(()));
    }
    // Long after any stop deadline, the sink lets the flushed window through.
    tokio::time::sleep(fast().stop_wait * 2).await;
    h.out.gate.send_replace(true);
    let delivered = within("the flushed window", async {
        loop {
            let delivered = h.out.delivered();
            if !delivered.is_empty() {
                return delivered;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    let window: serde_json::Value = serde_json::from_str(&delivered[0].value).expect("JSON");
    assert_eq!(window["count"], 5.0, "the open window flushed: {window}");

    // Batches whose events wait in a sink resolve when it takes them, after the worker ended.
    let plain = Harness::start(Vec::new(), fast(), false);
    let waiting = plain.send(&[Event::new("a", 1)]).await;
    within("the worker to retire", plain.pipeline.retire()).await;
    tokio::time::sleep(fast().stop_wait * 2).await;
    plain.out.gate.send_replace(true);
    assert_eq!(outcome(waiting).await, Ok(()));
    assert_eq!(values(&plain.out.delivered()), ["a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_takes_its_first_batch_once_its_predecessor_retired() {
    let h = Harness::start(Vec::new(), fast(), true);
    let (gate, after) = oneshot::channel();
    let successor = Pipeline::spawn_after(
        WorkerSetup {
            name: "p".into(),
            chains: vec![Chain::new(Vec::new())],
            fanout: Fanout::new(
                Arc::from("p"),
                vec![(h.out.sink.clone(), Condition::All)],
                UnmatchedOut::Impossible,
                h.dead.sink.clone(),
            ),
            metrics: h.metrics.pipeline("p"),
            stage_metrics: Vec::new(),
            queue: 16,
            config: fast(),
            registry: h.metrics.clone(),
            version_header: None,
            checkpoint: None,
            resumed: Resumed::default(),
            tap: Default::default(),
        },
        after,
    )
    .expect("a worker thread");
    let old = h.send(&[Event::new("old", 1)]).await;
    let (tx, new) = oneshot::channel();
    successor
        .input()
        .send(Input {
            batch: SharedBatch::verify(encode(&[Event::new("new", 2)])).expect("a batch"),
            completion: Completion::new(move |r| {
                let _ = tx.send(r);
            }),
            position: None,
            rejected: Vec::new(),
            batch_ms: None,
            event_next: None,
        })
        .await
        .expect("queued");
    within("the predecessor to retire", h.pipeline.retire()).await;
    let _ = gate.send(());
    assert_eq!(outcome(old).await, Ok(()));
    assert_eq!(outcome(new).await, Ok(()));
    assert_eq!(values(&h.out.delivered()), ["old", "new"]);
    assert_eq!(successor.stop().await, Vec::<String>::new());
}

fn stream(key: &str, next: u64) -> Option<Position> {
    Some(Position {
        key: Arc::from(key),
        next,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_keep_each_streams_batches_in_order_and_complete_every_one() {
    let h = Harness::start_routed(
        vec![Vec::new(), Vec::new()],
        fast(),
        true,
        None,
        Condition::All,
    );
    let streams = ["a", "b", "c", "d"];
    let lanes: std::collections::HashSet<usize> = streams
        .iter()
        .map(|s| crate::pipeline::lane_of(Some(s.as_bytes()), 2))
        .collect();
    assert_eq!(lanes.len(), 2, "the streams reach both workers");
    let mut outcomes = Vec::new();
    for n in 0..25u64 {
        for s in streams {
            let event = Event::new(format!("{s}{n}"), n as i64);
            outcomes.push(h.send_at(stream(s, n + 1), &[event]).await);
        }
    }
    for o in outcomes {
        assert_eq!(outcome(o).await, Ok(()));
    }
    let delivered = values(&h.delivered(100).await);
    assert_eq!(delivered.len(), 100);
    for s in streams {
        let mine: Vec<&String> = delivered.iter().filter(|v| v.starts_with(s)).collect();
        let sent: Vec<String> = (0..25).map(|n| format!("{s}{n}")).collect();
        assert_eq!(mine, sent.iter().collect::<Vec<_>>(), "stream {s} in order");
    }
    assert_eq!(h.metrics.pipeline("p").batches_in.get(), 100);
    assert_eq!(h.pipeline.stop().await, Vec::<String>::new());
}

/// What count-sum's windows give for `events` (sent in batches of 7 from two streams) on
/// `workers` workers: (key, value) sorted.
async fn window_results(workers: usize, events: &[Event]) -> Vec<(Option<String>, String)> {
    let runtime = runtime();
    let lanes = (0..workers)
        .map(|_| vec![stage(&runtime, plugins::COUNT_SUM, "sums", minute())])
        .collect();
    let h = Harness::start_routed(lanes, fast(), true, None, Condition::All);
    let mut outcomes = Vec::new();
    for (n, batch) in events.chunks(7).enumerate() {
        let s = if n % 2 == 0 { "a" } else { "b" };
        outcomes.push(h.send_at(stream(s, n as u64 + 1), batch).await);
    }
    for o in outcomes {
        assert_eq!(outcome(o).await, Ok(()));
    }
    // The open windows are finished at the stop.
    assert_eq!(h.pipeline.stop().await, Vec::<String>::new());
    let windows: std::collections::HashSet<(Option<Vec<u8>>, i64)> = events
        .iter()
        .map(|e| (e.key.clone(), e.timestamp_ms / 60_000))
        .collect();
    let mut results: Vec<(Option<String>, String)> = h
        .delivered(windows.len())
        .await
        .into_iter()
        .map(|d| (d.key, d.value))
        .collect();
    results.sort();
    assert_eq!(
        results.len(),
        windows.len(),
        "one result per key and minute"
    );
    assert!(h.dead.delivered().is_empty(), "{:?}", h.dead.delivered());
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_on_two_workers_gives_the_window_results_of_one() {
    let events: Vec<Event> = (0..300)
        .map(|i| {
            Event::new(format!(r#"{{"amount":{i}}}"#), 1_000 + i * 700)
                .with_key(format!("user-{}", i % 13))
        })
        .collect();
    let lanes: std::collections::HashSet<usize> = (0..13)
        .map(|k| crate::pipeline::lane_of(Some(format!("user-{k}").as_bytes()), 2))
        .collect();
    assert_eq!(lanes.len(), 2, "the keys reach both workers");
    let one = window_results(1, &events).await;
    let two = window_results(2, &events).await;
    assert_eq!(one, two);
    let counted: f64 = two
        .iter()
        .map(|(_, v)| {
            let window: serde_json::Value = serde_json::from_str(v).expect("JSON");
            window["count"].as_f64().expect("a count")
        })
        .sum();
    assert_eq!(counted, 300.0, "every event folded once");
}
