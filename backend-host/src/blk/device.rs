//! The virtio-blk device: features, configuration space, and the queue workers that
//! serve requests through an [`Engine`].
//!
//! One worker per queue, each a task on a tokio runtime (the device's own, or the
//! caller's): it waits on the queue's kick eventfd and on its engine's completion
//! eventfd (both registered with `AsyncFd`), pops what is available (at most
//! [`CHAINS_PER_WAKE`] chains per wake-up),
//! parses it ([`Parser`]), turns it into engine ops submitted as one batch (one by
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
//!
//! # Where things are
//! - This file: [`BlkDevice`], [`BlkDevice::new`], and the failed-flush latch
//!   ([`BlkDevice::flush_failed`], [`BlkDevice::clear_flush_failure`]).
//! - `device/settings.rs`: what a device is made with ([`BlkSettings`],
//!   [`CacheMode`], [`EngineChoice`]) and its fixed limits ([`CHUNK`],
//!   [`CHAINS_PER_WAKE`], [`DEFAULT_BYTES_IN_FLIGHT`], the advertised discard and
//!   write-zeroes ranges).
//! - `device/control.rs`: the control plane: what the device offers
//!   ([`BlkDevice::offered`], [`BlkDevice::lifecycle`]), its
//!   [`DeviceHandler`](virtio_core::transport::DeviceHandler) impl (activate, reset,
//!   feature negotiation, CONFIG_WCE writes), and the cache mode in force
//!   ([`BlkDevice::cache_mode`]), shared with the queue workers.
//! - `device/runtime.rs`: where the queue workers run ([`Runtime`]), starting one
//!   per queue with its engine, and stopping them ([`BlkDevice::stop_queues`], on
//!   reset and on drop).
//! - `device/worker.rs`: one queue's worker, its state and event loop (kicks,
//!   completions, polling, stopping); `device/worker/exec.rs`: request execution,
//!   from a popped chain to engine ops and back to a used entry, with the syncs
//!   flushes wait for; `device/worker/pool.rs`: the data buffers a worker reuses.
//! - `device/flush.rs`: the flush gate: one disk sync at a time, shared by every
//!   queue, and the failed-flush latch.
//!
//! [`Engine`]: crate::blk::engine::Engine
//! [`Parser`]: crate::blk::request::Parser

mod control;
mod flush;
mod runtime;
mod settings;
mod worker;

use crate::blk::disk::Disk;
use crate::blk::request::DiskFacts;
use control::SharedCache;
use flush::FlushGate;
use runtime::Running;
use settings::{MAX_RANGE_SECTORS, MAX_RANGE_SEGS};
use std::sync::Arc;
use virtio_core::DeviceModel;
use virtio_core::blk;
use virtio_core::ring::INDIRECT_MAX;

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
    /// on its own and the transport has not been told ([`DeviceHandler::config_changes`](virtio_core::transport::DeviceHandler::config_changes)).
    writeback_changed: Option<u8>,
    running: Vec<Running>,
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
