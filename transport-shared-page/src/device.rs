//! The device side: a mapping of the shared region and nothing else.

use crate::error::SharedPageError;
use crate::layout::Layout;
use std::fmt;
use std::ops::Range;
use virtio_core::ring::areas::{RingFormat, open_ring};
use virtio_core::ring::layout::SplitLayout;
use virtio_core::shm::Region;
use virtio_core::{AccessError, DeviceMemory, DeviceModel, DeviceQueue, ModelError, QueueAddrs, Segment};

/// The device's side of a shared-page region.
///
/// Holds a mapping of the region's pages, made by the hypervisor for this device
/// alone, and the region's map. It has no handle to the guest or to any of its other
/// memory, so no descriptor, however forged, can name a byte outside the region.
#[derive(Clone)]
pub struct SharedPageDevice {
    shared: Region,
    layout: Layout,
}

impl fmt::Debug for SharedPageDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedPageDevice")
            .field("shared_len", &self.shared.len())
            .field("layout", &self.layout)
            .finish()
    }
}

impl SharedPageDevice {
    pub(crate) fn new(shared: Region, layout: Layout) -> SharedPageDevice {
        SharedPageDevice { shared, layout }
    }

    /// The device side in a process of its own: `shared` is its mapping of the
    /// region's file (from [`pair_for_process`](crate::pair_for_process)), `layout`
    /// the region's map computed from the same configuration. The mapping must be
    /// writable and exactly as long as the region, so that a mismatched configuration
    /// is refused here rather than met as a fault later.
    pub fn from_region(shared: Region, layout: Layout) -> Result<SharedPageDevice, SharedPageError> {
        if shared.len() as u64 != layout.len() || !shared.is_writable() {
            return Err(SharedPageError::RegionMismatch {
                got: shared.len() as u64,
                want: layout.len(),
            });
        }
        Ok(SharedPageDevice { shared, layout })
    }

    /// The region's map.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Bytes of memory this device can reach at all: the length of its one mapping,
    /// which is the shared region.
    pub fn shared_len(&self) -> u64 {
        self.shared.len() as u64
    }

    fn area(&self, addrs: QueueAddrs, offset: u64, len: u64) -> Result<Region, ModelError> {
        self.shared
            .sub(offset, len)
            .map_err(|_| ModelError::BadAddrs(addrs))
    }
}

impl DeviceModel for SharedPageDevice {
    type Memory = SharedPageMemory;

    fn name(&self) -> &'static str {
        "shared-page"
    }

    /// Opens queue `index` after checking what the driver wrote into its registers
    /// (HOSTILE rule 11): a valid size that fits the ring slot, and three aligned,
    /// disjoint areas inside the queue's own ring slot, so none lies in a bounce
    /// area, in another queue's rings or past the region.
    ///
    /// The descriptor table and available ring are handed out read-only: the device
    /// only ever reads them (virtio 1.2 §2.7).
    fn open_queue_in(
        &self,
        index: u16,
        format: RingFormat,
        size: u16,
        addrs: QueueAddrs,
    ) -> Result<DeviceQueue<SharedPageMemory>, ModelError> {
        SplitLayout::new(size).ok_or(ModelError::BadSize(size))?;
        let max = self.layout.max_queue_size();
        if size > max {
            return Err(SharedPageError::QueueTooLarge { size, max }.into());
        }
        let bounce = self.layout.bounce(index).ok_or(SharedPageError::NoSuchQueue {
            index,
            max: self.layout.max_queues(),
        })?;
        if let Err(area) = self.layout.check_rings(index, format, size, &addrs) {
            tracing::debug!(index, size, ?addrs, area, "refusing queue addresses");
            return Err(ModelError::BadAddrs(addrs));
        }
        let ring = open_ring(format, size, addrs, |s| self.area(addrs, s.addr, s.len))?;
        let memory = SharedPageMemory {
            area: self.area(addrs, bounce.start, bounce.end - bounce.start)?,
            base: bounce.start,
        };
        Ok(DeviceQueue { ring, memory })
    }
}

/// How a device reaches one queue's descriptor memory: that queue's bounce area,
/// and only it.
///
/// Descriptors naming the rings, another queue's bounce area, bytes past the region
/// or a range that wraps are refused with [`AccessError::OutOfBounds`]; writes to
/// device-readable descriptors with [`AccessError::Denied`]. Every call re-checks its
/// range, whether or not the ring validated the segment first.
#[derive(Debug, Clone)]
pub struct SharedPageMemory {
    /// The device's view of this queue's bounce area.
    area: Region,
    /// Model address of the area's first byte.
    base: u64,
}

impl SharedPageMemory {
    /// The model addresses this memory accepts.
    pub fn bounce_range(&self) -> Range<u64> {
        self.base..self.base + self.area.len() as u64
    }

    /// The offset of `seg` in the area, if the whole segment lies inside it.
    #[inline]
    fn locate(&self, seg: &Segment) -> Result<u64, AccessError> {
        let len = u64::from(seg.len());
        let at = seg.addr().checked_sub(self.base);
        match at.and_then(|at| Some((at, at.checked_add(len)?))) {
            Some((at, end)) if end <= self.area.len() as u64 => Ok(at),
            _ => Err(AccessError::OutOfBounds {
                addr: seg.addr(),
                len,
            }),
        }
    }

    /// The area offset of `len` bytes at `offset` inside `seg`.
    #[inline]
    fn locate_within(&self, seg: &Segment, offset: u32, len: usize) -> Result<u64, AccessError> {
        virtio_core::access::check_within(seg, offset, len)?;
        // `offset + len <= seg.len()` and the segment lies inside the area.
        Ok(self.locate(seg)? + u64::from(offset))
    }
}

impl DeviceMemory for SharedPageMemory {
    fn check(&self, seg: &Segment) -> Result<(), AccessError> {
        self.locate(seg).map(|_| ())
    }

    fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError> {
        let at = self.locate_within(seg, offset, dst.len())?;
        self.area.read(at, dst).map_err(|_| AccessError::OutOfBounds {
            addr: seg.addr(),
            len: u64::from(seg.len()),
        })
    }

    fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError> {
        if !seg.writable() {
            return Err(AccessError::Denied);
        }
        let at = self.locate_within(seg, offset, src.len())?;
        self.area.write(at, src).map_err(|_| AccessError::OutOfBounds {
            addr: seg.addr(),
            len: u64::from(seg.len()),
        })
    }
}
