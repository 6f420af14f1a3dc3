//! The `weir` command line.
//!
//! `weir demo` runs the embedded example plugins over a generated workload with no setup;
//! `weir new`, `weir build`, `weir test` and `weir bench` take a plugin from a scaffold to a
//! measured component. Errors print as one `error:` line naming the file or line and the problem,
//! with exit code 1; logs (including every plugin's log lines) go to stderr, filtered by
//! `WEIR_LOG` (default `info`; `warn` for `weir demo`, whose live view owns the terminal).

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.default_log_level()));
    // Colors for a terminal only: a log file or a pipe gets plain text.
    let colors = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colors)
        .init();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
