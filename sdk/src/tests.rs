//! Unit tests of the SDK's pure parts: config, errors, emitter, batch loops, accumulators.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use crate::aggregate::{decode_acc, encode_acc};
use crate::runtime::{enrich_batch, filter_batch, finish_windows, fold_groups};
use crate::testing;
use crate::{
    Aggregate, Config, Context, Emitter, Error, Event, NoConfig, OwnedEvent, Result, Window,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use weir_format::Batch;

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct GeoConfig {
    field: String,
    table: BTreeMap<String, String>,
    #[serde(default)]
    default: Option<String>,
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse<C: serde::de::DeserializeOwned>(p: &[(&str, &str)]) -> Result<C> {
    Config::from_pairs(pairs(p))?.parse()
}

#[test]
fn config_builds_a_struct_from_json_pairs() {
    let cfg: GeoConfig = parse(&[
        ("field", r#""country_code""#),
        ("table", r#"{"US":"United States","FR":"France"}"#),
    ])
    .unwrap();
    assert_eq!(cfg.field, "country_code");
    assert_eq!(cfg.table["FR"], "France");
    assert_eq!(cfg.default, None);
}

#[test]
fn config_errors_name_the_problem() {
    let err = parse::<GeoConfig>(&[("field", r#""x""#)]).unwrap_err();
    assert_eq!(err.message(), "config: missing field `table`");

    let err = parse::<GeoConfig>(&[("field", r#""x""#), ("table", r#"{"US":5}"#)]).unwrap_err();
    assert_eq!(
        err.message(),
        "config: table.US: invalid type: integer `5`, expected a string"
    );

    let err = parse::<GeoConfig>(&[("field", "not json")]).unwrap_err();
    assert!(
        err.message().starts_with("config: `field` is not JSON: "),
        "{err}"
    );

    let err = parse::<GeoConfig>(&[("feild", r#""x""#)]).unwrap_err();
    assert_eq!(
        err.message(),
        "config: feild: unknown field `feild`, expected one of `field`, `table`, `default`"
    );
}

#[test]
fn no_config_accepts_anything() {
    let NoConfig = parse::<NoConfig>(&[]).unwrap();
    let NoConfig = parse::<NoConfig>(&[("anything", "[1,2]")]).unwrap();
}

#[test]
fn config_by_key() {
    let cfg = Config::from_pairs(pairs(&[
        ("limit", "5"),
        ("name", r#""n""#),
        ("none", "null"),
    ]))
    .unwrap();
    assert_eq!(cfg.get::<u32>("limit").unwrap(), Some(5));
    assert_eq!(cfg.get::<u32>("missing").unwrap(), None);
    assert_eq!(cfg.get::<u32>("none").unwrap(), None);
    assert_eq!(cfg.require::<String>("name").unwrap(), "n");
    assert_eq!(
        cfg.require::<u32>("missing").unwrap_err().message(),
        "config: missing key `missing`"
    );
    assert_eq!(
        cfg.get::<u32>("name").unwrap_err().message(),
        "config: `name`: invalid type: string \"n\", expected u32"
    );
    assert!(cfg.contains("none"));
    assert_eq!(cfg.keys().collect::<Vec<_>>(), ["limit", "name", "none"]);
    // `Config` is itself a config type.
    let again: Config = cfg.parse().unwrap();
    assert_eq!(again, cfg);
}

#[test]
fn testing_config_goes_through_the_init_path() {
    let cfg: GeoConfig =
        testing::config(r#"{"field": "cc", "table": {"US": "United States"}}"#).unwrap();
    assert_eq!(cfg.table["US"], "United States");
    let err = testing::config::<GeoConfig>("{}").unwrap_err();
    assert_eq!(err.message(), "config: missing field `field`");
}

#[test]
fn init_sets_the_config_once() {
    let cell = crate::runtime::ConfigCell::<GeoConfig>::new();
    let buf = testing::batch(&[]);
    let batch = Batch::verify(&buf).unwrap();
    let err = crate::runtime::filter(&cell, batch, |_, _| true).unwrap_err();
    assert_eq!(
        err,
        "plugin not initialised: the host must call `init` first"
    );
    let err = crate::runtime::init(&cell, pairs(&[("field", r#""x""#)])).unwrap_err();
    assert_eq!(err, "config: missing field `table`");
    let good = pairs(&[("field", r#""x""#), ("table", "{}")]);
    crate::runtime::init(&cell, good.clone()).unwrap();
    assert_eq!(
        crate::runtime::filter(&cell, batch, |_, _| true).unwrap(),
        Vec::<u8>::new()
    );
    let err = crate::runtime::init(&cell, good).unwrap_err();
    assert_eq!(err, "plugin already initialised: `init` was called twice");
}

#[test]
fn errors_convert_and_take_context() {
    fn parse_number(s: &str) -> Result<u32> {
        Ok(s.parse::<u32>()?)
    }
    assert_eq!(
        parse_number("x").unwrap_err().message(),
        "invalid digit found in string"
    );
    let err = parse_number("x").context("field `n`").unwrap_err();
    assert_eq!(err.message(), "field `n`: invalid digit found in string");
    let err = None::<u8>.context("no country code").unwrap_err();
    assert_eq!(err.to_string(), "no country code");
    assert_eq!(Error::new("a").context("b").message(), "b: a");
    let s: String = Error::new("m").into();
    assert_eq!(s, "m");
}

fn sample(n: usize) -> Vec<OwnedEvent> {
    (0..n)
        .map(|i| {
            OwnedEvent::new(format!(r#"{{"n":{i}}}"#), 1000 + i as i64)
                .with_key(format!("k{}", i % 2))
                .with_header("h", format!("{i}"))
        })
        .collect()
}

#[test]
fn event_view_reads_every_field() {
    let owned = OwnedEvent::new(r#"{"a":"x","n":3}"#, 42)
        .with_key("k")
        .add_header("h", "1")
        .add_header("h", "2")
        .with_route("eu");
    testing::with_event(&owned, |e| {
        assert_eq!(e.key(), Some(&b"k"[..]));
        assert_eq!(e.key_str(), Some("k"));
        assert_eq!(e.value_str().unwrap(), r#"{"a":"x","n":3}"#);
        assert_eq!(e.timestamp_ms(), 42);
        assert_eq!(e.header("h"), Some(&b"1"[..]));
        assert_eq!(e.header_str("missing"), None);
        assert_eq!(e.headers().count(), 2);
        assert_eq!(e.route(), Some("eu"));
        #[derive(Deserialize)]
        struct V<'a> {
            a: &'a str,
            n: u32,
        }
        let v: V<'_> = e.json().unwrap();
        assert_eq!((v.a, v.n), ("x", 3));
        let err = e.json::<Vec<u8>>().unwrap_err();
        assert!(
            err.message().starts_with("value: invalid type: map"),
            "{err}"
        );
        assert_eq!(e.to_owned(), owned);
    });
}

#[test]
fn owned_event_header_semantics() {
    let e = OwnedEvent::new("v", 0)
        .add_header("a", "1")
        .add_header("b", "2")
        .add_header("a", "3")
        .with_header("a", "x");
    assert_eq!(
        e.headers,
        [
            ("a".to_owned(), b"x".to_vec()),
            ("b".to_owned(), b"2".to_vec())
        ]
    );
    let e = e.with_header("c", "y").without_header("b");
    assert_eq!(
        e.headers,
        [
            ("a".to_owned(), b"x".to_vec()),
            ("c".to_owned(), b"y".to_vec())
        ]
    );
    assert_eq!(e.header("c"), Some(&b"y"[..]));
    let e = e
        .with_key("k")
        .without_key()
        .with_route("r")
        .without_route();
    assert_eq!((e.key, e.route), (None, None));
}

#[test]
fn filter_sets_one_bit_per_kept_event() {
    let events = sample(11);
    let buf = testing::batch(&events);
    let batch = Batch::verify(&buf).unwrap();
    let bits = filter_batch(batch, |e| e.timestamp_ms() % 3 == 0).unwrap();
    // Kept: 1002, 1005, 1008 → indices 2, 5, 8.
    assert_eq!(bits, [0b0010_0100, 0b0000_0001]);
    let kept = testing::filter(&events, |e| e.timestamp_ms() % 3 == 0).unwrap();
    assert_eq!(
        kept,
        [events[2].clone(), events[5].clone(), events[8].clone()]
    );
}

#[test]
fn filter_error_names_the_event() {
    let events = sample(5);
    let err = testing::filter(&events, |e| -> Result<bool> {
        if e.timestamp_ms() == 1003 {
            return Err(Error::new("bad event"));
        }
        Ok(true)
    })
    .unwrap_err();
    assert_eq!(err.message(), "event 3: bad event");
}

#[test]
fn enrich_outputs_carry_their_source() {
    let events = sample(4);
    let buf = testing::batch(&events);
    let out = enrich_batch(Batch::verify(&buf).unwrap(), |e, out: &mut Emitter| {
        // Event 0: dropped; 1: passed; 2: edited; 3: two owned events.
        match e.timestamp_ms() - 1000 {
            0 => {}
            1 => out.pass(e),
            2 => out
                .edit(e)
                .with_header("h", "changed")
                .add_header("extra", "1")
                .with_key("new")
                .with_route("r2")
                .emit(),
            _ => {
                out.emit(OwnedEvent::new("a", 1));
                out.emit(e.to_owned().with_value("b").without_key());
            }
        }
    })
    .unwrap();
    let out = testing::decode(&out).unwrap();
    let sources: Vec<u32> = out.iter().map(|(s, _)| *s).collect();
    assert_eq!(sources, [1, 2, 3, 3]);
    assert_eq!(out[0].1, events[1]);
    assert_eq!(
        out[1].1,
        events[2]
            .clone()
            .with_header("h", "changed")
            .add_header("extra", "1")
            .with_key("new")
            .with_route("r2")
    );
    assert_eq!(out[2].1, OwnedEvent::new("a", 1));
    assert_eq!(out[3].1, events[3].clone().with_value("b").without_key());
}

#[test]
fn enrich_edit_removes_headers_and_keeps_the_rest() {
    let events = [OwnedEvent::new("v", 5)
        .with_key("k")
        .add_header("a", "1")
        .add_header("b", "2")
        .with_route("r")];
    let out = testing::enrich(&events, |e, out| {
        out.edit(e).without_header("a").without_route().emit();
        out.edit(e).with_timestamp_ms(9).without_key().emit();
    })
    .unwrap();
    assert_eq!(
        out,
        [
            OwnedEvent::new("v", 5).with_key("k").add_header("b", "2"),
            events[0].clone().with_timestamp_ms(9).without_key(),
        ]
    );
}

#[test]
fn enrich_error_names_the_event_and_leaves_nothing_behind() {
    let events = sample(3);
    let err = testing::enrich(&events, |e, out| -> Result<()> {
        out.pass(e);
        if e.timestamp_ms() == 1001 {
            e.json::<Vec<u8>>()?;
        }
        Ok(())
    })
    .unwrap_err();
    assert!(
        err.message().starts_with("event 1: value: invalid type"),
        "{err}"
    );
    // The next call starts from an empty output.
    let out = testing::enrich(&events[..1], |e, out| out.pass(e)).unwrap();
    assert_eq!(out, [events[0].clone()]);
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct CountSum {
    count: u64,
    sum: f64,
}

#[derive(Deserialize)]
struct SumConfig {
    field: String,
}

impl Aggregate for CountSum {
    type Config = SumConfig;

    fn fold(&mut self, e: &Event<'_>, cfg: &SumConfig) -> Result<()> {
        let v: serde_json::Value = e.json()?;
        self.count += 1;
        self.sum += v[&cfg.field].as_f64().context("not a number")?;
        Ok(())
    }

    fn finish(self, w: &Window, out: &mut Emitter, _: &SumConfig) -> Result<()> {
        let value = serde_json::json!({"count": self.count, "sum": self.sum});
        let mut e = OwnedEvent::json(&value, w.end_ms - 1)?;
        e.key = w.key.clone();
        out.emit(e);
        Ok(())
    }
}

#[test]
fn accumulator_round_trips_through_bytes() {
    let acc = CountSum { count: 3, sum: 4.5 };
    let bytes = encode_acc(&acc).unwrap();
    assert_eq!(decode_acc::<CountSum>(Some(&bytes)).unwrap(), acc);
    assert_eq!(decode_acc::<CountSum>(None).unwrap(), CountSum::default());
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(
        decode_acc::<CountSum>(Some(&long)).unwrap_err().message(),
        "accumulator does not decode: 1 trailing bytes"
    );
    assert!(decode_acc::<CountSum>(Some(&[0xff])).is_err());
}

#[test]
fn fold_and_finish_follow_the_host_protocol() {
    let cfg = SumConfig { field: "n".into() };
    let events = sample(6);
    let buf = testing::batch(&events);
    let batch = Batch::verify(&buf).unwrap();
    // Two groups: even events (fresh window) and odd events (window already folded once).
    let prior = encode_acc(&CountSum {
        count: 1,
        sum: 100.0,
    })
    .unwrap();
    let accs = fold_groups::<CountSum>(
        batch,
        [(None, vec![0, 2, 4]), (Some(prior), vec![1, 3, 5])],
        &cfg,
    )
    .unwrap();
    let even = decode_acc::<CountSum>(Some(&accs[0])).unwrap();
    let odd = decode_acc::<CountSum>(Some(&accs[1])).unwrap();
    assert_eq!((even.count, even.sum), (3, 6.0));
    assert_eq!((odd.count, odd.sum), (4, 109.0));

    let err = fold_groups::<CountSum>(batch, [(None, vec![0]), (None, vec![6])], &cfg).unwrap_err();
    assert_eq!(
        err.message(),
        "group 1: event index 6 out of a batch of 6 events"
    );

    let windows = [
        (
            Window::new(Some(b"k0".to_vec()), 0, 60_000),
            Some(accs[0].clone()),
        ),
        (Window::new(None, 0, 60_000), None),
        (
            Window::new(Some(b"k1".to_vec()), 0, 60_000),
            Some(accs[1].clone()),
        ),
    ];
    let out = finish_windows::<CountSum>(windows, &cfg).unwrap();
    let out = testing::decode(&out).unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!(out[0].0, 0);
    assert_eq!(out[0].1.key.as_deref(), Some(&b"k0"[..]));
    assert_eq!(out[0].1.value_str().unwrap(), r#"{"count":3,"sum":6.0}"#);
    assert_eq!(out[0].1.timestamp_ms, 59_999);
    assert_eq!((out[1].0, out[1].1.key.as_deref()), (1, None));
    assert_eq!(out[1].1.value_str().unwrap(), r#"{"count":0,"sum":0.0}"#);
    assert_eq!(out[2].0, 2);
}

#[test]
fn fold_error_names_group_and_event() {
    let cfg = SumConfig {
        field: "missing".into(),
    };
    let events = sample(2);
    let out = testing::aggregate::<CountSum>(&events, &Window::new(None, 0, 10), &cfg);
    assert_eq!(out.unwrap_err().message(), "event 0: not a number");
}

#[test]
fn testing_aggregate_folds_through_bytes() {
    let cfg = SumConfig { field: "n".into() };
    let window = Window::new(Some(b"k".to_vec()), 1000, 2000);
    let out = testing::aggregate::<CountSum>(&sample(4), &window, &cfg).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].value_str().unwrap(), r#"{"count":4,"sum":6.0}"#);
    assert_eq!(out[0].key.as_deref(), Some(&b"k"[..]));
    assert_eq!(out[0].timestamp_ms, 1999);
    assert_eq!(window.key_str(), Some("k"));
}

/// A header change, applied to an `OwnedEvent` and to an `Edit` alike.
#[derive(Clone, Copy, Debug)]
enum Change {
    Set(&'static str, &'static str),
    Add(&'static str, &'static str),
    Remove(&'static str),
}

#[test]
fn edit_header_changes_mean_what_they_mean_on_owned_events() {
    const CHANGES: [Change; 7] = [
        Change::Set("a", "x"),
        Change::Set("b", "y"),
        Change::Set("c", "z"),
        Change::Add("a", "w"),
        Change::Add("c", "v"),
        Change::Remove("a"),
        Change::Remove("c"),
    ];
    let input = OwnedEvent::new("v", 1)
        .add_header("a", "1")
        .add_header("b", "2")
        .add_header("a", "3");
    // Every sequence of up to three changes.
    let mut sequences: Vec<Vec<Change>> = vec![vec![]];
    for len in 1..=3 {
        let shorter: Vec<Vec<Change>> = sequences
            .iter()
            .filter(|s| s.len() == len - 1)
            .cloned()
            .collect();
        for s in shorter {
            for c in CHANGES {
                let mut longer = s.clone();
                longer.push(c);
                sequences.push(longer);
            }
        }
    }
    assert_eq!(sequences.len(), 1 + 7 + 49 + 343);
    for changes in &sequences {
        let expected = changes.iter().fold(input.clone(), |e, c| match *c {
            Change::Set(n, v) => e.with_header(n, v),
            Change::Add(n, v) => e.add_header(n, v),
            Change::Remove(n) => e.without_header(n),
        });
        let out = testing::enrich(std::slice::from_ref(&input), |e, out| {
            changes
                .iter()
                .fold(out.edit(e), |edit, c| match *c {
                    Change::Set(n, v) => edit.with_header(n, v),
                    Change::Add(n, v) => edit.add_header(n, v),
                    Change::Remove(n) => edit.without_header(n),
                })
                .emit();
        })
        .unwrap();
        assert_eq!(out, [expected], "{changes:?}");
    }
}

#[test]
fn edit_borrows_key_value_and_route() {
    let events = [OwnedEvent::new(r#"{"cc":"FR"}"#, 3).with_header("h", "1")];
    let route = String::from("eu");
    let value = vec![1u8, 2];
    let out = testing::enrich(&events, |e, out| {
        // From the event itself, from locals and owned.
        out.edit(e)
            .with_key(e.value())
            .with_value(&value)
            .with_route(&route)
            .with_header(String::from("h"), e.value())
            .emit();
        out.edit(e)
            .with_key(String::from("k"))
            .with_value(b"v")
            .with_route(route.to_uppercase())
            .emit();
    })
    .unwrap();
    assert_eq!(
        out,
        [
            OwnedEvent::new(vec![1u8, 2], 3)
                .with_key(r#"{"cc":"FR"}"#)
                .with_header("h", r#"{"cc":"FR"}"#)
                .with_route("eu"),
            events[0]
                .clone()
                .with_key("k")
                .with_value("v")
                .with_route("EU"),
        ]
    );
}
