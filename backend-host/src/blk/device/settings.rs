//! What a block device is made with, and the limits it keeps whatever the guest
//! sends: the cache mode, the engine choice, [`BlkSettings`], and the fixed bounds
//! of a queue (HOSTILE 32, 34) and of what the device advertises.

use crate::blk::disk::Disk;
use crate::blk::engine::Engine;
use crate::blk::limit::RateLimiter;
use std::sync::Arc;

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
    /// Rate limits for READ and WRITE requests ([`RateLimiter`]); `None` (the
    /// default): unlimited. Give devices the same limiter to limit them as a group;
    /// change the limits while they run with [`RateLimiter::set`].
    pub limiter: Option<Arc<RateLimiter>>,
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
            limiter: None,
        }
    }
}

/// [`BlkSettings::max_bytes_in_flight`] by default: 32 requests of 512 KiB.
pub const DEFAULT_BYTES_IN_FLIGHT: usize = 16 << 20;

/// Largest data buffer of one engine op: a READ or WRITE longer than this runs as
/// several ops (and the `size_max` the device offers).
pub const CHUNK: u32 = 1 << 20;
/// Chains a worker pops per wake-up before it yields.
pub const CHAINS_PER_WAKE: usize = 256;

/// Largest discard / write-zeroes range we advertise, in sectors (1 GiB).
pub(super) const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// Ranges per discard / write-zeroes request we advertise.
pub(super) const MAX_RANGE_SEGS: u32 = 16;
