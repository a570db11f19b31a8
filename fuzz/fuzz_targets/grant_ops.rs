//! Fuzz target `grant_ops`: see `virtio_core_fuzz::grant_ops` for the input layout and the
//! invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio_core_fuzz::grant_ops::run(data);
});
