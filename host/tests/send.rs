//! `weir send` against an in-process server (`weir::server::Server`) with a file sink: exact
//! file contents for a JSON-lines file and for generated events, and the failures a user meets
//! first (a bad line, no pin, a wrong pin, a wrong token), each with exit status 1 and a message
//! naming the problem; a full pipeline (`TOO_MANY_PRODUCERS`) is waited for, not an error.

use std::path::{Path, PathBuf};
use std::process::Output;
use weir::config::Config;
use weir::server::Server;
use weir::workload::WorkloadSpec;
use weir_format::json::{event_to_line, parse_line};

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    server: Server,
}

impl Setup {
    async fn start() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let config = r#"
[listener]
listen = "127.0.0.1:0"
data_dir = "data"

[limits]
max_producers_per_pipeline = 1

[auth]
anonymous = false

[[producers]]
id = "sender"
token = "s3cret"

[[producers]]
id = "holder"
token = "holder-token"

[pipelines.clicks]
sinks = ["out"]

[sinks.out]
type = "file"
path = "out.jsonl"
fsync = "never"
"#;
        let path = root.join("weir.toml");
        std::fs::write(&path, config).expect("write the config");
        let config = Config::load(&path).expect("a valid config");
        let server = Server::start(config).await.expect("the server starts");
        Setup {
            _dir: dir,
            root,
            server,
        }
    }

    /// Runs `weir send --to ADDR --pipeline clicks --producer-id sender ARGS…`.
    async fn send(&self, args: &[&str]) -> Output {
        self.send_with_token_env(args, None).await
    }

    /// [`Setup::send`] with `WEIR_TOKEN` set to `token` (unset for `None`).
    async fn send_with_token_env(&self, args: &[&str], token: Option<&str>) -> Output {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_weir"));
        command
            .args(["send", "--to", &self.server.local_addr().to_string()])
            .args(["--pipeline", "clicks", "--producer-id", "sender"])
            .args(args)
            .env_remove("WEIR_TOKEN")
            .env("WEIR_LOG", "warn");
        if let Some(token) = token {
            command.env("WEIR_TOKEN", token);
        }
        tokio::task::spawn_blocking(move || command.output().expect("weir runs"))
            .await
            .expect("the command's thread")
    }

    fn out(&self) -> String {
        std::fs::read_to_string(self.root.join("out.jsonl")).unwrap_or_default()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).expect("write the events");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_arrives_exactly_and_generated_events_follow() {
    let setup = Setup::start().await;
    let pin = setup.server.fingerprint();
    let lines = [
        r#"{"key":"user-1","value":{"path":"/"},"timestamp_ms":1700000000000}"#,
        r#"{"value":[1,2,3],"timestamp_ms":1700000000001,"headers":{"user-agent":"curl/8"}}"#,
        r#"{"key":"user-2","value_text":"plain text","timestamp_ms":1700000000002,"route":"eu"}"#,
    ];
    let file = write(&setup.path("events.jsonl"), &(lines.join("\n") + "\n"));
    let output = setup
        .send(&["--file", &file, "--pin", &pin, "--token", "s3cret"])
        .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!(
            "sent 3 of 3 events to pipeline `clicks` at {}: 3 acked in 1 batch, 0 reconnects",
            setup.server.local_addr()
        )),
        "{stdout}"
    );
    let mut expected: Vec<String> = lines
        .iter()
        .map(|line| event_to_line(&parse_line(line, 0).expect("a valid line")))
        .collect();
    assert_eq!(setup.out(), expected.join("\n") + "\n");

    let output = setup
        .send(&[
            "--generate",
            "500",
            "--size",
            "120",
            "--keys",
            "7",
            "--pin",
            &pin,
            "--token",
            "s3cret",
            "--batch-events",
            "64",
            "--linger-ms",
            "1",
        ])
        .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let spec = WorkloadSpec {
        events: 500,
        value_size: 120,
        keys: 7,
        ..WorkloadSpec::default()
    };
    expected.extend((0..500).map(|i| event_to_line(&spec.event(i))));
    assert_eq!(setup.out(), expected.join("\n") + "\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_line_sends_nothing_and_names_file_and_line() {
    let setup = Setup::start().await;
    let pin = setup.server.fingerprint();
    let file = write(
        &setup.path("bad.jsonl"),
        "{\"value\":1,\"timestamp_ms\":1}\n{\"value\":\n",
    );
    let output = setup
        .send(&["--file", &file, "--pin", &pin, "--token", "s3cret"])
        .await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr(&output);
    assert!(
        stderr.starts_with(&format!("error: {file}: line 2: ")),
        "{stderr}"
    );
    assert_eq!(setup.out(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_must_be_verified_with_the_right_pin_and_token() {
    let setup = Setup::start().await;
    let file = write(
        &setup.path("one.jsonl"),
        "{\"value\":1,\"timestamp_ms\":1}\n",
    );
    let addr = setup.server.local_addr();

    let output = setup.send(&["--file", &file, "--token", "s3cret"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        format!(
            "error: no way to verify the server at {addr}: pass --pin with the certificate fingerprint `weir serve` printed (or --ca FILE for a certificate signed by a CA)\n"
        )
    );

    let wrong = "00".repeat(32);
    let output = setup
        .send(&["--file", &file, "--pin", &wrong, "--token", "s3cret"])
        .await;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        format!(
            "error: cannot connect to {addr}: server certificate has fingerprint {}, but the pinned fingerprint is {wrong} (is this the fingerprint `weir serve` printed?)\n",
            setup.server.fingerprint()
        )
    );

    let pin = setup.server.fingerprint();
    let output = setup
        .send(&["--file", &file, "--pin", &pin, "--token", "wrong"])
        .await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr(&output);
    assert!(
        stderr.starts_with(&format!(
            "error: refused by {addr}: UNAUTHENTICATED (0x03): "
        )),
        "{stderr}"
    );
    assert_eq!(setup.out(), "");

    let output = setup
        .send_with_token_env(&["--file", &file, "--pin", &pin], Some("s3cret"))
        .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(setup.out(), "{\"value\":1,\"timestamp_ms\":1}\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pipeline_is_waited_for_with_backoff() {
    let setup = Setup::start().await;
    let file = write(
        &setup.path("one.jsonl"),
        "{\"value\":1,\"timestamp_ms\":1}\n",
    );
    let pin = setup.server.fingerprint();
    let options = weir_client::ConnectOptions::new(setup.server.local_addr(), "holder", ["clicks"])
        .pin(&pin)
        .expect("a fingerprint")
        .token("holder-token");
    let holder = weir_client::Producer::connect(options)
        .await
        .expect("the holder connects");
    let args = ["--file", &file, "--pin", &pin, "--token", "s3cret"];
    let send = setup.send(&args);
    let release = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        holder.close().await.expect("the holder leaves");
    };
    let (output, ()) = tokio::join!(send, release);
    let stderr = stderr(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "refused: TOO_MANY_PRODUCERS (0x0a): pipeline `clicks`: 1 producers connected, the limit is 1 (max_producers_per_pipeline); trying again in 100ms"
        ),
        "{stderr}"
    );
    assert_eq!(setup.out(), "{\"value\":1,\"timestamp_ms\":1}\n");
}
