//! The plugin registry: every version a stage has served, addressed by digest and kept under
//! the data directory, so that a restart neither recompiles nor forgets what was deployed.
//!
//! Under `DATA_DIR/plugins/`:
//!
//! - `blobs/DIGEST.wasm`: each version's component, content-addressed (written once).
//! - `compiled/`: the runtime's compile cache (`runtime/cache.rs`).
//! - `stages.json`: per stage (`PIPELINE/STAGE`), the version serving, the digest of the
//!   plugin the config named when that was recorded, the versions kept (digest, name,
//!   deployed at, status) and the last refused deploy's error.
//!
//! Decisions:
//!
//! - **Restart.** A stage runs the version last deployed to it that passed its probation, not
//!   the file its config names, as long as the config still names the plugin it named when
//!   that version was deployed. A config that names another plugin was edited on purpose: it
//!   wins, and the log says which deployed version it replaced. A version still on probation
//!   at a crash is not served after the restart (it never passed). (The topology falls back
//!   to the config's plugin, too, when the deployed version no longer starts.)
//! - **Versions kept:** the last [`KEPT`] per stage; a blob that no stage keeps any more is
//!   deleted.
//! - **Writes** of `stages.json` are atomic (a temporary file, synced, renamed). A file that
//!   does not parse is an error naming it at start: weir does not guess what was deployed.

use crate::files::write_atomically;
use crate::runtime::Digest;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Versions kept per stage (the one serving included).
pub const KEPT: usize = 10;
/// The layout of `stages.json` this build writes and reads.
const FORMAT: u32 = 1;

/// What became of a version of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Serving now.
    Serving,
    /// Swapped in, on probation.
    Probation,
    /// Served before; kept for a rollback.
    Kept,
    /// Failed on probation and rolled back automatically.
    RolledBack,
    /// Was on probation when the router stopped: never passed.
    Interrupted,
}

impl Status {
    /// The status as `weir plugins` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Serving => "serving",
            Status::Probation => "on probation",
            Status::Kept => "kept",
            Status::RolledBack => "rolled back",
            Status::Interrupted => "interrupted",
        }
    }
}

/// One version of a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// The SHA-256 of the component, 64 hex digits.
    pub digest: String,
    /// The plugin's name (its file stem, or the example's name).
    pub name: String,
    /// When it was deployed (or first seen in the config), ms since the Unix epoch.
    pub deployed_at_ms: i64,
    /// Where it came from: `config` or `deploy`.
    pub origin: String,
    /// What became of it.
    pub status: Status,
    /// Why it was rolled back, when it was.
    pub error: Option<String>,
}

/// An error a deploy to a stage met.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    /// When, ms since the Unix epoch.
    pub at_ms: i64,
    /// The error.
    pub message: String,
}

/// What the registry knows of one stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    /// The digest of the version serving.
    pub serving: String,
    /// The digest of the plugin the config named when `serving` was recorded.
    pub config: String,
    /// The versions kept, oldest first.
    pub versions: Vec<VersionRecord>,
    /// The last deploy that failed (refused or rolled back).
    pub last_error: Option<ErrorRecord>,
}

impl StageRecord {
    /// The record of `digest`.
    pub fn version(&self, digest: &str) -> Option<&VersionRecord> {
        self.versions.iter().find(|v| v.digest == digest)
    }

    fn version_mut(&mut self, digest: &str) -> Option<&mut VersionRecord> {
        self.versions.iter_mut().find(|v| v.digest == digest)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    format: u32,
    /// By `PIPELINE/STAGE`.
    stages: BTreeMap<String, StageRecord>,
}

/// Which version a stage runs at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The component's bytes.
    pub bytes: Vec<u8>,
    /// Its name.
    pub name: String,
    /// Whether it is a deployed version rather than the config's.
    pub deployed: bool,
}

/// A registry error: names the file and what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("plugin registry {path}: {message}")]
pub struct RegistryError {
    /// The file or directory.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

/// The plugin registry of one data directory.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    state: Mutex<Stored>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update of the registry is one step on owned data: a poisoned lock's data is whole.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn key(pipeline: &str, stage: &str) -> String {
    format!("{pipeline}/{stage}")
}

impl Registry {
    /// Opens the registry under `data_dir/plugins` (created if missing). Versions that were on
    /// probation when the router stopped are marked interrupted.
    pub fn open(data_dir: &Path) -> Result<Registry, RegistryError> {
        let dir = data_dir.join("plugins");
        let error = |path: &Path, message: String| RegistryError {
            path: path.display().to_string(),
            message,
        };
        crate::files::create_dir_all(&dir.join("blobs"))
            .map_err(|e| error(&dir, format!("cannot create it: {e}")))?;
        let file = dir.join("stages.json");
        let mut stored = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice::<Stored>(&bytes).map_err(|e| {
                error(
                    &file,
                    format!(
                        "does not parse ({e}); move it away to start with the config's plugins"
                    ),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored {
                format: FORMAT,
                stages: BTreeMap::new(),
            },
            Err(e) => return Err(error(&file, format!("cannot read it: {e}"))),
        };
        if stored.format != FORMAT {
            return Err(error(
                &file,
                format!(
                    "is format {}, this build reads format {FORMAT}",
                    stored.format
                ),
            ));
        }
        for (stage, record) in &mut stored.stages {
            let digests = [&record.serving, &record.config]
                .into_iter()
                .chain(record.versions.iter().map(|v| &v.digest));
            for digest in digests {
                if Digest::parse(digest).is_none() {
                    return Err(error(
                        &file,
                        format!(
                            "stage `{stage}` holds `{digest}`, which is not a digest (64 hex digits); move the file away to start with the config's plugins"
                        ),
                    ));
                }
            }
            for version in &mut record.versions {
                if version.status == Status::Probation {
                    version.status = Status::Interrupted;
                }
            }
        }
        Ok(Registry {
            dir,
            state: Mutex::new(stored),
        })
    }

    /// Where the compile cache lives.
    pub fn compiled_dir(&self) -> PathBuf {
        self.dir.join("compiled")
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(format!("{}.wasm", digest.hex()))
    }

    /// Stores a version's bytes (once per digest); its digest. Called with the state locked,
    /// so that `save` (which deletes blobs no record keeps) never sees a blob whose record is
    /// not written yet.
    fn store(&self, _locked: &Stored, bytes: &[u8]) -> Result<Digest, RegistryError> {
        let digest = Digest::of(bytes);
        let path = self.blob_path(&digest);
        if !path.exists() {
            write_atomically(&path, &[bytes]).map_err(|e| RegistryError {
                path: path.display().to_string(),
                message: format!("cannot write it: {e}"),
            })?;
        }
        Ok(digest)
    }

    /// A stored version's bytes, checked against its digest.
    pub fn blob(&self, digest: &Digest) -> Result<Vec<u8>, RegistryError> {
        let path = self.blob_path(digest);
        let error = |message: String| RegistryError {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(&path).map_err(|e| error(format!("cannot read it: {e}")))?;
        if Digest::of(&bytes) != *digest {
            return Err(error(
                "its bytes do not match its digest (corrupted)".into(),
            ));
        }
        Ok(bytes)
    }

    /// The version stage `pipeline/stage` runs at start, given the plugin its config names
    /// (`name`, `bytes`); records the config's plugin when it is new (see the module docs).
    pub fn resolve(
        &self,
        pipeline: &str,
        stage: &str,
        name: &str,
        bytes: &[u8],
        now_ms: i64,
    ) -> Result<Resolved, RegistryError> {
        let mut state = lock(&self.state);
        let config = self.store(&state, bytes)?;
        let record = state.stages.get(&key(pipeline, stage)).cloned();
        if let Some(record) = &record
            && record.config == config.hex()
            && record.serving != config.hex()
            && let Some(serving) = Digest::parse(&record.serving)
        {
            let name = record
                .version(&record.serving)
                .map_or_else(|| name.to_owned(), |v| v.name.clone());
            match self.blob(&serving) {
                Ok(bytes) => {
                    return Ok(Resolved {
                        bytes,
                        name,
                        deployed: true,
                    });
                }
                Err(e) => tracing::error!(
                    "pipeline `{pipeline}`, stage `{stage}`: the deployed version {} cannot be read ({e}); running the config's plugin",
                    serving.short()
                ),
            }
        }
        if let Some(record) = &record
            && record.config != config.hex()
            && record.serving != config.hex()
        {
            tracing::warn!(
                "pipeline `{pipeline}`, stage `{stage}`: the config names another plugin ({name} {}) than when version {} was deployed: the config's plugin serves",
                config.short(),
                record.serving.get(..8).unwrap_or_default()
            );
        }
        let mut record = record.unwrap_or(StageRecord {
            serving: String::new(),
            config: String::new(),
            versions: Vec::new(),
            last_error: None,
        });
        serve(&mut record, &config.hex(), name, "config", now_ms);
        record.config = config.hex();
        state.stages.insert(key(pipeline, stage), record);
        self.save(&mut state)?;
        Ok(Resolved {
            bytes: bytes.to_vec(),
            name: name.to_owned(),
            deployed: false,
        })
    }

    /// A version (`bytes`, stored here) was swapped in: on probation, or serving at once; its
    /// digest. `origin` says who asked: `deploy`, or `config` (a reload's config names it,
    /// and it is recorded as the config's plugin).
    #[allow(clippy::too_many_arguments)]
    pub fn swapped(
        &self,
        pipeline: &str,
        stage: &str,
        bytes: &[u8],
        name: &str,
        origin: &str,
        on_probation: bool,
        now_ms: i64,
    ) -> Result<Digest, RegistryError> {
        let mut digest = None;
        self.update(pipeline, stage, |registry, state, key| {
            let stored = registry.store(state, bytes)?;
            digest = Some(stored);
            let Some(record) = state.stages.get_mut(key) else {
                return Ok(());
            };
            if origin == "config" {
                record.config = stored.hex();
            }
            if on_probation {
                record.versions.retain(|v| v.digest != stored.hex());
                record.versions.push(VersionRecord {
                    digest: stored.hex(),
                    name: name.to_owned(),
                    deployed_at_ms: now_ms,
                    origin: origin.to_owned(),
                    status: Status::Probation,
                    error: None,
                });
            } else {
                serve(record, &stored.hex(), name, origin, now_ms);
            }
            Ok(())
        })?;
        Ok(digest.unwrap_or_else(|| Digest::of(bytes)))
    }

    /// The version deployed to a stage did not start at a restart (`error`): the config's
    /// plugin (`config`) serves instead, and the registry says so.
    pub fn fell_back(
        &self,
        pipeline: &str,
        stage: &str,
        config: &Digest,
        name: &str,
        error: &str,
        now_ms: i64,
    ) -> Result<(), RegistryError> {
        self.record(pipeline, stage, |record| {
            let deployed = record.serving.clone();
            serve(record, &config.hex(), name, "config", now_ms);
            if let Some(v) = record.version_mut(&deployed) {
                v.error = Some(format!("did not start at a restart: {error}"));
            }
            record.last_error = Some(ErrorRecord {
                at_ms: now_ms,
                message: format!(
                    "version {} did not start at a restart, so the config's plugin serves: {error}",
                    deployed.get(..8).unwrap_or_default()
                ),
            });
        })
    }

    /// A version on probation passed: it serves from now on, also after a restart.
    pub fn passed(
        &self,
        pipeline: &str,
        stage: &str,
        digest: &Digest,
    ) -> Result<(), RegistryError> {
        self.record(pipeline, stage, |record| {
            let (name, at) = record
                .version(&digest.hex())
                .map(|v| (v.name.clone(), v.deployed_at_ms))
                .unwrap_or_default();
            serve(record, &digest.hex(), &name, "deploy", at);
        })
    }

    /// A version on probation failed and was rolled back.
    pub fn rolled_back(
        &self,
        pipeline: &str,
        stage: &str,
        digest: &Digest,
        error: &str,
        now_ms: i64,
    ) -> Result<(), RegistryError> {
        self.record(pipeline, stage, |record| {
            if let Some(v) = record.version_mut(&digest.hex()) {
                v.status = Status::RolledBack;
                v.error = Some(error.to_owned());
            }
            record.last_error = Some(ErrorRecord {
                at_ms: now_ms,
                message: error.to_owned(),
            });
        })
    }

    /// A deploy was refused (the module, its world, its init, its state layout).
    pub fn refused(
        &self,
        pipeline: &str,
        stage: &str,
        error: &str,
        now_ms: i64,
    ) -> Result<(), RegistryError> {
        self.record(pipeline, stage, |record| {
            record.last_error = Some(ErrorRecord {
                at_ms: now_ms,
                message: error.to_owned(),
            });
        })
    }

    /// What the registry knows of every stage, by `(pipeline, stage)`.
    pub fn stages(&self) -> BTreeMap<String, StageRecord> {
        lock(&self.state).stages.clone()
    }

    /// What the registry knows of one stage.
    pub fn stage(&self, pipeline: &str, stage: &str) -> Option<StageRecord> {
        lock(&self.state).stages.get(&key(pipeline, stage)).cloned()
    }

    /// Changes the record of `pipeline/stage` with `f`, then saves.
    fn record(
        &self,
        pipeline: &str,
        stage: &str,
        f: impl FnOnce(&mut StageRecord),
    ) -> Result<(), RegistryError> {
        self.update(pipeline, stage, |_, state, key| {
            if let Some(record) = state.stages.get_mut(key) {
                f(record);
            }
            Ok(())
        })
    }

    /// Changes the state with `f` (given the record's key, which exists), then saves; all
    /// under the lock.
    fn update(
        &self,
        pipeline: &str,
        stage: &str,
        f: impl FnOnce(&Registry, &mut Stored, &str) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        let mut state = lock(&self.state);
        let key = key(pipeline, stage);
        if !state.stages.contains_key(&key) {
            return Err(RegistryError {
                path: self.dir.join("stages.json").display().to_string(),
                message: format!("no stage `{pipeline}/{stage}`"),
            });
        }
        f(self, &mut state, &key)?;
        self.save(&mut state)
    }

    /// Trims each stage's versions to [`KEPT`], deletes blobs nobody keeps, writes the file.
    fn save(&self, state: &mut Stored) -> Result<(), RegistryError> {
        for record in state.stages.values_mut() {
            while record.versions.len() > KEPT {
                let Some(i) = record
                    .versions
                    .iter()
                    .position(|v| v.digest != record.serving && v.status != Status::Probation)
                else {
                    break;
                };
                record.versions.remove(i);
            }
        }
        let kept: BTreeSet<String> = state
            .stages
            .values()
            .flat_map(|r| r.versions.iter().map(|v| v.digest.clone()))
            .collect();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("blobs")) {
            for entry in entries.flatten() {
                let path = entry.path();
                let stem = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default();
                if Digest::parse(stem).is_some() && !kept.contains(stem) {
                    // A stale blob left behind costs disk, not correctness.
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let path = self.dir.join("stages.json");
        let text = serde_json::to_vec_pretty(&*state).map_err(|e| RegistryError {
            path: path.display().to_string(),
            message: format!("cannot encode it: {e}"),
        })?;
        write_atomically(&path, &[&text]).map_err(|e| RegistryError {
            path: path.display().to_string(),
            message: format!("cannot write it: {e}"),
        })
    }
}

/// Makes `digest` the version serving: the one serving before is kept.
fn serve(record: &mut StageRecord, digest: &str, name: &str, origin: &str, now_ms: i64) {
    for v in &mut record.versions {
        if v.status == Status::Serving {
            v.status = Status::Kept;
        }
    }
    match record.version_mut(digest) {
        Some(v) => {
            v.status = Status::Serving;
            v.error = None;
        }
        None => record.versions.push(VersionRecord {
            digest: digest.to_owned(),
            name: name.to_owned(),
            deployed_at_ms: now_ms,
            origin: origin.to_owned(),
            status: Status::Serving,
            error: None,
        }),
    }
    record.serving = digest.to_owned();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_serves_the_last_version_that_passed_unless_the_config_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::open(dir.path()).expect("open");
        let v1: &[u8] = b"\0asm v1";
        let v2: &[u8] = b"\0asm v2";
        let v3: &[u8] = b"\0asm v3";
        let first = registry.resolve("p", "s", "geo", v1, 1).expect("resolve");
        assert!(!first.deployed);
        let d2 = registry
            .swapped("p", "s", v2, "geo", "deploy", true, 2)
            .expect("swapped");

        // On probation at a restart: the config's version serves, v2 is interrupted.
        let registry = Registry::open(dir.path()).expect("reopen");
        let again = registry.resolve("p", "s", "geo", v1, 3).expect("resolve");
        assert_eq!((again.bytes.as_slice(), again.deployed), (v1, false));
        let record = registry.stage("p", "s").expect("a record");
        assert_eq!(
            record.version(&d2.hex()).map(|v| v.status),
            Some(Status::Interrupted)
        );

        // Deployed and passed: a restart serves v2, not the config's v1.
        registry
            .swapped("p", "s", v2, "geo", "deploy", true, 4)
            .expect("swapped");
        registry.passed("p", "s", &d2).expect("passed");
        let registry = Registry::open(dir.path()).expect("reopen");
        let after = registry.resolve("p", "s", "geo", v1, 5).expect("resolve");
        assert_eq!((after.bytes.as_slice(), after.deployed), (v2, true));
        let record = registry.stage("p", "s").expect("a record");
        assert_eq!(record.serving, d2.hex());
        assert_eq!(
            record.versions.iter().map(|v| v.status).collect::<Vec<_>>(),
            [Status::Kept, Status::Serving]
        );

        // An edited config (it names v3 now) wins over the deployed v2.
        let edited = registry.resolve("p", "s", "geo", v3, 6).expect("resolve");
        assert_eq!((edited.bytes.as_slice(), edited.deployed), (v3, false));
        assert_eq!(
            registry.stage("p", "s").map(|r| r.serving),
            Some(Digest::of(v3).hex())
        );
    }

    #[test]
    fn rollbacks_and_refusals_are_recorded_and_blobs_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::open(dir.path()).expect("open");
        registry
            .resolve("p", "s", "geo", b"\0asm v1", 1)
            .expect("resolve");
        let d2 = registry
            .swapped("p", "s", b"\0asm v2", "geo", "deploy", true, 2)
            .expect("swapped");
        registry
            .rolled_back("p", "s", &d2, "event 3: trap", 3)
            .expect("rolled back");
        registry
            .refused("p", "s", "not a component", 4)
            .expect("refused");
        let record = registry.stage("p", "s").expect("a record");
        assert_eq!(record.serving, Digest::of(b"\0asm v1").hex());
        let v2 = record.version(&d2.hex()).expect("v2 kept");
        assert_eq!(
            (v2.status, v2.error.as_deref()),
            (Status::RolledBack, Some("event 3: trap"))
        );
        assert_eq!(
            record.last_error.map(|e| e.message),
            Some("not a component".into())
        );

        let blob = dir.path().join(format!("plugins/blobs/{}.wasm", d2.hex()));
        std::fs::write(&blob, b"tampered").expect("tamper");
        let e = registry.blob(&d2).expect_err("a corrupted blob");
        assert!(
            e.to_string()
                .ends_with(": its bytes do not match its digest (corrupted)"),
            "{e}"
        );

        std::fs::write(dir.path().join("plugins/stages.json"), b"{").expect("break the file");
        let e = Registry::open(dir.path()).expect_err("a broken registry");
        assert!(
            e.to_string().starts_with(&format!(
                "plugin registry {}: does not parse (",
                dir.path().join("plugins/stages.json").display()
            )),
            "{e}"
        );
    }

    #[test]
    fn a_fallback_at_a_restart_is_recorded_and_bad_digests_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::open(dir.path()).expect("open");
        let (v1, v2): (&[u8], &[u8]) = (b"\0asm v1", b"\0asm v2");
        registry.resolve("p", "s", "geo", v1, 1).expect("resolve");
        let d2 = registry
            .swapped("p", "s", v2, "geo", "deploy", false, 2)
            .expect("swapped");
        let resolved = registry.resolve("p", "s", "geo", v1, 3).expect("resolve");
        assert!(resolved.deployed);
        registry
            .fell_back("p", "s", &Digest::of(v1), "geo", "init: no table", 4)
            .expect("fell back");
        let record = registry.stage("p", "s").expect("a record");
        assert_eq!(record.serving, Digest::of(v1).hex());
        assert_eq!(
            record.version(&d2.hex()).and_then(|v| v.error.clone()),
            Some("did not start at a restart: init: no table".into())
        );
        assert!(
            !registry
                .resolve("p", "s", "geo", v1, 5)
                .expect("resolve")
                .deployed
        );

        let file = dir.path().join("plugins/stages.json");
        let text = std::fs::read_to_string(&file).expect("the file");
        std::fs::write(&file, text.replace(&d2.hex(), "abc")).expect("edit");
        let e = Registry::open(dir.path()).expect_err("a bad digest");
        assert!(
            e.to_string()
                .contains("stage `p/s` holds `abc`, which is not a digest (64 hex digits)"),
            "{e}"
        );
    }

    #[test]
    fn only_the_last_versions_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::open(dir.path()).expect("open");
        registry
            .resolve("p", "s", "geo", b"v0", 0)
            .expect("resolve");
        for i in 1..=(KEPT as i64 + 3) {
            registry
                .swapped(
                    "p",
                    "s",
                    format!("v{i}").as_bytes(),
                    "geo",
                    "deploy",
                    false,
                    i,
                )
                .expect("swapped");
        }
        let record = registry.stage("p", "s").expect("a record");
        assert_eq!(record.versions.len(), KEPT);
        let blobs = std::fs::read_dir(dir.path().join("plugins/blobs"))
            .expect("blobs")
            .count();
        assert_eq!(blobs, KEPT, "the blobs of dropped versions are deleted");
    }
}
