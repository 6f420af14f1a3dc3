//! `weir rollback PIPELINE/STAGE [VERSION]`: puts back a version a stage served before (the
//! one before the current, or VERSION: a digest or 4+ of its hex digits, as `weir plugins`
//! lists them), through the router's admin endpoint. No probation: the version served before.

use super::AdminArgs;
use anyhow::Result;

/// Arguments of `weir rollback`.
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// The stage: `PIPELINE/STAGE`.
    target: String,
    /// The version to serve again (default: the one that served before the current one).
    version: Option<String>,
    #[command(flatten)]
    admin: AdminArgs,
}

/// Runs the command.
pub fn run(args: &RollbackArgs) -> Result<()> {
    let (pipeline, stage) = super::split_target(&args.target)?;
    let client = args.admin.client()?;
    let runtime = super::admin_runtime()?;
    let report = runtime.block_on(client.rollback(pipeline, stage, args.version.as_deref()))?;
    println!("{report}");
    Ok(())
}
