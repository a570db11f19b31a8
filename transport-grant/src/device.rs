//! The device (backend) side of the grant model.
//!
//! [`GrantDevice::open_queue`] maps the ring grants (the descriptor table and the
//! available ring read-only, as granted) and keeps the mappings for the queue's life:
//! when the queue's [`GrantMemory`] is dropped they are revoked, so the ring regions
//! the device was given, clones included, stop reaching the pages before the guest
//! can end the grants and reuse them (HOSTILE 37).
//! [`GrantMemory`] reaches buffers by reference only:
//!
//! - references with the persistent hint are mapped once, one page each, and kept in
//!   a bounded cache (blkback's persistent-grant tree); accesses then copy through
//!   the mapping with no hypervisor call;
//! - other references are reached by grant copy: one table lock, a check of every
//!   page, one memcpy. Mapping them instead would cost an mmap + munmap per page
//!   (6 us alone, 14.5 us with TLB shootdowns, docs/PERF.md) against well under a
//!   microsecond for the copy.
//!
//! Nothing hands the device a [`Region`](virtio_core::shm::Region) of a buffer
//! ([`DeviceMemory::direct`] is `None`): a region could outlive the grant.

use crate::addr::{GrantAddr, decode};
use crate::error::GrantError;
use crate::service::{GrantMapping, GrantService, GrantTable};
use crate::table::{GrantRef, PAGE_BYTES, PAGE_SIZE};
use hypervisor::DomainId;
use std::cell::RefCell;
use std::sync::Arc;
use virtio_core::access::check_within;
use virtio_core::ring::areas::{RingFormat, open_ring};
use virtio_core::{AccessError, DeviceModel, DeviceQueue, ModelError, QueueAddrs, Segment};

/// Pages a queue's persistent-mapping cache holds at most (blkback's default
/// `max_persistent_grants` is 1056). A driver that hints more is served by copy
/// once the cache is full, after evicting an old mapping.
pub const MAX_CACHED_PAGES: usize = 1024;

/// Segments longer than this many pages are copied even when hinted persistent, so
/// that one segment can never sweep the cache.
const MAX_MAPPED_SEGMENT_PAGES: u64 = (MAX_CACHED_PAGES / 4) as u64;

/// The device half of the grant model: serves `guest`'s queues as `backend`.
#[derive(Debug)]
pub struct GrantDevice {
    table: Arc<GrantTable>,
    backend: DomainId,
}

impl GrantDevice {
    pub(crate) fn new(
        service: &GrantService,
        guest: DomainId,
        backend: DomainId,
    ) -> Result<GrantDevice, GrantError> {
        Ok(GrantDevice {
            table: service.table(guest)?,
            backend,
        })
    }

    /// The domain this side runs as.
    pub fn backend(&self) -> DomainId {
        self.backend
    }

    /// The guest whose grants it uses.
    pub fn guest(&self) -> DomainId {
        self.table.owner()
    }

    /// Maps `bytes` of a ring area at grant address `addr`.
    fn map_area(
        &self,
        addr: u64,
        bytes: u64,
        writable: bool,
    ) -> Result<(GrantMapping, virtio_core::shm::Region), GrantError> {
        let a = decode(addr)?;
        let end = u64::from(a.offset) + bytes;
        let pages = u32::try_from(end.div_ceil(PAGE_SIZE)).map_err(|_| GrantError::BadAddress(addr))?;
        let mapping = self.table.map(self.backend, a.gref, pages, Some(writable))?;
        let region = mapping
            .region()
            .and_then(|r| r.sub(u64::from(a.offset), bytes).ok())
            .ok_or(GrantError::BadAddress(addr))?;
        Ok((mapping, region))
    }
}

impl DeviceModel for GrantDevice {
    type Memory = GrantMemory;

    fn name(&self) -> &'static str {
        "grant"
    }

    fn open_queue_in(
        &self,
        _index: u16,
        format: RingFormat,
        size: u16,
        addrs: QueueAddrs,
    ) -> Result<DeviceQueue<GrantMemory>, ModelError> {
        let err = |e: GrantError| match e {
            GrantError::BadAddress(_) => ModelError::BadAddrs(addrs),
            e => ModelError::Model(Box::new(e)),
        };
        // Each area is mapped by its own grants: encoded addresses are linear in the
        // grant reference, so the overlap check also refuses two areas that share a
        // granted page.
        let mut rings = Vec::with_capacity(3);
        let ring = open_ring(format, size, addrs, |s| {
            let (m, r) = self.map_area(s.addr, s.len, s.device_writes).map_err(err)?;
            rings.push(m);
            Ok(r)
        })?;
        let rings: [GrantMapping; 3] = rings
            .try_into()
            .map_err(|_| ModelError::Model("a ring area was not mapped".into()))?;
        Ok(DeviceQueue {
            ring,
            memory: GrantMemory {
                table: self.table.clone(),
                backend: self.backend,
                _rings: rings,
                cache: RefCell::new(PageCache::default()),
            },
        })
    }
}

/// How the device reaches one queue's buffers: by grant reference, through the
/// persistent-mapping cache or by grant copy (see the module docs).
#[derive(Debug)]
pub struct GrantMemory {
    table: Arc<GrantTable>,
    backend: DomainId,
    /// The ring mappings, held (pinning the ring grants) for the queue's life; their
    /// drop revokes every ring region handed out with them (HOSTILE 37).
    _rings: [GrantMapping; 3],
    /// Persistent references mapped so far. A queue's memory is used by one thread
    /// (the queue's worker), so the cache needs no lock: `GrantMemory` is `Send` but
    /// not `Sync`.
    cache: RefCell<PageCache>,
}

/// References above this are served by copy rather than cached (refs are handed out
/// low first, so persistent pools sit far below it).
const MAX_CACHED_REF: u32 = 1 << 16;

/// Persistent mappings indexed directly by reference: one bounds check and one load
/// per page, no hashing.
#[derive(Debug, Default)]
struct PageCache {
    slots: Vec<Option<GrantMapping>>,
    count: usize,
    /// Where the eviction scan resumes.
    clock: usize,
}

impl PageCache {
    fn get(&self, gref: u32) -> Option<&GrantMapping> {
        self.slots.get(gref as usize)?.as_ref()
    }

    /// Caches `m` for `gref`, evicting another mapping when full.
    fn insert(&mut self, gref: u32, m: GrantMapping) -> Option<&GrantMapping> {
        if gref >= MAX_CACHED_REF {
            return None;
        }
        let i = gref as usize;
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        if self.slots[i].is_none() {
            if self.count >= MAX_CACHED_PAGES {
                self.evict_one();
            }
            self.count += 1;
        }
        self.slots[i] = Some(m);
        self.slots[i].as_ref()
    }

    fn evict_one(&mut self) {
        let n = self.slots.len();
        for k in 0..n {
            let i = (self.clock + k) % n;
            if self.slots[i].take().is_some() {
                self.count -= 1;
                self.clock = (i + 1) % n;
                return;
            }
        }
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.count = 0;
        self.clock = 0;
    }
}

fn access(e: GrantError) -> AccessError {
    AccessError::Model(Box::new(e))
}

/// A byte range of a segment split into pages: `(reference, offset in page, length,
/// offset in the caller's buffer)`.
fn pieces(a: GrantAddr, offset: u32, len: usize) -> impl Iterator<Item = (u32, u64, usize, usize)> {
    let start = u64::from(a.offset) + u64::from(offset);
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = start + done as u64;
        let in_page = at % PAGE_SIZE;
        // `in_page < 4096`.
        let n = (PAGE_BYTES - in_page as usize).min(len - done);
        // The page index was bounded when the segment was checked; `checked_add`
        // keeps a wrapped reference from ever being formed.
        let gref = a.gref.0.checked_add(u32::try_from(at / PAGE_SIZE).ok()?)?;
        let piece = (gref, in_page, n, done);
        done += n;
        Some(piece)
    })
}

impl GrantMemory {
    /// Mappings in the persistent cache (diagnostics).
    pub fn cached_pages(&self) -> usize {
        self.cache.borrow().count
    }

    /// Drops every cached persistent mapping, so the driver can end those grants.
    pub fn flush_cache(&self) {
        self.cache.borrow_mut().clear();
    }

    /// Whether `[a.offset, a.offset + len)` may go through the cache.
    fn cacheable(a: GrantAddr, len: u64) -> bool {
        a.persistent && (u64::from(a.offset) + len).div_ceil(PAGE_SIZE) <= MAX_MAPPED_SEGMENT_PAGES
    }

    /// Runs `op` on the cached mapping of each page of the range, mapping missing
    /// pages; every page must belong to the segment's first page's grant range and be
    /// writable when `write`. `None` if any page cannot be mapped (the caller then
    /// falls back to a checked copy, which reports the precise refusal).
    fn with_mapped(
        &self,
        a: GrantAddr,
        offset: u32,
        len: usize,
        write: bool,
        mut op: impl FnMut(&GrantMapping, u64, usize, usize) -> Result<(), GrantError>,
    ) -> Option<Result<(), GrantError>> {
        let mut cache = self.cache.borrow_mut();
        // Every page is mapped and checked before any byte moves: a refusal found on
        // a later page must not leave the earlier ones written (a refused access
        // moves nothing, HOSTILE 30).
        // The pages reached must be of the grant range of the segment's own first
        // page, as `resolve` requires of a checked copy: a large offset must not run
        // on into another range.
        if cache.get(a.gref.0).is_none() {
            let m = self.table.map(self.backend, a.gref, 1, None).ok()?;
            cache.insert(a.gref.0, m)?;
        }
        let mut range = Some(cache.get(a.gref.0)?.range_first());
        for (gref, _, _, _) in pieces(a, offset, len.max(1)) {
            if cache.get(gref).is_none() {
                let m = self.table.map(self.backend, GrantRef(gref), 1, None).ok()?;
                cache.insert(gref, m)?;
            }
            let m = cache.get(gref)?;
            if *range.get_or_insert(m.range_first()) != m.range_first() || (write && !m.is_writable()) {
                return None;
            }
        }
        // Mapping a later page may have evicted an earlier one from a full cache: the
        // checked copy then serves the access.
        if !pieces(a, offset, len.max(1)).all(|(gref, ..)| cache.get(gref).is_some()) {
            return None;
        }
        for (gref, in_page, n, at) in pieces(a, offset, len.max(1)) {
            let m = cache.get(gref)?;
            if len > 0
                && let Err(e) = op(m, in_page, n.min(len - at), at)
            {
                return Some(Err(e));
            }
        }
        Some(Ok(()))
    }
}

impl virtio_core::DeviceMemory for GrantMemory {
    fn check(&self, seg: &Segment) -> Result<(), AccessError> {
        let a = decode(seg.addr()).map_err(access)?;
        let len = u64::from(seg.len());
        if Self::cacheable(a, len) {
            let fits = self.with_mapped(a, 0, seg.len() as usize, seg.writable(), |_, _, _, _| Ok(()));
            if let Some(Ok(())) = fits {
                return Ok(());
            }
        }
        self.table
            .check(self.backend, a.gref, u64::from(a.offset), len, seg.writable())
            .map_err(access)
    }

    fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError> {
        check_within(seg, offset, dst.len())?;
        let a = decode(seg.addr()).map_err(access)?;
        if Self::cacheable(a, u64::from(seg.len())) {
            let done = self.with_mapped(a, offset, dst.len(), false, |m, in_page, n, at| {
                m.read(in_page, &mut dst[at..at + n])
            });
            if let Some(r) = done {
                return r.map_err(access);
            }
        }
        let at = u64::from(a.offset) + u64::from(offset);
        self.table
            .copy_from(self.backend, a.gref, at, dst)
            .map_err(access)
    }

    fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError> {
        if !seg.writable() {
            return Err(AccessError::Denied);
        }
        check_within(seg, offset, src.len())?;
        let a = decode(seg.addr()).map_err(access)?;
        if Self::cacheable(a, u64::from(seg.len())) {
            let done = self.with_mapped(a, offset, src.len(), true, |m, in_page, n, at| {
                m.write(in_page, &src[at..at + n])
            });
            if let Some(r) = done {
                return r.map_err(access);
            }
        }
        let at = u64::from(a.offset) + u64::from(offset);
        self.table.copy_to(self.backend, a.gref, at, src).map_err(access)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::encode;
    use hypervisor::Hypervisor;
    use virtio_core::{DescSlot, DeviceMemory, DriverModel};

    /// A persistent-hinted write whose second page leaves the grant range is refused,
    /// and refused before any byte moves: the first page, which the device may
    /// write, keeps its bytes (found by the `device_memory` fuzz target).
    #[test]
    fn a_refused_cached_write_moves_no_byte() {
        let hv = Hypervisor::new();
        let guest = hv.create_domain("guest", 1 << 20).unwrap();
        let grants = GrantService::new(hv.clone());
        let (driver, device) = crate::pair(&grants, &guest, Hypervisor::HOST).unwrap();
        let pool = driver.persistent_pool(PAGE_SIZE).unwrap();
        let q = driver.create_queue(0, 8).unwrap();
        let dq = device.open_queue(0, 8, q.addrs).unwrap();
        let mem = guest.memory();
        mem.write(pool.base() + PAGE_SIZE - 16, &[0xaa; 16]).unwrap();
        // 16 bytes at the end of the pool's page, then 16 of the next reference (a
        // ring page of another grant range).
        let addr = encode(pool.first_ref(), 4096 - 16, true);
        let seg = Segment::new(addr, 32, true, 0, DescSlot::Table(0));
        assert!(dq.memory.write(&seg, 0, &[0x55; 32]).is_err());
        let mut after = [0u8; 16];
        mem.read(pool.base() + PAGE_SIZE - 16, &mut after).unwrap();
        assert_eq!(after, [0xaa; 16], "a refused write changed the pool");
    }
    /// A persistent-hinted segment cannot run on into another grant range, however
    /// far its offset: the pages reached must be of the segment's own range, as for
    /// the checked copy (found by the `device_memory` fuzz target).
    #[test]
    fn a_cached_access_stays_in_the_segments_grant_range() {
        let hv = Hypervisor::new();
        let guest = hv.create_domain("guest", 1 << 20).unwrap();
        let grants = GrantService::new(hv.clone());
        let (driver, device) = crate::pair(&grants, &guest, Hypervisor::HOST).unwrap();
        let a = driver.persistent_pool(PAGE_SIZE).unwrap();
        let b = driver.persistent_pool(PAGE_SIZE).unwrap();
        assert_eq!(b.first_ref().0, a.first_ref().0 + 1, "consecutive ranges");
        let q = driver.create_queue(0, 8).unwrap();
        let dq = device.open_queue(0, 8, q.addrs).unwrap();
        let seg = Segment::new(
            encode(a.first_ref(), 0, true),
            2 * 4096,
            true,
            0,
            DescSlot::Table(0),
        );
        let mut buf = [0u8; 16];
        assert!(
            dq.memory.read(&seg, 4096, &mut buf).is_err(),
            "read pool b through pool a"
        );
        assert!(
            dq.memory.write(&seg, 4096, &buf).is_err(),
            "wrote pool b through pool a"
        );
        assert!(dq.memory.read(&seg, 4096, &mut []).is_err());
    }

    /// A device that forges the persistent hint on a one-shot buffer grant cannot
    /// map it: one-shot grants are for copying only. Mapped, the grant could not
    /// be revoked when the driver retires the buffer (the revocation is deferred
    /// while mapped), and the caller reuses memory the device could still write
    /// (found by the `device_memory` fuzz target, seed
    /// `grant-forged-persistent-defers`).
    #[test]
    fn a_forged_persistent_hint_cannot_keep_a_retired_buffer() {
        use crate::addr::decode;
        use virtio_core::{Direction, DriverShare, GuestBuf};
        let hv = Hypervisor::new();
        let guest = hv.create_domain("guest", 1 << 20).unwrap();
        let grants = GrantService::new(hv.clone());
        let (driver, device) = crate::pair(&grants, &guest, Hypervisor::HOST).unwrap();
        let mut q = driver.create_queue(0, 8).unwrap();
        let dq = device.open_queue(0, 8, q.addrs).unwrap();
        let mem = guest.memory();
        let buf = mem.alloc_pages(1).unwrap();
        let exposed = q
            .share
            .expose(GuestBuf::new(buf, 4096), Direction::FromDevice)
            .unwrap();
        let a = decode(exposed.addr).unwrap();
        let forged = Segment::new(encode(a.gref, a.offset, true), 4096, true, 0, DescSlot::Table(0));
        // While the buffer is the device's, it may write it (by copy).
        dq.memory.write(&forged, 0, b"mine").unwrap();
        q.share.retire(exposed.token, 4);
        assert_eq!(q.share.deferred(), 0, "no revocation was deferred");
        mem.write(buf, b"reused by the guest").unwrap();
        assert!(
            dq.memory.write(&forged, 0, b"LATE").is_err(),
            "the device wrote a retired buffer"
        );
        let mut back = [0u8; 19];
        mem.read(buf, &mut back).unwrap();
        assert_eq!(&back, b"reused by the guest");
    }
}
