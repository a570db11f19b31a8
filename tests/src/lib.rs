//! Shared pieces of the `vio` tool and the cross-crate tests.
pub mod barrier;
pub mod blk_bench;
pub mod conformance;
pub mod hostile_model;
pub mod linux_guest;
pub mod model_bench;
pub mod models;
pub mod net_bench;
pub mod net_rig;
pub mod peer;
pub mod progress;
pub mod report;
pub mod ring_bench;
pub mod smol;
pub mod vd_peer;
pub mod vhost_bench;
