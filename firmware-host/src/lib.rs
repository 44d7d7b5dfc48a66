//! The host side of divergen's sample stream: accept devices and store their samples exactly
//! once in LVIS/COCO shards. The shard format itself (writer, reader, verifier) is
//! `divergen-dataset`, shared with devices that write locally; it is re-exported here.

pub mod server;

pub use divergen_dataset::{ShardDataset, Store, StoreConfig, coco, dataset, store, verify};
pub use server::{Server, ServerConfig, ServerStats};
