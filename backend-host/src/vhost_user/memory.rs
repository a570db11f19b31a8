//! Guest memory as a vhost-user frontend shares it, and the sharing model over it.
//!
//! The frontend sends its guest memory as up to eight regions, each a file
//! descriptor (a memfd, usually) with the guest-physical range it backs, the
//! frontend's own address of that range, and an offset into the file
//! (SET_MEM_TABLE). [`MemoryTable::map`] checks and maps them; descriptors then name
//! guest-physical addresses, which [`TableMemory`] resolves, and ring addresses
//! arrive as frontend addresses, which [`MemoryTable::frontend_to_guest`] turns
//! into guest-physical ones.
//!
//! This is sharing model 2 ("the device reads driver memory directly") with the MMU
//! drawing the line: the daemon maps exactly the regions the frontend sent, so a
//! descriptor outside them is refused before any byte moves. A buffer may run from
//! one region into its guest-physical neighbour (NUMA guests with a memory backend
//! per node, hot-plugged DIMMs): the guest sees one contiguous range, virtio 1.2
//! §2.7.5 asks for nothing more, so [`TableMemory`] serves it by splitting each
//! access at the region boundary (HOSTILE 36). A range that touches a gap between
//! regions is refused, whole, before any byte moves. The ring areas stay inside one
//! region: a ring is one contiguous run of the daemon's address space, which two
//! mappings are not.
//!
//! A memory file that shrinks under a mapping turns every access past its new end
//! into SIGBUS, which would end the whole daemon (every port of `vio-host net`).
//! So a memory file must be a regular file sealed against shrinking (F_SEAL_SHRINK,
//! applied here or already present; QEMU's memfd backend seals its files itself),
//! and its size is checked after sealing (HOSTILE 35). Anything else (a file that
//! cannot be sealed, as /dev/shm and hugetlbfs files cannot; a device file with no
//! size to check) is refused unless the operator opts in
//! ([`MemoryPolicy::allow_unsealed`]); such regions are then mapped under a SIGBUS
//! guard (`sigbus`) that confines a shrink to the session that did it.

use crate::vhost_user::sigbus::{self, FaultSignal};
use rustix::fs::SealFlags;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, PoisonError};
use virtio_core::access::check_within;
use virtio_core::ring::areas::{RingFormat, open_ring};
use virtio_core::shm::{Mapping, Region};
use virtio_core::{AccessError, DeviceMemory, DeviceModel, DeviceQueue, ModelError, QueueAddrs, Segment};

/// The most regions a vhost-user memory table holds (the protocol's
/// VHOST_MEMORY_BASELINE_NREGIONS without CONFIGURE_MEM_SLOTS).
pub const MAX_REGIONS: usize = 8;

/// Which memory files the daemon accepts from a frontend (HOSTILE 35).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryPolicy {
    /// Accept files that are not regular files or cannot be sealed against
    /// shrinking (memory-backend-file on /dev/shm or hugetlbfs, DAX devices). Such
    /// a frontend can still cut its file under the daemon: the SIGBUS that follows
    /// is contained (the faulting mapping is replaced by zero pages and the session
    /// is ended), but the device may serve zeros until the session is torn down.
    pub allow_unsealed: bool,
}

/// One region of a memory table as the frontend describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// First guest-physical address the region backs.
    pub guest_phys_addr: u64,
    /// Bytes in the region.
    pub memory_size: u64,
    /// The frontend's own address of the region's first byte.
    pub user_addr: u64,
    /// Offset of the region's first byte in its file.
    pub mmap_offset: u64,
}

/// Why a memory table was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// No regions, or more than [`MAX_REGIONS`].
    #[error("a memory table holds 1 to {MAX_REGIONS} regions, not {0}")]
    RegionCount(usize),
    /// The number of files differs from the number of regions.
    #[error("{files} files for {regions} regions")]
    FileCount {
        /// Regions described.
        regions: usize,
        /// Files attached.
        files: usize,
    },
    /// A region is empty, or one of its ranges wraps around.
    #[error("region {0} is empty or wraps around the address space")]
    BadRange(usize),
    /// Two regions overlap in guest-physical or frontend addresses.
    #[error("regions {0} and {1} overlap")]
    Overlap(usize, usize),
    /// A region reaches past the end of its file.
    #[error("region {index} needs {need} bytes of its file, which has {have}")]
    FileTooSmall {
        /// The region.
        index: usize,
        /// Offset plus size.
        need: u64,
        /// The file's size.
        have: u64,
    },
    /// A region's file is not a regular file (a device, pipe or socket): it has no
    /// size to check against the region (HOSTILE 35).
    #[error("region {index}'s file is not a regular file")]
    NotRegularFile {
        /// The region.
        index: usize,
    },
    /// A region's file cannot be sealed against shrinking, so the frontend could
    /// cut it under the mapping (HOSTILE 35).
    #[error("region {index}'s file cannot be sealed against shrinking")]
    Unsealable {
        /// The region.
        index: usize,
        /// Why sealing failed.
        #[source]
        source: std::io::Error,
    },
    /// An unsealed region was allowed but cannot be put under the SIGBUS guard.
    #[error("region {index} cannot be guarded against SIGBUS")]
    Guard {
        /// The region.
        index: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The region could not be mapped.
    #[error("cannot map region {index}")]
    Map {
        /// The region.
        index: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One mapped region.
#[derive(Debug)]
struct Mapped {
    gpa: u64,
    size: u64,
    user_addr: u64,
    region: Region,
}

/// A frontend's memory, mapped into the daemon.
#[derive(Debug)]
pub struct MemoryTable {
    /// Sorted by guest-physical address.
    regions: Vec<Mapped>,
}

impl MemoryTable {
    /// Checks and maps `specs`, region `i` from `files[i]`, accepting only regular
    /// files sealed against shrinking.
    ///
    /// # Errors
    /// A [`MemoryError`] for a table that is malformed, overlaps itself, points past
    /// the end of a file, has a file that is not regular or cannot be sealed, or
    /// cannot be mapped. Nothing is mapped then.
    pub fn map(specs: &[RegionSpec], files: Vec<File>) -> Result<MemoryTable, MemoryError> {
        MemoryTable::map_with(specs, files, MemoryPolicy::default(), None)
    }

    /// [`Self::map`] under `policy`; regions that are accepted only because the
    /// policy allows unsealed files are guarded, and a SIGBUS in them is reported
    /// on `faults` (which the policy then needs).
    fn map_with(
        specs: &[RegionSpec],
        files: Vec<File>,
        policy: MemoryPolicy,
        faults: Option<&FaultSignal>,
    ) -> Result<MemoryTable, MemoryError> {
        if specs.is_empty() || specs.len() > MAX_REGIONS {
            return Err(MemoryError::RegionCount(specs.len()));
        }
        if files.len() != specs.len() {
            return Err(MemoryError::FileCount {
                regions: specs.len(),
                files: files.len(),
            });
        }
        for (i, s) in specs.iter().enumerate() {
            let wraps = s.guest_phys_addr.checked_add(s.memory_size).is_none()
                || s.user_addr.checked_add(s.memory_size).is_none()
                || s.mmap_offset.checked_add(s.memory_size).is_none();
            if s.memory_size == 0 || wraps || usize::try_from(s.memory_size).is_err() {
                return Err(MemoryError::BadRange(i));
            }
        }
        for (i, a) in specs.iter().enumerate() {
            for (j, b) in specs.iter().enumerate().skip(i + 1) {
                let gpa = overlaps(a.guest_phys_addr, b.guest_phys_addr, a.memory_size, b.memory_size);
                let va = overlaps(a.user_addr, b.user_addr, a.memory_size, b.memory_size);
                if gpa || va {
                    return Err(MemoryError::Overlap(i, j));
                }
            }
        }
        let mut regions = Vec::with_capacity(specs.len());
        for (index, (s, file)) in specs.iter().zip(files).enumerate() {
            let unsealed = check_file(index, s, &file, policy)?;
            let guard = if unsealed { faults } else { None };
            if unsealed && guard.is_none() {
                return Err(MemoryError::Guard {
                    index,
                    source: std::io::Error::other("no fault signal to report a SIGBUS on"),
                });
            }
            regions.push(map_region(index, s, &file, guard)?);
        }
        regions.sort_by_key(|m| m.gpa);
        Ok(MemoryTable { regions })
    }

    /// The guest-physical address of frontend address `addr`, if a region holds it.
    pub fn frontend_to_guest(&self, addr: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|m| addr >= m.user_addr && addr - m.user_addr < m.size)
            .map(|m| m.gpa + (addr - m.user_addr))
    }

    /// Total bytes mapped.
    pub fn bytes(&self) -> u64 {
        self.regions.iter().map(|m| m.size).sum()
    }

    /// The region holding all of `[gpa, gpa + len)`, and the offset of `gpa` in it.
    fn find(&self, gpa: u64, len: u64) -> Option<(&Region, u64)> {
        let (i, off) = self.first(gpa)?;
        let m = &self.regions[i];
        let end = off.checked_add(len)?;
        (end <= m.size).then_some((&m.region, off))
    }

    /// The last region starting at or below `gpa`, and the offset of `gpa` in it
    /// (which may lie past its end).
    fn first(&self, gpa: u64) -> Option<(usize, u64)> {
        // Regions are few (at most eight) and sorted: the last one starting at or
        // below `gpa` is the only candidate.
        let i = self.regions.partition_point(|m| m.gpa <= gpa).checked_sub(1)?;
        Some((i, gpa - self.regions[i].gpa))
    }

    /// Where `[gpa, gpa + len)` starts (region index and offset), if every byte of
    /// it lies in regions that follow each other without a gap in guest-physical
    /// memory (HOSTILE 36).
    fn covering(&self, gpa: u64, len: u64) -> Option<(usize, u64)> {
        let end = gpa.checked_add(len)?;
        let (first, off) = self.first(gpa)?;
        let m = &self.regions[first];
        if off > m.size {
            return None;
        }
        // Region ends were checked not to wrap when the table was mapped.
        let mut reach = m.gpa + m.size;
        let mut i = first;
        while reach < end {
            i += 1;
            let next = self.regions.get(i)?;
            if next.gpa != reach {
                return None;
            }
            reach = next.gpa + next.size;
        }
        Some((first, off))
    }

    /// Calls `f(region, offset in it, range of the caller's buffer)` for each piece
    /// of `[gpa, gpa + len)` in order, after checking that the whole range is
    /// covered: a range touching a gap is refused before `f` sees any piece.
    fn pieces<E>(
        &self,
        gpa: u64,
        len: usize,
        mut f: impl FnMut(&Region, u64, std::ops::Range<usize>) -> Result<(), E>,
    ) -> Option<Result<(), E>> {
        let (mut i, mut off) = self.covering(gpa, len as u64)?;
        let mut done = 0;
        while done < len {
            let m = &self.regions[i];
            // `covering` saw every region up to the end: each has room from `off`.
            let room = usize::try_from(m.size - off).unwrap_or(usize::MAX);
            let n = room.min(len - done);
            if let Err(e) = f(&m.region, off, done..done + n) {
                return Some(Err(e));
            }
            done += n;
            i += 1;
            off = 0;
        }
        Some(Ok(()))
    }

    /// A view of `[gpa, gpa + len)`, which must lie in one region.
    fn view(&self, gpa: u64, len: u64) -> Option<Region> {
        let (region, off) = self.find(gpa, len)?;
        region.sub(off, len).ok()
    }
}

fn overlaps(a: u64, b: u64, a_len: u64, b_len: u64) -> bool {
    // Lengths were checked not to wrap.
    a < b + b_len && b < a + a_len
}

/// Refuses a region its file cannot back, and keeps the file from shrinking;
/// returns whether the file is left unsealed (accepted only by `policy`).
fn check_file(index: usize, s: &RegionSpec, file: &File, policy: MemoryPolicy) -> Result<bool, MemoryError> {
    // Checked not to wrap when the spec was read.
    let need = s.mmap_offset + s.memory_size;
    let stat = |file: &File| {
        file.metadata()
            .map_err(|source| MemoryError::Map { index, source })
    };
    if !stat(file)?.file_type().is_file() {
        // A device file (a DAX device) or a pipe or socket has no size to check.
        if !policy.allow_unsealed {
            return Err(MemoryError::NotRegularFile { index });
        }
        tracing::warn!(
            index,
            "memory region is not a regular file: its size cannot be checked (allowed by the operator)"
        );
        return Ok(true);
    }
    // Seal first, then check the size: checked first, the file could shrink in
    // between.
    let sealed = match rustix::fs::fcntl_get_seals(file.as_fd()) {
        Ok(seals) if seals.contains(SealFlags::SHRINK) => Ok(()),
        _ => rustix::fs::fcntl_add_seals(file.as_fd(), SealFlags::SHRINK),
    };
    let meta = stat(file)?;
    if meta.len() < need {
        return Err(MemoryError::FileTooSmall {
            index,
            need,
            have: meta.len(),
        });
    }
    match sealed {
        Ok(()) => Ok(false),
        Err(e) if policy.allow_unsealed => {
            tracing::warn!(
                index,
                error = %e,
                "memory region's file cannot be sealed against shrinking (allowed by the operator): \
                 a frontend that shrinks it loses its session"
            );
            Ok(true)
        }
        Err(e) => Err(MemoryError::Unsealable {
            index,
            source: e.into(),
        }),
    }
}

fn map_region(
    index: usize,
    s: &RegionSpec,
    file: &File,
    guard: Option<&FaultSignal>,
) -> Result<Mapped, MemoryError> {
    let map_err = |source| MemoryError::Map { index, source };
    let page = rustix::param::page_size() as u64;
    // mmap(2) wants a page-aligned offset: map from the page holding the region's
    // start, and view the region inside.
    let lead = s.mmap_offset % page;
    let len = (lead + s.memory_size).div_ceil(page) * page;
    let len = usize::try_from(len).map_err(|_| map_err(std::io::ErrorKind::InvalidInput.into()))?;
    let mapping = Mapping::of_fd(file.as_fd(), s.mmap_offset - lead, len, true).map_err(map_err)?;
    let whole = match guard {
        Some(faults) => {
            sigbus::guard(mapping, faults).map_err(|source| MemoryError::Guard { index, source })?
        }
        None => mapping.region(),
    };
    let region = whole
        .sub(lead, s.memory_size)
        .map_err(|e| map_err(std::io::Error::other(e)))?;
    Ok(Mapped {
        gpa: s.guest_phys_addr,
        size: s.memory_size,
        user_addr: s.user_addr,
        region,
    })
}

/// How a device reaches descriptor memory through a [`MemoryTable`].
#[derive(Debug, Clone)]
pub struct TableMemory {
    table: Arc<MemoryTable>,
}

impl TableMemory {
    /// The guest-physical address of `offset` bytes into `seg`, for an access of
    /// `len` bytes there.
    fn locate(seg: &Segment, offset: u32, len: usize) -> Result<u64, AccessError> {
        check_within(seg, offset, len)?;
        // A segment's address is the driver's: near the top of the address space
        // the sum wraps (HOSTILE 38).
        seg.addr()
            .checked_add(u64::from(offset))
            .ok_or(AccessError::OutOfBounds {
                addr: seg.addr(),
                len: u64::from(seg.len()),
            })
    }

    fn out_of_bounds(gpa: u64, len: usize) -> AccessError {
        AccessError::OutOfBounds {
            addr: gpa,
            len: len as u64,
        }
    }
}

impl DeviceMemory for TableMemory {
    fn check(&self, seg: &Segment) -> Result<(), AccessError> {
        self.table
            .covering(seg.addr(), u64::from(seg.len()))
            .map(|_| ())
            .ok_or(AccessError::OutOfBounds {
                addr: seg.addr(),
                len: u64::from(seg.len()),
            })
    }

    fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError> {
        let gpa = Self::locate(seg, offset, dst.len())?;
        let len = dst.len();
        self.table
            .pieces(gpa, len, |region, off, r| region.read(off, &mut dst[r]))
            .ok_or_else(|| Self::out_of_bounds(gpa, len))?
            .map_err(|e| AccessError::Model(Box::new(e)))
    }

    fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError> {
        if !seg.writable() {
            return Err(AccessError::Denied);
        }
        let gpa = Self::locate(seg, offset, src.len())?;
        self.table
            .pieces(gpa, src.len(), |region, off, r| region.write(off, &src[r]))
            .ok_or_else(|| Self::out_of_bounds(gpa, src.len()))?
            .map_err(|e| AccessError::Model(Box::new(e)))
    }
}

/// The sharing model a vhost-user device serves through: whatever memory table the
/// frontend sent last.
///
/// Cheap to clone: the daemon installs tables, the device opens queues, both
/// through clones of one handle. A queue keeps the table it was opened with, so a
/// table replaced while queues run stays mapped until they stop (the daemon stops
/// them first anyway).
#[derive(Debug, Clone, Default)]
pub struct VhostMemory {
    table: Arc<Mutex<Option<Arc<MemoryTable>>>>,
    policy: MemoryPolicy,
    /// Where a SIGBUS in one of this model's guarded regions is reported: set
    /// when the policy lets unsealed files in.
    faults: Option<FaultSignal>,
}

impl VhostMemory {
    /// A model with no memory yet: every queue is refused until a table arrives.
    /// Memory files must be regular and sealed against shrinking.
    pub fn new() -> VhostMemory {
        VhostMemory::default()
    }

    /// A model whose tables are checked under `policy`.
    ///
    /// # Errors
    /// The eventfd that reports a contained SIGBUS could not be made (only when
    /// the policy allows unsealed files).
    pub fn with_policy(policy: MemoryPolicy) -> std::io::Result<VhostMemory> {
        let faults = policy.allow_unsealed.then(FaultSignal::new).transpose()?;
        Ok(VhostMemory {
            policy,
            faults,
            ..VhostMemory::default()
        })
    }

    /// Checks and maps a frontend's table under this model's policy (see
    /// [`MemoryTable::map`]); it is not installed.
    ///
    /// # Errors
    /// As [`MemoryTable::map`], with files that are not regular or cannot be
    /// sealed accepted if the policy allows them.
    pub fn map(&self, specs: &[RegionSpec], files: Vec<File>) -> Result<MemoryTable, MemoryError> {
        MemoryTable::map_with(specs, files, self.policy, self.faults.as_ref())
    }

    /// Access to the table in force, as a queue would have it.
    #[cfg(test)]
    pub(crate) fn access(&self) -> Option<TableMemory> {
        self.table().map(|table| TableMemory { table })
    }

    /// The signal a contained SIGBUS in this model's memory raises, if the policy
    /// lets unsealed files in: the daemon ends the session when it fires.
    pub(crate) fn faults(&self) -> Option<&FaultSignal> {
        self.faults.as_ref()
    }

    /// Installs `table` (or forgets the current one with `None`).
    pub fn set(&self, table: Option<MemoryTable>) {
        *self.table.lock().unwrap_or_else(PoisonError::into_inner) = table.map(Arc::new);
    }

    /// The table in force.
    pub fn table(&self) -> Option<Arc<MemoryTable>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl DeviceModel for VhostMemory {
    type Memory = TableMemory;

    fn name(&self) -> &'static str {
        "vhost-user"
    }

    fn open_queue_in(
        &self,
        _index: u16,
        format: RingFormat,
        size: u16,
        addrs: QueueAddrs,
    ) -> Result<DeviceQueue<TableMemory>, ModelError> {
        let table = self
            .table()
            .ok_or_else(|| ModelError::Model("the frontend sent no memory table".into()))?;
        // Sizes, alignment and disjoint areas (virtio 1.2 §2.7; HOSTILE 11, 38) are
        // checked by `open_ring`; the table says whether each area is memory
        // the frontend shared.
        let ring = open_ring(format, size, addrs, |s| {
            table.view(s.addr, s.len).ok_or(ModelError::BadAddrs(addrs))
        })?;
        Ok(DeviceQueue {
            ring,
            memory: TableMemory { table },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::MemfdFlags;
    use std::os::fd::OwnedFd;

    fn memfd(len: u64) -> File {
        let fd = rustix::fs::memfd_create("vhost-mem-test", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .unwrap();
        rustix::fs::ftruncate(&fd, len).unwrap();
        File::from(fd)
    }

    fn spec(gpa: u64, size: u64, user: u64, off: u64) -> RegionSpec {
        RegionSpec {
            guest_phys_addr: gpa,
            memory_size: size,
            user_addr: user,
            mmap_offset: off,
        }
    }

    fn seg(addr: u64, len: u32, writable: bool) -> Segment {
        Segment::new(addr, len, writable, 0, virtio_core::DescSlot::Table(0))
    }

    #[test]
    fn two_regions_of_one_file_resolve_guest_and_frontend_addresses() {
        let f = memfd(0x3000);
        let specs = [
            spec(0x10_0000, 0x1000, 0x7f00_0000, 0),
            spec(0x20_0000, 0x2000, 0x7f00_1000, 0x1000),
        ];
        let t = MemoryTable::map(&specs, vec![f.try_clone().unwrap(), f]).unwrap();
        assert_eq!(t.bytes(), 0x3000);
        assert_eq!(t.frontend_to_guest(0x7f00_1010), Some(0x20_0010));
        assert_eq!(t.frontend_to_guest(0x7f00_3000), None);
        let mem = TableMemory { table: Arc::new(t) };
        // Both regions view the same file: writing the second is visible at its
        // file offset through the first region's neighbour.
        mem.write(&seg(0x20_0000, 16, true), 4, b"abcd").unwrap();
        let mut got = [0; 4];
        mem.read(&seg(0x20_0000, 16, false), 4, &mut got).unwrap();
        assert_eq!(&got, b"abcd");
    }

    #[test]
    fn ranges_outside_or_across_regions_are_refused() {
        let f = memfd(0x2000);
        // Guest-physical neighbours that are not neighbours in the file.
        let specs = [spec(0, 0x1000, 0x1000, 0x1000), spec(0x1000, 0x1000, 0x9000, 0)];
        let t = MemoryTable::map(&specs, vec![f.try_clone().unwrap(), f]).unwrap();
        let mem = TableMemory { table: Arc::new(t) };
        assert!(mem.check(&seg(0xff8, 8, false)).is_ok());
        // Neighbours in guest-physical memory serve a range across them (HOSTILE 36),
        // copied piece by piece.
        assert!(mem.check(&seg(0xff8, 16, false)).is_ok());
        assert!(matches!(
            mem.check(&seg(0x1ff8, 16, false)),
            Err(AccessError::OutOfBounds { .. })
        ));
        assert!(mem.check(&seg(0x2000, 1, false)).is_err());
        assert!(mem.check(&seg(u64::MAX - 4, 8, false)).is_err());
        assert!(matches!(
            mem.write(&seg(0, 8, false), 0, b"x"),
            Err(AccessError::Denied)
        ));
        assert!(matches!(
            mem.read(&seg(0, 8, false), 4, &mut [0; 8]),
            Err(AccessError::PastSegment { .. })
        ));
    }

    #[test]
    fn malformed_tables_are_refused() {
        let f = || memfd(0x2000);
        let err = |specs: &[RegionSpec], files: Vec<File>| MemoryTable::map(specs, files).unwrap_err();
        assert!(matches!(err(&[], vec![]), MemoryError::RegionCount(0)));
        assert!(matches!(
            err(&[spec(0, 0x1000, 0, 0)], vec![f(), f()]),
            MemoryError::FileCount { .. }
        ));
        assert!(matches!(
            err(&[spec(0, 0, 0, 0)], vec![f()]),
            MemoryError::BadRange(0)
        ));
        assert!(matches!(
            err(&[spec(u64::MAX - 0xfff, 0x2000, 0, 0)], vec![f()]),
            MemoryError::BadRange(0)
        ));
        assert!(matches!(
            err(
                &[spec(0, 0x2000, 0, 0), spec(0x1000, 0x1000, 0x8000, 0)],
                vec![f(), f()]
            ),
            MemoryError::Overlap(0, 1)
        ));
        assert!(matches!(
            err(&[spec(0, 0x2000, 0, 0x1000)], vec![f()]),
            MemoryError::FileTooSmall {
                need: 0x3000,
                have: 0x2000,
                ..
            }
        ));
    }

    #[test]
    fn a_mapped_file_is_sealed_against_shrinking() {
        let f = memfd(0x1000);
        let _t = MemoryTable::map(&[spec(0, 0x1000, 0, 0)], vec![f.try_clone().unwrap()]).unwrap();
        assert!(
            rustix::fs::ftruncate(&f, 0).is_err(),
            "the frontend could shrink the file"
        );
    }

    fn unsealable_memfd(len: u64) -> File {
        let fd = rustix::fs::memfd_create("vhost-mem-test", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, len).unwrap();
        File::from(fd)
    }

    /// HOSTILE 35: a file that cannot be sealed against shrinking could be cut
    /// under the mapping and kill the daemon with SIGBUS.
    #[test]
    fn a_memory_file_that_cannot_be_sealed_is_refused() {
        let r = MemoryTable::map(&[spec(0, 0x1000, 0, 0)], vec![unsealable_memfd(0x1000)]);
        assert!(
            matches!(r, Err(MemoryError::Unsealable { index: 0, .. })),
            "{r:?}"
        );
    }

    /// HOSTILE 35: files with no size to check (devices, pipes, sockets) are refused.
    #[test]
    fn memory_files_that_are_not_regular_files_are_refused() {
        let zero = File::options().read(true).write(true).open("/dev/zero").unwrap();
        let (pipe, _w) = std::io::pipe().unwrap();
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        for f in [
            zero,
            File::from(OwnedFd::from(pipe)),
            File::from(OwnedFd::from(sock)),
        ] {
            let r = MemoryTable::map(&[spec(0, 0x1000, 0, 0)], vec![f]);
            assert!(
                matches!(r, Err(MemoryError::NotRegularFile { index: 0 })),
                "{r:?}"
            );
        }
    }

    /// Two files whose guest-physical ranges meet at 0x10_0000.
    fn adjacent() -> (File, File, MemoryTable) {
        let (a, b) = (memfd(0x2000), memfd(0x2000));
        let specs = [
            spec(0x10_0000, 0x2000, 0x7f00_0000, 0),
            spec(0x10_2000, 0x2000, 0x7e00_0000, 0),
        ];
        let t = MemoryTable::map(&specs, vec![a.try_clone().unwrap(), b.try_clone().unwrap()]).unwrap();
        (a, b, t)
    }

    /// HOSTILE 36: a buffer contiguous in guest-physical memory across two adjacent
    /// regions is valid (virtio 1.2 §2.7.5 asks only for a guest-physical range).
    #[test]
    fn a_buffer_across_adjacent_regions_is_served() {
        use std::os::unix::fs::FileExt;
        let (a, b, t) = adjacent();
        let mem = TableMemory { table: Arc::new(t) };
        let s = seg(0x10_1ff0, 0x20, true);
        mem.check(&s).unwrap();
        let data: Vec<u8> = (0..0x20u8).collect();
        mem.write(&s, 0, &data).unwrap();
        let (mut lo, mut hi) = ([0u8; 0x10], [0u8; 0x10]);
        a.read_exact_at(&mut lo, 0x1ff0).unwrap();
        b.read_exact_at(&mut hi, 0).unwrap();
        assert_eq!([lo, hi].concat(), data);
        let mut back = [0u8; 0x18];
        mem.read(&s, 8, &mut back).unwrap();
        assert_eq!(back[..], data[8..]);
    }

    /// HOSTILE 36: a gap between regions, even of one page, is still refused before
    /// any byte moves.
    #[test]
    fn a_buffer_across_a_gap_is_refused_before_any_byte_moves() {
        use std::os::unix::fs::FileExt;
        let (a, b) = (memfd(0x2000), memfd(0x2000));
        let specs = [
            spec(0, 0x2000, 0x7f00_0000, 0),
            spec(0x3000, 0x2000, 0x7e00_0000, 0),
        ];
        let t = MemoryTable::map(&specs, vec![a.try_clone().unwrap(), b]).unwrap();
        let mem = TableMemory { table: Arc::new(t) };
        let s = seg(0x1ff0, 0x1020, true);
        assert!(matches!(mem.check(&s), Err(AccessError::OutOfBounds { .. })));
        assert!(mem.write(&s, 0, &[0xaa; 0x1020]).is_err());
        let mut lo = [0u8; 0x10];
        a.read_exact_at(&mut lo, 0x1ff0).unwrap();
        assert_eq!(lo, [0; 0x10], "bytes moved before the gap was found");
    }

    /// HOSTILE 38: address arithmetic near the top of the address space fails
    /// cleanly instead of overflowing.
    #[test]
    fn accesses_near_the_top_of_the_address_space_are_refused() {
        let t = MemoryTable::map(&[spec(0, 0x1000, 0, 0)], vec![memfd(0x1000)]).unwrap();
        let mem = TableMemory { table: Arc::new(t) };
        let top = seg(u64::MAX - 3, 8, true);
        assert!(mem.read(&top, 4, &mut [0; 4]).is_err());
        assert!(mem.write(&top, 4, &[0; 4]).is_err());
        assert!(mem.check(&top).is_err());
    }

    /// HOSTILE 11 / 38: the three ring areas of a queue must not overlap.
    #[test]
    fn queues_with_overlapping_ring_areas_are_refused() {
        let model = VhostMemory::new();
        model.set(Some(
            MemoryTable::map(&[spec(0, 0x4000, 0, 0)], vec![memfd(0x4000)]).unwrap(),
        ));
        let good = QueueAddrs {
            desc: 0,
            avail: 0x1000,
            used: 0x2000,
        };
        for bad in [
            QueueAddrs { avail: 0x800, ..good },
            QueueAddrs { used: 0xff8, ..good },
            QueueAddrs { used: 0x1000, ..good },
        ] {
            assert!(
                matches!(model.open_queue(0, 256, bad), Err(ModelError::BadAddrs(_))),
                "{bad:?}"
            );
        }
        assert!(model.open_queue(0, 256, good).is_ok());
    }

    /// HOSTILE 36: a ring chain whose indirect table and whose data buffer both
    /// cross from one region (file) into its guest-physical neighbour is walked
    /// and served like any other.
    #[test]
    fn a_chain_with_its_indirect_table_and_data_across_regions_is_served() {
        use std::os::unix::fs::FileExt;
        use virtio_core::features::Features;
        use virtio_core::ring::layout::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
        fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
            let mut d = addr.to_le_bytes().to_vec();
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&next.to_le_bytes());
            d
        }
        // Regions A, B, C: guest-physical 0..0x4000 (the rings), 0x4000..0x8000,
        // 0x8000..0xc000, each its own file.
        let (a, b, c) = (memfd(0x4000), memfd(0x4000), memfd(0x4000));
        let specs = [
            spec(0, 0x4000, 0x7f00_0000, 0),
            spec(0x4000, 0x4000, 0x7e00_0000, 0),
            spec(0x8000, 0x4000, 0x7d00_0000, 0),
        ];
        let files = Vec::from([&a, &b, &c].map(|f| f.try_clone().unwrap()));
        let model = VhostMemory::new();
        model.set(Some(MemoryTable::map(&specs, files).unwrap()));
        // The indirect table at 0x3ff0: its first entry in A, its second in B. The
        // readable buffer runs from B into C, the writable one lies in B.
        let mut table = desc(0x7f00, 0x200, VIRTQ_DESC_F_NEXT, 1);
        table.extend(desc(0x5000, 16, VIRTQ_DESC_F_WRITE, 0));
        a.write_all_at(&table[..16], 0x3ff0).unwrap();
        b.write_all_at(&table[16..], 0).unwrap();
        let data: Vec<u8> = (0..0x200u32).map(|i| (i * 7).to_le_bytes()[0]).collect();
        b.write_all_at(&data[..0x100], 0x3f00).unwrap();
        c.write_all_at(&data[0x100..], 0).unwrap();
        // Descriptor 0 points at the table; avail ring: flags 0, idx 1, ring[0] = 0.
        a.write_all_at(&desc(0x3ff0, 32, VIRTQ_DESC_F_INDIRECT, 0), 0)
            .unwrap();
        a.write_all_at(&[0, 0, 1, 0, 0, 0], 0x1000).unwrap();
        let addrs = QueueAddrs {
            desc: 0,
            avail: 0x1000,
            used: 0x2000,
        };
        let q = model.open_queue(0, 16, addrs).unwrap();
        let features = Features::VERSION_1 | Features::INDIRECT_DESC;
        let mut dev = virtio_core::SplitDevice::new(16, &q.ring, q.memory, features).unwrap();
        let chain = dev.pop().unwrap().expect("a chain");
        assert_eq!((chain.readable_len(), chain.writable_len()), (0x200, 16));
        let mut got = vec![0u8; 0x200];
        chain.reader(dev.memory()).read_exact(&mut got).unwrap();
        assert_eq!(got, data);
        chain.writer(dev.memory()).write_all(b"written through!").unwrap();
        let mut back = [0u8; 16];
        b.read_exact_at(&mut back, 0x1000).unwrap();
        assert_eq!(&back, b"written through!");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever table a frontend sends, mapping it never panics; a table that is
        /// accepted resolves every address inside a region to that region only, and
        /// refuses every range that leaves it.
        #[test]
        fn any_table_is_refused_or_resolves_only_inside_its_regions(
            raw in proptest::collection::vec((0u64..16, 1u64..4, 0u64..16, 0u64..4), 1..5),
            probes in proptest::collection::vec((0u64..20 * 4096, 1u32..3 * 4096), 1..32),
        ) {
            let page = 4096;
            let specs: Vec<RegionSpec> = raw
                .iter()
                .map(|&(gpa, pages, user, off)| spec(gpa * page, pages * page, (user + 100) * page, off * page))
                .collect();
            let file = memfd(8 * page);
            let files = specs.iter().map(|_| file.try_clone().unwrap()).collect();
            let Ok(table) = MemoryTable::map(&specs, files) else {
                return Ok(());
            };
            let mem = TableMemory { table: Arc::new(table) };
            let in_region = |a: u64, len: u64| {
                specs
                    .iter()
                    .any(|r| a >= r.guest_phys_addr && a + len <= r.guest_phys_addr + r.memory_size)
            };
            for (addr, len) in probes {
                // Every byte in some region (regions are whole pages): served, across
                // neighbouring regions too; a view only inside one region.
                let first = addr / page;
                let last = (addr + u64::from(len) - 1) / page;
                let covered = (first..=last).all(|p| in_region(p * page, page) || {
                    // The partial first or last page: only its bytes in the range.
                    let lo = addr.max(p * page);
                    let hi = (addr + u64::from(len)).min((p + 1) * page);
                    in_region(lo, hi - lo)
                });
                let s = seg(addr, len, true);
                proptest::prop_assert_eq!(mem.check(&s).is_ok(), covered, "{:#x}+{}", addr, len);
                let mut buf = vec![0u8; len as usize];
                proptest::prop_assert_eq!(mem.read(&s, 0, &mut buf).is_ok(), covered);
            }
        }
    }

    #[test]
    fn queues_open_only_on_mapped_aligned_rings() {
        let model = VhostMemory::new();
        let addrs = QueueAddrs {
            desc: 0,
            avail: 0x1000,
            used: 0x2000,
        };
        assert!(model.open_queue(0, 256, addrs).is_err(), "no table yet");
        model.set(Some(
            MemoryTable::map(&[spec(0, 0x4000, 0, 0)], vec![memfd(0x4000)]).unwrap(),
        ));
        let q = model.open_queue(0, 256, addrs).unwrap();
        assert!(!q.ring.desc.is_writable() && q.ring.device.is_writable());
        let odd = QueueAddrs { desc: 8, ..addrs };
        assert!(matches!(
            model.open_queue(0, 256, odd),
            Err(ModelError::BadAddrs(_))
        ));
        let outside = QueueAddrs {
            used: 0x3ffc,
            ..addrs
        };
        assert!(matches!(
            model.open_queue(0, 256, outside),
            Err(ModelError::BadAddrs(_))
        ));
        assert!(matches!(
            model.open_queue(0, 3, addrs),
            Err(ModelError::BadSize(3))
        ));
    }
}
