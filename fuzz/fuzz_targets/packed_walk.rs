//! Fuzz target `packed_walk`: see `virtio_core_fuzz::packed_walk` for the input layout and the
//! invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio_core_fuzz::packed_walk::run(data);
});
