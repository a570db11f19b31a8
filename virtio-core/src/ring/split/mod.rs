//! The split virtqueue (virtio 1.2 §2.7): descriptor table, available ring, used ring.
//!
//! [`SplitDriver`] is the driver side and [`SplitDevice`] the device side. Both read and
//! write the shared areas only through the views in this module, which fetch each
//! shared field exactly once with an atomic access of the field's own size.

mod device;
mod driver;

pub use device::{DeviceQueueError, RingFault, SplitDevice, UsedError};
pub(crate) use driver::admit;
pub use driver::{AddError, DriverQueueError, Rejected, SplitDriver, Used};

use crate::ring::areas::RingMemory;
use crate::ring::layout::{Descriptor, SplitLayout};
use crate::shm::{Atomics, Region, RegionError};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering, fence};

/// Why a queue's memory could not be used for a split ring.
#[derive(Debug, thiserror::Error)]
pub enum RingSetupError {
    /// The queue size is 0, above 32768, or (split ring) not a power of two.
    #[error("queue size {0} is not a valid size for this ring (1 to 32768, a power of two if split)")]
    BadSize(u16),
    /// An area is too small or misaligned.
    #[error("{area} area unusable")]
    Area {
        /// Which area (`descriptor table`, `available ring`, `used ring`).
        area: &'static str,
        /// What was wrong with it.
        #[source]
        source: RegionError,
    },
    /// A side needs to write an area it was given read-only.
    #[error("{0} area must be writable by this side")]
    NotWritable(&'static str),
}

/// Atomic views of the split-ring areas. Offsets follow §2.7.5, §2.7.6 and §2.7.8.
///
/// Every load is Relaxed (Acquire comes from a fence after it), because a side may hold
/// an area as a real read-only mapping, where std allows nothing else.
pub(crate) struct Views {
    /// Two words per descriptor: `addr`, then `len | flags << 32 | next << 48`.
    desc: Atomics<AtomicU64>,
    /// `flags`, `idx`, `ring[size]`, `used_event`.
    avail: Atomics<AtomicU16>,
    /// `flags`, `idx`.
    used_hdr: Atomics<AtomicU16>,
    /// Two words per element: `id`, `len` (a used element is only 4-byte aligned).
    used_elems: Atomics<AtomicU32>,
    /// `avail_event`.
    avail_event: Atomics<AtomicU16>,
    size: u16,
}

impl Views {
    pub(crate) fn new(
        size: u16,
        mem: &RingMemory,
        writable: (bool, bool, bool),
    ) -> Result<Views, RingSetupError> {
        let layout = SplitLayout::new(size).ok_or(RingSetupError::BadSize(size))?;
        let need_w = |r: &Region, yes: bool, area| {
            if yes && !r.is_writable() {
                Err(RingSetupError::NotWritable(area))
            } else {
                Ok(())
            }
        };
        need_w(&mem.desc, writable.0, "descriptor table")?;
        need_w(&mem.driver, writable.1, "available ring")?;
        need_w(&mem.device, writable.2, "used ring")?;
        let n = usize::from(size);
        let area = |area: &'static str| move |source| RingSetupError::Area { area, source };
        let desc = mem
            .desc
            .sub(0, layout.desc_bytes())
            .and_then(|r| r.atomic_u64s(0, 2 * n));
        let avail = mem
            .driver
            .sub(0, layout.avail_bytes())
            .and_then(|r| r.atomic_u16s(0, 3 + n));
        let used = mem.device.sub(0, layout.used_bytes());
        let used_hdr = used.as_ref().map_err(|e| *e).and_then(|r| r.atomic_u16s(0, 2));
        let used_elems = used
            .as_ref()
            .map_err(|e| *e)
            .and_then(|r| r.atomic_u32s(4, 2 * n));
        let avail_event = used.and_then(|r| r.atomic_u16s(4 + 8 * n as u64, 1));
        Ok(Views {
            desc: desc.map_err(area("descriptor table"))?,
            avail: avail.map_err(area("available ring"))?,
            used_hdr: used_hdr.map_err(area("used ring"))?,
            used_elems: used_elems.map_err(area("used ring"))?,
            avail_event: avail_event.map_err(area("used ring"))?,
            size,
        })
    }

    #[inline]
    fn slot(&self, idx: u16) -> usize {
        usize::from(idx & (self.size - 1))
    }

    // --- descriptor table ---

    /// Reads descriptor `i` (< size) once: `(addr, len, flags, next)`.
    #[inline]
    pub(crate) fn read_desc(&self, i: u16) -> (u64, u32, u16, u16) {
        let i = usize::from(i) * 2;
        let addr = u64::from_le(self.desc[i].load(Ordering::Relaxed));
        let (len, flags, next) =
            Descriptor::unpack_tail(u64::from_le(self.desc[i + 1].load(Ordering::Relaxed)));
        (addr, len, flags, next)
    }

    #[inline]
    pub(crate) fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let i = usize::from(i) * 2;
        self.desc[i].store(addr.to_le(), Ordering::Relaxed);
        self.desc[i + 1].store(Descriptor::pack_tail(len, flags, next).to_le(), Ordering::Relaxed);
    }

    // --- available ring ---

    #[inline]
    pub(crate) fn avail_flags(&self) -> u16 {
        u16::from_le(self.avail[0].load(Ordering::Relaxed))
    }

    #[inline]
    pub(crate) fn set_avail_flags(&self, v: u16) {
        self.avail[0].store(v.to_le(), Ordering::Relaxed);
    }

    /// Loads `avail.idx` with Acquire: pairs with the driver's Release store in
    /// [`Views::publish_avail_idx`], so ring entries and descriptors written before it
    /// are visible after it.
    ///
    /// Done as a Relaxed load and an Acquire fence: the device side's available ring is
    /// a real read-only mapping in models 3 and 4, and std guarantees only small
    /// Relaxed atomic loads on read-only memory ("If you need to do an acquire load on
    /// read-only memory, you can do a relaxed load followed by an acquire fence
    /// instead", std::sync::atomic). The fence pairs with the Release store just the
    /// same (fence-to-atomic synchronization).
    #[inline]
    pub(crate) fn avail_idx(&self) -> u16 {
        let v = self.avail[1].load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        u16::from_le(v)
    }

    /// Stores `avail.idx` with Release: pairs with the device's Acquire load in
    /// [`Views::avail_idx`].
    #[inline]
    pub(crate) fn publish_avail_idx(&self, v: u16) {
        self.avail[1].store(v.to_le(), Ordering::Release);
    }

    #[inline]
    pub(crate) fn avail_ring(&self, idx: u16) -> u16 {
        u16::from_le(self.avail[2 + self.slot(idx)].load(Ordering::Relaxed))
    }

    #[inline]
    pub(crate) fn set_avail_ring(&self, idx: u16, head: u16) {
        self.avail[2 + self.slot(idx)].store(head.to_le(), Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn used_event(&self) -> u16 {
        u16::from_le(self.avail[2 + usize::from(self.size)].load(Ordering::Relaxed))
    }

    #[inline]
    pub(crate) fn set_used_event(&self, v: u16) {
        self.avail[2 + usize::from(self.size)].store(v.to_le(), Ordering::Relaxed);
    }

    // --- used ring ---

    #[inline]
    pub(crate) fn used_flags(&self) -> u16 {
        u16::from_le(self.used_hdr[0].load(Ordering::Relaxed))
    }

    #[inline]
    pub(crate) fn set_used_flags(&self, v: u16) {
        self.used_hdr[0].store(v.to_le(), Ordering::Relaxed);
    }

    /// Loads `used.idx` with Acquire: pairs with the device's Release store in
    /// [`Views::publish_used_idx`], so used elements written before it are visible.
    /// A Relaxed load and an Acquire fence, as in [`Views::avail_idx`], so the view
    /// stays correct over a read-only used ring too.
    #[inline]
    pub(crate) fn used_idx(&self) -> u16 {
        let v = self.used_hdr[1].load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        u16::from_le(v)
    }

    /// Stores `used.idx` with Release: pairs with the driver's Acquire load in
    /// [`Views::used_idx`].
    #[inline]
    pub(crate) fn publish_used_idx(&self, v: u16) {
        self.used_hdr[1].store(v.to_le(), Ordering::Release);
    }

    #[inline]
    pub(crate) fn used_elem(&self, idx: u16) -> (u32, u32) {
        let i = self.slot(idx) * 2;
        (
            u32::from_le(self.used_elems[i].load(Ordering::Relaxed)),
            u32::from_le(self.used_elems[i + 1].load(Ordering::Relaxed)),
        )
    }

    #[inline]
    pub(crate) fn set_used_elem(&self, idx: u16, id: u32, len: u32) {
        let i = self.slot(idx) * 2;
        self.used_elems[i].store(id.to_le(), Ordering::Relaxed);
        self.used_elems[i + 1].store(len.to_le(), Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn avail_event(&self) -> u16 {
        u16::from_le(self.avail_event[0].load(Ordering::Relaxed))
    }

    #[inline]
    pub(crate) fn set_avail_event(&self, v: u16) {
        self.avail_event[0].store(v.to_le(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
