//! Fuzz target `copy_helper`: see `virtio_core_fuzz::copy_helper` for the input layout and the
//! invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio_core_fuzz::copy_helper::run(data);
});
