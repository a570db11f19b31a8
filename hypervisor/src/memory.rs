//! A guest's memory: a memfd at guest addresses `[base, base + size)`.

use rustix::fs::{MemfdFlags, SealFlags, ftruncate, memfd_create};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use virtio_core::shm::{Mapping, Region, RegionError};

/// Why a guest-memory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Creating, sizing or mapping the memfd failed.
    #[error("guest memory system call failed")]
    Sys(#[source] std::io::Error),
    /// A guest range outside the guest's memory.
    #[error("guest range {gpa:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Guest address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A page operation on an address or length that is not page aligned.
    #[error("guest range {gpa:#x}+{len:#x} is not page aligned")]
    Unaligned {
        /// Guest address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The allocator has no free range large enough.
    #[error("guest memory has no free range of {0} bytes")]
    Exhausted(u64),
    /// Freeing a range that is not allocated.
    #[error("guest range {gpa:#x}+{len:#x} was not allocated")]
    NotAllocated {
        /// Guest address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A page operation on a range that straddles the edge of isolated pages
    /// ([`GuestMemory::isolate_pages`]), or isolating pages that already are.
    #[error("guest range {gpa:#x}+{len:#x} crosses the edge of isolated pages")]
    Isolated {
        /// Guest address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// No isolated pages start at this guest address.
    #[error("no isolated pages start at guest address {0:#x}")]
    NotIsolated(u64),
}

impl From<RegionError> for MemoryError {
    fn from(e: RegionError) -> Self {
        match e {
            RegionError::OutOfBounds { offset, len, .. } => MemoryError::OutOfRange { gpa: offset, len },
            other => MemoryError::Sys(std::io::Error::other(other)),
        }
    }
}

/// One guest's memory.
///
/// The guest itself reads and writes all of it ([`Self::read`], [`Self::write`],
/// [`Self::region`]) and allocates its buffers and rings from it ([`Self::alloc`]).
/// [`Self::map_pages`] is the hypervisor's privilege: a fresh mapping of some pages with
/// the protection a sharing model grants, which is all a device side ever receives.
#[derive(Debug)]
pub struct GuestMemory {
    fd: OwnedFd,
    base: u64,
    size: u64,
    page: u64,
    /// The guest's own view of all of its memory.
    full: Region,
    /// Free ranges, start -> length, coalesced.
    free: Mutex<BTreeMap<u64, u64>>,
    /// Ranges backed by a file of their own ([`Self::isolate_pages`]): guest address
    /// -> pages.
    isolated: Mutex<BTreeMap<u64, Isolated>>,
}

/// Pages of guest memory backed by a memfd of their own.
#[derive(Debug)]
struct Isolated {
    len: u64,
    fd: OwnedFd,
}

impl GuestMemory {
    /// Creates `size` bytes (rounded up to pages) of zeroed memory at guest address
    /// `base` (page aligned, non-zero).
    pub fn new(name: &str, base: u64, size: u64) -> Result<Arc<GuestMemory>, MemoryError> {
        let page = rustix::param::page_size() as u64;
        if base == 0 || !base.is_multiple_of(page) {
            return Err(MemoryError::Unaligned { gpa: base, len: size });
        }
        let size = size.max(1).div_ceil(page) * page;
        if base.checked_add(size).is_none() {
            return Err(MemoryError::OutOfRange { gpa: base, len: size });
        }
        let sys = |e: rustix::io::Errno| MemoryError::Sys(e.into());
        let fd = memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).map_err(sys)?;
        ftruncate(&fd, size).map_err(sys)?;
        // The size is fixed from now on: whoever the file is shared with (a device
        // in another process, a vhost-user backend) may map it whole without
        // fearing SIGBUS from a file shrunk under the mapping, and may check so.
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(sys)?;
        let len = usize::try_from(size).map_err(|_| MemoryError::OutOfRange { gpa: base, len: size })?;
        let full = Mapping::of_fd(fd.as_fd(), 0, len, true)
            .map_err(MemoryError::Sys)?
            .region();
        Ok(Arc::new(GuestMemory {
            fd,
            base,
            size,
            page,
            full,
            free: Mutex::new(BTreeMap::from([(base, size)])),
            isolated: Mutex::new(BTreeMap::new()),
        }))
    }

    /// First guest address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Page size of the mappings.
    pub fn page_size(&self) -> u64 {
        self.page
    }

    /// The memfd, for handing the memory to another process (vhost-user style).
    ///
    /// Pages moved to a file of their own ([`Self::isolate_pages`]) read as zeros
    /// through it, and writes to them through it do not reach the guest.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Offset of guest range `[gpa, gpa + len)` in the memfd, if it lies inside.
    pub fn offset_of(&self, gpa: u64, len: u64) -> Option<u64> {
        let off = gpa.checked_sub(self.base)?;
        (off.checked_add(len)? <= self.size).then_some(off)
    }

    fn offset(&self, gpa: u64, len: u64) -> Result<u64, MemoryError> {
        self.offset_of(gpa, len)
            .ok_or(MemoryError::OutOfRange { gpa, len })
    }

    /// Copies guest memory at `gpa` into `dst` (the guest reading its own memory).
    pub fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        Ok(self.full.read(self.offset(gpa, dst.len() as u64)?, dst)?)
    }

    /// Copies `src` into guest memory at `gpa` (the guest writing its own memory).
    pub fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        Ok(self.full.write(self.offset(gpa, src.len() as u64)?, src)?)
    }

    /// The guest's own view of `[gpa, gpa + len)`.
    pub fn region(&self, gpa: u64, len: u64) -> Result<Region, MemoryError> {
        Ok(self.full.sub(self.offset(gpa, len)?, len)?)
    }

    /// A fresh mapping of the whole pages `[gpa, gpa + len)`, writable only if
    /// `writable`: the MMU enforces the protection, and the mapping covers nothing
    /// else. This is the hypervisor's privilege; sharing models call it to build the
    /// capability they hand a device side.
    ///
    /// The mapping cannot be taken back: whoever holds a region over it reaches the
    /// pages until the last region is dropped. Use [`Self::map_pages_revocable`] for
    /// pages that return to the guest while a device may still hold a view.
    pub fn map_pages(&self, gpa: u64, len: u64, writable: bool) -> Result<Region, MemoryError> {
        Ok(self.map_pages_revocable(gpa, len, writable)?.region())
    }

    /// As [`Self::map_pages`], but returns the mapping itself, whose holder can
    /// [`revoke`](Mapping::revoke) it: after that no region over it, clone or not,
    /// reaches the guest's pages (HOSTILE 37). The sharing models keep the mapping and
    /// give the device only regions, and revoke before the pages go back to the guest.
    pub fn map_pages_revocable(
        &self,
        gpa: u64,
        len: u64,
        writable: bool,
    ) -> Result<Arc<Mapping>, MemoryError> {
        if !gpa.is_multiple_of(self.page) || len == 0 || !len.is_multiple_of(self.page) {
            return Err(MemoryError::Unaligned { gpa, len });
        }
        let off = self.offset(gpa, len)?;
        let bytes = usize::try_from(len).map_err(|_| MemoryError::OutOfRange { gpa, len })?;
        let isolated = self.isolated.lock().unwrap_or_else(|p| p.into_inner());
        // Pages with a file of their own are mapped from that file: the main file no
        // longer holds their bytes.
        match overlapping(&isolated, gpa, len) {
            None => Mapping::of_fd(self.fd.as_fd(), off, bytes, writable).map_err(MemoryError::Sys),
            Some((start, iso)) if start <= gpa && gpa + len <= start + iso.len => {
                Mapping::of_fd(iso.fd.as_fd(), gpa - start, bytes, writable).map_err(MemoryError::Sys)
            }
            Some(_) => Err(MemoryError::Isolated { gpa, len }),
        }
    }

    /// Moves the whole pages `[gpa, gpa + len)` into a memfd of their own, mapped in
    /// place: the guest keeps reading and writing the same bytes at the same
    /// addresses, [`Self::map_pages`] of those pages maps the new file, and
    /// [`Self::isolated_file`] hands it out. That file is what a device process may be
    /// given when its model allows it these pages and nothing else of the guest
    /// (HOSTILE 39): a file descriptor always reaches its whole file, and Linux has no
    /// way to hand out a sub-range of one.
    ///
    /// The new file's size is sealed, so its holders may map it whole without fearing
    /// SIGBUS. The main file's copy of the pages is punched out (it reads as zeros).
    /// Writes the guest makes to the range while this runs may be lost: call it while
    /// nothing writes there (at setup, before the pages are in use).
    pub fn isolate_pages(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        if !gpa.is_multiple_of(self.page) || len == 0 || !len.is_multiple_of(self.page) {
            return Err(MemoryError::Unaligned { gpa, len });
        }
        let off = self.offset(gpa, len)?;
        let mut isolated = self.isolated.lock().unwrap_or_else(|p| p.into_inner());
        if overlapping(&isolated, gpa, len).is_some() {
            return Err(MemoryError::Isolated { gpa, len });
        }
        let sys = |e: rustix::io::Errno| MemoryError::Sys(e.into());
        let fd =
            memfd_create("vio-isolated", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).map_err(sys)?;
        ftruncate(&fd, len).map_err(sys)?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(sys)?;
        let bytes = usize::try_from(len).map_err(|_| MemoryError::OutOfRange { gpa, len })?;
        // Carry the current bytes over, then swap the pages under the guest's view.
        let fresh = Mapping::of_fd(fd.as_fd(), 0, bytes, true)
            .map_err(MemoryError::Sys)?
            .region();
        self.full.copy_to(off, &fresh, 0, len)?;
        crate::remap::replace(&self.full, off, len, fd.as_fd(), 0).map_err(MemoryError::Sys)?;
        isolated.insert(gpa, Isolated { len, fd });
        tracing::debug!(gpa, len, "guest pages isolated in a file of their own");
        // The main file's copy is stale from now on: whoever maps the main file (a
        // vhost-user backend, a model-2 device) must not see what the pages held. On
        // failure the pages stay isolated, and the error says the copy is still there.
        rustix::fs::fallocate(
            &self.fd,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            off,
            len,
        )
        .map_err(sys)
    }

    /// A new descriptor of the file behind the isolated pages starting at `gpa`
    /// ([`Self::isolate_pages`]), for handing to another process: the same open file
    /// if `writable`, else the file opened afresh read-only, so that its holder's
    /// writable mappings of it fail (`EACCES`) and the MMU refuses its writes.
    pub fn isolated_file(&self, gpa: u64, writable: bool) -> Result<OwnedFd, MemoryError> {
        let isolated = self.isolated.lock().unwrap_or_else(|p| p.into_inner());
        let iso = isolated.get(&gpa).ok_or(MemoryError::NotIsolated(gpa))?;
        if writable {
            return iso.fd.try_clone().map_err(MemoryError::Sys);
        }
        // A new open file description, read-only: a descriptor's access mode cannot
        // be lowered in place, and sharing the writable description would let its
        // holder map the pages writable.
        let path = format!("/proc/self/fd/{}", iso.fd.as_raw_fd());
        rustix::fs::open(
            path.as_str(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| MemoryError::Sys(e.into()))
    }

    /// Puts the isolated pages starting at `gpa` back into the main file, in place, and
    /// forgets their own file: whoever was given that file keeps a file the guest no
    /// longer maps, and reaches none of the guest's bytes through it from now on
    /// (HOSTILE 37, across processes). The guest's bytes are carried over. As with
    /// [`Self::isolate_pages`], call it while nothing writes the range.
    pub fn rejoin_pages(&self, gpa: u64) -> Result<(), MemoryError> {
        let mut isolated = self.isolated.lock().unwrap_or_else(|p| p.into_inner());
        let iso = isolated.get(&gpa).ok_or(MemoryError::NotIsolated(gpa))?;
        let len = iso.len;
        let off = self.offset(gpa, len)?;
        let bytes = usize::try_from(len).map_err(|_| MemoryError::OutOfRange { gpa, len })?;
        let main = Mapping::of_fd(self.fd.as_fd(), off, bytes, true)
            .map_err(MemoryError::Sys)?
            .region();
        self.full.copy_to(off, &main, 0, len)?;
        crate::remap::replace(&self.full, off, len, self.fd.as_fd(), off).map_err(MemoryError::Sys)?;
        isolated.remove(&gpa);
        tracing::debug!(gpa, len, "isolated guest pages rejoined the main file");
        Ok(())
    }

    /// Allocates `len` bytes aligned to `align` (a power of two) and returns the guest
    /// address. First fit over coalesced free ranges.
    pub fn alloc(&self, len: u64, align: u64) -> Result<u64, MemoryError> {
        let len = len.max(1);
        let align = align.max(1);
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let found = free.iter().find_map(|(&start, &flen)| {
            let at = start.checked_next_multiple_of(align)?;
            let end = at.checked_add(len)?;
            (end <= start + flen).then_some((start, flen, at))
        });
        let (start, flen, at) = found.ok_or(MemoryError::Exhausted(len))?;
        free.remove(&start);
        if at > start {
            free.insert(start, at - start);
        }
        let end = at + len;
        if end < start + flen {
            free.insert(end, start + flen - end);
        }
        Ok(at)
    }

    /// Allocates `n` whole pages.
    pub fn alloc_pages(&self, n: u64) -> Result<u64, MemoryError> {
        let len = n.checked_mul(self.page).ok_or(MemoryError::Exhausted(u64::MAX))?;
        self.alloc(len, self.page)
    }

    /// Returns `[gpa, gpa + len)` to the allocator. Refuses ranges that overlap free
    /// space or lie outside memory, so a double free cannot corrupt the allocator.
    pub fn free(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let len = len.max(1);
        self.offset(gpa, len)?;
        let end = gpa + len;
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let before = free.range(..=gpa).next_back().map(|(&s, &l)| (s, l));
        let after = free.range(gpa..).next().map(|(&s, &l)| (s, l));
        if before.is_some_and(|(s, l)| s + l > gpa) || after.is_some_and(|(s, _)| s < end) {
            return Err(MemoryError::NotAllocated { gpa, len });
        }
        let mut start = gpa;
        let mut stop = end;
        if let Some((s, l)) = before
            && s + l == gpa
        {
            free.remove(&s);
            start = s;
        }
        if let Some((s, l)) = after
            && s == end
        {
            free.remove(&s);
            stop = s + l;
        }
        free.insert(start, stop - start);
        Ok(())
    }

    /// Bytes currently free.
    pub fn free_bytes(&self) -> u64 {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).values().sum()
    }
}

/// The isolated range that overlaps `[gpa, gpa + len)`, if any (ranges never overlap
/// each other, so the one starting last at or before the end is the only candidate).
fn overlapping(isolated: &BTreeMap<u64, Isolated>, gpa: u64, len: u64) -> Option<(u64, &Isolated)> {
    let end = gpa.checked_add(len)?;
    let (&start, iso) = isolated.range(..end).next_back()?;
    (start + iso.len > gpa).then_some((start, iso))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x4000_0000;

    #[test]
    fn addresses_are_checked() {
        let m = GuestMemory::new("t", BASE, 8192).unwrap();
        assert_eq!(m.size(), 8192);
        m.write(BASE + 8190, b"ab").unwrap();
        assert!(matches!(
            m.write(BASE + 8191, b"ab"),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.read(BASE - 1, &mut [0; 1]),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.read(0, &mut [0; 1]),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(m.read(u64::MAX, &mut [0; 2]).is_err());
        assert!(GuestMemory::new("t", 0, 4096).is_err());
        assert!(GuestMemory::new("t", BASE + 1, 4096).is_err());
    }

    #[test]
    fn the_memory_file_cannot_change_size() {
        let m = GuestMemory::new("t", BASE, 8192).unwrap();
        assert!(
            ftruncate(m.fd(), 4096).is_err(),
            "shrinking would SIGBUS every mapping"
        );
        assert!(ftruncate(m.fd(), 16384).is_err());
        let seals = rustix::fs::fcntl_get_seals(m.fd()).unwrap();
        assert!(seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL));
    }

    #[test]
    fn page_views_share_bytes_and_enforce_protection() {
        let m = GuestMemory::new("t", BASE, 4 * 4096).unwrap();
        let ro = m.map_pages(BASE + 4096, 4096, false).unwrap();
        let rw = m.map_pages(BASE + 8192, 4096, true).unwrap();
        m.write(BASE + 4096 + 5, b"ring").unwrap();
        let mut b = [0u8; 4];
        ro.read(5, &mut b).unwrap();
        assert_eq!(&b, b"ring");
        assert!(ro.write(0, b"x").is_err());
        rw.write(1, b"used").unwrap();
        m.read(BASE + 8193, &mut b).unwrap();
        assert_eq!(&b, b"used");
        // The view covers its pages and nothing else.
        assert_eq!(rw.len(), 4096);
        assert!(rw.read(4096, &mut b).is_err());
        assert!(m.map_pages(BASE + 100, 4096, true).is_err());
        assert!(m.map_pages(BASE + 3 * 4096, 2 * 4096, true).is_err());
    }

    #[test]
    fn a_revoked_page_view_no_longer_reaches_guest_memory() {
        let m = GuestMemory::new("t", BASE, 2 * 4096).unwrap();
        let mapping = m.map_pages_revocable(BASE + 4096, 4096, true).unwrap();
        let view = mapping.region();
        let clone = view.sub(8, 8).unwrap();
        view.write(0, b"before").unwrap();
        mapping.revoke().unwrap();
        // Every view, clones and sub-ranges included, is cut off: copies land in
        // scratch pages, and no new handle is given out...
        view.write(0, b"after!").unwrap();
        clone.write(0, b"x").unwrap();
        assert!(clone.is_revoked());
        assert!(matches!(view.sub(0, 8), Err(RegionError::Revoked)));
        // ...and the guest's page keeps what it had.
        let mut b = [0u8; 6];
        m.read(BASE + 4096, &mut b).unwrap();
        assert_eq!(&b, b"before");
        mapping.revoke().unwrap();
    }

    /// HOSTILE 39: isolated pages live in a file of their own that reaches them and
    /// nothing else; the guest sees the same bytes in place; the read-only file
    /// refuses writable mappings; rejoining cuts the file off the guest.
    #[test]
    // Test sizes are a few pages.
    #[allow(clippy::cast_possible_truncation)]
    fn isolated_pages_get_a_file_of_their_own() {
        let page = rustix::param::page_size() as u64;
        let m = GuestMemory::new("t", BASE, 4 * page).unwrap();
        m.write(BASE + page - 4, b"left").unwrap();
        m.write(BASE + page + 3, b"kept").unwrap();
        m.isolate_pages(BASE + page, 2 * page).unwrap();
        let mut b = [0u8; 4];
        m.read(BASE + page + 3, &mut b).unwrap();
        assert_eq!(&b, b"kept", "the guest sees its bytes in place");
        // The file holds exactly the isolated pages.
        let rw = m.isolated_file(BASE + page, true).unwrap();
        assert_eq!(rustix::fs::fstat(&rw).unwrap().st_size as u64, 2 * page);
        assert!(ftruncate(&rw, 8 * page).is_err(), "the size is sealed");
        let dev = Mapping::of_fd(rw.as_fd(), 0, 2 * page as usize, true)
            .unwrap()
            .region();
        dev.read(3, &mut b).unwrap();
        assert_eq!(&b, b"kept");
        dev.write(page, b"from the device").unwrap();
        let mut got = [0u8; 15];
        m.read(BASE + 2 * page, &mut got).unwrap();
        assert_eq!(&got, b"from the device");
        // map_pages of those pages maps the new file; a straddling range is refused.
        let view = m.map_pages(BASE + 2 * page, page, false).unwrap();
        view.read(0, &mut got).unwrap();
        assert_eq!(&got, b"from the device");
        assert!(matches!(
            m.map_pages(BASE, 2 * page, false),
            Err(MemoryError::Isolated { .. })
        ));
        assert!(matches!(
            m.isolate_pages(BASE + 2 * page, page),
            Err(MemoryError::Isolated { .. })
        ));
        // The main file no longer holds the bytes.
        let main = Mapping::of_fd(m.fd(), page, page as usize, false)
            .unwrap()
            .region();
        main.read(3, &mut b).unwrap();
        assert_eq!(b, [0; 4]);
        // Read-only file: no writable shared mapping.
        let ro = m.isolated_file(BASE + page, false).unwrap();
        assert!(Mapping::of_fd(ro.as_fd(), 0, page as usize, true).is_err());
        assert!(Mapping::of_fd(ro.as_fd(), 0, page as usize, false).is_ok());
        // Rejoin: the guest keeps its bytes, the old file is cut off.
        m.rejoin_pages(BASE + page).unwrap();
        m.read(BASE + 2 * page, &mut got).unwrap();
        assert_eq!(&got, b"from the device");
        dev.write(page, b"after rejoining").unwrap();
        m.read(BASE + 2 * page, &mut got).unwrap();
        assert_eq!(&got, b"from the device", "the old file reaches nothing");
        m.read(BASE + page - 4, &mut b).unwrap();
        assert_eq!(&b, b"left");
        assert!(matches!(
            m.rejoin_pages(BASE + page),
            Err(MemoryError::NotIsolated(_))
        ));
        assert!(m.map_pages(BASE, 4 * page, true).is_ok());
    }

    #[test]
    fn allocator_aligns_coalesces_and_refuses_double_free() {
        let m = GuestMemory::new("t", BASE, 4 * 4096).unwrap();
        let a = m.alloc(100, 64).unwrap();
        let b = m.alloc(4096, 4096).unwrap();
        let c = m.alloc(10, 1).unwrap();
        assert_eq!(a % 64, 0);
        assert_eq!(b % 4096, 0);
        assert!(a + 100 <= b || b + 4096 <= a);
        m.free(b, 4096).unwrap();
        assert!(matches!(m.free(b, 4096), Err(MemoryError::NotAllocated { .. })));
        m.free(a, 100).unwrap();
        m.free(c, 10).unwrap();
        assert_eq!(m.free_bytes(), 4 * 4096, "everything coalesced back");
        assert_eq!(m.alloc_pages(4).unwrap(), BASE);
        assert!(matches!(m.alloc(1, 1), Err(MemoryError::Exhausted(1))));
    }
}
