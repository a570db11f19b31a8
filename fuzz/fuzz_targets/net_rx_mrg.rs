//! Fuzz target `net_rx_mrg`: see `virtio_core_fuzz::net_rx_mrg` for the input
//! layout and the invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio_core_fuzz::net_rx_mrg::run(data);
});
