//! The driver side of a split virtqueue.

use super::{RingSetupError, Views};
use crate::features::Features;
use crate::notify::need_event;
use crate::ring::areas::RingMemory;
use crate::ring::layout::{
    Descriptor, SplitLayout, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
};
use crate::share::{Direction, DriverShare, GuestBuf, ShareError};
use std::sync::atomic::{Ordering, fence};
use zerocopy::IntoBytes;

/// Why a request could not be added.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// A request with no buffers.
    #[error("request has no buffers")]
    Empty,
    /// More buffers than a chain may hold (the queue size).
    #[error("request of {0} buffers exceeds the queue size")]
    TooLong(usize),
    /// Not enough free descriptors now; retry after reclaiming used buffers.
    #[error("{needed} descriptors needed, {free} free")]
    NoSpace {
        /// Descriptors the request needs.
        needed: u16,
        /// Descriptors free.
        free: u16,
    },
    /// The sharing model refused a buffer.
    #[error("buffer could not be shared with the device")]
    Share(#[from] ShareError),
    /// The device broke the ring earlier; the queue must be reset.
    #[error("device is broken")]
    Broken,
}

/// The checks every ring format makes before it takes a request of `total` buffers:
/// a working queue, at least one buffer, no more than the queue holds, and room for
/// it. Returns whether it goes in one indirect descriptor, and how many descriptor
/// slots it takes.
pub(crate) fn admit(
    broken: bool,
    indirect_ok: bool,
    size: u16,
    num_free: u16,
    total: usize,
) -> Result<(bool, u16), AddError> {
    if broken {
        return Err(AddError::Broken);
    }
    if total == 0 {
        return Err(AddError::Empty);
    }
    if total > usize::from(size) {
        return Err(AddError::TooLong(total));
    }
    let indirect = indirect_ok && total > 1;
    // `total <= size <= 32768`.
    let needed = if indirect {
        1
    } else {
        u16::try_from(total).unwrap_or(u16::MAX)
    };
    if needed > num_free {
        return Err(AddError::NoSpace {
            needed,
            free: num_free,
        });
    }
    Ok((indirect, needed))
}

/// A refused request: the error, and the caller's token handed back.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Rejected<T> {
    /// Why the request was refused.
    #[source]
    pub error: AddError,
    /// The token that came with it.
    pub token: T,
}

/// The device wrote something into the used ring that it could not have meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DriverQueueError {
    /// `used.idx` moved further than the number of outstanding chains.
    #[error("used.idx {idx} is {ahead} ahead of {last} with {outstanding} outstanding")]
    UsedTooFarAhead {
        /// Value read.
        idx: u16,
        /// Our last used position.
        last: u16,
        /// Distance.
        ahead: u16,
        /// Chains outstanding.
        outstanding: u16,
    },
    /// A used id that is not the head of an outstanding chain.
    #[error("used id {0} is not an outstanding head")]
    UnknownId(u32),
    /// A used length larger than the chain's writable bytes.
    #[error("used length {len} exceeds the {writable} writable bytes of head {head}")]
    LengthTooLarge {
        /// Head index.
        head: u16,
        /// Reported length.
        len: u32,
        /// Writable bytes in the chain.
        writable: u32,
    },
    /// In order (VIRTIO_F_IN_ORDER): a used entry that ends a batch of more chains
    /// than the device says it used, or whose id is not in the batch it would end
    /// (§2.7.9, §2.8.x).
    #[error("in-order used id {id} does not end a batch of at most {used} chains")]
    BatchPastUsed {
        /// The id read.
        id: u32,
        /// Chains the device says it used (the packed ring: those outstanding).
        used: u16,
    },
    /// An earlier fault; the queue must be reset.
    #[error("device is broken")]
    Broken,
}

/// A completed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Used<T> {
    /// The token given to [`SplitDriver::add`].
    pub token: T,
    /// Bytes the device wrote (checked against the writable buffers).
    pub len: u32,
}

/// Driver-private state of one outstanding head.
struct Outstanding<K, T> {
    token: Option<T>,
    /// Descriptors taken from the table (1 for an indirect chain).
    ndesc: u16,
    /// Total device-writable bytes.
    writable: u32,
    /// The model's handles in buffer order, with each buffer's writable length (0 for
    /// device-readable buffers and for the indirect table).
    shares: Vec<(K, u32)>,
}

/// The driver side of a split virtqueue over sharing model `S`, carrying caller tokens
/// of type `T`.
///
/// Keeps a private shadow of everything it wrote (free list links, outstanding heads,
/// writable lengths) and checks every used element against it: a used id that is not
/// outstanding, an overlong used length or a used index running ahead marks the device
/// broken instead of corrupting driver state (HOSTILE rule 31).
pub struct SplitDriver<S: DriverShare, T> {
    views: Views,
    mem: RingMemory,
    share: S,
    size: u16,
    event_idx: bool,
    indirect: bool,
    free_head: u16,
    num_free: u16,
    /// Heads handed to the device and not yet returned.
    outstanding: u16,
    /// Private copy of each descriptor's `next` link (the table may be device-writable).
    next: Vec<u16>,
    heads: Vec<Outstanding<S::Token, T>>,
    /// Our avail.idx.
    avail_idx: u16,
    /// avail.idx at the last `kick_prepare`.
    kicked_idx: u16,
    last_used: u16,
    /// Last used.idx read.
    used_seen: u16,
    callbacks: bool,
    broken: bool,
    /// Reused buffer for building indirect tables.
    table: Vec<Descriptor>,
    /// VIRTIO_F_IN_ORDER: descriptors are taken in ring order and come back in the
    /// order they were made available (§2.7.9).
    in_order: bool,
    /// In order: the head of the oldest outstanding chain (the free descriptors are
    /// the `num_free` before it, from `free_head`).
    oldest: u16,
    /// In order: the head and used length of the used entry that ends the batch
    /// being taken, once read.
    batch: Option<(u16, u32)>,
}

impl<S: DriverShare, T> SplitDriver<S, T> {
    /// Sets up the driver side of a queue of `size` over `ring` (the driver's own
    /// memory, all three areas writable: the driver initialises them) with the
    /// negotiated `features`. The areas are zeroed.
    pub fn new(size: u16, ring: RingMemory, share: S, features: Features) -> Result<Self, RingSetupError> {
        let views = Views::new(size, &ring, (true, true, true))?;
        let mut heads = Vec::with_capacity(usize::from(size));
        heads.resize_with(usize::from(size), || Outstanding {
            token: None,
            ndesc: 0,
            writable: 0,
            shares: Vec::new(),
        });
        let mut d = SplitDriver {
            views,
            mem: ring,
            share,
            size,
            event_idx: features.contains(Features::EVENT_IDX),
            indirect: features.contains(Features::INDIRECT_DESC),
            free_head: 0,
            num_free: size,
            outstanding: 0,
            next: (1..=size).collect(),
            heads,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            used_seen: 0,
            callbacks: true,
            broken: false,
            table: Vec::new(),
            in_order: features.contains(Features::IN_ORDER),
            oldest: 0,
            batch: None,
        };
        d.next = d.initial_links();
        d.zero_rings()?;
        Ok(d)
    }

    /// The free list at the start: every descriptor, in table order. In order it is
    /// a circle (the last links to 0, as §2.7.5 asks of a chain that wraps) and
    /// stays one: chains are taken from its front and come back to its back.
    fn initial_links(&self) -> Vec<u16> {
        if self.in_order {
            (1..self.size).chain([0]).collect()
        } else {
            (1..=self.size).collect()
        }
    }

    fn zero_rings(&mut self) -> Result<(), RingSetupError> {
        let l = SplitLayout { size: self.size };
        let area = |area| move |source| RingSetupError::Area { area, source };
        self.mem
            .desc
            .zero(0, l.desc_bytes())
            .map_err(area("descriptor table"))?;
        self.mem
            .driver
            .zero(0, l.avail_bytes())
            .map_err(area("available ring"))?;
        self.mem
            .device
            .zero(0, l.used_bytes())
            .map_err(area("used ring"))?;
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

    /// Free descriptors.
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
    ///
    /// Uses one indirect descriptor for multi-buffer requests when INDIRECT_DESC was
    /// negotiated. The request is visible to the device on return; call
    /// [`Self::kick_prepare`] (once per batch) to learn whether to notify it.
    pub fn add(&mut self, out: &[GuestBuf], ins: &[GuestBuf], token: T) -> Result<u16, Rejected<T>> {
        match self.try_add(out, ins) {
            Ok(head) => {
                self.heads[usize::from(head)].token = Some(token);
                self.outstanding += 1;
                Ok(head)
            }
            Err(error) => Err(Rejected { error, token }),
        }
    }

    fn try_add(&mut self, out: &[GuestBuf], ins: &[GuestBuf]) -> Result<u16, AddError> {
        let total = out.len() + ins.len();
        let (indirect, needed) = admit(self.broken, self.indirect, self.size, self.num_free, total)?;
        let head = self.free_head;
        let mut shares = std::mem::take(&mut self.heads[usize::from(head)].shares);
        shares.clear();
        let result = if indirect {
            self.write_indirect(head, out, ins, &mut shares)
        } else {
            self.write_direct(head, out, ins, &mut shares)
        };
        let writable = match result {
            Ok(w) => w,
            Err(e) => {
                for (k, _) in shares.drain(..) {
                    self.share.retire(k, 0);
                }
                self.heads[usize::from(head)].shares = shares;
                return Err(e);
            }
        };
        // Take the descriptors off the free list (the links are our private shadow).
        let mut last = head;
        for _ in 1..needed {
            last = self.next[usize::from(last)];
        }
        self.free_head = self.next[usize::from(last)];
        self.num_free -= needed;
        let h = &mut self.heads[usize::from(head)];
        h.ndesc = needed;
        h.writable = writable;
        h.shares = shares;

        self.views.set_avail_ring(self.avail_idx, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Release: the descriptors and the ring entry above become visible no later
        // than the index (pairs with the device's Acquire load of avail.idx).
        self.views.publish_avail_idx(self.avail_idx);
        Ok(head)
    }

    /// Exposes every buffer, calling `emit(i, addr, len, flags)` per descriptor.
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
            let mut flags = if i + 1 < total { VIRTQ_DESC_F_NEXT } else { 0 };
            let wlen = if dir == Direction::FromDevice {
                flags |= VIRTQ_DESC_F_WRITE;
                e.len
            } else {
                0
            };
            shares.push((e.token, wlen));
            writable = writable.checked_add(wlen).ok_or(AddError::TooLong(total))?;
            emit(self, i, e.addr, e.len, flags);
        }
        Ok(writable)
    }

    fn write_direct(
        &mut self,
        head: u16,
        out: &[GuestBuf],
        ins: &[GuestBuf],
        shares: &mut Vec<(S::Token, u32)>,
    ) -> Result<u32, AddError> {
        let mut idx = head;
        self.expose_all(out, ins, shares, |d, _, addr, len, flags| {
            let next = d.next[usize::from(idx)];
            // `next` of the last descriptor is meaningless without NEXT; write 0.
            let link = if flags & VIRTQ_DESC_F_NEXT != 0 { next } else { 0 };
            d.views.write_desc(idx, addr, len, flags, link);
            idx = next;
        })
    }

    fn write_indirect(
        &mut self,
        head: u16,
        out: &[GuestBuf],
        ins: &[GuestBuf],
        shares: &mut Vec<(S::Token, u32)>,
    ) -> Result<u32, AddError> {
        let mut table = std::mem::take(&mut self.table);
        table.clear();
        let writable = self.expose_all(out, ins, shares, |_, i, addr, len, flags| {
            // `i < total <= size <= 32768`.
            let next = if flags & VIRTQ_DESC_F_NEXT != 0 {
                u16::try_from(i + 1).unwrap_or(0)
            } else {
                0
            };
            table.push(Descriptor::new(addr, len, flags, next));
        });
        let exposed = writable.and_then(|w| {
            let e = self.share.expose_table(table.as_bytes())?;
            Ok((w, e))
        });
        self.table = table;
        let (writable, e) = exposed?;
        self.views
            .write_desc(head, e.addr, e.len, VIRTQ_DESC_F_INDIRECT, 0);
        shares.push((e.token, 0));
        Ok(writable)
    }

    /// Our available index: where the next request goes (notification data, §2.9).
    pub fn next_avail(&self) -> u16 {
        self.avail_idx
    }

    /// Says whether the device wants an available-buffer notification for the chains
    /// added since the last call (virtio 1.2 §2.7.13.4). It publishes nothing: each
    /// [`add`](Self::add) already made its chain visible (the device may take it
    /// before any kick); this only decides whether to notify.
    pub fn kick_prepare(&mut self) -> bool {
        let old = self.kicked_idx;
        let new = self.avail_idx;
        self.kicked_idx = new;
        // Pairs with the device's fence in `SplitDevice::enable_notifications` (between
        // its avail_event / flags store and its avail.idx load): either the device sees
        // our avail.idx, or we see its request for a kick.
        fence(Ordering::SeqCst);
        if self.event_idx {
            need_event(self.views.avail_event(), new, old)
        } else {
            new != old && self.views.used_flags() & VIRTQ_USED_F_NO_NOTIFY == 0
        }
    }

    /// Takes the next used request, if any, after checking it against our shadow.
    pub fn pop_used(&mut self) -> Result<Option<Used<T>>, DriverQueueError> {
        if self.broken {
            return Err(DriverQueueError::Broken);
        }
        if self.in_order {
            return self.pop_used_in_order();
        }
        if !self.used_waiting()? {
            return Ok(None);
        }
        let (id, len) = self.views.used_elem(self.last_used);
        let head = match u16::try_from(id) {
            Ok(h) if h < self.size && self.heads[usize::from(h)].token.is_some() => h,
            _ => return Err(self.fail(DriverQueueError::UnknownId(id))),
        };
        let h = &self.heads[usize::from(head)];
        if len > h.writable {
            let writable = h.writable;
            return Err(self.fail(DriverQueueError::LengthTooLarge { head, len, writable }));
        }
        self.took_used();
        let token = self.release(head, len);
        Ok(token.map(|token| Used { token, len }))
    }

    /// Whether used entries wait past `last_used`; reads `used.idx` when those
    /// seen before are taken, and checks it.
    fn used_waiting(&mut self) -> Result<bool, DriverQueueError> {
        if self.last_used != self.used_seen {
            return Ok(true);
        }
        // Acquire: pairs with the device's Release store of used.idx.
        let idx = self.views.used_idx();
        let ahead = idx.wrapping_sub(self.last_used);
        let outstanding = self.outstanding;
        if ahead > outstanding {
            return Err(self.fail(DriverQueueError::UsedTooFarAhead {
                idx,
                last: self.last_used,
                ahead,
                outstanding,
            }));
        }
        self.used_seen = idx;
        Ok(ahead != 0)
    }

    /// Moves past one used chain.
    fn took_used(&mut self) {
        self.last_used = self.last_used.wrapping_add(1);
        if self.callbacks && self.event_idx {
            // Ask for the next notification as soon as anything more is used.
            self.views.set_used_event(self.last_used);
        }
    }

    /// [`Self::pop_used`] in order (§2.7.9): the device writes one used entry per
    /// batch, at the position of the batch's first chain, naming its last chain;
    /// every chain before that one was used completely. The chains come back in the
    /// order they were made available, so the next one is always the oldest.
    fn pop_used_in_order(&mut self) -> Result<Option<Used<T>>, DriverQueueError> {
        if !self.used_waiting()? {
            return Ok(None);
        }
        let (last, last_len) = match self.batch {
            Some(b) => b,
            None => {
                let b = self.read_batch()?;
                self.batch = Some(b);
                b
            }
        };
        let head = self.oldest;
        let h = &self.heads[usize::from(head)];
        let len = if head == last {
            self.batch = None;
            last_len
        } else {
            h.writable
        };
        self.oldest = self.ring_after(head, h.ndesc);
        self.took_used();
        let token = self.release(head, len);
        Ok(token.map(|token| Used { token, len }))
    }

    /// Reads the used entry at `last_used` and checks that it ends a batch of
    /// outstanding chains, from the oldest, no longer than the used entries the
    /// device published (HOSTILE 48).
    fn read_batch(&mut self) -> Result<(u16, u32), DriverQueueError> {
        let (id, len) = self.views.used_elem(self.last_used);
        let used = self.used_seen.wrapping_sub(self.last_used);
        let mut head = self.oldest;
        for _ in 0..used {
            let h = &self.heads[usize::from(head)];
            if h.token.is_none() {
                break;
            }
            if u32::from(head) == id {
                if len > h.writable {
                    let writable = h.writable;
                    return Err(self.fail(DriverQueueError::LengthTooLarge { head, len, writable }));
                }
                return Ok((head, len));
            }
            head = self.ring_after(head, h.ndesc);
        }
        Err(self.fail(DriverQueueError::BatchPastUsed { id, used }))
    }

    /// The descriptor `n` places after `head` in ring order.
    #[inline]
    fn ring_after(&self, head: u16, n: u16) -> u16 {
        // A split ring's size is a power of two (checked in `Views::new`): a mask,
        // not a division, on this per-chain path. Both below `size <= 32768`, so
        // the sum fits.
        head.wrapping_add(n) & (self.size - 1)
    }

    /// Retires a head's buffers and returns its descriptors to the free list.
    fn release(&mut self, head: u16, mut len: u32) -> Option<T> {
        let h = &mut self.heads[usize::from(head)];
        let token = h.token.take();
        if token.is_some() {
            self.outstanding -= 1;
        }
        let ndesc = h.ndesc;
        for (k, wlen) in h.shares.drain(..) {
            let written = len.min(wlen);
            len -= written;
            self.share.retire(k, written);
        }
        if !self.in_order {
            let mut last = head;
            for _ in 1..ndesc {
                last = self.next[usize::from(last)];
            }
            self.next[usize::from(last)] = self.free_head;
            self.free_head = head;
        }
        // In order the oldest chain comes back, and its descriptors join the back of
        // the free circle where they already are.
        self.num_free += ndesc;
        token
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
            if !self.event_idx {
                self.views.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT);
            }
            // With EVENT_IDX used_event is left where it is: at most one more
            // notification arrives.
        }
    }

    /// Asks for used-buffer notifications again; returns `true` if used buffers are
    /// already waiting, in which case the caller should poll instead of sleeping.
    pub fn enable_notifications(&mut self) -> bool {
        self.enable_after(0)
    }

    /// [`Self::enable_notifications`], but with EVENT_IDX asks to be notified only
    /// once three quarters of the chains outstanding now are used (Linux's
    /// `virtqueue_enable_cb_delayed`): a sender waiting for room then wakes once
    /// with room for many chains, not once per chain. Returns `true` if that many
    /// are already used (poll instead of sleeping). Without EVENT_IDX there is no
    /// way to delay, and it is [`Self::enable_notifications`].
    pub fn enable_notifications_delayed(&mut self) -> bool {
        let wait = if self.event_idx {
            u16::try_from(u32::from(self.outstanding) * 3 / 4).unwrap_or(0)
        } else {
            0
        };
        self.enable_after(wait)
    }

    /// Asks for a notification once more than `wait` chains past the last one
    /// taken are used (`wait` is 0 without EVENT_IDX); returns whether that many
    /// already are.
    fn enable_after(&mut self, wait: u16) -> bool {
        self.callbacks = true;
        if self.event_idx {
            // The last of the first `wait + 1` chains to come back moves used.idx
            // past used_event.
            self.views.set_used_event(self.last_used.wrapping_add(wait));
        } else {
            self.views.set_avail_flags(0);
        }
        // Pairs with the device's fence in `SplitDevice::needs_notification` (between
        // its used.idx store and its used_event / flags load): either it sees our
        // request, or we see its new used.idx below.
        fence(Ordering::SeqCst);
        self.views.used_idx().wrapping_sub(self.last_used) > wait
    }

    /// Takes back every outstanding request after a device reset, retiring its buffers
    /// with nothing written, and returns the ring to its initial state.
    ///
    /// Call only once the device has acknowledged the reset (status reads 0), so it
    /// can no longer touch the buffers.
    pub fn reset(&mut self) -> Vec<T> {
        let mut tokens = Vec::new();
        for head in 0..self.size {
            if self.heads[usize::from(head)].token.is_some() {
                tokens.extend(self.release(head, 0));
            }
        }
        self.free_head = 0;
        self.num_free = self.size;
        self.outstanding = 0;
        self.next = self.initial_links();
        self.oldest = 0;
        self.batch = None;
        self.avail_idx = 0;
        self.kicked_idx = 0;
        self.last_used = 0;
        self.used_seen = 0;
        self.callbacks = true;
        self.broken = false;
        if let Err(e) = self.zero_rings() {
            // The regions were checked in `new`; this cannot fail, but never panic.
            tracing::error!(error = %e, "zeroing ring memory on reset failed");
        }
        tokens
    }
}
