//! `weir serve --config FILE`: runs the QUIC ingest server until Ctrl-C or SIGTERM, then stops
//! gracefully (every batch read is processed, written and acked before the exit). Meanwhile it
//! reloads its config (`topology/reload.rs`) on SIGHUP and whenever the file changes.

use super::send::count;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;
use weir::config::Config;
use weir::server::Server;

/// Arguments of `weir serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The config file (TOML; the reference is docs/SERVE.md).
    #[arg(long, short)]
    config: PathBuf,
}

/// Runs the command.
pub fn run(args: &ServeArgs) -> Result<()> {
    let config = Config::load(&args.config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

/// How long the config file must stay unchanged before it is read: an editor saves in steps.
const SETTLE: Duration = Duration::from_millis(200);

async fn serve(config: Config) -> Result<()> {
    use std::fmt::Write as _;
    let anonymous = config.listener.allow_anonymous;
    let path = config.path.clone();
    let server = Server::start(config).await?;
    let mut banner = String::new();
    writeln!(
        banner,
        "weir serve: listening on {} (QUIC, ALPN weir/1)",
        server.local_addr()
    )?;
    writeln!(
        banner,
        "certificate fingerprint (SHA-256): {}",
        server.fingerprint()
    )?;
    writeln!(
        banner,
        "certificate: {}{}",
        server.cert_path().display(),
        if server.cert_generated() {
            " (self-signed, generated once; pin it with `weir send --pin FINGERPRINT`)"
        } else {
            ""
        }
    )?;
    if anonymous {
        writeln!(
            banner,
            "auth: producers without a token or client certificate are accepted"
        )?;
    }
    for pipeline in server.pipelines() {
        writeln!(banner, "pipeline `{}`:", pipeline.name)?;
        if pipeline.stages.is_empty() {
            writeln!(
                banner,
                "  stages: none (events go to the sinks as they come)"
            )?;
        }
        for (i, stage) in pipeline.stages.iter().enumerate() {
            writeln!(banner, "  stage {}: {stage}", i + 1)?;
        }
        for sink in &pipeline.sinks {
            writeln!(banner, "  sink: {sink}")?;
        }
        writeln!(banner, "  dead letters: {}", pipeline.dead_letters)?;
        writeln!(banner, "  workers: {}", pipeline.workers)?;
    }
    if let Some(addr) = server.metrics_addr() {
        writeln!(banner, "metrics: http://{addr}/metrics (Prometheus)")?;
    }
    if let Some(addr) = server.admin_addr() {
        writeln!(
            banner,
            "admin: {addr} (weir top, weir tap, weir deploy, weir plugins, weir rollback, weir reload --admin {addr})"
        )?;
    }
    if let Some(first) = server.pipelines().first() {
        writeln!(
            banner,
            "try: weir send --to {} --pin {} --pipeline {} --generate 1000",
            server.local_addr(),
            server.fingerprint(),
            first.name
        )?;
    }
    writeln!(
        banner,
        "config: {} (reloaded on change, on SIGHUP and on `weir reload`)",
        path.display()
    )?;
    writeln!(banner, "Ctrl-C or SIGTERM stops gracefully.")?;
    // A closed stdout is no reason to stop serving: the logs go to stderr.
    let printed = print(&banner);
    if let Err(e) = printed {
        tracing::warn!("{e:#}");
    }
    serve_until_stopped(&server, &path).await?;
    tracing::info!("stopping: finishing and acking in-flight batches");
    let report = server.shutdown().await?;
    let s = &report.stats;
    let summary = format!(
        "weir serve: stopped; {} ({}) accepted, {} acked, {} dropped, {} out, {}\n",
        count(s.batches_accepted, "batch", "batches"),
        count(s.events_accepted, "event", "events"),
        s.batches_acked,
        count(s.duplicates_dropped, "duplicate event", "duplicate events"),
        count(s.events_out, "event", "events"),
        count(s.dead_letters, "dead letter", "dead letters"),
    );
    if let Err(e) = print(&summary) {
        tracing::info!("{}: {e:#}", summary.trim_end());
    }
    if !report.problems.is_empty() {
        bail!("stopped with problems: {}", report.problems.join("; "));
    }
    Ok(())
}

/// Writes to stdout and flushes; an error (a closed pipe) is returned, not a panic.
fn print(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// Serves until Ctrl-C or SIGTERM, reloading the config on SIGHUP and when its file changes.
async fn serve_until_stopped(server: &Server, path: &Path) -> Result<()> {
    let (changed_tx, mut changed) = tokio::sync::mpsc::unbounded_channel();
    // Kept for as long as it watches.
    let _watcher = match watch(path, changed_tx) {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            tracing::warn!(
                "cannot watch {} for changes ({e}); reload it with SIGHUP or `weir reload`",
                path.display()
            );
            None
        }
    };
    let stop = stop_signal();
    tokio::pin!(stop);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot listen for SIGHUP")?;
    loop {
        #[cfg(unix)]
        let hup = hangup.recv();
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        tokio::select! {
            stopped = &mut stop => return stopped,
            _ = hup => reload(server, "SIGHUP").await,
            Some(()) = changed.recv() => {
                tokio::time::sleep(SETTLE).await;
                while changed.try_recv().is_ok() {}
                reload(server, "the config file changed").await;
            }
        }
    }
}

/// Watches the directory of `path` (editors replace a file by renaming another over it) and
/// says when something happens to `path`.
fn watch(
    path: &Path,
    changed: tokio::sync::mpsc::UnboundedSender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let name = path.file_name().map(std::ffi::OsStr::to_owned);
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        if event.paths.iter().any(|p| p.file_name() == name.as_deref()) {
            let _ = changed.send(());
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Reloads the config and logs what happened (`why`: what asked for it).
async fn reload(server: &Server, why: &str) {
    match server.reload().await {
        Ok(report) => {
            for line in report.to_string().lines() {
                tracing::info!("{why}: {line}");
            }
        }
        Err(e) => {
            tracing::error!("{why}: config not reloaded, the running config is unchanged: {e}")
        }
    }
}

/// Completes on Ctrl-C or (on Unix) SIGTERM.
async fn stop_signal() -> Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot listen for SIGTERM")?;
        tokio::select! {
            ctrl_c = tokio::signal::ctrl_c() => ctrl_c.context("cannot listen for Ctrl-C"),
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("cannot listen for Ctrl-C")
    }
}
