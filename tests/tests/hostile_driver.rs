//! docs/HOSTILE.md rules 1-12 against the device side of the split ring, driven by a raw
//! driver that writes whatever it likes, and rule 31 against the driver side, driven
//! by a raw device.
//!
//! Every rejected chain is checked for: the exact typed error, the head returned with
//! used length 0 (or, for ring faults, needs-reset and nothing returned), no byte of
//! guest memory touched outside the used ring, no descriptor memory read except an
//! indirect table the walk had to fetch, and the queue still serving a good chain
//! afterwards.
//!
//! `RingFault` is not re-exported from `virtio_core::ring::split` (it lives in the
//! private `device` module), so faults are compared through their `Debug` text.

use std::sync::Arc;

use virtio_core::access::{AccessError, DescSlot};
use virtio_core::features::Features;
use virtio_core::ring::layout::{
    Descriptor, SplitLayout, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use virtio_core::ring::split::{
    AddError, DeviceQueueError, DriverQueueError, RingFault, RingSetupError, UsedError,
};
use virtio_core::ring::{ChainError, INDIRECT_MAX};
use virtio_core::shm::RegionError;
use virtio_core::test_utils::raw::{Access, AccessKind, RawDriver, Recorder};
use virtio_core::test_utils::{Arena, IdentityShare};
use virtio_core::{GuestBuf, RingMemory, SplitDevice, SplitDriver};

const BASE: u64 = 0x10_0000;
const QSIZE: u16 = 8;
const NEXT: u16 = VIRTQ_DESC_F_NEXT;
const WRITE: u16 = VIRTQ_DESC_F_WRITE;
const INDIRECT: u16 = VIRTQ_DESC_F_INDIRECT;

fn all_features() -> Features {
    Features::VERSION_1 | Features::INDIRECT_DESC | Features::EVENT_IDX
}

/// One queue with a raw driver on one side and a recorded device on the other.
struct Rig {
    arena: Arc<Arena>,
    raw: RawDriver,
    dev: SplitDevice<Recorder<Arc<Arena>>>,
    /// Guest range of the used ring, the only memory a rejection may change.
    used: (u64, u64),
    /// 64 KiB for the test's buffers and tables.
    data: u64,
    /// Buffers of the known-good chain (request at `good`, reply at `good + 0x100`).
    good: u64,
}

impl Rig {
    fn new(size: u16, features: Features) -> Rig {
        Rig::in_arena(Arena::new(BASE, 1 << 20).unwrap(), size, features)
    }

    fn in_arena(arena: Arc<Arena>, size: u16, features: Features) -> Rig {
        let ((_, _, used), ring) = arena.alloc_split_ring(size).unwrap();
        let dev = SplitDevice::new(size, &ring, Recorder::new(arena.clone()), features).unwrap();
        let raw = RawDriver::new(arena.clone(), size, ring).unwrap();
        let data = arena.alloc(0x1_0000, 4096).unwrap();
        let good = arena.alloc(0x200, 16).unwrap();
        Rig {
            used: (used, SplitLayout { size }.used_bytes()),
            arena,
            raw,
            dev,
            data,
            good,
        }
    }

    fn size(&self) -> u16 {
        self.raw.size()
    }

    fn end(&self) -> u64 {
        self.arena.base() + self.arena.size()
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.arena.region().len()];
        self.arena.region().read(0, &mut v).unwrap();
        v
    }

    /// Guest addresses that changed since `before`, outside the used ring and `allowed`.
    fn changed_outside(&self, before: &[u8], allowed: &[(u64, u64)]) -> Vec<u64> {
        let now = self.snapshot();
        let ok = |gpa: u64| {
            std::iter::once(self.used)
                .chain(allowed.iter().copied())
                .any(|(start, len)| gpa >= start && gpa < start + len)
        };
        (0..now.len())
            .filter(|&i| now[i] != before[i])
            .map(|i| BASE + i as u64)
            .filter(|&gpa| !ok(gpa))
            .collect()
    }

    fn accesses(&self) -> Vec<Access> {
        self.dev.memory().take()
    }

    /// Pops, expects the chain at `head` rejected and returned with length 0, with no
    /// memory changed but the used ring and no descriptor memory read except
    /// `table_read`. Returns the rule it broke.
    fn expect_bad(&mut self, head: u16, table_read: Option<(u64, u64)>) -> ChainError {
        let before = self.snapshot();
        self.accesses();
        let err = self.dev.pop().expect_err("chain must be rejected");
        let source = match err {
            DeviceQueueError::BadChain { head: h, source } => {
                assert_eq!(h, head, "rejected head");
                source
            }
            other => panic!("expected BadChain at head {head}, got {other:?}"),
        };
        assert_eq!(
            self.raw.read_used(),
            vec![(u32::from(head), 0)],
            "head returned with length 0"
        );
        assert_eq!(
            self.changed_outside(&before, &[]),
            Vec::<u64>::new(),
            "memory changed"
        );
        assert_no_data_access(&self.accesses(), table_read);
        assert_eq!(self.dev.in_flight(), 0);
        assert_eq!(self.dev.add_used(head, 0), Err(UsedError::NotInFlight(head)));
        source
    }

    /// Makes a two-descriptor chain at the last two table entries available, serves it
    /// and checks the driver got it back with the right length and bytes.
    fn serve_good_chain(&mut self) {
        self.accesses();
        let (a, b) = (self.size() - 2, self.size() - 1);
        let (req, reply) = (self.good, self.good + 0x100);
        self.arena.write(req, b"ping").unwrap();
        self.arena.write(reply, &[0; 4]).unwrap();
        self.raw.write_desc(a, req, 4, NEXT, b);
        self.raw.write_desc(b, reply, 4, WRITE, 0);
        self.raw.push_avail(a);
        let chain = self.dev.pop().expect("good chain").expect("good chain available");
        assert_eq!(chain.head(), a);
        let mut buf = [0u8; 4];
        chain.reader(self.dev.memory()).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        let mut w = chain.writer(self.dev.memory());
        w.write_all(b"pong").unwrap();
        let written = w.written();
        self.dev.add_used(a, written).unwrap();
        assert_eq!(self.raw.read_used(), vec![(u32::from(a), 4)]);
        let mut got = [0u8; 4];
        self.arena.read(reply, &mut got).unwrap();
        assert_eq!(&got, b"pong");
        for acc in self.accesses() {
            assert!(acc.ok, "{acc:?}");
            match acc.kind {
                AccessKind::Read => assert!(acc.within(req, 4), "{acc:?}"),
                AccessKind::Write => assert!(acc.within(reply, 4), "{acc:?}"),
                _ => {}
            }
        }
        assert_eq!(self.dev.pop().unwrap().map(|c| c.head()), None, "ring drained");
    }
}

/// No descriptor memory written, none read except `table` (an indirect table), and
/// every successful check inside the arena's guest range.
fn assert_no_data_access(log: &[Access], table: Option<(u64, u64)>) {
    for a in log {
        match a.kind {
            AccessKind::Write => panic!("rejection touched memory: {a:?}"),
            AccessKind::Read => {
                let (start, len) = table.unwrap_or_else(|| panic!("unexpected read: {a:?}"));
                assert!(a.within(start, len), "read outside the indirect table: {a:?}");
            }
            AccessKind::Check => {}
        }
    }
}

/// Pops and expects needs-reset with fault `want`, sticky, with
/// nothing returned to the driver and no memory touched.
fn expect_needs_reset(rig: &mut Rig, want: RingFault) {
    let before = rig.snapshot();
    rig.accesses();
    let err = rig.dev.pop().expect_err("needs reset");
    assert!(
        matches!(err, DeviceQueueError::NeedsReset(f) if f == want),
        "{err:?}"
    );
    let again = rig.dev.pop().expect_err("needs-reset is sticky");
    assert!(
        matches!(again, DeviceQueueError::NeedsReset(f) if f == want),
        "{again:?}"
    );
    assert_eq!(rig.dev.fault(), Some(want));
    assert_eq!(rig.raw.read_used(), vec![], "nothing returned");
    assert_eq!(rig.changed_outside(&before, &[]), Vec::<u64>::new());
    assert_eq!(rig.snapshot(), before, "used ring untouched too");
    assert_eq!(rig.accesses(), vec![], "no descriptor memory reached");
}

/// The rest of the device keeps working: a second queue in the same memory serves.
fn other_queue_still_serves(rig: &Rig) {
    let mut other = Rig::in_arena(rig.arena.clone(), QSIZE, all_features());
    other.serve_good_chain();
}

// --- rule 1: loops -------------------------------------------------------------------

#[test]
fn rule01_descriptor_loop_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    let d = rig.data;
    rig.raw.write_desc(0, d, 16, NEXT, 1);
    rig.raw.write_desc(1, d + 16, 16, NEXT, 0);
    rig.raw.push_avail(0);
    let e = rig.expect_bad(0, None);
    assert!(matches!(e, ChainError::TooLong { limit: QSIZE }), "{e:?}");
    rig.serve_good_chain();
}

#[test]
fn rule01_descriptor_loop_in_indirect_table_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    let (buf, table) = (rig.data, rig.data + 0x1000);
    let t = [
        Descriptor::new(buf, 8, NEXT, 1),
        Descriptor::new(buf + 8, 8, NEXT, 2),
        Descriptor::new(buf + 16, 8, NEXT, 1),
        Descriptor::new(buf + 24, 8, 0, 0),
    ];
    rig.raw.write_indirect_table(table, &t).unwrap();
    rig.raw.write_desc(0, table, 64, INDIRECT, 0);
    rig.raw.push_avail(0);
    let e = rig.expect_bad(0, Some((table, 64)));
    assert!(matches!(e, ChainError::TooLong { limit: 4 }), "{e:?}");
    rig.serve_good_chain();
}

// --- rule 2: length and `next` -------------------------------------------------------

#[test]
fn rule02_chain_longer_than_queue_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    // 0 -> 1 -> ... -> 7 -> 0: the ninth step exceeds the queue size.
    for i in 0..QSIZE {
        rig.raw
            .write_desc(i, rig.data + 16 * u64::from(i), 16, NEXT, (i + 1) % QSIZE);
    }
    rig.raw.push_avail(0);
    let e = rig.expect_bad(0, None);
    assert!(matches!(e, ChainError::TooLong { limit: QSIZE }), "{e:?}");
    rig.serve_good_chain();
}

#[test]
fn rule02_chain_of_exactly_queue_size_is_served() {
    let mut rig = Rig::new(QSIZE, all_features());
    for i in 0..QSIZE {
        let flags = if i + 1 < QSIZE { NEXT } else { 0 };
        rig.raw
            .write_desc(i, rig.data + 16 * u64::from(i), 16, flags, i + 1);
    }
    rig.raw.push_avail(0);
    let chain = rig.dev.pop().unwrap().unwrap();
    assert_eq!((chain.readable().len(), chain.readable_len()), (8, 128));
    rig.dev.add_used(0, 0).unwrap();
    assert_eq!(rig.raw.read_used(), vec![(0, 0)]);
    rig.serve_good_chain();
}

#[test]
fn rule02_indirect_table_longer_than_queue_is_served() {
    // Linux sizes indirect tables by `seg_max`, not by the queue size; QEMU serves
    // them, and so must we (a blk device on a 128-entry queue met 147-entry tables).
    let mut rig = Rig::new(QSIZE, all_features());
    let table = rig.data + 0x1000;
    let n = 2 * QSIZE + 1;
    let t: Vec<Descriptor> = (0..n)
        .map(|i| {
            Descriptor::new(
                rig.data + 16 * u64::from(i),
                16,
                if i + 1 < n { NEXT } else { 0 },
                i + 1,
            )
        })
        .collect();
    rig.raw.write_indirect_table(table, &t).unwrap();
    rig.raw.write_desc(0, table, u32::from(n) * 16, INDIRECT, 0);
    rig.raw.push_avail(0);
    let chain = rig.dev.pop().unwrap().unwrap();
    assert_eq!(
        (chain.readable().len(), chain.readable_len()),
        (usize::from(n), 16 * u32::from(n))
    );
    rig.dev.add_used(0, 0).unwrap();
    assert_eq!(rig.raw.read_used(), vec![(0, 0)]);
    rig.serve_good_chain();
}

#[test]
fn rule02_indirect_table_past_the_fixed_limit_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    let table = rig.data + 0x1000;
    let n = INDIRECT_MAX + 1;
    let t: Vec<Descriptor> = (0..n)
        .map(|i| Descriptor::new(rig.data, 16, if i + 1 < n { NEXT } else { 0 }, i + 1))
        .collect();
    rig.raw.write_indirect_table(table, &t).unwrap();
    rig.raw.write_desc(0, table, u32::from(n) * 16, INDIRECT, 0);
    rig.raw.push_avail(0);
    let e = rig.expect_bad(0, None);
    assert!(
        matches!(
            e,
            ChainError::IndirectTooLarge {
                entries: 1025,
                limit: INDIRECT_MAX
            }
        ),
        "{e:?}"
    );
    rig.serve_good_chain();
}

#[test]
fn rule02_direct_plus_indirect_longer_than_the_limit_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    // Seven direct descriptors, then an indirect table that brings the chain one past
    // `max(queue size, INDIRECT_MAX)`.
    for i in 0..QSIZE - 1 {
        rig.raw
            .write_desc(i, rig.data + 16 * u64::from(i), 16, NEXT, i + 1);
    }
    let table = rig.data + 0x1000;
    let n = INDIRECT_MAX - (QSIZE - 1) + 1;
    let t: Vec<Descriptor> = (0..n)
        .map(|i| {
            Descriptor::new(
                rig.data + 0x200,
                16,
                WRITE | if i + 1 < n { NEXT } else { 0 },
                i + 1,
            )
        })
        .collect();
    rig.raw.write_indirect_table(table, &t).unwrap();
    rig.raw
        .write_desc(QSIZE - 1, table, u32::from(n) * 16, INDIRECT, 0);
    rig.raw.push_avail(0);
    let e = rig.expect_bad(0, Some((table, u64::from(n) * 16)));
    assert!(matches!(e, ChainError::TooLong { limit: INDIRECT_MAX }), "{e:?}");
}

#[test]
fn rule02_next_out_of_range_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    rig.raw.write_desc(0, rig.data, 16, NEXT, 1);
    rig.raw.write_desc(1, rig.data + 16, 16, NEXT, QSIZE);
    rig.raw.push_avail(0);
    let e = rig.expect_bad(0, None);
    assert!(
        matches!(
            e,
            ChainError::NextOutOfRange {
                index: 1,
                next: QSIZE,
                size: QSIZE
            }
        ),
        "{e:?}"
    );
    rig.serve_good_chain();
}

#[test]
fn rule02_next_out_of_range_in_indirect_table_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    let table = rig.data + 0x1000;
    rig.raw
        .write_indirect_table(
            table,
            &[
                Descriptor::new(rig.data, 8, NEXT, 1),
                Descriptor::new(rig.data, 8, NEXT, 2),
            ],
        )
        .unwrap();
    rig.raw.write_desc(0, table, 32, INDIRECT, 0);
    rig.raw.push_avail(0);
    let e = rig.expect_bad(0, Some((table, 32)));
    assert!(
        matches!(
            e,
            ChainError::NextOutOfRange {
                index: 1,
                next: 2,
                size: 2
            }
        ),
        "{e:?}"
    );
    rig.serve_good_chain();
}

#[test]
fn rule02_avail_head_out_of_range_needs_reset() {
    let mut rig = Rig::new(QSIZE, all_features());
    rig.serve_good_chain();
    rig.raw.push_avail(QSIZE);
    expect_needs_reset(&mut rig, RingFault::HeadOutOfRange { head: 8, size: 8 });
    other_queue_still_serves(&rig);
}

// --- rule 3: indirect tables ---------------------------------------------------------

/// Makes descriptor 0 an indirect descriptor `(addr, len, flags)` and pops it.
fn indirect_head(rig: &mut Rig, addr: u64, len: u32, flags: u16) {
    rig.raw.write_desc(0, addr, len, flags, 1);
    rig.raw.write_desc(1, rig.data, 16, 0, 0);
    rig.raw.push_avail(0);
}

#[test]
fn rule03_nested_indirect_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    let (outer, inner) = (rig.data + 0x1000, rig.data + 0x2000);
    rig.raw
        .write_indirect_table(inner, &[Descriptor::new(rig.data, 16, 0, 0)])
        .unwrap();
    rig.raw
        .write_indirect_table(
            outer,
            &[
                Descriptor::new(rig.data, 16, NEXT, 1),
                Descriptor::new(inner, 16, INDIRECT, 0),
            ],
        )
        .unwrap();
    indirect_head(&mut rig, outer, 32, INDIRECT);
    let e = rig.expect_bad(0, Some((outer, 32)));
    assert!(matches!(e, ChainError::NestedIndirect), "{e:?}");
    rig.serve_good_chain();
}

#[test]
fn rule03_indirect_with_next_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    let table = rig.data + 0x1000;
    rig.raw
        .write_indirect_table(table, &[Descriptor::new(rig.data, 16, 0, 0)])
        .unwrap();
    indirect_head(&mut rig, table, 16, INDIRECT | NEXT);
    let e = rig.expect_bad(0, None);
    assert!(matches!(e, ChainError::IndirectWithNext), "{e:?}");
    rig.serve_good_chain();
}

#[test]
fn rule03_indirect_length_zero_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    let table = rig.data + 0x1000;
    indirect_head(&mut rig, table, 0, INDIRECT);
    let e = rig.expect_bad(0, None);
    assert!(matches!(e, ChainError::IndirectLength(0)), "{e:?}");
    rig.serve_good_chain();
}

#[test]
fn rule03_indirect_length_not_multiple_of_16_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    let table = rig.data + 0x1000;
    indirect_head(&mut rig, table, 24, INDIRECT);
    let e = rig.expect_bad(0, None);
    assert!(matches!(e, ChainError::IndirectLength(24)), "{e:?}");
    rig.serve_good_chain();
}

#[test]
fn rule03_indirect_length_huge_is_rejected_without_reading() {
    let mut rig = Rig::new(QSIZE, all_features());
    let table = rig.data + 0x1000;
    indirect_head(&mut rig, table, 0xffff_fff0, INDIRECT);
    let e = rig.expect_bad(0, None);
    assert!(
        matches!(
            e,
            ChainError::IndirectTooLarge {
                entries: 0x0fff_ffff,
                limit: INDIRECT_MAX
            }
        ),
        "{e:?}"
    );
    rig.serve_good_chain();
}

#[test]
fn rule03_indirect_not_negotiated_is_rejected() {
    let mut rig = Rig::new(QSIZE, Features::VERSION_1);
    let table = rig.data + 0x1000;
    rig.raw
        .write_indirect_table(table, &[Descriptor::new(rig.data, 16, 0, 0)])
        .unwrap();
    indirect_head(&mut rig, table, 16, INDIRECT);
    let e = rig.expect_bad(0, None);
    assert!(matches!(e, ChainError::IndirectNotNegotiated), "{e:?}");
    rig.serve_good_chain();
}

#[test]
fn rule03_indirect_table_outside_memory_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    let end = rig.end();
    // Straddling the end of the arena, then wholly outside it, then wrapping.
    indirect_head(&mut rig, end - 16, 32, INDIRECT);
    let e = rig.expect_bad(0, None);
    assert!(
        matches!(e, ChainError::Access(AccessError::OutOfBounds { addr, len: 32 }) if addr == end - 16),
        "{e:?}"
    );
    indirect_head(&mut rig, 0x1000, 16, INDIRECT);
    let e = rig.expect_bad(0, None);
    assert!(
        matches!(
            e,
            ChainError::Access(AccessError::OutOfBounds {
                addr: 0x1000,
                len: 16
            })
        ),
        "{e:?}"
    );
    indirect_head(&mut rig, u64::MAX - 15, 32, INDIRECT);
    let e = rig.expect_bad(0, None);
    assert!(
        matches!(e, ChainError::AddrOverflow { addr, len: 32 } if addr == u64::MAX - 15),
        "{e:?}"
    );
    rig.serve_good_chain();
}

// --- rule 4: direct then indirect ----------------------------------------------------

#[test]
fn rule04_direct_descriptors_then_one_indirect_are_served() {
    let mut rig = Rig::new(QSIZE, all_features());
    let (hdr, body, reply, table) = (rig.data, rig.data + 0x100, rig.data + 0x200, rig.data + 0x1000);
    rig.arena.write(hdr, b"head").unwrap();
    rig.arena.write(body, b"body").unwrap();
    rig.raw
        .write_indirect_table(
            table,
            &[
                Descriptor::new(body, 4, NEXT, 1),
                Descriptor::new(reply, 6, WRITE, 0),
            ],
        )
        .unwrap();
    rig.raw.write_desc(0, hdr, 4, NEXT, 3);
    rig.raw.write_desc(3, table, 32, INDIRECT, 0);
    rig.raw.push_avail(0);
    let before = rig.snapshot();
    let chain = rig.dev.pop().unwrap().unwrap();
    let slots: Vec<DescSlot> = chain
        .readable()
        .iter()
        .chain(chain.writable())
        .map(|s| s.slot())
        .collect();
    assert_eq!(
        slots,
        [DescSlot::Table(0), DescSlot::Indirect(0), DescSlot::Indirect(1)]
    );
    assert_eq!((chain.readable_len(), chain.writable_len()), (8, 6));
    let mut buf = [0u8; 8];
    chain.reader(rig.dev.memory()).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"headbody");
    let mut w = chain.writer(rig.dev.memory());
    w.write_all(b"done!!").unwrap();
    rig.dev.add_used(0, w.written()).unwrap();
    assert_eq!(rig.raw.read_used(), vec![(0, 6)]);
    assert_eq!(rig.changed_outside(&before, &[(reply, 6)]), Vec::<u64>::new());
    rig.serve_good_chain();
}

// --- rule 5: ranges ------------------------------------------------------------------

#[test]
fn rule05_addr_plus_len_overflow_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    rig.raw.write_desc(0, u64::MAX - 3, 16, 0, 0);
    rig.raw.push_avail(0);
    let e = rig.expect_bad(0, None);
    assert!(
        matches!(e, ChainError::AddrOverflow { addr, len: 16 } if addr == u64::MAX - 3),
        "{e:?}"
    );
    rig.serve_good_chain();
}

#[test]
fn rule05_range_ending_one_past_the_arena_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    let end = rig.end();
    rig.raw.write_desc(0, end - 15, 16, WRITE, 0);
    rig.raw.push_avail(0);
    let e = rig.expect_bad(0, None);
    assert!(
        matches!(e, ChainError::Access(AccessError::OutOfBounds { addr, len: 16 }) if addr == end - 15),
        "{e:?}"
    );
    // The last 16 bytes exactly are fine.
    rig.raw.write_desc(0, end - 16, 16, WRITE, 0);
    rig.raw.push_avail(0);
    let chain = rig.dev.pop().unwrap().unwrap();
    assert_eq!(chain.writable_len(), 16);
    rig.dev.add_used(0, 0).unwrap();
    assert_eq!(rig.raw.read_used(), vec![(0, 0)]);
    rig.serve_good_chain();
}

#[test]
fn rule05_range_starting_before_the_arena_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    rig.raw.write_desc(0, rig.data, 16, NEXT, 1);
    rig.raw.write_desc(1, BASE - 1, 16, 0, 0);
    rig.raw.push_avail(0);
    let e = rig.expect_bad(0, None);
    assert!(
        matches!(e, ChainError::Access(AccessError::OutOfBounds { addr, len: 16 }) if addr == BASE - 1),
        "{e:?}"
    );
    rig.serve_good_chain();
}

// --- rule 6: zero-length descriptors -------------------------------------------------

#[test]
fn rule06_zero_length_descriptors_are_skipped() {
    let mut rig = Rig::new(QSIZE, all_features());
    let d = rig.data;
    // Zero-length descriptors with absurd addresses are not ranges at all.
    rig.raw.write_desc(0, u64::MAX, 0, NEXT, 1);
    rig.raw.write_desc(1, d, 4, NEXT, 2);
    rig.raw.write_desc(2, 0, 0, WRITE | NEXT, 3);
    rig.raw.write_desc(3, d + 4, 4, WRITE, 0);
    rig.raw.push_avail(0);
    let chain = rig.dev.pop().unwrap().unwrap();
    let slots: Vec<DescSlot> = chain
        .readable()
        .iter()
        .chain(chain.writable())
        .map(|s| s.slot())
        .collect();
    assert_eq!(slots, [DescSlot::Table(1), DescSlot::Table(3)]);
    assert_eq!((chain.readable_len(), chain.writable_len()), (4, 4));
    rig.dev.add_used(0, 4).unwrap();
    assert_eq!(rig.raw.read_used(), vec![(0, 4)]);
    rig.serve_good_chain();
}

#[test]
fn rule06_chain_of_only_zero_length_descriptors_is_served_empty() {
    let mut rig = Rig::new(QSIZE, all_features());
    rig.raw.write_desc(0, 0, 0, NEXT, 1);
    rig.raw.write_desc(1, 0, 0, NEXT, 2);
    rig.raw.write_desc(2, 0, 0, WRITE, 0);
    rig.raw.push_avail(0);
    rig.accesses();
    let chain = rig.dev.pop().unwrap().unwrap();
    assert!(chain.readable().is_empty() && chain.writable().is_empty());
    assert_eq!((chain.readable_len(), chain.writable_len()), (0, 0));
    assert_eq!(rig.accesses(), vec![], "nothing to check for empty descriptors");
    assert_eq!(
        rig.dev.add_used(0, 1),
        Err(UsedError::TooLong { len: 1, writable: 0 })
    );
    rig.dev.add_used(0, 0).unwrap();
    assert_eq!(rig.raw.read_used(), vec![(0, 0)]);
    rig.serve_good_chain();
}

#[test]
fn rule06_loop_of_zero_length_descriptors_terminates() {
    let mut rig = Rig::new(QSIZE, all_features());
    rig.raw.write_desc(0, 0, 0, NEXT, 1);
    rig.raw.write_desc(1, 0, 0, NEXT, 0);
    rig.raw.push_avail(0);
    let e = rig.expect_bad(0, None);
    assert!(matches!(e, ChainError::TooLong { limit: QSIZE }), "{e:?}");
    // The same inside an indirect table.
    let table = rig.data + 0x1000;
    rig.raw
        .write_indirect_table(
            table,
            &[Descriptor::new(0, 0, NEXT, 1), Descriptor::new(0, 0, NEXT, 0)],
        )
        .unwrap();
    rig.raw.write_desc(0, table, 32, INDIRECT, 0);
    rig.raw.push_avail(0);
    let e = rig.expect_bad(0, Some((table, 32)));
    assert!(matches!(e, ChainError::TooLong { limit: 2 }), "{e:?}");
    rig.serve_good_chain();
}

// --- direction order -----------------------------------------------------------------

#[test]
fn readable_after_writable_is_rejected() {
    let mut rig = Rig::new(QSIZE, all_features());
    rig.raw.write_desc(0, rig.data, 16, WRITE | NEXT, 1);
    rig.raw.write_desc(1, rig.data + 16, 16, 0, 0);
    rig.raw.push_avail(0);
    let e = rig.expect_bad(0, None);
    assert!(matches!(e, ChainError::ReadableAfterWritable), "{e:?}");
    // Also across the step into an indirect table.
    let table = rig.data + 0x1000;
    rig.raw
        .write_indirect_table(table, &[Descriptor::new(rig.data + 32, 16, 0, 0)])
        .unwrap();
    rig.raw.write_desc(0, rig.data, 16, WRITE | NEXT, 1);
    rig.raw.write_desc(1, table, 16, INDIRECT, 0);
    rig.raw.push_avail(0);
    let e = rig.expect_bad(0, Some((table, 16)));
    assert!(matches!(e, ChainError::ReadableAfterWritable), "{e:?}");
    rig.serve_good_chain();
}

// --- rule 7: 2^32 bytes --------------------------------------------------------------

/// A queue of 256 whose descriptors all cover one 16 MiB buffer: 256 of them reach
/// 2^32 bytes while every single range is inside the arena and nothing is read.
fn four_gib_rig(last_len: u32) -> (Rig, u64) {
    const SEG: u32 = 1 << 24;
    let arena = Arena::new(BASE, (1 << 24) + (1 << 20)).unwrap();
    let mut rig = Rig::in_arena(arena, 256, all_features());
    let buf = rig.arena.alloc(u64::from(SEG), 4096).unwrap();
    for i in 0..=255u16 {
        let (len, flags) = if i < 255 { (SEG, NEXT) } else { (last_len, WRITE) };
        // Readable halves then writable halves, so both totals count.
        let flags = if i >= 128 { flags | WRITE } else { flags };
        rig.raw.write_desc(i, buf, len, flags, i.wrapping_add(1));
    }
    rig.raw.push_avail(0);
    (rig, buf)
}

#[test]
fn rule07_chain_of_4_gib_is_rejected_before_touching_memory() {
    let (mut rig, buf) = four_gib_rig(1 << 24);
    rig.accesses();
    let err = rig.dev.pop().expect_err("2^32 bytes");
    assert!(
        matches!(
            err,
            DeviceQueueError::BadChain {
                head: 0,
                source: ChainError::TooManyBytes
            }
        ),
        "{err:?}"
    );
    let log = rig.accesses();
    assert_eq!(
        log.len(),
        255,
        "one range check per accepted descriptor, none for the last"
    );
    assert_no_data_access(&log, None);
    assert!(log.iter().all(|a| a.ok && a.within(buf, 1 << 24)));
    assert_eq!(rig.raw.read_used(), vec![(0, 0)]);
    // Make room for the good chain at 254/255, then carry on.
    rig.serve_good_chain();
}

/// Bytes of descriptors the sharing model refuses count toward the 2^32 total too,
/// readable as well as writable: a chain that breaks rule 7 is rejected for that
/// (nothing written into it, whatever status a blk device would leave) even if an
/// earlier descriptor also names memory the model refuses. Found by the
/// `packed_walk` fuzz target (corpus input `crash-refused-readable-bytes-uncounted`).
#[test]
fn rule07_refused_readable_bytes_count_toward_the_total() {
    let mut rig = Rig::new(QSIZE, all_features());
    let outside = rig.end() + 0x1000;
    rig.raw.write_desc(0, outside, u32::MAX, NEXT, 1);
    rig.raw.write_desc(1, rig.data, 2, WRITE, 0);
    rig.raw.push_avail(0);
    let e = rig.expect_bad(0, None);
    assert!(matches!(e, ChainError::TooManyBytes), "{e:?}");
    rig.serve_good_chain();
}

#[test]
fn rule07_chain_just_below_4_gib_is_served() {
    let (mut rig, _) = four_gib_rig((1 << 24) - 1);
    let chain = rig.dev.pop().unwrap().unwrap();
    assert_eq!(
        u64::from(chain.readable_len()) + u64::from(chain.writable_len()),
        (1 << 32) - 1
    );
    assert_eq!(chain.readable_len(), 1 << 31);
    assert_eq!(
        rig.dev.add_used(0, u32::MAX),
        Err(UsedError::TooLong {
            len: u32::MAX,
            writable: (1 << 31) - 1
        })
    );
    rig.dev.add_used(0, (1 << 31) - 1).unwrap();
    assert_eq!(rig.raw.read_used(), vec![(0, (1 << 31) - 1)]);
    rig.serve_good_chain();
}

// --- rule 8: avail.idx -----------------------------------------------------------------

#[test]
fn rule08_avail_idx_too_far_ahead_needs_reset() {
    let mut rig = Rig::new(QSIZE, all_features());
    rig.serve_good_chain();
    rig.raw.set_avail_idx(1 + QSIZE + 1);
    let err = rig.dev.pop().expect_err("too far ahead");
    assert!(matches!(err, DeviceQueueError::NeedsReset(_)), "{err:?}");
    assert!(
        rig.dev
            .pop()
            .is_err_and(|e| matches!(e, DeviceQueueError::NeedsReset(_))),
        "sticky"
    );
    assert_eq!(rig.raw.read_used(), vec![], "no head served");
    other_queue_still_serves(&rig);
}

#[test]

fn rule08_avail_idx_too_far_ahead_reports_avail_too_far_ahead() {
    let mut rig = Rig::new(QSIZE, all_features());
    rig.serve_good_chain();
    rig.raw.set_avail_idx(1 + QSIZE + 1);
    expect_needs_reset(
        &mut rig,
        RingFault::AvailTooFarAhead {
            idx: 10,
            last: 1,
            ahead: 9,
        },
    );
}

#[test]
fn rule08_avail_idx_too_far_ahead_seen_by_enable_notifications() {
    let mut rig = Rig::new(QSIZE, all_features());
    rig.raw.write_desc(0, rig.data, 16, WRITE, 0);
    rig.raw.write_desc(1, rig.data + 16, 16, WRITE, 0);
    rig.raw.push_avail(0);
    rig.raw.push_avail(1);
    let chain = rig.dev.pop().unwrap().unwrap();
    // One head still pending; the driver now claims nine more than the device took.
    rig.raw.set_avail_idx(1 + QSIZE + 1);
    assert!(
        rig.dev.enable_notifications(),
        "a latched fault asks the caller to pop"
    );
    expect_needs_reset(
        &mut rig,
        RingFault::AvailTooFarAhead {
            idx: 10,
            last: 1,
            ahead: 9,
        },
    );
    // Chains already held can still be returned.
    rig.dev.add_used(chain.head(), 0).unwrap();
    assert_eq!(rig.raw.read_used(), vec![(0, 0)]);
}

#[test]
fn rule08_avail_idx_one_queue_ahead_is_legal() {
    let mut rig = Rig::new(QSIZE, all_features());
    // A full ring of eight single-descriptor chains: exactly `size` ahead.
    for i in 0..QSIZE {
        rig.raw.write_desc(i, rig.data + 16 * u64::from(i), 16, WRITE, 0);
        rig.raw.push_avail(i);
    }
    for i in 0..QSIZE {
        assert_eq!(rig.dev.pop().unwrap().unwrap().head(), i);
    }
    assert!(rig.dev.pop().unwrap().is_none());
    for i in 0..QSIZE {
        rig.dev.add_used(i, 16).unwrap();
    }
    assert_eq!(rig.raw.read_used().len(), usize::from(QSIZE));
    rig.serve_good_chain();
}

#[test]
fn rule08_avail_idx_going_back_needs_reset() {
    let mut rig = Rig::new(QSIZE, all_features());
    rig.serve_good_chain();
    rig.serve_good_chain();
    rig.raw.set_avail_idx(1);
    expect_needs_reset(&mut rig, RingFault::AvailWentBack { seen: 2, idx: 1 });
    other_queue_still_serves(&rig);
}

#[test]
fn rule08_avail_idx_near_16_bit_wrap_is_served_then_checked() {
    let mut rig = Rig::new(QSIZE, all_features());
    // Walk both free-running indices up to just below the wrap.
    for _ in 0..u32::from(u16::MAX) - 3 {
        rig.serve_good_chain();
    }
    assert_eq!((rig.raw.avail_idx(), rig.raw.used_idx()), (65532, 65532));
    // A batch across the wrap: positions 65532..=65535, 0..=3.
    for i in 0..QSIZE {
        rig.raw.write_desc(i, rig.data + 16 * u64::from(i), 16, WRITE, 0);
        rig.raw.put_avail(i);
    }
    rig.raw.publish_avail();
    assert_eq!(rig.raw.avail_idx(), 4);
    for i in 0..QSIZE {
        let chain = rig.dev.pop().unwrap().unwrap();
        assert_eq!(chain.head(), i);
        rig.dev.add_used(i, 1).unwrap();
    }
    assert!(rig.dev.pop().unwrap().is_none());
    let used = rig.raw.read_used();
    assert_eq!(used, (0..8).map(|i| (i, 1)).collect::<Vec<_>>());
    assert_eq!(rig.raw.used_idx(), 4);
    rig.serve_good_chain();
    // Now at 5: a jump of size + 1 across nothing, then detected.
    rig.raw.set_avail_idx(5 + QSIZE + 1);
    let err = rig.dev.pop().expect_err("too far ahead after the wrap");
    assert!(matches!(err, DeviceQueueError::NeedsReset(_)), "{err:?}");
}

// --- rule 9: the same head twice -----------------------------------------------------

#[test]
fn rule09_same_head_twice_is_served_once() {
    let mut rig = Rig::new(QSIZE, all_features());
    rig.raw.write_desc(0, rig.data, 16, WRITE, 0);
    rig.raw.push_avail(0);
    rig.raw.push_avail(0);
    let chain = rig.dev.pop().unwrap().unwrap();
    assert_eq!(chain.head(), 0);
    rig.accesses();
    let err = rig.dev.pop().expect_err("duplicate");
    assert!(matches!(err, DeviceQueueError::DuplicateHead(0)), "{err:?}");
    assert_eq!(rig.accesses(), vec![], "the duplicate is not walked");
    assert!(rig.dev.pop().unwrap().is_none());
    assert_eq!(rig.raw.read_used(), vec![], "the duplicate is not returned");
    assert_eq!(rig.dev.in_flight(), 1);
    rig.dev.add_used(0, 16).unwrap();
    assert_eq!(rig.raw.read_used(), vec![(0, 16)], "served exactly once");
    rig.serve_good_chain();
}

// --- rule 10: driver scribbling on the used ring -------------------------------------

#[test]
fn rule10_driver_scribbling_on_used_ring_is_ignored() {
    let mut rig = Rig::new(QSIZE, all_features());
    rig.serve_good_chain();
    rig.raw.set_used_idx(0x1234);
    rig.raw.set_used_flags(0xffff);
    rig.raw.set_used_event(0x8000);
    rig.raw.write_used_elem(1, 0xdead, 0xbeef);
    // The device neither reads nor trusts any of it.
    let _ = rig.dev.needs_notification();
    rig.dev.disable_notifications();
    assert!(!rig.dev.enable_notifications());
    rig.raw.write_desc(0, rig.data, 16, WRITE, 0);
    rig.raw.push_avail(0);
    let chain = rig.dev.pop().unwrap().unwrap();
    rig.dev.add_used(chain.head(), 3).unwrap();
    assert_eq!(
        rig.raw.used_idx(),
        2,
        "device's private used index, not the scribble"
    );
    assert_eq!(rig.raw.used_elem(1), (0, 3));
    // Scribble again, lower than the device's index this time.
    rig.raw.set_used_idx(0);
    rig.raw.set_used_flags(0x55);
    rig.raw.write_desc(6, rig.good, 4, NEXT, 7);
    rig.raw.write_desc(7, rig.good + 0x100, 4, WRITE, 0);
    rig.raw.push_avail(6);
    let chain = rig.dev.pop().unwrap().unwrap();
    assert_eq!(chain.head(), 6);
    rig.dev.add_used(6, 4).unwrap();
    assert_eq!((rig.raw.used_idx(), rig.raw.used_elem(2)), (3, (6, 4)));
}

// --- rule 11: queue setup ------------------------------------------------------------

#[test]
fn rule11_bad_queue_sizes_and_misaligned_rings_are_refused() {
    let arena = Arena::new(BASE, 1 << 20).unwrap();
    let ((desc, _, used), ring) = arena.alloc_split_ring(8).unwrap();
    for size in [0, 3, 100, u16::MAX] {
        let r = SplitDevice::new(size, &ring, arena.clone(), all_features());
        assert!(matches!(r, Err(RingSetupError::BadSize(s)) if s == size));
    }
    let l = SplitLayout { size: 8 };
    let misaligned = RingMemory {
        desc: arena.guest_region(desc + 4, l.desc_bytes()).unwrap(),
        ..ring.clone()
    };
    let r = SplitDevice::new(8, &misaligned, arena.clone(), all_features());
    assert!(
        matches!(
            r,
            Err(RingSetupError::Area {
                area: "descriptor table",
                source: RegionError::Misaligned { .. }
            })
        ),
        "{:?}",
        r.err()
    );
    let short = RingMemory {
        device: arena.guest_region(used, l.used_bytes() - 1).unwrap(),
        ..ring.clone()
    };
    let r = SplitDevice::new(8, &short, arena.clone(), all_features());
    assert!(
        matches!(
            r,
            Err(RingSetupError::Area {
                area: "used ring",
                source: RegionError::OutOfBounds { .. }
            })
        ),
        "{:?}",
        r.err()
    );
    let read_only_used = RingMemory {
        device: ring.device.read_only(),
        ..ring.clone()
    };
    let r = SplitDevice::new(8, &read_only_used, arena.clone(), all_features());
    assert!(
        matches!(r, Err(RingSetupError::NotWritable("used ring"))),
        "{:?}",
        r.err()
    );
}

// --- rule 12: double fetch -----------------------------------------------------------

#[test]
fn rule12_descriptor_changed_after_pop_does_not_change_the_chain() {
    let mut rig = Rig::new(QSIZE, all_features());
    let (req, reply, decoy) = (rig.data, rig.data + 0x100, rig.data + 0x800);
    rig.arena.write(req, b"orig").unwrap();
    rig.arena.write(decoy, b"EVIL").unwrap();
    rig.raw.write_desc(0, req, 4, NEXT, 1);
    rig.raw.write_desc(1, reply, 4, WRITE, 0);
    rig.raw.push_avail(0);
    let chain = rig.dev.pop().unwrap().unwrap();
    let segs: Vec<_> = chain.readable().iter().chain(chain.writable()).copied().collect();
    // The driver now points both descriptors at the decoy and makes them huge.
    rig.raw.write_desc(0, decoy, 0x1000, WRITE | NEXT, 1);
    rig.raw.write_desc(1, decoy, 0x1000, 0, 0);
    let after: Vec<_> = chain.readable().iter().chain(chain.writable()).copied().collect();
    assert_eq!(segs, after);
    assert_eq!(
        (segs[0].addr(), segs[0].len(), segs[1].addr(), segs[1].len()),
        (req, 4, reply, 4)
    );
    let before = rig.snapshot();
    let mut buf = [0u8; 4];
    chain.reader(rig.dev.memory()).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"orig");
    chain.writer(rig.dev.memory()).write_all(b"safe").unwrap();
    assert_eq!(
        rig.changed_outside(&before, &[(reply, 4)]),
        Vec::<u64>::new(),
        "decoy untouched"
    );
    rig.dev.add_used(0, 4).unwrap();
    assert_eq!(rig.raw.read_used(), vec![(0, 4)]);
    rig.serve_good_chain();
}

#[test]
fn rule12_indirect_table_changed_after_pop_does_not_change_the_chain() {
    let mut rig = Rig::new(QSIZE, all_features());
    let (req, reply, decoy, table) = (rig.data, rig.data + 0x100, rig.data + 0x800, rig.data + 0x1000);
    rig.arena.write(req, b"orig").unwrap();
    rig.raw
        .write_indirect_table(
            table,
            &[
                Descriptor::new(req, 4, NEXT, 1),
                Descriptor::new(reply, 4, WRITE, 0),
            ],
        )
        .unwrap();
    rig.raw.write_desc(0, table, 32, INDIRECT, 0);
    rig.raw.push_avail(0);
    let chain = rig.dev.pop().unwrap().unwrap();
    rig.raw
        .write_indirect_table(
            table,
            &[
                Descriptor::new(decoy, 64, WRITE, 0),
                Descriptor::new(decoy, 64, 0, 0),
            ],
        )
        .unwrap();
    rig.raw.write_desc(0, decoy, 16, 0, 0);
    let before = rig.snapshot();
    let mut buf = [0u8; 4];
    chain.reader(rig.dev.memory()).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"orig");
    chain.writer(rig.dev.memory()).write_all(b"safe").unwrap();
    assert_eq!(rig.changed_outside(&before, &[(reply, 4)]), Vec::<u64>::new());
    rig.dev.add_used(0, 4).unwrap();
    rig.raw.read_used();
    rig.serve_good_chain();
}

// --- add_used misuse -----------------------------------------------------------------

#[test]
fn add_used_misuse_is_refused() {
    let mut rig = Rig::new(QSIZE, all_features());
    assert_eq!(rig.dev.add_used(3, 0), Err(UsedError::NotInFlight(3)));
    assert_eq!(rig.dev.add_used(100, 0), Err(UsedError::NotInFlight(100)));
    rig.raw.write_desc(0, rig.data, 4, NEXT, 1);
    rig.raw.write_desc(1, rig.data + 4, 4, WRITE, 0);
    rig.raw.push_avail(0);
    let chain = rig.dev.pop().unwrap().unwrap();
    assert_eq!(
        rig.dev.add_used(chain.head(), 5),
        Err(UsedError::TooLong { len: 5, writable: 4 })
    );
    assert_eq!(
        rig.dev.add_used(1, 0),
        Err(UsedError::NotInFlight(1)),
        "not a head"
    );
    assert_eq!(rig.raw.read_used(), vec![], "refusals publish nothing");
    rig.dev.add_used(0, 4).unwrap();
    assert_eq!(
        rig.dev.add_used(0, 4),
        Err(UsedError::NotInFlight(0)),
        "returned twice"
    );
    assert_eq!(rig.raw.read_used(), vec![(0, 4)]);
    rig.serve_good_chain();
}

// --- rule 31: a hostile device against the real driver ----------------------------------

/// A real driver with `n` outstanding requests (one reply buffer of 16 bytes each)
/// and a raw writer over its used ring.
struct DriverRig {
    arena: Arc<Arena>,
    ring: RingMemory,
    driver: SplitDriver<IdentityShare, u32>,
    raw: RawDriver,
}

fn driver_rig(n: u32) -> DriverRig {
    let arena = Arena::new(BASE, 1 << 20).unwrap();
    let (_, ring) = arena.alloc_split_ring(QSIZE).unwrap();
    let share = IdentityShare::new(arena.clone(), QSIZE);
    let mut driver = SplitDriver::new(QSIZE, ring.clone(), share, all_features()).unwrap();
    for token in 0..n {
        let req = arena.alloc(4, 4).unwrap();
        let reply = arena.alloc(16, 4).unwrap();
        driver
            .add(&[GuestBuf::new(req, 4)], &[GuestBuf::new(reply, 16)], token)
            .unwrap();
    }
    let raw = RawDriver::new(arena.clone(), QSIZE, ring.clone()).unwrap();
    DriverRig {
        arena,
        ring,
        driver,
        raw,
    }
}

/// After a detected fault: the driver stays broken until reset, and reset hands back
/// every outstanding token with every buffer retired; then the queue works again.
fn broken_then_reset(mut r: DriverRig, outstanding: &[u32]) {
    assert!(r.driver.is_broken());
    assert_eq!(
        r.driver.pop_used().map(|u| u.map(|u| u.token)),
        Err(DriverQueueError::Broken)
    );
    let rejected = r
        .driver
        .add(&[GuestBuf::new(r.arena.base(), 1)], &[], 99)
        .unwrap_err();
    assert!(
        matches!(rejected.error, AddError::Broken) && rejected.token == 99,
        "{rejected:?}"
    );
    let mut tokens = r.driver.reset();
    tokens.sort_unstable();
    assert_eq!(tokens, outstanding);
    assert_eq!(r.driver.share().live, 0, "every exposed buffer retired");
    assert!(!r.driver.is_broken());
    assert_eq!((r.driver.outstanding(), r.driver.num_free()), (0, QSIZE));
    // A fresh device (the reset one) serves a new request.
    let mut dev = SplitDevice::new(QSIZE, &r.ring, r.arena.clone(), all_features()).unwrap();
    let reply = r.arena.alloc(8, 8).unwrap();
    r.driver.add(&[], &[GuestBuf::new(reply, 8)], 7).unwrap();
    let chain = dev.pop().unwrap().unwrap();
    dev.add_used(chain.head(), 8).unwrap();
    let used = r.driver.pop_used().unwrap().unwrap();
    assert_eq!((used.token, used.len), (7, 8));
}

#[test]
fn rule31_used_id_not_outstanding_breaks_the_driver() {
    let r = driver_rig(2);
    // Outstanding heads are 0 and 1 (one descriptor each thanks to INDIRECT_DESC).
    r.raw.write_used_elem(0, 5, 0);
    r.raw.set_used_idx(1);
    let mut r = r;
    assert_eq!(
        r.driver.pop_used().map(|u| u.map(|u| u.token)),
        Err(DriverQueueError::UnknownId(5))
    );
    broken_then_reset(r, &[0, 1]);
}

#[test]
fn rule31_used_id_beyond_the_queue_breaks_the_driver() {
    let mut r = driver_rig(1);
    r.raw.write_used_elem(0, u32::MAX, 0);
    r.raw.set_used_idx(1);
    assert_eq!(
        r.driver.pop_used().map(|u| u.map(|u| u.token)),
        Err(DriverQueueError::UnknownId(u32::MAX))
    );
    broken_then_reset(r, &[0]);
}

#[test]
fn rule31_used_id_returned_twice_breaks_the_driver() {
    let mut r = driver_rig(2);
    r.raw.write_used_elem(0, 0, 16);
    r.raw.write_used_elem(1, 0, 16);
    r.raw.set_used_idx(2);
    let first = r.driver.pop_used().unwrap().unwrap();
    assert_eq!((first.token, first.len), (0, 16));
    assert_eq!(
        r.driver.pop_used().map(|u| u.map(|u| u.token)),
        Err(DriverQueueError::UnknownId(0))
    );
    broken_then_reset(r, &[1]);
}

#[test]
fn rule31_used_len_above_writable_breaks_the_driver() {
    let mut r = driver_rig(1);
    r.raw.write_used_elem(0, 0, 17);
    r.raw.set_used_idx(1);
    assert_eq!(
        r.driver.pop_used().map(|u| u.map(|u| u.token)),
        Err(DriverQueueError::LengthTooLarge {
            head: 0,
            len: 17,
            writable: 16
        })
    );
    broken_then_reset(r, &[0]);
}

#[test]
fn rule31_used_idx_jumping_ahead_breaks_the_driver() {
    let mut r = driver_rig(2);
    r.raw.write_used_elem(0, 0, 0);
    r.raw.write_used_elem(1, 1, 0);
    r.raw.set_used_idx(3);
    assert_eq!(
        r.driver.pop_used().map(|u| u.map(|u| u.token)),
        Err(DriverQueueError::UsedTooFarAhead {
            idx: 3,
            last: 0,
            ahead: 3,
            outstanding: 2
        })
    );
    broken_then_reset(r, &[0, 1]);
}
