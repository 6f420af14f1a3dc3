//! `weir deploy PIPELINE/STAGE FILE.wasm|DIR`: ships a new version of a stage's plugin into a
//! running router through its admin endpoint, and says what happened: refused (the router
//! names why; the old version still serves), swapped in and serving after its probation,
//! rolled back (the new version failed where the old one did not), or still on probation when
//! `--wait` ran out. Exits 0 only when the version serves (or is still on probation).

use super::AdminArgs;
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::time::Duration;
use weir::admin::Outcome;
use weir::admin::client::DeployRequest;

/// Arguments of `weir deploy`.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The stage: `PIPELINE/STAGE`, as `weir plugins` lists it.
    target: String,
    /// The component (`.wasm`), or a plugin's folder, a crate or a Python app.py (built with
    /// `weir build`'s rules first).
    path: PathBuf,
    /// Batches the new version takes on probation before the old one is dropped (default:
    /// the router's, 100).
    #[arg(long, value_name = "N")]
    probation: Option<u64>,
    /// When an aggregate's new version declares another state layout than the open windows
    /// hold: `refuse` the deploy (the default), or `drain`: the previous version finishes the
    /// windows it opened while the new one takes every other (no probation then).
    #[arg(long, value_enum, default_value_t = StateArg::Refuse)]
    state: StateArg,
    /// How long to wait for the probation's verdict, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    wait: u64,
    #[command(flatten)]
    admin: AdminArgs,
}

/// `--state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StateArg {
    Refuse,
    Drain,
}

/// Runs the command.
pub fn run(args: &DeployArgs) -> Result<()> {
    let (pipeline, stage) = super::split_target(&args.target)?;
    let wasm = if args.path.is_dir() {
        let wasm = super::PluginDir::open(&args.path)?.compile()?;
        eprintln!("built {}", wasm.display());
        wasm
    } else {
        args.path.clone()
    };
    let component =
        std::fs::read(&wasm).with_context(|| format!("cannot read {}", wasm.display()))?;
    let name = wasm
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| stage.to_owned());
    let client = args.admin.client()?;
    let runtime = super::admin_runtime()?;
    let report = runtime.block_on(client.deploy(DeployRequest {
        pipeline: pipeline.to_owned(),
        stage: stage.to_owned(),
        name,
        component,
        probation: args.probation,
        drain: args.state == StateArg::Drain,
        wait: Duration::from_secs(args.wait),
    }))?;
    println!("{report}");
    if report.outcome == Outcome::RolledBack {
        bail!(
            "`{pipeline}/{stage}`: version {} rolled back to {} on probation: {}",
            report.version,
            report.previous,
            report.error.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(())
}
