//! The `weir serve` configuration: one TOML file (docs/SERVE.md is the reference).
//!
//! [`Config::load`] reads and validates a file; [`Config::parse`] validates text as if it came
//! from a file (relative paths resolve against that file's directory). Every problem is a
//! [`ConfigError`] naming the file, the line and column (from toml's spans) and the problem:
//! an unknown key (every table denies unknown fields), an unknown plugin or sink, a bad window,
//! a pipeline without sinks, a token variable that is not set.
//!
//! Decisions:
//!
//! - **Paths** (`data_dir`, TLS files, `path` of a stage, `path` of a file sink) are relative
//!   to the directory of the config file, never to the working directory, so a config means
//!   the same wherever weir is started from.
//! - **Sinks are named tables** (`[sinks.NAME]` with a `type`), and pipelines list the names
//!   they write to. New sink types, buffers and `when_full` policies (issue 4) add keys to a
//!   sink's table or new `type`s; a pipeline's `sinks` entry may later also be a table (a
//!   route condition): files written for this revision stay valid.
//! - **Secrets**: a producer's token is given inline (`token`) or, better, by the name of an
//!   environment variable (`token_env`) read at load, so the file holds no secret.
//! - Plugins are not compiled here (that is the server's start): loading a config is cheap and
//!   checks everything that can be checked without wasmtime.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;
use weir_format::frame::{BATCH_HEADER_BYTES, Limits as ProtocolLimits, MAX_NAME_BYTES};

use crate::pipeline::WindowConfig;

/// A config that cannot be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is read but invalid.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
        /// What is wrong.
        message: String,
    },
}

/// A validated `weir serve` configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (for messages).
    pub path: PathBuf,
    /// The UDP address the server listens on (port 0: any free port).
    pub listen: SocketAddr,
    /// Where the server keeps its generated certificate and its dead-letter files.
    pub data_dir: PathBuf,
    /// TLS files; `None` for the generated self-signed certificate and no client certificates.
    pub tls: Option<TlsConfig>,
    /// Protocol and server limits.
    pub limits: ServerLimits,
    /// Whether producers that present neither a token nor a client certificate are accepted
    /// (under any producer id that is not configured with a token).
    pub allow_anonymous: bool,
    /// Producers that authenticate with a token.
    pub producers: Vec<ProducerConfig>,
    /// Pipelines, in file order.
    pub pipelines: Vec<PipelineConfig>,
    /// Sinks, by name.
    pub sinks: Vec<SinkConfig>,
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

/// A pipeline: stages run in order, outputs written to sinks.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Its name, as producers name it in `hello`.
    pub name: String,
    /// Stages, first to last (none: events go to the sinks as they came).
    pub stages: Vec<StageSpec>,
    /// Producers allowed to write to it; `None`: every authenticated producer.
    pub producers: Option<Vec<String>>,
    /// Sinks it writes to (names of [`Config::sinks`]), at least one.
    pub sinks: Vec<String>,
    /// The sink its dead letters and late events go to; `None`: the file
    /// `DATA_DIR/dead-letters/PIPELINE.jsonl`.
    pub dead_letters: Option<String>,
}

/// One stage of a pipeline.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// The stage's name (default: the plugin's name, `NAME#2` for a repeat).
    pub name: String,
    /// Where the plugin comes from.
    pub plugin: PluginSource,
    /// `with` values: key and JSON text.
    pub with: Vec<(String, String)>,
    /// The window of an aggregate stage.
    pub window: Option<WindowConfig>,
    /// Linear-memory cap of each instance.
    pub memory_bytes: u64,
    /// Deadline of one plugin call.
    pub deadline: Duration,
}

/// Where a stage's plugin comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    /// An example plugin embedded in the binary (`weir::examples::ALL`), by name.
    Example(String),
    /// A component file (resolved against the config file's directory).
    File(PathBuf),
}

impl PluginSource {
    /// The plugin's name: the example's, or the file's stem.
    pub fn name(&self) -> String {
        match self {
            PluginSource::Example(name) => name.clone(),
            PluginSource::File(path) => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for PluginSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginSource::Example(name) => write!(f, "example:{name}"),
            PluginSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A named sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// Its name, as pipelines list it.
    pub name: String,
    /// What it is.
    pub kind: SinkKind,
}

/// The kinds of sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkKind {
    /// JSON lines appended to a file.
    File {
        /// The file (resolved against the config file's directory).
        path: PathBuf,
        /// When the file is synced to disk.
        fsync: Fsync,
    },
    /// Discards every event (counts them).
    Null,
}

/// When a file sink syncs its file to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// Before every ack (the default): an acked batch survives a power loss.
    OnAck,
    /// Never explicitly: an acked batch is in the OS page cache (it survives a crash of weir,
    /// not of the machine).
    Never,
}

// ---------------------------------------------------------------------------------------------
// The file as serde reads it.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listener: RawListener,
    tls: Option<Spanned<RawTls>>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    producers: Vec<Spanned<RawProducer>>,
    #[serde(default)]
    pipelines: BTreeMap<Spanned<String>, RawPipeline>,
    #[serde(default)]
    sinks: BTreeMap<Spanned<String>, Spanned<RawSink>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    listen: Spanned<String>,
    data_dir: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_frame_bytes: Option<Spanned<u32>>,
    max_events_per_frame: Option<Spanned<u32>>,
    max_in_flight: Option<Spanned<u32>>,
    max_producers_per_pipeline: Option<Spanned<u32>>,
    max_connections: Option<Spanned<u32>>,
    handshake_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    anonymous: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProducer {
    id: Spanned<String>,
    token: Option<String>,
    token_env: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    #[serde(default)]
    stages: Vec<Spanned<RawStage>>,
    producers: Option<Vec<String>>,
    #[serde(default)]
    sinks: Vec<Spanned<String>>,
    dead_letters: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    name: Option<String>,
    plugin: Option<Spanned<String>>,
    path: Option<String>,
    #[serde(default)]
    with: toml::Table,
    window: Option<Spanned<String>>,
    memory_mib: Option<Spanned<u64>>,
    deadline_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum RawSink {
    File(RawFileSink),
    Null(RawNullSink),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileSink {
    path: String,
    #[serde(default = "default_fsync")]
    fsync: Fsync,
}

fn default_fsync() -> Fsync {
    Fsync::OnAck
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNullSink {}

/// The smallest `max_frame_bytes`: a batch header and a small payload.
const MIN_FRAME_BYTES: u32 = 1024;
/// The largest `max_frame_bytes`: 64 MiB (a frame is buffered whole before its pipeline runs).
const MAX_FRAME_BYTES: u32 = 64 << 20;

/// Turns byte spans into lines and columns, and errors into [`ConfigError`]s.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn error(&self, offset: usize, message: impl Into<String>) -> ConfigError {
        let mut end = offset.min(self.text.len());
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let before = &self.text[..end];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        ConfigError::Invalid {
            path: self.path.display().to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    fn at<T>(&self, spanned: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error(spanned.span().start, message)
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Validates config text as if read from `path` (messages name it; relative paths resolve
    /// against its directory).
    pub fn parse(text: &str, path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let source = Source { path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            source.error(offset, e.message().trim_end().to_owned())
        })?;
        let base = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let resolve = |p: &str| normalize(&base.join(p));

        let listen: SocketAddr = raw.listener.listen.get_ref().parse().map_err(|_| {
            source.at(
                &raw.listener.listen,
                format!(
                    "listen address `{}` is not IP:PORT (e.g. 127.0.0.1:4433)",
                    raw.listener.listen.get_ref()
                ),
            )
        })?;

        let tls = match raw.tls {
            None => None,
            Some(spanned) => {
                let t = spanned.get_ref();
                let cert_key = match (&t.cert, &t.key) {
                    (Some(cert), Some(key)) => Some((resolve(cert), resolve(key))),
                    (None, None) => None,
                    _ => {
                        return Err(source.at(
                            &spanned,
                            "[tls] needs both `cert` and `key`, or neither (the generated certificate)",
                        ));
                    }
                };
                Some(TlsConfig {
                    cert_key,
                    client_ca: t.client_ca.as_deref().map(resolve),
                })
            }
        };

        let limits = limits(&source, &raw.limits)?;
        let producers = producers(&source, &raw.producers)?;
        let sinks = sinks(&source, &raw.sinks, &resolve)?;
        let sink_names: Vec<&str> = sinks.iter().map(|s| s.name.as_str()).collect();

        let mut pipelines: Vec<(&Spanned<String>, &RawPipeline)> = raw.pipelines.iter().collect();
        pipelines.sort_by_key(|(name, _)| name.span().start);
        let pipelines = pipelines
            .into_iter()
            .map(|(name, p)| pipeline(&source, name, p, &sink_names, &resolve))
            .collect::<Result<Vec<_>, _>>()?;

        Ok(Config {
            path: path.to_path_buf(),
            listen,
            data_dir: resolve(&raw.listener.data_dir),
            tls,
            limits,
            allow_anonymous: raw.auth.anonymous,
            producers,
            pipelines,
            sinks,
        })
    }

    /// The pipeline of this name.
    pub fn pipeline(&self, name: &str) -> Option<&PipelineConfig> {
        self.pipelines.iter().find(|p| p.name == name)
    }
}

/// Removes `.` and `name/..` from a path without touching the file system, so that printed
/// paths read well (`examples/../target/x` is `target/x`).
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// The longest `handshake_timeout_ms` (one hour).
const MAX_HANDSHAKE_TIMEOUT_MS: u64 = 3_600_000;
// The smallest batch frame still holds its header.
const _: () = assert!(MIN_FRAME_BYTES as usize > BATCH_HEADER_BYTES);

fn limits(source: &Source<'_>, raw: &RawLimits) -> Result<ServerLimits, ConfigError> {
    let mut limits = ServerLimits::default();
    let at_least = |value: &Spanned<u32>, min: u32, name: &str| {
        if *value.get_ref() < min {
            Err(source.at(
                value,
                format!("{name} = {} is below the minimum of {min}", value.get_ref()),
            ))
        } else {
            Ok(*value.get_ref())
        }
    };
    if let Some(v) = &raw.max_frame_bytes {
        limits.protocol.max_frame_bytes = at_least(v, MIN_FRAME_BYTES, "max_frame_bytes")?;
        if *v.get_ref() > MAX_FRAME_BYTES {
            return Err(source.at(
                v,
                format!(
                    "max_frame_bytes = {} is above the maximum of {MAX_FRAME_BYTES}",
                    v.get_ref()
                ),
            ));
        }
    }
    if let Some(v) = &raw.max_events_per_frame {
        limits.protocol.max_events_per_frame = at_least(v, 1, "max_events_per_frame")?;
    }
    if let Some(v) = &raw.max_in_flight {
        limits.protocol.max_in_flight = at_least(v, 1, "max_in_flight")?;
    }
    if let Some(v) = &raw.max_producers_per_pipeline {
        limits.max_producers_per_pipeline = at_least(v, 1, "max_producers_per_pipeline")?;
    }
    if let Some(v) = &raw.max_connections {
        limits.max_connections = at_least(v, 1, "max_connections")?;
    }
    if let Some(v) = &raw.handshake_timeout_ms {
        if *v.get_ref() == 0 {
            return Err(source.at(v, "handshake_timeout_ms must be at least 1"));
        }
        // A deadline past what `Instant` can hold would panic every connection's task.
        if *v.get_ref() > MAX_HANDSHAKE_TIMEOUT_MS {
            return Err(source.at(
                v,
                format!(
                    "handshake_timeout_ms = {} is above the maximum of {MAX_HANDSHAKE_TIMEOUT_MS}",
                    v.get_ref()
                ),
            ));
        }
        limits.handshake_timeout = Duration::from_millis(*v.get_ref());
    }
    Ok(limits)
}

fn check_name(source: &Source<'_>, name: &Spanned<String>, what: &str) -> Result<(), ConfigError> {
    let len = name.get_ref().len();
    if len == 0 || len > MAX_NAME_BYTES {
        return Err(source.at(
            name,
            format!(
                "{what} `{}` must be 1 to {MAX_NAME_BYTES} bytes",
                name.get_ref()
            ),
        ));
    }
    Ok(())
}

fn producers(
    source: &Source<'_>,
    raw: &[Spanned<RawProducer>],
) -> Result<Vec<ProducerConfig>, ConfigError> {
    let mut out: Vec<ProducerConfig> = Vec::new();
    for spanned in raw {
        let p = spanned.get_ref();
        check_name(source, &p.id, "producer id")?;
        let id = p.id.get_ref().clone();
        if out.iter().any(|q| q.id == id) {
            return Err(source.at(&p.id, format!("producer `{id}` is configured twice")));
        }
        let token = match (&p.token, &p.token_env) {
            (Some(token), None) => token.clone().into_bytes(),
            (None, Some(var)) => std::env::var(var.get_ref())
                .map_err(|_| {
                    source.at(
                        var,
                        format!(
                            "producer `{id}`: environment variable `{}` is not set (or not UTF-8)",
                            var.get_ref()
                        ),
                    )
                })?
                .into_bytes(),
            _ => {
                return Err(source.at(
                    spanned,
                    format!("producer `{id}` needs exactly one of `token` and `token_env`"),
                ));
            }
        };
        if token.is_empty() {
            return Err(source.at(spanned, format!("producer `{id}`: the token is empty")));
        }
        if token.len() > weir_format::frame::MAX_TOKEN_BYTES {
            return Err(source.at(
                spanned,
                format!(
                    "producer `{id}`: token of {} bytes exceeds the limit of {} (max_token_bytes)",
                    token.len(),
                    weir_format::frame::MAX_TOKEN_BYTES
                ),
            ));
        }
        out.push(ProducerConfig { id, token });
    }
    Ok(out)
}

fn sinks(
    source: &Source<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<RawSink>>,
    resolve: &impl Fn(&str) -> PathBuf,
) -> Result<Vec<SinkConfig>, ConfigError> {
    let mut sinks: Vec<(&Spanned<String>, &Spanned<RawSink>)> = raw.iter().collect();
    sinks.sort_by_key(|(name, _)| name.span().start);
    let mut out = Vec::new();
    for (name, sink) in sinks {
        check_name(source, name, "sink name")?;
        let kind = match sink.get_ref() {
            RawSink::File(f) => SinkKind::File {
                path: resolve(&f.path),
                fsync: f.fsync,
            },
            RawSink::Null(RawNullSink {}) => SinkKind::Null,
        };
        out.push(SinkConfig {
            name: name.get_ref().clone(),
            kind,
        });
    }
    Ok(out)
}

fn pipeline(
    source: &Source<'_>,
    name: &Spanned<String>,
    raw: &RawPipeline,
    sinks: &[&str],
    resolve: &impl Fn(&str) -> PathBuf,
) -> Result<PipelineConfig, ConfigError> {
    check_name(source, name, "pipeline name")?;
    let pipeline = name.get_ref();
    let known = |s: &Spanned<String>| -> Result<String, ConfigError> {
        if sinks.contains(&s.get_ref().as_str()) {
            Ok(s.get_ref().clone())
        } else {
            Err(source.at(
                s,
                format!(
                    "pipeline `{pipeline}`: unknown sink `{}` (configured sinks: {})",
                    s.get_ref(),
                    list(sinks.iter().copied())
                ),
            ))
        }
    };
    if raw.sinks.is_empty() {
        return Err(source.at(
            name,
            format!(
                "pipeline `{pipeline}` has no sinks: add `sinks = [\"NAME\"]` naming a [sinks.NAME] table"
            ),
        ));
    }
    let mut pipeline_sinks: Vec<String> = Vec::new();
    for s in &raw.sinks {
        let sink = known(s)?;
        if pipeline_sinks.contains(&sink) {
            return Err(source.at(
                s,
                format!("pipeline `{pipeline}` lists sink `{sink}` twice"),
            ));
        }
        pipeline_sinks.push(sink);
    }
    let dead_letters = raw.dead_letters.as_ref().map(known).transpose()?;

    let mut stages: Vec<StageSpec> = Vec::new();
    for spanned in &raw.stages {
        let stage = stage(source, pipeline, spanned, resolve)?;
        let name = match &spanned.get_ref().name {
            Some(name) => name.clone(),
            None => match stages
                .iter()
                .filter(|s| s.plugin.name() == stage.plugin.name())
                .count()
            {
                0 => stage.plugin.name(),
                n => format!("{}#{}", stage.plugin.name(), n + 1),
            },
        };
        if stages.iter().any(|s| s.name == name) {
            return Err(source.at(
                spanned,
                format!("pipeline `{pipeline}`: two stages are named `{name}`"),
            ));
        }
        stages.push(StageSpec { name, ..stage });
    }
    Ok(PipelineConfig {
        name: pipeline.clone(),
        stages,
        producers: raw.producers.clone(),
        sinks: pipeline_sinks,
        dead_letters,
    })
}

fn list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.map(|n| format!("`{n}`")).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn stage(
    source: &Source<'_>,
    pipeline: &str,
    spanned: &Spanned<RawStage>,
    resolve: &impl Fn(&str) -> PathBuf,
) -> Result<StageSpec, ConfigError> {
    let raw = spanned.get_ref();
    let plugin = match (&raw.plugin, &raw.path) {
        (Some(plugin), None) => {
            let text = plugin.get_ref();
            let Some(example) = text.strip_prefix("example:") else {
                return Err(source.at(
                    plugin,
                    format!(
                        "pipeline `{pipeline}`: plugin `{text}`: expected `example:NAME` (an embedded example) or `path = \"FILE.wasm\"` instead of `plugin`"
                    ),
                ));
            };
            if !crate::examples::ALL
                .iter()
                .any(|(name, _)| *name == example)
            {
                return Err(source.at(
                    plugin,
                    format!(
                        "pipeline `{pipeline}`: unknown plugin `{text}` (examples: {})",
                        list(crate::examples::ALL.iter().map(|(n, _)| *n))
                    ),
                ));
            }
            PluginSource::Example(example.to_owned())
        }
        (None, Some(path)) => PluginSource::File(resolve(path)),
        _ => {
            return Err(source.at(
                spanned,
                format!(
                    "pipeline `{pipeline}`: a stage needs exactly one of `plugin = \"example:NAME\"` and `path = \"FILE.wasm\"`"
                ),
            ));
        }
    };
    let window = match &raw.window {
        None => None,
        Some(w) => {
            let config: WindowConfig = w
                .get_ref()
                .parse()
                .map_err(|e| source.at(w, format!("pipeline `{pipeline}`: {e}")))?;
            config
                .validate()
                .map_err(|e| source.at(w, format!("pipeline `{pipeline}`: {e}")))?;
            Some(config)
        }
    };
    let defaults = crate::runtime::Limits::default();
    let memory_bytes = match &raw.memory_mib {
        None => defaults.memory_bytes,
        Some(mib) => match mib.get_ref().checked_mul(1 << 20) {
            Some(bytes) if *mib.get_ref() > 0 && bytes <= 4 << 30 => bytes,
            _ => {
                return Err(source.at(
                    mib,
                    format!(
                        "pipeline `{pipeline}`: memory_mib = {} must be 1 to 4096",
                        mib.get_ref()
                    ),
                ));
            }
        },
    };
    let deadline = match &raw.deadline_ms {
        None => defaults.deadline,
        Some(ms) if *ms.get_ref() > 0 => Duration::from_millis(*ms.get_ref()),
        Some(ms) => {
            return Err(source.at(
                ms,
                format!("pipeline `{pipeline}`: deadline_ms must be at least 1"),
            ));
        }
    };
    let mut with = Vec::new();
    for (key, value) in &raw.with {
        let json = serde_json::to_string(value).map_err(|e| {
            source.at(
                spanned,
                format!("pipeline `{pipeline}`: `with.{key}` cannot be passed as JSON: {e}"),
            )
        })?;
        with.push((key.clone(), json));
    }
    Ok(StageSpec {
        name: String::new(),
        plugin,
        with,
        window,
        memory_bytes,
        deadline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[listener]
listen = "127.0.0.1:0"
data_dir = "data"

[pipelines.clicks]
sinks = ["out"]

[[pipelines.clicks.stages]]
plugin = "example:drop-bots"

[sinks.out]
type = "file"
path = "out.jsonl"
"#;

    fn error(text: &str) -> String {
        Config::parse(text, "conf/weir.toml")
            .map(|_| ())
            .expect_err("invalid")
            .to_string()
    }

    #[test]
    fn a_minimal_config_resolves_paths_against_its_directory() {
        assert_eq!(
            normalize(Path::new("examples/../target/./x")),
            PathBuf::from("target/x")
        );
        assert_eq!(normalize(Path::new("../a/..")), PathBuf::from(".."));
        let config = Config::parse(MINIMAL, "conf/weir.toml").expect("valid");
        assert_eq!(config.data_dir, PathBuf::from("conf/data"));
        assert_eq!(
            config.sinks,
            vec![SinkConfig {
                name: "out".into(),
                kind: SinkKind::File {
                    path: PathBuf::from("conf/out.jsonl"),
                    fsync: Fsync::OnAck
                }
            }]
        );
        let clicks = config.pipeline("clicks").expect("clicks");
        assert_eq!(clicks.stages[0].name, "drop-bots");
        assert_eq!(
            clicks.stages[0].plugin,
            PluginSource::Example("drop-bots".into())
        );
        assert_eq!(config.limits, ServerLimits::default());
    }

    #[test]
    fn errors_name_the_file_line_and_problem() {
        assert_eq!(
            error(&MINIMAL.replace("drop-bots", "nope")),
            "conf/weir.toml:10:10: pipeline `clicks`: unknown plugin `example:nope` (examples: `drop-bots`, `geo-enrich`, `count-sum`, `identity`)"
        );
        assert_eq!(
            error(&MINIMAL.replace("sinks = [\"out\"]", "sinks = [\"oops\"]")),
            "conf/weir.toml:7:10: pipeline `clicks`: unknown sink `oops` (configured sinks: `out`)"
        );
        assert_eq!(
            error(&MINIMAL.replace("sinks = [\"out\"]", "")),
            "conf/weir.toml:6:12: pipeline `clicks` has no sinks: add `sinks = [\"NAME\"]` naming a [sinks.NAME] table"
        );
        assert!(
            error(&MINIMAL.replace("data_dir", "data_dri"))
                .starts_with("conf/weir.toml:4:1: unknown field `data_dri`"),
            "{}",
            error(&MINIMAL.replace("data_dir", "data_dri"))
        );
        assert_eq!(
            error(&MINIMAL.replace(
                "plugin = \"example:drop-bots\"",
                "plugin = \"example:count-sum\"\nwindow = \"tumbling:0s\""
            )),
            "conf/weir.toml:11:10: pipeline `clicks`: bad window `tumbling:0s`: the window size must be longer than zero (expected e.g. `tumbling:60s`, `sliding:60s/10s`, `tumbling:1m,lateness:5s`)"
        );
    }

    #[test]
    fn the_handshake_timeout_is_bounded() {
        let text = |ms: u64| format!("{MINIMAL}\n[limits]\nhandshake_timeout_ms = {ms}\n");
        assert_eq!(
            error(&text(i64::MAX as u64)),
            "conf/weir.toml:17:24: handshake_timeout_ms = 9223372036854775807 is above the maximum of 3600000"
        );
        let config = Config::parse(&text(3_600_000), "conf/weir.toml").expect("valid");
        assert_eq!(config.limits.handshake_timeout, Duration::from_secs(3600));
    }

    #[test]
    fn unknown_sink_keys_and_types_are_refused() {
        let e = error(&MINIMAL.replace("path = \"out.jsonl\"", "path = \"o\"\nrotate = 1"));
        assert!(e.contains("unknown field `rotate`"), "{e}");
        let e = error(&MINIMAL.replace("type = \"file\"", "type = \"kafka\""));
        assert!(e.contains("unknown variant `kafka`"), "{e}");
    }

    #[test]
    fn tokens_come_from_the_file_or_the_environment() {
        let text = format!(
            "{MINIMAL}\n[[producers]]\nid = \"a\"\ntoken = \"t\"\n\n[[producers]]\nid = \"b\"\ntoken_env = \"WEIR_CONFIG_TEST_UNSET_VARIABLE\"\n"
        );
        assert_eq!(
            error(&text),
            "conf/weir.toml:22:13: producer `b`: environment variable `WEIR_CONFIG_TEST_UNSET_VARIABLE` is not set (or not UTF-8)"
        );
        let ok = Config::parse(
            &text.replace(
                "token_env = \"WEIR_CONFIG_TEST_UNSET_VARIABLE\"",
                "token = \"u\"",
            ),
            "w.toml",
        )
        .expect("valid");
        assert_eq!(ok.producers[1].token, b"u");
        assert_eq!(
            format!("{:?}", ok.producers[0]),
            "ProducerConfig { id: \"a\", token: \"<redacted>\" }"
        );
    }
}
