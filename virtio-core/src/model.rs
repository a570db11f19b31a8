//! How a sharing model sets up queues on each side.
//!
//! A sharing model is a pair: [`DriverModel`] for the guest that owns the memory and
//! [`DeviceModel`] for whoever serves its queues. The driver creates a queue's rings
//! and gets back the addresses it writes into the queue registers; the device opens the
//! queue from those addresses and gets ring memory plus a [`DeviceMemory`] restricted to
//! what its model allows. Drivers, devices and the conformance suite are written
//! against these traits only, so they run unchanged over every model.

use crate::access::DeviceMemory;
use crate::features::Features;
use crate::ring::areas::RingFormat;
use crate::ring::areas::RingMemory;
use crate::share::DriverShare;

/// The addresses a driver writes into a queue's registers (virtio 1.2 §4.1.4.3:
/// `queue_desc`, `queue_driver`, `queue_device`), in the model's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueueAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring ("driver area").
    pub avail: u64,
    /// Used ring ("device area").
    pub used: u64,
}

/// Why a model could not set up or open a queue.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The queue size is not a power of two between 1 and 32768.
    #[error("queue size {0} is not a power of two between 1 and 32768")]
    BadSize(u16),
    /// The addresses do not name ring memory the model can reach.
    #[error("queue addresses {0:x?} do not name reachable ring memory")]
    BadAddrs(QueueAddrs),
    /// Out of memory for rings or shared areas.
    #[error("no memory left for a queue of {0}")]
    NoMemory(u16),
    /// The model cannot serve a queue in this ring format.
    #[error("the sharing model does not serve {0:?} rings")]
    Format(RingFormat),
    /// The model refused for its own reason.
    #[error("sharing model refused the queue")]
    Model(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A queue as the driver sees it after setup.
#[derive(Debug)]
pub struct DriverQueue<S> {
    /// What to write into the queue registers.
    pub addrs: QueueAddrs,
    /// The rings in the driver's own memory.
    pub ring: RingMemory,
    /// The model's driver side for this queue.
    pub share: S,
}

/// A queue as the device sees it after opening.
#[derive(Debug)]
pub struct DeviceQueue<M> {
    /// The rings as the device may reach them.
    pub ring: RingMemory,
    /// How the device reaches descriptor memory.
    pub memory: M,
}

impl<M> DeviceQueue<M> {
    /// The same rings with the memory wrapped (or replaced) by `f`: how a model
    /// built on another model (one that records, refuses or misbehaves for a test)
    /// opens its queues.
    pub fn map_memory<N>(self, f: impl FnOnce(M) -> N) -> DeviceQueue<N> {
        DeviceQueue {
            ring: self.ring,
            memory: f(self.memory),
        }
    }
}

/// The driver side of a sharing model instance (one guest).
pub trait DriverModel {
    /// Per-queue sharing state.
    type Share: DriverShare;

    /// A short name for tables and logs ("shared-page", "direct", ...).
    fn name(&self) -> &'static str;

    /// Allocates and initialises the rings of queue `index` with `size` entries in
    /// ring `format`, shared as that format needs (a packed device writes the
    /// descriptor ring, §2.8.3).
    fn create_queue_in(
        &self,
        index: u16,
        format: RingFormat,
        size: u16,
    ) -> Result<DriverQueue<Self::Share>, ModelError>;

    /// Allocates and initialises split queue `index` with `size` entries.
    fn create_queue(&self, index: u16, size: u16) -> Result<DriverQueue<Self::Share>, ModelError> {
        self.create_queue_in(index, RingFormat::Split, size)
    }

    /// The ring features (`VIRTIO_F_RING_PACKED`, `VIRTIO_F_IN_ORDER`) this model
    /// can share queues under; a driver over it negotiates no others
    /// ([`Self::allowed`]). Both, unless the model watches the rings itself and
    /// reads them only one way (model 3's copy helper follows split rings entry by
    /// entry, so it refuses both: an in-order batch would leave it believing the
    /// device still owns chains the driver took back).
    fn ring_features(&self) -> Features {
        Features::RING_PACKED | Features::IN_ORDER
    }

    /// `wanted` without the ring features this model cannot share queues under.
    fn allowed(&self, wanted: u64) -> u64 {
        let ring = Features::RING_PACKED | Features::IN_ORDER;
        wanted & !(ring - self.ring_features()).bits()
    }
}

/// The device side of a sharing model instance (one device serving one guest).
pub trait DeviceModel {
    /// How the device reaches descriptor memory of a queue.
    type Memory: DeviceMemory;

    /// A short name for tables and logs.
    fn name(&self) -> &'static str;

    /// Opens queue `index` of `size` entries in ring `format` at the addresses the
    /// driver wrote. A model maps the areas through
    /// [`open_ring`](crate::ring::areas::open_ring) with its own way to reach one.
    fn open_queue_in(
        &self,
        index: u16,
        format: RingFormat,
        size: u16,
        addrs: QueueAddrs,
    ) -> Result<DeviceQueue<Self::Memory>, ModelError>;

    /// Opens split queue `index` of `size` entries at the addresses the driver wrote.
    fn open_queue(
        &self,
        index: u16,
        size: u16,
        addrs: QueueAddrs,
    ) -> Result<DeviceQueue<Self::Memory>, ModelError> {
        self.open_queue_in(index, RingFormat::Split, size, addrs)
    }
}
