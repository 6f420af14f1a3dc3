//! The diff of two configs, from config text: every kind of change, and what is printed.

use super::*;

const BASE: &str = r#"
[listener]
listen = "127.0.0.1:4433"
data_dir = "data"

[auth]
anonymous = true

[pipelines.clicks]
sinks = [{ sink = "out", route = ["us"] }, { sink = "eu", route = ["fr"] }]
unmatched = "drop"

[[pipelines.clicks.stages]]
plugin = "example:drop-bots"

[[pipelines.clicks.stages]]
plugin = "example:geo-enrich"
with = { table = { FR = "France" } }

[pipelines.totals]
sinks = ["out"]

[[pipelines.totals.stages]]
plugin = "example:count-sum"
window = "tumbling:1m"

[sinks.out]
type = "file"
path = "out.jsonl"

[sinks.eu]
type = "http"
url = "http://127.0.0.1:9/in"
"#;

fn config(text: &str) -> Config {
    Config::parse(text, "weir.toml").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// The diff from [`BASE`] to `text`, no plugin file changed on disk.
fn diff(text: &str) -> ConfigDiff {
    ConfigDiff::new(&config(BASE), &config(text), |_, _| false)
}

fn edit(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from}");
    BASE.replacen(from, to, 1)
}

#[test]
fn the_same_config_changes_nothing() {
    let d = diff(BASE);
    assert!(d.is_empty());
    assert_eq!(d.to_string(), "no changes\n");
}

#[test]
fn sinks_are_added_removed_changed_in_place_or_replaced() {
    let text = edit(
        "sinks = [\"out\"]\n\n[[pipelines.totals",
        "sinks = [\"archive\"]\n\n[[pipelines.totals",
    )
    .replace(
        "path = \"out.jsonl\"",
        "path = \"out.jsonl\"\n\n[sinks.archive]\ntype = \"null\"",
    );
    assert_eq!(
        diff(&text).sinks,
        [SinkChange::Added("archive".into())],
        "`out` is still used by clicks"
    );
    let text = edit(
        "sinks = [{ sink = \"out\", route = [\"us\"] }, { sink = \"eu\", route = [\"fr\"] }]",
        "sinks = [{ sink = \"out\", route = [\"us\"] }]",
    )
    .replace(
        "\n[sinks.eu]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/in\"\n",
        "",
    );
    let d = diff(&text);
    assert_eq!(d.sinks, [SinkChange::Removed("eu".into())]);
    assert_eq!(
        d.pipelines,
        [PipelineChange::Changed {
            name: "clicks".into(),
            stages: Vec::new(),
            outputs: true,
            producers: false,
        }]
    );
    let d = diff(&edit(
        "url = \"http://127.0.0.1:9/in\"",
        "url = \"http://127.0.0.1:10/in\"\nbuffer_events = 5",
    ));
    assert_eq!(d.sinks, [SinkChange::Reconfigured("eu".into())]);
    assert!(d.pipelines.is_empty(), "its pipelines do not notice");
    let d = diff(&edit(
        "url = \"http://127.0.0.1:9/in\"",
        "url = \"http://127.0.0.1:9/in\"\nwhen_full = \"spill\"",
    ));
    assert_eq!(d.sinks, [SinkChange::Replaced("eu".into())]);
    assert_eq!(
        d.pipelines,
        [PipelineChange::Changed {
            name: "clicks".into(),
            stages: Vec::new(),
            outputs: true,
            producers: false,
        }],
        "the pipeline writing to it gets new outputs"
    );
}

#[test]
fn pipelines_are_added_removed_or_changed_in_the_smallest_way() {
    let added = format!("{BASE}\n[pipelines.more]\nsinks = [\"out\"]\n");
    assert_eq!(
        diff(&added).pipelines,
        [PipelineChange::Added("more".into())]
    );
    let removed = ConfigDiff::new(&config(&added), &config(BASE), |_, _| false);
    assert_eq!(removed.pipelines, [PipelineChange::Removed("more".into())]);

    let d = diff(&edit(
        "{ FR = \"France\" }",
        "{ FR = \"France\", DE = \"Germany\" }",
    ));
    assert_eq!(
        d.pipelines,
        [PipelineChange::Changed {
            name: "clicks".into(),
            stages: vec![StageChange {
                stage: "geo-enrich".into(),
                what: vec!["with"],
            }],
            outputs: false,
            producers: false,
        }]
    );
    let d = diff(&edit(
        "plugin = \"example:geo-enrich\"",
        "plugin = \"example:geo-enrich\"\nname = \"geo-enrich\"\nmemory_mib = 32",
    ));
    assert_eq!(
        d.pipelines[0],
        PipelineChange::Changed {
            name: "clicks".into(),
            stages: vec![StageChange {
                stage: "geo-enrich".into(),
                what: vec!["limits"],
            }],
            outputs: false,
            producers: false,
        }
    );
    // The same path, another file: the caller says the plugin changed.
    let d = ConfigDiff::new(&config(BASE), &config(BASE), |p, s| {
        p == "totals" && s.name == "count-sum"
    });
    assert_eq!(
        d.to_string(),
        "pipeline `totals`: stage `count-sum` swapped (plugin)\n"
    );
    let d = diff(&edit("route = [\"fr\"]", "route = [\"fr\", \"de\"]"));
    assert_eq!(d.to_string(), "pipeline `clicks`: new outputs\n");
    let d = diff(&edit(
        "[pipelines.totals]\n",
        "[pipelines.totals]\nproducers = [\"sensor-7\"]\nversion_header = \"weir-versions\"\n",
    ));
    assert_eq!(
        d.to_string(),
        "pipeline `totals`: new outputs; new producer list\n"
    );
}

#[test]
fn a_change_in_the_shape_of_the_stages_restarts_the_pipeline() {
    let d = diff(&edit(
        "[[pipelines.clicks.stages]]\nplugin = \"example:drop-bots\"\n\n",
        "",
    ));
    assert_eq!(
        d.to_string(),
        "pipeline `clicks`: restarted (stages drop-bots, geo-enrich → geo-enrich)\n"
    );
    let d = diff(&edit(
        "plugin = \"example:drop-bots\"",
        "plugin = \"example:drop-bots\"\nname = \"bots\"",
    ));
    assert_eq!(
        d.to_string(),
        "pipeline `clicks`: restarted (stages drop-bots, geo-enrich → bots, geo-enrich)\n"
    );
    let d = diff(&edit(
        "window = \"tumbling:1m\"",
        "window = \"tumbling:5m\"",
    ));
    assert_eq!(
        d.to_string(),
        "pipeline `totals`: restarted (stage `count-sum`: another window)\n"
    );
    let workers = |n: usize| {
        config(&edit(
            "[pipelines.totals]\n",
            &format!("[pipelines.totals]\nworkers = {n}\n"),
        ))
    };
    let d = ConfigDiff::new(&workers(1), &workers(3), |_, _| false);
    assert_eq!(
        d.to_string(),
        "pipeline `totals`: restarted (workers 1 → 3)\n"
    );
}

#[test]
fn what_cannot_change_live_is_reported_and_left_alone() {
    let text = edit("listen = \"127.0.0.1:4433\"", "listen = \"127.0.0.1:4434\"")
        .replace("[auth]\nanonymous = true", "[auth]\nanonymous = false\n\n[limits]\nmax_in_flight = 8\n\n[metrics]\nlisten = \"127.0.0.1:9464\"");
    let d = diff(&text);
    assert_eq!(
        d.to_string(),
        "producers: new tokens or `anonymous` (for new connections)\n\
         needs a restart, not applied: [listener] listen: 127.0.0.1:4433 → 127.0.0.1:4434\n\
         needs a restart, not applied: [limits]: the limits → others\n\
         needs a restart, not applied: [metrics] listen: none → 127.0.0.1:9464\n"
    );
}

#[test]
fn sources_are_reported_added_removed_or_changed_and_left_alone() {
    let source = |name: &str, group: &str| {
        format!(
            "\n[sources.{name}]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\ntopic = \"t\"\ngroup = \"{group}\"\npipeline = \"totals\"\n"
        )
    };
    let old = config(&(BASE.to_owned() + &source("a", "g") + &source("b", "g")));
    let new = config(&(BASE.to_owned() + &source("b", "h") + &source("c", "g")));
    let d = ConfigDiff::new(&old, &new, |_, _| false);
    assert_eq!(
        d.to_string(),
        "needs a restart, not applied: [sources.a]: removed\n\
         needs a restart, not applied: [sources.b]: changed\n\
         needs a restart, not applied: [sources.c]: added\n"
    );
}
