//! The example plugins written in Python (plugins/python: drop-bots and geo-enrich), built by
//! `weir build` (which installs componentize-py itself, pinned, once per machine), give exactly
//! the outputs of the Rust ones in `weir test`, alone and in a chain mixing the two languages.
//!
//! Needs python3 with venv and pip (.ci/run installs them) and PyPI for componentize-py.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

mod plugins {
    include!(concat!(env!("OUT_DIR"), "/plugin_paths.rs"));
}

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// A folder of the target directory, kept across runs: weir's tools (componentize-py's venv)
/// and compile cache for these tests.
fn kept(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is inside the target directory")
        .join(name)
}

/// Runs `weir ARGS` in `dir`.
fn weir_output(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .current_dir(dir)
        .env("WEIR_LOG", "warn")
        .env("WEIR_TOOLS_DIR", kept("weir-tools"))
        .env("WEIR_CACHE_DIR", kept("weir-compile-cache"))
        .output()
        .expect("run weir")
}

/// Runs `weir ARGS` in `dir`; fails the test unless it succeeds.
fn weir(dir: &Path, args: &[&str]) -> Output {
    let output = weir_output(dir, args);
    assert!(
        output.status.success(),
        "weir {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The Python examples, built once per test process: (drop-bots, geo-enrich).
fn built() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        // componentize-py's builds differ byte for byte from run to run: each run's components
        // are new versions, so the cache starts empty rather than growing.
        let _ = std::fs::remove_dir_all(kept("weir-compile-cache"));
        let out = kept("python-plugins");
        std::fs::create_dir_all(&out).expect("a folder for the components");
        let build = |name: &str| {
            let wasm = out.join(format!("{name}_py.wasm"));
            let dir = root().join("plugins/python").join(name);
            let output = weir(
                &root(),
                &[
                    "build",
                    &dir.display().to_string(),
                    "--out",
                    &wasm.display().to_string(),
                ],
            );
            let printed = String::from_utf8_lossy(&output.stdout);
            assert!(printed.starts_with("built "), "{printed}");
            wasm
        };
        (build("drop-bots"), build("geo-enrich"))
    })
}

const TABLE: &str =
    r#"table={ US = "United States", FR = "France", DE = "Germany", JP = "Japan" }"#;

/// `weir test PLUGINS... --input clicks.jsonl --with TABLE`: what it prints on stdout.
fn test_output(plugins: &[&Path]) -> String {
    let fixtures = root().join("host/tests/fixtures");
    let mut args: Vec<String> = plugins.iter().map(|p| p.display().to_string()).collect();
    args.extend([
        "--input".into(),
        "clicks.jsonl".into(),
        "--with".into(),
        TABLE.into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut full = vec!["test"];
    full.extend(args);
    String::from_utf8(weir(&fixtures, &full).stdout).expect("UTF-8")
}

#[test]
fn drop_bots_in_python_keeps_exactly_what_the_rust_one_keeps() {
    let (drop_bots, _) = built();
    let rust = test_output(&[Path::new(plugins::DROP_BOTS)]);
    assert_eq!(rust.lines().count(), 4, "{rust}");
    assert_eq!(test_output(&[drop_bots]), rust);
}

#[test]
fn geo_enrich_in_python_gives_exactly_the_rust_ones_events() {
    let (_, geo) = built();
    let rust = test_output(&[Path::new(plugins::GEO_ENRICH)]);
    assert_eq!(rust.lines().count(), 6, "{rust}");
    assert!(rust.contains(r#""country":"France""#), "{rust}");
    assert_eq!(test_output(&[geo]), rust);
}

#[test]
fn a_chain_mixing_rust_and_python_gives_the_all_rust_chains_output() {
    let (drop_bots, geo) = built();
    let rust = test_output(&[
        Path::new(plugins::DROP_BOTS),
        Path::new(plugins::GEO_ENRICH),
    ]);
    assert_eq!(rust.lines().count(), 4, "{rust}");
    assert_eq!(
        test_output(&[Path::new(plugins::DROP_BOTS), geo]),
        rust,
        "Rust filter, Python enrich"
    );
    assert_eq!(
        test_output(&[drop_bots, Path::new(plugins::GEO_ENRICH)]),
        rust,
        "Python filter, Rust enrich"
    );
}

#[test]
fn a_python_error_names_the_file_and_line_and_a_module_without_a_decorator_is_refused() {
    // componentize-py is installed by then (one install at a time).
    built();
    let dir = tempfile::tempdir().expect("a temp dir");
    let app = dir.path().join("app.py");
    let error = |text: &str| {
        std::fs::write(&app, text).expect("write app.py");
        let output = weir_output(dir.path(), &["build", "."]);
        assert_eq!(output.status.code(), Some(1));
        String::from_utf8_lossy(&output.stderr).trim().to_owned()
    };
    assert_eq!(
        error("import weir\n\n@weir.filter\ndef keep(event, config)\n    return True\n"),
        format!(
            "error: componentize-py could not build {}: SyntaxError: expected ':' (app.py, line 4)",
            app.canonicalize().expect("app.py").display()
        )
    );
    assert_eq!(
        error("def keep(event, config):\n    return True\n"),
        format!(
            "error: {}: no @weir.filter or @weir.enrich: the module must decorate its plugin function with one (see docs/PLUGINS.md, Python)",
            app.canonicalize().expect("app.py").display()
        )
    );
}

#[test]
fn bench_of_a_python_plugin_runs_its_own_code_in_cpython_beside_the_component() {
    built();
    let dir = root()
        .join("plugins/python/drop-bots")
        .display()
        .to_string();
    let output = weir(
        &root(),
        &["bench", &dir, "--events", "3000", "--batch", "256"],
    );
    let out = String::from_utf8_lossy(&output.stdout);
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 5, "{out}");
    // One event in ten is a crawler: both sides keep 2700 of 3000.
    assert!(
        rows[1].starts_with("  plugin (wasm)") && rows[1].ends_with(" 2700"),
        "{out}"
    );
    assert!(
        rows[2].starts_with("  native, own code") && rows[2].ends_with(" 2700"),
        "{out}"
    );
    assert_eq!(
        rows[4],
        "  (native: `drop_bots`'s own code in CPython, run by python3 with the same SDK, over the same batches)"
    );
}

#[test]
fn new_scaffolds_a_python_filter_that_passes_its_own_test_builds_and_runs() {
    built();
    let dir = tempfile::tempdir().expect("a temp dir");
    let created = weir(
        dir.path(),
        &["new", "filter", "big-orders", "--lang", "python"],
    );
    assert!(
        String::from_utf8_lossy(&created.stdout).starts_with("created Filter plugin `big-orders`"),
        "{}",
        String::from_utf8_lossy(&created.stdout)
    );
    let own_test = Command::new("python3")
        .args(["-m", "unittest"])
        .current_dir(dir.path().join("big-orders"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3 runs");
    assert!(
        own_test.status.success(),
        "the scaffold's own test failed:\n{}",
        String::from_utf8_lossy(&own_test.stderr)
    );
    weir(dir.path(), &["build", "big-orders"]);
    let out = weir(
        dir.path(),
        &[
            "test",
            "big_orders.wasm",
            "--input",
            "big-orders/sample.jsonl",
            "--with",
            "min_amount=10",
        ],
    );
    let sample =
        std::fs::read_to_string(dir.path().join("big-orders/sample.jsonl")).expect("the sample");
    let kept: Vec<&str> = sample
        .lines()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON");
            v["value"]["amount"].as_f64().is_some_and(|a| a >= 10.0)
        })
        .collect();
    assert_eq!(kept.len(), 3);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        kept
    );
    let refused = weir_output(
        dir.path(),
        &["new", "aggregate", "totals", "--lang", "python"],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr).trim(),
        "error: `totals`: the Python SDK has no aggregates yet (filters and enrich functions): write an aggregate in Rust (`--lang rust`)"
    );
}
