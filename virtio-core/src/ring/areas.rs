//! Where a queue's three areas lie, checked in one place for every side that opens a
//! queue: the device lifecycle when the driver enables it, each sharing model when
//! its device side maps the rings, the vhost-user daemon when a frontend names them.
//!
//! The checks are those of virtio 1.2 §2.7 (split) and §2.8.10 (packed), HOSTILE 11
//! and 38: each area aligned, none running past the end of the address space, and the
//! three disjoint (the device writes the device area; over the descriptor table or
//! the driver area, its own writes would feed its reads). Whether an area lies in
//! memory the model can reach is the model's question, answered when it maps the
//! area (see [`open_ring`]).

use crate::features::Features;
use crate::model::{ModelError, QueueAddrs};
use crate::ring::layout::SplitLayout;
use crate::shm::Region;

/// The three areas of a virtqueue (virtio 1.2 §2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingArea {
    /// Descriptor table (split) or descriptor ring (packed).
    Descriptor,
    /// Available ring (split) or driver event suppression (packed).
    Driver,
    /// Used ring (split) or device event suppression (packed).
    Device,
}

/// The three memory areas of one queue, as regions of the caller's sharing model
/// (virtio 1.2 §2.6), whatever the ring format: what the areas hold and who writes
/// them is the format's business.
///
/// | area | split ring (§2.7) | packed ring (§2.8) |
/// |---|---|---|
/// | `desc` | descriptor table, `16 * size` B, driver-written | descriptor ring, `16 * size` B, written by both |
/// | `driver` | available ring, `6 + 2 * size` B, driver-written | driver event suppression, 4 B, driver-written |
/// | `device` | used ring, `6 + 8 * size` B, device-written | device event suppression, 4 B, device-written |
#[derive(Debug, Clone)]
pub struct RingMemory {
    /// Descriptor area.
    pub desc: Region,
    /// Driver area.
    pub driver: Region,
    /// Device area.
    pub device: Region,
}

/// The two ring formats (virtio 1.2 §2.7 split, §2.8 packed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RingFormat {
    /// Descriptor table, available ring, used ring.
    Split,
    /// Descriptor ring and two event suppression structures.
    Packed,
}

impl RingFormat {
    /// The format `features` negotiated (`VIRTIO_F_RING_PACKED`).
    pub fn of(features: Features) -> RingFormat {
        if features.contains(Features::RING_PACKED) {
            RingFormat::Packed
        } else {
            RingFormat::Split
        }
    }
}

/// Why a queue's areas cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AreaError {
    /// The size is not one the ring format allows.
    #[error("queue size {0} is not valid for the ring format")]
    Size(u16),
    /// An area is not aligned as §2.7 / §2.8 require.
    #[error("{area:?} area at {addr:#x} not {align}-byte aligned")]
    Misaligned {
        /// Which area.
        area: RingArea,
        /// Its address.
        addr: u64,
        /// Required alignment.
        align: u64,
    },
    /// An area runs past the end of the address space.
    #[error("{area:?} area at {addr:#x} with {len} bytes overflows")]
    Overflow {
        /// Which area.
        area: RingArea,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// Two areas overlap.
    #[error("{first:?} area overlaps {second:?} area")]
    Overlap {
        /// One area.
        first: RingArea,
        /// The other.
        second: RingArea,
    },
}

/// One area of a queue: where it starts and how many bytes it spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Which area.
    pub area: RingArea,
    /// Its address, in the sharing model's address space.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Whether the device writes this area: the used ring (split); the descriptor
    /// ring, where used descriptors overwrite available ones (§2.8.3), and the
    /// device event suppression structure (packed).
    pub device_writes: bool,
}

/// A queue's three areas, aligned, in the address space and disjoint.
///
/// ```
/// use virtio_core::QueueAddrs;
/// use virtio_core::ring::areas::{AreaError, RingArea, RingAreas};
///
/// let ok = QueueAddrs { desc: 0x1000, avail: 0x2000, used: 0x3000 };
/// assert_eq!(RingAreas::split(256, ok).unwrap().spans()[2].len, 6 + 8 * 256);
/// let bad = QueueAddrs { used: 0x1008, ..ok };
/// assert_eq!(
///     RingAreas::split(256, bad),
///     Err(AreaError::Overlap { first: RingArea::Descriptor, second: RingArea::Device })
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAreas {
    size: u16,
    spans: [Span; 3],
}

impl RingAreas {
    /// The areas of a queue of `size` entries in `format`.
    pub fn new(format: RingFormat, size: u16, addrs: QueueAddrs) -> Result<RingAreas, AreaError> {
        match format {
            RingFormat::Split => Self::split(size, addrs),
            RingFormat::Packed => Self::packed(size, addrs),
        }
    }

    /// The areas of a split queue of `size` entries (§2.7): the size a power of two
    /// up to 32768, the lengths counting `used_event` and `avail_event`.
    pub fn split(size: u16, addrs: QueueAddrs) -> Result<RingAreas, AreaError> {
        let l = SplitLayout::new(size).ok_or(AreaError::Size(size))?;
        Self::check(
            size,
            RingFormat::Split,
            [
                (
                    RingArea::Descriptor,
                    addrs.desc,
                    l.desc_bytes(),
                    SplitLayout::DESC_ALIGN,
                ),
                (
                    RingArea::Driver,
                    addrs.avail,
                    l.avail_bytes(),
                    SplitLayout::AVAIL_ALIGN,
                ),
                (
                    RingArea::Device,
                    addrs.used,
                    l.used_bytes(),
                    SplitLayout::USED_ALIGN,
                ),
            ],
        )
    }

    /// The areas of a packed queue of `size` entries (§2.8.10): any size from 1 to
    /// 32768, a descriptor ring of 16-byte entries and two 4-byte event suppression
    /// structures.
    pub fn packed(size: u16, addrs: QueueAddrs) -> Result<RingAreas, AreaError> {
        if size == 0 || size > SplitLayout::MAX_SIZE {
            return Err(AreaError::Size(size));
        }
        Self::check(
            size,
            RingFormat::Packed,
            [
                (RingArea::Descriptor, addrs.desc, 16 * u64::from(size), 16),
                (RingArea::Driver, addrs.avail, 4, 4),
                (RingArea::Device, addrs.used, 4, 4),
            ],
        )
    }

    fn check(
        size: u16,
        format: RingFormat,
        areas: [(RingArea, u64, u64, u64); 3],
    ) -> Result<RingAreas, AreaError> {
        let mut spans = [Span {
            area: RingArea::Descriptor,
            addr: 0,
            len: 0,
            device_writes: false,
        }; 3];
        for (span, (area, addr, len, align)) in spans.iter_mut().zip(areas) {
            if !addr.is_multiple_of(align) {
                return Err(AreaError::Misaligned { area, addr, align });
            }
            if addr.checked_add(len).is_none() {
                return Err(AreaError::Overflow { area, addr, len });
            }
            let device_writes =
                area == RingArea::Device || (format == RingFormat::Packed && area == RingArea::Descriptor);
            *span = Span {
                area,
                addr,
                len,
                device_writes,
            };
        }
        for (i, a) in spans.iter().enumerate() {
            for b in &spans[i + 1..] {
                // Both ends are below 2^64: checked above.
                if a.addr < b.addr + b.len && b.addr < a.addr + a.len {
                    return Err(AreaError::Overlap {
                        first: a.area,
                        second: b.area,
                    });
                }
            }
        }
        Ok(RingAreas { size, spans })
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The descriptor, driver and device areas, in that order.
    pub fn spans(&self) -> &[Span; 3] {
        &self.spans
    }
}

/// Opens a ring for a device side: checks the areas ([`RingAreas::new`]), then maps
/// each through `map`, the sharing model's way to reach an area of this length (it
/// refuses areas outside what the model allows, and maps writable only the areas
/// whose [`Span::device_writes`] is set). The areas the device only reads are
/// handed out read-only whatever `map` returns: the split ring's descriptor table
/// and available ring, the packed ring's driver event suppression (§2.7, §2.8);
/// read-only views catch device bugs early.
///
/// Every [`DeviceModel::open_queue_in`](crate::DeviceModel::open_queue_in) that maps
/// rings goes through here; a refusal is logged at debug level with its reason and
/// returned as [`ModelError::BadSize`] or [`ModelError::BadAddrs`] unless `map`
/// says more.
pub fn open_ring(
    format: RingFormat,
    size: u16,
    addrs: QueueAddrs,
    mut map: impl FnMut(&Span) -> Result<Region, ModelError>,
) -> Result<RingMemory, ModelError> {
    let areas = RingAreas::new(format, size, addrs).map_err(|reason| {
        tracing::debug!(?format, size, ?addrs, %reason, "queue areas refused");
        match reason {
            AreaError::Size(s) => ModelError::BadSize(s),
            _ => ModelError::BadAddrs(addrs),
        }
    })?;
    let mut open = |s: &Span| -> Result<Region, ModelError> {
        let r = map(s)?;
        Ok(if s.device_writes { r } else { r.read_only() })
    };
    let [desc, avail, used] = &areas.spans;
    Ok(RingMemory {
        desc: open(desc)?,
        driver: open(avail)?,
        device: open(used)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: QueueAddrs = QueueAddrs {
        desc: 0x1000,
        avail: 0x2000,
        used: 0x3000,
    };

    #[test]
    fn split_checks_size_alignment_overflow_and_overlap() {
        assert_eq!(RingAreas::split(3, A), Err(AreaError::Size(3)));
        assert_eq!(RingAreas::split(0, A), Err(AreaError::Size(0)));
        assert_eq!(
            RingAreas::split(16, QueueAddrs { desc: 0x1008, ..A }),
            Err(AreaError::Misaligned {
                area: RingArea::Descriptor,
                addr: 0x1008,
                align: 16
            })
        );
        assert_eq!(
            RingAreas::split(16, QueueAddrs { avail: 0x2001, ..A }),
            Err(AreaError::Misaligned {
                area: RingArea::Driver,
                addr: 0x2001,
                align: 2
            })
        );
        let top = u64::MAX - 3;
        assert_eq!(
            RingAreas::split(16, QueueAddrs { used: top, ..A }),
            Err(AreaError::Overflow {
                area: RingArea::Device,
                addr: top,
                len: 6 + 8 * 16
            })
        );
        // The used ring starting on the last byte of the available ring.
        assert_eq!(
            RingAreas::split(
                16,
                QueueAddrs {
                    used: 0x2000 + 36,
                    ..A
                }
            ),
            Err(AreaError::Overlap {
                first: RingArea::Driver,
                second: RingArea::Device
            })
        );
        // Adjacent is fine.
        assert!(
            RingAreas::split(
                16,
                QueueAddrs {
                    used: 0x2000 + 38 + 2,
                    ..A
                }
            )
            .is_ok()
        );
    }

    #[test]
    fn packed_sizes_need_not_be_powers_of_two() {
        let a = RingAreas::packed(3, A).unwrap();
        assert_eq!(a.spans().map(|s| s.len), [48, 4, 4]);
        // The device writes used descriptors over the ring, and its own event area.
        assert_eq!(a.spans().map(|s| s.device_writes), [true, false, true]);
        let s = RingAreas::split(4, A).unwrap();
        assert_eq!(s.spans().map(|s| s.device_writes), [false, false, true]);
        assert_eq!(RingAreas::packed(0, A), Err(AreaError::Size(0)));
        assert_eq!(
            RingAreas::packed(
                8,
                QueueAddrs {
                    avail: 0x1000 + 0x70,
                    ..A
                }
            ),
            Err(AreaError::Overlap {
                first: RingArea::Descriptor,
                second: RingArea::Driver
            })
        );
    }

    #[test]
    fn open_ring_maps_in_order_and_passes_model_refusals_on() {
        let mut seen = Vec::new();
        let r = open_ring(RingFormat::Split, 16, A, |s| {
            seen.push((s.area, s.addr, s.len, s.device_writes));
            Err(ModelError::NoMemory(16))
        });
        assert!(matches!(r, Err(ModelError::NoMemory(16))));
        assert_eq!(seen, vec![(RingArea::Descriptor, 0x1000, 256, false)]);
        let r = open_ring(
            RingFormat::Split,
            16,
            QueueAddrs { used: 0x1000, ..A },
            |_| unreachable!(),
        );
        assert!(matches!(r, Err(ModelError::BadAddrs(_))));
        let r = open_ring(RingFormat::Split, 5, A, |_| unreachable!());
        assert!(matches!(r, Err(ModelError::BadSize(5))));
        // A packed ring of 5 is fine, with its own lengths.
        let mut lens = Vec::new();
        let r = open_ring(RingFormat::Packed, 5, A, |s| {
            lens.push(s.len);
            Err(ModelError::NoMemory(5))
        });
        assert!(matches!(r, Err(ModelError::NoMemory(5))));
        assert_eq!(lens, [80]);
        assert_eq!(
            RingFormat::of(Features::RING_PACKED | Features::VERSION_1),
            RingFormat::Packed
        );
        assert_eq!(RingFormat::of(Features::VERSION_1), RingFormat::Split);
    }
}
