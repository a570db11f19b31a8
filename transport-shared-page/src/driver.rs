//! The driver side: setting up the shared region, creating queues in it, and the
//! bounce share that copies buffers in and out.

use crate::bounce::{Block, BounceAlloc};
use crate::device::SharedPageDevice;
use crate::error::SharedPageError;
use crate::layout::{Layout, SharedPageConfig};
use hypervisor::{Domain, GuestMemory, MemoryError};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use virtio_core::ring::areas::RingFormat;
use virtio_core::ring::layout::SplitLayout;
use virtio_core::shm::Region;
use virtio_core::{
    Direction, DriverModel, DriverQueue, DriverShare, Exposed, GuestBuf, ModelError, RingMemory, ShareError,
};

/// Sets up sharing model 1 for `guest`: allocates and zeroes one shared region of
/// whole pages in the guest's memory (every queue's rings and bounce area, laid out
/// by [`Layout`]) and returns the guest's side and the device's side.
///
/// The device side receives a fresh mapping of exactly those pages
/// ([`GuestMemory::map_pages`]) and nothing else: it holds no handle to the domain
/// or to the rest of its memory.
pub fn pair(
    guest: &Arc<Domain>,
    cfg: SharedPageConfig,
) -> Result<(SharedPageDriver, SharedPageDevice), ModelError> {
    let (driver, device) = set_up(guest, cfg, false)?;
    let device = device.ok_or(SharedPageError::Memory(MemoryError::NotIsolated(driver.gpa)))?;
    Ok((driver, device))
}

/// Sets up sharing model 1 for a device that runs in another process: as [`pair`],
/// but the region's pages get a memfd of their own, mapped in place in the guest
/// ([`GuestMemory::isolate_pages`]), and the device side is that file: a writable
/// descriptor of it, to be sent to the device process, which maps it and builds its
/// side with [`SharedPageDevice::from_region`]. The file is exactly the region, its
/// size sealed; it reaches nothing else of the guest (HOSTILE 39).
pub fn pair_for_process(
    guest: &Arc<Domain>,
    cfg: SharedPageConfig,
) -> Result<(SharedPageDriver, std::os::fd::OwnedFd), ModelError> {
    let (driver, _) = set_up(guest, cfg, true)?;
    let fd = guest
        .memory()
        .isolated_file(driver.gpa, true)
        .map_err(SharedPageError::Memory)?;
    Ok((driver, fd))
}

/// Allocates, zeroes and (if `isolate`) isolates the region, and maps the device's
/// view unless the device lives in another process.
fn set_up(
    guest: &Arc<Domain>,
    cfg: SharedPageConfig,
    isolate: bool,
) -> Result<(SharedPageDriver, Option<SharedPageDevice>), ModelError> {
    let memory = guest.memory();
    let page = memory.page_size();
    let layout = Layout::new(&cfg, page)?;
    let len = layout.len();
    let gpa = memory.alloc_pages(len / page).map_err(SharedPageError::Memory)?;
    let setup = || -> Result<(Region, Option<Region>), MemoryError> {
        let own = memory.region(gpa, len)?;
        // The pages may hold what the guest kept there before: the device must see
        // none of it.
        own.zero(0, len)?;
        if isolate {
            memory.isolate_pages(gpa, len)?;
            return Ok((own, None));
        }
        let device = memory.map_pages(gpa, len, true)?;
        Ok((own, Some(device)))
    };
    let (own, device_view) = match setup() {
        Ok(views) => views,
        Err(e) => {
            // No device mapping exists yet, so the pages can go back.
            if let Err(free) = memory.free(gpa, len) {
                tracing::error!(error = %free, "returning the shared region failed");
            }
            return Err(SharedPageError::Memory(e).into());
        }
    };
    tracing::debug!(guest = %guest.id(), gpa, len, "shared-page region set up");
    let claims = (0..cfg.max_queues)
        .map(|_| Arc::new(AtomicBool::new(false)))
        .collect();
    let driver = SharedPageDriver {
        memory: memory.clone(),
        gpa,
        layout,
        shared: own,
        claims,
    };
    Ok((driver, device_view.map(|v| SharedPageDevice::new(v, layout))))
}

/// The guest's side of a shared-page region.
///
/// The region's pages stay allocated in the guest for as long as the guest lives,
/// even after this value is dropped: the device's mapping of them cannot be revoked
/// in this model, so handing them back to the guest's allocator would let the device
/// see whatever the guest put there next.
pub struct SharedPageDriver {
    memory: Arc<GuestMemory>,
    gpa: u64,
    layout: Layout,
    /// The guest's own view of the whole region.
    shared: Region,
    /// Per queue: whether a live share owns its bounce area.
    claims: Box<[Arc<AtomicBool>]>,
}

impl fmt::Debug for SharedPageDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedPageDriver")
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl SharedPageDriver {
    /// The region's map.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Guest address of the region's first byte (model-1 address 0).
    pub fn shared_gpa(&self) -> u64 {
        self.gpa
    }

    /// The guest's own view of the whole region.
    pub fn shared_region(&self) -> &Region {
        &self.shared
    }

    fn area(&self, offset: u64, len: u64) -> Result<Region, ModelError> {
        // The layout keeps every area inside the region; this cannot fail, but a
        // typed error beats a panic.
        self.shared
            .sub(offset, len)
            .map_err(|e| ModelError::Model(Box::new(e)))
    }
}

impl DriverModel for SharedPageDriver {
    type Share = SharedPageShare;

    fn name(&self) -> &'static str {
        "shared-page"
    }

    /// Either format fits the split layout's slot: the packed areas are smaller and
    /// at least as aligned.
    fn create_queue_in(
        &self,
        index: u16,
        _format: RingFormat,
        size: u16,
    ) -> Result<DriverQueue<SharedPageShare>, ModelError> {
        let l = SplitLayout::new(size).ok_or(ModelError::BadSize(size))?;
        let max = self.layout.max_queue_size();
        if size > max {
            return Err(SharedPageError::QueueTooLarge { size, max }.into());
        }
        let no_queue = SharedPageError::NoSuchQueue {
            index,
            max: self.layout.max_queues(),
        };
        let claim = self.claims.get(usize::from(index)).ok_or(no_queue)?;
        let claim = Claim::take(claim).ok_or(SharedPageError::QueueInUse(index))?;
        let (addrs, bounce) = self
            .layout
            .queue_addrs(index, size)
            .zip(self.layout.bounce(index))
            .ok_or(ModelError::BadSize(size))?;
        let ring = RingMemory {
            desc: self.area(addrs.desc, l.desc_bytes())?,
            driver: self.area(addrs.avail, l.avail_bytes())?,
            device: self.area(addrs.used, l.used_bytes())?,
        };
        let area = self.area(bounce.start, bounce.end - bounce.start)?;
        let share = SharedPageShare {
            memory: self.memory.clone(),
            alloc: BounceAlloc::new(area.len() as u64),
            bounce: area,
            base: bounce.start,
            _claim: claim,
        };
        Ok(DriverQueue { addrs, ring, share })
    }
}

/// Ownership of one queue's bounce area, given up when the share is dropped.
#[derive(Debug)]
struct Claim(Arc<AtomicBool>);

impl Claim {
    fn take(flag: &Arc<AtomicBool>) -> Option<Claim> {
        flag.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Claim(flag.clone()))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What an exposed buffer was, for [`SharedPageShare::retire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ToDevice,
    FromDevice,
    Table,
}

/// The share's handle of one exposed buffer: its bounce block and, for device-writable
/// buffers, where the bytes go back to.
#[derive(Debug)]
pub struct BounceToken {
    /// `None` for a zero-length buffer, which takes no bounce space.
    block: Option<Block>,
    kind: Kind,
    guest: u64,
    len: u32,
}

/// The driver side of one queue: copies buffers through the queue's bounce area.
///
/// - `expose(buf, ToDevice)`: allocates a block and copies the buffer in.
/// - `expose(buf, FromDevice)`: allocates a block and zeroes it.
/// - `expose_table`: allocates a block and writes the indirect table into it.
/// - `retire`: for device-writable buffers copies exactly the used bytes back, then
///   frees the block.
///
/// Descriptor addresses are offsets in the shared region; every block lies inside
/// this queue's bounce area, the only range its device memory accepts.
pub struct SharedPageShare {
    memory: Arc<GuestMemory>,
    /// The guest's own view of this queue's bounce area.
    bounce: Region,
    /// Model address of the bounce area's first byte.
    base: u64,
    alloc: BounceAlloc,
    _claim: Claim,
}

impl fmt::Debug for SharedPageShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedPageShare")
            .field("base", &format_args!("{:#x}", self.base))
            .field("alloc", &self.alloc)
            .finish_non_exhaustive()
    }
}

impl SharedPageShare {
    /// Bytes of bounce space.
    pub fn capacity(&self) -> u64 {
        self.alloc.capacity()
    }

    /// Bytes of bounce space not held by an exposed buffer or table.
    pub fn free_bytes(&self) -> u64 {
        self.alloc.free_bytes()
    }

    /// Buffers and tables exposed and not yet retired (zero-length buffers excluded).
    pub fn live(&self) -> usize {
        self.alloc.live()
    }

    /// The model addresses of this queue's bounce area.
    pub fn bounce_range(&self) -> Range<u64> {
        self.base..self.base + self.bounce.len() as u64
    }

    /// Copies `len` bytes of guest memory at `gpa` into the bounce area at `off`:
    /// one copy, region to region.
    fn copy_in(&mut self, gpa: u64, off: u64, len: u32) -> Result<(), MemoryError> {
        let len = u64::from(len);
        let guest = self.memory.region(gpa, len)?;
        Ok(guest.copy_to(0, &self.bounce, off, len)?)
    }

    /// Copies `len` bytes of the bounce area at `off` back to guest memory at `gpa`.
    fn copy_out(&mut self, off: u64, gpa: u64, len: u32) -> Result<(), MemoryError> {
        let len = u64::from(len);
        let guest = self.memory.region(gpa, len)?;
        Ok(self.bounce.copy_to(off, &guest, 0, len)?)
    }

    fn exposed(&self, block: Block, len: u32, kind: Kind, guest: u64) -> Exposed<BounceToken> {
        Exposed {
            addr: self.base + u64::from(block.offset),
            len,
            token: BounceToken {
                block: Some(block),
                kind,
                guest,
                len,
            },
        }
    }
}

impl DriverShare for SharedPageShare {
    type Token = BounceToken;

    fn expose(&mut self, buf: GuestBuf, dir: Direction) -> Result<Exposed<BounceToken>, ShareError> {
        if self.memory.offset_of(buf.addr, u64::from(buf.len)).is_none() {
            return Err(ShareError::OutOfBounds {
                addr: buf.addr,
                len: buf.len,
            });
        }
        let kind = match dir {
            Direction::ToDevice => Kind::ToDevice,
            Direction::FromDevice => Kind::FromDevice,
        };
        if buf.len == 0 {
            // The device skips zero-length descriptors; no bounce space needed.
            return Ok(Exposed {
                addr: self.base,
                len: 0,
                token: BounceToken {
                    block: None,
                    kind,
                    guest: buf.addr,
                    len: 0,
                },
            });
        }
        let block = self.alloc.alloc(buf.len).ok_or(ShareError::Exhausted(buf.len))?;
        let off = u64::from(block.offset);
        let filled = match dir {
            Direction::ToDevice => self.copy_in(buf.addr, off, buf.len),
            // Zeroed, although everything in the bounce area is data this device has
            // already been shown or has written itself: the device may report more
            // used bytes than it wrote, and the unwritten ones would then carry a
            // previous request's data (another process's packet, say) into this
            // buffer. Linux's swiotlb had exactly that leak (CVE-2022-0854). A memset
            // costs about half a copy of the same length.
            Direction::FromDevice => self
                .bounce
                .zero(off, u64::from(buf.len))
                .map_err(MemoryError::from),
        };
        if let Err(e) = filled {
            self.alloc.free(block);
            return Err(ShareError::Model(Box::new(e)));
        }
        Ok(self.exposed(block, buf.len, kind, buf.addr))
    }

    fn expose_table(&mut self, table: &[u8]) -> Result<Exposed<BounceToken>, ShareError> {
        let len = u32::try_from(table.len()).map_err(|_| ShareError::Exhausted(u32::MAX))?;
        let block = self.alloc.alloc(len).ok_or(ShareError::Exhausted(len))?;
        if let Err(e) = self.bounce.write(u64::from(block.offset), table) {
            self.alloc.free(block);
            return Err(ShareError::Model(Box::new(e)));
        }
        Ok(self.exposed(block, len, Kind::Table, 0))
    }

    fn retire(&mut self, token: BounceToken, written: u32) {
        let Some(block) = token.block else { return };
        if token.kind == Kind::FromDevice {
            // The ring already checked the used length against the chain; a share
            // never trusts that alone (HOSTILE rule 31).
            let n = if written > token.len {
                tracing::warn!(written, len = token.len, "used length past the buffer; clamped");
                token.len
            } else {
                written
            };
            if let Err(e) = self.copy_out(u64::from(block.offset), token.guest, n) {
                // Both ranges were checked at expose time; never panic regardless.
                tracing::error!(error = %e, "copying a used buffer back failed");
            }
        }
        if !self.alloc.free(block) {
            tracing::error!(?block, "bounce block was not live; not freed");
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test data
mod tests {
    use super::*;
    use hypervisor::Hypervisor;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn small() -> SharedPageConfig {
        SharedPageConfig {
            max_queues: 2,
            max_queue_size: 16,
            bounce_bytes_per_queue: 1 << 20,
        }
    }

    fn setup(cfg: SharedPageConfig) -> (Arc<Domain>, SharedPageDriver, SharedPageDevice) {
        let hv = Hypervisor::new();
        let guest = hv.create_domain("t", 8 << 20).unwrap();
        let (d, v) = pair(&guest, cfg).unwrap();
        (guest, d, v)
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add((i * 7) as u8) | 1).collect()
    }

    #[test]
    fn region_is_whole_zeroed_pages_and_not_freed_on_drop() {
        let hv = Hypervisor::new();
        let guest = hv.create_domain("t", 8 << 20).unwrap();
        // Dirty the memory the region will be carved from.
        let mem = guest.memory();
        let junk = mem.alloc_pages(512).unwrap();
        mem.write(junk, &[0xee; 4096]).unwrap();
        mem.free(junk, 512 * 4096).unwrap();
        let before = mem.free_bytes();
        let (d, v) = pair(&guest, small()).unwrap();
        assert_eq!(d.shared_gpa() % mem.page_size(), 0);
        assert_eq!(d.layout().len() % mem.page_size(), 0);
        assert_eq!(v.shared_len(), d.layout().len());
        let mut b = vec![0xffu8; 4096];
        d.shared_region().read(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0), "no stale guest data in the region");
        assert_eq!(mem.free_bytes(), before - d.layout().len());
        drop((d, v));
        assert_eq!(
            mem.free_bytes(),
            before - d_len(&small()),
            "the device's mapping cannot be revoked, so the pages stay reserved"
        );
    }

    fn d_len(cfg: &SharedPageConfig) -> u64 {
        Layout::new(cfg, 4096).unwrap().len()
    }

    #[test]
    fn queues_are_claimed_once_and_released_with_the_share() {
        let (_g, d, _v) = setup(small());
        let q = d.create_queue(0, 16).unwrap();
        assert_eq!(q.addrs, d.layout().queue_addrs(0, 16).unwrap());
        let err = d.create_queue(0, 16).unwrap_err();
        assert!(
            matches!(&err, ModelError::Model(e) if e.to_string().contains("in use")),
            "{err}"
        );
        d.create_queue(1, 8).unwrap();
        assert!(matches!(d.create_queue(2, 8), Err(ModelError::Model(_))));
        assert!(matches!(d.create_queue(1, 3), Err(ModelError::BadSize(3))));
        assert!(matches!(d.create_queue(1, 32), Err(ModelError::Model(_))));
        drop(q);
        d.create_queue(0, 16).expect("released with the share");
        assert_eq!(d.name(), "shared-page");
    }

    #[test]
    fn bounce_copies_in_zeroes_and_copies_back_only_the_used_bytes() {
        let (g, d, _v) = setup(small());
        let mem = g.memory();
        let mut share = d.create_queue(0, 16).unwrap().share;
        let shared = d.shared_region().clone();
        let bounce = share.bounce_range();

        let out = mem.alloc(1514, 1).unwrap();
        mem.write(out, &pattern(3, 1514)).unwrap();
        let e = share
            .expose(GuestBuf::new(out, 1514), Direction::ToDevice)
            .unwrap();
        assert!(bounce.contains(&e.addr) && e.addr + 1514 <= bounce.end);
        assert_eq!(e.addr % 64, 0, "cache-line aligned");
        let mut seen = vec![0u8; 1514];
        shared.read(e.addr, &mut seen).unwrap();
        assert_eq!(seen, pattern(3, 1514));
        share.retire(e.token, 0);

        // The same block comes back for an in-buffer: it must not carry the old data.
        let inb = mem.alloc(1514, 1).unwrap();
        mem.write(inb, &[0xaa; 1514]).unwrap();
        let e = share
            .expose(GuestBuf::new(inb, 1514), Direction::FromDevice)
            .unwrap();
        shared.read(e.addr, &mut seen).unwrap();
        assert!(seen.iter().all(|&b| b == 0), "in-buffers are zeroed");
        shared.write(e.addr, &[0x55; 100]).unwrap();
        share.retire(e.token, 10);
        let mut back = vec![0u8; 1514];
        mem.read(inb, &mut back).unwrap();
        assert_eq!(&back[..10], &[0x55; 10]);
        assert!(
            back[10..].iter().all(|&b| b == 0xaa),
            "only the used bytes come back"
        );

        // A used length past the buffer is clamped, never copied past it.
        let e = share
            .expose(GuestBuf::new(inb, 16), Direction::FromDevice)
            .unwrap();
        shared.write(e.addr, &[0x77; 64]).unwrap();
        share.retire(e.token, 1000);
        mem.read(inb, &mut back).unwrap();
        assert_eq!(&back[..16], &[0x77; 16]);
        assert_eq!(&back[16..20], &[0xaa; 4]);

        let table = [0x11u8; 48];
        let e = share.expose_table(&table).unwrap();
        assert_eq!(e.addr % 16, 0);
        let mut t = [0u8; 48];
        shared.read(e.addr, &mut t).unwrap();
        assert_eq!(t, table);
        share.retire(e.token, 0);

        let e = share
            .expose(GuestBuf::new(out, 0), Direction::FromDevice)
            .unwrap();
        assert_eq!(e.len, 0);
        share.retire(e.token, 0);
        assert_eq!(share.free_bytes(), share.capacity());
        assert_eq!(share.live(), 0);
    }

    #[test]
    fn refusals_are_typed_and_take_nothing() {
        let (g, d, _v) = setup(small());
        let mut share = d.create_queue(0, 16).unwrap().share;
        let base = g.memory().base();
        let size = g.memory().size();
        for buf in [
            GuestBuf::new(0, 1),
            GuestBuf::new(base - 1, 2),
            GuestBuf::new(base + size - 1, 2),
            GuestBuf::new(u64::MAX, 1),
        ] {
            assert!(matches!(
                share.expose(buf, Direction::ToDevice),
                Err(ShareError::OutOfBounds { .. })
            ));
        }
        let big = GuestBuf::new(base, (1 << 20) + 1);
        assert!(matches!(
            share.expose(big, Direction::FromDevice),
            Err(ShareError::Exhausted(_))
        ));
        let mut held = Vec::new();
        while let Ok(e) = share.expose(GuestBuf::new(base, 65536), Direction::ToDevice) {
            held.push(e.token);
        }
        assert_eq!(held.len(), 16, "1 MiB holds sixteen 64 KiB buffers");
        assert!(matches!(
            share.expose_table(&[0; 16]),
            Err(ShareError::Exhausted(16))
        ));
        for t in held {
            share.retire(t, 0);
        }
        assert_eq!(share.free_bytes(), share.capacity());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Out(u32),
        In(u32),
        Table(u8),
        Retire(usize, u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1u32..=65536).prop_map(Op::Out),
            3 => (1u32..=65536).prop_map(Op::In),
            1 => (1u8..=16).prop_map(Op::Table),
            4 => (any::<usize>(), any::<u32>()).prop_map(|(i, w)| Op::Retire(i, w)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Random expose/retire sequences (1 B .. 64 KiB): exposed ranges lie in the
        /// queue's bounce area and never overlap a live one, data goes in and comes
        /// back intact, and once everything is retired (as a reset does) the free
        /// space is what it was.
        #[test]
        fn share_never_leaks_or_overlaps(ops in proptest::collection::vec(op(), 1..120)) {
            let (g, d, _v) = setup(small());
            let mem = g.memory().clone();
            let mut share = d.create_queue(1, 16).unwrap().share;
            let shared = d.shared_region().clone();
            let bounce = share.bounce_range();
            let initial = share.free_bytes();
            let guest_buf = mem.alloc(65536, 64).unwrap();
            let mut live: BTreeMap<u64, (BounceToken, u32, bool)> = BTreeMap::new();
            for (n, op) in ops.into_iter().enumerate() {
                let seed = n as u8;
                let exposed = match op {
                    Op::Out(len) => {
                        mem.write(guest_buf, &pattern(seed, len as usize)).unwrap();
                        share.expose(GuestBuf::new(guest_buf, len), Direction::ToDevice).map(|e| (e, false))
                    }
                    Op::In(len) => share.expose(GuestBuf::new(guest_buf, len), Direction::FromDevice).map(|e| (e, true)),
                    Op::Table(n) => share.expose_table(&vec![seed; 16 * usize::from(n)]).map(|e| (e, false)),
                    Op::Retire(i, w) => {
                        if live.is_empty() {
                            continue;
                        }
                        let key = *live.keys().nth(i % live.len()).unwrap();
                        let (token, len, writable) = live.remove(&key).unwrap();
                        if writable {
                            let written = w % (len + 1);
                            shared.write(key, &pattern(seed, len as usize)).unwrap();
                            mem.write(guest_buf, &vec![0xee; len as usize]).unwrap();
                            share.retire(token, written);
                            let mut back = vec![0u8; len as usize];
                            mem.read(guest_buf, &mut back).unwrap();
                            let w = written as usize;
                            prop_assert_eq!(&back[..w], &pattern(seed, len as usize)[..w]);
                            prop_assert!(back[w..].iter().all(|&b| b == 0xee));
                        } else {
                            share.retire(token, 0);
                        }
                        continue;
                    }
                };
                let (e, writable) = match exposed {
                    Ok(v) => v,
                    Err(ShareError::Exhausted(_)) => continue,
                    Err(other) => return Err(TestCaseError::fail(other.to_string())),
                };
                let end = e.addr + u64::from(e.len);
                prop_assert!(e.addr >= bounce.start && end <= bounce.end);
                if let Some((&k, v)) = live.range(..end).next_back() {
                    prop_assert!(k + u64::from(v.1) <= e.addr, "overlaps a live buffer");
                }
                let mut seen = vec![0u8; e.len as usize];
                shared.read(e.addr, &mut seen).unwrap();
                if writable {
                    prop_assert!(seen.iter().all(|&b| b == 0));
                } else {
                    let want = match op {
                        Op::Table(_) => vec![seed; seen.len()],
                        _ => pattern(seed, seen.len()),
                    };
                    prop_assert_eq!(seen, want);
                }
                live.insert(e.addr, (e.token, e.len, writable));
            }
            prop_assert_eq!(share.live(), live.len());
            for (_, (token, _, _)) in std::mem::take(&mut live) {
                share.retire(token, 0);
            }
            prop_assert_eq!(share.free_bytes(), initial);
            prop_assert_eq!(share.live(), 0);
        }
    }
}
