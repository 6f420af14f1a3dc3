//! `weir build [DIR]`: compiles a plugin crate to a WASI 0.2 component and checks that it
//! loads as a weir plugin.
//!
//! Runs `cargo build --release --target wasm32-wasip2` in the crate (cargo's output streams
//! through), finds the component among cargo's artifacts, loads it with the runtime to check its
//! world, and copies it to `./CRATE_NAME.wasm` (or `--out`), ready for `weir test` and
//! `weir bench`.

use anyhow::{Context, Result, bail};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The target every plugin is built for.
pub const PLUGIN_TARGET: &str = "wasm32-wasip2";

/// Fails with the command to run when the toolchain used in `dir` lacks the plugin target.
fn check_target(dir: &Path) -> Result<()> {
    let output = Command::new("rustc")
        .args(["--print", "target-libdir", "--target", PLUGIN_TARGET])
        .current_dir(dir)
        .output()
        .context("cannot run rustc: is a Rust toolchain installed?")?;
    let libdir = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || !Path::new(libdir.trim()).is_dir() {
        bail!(
            "the {PLUGIN_TARGET} target is not installed: run `rustup target add {PLUGIN_TARGET}`"
        );
    }
    Ok(())
}

/// Builds the crate in `dir` (absolute: [`crate_dir`]) and returns the path of its component
/// in cargo's target directory.
pub fn compile(dir: &Path) -> Result<PathBuf> {
    check_target(dir)?;
    let wasm = cargo_build(
        dir,
        &dir.join("Cargo.toml"),
        &["--target", PLUGIN_TARGET],
        |message| {
            let cdylib = message["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "cdylib"));
            let file = message["filenames"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str())
                .find(|f| f.ends_with(".wasm"));
            file.filter(|_| cdylib).map(PathBuf::from)
        },
    )?;
    wasm.with_context(|| {
        format!(
            "cargo built no .wasm in {}: the crate needs `crate-type = [\"cdylib\"]`",
            dir.display()
        )
    })
}

/// `dir`, absolute, once it is known to hold a crate.
pub fn crate_dir(dir: &Path) -> Result<PathBuf> {
    if !dir.join("Cargo.toml").is_file() {
        bail!("{} has no Cargo.toml: not a plugin crate", dir.display());
    }
    dir.canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))
}

/// Runs `cargo build --release ARGS --manifest-path MANIFEST` in `dir` (its toolchain file and
/// .cargo/config apply; cargo's diagnostics stream through) and returns the last artifact
/// `pick` takes from cargo's messages.
pub fn cargo_build(
    dir: &Path,
    manifest: &Path,
    args: &[&str],
    pick: impl Fn(&serde_json::Value) -> Option<PathBuf>,
) -> Result<Option<PathBuf>> {
    let mut child = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release"])
        .args(args)
        .args([
            "--message-format",
            "json-render-diagnostics",
            "--manifest-path",
        ])
        .arg(manifest)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo")?;
    let mut artifact = None;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact"
            && let Some(path) = pick(&message)
        {
            artifact = Some(path);
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("cargo build failed in {} ({status})", dir.display());
    }
    Ok(artifact)
}
