//! The device side on the host.
//!
//! - [`blk`]: virtio-blk: request parsing that enforces the spec, and execution through
//!   io_uring (or a thread-pool fallback) with O_DIRECT and flushes that are honoured.
//! - [`net`]: virtio-net: a device per guest port and a learning L2 switch between
//!   ports, with per-source backlogs and drops counted per reason, and a TAP port
//!   for the host's own network stack.
//! - [`vhost_user`]: these devices served to a VMM in another process over
//!   vhost-user (the `vio-host` binary).

// Unsafe code lives only in the modules that say `allow(unsafe_code)`: the io_uring
// engine, the TAP ioctl and the SIGBUS handler.
#![deny(unsafe_code)]

pub mod blk;
pub mod net;
mod poll;
pub mod vhost_user;
