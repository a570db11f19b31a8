//! One queue's worker: pops chains, parses them, runs their I/O through the queue's
//! engine and returns them, within fixed bounds whatever the guest sends.
//!
//! This file holds the worker's state and its event loop: waking on kicks, engine
//! completions, sync progress elsewhere and the stop request; popping within the
//! budget; adaptive polling; and stopping (`drain` returns the requests in flight,
//! `quiesce` reaps the ops and drops them). Its parts: [`exec`] turns a chain into
//! engine ops and back into a used entry, and runs the disk syncs flushes wait for;
//! [`pool`] keeps data buffers for reuse.
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

mod exec;
mod pool;

use super::flush::FlushGate;
use super::{CHAINS_PER_WAKE, CHUNK, SharedCache};
use crate::blk::engine::{Completion, Engine};
use crate::blk::limit::{RateLimiter, Timer};
use crate::blk::request::Parser;
use crate::poll::Poller;
use exec::{InFlight, SYNC_TAG};
use pool::BufferPool;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use virtio_core::blk;
use virtio_core::notify::{EventFdNotifier, Notify, Wait};
use virtio_core::reactor::watch;
use virtio_core::{DeviceMemory, DeviceRing};

/// With this many ops at the disk the worker does not poll: a completion is never
/// far off, and the wake-up it costs is shared by the batch that completes with it.
/// Polling then spends a core for little: `vio vhost-bench` measured 1.9x the CPU
/// per request for 7% more IOPS at QD32 with a 50 us budget.
const DEEP: usize = 8;

/// While completing a batch of ops, the worker starts newly available chains after
/// this many completions ([`Worker::complete_all`]).
const RESTART_EVERY: usize = 8;

/// What a queue worker is given.
pub(super) struct WorkerParts<M> {
    pub index: u16,
    pub ring: DeviceRing<M>,
    pub parser: Parser,
    pub engine: Box<dyn Engine>,
    pub cache: Arc<SharedCache>,
    pub mem_align: usize,
    pub serial: [u8; blk::GET_ID_LEN],
    pub gate: Arc<FlushGate>,
    pub poller: Poller,
    pub max_bytes_in_flight: usize,
    /// The device's rate limits, if any.
    pub limiter: Option<Arc<RateLimiter>>,
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
    ring: DeviceRing<M>,
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
    /// Rate limits, and the timer the worker sleeps on while the backlog's oldest
    /// request waits for tokens.
    pub(super) limiter: Option<(Arc<RateLimiter>, Timer)>,
    /// Stopping: requests in flight are finished whatever the rate limits.
    pub(super) draining: bool,
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
            limiter: p.limiter.and_then(|l| match Timer::new() {
                Ok(t) => Some((l, t)),
                Err(error) => {
                    tracing::error!(%error, "no timer for the rate limits: the queue runs unlimited");
                    None
                }
            }),
            draining: false,
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
        let timer_fd = match &self.limiter {
            Some((_, t)) => Some(watch(t)?),
            None => None,
        };
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
                // Polled only with a timer (the branch is off without one).
                g = async { timer_fd.as_ref().expect("a timer").readable().await }, if timer_fd.is_some() => {
                    // Tokens for the backlog's oldest request.
                    g?.clear_ready();
                    if let Some((_, t)) = &self.limiter {
                        t.take();
                    }
                    self.pump();
                    self.commit();
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
        if self.more || self.stop_requested() || self.engine.in_flight() >= DEEP {
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
                Err(virtio_core::ring::queue::DeviceQueueError::NeedsReset(f)) => {
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
        // With [`DEEP`] ops at the disk already, the disk does not wait for the
        // next one: one call for the batch.
        let each = self.engine.in_flight() < DEEP;
        let any = self.pop_and_start(&mut budget, each);
        if !each {
            self.commit();
        }
        any
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

    /// A sync finished somewhere (this queue's or another's).
    fn on_sync_progress(&mut self, interrupt: &EventFdNotifier) {
        self.sync_progress();
        self.commit();
        self.signal(interrupt);
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
    /// resume it at [`DeviceRing::next_avail`]. Requests waiting for another
    /// queue's sync wait for it here.
    fn drain(&mut self, interrupt: &EventFdNotifier, wake: &EventFdNotifier) {
        // What the driver made available is finished now, rate limits or not.
        self.draining = true;
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
