//! The subcommands of `weir` and what they share: loading plugins into stages from command-line
//! options (`--with`, `--window`, limits).

mod bench;
mod build;
mod build_js;
mod build_python;
mod checkpoint_bench;
mod demo;
mod deploy;
mod deploy_bench;
mod fanout_bench;
mod ingest_bench;
mod kafka_bench;
mod kafka_pipe_bench;
mod loopback;
mod native_bench;
mod new;
mod plugins;
mod reload;
mod rollback;
mod send;
mod serve;
mod tap;
mod test;
mod tools;
mod top;
mod workers_bench;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use weir::pipeline::{Stage, WindowConfig};
use weir::runtime::{
    CompileCache, Limits, Plugin, PluginKind, Runtime, RuntimeConfig, StageConfig,
};

/// weir: a stream router that runs events through sandboxed WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a router with the example plugins, fed a generated clickstream over QUIC, fanning
    /// out to a file, stdout and an HTTP receiver: no setup, no arguments.
    Demo(demo::DemoArgs),
    /// Scaffold a plugin crate that builds as-is and passes its own test.
    New {
        /// The plugin kind.
        kind: new::Kind,
        /// Plugin name (also the directory created).
        name: String,
        /// Create the plugin inside this directory instead of the current one.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Path of the weir-sdk crate to depend on (default: the SDK weir was built with; a
        /// Python plugin takes its `python/` folder, a JavaScript one its `js/` folder).
        #[arg(long)]
        sdk: Option<PathBuf>,
        /// The language to write the plugin in (Python and JavaScript: filters and enrich
        /// functions).
        #[arg(long, value_enum, default_value_t = new::Lang::Rust)]
        lang: new::Lang,
    },
    /// Build a plugin (a Rust crate, a Python app.py, or a JavaScript app.js or app.ts) into a
    /// WASI 0.2 component and check that it loads.
    Build {
        /// The plugin's directory: a Rust crate (Cargo.toml), a Python plugin (app.py, built
        /// with componentize-py, which weir installs) or a JavaScript one (app.js or app.ts,
        /// built with esbuild and componentize-js, which weir installs).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Where to copy the component (default: ./NAME.wasm).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run one plugin, or a chain of plugins, over JSON-lines events.
    Test(test::TestArgs),
    /// Measure a plugin on generated events, side by side with native Rust doing the same work.
    Bench(bench::BenchArgs),
    /// Run the QUIC ingest server: producers stream events into the configured pipelines.
    Serve(serve::ServeArgs),
    /// Stream events into a pipeline of a `weir serve`: from a JSON-lines file or generated.
    Send(send::SendArgs),
    /// Ship a new version of a stage's plugin into a running router (its admin endpoint).
    Deploy(deploy::DeployArgs),
    /// List every stage's plugin versions in a running router (its admin endpoint).
    Plugins(plugins::PluginsArgs),
    /// Put back a version a stage served before (its admin endpoint).
    Rollback(rollback::RollbackArgs),
    /// Have a running router read its config file again and apply what changed.
    Reload(reload::ReloadArgs),
    /// Watch a running router live: every pipeline, stage and sink (its admin endpoint).
    Top(top::TopArgs),
    /// Print the events leaving a pipeline or one of its stages, live, as JSON lines (its
    /// admin endpoint).
    Tap(tap::TapArgs),
}

impl Cli {
    /// The log level when `WEIR_LOG` is not set: `warn` for `weir demo` (its live view owns
    /// the terminal), `info` otherwise.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Demo(_) => "warn",
            _ => "info",
        }
    }
}

/// Runs one command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::New {
            kind,
            name,
            dir,
            sdk,
            lang,
        } => {
            let root = new::run(kind, &name, dir.as_deref(), sdk.as_deref(), lang)?;
            println!("created {kind:?} plugin `{name}` in {}", root.display());
            println!("next: weir build {}", root.display());
            Ok(())
        }
        Command::Build { dir, out } => build(&dir, out.as_deref()),
        Command::Test(args) => test::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Send(args) => send::run(&args),
        Command::Deploy(args) => deploy::run(&args),
        Command::Plugins(args) => plugins::run(&args),
        Command::Rollback(args) => rollback::run(&args),
        Command::Reload(args) => reload::run(&args),
        Command::Top(args) => top::run(&args),
        Command::Tap(args) => tap::run(&args),
    }
}

/// How the admin commands reach a router.
#[derive(Debug, Clone, clap::Args)]
struct AdminArgs {
    /// The router's admin endpoint, `HOST:PORT` (its config's `[admin] listen`; default: the
    /// WEIR_ADMIN environment variable, else 127.0.0.1:4434).
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
    /// The admin token (its config's `[admin] token`; default: the WEIR_ADMIN_TOKEN
    /// environment variable).
    #[arg(long, value_name = "T")]
    token: Option<String>,
}

impl AdminArgs {
    fn client(&self) -> Result<weir::admin::client::AdminClient> {
        let addr = self
            .admin
            .clone()
            .or_else(|| std::env::var("WEIR_ADMIN").ok())
            .unwrap_or_else(|| weir::admin::DEFAULT_LISTEN.to_owned());
        let Some(token) = self
            .token
            .clone()
            .or_else(|| std::env::var("WEIR_ADMIN_TOKEN").ok())
        else {
            bail!(
                "no admin token: pass --token or set WEIR_ADMIN_TOKEN (the router's `[admin] token`)"
            );
        };
        weir::admin::client::AdminClient::new(&addr, &token).map_err(anyhow::Error::msg)
    }
}

/// `PIPELINE/STAGE` split at its first `/`.
fn split_target(target: &str) -> Result<(&str, &str)> {
    match target.split_once('/') {
        Some((pipeline, stage)) if !pipeline.is_empty() && !stage.is_empty() => {
            Ok((pipeline, stage))
        }
        _ => bail!(
            "`{target}` is not PIPELINE/STAGE (e.g. clicks/geo-enrich; `weir plugins` lists them)"
        ),
    }
}

/// A runtime for one request to the admin endpoint.
fn admin_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The runtime of the commands a plugin's author runs (`weir build`, `test`, `bench`): it keeps
/// compiled plugins in the user's compile cache ([`CompileCache::user_dir`]), so that a plugin
/// is compiled once per version, not at every run.
fn author_runtime() -> Result<Runtime> {
    Ok(Runtime::new(RuntimeConfig {
        cache_dir: CompileCache::user_dir(),
        ..RuntimeConfig::default()
    })?)
}

/// Loads the plugin at `path`, saying on stderr, as `weir COMMAND`, whether it was compiled or
/// came from the compile cache, and how long that took.
fn load_plugin(runtime: &Runtime, path: &Path, command: &str) -> Result<Plugin> {
    let started = Instant::now();
    let plugin = runtime.load_file(path)?;
    let took = started.elapsed().as_secs_f64() * 1e3;
    let how = match (&runtime.config().cache_dir, plugin.from_cache()) {
        (_, true) => "loaded from the compile cache".to_owned(),
        (Some(dir), false) => format!("compiled (kept in {})", dir.display()),
        (None, false) => {
            "compiled (no compile cache: WEIR_CACHE_DIR is empty, or there is no home directory)"
                .to_owned()
        }
    };
    eprintln!(
        "weir {command}: {} `{}` {} {how} in {took:.0} ms",
        plugin.kind(),
        plugin.name(),
        plugin.version()
    );
    Ok(plugin)
}

/// A plugin's folder, absolute: a Rust crate, a Python plugin (`app.py`, no Cargo.toml) or a
/// JavaScript one (`app.js` or `app.ts`, no Cargo.toml).
enum PluginDir {
    Rust(PathBuf),
    Python(PathBuf),
    JavaScript(PathBuf),
}

impl PluginDir {
    fn open(dir: &Path) -> Result<PluginDir> {
        let resolved = || {
            dir.canonicalize()
                .with_context(|| format!("cannot resolve {}", dir.display()))
        };
        if build_python::is_python(dir) {
            return Ok(PluginDir::Python(resolved()?));
        }
        if build_js::app(dir).is_some() {
            return Ok(PluginDir::JavaScript(resolved()?));
        }
        Ok(PluginDir::Rust(build::crate_dir(dir)?))
    }

    /// Builds its component; the component's path.
    fn compile(&self) -> Result<PathBuf> {
        match self {
            PluginDir::Rust(dir) => build::compile(dir),
            PluginDir::Python(dir) => build_python::compile(dir),
            PluginDir::JavaScript(dir) => build_js::compile(dir),
        }
    }
}

fn build(dir: &Path, out: Option<&Path>) -> Result<()> {
    let wasm = PluginDir::open(dir)?.compile()?;
    let plugin = load_plugin(&author_runtime()?, &wasm, "build")?;
    let file_name = wasm
        .file_name()
        .context("component path has no file name")?;
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(file_name));
    std::fs::copy(&wasm, &out)
        .with_context(|| format!("cannot copy {} to {}", wasm.display(), out.display()))?;
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!(
        "built {} plugin `{}` {} ({} KiB): {} -> {}",
        plugin.kind(),
        plugin.name(),
        plugin.version(),
        size.div_ceil(1024),
        wasm.display(),
        out.display()
    );
    Ok(())
}

/// Options every command that runs plugins takes.
#[derive(Debug, Clone, clap::Args)]
struct StageArgs {
    /// A config value for the stages: `KEY=VALUE` for every stage, `PLUGIN:KEY=VALUE` for one.
    /// VALUE is a TOML value (`5`, `true`, `{ US = "United States" }`); anything that is not
    /// TOML is taken as a string.
    #[arg(long = "with", value_name = "[PLUGIN:]KEY=VALUE")]
    with: Vec<String>,
    /// The window of aggregate stages, e.g. `tumbling:60s`, `sliding:60s/10s,lateness:5s`.
    #[arg(long)]
    window: Option<String>,
    /// Linear-memory cap of each plugin instance, in MiB.
    #[arg(long, default_value_t = 64)]
    memory_mib: u64,
    /// Deadline of one plugin call, in milliseconds.
    #[arg(long, default_value_t = 100)]
    deadline_ms: u64,
}

/// One `--with` value.
#[derive(Debug, PartialEq)]
struct With {
    plugin: Option<String>,
    key: String,
    json: String,
}

/// Parses `[PLUGIN:]KEY=VALUE`; the value becomes JSON text (see the WIT package doc).
fn parse_with(text: &str) -> Result<With> {
    let Some((target, value)) = text.split_once('=') else {
        bail!("--with `{text}`: expected KEY=VALUE or PLUGIN:KEY=VALUE");
    };
    let (plugin, key) = match target.split_once(':') {
        Some((plugin, key)) => (Some(plugin.to_owned()), key),
        None => (None, target),
    };
    if key.is_empty() {
        bail!("--with `{text}`: the key is empty");
    }
    let json = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut table) => {
            let toml_value = table
                .remove("v")
                .unwrap_or(toml::Value::String(value.into()));
            serde_json::to_string(&toml_value)?
        }
        Err(_) => serde_json::to_string(value)?,
    };
    Ok(With {
        plugin,
        key: key.to_owned(),
        json,
    })
}

impl StageArgs {
    fn limits(&self) -> Result<Limits> {
        let memory_bytes = self
            .memory_mib
            .checked_mul(1 << 20)
            .with_context(|| format!("--memory-mib {}: too large", self.memory_mib))?;
        Ok(Limits {
            memory_bytes,
            deadline: Duration::from_millis(self.deadline_ms),
            ..Limits::default()
        })
    }

    /// The JSON text of the last `--with` for `key` (any plugin).
    fn value(&self, key: &str) -> Result<Option<String>> {
        let mut found = None;
        for with in &self.with {
            let with = parse_with(with)?;
            if with.key == key {
                found = Some(with.json);
            }
        }
        Ok(found)
    }

    fn window(&self) -> Result<Option<WindowConfig>> {
        self.window
            .as_deref()
            .map(|spec| spec.parse::<WindowConfig>())
            .transpose()
            .map_err(Into::into)
    }

    fn withs(&self) -> Result<Vec<With>> {
        self.with.iter().map(|w| parse_with(w)).collect()
    }

    /// The config of a stage named `name` running plugin `plugin`: its limits and the `--with`
    /// values for every plugin or for this one.
    fn config(&self, withs: &[With], plugin: &str, name: String) -> Result<StageConfig> {
        let mut config = StageConfig::new(name).limits(self.limits()?);
        for with in withs {
            if with.plugin.as_deref().is_none_or(|p| p == plugin) {
                config = config.with_json(with.key.clone(), with.json.clone());
            }
        }
        Ok(config)
    }

    /// Builds one stage per plugin, in order, named after the plugins (`name#2` for a repeat).
    fn stages(&self, plugins: &[Plugin]) -> Result<Vec<Stage>> {
        let withs = self.withs()?;
        for with in &withs {
            if let Some(target) = &with.plugin
                && !plugins.iter().any(|p| p.name() == target)
            {
                bail!(
                    "--with {target}:{}: no plugin `{target}` in this run",
                    with.key
                );
            }
        }
        let window = self.window()?;
        let aggregate = |p: &Plugin| p.kind() == PluginKind::Aggregate;
        if window.is_some() && !plugins.iter().any(aggregate) {
            bail!("--window is for aggregate plugins, and none is given");
        }
        let mut stages = Vec::new();
        for (i, plugin) in plugins.iter().enumerate() {
            let name = match plugins[..i]
                .iter()
                .filter(|p| p.name() == plugin.name())
                .count()
            {
                0 => plugin.name().to_owned(),
                n => format!("{}#{}", plugin.name(), n + 1),
            };
            let config = self.config(&withs, plugin.name(), name)?;
            if aggregate(plugin) && window.is_none() {
                bail!(
                    "plugin `{}` is an aggregate: pass --window (e.g. --window tumbling:60s)",
                    plugin.name()
                );
            }
            stages.push(Stage::new(
                plugin,
                config,
                window.filter(|_| aggregate(plugin)),
            )?);
        }
        Ok(stages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_values_become_json_text() {
        let with = |t: &str| parse_with(t).map_err(|e| e.to_string());
        assert_eq!(
            with("threshold=5"),
            Ok(With {
                plugin: None,
                key: "threshold".into(),
                json: "5".into()
            })
        );
        assert_eq!(with("name=geo").map(|w| w.json), Ok("\"geo\"".into()));
        assert_eq!(with("name=\"a b\"").map(|w| w.json), Ok("\"a b\"".into()));
        assert_eq!(with("fail=true").map(|w| w.json), Ok("true".into()));
        assert_eq!(
            with("geo_enrich:table={ US = \"United States\" }").map(|w| (w.plugin, w.json)),
            Ok((
                Some("geo_enrich".into()),
                "{\"US\":\"United States\"}".into()
            ))
        );
        assert_eq!(
            with("novalue"),
            Err("--with `novalue`: expected KEY=VALUE or PLUGIN:KEY=VALUE".into())
        );
        assert_eq!(with("=1"), Err("--with `=1`: the key is empty".into()));
    }
}
