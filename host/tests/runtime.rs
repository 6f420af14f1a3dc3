//! The plugin runtime and stages against the real example plugins (plugins/, built for
//! wasm32-wasip2 into target/plugins): exact outputs, exact error texts, poison isolation, and
//! every kind of bad module.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use weir::pipeline::{Chain, DeadLetter, Stage, WindowConfig, WindowId, WindowKind, WindowState};
use weir::runtime::{
    Group, Limits, Plugin, PluginError, PluginKind, Runtime, RuntimeConfig, StageConfig, Window,
};
use weir_format::{Batch, BatchBuilder, Event, encode};

/// Every plugin of plugins/, built once per test run by host/build.rs.
mod plugins {
    include!(concat!(env!("OUT_DIR"), "/plugin_paths.rs"));
}

/// The component of plugin `name` (its crate name).
fn wasm(name: &str) -> PathBuf {
    let path = match name {
        "drop_bots" => plugins::DROP_BOTS,
        "geo_enrich" => plugins::GEO_ENRICH,
        "count_sum" => plugins::COUNT_SUM,
        "panic_on_mark" => plugins::PANIC_ON_MARK,
        "loop_forever" => plugins::LOOP_FOREVER,
        "alloc_unbounded" => plugins::ALLOC_UNBOUNDED,
        "bad_init" => plugins::BAD_INIT,
        "bad_finish" => plugins::BAD_FINISH,
        "record_filter" => plugins::RECORD_FILTER,
        other => panic!("no plugin `{other}` in plugins/"),
    };
    PathBuf::from(path)
}

/// One runtime for the whole test binary, as in the server.
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| Runtime::new(RuntimeConfig::default()).expect("runtime"))
}

/// Each plugin compiled once per test binary.
fn plugin(name: &str) -> Plugin {
    static PLUGINS: OnceLock<Mutex<HashMap<String, Plugin>>> = OnceLock::new();
    let plugins = PLUGINS.get_or_init(Mutex::default);
    let mut plugins = plugins.lock().unwrap_or_else(|e| e.into_inner());
    plugins
        .entry(name.to_owned())
        .or_insert_with(|| runtime().load_file(wasm(name)).expect(name))
        .clone()
}

fn stage(name: &str, config: StageConfig) -> Stage {
    Stage::new(&plugin(name), config, None).expect(name)
}

/// The output of a chain whose last stage is not a filter: a batch of its own.
fn own(output: &weir::pipeline::ChainOutput) -> &[u8] {
    output.events.batch.as_deref().expect("a batch of its own")
}

fn events(batch: &[u8]) -> Vec<Event> {
    Batch::verify(batch).expect("a valid batch").to_events()
}

fn sources(batch: &[u8]) -> Vec<u32> {
    Batch::verify(batch)
        .expect("a valid batch")
        .iter()
        .map(|e| e.source())
        .collect()
}

/// A batch of `events` whose `source` fields are `first`, `first + 1`, ... (as if an
/// upstream stage had numbered them).
fn sourced(events: &[Event], first: u32) -> Vec<u8> {
    let plain = encode(events);
    let mut builder = BatchBuilder::new();
    for (i, event) in Batch::verify(&plain).expect("a batch").iter().enumerate() {
        builder.push_ref(&event, first + i as u32);
    }
    builder.finish()
}

fn visit(ua: Option<&str>, t: i64) -> Event {
    let e = Event::new(format!(r#"{{"path":"/","t":{t}}}"#), t);
    match ua {
        Some(ua) => e.with_header("user-agent", ua),
        None => e,
    }
}

fn marked(values: &[&str]) -> Vec<Event> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| Event::new(*v, 1000 * i as i64))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Loading

#[test]
fn plugins_are_named_versioned_and_kinded() {
    let p = plugin("drop_bots");
    assert_eq!(p.name(), "drop_bots");
    assert_eq!(p.kind(), PluginKind::Filter);
    assert_eq!(p.version().len(), 8);
    assert!(p.version().bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(plugin("geo_enrich").kind(), PluginKind::Enrich);
    assert_eq!(plugin("count_sum").kind(), PluginKind::Aggregate);
    // Same bytes, same version; a different name for the same bytes keeps the version.
    let bytes = std::fs::read(wasm("drop_bots")).expect("read");
    let again = runtime().load_bytes("bots", &bytes).expect("load");
    assert_eq!(again.name(), "bots");
    assert_eq!(again.version(), p.version());
}

#[test]
fn not_wasm_is_a_clear_error() {
    let e = runtime()
        .load_bytes("junk", b"hello, world")
        .expect_err("not wasm");
    assert_eq!(
        e.to_string(),
        "plugin `junk`: not a wasm binary (no `\\0asm` header)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notes.wasm");
    std::fs::write(&path, "not wasm").expect("write");
    let e = runtime().load_file(&path).expect_err("not wasm");
    assert_eq!(
        e.to_string(),
        format!(
            "plugin `notes` ({}): not a wasm binary (no `\\0asm` header)",
            path.display()
        )
    );
    let missing = dir.path().join("gone.wasm");
    let e = runtime().load_file(&missing).expect_err("missing");
    assert!(
        e.to_string().starts_with(&format!(
            "plugin `gone` ({}): cannot read the file: ",
            missing.display()
        )),
        "{e}"
    );
}

#[test]
fn a_core_module_is_named_as_such() {
    let module = wat::parse_str(r#"(module (func (export "filter")))"#).expect("wat");
    let e = runtime()
        .load_bytes("core", &module)
        .expect_err("core module");
    assert_eq!(
        e,
        PluginError::CoreModule {
            who: "`core`".into()
        }
    );
    assert_eq!(
        e.to_string(),
        "plugin `core`: is a core wasm module, not a component: build it for wasm32-wasip2"
    );
}

#[test]
fn a_component_of_the_wrong_world_names_world_and_export() {
    let path = wasm("drop_bots");
    let e = runtime()
        .load_file_as(&path, PluginKind::Enrich)
        .expect_err("a filter is not an enrich");
    assert_eq!(
        e.to_string(),
        format!(
            "plugin `drop_bots` ({}): export `enrich` of world `weir:plugin/enrich@0.1.0` not \
             found; it exports `init`, `filter`",
            path.display()
        )
    );
    // Loading as the right kind works.
    let p = runtime()
        .load_file_as(&path, PluginKind::Filter)
        .expect("a filter");
    assert_eq!(p.kind(), PluginKind::Filter);
}

#[test]
fn a_component_of_no_world_lists_what_it_exports() {
    let component = common::component_exporting(&["run"]);
    let e = runtime()
        .load_bytes("runner", &component)
        .expect_err("no world");
    assert_eq!(
        e.to_string(),
        "plugin `runner`: implements no weir world: expected the exports of world \
         `weir:plugin/filter@0.1.0` (`init`, `filter`), `weir:plugin/enrich@0.1.0` (`init`, \
         `enrich`) or `weir:plugin/aggregate@0.1.0` (`init`, `fold`, `finish`, `state-layout`); it exports `run`"
    );
    let empty = wat::parse_str("(component)").expect("wat");
    let e = runtime().load_bytes("empty", &empty).expect_err("no world");
    assert!(e.to_string().ends_with("; it exports nothing"), "{e}");
}

#[test]
fn a_missing_export_is_named() {
    let component = common::component_exporting(&["filter"]);
    let e = runtime()
        .load_bytes("half", &component)
        .expect_err("no init");
    assert_eq!(
        e.to_string(),
        "plugin `half`: export `init` of world `weir:plugin/filter@0.1.0` not found; it \
         exports `filter`"
    );
}

#[test]
fn exports_of_the_wrong_type_are_a_signature_error() {
    let component = common::component_exporting(&["init", "filter"]);
    let e = runtime()
        .load_bytes("typo", &component)
        .expect_err("wrong types");
    assert!(
        matches!(
            &e,
            PluginError::Signature {
                world: PluginKind::Filter,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("plugin `typo`: does not match world `weir:plugin/filter@0.1.0`: "),
        "{e}"
    );
}

#[test]
fn imports_outside_the_sandbox_are_refused() {
    let component = wat::parse_str(
        r#"(component
            (import "wasi:http/outgoing-handler@0.2.0" (instance
                (export "handle" (func))))
            (core module $m (func (export "f")))
            (core instance $i (instantiate $m))
            (func (export "init") (canon lift (core func $i "f")))
            (func (export "filter") (canon lift (core func $i "f"))))"#,
    )
    .expect("wat");
    let e = runtime()
        .load_bytes("http", &component)
        .expect_err("wasi:http");
    let text = e.to_string();
    assert!(
        text.starts_with("plugin `http`: imports what the sandbox does not provide: "),
        "{text}"
    );
    assert!(text.contains("wasi:http/outgoing-handler@0.2.0"), "{text}");
}

#[test]
fn init_failure_carries_the_plugins_message() {
    let p = plugin("bad_init");
    let e = p
        .instantiate(StageConfig::new("strict").with("fail", true))
        .expect_err("init fails");
    assert_eq!(
        e.to_string(),
        format!(
            "plugin `bad_init` {}: init refused the config: config: `fail` is true: bad-init \
             refuses to start",
            p.version()
        )
    );
    // The same plugin with an acceptable config runs.
    let mut ok = Stage::new(&p, StageConfig::new("lenient").with("fail", false), None)
        .expect("init succeeds");
    let batch = encode(&[Event::new("x", 1)]);
    assert_eq!(events(&ok.process(&batch).expect("runs").batch).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// The example plugins, exact outputs

#[test]
fn drop_bots_keeps_exactly_the_humans() {
    let input = vec![
        visit(Some("Mozilla/5.0 (X11; Linux x86_64)"), 1),
        visit(Some("Googlebot/2.1 (+http://www.google.com/bot.html)"), 2),
        visit(None, 3),
        visit(Some("Some-CRAWLER/1.0"), 4),
        visit(Some("spider-man fan club"), 5),
        visit(Some("curl/8.5.0"), 6),
        visit(Some("Robot Framework"), 7),
        visit(Some("Mozilla/5.0 (compatible; Bingbot/2.0)"), 8),
        visit(Some("Safari"), 9),
    ];
    // Sources as an upstream stage set them: a filter passes them on unchanged.
    let batch = sourced(&input, 10);
    let mut stage = stage("drop_bots", StageConfig::new("bots"));

    let verified = Batch::verify(&batch).expect("a batch");
    let bitmap = stage.filter_bitmap(&verified).expect("filter");
    assert_eq!(bitmap.as_bytes(), &[0b0010_0101, 0b1]);

    let out = stage.process(&batch).expect("process");
    let kept = vec![
        input[0].clone(),
        input[2].clone(),
        input[5].clone(),
        input[8].clone(),
    ];
    assert_eq!(events(&out.batch), kept);
    assert_eq!(sources(&out.batch), vec![10, 12, 15, 18]);
    assert!(out.dead_letters.is_empty());
    assert!(out.late.is_empty());

    // All kept: the batch passes through as it came, sources too; none kept: an empty batch.
    let humans = sourced(&kept, 7);
    assert_eq!(stage.process(&humans).expect("process").batch, humans);
    assert_eq!(sources(&humans), vec![7, 8, 9, 10]);
    let bots = encode(&[visit(Some("bot"), 1), visit(Some("spider"), 2)]);
    assert!(events(&stage.process(&bots).expect("process").batch).is_empty());
    // An empty batch calls nothing and returns an empty batch.
    let calls = stage.instance_mut().calls();
    assert!(events(&stage.process(&encode(&[])).expect("empty").batch).is_empty());
    assert_eq!(stage.instance_mut().calls(), calls);
}

#[test]
fn geo_enrich_adds_the_header_and_route() {
    let config = StageConfig::new("geo")
        .with(
            "table",
            serde_json::json!({"FR": "France", "DE": "Germany"}),
        )
        .with("field", "cc");
    let mut stage = stage("geo_enrich", config);
    let input = vec![
        Event::new(r#"{"cc":"FR","n":1}"#, 10).with_key("u1"),
        Event::new(r#"{"cc":"XX","n":2}"#, 20).with_header("h", "v"),
        Event::new(r#"{"n":3}"#, 30),
        Event::new(r#"{"cc":"DE","n":4}"#, 40).with_header("h", "w"),
    ];
    let out = stage.process(&encode(&input)).expect("process");
    assert_eq!(
        events(&out.batch),
        vec![
            input[0]
                .clone()
                .with_header("country", "France")
                .with_route("fr"),
            input[1].clone(),
            input[2].clone(),
            input[3]
                .clone()
                .with_header("country", "Germany")
                .with_route("de"),
        ]
    );
    assert_eq!(sources(&out.batch), vec![0, 1, 2, 3]);
    assert!(out.dead_letters.is_empty());
}

#[test]
fn geo_enrich_isolates_a_value_that_is_not_json() {
    let p = plugin("geo_enrich");
    let mut stage = Stage::new(
        &p,
        StageConfig::new("geo").with("table", serde_json::json!({"FR": "France"})),
        None,
    )
    .expect("stage");
    let input = vec![
        Event::new(r#"{"country_code":"FR"}"#, 1),
        Event::new("not json", 2),
        Event::new(r#"{"country_code":"FR"}"#, 3),
    ];
    let out = stage.process(&encode(&input)).expect("process");
    let fr = |e: &Event| e.clone().with_header("country", "France").with_route("fr");
    assert_eq!(events(&out.batch), vec![fr(&input[0]), fr(&input[2])]);
    assert_eq!(sources(&out.batch), vec![0, 2]);
    assert_eq!(out.dead_letters.len(), 1);
    let dead = &out.dead_letters[0];
    assert_eq!((dead.index, &dead.event), (1, &input[1]));
    assert!(
        dead.error.starts_with(&format!(
            "plugin `geo_enrich` {}: enrich failed: event 1: ",
            p.version()
        )),
        "{}",
        dead.error
    );
}

fn amount(key: &str, t: i64, amount: f64) -> Event {
    Event::new(format!(r#"{{"amount":{amount}}}"#), t).with_key(key)
}

fn total(key: &str, start_ms: i64, end_ms: i64, count: u64, sum: &str) -> Event {
    Event::new(
        format!(r#"{{"count":{count},"sum":{sum},"start_ms":{start_ms},"end_ms":{end_ms}}}"#),
        end_ms - 1,
    )
    .with_key(key)
}

fn count_sum(window: &str) -> Stage {
    Stage::new(
        &plugin("count_sum"),
        StageConfig::new("totals"),
        Some(window.parse().expect("window")),
    )
    .expect("stage")
}

#[test]
fn count_sum_emits_exact_tumbling_window_results() {
    let mut stage = count_sum("tumbling:60s");
    let first = stage
        .process(&encode(&[
            amount("a", 1_000, 2.0),
            amount("b", 2_000, 5.0),
            amount("a", 30_000, 3.5),
        ]))
        .expect("first batch");
    assert!(events(&first.batch).is_empty(), "no window finished yet");

    // t = 61 s moves the watermark past 60 s: both keys' first windows finish, `a` first.
    let second = stage
        .process(&encode(&[
            amount("a", 61_000, 1.0),
            amount("b", 10_000, 9.0),
        ]))
        .expect("second batch");
    assert_eq!(
        events(&second.batch),
        vec![
            total("a", 0, 60_000, 2, "5.5"),
            total("b", 0, 60_000, 1, "5.0"),
        ]
    );
    assert_eq!(sources(&second.batch), vec![0, 1]);
    // b at 10 s came after the watermark passed its window: late, not folded.
    assert_eq!(second.late.len(), 1);
    assert_eq!(second.late[0].index, 1);
    assert_eq!(second.late[0].event, amount("b", 10_000, 9.0));
    assert_eq!(second.late[0].stage, "totals");

    let flushed = stage.flush().expect("flush");
    assert_eq!(
        events(&flushed.batch),
        vec![total("a", 60_000, 120_000, 1, "1.0")]
    );
    assert!(stage.window_state().expect("aggregate").open_windows() == 0);
}

#[test]
fn count_sum_sliding_windows_with_lateness() {
    let mut stage = count_sum("sliding:20s/10s,lateness:5s");
    let out = stage
        .process(&encode(&[
            amount("k", 1_000, 1.0),  // [-10,10) [0,20)
            amount("k", 12_000, 2.0), // [0,20) [10,30)
            amount("k", 24_000, 4.0), // [10,30) [20,40); watermark 19 s: [-10,10) finishes
            amount("k", 8_000, 8.0),  // [-10,10) finished, [0,20) open (19 < 20)
        ]))
        .expect("process");
    // [-10 s, 10 s) finished at watermark 19 s, holding the event at 1 s only: the event at
    // 8 s came when that window was already finished and went to [0, 20) alone.
    assert_eq!(
        events(&out.batch),
        vec![total("k", -10_000, 10_000, 1, "1.0")]
    );
    assert!(out.late.is_empty());
    let flushed = stage.flush().expect("flush");
    assert_eq!(
        events(&flushed.batch),
        vec![
            total("k", 0, 20_000, 3, "11.0"),
            total("k", 10_000, 30_000, 2, "6.0"),
            total("k", 20_000, 40_000, 1, "4.0"),
        ]
    );
}

#[test]
fn count_sum_isolates_an_event_without_the_field() {
    let p = plugin("count_sum");
    let mut stage = count_sum("tumbling:1m");
    let input = vec![
        amount("a", 1_000, 2.0),
        Event::new(r#"{"price":3}"#, 2_000).with_key("a"),
        amount("a", 3_000, 4.0),
    ];
    let out = stage.process(&encode(&input)).expect("process");
    assert_eq!(out.dead_letters.len(), 1);
    let dead = &out.dead_letters[0];
    assert_eq!(dead.index, 1);
    assert_eq!(dead.event, input[1]);
    assert_eq!(dead.window, None);
    assert_eq!(
        dead.error,
        format!(
            "plugin `count_sum` {}: fold failed: event 1: `amount` is not a number",
            p.version()
        )
    );
    assert_eq!(
        (dead.plugin.as_str(), dead.stage.as_str()),
        ("count_sum", "totals")
    );
    let flushed = stage.flush().expect("flush");
    assert_eq!(
        events(&flushed.batch),
        vec![total("a", 0, 60_000, 2, "6.0")]
    );
}

#[test]
fn window_state_survives_a_restart() {
    let config: WindowConfig = "tumbling:1m".parse().expect("window");
    let mut before = count_sum("tumbling:1m");
    before
        .process(&encode(&[amount("a", 1_000, 2.0), amount("b", 5_000, 1.5)]))
        .expect("process");
    let saved = before.window_state().expect("aggregate").to_bytes();
    drop(before);

    let mut after = count_sum("tumbling:1m");
    let restored = WindowState::from_bytes(config, &saved).expect("state");
    let previous = after
        .replace_window_state(restored)
        .expect("a valid window config");
    assert_eq!(previous.map(|s| s.open_windows()), Some(0));
    let out = after
        .process(&encode(&[
            amount("a", 59_000, 0.5),
            amount("a", 60_000, 1.0),
        ]))
        .expect("process");
    assert_eq!(
        events(&out.batch),
        vec![
            total("a", 0, 60_000, 2, "2.5"),
            total("b", 0, 60_000, 1, "1.5"),
        ]
    );
}

#[test]
fn a_chain_of_three() {
    let table = serde_json::json!({"FR": "France", "DE": "Germany"});
    let mut chain = Chain::new(vec![
        stage("drop_bots", StageConfig::new("no-bots")),
        stage(
            "geo_enrich",
            StageConfig::new("geo")
                .with("table", table)
                .with("field", "cc"),
        ),
        Stage::new(
            &plugin("count_sum"),
            StageConfig::new("totals"),
            Some("tumbling:10s".parse().expect("window")),
        )
        .expect("aggregate"),
    ]);
    let order = |key: &str, t: i64, cc: &str, amount: u32, ua: &str| {
        Event::new(format!(r#"{{"cc":"{cc}","amount":{amount}}}"#), t)
            .with_key(key)
            .with_header("user-agent", ua)
    };
    let out = chain
        .process(&encode(&[
            order("alice", 1_000, "FR", 10, "Firefox"),
            order("bob", 2_000, "DE", 20, "Googlebot"),
            order("alice", 3_000, "DE", 30, "Firefox"),
            order("carol", 12_000, "FR", 5, "Safari"),
        ]))
        .expect("process");
    // carol at 12 s closes [0, 10 s): alice's two orders (bob was a bot).
    assert_eq!(
        events(own(&out)),
        vec![total("alice", 0, 10_000, 2, "40.0")]
    );
    assert!(out.dead_letters.is_empty() && out.late.is_empty());
    let flushed = chain.flush().expect("flush");
    assert_eq!(
        events(own(&flushed)),
        vec![total("carol", 10_000, 20_000, 1, "5.0")]
    );
}

// ---------------------------------------------------------------------------------------------
// Misbehaving plugins: exact errors, isolation, the next batch served

/// Runs a batch with `poison` at index 2 through a misbehaving filter and checks that only
/// that event is a dead letter, that the others are delivered, and that the next batch runs.
fn isolates_the_poison(name: &str, limits: Limits) -> DeadLetter {
    let p = plugin(name);
    let mut stage = Stage::new(&p, StageConfig::new("guard").limits(limits), None).expect(name);
    let input = marked(&["a", "b", "the poison pill", "d", "e"]);
    let out = stage
        .process(&sourced(&input, 100))
        .expect("the stage survives");
    let delivered = vec![
        input[0].clone(),
        input[1].clone(),
        input[3].clone(),
        input[4].clone(),
    ];
    assert_eq!(events(&out.batch), delivered);
    assert_eq!(sources(&out.batch), vec![100, 101, 103, 104]);
    assert_eq!(out.dead_letters.len(), 1, "{:?}", out.dead_letters);
    let dead = out.dead_letters[0].clone();
    assert_eq!(dead.index, 2);
    assert_eq!(dead.event, input[2]);
    assert_eq!(dead.plugin, name);
    assert_eq!(dead.version, p.version());
    assert_eq!(dead.stage, "guard");
    assert!(stage.instance_mut().recycles() >= 1);

    // The next batch is served by a fresh instance.
    let next = marked(&["f", "g"]);
    let out = stage.process(&encode(&next)).expect("next batch");
    assert_eq!(events(&out.batch), next);
    assert!(out.dead_letters.is_empty());
    dead
}

#[test]
fn a_panicking_plugin_is_isolated() {
    let p = plugin("panic_on_mark");
    let dead = isolates_the_poison("panic_on_mark", Limits::default());
    assert_eq!(
        dead.error,
        format!(
            "plugin `panic_on_mark` {}: trapped: wasm trap: wasm `unreachable` instruction \
             executed (panicked at panic-on-mark/src/lib.rs:11:9: poison event at timestamp \
             2000)",
            p.version()
        )
    );
}

#[test]
fn a_looping_plugin_hits_its_deadline() {
    let p = plugin("loop_forever");
    let dead = isolates_the_poison("loop_forever", Limits::default());
    assert_eq!(
        dead.error,
        format!(
            "plugin `loop_forever` {}: exceeded its 100 ms deadline",
            p.version()
        )
    );
}

#[test]
fn a_deadline_is_configurable_per_stage() {
    let p = plugin("loop_forever");
    let limits = Limits {
        deadline: Duration::from_millis(20),
        ..Limits::default()
    };
    let mut instance = p
        .instantiate(StageConfig::new("fast").limits(limits))
        .expect("instance");
    let started = std::time::Instant::now();
    let e = instance
        .filter(&encode(&[Event::new("poison", 1)]))
        .expect_err("deadline");
    let took = started.elapsed();
    assert_eq!(
        e.to_string(),
        format!(
            "plugin `loop_forever` {}: exceeded its 20 ms deadline",
            p.version()
        )
    );
    assert!(took >= Duration::from_millis(20), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn an_allocating_plugin_hits_its_memory_cap() {
    let p = plugin("alloc_unbounded");
    // A deadline a loaded machine cannot reach first: the memory cap is what must stop it.
    let patient = Limits {
        deadline: Duration::from_secs(10),
        ..Limits::default()
    };
    let dead = isolates_the_poison("alloc_unbounded", patient.clone());
    assert_eq!(
        dead.error,
        format!(
            "plugin `alloc_unbounded` {}: memory cap of 64 MiB reached",
            p.version()
        )
    );
    let small = Limits {
        memory_bytes: 8 << 20,
        ..patient
    };
    let dead = isolates_the_poison("alloc_unbounded", small);
    assert_eq!(
        dead.error,
        format!(
            "plugin `alloc_unbounded` {}: memory cap of 8 MiB reached",
            p.version()
        )
    );
}

/// A runtime whose pool has room for two instances only.
fn two_slot_runtime() -> Runtime {
    Runtime::new(RuntimeConfig {
        max_instances: 2,
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

#[test]
fn traps_never_exhaust_the_pool() {
    // Many more traps than the pool has slots: every recycle returns its slot.
    let runtime = two_slot_runtime();
    let p = runtime.load_file(wasm("panic_on_mark")).expect("load");
    let mut instance = p.instantiate(StageConfig::new("t")).expect("instance");
    let poison = encode(&[Event::new("poison", 1)]);
    let fine = encode(&[Event::new("fine", 1)]);
    for _ in 0..10 {
        assert!(matches!(
            instance.filter(&poison),
            Err(PluginError::Trap { .. })
        ));
        assert_eq!(instance.filter(&fine).expect("fine").count(), 1);
    }
    assert_eq!(instance.recycles(), 10);
    // Two instances fit; a third does not, and says so.
    let _second = p.instantiate(StageConfig::new("t2")).expect("second");
    let e = p
        .instantiate(StageConfig::new("t3"))
        .expect_err("pool full");
    assert!(matches!(e, PluginError::Instantiate { .. }), "{e}");
}

fn bad_finish(limits: Limits) -> Stage {
    Stage::new(
        &plugin("bad_finish"),
        StageConfig::new("counts").limits(limits),
        Some("tumbling:1m".parse().expect("window")),
    )
    .expect("bad_finish")
}

/// What bad-finish emits for a window.
fn count(key: &str, end_ms: i64, n: u64) -> Event {
    Event::new(format!("count={n}"), end_ms - 1).with_key(key)
}

#[test]
fn an_aggregate_isolates_a_fold_that_traps() {
    let p = plugin("bad_finish");
    let mut stage = bad_finish(Limits::default());
    let input = vec![
        Event::new("x", 1_000).with_key("a"),
        Event::new("poison", 2_000).with_key("a"),
        Event::new("y", 3_000).with_key("b"),
    ];
    let out = stage.process(&encode(&input)).expect("the stage survives");
    assert_eq!(out.dead_letters.len(), 1, "{:?}", out.dead_letters);
    let dead = &out.dead_letters[0];
    assert_eq!(
        (dead.index, &dead.event, &dead.window),
        (1, &input[1], &None)
    );
    let prefix = format!(
        "plugin `bad_finish` {}: trapped: wasm trap: wasm `unreachable` instruction executed \
         (panicked at bad-finish/src/lib.rs:",
        p.version()
    );
    assert!(dead.error.starts_with(&prefix), "{}", dead.error);
    assert!(
        dead.error.ends_with(": poison event at timestamp 2000)"),
        "{}",
        dead.error
    );
    // The poison event was folded nowhere; the others were, once.
    let flushed = stage.flush().expect("flush");
    assert_eq!(
        events(&flushed.batch),
        vec![count("a", 60_000, 1), count("b", 60_000, 1)]
    );
}

#[test]
fn an_aggregate_isolates_a_fold_that_never_returns() {
    let p = plugin("bad_finish");
    let mut stage = bad_finish(Limits {
        deadline: Duration::from_millis(500),
        ..Limits::default()
    });
    let input = vec![
        Event::new("x", 1_000).with_key("a"),
        Event::new("forever", 2_000).with_key("a"),
        Event::new("y", 3_000).with_key("a"),
    ];
    let out = stage.process(&encode(&input)).expect("the stage survives");
    assert_eq!(out.dead_letters.len(), 1, "{:?}", out.dead_letters);
    assert_eq!(out.dead_letters[0].index, 1);
    assert_eq!(
        out.dead_letters[0].error,
        format!(
            "plugin `bad_finish` {}: exceeded its 500 ms deadline",
            p.version()
        )
    );
    let flushed = stage.flush().expect("flush");
    assert_eq!(events(&flushed.batch), vec![count("a", 60_000, 2)]);
}

#[test]
fn finish_isolation_dead_letters_only_the_failing_windows() {
    let p = plugin("bad_finish");
    let mut stage = bad_finish(Limits::default());
    let keys = ["refuse", "a", "poison", "b"];
    let input: Vec<Event> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| Event::new("x", 1_000 * i as i64).with_key(*key))
        .collect();
    stage.process(&encode(&input)).expect("fold");
    // An event at 61 s finishes the four windows [0, 60 s), in key order: a, b, poison, refuse.
    let out = stage
        .process(&encode(&[Event::new("x", 61_000).with_key("c")]))
        .expect("finish");
    assert_eq!(
        events(&out.batch),
        vec![count("a", 60_000, 1), count("b", 60_000, 1)]
    );
    assert_eq!(sources(&out.batch), vec![0, 1]);
    assert_eq!(out.dead_letters.len(), 2, "{:?}", out.dead_letters);
    let window = |key: &str| WindowId {
        key: Some(key.as_bytes().to_vec()),
        start_ms: 0,
        end_ms: 60_000,
    };

    let poison = &out.dead_letters[0];
    assert_eq!(poison.index, 2);
    assert_eq!(poison.window, Some(window("poison")));
    assert_eq!(poison.event.key.as_deref(), Some(&b"poison"[..]));
    assert_eq!(poison.event.timestamp_ms, 0);
    assert!(!poison.event.value.is_empty(), "the accumulator");
    assert!(
        poison.error.ends_with(": poison window starting at 0)"),
        "{}",
        poison.error
    );
    assert_eq!(
        (poison.plugin.as_str(), poison.stage.as_str()),
        ("bad_finish", "counts")
    );

    // The plugin said `window 0` (it saw the window alone); the dead letter says which.
    let refused = &out.dead_letters[1];
    assert_eq!(refused.index, 3);
    assert_eq!(refused.window, Some(window("refuse")));
    assert_eq!(
        refused.error,
        format!(
            "plugin `bad_finish` {}: finish failed: window 3: refused",
            p.version()
        )
    );
    // Finished and dead-lettered windows left the state; `c`'s is open.
    assert_eq!(stage.window_state().map(WindowState::open_windows), Some(1));
    // The same through a flush.
    let mut stage = bad_finish(Limits::default());
    stage.process(&encode(&input)).expect("fold");
    let flushed = stage.flush().expect("flush");
    assert_eq!(
        events(&flushed.batch),
        vec![count("a", 60_000, 1), count("b", 60_000, 1)]
    );
    let indices: Vec<usize> = flushed.dead_letters.iter().map(|d| d.index).collect();
    assert_eq!(indices, vec![2, 3]);
}

/// A JSON value of exactly `size` bytes that geo-enrich maps to France.
fn french(size: usize) -> String {
    let head = r#"{"country_code":"FR","pad":""#;
    let tail = r#""}"#;
    format!("{head}{}{tail}", "x".repeat(size - head.len() - tail.len()))
}

#[test]
fn an_enrich_that_hits_its_memory_cap_is_isolated() {
    let p = plugin("geo_enrich");
    // The memory cap, not a loaded machine's clock, must be what stops the big events.
    let limits = Limits {
        memory_bytes: 8 << 20,
        deadline: Duration::from_secs(10),
        ..Limits::default()
    };
    let config = StageConfig::new("geo")
        .with("table", serde_json::json!({"FR": "France"}))
        .limits(limits);
    let mut stage = stage("geo_enrich", config);
    let input = vec![
        Event::new(french(100), 1),
        Event::new(french(9 << 20), 2),
        Event::new(french(200), 3),
    ];
    let out = stage.process(&encode(&input)).expect("the stage survives");
    let fr = |e: &Event| e.clone().with_header("country", "France").with_route("fr");
    assert_eq!(events(&out.batch), vec![fr(&input[0]), fr(&input[2])]);
    assert_eq!(sources(&out.batch), vec![0, 2]);
    assert_eq!(out.dead_letters.len(), 1);
    assert_eq!(out.dead_letters[0].index, 1);
    assert_eq!(
        out.dead_letters[0].error,
        format!(
            "plugin `geo_enrich` {}: memory cap of 8 MiB reached",
            p.version()
        )
    );
}

#[test]
fn isolated_output_is_bounded_by_the_memory_limit() {
    let p = plugin("geo_enrich");
    // The memory cap, not a loaded machine's clock, must be what stops the big events.
    let limits = Limits {
        memory_bytes: 8 << 20,
        deadline: Duration::from_secs(10),
        ..Limits::default()
    };
    let config = StageConfig::new("geo")
        .with("table", serde_json::json!({"FR": "France"}))
        .limits(limits);
    let mut stage = stage("geo_enrich", config);
    // 20 events of 512 KiB: 10 MiB do not fit the instance, so the batch is retried event by
    // event; each output is a little over 512 KiB, so 15 of them fit in 8 MiB and the 16th
    // does not.
    let input: Vec<Event> = (0..20).map(|i| Event::new(french(512 << 10), i)).collect();
    let out = stage.process(&encode(&input)).expect("the stage survives");
    assert_eq!(events(&out.batch).len(), 15);
    assert_eq!(sources(&out.batch), (0..15).collect::<Vec<u32>>());
    let indices: Vec<usize> = out.dead_letters.iter().map(|d| d.index).collect();
    assert_eq!(indices, (15..20).collect::<Vec<usize>>());
    for dead in &out.dead_letters {
        assert_eq!(dead.event, input[dead.index]);
        assert_eq!(
            dead.error,
            format!(
                "plugin `geo_enrich` {}: output of the batch retried one by one exceeds the \
                 stage's memory limit of 8 MiB",
                p.version()
            )
        );
    }
}

#[test]
fn a_chain_hands_back_what_a_failed_stage_did_not_process() {
    // A pool of two: one instance per stage, none to spare.
    let runtime = two_slot_runtime();
    let sum = runtime.load_file(wasm("count_sum")).expect("count_sum");
    let guard = runtime
        .load_file(wasm("panic_on_mark"))
        .expect("panic_on_mark");
    let mut chain = Chain::new(vec![
        Stage::new(
            &sum,
            StageConfig::new("totals"),
            Some("tumbling:10s".parse().expect("window")),
        )
        .expect("aggregate"),
        Stage::new(&guard, StageConfig::new("guard"), None).expect("filter"),
    ]);
    let first = chain
        .process(&encode(&[
            amount("alice", 1_000, 10.0),
            amount("bob", 2_000, 5.0),
        ]))
        .expect("first batch");
    assert!(events(own(&first)).is_empty());

    // The guard's instance traps (freeing its pool slot) and another instance takes the slot:
    // the guard cannot run until it is given back.
    let trapped = chain.stages_mut()[1]
        .instance_mut()
        .filter(&encode(&[Event::new("poison", 1)]));
    assert!(
        matches!(trapped, Err(PluginError::Trap { .. })),
        "{trapped:?}"
    );
    let squatter = guard
        .instantiate(StageConfig::new("squatter"))
        .expect("the free slot");

    // dave at 12 s finishes [0, 10 s): the totals are made, then the guard fails.
    let e = chain
        .process(&encode(&[amount("dave", 12_000, 1.0)]))
        .expect_err("the guard cannot run");
    assert_eq!((e.stage, e.name.as_str()), (1, "guard"));
    assert!(matches!(e.error, PluginError::Instantiate { .. }), "{e}");
    assert!(
        e.to_string().starts_with(&format!(
            "stage `guard`: plugin `panic_on_mark` {}: cannot instantiate: ",
            guard.version()
        )),
        "{e}"
    );
    let totals = vec![
        total("alice", 0, 10_000, 1, "10.0"),
        total("bob", 0, 10_000, 1, "5.0"),
    ];
    // Nothing went through every stage; the totals are pending at the guard, and out of the
    // aggregate's state (resuming cannot count them twice).
    assert!(events(own(&e.output)).is_empty());
    assert!(e.output.dead_letters.is_empty() && e.output.late.is_empty());
    assert_eq!(events(&e.pending), totals);
    assert_eq!(
        chain.stages()[0]
            .window_state()
            .map(WindowState::open_windows),
        Some(1)
    );

    drop(squatter);
    let resumed = chain.resume(e.stage, &e.pending).expect("resume");
    // Only the guard ran, and kept every event: the pending batch itself.
    assert_eq!(resumed.events.batch, None);
    assert_eq!(events(&resumed.events.to_batch(&e.pending)), totals);
    let flushed = chain.flush().expect("flush");
    assert_eq!(
        events(own(&flushed)),
        vec![total("dave", 10_000, 20_000, 1, "1.0")]
    );
}

#[test]
fn a_flush_without_an_instance_keeps_every_window() {
    let runtime = Runtime::new(RuntimeConfig {
        max_instances: 1,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let p = runtime.load_file(wasm("bad_finish")).expect("bad_finish");
    let mut stage = Stage::new(
        &p,
        StageConfig::new("counts"),
        Some("tumbling:1m".parse().expect("window")),
    )
    .expect("stage");
    stage
        .process(&encode(&[
            Event::new("x", 1_000).with_key("a"),
            Event::new("x", 2_000).with_key("b"),
        ]))
        .expect("fold");
    // Kill the stage's instance with a raw call, and take its pool slot.
    let group = Group {
        window: Window {
            key: None,
            start_ms: 0,
            end_ms: 60_000,
            acc: None,
        },
        events: vec![0],
    };
    let trapped = stage
        .instance_mut()
        .fold(&encode(&[Event::new("poison", 1)]), &[group]);
    assert!(
        matches!(trapped, Err(PluginError::Trap { .. })),
        "{trapped:?}"
    );
    let squatter = p.instantiate(StageConfig::new("squatter")).expect("slot");

    let e = stage.flush().expect_err("no instance to finish with");
    assert!(matches!(e, PluginError::Instantiate { .. }), "{e}");
    assert_eq!(stage.window_state().map(WindowState::open_windows), Some(2));
    drop(squatter);
    let flushed = stage.flush().expect("flush");
    assert_eq!(
        events(&flushed.batch),
        vec![count("a", 60_000, 1), count("b", 60_000, 1)]
    );
}

// ---------------------------------------------------------------------------------------------
// The guest's log

/// Captured events: (level, target, fields).
type Lines = Vec<(tracing::Level, String, Vec<(String, String)>)>;

/// A tracing layer that keeps every event.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Lines>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields(Vec<(String, String)>);
        impl tracing::field::Visit for Fields {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                self.0.push((field.name().to_owned(), value.to_owned()));
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push((field.name().to_owned(), format!("{value:?}")));
            }
        }
        let mut fields = Fields(Vec::new());
        event.record(&mut fields);
        let meta = event.metadata();
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push((
            *meta.level(),
            meta.target().to_owned(),
            fields.0,
        ));
    }
}

#[test]
fn guest_logs_are_tagged_with_plugin_version_and_stage() {
    use tracing_subscriber::layer::SubscriberExt;
    let p = plugin("panic_on_mark");
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    tracing::subscriber::with_default(subscriber, || {
        let mut instance = p.instantiate(StageConfig::new("loud")).expect("instance");
        let poison = encode(&[Event::new("poison", 7)]);
        assert!(instance.filter(&poison).is_err());
    });
    let lines = capture.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let field = |fields: &[(String, String)], name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let panic = lines
        .iter()
        .find(|(_, target, fields)| {
            target == "weir::plugin" && field(fields, "message").starts_with("panicked at ")
        })
        .unwrap_or_else(|| panic!("no panic line in {lines:?}"));
    assert_eq!(panic.0, tracing::Level::ERROR);
    assert_eq!(field(&panic.2, "plugin"), "panic_on_mark");
    assert_eq!(field(&panic.2, "version"), p.version());
    assert_eq!(field(&panic.2, "stage"), "loud");
    assert!(
        field(&panic.2, "message").ends_with(": poison event at timestamp 7"),
        "{panic:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Instances and limits

#[test]
fn instances_are_recycled_after_max_calls() {
    let limits = Limits {
        max_calls_per_instance: 2,
        ..Limits::default()
    };
    let mut instance = plugin("drop_bots")
        .instantiate(StageConfig::new("bots").limits(limits))
        .expect("instance");
    let batch = encode(&[visit(Some("curl"), 1)]);
    for _ in 0..5 {
        assert_eq!(instance.filter(&batch).expect("filter").count(), 1);
    }
    // Calls 1-2 on the first instance, 3-4 on the second, 5 on the third.
    assert_eq!(instance.recycles(), 2);
    assert_eq!(instance.calls(), 1);
}

#[test]
fn calls_of_another_kind_and_bad_input_are_errors() {
    let p = plugin("drop_bots");
    let mut instance = p.instantiate(StageConfig::new("bots")).expect("instance");
    let batch = encode(&[visit(None, 1)]);
    let e = instance.enrich(&batch).expect_err("not an enrich");
    assert_eq!(
        e.to_string(),
        format!(
            "plugin `drop_bots` {}: is a filter plugin and has no `enrich`",
            p.version()
        )
    );
    let e = instance.filter(b"junk").expect_err("not a batch");
    assert_eq!(
        e.to_string(),
        format!(
            "plugin `drop_bots` {}: input is not a weir batch: not a weir batch: missing the \
             `WEIR` file identifier (4 bytes)",
            p.version()
        )
    );
}

#[test]
fn stage_configs_are_checked() {
    let p = plugin("drop_bots");
    let e = p
        .instantiate(StageConfig::new("big").limits(Limits {
            memory_bytes: 1 << 30,
            ..Limits::default()
        }))
        .expect_err("over the ceiling");
    assert_eq!(
        e.to_string(),
        format!(
            "plugin `drop_bots` {}: stage `big`: memory limit of 1 GiB exceeds the runtime's \
             ceiling of 256 MiB",
            p.version()
        )
    );
    let sum = plugin("count_sum");
    let e = Stage::new(&sum, StageConfig::new("totals"), None).expect_err("needs a window");
    assert_eq!(
        e.to_string(),
        format!(
            "plugin `count_sum` {}: stage `totals`: an aggregate stage needs a window (e.g. \
             `tumbling:60s`)",
            sum.version()
        )
    );
    let e = Stage::new(
        &p,
        StageConfig::new("bots"),
        Some("tumbling:1m".parse().expect("window")),
    )
    .expect_err("a filter takes no window");
    assert_eq!(
        e.to_string(),
        format!(
            "plugin `drop_bots` {}: stage `bots`: a filter stage takes no window (only \
             aggregates do)",
            p.version()
        )
    );
    // A window config built in code is checked as a parsed one would be.
    let slide_too_long = WindowConfig {
        kind: WindowKind::Sliding {
            size_ms: 10,
            slide_ms: 60_000,
        },
        lateness_ms: 0,
    };
    let e = Stage::new(&sum, StageConfig::new("totals"), Some(slide_too_long))
        .expect_err("slide longer than the window");
    assert_eq!(
        e.to_string(),
        format!(
            "plugin `count_sum` {}: stage `totals`: bad window `sliding:10ms/1m`: the slide (1m) \
             is longer than the window (10ms): some events would be in no window",
            sum.version()
        )
    );
    let too_many = WindowConfig {
        kind: WindowKind::Sliding {
            size_ms: 86_400_000,
            slide_ms: 1,
        },
        lateness_ms: 0,
    };
    let e = Stage::new(&sum, StageConfig::new("totals"), Some(too_many))
        .expect_err("86.4 million windows per event");
    assert!(e.to_string().contains("the cap is 1000"), "{e}");
    let zero = WindowConfig::tumbling(Duration::from_micros(10));
    let e = Stage::new(&sum, StageConfig::new("totals"), Some(zero)).expect_err("zero size");
    assert!(
        e.to_string()
            .ends_with("bad window `tumbling:0ms`: the window size must be longer than zero"),
        "{e}"
    );
    // Nor can restored state bring in a bad config.
    let mut totals = count_sum("tumbling:1m");
    let e = totals
        .replace_window_state(WindowState::new(too_many))
        .expect_err("bad config in the state");
    assert!(e.to_string().contains("the cap is 1000"), "{e}");
}

#[test]
fn a_deadline_longer_than_any_process_is_no_overflow() {
    let limits = Limits {
        deadline: Duration::MAX,
        ..Limits::default()
    };
    // Let the epoch move past zero: wasmtime adds the deadline to it.
    std::thread::sleep(Duration::from_millis(20));
    let mut instance = plugin("drop_bots")
        .instantiate(StageConfig::new("patient").limits(limits))
        .expect("instance");
    let batch = encode(&[visit(Some("curl"), 1)]);
    assert_eq!(instance.filter(&batch).expect("filter").count(), 1);
}

#[test]
fn fold_verifies_its_input() {
    let p = plugin("count_sum");
    let mut instance = p.instantiate(StageConfig::new("totals")).expect("instance");
    let e = instance.fold(b"junk", &[]).expect_err("not a batch");
    assert!(matches!(e, PluginError::BadInput { .. }), "{e}");
    let group = |events: Vec<u32>| Group {
        window: Window {
            key: None,
            start_ms: 0,
            end_ms: 10,
            acc: None,
        },
        events,
    };
    let batch = encode(&[amount("a", 1, 1.0), amount("a", 2, 2.0)]);
    let e = instance
        .fold(&batch, &[group(vec![0]), group(vec![1, 2])])
        .expect_err("event 2 of 2");
    assert_eq!(
        e.to_string(),
        format!(
            "plugin `count_sum` {}: fold input: group 1 names event 2 of a batch of 2",
            p.version()
        )
    );
    let accs = instance
        .fold(&batch, &[group(vec![0, 1])])
        .expect("a good fold");
    assert_eq!(accs.len(), 1);
}

#[test]
fn the_types_are_shareable_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Runtime>();
    send_sync::<Plugin>();
    send::<Stage>();
    send::<Chain>();
}

#[test]
fn the_compile_cache_serves_a_second_load_and_rebuilds_a_broken_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = RuntimeConfig {
        max_instances: 2,
        cache_dir: Some(dir.path().join("compiled")),
        ..RuntimeConfig::default()
    };
    let load = || {
        let runtime = Runtime::new(config.clone()).expect("runtime");
        let plugin = runtime.load_file(wasm("drop_bots")).expect("drop_bots");
        // Whatever it was loaded from, it runs.
        let mut stage = Stage::new(&plugin, StageConfig::new("bots"), None).expect("stage");
        let out = stage
            .process(&encode(&[
                Event::new("a", 1).with_header("user-agent", "curl/8"),
                Event::new("b", 2).with_header("user-agent", "Googlebot/2.1"),
            ]))
            .expect("a batch");
        assert_eq!(
            events(&out.batch),
            vec![Event::new("a", 1).with_header("user-agent", "curl/8")]
        );
        plugin.from_cache()
    };
    assert!(!load(), "the first load compiles");
    assert!(load(), "the second load is served from the cache");
    let entries: Vec<PathBuf> = std::fs::read_dir(dir.path().join("compiled"))
        .expect("the cache directory")
        .map(|e| e.expect("an entry").path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = &entries[0];
    let name = entry
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let digest = weir::runtime::Digest::of(&std::fs::read(wasm("drop_bots")).expect("wasm"));
    assert!(
        name.starts_with(&format!("{}-", digest.hex())) && name.ends_with(".cwasm"),
        "{name}"
    );

    // One flipped byte deep in the artifact: detected, compiled again, rewritten.
    let mut bytes = std::fs::read(entry).expect("the entry");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(entry, &bytes).expect("corrupt the entry");
    assert!(!load(), "a corrupted entry is never used");
    assert!(load(), "and it was rewritten");

    // A torn entry (a crash while writing) likewise.
    std::fs::write(entry, b"weir-cw").expect("tear the entry");
    assert!(!load());
    assert!(load());
}
