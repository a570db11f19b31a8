//! The bodies of the fuzz targets, one module per target.
//!
//! Each module has `run(data)`, which panics only when an invariant is broken, and
//! `seeds()`, the generator of its committed seed corpus. The same files are
//! compiled into the `vio` crate's `fuzz_corpus_targets` test (by `#[path]`), which
//! replays `corpus/<target>/` on stable Rust, so every module may use only crates
//! the `vio` crate depends on, and refers to its siblings as `super::`.

pub mod common;

pub mod blk_request;
pub mod copy_helper;
pub mod device_memory;
pub mod driver_used_ring;
pub mod grant_ops;
pub mod net_ctrl;
pub mod net_rx_mrg;
pub mod net_tx;
pub mod packed_walk;
pub mod vhost_user_reply;
pub mod vhost_user_session;
