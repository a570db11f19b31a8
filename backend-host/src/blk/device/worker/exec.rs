//! Request execution, the worker's data path: from a popped chain to engine ops
//! (`start`; `pump` hands READ/WRITE data to the engine within the queue's byte
//! budget, copying what a WRITE carries out of guest memory), from their completions
//! to the request's status and used entry (`complete_op`, `finish`), and the disk
//! syncs a FLUSH, or a WRITE_ZEROES in writethrough mode, waits for through the
//! device's [`FlushGate`] (`sync_progress`). A chain the parser refuses gets its
//! status byte only (`reject`; the worker's module docs say why).
//!
//! [`FlushGate`]: crate::blk::device::flush::FlushGate

use super::Worker;
use crate::blk::device::flush::Ticket;
use crate::blk::device::{CHUNK, CacheMode};
use crate::blk::engine::{AlignedBuf, Completion, IoKind, IoOp};
use crate::blk::limit::Throttled;
use crate::blk::request::{Reject, Request, RequestKind};
use std::time::Duration;
use virtio_core::DeviceMemory;
use virtio_core::blk::Status;
use virtio_core::ring::Chain;

/// Tag bit of an op that is a disk sync run for the [`FlushGate`] (the bits below
/// are the sync's number); other tags are a slot (low 32 bits) and a chunk index
/// (the next 20). All stay below [`crate::blk::engine::TAG_RESERVED`].
///
/// [`FlushGate`]: crate::blk::device::flush::FlushGate
pub(super) const SYNC_TAG: u64 = 1 << 52;

/// A request being executed: its chain (owned until it is returned as used) and how
/// many engine ops are still to finish.
pub(super) struct InFlight {
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

impl<M: DeviceMemory + Send> Worker<M> {
    /// Parses a chain and either completes it at once or starts its ops.
    pub(super) fn start(&mut self, chain: Chain) {
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
    pub(super) fn pump(&mut self) {
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
            // The whole request's tokens before its first chunk, checked last so
            // that taking them is followed by submitting that chunk.
            if at == 0 && !self.draining && !self.tokens_for(write, len) {
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

    /// Takes from the rate limiter what a request of `len` bytes needs; if the
    /// tokens are not there, arms the timer for when they are and says no.
    fn tokens_for(&mut self, write: bool, len: u32) -> bool {
        let Some((limiter, timer)) = &self.limiter else {
            return true;
        };
        let wait = match limiter.try_take(write, u64::from(len)) {
            Ok(()) => return true,
            Err(Throttled::For(wait)) => wait,
            // Only new limits let it through: look again in a second.
            Err(Throttled::UntilChanged) => Duration::from_secs(1),
        };
        if let Err(error) = timer.arm(wait) {
            tracing::error!(queue = self.index, %error, "arming the rate-limit timer failed: not limiting");
            return true;
        }
        false
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

    /// Completes a chain the parser refused: the status byte only (see the worker's
    /// module docs), and the whole writable part as the used length, as QEMU does
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

    pub(super) fn complete_op(&mut self, c: Completion) {
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

    /// Finishes the requests whose sync has finished, and asks the gate for one for
    /// those still waiting: a sync starts here if none runs anywhere.
    pub(super) fn sync_progress(&mut self) {
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
}
