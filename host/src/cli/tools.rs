//! The toolchains weir installs itself to build plugins written in Python and JavaScript
//! (componentize-py in a venv, componentize-js and esbuild with npm), pinned, each in a folder
//! of its own under the tools directory: `$WEIR_TOOLS_DIR`, else `$XDG_CACHE_HOME/weir/tools`,
//! else `~/.cache/weir/tools`.
//!
//! A folder is installed once: a lock file beside it makes concurrent builds wait for one
//! install, and a stamp file in it, written last, marks an install that finished.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where weir keeps the tools it installs.
fn dir() -> Result<PathBuf> {
    std::env::var_os("WEIR_TOOLS_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| weir::runtime::weir_cache_home().map(|weir| weir.join("tools")))
        .context("no directory for weir's tools: set WEIR_TOOLS_DIR (or HOME)")
}

/// Runs `command`, failing with its output and `hint`.
pub fn run(command: &mut Command, what: &str, hint: &str) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("{what}: cannot run it; {hint}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}{hint}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The tools folder `name` (e.g. `componentize-py-0.25.0`), made by `install` the first time.
/// `install` works in place (a venv cannot be moved once made) and may find an earlier,
/// unfinished attempt there.
pub fn installed(name: &str, install: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let tools = dir()?;
    let folder = tools.join(name);
    let stamp = folder.join("weir-installed");
    if stamp.is_file() {
        return Ok(folder);
    }
    // One install at a time (another weir may be installing): a lock the system releases when
    // its holder ends, however it ends.
    std::fs::create_dir_all(&tools)
        .with_context(|| format!("cannot create {}", tools.display()))?;
    let lock_path = tools.join(format!("{name}.lock"));
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("cannot lock {}", lock_path.display()))?;
    if stamp.is_file() {
        return Ok(folder);
    }
    eprintln!(
        "weir build: installing {name} into {} (once)",
        folder.display()
    );
    install(&folder)?;
    std::fs::write(&stamp, name).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(folder)
}

/// Where the build of the plugin in `dir` (a Python or JavaScript one) puts weir's WIT, its SDK
/// and what it makes on the way.
pub fn support_dir(dir: &Path) -> PathBuf {
    dir.join("target").join("weir-support")
}

/// Writes weir's WIT package (carried in the binary) for the plugin in `dir`; its folder.
pub fn write_wit(dir: &Path) -> Result<PathBuf> {
    let wit = support_dir(dir).join("wit");
    std::fs::create_dir_all(&wit).with_context(|| format!("cannot create {}", wit.display()))?;
    let path = wit.join("weir.wit");
    std::fs::write(&path, include_str!("../../../wit/weir.wit"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(wit)
}

/// Where the build of the plugin in `dir` puts its component: `dir/target/NAME.wasm`, NAME being
/// the folder's name with `-` as `_`.
pub fn component_path(dir: &Path) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .context("the plugin's folder has no name")?
        .to_string_lossy()
        .replace('-', "_");
    Ok(dir.join("target").join(format!("{name}.wasm")))
}
