//! The block device's control plane: what it offers (features and configuration
//! space), how it answers its transport ([`DeviceHandler`]: activation, reset,
//! feature negotiation, configuration writes), and the cache mode in force, which
//! the driver may change (CONFIG_WCE) and the queue workers read.

use super::{BlkDevice, CacheMode};
use std::sync::atomic::Ordering;
use virtio_core::DeviceModel;
use virtio_core::blk::{self, BlkConfig, BlkFeatures};
use virtio_core::config::ConfigSpace;
use virtio_core::lifecycle::DeviceLifecycle;
use virtio_core::ring::queue::RING_FEATURES;
use virtio_core::transport::{ActiveQueue, DeviceHandler};
use zerocopy::IntoBytes;

/// A [`CacheMode`] shared with the queue workers.
#[derive(Debug)]
pub(super) struct SharedCache(std::sync::atomic::AtomicU8);

impl SharedCache {
    pub(super) fn new(mode: CacheMode) -> SharedCache {
        SharedCache(std::sync::atomic::AtomicU8::new(mode as u8))
    }

    pub(super) fn get(&self) -> CacheMode {
        match self.0.load(Ordering::Acquire) {
            0 => CacheMode::Writeback,
            1 => CacheMode::Writethrough,
            _ => CacheMode::Unsafe,
        }
    }

    fn set(&self, mode: CacheMode) {
        self.0.store(mode as u8, Ordering::Release);
    }
}

impl<V> BlkDevice<V>
where
    V: DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    /// The cache mode in force (the driver can change it with CONFIG_WCE).
    pub fn cache_mode(&self) -> CacheMode {
        self.cache.get()
    }

    /// The block features this device offers.
    pub fn offered(&self) -> BlkFeatures {
        let mut f = BlkFeatures::FLUSH | BlkFeatures::BLK_SIZE | BlkFeatures::SEG_MAX | BlkFeatures::SIZE_MAX;
        if self.settings.cache != CacheMode::Unsafe {
            // The unsafe mode is a host decision the guest must not switch off.
            f |= BlkFeatures::CONFIG_WCE;
        }
        f |= BlkFeatures::DISCARD | BlkFeatures::WRITE_ZEROES;
        if self.settings.queues > 1 {
            f |= BlkFeatures::MQ;
        }
        if self.facts.read_only {
            f |= BlkFeatures::RO;
        }
        f
    }

    /// The control plane a transport serves: offered features, configuration space
    /// and queue sizes.
    pub fn lifecycle(&self) -> DeviceLifecycle {
        let features = self.offered().bits() | RING_FEATURES.bits();
        let cfg = BlkConfig {
            capacity: self.facts.capacity_sectors.into(),
            size_max: self.facts.size_max.into(),
            seg_max: self.facts.seg_max.into(),
            blk_size: self.facts.blk_size.into(),
            writeback: writeback_byte(self.settings.cache),
            num_queues: self.settings.queues.into(),
            max_discard_sectors: self.facts.max_discard_sectors.into(),
            max_discard_seg: self.facts.max_discard_seg.into(),
            discard_sector_alignment: (self.facts.blk_size / 512).max(1).into(),
            max_write_zeroes_sectors: self.facts.max_write_zeroes_sectors.into(),
            max_write_zeroes_seg: self.facts.max_write_zeroes_seg.into(),
            write_zeroes_may_unmap: 1,
            ..BlkConfig::default()
        };
        let sizes = vec![self.settings.queue_size; usize::from(self.settings.queues.max(1))];
        DeviceLifecycle::new(
            blk::DEVICE_ID,
            features,
            blk::BLK_DEPENDENCIES,
            ConfigSpace::new(cfg.as_bytes().to_vec()),
            &sizes,
        )
    }

    /// The cache mode a driver that negotiated `features` gets (virtio 1.2
    /// §5.2.5.1): without FLUSH it has no way to make writes durable, so every
    /// write is (writethrough; with CONFIG_WCE, `writeback` starts at 0, and the
    /// driver may still choose writeback, as the spec allows). The unsafe mode
    /// stays what the host asked for.
    fn cache_for(&self, features: u64) -> CacheMode {
        let f = BlkFeatures::from_bits_truncate(features);
        match self.settings.cache {
            CacheMode::Unsafe => CacheMode::Unsafe,
            _ if !f.contains(BlkFeatures::FLUSH) => CacheMode::Writethrough,
            mode => mode,
        }
    }
}

impl<V> DeviceHandler for BlkDevice<V>
where
    V: DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    fn activate(
        &mut self,
        features: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        for q in queues {
            if let Err(e) = self.start_queue(features, q) {
                self.stop_all(false);
                return Err(e);
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_all(false);
        // The failed-flush latch stays (see `flush`): a reset must not turn lost
        // writes into a clean disk.
        self.cache.set(self.settings.cache);
        self.writeback_changed = Some(writeback_byte(self.settings.cache));
    }

    /// The cache mode follows the negotiated features (virtio 1.2 §5.2.5.1),
    /// and so does `writeback`, before the driver reads it.
    fn features_ok(&mut self, features: u64) {
        let mode = self.cache_for(features);
        if mode != self.settings.cache {
            tracing::info!(
                ?mode,
                "FLUSH not negotiated: every write is durable at completion"
            );
        }
        self.cache.set(mode);
        self.writeback_changed = Some(writeback_byte(mode));
    }

    fn config_changes(&mut self, update: &mut dyn FnMut(usize, &[u8])) {
        if let Some(byte) = self.writeback_changed.take() {
            update(std::mem::offset_of!(BlkConfig, writeback), &[byte]);
        }
    }

    /// CONFIG_WCE: the driver switches between writeback (1) and writethrough (0) by
    /// writing `writeback` (§5.2.5.1). Switching to writethrough makes every later
    /// write durable at completion; data written before still needs a flush, as the
    /// spec leaves it to the driver.
    fn write_config(&mut self, features: u64, offset: usize, data: &[u8]) -> bool {
        let wce = BlkFeatures::from_bits_truncate(features).contains(BlkFeatures::CONFIG_WCE);
        if !wce || offset != std::mem::offset_of!(BlkConfig, writeback) || data.len() != 1 {
            return false;
        }
        let mode = match data[0] {
            0 => CacheMode::Writethrough,
            1 => CacheMode::Writeback,
            _ => return false,
        };
        tracing::info!(?mode, "driver switched the cache mode");
        self.cache.set(mode);
        true
    }
}

/// The `writeback` configuration byte of a cache mode: 0 for writethrough.
fn writeback_byte(mode: CacheMode) -> u8 {
    u8::from(mode != CacheMode::Writethrough)
}
