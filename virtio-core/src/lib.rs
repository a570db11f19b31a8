//! Virtqueues for VIRTIO 1.2, written once for every way of sharing memory.
//!
//! - [`ring::split`]: the split virtqueue, driver side ([`SplitDriver`]) and device side
//!   ([`SplitDevice`]), with EVENT_IDX and indirect descriptors, validating everything
//!   the other side wrote.
//! - The sharing-model seam: [`DriverShare`] (how a driver exposes its buffers) and
//!   [`DeviceMemory`] (how a device reaches descriptor memory). Each sharing model
//!   implements both; rings and drivers never know which model is in use.
//! - [`shm::Region`]: shared memory, reached only through atomics and copies.
//! - [`features`], [`status`], [`config`], [`lifecycle`]: negotiation, the device
//!   status state machine, configuration space and driver initialisation.
//! - [`notify`]: notifications (eventfd and in-process) and the event-index rule.
//! - [`transport`]: the driver's view of a device and an in-process transport.
//! - [`driver`]: a driver's bring-up and teardown of its device, written once.
//! - [`blk`], [`net`]: the virtio-blk and virtio-net device types; each keeps what
//!   travels on its queues in a `wire` module (parse and emit side by side).
//!
//! # Example
//!
//! A driver and a device sharing one queue in one process (feature `test-utils`
//! supplies the arena and an identity sharing model):
//!
//! ```
//! # #[cfg(feature = "test-utils")] {
//! use virtio_core::features::Features;
//! use virtio_core::test_utils::{Arena, IdentityShare};
//! use virtio_core::{GuestBuf, SplitDevice, SplitDriver};
//!
//! let arena = Arena::new(0x10_0000, 1 << 20).unwrap();
//! let (_, ring) = arena.alloc_split_ring(8).unwrap();
//! let features = Features::VERSION_1 | Features::EVENT_IDX;
//! let share = IdentityShare::new(arena.clone(), 8);
//! let mut driver = SplitDriver::new(8, ring.clone(), share, features).unwrap();
//! let mut device = SplitDevice::new(8, &ring, arena.clone(), features).unwrap();
//!
//! let request = arena.alloc(5, 1).unwrap();
//! arena.write(request, b"hello").unwrap();
//! let reply = arena.alloc(16, 1).unwrap();
//! driver.add(&[GuestBuf::new(request, 5)], &[GuestBuf::new(reply, 16)], "req-1").unwrap();
//! assert!(driver.kick_prepare());
//!
//! let chain = device.pop().unwrap().unwrap();
//! let mut buf = [0u8; 5];
//! chain.reader(device.memory()).read_exact(&mut buf).unwrap();
//! let mut w = chain.writer(device.memory());
//! w.write_all(&buf).unwrap();
//! let written = w.written();
//! device.add_used(chain.head(), written).unwrap();
//!
//! let used = driver.pop_used().unwrap().unwrap();
//! assert_eq!((used.token, used.len), ("req-1", 5));
//! # }
//! ```

// Unsafe code lives only in the modules that say `allow(unsafe_code)` (shm, reactor).
#![deny(unsafe_code)]

pub mod access;
pub mod blk;
pub mod config;
pub mod driver;
pub mod features;
pub mod lifecycle;
pub mod model;
pub mod net;
pub mod notify;
#[cfg(feature = "tokio")]
pub mod reactor;
pub mod ring;
pub mod share;
pub mod shm;
pub mod status;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod transport;

pub use access::{AccessError, DescSlot, DeviceMemory, ReadOp, Segment, WriteOp};
pub use model::{DeviceModel, DeviceQueue, DriverModel, DriverQueue, ModelError, QueueAddrs};
pub use ring::areas::RingMemory;
pub use ring::queue::{DeviceRing, DriverRing};
pub use ring::split::{SplitDevice, SplitDriver};
pub use share::{Direction, DriverShare, Exposed, GuestBuf, ShareError};
