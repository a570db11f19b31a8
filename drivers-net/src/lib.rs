//! A virtio-net driver (virtio 1.2 §5.1), written once for every sharing model.
//!
//! [`NetDriver`] initializes a network device over any [`Transport`] and
//! [`DriverModel`] and moves Ethernet frames through its queue pairs (pair `k`:
//! receive queue `2k`, transmit queue `2k + 1`; one pair unless MQ is negotiated):
//!
//! - **Transmit**: [`NetDriver::send`] copies a frame behind a zeroed
//!   `virtio_net_hdr` into a preallocated transmit slot and kicks if the device asks;
//!   completed slots are reclaimed before each send. [`NetDriver::send_partial_csum`]
//!   lets the device finish a checksum (CSUM).
//! - **Receive**, NAPI-style: [`NetDriver::poll_recv`] turns used-buffer
//!   notifications off, hands up to `budget` frames to a closure, turns them back on
//!   with a re-check once the ring is empty, and re-posts the buffers;
//!   [`NetDriver::wait_rx`] sleeps on the interrupt. Mergeable buffers (MRG_RXBUF)
//!   are assembled; partial checksums (GUEST_CSUM) are completed before the frame is
//!   handed up.
//!
//! - **Control queue** (CTRL_VQ, opt-in with [`NetOptions::CONTROL`]):
//!   [`NetDriver::set_promisc`], [`NetDriver::set_allmulti`] (CTRL_RX),
//!   [`NetDriver::set_mac`] (CTRL_MAC_ADDR), [`NetDriver::set_queue_pairs`] (MQ)
//!   and the raw [`NetDriver::control`] send one command and block until the
//!   device's ack or [`NetOptions::control_timeout`]; ERR, no answer and timeout
//!   are typed errors.
//! - **Multiqueue** (MQ): with [`NetOptions::queue_pairs`] above 1 the driver sets
//!   up that many pairs (at most `max_virtqueue_pairs`) and activates them with
//!   VQ_PAIRS_SET; [`NetDriver::send_on`], [`NetDriver::poll_recv_on`] and
//!   [`NetDriver::wait_rx_on`] name a pair, the plain calls use pair 0.
//!
//! Receive buffers, transmit slots and command slots are carved from one guest
//! allocation per queue at setup: the data path allocates nothing.
//!
//! With the `smoltcp` feature, `NetPhy` (`phy.rs`) makes the driver a
//! `smoltcp::phy::Device`, so the smoltcp TCP/IP stack runs over it: a full transmit
//! queue holds the frame back instead of losing it, a broken device drops frames
//! and is reported, never panics, and `NetPhy::wait` sleeps until a frame or a
//! smoltcp timer is due.
//!
//! # What it guarantees
//! - The device is not trusted (HOSTILE rule 31): the ring checks used ids, lengths
//!   and indices; this crate checks that a used receive buffer holds at least the
//!   header (0 means "returned unused" and is counted), that `num_buffers` is
//!   possible, that a partial checksum lies inside the frame, and that a frame fits
//!   the MTU. Received bytes are copied out once before they are looked at. A queue
//!   the device broke fails every call with [`NetError::DeviceBroken`].
//! - Buffer memory is freed only after the device acknowledged a reset.
//!
//! # Not done
//! MAC filter tables (MAC_TABLE_SET: only through [`NetDriver::control`]), VLAN
//! filtering, gratuitous announcements, RSS and hash reporting, the extra RX modes
//! (CTRL_RX_EXTRA), guest offload control; segmentation offloads (TSO/UFO, either
//! direction); a receive call over all pairs at once (poll each pair); async calls.
//!
//! # Example
//!
//! ```
//! use drivers_net::{NetDriver, NetError};
//! use virtio_core::transport::Transport;
//! use virtio_core::DriverModel;
//!
//! /// Sends a broadcast frame and waits for one frame back.
//! fn ping<D: DriverModel, T: Transport>(nic: &NetDriver<D, T>) -> Result<Vec<u8>, NetError> {
//!     let mut frame = vec![0xff; 6]; // broadcast
//!     frame.extend_from_slice(&nic.info().mac.unwrap_or([2, 0, 0, 0, 0, 1]));
//!     frame.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
//!     frame.extend_from_slice(b"hello");
//!     nic.send(&frame)?;
//!     loop {
//!         let mut got = None;
//!         nic.poll_recv(1, |f| got = Some(f.to_vec()))?;
//!         if let Some(f) = got {
//!             return Ok(f);
//!         }
//!         nic.wait_rx(None)?;
//!     }
//! }
//! ```
//!
//! [`Transport`]: virtio_core::transport::Transport
//! [`DriverModel`]: virtio_core::DriverModel

#![forbid(unsafe_code)]

mod ctrl;
mod driver;
mod error;
mod info;
mod rx;
mod tx;

pub use driver::{NetDriver, RX_QUEUE, TX_QUEUE};
pub use error::{Broken, NetError};
pub use info::{DEFAULT_MRG_BUF, DEFAULT_MTU, MAX_MRG_BUF, NetInfo, NetOptions};
pub use rx::RxStats;

#[cfg(feature = "smoltcp")]
mod phy;
#[cfg(feature = "smoltcp")]
pub use phy::{NetPhy, NetRxToken, NetTxToken};
