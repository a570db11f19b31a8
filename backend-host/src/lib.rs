//! The device side on the host.
//!
//! - [`blk`]: virtio-blk: request parsing that enforces the spec, and execution through
//!   io_uring (or a thread-pool fallback) with O_DIRECT and flushes that are honoured.

pub mod blk;
