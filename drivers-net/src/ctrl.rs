//! The control queue (CTRL_VQ, virtio 1.2 §5.1.6.5): one command at a time, each
//! in a preallocated slot, waited for with a deadline.
//!
//! A slot holds `class, command, data` (device-readable) and, in its last byte,
//! the `ack` (device-writable): two descriptors per command. The driver holds the
//! queue's lock from adding a command until its answer, so commands take effect in
//! the order they were issued. A command the device does not answer in time keeps
//! its slot until the device returns it (the device may still write the ack);
//! later commands reclaim such slots as they come back, and the memory is freed
//! only after a reset.

use crate::error::{Broken, NetError};
use hypervisor::GuestMemory;
use virtio_core::ring::queue::{AddError, DriverRing};
use virtio_core::{DriverShare, GuestBuf};

/// Bytes of a command slot: header, data and the ack byte.
pub(crate) const SLOT_LEN: u32 = 256;

/// Longest command data a slot holds.
pub(crate) const MAX_DATA: usize = SLOT_LEN as usize - 3;

/// Queue size the driver asks for: commands are issued one at a time, the rest
/// only hold slots of commands that timed out.
pub(crate) const CTRL_QUEUE_SIZE: u16 = 16;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The device wrote this ack.
    Ack(u8),
    /// The device returned the command with used length 0: no ack.
    NoAck,
}

pub(crate) struct CtrlQueue<S: DriverShare> {
    pub(crate) ring: DriverRing<S, u16>,
    base: u64,
    free: Vec<u16>,
    broken: Option<Broken>,
}

impl<S: DriverShare> CtrlQueue<S> {
    pub(crate) fn new(mut ring: DriverRing<S, u16>, base: u64) -> Self {
        // Notifications are wanted only while a caller waits for an answer.
        ring.disable_notifications();
        let size = ring.size();
        CtrlQueue {
            ring,
            base,
            free: (0..size).rev().collect(),
            broken: None,
        }
    }

    pub(crate) fn broken(&self) -> Option<Broken> {
        self.broken
    }

    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    pub(crate) fn bytes(&self) -> u64 {
        u64::from(SLOT_LEN) * u64::from(self.ring.size())
    }

    fn slot_addr(&self, slot: u16) -> u64 {
        self.base + u64::from(SLOT_LEN) * u64::from(slot)
    }

    fn fail(&mut self, why: Broken) -> NetError {
        tracing::warn!(error = %why, "virtio-net control queue broken");
        self.broken = Some(why);
        NetError::DeviceBroken(why)
    }

    /// Writes `command` (header and data, at most [`MAX_DATA`] + 2 bytes, checked
    /// by the caller) into a free slot and adds it; returns the slot and whether
    /// the device wants a notification.
    pub(crate) fn send(&mut self, mem: &GuestMemory, command: &[u8]) -> Result<(u16, Option<u16>), NetError> {
        if let Some(b) = self.broken {
            return Err(NetError::DeviceBroken(b));
        }
        let slot = *self.free.last().ok_or(NetError::QueueFull)?;
        let at = self.slot_addr(slot);
        let ack_at = at + u64::from(SLOT_LEN) - 1;
        mem.write(at, command)?;
        // What the caller reads if the device claims to have written the ack
        // without doing so: a refusal, never a false success.
        mem.write(ack_at, &[virtio_core::net::CtrlAck::Err.raw()])?;
        let out = GuestBuf::new(at, u32::try_from(command.len()).unwrap_or(SLOT_LEN - 1));
        if let Err(r) = self.ring.add(&[out], &[GuestBuf::new(ack_at, 1)], slot) {
            return Err(match r.error {
                AddError::Share(e) => NetError::Share(e),
                AddError::NoSpace { .. } => NetError::QueueFull,
                _ => self.fail(Broken::Earlier),
            });
        }
        self.free.pop();
        Ok((slot, self.ring.kick_due()))
    }

    /// Takes every command the device returned; `Some` with the answer once
    /// `slot`'s came back. Slots of earlier, timed-out commands are freed.
    pub(crate) fn answer(&mut self, mem: &GuestMemory, slot: u16) -> Result<Option<Answer>, NetError> {
        if let Some(b) = self.broken {
            return Err(NetError::DeviceBroken(b));
        }
        loop {
            match self.ring.pop_used() {
                Ok(None) => return Ok(None),
                Ok(Some(used)) => {
                    self.free.push(used.token);
                    if used.token != slot {
                        continue;
                    }
                    // The ring checked that `len` is at most the 1 writable byte.
                    if used.len == 0 {
                        return Ok(Some(Answer::NoAck));
                    }
                    let mut ack = [0u8];
                    mem.read(self.slot_addr(slot) + u64::from(SLOT_LEN) - 1, &mut ack)?;
                    return Ok(Some(Answer::Ack(ack[0])));
                }
                Err(e) => return Err(self.fail(Broken::Ring(e))),
            }
        }
    }

    /// After the device acknowledged a reset: takes every slot back.
    pub(crate) fn teardown(&mut self) {
        self.free.extend(self.ring.reset());
    }
}
