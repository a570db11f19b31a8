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
//! descriptor outside them is refused before any byte moves, and a range that
//! crosses from one region into another (regions are not contiguous in the daemon's
//! address space) is refused as well. QEMU merges guest-physical neighbours backed by
//! the same file into one region, so a real guest never needs such a range.
//!
//! A memory file that shrinks under a mapping turns every access past its new end
//! into SIGBUS. The table therefore checks each file's size against its range, and
//! seals the file against shrinking where the frontend allows sealing (QEMU's memfd
//! backend seals its files itself by default); a file that can be neither checked
//! nor sealed is mapped with a warning, because it leaves the daemon at the
//! frontend's mercy.

use rustix::fs::SealFlags;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, PoisonError};
use virtio_core::access::check_within;
use virtio_core::ring::SplitLayout;
use virtio_core::shm::{Mapping, Region};
use virtio_core::{
    AccessError, DeviceMemory, DeviceModel, DeviceQueue, ModelError, QueueAddrs, Segment, SplitRingMemory,
};

/// The most regions a vhost-user memory table holds (the protocol's
/// VHOST_MEMORY_BASELINE_NREGIONS without CONFIGURE_MEM_SLOTS).
pub const MAX_REGIONS: usize = 8;

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
    /// Checks and maps `specs`, region `i` from `files[i]`.
    ///
    /// # Errors
    /// A [`MemoryError`] for a table that is malformed, overlaps itself, points past
    /// the end of a file, or cannot be mapped. Nothing is mapped then.
    pub fn map(specs: &[RegionSpec], files: Vec<File>) -> Result<MemoryTable, MemoryError> {
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
            check_file(index, s, &file)?;
            regions.push(map_region(index, s, &file)?);
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
        // Regions are few (at most eight) and sorted: the last one starting at or
        // below `gpa` is the only candidate.
        let i = self.regions.partition_point(|m| m.gpa <= gpa).checked_sub(1)?;
        let m = &self.regions[i];
        let off = gpa - m.gpa;
        let end = off.checked_add(len)?;
        (end <= m.size).then_some((&m.region, off))
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

/// Refuses a region its file cannot back, and keeps the file from shrinking.
fn check_file(index: usize, s: &RegionSpec, file: &File) -> Result<(), MemoryError> {
    let need = s.mmap_offset + s.memory_size;
    let meta = file
        .metadata()
        .map_err(|source| MemoryError::Map { index, source })?;
    if !meta.file_type().is_file() {
        // A device file (/dev/shm is a directory of regular files; a DAX device is
        // not) has no size to check.
        tracing::warn!(
            index,
            "memory region is not a regular file; its size cannot be checked"
        );
        return Ok(());
    }
    if meta.len() < need {
        return Err(MemoryError::FileTooSmall {
            index,
            need,
            have: meta.len(),
        });
    }
    let sealed = rustix::fs::fcntl_get_seals(file.as_fd()).is_ok_and(|s| s.contains(SealFlags::SHRINK))
        || rustix::fs::fcntl_add_seals(file.as_fd(), SealFlags::SHRINK).is_ok();
    if !sealed {
        tracing::warn!(
            index,
            "memory region's file cannot be sealed against shrinking: a frontend that shrinks it \
             crashes this daemon"
        );
    }
    Ok(())
}

fn map_region(index: usize, s: &RegionSpec, file: &File) -> Result<Mapped, MemoryError> {
    let map_err = |source| MemoryError::Map { index, source };
    let page = rustix::param::page_size() as u64;
    // mmap(2) wants a page-aligned offset: map from the page holding the region's
    // start, and view the region inside.
    let lead = s.mmap_offset % page;
    let len = (lead + s.memory_size).div_ceil(page) * page;
    let len = usize::try_from(len).map_err(|_| map_err(std::io::ErrorKind::InvalidInput.into()))?;
    let mapping = Mapping::of_fd(file.as_fd(), s.mmap_offset - lead, len, true).map_err(map_err)?;
    let region = mapping
        .region()
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
    fn locate(&self, seg: &Segment, offset: u32, len: usize) -> Result<(&Region, u64), AccessError> {
        check_within(seg, offset, len)?;
        let gpa = seg.addr() + u64::from(offset);
        self.table.find(gpa, len as u64).ok_or(AccessError::OutOfBounds {
            addr: gpa,
            len: len as u64,
        })
    }
}

impl DeviceMemory for TableMemory {
    fn check(&self, seg: &Segment) -> Result<(), AccessError> {
        self.table
            .find(seg.addr(), u64::from(seg.len()))
            .map(|_| ())
            .ok_or(AccessError::OutOfBounds {
                addr: seg.addr(),
                len: u64::from(seg.len()),
            })
    }

    fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError> {
        let (region, off) = self.locate(seg, offset, dst.len())?;
        region.read(off, dst).map_err(|e| AccessError::Model(Box::new(e)))
    }

    fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError> {
        if !seg.writable() {
            return Err(AccessError::Denied);
        }
        let (region, off) = self.locate(seg, offset, src.len())?;
        region
            .write(off, src)
            .map_err(|e| AccessError::Model(Box::new(e)))
    }

    fn direct(&self, seg: &Segment) -> Option<Region> {
        let region = self.table.view(seg.addr(), u64::from(seg.len()))?;
        Some(if seg.writable() {
            region
        } else {
            region.read_only()
        })
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
}

impl VhostMemory {
    /// A model with no memory yet: every queue is refused until a table arrives.
    pub fn new() -> VhostMemory {
        VhostMemory::default()
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

    fn open_queue(
        &self,
        _index: u16,
        size: u16,
        addrs: QueueAddrs,
    ) -> Result<DeviceQueue<TableMemory>, ModelError> {
        let table = self
            .table()
            .ok_or_else(|| ModelError::Model("the frontend sent no memory table".into()))?;
        let layout = SplitLayout::new(size).ok_or(ModelError::BadSize(size))?;
        let area = |gpa: u64, bytes: u64, align: u64| {
            if !gpa.is_multiple_of(align) {
                return Err(ModelError::BadAddrs(addrs));
            }
            table.view(gpa, bytes).ok_or(ModelError::BadAddrs(addrs))
        };
        // The device has no business writing the driver's areas: read-only views
        // catch device bugs early.
        let ring = SplitRingMemory {
            desc: area(addrs.desc, layout.desc_bytes(), SplitLayout::DESC_ALIGN)?.read_only(),
            avail: area(addrs.avail, layout.avail_bytes(), SplitLayout::AVAIL_ALIGN)?.read_only(),
            used: area(addrs.used, layout.used_bytes(), SplitLayout::USED_ALIGN)?,
        };
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
        assert!(mem.direct(&seg(0x10_0ff0, 16, false)).is_some());
    }

    #[test]
    fn ranges_outside_or_across_regions_are_refused() {
        let f = memfd(0x2000);
        // Guest-physical neighbours that are not neighbours in the file.
        let specs = [spec(0, 0x1000, 0x1000, 0x1000), spec(0x1000, 0x1000, 0x9000, 0)];
        let t = MemoryTable::map(&specs, vec![f.try_clone().unwrap(), f]).unwrap();
        let mem = TableMemory { table: Arc::new(t) };
        assert!(mem.check(&seg(0xff8, 8, false)).is_ok());
        assert!(matches!(
            mem.check(&seg(0xff8, 16, false)),
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
            for (addr, len) in probes {
                let inside = specs.iter().any(|r| {
                    addr >= r.guest_phys_addr && addr + u64::from(len) <= r.guest_phys_addr + r.memory_size
                });
                let s = seg(addr, len, true);
                proptest::prop_assert_eq!(mem.check(&s).is_ok(), inside, "{:#x}+{}", addr, len);
                let mut buf = vec![0u8; len as usize];
                proptest::prop_assert_eq!(mem.read(&s, 0, &mut buf).is_ok(), inside);
                proptest::prop_assert_eq!(mem.direct(&s).is_some(), inside);
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
        assert!(!q.ring.desc.is_writable() && q.ring.used.is_writable());
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
