//! Model 2, "descriptor page, direct": a descriptor's `addr` is a guest address and the
//! device reads and writes the driver's memory itself.
//!
//! The device side holds one writable mapping of the whole guest memory (its own
//! mapping, made by the hypervisor with `map_pages`, not the guest's region) and the
//! guest base address, never the [`Domain`]. Every range is checked against that
//! mapping with checked arithmetic, so a descriptor outside guest memory, or one whose
//! `addr + len` wraps, is refused before any byte moves (HOSTILE rule 5).

use hypervisor::Domain;
use std::sync::Arc;
use virtio_core::access::check_within;
use virtio_core::ring::areas::{RingFormat, open_ring};
use virtio_core::shm::Region;
use virtio_core::{
    AccessError, DeviceMemory, DeviceModel, DeviceQueue, DriverModel, DriverQueue, ModelError, QueueAddrs,
    Segment,
};

use crate::layout::{Bounds, GuestRings};
use crate::share::DirectShare;

/// Creates both sides of model 2 for `guest`.
pub fn pair(guest: &Arc<Domain>) -> Result<(DirectDriver, DirectDevice), ModelError> {
    let mem = guest.memory();
    let mapping = mem
        .map_pages(mem.base(), mem.size(), true)
        .map_err(|e| ModelError::Model(Box::new(e)))?;
    let bounds = Bounds {
        base: mem.base(),
        size: mem.size(),
        page: mem.page_size(),
    };
    Ok((driver(guest), DirectDevice { mapping, bounds }))
}

/// The driver side of model 2 alone, for a guest whose device lives elsewhere (a
/// vhost-user backend in another process, which maps the guest's memory itself):
/// no device mapping is made.
pub fn driver(guest: &Arc<Domain>) -> DirectDriver {
    DirectDriver {
        rings: GuestRings::new(guest.clone()),
    }
}

/// Driver side of model 2: rings in guest memory, buffers exposed by address.
#[derive(Debug)]
pub struct DirectDriver {
    rings: GuestRings,
}

impl DriverModel for DirectDriver {
    type Share = DirectShare;

    fn name(&self) -> &'static str {
        "direct"
    }

    /// Each area on pages of its own, sized for the split ring: either format fits.
    fn create_queue_in(
        &self,
        index: u16,
        _format: RingFormat,
        size: u16,
    ) -> Result<DriverQueue<DirectShare>, ModelError> {
        self.rings.create(index, size)
    }
}

/// Device side of model 2: a mapping of all guest memory and where it starts.
#[derive(Debug)]
pub struct DirectDevice {
    mapping: Region,
    bounds: Bounds,
}

impl DirectDevice {
    /// The device side in a process of its own: `mapping` is its writable mapping of
    /// the guest's whole memory file (received from the process that owns the guest),
    /// `base` the guest address of the file's first byte and `page` the page size.
    /// The device reaches exactly that file and nothing else of the owner (HOSTILE
    /// 39); the `vio-isolation` crate runs it so.
    pub fn from_region(mapping: Region, base: u64, page: u64) -> Result<DirectDevice, ModelError> {
        let size = mapping.len() as u64;
        let sane = page.is_power_of_two()
            && base != 0
            && base.is_multiple_of(page)
            && size.is_multiple_of(page)
            && base.checked_add(size).is_some()
            && mapping.is_writable();
        if !sane {
            return Err(ModelError::Model(
                "guest memory mapping is not page aligned and writable".into(),
            ));
        }
        Ok(DirectDevice {
            mapping,
            bounds: Bounds { base, size, page },
        })
    }

    /// First guest address of the mapped memory.
    pub fn base(&self) -> u64 {
        self.bounds.base
    }

    /// Bytes of guest memory mapped.
    pub fn size(&self) -> u64 {
        self.bounds.size
    }

    /// The ring area at `gpa`, if it lies in guest memory.
    fn view(&self, gpa: u64, bytes: u64) -> Option<Region> {
        let off = self.bounds.offset(gpa, bytes)?;
        self.mapping.sub(off, bytes).ok()
    }
}

impl DeviceModel for DirectDevice {
    type Memory = DirectMemory;

    fn name(&self) -> &'static str {
        "direct"
    }

    fn open_queue_in(
        &self,
        _index: u16,
        format: RingFormat,
        size: u16,
        addrs: QueueAddrs,
    ) -> Result<DeviceQueue<DirectMemory>, ModelError> {
        // The device may write all guest memory in this model, but it has no business
        // writing the driver's rings: read-only views catch device bugs early.
        let ring = open_ring(format, size, addrs, |s| {
            self.view(s.addr, s.len).ok_or(ModelError::BadAddrs(addrs))
        })?;
        Ok(DeviceQueue {
            ring,
            memory: DirectMemory {
                mapping: self.mapping.clone(),
                bounds: self.bounds,
            },
        })
    }
}

/// How a model-2 device reaches descriptor memory: bounds-checked copies out of its
/// mapping of guest memory.
///
/// Costs: [`check`](DeviceMemory::check) is two subtractions and a compare;
/// [`read`](DeviceMemory::read) / [`write`](DeviceMemory::write) add one `memcpy`.
#[derive(Debug, Clone)]
pub struct DirectMemory {
    mapping: Region,
    bounds: Bounds,
}

impl DirectMemory {
    /// Offset of the whole segment in the mapping.
    #[inline]
    fn segment(&self, seg: &Segment) -> Result<u64, AccessError> {
        self.bounds
            .offset(seg.addr(), u64::from(seg.len()))
            .ok_or(AccessError::OutOfBounds {
                addr: seg.addr(),
                len: u64::from(seg.len()),
            })
    }
}

impl DeviceMemory for DirectMemory {
    #[inline]
    fn check(&self, seg: &Segment) -> Result<(), AccessError> {
        self.segment(seg).map(|_| ())
    }

    #[inline]
    fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError> {
        check_within(seg, offset, dst.len())?;
        let at = self.segment(seg)? + u64::from(offset);
        self.mapping.read(at, dst).map_err(|_| AccessError::OutOfBounds {
            addr: seg.addr(),
            len: u64::from(seg.len()),
        })
    }

    #[inline]
    fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError> {
        if !seg.writable() {
            return Err(AccessError::Denied);
        }
        check_within(seg, offset, src.len())?;
        let at = self.segment(seg)? + u64::from(offset);
        self.mapping.write(at, src).map_err(|_| AccessError::OutOfBounds {
            addr: seg.addr(),
            len: u64::from(seg.len()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::Hypervisor;
    use virtio_core::DescSlot;

    fn seg(addr: u64, len: u32, writable: bool) -> Segment {
        Segment::new(addr, len, writable, 0, DescSlot::Table(0))
    }

    #[test]
    fn every_range_is_checked_against_guest_memory() {
        let hv = Hypervisor::new();
        let g = hv.create_domain("g", 2 * 4096).unwrap();
        let (_, dev) = pair(&g).unwrap();
        let q = dev.open_queue(
            0,
            4,
            QueueAddrs {
                desc: dev.base(),
                avail: dev.base() + 64,
                used: dev.base() + 128,
            },
        );
        let m = q.unwrap().memory;
        let base = dev.base();
        let end = base + dev.size();
        assert!(m.check(&seg(base, 8192, false)).is_ok());
        for bad in [
            seg(base - 1, 1, false),
            seg(end - 1, 2, false),
            seg(u64::MAX - 1, 4, false),
            seg(4096, 1, false),
        ] {
            assert!(
                matches!(m.check(&bad), Err(AccessError::OutOfBounds { .. })),
                "{bad:?}"
            );
            assert!(m.read(&bad, 0, &mut [0; 1]).is_err());
        }
        // Offsets are checked against the segment, not just memory.
        let s = seg(base + 100, 10, true);
        assert!(matches!(
            m.read(&s, 8, &mut [0; 3]),
            Err(AccessError::PastSegment { .. })
        ));
        assert!(matches!(
            m.write(&s, u32::MAX, &[0; 3]),
            Err(AccessError::PastSegment { .. })
        ));
        assert!(matches!(
            m.write(&seg(base, 4, false), 0, b"x"),
            Err(AccessError::Denied)
        ));
    }

    #[test]
    fn bytes_move_both_ways() {
        let hv = Hypervisor::new();
        let g = hv.create_domain("g", 4096).unwrap();
        let (_, dev) = pair(&g).unwrap();
        let m = DirectMemory {
            mapping: dev.mapping.clone(),
            bounds: dev.bounds,
        };
        let base = dev.base();
        g.memory().write(base + 10, b"guest").unwrap();
        let mut got = [0u8; 5];
        m.read(&seg(base + 8, 7, false), 2, &mut got).unwrap();
        assert_eq!(&got, b"guest");
        m.write(&seg(base + 20, 4, true), 1, b"dev").unwrap();
        g.memory().read(base + 21, &mut got[..3]).unwrap();
        assert_eq!(&got[..3], b"dev");
    }
}
