//! Sharing model 4: Xen-style grant tables.
//!
//! The guest grants the backend access to its memory page by page and takes it back
//! after use; the backend reaches nothing else. A descriptor's `addr` is a grant
//! reference and an offset ([`addr`]), never a guest address.
//!
//! - [`GrantService`] is the hypervisor's grant machinery (privileged): one grant
//!   table per granting domain, with Xen's operations: grant and
//!   [`grant_range`](GrantService::grant_range), [`end_access`](GrantService::end_access)
//!   (refused while mapped), [`map`](GrantService::map) /
//!   unmap, [`copy`](GrantService::copy), [`accept_transfer`](GrantService::accept_transfer)
//!   and [`transfer`](GrantService::transfer). Every refusal is a typed
//!   [`GrantError`] and happens before any byte moves.
//! - [`pair`] builds the model on top: [`GrantDriver`] / [`GrantShare`] (the guest:
//!   ring pages granted for the queue's life, one-shot grants per buffer, a
//!   [`PersistentPool`] for hot paths, deferred revocation of mapped grants) and
//!   [`GrantDevice`] / [`GrantMemory`] (the backend: ring mappings, persistent
//!   mappings cached, everything else by grant copy).
//!
//! What the device can reach at any moment: its ring mappings (the descriptor table
//! and available ring read-only, enforced by the MMU), the pages it has mapped from
//! persistent grants, and, through the hypervisor's checked copy, the bytes of
//! grants currently given to it. Ring regions handed to the device (as
//! [`virtio_core::RingMemory`]) can be cloned, but a clone does not outlive the
//! queue: closing the queue drops its [`GrantMapping`]s, which revoke the mappings
//! (every region over them, clones included, is cut off and fails with
//! [`virtio_core::shm::RegionError::Revoked`]) before the pins are released, so the
//! guest frees and reuses ring pages only once no device view reaches them
//! (HOSTILE 37).
//!
//! # Example
//!
//! ```
//! use hypervisor::Hypervisor;
//! use transport_grant::{GrantService, pair};
//! use virtio_core::features::Features;
//! use virtio_core::{DeviceModel, DriverModel, GuestBuf, DeviceRing, DriverRing};
//!
//! let hv = Hypervisor::new();
//! let guest = hv.create_domain("guest", 1 << 20).unwrap();
//! let grants = GrantService::new(hv.clone());
//! let (driver_model, device_model) = pair(&grants, &guest, Hypervisor::HOST).unwrap();
//!
//! let features = Features::VERSION_1 | Features::INDIRECT_DESC;
//! let q = driver_model.create_queue(0, 8).unwrap();
//! let mut driver = DriverRing::new(8, q.ring, q.share, features).unwrap();
//! let dq = device_model.open_queue(0, 8, q.addrs).unwrap();
//! let mut device = DeviceRing::new(8, &dq.ring, dq.memory, features).unwrap();
//!
//! let mem = guest.memory();
//! let (req, resp) = (mem.alloc(5, 8).unwrap(), mem.alloc(16, 8).unwrap());
//! mem.write(req, b"hello").unwrap();
//! driver.add(&[GuestBuf::new(req, 5)], &[GuestBuf::new(resp, 16)], ()).unwrap();
//!
//! let chain = device.pop().unwrap().unwrap();
//! let mut buf = [0u8; 5];
//! chain.reader(device.memory()).read_exact(&mut buf).unwrap();
//! buf.make_ascii_uppercase();
//! let mut w = chain.writer(device.memory());
//! w.write_all(&buf).unwrap();
//! let written = w.written();
//! device.add_used(chain.head(), written).unwrap();
//!
//! assert_eq!(driver.pop_used().unwrap().unwrap().len, 5);
//! let mut out = [0u8; 5];
//! mem.read(resp, &mut out).unwrap();
//! assert_eq!(&out, b"HELLO");
//! // The request's grants were ended on completion.
//! assert_eq!(driver.share().live(), 0);
//! ```

#![forbid(unsafe_code)]

pub mod addr;
mod device;
mod driver;
mod error;
mod service;
mod table;

pub use device::{GrantDevice, GrantMemory, MAX_CACHED_PAGES};
pub use driver::{GrantDriver, GrantShare, GrantToken, PersistentPool};
pub use error::GrantError;
pub use service::{DEFAULT_TABLE_LIMIT, GrantCopy, GrantMapping, GrantService};
pub use table::{GrantRange, GrantRef, GrantState, PAGE_SIZE};

use hypervisor::{Domain, DomainId};
use std::sync::Arc;
use virtio_core::ModelError;

/// The two halves of the grant model for `guest`, whose device side runs as
/// `backend` ([`hypervisor::Hypervisor::HOST`] or another guest's id).
pub fn pair(
    service: &Arc<GrantService>,
    guest: &Arc<Domain>,
    backend: DomainId,
) -> Result<(GrantDriver, GrantDevice), ModelError> {
    let model = |e: GrantError| ModelError::Model(Box::new(e));
    let driver = GrantDriver::new(service, guest, backend).map_err(model)?;
    let device = GrantDevice::new(service, guest.id(), backend).map_err(model)?;
    Ok((driver, device))
}
