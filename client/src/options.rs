//! [`ConnectOptions`]: where a [`Producer`](crate::Producer) connects, how it trusts the server
//! and authenticates itself, how it batches and buffers, and how it reconnects.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use weir_format::frame::ALPN;

use crate::producer::{ClientError, ProducerConfig};
use crate::tls::{PinnedServerVerifier, parse_fingerprint};

/// How the producer verifies the server's certificate (docs/PROTOCOL.md §2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Accept exactly the certificate with this SHA-256 fingerprint (names and dates ignored).
    Pinned([u8; 32]),
    /// Verify the certificate chain and the server name against the CA certificates in this
    /// PEM file.
    CaFile(PathBuf),
    /// Verify the certificate chain and the server name against these CA certificates (DER).
    CaCertificates(Vec<CertificateDer<'static>>),
}

impl Trust {
    /// Pins the fingerprint `weir serve` printed: 64 hex digits, optionally `:`-separated.
    pub fn pin(fingerprint: &str) -> Result<Trust, ClientError> {
        parse_fingerprint(fingerprint)
            .map(Trust::Pinned)
            .map_err(ClientError::InvalidConfig)
    }
}

/// How the producer reconnects after losing its connection: exponential backoff from `initial`
/// doubling up to `max` between attempts, giving up (failing every pending ack) when no
/// connection was re-established within `give_up_after` (`None`: never give up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Delay before the first attempt.
    pub initial_backoff: Duration,
    /// Longest delay between attempts.
    pub max_backoff: Duration,
    /// How long to keep trying after the connection was lost.
    pub give_up_after: Option<Duration>,
}

impl Default for ReconnectPolicy {
    /// 100 ms doubling up to 5 s, giving up after 5 minutes: long enough to ride out a server
    /// restart or a network blip, short enough that a producer whose server is gone reports it.
    fn default() -> Self {
        ReconnectPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            give_up_after: Some(Duration::from_secs(300)),
        }
    }
}

/// Everything [`Producer::connect`](crate::Producer::connect) needs, built from
/// [`ConnectOptions::new`] and refined with its builder methods.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub(crate) addr: SocketAddr,
    pub(crate) server_name: Option<String>,
    pub(crate) trust: Option<Trust>,
    pub(crate) client_cert: Option<(PathBuf, PathBuf)>,
    pub(crate) producer: ProducerConfig,
    pub(crate) reconnect: ReconnectPolicy,
    pub(crate) idle_timeout: Duration,
    pub(crate) keep_alive: Option<Duration>,
    pub(crate) handshake_timeout: Duration,
}

impl ConnectOptions {
    /// Options to connect to the server at `addr` as `producer_id`, writing to `pipelines`,
    /// with the defaults of [`ProducerConfig::new`] and [`ReconnectPolicy::default`], a 30 s
    /// idle timeout with keep-alives every 5 s, and a 10 s handshake timeout. A trust setting
    /// ([`ConnectOptions::pin`], [`ConnectOptions::trust`]) is required.
    pub fn new<S: Into<String>>(
        addr: SocketAddr,
        producer_id: impl Into<String>,
        pipelines: impl IntoIterator<Item = S>,
    ) -> Self {
        let pipelines = pipelines.into_iter().map(Into::into).collect();
        ConnectOptions {
            addr,
            server_name: None,
            trust: None,
            client_cert: None,
            producer: ProducerConfig::new(producer_id, pipelines),
            reconnect: ReconnectPolicy::default(),
            idle_timeout: Duration::from_secs(30),
            keep_alive: Some(Duration::from_secs(5)),
            handshake_timeout: Duration::from_secs(10),
        }
    }

    /// The name checked against the server's certificate with a CA (default: the address's IP;
    /// ignored when pinning).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Pins the server's certificate fingerprint (as printed by `weir serve`).
    pub fn pin(self, fingerprint: &str) -> Result<Self, ClientError> {
        Ok(self.trust(Trust::pin(fingerprint)?))
    }

    /// How to verify the server.
    pub fn trust(mut self, trust: Trust) -> Self {
        self.trust = Some(trust);
        self
    }

    /// Authenticates with a client certificate chain and its private key (PEM files): mutual TLS.
    pub fn client_cert(
        mut self,
        cert_pem: impl Into<PathBuf>,
        key_pem: impl Into<PathBuf>,
    ) -> Self {
        self.client_cert = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Authenticates with this token in `hello`.
    pub fn token(mut self, token: impl Into<Vec<u8>>) -> Self {
        self.producer.token = token.into();
        self
    }

    /// Most events per batch (the server's `max_events_per_frame` caps it further).
    pub fn batch_events(mut self, events: u32) -> Self {
        self.producer.max_batch_events = events;
        self
    }

    /// Target payload bytes per batch (the server's `max_frame_bytes` caps it further).
    pub fn batch_bytes(mut self, bytes: usize) -> Self {
        self.producer.max_batch_bytes = bytes;
        self
    }

    /// How long a batch's first event waits for more events before the batch is sent.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.producer.linger = linger;
        self
    }

    /// Bytes of unacked data the producer holds; `send` waits when they are reached.
    pub fn buffer_bytes(mut self, bytes: usize) -> Self {
        self.producer.max_buffer_bytes = bytes;
        self
    }

    /// How to reconnect after losing the connection.
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// QUIC idle timeout: a connection silent for this long is lost (and reconnected).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Interval of QUIC keep-alive packets (`None`: none); keep it below the idle timeout.
    pub fn keep_alive(mut self, interval: Option<Duration>) -> Self {
        self.keep_alive = interval;
        self
    }

    /// How long a connection attempt (QUIC, TLS, `hello` → `welcome`) may take.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The producer configuration (id, pipelines, token, batching and buffer).
    pub fn producer_config(&self) -> &ProducerConfig {
        &self.producer
    }

    /// The name given to TLS: the configured server name, or the address's IP.
    pub(crate) fn tls_server_name(&self) -> String {
        self.server_name
            .clone()
            .unwrap_or_else(|| self.addr.ip().to_string())
    }

    /// The quinn client configuration: TLS 1.3 with ring, ALPN `weir/1`, no 0-RTT, the trust
    /// and client certificate, the transport knobs; and the pin verifier when pinning, which
    /// explains a rejected certificate.
    pub(crate) fn quinn_config(
        &self,
    ) -> Result<(quinn::ClientConfig, Option<Arc<PinnedServerVerifier>>), ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut pin = None;
        let verifier: Arc<dyn ServerCertVerifier> = match &self.trust {
            None => return Err(ClientError::NoTrust),
            Some(Trust::Pinned(fingerprint)) => {
                let verifier = Arc::new(PinnedServerVerifier::new(*fingerprint, provider.clone()));
                pin = Some(verifier.clone());
                verifier
            }
            Some(Trust::CaFile(path)) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        ClientError::Tls(format!("cannot read CA file `{}`: {e}", path.display()))
                    })?;
                if certs.is_empty() {
                    return Err(ClientError::Tls(format!(
                        "CA file `{}` holds no certificate",
                        path.display()
                    )));
                }
                webpki_verifier(certs, &provider)?
            }
            Some(Trust::CaCertificates(certs)) => webpki_verifier(certs.clone(), &provider)?,
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut crypto = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert_path, key_path)) => {
                let chain = CertificateDer::pem_file_iter(cert_path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        ClientError::Tls(format!(
                            "cannot read certificate file `{}`: {e}",
                            cert_path.display()
                        ))
                    })?;
                if chain.is_empty() {
                    return Err(ClientError::Tls(format!(
                        "certificate file `{}` holds no certificate",
                        cert_path.display()
                    )));
                }
                let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
                    ClientError::Tls(format!(
                        "cannot read private key file `{}`: {e}",
                        key_path.display()
                    ))
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    ClientError::Tls(format!(
                        "client certificate `{}` with key `{}`: {e}",
                        cert_path.display(),
                        key_path.display()
                    ))
                })?
            }
        };
        crypto.alpn_protocols = vec![ALPN.to_vec()];
        crypto.enable_early_data = false;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let mut transport = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout).map_err(|_| {
            ClientError::InvalidConfig(format!(
                "idle timeout of {:?} is too long for QUIC",
                self.idle_timeout
            ))
        })?;
        transport.max_idle_timeout(Some(idle));
        transport.keep_alive_interval(self.keep_alive);
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        Ok((config, pin))
    }
}

fn webpki_verifier(
    certs: Vec<CertificateDer<'static>>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, ClientError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| ClientError::Tls(format!("CA certificate: {e}")))?;
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| ClientError::Tls(format!("CA certificates: {e}")))?;
    Ok(verifier)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::producer::code_label;
    use weir_format::frame::ErrorCode;

    fn options() -> ConnectOptions {
        let addr = "127.0.0.1:4433".parse().expect("an address");
        ConnectOptions::new(addr, "sensor-7", ["clicks", "metrics"])
    }

    #[test]
    fn the_builder_sets_what_it_names() {
        let options = options()
            .token("s3cret")
            .batch_events(100)
            .batch_bytes(65536)
            .linger(Duration::from_millis(7))
            .buffer_bytes(1 << 20);
        let config = options.producer_config();
        assert_eq!(config.producer_id, "sensor-7");
        assert_eq!(config.pipelines, ["clicks", "metrics"]);
        assert_eq!(config.token, b"s3cret");
        assert_eq!(config.max_batch_events, 100);
        assert_eq!(config.max_batch_bytes, 65536);
        assert_eq!(config.linger, Duration::from_millis(7));
        assert_eq!(config.max_buffer_bytes, 1 << 20);
        assert_eq!(options.tls_server_name(), "127.0.0.1");
        assert_eq!(
            options.server_name("weir.example").tls_server_name(),
            "weir.example"
        );
        assert_eq!(
            ReconnectPolicy::default(),
            ReconnectPolicy {
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                give_up_after: Some(Duration::from_secs(300)),
            }
        );
    }

    #[test]
    fn trust_is_required_and_files_are_named() {
        let error = |options: ConnectOptions| {
            options
                .quinn_config()
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            error(options()),
            Err("no way to verify the server: pin the certificate fingerprint `weir serve` printed, or give a CA file".into())
        );
        let pin = "ab".repeat(32);
        assert_eq!(error(options().pin(&pin).expect("a pin")), Ok(()));
        assert_eq!(
            error(options().trust(Trust::CaFile("/nonexistent/ca.pem".into()))).map_err(
                |e| e.starts_with("tls setup: cannot read CA file `/nonexistent/ca.pem`: ")
            ),
            Err(true)
        );
        let empty = std::env::temp_dir().join(format!("weir-empty-{}.pem", std::process::id()));
        std::fs::write(&empty, "").expect("write an empty file");
        assert_eq!(
            error(options().trust(Trust::CaFile(empty.clone()))),
            Err(format!(
                "tls setup: CA file `{}` holds no certificate",
                empty.display()
            ))
        );
        assert_eq!(
            error(
                options()
                    .pin(&pin)
                    .expect("a pin")
                    .client_cert(&empty, "/nonexistent/key.pem")
            ),
            Err(format!(
                "tls setup: certificate file `{}` holds no certificate",
                empty.display()
            ))
        );
        std::fs::remove_file(&empty).expect("clean up");
    }

    #[test]
    fn errors_name_the_code_and_the_server_message() {
        assert_eq!(
            code_label(ErrorCode::Unauthenticated),
            "UNAUTHENTICATED (0x03)"
        );
        assert_eq!(
            code_label(ErrorCode::TooManyProducers),
            "TOO_MANY_PRODUCERS (0x0a)"
        );
        assert_eq!(
            code_label(ErrorCode::Unknown(0x4242)),
            "unknown code (0x4242)"
        );
        let server = "127.0.0.1:4433".to_string();
        assert_eq!(
            ClientError::Refused {
                server: server.clone(),
                code: ErrorCode::UnknownPipeline,
                message: "pipeline `billing`: unknown".into(),
            }
            .to_string(),
            "refused by 127.0.0.1:4433: UNKNOWN_PIPELINE (0x05): pipeline `billing`: unknown"
        );
        assert_eq!(
            ClientError::Server {
                server: server.clone(),
                code: ErrorCode::TooManyEvents,
                stream: 2,
                message: "batch of 9000 events exceeds the limit of 8192 (max_events_per_frame)"
                    .into(),
            }
            .to_string(),
            "error from 127.0.0.1:4433 on stream 2: TOO_MANY_EVENTS (0x07): batch of 9000 events exceeds the limit of 8192 (max_events_per_frame)"
        );
        assert_eq!(
            ClientError::Closed {
                server: server.clone(),
                code: ErrorCode::Superseded,
                message: "a newer connection of producer `sensor-7` took over".into(),
            }
            .to_string(),
            "connection closed by 127.0.0.1:4433: SUPERSEDED (0x0b): a newer connection of producer `sensor-7` took over"
        );
        assert_eq!(
            ClientError::GaveUp {
                server,
                seconds: 300,
                last: "timed out".into(),
            }
            .to_string(),
            "gave up reconnecting to 127.0.0.1:4433 after 300 s: timed out"
        );
    }
}
