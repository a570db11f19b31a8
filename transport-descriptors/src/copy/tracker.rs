//! What the copy helper knows about one queue: which heads the device owns, and which
//! descriptors belong to the chain at a head.
//!
//! Ownership is counted per head: +1 for every entry of the available ring (written by
//! the guest, trusted: the guest can only hurt itself), -1 for every entry of the used
//! ring (written by the device, untrusted: a bogus entry can only drop the device's own
//! ownership, so counts are clamped at 0). The helper reads both rings from private
//! positions, never from the device's view of them.
//!
//! Syncing is lazy where that is safe and eager where it must be:
//! - the available ring is read only when a copy names a head that is not owned
//!   (missing an entry can only refuse a copy, and the refusal re-syncs first);
//! - the used index is compared on every helper call (one two-byte load from a line
//!   the device itself writes), because a head the device has returned must stop being
//!   reachable before the guest reuses its descriptors.
//!
//! Completions are applied only after everything made available before them: when a
//! used entry names a head whose count is 0, the available ring is synced first. The
//! used index is loaded before the available index, so an honest device's completion is
//! never applied before the matching available entry and ownership cannot outlive it.
//!
//! Membership walks follow the trusted descriptor table from the head (at most queue
//! size steps) and, for an indirect chain, the indirect table (at most its length), and
//! remember every descriptor they pass in a small direct-mapped cache. A cache entry
//! carries the head's epoch, which every completion of that head bumps, so a chain the
//! device returned is never served from the cache.

use hypervisor::GuestMemory;
use std::sync::atomic::Ordering;
use virtio_core::DescSlot;
use virtio_core::RingMemory;
use virtio_core::ring::layout::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use virtio_core::shm::Region;

use super::CopyError;

/// A descriptor as read from the trusted table: private copy, read once per walk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Desc {
    pub(super) addr: u64,
    pub(super) len: u32,
    pub(super) flags: u16,
}

impl Desc {
    /// Whether the device may read it: device-readable buffers, and an indirect table
    /// (whose write flag the device ignores, virtio 1.2 §2.7.5.3.2). A device reads
    /// only device-readable buffers (§2.7.4), so writable descriptors are refused.
    pub(super) fn readable(&self, slot: DescSlot) -> bool {
        self.flags & VIRTQ_DESC_F_WRITE == 0
            || (matches!(slot, DescSlot::Table(_)) && self.flags & VIRTQ_DESC_F_INDIRECT != 0)
    }

    /// Whether the device may write it: device-writable buffers only.
    pub(super) fn writable(&self) -> bool {
        self.flags & VIRTQ_DESC_F_WRITE != 0 && self.flags & VIRTQ_DESC_F_INDIRECT == 0
    }

    fn parse(raw: [u8; 16]) -> (Desc, u16) {
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = raw;
        (
            Desc {
                addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
                len: u32::from_le_bytes([l0, l1, l2, l3]),
                flags: u16::from_le_bytes([f0, f1]),
            },
            u16::from_le_bytes([n0, n1]),
        )
    }
}

/// Ways per table kind in the walk cache.
const WAYS: usize = 16;

#[derive(Debug, Clone, Copy, Default)]
struct CacheEntry {
    valid: bool,
    /// `head << 16 | slot code`.
    key: u32,
    epoch: u32,
    desc: Desc,
}

/// Cache way and key of `(head, slot)`.
#[inline]
fn cache_key(head: u16, slot: DescSlot) -> (usize, u32) {
    let (way, code) = match slot {
        DescSlot::Table(i) => (usize::from(i) % WAYS, i & 0x7fff),
        DescSlot::Indirect(j) => (WAYS + usize::from(j) % WAYS, (j & 0x7fff) | 0x8000),
    };
    (way, u32::from(head) << 16 | u32::from(code))
}

/// The `u16` at `off` of a ring region, one atomic load. The regions are sized and
/// aligned by the layout, so the load cannot fail, and 0 is a harmless value if it
/// ever did.
#[inline]
fn load_u16(r: &Region, off: u64, order: Ordering) -> u16 {
    r.load_u16(off, order).unwrap_or(0)
}

#[inline]
fn load_u32(r: &Region, off: u64) -> u32 {
    r.load_u32(off, Ordering::Relaxed).unwrap_or(u32::MAX)
}

/// Ownership and membership state of one registered queue.
pub(super) struct Tracker {
    size: u16,
    /// The guest's own views of its rings (the helper's trusted access).
    ring: RingMemory,
    /// Next available-ring position to account.
    avail_pos: u16,
    /// Next used-ring position to account.
    used_pos: u16,
    /// Per head: times made available minus times used, clamped at 0.
    owned: Box<[u32]>,
    /// Per head: bumped on every completion, invalidating cached walks.
    epoch: Box<[u32]>,
    cache: Box<[CacheEntry; 2 * WAYS]>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("size", &self.size)
            .field("avail_pos", &self.avail_pos)
            .field("used_pos", &self.used_pos)
            .finish_non_exhaustive()
    }
}

impl Tracker {
    /// Tracks a queue of `size` (a valid queue size) whose rings the guest reaches
    /// through `ring`. Counting starts at ring position 0, as the device's does.
    pub(super) fn new(size: u16, ring: RingMemory) -> Tracker {
        let n = usize::from(size);
        Tracker {
            size,
            ring,
            avail_pos: 0,
            used_pos: 0,
            owned: vec![0; n].into_boxed_slice(),
            epoch: vec![0; n].into_boxed_slice(),
            cache: Box::new([CacheEntry::default(); 2 * WAYS]),
        }
    }

    #[inline]
    fn slot(&self, pos: u16) -> u64 {
        u64::from(pos & (self.size - 1))
    }

    /// Whether the device owns `head` now (after syncing the available ring if not).
    pub(super) fn owns(&mut self, head: u16) -> bool {
        let h = usize::from(head);
        match self.owned.get(h) {
            None => false,
            Some(&c) if c > 0 => true,
            Some(_) => {
                self.sync_avail();
                self.owned[h] > 0
            }
        }
    }

    /// Accounts new available-ring entries (virtio 1.2 §2.7.6).
    fn sync_avail(&mut self) {
        // Acquire pairs with the driver's Release store of avail.idx: the ring entries
        // and the descriptors it published are visible to the loads below.
        let idx = load_u16(&self.ring.driver, 2, Ordering::Acquire);
        let n = idx.wrapping_sub(self.avail_pos);
        if n == 0 {
            return;
        }
        if n > self.size {
            // The guest broke its own ring (HOSTILE rule 8): grant nothing more; the
            // device side puts the queue in needs-reset.
            tracing::debug!(
                idx,
                pos = self.avail_pos,
                "avail.idx too far ahead; not accounted"
            );
            return;
        }
        for k in 0..n {
            let pos = self.avail_pos.wrapping_add(k);
            let head = load_u16(&self.ring.driver, 4 + 2 * self.slot(pos), Ordering::Relaxed);
            if let Some(c) = self.owned.get_mut(usize::from(head)) {
                *c = c.saturating_add(1);
            }
        }
        self.avail_pos = idx;
    }

    /// Accounts new used-ring entries (virtio 1.2 §2.7.8); called at the start of
    /// every helper call.
    pub(super) fn refresh_used(&mut self) {
        // Acquire pairs with the device's Release store of used.idx (its elements are
        // visible). Loading used.idx before avail.idx (in `complete`) is what keeps
        // completions after the availabilities they answer.
        let idx = load_u16(&self.ring.device, 2, Ordering::Acquire);
        let n = idx.wrapping_sub(self.used_pos);
        if n == 0 {
            return;
        }
        if n > self.size {
            // More completions than the ring holds: the device wrote nonsense. It
            // loses everything it owned, including what the guest already published.
            tracing::debug!(
                idx,
                pos = self.used_pos,
                "used.idx too far ahead; revoking ownership"
            );
            self.sync_avail();
            self.owned.fill(0);
            for e in self.epoch.iter_mut() {
                *e = e.wrapping_add(1);
            }
            self.used_pos = idx;
            return;
        }
        for k in 0..n {
            let pos = self.used_pos.wrapping_add(k);
            let id = load_u32(&self.ring.device, 4 + 8 * self.slot(pos));
            self.complete(id);
        }
        self.used_pos = idx;
    }

    /// Accounts one used element naming `id`.
    fn complete(&mut self, id: u32) {
        let Some(h) = u16::try_from(id)
            .ok()
            .map(usize::from)
            .filter(|&h| h < self.owned.len())
        else {
            return; // not a head: only the device's own bookkeeping suffers
        };
        if self.owned[h] == 0 {
            // Perhaps made available after our last sync: account that first.
            self.sync_avail();
        }
        if let Some(c) = self.owned[h].checked_sub(1) {
            self.owned[h] = c;
            self.epoch[h] = self.epoch[h].wrapping_add(1);
        }
    }

    /// The trusted descriptor at `slot` of the chain headed by `head`, which the device
    /// must own.
    pub(super) fn resolve(
        &mut self,
        mem: &GuestMemory,
        head: u16,
        slot: DescSlot,
    ) -> Result<Desc, CopyError> {
        if !self.owns(head) {
            return Err(CopyError::NotOwned { head });
        }
        let (way, key) = cache_key(head, slot);
        let e = &self.cache[way];
        if e.valid && e.key == key && e.epoch == self.epoch[usize::from(head)] {
            return Ok(e.desc);
        }
        self.walk(mem, head, slot)
            .ok_or(CopyError::NotInChain { head, slot })
    }

    fn remember(&mut self, head: u16, slot: DescSlot, desc: Desc) {
        let (way, key) = cache_key(head, slot);
        self.cache[way] = CacheEntry {
            valid: true,
            key,
            epoch: self.epoch[usize::from(head)],
            desc,
        };
    }

    fn read_desc(&self, i: u16) -> Option<(Desc, u16)> {
        let mut raw = [0u8; 16];
        self.ring.desc.read(16 * u64::from(i), &mut raw).ok()?;
        Some(Desc::parse(raw))
    }

    /// Walks the whole chain at `head`, caching every descriptor, and returns `want`
    /// if the chain holds it.
    fn walk(&mut self, mem: &GuestMemory, head: u16, want: DescSlot) -> Option<Desc> {
        let mut found = None;
        let mut idx = head;
        // A chain has at most queue-size descriptors (virtio 1.2 §2.7.5.2): this bounds
        // loops in the guest's table.
        for _ in 0..self.size {
            let (d, next) = self.read_desc(idx)?;
            self.remember(head, DescSlot::Table(idx), d);
            if want == DescSlot::Table(idx) {
                found = Some(d);
            }
            if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                // The indirect descriptor ends the direct part (§2.7.5.3.1).
                let inner = self.walk_indirect(mem, head, d, want);
                return found.or(inner);
            }
            if d.flags & VIRTQ_DESC_F_NEXT == 0 || next >= self.size {
                break;
            }
            idx = next;
        }
        found
    }

    /// Walks the indirect table `table` from entry 0 (at most its length in steps).
    fn walk_indirect(&mut self, mem: &GuestMemory, head: u16, table: Desc, want: DescSlot) -> Option<Desc> {
        if table.len == 0 || !table.len.is_multiple_of(16) || table.len / 16 > u32::from(self.size) {
            return None;
        }
        // At most `size` (<= 32768) entries.
        let n = u16::try_from(table.len / 16).ok()?;
        let mut found = None;
        let mut j: u16 = 0;
        for _ in 0..n {
            let gpa = table.addr.checked_add(16 * u64::from(j))?;
            let mut raw = [0u8; 16];
            mem.read(gpa, &mut raw).ok()?;
            let (d, next) = Desc::parse(raw);
            if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                break; // nested indirect ends the chain (§2.7.5.3.1)
            }
            self.remember(head, DescSlot::Indirect(j), d);
            if want == DescSlot::Indirect(j) {
                found = Some(d);
            }
            if d.flags & VIRTQ_DESC_F_NEXT == 0 || next >= n {
                break;
            }
            j = next;
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::Hypervisor;
    use std::sync::Arc;
    use virtio_core::DriverModel;

    /// A guest with one queue of 8 and a tracker over it.
    struct Fixture {
        mem: Arc<GuestMemory>,
        ring: RingMemory,
        t: Tracker,
        avail: u16,
        used: u16,
    }

    impl Fixture {
        fn new() -> Fixture {
            let hv = Hypervisor::new();
            let g = hv.create_domain("g", 1 << 20).unwrap();
            let (drv, _) = crate::copy::pair(&g).unwrap();
            let q = drv.create_queue(0, 8).unwrap();
            Fixture {
                mem: g.memory().clone(),
                t: Tracker::new(8, q.ring.clone()),
                ring: q.ring,
                avail: 0,
                used: 0,
            }
        }

        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            self.ring.desc.write(16 * u64::from(i), &raw).unwrap();
        }

        fn make_available(&mut self, head: u16) {
            let slot = u64::from(self.avail % 8);
            self.ring.driver.write(4 + 2 * slot, &head.to_le_bytes()).unwrap();
            self.avail = self.avail.wrapping_add(1);
            self.ring.driver.write(2, &self.avail.to_le_bytes()).unwrap();
        }

        fn complete(&mut self, id: u32) {
            let slot = u64::from(self.used % 8);
            self.ring.device.write(4 + 8 * slot, &id.to_le_bytes()).unwrap();
            self.used = self.used.wrapping_add(1);
            self.ring.device.write(2, &self.used.to_le_bytes()).unwrap();
        }
    }

    #[test]
    fn availability_grants_and_completion_revokes() {
        let mut f = Fixture::new();
        assert!(!f.t.owns(3));
        f.make_available(3);
        assert!(f.t.owns(3), "a miss syncs the available ring");
        f.complete(3);
        f.t.refresh_used();
        assert!(!f.t.owns(3));
        // The same head twice: owned until both are used.
        f.make_available(3);
        f.make_available(3);
        f.complete(3);
        f.t.refresh_used();
        assert!(f.t.owns(3));
        f.complete(3);
        f.t.refresh_used();
        assert!(!f.t.owns(3));
        assert!(!f.t.owns(8), "not a head");
    }

    #[test]
    fn completion_seen_before_its_availability_still_revokes() {
        let mut f = Fixture::new();
        // The device took head 2 and completed it before the helper ever synced the
        // available ring: the completion must not be lost.
        f.make_available(2);
        f.complete(2);
        f.t.refresh_used();
        assert!(!f.t.owns(2));
    }

    #[test]
    fn bogus_completions_only_drop_ownership() {
        let mut f = Fixture::new();
        f.make_available(1);
        f.make_available(4);
        assert!(f.t.owns(1) && f.t.owns(4));
        for bogus in [7, 99, u32::MAX] {
            f.complete(bogus);
        }
        f.t.refresh_used();
        assert!(f.t.owns(1) && f.t.owns(4), "unknown ids change nothing");
        f.complete(1);
        f.t.refresh_used();
        assert!(!f.t.owns(1) && f.t.owns(4));
        // used.idx jumping past the ring size revokes everything.
        f.used = f.used.wrapping_add(100);
        f.ring.device.write(2, &f.used.to_le_bytes()).unwrap();
        f.t.refresh_used();
        assert!(!f.t.owns(4));
        // The queue goes on: a new availability is owned again.
        f.make_available(5);
        assert!(f.t.owns(5));
    }

    #[test]
    fn walks_follow_the_trusted_chain_and_are_cached_per_epoch() {
        let mut f = Fixture::new();
        let buf = f.mem.alloc(256, 16).unwrap();
        let table = f.mem.alloc(48, 16).unwrap();
        // Head 0 -> 5 -> 2(indirect: entry 0 -> entry 2).
        f.desc(0, buf, 10, VIRTQ_DESC_F_NEXT, 5);
        f.desc(5, buf + 16, 20, VIRTQ_DESC_F_NEXT, 2);
        f.desc(2, table, 48, VIRTQ_DESC_F_INDIRECT, 0);
        let mut raw = [0u8; 48];
        raw[..8].copy_from_slice(&(buf + 64).to_le_bytes());
        raw[8..12].copy_from_slice(&30u32.to_le_bytes());
        raw[12..14].copy_from_slice(&VIRTQ_DESC_F_NEXT.to_le_bytes());
        raw[14..16].copy_from_slice(&2u16.to_le_bytes());
        raw[32..40].copy_from_slice(&(buf + 128).to_le_bytes());
        raw[40..44].copy_from_slice(&40u32.to_le_bytes());
        raw[44..46].copy_from_slice(&VIRTQ_DESC_F_WRITE.to_le_bytes());
        f.mem.write(table, &raw).unwrap();
        f.make_available(0);
        let m = &f.mem.clone();
        assert_eq!(f.t.resolve(m, 0, DescSlot::Table(5)).unwrap().len, 20);
        assert_eq!(f.t.resolve(m, 0, DescSlot::Indirect(2)).unwrap().len, 40);
        assert_eq!(f.t.resolve(m, 0, DescSlot::Indirect(0)).unwrap().len, 30);
        assert!(
            f.t.resolve(m, 0, DescSlot::Table(2))
                .unwrap()
                .readable(DescSlot::Table(2))
        );
        assert!(matches!(
            f.t.resolve(m, 0, DescSlot::Indirect(1)),
            Err(CopyError::NotInChain { head: 0, .. })
        ));
        assert!(matches!(
            f.t.resolve(m, 0, DescSlot::Table(1)),
            Err(CopyError::NotInChain { .. })
        ));
        assert!(matches!(
            f.t.resolve(m, 5, DescSlot::Table(5)),
            Err(CopyError::NotOwned { head: 5 })
        ));
        // Once used, cached walks are gone with the ownership; re-made available with a
        // different chain, the new chain is what counts.
        f.complete(0);
        f.t.refresh_used();
        assert!(matches!(
            f.t.resolve(m, 0, DescSlot::Table(5)),
            Err(CopyError::NotOwned { .. })
        ));
        f.desc(0, buf, 10, 0, 0);
        f.make_available(0);
        assert!(matches!(
            f.t.resolve(m, 0, DescSlot::Table(5)),
            Err(CopyError::NotInChain { .. })
        ));
        assert_eq!(f.t.resolve(m, 0, DescSlot::Table(0)).unwrap().flags, 0);
    }

    #[test]
    fn loops_and_bad_indirect_tables_end_the_walk() {
        let mut f = Fixture::new();
        let buf = f.mem.alloc(64, 16).unwrap();
        f.desc(0, buf, 1, VIRTQ_DESC_F_NEXT, 1);
        f.desc(1, buf, 1, VIRTQ_DESC_F_NEXT, 0); // loop
        f.desc(3, buf, 24, VIRTQ_DESC_F_INDIRECT, 0); // not a multiple of 16
        f.desc(4, u64::MAX - 8, 32, VIRTQ_DESC_F_INDIRECT, 0); // wraps
        f.make_available(0);
        f.make_available(3);
        f.make_available(4);
        let m = &f.mem.clone();
        assert!(f.t.resolve(m, 0, DescSlot::Table(1)).is_ok());
        assert!(f.t.resolve(m, 0, DescSlot::Table(6)).is_err());
        assert!(f.t.resolve(m, 3, DescSlot::Indirect(0)).is_err());
        assert!(f.t.resolve(m, 4, DescSlot::Indirect(1)).is_err());
    }
}
