//! Fuzz target `blk_request`: see `virtio_core_fuzz::blk_request` for the input layout and the
//! invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio_core_fuzz::blk_request::run(data);
});
