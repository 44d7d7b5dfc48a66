//! The dataset both sides write and read: the LVIS/COCO annotation model (`coco`), the durable
//! shard store with its journal and sealer (`store`), burn's `Dataset` over the shards
//! (`dataset`), the check of a written folder (`verify`), and the file helpers they share
//! (`files`). The device depends on this crate and on the wire protocol, never on the host's
//! server.

pub mod coco;
pub mod dataset;
pub mod files;
pub mod store;
pub mod verify;

pub use dataset::ShardDataset;
pub use store::{Store, StoreConfig};
