//! drop-bots, run natively on events built here.

use weir_sdk::{OwnedEvent, testing};

fn from(agent: &str) -> OwnedEvent {
    OwnedEvent::new("{}", 0).with_header("user-agent", agent)
}

#[test]
fn drops_bots_and_keeps_people() {
    let events = [
        from("Mozilla/5.0 (X11; Linux x86_64)"),
        from("Googlebot/2.1 (+http://www.google.com/bot.html)"),
        from("curl/8.5.0"),
        from("Baiduspider"),
        from("some CRAWLER"),
        OwnedEvent::new("{}", 0),
    ];
    let kept = testing::filter(&events, drop_bots::keep).unwrap();
    assert_eq!(
        kept,
        [events[0].clone(), events[2].clone(), events[5].clone()]
    );
}

#[test]
fn the_check_ignores_ascii_case() {
    assert!(drop_bots::is_bot(b"BoT"));
    assert!(drop_bots::is_bot(b"xSpIdErx"));
    assert!(!drop_bots::is_bot(b"robo"));
}
