//! `weir plugins`: every stage of a running router, the plugin version it serves, the versions
//! kept (digest, when deployed, status, batches and failed events since the router started)
//! and the last deploy error, from its admin endpoint.

use super::AdminArgs;
use anyhow::Result;
use std::fmt::Write as _;
use weir::admin::PluginsView;
use weir::utc::Utc;

/// Arguments of `weir plugins`.
#[derive(Debug, clap::Args)]
pub struct PluginsArgs {
    #[command(flatten)]
    admin: AdminArgs,
}

/// Runs the command.
pub fn run(args: &PluginsArgs) -> Result<()> {
    let client = args.admin.client()?;
    let runtime = super::admin_runtime()?;
    let view = runtime.block_on(client.plugins())?;
    print!("{}", render(&view));
    Ok(())
}

fn when(ms: i64) -> String {
    Utc::of_millis(u64::try_from(ms).unwrap_or(0)).readable()
}

/// The listing, one block per stage.
fn render(view: &PluginsView) -> String {
    let mut text = String::new();
    for stage in &view.stages {
        // Writing to a String cannot fail.
        let _ = writeln!(
            text,
            "{}/{} ({}): serving {}",
            stage.pipeline, stage.stage, stage.kind, stage.serving
        );
        for v in &stage.versions {
            let _ = writeln!(
                text,
                "  {} {:<14} {:<12} {:<6} deployed {}  batches {}  failed events {}",
                v.version,
                v.name,
                v.status.as_str(),
                v.origin,
                when(v.deployed_at_ms),
                v.batches,
                v.failed_events
            );
            if let Some(error) = &v.error {
                let _ = writeln!(text, "           {error}");
            }
        }
        if let Some(e) = &stage.last_error {
            let _ = writeln!(text, "  last error ({}): {}", when(e.at_ms), e.message);
        }
    }
    if view.stages.is_empty() {
        text.push_str("no stages\n");
    }
    text
}
