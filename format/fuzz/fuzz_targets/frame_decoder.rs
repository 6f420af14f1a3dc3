//! Fuzzes `weir_format::frame::Decoder` with arbitrary bytes in arbitrary chunkings.
//!
//! Input: byte 0 picks the stream (client control, server control, batch stream with the
//! default limits, batch stream with tiny limits), byte 1 seeds the chunk sizes, the rest is the
//! stream. Checked: no panic; the same frames and the same error whether the stream arrives in
//! one piece or in chunks; every decoded frame re-encodes to exactly the bytes it came from; a
//! batch payload's verification never panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_format::frame::{self, Decoder, Frame, Limits};

/// What a decoder made of a stream.
#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Frame>,
    /// Bytes up to the end of the last decoded frame.
    consumed: usize,
    /// The first error, as text (`decode` or `finish`).
    error: Option<String>,
}

fn decoder(kind: u8) -> Decoder {
    match kind % 4 {
        0 => Decoder::control_from_client(),
        1 => Decoder::control_from_server(),
        2 => Decoder::batch_stream(Limits::DEFAULT, 2),
        _ => Decoder::batch_stream(
            Limits {
                max_frame_bytes: 64,
                max_events_per_frame: 3,
                max_in_flight: 1,
            },
            1,
        ),
    }
}

fn run(mut decoder: Decoder, chunks: &[&[u8]]) -> Outcome {
    let mut frames = Vec::new();
    let mut offset = 0;
    let mut consumed = 0;
    for chunk in chunks {
        let mut input = *chunk;
        loop {
            let before = input.len();
            let result = decoder.decode(&mut input);
            offset += before - input.len();
            match result {
                Ok(Some(frame)) => {
                    frames.push(frame);
                    consumed = offset;
                }
                Ok(None) => {
                    assert!(
                        input.is_empty(),
                        "decoder stopped before the end of its input"
                    );
                    break;
                }
                Err(e) => {
                    return Outcome {
                        frames,
                        consumed,
                        error: Some(e.to_string()),
                    };
                }
            }
        }
    }
    let error = decoder.finish().err().map(|e| e.to_string());
    Outcome {
        frames,
        consumed,
        error,
    }
}

fuzz_target!(|data: &[u8]| {
    let [kind, seed, stream @ ..] = data else {
        return;
    };
    let whole = run(decoder(*kind), &[stream]);

    // Chunk sizes from a small LCG seeded by byte 1: 0 to 2 * (seed + 1) bytes each, so both
    // byte-by-byte and large chunks occur (empty chunks too).
    let mut chunks = Vec::new();
    let mut rest = stream;
    let mut state = u32::from(*seed).wrapping_mul(2_654_435_761) | 1;
    let spread = 2 * (usize::from(*seed) + 1);
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = ((state >> 16) as usize % (spread + 1)).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        chunks.push(chunk);
        rest = tail;
    }
    let chunked = run(decoder(*kind), &chunks);
    assert_eq!(whole, chunked, "chunking changed the outcome");

    let mut reencoded = Vec::new();
    for frame in &whole.frames {
        frame::encode(frame, &mut reencoded).expect("a decoded frame encodes");
        if let Frame::Batch(batch) = frame {
            if let Ok(view) = batch.verify() {
                assert_eq!(view.len(), batch.event_count as usize);
                for event in view.iter() {
                    let _ = event.to_event();
                }
            }
        }
    }
    assert_eq!(
        reencoded,
        stream[..whole.consumed],
        "decoded frames re-encode to other bytes"
    );
});
