//! Fuzz target `driver_used_ring`: see `virtio_core_fuzz::driver_used_ring` for the input layout and the
//! invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio_core_fuzz::driver_used_ring::run(data);
});
