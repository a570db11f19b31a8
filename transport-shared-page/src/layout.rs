//! Where everything lives in the shared region.
//!
//! The region is one run of whole guest pages, laid out from the configuration alone,
//! so the driver and the device compute the same map without exchanging it:
//!
//! ```text
//! offset 0
//! | queue 0 ring slot | queue 1 ring slot | ... | queue 0 bounce | queue 1 bounce | ...
//!
//! one ring slot (sized for max_queue_size):
//! | descriptor table | available ring | pad to page | used ring | pad to page |
//! ```
//!
//! Descriptor addresses of this model are offsets from the start of the region. The
//! descriptor table and the available ring share a slot start and a cache line
//! boundary; the used ring starts its own page, so the device's used-ring stores never
//! share a cache line with the driver's available-ring stores.

use crate::error::SharedPageError;
use std::ops::Range;
use virtio_core::QueueAddrs;
use virtio_core::ring::areas::{AreaError, RingAreas, RingFormat};
use virtio_core::ring::layout::SplitLayout;

/// Cache-line size the available ring is aligned to.
const CACHE_LINE: u64 = 64;
/// Upper bound of one queue's bounce area: keeps offsets and block counts in `u32`.
pub const MAX_BOUNCE_PER_QUEUE: u64 = 1 << 30;

/// Sizes of the shared region.
///
/// The default (2 queues of 256 entries, 4 MiB of bounce space each, about 8 MiB of
/// guest memory in all) is sized for the two workloads the model has to carry
/// without starving: a network queue of 256 frames of 1514 bytes needs 512 KiB of
/// bounce space (2 KiB blocks), and block I/O at queue depth 64 with 64 KiB requests
/// needs exactly 4 MiB. Holding 256 in-flight 64 KiB buffers would need 16 MiB per
/// queue, which is not a modest default; a driver that goes deeper than the bounce
/// area allows gets [`ShareError::Exhausted`](virtio_core::ShareError::Exhausted) from
/// `add` and retries after reclaiming used buffers, which is the back-pressure this
/// model is meant to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedPageConfig {
    /// Number of queues the region has ring slots and bounce areas for (at least 1).
    pub max_queues: u16,
    /// Largest queue size a ring slot can hold (a power of two, at most 32768).
    pub max_queue_size: u16,
    /// Bytes of bounce space per queue (rounded up to whole pages, at most 1 GiB).
    pub bounce_bytes_per_queue: u64,
}

impl Default for SharedPageConfig {
    fn default() -> Self {
        SharedPageConfig {
            max_queues: 2,
            max_queue_size: 256,
            bounce_bytes_per_queue: 4 << 20,
        }
    }
}

/// The computed map of a shared region; identical on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    max_queues: u16,
    max_queue_size: u16,
    /// Bytes of one ring slot.
    slot_len: u64,
    /// Offset of the used ring inside a slot.
    used_off: u64,
    /// Offset of queue 0's bounce area.
    bounce_start: u64,
    /// Bytes of one queue's bounce area (whole pages).
    bounce_len: u64,
    /// Bytes of the whole region (whole pages).
    len: u64,
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_next_multiple_of(align)
}

impl Layout {
    /// Lays out a region for `cfg` with pages of `page` bytes.
    pub fn new(cfg: &SharedPageConfig, page: u64) -> Result<Layout, SharedPageError> {
        if cfg.max_queues == 0 {
            return Err(SharedPageError::BadConfig("max_queues"));
        }
        let max = SplitLayout::new(cfg.max_queue_size).ok_or(SharedPageError::BadConfig("max_queue_size"))?;
        if cfg.bounce_bytes_per_queue < crate::bounce::MIN_BLOCK
            || cfg.bounce_bytes_per_queue > MAX_BOUNCE_PER_QUEUE
        {
            return Err(SharedPageError::BadConfig("bounce_bytes_per_queue"));
        }
        let avail_end = align_up(max.desc_bytes(), CACHE_LINE)
            .and_then(|a| a.checked_add(max.avail_bytes()))
            .ok_or(SharedPageError::TooLarge)?;
        let used_off = align_up(avail_end, page).ok_or(SharedPageError::TooLarge)?;
        let slot_len = align_up(max.used_bytes(), page)
            .and_then(|u| u.checked_add(used_off))
            .ok_or(SharedPageError::TooLarge)?;
        let queues = u64::from(cfg.max_queues);
        let bounce_start = slot_len.checked_mul(queues).ok_or(SharedPageError::TooLarge)?;
        let bounce_len = align_up(cfg.bounce_bytes_per_queue, page).ok_or(SharedPageError::TooLarge)?;
        let len = bounce_len
            .checked_mul(queues)
            .and_then(|b| b.checked_add(bounce_start))
            .ok_or(SharedPageError::TooLarge)?;
        Ok(Layout {
            max_queues: cfg.max_queues,
            max_queue_size: cfg.max_queue_size,
            slot_len,
            used_off,
            bounce_start,
            bounce_len,
            len,
        })
    }

    /// Bytes of the whole region.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a region holds at least one queue.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of queues.
    pub fn max_queues(&self) -> u16 {
        self.max_queues
    }

    /// Largest queue size.
    pub fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    /// The ring slot of queue `q`: where its three ring areas must lie.
    pub fn ring_slot(&self, q: u16) -> Option<Range<u64>> {
        (q < self.max_queues).then(|| {
            let start = self.slot_len * u64::from(q);
            start..start + self.slot_len
        })
    }

    /// The bounce area of queue `q`: the only bytes its descriptors may name.
    pub fn bounce(&self, q: u16) -> Option<Range<u64>> {
        (q < self.max_queues).then(|| {
            let start = self.bounce_start + self.bounce_len * u64::from(q);
            start..start + self.bounce_len
        })
    }

    /// Where the driver puts the rings of queue `q` with `size` entries.
    pub fn queue_addrs(&self, q: u16, size: u16) -> Option<QueueAddrs> {
        let slot = self.ring_slot(q)?;
        let l = SplitLayout::new(size).filter(|_| size <= self.max_queue_size)?;
        let avail = align_up(l.desc_bytes(), CACHE_LINE)?;
        Some(QueueAddrs {
            desc: slot.start,
            avail: slot.start + avail,
            used: slot.start + self.used_off,
        })
    }

    /// Checks ring addresses a driver wrote for queue `q` of `size` (virtio 1.2
    /// §2.7: alignment 16, 2 and 4), as the device must before using them: each area
    /// is aligned, lies whole inside the queue's own ring slot (so never in a bounce
    /// area, another queue's rings or past the region) and overlaps no other.
    ///
    /// `size` must already be a valid split-ring size. Returns why not, for logs.
    pub fn check_rings(
        &self,
        q: u16,
        format: RingFormat,
        size: u16,
        addrs: &QueueAddrs,
    ) -> Result<(), &'static str> {
        let slot = self.ring_slot(q).ok_or("no such queue")?;
        if size > self.max_queue_size {
            return Err("queue size");
        }
        let areas = RingAreas::new(format, size, *addrs).map_err(|e| match e {
            AreaError::Size(_) => "queue size",
            AreaError::Misaligned { .. } => "misaligned ring area",
            AreaError::Overflow { .. } => "ring area past the end of the address space",
            AreaError::Overlap { .. } => "overlapping ring areas",
        })?;
        // Both ends are below 2^64: `RingAreas` checked.
        if areas
            .spans()
            .iter()
            .any(|s| s.addr < slot.start || s.addr + s.len > slot.end)
        {
            return Err("ring area outside the queue's ring slot");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    #[test]
    fn default_layout_puts_used_rings_on_their_own_pages() {
        let l = Layout::new(&SharedPageConfig::default(), PAGE).unwrap();
        // 256 entries: desc 4096 + avail 518 -> two pages, used 2054 -> one page.
        assert_eq!(l.ring_slot(0), Some(0..3 * PAGE));
        assert_eq!(l.ring_slot(1), Some(3 * PAGE..6 * PAGE));
        assert_eq!(l.bounce(0), Some(6 * PAGE..6 * PAGE + (4 << 20)));
        assert_eq!(l.len(), 6 * PAGE + (8 << 20));
        assert_eq!(l.ring_slot(2), None);
        let a = l.queue_addrs(1, 256).unwrap();
        assert_eq!((a.desc, a.avail, a.used), (3 * PAGE, 4 * PAGE, 5 * PAGE));
        l.check_rings(1, RingFormat::Split, 256, &a).unwrap();
        let small = l.queue_addrs(0, 8).unwrap();
        assert_eq!((small.desc, small.avail, small.used), (0, 128, 2 * PAGE));
        l.check_rings(0, RingFormat::Split, 8, &small).unwrap();
        assert!(l.queue_addrs(0, 512).is_none());
    }

    #[test]
    fn bad_configs_are_refused() {
        let d = SharedPageConfig::default();
        let bad = [
            SharedPageConfig { max_queues: 0, ..d },
            SharedPageConfig {
                max_queue_size: 3,
                ..d
            },
            SharedPageConfig {
                max_queue_size: 0,
                ..d
            },
            SharedPageConfig {
                bounce_bytes_per_queue: 1,
                ..d
            },
            SharedPageConfig {
                bounce_bytes_per_queue: MAX_BOUNCE_PER_QUEUE + 1,
                ..d
            },
        ];
        for cfg in bad {
            assert!(Layout::new(&cfg, PAGE).is_err(), "{cfg:?}");
        }
        // The largest config still computes without overflow.
        let huge = SharedPageConfig {
            max_queues: u16::MAX,
            max_queue_size: 32768,
            bounce_bytes_per_queue: MAX_BOUNCE_PER_QUEUE,
        };
        assert!(Layout::new(&huge, PAGE).is_ok());
    }

    #[test]
    fn ring_checks_refuse_misplaced_areas() {
        let l = Layout::new(&SharedPageConfig::default(), PAGE).unwrap();
        let good = l.queue_addrs(0, 256).unwrap();
        let bounce = l.bounce(0).unwrap().start;
        let cases = [
            QueueAddrs { desc: 8, ..good },
            QueueAddrs {
                avail: good.avail + 1,
                ..good
            },
            QueueAddrs {
                used: good.used + 2,
                ..good
            },
            QueueAddrs { used: bounce, ..good },
            QueueAddrs {
                desc: l.len(),
                ..good
            },
            QueueAddrs {
                desc: u64::MAX - 15,
                ..good
            },
            QueueAddrs {
                avail: good.desc + 16,
                ..good
            },
            QueueAddrs {
                used: good.avail,
                ..good
            },
            // Queue 1's slot is not queue 0's.
            l.queue_addrs(1, 256).unwrap(),
        ];
        for a in cases {
            assert!(l.check_rings(0, RingFormat::Split, 256, &a).is_err(), "{a:x?}");
        }
        assert!(l.check_rings(0, RingFormat::Split, 512, &good).is_err());
        assert!(l.check_rings(2, RingFormat::Split, 256, &good).is_err());
    }
}
