//! `weir new filter|enrich|aggregate NAME [--lang rust|python]`: scaffolds a plugin that builds
//! as-is and passes its own test.
//!
//! A Python plugin (filters and enrich functions) is a folder with `app.py`, `test_app.py` (its
//! native test: `python3 -m unittest`, with weir's Python SDK from this checkout on its path)
//! and `sample.jsonl`; `weir build` makes its component.
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
}

/// A Python plugin's templates: app.py and its test.
fn python_templates(kind: Kind, name: &str) -> Result<(&'static str, &'static str)> {
    match kind {
        Kind::Filter => Ok((
            include_str!("../../templates/python/filter/app.py.tmpl"),
            include_str!("../../templates/python/filter/test_app.py.tmpl"),
        )),
        Kind::Enrich => Ok((
            include_str!("../../templates/python/enrich/app.py.tmpl"),
            include_str!("../../templates/python/enrich/test_app.py.tmpl"),
        )),
        Kind::Aggregate => bail!(
            "`{name}`: the Python SDK has no aggregates yet (filters and enrich functions): write an aggregate in Rust (`--lang rust`)"
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
    let python = match lang {
        Lang::Python => Some(python_templates(kind, name)?),
        Lang::Rust => None,
    };
    let root = dir.unwrap_or(Path::new(".")).join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    let sdk = sdk.map(Path::to_path_buf).unwrap_or_else(default_sdk);
    let sdk = sdk
        .canonicalize()
        .with_context(|| format!("weir-sdk not found at {}: pass --sdk PATH", sdk.display()))?;
    // Python plugins take the SDK's Python package, beside the crate.
    let sdk = if python.is_some() {
        sdk.join("python")
    } else {
        sdk
    };
    let crate_name = name.replace('-', "_");
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{crate_name}}", &crate_name)
            .replace("{{sdk_path}}", &sdk.display().to_string())
    };
    if let Some((app, test)) = python {
        std::fs::create_dir_all(&root)
            .with_context(|| format!("cannot create {}", root.display()))?;
        for (path, text) in [
            (root.join("app.py"), fill(app)),
            (root.join("test_app.py"), fill(test)),
            (root.join("sample.jsonl"), SAMPLE.to_owned()),
            (
                root.join(".gitignore"),
                "/target\n__pycache__/\n".to_owned(),
            ),
        ] {
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
