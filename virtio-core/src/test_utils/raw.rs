//! A hostile peer for tests and fuzzing: raw writes into split-ring memory.
//!
//! [`RawDriver`] writes whatever it is told into the descriptor table, the available
//! ring and the used ring, with no bookkeeping and none of the rules [`SplitDriver`]
//! keeps. Tests use it to play a hostile driver against [`SplitDevice`] (HOSTILE rules
//! 1-12) and, through its used-ring writers, a hostile device against
//! [`SplitDriver`] (rule 31).
//!
//! Writes are plain byte copies ([`Region::write`]) of little-endian fields. That is
//! enough for a single-threaded test double: the peer under test runs on the same
//! thread, so program order already makes every write visible before the next call.
//!
//! [`Recorder`] wraps a [`DeviceMemory`] and logs every access the device makes, so a
//! test can prove that nothing outside the arena or the chain was touched.
//!
//! [`fuzz_chain_walk`] is the body of the `chain_walk` fuzz target: it turns arbitrary
//! bytes into a ring, runs the device against it and checks the ring's invariants.
//!
//! [`SplitDriver`]: crate::SplitDriver

use super::Arena;
use crate::access::{AccessError, DescSlot, DeviceMemory, Segment};
use crate::features::Features;
use crate::ring::areas::RingMemory;
use crate::ring::chain::Chain;
use crate::ring::layout::{
    Descriptor, SplitLayout, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use crate::ring::split::{DeviceQueueError, RingSetupError, SplitDevice, UsedError};
use crate::shm::{Region, RegionError};
use std::sync::{Arc, Mutex};
use zerocopy::{FromBytes, IntoBytes};

/// Writes arbitrary content into one split ring's memory, like a driver that keeps no
/// rule at all.
///
/// Keeps two private cursors and nothing else: the next available-ring position
/// ([`RawDriver::push_avail`]) and the next used-ring position to read
/// ([`RawDriver::read_used`]). Every other method is a raw read or write of one field.
#[derive(Debug)]
pub struct RawDriver {
    arena: Arc<Arena>,
    ring: RingMemory,
    size: u16,
    next_avail: u16,
    last_used: u16,
}

/// Offsets inside the available ring (§2.7.6).
const AVAIL_FLAGS: u64 = 0;
const AVAIL_IDX: u64 = 2;
const AVAIL_RING: u64 = 4;
/// Offsets inside the used ring (§2.7.8).
const USED_FLAGS: u64 = 0;
const USED_IDX: u64 = 2;
const USED_RING: u64 = 4;

impl RawDriver {
    /// A raw writer over the queue of `size` whose areas are `ring` (as returned by
    /// [`Arena::alloc_split_ring`]); `arena` is where indirect tables are written.
    ///
    /// Checks the size and that each area is large enough and writable, so that the
    /// field accessors below cannot fail.
    pub fn new(arena: Arc<Arena>, size: u16, ring: RingMemory) -> Result<RawDriver, RingSetupError> {
        let layout = SplitLayout::new(size).ok_or(RingSetupError::BadSize(size))?;
        for (area, region, bytes) in [
            ("descriptor table", &ring.desc, layout.desc_bytes()),
            ("available ring", &ring.driver, layout.avail_bytes()),
            ("used ring", &ring.device, layout.used_bytes()),
        ] {
            if !region.is_writable() {
                return Err(RingSetupError::NotWritable(area));
            }
            region
                .sub(0, bytes)
                .map_err(|source| RingSetupError::Area { area, source })?;
        }
        Ok(RawDriver {
            arena,
            ring,
            size,
            next_avail: 0,
            last_used: 0,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The ring areas written to.
    pub fn ring(&self) -> &RingMemory {
        &self.ring
    }

    /// The arena indirect tables are written into.
    pub fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }

    /// Ring slot of free-running position `pos`.
    fn slot(&self, pos: u16) -> u64 {
        u64::from(pos & (self.size - 1))
    }

    /// Writes `bytes` at `offset` of `region`; `new` proved every caller's range fits.
    fn poke(region: &Region, offset: u64, bytes: &[u8]) {
        region
            .write(offset, bytes)
            .expect("ring field inside an area checked by RawDriver::new");
    }

    /// Reads `N` bytes at `offset` of `region`; `new` proved every caller's range fits.
    fn peek<const N: usize>(region: &Region, offset: u64) -> [u8; N] {
        let mut b = [0u8; N];
        region
            .read(offset, &mut b)
            .expect("ring field inside an area checked by RawDriver::new");
        b
    }

    // --- descriptor table ---

    /// Writes descriptor-table entry `i` with exactly these fields.
    ///
    /// # Panics
    ///
    /// If `i >= size`: even a hostile driver cannot write outside its table.
    pub fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.write_descriptor(i, &Descriptor::new(addr, len, flags, next));
    }

    /// Writes descriptor-table entry `i` from a wire descriptor.
    ///
    /// # Panics
    ///
    /// If `i >= size`.
    pub fn write_descriptor(&self, i: u16, d: &Descriptor) {
        assert!(i < self.size, "descriptor {i} outside a table of {}", self.size);
        Self::poke(&self.ring.desc, 16 * u64::from(i), d.as_bytes());
    }

    /// Reads descriptor-table entry `i` as it is now.
    ///
    /// # Panics
    ///
    /// If `i >= size`.
    pub fn read_desc(&self, i: u16) -> Descriptor {
        assert!(i < self.size, "descriptor {i} outside a table of {}", self.size);
        let b: [u8; 16] = Self::peek(&self.ring.desc, 16 * u64::from(i));
        Descriptor::read_from_bytes(&b).unwrap_or_default()
    }

    /// Writes `table` as an indirect descriptor table at guest address `gpa`.
    pub fn write_indirect_table(&self, gpa: u64, table: &[Descriptor]) -> Result<(), RegionError> {
        Arena::write(&self.arena, gpa, table.as_bytes())
    }

    // --- available ring ---

    /// Writes `head` at the private available position, advances it and publishes it
    /// as `avail.idx`. Returns the new index.
    pub fn push_avail(&mut self, head: u16) -> u16 {
        self.put_avail(head);
        self.publish_avail();
        self.next_avail
    }

    /// Writes `head` at the private available position and advances it, without
    /// publishing `avail.idx`.
    pub fn put_avail(&mut self, head: u16) {
        self.write_avail_entry(self.next_avail, head);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Stores the private available position into `avail.idx`.
    pub fn publish_avail(&self) {
        self.set_avail_idx(self.next_avail);
    }

    /// Writes `head` into the available ring at free-running position `pos` (taken
    /// modulo the queue size); touches neither cursor nor `avail.idx`.
    pub fn write_avail_entry(&self, pos: u16, head: u16) {
        Self::poke(
            &self.ring.driver,
            AVAIL_RING + 2 * self.slot(pos),
            &head.to_le_bytes(),
        );
    }

    /// Reads the available-ring entry at free-running position `pos`.
    pub fn avail_entry(&self, pos: u16) -> u16 {
        u16::from_le_bytes(Self::peek(&self.ring.driver, AVAIL_RING + 2 * self.slot(pos)))
    }

    /// Stores `idx` into `avail.idx` as it is; the private position is unchanged.
    pub fn set_avail_idx(&self, idx: u16) {
        Self::poke(&self.ring.driver, AVAIL_IDX, &idx.to_le_bytes());
    }

    /// The shared `avail.idx` as it is now.
    pub fn avail_idx(&self) -> u16 {
        u16::from_le_bytes(Self::peek(&self.ring.driver, AVAIL_IDX))
    }

    /// The private available position (where [`RawDriver::put_avail`] writes next).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Moves the private available position, e.g. to follow a raw `avail.idx`.
    pub fn set_next_avail(&mut self, pos: u16) {
        self.next_avail = pos;
    }

    /// Stores `flags` into `avail.flags`.
    pub fn set_avail_flags(&self, flags: u16) {
        Self::poke(&self.ring.driver, AVAIL_FLAGS, &flags.to_le_bytes());
    }

    /// Stores `used_event` (the field after the available ring, §2.7.7).
    pub fn set_used_event(&self, v: u16) {
        Self::poke(
            &self.ring.driver,
            AVAIL_RING + 2 * u64::from(self.size),
            &v.to_le_bytes(),
        );
    }

    /// Reads `used_event`.
    pub fn used_event(&self) -> u16 {
        u16::from_le_bytes(Self::peek(
            &self.ring.driver,
            AVAIL_RING + 2 * u64::from(self.size),
        ))
    }

    // --- used ring ---

    /// The shared `used.idx` as it is now.
    pub fn used_idx(&self) -> u16 {
        u16::from_le_bytes(Self::peek(&self.ring.device, USED_IDX))
    }

    /// The shared `used.flags` as it is now.
    pub fn used_flags(&self) -> u16 {
        u16::from_le_bytes(Self::peek(&self.ring.device, USED_FLAGS))
    }

    /// The used element `(id, len)` at free-running position `pos`.
    pub fn used_elem(&self, pos: u16) -> (u32, u32) {
        let off = USED_RING + 8 * self.slot(pos);
        let id = u32::from_le_bytes(Self::peek(&self.ring.device, off));
        let len = u32::from_le_bytes(Self::peek(&self.ring.device, off + 4));
        (id, len)
    }

    /// The used elements from the private used position up to `used.idx`, oldest
    /// first, and moves the private position to `used.idx`.
    ///
    /// Returns at most `size` elements: a peer that claims more has overwritten the
    /// older ones anyway.
    pub fn read_used(&mut self) -> Vec<(u32, u32)> {
        let idx = self.used_idx();
        let n = idx.wrapping_sub(self.last_used).min(self.size);
        let out = (0..n)
            .map(|k| self.used_elem(self.last_used.wrapping_add(k)))
            .collect();
        self.last_used = idx;
        out
    }

    /// The private used position ([`RawDriver::read_used`] reads from here).
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Reads `avail_event` (the field after the used ring, §2.7.8).
    pub fn avail_event(&self) -> u16 {
        u16::from_le_bytes(Self::peek(
            &self.ring.device,
            USED_RING + 8 * u64::from(self.size),
        ))
    }

    /// Scribbles `v` over `used.idx` (a driver must never write it: rule 10; a hostile
    /// device writes what it likes: rule 31).
    pub fn set_used_idx(&self, v: u16) {
        Self::poke(&self.ring.device, USED_IDX, &v.to_le_bytes());
    }

    /// Scribbles `v` over `used.flags`.
    pub fn set_used_flags(&self, v: u16) {
        Self::poke(&self.ring.device, USED_FLAGS, &v.to_le_bytes());
    }

    /// Scribbles `(id, len)` over the used element at free-running position `pos`.
    pub fn write_used_elem(&self, pos: u16, id: u32, len: u32) {
        let off = USED_RING + 8 * self.slot(pos);
        Self::poke(&self.ring.device, off, &id.to_le_bytes());
        Self::poke(&self.ring.device, off + 4, &len.to_le_bytes());
    }

    /// Scribbles `v` over `avail_event`.
    pub fn set_avail_event(&self, v: u16) {
        Self::poke(
            &self.ring.device,
            USED_RING + 8 * u64::from(self.size),
            &v.to_le_bytes(),
        );
    }
}

/// What a [`Recorder`] saw the device do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessKind {
    /// [`DeviceMemory::check`] of a whole segment.
    Check,
    /// [`DeviceMemory::read`].
    Read,
    /// [`DeviceMemory::write`].
    Write,
}

/// One access through a [`Recorder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// What was asked.
    pub kind: AccessKind,
    /// First byte: the segment's address plus the offset (saturating).
    pub addr: u64,
    /// Number of bytes.
    pub len: u64,
    /// The segment the access named.
    pub seg: Segment,
    /// Whether the inner memory allowed it.
    pub ok: bool,
}

impl Access {
    /// Whether the accessed bytes lie inside `[start, start + len)`.
    pub fn within(&self, start: u64, len: u64) -> bool {
        match (self.addr.checked_add(self.len), start.checked_add(len)) {
            (Some(end), Some(limit)) => self.addr >= start && end <= limit,
            _ => false,
        }
    }
}

/// A [`DeviceMemory`] that forwards to `M` and logs every access.
#[derive(Debug)]
pub struct Recorder<M> {
    inner: M,
    log: Mutex<Vec<Access>>,
}

impl<M> Recorder<M> {
    /// Wraps `inner`.
    pub fn new(inner: M) -> Recorder<M> {
        Recorder {
            inner,
            log: Mutex::new(Vec::new()),
        }
    }

    /// The wrapped memory.
    pub fn inner(&self) -> &M {
        &self.inner
    }

    /// Returns and clears the accesses logged so far.
    pub fn take(&self) -> Vec<Access> {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn note(&self, kind: AccessKind, seg: &Segment, offset: u32, len: u64, ok: bool) {
        let access = Access {
            kind,
            addr: seg.addr().saturating_add(u64::from(offset)),
            len,
            seg: *seg,
            ok,
        };
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(access);
    }
}

impl<M: DeviceMemory> DeviceMemory for Recorder<M> {
    fn check(&self, seg: &Segment) -> Result<(), AccessError> {
        let r = self.inner.check(seg);
        self.note(AccessKind::Check, seg, 0, u64::from(seg.len()), r.is_ok());
        r
    }

    fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError> {
        let r = self.inner.read(seg, offset, dst);
        self.note(AccessKind::Read, seg, offset, dst.len() as u64, r.is_ok());
        r
    }

    fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError> {
        let r = self.inner.write(seg, offset, src);
        self.note(AccessKind::Write, seg, offset, src.len() as u64, r.is_ok());
        r
    }
}

// ---------------------------------------------------------------------------------------
// Fuzzing the chain walk.
// ---------------------------------------------------------------------------------------

/// Guest address of the fuzz arena. Descriptor addresses in fuzz input are offsets
/// from here (wrapping), so every `u64` is reachable and small values land inside.
pub const FUZZ_ARENA_BASE: u64 = 0x10_0000;
/// Size of the fuzz arena: 32 MiB above [`FUZZ_DATA_OFFSET`], so that the 128
/// descriptors of the largest fuzzed queue can each cover 2^25 bytes and reach the
/// 2^32 total (HOSTILE rule 7). The mapping is lazy: untouched pages cost nothing.
pub const FUZZ_ARENA_SIZE: u64 = FUZZ_DATA_OFFSET + (1 << 25);
/// Offset of the fuzz input's indirect-descriptor area from [`FUZZ_ARENA_BASE`]; the
/// rings (queue size at most 128) lie below it.
pub const FUZZ_INDIRECT_OFFSET: u64 = 0x2000;
/// Offset of the first byte after the indirect area (room for 256 entries).
pub const FUZZ_DATA_OFFSET: u64 = 0x3000;
/// Most operations taken from one input.
const FUZZ_MAX_OPS: usize = 256;
/// Most `pop` calls in one pop operation, and in the final drain.
const FUZZ_MAX_POPS: usize = 64;
/// Most bytes moved through a chain's reader or writer per chain.
const FUZZ_MAX_IO: u64 = 4096;

/// Opcodes of the fuzz input's operation list (the low 3 bits of an op byte).
pub mod fuzz_op {
    /// `head: u16`: write the head at the next available position and publish it.
    pub const PUSH: u8 = 0;
    /// `idx: u16`: store a raw `avail.idx`.
    pub const SET_AVAIL_IDX: u8 = 1;
    /// Pop up to `(op >> 3) + 1` chains and hold them.
    pub const POP: u8 = 2;
    /// `probe: u16`: complete the `(op >> 3) + 1` oldest held chains (bit 3 of the op:
    /// report 0 bytes instead of the bytes written), then check that `add_used` of
    /// `probe` is refused if it is not held.
    pub const COMPLETE: u8 = 3;
    /// `index: u8, descriptor: [u8; 16]`: rewrite a table descriptor (taken modulo the
    /// queue size).
    pub const REWRITE_DESC: u8 = 4;
    /// `used_idx: u16, used_flags: u16, used_event: u16`: scribble over them.
    pub const SCRIBBLE: u8 = 5;
    /// `avail_flags: u16`: store them and exercise the notification logic.
    pub const NOTIFY: u8 = 6;
    /// `pos: u16, head: u16`: write an available-ring entry without publishing.
    pub const AVAIL_ENTRY: u8 = 7;
}

/// Reads fuzz bytes front to back; past the end every read yields zeros.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = N.min(self.0.len());
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        b
    }

    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }

    /// A wire descriptor whose `addr` is an offset from [`FUZZ_ARENA_BASE`].
    fn desc(&mut self) -> Descriptor {
        let b: [u8; 16] = self.take();
        let mut d = Descriptor::read_from_bytes(&b).unwrap_or_default();
        d.addr = FUZZ_ARENA_BASE.wrapping_add(d.addr.get()).into();
        d
    }
}

/// A chain the fuzz harness holds, with the bytes it wrote into it.
struct Held {
    chain: Chain,
    written: u32,
}

/// State of one fuzz run.
struct Harness {
    arena: Arc<Arena>,
    raw: RawDriver,
    device: SplitDevice<Recorder<Arc<Arena>>>,
    held: Vec<Held>,
    /// Used elements the device has published, by our count.
    used: u16,
    /// The first `NeedsReset` error seen (its fault type is not nameable outside
    /// `ring::split`, so the whole error is kept).
    fault: Option<DeviceQueueError>,
    /// What each `pop` returned, for [`fuzz_chain_walk_report`].
    events: Vec<String>,
}

/// Runs the device side of a split ring against a driver made of fuzz bytes and
/// checks the ring's invariants; panics only when one is broken.
///
/// Input layout (missing bytes read as zero):
///
/// 1. `size`: the queue size is `1 << (size % 8)` (1 to 128);
/// 2. `features`: bit 0 INDIRECT_DESC, bit 1 EVENT_IDX;
/// 3. `n`, then `min(n, size)` 16-byte wire descriptors for table entries `0..`, with
///    `addr` an offset from [`FUZZ_ARENA_BASE`] (wrapping);
/// 4. `m`, then `m` such descriptors, written at [`FUZZ_INDIRECT_OFFSET`] (so an
///    indirect table at offset `0x2000 + 16 * k` starts with the `k`th);
/// 5. operations until the input ends (at most 256), each an op byte whose low 3 bits
///    are one of [`fuzz_op`], followed by its operands;
/// 6. then up to 64 more pops, and every held chain is completed.
///
/// Invariants checked: every segment is non-empty, inside the arena and a faithful
/// copy of the descriptor it came from; readable segments come before writable ones;
/// the totals match and stay below 2^32; no head is held twice; a duplicate head is
/// only reported while held; a rejected head is returned at once with length 0;
/// `pop` never writes memory; every access lies in the arena (and each write inside a
/// writable segment); reading and writing a chain within its lengths succeeds;
/// `add_used` refuses a length above the writable bytes and a head not in flight;
/// needs-reset is sticky.
pub fn fuzz_chain_walk(data: &[u8]) {
    fuzz_chain_walk_report(data);
}

/// [`fuzz_chain_walk`], returning what happened: one line per `pop` that returned a
/// chain (`served <head>`) or an error (its `Debug` form), in order. Seed-corpus tests
/// use it to show that each seed reaches the rule it was written for.
pub fn fuzz_chain_walk_report(data: &[u8]) -> Vec<String> {
    let mut input = Bytes(data);
    let size = 1u16 << (input.u8() % 8);
    let bits = input.u8();
    let mut features = Features::VERSION_1;
    if bits & 1 != 0 {
        features |= Features::INDIRECT_DESC;
    }
    if bits & 2 != 0 {
        features |= Features::EVENT_IDX;
    }
    let Some(mut h) = Harness::new(size, features) else {
        // Out of memory for the (lazy) arena mapping: nothing to test.
        return Vec::new();
    };

    let n = u16::from(input.u8()).min(size);
    for i in 0..n {
        let d = input.desc();
        h.raw.write_descriptor(i, &d);
    }
    let m = input.u8();
    let table: Vec<Descriptor> = (0..m).map(|_| input.desc()).collect();
    h.raw
        .write_indirect_table(FUZZ_ARENA_BASE + FUZZ_INDIRECT_OFFSET, &table)
        .expect("256 entries fit the indirect area");

    let mut ops = 0;
    while !input.is_empty() && ops < FUZZ_MAX_OPS {
        ops += 1;
        let op = input.u8();
        let count = usize::from(op >> 3) + 1;
        match op & 7 {
            fuzz_op::PUSH => {
                let head = input.u16();
                h.raw.push_avail(head);
            }
            fuzz_op::SET_AVAIL_IDX => {
                let idx = input.u16();
                h.raw.set_avail_idx(idx);
            }
            fuzz_op::POP => {
                for _ in 0..count {
                    if !h.pop_once() {
                        break;
                    }
                }
            }
            fuzz_op::COMPLETE => {
                let zero = op & 8 != 0;
                for _ in 0..count.min(h.held.len()) {
                    let held = h.held.remove(0);
                    h.complete(held, zero);
                }
                h.check_not_in_flight(input.u16());
            }
            fuzz_op::REWRITE_DESC => {
                let i = u16::from(input.u8()) % size;
                let d = input.desc();
                h.raw.write_descriptor(i, &d);
            }
            fuzz_op::SCRIBBLE => {
                h.raw.set_used_idx(input.u16());
                h.raw.set_used_flags(input.u16());
                h.raw.set_used_event(input.u16());
            }
            fuzz_op::NOTIFY => {
                h.raw.set_avail_flags(input.u16());
                let _ = h.device.needs_notification();
                h.device.disable_notifications();
                let _ = h.device.enable_notifications();
                h.check_fault_after_notify();
            }
            _ => {
                let pos = input.u16();
                let head = input.u16();
                h.raw.write_avail_entry(pos, head);
            }
        }
        h.check_accesses();
        assert_eq!(
            h.device.in_flight(),
            h.held.len(),
            "device and harness disagree on chains in flight"
        );
    }

    for _ in 0..FUZZ_MAX_POPS {
        if !h.pop_once() {
            break;
        }
    }
    for held in std::mem::take(&mut h.held) {
        h.complete(held, false);
    }
    h.check_accesses();
    assert_eq!(
        h.device.in_flight(),
        0,
        "chains left in flight after completing all"
    );
    h.events
}

impl Harness {
    fn new(size: u16, features: Features) -> Option<Harness> {
        let arena = Arena::new(FUZZ_ARENA_BASE, usize::try_from(FUZZ_ARENA_SIZE).ok()?).ok()?;
        let (addrs, ring) = arena.alloc_split_ring(size).ok()?;
        assert!(
            addrs.2 + SplitLayout { size }.used_bytes() <= FUZZ_ARENA_BASE + FUZZ_INDIRECT_OFFSET,
            "rings overlap the fuzz indirect area"
        );
        let device = SplitDevice::new(size, &ring, Recorder::new(arena.clone()), features).ok()?;
        let raw = RawDriver::new(arena.clone(), size, ring).ok()?;
        Some(Harness {
            arena,
            raw,
            device,
            held: Vec::new(),
            used: 0,
            fault: None,
            events: Vec::new(),
        })
    }

    fn size(&self) -> u16 {
        self.raw.size()
    }

    /// One `pop` and its checks; returns whether to keep popping.
    fn pop_once(&mut self) -> bool {
        let r = self.device.pop();
        // The walk only checks and reads: a write here would be the device touching
        // driver memory before it owns a chain.
        let log = self.device.memory().take();
        for a in &log {
            assert_ne!(a.kind, AccessKind::Write, "pop wrote descriptor memory: {a:?}");
            self.assert_in_arena(a);
        }
        match &r {
            Ok(Some(chain)) => self.events.push(format!("served {}", chain.head())),
            Ok(None) => {}
            Err(e) if self.fault.is_none() => self.events.push(format!("{e:?}")),
            Err(_) => {}
        }
        if let Some(DeviceQueueError::NeedsReset(f)) = &self.fault {
            match r {
                Err(DeviceQueueError::NeedsReset(g)) if g == *f => return false,
                other => panic!("needs-reset {f:?} not sticky: pop returned {other:?}"),
            }
        }
        match r {
            Ok(None) => false,
            Ok(Some(chain)) => {
                self.accept(chain);
                true
            }
            Err(DeviceQueueError::BadChain { head, source }) => {
                assert!(head < self.size(), "rejected head {head} outside the queue");
                assert!(
                    !self.held.iter().any(|h| h.chain.head() == head),
                    "head {head} walked while held ({source})"
                );
                self.expect_used(head, 0);
                true
            }
            Err(DeviceQueueError::DuplicateHead(head)) => {
                assert!(
                    self.held.iter().any(|h| h.chain.head() == head),
                    "duplicate head {head} reported while not held"
                );
                true
            }
            Err(e @ DeviceQueueError::NeedsReset(_)) => {
                if let DeviceQueueError::NeedsReset(f) = &e {
                    assert_eq!(self.device.fault().as_ref(), Some(f), "fault not latched");
                }
                self.fault = Some(e);
                false
            }
        }
    }

    /// Checks a chain `pop` returned, moves bytes through it and holds it.
    fn accept(&mut self, chain: Chain) {
        let head = chain.head();
        let size = self.size();
        assert!(head < size, "chain head {head} outside the queue");
        assert!(
            !self.held.iter().any(|h| h.chain.head() == head),
            "head {head} handed out while already held"
        );
        let (mut rsum, mut wsum) = (0u64, 0u64);
        for s in chain.readable() {
            assert!(!s.writable(), "writable segment among the readable ones: {s:?}");
            rsum += u64::from(s.len());
        }
        for s in chain.writable() {
            assert!(s.writable(), "readable segment after a writable one: {s:?}");
            wsum += u64::from(s.len());
        }
        assert_eq!(rsum, u64::from(chain.readable_len()), "readable total");
        assert_eq!(wsum, u64::from(chain.writable_len()), "writable total");
        assert!(rsum + wsum < 1 << 32, "chain carries {} bytes", rsum + wsum);
        let nsegs = chain.readable().len() + chain.writable().len();
        assert!(
            nsegs <= 2 * usize::from(size),
            "{nsegs} segments in a queue of {size}"
        );
        for s in chain.readable().iter().chain(chain.writable()) {
            self.check_segment(head, s);
        }

        let mut buf = vec![0u8; usize::try_from(rsum.min(FUZZ_MAX_IO)).unwrap_or(0)];
        let mut reader = chain.reader(self.device.memory());
        if let Err(e) = reader.read_exact(&mut buf) {
            panic!("reading {} bytes of a validated chain failed: {e}", buf.len());
        }
        let fill = vec![0xa5u8; usize::try_from(wsum.min(FUZZ_MAX_IO)).unwrap_or(0)];
        let mut writer = chain.writer(self.device.memory());
        if let Err(e) = writer.write_all(&fill) {
            panic!("writing {} bytes into a validated chain failed: {e}", fill.len());
        }
        let written = writer.written();
        assert_eq!(u64::from(written), fill.len() as u64, "writer count");
        for a in self.device.memory().take() {
            self.assert_in_arena(&a);
            assert!(a.ok, "access inside a validated chain refused: {a:?}");
            let seg = chain
                .readable()
                .iter()
                .chain(chain.writable())
                .find(|s| **s == a.seg);
            let Some(seg) = seg else {
                panic!("access through a segment not in the chain: {a:?}");
            };
            assert!(
                a.within(seg.addr(), u64::from(seg.len())),
                "access past its segment: {a:?}"
            );
            if a.kind == AccessKind::Write {
                assert!(seg.writable(), "write into a readable segment: {a:?}");
            }
        }
        self.held.push(Held { chain, written });
    }

    /// The descriptor-table entry that points to chain `head`'s indirect table.
    fn indirect_descriptor_of(&self, head: u16) -> Option<u16> {
        let mut i = head;
        for _ in 0..self.size() {
            let d = self.raw.read_desc(i);
            let flags = d.flags.get();
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Some(i);
            }
            if flags & VIRTQ_DESC_F_NEXT == 0 || d.next.get() >= self.size() {
                return None;
            }
            i = d.next.get();
        }
        None
    }

    /// A segment is non-empty, in the arena, and a faithful copy of its descriptor.
    fn check_segment(&self, head: u16, s: &Segment) {
        assert_eq!(s.head(), head, "segment of another chain: {s:?}");
        assert_ne!(s.len(), 0, "zero-length segment kept: {s:?}");
        let end = s.addr().checked_add(u64::from(s.len()));
        assert!(
            s.addr() >= FUZZ_ARENA_BASE && end.is_some_and(|e| e <= FUZZ_ARENA_BASE + FUZZ_ARENA_SIZE),
            "segment outside the arena: {s:?}"
        );
        // Nothing wrote memory since the walk, so the descriptors are still there.
        let d = match s.slot() {
            DescSlot::Table(i) => {
                assert!(i < self.size(), "segment from table entry {i} past the table");
                self.raw.read_desc(i)
            }
            DescSlot::Indirect(index) => {
                // The table descriptor ends the chain's direct part.
                let table = self.indirect_descriptor_of(head);
                let table = table.unwrap_or_else(|| panic!("{s:?} but chain {head} has no indirect table"));
                let t = self.raw.read_desc(table);
                assert_ne!(
                    t.flags.get() & VIRTQ_DESC_F_INDIRECT,
                    0,
                    "{s:?} from a direct descriptor"
                );
                assert!(
                    u32::from(index) < t.len.get() / 16,
                    "{s:?} past its indirect table"
                );
                let mut b = [0u8; 16];
                let at = t.addr.get().wrapping_add(16 * u64::from(index));
                if Arena::read(&self.arena, at, &mut b).is_err() {
                    panic!("indirect entry of {s:?} outside the arena");
                }
                Descriptor::read_from_bytes(&b).unwrap_or_default()
            }
        };
        assert_eq!(
            d.addr.get(),
            s.addr(),
            "segment address differs from its descriptor"
        );
        assert_eq!(d.len.get(), s.len(), "segment length differs from its descriptor");
        assert_eq!(
            d.flags.get() & VIRTQ_DESC_F_WRITE != 0,
            s.writable(),
            "segment direction"
        );
        assert_eq!(
            d.flags.get() & VIRTQ_DESC_F_INDIRECT,
            0,
            "indirect descriptor kept as data"
        );
    }

    /// Returns a held chain, trying the misuses `add_used` must refuse first.
    fn complete(&mut self, held: Held, zero: bool) {
        let head = held.chain.head();
        let writable = held.chain.writable_len();
        if let Some(over) = writable.checked_add(1) {
            assert_eq!(
                self.device.add_used(head, over),
                Err(UsedError::TooLong { len: over, writable }),
                "add_used accepted more than the writable bytes"
            );
        }
        let len = if zero { 0 } else { held.written };
        assert_eq!(self.device.add_used(head, len), Ok(()), "add_used of a held head");
        self.expect_used(head, len);
        assert_eq!(
            self.device.add_used(head, 0),
            Err(UsedError::NotInFlight(head)),
            "add_used twice for one head"
        );
    }

    /// `add_used` of a head the harness does not hold must be refused.
    fn check_not_in_flight(&mut self, head: u16) {
        if self.held.iter().any(|h| h.chain.head() == head) {
            return;
        }
        assert_eq!(
            self.device.add_used(head, 0),
            Err(UsedError::NotInFlight(head)),
            "add_used of a head not in flight"
        );
    }

    /// The device just published `(head, len)` as its next used element.
    fn expect_used(&mut self, head: u16, len: u32) {
        let pos = self.used;
        self.used = self.used.wrapping_add(1);
        assert_eq!(self.raw.used_idx(), self.used, "used.idx after publishing");
        assert_eq!(self.raw.used_elem(pos), (u32::from(head), len), "used element");
    }

    /// `enable_notifications` may latch a fault; keep track of it.
    fn check_fault_after_notify(&mut self) {
        match (&self.fault, self.device.fault()) {
            (Some(DeviceQueueError::NeedsReset(f)), g) => {
                assert_eq!(g.as_ref(), Some(f), "fault changed or cleared")
            }
            (_, Some(g)) => self.fault = Some(DeviceQueueError::NeedsReset(g)),
            (_, None) => {}
        }
    }

    /// Every logged access lies in the arena.
    fn check_accesses(&self) {
        for a in self.device.memory().take() {
            self.assert_in_arena(&a);
        }
    }

    /// A range the memory accepted (a check, read, write or direct view) lies inside
    /// the arena.
    fn assert_in_arena(&self, a: &Access) {
        if a.ok {
            assert!(
                a.within(FUZZ_ARENA_BASE, FUZZ_ARENA_SIZE),
                "accepted range outside the arena: {a:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::layout::VIRTQ_DESC_F_NEXT;

    #[test]
    fn raw_driver_writes_are_what_the_device_sees() {
        let arena = Arena::new(0x10_0000, 1 << 16).unwrap();
        let (_, ring) = arena.alloc_split_ring(4).unwrap();
        let mut raw = RawDriver::new(arena.clone(), 4, ring.clone()).unwrap();
        let mut dev = SplitDevice::new(4, &ring, arena.clone(), Features::VERSION_1).unwrap();
        let buf = arena.alloc(8, 8).unwrap();
        raw.write_desc(2, buf, 4, VIRTQ_DESC_F_NEXT, 3);
        raw.write_desc(3, buf + 4, 4, VIRTQ_DESC_F_WRITE, 0);
        assert_eq!(raw.read_desc(2), Descriptor::new(buf, 4, VIRTQ_DESC_F_NEXT, 3));
        assert_eq!(raw.push_avail(2), 1);
        assert_eq!(raw.avail_idx(), 1);
        assert_eq!(raw.avail_entry(0), 2);
        let chain = dev.pop().unwrap().unwrap();
        assert_eq!(
            (chain.head(), chain.readable_len(), chain.writable_len()),
            (2, 4, 4)
        );
        dev.add_used(2, 3).unwrap();
        assert_eq!(raw.used_idx(), 1);
        assert_eq!(raw.read_used(), vec![(2, 3)]);
        assert_eq!(raw.read_used(), vec![]);
        raw.set_used_idx(7);
        raw.set_used_flags(9);
        raw.write_used_elem(5, 1, 2);
        assert_eq!(
            (raw.used_idx(), raw.used_flags(), raw.used_elem(1)),
            (7, 9, (1, 2))
        );
    }

    #[test]
    fn raw_driver_refuses_short_areas() {
        let arena = Arena::new(0x10_0000, 1 << 16).unwrap();
        let (_, ring) = arena.alloc_split_ring(4).unwrap();
        assert!(matches!(
            RawDriver::new(arena.clone(), 8, ring.clone()),
            Err(RingSetupError::Area { .. })
        ));
        assert!(matches!(
            RawDriver::new(arena, 3, ring),
            Err(RingSetupError::BadSize(3))
        ));
    }

    #[test]
    fn fuzz_chain_walk_survives_trivial_inputs() {
        fuzz_chain_walk(&[]);
        fuzz_chain_walk(&[0xff; 64]);
        // Size 4, indirect, one readable + one writable descriptor, pushed and popped.
        let mut v = vec![2, 1, 2];
        v.extend(Descriptor::new(FUZZ_DATA_OFFSET, 16, VIRTQ_DESC_F_NEXT, 1).as_bytes());
        v.extend(Descriptor::new(FUZZ_DATA_OFFSET + 16, 16, VIRTQ_DESC_F_WRITE, 0).as_bytes());
        v.extend([0, fuzz_op::PUSH, 0, 0, fuzz_op::POP]);
        assert_eq!(fuzz_chain_walk_report(&v), ["served 0"]);
    }
}
