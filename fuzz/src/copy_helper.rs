//! `copy_helper`: model 3's trusted copy helper (`transport_descriptors::copy`, its
//! ownership tracker and checked copies) serving a hostile device. The guest (the
//! harness) builds honest chains and makes them available; the device scribbles the
//! used ring and `used.idx`, tries to write its read-only ring views, reopens the
//! queue, and asks for copies naming any head, any descriptor slot, any offset and
//! length, in either direction (HOSTILE 31, 37).
//!
//! Input layout (missing bytes read as zero):
//!
//! 1. `chains: u8`: `chains % 4 + 1` chains, each `shape: u8` (bits 0-1: `+ 1`
//!    buffers; bit 2: behind one indirect descriptor; bit 3: the last buffer's
//!    address lies outside guest memory) and per buffer `len: u16` (`% 1024 + 1`;
//!    bit 15: device-writable). Direct chains take consecutive descriptors.
//! 2. operations until the input ends (at most 96), `op: u8` (`(op & 0x7f) % 9`, see
//!    [`report`]; bit 7 is a flag) and its operands.
//!
//! Invariants: never a panic; every copy or check succeeds exactly when the device
//! owns the head (made available and not yet returned through the used ring, which
//! is what the tracker mirrored here accounts, HOSTILE 31), the slot is in that
//! chain, the direction is the descriptor's and the range lies inside it; every
//! refusal is the typed [`CopyError`] the first failing rule calls for; reads return
//! the guest's bytes, writes land exactly in the descriptor; after the run every
//! byte of guest memory but the used ring equals the shadow (nothing outside the
//! allowed descriptors changed); the device's descriptor table and available ring
//! views refuse writes, and a closed queue's memory refuses everything.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hypervisor::{Domain, Hypervisor};
use transport_descriptors::copy::{CopyDevice, CopyError, CopyMemory, pair};
use virtio_core::ring::layout::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use virtio_core::{
    DescSlot, DeviceMemory, DeviceModel, DriverModel, DriverQueue, QueueAddrs, RingMemory, Segment,
};

use super::common::{Bytes, Seed};

const SIZE: u16 = 8;
const MEM: u64 = 64 << 10;
const MAX_OPS: usize = 96;

/// A descriptor as the guest wrote it.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
}

/// One chain: its head and every slot the helper must find in it.
#[derive(Debug)]
struct Chain {
    head: u16,
    slots: Vec<(DescSlot, Desc)>,
}

/// The tracker's ownership accounting, mirrored (see `copy/tracker.rs`): lazy
/// available-ring syncing, used entries applied on every call.
#[derive(Debug)]
struct Own {
    avail_pos: u16,
    used_pos: u16,
    owned: [u32; SIZE as usize],
}

impl Own {
    fn new() -> Own {
        Own {
            avail_pos: 0,
            used_pos: 0,
            owned: [0; SIZE as usize],
        }
    }

    fn sync_avail(&mut self, ring: &RingMemory) {
        let idx = ring.driver.load_u16(2, Ordering::Acquire).expect("avail.idx");
        let n = idx.wrapping_sub(self.avail_pos);
        if n == 0 || n > SIZE {
            return;
        }
        for k in 0..n {
            let pos = self.avail_pos.wrapping_add(k) % SIZE;
            let head = ring
                .driver
                .load_u16(4 + 2 * u64::from(pos), Ordering::Relaxed)
                .expect("avail ring");
            if let Some(c) = self.owned.get_mut(usize::from(head)) {
                *c = c.saturating_add(1);
            }
        }
        self.avail_pos = idx;
    }

    fn refresh_used(&mut self, ring: &RingMemory) {
        let idx = ring.device.load_u16(2, Ordering::Acquire).expect("used.idx");
        let n = idx.wrapping_sub(self.used_pos);
        if n > SIZE {
            self.sync_avail(ring);
            self.owned = [0; SIZE as usize];
        } else {
            for k in 0..n {
                let pos = self.used_pos.wrapping_add(k) % SIZE;
                let id = ring
                    .device
                    .load_u32(4 + 8 * u64::from(pos), Ordering::Relaxed)
                    .expect("used ring");
                if let Some(h) = usize::try_from(id).ok().filter(|&h| h < SIZE as usize) {
                    if self.owned[h] == 0 {
                        self.sync_avail(ring);
                    }
                    self.owned[h] = self.owned[h].saturating_sub(1);
                }
            }
        }
        self.used_pos = idx;
    }

    fn owns(&mut self, ring: &RingMemory, head: u16) -> bool {
        let h = usize::from(head);
        if h >= SIZE as usize {
            return false;
        }
        if self.owned[h] == 0 {
            self.sync_avail(ring);
        }
        self.owned[h] > 0
    }
}

/// The guest: its memory, the queue as the driver sees it, and the shadow.
struct Guest {
    domain: Arc<Domain>,
    queue: DriverQueue<transport_descriptors::DirectShare>,
    shadow: Vec<u8>,
    chains: Vec<Chain>,
    avail_idx: u16,
    /// Heads made available and not yet seen in the used ring by the driver.
    outstanding: [bool; SIZE as usize],
    driver_used: u16,
}

impl Guest {
    fn base(&self) -> u64 {
        self.domain.memory().base()
    }

    /// The guest writes its own memory (and the shadow).
    fn write(&mut self, gpa: u64, src: &[u8]) {
        self.domain.memory().write(gpa, src).expect("own memory");
        let at = (gpa - self.base()) as usize;
        self.shadow[at..at + src.len()].copy_from_slice(src);
    }

    fn write_desc(&mut self, gpa: u64, d: Desc, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        self.write(gpa, &raw);
    }

    /// Makes chain `c` available, as a driver that never has a head outstanding twice.
    fn make_available(&mut self, c: usize) -> bool {
        let head = self.chains[c].head;
        if self.outstanding[usize::from(head)] {
            return false;
        }
        self.outstanding[usize::from(head)] = true;
        let avail = self.queue.addrs.avail;
        let slot = u64::from(self.avail_idx % SIZE);
        self.write(avail + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write(avail + 2, &self.avail_idx.to_le_bytes());
        true
    }

    /// Reads new used elements as a driver would (at most a ring's worth), freeing
    /// the heads it has outstanding.
    fn pop_used(&mut self) -> u16 {
        let ring = &self.queue.ring;
        let idx = ring.device.load_u16(2, Ordering::Acquire).expect("used.idx");
        let n = idx.wrapping_sub(self.driver_used).min(SIZE);
        for k in 0..n {
            let pos = self.driver_used.wrapping_add(k) % SIZE;
            let id = ring
                .device
                .load_u32(4 + 8 * u64::from(pos), Ordering::Relaxed)
                .expect("used ring");
            if let Some(o) = self.outstanding.get_mut(id as usize) {
                *o = false;
            }
        }
        self.driver_used = idx;
        n
    }
}

/// What the helper must answer for `(head, slot)` in direction `write` with
/// `offset + len` (`None` for a check of the whole descriptor).
fn expect(
    own: &mut Own,
    guest: &Guest,
    head: u16,
    slot: DescSlot,
    write: bool,
    range: Option<(u32, usize)>,
) -> Result<u64, CopyError> {
    if !own.owns(&guest.queue.ring, head) {
        return Err(CopyError::NotOwned { head });
    }
    let d = guest
        .chains
        .iter()
        .find(|c| c.head == head)
        .and_then(|c| c.slots.iter().find(|(s, _)| *s == slot))
        .map(|(_, d)| *d)
        .ok_or(CopyError::NotInChain { head, slot })?;
    let indirect = d.flags & VIRTQ_DESC_F_INDIRECT != 0;
    let ok = if write {
        d.flags & VIRTQ_DESC_F_WRITE != 0 && !indirect
    } else {
        d.flags & VIRTQ_DESC_F_WRITE == 0 || (indirect && matches!(slot, DescSlot::Table(_)))
    };
    if !ok {
        return Err(CopyError::WrongDirection { slot, write });
    }
    let outside = CopyError::OutsideMemory {
        addr: d.addr,
        len: d.len,
    };
    let inside = guest
        .domain
        .memory()
        .offset_of(d.addr, u64::from(d.len))
        .is_some();
    match range {
        None => inside.then_some(d.addr).ok_or(outside),
        Some((offset, len)) => {
            if u64::from(offset) + len as u64 > u64::from(d.len) {
                return Err(CopyError::OutOfDescriptor {
                    offset,
                    len: len as u64,
                    desc_len: d.len,
                });
            }
            let gpa = d.addr + u64::from(offset);
            guest
                .domain
                .memory()
                .offset_of(gpa, len as u64)
                .map(|_| gpa)
                .ok_or(outside)
        }
    }
}

fn error(e: &virtio_core::AccessError) -> CopyError {
    *CopyError::of(e).unwrap_or_else(|| panic!("not a helper refusal: {e:?}"))
}

/// Runs one input; panics only when an invariant is broken.
pub fn run(data: &[u8]) {
    report(data);
}

/// [`run`], returning counts of copies that succeeded and the refusals by kind, for
/// the seed tests.
///
/// Operations (`(op & 0x7f) % 9`): 0 the guest makes `chain: u8` available; 1 the guest
/// reads the used ring; 2 the device writes used element `slot: u8` with `id: u32`;
/// 3 the device sets `used.idx` to `idx: u16` (bit 7 of the op: `idx % 4` past the
/// helper's position); 4 read, 5 write, 6 check (bit 7: for writing): `head: u8`, `slot: u8` (bit 7: in
/// the indirect table), `offset: u16`, `len: u16`, plus `addr: u64` of the segment
/// the device makes up (the helper must ignore it); 7 the device writes its
/// read-only ring views; 8 the device reopens the queue.
pub fn report(data: &[u8]) -> String {
    let hv = Hypervisor::new();
    let Ok(domain) = hv.create_domain("guest", MEM) else {
        return "no memory".into();
    };
    let Ok((driver, device)) = pair(&domain) else {
        return "no model".into();
    };
    let Ok(queue) = driver.create_queue(0, SIZE) else {
        return "no queue".into();
    };
    let mut shadow = vec![0u8; MEM as usize];
    domain
        .memory()
        .read(domain.memory().base(), &mut shadow)
        .expect("read");
    let mut guest = Guest {
        domain,
        queue,
        shadow,
        chains: Vec::new(),
        avail_idx: 0,
        outstanding: [false; SIZE as usize],
        driver_used: 0,
    };

    let mut input = Bytes(data);
    build_chains(&mut guest, &mut input);
    let addrs: QueueAddrs = guest.queue.addrs;
    let open = |device: &CopyDevice| device.open_queue(0, SIZE, addrs).expect("published queue opens");
    let mut dq = open(&device);
    let mut own = Own::new();
    let mut closed: Vec<CopyMemory> = Vec::new();

    let mut ok = 0u32;
    let mut refusals: Vec<&'static str> = Vec::new();
    let mut ops = 0;
    while !input.is_empty() && ops < MAX_OPS {
        ops += 1;
        let op = input.u8();
        let kind = (op & 0x7f) % 9;
        match kind {
            0 => {
                let c = usize::from(input.u8()) % guest.chains.len();
                guest.make_available(c);
            }
            1 => {
                guest.pop_used();
            }
            2 => {
                let slot = u64::from(input.u8() % SIZE as u8);
                let id = input.u32();
                let mut elem = [0u8; 8];
                elem[..4].copy_from_slice(&id.to_le_bytes());
                elem[4..].copy_from_slice(&(op as u32).to_le_bytes());
                dq.ring
                    .device
                    .write(4 + 8 * slot, &elem)
                    .expect("used ring is writable");
            }
            3 => {
                let v = input.u16();
                let idx = if op & 0x80 != 0 {
                    own.used_pos.wrapping_add(v % 4)
                } else {
                    v
                };
                dq.ring
                    .device
                    .write(2, &idx.to_le_bytes())
                    .expect("used ring is writable");
            }
            4..=6 => {
                let head = u16::from(input.u8());
                let s = input.u8();
                let slot = if s & 0x80 != 0 {
                    DescSlot::Indirect(u16::from(s & 0x7f))
                } else {
                    DescSlot::Table(u16::from(s))
                };
                let offset = u32::from(input.u16());
                let len = usize::from(input.u16() % 2048);
                let addr = input.u64();
                let write = kind == 5 || (kind == 6 && op & 0x80 != 0);
                let seg = Segment::new(addr, len as u32 + 1, write, head, slot);
                // Every helper call first accounts the used ring.
                own.refresh_used(&guest.queue.ring);
                let (result, want) = match kind {
                    4 => {
                        let want = expect(&mut own, &guest, head, slot, false, Some((offset, len)));
                        let mut buf = vec![0u8; len];
                        let r = dq.memory.read(&seg, offset, &mut buf);
                        if let (Ok(()), Ok(gpa)) = (&r, &want) {
                            let at = (gpa - guest.base()) as usize;
                            assert!(buf == guest.shadow[at..at + len], "read other bytes");
                        }
                        (r, want)
                    }
                    5 => {
                        let want = expect(&mut own, &guest, head, slot, true, Some((offset, len)));
                        let src: Vec<u8> = (0..len).map(|k| (k as u8) ^ op).collect();
                        let r = dq.memory.write(&seg, offset, &src);
                        if let (Ok(()), Ok(gpa)) = (&r, &want) {
                            let at = (gpa - guest.base()) as usize;
                            guest.shadow[at..at + len].copy_from_slice(&src);
                        }
                        (r, want)
                    }
                    _ => {
                        let want = expect(&mut own, &guest, head, slot, write, None);
                        (dq.memory.check(&seg), want)
                    }
                };
                match (result, want) {
                    (Ok(()), Ok(_)) => ok += 1,
                    (Err(e), Err(w)) => {
                        let e = error(&e);
                        assert_eq!(e, w, "refusal of {head}/{slot:?}");
                        refusals.push(match e {
                            CopyError::BadQueue(_) => "BadQueue",
                            CopyError::NotOwned { .. } => "NotOwned",
                            CopyError::NotInChain { .. } => "NotInChain",
                            CopyError::OutOfDescriptor { .. } => "OutOfDescriptor",
                            CopyError::WrongDirection { .. } => "WrongDirection",
                            CopyError::OutsideMemory { .. } => "OutsideMemory",
                        });
                    }
                    (r, w) => panic!("{head}/{slot:?} {offset}+{len}: helper {r:?}, expected {w:?}"),
                }
            }
            7 => {
                assert!(dq.ring.desc.write(0, &[op]).is_err(), "descriptor table written");
                assert!(dq.ring.driver.write(2, &[op]).is_err(), "available ring written");
            }
            _ => {
                // The old queue's memory and ring views stop working.
                let old = std::mem::replace(&mut dq, open(&device));
                own = Own::new();
                let seg = Segment::new(0, 1, false, 0, DescSlot::Table(0));
                let mut b = [0u8; 1];
                let e = old.memory.read(&seg, 0, &mut b).expect_err("closed queue served");
                assert_eq!(error(&e), CopyError::BadQueue(0));
                // Revoked: the old view reaches scratch pages, never the new ring
                // (which may sit on the same guest pages).
                assert!(old.ring.device.is_revoked(), "the old used ring is not revoked");
                let mut before = [0u8; 2];
                dq.ring
                    .device
                    .read(2, &mut before)
                    .expect("new used ring readable");
                let _ = old.ring.device.write(2, &[!before[0], !before[1]]);
                let mut after = [0u8; 2];
                dq.ring
                    .device
                    .read(2, &mut after)
                    .expect("new used ring readable");
                assert_eq!(before, after, "revoked used ring written");
                closed.push(old.memory);
            }
        }
    }

    // Nothing but the used ring changed behind the guest's back.
    let mut now = vec![0u8; MEM as usize];
    guest
        .domain
        .memory()
        .read(guest.base(), &mut now)
        .expect("read back");
    let used = (guest.queue.addrs.used - guest.base()) as usize;
    let used_end = used + 6 + 8 * usize::from(SIZE);
    for (i, (a, b)) in now.iter().zip(&guest.shadow).enumerate() {
        assert!(
            a == b || (used..used_end).contains(&i),
            "guest byte {i:#x} changed"
        );
    }
    drop(closed);
    refusals.sort_unstable();
    refusals.dedup();
    format!("{ok} ok, refused [{}]", refusals.join(", "))
}

/// Builds the chains the input describes into the descriptor table.
fn build_chains(guest: &mut Guest, input: &mut Bytes<'_>) {
    let n = usize::from(input.u8() % 4) + 1;
    let desc_gpa = guest.queue.addrs.desc;
    let mem = guest.domain.memory().clone();
    let mut next_desc: u16 = 0;
    for _ in 0..n {
        let shape = input.u8();
        let k = usize::from(shape & 3) + 1;
        let indirect = shape & 4 != 0;
        let mut bufs = Vec::with_capacity(k);
        for i in 0..k {
            let l = input.u16();
            let len = u32::from(l % 1024) + 1;
            let addr = if i + 1 == k && shape & 8 != 0 {
                mem.base() + MEM - 16
            } else {
                mem.alloc(u64::from(len), 8).expect("buffer memory")
            };
            let flags = if l & 0x8000 != 0 { VIRTQ_DESC_F_WRITE } else { 0 };
            bufs.push(Desc { addr, len, flags });
        }
        let head = next_desc;
        if next_desc + if indirect { 1 } else { k as u16 } > SIZE {
            break;
        }
        let mut slots = Vec::new();
        if indirect {
            let table = mem.alloc(16 * k as u64, 16).expect("table memory");
            for (j, d) in bufs.iter().enumerate() {
                let last = j + 1 == k;
                let flags = d.flags | if last { 0 } else { VIRTQ_DESC_F_NEXT };
                let d = Desc { flags, ..*d };
                guest.write_desc(table + 16 * j as u64, d, j as u16 + 1);
                slots.push((DescSlot::Indirect(j as u16), d));
            }
            let d = Desc {
                addr: table,
                len: 16 * k as u32,
                flags: VIRTQ_DESC_F_INDIRECT,
            };
            guest.write_desc(desc_gpa + 16 * u64::from(head), d, 0);
            slots.push((DescSlot::Table(head), d));
            next_desc += 1;
        } else {
            for (j, d) in bufs.iter().enumerate() {
                let last = j + 1 == k;
                let flags = d.flags | if last { 0 } else { VIRTQ_DESC_F_NEXT };
                let d = Desc { flags, ..*d };
                let i = head + j as u16;
                guest.write_desc(desc_gpa + 16 * u64::from(i), d, i + 1);
                slots.push((DescSlot::Table(i), d));
            }
            next_desc += k as u16;
        }
        // Fill the buffers with a pattern the reads must return.
        for (_, d) in &slots {
            if let Some(at) = mem.offset_of(d.addr, u64::from(d.len))
                && d.flags & VIRTQ_DESC_F_INDIRECT == 0
            {
                let fill: Vec<u8> = (0..d.len).map(|b| (b as u8) ^ (at as u8) ^ 0x5a).collect();
                guest.write(d.addr, &fill);
            }
        }
        guest.chains.push(Chain { head, slots });
    }
    if guest.chains.is_empty() {
        // At least one chain: a single readable byte.
        let addr = mem.alloc(1, 8).expect("buffer memory");
        let d = Desc {
            addr,
            len: 1,
            flags: 0,
        };
        guest.write_desc(desc_gpa, d, 0);
        guest.chains.push(Chain {
            head: 0,
            slots: vec![(DescSlot::Table(0), d)],
        });
    }
}

/// Appends an access: op, head, slot, offset, len (and a made-up address).
fn access(s: Seed, op: u8, head: u8, slot: u8, offset: u16, len: u16) -> Seed {
    s.u8(op).u8(head).u8(slot).u16(offset).u16(len).u64(0xdead_0000)
}

/// The seed corpus: `(name, input, text the report must contain)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    const AVAIL: u8 = 0;
    const POP: u8 = 1;
    const USED_ELEM: u8 = 2;
    const USED_IDX: u8 = 3;
    const READ: u8 = 4;
    const WRITE: u8 = 5;
    const CHECK: u8 = 6;
    const RING_WRITE: u8 = 7;
    const REOPEN: u8 = 8;
    // Chain 0: head 0 readable 16 bytes -> 1 writable 32 bytes; chain 1: head 2,
    // indirect with a readable 8-byte and a writable 64-byte buffer.
    let chains = || {
        Seed::new()
            .u8(1)
            .u8(1)
            .u16(15)
            .u16(0x8000 | 31)
            .u8(5)
            .u16(7)
            .u16(0x8000 | 63)
    };
    let both = || chains().u8(AVAIL).u8(0).u8(AVAIL).u8(1);
    vec![
        (
            "read-write-owned",
            access(access(both(), READ, 0, 0, 0, 16), WRITE, 0, 1, 4, 28).0,
            "2 ok, refused []",
        ),
        (
            "indirect-read-write",
            access(
                access(access(both(), READ, 2, 0x80, 0, 8), WRITE, 2, 0x81, 0, 64),
                READ,
                2,
                2,
                0,
                32,
            )
            .0,
            "3 ok, refused []",
        ),
        (
            "not-owned",
            access(chains(), READ, 0, 0, 0, 1).0,
            "0 ok, refused [NotOwned]",
        ),
        (
            "not-in-chain",
            access(access(both(), READ, 0, 2, 0, 1), READ, 2, 0x82, 0, 1).0,
            "0 ok, refused [NotInChain]",
        ),
        (
            "past-the-descriptor",
            access(both(), READ, 0, 0, 10, 7).0,
            "0 ok, refused [OutOfDescriptor]",
        ),
        (
            "write-readable-descriptor",
            access(access(both(), WRITE, 0, 0, 0, 1), WRITE, 2, 2, 0, 1).0,
            "0 ok, refused [WrongDirection]",
        ),
        (
            "returned-head-refused",
            access(
                both().u8(USED_ELEM).u8(0).u32(0).u8(USED_IDX | 0x80).u16(1),
                READ,
                0,
                0,
                0,
                1,
            )
            .0,
            "0 ok, refused [NotOwned]",
        ),
        (
            "used-idx-far-ahead-revokes",
            access(both().u8(USED_IDX).u16(100), READ, 2, 0x80, 0, 1).0,
            "0 ok, refused [NotOwned]",
        ),
        (
            "bogus-used-id-ignored",
            access(
                both().u8(USED_ELEM).u8(0).u32(0xffff).u8(USED_IDX | 0x80).u16(1),
                READ,
                0,
                0,
                0,
                1,
            )
            .0,
            "1 ok, refused []",
        ),
        (
            "readd-after-pop",
            access(
                both()
                    .u8(USED_ELEM)
                    .u8(0)
                    .u32(0)
                    .u8(USED_IDX | 0x80)
                    .u16(1)
                    .u8(POP)
                    .u8(AVAIL)
                    .u8(0),
                CHECK,
                0,
                0,
                0,
                0,
            )
            .0,
            "1 ok, refused []",
        ),
        (
            "guest-buffer-outside-memory",
            access(Seed::new().u8(0).u8(8).u16(31).u8(AVAIL).u8(0), READ, 0, 0, 20, 1).0,
            "0 ok, refused [OutsideMemory]",
        ),
        (
            "ring-views-and-reopen",
            access(both().u8(RING_WRITE).u8(REOPEN), READ, 0, 0, 0, 1).0,
            "1 ok, refused []",
        ),
    ]
}
