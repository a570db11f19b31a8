//! The device side of a packed virtqueue.

use super::Views;
use super::layout::{RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE};
use crate::access::DeviceMemory;
use crate::features::Features;
use crate::ring::areas::RingMemory;
use crate::ring::chain::{self, Chain, PackedRawDesc, Refused};
use crate::ring::inflight::{InflightError, InflightRegion, PackedTracker, crash};
use crate::ring::layout::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::ring::order::InOrder;
use crate::ring::split::{DeviceQueueError, RingFault, RingSetupError, UsedError};
use std::collections::VecDeque;
use std::sync::atomic::{Ordering, fence};

/// The device side of an activated packed virtqueue.
///
/// Created only from validated ring memory, so every method can rely on the layout.
/// Keeps its own ring positions and wrap counters and its own record of each buffer
/// id it holds: whatever the driver writes into used descriptors or the device area
/// is never read back (HOSTILE 10), each descriptor is read once into a private copy
/// (HOSTILE 12), and a list may only occupy the ring slots the driver has free, so a
/// walk ends within the queue size (HOSTILE 41 to 47 for the packed rules).
pub struct PackedDevice<M> {
    views: Views,
    mem: M,
    size: u16,
    event_idx: bool,
    indirect: bool,
    /// Lap position of the next descriptor to take (device's view of the driver
    /// ring wrap counter included).
    avail: u32,
    /// Lap position where the next used descriptor goes (device ring wrap counter).
    used: u32,
    /// `used` when we last decided about notifying, and slots used since.
    signalled: u32,
    used_since_signal: u32,
    /// Per buffer id held by the device: writable length + 1 (0 when not held) and
    /// the ring slots its list took.
    in_flight: Vec<(u64, u16)>,
    /// Ids held.
    held: usize,
    fault: Option<RingFault>,
    /// Reused buffer for indirect tables.
    scratch: Vec<u8>,
    /// Reused buffer for the private copy of a list's descriptors.
    descs: Vec<PackedRawDesc>,
    /// See [`Self::with_reject_status`].
    reject_status: Option<u8>,
    /// With VIRTIO_F_IN_ORDER: the buffers taken, and completions waiting for an
    /// earlier one (§2.8.x "In-order use of descriptors").
    order: Option<InOrder>,
    /// Inflight I/O tracking (see [`Self::with_inflight`]).
    inflight: Option<Box<PackedTracker>>,
    /// Lists an earlier device instance took and did not return, served first.
    resubmit: VecDeque<(u16, Vec<PackedRawDesc>)>,
    /// A notification is owed whatever the driver asked: set when taking over
    /// from an instance that may have died between publishing used entries and
    /// notifying the driver (which would then wait for ever).
    owed: bool,
}

impl<M: DeviceMemory> PackedDevice<M> {
    /// Activates the device side of a queue of `size` over `ring`, reaching buffer
    /// memory through `mem`. The descriptor ring (used descriptors go there) and the
    /// device area must be writable.
    pub fn new(size: u16, ring: &RingMemory, mem: M, features: Features) -> Result<Self, RingSetupError> {
        let views = Views::new(size, ring, (true, false, true))?;
        Ok(PackedDevice {
            views,
            mem,
            size,
            event_idx: features.contains(Features::EVENT_IDX),
            indirect: features.contains(Features::INDIRECT_DESC),
            avail: 0,
            used: 0,
            signalled: 0,
            used_since_signal: 0,
            in_flight: vec![(0, 0); usize::from(size)],
            held: 0,
            fault: None,
            scratch: Vec::new(),
            descs: Vec::new(),
            reject_status: None,
            order: features.contains(Features::IN_ORDER).then(|| InOrder::new(size)),
            inflight: None,
            resubmit: VecDeque::new(),
            owed: false,
        })
    }

    /// For devices whose requests end in a status byte (virtio-blk): a chain that is
    /// well formed but names memory the sharing model refuses is returned with
    /// `status` in its last writable byte, when the model accepts that descriptor,
    /// and its whole writable length as used length. Without it (the default) such
    /// a chain is returned with used length 0. As
    /// [`SplitDevice::with_reject_status`](crate::SplitDevice::with_reject_status).
    #[must_use]
    pub fn with_reject_status(mut self, status: u8) -> Self {
        self.reject_status = Some(status);
        self
    }

    /// Starts the queue at ring position `next_avail` instead of slot 0 with wrap
    /// counter 1: for a queue taken over from an earlier device instance
    /// (vhost-user's SET_VRING_BASE). `next_avail` is in the encoding vhost-user
    /// uses for packed rings and event suppression uses for positions (§2.8.14):
    /// the slot in bits 0-14, the wrap counter in bit 15; [`Self::next_avail`]
    /// returns it. The used position starts there too, because a queue changes
    /// hands only with nothing in flight; nothing in shared memory is read back to
    /// find out (HOSTILE 10). A slot outside the ring puts the queue into
    /// needs-reset ([`RingFault::StartOutOfRange`]): the next [`Self::pop`] says so.
    #[must_use]
    pub fn starting_at(mut self, next_avail: u16) -> Self {
        match self.views.decode(next_avail) {
            Some(lap) => {
                self.avail = lap;
                self.used = lap;
                self.signalled = lap;
                self.used_since_signal = 0;
            }
            None => {
                let _ = self.fail(RingFault::StartOutOfRange {
                    start: next_avail,
                    size: self.size,
                });
            }
        }
        self
    }

    /// Tracks the lists taken and not returned in `region`, which outlives this
    /// device instance (vhost-user's inflight I/O tracking; see
    /// [`crate::ring::inflight`]). Call it after [`Self::starting_at`], if at all.
    ///
    /// A region an earlier instance wrote is recovered: the lists it took and did
    /// not return are served again first, oldest first, from the copies the region
    /// keeps (the ring may hold used descriptors over them by now), and the device
    /// goes on at the used position the region recorded, taking available
    /// descriptors after the slots those lists hold. A fresh region (version 0)
    /// starts where [`Self::starting_at`] put the queue. The first
    /// [`Self::needs_notification`] afterwards says yes whatever the driver asked:
    /// the earlier instance may have died between writing used descriptors and
    /// notifying the driver.
    ///
    /// # Errors
    /// A region that does not add up ([`InflightError`]): the queue must not start.
    pub fn with_inflight(mut self, region: InflightRegion) -> Result<Self, InflightError> {
        let mut tracker = PackedTracker::new(&region)?;
        let views = &self.views;
        let got = tracker.recover(
            views.encode(self.used),
            |pos| views.decode(pos).is_some(),
            |pos| {
                // Still the descriptor the driver made available: no used
                // descriptor was written over it.
                views.decode(pos).is_some_and(|lap| {
                    let (_, _, flags) = views.read_tail(views.slot(lap));
                    Views::is_avail(flags, views.wrap(lap))
                })
            },
        )?;
        let used = views.decode(got.used).ok_or(InflightError::Position(got.used))?;
        self.used = used;
        self.signalled = used;
        self.used_since_signal = 0;
        self.avail = self.views.advance(used, got.slots);
        tracing::debug!(
            resubmit = got.resubmit.len(),
            used = got.used,
            slots = got.slots,
            "inflight region recovered"
        );
        self.resubmit = got.resubmit.into();
        self.inflight = Some(Box::new(tracker));
        self.owed = true;
        Ok(self)
    }

    /// The next ring position the device will take, with its wrap counter in bit 15
    /// (see [`Self::starting_at`]): where another device instance resumes once this
    /// one has returned every chain it took ([`Self::in_flight`] is 0).
    pub fn next_avail(&self) -> u16 {
        self.views.encode(self.avail)
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
        // Lists left to resubmit were taken too (`next_avail` is past them).
        self.held + self.resubmit.len()
    }

    /// Ring slots the driver may still fill: those not taken by lists the device
    /// holds (§2.8.6: a driver must have room for a whole list before making it
    /// available).
    fn room(&self) -> u16 {
        // At most `size` slots are between the used and the available position.
        let busy = u16::try_from(self.views.distance(self.used, self.avail)).unwrap_or(self.size);
        self.size.saturating_sub(busy)
    }

    /// Takes the next available chain, validated.
    ///
    /// `Ok(None)` means no descriptor is available. A chain that breaks a rule is
    /// returned to the driver with length 0 and reported as
    /// [`DeviceQueueError::BadChain`] (its `head` is the buffer id); the caller just
    /// calls `pop` again. [`DeviceQueueError::NeedsReset`] is sticky.
    pub fn pop(&mut self) -> Result<Option<Chain>, DeviceQueueError> {
        if let Some(f) = self.fault {
            return Err(DeviceQueueError::NeedsReset(f));
        }
        if let Some((id, descs)) = self.resubmit.pop_front() {
            // Taken (and tracked) by an earlier instance: ids are distinct and
            // below the size, and the slots are counted in `avail` already.
            let ndesc = u16::try_from(descs.len()).unwrap_or(self.size);
            let saved = std::mem::replace(&mut self.descs, descs);
            let got = self.serve(id, ndesc);
            self.descs = saved;
            return got;
        }
        let room = self.room();
        if room == 0 {
            // Every slot belongs to a list we hold: nothing can be available.
            return Ok(None);
        }
        let wrap = self.views.wrap(self.avail);
        let slot = self.views.slot(self.avail);
        // HOSTILE 41: only AVAIL == wrap counter != USED is available.
        let Some((addr, len, id, flags)) = self.views.read_if(slot, |f| Views::is_avail(f, wrap)) else {
            return Ok(None);
        };
        let mut descs = std::mem::take(&mut self.descs);
        descs.clear();
        descs.push((slot, (addr, len, flags, id)));
        let mut lap = self.avail;
        let mut last = (flags, id);
        // The rest of the list follows in ring order (§2.8.6); the head's flags,
        // written last by the driver, published it all. Each descriptor is read once
        // (HOSTILE 12), and no further than the slots the driver has free
        // (HOSTILE 43): no list is longer than the queue, and no walk reads a slot
        // whose used descriptor we still owe.
        while last.0 & VIRTQ_DESC_F_NEXT != 0 {
            if descs.len() >= usize::from(room) {
                self.descs = descs;
                return Err(self.fail(RingFault::ListOverrunsRing { room }));
            }
            lap = self.views.advance(lap, 1);
            let s = self.views.slot(lap);
            let (len, id, flags) = self.views.read_tail(s);
            descs.push((s, (self.views.read_addr(s), len, flags, id)));
            last = (flags, id);
        }
        // §2.8.6: the buffer id is in the last descriptor of the list.
        let id = last.1;
        if id >= self.size {
            self.descs = descs;
            return Err(self.fail(RingFault::HeadOutOfRange {
                head: id,
                size: self.size,
            }));
        }
        if self.in_flight[usize::from(id)].0 != 0 {
            // HOSTILE 42: the device could never tell the two completions apart.
            self.descs = descs;
            return Err(self.fail(RingFault::IdInFlight { id }));
        }
        // `descs.len() <= room <= size`.
        let ndesc = u16::try_from(descs.len()).unwrap_or(self.size);
        self.avail = self.views.advance(self.avail, ndesc);
        if let Some(t) = &mut self.inflight {
            t.taken(id, &descs);
        }
        self.descs = descs;
        self.serve(id, ndesc)
    }

    /// Walks and validates the list in `self.descs` (buffer id `id`, below the size
    /// and not held, `ndesc` slots), which is taken whatever comes of it: served,
    /// or returned at once if it breaks a rule.
    fn serve(&mut self, id: u16, ndesc: u16) -> Result<Option<Chain>, DeviceQueueError> {
        let mut chain = Chain::empty(id);
        let mut refused = Refused::default();
        let walked = chain::walk_packed(
            &mut chain,
            &self.descs,
            self.size,
            &self.mem,
            self.indirect,
            &mut self.scratch,
            &mut refused,
        );
        match walked {
            Ok(()) => {
                self.in_flight[usize::from(id)] = (u64::from(chain.writable_len()) + 1, ndesc);
                self.held += 1;
                if let Some(order) = &mut self.order {
                    order.taken(id);
                }
                Ok(Some(chain))
            }
            Err(source) => {
                tracing::debug!(id, error = %source, "rejecting descriptor chain");
                let used = refused.used_len(&source, self.reject_status, &self.mem);
                if let Some(order) = &mut self.order {
                    // In order: the rejection waits for the buffers taken before
                    // it, and has a used descriptor of its own.
                    self.in_flight[usize::from(id)] = (u64::from(used) + 1, ndesc);
                    self.held += 1;
                    order.taken(id);
                    // Not held before (checked above), so not waiting either.
                    let _ = order.complete(id, used, false);
                    self.flush_in_order();
                } else {
                    if let Some(t) = &mut self.inflight {
                        t.returning(id);
                    }
                    self.push_used(id, used, ndesc);
                }
                Err(DeviceQueueError::BadChain { head: id, source })
            }
        }
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
    pub fn add_used(&mut self, id: u16, len: u32) -> Result<(), UsedError> {
        self.use_one(id, len)?;
        self.flush_in_order();
        Ok(())
    }

    /// Returns several chains. Each used descriptor is published on its own (a
    /// packed ring has no index to publish once; in order, one per batch); the
    /// method exists so both ring formats serve the same callers. Stops at the
    /// first misuse; the chains before it are returned.
    pub fn add_used_batch(&mut self, used: impl IntoIterator<Item = (u16, u32)>) -> Result<(), UsedError> {
        let mut result = Ok(());
        for (id, len) in used {
            if let Err(e) = self.use_one(id, len) {
                result = Err(e);
                break;
            }
        }
        self.flush_in_order();
        result
    }

    /// Checks that `id` is held and `len` fits; then writes its used descriptor (in
    /// order: records it for `flush_in_order`).
    fn use_one(&mut self, id: u16, len: u32) -> Result<(), UsedError> {
        let &(plus_one, ndesc) = self
            .in_flight
            .get(usize::from(id))
            .filter(|e| e.0 != 0)
            .ok_or(UsedError::NotInFlight(id))?;
        let writable = plus_one - 1;
        if u64::from(len) > writable {
            return Err(UsedError::TooLong {
                len,
                // Stored from a u32 plus one.
                writable: u32::try_from(writable).unwrap_or(u32::MAX),
            });
        }
        if let Some(order) = &mut self.order {
            return order.complete(id, len, u64::from(len) == writable);
        }
        self.release(id);
        self.push_used(id, len, ndesc);
        Ok(())
    }

    /// Forgets that `id` is held; returns the ring slots its list took.
    fn release(&mut self, id: u16) -> u16 {
        let ndesc = self.in_flight[usize::from(id)].1;
        self.in_flight[usize::from(id)] = (0, 0);
        self.held -= 1;
        if let Some(t) = &mut self.inflight {
            t.returning(id);
        }
        ndesc
    }

    /// In order: writes one used descriptor per batch of buffers whose predecessors
    /// are all done, over the batch's first descriptor, with the id of its last
    /// buffer, and skips the slots of the whole batch.
    #[inline]
    fn flush_in_order(&mut self) {
        let mut slots: u16 = 0;
        while let Some(done) = self.order.as_mut().and_then(InOrder::pop_ready) {
            // A batch's lists sit in consecutive slots, at most `size` of them.
            slots = slots.saturating_add(self.release(done.id));
            if done.ends_batch {
                self.push_used(done.id, done.len, slots);
                slots = 0;
            }
        }
    }

    /// Writes a used descriptor at the used position and skips the list's slots
    /// (§2.8.6). One Release store of `len | id | flags`: the driver that sees the
    /// flags sees the id and length, and the buffer contents written before.
    fn push_used(&mut self, id: u16, len: u32, ndesc: u16) {
        let wrap = self.views.wrap(self.used);
        // §2.8.4: WRITE in a used descriptor says the device wrote into the buffer.
        let write = if len != 0 { VIRTQ_DESC_F_WRITE } else { 0 };
        let flags = Views::lap_bits(wrap, true) | write;
        let after = self.views.advance(self.used, ndesc);
        if let Some(t) = &mut self.inflight {
            t.publishing(self.views.encode(after));
        }
        crash::point();
        self.views
            .write_tail_release(self.views.slot(self.used), len, id, flags);
        if let Some(t) = &mut self.inflight {
            t.returned(self.views.encode(after));
        }
        self.used = after;
        self.used_since_signal += u32::from(ndesc);
    }

    /// Whether the driver wants a used-buffer notification for what was used since
    /// the last call (virtio 1.2 §2.8.10). Whatever the driver wrote in its event
    /// suppression structure, this never fails: garbage only makes a notification
    /// more likely (HOSTILE 46).
    pub fn needs_notification(&mut self) -> bool {
        // Pairs with the driver's fence in `PackedDriver::enable_notifications`
        // (between its event suppression store and its look at the ring): either it
        // sees our used descriptors, or we see its new request.
        fence(Ordering::SeqCst);
        if std::mem::take(&mut self.owed) {
            // Once, after a takeover: see `with_inflight`.
            self.signalled = self.used;
            self.used_since_signal = 0;
            return true;
        }
        let old = self.signalled;
        let moved = self.used_since_signal;
        self.signalled = self.used;
        self.used_since_signal = 0;
        let ev = self.views.driver_event();
        self.views.wants_event(ev, self.event_idx, old, moved)
    }

    /// Asks the driver not to send available-buffer notifications (while polling).
    pub fn disable_notifications(&mut self) {
        // DISABLE is valid with and without EVENT_IDX (§2.8.10).
        self.views.set_device_event(0, RING_EVENT_FLAGS_DISABLE);
    }

    /// Asks for available-buffer notifications again; returns `true` if buffers arrived
    /// meanwhile (so the caller keeps polling instead of sleeping).
    pub fn enable_notifications(&mut self) -> bool {
        if self.event_idx {
            // Kick me when the descriptor at our next position is made available.
            self.views
                .set_device_event(self.views.encode(self.avail), RING_EVENT_FLAGS_DESC);
        } else {
            self.views.set_device_event(0, RING_EVENT_FLAGS_ENABLE);
        }
        // Pairs with the driver's fence in `PackedDriver::kick_prepare` (between its
        // flags store and its event suppression load): either it sees our request
        // for a kick, or we see its descriptor below.
        fence(Ordering::SeqCst);
        if self.fault.is_some() || self.room() == 0 {
            return false;
        }
        let wrap = self.views.wrap(self.avail);
        let (_, _, flags) = self.views.read_tail(self.views.slot(self.avail));
        Views::is_avail(flags, wrap)
    }
}
