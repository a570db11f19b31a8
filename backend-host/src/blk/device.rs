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

mod flush;
mod worker;

use crate::blk::disk::Disk;
use crate::blk::engine::Engine;
use crate::blk::engine_sync::SyncEngine;
use crate::blk::engine_uring::{UringConfig, UringEngine, best_engine};
use crate::blk::request::{DiskFacts, Parser};
use crate::poll::Poller;
use flush::FlushGate;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use virtio_core::blk::{self, BlkConfig, BlkFeatures, Status};
use virtio_core::config::ConfigSpace;
use virtio_core::features::Features;
use virtio_core::lifecycle::DeviceLifecycle;
use virtio_core::notify::{EventFdNotifier, Notify};
use virtio_core::ring::INDIRECT_MAX;
use virtio_core::transport::{ActiveQueue, DeviceHandler};
use virtio_core::{DeviceModel, SplitDevice};
use worker::{StopSignal, Worker, WorkerParts};
use zerocopy::IntoBytes;

pub use worker::{CHAINS_PER_WAKE, CHUNK};

/// How writes reach stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum CacheMode {
    /// Writes may sit in the host's volatile caches until a FLUSH, which runs
    /// `fdatasync` and completes after it (the device advertises a writeback cache).
    #[default]
    Writeback,
    /// Every write is durable when it completes (`RWF_DSYNC`); flushes still sync.
    Writethrough,
    /// Flushes are acknowledged without syncing. Only for throw-away disks: after a
    /// host crash, acknowledged data may be gone.
    Unsafe,
}

/// Makes an engine for one queue (tests wrap real engines in fault injectors).
pub type EngineFactory = Arc<dyn Fn(&Disk) -> std::io::Result<Box<dyn Engine>> + Send + Sync>;

/// Which engine runs the I/O.
#[derive(Clone, Default)]
pub enum EngineChoice {
    /// io_uring when it works here, else the thread pool (logged).
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// The thread pool.
    Sync,
    /// Whatever the factory makes.
    Custom(EngineFactory),
}

impl std::fmt::Debug for EngineChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineChoice::Auto => "Auto",
            EngineChoice::Uring => "Uring",
            EngineChoice::Sync => "Sync",
            EngineChoice::Custom(_) => "Custom",
        })
    }
}

/// Device settings.
#[derive(Debug, Clone)]
pub struct BlkSettings {
    /// Cache mode.
    pub cache: CacheMode,
    /// Number of queues offered (MQ when more than one).
    pub queues: u16,
    /// Largest queue size offered.
    pub queue_size: u16,
    /// The serial number GET_ID returns (at most 20 bytes are sent).
    pub serial: String,
    /// The engine.
    pub engine: EngineChoice,
    /// Adaptive polling: after serving anything, a queue worker keeps polling the ring
    /// and the engine for this long before sleeping on its eventfds (kicks are
    /// suppressed meanwhile). Zero sleeps at once. Polling trades a core for the
    /// cross-core wake-up latency (tens of microseconds, docs/PERF.md); keep it zero when
    /// workers share a runtime with other tasks. A worker that finds its core
    /// shared (it was preempted for a time slice while polling) stops polling for
    /// a while, backing off (the crate's `poll` module), so it does not starve the
    /// guest driver it waits for on a machine with fewer cores than busy threads.
    pub poll: std::time::Duration,
    /// Most bytes of data buffers one queue holds for requests in flight, whatever
    /// the guest sends (HOSTILE 32): requests beyond it wait in the available ring.
    /// At least [`CHUNK`]; the device's total is this times the queues, plus a pool
    /// of at most 64 reused buffers of 64 KiB per queue.
    pub max_bytes_in_flight: usize,
}

impl Default for BlkSettings {
    fn default() -> Self {
        BlkSettings {
            cache: CacheMode::Writeback,
            queues: 1,
            queue_size: 256,
            serial: "vio-blk".into(),
            engine: EngineChoice::Auto,
            poll: std::time::Duration::ZERO,
            max_bytes_in_flight: DEFAULT_BYTES_IN_FLIGHT,
        }
    }
}

/// [`BlkSettings::max_bytes_in_flight`] by default: 32 requests of 512 KiB.
pub const DEFAULT_BYTES_IN_FLIGHT: usize = 16 << 20;

/// Largest discard / write-zeroes range we advertise, in sectors (1 GiB).
const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// Ranges per discard / write-zeroes request we advertise.
const MAX_RANGE_SEGS: u32 = 16;

/// Where the queue workers run.
#[derive(Debug, Clone)]
pub enum Runtime {
    /// Each queue gets a thread with its own single-threaded tokio runtime.
    OwnThreads,
    /// Queue workers are spawned on the caller's runtime.
    Handle(tokio::runtime::Handle),
}

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

struct Running {
    index: u16,
    stop: Arc<EventFdNotifier>,
    /// Set before `stop` is signalled; the worker checks it between chains.
    stopping: Arc<AtomicBool>,
    /// Set before `stop` is signalled: finish the requests in flight and return
    /// them to the driver, rather than dropping them as a reset does.
    drain: Arc<AtomicBool>,
    /// The worker's last word: where its ring stopped.
    done: std::sync::mpsc::Receiver<u16>,
    thread: Option<std::thread::JoinHandle<()>>,
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

    fn engine(&self) -> std::io::Result<Box<dyn Engine>> {
        let depth = u32::from(self.settings.queue_size).max(8);
        match &self.settings.engine {
            EngineChoice::Auto => best_engine(&self.disk, depth),
            EngineChoice::Uring => UringEngine::new(&self.disk, UringConfig { entries: depth })
                .map(|e| Box::new(e) as Box<dyn Engine>)
                .map_err(std::io::Error::other),
            EngineChoice::Sync => Ok(Box::new(SyncEngine::new(&self.disk, 2)?)),
            EngineChoice::Custom(make) => make(&self.disk),
        }
    }

    fn start_queue(
        &mut self,
        features: u64,
        q: ActiveQueue,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let vq = self.model.open_queue(q.index, q.layout.size, q.addrs())?;
        let f = Features::from_bits_retain(features);
        // A request naming memory the model refuses still gets IOERR in its
        // status byte, where that byte is reachable (issue 13, finding 7).
        let ring = SplitDevice::new(q.layout.size, &vq.ring, vq.memory, f)?
            .starting_at(q.next_avail)
            .with_reject_status(Status::IoErr.raw());
        let blk_features = BlkFeatures::from_bits_truncate(features);
        let stopping = Arc::new(AtomicBool::new(false));
        let worker = Worker::new(
            WorkerParts {
                index: q.index,
                ring,
                parser: Parser::new(blk_features, self.facts),
                engine: self.engine()?,
                cache: self.cache.clone(),
                mem_align: self.disk.mem_align(),
                serial: blk::encode_device_id(self.settings.serial.as_bytes()),
                gate: self.gate.clone(),
                poller: Poller::new(self.settings.poll),
                max_bytes_in_flight: self.settings.max_bytes_in_flight,
            },
            stopping.clone(),
        );
        let stop = Arc::new(EventFdNotifier::new()?);
        let drain = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = std::sync::mpsc::channel();
        let signal = StopSignal {
            fd: stop.clone(),
            drain: drain.clone(),
        };
        let fut = worker.run(q.kick, q.interrupt, signal, done_tx);
        let thread = match &self.runtime {
            Runtime::Handle(h) => {
                h.spawn(fut);
                None
            }
            Runtime::OwnThreads => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()?;
                Some(
                    std::thread::Builder::new()
                        .name(format!("vio-blk-q{}", q.index))
                        .spawn(move || rt.block_on(fut))?,
                )
            }
        };
        self.running.push(Running {
            index: q.index,
            stop,
            stopping,
            drain,
            done,
            thread,
        });
        Ok(())
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

impl<V: DeviceModel> BlkDevice<V> {
    /// Stops every queue worker once it has finished the requests in flight and
    /// returned them to the driver, keeping the device's state (the cache mode, a
    /// latched flush failure): how vhost-user stops rings and starts them again
    /// (GET_VRING_BASE), unlike a reset. Returns where each queue stopped, as
    /// `(queue index, next available-ring position)`, for
    /// [`ActiveQueue::next_avail`] when the queue starts again.
    pub fn stop_queues(&mut self) -> Vec<(u16, u16)> {
        self.stop_all(true)
    }

    /// Stops every queue worker and returns once each has reaped its ops; with
    /// `drain`, the requests in flight are completed and returned first.
    fn stop_all(&mut self, drain: bool) -> Vec<(u16, u16)> {
        for r in &self.running {
            r.drain.store(drain, Ordering::Release);
            r.stopping.store(true, Ordering::Release);
            if let Err(e) = r.stop.notify() {
                tracing::error!(error = %e, "cannot signal a queue worker to stop");
            }
        }
        let mut stopped = Vec::with_capacity(self.running.len());
        for mut r in self.running.drain(..) {
            // The worker reports once it has reaped every op; only then may the reset
            // become visible. A worker that died also closes the channel.
            match r.done.recv() {
                Ok(next_avail) => stopped.push((r.index, next_avail)),
                Err(_) => tracing::error!(queue = r.index, "block queue worker died"),
            }
            if let Some(t) = r.thread.take() {
                let _ = t.join();
            }
        }
        stopped
    }
}

impl<V: DeviceModel> Drop for BlkDevice<V> {
    fn drop(&mut self) {
        self.stop_all(false);
    }
}
