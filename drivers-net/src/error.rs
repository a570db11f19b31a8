//! What can go wrong, for a frame or for the whole driver.

use virtio_core::ShareError;
use virtio_core::driver::SetupError;
use virtio_core::net::NetFeatures;
use virtio_core::notify::NotifyError;
use virtio_core::ring::split::DriverQueueError;
use virtio_core::transport::TransportError;

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
    /// Every slot of the queue (transmit, or control: commands that timed out
    /// and were not returned yet) is in flight, or the sharing model's room for
    /// buffers (a bounce area, grant entries) is taken by frames in flight; retry
    /// after the device used some.
    #[error("queue is full")]
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
    /// The device reports a `max_virtqueue_pairs` outside 1..0x8000 (MQ).
    #[error("device reports {0} queue pairs")]
    BadQueuePairs(u16),
    /// A queue-pair count outside what the driver set up (1..=`max`), or 0 asked
    /// for in [`NetOptions::queue_pairs`](crate::NetOptions::queue_pairs).
    #[error("{wanted} queue pairs outside 1..={max}")]
    QueuePairs {
        /// Pairs asked for.
        wanted: u16,
        /// Pairs set up.
        max: u16,
    },
    /// A queue pair that is not in use (transmit: not active; receive: not set
    /// up).
    #[error("queue pair {0} not in use")]
    NoPair(u16),
    /// A control command that needs a feature that was not negotiated.
    #[error("{0:?} not negotiated")]
    NotNegotiated(NetFeatures),
    /// Control-command data longer than a command slot holds.
    #[error("{0} bytes of control data exceed a command slot")]
    ControlTooLong(usize),
    /// The device answered a control command with VIRTIO_NET_ERR (or another
    /// value than VIRTIO_NET_OK), or returned it without an answer (`ack` None).
    #[error("device refused control command {class}/{command}")]
    CommandRefused {
        /// Class.
        class: u8,
        /// Command.
        command: u8,
        /// The ack byte, `None` if the device wrote none.
        ack: Option<u8>,
    },
    /// The device did not answer a control command within
    /// [`NetOptions::control_timeout`](crate::NetOptions::control_timeout).
    #[error("device did not answer a control command in time")]
    ControlTimeout,
    /// Bringing the device up failed; the device was marked FAILED and reset.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The transport could not send a notification.
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
