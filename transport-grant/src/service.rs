//! The hypervisor's grant machinery: one table per granting domain, and the
//! operations of both sides (Xen's `GNTTABOP_*`).
//!
//! [`GrantService`] is privileged: it holds every granting domain's memory and acts
//! on behalf of whichever domain id a call names, like a hypercall handler trusting
//! the calling vCPU's domain. The model on top ([`crate::pair`]) hands each side only
//! types whose private fields bind it to its own domain id.
//!
//! What the grantee gets is either a [`GrantMapping`] (a fresh mapping of exactly the
//! granted pages, read-only for read-only grants, made by
//! [`GuestMemory::map_pages`], so the MMU enforces it) or a hypervisor-mediated copy
//! ([`GrantService::copy`]) that checks every page before moving a byte. Mappings pin
//! their entries: `end_access` fails with [`GrantError::StillMapped`] until they are
//! dropped.

use crate::error::GrantError;
use crate::table::{Entries, GrantRange, GrantRef, GrantState, PAGE_BYTES, PAGE_SIZE};
use hypervisor::{DomainId, GuestMemory, Hypervisor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use virtio_core::shm::{Mapping, Region};

/// Default number of entries a table may grow to (Xen's default of 64 grant frames
/// holds 32768 v1 entries; twice that leaves room for 64 KiB buffers on deep queues).
pub const DEFAULT_TABLE_LIMIT: u32 = 1 << 16;

/// One granting domain's table: its entries and the memory they name.
#[derive(Debug)]
pub(crate) struct GrantTable {
    owner: DomainId,
    /// The granter's memory; only this module copies through it, after a check.
    memory: Arc<GuestMemory>,
    entries: Mutex<Entries>,
}

impl GrantTable {
    pub(crate) fn owner(&self) -> DomainId {
        self.owner
    }

    pub(crate) fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Grants `[gpa, gpa + len)` to `grantee` (see [`GrantService::grant_range`]).
    pub(crate) fn grant_range(
        &self,
        grantee: DomainId,
        gpa: u64,
        len: u32,
        readonly: bool,
    ) -> Result<GrantRange, GrantError> {
        self.grant_range_as(grantee, gpa, len, readonly, false)
    }

    /// As [`Self::grant_range`], for copying only: the grantee can never map it, so
    /// ending it never has to wait for an unmap.
    pub(crate) fn grant_range_copy_only(
        &self,
        grantee: DomainId,
        gpa: u64,
        len: u32,
        readonly: bool,
    ) -> Result<GrantRange, GrantError> {
        self.grant_range_as(grantee, gpa, len, readonly, true)
    }

    fn grant_range_as(
        &self,
        grantee: DomainId,
        gpa: u64,
        len: u32,
        readonly: bool,
        copy_only: bool,
    ) -> Result<GrantRange, GrantError> {
        if len == 0 {
            return Err(GrantError::Empty);
        }
        if self.memory.offset_of(gpa, u64::from(len)).is_none() {
            return Err(GrantError::OutsideMemory {
                gpa,
                len: u64::from(len),
            });
        }
        self.lock().grant(grantee, gpa, len, readonly, copy_only)
    }

    /// Ends access to every page of `range` it can, under one lock; calls
    /// `still_mapped` for each page whose grant is pinned by a mapping (left granted).
    pub(crate) fn end_range(
        &self,
        range: &GrantRange,
        mut still_mapped: impl FnMut(GrantRef),
    ) -> Result<(), GrantError> {
        let mut t = self.lock();
        let mut result = Ok(());
        for r in range.refs() {
            match t.end(r) {
                Ok(()) => {}
                Err(GrantError::StillMapped { .. }) => still_mapped(r),
                Err(e) => result = result.and(Err(e)),
            }
        }
        result
    }

    /// Pins and maps `pages` entries from `first` for `grantee`.
    pub(crate) fn map(
        self: &Arc<Self>,
        grantee: DomainId,
        first: GrantRef,
        pages: u32,
        writable: Option<bool>,
    ) -> Result<GrantMapping, GrantError> {
        let pinned = self.lock().begin_map(grantee, first, pages, writable)?;
        // The entries are pinned, so the frames cannot be revoked while we map them
        // outside the lock (mmap is a system call; the lock stays short).
        let mapping =
            self.memory
                .map_pages_revocable(pinned.frame, u64::from(pages) * PAGE_SIZE, pinned.writable);
        match mapping {
            Ok(mapping) => Ok(GrantMapping {
                table: self.clone(),
                first,
                pages,
                range_first: pinned.range_first,
                region: Some(mapping.region()),
                mapping,
            }),
            Err(e) => {
                self.lock().end_map(first, pages);
                Err(GrantError::Map(e))
            }
        }
    }

    /// Checks an access by `grantee` without moving bytes.
    pub(crate) fn check(
        &self,
        grantee: DomainId,
        gref: GrantRef,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<(), GrantError> {
        self.lock().resolve(grantee, gref, offset, len, write).map(|_| ())
    }

    /// Copies granted bytes into `dst` (`GNTTABOP_copy` with a grant source).
    pub(crate) fn copy_from(
        &self,
        grantee: DomainId,
        gref: GrantRef,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), GrantError> {
        let t = self.lock();
        let gpa = t.resolve(grantee, gref, offset, dst.len() as u64, false)?;
        // Copy under the lock: the grant cannot be ended half-way (Xen pins the entry
        // for the duration of a copy in the same way).
        self.memory.read(gpa, dst).map_err(|_| GrantError::OutsideMemory {
            gpa,
            len: dst.len() as u64,
        })
    }

    /// Copies `src` into granted bytes (`GNTTABOP_copy` with a grant destination).
    pub(crate) fn copy_to(
        &self,
        grantee: DomainId,
        gref: GrantRef,
        offset: u64,
        src: &[u8],
    ) -> Result<(), GrantError> {
        let t = self.lock();
        let gpa = t.resolve(grantee, gref, offset, src.len() as u64, true)?;
        self.memory
            .write(gpa, src)
            .map_err(|_| GrantError::OutsideMemory {
                gpa,
                len: src.len() as u64,
            })
    }
}

/// A grantee's mapping of granted frames (Xen's map handle): the pages and nothing
/// else, read-only for read-only grants. Dropping it (or [`GrantMapping::unmap`])
/// revokes the mapping and then releases the pin, so the granter can end access.
///
/// Revoking, not merely dropping, is what makes "unmapped before released" hold: the
/// ring regions this crate builds on a mapping ([`crate::GrantDevice`]'s queues) can be
/// cloned by the device, and a clone keeps the address range mapped. Revocation
/// ([`Mapping::revoke`]) replaces the pages in place, so after drop no region over
/// them, clone or not, reaches the granted frames (HOSTILE 37). Buffers are reached
/// only through [`read`](Self::read) and [`write`](Self::write), never as a region.
#[derive(Debug)]
pub struct GrantMapping {
    table: Arc<GrantTable>,
    first: GrantRef,
    pages: u32,
    range_first: u32,
    /// `Some` until dropped.
    region: Option<Region>,
    /// The mapping behind `region`, revoked on drop before the pin is released.
    mapping: Arc<Mapping>,
}

impl GrantMapping {
    /// The first mapped reference.
    pub fn gref(&self) -> GrantRef {
        self.first
    }

    /// Number of mapped pages.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Whether the mapping allows writes (the MMU refuses them otherwise).
    pub fn is_writable(&self) -> bool {
        self.region.as_ref().is_some_and(Region::is_writable)
    }

    /// The grant range the mapped entries belong to.
    pub(crate) fn range_first(&self) -> u32 {
        self.range_first
    }

    /// The mapped pages, for ring setup inside this crate only.
    pub(crate) fn region(&self) -> Option<&Region> {
        self.region.as_ref()
    }

    /// Copies `dst.len()` bytes at `offset` from the mapped pages.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), GrantError> {
        let out = GrantError::OutOfRange {
            gref: self.first,
            offset,
            len: dst.len() as u64,
        };
        let r = self.region.as_ref().ok_or(GrantError::Revoked(self.first))?;
        r.read(offset, dst).map_err(|_| out)
    }

    /// Copies `src` into the mapped pages at `offset`.
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<(), GrantError> {
        let r = self.region.as_ref().ok_or(GrantError::Revoked(self.first))?;
        if !r.is_writable() {
            return Err(GrantError::ReadOnly(self.first));
        }
        r.write(offset, src).map_err(|_| GrantError::OutOfRange {
            gref: self.first,
            offset,
            len: src.len() as u64,
        })
    }

    /// Unmaps now (the same as dropping the handle).
    pub fn unmap(self) {
        drop(self)
    }
}

impl Drop for GrantMapping {
    fn drop(&mut self) {
        // Revoke first: once the pin is released the granter may reuse the page, and no
        // view of it may remain, including clones of ring regions (HOSTILE 37).
        drop(self.region.take());
        if let Err(e) = self.mapping.revoke() {
            // The pin stays: the granter cannot end access, so the frames are never
            // reused while a view may still reach them.
            tracing::error!(gref = %self.first, error = %e, "revoking a grant mapping failed; kept pinned");
            return;
        }
        self.table.lock().end_map(self.first, self.pages);
    }
}

/// One operation of [`GrantService::copy`].
///
/// Unlike Xen's `gnttab_copy`, whose operations stay within one page, an operation
/// may run on into the following references of the same grant range; every page is
/// checked before any byte moves.
#[derive(Debug)]
pub enum GrantCopy<'a> {
    /// Copy from a granted frame into the caller's buffer.
    FromGrant {
        /// The domain that granted the frame.
        granter: DomainId,
        /// Its reference.
        gref: GrantRef,
        /// Offset from the start of `gref`'s page.
        offset: u64,
        /// Where the bytes go.
        dst: &'a mut [u8],
    },
    /// Copy from the caller's buffer into a granted (writable) frame.
    ToGrant {
        /// The domain that granted the frame.
        granter: DomainId,
        /// Its reference.
        gref: GrantRef,
        /// Offset from the start of `gref`'s page.
        offset: u64,
        /// The bytes to write.
        src: &'a [u8],
    },
}

/// The hypervisor's grant tables (privileged).
#[derive(Debug)]
pub struct GrantService {
    hv: Arc<Hypervisor>,
    limit: u32,
    tables: RwLock<HashMap<DomainId, Arc<GrantTable>>>,
}

impl GrantService {
    /// Grant machinery over `hv`'s domains, with tables of up to
    /// [`DEFAULT_TABLE_LIMIT`] entries.
    pub fn new(hv: Arc<Hypervisor>) -> Arc<GrantService> {
        GrantService::with_table_limit(hv, DEFAULT_TABLE_LIMIT)
    }

    /// Grant machinery whose tables grow to at most `limit` entries.
    pub fn with_table_limit(hv: Arc<Hypervisor>, limit: u32) -> Arc<GrantService> {
        Arc::new(GrantService {
            hv,
            limit,
            tables: RwLock::new(HashMap::new()),
        })
    }

    /// The table of `granter`, created on first use.
    pub(crate) fn table(&self, granter: DomainId) -> Result<Arc<GrantTable>, GrantError> {
        if let Some(t) = self
            .tables
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&granter)
        {
            return Ok(t.clone());
        }
        let domain = self.hv.domain(granter).ok_or(GrantError::NoSuchDomain(granter))?;
        let memory = domain.memory().clone();
        if memory.page_size() != PAGE_SIZE {
            return Err(GrantError::PageSize(memory.page_size()));
        }
        let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
        let t = tables.entry(granter).or_insert_with(|| {
            Arc::new(GrantTable {
                owner: granter,
                memory,
                entries: Mutex::new(Entries::new(granter, self.limit)),
            })
        });
        Ok(t.clone())
    }

    /// The table of `granter` if it has one (queries never create tables).
    fn existing(&self, granter: DomainId) -> Option<Arc<GrantTable>> {
        self.tables
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&granter)
            .cloned()
    }

    fn existing_or_bad(&self, granter: DomainId, gref: GrantRef) -> Result<Arc<GrantTable>, GrantError> {
        self.existing(granter).ok_or(GrantError::BadRef(gref))
    }

    // --- granter side ---

    /// Grants the whole page at `page_gpa` to `grantee` (`gnttab_grant_foreign_access`).
    pub fn grant(
        &self,
        granter: DomainId,
        grantee: DomainId,
        page_gpa: u64,
        readonly: bool,
    ) -> Result<GrantRef, GrantError> {
        if !page_gpa.is_multiple_of(PAGE_SIZE) {
            return Err(GrantError::Unaligned(page_gpa));
        }
        let len = u32::try_from(PAGE_SIZE).unwrap_or(4096);
        Ok(self
            .table(granter)?
            .grant_range(grantee, page_gpa, len, readonly)?
            .first)
    }

    /// Grants the pages covering `[gpa, gpa + len)` under consecutive references,
    /// each limited to the buffer's bytes in its page (whole pages in the middle,
    /// sub-page grants at unaligned ends, which can be copied but not mapped).
    pub fn grant_range(
        &self,
        granter: DomainId,
        grantee: DomainId,
        gpa: u64,
        len: u32,
        readonly: bool,
    ) -> Result<GrantRange, GrantError> {
        self.table(granter)?.grant_range(grantee, gpa, len, readonly)
    }

    /// Ends the grantee's access (`gnttab_end_foreign_access_ref`). Fails with
    /// [`GrantError::StillMapped`] while the grantee maps the frame: the caller must
    /// keep the page, and retry after the grantee unmaps.
    pub fn end_access(&self, granter: DomainId, gref: GrantRef) -> Result<(), GrantError> {
        self.existing_or_bad(granter, gref)?.lock().end(gref)
    }

    /// Ends access to every page of `range` that is not mapped, under one lock, and
    /// calls `still_mapped` for each page that is (it stays granted). Other refusals
    /// are returned after the whole range was tried.
    pub fn end_access_range(
        &self,
        granter: DomainId,
        range: &GrantRange,
        still_mapped: impl FnMut(GrantRef),
    ) -> Result<(), GrantError> {
        self.existing_or_bad(granter, range.first)?
            .end_range(range, still_mapped)
    }

    /// Declares that `recipient` will accept a page from `from` into its page at
    /// `page_gpa` (`gnttab_grant_foreign_transfer`). End the returned reference
    /// after the transfer, or to withdraw the offer.
    pub fn accept_transfer(
        &self,
        recipient: DomainId,
        from: DomainId,
        page_gpa: u64,
    ) -> Result<GrantRef, GrantError> {
        if !page_gpa.is_multiple_of(PAGE_SIZE) {
            return Err(GrantError::Unaligned(page_gpa));
        }
        let t = self.table(recipient)?;
        if t.memory.offset_of(page_gpa, PAGE_SIZE).is_none() {
            return Err(GrantError::OutsideMemory {
                gpa: page_gpa,
                len: PAGE_SIZE,
            });
        }
        t.lock().accept(from, page_gpa)
    }

    /// The state of an entry (diagnostics; the granter reads its own table).
    pub fn state(&self, granter: DomainId, gref: GrantRef) -> Result<GrantState, GrantError> {
        self.existing_or_bad(granter, gref)?.lock().state(gref)
    }

    /// The guest-physical address of the first byte of an access by `grantee` to
    /// `len` bytes at `offset` of `granter`'s `gref`, checked exactly as the access
    /// itself would be (state, domain, permission, the granted window of every page).
    ///
    /// Privileged, like everything here: the hypervisor's own translation, for
    /// giving a grantee's pages a file of their own when the grantee runs in
    /// another process (the ring pages of an isolated backend). A backend never
    /// learns guest addresses through it.
    ///
    /// # Errors
    /// The [`GrantError`] the access would get.
    pub fn resolve(
        &self,
        granter: DomainId,
        grantee: DomainId,
        gref: GrantRef,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<u64, GrantError> {
        self.existing_or_bad(granter, gref)?
            .lock()
            .resolve(grantee, gref, offset, len, write)
    }

    /// Entries of `granter` currently granted or mapped.
    pub fn active_grants(&self, granter: DomainId) -> usize {
        self.existing(granter).map_or(0, |t| t.lock().active())
    }

    // --- grantee side ---

    /// Maps the frame of `gref` for `grantee` (`GNTTABOP_map_grant_ref`); writable
    /// only if asked and the grant allows it. The entry must grant a whole page.
    pub fn map(
        &self,
        grantee: DomainId,
        granter: DomainId,
        gref: GrantRef,
        writable: bool,
    ) -> Result<GrantMapping, GrantError> {
        self.map_range(grantee, granter, gref, 1, writable)
    }

    /// Maps `pages` consecutive references of one grant range as one contiguous
    /// mapping (how a backend maps a multi-page ring).
    pub fn map_range(
        &self,
        grantee: DomainId,
        granter: DomainId,
        first: GrantRef,
        pages: u32,
        writable: bool,
    ) -> Result<GrantMapping, GrantError> {
        self.existing_or_bad(granter, first)?
            .map(grantee, first, pages, Some(writable))
    }

    /// Unmaps (`GNTTABOP_unmap_grant_ref`); the same as dropping the handle.
    pub fn unmap(&self, handle: GrantMapping) {
        handle.unmap();
    }

    /// Copies between granted frames and the caller's buffers without mapping
    /// (`GNTTABOP_copy`), in order. Stops at the first refusal; the operations before
    /// it are done, the refused one moved nothing.
    pub fn copy(&self, grantee: DomainId, ops: &mut [GrantCopy<'_>]) -> Result<(), GrantError> {
        let mut cached: Option<Arc<GrantTable>> = None;
        for op in ops.iter_mut() {
            let (granter, gref) = match op {
                GrantCopy::FromGrant { granter, gref, .. } | GrantCopy::ToGrant { granter, gref, .. } => {
                    (*granter, *gref)
                }
            };
            let table = match cached.take() {
                Some(t) if t.owner == granter => t,
                _ => self.existing_or_bad(granter, gref)?,
            };
            match op {
                GrantCopy::FromGrant { offset, dst, .. } => table.copy_from(grantee, gref, *offset, dst)?,
                GrantCopy::ToGrant { offset, src, .. } => table.copy_to(grantee, gref, *offset, src)?,
            }
            cached = Some(table);
        }
        Ok(())
    }

    /// Gives the page at `page_gpa` of `from` to `to`, which must have offered
    /// `gref` for it ([`Self::accept_transfer`]) (`GNTTABOP_transfer`).
    ///
    /// On one machine with memfd-backed guests, frames cannot change owner, so the
    /// content moves by copy: it is copied into the recipient's accepting page and
    /// the sender's page is zeroed, which is what both sides observe after a real
    /// transfer (the sender loses the content, the recipient gains it). The sender's
    /// page must not be granted to anyone at the time.
    pub fn transfer(
        &self,
        from: DomainId,
        page_gpa: u64,
        to: DomainId,
        gref: GrantRef,
    ) -> Result<(), GrantError> {
        if !page_gpa.is_multiple_of(PAGE_SIZE) {
            return Err(GrantError::Unaligned(page_gpa));
        }
        let src = self.table(from)?;
        if src.memory.offset_of(page_gpa, PAGE_SIZE).is_none() {
            return Err(GrantError::OutsideMemory {
                gpa: page_gpa,
                len: PAGE_SIZE,
            });
        }
        if src.lock().frame_in_use(page_gpa) {
            return Err(GrantError::PageInUse(page_gpa));
        }
        let dst = self.existing(to).ok_or(GrantError::NotAccepting(gref))?;
        let mut page = [0u8; PAGE_BYTES];
        let out = |gpa| GrantError::OutsideMemory { gpa, len: PAGE_SIZE };
        // One table lock at a time (never two), so transfers in both directions
        // cannot deadlock.
        let mut t = dst.lock();
        let frame = t.transfer_target(from, gref)?;
        src.memory.read(page_gpa, &mut page).map_err(|_| out(page_gpa))?;
        dst.memory.write(frame, &page).map_err(|_| out(frame))?;
        src.memory
            .region(page_gpa, PAGE_SIZE)
            .and_then(|r| r.zero(0, PAGE_SIZE).map_err(Into::into))
            .map_err(|_| out(page_gpa))?;
        t.complete_transfer(gref);
        Ok(())
    }
}
