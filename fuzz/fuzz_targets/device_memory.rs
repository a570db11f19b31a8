//! Fuzz target `device_memory`: see `virtio_core_fuzz::device_memory` for the input layout and the
//! invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio_core_fuzz::device_memory::run(data);
});
