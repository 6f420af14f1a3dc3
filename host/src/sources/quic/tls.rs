//! The server's TLS: its certificate (files, or a self-signed one generated once into the data
//! directory), the rustls config with ALPN `weir/1`, and producer identity from client
//! certificates.
//!
//! **Client certificates.** With `client_ca` configured, rustls verifies a client certificate
//! against those CAs during the handshake (`WebPkiClientVerifier`, unauthenticated clients
//! allowed so that token producers still connect). A verified certificate authenticates a
//! producer id when the certificate is valid for it as a DNS name: the id must appear in the
//! certificate's subjectAltName `dNSName` entries (webpki's server-name rule; the subject CN is
//! ignored, as browsers do). Producer ids that are not DNS names can only use tokens.

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use weir_format::frame::ALPN;

use super::config::ListenerConfig;

/// The server's TLS material, ready for quinn.
pub(crate) struct Tls {
    /// The rustls config (ALPN set, TLS 1.3 only, no 0-RTT).
    pub config: rustls::ServerConfig,
    /// SHA-256 of the leaf certificate served, 64 hex digits.
    pub fingerprint: String,
    /// Where the certificate lives.
    pub cert_path: PathBuf,
    /// Whether it was generated (self-signed, in the data directory).
    pub generated: bool,
}

/// The generated certificate's files inside the data directory.
pub(crate) fn generated_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// Loads or generates the certificate and builds the rustls config.
pub(crate) fn setup(listener: &ListenerConfig, data_dir: &Path) -> Result<Tls> {
    let configured = listener.tls.as_ref().and_then(|t| t.cert_key.clone());
    let generated = configured.is_none();
    let (cert_path, key_path) = match configured {
        Some(paths) => paths,
        None => {
            let (cert, key) = generated_paths(data_dir);
            if !cert.exists() || !key.exists() {
                generate(&cert, &key)?;
            }
            (cert, key)
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("cannot read certificate {}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("certificate {}: not valid PEM", cert_path.display()))?;
    let Some(leaf) = chain.first() else {
        bail!("certificate {}: no certificate in it", cert_path.display());
    };
    let fingerprint = weir_client::tls::fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("cannot read private key {}", key_path.display()))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = match listener.tls.as_ref().and_then(|t| t.client_ca.as_ref()) {
        None => WebPkiClientVerifier::no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("cannot read client CA {}", ca.display()))?;
            for cert in certs {
                let cert =
                    cert.with_context(|| format!("client CA {}: not valid PEM", ca.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("client CA {}: not a CA certificate", ca.display()))?;
            }
            if roots.is_empty() {
                bail!("client CA {}: no certificate in it", ca.display());
            }
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .with_context(|| format!("client CA {}", ca.display()))?
        }
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "certificate {} and key {} do not go together",
                cert_path.display(),
                key_path.display()
            )
        })?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    Ok(Tls {
        config: tls,
        fingerprint,
        cert_path,
        generated,
    })
}

/// Generates a self-signed certificate for `localhost` into `cert` and `key` (the key readable
/// by its owner only).
fn generate(cert: &Path, key: &Path) -> Result<()> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .context("cannot generate a self-signed certificate")?;
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_private(key, certified.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(cert, certified.cert.pem())
        .with_context(|| format!("cannot write {}", cert.display()))?;
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Whether the connection's verified client certificate is valid for `producer_id` (see the
/// module docs); `None` when the client presented no certificate.
pub(crate) fn certificate_names(conn: &quinn::Connection, producer_id: &str) -> Option<bool> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = chain.first()?;
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
        return Some(false);
    };
    let Ok(name) = ServerName::try_from(producer_id) else {
        return Some(false);
    };
    Some(cert.verify_is_valid_for_subject_name(&name).is_ok())
}
