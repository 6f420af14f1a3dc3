//! Loading a plugin: bytes → checked component → [`Plugin`] (compiled once, `InstancePre` ready).
//!
//! Decisions:
//!
//! - The checks run from the cheapest to the most expensive, each with its own error: the
//!   `\0asm` magic (else [`PluginError::NotWasm`]), the layer field of the header (a core
//!   module gets [`PluginError::CoreModule`], with the fix), compilation, the exports (which
//!   world, what is missing), the imports against the linker (what the sandbox lacks), and
//!   finally the exports' types against the world's.
//! - Kind detection looks at export names only: `filter` → filter, `enrich` → enrich, `fold` or
//!   `finish` → aggregate; every world also needs `init`. A component with the exports of two
//!   worlds must be loaded as one kind explicitly.
//! - Name: the file stem, or the name given with the bytes. Version: the first 8 hex digits of
//!   the SHA-256 of the bytes (see the module docs of `runtime`).

use super::bindings::{aggregate, enrich, filter};
use super::cache::{Compiled, Digest};
use super::error::{PluginError, PluginKind};
use super::instance::{Instance, StageConfig};
use super::sandbox::HostState;
use super::{Runtime, RuntimeInner};
use std::path::Path;
use std::sync::Arc;
use wasmtime::component::Component;

/// A compiled plugin of one version. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Plugin {
    pub(crate) inner: Arc<PluginInner>,
}

pub(crate) struct PluginInner {
    pub name: String,
    pub digest: Digest,
    pub version: String,
    pub compiled: Compiled,
    pub kind: PluginKind,
    pub pre: Pre,
    pub runtime: Arc<RuntimeInner>,
}

/// The `InstancePre` of a plugin, typed by its world.
pub(crate) enum Pre {
    Filter(filter::FilterPre<HostState>),
    Enrich(enrich::EnrichPre<HostState>),
    Aggregate(aggregate::AggregatePre<HostState>),
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.inner.name)
            .field("version", &self.inner.version)
            .field("kind", &self.inner.kind)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// The plugin's name (its file stem unless given).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The plugin's version: a short digest of its bytes.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// The SHA-256 of its bytes, which addresses its version.
    pub fn digest(&self) -> Digest {
        self.inner.digest
    }

    /// Whether it was loaded from the compile cache rather than compiled now.
    pub fn from_cache(&self) -> bool {
        self.inner.compiled == Compiled::Cached
    }

    /// The world it implements.
    pub fn kind(&self) -> PluginKind {
        self.inner.kind
    }

    /// Creates an instance for one worker of a stage and calls `init` with the stage's config.
    pub fn instantiate(&self, config: StageConfig) -> Result<Instance, PluginError> {
        Instance::new(self.clone(), config)
    }

    pub(crate) fn load_file(
        runtime: &Runtime,
        path: &Path,
        kind: Option<PluginKind>,
    ) -> Result<Plugin, PluginError> {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let bytes = std::fs::read(path).map_err(|e| PluginError::Read {
            who: PluginError::origin(&name, Some(path)),
            message: e.to_string(),
        })?;
        Plugin::load_bytes(runtime, &name, &bytes, Some(path), kind)
    }

    pub(crate) fn load_bytes(
        runtime: &Runtime,
        name: &str,
        bytes: &[u8],
        path: Option<&Path>,
        expected: Option<PluginKind>,
    ) -> Result<Plugin, PluginError> {
        let who = PluginError::origin(name, path);
        check_header(bytes, &who)?;
        let inner = &runtime.inner;
        let digest = Digest::of(bytes);
        let (component, compiled) = match &inner.cache {
            Some(cache) => cache.component(&inner.engine, &digest, bytes, &who)?,
            None => {
                let component =
                    Component::new(&inner.engine, bytes).map_err(|e| PluginError::Compile {
                        who: who.clone(),
                        message: format!("{e:#}"),
                    })?;
                (component, Compiled::Compiled)
            }
        };

        let exports: Vec<String> = component
            .component_type()
            .exports(&inner.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        let kind = match expected {
            Some(kind) => kind,
            None => detect_kind(&exports, &who)?,
        };
        if let Some(missing) = kind
            .exports()
            .iter()
            .find(|e| !exports.iter().any(|x| x == *e))
        {
            return Err(PluginError::MissingExport {
                who,
                world: kind,
                export: (*missing).to_owned(),
                exports: list(&exports),
            });
        }

        let pre = inner
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Import {
                who: who.clone(),
                message: format!("{e:#}"),
            })?;
        let signature = |e: wasmtime::Error| PluginError::Signature {
            who: who.clone(),
            world: kind,
            message: format!("{e:#}"),
        };
        let pre = match kind {
            PluginKind::Filter => Pre::Filter(filter::FilterPre::new(pre).map_err(signature)?),
            PluginKind::Enrich => Pre::Enrich(enrich::EnrichPre::new(pre).map_err(signature)?),
            PluginKind::Aggregate => {
                Pre::Aggregate(aggregate::AggregatePre::new(pre).map_err(signature)?)
            }
        };

        Ok(Plugin {
            inner: Arc::new(PluginInner {
                name: name.to_owned(),
                digest,
                version: digest.short(),
                compiled,
                kind,
                pre,
                runtime: runtime.inner.clone(),
            }),
        })
    }
}

/// Tells apart "not wasm", "a core module" and "a component" from the 8-byte header.
fn check_header(bytes: &[u8], who: &str) -> Result<(), PluginError> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(PluginError::NotWasm {
            who: who.to_owned(),
        });
    }
    // After the magic: a 16-bit version and a 16-bit layer; layer 0 is a core module.
    let layer = u16::from_le_bytes([bytes[6], bytes[7]]);
    if layer == 0 {
        return Err(PluginError::CoreModule {
            who: who.to_owned(),
        });
    }
    Ok(())
}

fn detect_kind(exports: &[String], who: &str) -> Result<PluginKind, PluginError> {
    let has = |name: &str| exports.iter().any(|e| e == name);
    let mut kinds = Vec::new();
    if has("filter") {
        kinds.push(PluginKind::Filter);
    }
    if has("enrich") {
        kinds.push(PluginKind::Enrich);
    }
    if has("fold") || has("finish") {
        kinds.push(PluginKind::Aggregate);
    }
    match kinds.as_slice() {
        [kind] => Ok(*kind),
        [] => Err(PluginError::NoWorld {
            who: who.to_owned(),
            exports: list(exports),
        }),
        many => Err(PluginError::Ambiguous {
            who: who.to_owned(),
            kinds: many
                .iter()
                .map(|k| k.world())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// `` `a`, `b` `` or `nothing`.
fn list(exports: &[String]) -> String {
    if exports.is_empty() {
        return "nothing".to_owned();
    }
    exports
        .iter()
        .map(|e| format!("`{e}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checks() {
        assert!(matches!(
            check_header(b"hello world", "`x`"),
            Err(PluginError::NotWasm { .. })
        ));
        assert!(matches!(
            check_header(b"\0asm", "`x`"),
            Err(PluginError::NotWasm { .. })
        ));
        assert!(matches!(
            check_header(b"\0asm\x01\0\0\0", "`x`"),
            Err(PluginError::CoreModule { .. })
        ));
        assert!(check_header(b"\0asm\x0d\0\x01\0", "`x`").is_ok());
    }

    #[test]
    fn versions_are_short_digests() {
        assert_eq!(Digest::of(b"").short(), "e3b0c442");
        assert_eq!(Digest::of(b"abc").short(), "ba7816bf");
    }

    #[test]
    fn kinds_from_exports() {
        let e = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            detect_kind(&e(&["init", "filter"]), "`x`"),
            Ok(PluginKind::Filter)
        );
        assert_eq!(detect_kind(&e(&["enrich"]), "`x`"), Ok(PluginKind::Enrich));
        assert_eq!(
            detect_kind(&e(&["init", "fold", "finish"]), "`x`"),
            Ok(PluginKind::Aggregate)
        );
        assert_eq!(
            detect_kind(&e(&["run"]), "`x`").map_err(|e| e.to_string()),
            Err(
                "plugin `x`: implements no weir world: expected the exports of world \
                 `weir:plugin/filter@0.1.0` (`init`, `filter`), `weir:plugin/enrich@0.1.0` \
                 (`init`, `enrich`) or `weir:plugin/aggregate@0.1.0` (`init`, `fold`, \
                 `finish`, `state-layout`); it exports `run`"
                    .to_owned()
            )
        );
        assert!(matches!(
            detect_kind(&e(&["filter", "enrich"]), "`x`"),
            Err(PluginError::Ambiguous { .. })
        ));
    }
}
