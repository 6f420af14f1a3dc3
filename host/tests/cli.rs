//! The `weir` binary end to end: `weir test` outputs for fixed inputs (one plugin, a chain of
//! three), dead letters of a misbehaving plugin, every kind of bad input with its error text and
//! exit code, `weir bench` and `weir demo` counts, the `weir new → build → test → bench` path a
//! plugin author takes, for each kind, and the example plugins' own native tests.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Every plugin of plugins/, built once per test run by host/build.rs.
mod plugins {
    include!(concat!(env!("OUT_DIR"), "/plugin_paths.rs"));
}

/// Six events in the JSON-lines mapping; lines 2 and 4 come from crawlers.
const EVENTS: &str = include_str!("fixtures/clicks.jsonl");

fn line(n: usize) -> &'static str {
    EVENTS.lines().nth(n - 1).expect("fixture line")
}

/// Runs `weir ARGS` in `dir`.
fn weir(dir: &Path, args: &[&str]) -> Output {
    weir_with(dir, args, &[])
}

/// Runs `weir ARGS` in `dir` with environment variables `env` set. The compile cache is this
/// test binary's own (shared by its tests), not the user's, unless `env` names another.
fn weir_with(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .current_dir(dir)
        .env("WEIR_LOG", "warn")
        .env("WEIR_CACHE_DIR", compile_cache())
        .envs(env.iter().copied())
        .output()
        .expect("run weir")
}

/// The compile cache of this test binary's runs of weir, kept under the target directory
/// (Rust components build byte for byte the same, so it holds one entry per plugin).
fn compile_cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-compile-cache")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts success and returns stdout.
fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "weir failed ({}):\n{}",
        output.status,
        stderr(&output)
    );
    stdout(&output)
}

/// Asserts exit code 1 with exactly one `error:` line, and returns it; never a panic.
fn error_line(output: Output) -> String {
    assert_eq!(output.status.code(), Some(1), "stderr: {}", stderr(&output));
    let stderr = stderr(&output);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    errors[0].to_owned()
}

/// A scratch directory holding `events.jsonl`.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("events.jsonl"), EVENTS).expect("write events");
    dir
}

#[test]
fn test_prints_exactly_the_kept_events() {
    let dir = scratch();
    let output = weir(
        dir.path(),
        &["test", plugins::DROP_BOTS, "--input", "events.jsonl"],
    );
    let err = stderr(&output);
    let out = ok(output);
    let expected = [line(1), line(3), line(5), line(6)]
        .map(|l| format!("{l}\n"))
        .concat();
    assert_eq!(out, expected);
    assert!(
        err.contains("weir test: 6 events in, 4 out, 0 dead-lettered, 0 late (1 stage)"),
        "{err}"
    );
}

#[test]
fn a_plugin_is_compiled_once_and_a_damaged_cache_entry_is_compiled_again() {
    let dir = scratch();
    let cache = dir.path().join("compiled");
    let run = |cache: &Path| {
        let args = ["test", plugins::DROP_BOTS, "--input", "events.jsonl"];
        let output = weir_with(dir.path(), &args, &[("WEIR_CACHE_DIR", cache)]);
        let err = stderr(&output);
        (ok(output), err)
    };
    let (kept, err) = run(&cache);
    let compiled = format!("compiled (kept in {})", cache.display());
    assert!(err.contains(&compiled), "{err}");
    let (again, err) = run(&cache);
    assert_eq!(again, kept);
    assert!(err.contains("loaded from the compile cache in"), "{err}");

    // One bit flipped in the compiled code: noticed, never run, compiled again.
    let entries: Vec<PathBuf> = std::fs::read_dir(&cache)
        .expect("the cache directory")
        .map(|e| e.expect("an entry").path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let mut bytes = std::fs::read(&entries[0]).expect("the entry");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&entries[0], bytes).expect("damage the entry");
    let (recompiled, err) = run(&cache);
    assert_eq!(recompiled, kept);
    assert!(
        err.contains("is corrupted (its checksum does not match); compiling again"),
        "{err}"
    );
    assert!(err.contains(&compiled), "{err}");
    let (_, err) = run(&cache);
    assert!(err.contains("loaded from the compile cache in"), "{err}");

    let (uncached, err) = run(Path::new(""));
    assert_eq!(uncached, kept);
    assert!(
        err.contains(
            "compiled (no compile cache: WEIR_CACHE_DIR is empty, or there is no home directory)"
        ),
        "{err}"
    );
}

#[test]
fn test_runs_a_chain_of_three_with_config_and_window() {
    let dir = scratch();
    let out = ok(weir(
        dir.path(),
        &[
            "test",
            plugins::DROP_BOTS,
            plugins::GEO_ENRICH,
            plugins::COUNT_SUM,
            "--input",
            "events.jsonl",
            "--with",
            r#"geo_enrich:table={ US = "United States", FR = "France", DE = "Germany" }"#,
            "--window",
            "tumbling:60s",
        ],
    ));
    // user-1: 25.0 + 12.0 in the first minute window; user-2: 40.0; user-1: 7.25 (flushed at
    // end of input). The bots (lines 2 and 4) never reach the aggregate.
    assert_eq!(
        out,
        concat!(
            r#"{"key":"user-1","value":{"count":2,"sum":37.0,"start_ms":1699999980000,"end_ms":1700000040000},"timestamp_ms":1700000039999}"#,
            "\n",
            r#"{"key":"user-2","value":{"count":1,"sum":40.0,"start_ms":1700000040000,"end_ms":1700000100000},"timestamp_ms":1700000099999}"#,
            "\n",
            r#"{"key":"user-1","value":{"count":1,"sum":7.25,"start_ms":1700000100000,"end_ms":1700000160000},"timestamp_ms":1700000159999}"#,
            "\n",
        )
    );
}

#[test]
fn test_enrich_output_has_header_and_route() {
    let dir = scratch();
    let out = ok(weir(
        dir.path(),
        &[
            "test",
            plugins::GEO_ENRICH,
            "--input",
            "events.jsonl",
            "--with",
            r#"table={ US = "United States" }"#,
            "--batch",
            "2",
        ],
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(
        lines[0],
        r#"{"key":"user-1","value":{"country_code":"US","amount":25.0},"timestamp_ms":1700000000000,"headers":{"user-agent":"Mozilla/5.0 (X11; Linux x86_64)","country":"United States"},"route":"us"}"#
    );
    // Not in the table: passed through unchanged.
    assert_eq!(lines[1], line(2));
    assert_eq!(lines[5], line(6));
}

#[test]
fn test_reports_a_poison_event_and_delivers_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = "{\"value\":\"fine\",\"timestamp_ms\":1}\n\n{\"value\":\"poison pill\",\"timestamp_ms\":2}\n{\"value\":\"also fine\",\"timestamp_ms\":3}\n";
    std::fs::write(dir.path().join("in.jsonl"), input).expect("write");
    let output = weir(
        dir.path(),
        &["test", plugins::PANIC_ON_MARK, "--input", "in.jsonl"],
    );
    let err = stderr(&output);
    let out = ok(output);
    assert_eq!(
        out,
        "{\"value\":\"fine\",\"timestamp_ms\":1}\n{\"value\":\"also fine\",\"timestamp_ms\":3}\n"
    );
    let dead: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("dead letter: "))
        .collect();
    assert_eq!(dead.len(), 1, "{err}");
    assert!(
        dead[0].starts_with("dead letter: stage `panic_on_mark` (plugin `panic_on_mark` "),
        "{}",
        dead[0]
    );
    // Line 3 of the file (line 2 is blank), with the trap and the guest's panic message.
    assert!(
        dead[0].contains("), in.jsonl:3: plugin `panic_on_mark` "),
        "{}",
        dead[0]
    );
    assert!(dead[0].contains(": trapped: wasm trap: "), "{}", dead[0]);
    assert!(
        dead[0].contains("poison event at timestamp 2"),
        "{}",
        dead[0]
    );
    assert!(
        err.contains("  event: {\"value\":\"poison pill\",\"timestamp_ms\":2}"),
        "{err}"
    );
    assert!(
        err.contains("weir test: 3 events in, 2 out, 1 dead-lettered, 0 late (1 stage)"),
        "{err}"
    );
    // The batch ran event by event, and the run says so.
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].starts_with("warning: stage `panic_on_mark`: 1 of 1 calls failed as a whole and were retried event by event, one call per event (the first: plugin `panic_on_mark` "),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[0].contains("trapped: wasm trap: "),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[0].ends_with("give the stage a longer deadline (--deadline-ms), more memory (--memory-mib) or smaller batches (--batch)"),
        "{}",
        warnings[0]
    );
}

#[test]
fn a_loop_and_an_allocation_bomb_are_dead_letters_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input =
        "{\"value\":\"poison\",\"timestamp_ms\":1}\n{\"value\":\"ok\",\"timestamp_ms\":2}\n";
    std::fs::write(dir.path().join("in.jsonl"), input).expect("write");
    // The allocation bomb gets a deadline it cannot reach on a loaded machine, so that the
    // memory cap, not the clock, is what stops it.
    for (plugin, deadline, error) in [
        (plugins::LOOP_FOREVER, "50", "exceeded its 50 ms deadline"),
        (
            plugins::ALLOC_UNBOUNDED,
            "10000",
            "memory cap of 16 MiB reached",
        ),
    ] {
        let output = weir(
            dir.path(),
            &[
                "test",
                plugin,
                "--input",
                "in.jsonl",
                "--deadline-ms",
                deadline,
                "--memory-mib",
                "16",
            ],
        );
        let err = stderr(&output);
        assert_eq!(
            ok(output),
            "{\"value\":\"ok\",\"timestamp_ms\":2}\n",
            "{plugin}"
        );
        assert!(err.contains("in.jsonl:1: plugin `"), "{err}");
        assert!(err.contains(error), "{plugin}: {err}");
    }
}

#[test]
fn bad_plugins_are_clear_errors() {
    let dir = scratch();
    let path = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(path("text.wasm"), "hello").expect("write");
    std::fs::write(path("core.wasm"), wat::parse_str("(module)").expect("wat")).expect("write");
    let run = |plugin: &str, extra: &[&str]| {
        let mut args = vec!["test", plugin, "--input", "events.jsonl"];
        args.extend_from_slice(extra);
        error_line(weir(dir.path(), &args))
    };
    assert_eq!(
        run(&path("text.wasm"), &[]),
        format!(
            "error: plugin `text` ({}): not a wasm binary (no `\\0asm` header)",
            path("text.wasm")
        )
    );
    assert_eq!(
        run(&path("core.wasm"), &[]),
        format!(
            "error: plugin `core` ({}): is a core wasm module, not a component: build it for wasm32-wasip2",
            path("core.wasm")
        )
    );
    assert!(run(&path("missing.wasm"), &[]).starts_with(&format!(
        "error: plugin `missing` ({}): cannot read the file: ",
        path("missing.wasm")
    )));
    // A component of no weir world, and one with a world's export missing.
    std::fs::write(path("other.wasm"), common::component_exporting(&["run"])).expect("write");
    std::fs::write(path("half.wasm"), common::component_exporting(&["filter"])).expect("write");
    assert_eq!(
        run(&path("other.wasm"), &[]),
        format!(
            "error: plugin `other` ({}): implements no weir world: expected the exports of world \
             `weir:plugin/filter@0.1.0` (`init`, `filter`), `weir:plugin/enrich@0.1.0` (`init`, \
             `enrich`) or `weir:plugin/aggregate@0.1.0` (`init`, `fold`, `finish`, `state-layout`); it exports `run`",
            path("other.wasm")
        )
    );
    assert_eq!(
        run(&path("half.wasm"), &[]),
        format!(
            "error: plugin `half` ({}): export `init` of world `weir:plugin/filter@0.1.0` not \
             found; it exports `filter`",
            path("half.wasm")
        )
    );
    let init = run(plugins::BAD_INIT, &["--with", "fail=true"]);
    assert!(init.starts_with("error: plugin `bad_init` "), "{init}");
    assert!(
        init.ends_with(
            ": init refused the config: config: `fail` is true: bad-init refuses to start"
        ),
        "{init}"
    );
    assert_eq!(
        run(plugins::COUNT_SUM, &[]),
        "error: plugin `count_sum` is an aggregate: pass --window (e.g. --window tumbling:60s)"
    );
    assert!(
        run(plugins::COUNT_SUM, &["--window", "tumbling:soon"])
            .starts_with("error: bad window `tumbling:soon`: "),
    );
    assert_eq!(
        run(plugins::DROP_BOTS, &["--window", "tumbling:60s"]),
        "error: --window is for aggregate plugins, and none is given"
    );
    assert_eq!(
        run(plugins::DROP_BOTS, &["--with", "nope"]),
        "error: --with `nope`: expected KEY=VALUE or PLUGIN:KEY=VALUE"
    );
}

#[test]
fn bad_input_lines_name_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "{\"value\":1}\n{\"vaule\":1}\n",
            "in.jsonl:2: unknown field `vaule`",
        ),
        (
            "{\"value\":1}\n\nnot json\n",
            "in.jsonl:3: expected ident at line 1 column 2",
        ),
        (
            "{\"timestamp_ms\":1}\n",
            "in.jsonl:1: missing `value` (or `value_text`, `value_b64`)",
        ),
        (
            "{\"value\":1,\"key_b64\":\"***\"}\n",
            "in.jsonl:1: `key_b64` is not valid base64",
        ),
    ];
    for (input, expected) in cases {
        std::fs::write(dir.path().join("in.jsonl"), input).expect("write");
        let output = weir(
            dir.path(),
            &["test", plugins::DROP_BOTS, "--input", "in.jsonl"],
        );
        assert!(output.stdout.is_empty(), "no partial output for {input:?}");
        let error = error_line(output);
        assert!(error.starts_with(&format!("error: {expected}")), "{error}");
    }
    let error = error_line(weir(
        dir.path(),
        &["test", plugins::DROP_BOTS, "--input", "absent.jsonl"],
    ));
    assert!(
        error.starts_with("error: cannot open input absent.jsonl: "),
        "{error}"
    );
}

#[test]
fn bench_reports_both_sides_and_their_ratio() {
    let dir = scratch();
    let out = ok(weir(
        dir.path(),
        &[
            "bench",
            plugins::DROP_BOTS,
            "--events",
            "3000",
            "--batch",
            "256",
        ],
    ));
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 5, "{out}");
    assert!(
        rows[0].contains("events/s") && rows[0].contains("batch p99"),
        "{out}"
    );
    // One event in ten is a crawler: both sides keep 2700 of 3000.
    assert!(
        rows[1].starts_with("  plugin (wasm)") && rows[1].ends_with(" 2700"),
        "{out}"
    );
    assert!(
        rows[2].starts_with("  native Rust") && rows[2].ends_with(" 2700"),
        "{out}"
    );
    assert!(rows[3].starts_with("  wasm / native: "), "{out}");
    assert_eq!(
        rows[4],
        "  (native: drop-bots's work as a Rust closure, see weir::baseline)"
    );
}

#[test]
fn bench_says_loudly_when_batches_ran_event_by_event() {
    let dir = scratch();
    let out = ok(weir(
        dir.path(),
        &[
            "bench",
            plugins::TRAP_ALWAYS,
            "--events",
            "30",
            "--batch",
            "10",
        ],
    ));
    let warning = out
        .lines()
        .find(|l| l.starts_with("  WARNING: "))
        .unwrap_or_else(|| panic!("no warning in {out}"));
    assert!(
        warning.starts_with("  WARNING: 3 of 3 batches (100.0%) failed as a whole and were retried event by event, one call per event (the first: plugin `trap_always` "),
        "{warning}"
    );
    assert!(
        warning.ends_with("the wasm figures above include those retries; a batch that fails as a whole every time (one too big for the stage's deadline or memory cap) runs event by event every time: give the stage a longer deadline (--deadline-ms), more memory (--memory-mib) or smaller batches (--batch)"),
        "{warning}"
    );
    assert!(out.contains("  dead letters: 30 "), "{out}");
}

#[test]
fn demo_runs_the_embedded_examples() {
    use std::collections::BTreeSet;
    use weir::workload::WorkloadSpec;

    // What the demo's workload holds: 10 000 events of 10 users, one every 10 ms of event
    // time; drop-bots drops the crawlers, geo-enrich routes FR and DE to `fr` and `de`, and
    // count-sum gives one result per user and minute-aligned window.
    let spec = WorkloadSpec {
        events: 10_000,
        keys: 10,
        ..WorkloadSpec::default()
    };
    let humans: Vec<weir_format::Event> = (0..spec.events)
        .map(|i| spec.event(i))
        .filter(|e| {
            let agent = String::from_utf8_lossy(e.header("user-agent").unwrap_or_default());
            let agent = agent.to_ascii_lowercase();
            !["bot", "crawler", "spider"]
                .iter()
                .any(|m| agent.contains(m))
        })
        .collect();
    let routed_eu = humans
        .iter()
        .filter(|e| {
            let value: serde_json::Value = serde_json::from_slice(&e.value).expect("JSON value");
            matches!(value["country_code"].as_str(), Some("FR" | "DE"))
        })
        .count();
    let windows: BTreeSet<(String, i64)> = humans
        .iter()
        .map(|e| {
            let key = String::from_utf8(e.key.clone().expect("a key")).expect("UTF-8 key");
            (key, e.timestamp_ms.div_euclid(60_000) * 60_000)
        })
        .collect();
    assert_eq!((humans.len(), routed_eu, windows.len()), (9000, 4000, 18));

    // An earlier demo's files in the directory are replaced; nothing else there is touched.
    let dir = tempfile::tempdir().expect("tempdir");
    ok(weir(
        dir.path(),
        &["demo", "--events", "1000", "--dir", "demo"],
    ));
    std::fs::write(dir.path().join("demo/notes.txt"), "mine").expect("write notes");
    let output = weir(dir.path(), &["demo", "--events", "10000", "--dir", "demo"]);
    let live = stderr(&output);
    let out = ok(output);
    // stderr is not a terminal: no live view.
    assert!(!live.contains("events in"), "{live}");

    // Window results on stdout: exactly one per user and window, counting every human event.
    let results: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let seen: BTreeSet<(String, i64)> = results
        .iter()
        .map(|r| {
            let key = r["key"].as_str().expect("a key").to_owned();
            (key, r["value"]["start_ms"].as_i64().expect("start_ms"))
        })
        .collect();
    assert_eq!((results.len(), &seen), (windows.len(), &windows), "{out}");
    let counted: u64 = results
        .iter()
        .map(|r| r["value"]["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(counted, humans.len() as u64);

    // The fan-out: every human event archived, the FR and DE ones at the receiver.
    let demo = dir.path().join("demo");
    let lines = |file: &str| {
        std::fs::read_to_string(demo.join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
            .collect::<Vec<_>>()
    };
    assert_eq!(lines("clicks.jsonl").len(), humans.len());
    assert_eq!(
        std::fs::read_to_string(demo.join("notes.txt")).expect("notes"),
        "mine"
    );
    let received = lines("eu-received.jsonl");
    assert_eq!(received.len(), routed_eu);
    assert!(
        received
            .iter()
            .all(|e| matches!(e["route"].as_str(), Some("fr" | "de"))),
        "{received:?}"
    );

    // The summary's counts.
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r.first() == Some(&name))
            .map(|r| r[1..].join(" "))
    };
    let expected = [
        ("clicks/drop-bots", "10000 9000 1000 0"),
        ("clicks/geo-enrich", "9000 9000 0 0"),
        ("totals/drop-bots", "10000 9000 1000 0"),
        ("totals/count-sum", "9000 18 - 0"),
        ("archive", "9000 0 0 0"),
        ("eu", "4000 0 0 0"),
        ("console", "18 0 0 0"),
        ("clicks/dead-letters", "0 0 0 0"),
        ("totals/dead-letters", "0 0 0 0"),
    ];
    for (name, counts) in expected {
        assert_eq!(row(name).as_deref(), Some(counts), "{name}: {out}");
    }
    assert!(out.contains("\n  receiver: 4000 events "), "{out}");

    // Halfway, geo-enrich's next version was deployed: it passed its probation, and the
    // archive's events split between the two versions, each event once.
    let v1 = weir::runtime::Digest::of(weir::examples::GEO_ENRICH).short();
    let v2 = weir::runtime::Digest::of(weir::examples::GEO_ENRICH_V2).short();
    let deployed =
        format!("hot load: geo-enrich {v2} deployed to clicks/geo-enrich halfway (was {v1}): ");
    let line = out
        .lines()
        .find(|l| l.starts_with(&deployed))
        .unwrap_or_else(|| panic!("no deploy line in {out}"));
    assert!(
        line.ends_with("it passed its probation (3 batches) and serves"),
        "{line}"
    );
    let mut by_version = std::collections::BTreeMap::<String, usize>::new();
    for event in lines("clicks.jsonl") {
        let versions = event["headers"]["weir-versions"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        *by_version.entry(versions).or_default() += 1;
    }
    let bots = weir::runtime::Digest::of(weir::examples::DROP_BOTS).short();
    let tag = |geo: &str| format!("drop-bots={bots},geo-enrich={geo}");
    assert_eq!(
        by_version,
        std::collections::BTreeMap::from([(tag(&v1), 4500), (tag(&v2), 4500)])
    );
    let mut split = [v1.clone(), v2.clone()];
    split.sort();
    let counted = format!(
        "(header weir-versions): {} 4500, {} 4500 (9000 in all)",
        split[0], split[1]
    );
    assert!(out.contains(&counted), "{out}");

    // The config it wrote is one `weir serve` runs.
    let config_path = demo
        .canonicalize()
        .expect("demo dir")
        .join("weir-demo.toml");
    let config = weir::config::Config::load(&config_path).expect("a valid config");
    let names: Vec<&str> = config.pipelines.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["clicks", "totals"]);
    let rerun = format!(
        "run the same router: weir serve --config {}",
        config_path.display()
    );
    assert!(out.lines().any(|l| l == rerun), "{out}");
}

/// The plugins' shared target directory, so that scaffolded crates reuse compiled dependencies.
fn plugin_target_dir() -> PathBuf {
    Path::new(plugins::DROP_BOTS)
        .ancestors()
        .nth(3)
        .expect("<target>/plugins/wasm32-wasip2/release/x.wasm")
        .to_path_buf()
}

/// Runs `cargo test` natively in `dir` with the plugins' shared target directory.
fn cargo_test(dir: &Path) -> Output {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .arg("test")
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", plugin_target_dir())
        .output()
        .expect("run cargo test")
}

#[test]
fn the_example_plugins_pass_their_own_tests() {
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let test = cargo_test(&plugins);
    assert!(
        test.status.success(),
        "plugins/: cargo test failed:\n{}",
        stderr(&test)
    );
}

/// `weir new KIND NAME`, `weir build NAME`, then the scaffold's own `cargo test`; returns the
/// path of the component copied into `dir`.
fn scaffold(dir: &Path, kind: &str, name: &str) -> PathBuf {
    let created = ok(weir(dir, &["new", kind, name]));
    assert!(created.starts_with("created "), "{created}");
    let target = plugin_target_dir();
    let built = ok(weir_with(
        dir,
        &["build", name],
        &[("CARGO_TARGET_DIR", &target)],
    ));
    let wasm = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(
        built.starts_with(&format!(
            "built {kind} plugin `{}` ",
            name.replace('-', "_")
        )),
        "{built}"
    );
    assert!(wasm.is_file(), "{built}");
    let test = cargo_test(&dir.join(name));
    assert!(
        test.status.success(),
        "the scaffold's own test failed:\n{}",
        stderr(&test)
    );
    wasm
}

#[test]
fn new_build_test_bench_a_filter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wasm = scaffold(dir.path(), "filter", "big-orders");
    let out = ok(weir(
        dir.path(),
        &[
            "test",
            &wasm.display().to_string(),
            "--input",
            "big-orders/sample.jsonl",
            "--with",
            "min_amount=10",
        ],
    ));
    let sample =
        std::fs::read_to_string(dir.path().join("big-orders/sample.jsonl")).expect("sample");
    let kept: Vec<&str> = sample
        .lines()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            v["value"]["amount"].as_f64().is_some_and(|a| a >= 10.0)
        })
        .collect();
    assert_eq!(kept.len(), 3);
    assert_eq!(out.lines().collect::<Vec<_>>(), kept);

    // The crate itself: its component beside its own code run natively, on the same batches.
    let target = plugin_target_dir();
    let bench = ok(weir_with(
        dir.path(),
        &[
            "bench",
            "big-orders",
            "--events",
            "5000",
            "--with",
            "min_amount=500",
        ],
        &[("CARGO_TARGET_DIR", &target)],
    ));
    let rows: Vec<&str> = bench.lines().collect();
    assert_eq!(rows.len(), 5, "{bench}");
    let events_out = |row: &str| row.split_whitespace().last().map(str::to_owned);
    assert!(rows[1].starts_with("  plugin (wasm)"), "{bench}");
    assert!(rows[2].starts_with("  native, own code"), "{bench}");
    assert_eq!(events_out(rows[1]), events_out(rows[2]), "{bench}");
    assert_ne!(events_out(rows[1]).as_deref(), Some("5000"), "{bench}");
    assert_eq!(
        rows[4],
        "  (native: `big_orders`'s own code in Rust, built for this machine with the plugin's release profile, over the same batches)"
    );
    let error = error_line(weir(dir.path(), &["new", "filter", "big-orders"]));
    assert_eq!(error, "error: ./big-orders already exists");
}

#[test]
fn new_build_test_an_enrich() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wasm = scaffold(dir.path(), "enrich", "tagger");
    let out = ok(weir(
        dir.path(),
        &[
            "test",
            &wasm.display().to_string(),
            "--input",
            "tagger/sample.jsonl",
            "--with",
            "header=team",
        ],
    ));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 6);
    for event in &lines {
        assert_eq!(event["headers"]["team"], "tagger");
        let code = event["value"]["country_code"].as_str().expect("code");
        assert_eq!(event["route"], code.to_ascii_lowercase());
    }
}

#[test]
fn new_build_test_an_aggregate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wasm = scaffold(dir.path(), "aggregate", "totals");
    let out = ok(weir(
        dir.path(),
        &[
            "test",
            &wasm.display().to_string(),
            "--input",
            "totals/sample.jsonl",
            "--window",
            "tumbling:60s",
        ],
    ));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let events: u64 = lines
        .iter()
        .filter_map(|l| l["value"]["events"].as_u64())
        .sum();
    assert_eq!(events, 6, "{out}");
    let bench = ok(weir(
        dir.path(),
        &[
            "bench",
            &wasm.display().to_string(),
            "--events",
            "2000",
            "--window",
            "tumbling:1s",
        ],
    ));
    assert!(bench.contains("wasm / native: "), "{bench}");
}

#[test]
fn serve_names_a_missing_config_and_a_file_in_a_sinks_way_once() {
    let dir = scratch();
    assert_eq!(
        error_line(weir(dir.path(), &["serve", "--config", "nope.toml"])),
        format!(
            "error: cannot read config nope.toml: {}",
            std::io::Error::from_raw_os_error(2)
        )
    );
    std::fs::write(dir.path().join("afile"), "x").expect("write");
    std::fs::write(
        dir.path().join("weir.toml"),
        "[listener]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[pipelines.p]\nsinks = [\"out\"]\n\n[sinks.out]\ntype = \"file\"\npath = \"afile/out.jsonl\"\n",
    )
    .expect("write the config");
    assert_eq!(
        error_line(weir(dir.path(), &["serve", "--config", "weir.toml"])),
        "error: sink `out`: cannot open file afile/out.jsonl: creating its directory afile: afile is a file, not a directory"
    );
}
