//! The receive queue: preallocated buffers, refill, and frame assembly.
//!
//! Every ring entry owns one receive buffer, carved from one guest allocation made at
//! setup (`base + slot * buf_len`), so receiving costs no allocation. A used buffer
//! is copied once into a private scratch buffer (the device cannot change the bytes
//! after we checked them: no double fetch) and goes back on the free list; refill
//! re-posts every free buffer and kicks once per poll.
//!
//! With MRG_RXBUF a frame spans `num_buffers` buffers (virtio 1.2 §5.1.6.4): the
//! first carries the header. The driver takes them as the device returns them; a
//! frame whose buffers are not all used yet stays half-assembled until the next poll.

use crate::error::{Broken, NetError};
use hypervisor::GuestMemory;
use virtio_core::net::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VirtioNetHdr, complete_checksum, rx_partial_csum};
use virtio_core::ring::queue::{AddError, DriverRing, Used};
use virtio_core::{DriverShare, GuestBuf};
use zerocopy::FromBytes;

/// Receive counters of one receive queue, or summed over a driver's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxStats {
    /// Frames handed to the caller.
    pub frames: u64,
    /// Buffers the device returned with length 0 (it dropped a frame it could not
    /// fit, HOSTILE rule 29); re-posted.
    pub unused_buffers: u64,
    /// Frames dropped because the device's header was inconsistent: a partial
    /// checksum we did not negotiate or outside the frame.
    pub bad_header: u64,
    /// Mergeable frames dropped because they were longer than the largest frame.
    pub oversized: u64,
}

impl RxStats {
    /// Adds `other`'s counts to these.
    pub(crate) fn add(&mut self, other: &RxStats) {
        self.frames += other.frames;
        self.unused_buffers += other.unused_buffers;
        self.bad_header += other.bad_header;
        self.oversized += other.oversized;
    }
}

/// A mergeable frame waiting for more buffers.
#[derive(Debug)]
struct Partial {
    hdr: VirtioNetHdr,
    /// Buffers still to come.
    remaining: u16,
    /// Bytes assembled in the scratch buffer.
    len: usize,
    /// Too long: its buffers are consumed, the frame is dropped.
    discard: bool,
}

pub(crate) struct RxQueue<S: DriverShare> {
    pub(crate) ring: DriverRing<S, u16>,
    base: u64,
    buf_len: u32,
    /// Slots not posted to the device.
    free: Vec<u16>,
    /// Frame bytes after the header; capacity fixed at setup.
    scratch: Vec<u8>,
    partial: Option<Partial>,
    broken: Option<Broken>,
    pub(crate) stats: RxStats,
}

/// How received frames are checked and assembled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RxMode {
    pub(crate) mrg_rxbuf: bool,
    pub(crate) guest_csum: bool,
    /// Largest frame accepted.
    pub(crate) max_frame: usize,
}

impl<S: DriverShare> RxQueue<S> {
    /// A queue over `ring` whose buffers start at `base`, `buf_len` bytes each, all
    /// free (not yet posted).
    pub(crate) fn new(ring: DriverRing<S, u16>, base: u64, buf_len: u32, max_frame: usize) -> Self {
        let size = ring.size();
        let cap = max_frame.max(buf_len as usize);
        RxQueue {
            ring,
            base,
            buf_len,
            free: (0..size).rev().collect(),
            scratch: vec![0; cap],
            partial: None,
            broken: None,
            stats: RxStats::default(),
        }
    }

    pub(crate) fn broken(&self) -> Option<Broken> {
        self.broken
    }

    /// Guest bytes of all buffers, for freeing.
    pub(crate) fn bytes(&self) -> u64 {
        u64::from(self.buf_len) * u64::from(self.ring.size())
    }

    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    fn addr(&self, slot: u16) -> u64 {
        self.base + u64::from(self.buf_len) * u64::from(slot)
    }

    /// Posts every free buffer; returns the ring's next position if the device
    /// wants a notification ([`DriverRing::kick_due`]).
    pub(crate) fn refill(&mut self) -> Result<Option<u16>, NetError> {
        if let Some(b) = self.broken {
            return Err(NetError::DeviceBroken(b));
        }
        while let Some(&slot) = self.free.last() {
            let buf = GuestBuf::new(self.addr(slot), self.buf_len);
            match self.ring.add(&[], &[buf], slot) {
                Ok(_) => {
                    self.free.pop();
                }
                Err(r) => match r.error {
                    // One descriptor per buffer and one buffer per entry: the ring
                    // cannot be full while a buffer is free, but never spin on it.
                    AddError::NoSpace { .. } => break,
                    AddError::Share(e) => return Err(NetError::Share(e)),
                    _ => return Err(self.fail(Broken::Earlier)),
                },
            }
        }
        Ok(self.ring.kick_due())
    }

    fn fail(&mut self, why: Broken) -> NetError {
        tracing::warn!(error = %why, "virtio-net receive queue broken");
        self.broken = Some(why);
        NetError::DeviceBroken(why)
    }

    /// Takes used buffers until `budget` frames were handled (delivered to `f` or
    /// dropped) or none is left; NAPI-style, with notifications off meanwhile and
    /// turned back on with a re-check once the ring is empty (virtio 1.2 §2.7.10).
    pub(crate) fn poll(
        &mut self,
        mem: &GuestMemory,
        mode: RxMode,
        budget: usize,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<usize, NetError> {
        if let Some(b) = self.broken {
            return Err(NetError::DeviceBroken(b));
        }
        let mut handled = 0;
        self.ring.disable_notifications();
        loop {
            while handled < budget {
                match self.ring.pop_used() {
                    Ok(None) => break,
                    Ok(Some(used)) => handled += usize::from(self.take(mem, mode, used, f)?),
                    Err(e) => return Err(self.fail(Broken::Ring(e))),
                }
            }
            if handled >= budget || !self.ring.enable_notifications() {
                break;
            }
            self.ring.disable_notifications();
        }
        Ok(handled)
    }

    /// Takes one used buffer; returns whether it completed a frame.
    fn take(
        &mut self,
        mem: &GuestMemory,
        mode: RxMode,
        Used { token: slot, len }: Used<u16>,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<bool, NetError> {
        // The data is in guest memory now (the model retired the buffer); the slot
        // can be re-posted once it has been copied out below.
        self.free.push(slot);
        let at = self.addr(slot);
        let hdr_len = crate::info::HDR_LEN;
        let Some(p) = self.partial.take() else {
            if len == 0 {
                self.stats.unused_buffers += 1;
                return Ok(false);
            }
            if len < hdr_len {
                return Err(self.fail(Broken::ShortUsed(len)));
            }
            let mut raw = [0u8; VirtioNetHdr::SIZE];
            mem.read(at, &mut raw)?;
            let hdr = VirtioNetHdr::read_from_bytes(&raw).unwrap_or_default();
            let remaining = if mode.mrg_rxbuf {
                let n = hdr.num_buffers.get();
                if n == 0 || n > self.ring.size() {
                    return Err(self.fail(Broken::NumBuffers(n)));
                }
                n
            } else {
                1
            };
            let p = Partial {
                hdr,
                remaining,
                len: 0,
                discard: false,
            };
            return self.append(mem, mode, p, at + u64::from(hdr_len), len - hdr_len, f);
        };
        self.append(mem, mode, p, at, len, f)
    }

    /// Copies `len` bytes at `addr` into the frame being assembled; delivers the
    /// frame when its last buffer arrived.
    fn append(
        &mut self,
        mem: &GuestMemory,
        mode: RxMode,
        mut p: Partial,
        addr: u64,
        len: u32,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<bool, NetError> {
        let len = len as usize;
        match p.len.checked_add(len) {
            Some(end) if !p.discard && end <= mode.max_frame.min(self.scratch.len()) => {
                mem.read(addr, &mut self.scratch[p.len..end])?;
                p.len = end;
            }
            _ => p.discard = true,
        }
        p.remaining -= 1;
        if p.remaining > 0 {
            self.partial = Some(p);
            return Ok(false);
        }
        if p.discard {
            self.stats.oversized += 1;
            return Ok(true);
        }
        let frame = &mut self.scratch[..p.len];
        if p.hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            // §5.1.6.4: only a driver that accepted GUEST_CSUM gets partial
            // checksums; complete it so the caller always sees a finished frame.
            match rx_partial_csum(&p.hdr, frame.len()) {
                Ok(Some(at)) if mode.guest_csum => complete_checksum(frame, at),
                _ => {
                    self.stats.bad_header += 1;
                    return Ok(true);
                }
            }
        }
        self.stats.frames += 1;
        f(frame);
        Ok(true)
    }

    /// After the device acknowledged a reset: takes every buffer back.
    pub(crate) fn teardown(&mut self) {
        self.free.extend(self.ring.reset());
        self.partial = None;
    }
}
