//! `weir reload`: has a running router read its config file again and apply what changed,
//! through its admin endpoint; prints what changed. The same as SIGHUP, or saving the file
//! (`weir serve` watches it), with the answer on the terminal and an exit status.

use super::AdminArgs;
use anyhow::Result;

/// Arguments of `weir reload`.
#[derive(Debug, clap::Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    admin: AdminArgs,
}

/// Runs the command.
pub fn run(args: &ReloadArgs) -> Result<()> {
    let client = args.admin.client()?;
    let runtime = super::admin_runtime()?;
    let report = runtime.block_on(client.reload())?;
    println!("{report}");
    Ok(())
}
