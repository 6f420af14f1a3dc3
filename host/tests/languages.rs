//! The example plugins written in Python and JavaScript (plugins/python and plugins/js:
//! drop-bots and geo-enrich), built by `weir build` (which installs componentize-py, and
//! componentize-js with esbuild, itself, pinned, once per machine), give exactly the outputs of
//! the Rust ones, alone and in chains mixing the three languages, in `weir test` and under
//! `weir serve`.
//!
//! Needs python3 with venv and pip, Node.js and npm (.ci/run installs them), PyPI and the npm
//! registry.

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

/// The examples of one language, built.
struct Examples {
    drop_bots: PathBuf,
    geo: PathBuf,
}

/// The Python and JavaScript examples, built once per test process.
fn built() -> &'static (Examples, Examples) {
    static BUILT: OnceLock<(Examples, Examples)> = OnceLock::new();
    BUILT.get_or_init(|| {
        // componentize-py's and componentize-js's builds differ byte for byte from run to run:
        // each run's components are new versions, so the cache starts empty rather than growing.
        let _ = std::fs::remove_dir_all(kept("weir-compile-cache"));
        let out = kept("language-plugins");
        std::fs::create_dir_all(&out).expect("a folder for the components");
        let build = |language: &str, name: &str| {
            let wasm = out.join(format!("{name}_{language}.wasm"));
            let dir = root().join("plugins").join(language).join(name);
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
        let examples = |language: &str| Examples {
            drop_bots: build(language, "drop-bots"),
            geo: build(language, "geo-enrich"),
        };
        (examples("python"), examples("js"))
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
fn drop_bots_in_python_and_javascript_keep_exactly_what_the_rust_one_keeps() {
    let (python, js) = built();
    let rust = test_output(&[Path::new(plugins::DROP_BOTS)]);
    assert_eq!(rust.lines().count(), 4, "{rust}");
    assert_eq!(test_output(&[&python.drop_bots]), rust, "Python");
    assert_eq!(test_output(&[&js.drop_bots]), rust, "JavaScript");
}

#[test]
fn geo_enrich_in_python_and_javascript_gives_exactly_the_rust_ones_events() {
    let (python, js) = built();
    let rust = test_output(&[Path::new(plugins::GEO_ENRICH)]);
    assert_eq!(rust.lines().count(), 6, "{rust}");
    assert!(rust.contains(r#""country":"France""#), "{rust}");
    assert_eq!(test_output(&[&python.geo]), rust, "Python");
    assert_eq!(test_output(&[&js.geo]), rust, "JavaScript");
}

/// Every chain of a drop-bots and a geo-enrich mixing languages: (its name, its two
/// components).
fn mixed_chains(python: &Examples, js: &Examples) -> Vec<(&'static str, [PathBuf; 2])> {
    let (drop_bots, geo) = (
        PathBuf::from(plugins::DROP_BOTS),
        PathBuf::from(plugins::GEO_ENRICH),
    );
    vec![
        (
            "Rust filter, Python enrich",
            [drop_bots.clone(), python.geo.clone()],
        ),
        (
            "Python filter, Rust enrich",
            [python.drop_bots.clone(), geo.clone()],
        ),
        (
            "Rust filter, JavaScript enrich",
            [drop_bots, js.geo.clone()],
        ),
        (
            "JavaScript filter, Rust enrich",
            [js.drop_bots.clone(), geo],
        ),
        (
            "Python filter, JavaScript enrich",
            [python.drop_bots.clone(), js.geo.clone()],
        ),
        (
            "JavaScript filter, Python enrich",
            [js.drop_bots.clone(), python.geo.clone()],
        ),
    ]
}

#[test]
fn chains_mixing_rust_python_and_javascript_give_the_all_rust_chains_output() {
    let (python, js) = built();
    let rust = test_output(&[
        Path::new(plugins::DROP_BOTS),
        Path::new(plugins::GEO_ENRICH),
    ]);
    assert_eq!(rust.lines().count(), 4, "{rust}");
    for (name, [filter, enrich]) in mixed_chains(python, js) {
        assert_eq!(test_output(&[&filter, &enrich]), rust, "{name}");
    }
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

/// `weir bench plugins/LANGUAGE/drop-bots`: both sides keep the same events, and the note
/// names the native side.
fn bench_keeps_on_both_sides(language: &str, native: &str) {
    built();
    let dir = root()
        .join("plugins")
        .join(language)
        .join("drop-bots")
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
        format!("  (native: `drop_bots`'s own code in {native}, over the same batches)")
    );
}

#[test]
fn bench_of_a_python_plugin_runs_its_own_code_in_cpython_beside_the_component() {
    bench_keeps_on_both_sides("python", "CPython, run by python3 with the same SDK");
}

#[test]
fn a_javascript_error_names_the_file_line_and_column_and_exports_are_checked() {
    // componentize-js is installed by then (one install at a time).
    built();
    let dir = tempfile::tempdir().expect("a temp dir");
    let app = dir.path().join("app.js");
    std::fs::write(&app, "").expect("write app.js");
    let shown = app.canonicalize().expect("app.js").display().to_string();
    let error = |text: &str| {
        std::fs::write(&app, text).expect("write app.js");
        let output = weir_output(dir.path(), &["build", "."]);
        assert_eq!(output.status.code(), Some(1));
        String::from_utf8_lossy(&output.stderr).trim().to_owned()
    };
    assert_eq!(
        error(
            "import * as weir from \"weir\";\nexport function keep(event {\n  return true;\n}\nexport const { init, filter } = weir.filter(keep);\n"
        ),
        format!("error: {shown}:2:28: Expected \")\" but found \"{{\"")
    );
    assert_eq!(
        error("export function keep(event) {\n  return true;\n}\n"),
        format!(
            "error: {shown}: exports neither filter nor enrich: write `export const {{ init, filter }} = weir.filter(fn)` (or enrich)"
        )
    );
    assert_eq!(
        error(
            "import * as weir from \"weir\";\nexport const { filter } = weir.filter(() => true);\n"
        ),
        format!(
            "error: {shown}: exports filter but not init: write `export const {{ init, filter }} = weir.filter(fn)`"
        )
    );
    assert_eq!(
        error(
            "import { readFileSync } from \"node:fs\";\nexport const filter = () => readFileSync;\n"
        ),
        format!(
            "error: {shown}:1:30: Could not resolve \"node:fs\" (a plugin runs in weir's sandbox: Node.js's modules, files, network and clock are not there)"
        )
    );
}

#[test]
fn bench_of_a_javascript_plugin_runs_its_own_code_in_node_beside_the_component() {
    bench_keeps_on_both_sides("js", "Node.js, run by node with the same SDK");
}

/// `weir new filter big-orders --lang LANG` in `dir`, checked to print what it created.
fn scaffold(dir: &Path, lang: &str) -> PathBuf {
    let created = weir(dir, &["new", "filter", "big-orders", "--lang", lang]);
    assert!(
        String::from_utf8_lossy(&created.stdout).starts_with("created Filter plugin `big-orders`"),
        "{}",
        String::from_utf8_lossy(&created.stdout)
    );
    dir.join("big-orders")
}

/// The scaffold in `dir` built, and `weir test` of it over its sample keeps the 3 events with
/// an amount of at least 10; an aggregate in `lang` is refused naming `language`.
fn scaffold_builds_and_keeps_its_sample(dir: &Path, lang: &str, language: &str) {
    weir(dir, &["build", "big-orders"]);
    let out = weir(
        dir,
        &[
            "test",
            "big_orders.wasm",
            "--input",
            "big-orders/sample.jsonl",
            "--with",
            "min_amount=10",
        ],
    );
    let sample = std::fs::read_to_string(dir.join("big-orders/sample.jsonl")).expect("the sample");
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
    let refused = weir_output(dir, &["new", "aggregate", "totals", "--lang", lang]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr).trim(),
        format!(
            "error: `totals`: the {language} SDK has no aggregates yet (filters and enrich functions): write an aggregate in Rust (`--lang rust`)"
        )
    );
}

#[test]
fn new_scaffolds_a_javascript_filter_that_passes_its_own_test_builds_and_runs() {
    built();
    let dir = tempfile::tempdir().expect("a temp dir");
    let plugin = scaffold(dir.path(), "js");
    // Its package.json names this checkout's SDK as `weir`: npm links it, offline.
    for args in [
        &["install", "--offline", "--no-audit", "--no-fund"][..],
        &["test"][..],
    ] {
        let output = Command::new("npm")
            .args(args)
            .current_dir(&plugin)
            .output()
            .expect("npm runs");
        assert!(
            output.status.success(),
            "npm {args:?} in the scaffold failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    scaffold_builds_and_keeps_its_sample(dir.path(), "js", "JavaScript");
}

#[test]
fn new_scaffolds_a_python_filter_that_passes_its_own_test_builds_and_runs() {
    built();
    let dir = tempfile::tempdir().expect("a temp dir");
    let plugin = scaffold(dir.path(), "python");
    let own_test = Command::new("python3")
        .args(["-m", "unittest"])
        .current_dir(&plugin)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3 runs");
    assert!(
        own_test.status.success(),
        "the scaffold's own test failed:\n{}",
        String::from_utf8_lossy(&own_test.stderr)
    );
    scaffold_builds_and_keeps_its_sample(dir.path(), "python", "Python");
}

/// The config of a router with one pipeline per chain, each into a file sink of its own.
fn serve_config(chains: &[(&str, [PathBuf; 2])]) -> String {
    let mut config = String::from(
        "[listener]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[auth]\nanonymous = true\n",
    );
    let table = TABLE.strip_prefix("table=").expect("TABLE is `table=…`");
    for (i, (_, [filter, enrich])) in chains.iter().enumerate() {
        config += &format!(
            r#"
[pipelines.p{i}]
sinks = ["s{i}"]

[[pipelines.p{i}.stages]]
path = "{}"

[[pipelines.p{i}.stages]]
path = "{}"
with = {{ table = {table} }}

[sinks.s{i}]
type = "file"
path = "out-{i}.jsonl"
fsync = "never"
"#,
            filter.display(),
            enrich.display()
        );
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_weir_serve_every_mixed_chain_delivers_the_all_rust_chains_events() {
    let (python, js) = built();
    let mut chains = vec![(
        "all Rust",
        [
            PathBuf::from(plugins::DROP_BOTS),
            PathBuf::from(plugins::GEO_ENRICH),
        ],
    )];
    chains.extend(mixed_chains(python, js));
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("weir.toml");
    std::fs::write(&path, serve_config(&chains)).expect("write the config");
    let config = weir::config::Config::load(&path).expect("a valid config");
    let server = weir::server::Server::start(config)
        .await
        .expect("the router starts");
    let (addr, pin) = (server.local_addr().to_string(), server.fingerprint());
    let clicks = root().join("host/tests/fixtures/clicks.jsonl");
    for i in 0..chains.len() {
        let pipeline = format!("p{i}");
        for input in [
            vec!["--file".to_owned(), clicks.display().to_string()],
            ["--generate", "2000", "--size", "200", "--keys", "50"]
                .map(str::to_owned)
                .to_vec(),
        ] {
            let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
            command
                .args([
                    "send",
                    "--to",
                    &addr,
                    "--pin",
                    &pin,
                    "--pipeline",
                    &pipeline,
                ])
                .args(["--producer-id", &format!("sender-{i}")])
                .args(&input)
                .env("WEIR_LOG", "warn");
            let output = tokio::task::spawn_blocking(move || command.output().expect("weir runs"))
                .await
                .expect("the command's thread");
            assert!(
                output.status.success(),
                "weir send to {pipeline}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    // Every event is acked once its sinks took it; the router stops after delivering it all.
    server.shutdown().await.expect("the router stops");
    let out = |i: usize| std::fs::read_to_string(dir.path().join(format!("out-{i}.jsonl")));
    let rust = out(0).expect("the all-Rust chain's file");
    // The 6 clicks keep 4; one generated event in ten is a crawler's.
    assert_eq!(
        rust.lines().count(),
        4 + 1800,
        "{}",
        &rust[..rust.len().min(2000)]
    );
    for (i, (name, _)) in chains.iter().enumerate().skip(1) {
        assert!(
            out(i).expect("the chain's file") == rust,
            "{name}: not the all-Rust chain's events"
        );
    }
}

#[test]
fn a_typescript_plugin_builds_with_its_types_stripped_and_keeps_what_drop_bots_keeps() {
    built();
    let dir = tempfile::tempdir().expect("a temp dir");
    let plugin = dir.path().join("typed-bots");
    std::fs::create_dir(&plugin).expect("the plugin's folder");
    std::fs::write(
        plugin.join("app.ts"),
        r#"import * as weir from "weir";
import type { Config, Event } from "weir";

const words: RegExp = /bot|crawler|spider/i;

export function keep(event: Event, _config: Config): boolean {
  return !words.test(event.headerText("user-agent") ?? "");
}

export const { init, filter } = weir.filter(keep);
"#,
    )
    .expect("write app.ts");
    let wasm = dir.path().join("typed_bots.wasm");
    weir(
        dir.path(),
        &["build", "typed-bots", "--out", &wasm.display().to_string()],
    );
    assert_eq!(
        test_output(&[&wasm]),
        test_output(&[Path::new(plugins::DROP_BOTS)])
    );
}
