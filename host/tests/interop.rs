//! Interop: a producer written in Python from docs/PROTOCOL.md alone (tests/interop/
//! weir_producer.py, on aioquic and the flatbuffers package, not on any weir code) streams into
//! a real `weir serve` over loopback. It proves that the protocol document is enough to write a
//! producer with an independent QUIC implementation, and checks exact results: the events in
//! the file sink, the acks, refusals, a protocol error and a graceful shutdown's `goaway`, as
//! the Python side saw them.
//!
//! The Python packages are pinned in tests/interop/requirements.txt and installed by this test
//! into a venv under the target directory (`target/interop-venv`), reused while it holds exactly
//! those pins. python3 with venv and pip is required: without it the test fails (never skips)
//! and says what to install; `.ci/run` installs it on a fresh machine.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// The producer script.
fn producer_script() -> PathBuf {
    root().join("tests/interop/weir_producer.py")
}

// ---------------------------------------------------------------------------------------------
// The Python venv.

/// The venv's python, made once per test process (tests run in parallel threads).
fn python() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    if let Some(python) = VENV.get() {
        return python;
    }
    let _guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    VENV.get_or_init(make_venv)
}

/// Makes (or reuses) `target/interop-venv` with tests/interop/requirements.txt installed. A
/// stamp file holds the requirements it was installed from; the venv is reused only while the
/// stamp equals the current file.
fn make_venv() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is inside the target directory");
    let venv = target.join("interop-venv");
    let python = venv.join("bin/python");
    let stamp = venv.join("weir-requirements.installed");
    let requirements_path = root().join("tests/interop/requirements.txt");
    let requirements = std::fs::read_to_string(&requirements_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", requirements_path.display()));
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&requirements) {
        return python;
    }

    let missing = "the interop test needs python3 with the venv module and pip (Debian/Ubuntu: \
                   apt-get install python3 python3-venv python3-pip; .ci/run installs them)";
    let version = Command::new("python3").arg("--version").output();
    match version {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "python3 --version failed ({}): {}\n{missing}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("python3 not found ({e})\n{missing}"),
    }
    let _ = std::fs::remove_file(&stamp);
    run_checked(
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
        &format!("python3 -m venv {}", venv.display()),
        missing,
    );
    run_checked(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
                "--requirement",
            ])
            .arg(&requirements_path),
        &format!("pip install -r {}", requirements_path.display()),
        "pip could not install the pinned packages (is PyPI reachable?)",
    );
    std::fs::write(&stamp, &requirements).expect("write the venv's stamp");
    python
}

/// Runs a setup command to completion, failing the test with its output and `hint`.
fn run_checked(command: &mut Command, what: &str, hint: &str) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}\n{hint}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}\n{hint}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Bounded child processes.

/// How long any one process of a test may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(120);

/// The output of a finished producer.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Starts `command` with piped stdin, stdout and stderr.
fn spawn(mut command: Command, what: &str) -> Child {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"))
}

/// Waits for `child` to exit; kills it and fails the test past [`DEADLINE`].
fn wait_bounded(mut child: Child, what: &str) -> Run {
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Runs `command` with `input` on stdin, bounded by [`DEADLINE`].
fn run_bounded(command: Command, input: &str, what: &str) -> Run {
    let mut child = spawn(command, what);
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_owned();
    let writer = std::thread::spawn(move || {
        // A producer that fails early closes stdin: a broken pipe here is its business.
        let _ = stdin.write_all(input.as_bytes());
    });
    let run = wait_bounded(child, what);
    writer.join().expect("stdin writer");
    run
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

// ---------------------------------------------------------------------------------------------
// A weir server.

/// A running `weir serve` in its own temporary directory; killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    pin: String,
    dir: tempfile::TempDir,
    output: mpsc::Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The token of the configured producer `py-1`.
const TOKEN: &str = "interop-s3cret";

impl Server {
    /// Starts `weir serve` with `pipelines` (TOML of `[pipelines.*]` tables writing to the file
    /// sink `out`, at `out.jsonl`) and `limits` (lines of the `[limits]` table).
    fn start(pipelines: &str, limits: &str) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            r#"[listener]
listen = "127.0.0.1:0"
data_dir = "data"

[limits]
{limits}

[[producers]]
id = "py-1"
token = "{TOKEN}"

{pipelines}

[sinks.out]
type = "file"
path = "out.jsonl"
"#
        );
        let config_path = dir.path().join("weir.toml");
        std::fs::write(&config_path, config).expect("write the config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("WEIR_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start weir serve");
        // Both outputs go to one channel of lines, read until the address and fingerprint show.
        let (tx, output) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx); // so that a server that exits early ends the wait at once
        let mut seen = Vec::new();
        let (mut addr, mut pin) = (None, None);
        let start = Instant::now();
        while addr.is_none() || pin.is_none() {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match output.recv_timeout(left) {
                Ok(line) => {
                    for word in line.split(|c: char| c.is_whitespace() || c == '`' || c == ',') {
                        if addr.is_none() {
                            addr = word.parse::<SocketAddr>().ok().filter(|a| a.port() != 0);
                        }
                        if pin.is_none()
                            && word.len() == 64
                            && word.bytes().all(|b| b.is_ascii_hexdigit())
                        {
                            pin = Some(word.to_ascii_lowercase());
                        }
                    }
                    seen.push(line);
                }
                Err(e) => {
                    let status = child.try_wait().ok().flatten();
                    let _ = child.kill();
                    panic!(
                        "weir serve printed no address and fingerprint ({e}; exit: {status:?}); output:\n{}",
                        seen.join("\n")
                    );
                }
            }
        }
        Server {
            child,
            addr: addr.expect("address"),
            pin: pin.expect("fingerprint"),
            dir,
            output,
        }
    }

    /// The Python producer as `producer_id` / `token` against this server with `args`.
    fn producer(&self, producer_id: &str, token: &str, args: &[&str]) -> Command {
        let mut command = Command::new(python());
        command
            .arg(producer_script())
            .args(["--to", &self.addr.to_string(), "--pin", &self.pin])
            .args(["--producer-id", producer_id, "--token", token])
            .args(["--timeout", "60"])
            .args(args);
        command
    }

    /// Runs the Python producer (see [`Server::producer`]) with `stdin`, and returns its exit
    /// code and parsed summary line.
    fn produce(&self, producer_id: &str, token: &str, args: &[&str], stdin: &str) -> (i32, Value) {
        let run = run_bounded(
            self.producer(producer_id, token, args),
            stdin,
            "the Python producer",
        );
        self.summary(run)
    }

    /// The exit code and summary line of a producer run.
    fn summary(&self, run: Run) -> (i32, Value) {
        let summary: Value = serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "the producer's stdout is not one JSON summary ({e}; exit {:?}):\n{}\nstderr:\n{}\nserver:\n{}",
                run.code,
                run.stdout,
                run.stderr,
                self.output.try_iter().collect::<Vec<_>>().join("\n")
            )
        });
        let code = run
            .code
            .unwrap_or_else(|| panic!("the producer was killed by a signal: {}", run.stderr));
        (code, summary)
    }

    /// Sends SIGTERM (a graceful shutdown) and waits, bounded, for the server to exit.
    fn terminate(&mut self) -> std::process::ExitStatus {
        // The shell's builtin kill: no dependency on procps or libc.
        let kill = format!("kill -TERM {}", self.child.id());
        run_checked(Command::new("sh").args(["-c", &kill]), &kill, "");
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for weir serve") {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "weir serve did not exit within {DEADLINE:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits, bounded, until the file sink holds `lines` complete lines.
    fn wait_for_sink_lines(&self, lines: usize) {
        let path = self.dir.path().join("out.jsonl");
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.matches('\n').count() >= lines {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the file sink did not reach {lines} lines within {DEADLINE:?}: {text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The events in the file sink, one JSON value per line (none when the file does not exist).
    fn sink(&self) -> Vec<Value> {
        match std::fs::read_to_string(self.dir.path().join("out.jsonl")) {
            Ok(text) => text
                .lines()
                .map(|line| {
                    serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("sink line is not JSON ({e}): {line}"))
                })
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("read the file sink: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// The events the producer generates for `--events n`.
fn generated(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"key": i.to_string(), "value": {"n": i}, "timestamp_ms": 1_700_000_000_000_u64 + i as u64}))
        .collect()
}

#[test]
fn selftest_matches_the_worked_example() {
    let run = run_bounded(
        {
            let mut c = Command::new(python());
            c.arg(producer_script()).arg("--selftest");
            c
        },
        "",
        "weir_producer.py --selftest",
    );
    assert_eq!(
        run.code,
        Some(0),
        "selftest failed:\n{}{}",
        run.stdout,
        run.stderr
    );
    assert!(run.stdout.contains(" passed, 0 failed"), "{}", run.stdout);
}

#[test]
fn generated_events_arrive_exactly_once_in_order() {
    let server = Server::start(
        r#"[pipelines.clicks]
stages = [{ plugin = "example:identity" }]
sinks = ["out"]"#,
        // A window of two unacked batches: the producer only finishes if acks keep flowing.
        "max_in_flight = 2",
    );
    let (events, batch) = (2_500, 100);
    let (code, summary) = server.produce(
        "py-1",
        TOKEN,
        &[
            "--pipeline",
            "clicks",
            "--events",
            &events.to_string(),
            "--batch",
            &batch.to_string(),
        ],
        "",
    );
    assert_eq!(code, 0, "summary: {summary}");
    assert_eq!(summary["errors"], json!([]), "summary: {summary}");
    assert_eq!(summary["refused"], Value::Null);
    assert_eq!(summary["welcome"]["version"], 1);
    assert_eq!(summary["welcome"]["max_in_flight"], 2);
    assert_eq!(
        summary["welcome"]["pipelines"],
        json!([{"next_sequence": 0, "acked_below": 0}])
    );
    assert_eq!(summary["acked_next"], events / batch, "summary: {summary}");
    assert_eq!(server.sink(), generated(events));
}

/// Events from stdin in the JSON-lines mapping (headers, a route, JSON values kept verbatim)
/// through drop-bots: the two crawler events are dropped, the others arrive as sent.
#[test]
fn stdin_events_pass_through_a_plugin() {
    const EVENTS: &str = include_str!("fixtures/clicks.jsonl");
    let server = Server::start(
        r#"[pipelines.clean]
stages = [{ plugin = "example:drop-bots" }]
sinks = ["out"]"#,
        "",
    );
    let (code, summary) = server.produce(
        "py-1",
        TOKEN,
        &["--pipeline", "clean", "--batch", "4"],
        EVENTS,
    );
    assert_eq!(code, 0, "summary: {summary}");
    assert_eq!(summary["acked_next"], 2, "summary: {summary}");
    assert_eq!(summary["events_sent"], 6, "summary: {summary}");
    let lines: Vec<Value> = EVENTS
        .lines()
        .map(|l| serde_json::from_str(l).expect("fixture"))
        .collect();
    let kept = [0, 2, 4, 5].map(|i| lines[i].clone()).to_vec();
    assert_eq!(server.sink(), kept);
}

/// Asserts that the producer exited 2 with a `refuse` frame of `code` / `message`, followed by
/// a connection close with the same code and the message as reason phrase (PROTOCOL.md §5, §10).
fn assert_refused(code: i32, summary: &Value, error: (u16, &str), message: &str) {
    assert_eq!(code, 2, "summary: {summary}");
    assert_eq!(
        summary["refused"],
        json!({"code": error.0, "name": error.1, "message": message, "from": "refuse"}),
        "summary: {summary}"
    );
    assert_eq!(
        summary["closed"],
        json!({"code": error.0, "reason": message}),
        "summary: {summary}"
    );
    assert_eq!(summary["welcome"], Value::Null, "summary: {summary}");
}

#[test]
fn refusals_reach_the_python_producer() {
    let server = Server::start(
        r#"[pipelines.clicks]
stages = [{ plugin = "example:identity" }]
sinks = ["out"]"#,
        "",
    );
    let args = ["--pipeline", "clicks", "--events", "10"];

    let (code, summary) = server.produce("py-1", "wrong-token", &args, "");
    assert_refused(
        code,
        &summary,
        (3, "UNAUTHENTICATED"),
        "producer `py-1`: wrong token",
    );

    let billing = ["--pipeline", "billing", "--events", "10"];
    let (code, summary) = server.produce("py-1", TOKEN, &billing, "");
    assert_refused(
        code,
        &summary,
        (5, "UNKNOWN_PIPELINE"),
        "pipeline `billing`: unknown",
    );

    // A wrong pin fails on the producer's side, before the hello (and its token) is sent.
    let mut wrong = server.pin.clone();
    wrong.replace_range(0..2, if wrong.starts_with("00") { "11" } else { "00" });
    let mut command = Command::new(python());
    command
        .arg(producer_script())
        .args(["--to", &server.addr.to_string(), "--pin", &wrong])
        .args(["--producer-id", "py-1", "--token", TOKEN])
        .args(args);
    let run = run_bounded(command, "", "the Python producer with a wrong pin");
    assert_eq!(run.code, Some(1), "{}{}", run.stdout, run.stderr);
    let summary: Value = serde_json::from_str(run.stdout.trim()).expect("summary");
    assert_eq!(
        summary["fatal"],
        format!(
            "Fatal: certificate fingerprint {} does not match the pin {wrong}",
            server.pin
        )
    );
    assert_eq!(server.sink(), Vec::<Value>::new());
}

/// A batch declaring more events than `max_events_per_frame` fails its stream with an `error`
/// frame (code 7, TOO_MANY_EVENTS) in the message style of PROTOCOL.md §10, and nothing of it
/// reaches the sink.
#[test]
fn too_many_events_is_a_protocol_error() {
    let server = Server::start(
        r#"[pipelines.clicks]
stages = [{ plugin = "example:identity" }]
sinks = ["out"]"#,
        "max_events_per_frame = 100",
    );
    let (code, summary) = server.produce(
        "py-1",
        TOKEN,
        &[
            "--pipeline",
            "clicks",
            "--events",
            "150",
            "--batch",
            "150",
            "--ignore-limits",
        ],
        "",
    );
    assert_eq!(code, 1, "summary: {summary}");
    assert_eq!(summary["welcome"]["max_events_per_frame"], 100);
    assert_eq!(
        summary["errors"],
        json!([{
            "code": 7,
            "name": "TOO_MANY_EVENTS",
            "stream": 2,
            "message": "batch of 150 events exceeds the limit of 100 (max_events_per_frame)"
        }])
    );
    assert_eq!(summary["acked_next"], 0, "summary: {summary}");
    assert_eq!(server.sink(), Vec::<Value>::new());
}

/// A graceful shutdown (SIGTERM) while the producer is connected: the producer receives
/// `goaway` (PROTOCOL.md §12), every batch it sent was acked, the sink holds exactly those
/// events, and the server exits 0.
#[test]
fn graceful_shutdown_sends_goaway() {
    let mut server = Server::start(
        r#"[pipelines.clicks]
stages = [{ plugin = "example:identity" }]
sinks = ["out"]"#,
        "",
    );
    let line = |i: usize| format!(r#"{{"key":"{i}","value":{{"n":{i}}},"timestamp_ms":{i}}}"#);
    let mut producer = spawn(
        server.producer("py-1", TOKEN, &["--pipeline", "clicks", "--batch", "1"]),
        "the Python producer",
    );
    let mut stdin = producer.stdin.take().expect("piped stdin");
    for i in 0..3 {
        writeln!(stdin, "{}", line(i)).expect("write to the producer");
    }
    stdin.flush().expect("flush the producer's stdin");
    server.wait_for_sink_lines(3);
    let status = server.terminate();
    assert!(
        status.success(),
        "weir serve exited with {status} after SIGTERM"
    );
    // The producer notices the goaway when its next event arrives, and sends nothing more.
    writeln!(stdin, "{}", line(3)).expect("write to the producer");
    drop(stdin);
    let (code, summary) = server.summary(wait_bounded(producer, "the Python producer"));
    assert_eq!(code, 1, "summary: {summary}");
    assert_eq!(summary["goaway"], "shutting down", "summary: {summary}");
    assert_eq!(summary["acked_next"], 3, "summary: {summary}");
    assert_eq!(summary["batches_sent"], 3, "summary: {summary}");
    assert_eq!(summary["errors"], json!([]), "summary: {summary}");
    let sent: Vec<Value> = (0..3)
        .map(|i| serde_json::from_str(&line(i)).expect("event line"))
        .collect();
    assert_eq!(server.sink(), sent);
}
