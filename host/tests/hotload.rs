//! Hot load end to end: plugin versions deployed into a running `weir serve` while producers
//! stream, over real QUIC and the real admin endpoint, with real compiled plugins.
//!
//! One router serves every test of this binary ([`router`]), one pipeline per test; the restart
//! test starts its own, twice. Producers stream for a bounded count of batches while the
//! deploys run; each batch's events carry its number, so the sink's file tells whether every
//! event arrived exactly once and which version processed each batch. Every wait is bounded.

use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;
use stream::{BATCH, Streaming, WAIT, batch, batch_of, connect, within};
use weir::admin::client::{AdminClient, AdminError, DeployRequest};
use weir::admin::registry::Status;
use weir::admin::{DeployReport, Outcome};
use weir::config::Config;
use weir::server::Server;
use weir_client::{EncodedBatch, Producer};
use weir_format::{BatchBuilder, Event};

#[path = "common/shared.rs"]
mod shared;
#[path = "common/stream.rs"]
mod stream;

use shared::Router;

mod plugins {
    include!(concat!(env!("OUT_DIR"), "/plugin_paths.rs"));
}

/// The admin token of the test routers.
const TOKEN: &str = "hot-load-test-token";

fn wasm(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// Where the test routers' pipelines write, one file sink each.
fn config_text(data_dir: &Path) -> String {
    let mut text = format!(
        r#"
[listener]
listen = "127.0.0.1:0"
data_dir = "{}"

[auth]
anonymous = true

[admin]
listen = "127.0.0.1:0"
token = "{TOKEN}"
"#,
        data_dir.join("data").display()
    );
    let pipelines = [
        ("tags", plugins::VERSION_A, None),
        ("guarded", plugins::VERSION_A, None),
        ("busy", plugins::VERSION_A, None),
        ("built", plugins::VERSION_A, None),
        ("counts", plugins::TALLY_A, Some("tumbling:1s")),
        ("layout", plugins::TALLY_A, Some("tumbling:10s")),
    ];
    for (name, plugin, window) in pipelines {
        let window = window.map_or(String::new(), |w| format!("window = \"{w}\"\n"));
        text.push_str(&format!(
            r#"
[pipelines.{name}]
sinks = ["{name}"]

[[pipelines.{name}.stages]]
name = "stage"
path = "{plugin}"
{window}
[sinks.{name}]
type = "file"
path = "{}"
fsync = "never"
"#,
            data_dir.join(format!("{name}.jsonl")).display()
        ));
    }
    text
}

impl Router {
    fn admin(&self) -> AdminClient {
        AdminClient::new(&self.admin.to_string(), TOKEN).expect("an admin client")
    }

    /// Every event the sink of `pipeline` wrote, in order.
    fn written(&self, pipeline: &str) -> Vec<Event> {
        let path = self.dir.join(format!("{pipeline}.jsonl"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        text.lines()
            .map(|l| weir_format::json::parse_line(l, 0).expect("a JSON line"))
            .collect()
    }
}

/// The router every test of this binary shares, started on first use on a runtime of its own
/// (it outlives each test's runtime), and stopped with the process.
fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| shared::start("hot-load-router", config_text, WAIT))
}

fn request(pipeline: &str, path: &str, probation: u64) -> DeployRequest {
    DeployRequest {
        pipeline: pipeline.into(),
        stage: "stage".into(),
        name: Path::new(path)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        component: wasm(path),
        probation: Some(probation),
        drain: false,
        wait: WAIT,
    }
}

fn header(event: &Event, name: &str) -> String {
    String::from_utf8_lossy(event.header(name).unwrap_or_default()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_deploys_under_load_lose_nothing_duplicate_nothing_and_never_split_a_batch() {
    let r = router();
    let streaming = Streaming::start(r.addr, &r.fingerprint, "tags", 100).await;
    let admin = r.admin();
    let mut pauses = Vec::new();
    for i in 0..20 {
        let plugin = if i % 2 == 0 {
            plugins::VERSION_B
        } else {
            plugins::VERSION_A
        };
        let report: DeployReport = within("a deploy", admin.deploy(request("tags", plugin, 2)))
            .await
            .unwrap_or_else(|e| panic!("deploy {i}: {e}"));
        assert_eq!(
            (report.outcome.clone(), report.batches),
            (Outcome::Serving, 2),
            "deploy {i}: {report:?}"
        );
        pauses.push(report.pause_us);
    }
    let (producer, batches) = streaming.finish().await;

    let events = r.written("tags");
    assert_eq!(events.len() as u64, batches * BATCH, "every event once");
    let unique: BTreeSet<&[u8]> = events.iter().map(|e| e.value.as_slice()).collect();
    assert_eq!(unique.len(), events.len(), "no duplicate");
    let mut versions: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for e in &events {
        versions
            .entry(batch_of(e))
            .or_default()
            .insert(header(e, "version"));
    }
    assert_eq!(versions.len() as u64, batches);
    let split: Vec<_> = versions.iter().filter(|(_, v)| v.len() != 1).collect();
    assert!(split.is_empty(), "batches seen by two versions: {split:?}");
    let by_version = |v: &str| versions.values().filter(|s| s.contains(v)).count();
    assert!(by_version("a") > 0 && by_version("b") > 0);
    assert!(
        pauses.iter().all(|p| *p < 1e6),
        "a swap paused batches for a second: {pauses:?}"
    );
    producer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_under_load_keep_aggregate_windows_exactly() {
    let r = router();
    let streaming = Streaming::start(r.addr, &r.fingerprint, "counts", 100).await;
    let admin = r.admin();
    for i in 0..20 {
        let plugin = if i % 2 == 0 {
            plugins::TALLY_B
        } else {
            plugins::TALLY_A
        };
        let report = within("a deploy", admin.deploy(request("counts", plugin, 2)))
            .await
            .unwrap_or_else(|e| panic!("deploy {i}: {e}"));
        assert_eq!(report.outcome, Outcome::Serving, "deploy {i}: {report:?}");
    }
    let (producer, batches) = streaming.finish().await;
    // One event far ahead in event time closes every window of the stream.
    let mut closing = BatchBuilder::new();
    closing.push(&Event::new("1", (batches * BATCH) as i64 + 60_000).with_key("close"));
    producer
        .send_batch(
            0,
            &EncodedBatch::new(Bytes::from(closing.finish())).expect("a batch"),
        )
        .await
        .expect("queued");
    within("every ack", producer.flush()).await.expect("acked");

    // What a run without deploys gives: per key and one-second window, its events.
    let mut expected: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for n in 0..batches {
        for i in 0..BATCH {
            let t = (n * BATCH + i) as i64;
            *expected
                .entry((format!("k{}", i % 4), t / 1000 * 1000 + 1000))
                .or_default() += 1;
        }
    }
    let mut got: BTreeMap<(String, i64), u64> = BTreeMap::new();
    let mut versions = BTreeSet::new();
    for e in r.written("counts") {
        let key = String::from_utf8_lossy(e.key.as_deref().unwrap_or_default()).into_owned();
        let value = String::from_utf8_lossy(&e.value).into_owned();
        let count = value
            .strip_prefix("count=")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a window result, got {value}"));
        versions.insert(header(&e, "version"));
        assert!(
            got.insert((key, e.timestamp_ms + 1), count).is_none(),
            "a window twice"
        );
    }
    assert_eq!(got, expected, "window results as without deploys");
    assert_eq!(versions, BTreeSet::from(["a".to_owned(), "b".to_owned()]));
    producer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deploys_under_load_leave_the_old_version_serving_and_dead_letter_nothing() {
    let r = router();
    let streaming = Streaming::start(r.addr, &r.fingerprint, "guarded", 50).await;
    let admin = r.admin();
    let refused = |e: AdminError| match e {
        AdminError::Refused { status, message } => (status, message),
        other => panic!("expected a refusal, got {other}"),
    };

    // Not a component.
    let mut junk = request("guarded", plugins::VERSION_B, 5);
    junk.name = "junk".into();
    junk.component = b"this is not wasm".to_vec();
    let (status, message) = refused(admin.deploy(junk).await.expect_err("not a component"));
    assert_eq!(
        (status, message.as_str()),
        (
            422,
            "`guarded/stage`: plugin `junk`: not a wasm binary (no `\\0asm` header); the serving version is unchanged"
        )
    );
    // An init that refuses the stage's config: geo-enrich needs a `table`.
    let (status, message) = refused(
        admin
            .deploy(request("guarded", plugins::GEO_ENRICH, 5))
            .await
            .expect_err("init fails"),
    );
    assert_eq!(status, 422);
    assert!(
        message.starts_with("`guarded/stage`: plugin `geo_enrich` ")
            && message.contains("config: missing field `table`")
            && message.ends_with("; the serving version is unchanged"),
        "{message}"
    );
    // The wrong world.
    let (status, message) = refused(
        admin
            .deploy(request("guarded", plugins::IDENTITY, 5))
            .await
            .expect_err("a filter for an enrich stage"),
    );
    assert_eq!(status, 422);
    assert!(
        message.contains("export `enrich` of world `weir:plugin/enrich@0.1.0` not found"),
        "{message}"
    );

    // A version that traps on every event, through `weir deploy`: rolled back, exit code 1.
    let admin_addr = r.admin.to_string();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .args([
                "deploy",
                "guarded/stage",
                plugins::TRAP_ALWAYS,
                "--probation",
                "5",
            ])
            .args(["--admin", &admin_addr, "--token", TOKEN])
            .output()
    });
    let output = within("weir deploy", output)
        .await
        .expect("joined")
        .expect("weir deploy runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("guarded/stage: `trap_always` ")
            && stdout.contains("rolled back after 0 batches on probation"),
        "{stdout}"
    );
    assert!(
        stderr.contains("rolled back to ") && stderr.contains("trap-always traps on every event"),
        "{stderr}"
    );

    let (producer, batches) = streaming.finish().await;
    let events = r.written("guarded");
    assert_eq!(events.len() as u64, batches * BATCH, "every event once");
    assert!(
        events.iter().all(|e| header(e, "version") == "a"),
        "only version a served"
    );
    let dead = r.dir.join("data/dead-letters/guarded.jsonl");
    assert_eq!(
        std::fs::read_to_string(&dead).unwrap_or_default(),
        "",
        "nothing dead-lettered because of the bad versions"
    );

    let view = admin.plugins().await.expect("the plugins");
    let stage = view
        .stages
        .iter()
        .find(|s| s.pipeline == "guarded")
        .expect("guarded/stage");
    let trap = stage
        .versions
        .iter()
        .find(|v| v.name == "trap_always")
        .expect("the rolled-back version is kept");
    assert_eq!(trap.status, Status::RolledBack);
    assert!(
        trap.error
            .as_deref()
            .is_some_and(|e| e.contains("trap-always traps on every event")),
        "{trap:?}"
    );
    assert_eq!(trap.batches, 0, "it took no batch");
    let last = stage.last_error.as_ref().expect("the last error");
    assert!(
        last.message.contains("rolled back on probation"),
        "{last:?}"
    );
    producer.close().await.expect("close");
}

/// Runs `weir ARGS` against the shared router's admin endpoint; exit code, stdout, stderr.
async fn weir(args: &[&str]) -> (Option<i32>, String, String) {
    let r = router();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_weir"));
    command
        .args(args)
        .env("WEIR_ADMIN", r.admin.to_string())
        .env("WEIR_ADMIN_TOKEN", TOKEN)
        // A plugin directory is built into the plugins' shared target directory, where
        // host/build.rs built it already: nothing to compile.
        .env(
            "CARGO_TARGET_DIR",
            Path::new(plugins::VERSION_B)
                .ancestors()
                .nth(3)
                .expect("<target>/plugins/wasm32-wasip2/release/x.wasm"),
        );
    let output = tokio::task::spawn_blocking(move || command.output());
    let output = within("weir", output)
        .await
        .expect("joined")
        .expect("weir runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_deploy_takes_a_plugin_directory_and_weir_rollback_puts_the_version_back() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/version-b");
    let (code, stdout, stderr) = weir(&[
        "deploy",
        "built/stage",
        &crate_dir.display().to_string(),
        "--probation",
        "0",
    ])
    .await;
    let b = weir::runtime::Digest::of(&wasm(plugins::VERSION_B)).short();
    let a = weir::runtime::Digest::of(&wasm(plugins::VERSION_A)).short();
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.starts_with(&format!("built/stage: `version_b` {b} serves (was {a}): ")),
        "{stdout}"
    );
    let (code, listing, stderr) = weir(&["plugins"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let block: Vec<&str> = listing
        .lines()
        .skip_while(|l| !l.starts_with("built/stage "))
        .take(3)
        .collect();
    assert_eq!(
        block[0],
        format!("built/stage (enrich): serving {b}"),
        "{listing}"
    );
    assert!(
        block[1].starts_with(&format!(
            "  {a} version_a      kept         config deployed "
        )) && block[2].starts_with(&format!(
            "  {b} version_b      serving      deploy deployed "
        )),
        "{listing}"
    );
    let (code, stdout, stderr) = weir(&["rollback", "built/stage"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.starts_with(&format!("built/stage: `version_a` {a} serves (was {b}): ")),
        "{stdout}"
    );
    let (code, _, stderr) = weir(&["rollback", "built/stage", "zz"]).await;
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("`built/stage` keeps no version `zz`"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_refuses_what_it_cannot_do_by_name() {
    let r = router();
    let refused = |e: AdminError| match e {
        AdminError::Refused { status, message } => (status, message),
        other => panic!("expected a refusal, got {other}"),
    };
    let wrong = AdminClient::new(&r.admin.to_string(), "nope").expect("a client");
    assert_eq!(
        refused(wrong.plugins().await.expect_err("a wrong token")),
        (401, "admin: wrong token".to_owned())
    );
    let admin = r.admin();
    let mut unknown = request("nope", plugins::VERSION_B, 0);
    assert_eq!(
        refused(
            admin
                .deploy(unknown.clone())
                .await
                .expect_err("no such pipeline")
        ),
        (
            404,
            "unknown pipeline `nope` (pipelines: `built`, `busy`, `counts`, `guarded`, `layout`, `tags`)"
                .to_owned()
        )
    );
    unknown.pipeline = "busy".into();
    unknown.stage = "nope".into();
    assert_eq!(
        refused(admin.deploy(unknown).await.expect_err("no such stage")),
        (
            404,
            "pipeline `busy` has no stage `nope` (stages: `stage`)".to_owned()
        )
    );
    let unreachable = AdminClient::new("127.0.0.1:9", TOKEN).expect("a client");
    let e = unreachable
        .plugins()
        .await
        .expect_err("nothing listens there");
    assert!(
        e.to_string()
            .starts_with("cannot reach the admin endpoint at 127.0.0.1:9: "),
        "{e}"
    );

    // No traffic on `busy`: a deploy with a probation stays on it, and holds the stage.
    let mut first = request("busy", plugins::VERSION_B, 1_000);
    first.wait = Duration::from_millis(50);
    let report = admin.deploy(first).await.expect("swapped in");
    assert_eq!(report.outcome, Outcome::Probation);
    let (status, message) = refused(
        admin
            .deploy(request("busy", plugins::VERSION_A, 0))
            .await
            .expect_err("a second deploy at once"),
    );
    assert_eq!(status, 409);
    assert_eq!(
        message,
        format!(
            "a deploy to `busy/stage` is in progress (version {} on probation); try again when it is done",
            report.version
        )
    );
    let (status, _) = refused(
        admin
            .rollback("busy", "stage", None)
            .await
            .expect_err("a rollback at once"),
    );
    assert_eq!(status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_state_layout_is_refused_or_drained_as_the_deploy_says() {
    let r = router();
    let producer = connect(r.addr, &r.fingerprint, "layout", "layout").await;
    let send = |events: Vec<Event>| {
        let mut b = BatchBuilder::new();
        for e in &events {
            b.push(e);
        }
        EncodedBatch::new(Bytes::from(b.finish())).expect("a batch")
    };
    let at = |ms: i64| Event::new("1", ms).with_key("a");
    // Window [0, 10 s) of key a opens under tally-a.
    producer
        .send_batch(0, &send((0..100).map(|i| at(1_000 + i)).collect()))
        .await
        .expect("queued");
    within("the ack", producer.flush()).await.expect("acked");
    let admin = r.admin();
    let e = admin
        .deploy(request("layout", plugins::TALLY_WIDE, 5))
        .await
        .expect_err("another layout");
    let AdminError::Refused { status, message } = e else {
        panic!("expected a refusal, got {e}");
    };
    assert_eq!(status, 422);
    assert!(
        message.contains("declares state layout `auto:")
            && message.contains("but the 1 open windows hold accumulators of layout `auto:")
            && message.contains("deploy it with `--state drain`"),
        "{message}"
    );
    let mut drain = request("layout", plugins::TALLY_WIDE, 5);
    drain.drain = true;
    let report = admin.deploy(drain).await.expect("drained");
    assert_eq!(
        (report.outcome, report.draining_windows, report.probation),
        (Outcome::Serving, 1, 0)
    );
    // 5 s: tally-a's window; 12 s: a new one, tally-wide's, which also closes [0, 10 s);
    // 35 s closes [10 s, 20 s).
    for batch in [vec![at(5_000), at(12_000)], vec![at(35_000)]] {
        producer.send_batch(0, &send(batch)).await.expect("queued");
    }
    within("the acks", producer.flush()).await.expect("acked");
    let results: Vec<(i64, String, String)> = r
        .written("layout")
        .iter()
        .map(|e| {
            (
                e.timestamp_ms + 1,
                String::from_utf8_lossy(&e.value).into_owned(),
                header(e, "version"),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            (10_000, "count=101".into(), "a".into()),
            (20_000, "count=1".into(), "wide".into()),
        ]
    );
    producer.close().await.expect("close");
}

/// The config of a router of its own: pipeline `tags` whose stage runs `plugin` with `with`
/// (TOML, maybe empty), into `out.jsonl`.
fn solo_config(plugin: &str, with: &str) -> String {
    format!(
        r#"
[listener]
listen = "127.0.0.1:0"
data_dir = "data"

[auth]
anonymous = true

[admin]
listen = "127.0.0.1:0"
token = "{TOKEN}"

[pipelines.tags]
sinks = ["out"]

[[pipelines.tags.stages]]
name = "stage"
path = "{plugin}"
{with}

[sinks.out]
type = "file"
path = "out.jsonl"
"#
    )
}

async fn start_solo(dir: &Path, text: &str) -> Server {
    let config = Config::parse(text, dir.join("weir.toml")).expect("a config");
    within("the router to start", Server::start(config))
        .await
        .expect("starts")
}

/// Deploys `path` to `tags/stage` of `server` with a probation of one batch, sends that batch
/// through `producer`, and waits until the registry says the version serves.
async fn deploy_and_pass(server: &Server, producer: &Producer, path: &str) -> DeployReport {
    let admin = AdminClient::new(&server.admin_addr().expect("admin").to_string(), TOKEN)
        .expect("a client");
    let mut deploy = request("tags", path, 1);
    deploy.wait = Duration::from_millis(1);
    let report = admin.deploy(deploy).await.expect("deployed");
    producer.send_batch(0, &batch(0, 0)).await.expect("queued");
    within("the ack", producer.flush()).await.expect("acked");
    within("the verdict", async {
        loop {
            let view = admin.plugins().await.expect("plugins");
            if view.stages[0].serving == report.version {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployed_version_that_no_longer_starts_gives_way_to_the_configs_plugin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = r#"with = { table = { FR = "France" } }"#;
    let server = start_solo(dir.path(), &solo_config(plugins::VERSION_A, table)).await;
    let producer = connect(server.local_addr(), &server.fingerprint(), "r", "tags").await;
    // geo-enrich starts with the stage's `with` values as they are: it needs the table.
    deploy_and_pass(&server, &producer, plugins::GEO_ENRICH).await;
    producer.close().await.expect("close");
    server.shutdown().await.expect("stops");

    // The table is gone from the config: the deployed geo-enrich refuses to start, the
    // config's version-a serves, and the router starts.
    let server = start_solo(dir.path(), &solo_config(plugins::VERSION_A, "")).await;
    let described = &server.pipelines()[0].stages[0];
    let a = weir::runtime::Digest::of(&wasm(plugins::VERSION_A)).short();
    assert!(
        described.starts_with(&format!("stage (enrich {} {a}, ", plugins::VERSION_A)),
        "{described}"
    );
    // The registry says so: what serves, and why.
    let admin = AdminClient::new(&server.admin_addr().expect("admin").to_string(), TOKEN)
        .expect("a client");
    let view = admin.plugins().await.expect("plugins");
    assert_eq!(view.stages[0].serving, a);
    let last = view.stages[0].last_error.as_ref().expect("the last error");
    assert!(
        last.message
            .contains("did not start at a restart, so the config's plugin serves")
            && last.message.contains("missing field `table`"),
        "{last:?}"
    );
    server.shutdown().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_serves_the_deployed_version_from_the_compile_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = solo_config(plugins::VERSION_A, "");
    let server = start_solo(dir.path(), &text).await;
    assert!(
        server.pipelines()[0].stages[0].ends_with(", compiled)"),
        "{:?}",
        server.pipelines()
    );
    let producer = connect(server.local_addr(), &server.fingerprint(), "r", "tags").await;
    let report = deploy_and_pass(&server, &producer, plugins::VERSION_B).await;
    producer.close().await.expect("close");
    let stopped = server.shutdown().await.expect("stops");
    assert_eq!(stopped.problems, Vec::<String>::new());

    let server = start_solo(dir.path(), &text).await;
    let described = &server.pipelines()[0].stages[0];
    assert!(
        described.starts_with(&format!(
            "stage (enrich `version_b`, deployed; the config names {} {}",
            plugins::VERSION_A,
            report.version
        )) && described.ends_with(", from the compile cache)"),
        "{described}"
    );
    let producer = connect(server.local_addr(), &server.fingerprint(), "r", "tags").await;
    producer.send_batch(0, &batch(1, 0)).await.expect("queued");
    within("the ack", producer.flush()).await.expect("acked");
    producer.close().await.expect("close");
    server.shutdown().await.expect("stops");
    let text = std::fs::read_to_string(dir.path().join("out.jsonl")).expect("the sink's file");
    let versions: Vec<(u64, String)> = text
        .lines()
        .map(|l| weir_format::json::parse_line(l, 0).expect("a line"))
        .map(|e| (batch_of(&e), header(&e, "version")))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(versions, [(0, "b".to_owned()), (1, "b".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_the_serving_version_cannot_read_stops_the_start_and_says_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let original = solo_config(plugins::TALLY_A, "window = \"tumbling:10s\"");
    let server = start_solo(dir.path(), &original).await;
    let producer = connect(server.local_addr(), &server.fingerprint(), "r", "tags").await;
    producer.send_batch(0, &batch(0, 0)).await.expect("queued");
    within("the ack", producer.flush()).await.expect("acked");
    producer.close().await.expect("close");
    let stopped = server.shutdown().await.expect("stops");
    assert_eq!(stopped.problems, Vec::<String>::new());
    // The windows stay open in the checkpoint; the config now names a plugin with another
    // accumulator layout.
    let edited = solo_config(plugins::TALLY_WIDE, "window = \"tumbling:10s\"");
    let config = Config::parse(&edited, dir.path().join("weir.toml")).expect("a config");
    let error = within("the start", Server::start(config))
        .await
        .expect_err("refused");
    let text = format!("{error:#}");
    let path = dir.path().join("data/checkpoints.redb");
    assert!(
        text.starts_with(&format!(
            "pipeline `tags`, stage `stage`: the checkpoint {} holds 4 open windows written by version ",
            path.display()
        )) && text.contains(" in state layout `auto:")
            && text.contains("`, and the version serving now (tally_wide ")
            && text.ends_with(&format!(
                "which cannot read them: name a version that writes `{}` in the config, or move {} away to drop every open window",
                text.split("in state layout `").nth(1).and_then(|r| r.split('`').next()).unwrap_or_default(),
                path.display()
            )),
        "{text}"
    );
    // Back to the plugin that wrote them: it starts, with its windows.
    let server = start_solo(dir.path(), &original).await;
    server.shutdown().await.expect("stops");
}
