//! `packed_walk`: the device side of a packed ring (`PackedDevice`, virtio 1.2 §2.8)
//! against a driver made of fuzz bytes: a descriptor ring image, indirect tables,
//! and a script of ring writes, pops, completions and event suppression changes
//! (HOSTILE 1-10, 12, 41-44, 46).
//!
//! The harness keeps its own model of the device's ring positions (lap positions:
//! the slot, plus the queue size when the wrap counter is 0), of the buffer ids it
//! holds and of the walk's rules, and predicts every answer before asking.
//!
//! Input layout (missing bytes read as zero):
//!
//! 1. `size`: the queue size is `size + 1` (1 to 256; packed sizes need not be
//!    powers of two, §2.8.10.1);
//! 2. `bits`: bit 0 INDIRECT_DESC, bit 1 EVENT_IDX, bit 2 start at the position in
//!    the next two bytes (vhost-user's encoding: slot in bits 0-14, wrap counter in
//!    bit 15) instead of slot 0 with wrap counter 1, bit 3 reject with a status byte
//!    (`with_reject_status`);
//! 3. `n`, then `min(n, size)` 16-byte descriptors (`addr` an offset from
//!    [`ARENA_BASE`], wrapping; `len`; `id`; `flags`, all raw) for ring slots `0..`;
//! 4. `m`, then `m` such descriptors for the indirect area at [`INDIRECT_OFFSET`];
//! 5. operations until the input ends (at most 256): an op byte whose low 3 bits are
//!    one of [`op`] and whose high 5 bits are its count or mode, then its operands;
//! 6. then up to 64 more pops, and every held buffer is returned.
//!
//! Invariants: never a panic; at most one descriptor list per pop, no longer than
//! the ring slots the driver has free, and a bounded number of memory accesses per
//! pop (no loop); each answer of `pop` is the model's: nothing when the slot at the
//! device's position is not available in its wrap counter, a chain whose id is the
//! list's last id, whose segments are exactly the list's (or its indirect table's)
//! non-empty descriptors in order, readable before writable, inside the arena and
//! below 2^32 bytes in total, the same rejection as the model's walk (returned at
//! once with length 0, or with the status byte), or the same sticky needs-reset;
//! no buffer id handed out twice while in flight; `pop` writes no buffer memory;
//! `add_used` accepts exactly the held ids with a length within their writable
//! bytes, writes exactly one used descriptor (id, length, AVAIL = USED = the used
//! wrap counter, WRITE iff a length) at the model's used position and skips the
//! list's slots; nothing else in the ring or the driver area changes; the
//! device area holds what `disable`/`enable_notifications` wrote; a notification
//! is never lost (§2.8.10, whatever the driver area holds); `in_flight()` matches;
//! at the end the device's `next_avail` is the model's.

use std::sync::Arc;

use virtio_core::RingMemory;
use virtio_core::access::{DescSlot, Segment};
use virtio_core::features::Features;
use virtio_core::ring::packed::PackedDevice;
use virtio_core::ring::split::{DeviceQueueError, RingFault, UsedError};
use virtio_core::ring::{Chain, ChainError, INDIRECT_MAX};
use virtio_core::test_utils::Arena;
use virtio_core::test_utils::raw::{Access, AccessKind, Recorder};

use super::common::{Bytes, Seed};

/// Guest address of the arena; descriptor addresses in the input are offsets from it.
pub const ARENA_BASE: u64 = 0x10_0000;
/// Offset of the indirect area (1024 entries); the ring areas lie below it.
pub const INDIRECT_OFFSET: u64 = 0x2000;
/// Offset of the first byte after the indirect area.
pub const DATA_OFFSET: u64 = INDIRECT_OFFSET + 16 * INDIRECT_MAX as u64;
/// Arena size: 32 MiB of data, so 256 descriptors can reach the 2^32 total (lazy
/// mapping: untouched pages cost nothing).
pub const ARENA_SIZE: u64 = DATA_OFFSET + (1 << 25);
/// Most operations taken from one input.
const MAX_OPS: usize = 256;
/// Most pops in the final drain.
const MAX_POPS: usize = 64;
/// Most bytes moved through a chain's reader or writer.
const MAX_IO: u64 = 4096;
/// The status byte a rejected chain gets with input bit 3.
const REJECT_STATUS: u8 = 0xee;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;
const EV_ENABLE: u16 = 0;
const EV_DISABLE: u16 = 1;
const EV_DESC: u16 = 2;

/// Opcodes (the low 3 bits of an op byte).
pub mod op {
    /// `slot: u16, desc: [u8; 16]`: write a raw descriptor into slot `slot % size`.
    pub const RAW: u8 = 0;
    /// `id: u16, len: u16, addr: u16, bits: u8`: write `count` descriptors at the
    /// harness driver's position as an honest driver would, and advance it: the
    /// `k`th at `DATA_OFFSET + 16 * addr + k * len` (bit 7 of `bits`: the first at
    /// entry `addr % 1024` of the indirect area, with INDIRECT), NEXT on all but the
    /// last, WRITE from the `bits & 31`th on, all with buffer id `id`; bit 6 of
    /// `bits` writes the other wrap counter's AVAIL/USED bits (a lie).
    pub const OFFER: u8 = 1;
    /// Pop up to `count` chains and hold them.
    pub const POP: u8 = 2;
    /// `pick: u16, len: u32`: `add_used`. Mode bit 0: `pick` indexes the held
    /// buffers (out of order) instead of naming an id; mode bit 1: the length is
    /// the bytes the harness wrote instead of `len`.
    pub const COMPLETE: u8 = 3;
    /// `desc: u16, flags: u16`: write the driver event suppression area, then
    /// `needs_notification`; mode bit 0 `disable_notifications`, mode bit 1
    /// `enable_notifications`.
    pub const NOTIFY: u8 = 4;
    /// `index: u16, desc: [u8; 16]`: write entry `index % 1024` of the indirect area.
    pub const INDIRECT: u8 = 5;
    /// `lap: u16`: move the harness driver's position (`lap % (2 * size)`).
    pub const CURSOR: u8 = 6;
    /// `word: u32`: scribble over the device event suppression area.
    pub const SCRIBBLE: u8 = 7;
}

/// One descriptor as the input and the ring hold it: `(addr, len, id, flags)`.
type Desc = (u64, u32, u16, u16);

fn desc_bytes(d: Desc) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&d.0.to_le_bytes());
    b[8..12].copy_from_slice(&d.1.to_le_bytes());
    b[12..14].copy_from_slice(&d.2.to_le_bytes());
    b[14..].copy_from_slice(&d.3.to_le_bytes());
    b
}

fn desc_from(b: [u8; 16]) -> Desc {
    let le8 = |r: std::ops::Range<usize>| {
        let mut a = [0u8; 8];
        a[..r.len()].copy_from_slice(&b[r]);
        u64::from_le_bytes(a)
    };
    (
        le8(0..8),
        le8(8..12) as u32,
        le8(12..14) as u16,
        le8(14..16) as u16,
    )
}

/// A descriptor from the input, its address made a guest address.
fn input_desc(input: &mut Bytes) -> Desc {
    let (addr, len, id, flags) = desc_from(input.take());
    (ARENA_BASE.wrapping_add(addr), len, id, flags)
}

/// A buffer the harness holds.
struct Held {
    chain: Chain,
    /// Ring slots its list took.
    ndesc: u16,
    written: u32,
}

/// What the model's walk of a list predicts.
#[derive(Debug)]
enum Walk {
    /// Served: the segments `(addr, len, writable, slot)` in order.
    Served(Vec<(u64, u32, bool, DescSlot)>),
    /// Rejected with this rule; `Access` carries the used length with a status byte
    /// and where the status byte goes.
    Rejected(&'static str, Option<(u32, u64)>),
}

struct Harness {
    arena: Arc<Arena>,
    ring: RingMemory,
    /// Guest addresses of the descriptor ring, the driver and the device area.
    areas: (u64, u64, u64),
    device: PackedDevice<Recorder<Arc<Arena>>>,
    size: u16,
    indirect: bool,
    event_idx: bool,
    reject_status: bool,
    /// Model: the device's next position, its used position (lap positions).
    avail: u32,
    used: u32,
    /// Model: the used position at the last notification decision, slots since.
    signalled: u32,
    used_since: u32,
    /// The harness driver's position for [`op::OFFER`].
    cursor: u32,
    held: Vec<Held>,
    /// The fault the model expects the device to have latched.
    fault: Option<RingFault>,
    /// Whether a pop has reported it.
    fault_reported: bool,
    /// Ring and driver area as they must be, device writes included.
    ring_image: Vec<Desc>,
    driver_area: u32,
    /// The device area as the device last wrote it, once it has.
    device_area: Option<u32>,
    events: Vec<String>,
}

/// Runs one input; panics only when an invariant is broken.
pub fn run(data: &[u8]) {
    report(data);
}

/// [`run`], returning one line per notable event, for the seed tests: `served <id>
/// slots <n> wrap <w> segs <r>+<w>`, `empty`, `rejected <id> <rule>`, the fault that
/// put the queue into needs-reset, `used <id> <len> at <slot>`, `refused <error>`,
/// `notify <bool>`, `pending <bool>`.
pub fn report(data: &[u8]) -> Vec<String> {
    let mut input = Bytes(data);
    let size = u16::from(input.u8()) + 1;
    let bits = input.u8();
    let mut features = Features::VERSION_1;
    if bits & 1 != 0 {
        features |= Features::INDIRECT_DESC;
    }
    if bits & 2 != 0 {
        features |= Features::EVENT_IDX;
    }
    let start = (bits & 4 != 0).then(|| input.u16());
    let Some(mut h) = Harness::new(size, features, start, bits & 8 != 0) else {
        // Out of memory for the (lazy) arena mapping: nothing to test.
        return Vec::new();
    };

    let n = u16::from(input.u8()).min(size);
    for slot in 0..n {
        let d = input_desc(&mut input);
        h.put(slot, d);
    }
    let m = u16::from(input.u8());
    for i in 0..m {
        let d = input_desc(&mut input);
        h.put_indirect(i, d);
    }

    let mut ops = 0;
    while !input.is_empty() && ops < MAX_OPS {
        ops += 1;
        let opb = input.u8();
        let count = (opb >> 3) + 1;
        let mode = opb >> 3;
        match opb & 7 {
            op::RAW => {
                let slot = input.u16() % size;
                let d = input_desc(&mut input);
                h.put(slot, d);
            }
            op::OFFER => {
                let id = input.u16();
                let len = input.u16();
                let addr = input.u16();
                let b = input.u8();
                h.offer(count, id, len, addr, b);
            }
            op::POP => {
                for _ in 0..count {
                    if !h.pop_once() {
                        break;
                    }
                }
            }
            op::COMPLETE => {
                let pick = input.u16();
                let len = input.u32();
                h.complete(mode, pick, len);
            }
            op::NOTIFY => {
                let desc = input.u16();
                let flags = input.u16();
                h.notify(mode, desc, flags);
            }
            op::INDIRECT => {
                let i = input.u16() % INDIRECT_MAX;
                let d = input_desc(&mut input);
                h.put_indirect(i, d);
            }
            op::CURSOR => {
                h.cursor = u32::from(input.u16()) % h.period();
            }
            _ => {
                let word = input.u32();
                h.ring.device.write(0, &word.to_le_bytes()).expect("device area");
                h.device_area = None;
            }
        }
        h.check_memory();
    }

    for _ in 0..MAX_POPS {
        if !h.pop_once() {
            break;
        }
    }
    while !h.held.is_empty() {
        h.complete(3, 0, 0);
    }
    h.check_memory();
    assert_eq!(
        h.device.in_flight(),
        0,
        "buffers left in flight after returning all"
    );
    if h.fault.is_none() {
        assert_eq!(
            h.device.next_avail(),
            h.encode(h.avail),
            "the device's next position"
        );
    }
    h.events
}

impl Harness {
    fn new(size: u16, features: Features, start: Option<u16>, reject_status: bool) -> Option<Harness> {
        let arena = Arena::new(ARENA_BASE, usize::try_from(ARENA_SIZE).ok()?).ok()?;
        let (addrs, ring) = arena.alloc_packed_ring(size).ok()?;
        assert!(
            addrs.2 + 4 <= ARENA_BASE + INDIRECT_OFFSET,
            "ring areas overlap the indirect area"
        );
        let mut device = PackedDevice::new(size, &ring, Recorder::new(arena.clone()), features).ok()?;
        if reject_status {
            device = device.with_reject_status(REJECT_STATUS);
        }
        if let Some(start) = start {
            device = device.starting_at(start);
        }
        let mut h = Harness {
            arena,
            ring,
            areas: addrs,
            device,
            size,
            indirect: features.contains(Features::INDIRECT_DESC),
            event_idx: features.contains(Features::EVENT_IDX),
            reject_status,
            avail: 0,
            used: 0,
            signalled: 0,
            used_since: 0,
            cursor: 0,
            held: Vec::new(),
            fault: None,
            fault_reported: false,
            ring_image: vec![(0, 0, 0, 0); usize::from(size)],
            driver_area: 0,
            device_area: None,
            events: Vec::new(),
        };
        if let Some(start) = start {
            match h.decode(start) {
                Some(lap) => {
                    h.avail = lap;
                    h.used = lap;
                    h.signalled = lap;
                    h.cursor = lap;
                }
                None => h.fault = Some(RingFault::StartOutOfRange { start, size }),
            }
        }
        Some(h)
    }

    // --- lap positions, as §2.8.1 and the module documentation define them ---

    fn period(&self) -> u32 {
        2 * u32::from(self.size)
    }

    fn slot(&self, lap: u32) -> u16 {
        (lap % u32::from(self.size)) as u16
    }

    fn wrap(&self, lap: u32) -> bool {
        lap < u32::from(self.size)
    }

    fn advance(&self, lap: u32, n: u32) -> u32 {
        (lap + n) % self.period()
    }

    fn distance(&self, from: u32, to: u32) -> u32 {
        (to + self.period() - from) % self.period()
    }

    fn encode(&self, lap: u32) -> u16 {
        self.slot(lap) | if self.wrap(lap) { 0x8000 } else { 0 }
    }

    fn decode(&self, v: u16) -> Option<u32> {
        let slot = v & 0x7fff;
        (slot < self.size).then(|| u32::from(slot) + if v & 0x8000 != 0 { 0 } else { u32::from(self.size) })
    }

    /// Slots the driver has free: those not taken by lists the device holds.
    fn room(&self) -> u32 {
        u32::from(self.size) - self.distance(self.used, self.avail)
    }

    fn is_avail(flags: u16, wrap: bool) -> bool {
        (flags & F_AVAIL != 0) == wrap && (flags & F_USED != 0) != wrap
    }

    // --- the driver's writes ---

    fn put(&mut self, slot: u16, d: Desc) {
        self.ring
            .desc
            .write(16 * u64::from(slot), &desc_bytes(d))
            .expect("ring slot");
        self.ring_image[usize::from(slot)] = d;
    }

    fn put_indirect(&self, i: u16, d: Desc) {
        let at = ARENA_BASE + INDIRECT_OFFSET + 16 * u64::from(i);
        self.arena.write(at, &desc_bytes(d)).expect("indirect area");
    }

    fn offer(&mut self, count: u8, id: u16, len: u16, addr: u16, bits: u8) {
        for k in 0..count {
            // Each descriptor carries the wrap counter of its own lap (§2.8.1): a
            // list may wrap.
            let wrap = self.wrap(self.cursor) != (bits & 0x40 != 0);
            let mut flags = if wrap { F_AVAIL } else { F_USED };
            if k + 1 < count {
                flags |= F_NEXT;
            }
            if k >= bits & 31 {
                flags |= F_WRITE;
            }
            let a = if k == 0 && bits & 0x80 != 0 {
                flags |= F_INDIRECT;
                ARENA_BASE + INDIRECT_OFFSET + 16 * u64::from(addr % INDIRECT_MAX)
            } else {
                ARENA_BASE + DATA_OFFSET + 16 * u64::from(addr) + u64::from(k) * u64::from(len)
            };
            let slot = self.slot(self.cursor);
            self.put(slot, (a, u32::from(len), id, flags));
            self.cursor = self.advance(self.cursor, 1);
        }
    }

    // --- pop ---

    /// The model's answer for the list at the device's position: `None` when
    /// nothing is available, else the list's slots and descriptors or the fault.
    fn list(&self) -> Option<Result<Vec<(u16, Desc)>, RingFault>> {
        let room = self.room();
        if room == 0 {
            return None;
        }
        let first = self.ring_image[usize::from(self.slot(self.avail))];
        if !Self::is_avail(first.3, self.wrap(self.avail)) {
            return None;
        }
        let mut list = vec![(self.slot(self.avail), first)];
        let mut lap = self.avail;
        while list.last().is_some_and(|d| d.1.3 & F_NEXT != 0) {
            if list.len() as u32 >= room {
                return Some(Err(RingFault::ListOverrunsRing { room: room as u16 }));
            }
            lap = self.advance(lap, 1);
            let s = self.slot(lap);
            list.push((s, self.ring_image[usize::from(s)]));
        }
        let id = list.last().map_or(0, |d| d.1.2);
        if id >= self.size {
            return Some(Err(RingFault::HeadOutOfRange {
                head: id,
                size: self.size,
            }));
        }
        if self.held.iter().any(|h| h.chain.head() == id) {
            return Some(Err(RingFault::IdInFlight { id }));
        }
        Some(Ok(list))
    }

    /// Whether `[addr, addr + len)` lies in the arena (the arena's own check).
    fn in_arena(addr: u64, len: u64) -> bool {
        addr >= ARENA_BASE
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= ARENA_BASE + ARENA_SIZE)
    }

    /// The model's walk of a list (§2.8.6, §2.8.7; HOSTILE 1-9): the same rules
    /// in the same order as the device's, written from the specification. Every
    /// descriptor's bytes count toward rule 7's total, refused ones included (the
    /// campaign's first finding, `crash-refused-readable-bytes-uncounted`).
    fn walk(&self, list: &[(u16, Desc)]) -> Walk {
        let mut segs = Vec::new();
        let mut seen_writable = false;
        let mut total = 0u64;
        let mut refused = false;
        let mut refused_writable = 0u64;
        let mut last_writable = None;
        // The walk in a block of its own: `push` borrows the state it builds.
        let walked = {
            let mut push = |addr: u64, len: u32, flags: u16, slot: DescSlot| -> Result<(), &'static str> {
                let writable = flags & F_WRITE != 0;
                if !writable && seen_writable {
                    return Err("ReadableAfterWritable");
                }
                seen_writable |= writable;
                if len == 0 {
                    return Ok(());
                }
                if addr.checked_add(u64::from(len)).is_none() {
                    return Err("AddrOverflow");
                }
                let in_arena = Self::in_arena(addr, u64::from(len));
                total += u64::from(len);
                if total > u64::from(u32::MAX) {
                    return Err("TooManyBytes");
                }
                if in_arena {
                    if writable {
                        last_writable = Some(addr + u64::from(len) - 1);
                    }
                    segs.push((addr, len, writable, slot));
                } else {
                    refused = true;
                    if writable {
                        // The status byte goes into the chain's last writable byte
                        // only: none if that is unreachable.
                        refused_writable += u64::from(len);
                        last_writable = None;
                    }
                }
                Ok(())
            };
            let mut walked = Ok(());
            for (k, &(slot, (addr, len, _, flags))) in list.iter().enumerate() {
                if flags & F_INDIRECT != 0 {
                    walked = if !self.indirect {
                        Err("IndirectNotNegotiated")
                    } else if flags & F_NEXT != 0 {
                        Err("IndirectWithNext")
                    } else if k != 0 {
                        Err("IndirectInList")
                    } else {
                        self.walk_table(addr, len, &mut push)
                    };
                    break;
                }
                walked = push(addr, len, flags, DescSlot::Table(slot));
                if walked.is_err() {
                    break;
                }
            }
            walked
        };
        match walked {
            Err(rule) => Walk::Rejected(rule, None),
            Ok(()) if refused => {
                let writable: u64 = segs.iter().filter(|s| s.2).map(|s| u64::from(s.1)).sum();
                let status = last_writable.map(|at| ((writable + refused_writable) as u32, at));
                Walk::Rejected("Access", status)
            }
            Ok(()) => Walk::Served(segs),
        }
    }

    /// An indirect table: checked as a whole, read once, its entries consecutive
    /// (their NEXT and ids ignored), INDIRECT among them refused (§2.8.7).
    fn walk_table(
        &self,
        addr: u64,
        len: u32,
        push: &mut impl FnMut(u64, u32, u16, DescSlot) -> Result<(), &'static str>,
    ) -> Result<(), &'static str> {
        if len == 0 || !len.is_multiple_of(16) {
            return Err("IndirectLength");
        }
        let entries = len / 16;
        if entries > u32::from(INDIRECT_MAX) {
            return Err("IndirectTooLarge");
        }
        if addr.checked_add(u64::from(len)).is_none() {
            return Err("AddrOverflow");
        }
        if !Self::in_arena(addr, u64::from(len)) {
            // The table itself is unreachable: nothing to walk, no status byte.
            return Err("TableAccess");
        }
        for i in 0..entries as u16 {
            let mut b = [0u8; 16];
            self.arena
                .read(addr + 16 * u64::from(i), &mut b)
                .expect("in the arena");
            let (a, l, _, f) = desc_from(b);
            if f & F_INDIRECT != 0 {
                return Err("NestedIndirect");
            }
            push(a, l, f, DescSlot::Indirect(i))?;
        }
        Ok(())
    }

    /// The name the model gives a device's chain error.
    fn rule(e: &ChainError) -> &'static str {
        match e {
            ChainError::ReadableAfterWritable => "ReadableAfterWritable",
            ChainError::AddrOverflow { .. } => "AddrOverflow",
            ChainError::TooManyBytes => "TooManyBytes",
            ChainError::IndirectNotNegotiated => "IndirectNotNegotiated",
            ChainError::IndirectWithNext => "IndirectWithNext",
            ChainError::IndirectInList => "IndirectInList",
            ChainError::IndirectLength(_) => "IndirectLength",
            ChainError::IndirectTooLarge { .. } => "IndirectTooLarge",
            ChainError::NestedIndirect => "NestedIndirect",
            ChainError::Access(_) => "Access",
            ChainError::TooLong { .. } => "TooLong",
            _ => "other",
        }
    }

    /// One `pop` against the model; returns whether to keep popping.
    fn pop_once(&mut self) -> bool {
        let expected = match self.fault {
            Some(f) => Some(Err(f)),
            None => self.list(),
        };
        // The model walks first: a rejection's status byte may land anywhere the
        // chain's last writable descriptor points, an indirect table included.
        let walks = match &expected {
            Some(Ok(list)) => Some(self.walk(list)),
            _ => None,
        };
        let r = self.device.pop();
        let log = self.device.memory().take();
        let bound = 2 * usize::from(self.size.max(INDIRECT_MAX)) + 2;
        assert!(log.len() <= bound, "{} memory accesses in one pop", log.len());
        match (expected, r) {
            (None, Ok(None)) => {
                assert!(log.is_empty(), "an empty pop touched memory: {log:?}");
                self.events.push("empty".into());
                false
            }
            (Some(Err(f)), Err(DeviceQueueError::NeedsReset(g))) => {
                assert_eq!(g, f, "the fault");
                assert_eq!(self.device.fault(), Some(f), "fault not latched");
                if !self.fault_reported {
                    self.events.push(format!("{f:?}"));
                    self.fault_reported = true;
                }
                self.fault = Some(f);
                for a in &log {
                    assert_ne!(a.kind, AccessKind::Write, "a refused list was written: {a:?}");
                }
                false
            }
            (Some(Ok(list)), r) => {
                let walk = walks.expect("walked above");
                self.check_walk(&list, walk, r, &log)
            }
            (e, r) => panic!("pop returned {r:?}, the model expected {e:?}"),
        }
    }

    /// Checks the device's answer for `list` against the model's walk.
    fn check_walk(
        &mut self,
        list: &[(u16, Desc)],
        walk: Walk,
        r: Result<Option<Chain>, DeviceQueueError>,
        log: &[Access],
    ) -> bool {
        let id = list.last().map_or(0, |d| d.1.2);
        let ndesc = list.len() as u16;
        let wrap = u8::from(self.wrap(self.avail));
        self.avail = self.advance(self.avail, u32::from(ndesc));
        match (walk, r) {
            (Walk::Served(segs), Ok(Some(chain))) => {
                for a in log {
                    assert_ne!(a.kind, AccessKind::Write, "pop wrote memory: {a:?}");
                    assert!(
                        !a.ok || a.within(ARENA_BASE, ARENA_SIZE),
                        "accepted access outside the arena: {a:?}"
                    );
                }
                assert_eq!(chain.head(), id, "the buffer id is the list's last id (§2.8.6)");
                let got: Vec<_> = chain
                    .readable()
                    .iter()
                    .chain(chain.writable())
                    .map(|s: &Segment| {
                        assert_eq!(s.head(), id, "segment of another buffer: {s:?}");
                        (s.addr(), s.len(), s.writable(), s.slot())
                    })
                    .collect();
                assert_eq!(got, segs, "the chain's segments");
                for s in chain.readable() {
                    assert!(!s.writable(), "writable segment among the readable: {s:?}");
                }
                for s in chain.writable() {
                    assert!(s.writable(), "readable segment among the writable: {s:?}");
                }
                let rsum: u64 = segs.iter().filter(|s| !s.2).map(|s| u64::from(s.1)).sum();
                let wsum: u64 = segs.iter().filter(|s| s.2).map(|s| u64::from(s.1)).sum();
                assert_eq!(u64::from(chain.readable_len()), rsum, "readable total");
                assert_eq!(u64::from(chain.writable_len()), wsum, "writable total");
                assert!(rsum + wsum < 1 << 32, "{} bytes in one chain", rsum + wsum);
                self.events.push(format!(
                    "served {id} slots {ndesc} wrap {wrap} segs {}+{}",
                    chain.readable().len(),
                    chain.writable().len()
                ));
                let written = self.exercise(&chain);
                self.held.push(Held {
                    chain,
                    ndesc,
                    written,
                });
                assert_eq!(self.device.in_flight(), self.held.len(), "in_flight");
                true
            }
            (Walk::Rejected(rule, status), Err(DeviceQueueError::BadChain { head, source })) => {
                assert_eq!(head, id, "the rejected buffer's id");
                let got = match Self::rule(&source) {
                    // The table itself refused by the memory.
                    "Access" if rule == "TableAccess" => "TableAccess",
                    g => g,
                };
                assert_eq!(got, rule, "the rule the walk broke: {source}");
                let used_len = match status {
                    Some((len, at)) if self.reject_status && rule == "Access" => {
                        // A status byte inside the used slot's `len | id | flags`
                        // is overwritten by the used descriptor at once: the
                        // write log shows it.
                        let tail = self.areas.0 + 16 * u64::from(self.slot(self.used)) + 8;
                        if !(tail..tail + 8).contains(&at) {
                            let mut b = [0u8];
                            self.arena.read(at, &mut b).expect("in the arena");
                            assert_eq!(b[0], REJECT_STATUS, "the status byte");
                        }
                        let writes: Vec<_> = log.iter().filter(|a| a.kind == AccessKind::Write).collect();
                        assert!(
                            writes.len() == 1 && writes[0].addr == at && writes[0].len == 1,
                            "writes of a rejection: {writes:?}"
                        );
                        self.absorb(&[(at, 1)]);
                        len
                    }
                    _ => {
                        for a in log {
                            assert_ne!(a.kind, AccessKind::Write, "a rejection wrote memory: {a:?}");
                        }
                        0
                    }
                };
                self.events.push(format!("rejected {id} {rule}"));
                self.push_used(id, used_len, ndesc);
                true
            }
            (walk, r) => panic!("pop of {list:?} returned {r:?}, the model's walk {walk:?}"),
        }
    }

    /// Reads the chain's readable bytes and fills its writable ones through the
    /// device's memory; every access stays in its segment. Returns the bytes written.
    fn exercise(&mut self, chain: &Chain) -> u32 {
        let mem = self.device.memory();
        let mut writes = Vec::new();
        let mut buf = vec![0u8; chain.readable_len().min(MAX_IO as u32) as usize];
        if let Err(e) = chain.reader(mem).read_exact(&mut buf) {
            panic!("reading {} bytes of a served chain failed: {e}", buf.len());
        }
        let fill = vec![0xa5u8; chain.writable_len().min(MAX_IO as u32) as usize];
        let mut writer = chain.writer(mem);
        if let Err(e) = writer.write_all(&fill) {
            panic!("writing {} bytes into a served chain failed: {e}", fill.len());
        }
        assert_eq!(writer.written() as usize, fill.len(), "writer count");
        for a in mem.take() {
            assert!(a.ok, "access inside a served chain refused: {a:?}");
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
                writes.push((a.addr, a.len));
            }
        }
        let written = writer.written();
        self.absorb(&writes);
        written
    }

    /// The driver may hand out its own ring areas as buffers: what the device
    /// wrote into them, where the chain allowed it, becomes the model's image.
    fn absorb(&mut self, writes: &[(u64, u64)]) {
        let overlaps = |start: u64, len: u64, (a, l): (u64, u64)| a < start + len && start < a + l;
        for &w in writes {
            for slot in 0..self.size {
                let at = self.areas.0 + 16 * u64::from(slot);
                if overlaps(at, 16, w) {
                    let mut b = [0u8; 16];
                    self.arena.read(at, &mut b).expect("ring slot");
                    self.ring_image[usize::from(slot)] = desc_from(b);
                }
            }
            if overlaps(self.areas.1, 4, w) {
                let mut b = [0u8; 4];
                self.arena.read(self.areas.1, &mut b).expect("driver area");
                self.driver_area = u32::from_le_bytes(b);
            }
            if overlaps(self.areas.2, 4, w) {
                self.device_area = None;
            }
        }
    }

    /// The model's used descriptor: written over the slot at the used position
    /// (its address word untouched), then the list's slots skipped (§2.8.6).
    fn push_used(&mut self, id: u16, len: u32, ndesc: u16) {
        let slot = self.slot(self.used);
        let wrap = if self.wrap(self.used) { F_AVAIL | F_USED } else { 0 };
        let write = if len != 0 { F_WRITE } else { 0 };
        let d = &mut self.ring_image[usize::from(slot)];
        *d = (d.0, len, id, wrap | write);
        self.events.push(format!("used {id} {len} at {slot}"));
        self.used = self.advance(self.used, u32::from(ndesc));
        self.used_since += u32::from(ndesc);
    }

    // --- add_used ---

    fn complete(&mut self, mode: u8, pick: u16, len: u32) {
        let i = if mode & 1 != 0 && !self.held.is_empty() {
            Some(usize::from(pick) % self.held.len())
        } else {
            self.held.iter().position(|h| h.chain.head() == pick)
        };
        let id = i.map_or(pick, |i| self.held[i].chain.head());
        let len = match i {
            Some(i) if mode & 2 != 0 => self.held[i].written,
            _ => len,
        };
        let r = self.device.add_used(id, len);
        match i {
            None => {
                assert_eq!(r, Err(UsedError::NotInFlight(id)), "add_used of an id not held");
                self.events
                    .push(format!("refused {:?}", UsedError::NotInFlight(id)));
            }
            Some(i) => {
                let writable = self.held[i].chain.writable_len();
                if len > writable {
                    assert_eq!(r, Err(UsedError::TooLong { len, writable }), "add_used too long");
                    self.events
                        .push(format!("refused {:?}", UsedError::TooLong { len, writable }));
                } else {
                    assert_eq!(r, Ok(()), "add_used of a held id");
                    let held = self.held.remove(i);
                    self.push_used(id, len, held.ndesc);
                }
            }
        }
        assert!(
            self.device.memory().take().is_empty(),
            "add_used touched buffer memory"
        );
        assert_eq!(self.device.in_flight(), self.held.len(), "in_flight");
    }

    // --- event suppression ---

    fn notify(&mut self, mode: u8, desc: u16, flags: u16) {
        self.driver_area = u32::from(desc) | u32::from(flags) << 16;
        self.ring
            .driver
            .write(0, &self.driver_area.to_le_bytes())
            .expect("driver area");
        let old = self.signalled;
        let moved = self.used_since;
        self.signalled = self.used;
        self.used_since = 0;
        // §2.8.10: DISABLE suppresses, DESC (with EVENT_IDX) asks for the crossing
        // of one position, anything else (ENABLE, garbage, a slot outside the
        // ring) must not lose a notification (HOSTILE 46).
        let wanted = match (flags, self.event_idx, self.decode(desc)) {
            (EV_DISABLE, _, _) => false,
            (EV_DESC, true, Some(ev)) => moved >= self.period() || self.distance(old, ev) < moved,
            _ => moved != 0,
        };
        let got = self.device.needs_notification();
        assert_eq!(
            got, wanted,
            "notification for {moved} slots since {old}, driver area {desc:#x}/{flags}"
        );
        self.events.push(format!("notify {got}"));
        if mode & 1 != 0 {
            self.device.disable_notifications();
            self.device_area = Some(u32::from(EV_DISABLE) << 16);
        }
        if mode & 2 != 0 {
            let pending = self.device.enable_notifications();
            let area = if self.event_idx {
                u32::from(self.encode(self.avail)) | u32::from(EV_DESC) << 16
            } else {
                u32::from(EV_ENABLE) << 16
            };
            self.device_area = Some(area);
            let next = self.ring_image[usize::from(self.slot(self.avail))];
            let wanted =
                self.fault.is_none() && self.room() > 0 && Self::is_avail(next.3, self.wrap(self.avail));
            assert_eq!(pending, wanted, "enable_notifications' re-check");
            self.events.push(format!("pending {pending}"));
        }
        assert!(
            self.device.memory().take().is_empty(),
            "notification touched buffer memory"
        );
    }

    // --- memory ---

    /// The ring, the driver area and the device area hold what the model says.
    fn check_memory(&self) {
        let mut b = vec![0u8; 16 * usize::from(self.size)];
        self.ring.desc.read(0, &mut b).expect("ring");
        for (slot, (bytes, want)) in b.chunks_exact(16).zip(&self.ring_image).enumerate() {
            let got = desc_from(bytes.try_into().expect("16 bytes"));
            assert_eq!(got, *want, "ring slot {slot}");
        }
        let word = |r: &virtio_core::shm::Region| {
            let mut w = [0u8; 4];
            r.read(0, &mut w).expect("event area");
            u32::from_le_bytes(w)
        };
        assert_eq!(
            word(&self.ring.driver),
            self.driver_area,
            "the driver area changed"
        );
        if let Some(area) = self.device_area {
            assert_eq!(word(&self.ring.device), area, "the device area");
        }
        let stray = self.device.memory().take();
        assert!(
            stray.is_empty(),
            "memory accesses outside pop, add_used and serving: {stray:?}"
        );
    }
}

// --- seeds ---

/// An input's header: `size` (the queue size minus 1), feature bits, the start.
fn header(size: u16, bits: u8, start: Option<u16>) -> Seed {
    let s = Seed::new()
        .u8((size - 1) as u8)
        .u8(bits | if start.is_some() { 4 } else { 0 });
    match start {
        Some(v) => s.u16(v),
        None => s,
    }
}

/// A raw descriptor (`addr` an offset from the arena's base).
fn raw(s: Seed, d: Desc) -> Seed {
    s.bytes(&desc_bytes(d))
}

/// `ring` for the ring image's first slots, `ind` for the indirect area.
fn tables(s: Seed, ring: &[Desc], ind: &[Desc]) -> Seed {
    let mut s = s.u8(ring.len() as u8);
    for &d in ring {
        s = raw(s, d);
    }
    s = s.u8(ind.len() as u8);
    for &d in ind {
        s = raw(s, d);
    }
    s
}

fn offer(s: Seed, count: u8, id: u16, len: u16, addr: u16, bits: u8) -> Seed {
    s.u8(op::OFFER | ((count - 1) << 3))
        .u16(id)
        .u16(len)
        .u16(addr)
        .u8(bits)
}

fn pop(s: Seed, n: u8) -> Seed {
    s.u8(op::POP | ((n - 1) << 3))
}

/// `add_used` of held buffer number `index` with the bytes written.
fn complete_held(s: Seed, index: u16) -> Seed {
    s.u8(op::COMPLETE | (3 << 3)).u16(index).u32(0)
}

fn notify(s: Seed, mode: u8, desc: u16, flags: u16) -> Seed {
    s.u8(op::NOTIFY | (mode << 3)).u16(desc).u16(flags)
}

const D: u64 = DATA_OFFSET;
const I: u64 = INDIRECT_OFFSET;

/// The seed corpus: `(file name, input, a line its report must contain)`, well-formed
/// rings first, then one per hostile rule.
pub fn seeds() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let plain = || tables(header(8, 0, None), &[], &[]);
    let indirect = |ind: &[Desc]| tables(header(8, 1, None), &[], ind);
    let entry = |off: u64, len: u32, w: bool| (off, len, 0, if w { F_WRITE } else { 0 });
    // Four singles round a ring of 3 twice, completed out of order.
    let mut wrap = tables(header(3, 2, None), &[], &[]);
    for round in 0..2u16 {
        wrap = offer(wrap, 1, 0, 8, 0, 0);
        wrap = offer(wrap, 1, 1, 8, 1, 1);
        wrap = offer(wrap, 1, 2, 8, 2, 0);
        wrap = pop(wrap, 3);
        wrap = complete_held(wrap, 2 - round);
        wrap = complete_held(wrap, 0);
        wrap = complete_held(wrap, 0);
    }
    wrap = notify(wrap, 2, 0, EV_ENABLE);
    vec![
        (
            "single",
            pop(offer(plain(), 1, 0, 64, 0, 1), 1).0,
            "served 0 slots 1 wrap 1 segs 1+0",
        ),
        (
            "chained",
            pop(offer(plain(), 3, 5, 32, 4, 1), 1).0,
            "served 5 slots 3 wrap 1 segs 1+2",
        ),
        (
            "indirect",
            pop(
                offer(
                    indirect(&[
                        entry(D, 16, false),
                        entry(D + 16, 0, false),
                        entry(D + 32, 64, true),
                    ]),
                    1,
                    2,
                    48,
                    0,
                    0x80,
                ),
                1,
            )
            .0,
            "served 2 slots 1 wrap 1 segs 1+1",
        ),
        (
            "wrap-around-out-of-order",
            wrap.0,
            "served 0 slots 1 wrap 0 segs 0+1",
        ),
        (
            "out-of-order-completion",
            complete_held(
                complete_held(pop(offer(offer(plain(), 2, 1, 8, 0, 1), 1, 3, 8, 8, 0), 2), 1),
                0,
            )
            .0,
            "used 3 8 at 0",
        ),
        (
            "start-position",
            pop(
                offer(tables(header(4, 0, Some(0x0002)), &[], &[]), 3, 1, 8, 0, 3),
                1,
            )
            .0,
            "served 1 slots 3 wrap 0 segs 3+0",
        ),
        (
            "event-idx-notify",
            notify(
                complete_held(
                    pop(offer(tables(header(8, 2, None), &[], &[]), 1, 0, 8, 0, 0), 1),
                    0,
                ),
                2,
                0x8000,
                EV_DESC,
            )
            .0,
            "notify true",
        ),
        // HOSTILE 41: both flags set in lap 1 (used, not available).
        (
            "41-used-flags-not-available",
            pop(tables(header(4, 0, None), &[(D, 8, 0, F_AVAIL | F_USED)], &[]), 1).0,
            "empty",
        ),
        // HOSTILE 41: the driver's wrap counter lies (lap 0's bits in lap 1).
        (
            "41-lying-wrap-counter",
            pop(offer(plain(), 1, 0, 8, 0, 0x40), 1).0,
            "empty",
        ),
        // HOSTILE 42: an id made available again while held.
        (
            "42-id-reused-in-flight",
            pop(offer(offer(plain(), 1, 3, 8, 0, 0), 1, 3, 8, 1, 0), 2).0,
            "IdInFlight { id: 3 }",
        ),
        (
            "42-id-out-of-range",
            pop(offer(plain(), 1, 8, 8, 0, 0), 1).0,
            "HeadOutOfRange { head: 8, size: 8 }",
        ),
        // HOSTILE 43: NEXT on every slot of the ring.
        (
            "43-list-longer-than-ring",
            pop(
                tables(header(4, 0, None), &[(D, 8, 0, F_AVAIL | F_NEXT); 4], &[]),
                1,
            )
            .0,
            "ListOverrunsRing { room: 4 }",
        ),
        (
            "44-nested-indirect",
            pop(
                offer(
                    indirect(&[entry(D, 8, false), (I, 16, 0, F_INDIRECT)]),
                    1,
                    0,
                    32,
                    0,
                    0x80,
                ),
                1,
            )
            .0,
            "rejected 0 NestedIndirect",
        ),
        (
            "44-indirect-in-list",
            pop(
                tables(
                    header(8, 1, None),
                    &[(D, 8, 0, F_AVAIL | F_NEXT), (I, 16, 0, F_AVAIL | F_INDIRECT)],
                    &[entry(D, 8, false)],
                ),
                1,
            )
            .0,
            "rejected 0 IndirectInList",
        ),
        (
            "44-indirect-not-negotiated",
            pop(offer(plain(), 1, 0, 16, 0, 0x80), 1).0,
            "rejected 0 IndirectNotNegotiated",
        ),
        (
            "44-indirect-bad-length",
            pop(offer(indirect(&[]), 1, 0, 20, 0, 0x80), 1).0,
            "rejected 0 IndirectLength",
        ),
        (
            "2-readable-after-writable-rejected",
            pop(
                tables(
                    header(8, 0, None),
                    &[(D, 8, 0, F_AVAIL | F_NEXT | F_WRITE), (D + 8, 8, 0, F_AVAIL)],
                    &[],
                ),
                1,
            )
            .0,
            "rejected 0 ReadableAfterWritable",
        ),
        (
            "5-outside-the-arena",
            pop(tables(header(8, 0, None), &[(ARENA_SIZE, 8, 1, F_AVAIL)], &[]), 1).0,
            "rejected 1 Access",
        ),
        (
            "5-outside-the-arena-status-byte",
            pop(
                tables(
                    header(8, 8, None),
                    &[(ARENA_SIZE, 8, 1, F_AVAIL | F_NEXT), (D, 8, 1, F_AVAIL | F_WRITE)],
                    &[],
                ),
                1,
            )
            .0,
            "used 1 8 at 0",
        ),
        (
            "6-address-overflow",
            pop(
                tables(header(8, 0, None), &[(u64::MAX - ARENA_BASE, 8, 1, F_AVAIL)], &[]),
                1,
            )
            .0,
            "rejected 1 AddrOverflow",
        ),
        (
            "7-too-many-bytes",
            pop(
                tables(
                    header(130, 0, None),
                    &(0..129u16)
                        .map(|k| (D, 1 << 25, 0, F_AVAIL | if k < 128 { F_NEXT } else { 0 }))
                        .collect::<Vec<_>>(),
                    &[],
                ),
                1,
            )
            .0,
            "rejected 0 TooManyBytes",
        ),
        (
            "46-event-garbage",
            notify(
                complete_held(pop(offer(plain(), 1, 0, 8, 0, 0), 1), 0),
                3,
                0x7fff,
                0xbeef,
            )
            .0,
            "notify true",
        ),
        (
            "start-out-of-range",
            pop(tables(header(4, 0, Some(0x8004)), &[], &[]), 1).0,
            "StartOutOfRange { start: 32772, size: 4 }",
        ),
        (
            "used-misuse",
            pop(offer(plain(), 2, 1, 8, 0, 1), 1)
                .u8(op::COMPLETE)
                .u16(2)
                .u32(0)
                .u8(op::COMPLETE)
                .u16(1)
                .u32(9)
                .0,
            "refused TooLong { len: 9, writable: 8 }",
        ),
        (
            "device-area-scribbled",
            notify(
                pop(offer(plain(), 1, 0, 8, 0, 0), 1)
                    .u8(op::SCRIBBLE)
                    .u32(0xdead_beef),
                2,
                0,
                0,
            )
            .0,
            "pending false",
        ),
    ]
}
