//! The endpoint's keys, kept in the data directory across restarts.
//!
//! A QUIC server that lost a connection's state (it restarted) answers the peer's next
//! packets with a stateless reset: a token the peer checks against the one the server gave it
//! for that connection ID, derived from the endpoint's reset key. quinn draws two keys at every
//! start: the reset key, and the key of its connection-ID generator, without which a packet
//! for an ID the endpoint did not issue is dropped unanswered. So a restarted server neither
//! answered nor was believed: its producers waited out their idle timeout (30 s) before they
//! reconnected. With one secret kept in `DATA_DIR/quic/reset-key`, from which both keys are
//! derived, a restarted server recognizes its old connection IDs and its resets are believed:
//! producers reconnect at once (their backoff starts at 100 ms).
//!
//! The file holds 64 random bytes, created once (readable by its owner only) and written
//! atomically. A file of another length is refused with its path and what to do, never
//! replaced silently.

use crate::files::write_atomically;
use anyhow::{Context, Result, bail};
use quinn::EndpointConfig;
use quinn_proto::HashedConnectionIdGenerator;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes of key material.
const KEY_BYTES: usize = 64;

/// Where the key lives in `data_dir`.
pub(crate) fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("quic").join("reset-key")
}

/// quinn's endpoint config with the keys derived from the secret kept in `data_dir`.
pub(crate) fn endpoint_config(data_dir: &Path) -> Result<EndpointConfig> {
    let reset_key = load_or_create(data_dir)?;
    let tag = hmac::sign(&reset_key, b"weir connection-id generator");
    let mut cid_key = [0; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
    Ok(config)
}

/// The reset key kept in `data_dir`, created on first use.
fn load_or_create(data_dir: &Path) -> Result<hmac::Key> {
    let path = path(data_dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(&path)?,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if bytes.len() != KEY_BYTES {
        bail!(
            "{}: {} bytes, a reset key has {KEY_BYTES}; delete the file to draw a new key (producers connected before then wait out their idle timeout once)",
            path.display(),
            bytes.len()
        );
    }
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
}

fn create(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = vec![0; KEY_BYTES];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness for a reset key"))?;
    // A temporary file is created readable by its owner only, and keeps that when renamed.
    write_atomically(path, &[&bytes])
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(key: &hmac::Key) -> Vec<u8> {
        hmac::sign(key, b"connection id").as_ref().to_vec()
    }

    #[test]
    fn the_key_is_created_once_and_read_back_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_or_create(dir.path()).expect("a key");
        let again = load_or_create(dir.path()).expect("a key");
        assert_eq!(sign(&first), sign(&again));
        let other = tempfile::tempdir().expect("tempdir");
        assert_ne!(
            sign(&first),
            sign(&load_or_create(other.path()).expect("a key"))
        );
    }

    #[test]
    fn a_key_of_another_length_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = path(dir.path());
        std::fs::create_dir_all(dir.path().join("quic")).expect("mkdir");
        std::fs::write(&path, b"short").expect("write");
        let error = format!("{:#}", load_or_create(dir.path()).expect_err("refused"));
        assert_eq!(
            error,
            format!(
                "{}: 5 bytes, a reset key has 64; delete the file to draw a new key (producers connected before then wait out their idle timeout once)",
                path.display()
            )
        );
    }
}
