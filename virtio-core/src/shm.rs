//! Shared-memory regions: the one place in the core that touches raw pointers.
//!
//! A [`Region`] names a byte range that another party (a device, a driver, another
//! process) may read and write at any moment. Nothing here hands out `&[u8]` or
//! `&mut [u8]` over such memory, because the other side could change it under the
//! reference. Instead a region offers:
//!
//! - bounds-checked byte copies in and out ([`Region::read`], [`Region::write`]), the
//!   "copy once into private memory, then validate" path that every parser uses;
//! - slices of atomics (`&[AtomicU16]`, `&[AtomicU32]`, `&[AtomicU64]`), crate-private,
//!   which the ring views in [`crate::ring`] build on so that ring indices and
//!   descriptors are read exactly once with the ordering the spec asks for.
//!
//! It also holds [`prefetch`], a cache hint for bytes another core wrote.
//!
//! A region is either writable or read-only; a read-only region refuses writes before
//! they reach memory, which matters when it is backed by a real read-only mapping
//! (sharing models 3 and 4 map the descriptor table and the available ring that way).
//!
//! A [`Mapping`] made here can be revoked by whoever holds it ([`Mapping::revoke`]):
//! its pages are replaced in place by private anonymous pages, so every region over it,
//! clones included, stops reaching the shared memory at once (HOSTILE 37).

use std::any::Any;
use std::fmt;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};

/// Asks the CPU to bring the cache line holding `p` into this core's cache, so a
/// later access does not stall on it: bytes another core just wrote (a frame, a
/// descriptor) otherwise cost a cache-line transfer each, one after another. A
/// hint only: any address is fine, nothing is read into the program, and a
/// prefetch never faults.
#[inline]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: `_mm_prefetch` needs SSE, which is in the x86_64 baseline. A
        // prefetch neither dereferences nor faults on any address, and changes no
        // memory or register.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Why a region access was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// The range does not lie inside the region.
    #[error("range {offset:#x}+{len:#x} lies outside a region of {size:#x} bytes")]
    OutOfBounds {
        /// Offset of the refused range from the start of the region.
        offset: u64,
        /// Length of the refused range.
        len: u64,
        /// Size of the region.
        size: usize,
    },
    /// An atomic view was asked for at an offset its type cannot be aligned at.
    #[error("offset {offset:#x} is not aligned to {align} bytes")]
    Misaligned {
        /// Offset from the start of the region.
        offset: u64,
        /// Alignment the access needs.
        align: usize,
    },
    /// A write was attempted through a read-only region.
    #[error("region is read-only")]
    ReadOnly,
    /// The mapping behind the region was revoked by its owner (a queue closed, a grant
    /// unmapped): the region no longer reaches the shared memory (HOSTILE 37).
    #[error("region was revoked")]
    Revoked,
}

/// A byte range of shared memory, kept alive by an owner handle.
///
/// Cloning is cheap (one reference count). Two guests in one process each have their
/// own regions; there is no global state.
///
/// A clone keeps the memory *mapped*, not *reachable*: when the region lies in a
/// [`Mapping`] and the mapping's holder revokes it, every clone is cut off at once
/// (accesses return [`RegionError::Revoked`], and the pages behind the address are
/// private scratch pages, not the shared memory). That is what lets a sharing model hand
/// a device ring regions and still take them back when the queue closes (HOSTILE 37).
#[derive(Clone)]
pub struct Region {
    base: NonNull<u8>,
    len: usize,
    writable: bool,
    owner: Owner,
}

/// What keeps a region's memory mapped.
#[derive(Clone)]
enum Owner {
    /// A mapping made by this module, which its holder may revoke.
    Mapping(Arc<Mapping>),
    /// Someone else's handle ([`Region::from_raw`]); never revoked.
    Other(#[allow(dead_code)] Arc<dyn Any + Send + Sync>),
}

// SAFETY: a `Region` is a pointer into memory that `from_raw`'s caller guaranteed to be
// valid for the owner's lifetime and to be accessed only through atomics or raw copies
// (never through Rust references), so sharing or sending it between threads creates no
// aliasing that the type system relies on.
unsafe impl Send for Region {}
// SAFETY: as for `Send`: all access goes through atomics or raw copies.
unsafe impl Sync for Region {}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("base", &self.base)
            .field("len", &self.len)
            .field("writable", &self.writable)
            .finish()
    }
}

impl Region {
    /// Wraps `len` bytes of memory at `base`.
    ///
    /// # Safety
    ///
    /// - `[base, base + len)` must stay mapped and readable (and writable, if
    ///   `writable`) for as long as `owner` is alive;
    /// - every party that accesses the memory (this process or another) does so only
    ///   through atomics or raw byte copies, never through Rust references that assume
    ///   no concurrent writer;
    /// - `base` is at least 8-byte aligned when the caller intends to take 64-bit
    ///   atomic views (alignment is still checked per view).
    pub unsafe fn from_raw(
        base: NonNull<u8>,
        len: usize,
        writable: bool,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Region {
        Region {
            base,
            len,
            writable,
            owner: Owner::Other(owner),
        }
    }

    /// Whether the mapping behind the region was revoked ([`Mapping::revoke`]).
    #[inline]
    pub fn is_revoked(&self) -> bool {
        match &self.owner {
            Owner::Mapping(m) => m.is_revoked(),
            Owner::Other(_) => false,
        }
    }

    /// Size of the region in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether writes are allowed through this region.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Address of the first byte, for handing to the kernel (io_uring, iovecs).
    ///
    /// Dereferencing it is the caller's business and needs the same care as
    /// [`Region::from_raw`] describes.
    pub fn as_ptr(&self) -> *const u8 {
        self.base.as_ptr()
    }

    /// The same memory without write permission.
    pub fn read_only(&self) -> Region {
        Region {
            writable: false,
            ..self.clone()
        }
    }

    /// The sub-range `[offset, offset + len)`, with the same permission and owner.
    pub fn sub(&self, offset: u64, len: u64) -> Result<Region, RegionError> {
        let start = self.check(offset, len)?;
        // SAFETY: `check` proved `start + len <= self.len`, so the new base stays inside
        // the mapping `from_raw`'s contract covers, and it is non-null as an in-bounds
        // offset of a non-null pointer.
        let base = unsafe { NonNull::new_unchecked(self.base.as_ptr().add(start)) };
        Ok(Region {
            base,
            // `check` proved `len <= self.len`, a usize.
            len: usize::try_from(len).unwrap_or(0),
            writable: self.writable,
            owner: self.owner.clone(),
        })
    }

    /// Copies `dst.len()` bytes starting at `offset` into private memory.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), RegionError> {
        let start = self.check(offset, dst.len() as u64)?;
        // SAFETY: the source range is in bounds (checked above) and mapped readable per
        // `from_raw`; `dst` is private memory that cannot overlap shared memory we do not
        // hold references to. A concurrent writer can only make us copy arbitrary bytes:
        // callers validate the private copy, never the shared original.
        unsafe { std::ptr::copy_nonoverlapping(self.base.as_ptr().add(start), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into the region starting at `offset`.
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<(), RegionError> {
        if !self.writable {
            return Err(RegionError::ReadOnly);
        }
        let start = self.check(offset, src.len() as u64)?;
        // SAFETY: in bounds (checked) and writable (checked); see `read` for why a racing
        // reader on the other side is not our memory-safety concern.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.as_ptr().add(start), src.len()) };
        Ok(())
    }

    /// Copies `len` bytes from this region at `offset` into `dst` at `dst_offset`, in
    /// one pass (no private bounce). The ranges may overlap, even through different
    /// mappings of the same pages.
    pub fn copy_to(&self, offset: u64, dst: &Region, dst_offset: u64, len: u64) -> Result<(), RegionError> {
        if !dst.writable {
            return Err(RegionError::ReadOnly);
        }
        let from = self.check(offset, len)?;
        let to = dst.check(dst_offset, len)?;
        let len = usize::try_from(len).unwrap_or(0); // `len <= self.len` by `check`
        // SAFETY: both ranges are in bounds of mappings kept alive by `self` and `dst`
        // (checked above), the destination is writable (checked); `ptr::copy` has
        // memmove semantics, so overlapping ranges (two views of one page) are fine.
        // As in `read`, a concurrent writer on the other side can only make us copy
        // arbitrary bytes.
        unsafe { std::ptr::copy(self.base.as_ptr().add(from), dst.base.as_ptr().add(to), len) };
        Ok(())
    }

    /// Fills `[offset, offset + len)` with zeros.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), RegionError> {
        if !self.writable {
            return Err(RegionError::ReadOnly);
        }
        let start = self.check(offset, len)?;
        let len = usize::try_from(len).unwrap_or(0); // `len <= self.len` by `check`
        // SAFETY: in bounds and writable, as checked just above.
        unsafe { std::ptr::write_bytes(self.base.as_ptr().add(start), 0, len) };
        Ok(())
    }

    /// Loads the little-endian `u16` at `offset` (2-byte aligned) with one atomic
    /// access: for reading a ring index the other side publishes.
    pub fn load_u16(&self, offset: u64, order: Ordering) -> Result<u16, RegionError> {
        Ok(u16::from_le(self.u16s(offset, 1)?[0].load(order)))
    }

    /// Loads the little-endian `u32` at `offset` (4-byte aligned) with one atomic access.
    pub fn load_u32(&self, offset: u64, order: Ordering) -> Result<u32, RegionError> {
        Ok(u32::from_le(self.u32s(offset, 1)?[0].load(order)))
    }

    /// `count` 16-bit atomics starting at `offset`.
    pub(crate) fn u16s(&self, offset: u64, count: usize) -> Result<&[AtomicU16], RegionError> {
        self.atomics(offset, count)
    }

    /// `count` 32-bit atomics starting at `offset`.
    pub(crate) fn u32s(&self, offset: u64, count: usize) -> Result<&[AtomicU32], RegionError> {
        self.atomics(offset, count)
    }

    /// `count` 64-bit atomics starting at `offset`.
    pub(crate) fn u64s(&self, offset: u64, count: usize) -> Result<&[AtomicU64], RegionError> {
        self.atomics(offset, count)
    }

    fn atomics<T>(&self, offset: u64, count: usize) -> Result<&[T], RegionError> {
        let size = std::mem::size_of::<T>();
        let align = std::mem::align_of::<T>();
        let bytes = (count as u64)
            .checked_mul(size as u64)
            .ok_or(RegionError::OutOfBounds {
                offset,
                len: u64::MAX,
                size: self.len,
            })?;
        let start = self.check(offset, bytes)?;
        let ptr = self.base.as_ptr().wrapping_add(start);
        if ptr.align_offset(align) != 0 {
            return Err(RegionError::Misaligned { offset, align });
        }
        // SAFETY: the range is in bounds and aligned for `T` (checked above); `T` is one
        // of the std atomic integers, which may alias memory written concurrently by
        // others through atomics or copies (`from_raw`'s contract) and have no invalid
        // bit patterns. The slice borrows `self`, which keeps the owner alive. Loads from
        // a read-only mapping are allowed for these sizes; the ring views built on a
        // read-only region never store through them.
        Ok(unsafe { std::slice::from_raw_parts(ptr.cast::<T>(), count) })
    }

    /// Checks that `[offset, offset + len)` lies inside the region; returns the offset as
    /// `usize`.
    fn check(&self, offset: u64, len: u64) -> Result<usize, RegionError> {
        if self.is_revoked() {
            return Err(RegionError::Revoked);
        }
        let oob = RegionError::OutOfBounds {
            offset,
            len,
            size: self.len,
        };
        let end = offset.checked_add(len).ok_or(oob)?;
        if end > self.len as u64 {
            return Err(oob);
        }
        usize::try_from(offset).map_err(|_| oob)
    }
}

/// A typed array of atomics inside a region, owning a handle to the region.
///
/// Dereferences to `[T]`, so ring code indexes it like a slice while the region (and so
/// the mapping) stays alive.
pub(crate) struct Atomics<T: 'static> {
    ptr: NonNull<T>,
    len: usize,
    _region: Region,
}

// SAFETY: `T` is a std atomic integer (the constructors below are the only ones), which
// is `Sync`; the pointer stays valid while `_region` is held.
unsafe impl<T: Sync> Send for Atomics<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for Atomics<T> {}

impl<T> std::ops::Deref for Atomics<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr`/`len` were produced by `Region::atomics` on `_region`, which
        // checked bounds and alignment; `_region` keeps the mapping alive for as long as
        // `self`, and the returned slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Region {
    /// An owning array of `count` 16-bit atomics at `offset`.
    pub(crate) fn atomic_u16s(&self, offset: u64, count: usize) -> Result<Atomics<AtomicU16>, RegionError> {
        let s = self.u16s(offset, count)?;
        Ok(Atomics {
            ptr: NonNull::from(s).cast(),
            len: s.len(),
            _region: self.clone(),
        })
    }

    /// An owning array of `count` 32-bit atomics at `offset`.
    pub(crate) fn atomic_u32s(&self, offset: u64, count: usize) -> Result<Atomics<AtomicU32>, RegionError> {
        let s = self.u32s(offset, count)?;
        Ok(Atomics {
            ptr: NonNull::from(s).cast(),
            len: s.len(),
            _region: self.clone(),
        })
    }

    /// An owning array of `count` 64-bit atomics at `offset`.
    pub(crate) fn atomic_u64s(&self, offset: u64, count: usize) -> Result<Atomics<AtomicU64>, RegionError> {
        let s = self.u64s(offset, count)?;
        Ok(Atomics {
            ptr: NonNull::from(s).cast(),
            len: s.len(),
            _region: self.clone(),
        })
    }
}

/// A memory mapping owned by this process: anonymous shared memory, or a window of a
/// file such as a guest's memfd. Unmapped when the last region over it is dropped.
///
/// Mapping the same file range twice gives two independent views; mapping it without
/// write permission gives a view through which the MMU refuses writes, which is how a
/// sharing model hands a device a real read-only ring.
///
/// Whoever holds the `Arc<Mapping>` (not the holders of its regions) can
/// [`revoke`](Mapping::revoke) it: that is how a sharing model takes ring pages back
/// from a device before returning them to the guest (HOSTILE 37).
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    /// Set by `revoke`; regions check it before every access.
    revoked: AtomicBool,
}

// SAFETY: the mapping is process-wide memory with no thread affinity; all access goes
// through `Region`, whose contract covers concurrency.
unsafe impl Send for Mapping {}
// SAFETY: `Mapping` itself offers no access to the bytes, only `Region`s do.
unsafe impl Sync for Mapping {}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapping")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("writable", &self.writable)
            .field("revoked", &self.is_revoked())
            .finish()
    }
}

impl Mapping {
    /// Maps `len` bytes (rounded up to whole pages) of zeroed anonymous shared memory.
    pub fn anonymous(len: usize) -> std::io::Result<Arc<Mapping>> {
        use rustix::mm::{MapFlags, ProtFlags, mmap_anonymous};
        let len = round_to_pages(len);
        // SAFETY: a fresh anonymous mapping with no fixed address cannot alias any
        // existing Rust object.
        let ptr = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
            )
        }?;
        Mapping::adopt(ptr, len, true)
    }

    /// Maps `len` bytes of `fd` starting at `offset` (both page aligned), shared, with
    /// write permission only if `writable`.
    pub fn of_fd(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        writable: bool,
    ) -> std::io::Result<Arc<Mapping>> {
        use rustix::mm::{MapFlags, ProtFlags, mmap};
        let page = rustix::param::page_size();
        if len == 0 || !len.is_multiple_of(page) || !offset.is_multiple_of(page as u64) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "file mappings must be whole, page-aligned pages",
            ));
        }
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: a fresh shared mapping at an address of the kernel's choosing cannot
        // alias any existing Rust object; the file's other mappings are reached only
        // through `Region`s, whose contract covers concurrent access.
        let ptr = unsafe { mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, offset) }?;
        Mapping::adopt(ptr, len, writable)
    }

    fn adopt(ptr: *mut std::ffi::c_void, len: usize, writable: bool) -> std::io::Result<Arc<Mapping>> {
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(std::io::ErrorKind::OutOfMemory)?;
        Ok(Arc::new(Mapping {
            ptr,
            len,
            writable,
            revoked: AtomicBool::new(false),
        }))
    }

    /// Cuts every region over this mapping off the memory it maps, clones included, and
    /// returns once no access through any of them can reach that memory any more
    /// (HOSTILE 37).
    ///
    /// The pages are replaced in place (`mmap` with `MAP_FIXED`, which swaps the
    /// mapping atomically) by private anonymous pages with the same protection, so an
    /// access already under way through a stale pointer or atomic view lands in
    /// scratch memory instead of faulting; and every region method fails with
    /// [`RegionError::Revoked`] from then on. Calling it again retries after a failure
    /// and is harmless after a success.
    pub fn revoke(&self) -> std::io::Result<()> {
        use rustix::mm::{MapFlags, ProtFlags, mmap_anonymous};
        // Set first, so new accesses fail fast; the remap below is what guarantees it.
        // Relaxed: the flag only turns accesses into errors, it publishes no data.
        self.revoked.store(true, Ordering::Relaxed);
        let prot = if self.writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: `[ptr, ptr + len)` is exactly the mapping this value created and still
        // owns (it is unmapped only in `Drop`), so replacing it touches no other Rust
        // object. The replacement has the same length and protection, so every region,
        // atomic view and pointer derived from it stays valid for exactly the accesses
        // `Region::from_raw`'s contract allows; only the bytes change (to zeros), which
        // that contract already admits from the other party at any time.
        let p = unsafe {
            mmap_anonymous(
                self.ptr.as_ptr().cast(),
                self.len,
                prot,
                MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
            )
        }?;
        if p.cast::<u8>() != self.ptr.as_ptr() {
            // MAP_FIXED never moves a mapping; should it, the old pages are gone anyway.
            return Err(std::io::Error::other("MAP_FIXED returned another address"));
        }
        tracing::trace!(len = self.len, "shared mapping revoked");
        Ok(())
    }

    /// Whether [`Mapping::revoke`] was called.
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Relaxed)
    }

    /// Size in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, but clippy asks).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A region over the whole mapping that keeps the mapping alive; writable only if
    /// the mapping is.
    pub fn region(self: &Arc<Self>) -> Region {
        // The mapping is valid (and writable if `self.writable`) until `Mapping` is
        // dropped, which the owner handle prevents while the region lives; `revoke`
        // keeps it valid with the same protection. We hand out no references to its
        // bytes.
        Region {
            base: self.ptr,
            len: self.len,
            writable: self.writable,
            owner: Owner::Mapping(self.clone()),
        }
    }
}

/// Rounds `len` (at least 1) up to whole pages.
pub fn round_to_pages(len: usize) -> usize {
    let page = rustix::param::page_size();
    len.max(1).div_ceil(page) * page
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `anonymous` or `of_fd` with exactly this
        // address and length, and no region outlives us (each holds an `Arc` to us).
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            tracing::error!(error = %e, "munmap of shared memory failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn bounds_and_permissions_are_checked() {
        let mem = Mapping::anonymous(4096).unwrap();
        let r = mem.region();
        assert_eq!(r.len(), 4096);
        r.write(10, b"hello").unwrap();
        let mut buf = [0u8; 5];
        r.read(10, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(matches!(
            r.read(4095, &mut buf),
            Err(RegionError::OutOfBounds { .. })
        ));
        assert!(matches!(
            r.read(u64::MAX, &mut buf),
            Err(RegionError::OutOfBounds { .. })
        ));
        assert_eq!(r.read_only().write(0, b"x"), Err(RegionError::ReadOnly));
        assert_eq!(r.read_only().zero(0, 1), Err(RegionError::ReadOnly));
        let sub = r.sub(8, 16).unwrap();
        sub.read(2, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(sub.read(12, &mut buf).is_err());
        assert!(r.sub(4000, 200).is_err());
    }

    #[test]
    fn atomic_views_check_alignment_and_size() {
        let mem = Mapping::anonymous(4096).unwrap();
        let r = mem.region();
        assert!(matches!(r.u64s(4, 1), Err(RegionError::Misaligned { .. })));
        assert!(matches!(r.u16s(4094, 2), Err(RegionError::OutOfBounds { .. })));
        assert!(r.u64s(0, usize::MAX).is_err());
        let v = r.u32s(4, 2).unwrap();
        v[1].store(0xdead_beef, Ordering::Relaxed);
        let mut b = [0u8; 4];
        r.read(8, &mut b).unwrap();
        assert_eq!(u32::from_ne_bytes(b), 0xdead_beef);
    }

    #[test]
    fn region_to_region_copies_check_both_sides() {
        let a = Mapping::anonymous(4096).unwrap().region();
        let b = Mapping::anonymous(4096).unwrap().region();
        a.write(10, b"payload").unwrap();
        a.copy_to(10, &b, 100, 7).unwrap();
        let mut got = [0u8; 7];
        b.read(100, &mut got).unwrap();
        assert_eq!(&got, b"payload");
        // Overlapping ranges of one region behave like memmove.
        a.copy_to(10, &a, 12, 7).unwrap();
        a.read(12, &mut got).unwrap();
        assert_eq!(&got, b"payload");
        assert!(a.copy_to(4090, &b, 0, 7).is_err());
        assert!(a.copy_to(0, &b, 4090, 7).is_err());
        assert_eq!(a.copy_to(0, &b.read_only(), 0, 1), Err(RegionError::ReadOnly));
    }

    /// HOSTILE 37: revoking a mapping cuts off regions and atomic views already taken
    /// from it; a store through such a view lands in scratch memory, not in the file.
    #[test]
    fn revoked_mappings_cut_off_regions_and_atomic_views() {
        let fd = rustix::fs::memfd_create("revoke-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        let guest = Mapping::of_fd(fd.as_fd(), 0, 4096, true).unwrap().region();
        let device = Mapping::of_fd(fd.as_fd(), 0, 4096, true).unwrap();
        let view = device.region().atomic_u16s(0, 4).unwrap();
        let clone = device.region().sub(0, 64).unwrap();
        view[1].store(7, Ordering::Relaxed);
        assert_eq!(guest.load_u16(2, Ordering::Acquire), Ok(7));
        device.revoke().unwrap();
        assert!(device.is_revoked() && clone.is_revoked());
        view[1].store(9, Ordering::Relaxed);
        assert_eq!(
            guest.load_u16(2, Ordering::Acquire),
            Ok(7),
            "the store went to scratch"
        );
        assert_eq!(clone.write(0, b"x"), Err(RegionError::Revoked));
        assert_eq!(clone.read(0, &mut [0u8; 1]), Err(RegionError::Revoked));
        assert!(matches!(clone.atomic_u16s(0, 1), Err(RegionError::Revoked)));
        assert!(!guest.is_revoked());
    }

    #[test]
    fn file_mappings_share_bytes_and_enforce_read_only() {
        let fd = rustix::fs::memfd_create("shm-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 8192).unwrap();
        let rw = Mapping::of_fd(fd.as_fd(), 0, 8192, true).unwrap().region();
        let ro = Mapping::of_fd(fd.as_fd(), 4096, 4096, false).unwrap().region();
        assert!(!ro.is_writable());
        rw.write(4096 + 7, b"seen").unwrap();
        let mut b = [0u8; 4];
        ro.read(7, &mut b).unwrap();
        assert_eq!(&b, b"seen");
        assert_eq!(ro.write(0, b"x"), Err(RegionError::ReadOnly));
        assert!(Mapping::of_fd(fd.as_fd(), 100, 4096, true).is_err());
        assert!(Mapping::of_fd(fd.as_fd(), 0, 100, true).is_err());
    }
}
