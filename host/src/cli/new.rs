//! `weir new filter|enrich|aggregate NAME [--lang rust|python|js]`: scaffolds a plugin that
//! builds as-is and passes its own test.
//!
//! A Python plugin (filters and enrich functions) is a folder with `app.py`, `test_app.py` (its
//! native test: `python3 -m unittest`, with weir's Python SDK from this checkout on its path)
//! and `sample.jsonl`; `weir build` makes its component.
//!
//! A JavaScript plugin (filters and enrich functions) is a folder with `app.js`, `app.test.js`
//! (its native test: `npm install && npm test`, `package.json` naming this checkout's
//! JavaScript SDK as the `weir` package) and `sample.jsonl`; `weir build` makes its component.
//!
//! The templates live in host/templates/ and are compiled into the binary. The new crate depends
//! on weir-sdk by path: the SDK of the checkout this binary was built from (weir-sdk is not on
//! crates.io yet), or `--sdk PATH`. It carries an empty `[workspace]` table so that it builds
//! even when created inside another cargo workspace.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// The plugin kinds a template exists for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Keep or drop each event.
    Filter,
    /// Map each event to zero or more events.
    Enrich,
    /// Keyed, windowed fold.
    Aggregate,
}

impl Kind {
    fn templates(self) -> (&'static str, &'static str) {
        match self {
            Kind::Filter => (
                include_str!("../../templates/filter/Cargo.toml.tmpl"),
                include_str!("../../templates/filter/lib.rs.tmpl"),
            ),
            Kind::Enrich => (
                include_str!("../../templates/enrich/Cargo.toml.tmpl"),
                include_str!("../../templates/enrich/lib.rs.tmpl"),
            ),
            Kind::Aggregate => (
                include_str!("../../templates/aggregate/Cargo.toml.tmpl"),
                include_str!("../../templates/aggregate/lib.rs.tmpl"),
            ),
        }
    }
}

/// The language a plugin is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A crate on weir-sdk, built with cargo.
    Rust,
    /// `app.py` on weir's Python SDK, built with componentize-py.
    Python,
    /// `app.js` on weir's JavaScript SDK, built with componentize-js.
    Js,
}

/// A plugin's files in a language other than Rust: (file name, template) pairs.
type Files = Vec<(&'static str, &'static str)>;

/// A Python plugin's files: app.py and its test.
fn python_files(kind: Kind, name: &str) -> Result<Files> {
    match kind {
        Kind::Filter => Ok(vec![
            (
                "app.py",
                include_str!("../../templates/python/filter/app.py.tmpl"),
            ),
            (
                "test_app.py",
                include_str!("../../templates/python/filter/test_app.py.tmpl"),
            ),
        ]),
        Kind::Enrich => Ok(vec![
            (
                "app.py",
                include_str!("../../templates/python/enrich/app.py.tmpl"),
            ),
            (
                "test_app.py",
                include_str!("../../templates/python/enrich/test_app.py.tmpl"),
            ),
        ]),
        Kind::Aggregate => bail!(
            "`{name}`: the Python SDK has no aggregates yet (filters and enrich functions): write an aggregate in Rust (`--lang rust`)"
        ),
    }
}

/// A JavaScript plugin's files: app.js, its test and package.json.
fn js_files(kind: Kind, name: &str) -> Result<Files> {
    let package = (
        "package.json",
        include_str!("../../templates/js/package.json.tmpl"),
    );
    match kind {
        Kind::Filter => Ok(vec![
            (
                "app.js",
                include_str!("../../templates/js/filter/app.js.tmpl"),
            ),
            (
                "app.test.js",
                include_str!("../../templates/js/filter/app.test.js.tmpl"),
            ),
            package,
        ]),
        Kind::Enrich => Ok(vec![
            (
                "app.js",
                include_str!("../../templates/js/enrich/app.js.tmpl"),
            ),
            (
                "app.test.js",
                include_str!("../../templates/js/enrich/app.test.js.tmpl"),
            ),
            package,
        ]),
        Kind::Aggregate => bail!(
            "`{name}`: the JavaScript SDK has no aggregates yet (filters and enrich functions): write an aggregate in Rust (`--lang rust`)"
        ),
    }
}

const SAMPLE: &str = include_str!("../../templates/sample.jsonl");

/// The SDK this binary was built with.
fn default_sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("sdk")
}

/// Checks a crate name the way cargo does, with a message that says what is wrong.
fn check_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    match chars.next() {
        None => bail!("plugin name is empty"),
        Some(c) if !c.is_ascii_alphabetic() => {
            bail!("plugin name `{name}` must start with a letter")
        }
        _ => {}
    }
    if let Some(c) = chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
        bail!("plugin name `{name}` has `{c}`: use letters, digits, `-` and `_`");
    }
    Ok(())
}

/// Creates `dir/NAME` (or `./NAME`) and returns its path.
pub fn run(
    kind: Kind,
    name: &str,
    dir: Option<&Path>,
    sdk: Option<&Path>,
    lang: Lang,
) -> Result<PathBuf> {
    check_name(name)?;
    // Other languages' files, their SDK's folder and what git ignores.
    let other = match lang {
        Lang::Rust => None,
        Lang::Python => Some((
            python_files(kind, name)?,
            "python",
            "/target\n__pycache__/\n",
        )),
        Lang::Js => Some((js_files(kind, name)?, "js", "/target\nnode_modules/\n")),
    };
    let root = dir.unwrap_or(Path::new(".")).join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    let sdk = sdk.map(Path::to_path_buf).unwrap_or_else(default_sdk);
    let sdk = sdk
        .canonicalize()
        .with_context(|| format!("weir-sdk not found at {}: pass --sdk PATH", sdk.display()))?;
    // Other languages take their SDK from its folder beside the crate.
    let sdk = match &other {
        Some((_, folder, _)) => sdk.join(folder),
        None => sdk,
    };
    let crate_name = name.replace('-', "_");
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{crate_name}}", &crate_name)
            .replace("{{sdk_path}}", &sdk.display().to_string())
    };
    if let Some((files, _, ignored)) = other {
        std::fs::create_dir_all(&root)
            .with_context(|| format!("cannot create {}", root.display()))?;
        let files = files
            .into_iter()
            .map(|(file, template)| (root.join(file), fill(template)));
        for (path, text) in files.chain([
            (root.join("sample.jsonl"), SAMPLE.to_owned()),
            (root.join(".gitignore"), ignored.to_owned()),
        ]) {
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        return Ok(root);
    }
    let (cargo_toml, lib_rs) = kind.templates();
    let src = root.join("src");
    std::fs::create_dir_all(&src).with_context(|| format!("cannot create {}", src.display()))?;
    for (path, text) in [
        (root.join("Cargo.toml"), fill(cargo_toml)),
        (src.join("lib.rs"), fill(lib_rs)),
        (root.join("sample.jsonl"), SAMPLE.to_owned()),
        (root.join(".gitignore"), "/target\n".to_owned()),
    ] {
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        let err = |n: &str| check_name(n).map_err(|e| e.to_string()).err();
        assert_eq!(err("drop-bots"), None);
        assert_eq!(err(""), Some("plugin name is empty".into()));
        assert_eq!(
            err("9lives"),
            Some("plugin name `9lives` must start with a letter".into())
        );
        assert_eq!(
            err("a b"),
            Some("plugin name `a b` has ` `: use letters, digits, `-` and `_`".into())
        );
    }
}
