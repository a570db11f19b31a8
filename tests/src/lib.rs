//! Shared pieces of the `vio` tool and the cross-crate tests.
pub mod peer;
pub mod report;
pub mod ring_bench;
