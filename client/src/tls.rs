//! Server authentication (docs/PROTOCOL.md §2): certificate fingerprints and the verifier that
//! accepts exactly one pinned certificate.
//!
//! A pinned server is typically one running with a self-signed certificate that `weir serve`
//! generated and whose fingerprint it printed. [`PinnedServerVerifier`] accepts that one
//! certificate and nothing else, ignoring names, dates and issuers (a self-signed certificate
//! has no chain to check), but still verifies the TLS 1.3 handshake signature with the
//! certificate's key, so a server must hold the private key to pass.

use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

/// The fingerprint of a certificate: the SHA-256 of its DER encoding as 64 lowercase hex digits,
/// as `weir serve` prints it and `weir send --pin` takes it.
pub fn fingerprint(der: &[u8]) -> String {
    hex(&Sha256::digest(der))
}

/// Parses a fingerprint as printed by [`fingerprint`]: 64 hex digits, either case, optionally
/// with `:` between bytes (as `openssl x509 -fingerprint -sha256` prints it).
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let digits: String = text.trim().chars().filter(|&c| c != ':').collect();
    if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "fingerprint `{text}` is not 64 hex digits (the SHA-256 of the certificate)"
        ));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("fingerprint `{text}` is not hex"))?;
    }
    Ok(out)
}

/// A server certificate that is not the pinned one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "server certificate has fingerprint {got}, but the pinned fingerprint is {expected} (is this the fingerprint `weir serve` printed?)"
)]
pub struct PinMismatch {
    /// The pinned fingerprint (hex).
    pub expected: String,
    /// The fingerprint of the certificate the server presented (hex).
    pub got: String,
}

/// A rustls [`ServerCertVerifier`] that accepts exactly the end-entity certificate whose
/// SHA-256 is the pinned fingerprint, ignoring names, dates and intermediates, and verifies the
/// handshake signatures with the crypto provider's algorithms.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
    /// The last rejection, for a message without rustls' and quinn's wrapping.
    last_mismatch: Mutex<Option<PinMismatch>>,
}

impl PinnedServerVerifier {
    /// A verifier for the certificate with this SHA-256 `fingerprint` (see
    /// [`parse_fingerprint`]), checking signatures with `provider`'s algorithms.
    pub fn new(fingerprint: [u8; 32], provider: Arc<CryptoProvider>) -> Self {
        PinnedServerVerifier {
            fingerprint,
            provider,
            last_mismatch: Mutex::new(None),
        }
    }

    /// The last certificate this verifier rejected, taken (so a later handshake starts clean).
    pub fn take_mismatch(&self) -> Option<PinMismatch> {
        self.last_mismatch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if digest == self.fingerprint {
            return Ok(ServerCertVerified::assertion());
        }
        let mismatch = PinMismatch {
            expected: hex(&self.fingerprint),
            got: hex(&digest),
        };
        *self
            .last_mismatch
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(mismatch.clone());
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(mismatch)),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::ring;

    fn verifier_for(der: &[u8]) -> PinnedServerVerifier {
        let pin = parse_fingerprint(&fingerprint(der)).expect("a fingerprint parses");
        PinnedServerVerifier::new(pin, Arc::new(ring::default_provider()))
    }

    fn self_signed(name: &str) -> CertificateDer<'static> {
        rcgen::generate_simple_self_signed(vec![name.to_string()])
            .expect("rcgen makes a certificate")
            .cert
            .der()
            .clone()
    }

    #[test]
    fn the_pinned_certificate_is_accepted_whatever_the_name() {
        let cert = self_signed("localhost");
        let verifier = verifier_for(&cert);
        let other_name = ServerName::try_from("elsewhere.example").expect("a name");
        let verified = verifier.verify_server_cert(&cert, &[], &other_name, &[], UnixTime::now());
        assert!(verified.is_ok(), "{verified:?}");
        // Dates are ignored too: a time far after any certificate's validity.
        let late = UnixTime::since_unix_epoch(std::time::Duration::from_secs(u32::MAX as u64 * 4));
        assert!(
            verifier
                .verify_server_cert(&cert, &[], &other_name, &[], late)
                .is_ok()
        );
    }

    #[test]
    fn another_certificate_is_rejected_naming_both_fingerprints() {
        let pinned = self_signed("localhost");
        let other = self_signed("localhost");
        let verifier = verifier_for(&pinned);
        let name = ServerName::try_from("localhost").expect("a name");
        let error = verifier
            .verify_server_cert(&other, &[], &name, &[], UnixTime::now())
            .expect_err("another certificate is rejected");
        let expected = PinMismatch {
            expected: fingerprint(&pinned),
            got: fingerprint(&other),
        };
        let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) = &error
        else {
            panic!("unexpected error {error:?}");
        };
        assert_eq!(inner.to_string(), expected.to_string());
        assert_eq!(verifier.take_mismatch(), Some(expected.clone()));
        assert_eq!(verifier.take_mismatch(), None);
        assert_eq!(
            expected.to_string(),
            format!(
                "server certificate has fingerprint {}, but the pinned fingerprint is {} (is this the fingerprint `weir serve` printed?)",
                fingerprint(&other),
                fingerprint(&pinned)
            )
        );
    }

    #[test]
    fn signature_schemes_come_from_the_provider() {
        let verifier = verifier_for(b"any");
        let schemes = verifier.supported_verify_schemes();
        assert!(schemes.contains(&SignatureScheme::ECDSA_NISTP256_SHA256));
        assert!(schemes.contains(&SignatureScheme::ED25519));
    }

    #[test]
    fn fingerprint_is_sha256_hex_and_parses_back() {
        let hex = fingerprint(b"abc");
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let bytes = parse_fingerprint(&hex).expect("parses");
        assert_eq!(bytes[0], 0xba);
        assert_eq!(bytes[31], 0xad);
        let colons: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_fingerprint(&colons.join(":")), Ok(bytes));
    }

    #[test]
    fn a_bad_fingerprint_is_named() {
        assert_eq!(
            parse_fingerprint("abc"),
            Err("fingerprint `abc` is not 64 hex digits (the SHA-256 of the certificate)".into())
        );
    }
}
