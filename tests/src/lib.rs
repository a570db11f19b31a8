//! Shared pieces of the `vio` tool and the cross-crate tests.
pub mod report;
pub mod peer;
pub mod ring_bench;
