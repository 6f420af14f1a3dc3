//! `weir serve` over real QUIC: raw `weir/1` frames from quinn clients (weir_format::frame),
//! against a server started with `weir::server::Server::start`.
//!
//! Every wait is bounded ([`WAIT`]) and fails naming what it waited for; nothing asserts on
//! timing. Each bad-input test checks the exact code and message, that only the offending
//! stream or connection is affected (another producer's events still land), and that nothing
//! of the bad input was processed.

use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use weir::config::Config;
use weir::server::{Server, Stats};
use weir_client::tls::{PinnedServerVerifier, parse_fingerprint};
use weir_format::frame::{
    self, Ack, BatchFrame, Decoder, ErrorCode, ErrorFrame, Frame, Hello, Welcome,
};
use weir_format::{Event, encode};

/// The bound of every wait: long enough for a loaded CI machine, short enough to fail clearly.
const WAIT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// Waits until the server's counters satisfy `done`.
async fn wait_for_stats(server: &Server, what: &str, done: impl Fn(&Stats) -> bool) -> Stats {
    within(what, async {
        loop {
            let stats = server.stats();
            if done(&stats) {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Server side

/// Producers, pipelines and sinks every test starts from; `limits` and `extra` add to it.
fn config_text(limits: &str, extra: &str) -> String {
    format!(
        r#"
[listener]
listen = "127.0.0.1:0"
data_dir = "data"

[limits]
{limits}

[[producers]]
id = "sensor-7"
token = "s3cret"

[[producers]]
id = "other"
token = "other-token"

[pipelines.clicks]
sinks = ["clicks"]
workers = 2

[[pipelines.clicks.stages]]
plugin = "example:drop-bots"

[pipelines.restricted]
sinks = ["discard"]
producers = ["sensor-7"]
workers = 1

[sinks.clicks]
type = "file"
path = "clicks.jsonl"

[sinks.discard]
type = "null"
{extra}
"#
    )
}

struct TestServer {
    server: Server,
    dir: tempfile::TempDir,
}

impl TestServer {
    async fn start(limits: &str, extra: &str) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = start_in(dir.path(), &config_text(limits, extra)).await;
        TestServer { server, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn clicks(&self) -> String {
        std::fs::read_to_string(self.path("clicks.jsonl")).unwrap_or_default()
    }

    async fn connect(&self, producer: &str, token: &str, pipelines: &[&str]) -> Producer {
        let mut p = Producer::connect(&self.server).await;
        let welcome = p.hello(producer, token, pipelines).await;
        assert!(
            matches!(welcome, Frame::Welcome(_)),
            "{producer}: expected welcome, got {welcome:?}"
        );
        p
    }
}

async fn start_in(dir: &Path, text: &str) -> Server {
    let config = Config::parse(text, dir.join("weir.toml")).expect("valid config");
    within("the server to start", Server::start(config))
        .await
        .expect("server starts")
}

// ---------------------------------------------------------------------------------------------
// Client side: raw frames over quinn

fn client_endpoint(
    fingerprint: &str,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Endpoint {
    let mut endpoint = Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    endpoint.set_default_client_config(client_config(fingerprint, client_cert));
    endpoint
}

fn client_config(
    fingerprint: &str,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier::new(
            parse_fingerprint(fingerprint).expect("a fingerprint"),
            provider,
        )));
    let mut tls = match client_cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![frame::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    quinn::ClientConfig::new(Arc::new(crypto))
}

/// A producer speaking raw frames.
struct Producer {
    _endpoint: Endpoint,
    conn: Connection,
    control: Option<(SendStream, RecvStream)>,
    decoder: Decoder,
    /// Control frames read but not consumed yet.
    frames: std::collections::VecDeque<Frame>,
}

impl Producer {
    async fn connect(server: &Server) -> Producer {
        Producer::connect_with(server, None).await
    }

    async fn connect_with_addr(addr: std::net::SocketAddr, fingerprint: &str) -> Producer {
        Producer::connect_to(addr, fingerprint, None).await
    }

    async fn connect_with(
        server: &Server,
        client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Producer {
        Producer::connect_to(server.local_addr(), &server.fingerprint(), client_cert).await
    }

    async fn connect_to(
        addr: std::net::SocketAddr,
        fingerprint: &str,
        client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Producer {
        Producer::connect_on(client_endpoint(fingerprint, client_cert), addr).await
    }

    async fn connect_on(endpoint: Endpoint, addr: std::net::SocketAddr) -> Producer {
        let connecting = endpoint.connect(addr, "localhost").expect("connect");
        let conn = within("the QUIC handshake", connecting)
            .await
            .expect("handshake");
        Producer {
            _endpoint: endpoint,
            conn,
            control: None,
            decoder: Decoder::control_from_server(),
            frames: Default::default(),
        }
    }

    /// Sends `hello` and returns the answer (`welcome` or `refuse`).
    async fn hello(&mut self, producer: &str, token: &str, pipelines: &[&str]) -> Frame {
        self.send_hello(producer, token, pipelines).await;
        self.next().await.expect("an answer to hello")
    }

    /// Sends `hello` without waiting for the answer.
    async fn send_hello(&mut self, producer: &str, token: &str, pipelines: &[&str]) {
        let hello = Frame::Hello(Hello {
            version: 1,
            producer_id: producer.into(),
            token: token.as_bytes().to_vec(),
            pipelines: pipelines.iter().map(|p| p.to_string()).collect(),
        });
        let mut bytes = Vec::new();
        frame::encode(&hello, &mut bytes).expect("encode hello");
        let (mut send, recv) = within("the control stream", self.conn.open_bi())
            .await
            .expect("open control");
        send.write_all(&bytes).await.expect("write hello");
        self.control = Some((send, recv));
    }

    /// The next control frame; `None` when the control stream ends.
    async fn next(&mut self) -> Option<Frame> {
        if let Some(frame) = self.frames.pop_front() {
            return Some(frame);
        }
        let (_, recv) = self.control.as_mut().expect("control stream open");
        let decoder = &mut self.decoder;
        let frames = &mut self.frames;
        within("a control frame", async {
            loop {
                match recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => {
                        let mut input: &[u8] = &chunk.bytes;
                        while !input.is_empty() {
                            if let Some(frame) = decoder.decode(&mut input).expect("valid frame") {
                                frames.push_back(frame);
                            }
                        }
                        if let Some(frame) = frames.pop_front() {
                            return Some(frame);
                        }
                    }
                    Ok(None) | Err(_) => return None,
                }
            }
        })
        .await
    }

    /// Reads control frames until an ack for `pipeline` reaches `next`; returns the frames
    /// other than acks read on the way.
    async fn ack_reaching(&mut self, pipeline: u16, next: u64) -> Vec<Frame> {
        let mut others = Vec::new();
        loop {
            match self.next().await {
                Some(Frame::Ack(ack)) if ack.pipeline == pipeline && ack.next >= next => {
                    assert_eq!(ack.next, next, "ack passed the expected sequence");
                    return others;
                }
                Some(Frame::Ack(_)) => {}
                Some(other) => others.push(other),
                None => panic!("control stream ended before ack {next} of pipeline {pipeline}"),
            }
        }
    }

    /// The next control frame, which must be an `error`.
    async fn error(&mut self) -> ErrorFrame {
        loop {
            match self.next().await {
                Some(Frame::Error(e)) => return e,
                Some(Frame::Ack(_)) => {}
                other => panic!("expected an error frame, got {other:?}"),
            }
        }
    }

    async fn stream(&self) -> SendStream {
        within("a batch stream", self.conn.open_uni())
            .await
            .expect("open uni")
    }

    /// How the connection was closed.
    async fn closed(&self) -> ConnectionError {
        within("the connection to close", self.conn.closed()).await
    }
}

fn batch_bytes(pipeline: u16, sequence: u64, events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode(
        &Frame::Batch(BatchFrame {
            pipeline,
            sequence,
            event_count: events.len() as u32,
            payload: encode(events),
        }),
        &mut out,
    )
    .expect("encode batch");
    out
}

fn click(n: u32, agent: &str) -> Event {
    Event::new(format!("{{\"n\":{n}}}"), 1_700_000_000_000 + i64::from(n))
        .with_key(format!("user-{n}"))
        .with_header("user-agent", agent)
}

fn click_line(n: u32) -> String {
    format!(
        "{{\"key\":\"user-{n}\",\"value\":{{\"n\":{n}}},\"timestamp_ms\":{},\"headers\":{{\"user-agent\":\"curl/8\"}}}}\n",
        1_700_000_000_000 + i64::from(n)
    )
}

/// Sends batch `sequence` of three clicks (the middle one a bot) and returns the two lines
/// the file sink must hold for it.
async fn send_clicks(stream: &mut SendStream, sequence: u64) -> String {
    let n = sequence as u32 * 10;
    let events = [
        click(n, "curl/8"),
        click(n + 1, "Googlebot/2.1"),
        click(n + 2, "curl/8"),
    ];
    stream
        .write_all(&batch_bytes(0, sequence, &events))
        .await
        .expect("write batch");
    click_line(n) + &click_line(n + 2)
}

fn app_close(error: &ConnectionError) -> (u64, String) {
    match error {
        ConnectionError::ApplicationClosed(close) => (
            close.error_code.into_inner(),
            String::from_utf8_lossy(&close.reason).into_owned(),
        ),
        other => panic!("expected an application close, got {other:?}"),
    }
}

fn code(c: ErrorCode) -> u64 {
    u64::from(c.to_u16())
}

/// A second producer writes one batch and sees it acked and in the file: the server is fine.
async fn other_producer_still_works(t: &TestServer, expected_before: &str) {
    let mut p = t.connect("other", "other-token", &["clicks"]).await;
    let mut s = p.stream().await;
    let lines = send_clicks(&mut s, 50).await;
    p.ack_reaching(0, 51).await;
    assert_eq!(t.clicks(), format!("{expected_before}{lines}"));
}

// ---------------------------------------------------------------------------------------------
// Handshake

#[tokio::test(flavor = "multi_thread")]
async fn handshake_welcome_and_exact_file_contents_after_the_ack() {
    let t = TestServer::start("", "").await;
    let mut p = Producer::connect(&t.server).await;
    let welcome = p.hello("sensor-7", "s3cret", &["clicks"]).await;
    assert_eq!(
        welcome,
        Frame::Welcome(Welcome {
            version: 1,
            limits: frame::Limits::DEFAULT,
            pipelines: vec![frame::PipelineState {
                next_sequence: 0,
                acked_below: 0
            }],
        })
    );
    let mut s = p.stream().await;
    let first = send_clicks(&mut s, 0).await;
    let second = send_clicks(&mut s, 1).await;
    let others = p.ack_reaching(0, 2).await;
    assert_eq!(others, vec![]);
    // The ack says the sink holds the batches: the file has them, exactly, the moment it
    // arrives (the bot of each batch dropped by drop-bots).
    assert_eq!(t.clicks(), format!("{first}{second}"));
    let stats = t.server.stats();
    assert_eq!(stats.batches_accepted, 2);
    assert_eq!(stats.events_accepted, 6);
    assert_eq!(stats.events_out, 4);
    assert_eq!(stats.batches_acked, 2);
    assert_eq!(stats.connections_accepted, 1);

    let report = within("shutdown", t.server.shutdown())
        .await
        .expect("shutdown");
    assert_eq!(report.problems, Vec::<String>::new());
}

async fn refused(
    t: &TestServer,
    producer: &str,
    token: &str,
    pipelines: &[&str],
) -> (ErrorCode, String) {
    let mut p = Producer::connect(&t.server).await;
    p.send_hello(producer, token, pipelines).await;
    // A batch sent before the answer: never read, since the producer is refused.
    if let Ok(mut s) = p.conn.open_uni().await {
        let _ = s.write_all(&batch_bytes(0, 0, &[click(1, "curl/8")])).await;
    }
    let answer = p.next().await.expect("an answer to hello");
    let Frame::Refuse(refuse) = answer else {
        panic!("expected refuse, got {answer:?}")
    };
    let (close_code, reason) = app_close(&p.closed().await);
    assert_eq!(close_code, code(refuse.code), "close code = refuse code");
    assert_eq!(reason, refuse.message, "close reason = refuse message");
    (refuse.code, refuse.message)
}

#[tokio::test(flavor = "multi_thread")]
async fn handshake_refusals_name_the_problem_and_process_nothing() {
    let t = TestServer::start("max_producers_per_pipeline = 1", "").await;
    assert_eq!(
        refused(&t, "sensor-7", "wrong", &["clicks"]).await,
        (
            ErrorCode::Unauthenticated,
            "producer `sensor-7`: wrong token".into()
        )
    );
    assert_eq!(
        refused(&t, "sensor-7", "", &["clicks"]).await,
        (
            ErrorCode::Unauthenticated,
            "producer `sensor-7`: no token".into()
        )
    );
    assert_eq!(
        refused(&t, "stranger", "", &["clicks"]).await,
        (
            ErrorCode::Unauthenticated,
            "producer `stranger`: no token and no client certificate".into()
        )
    );
    assert_eq!(
        refused(&t, "stranger", "guess", &["clicks"]).await,
        (
            ErrorCode::Unauthenticated,
            "producer `stranger`: unknown producer (no token is configured for it)".into()
        )
    );
    assert_eq!(
        refused(&t, "sensor-7", "s3cret", &["clicks", "billing"]).await,
        (
            ErrorCode::UnknownPipeline,
            "pipeline `billing`: unknown".into()
        )
    );
    assert_eq!(
        refused(&t, "other", "other-token", &["restricted"]).await,
        (
            ErrorCode::Unauthorized,
            "pipeline `restricted`: producer `other` may not write to it".into()
        )
    );

    // One producer per pipeline: a second id is refused, the first keeps working.
    let mut first = t.connect("sensor-7", "s3cret", &["clicks"]).await;
    assert_eq!(
        refused(&t, "other", "other-token", &["clicks"]).await,
        (
            ErrorCode::TooManyProducers,
            "pipeline `clicks`: 1 producers connected, the limit is 1 (max_producers_per_pipeline)"
                .into()
        )
    );
    let mut s = first.stream().await;
    let lines = send_clicks(&mut s, 0).await;
    first.ack_reaching(0, 1).await;
    assert_eq!(t.clicks(), lines);
    let stats = t.server.stats();
    assert_eq!(stats.connections_refused, 7);
    assert_eq!(
        stats.batches_received, 1,
        "nothing of a refused producer is read"
    );
    assert_eq!(stats.batches_accepted, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn hello_version_zero_is_refused() {
    let t = TestServer::start("", "").await;
    let p = Producer::connect(&t.server).await;
    let (mut send, mut recv) = p.conn.open_bi().await.expect("bi");
    let mut bytes = Vec::new();
    frame::encode(
        &Frame::Hello(Hello {
            version: 1,
            producer_id: "sensor-7".into(),
            token: b"s3cret".to_vec(),
            pipelines: vec!["clicks".into()],
        }),
        &mut bytes,
    )
    .expect("encode");
    bytes[5..7].copy_from_slice(&[0, 0]);
    send.write_all(&bytes).await.expect("write");
    let answer = within("refuse", recv.read_to_end(4096))
        .await
        .expect("read");
    let mut decoder = Decoder::control_from_server();
    let mut input: &[u8] = &answer;
    let frame = decoder
        .decode(&mut input)
        .expect("frame")
        .expect("one frame");
    assert_eq!(
        frame,
        Frame::Refuse(frame::Refuse {
            code: ErrorCode::UnsupportedVersion,
            message: "unsupported protocol version 0 (this side speaks 1 to 1)".into()
        })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_without_hello_times_out() {
    let t = TestServer::start("handshake_timeout_ms = 200", "").await;
    let p = Producer::connect(&t.server).await;
    let (close_code, reason) = app_close(&p.closed().await);
    assert_eq!(close_code, code(ErrorCode::ProtocolViolation));
    assert_eq!(reason, "no hello within 200 ms");
    other_producer_still_works(&t, "").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_connection_supersedes_and_resends_are_dropped_as_duplicates() {
    let t = TestServer::start("", "").await;
    let mut old = t.connect("sensor-7", "s3cret", &["clicks"]).await;
    let mut s = old.stream().await;
    let mut expected = String::new();
    for seq in 0..2 {
        expected += &send_clicks(&mut s, seq).await;
    }
    old.ack_reaching(0, 2).await;

    // Reconnect with the same id: the old connection is closed with SUPERSEDED.
    let mut new = Producer::connect(&t.server).await;
    let welcome = new.hello("sensor-7", "s3cret", &["clicks"]).await;
    let (close_code, reason) = app_close(&old.closed().await);
    assert_eq!(close_code, code(ErrorCode::Superseded));
    assert!(
        reason.starts_with("producer `sensor-7` connected again from 127.0.0.1:"),
        "{reason}"
    );
    let Frame::Welcome(welcome) = welcome else {
        panic!("expected welcome, got {welcome:?}")
    };
    assert_eq!(
        welcome.pipelines,
        vec![frame::PipelineState {
            next_sequence: 2,
            acked_below: 2
        }]
    );
    // Resend 0 and 1 (duplicates) and send 2.
    let mut s = new.stream().await;
    for seq in 0..2 {
        send_clicks(&mut s, seq).await;
    }
    expected += &send_clicks(&mut s, 2).await;
    new.ack_reaching(0, 3).await;
    assert_eq!(t.clicks(), expected, "each batch exactly once");
    let stats = t.server.stats();
    assert_eq!(stats.duplicates_dropped, 6, "two batches of three events");
    assert_eq!(stats.batches_accepted, 3);
}

// ---------------------------------------------------------------------------------------------
// Bad input on batch streams

/// Sends `bytes` on a fresh stream of a fresh producer (`finish` afterwards when asked) and
/// returns the error frame, after checking that the stream was stopped with its code.
async fn stream_error(t: &TestServer, bytes: &[u8], finish: bool) -> ErrorFrame {
    let mut p = t.connect("sensor-7", "s3cret", &["clicks"]).await;
    let mut s = p.stream().await;
    let id = u64::from(s.id());
    // The server may stop the stream before the write returns: that is the point.
    let _ = s.write_all(bytes).await;
    if finish {
        s.finish().expect("finish");
    }
    let error = p.error().await;
    assert_eq!(error.stream, id, "the error names the stream");
    let stopped = within("STOP_SENDING", s.stopped()).await;
    if !finish {
        assert_eq!(
            stopped.expect("stopped"),
            Some(VarInt::from_u32(u32::from(error.code.to_u16()))),
            "STOP_SENDING carries the error's code"
        );
    }
    error
}

fn limits_error(code_: ErrorCode, message: &str) -> impl Fn(&ErrorFrame) {
    let message = message.to_owned();
    move |e: &ErrorFrame| {
        assert_eq!((e.code, e.message.as_str()), (code_, message.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_ends_inside_a_frame_fails_alone() {
    let t = TestServer::start("", "").await;
    let whole = batch_bytes(0, 0, &[click(1, "curl/8")]);
    let e = stream_error(&t, &whole[..30], true).await;
    limits_error(
        ErrorCode::ProtocolViolation,
        &format!(
            "stream ended inside a frame: 30 of {} bytes received",
            whole.len()
        ),
    )(&e);
    other_producer_still_works(&t, "").await;
    assert_eq!(t.server.stats().batches_accepted, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_frames_and_too_many_events_name_the_limit() {
    let t = TestServer::start("max_events_per_frame = 3", "").await;
    let header =
        frame::batch_header(0, 0, 1, 9_000_000 - frame::BATCH_HEADER_BYTES).expect("header");
    let e = stream_error(&t, &header, false).await;
    limits_error(
        ErrorCode::FrameTooLarge,
        "frame of 9000000 bytes exceeds the limit of 4194304 (max_frame_bytes)",
    )(&e);
    let many = batch_bytes(0, 0, &vec![click(1, "curl/8"); 4]);
    let e = stream_error(&t, &many, false).await;
    limits_error(
        ErrorCode::TooManyEvents,
        "batch of 4 events exceeds the limit of 3 (max_events_per_frame)",
    )(&e);
    other_producer_still_works(&t, "").await;
    let stats = t.server.stats();
    assert_eq!(stats.batches_accepted, 1, "only the other producer's batch");
    assert_eq!(stats.stream_errors, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_payloads_and_bad_indexes_fail_the_stream_only() {
    let t = TestServer::start("", "").await;
    let mut garbage = frame::batch_header(0, 0, 1, 4).expect("header").to_vec();
    garbage.extend_from_slice(b"junk");
    let e = stream_error(&t, &garbage, false).await;
    limits_error(
        ErrorCode::InvalidBatch,
        "batch 0: payload is not a valid weir batch: not a weir batch: missing the `WEIR` file identifier (4 bytes)",
    )(&e);
    let lying = {
        let mut out = frame::batch_header(0, 0, 2, 0).expect("header").to_vec();
        let payload = encode(&[click(1, "curl/8")]);
        out[..4]
            .copy_from_slice(&((frame::BATCH_HEADER_BYTES + payload.len()) as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    };
    let e = stream_error(&t, &lying, false).await;
    limits_error(
        ErrorCode::InvalidBatch,
        "batch 0: header declares 2 events, payload holds 1",
    )(&e);
    let e = stream_error(&t, &batch_bytes(1, 0, &[click(1, "curl/8")]), false).await;
    limits_error(
        ErrorCode::ProtocolViolation,
        "batch for pipeline index 1, but hello listed 1 pipelines",
    )(&e);
    other_producer_still_works(&t, "").await;
    let stats = t.server.stats();
    assert_eq!(stats.batches_accepted, 1);
    assert_eq!(
        stats.events_out, 2,
        "nothing of the bad batches was processed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_last_u64_sequence_is_refused_not_wrapped() {
    let t = TestServer::start("", "").await;
    // Accepting it would make the next expected sequence wrap to 0 (or panic).
    let e = stream_error(&t, &batch_bytes(0, u64::MAX, &[click(1, "curl/8")]), false).await;
    limits_error(
        ErrorCode::ProtocolViolation,
        "sequence 18446744073709551615 is reserved: no batch could follow it",
    )(&e);
    // No state was created for sensor-7: a fresh connection still starts anywhere.
    let mut p = t.connect("sensor-7", "s3cret", &["clicks"]).await;
    let mut s = p.stream().await;
    let lines = send_clicks(&mut s, 0).await;
    p.ack_reaching(0, 1).await;
    assert_eq!(t.clicks(), lines);
    let stats = t.server.stats();
    assert_eq!((stats.batches_accepted, stats.stream_errors), (1, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_reset_mid_frame_discards_the_partial_frame() {
    let t = TestServer::start("", "").await;
    let mut p = t.connect("sensor-7", "s3cret", &["clicks"]).await;
    let mut s = p.stream().await;
    let whole = batch_bytes(0, 0, &[click(1, "curl/8")]);
    s.write_all(&whole[..whole.len() - 5]).await.expect("write");
    s.reset(VarInt::from_u32(0x77)).expect("reset");
    // The same batch on a new stream is accepted once: nothing of the partial one counted.
    let mut s2 = p.stream().await;
    s2.write_all(&whole).await.expect("write");
    let others = p.ack_reaching(0, 1).await;
    assert_eq!(others, vec![], "a client's reset is not an error");
    assert_eq!(t.clicks(), click_line(1));
    let stats = t.server.stats();
    assert_eq!(stats.batches_received, 1);
    assert_eq!(stats.batches_accepted, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sequence_gap_fails_the_stream_and_keeps_what_came_before() {
    let t = TestServer::start("", "").await;
    let mut p = t.connect("sensor-7", "s3cret", &["clicks"]).await;
    let mut s = p.stream().await;
    let id = u64::from(s.id());
    let first = send_clicks(&mut s, 0).await;
    // Batch 2 fails the stream: the write of 3 may already find it stopped.
    let mut after_gap = batch_bytes(0, 2, &[click(20, "curl/8")]);
    after_gap.extend(batch_bytes(0, 3, &[click(30, "curl/8")]));
    let _ = s.write_all(&after_gap).await;
    let mut error = None;
    let mut acked = 0;
    while error.is_none() || acked < 1 {
        match p.next().await {
            Some(Frame::Error(e)) => error = Some(e),
            Some(Frame::Ack(Ack { next, .. })) => acked = next,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acked, 1, "batch 0 stays accepted and acked");
    assert_eq!(
        error,
        Some(ErrorFrame {
            code: ErrorCode::SequenceGap,
            stream: id,
            message: "sequence gap on pipeline `clicks`: expected batch 1, received 2".into()
        })
    );
    let stopped = within("STOP_SENDING", s.stopped()).await.expect("stopped");
    assert_eq!(stopped, Some(VarInt::from_u32(0x09)));
    // The producer resends from 1 on a new stream.
    let mut s = p.stream().await;
    let second = send_clicks(&mut s, 1).await;
    p.ack_reaching(0, 2).await;
    assert_eq!(t.clicks(), format!("{first}{second}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_connections_is_refused_over_max_connections() {
    let t = TestServer::start("max_connections = 2", "").await;
    let mut first = t.connect("sensor-7", "s3cret", &["clicks"]).await;
    let _second = t.connect("other", "other-token", &["clicks"]).await;
    for _ in 0..5 {
        let endpoint = client_endpoint(&t.server.fingerprint(), None);
        let connecting = endpoint
            .connect(t.server.local_addr(), "localhost")
            .expect("connect");
        let error = within("the refusal", connecting)
            .await
            .expect_err("over the limit");
        match error {
            ConnectionError::ConnectionClosed(close) => assert_eq!(
                close.error_code,
                quinn::TransportErrorCode::CONNECTION_REFUSED
            ),
            other => panic!("expected CONNECTION_REFUSED, got {other:?}"),
        }
    }
    assert_eq!(t.server.stats().connections_over_limit, 5);
    let mut s = first.stream().await;
    let lines = send_clicks(&mut s, 0).await;
    first.ack_reaching(0, 1).await;
    assert_eq!(t.clicks(), lines);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_producer_that_fails_streams_without_reading_errors_is_closed() {
    let t = TestServer::start("", "").await;
    // The control stream's receive window holds a few error frames: then the server's writer
    // blocks, and the errors queue up on the server, up to a bound.
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(VarInt::from_u32(256));
    let mut config = client_config(&t.server.fingerprint(), None);
    config.transport_config(Arc::new(transport));
    let mut endpoint = Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    endpoint.set_default_client_config(config);
    let mut p = Producer::connect_on(endpoint, t.server.local_addr()).await;
    let welcome = p.hello("sensor-7", "s3cret", &["clicks"]).await;
    assert!(matches!(welcome, Frame::Welcome(_)), "{welcome:?}");
    // Each stream: a frame of length 0, a protocol violation failing that stream.
    let mut streams = 0;
    let error = within("the connection to close", async {
        loop {
            let mut s = match p.conn.open_uni().await {
                Ok(s) => s,
                Err(e) => return e,
            };
            streams += 1;
            let _ = s.write_all(&[0, 0, 0, 0]).await;
            let _ = s.stopped().await;
        }
    })
    .await;
    assert_eq!(
        app_close(&error),
        (
            code(ErrorCode::ProtocolViolation),
            "64 error frames not sent yet: the producer does not read its control stream".into()
        )
    );
    assert!(streams > 64, "closed after {streams} streams");
    other_producer_still_works(&t, "").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_stream_frame_after_hello_closes_the_connection() {
    let t = TestServer::start("", "").await;
    let mut p = t.connect("sensor-7", "s3cret", &["clicks"]).await;
    let (send, _) = p.control.as_mut().expect("control");
    send.write_all(&batch_bytes(0, 0, &[]))
        .await
        .expect("write");
    let error = p.error().await;
    let message = "unexpected `batch` frame on the control stream after `hello`";
    assert_eq!(
        error,
        ErrorFrame {
            code: ErrorCode::ProtocolViolation,
            stream: 0,
            message: message.into()
        }
    );
    let (close_code, reason) = app_close(&p.closed().await);
    assert_eq!((close_code, reason.as_str()), (0x01, message));
    other_producer_still_works(&t, "").await;
}

// ---------------------------------------------------------------------------------------------
// Backpressure, shutdown, certificates, dead letters

/// A file sink writing into a FIFO that the test reads: the sink (so the pipeline) blocks
/// until the test reads, a slow destination on demand.
struct Fifo {
    reader: std::thread::JoinHandle<std::fs::File>,
}

impl Fifo {
    fn create(path: &Path) -> Fifo {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("mkfifo runs");
        assert!(status.success(), "mkfifo {}", path.display());
        let path = path.to_path_buf();
        // Opening a FIFO blocks until the other side opens it: the server opens the writer.
        let reader = std::thread::spawn(move || std::fs::File::open(path).expect("open fifo"));
        Fifo { reader }
    }

    /// Reads until `lines` lines arrived, in a blocking task.
    async fn read_lines(self, lines: usize) -> String {
        let mut file = tokio::task::spawn_blocking(move || self.reader.join().expect("reader"))
            .await
            .expect("join");
        within(
            "lines from the FIFO",
            tokio::task::spawn_blocking(move || {
                use std::io::Read;
                let mut out = Vec::new();
                let mut buf = vec![0; 64 * 1024];
                while out.iter().filter(|&&b| b == b'\n').count() < lines {
                    let n = file.read(&mut buf).expect("read fifo");
                    assert!(n > 0, "FIFO closed early");
                    out.extend_from_slice(&buf[..n]);
                }
                String::from_utf8(out).expect("utf-8")
            }),
        )
        .await
        .expect("reader task")
    }
}

const SLOW_SINK: &str = r#"
[pipelines.slow]
sinks = ["fifo"]

[sinks.fifo]
type = "file"
path = "slow.fifo"
fsync = "never"
"#;

/// One event of 100 KiB: more than a pipe holds, so the first write blocks the sink.
fn big(n: u32) -> Event {
    Event::new(format!("\"{}\"", "x".repeat(100 * 1024)), i64::from(n))
}

async fn start_slow(limits: &str) -> (TestServer, Fifo) {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = Fifo::create(&dir.path().join("slow.fifo"));
    let server = start_in(dir.path(), &config_text(limits, SLOW_SINK)).await;
    (TestServer { server, dir }, fifo)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blocked_sink_stops_reading_at_max_in_flight() {
    let (t, fifo) = start_slow("max_in_flight = 2").await;
    let mut p = t.connect("sensor-7", "s3cret", &["slow"]).await;
    let mut s = p.stream().await;
    let writer = tokio::spawn(async move {
        for seq in 0..6 {
            s.write_all(&batch_bytes(0, seq, &[big(seq as u32)]))
                .await
                .expect("write");
        }
        s
    });
    let stats = wait_for_stats(&t.server, "2 batches read", |s| s.batches_received >= 2).await;
    assert_eq!(stats.batches_received, 2);
    // Give the server every chance to read more; it must not (this can only fail if it does).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = t.server.stats();
    assert_eq!(
        stats.batches_received, 2,
        "the server read past max_in_flight"
    );
    assert_eq!(
        stats.batches_acked, 0,
        "nothing is acked while the sink blocks"
    );

    let text = fifo.read_lines(6).await;
    p.ack_reaching(0, 6).await;
    let _s = within("the writer", writer).await.expect("writer");
    assert_eq!(text.lines().count(), 6);
    assert_eq!(t.server.stats().batches_received, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_in_flight_holds_per_pipeline_across_streams() {
    let (t, fifo) = start_slow("max_in_flight = 2").await;
    let p = t.connect("sensor-7", "s3cret", &["slow"]).await;
    // One batch per stream, each stream finished. The server takes batches 0 and 1 (its two
    // permits of `slow`); a stream that ends gives the producer no fresh permits. Streams 2
    // and 3 have their first frame read (the connection's two first-frame permits: one more
    // than its pipelines) and wait for a permit of `slow`; stream 4 is not read at all.
    let mut streams = Vec::new();
    for seq in 0..5u64 {
        let mut s = p.stream().await;
        s.write_all(&batch_bytes(0, seq, &[big(seq as u32)]))
            .await
            .expect("write");
        s.finish().expect("finish");
        streams.push(s);
        if seq < 4 {
            wait_for_stats(&t.server, "the stream's batch read", |s| {
                s.batches_received > seq
            })
            .await;
        }
    }
    // Give the server every chance to read more; it must not (this can only fail if it does).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(t.server.stats().batches_received, 4);
    // What happens once the sink drains is up to the scheduler: this producer breaks
    // PROTOCOL §3 by starting a new stream before the old one is acked, so the waiting streams
    // may take their turns out of sequence order and fail with SEQUENCE_GAP.
    drop(fifo);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnected_producer_gets_the_acks_of_batches_accepted_before_without_resending() {
    let (t, fifo) = start_slow("").await;
    let first = t.connect("sensor-7", "s3cret", &["slow"]).await;
    let mut s = first.stream().await;
    s.write_all(&batch_bytes(0, 0, &[big(0)]))
        .await
        .expect("write");
    // Accepted, but the sink blocks: not acked yet.
    wait_for_stats(&t.server, "batch 0 accepted", |s| s.batches_accepted == 1).await;
    let mut second = Producer::connect(&t.server).await;
    let welcome = second.hello("sensor-7", "s3cret", &["slow"]).await;
    let Frame::Welcome(welcome) = welcome else {
        panic!("expected welcome, got {welcome:?}")
    };
    assert_eq!(
        welcome.pipelines,
        vec![frame::PipelineState {
            next_sequence: 1,
            acked_below: 0
        }]
    );
    // PROTOCOL §9: batch 0 is acked on the new connection without being resent.
    fifo.read_lines(1).await;
    second.ack_reaching(0, 1).await;
    assert_eq!(t.server.stats().batches_acked, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_acks_what_was_read_and_closes_with_no_error() {
    let (t, fifo) = start_slow("max_in_flight = 2").await;
    let mut p = t.connect("sensor-7", "s3cret", &["slow"]).await;
    let mut s = p.stream().await;
    let writer = tokio::spawn(async move {
        for seq in 0..4 {
            if s.write_all(&batch_bytes(0, seq, &[big(seq as u32)]))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    wait_for_stats(&t.server, "2 batches read", |s| s.batches_received >= 2).await;
    let TestServer { server, dir: _dir } = t;
    let (addr, fingerprint) = (server.local_addr(), server.fingerprint());
    let shutdown = tokio::spawn(server.shutdown());
    assert_eq!(
        p.next().await,
        Some(Frame::Goaway(frame::Goaway {
            message: "shutting down".into()
        }))
    );
    // Shutdown waits for the blocked sink; meanwhile a new producer is refused.
    let mut late = Producer::connect_with_addr(addr, &fingerprint).await;
    assert_eq!(
        late.hello("other", "other-token", &["clicks"]).await,
        Frame::Refuse(frame::Refuse {
            code: ErrorCode::ShuttingDown,
            message: "the server is shutting down".into()
        })
    );
    // Unblock the sink: the two batches read get written and acked.
    // (Batch 2 is larger than the pipe: its flush waits for reads that never come.)
    fifo.read_lines(2).await;
    p.ack_reaching(0, 2).await;
    assert_eq!(
        p.next().await,
        None,
        "the control stream ends after the last ack"
    );
    let (close_code, reason) = app_close(&p.closed().await);
    assert_eq!((close_code, reason.as_str()), (0, "shutting down"));
    let report = within("shutdown", shutdown)
        .await
        .expect("join")
        .expect("shutdown");
    assert_eq!(report.problems, Vec::<String>::new());
    assert_eq!(report.stats.batches_accepted, 2);
    assert_eq!(report.stats.batches_acked, 2);
    writer.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_gives_up_on_a_sink_that_keeps_failing() {
    // /dev/full: every write fails with ENOSPC, so the flush is retried while the server runs.
    let extra = r#"
[pipelines.full]
sinks = ["full"]

[sinks.full]
type = "file"
path = "/dev/full"
fsync = "never"
"#;
    let t = TestServer::start("", extra).await;
    let p = t.connect("sensor-7", "s3cret", &["full"]).await;
    let mut s = p.stream().await;
    s.write_all(&batch_bytes(0, 0, &[click(1, "curl/8")]))
        .await
        .expect("write");
    wait_for_stats(&t.server, "the batch accepted", |s| s.batches_accepted == 1).await;
    // Let the sink sit in its retry loop for a while: shutdown must still end.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let TestServer { server, dir: _dir } = t;
    let report = within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    assert_eq!(
        report.problems,
        vec![
            "pipeline `full`: sink `full` gave up delivering to file /dev/full (no fsync); its batches are not acked".to_string(),
            "sink `full`: cannot write file /dev/full: No space left on device (os error 28); \
             cutting it back to its last whole line also failed: Invalid argument (os error 22) \
             (it is reopened and repaired before the next write); 1 buffered events of sink \
             `full` not delivered"
                .to_string(),
        ]
    );
    assert_eq!(
        (report.stats.batches_accepted, report.stats.batches_acked),
        (1, 0),
        "the batch stays unacked: the producer resends it to the next server"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_generated_certificate_is_reused_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config_text("", "");
    let server = start_in(dir.path(), &text).await;
    let fingerprint = server.fingerprint();
    let cert = std::fs::read(dir.path().join("data/tls/cert.pem")).expect("cert written");
    assert_eq!(server.cert_path(), dir.path().join("data/tls/cert.pem"));
    assert!(server.cert_generated());
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    let again = start_in(dir.path(), &text).await;
    assert_eq!(again.fingerprint(), fingerprint);
    assert_eq!(
        std::fs::read(dir.path().join("data/tls/cert.pem")).expect("cert"),
        cert
    );
    let der = CertificateDer::pem_slice_iter(&cert)
        .next()
        .expect("a certificate")
        .expect("pem");
    use rustls::pki_types::pem::PemObject;
    assert_eq!(weir_client::tls::fingerprint(&der), fingerprint);
}

fn ca() -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("ca cert");
    (rcgen::Issuer::new(params, key), cert.pem())
}

fn client_cert(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    name: &str,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, issuer).expect("signed");
    let key = PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
    (vec![cert.der().clone()], key)
}

#[tokio::test(flavor = "multi_thread")]
async fn client_certificates_authenticate_the_producer_they_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (issuer, ca_pem) = ca();
    std::fs::write(dir.path().join("ca.pem"), ca_pem).expect("write ca");
    let text = config_text("", "\n[tls]\nclient_ca = \"ca.pem\"\n");
    let server = start_in(dir.path(), &text).await;

    let mut p = Producer::connect_with(&server, Some(client_cert(&issuer, "sensor-9"))).await;
    let answer = p.hello("sensor-9", "", &["clicks"]).await;
    assert!(matches!(answer, Frame::Welcome(_)), "{answer:?}");

    let mut p = Producer::connect_with(&server, Some(client_cert(&issuer, "sensor-9"))).await;
    let answer = p.hello("sensor-10", "", &["clicks"]).await;
    assert_eq!(
        answer,
        Frame::Refuse(frame::Refuse {
            code: ErrorCode::Unauthenticated,
            message:
                "producer `sensor-10`: the client certificate is not valid for this producer id"
                    .into()
        })
    );
    // Token producers still connect without a certificate.
    let mut p = Producer::connect(&server).await;
    let answer = p.hello("sensor-7", "s3cret", &["clicks"]).await;
    assert!(matches!(answer, Frame::Welcome(_)), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_go_to_the_dead_letter_file_and_are_counted() {
    let extra = r#"
[pipelines.geo]
sinks = ["discard"]

[[pipelines.geo.stages]]
plugin = "example:geo-enrich"
with = { table = { FR = "France" } }
"#;
    let t = TestServer::start("", extra).await;
    let mut p = t.connect("sensor-7", "s3cret", &["geo"]).await;
    let mut s = p.stream().await;
    let events = [
        Event::new("{\"country_code\":\"FR\"}", 1),
        Event::new("not json", 2),
    ];
    s.write_all(&batch_bytes(0, 0, &events))
        .await
        .expect("write");
    p.ack_reaching(0, 1).await;
    let dead =
        std::fs::read_to_string(t.path("data/dead-letters/geo.jsonl")).expect("dead letters");
    let lines: Vec<&str> = dead.lines().collect();
    assert_eq!(lines.len(), 1, "{dead}");
    assert!(
        lines[0].starts_with(
            "{\"value_text\":\"not json\",\"timestamp_ms\":2,\"headers\":{\"weir-error\":"
        ),
        "{dead}"
    );
    assert!(
        lines[0].contains("\"weir-stage\":\"geo-enrich\",\"weir-plugin\":\"geo-enrich\""),
        "{dead}"
    );
    let stats = t.server.stats();
    assert_eq!(stats.dead_letters, 1);
    assert_eq!(stats.pipelines["geo"].events_out, 1);
}

/// A pipeline `sums` (count-sum per key over one-minute windows) into `sums.jsonl`, with
/// `checkpoint_line` added to it.
fn sums_pipeline(checkpoint_line: &str) -> String {
    format!(
        r#"
[pipelines.sums]
sinks = ["sums"]
{checkpoint_line}

[[pipelines.sums.stages]]
plugin = "example:count-sum"
window = "tumbling:60s"

[sinks.sums]
type = "file"
path = "sums.jsonl"
"#
    )
}

fn amount(key: &str, n: u32, ms: i64) -> Event {
    Event::new(format!("{{\"amount\":{n}}}"), ms).with_key(key.to_owned())
}

/// The first minute's results of `first_minute()`, sorted.
const FIRST_MINUTE: [&str; 2] = [
    r#"{"key":"a","value":{"count":2,"sum":3.0,"start_ms":0,"end_ms":60000},"timestamp_ms":59999}"#,
    r#"{"key":"b","value":{"count":1,"sum":5.0,"start_ms":0,"end_ms":60000},"timestamp_ms":59999}"#,
];

fn first_minute() -> [Event; 3] {
    [
        amount("a", 1, 1_000),
        amount("b", 5, 2_000),
        amount("a", 2, 3_000),
    ]
}

fn sorted_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_checkpoint_shutdown_finishes_open_aggregate_windows() {
    let t = TestServer::start("", &sums_pipeline("checkpoint = false")).await;
    let mut p = t.connect("sensor-7", "s3cret", &["sums"]).await;
    let mut s = p.stream().await;
    s.write_all(&batch_bytes(0, 0, &first_minute()))
        .await
        .expect("write");
    p.ack_reaching(0, 1).await;
    let sums = t.path("sums.jsonl");
    assert_eq!(
        sorted_lines(&sums),
        Vec::<String>::new(),
        "the window is still open"
    );
    let TestServer { server, dir: _dir } = t;
    let report = within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    assert_eq!(report.problems, Vec::<String>::new());
    assert_eq!(sorted_lines(&sums), FIRST_MINUTE);
    assert_eq!(report.stats.pipelines["sums"].events_out, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpointed_aggregate_keeps_its_open_windows_through_a_stop_and_a_restart() {
    let extra = sums_pipeline("");
    let t = TestServer::start("", &extra).await;
    let mut p = t.connect("sensor-7", "s3cret", &["sums"]).await;
    let mut s = p.stream().await;
    s.write_all(&batch_bytes(0, 0, &first_minute()))
        .await
        .expect("write");
    p.ack_reaching(0, 1).await;
    drop(p);
    let TestServer { server, dir } = t;
    let report = within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    assert_eq!(report.problems, Vec::<String>::new());
    let sums = dir.path().join("sums.jsonl");
    assert_eq!(
        sorted_lines(&sums),
        Vec::<String>::new(),
        "kept open, not finished"
    );

    // The next start goes on with the windows and the producer's position.
    let server = start_in(dir.path(), &config_text("", &extra)).await;
    let t = TestServer { server, dir };
    let mut p = Producer::connect(&t.server).await;
    let welcome = p.hello("sensor-7", "s3cret", &["sums"]).await;
    let Frame::Welcome(welcome) = welcome else {
        panic!("expected welcome, got {welcome:?}")
    };
    assert_eq!(
        (
            welcome.pipelines[0].next_sequence,
            welcome.pipelines[0].acked_below
        ),
        (1, 1),
        "batch 0 is in the checkpoint"
    );
    let mut s = p.stream().await;
    // A resend of batch 0 is a duplicate; batch 1 passes the minute and finishes it.
    s.write_all(&batch_bytes(0, 0, &first_minute()))
        .await
        .expect("write");
    s.write_all(&batch_bytes(0, 1, &[amount("a", 4, 61_000)]))
        .await
        .expect("write");
    p.ack_reaching(0, 2).await;
    wait_for_stats(&t.server, "the first minute written", |s| {
        s.pipelines["sums"].events_out == 2
    })
    .await;
    assert_eq!(sorted_lines(&t.path("sums.jsonl")), FIRST_MINUTE);
    assert_eq!(t.server.stats().duplicates_dropped, 3);
}

// ---------------------------------------------------------------------------------------------
// The example config and the command

#[test]
fn the_example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/weir.toml");
    let config = Config::load(&path).expect("examples/weir.toml is valid");
    assert_eq!(
        config.listener.listen,
        "127.0.0.1:4433".parse().expect("addr")
    );
    let summary: Vec<(String, Vec<String>, Vec<String>)> = config
        .pipelines
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.stages.iter().map(|s| s.plugin.to_string()).collect(),
                p.sinks.iter().map(|r| r.sink.clone()).collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "clicks".into(),
                vec!["example:drop-bots".into(), "example:geo-enrich".into()],
                vec!["clicks-file".into()]
            ),
            ("metrics".into(), vec![], vec!["discard".into()]),
        ]
    );
    assert!(config.data_dir.ends_with("target/weir-example"));
}

/// Kills the child process if the test fails before it exits.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn weir_serve_prints_its_setup_and_stops_on_sigterm() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weir.toml");
    std::fs::write(&config, config_text("", "")).expect("write config");
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("WEIR_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("weir runs"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while lines.last().map(String::as_str) != Some("Ctrl-C or SIGTERM stops gracefully.") {
        match rx.recv_timeout(WAIT) {
            Ok(line) => lines.push(line),
            Err(e) => panic!("weir serve printed {lines:?}, then: {e}"),
        }
    }
    assert!(
        lines[0].starts_with("weir serve: listening on 127.0.0.1:"),
        "{lines:?}"
    );
    let cert = dir.path().join("data/tls/cert.pem");
    let der = std::fs::read(&cert).expect("certificate generated");
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(&der).expect("pem");
    assert_eq!(
        lines[1],
        format!(
            "certificate fingerprint (SHA-256): {}",
            weir_client::tls::fingerprint(&der)
        )
    );
    assert_eq!(
        lines[2..],
        [
            format!(
                "certificate: {} (self-signed, generated once; pin it with `weir send --pin FINGERPRINT`)",
                cert.display()
            ),
            "pipeline `clicks`:".into(),
            format!(
                "  stage 1: drop-bots (filter example:drop-bots {}, compiled)",
                weir::runtime::Digest::of(weir::examples::DROP_BOTS).short()
            ),
            format!(
                "  sink: clicks: file {} (fsync on ack), when_full = block",
                dir.path().join("clicks.jsonl").display()
            ),
            format!(
                "  dead letters: clicks/dead-letters: file {} (fsync on ack), when_full = block",
                dir.path().join("data/dead-letters/clicks.jsonl").display()
            ),
            "  workers: 2, whole batches by producer or partition".into(),
            "pipeline `restricted`:".into(),
            "  stages: none (events go to the sinks as they come)".into(),
            "  sink: discard: null (discards events), when_full = block".into(),
            format!(
                "  dead letters: restricted/dead-letters: file {} (fsync on ack), when_full = block",
                dir.path()
                    .join("data/dead-letters/restricted.jsonl")
                    .display()
            ),
            "  workers: 1".into(),
            format!(
                "try: weir send --to {} --pin {} --pipeline clicks --generate 1000",
                lines[0]
                    .split(' ')
                    .nth(4)
                    .expect("the address in the first line"),
                weir_client::tls::fingerprint(&der)
            ),
            format!(
                "config: {} (reloaded on change, on SIGHUP and on `weir reload`)",
                dir.path().join("weir.toml").display()
            ),
            "Ctrl-C or SIGTERM stops gracefully.".into(),
        ]
    );
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    match rx.recv_timeout(WAIT) {
        Ok(line) => assert_eq!(
            line,
            "weir serve: stopped; 0 batches (0 events) accepted, 0 acked, 0 duplicate events dropped, 0 events out, 0 dead letters"
        ),
        Err(e) => panic!("no summary after SIGTERM: {e}"),
    }
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "weir serve did not exit"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "exit status {status}");
}

// ---------------------------------------------------------------------------------------------
// Producers that vanish

/// A UDP relay between one client and the server that can go silent: a producer that
/// vanishes (no close, no answer to anything) without killing a process.
struct Relay {
    addr: std::net::SocketAddr,
    silent: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(server: std::net::SocketAddr) -> Relay {
        use std::sync::atomic::Ordering;
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("the relay's front");
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("the relay's back");
        back.connect(server).await.expect("the relay's server");
        let addr = front.local_addr().expect("the relay's address");
        let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = {
            let silent = silent.clone();
            tokio::spawn(async move {
                let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
                let mut client = None;
                loop {
                    tokio::select! {
                        Ok((n, from)) = front.recv_from(&mut up) => {
                            client = Some(from);
                            if !silent.load(Ordering::Acquire) {
                                let _ = back.send(&up[..n]).await;
                            }
                        }
                        Ok(n) = back.recv(&mut down) => {
                            if let (Some(client), false) = (client, silent.load(Ordering::Acquire)) {
                                let _ = front.send_to(&down[..n], client).await;
                            }
                        }
                    }
                }
            })
        };
        Relay { addr, silent, task }
    }

    /// From now on nothing passes either way.
    fn vanish(&self) {
        self.silent
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn welcomed(p: &mut Producer, id: &str, token: &str) {
    let answer = p.hello(id, token, &["clicks"]).await;
    assert!(matches!(answer, Frame::Welcome(_)), "{id}: {answer:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vanished_producer_gives_its_slot_up_and_a_live_idle_one_keeps_it() {
    let t = TestServer::start(
        "max_producers_per_pipeline = 2",
        "[auth]\nanonymous = true\n",
    )
    .await;
    let (addr, fingerprint) = (t.server.local_addr(), t.server.fingerprint());
    let r1 = Relay::start(addr).await;
    let mut old = Producer::connect_with_addr(r1.addr, &fingerprint).await;
    welcomed(&mut old, "sensor-7", "s3cret").await;
    let r2 = Relay::start(addr).await;
    let mut vanishing = Producer::connect_with_addr(r2.addr, &fingerprint).await;
    welcomed(&mut vanishing, "other", "other-token").await;

    // The pipeline is full, but a producer id reconnecting takes over its own slot.
    let mut live = Producer::connect_with_addr(addr, &fingerprint).await;
    welcomed(&mut live, "sensor-7", "s3cret").await;
    drop(old);

    // `other` vanishes: no close, no answer to pings. Until it has been quiet for a few keep-alive
    // intervals its slot is taken; then it goes to the next producer.
    r2.vanish();
    assert_eq!(
        refused(&t, "third", "", &["clicks"]).await.0,
        ErrorCode::TooManyProducers
    );
    let started = std::time::Instant::now();
    let mut third = loop {
        let mut p = Producer::connect(&t.server).await;
        match p.hello("third", "", &["clicks"]).await {
            Frame::Welcome(_) => break p,
            Frame::Refuse(r) if r.code == ErrorCode::TooManyProducers => {
                assert!(
                    started.elapsed() < WAIT,
                    "the slot was never reclaimed: {}",
                    r.message
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("expected welcome or TOO_MANY_PRODUCERS, got {other:?}"),
        }
    };
    println!(
        "a vanished producer's slot went to another after {} ms",
        started.elapsed().as_millis()
    );

    // `sensor-7` was idle all along and answered the pings: it kept its slot and still works.
    let mut s = live.stream().await;
    let lines = send_clicks(&mut s, 0).await;
    live.ack_reaching(0, 1).await;
    let mut s = third.stream().await;
    let more = send_clicks(&mut s, 1).await;
    third.ack_reaching(0, 2).await;
    assert_eq!(t.clicks(), format!("{lines}{more}"));
    drop(vanishing);
}
