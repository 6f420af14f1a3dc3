//! Where batches come from. Each source turns its own input into verified batches, hands them
//! to a pipeline, and learns from the pipeline when the sinks accepted them: [`quic`] is the
//! `weir/1` server (producers, sequences, acks).

pub mod quic;
