//! Unit tests of [`ProducerCore`]: batching, sequences, acks, the bounded buffer, reconnects and
//! hostile server frames, all with time passed in.

use super::*;
use weir_format::frame::{Decoder, Frame, PipelineState};
use weir_format::frame::{Limits, encode};

const LINGER: Duration = Duration::from_millis(10);

fn config(pipelines: &[&str]) -> ProducerConfig {
    let mut config = ProducerConfig::new(
        "sensor-7",
        pipelines.iter().map(|p| p.to_string()).collect(),
    );
    config.linger = LINGER;
    config
}

fn welcome(states: &[(u64, u64)]) -> Welcome {
    welcome_with(Limits::DEFAULT, states)
}

fn welcome_with(limits: Limits, states: &[(u64, u64)]) -> Welcome {
    Welcome {
        version: 1,
        limits,
        pipelines: states
            .iter()
            .map(|&(next_sequence, acked_below)| PipelineState {
                next_sequence,
                acked_below,
            })
            .collect(),
    }
}

fn event(i: usize) -> Event {
    Event::new(format!("{{\"n\":{i:04}}}"), 1_700_000_000_000 + i as i64).with_key(format!("k{i}"))
}

/// A core with `max_batch_events` events per batch, welcomed with `states`.
fn core(max_batch_events: u32, states: &[(u64, u64)]) -> ProducerCore {
    let names: Vec<String> = (0..states.len()).map(|i| format!("p{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut config = config(&names);
    config.max_batch_events = max_batch_events;
    let mut core = ProducerCore::new(config).expect("valid config");
    assert_eq!(core.on_welcome(&welcome(states)).expect("welcome"), vec![]);
    core
}

fn send_all(
    core: &mut ProducerCore,
    pipeline: u16,
    events: impl IntoIterator<Item = usize>,
    now: Instant,
) -> Vec<u64> {
    events
        .into_iter()
        .map(
            |i| match core.send(pipeline, &event(i), now).expect("send") {
                SendOutcome::Queued { sequence } => sequence,
                SendOutcome::Full => panic!("buffer full at event {i}"),
            },
        )
        .collect()
}

fn drain(core: &mut ProducerCore) -> Vec<Transmit> {
    std::iter::from_fn(|| core.poll_transmit()).collect()
}

/// (pipeline, sequence, event count) of each transmit.
fn summary(transmits: &[Transmit]) -> Vec<(u16, u64, u32)> {
    transmits
        .iter()
        .map(|t| (t.pipeline, t.sequence, t.event_count))
        .collect()
}

/// Decodes transmits with the server's batch-stream decoder into (sequence, events).
fn decode(transmits: &[Transmit], pipelines: usize) -> Vec<(u16, u64, Vec<Event>)> {
    let mut bytes = Vec::new();
    for t in transmits {
        bytes.extend_from_slice(&t.header);
        bytes.extend_from_slice(&t.payload);
    }
    let mut decoder = Decoder::batch_stream(Limits::DEFAULT, pipelines);
    let mut input = bytes.as_slice();
    let mut out = Vec::new();
    while let Some(frame) = decoder.decode(&mut input).expect("decodes") {
        let Frame::Batch(batch) = frame else {
            panic!("not a batch: {frame:?}")
        };
        let events = batch.verify().expect("valid payload").to_events();
        out.push((batch.pipeline, batch.sequence, events));
    }
    decoder.finish().expect("no partial frame");
    assert!(input.is_empty());
    out
}

#[test]
fn send_before_welcome_is_an_error() {
    let mut core = ProducerCore::new(config(&["clicks"])).expect("config");
    let now = Instant::now();
    assert_eq!(core.send(0, &event(0), now), Err(ClientError::NotWelcomed));
    assert_eq!(core.poll_transmit(), None);
    let hello = core.hello();
    assert_eq!(hello.producer_id, "sensor-7");
    assert_eq!(hello.pipelines, vec!["clicks".to_string()]);
    assert_eq!(hello.version, 1);
    let mut bytes = Vec::new();
    encode(&Frame::Hello(hello), &mut bytes).expect("hello encodes");
}

#[test]
fn batches_by_count_with_sequences_from_welcome() {
    let mut core = core(3, &[(40, 37)]);
    let now = Instant::now();
    let sequences = send_all(&mut core, 0, 0..7, now);
    assert_eq!(sequences, vec![40, 40, 40, 41, 41, 41, 42]);
    let sent = drain(&mut core);
    assert_eq!(summary(&sent), vec![(0, 40, 3), (0, 41, 3)]);
    // The seventh event waits in the open batch until flushed.
    assert_eq!(core.next_sequence(0), Some(42));
    core.flush().expect("flush");
    let rest = drain(&mut core);
    assert_eq!(summary(&rest), vec![(0, 42, 1)]);
    let decoded = decode(&[sent, rest].concat(), 1);
    let all: Vec<Event> = decoded.iter().flat_map(|(_, _, e)| e.clone()).collect();
    assert_eq!(all, (0..7).map(event).collect::<Vec<_>>());
    assert_eq!(
        decoded
            .iter()
            .map(|(p, s, e)| (*p, *s, e.len()))
            .collect::<Vec<_>>(),
        vec![(0, 40, 3), (0, 41, 3), (0, 42, 1)]
    );
}

#[test]
fn batches_by_bytes() {
    let mut config = config(&["clicks"]);
    let bound = encoded_len_bound(&event(0));
    // Room for exactly two events per batch.
    config.max_batch_bytes = BATCH_OVERHEAD_BYTES + 2 * bound;
    let mut core = ProducerCore::new(config).expect("config");
    core.on_welcome(&welcome(&[(0, 0)])).expect("welcome");
    let now = Instant::now();
    assert_eq!(send_all(&mut core, 0, 0..5, now), vec![0, 0, 1, 1, 2]);
    assert_eq!(summary(&drain(&mut core)), vec![(0, 0, 2), (0, 1, 2)]);

    // A limit just below two events: the second event closes the first batch and opens one.
    let mut config = self::config(&["clicks"]);
    config.max_batch_bytes = BATCH_OVERHEAD_BYTES + 2 * bound - 1;
    let mut core = ProducerCore::new(config).expect("config");
    core.on_welcome(&welcome(&[(0, 0)])).expect("welcome");
    assert_eq!(send_all(&mut core, 0, 0..3, now), vec![0, 1, 2]);
    assert_eq!(summary(&drain(&mut core)), vec![(0, 0, 1), (0, 1, 1)]);
}

#[test]
fn server_frame_limit_caps_batches_and_refuses_oversized_events() {
    let mut core = ProducerCore::new(config(&["clicks"])).expect("config");
    let limits = Limits {
        max_frame_bytes: 4_194_304,
        max_events_per_frame: 2,
        max_in_flight: 16,
    };
    core.on_welcome(&welcome_with(limits, &[(0, 0)]))
        .expect("welcome");
    let now = Instant::now();
    assert_eq!(send_all(&mut core, 0, 0..3, now), vec![0, 0, 1]);
    let big = Event::new(vec![0u8; 5_000_000], 0);
    let err = core.send(0, &big, now).expect_err("too large");
    let bytes = 5_000_000 + 128 + BATCH_OVERHEAD_BYTES + BATCH_HEADER_BYTES;
    assert_eq!(
        err,
        ClientError::EventTooLarge {
            bytes,
            limit: 4_194_304
        }
    );
    assert_eq!(
        err.to_string(),
        format!("event of {bytes} bytes exceeds the server's frame limit of 4194304 bytes")
    );
    // The refused event changed nothing.
    assert_eq!(summary(&drain(&mut core)), vec![(0, 0, 2)]);
    core.flush().expect("flush");
    assert_eq!(summary(&drain(&mut core)), vec![(0, 1, 1)]);
}

#[test]
fn batches_by_linger_with_time_passed_in() {
    let mut core = core(100, &[(0, 0), (0, 0)]);
    let t0 = Instant::now();
    assert_eq!(core.poll_timeout(), None);
    send_all(&mut core, 0, 0..2, t0);
    send_all(&mut core, 1, 2..3, t0 + Duration::from_millis(4));
    send_all(&mut core, 0, 3..4, t0 + Duration::from_millis(6));
    assert_eq!(core.poll_timeout(), Some(t0 + LINGER));
    core.handle_timeout(t0 + LINGER - Duration::from_millis(1))
        .expect("timeout");
    assert_eq!(drain(&mut core), vec![]);
    core.handle_timeout(t0 + LINGER).expect("timeout");
    assert_eq!(summary(&drain(&mut core)), vec![(0, 0, 3)]);
    assert_eq!(
        core.poll_timeout(),
        Some(t0 + Duration::from_millis(4) + LINGER)
    );
    core.handle_timeout(t0 + Duration::from_millis(14))
        .expect("timeout");
    assert_eq!(summary(&drain(&mut core)), vec![(1, 0, 1)]);
    assert_eq!(core.poll_timeout(), None);
}

#[test]
fn ack_releases_exactly_the_acked_batches_and_frees_buffer() {
    let mut core = core(1, &[(0, 0), (5, 5)]);
    let now = Instant::now();
    assert!(core.is_idle());
    send_all(&mut core, 0, 0..4, now);
    send_all(&mut core, 1, 4..6, now);
    let sent = drain(&mut core);
    assert_eq!(
        summary(&sent),
        vec![
            (0, 0, 1),
            (1, 5, 1),
            (0, 1, 1),
            (1, 6, 1),
            (0, 2, 1),
            (0, 3, 1)
        ]
    );
    let frame_bytes = |t: &Transmit| t.header.len() + t.payload.len();
    let total: usize = sent.iter().map(frame_bytes).sum();
    assert_eq!(core.buffered_bytes(), total);

    let done = core
        .on_ack(Ack {
            pipeline: 0,
            next: 2,
        })
        .expect("ack");
    assert_eq!(
        done,
        Completed {
            pipeline: 0,
            sequences: 0..2
        }
    );
    let freed: usize = sent[0..1].iter().chain(&sent[2..3]).map(frame_bytes).sum();
    assert_eq!(core.buffered_bytes(), total - freed);
    // A repeated ack releases nothing and is not an error.
    let again = core
        .on_ack(Ack {
            pipeline: 0,
            next: 2,
        })
        .expect("ack");
    assert_eq!(again.sequences, 2..2);
    let done = core
        .on_ack(Ack {
            pipeline: 1,
            next: 7,
        })
        .expect("ack");
    assert_eq!(
        done,
        Completed {
            pipeline: 1,
            sequences: 5..7
        }
    );
    let done = core
        .on_ack(Ack {
            pipeline: 0,
            next: 4,
        })
        .expect("ack");
    assert_eq!(done.sequences, 2..4);
    assert_eq!(core.buffered_bytes(), 0);
    assert!(core.is_idle());
}

#[test]
fn in_flight_limit_holds_batches_until_acked() {
    let mut core = ProducerCore::new(config(&["clicks"])).expect("config");
    let limits = Limits {
        max_in_flight: 2,
        ..Limits::DEFAULT
    };
    core.on_welcome(&welcome_with(limits, &[(0, 0)]))
        .expect("welcome");
    let now = Instant::now();
    for i in 0..4 {
        send_all(&mut core, 0, [i], now);
        core.flush().expect("flush");
    }
    assert_eq!(summary(&drain(&mut core)), vec![(0, 0, 1), (0, 1, 1)]);
    core.on_ack(Ack {
        pipeline: 0,
        next: 1,
    })
    .expect("ack");
    assert_eq!(summary(&drain(&mut core)), vec![(0, 2, 1)]);
    core.on_ack(Ack {
        pipeline: 0,
        next: 3,
    })
    .expect("ack");
    assert_eq!(summary(&drain(&mut core)), vec![(0, 3, 1)]);
}

#[test]
fn full_buffer_refuses_then_an_ack_unblocks() {
    let mut config = config(&["clicks"]);
    config.max_batch_events = 1;
    // What a one-event batch counts while open (the bound) and once closed (its frame).
    let alone = FRAME_HEADER_BYTES + BATCH_OVERHEAD_BYTES + encoded_len_bound(&event(0));
    let frame = FRAME_HEADER_BYTES + weir_format::encode([&event(0)]).len();
    assert!(frame < alone);
    // Room for two closed batches and one open one.
    config.max_buffer_bytes = 2 * frame + alone;
    let mut core = ProducerCore::new(config).expect("config");
    core.on_welcome(&welcome(&[(0, 0)])).expect("welcome");
    let now = Instant::now();
    assert_eq!(send_all(&mut core, 0, 0..3, now), vec![0, 1, 2]);
    assert_eq!(core.buffered_bytes(), 3 * frame);
    assert_eq!(core.send(0, &event(3), now), Ok(SendOutcome::Full));
    assert_eq!(core.send(0, &event(3), now), Ok(SendOutcome::Full));
    assert_eq!(core.buffered_bytes(), 3 * frame);
    assert_eq!(
        summary(&drain(&mut core)),
        vec![(0, 0, 1), (0, 1, 1), (0, 2, 1)]
    );
    assert_eq!(core.send(0, &event(3), now), Ok(SendOutcome::Full));
    core.on_ack(Ack {
        pipeline: 0,
        next: 1,
    })
    .expect("ack");
    assert_eq!(
        core.send(0, &event(3), now),
        Ok(SendOutcome::Queued { sequence: 3 })
    );
    assert_eq!(core.send(0, &event(4), now), Ok(SendOutcome::Full));
    // Nothing was dropped: the refused events never entered a batch.
    let sent = drain(&mut core);
    assert_eq!(decode(&sent, 1), vec![(0, 3, vec![event(3)])]);
}

#[test]
fn event_larger_than_the_buffer_is_an_error() {
    let mut config = config(&["clicks"]);
    config.max_buffer_bytes = 100;
    let mut core = ProducerCore::new(config).expect("config");
    core.on_welcome(&welcome(&[(0, 0)])).expect("welcome");
    let bytes = FRAME_HEADER_BYTES + BATCH_OVERHEAD_BYTES + encoded_len_bound(&event(0));
    assert_eq!(
        core.send(0, &event(0), Instant::now()),
        Err(ClientError::EventExceedsBuffer { bytes, limit: 100 })
    );
}

#[test]
fn reconnect_resends_unacked_in_order_and_skips_acked_below() {
    let mut core = core(1, &[(10, 10), (0, 0)]);
    let now = Instant::now();
    send_all(&mut core, 0, 0..5, now);
    send_all(&mut core, 1, 5..7, now);
    let first = drain(&mut core);
    assert_eq!(first.len(), 7);
    core.on_ack(Ack {
        pipeline: 0,
        next: 11,
    })
    .expect("ack");
    core.on_disconnect();
    assert!(!core.is_connected());
    assert_eq!(core.poll_transmit(), None);
    // Sending continues while disconnected: buffered, numbered on.
    assert_eq!(send_all(&mut core, 0, 7..8, now), vec![15]);
    // The server accepted 11..13 and acked 11..12 before the cut.
    let done = core
        .on_welcome(&welcome(&[(13, 12), (1, 0)]))
        .expect("welcome");
    assert_eq!(
        done,
        vec![Completed {
            pipeline: 0,
            sequences: 11..12
        }]
    );
    let resent = drain(&mut core);
    // Pipelines take turns; within each, sequence order.
    let of = |pipeline: u16| -> Vec<u64> {
        resent
            .iter()
            .filter(|t| t.pipeline == pipeline)
            .map(|t| t.sequence)
            .collect()
    };
    assert_eq!(of(0), vec![12, 13, 14, 15]);
    assert_eq!(of(1), vec![0, 1]);
    let resent: Vec<Transmit> = [0, 1]
        .into_iter()
        .flat_map(|p| resent.iter().filter(move |t| t.pipeline == p).cloned())
        .collect();
    // Same sequences, same bytes as the first time (15 is the batch made while disconnected).
    for t in resent.iter().filter(|t| t.sequence != 15) {
        let original = first
            .iter()
            .find(|f| f.pipeline == t.pipeline && f.sequence == t.sequence)
            .expect("sent before");
        assert_eq!(original, t);
    }
    let decoded = decode(&resent, 2);
    assert_eq!(decoded[0], (0, 12, vec![event(2)]));
    assert_eq!(decoded[3], (0, 15, vec![event(7)]));
    assert_eq!(decoded[5], (1, 1, vec![event(6)]));
    // Acks continue from the resumed state.
    let done = core
        .on_ack(Ack {
            pipeline: 0,
            next: 16,
        })
        .expect("ack");
    assert_eq!(done.sequences, 12..16);
}

#[test]
fn reconnect_to_a_server_without_state_resends_everything_unacked() {
    let mut core = core(1, &[(3, 3)]);
    let now = Instant::now();
    send_all(&mut core, 0, 0..3, now);
    assert_eq!(drain(&mut core).len(), 3);
    core.on_ack(Ack {
        pipeline: 0,
        next: 4,
    })
    .expect("ack");
    core.on_disconnect();
    // The server crashed: no state (next_sequence 0). Keep our numbering.
    assert_eq!(
        core.on_welcome(&welcome(&[(0, 0)])).expect("welcome"),
        vec![]
    );
    assert_eq!(summary(&drain(&mut core)), vec![(0, 4, 1), (0, 5, 1)]);
    assert_eq!(send_all(&mut core, 0, [9], now), vec![6]);
}

#[test]
fn inconsistent_welcome_is_refused_without_changing_state() {
    let mut core = core(1, &[(10, 10)]);
    let now = Instant::now();
    send_all(&mut core, 0, 0..3, now);
    drain(&mut core);
    core.on_ack(Ack {
        pipeline: 0,
        next: 11,
    })
    .expect("ack");
    core.on_disconnect();
    let name = || "p0".to_string();
    assert_eq!(
        core.on_welcome(&welcome(&[(14, 11)])),
        Err(ClientError::ServerAhead {
            pipeline: name(),
            next_sequence: 14,
            numbered_below: 13
        })
    );
    assert_eq!(
        core.on_welcome(&welcome(&[(10, 10)])),
        Err(ClientError::ServerBehind {
            pipeline: name(),
            next_sequence: 10,
            held_from: 11
        })
    );
    let err = core
        .on_welcome(&welcome(&[(12, 10)]))
        .expect_err("regressed");
    assert_eq!(
        err.to_string(),
        "welcome for pipeline `p0`: acked_below 10 is below the ack 11 the server already sent"
    );
    assert_eq!(
        core.on_welcome(&welcome(&[(12, 13)])),
        Err(ClientError::AckedAboveNext {
            pipeline: name(),
            acked_below: 13,
            next_sequence: 12
        })
    );
    assert_eq!(
        core.on_welcome(&welcome(&[(12, 11), (0, 0)])),
        Err(ClientError::PipelineCountMismatch {
            got: 2,
            expected: 1
        })
    );
    let mut w = welcome(&[(12, 11)]);
    w.version = 2;
    assert_eq!(
        core.on_welcome(&w),
        Err(ClientError::UnsupportedVersion { version: 2 })
    );
    for (name, limits) in [
        (
            "max_frame_bytes",
            Limits {
                max_frame_bytes: 20,
                ..Limits::DEFAULT
            },
        ),
        (
            "max_events_per_frame",
            Limits {
                max_events_per_frame: 0,
                ..Limits::DEFAULT
            },
        ),
        (
            "max_in_flight",
            Limits {
                max_in_flight: 0,
                ..Limits::DEFAULT
            },
        ),
    ] {
        let err = core
            .on_welcome(&welcome_with(limits, &[(12, 11)]))
            .expect_err("unusable");
        assert!(
            matches!(err, ClientError::UnusableLimit { name: n, .. } if n == name),
            "{err}"
        );
    }
    // Limits the held batches no longer fit.
    let small = Limits {
        max_frame_bytes: 100,
        ..Limits::DEFAULT
    };
    assert!(matches!(
        core.on_welcome(&welcome_with(small, &[(12, 11)])),
        Err(ClientError::HeldBatchOverLimits { sequence: 11, .. })
    ));
    assert!(!core.is_connected());
    // A consistent welcome still works: nothing was changed by the refused ones.
    assert_eq!(
        core.on_welcome(&welcome(&[(12, 11)])).expect("welcome"),
        vec![]
    );
    assert_eq!(summary(&drain(&mut core)), vec![(0, 11, 1), (0, 12, 1)]);
}

#[test]
fn hostile_acks_are_errors_not_panics() {
    let mut core = ProducerCore::new(config(&["clicks"])).expect("config");
    assert_eq!(
        core.on_ack(Ack {
            pipeline: 0,
            next: 1
        }),
        Err(ClientError::NotWelcomed)
    );
    core.on_welcome(&welcome(&[(5, 2)])).expect("welcome");
    let now = Instant::now();
    send_all(&mut core, 0, 0..2, now);
    core.flush().expect("flush");
    // Acks up to 5 cover what a previous process sent: allowed before anything is written.
    assert_eq!(
        core.on_ack(Ack {
            pipeline: 0,
            next: 6
        }),
        Err(ClientError::AckBeyondSent {
            pipeline: "clicks".to_string(),
            next: 6,
            sent_below: 5
        })
    );
    assert_eq!(
        core.on_ack(Ack {
            pipeline: 0,
            next: 5
        })
        .expect("ack")
        .sequences,
        5..5
    );
    assert_eq!(summary(&drain(&mut core)), vec![(0, 5, 2)]);
    let err = core
        .on_ack(Ack {
            pipeline: 3,
            next: 1,
        })
        .expect_err("unknown");
    assert_eq!(
        err.to_string(),
        "ack for pipeline index 3, but hello listed 1 pipelines"
    );
    let err = core
        .on_ack(Ack {
            pipeline: 0,
            next: 4,
        })
        .expect_err("backwards");
    assert_eq!(
        err.to_string(),
        "ack for pipeline `clicks` goes backwards: next 4 after 5"
    );
    let err = core
        .on_ack(Ack {
            pipeline: 0,
            next: u64::MAX,
        })
        .expect_err("beyond");
    assert_eq!(
        err.to_string(),
        format!(
            "ack for pipeline `clicks` up to {}, but only sequences below 6 were sent",
            u64::MAX
        )
    );
    assert_eq!(
        core.on_ack(Ack {
            pipeline: 0,
            next: 6
        })
        .expect("ack")
        .sequences,
        5..6
    );
    assert!(core.is_idle());
}

#[test]
fn last_sequence_number_is_an_error_not_an_overflow() {
    let mut core = core(1, &[(u64::MAX, 0)]);
    let err = core
        .send(0, &event(0), Instant::now())
        .expect_err("exhausted");
    assert_eq!(err, ClientError::SequencesExhausted("p0".to_string()));
}

#[test]
fn unknown_pipeline_and_bad_config_are_errors() {
    let mut core = core(1, &[(0, 0)]);
    assert_eq!(
        core.send(1, &event(0), Instant::now()),
        Err(ClientError::UnknownPipeline { index: 1, count: 1 })
    );
    assert!(ProducerCore::new(config(&[])).is_err());
    assert!(ProducerCore::new(config(&["a", "a"])).is_err());
    let mut zero = config(&["a"]);
    zero.max_batch_events = 0;
    assert!(ProducerCore::new(zero).is_err());
}

#[test]
fn size_bound_holds_for_varied_events() {
    let events = [
        Event::new(Vec::new(), 0),
        Event::new(vec![1u8; 1], -1),
        Event::new(vec![2u8; 3], 7)
            .with_key(vec![3u8; 5])
            .with_route("r"),
        Event::new(vec![4u8; 1000], 7)
            .with_header("a", vec![1u8; 0])
            .with_header("content-type", b"application/json".to_vec())
            .with_header("x", vec![9u8; 33])
            .with_route("dead-letter"),
    ];
    for n in 1..=events.len() {
        let chosen = &events[..n];
        let bound: usize =
            BATCH_OVERHEAD_BYTES + chosen.iter().map(encoded_len_bound).sum::<usize>();
        let payload = weir_format::encode(chosen);
        assert!(payload.len() <= bound, "{} > {bound}", payload.len());
    }
    let many: Vec<Event> = (0..500).map(|i| events[i % events.len()].clone()).collect();
    let bound: usize = BATCH_OVERHEAD_BYTES + many.iter().map(encoded_len_bound).sum::<usize>();
    assert!(weir_format::encode(&many).len() <= bound);
}

fn encoded(events: std::ops::Range<usize>) -> EncodedBatch {
    let mut builder = BatchBuilder::default();
    for i in events {
        builder.push(&event(i));
    }
    EncodedBatch::new(Bytes::from(builder.finish())).expect("a valid batch")
}

#[test]
fn an_encoded_batch_follows_the_open_batch_with_the_next_sequence() {
    let now = Instant::now();
    let mut core = core(100, &[(7, 7)]);
    assert_eq!(send_all(&mut core, 0, 0..3, now), vec![7, 7, 7]);
    let batch = encoded(3..8);
    assert_eq!(batch.events(), 5);
    assert_eq!(
        core.send_batch(0, &batch).expect("queued"),
        SendOutcome::Queued { sequence: 8 }
    );
    let transmits = drain(&mut core);
    assert_eq!(summary(&transmits), vec![(0, 7, 3), (0, 8, 5)]);
    assert_eq!(transmits[1].payload, *batch.payload());
    assert_eq!(
        transmits[1].header,
        batch_header(0, 8, 5, batch.payload().len()).expect("header")
    );
    assert_eq!(core.next_sequence(0), Some(9));
}

#[test]
fn an_encoded_batch_is_verified_and_checked_against_the_limits() {
    assert!(matches!(
        EncodedBatch::new(Bytes::from_static(b"not a flatbuffer at all")),
        Err(ClientError::InvalidEncodedBatch(_))
    ));
    let mut config = config(&["p0"]);
    config.max_batch_events = 4;
    let mut core = ProducerCore::new(config).expect("valid config");
    let limits = Limits {
        max_events_per_frame: 4,
        ..Limits::DEFAULT
    };
    core.on_welcome(&welcome_with(limits, &[(0, 0)]))
        .expect("welcome");
    let batch = encoded(0..5);
    let error = core.send_batch(0, &batch).expect_err("over the limit");
    assert_eq!(
        error.to_string(),
        format!(
            "encoded batch of 5 events and {} frame bytes exceeds the server's limits (4 events, 4194304 bytes)",
            batch.payload().len() + BATCH_HEADER_BYTES
        )
    );
    assert_eq!(core.next_sequence(0), Some(0), "no sequence consumed");
}

#[test]
fn an_encoded_batch_waits_for_room_in_the_buffer() {
    let batch = encoded(0..10);
    let frame = LENGTH_BYTES + BATCH_HEADER_BYTES + batch.payload().len();
    let mut config = config(&["p0"]);
    config.max_buffer_bytes = frame + frame / 2;
    let mut core = ProducerCore::new(config).expect("valid config");
    core.on_welcome(&welcome(&[(0, 0)])).expect("welcome");
    assert_eq!(
        core.send_batch(0, &batch).expect("first"),
        SendOutcome::Queued { sequence: 0 }
    );
    assert_eq!(
        core.send_batch(0, &batch).expect("second"),
        SendOutcome::Full
    );
    assert_eq!(summary(&drain(&mut core)), vec![(0, 0, 10)]);
    core.on_ack(Ack {
        pipeline: 0,
        next: 1,
    })
    .expect("ack");
    assert_eq!(
        core.send_batch(0, &batch).expect("after the ack"),
        SendOutcome::Queued { sequence: 1 }
    );
}
