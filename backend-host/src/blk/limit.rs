//! Rate limits for block devices: token buckets for operations and bytes, for reads,
//! writes or both, with a burst and a one-time burst, changeable while the device
//! runs and shared by every device (and queue) given the same [`RateLimiter`].
//!
//! A READ or WRITE takes one operation and its length in bytes from every bucket
//! that applies to it (the read or write bucket and the one for both) before its
//! first byte moves. One that does not fit waits in its queue's backlog, and the
//! queue pops nothing more meanwhile, so requests keep their order and a FLUSH is
//! still served only after the writes made available before it. The worker sleeps
//! on a timer until the tokens are there: no busy-waiting. Other requests (FLUSH,
//! DISCARD, WRITE_ZEROES, GET_ID) are not limited.
//!
//! Tokens accrue continuously at the configured rate up to the burst. A bucket
//! starts full. A request larger than the burst is let through once the bucket is
//! full and leaves it in debt, so limits stay exact over time whatever the request
//! sizes: over `t` seconds a bucket passes at most `burst + one_time_burst + rate * t`
//! (plus one request).
//!
//! ```
//! use backend_host::blk::limit::{Bucket, Limits, RateLimiter};
//! // 3000 operations per second for reads and writes together, at most 30 at once.
//! let limiter = RateLimiter::new(Limits {
//!     ops: Some(Bucket::new(3000).with_burst(30)),
//!     ..Limits::default()
//! });
//! // Later, while the devices run: lift it.
//! limiter.set(Limits::default());
//! ```

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One token bucket: `rate` tokens per second, at most `burst` stored, plus a
/// one-time burst spent first and never refilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Tokens (operations or bytes) per second; 0 lets nothing through after the
    /// bursts.
    pub rate: u64,
    /// Most tokens the bucket holds (at least 1).
    pub burst: u64,
    /// Extra tokens available once, before the bucket's own.
    pub one_time_burst: u64,
}

impl Bucket {
    /// `rate` per second, with a burst of a hundredth of a second's worth (at
    /// least 1) and no one-time burst.
    #[must_use]
    pub fn new(rate: u64) -> Self {
        Bucket {
            rate,
            burst: (rate / 100).max(1),
            one_time_burst: 0,
        }
    }

    /// The same bucket holding at most `burst` tokens.
    #[must_use]
    pub fn with_burst(mut self, burst: u64) -> Self {
        self.burst = burst.max(1);
        self
    }

    /// The same bucket with `tokens` more available once.
    #[must_use]
    pub fn with_one_time_burst(mut self, tokens: u64) -> Self {
        self.one_time_burst = tokens;
        self
    }
}

/// The limits of a [`RateLimiter`]: each bucket that is set applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Operations, reads and writes together.
    pub ops: Option<Bucket>,
    /// Read operations.
    pub read_ops: Option<Bucket>,
    /// Write operations.
    pub write_ops: Option<Bucket>,
    /// Bytes, read and written together.
    pub bytes: Option<Bucket>,
    /// Bytes read.
    pub read_bytes: Option<Bucket>,
    /// Bytes written.
    pub write_bytes: Option<Bucket>,
}

impl Limits {
    /// Whether no bucket is set.
    #[must_use]
    pub fn is_unlimited(&self) -> bool {
        *self == Limits::default()
    }
}

/// A bucket's level, in millionths of a token so that slow rates accrue exactly.
#[derive(Debug, Clone, Copy)]
struct Level {
    cfg: Bucket,
    /// Millionths of a token; negative after a request larger than the burst.
    micro: i128,
    one_time: u64,
}

const MICRO: i128 = 1_000_000;

impl Level {
    fn new(cfg: Bucket) -> Self {
        Level {
            cfg,
            micro: i128::from(cfg.burst) * MICRO,
            one_time: cfg.one_time_burst,
        }
    }

    fn refill(&mut self, elapsed: Duration) {
        let cap = i128::from(self.cfg.burst) * MICRO;
        let add = i128::from(self.cfg.rate) * elapsed.as_micros() as i128;
        self.micro = (self.micro + add).min(cap);
    }

    /// How long until `cost` tokens can be taken; zero if now.
    fn wait(&self, cost: u64) -> Option<Duration> {
        let cost = i128::from(cost.saturating_sub(self.one_time)) * MICRO;
        let full = i128::from(self.cfg.burst) * MICRO;
        // A request larger than the burst goes once the bucket is full.
        let need = cost.min(full);
        if self.micro >= need {
            return Some(Duration::ZERO);
        }
        if self.cfg.rate == 0 {
            return None;
        }
        let missing = need - self.micro;
        let rate = i128::from(self.cfg.rate);
        // Round up to the microsecond the tokens are there.
        let us = (missing + rate - 1) / rate;
        Some(Duration::from_micros(u64::try_from(us).unwrap_or(u64::MAX)))
    }

    fn take(&mut self, cost: u64) {
        let from_once = cost.min(self.one_time);
        self.one_time -= from_once;
        self.micro -= i128::from(cost - from_once) * MICRO;
    }
}

#[derive(Debug)]
struct State {
    limits: Limits,
    levels: [Option<Level>; 6],
    last: Instant,
}

impl State {
    fn new(limits: Limits, now: Instant) -> Self {
        let l = limits;
        State {
            limits,
            levels: [
                l.ops,
                l.read_ops,
                l.write_ops,
                l.bytes,
                l.read_bytes,
                l.write_bytes,
            ]
            .map(|b| b.map(Level::new)),
            last: now,
        }
    }
}

/// Why a request cannot go yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    /// The tokens are there after this long.
    For(Duration),
    /// A bucket with rate 0 has not enough left: only a change of the limits lets
    /// the request through.
    UntilChanged,
}

/// Token buckets shared by every device and queue given the same limiter (a group).
/// See the module docs.
#[derive(Debug)]
pub struct RateLimiter {
    state: Mutex<State>,
}

impl RateLimiter {
    /// A limiter with `limits`, every bucket full.
    #[must_use]
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(RateLimiter {
            state: Mutex::new(State::new(limits, Instant::now())),
        })
    }

    /// Replaces the limits while the devices run; every bucket starts full.
    /// Requests waiting for tokens are looked at again within the time they were
    /// told to wait (at most a second when the old limits could not say).
    pub fn set(&self, limits: Limits) {
        *self.lock() = State::new(limits, Instant::now());
    }

    /// The limits in force.
    #[must_use]
    pub fn limits(&self) -> Limits {
        self.lock().limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes what a read (`write` false) or write of `bytes` needs from every
    /// bucket that applies, or nothing and says how long to wait.
    pub fn try_take(&self, write: bool, bytes: u64) -> Result<(), Throttled> {
        self.try_take_at(write, bytes, Instant::now())
    }

    fn try_take_at(&self, write: bool, bytes: u64, now: Instant) -> Result<(), Throttled> {
        let mut st = self.lock();
        let elapsed = now.saturating_duration_since(st.last);
        st.last = now.max(st.last);
        // ops, read_ops, write_ops, bytes, read_bytes, write_bytes
        let costs = [
            Some(1),
            (!write).then_some(1),
            write.then_some(1),
            Some(bytes),
            (!write).then_some(bytes),
            write.then_some(bytes),
        ];
        let mut wait = Duration::ZERO;
        for (level, cost) in st.levels.iter_mut().zip(costs) {
            let (Some(level), Some(cost)) = (level, cost) else {
                continue;
            };
            level.refill(elapsed);
            match level.wait(cost) {
                Some(w) => wait = wait.max(w),
                None => return Err(Throttled::UntilChanged),
            }
        }
        if !wait.is_zero() {
            return Err(Throttled::For(wait));
        }
        for (level, cost) in st.levels.iter_mut().zip(costs) {
            if let (Some(level), Some(cost)) = (level, cost) {
                level.take(cost);
            }
        }
        Ok(())
    }
}

/// A one-shot timer a queue worker sleeps on while its requests wait for tokens: a
/// Linux timerfd, so the worker's event loop waits on it like on its other
/// descriptors, whatever runtime it runs on (tokio's own timers need a runtime
/// built with them).
#[derive(Debug)]
pub(crate) struct Timer(std::os::fd::OwnedFd);

impl Timer {
    pub(crate) fn new() -> std::io::Result<Self> {
        use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        Ok(Timer(fd))
    }

    /// Fires once, `after` from now (at least a microsecond: zero would disarm it).
    pub(crate) fn arm(&self, after: Duration) -> std::io::Result<()> {
        use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
        let after = after.max(Duration::from_micros(1));
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec {
                tv_sec: i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(after.subsec_nanos()),
            },
        };
        timerfd_settime(&self.0, TimerfdTimerFlags::empty(), &spec)?;
        Ok(())
    }

    /// Reads the expiry count, so the descriptor is not readable until the next.
    pub(crate) fn take(&self) {
        let mut buf = [0u8; 8];
        // Nothing to read (EAGAIN) just means it has not fired.
        let _ = rustix::io::read(&self.0, &mut buf);
    }
}

impl std::os::fd::AsFd for Timer {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_bucket_lets_its_burst_through_then_its_rate() {
        let l = RateLimiter::new(Limits {
            ops: Some(Bucket::new(1000).with_burst(10)),
            ..Limits::default()
        });
        let t0 = l.lock().last;
        for _ in 0..10 {
            l.try_take_at(false, 4096, t0).unwrap();
        }
        assert_eq!(
            l.try_take_at(false, 4096, t0),
            Err(Throttled::For(Duration::from_millis(1)))
        );
        // 1000/s: one more each millisecond, and never more than the burst.
        l.try_take_at(false, 4096, at(t0, 1)).unwrap();
        assert!(l.try_take_at(false, 4096, at(t0, 1)).is_err());
        let mut passed = 0;
        for ms in 2..=1001 {
            while l.try_take_at(true, 4096, at(t0, ms)).is_ok() {
                passed += 1;
            }
        }
        assert_eq!(passed, 1000, "a second at 1000/s");
    }

    #[test]
    fn reads_and_writes_take_from_their_own_buckets_and_the_shared_one() {
        let l = RateLimiter::new(Limits {
            read_ops: Some(Bucket::new(0).with_burst(2)),
            bytes: Some(Bucket::new(0).with_burst(10_000)),
            ..Limits::default()
        });
        let t0 = l.lock().last;
        l.try_take_at(false, 4096, t0).unwrap();
        l.try_take_at(false, 4096, t0).unwrap();
        assert_eq!(
            l.try_take_at(false, 1, t0),
            Err(Throttled::UntilChanged),
            "reads spent"
        );
        // Writes are not read operations, but share the bytes: 1808 left.
        assert_eq!(l.try_take_at(true, 4096, t0), Err(Throttled::UntilChanged));
        l.try_take_at(true, 1808, t0).unwrap();
    }

    #[test]
    fn a_request_larger_than_the_burst_goes_when_full_and_leaves_a_debt() {
        let l = RateLimiter::new(Limits {
            bytes: Some(Bucket::new(1 << 20).with_burst(64 << 10)),
            ..Limits::default()
        });
        let t0 = l.lock().last;
        l.try_take_at(true, 1 << 20, t0).unwrap();
        // 960 KiB of debt plus 4 KiB: 964 KiB at 1 MiB/s.
        assert_eq!(
            l.try_take_at(true, 4096, t0),
            Err(Throttled::For(Duration::from_micros(941_407)))
        );
        l.try_take_at(true, 4096, at(t0, 942)).unwrap();
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_once() {
        let l = RateLimiter::new(Limits {
            ops: Some(Bucket::new(0).with_burst(1).with_one_time_burst(3)),
            ..Limits::default()
        });
        let t0 = l.lock().last;
        for _ in 0..4 {
            l.try_take_at(false, 0, t0).unwrap();
        }
        assert_eq!(
            l.try_take_at(false, 0, at(t0, 10_000)),
            Err(Throttled::UntilChanged)
        );
        l.set(Limits::default());
        assert!(l.limits().is_unlimited());
        l.try_take_at(false, 0, t0).unwrap();
    }
}
