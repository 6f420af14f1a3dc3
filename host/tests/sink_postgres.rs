//! The postgres destination against a real PostgreSQL server started for each test
//! (`common/postgres.rs`): the rows a known batch becomes, refusals with their exact messages,
//! retries while the server is down and the reconnection once it is back.

#[path = "common/postgres.rs"]
mod postgres;

use postgres::PgServer;
use std::sync::Arc;
use weir::sinks::PostgresConfig;
use weir::sinks::{
    Destination, Outgoing, PostgresDestination, Selection, SendError, SharedBatch, check_columns,
    check_table,
};
use weir_format::{BatchBuilder, Event};

fn config(
    server: &PgServer,
    table: &str,
    columns: &[(&str, &str)],
    create: bool,
) -> PostgresConfig {
    PostgresConfig {
        url: server.conninfo(),
        table: table.into(),
        create,
        columns: columns
            .iter()
            .map(|(column, source)| (column.to_string(), source.to_string()))
            .collect(),
    }
}

fn open(name: &str, config: &PostgresConfig) -> PostgresDestination {
    PostgresDestination::open(name, config).expect("a valid postgres sink config")
}

fn batch(events: &[Event]) -> SharedBatch {
    let mut builder = BatchBuilder::new();
    for event in events {
        builder.push(event);
    }
    SharedBatch::verify(builder.finish()).expect("built batches verify")
}

fn all(events: &[Event]) -> Outgoing {
    Outgoing::all(batch(events), Arc::from("p"))
}

/// Events with JSON values, a plain-text value, a repeated header, with and without key and
/// route.
fn mixed_events() -> Vec<Event> {
    vec![
        Event::new(r#"{"path":"/a","n":1}"#, 1_000)
            .with_key("user-1")
            .with_header("user-agent", "curl/8")
            .with_route("eu"),
        Event::new("not json", 1_001),
        Event::new("[1,2]", 1_002)
            .with_key("user-2")
            .with_header("h", "1")
            .with_header("h", "2"),
        Event::new(r#"{"skipped":true}"#, 1_003),
        Event::new(r#""a json string""#, 1_004).with_header("bin", vec![0xff, 0x00]),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_columns_hold_the_selected_events_in_order() {
    let server = PgServer::start();
    let mut sink = open("pg", &config(&server, "events", &[], true));
    assert_eq!(
        sink.describe(),
        format!("postgres 127.0.0.1:{}/weir table events", server.port())
    );
    let selected = Outgoing::new(
        batch(&mixed_events()),
        Selection::Some(vec![0, 1, 2, 4].into()),
        Arc::from("p"),
    );
    let second = all(&[Event::new("7", 2_000).with_key("user-3")]);
    sink.send(&[selected, second]).await.expect("delivered");
    assert_eq!(
        server.psql(
            "SELECT key, value, timestamp_ms, headers, route FROM events ORDER BY timestamp_ms"
        ),
        [
            r#"user-1|{"n": 1, "path": "/a"}|1000|{"user-agent": "curl/8"}|eu"#,
            r#"|"not json"|1001|{}|"#,
            r#"user-2|[1, 2]|1002|[["h", "1"], ["h", "2"]]|"#,
            r#"|"a json string"|1004|{"bin": {"b64": "/wA="}}|"#,
            r#"user-3|7|2000|{}|"#,
        ]
        .join("\n")
    );
    assert_eq!(
        server.psql(
            "SELECT column_name || ' ' || data_type || ' ' || is_nullable \
             FROM information_schema.columns WHERE table_name = 'events' ORDER BY ordinal_position"
        ),
        "key text YES\nvalue jsonb NO\ntimestamp_ms bigint NO\nheaders jsonb NO\nroute text YES"
    );
    sink.close().await.expect("closed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mapping_fills_an_existing_table_by_its_column_types() {
    let server = PgServer::start();
    server.psql(
        "CREATE TYPE tier AS ENUM ('free', 'paid'); \
         CREATE TABLE orders (id bigint NOT NULL, amount double precision, qty integer, \
             paid boolean, tier tier, tenant text, raw bytea, at timestamptz, body json, \
             note jsonb, label varchar(20), ts double precision)",
    );
    let columns = [
        ("id", "value.id"),
        ("amount", "value.amount"),
        ("qty", "value.qty"),
        ("paid", "value.paid"),
        ("tier", "header.tier"),
        ("tenant", "header.tenant"),
        ("raw", "value"),
        ("at", "timestamp_ms"),
        ("body", "value"),
        ("note", "value.note"),
        ("label", "value.label"),
        ("ts", "timestamp_ms"),
    ];
    let mut sink = open("orders", &config(&server, "public.orders", &columns, false));
    let events = [
        Event::new(
            r#"{"id":1,"amount":9.5,"qty":3,"paid":true,"note":{"a":[1]},"label":"first"}"#,
            1_700_000_000_123,
        )
        .with_header("tier", "paid")
        .with_header("tenant", "acme"),
        Event::new(r#"{"id":2,"amount":null,"label":42}"#, 0),
    ];
    sink.send(&[all(&events)]).await.expect("delivered");
    assert_eq!(
        server.psql(
            "SELECT id, amount, qty, paid, tier, tenant, encode(raw, 'escape'), \
             to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS'), body, note, label, ts \
             FROM orders ORDER BY id"
        ),
        [
            r#"1|9.5|3|t|paid|acme|{"id":1,"amount":9.5,"qty":3,"paid":true,"note":{"a":[1]},"label":"first"}|2023-11-14 22:13:20.123|{"id":1,"amount":9.5,"qty":3,"paid":true,"note":{"a":[1]},"label":"first"}|{"a": [1]}|first|1700000000123"#,
            r#"2||||||{"id":2,"amount":null,"label":42}|1970-01-01 00:00:00.000|{"id":2,"amount":null,"label":42}||42|0"#,
        ]
        .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mapped_table_is_created_with_the_inferred_types() {
    let server = PgServer::start();
    let columns = [
        ("k", "key"),
        ("v", "value"),
        ("t", "value_text"),
        ("ms", "timestamp_ms"),
        ("hs", "headers"),
        ("r", "route"),
        ("user_id", "value.user"),
        ("agent", "header.user-agent"),
    ];
    let mut sink = open("created", &config(&server, "mapped", &columns, true));
    let event = Event::new(r#"{"user":"u1"}"#, 5)
        .with_header("user-agent", "curl/8")
        .with_route("eu");
    sink.send(&[all(&[event])]).await.expect("delivered");
    assert_eq!(
        server.psql(
            "SELECT column_name || ' ' || data_type || ' ' || is_nullable \
             FROM information_schema.columns WHERE table_name = 'mapped' ORDER BY ordinal_position"
        ),
        "k text YES\nv jsonb NO\nt text NO\nms bigint NO\nhs jsonb NO\nr text YES\n\
         user_id jsonb YES\nagent text YES"
    );
    assert_eq!(
        server.psql("SELECT * FROM mapped"),
        r#"|{"user": "u1"}|{"user":"u1"}|5|{"user-agent": "curl/8"}|eu|"u1"|curl/8"#
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_events_are_rejected_with_the_server_message_and_nothing_is_written() {
    let server = PgServer::start();
    server.psql(
        "CREATE TABLE payments (id bigint NOT NULL, amount integer CHECK (amount > 0), \
         who text NOT NULL, total numeric)",
    );
    let columns = [
        ("id", "value.id"),
        ("amount", "value.amount"),
        ("who", "key"),
    ];
    let mut sink = open("payments", &config(&server, "payments", &columns, false));
    let good = Event::new(r#"{"id":1,"amount":5}"#, 1).with_key("ann");
    let negative = Event::new(r#"{"id":2,"amount":-3}"#, 2).with_key("bob");
    let error = sink
        .send(&[all(&[good.clone(), negative])])
        .await
        .expect_err("the CHECK constraint refuses the second event");
    assert_eq!(
        error,
        SendError::Reject(
            "sink `payments`: postgres table `payments` refused the events: new row for relation \
             \"payments\" violates check constraint \"payments_amount_check\" (SQLSTATE 23514). \
             Failing row contains (2, -3, bob, null)."
                .into()
        )
    );
    assert_eq!(server.psql("SELECT count(*) FROM payments"), "0");

    let no_key = Event::new(r#"{"id":3,"amount":1}"#, 3);
    let error = sink
        .send(&[all(&[no_key])])
        .await
        .expect_err("who is NOT NULL");
    assert_eq!(
        error,
        SendError::Reject(
            "sink `payments`: postgres table `payments` refused the events: null value in column \
             \"who\" of relation \"payments\" violates not-null constraint (SQLSTATE 23502). \
             Failing row contains (3, 1, null, null)."
                .into()
        )
    );

    let binary_key = Event::new(r#"{"id":4,"amount":1}"#, 4).with_key(vec![0xff]);
    let error = sink
        .send(&[all(&[binary_key])])
        .await
        .expect_err("a text column");
    assert_eq!(
        error,
        SendError::Reject(
            "sink `payments`: postgres table `payments`: column `who` (text) cannot take `key` \
             of an event of pipeline `p` (timestamp_ms 4): it is not UTF-8 text"
                .into()
        )
    );

    let too_big = Event::new(r#"{"id":5,"amount":3000000000}"#, 5).with_key("cy");
    let error = sink
        .send(&[all(&[too_big])])
        .await
        .expect_err("an integer column");
    assert_eq!(
        error,
        SendError::Reject(
            "sink `payments`: postgres table `payments`: column `amount` (integer) cannot take \
             `value.amount` of an event of pipeline `p` (timestamp_ms 5): 3000000000 is not an \
             integer that fits integer"
                .into()
        )
    );

    // The connection survives refusals: the good event alone goes in.
    sink.send(&[all(&[good])]).await.expect("delivered");
    assert_eq!(
        server.psql("SELECT id, amount, who FROM payments"),
        "1|5|ann"
    );

    let mut numeric = open(
        "payments",
        &config(&server, "payments", &[("total", "value.total")], false),
    );
    let error = numeric
        .send(&[all(&[Event::new(r#"{"total":1}"#, 6)])])
        .await
        .expect_err("numeric is not a type the sink fills");
    assert_eq!(
        error,
        SendError::Reject(
            "sink `payments`: postgres table `payments`: column `total` has type numeric, which \
             cannot take `value.total`: it goes to a column of type text, json, jsonb, smallint, \
             integer, bigint, real, double precision, boolean"
                .into()
        )
    );

    let mut missing = open("gone", &config(&server, "nowhere", &[], false));
    let error = missing
        .send(&[all(&[Event::new("1", 7)])])
        .await
        .expect_err("no such table");
    assert_eq!(
        error,
        SendError::Reject(
            "sink `gone`: postgres table `nowhere` refused the events: relation \"nowhere\" does \
             not exist (SQLSTATE 42P01)"
                .into()
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_server_is_retried_and_a_restarted_one_is_reconnected() {
    let server = PgServer::start();
    let mut sink = open("pg", &config(&server, "events", &[], true));
    sink.send(&[all(&[Event::new("1", 1)])])
        .await
        .expect("delivered");

    server.stop();
    let prefix = format!("sink `pg`: postgres 127.0.0.1:{}/weir: ", server.port());
    match sink.send(&[all(&[Event::new("2", 2)])]).await {
        // "connection closed", or the server's goodbye (57P01) when it comes first.
        Err(SendError::Retry(message)) => assert!(
            message.starts_with(&prefix),
            "{message:?} starts with {prefix:?}"
        ),
        other => panic!("the lost connection is retried, got {other:?}"),
    }
    let error = sink
        .send(&[all(&[Event::new("2", 2)])])
        .await
        .expect_err("nothing listens");
    assert_eq!(
        error,
        SendError::Retry(format!(
            "{prefix}cannot connect: error connecting to server: Connection refused (os error 111)"
        ))
    );

    server.restart();
    sink.send(&[all(&[Event::new("2", 2), Event::new("3", 3)])])
        .await
        .expect("delivered after reconnecting");
    assert_eq!(
        server.psql("SELECT value FROM events ORDER BY timestamp_ms"),
        "1\n2\n3"
    );
}

#[test]
fn a_bad_config_is_refused_before_connecting() {
    let check = |columns: &[(&str, &str)]| {
        let columns: Vec<(String, String)> = columns
            .iter()
            .map(|(c, s)| (c.to_string(), s.to_string()))
            .collect();
        check_columns(&columns)
    };
    assert_eq!(check(&[]), Ok(()));
    assert_eq!(
        check(&[
            ("id", "value.id"),
            ("agent", "header.user-agent"),
            ("_t2", "timestamp_ms")
        ]),
        Ok(())
    );
    assert_eq!(
        check(&[("id", "valu")]),
        Err(
            "column `id`: unknown source `valu`: expected `key`, `value`, `value_text`, \
             `timestamp_ms`, `headers`, `route`, `value.FIELD` or `header.NAME`"
                .into()
        )
    );
    assert_eq!(
        check(&[("id", "value.")]),
        Err("column `id`: `value.` names no field: write `value.FIELD`".into())
    );
    assert_eq!(
        check(&[("user-id", "key")]),
        Err(
            "column `user-id` is not a plain name: use letters, digits and `_`, not starting \
             with a digit, at most 63 bytes"
                .into()
        )
    );
    assert_eq!(
        check_table("a.b.c"),
        Err("table `a.b.c`: expected `table` or `schema.table`".into())
    );
    let error = |url: &str, table: &str, columns: &[(&str, &str)]| {
        let config = PostgresConfig {
            url: url.into(),
            table: table.into(),
            create: true,
            columns: columns
                .iter()
                .map(|(c, s)| (c.to_string(), s.to_string()))
                .collect(),
        };
        PostgresDestination::open("db", &config)
            .expect_err("a bad config")
            .to_string()
    };
    let url = "host=127.0.0.1 user=weir";
    assert_eq!(
        error(url, "events", &[("v", "value"), ("v2", "headerz")]),
        "sink `db`: cannot open postgres table `events`: column `v2`: unknown source \
         `headerz`: expected `key`, `value`, `value_text`, `timestamp_ms`, `headers`, `route`, \
         `value.FIELD` or `header.NAME`"
    );
    assert_eq!(
        error(url, "1events", &[]),
        "sink `db`: cannot open postgres table `1events`: table `1events` is not a plain \
         name: use letters, digits and `_`, not starting with a digit, at most 63 bytes"
    );
    assert_eq!(
        error("host=127.0.0.1", "events", &[]),
        "sink `db`: cannot open postgres table `events`: the connection string names no user"
    );
    assert_eq!(
        error("user=weir", "events", &[]),
        "sink `db`: cannot open postgres table `events`: the connection string names no host"
    );
    assert_eq!(
        error("host=127.0.0.1 user=weir port=x", "events", &[]),
        "sink `db`: cannot open postgres table `events`: the connection string is not valid: \
         invalid connection string: invalid value for option `port`"
    );
}
