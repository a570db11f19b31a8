//! One granting domain's grant table: the entries and their state machine.
//!
//! This is the pure bookkeeping part (no memory is touched here), so the state
//! machine is unit-tested on its own. [`crate::service`] wraps it with the granter's
//! memory and a lock.
//!
//! ```text
//!            grant / grant_range           map                 map
//!   Free ───────────────────────► Granted ─────► Mapped(1) ─────► Mapped(n)
//!   Revoked ◄───── end_access ───┘   ▲   ◄───── unmap ────┘ ◄──── unmap
//!      │                             │  (end_access while mapped: StillMapped)
//!      │ accept_transfer             │
//!      └──────► AcceptTransfer ──transfer──► TransferCompleted ──end_access──► Revoked
//! ```
//!
//! `Revoked` is a free entry that remembers it was ended, so a use after
//! `end_access` is reported as such ([`GrantError::Revoked`]) until the entry is
//! reused. Reference 0 is reserved, as in Xen, so address 0 never names a grant.

use crate::error::GrantError;
use hypervisor::DomainId;
use std::collections::BTreeMap;

/// Size of a grantable frame; grant addresses are built on it.
pub const PAGE_SIZE: u64 = 4096;
/// [`PAGE_SIZE`] as a buffer length.
pub(crate) const PAGE_BYTES: usize = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;
/// Entries a table grows to before it reuses freed ones (see `Entries::alloc`).
pub const REUSE_DELAY: u32 = 1024;
/// A page size as the in-page window type.
const PAGE_U16: u16 = 4096;

/// A grant reference: an index into the granter's grant table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantRef(pub u32);

impl std::fmt::Display for GrantRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gref {}", self.0)
    }
}

/// Consecutive references granting consecutive pages, so that one descriptor can
/// name a multi-page buffer as `(first, offset)` (see [`crate::addr`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantRange {
    /// Reference of the first page.
    pub first: GrantRef,
    /// Number of pages (and references).
    pub pages: u32,
    /// Offset of the buffer in the first page.
    pub offset: u32,
    /// Length of the buffer in bytes.
    pub len: u32,
}

impl GrantRange {
    /// The grant address of the buffer's first byte: `(first << 12) | offset`.
    pub fn addr(&self) -> u64 {
        crate::addr::encode(self.first, self.offset, false)
    }

    /// The references of the range, in page order.
    pub fn refs(&self) -> impl Iterator<Item = GrantRef> + use<> {
        let first = self.first.0;
        (first..first + self.pages).map(GrantRef)
    }
}

/// The state of one grant entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantState {
    /// Never granted since the table grew to include it.
    Free,
    /// Free again after `end_access`.
    Revoked,
    /// Granted, not mapped by the grantee.
    Granted,
    /// Granted and mapped this many times by the grantee.
    Mapped(u32),
    /// The owner is willing to receive a page from the entry's domain into its frame.
    AcceptTransfer,
    /// A page was transferred into the entry's frame; `end_access` frees the entry.
    TransferCompleted,
}

/// One entry (Xen's `grant_entry` plus the hypervisor's active-grant state).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    /// Guest address of the granted page.
    pub frame: u64,
    /// The domain allowed to use the entry (the sender, for a transfer).
    pub domain: DomainId,
    pub readonly: bool,
    /// Bytes of the page the grantee may touch, `[win_start, win_end)` (Xen v2
    /// sub-page grants); a whole page is `0..4096`.
    pub win_start: u16,
    pub win_end: u16,
    /// First reference of the `grant_range` the entry belongs to: consecutive
    /// references may be used together only inside one range.
    pub range_first: u32,
    pub state: GrantState,
    /// The granter allows copies only, never a mapping: a grant that must be
    /// revocable the moment the granter ends it (a one-shot buffer, whose memory
    /// the caller reuses at once).
    pub copy_only: bool,
}

impl Entry {
    const FREE: Entry = Entry {
        frame: 0,
        domain: DomainId(0),
        readonly: true,
        win_start: 0,
        win_end: 0,
        range_first: 0,
        state: GrantState::Free,
        copy_only: false,
    };

    fn full_page(&self) -> bool {
        self.win_start == 0 && self.win_end == PAGE_U16
    }
}

/// What a successful map pinned: the first frame and the range it belongs to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pinned {
    pub frame: u64,
    pub range_first: u32,
    pub writable: bool,
}

/// The entries of one table and a free-run allocator over their indices.
#[derive(Debug)]
pub(crate) struct Entries {
    owner: DomainId,
    slots: Vec<Entry>,
    /// Free runs below `slots.len()`: first index -> length, coalesced.
    free: BTreeMap<u32, u32>,
    /// Where the next allocation starts looking (next fit).
    cursor: u32,
    limit: u32,
}

impl Entries {
    /// An empty table of `owner` that grows up to `limit` entries.
    pub fn new(owner: DomainId, limit: u32) -> Entries {
        Entries {
            owner,
            // Entry 0 is reserved and never granted.
            slots: vec![Entry::FREE],
            free: BTreeMap::new(),
            cursor: 1,
            limit: limit.max(2),
        }
    }

    /// Takes `count` consecutive free entries: next fit from where the last
    /// allocation ended; below [`REUSE_DELAY`] entries the table grows rather than
    /// wrapping around to reuse entries behind the cursor.
    ///
    /// This keeps a just-revoked reference out of reuse for a while (Xen's frontends
    /// do the same with a FIFO of free references), so a stale reference a device
    /// still holds is reported as [`GrantError::Revoked`] instead of naming somebody
    /// else's new grant.
    fn alloc(&mut self, count: u32) -> Result<u32, GrantError> {
        let cursor = self.cursor;
        // The run containing the cursor counts from the cursor on.
        let ahead = self
            .free
            .range(..=cursor)
            .next_back()
            .filter(|&(&s, &l)| s + l > cursor)
            .map(|(&s, &l)| (s, l, cursor))
            .into_iter()
            .chain(self.free.range(cursor + 1..).map(|(&s, &l)| (s, l, s)))
            .find(|&(s, l, at)| s + l - at >= count);
        if let Some(fit) = ahead {
            return Ok(self.take(fit, count));
        }
        if self.slots.len() < REUSE_DELAY as usize
            && let Ok(start) = self.grow(count)
        {
            return Ok(start);
        }
        let behind = self
            .free
            .range(..cursor)
            .map(|(&s, &l)| (s, l, s))
            .find(|&(_, l, _)| l >= count);
        if let Some(fit) = behind {
            return Ok(self.take(fit, count));
        }
        self.grow(count)
    }

    /// Takes `count` entries at `at` from the free run `(start, len, at)`.
    fn take(&mut self, (start, len, at): (u32, u32, u32), count: u32) -> u32 {
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        let end = start + len;
        if end > at + count {
            self.free.insert(at + count, end - at - count);
        }
        self.cursor = at + count;
        at
    }

    /// Grows the table to allocate `count` entries at its end (the part of a free
    /// run ending there that lies ahead of the cursor is used first).
    fn grow(&mut self, count: u32) -> Result<u32, GrantError> {
        let end = u32::try_from(self.slots.len()).map_err(|_| GrantError::TableFull(self.owner))?;
        let run = match self.free.iter().next_back() {
            Some((&s, &l)) if s + l == end && end > self.cursor => Some((s, l, s.max(self.cursor))),
            _ => None,
        };
        let at = run.map_or(end, |(_, _, at)| at);
        let new_end = at
            .checked_add(count)
            .filter(|&e| e <= self.limit)
            .ok_or(GrantError::TableFull(self.owner))?;
        self.slots.resize(new_end as usize, Entry::FREE);
        match run {
            // Extends the run to the new end, then takes from `at`.
            Some((s, _, at)) => Ok(self.take((s, new_end - s, at), count)),
            None => {
                self.cursor = new_end;
                Ok(at)
            }
        }
    }

    /// Returns entry `r` to the allocator, merging with its neighbours.
    fn release(&mut self, r: u32) {
        let mut start = r;
        let mut len = 1;
        if let Some((&s, &l)) = self.free.range(..r).next_back()
            && s + l == r
        {
            self.free.remove(&s);
            start = s;
            len += l;
        }
        if let Some(l) = self.free.remove(&(r + 1)) {
            len += l;
        }
        self.free.insert(start, len);
    }

    fn entry(&self, r: u32) -> Result<&Entry, GrantError> {
        match self.slots.get(r as usize) {
            Some(e) if r != 0 => Ok(e),
            _ => Err(GrantError::BadRef(GrantRef(r))),
        }
    }

    fn entry_mut(&mut self, r: u32) -> Result<&mut Entry, GrantError> {
        match self.slots.get_mut(r as usize) {
            Some(e) if r != 0 => Ok(e),
            _ => Err(GrantError::BadRef(GrantRef(r))),
        }
    }

    /// The state of `r`.
    pub fn state(&self, r: GrantRef) -> Result<GrantState, GrantError> {
        Ok(self.entry(r.0)?.state)
    }

    /// Entries currently granted or mapped (diagnostics and leak tests).
    pub fn active(&self) -> usize {
        self.slots
            .iter()
            .filter(|e| matches!(e.state, GrantState::Granted | GrantState::Mapped(_)))
            .count()
    }

    /// Whether any live entry grants `frame` (a page must not change hands while
    /// someone else can reach it).
    pub fn frame_in_use(&self, frame: u64) -> bool {
        self.slots
            .iter()
            .any(|e| e.frame == frame && matches!(e.state, GrantState::Granted | GrantState::Mapped(_)))
    }

    /// Grants the pages covering `[gpa, gpa + len)` to `grantee`, one entry per page,
    /// each limited to the buffer's bytes in its page. `gpa + len` must not overflow
    /// (the caller checked it against the granter's memory).
    pub fn grant(
        &mut self,
        grantee: DomainId,
        gpa: u64,
        len: u32,
        readonly: bool,
        copy_only: bool,
    ) -> Result<GrantRange, GrantError> {
        if len == 0 {
            return Err(GrantError::Empty);
        }
        let offset = gpa % PAGE_SIZE;
        let end = offset + u64::from(len);
        let pages = u32::try_from(end.div_ceil(PAGE_SIZE)).map_err(|_| GrantError::TableFull(self.owner))?;
        let first = self.alloc(pages)?;
        let frame0 = gpa - offset;
        for i in 0..pages {
            let lo = (u64::from(i) * PAGE_SIZE).max(offset);
            let hi = (u64::from(i + 1) * PAGE_SIZE).min(end);
            // Both lie in `[i * 4096, (i + 1) * 4096]`, so the in-page values fit.
            let base = u64::from(i) * PAGE_SIZE;
            self.slots[(first + i) as usize] = Entry {
                frame: frame0 + base,
                domain: grantee,
                readonly,
                win_start: u16::try_from(lo - base).unwrap_or(0),
                win_end: u16::try_from(hi - base).unwrap_or(0),
                range_first: first,
                state: GrantState::Granted,
                copy_only,
            };
        }
        Ok(GrantRange {
            first: GrantRef(first),
            pages,
            // `offset < 4096`.
            offset: u32::try_from(offset).unwrap_or(0),
            len,
        })
    }

    /// Ends access to `r` (Xen's `gnttab_end_foreign_access_ref`).
    pub fn end(&mut self, r: GrantRef) -> Result<(), GrantError> {
        let e = self.entry_mut(r.0)?;
        match e.state {
            GrantState::Free => return Err(GrantError::NotGranted(r)),
            GrantState::Revoked => return Err(GrantError::Revoked(r)),
            GrantState::Mapped(maps) => return Err(GrantError::StillMapped { gref: r, maps }),
            GrantState::Granted | GrantState::AcceptTransfer | GrantState::TransferCompleted => {}
        }
        e.state = GrantState::Revoked;
        self.release(r.0);
        Ok(())
    }

    /// Checks that `grantee` may use `e` (named by `r`) and write it if `write`.
    fn usable(e: &Entry, r: u32, grantee: DomainId, write: bool) -> Result<(), GrantError> {
        let r = GrantRef(r);
        match e.state {
            GrantState::Granted | GrantState::Mapped(_) => {}
            GrantState::Revoked => return Err(GrantError::Revoked(r)),
            _ => return Err(GrantError::NotGranted(r)),
        }
        if e.domain != grantee {
            return Err(GrantError::WrongDomain {
                gref: r,
                granted_to: e.domain,
                caller: grantee,
            });
        }
        if write && e.readonly {
            return Err(GrantError::ReadOnly(r));
        }
        Ok(())
    }

    /// Validates an access by `grantee` to `len` bytes starting `offset` bytes into
    /// `r`'s page (running on into the following references of the same range) and
    /// returns the guest address of its first byte. Every page is checked: state,
    /// domain, permission and the granted window.
    pub fn resolve(
        &self,
        grantee: DomainId,
        r: GrantRef,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<u64, GrantError> {
        let out = GrantError::OutOfRange { gref: r, offset, len };
        let head = self.entry(r.0)?;
        Self::usable(head, r.0, grantee, write)?;
        let end = offset.checked_add(len.max(1)).ok_or(out)?;
        let first = offset / PAGE_SIZE;
        let last = (end - 1) / PAGE_SIZE;
        let mut gpa = 0;
        for p in first..=last {
            let idx = u64::from(r.0)
                .checked_add(p)
                .ok_or(GrantError::OutOfRange { gref: r, offset, len })?;
            let idx = u32::try_from(idx).map_err(|_| GrantError::OutOfRange { gref: r, offset, len })?;
            let e = self
                .entry(idx)
                .map_err(|_| GrantError::OutOfRange { gref: r, offset, len })?;
            if e.range_first != head.range_first {
                return Err(GrantError::OutOfRange { gref: r, offset, len });
            }
            Self::usable(e, idx, grantee, write)?;
            let base = p * PAGE_SIZE;
            let lo = offset.max(base) - base;
            let hi = end.min(base + PAGE_SIZE) - base;
            if lo < u64::from(e.win_start) || hi > u64::from(e.win_end) {
                return Err(GrantError::OutOfRange { gref: r, offset, len });
            }
            if p == first {
                gpa = e.frame + lo;
            }
        }
        Ok(gpa)
    }

    /// Pins `pages` whole-page entries from `r` for a mapping by `grantee`:
    /// writable if `writable` is `Some(true)`, as the grant allows if `None`.
    pub fn begin_map(
        &mut self,
        grantee: DomainId,
        r: GrantRef,
        pages: u32,
        writable: Option<bool>,
    ) -> Result<Pinned, GrantError> {
        let head = *self.entry(r.0)?;
        Self::usable(&head, r.0, grantee, writable == Some(true))?;
        let writable = writable.unwrap_or(!head.readonly);
        let end =
            r.0.checked_add(pages)
                .filter(|_| pages > 0)
                .ok_or(GrantError::BadRef(r))?;
        for i in r.0..end {
            let e = self.entry(i).map_err(|_| GrantError::BadRef(GrantRef(i)))?;
            Self::usable(e, i, grantee, writable)?;
            if e.range_first != head.range_first {
                return Err(GrantError::OutOfRange {
                    gref: r,
                    offset: 0,
                    len: u64::from(pages) * PAGE_SIZE,
                });
            }
            if !e.full_page() {
                return Err(GrantError::SubPage(GrantRef(i)));
            }
            if e.copy_only {
                return Err(GrantError::CopyOnly(GrantRef(i)));
            }
            if let GrantState::Mapped(u32::MAX) = e.state {
                return Err(GrantError::MapLimit(GrantRef(i)));
            }
        }
        for i in r.0..end {
            let e = &mut self.slots[i as usize];
            e.state = match e.state {
                GrantState::Mapped(n) => GrantState::Mapped(n + 1),
                _ => GrantState::Mapped(1),
            };
        }
        Ok(Pinned {
            frame: head.frame,
            range_first: head.range_first,
            writable,
        })
    }

    /// Drops one mapping of each of `pages` entries from `r`.
    pub fn end_map(&mut self, r: GrantRef, pages: u32) {
        for i in r.0..r.0.saturating_add(pages) {
            match self.slots.get_mut(i as usize).map(|e| &mut e.state) {
                Some(s @ GrantState::Mapped(1)) => *s = GrantState::Granted,
                Some(GrantState::Mapped(n)) => *n -= 1,
                _ => tracing::error!(gref = i, "unmap of an entry that is not mapped"),
            }
        }
    }

    /// Declares that the owner accepts a page from `from` into `frame`.
    pub fn accept(&mut self, from: DomainId, frame: u64) -> Result<GrantRef, GrantError> {
        let r = self.alloc(1)?;
        self.slots[r as usize] = Entry {
            frame,
            domain: from,
            readonly: false,
            win_start: 0,
            win_end: PAGE_U16,
            range_first: r,
            state: GrantState::AcceptTransfer,
            copy_only: false,
        };
        Ok(GrantRef(r))
    }

    /// Checks that `r` awaits a transfer from `from`; returns the frame to fill.
    pub fn transfer_target(&self, from: DomainId, r: GrantRef) -> Result<u64, GrantError> {
        let e = self.entry(r.0)?;
        if e.state != GrantState::AcceptTransfer {
            return Err(GrantError::NotAccepting(r));
        }
        if e.domain != from {
            return Err(GrantError::WrongDomain {
                gref: r,
                granted_to: e.domain,
                caller: from,
            });
        }
        Ok(e.frame)
    }

    /// Marks a transfer into `r` done (after [`Self::transfer_target`] succeeded
    /// under the same lock).
    pub fn complete_transfer(&mut self, r: GrantRef) {
        if let Ok(e) = self.entry_mut(r.0) {
            e.state = GrantState::TransferCompleted;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: DomainId = DomainId(1);
    const DEV: DomainId = DomainId(0);
    const OTHER: DomainId = DomainId(7);
    const PAGE: u64 = 0x4000_0000;

    fn table() -> Entries {
        Entries::new(ME, 64)
    }

    #[test]
    fn grant_map_unmap_end_walks_the_state_machine() {
        let mut t = table();
        let r = t.grant(DEV, PAGE, 4096, false, false).unwrap().first;
        assert_ne!(r.0, 0, "reference 0 is reserved");
        assert_eq!(t.state(r).unwrap(), GrantState::Granted);
        t.begin_map(DEV, r, 1, Some(true)).unwrap();
        t.begin_map(DEV, r, 1, Some(false)).unwrap();
        assert_eq!(t.state(r).unwrap(), GrantState::Mapped(2));
        assert!(matches!(t.end(r), Err(GrantError::StillMapped { maps: 2, .. })));
        t.end_map(r, 1);
        assert_eq!(t.state(r).unwrap(), GrantState::Mapped(1));
        t.end_map(r, 1);
        assert_eq!(t.state(r).unwrap(), GrantState::Granted);
        t.end(r).unwrap();
        assert_eq!(t.state(r).unwrap(), GrantState::Revoked);
        assert!(matches!(t.end(r), Err(GrantError::Revoked(_))));
        assert!(matches!(
            t.resolve(DEV, r, 0, 1, false),
            Err(GrantError::Revoked(_))
        ));
        assert!(matches!(
            t.begin_map(DEV, r, 1, None),
            Err(GrantError::Revoked(_))
        ));
        assert_eq!(t.active(), 0);
    }

    #[test]
    fn refusals_are_typed() {
        let mut t = table();
        let ro = t.grant(DEV, PAGE, 4096, true, false).unwrap().first;
        assert!(matches!(t.state(GrantRef(0)), Err(GrantError::BadRef(_))));
        assert!(matches!(t.state(GrantRef(1000)), Err(GrantError::BadRef(_))));
        assert!(matches!(
            t.begin_map(OTHER, ro, 1, None),
            Err(GrantError::WrongDomain {
                granted_to: DEV,
                caller: OTHER,
                ..
            })
        ));
        assert!(matches!(
            t.begin_map(DEV, ro, 1, Some(true)),
            Err(GrantError::ReadOnly(_))
        ));
        assert!(matches!(
            t.resolve(DEV, ro, 0, 1, true),
            Err(GrantError::ReadOnly(_))
        ));
        assert!(t.begin_map(DEV, ro, 1, None).is_ok_and(|p| !p.writable));
        let never = t.accept(OTHER, PAGE).unwrap();
        assert!(matches!(
            t.resolve(DEV, never, 0, 1, false),
            Err(GrantError::NotGranted(_))
        ));
        assert!(matches!(t.end(GrantRef(0)), Err(GrantError::BadRef(_))));
    }

    #[test]
    fn ranges_are_consecutive_and_windows_are_byte_exact() {
        let mut t = table();
        // 100 bytes before a page boundary, then one full page, then 50 bytes.
        let gpa = PAGE + 4096 - 100;
        let r = t.grant(DEV, gpa, 100 + 4096 + 50, false, false).unwrap();
        assert_eq!((r.pages, r.offset), (3, 3996));
        assert_eq!(t.resolve(DEV, r.first, 3996, 4246, true).unwrap(), gpa);
        assert_eq!(
            t.resolve(DEV, r.first, 4096 + 10, 5, false).unwrap(),
            PAGE + 4096 + 10
        );
        // One byte before the window, one byte past its end.
        assert!(matches!(
            t.resolve(DEV, r.first, 3995, 2, false),
            Err(GrantError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.resolve(DEV, r.first, 3996, 4247, false),
            Err(GrantError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.resolve(DEV, r.first, u64::MAX, 2, false),
            Err(GrantError::OutOfRange { .. })
        ));
        // Sub-page entries cannot be mapped; the full middle page can.
        assert!(matches!(
            t.begin_map(DEV, r.first, 1, None),
            Err(GrantError::SubPage(_))
        ));
        let mid = GrantRef(r.first.0 + 1);
        t.begin_map(DEV, mid, 1, None).unwrap();
        // A neighbouring range is not reachable by running on from this one.
        let next = t.grant(DEV, PAGE + 8 * 4096, 4096, false, false).unwrap();
        assert_eq!(next.first.0, r.first.0 + 3);
        assert!(matches!(
            t.resolve(DEV, mid, 4096 * 2, 1, false),
            Err(GrantError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.begin_map(DEV, mid, 3, None),
            Err(GrantError::OutOfRange { .. }) | Err(GrantError::SubPage(_))
        ));
    }

    #[test]
    fn freed_runs_coalesce_and_the_limit_holds() {
        let mut t = Entries::new(ME, 9);
        let a = t.grant(DEV, PAGE, 4 * 4096, false, false).unwrap();
        let b = t.grant(DEV, PAGE, 4 * 4096, false, false).unwrap();
        assert!(matches!(
            t.grant(DEV, PAGE, 4096, false, false),
            Err(GrantError::TableFull(ME))
        ));
        for r in a.refs() {
            t.end(r).unwrap();
        }
        // A run of 4 is free again; 5 does not fit.
        assert!(matches!(
            t.grant(DEV, PAGE, 5 * 4096, false, false),
            Err(GrantError::TableFull(_))
        ));
        let c = t.grant(DEV, PAGE, 4 * 4096, false, false).unwrap();
        assert_eq!(c.first, a.first);
        for r in b.refs().chain(c.refs()) {
            t.end(r).unwrap();
        }
        assert_eq!(t.free.len(), 1, "{:?}", t.free);
        assert_eq!(
            t.grant(DEV, PAGE, 8 * 4096, false, false).unwrap().first,
            GrantRef(1)
        );
    }

    #[test]
    fn a_revoked_reference_is_not_reused_at_once() {
        let mut t = table();
        let a = t.grant(DEV, PAGE, 4096, false, false).unwrap().first;
        let b = t.grant(DEV, PAGE, 4096, false, false).unwrap().first;
        t.end(a).unwrap();
        t.end(b).unwrap();
        let c = t.grant(DEV, PAGE, 4096, false, false).unwrap().first;
        assert!(c != a && c != b, "{c} reused a revoked reference");
        assert!(matches!(
            t.resolve(DEV, a, 0, 1, false),
            Err(GrantError::Revoked(_))
        ));
        // A full table (limit 64) wraps around and reuses the oldest free entries.
        for _ in 0..60 {
            t.grant(DEV, PAGE, 4096, false, false).unwrap();
        }
        assert_eq!(t.grant(DEV, PAGE, 4096, false, false).unwrap().first, a);
    }

    #[test]
    fn transfers_need_a_matching_acceptance() {
        let mut t = table();
        let granted = t.grant(DEV, PAGE, 4096, false, false).unwrap().first;
        assert!(matches!(
            t.transfer_target(OTHER, granted),
            Err(GrantError::NotAccepting(_))
        ));
        let r = t.accept(OTHER, PAGE + 4096).unwrap();
        assert!(matches!(
            t.transfer_target(DEV, r),
            Err(GrantError::WrongDomain { .. })
        ));
        assert_eq!(t.transfer_target(OTHER, r).unwrap(), PAGE + 4096);
        t.complete_transfer(r);
        assert_eq!(t.state(r).unwrap(), GrantState::TransferCompleted);
        assert!(matches!(
            t.transfer_target(OTHER, r),
            Err(GrantError::NotAccepting(_))
        ));
        t.end(r).unwrap();
        assert!(t.frame_in_use(PAGE));
        t.end(granted).unwrap();
        assert!(!t.frame_in_use(PAGE));
    }
}
