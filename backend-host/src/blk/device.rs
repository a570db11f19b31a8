//! The virtio-blk device: features, configuration space, and the queue workers that
//! serve requests through an [`Engine`](crate::blk::engine::Engine).
//!
//! One worker per queue, each a task on a tokio runtime (the device's own, or the
//! caller's): it waits on the queue's kick eventfd and on its engine's completion
//! eventfd (both registered with `AsyncFd`), pops what is available (at most
//! [`CHAINS_PER_WAKE`] chains per wake-up),
//! parses it ([`Parser`](crate::blk::request::Parser)), turns it into engine ops submitted as one batch (one by
//! one while it polls or serves completions, so the disk starts on the first), and
//! completes requests as their ops finish, out of order.
//!
//! Barriers (virtio 1.2 §5.2.6.3): a FLUSH completes only after an `fdatasync`
//! that started after the FLUSH arrived has finished; one sync runs at a time per
//! disk, shared by the flushes of every queue that arrived meanwhile (group
//! commit), and each flush completes with the failed-flush latch as it stands at
//! completion (the source of `device/flush.rs` says why). In writethrough mode every write is
//! `RWF_DSYNC` and a WRITE_ZEROES is followed by a sync; a failed flush is
//! latched, so every later flush fails too (a lost write does not come back by
//! retrying, nor by a reset or a reconnect: only
//! [`BlkDevice::clear_flush_failure`] clears it); [`CacheMode::Unsafe`]
//! acknowledges flushes without doing them and says so in its name. Reset waits
//! for every op in flight and writes nothing to guest memory afterwards.
//!
//! Bounds on what a guest can make the host hold or spend (HOSTILE 32, 34): at most
//! [`BlkSettings::max_bytes_in_flight`] bytes of buffers per queue, ops of at most
//! [`CHUNK`] bytes, and a status byte alone for a failed request.

mod flush;
mod runtime;
mod settings;
mod worker;

use crate::blk::disk::Disk;
use crate::blk::request::DiskFacts;
use flush::FlushGate;
use runtime::Running;
use settings::{MAX_RANGE_SECTORS, MAX_RANGE_SEGS};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use virtio_core::DeviceModel;
use virtio_core::blk::{self, BlkConfig, BlkFeatures};
use virtio_core::config::ConfigSpace;
use virtio_core::features::Features;
use virtio_core::lifecycle::DeviceLifecycle;
use virtio_core::ring::INDIRECT_MAX;
use virtio_core::transport::{ActiveQueue, DeviceHandler};
use zerocopy::IntoBytes;

pub use runtime::Runtime;
pub use settings::{
    BlkSettings, CHAINS_PER_WAKE, CHUNK, CacheMode, DEFAULT_BYTES_IN_FLIGHT, EngineChoice, EngineFactory,
};

/// A virtio-blk device over one disk, serving a guest through sharing model `V`.
pub struct BlkDevice<V: DeviceModel> {
    disk: Arc<Disk>,
    model: Arc<V>,
    settings: BlkSettings,
    runtime: Runtime,
    facts: DiskFacts,
    /// One disk sync at a time, and the failed-flush latch (§5.2.6.3: a later
    /// flush must not succeed as if the lost writes were safe); see [`flush`].
    gate: Arc<FlushGate>,
    /// The cache mode in force; the driver may switch writeback and writethrough
    /// with CONFIG_WCE while queues run.
    cache: Arc<SharedCache>,
    /// The `writeback` byte of the configuration space, when the device changed it
    /// on its own and the transport has not been told ([`DeviceHandler::config_changes`]).
    writeback_changed: Option<u8>,
    running: Vec<Running>,
}

/// A [`CacheMode`] shared with the queue workers.
#[derive(Debug)]
struct SharedCache(std::sync::atomic::AtomicU8);

impl SharedCache {
    fn new(mode: CacheMode) -> SharedCache {
        SharedCache(std::sync::atomic::AtomicU8::new(mode as u8))
    }

    fn get(&self) -> CacheMode {
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

impl<V: DeviceModel> std::fmt::Debug for BlkDevice<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDevice")
            .field("disk", &self.disk.path())
            .field("settings", &self.settings)
            .field("queues_running", &self.running.len())
            .finish_non_exhaustive()
    }
}

impl<V> BlkDevice<V>
where
    V: DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    /// A device serving `disk` through `model`, with workers on `runtime`.
    pub fn new(disk: Disk, model: V, settings: BlkSettings, runtime: Runtime) -> BlkDevice<V> {
        let settings_cache = settings.cache;
        let capacity_sectors = disk.size() / blk::SECTOR_SIZE;
        let facts = DiskFacts {
            capacity_sectors,
            read_only: disk.read_only(),
            blk_size: u32::try_from(disk.block_size()).unwrap_or(4096),
            // Offered, so a driver that reads it sends no larger segment; a request
            // runs as ops of at most this many bytes whatever its segments are.
            size_max: CHUNK,
            // Two descriptors of every chain carry the header and the status. A
            // driver may put all of them in one indirect table, which the walk
            // accepts up to `INDIRECT_MAX` entries whatever the queue size.
            seg_max: u32::from(settings.queue_size.min(INDIRECT_MAX).saturating_sub(2).max(1)),
            max_discard_sectors: MAX_RANGE_SECTORS,
            max_discard_seg: MAX_RANGE_SEGS,
            max_write_zeroes_sectors: MAX_RANGE_SECTORS,
            max_write_zeroes_seg: MAX_RANGE_SEGS,
            max_secure_erase_sectors: 0,
            max_secure_erase_seg: 0,
        };
        BlkDevice {
            disk: Arc::new(disk),
            model: Arc::new(model),
            settings,
            runtime,
            facts,
            gate: Arc::new(FlushGate::default()),
            cache: Arc::new(SharedCache::new(settings_cache)),
            writeback_changed: None,
            running: Vec::new(),
        }
    }

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
        let features = self.offered().bits()
            | (Features::VERSION_1 | Features::INDIRECT_DESC | Features::EVENT_IDX).bits();
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

    /// Whether a flush failed. The failure stays latched through resets and
    /// vhost-user reconnects: see [`BlkDevice::clear_flush_failure`].
    pub fn flush_failed(&self) -> bool {
        self.gate.failed()
    }

    /// Clears a latched flush failure, so flushes may succeed again. Only an
    /// operator who knows the lost writes do not matter (or restored them) should:
    /// after a failed `fdatasync` nobody knows which acknowledged writes are gone,
    /// and neither a device reset nor a reconnecting frontend clears it.
    pub fn clear_flush_failure(&self) {
        self.gate.clear();
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
