//! The virtio-blk device: features, configuration space, and the queue workers that
//! serve requests through an [`Engine`].
//!
//! One worker per queue, each a task on a tokio runtime (the device's own, or the
//! caller's): it waits on the queue's kick eventfd and on its engine's completion
//! eventfd (both registered with `AsyncFd`), pops every available chain per kick,
//! parses it ([`Parser`]), turns it into engine ops submitted as one batch (one by
//! one while it polls or serves completions, so the disk starts on the first), and
//! completes requests as their ops finish, out of order.
//!
//! Barriers (virtio 1.2 §5.2.6.3): a FLUSH completes only after its `fdatasync`
//! finished; in writethrough mode every write is `RWF_DSYNC`; a failed flush is
//! latched, so every later flush fails too (a lost write does not come back by
//! retrying); [`CacheMode::Unsafe`] acknowledges flushes without doing them and says
//! so in its name. Reset waits for every op in flight and writes nothing to guest
//! memory afterwards.

use crate::blk::disk::Disk;
use crate::blk::engine::{AlignedBuf, Completion, Engine, IoKind, IoOp};
use crate::blk::engine_sync::SyncEngine;
use crate::blk::engine_uring::{UringConfig, UringEngine, best_engine};
use crate::blk::request::{DiskFacts, Parser, Reject, Request, RequestKind};
use crate::poll::Poller;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::unix::AsyncFd;
use virtio_core::blk::{self, BlkConfig, BlkFeatures, Status};
use virtio_core::config::ConfigSpace;
use virtio_core::features::Features;
use virtio_core::lifecycle::DeviceLifecycle;
use virtio_core::notify::{EventFdNotifier, Notify, Wait};
use virtio_core::ring::Chain;
use virtio_core::transport::{ActiveQueue, DeviceHandler};
use virtio_core::{DeviceMemory, DeviceModel, SplitDevice};
use zerocopy::IntoBytes;

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
    /// cross-core wake-up latency (tens of microseconds, PERF.md); keep it zero when
    /// workers share a runtime with other tasks. A worker that finds its core
    /// shared (it was preempted for a time slice while polling) stops polling for
    /// a while, backing off (the crate's `poll` module), so it does not starve the
    /// guest driver it waits for on a machine with fewer cores than busy threads.
    pub poll: std::time::Duration,
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
        }
    }
}

/// Largest discard / write-zeroes range we advertise, in sectors (1 GiB).
const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// Ranges per discard / write-zeroes request we advertise.
const MAX_RANGE_SEGS: u32 = 16;

/// While completing a batch of ops, the worker starts newly available chains after
/// this many completions ([`Worker::complete_all`]).
const RESTART_EVERY: usize = 8;
/// Data buffers a queue worker keeps for reuse.
const POOL_BUFFERS: usize = 64;
/// Largest data buffer kept for reuse (larger ones are rare and costly to hoard).
const POOL_BUFFER_MAX: usize = 64 * 1024;

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
    /// A failed flush, latched until reset (§5.2.6.3: a later flush must not
    /// succeed as if the lost writes were safe).
    flush_failed: Arc<AtomicBool>,
    /// The cache mode in force; the driver may switch writeback and writethrough
    /// with CONFIG_WCE while queues run.
    cache: Arc<SharedCache>,
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
            size_max: u32::MAX,
            // Two descriptors of every chain carry the header and the status.
            seg_max: u32::from(settings.queue_size.saturating_sub(2).max(1)),
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
            flush_failed: Arc::new(AtomicBool::new(false)),
            cache: Arc::new(SharedCache::new(settings_cache)),
            running: Vec::new(),
        }
    }

    /// The cache mode in force (the driver can change it with CONFIG_WCE).
    pub fn cache_mode(&self) -> CacheMode {
        self.cache.get()
    }

    /// The block features this device offers.
    pub fn offered(&self) -> BlkFeatures {
        let mut f = BlkFeatures::FLUSH | BlkFeatures::BLK_SIZE | BlkFeatures::SEG_MAX;
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
            seg_max: self.facts.seg_max.into(),
            blk_size: self.facts.blk_size.into(),
            writeback: u8::from(self.settings.cache != CacheMode::Writethrough),
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

    /// Whether a flush failed since the last reset.
    pub fn flush_failed(&self) -> bool {
        self.flush_failed.load(Ordering::Acquire)
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
        let ring = SplitDevice::new(q.layout.size, &vq.ring, vq.memory, f)?.starting_at(q.next_avail);
        let blk_features = BlkFeatures::from_bits_truncate(features);
        let worker = Worker {
            index: q.index,
            ring,
            parser: Parser::new(blk_features, self.facts),
            engine: self.engine()?,
            cache: self.cache.clone(),
            mem_align: self.disk.mem_align(),
            serial: blk::encode_device_id(self.settings.serial.as_bytes()),
            flush_failed: self.flush_failed.clone(),
            poller: Poller::new(self.settings.poll),
            slots: Vec::new(),
            free: Vec::new(),
            completions: Vec::new(),
            buffers: Vec::new(),
        };
        let stop = Arc::new(EventFdNotifier::new()?);
        let drain = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = std::sync::mpsc::channel();
        let fut = worker.run(q.kick, q.interrupt, stop.clone(), drain.clone(), done_tx);
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
        self.flush_failed.store(false, Ordering::Release);
        self.cache.set(self.settings.cache);
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

/// A request being executed: its chain (owned until it is returned as used) and how
/// many engine ops are still out.
struct InFlight {
    chain: Chain,
    req: Request,
    pending: u32,
    status: Status,
}

/// The state of one queue's worker.
struct Worker<M> {
    index: u16,
    ring: SplitDevice<M>,
    parser: Parser,
    engine: Box<dyn Engine>,
    cache: Arc<SharedCache>,
    mem_align: usize,
    serial: [u8; blk::GET_ID_LEN],
    flush_failed: Arc<AtomicBool>,
    poller: Poller,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    completions: Vec<Completion>,
    /// Data buffers of finished ops, for reuse ([`Worker::buffer`]).
    buffers: Vec<AlignedBuf>,
}

/// Registers a descriptor (duplicated, so the registration owns it) with the current
/// tokio reactor.
fn watch(fd: BorrowedFd<'_>) -> std::io::Result<AsyncFd<OwnedFd>> {
    let owned = fd.try_clone_to_owned()?;
    // SAFETY: the `AsyncFd` owns the `OwnedFd`, which keeps the descriptor open and
    // returns the same number from `as_raw_fd` for the `AsyncFd`'s whole life.
    unsafe { AsyncFd::register(owned) }.map_err(|e| e.into_parts().1)
}

impl<M: DeviceMemory + Send> Worker<M> {
    async fn run(
        mut self,
        kick: EventFdNotifier,
        interrupt: EventFdNotifier,
        stop: Arc<EventFdNotifier>,
        drain: Arc<AtomicBool>,
        done: std::sync::mpsc::Sender<u16>,
    ) {
        if let Err(e) = self.serve(&kick, &interrupt, &stop).await {
            tracing::error!(queue = self.index, error = %e, "block queue worker failed");
        }
        if drain.load(Ordering::Acquire) {
            self.drain(&interrupt);
        }
        self.quiesce();
        tracing::debug!(
            queue = self.index,
            contended_polls = self.poller.contended_sessions(),
            next_avail = self.ring.next_avail(),
            "block queue worker stopped"
        );
        let _ = done.send(self.ring.next_avail());
    }

    async fn serve(
        &mut self,
        kick: &EventFdNotifier,
        interrupt: &EventFdNotifier,
        stop: &EventFdNotifier,
    ) -> std::io::Result<()> {
        let kick_fd = watch(kick.as_fd())?;
        let ready_fd = watch(self.engine.ready_fd())?;
        let stop_fd = watch(stop.as_fd())?;
        // Buffers made available before the first kick are served too.
        self.on_kick(interrupt);
        loop {
            tokio::select! {
                g = stop_fd.readable() => {
                    let _ = g?;
                    return Ok(());
                }
                g = kick_fd.readable() => {
                    let mut g = g?;
                    g.clear_ready();
                    let _ = kick.take();
                    self.on_kick(interrupt);
                }
                g = ready_fd.readable() => {
                    let mut g = g?;
                    g.clear_ready();
                    self.engine.ack_ready();
                    self.on_completions(interrupt);
                }
            }
            self.poll_for_more(interrupt);
        }
    }

    /// Adaptive polling: serves whatever arrives without sleeping until nothing has
    /// for [`BlkSettings::poll`], with kicks suppressed meanwhile; backs off while the
    /// core is shared (see [`Poller`]).
    fn poll_for_more(&mut self, interrupt: &EventFdNotifier) {
        let Some(mut session) = self.poller.start() else {
            return;
        };
        self.ring.disable_notifications();
        let mut got = std::mem::take(&mut self.completions);
        loop {
            let mut work = self.start_each();
            if self.engine.reap(&mut got) > 0 {
                self.complete_all(&mut got);
                work = true;
            }
            if work {
                self.signal(interrupt);
            }
            if !self.poller.keep_polling(&mut session, work) {
                break;
            }
        }
        self.poller.end(session);
        self.completions = got;
        // Re-arm kicks; work that raced in is served before sleeping.
        if self.ring.enable_notifications() {
            self.on_kick(interrupt);
        }
    }

    /// Pops and starts everything available, with kicks suppressed while polling.
    fn on_kick(&mut self, interrupt: &EventFdNotifier) {
        self.ring.disable_notifications();
        loop {
            while let Some(chain) = self.next_chain() {
                self.start(chain);
            }
            if let Err(e) = self.engine.commit() {
                tracing::error!(queue = self.index, error = %e, "submitting block I/O failed");
            }
            if !self.ring.enable_notifications() {
                break;
            }
            self.ring.disable_notifications();
        }
        self.signal(interrupt);
    }

    /// The next valid chain; bad chains were already returned by the ring.
    fn next_chain(&mut self) -> Option<Chain> {
        loop {
            match self.ring.pop() {
                Ok(c) => return c,
                Err(virtio_core::ring::split::DeviceQueueError::NeedsReset(f)) => {
                    tracing::warn!(queue = self.index, fault = %f, "queue needs reset");
                    return None;
                }
                Err(e) => tracing::debug!(queue = self.index, error = %e, "chain rejected"),
            }
        }
    }

    /// Parses a chain and either completes it at once or submits its ops.
    fn start(&mut self, chain: Chain) {
        let req = match self.parser.parse(&chain, self.ring.memory()) {
            Ok(r) => r,
            Err(reject) => return self.reject(&chain, &reject),
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let user = slot as u64;
        let mut ops: u32 = 0;
        let mut status = Status::Ok;
        match req.kind() {
            &RequestKind::Read { offset, len, .. } => {
                let buf = self.buffer(len as usize);
                self.engine.submit(IoOp {
                    kind: IoKind::Read,
                    offset,
                    len: u64::from(len),
                    buf,
                    user,
                });
                ops = 1;
            }
            &RequestKind::Write { offset, len, .. } => {
                let mut buf = self.buffer(len as usize);
                if req
                    .data()
                    .read(&chain, self.ring.memory(), buf.as_mut_slice())
                    .is_err()
                {
                    status = Status::IoErr;
                    self.recycle(buf);
                } else {
                    let dsync = self.cache.get() == CacheMode::Writethrough;
                    self.engine.submit(IoOp {
                        kind: IoKind::Write { dsync },
                        offset,
                        len: u64::from(len),
                        buf,
                        user,
                    });
                    ops = 1;
                }
            }
            RequestKind::Flush => {
                if self.flush_failed.load(Ordering::Acquire) {
                    status = Status::IoErr;
                } else if self.cache.get() != CacheMode::Unsafe {
                    self.engine.submit(IoOp {
                        kind: IoKind::Flush,
                        offset: 0,
                        len: 0,
                        buf: AlignedBuf::default(),
                        user,
                    });
                    ops = 1;
                }
            }
            RequestKind::GetId => {
                if req
                    .data()
                    .write(&chain, self.ring.memory(), &self.serial)
                    .is_err()
                {
                    status = Status::IoErr;
                }
            }
            RequestKind::Discard(ranges) | RequestKind::WriteZeroes(ranges) => {
                // DISCARD punches holes; WRITE_ZEROES uses zero-range, which reads back
                // as zeros whether or not the driver allowed unmapping.
                let kind = match req.kind() {
                    RequestKind::Discard(_) => IoKind::Discard,
                    _ => IoKind::WriteZeroes,
                };
                for r in ranges.iter() {
                    self.engine.submit(IoOp {
                        kind,
                        offset: r.offset,
                        len: r.len,
                        buf: AlignedBuf::default(),
                        user,
                    });
                    ops += 1;
                }
            }
            RequestKind::GetLifetime | RequestKind::SecureErase(_) => status = Status::Unsupp,
        }
        self.slots[slot] = Some(InFlight {
            chain,
            req,
            pending: ops,
            status,
        });
        if ops == 0 {
            self.finish(slot);
        }
    }

    fn reject(&mut self, chain: &Chain, reject: &Reject) {
        tracing::debug!(queue = self.index, error = %reject, reason = ?reject.reason(), "request rejected");
        let used = match (reject, reject.code()) {
            (Reject::Status { status, .. }, Some(code)) => self.fail(chain, status.writable_len(), code),
            _ => 0,
        };
        self.add_used(chain.head(), used);
    }

    /// Completes a request that did not succeed: zeros over every writable byte
    /// before the status, then the status, and the whole writable part as the used
    /// length. Sharing models that copy back only the used length (bounce buffers)
    /// then deliver the status too, and no stale bytes reach the guest (HOSTILE 30).
    fn fail(&self, chain: &Chain, writable_len: u32, status: Status) -> u32 {
        static ZEROS: [u8; 4096] = [0; 4096];
        let mut w = chain.writer(self.ring.memory());
        let mut left = writable_len.saturating_sub(1) as usize;
        while left > 0 {
            let n = left.min(ZEROS.len());
            if w.write_all(&ZEROS[..n]).is_err() {
                return 0;
            }
            left -= n;
        }
        match w.write_all(&[status.raw()]) {
            Ok(()) => w.written(),
            Err(_) => 0,
        }
    }

    /// Reaps engine completions and finishes the requests they complete.
    fn on_completions(&mut self, interrupt: &EventFdNotifier) {
        let mut got = std::mem::take(&mut self.completions);
        while self.engine.reap(&mut got) > 0 {
            self.complete_all(&mut got);
        }
        self.completions = got;
        self.signal(interrupt);
    }

    /// Completes reaped ops, and every [`RESTART_EVERY`] of them starts the chains the
    /// driver has made available meanwhile.
    ///
    /// A disk that finishes a whole batch at once sits idle from then until the next
    /// request reaches it (a virtio disk under QD32 random reads completes all 32 with
    /// one interrupt). A closed-loop driver reuses each request as soon as it sees it
    /// used, so restarting early, rather than after the last completion of the batch,
    /// shrinks that idle gap to a few completions' worth.
    fn complete_all(&mut self, got: &mut Vec<Completion>) {
        for (i, c) in got.drain(..).enumerate() {
            self.complete_op(c);
            if (i + 1) % RESTART_EVERY == 0 {
                self.start_each();
            }
        }
    }

    /// Starts every available chain, each committed to the engine on its own; returns
    /// whether there was any.
    ///
    /// One `io_uring_enter` per request, as fio does by default: the disk starts on
    /// the first request while the worker parses the next, instead of after the
    /// last. Measured with `vio blk-bench` (4 KiB random reads at QD32 on a virtio
    /// disk), this is worth 10-15 % over one commit per batch. The worker takes this
    /// path while it polls or serves completions, when requests arrive one by one
    /// anyway; a kick's batch ([`Worker::on_kick`]) is still committed with one call.
    fn start_each(&mut self) -> bool {
        let mut any = false;
        while let Some(chain) = self.next_chain() {
            self.start(chain);
            if let Err(e) = self.engine.commit() {
                tracing::error!(queue = self.index, error = %e, "submitting block I/O failed");
            }
            any = true;
        }
        any
    }

    fn complete_op(&mut self, c: Completion) {
        let slot = usize::try_from(c.user).unwrap_or(usize::MAX);
        let Some(Some(f)) = self.slots.get_mut(slot) else {
            tracing::error!(queue = self.index, user = c.user, "completion for no request");
            return;
        };
        let kind = f.req.kind();
        let ok = match (kind, &c.result) {
            // A transfer is complete or it failed: a short count after the engine's
            // retries is an error, never a partial success.
            (RequestKind::Read { len, .. }, Ok(n)) => {
                *n == u64::from(*len)
                    && f.req
                        .data()
                        .write(&f.chain, self.ring.memory(), c.buf.as_slice())
                        .is_ok()
            }
            (RequestKind::Write { len, .. }, Ok(n)) => *n == u64::from(*len),
            (RequestKind::Flush, Ok(_)) => true,
            (RequestKind::Flush, Err(e)) => {
                // Latched: the data of some write may be lost for good.
                tracing::error!(queue = self.index, error = %e, "flush failed; later flushes will fail");
                self.flush_failed.store(true, Ordering::Release);
                false
            }
            (_, Ok(_)) => true,
            (_, Err(e)) => {
                tracing::warn!(queue = self.index, error = %e, ?kind, "block I/O failed");
                false
            }
        };
        if !ok {
            f.status = Status::IoErr;
        }
        f.pending = f.pending.saturating_sub(1);
        let done = f.pending == 0;
        self.recycle(c.buf);
        if done {
            self.finish(slot);
        }
    }

    /// A data buffer of `len` bytes: a recycled one of that length if there is one,
    /// else a new one.
    ///
    /// Stale contents are harmless (HOSTILE 30): a read's buffer reaches the guest
    /// only when the read filled all of it, and a write's is filled from the guest
    /// before it is submitted.
    fn buffer(&mut self, len: usize) -> AlignedBuf {
        if self.buffers.last().is_some_and(|b| b.len() == len)
            && let Some(buf) = self.buffers.pop()
        {
            return buf;
        }
        AlignedBuf::for_io(len, self.mem_align)
    }

    /// Keeps a finished op's buffer for reuse, within [`POOL_BUFFERS`] buffers of at
    /// most [`POOL_BUFFER_MAX`] bytes: the steady state of a queue then allocates,
    /// zeroes and frees nothing per request.
    fn recycle(&mut self, buf: AlignedBuf) {
        if !buf.is_empty() && buf.len() <= POOL_BUFFER_MAX && self.buffers.len() < POOL_BUFFERS {
            self.buffers.push(buf);
        }
    }

    /// Writes the status of a finished request and returns its chain.
    fn finish(&mut self, slot: usize) {
        let Some(f) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        let used = if f.status == Status::Ok {
            f.req.write_status(self.ring.memory(), f.status).unwrap_or(0)
        } else {
            self.fail(&f.chain, f.req.status_target().writable_len(), f.status)
        };
        self.add_used(f.chain.head(), used);
    }

    fn add_used(&mut self, head: u16, used: u32) {
        if let Err(e) = self.ring.add_used(head, used) {
            tracing::error!(queue = self.index, error = %e, "returning a chain failed");
        }
    }

    fn signal(&mut self, interrupt: &EventFdNotifier) {
        if self.ring.needs_notification()
            && let Err(e) = interrupt.notify()
        {
            tracing::warn!(queue = self.index, error = %e, "used-buffer notification failed");
        }
    }

    /// Waits for every op in flight and drops the results: after a reset nothing
    /// may be written to guest memory (§2.4), and buffers stay owned until reaped.
    /// Completes every op in flight and returns its request to the driver, then
    /// signals it: the queue stops with nothing in flight, so another device
    /// instance can resume it at [`SplitDevice::next_avail`].
    fn drain(&mut self, interrupt: &EventFdNotifier) {
        let mut got = std::mem::take(&mut self.completions);
        while self.engine.in_flight() > 0 {
            if let Err(e) = self.engine.wait() {
                tracing::error!(queue = self.index, error = %e, "waiting for block I/O while stopping");
                break;
            }
            self.engine.reap(&mut got);
            for c in got.drain(..) {
                self.complete_op(c);
            }
        }
        self.completions = got;
        self.signal(interrupt);
    }

    fn quiesce(&mut self) {
        let mut got = Vec::new();
        while self.engine.in_flight() > 0 {
            if let Err(e) = self.engine.wait() {
                tracing::error!(queue = self.index, error = %e, "waiting for block I/O during reset");
                break;
            }
            self.engine.reap(&mut got);
            got.clear();
        }
        self.slots.clear();
        self.free.clear();
    }
}
