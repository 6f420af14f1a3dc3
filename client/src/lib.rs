//! The weir producer library: streams events into a weir server over the `weir/1` protocol
//! (docs/PROTOCOL.md).
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use weir_client::{ConnectOptions, Event, Producer};
//!
//! # async fn produce() -> Result<(), weir_client::ClientError> {
//! // The fingerprint `weir serve` printed when it generated its certificate.
//! let pin = "3f1c0d5e9a7b4c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d";
//! let addr = "127.0.0.1:4433".parse().expect("an address");
//! let options = ConnectOptions::new(addr, "sensor-7", ["clicks"])
//!     .pin(pin)?
//!     .token("s3cret")
//!     .linger(Duration::from_millis(5));
//! let producer = Producer::connect(options).await?;
//!
//! // One event, waiting for its acknowledgement: the server's sinks hold it.
//! let ack = producer
//!     .send("clicks", Event::new(r#"{"path":"/"}"#, 1_700_000_000_000).with_key("user-7"))
//!     .await?;
//! ack.await?;
//!
//! // Many events: `send` waits only when the buffer of unacked data is full; the returned
//! // futures may be dropped, and `flush` waits for every ack at once.
//! let clicks = producer.pipeline_index("clicks")?;
//! for i in 0..100_000 {
//!     let event = Event::new(format!(r#"{{"n":{i}}}"#), 1_700_000_000_000 + i);
//!     producer.send_to(clicks, &event).await?;
//! }
//! producer.flush().await?;
//! println!("{:?}", producer.stats());
//! producer.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! [`Producer::connect`] verifies the server by a pinned certificate fingerprint or a CA
//! ([`Trust`]), authenticates with a token or a client certificate, and starts a driver task
//! on the current tokio runtime. The driver writes each pipeline's batches on its own QUIC
//! stream, applies acks, and after a lost connection (timeout, reset, a retryable close,
//! `goaway`, or a second without a datagram from the server while batches wait for acks: a
//! live server acks within milliseconds, a restarted one may not hear from us for seconds
//! while QUIC's probe timeouts back off) reconnects with backoff under the same producer id
//! and resends what is unacked:
//! the server drops what it already accepted, so nothing is lost or duplicated. A `refuse`
//! that says to come back later (`TOO_MANY_PRODUCERS`, `SHUTTING_DOWN`) is retried the same
//! way, on the first connection too. [`ReconnectPolicy`] sets the backoff and when to give up
//! (default: 100 ms doubling up to 5 s, giving up after 300 s with [`ClientError::GaveUp`],
//! failing every pending ack); a first connection the network cannot make fails at once. A refusal or
//! error the protocol says not to retry (`UNAUTHENTICATED`, `UNKNOWN_PIPELINE`,
//! `INVALID_BATCH`, `SUPERSEDED`, …) stops the producer: every pending ack and later call
//! fails with a [`ClientError`] naming the code and the server's message.
//!
//! # The core
//!
//! This crate is built as a pure state machine with I/O around it, like quinn-proto: the
//! [`ProducerCore`] takes events, server frames and the current time as arguments and returns
//! decisions (ready-to-write batch frames, completed sequences, "buffer full"). It owns no
//! socket, no task and no clock, so every rule of the protocol (batching by size and linger,
//! per-pipeline sequence numbers, the bounded buffer of unacked batches, cumulative acks,
//! resending after a reconnect) is tested deterministically without a network. [`Producer`],
//! the QUIC layer (connection, one control stream, one batch stream per pipeline, futures for
//! acks), drives it:
//!
//! 1. send [`ProducerCore::hello`], feed the answer to [`ProducerCore::on_welcome`];
//! 2. [`ProducerCore::send`] each event (on [`SendOutcome::Full`], wait for an ack and retry);
//! 3. write what [`ProducerCore::poll_transmit`] yields on the pipeline's batch stream, wake up
//!    at [`ProducerCore::poll_timeout`] and call [`ProducerCore::handle_timeout`];
//! 4. feed `ack` frames to [`ProducerCore::on_ack`] and complete the futures of the returned
//!    sequences;
//! 5. on a lost connection call [`ProducerCore::on_disconnect`], reconnect, and start again at 1:
//!    the unacked batches come out of `poll_transmit` again with their original sequences.

mod client;
mod driver;
mod options;
mod producer;
pub mod tls;

pub use client::{AckFuture, Producer, Stats};
pub use options::{ConnectOptions, ReconnectPolicy, Trust};
pub use producer::{
    BATCH_OVERHEAD_BYTES, ClientError, Completed, EncodedBatch, ProducerConfig, ProducerCore,
    SendOutcome, Transmit, code_label, encoded_len_bound,
};
pub use weir_format::Event;
pub use weir_format::frame::ErrorCode;
