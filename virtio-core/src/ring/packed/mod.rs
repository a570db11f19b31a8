//! The packed virtqueue (virtio 1.2 §2.8): one descriptor ring, two event suppression areas.
//!
//! Both sides write the descriptor ring: the driver its available descriptors, the
//! device used descriptors over them.
//!
//! [`PackedDriver`] is the driver side and [`PackedDevice`] the device side, with the
//! same methods as [`SplitDriver`](crate::SplitDriver) and
//! [`SplitDevice`](crate::SplitDevice), the same error types, [`Used`], [`Rejected`]
//! and the same validated [`Chain`](crate::ring::Chain). What the split ring calls a
//! head is here the buffer id (§2.8.6): [`PackedDriver::add`] returns it,
//! [`Chain::head`](crate::ring::Chain::head) is it, and the device returns it with
//! [`PackedDevice::add_used`].
//!
//! Both sides read and write the shared areas only through the views in this module,
//! which fetch each shared field exactly once with an atomic access.
//!
//! Ring positions: each side keeps a position and a ring wrap counter (§2.8.1, both
//! starting at 1) as one number in `[0, 2 * size)`, its *lap position*: the slot plus
//! `size` when the wrap counter is 0. Advancing by `n` slots is an addition modulo
//! `2 * size`, and the distance between two lap positions is unambiguous as long as
//! it is below `2 * size`, which the event suppression checks rely on (§2.8.10).

mod device;
mod driver;
pub mod layout;

pub use device::PackedDevice;
pub use driver::PackedDriver;
pub use layout::{EventSuppress, PackedDescriptor, PackedLayout};
// The error and result types are the split ring's: one set for both formats.
pub use crate::ring::split::{
    AddError, DeviceQueueError, DriverQueueError, Rejected, RingFault, RingSetupError, Used, UsedError,
};

use crate::ring::areas::RingMemory;
use crate::shm::{Atomics, Region};
use layout::{VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

/// Atomic views of the packed-ring areas, plus the lap-position arithmetic.
///
/// Every load is Relaxed (Acquire comes from a fence after it), as in the split
/// ring's views, so a side may hold an area it only reads as a read-only mapping.
pub(crate) struct Views {
    /// Two words per descriptor: `addr`, then `len | id << 32 | flags << 48`.
    desc: Atomics<AtomicU64>,
    /// The driver event suppression structure as one word.
    driver_event: Atomics<AtomicU32>,
    /// The device event suppression structure as one word.
    device_event: Atomics<AtomicU32>,
    size: u16,
}

impl Views {
    /// `writable`: whether this side writes the descriptor ring, the driver area and
    /// the device area.
    pub(crate) fn new(
        size: u16,
        mem: &RingMemory,
        writable: (bool, bool, bool),
    ) -> Result<Views, RingSetupError> {
        let layout = PackedLayout::new(size).ok_or(RingSetupError::BadSize(size))?;
        let need_w = |r: &Region, yes: bool, area| {
            if yes && !r.is_writable() {
                Err(RingSetupError::NotWritable(area))
            } else {
                Ok(())
            }
        };
        need_w(&mem.desc, writable.0, "descriptor ring")?;
        need_w(&mem.driver, writable.1, "driver event suppression")?;
        need_w(&mem.device, writable.2, "device event suppression")?;
        let area = |area: &'static str| move |source| RingSetupError::Area { area, source };
        let desc = mem
            .desc
            .sub(0, layout.desc_bytes())
            .and_then(|r| r.atomic_u64s(0, 2 * usize::from(size)))
            .map_err(area("descriptor ring"))?;
        let event = |r: &Region| r.sub(0, EventSuppress::SIZE).and_then(|r| r.atomic_u32s(0, 1));
        Ok(Views {
            desc,
            driver_event: event(&mem.driver).map_err(area("driver event suppression"))?,
            device_event: event(&mem.device).map_err(area("device event suppression"))?,
            size,
        })
    }

    // --- lap positions ---

    /// Twice the queue size: the period of lap positions.
    #[inline]
    fn period(&self) -> u32 {
        2 * u32::from(self.size)
    }

    /// The lap position `n` (at most `size`) slots after `lap`.
    #[inline]
    pub(crate) fn advance(&self, lap: u32, n: u16) -> u32 {
        let next = lap + u32::from(n);
        if next >= self.period() {
            next - self.period()
        } else {
            next
        }
    }

    /// The ring slot of a lap position.
    #[inline]
    pub(crate) fn slot(&self, lap: u32) -> u16 {
        let size = u32::from(self.size);
        // Below `size <= 32768` either way.
        u16::try_from(if lap >= size { lap - size } else { lap }).unwrap_or(0)
    }

    /// The ring wrap counter of a lap position.
    #[inline]
    pub(crate) fn wrap(&self, lap: u32) -> bool {
        lap < u32::from(self.size)
    }

    /// A lap position in the wire form of event suppression and of vhost-user's
    /// ring base (§2.8.14): the slot in bits 0-14, the wrap counter in bit 15.
    #[inline]
    pub(crate) fn encode(&self, lap: u32) -> u16 {
        self.slot(lap) | if self.wrap(lap) { 0x8000 } else { 0 }
    }

    /// Reads the wire form back; `None` for a slot outside the ring.
    #[inline]
    pub(crate) fn decode(&self, v: u16) -> Option<u32> {
        let slot = v & 0x7fff;
        (slot < self.size).then(|| u32::from(slot) + if v & 0x8000 != 0 { 0 } else { u32::from(self.size) })
    }

    /// Slots from lap position `from` forward to `to`.
    #[inline]
    pub(crate) fn distance(&self, from: u32, to: u32) -> u32 {
        if to >= from {
            to - from
        } else {
            to + self.period() - from
        }
    }

    /// Whether moving `moved` slots forward from `old` crossed `event`, i.e. whether
    /// `event` lies in `[old, old + moved)` (the `vring_need_event` rule of §2.7.10
    /// over lap positions, §2.8.10). Beyond a whole period every position was
    /// crossed.
    #[inline]
    pub(crate) fn crossed(&self, event: u32, old: u32, moved: u32) -> bool {
        moved >= self.period() || self.distance(old, event) < moved
    }

    /// Whether flags mark a descriptor available in the lap whose wrap counter is
    /// `wrap` (§2.8.1): AVAIL equals it and USED does not.
    #[inline]
    pub(crate) fn is_avail(flags: u16, wrap: bool) -> bool {
        (flags & VIRTQ_DESC_F_AVAIL != 0) == wrap && (flags & VIRTQ_DESC_F_USED != 0) != wrap
    }

    /// Whether flags mark a descriptor used in the lap whose wrap counter is `wrap`
    /// (§2.8.1): AVAIL and USED both equal it.
    #[inline]
    pub(crate) fn is_used(flags: u16, wrap: bool) -> bool {
        (flags & VIRTQ_DESC_F_AVAIL != 0) == wrap && (flags & VIRTQ_DESC_F_USED != 0) == wrap
    }

    /// The AVAIL and USED bits a side writes for lap wrap counter `wrap`: available
    /// (AVAIL = wrap, USED = !wrap) or used (both = wrap).
    #[inline]
    pub(crate) fn lap_bits(wrap: bool, used: bool) -> u16 {
        match (wrap, used) {
            (true, false) => VIRTQ_DESC_F_AVAIL,
            (false, false) => VIRTQ_DESC_F_USED,
            (true, true) => VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED,
            (false, true) => 0,
        }
    }

    // --- descriptor ring ---

    /// Reads the `len | id | flags` word of slot `slot` once: `(len, id, flags)`.
    #[inline]
    pub(crate) fn read_tail(&self, slot: u16) -> (u32, u16, u16) {
        let w = self.desc[usize::from(slot) * 2 + 1].load(Ordering::Relaxed);
        PackedDescriptor::unpack_tail(u64::from_le(w))
    }

    /// Reads the `addr` word of slot `slot` once.
    #[inline]
    pub(crate) fn read_addr(&self, slot: u16) -> u64 {
        u64::from_le(self.desc[usize::from(slot) * 2].load(Ordering::Relaxed))
    }

    /// Reads the flags of slot `slot` and, if `ready(flags)`, an Acquire fence and
    /// then the rest of the descriptor: `(addr, len, id, flags)` with `flags` from
    /// the first read.
    ///
    /// The other side writes `len` and `id` before the flags (with a barrier, or in
    /// the same store); only after seeing the flags and the fence are they
    /// guaranteed current, so they come from a second load of the word, whose
    /// flags are ignored: no decision rests on a field read twice (HOSTILE 12).
    #[inline]
    pub(crate) fn read_if(&self, slot: u16, ready: impl FnOnce(u16) -> bool) -> Option<(u64, u32, u16, u16)> {
        let (_, _, flags) = self.read_tail(slot);
        if !ready(flags) {
            return None;
        }
        // Pairs with the Release store of the flags in `write_tail_release`.
        fence(Ordering::Acquire);
        let (len, id, _) = self.read_tail(slot);
        Some((self.read_addr(slot), len, id, flags))
    }

    /// Writes the `addr` word of slot `slot`.
    #[inline]
    pub(crate) fn write_addr(&self, slot: u16, addr: u64) {
        self.desc[usize::from(slot) * 2].store(addr.to_le(), Ordering::Relaxed);
    }

    /// Writes the `len | id | flags` word of slot `slot` (no ordering: for
    /// descriptors that a later Release store publishes).
    #[inline]
    pub(crate) fn write_tail(&self, slot: u16, len: u32, id: u16, flags: u16) {
        let w = PackedDescriptor::pack_tail(len, id, flags);
        self.desc[usize::from(slot) * 2 + 1].store(w.to_le(), Ordering::Relaxed);
    }

    /// Writes the `len | id | flags` word of slot `slot` with Release: everything
    /// written before (the rest of a chain, an indirect table, the buffers) is
    /// visible to whoever sees these flags and then fences (§2.8.21.1, "a suitable
    /// memory barrier before the flags update").
    #[inline]
    pub(crate) fn write_tail_release(&self, slot: u16, len: u32, id: u16, flags: u16) {
        let w = PackedDescriptor::pack_tail(len, id, flags);
        self.desc[usize::from(slot) * 2 + 1].store(w.to_le(), Ordering::Release);
    }

    // --- event suppression ---

    /// The driver event suppression structure, read once: `(desc, flags)`.
    #[inline]
    pub(crate) fn driver_event(&self) -> (u16, u16) {
        EventSuppress::unpack(u32::from_le(self.driver_event[0].load(Ordering::Relaxed)))
    }

    #[inline]
    pub(crate) fn set_driver_event(&self, desc: u16, flags: u16) {
        self.driver_event[0].store(EventSuppress::pack(desc, flags).to_le(), Ordering::Relaxed);
    }

    /// The device event suppression structure, read once: `(desc, flags)`.
    #[inline]
    pub(crate) fn device_event(&self) -> (u16, u16) {
        EventSuppress::unpack(u32::from_le(self.device_event[0].load(Ordering::Relaxed)))
    }

    #[inline]
    pub(crate) fn set_device_event(&self, desc: u16, flags: u16) {
        self.device_event[0].store(EventSuppress::pack(desc, flags).to_le(), Ordering::Relaxed);
    }

    /// Whether the other side asks for a notification after this side moved its
    /// position `moved` slots from `old`, given the event suppression structure
    /// `(desc, flags)` it wrote (§2.8.10). Anything but a well-formed DISABLE, or
    /// DESC with EVENT_IDX negotiated and a slot inside the ring, counts as ENABLE:
    /// garbage there can only cost a spurious notification, never a lost one
    /// (HOSTILE 10).
    #[inline]
    pub(crate) fn wants_event(
        &self,
        (desc, flags): (u16, u16),
        event_idx: bool,
        old: u32,
        moved: u32,
    ) -> bool {
        match flags {
            layout::RING_EVENT_FLAGS_DISABLE => false,
            layout::RING_EVENT_FLAGS_DESC if event_idx => match self.decode(desc) {
                Some(event) => self.crossed(event, old, moved),
                None => moved != 0,
            },
            _ => moved != 0,
        }
    }
}

#[cfg(test)]
mod tests;
