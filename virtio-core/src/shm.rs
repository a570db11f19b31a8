//! Shared-memory regions: the one place in the core that touches raw pointers.
//!
//! A [`Region`] names a byte range that another party (a device, a driver, another
//! process) may read and write at any moment. Nothing here hands out `&[u8]` or
//! `&mut [u8]` over such memory, because the other side could change it under the
//! reference. Instead a region offers:
//!
//! - bounds-checked byte copies in and out ([`Region::read`], [`Region::write`]), the
//!   "copy once into private memory, then validate" path that every parser uses. The
//!   shared side of every copy is touched only with volatile, naturally aligned
//!   accesses (see `copy` below), never with `memcpy`: a `memcpy` over bytes another
//!   party writes at the same time is a data race in Rust's memory model, and the
//!   compiler may split, merge or repeat its accesses;
//! - slices of atomics (`&[AtomicU16]`, `&[AtomicU32]`, `&[AtomicU64]`), crate-private,
//!   which the ring views in [`crate::ring`] build on so that ring indices and
//!   descriptors are read exactly once with the ordering the spec asks for.
//!
//! It also holds [`prefetch`], a cache hint for bytes another core wrote.
//!
//! A region is either writable or read-only; a read-only region refuses writes before
//! they reach memory, which matters when it is backed by a real read-only mapping
//! (sharing models 3 and 4 map the descriptor table and the available ring that way).
//! Only small `Relaxed` atomic loads are allowed on such memory (see
//! [`Region::load_u16`]), so every `Acquire` load of shared memory here is a `Relaxed`
//! load followed by an `Acquire` fence.
//!
//! A [`Mapping`] made here can be revoked by whoever holds it ([`Mapping::revoke`]):
//! its pages are replaced in place by private anonymous pages, so every region over it,
//! clones included, stops reaching the shared memory at once (HOSTILE 37).

// Shared memory reached through raw pointers, atomics and mmap: see the module docs.
#![allow(unsafe_code)]

use std::any::Any;
use std::fmt;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering, fence};

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
    /// An atomic view wider than this target can load from read-only memory was asked
    /// of a read-only region (see [`Region::load_u16`]).
    #[error("a {size}-byte atomic view cannot be taken of read-only memory on this target")]
    TooWideForReadOnly {
        /// Width of one atomic in bytes.
        size: usize,
    },
}

/// A byte range of shared memory, kept alive by an owner handle.
///
/// Cloning is cheap (one reference count). Two guests in one process each have their
/// own regions; there is no global state.
///
/// A clone keeps the memory *mapped*, not *reachable*: when the region lies in a
/// [`Mapping`] and the mapping's holder revokes it, every clone is cut off at once
/// (the pages behind the address become private scratch pages, not the shared
/// memory, so copies and atomic views made before reach only those; sub-regions and
/// atomic views asked for afterwards are refused with [`RegionError::Revoked`]). That is what lets a sharing model hand
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

/// Widest atomic load std allows on read-only memory for this target, in bytes:
/// "sufficiently small atomic loads with `Ordering::Relaxed` are implemented in a way
/// that works on read-only memory" (std::sync::atomic, "Atomic accesses to read-only
/// memory", whose table of targets and sizes this copies). 0 on targets it leaves out.
const READ_ONLY_LOAD_MAX: usize = if cfg!(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "loongarch64",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "powerpc64",
    target_arch = "riscv64",
    target_arch = "sparc64",
    target_arch = "s390x"
)) {
    8
} else if cfg!(any(
    target_arch = "x86",
    target_arch = "arm",
    target_arch = "loongarch32",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "powerpc",
    target_arch = "riscv32",
    target_arch = "sparc",
    target_arch = "hexagon"
)) {
    4
} else {
    0
};

/// Turns a `Relaxed` load into one of `order`: std allows only `Relaxed` loads on
/// read-only memory, and "if you need to do an acquire load on read-only memory, you
/// can do a relaxed load followed by an acquire fence instead" (std::sync::atomic).
#[inline]
fn fence_after_load(order: Ordering) {
    match order {
        Ordering::Relaxed => {}
        Ordering::SeqCst => fence(Ordering::SeqCst),
        _ => fence(Ordering::Acquire),
    }
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
        let start = self.check_live(offset, len)?;
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
        // `from_raw`; `dst` is private memory, which cannot overlap shared memory we hold
        // no references to. The shared side is read with volatile word accesses only
        // (`copy::from_shared`), so a concurrent writer can only make us copy arbitrary
        // bytes: callers validate the private copy, never the shared original.
        unsafe { copy::from_shared(self.base.as_ptr().add(start), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into the region starting at `offset`.
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<(), RegionError> {
        if !self.writable {
            return Err(RegionError::ReadOnly);
        }
        let start = self.check(offset, src.len() as u64)?;
        // SAFETY: in bounds (checked) and writable (checked); `src` is private. The shared
        // side is written with volatile word accesses only, so a racing reader on the
        // other side sees some mix of old and new bytes, which it must validate anyway.
        unsafe { copy::to_shared(src.as_ptr(), self.base.as_ptr().add(start), src.len()) };
        Ok(())
    }

    /// Copies `len` bytes from this region at `offset` into `dst` at `dst_offset`, in
    /// one pass when both sides share their alignment (through a small private bounce
    /// otherwise). Overlapping ranges of one mapping behave like `memmove`; ranges that
    /// overlap through two different mappings of the same pages get some mix of old and
    /// new bytes (memory-safe, but unspecified).
    pub fn copy_to(&self, offset: u64, dst: &Region, dst_offset: u64, len: u64) -> Result<(), RegionError> {
        if !dst.writable {
            return Err(RegionError::ReadOnly);
        }
        let from = self.check(offset, len)?;
        let to = dst.check(dst_offset, len)?;
        let len = usize::try_from(len).unwrap_or(0); // `len <= self.len` by `check`
        // SAFETY: both ranges are in bounds of mappings kept alive by `self` and `dst`
        // (checked above), the destination is writable (checked). `copy::shared_to_shared`
        // touches both sides with volatile word accesses only and copies backwards when
        // the destination starts inside the source, so overlap within one mapping is
        // fine. As in `read`, a concurrent writer can only make us copy arbitrary bytes.
        unsafe { copy::shared_to_shared(self.base.as_ptr().add(from), dst.base.as_ptr().add(to), len) };
        Ok(())
    }

    /// Fills `[offset, offset + len)` with zeros.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), RegionError> {
        if !self.writable {
            return Err(RegionError::ReadOnly);
        }
        let start = self.check(offset, len)?;
        let len = usize::try_from(len).unwrap_or(0); // `len <= self.len` by `check`
        // SAFETY: in bounds and writable, as checked just above; volatile word stores.
        unsafe { copy::zero_shared(self.base.as_ptr().add(start), len) };
        Ok(())
    }

    /// Loads the little-endian `u16` at `offset` (2-byte aligned) with one atomic
    /// access: for reading a ring index the other side publishes.
    ///
    /// The load itself is always `Relaxed`, and `order` is obtained with a fence after
    /// it (`Acquire` for anything but `Relaxed` and `SeqCst`): the region may be a real
    /// read-only mapping, and std guarantees only small `Relaxed` loads there ("atomic
    /// loads with ordering other than `Relaxed` ... might still be read-only under
    /// certain conditions, but that is not a stable guarantee and should not be relied
    /// upon", std::sync::atomic).
    pub fn load_u16(&self, offset: u64, order: Ordering) -> Result<u16, RegionError> {
        let v = self.u16s(offset, 1)?[0].load(Ordering::Relaxed);
        fence_after_load(order);
        Ok(u16::from_le(v))
    }

    /// Loads the little-endian `u32` at `offset` (4-byte aligned) with one atomic access,
    /// as [`Region::load_u16`] does.
    pub fn load_u32(&self, offset: u64, order: Ordering) -> Result<u32, RegionError> {
        let v = self.u32s(offset, 1)?[0].load(Ordering::Relaxed);
        fence_after_load(order);
        Ok(u32::from_le(v))
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
        let start = self.check_live(offset, bytes)?;
        let ptr = self.base.as_ptr().wrapping_add(start);
        if ptr.align_offset(align) != 0 {
            return Err(RegionError::Misaligned { offset, align });
        }
        if !self.writable && size > READ_ONLY_LOAD_MAX {
            return Err(RegionError::TooWideForReadOnly { size });
        }
        // SAFETY: the range is in bounds and aligned for `T` (checked above); `T` is one
        // of the std atomic integers, which may alias memory written concurrently by
        // others through atomics or copies (`from_raw`'s contract) and have no invalid
        // bit patterns. The slice borrows `self`, which keeps the owner alive.
        // Read-only regions may be real read-only mappings, where std allows only
        // "sufficiently small atomic loads with `Ordering::Relaxed`" (std::sync::atomic,
        // "Atomic accesses to read-only memory"): `T` is no wider than this target's
        // limit (checked above), and every user of a read-only view (the ring views'
        // loads, `load_u16`, `load_u32`) loads `Relaxed` and gets `Acquire` from a
        // fence, and never stores.
        Ok(unsafe { std::slice::from_raw_parts(ptr.cast::<T>(), count) })
    }

    /// As [`Self::check`], and refuses a region whose mapping was revoked: for the
    /// calls that hand out something lasting (a sub-region, atomic views), so a
    /// revoked queue's memory gives out no new handle.
    fn check_live(&self, offset: u64, len: u64) -> Result<usize, RegionError> {
        if self.is_revoked() {
            return Err(RegionError::Revoked);
        }
        self.check(offset, len)
    }

    /// Checks that `[offset, offset + len)` lies inside the region; returns the offset as
    /// `usize`.
    ///
    /// Copies and loads do not look at revocation: after [`Mapping::revoke`] the
    /// pages behind the region are private scratch pages, so they reach nothing of
    /// the shared memory either way, and the per-access check cost model 2 about
    /// 8 % of its 64-byte buffers per second in `vio model-bench`.
    fn check(&self, offset: u64, len: u64) -> Result<usize, RegionError> {
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

/// Copies that touch shared memory only with volatile, naturally aligned accesses.
///
/// Rust's memory model makes a plain copy (`copy_nonoverlapping`, a `memcpy`) over
/// bytes another thread writes at the same time a data race, and lets the compiler
/// split, merge, repeat or elide its accesses. A volatile access is an externally
/// observable event the compiler must perform exactly once as written (std's
/// `read_volatile` docs), the discipline of Linux's `READ_ONCE`/`WRITE_ONCE`. (rust-vmm's
/// `vm-memory` 0.18 goes half way: aligned volatile accesses for copies of up to 8
/// bytes, `copy_nonoverlapping` above.) Accesses are sized by the shared side's
/// alignment: naturally aligned 8, 4, 2 or 1 byte words at the edges, so a naturally
/// aligned field of up to 8 bytes is always one access, and 16-byte SSE2 words in the
/// body on x86_64 (8-byte words elsewhere) to stay near `memcpy` speed. The private
/// side of a copy is ordinary memory and is accessed unaligned.
mod copy {
    use std::ptr::{read_volatile, write_volatile};

    /// The body's word: 16 bytes on x86_64 (SSE2 is baseline there), 8 elsewhere.
    #[cfg(target_arch = "x86_64")]
    type Word = std::arch::x86_64::__m128i;
    #[cfg(not(target_arch = "x86_64"))]
    type Word = u64;
    const WORD: usize = std::mem::size_of::<Word>();

    /// Largest access (8, 4, 2 or 1 bytes) that address `at` is aligned to and that fits
    /// in `left` (>= 1) bytes.
    #[inline(always)]
    fn width(at: usize, left: usize) -> usize {
        let mut w = 8;
        while w > 1 && (!at.is_multiple_of(w) || w > left) {
            w /= 2;
        }
        w
    }

    /// Loads a `T` at `p`: volatile (and `p` aligned for `T`) when `p` is shared.
    ///
    /// # Safety
    ///
    /// `p` is valid for reading `size_of::<T>()` bytes, aligned for `T` when `shared`.
    #[inline(always)]
    unsafe fn load<T: Copy>(p: *const u8, shared: bool) -> T {
        if shared {
            // SAFETY: valid and aligned, per the caller; every `T` here is plain data.
            unsafe { read_volatile(p.cast::<T>()) }
        } else {
            // SAFETY: valid, per the caller; private memory needs no alignment here.
            unsafe { p.cast::<T>().read_unaligned() }
        }
    }

    /// Stores `v` at `p`: volatile (and `p` aligned for `T`) when `p` is shared.
    ///
    /// # Safety
    ///
    /// `p` is valid for writing `size_of::<T>()` bytes, aligned for `T` when `shared`.
    #[inline(always)]
    unsafe fn store<T: Copy>(p: *mut u8, v: T, shared: bool) {
        if shared {
            // SAFETY: valid and aligned, per the caller.
            unsafe { write_volatile(p.cast::<T>(), v) }
        } else {
            // SAFETY: valid, per the caller.
            unsafe { p.cast::<T>().write_unaligned(v) }
        }
    }

    /// Moves one access of `w` bytes (8, 4, 2 or 1).
    ///
    /// # Safety
    ///
    /// `src` readable and `dst` writable for `w` bytes, each aligned to `w` where shared.
    #[inline(always)]
    unsafe fn step(w: usize, src: *const u8, dst: *mut u8, src_shared: bool, dst_shared: bool) {
        // SAFETY: forwarded from the caller for every width.
        unsafe {
            match w {
                8 => store(dst, load::<u64>(src, src_shared), dst_shared),
                4 => store(dst, load::<u32>(src, src_shared), dst_shared),
                2 => store(dst, load::<u16>(src, src_shared), dst_shared),
                _ => store(dst, load::<u8>(src, src_shared), dst_shared),
            }
        }
    }

    /// Copies `len` bytes forward, sizing every access by the alignment of `anchor`
    /// (the shared side's address; both sides are shared only when they are equally
    /// aligned, so aligning one aligns the other).
    ///
    /// # Safety
    ///
    /// `src` readable and `dst` writable for `len` bytes; if both are shared,
    /// `src` and `dst` are congruent modulo 16; a shared destination does not start
    /// inside the source.
    #[inline(always)]
    unsafe fn run(src: *const u8, dst: *mut u8, len: usize, src_shared: bool, dst_shared: bool) {
        let anchor = if src_shared { src as usize } else { dst as usize };
        let mut done = 0;
        // Edge accesses: `width` keeps each inside the caller's ranges
        // (`done + w <= len`) and aligned to its size at `anchor + done`, and so at the
        // other shared side too (congruent, per the caller).
        while done < len && !(anchor + done).is_multiple_of(WORD) {
            let w = width(anchor + done, len - done);
            // SAFETY: in range and aligned where shared, as just said.
            unsafe { step(w, src.add(done), dst.add(done), src_shared, dst_shared) };
            done += w;
        }
        #[cfg(target_arch = "x86_64")]
        if len - done >= WIDE_MIN && wide::usable(src, dst, src_shared, dst_shared) {
            // SAFETY: forwarded from the caller; `anchor + done` is a multiple of
            // `WORD` (the loop above stopped there) and `wide::usable` checked AVX2
            // and, for two shared sides, their congruence modulo 32.
            done = unsafe { wide::body(src, dst, len, done, anchor, src_shared, dst_shared) };
        }
        while len - done >= WORD {
            // SAFETY: `done + WORD <= len` keeps the access in range, and `anchor + done`
            // is a multiple of `WORD` (the loop above stopped there, the wide body
            // moves whole multiples of it, and every step adds `WORD`), which is
            // `Word`'s alignment.
            unsafe {
                let v = load::<Word>(src.add(done), src_shared);
                store(dst.add(done), v, dst_shared);
            }
            done += WORD;
        }
        while done < len {
            let w = width(anchor + done, len - done);
            // SAFETY: in range and aligned where shared, as for the head.
            unsafe { step(w, src.add(done), dst.add(done), src_shared, dst_shared) };
            done += w;
        }
    }

    /// Bodies at least this long take the AVX2 path where the CPU has it.
    #[cfg(target_arch = "x86_64")]
    const WIDE_MIN: usize = 128;

    /// 32-byte volatile words for long bodies, where the CPU has AVX2 (detected at
    /// run time; std caches the answer). `model-bench` measured the 16-byte body at
    /// 0.35-0.37x `memcpy` for 1514-byte buffers over model 2, against 0.41-0.43x
    /// for the `memcpy` it replaced; this path exists to win that back.
    #[cfg(target_arch = "x86_64")]
    mod wide {
        use super::{WORD, load, store};
        use std::arch::x86_64::__m256i;

        /// Whether the AVX2 body may run: the CPU has AVX2, and two shared sides
        /// are congruent modulo 32 (aligning one then aligns the other).
        #[inline(always)]
        pub(super) fn usable(src: *const u8, dst: *mut u8, src_shared: bool, dst_shared: bool) -> bool {
            let congruent =
                !(src_shared && dst_shared) || ((src as usize) ^ (dst as usize)).is_multiple_of(32);
            congruent && std::is_x86_feature_detected!("avx2")
        }

        /// Copies whole 32-byte words from `done` while at least `64` bytes are left
        /// (after one 16-byte step to reach 32-byte alignment); returns the new
        /// `done`, which stays a multiple of 16 from `anchor`.
        ///
        /// # Safety
        ///
        /// As [`super::run`]; `anchor + done` is a multiple of 16; AVX2 is present
        /// and two shared sides are congruent modulo 32 ([`usable`]).
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn body(
            src: *const u8,
            dst: *mut u8,
            len: usize,
            mut done: usize,
            anchor: usize,
            src_shared: bool,
            dst_shared: bool,
        ) -> usize {
            const WIDE: usize = std::mem::size_of::<__m256i>();
            if !(anchor + done).is_multiple_of(WIDE) {
                // SAFETY: at least WIDE_MIN bytes are left, and `anchor + done` is a
                // multiple of 16, `Word`'s alignment.
                unsafe {
                    let v = load::<super::Word>(src.add(done), src_shared);
                    store(dst.add(done), v, dst_shared);
                }
                done += WORD;
            }
            while len - done >= 2 * WIDE {
                // SAFETY: in range (`done + 64 <= len`); `anchor + done` is a multiple
                // of 32, `__m256i`'s alignment, on every shared side (congruent).
                unsafe {
                    let a = load::<__m256i>(src.add(done), src_shared);
                    let b = load::<__m256i>(src.add(done + WIDE), src_shared);
                    store(dst.add(done), a, dst_shared);
                    store(dst.add(done + WIDE), b, dst_shared);
                }
                done += 2 * WIDE;
            }
            done
        }
    }

    /// Copies `len` bytes from shared `src` into private `dst`.
    ///
    /// # Safety
    ///
    /// `src` readable and `dst` writable for `len` bytes; `dst` private (no other party
    /// accesses it during the copy) and not overlapping `src`.
    pub(super) unsafe fn from_shared(src: *const u8, dst: *mut u8, len: usize) {
        // SAFETY: forwarded; only the source is shared.
        unsafe { run(src, dst, len, true, false) }
    }

    /// Copies `len` bytes from private `src` into shared `dst`.
    ///
    /// # Safety
    ///
    /// As [`from_shared`], with the roles swapped.
    pub(super) unsafe fn to_shared(src: *const u8, dst: *mut u8, len: usize) {
        // SAFETY: forwarded; only the destination is shared.
        unsafe { run(src, dst, len, false, true) }
    }

    /// Copies `len` bytes between two shared ranges, like `memmove` when they overlap
    /// at the same addresses.
    ///
    /// # Safety
    ///
    /// `src` readable and `dst` writable for `len` bytes.
    pub(super) unsafe fn shared_to_shared(src: *const u8, dst: *mut u8, len: usize) {
        let (s, d) = (src as usize, dst as usize);
        let dst_inside_src = d > s && d - s < len;
        if !dst_inside_src && (s ^ d).is_multiple_of(WORD) {
            // SAFETY: forwarded; congruent, and the destination does not start inside
            // the source (a forward copy reads every word before overwriting it).
            return unsafe { run(src, dst, len, true, true) };
        }
        // Differently aligned, or overlapping the wrong way: through a private bounce,
        // chunk by chunk, backwards when the destination starts inside the source (so
        // every source byte is read before a chunk overwrites it).
        let mut bounce = [0u8; 256];
        let chunks = len.div_ceil(bounce.len());
        for k in 0..chunks {
            let k = if dst_inside_src { chunks - 1 - k } else { k };
            let at = k * bounce.len();
            let n = bounce.len().min(len - at);
            // SAFETY: `at + n <= len`; the bounce is private and holds `n` bytes.
            unsafe {
                from_shared(src.add(at), bounce.as_mut_ptr(), n);
                to_shared(bounce.as_ptr(), dst.add(at), n);
            }
        }
    }

    /// Fills `len` shared bytes at `dst` with zeros.
    ///
    /// # Safety
    ///
    /// `dst` writable for `len` bytes.
    pub(super) unsafe fn zero_shared(dst: *mut u8, len: usize) {
        let zeros = [0u8; 256];
        let mut done = 0;
        while done < len {
            let n = zeros.len().min(len - done);
            // SAFETY: `done + n <= len`; `zeros` is private and holds `n` bytes.
            unsafe { to_shared(zeros.as_ptr(), dst.add(done), n) };
            done += n;
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

    /// The volatile word copies move exactly the bytes `memcpy` would, for every
    /// alignment of either side and every length around the word sizes.
    #[test]
    // Test patterns truncate on purpose; offsets are tiny.
    #[allow(clippy::cast_possible_truncation)]
    fn word_copies_match_memcpy_at_every_alignment() {
        let a = Mapping::anonymous(4096).unwrap().region();
        let b = Mapping::anonymous(4096).unwrap().region();
        let src: Vec<u8> = (0..600u32).map(|i| (i * 7 + 3) as u8).collect();
        for off in 0..17u64 {
            for len in (0..40).chain([127, 128, 129, 255, 256, 257, 511, 513]) {
                let data = &src[..len];
                a.zero(0, 2048).unwrap();
                a.write(off, data).unwrap();
                let mut whole = vec![0u8; 2048];
                a.read(0, &mut whole).unwrap();
                assert_eq!(
                    &whole[off as usize..off as usize + len],
                    data,
                    "write {off}+{len}"
                );
                assert!(whole[..off as usize].iter().all(|&x| x == 0));
                assert!(whole[off as usize + len..].iter().all(|&x| x == 0));
                // Unaligned private buffers too.
                let mut got = vec![0u8; len + 3];
                a.read(off, &mut got[3..]).unwrap();
                assert_eq!(&got[3..], data, "read {off}+{len}");
                for dst_off in [0u64, 1, 5, 8, 16, 23] {
                    b.zero(0, 2048).unwrap();
                    a.copy_to(off, &b, dst_off, len as u64).unwrap();
                    let mut out = vec![0u8; len];
                    b.read(dst_off, &mut out).unwrap();
                    assert_eq!(out, data, "copy {off}->{dst_off}+{len}");
                }
                a.zero(off, len as u64).unwrap();
                a.read(0, &mut whole).unwrap();
                assert!(whole.iter().all(|&x| x == 0), "zero {off}+{len}");
            }
        }
    }

    /// `copy_to` within one mapping behaves like `memmove` in both directions, on the
    /// fast (congruent) path and through the bounce.
    #[test]
    // Test patterns truncate on purpose; offsets are tiny.
    #[allow(clippy::cast_possible_truncation)]
    fn overlapping_copies_behave_like_memmove() {
        let r = Mapping::anonymous(8192).unwrap().region();
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        for (from, to) in [(100u64, 116u64), (116, 100), (100, 103), (103, 100), (0, 999)] {
            r.zero(0, 8192).unwrap();
            r.write(from, &data).unwrap();
            let mut model = vec![0u8; 8192];
            model[from as usize..from as usize + data.len()].copy_from_slice(&data);
            model.copy_within(from as usize..from as usize + data.len(), to as usize);
            r.copy_to(from, &r, to, data.len() as u64).unwrap();
            let mut got = vec![0u8; 8192];
            r.read(0, &mut got).unwrap();
            assert!(got == model, "{from} -> {to}");
        }
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
        // Copies through an old clone reach scratch, never the shared page; no new
        // handle is given out.
        clone.write(0, b"xy").unwrap();
        let mut back = [0u8; 2];
        guest.read(0, &mut back).unwrap();
        assert_ne!(&back, b"xy", "a copy after revoke reached the shared page");
        assert!(matches!(clone.atomic_u16s(0, 1), Err(RegionError::Revoked)));
        assert!(matches!(clone.sub(0, 1), Err(RegionError::Revoked)));
        assert!(!guest.is_revoked());
    }

    /// Read-only regions refuse atomic views wider than std allows loads of on
    /// read-only memory; on 64-bit targets that is nothing the rings use.
    #[test]
    fn read_only_atomic_views_respect_the_std_size_limit() {
        let r = Mapping::anonymous(4096).unwrap().region().read_only();
        assert!(r.u16s(0, 1).is_ok() && r.u32s(0, 1).is_ok());
        assert_eq!(r.u64s(0, 1).is_ok(), READ_ONLY_LOAD_MAX >= 8);
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
