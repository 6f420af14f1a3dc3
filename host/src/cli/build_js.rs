//! `weir build DIR` for a plugin written in JavaScript or TypeScript: DIR holds `app.js` (or
//! `app.ts`), which exports the world's functions made by `weir.filter` or `weir.enrich`.
//! esbuild bundles it with weir's SDK (carried in the weir binary, so `import * as weir from
//! "weir"` needs nothing installed) and with whatever it imports from DIR's node_modules;
//! componentize-js makes the bundle a component of the world its exports name, with every WASI
//! feature off (weir offers none).
//!
//! componentize-js and esbuild are installed by weir itself, pinned, with npm, into a folder of
//! the tools directory (see `tools`). Node.js and npm are the things needed beforehand, and a
//! missing one is an error saying what to install.

use super::tools;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The componentize-js release weir builds JavaScript plugins with.
pub const COMPONENTIZE_JS: &str = "0.23.0";

/// The esbuild release weir bundles JavaScript plugins with.
pub const ESBUILD: &str = "0.25.12";

/// What weir installs with npm: componentize-js, the one module it needs at run time that it
/// does not declare, and esbuild.
const PACKAGES: [(&str, &str); 3] = [
    ("@bytecodealliance/componentize-js", COMPONENTIZE_JS),
    ("@bytecodealliance/preview2-shim", "0.17.9"),
    ("esbuild", ESBUILD),
];

/// The JavaScript SDK.
const SDK: &str = include_str!("../../../sdk/js/weir.js");

/// The driver run by node (see the file).
const DRIVER: &str = include_str!("build_js.mjs");

const MISSING_NODE: &str = "building a JavaScript plugin needs Node.js 20 or later and npm (Debian 13, Ubuntu 24.04: apt-get install nodejs npm; else https://nodejs.org)";

/// Checks that `node` is there and new enough for componentize-js, and that `npm` is there.
fn check_node() -> Result<()> {
    let output = Command::new("node")
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run node: {MISSING_NODE}"))?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let major: Option<u32> = version
        .strip_prefix('v')
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse().ok());
    match major {
        Some(major) if major >= 20 => {}
        _ => bail!("node {version}: {MISSING_NODE}"),
    }
    Command::new("npm")
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run npm: {MISSING_NODE}"))?;
    Ok(())
}

/// The plugin's source in `dir`: `app.js` or `app.ts`, when `dir` is not a Rust crate.
pub fn app(dir: &Path) -> Option<PathBuf> {
    if dir.join("Cargo.toml").is_file() {
        return None;
    }
    ["app.js", "app.ts"]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
}

/// The folder holding componentize-js and esbuild, installed the first time.
fn toolchain() -> Result<PathBuf> {
    let packages: serde_json::Map<String, serde_json::Value> = PACKAGES
        .iter()
        .map(|(name, version)| ((*name).to_owned(), (*version).into()))
        .collect();
    // Named by every pin: changing any of them installs afresh.
    let pins: String = PACKAGES
        .iter()
        .map(|(name, v)| format!("{name}@{v} "))
        .collect();
    let name = format!(
        "componentize-js-{COMPONENTIZE_JS}-{}",
        weir::runtime::Digest::of(pins.as_bytes()).short()
    );
    tools::installed(&name, |folder| {
        std::fs::create_dir_all(folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
        let manifest = serde_json::json!({
            "name": "weir-tools",
            "private": true,
            "type": "module",
            "dependencies": packages,
        });
        let path = folder.join("package.json");
        std::fs::write(&path, manifest.to_string())
            .with_context(|| format!("cannot write {}", path.display()))?;
        tools::run(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(folder),
            &format!("npm install in {}", folder.display()),
            &format!("is the npm registry reachable? ({MISSING_NODE})"),
        )
    })
}

/// The driver in the toolchain's folder (so that node finds its packages), written once per
/// text of it.
fn driver(toolchain: &Path) -> Result<PathBuf> {
    let digest = weir::runtime::Digest::of(DRIVER.as_bytes()).short();
    let path = toolchain.join(format!("weir-build-{digest}.mjs"));
    if !path.is_file() {
        weir::files::write_atomically(&path, &[DRIVER.as_bytes()])
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(path)
}

/// Runs the driver in `mode` with `args`; a failure is its message.
fn drive(dir: &Path, mode: &str, args: &[&Path]) -> Result<()> {
    check_node()?;
    let toolchain = toolchain()?;
    let output = Command::new("node")
        .arg(driver(&toolchain)?)
        .arg(mode)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("cannot run node: {MISSING_NODE}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.trim().is_empty() {
            bail!("node ended without a message ({})", output.status);
        }
        bail!("{}", stderr.trim());
    }
    Ok(())
}

/// Writes weir's SDK for the plugin in `dir`; its path.
fn sdk(dir: &Path) -> Result<PathBuf> {
    let support = tools::support_dir(dir);
    std::fs::create_dir_all(&support)
        .with_context(|| format!("cannot create {}", support.display()))?;
    let sdk = support.join("weir.js");
    std::fs::write(&sdk, SDK).with_context(|| format!("cannot write {}", sdk.display()))?;
    Ok(sdk)
}

/// The JavaScript plugin in `dir` (absolute) bundled with the SDK for Node.js, for `weir bench`
/// to run natively: (the bundle, the SDK it holds).
pub fn native(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let app = app(dir).with_context(|| format!("{}: no app.js or app.ts", dir.display()))?;
    let sdk = sdk(dir)?;
    let bundle = tools::support_dir(dir).join("native.mjs");
    drive(dir, "native", &[&app, &sdk, &bundle])?;
    Ok((bundle, sdk))
}

/// Builds the JavaScript plugin in `dir` (absolute): the component, in `dir/target/NAME.wasm`,
/// NAME being the folder's name with `-` as `_`.
pub fn compile(dir: &Path) -> Result<PathBuf> {
    let app = app(dir).with_context(|| format!("{}: no app.js or app.ts", dir.display()))?;
    let wit = tools::write_wit(dir)?;
    let sdk = sdk(dir)?;
    let support = tools::support_dir(dir);
    let entry = support.join("entry.js");
    let app_path = serde_json::to_string(&app.display().to_string())?;
    std::fs::write(
        &entry,
        format!(
            "import {{ log }} from \"weir:plugin/host@0.1.0\";\nimport {{ connectHost }} from \"weir\";\nconnectHost(log);\nexport * from {app_path};\n"
        ),
    )
    .with_context(|| format!("cannot write {}", entry.display()))?;
    let wasm = tools::component_path(dir)?;
    drive(
        dir,
        "component",
        &[&entry, &sdk, &wit, &app, &support.join("bundle.js"), &wasm],
    )?;
    Ok(wasm)
}
