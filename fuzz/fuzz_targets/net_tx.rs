//! Fuzz target `net_tx`: see `virtio_core_fuzz::net_tx` for the input layout and the
//! invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio_core_fuzz::net_tx::run(data);
});
