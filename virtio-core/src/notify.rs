//! Notifications: available-buffer kicks (driver → device) and used-buffer
//! interrupts (device → driver), virtio 1.2 §2.3.
//!
//! A notification carries no payload, only "look at the ring again", so both
//! halves are modelled as a counter: [`Notify::notify`] adds one,
//! [`Wait::take`] / [`Wait::wait`] read and reset it. Notifications that arrive
//! while nobody is looking coalesce; none is ever lost.
//!
//! Two transports are provided:
//!
//! * [`EventFdNotifier`]: a Linux eventfd. It can be registered with an event
//!   loop (tokio's `AsyncFd`, epoll) and passed to another process (the
//!   vhost-user `SET_VRING_KICK` / `SET_VRING_CALL` fds, KVM ioeventfd/irqfd).
//! * [`InProcessNotifier`]: two threads in one process. A notify is one atomic
//!   add, plus a condvar wake only when the other side is parked.
//!
//! Whether to notify at all is the ring's business: with
//! `VIRTIO_F_EVENT_IDX` negotiated, the rule is [`need_event`] (virtio 1.2
//! §2.7.7 and §2.7.10).

// Nothing here needs `unsafe`: rustix and std wrap every syscall used.
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::fs::OFlags;
use rustix::io::{Errno, FdFlags};

/// Errors raised while sending or receiving a notification.
///
/// Only the eventfd transport can fail; [`InProcessNotifier`] never returns
/// an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotifyError {
    /// `eventfd(2)` failed (e.g. the process ran out of file descriptors).
    #[error("Could not create the eventfd")]
    Create(#[source] io::Error),
    /// Duplicating the eventfd failed.
    #[error("Could not duplicate the eventfd")]
    Duplicate(#[source] io::Error),
    /// An adopted descriptor could not be made non-blocking and close-on-exec.
    #[error("Could not configure the adopted eventfd")]
    Adopt(#[source] io::Error),
    /// Writing to the eventfd failed.
    #[error("Could not write to the eventfd")]
    Write(#[source] io::Error),
    /// Reading the eventfd failed.
    #[error("Could not read the eventfd")]
    Read(#[source] io::Error),
    /// Polling the eventfd failed.
    #[error("Could not poll the eventfd")]
    Poll(#[source] io::Error),
    /// A read transferred fewer than the 8 bytes an eventfd always returns,
    /// so the adopted descriptor is not an eventfd.
    #[error("Eventfd read returned {len} bytes instead of 8")]
    ShortRead {
        /// Bytes actually read.
        len: usize,
    },
    /// A write transferred fewer than the 8 bytes an eventfd always takes,
    /// so the adopted descriptor is not an eventfd.
    #[error("Eventfd write took {len} bytes instead of 8")]
    ShortWrite {
        /// Bytes actually written.
        len: usize,
    },
}

/// The sending half of a notification channel.
///
/// Cheap and callable from any thread. Sending when a notification is
/// already pending is fine: notifications coalesce.
pub trait Notify: Send + Sync {
    /// Signals the other side that the ring has something new for it.
    fn notify(&self) -> Result<(), NotifyError>;
}

/// The receiving half of a notification channel.
pub trait Wait: Send + Sync {
    /// Returns the number of notifications since the last `take` (or
    /// `wait`), resetting it to zero. Returns 0 if none; never blocks.
    fn take(&self) -> Result<u64, NotifyError>;

    /// Blocks until at least one notification is pending, then consumes them
    /// all and returns how many there were.
    ///
    /// With `Some(timeout)`, returns `Ok(0)` if nothing arrived in time;
    /// `Some(Duration::ZERO)` behaves like [`Wait::take`].
    fn wait(&self, timeout: Option<Duration>) -> Result<u64, NotifyError>;
}

impl<T: Notify + ?Sized> Notify for Arc<T> {
    fn notify(&self) -> Result<(), NotifyError> {
        (**self).notify()
    }
}

impl<T: Notify + ?Sized> Notify for &T {
    fn notify(&self) -> Result<(), NotifyError> {
        (**self).notify()
    }
}

impl<T: Wait + ?Sized> Wait for Arc<T> {
    fn take(&self) -> Result<u64, NotifyError> {
        (**self).take()
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<u64, NotifyError> {
        (**self).wait(timeout)
    }
}

impl<T: Wait + ?Sized> Wait for &T {
    fn take(&self) -> Result<u64, NotifyError> {
        (**self).take()
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<u64, NotifyError> {
        (**self).wait(timeout)
    }
}

/// Decides whether a notification must be sent under `VIRTIO_F_EVENT_IDX`.
///
/// `old_idx` is the ring index at the previous check, `new_idx` the index
/// just published, so entries `old_idx..new_idx` (mod 2^16) form the batch
/// written since. `event_idx` is the other side's `used_event` (virtio 1.2
/// §2.7.7: the device notifies after writing the used entry at that index) or
/// `avail_event` (§2.7.10: the driver notifies after writing the available
/// entry at that index). The function returns true exactly when `event_idx`
/// lies in the half-open window `[old_idx, new_idx)` modulo 2^16, i.e. when
/// the index moved past `event_idx` during this batch. This is Linux's
/// `vring_need_event`.
///
/// Why the wrapping arithmetic is right: let `d = new - old` and
/// `e = new - event - 1`, both mod 2^16. `event = old + k` with `0 <= k < d`
/// gives `e = d - k - 1`, which runs over `0..d`; every other `event` gives
/// `e` in `d..2^16`. So `e < d` is the window test, whatever the wrap: the
/// subtractions measure distances backwards from `new`, and distances are
/// invariant under the 2^16 wrap. Batching is what makes a single comparison
/// necessary: the index jumps by `d`, not by one, so "index == event" would
/// miss an event that falls inside the batch. The one requirement is
/// `d < 2^16`, which holds because a side checks at least once per batch and
/// a batch is bounded by the queue size (at most 32768, §2.7).
#[inline]
#[must_use]
pub fn need_event(event_idx: u16, new_idx: u16, old_idx: u16) -> bool {
    new_idx.wrapping_sub(event_idx).wrapping_sub(1) < new_idx.wrapping_sub(old_idx)
}

/// What a driver sends with an available-buffer notification once
/// `VIRTIO_F_NOTIFICATION_DATA` is negotiated (virtio 1.2 §2.9): the queue, and
/// where the driver will make its next buffer available. On the wire it is one
/// little-endian 32-bit value, `vqn` in bits 0-15, `next_off` in bits 16-30 and
/// `next_wrap` in bit 31.
///
/// `next` holds `next_off` and `next_wrap` as the ring's own 16-bit position: the
/// available index for a split ring (whose bit 15 is `next_wrap`), the slot with
/// the driver's wrap counter in bit 15 for a packed ring, the encoding of
/// [`DeviceRing::next_avail`](crate::DeviceRing::next_avail) and
/// [`DriverRing::next_avail`](crate::DriverRing::next_avail). A device never acts
/// on it alone: a register holds only the latest write, so it is a hint at most,
/// and every chain is found through the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NotificationData {
    /// The queue notified (`vqn`; `VIRTIO_F_NOTIF_CONFIG_DATA` is not offered).
    pub vqn: u16,
    /// `next_off | next_wrap << 15`.
    pub next: u16,
}

impl NotificationData {
    /// The 32-bit value a driver writes (§2.9).
    #[must_use]
    pub fn to_bits(self) -> u32 {
        u32::from(self.vqn) | u32::from(self.next) << 16
    }

    /// The value a device read; every 32-bit value is one.
    #[must_use]
    pub fn from_bits(bits: u32) -> Self {
        let [a, b, c, d] = bits.to_le_bytes();
        NotificationData {
            vqn: u16::from_le_bytes([a, b]),
            next: u16::from_le_bytes([c, d]),
        }
    }
}

/// The notification data of one queue, where a transport that carries it leaves it
/// for the device: the driver side stores the latest before it kicks, the device
/// side reads it once woken (a doorbell register that holds what was last written;
/// kicks coalesce, and the latest data covers every earlier one).
#[derive(Debug, Clone, Default)]
pub struct NotifyRegister(Arc<AtomicU64>);

/// Set in the register once a value was written.
const REGISTER_WRITTEN: u64 = 1 << 32;

impl NotifyRegister {
    /// An empty register.
    #[must_use]
    pub fn new() -> Self {
        NotifyRegister::default()
    }

    /// Stores `data`, to be read after the kick that follows.
    pub fn write(&self, data: NotificationData) {
        // Release: pairs with the Acquire in `read`; the kick that follows orders
        // it before the device wakes anyway.
        self.0
            .store(REGISTER_WRITTEN | u64::from(data.to_bits()), Ordering::Release);
    }

    /// Forgets what was written (a new device instance starts with none).
    pub fn clear(&self) {
        self.0.store(0, Ordering::Release);
    }

    /// The latest data written, if any.
    #[must_use]
    pub fn read(&self) -> Option<NotificationData> {
        let v = self.0.load(Ordering::Acquire);
        let bits = u32::try_from(v & 0xffff_ffff).unwrap_or(0);
        (v & REGISTER_WRITTEN != 0).then(|| NotificationData::from_bits(bits))
    }
}

/// A notification channel backed by a Linux eventfd.
///
/// The eventfd's 64-bit counter is the pending-notification count: `notify`
/// adds one, `take` reads and zeroes it. The descriptor is always
/// non-blocking and close-on-exec; readiness for reading means "at least one
/// notification pending", so it can be registered with tokio's `AsyncFd` or
/// epoll through [`AsFd`] / [`AsRawFd`] and handed to another process.
/// Both traits are implemented on the same type since an eventfd is
/// bidirectional; use [`EventFdNotifier::try_clone`] to give each side its
/// own handle.
///
/// The notifier owns its descriptor and never replaces or closes it before
/// being dropped or turned into an [`OwnedFd`]: `as_raw_fd` returns the same
/// open eventfd for the notifier's whole lifetime, which is the contract
/// `tokio::io::unix::AsyncFd::register` asks its caller to uphold.
#[derive(Debug)]
pub struct EventFdNotifier {
    fd: OwnedFd,
}

impl EventFdNotifier {
    /// Creates a fresh eventfd with no pending notification.
    pub fn new() -> Result<Self, NotifyError> {
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| NotifyError::Create(e.into()))?;
        Ok(Self { fd })
    }

    /// Adopts an eventfd created elsewhere, e.g. received over vhost-user
    /// (`SET_VRING_KICK` / `SET_VRING_CALL`) or from a VMM.
    ///
    /// Sets `O_NONBLOCK` and `FD_CLOEXEC`, which `take` relies on to never
    /// block. `O_NONBLOCK` lives on the open file description, so it is
    /// shared with every other holder of the same eventfd; an eventfd user is
    /// expected to cope with that (QEMU and rust-vmm do). The kind of the
    /// descriptor is not checked here; if it is not an eventfd, reads and
    /// writes fail with [`NotifyError::ShortRead`] / [`NotifyError::ShortWrite`]
    /// or an I/O error.
    pub fn from_owned_fd(fd: OwnedFd) -> Result<Self, NotifyError> {
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| NotifyError::Adopt(e.into()))?;
        if !flags.contains(OFlags::NONBLOCK) {
            rustix::fs::fcntl_setfl(&fd, flags | OFlags::NONBLOCK)
                .map_err(|e| NotifyError::Adopt(e.into()))?;
        }
        let fd_flags = rustix::io::fcntl_getfd(&fd).map_err(|e| NotifyError::Adopt(e.into()))?;
        if !fd_flags.contains(FdFlags::CLOEXEC) {
            rustix::io::fcntl_setfd(&fd, fd_flags | FdFlags::CLOEXEC)
                .map_err(|e| NotifyError::Adopt(e.into()))?;
        }
        Ok(Self { fd })
    }

    /// Returns a second handle to the same eventfd (a `dup` with
    /// close-on-exec); notifications sent through either are seen by both.
    pub fn try_clone(&self) -> Result<Self, NotifyError> {
        let fd = self.fd.try_clone().map_err(NotifyError::Duplicate)?;
        Ok(Self { fd })
    }

    /// Gives up the notifier and returns the descriptor, e.g. to send it to
    /// another process.
    #[must_use]
    pub fn into_owned_fd(self) -> OwnedFd {
        self.fd
    }
}

impl Notify for EventFdNotifier {
    fn notify(&self) -> Result<(), NotifyError> {
        loop {
            match rustix::io::write(&self.fd, &1u64.to_ne_bytes()) {
                Ok(8) => return Ok(()),
                Ok(len) => return Err(NotifyError::ShortWrite { len }),
                // The counter is at its maximum (2^64 - 2), so a notification
                // is certainly pending: the kick has already been delivered.
                Err(Errno::AGAIN) => {
                    tracing::trace!("eventfd counter saturated; notification already pending");
                    return Ok(());
                }
                Err(Errno::INTR) => {}
                Err(e) => return Err(NotifyError::Write(e.into())),
            }
        }
    }
}

impl Wait for EventFdNotifier {
    fn take(&self) -> Result<u64, NotifyError> {
        let mut buf = [0u8; 8];
        loop {
            match rustix::io::read(&self.fd, &mut buf) {
                Ok(8) => return Ok(u64::from_ne_bytes(buf)),
                Ok(len) => return Err(NotifyError::ShortRead { len }),
                // Counter is zero: nothing pending.
                Err(Errno::AGAIN) => return Ok(0),
                Err(Errno::INTR) => {}
                Err(e) => return Err(NotifyError::Read(e.into())),
            }
        }
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<u64, NotifyError> {
        // An unrepresentable deadline is as good as waiting forever.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            // `Timespec` covers ~2^63 seconds; anything longer is forever.
            let timespec = remaining.and_then(|r| Timespec::try_from(r).ok());
            let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
            match rustix::event::poll(&mut fds, timespec.as_ref()) {
                Ok(0) => return Ok(0),
                Ok(_) => {
                    let n = self.take()?;
                    if n != 0 {
                        return Ok(n);
                    }
                    // Another reader consumed it first; wait for the next.
                    if remaining.is_some_and(|r| r.is_zero()) {
                        return Ok(0);
                    }
                }
                // Retried with the time left.
                Err(Errno::INTR) => {}
                Err(e) => return Err(NotifyError::Poll(e.into())),
            }
        }
    }
}

impl AsFd for EventFdNotifier {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for EventFdNotifier {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<EventFdNotifier> for OwnedFd {
    fn from(notifier: EventFdNotifier) -> Self {
        notifier.fd
    }
}

/// How many times [`InProcessNotifier::wait`] polls the counter before
/// parking. Each `spin_loop` hint costs roughly 10–150 cycles depending on
/// the CPU, so this is a few microseconds at most: long enough to catch a
/// peer that answers straight away, short enough not to burn a core.
const SPIN_ITERATIONS: u32 = 128;

/// A notification channel between threads of one process.
///
/// `notify` is one atomic add; only when a waiter is parked does it also take
/// a mutex and signal a condvar. `take` is one atomic swap. `wait` spins
/// briefly, then parks.
///
/// # Why no wake-up is lost
///
/// The notifier does N1 `pending += 1`, then N2 `load waiters`, and wakes
/// only if N2 saw a waiter. A waiter, holding the mutex, does W1
/// `waiters += 1`, then W2 `swap(pending, 0)`, and parks only if W2 saw 0.
/// This is the store-buffering (Dekker) pattern, so all four accesses are
/// `SeqCst`: with Release/Acquire both loads could read stale values and the
/// waiter would sleep through the notification. In the single `SeqCst`
/// order, if W2 read 0 then W2 precedes N1 (an RMW reads the latest value), so
/// W1 < W2 < N1 < N2 and N2 sees the waiter. The notifier then locks the
/// mutex, which the waiter has held since before W1 and releases only
/// atomically with parking in `Condvar::wait`, so the `notify_all` that
/// follows reaches a parked thread. If instead N2 saw no waiter, then N2 < W1,
/// so N1 < W2 and the waiter finds the notification itself. After every
/// wake-up (real, spurious or timed out) the waiter re-checks under the
/// lock, in a loop.
#[derive(Debug, Default)]
pub struct InProcessNotifier {
    /// Notifications since the last take.
    pending: AtomicU64,
    /// Threads inside the parking section of `wait`.
    waiters: AtomicUsize,
    /// Guards no data: it only orders parking against waking.
    lock: Mutex<()>,
    cond: Condvar,
}

impl InProcessNotifier {
    /// Creates a notifier with no pending notification.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes pending notifications for `wait`'s spinning phase.
    fn take_spinning(&self) -> u64 {
        // A plain load first keeps the cache line shared while nothing is
        // pending; the swap's Acquire pairs with `notify`'s add (N1) so that
        // ring writes made before `notify` are visible after this returns.
        if self.pending.load(Ordering::Relaxed) == 0 {
            0
        } else {
            self.pending.swap(0, Ordering::Acquire)
        }
    }

    #[cfg(test)]
    fn parked_waiters(&self) -> usize {
        self.waiters.load(Ordering::SeqCst)
    }
}

impl Notify for InProcessNotifier {
    fn notify(&self) -> Result<(), NotifyError> {
        // N1: SeqCst (see the type docs); its release half also publishes the
        // caller's ring writes to whoever takes this notification.
        self.pending.fetch_add(1, Ordering::SeqCst);
        // N2: pairs with W1 in `wait`.
        if self.waiters.load(Ordering::SeqCst) != 0 {
            // Taking the lock waits until the waiter has either parked or
            // left; notifying after releasing it lets the woken thread get the
            // mutex without bouncing off us.
            drop(self.lock.lock().unwrap_or_else(PoisonError::into_inner));
            self.cond.notify_all();
        }
        Ok(())
    }
}

impl Wait for InProcessNotifier {
    fn take(&self) -> Result<u64, NotifyError> {
        // Acquire pairs with the release half of `notify`'s add.
        Ok(self.pending.swap(0, Ordering::Acquire))
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<u64, NotifyError> {
        let n = self.take()?;
        if n != 0 || timeout == Some(Duration::ZERO) {
            return Ok(n);
        }
        // An unrepresentable deadline is as good as waiting forever.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));

        for _ in 0..SPIN_ITERATIONS {
            std::hint::spin_loop();
            let n = self.take_spinning();
            if n != 0 {
                return Ok(n);
            }
        }

        // The mutex protects no data, so a poisoned one is still usable.
        let mut guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        // W1: pairs with N2 in `notify`.
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let n = loop {
            // W2: pairs with N1 in `notify`.
            let n = self.pending.swap(0, Ordering::SeqCst);
            if n != 0 {
                break n;
            }
            guard = match deadline {
                None => self.cond.wait(guard).unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break 0;
                    }
                    self.cond
                        .wait_timeout(guard, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        };
        // A stale non-zero count only sends a notifier down the slow path
        // once more, so no ordering is needed here.
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        drop(guard);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;
    use std::sync::Barrier;
    use std::thread;

    /// Generous bound so a lost wake-up fails the test instead of hanging it.
    const LONG: Duration = Duration::from_secs(10);

    /// Waits for a notification that has been or is about to be sent.
    ///
    /// A wait re-checks the counter when its timeout expires, so a lost
    /// wake-up would still return the notification, only `LONG` late: assert
    /// on the time too, or the tests could not see one.
    fn wait_promptly(w: &impl Wait) -> u64 {
        let start = Instant::now();
        let n = w.wait(Some(LONG)).unwrap();
        let waited = start.elapsed();
        assert!(
            waited < LONG,
            "lost wake-up: slept out the whole timeout ({waited:?}), then found {n}"
        );
        n
    }

    // ---- need_event -------------------------------------------------------

    /// Reference: walk the batch one index at a time, marking each entry
    /// written, and report whether `event` was among them.
    fn window(old: u16, new: u16) -> Vec<bool> {
        let mut written = vec![false; 1 << 16];
        let mut idx = old;
        while idx != new {
            written[usize::from(idx)] = true;
            idx = idx.wrapping_add(1);
        }
        written
    }

    #[test]
    fn need_event_matches_window_walk_around_wraps() {
        let olds: Vec<u16> = [0u16, 1, 2, 0x7ffe, 0x7fff, 0x8000, 0x8001, 0x1234]
            .into_iter()
            .chain(0xfff0..=0xffff)
            .collect();
        let batches: [u16; 20] = [
            0, 1, 2, 3, 4, 7, 8, 15, 16, 127, 128, 255, 256, 1024, 0x7fff, 0x8000, 0x8001, 0xfffe, 0xffff,
            0x4321,
        ];
        for &old in &olds {
            for &d in &batches {
                let new = old.wrapping_add(d);
                let written = window(old, new);
                for event in 0..=u16::MAX {
                    assert_eq!(
                        need_event(event, new, old),
                        written[usize::from(event)],
                        "event {event:#x} new {new:#x} old {old:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn need_event_batch_across_wrap() {
        // Entries 0xfffe, 0xffff, 0x0000, 0x0001 written in one batch.
        let (old, new) = (0xfffe, 0x0002);
        assert!(need_event(0xfffe, new, old));
        assert!(need_event(0xffff, new, old));
        assert!(need_event(0x0001, new, old));
        assert!(!need_event(0x0002, new, old), "next entry not yet written");
        assert!(!need_event(0xfffd, new, old), "entry of an earlier batch");
        // An empty batch never notifies.
        assert!(!need_event(old, old, old));
    }

    #[test]
    fn need_event_notifies_once_per_event_when_publishing_in_batches() {
        // Publish 3 * 2^16 entries in batches of varying size, with the
        // other side's event index moving on every time it hears from us:
        // exactly one notification per event index crossed.
        let sizes = [1u16, 5, 3, 64, 17, 2, 255];
        let (mut old, mut event) = (0xff00u16, 0xff10u16);
        let (mut published, mut notified, mut expected) = (0u32, 0u32, 0u32);
        let mut i = 0;
        while published < 3 << 16 {
            let d = sizes[i % sizes.len()];
            i += 1;
            let new = old.wrapping_add(d);
            let crossed = event.wrapping_sub(old) < d;
            if need_event(event, new, old) {
                notified += 1;
                event = new.wrapping_add(7);
            }
            if crossed {
                expected += 1;
            }
            published += u32::from(d);
            old = new;
        }
        assert_eq!(notified, expected);
        assert!(notified > 100);
    }

    proptest! {
        #[test]
        fn need_event_is_window_membership(event: u16, new: u16, old: u16) {
            let mut idx = old;
            let mut found = false;
            while idx != new {
                found |= idx == event;
                idx = idx.wrapping_add(1);
            }
            prop_assert_eq!(need_event(event, new, old), found);
        }

        #[test]
        fn need_event_is_translation_invariant(event: u16, new: u16, old: u16, shift: u16) {
            prop_assert_eq!(
                need_event(event, new, old),
                need_event(
                    event.wrapping_add(shift),
                    new.wrapping_add(shift),
                    old.wrapping_add(shift)
                )
            );
        }
    }

    // ---- shared handles ---------------------------------------------------

    fn kick(n: impl Notify) {
        n.notify().unwrap();
    }

    #[test]
    fn arc_and_ref_forward_to_the_inner_notifier() {
        let inner = Arc::new(InProcessNotifier::new());
        kick(Arc::clone(&inner));
        kick(&*inner);
        let dynamic: Arc<dyn Notify> = inner.clone();
        kick(dynamic);
        let waiter: &dyn Wait = &inner;
        assert_eq!(waiter.take().unwrap(), 3);

        let efd = EventFdNotifier::new().unwrap();
        kick(&efd);
        assert_eq!(Arc::new(efd).take().unwrap(), 1);
    }

    // ---- EventFdNotifier --------------------------------------------------

    #[test]
    fn eventfd_counts_and_resets() {
        let n = EventFdNotifier::new().unwrap();
        assert_eq!(n.take().unwrap(), 0);
        for _ in 0..5 {
            n.notify().unwrap();
        }
        assert_eq!(n.take().unwrap(), 5);
        assert_eq!(n.take().unwrap(), 0);
        assert_eq!(n.wait(Some(Duration::ZERO)).unwrap(), 0);
    }

    #[test]
    fn eventfd_wait_times_out_with_zero() {
        let n = EventFdNotifier::new().unwrap();
        let start = Instant::now();
        assert_eq!(n.wait(Some(Duration::from_millis(20))).unwrap(), 0);
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn eventfd_saturated_counter_counts_as_delivered() {
        let n = EventFdNotifier::new().unwrap();
        let max = u64::MAX - 1;
        assert_eq!(rustix::io::write(&n, &max.to_ne_bytes()).unwrap(), 8);
        // Would overflow: the kernel says EAGAIN, which means "pending".
        n.notify().unwrap();
        assert_eq!(n.take().unwrap(), max);
    }

    #[test]
    fn eventfd_clone_shares_the_counter() {
        let a = EventFdNotifier::new().unwrap();
        let b = a.try_clone().unwrap();
        assert_ne!(a.as_raw_fd(), b.as_raw_fd());
        b.notify().unwrap();
        b.notify().unwrap();
        assert_eq!(a.take().unwrap(), 2);
    }

    #[test]
    fn eventfd_adopts_a_blocking_fd_and_makes_it_non_blocking() {
        let fd = rustix::event::eventfd(0, EventfdFlags::empty()).unwrap();
        let n = EventFdNotifier::from_owned_fd(fd).unwrap();
        assert!(rustix::fs::fcntl_getfl(&n).unwrap().contains(OFlags::NONBLOCK));
        assert!(rustix::io::fcntl_getfd(&n).unwrap().contains(FdFlags::CLOEXEC));
        // Would block forever on a blocking eventfd.
        assert_eq!(n.take().unwrap(), 0);
        n.notify().unwrap();
        let fd: OwnedFd = n.into();
        let n = EventFdNotifier::from_owned_fd(fd).unwrap();
        assert_eq!(n.take().unwrap(), 1);
    }

    #[test]
    fn eventfd_adopting_a_non_eventfd_reports_short_read() {
        let fd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let n = EventFdNotifier::from_owned_fd(fd).unwrap();
        assert!(matches!(n.take(), Err(NotifyError::ShortRead { len: 0 })));
    }

    #[test]
    fn eventfd_blocking_wait_across_threads() {
        let n = Arc::new(EventFdNotifier::new().unwrap());
        let ready = Arc::new(Barrier::new(2));
        let waiter = {
            let (n, ready) = (Arc::clone(&n), Arc::clone(&ready));
            thread::spawn(move || {
                ready.wait();
                wait_promptly(&*n)
            })
        };
        ready.wait();
        thread::sleep(Duration::from_millis(20));
        n.notify().unwrap();
        assert_eq!(waiter.join().unwrap(), 1);
    }

    // ---- InProcessNotifier ------------------------------------------------

    #[test]
    fn in_process_counts_and_resets() {
        let n = InProcessNotifier::new();
        assert_eq!(n.take().unwrap(), 0);
        n.notify().unwrap();
        n.notify().unwrap();
        assert_eq!(n.wait(None).unwrap(), 2);
        assert_eq!(n.take().unwrap(), 0);
        assert_eq!(n.wait(Some(Duration::ZERO)).unwrap(), 0);
    }

    #[test]
    fn in_process_wait_times_out_with_zero() {
        let n = InProcessNotifier::new();
        let start = Instant::now();
        assert_eq!(n.wait(Some(Duration::from_millis(20))).unwrap(), 0);
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert_eq!(n.parked_waiters(), 0);
    }

    #[test]
    fn in_process_many_notifiers_sum_of_takes_is_total() {
        const THREADS: u64 = 8;
        const EACH: u64 = 10_000;
        let n = Arc::new(InProcessNotifier::new());
        let senders: Vec<_> = (0..THREADS)
            .map(|_| {
                let n = Arc::clone(&n);
                thread::spawn(move || {
                    for _ in 0..EACH {
                        n.notify().unwrap();
                    }
                })
            })
            .collect();
        let mut total = 0;
        while senders.iter().any(|s| !s.is_finished()) {
            total += n.wait(Some(Duration::from_millis(1))).unwrap();
        }
        for s in senders {
            s.join().unwrap();
        }
        total += n.take().unwrap();
        assert_eq!(total, THREADS * EACH);
    }

    #[test]
    fn in_process_wakes_a_parked_waiter() {
        let n = Arc::new(InProcessNotifier::new());
        let waiter = {
            let n = Arc::clone(&n);
            thread::spawn(move || wait_promptly(&*n))
        };
        // Only notify once the waiter is past its spin phase and parked
        // (or about to park under the lock), so the condvar path is taken.
        let give_up = Instant::now() + LONG;
        while n.parked_waiters() == 0 {
            assert!(Instant::now() < give_up, "waiter never parked");
            thread::yield_now();
        }
        n.notify().unwrap();
        assert_eq!(waiter.join().unwrap(), 1);
        assert_eq!(n.parked_waiters(), 0);
    }

    #[test]
    fn in_process_ping_pong_loses_no_wakeup() {
        // Two threads bounce a token; each side delays its reply by a
        // varying amount so notifications land while the peer is spinning,
        // between registering as a waiter and parking, and while parked.
        // A lost wake-up shows up as a wait that sleeps out its timeout.
        const ROUNDS: u32 = 20_000;
        let ping = Arc::new(InProcessNotifier::new());
        let pong = Arc::new(InProcessNotifier::new());
        let delay = |i: u32| {
            for _ in 0..(i.wrapping_mul(2_654_435_761) >> 23) {
                std::hint::spin_loop();
            }
        };
        let echo = {
            let (ping, pong) = (Arc::clone(&ping), Arc::clone(&pong));
            thread::spawn(move || {
                for i in 0..ROUNDS {
                    assert_eq!(wait_promptly(&*ping), 1, "round {i}");
                    delay(i);
                    pong.notify().unwrap();
                }
            })
        };
        for i in 0..ROUNDS {
            delay(i.wrapping_add(ROUNDS));
            ping.notify().unwrap();
            assert_eq!(wait_promptly(&*pong), 1, "round {i}");
        }
        echo.join().unwrap();
    }
}
