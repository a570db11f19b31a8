//! The driver (granting guest) side of the grant model.
//!
//! - Rings: each area gets its own pages, granted to the backend for the queue's
//!   life: the descriptor table and the available ring read-only, the used ring
//!   writable (so the device cannot forge descriptors or heads).
//! - One-shot buffers: [`GrantShare::expose`] grants exactly the buffer's bytes
//!   ([`GrantTable::grant_range`], read-only for device-readable buffers) and
//!   [`GrantShare::retire`] ends access.
//! - Persistent buffers ([`PersistentPool`]): pages granted once, writable, for the
//!   pool's life; a buffer inside a pool is exposed as its persistent reference with
//!   the `P` hint (see [`crate::addr`]), with no grant operation and no allocation.
//! - Indirect tables live in table slots: whole pages granted read-only and
//!   persistently, reused after their chain is retired.
//!
//! Revocation never fails silently. A grant that is still mapped when its access
//! ends is *deferred*: it stays in a pending list, retried on later calls, and its
//! reference (and, for pages this module owns, the page) is not reused until the
//! revocation succeeds. Pending grants of a dropped queue or pool move to a list
//! shared with the [`GrantDriver`], retried by [`GrantDriver::reap`] and on every
//! queue or pool creation.

use crate::addr::encode;
use crate::error::GrantError;
use crate::service::{GrantService, GrantTable};
use crate::table::{GrantRange, GrantRef, PAGE_SIZE};
use hypervisor::{Domain, DomainId, GuestMemory};
use std::sync::{Arc, Mutex, Weak};
use virtio_core::ring::areas::RingFormat;
use virtio_core::ring::layout::SplitLayout;
use virtio_core::{
    Direction, DriverModel, DriverQueue, DriverShare, Exposed, GuestBuf, ModelError, QueueAddrs, RingMemory,
    ShareError,
};

/// A grant whose revocation failed because it is mapped; `page` is freed to the
/// guest allocator once it succeeds (pages this module allocated), `None` for the
/// caller's buffers.
#[derive(Debug, Clone, Copy)]
struct Deferred {
    gref: GrantRef,
    page: Option<u64>,
}

/// Retries `list` under one table lock; frees the pages of revoked entries.
fn retry(table: &GrantTable, list: &mut Vec<Deferred>) {
    if list.is_empty() {
        return;
    }
    let mut freed: Vec<u64> = Vec::new();
    {
        let mut t = table.lock();
        list.retain(|d| match t.end(d.gref) {
            Ok(()) => {
                freed.extend(d.page);
                false
            }
            Err(GrantError::StillMapped { .. }) => true,
            Err(e) => {
                // Not ours any more: do not free a page we can no longer account for.
                tracing::error!(gref = %d.gref, error = %e, "deferred grant vanished");
                false
            }
        });
    }
    for page in freed {
        free_page(table.memory(), page);
    }
}

fn free_page(memory: &GuestMemory, page: u64) {
    if let Err(e) = memory.free(page, PAGE_SIZE) {
        tracing::error!(page, error = %e, "freeing a granted page failed");
    }
}

/// Ends every grant of `range` over pages this module allocated; frees each page
/// whose grant ended and defers the rest (never freeing a page still mapped).
fn end_owned(table: &GrantTable, range: &GrantRange, page0: u64, deferred: &mut Vec<Deferred>) {
    let mut mapped = Vec::new();
    if let Err(e) = table.end_range(range, |r| mapped.push(r)) {
        tracing::error!(error = %e, "ending an owned grant failed");
    }
    for (i, r) in range.refs().enumerate() {
        let page = page0 + i as u64 * PAGE_SIZE;
        if mapped.contains(&r) {
            deferred.push(Deferred {
                gref: r,
                page: Some(page),
            });
        } else {
            free_page(table.memory(), page);
        }
    }
}

/// Deferred revocations outliving the queue or pool that made them.
#[derive(Debug, Default)]
struct Graveyard(Mutex<Vec<Deferred>>);

impl Graveyard {
    fn bury(&self, mut items: Vec<Deferred>) {
        if !items.is_empty() {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .append(&mut items);
        }
    }

    fn reap(&self, table: &GrantTable) -> usize {
        let mut list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        retry(table, &mut list);
        list.len()
    }
}

/// The driver half of the grant model for one guest.
#[derive(Debug)]
pub struct GrantDriver {
    table: Arc<GrantTable>,
    backend: DomainId,
    pools: Mutex<Vec<Weak<PoolInner>>>,
    graveyard: Arc<Graveyard>,
}

impl GrantDriver {
    pub(crate) fn new(
        service: &Arc<GrantService>,
        guest: &Arc<Domain>,
        backend: DomainId,
    ) -> Result<GrantDriver, GrantError> {
        Ok(GrantDriver {
            table: service.table(guest.id())?,
            backend,
            pools: Mutex::new(Vec::new()),
            graveyard: Arc::default(),
        })
    }

    /// The domain the device side runs as.
    pub fn backend(&self) -> DomainId {
        self.backend
    }

    /// Allocates at least `bytes` (whole pages) of guest memory and grants them,
    /// writable, to the backend for the pool's life (blkif persistent grants). Queues
    /// created afterwards expose buffers inside the pool as their persistent
    /// references; attach it to earlier queues with [`GrantShare::attach_pool`].
    ///
    /// Persistent grants are writable whatever the buffer's direction: the device may
    /// write a buffer it was only meant to read. That is the price of not granting
    /// per request, as in blkif.
    pub fn persistent_pool(&self, bytes: u64) -> Result<PersistentPool, ModelError> {
        self.reap();
        let pages = bytes.max(1).div_ceil(PAGE_SIZE);
        let len = u32::try_from(pages * PAGE_SIZE).map_err(|_| ModelError::NoMemory(0))?;
        let memory = self.table.memory();
        let base = memory.alloc_pages(pages).map_err(|_| ModelError::NoMemory(0))?;
        let range = match self.table.grant_range(self.backend, base, len, false) {
            Ok(r) => r,
            Err(e) => {
                if let Err(e) = memory.free(base, u64::from(len)) {
                    tracing::error!(error = %e, "freeing an ungranted pool failed");
                }
                return Err(ModelError::Model(Box::new(e)));
            }
        };
        let inner = Arc::new(PoolInner {
            table: self.table.clone(),
            graveyard: self.graveyard.clone(),
            base,
            range,
        });
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.retain(|w| w.strong_count() > 0);
        pools.push(Arc::downgrade(&inner));
        Ok(PersistentPool { inner })
    }

    /// Retries revocations deferred by dropped queues and pools; returns how many
    /// are still mapped by the device.
    pub fn reap(&self) -> usize {
        self.graveyard.reap(&self.table)
    }

    /// Grants of this guest currently live (granted or mapped), all queues and pools.
    pub fn active_grants(&self) -> usize {
        self.table.lock().active()
    }
}

/// Grants the pages of one ring area; the share records them for its drop.
fn ring_area(
    share: &mut GrantShare,
    bytes: u64,
    readonly: bool,
    size: u16,
) -> Result<(u64, virtio_core::shm::Region), ModelError> {
    let no_mem = |_| ModelError::NoMemory(size);
    let pages = bytes.div_ceil(PAGE_SIZE);
    let memory = share.table.memory().clone();
    let gpa = memory.alloc_pages(pages).map_err(no_mem)?;
    let len = u32::try_from(pages * PAGE_SIZE).map_err(|_| ModelError::NoMemory(size))?;
    let range = match share.table.grant_range(share.backend, gpa, len, readonly) {
        Ok(r) => r,
        Err(e) => {
            if let Err(e) = memory.free(gpa, u64::from(len)) {
                tracing::error!(error = %e, "freeing an ungranted ring failed");
            }
            return Err(ModelError::Model(Box::new(e)));
        }
    };
    share.owned.push((range, gpa));
    let region = memory.region(gpa, bytes).map_err(no_mem)?;
    Ok((range.addr(), region))
}

impl DriverModel for GrantDriver {
    type Share = GrantShare;

    fn name(&self) -> &'static str {
        "grant"
    }

    /// Each area on granted pages of its own, sized for the split ring (either format
    /// fits); the descriptor area is granted writable for a packed ring, whose device
    /// writes used descriptors over it (§2.8.3), and read-only for a split one.
    fn create_queue_in(
        &self,
        _index: u16,
        format: RingFormat,
        size: u16,
    ) -> Result<DriverQueue<GrantShare>, ModelError> {
        self.reap();
        let layout = SplitLayout::new(size).ok_or(ModelError::BadSize(size))?;
        let pools = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let slot_pages = layout.desc_bytes().div_ceil(PAGE_SIZE);
        let mut share = GrantShare {
            table: self.table.clone(),
            backend: self.backend,
            pools,
            owned: Vec::with_capacity(3),
            slot_pages,
            slots: Vec::new(),
            free_slots: Vec::with_capacity(usize::from(size)),
            max_slots: usize::from(size),
            pending: Vec::new(),
            graveyard: self.graveyard.clone(),
            live: 0,
        };
        // On failure `share` is dropped, which ends the grants made so far.
        let desc_readonly = format == RingFormat::Split;
        let (desc, desc_r) = ring_area(&mut share, layout.desc_bytes(), desc_readonly, size)?;
        let (avail, avail_r) = ring_area(&mut share, layout.avail_bytes(), true, size)?;
        let (used, used_r) = ring_area(&mut share, layout.used_bytes(), false, size)?;
        Ok(DriverQueue {
            addrs: QueueAddrs { desc, avail, used },
            ring: RingMemory {
                desc: desc_r,
                driver: avail_r,
                device: used_r,
            },
            share,
        })
    }
}

/// Persistently granted guest memory for hot paths (see
/// [`GrantDriver::persistent_pool`]). Its grants end when the pool and every queue
/// that uses it are gone (deferred while the device still maps them).
#[derive(Debug, Clone)]
pub struct PersistentPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    table: Arc<GrantTable>,
    graveyard: Arc<Graveyard>,
    base: u64,
    range: GrantRange,
}

impl PoolInner {
    /// The persistent address of `buf` if it lies wholly inside the pool.
    #[inline]
    fn addr_of(&self, buf: GuestBuf) -> Option<u64> {
        let off = buf.addr.checked_sub(self.base)?;
        let end = off.checked_add(u64::from(buf.len))?;
        if end > u64::from(self.range.len) {
            return None;
        }
        // `off < range.len < 2^32`, so the page index fits.
        let page = u32::try_from(off / PAGE_SIZE).ok()?;
        let offset = u32::try_from(off % PAGE_SIZE).ok()?;
        Some(encode(GrantRef(self.range.first.0 + page), offset, true))
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        let mut deferred = Vec::new();
        end_owned(&self.table, &self.range, self.base, &mut deferred);
        self.graveyard.bury(deferred);
    }
}

impl PersistentPool {
    /// Guest address of the pool's first byte (page aligned).
    pub fn base(&self) -> u64 {
        self.inner.base
    }

    /// Size in bytes (whole pages).
    pub fn len(&self) -> u64 {
        u64::from(self.inner.range.len)
    }

    /// Always false: a pool has at least one page.
    pub fn is_empty(&self) -> bool {
        self.inner.range.len == 0
    }

    /// The reference of the pool's first page (the others follow consecutively).
    pub fn first_ref(&self) -> GrantRef {
        self.inner.range.first
    }

    /// The buffer of `len` bytes at `offset` into the pool, if it fits.
    pub fn buf(&self, offset: u64, len: u32) -> Option<GuestBuf> {
        let end = offset.checked_add(u64::from(len))?;
        (end <= self.len()).then(|| GuestBuf::new(self.inner.base + offset, len))
    }
}

/// The model's handle for one exposed buffer.
#[derive(Debug)]
pub struct GrantToken(TokenKind);

#[derive(Debug)]
enum TokenKind {
    /// A zero-length buffer: nothing granted.
    Empty,
    /// A per-request grant, ended on retire.
    OneShot(GrantRange),
    /// A buffer inside a persistent pool: nothing to undo.
    Persistent,
    /// An indirect-table slot to give back.
    Table(u32),
}

/// One indirect-table slot: whole pages, persistently granted read-only.
#[derive(Debug)]
struct Slot {
    gpa: u64,
    range: GrantRange,
}

/// The grant model's [`DriverShare`] for one queue.
#[derive(Debug)]
pub struct GrantShare {
    table: Arc<GrantTable>,
    backend: DomainId,
    pools: Vec<Arc<PoolInner>>,
    /// Ring areas: grants and the pages under them, ended on drop.
    owned: Vec<(GrantRange, u64)>,
    slot_pages: u64,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    max_slots: usize,
    /// Revocations that failed because the grant was mapped; retried on later calls.
    pending: Vec<Deferred>,
    graveyard: Arc<Graveyard>,
    /// One-shot grants exposed and not yet retired.
    live: usize,
}

impl GrantShare {
    /// Lets this queue expose buffers inside `pool` as persistent references.
    pub fn attach_pool(&mut self, pool: &PersistentPool) {
        if !self.pools.iter().any(|p| Arc::ptr_eq(p, &pool.inner)) {
            self.pools.push(pool.inner.clone());
        }
    }

    /// One-shot grants exposed and not yet retired.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Revocations waiting for the device to unmap.
    pub fn deferred(&self) -> usize {
        self.pending.len()
    }

    /// Retries deferred revocations now; returns how many remain.
    pub fn retry_deferred(&mut self) -> usize {
        retry(&self.table, &mut self.pending);
        self.pending.len()
    }

    fn new_slot(&mut self, len: u32) -> Result<u32, ShareError> {
        if self.slots.len() >= self.max_slots {
            return Err(ShareError::Exhausted(len));
        }
        let memory = self.table.memory();
        let gpa = memory
            .alloc_pages(self.slot_pages)
            .map_err(|_| ShareError::Exhausted(len))?;
        let bytes = self.slot_pages * PAGE_SIZE;
        let granted = u32::try_from(bytes)
            .map_err(|_| GrantError::TableFull(self.table.owner()))
            .and_then(|b| self.table.grant_range(self.backend, gpa, b, true));
        match granted {
            Ok(range) => {
                self.slots.push(Slot { gpa, range });
                // At most `max_slots <= 32768` slots.
                Ok(u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX))
            }
            Err(e) => {
                if let Err(e) = memory.free(gpa, bytes) {
                    tracing::error!(error = %e, "freeing an ungranted table slot failed");
                }
                Err(share_error(e, len))
            }
        }
    }
}

fn share_error(e: GrantError, len: u32) -> ShareError {
    match e {
        GrantError::TableFull(_) => ShareError::Exhausted(len),
        e => ShareError::Model(Box::new(e)),
    }
}

impl DriverShare for GrantShare {
    type Token = GrantToken;

    fn expose(&mut self, buf: GuestBuf, dir: Direction) -> Result<Exposed<GrantToken>, ShareError> {
        if !self.pending.is_empty() {
            retry(&self.table, &mut self.pending);
        }
        let memory = self.table.memory();
        if memory.offset_of(buf.addr, u64::from(buf.len)).is_none() {
            return Err(ShareError::OutOfBounds {
                addr: buf.addr,
                len: buf.len,
            });
        }
        if buf.len == 0 {
            return Ok(Exposed {
                addr: 0,
                len: 0,
                token: GrantToken(TokenKind::Empty),
            });
        }
        if let Some(addr) = self.pools.iter().find_map(|p| p.addr_of(buf)) {
            return Ok(Exposed {
                addr,
                len: buf.len,
                token: GrantToken(TokenKind::Persistent),
            });
        }
        let readonly = dir == Direction::ToDevice;
        // Copy-only: the buffer is the caller's again the moment it is retired, so
        // its grant must end then, which a device mapping would prevent.
        let range = self
            .table
            .grant_range_copy_only(self.backend, buf.addr, buf.len, readonly)
            .map_err(|e| share_error(e, buf.len))?;
        self.live += 1;
        Ok(Exposed {
            addr: range.addr(),
            len: buf.len,
            token: GrantToken(TokenKind::OneShot(range)),
        })
    }

    fn expose_table(&mut self, table: &[u8]) -> Result<Exposed<GrantToken>, ShareError> {
        let len = u32::try_from(table.len()).map_err(|_| ShareError::Exhausted(u32::MAX))?;
        if len == 0 || u64::from(len) > self.slot_pages * PAGE_SIZE {
            return Err(ShareError::Exhausted(len));
        }
        let i = match self.free_slots.pop() {
            Some(i) => i,
            None => self.new_slot(len)?,
        };
        let slot = &self.slots[i as usize];
        if let Err(e) = self.table.memory().write(slot.gpa, table) {
            self.free_slots.push(i);
            return Err(ShareError::Model(Box::new(e)));
        }
        Ok(Exposed {
            addr: encode(slot.range.first, 0, true),
            len,
            token: GrantToken(TokenKind::Table(i)),
        })
    }

    fn retire(&mut self, token: GrantToken, _written: u32) {
        match token.0 {
            TokenKind::OneShot(range) => {
                self.live -= 1;
                let pending = &mut self.pending;
                let ended = self.table.end_range(&range, |gref| {
                    // The device still maps it: keep the reference out of reuse and
                    // retry later (never a use after revoke).
                    tracing::debug!(%gref, "grant still mapped, revocation deferred");
                    pending.push(Deferred { gref, page: None });
                });
                if let Err(e) = ended {
                    tracing::error!(error = %e, "ending a grant failed");
                }
            }
            TokenKind::Table(i) => self.free_slots.push(i),
            TokenKind::Persistent | TokenKind::Empty => {}
        }
        if !self.pending.is_empty() {
            retry(&self.table, &mut self.pending);
        }
    }
}

impl Drop for GrantShare {
    fn drop(&mut self) {
        let mut deferred = std::mem::take(&mut self.pending);
        for (range, gpa) in self.owned.drain(..) {
            end_owned(&self.table, &range, gpa, &mut deferred);
        }
        for slot in self.slots.drain(..) {
            end_owned(&self.table, &slot.range, slot.gpa, &mut deferred);
        }
        self.graveyard.bury(deferred);
    }
}
