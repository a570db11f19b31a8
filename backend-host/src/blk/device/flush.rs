//! One `fdatasync` at a time per disk, shared by every queue (group commit), and the
//! latch that remembers a failed one (HOSTILE 40).
//!
//! Why serialize: the queue engines use duplicates of one open file, and Linux
//! reports a writeback error once per open file (`errseq_t` in the file): with two
//! `fdatasync` calls running at once, one sees `EIO` and the other `0`. Were both
//! flushes acknowledged by their own result, the second would tell the guest its
//! writes are safe while some are lost. With one sync at a time, every error reaches
//! the latch before any later flush completes, and each flush completes with the
//! latch as it stands at completion, not at submission.
//!
//! Why not let a flush that arrives while a sync runs share that sync's result: the
//! running sync may have started before writes the guest saw complete ahead of the
//! new flush, and `fdatasync` only covers writes that finished before it was called.
//! Such a flush waits for the next sync instead, which starts as soon as the running
//! one ends and covers every flush that arrived meanwhile, on every queue.
//!
//! The latch outlives device resets and vhost-user reconnects (it lives as long as
//! the device object, which owns the disk): a reset must not turn lost writes into
//! a clean disk (virtio 1.2 §5.2.6.3 asks only that a flush not report success for
//! data that is not durable; after a failed `fdatasync` nobody knows which data is).
//! [`super::BlkDevice::clear_flush_failure`] is the operator's way out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use virtio_core::notify::{EventFdNotifier, Notify};

/// What a flush must do now ([`FlushGate::request`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ticket {
    /// Start sync number `epoch` now and report it with [`FlushGate::finished`].
    Start(u64),
    /// A sync runs; the flush is covered once sync number `epoch` has finished.
    Wait(u64),
}

#[derive(Debug, Default)]
struct State {
    /// The number the next sync to start gets (syncs count from 1).
    next: u64,
    /// The sync running, if any.
    running: Option<u64>,
    /// Every sync up to this number has finished.
    done: u64,
    /// Wake-ups of the queue workers, told whenever a sync finishes.
    waiters: Vec<(u64, Arc<EventFdNotifier>)>,
    next_waiter: u64,
}

/// The device's flush serializer and failed-flush latch, shared by its queues.
#[derive(Debug)]
pub(crate) struct FlushGate {
    state: Mutex<State>,
    failed: AtomicBool,
}

impl Default for FlushGate {
    fn default() -> Self {
        FlushGate {
            state: Mutex::new(State {
                next: 1,
                ..State::default()
            }),
            failed: AtomicBool::new(false),
        }
    }
}

impl FlushGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section leaves the state consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a worker's wake-up; returns the id to [`Self::unregister`] it with.
    pub(crate) fn register(&self, wake: Arc<EventFdNotifier>) -> u64 {
        let mut st = self.lock();
        let id = st.next_waiter;
        st.next_waiter += 1;
        st.waiters.push((id, wake));
        id
    }

    /// Forgets a worker's wake-up.
    pub(crate) fn unregister(&self, id: u64) {
        self.lock().waiters.retain(|(i, _)| *i != id);
    }

    /// A flush arrived (or flushes are still waiting): start a sync if none runs,
    /// else wait for the one after the running sync.
    pub(crate) fn request(&self) -> Ticket {
        let mut st = self.lock();
        match st.running {
            None => {
                let epoch = st.next;
                st.next += 1;
                st.running = Some(epoch);
                Ticket::Start(epoch)
            }
            // The next sync to start will be number `next`.
            Some(_) => Ticket::Wait(st.next),
        }
    }

    /// Sync `epoch` finished (`ok`: it succeeded). Latches a failure before anyone
    /// can see the sync as finished, then wakes every worker but `from` (the one
    /// reporting, which goes on to finish its own requests; `None` wakes all).
    pub(crate) fn finished(&self, epoch: u64, ok: bool, from: Option<u64>) {
        if !ok {
            self.failed.store(true, Ordering::Release);
        }
        let mut st = self.lock();
        st.done = st.done.max(epoch);
        if st.running == Some(epoch) {
            st.running = None;
        }
        // Eventfd writes never block; doing them under the lock saves collecting
        // the waiters on every flush.
        for (id, w) in &st.waiters {
            if Some(*id) == from {
                continue;
            }
            if let Err(e) = w.notify() {
                tracing::error!(error = %e, "cannot wake a queue worker after a flush");
            }
        }
    }

    /// `(done, next)`: every sync up to `done` has finished, every sync below `next`
    /// has started (one lock for a worker's whole list of waiting requests).
    pub(crate) fn progress(&self) -> (u64, u64) {
        let st = self.lock();
        (st.done, st.next)
    }

    /// Whether a sync failed since the latch was last cleared.
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Clears the latch (an operator decision: see the module docs).
    pub(crate) fn clear(&self) {
        self.failed.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sync_at_a_time_and_later_flushes_wait_for_the_next() {
        let g = FlushGate::default();
        assert_eq!(g.request(), Ticket::Start(1));
        // Arrives while sync 1 runs: covered only by sync 2.
        assert_eq!(g.request(), Ticket::Wait(2));
        assert_eq!(g.progress(), (0, 2), "sync 1 started, none finished");
        g.finished(1, true, None);
        assert_eq!(g.progress(), (1, 2), "sync 1 finished, sync 2 not started");
        assert_eq!(g.request(), Ticket::Start(2));
        g.finished(2, false, None);
        assert_eq!(g.progress().0, 2);
        assert!(g.failed(), "a failed sync latches");
        g.clear();
        assert!(!g.failed());
    }

    #[test]
    fn finishing_wakes_every_registered_worker() {
        let g = FlushGate::default();
        let a = Arc::new(EventFdNotifier::new().unwrap());
        let b = Arc::new(EventFdNotifier::new().unwrap());
        let c = Arc::new(EventFdNotifier::new().unwrap());
        let _ = g.register(a.clone());
        let id_b = g.register(b.clone());
        let id_c = g.register(c.clone());
        g.unregister(id_b);
        let Ticket::Start(e) = g.request() else {
            panic!("no sync was running")
        };
        g.finished(e, true, Some(id_c));
        use virtio_core::notify::Wait;
        assert!(a.take().unwrap() > 0);
        assert_eq!(b.take().unwrap(), 0, "unregistered workers are not woken");
        assert_eq!(c.take().unwrap(), 0, "the reporting worker is not woken");
    }
}
