//! The formats both ends agree on, with no I/O of their own beyond the
//! readers and writers they are handed: names and their order (`paths`),
//! HTTP headers, ranges and dates (`protocol`), manifests and listings
//! (`manifest`), sparse files' extents (`sparse`), and block signatures
//! and deltas (`delta`), exclude patterns (`exclude`). docs/protocol.md is
//! their contract.

pub mod delta;
pub(crate) mod exclude;
pub mod manifest;
pub mod paths;
pub mod protocol;
pub(crate) mod sparse;
