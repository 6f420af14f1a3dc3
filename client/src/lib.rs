//! The weir producer library: streams events into a weir server over the `weir/1` protocol
//! (docs/PROTOCOL.md).
//!
//! This crate is built as a pure state machine with I/O around it, like quinn-proto: the
//! [`ProducerCore`] takes events, server frames and the current time as arguments and returns
//! decisions (ready-to-write batch frames, completed sequences, "buffer full"). It owns no
//! socket, no task and no clock, so every rule of the protocol (batching by size and linger,
//! per-pipeline sequence numbers, the bounded buffer of unacked batches, cumulative acks,
//! resending after a reconnect) is tested deterministically without a network. The QUIC layer
//! (connection, one control stream, one batch stream per pipeline, futures for acks) drives it:
//!
//! 1. send [`ProducerCore::hello`], feed the answer to [`ProducerCore::on_welcome`];
//! 2. [`ProducerCore::send`] each event (on [`SendOutcome::Full`], wait for an ack and retry);
//! 3. write what [`ProducerCore::poll_transmit`] yields on the pipeline's batch stream, wake up
//!    at [`ProducerCore::poll_timeout`] and call [`ProducerCore::handle_timeout`];
//! 4. feed `ack` frames to [`ProducerCore::on_ack`] and complete the futures of the returned
//!    sequences;
//! 5. on a lost connection call [`ProducerCore::on_disconnect`], reconnect, and start again at 1:
//!    the unacked batches come out of `poll_transmit` again with their original sequences.

mod producer;
pub mod tls;

pub use producer::{
    BATCH_OVERHEAD_BYTES, ClientError, Completed, ProducerConfig, ProducerCore, SendOutcome,
    Transmit, encoded_len_bound,
};
