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
//! - **Each component owns its config type**: [`ListenerConfig`] and its parts live in
//!   `sources::quic`, [`PipelineConfig`] and the routes in `pipeline`, [`SinkConfig`] and each
//!   destination's config in `sinks`. This module only reads the file into them (it imports
//!   them; they never import it), so a component can be built, tested and later reloaded from
//!   its own config alone.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;
use weir_format::frame::{BATCH_HEADER_BYTES, MAX_NAME_BYTES};

use crate::admin::AdminConfig;
use crate::pipeline::WindowConfig;
use crate::pipeline::config::{
    MAX_WORKERS, PipelineConfig, PluginSource, StageSpec, dead_letter_file, default_workers,
};
use crate::pipeline::route::{Condition, Route, Unmatched};
use crate::sinks::{
    BufferConfig, FileConfig, Fsync, HttpConfig, KafkaConfig, PostgresConfig, QuicConfig,
    RetryConfig, SinkConfig, SinkKind, TopicFrom, WhenFull,
};
use crate::sources::SourceConfig;
use crate::sources::kafka::config::{KafkaSourceConfig, StartAt};
use crate::sources::quic::config::{ListenerConfig, ProducerConfig, ServerLimits, TlsConfig};

/// A config that cannot be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// Why (in the message, not a source: error chains would print it twice).
        error: std::io::Error,
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
    /// Where the server keeps its generated certificate and its dead-letter files.
    pub data_dir: PathBuf,
    /// The QUIC listener: address, TLS, limits, producers.
    pub listener: ListenerConfig,
    /// Pipelines, in file order.
    pub pipelines: Vec<PipelineConfig>,
    /// Sources besides the QUIC listener (`[sources.NAME]`), in file order.
    pub sources: Vec<SourceConfig>,
    /// Sinks, by name.
    pub sinks: Vec<SinkConfig>,
    /// Where the Prometheus endpoint listens (`[metrics] listen`); `None`: no endpoint.
    pub metrics: Option<SocketAddr>,
    /// The admin endpoint (`[admin]`); `None`: no endpoint, no deploys.
    pub admin: Option<AdminConfig>,
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
    sinks: BTreeMap<Spanned<String>, Spanned<toml::Table>>,
    #[serde(default)]
    sources: BTreeMap<Spanned<String>, Spanned<RawSource>>,
    metrics: Option<RawMetrics>,
    admin: Option<Spanned<RawAdmin>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
    token: Option<String>,
    token_env: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Spanned<String>,
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
    sinks: Vec<Spanned<RawRoute>>,
    unmatched: Option<Spanned<String>>,
    dead_letters: Option<Spanned<String>>,
    version_header: Option<Spanned<String>>,
    #[serde(default = "default_true")]
    checkpoint: bool,
    workers: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawRoute {
    Name(String),
    Table(RawRouteTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouteTable {
    sink: String,
    route: Option<OneOrMany>,
    header: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
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
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum RawSink {
    File {
        path: String,
        #[serde(default = "default_fsync")]
        fsync: Fsync,
        rotate_bytes: Option<u64>,
        rotate_interval: Option<String>,
    },
    Stdout {},
    Http {
        url: String,
        #[serde(default)]
        headers: BTreeMap<String, String>,
        timeout_ms: Option<u64>,
    },
    Quic {
        address: String,
        pipeline: String,
        producer_id: Option<String>,
        token: Option<String>,
        token_env: Option<String>,
        pin: Option<String>,
        ca: Option<String>,
        server_name: Option<String>,
    },
    Postgres {
        url: Option<String>,
        url_env: Option<String>,
        table: String,
        #[serde(default = "default_true")]
        create: bool,
        #[serde(default)]
        columns: BTreeMap<String, String>,
    },
    Kafka {
        brokers: String,
        topic: Option<String>,
        topic_from: Option<String>,
        #[serde(default)]
        properties: BTreeMap<String, String>,
        timeout_ms: Option<u64>,
    },
    Null {},
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum RawSource {
    Kafka {
        brokers: String,
        topic: Option<String>,
        topics: Option<Vec<String>>,
        group: String,
        pipeline: String,
        batch_events: Option<u64>,
        batch_ms: Option<u64>,
        start: Option<String>,
        rebalance_wait_ms: Option<u64>,
        #[serde(default)]
        properties: BTreeMap<String, String>,
    },
}

fn default_fsync() -> Fsync {
    Fsync::OnAck
}

fn default_true() -> bool {
    true
}

/// The keys every sink table may have besides its `type`'s.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBuffer {
    when_full: Option<WhenFull>,
    buffer_events: Option<u64>,
    buffer_bytes: Option<u64>,
    spill_bytes: Option<u64>,
    batch_events: Option<u64>,
    retry_initial_ms: Option<u64>,
    retry_max_ms: Option<u64>,
}

const BUFFER_KEYS: [&str; 7] = [
    "when_full",
    "buffer_events",
    "buffer_bytes",
    "spill_bytes",
    "batch_events",
    "retry_initial_ms",
    "retry_max_ms",
];

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
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
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

        let sources = sources(&source, &raw.sources, &pipelines)?;
        let data_dir = resolve(&raw.listener.data_dir);
        check_sinks_in_use(&source, &raw.sinks, &sinks, &pipelines, listen)?;
        check_files(&source, &raw.sinks, &sinks, &pipelines, &data_dir)?;
        let metrics = match &raw.metrics {
            None => None,
            Some(m) => Some(m.listen.get_ref().parse::<SocketAddr>().map_err(|_| {
                source.at(
                    &m.listen,
                    format!(
                        "[metrics] listen address `{}` is not IP:PORT (e.g. 127.0.0.1:9090)",
                        m.listen.get_ref()
                    ),
                )
            })?),
        };

        let admin = match &raw.admin {
            None => None,
            Some(spanned) => Some(admin(&source, spanned)?),
        };
        Ok(Config {
            path: path.to_path_buf(),
            data_dir,
            listener: ListenerConfig {
                listen,
                tls,
                limits,
                allow_anonymous: raw.auth.anonymous,
                producers,
            },
            pipelines,
            sources,
            sinks,
            metrics,
            admin,
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

/// Pipeline and sink names also name files and directories under the data directory
/// (`dead-letters/PIPELINE.jsonl`, `spill/SINK/`): letters, digits, `-`, `_` and `.`, not
/// starting with `.`.
fn check_file_name(
    source: &Source<'_>,
    name: &Spanned<String>,
    what: &str,
) -> Result<(), ConfigError> {
    check_name(source, name, what)?;
    let n = name.get_ref();
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !n.chars().all(allowed) || n.starts_with('.') {
        return Err(source.at(
            name,
            format!(
                "{what} `{n}` may hold only letters, digits, `-`, `_` and `.` (not first): it also names files under data_dir"
            ),
        ));
    }
    Ok(())
}

/// A token given inline (`token`) or by the name of an environment variable (`token_env`),
/// exactly one; `who` names the table in errors.
fn secret<T>(
    source: &Source<'_>,
    table: &Spanned<T>,
    inline: &Option<String>,
    env: &Option<Spanned<String>>,
    who: &str,
) -> Result<Vec<u8>, ConfigError> {
    match (inline, env) {
        (Some(token), None) => Ok(token.clone().into_bytes()),
        (None, Some(var)) => std::env::var(var.get_ref())
            .map(String::into_bytes)
            .map_err(|_| {
                source.at(
                    var,
                    format!(
                        "{who}: environment variable `{}` is not set (or not UTF-8)",
                        var.get_ref()
                    ),
                )
            }),
        _ => Err(source.at(
            table,
            format!("{who} needs exactly one of `token` and `token_env`"),
        )),
    }
}

fn admin(source: &Source<'_>, spanned: &Spanned<RawAdmin>) -> Result<AdminConfig, ConfigError> {
    let raw = spanned.get_ref();
    let listen = match &raw.listen {
        None => crate::admin::DEFAULT_LISTEN
            .parse()
            .map_err(|_| source.at(spanned, "the default admin address does not parse"))?,
        Some(listen) => listen.get_ref().parse::<SocketAddr>().map_err(|_| {
            source.at(
                listen,
                format!(
                    "[admin] listen address `{}` is not IP:PORT (e.g. {})",
                    listen.get_ref(),
                    crate::admin::DEFAULT_LISTEN
                ),
            )
        })?,
    };
    let token = secret(source, spanned, &raw.token, &raw.token_env, "[admin]")?;
    if token.is_empty() {
        return Err(source.at(spanned, "[admin]: the token is empty"));
    }
    Ok(AdminConfig { listen, token })
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
        let token = secret(
            source,
            spanned,
            &p.token,
            &p.token_env,
            &format!("producer `{id}`"),
        )?;
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

/// Every sink is used; dead-letter sinks never drop; no quic sink forwards to this router.
fn check_sinks_in_use(
    source: &Source<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<toml::Table>>,
    sinks: &[SinkConfig],
    pipelines: &[PipelineConfig],
    listen: SocketAddr,
) -> Result<(), ConfigError> {
    for (name, table) in raw {
        let sink = name.get_ref();
        let Some(config) = sinks.iter().find(|s| &s.name == sink) else {
            continue;
        };
        let used = pipelines.iter().any(|p| {
            p.sinks.iter().any(|r| &r.sink == sink)
                || p.unmatched == Unmatched::Sink(sink.clone())
                || p.dead_letters.as_ref() == Some(sink)
        });
        if !used {
            return Err(source.at(
                name,
                format!(
                    "sink `{sink}` is not used by any pipeline: list it in a pipeline's `sinks`, `unmatched` or `dead_letters`, or remove it"
                ),
            ));
        }
        if let Some(path) = dead_letter_loop(pipelines, sink) {
            return Err(source.at(
                name,
                format!(
                    "sink `{sink}`: dead letters go round in a loop ({}): a sink waits for its dead-letter sink to take the events its destination refuses, so refusals on both sides would stall them for good; give one of these pipelines another dead-letter sink",
                    path.join(" → ")
                ),
            ));
        }
        if let Some(p) = pipelines
            .iter()
            .find(|p| p.dead_letters.as_ref() == Some(sink))
            && matches!(
                config.buffer.when_full,
                WhenFull::DropNewest | WhenFull::DropOldest
            )
        {
            return Err(source.at(
                table,
                format!(
                    "sink `{sink}` is pipeline `{}`'s dead-letter sink, so it may not drop events: use when_full = \"block\" or \"spill\"",
                    p.name
                ),
            ));
        }
        if let SinkKind::Quic(q) = &config.kind
            && forwards_to(&q.address, listen)
        {
            return Err(source.at(
                table,
                format!(
                    "sink `{sink}` forwards to `{}`, this router's own listener: a loop (every event would come back forever)",
                    q.address
                ),
            ));
        }
    }
    Ok(())
}

/// File sinks each write a file of their own: two sinks appending to one file would interleave
/// their lines and rotate each other's files, and a sink writing a pipeline's default
/// dead-letter file would mix events and dead letters. Refused at the later sink, naming both.
fn check_files(
    source: &Source<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<toml::Table>>,
    sinks: &[SinkConfig],
    pipelines: &[PipelineConfig],
    data_dir: &Path,
) -> Result<(), ConfigError> {
    let mut files: Vec<(PathBuf, String)> = pipelines
        .iter()
        .filter(|p| p.dead_letters.is_none())
        .map(|p| {
            (
                dead_letter_file(data_dir, &p.name),
                format!("pipeline `{}`'s dead-letter file", p.name),
            )
        })
        .collect();
    let mut raw: Vec<_> = raw.iter().collect();
    raw.sort_by_key(|(name, _)| name.span().start);
    for (name, table) in raw {
        let Some(SinkKind::File(file)) = sinks
            .iter()
            .find(|s| &s.name == name.get_ref())
            .map(|s| &s.kind)
        else {
            continue;
        };
        if let Some((_, owner)) = files.iter().find(|(path, _)| *path == file.path) {
            return Err(source.at(
                table,
                format!(
                    "sink `{}` writes to {}, which is {owner}: lines of both would interleave in one file; give the sink a path of its own",
                    name.get_ref(),
                    file.path.display()
                ),
            ));
        }
        files.push((
            file.path.clone(),
            format!("sink `{}`'s file", name.get_ref()),
        ));
    }
    Ok(())
}

/// A loop of dead-letter hand-offs through sink `start`, if there is one, as the sinks on it:
/// `s → t` when a pipeline sends events to `s` (routed or unmatched) and its dead letters to
/// `t`.
fn dead_letter_loop(pipelines: &[PipelineConfig], start: &str) -> Option<Vec<String>> {
    let next = |from: &str| -> Vec<String> {
        pipelines
            .iter()
            .filter(|p| {
                p.sinks.iter().any(|r| r.sink == from)
                    || p.unmatched == Unmatched::Sink(from.to_owned())
            })
            .filter_map(|p| p.dead_letters.clone())
            .collect()
    };
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![vec![start.to_owned()]];
    while let Some(path) = stack.pop() {
        for to in next(path.last()?) {
            let mut longer = path.clone();
            longer.push(to.clone());
            if to == start {
                return Some(longer);
            }
            if seen.insert(to) {
                stack.push(longer);
            }
        }
    }
    None
}

/// Whether `address` (host:port) names `listen`: the same port on the same IP, on loopback
/// or `localhost` when listening on a loopback or unspecified address.
fn forwards_to(address: &str, listen: SocketAddr) -> bool {
    let Some((host, port)) = address.rsplit_once(':') else {
        return false;
    };
    if port.parse::<u16>().ok() != Some(listen.port()) || listen.port() == 0 {
        return false;
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = match host {
        "localhost" => Some(std::net::IpAddr::from([127, 0, 0, 1])),
        _ => host.parse::<std::net::IpAddr>().ok(),
    };
    match ip {
        Some(ip) if ip == listen.ip() => true,
        Some(ip) => ip.is_loopback() && (listen.ip().is_unspecified() || listen.ip().is_loopback()),
        None => false,
    }
}

fn sinks(
    source: &Source<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<toml::Table>>,
    resolve: &impl Fn(&str) -> PathBuf,
) -> Result<Vec<SinkConfig>, ConfigError> {
    let mut sinks: Vec<(&Spanned<String>, &Spanned<toml::Table>)> = raw.iter().collect();
    sinks.sort_by_key(|(name, _)| name.span().start);
    let mut out = Vec::new();
    for (name, table) in sinks {
        check_file_name(source, name, "sink name")?;
        out.push(sink(source, name, table, resolve)?);
    }
    Ok(out)
}

fn sink(
    source: &Source<'_>,
    name: &Spanned<String>,
    table: &Spanned<toml::Table>,
    resolve: &impl Fn(&str) -> PathBuf,
) -> Result<SinkConfig, ConfigError> {
    let sink = name.get_ref();
    let bad = |message: String| source.at(table, format!("sink `{sink}`: {message}"));
    let (common, rest): (toml::Table, toml::Table) = table
        .get_ref()
        .clone()
        .into_iter()
        .partition(|(k, _)| BUFFER_KEYS.contains(&k.as_str()));
    let raw_buffer: RawBuffer = toml::Value::Table(common)
        .try_into()
        .map_err(|e: toml::de::Error| bad(e.message().trim_end().to_owned()))?;
    if !rest.contains_key("type") {
        return Err(bad(
            "no `type` (one of `file`, `stdout`, `http`, `quic`, `postgres`, `kafka`, `null`)"
                .into(),
        ));
    }
    let raw: RawSink = toml::Value::Table(rest)
        .try_into()
        .map_err(|e: toml::de::Error| bad(e.message().trim_end().to_owned()))?;
    let env = |var: &str| {
        std::env::var(var).map_err(|_| {
            bad(format!(
                "environment variable `{var}` is not set (or not UTF-8)"
            ))
        })
    };
    let kind = match raw {
        RawSink::File {
            path,
            fsync,
            rotate_bytes,
            rotate_interval,
        } => {
            if rotate_bytes == Some(0) {
                return Err(bad("rotate_bytes must be above 0".into()));
            }
            let rotate_interval = match rotate_interval {
                None => None,
                Some(text) => match crate::pipeline::window::duration(&text) {
                    Ok(ms) if ms > 0 => Some(Duration::from_millis(ms as u64)),
                    Ok(_) => return Err(bad("rotate_interval must be longer than zero".into())),
                    Err(e) => return Err(bad(format!("rotate_interval: {e}"))),
                },
            };
            SinkKind::File(FileConfig {
                path: resolve(&path),
                fsync,
                rotate_bytes,
                rotate_interval,
            })
        }
        RawSink::Stdout {} => SinkKind::Stdout,
        RawSink::Http {
            url,
            headers,
            timeout_ms,
        } => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(bad(format!(
                    "url `{url}` must start with http:// or https://"
                )));
            }
            SinkKind::Http(HttpConfig {
                url,
                headers: headers.into_iter().collect(),
                timeout: match timeout_ms.unwrap_or(10_000) {
                    ms @ 1..=3_600_000 => Duration::from_millis(ms),
                    ms => {
                        return Err(bad(format!(
                            "timeout_ms = {ms} is outside 1 to 3600000 (one hour)"
                        )));
                    }
                },
            })
        }
        RawSink::Quic {
            address,
            pipeline,
            producer_id,
            token,
            token_env,
            pin,
            ca,
            server_name,
        } => {
            if pin.is_none() && ca.is_none() {
                return Err(bad(
                    "a quic sink needs `pin` (the downstream's fingerprint, as `weir serve` prints it) or `ca`"
                        .into(),
                ));
            }
            if let Some(pin) = &pin {
                weir_client::tls::parse_fingerprint(pin).map_err(|e| bad(format!("pin: {e}")))?;
            }
            let token = match (token, token_env) {
                (Some(_), Some(_)) => {
                    return Err(bad("give `token` or `token_env`, not both".into()));
                }
                (Some(t), None) => Some(t),
                (None, Some(var)) => Some(env(&var)?),
                (None, None) => None,
            };
            SinkKind::Quic(QuicConfig {
                address,
                pipeline,
                producer_id: producer_id.unwrap_or_else(|| format!("weir-{sink}")),
                token,
                pin,
                ca: ca.as_deref().map(resolve),
                server_name,
            })
        }
        RawSink::Postgres {
            url,
            url_env,
            table,
            create,
            columns,
        } => {
            let url = match (url, url_env) {
                (Some(u), None) => u,
                (None, Some(var)) => env(&var)?,
                _ => return Err(bad("give exactly one of `url` and `url_env`".into())),
            };
            let columns: Vec<(String, String)> = columns.into_iter().collect();
            crate::sinks::check_table(&table).map_err(bad)?;
            crate::sinks::check_columns(&columns).map_err(|e| bad(format!("columns: {e}")))?;
            SinkKind::Postgres(PostgresConfig {
                url,
                table,
                create,
                columns,
            })
        }
        RawSink::Kafka {
            brokers,
            topic,
            topic_from,
            properties,
            timeout_ms,
        } => {
            if brokers.trim().is_empty() {
                return Err(bad("brokers is empty: give `host:port[,host:port…]`".into()));
            }
            let topic_from = match topic_from {
                None => TopicFrom::Config,
                Some(text) => TopicFrom::parse(&text).map_err(bad)?,
            };
            if topic_from == TopicFrom::Config && topic.is_none() {
                return Err(bad(
                    "a kafka sink needs `topic`, or `topic_from` (`route` or `header:NAME`)".into(),
                ));
            }
            if topic.as_deref() == Some("") {
                return Err(bad("topic is empty".into()));
            }
            let properties: Vec<(String, String)> = properties.into_iter().collect();
            crate::sinks::check_properties(&properties).map_err(bad)?;
            SinkKind::Kafka(KafkaConfig {
                brokers,
                topic,
                topic_from,
                properties,
                timeout: match timeout_ms.unwrap_or(30_000) {
                    ms @ 1..=3_600_000 => Duration::from_millis(ms),
                    ms => {
                        return Err(bad(format!(
                            "timeout_ms = {ms} is outside 1 to 3600000 (one hour)"
                        )));
                    }
                },
            })
        }
        RawSink::Null {} => SinkKind::Null,
    };
    let defaults = BufferConfig::default();
    let positive = |key: &str, v: Option<u64>, default: u64| -> Result<u64, ConfigError> {
        match v {
            Some(0) => Err(bad(format!("{key} must be above 0"))),
            Some(v) => Ok(v),
            None => Ok(default),
        }
    };
    let buffer = BufferConfig {
        when_full: raw_buffer.when_full.unwrap_or(defaults.when_full),
        max_events: positive(
            "buffer_events",
            raw_buffer.buffer_events,
            defaults.max_events as u64,
        )? as usize,
        max_bytes: positive(
            "buffer_bytes",
            raw_buffer.buffer_bytes,
            defaults.max_bytes as u64,
        )? as usize,
        spill_bytes: positive("spill_bytes", raw_buffer.spill_bytes, defaults.spill_bytes)?,
        batch_events: positive(
            "batch_events",
            raw_buffer.batch_events,
            defaults.batch_events as u64,
        )? as usize,
    };
    let retry_defaults = RetryConfig::default();
    let retry = RetryConfig {
        initial: Duration::from_millis(positive(
            "retry_initial_ms",
            raw_buffer.retry_initial_ms,
            retry_defaults.initial.as_millis() as u64,
        )?),
        max: Duration::from_millis(positive(
            "retry_max_ms",
            raw_buffer.retry_max_ms,
            retry_defaults.max.as_millis() as u64,
        )?),
    };
    if retry.max < retry.initial {
        return Err(bad(format!(
            "retry_max_ms ({}) is below retry_initial_ms ({})",
            retry.max.as_millis(),
            retry.initial.as_millis()
        )));
    }
    Ok(SinkConfig {
        name: sink.clone(),
        kind,
        buffer,
        retry,
    })
}

fn sources(
    source: &Source<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<RawSource>>,
    pipelines: &[PipelineConfig],
) -> Result<Vec<SourceConfig>, ConfigError> {
    let mut sources: Vec<(&Spanned<String>, &Spanned<RawSource>)> = raw.iter().collect();
    sources.sort_by_key(|(name, _)| name.span().start);
    let mut out = Vec::new();
    for (name, spanned) in sources {
        check_name(source, name, "source name")?;
        let bad =
            |message: String| source.at(spanned, format!("source `{}`: {message}", name.get_ref()));
        let RawSource::Kafka {
            brokers,
            topic,
            topics,
            group,
            pipeline,
            batch_events,
            batch_ms,
            start,
            rebalance_wait_ms,
            properties,
        } = spanned.get_ref();
        if brokers.trim().is_empty() {
            return Err(bad("brokers is empty: give `host:port[,host:port…]`".into()));
        }
        let topics: Vec<String> = match (topic, topics) {
            (Some(t), None) => vec![t.clone()],
            (None, Some(ts)) if !ts.is_empty() => ts.clone(),
            (Some(_), Some(_)) => return Err(bad("give `topic` or `topics`, not both".into())),
            _ => {
                return Err(bad(
                    "a kafka source needs `topic = \"NAME\"` or `topics = [...]`".into(),
                ));
            }
        };
        if let Some(t) = topics.iter().find(|t| !kafka_topic_name(t)) {
            return Err(bad(format!(
                "`{t}` is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"
            )));
        }
        if group.trim().is_empty() {
            return Err(bad("group is empty".into()));
        }
        if !pipelines.iter().any(|p| &p.name == pipeline) {
            return Err(bad(format!(
                "unknown pipeline `{pipeline}` (configured pipelines: {})",
                list(pipelines.iter().map(|p| p.name.as_str()))
            )));
        }
        let start = match start.as_deref() {
            None | Some("earliest") => StartAt::Earliest,
            Some("latest") => StartAt::Latest,
            Some(other) => {
                return Err(bad(format!(
                    "start = `{other}`: give `earliest` or `latest`"
                )));
            }
        };
        let batch_events = match batch_events.unwrap_or(1024) {
            n @ 1..=65_536 => n as usize,
            n => return Err(bad(format!("batch_events = {n} is outside 1 to 65536"))),
        };
        let linger = match batch_ms.unwrap_or(5) {
            ms @ 0..=60_000 => Duration::from_millis(ms),
            ms => return Err(bad(format!("batch_ms = {ms} is outside 0 to 60000"))),
        };
        // Well below librdkafka's `max.poll.interval.ms` (five minutes): a member that waits
        // longer in a rebalance is put out of the group.
        let rebalance_wait = match rebalance_wait_ms.unwrap_or(10_000) {
            ms @ 1..=120_000 => Duration::from_millis(ms),
            ms => {
                return Err(bad(format!(
                    "rebalance_wait_ms = {ms} is outside 1 to 120000 (two minutes)"
                )));
            }
        };
        let properties: Vec<(String, String)> = properties
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        crate::sources::kafka::config::check_properties(&properties).map_err(bad)?;
        out.push(SourceConfig::Kafka(KafkaSourceConfig {
            name: name.get_ref().clone(),
            brokers: brokers.clone(),
            topics,
            group: group.clone(),
            pipeline: pipeline.clone(),
            batch_events,
            linger,
            start,
            rebalance_wait,
            properties,
        }));
    }
    Ok(out)
}

/// Whether `name` is a valid Kafka topic name.
fn kafka_topic_name(name: &str) -> bool {
    (1..=249).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn pipeline(
    source: &Source<'_>,
    name: &Spanned<String>,
    raw: &RawPipeline,
    sinks: &[&str],
    resolve: &impl Fn(&str) -> PathBuf,
) -> Result<PipelineConfig, ConfigError> {
    check_file_name(source, name, "pipeline name")?;
    let pipeline = name.get_ref();
    let known = |at: std::ops::Range<usize>, name: &str| -> Result<String, ConfigError> {
        if sinks.contains(&name) {
            Ok(name.to_owned())
        } else {
            Err(source.error(
                at.start,
                format!(
                    "pipeline `{pipeline}`: unknown sink `{name}` (configured sinks: {})",
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
    let mut routes: Vec<Route> = Vec::new();
    for spanned in &raw.sinks {
        let (sink, condition) = match spanned.get_ref() {
            RawRoute::Name(name) => (known(spanned.span(), name)?, Condition::All),
            RawRoute::Table(t) => {
                let sink = known(spanned.span(), &t.sink)?;
                let condition = match (&t.route, &t.header) {
                    (Some(_), Some(_)) => {
                        return Err(source.at(
                            spanned,
                            format!(
                                "pipeline `{pipeline}`, sink `{sink}`: give `route` or `header`, not both"
                            ),
                        ));
                    }
                    (Some(OneOrMany::One(r)), None) => Condition::Route(vec![r.clone()]),
                    (Some(OneOrMany::Many(r)), None) if !r.is_empty() => {
                        Condition::Route(r.clone())
                    }
                    (None, Some(h)) if !h.is_empty() => {
                        Condition::Headers(h.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    }
                    _ => {
                        return Err(source.at(
                            spanned,
                            format!(
                                "pipeline `{pipeline}`, sink `{sink}`: a sink table needs a condition: `route = \"TAG\"` (or a list) or `header = {{ NAME = \"VALUE\" }}`; write just \"{sink}\" for every event"
                            ),
                        ));
                    }
                };
                (sink, condition)
            }
        };
        if routes.iter().any(|r| r.sink == sink) {
            return Err(source.at(
                spanned,
                format!("pipeline `{pipeline}` lists sink `{sink}` twice"),
            ));
        }
        routes.push(Route { sink, condition });
    }
    let catch_all = routes
        .iter()
        .find(|r| r.condition == Condition::All)
        .map(|r| r.sink.clone());
    let unmatched = match (&raw.unmatched, catch_all) {
        (None, Some(_)) => Unmatched::Impossible,
        (None, None) => {
            return Err(source.at(
                name,
                format!(
                    "pipeline `{pipeline}`: every sink has a condition, so some events may match none: set `unmatched = \"drop\"` to drop (and count) them, or `unmatched = \"SINK\"` to send them to a sink"
                ),
            ));
        }
        (Some(u), Some(all)) => {
            return Err(source.at(
                u,
                format!(
                    "pipeline `{pipeline}`: unused output: `unmatched` never receives an event, because sink `{all}` takes every event"
                ),
            ));
        }
        (Some(u), None) if u.get_ref() == "drop" => Unmatched::Drop,
        (Some(u), None) => {
            let sink = known(u.span(), u.get_ref())?;
            if routes.iter().any(|r| r.sink == sink) {
                return Err(source.at(
                    u,
                    format!(
                        "pipeline `{pipeline}`: sink `{sink}` is both a routed sink and `unmatched`: give it `unmatched` only, or list it without a condition"
                    ),
                ));
            }
            Unmatched::Sink(sink)
        }
    };
    let dead_letters = raw
        .dead_letters
        .as_ref()
        .map(|d| known(d.span(), d.get_ref()))
        .transpose()?;
    if let (Some(d), Some(sink)) = (&raw.dead_letters, &dead_letters)
        && (routes.iter().any(|r| &r.sink == sink) || unmatched == Unmatched::Sink(sink.clone()))
    {
        return Err(source.at(
            d,
            format!(
                "pipeline `{pipeline}`: sink `{sink}` is both a destination of the pipeline and its dead-letter sink: a loop (events it refuses would come back to it); name another sink"
            ),
        ));
    }

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
    let version_header = match &raw.version_header {
        None => None,
        Some(h) if h.get_ref().is_empty() || h.get_ref().len() > MAX_NAME_BYTES => {
            return Err(source.at(
                h,
                format!(
                    "pipeline `{pipeline}`: version_header must be 1 to {MAX_NAME_BYTES} bytes"
                ),
            ));
        }
        Some(h) => Some(h.get_ref().clone()),
    };
    let workers = match &raw.workers {
        None => default_workers(),
        Some(w) => match usize::try_from(*w.get_ref()) {
            Ok(n @ 1..=MAX_WORKERS) => n,
            _ => {
                return Err(source.at(
                    w,
                    format!(
                        "pipeline `{pipeline}`: workers must be 1 to {MAX_WORKERS}, not {}",
                        w.get_ref()
                    ),
                ));
            }
        },
    };
    Ok(PipelineConfig {
        name: pipeline.clone(),
        stages,
        producers: raw.producers.clone(),
        sinks: routes,
        unmatched,
        dead_letters,
        version_header,
        checkpoint: raw.checkpoint,
        workers,
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
                kind: SinkKind::File(FileConfig {
                    path: PathBuf::from("conf/out.jsonl"),
                    fsync: Fsync::OnAck,
                    rotate_bytes: None,
                    rotate_interval: None,
                }),
                buffer: BufferConfig::default(),
                retry: RetryConfig::default(),
            }]
        );
        let clicks = config.pipeline("clicks").expect("clicks");
        assert_eq!(clicks.stages[0].name, "drop-bots");
        assert_eq!(
            clicks.stages[0].plugin,
            PluginSource::Example("drop-bots".into())
        );
        assert_eq!(config.listener.limits, ServerLimits::default());
    }

    #[test]
    fn errors_name_the_file_line_and_problem() {
        assert_eq!(
            error(&MINIMAL.replace("drop-bots", "nope")),
            "conf/weir.toml:10:10: pipeline `clicks`: unknown plugin `example:nope` (examples: `drop-bots`, `geo-enrich`, `count-sum`, `identity`, `geo-enrich-v2`)"
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
    fn workers_default_to_the_cores_and_are_bounded() {
        let config = Config::parse(MINIMAL, "conf/weir.toml").expect("valid");
        assert_eq!(
            config.pipeline("clicks").expect("clicks").workers,
            default_workers()
        );
        let text = |n: i64| {
            MINIMAL.replace(
                "sinks = [\"out\"]",
                &format!("sinks = [\"out\"]\nworkers = {n}"),
            )
        };
        let config = Config::parse(&text(3), "conf/weir.toml").expect("valid");
        assert_eq!(config.pipeline("clicks").expect("clicks").workers, 3);
        assert_eq!(
            error(&text(0)),
            "conf/weir.toml:8:11: pipeline `clicks`: workers must be 1 to 256, not 0"
        );
        assert_eq!(
            error(&text(257)),
            "conf/weir.toml:8:11: pipeline `clicks`: workers must be 1 to 256, not 257"
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
        assert_eq!(
            config.listener.limits.handshake_timeout,
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn unknown_sink_keys_and_types_are_refused() {
        let e = error(&MINIMAL.replace("path = \"out.jsonl\"", "path = \"o\"\nrotate = 1"));
        assert!(e.contains("unknown field `rotate`"), "{e}");
        let e = error(&MINIMAL.replace("type = \"file\"", "type = \"kinesis\""));
        assert!(e.contains("unknown variant `kinesis`"), "{e}");
    }

    /// MINIMAL with the pipeline's sinks and extra sink tables replaced.
    fn routed(sinks: &str, extra: &str) -> String {
        MINIMAL.replace("sinks = [\"out\"]", sinks) + extra
    }

    const HTTP: &str =
        "\n[sinks.eu]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/in\"\nwhen_full = \"spill\"\n";

    #[test]
    fn a_kafka_source_names_its_pipeline_topics_and_group() {
        let source = |keys: &str| {
            format!(
                "{MINIMAL}\n[sources.orders]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\n{keys}\n"
            )
        };
        let config = Config::parse(
            &source("topics = [\"a\", \"b.c\"]\ngroup = \"g\"\npipeline = \"clicks\"\nstart = \"latest\"\nbatch_ms = 0"),
            "conf/weir.toml",
        )
        .expect("valid");
        assert_eq!(
            config.sources,
            vec![SourceConfig::Kafka(KafkaSourceConfig {
                name: "orders".into(),
                brokers: "127.0.0.1:9092".into(),
                topics: vec!["a".into(), "b.c".into()],
                group: "g".into(),
                pipeline: "clicks".into(),
                batch_events: 1024,
                linger: Duration::ZERO,
                start: StartAt::Latest,
                rebalance_wait: Duration::from_secs(10),
                properties: vec![],
            })]
        );
        let e = error(&source(
            "topic = \"a\"\ngroup = \"g\"\npipeline = \"views\"",
        ));
        assert!(
            e.ends_with(
                "source `orders`: unknown pipeline `views` (configured pipelines: `clicks`)"
            ),
            "{e}"
        );
        let e = error(&source("group = \"g\"\npipeline = \"clicks\""));
        assert!(
            e.ends_with(
                "source `orders`: a kafka source needs `topic = \"NAME\"` or `topics = [...]`"
            ),
            "{e}"
        );
        let e = error(&source(
            "topic = \"a b\"\ngroup = \"g\"\npipeline = \"clicks\"",
        ));
        assert!(
            e.ends_with(
                "source `orders`: `a b` is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"
            ),
            "{e}"
        );
        let e = error(&source(
            "topic = \"a\"\ngroup = \"g\"\npipeline = \"clicks\"\nproperties = { \"enable.auto.commit\" = \"true\" }",
        ));
        assert!(
            e.ends_with("source `orders`: properties: `enable.auto.commit` is not yours to set: offsets are committed once the sinks accepted the records"),
            "{e}"
        );
        let e = error(&source(
            "topic = \"a\"\ngroup = \"g\"\npipeline = \"clicks\"\nstart = \"now\"",
        ));
        assert!(
            e.ends_with("source `orders`: start = `now`: give `earliest` or `latest`"),
            "{e}"
        );
        let e = error(&source("topic = \"a\"\npipeline = \"clicks\""));
        assert!(e.contains("missing field `group`"), "{e}");
    }

    #[test]
    fn a_kafka_sink_takes_its_topic_and_keeps_its_promises_to_itself() {
        let kafka = |keys: &str| {
            routed(
                "sinks = [\"out\", \"events\"]",
                &format!(
                    "\n[sinks.events]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\n{keys}\n"
                ),
            )
        };
        let config = Config::parse(
            &kafka("topic_from = \"header:dest\"\ntopic = \"other\"\nproperties = { \"linger.ms\" = \"5\" }"),
            "conf/weir.toml",
        )
        .expect("valid");
        let sink = config
            .sinks
            .iter()
            .find(|s| s.name == "events")
            .expect("the sink");
        assert_eq!(
            sink.kind,
            SinkKind::Kafka(KafkaConfig {
                brokers: "127.0.0.1:9092".into(),
                topic: Some("other".into()),
                topic_from: TopicFrom::Header("dest".into()),
                properties: vec![("linger.ms".into(), "5".into())],
                timeout: Duration::from_secs(30),
            })
        );
        let e = error(&kafka(""));
        assert!(
            e.ends_with("sink `events`: a kafka sink needs `topic`, or `topic_from` (`route` or `header:NAME`)"),
            "{e}"
        );
        let e = error(&kafka("topic = \"t\"\nproperties = { acks = \"1\" }"));
        assert!(
            e.ends_with("sink `events`: properties: `acks` is not yours to set: a record is delivered once every in-sync replica has it (`all`)"),
            "{e}"
        );
        let e = error(&kafka("topic_from = \"key\""));
        assert!(
            e.ends_with("sink `events`: topic_from = `key`: expected `route` or `header:NAME`"),
            "{e}"
        );
    }

    #[test]
    fn sinks_take_every_event_a_route_or_a_header_match() {
        let text = routed(
            "sinks = [\"out\", { sink = \"eu\", route = [\"fr\", \"de\"] }, { sink = \"gold\", header = { tier = \"gold\" } }]",
            &format!(
                "{HTTP}\n[sinks.gold]\ntype = \"null\"\nwhen_full = \"drop_oldest\"\nbuffer_events = 5\n"
            ),
        );
        let config = Config::parse(&text, "conf/weir.toml").expect("valid");
        let clicks = config.pipeline("clicks").expect("clicks");
        assert_eq!(
            clicks.sinks,
            vec![
                Route {
                    sink: "out".into(),
                    condition: Condition::All
                },
                Route {
                    sink: "eu".into(),
                    condition: Condition::Route(vec!["fr".into(), "de".into()])
                },
                Route {
                    sink: "gold".into(),
                    condition: Condition::Headers(vec![("tier".into(), "gold".into())])
                },
            ]
        );
        assert_eq!(clicks.unmatched, Unmatched::Impossible);
        let eu = &config.sinks[1];
        assert_eq!(eu.buffer.when_full, WhenFull::Spill);
        assert_eq!(
            eu.kind,
            SinkKind::Http(HttpConfig {
                url: "http://127.0.0.1:9/in".into(),
                headers: vec![],
                timeout: Duration::from_secs(10),
            })
        );
        assert_eq!(config.sinks[2].buffer.max_events, 5);
        assert_eq!(config.sinks[0].buffer, BufferConfig::default());
        assert_eq!(BufferConfig::default().when_full, WhenFull::Block);
    }

    #[test]
    fn events_no_sink_takes_need_an_explicit_unmatched() {
        let only_eu = "sinks = [{ sink = \"eu\", route = \"fr\" }]";
        assert_eq!(
            error(&routed(only_eu, HTTP)),
            "conf/weir.toml:6:12: pipeline `clicks`: every sink has a condition, so some events may match none: set `unmatched = \"drop\"` to drop (and count) them, or `unmatched = \"SINK\"` to send them to a sink"
        );
        let dropped = routed(
            &format!("{only_eu}\nunmatched = \"drop\"\ndead_letters = \"out\""),
            HTTP,
        );
        let config = Config::parse(&dropped, "w.toml").expect("valid");
        assert_eq!(
            config.pipeline("clicks").expect("clicks").unmatched,
            Unmatched::Drop
        );
        let to_out = routed(&format!("{only_eu}\nunmatched = \"out\""), HTTP);
        let config = Config::parse(&to_out, "w.toml").expect("valid");
        assert_eq!(
            config.pipeline("clicks").expect("clicks").unmatched,
            Unmatched::Sink("out".into())
        );
        assert_eq!(
            error(&routed(
                "sinks = [\"out\", \"eu\"]\nunmatched = \"drop\"",
                HTTP
            )),
            "conf/weir.toml:8:13: pipeline `clicks`: unused output: `unmatched` never receives an event, because sink `out` takes every event"
        );
        assert_eq!(
            error(&routed("sinks = [{ sink = \"eu\" }]", HTTP)),
            "conf/weir.toml:7:10: pipeline `clicks`, sink `eu`: a sink table needs a condition: `route = \"TAG\"` (or a list) or `header = { NAME = \"VALUE\" }`; write just \"eu\" for every event"
        );
    }

    #[test]
    fn unused_sinks_dropping_dead_letters_and_loops_are_refused() {
        assert_eq!(
            error(&routed("sinks = [\"out\"]", HTTP)),
            "conf/weir.toml:16:8: sink `eu` is not used by any pipeline: list it in a pipeline's `sinks`, `unmatched` or `dead_letters`, or remove it"
        );
        let dropping = "\n[sinks.dl]\ntype = \"null\"\nwhen_full = \"drop_newest\"\n";
        let e = error(&routed(
            "sinks = [\"out\"]\ndead_letters = \"dl\"",
            dropping,
        ));
        assert!(
            e.ends_with("sink `dl` is pipeline `clicks`'s dead-letter sink, so it may not drop events: use when_full = \"block\" or \"spill\""),
            "{e}"
        );
        let quic = |address: &str| {
            format!(
                "\n[sinks.up]\ntype = \"quic\"\naddress = \"{address}\"\npipeline = \"clicks\"\npin = \"{}\"\n",
                "ab".repeat(32)
            )
        };
        let text = routed("sinks = [\"out\", \"up\"]", &quic("localhost:4433"))
            .replace("127.0.0.1:0", "0.0.0.0:4433");
        let e = error(&text);
        assert!(
            e.ends_with("sink `up` forwards to `localhost:4433`, this router's own listener: a loop (every event would come back forever)"),
            "{e}"
        );
        let other = routed("sinks = [\"out\", \"up\"]", &quic("10.0.0.2:4433"))
            .replace("127.0.0.1:0", "0.0.0.0:4433");
        Config::parse(&other, "w.toml").expect("another router is not a loop");
        let e = error(&MINIMAL.replace(
            "type = \"file\"",
            "type = \"file\"\nwhen_full = \"sometimes\"",
        ));
        assert!(e.contains("sink `out`: unknown variant `sometimes`"), "{e}");
        let e = error(&routed("sinks = [\"out\"]\ndead_letters = \"out\"", ""));
        assert!(
            e.ends_with("pipeline `clicks`: sink `out` is both a destination of the pipeline and its dead-letter sink: a loop (events it refuses would come back to it); name another sink"),
            "{e}"
        );
        let crossed = routed(
            "sinks = [\"out\"]\ndead_letters = \"dl\"",
            "\n[pipelines.other]\nsinks = [\"dl\"]\ndead_letters = \"out\"\n\n[sinks.dl]\ntype = \"null\"\n",
        );
        let e = error(&crossed);
        assert!(
            e.contains("sink `dl`: dead letters go round in a loop (dl → out → dl)"),
            "{e}"
        );
        let e = error(
            &MINIMAL
                .replace("[sinks.out]", "[sinks.\"../out\"]")
                .replace("[\"out\"]", "[\"../out\"]"),
        );
        assert!(
            e.ends_with("sink name `../out` may hold only letters, digits, `-`, `_` and `.` (not first): it also names files under data_dir"),
            "{e}"
        );
        let e = error(&routed(
            "sinks = [\"out\", \"eu\"]",
            &HTTP.replace("when_full", "timeout_ms = 0\nwhen_full"),
        ));
        assert!(
            e.ends_with("sink `eu`: timeout_ms = 0 is outside 1 to 3600000 (one hour)"),
            "{e}"
        );
        let e = error(&MINIMAL.replace("type = \"file\"", "type = \"file\"\nbuffer_events = 0"));
        assert!(
            e.ends_with("sink `out`: buffer_events must be above 0"),
            "{e}"
        );
    }

    #[test]
    fn two_sinks_writing_one_file_are_refused_naming_both() {
        let twin = "\n[sinks.twin]\ntype = \"file\"\npath = \"./sub/../out.jsonl\"\n";
        assert_eq!(
            error(&routed("sinks = [\"out\", \"twin\"]", twin)),
            "conf/weir.toml:16:1: sink `twin` writes to conf/out.jsonl, which is sink `out`'s file: lines of both would interleave in one file; give the sink a path of its own"
        );
        let into_dead_letters =
            "\n[sinks.twin]\ntype = \"file\"\npath = \"data/dead-letters/clicks.jsonl\"\n";
        assert_eq!(
            error(&routed("sinks = [\"out\", \"twin\"]", into_dead_letters)),
            "conf/weir.toml:16:1: sink `twin` writes to conf/data/dead-letters/clicks.jsonl, which is pipeline `clicks`'s dead-letter file: lines of both would interleave in one file; give the sink a path of its own"
        );
        // A pipeline with a dead-letter sink of its own writes no dead-letter file.
        Config::parse(
            &routed(
                "sinks = [\"out\"]\ndead_letters = \"twin\"",
                &into_dead_letters.replace("clicks.jsonl", "other.jsonl"),
            ),
            "conf/weir.toml",
        )
        .expect("a file of its own");
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
        assert_eq!(ok.listener.producers[1].token, b"u");
        assert_eq!(
            format!("{:?}", ok.listener.producers[0]),
            "ProducerConfig { id: \"a\", token: \"<redacted>\" }"
        );
    }
}
