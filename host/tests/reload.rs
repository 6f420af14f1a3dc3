//! Config reloads of a running router while producers stream: what each sink receives,
//! exactly, across every kind of change; what a reload refuses and why.
//!
//! The router runs in this process (`Server::start`); the config file is rewritten and
//! `Server::reload` applied, as SIGHUP, a saved file or `weir reload` would (those three are
//! driven through the `weir` binary in `restart.rs`). Events carry a country code; geo-enrich
//! tags the ones its table knows with a `country` header and a route, so that routes and
//! `with` values show in every event a sink writes.

#[path = "common/stream.rs"]
mod stream;

use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use stream::{BATCH, Streaming, within};
use weir::admin::{Outcome, ReloadError};
use weir::config::Config;
use weir::server::Server;
use weir_client::EncodedBatch;
use weir_format::{BatchBuilder, Event};

/// The country code of event `i` of a batch.
const CODES: [&str; 4] = ["FR", "DE", "US", "JP"];

/// Batch `n` for `clicks`: [`BATCH`] events `{"country_code": C, "id": "bN-eI"}`.
fn click_batch(n: u64) -> EncodedBatch {
    let mut b = BatchBuilder::new();
    for i in 0..BATCH {
        let value = format!(
            r#"{{"country_code":"{}","id":"b{n}-e{i}"}}"#,
            CODES[i as usize % CODES.len()]
        );
        b.push(&Event::new(value, (n * BATCH + i) as i64));
    }
    EncodedBatch::new(Bytes::from(b.finish())).expect("a batch")
}

/// One event a sink wrote: its id, country code, and the header and route geo-enrich gave it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Written {
    batch: u64,
    id: String,
    code: String,
    country: Option<String>,
    route: Option<String>,
}

/// The router under test and its directory.
struct Router {
    server: Option<Server>,
    dir: PathBuf,
}

impl Router {
    fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("weir.toml")
    }

    /// Writes `text` as the config file and reloads it.
    async fn reload(&self, text: &str) -> Result<weir::admin::ReloadReport, ReloadError> {
        std::fs::write(self.config_path(), text).expect("write the config");
        within("the reload", self.server().reload()).await
    }

    /// Everything sink file `name` holds.
    fn written(&self, name: &str) -> Vec<Written> {
        let text =
            std::fs::read_to_string(self.dir.join(format!("{name}.jsonl"))).unwrap_or_default();
        text.lines()
            .map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
                let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
                let id = text(&v["value"]["id"])
                    .or_else(|| text(&v["value"]))
                    .expect("an id");
                let batch = id
                    .trim_start_matches('"')
                    .trim_start_matches('b')
                    .split('-')
                    .next()
                    .and_then(|b| b.parse().ok())
                    .expect("a batch number");
                Written {
                    batch,
                    id,
                    code: text(&v["value"]["country_code"]).unwrap_or_default(),
                    country: text(&v["headers"]["country"]),
                    route: text(&v["route"]),
                }
            })
            .collect()
    }
}

/// The config of the scenario: `steady` (never touched) and `clicks` (geo-enrich, with
/// `table`, into `clicks_sinks`), plus `extra` text (sinks, pipelines).
fn config(dir: &Path, table: &str, clicks_sinks: &str, extra: &str) -> String {
    format!(
        r#"
[listener]
listen = "127.0.0.1:0"
data_dir = "{data}"

[auth]
anonymous = true

[pipelines.steady]
sinks = ["steady"]

[pipelines.clicks]
sinks = [{clicks_sinks}]

[[pipelines.clicks.stages]]
plugin = "example:geo-enrich"
with = {{ table = {{ {table} }} }}

[sinks.steady]
type = "file"
path = "steady.jsonl"
fsync = "never"

[sinks.all]
type = "file"
path = "all.jsonl"
fsync = "never"
{extra}
"#,
        data = dir.join("data").display()
    )
}

const EU: &str = "\n[sinks.eu]\ntype = \"file\"\npath = \"eu.jsonl\"\nfsync = \"never\"\n";
const ARCHIVE: &str =
    "\n[sinks.archive]\ntype = \"file\"\npath = \"archive.jsonl\"\nfsync = \"never\"\n";
const EXTRA: &str = "\n[pipelines.extra]\nsinks = [\"extra\"]\n\n[sinks.extra]\ntype = \"file\"\npath = \"extra.jsonl\"\nfsync = \"never\"\n";
const FR_DE: &str = "FR = \"France\", DE = \"Germany\"";
const FR_DE_US: &str = "FR = \"France\", DE = \"Germany\", US = \"United States\"";

/// Waits until `streaming` has `more` batches acked beyond now.
async fn progress(streaming: &Streaming, more: u64) {
    let target = streaming.producer.stats().batches_acked + more;
    within("the stream to go on", async {
        while streaming.producer.stats().batches_acked < target {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
}

/// The batches of `written`, each with its events.
fn by_batch(written: &[Written]) -> BTreeMap<u64, Vec<&Written>> {
    let mut batches: BTreeMap<u64, Vec<&Written>> = BTreeMap::new();
    for w in written {
        batches.entry(w.batch).or_default().push(w);
    }
    batches
}

/// Asserts every event of `written` is there once, and returns the batches it holds.
fn once(what: &str, written: &[Written]) -> BTreeSet<u64> {
    let ids: BTreeSet<&str> = written.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids.len(), written.len(), "{what}: an event written twice");
    written.iter().map(|w| w.batch).collect()
}

/// The first batch of `batches` (in order) for which `after` holds; asserts that it holds for
/// every later batch and for no earlier one: the change took effect between two batches.
fn switch(
    what: &str,
    batches: &BTreeMap<u64, Vec<&Written>>,
    after: impl Fn(&[&Written]) -> bool,
) -> u64 {
    let mut first = None;
    for (n, events) in batches {
        let is_after = after(events);
        match first {
            None if is_after => first = Some(*n),
            Some(k) if !is_after => panic!("{what}: batch {n} is as before, batch {k} was not"),
            _ => {}
        }
    }
    first.unwrap_or_else(|| panic!("{what}: never took effect"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_change_under_load_keeps_every_sink_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let route = |tags: &str| format!("\"all\", {{ sink = \"eu\", route = [{tags}] }}");
    let text = config(&root, FR_DE, &route("\"fr\""), EU);
    std::fs::write(root.join("weir.toml"), &text).expect("write the config");
    let server = Server::start(Config::load(root.join("weir.toml")).expect("a config"))
        .await
        .expect("the router starts");
    let mut r = Router {
        server: Some(server),
        dir: root.clone(),
    };
    let (addr, fp) = (r.server().local_addr(), r.server().fingerprint());
    let steady = Streaming::start(addr, &fp, "steady", 200).await;
    let clicks = Streaming::start_with(addr, &fp, "clicks", 200, click_batch).await;
    // Acks of the untouched pipeline, timed: its sink must never pause.
    let (gap_tx, gaps) = tokio::sync::watch::channel(Duration::ZERO);
    let watcher = {
        let producer = steady.producer.clone();
        tokio::spawn(async move {
            let (mut last, mut at, mut worst) = (0, Instant::now(), Duration::ZERO);
            loop {
                let acked = producer.stats().batches_acked;
                if acked != last {
                    worst = worst.max(at.elapsed());
                    gap_tx.send_replace(worst);
                    (last, at) = (acked, Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    progress(&clicks, 20).await;
    let normal = *gaps.borrow();

    // 1. A sink added.
    let report = r
        .reload(&config(
            &root,
            FR_DE,
            &format!("{}, \"archive\"", route("\"fr\"")),
            &format!("{EU}{ARCHIVE}"),
        ))
        .await
        .expect("reloaded");
    assert_eq!(
        report.changes,
        ["sink `archive`: added", "pipeline `clicks`: new outputs"]
    );
    progress(&clicks, 20).await;

    // 2. A route changed.
    let report = r
        .reload(&config(
            &root,
            FR_DE,
            &format!("{}, \"archive\"", route("\"fr\", \"de\"")),
            &format!("{EU}{ARCHIVE}"),
        ))
        .await
        .expect("reloaded");
    assert_eq!(report.changes, ["pipeline `clicks`: new outputs"]);
    progress(&clicks, 20).await;

    // 3. A stage's `with` values changed: a swap, the version the same.
    let report = r
        .reload(&config(
            &root,
            FR_DE_US,
            &format!("{}, \"archive\"", route("\"fr\", \"de\"")),
            &format!("{EU}{ARCHIVE}"),
        ))
        .await
        .expect("reloaded");
    assert_eq!(
        report.changes,
        ["pipeline `clicks`: stage `geo-enrich` swapped (with)"]
    );
    assert_eq!(report.swaps.len(), 1);
    assert_eq!(report.swaps[0].version, report.swaps[0].previous);
    assert_ne!(report.swaps[0].outcome, Outcome::RolledBack);
    progress(&clicks, 20).await;

    // 4. A sink removed.
    let report = r
        .reload(&config(&root, FR_DE_US, "\"all\", \"archive\"", ARCHIVE))
        .await
        .expect("reloaded");
    assert_eq!(
        report.changes,
        ["sink `eu`: removed", "pipeline `clicks`: new outputs"]
    );
    assert_eq!(
        report.drained,
        ["sink `eu`: delivered what it held and closed"]
    );
    progress(&clicks, 20).await;

    // 5. A pipeline added, streamed into, and removed.
    let with_extra = config(
        &root,
        FR_DE_US,
        "\"all\", \"archive\"",
        &format!("{ARCHIVE}{EXTRA}"),
    );
    let report = r.reload(&with_extra).await.expect("reloaded");
    assert_eq!(
        report.changes,
        ["sink `extra`: added", "pipeline `extra`: added"]
    );
    let extra = Streaming::start(addr, &fp, "extra", 30).await;
    let (extra_producer, extra_sent) = extra.finish().await;
    let report = r
        .reload(&config(&root, FR_DE_US, "\"all\", \"archive\"", ARCHIVE))
        .await
        .expect("reloaded");
    assert_eq!(
        report.changes,
        ["sink `extra`: removed", "pipeline `extra`: removed"]
    );
    let refused = extra_producer
        .send_batch(0, &stream::batch(extra_sent, 0))
        .await
        .expect("queued")
        .await
        .expect_err("the pipeline is gone");
    assert!(
        refused
            .to_string()
            .contains("UNKNOWN_PIPELINE (0x05): pipeline `extra` was removed by a config reload"),
        "{refused}"
    );
    progress(&clicks, 20).await;

    // 6. An invalid config: refused, naming the file, line and problem; the old one serves.
    let broken = config(
        &root,
        FR_DE_US,
        "\"all\", \"archive\", \"nowhere\"",
        ARCHIVE,
    );
    let error = r.reload(&broken).await.expect_err("refused");
    let line = broken
        .lines()
        .position(|l| l.contains("\"nowhere\""))
        .expect("the line")
        + 1;
    assert_eq!(
        error.to_string(),
        format!(
            "{}:{line}:28: pipeline `clicks`: unknown sink `nowhere` (configured sinks: `steady`, `all`, `archive`)",
            r.config_path().display()
        )
    );
    progress(&clicks, 20).await;
    let during = *gaps.borrow();

    let (_, clicks_sent) = clicks.finish().await;
    let (_, steady_sent) = steady.finish().await;
    watcher.abort();
    let server = r.server.take().expect("running");
    let report = server.shutdown().await.expect("stopped");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    println!(
        "the untouched pipeline's longest wait between two acks: {} ms before the reloads, {} ms across them",
        normal.as_millis(),
        during.as_millis()
    );
    assert!(
        during < Duration::from_secs(2),
        "the untouched pipeline paused for {during:?}"
    );

    // Every event of the untouched pipeline, once.
    let steady_batches = once("steady", &r.written("steady"));
    assert_eq!(steady_batches, (0..steady_sent).collect());
    assert_eq!(r.written("steady").len() as u64, steady_sent * BATCH);
    // `all`: every click, once, each batch tagged by one `with` table: US names from a batch on.
    let all = r.written("all");
    assert_eq!(once("all", &all), (0..clicks_sent).collect());
    assert_eq!(all.len() as u64, clicks_sent * BATCH);
    let all_batches = by_batch(&all);
    let us_named = switch("the new `with` values", &all_batches, |events| {
        events.iter().filter(|e| e.code == "US").all(|e| {
            e.country.as_deref() == Some("United States") && e.route.as_deref() == Some("us")
        })
    });
    // `archive`: from the batch it was added at, every batch whole.
    let archive = r.written("archive");
    let archived = once("archive", &archive);
    let first = *archived.first().expect("archived");
    assert_eq!(archived, (first..clicks_sent).collect());
    assert_eq!(archive.len() as u64, (clicks_sent - first) * BATCH);
    // `eu`: from the start to its removal; FR only, then FR and DE, switching between batches.
    let eu = r.written("eu");
    let eu_batches = by_batch(&eu);
    let kept = once("eu", &eu);
    let last = *kept.last().expect("eu got events");
    assert_eq!(kept, (0..=last).collect());
    let de = switch("the new route", &eu_batches, |events| {
        events.iter().any(|e| e.code == "DE")
    });
    for (n, events) in &eu_batches {
        let codes: BTreeSet<&str> = events.iter().map(|e| e.code.as_str()).collect();
        let expected: BTreeSet<&str> = if *n < de {
            ["FR"].into()
        } else {
            ["FR", "DE"].into()
        };
        assert_eq!(codes, expected, "eu, batch {n}");
        assert_eq!(
            events.len() as u64,
            BATCH / 4 * expected.len() as u64,
            "eu, batch {n}"
        );
    }
    assert!(
        first < de && de < us_named && us_named <= last + 1,
        "{first} {de} {us_named} {last}"
    );
    // `extra`: everything sent while it lived.
    assert_eq!(
        once("extra", &r.written("extra")),
        (0..extra_sent).collect()
    );
}

/// Starts a router on `text` in `dir`.
async fn start(dir: &Path, text: &str) -> Router {
    std::fs::write(dir.join("weir.toml"), text).expect("write the config");
    let server = Server::start(Config::load(dir.join("weir.toml")).expect("a config"))
        .await
        .expect("the router starts");
    Router {
        server: Some(server),
        dir: dir.to_path_buf(),
    }
}

/// A router with one pipeline, `clicks`, whose stages and sinks are given.
fn small(dir: &Path, stages: &str, sinks: &str) -> String {
    format!(
        r#"
[listener]
listen = "127.0.0.1:0"
data_dir = "{data}"

[auth]
anonymous = true

[admin]
listen = "127.0.0.1:0"
token = "reload-test"

[pipelines.clicks]
sinks = ["out"]
{stages}
{sinks}
"#,
        data = dir.join("data").display()
    )
}

const GEO: &str = "\n[[pipelines.clicks.stages]]\nplugin = \"example:geo-enrich\"\nwith = { table = { FR = \"France\" } }\n";
const BOTS: &str = "\n[[pipelines.clicks.stages]]\nplugin = \"example:drop-bots\"\n";

fn out(path: &str, when_full: &str) -> String {
    format!(
        "\n[sinks.out]\ntype = \"file\"\npath = \"{path}\"\nfsync = \"never\"\nwhen_full = \"{when_full}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_pipeline_and_a_changed_sink_lose_and_repeat_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let mut r = start(root, &small(root, GEO, &out("out.jsonl", "block"))).await;
    let (addr, fp) = (r.server().local_addr(), r.server().fingerprint());
    let clicks = Streaming::start_with(addr, &fp, "clicks", 150, click_batch).await;
    progress(&clicks, 20).await;

    // A stage added in front: the pipeline restarts; the old one finishes what it took.
    let report = r
        .reload(&small(
            root,
            &format!("{BOTS}{GEO}"),
            &out("out.jsonl", "block"),
        ))
        .await
        .expect("reloaded");
    assert_eq!(
        report.changes,
        ["pipeline `clicks`: restarted (stages geo-enrich → drop-bots, geo-enrich)"]
    );
    progress(&clicks, 20).await;

    // The sink writes elsewhere from now on: changed in place, nothing buffered is lost.
    let report = r
        .reload(&small(
            root,
            &format!("{BOTS}{GEO}"),
            &out("moved.jsonl", "block"),
        ))
        .await
        .expect("reloaded");
    assert_eq!(
        report.changes,
        ["sink `out`: changed in place (its buffer carries over)"]
    );
    progress(&clicks, 20).await;

    // Another policy: replaced; the old one delivers what it holds.
    let report = r
        .reload(&small(
            root,
            &format!("{BOTS}{GEO}"),
            &out("spilled.jsonl", "spill"),
        ))
        .await
        .expect("reloaded");
    assert_eq!(
        report.changes,
        [
            "sink `out`: replaced (another when_full; the old one delivers what it holds)",
            "pipeline `clicks`: new outputs"
        ]
    );
    assert_eq!(
        report.drained,
        ["sink `out`: delivered what it held and closed"]
    );
    progress(&clicks, 20).await;

    let (_, sent) = clicks.finish().await;
    let server = r.server.take().expect("running");
    let stopped = server.shutdown().await.expect("stopped");
    assert!(stopped.problems.is_empty(), "{:?}", stopped.problems);
    // Across the three files, every event once, in batch order: each file holds a run of
    // whole batches, one after the other.
    let mut next = 0;
    for file in ["out", "moved", "spilled"] {
        let written = r.written(file);
        let batches = once(file, &written);
        assert!(!batches.is_empty(), "{file} got nothing");
        assert_eq!(
            batches,
            (next..next + batches.len() as u64).collect(),
            "{file}"
        );
        assert_eq!(written.len() as u64, batches.len() as u64 * BATCH, "{file}");
        let order: Vec<u64> = written.iter().map(|w| w.batch).collect();
        assert!(order.is_sorted(), "{file}: out of order");
        next += batches.len() as u64;
    }
    assert_eq!(next, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_cannot_be_built_is_refused_and_the_old_one_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let text = small(root, GEO, &out("out.jsonl", "block"));
    let r = start(root, &text).await;

    // An init that refuses the new `with` values.
    let error = r
        .reload(&small(
            root,
            &GEO.replace("{ FR = \"France\" }", "5"),
            &out("out.jsonl", "block"),
        ))
        .await
        .expect_err("refused");
    assert!(matches!(error, ReloadError::Refused(_)), "{error:?}");
    let text = error.to_string();
    assert!(
        text.starts_with("pipeline `clicks`, stage `geo-enrich`: plugin `geo-enrich` ")
            && text.ends_with(
                ": init refused the config: config: table: invalid type: integer `5`, expected a map"
            ),
        "{error}"
    );
    // A destination that cannot open.
    std::fs::write(root.join("afile"), "x").expect("write");
    let error = r
        .reload(&small(root, GEO, &out("afile/out.jsonl", "block")))
        .await
        .expect_err("refused");
    assert_eq!(
        error.to_string(),
        format!(
            "sink `out`: cannot open file {0}: creating its directory {1}: {1} is a file, not a directory",
            root.join("afile/out.jsonl").display(),
            root.join("afile").display()
        )
    );
    // A deploy on probation holds the stage: a reload that changes it waits its turn.
    let admin = weir::admin::client::AdminClient::new(
        &r.server().admin_addr().expect("admin").to_string(),
        "reload-test",
    )
    .expect("a client");
    let geo = weir::examples::ALL
        .iter()
        .find(|(name, _)| *name == "geo-enrich-v2")
        .expect("geo-enrich-v2")
        .1
        .to_vec();
    let deployed = admin
        .deploy(weir::admin::client::DeployRequest {
            pipeline: "clicks".into(),
            stage: "geo-enrich".into(),
            name: "geo-enrich-v2".into(),
            component: geo,
            probation: Some(1_000_000),
            drain: false,
            wait: Duration::ZERO,
        })
        .await
        .expect("deployed");
    assert_eq!(deployed.outcome, Outcome::Probation);
    let error = r
        .reload(&small(
            root,
            &GEO.replace("France", "la France"),
            &out("out.jsonl", "block"),
        ))
        .await
        .expect_err("busy");
    assert_eq!(
        error.to_string(),
        format!(
            "a deploy to `clicks/geo-enrich` is in progress (version {} on probation); try again when it is done",
            deployed.version
        )
    );
    assert!(matches!(error, ReloadError::Busy(_)));

    // The old config serves throughout.
    let (addr, fp) = (r.server().local_addr(), r.server().fingerprint());
    let clicks = Streaming::start_with(addr, &fp, "clicks", 10, click_batch).await;
    let (_, sent) = clicks.finish().await;
    assert_eq!(once("out", &r.written("out")), (0..sent).collect());
    let fr: Vec<Written> = r
        .written("out")
        .into_iter()
        .filter(|w| w.code == "FR")
        .collect();
    assert!(fr.iter().all(|w| w.country.as_deref() == Some("France")));
}
