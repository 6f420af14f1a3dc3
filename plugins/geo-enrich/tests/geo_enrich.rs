//! geo-enrich, run natively on events built here.

use geo_enrich::{Geo, geo};
use weir_sdk::{OwnedEvent, testing};

fn order(code: &str) -> OwnedEvent {
    OwnedEvent::new(format!(r#"{{"country_code":"{code}","amount":3}}"#), 7).with_key("u1")
}

#[test]
fn adds_the_country_and_the_route() {
    let cfg: Geo =
        testing::config(r#"{"table": {"US": "United States", "FR": "France"}}"#).unwrap();
    let events = [order("FR"), order("DE")];
    let out = testing::enrich(&events, |e, out| geo(e, out, &cfg)).unwrap();
    let fr = events[0]
        .clone()
        .with_header("country", "France")
        .with_route("fr");
    assert_eq!(out, [fr, events[1].clone()]);
}

#[test]
fn unknown_codes_take_the_default() {
    let with = r#"{"table": {}, "default": "Elsewhere", "header": "land", "field": "cc"}"#;
    let cfg: Geo = testing::config(with).unwrap();
    let event = OwnedEvent::new(r#"{"cc":"DE"}"#, 1);
    let out = testing::enrich(std::slice::from_ref(&event), |e, out| geo(e, out, &cfg)).unwrap();
    assert_eq!(
        out,
        [event.with_header("land", "Elsewhere").with_route("de")]
    );
}

#[test]
fn bad_config_and_bad_values_are_errors() {
    let err = testing::config::<Geo>(r#"{"field": "cc"}"#).unwrap_err();
    assert_eq!(err.message(), "config: missing field `table`");
    let cfg: Geo = testing::config(r#"{"table": {}}"#).unwrap();
    let events = [OwnedEvent::new("not json", 0)];
    let err = testing::enrich(&events, |e, out| geo(e, out, &cfg)).unwrap_err();
    assert_eq!(
        err.message(),
        "event 0: value: expected ident at line 1 column 2"
    );
}
