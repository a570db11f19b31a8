//! A learning L2 switch between device-side ports.
//!
//! Each [`NetDevice`](super::device::NetDevice) owns one port. A port's worker hands
//! every frame its guest transmits to the switch, which learns the source MAC, looks
//! up the destination and pushes the frame into the destination port's *inbox*
//! (flooding broadcast, multicast and unknown destinations to every other port).
//! Only the destination's own worker takes frames out of its inbox and writes
//! them into its guest's receive queue, so a receive ring has exactly one writer.
//! A [`TapPort`](super::tap::TapPort) owns a port the same way, with the host's
//! network stack in place of a guest.
//!
//! Cost per frame: a worker forwards its whole transmit round at once (the MAC
//! table locked once, a run of frames to one port appended under one short inbox
//! lock) and takes its whole inbox at once by swapping queues, so the two sides
//! of an inbox hold its lock only for a few moves: measured with `perf`, the
//! longer critical sections of per-frame queueing put the workers to sleep on the
//! lock tens of thousands of times a second. A receiving worker is woken (an
//! eventfd write) only when it has said it is about to sleep
//! (`Port::arm_wake`); while it runs or polls, frames are queued without a
//! system call. Frame buffers circulate through per-worker pools refilled from
//! and returned to the switch's pool in batches, and are never zero-filled before
//! they are overwritten.
//!
//! Fairness: an inbox keeps one bounded queue per source port and is drained round
//! robin, one frame per source per turn, and a worker serves at most
//! [`SwitchConfig::budget`] frames per direction per scheduling round. A guest that
//! floods fills only its own queue in each inbox (the excess is dropped and counted
//! as [`DropReason::BacklogFull`]); the others' frames keep their room and their
//! turn. A source has at most [`SwitchConfig::backlog`] frames in the port's inbox
//! and as many again in its worker's hands (taken, not yet delivered).
//!
//! MAC table (HOSTILE 33): every source a guest writes is hostile, so the table is
//! bounded per port ([`SwitchConfig::table_per_port`]) and in total
//! ([`SwitchConfig::table_max`]): once full, an unknown source is not learnt (its
//! frames are still switched, and frames to it flood). Learnt entries age out
//! after [`SwitchConfig::mac_age`] without a frame from them (300 s, as a Linux
//! bridge's `ageing_time`), on a monotonic [`Clock`]. A port may be *bound* to
//! its MAC address: its address is then a static entry (never aged, never
//! moved, never counted against a cap), it may send only from that address
//! (other frames are dropped and counted as [`DropReason::SpoofedSource`]), and
//! no other port may send from it (same drop), so a guest cannot claim a bound
//! victim's address to receive its traffic.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};
use virtio_core::net::PartialCsum;
use virtio_core::notify::{EventFdNotifier, Notify, NotifyError};

/// Identifies a port of a [`Switch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub(crate) usize);

impl PortId {
    /// The port's number (its index on the switch).
    pub fn index(self) -> usize {
        self.0
    }
}

impl std::fmt::Display for PortId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "port {}", self.0)
    }
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Transmitted buffer shorter than the virtio-net header plus an Ethernet header.
    Short,
    /// Transmitted header refused: a GSO type (none is offered), transmit-only flag
    /// rules broken, a checksum field past the end of the frame, or the buffer
    /// could not be read.
    BadHeader,
    /// Transmitted frame longer than the Ethernet header plus the MTU.
    OverMtu,
    /// The receiving guest cannot take the frame: its receive buffers are too small
    /// for it, or its device is not running.
    NoRxBuffer,
    /// The receiving port's queue for this source was full.
    BacklogFull,
    /// Transmitted from a source address the port may not use: a port bound to
    /// its MAC sent from another one, or a port sent from an address bound to
    /// another port (HOSTILE 33).
    SpoofedSource,
}

/// Drop counters, one per [`DropReason`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drops {
    /// [`DropReason::Short`].
    pub short: u64,
    /// [`DropReason::BadHeader`].
    pub bad_header: u64,
    /// [`DropReason::OverMtu`].
    pub over_mtu: u64,
    /// [`DropReason::NoRxBuffer`].
    pub no_rx_buffer: u64,
    /// [`DropReason::BacklogFull`].
    pub backlog_full: u64,
    /// [`DropReason::SpoofedSource`].
    pub spoofed_source: u64,
}

impl Drops {
    /// All drops.
    pub fn total(&self) -> u64 {
        self.short
            + self.bad_header
            + self.over_mtu
            + self.no_rx_buffer
            + self.backlog_full
            + self.spoofed_source
    }
}

/// Counters of one port. Transmit-side drops are counted on the sending port,
/// receive-side drops on the receiving port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames the guest transmitted that passed the checks.
    pub tx_frames: u64,
    /// Frames written into the guest's receive queue.
    pub rx_frames: u64,
    /// Frames dropped, by reason.
    pub drops: Drops,
}

#[derive(Debug, Default)]
struct Counters {
    tx_frames: AtomicU64,
    rx_frames: AtomicU64,
    drops: [AtomicU64; 6],
}

impl Counters {
    fn snapshot(&self) -> PortStats {
        let d = |r: DropReason| self.drops[r as usize].load(Ordering::Relaxed);
        PortStats {
            tx_frames: self.tx_frames.load(Ordering::Relaxed),
            rx_frames: self.rx_frames.load(Ordering::Relaxed),
            drops: Drops {
                short: d(DropReason::Short),
                bad_header: d(DropReason::BadHeader),
                over_mtu: d(DropReason::OverMtu),
                no_rx_buffer: d(DropReason::NoRxBuffer),
                backlog_full: d(DropReason::BacklogFull),
                spoofed_source: d(DropReason::SpoofedSource),
            },
        }
    }
}

/// Switch settings.
#[derive(Debug, Clone, Copy)]
pub struct SwitchConfig {
    /// Frames a port's inbox holds per source port before dropping (its worker
    /// may hold as many again, taken from the inbox and not yet delivered).
    pub backlog: usize,
    /// Frames a port's worker moves per direction per scheduling round.
    pub budget: usize,
    /// Most addresses the MAC table learns on one port; past it, new sources on
    /// that port are not learnt (HOSTILE 33). Static entries do not count.
    pub table_per_port: usize,
    /// Most learnt addresses in the whole MAC table (HOSTILE 33).
    pub table_max: usize,
    /// How long a learnt address stays in the MAC table without a frame from it.
    pub mac_age: Duration,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            backlog: 256,
            budget: 64,
            // A guest has one or a few addresses; a TAP port bridging a host
            // network may have many behind it.
            table_per_port: 1024,
            table_max: 8192,
            // A Linux bridge's default ageing_time.
            mac_age: Duration::from_secs(300),
        }
    }
}

/// The monotonic time the MAC table ages entries by. Injectable, so ageing can be
/// tested without sleeping ([`ManualClock`]).
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Time since a fixed start; never goes back.
    fn now(&self) -> Duration;
}

/// The system's monotonic clock ([`Instant`]), the default.
#[derive(Debug)]
pub struct MonotonicClock(Instant);

impl MonotonicClock {
    /// A clock starting now.
    pub fn new() -> MonotonicClock {
        MonotonicClock(Instant::now())
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A clock that moves only when told to ([`ManualClock::advance`]), for tests and
/// simulations.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock at zero.
    pub fn new() -> ManualClock {
        ManualClock::default()
    }

    /// Moves the clock forward by `by` (saturating at about 584 years).
    pub fn advance(&self, by: Duration) {
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        // `fetch_update` keeps it monotonic even with several callers.
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
            Some(t.saturating_add(ns))
        });
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// A frame in transit: its bytes (Ethernet header first) and the partial checksum
/// the receiving side must complete or pass on.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) data: Vec<u8>,
    pub(crate) csum: Option<PartialCsum>,
    pub(crate) src: usize,
}

/// Frames waiting for a port's worker: one queue per source, drained round robin.
///
/// Each port has two: the shared one producers append to under the port's lock,
/// and its worker's own, which takes the shared one's queues whole by swapping
/// them (see [`Port::take_inbox`]), so neither side holds the lock for more than a
/// few moves and contention never puts a worker to sleep for long.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    per_source: Vec<VecDeque<Frame>>,
    next: usize,
    len: usize,
}

/// How far ahead of the frame being delivered the next frame's bytes are fetched
/// into the cache: they were written on another core.
const PREFETCH_AHEAD: usize = 4;

impl Inbox {
    /// The next frame, round robin over sources.
    pub(crate) fn pop(&mut self) -> Option<Frame> {
        if self.len == 0 {
            return None;
        }
        let n = self.per_source.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            if let Some(f) = self.per_source[i].pop_front() {
                if let Some(ahead) = self.per_source[i].get(PREFETCH_AHEAD) {
                    virtio_core::shm::prefetch(ahead.data.as_ptr());
                }
                self.next = (i + 1) % n;
                self.len -= 1;
                return Some(f);
            }
        }
        None
    }

    /// Puts back the frame [`Inbox::pop`] returned last: it is next in line again.
    pub(crate) fn push_front(&mut self, frame: Frame) {
        let src = frame.src;
        self.queue(src).push_front(frame);
        self.next = src;
        self.len += 1;
    }

    /// Whether no frame waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn queue(&mut self, src: usize) -> &mut VecDeque<Frame> {
        if self.per_source.len() <= src {
            self.per_source.resize_with(src + 1, VecDeque::new);
        }
        &mut self.per_source[src]
    }

    /// Moves every frame of `from` (empty) here, swapping queues rather than
    /// frames; `from` keeps this inbox's empty queues and their room.
    fn take_all(&mut self, from: &mut Inbox) {
        debug_assert!(self.is_empty());
        if from.is_empty() {
            return;
        }
        if self.per_source.len() < from.per_source.len() {
            self.per_source.resize_with(from.per_source.len(), VecDeque::new);
        }
        for (mine, theirs) in self.per_source.iter_mut().zip(&mut from.per_source) {
            std::mem::swap(mine, theirs);
            for f in mine.iter().take(PREFETCH_AHEAD) {
                virtio_core::shm::prefetch(f.data.as_ptr());
            }
        }
        self.len = std::mem::take(&mut from.len);
    }

    /// Appends as much of `run` (frames of one source) as the source's queue has
    /// room for under `backlog`, and returns how many; what is left in `run` did
    /// not fit.
    fn append(&mut self, src: usize, run: &mut Vec<Frame>, backlog: usize) -> usize {
        let q = self.queue(src);
        let room = backlog.saturating_sub(q.len()).min(run.len());
        q.extend(run.drain(..room));
        self.len += room;
        room
    }
}

/// One port: its counters, its inbox and the eventfd that wakes its worker.
#[derive(Debug)]
pub(crate) struct Port {
    pub(crate) id: PortId,
    counters: Counters,
    inbox: Mutex<Inbox>,
    /// Signalled when a frame arrives while the port's worker sleeps
    /// ([`Port::arm_wake`]).
    pub(crate) wake: EventFdNotifier,
    /// The worker is about to sleep or sleeps, and wants [`Port::wake`]: while it
    /// runs, frames are queued without the cost of an eventfd write.
    armed: AtomicBool,
    /// Whether the port's device is running (frames to a stopped port are dropped).
    active: AtomicBool,
    /// The only source address the port may send from, when it is bound to its
    /// MAC (HOSTILE 33); also a static entry of the MAC table while attached.
    bound: Option<[u8; 6]>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent before anything can panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Port {
    pub(crate) fn count_drop(&self, why: DropReason) {
        self.count_drops(why, 1);
    }

    fn count_drops(&self, why: DropReason, n: u64) {
        self.counters.drops[why as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn count_tx_by(&self, n: u64) {
        self.counters.tx_frames.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn count_rx(&self) {
        self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Release);
    }

    /// The address the port is bound to, if it is (see [`Switch::attach`]).
    pub(crate) fn bound(&self) -> Option<[u8; 6]> {
        self.bound
    }

    /// Asks for [`Port::wake`] on the next frame, before the worker sleeps; false
    /// (and no wake-up asked for) when a frame already waits, so the worker must
    /// not sleep.
    ///
    /// The flag is raised before the inbox is looked at under its lock, and a
    /// producer looks at the flag after it queued under the same lock: one of the
    /// two sees the other, so a frame never waits for a worker that sleeps.
    pub(crate) fn arm_wake(&self) -> bool {
        self.armed.store(true, Ordering::SeqCst);
        if lock(&self.inbox).len > 0 {
            self.armed.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// The worker is awake again: frames need not signal it.
    pub(crate) fn disarm_wake(&self) {
        self.armed.store(false, Ordering::Relaxed);
    }

    /// The next frame for this port's guest, round robin over sources.
    #[cfg(test)]
    pub(crate) fn pop(&self) -> Option<Frame> {
        lock(&self.inbox).pop()
    }

    /// Moves the frames waiting for this port into `into`, which must be empty,
    /// under one short lock (queues are swapped, not frames). A source has at most
    /// [`SwitchConfig::backlog`] frames waiting in each of the two.
    pub(crate) fn take_inbox(&self, into: &mut Inbox) {
        into.take_all(&mut lock(&self.inbox));
    }

    /// Empties the inbox (the device was reset), returning the buffers.
    pub(crate) fn clear(&self, switch: &Switch) {
        let mut inbox = lock(&self.inbox);
        while let Some(f) = inbox.pop() {
            switch.recycle(f.data);
        }
    }
}

/// A MAC table entry.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The port's index.
    port: usize,
    /// When a frame from the address was last seen (learnt entries).
    seen: Duration,
    /// A bound port's own address: never aged, moved or counted against a cap.
    fixed: bool,
}

/// The MAC table: bounded, aged, with static entries for bound ports (HOSTILE 33).
#[derive(Debug, Default)]
struct Table {
    map: HashMap<[u8; 6], Entry>,
    /// Learnt (not static) entries per port index.
    per_port: Vec<usize>,
    /// Learnt entries in all.
    learnt: usize,
    /// When expired entries are next removed.
    next_sweep: Duration,
}

/// Where a frame of a batch goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dst {
    /// Every other port (group or unknown destination).
    Flood,
    /// One port, by index.
    Port(usize),
    /// Nowhere: its source address is not the sender's to use (HOSTILE 33).
    Spoofed,
}

impl Table {
    /// Whether `e` still holds at `now`.
    fn live(e: &Entry, now: Duration, age: Duration) -> bool {
        e.fixed || now.saturating_sub(e.seen) < age
    }

    /// The port `mac` is on, if known and not aged out.
    fn get(&self, mac: &[u8; 6], now: Duration, age: Duration) -> Option<usize> {
        self.map
            .get(mac)
            .filter(|e| Table::live(e, now, age))
            .map(|e| e.port)
    }

    fn count(&mut self, port: usize) -> &mut usize {
        if self.per_port.len() <= port {
            self.per_port.resize(port + 1, 0);
        }
        &mut self.per_port[port]
    }

    /// Forgets a learnt entry's place in the counts.
    fn uncount(&mut self, e: &Entry) {
        if !e.fixed {
            let n = self.count(e.port);
            *n = n.saturating_sub(1);
            self.learnt = self.learnt.saturating_sub(1);
        }
    }

    /// Learns that `mac` sent from `port` at `now`; returns false when the address
    /// is bound to another port, so the frame must be dropped.
    ///
    /// A static entry never moves. A learnt one is refreshed, or moves with its
    /// station; a new one is learnt only while `port` and the table are under
    /// their caps, and otherwise is not (its frames still flood).
    fn learn(&mut self, mac: [u8; 6], port: usize, now: Duration, cfg: &SwitchConfig) -> bool {
        match self.map.get_mut(&mac) {
            Some(e) if e.fixed => return e.port == port,
            Some(e) if e.port == port => {
                e.seen = now;
                return true;
            }
            Some(_) => {
                // The station moved (or an unbound port claims it): it is no
                // longer where the entry says.
                if let Some(old) = self.map.remove(&mac) {
                    self.uncount(&old);
                }
            }
            None => {}
        }
        if *self.count(port) >= cfg.table_per_port || self.learnt >= cfg.table_max {
            return true;
        }
        *self.count(port) += 1;
        self.learnt += 1;
        self.map.insert(
            mac,
            Entry {
                port,
                seen: now,
                fixed: false,
            },
        );
        true
    }

    /// Makes `mac` a static entry of `port`, replacing a learnt one; false (and
    /// nothing changed) when it is already bound to another port.
    fn bind(&mut self, mac: [u8; 6], port: usize) -> bool {
        if let Some(e) = self.map.get(&mac).copied() {
            if e.fixed {
                return e.port == port;
            }
            self.uncount(&e);
        }
        self.map.insert(
            mac,
            Entry {
                port,
                seen: Duration::ZERO,
                fixed: true,
            },
        );
        true
    }

    /// Removes every entry of `port`, static ones too.
    fn forget_port(&mut self, port: usize) {
        self.map.retain(|_, e| e.port != port);
        let n = std::mem::take(self.count(port));
        self.learnt = self.learnt.saturating_sub(n);
    }

    /// Removes aged-out entries, at most every quarter of the age: a lookup already
    /// ignores them, this gives their room back.
    fn sweep(&mut self, now: Duration, age: Duration) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + age / 4;
        let before = self.map.len();
        let (per_port, learnt) = (&mut self.per_port, &mut self.learnt);
        self.map.retain(|_, e| {
            let keep = Table::live(e, now, age);
            if !keep {
                if let Some(n) = per_port.get_mut(e.port) {
                    *n = n.saturating_sub(1);
                }
                *learnt = learnt.saturating_sub(1);
            }
            keep
        });
        if self.map.len() != before {
            tracing::trace!(removed = before - self.map.len(), "MAC table entries aged out");
        }
    }
}

/// A learning L2 switch. Shared (`Arc`) by the devices plugged into it.
#[derive(Debug)]
pub struct Switch {
    cfg: SwitchConfig,
    ports: RwLock<Vec<Option<Arc<Port>>>>,
    table: Mutex<Table>,
    clock: Arc<dyn Clock>,
    unicast: AtomicU64,
    flooded: AtomicU64,
    /// Frame buffers for reuse, so forwarding does not allocate once warm.
    pool: Mutex<Vec<Vec<u8>>>,
}

/// Most frame buffers kept for reuse.
const POOL_MAX: usize = 4096;

impl Switch {
    /// An empty switch, ageing its MAC table on the system's monotonic clock.
    pub fn new(cfg: SwitchConfig) -> Arc<Switch> {
        Switch::with_clock(cfg, Arc::new(MonotonicClock::new()))
    }

    /// An empty switch ageing its MAC table on `clock`.
    pub fn with_clock(cfg: SwitchConfig, clock: Arc<dyn Clock>) -> Arc<Switch> {
        Arc::new(Switch {
            cfg,
            ports: RwLock::new(Vec::new()),
            table: Mutex::new(Table::default()),
            clock,
            unicast: AtomicU64::new(0),
            flooded: AtomicU64::new(0),
            pool: Mutex::new(Vec::new()),
        })
    }

    /// The settings.
    pub fn config(&self) -> SwitchConfig {
        self.cfg
    }

    /// Counters of `port`, if it is attached.
    pub fn stats(&self, port: PortId) -> Option<PortStats> {
        let ports = self.ports.read().unwrap_or_else(PoisonError::into_inner);
        ports.get(port.0)?.as_ref().map(|p| p.counters.snapshot())
    }

    /// Frames forwarded to one known port.
    pub fn unicast_frames(&self) -> u64 {
        self.unicast.load(Ordering::Relaxed)
    }

    /// Frames flooded to every other port (broadcast, multicast, unknown unicast).
    pub fn flooded_frames(&self) -> u64 {
        self.flooded.load(Ordering::Relaxed)
    }

    /// The port `mac` was last seen on (within [`SwitchConfig::mac_age`]), or is
    /// bound to.
    pub fn lookup(&self, mac: [u8; 6]) -> Option<PortId> {
        let now = self.clock.now();
        lock(&self.table).get(&mac, now, self.cfg.mac_age).map(PortId)
    }

    /// Entries the MAC table holds: learnt ones (at most
    /// [`SwitchConfig::table_max`]; aged-out ones until they are swept, at most a
    /// quarter of the age later) and one per bound port.
    pub fn mac_table_len(&self) -> usize {
        lock(&self.table).map.len()
    }

    /// Plugs in a new port; with `bound`, the port may send only from that address,
    /// which becomes its static entry in the MAC table (HOSTILE 33). An address
    /// already bound to another port stays there: the new port's frames from it
    /// are then dropped as [`DropReason::SpoofedSource`] (and an error is logged).
    pub(crate) fn attach(&self, bound: Option<[u8; 6]>) -> Result<Arc<Port>, NotifyError> {
        let mut ports = self.ports.write().unwrap_or_else(PoisonError::into_inner);
        let id = ports.iter().position(Option::is_none).unwrap_or(ports.len());
        let port = Arc::new(Port {
            id: PortId(id),
            counters: Counters::default(),
            inbox: Mutex::new(Inbox::default()),
            wake: EventFdNotifier::new()?,
            armed: AtomicBool::new(false),
            active: AtomicBool::new(false),
            bound,
        });
        if let Some(mac) = bound
            && !lock(&self.table).bind(mac, id)
        {
            tracing::error!(port = %port.id, ?mac, "MAC address already bound to another port");
        }
        if id == ports.len() {
            ports.push(Some(port.clone()));
        } else {
            ports[id] = Some(port.clone());
        }
        Ok(port)
    }

    /// Unplugs a port and forgets the addresses learnt on it.
    pub(crate) fn detach(&self, port: &Port) {
        let mut ports = self.ports.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = ports.get_mut(port.id.0) {
            *slot = None;
        }
        // Under the ports' lock: a port attached next at this index must not lose
        // the static entry it adds.
        lock(&self.table).forget_port(port.id.0);
        drop(ports);
        port.clear(self);
    }

    /// A buffer of `len` bytes for a frame (reused when possible). Its bytes are
    /// stale: the caller overwrites all of them or recycles the buffer unread.
    pub(crate) fn take_buf(&self, len: usize) -> Vec<u8> {
        let mut v = lock(&self.pool).pop().unwrap_or_default();
        fit(&mut v, len);
        v
    }

    /// Returns a frame buffer for reuse.
    pub(crate) fn recycle(&self, v: Vec<u8>) {
        self.recycle_all(std::iter::once(v));
    }

    /// Moves up to `n` pooled buffers into `into` under one lock.
    fn take_bufs(&self, into: &mut Vec<Vec<u8>>, n: usize) {
        let mut pool = lock(&self.pool);
        let k = pool.len().saturating_sub(n);
        into.extend(pool.drain(k..));
    }

    /// Switches every frame of `batch` (in order), leaving it empty, and returns
    /// how many it forwarded (the others were dropped as
    /// [`DropReason::SpoofedSource`] and counted on `src`). The MAC table is
    /// locked once for the batch, and a run of frames to one port is queued under
    /// one inbox lock with at most one wake-up.
    pub(crate) fn forward_batch(&self, src: &Port, batch: &mut Batch) -> usize {
        if batch.frames.is_empty() {
            return 0;
        }
        batch.dsts.clear();
        let now = self.clock.now();
        let age = self.cfg.mac_age;
        {
            let mut table = lock(&self.table);
            table.sweep(now, age);
            // A stream repeats its addresses: the last source learnt (and whether
            // the port may use it) and the last destination looked up are
            // remembered (the lookup until the table changes), so a run costs one
            // hash, not one per frame.
            let mut learnt: Option<([u8; 6], bool)> = None;
            let mut looked_up: Option<([u8; 6], Option<usize>)> = None;
            for f in &batch.frames {
                let dst_mac: [u8; 6] = f.data[0..6].try_into().unwrap_or([0xff; 6]);
                let src_mac: [u8; 6] = f.data[6..12].try_into().unwrap_or([0xff; 6]);
                // A bound port sends from its own address only (HOSTILE 33).
                if src.bound.is_some_and(|b| b != src_mac) {
                    batch.dsts.push(Dst::Spoofed);
                    continue;
                }
                // Learn only unicast sources: a group address is never a station.
                let allowed = match learnt {
                    _ if src_mac[0] & 1 != 0 => true,
                    Some((mac, ok)) if mac == src_mac => ok,
                    _ => {
                        let ok = table.learn(src_mac, src.id.0, now, &self.cfg);
                        learnt = Some((src_mac, ok));
                        looked_up = None;
                        ok
                    }
                };
                if !allowed {
                    // Another port's bound address (HOSTILE 33).
                    batch.dsts.push(Dst::Spoofed);
                    continue;
                }
                let dst = match looked_up {
                    _ if dst_mac[0] & 1 != 0 => None,
                    Some((mac, port)) if mac == dst_mac => port,
                    _ => {
                        let port = table.get(&dst_mac, now, age);
                        looked_up = Some((dst_mac, port));
                        port
                    }
                };
                batch.dsts.push(dst.map_or(Dst::Flood, Dst::Port));
            }
        }
        let ports = self.ports.read().unwrap_or_else(PoisonError::into_inner);
        let run = &mut batch.run;
        let total = batch.frames.len();
        let mut spoofed = 0;
        let mut frames = batch.frames.drain(..).zip(batch.dsts.drain(..)).peekable();
        while let Some((frame, dst)) = frames.next() {
            match dst {
                Dst::Spoofed => {
                    spoofed += 1;
                    self.recycle(frame.data);
                }
                Dst::Port(d) if d == src.id.0 => self.recycle(frame.data),
                Dst::Port(d) => {
                    // This frame and the ones right after it for the same port,
                    // queued under one lock.
                    run.push(frame);
                    while let Some((f, _)) = frames.next_if(|(_, next)| *next == Dst::Port(d)) {
                        run.push(f);
                    }
                    self.unicast.fetch_add(run.len() as u64, Ordering::Relaxed);
                    match ports.get(d).and_then(Option::as_ref) {
                        Some(p) => self.queue(p, src.id.0, run),
                        None => self.recycle_all(run.drain(..).map(|f| f.data)),
                    }
                }
                Dst::Flood => self.flood(&ports, src, frame, run),
            }
        }
        if spoofed > 0 {
            tracing::debug!(port = %src.id, spoofed, "frames from a source address the port may not use");
            src.count_drops(DropReason::SpoofedSource, spoofed as u64);
        }
        total - spoofed
    }

    /// Sends a copy of `frame` to every port but `src` (the last gets the frame);
    /// `run` is an empty scratch vector.
    fn flood(&self, ports: &[Option<Arc<Port>>], src: &Port, frame: Frame, run: &mut Vec<Frame>) {
        self.flooded.fetch_add(1, Ordering::Relaxed);
        let others = || ports.iter().flatten().filter(|p| p.id != src.id);
        let n = others().count();
        let mut frame = Some(frame);
        for (k, p) in others().enumerate() {
            let Some(f) = frame.as_ref() else { break };
            if k + 1 == n {
                if let Some(f) = frame.take() {
                    run.push(f);
                    self.queue(p, src.id.0, run);
                }
                break;
            }
            let mut copy = self.take_buf(f.data.len());
            copy.copy_from_slice(&f.data);
            let (csum, src_index) = (f.csum, f.src);
            run.push(Frame {
                data: copy,
                csum,
                src: src_index,
            });
            self.queue(p, src.id.0, run);
        }
        if let Some(f) = frame {
            self.recycle(f.data);
        }
    }

    /// Queues the frames of `run` (all from port `src`) for `dst`'s worker under
    /// one short lock, and drops what does not fit (or everything, if the port is
    /// stopped); leaves `run` empty. Wakes the worker if it sleeps
    /// ([`Port::arm_wake`]).
    fn queue(&self, dst: &Port, src: usize, run: &mut Vec<Frame>) {
        if run.is_empty() {
            return;
        }
        let (queued, why) = if dst.active.load(Ordering::Acquire) {
            let n = lock(&dst.inbox).append(src, run, self.cfg.backlog);
            (n, DropReason::BacklogFull)
        } else {
            (0, DropReason::NoRxBuffer)
        };
        if !run.is_empty() {
            dst.count_drops(why, run.len() as u64);
            self.recycle_all(run.drain(..).map(|f| f.data));
        }
        let wake = queued > 0 && dst.armed.load(Ordering::SeqCst) && dst.armed.swap(false, Ordering::SeqCst);
        if wake && let Err(error) = dst.wake.notify() {
            tracing::error!(%error, port = %dst.id, "cannot wake a switch port");
        }
    }

    /// Returns frame buffers for reuse, under one lock; those past the pool's
    /// room are freed after it is released.
    fn recycle_all(&self, mut bufs: impl Iterator<Item = Vec<u8>>) {
        let mut pool = lock(&self.pool);
        let room = POOL_MAX.saturating_sub(pool.len());
        pool.extend(bufs.by_ref().take(room));
    }
}

/// Frames a worker collected in one round, for [`Switch::forward_batch`].
#[derive(Debug, Default)]
pub(crate) struct Batch {
    frames: Vec<Frame>,
    dsts: Vec<Dst>,
    /// Frames for one port, queued together.
    run: Vec<Frame>,
}

impl Batch {
    /// Adds a frame.
    pub(crate) fn push(&mut self, frame: Frame) {
        self.frames.push(frame);
    }
}

/// A worker's own stock of frame buffers, refilled from and returned to the
/// switch's pool in batches, so the pool's lock is taken once per batch rather
/// than per frame.
#[derive(Debug, Default)]
pub(crate) struct LocalPool {
    bufs: Vec<Vec<u8>>,
}

/// Buffers a [`LocalPool`] moves per refill, and keeps before it returns some.
const LOCAL_BATCH: usize = 32;

impl LocalPool {
    /// A buffer of `len` bytes, stale like [`Switch::take_buf`]'s.
    pub(crate) fn take(&mut self, switch: &Switch, len: usize) -> Vec<u8> {
        if self.bufs.is_empty() {
            switch.take_bufs(&mut self.bufs, LOCAL_BATCH);
        }
        let mut v = self.bufs.pop().unwrap_or_default();
        // The next one was last used on the receiving worker's core: ask for it
        // now, so the copy into it does not wait for the line.
        if let Some(next) = self.bufs.last() {
            virtio_core::shm::prefetch(next.as_ptr());
        }
        fit(&mut v, len);
        v
    }

    /// Keeps a buffer for reuse.
    pub(crate) fn give(&mut self, switch: &Switch, v: Vec<u8>) {
        self.bufs.push(v);
        if self.bufs.len() >= 2 * LOCAL_BATCH {
            switch.recycle_all(self.bufs.drain(LOCAL_BATCH..));
        }
    }

    /// Returns every buffer to the switch.
    pub(crate) fn flush(&mut self, switch: &Switch) {
        switch.recycle_all(self.bufs.drain(..));
    }
}

/// Makes `v` exactly `len` bytes long, zero-filling only bytes it never had: the
/// rest are stale frame bytes, which every user overwrites before reading.
fn fit(v: &mut Vec<u8>, len: usize) {
    if v.len() < len {
        v.resize(len, 0);
    } else {
        v.truncate(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_core::notify::Wait;

    impl Switch {
        /// One frame through [`Switch::forward_batch`].
        fn forward(&self, src: &Port, frame: Frame) {
            let mut batch = Batch::default();
            batch.push(frame);
            self.forward_batch(src, &mut batch);
        }
    }

    fn frame(dst: [u8; 6], src: [u8; 6], src_port: &Port) -> Frame {
        let mut data = dst.to_vec();
        data.extend_from_slice(&src);
        data.extend_from_slice(&[0x88, 0xb5, 1, 2]);
        Frame {
            data,
            csum: None,
            src: src_port.id.0,
        }
    }

    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

    #[test]
    fn learns_floods_unknown_and_forwards_known() {
        let sw = Switch::new(SwitchConfig::default());
        let ports: Vec<_> = (0..3).map(|_| sw.attach(None).unwrap()).collect();
        for p in &ports {
            p.set_active(true);
        }
        sw.forward(&ports[0], frame(B, A, &ports[0]));
        assert_eq!(sw.flooded_frames(), 1);
        assert!(ports[1].pop().is_some() && ports[2].pop().is_some());
        assert!(ports[0].pop().is_none(), "never sent back to the source");
        assert_eq!(
            ports[1].wake.take().unwrap(),
            0,
            "port 1 did not ask for a wake-up"
        );
        assert!(ports[1].arm_wake(), "its inbox is empty again");
        sw.forward(&ports[2], frame(B, [2, 0, 0, 0, 0, 0xc], &ports[2]));
        assert_eq!(ports[1].wake.take().unwrap(), 1, "woken once it asked");
        assert!(!ports[1].arm_wake(), "a frame waits: no sleeping");
        assert!(ports[1].pop().is_some() && ports[0].pop().is_some());
        sw.forward(&ports[1], frame(A, B, &ports[1]));
        assert_eq!(sw.unicast_frames(), 1);
        assert!(ports[0].pop().is_some() && ports[2].pop().is_none());
        assert_eq!(sw.lookup(A), Some(PortId(0)));
        sw.detach(&ports[0]);
        assert_eq!(sw.lookup(A), None);
        assert!(sw.stats(PortId(0)).is_none());
    }

    #[test]
    fn a_batch_sees_what_its_own_earlier_frames_taught_the_table() {
        let sw = Switch::new(SwitchConfig::default());
        let ports: Vec<_> = (0..2).map(|_| sw.attach(None).unwrap()).collect();
        for p in &ports {
            p.set_active(true);
        }
        let x = [2, 0, 0, 0, 0, 0x77];
        let mut batch = Batch::default();
        // To X (unknown: flooded), then from X to X: X is on port 0 from that
        // frame on, the sender's own port, so it is not sent anywhere.
        batch.push(frame(x, A, &ports[0]));
        batch.push(frame(x, x, &ports[0]));
        sw.forward_batch(&ports[0], &mut batch);
        assert_eq!(sw.lookup(x), Some(ports[0].id));
        assert_eq!(sw.flooded_frames(), 1, "only the first frame is flooded");
        let got: Vec<Frame> = std::iter::from_fn(|| ports[1].pop()).collect();
        assert_eq!(got.len(), 1, "the second frame is not flooded to port 1");
    }

    #[test]
    fn inbox_is_bounded_per_source_and_fair() {
        let sw = Switch::new(SwitchConfig {
            backlog: 4,
            budget: 4,
            ..SwitchConfig::default()
        });
        let ports: Vec<_> = (0..3).map(|_| sw.attach(None).unwrap()).collect();
        for p in &ports {
            p.set_active(true);
        }
        // Port 0 floods port 2, port 1 sends one frame.
        sw.forward(&ports[2], frame(A, [2, 0, 0, 0, 0, 0xc], &ports[2]));
        for _ in 0..10 {
            sw.forward(&ports[0], frame([2, 0, 0, 0, 0, 0xc], A, &ports[0]));
        }
        sw.forward(&ports[1], frame([2, 0, 0, 0, 0, 0xc], B, &ports[1]));
        let st = sw.stats(ports[2].id).unwrap();
        assert_eq!(st.drops.backlog_full, 6);
        // Port 1's frame is second in line, not behind port 0's backlog.
        let order: Vec<usize> = std::iter::from_fn(|| ports[2].pop()).map(|f| f.src).collect();
        assert_eq!(order, vec![0, 1, 0, 0, 0]);
    }

    #[test]
    fn a_worker_that_asked_for_a_wake_up_is_never_left_sleeping_with_frames() {
        // A producer forwards a burst of frames, waits until the consumer has them
        // all, and forwards the next, while the consumer drains its inbox and
        // sleeps as a worker does (arm, sleep on the eventfd, disarm). After a lost
        // wake-up the consumer sleeps with frames waiting and no more coming: its
        // wait times out and the test fails.
        const BURSTS: usize = 2000;
        const BURST: usize = 3;
        let sw = Switch::new(SwitchConfig::default());
        let a = sw.attach(None).unwrap();
        let b = sw.attach(None).unwrap();
        a.set_active(true);
        b.set_active(true);
        sw.forward(&b, frame(A, B, &b));
        assert!(a.pop().is_some());
        let got = AtomicU64::new(0);
        let total = (BURSTS * BURST) as u64;
        // Set when the consumer returns or fails, so the producer stops too.
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for k in 1..=BURSTS as u64 {
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    for _ in 0..BURST {
                        sw.forward(&a, frame(B, A, &a));
                    }
                    let t = std::time::Instant::now();
                    while got.load(Ordering::Relaxed) < k * BURST as u64 && t.elapsed().as_secs() < 5 {
                        std::thread::yield_now();
                    }
                }
            });
            let _done = Done(&done);
            let mut inbox = Inbox::default();
            while got.load(Ordering::Relaxed) < total {
                b.take_inbox(&mut inbox);
                while inbox.pop().is_some() {
                    got.fetch_add(1, Ordering::Relaxed);
                }
                if got.load(Ordering::Relaxed) < total && b.arm_wake() {
                    let woken = b.wake.wait(Some(std::time::Duration::from_secs(2))).unwrap();
                    b.disarm_wake();
                    let n = got.load(Ordering::Relaxed);
                    assert!(woken > 0, "asleep with {n} frames received: a lost wake-up");
                }
            }
        });
    }

    #[test]
    fn frames_to_a_stopped_port_are_dropped_and_counted() {
        let sw = Switch::new(SwitchConfig::default());
        let a = sw.attach(None).unwrap();
        let b = sw.attach(None).unwrap();
        a.set_active(true);
        assert!(b.arm_wake());
        sw.forward(&a, frame([0xff; 6], A, &a));
        assert_eq!(sw.stats(b.id).unwrap().drops.no_rx_buffer, 1);
        assert_eq!(sw.stats(b.id).unwrap().drops.total(), 1);
        assert_eq!(b.wake.take().unwrap(), 0, "nothing was queued: no wake-up");
    }

    /// A xorshift stream of locally administered unicast addresses.
    fn random_macs(seed: u64) -> impl Iterator<Item = [u8; 6]> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        std::iter::from_fn(move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            Some([(b[0] & 0xfe) | 2, b[1], b[2], b[3], b[4], b[5]])
        })
    }

    /// HOSTILE 33: a port sending from 100,000 random source addresses leaves the
    /// table at its per-port cap; more ports stop at the total cap; frames from
    /// sources not learnt are still switched (flooded to the others).
    #[test]
    fn the_mac_table_is_bounded_per_port_and_in_total() {
        let cfg = SwitchConfig::default();
        let sw = Switch::new(cfg);
        let ports: Vec<_> = (0..10).map(|_| sw.attach(None).unwrap()).collect();
        ports[1].set_active(true);
        let mut batch = Batch::default();
        for (i, src) in random_macs(7).take(100_000).enumerate() {
            batch.push(frame([0xff; 6], src, &ports[0]));
            if i % 64 == 63 {
                sw.forward_batch(&ports[0], &mut batch);
                ports[1].clear(&sw);
            }
        }
        sw.forward_batch(&ports[0], &mut batch);
        assert_eq!(sw.mac_table_len(), cfg.table_per_port);
        assert_eq!(sw.flooded_frames(), 100_000, "every frame was still switched");
        assert_eq!(sw.stats(ports[1].id).unwrap().drops.total(), 0);
        // Nine more ports of random sources: the total cap holds.
        for (k, p) in ports.iter().enumerate().skip(1) {
            for src in random_macs(1000 + k as u64).take(2 * cfg.table_per_port) {
                batch.push(frame([0xff; 6], src, p));
                if batch.frames.len() == 64 {
                    sw.forward_batch(p, &mut batch);
                }
            }
            sw.forward_batch(p, &mut batch);
        }
        assert_eq!(sw.mac_table_len(), cfg.table_max);
        // A bound port's static entry is added even now, and a station on a full
        // port is simply not learnt.
        let bound = sw.attach(Some(A)).unwrap();
        assert_eq!(sw.mac_table_len(), cfg.table_max + 1);
        assert_eq!(sw.lookup(A), Some(bound.id));
        let newcomer = sw.attach(None).unwrap();
        sw.forward(&newcomer, frame([0xff; 6], B, &newcomer));
        assert_eq!(sw.lookup(B), None, "the table is full: not learnt");
        assert_eq!(sw.mac_table_len(), cfg.table_max + 1);
        // Detaching a port gives its room back.
        sw.detach(&ports[0]);
        assert_eq!(sw.mac_table_len(), cfg.table_max + 1 - cfg.table_per_port);
        sw.forward(&newcomer, frame([0xff; 6], B, &newcomer));
        assert_eq!(sw.lookup(B), Some(newcomer.id));
    }

    /// HOSTILE 33: a learnt address not seen for the age is forgotten (and its room
    /// given back); one refreshed in time stays; a bound port's address never ages.
    #[test]
    fn learnt_addresses_age_out_on_the_injected_clock() {
        let clock = Arc::new(ManualClock::new());
        let cfg = SwitchConfig::default();
        let sw = Switch::with_clock(cfg, clock.clone());
        let a = sw.attach(None).unwrap();
        let b = sw.attach(None).unwrap();
        let bound_mac = [2, 0, 0, 0, 0, 0xcc];
        let c = sw.attach(Some(bound_mac)).unwrap();
        sw.forward(&a, frame([0xff; 6], A, &a));
        sw.forward(&b, frame([0xff; 6], B, &b));
        assert_eq!(sw.mac_table_len(), 3);
        clock.advance(cfg.mac_age / 2);
        sw.forward(&b, frame([0xff; 6], B, &b));
        clock.advance(cfg.mac_age / 2);
        assert_eq!(sw.lookup(A), None, "A aged out");
        assert_eq!(sw.lookup(B), Some(b.id), "B was refreshed");
        assert_eq!(sw.lookup(bound_mac), Some(c.id), "a bound address never ages");
        // The next batch sweeps A's entry out.
        sw.forward(&b, frame([0xff; 6], B, &b));
        assert_eq!(sw.mac_table_len(), 2);
        clock.advance(cfg.mac_age * 10);
        sw.forward(&c, frame([0xff; 6], bound_mac, &c));
        assert_eq!(sw.lookup(B), None);
        assert_eq!(sw.mac_table_len(), 1, "only the static entry is left");
    }

    /// HOSTILE 33: a port bound to its address cannot send from another (dropped,
    /// counted); no port can take a bound address, so its traffic keeps going to
    /// its port only; an unbound port still learns as before.
    #[test]
    fn a_bound_address_cannot_be_claimed() {
        const V: [u8; 6] = [2, 0, 0, 0, 0, 0x77];
        let sw = Switch::new(SwitchConfig::default());
        let victim = sw.attach(Some(V)).unwrap();
        let bound_attacker = sw.attach(Some(A)).unwrap();
        let unbound_attacker = sw.attach(None).unwrap();
        let peer = sw.attach(None).unwrap();
        for p in [&victim, &bound_attacker, &unbound_attacker, &peer] {
            p.set_active(true);
        }
        // Both attackers send from the victim's address.
        sw.forward(&bound_attacker, frame([0xff; 6], V, &bound_attacker));
        sw.forward(&unbound_attacker, frame([0xff; 6], V, &unbound_attacker));
        assert_eq!(sw.flooded_frames(), 0, "neither frame was sent anywhere");
        for p in [&bound_attacker, &unbound_attacker] {
            let st = sw.stats(p.id).unwrap();
            assert_eq!(st.drops.spoofed_source, 1);
            assert_eq!(st.drops.total(), 1);
        }
        assert_eq!(sw.lookup(V), Some(victim.id));
        // Traffic to the victim reaches only the victim.
        sw.forward(&peer, frame(V, B, &peer));
        assert!(victim.pop().is_some());
        assert!(bound_attacker.pop().is_none() && unbound_attacker.pop().is_none());
        // The bound attacker cannot send from a fresh address either, but from its
        // own it can.
        sw.forward(&bound_attacker, frame(B, [2, 0, 0, 0, 0, 0x99], &bound_attacker));
        assert_eq!(sw.stats(bound_attacker.id).unwrap().drops.spoofed_source, 2);
        assert_eq!(sw.lookup([2, 0, 0, 0, 0, 0x99]), None);
        let mut batch = Batch::default();
        batch.push(frame(B, A, &bound_attacker));
        assert_eq!(sw.forward_batch(&bound_attacker, &mut batch), 1);
        assert!(peer.pop().is_some());
        // An unbound port learns any unicast source, and the address follows its
        // station to another unbound port.
        let x = [2, 0, 0, 0, 0, 0x55];
        sw.forward(&unbound_attacker, frame(B, x, &unbound_attacker));
        assert_eq!(sw.lookup(x), Some(unbound_attacker.id));
        sw.forward(&peer, frame([0xff; 6], x, &peer));
        assert_eq!(sw.lookup(x), Some(peer.id));
        assert_eq!(sw.stats(peer.id).unwrap().drops.total(), 0);
        // A second port bound to the same address does not take it.
        let twin = sw.attach(Some(V)).unwrap();
        assert_eq!(sw.lookup(V), Some(victim.id));
        sw.forward(&twin, frame([0xff; 6], V, &twin));
        assert_eq!(sw.stats(twin.id).unwrap().drops.spoofed_source, 1);
        // Detaching the victim releases its address.
        sw.detach(&victim);
        assert_eq!(sw.lookup(V), None);
    }
}
