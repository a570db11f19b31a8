//! Fuzz target `vhost_user_reply`: see `virtio_core_fuzz::vhost_user_reply` for the input layout and the
//! invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio_core_fuzz::vhost_user_reply::run(data);
});
