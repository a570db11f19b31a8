//! What can go wrong, for a request or for the whole driver.

use virtio_core::ShareError;
use virtio_core::driver::SetupError;
use virtio_core::notify::NotifyError;
use virtio_core::ring::split::DriverQueueError;
use virtio_core::transport::TransportError;

/// Why the driver stopped trusting a queue (HOSTILE rule 31). Once a queue is broken,
/// every request in flight on it fails with [`BlkError::DeviceBroken`] and no new one
/// is accepted; only a new driver (which resets the device) helps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    /// The ring check failed: a used id that was not outstanding, a used length above
    /// the writable bytes, a used index running ahead.
    #[error("device broke the virtqueue")]
    Ring(#[source] DriverQueueError),
    /// A used length the request type does not allow.
    #[error("used length {len} is not allowed for a request with {writable} writable bytes")]
    UsedLength {
        /// Length the device reported.
        len: u32,
        /// Device-writable bytes of the request (data in + status).
        writable: u32,
    },
    /// A status byte other than OK, IOERR or UNSUPP (or never written).
    #[error("status byte {0:#04x} is not a virtio-blk status")]
    Status(u8),
    /// An earlier request on this queue broke it.
    #[error("queue was broken by an earlier completion")]
    Earlier,
}

/// Why a request or the driver failed.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The device completed the request with VIRTIO_BLK_S_IOERR.
    #[error("device reported an I/O error")]
    IoError,
    /// The device completed the request with VIRTIO_BLK_S_UNSUPP, or the request needs
    /// a feature that was not negotiated (checked before sending).
    #[error("request not supported by the device")]
    Unsupported,
    /// A write, discard or write-zeroes on a read-only device (checked before sending).
    #[error("device is read-only")]
    ReadOnly,
    /// Sectors past the capacity, or a range the device limits refuse (checked before
    /// sending).
    #[error("sectors {sector}+{sectors} outside the device's {capacity} sectors or limits")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors asked for.
        sectors: u64,
        /// Capacity in sectors.
        capacity: u64,
    },
    /// A data length that is zero or not a multiple of 512 (virtio 1.2 §5.2.6.1).
    #[error("data length {0} is not a non-zero multiple of 512")]
    BadLength(u64),
    /// The device broke the protocol; the queue is unusable.
    #[error("device is broken")]
    DeviceBroken(#[source] Broken),
    /// No descriptor or request slot free; retry after completions.
    #[error("queue is full")]
    QueueFull,
    /// A queue index the driver did not set up.
    #[error("no queue {0}")]
    NoSuchQueue(u16),
    /// A blocking call gave up waiting; the request stays in flight and its buffers
    /// stay in use by the device until it completes.
    #[error("request timed out")]
    TimedOut,
    /// Another `run_completions` already serves this queue.
    #[error("a completion runner already serves queue {0}")]
    RunnerActive(u16),
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
    /// Registering the interrupt with the async runtime failed.
    #[error("async interrupt registration failed")]
    Runtime(#[source] std::io::Error),
}
