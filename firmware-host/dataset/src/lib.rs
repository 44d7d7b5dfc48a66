//! What the device side and the host side both write. The device depends on this crate and on
//! the wire protocol, never on the host's server.

pub mod files;
