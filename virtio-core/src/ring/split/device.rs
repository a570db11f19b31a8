//! The device side of a split virtqueue.

use super::{RingSetupError, Views};
use crate::access::DeviceMemory;
use crate::features::Features;
use crate::notify::need_event;
use crate::ring::areas::RingMemory;
use crate::ring::chain::{self, Chain, ChainError, Refused};
use crate::ring::inflight::{InflightError, InflightRegion, SplitTracker, crash};
use crate::ring::layout::{VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY};
use crate::ring::order::InOrder;
use std::collections::VecDeque;
use std::sync::atomic::{Ordering, fence};

/// Why the device could not take the next chain.
#[derive(Debug, thiserror::Error)]
pub enum DeviceQueueError {
    /// The chain at `head` broke a rule; the queue already returned it with length 0.
    #[error("descriptor chain at head {head} rejected")]
    BadChain {
        /// Head of the rejected chain.
        head: u16,
        /// The rule it broke.
        #[source]
        source: ChainError,
    },
    /// The driver made a head available that the device still holds; skipped, so each
    /// chain is served at most once.
    #[error("head {0} made available twice")]
    DuplicateHead(u16),
    /// The queue is unusable until reset: the driver broke the ring itself.
    #[error("queue needs reset")]
    NeedsReset(#[source] RingFault),
}

/// Ring-level faults that leave no safe way to continue (the device should set
/// DEVICE_NEEDS_RESET, virtio 1.2 §2.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingFault {
    /// `avail.idx` moved more than the queue size past the last head taken.
    #[error("avail.idx {idx} is {ahead} entries ahead of {last}, more than the queue size")]
    AvailTooFarAhead {
        /// The value read.
        idx: u16,
        /// Our next position.
        last: u16,
        /// Distance.
        ahead: u16,
    },
    /// `avail.idx` went backwards from a value already seen.
    #[error("avail.idx went back from {seen} to {idx}")]
    AvailWentBack {
        /// Previously seen value.
        seen: u16,
        /// The value read now.
        idx: u16,
    },
    /// A head index outside the descriptor table (packed ring: a buffer id not
    /// below the queue size).
    #[error("available head {head} outside a queue of {size}")]
    HeadOutOfRange {
        /// The head read from the ring (packed ring: the buffer id).
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// Packed ring: a descriptor list that runs on (`NEXT`) past the ring slots the
    /// driver has free, into slots of lists the device still holds.
    #[error("descriptor list runs past the {room} free ring slots")]
    ListOverrunsRing {
        /// Slots the driver had free.
        room: u16,
    },
    /// Packed ring: a buffer id made available while the device still holds a
    /// buffer with that id; their completions could not be told apart.
    #[error("buffer id {id} made available while in flight")]
    IdInFlight {
        /// The buffer id.
        id: u16,
    },
    /// Packed ring: a starting position outside the ring.
    #[error("starting position {start:#06x} outside a ring of {size}")]
    StartOutOfRange {
        /// The position given (slot in bits 0-14, wrap counter in bit 15).
        start: u16,
        /// Queue size.
        size: u16,
    },
}

/// Misuse of [`SplitDevice::add_used`] by the device implementation itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UsedError {
    /// The head is not held by the device.
    #[error("head {0} is not in flight")]
    NotInFlight(u16),
    /// More bytes reported than the chain can hold.
    #[error("used length {len} exceeds the {writable} writable bytes")]
    TooLong {
        /// Reported length.
        len: u32,
        /// Writable bytes of the chain.
        writable: u32,
    },
}

/// The device side of an activated split virtqueue.
///
/// Created only from validated ring memory, so every method can rely on the layout.
/// Keeps its own copies of `last_avail` and the used index: whatever the driver writes
/// into `used.idx` or `used.flags` is never read back (HOSTILE rule 10).
pub struct SplitDevice<M> {
    views: Views,
    mem: M,
    size: u16,
    event_idx: bool,
    indirect: bool,
    /// Next available-ring position to take.
    last_avail: u16,
    /// Last `avail.idx` value read (only moves forward).
    avail_seen: u16,
    /// Our used index (private; the shared one is write-only for us).
    used_idx: u16,
    /// `used_idx` when we last decided about notifying.
    signalled_used: u16,
    /// Writable length + 1 of each head held by the device, 0 when not held.
    in_flight: Vec<u64>,
    fault: Option<RingFault>,
    /// Reused buffer for indirect tables.
    scratch: Vec<u8>,
    /// See [`Self::with_reject_status`].
    reject_status: Option<u8>,
    /// With VIRTIO_F_IN_ORDER: the chains taken, and completions waiting for an
    /// earlier one (§2.7.9).
    order: Option<InOrder>,
    /// Inflight I/O tracking (see [`Self::with_inflight`]).
    inflight: Option<Box<SplitTracker>>,
    /// Chains an earlier device instance took and did not return, served first.
    resubmit: VecDeque<u16>,
    /// A notification is owed whatever the driver asked: set when taking over
    /// from an instance that may have died between publishing used entries and
    /// notifying the driver (which would then wait for ever).
    owed: bool,
}

impl<M: DeviceMemory> SplitDevice<M> {
    /// Activates the device side of a queue of `size` over `ring`, reaching descriptor
    /// memory through `mem`. Only the used ring must be writable.
    pub fn new(size: u16, ring: &RingMemory, mem: M, features: Features) -> Result<Self, RingSetupError> {
        let views = Views::new(size, ring, (false, false, true))?;
        Ok(SplitDevice {
            views,
            mem,
            size,
            event_idx: features.contains(Features::EVENT_IDX),
            indirect: features.contains(Features::INDIRECT_DESC),
            last_avail: 0,
            avail_seen: 0,
            used_idx: 0,
            signalled_used: 0,
            in_flight: vec![0; usize::from(size)],
            fault: None,
            scratch: Vec::new(),
            reject_status: None,
            order: features.contains(Features::IN_ORDER).then(|| InOrder::new(size)),
            inflight: None,
            resubmit: VecDeque::new(),
            owed: false,
        })
    }

    /// For devices whose requests end in a status byte (virtio-blk): a chain that
    /// is well formed but names memory the sharing model refuses (a buffer across
    /// a gap between memory regions, say) is returned with `status` in its last
    /// writable byte, when the model accepts that descriptor, and its whole
    /// writable length as used length, the way the device reports any failed
    /// request. Without it (the default) such a chain is returned with used length
    /// 0, and a driver that finds its status byte where the device never wrote can
    /// take stale contents for success.
    #[must_use]
    pub fn with_reject_status(mut self, status: u8) -> Self {
        self.reject_status = Some(status);
        self
    }

    /// Starts the queue at available-ring position `next_avail` instead of 0: for a
    /// queue taken over from an earlier device instance (vhost-user's
    /// SET_VRING_BASE, a backend restarted under a running driver). Call it right
    /// after [`Self::new`]. The used index starts there too, because a queue changes
    /// hands only with nothing in flight; the used index in shared memory is not
    /// read back to find out (HOSTILE rule 10).
    #[must_use]
    pub fn starting_at(mut self, next_avail: u16) -> Self {
        self.last_avail = next_avail;
        self.avail_seen = next_avail;
        self.used_idx = next_avail;
        self.signalled_used = next_avail;
        self
    }

    /// Tracks the chains taken and not returned in `region`, which outlives this
    /// device instance (vhost-user's inflight I/O tracking; see
    /// [`crate::ring::inflight`]). Call it after [`Self::starting_at`], if at all.
    ///
    /// A region an earlier instance wrote is recovered: the chains it took and did
    /// not return are popped again first, oldest first, and the device goes on
    /// after the available entries that instance took; the used index is read back
    /// from the ring this once (HOSTILE 50). A fresh region (version 0) starts
    /// where [`Self::starting_at`] put the queue. With `VIRTIO_F_IN_ORDER`, every
    /// chain then gets a used entry of its own (the spec allows it), so that the
    /// used index counts the chains returned. The first
    /// [`Self::needs_notification`] afterwards says yes whatever the driver asked:
    /// the earlier instance may have died between publishing used entries and
    /// notifying the driver.
    ///
    /// # Errors
    /// A region that does not add up ([`InflightError`]): the queue must not start.
    pub fn with_inflight(mut self, region: InflightRegion) -> Result<Self, InflightError> {
        let mut tracker = SplitTracker::new(&region)?;
        let ring_used = self.views.used_idx();
        let got = tracker.recover(ring_used, self.used_idx)?;
        self.used_idx = got.used;
        self.signalled_used = got.used;
        self.last_avail = got.next_avail;
        self.avail_seen = got.next_avail;
        tracing::debug!(
            resubmit = got.resubmit.len(),
            next_avail = got.next_avail,
            used = self.used_idx,
            "inflight region recovered"
        );
        self.resubmit = got.resubmit.into();
        self.inflight = Some(Box::new(tracker));
        self.owed = true;
        Ok(self)
    }

    /// The next available-ring position the device will take: where another device
    /// instance resumes once this one has returned every chain it took
    /// ([`Self::in_flight`] is 0).
    pub fn next_avail(&self) -> u16 {
        self.last_avail
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The sharing model's access object, for serving chains.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// The fault that put the queue into needs-reset, if any.
    pub fn fault(&self) -> Option<RingFault> {
        self.fault
    }

    /// Number of chains popped and not yet returned.
    pub fn in_flight(&self) -> usize {
        // Chains left to resubmit were taken too (`next_avail` is past them).
        self.in_flight.iter().filter(|&&w| w != 0).count() + self.resubmit.len()
    }

    /// Takes the next available chain, validated.
    ///
    /// `Ok(None)` means the ring is empty. A chain that breaks a rule is returned to the
    /// driver with length 0 and reported as [`DeviceQueueError::BadChain`]; the caller
    /// just calls `pop` again. [`DeviceQueueError::NeedsReset`] is sticky.
    pub fn pop(&mut self) -> Result<Option<Chain>, DeviceQueueError> {
        if let Some(f) = self.fault {
            return Err(DeviceQueueError::NeedsReset(f));
        }
        if let Some(head) = self.resubmit.pop_front() {
            // Taken (and marked) by an earlier instance; below the size (checked
            // by the recovery) and held by nobody here.
            return self.take(head);
        }
        if self.last_avail == self.avail_seen && !self.refresh_avail()? {
            return Ok(None);
        }
        let pos = self.last_avail;
        // Ordered after the Acquire load of avail.idx in `refresh_avail`.
        let head = self.views.avail_ring(pos);
        self.last_avail = pos.wrapping_add(1);
        if head >= self.size {
            return Err(self.fail(RingFault::HeadOutOfRange {
                head,
                size: self.size,
            }));
        }
        if self.in_flight[usize::from(head)] != 0 || self.resubmit.contains(&head) {
            return Err(DeviceQueueError::DuplicateHead(head));
        }
        if let Some(r) = &mut self.inflight {
            r.taken(head);
        }
        self.take(head)
    }

    /// Walks and validates the chain at `head` (below the size, not held), which
    /// is taken whatever comes of it: served, or returned at once if it breaks a rule.
    fn take(&mut self, head: u16) -> Result<Option<Chain>, DeviceQueueError> {
        let views = &self.views;
        let mut chain = Chain::empty(head);
        let mut refused = Refused::default();
        let walked = chain::walk(
            &mut chain,
            self.size,
            |i| views.read_desc(i),
            &self.mem,
            self.indirect,
            &mut self.scratch,
            &mut refused,
        );
        match walked {
            Ok(()) => {
                self.in_flight[usize::from(head)] = u64::from(chain.writable_len()) + 1;
                if let Some(order) = &mut self.order {
                    order.taken(head);
                }
                Ok(Some(chain))
            }
            Err(source) => {
                tracing::debug!(head, error = %source, "rejecting descriptor chain");
                let used = refused.used_len(&source, self.reject_status, &self.mem);
                if let Some(order) = &mut self.order {
                    // In order: the rejection waits for the chains taken before it,
                    // and has a used entry of its own (the driver must not take it
                    // for a completely used chain).
                    self.in_flight[usize::from(head)] = u64::from(used) + 1;
                    order.taken(head);
                    // Not held before (checked above), so not waiting either.
                    let _ = order.complete(head, used, false);
                    self.flush_in_order();
                } else {
                    self.push_used(head, used);
                }
                self.publish();
                Err(DeviceQueueError::BadChain { head, source })
            }
        }
    }

    /// Reads `avail.idx`; returns whether new heads are available.
    fn refresh_avail(&mut self) -> Result<bool, DeviceQueueError> {
        let idx = self.views.avail_idx();
        // The index only moves forward: anything up to half the index space behind
        // the last value seen is a step back, anything else a jump forward.
        let behind = self.avail_seen.wrapping_sub(idx);
        if behind != 0 && behind < 0x8000 {
            return Err(self.fail(RingFault::AvailWentBack {
                seen: self.avail_seen,
                idx,
            }));
        }
        let ahead = idx.wrapping_sub(self.last_avail);
        if ahead > self.size {
            return Err(self.fail(RingFault::AvailTooFarAhead {
                idx,
                last: self.last_avail,
                ahead,
            }));
        }
        self.avail_seen = idx;
        Ok(ahead != 0)
    }

    #[cold]
    fn fail(&mut self, f: RingFault) -> DeviceQueueError {
        tracing::warn!(fault = %f, "virtqueue needs reset");
        self.fault = Some(f);
        DeviceQueueError::NeedsReset(f)
    }

    /// Returns a chain to the driver with `len` bytes written into its writable part.
    ///
    /// With VIRTIO_F_IN_ORDER the chain is returned once every chain taken before it
    /// is: until then it counts as [in flight](Self::in_flight).
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), UsedError> {
        self.write_used(head, len)?;
        self.flush_in_order();
        self.publish();
        Ok(())
    }

    /// Returns several chains and publishes the used index once, which saves the
    /// driver's core a cache-line transfer per chain. Stops at the first misuse; the
    /// chains before it are returned and published.
    pub fn add_used_batch(&mut self, used: impl IntoIterator<Item = (u16, u32)>) -> Result<(), UsedError> {
        let mut result = Ok(());
        for (head, len) in used {
            if let Err(e) = self.write_used(head, len) {
                result = Err(e);
                break;
            }
        }
        self.flush_in_order();
        self.publish();
        result
    }

    /// Checks `head` and writes its used element (in order: records it), without
    /// publishing the index.
    fn write_used(&mut self, head: u16, len: u32) -> Result<(), UsedError> {
        let slot = self
            .in_flight
            .get_mut(usize::from(head))
            .filter(|w| **w != 0)
            .ok_or(UsedError::NotInFlight(head))?;
        let writable = *slot - 1;
        if u64::from(len) > writable {
            return Err(UsedError::TooLong {
                len,
                // Stored from a u32 plus one.
                writable: u32::try_from(writable).unwrap_or(u32::MAX),
            });
        }
        if let Some(order) = &mut self.order {
            // Held until `flush_in_order` returns it.
            return order.complete(head, len, u64::from(len) == writable);
        }
        *slot = 0;
        self.push_used(head, len);
        Ok(())
    }

    /// In order: writes the used entries of every chain whose predecessors are all
    /// done, one entry per batch, at the ring position of the batch's first chain,
    /// and moves the used index past the batch (§2.7.9). Does not publish the index.
    #[inline]
    fn flush_in_order(&mut self) {
        let mut batch: u16 = 0;
        while let Some(done) = self.order.as_mut().and_then(InOrder::pop_ready) {
            self.in_flight[usize::from(done.id)] = 0;
            batch += 1;
            // Tracked: one entry per chain (see `with_inflight`).
            if done.ends_batch || self.inflight.is_some() {
                if let Some(r) = &mut self.inflight {
                    r.returning(done.id);
                }
                crash::point();
                self.views
                    .set_used_elem(self.used_idx, u32::from(done.id), done.len);
                self.used_idx = self.used_idx.wrapping_add(batch);
                batch = 0;
            }
        }
    }

    fn push_used(&mut self, head: u16, len: u32) {
        if let Some(r) = &mut self.inflight {
            r.returning(head);
        }
        crash::point();
        self.views.set_used_elem(self.used_idx, u32::from(head), len);
        self.used_idx = self.used_idx.wrapping_add(1);
    }

    /// Publishes the used index (Release: the elements become visible no later than
    /// the index; pairs with the driver's Acquire load), then clears the returned
    /// batch in the inflight region.
    fn publish(&mut self) {
        crash::point();
        self.views.publish_used_idx(self.used_idx);
        if let Some(r) = &mut self.inflight {
            r.returned(self.used_idx);
        }
    }

    /// Whether the driver wants a used-buffer notification for what was added since the
    /// last call (virtio 1.2 §2.7.7.2, §2.7.10).
    pub fn needs_notification(&mut self) -> bool {
        // Pairs with the driver's fence in `SplitDriver::enable_notifications` (between
        // its used_event / flags store and its used.idx load): either it sees our new
        // used.idx, or we see its new used_event / flags.
        fence(Ordering::SeqCst);
        if std::mem::take(&mut self.owed) {
            // Once, after a takeover: see `with_inflight`.
            self.signalled_used = self.used_idx;
            return true;
        }
        let old = self.signalled_used;
        let new = self.used_idx;
        self.signalled_used = new;
        if self.event_idx {
            need_event(self.views.used_event(), new, old)
        } else {
            new != old && self.views.avail_flags() & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Asks the driver not to send available-buffer notifications (while polling).
    pub fn disable_notifications(&mut self) {
        if !self.event_idx {
            self.views.set_used_flags(VIRTQ_USED_F_NO_NOTIFY);
        }
        // With EVENT_IDX, avail_event is simply left behind: at most one more kick.
    }

    /// Asks for available-buffer notifications again; returns `true` if buffers arrived
    /// meanwhile (so the caller keeps polling instead of sleeping).
    pub fn enable_notifications(&mut self) -> bool {
        if self.event_idx {
            self.views.set_avail_event(self.avail_seen);
        } else {
            self.views.set_used_flags(0);
        }
        // Pairs with the driver's fence in `SplitDriver::kick_prepare` (between its
        // avail.idx store and its avail_event / flags load): either it sees our request
        // for a kick, or we see its new avail.idx below.
        fence(Ordering::SeqCst);
        if self.fault.is_some() {
            return false;
        }
        match self.refresh_avail() {
            Ok(_) => self.avail_seen != self.last_avail,
            // The fault is latched; the next `pop` reports it.
            Err(_) => true,
        }
    }
}
