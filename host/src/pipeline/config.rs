//! What a pipeline is made of, as the config file says it: its stages (plugin, `with` values,
//! window, limits), who may write to it, and where its events go (`route.rs`). `config.rs`
//! parses the TOML into these; the server builds running pipelines from them.

use super::route::{Route, Unmatched};
use super::window::WindowConfig;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file a pipeline's dead letters go to when it names no `dead_letters` sink.
pub fn dead_letter_file(data_dir: &Path, pipeline: &str) -> PathBuf {
    data_dir
        .join("dead-letters")
        .join(format!("{pipeline}.jsonl"))
}

/// A pipeline: stages run in order, outputs written to sinks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineConfig {
    /// Its name, as producers name it in `hello`.
    pub name: String,
    /// Stages, first to last (none: events go to the sinks as they came).
    pub stages: Vec<StageSpec>,
    /// Producers allowed to write to it; `None`: every authenticated producer.
    pub producers: Option<Vec<String>>,
    /// Sinks it writes to, with their conditions, at least one.
    pub sinks: Vec<Route>,
    /// Where events that no sink takes go.
    pub unmatched: Unmatched,
    /// The sink its dead letters and late events go to; `None`: the file
    /// `DATA_DIR/dead-letters/PIPELINE.jsonl`.
    pub dead_letters: Option<String>,
    /// A header set on every output event naming the plugin version of each stage that made
    /// it (`STAGE=VERSION,…`); `None`: no such header.
    pub version_header: Option<String>,
    /// Whether an aggregate pipeline checkpoints its window state (`checkpoint.rs`; default
    /// true). Without, a stop finishes the open windows and a crash loses them.
    pub checkpoint: bool,
    /// Worker threads it runs on, each with its own plugin instances (default: the cores of
    /// the machine). Batches are shared out by stream, or by event key when it aggregates.
    pub workers: usize,
}

/// The most workers a pipeline may run on.
pub const MAX_WORKERS: usize = 256;

/// A pipeline's workers when its config names none: one per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS))
}

/// One stage of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
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
