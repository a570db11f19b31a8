//! What the driver asks for ([`BlkOptions`]) and what it learned from the device
//! ([`BlkInfo`]): negotiated features and the configuration space, validated.

use std::time::Duration;
use virtio_core::blk::{BlkConfig, BlkFeatures, SECTOR_SIZE};
use virtio_core::features::Features;

/// The 512-byte protocol sector as a `u32`.
const SECTOR_BYTES: u32 = 512;
const _: () = assert!(SECTOR_BYTES as u64 == SECTOR_SIZE);

/// Driver choices; every optional feature defaults to "use it if offered".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkOptions {
    /// Request queues wanted (at most the device's `num_queues` with MQ, else 1).
    pub queues: u16,
    /// Largest queue size wanted; rounded down to a power of two and to the device's
    /// maximum.
    pub queue_size: u16,
    /// Negotiate VIRTIO_F_INDIRECT_DESC if offered (one descriptor per request).
    pub indirect_desc: bool,
    /// Negotiate VIRTIO_F_EVENT_IDX if offered (fewer notifications both ways).
    pub event_idx: bool,
    /// Negotiate VIRTIO_F_RING_PACKED if offered: the packed ring (virtio 1.2 §2.8)
    /// instead of the split one. Off by default.
    pub ring_packed: bool,
    /// Negotiate VIRTIO_F_IN_ORDER if offered: the device uses requests in the order
    /// they were made available and may return a batch with one used entry (virtio
    /// 1.2 §2.7.9, §2.8.x). Off by default.
    pub in_order: bool,
    /// Negotiate VIRTIO_BLK_F_FLUSH if offered.
    pub flush: bool,
    /// Negotiate VIRTIO_BLK_F_DISCARD if offered.
    pub discard: bool,
    /// Negotiate VIRTIO_BLK_F_WRITE_ZEROES if offered.
    pub write_zeroes: bool,
    /// Negotiate VIRTIO_BLK_F_MQ if offered.
    pub multiqueue: bool,
    /// How long blocking calls wait for a completion; `None` waits forever.
    pub timeout: Option<Duration>,
    /// How long a blocking call polls the used ring for its completion before it
    /// sleeps on the interrupt (zero, the default: sleeps at once). A wake-up
    /// from an eventfd costs tens of microseconds (docs/PERF.md); spinning trades a
    /// core for it, so use it only with cores to spare: on a machine with fewer
    /// cores than busy threads a spinning guest starves the threads that finish
    /// its I/O (io_uring's workers run `fdatasync` and `RWF_DSYNC` writes).
    pub spin: Duration,
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            queues: 1,
            queue_size: 256,
            indirect_desc: true,
            event_idx: true,
            ring_packed: false,
            in_order: false,
            flush: true,
            discard: true,
            write_zeroes: true,
            multiqueue: true,
            timeout: None,
            spin: Duration::ZERO,
        }
    }
}

impl BlkOptions {
    /// The feature word the driver offers to accept.
    pub(crate) fn wanted(&self) -> u64 {
        let mut blk =
            BlkFeatures::RO | BlkFeatures::BLK_SIZE | BlkFeatures::SEG_MAX | BlkFeatures::CONFIG_WCE;
        let optional = [
            (self.flush, BlkFeatures::FLUSH),
            (self.discard, BlkFeatures::DISCARD),
            (self.write_zeroes, BlkFeatures::WRITE_ZEROES),
            (self.multiqueue, BlkFeatures::MQ),
        ];
        for (on, f) in optional {
            blk.set(f, on);
        }
        let mut core = Features::VERSION_1;
        core.set(Features::INDIRECT_DESC, self.indirect_desc);
        core.set(Features::EVENT_IDX, self.event_idx);
        core.set(Features::RING_PACKED, self.ring_packed);
        core.set(Features::IN_ORDER, self.in_order);
        blk.bits() | core.bits()
    }
}

/// The device as negotiated and configured. Every value the device supplied has been
/// sanitised: limits that make no sense fall back to the spec's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkInfo {
    /// Negotiated feature word (device-independent and block bits).
    pub features: u64,
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size in bytes (512 unless BLK_SIZE gives a power of two >= 512).
    pub blk_size: u32,
    /// Most data segments per request (SEG_MAX), if the device said.
    pub seg_max: Option<u32>,
    /// Whether the device is read-only (RO).
    pub read_only: bool,
    /// Whether FLUSH was negotiated. Without it the device is writethrough: every
    /// write is durable at completion (§5.2.5.2), so a flush has nothing to do.
    pub flush: bool,
    /// Whether the cache is in writeback mode (CONFIG_WCE's `writeback`, or FLUSH
    /// without CONFIG_WCE, §5.2.5.2).
    pub writeback: bool,
    /// Device queues (`num_queues` with MQ, else 1).
    pub device_queues: u16,
    /// Discard limits, if DISCARD was negotiated.
    pub discard: Option<RangeLimits>,
    /// Write-zeroes limits, if WRITE_ZEROES was negotiated.
    pub write_zeroes: Option<RangeLimits>,
    /// Whether a write-zeroes with `unmap` may deallocate (`write_zeroes_may_unmap`).
    pub write_zeroes_may_unmap: bool,
}

/// Limits of a discard or write-zeroes range (§5.2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeLimits {
    /// Largest range in sectors (the device's 0 means "no limit given": `u32::MAX`).
    pub max_sectors: u32,
    /// Most segments per request (at least 1).
    pub max_seg: u32,
    /// Alignment hint in sectors (DISCARD only, else 0).
    pub sector_alignment: u32,
}

impl BlkInfo {
    /// Interprets the configuration space under the negotiated `features`.
    pub(crate) fn new(features: u64, cfg: &BlkConfig) -> BlkInfo {
        let f = BlkFeatures::from_bits_retain(features);
        let blk_size = cfg.blk_size.get();
        let blk_size = if !f.contains(BlkFeatures::BLK_SIZE) {
            SECTOR_BYTES
        } else if blk_size.is_power_of_two() && u64::from(blk_size) >= SECTOR_SIZE {
            blk_size
        } else {
            tracing::warn!(blk_size, "device offers an invalid blk_size, using 512");
            SECTOR_BYTES
        };
        let limits = |on: bool, sectors: u32, seg: u32, align: u32| {
            on.then_some(RangeLimits {
                max_sectors: if sectors == 0 { u32::MAX } else { sectors },
                max_seg: seg.max(1),
                sector_alignment: align,
            })
        };
        let flush = f.contains(BlkFeatures::FLUSH);
        // §5.2.5.2: with CONFIG_WCE the mode is in `writeback`; without it, FLUSH
        // alone means writeback.
        let writeback = if f.contains(BlkFeatures::CONFIG_WCE) {
            cfg.writeback != 0
        } else {
            flush
        };
        let wz = f.contains(BlkFeatures::WRITE_ZEROES);
        BlkInfo {
            features,
            capacity: cfg.capacity.get(),
            blk_size,
            seg_max: f.contains(BlkFeatures::SEG_MAX).then_some(cfg.seg_max.get()),
            read_only: f.contains(BlkFeatures::RO),
            flush,
            writeback,
            device_queues: if f.contains(BlkFeatures::MQ) {
                cfg.num_queues.get().max(1)
            } else {
                1
            },
            discard: limits(
                f.contains(BlkFeatures::DISCARD),
                cfg.max_discard_sectors.get(),
                cfg.max_discard_seg.get(),
                cfg.discard_sector_alignment.get(),
            ),
            write_zeroes: limits(
                wz,
                cfg.max_write_zeroes_sectors.get(),
                cfg.max_write_zeroes_seg.get(),
                0,
            ),
            write_zeroes_may_unmap: wz && cfg.write_zeroes_may_unmap != 0,
        }
    }

    /// Whether the negotiated features contain `f`.
    pub fn has(&self, f: BlkFeatures) -> bool {
        BlkFeatures::from_bits_retain(self.features).contains(f)
    }

    /// Capacity in bytes (saturating: a hostile capacity cannot overflow).
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.saturating_mul(SECTOR_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_want_core_features_only_when_enabled() {
        let o = BlkOptions {
            indirect_desc: false,
            discard: false,
            ..BlkOptions::default()
        };
        let w = o.wanted();
        assert_eq!(w & Features::INDIRECT_DESC.bits(), 0);
        assert_ne!(w & Features::EVENT_IDX.bits(), 0);
        assert_eq!(w & BlkFeatures::DISCARD.bits(), 0);
        assert_ne!(w & BlkFeatures::RO.bits(), 0);
    }

    #[test]
    fn hostile_config_values_are_sanitised() {
        let cfg = BlkConfig {
            capacity: u64::MAX.into(),
            blk_size: 1000.into(),
            ..BlkConfig::default()
        };
        let f = (BlkFeatures::BLK_SIZE | BlkFeatures::MQ | BlkFeatures::DISCARD).bits();
        let info = BlkInfo::new(f, &cfg);
        assert_eq!(info.blk_size, 512);
        assert_eq!(info.device_queues, 1);
        let d = info.discard.unwrap();
        assert_eq!((d.max_sectors, d.max_seg), (u32::MAX, 1));
        assert_eq!(info.capacity_bytes(), u64::MAX);
        assert!(info.write_zeroes.is_none());
    }

    #[test]
    fn writeback_follows_config_wce_or_flush() {
        let mut cfg = BlkConfig::default();
        let flush = BlkFeatures::FLUSH.bits();
        assert!(BlkInfo::new(flush, &cfg).writeback);
        let wce = flush | BlkFeatures::CONFIG_WCE.bits();
        assert!(!BlkInfo::new(wce, &cfg).writeback);
        cfg.writeback = 1;
        assert!(BlkInfo::new(wce, &cfg).writeback);
        assert!(!BlkInfo::new(0, &cfg).writeback);
    }
}
