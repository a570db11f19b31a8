//! Sharing model 1, "shared page": the rings and a bounce area live in one shared
//! region, and buffer bytes move by copying.
//!
//! [`pair`] allocates one region of whole pages in the guest's memory, holding every
//! queue's rings and a bounce area per queue ([`Layout`]), and hands the device side
//! a separate mapping of only those pages. Descriptor addresses are offsets into the
//! region.
//!
//! - Driver side ([`SharedPageDriver`], [`SharedPageShare`]): before a buffer goes
//!   into a descriptor, the share copies a device-readable buffer into a block of the
//!   queue's bounce area (or zeroes a block for a device-writable one); after use it
//!   copies exactly the used bytes back and frees the block. Indirect tables are
//!   placed in the bounce area too. The allocator ([`bounce`]) is a buddy allocator
//!   with quick lists: O(1) in steady state, no heap allocation per buffer.
//! - Device side ([`SharedPageDevice`], [`SharedPageMemory`]): checks the ring
//!   addresses the driver wrote, and reaches descriptor memory only inside that
//!   queue's bounce area. A descriptor naming the rings, another queue's bounce area
//!   or anything past the region gets a typed [`AccessError`](virtio_core::AccessError).
//!
//! For a device in another process, [`pair_for_process`] gives the region's pages a
//! file of their own, mapped in place in the guest, and returns that file for the
//! device process, which builds its side with [`SharedPageDevice::from_region`]
//! (the `vio-isolation` crate runs it so, HOSTILE 39).
//!
//! What it guarantees: the device can reach the shared region and nothing else of the
//! guest (its only mapping is those pages), and the guest receives from a
//! device-writable buffer no more than the used length, with zeros wherever the
//! device claimed bytes it did not write. What it does not: confidentiality of
//! anything the guest puts into a device-readable buffer, or integrity of the
//! region against the device, which may scribble anywhere in it; the driver's ring
//! checks (HOSTILE rule 31) contain the damage to this device's queues.
//!
//! # Example
//!
//! ```
//! use hypervisor::Hypervisor;
//! use transport_shared_page::{SharedPageConfig, pair};
//! use virtio_core::features::Features;
//! use virtio_core::{DeviceModel, DriverModel, GuestBuf, DeviceRing, DriverRing};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let hv = Hypervisor::new();
//! let guest = hv.create_domain("guest", 16 << 20)?;
//! let (drv_model, dev_model) = pair(&guest, SharedPageConfig::default())?;
//! let features = Features::VERSION_1 | Features::EVENT_IDX;
//!
//! let q = drv_model.create_queue(0, 256)?;
//! let dq = dev_model.open_queue(0, 256, q.addrs)?;
//! let mut driver = DriverRing::new(256, q.ring, q.share, features)?;
//! let mut device = DeviceRing::new(256, &dq.ring, dq.memory, features)?;
//!
//! // The guest's buffers live outside the shared region; the share bounces them.
//! let mem = guest.memory();
//! let (req, resp) = (mem.alloc(5, 8)?, mem.alloc(5, 8)?);
//! mem.write(req, b"hello")?;
//! driver.add(&[GuestBuf::new(req, 5)], &[GuestBuf::new(resp, 5)], "req")?;
//!
//! let chain = device.pop()?.expect("one chain");
//! let mut buf = [0u8; 5];
//! chain.reader(device.memory()).read_exact(&mut buf)?;
//! buf.make_ascii_uppercase();
//! chain.writer(device.memory()).write_all(&buf)?;
//! device.add_used(chain.head(), 5)?;
//!
//! let used = driver.pop_used()?.expect("one used");
//! assert_eq!((used.token, used.len), ("req", 5));
//! mem.read(resp, &mut buf)?;
//! assert_eq!(&buf, b"HELLO");
//! assert_eq!(driver.share().live(), 0, "bounce space returned");
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod bounce;
mod device;
mod driver;
mod error;
mod layout;

pub use device::{SharedPageDevice, SharedPageMemory};
pub use driver::{BounceToken, SharedPageDriver, SharedPageShare, pair, pair_for_process};
pub use error::SharedPageError;
pub use layout::{Layout, MAX_BOUNCE_PER_QUEUE, SharedPageConfig};
