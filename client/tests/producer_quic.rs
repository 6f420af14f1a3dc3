//! The QUIC producer against a small in-test `weir/1` server: handshake, batches, acks,
//! refusals, pinning, backpressure, stream errors and reconnects. The server keeps per-producer
//! sequence state across connections like the real one (docs/PROTOCOL.md §9) and records every
//! accepted event, so the tests check exactly what arrived.

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use quinn::{Connection, Endpoint, VarInt};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{Notify, mpsc};
use weir_client::tls::fingerprint;
use weir_client::{
    ClientError, ConnectOptions, ErrorCode, Event, Producer, ReconnectPolicy, Trust,
};
use weir_format::frame::{
    ALPN, Ack, Decoder, ErrorFrame, Frame, Goaway, Limits, PipelineState, Refuse, Welcome, encode,
};

/// What the test server does besides accepting and acking.
#[derive(Clone, Default)]
struct Behaviour {
    /// `hello` tokens other than this are refused with UNAUTHENTICATED.
    token: Vec<u8>,
    /// Close the first connection (INTERNAL_ERROR, retryable) right after accepting this many
    /// batches, before acking the last one.
    cut_after_batches: Option<u64>,
    /// Acks wait until `release` is notified.
    hold_acks: bool,
    /// Refuse the stream of the batch with this sequence as INVALID_BATCH.
    reject_sequence: Option<u64>,
    /// On the first connection, send `goaway` after acking this many batches.
    goaway_after_batches: Option<u64>,
}

/// The server's certificate, and the CA its clients' certificates must chain to (mutual TLS).
struct ServerTls {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<CertificateDer<'static>>,
}

impl ServerTls {
    fn self_signed() -> ServerTls {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("rcgen certificate");
        ServerTls {
            chain: vec![certified.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                certified.signing_key.serialize_der(),
            )),
            client_ca: None,
        }
    }
}

#[derive(Default)]
struct PipeState {
    next: u64,
    acked: u64,
    values: Vec<String>,
}

struct TestServer {
    addr: SocketAddr,
    fingerprint: String,
    state: Arc<Mutex<HashMap<(String, String), PipeState>>>,
    connections: Arc<Mutex<u64>>,
    release: Arc<Notify>,
    _endpoint: Endpoint,
}

impl TestServer {
    fn values(&self, producer: &str, pipeline: &str) -> Vec<String> {
        let state = self.state.lock().expect("state lock");
        state
            .get(&(producer.to_string(), pipeline.to_string()))
            .map(|p| p.values.clone())
            .unwrap_or_default()
    }

    fn connections(&self) -> u64 {
        *self.connections.lock().expect("lock")
    }
}

fn start(behaviour: Behaviour) -> TestServer {
    start_with(behaviour, ServerTls::self_signed())
}

fn start_with(behaviour: Behaviour, tls: ServerTls) -> TestServer {
    let cert = tls.chain[0].clone();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3");
    let builder = match tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca).expect("client CA");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut crypto = builder
        .with_single_cert(tls.chain, tls.key)
        .expect("server certificate");
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).expect("quic tls");
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let endpoint =
        Endpoint::server(config, "127.0.0.1:0".parse().expect("addr")).expect("server endpoint");
    let server = TestServer {
        addr: endpoint.local_addr().expect("local addr"),
        fingerprint: fingerprint(&cert),
        state: Arc::default(),
        connections: Arc::default(),
        release: Arc::new(Notify::new()),
        _endpoint: endpoint.clone(),
    };
    let state = server.state.clone();
    let connections = server.connections.clone();
    let release = server.release.clone();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let first = {
                let mut count = connections.lock().expect("lock");
                *count += 1;
                *count == 1
            };
            tokio::spawn(serve(
                conn,
                behaviour.clone(),
                state.clone(),
                first,
                release.clone(),
            ));
        }
    });
    server
}

fn frame_bytes(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    encode(frame, &mut out).expect("encodes");
    out
}

async fn serve(
    conn: Connection,
    behaviour: Behaviour,
    state: Arc<Mutex<HashMap<(String, String), PipeState>>>,
    first: bool,
    release: Arc<Notify>,
) {
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let mut decoder = Decoder::control_from_client();
    let hello = loop {
        let Ok(Some(chunk)) = recv.read_chunk(65536, true).await else {
            return;
        };
        let mut input: &[u8] = &chunk.bytes;
        if let Ok(Some(Frame::Hello(hello))) = decoder.decode(&mut input) {
            break hello;
        }
    };
    if hello.token != behaviour.token {
        let refuse = Frame::Refuse(Refuse {
            code: ErrorCode::Unauthenticated,
            message: "token not accepted".into(),
        });
        let _ = send.write_all(&frame_bytes(&refuse)).await;
        let _ = send.finish();
        // Let the refusal reach the client before the close.
        let _ = send.stopped().await;
        conn.close(VarInt::from_u32(3), b"token not accepted");
        return;
    }
    let pipelines = hello.pipelines.clone();
    let states = {
        let state = state.lock().expect("lock");
        pipelines
            .iter()
            .map(|p| {
                state.get(&(hello.producer_id.clone(), p.clone())).map_or(
                    PipelineState {
                        next_sequence: 0,
                        acked_below: 0,
                    },
                    |s| PipelineState {
                        next_sequence: s.next,
                        acked_below: s.acked,
                    },
                )
            })
            .collect()
    };
    let welcome = Frame::Welcome(Welcome {
        version: 1,
        limits: Limits::DEFAULT,
        pipelines: states,
    });
    if send.write_all(&frame_bytes(&welcome)).await.is_err() {
        return;
    }
    let (control_tx, mut control_rx) = mpsc::unbounded_channel::<Frame>();
    let control_conn = conn.clone();
    tokio::spawn(async move {
        while let Some(frame) = control_rx.recv().await {
            if send.write_all(&frame_bytes(&frame)).await.is_err() {
                return;
            }
            if matches!(frame, Frame::Goaway(_)) {
                // Like the real server: once what it accepted is acked, close with NO_ERROR
                // (after the client has received every frame sent so far).
                let _ = send.finish();
                let _ = send.stopped().await;
                control_conn.close(VarInt::from_u32(0), b"");
                return;
            }
        }
    });
    let accepted = Arc::new(Mutex::new(0u64));
    let going_away = Arc::new(Mutex::new(false));
    while let Ok(mut stream) = conn.accept_uni().await {
        let conn = conn.clone();
        let control = control_tx.clone();
        let state = state.clone();
        let producer = hello.producer_id.clone();
        let pipelines = pipelines.clone();
        let behaviour = behaviour.clone();
        let accepted = accepted.clone();
        let going_away = going_away.clone();
        let release = release.clone();
        tokio::spawn(async move {
            let mut decoder = Decoder::batch_stream(Limits::DEFAULT, pipelines.len());
            while let Ok(Some(chunk)) = stream.read_chunk(1 << 20, true).await {
                let mut input: &[u8] = &chunk.bytes;
                while !input.is_empty() {
                    let Ok(Some(Frame::Batch(batch))) = decoder.decode(&mut input) else {
                        continue;
                    };
                    if behaviour.reject_sequence == Some(batch.sequence) {
                        let _ = control.send(Frame::Error(ErrorFrame {
                            code: ErrorCode::InvalidBatch,
                            stream: stream.id().index() * 4 + 2,
                            message: format!("batch {}: rejected by the test", batch.sequence),
                        }));
                        let _ = stream.stop(VarInt::from_u32(8));
                        return;
                    }
                    if *going_away.lock().expect("lock") {
                        // Like the real server after `goaway`: nothing new is accepted.
                        continue;
                    }
                    let pipeline = pipelines[usize::from(batch.pipeline)].clone();
                    let events = batch.verify().expect("valid batch").to_events();
                    let next = {
                        let mut state = state.lock().expect("lock");
                        let p = state.entry((producer.clone(), pipeline)).or_default();
                        if batch.sequence < p.next {
                            // A resend of an accepted batch: everything accepted is held here.
                            let _ = control.send(Frame::Ack(Ack {
                                pipeline: batch.pipeline,
                                next: p.next,
                            }));
                            p.acked = p.next;
                            continue;
                        }
                        assert!(
                            p.next == 0 || batch.sequence == p.next,
                            "sequence gap: {} after {}",
                            batch.sequence,
                            p.next
                        );
                        p.next = batch.sequence + 1;
                        p.values.extend(
                            events
                                .iter()
                                .map(|e| String::from_utf8_lossy(&e.value).into_owned()),
                        );
                        p.next
                    };
                    let count = {
                        let mut accepted = accepted.lock().expect("lock");
                        *accepted += 1;
                        *accepted
                    };
                    if first && behaviour.cut_after_batches == Some(count) {
                        conn.close(VarInt::from_u32(0x0d), b"cut by the test");
                        return;
                    }
                    if behaviour.hold_acks {
                        release.notified().await;
                    }
                    if first && behaviour.goaway_after_batches == Some(count) {
                        *going_away.lock().expect("lock") = true;
                        let _ = control.send(Frame::Goaway(Goaway {
                            message: "shutting down".into(),
                        }));
                    }
                    {
                        let mut state = state.lock().expect("lock");
                        let key = (
                            producer.clone(),
                            pipelines[usize::from(batch.pipeline)].clone(),
                        );
                        if let Some(p) = state.get_mut(&key) {
                            p.acked = p.acked.max(next);
                        }
                    }
                    let _ = control.send(Frame::Ack(Ack {
                        pipeline: batch.pipeline,
                        next,
                    }));
                }
            }
        });
    }
}

fn options(server: &TestServer) -> ConnectOptions {
    ConnectOptions::new(server.addr, "sensor-7", ["clicks"])
        .pin(&server.fingerprint)
        .expect("a fingerprint")
        .batch_events(10)
        .linger(Duration::from_millis(1))
        .reconnect(ReconnectPolicy {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            give_up_after: Some(Duration::from_secs(20)),
        })
}

fn sendable<F: Future + Send>(future: F) -> F {
    future
}

fn event(i: u64) -> Event {
    Event::new(format!("{{\"n\":{i}}}"), 1_700_000_000_000 + i as i64).with_key("k")
}

fn expected(n: u64) -> Vec<String> {
    (0..n).map(|i| format!("{{\"n\":{i}}}")).collect()
}

#[tokio::test]
async fn events_are_sent_acked_flushed_and_closed() {
    let server = start(Behaviour::default());
    let producer = Producer::connect(options(&server)).await.expect("connects");
    // Every future is Send, so producers work from spawned tasks.
    let first = sendable(producer.send("clicks", event(0)))
        .await
        .expect("sent");
    sendable(first.into_future()).await.expect("acked");
    for i in 1..1000 {
        producer.send("clicks", event(i)).await.expect("sent");
    }
    sendable(producer.flush()).await.expect("flushed");
    assert_eq!(server.values("sensor-7", "clicks"), expected(1000));
    let stats = producer.stats();
    assert_eq!(stats.events_sent, 1000);
    assert_eq!(stats.events_acked, 1000);
    assert_eq!(stats.batches_acked, stats.batches_sent);
    assert_eq!(stats.reconnects, 0);
    producer.close().await.expect("closed");
    assert_eq!(
        producer.send("clicks", event(1000)).await.map(|_| ()),
        Err(ClientError::ProducerClosed)
    );
    assert_eq!(
        producer.send("nope", event(0)).await.map(|_| ()),
        Err(ClientError::UnknownPipelineName("nope".into()))
    );
}

#[tokio::test]
async fn a_refused_hello_names_the_code_and_the_message() {
    let server = start(Behaviour {
        token: b"s3cret".to_vec(),
        ..Behaviour::default()
    });
    let error = Producer::connect(options(&server).token("wrong"))
        .await
        .expect_err("refused");
    assert_eq!(
        error,
        ClientError::Refused {
            server: server.addr.to_string(),
            code: ErrorCode::Unauthenticated,
            message: "token not accepted".into(),
        }
    );
    assert_eq!(
        error.to_string(),
        format!(
            "refused by {}: UNAUTHENTICATED (0x03): token not accepted",
            server.addr
        )
    );
    let producer = Producer::connect(options(&server).token("s3cret"))
        .await
        .expect("the right token connects");
    producer.close().await.expect("closed");
}

#[tokio::test]
async fn another_certificate_than_the_pinned_one_is_refused() {
    let server = start(Behaviour::default());
    let other = start(Behaviour::default());
    let options = ConnectOptions::new(server.addr, "sensor-7", ["clicks"])
        .pin(&other.fingerprint)
        .expect("a fingerprint");
    let error = Producer::connect(options).await.expect_err("wrong pin");
    let ClientError::Connect {
        server: addr,
        message,
    } = &error
    else {
        panic!("unexpected error {error:?}");
    };
    assert_eq!(addr, &server.addr.to_string());
    let mismatch = format!(
        "server certificate has fingerprint {}, but the pinned fingerprint is {}",
        server.fingerprint, other.fingerprint
    );
    assert!(message.contains(&mismatch), "{message}");
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn no_trust_is_refused_before_connecting() {
    let addr = "127.0.0.1:9".parse().expect("addr");
    let error = Producer::connect(ConnectOptions::new(addr, "p", ["clicks"]))
        .await
        .expect_err("no trust");
    assert_eq!(error, ClientError::NoTrust);
    assert_eq!(
        ConnectOptions::new(addr, "p", ["clicks"])
            .pin("abc")
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err("invalid producer config: fingerprint `abc` is not 64 hex digits (the SHA-256 of the certificate)".into())
    );
}

#[tokio::test]
async fn a_cut_connection_is_resumed_without_loss_or_duplicate() {
    let server = start(Behaviour {
        cut_after_batches: Some(3),
        ..Behaviour::default()
    });
    let producer = Producer::connect(options(&server)).await.expect("connects");
    for i in 0..200 {
        producer.send("clicks", event(i)).await.expect("sent");
    }
    producer.flush().await.expect("flushed after the reconnect");
    assert_eq!(server.values("sensor-7", "clicks"), expected(200));
    let stats = producer.stats();
    assert_eq!(stats.reconnects, 1);
    assert_eq!(stats.events_acked, 200);
    assert_eq!(server.connections(), 2);
    producer.close().await.expect("closed");
}

#[tokio::test]
async fn send_waits_while_the_buffer_is_full() {
    let server = start(Behaviour {
        hold_acks: true,
        ..Behaviour::default()
    });
    // One event per batch, and room for one such batch: the second event waits for the ack of
    // the first.
    let big = |i: u64| Event::new(format!("{i}{}", "x".repeat(2000)), 0);
    let options = options(&server).batch_events(1).buffer_bytes(3000);
    let producer = Producer::connect(options).await.expect("connects");
    let first = producer.send("clicks", big(0)).await.expect("sent");
    let mut blocked = Box::pin(producer.send("clicks", big(1)));
    let polled = std::future::poll_fn(|cx| Poll::Ready(blocked.as_mut().poll(cx))).await;
    assert!(polled.is_pending(), "send must wait for room");
    assert!(!first.is_acked());
    server.release.notify_one();
    let second = blocked.await.expect("sent once the first batch is acked");
    first.await.expect("acked");
    server.release.notify_one();
    second.await.expect("acked");
    let values: Vec<String> = (0..2).map(|i| format!("{i}{}", "x".repeat(2000))).collect();
    assert_eq!(server.values("sensor-7", "clicks"), values);
    producer.close().await.expect("closed");
}

#[tokio::test]
async fn a_non_retryable_stream_error_fails_pending_acks() {
    let server = start(Behaviour {
        reject_sequence: Some(1),
        ..Behaviour::default()
    });
    let producer = Producer::connect(options(&server)).await.expect("connects");
    let mut acks = Vec::new();
    for i in 0..30 {
        acks.push(producer.send("clicks", event(i)).await.expect("sent"));
    }
    let error = producer.flush().await.expect_err("batch 1 is rejected");
    let ClientError::Server { code, message, .. } = &error else {
        panic!("unexpected error {error:?}");
    };
    assert_eq!(*code, ErrorCode::InvalidBatch);
    assert_eq!(message, "batch 1: rejected by the test");
    assert!(
        error
            .to_string()
            .contains("INVALID_BATCH (0x08): batch 1: rejected by the test"),
        "{error}"
    );
    let mut acks = acks.into_iter();
    for ack in acks.by_ref().take(10) {
        ack.await.expect("batch 0 was accepted and acked");
    }
    for ack in acks {
        assert_eq!(ack.await, Err(error.clone()));
    }
    assert_eq!(
        producer.send("clicks", event(30)).await.map(|_| ()),
        Err(error.clone())
    );
    assert_eq!(producer.close().await, Err(error));
    assert_eq!(server.values("sensor-7", "clicks"), expected(10));
}

#[tokio::test]
async fn goaway_drains_then_resumes_on_a_new_connection() {
    let server = start(Behaviour {
        goaway_after_batches: Some(2),
        ..Behaviour::default()
    });
    let producer = Producer::connect(options(&server)).await.expect("connects");
    for i in 0..100 {
        producer.send("clicks", event(i)).await.expect("sent");
    }
    producer.flush().await.expect("flushed");
    assert_eq!(server.values("sensor-7", "clicks"), expected(100));
    assert_eq!(producer.stats().reconnects, 1);
    assert_eq!(server.connections(), 2);
    producer.close().await.expect("closed");
}

/// A CA, a server certificate for `localhost` and a client certificate, all from it, with the
/// CA and the client's certificate and key written as PEM files into `dir`.
struct Pki {
    server: ServerTls,
    ca_pem: std::path::PathBuf,
    client_cert_pem: std::path::PathBuf,
    client_key_pem: std::path::PathBuf,
}

fn pki(dir: &std::path::Path) -> Pki {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
    let server_key = rcgen::KeyPair::generate().expect("server key");
    let server_cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("server params")
        .signed_by(&server_key, &ca)
        .expect("server certificate");
    let client_key = rcgen::KeyPair::generate().expect("client key");
    let client_cert = rcgen::CertificateParams::new(vec!["sensor-7".to_string()])
        .expect("client params")
        .signed_by(&client_key, &ca)
        .expect("client certificate");
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write PEM");
        path
    };
    Pki {
        server: ServerTls {
            chain: vec![server_cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            client_ca: Some(ca.der().clone()),
        },
        ca_pem: write("ca.pem", ca.pem()),
        client_cert_pem: write("client.pem", client_cert.pem()),
        client_key_pem: write("client.key", client_key.serialize_pem()),
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("weir-client-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[tokio::test]
async fn a_ca_file_and_a_client_certificate_authenticate_both_sides() {
    let dir = temp_dir("pki");
    let pki = pki(&dir);
    let server = start_with(Behaviour::default(), pki.server);
    let base = || {
        ConnectOptions::new(server.addr, "sensor-7", ["clicks"])
            .trust(Trust::CaFile(pki.ca_pem.clone()))
            .linger(Duration::from_millis(1))
    };
    let producer = Producer::connect(
        base()
            .server_name("localhost")
            .client_cert(&pki.client_cert_pem, &pki.client_key_pem),
    )
    .await
    .expect("connects with CA and client certificate");
    producer
        .send("clicks", event(0))
        .await
        .expect("sent")
        .await
        .expect("acked");
    producer.close().await.expect("closed");
    assert_eq!(server.values("sensor-7", "clicks"), expected(1));

    // The certificate is for `localhost`, not for another name.
    let error = Producer::connect(
        base()
            .server_name("elsewhere.example")
            .client_cert(&pki.client_cert_pem, &pki.client_key_pem),
    )
    .await
    .expect_err("wrong name");
    assert!(
        matches!(&error, ClientError::Connect { message, .. } if message.contains("not valid for name")),
        "{error}"
    );

    // Without a client certificate the server refuses the handshake.
    let error = Producer::connect(base().server_name("localhost"))
        .await
        .expect_err("no client certificate");
    assert!(matches!(error, ClientError::Connect { .. }), "{error}");

    // Unreadable files are named.
    let missing = dir.join("missing.pem");
    let error = Producer::connect(base().client_cert(&missing, &pki.client_key_pem))
        .await
        .expect_err("missing file");
    assert!(
        error.to_string().starts_with(&format!(
            "tls setup: cannot read certificate file `{}`: ",
            missing.display()
        )),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[tokio::test]
async fn dropping_the_producer_fails_what_is_not_acked() {
    let server = start(Behaviour {
        hold_acks: true,
        ..Behaviour::default()
    });
    let producer = Producer::connect(options(&server)).await.expect("connects");
    let ack = producer.send("clicks", event(0)).await.expect("sent");
    drop(producer);
    assert_eq!(ack.await, Err(ClientError::ProducerClosed));
}
