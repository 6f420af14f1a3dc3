//! Compiled plugins on disk: a component compiled once is kept as wasmtime's serialized
//! artifact, keyed by the plugin's digest and the engine's compatibility hash, so that a
//! restart (or another command with the same cache directory) loads it instead of compiling
//! it again.
//!
//! Decisions:
//!
//! - **Key.** `DIGEST-ENGINE.cwasm`: the SHA-256 of the component's bytes, and 16 hex digits of
//!   a SHA-256 over wasmtime's `Engine::precompile_compatibility_hash` (wasmtime's version,
//!   the target, and every setting that changes compiled code). A new wasmtime or a changed
//!   engine setting simply misses.
//! - **Never trusted blindly.** Deserializing an artifact runs its machine code, so an entry
//!   is checked before it is used: a magic, then the SHA-256 of the artifact, which must match
//!   the artifact. An entry that is torn (a crash while writing), corrupted, or refused by
//!   wasmtime is reported in the log, compiled again and rewritten, never used.
//! - **Writes are atomic**: to a temporary file in the same directory, synced, then renamed.
//!   A cache that cannot be written (a read-only disk) is a warning: the plugin still loads.

use super::error::PluginError;
use crate::files::write_atomically;
use sha2::{Digest as _, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The first bytes of every cache entry.
const MAGIC: &[u8; 11] = b"weir-cwasm1";
/// The magic, then the SHA-256 of the artifact.
const HEADER: usize = MAGIC.len() + 32;

/// The SHA-256 of a plugin's bytes: how versions are addressed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// All 64 hex digits.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 8 hex digits: the plugin's version as weir prints it.
    pub fn short(&self) -> String {
        self.0[..4].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits.
    pub fn parse(hex: &str) -> Option<Digest> {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Digest(out))
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({})", self.hex())
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

/// Feeds what a `Hash` writes into SHA-256: a hash that is the same across Rust releases.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().unwrap_or_default())
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Where a compiled component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compiled {
    /// Loaded from a valid cache entry.
    Cached,
    /// Compiled now (and stored, when the cache could be written).
    Compiled,
}

/// A directory of compiled components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileCache {
    dir: PathBuf,
}

impl CompileCache {
    /// A cache in `dir` (created on the first write).
    pub fn new(dir: impl Into<PathBuf>) -> CompileCache {
        CompileCache { dir: dir.into() }
    }

    /// The cache of the commands a plugin's author runs (`weir build`, `test`, `bench`):
    /// `$WEIR_CACHE_DIR`, else `$XDG_CACHE_HOME/weir/compiled`, else
    /// `$HOME/.cache/weir/compiled`; `None` (compile at every load) when `WEIR_CACHE_DIR` is
    /// set empty or there is no home.
    pub fn user_dir() -> Option<PathBuf> {
        user_dir_from(|name| std::env::var_os(name))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry for `digest` under `engine`.
    pub fn entry(&self, engine: &Engine, digest: &Digest) -> PathBuf {
        let mut hasher = ShaHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine = format!("{:016x}", hasher.finish());
        self.dir.join(format!("{}-{engine}.cwasm", digest.hex()))
    }

    /// The component for `bytes` (whose digest is `digest`): from a valid entry, or compiled
    /// and stored. `who` names the plugin in errors.
    pub(crate) fn component(
        &self,
        engine: &Engine,
        digest: &Digest,
        bytes: &[u8],
        who: &str,
    ) -> Result<(Component, Compiled), PluginError> {
        let path = self.entry(engine, digest);
        match std::fs::read(&path) {
            Ok(entry) => match check(&entry) {
                // SAFETY: the artifact is byte for byte what `Component::serialize` wrote for
                // this digest under an engine with this compatibility hash (its SHA-256 is
                // checked against the one stored with it), and wasmtime checks its own header
                // against this engine before using it.
                Ok(artifact) => match unsafe { Component::deserialize(engine, artifact) } {
                    Ok(component) => return Ok((component, Compiled::Cached)),
                    Err(e) => tracing::warn!(
                        "plugin {who}: compile cache entry {} refused by wasmtime ({e:#}); compiling again",
                        path.display()
                    ),
                },
                Err(problem) => tracing::warn!(
                    "plugin {who}: compile cache entry {} is {problem}; compiling again",
                    path.display()
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                "plugin {who}: cannot read compile cache entry {}: {e}; compiling again",
                path.display()
            ),
        }
        let component = Component::new(engine, bytes).map_err(|e| PluginError::Compile {
            who: who.to_owned(),
            message: format!("{e:#}"),
        })?;
        match component.serialize() {
            Ok(artifact) => {
                if let Err(e) =
                    write_atomically(&path, &[MAGIC, &Sha256::digest(&artifact), &artifact])
                {
                    tracing::warn!(
                        "plugin {who}: cannot write compile cache entry {}: {e} (the plugin is compiled at every start)",
                        path.display()
                    );
                }
            }
            Err(e) => tracing::warn!("plugin {who}: cannot serialize the compiled plugin: {e:#}"),
        }
        Ok((component, Compiled::Compiled))
    }
}

/// [`CompileCache::user_dir`] with the environment read through `var`.
fn user_dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    if let Some(dir) = var("WEIR_CACHE_DIR") {
        return (!dir.is_empty()).then(|| PathBuf::from(dir));
    }
    weir_cache_home_from(var).map(|weir| weir.join("compiled"))
}

/// weir's folder among the user's caches: `$XDG_CACHE_HOME/weir`, else `$HOME/.cache/weir`
/// (the compile cache's and the tools' default home); `None` without a home.
pub fn weir_cache_home() -> Option<PathBuf> {
    weir_cache_home_from(|name| std::env::var_os(name))
}

/// [`weir_cache_home`] with the environment read through `var`.
fn weir_cache_home_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let set = |name| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    set("XDG_CACHE_HOME")
        .or_else(|| set("HOME").map(|home| home.join(".cache")))
        .map(|cache| cache.join("weir"))
}

/// The artifact of a cache entry, or what is wrong with it.
fn check(entry: &[u8]) -> Result<&[u8], &'static str> {
    if entry.len() < HEADER || &entry[..MAGIC.len()] != MAGIC {
        return Err("not a weir cache entry (torn or foreign)");
    }
    let (sum, artifact) = entry[MAGIC.len()..].split_at(32);
    if Sha256::digest(artifact).as_slice() != sum {
        return Err("corrupted (its checksum does not match)");
    }
    Ok(artifact)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_print_and_parse() {
        let d = Digest::of(b"abc");
        assert_eq!(d.short(), "ba7816bf");
        assert_eq!(Digest::parse(&d.hex()), Some(d));
        assert_eq!(Digest::parse("ba7816bf"), None);
        assert_eq!(Digest::parse(&"g".repeat(64)), None);
    }

    #[test]
    fn the_user_cache_is_weir_cache_dir_then_xdg_then_home() {
        fn env(vars: &[(&str, &str)]) -> Option<PathBuf> {
            user_dir_from(|name| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            })
        }
        let all = [
            ("WEIR_CACHE_DIR", "/w"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(env(&all), Some(PathBuf::from("/w")));
        assert_eq!(env(&all[1..]), Some(PathBuf::from("/x/weir/compiled")));
        assert_eq!(
            env(&all[2..]),
            Some(PathBuf::from("/h/.cache/weir/compiled"))
        );
        assert_eq!(env(&[("WEIR_CACHE_DIR", ""), ("HOME", "/h")]), None);
        assert_eq!(
            env(&[("XDG_CACHE_HOME", ""), ("HOME", "/h")]),
            Some(PathBuf::from("/h/.cache/weir/compiled"))
        );
        assert_eq!(env(&[]), None);
    }

    #[test]
    fn entries_are_checked_before_use() {
        assert_eq!(
            check(b"short"),
            Err("not a weir cache entry (torn or foreign)")
        );
        let mut entry = MAGIC.to_vec();
        entry.extend_from_slice(&Sha256::digest(b"artifact"));
        entry.extend_from_slice(b"artifact");
        assert_eq!(check(&entry), Ok(&b"artifact"[..]));
        let last = entry.len() - 1;
        entry[last] ^= 1;
        assert_eq!(
            check(&entry),
            Err("corrupted (its checksum does not match)")
        );
        entry.truncate(HEADER - 1);
        assert_eq!(
            check(&entry),
            Err("not a weir cache entry (torn or foreign)")
        );
    }
}
