//! Sharing models 2 and 3: a descriptor's `addr` is the driver's guest address.
//!
//! - [`direct`] (model 2, "descriptor page, direct"): the device holds a mapping of all
//!   guest memory and reads and writes the buffers itself, each range bounds-checked
//!   against guest memory.
//! - [`copy`] (model 3, "descriptor page + trusted hypervisor copy helper"): the device
//!   sees the descriptor table and the available ring read-only, the used ring
//!   writable, and no buffer memory at all. It asks the [`copy::CopyHelper`] to copy a
//!   range of a descriptor; the helper checks that the descriptor belongs to a chain the
//!   device currently owns (made available, not yet used) and that the range lies
//!   inside it, and refuses anything else with a [`copy::CopyError`].
//!
//! Both models place rings the same way ([`layout`]: each ring on pages of its own)
//! and share the same driver half ([`share::DirectShare`]: exposing a buffer is a
//! bounds check, indirect tables come from a per-queue pool in guest memory).
//!
//! What is guaranteed: a model-2 device reaches nothing outside guest memory; a model-3
//! device reaches only the rings, writes only the used ring, and moves buffer bytes only
//! through checked helper copies. Its ring regions can be cloned, but no clone outlives
//! the queue: closing the queue (the device dropping its [`CopyMemory`], or the driver
//! creating the queue again) revokes the ring mappings, and the driver returns ring
//! pages to the guest only after that (HOSTILE 37). What is not: model 2 gives the
//! device all of guest memory by design, ring pages included, also after the queue is
//! gone; model 3 page mappings cover whole pages, so a driver that puts other data on
//! its ring pages shows it to the device (this crate's drivers never do).
//!
//! # Example
//!
//! ```
//! use hypervisor::Hypervisor;
//! use transport_descriptors::copy;
//! use virtio_core::features::Features;
//! use virtio_core::{DeviceModel, DriverModel, GuestBuf, SplitDevice, SplitDriver};
//!
//! let hv = Hypervisor::new();
//! let guest = hv.create_domain("guest", 1 << 20).unwrap();
//! let (driver_model, device_model) = copy::pair(&guest).unwrap();
//! let features = Features::VERSION_1 | Features::EVENT_IDX;
//!
//! let q = driver_model.create_queue(0, 8).unwrap();
//! let mut driver = SplitDriver::new(8, q.ring, q.share, features).unwrap();
//! let dq = device_model.open_queue(0, 8, q.addrs).unwrap();
//! let mut device = SplitDevice::new(8, &dq.ring, dq.memory, features).unwrap();
//!
//! let mem = guest.memory();
//! let (req, reply) = (mem.alloc(5, 8).unwrap(), mem.alloc(16, 8).unwrap());
//! mem.write(req, b"hello").unwrap();
//! driver.add(&[GuestBuf::new(req, 5)], &[GuestBuf::new(reply, 16)], "req-1").unwrap();
//!
//! // The device copies through the helper; it has no mapping of `req` or `reply`.
//! let chain = device.pop().unwrap().unwrap();
//! let mut buf = [0u8; 5];
//! chain.reader(device.memory()).read_exact(&mut buf).unwrap();
//! chain.writer(device.memory()).write_all(&buf).unwrap();
//! device.add_used(chain.head(), 5).unwrap();
//!
//! let used = driver.pop_used().unwrap().unwrap();
//! assert_eq!((used.token, used.len), ("req-1", 5));
//! let mut back = [0u8; 5];
//! mem.read(reply, &mut back).unwrap();
//! assert_eq!(&back, b"hello");
//! ```
//!

#![forbid(unsafe_code)]

pub mod copy;
pub mod direct;
pub mod layout;
pub mod share;

pub use copy::{CopyDevice, CopyDriver, CopyError, CopyHelper, CopyMemory};
pub use direct::{DirectDevice, DirectDriver, DirectMemory};
pub use share::DirectShare;
