//! The one unsafe operation of the hypervisor crate: replacing some pages of a
//! guest's own mapping, in place, by pages of another file.
//!
//! That is how a range of guest memory gets a file of its own (see
//! [`GuestMemory::isolate_pages`](crate::GuestMemory::isolate_pages)) while the
//! guest keeps seeing it at the same addresses: a device process can then be given
//! that file, and only that file (HOSTILE 39), since Linux cannot hand out a
//! sub-range of a file as a file descriptor.

#![allow(unsafe_code)]

use std::os::fd::BorrowedFd;
use virtio_core::shm::Region;

/// Maps `len` bytes of `fd` at `fd_offset`, shared and writable, over bytes
/// `[offset, offset + len)` of `region`, in place (`MAP_FIXED`).
///
/// `region` must be the guest's own writable view of its whole memory (a region over
/// a mapping the guest's [`GuestMemory`](crate::GuestMemory) owns); `offset`, `len`
/// and `fd_offset` page aligned, and `fd` at least `fd_offset + len` bytes long.
pub(crate) fn replace(
    region: &Region,
    offset: u64,
    len: u64,
    fd: BorrowedFd<'_>,
    fd_offset: u64,
) -> std::io::Result<()> {
    use rustix::mm::{MapFlags, ProtFlags, mmap};
    let page_bytes = rustix::param::page_size();
    let page = page_bytes as u64;
    let bad = |what| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
    if !region.is_writable() {
        return Err(bad("the guest's view must be writable"));
    }
    if len == 0
        || !offset.is_multiple_of(page)
        || !len.is_multiple_of(page)
        || !fd_offset.is_multiple_of(page)
    {
        return Err(bad("page replacement must be whole, page-aligned pages"));
    }
    if offset
        .checked_add(len)
        .is_none_or(|end| end > region.len() as u64)
    {
        return Err(bad("page replacement past the guest's view"));
    }
    if !region.as_ptr().addr().is_multiple_of(page_bytes) {
        return Err(bad("the guest's view does not start on a page"));
    }
    let size = rustix::fs::fstat(fd)?.st_size;
    if u64::try_from(size).map_or(true, |size| {
        fd_offset.checked_add(len).is_none_or(|end| end > size)
    }) {
        return Err(bad("the file is shorter than the replaced range"));
    }
    let (Ok(off), Ok(len)) = (usize::try_from(offset), usize::try_from(len)) else {
        return Err(bad("range does not fit the address space"));
    };
    let at = region.as_ptr().wrapping_add(off).cast_mut();
    // SAFETY: `[at, at + len)` lies inside `region` (checked above), a writable view of
    // a shared mapping made by `virtio_core::shm::Mapping` and kept alive by the
    // region, so replacing it touches no other Rust object, and the mapping's `Drop`
    // (one `munmap` of its whole range) also removes the replacement. The new pages
    // have the same protection (read and write) and length, and are shared like the
    // old ones, so every region and atomic view over them stays valid for exactly the
    // accesses `Region::from_raw`'s contract allows; only the bytes behind them may
    // change, which that contract already admits from another party at any time. The
    // file is long enough (checked above), so no access through the new pages can hit
    // SIGBUS; the caller keeps its size fixed by seals.
    let p = unsafe {
        mmap(
            at.cast(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED | MapFlags::FIXED,
            fd,
            fd_offset,
        )
    }?;
    if p.cast::<u8>() != at {
        // MAP_FIXED never moves a mapping.
        return Err(std::io::Error::other("MAP_FIXED returned another address"));
    }
    Ok(())
}
