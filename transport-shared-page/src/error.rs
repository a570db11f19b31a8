//! Errors of the shared-page model.

use hypervisor::MemoryError;
use virtio_core::ModelError;

/// Why the shared-page model could not be set up or could not give out a queue.
///
/// Returned inside [`ModelError::Model`] by [`pair`](crate::pair) and
/// [`DriverModel::create_queue`](virtio_core::DriverModel::create_queue).
#[derive(Debug, thiserror::Error)]
pub enum SharedPageError {
    /// A configuration value out of range; the string names the field.
    #[error("configuration value {0} is out of range")]
    BadConfig(&'static str),
    /// The region's size overflows the address space.
    #[error("shared region size overflows")]
    TooLarge,
    /// Allocating, zeroing or mapping the shared region failed.
    #[error("shared region could not be set up")]
    Memory(#[source] MemoryError),
    /// A queue index at or above the configured number of queues.
    #[error("queue {index} does not exist; the region holds {max} queues")]
    NoSuchQueue {
        /// The index asked for.
        index: u16,
        /// Configured number of queues.
        max: u16,
    },
    /// A queue larger than the region's ring slots.
    #[error("queue size {size} exceeds the configured maximum of {max}")]
    QueueTooLarge {
        /// The size asked for.
        size: u16,
        /// Configured maximum.
        max: u16,
    },
    /// The queue was created and its share is still alive: two shares over one
    /// bounce area would hand out the same bytes twice.
    #[error("queue {0} is already in use")]
    QueueInUse(u16),
    /// A device process's mapping of the region does not match the layout (or is
    /// read-only).
    #[error("a mapping of {got} bytes does not hold a writable region of {want} bytes")]
    RegionMismatch {
        /// Bytes mapped.
        got: u64,
        /// Bytes of the region the layout describes.
        want: u64,
    },
}

impl From<SharedPageError> for ModelError {
    fn from(e: SharedPageError) -> ModelError {
        ModelError::Model(Box::new(e))
    }
}
