//! Ring placement in guest memory and the checks a device side makes on queue
//! addresses, shared by models 2 and 3.
//!
//! The driver side puts the descriptor table, the available ring and the used ring each
//! on pages of their own. Model 2 does not need that, but model 3 does: its device gets
//! real page mappings of the rings (read-only for the descriptor table and the
//! available ring, writable for the used ring), and a page mapping covers whatever
//! else lives on the page. With each ring alone on its pages, the device sees the rings
//! and nothing more; with the used ring sharing a page with the descriptor table, it
//! could forge descriptors, so model 3 refuses that layout ([`AddrError::SharedPage`]).

use hypervisor::{Domain, GuestMemory};
use std::sync::{Arc, Mutex};
use virtio_core::RingMemory;
use virtio_core::ring::SplitLayout;
use virtio_core::ring::areas::{AreaError, RingArea, RingAreas};
use virtio_core::{DriverQueue, ModelError, QueueAddrs};

use crate::share::DirectShare;

/// Why queue addresses were refused (logged; the model reports
/// [`ModelError::BadAddrs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Misaligned, overflowing or overlapping areas: the checks every side makes
    /// ([`RingAreas`]).
    #[error(transparent)]
    Layout(#[from] AreaError),
    /// The area does not lie inside guest memory.
    #[error("{0:?} area lies outside guest memory")]
    Outside(RingArea),
    /// The writable used ring shares a page with a ring the device must only read.
    #[error("used ring shares a page with the {0:?} area")]
    SharedPage(RingArea),
}

/// One ring area: guest address and size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) gpa: u64,
    pub(crate) bytes: u64,
}

impl Span {
    fn end(self) -> u64 {
        // Callers only build spans that were checked to lie inside guest memory.
        self.gpa.saturating_add(self.bytes)
    }

    fn overlaps(self, other: Span) -> bool {
        self.gpa < other.end() && other.gpa < self.end()
    }

    /// The whole pages covering the span: `(first page address, length)`.
    pub(crate) fn pages(self, page: u64) -> Span {
        let start = self.gpa & !(page - 1);
        // Inside memory, which is page aligned at both ends: rounding up cannot pass it.
        let end = self.end().div_ceil(page).saturating_mul(page);
        Span {
            gpa: start,
            bytes: end - start,
        }
    }
}

/// Queue addresses that passed [`check_addrs`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct CheckedRings {
    pub(crate) desc: Span,
    pub(crate) avail: Span,
    pub(crate) used: Span,
}

/// Guest memory as a device side knows it: where it starts, how large it is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    pub(crate) base: u64,
    pub(crate) size: u64,
    pub(crate) page: u64,
}

impl Bounds {
    /// Offset of `[gpa, gpa + len)` from the base, if the range lies inside.
    #[inline]
    pub(crate) fn offset(&self, gpa: u64, len: u64) -> Option<u64> {
        let off = gpa.checked_sub(self.base)?;
        (off.checked_add(len)? <= self.size).then_some(off)
    }
}

/// Checks the addresses a driver wrote for a queue of `size` (virtio 1.2 §2.7,
/// HOSTILE rule 11): each area inside memory, aligned, sized for the queue, the three
/// disjoint, and, when `own_pages`, the used ring on pages that hold neither of the
/// other two (model 3 maps it writable).
pub(crate) fn check_addrs(
    addrs: QueueAddrs,
    size: u16,
    mem: Bounds,
    own_pages: bool,
) -> Result<CheckedRings, ModelError> {
    check_layout(addrs, size, mem, own_pages).map_err(|reason| {
        tracing::debug!(?addrs, size, %reason, "queue addresses refused");
        match reason {
            AddrError::Layout(AreaError::Size(size)) => ModelError::BadSize(size),
            _ => ModelError::BadAddrs(addrs),
        }
    })
}

fn check_layout(
    addrs: QueueAddrs,
    size: u16,
    mem: Bounds,
    own_pages: bool,
) -> Result<CheckedRings, AddrError> {
    let areas = RingAreas::split(size, addrs)?;
    let [desc, avail, used] = areas.spans().map(|s| Span {
        gpa: s.addr,
        bytes: s.len,
    });
    for (span, area) in areas.spans().iter().zip([desc, avail, used]) {
        mem.offset(area.gpa, area.bytes)
            .ok_or(AddrError::Outside(span.area))?;
    }
    if own_pages {
        let used_pages = used.pages(mem.page);
        if used_pages.overlaps(desc.pages(mem.page)) {
            return Err(AddrError::SharedPage(RingArea::Descriptor));
        }
        if used_pages.overlaps(avail.pages(mem.page)) {
            return Err(AddrError::SharedPage(RingArea::Driver));
        }
    }
    Ok(CheckedRings { desc, avail, used })
}

/// The driver side's ring allocator, shared by [`crate::direct::DirectDriver`] and
/// [`crate::copy::CopyDriver`]: identical placement, identical [`DirectShare`].
#[derive(Debug)]
pub(crate) struct GuestRings {
    guest: Arc<Domain>,
    /// Pages of each created queue, freed when the same index is created again.
    queues: Mutex<Vec<(u16, [Span; 3])>>,
}

impl GuestRings {
    pub(crate) fn new(guest: Arc<Domain>) -> GuestRings {
        GuestRings {
            guest,
            queues: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn memory(&self) -> &Arc<GuestMemory> {
        self.guest.memory()
    }

    /// Allocates and describes the rings of queue `index`. Creating an index again
    /// frees its previous rings: the caller must have dropped the old queue.
    pub(crate) fn create(&self, index: u16, size: u16) -> Result<DriverQueue<DirectShare>, ModelError> {
        let layout = SplitLayout::new(size).ok_or(ModelError::BadSize(size))?;
        let mem = self.memory();
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = queues.iter().position(|(i, _)| *i == index) {
            let (_, old) = queues.swap_remove(pos);
            for s in old {
                if let Err(e) = mem.free(s.gpa, s.bytes) {
                    tracing::warn!(index, error = %e, "freeing old ring pages failed");
                }
            }
        }
        let mut spans = Vec::with_capacity(3);
        for bytes in [layout.desc_bytes(), layout.avail_bytes(), layout.used_bytes()] {
            let pages = bytes.div_ceil(mem.page_size());
            match mem.alloc_pages(pages) {
                Ok(gpa) => spans.push(Span {
                    gpa,
                    bytes: pages * mem.page_size(),
                }),
                Err(e) => {
                    for s in spans {
                        let _ = mem.free(s.gpa, s.bytes);
                    }
                    tracing::debug!(index, size, error = %e, "no memory for rings");
                    return Err(ModelError::NoMemory(size));
                }
            }
        }
        let spans = [spans[0], spans[1], spans[2]];
        let region = |gpa, bytes| mem.region(gpa, bytes).map_err(|e| ModelError::Model(Box::new(e)));
        let ring = RingMemory {
            desc: region(spans[0].gpa, layout.desc_bytes())?,
            driver: region(spans[1].gpa, layout.avail_bytes())?,
            device: region(spans[2].gpa, layout.used_bytes())?,
        };
        queues.push((index, spans));
        Ok(DriverQueue {
            addrs: QueueAddrs {
                desc: spans[0].gpa,
                avail: spans[1].gpa,
                used: spans[2].gpa,
            },
            ring,
            share: DirectShare::new(mem.clone(), size),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: Bounds = Bounds {
        base: 0x4000_0000,
        size: 16 * 4096,
        page: 4096,
    };

    fn addrs(desc: u64, avail: u64, used: u64) -> QueueAddrs {
        QueueAddrs {
            desc: MEM.base + desc,
            avail: MEM.base + avail,
            used: MEM.base + used,
        }
    }

    fn layout(a: QueueAddrs, own_pages: bool) -> Result<CheckedRings, AddrError> {
        check_layout(a, 16, MEM, own_pages)
    }

    #[test]
    fn well_placed_rings_pass() {
        let r = layout(addrs(0, 4096, 8192), true).unwrap();
        assert_eq!(
            r.used.pages(4096),
            Span {
                gpa: MEM.base + 8192,
                bytes: 4096
            }
        );
        // Packed into one page: fine for model 2, refused for model 3.
        assert!(layout(addrs(0, 256, 512), false).is_ok());
        assert_eq!(
            layout(addrs(0, 256, 512), true).unwrap_err(),
            AddrError::SharedPage(RingArea::Descriptor)
        );
        assert_eq!(
            layout(addrs(8192, 0, 4096 - 8), true).unwrap_err(),
            AddrError::SharedPage(RingArea::Driver)
        );
    }

    #[test]
    fn bad_addresses_are_refused_with_a_reason() {
        use AddrError::*;
        assert_eq!(
            layout(addrs(8, 4096, 8192), false).unwrap_err(),
            Layout(AreaError::Misaligned {
                area: RingArea::Descriptor,
                addr: MEM.base + 8,
                align: 16
            })
        );
        assert_eq!(
            layout(addrs(0, 4097, 8192), false).unwrap_err(),
            Layout(AreaError::Misaligned {
                area: RingArea::Driver,
                addr: MEM.base + 4097,
                align: 2
            })
        );
        assert_eq!(
            layout(addrs(0, 4096, 8194), false).unwrap_err(),
            Layout(AreaError::Misaligned {
                area: RingArea::Device,
                addr: MEM.base + 8194,
                align: 4
            })
        );
        assert_eq!(
            layout(addrs(16 * 4096 - 16, 4096, 8192), false).unwrap_err(),
            Outside(RingArea::Descriptor)
        );
        let below = QueueAddrs {
            desc: 0,
            avail: MEM.base,
            used: MEM.base + 4096,
        };
        assert_eq!(layout(below, false).unwrap_err(), Outside(RingArea::Descriptor));
        let wrap = QueueAddrs {
            desc: MEM.base,
            avail: MEM.base + 4096,
            used: u64::MAX - 3,
        };
        assert_eq!(
            layout(wrap, false).unwrap_err(),
            Layout(AreaError::Overflow {
                area: RingArea::Device,
                addr: u64::MAX - 3,
                len: 6 + 8 * 16
            })
        );
        assert_eq!(
            layout(addrs(0, 128, 8192), false).unwrap_err(),
            Layout(AreaError::Overlap {
                first: RingArea::Descriptor,
                second: RingArea::Driver
            })
        );
        assert_eq!(
            layout(addrs(0, 4096, 4096 + 32), false).unwrap_err(),
            Layout(AreaError::Overlap {
                first: RingArea::Driver,
                second: RingArea::Device
            })
        );
        assert_eq!(
            layout(addrs(4096, 0, 4096 + 128), false).unwrap_err(),
            Layout(AreaError::Overlap {
                first: RingArea::Descriptor,
                second: RingArea::Device
            })
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        let a = addrs(0, 4096, 8192);
        assert!(matches!(
            check_addrs(a, 0, MEM, false),
            Err(ModelError::BadSize(0))
        ));
        assert!(matches!(
            check_addrs(a, 3, MEM, false),
            Err(ModelError::BadSize(3))
        ));
        // 32768 descriptors need 512 KiB: outside this memory.
        assert!(matches!(
            check_addrs(a, 32768, MEM, false),
            Err(ModelError::BadAddrs(_))
        ));
    }

    #[test]
    fn bounds_use_checked_arithmetic() {
        assert_eq!(MEM.offset(MEM.base, MEM.size), Some(0));
        assert_eq!(MEM.offset(MEM.base + 1, MEM.size), None);
        assert_eq!(MEM.offset(MEM.base - 1, 1), None);
        assert_eq!(MEM.offset(u64::MAX, 2), None);
        assert_eq!(MEM.offset(MEM.base + 10, u64::MAX), None);
    }
}
