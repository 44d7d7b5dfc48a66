//! The device side of the sample stream: a persistent outbox, byte transports, and the
//! streamer that moves outbox samples to `divergen-host` exactly once.

pub mod outbox;
pub mod streamer;
pub mod synthetic;
pub mod transport;

pub use outbox::{Outbox, OutboxConfig, OutboxStats};
pub use streamer::{StreamConfig, StreamStats, Streamer};
pub use transport::Transport;
