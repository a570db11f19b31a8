//! Adaptive polling for device workers, with a back-off when the CPU is shared.
//!
//! A worker that has just served something keeps polling its rings (and its I/O
//! engine) for a while instead of sleeping on its eventfds: a sleep and a wake-up
//! across cores cost tens of microseconds (docs/PERF.md), more than a disk read of the
//! page cache or a frame hand-off. That only pays while the poller has a core to
//! itself. When it shares one (more busy threads than cores: the guest driver it
//! waits for, other work on the machine), every microsecond it spins is taken from
//! the thread it is waiting for, and the pair collapses to a fraction of what
//! sleeping would give.
//!
//! So the poller watches the gaps between its own rounds: a round that follows the
//! previous one by [`STOLEN`] or more means the scheduler gave the core to another
//! thread for a time slice meanwhile (an idle round takes well under a
//! microsecond). The session then ends, and polling is off for a back-off period
//! that doubles while contention persists (from [`BACKOFF_MIN`] to [`BACKOFF_MAX`])
//! and is forgotten after a session without contention. While backing off the
//! worker sleeps on its eventfds, as with polling disabled. Short absences are no
//! reason to stop: they are kernel work done on this core on our behalf (an
//! io_uring worker running an `fdatasync`). Spinning does not yield: a yield per
//! round costs a system call and delays the completion it waits for, and a thread
//! the poller waits for is woken with preemption anyway.

use std::time::{Duration, Instant};

/// A gap this long between two rounds means another thread had the core for a
/// scheduler time slice.
pub(crate) const STOLEN: Duration = Duration::from_millis(1);
/// First back-off after a contended session.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(1);
/// Longest back-off.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Adaptive-polling state of one worker.
#[derive(Debug)]
pub(crate) struct Poller {
    budget: Duration,
    backoff: Duration,
    off_until: Option<Instant>,
    contended_sessions: u64,
}

/// One polling session, from [`Poller::start`] to [`Poller::end`].
#[derive(Debug)]
pub(crate) struct Session {
    last_work: Instant,
    last_round: Instant,
    contended: bool,
}

impl Poller {
    /// Polls for `budget` after the last work found; zero never polls.
    pub(crate) fn new(budget: Duration) -> Poller {
        Poller {
            budget,
            backoff: Duration::ZERO,
            off_until: None,
            contended_sessions: 0,
        }
    }

    /// A session, unless polling is disabled or backing off.
    pub(crate) fn start(&mut self) -> Option<Session> {
        if self.budget.is_zero() {
            return None;
        }
        let now = Instant::now();
        if self.off_until.is_some_and(|t| now < t) {
            return None;
        }
        self.off_until = None;
        Some(Session {
            last_work: now,
            last_round: now,
            contended: false,
        })
    }

    /// One poll round found `work` (or not): whether to keep polling.
    pub(crate) fn keep_polling(&self, s: &mut Session, work: bool) -> bool {
        let now = Instant::now();
        let gap = now.duration_since(s.last_round);
        s.last_round = now;
        if gap >= STOLEN {
            s.contended = true;
            return false;
        }
        if work {
            s.last_work = now;
            return true;
        }
        if now.duration_since(s.last_work) >= self.budget {
            return false;
        }
        std::hint::spin_loop();
        true
    }

    /// Ends a session: backs off if it met contention, forgets the back-off if not.
    pub(crate) fn end(&mut self, s: Session) {
        if s.contended {
            self.backoff = (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
            self.off_until = Some(Instant::now() + self.backoff);
            self.contended_sessions += 1;
            tracing::trace!(
                backoff_us = self.backoff.as_micros(),
                "core shared; polling backs off"
            );
        } else {
            self.backoff = Duration::ZERO;
        }
    }

    /// Sessions that ended because the core was shared.
    pub(crate) fn contended_sessions(&self) -> u64 {
        self.contended_sessions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_budget_never_polls() {
        assert!(Poller::new(Duration::ZERO).start().is_none());
    }

    #[test]
    fn polls_while_work_comes_and_stops_after_the_budget() {
        let mut p = Poller::new(Duration::from_millis(2));
        let mut s = p.start().unwrap();
        let t = Instant::now();
        assert!(p.keep_polling(&mut s, true));
        while p.keep_polling(&mut s, false) {
            assert!(t.elapsed() < Duration::from_secs(5), "the budget ends polling");
        }
        // Either the budget ran out or the test thread lost its core meanwhile.
        assert!(t.elapsed() >= Duration::from_millis(2) || s.contended);
        p.end(s);
    }

    #[test]
    fn contention_backs_off_doubling_and_a_clean_session_forgets_it() {
        let mut p = Poller::new(Duration::from_millis(1));
        let contended = || Session {
            last_work: Instant::now(),
            last_round: Instant::now(),
            contended: true,
        };
        p.end(contended());
        assert_eq!(p.backoff, BACKOFF_MIN);
        assert!(p.start().is_none(), "backing off");
        p.end(contended());
        assert_eq!(p.backoff, BACKOFF_MIN * 2);
        for _ in 0..20 {
            p.end(contended());
        }
        assert_eq!(p.backoff, BACKOFF_MAX);
        assert_eq!(p.contended_sessions(), 22);
        // Once the back-off has passed, polling resumes; a clean session resets it.
        p.off_until = Some(Instant::now());
        let s = p.start().expect("back-off over");
        p.end(s);
        assert_eq!(p.backoff, Duration::ZERO);
    }

    #[test]
    fn a_poller_preempted_by_a_thread_on_its_core_notices_contention() {
        // A thread that keeps this one's core busy: on a machine with more cores
        // than runnable threads the poller is never preempted, so pin both to one
        // core.
        let Some(core) = core_affinity::get_core_ids().and_then(|c| c.first().copied()) else {
            virtio_core::test_utils::skip(
                "a_poller_preempted_by_a_thread_on_its_core_notices_contention",
                "cannot read this thread's CPU affinity",
            );
            return;
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hog = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                core_affinity::set_for_current(core);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        assert!(core_affinity::set_for_current(core));
        let mut p = Poller::new(Duration::from_secs(10));
        let mut s = p.start().expect("polling on");
        let t = Instant::now();
        while p.keep_polling(&mut s, false) && t.elapsed() < Duration::from_secs(5) {}
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        hog.join().unwrap();
        assert!(s.contended, "a spinning thread on the same core is noticed");
        p.end(s);
        assert!(p.start().is_none(), "and polling backs off");
    }

    /// Polls without work until the poller stops; the longest gap between two
    /// rounds as the caller saw it: from just before one call to just after the
    /// next, which contains the gap the poller measured between them.
    fn poll_idle(p: &Poller, s: &mut Session, since: Instant) -> Duration {
        let mut longest = Duration::ZERO;
        let mut before_last = since;
        loop {
            let before = Instant::now();
            let more = p.keep_polling(s, false);
            longest = longest.max(before.elapsed() + before.duration_since(before_last));
            before_last = before;
            if !more {
                return longest;
            }
        }
    }

    #[test]
    fn a_poller_alone_keeps_polling_until_the_budget() {
        let budget = Duration::from_millis(20);
        let mut p = Poller::new(budget);
        let t = Instant::now();
        let mut s = p.start().expect("polling on");
        let longest_gap = poll_idle(&p, &mut s, t);
        // On a loaded machine the thread may lose its core meanwhile, and then the
        // session ends as contended. But only if it did: a gap of STOLEN between
        // two rounds must really have happened. Otherwise polling went on for the
        // whole budget, as seen from outside.
        if s.contended {
            assert!(
                longest_gap >= STOLEN,
                "contention claimed, but no gap of {STOLEN:?} between rounds (longest {longest_gap:?})"
            );
        } else {
            assert!(
                t.elapsed() >= budget,
                "stopped after {:?}, before the budget",
                t.elapsed()
            );
        }
        assert!(s.contended || s.last_work.elapsed() >= Duration::from_millis(20));
    }
}
