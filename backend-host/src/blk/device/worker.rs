//! One queue's worker: pops chains, parses them, runs their I/O through the queue's
//! engine and returns them, within fixed bounds whatever the guest sends.
//!
//! Bounds (HOSTILE 32, 34):
//! - Memory: a READ or WRITE runs as ops of at most [`CHUNK`] bytes, and a queue
//!   holds at most [`super::BlkSettings::max_bytes_in_flight`] bytes of data buffers
//!   in flight (one chunk may always run, so any request makes progress). A request
//!   whose chunks do not fit waits, and while one waits the worker pops nothing new:
//!   the rest stay in the available ring (back-pressure, not failure). Descriptors
//!   may overlap, so the data length of one chain can reach 4 GiB over a few pages
//!   of guest memory; it costs the guest disk time, never host memory.
//! - Time: each wake-up pops at most [`CHAINS_PER_WAKE`] chains, counting the ones
//!   the ring or the parser rejects at once, then yields to the runtime and comes
//!   back without waiting for a kick; the stop request is checked between chains.
//!   A guest that re-publishes failing chains from another CPU forever can keep the
//!   worker busy, never keep it from stopping or starve a shared runtime.
//! - A rejected or failed request gets its status byte and nothing else written:
//!   writing (zeroing) its whole writable part would let overlapping descriptors
//!   turn one request into gigabytes of memory traffic.

mod pool;

use super::flush::{FlushGate, Ticket};
use super::{CHAINS_PER_WAKE, CHUNK, CacheMode, SharedCache};
use crate::blk::engine::{AlignedBuf, Completion, Engine, IoKind, IoOp};
use crate::blk::request::{Parser, Reject, Request, RequestKind};
use crate::poll::Poller;
use pool::BufferPool;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use virtio_core::blk::{self, Status};
use virtio_core::notify::{EventFdNotifier, Notify, Wait};
use virtio_core::reactor::watch;
use virtio_core::ring::Chain;
use virtio_core::{DeviceMemory, SplitDevice};

/// While completing a batch of ops, the worker starts newly available chains after
/// this many completions ([`Worker::complete_all`]).
const RESTART_EVERY: usize = 8;

/// Tag bit of an op that is a disk sync run for the [`FlushGate`] (the bits below
/// are the sync's number); other tags are a slot (low 32 bits) and a chunk index
/// (the next 20). All stay below [`crate::blk::engine::TAG_RESERVED`].
const SYNC_TAG: u64 = 1 << 52;

/// A request being executed: its chain (owned until it is returned as used) and how
/// many engine ops are still to finish.
struct InFlight {
    chain: Chain,
    req: Request,
    /// Ops submitted or still to submit that have not finished.
    pending: u32,
    /// Data bytes (READ/WRITE) already handed to the engine.
    submitted: u32,
    status: Status,
    /// After its ops, the request needs a disk sync before it completes (a FLUSH,
    /// or a WRITE_ZEROES in writethrough mode): the sync it waits for.
    sync: SyncNeed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncNeed {
    None,
    /// Needs one once its ops are done.
    Wanted,
    /// Covered once the gate's sync number `n` has finished.
    Epoch(u64),
}

/// What a queue worker is given.
pub(super) struct WorkerParts<M> {
    pub index: u16,
    pub ring: SplitDevice<M>,
    pub parser: Parser,
    pub engine: Box<dyn Engine>,
    pub cache: Arc<SharedCache>,
    pub mem_align: usize,
    pub serial: [u8; blk::GET_ID_LEN],
    pub gate: Arc<FlushGate>,
    pub poller: Poller,
    pub max_bytes_in_flight: usize,
}

/// How a queue worker is told to stop.
pub(super) struct StopSignal {
    pub fd: Arc<EventFdNotifier>,
    /// Finish the requests in flight and return them, rather than dropping them.
    pub drain: Arc<AtomicBool>,
}

/// The state of one queue's worker.
pub(super) struct Worker<M> {
    index: u16,
    ring: SplitDevice<M>,
    parser: Parser,
    engine: Box<dyn Engine>,
    cache: Arc<SharedCache>,
    serial: [u8; blk::GET_ID_LEN],
    gate: Arc<FlushGate>,
    poller: Poller,
    max_bytes_in_flight: usize,
    stopping: Arc<AtomicBool>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    completions: Vec<Completion>,
    /// Data buffers of finished ops, for reuse.
    pool: BufferPool,
    /// READ/WRITE requests with data not yet submitted, oldest first.
    backlog: VecDeque<usize>,
    /// Bytes of data buffers handed to the engine and not yet reaped.
    bytes_in_flight: usize,
    /// Requests waiting for a disk sync.
    awaiting_sync: Vec<usize>,
    /// Go back to the ring without waiting for a kick: a wake-up ran out of budget,
    /// or the backlog that held popping back has drained.
    more: bool,
    /// The gate's sync this queue's engine is running, until its completion is
    /// reported to the gate.
    running_sync: Option<u64>,
    /// This worker's registration with the gate (its wake-up).
    waiter: Option<u64>,
    /// Popping stopped because the backlog was not empty: the ring may hold more.
    held_back: bool,
}

impl<M: DeviceMemory + Send> Worker<M> {
    pub(super) fn new(p: WorkerParts<M>, stopping: Arc<AtomicBool>) -> Worker<M> {
        Worker {
            index: p.index,
            ring: p.ring,
            parser: p.parser,
            engine: p.engine,
            cache: p.cache,
            serial: p.serial,
            gate: p.gate,
            poller: p.poller,
            max_bytes_in_flight: p.max_bytes_in_flight.max(CHUNK as usize),
            stopping,
            slots: Vec::new(),
            free: Vec::new(),
            completions: Vec::new(),
            pool: BufferPool::new(p.mem_align),
            backlog: VecDeque::new(),
            bytes_in_flight: 0,
            awaiting_sync: Vec::new(),
            more: false,
            running_sync: None,
            waiter: None,
            held_back: false,
        }
    }

    pub(super) async fn run(
        mut self,
        kick: EventFdNotifier,
        interrupt: EventFdNotifier,
        stop: StopSignal,
        done: std::sync::mpsc::Sender<u16>,
    ) {
        let wake = match EventFdNotifier::new() {
            Ok(w) => Arc::new(w),
            Err(e) => {
                tracing::error!(queue = self.index, error = %e, "cannot create the flush wake-up");
                let _ = done.send(self.ring.next_avail());
                return;
            }
        };
        self.waiter = Some(self.gate.register(wake.clone()));
        if let Err(e) = self.serve(&kick, &interrupt, &stop.fd, &wake).await {
            tracing::error!(queue = self.index, error = %e, "block queue worker failed");
        }
        if stop.drain.load(Ordering::Acquire) {
            self.drain(&interrupt, &wake);
        }
        self.quiesce();
        if let Some(id) = self.waiter.take() {
            self.gate.unregister(id);
        }
        tracing::debug!(
            queue = self.index,
            contended_polls = self.poller.contended_sessions(),
            next_avail = self.ring.next_avail(),
            "block queue worker stopped"
        );
        let _ = done.send(self.ring.next_avail());
    }

    fn stop_requested(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    async fn serve(
        &mut self,
        kick: &EventFdNotifier,
        interrupt: &EventFdNotifier,
        stop: &EventFdNotifier,
        wake: &EventFdNotifier,
    ) -> std::io::Result<()> {
        let kick_fd = watch(kick)?;
        let ready_fd = watch(&self.engine.ready_fd())?;
        let stop_fd = watch(stop)?;
        let wake_fd = watch(wake)?;
        // Buffers made available before the first kick are served too.
        self.on_kick(interrupt);
        loop {
            if self.stop_requested() {
                return Ok(());
            }
            // Cleared only when the worker goes back to the ring: another branch may
            // win the race and must not lose the request.
            let more = self.more;
            tokio::select! {
                biased;
                g = stop_fd.readable() => {
                    let _ = g?;
                    return Ok(());
                }
                g = ready_fd.readable() => {
                    let mut g = g?;
                    g.clear_ready();
                    self.engine.ack_ready();
                    self.on_completions(interrupt);
                }
                g = wake_fd.readable() => {
                    let mut g = g?;
                    g.clear_ready();
                    let _ = wake.take();
                    self.on_sync_progress(interrupt);
                }
                g = kick_fd.readable() => {
                    let mut g = g?;
                    g.clear_ready();
                    let _ = kick.take();
                    self.on_kick(interrupt);
                }
                // Out of budget last time: let the runtime run everything else (and
                // see a stop) before going back to the ring.
                () = tokio::task::yield_now(), if more => {
                    self.more = false;
                    self.on_kick(interrupt);
                }
            }
            self.poll_for_more(interrupt);
        }
    }

    /// Adaptive polling: serves whatever arrives without sleeping until nothing has
    /// for the polling budget, with kicks suppressed meanwhile; backs off while the
    /// core is shared (see [`Poller`]). A stop request ends it.
    fn poll_for_more(&mut self, interrupt: &EventFdNotifier) {
        if self.more || self.stop_requested() {
            return;
        }
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
            if self.more || self.stop_requested() || !self.poller.keep_polling(&mut session, work) {
                break;
            }
        }
        self.poller.end(session);
        self.completions = got;
        // Re-arm kicks; work that raced in is served before sleeping.
        if !self.more && self.ring.enable_notifications() {
            self.on_kick(interrupt);
        }
    }

    /// Pops and starts what is available, within the wake-up's budget, with kicks
    /// suppressed meanwhile; the batch is committed to the engine with one call.
    fn on_kick(&mut self, interrupt: &EventFdNotifier) {
        self.ring.disable_notifications();
        let mut budget = CHAINS_PER_WAKE;
        loop {
            self.pop_and_start(&mut budget, false);
            self.commit();
            // Out of budget, stopping, or held back by the backlog: kicks stay
            // suppressed; the worker comes back on its own (`more`, or when the
            // backlog drains).
            if budget == 0 || self.stop_requested() || !self.backlog.is_empty() {
                break;
            }
            if !self.ring.enable_notifications() {
                break;
            }
            self.ring.disable_notifications();
        }
        self.signal(interrupt);
    }

    /// Pops chains and starts them while `budget` lasts, nothing is held back by
    /// the backlog and no stop was asked for; with `commit_each`, commits each
    /// request on its own. Returns whether it popped anything; sets `more` when the
    /// budget ran out.
    fn pop_and_start(&mut self, budget: &mut usize, commit_each: bool) -> bool {
        let mut any = false;
        while self.backlog.is_empty() && !self.stop_requested() {
            if *budget == 0 {
                self.more = true;
                break;
            }
            *budget -= 1;
            match self.ring.pop() {
                Ok(Some(chain)) => {
                    any = true;
                    self.start(chain);
                    if commit_each {
                        self.commit();
                    }
                }
                Ok(None) => break,
                Err(virtio_core::ring::split::DeviceQueueError::NeedsReset(f)) => {
                    tracing::warn!(queue = self.index, fault = %f, "queue needs reset");
                    break;
                }
                // The ring returned the bad chain itself; it counts against the budget.
                Err(e) => {
                    any = true;
                    tracing::debug!(queue = self.index, error = %e, "chain rejected");
                }
            }
        }
        // A request whose data did not fit the budget stops popping; `pump` asks to
        // come back to the ring once it has gone out.
        if !self.backlog.is_empty() {
            self.held_back = true;
        }
        any
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
        let mut budget = CHAINS_PER_WAKE;
        self.pop_and_start(&mut budget, true)
    }

    /// Parses a chain and either completes it at once or starts its ops.
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
        let mut sync = SyncNeed::None;
        let mut data = false;
        match req.kind() {
            &RequestKind::Read { len, .. } | &RequestKind::Write { len, .. } => {
                ops = len.div_ceil(CHUNK);
                data = ops > 0;
            }
            RequestKind::Flush => {
                if self.gate.failed() {
                    status = Status::IoErr;
                } else if self.cache.get() != CacheMode::Unsafe {
                    sync = SyncNeed::Wanted;
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
                // as zeros whether or not the driver allowed unmapping. In writethrough
                // mode the zeros must be durable at completion, like a write's data.
                let kind = match req.kind() {
                    RequestKind::Discard(_) => IoKind::Discard,
                    _ => {
                        if self.cache.get() == CacheMode::Writethrough {
                            sync = SyncNeed::Wanted;
                        }
                        IoKind::WriteZeroes
                    }
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
            submitted: 0,
            status,
            sync,
        });
        if data {
            self.backlog.push_back(slot);
            self.pump();
        } else if ops == 0 {
            self.ops_done(slot);
        }
    }

    /// Hands the backlog's data chunks to the engine, oldest request first, while
    /// they fit in the queue's bytes-in-flight budget (one chunk always fits when
    /// nothing is in flight). When the backlog empties after holding popping back,
    /// asks to go back to the ring.
    fn pump(&mut self) {
        while let Some(&slot) = self.backlog.front() {
            let Some(Some(f)) = self.slots.get(slot) else {
                self.backlog.pop_front();
                continue;
            };
            let (write, offset, len) = match *f.req.kind() {
                RequestKind::Read { offset, len, .. } => (false, offset, len),
                RequestKind::Write { offset, len, .. } => (true, offset, len),
                _ => {
                    self.backlog.pop_front();
                    continue;
                }
            };
            let at = f.submitted;
            let n = (len - at).min(CHUNK);
            let n_bytes = n as usize;
            if self.bytes_in_flight > 0 && self.bytes_in_flight + n_bytes > self.max_bytes_in_flight {
                break;
            }
            let mut buf = self.pool.take(n_bytes);
            let kind = if write {
                if !self.read_chunk(slot, at, &mut buf) {
                    // The guest's data cannot be read: the request fails, and its
                    // chunks not submitted yet are dropped.
                    self.backlog.pop_front();
                    self.pool.recycle(buf);
                    if let Some(Some(f)) = self.slots.get_mut(slot) {
                        f.status = Status::IoErr;
                        f.pending = f.pending.saturating_sub((len - at).div_ceil(CHUNK));
                        f.submitted = len;
                        if f.pending == 0 {
                            self.ops_done(slot);
                        }
                    }
                    continue;
                }
                IoKind::Write {
                    dsync: self.cache.get() == CacheMode::Writethrough,
                }
            } else {
                IoKind::Read
            };
            if let Some(Some(f)) = self.slots.get_mut(slot) {
                f.submitted = at + n;
            }
            if at + n == len {
                self.backlog.pop_front();
            }
            self.bytes_in_flight += n_bytes;
            self.engine.submit(IoOp {
                kind,
                offset: offset + u64::from(at),
                len: u64::from(n),
                buf,
                user: slot as u64 | (u64::from(at / CHUNK) << 32),
            });
        }
        if self.held_back && self.backlog.is_empty() {
            self.held_back = false;
            self.more = true;
        }
    }

    /// Copies the data of request `slot` from byte `at` into `buf`; false if the
    /// guest's memory refused.
    fn read_chunk(&self, slot: usize, at: u32, buf: &mut AlignedBuf) -> bool {
        let Some(Some(f)) = self.slots.get(slot) else {
            return false;
        };
        let Ok(n) = u32::try_from(buf.len()) else {
            return false;
        };
        f.req.data().sub(at, n).is_some_and(|span| {
            span.read(&f.chain, self.ring.memory(), buf.as_mut_slice())
                .is_ok()
        })
    }

    /// Completes a chain the parser refused: the status byte only (see the module
    /// docs), and the whole writable part as the used length, as QEMU does
    /// (`virtio_blk_req_complete` pushes `in_len`). Reporting bytes the device did
    /// not write leaks nothing: sharing model 1 zeroes a device-writable bounce
    /// block before exposing it, and the other models leave the guest's own bytes
    /// in place. It is what makes the status reach the guest in models that copy
    /// back only the used length.
    fn reject(&mut self, chain: &Chain, reject: &Reject) {
        tracing::debug!(queue = self.index, error = %reject, reason = ?reject.reason(), "request rejected");
        let used = match reject {
            Reject::Status { status, reason } => status.write_failure(self.ring.memory(), reason.status()),
            Reject::NoStatus => 0,
        };
        self.add_used(chain.head(), used);
    }

    /// Reaps engine completions and finishes the requests they complete.
    fn on_completions(&mut self, interrupt: &EventFdNotifier) {
        let mut got = std::mem::take(&mut self.completions);
        while self.engine.reap(&mut got) > 0 {
            self.complete_all(&mut got);
        }
        self.completions = got;
        self.commit();
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
                self.pump();
                self.start_each();
            }
        }
        self.pump();
        // What the completions started (data chunks, syncs) goes to the disk now,
        // whichever path reaped them.
        self.commit();
    }

    /// Hands the engine what was submitted since the last commit.
    fn commit(&mut self) {
        if let Err(e) = self.engine.commit() {
            tracing::error!(queue = self.index, error = %e, "submitting block I/O failed");
        }
    }

    fn complete_op(&mut self, c: Completion) {
        if c.user & SYNC_TAG != 0 {
            let epoch = c.user & (SYNC_TAG - 1);
            if let Err(e) = &c.result {
                // Latched: the data of some write may be lost for good.
                tracing::error!(queue = self.index, error = %e, "flush failed; later flushes will fail");
            }
            self.running_sync = None;
            self.gate.finished(epoch, c.result.is_ok(), self.waiter);
            self.sync_progress();
            return;
        }
        let slot = usize::try_from(c.user & u64::from(u32::MAX)).unwrap_or(usize::MAX);
        let chunk = u32::try_from(c.user >> 32).unwrap_or(u32::MAX);
        let data_len = c.buf.len();
        let Some(Some(f)) = self.slots.get_mut(slot) else {
            tracing::error!(queue = self.index, user = c.user, "completion for no request");
            return;
        };
        let kind = f.req.kind();
        let ok = match (kind, &c.result) {
            // A transfer is complete or it failed: a short count after the engine's
            // retries is an error, never a partial success.
            (RequestKind::Read { .. }, Ok(n)) => {
                let at = chunk.saturating_mul(CHUNK);
                *n == data_len as u64
                    && f.status == Status::Ok
                    && f.req
                        .data()
                        .sub(at, u32::try_from(data_len).unwrap_or(u32::MAX))
                        .is_some_and(|s| s.write(&f.chain, self.ring.memory(), c.buf.as_slice()).is_ok())
            }
            (RequestKind::Write { .. }, Ok(n)) => *n == data_len as u64,
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
        self.bytes_in_flight = self.bytes_in_flight.saturating_sub(data_len);
        self.pool.recycle(c.buf);
        if done {
            self.ops_done(slot);
        }
    }

    /// A request's ops are done: finish it, or first wait for a disk sync.
    fn ops_done(&mut self, slot: usize) {
        let wants_sync = matches!(
            self.slots.get(slot),
            Some(Some(f)) if f.sync == SyncNeed::Wanted && f.status == Status::Ok
        );
        if wants_sync {
            self.awaiting_sync.push(slot);
            self.sync_progress();
        } else {
            self.finish(slot);
        }
    }

    /// A sync finished somewhere (this queue's or another's).
    fn on_sync_progress(&mut self, interrupt: &EventFdNotifier) {
        self.sync_progress();
        self.commit();
        self.signal(interrupt);
    }

    /// Finishes the requests whose sync has finished, and asks the gate for one for
    /// those still waiting: a sync starts here if none runs anywhere.
    fn sync_progress(&mut self) {
        if self.awaiting_sync.is_empty() {
            return;
        }
        let mut waiting = std::mem::take(&mut self.awaiting_sync);
        // One look at the gate for the whole list: syncs up to `done` have finished,
        // syncs below `next` have started.
        let (done, next) = self.gate.progress();
        let failed = self.gate.failed();
        let mut uncovered = false;
        waiting.retain(|&slot| {
            let Some(Some(f)) = self.slots.get_mut(slot) else {
                return false;
            };
            match f.sync {
                SyncNeed::Epoch(e) if e <= done => {
                    // The latch as it stands now, after the covering sync: a failure
                    // of any sync up to it fails this request too.
                    if failed {
                        f.status = Status::IoErr;
                    }
                    self.finish(slot);
                    false
                }
                SyncNeed::Epoch(e) => {
                    uncovered |= e >= next;
                    true
                }
                SyncNeed::Wanted => {
                    uncovered = true;
                    true
                }
                SyncNeed::None => true,
            }
        });
        // Requests not yet covered by a sync that has started need one: a sync
        // starts here if none runs anywhere, else they wait for the next.
        if uncovered {
            let epoch = match self.gate.request() {
                Ticket::Start(e) => {
                    self.engine.submit(IoOp {
                        kind: IoKind::Flush,
                        offset: 0,
                        len: 0,
                        buf: AlignedBuf::default(),
                        user: SYNC_TAG | (e & (SYNC_TAG - 1)),
                    });
                    self.running_sync = Some(e);
                    e
                }
                Ticket::Wait(e) => e,
            };
            for &slot in &waiting {
                if let Some(Some(f)) = self.slots.get_mut(slot) {
                    match f.sync {
                        SyncNeed::Wanted => f.sync = SyncNeed::Epoch(epoch),
                        SyncNeed::Epoch(e) if e >= next => f.sync = SyncNeed::Epoch(epoch),
                        _ => {}
                    }
                }
            }
        }
        self.awaiting_sync = waiting;
    }

    /// Writes the status of a finished request and returns its chain. A failed
    /// request gets only its status byte (see [`Worker::reject`] for the used
    /// length).
    fn finish(&mut self, slot: usize) {
        let Some(f) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        let used = if f.status == Status::Ok {
            f.req.write_status(self.ring.memory(), f.status).unwrap_or(0)
        } else {
            f.req.status_target().write_failure(self.ring.memory(), f.status)
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

    /// Completes every request in flight and returns it to the driver, then signals
    /// it: the queue stops with nothing in flight, so another device instance can
    /// resume it at [`SplitDevice::next_avail`]. Requests waiting for another
    /// queue's sync wait for it here.
    fn drain(&mut self, interrupt: &EventFdNotifier, wake: &EventFdNotifier) {
        let mut got = std::mem::take(&mut self.completions);
        loop {
            self.pump();
            self.sync_progress();
            if let Err(e) = self.engine.commit() {
                tracing::error!(queue = self.index, error = %e, "submitting block I/O while stopping");
                break;
            }
            if self.engine.in_flight() > 0 {
                if let Err(e) = self.engine.wait() {
                    tracing::error!(queue = self.index, error = %e, "waiting for block I/O while stopping");
                    break;
                }
                self.engine.reap(&mut got);
                for c in got.drain(..) {
                    self.complete_op(c);
                }
            } else if !self.awaiting_sync.is_empty() {
                // Another queue runs the sync these wait for.
                if let Err(e) = wake.wait(Some(std::time::Duration::from_millis(100))) {
                    tracing::error!(queue = self.index, error = %e, "waiting for a flush while stopping");
                    break;
                }
            } else if self.backlog.is_empty() {
                break;
            }
        }
        self.completions = got;
        self.signal(interrupt);
    }

    /// Waits for every op in flight and drops the results: after a reset nothing
    /// may be written to guest memory (§2.4), and buffers stay owned until reaped.
    /// A sync this queue ran still reaches the gate, so other queues' flushes do not
    /// wait for it forever.
    fn quiesce(&mut self) {
        let mut got = Vec::new();
        while self.engine.in_flight() > 0 {
            if let Err(e) = self.engine.wait() {
                tracing::error!(queue = self.index, error = %e, "waiting for block I/O during reset");
                break;
            }
            self.engine.reap(&mut got);
            for c in got.drain(..) {
                if c.user & SYNC_TAG != 0 {
                    self.running_sync = None;
                    self.gate
                        .finished(c.user & (SYNC_TAG - 1), c.result.is_ok(), self.waiter);
                }
            }
        }
        self.slots.clear();
        self.free.clear();
        self.backlog.clear();
        self.held_back = false;
        self.awaiting_sync.clear();
        self.bytes_in_flight = 0;
    }
}

impl<M> Drop for Worker<M> {
    /// A worker that ends with a sync still running (its engine failed while it
    /// waited, or the task unwound) reports it to the gate as failed: the result is
    /// lost, so it cannot count as a success, and other queues' flushes must not
    /// wait for it for ever.
    fn drop(&mut self) {
        if let Some(epoch) = self.running_sync.take() {
            tracing::error!(
                queue = self.index,
                "a flush's disk sync was lost with its worker; latched as failed"
            );
            self.gate.finished(epoch, false, self.waiter);
        }
    }
}
