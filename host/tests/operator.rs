//! An operator's live view, end to end: `weir top` driven in a real terminal (tmux: start it,
//! read the screen with capture-pane, quit with send-keys) and `weir tap` read as a pipe, both
//! the real binary against a router serving a known input over QUIC.
//!
//! One router serves every test of this binary ([`router`]), one pipeline per test (drop-bots,
//! then geo-enrich, into a file), so each test's counts are its own. Every wait is bounded.

use bytes::Bytes;
use std::future::IntoFuture;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use stream::{WAIT, connect, within};
use weir_client::EncodedBatch;
use weir_format::{BatchBuilder, Event};

#[path = "common/shared.rs"]
mod shared;
#[path = "common/stream.rs"]
mod stream;

use shared::Router;

const TOKEN: &str = "operator-test-token";
/// Events of the known input; every tenth is a bot's.
const EVENTS: u64 = 200;
const BOTS: u64 = EVENTS / 10;

fn config_text(dir: &Path) -> String {
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
        dir.join("data").display()
    );
    for pipeline in ["shown", "tapped"] {
        text.push_str(&format!(
            r#"
[pipelines.{pipeline}]
sinks = ["{pipeline}-file"]

[[pipelines.{pipeline}.stages]]
plugin = "example:drop-bots"

[[pipelines.{pipeline}.stages]]
plugin = "example:geo-enrich"
with = {{ table = {{ US = "United States", FR = "France" }} }}

[sinks.{pipeline}-file]
type = "file"
path = "{}"
"#,
            dir.join(format!("{pipeline}.jsonl")).display()
        ));
    }
    text
}

/// The router every test of this binary shares, on a runtime of its own.
fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| shared::start("operator-router", config_text, WAIT))
}

/// Event `i` of the known input: a bot's every tenth, countries US, FR and XX (not in the
/// table) in turn.
fn event(i: u64) -> Event {
    let country = ["US", "FR", "XX"][(i % 3) as usize];
    let agent = if i.is_multiple_of(10) {
        "Googlebot/2.1"
    } else {
        "Mozilla/5.0"
    };
    Event::new(
        format!("{{\"country_code\":\"{country}\",\"n\":{i}}}"),
        1_000 + i as i64,
    )
    .with_key(format!("user-{}", i % 7))
    .with_header("user-agent", agent)
}

/// Streams the known input into `pipeline` in batches of 50 and waits for every ack.
async fn stream_known_input(router: &Router, pipeline: &str) {
    let producer = connect(router.addr, &router.fingerprint, pipeline, pipeline).await;
    for first in (0..EVENTS).step_by(50) {
        let mut b = BatchBuilder::new();
        for i in first..first + 50 {
            b.push(&event(i));
        }
        let batch = EncodedBatch::new(Bytes::from(b.finish())).expect("a batch");
        let ack = producer.send_batch(0, &batch).await.expect("sent");
        within("an ack", ack.into_future()).await.expect("acked");
    }
    producer.close().await.expect("closed");
}

fn weir() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
    command
        .env("WEIR_ADMIN_TOKEN", TOKEN)
        .env_remove("WEIR_ADMIN");
    command
}

fn tmux(args: &[&str]) -> std::process::Output {
    Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux runs (.ci/run installs it)")
}

/// The screen's rows as words, the first word of each being its name.
fn row<'s>(screen: &'s str, name: &str) -> Option<Vec<&'s str>> {
    screen
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|words| words.first() == Some(&name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_top_in_a_terminal_shows_the_counts_of_a_known_run_and_quits_on_q() {
    let router = router();
    let session = format!("weir-top-{}", std::process::id());
    let exit_file = router.dir.join("top.exit");
    let command = format!(
        "WEIR_ADMIN_TOKEN={TOKEN} {} top --admin {} --every 200; echo $? > {}",
        env!("CARGO_BIN_EXE_weir"),
        router.admin,
        exit_file.display()
    );
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "200",
        "-y",
        "40",
        &command,
    ]);
    assert!(started.status.success(), "tmux: {started:?}");
    // The screen once the sink's row shows `delivered`.
    let screen_with = async |delivered: u64| {
        let delivered = delivered.to_string();
        let deadline = Instant::now() + WAIT;
        loop {
            let captured = tmux(&["capture-pane", "-p", "-t", &session]);
            let screen = String::from_utf8_lossy(&captured.stdout).into_owned();
            if row(&screen, "shown-file").is_some_and(|r| r.get(2) == Some(&delivered.as_str())) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "weir top never showed {delivered} delivered; the screen:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // Started before the run, it follows it live.
    screen_with(0).await;
    stream_known_input(router, "shown").await;
    let screen = screen_with(EVENTS - BOTS).await;
    // PIPELINE/STAGE  IN/s  OUT/s  IN  OUT  DROPPED  DEAD  KIND  VERSION  DEPLOYED…
    let pipeline = row(&screen, "shown").expect("the pipeline's row");
    assert_eq!(
        pipeline[3..7],
        ["200", "180", "-", "0"],
        "screen:\n{screen}"
    );
    let filter = row(&screen, "drop-bots").expect("the filter's row");
    assert_eq!(
        filter[3..8],
        ["200", "180", "20", "0", "filter"],
        "screen:\n{screen}"
    );
    assert_eq!(filter[8].len(), 8, "a version: screen:\n{screen}");
    let enrich = row(&screen, "geo-enrich").expect("the enrich's row");
    assert_eq!(
        enrich[3..8],
        ["180", "180", "0", "0", "enrich"],
        "screen:\n{screen}"
    );
    // SINK  OUT/s  DELIVERED  BUFFERED (FILL)  DROPPED  DEAD  ERRORS  DESTINATION
    let sink = row(&screen, "shown-file").expect("the sink's row");
    assert_eq!(
        sink[2..7],
        ["180", "0", "(0%)", "0", "0"],
        "screen:\n{screen}"
    );
    assert!(
        screen.contains("last reload: none since the start"),
        "screen:\n{screen}"
    );
    // The other test's pipeline is on screen too; this one's counts are exact above.
    assert!(row(&screen, "tapped").is_some(), "screen:\n{screen}");

    tmux(&["send-keys", "-t", &session, "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exit_file.exists() {
        assert!(
            Instant::now() < deadline,
            "weir top did not quit on q within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let code = std::fs::read_to_string(&exit_file).expect("the exit code");
    assert_eq!(code.trim(), "0", "weir top's exit code");
    tmux(&["kill-session", "-t", &session]);
}

#[test]
fn weir_top_says_when_the_router_cannot_be_reached() {
    let output = weir()
        .args(["top", "--admin", "127.0.0.1:9", "--once"])
        .output()
        .expect("weir runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach the admin endpoint at 127.0.0.1:9")
            && stderr.contains("is the router running with an `[admin]` section listening there?"),
        "stderr: {stderr}"
    );
}

/// `weir tap TARGET` as a child, once it says it is tapping; its stdout lines.
fn tap(router: &Router, target: &str, limit: u64) -> std::process::Child {
    let mut child = weir()
        .args([
            "tap",
            target,
            "--admin",
            &router.admin.to_string(),
            "--limit",
            &limit.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("weir tap starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("weir tap's first line");
    assert!(
        line.contains(&format!("events leaving {target} at {}", router.admin)),
        "weir tap: {line}"
    );
    child
}

fn lines_of(child: std::process::Child) -> Vec<String> {
    let output = child.wait_with_output().expect("weir tap ends");
    assert!(output.status.success(), "weir tap: {output:?}");
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_tap_prints_the_events_leaving_a_stage_and_the_pipeline() {
    let router = router();
    let kept = EVENTS - BOTS;
    let after_filter = tap(router, "tapped/drop-bots", kept);
    let output = tap(router, "tapped", kept);
    stream_known_input(router, "tapped").await;
    let (after_filter, output) =
        tokio::task::spawn_blocking(move || (lines_of(after_filter), lines_of(output)))
            .await
            .expect("the taps end");
    // After drop-bots: the input's events but the bots', unchanged.
    let expected: Vec<String> = (0..EVENTS)
        .filter(|i| !i.is_multiple_of(10))
        .map(|i| weir_format::json::event_to_line(&event(i)))
        .collect();
    assert_eq!(after_filter, expected);
    // What the pipeline fans out is what its file sink wrote, line for line.
    let file = router.dir.join("tapped.jsonl");
    let deadline = Instant::now() + WAIT;
    let written = loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if text.lines().count() as u64 >= kept || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(output, written.lines().collect::<Vec<_>>());
    // Event 1 is from FR.
    assert!(
        output[0].contains("\"country\":\"France\""),
        "geo-enrich's header: {}",
        output[0]
    );
}

#[test]
fn weir_tap_names_an_unknown_stage_and_the_stages_there_are() {
    let router = router();
    let output = weir()
        .args(["tap", "tapped/nope", "--admin", &router.admin.to_string()])
        .output()
        .expect("weir runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "admin: pipeline `tapped` has no stage `nope` (its stages: drop-bots, geo-enrich)"
        ),
        "stderr: {stderr}"
    );
}
