//! The transmit queue: preallocated slots and reclaim.
//!
//! Each ring entry owns one slot of `header + largest frame` bytes, carved from one
//! guest allocation made at setup. Sending copies the header and the frame into a
//! free slot and adds it as one device-readable descriptor (VERSION_1 places no
//! framing rule on how header and data are split, §5.1.6.6); completed slots are
//! reclaimed lazily, before each send. Used-buffer notifications stay off unless a
//! sender waits for room.

use crate::error::{Broken, NetError};
use hypervisor::GuestMemory;
use virtio_core::ring::queue::{AddError, DriverRing};
use virtio_core::{DriverShare, GuestBuf, ShareError};

pub(crate) struct TxQueue<S: DriverShare> {
    pub(crate) ring: DriverRing<S, u16>,
    base: u64,
    slot_len: u32,
    free: Vec<u16>,
    broken: Option<Broken>,
    /// Frames the device has taken back.
    pub(crate) completed: u64,
}

impl<S: DriverShare> TxQueue<S> {
    pub(crate) fn new(mut ring: DriverRing<S, u16>, base: u64, slot_len: u32) -> Self {
        // Reclaim is driven by sends, not by interrupts.
        ring.disable_notifications();
        let size = ring.size();
        TxQueue {
            ring,
            base,
            slot_len,
            free: (0..size).rev().collect(),
            broken: None,
            completed: 0,
        }
    }

    pub(crate) fn broken(&self) -> Option<Broken> {
        self.broken
    }

    pub(crate) fn bytes(&self) -> u64 {
        u64::from(self.slot_len) * u64::from(self.ring.size())
    }

    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    fn fail(&mut self, why: Broken) -> NetError {
        tracing::warn!(error = %why, "virtio-net transmit queue broken");
        self.broken = Some(why);
        NetError::DeviceBroken(why)
    }

    /// Takes back every slot the device used.
    pub(crate) fn reclaim(&mut self) -> Result<(), NetError> {
        if let Some(b) = self.broken {
            return Err(NetError::DeviceBroken(b));
        }
        loop {
            match self.ring.pop_used() {
                Ok(Some(used)) => {
                    self.free.push(used.token);
                    self.completed += 1;
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.fail(Broken::Ring(e))),
            }
        }
    }

    /// Copies `parts` (header, then frame) into a free slot and adds it; returns
    /// whether the device wants a notification. The caller checked the lengths.
    pub(crate) fn send(&mut self, mem: &GuestMemory, parts: &[&[u8]]) -> Result<Option<u16>, NetError> {
        if self.free.is_empty() {
            self.reclaim()?;
        }
        if let Some(b) = self.broken {
            return Err(NetError::DeviceBroken(b));
        }
        let slot = *self.free.last().ok_or(NetError::QueueFull)?;
        let at = self.base + u64::from(self.slot_len) * u64::from(slot);
        let mut off = 0u64;
        for p in parts {
            mem.write(at + off, p)?;
            off += p.len() as u64;
        }
        // `off` is at most `slot_len` (checked by the caller), a u32.
        let len = u32::try_from(off).unwrap_or(self.slot_len);
        if let Err(r) = self.ring.add(&[GuestBuf::new(at, len)], &[], slot) {
            let in_flight = self.free.len() < usize::from(self.ring.size());
            return Err(match r.error {
                // The model's room (a bounce area, grant entries) comes back with
                // the frames in flight: a full queue by another name.
                AddError::Share(ShareError::Exhausted(_)) if in_flight => NetError::QueueFull,
                AddError::Share(e) => NetError::Share(e),
                AddError::NoSpace { .. } => NetError::QueueFull,
                _ => self.fail(Broken::Earlier),
            });
        }
        self.free.pop();
        Ok(self.ring.kick_due())
    }

    /// Turns used-buffer notifications on for a sender waiting for room, delayed
    /// until three quarters of the frames in flight are sent (one wake-up per
    /// stretch of frames rather than per frame); returns `true` if that many were
    /// sent meanwhile (reclaim instead of sleeping).
    pub(crate) fn arm(&mut self) -> bool {
        self.ring.enable_notifications_delayed()
    }

    /// Turns them off again once the sender has room.
    pub(crate) fn disarm(&mut self) {
        self.ring.disable_notifications();
    }

    /// After the device acknowledged a reset: takes every slot back.
    pub(crate) fn teardown(&mut self) {
        self.free.extend(self.ring.reset());
    }
}
