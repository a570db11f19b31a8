//! What can go wrong, for a frame or for the whole driver.

use virtio_core::config::ConfigError;
use virtio_core::lifecycle::InitError;
use virtio_core::notify::NotifyError;
use virtio_core::ring::split::{DriverQueueError, RingSetupError};
use virtio_core::transport::TransportError;
use virtio_core::{ModelError, ShareError};

/// Why the driver stopped trusting a queue (HOSTILE rule 31). A broken queue stays
/// broken: every later call on it fails with [`NetError::DeviceBroken`]; only a new
/// driver (which resets the device) helps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    /// The ring check failed: a used id that was not outstanding, a used length above
    /// the buffer, a used index running ahead.
    #[error("device broke the virtqueue")]
    Ring(#[source] DriverQueueError),
    /// A receive buffer returned with fewer bytes than the header (and not 0, which
    /// means "returned unused").
    #[error("used length {0} is shorter than the 12-byte header")]
    ShortUsed(u32),
    /// A mergeable frame claiming 0 buffers or more than the queue holds.
    #[error("num_buffers {0} is impossible for this queue")]
    NumBuffers(u16),
    /// An earlier completion broke this queue.
    #[error("queue was broken by an earlier completion")]
    Earlier,
}

/// Why a call or the driver failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A frame shorter than an Ethernet header (checked before sending).
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    FrameTooShort(usize),
    /// A frame longer than the MTU allows (checked before sending).
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLong {
        /// Frame length.
        len: usize,
        /// Largest frame: Ethernet header plus MTU.
        max: usize,
    },
    /// Every transmit slot is in flight; retry after the device used some.
    #[error("transmit queue is full")]
    QueueFull,
    /// A partial checksum asked for without CSUM negotiated, or a checksum field
    /// outside the frame (checked before sending).
    #[error("partial checksum not possible for this frame")]
    BadChecksumRequest,
    /// The device broke the protocol; the queue is unusable.
    #[error("device is broken")]
    DeviceBroken(#[source] Broken),
    /// The device reports an MTU below 68 (virtio 1.2 §5.1.4.1).
    #[error("device reports an MTU of {0}, below 68")]
    BadMtu(u16),
    /// The device offers a receive or transmit queue too small to use.
    #[error("device offers no usable queue {0}")]
    NoQueue(u16),
    /// Fewer than two interrupt sources (receive, transmit).
    #[error("{0} interrupt sources for 2 queues")]
    MissingInterrupts(usize),
    /// Device initialization failed.
    #[error("device initialization failed")]
    Init(#[from] InitError),
    /// The configuration space kept changing under the driver.
    #[error("configuration space unreadable")]
    Config(#[from] ConfigError),
    /// The sharing model could not create a queue.
    #[error("sharing model could not create a queue")]
    Model(#[from] ModelError),
    /// The queue memory the model gave is unusable for a split ring.
    #[error("queue memory unusable")]
    Ring(#[from] RingSetupError),
    /// The transport refused a queue or a notification.
    #[error("transport failed")]
    Transport(#[from] TransportError),
    /// Waiting for an interrupt failed.
    #[error("waiting for an interrupt failed")]
    Notify(#[from] NotifyError),
    /// The sharing model refused a buffer.
    #[error("sharing model refused a buffer")]
    Share(#[source] ShareError),
    /// Guest memory allocation or access failed.
    #[error("guest memory")]
    Memory(#[from] hypervisor::MemoryError),
}
