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
//! table locked once, a run of frames to one port queued under one inbox lock with
//! at most one wake-up) and takes its inbox in batches; frame buffers circulate
//! through per-worker pools refilled from and returned to the switch's pool in
//! batches, and are never zero-filled before they are overwritten.
//!
//! Fairness: an inbox keeps one bounded queue per source port and is drained round
//! robin, one frame per source per turn, and a worker serves at most
//! [`SwitchConfig::budget`] frames per direction per scheduling round. A guest that
//! floods fills only its own queue in each inbox (the excess is dropped and counted
//! as [`DropReason::BacklogFull`]); the others' frames keep their room and their
//! turn.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
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
}

impl Drops {
    /// All drops.
    pub fn total(&self) -> u64 {
        self.short + self.bad_header + self.over_mtu + self.no_rx_buffer + self.backlog_full
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
    drops: [AtomicU64; 5],
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
            },
        }
    }
}

/// Switch settings.
#[derive(Debug, Clone, Copy)]
pub struct SwitchConfig {
    /// Frames a port's inbox holds per source port before dropping.
    pub backlog: usize,
    /// Frames a port's worker moves per direction per scheduling round.
    pub budget: usize,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            backlog: 256,
            budget: 64,
        }
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

/// Frames waiting for a port's worker: one bounded queue per source, drained round
/// robin.
#[derive(Debug, Default)]
struct Inbox {
    per_source: Vec<VecDeque<Frame>>,
    next: usize,
    len: usize,
}

impl Inbox {
    fn pop(&mut self) -> Option<Frame> {
        if self.len == 0 {
            return None;
        }
        let n = self.per_source.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            if let Some(f) = self.per_source[i].pop_front() {
                self.next = (i + 1) % n;
                self.len -= 1;
                return Some(f);
            }
        }
        None
    }
}

/// One port: its counters, its inbox and the eventfd that wakes its worker.
#[derive(Debug)]
pub(crate) struct Port {
    pub(crate) id: PortId,
    counters: Counters,
    inbox: Mutex<Inbox>,
    /// Signalled when the inbox goes from empty to non-empty.
    pub(crate) wake: EventFdNotifier,
    /// Whether the port's device is running (frames to a stopped port are dropped).
    active: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent before anything can panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Port {
    pub(crate) fn count_drop(&self, why: DropReason) {
        self.counters.drops[why as usize].fetch_add(1, Ordering::Relaxed);
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

    /// The next frame for this port's guest, round robin over sources.
    pub(crate) fn pop(&self) -> Option<Frame> {
        lock(&self.inbox).pop()
    }

    /// Moves up to `n` frames, round robin over sources, into `out` under one lock.
    pub(crate) fn pop_batch(&self, out: &mut VecDeque<Frame>, n: usize) {
        let mut inbox = lock(&self.inbox);
        for _ in 0..n {
            match inbox.pop() {
                Some(f) => out.push_back(f),
                None => break,
            }
        }
    }

    /// Empties the inbox (the device was reset), returning the buffers.
    pub(crate) fn clear(&self, switch: &Switch) {
        let mut inbox = lock(&self.inbox);
        while let Some(f) = inbox.pop() {
            switch.recycle(f.data);
        }
    }
}

/// A learning L2 switch. Shared (`Arc`) by the devices plugged into it.
#[derive(Debug)]
pub struct Switch {
    cfg: SwitchConfig,
    ports: RwLock<Vec<Option<Arc<Port>>>>,
    table: Mutex<HashMap<[u8; 6], usize>>,
    unicast: AtomicU64,
    flooded: AtomicU64,
    /// Frame buffers for reuse, so forwarding does not allocate once warm.
    pool: Mutex<Vec<Vec<u8>>>,
}

/// Most frame buffers kept for reuse.
const POOL_MAX: usize = 4096;

impl Switch {
    /// An empty switch.
    pub fn new(cfg: SwitchConfig) -> Arc<Switch> {
        Arc::new(Switch {
            cfg,
            ports: RwLock::new(Vec::new()),
            table: Mutex::new(HashMap::new()),
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

    /// The port `mac` was last seen on.
    pub fn lookup(&self, mac: [u8; 6]) -> Option<PortId> {
        lock(&self.table).get(&mac).copied().map(PortId)
    }

    /// Plugs in a new port.
    pub(crate) fn attach(&self) -> Result<Arc<Port>, NotifyError> {
        let mut ports = self.ports.write().unwrap_or_else(PoisonError::into_inner);
        let id = ports.iter().position(Option::is_none).unwrap_or(ports.len());
        let port = Arc::new(Port {
            id: PortId(id),
            counters: Counters::default(),
            inbox: Mutex::new(Inbox::default()),
            wake: EventFdNotifier::new()?,
            active: AtomicBool::new(false),
        });
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
        drop(ports);
        lock(&self.table).retain(|_, p| *p != port.id.0);
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
        let mut pool = lock(&self.pool);
        if pool.len() < POOL_MAX {
            pool.push(v);
        }
    }

    /// Moves up to `n` pooled buffers into `into` under one lock.
    fn take_bufs(&self, into: &mut Vec<Vec<u8>>, n: usize) {
        let mut pool = lock(&self.pool);
        let k = pool.len().saturating_sub(n);
        into.extend(pool.drain(k..));
    }

    /// Returns the buffers of `from` past the first `keep` for reuse, under one
    /// lock and without a temporary vector.
    fn recycle_from(&self, from: &mut Vec<Vec<u8>>, keep: usize) {
        let keep = keep.min(from.len());
        let mut pool = lock(&self.pool);
        let room = POOL_MAX.saturating_sub(pool.len()).min(from.len() - keep);
        pool.extend(from.drain(keep..keep + room));
        drop(pool);
        from.truncate(keep);
    }

    /// Switches every frame of `batch` (in order), leaving it empty: the MAC table
    /// is locked once for the batch, and a run of frames to one port is queued
    /// under one inbox lock with at most one wake-up.
    pub(crate) fn forward_batch(&self, src: &Port, batch: &mut Batch) {
        if batch.frames.is_empty() {
            return;
        }
        batch.dsts.clear();
        {
            let mut table = lock(&self.table);
            let mut learnt = None;
            for f in &batch.frames {
                let dst_mac: [u8; 6] = f.data[0..6].try_into().unwrap_or([0xff; 6]);
                let src_mac: [u8; 6] = f.data[6..12].try_into().unwrap_or([0xff; 6]);
                // Learn only unicast sources: a group address is never a station.
                if src_mac[0] & 1 == 0 && learnt != Some(src_mac) {
                    table.insert(src_mac, src.id.0);
                    learnt = Some(src_mac);
                }
                let dst = if dst_mac[0] & 1 == 0 {
                    table.get(&dst_mac).copied()
                } else {
                    None
                };
                batch.dsts.push(dst);
            }
        }
        let ports = self.ports.read().unwrap_or_else(PoisonError::into_inner);
        let mut frames = batch.frames.drain(..).zip(batch.dsts.drain(..)).peekable();
        while let Some((frame, dst)) = frames.next() {
            match dst {
                Some(d) if d == src.id.0 => self.recycle(frame.data),
                Some(d) => {
                    // This frame and the ones right after it for the same port. Each
                    // is counted before it is queued: once a receiver has a frame,
                    // the counters include it.
                    let target = ports.get(d).and_then(Option::as_ref);
                    let mut inbox = target.map(|p| (p, Run::start(p)));
                    let mut queue = |f: Frame| {
                        self.unicast.fetch_add(1, Ordering::Relaxed);
                        match &mut inbox {
                            Some((p, r)) => r.push(self, p, f),
                            None => self.recycle(f.data),
                        }
                    };
                    queue(frame);
                    while let Some((f, _)) = frames.next_if(|(_, next)| *next == Some(d)) {
                        queue(f);
                    }
                    if let Some((p, r)) = inbox {
                        r.finish(p);
                    }
                }
                None => self.flood(&ports, src, frame),
            }
        }
    }

    /// Sends a copy of `frame` to every port but `src` (the last gets the frame).
    fn flood(&self, ports: &[Option<Arc<Port>>], src: &Port, frame: Frame) {
        self.flooded.fetch_add(1, Ordering::Relaxed);
        let others = || ports.iter().flatten().filter(|p| p.id != src.id);
        let n = others().count();
        let mut frame = Some(frame);
        for (k, p) in others().enumerate() {
            let Some(f) = frame.as_ref() else { break };
            if k + 1 == n {
                if let Some(f) = frame.take() {
                    self.push(p, f);
                }
                break;
            }
            let mut copy = self.take_buf(f.data.len());
            copy.copy_from_slice(&f.data);
            let (csum, src) = (f.csum, f.src);
            self.push(
                p,
                Frame {
                    data: copy,
                    csum,
                    src,
                },
            );
        }
        if let Some(f) = frame {
            self.recycle(f.data);
        }
    }

    /// Queues `frame` for `dst`'s worker, or drops it.
    fn push(&self, dst: &Port, frame: Frame) {
        let mut run = Run::start(dst);
        run.push(self, dst, frame);
        run.finish(dst);
    }
}

/// Frames a worker collected in one round, for [`Switch::forward_batch`].
#[derive(Debug, Default)]
pub(crate) struct Batch {
    frames: Vec<Frame>,
    dsts: Vec<Option<usize>>,
}

impl Batch {
    /// Adds a frame.
    pub(crate) fn push(&mut self, frame: Frame) {
        self.frames.push(frame);
    }

    /// Frames in the batch.
    pub(crate) fn len(&self) -> usize {
        self.frames.len()
    }
}

/// Frames queued into one port's inbox under one lock.
struct Run<'a> {
    inbox: Option<MutexGuard<'a, Inbox>>,
    was_empty: bool,
}

impl<'a> Run<'a> {
    /// Locks `dst`'s inbox, unless the port is stopped (its frames are dropped).
    fn start(dst: &'a Port) -> Run<'a> {
        if !dst.active.load(Ordering::Acquire) {
            return Run {
                inbox: None,
                was_empty: false,
            };
        }
        let inbox = lock(&dst.inbox);
        let was_empty = inbox.len == 0;
        Run {
            inbox: Some(inbox),
            was_empty,
        }
    }

    fn push(&mut self, switch: &Switch, dst: &Port, frame: Frame) {
        let Some(inbox) = self.inbox.as_mut() else {
            dst.count_drop(DropReason::NoRxBuffer);
            return switch.recycle(frame.data);
        };
        if inbox.per_source.len() <= frame.src {
            inbox.per_source.resize_with(frame.src + 1, VecDeque::new);
        }
        let q = &mut inbox.per_source[frame.src];
        if q.len() >= switch.cfg.backlog {
            dst.count_drop(DropReason::BacklogFull);
            return switch.recycle(frame.data);
        }
        q.push_back(frame);
        inbox.len += 1;
    }

    /// Unlocks, and wakes the port's worker if its inbox was empty and is not.
    fn finish(self, dst: &Port) {
        let Some(inbox) = self.inbox else { return };
        let wake = self.was_empty && inbox.len > 0;
        drop(inbox);
        if wake && let Err(error) = dst.wake.notify() {
            tracing::error!(%error, port = %dst.id, "cannot wake a switch port");
        }
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
        fit(&mut v, len);
        v
    }

    /// Keeps a buffer for reuse.
    pub(crate) fn give(&mut self, switch: &Switch, v: Vec<u8>) {
        self.bufs.push(v);
        if self.bufs.len() >= 2 * LOCAL_BATCH {
            switch.recycle_from(&mut self.bufs, LOCAL_BATCH);
        }
    }

    /// Returns every buffer to the switch.
    pub(crate) fn flush(&mut self, switch: &Switch) {
        switch.recycle_from(&mut self.bufs, 0);
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
        let ports: Vec<_> = (0..3).map(|_| sw.attach().unwrap()).collect();
        for p in &ports {
            p.set_active(true);
        }
        sw.forward(&ports[0], frame(B, A, &ports[0]));
        assert_eq!(sw.flooded_frames(), 1);
        assert!(ports[1].pop().is_some() && ports[2].pop().is_some());
        assert!(ports[0].pop().is_none(), "never sent back to the source");
        assert_eq!(ports[1].wake.take().unwrap(), 1);
        sw.forward(&ports[1], frame(A, B, &ports[1]));
        assert_eq!(sw.unicast_frames(), 1);
        assert!(ports[0].pop().is_some() && ports[2].pop().is_none());
        assert_eq!(sw.lookup(A), Some(PortId(0)));
        sw.detach(&ports[0]);
        assert_eq!(sw.lookup(A), None);
        assert!(sw.stats(PortId(0)).is_none());
    }

    #[test]
    fn inbox_is_bounded_per_source_and_fair() {
        let sw = Switch::new(SwitchConfig {
            backlog: 4,
            budget: 4,
        });
        let ports: Vec<_> = (0..3).map(|_| sw.attach().unwrap()).collect();
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
    fn frames_to_a_stopped_port_are_dropped_and_counted() {
        let sw = Switch::new(SwitchConfig::default());
        let a = sw.attach().unwrap();
        let b = sw.attach().unwrap();
        a.set_active(true);
        sw.forward(&a, frame([0xff; 6], A, &a));
        assert_eq!(sw.stats(b.id).unwrap().drops.no_rx_buffer, 1);
        assert_eq!(sw.stats(b.id).unwrap().drops.total(), 1);
    }
}
