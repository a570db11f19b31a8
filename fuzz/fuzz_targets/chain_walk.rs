//! Fuzzes the split ring's device side: arbitrary bytes become a descriptor table,
//! indirect tables and a stream of available heads, and
//! `virtio_core::test_utils::raw::fuzz_chain_walk` checks every invariant of the walk.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio_core::test_utils::raw::fuzz_chain_walk(data);
});
