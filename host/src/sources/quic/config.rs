//! The QUIC source's config: the listener, TLS, limits and the producers that may connect
//! (`[listener]`, `[tls]`, `[limits]`, `[auth]` and `[[producers]]` of the config file).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use weir_format::frame::Limits as ProtocolLimits;

/// Where and how the QUIC source listens, and who may connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// The UDP address the server listens on (port 0: any free port).
    pub listen: SocketAddr,
    /// TLS files; `None` for the generated self-signed certificate and no client certificates.
    pub tls: Option<TlsConfig>,
    /// Protocol and server limits.
    pub limits: ServerLimits,
    /// Whether producers that present neither a token nor a client certificate are accepted
    /// (under any producer id that is not configured with a token).
    pub allow_anonymous: bool,
    /// Producers that authenticate with a token.
    pub producers: Vec<ProducerConfig>,
}

/// The `[tls]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Certificate chain (PEM) and private key (PEM) the server presents; `None` for the
    /// self-signed certificate generated into the data directory.
    pub cert_key: Option<(PathBuf, PathBuf)>,
    /// CA certificates (PEM) that sign producers' client certificates (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// The `[limits]` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// The limits announced in `welcome`.
    pub protocol: ProtocolLimits,
    /// Producers connected to one pipeline at once.
    pub max_producers_per_pipeline: u32,
    /// Connections at once (handshaking included); more are refused at the QUIC level.
    pub max_connections: u32,
    /// Time from the QUIC handshake's start to the `hello`.
    pub handshake_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            protocol: ProtocolLimits::DEFAULT,
            max_producers_per_pipeline: 64,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// A producer that authenticates with a token.
#[derive(Clone, PartialEq, Eq)]
pub struct ProducerConfig {
    /// Its producer id.
    pub id: String,
    /// Its token (from the file or the environment).
    pub token: Vec<u8>,
}

impl std::fmt::Debug for ProducerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerConfig")
            .field("id", &self.id)
            .field("token", &"<redacted>")
            .finish()
    }
}
