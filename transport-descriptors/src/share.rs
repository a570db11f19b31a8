//! The driver half of models 2 and 3: a descriptor's `addr` is the buffer's guest
//! address, so exposing a buffer is a bounds check and nothing moves.
//!
//! Indirect tables need a home the device can read: a per-queue pool of table slots
//! allocated from guest memory on first use, each large enough for a table of
//! queue-size entries (the most a chain may hold, virtio 1.2 §2.7.5.3.1), handed back
//! on retire and freed when the share is dropped.

use hypervisor::GuestMemory;
use std::sync::Arc;
use virtio_core::{Direction, DriverShare, Exposed, GuestBuf, ShareError};

/// Handle of a buffer exposed by [`DirectShare`].
#[derive(Debug, PartialEq, Eq)]
pub struct ShareToken(Kind);

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// A caller buffer: nothing to undo.
    Buffer,
    /// An indirect-table slot to return to the pool.
    Table(u64),
}

/// Driver side of models 2 and 3 for one queue.
///
/// Costs: [`expose`](DriverShare::expose) is a bounds check and a counter increment,
/// [`retire`](DriverShare::retire) a counter decrement (plus a push onto a
/// preallocated free list for a table). [`expose_table`](DriverShare::expose_table)
/// copies the table into a pooled slot; a slot is allocated from guest memory only the
/// first time the pool runs dry, at most once per queue entry.
#[derive(Debug)]
pub struct DirectShare {
    memory: Arc<GuestMemory>,
    slot_bytes: u64,
    /// Slots ready for reuse; capacity reserved for every slot there can be.
    free: Vec<u64>,
    /// Every slot allocated, freed on drop.
    slots: Vec<u64>,
    max_slots: usize,
    live: usize,
}

impl DirectShare {
    /// A share for a queue of `size` entries over the guest's own `memory`.
    pub fn new(memory: Arc<GuestMemory>, size: u16) -> DirectShare {
        let max_slots = usize::from(size.max(1));
        DirectShare {
            memory,
            slot_bytes: 16 * u64::from(size.max(1)),
            free: Vec::with_capacity(max_slots),
            slots: Vec::with_capacity(max_slots),
            max_slots,
            live: 0,
        }
    }

    /// Buffers and tables exposed and not yet retired.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Table slots allocated from guest memory so far.
    pub fn table_slots(&self) -> usize {
        self.slots.len()
    }

    fn slot(&mut self, len: u32) -> Result<u64, ShareError> {
        if let Some(s) = self.free.pop() {
            return Ok(s);
        }
        if self.slots.len() >= self.max_slots {
            return Err(ShareError::Exhausted(len));
        }
        // Descriptor tables are 16-byte aligned (virtio 1.2 §2.7.5).
        let s = self
            .memory
            .alloc(self.slot_bytes, 16)
            .map_err(|_| ShareError::Exhausted(len))?;
        self.slots.push(s);
        Ok(s)
    }
}

impl DriverShare for DirectShare {
    type Token = ShareToken;

    #[inline]
    fn expose(&mut self, buf: GuestBuf, _dir: Direction) -> Result<Exposed<ShareToken>, ShareError> {
        self.memory
            .offset_of(buf.addr, u64::from(buf.len))
            .ok_or(ShareError::OutOfBounds {
                addr: buf.addr,
                len: buf.len,
            })?;
        self.live += 1;
        Ok(Exposed {
            addr: buf.addr,
            len: buf.len,
            token: ShareToken(Kind::Buffer),
        })
    }

    fn expose_table(&mut self, table: &[u8]) -> Result<Exposed<ShareToken>, ShareError> {
        let len = u32::try_from(table.len()).map_err(|_| ShareError::Exhausted(u32::MAX))?;
        if u64::from(len) > self.slot_bytes {
            return Err(ShareError::Exhausted(len));
        }
        let slot = self.slot(len)?;
        if let Err(e) = self.memory.write(slot, table) {
            self.free.push(slot);
            return Err(ShareError::Model(Box::new(e)));
        }
        self.live += 1;
        Ok(Exposed {
            addr: slot,
            len,
            token: ShareToken(Kind::Table(slot)),
        })
    }

    #[inline]
    fn retire(&mut self, token: ShareToken, _written: u32) {
        self.live = self.live.saturating_sub(1);
        if let Kind::Table(slot) = token.0 {
            // Capacity for every slot was reserved in `new`: no allocation here.
            self.free.push(slot);
        }
    }
}

impl Drop for DirectShare {
    fn drop(&mut self) {
        for &s in &self.slots {
            if let Err(e) = self.memory.free(s, self.slot_bytes) {
                tracing::warn!(slot = s, error = %e, "freeing an indirect table slot failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::Hypervisor;

    #[test]
    fn buffers_are_bounds_checked_and_identity_mapped() {
        let hv = Hypervisor::new();
        let g = hv.create_domain("g", 1 << 16).unwrap();
        let mut s = DirectShare::new(g.memory().clone(), 8);
        let base = Hypervisor::GUEST_BASE;
        let e = s
            .expose(GuestBuf::new(base + 100, 50), Direction::ToDevice)
            .unwrap();
        assert_eq!((e.addr, e.len), (base + 100, 50));
        assert_eq!(s.live(), 1);
        s.retire(e.token, 0);
        assert_eq!(s.live(), 0);
        for bad in [
            GuestBuf::new(base - 1, 1),
            GuestBuf::new(base + (1 << 16) - 1, 2),
            GuestBuf::new(u64::MAX, 1),
            GuestBuf::new(0, 0),
        ] {
            assert!(matches!(
                s.expose(bad, Direction::FromDevice),
                Err(ShareError::OutOfBounds { .. })
            ));
        }
        assert_eq!(s.live(), 0);
    }

    #[test]
    fn table_slots_are_pooled_and_freed_on_drop() {
        let hv = Hypervisor::new();
        let g = hv.create_domain("g", 1 << 16).unwrap();
        let mem = g.memory().clone();
        let before = mem.free_bytes();
        let mut s = DirectShare::new(mem.clone(), 4);
        let a = s.expose_table(&[1u8; 32]).unwrap();
        let b = s.expose_table(&[2u8; 64]).unwrap();
        assert_ne!(a.addr, b.addr);
        assert_eq!(a.addr % 16, 0);
        let mut got = [0u8; 32];
        mem.read(a.addr, &mut got).unwrap();
        assert_eq!(got, [1u8; 32]);
        let a_addr = a.addr;
        s.retire(a.token, 0);
        let c = s.expose_table(&[3u8; 16]).unwrap();
        assert_eq!(c.addr, a_addr, "a retired slot is reused");
        assert_eq!(s.table_slots(), 2);
        // Larger than a queue-size table: refused.
        assert!(matches!(
            s.expose_table(&[0u8; 80]),
            Err(ShareError::Exhausted(80))
        ));
        let d = s.expose_table(&[4u8; 16]).unwrap();
        let e = s.expose_table(&[5u8; 16]).unwrap();
        assert!(matches!(
            s.expose_table(&[6u8; 16]),
            Err(ShareError::Exhausted(16))
        ));
        for t in [b.token, c.token, d.token, e.token] {
            s.retire(t, 0);
        }
        assert_eq!(s.live(), 0);
        drop(s);
        assert_eq!(mem.free_bytes(), before);
    }
}
