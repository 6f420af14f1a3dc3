//! Round trips and rejection of bad buffers.

use super::*;

fn sample() -> Vec<Event> {
    vec![
        Event::new(&b"{\"n\":1}"[..], 1_700_000_000_000)
            .with_key("user-1")
            .with_header("user-agent", "curl/8")
            .with_header("bin", vec![0xff, 0x00]),
        Event::new(Vec::new(), -5).with_route("eu"),
    ]
}

#[test]
fn round_trip_preserves_every_field() {
    let events = sample();
    let bytes = encode(&events);
    let batch = Batch::verify(&bytes).expect("valid batch");
    assert_eq!(batch.len(), 2);
    assert_eq!(batch.to_events(), events);
    let first = batch.get(0).expect("event 0");
    assert_eq!(first.header("bin"), Some(&[0xff, 0x00][..]));
    assert_eq!(first.header("missing"), None);
    assert_eq!(first.headers().len(), 2);
    assert!(batch.get(2).is_none());
}

#[test]
fn empty_batch_is_valid() {
    let bytes = BatchBuilder::new().finish();
    let batch = Batch::verify(&bytes).expect("valid");
    assert!(batch.is_empty());
    assert_eq!(batch.iter().count(), 0);
}

#[test]
fn builder_is_reusable_after_finish() {
    let mut builder = BatchBuilder::new();
    builder.push(&sample()[0]);
    let first = builder.finish();
    builder.push(&sample()[1]);
    let second = builder.finish();
    assert_eq!(Batch::verify(&first).map(|b| b.len()), Ok(1));
    assert_eq!(
        Batch::verify(&second).expect("valid").to_events(),
        vec![sample()[1].clone()]
    );
}

#[test]
fn push_ref_copies_and_sets_source() {
    let bytes = encode(&sample());
    let batch = Batch::verify(&bytes).expect("valid");
    let mut builder = BatchBuilder::new();
    builder.push_ref(&batch.get(1).expect("event 1"), 7);
    let out = builder.finish();
    let out = Batch::verify(&out).expect("valid");
    assert_eq!(out.get(0).map(|e| e.source()), Some(7));
    assert_eq!(out.to_events(), vec![sample()[1].clone()]);
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    assert_eq!(
        Batch::verify(b"hello").map(|b| b.len()),
        Err(FormatError::MissingIdentifier { len: 5 })
    );
    assert!(Batch::verify(&[]).is_err());
    let mut bytes = encode(&sample());
    // Keep the identifier, corrupt the root offset so it points past the end.
    bytes[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = Batch::verify(&bytes).map(|b| b.len()).expect_err("corrupt");
    assert!(err.to_string().starts_with("malformed batch: "), "{err}");
}

#[test]
fn every_truncation_is_rejected_or_reads_safely() {
    let bytes = encode(&sample());
    for cut in 0..bytes.len() {
        if let Ok(batch) = Batch::verify(&bytes[..cut]) {
            // A prefix the verifier accepts must still be fully readable.
            let _ = batch.to_events();
        }
    }
}

#[test]
fn bitmap_bits_and_length_check() {
    let mut bitmap = KeepBitmap::none(10);
    bitmap.set(0, true);
    bitmap.set(9, true);
    assert_eq!(bitmap.as_bytes(), &[0b0000_0001, 0b0000_0010]);
    assert_eq!(bitmap.count(), 2);
    assert!(!bitmap.get(10));
    assert_eq!(KeepBitmap::all(9).count(), 9);
    assert_eq!(
        KeepBitmap::from_bytes(vec![0; 3], 10),
        Err(FormatError::BitmapLength {
            got: 3,
            events: 10,
            expected: 2
        })
    );
}

#[test]
fn bitmap_tail_bits_and_and_kept() {
    // A plugin may set the bits past the last event: they answer for nothing.
    let bitmap = KeepBitmap::from_bytes(vec![0b1000_0101, 0b1111_1110], 10).expect("length");
    assert_eq!(bitmap.count(), 4);
    assert_eq!(bitmap.kept().collect::<Vec<_>>(), [0, 2, 7, 9]);
    assert_eq!(bitmap.as_bytes(), &[0b1000_0101, 0b0000_0010]);
    assert_eq!(KeepBitmap::all(10).as_bytes(), &[0xff, 0b0000_0011]);
    let mut other = KeepBitmap::all(10);
    other.set(2, false);
    other.set(9, false);
    assert_eq!(bitmap.and(&other).kept().collect::<Vec<_>>(), [0, 7]);
    assert_eq!(KeepBitmap::none(0).kept().count(), 0);
}

#[cfg(feature = "json")]
mod json_mapping {
    use crate::json::*;
    use crate::*;

    #[test]
    fn json_round_trip_is_lossless() {
        let events = vec![
            Event::new(&b"{\"b\": 2, \"a\": [1,2]}"[..], 42)
                .with_key("k")
                .with_header("z", "1")
                .with_header("a", vec![0xff]),
            Event::new(&b"plain text"[..], 1).with_key(vec![0xfe]),
            Event::new(vec![0u8, 159, 146, 150], 2).with_route("r"),
            Event::new(&b"1"[..], 3)
                .with_header("x", "1")
                .with_header("x", "2"),
        ];
        for event in &events {
            let line = event_to_line(event);
            assert_eq!(parse_line(&line, 0).as_ref(), Ok(event), "{line}");
        }
        assert_eq!(
            event_to_line(&events[0]),
            r#"{"key":"k","value":{"b": 2, "a": [1,2]},"timestamp_ms":42,"headers":{"z":"1","a":{"b64":"/w=="}}}"#
        );
        assert_eq!(
            event_to_line(&events[1]),
            r#"{"key_b64":"/g==","value_text":"plain text","timestamp_ms":1}"#
        );
        assert_eq!(
            event_to_line(&events[3]),
            r#"{"value":1,"timestamp_ms":3,"headers":[["x","1"],["x","2"]]}"#
        );
    }

    #[test]
    fn json_values_with_surrounding_whitespace_stay_verbatim() {
        for value in [
            &b"{\"a\":1}\n"[..],
            b" 1",
            b"1 ",
            b"\t[1, 2]\r\n",
            b"\"s\" ",
        ] {
            let event = Event::new(value, 5);
            let line = event_to_line(&event);
            assert!(line.contains("\"value_text\":"), "{line}");
            assert_eq!(parse_line(&line, 0).as_ref(), Ok(&event), "{line}");
        }
        assert_eq!(
            event_to_line(&Event::new(&b"{\"a\":1}\n"[..], 5)),
            r#"{"value_text":"{\"a\":1}\n","timestamp_ms":5}"#
        );
        // Whitespace inside the value is part of the raw JSON and stays in `value`.
        assert_eq!(
            event_to_line(&Event::new(&b"{ \"a\" : 1 }"[..], 5)),
            r#"{"value":{ "a" : 1 },"timestamp_ms":5}"#
        );
    }

    #[test]
    fn repeated_header_names_need_the_pairs_form() {
        let err = parse_line(r#"{"value":1,"headers":{"a":"1","b":"2","a":"3"}}"#, 0);
        assert_eq!(
            err,
            Err(
                "header `a` appears more than once in the `headers` object: use the pairs \
                 form `[[name, value], ...]` to repeat a header"
                    .to_owned()
            )
        );
        let event = parse_line(
            r#"{"value":1,"headers":[["a","1"],["b","2"],["a","3"]]}"#,
            0,
        )
        .expect("valid");
        assert_eq!(
            event.headers,
            [
                ("a".to_owned(), b"1".to_vec()),
                ("b".to_owned(), b"2".to_vec()),
                ("a".to_owned(), b"3".to_vec())
            ]
        );
        let err = parse_line(r#"{"value":1,"headers":[["a",5]]}"#, 0);
        assert_eq!(
            err,
            Err(r#"header `a` must be a string or {"b64": "..."}"#.to_owned())
        );
        let err = parse_line(r#"{"value":1,"headers":{"a":{"b64":"%"}}}"#, 0);
        assert!(
            err.as_ref()
                .is_err_and(|e| e.starts_with("`headers.a.b64` is not valid base64")),
            "{err:?}"
        );
    }

    #[test]
    fn default_timestamp_applies_when_missing() {
        let event = parse_line(r#"{"value":{"a":1}}"#, 99).expect("valid");
        assert_eq!(event.timestamp_ms, 99);
        assert_eq!(event.value, br#"{"a":1}"#);
    }

    #[test]
    fn bad_lines_name_line_and_problem() {
        let input = "{\"value\":1}\n\n{\"vaule\":1}\nnot json\n{\"timestamp_ms\":1}\n";
        let results: Vec<_> = read_lines(input.as_bytes(), 0).collect();
        assert_eq!(results.len(), 4);
        assert!(results[0].is_ok());
        let errors: Vec<String> = results[1..]
            .iter()
            .map(|r| r.as_ref().map(|_| ()).expect_err("bad line").to_string())
            .collect();
        assert!(
            errors[0].starts_with("line 3: unknown field `vaule`"),
            "{}",
            errors[0]
        );
        assert!(
            errors[1].starts_with("line 4: expected ident"),
            "{}",
            errors[1]
        );
        assert_eq!(
            errors[2],
            "line 5: missing `value` (or `value_text`, `value_b64`)"
        );
    }
}
