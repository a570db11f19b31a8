//! The driver side of a packed virtqueue.

use super::Views;
use super::layout::{
    PackedDescriptor, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE,
};
use crate::features::Features;
use crate::ring::areas::RingMemory;
use crate::ring::layout::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::ring::packed::layout::PackedLayout;
use crate::ring::split::{AddError, DriverQueueError, Rejected, RingSetupError, Used, admit};
use crate::share::{Direction, DriverShare, GuestBuf};
use crate::shm::Region;
use std::collections::VecDeque;
use std::sync::atomic::{Ordering, fence};
use zerocopy::IntoBytes;

/// Driver-private state of one buffer id.
struct Outstanding<K, T> {
    /// The caller's token while the id is with the device.
    token: Option<T>,
    /// Ring slots the buffer took (1 for an indirect one): how far the device skips
    /// when it returns the id (§2.8.6).
    ndesc: u16,
    /// Total device-writable bytes.
    writable: u32,
    /// The model's handles in buffer order, with each buffer's writable length (0 for
    /// device-readable buffers and for the indirect table).
    shares: Vec<(K, u32)>,
}

/// The driver side of a packed virtqueue over sharing model `S`, carrying caller
/// tokens of type `T`.
///
/// Keeps a private shadow of everything it wrote (free buffer ids, the slots and
/// writable length of each id, its own ring positions) and checks every used
/// descriptor against it: an id that is not outstanding or an overlong used length
/// marks the device broken instead of corrupting driver state (HOSTILE 31).
pub struct PackedDriver<S: DriverShare, T> {
    views: Views,
    mem: RingMemory,
    share: S,
    size: u16,
    event_idx: bool,
    indirect: bool,
    /// Free ring slots.
    num_free: u16,
    /// Free buffer ids (a stack; any id below the size will do, §2.8.21.1).
    free_ids: Vec<u16>,
    /// Buffers handed to the device and not yet returned.
    outstanding: u16,
    heads: Vec<Outstanding<S::Token, T>>,
    /// Lap position where the next chain goes (driver ring wrap counter included).
    avail: u32,
    /// `avail` at the last `kick_prepare`, and slots made available since.
    kicked: u32,
    added_since_kick: u32,
    /// Lap position of the next used descriptor to read.
    used: u32,
    callbacks: bool,
    broken: bool,
    /// Reused buffer for building indirect tables.
    table: Vec<PackedDescriptor>,
    /// VIRTIO_F_IN_ORDER: buffers come back in the order they were made available,
    /// one used descriptor per batch (§2.8.x "In-order use of descriptors").
    in_order: bool,
    /// In order: the outstanding ids, oldest first.
    order: VecDeque<u16>,
    /// In order: the id and used length of the used descriptor that ends the batch
    /// being taken, once read.
    batch: Option<(u16, u32)>,
}

impl<S: DriverShare, T> PackedDriver<S, T> {
    /// Sets up the driver side of a queue of `size` over `ring` (the driver's own
    /// memory, all three areas writable: the driver initialises them) with the
    /// negotiated `features`. The areas are zeroed (§2.8.13: "The descriptor ring is
    /// zero-initialized").
    pub fn new(size: u16, ring: RingMemory, share: S, features: Features) -> Result<Self, RingSetupError> {
        let views = Views::new(size, &ring, (true, true, true))?;
        let mut heads = Vec::with_capacity(usize::from(size));
        heads.resize_with(usize::from(size), || Outstanding {
            token: None,
            ndesc: 0,
            writable: 0,
            shares: Vec::new(),
        });
        let mut d = PackedDriver {
            views,
            mem: ring,
            share,
            size,
            event_idx: features.contains(Features::EVENT_IDX),
            indirect: features.contains(Features::INDIRECT_DESC),
            num_free: size,
            free_ids: Vec::with_capacity(usize::from(size)),
            outstanding: 0,
            heads,
            avail: 0,
            kicked: 0,
            added_since_kick: 0,
            used: 0,
            callbacks: true,
            broken: false,
            table: Vec::new(),
            in_order: features.contains(Features::IN_ORDER),
            order: VecDeque::new(),
            batch: None,
        };
        d.init()?;
        Ok(d)
    }

    /// Puts positions, ids and shared memory into their initial state.
    fn init(&mut self) -> Result<(), RingSetupError> {
        self.num_free = self.size;
        self.free_ids.clear();
        self.free_ids.extend((0..self.size).rev());
        self.outstanding = 0;
        self.avail = 0;
        self.kicked = 0;
        self.added_since_kick = 0;
        self.used = 0;
        self.callbacks = true;
        self.broken = false;
        self.order.clear();
        self.batch = None;
        let area = |area| move |source| RingSetupError::Area { area, source };
        let zero = |r: &Region, len| r.zero(0, len);
        zero(&self.mem.desc, PackedLayout { size: self.size }.desc_bytes())
            .map_err(area("descriptor ring"))?;
        zero(&self.mem.driver, 4).map_err(area("driver event suppression"))?;
        zero(&self.mem.device, 4).map_err(area("device event suppression"))?;
        Ok(())
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The ring memory this queue was set up over (to hand its addresses to a device).
    pub fn ring_memory(&self) -> &RingMemory {
        &self.mem
    }

    /// Free ring slots.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Requests handed to the device and not yet returned.
    pub fn outstanding(&self) -> u16 {
        self.outstanding
    }

    /// Whether a device fault was detected (then only [`Self::reset`] helps).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The sharing model, for drivers that need it between requests.
    pub fn share(&mut self) -> &mut S {
        &mut self.share
    }

    /// Adds a request: `out` buffers the device reads, then `ins` buffers it writes.
    /// Returns the buffer id the device will report it under.
    ///
    /// Uses one indirect descriptor for multi-buffer requests when INDIRECT_DESC was
    /// negotiated. The request is visible to the device on return; call
    /// [`Self::kick_prepare`] (once per batch) to learn whether to notify it.
    pub fn add(&mut self, out: &[GuestBuf], ins: &[GuestBuf], token: T) -> Result<u16, Rejected<T>> {
        match self.try_add(out, ins) {
            Ok(id) => {
                self.heads[usize::from(id)].token = Some(token);
                self.outstanding += 1;
                if self.in_order {
                    self.order.push_back(id);
                }
                Ok(id)
            }
            Err(error) => Err(Rejected { error, token }),
        }
    }

    fn try_add(&mut self, out: &[GuestBuf], ins: &[GuestBuf]) -> Result<u16, AddError> {
        let total = out.len() + ins.len();
        let (indirect, needed) = admit(self.broken, self.indirect, self.size, self.num_free, total)?;
        // Each outstanding id holds at least one slot, so a free slot means a free id.
        let Some(&id) = self.free_ids.last() else {
            return Err(AddError::NoSpace { needed, free: 0 });
        };
        let mut shares = std::mem::take(&mut self.heads[usize::from(id)].shares);
        shares.clear();
        let result = if indirect {
            self.write_indirect(id, out, ins, &mut shares)
        } else {
            self.write_direct(id, out, ins, &mut shares)
        };
        let (writable, head) = match result {
            Ok(w) => w,
            Err(e) => {
                // Nothing was published: the head's flags were not written.
                for (k, _) in shares.drain(..) {
                    self.share.retire(k, 0);
                }
                self.heads[usize::from(id)].shares = shares;
                return Err(e);
            }
        };
        let slot = self.views.slot(self.avail);
        // Release: the rest of the list, the indirect table and the buffers become
        // visible no later than the head's flags (§2.8.6, §2.8.21.1).
        let (addr, len, flags) = head;
        self.views.write_addr(slot, addr);
        self.views.write_tail_release(slot, len, id, flags);
        self.free_ids.pop();
        self.num_free -= needed;
        self.avail = self.views.advance(self.avail, needed);
        self.added_since_kick += u32::from(needed);
        let h = &mut self.heads[usize::from(id)];
        h.ndesc = needed;
        h.writable = writable;
        h.shares = shares;
        Ok(id)
    }

    /// Exposes every buffer, calling `emit(i, addr, len, flags)` per descriptor
    /// (flags without the AVAIL and USED bits).
    fn expose_all(
        &mut self,
        out: &[GuestBuf],
        ins: &[GuestBuf],
        shares: &mut Vec<(S::Token, u32)>,
        mut emit: impl FnMut(&mut Self, usize, u64, u32, u16),
    ) -> Result<u32, AddError> {
        let total = out.len() + ins.len();
        let mut writable: u32 = 0;
        for (i, (buf, dir)) in out
            .iter()
            .map(|b| (b, Direction::ToDevice))
            .chain(ins.iter().map(|b| (b, Direction::FromDevice)))
            .enumerate()
        {
            let e = self.share.expose(*buf, dir)?;
            let (flags, wlen) = if dir == Direction::FromDevice {
                (VIRTQ_DESC_F_WRITE, e.len)
            } else {
                (0, 0)
            };
            shares.push((e.token, wlen));
            writable = writable.checked_add(wlen).ok_or(AddError::TooLong(total))?;
            emit(self, i, e.addr, e.len, flags);
        }
        Ok(writable)
    }

    /// Writes a direct list at the available position, all but the head's flags;
    /// returns the writable bytes and the head's `(addr, len, flags)`.
    #[allow(clippy::type_complexity)]
    fn write_direct(
        &mut self,
        id: u16,
        out: &[GuestBuf],
        ins: &[GuestBuf],
        shares: &mut Vec<(S::Token, u32)>,
    ) -> Result<(u32, (u64, u32, u16)), AddError> {
        let total = out.len() + ins.len();
        let mut pos = self.avail;
        let mut head = (0, 0, 0);
        let writable = self.expose_all(out, ins, shares, |d, i, addr, len, mut flags| {
            if i + 1 < total {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            // Every descriptor of the list carries the AVAIL / USED bits of its own
            // lap (§2.8.6), and the buffer id (§2.8.6 asks it only of the last).
            flags |= Views::lap_bits(d.views.wrap(pos), false);
            if i == 0 {
                head = (addr, len, flags);
            } else {
                let slot = d.views.slot(pos);
                d.views.write_addr(slot, addr);
                d.views.write_tail(slot, len, id, flags);
            }
            pos = d.views.advance(pos, 1);
        })?;
        Ok((writable, head))
    }

    /// Builds and exposes an indirect table (§2.8.7); returns the writable bytes and
    /// the ring descriptor's `(addr, len, flags)`.
    #[allow(clippy::type_complexity)]
    fn write_indirect(
        &mut self,
        _id: u16,
        out: &[GuestBuf],
        ins: &[GuestBuf],
        shares: &mut Vec<(S::Token, u32)>,
    ) -> Result<(u32, (u64, u32, u16)), AddError> {
        let mut table = std::mem::take(&mut self.table);
        table.clear();
        let writable = self.expose_all(out, ins, shares, |_, _, addr, len, flags| {
            // Entries are consecutive; only WRITE is valid in them, and the id is
            // reserved (§2.8.7).
            table.push(PackedDescriptor::new(addr, len, 0, flags));
        });
        let exposed = writable.and_then(|w| {
            let e = self.share.expose_table(table.as_bytes())?;
            Ok((w, e))
        });
        self.table = table;
        let (writable, e) = exposed?;
        shares.push((e.token, 0));
        let flags = VIRTQ_DESC_F_INDIRECT | Views::lap_bits(self.views.wrap(self.avail), false);
        Ok((writable, (e.addr, e.len, flags)))
    }

    /// Where the next list goes, the slot with the driver's wrap counter in bit 15
    /// (notification data, §2.9).
    pub fn next_avail(&self) -> u16 {
        self.views.encode(self.avail)
    }

    /// Says whether the device wants an available-buffer notification for the chains
    /// added since the last call (virtio 1.2 §2.8.10, §2.8.21.3). It publishes
    /// nothing: each [`add`](Self::add) already made its chain visible; this only
    /// decides whether to notify.
    pub fn kick_prepare(&mut self) -> bool {
        let old = self.kicked;
        let moved = self.added_since_kick;
        self.kicked = self.avail;
        self.added_since_kick = 0;
        // Pairs with the device's fence in `PackedDevice::enable_notifications`
        // (between its event suppression store and its look at the ring): either
        // the device sees our descriptors, or we see its request for a kick
        // (§2.8.21.3.1: a barrier before reading the device area).
        fence(Ordering::SeqCst);
        let ev = self.views.device_event();
        self.views.wants_event(ev, self.event_idx, old, moved)
    }

    /// Whether the descriptor at lap position `lap` is used; if so, its `(len, id,
    /// flags)`, read after an Acquire fence.
    fn used_at(&self, lap: u32) -> Option<(u32, u16, u16)> {
        let wrap = self.views.wrap(lap);
        self.views
            .read_if(self.views.slot(lap), |f| Views::is_used(f, wrap))
            .map(|(_, len, id, flags)| (len, id, flags))
    }

    /// Takes the next used request, if any, after checking it against our shadow.
    pub fn pop_used(&mut self) -> Result<Option<Used<T>>, DriverQueueError> {
        if self.broken {
            return Err(DriverQueueError::Broken);
        }
        if self.in_order {
            return self.pop_used_in_order();
        }
        let Some((id, len)) = self.read_used()? else {
            return Ok(None);
        };
        // The device skips as many slots as the list took (§2.8.6).
        self.took_used(self.heads[usize::from(id)].ndesc);
        let token = self.release(id, len);
        Ok(token.map(|token| Used { token, len }))
    }

    /// The used descriptor at the next used position, if the device wrote one:
    /// its buffer id, checked to be outstanding, and its length, checked to fit.
    fn read_used(&mut self) -> Result<Option<(u16, u32)>, DriverQueueError> {
        let Some((len, id, flags)) = self.used_at(self.used) else {
            return Ok(None);
        };
        let h = match self.heads.get(usize::from(id)) {
            Some(h) if h.token.is_some() => h,
            _ => return Err(self.fail(DriverQueueError::UnknownId(u32::from(id)))),
        };
        // §2.8.4: the length is meaningful only with WRITE set in the used
        // descriptor; without it nothing was written.
        let len = if flags & VIRTQ_DESC_F_WRITE != 0 { len } else { 0 };
        if len > h.writable {
            let writable = h.writable;
            return Err(self.fail(DriverQueueError::LengthTooLarge {
                head: id,
                len,
                writable,
            }));
        }
        Ok(Some((id, len)))
    }

    /// Moves the used position past `ndesc` slots.
    fn took_used(&mut self, ndesc: u16) {
        self.used = self.views.advance(self.used, ndesc);
        if self.callbacks && self.event_idx {
            // Ask for the next notification as soon as anything more is used.
            self.views
                .set_driver_event(self.views.encode(self.used), RING_EVENT_FLAGS_DESC);
        }
    }

    /// [`Self::pop_used`] in order: the device writes one used descriptor per batch,
    /// over the batch's first descriptor, with the id of its last buffer; every
    /// buffer before that one was used completely, and the next buffer back is
    /// always the oldest outstanding one. The used descriptor is checked as any
    /// other (HOSTILE 47, 48).
    fn pop_used_in_order(&mut self) -> Result<Option<Used<T>>, DriverQueueError> {
        let (last, last_len) = match self.batch {
            Some(b) => b,
            None => {
                let Some(b) = self.read_used()? else {
                    return Ok(None);
                };
                self.batch = Some(b);
                b
            }
        };
        // `last` is outstanding (checked), so the queue of outstanding ids is not
        // empty and holds it.
        let Some(id) = self.order.pop_front() else {
            let used = self.outstanding;
            return Err(self.fail(DriverQueueError::BatchPastUsed {
                id: u32::from(last),
                used,
            }));
        };
        let h = &self.heads[usize::from(id)];
        let len = if id == last {
            self.batch = None;
            last_len
        } else {
            h.writable
        };
        self.took_used(h.ndesc);
        let token = self.release(id, len);
        Ok(token.map(|token| Used { token, len }))
    }

    /// Retires an id's buffers and gives its slots and the id back.
    fn release(&mut self, id: u16, mut len: u32) -> Option<T> {
        let h = &mut self.heads[usize::from(id)];
        let token = h.token.take()?;
        self.outstanding -= 1;
        for (k, wlen) in h.shares.drain(..) {
            let written = len.min(wlen);
            len -= written;
            self.share.retire(k, written);
        }
        self.num_free += h.ndesc;
        self.free_ids.push(id);
        Some(token)
    }

    fn fail(&mut self, e: DriverQueueError) -> DriverQueueError {
        tracing::warn!(error = %e, "device broke the virtqueue");
        self.broken = true;
        e
    }

    /// Asks the device not to send used-buffer notifications (while polling).
    pub fn disable_notifications(&mut self) {
        if self.callbacks {
            self.callbacks = false;
            // DISABLE is valid with and without EVENT_IDX (§2.8.10).
            self.views.set_driver_event(0, RING_EVENT_FLAGS_DISABLE);
        }
    }

    /// Asks for used-buffer notifications again; returns `true` if used buffers are
    /// already waiting, in which case the caller should poll instead of sleeping.
    pub fn enable_notifications(&mut self) -> bool {
        self.enable_after(0)
    }

    /// [`Self::enable_notifications`], but with EVENT_IDX asks to be notified only
    /// once three quarters of the ring slots outstanding now are used (Linux's
    /// `virtqueue_enable_cb_delayed`). Returns `true` if that many are already used
    /// (poll instead of sleeping). Without EVENT_IDX there is no way to delay, and
    /// it is [`Self::enable_notifications`].
    pub fn enable_notifications_delayed(&mut self) -> bool {
        let wait = if self.event_idx {
            let busy = u32::from(self.size - self.num_free);
            u16::try_from(busy * 3 / 4).unwrap_or(0)
        } else {
            0
        };
        self.enable_after(wait)
    }

    /// Asks for a notification once the device's used position moves past `wait`
    /// slots beyond ours (`wait` is 0 without EVENT_IDX); returns whether it already
    /// did, as far as the used descriptors waiting show.
    fn enable_after(&mut self, wait: u16) -> bool {
        self.callbacks = true;
        if self.event_idx {
            let event = self.views.advance(self.used, wait);
            self.views
                .set_driver_event(self.views.encode(event), RING_EVENT_FLAGS_DESC);
        } else {
            self.views.set_driver_event(0, RING_EVENT_FLAGS_ENABLE);
        }
        // Pairs with the device's fence in `PackedDevice::needs_notification`
        // (between its used descriptor store and its event suppression load): either
        // it sees our request, or we see its used descriptors below.
        fence(Ordering::SeqCst);
        if self.in_order {
            return self.used_past_in_order(wait);
        }
        // Walk the used descriptors waiting, skipping as the device did. Only a
        // hint: `pop_used` reads and checks each again; an id that is not ours
        // stops the walk and says "poll", so `pop_used` reports it.
        let mut lap = self.used;
        let mut passed: u32 = 0;
        for _ in 0..self.outstanding {
            let Some((_, id, _)) = self.used_at(lap) else {
                return false;
            };
            let ndesc = match self.heads.get(usize::from(id)) {
                Some(h) if h.token.is_some() => h.ndesc,
                _ => return true,
            };
            passed += u32::from(ndesc);
            if passed > u32::from(wait) {
                return true;
            }
            lap = self.views.advance(lap, ndesc);
        }
        false
    }

    /// The walk of [`Self::enable_after`] in order: whether more than `wait` slots
    /// past the used position are used, counting the rest of the batch being taken
    /// and then each batch the device wrote, which skips the slots of every buffer
    /// up to the id it names. The same hint: an id that ends no batch says "poll".
    fn used_past_in_order(&self, wait: u16) -> bool {
        let mut lap = self.used;
        let mut passed: u32 = 0;
        let mut oldest_first = self.order.iter();
        let mut last = self.batch.map(|(id, _)| id);
        loop {
            let Some(end) = last else {
                match self.used_at(lap) {
                    Some((_, id, _)) => last = Some(id),
                    None => return false,
                }
                continue;
            };
            loop {
                let Some(&id) = oldest_first.next() else {
                    return true;
                };
                let ndesc = self.heads[usize::from(id)].ndesc;
                passed += u32::from(ndesc);
                lap = self.views.advance(lap, ndesc);
                if id == end {
                    break;
                }
            }
            if passed > u32::from(wait) {
                return true;
            }
            last = None;
        }
    }

    /// Takes back every outstanding request after a device reset, retiring its buffers
    /// with nothing written, and returns the ring to its initial state (positions
    /// and wrap counters at slot 0 and 1, memory zeroed).
    ///
    /// Call only once the device has acknowledged the reset (status reads 0), so it
    /// can no longer touch the buffers.
    pub fn reset(&mut self) -> Vec<T> {
        let mut tokens = Vec::new();
        for id in 0..self.size {
            tokens.extend(self.release(id, 0));
        }
        if let Err(e) = self.init() {
            // The regions were checked in `new`; this cannot fail, but never panic.
            tracing::error!(error = %e, "zeroing ring memory on reset failed");
        }
        tokens
    }
}
