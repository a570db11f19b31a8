//! One guest memory seen both ways: as our test [`Arena`] and as a rust-vmm
//! [`vm_memory::GuestMemoryMmap`], so that `virtio-core` can talk to the rust-vmm
//! `virtio-queue` crate over the very same bytes.
//!
//! [`SharedGuest`] maps the arena's host mapping a second time as a vm-memory region at
//! the same guest addresses (no copy, no second mapping: the same pointer). Then:
//!
//! - [`SharedGuest::device_queue`] builds a `virtio_queue::Queue` (the rust-vmm
//!   device side) over ring areas our [`SplitDriver`](virtio_core::SplitDriver) owns;
//! - [`SharedGuest::ring_memory`] / [`SharedGuest::split_device`] build our
//!   [`RingMemory`] / [`SplitDevice`] over ring areas someone else laid out, for
//!   example `virtio_queue::mock::MockSplitQueue` ([`RingAddrs::of_mock`]).
//!
//! ```
//! use virtio_queue::QueueT;
//! use vio::peer::SharedGuest;
//!
//! let guest = SharedGuest::new(0x10_0000, 1 << 20).unwrap();
//! let (addrs, ring) = guest.arena().alloc_split_ring(16).unwrap();
//! let queue = guest.device_queue(16, addrs.into(), true).unwrap();
//! assert!(queue.ready() && queue.event_idx_enabled());
//! # drop(ring);
//! ```

use std::fmt;
use std::sync::Arc;

use virtio_core::features::Features;
use virtio_core::ring::SplitLayout;
use virtio_core::shm::RegionError;
use virtio_core::test_utils::{Arena, ArenaError};
use virtio_core::{RingMemory, SplitDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::{Bitmap, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// `PROT_READ | PROT_WRITE` and `MAP_SHARED | MAP_ANONYMOUS` on Linux. vm-memory only
/// records these for a mapping it did not create (it never maps or unmaps it), so they
/// describe the arena's mapping rather than configure anything.
const ARENA_PROT: i32 = 0x1 | 0x2;
const ARENA_FLAGS: i32 = 0x01 | 0x20;

/// The "dirty bitmap" of the vm-memory view: it tracks nothing and exists to keep the
/// arena alive.
///
/// vm-memory's `GuestMemoryMmap` is `Clone` and its regions are `Arc`-shared, so a copy
/// can outlive any struct we put it in. Each region owns its bitmap, so holding the
/// arena here ties the mapping's lifetime to every clone of the region, not just to
/// [`SharedGuest`].
#[derive(Debug, Clone)]
pub struct ArenaOwner {
    // Never read: owning it is the point.
    _arena: Arc<Arena>,
}

impl WithBitmapSlice<'_> for ArenaOwner {
    type S = ();
}

impl Bitmap for ArenaOwner {
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, _offset: usize) {}
}

/// vm-memory's view of an [`Arena`]: one region at the arena's guest addresses.
pub type PeerMemory = GuestMemoryMmap<ArenaOwner>;

/// Why the bridge could not be built.
#[derive(Debug)]
pub enum PeerError {
    /// The arena could not be created or allocated from.
    Arena(ArenaError),
    /// vm-memory refused the arena's mapping.
    Mmap(vm_memory::mmap::MmapRegionError),
    /// The arena's guest range overflows the address space.
    Placement,
    /// vm-memory refused the region's placement.
    Collection(vm_memory::GuestRegionCollectionError),
    /// A guest range lies outside the arena.
    Range(RegionError),
    /// `virtio_queue::Queue` refused a parameter.
    Queue(virtio_queue::Error),
    /// The queue's areas are not inside guest memory (`Queue::is_valid` said no).
    InvalidQueue,
    /// Our split ring refused the areas.
    Ring(virtio_core::ring::split::RingSetupError),
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerError::Arena(_) => "arena unusable",
            PeerError::Mmap(_) => "vm-memory refused the arena mapping",
            PeerError::Placement => "arena guest range overflows",
            PeerError::Collection(_) => "vm-memory refused the guest region",
            PeerError::Range(_) => "guest range outside the arena",
            PeerError::Queue(_) => "virtio-queue refused a queue parameter",
            PeerError::InvalidQueue => "queue areas are not inside guest memory",
            PeerError::Ring(_) => "split ring refused the areas",
        })
    }
}

impl std::error::Error for PeerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PeerError::Arena(e) => Some(e),
            PeerError::Mmap(e) => Some(e),
            PeerError::Collection(e) => Some(e),
            PeerError::Range(e) => Some(e),
            PeerError::Queue(e) => Some(e),
            PeerError::InvalidQueue | PeerError::Placement => None,
            PeerError::Ring(e) => Some(e),
        }
    }
}

/// Guest addresses of a split queue's three areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

impl From<(u64, u64, u64)> for RingAddrs {
    /// From the `(desc, avail, used)` triple [`Arena::alloc_split_ring`] returns.
    fn from((desc, avail, used): (u64, u64, u64)) -> RingAddrs {
        RingAddrs { desc, avail, used }
    }
}

impl RingAddrs {
    /// The addresses `virtio_queue::mock::MockSplitQueue` chose.
    ///
    /// Beware: in virtio-queue 0.18 the mock places its used ring right after
    /// `queue_size` *bytes* of available-ring entries instead of `2 * queue_size + 2`,
    /// so its used ring overlaps the second half of its available ring and
    /// `used_event`. Only the first `queue_size / 2` available entries are safe, and
    /// EVENT_IDX cannot be used at these addresses.
    pub fn of_mock<M: vm_memory::GuestMemory>(mock: &virtio_queue::mock::MockSplitQueue<'_, M>) -> RingAddrs {
        RingAddrs {
            desc: mock.desc_table_addr().0,
            avail: mock.avail_addr().0,
            used: mock.used_addr().0,
        }
    }
}

/// One guest memory reachable as our [`Arena`] and as vm-memory's [`PeerMemory`].
#[derive(Debug, Clone)]
pub struct SharedGuest {
    arena: Arc<Arena>,
    mem: PeerMemory,
}

impl SharedGuest {
    /// A fresh arena of `size` bytes at guest address `base` (non-zero, page aligned),
    /// mapped both ways.
    pub fn new(base: u64, size: usize) -> Result<SharedGuest, PeerError> {
        SharedGuest::over(Arena::new(base, size).map_err(PeerError::Arena)?)
    }

    /// Maps an existing arena into vm-memory at the same guest addresses.
    pub fn over(arena: Arc<Arena>) -> Result<SharedGuest, PeerError> {
        let region = arena.region();
        let (ptr, len) = (region.as_ptr().cast_mut(), region.len());
        let builder = MmapRegionBuilder::new_with_bitmap(
            len,
            ArenaOwner {
                _arena: arena.clone(),
            },
        )
        .with_mmap_prot(ARENA_PROT)
        .with_mmap_flags(ARENA_FLAGS);
        // SAFETY: `[ptr, ptr + len)` is the arena's whole mapping (page aligned, readable
        // and writable). The region's bitmap holds an `Arc<Arena>`, so the mapping stays
        // alive as long as this region or any clone of the guest memory does; vm-memory
        // does not unmap memory it did not map. vm-memory reaches the bytes only through
        // volatile copies and atomics, never Rust references, which is the access rule of
        // `virtio_core::shm::Region::from_raw` that the arena's users follow too.
        let builder = unsafe { builder.with_raw_mmap_pointer(ptr) };
        let mapping = builder.build().map_err(PeerError::Mmap)?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(arena.base())).ok_or(PeerError::Placement)?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(PeerError::Collection)?;
        Ok(SharedGuest { arena, mem })
    }

    /// Our view: the arena (allocation, [`virtio_core::DeviceMemory`], byte access).
    pub fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }

    /// vm-memory's view of the same bytes, for `virtio_queue` and the mock.
    pub fn memory(&self) -> &PeerMemory {
        &self.mem
    }

    /// A ready `virtio_queue::Queue` (the rust-vmm device side) of `size` over the areas
    /// at `addrs`, with EVENT_IDX as negotiated; checked with `Queue::is_valid`.
    pub fn device_queue(&self, size: u16, addrs: RingAddrs, event_idx: bool) -> Result<Queue, PeerError> {
        let mut q = Queue::new(size).map_err(PeerError::Queue)?;
        q.try_set_size(size).map_err(PeerError::Queue)?;
        q.try_set_desc_table_address(GuestAddress(addrs.desc))
            .map_err(PeerError::Queue)?;
        q.try_set_avail_ring_address(GuestAddress(addrs.avail))
            .map_err(PeerError::Queue)?;
        q.try_set_used_ring_address(GuestAddress(addrs.used))
            .map_err(PeerError::Queue)?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(&self.mem) {
            return Err(PeerError::InvalidQueue);
        }
        Ok(q)
    }

    /// Our [`RingMemory`] for a queue of `size` whose areas sit at `addrs`.
    pub fn ring_memory(&self, size: u16, addrs: RingAddrs) -> Result<RingMemory, PeerError> {
        let l = SplitLayout::new(size).ok_or(PeerError::Queue(virtio_queue::Error::InvalidSize))?;
        let area = |addr, len| self.arena.guest_region(addr, len).map_err(PeerError::Range);
        Ok(RingMemory {
            desc: area(addrs.desc, l.desc_bytes())?,
            driver: area(addrs.avail, l.avail_bytes())?,
            device: area(addrs.used, l.used_bytes())?,
        })
    }

    /// Our device side of a queue of `size` whose areas sit at `addrs` (for instance
    /// [`RingAddrs::of_mock`]), reaching descriptor memory through the arena.
    pub fn split_device(
        &self,
        size: u16,
        addrs: RingAddrs,
        features: Features,
    ) -> Result<SplitDevice<Arc<Arena>>, PeerError> {
        let ring = self.ring_memory(size, addrs)?;
        SplitDevice::new(size, &ring, self.arena.clone(), features).map_err(PeerError::Ring)
    }
}
