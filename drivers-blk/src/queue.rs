//! One request queue: the ring, the request slots and who waits for what.
//!
//! All state sits behind one mutex per queue. Whoever holds it may *reap*: take used
//! elements off the ring, check them ([`crate::request::complete`]) and deliver the
//! result to its owner: the raw [`poll`](crate::BlkDriver::poll) queue, a blocking
//! caller or future waiting on the slot, or nobody (a cancelled request, whose slot
//! is simply released). Interrupts are waited for by at most one thread at a time
//! (the *leader*) or by the async completion runner; everybody else sleeps on the
//! condition variable, which is signalled after every reap.

use crate::error::{BlkError, Broken};
use crate::request::{Completion, Kind, Request, SLOT_BYTES, STATUS_SENTINEL, SlotAddr, complete};
use crate::staging::{Staging, StagingPool};
use hypervisor::GuestMemory;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::task::Waker;
use virtio_core::DriverShare;
use virtio_core::blk::GET_ID_LEN;
use virtio_core::ring::queue::{AddError, DriverRing, Used};
use zerocopy::IntoBytes;

/// Names one submitted request: its queue, its slot and the slot's generation, so a
/// stale id never matches a later request in the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId {
    queue: u16,
    slot: u16,
    generation: u32,
}

impl RequestId {
    /// The queue the request was submitted on.
    pub fn queue(&self) -> u16 {
        self.queue
    }
}

/// One result of [`crate::BlkDriver::poll`]: which request, and how it ended.
pub type Polled = (RequestId, Result<Completion, BlkError>);

/// Who receives a request's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// The raw API: the result is queued for `poll`.
    Poller,
    /// A blocking call or a future waiting on the slot.
    Waiter,
    /// The waiter gave up; release the slot on completion.
    Abandoned,
}

#[derive(Debug)]
enum Phase {
    Free,
    InFlight(Owner),
    Done(Result<Completion, BlkError>),
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    phase: Phase,
    kind: Kind,
    data_in: u32,
    waker: Option<Waker>,
    /// A staging buffer the request uses; owned by the slot while in flight.
    staging: Option<Staging>,
}

/// The mutable state of a queue.
pub(crate) struct QueueState<S: DriverShare> {
    pub(crate) ring: DriverRing<S, u16>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Guest address of slot 0; slot `i` is at `base + 64 * i`.
    base: u64,
    /// Completed raw requests, by slot, in completion order (at most one per slot).
    ready: VecDeque<u16>,
    broken: Option<Broken>,
    /// A thread is blocked on the interrupt.
    pub(crate) leader: bool,
    /// An async runner owns the interrupt.
    pub(crate) runner: bool,
    /// Futures waiting for a free slot.
    space_waiters: Vec<Waker>,
    pub(crate) staging: StagingPool,
}

/// Descriptors the longest request needs without indirect descriptors.
const MAX_DESCS: u16 = 3;

impl<S: DriverShare> QueueState<S> {
    pub(crate) fn new(ring: DriverRing<S, u16>, base: u64) -> Self {
        let n = ring.size();
        QueueState {
            slots: (0..n)
                .map(|_| Slot {
                    generation: 0,
                    phase: Phase::Free,
                    kind: Kind::Flush,
                    data_in: 0,
                    waker: None,
                    staging: None,
                })
                .collect(),
            // Popped from the back: slot 0 first.
            free: (0..n).rev().collect(),
            base,
            ready: VecDeque::with_capacity(usize::from(n)),
            broken: None,
            leader: false,
            runner: false,
            space_waiters: Vec::new(),
            staging: StagingPool::default(),
            ring,
        }
    }

    fn addr(&self, slot: u16) -> SlotAddr {
        SlotAddr(self.base + SLOT_BYTES * u64::from(slot))
    }

    pub(crate) fn broken(&self) -> Option<Broken> {
        self.broken
    }

    /// Whether a request of any type fits now.
    pub(crate) fn has_space(&self) -> bool {
        !self.free.is_empty() && self.ring.num_free() >= MAX_DESCS
    }

    /// Completed raw requests waiting for `poll`.
    pub(crate) fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Writes the request into a free slot and adds it to the ring (not yet kicked).
    /// Takes `staging` into the slot on success; leaves it with the caller otherwise.
    pub(crate) fn submit(
        &mut self,
        mem: &GuestMemory,
        queue: u16,
        req: &Request,
        owner: Owner,
        staging: &mut Option<Staging>,
    ) -> Result<RequestId, BlkError> {
        if let Some(b) = self.broken {
            return Err(BlkError::DeviceBroken(b));
        }
        let slot = *self.free.last().ok_or(BlkError::QueueFull)?;
        let at = self.addr(slot);
        let p = req.prepare(at);
        mem.write(at.header(), p.header.as_bytes())?;
        if let Some(seg) = &p.segment {
            mem.write(at.payload(), seg.as_bytes())?;
        }
        mem.write(at.status(), &[STATUS_SENTINEL])?;
        if let Err(r) = self.ring.add(&p.out[..p.n_out], &p.ins[..p.n_in], slot) {
            return Err(match r.error {
                AddError::Share(e) => BlkError::Share(e),
                AddError::Broken => BlkError::DeviceBroken(Broken::Earlier),
                AddError::NoSpace { .. } | AddError::Empty | AddError::TooLong(_) => BlkError::QueueFull,
            });
        }
        self.free.pop();
        let s = &mut self.slots[usize::from(slot)];
        s.phase = Phase::InFlight(owner);
        s.kind = p.kind;
        s.data_in = p.data_in;
        s.staging = staging.take();
        Ok(RequestId {
            queue,
            slot,
            generation: s.generation,
        })
    }

    /// Takes every used element off the ring. Returns whether a waiter's request
    /// completed (the caller then signals the condition variable).
    pub(crate) fn reap(&mut self, mem: &GuestMemory) -> bool {
        let mut woke = false;
        while self.broken.is_none() {
            match self.ring.pop_used() {
                Ok(None) => break,
                Ok(Some(Used { token, len })) => {
                    let result = self.check(mem, token, len);
                    let broke = match &result {
                        Err(BlkError::DeviceBroken(b)) => Some(*b),
                        _ => None,
                    };
                    woke |= self.deliver(token, result);
                    if let Some(b) = broke {
                        woke |= self.break_queue(b);
                    }
                }
                Err(e) => woke |= self.break_queue(Broken::Ring(e)),
            }
        }
        woke
    }

    fn check(&self, mem: &GuestMemory, slot: u16, len: u32) -> Result<Completion, BlkError> {
        let s = &self.slots[usize::from(slot)];
        let at = self.addr(slot);
        let mut status = [STATUS_SENTINEL];
        // Our own memory at an address we chose: cannot fail, and if it did the
        // sentinel reports the status as missing.
        let _ = mem.read(at.status(), &mut status);
        complete(s.kind, s.data_in, len, status[0], || {
            let mut id = [0u8; GET_ID_LEN];
            let _ = mem.read(at.payload(), &mut id);
            id
        })
    }

    /// Hands a result to the request's owner; returns whether a waiter was woken.
    fn deliver(&mut self, slot: u16, result: Result<Completion, BlkError>) -> bool {
        let s = &mut self.slots[usize::from(slot)];
        match s.phase {
            Phase::InFlight(Owner::Poller) => {
                s.phase = Phase::Done(result);
                self.ready.push_back(slot);
                false
            }
            Phase::InFlight(Owner::Waiter) => {
                s.phase = Phase::Done(result);
                if let Some(w) = s.waker.take() {
                    w.wake();
                }
                true
            }
            Phase::InFlight(Owner::Abandoned) => {
                let _ = self.release(slot);
                false
            }
            // The ring only returns tokens of outstanding requests.
            Phase::Free | Phase::Done(_) => {
                tracing::error!(slot, "completion for a slot not in flight");
                false
            }
        }
    }

    /// Marks the queue broken and fails every request still in flight. Their memory
    /// may still be touched by the device, but nothing new is ever submitted here.
    fn break_queue(&mut self, why: Broken) -> bool {
        tracing::warn!(error = %why, "virtio-blk queue broken");
        self.broken = Some(why);
        let mut woke = false;
        // Slot indices are ring heads' tokens: below the queue size, a u16.
        for slot in 0..self.ring.size() {
            if matches!(self.slots[usize::from(slot)].phase, Phase::InFlight(_)) {
                woke |= self.deliver(slot, Err(BlkError::DeviceBroken(Broken::Earlier)));
            }
        }
        // Submitters waiting for space must learn the queue is gone.
        for w in self.space_waiters.drain(..) {
            w.wake();
        }
        woke
    }

    /// Frees a slot and returns its staging buffer.
    fn release(&mut self, slot: u16) -> Option<Staging> {
        let s = &mut self.slots[usize::from(slot)];
        s.phase = Phase::Free;
        s.generation = s.generation.wrapping_add(1);
        s.waker = None;
        let b = s.staging.take();
        self.free.push(slot);
        for w in self.space_waiters.drain(..) {
            w.wake();
        }
        b
    }

    /// Takes up to `budget` raw results.
    pub(crate) fn take_ready(
        &mut self,
        mem: &GuestMemory,
        queue: u16,
        budget: usize,
        out: &mut Vec<Polled>,
    ) -> usize {
        let mut n = 0;
        while n < budget {
            let Some(slot) = self.ready.pop_front() else { break };
            let s = &mut self.slots[usize::from(slot)];
            let generation = s.generation;
            let Phase::Done(result) = std::mem::replace(&mut s.phase, Phase::Free) else {
                continue;
            };
            if let Some(b) = self.release(slot) {
                self.staging.give(mem, b);
            }
            out.push((
                RequestId {
                    queue,
                    slot,
                    generation,
                },
                result,
            ));
            n += 1;
        }
        n
    }

    /// Whether the waited-for request `id` has its result.
    pub(crate) fn is_done(&self, id: RequestId) -> bool {
        let s = &self.slots[usize::from(id.slot)];
        s.generation == id.generation && matches!(s.phase, Phase::Done(_))
    }

    /// Takes the result of the waited-for request `id`, with its staging buffer.
    pub(crate) fn take_done(
        &mut self,
        id: RequestId,
    ) -> Option<(Result<Completion, BlkError>, Option<Staging>)> {
        if !self.is_done(id) {
            return None;
        }
        let s = &mut self.slots[usize::from(id.slot)];
        let Phase::Done(result) = std::mem::replace(&mut s.phase, Phase::Free) else {
            return None;
        };
        let b = self.release(id.slot);
        Some((result, b))
    }

    /// The waiter of `id` gives up: its result, when it comes, is dropped, and the
    /// slot (with its staging buffer) is released only then.
    pub(crate) fn abandon(&mut self, mem: &GuestMemory, id: RequestId) {
        let s = &mut self.slots[usize::from(id.slot)];
        if s.generation != id.generation {
            return;
        }
        match s.phase {
            Phase::InFlight(_) => {
                s.phase = Phase::InFlight(Owner::Abandoned);
                s.waker = None;
            }
            Phase::Done(_) => {
                if let Some(b) = self.release(id.slot) {
                    self.staging.give(mem, b);
                }
            }
            Phase::Free => {}
        }
    }

    /// Registers the waker of the future waiting on `id`.
    pub(crate) fn set_waker(&mut self, id: RequestId, waker: &Waker) {
        let s = &mut self.slots[usize::from(id.slot)];
        if s.generation == id.generation && !s.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            s.waker = Some(waker.clone());
        }
    }

    /// Registers a future waiting for a free slot.
    pub(crate) fn wait_space(&mut self, waker: &Waker) {
        self.space_waiters.push(waker.clone());
    }

    /// After a device reset: takes every request back from the ring and releases
    /// all memory the queue owns to the guest allocator.
    pub(crate) fn teardown(&mut self, mem: &GuestMemory) {
        let _ = self.ring.reset();
        for slot in &mut self.slots {
            if let Some(b) = slot.staging.take() {
                self.staging.give(mem, b);
            }
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
        self.staging.drain(mem);
        let bytes = SLOT_BYTES * self.slots.len() as u64;
        if let Err(error) = mem.free(self.base, bytes) {
            tracing::error!(%error, "freeing request slots failed");
        }
    }
}

/// A queue: its state, the condition variable of blocked callers and its interrupt.
pub(crate) struct Queue<S: DriverShare, W> {
    pub(crate) index: u16,
    pub(crate) state: Mutex<QueueState<S>>,
    pub(crate) cond: Condvar,
    pub(crate) irq: W,
}

impl<S: DriverShare, W> Queue<S, W> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, QueueState<S>> {
        // Every method leaves the state consistent before anything could panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
