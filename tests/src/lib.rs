//! Shared pieces of the `vio` tool and the cross-crate tests.
