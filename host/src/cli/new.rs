//! `weir new filter|enrich|aggregate NAME`: scaffolds a plugin crate that builds as-is and
//! passes its own test.
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
pub fn run(kind: Kind, name: &str, dir: Option<&Path>, sdk: Option<&Path>) -> Result<PathBuf> {
    check_name(name)?;
    let root = dir.unwrap_or(Path::new(".")).join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    let sdk = sdk.map(Path::to_path_buf).unwrap_or_else(default_sdk);
    let sdk = sdk
        .canonicalize()
        .with_context(|| format!("weir-sdk not found at {}: pass --sdk PATH", sdk.display()))?;
    let crate_name = name.replace('-', "_");
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{crate_name}}", &crate_name)
            .replace("{{sdk_path}}", &sdk.display().to_string())
    };
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
