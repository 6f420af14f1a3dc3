//! The demo's directory and config: where each file goes, clearing an earlier run's files, and
//! the config text, which `weir serve --config` runs as it is.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The config file's name in the demo directory.
const CONFIG_FILE: &str = "weir-demo.toml";
/// Sink `archive`'s file in the demo directory.
const ARCHIVE_FILE: &str = "clicks.jsonl";
/// The pipelines, in config order.
pub(super) const PIPELINES: [&str; 2] = ["clicks", "totals"];

/// Every file the demo writes, under its directory.
#[derive(Debug)]
pub(super) struct Files {
    /// The demo directory, absolute: the router's data directory.
    pub dir: PathBuf,
    /// The config the router runs.
    pub config: PathBuf,
    /// Sink `archive`: every event of `clicks`.
    pub archive: PathBuf,
    /// What the embedded receiver took (sink `eu`).
    pub received: PathBuf,
    /// Where the router writes the pipelines' dead letters (`PIPELINE.jsonl`).
    pub dead_letters: PathBuf,
    /// geo-enrich as the config runs it, for `weir deploy` (and to roll back to).
    pub geo_v1: PathBuf,
    /// geo-enrich's next version, which the demo deploys halfway.
    pub geo_v2: PathBuf,
}

impl Files {
    /// The files of a demo in `dir` (default: `weir-demo` in the system's temp directory).
    pub fn new(dir: Option<&Path>) -> Result<Files> {
        let dir = match dir {
            Some(dir) => dir.to_path_buf(),
            None => std::env::temp_dir().join("weir-demo"),
        };
        let dir = std::path::absolute(&dir)
            .with_context(|| format!("demo directory {}", dir.display()))?;
        Ok(Files {
            config: dir.join(CONFIG_FILE),
            archive: dir.join(ARCHIVE_FILE),
            received: dir.join("eu-received.jsonl"),
            dead_letters: dir.join("dead-letters"),
            geo_v1: dir.join("components/geo_enrich.wasm"),
            geo_v2: dir.join("components/geo_enrich_v2.wasm"),
            dir,
        })
    }

    /// Writes geo-enrich and its next version (embedded in weir) as component files.
    pub fn write_components(&self) -> Result<()> {
        for (path, bytes) in [
            (&self.geo_v1, weir::examples::GEO_ENRICH),
            (&self.geo_v2, weir::examples::GEO_ENRICH_V2),
        ] {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            std::fs::write(path, bytes)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    }

    /// Creates the directory and removes what an earlier demo wrote there (its config, outputs,
    /// dead letters, the router's disk buffers and its record of deployed plugin versions), so
    /// that the counts start from zero and the config's plugins serve. Nothing else in the
    /// directory is touched; the generated certificate and the compile cache are kept.
    pub fn clear(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let mut files = vec![
            self.config.clone(),
            self.archive.clone(),
            self.received.clone(),
        ];
        files.extend(PIPELINES.map(|p| self.dead_letters.join(format!("{p}.jsonl"))));
        for file in files {
            match std::fs::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("cannot remove {}", file.display()));
                }
                _ => {}
            }
        }
        for dir in [self.dir.join("spill"), self.dir.join("plugins/blobs")] {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("cannot remove {}", dir.display()));
                }
                _ => {}
            }
        }
        let record = self.dir.join("plugins/stages.json");
        match std::fs::remove_file(&record) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", record.display()))
            }
            _ => Ok(()),
        }
    }
}

/// The config text: both pipelines, sink `eu` posting to `receiver_url`. Paths are relative
/// to the file's directory, which is the router's data directory.
pub(super) fn config_text(files: &Files, receiver_url: &str, admin_token: &str) -> String {
    format!(
        r#"# Written by `weir demo`. Run the same router with:
#   weir serve --config {config}
# docs/SERVE.md documents every key; paths are relative to this file's directory.

[listener]
# Port 0: any free port (printed at start).
listen = "127.0.0.1:0"
# The generated certificate, dead letters and disk buffers live here.
data_dir = "."

[auth]
# Producers without a token are accepted: a local demo only.
anonymous = true

[metrics]
# Prometheus scrapes http://ADDRESS/metrics.
listen = "127.0.0.1:0"

[admin]
# `weir deploy`, `weir plugins` and `weir rollback` talk to the router here (port 0: any free
# port, printed at start), with this token (a local demo: in production, use `token_env`).
listen = "127.0.0.1:0"
token = "{admin_token}"

# Pipeline `clicks`: drop bot traffic, add a country header and a route tag (the code in
# lower case), then fan out: every event to `archive`, French and German ones also to `eu`.
[pipelines.clicks]
sinks = ["archive", {{ sink = "eu", route = ["fr", "de"] }}]
# Every output event names the plugin version of each stage that made it.
version_header = "weir-versions"

[[pipelines.clicks.stages]]
plugin = "example:drop-bots"

[[pipelines.clicks.stages]]
plugin = "example:geo-enrich"
with = {{ table = {{ US = "United States", FR = "France", DE = "Germany", JP = "Japan" }} }}

# Pipeline `totals`: drop bot traffic, then count events and sum `amount` per user and
# minute of event time; each window's result goes to the console as the window closes.
[pipelines.totals]
sinks = ["console"]
# The demo runs once: its stop finishes the open windows and writes them. (By default an
# aggregate pipeline keeps its open windows in DATA_DIR/checkpoints.redb instead, through
# stops and crashes, and goes on with them at the next start.)
checkpoint = false

[[pipelines.totals.stages]]
plugin = "example:drop-bots"

[[pipelines.totals.stages]]
plugin = "example:count-sum"
window = "tumbling:1m"

[sinks.archive]
type = "file"
path = "{ARCHIVE_FILE}"

# The HTTP receiver embedded in `weir demo`, which stops with it: under `weir serve`, point
# `url` at a receiver of yours (until one answers, the sink retries and `clicks` waits).
[sinks.eu]
type = "http"
url = "{receiver_url}"

[sinks.console]
type = "stdout"
"#,
        config = files.config.display(),
    )
}
