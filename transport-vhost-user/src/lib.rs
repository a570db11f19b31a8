//! Our drivers as a vhost-user front-end: a virtio [`Transport`] whose device is a
//! vhost-user back-end in another process (qemu-storage-daemon, our `vio-host`, any
//! other), so `drivers-blk` runs unchanged against it.
//!
//! - [`transport`]: [`VhostUserTransport`], the status state machine kept on the
//!   front-end side and turned into vhost-user messages.
//! - `channel` (private): the socket, every request under a
//!   deadline, each reply framed by its header and checked, descriptors sent with
//!   `SCM_RIGHTS`. Ours, not rust-vmm's `vhost_user::Frontend`, which cannot bound a
//!   request in time nor frame a reply by its header (the module says exactly where).
//! - [`protocol`]: the wire format: rust-vmm's (`vhost::vhost_user::message`) request
//!   codes, bodies and feature bits, and the header that crate keeps private.
//! - [`error`]: what goes wrong, [`VhostUserError`].
//!
//! # Memory
//! The driver side uses sharing model 2 ("direct", `transport_descriptors::direct`):
//! descriptors hold guest addresses of one [`GuestMemory`], a memfd that SET_MEM_TABLE
//! hands to the back-end whole. The back-end can then read and write all of that
//! memory, as a vhost-user back-end always can; the driver keeps nothing else there.
//!
//! # What it guarantees
//! - No call waits on the back-end without a limit: every request's round trip is
//!   bounded by [`VhostUserOptions::timeout`]; a closed socket, a timeout or a
//!   malformed reply is a typed [`VhostUserError`], kept by the transport
//!   ([`VhostUserTransport::broken`]) and shown to the driver as
//!   DEVICE_NEEDS_RESET.
//! - A reset reads status 0 only after GET_VRING_BASE stopped every started ring,
//!   so a driver frees ring and buffer memory only when the back-end has let go of
//!   it (virtio 1.2 §2.4). A back-end that cannot confirm it leaves the status
//!   non-zero, and the driver leaks rather than reuses that memory.
//! - The driver never sees vhost's own feature bits (`VHOST_USER_F_PROTOCOL_FEATURES`,
//!   `VHOST_F_LOG_ALL`); configuration writes
//!   reach the back-end only for fields the device type declares writable.
//!
//! # What it does not do
//! Reconnecting (a broken transport stays broken: make a new one), in-flight
//! tracking (INFLIGHT_SHMFD), the back-end request channel (so no configuration
//! change notifications: the configuration is re-read at each generation read),
//! packed rings, migration and dirty logging, more than one memory region.
//!
//! # Example
//!
//! ```no_run
//! use drivers_blk::{BlkDriver, BlkOptions};
//! use hypervisor::Hypervisor;
//! use transport_vhost_user::{VhostUserOptions, VhostUserTransport};
//!
//! let guest = Hypervisor::new().create_domain("guest", 64 << 20)?;
//! // Model 2's driver half; the device half is the back-end's business.
//! let model = transport_descriptors::direct::driver(&guest);
//! let memory = guest.memory().clone();
//! let transport = VhostUserTransport::connect(
//!     "/run/vhost-user-blk.sock".as_ref(),
//!     memory.clone(),
//!     VhostUserOptions::blk(),
//! )?;
//! let opts = BlkOptions { queues: 2, ..BlkOptions::default() };
//! let disk = BlkDriver::new(transport, model, memory, opts)?;
//! let mut sector = [0u8; 512];
//! disk.read_bytes_blocking(0, 0, &mut sector)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`Transport`]: virtio_core::transport::Transport
//! [`GuestMemory`]: hypervisor::GuestMemory

#![forbid(unsafe_code)]

mod channel;
pub mod error;
pub mod protocol;
mod reconnect;
pub mod transport;

pub use error::VhostUserError;
pub use protocol::ProtocolFeatures;
pub use transport::{BackendInfo, MAX_QUEUES, VhostUserOptions, VhostUserTransport};
