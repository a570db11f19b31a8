//! Test doubles other crates use (feature `test-utils`): an in-memory guest arena, a
//! sharing model over it in which descriptor addresses are guest addresses (the shape
//! of model 2) and ring memory allocated from it.
//!
//! These are real implementations, bounds-checked like production code; they only lack
//! the isolation machinery of the real sharing models.
//!
//! And [`skip`]: how a test that cannot run on this machine says so, visibly, and
//! fails under CI.

pub mod raw;
mod skip;

pub use skip::skip;

use crate::access::{AccessError, DeviceMemory, Segment, check_within};
use crate::ring::areas::RingMemory;
use crate::ring::layout::SplitLayout;
use crate::ring::packed::{EventSuppress, PackedLayout};
use crate::share::{Direction, DriverShare, Exposed, GuestBuf, ShareError};
use crate::shm::{Mapping, Region, RegionError};
use std::sync::{Arc, Mutex};

/// Why an arena operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    /// Mapping the memory failed.
    #[error("mapping arena memory failed")]
    Map(#[source] std::io::Error),
    /// The bump allocator ran out of space.
    #[error("arena has no room for {0} more bytes")]
    Full(u64),
    /// A guest range outside the arena.
    #[error("guest range outside the arena")]
    Range(#[from] RegionError),
    /// Base address 0 or not page aligned.
    #[error("arena base {0:#x} must be non-zero and page aligned")]
    BadBase(u64),
}

/// A guest's memory: a zeroed shared mapping at guest addresses
/// `[base, base + size)`, with a bump allocator for test buffers and rings.
pub struct Arena {
    region: Region,
    base: u64,
    next: Mutex<u64>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("base", &self.base)
            .field("size", &self.region.len())
            .finish()
    }
}

impl Arena {
    /// Maps `size` bytes (rounded up to pages) at guest address `base`.
    pub fn new(base: u64, size: usize) -> Result<Arc<Arena>, ArenaError> {
        if base == 0 || !base.is_multiple_of(4096) {
            return Err(ArenaError::BadBase(base));
        }
        let mem = Mapping::anonymous(size).map_err(ArenaError::Map)?;
        Ok(Arc::new(Arena {
            region: mem.region(),
            base,
            next: Mutex::new(base),
        }))
    }

    /// First guest address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.region.len() as u64
    }

    /// The whole arena as a region (host view).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Allocates `len` bytes aligned to `align` (a power of two) and returns the guest
    /// address. Memory is never freed; arenas are per test.
    pub fn alloc(&self, len: u64, align: u64) -> Result<u64, ArenaError> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let start = next
            .checked_next_multiple_of(align.max(1))
            .ok_or(ArenaError::Full(len))?;
        let end = start.checked_add(len).ok_or(ArenaError::Full(len))?;
        if end > self.base + self.size() {
            return Err(ArenaError::Full(len));
        }
        *next = end;
        Ok(start)
    }

    /// The region for guest range `[gpa, gpa + len)`.
    pub fn guest_region(&self, gpa: u64, len: u64) -> Result<Region, RegionError> {
        self.region.sub(self.offset(gpa, len)?, len)
    }

    /// Copies guest memory at `gpa` into `dst`.
    pub fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), RegionError> {
        self.region.read(self.offset(gpa, dst.len() as u64)?, dst)
    }

    /// Copies `src` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, src: &[u8]) -> Result<(), RegionError> {
        self.region.write(self.offset(gpa, src.len() as u64)?, src)
    }

    fn offset(&self, gpa: u64, len: u64) -> Result<u64, RegionError> {
        let oob = RegionError::OutOfBounds {
            offset: gpa,
            len,
            size: self.region.len(),
        };
        let off = gpa.checked_sub(self.base).ok_or(oob)?;
        match off.checked_add(len) {
            Some(end) if end <= self.size() => Ok(off),
            _ => Err(oob),
        }
    }

    /// Allocates the three areas of a split queue of `size` and returns their guest
    /// addresses `(desc, avail, used)` and the driver's (writable) ring memory.
    pub fn alloc_split_ring(&self, size: u16) -> Result<((u64, u64, u64), RingMemory), ArenaError> {
        let l = SplitLayout::new(size).ok_or(ArenaError::Full(0))?;
        let desc = self.alloc(l.desc_bytes(), 4096)?;
        let avail = self.alloc(l.avail_bytes(), 64)?;
        // Own cache line, away from the avail ring the other side writes.
        let used = self.alloc(l.used_bytes(), 4096)?;
        let mem = RingMemory {
            desc: self.guest_region(desc, l.desc_bytes())?,
            driver: self.guest_region(avail, l.avail_bytes())?,
            device: self.guest_region(used, l.used_bytes())?,
        };
        Ok(((desc, avail, used), mem))
    }
}

impl Arena {
    /// Allocates the three areas of a packed queue of `size` and returns their guest
    /// addresses `(desc, driver, device)` and the driver's (writable) ring memory.
    pub fn alloc_packed_ring(&self, size: u16) -> Result<((u64, u64, u64), RingMemory), ArenaError> {
        let l = PackedLayout::new(size).ok_or(ArenaError::Full(0))?;
        let desc = self.alloc(l.desc_bytes(), 4096)?;
        // Each event suppression structure on its own cache line: each side writes one.
        let driver = self.alloc(EventSuppress::SIZE, 64)?;
        let device = self.alloc(EventSuppress::SIZE, 64)?;
        let mem = RingMemory {
            desc: self.guest_region(desc, l.desc_bytes())?,
            driver: self.guest_region(driver, EventSuppress::SIZE)?,
            device: self.guest_region(device, EventSuppress::SIZE)?,
        };
        Ok(((desc, driver, device), mem))
    }
}

/// The device's view of an arena: descriptor addresses are guest addresses, every
/// range is bounds-checked against the arena.
impl DeviceMemory for Arena {
    fn check(&self, seg: &Segment) -> Result<(), AccessError> {
        self.offset(seg.addr(), u64::from(seg.len()))
            .map(|_| ())
            .map_err(|_| AccessError::OutOfBounds {
                addr: seg.addr(),
                len: u64::from(seg.len()),
            })
    }

    fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError> {
        check_within(seg, offset, dst.len())?;
        Arena::read(self, seg.addr() + u64::from(offset), dst).map_err(|_| AccessError::OutOfBounds {
            addr: seg.addr(),
            len: u64::from(seg.len()),
        })
    }

    fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError> {
        if !seg.writable() {
            return Err(AccessError::Denied);
        }
        check_within(seg, offset, src.len())?;
        Arena::write(self, seg.addr() + u64::from(offset), src).map_err(|_| AccessError::OutOfBounds {
            addr: seg.addr(),
            len: u64::from(seg.len()),
        })
    }
}

/// Handle of a buffer exposed by [`IdentityShare`].
#[derive(Debug, PartialEq, Eq)]
pub enum IdentityToken {
    /// A caller buffer: nothing to undo.
    Buffer,
    /// An indirect table slot to give back.
    Table(u64),
}

/// Driver side of the identity model: a buffer's guest address is its descriptor
/// address. Indirect tables come from a pool of arena slots.
#[derive(Debug)]
pub struct IdentityShare {
    arena: Arc<Arena>,
    slot_bytes: u64,
    free_tables: Vec<u64>,
    /// Buffers and tables currently exposed (each must be retired once).
    pub live: usize,
}

impl IdentityShare {
    /// A share over `arena` whose indirect tables hold up to `max_table_entries`.
    pub fn new(arena: Arc<Arena>, max_table_entries: u16) -> IdentityShare {
        IdentityShare {
            arena,
            slot_bytes: 16 * u64::from(max_table_entries.max(1)),
            free_tables: Vec::new(),
            live: 0,
        }
    }
}

impl DriverShare for IdentityShare {
    type Token = IdentityToken;

    fn expose(&mut self, buf: GuestBuf, _dir: Direction) -> Result<Exposed<IdentityToken>, ShareError> {
        self.arena
            .offset(buf.addr, u64::from(buf.len))
            .map_err(|_| ShareError::OutOfBounds {
                addr: buf.addr,
                len: buf.len,
            })?;
        self.live += 1;
        Ok(Exposed {
            addr: buf.addr,
            len: buf.len,
            token: IdentityToken::Buffer,
        })
    }

    fn expose_table(&mut self, table: &[u8]) -> Result<Exposed<IdentityToken>, ShareError> {
        let len = u32::try_from(table.len()).map_err(|_| ShareError::Exhausted(u32::MAX))?;
        if u64::from(len) > self.slot_bytes {
            return Err(ShareError::Exhausted(len));
        }
        let slot = match self.free_tables.pop() {
            Some(s) => s,
            None => self
                .arena
                .alloc(self.slot_bytes, 16)
                .map_err(|_| ShareError::Exhausted(len))?,
        };
        if Arena::write(&self.arena, slot, table).is_err() {
            self.free_tables.push(slot);
            return Err(ShareError::Exhausted(len));
        }
        self.live += 1;
        Ok(Exposed {
            addr: slot,
            len,
            token: IdentityToken::Table(slot),
        })
    }

    fn retire(&mut self, token: IdentityToken, _written: u32) {
        self.live -= 1;
        if let IdentityToken::Table(slot) = token {
            self.free_tables.push(slot);
        }
    }
}
