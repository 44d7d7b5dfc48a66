//! The host side of divergen's sample stream: accept devices, store their samples exactly once
//! in LVIS/COCO shards, verify what was written, and serve it to a burn trainer.

pub mod coco;
pub mod dataset;
pub mod server;
pub mod store;
pub mod verify;

pub use dataset::ShardDataset;
pub use server::{Server, ServerConfig, ServerStats};
pub use store::{Store, StoreConfig};
