//! Guest memory and the hypervisor, as the sharing models need them on one machine.
//!
//! - [`GuestMemory`]: a guest's memory, a memfd-backed arena at guest addresses that
//!   never include 0, page granular, with an allocator for the guest's own buffers.
//!   The guest (driver side) reaches all of it; others get only what a model allows.
//! - [`Hypervisor`] and [`Domain`]: the registry of guests. The hypervisor can map any
//!   page range of any guest with any protection ([`GuestMemory::map_pages`] makes a
//!   fresh mapping of just those pages), and the sharing models use that to hand a
//!   device side exactly its capability: a real read-only mapping of rings, a mapping
//!   of one shared area, a mapping of one granted page, or no mapping at all.
//!
//! Nothing here is global: two hypervisors, or two guests with different sharing
//! models, live side by side in one process.
//!
//! ```
//! use hypervisor::Hypervisor;
//!
//! let hv = Hypervisor::new();
//! let guest = hv.create_domain("guest-a", 1 << 20).unwrap();
//! let mem = guest.memory();
//! let buf = mem.alloc(64, 8).unwrap();
//! mem.write(buf, b"hello").unwrap();
//! // A device-side view of just that page, read-only: writes are refused.
//! let page = buf & !(mem.page_size() - 1);
//! let view = mem.map_pages(page, mem.page_size(), false).unwrap();
//! assert!(view.write(0, b"x").is_err());
//! ```

#![deny(unsafe_code)]

mod domain;
mod memory;
mod remap;

pub use domain::{Domain, DomainId, Hypervisor};
pub use memory::{GuestMemory, MemoryError};
