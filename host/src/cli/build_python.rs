//! `weir build DIR` for a plugin written in Python: DIR holds `app.py`, whose one `@weir.filter`
//! or `@weir.enrich` names the world. componentize-py builds the component, with weir's WIT and
//! Python SDK (both carried in the weir binary, so the build needs nothing else of weir's).
//!
//! componentize-py is installed by weir itself, pinned, into a venv of its own in the tools
//! directory (see `tools`). python3 with the venv module is the one thing needed beforehand, and
//! a missing one is an error saying what to install.

use super::tools;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The componentize-py release weir builds Python plugins with.
pub const COMPONENTIZE_PY: &str = "0.25.0";

/// The Python SDK's modules, put on componentize-py's path (`-p`).
const SDK: [(&str, &str); 3] = [
    (
        "__init__.py",
        include_str!("../../../sdk/python/weir/__init__.py"),
    ),
    (
        "batch.py",
        include_str!("../../../sdk/python/weir/batch.py"),
    ),
    (
        "testing.py",
        include_str!("../../../sdk/python/weir/testing.py"),
    ),
];

const MISSING_PYTHON: &str = "building a Python plugin needs python3 with the venv module and pip (Debian/Ubuntu: apt-get install python3 python3-venv python3-pip)";

/// Whether `dir` holds a Python plugin (`app.py`, and no Cargo.toml).
pub fn is_python(dir: &Path) -> bool {
    dir.join("app.py").is_file() && !dir.join("Cargo.toml").is_file()
}

/// The world `app.py` implements: the one weir decorator it uses.
fn world(app: &Path) -> Result<&'static str> {
    let text =
        std::fs::read_to_string(app).with_context(|| format!("cannot read {}", app.display()))?;
    let used: Vec<&'static str> = ["filter", "enrich"]
        .into_iter()
        .filter(|kind| {
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("@weir.{kind}")))
        })
        .collect();
    match used[..] {
        [kind] => Ok(kind),
        [] => bail!(
            "{}: no @weir.filter or @weir.enrich: the module must decorate its plugin function with one (see docs/PLUGINS.md, Python)",
            app.display()
        ),
        _ => bail!(
            "{}: both @weir.filter and @weir.enrich: a component exports one world, so one decorator per module",
            app.display()
        ),
    }
}

/// componentize-py, installed into its venv the first time.
fn componentize_py() -> Result<PathBuf> {
    let venv = tools::installed(&format!("componentize-py-{COMPONENTIZE_PY}"), |venv| {
        tools::run(
            Command::new("python3")
                .args(["-m", "venv", "--clear"])
                .arg(venv),
            &format!("python3 -m venv {}", venv.display()),
            MISSING_PYTHON,
        )?;
        tools::run(
            Command::new(venv.join("bin").join("python"))
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--no-input",
                ])
                .arg(format!("componentize-py=={COMPONENTIZE_PY}")),
            &format!("pip install componentize-py=={COMPONENTIZE_PY}"),
            "pip could not install it: is PyPI reachable?",
        )
    })?;
    Ok(venv.join("bin").join("componentize-py"))
}

/// The folder holding the SDK (`weir/`) that the plugin in `dir` was built with.
pub fn sdk_dir(dir: &Path) -> PathBuf {
    tools::support_dir(dir).join("sdk")
}

/// Writes weir's WIT and Python SDK for the plugin in `dir`; (the WIT folder, the SDK's parent
/// folder).
fn support(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let wit = tools::write_wit(dir)?;
    let sdk = sdk_dir(dir);
    let package = sdk.join("weir");
    std::fs::create_dir_all(&package)
        .with_context(|| format!("cannot create {}", package.display()))?;
    for (name, text) in SDK {
        let path = package.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok((wit, sdk))
}

/// Builds the Python plugin in `dir` (absolute): the component, in `dir/target/NAME.wasm`, NAME being the
/// folder's name with `-` as `_`.
pub fn compile(dir: &Path) -> Result<PathBuf> {
    let kind = world(&dir.join("app.py"))?;
    let (wit, sdk) = support(dir)?;
    let wasm = tools::component_path(dir)?;
    let program = componentize_py()?;
    let output = Command::new(&program)
        .arg("-d")
        .arg(&wit)
        .args(["-w", kind, "componentize", "app", "-p"])
        .arg(dir)
        .arg("-p")
        .arg(&sdk)
        .arg("-o")
        .arg(&wasm)
        .current_dir(dir)
        // Its errors without a Rust backtrace of componentize-py's own.
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stderr);
        // componentize-py ends with the Python error (`SyntaxError: ... (app.py, line 4)`).
        let cause = text
            .split_once("Caused by:")
            .map_or(text.trim(), |(_, cause)| cause.trim());
        bail!(
            "componentize-py could not build {}: {cause}",
            dir.join("app.py").display()
        );
    }
    Ok(wasm)
}
