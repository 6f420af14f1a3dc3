//! count-sum, run natively on events built here.

use count_sum::{CountSum, SumConfig};
use weir_sdk::{OwnedEvent, Window, testing};

#[test]
fn counts_and_sums_a_window() {
    let cfg: SumConfig = testing::config("{}").unwrap();
    let events: Vec<OwnedEvent> = [10.0, 2.5, 1.0]
        .iter()
        .map(|amount| OwnedEvent::new(format!(r#"{{"amount":{amount}}}"#), 1_000))
        .collect();
    let window = Window::new(Some(b"user-7".to_vec()), 0, 60_000);
    let out = testing::aggregate::<CountSum>(&events, &window, &cfg).unwrap();
    let expected = OwnedEvent::new(
        r#"{"count":3,"sum":13.5,"start_ms":0,"end_ms":60000}"#,
        59_999,
    )
    .with_key("user-7");
    assert_eq!(out, [expected]);
}

#[test]
fn a_missing_field_fails_the_event() {
    let cfg: SumConfig = testing::config(r#"{"field": "price"}"#).unwrap();
    let events = [OwnedEvent::new(r#"{"amount":1}"#, 0)];
    let err = testing::aggregate::<CountSum>(&events, &Window::default(), &cfg).unwrap_err();
    assert_eq!(err.message(), "event 0: `price` is not a number");
}
