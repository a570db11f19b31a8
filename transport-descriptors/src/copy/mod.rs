//! Model 3, "descriptor page + trusted hypervisor copy helper".
//!
//! A descriptor's `addr` is a guest address, as in model 2, but the device never sees
//! buffer memory. It gets a read-only view of the descriptor table and the available
//! ring (a real read-only mapping of their pages), a writable used ring, and a handle to
//! the [`CopyHelper`], which copies "(queue, head, descriptor, offset, length)" between
//! guest memory and the device's own memory after checking that the descriptor is in a
//! chain the device currently owns.
//!
//! The point of the model: the helper trusts the descriptor table and the available
//! ring because the guest wrote them and the device cannot; it trusts nothing the
//! device wrote (the used ring, the [`Segment`]s it passes). So a device can only ever
//! reach buffers the guest handed it, for as long as it holds them, in the direction
//! the guest allowed.
//!
//! The driver side is model 2's: same ring placement, same [`DirectShare`]. Creating a
//! queue also publishes its addresses to the helper, standing in for the queue
//! registers the hypervisor would see; the device can open only those.
//!
//! The ring mappings the device gets are the helper's to take back: closing the queue
//! (dropping [`CopyMemory`]), opening it again, or the driver creating it again revokes
//! them ([`virtio_core::shm::Mapping::revoke`]), so a device that cloned its ring
//! regions reaches nothing through the clones once the queue is closed, and the driver
//! frees the old ring pages only after the revocation succeeded (HOSTILE 37).
//!
//! # Limits
//!
//! The used ring is writable by the device, as the model prescribes, so a device can
//! rewrite a used element after the helper has accounted it: the helper revokes the
//! head it read, while the driver may later read, and reclaim, another head from the
//! same slot. That other head stays reachable for the device until it is completed
//! again. Closing the gap needs the hypervisor to publish used elements on the
//! device's behalf (a used ring read-only to the device), or the driver side to tell
//! the helper which heads it reclaims.

mod helper;
mod tracker;

pub use helper::{CopyError, CopyHelper};

use hypervisor::Domain;
use std::sync::Arc;
use virtio_core::{
    AccessError, DeviceMemory, DeviceModel, DeviceQueue, DriverModel, DriverQueue, ModelError, QueueAddrs,
    ReadOp, Segment, WriteOp,
};

use crate::layout::GuestRings;
use crate::share::DirectShare;
use virtio_core::features::Features;
use virtio_core::ring::areas::RingFormat;

/// Creates both sides of model 3 for `guest`, with a fresh copy helper between them.
pub fn pair(guest: &Arc<Domain>) -> Result<(CopyDriver, CopyDevice), ModelError> {
    let helper = CopyHelper::new(guest.memory().clone());
    Ok((
        CopyDriver {
            rings: GuestRings::new(guest.clone()),
            helper: helper.clone(),
        },
        CopyDevice { helper },
    ))
}

/// Driver side of model 3: model 2's placement and share, plus publishing each queue's
/// addresses to the helper.
#[derive(Debug)]
pub struct CopyDriver {
    rings: GuestRings,
    helper: Arc<CopyHelper>,
}

impl DriverModel for CopyDriver {
    type Share = DirectShare;

    fn name(&self) -> &'static str {
        "hypervisor-copy"
    }

    /// Neither the packed ring nor IN_ORDER: the helper follows split rings one used
    /// entry per chain (see the tracker), and an in-order batch, one entry for many
    /// chains, would leave it believing the device still owns chains the driver
    /// took back and reuses.
    fn ring_features(&self) -> Features {
        Features::empty()
    }

    fn create_queue_in(
        &self,
        index: u16,
        format: RingFormat,
        size: u16,
    ) -> Result<DriverQueue<DirectShare>, ModelError> {
        // The copy helper tracks split rings only (see `open_queue_in`).
        if format != RingFormat::Split {
            return Err(ModelError::Format(format));
        }
        if index >= CopyHelper::MAX_QUEUES {
            return Err(ModelError::Model(Box::new(CopyError::BadQueue(index))));
        }
        // Take the old queue's rings away from the device before `create` returns its
        // pages to the guest's allocator (HOSTILE 37); if that fails, keep the pages.
        self.helper.withdraw(index)?;
        let q = self.rings.create(index, size)?;
        self.helper.publish(index, size, q.addrs)?;
        Ok(q)
    }
}

/// Device side of model 3: nothing but a handle to the helper.
#[derive(Debug, Clone)]
pub struct CopyDevice {
    helper: Arc<CopyHelper>,
}

impl CopyDevice {
    /// The helper, for devices that batch copies across queues themselves.
    pub fn helper(&self) -> &Arc<CopyHelper> {
        &self.helper
    }
}

impl DeviceModel for CopyDevice {
    type Memory = CopyMemory;

    fn name(&self) -> &'static str {
        "hypervisor-copy"
    }

    fn open_queue_in(
        &self,
        index: u16,
        format: RingFormat,
        size: u16,
        addrs: QueueAddrs,
    ) -> Result<DeviceQueue<CopyMemory>, ModelError> {
        // The helper checks every copy against the split ring it tracks (`tracker.rs`):
        // a packed ring would need a tracker of its own.
        if format != RingFormat::Split {
            return Err(ModelError::Format(format));
        }
        let (ring, generation) = self.helper.open(index, size, addrs)?;
        Ok(DeviceQueue {
            ring,
            memory: CopyMemory {
                helper: self.helper.clone(),
                queue: index,
                generation,
            },
        })
    }
}

/// How a model-3 device reaches descriptor memory of one queue: every access is one
/// checked helper call, a batch is one call too. Dropping it closes the queue with the
/// helper.
///
/// Costs: [`check`](DeviceMemory::check) is a helper call without a copy;
/// [`read`](DeviceMemory::read) / [`write`](DeviceMemory::write) one helper call with
/// one `memcpy`; [`read_batch`](DeviceMemory::read_batch) /
/// [`write_batch`](DeviceMemory::write_batch) one helper call (one lock, one used-ring
/// check) for the whole batch.
#[derive(Debug)]
pub struct CopyMemory {
    helper: Arc<CopyHelper>,
    queue: u16,
    generation: u64,
}

impl CopyMemory {
    /// The queue index this memory serves.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// The helper behind it.
    pub fn helper(&self) -> &Arc<CopyHelper> {
        &self.helper
    }
}

impl DeviceMemory for CopyMemory {
    fn check(&self, seg: &Segment) -> Result<(), AccessError> {
        Ok(self.helper.check_as(self.queue, Some(self.generation), seg)?)
    }

    #[inline]
    fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError> {
        let mut ops = [ReadOp {
            seg: *seg,
            offset,
            dst,
        }];
        Ok(self.helper.read_as(self.queue, Some(self.generation), &mut ops)?)
    }

    #[inline]
    fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError> {
        let ops = [WriteOp {
            seg: *seg,
            offset,
            src,
        }];
        Ok(self.helper.write_as(self.queue, Some(self.generation), &ops)?)
    }

    fn read_batch(&self, ops: &mut [ReadOp<'_>]) -> Result<(), AccessError> {
        Ok(self.helper.read_as(self.queue, Some(self.generation), ops)?)
    }

    fn write_batch(&self, ops: &[WriteOp<'_>]) -> Result<(), AccessError> {
        Ok(self.helper.write_as(self.queue, Some(self.generation), ops)?)
    }
}

impl Drop for CopyMemory {
    fn drop(&mut self) {
        self.helper.close(self.queue, self.generation);
    }
}
