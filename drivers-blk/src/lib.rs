//! A virtio-blk driver (virtio 1.2 §5.2), written once for every sharing model.
//!
//! [`BlkDriver`] initializes a block device over any [`Transport`] and
//! [`DriverModel`], then moves requests through one or more split virtqueues:
//!
//! - **Raw API**, for polling loops and benchmarks: [`BlkDriver::submit`] any number
//!   of [`Request`]s, [`BlkDriver::kick`] once per batch, [`BlkDriver::poll`] the
//!   completions (out of order, NAPI-style) and [`BlkDriver::wait`] on the queue's
//!   interrupt when there is nothing to do.
//! - **Blocking calls**: `read_blocking`, `write_blocking`, `flush_blocking`,
//!   `discard_blocking`, `write_zeroes_blocking`, `get_id_blocking`, any number of
//!   threads at once.
//! - **Async calls**: `read`, `write`, `flush`, ... as futures, completed by
//!   [`BlkDriver::run_completions`] (one task per queue, awaiting the interrupt
//!   eventfd through tokio's `AsyncFd`).
//!
//! Data buffers are the caller's guest buffers ([`GuestBuf`], in the guest memory the
//! driver was given): the driver never copies them. The `*_bytes` calls copy
//! from or to ordinary slices through a driver-owned guest staging buffer instead.
//! Request headers, discard segments, ID replies and status bytes live in slots
//! preallocated per ring entry, so a request costs no allocation.
//!
//! # What it guarantees
//! - Requests are checked before they are sent: read-only devices, capacity,
//!   512-byte multiples, range limits and negotiated features, with checked
//!   arithmetic ([`BlkError::ReadOnly`], [`BlkError::OutOfRange`], ...).
//! - The device is not trusted (HOSTILE rule 31): the ring checks used ids, lengths
//!   and indices; this crate checks that the used length fits the request type and
//!   that the status byte is OK, IOERR or UNSUPP. A device that breaks a rule breaks
//!   its queue: every request on it fails with [`BlkError::DeviceBroken`], nobody
//!   hangs.
//! - Memory the device may still touch (request slots, staging buffers of cancelled
//!   futures or timed-out calls) is freed only after the device returned the request
//!   or acknowledged a reset.
//!
//! # Not done
//! Scatter-gather requests (one data buffer per request), multi-range discard,
//! toggling `writeback` (the transport has no config write), GET_LIFETIME and
//! SECURE_ERASE, per-queue reset after a device fault (drop the driver and start
//! again: dropping resets the device).
//!
//! # Example
//!
//! ```
//! use drivers_blk::{BlkDriver, BlkError, Completion, Request};
//! use virtio_core::transport::Transport;
//! use virtio_core::{DriverModel, GuestBuf};
//!
//! /// Reads 8 sectors with two requests in flight, then makes writes durable.
//! fn two_reads<D: DriverModel, T: Transport>(
//!     disk: &BlkDriver<D, T>,
//!     buf: GuestBuf, // 4 KiB of guest memory
//! ) -> Result<(), BlkError> {
//!     let half = buf.len / 2;
//!     let a = disk.submit(0, Request::Read { sector: 0, buf: GuestBuf::new(buf.addr, half) })?;
//!     let b = disk.submit(0, Request::Read { sector: 4, buf: GuestBuf::new(buf.addr + u64::from(half), half) })?;
//!     disk.kick(0)?;
//!     let mut left = 2;
//!     while left > 0 {
//!         disk.wait(0, None)?;
//!         for (id, result) in disk.poll(0, 16)? {
//!             assert!(id == a || id == b);
//!             assert_eq!(result?, Completion::Read);
//!             left -= 1;
//!         }
//!     }
//!     disk.flush_blocking(0)
//! }
//! ```
//!
//! [`Transport`]: virtio_core::transport::Transport
//! [`DriverModel`]: virtio_core::DriverModel
//! [`GuestBuf`]: virtio_core::GuestBuf

#![forbid(unsafe_code)]

mod asynch;
mod driver;
mod error;
mod info;
mod queue;
mod request;
mod staging;

pub use driver::BlkDriver;
pub use error::{BlkError, Broken};
pub use info::{BlkInfo, BlkOptions, RangeLimits};
pub use queue::{Polled, RequestId};
pub use request::{Completion, DeviceId, Request};
