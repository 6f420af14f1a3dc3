//! geo-enrich-v2, run natively on events built here.

use geo_enrich_v2::{Geo, geo};
use weir_sdk::{OwnedEvent, testing};

fn order(code: &str) -> OwnedEvent {
    OwnedEvent::new(format!(r#"{{"country_code":"{code}","amount":3}}"#), 7).with_key("u1")
}

#[test]
fn adds_the_country_the_region_and_the_route() {
    let cfg: Geo =
        testing::config(r#"{"table": {"US": "United States", "FR": "France"}}"#).unwrap();
    let events = [order("FR"), order("US"), order("DE")];
    let out = testing::enrich(&events, |e, out| geo(e, out, &cfg)).unwrap();
    let tagged = |e: &OwnedEvent, name: &str, region: &str, route: &str| {
        e.clone()
            .with_header("country", name)
            .with_header("region", region)
            .with_route(route)
    };
    assert_eq!(
        out,
        [
            tagged(&events[0], "France", "eu", "fr"),
            tagged(&events[1], "United States", "other", "us"),
            events[2].clone(),
        ]
    );
}
