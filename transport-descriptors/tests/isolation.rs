//! What a hostile device or a buggy driver can do under models 2 and 3, and what
//! happens: every attempt is refused with a typed error, and afterwards the queue keeps
//! working and the guest's data is unchanged.

// Test patterns truncate indices to bytes on purpose.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::{RawQueue, pattern};
use hypervisor::{Domain, Hypervisor};
use std::sync::Arc;
use transport_descriptors::{CopyError, CopyHelper, CopyMemory, DirectMemory, copy, direct};
use virtio_core::features::Features;
use virtio_core::ring::chain::ChainError;
use virtio_core::ring::layout::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use virtio_core::ring::split::DeviceQueueError;
use virtio_core::shm::RegionError;
use virtio_core::{
    AccessError, DescSlot, DeviceMemory, DeviceModel, DriverModel, ModelError, QueueAddrs, ReadOp, Segment,
    SplitDevice, WriteOp,
};

const SIZE: u16 = 8;
const FEATURES: Features = Features::VERSION_1.union(Features::INDIRECT_DESC);

fn guest() -> Arc<Domain> {
    Hypervisor::new().create_domain("guest", 1 << 20).unwrap()
}

/// Writes `data` into a fresh guest buffer.
fn buffer(g: &Domain, data: &[u8]) -> u64 {
    let a = g.memory().alloc(data.len() as u64, 16).unwrap();
    g.memory().write(a, data).unwrap();
    a
}

fn peek(g: &Domain, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    g.memory().read(addr, &mut v).unwrap();
    v
}

// ---------------------------------------------------------------- model 2

fn direct_rig(g: &Arc<Domain>) -> (RawQueue, SplitDevice<DirectMemory>, direct::DirectDevice) {
    let (d, v) = direct::pair(g).unwrap();
    let q = d.create_queue(0, SIZE).unwrap();
    let dq = v.open_queue(0, SIZE, q.addrs).unwrap();
    let dev = SplitDevice::new(SIZE, &dq.ring, dq.memory, FEATURES).unwrap();
    (RawQueue::new(q.ring, SIZE), dev, v)
}

/// Serves a one-descriptor readable chain at head 0 and checks its bytes.
fn still_serves<M: DeviceMemory>(raw: &mut RawQueue, dev: &mut SplitDevice<M>, g: &Domain) {
    let data = pattern(100, 42);
    let buf = buffer(g, &data);
    raw.desc(0, buf, 100, 0, 0);
    raw.publish(0);
    let c = dev.pop().unwrap().unwrap();
    let mut got = vec![0u8; 100];
    c.reader(dev.memory()).read_exact(&mut got).unwrap();
    assert_eq!(got, data);
    dev.add_used(0, 0).unwrap();
    assert_eq!(raw.take_used(), vec![(0, 0)]);
}

#[test]
fn direct_refuses_descriptors_outside_guest_memory() {
    let g = guest();
    let (mut raw, mut dev, v) = direct_rig(&g);
    let (base, end) = (v.base(), v.base() + v.size());
    let secret = buffer(&g, b"secret");
    let table = buffer(&g, &[0u8; 32]);
    let bad: [(u64, u32, u16); 7] = [
        (base - 16, 16, 0),                         // below memory
        (end - 8, 16, 0),                           // ends past memory
        (end, 1, VIRTQ_DESC_F_WRITE),               // one past the end
        (u64::MAX - 4, 16, 0),                      // addr + len overflows
        (0x1000, 8, VIRTQ_DESC_F_WRITE),            // low address, no memory there
        (end - 16, 32, VIRTQ_DESC_F_INDIRECT),      // indirect table past memory
        (u64::MAX - 15, 32, VIRTQ_DESC_F_INDIRECT), // indirect table overflowing
    ];
    for (addr, len, flags) in bad {
        raw.desc(0, addr, len, flags, 0);
        raw.publish(0);
        match dev.pop() {
            Err(DeviceQueueError::BadChain { head: 0, source }) => assert!(
                matches!(
                    source,
                    ChainError::Access(AccessError::OutOfBounds { .. }) | ChainError::AddrOverflow { .. }
                ),
                "{addr:#x}+{len}: {source:?}"
            ),
            other => panic!("{addr:#x}+{len} accepted: {other:?}"),
        }
        assert_eq!(raw.take_used(), vec![(0, 0)], "returned with length 0");
        still_serves(&mut raw, &mut dev, &g);
    }
    // A good descriptor followed by a bad one: the whole chain is refused before any
    // access, so the good buffer is untouched.
    raw.desc(0, secret, 6, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
    raw.desc(1, end - 1, 2, VIRTQ_DESC_F_WRITE, 0);
    raw.publish(0);
    assert!(matches!(dev.pop(), Err(DeviceQueueError::BadChain { .. })));
    assert_eq!(raw.take_used(), vec![(0, 0)]);
    // An indirect table whose entries point outside memory.
    let mut t = [0u8; 32];
    t[..8].copy_from_slice(&(end - 4).to_le_bytes());
    t[8..12].copy_from_slice(&8u32.to_le_bytes());
    g.memory().write(table, &t).unwrap();
    raw.desc(2, table, 16, VIRTQ_DESC_F_INDIRECT, 0);
    raw.publish(2);
    assert!(matches!(
        dev.pop(),
        Err(DeviceQueueError::BadChain { head: 2, .. })
    ));
    assert_eq!(raw.take_used(), vec![(2, 0)]);
    still_serves(&mut raw, &mut dev, &g);
    assert_eq!(peek(&g, secret, 6), b"secret");
    // A forged segment handed straight to the memory is checked too.
    let forged = Segment::new(end - 2, 4, true, 0, DescSlot::Table(0));
    assert!(matches!(
        dev.memory().write(&forged, 0, b"xx"),
        Err(AccessError::OutOfBounds { .. })
    ));
}

#[test]
fn direct_open_queue_checks_addresses() {
    let g = guest();
    let (d, v) = direct::pair(&g).unwrap();
    let q = d.create_queue(0, SIZE).unwrap();
    let a = q.addrs;
    let bad = [
        QueueAddrs {
            desc: a.desc + 8,
            ..a
        }, // misaligned
        QueueAddrs {
            avail: a.avail + 1,
            ..a
        }, // misaligned
        QueueAddrs {
            used: a.used + 2,
            ..a
        }, // misaligned
        QueueAddrs {
            used: v.base() + v.size() - 16,
            ..a
        }, // past memory
        QueueAddrs { desc: 0, ..a }, // outside memory
        QueueAddrs {
            avail: a.desc + 16,
            ..a
        }, // overlaps the table
        QueueAddrs {
            used: u64::MAX - 3,
            ..a
        }, // wraps
    ];
    for addrs in bad {
        assert!(
            matches!(v.open_queue(0, SIZE, addrs), Err(ModelError::BadAddrs(_))),
            "{addrs:x?}"
        );
    }
    for size in [0, 3, 100] {
        assert!(matches!(v.open_queue(0, size, a), Err(ModelError::BadSize(s)) if s == size));
    }
    assert!(v.open_queue(0, SIZE, a).is_ok());
}

// ---------------------------------------------------------------- model 3

struct CopyRig {
    g: Arc<Domain>,
    raw: RawQueue,
    dev: SplitDevice<CopyMemory>,
    ring: virtio_core::RingMemory,
    helper: Arc<CopyHelper>,
    model: copy::CopyDevice,
    addrs: QueueAddrs,
}

fn copy_rig() -> CopyRig {
    let g = guest();
    let (d, v) = copy::pair(&g).unwrap();
    let q = d.create_queue(0, SIZE).unwrap();
    let dq = v.open_queue(0, SIZE, q.addrs).unwrap();
    let ring = dq.ring.clone();
    let dev = SplitDevice::new(SIZE, &dq.ring, dq.memory, FEATURES).unwrap();
    CopyRig {
        g,
        raw: RawQueue::new(q.ring, SIZE),
        dev,
        ring,
        helper: v.helper().clone(),
        model: v,
        addrs: q.addrs,
    }
}

fn seg(head: u16, slot: DescSlot, writable: bool) -> Segment {
    // The address and length a device passes are ignored by the helper: it uses the
    // trusted descriptor. Pass nonsense to prove it.
    Segment::new(0xdead_0000, 4096, writable, head, slot)
}

/// The helper's refusal of a one-op read.
fn read_err(h: &CopyHelper, queue: u16, s: Segment, offset: u32, len: usize) -> CopyError {
    let mut buf = vec![0u8; len];
    h.read(
        queue,
        &mut [ReadOp {
            seg: s,
            offset,
            dst: &mut buf,
        }],
    )
    .unwrap_err()
}

fn write_err(h: &CopyHelper, s: Segment, offset: u32, src: &[u8]) -> CopyError {
    h.write(0, &[WriteOp { seg: s, offset, src }]).unwrap_err()
}

#[test]
fn copy_refuses_chains_not_owned() {
    let mut r = copy_rig();
    let data = pattern(64, 1);
    let buf = buffer(&r.g, &data);
    r.raw.desc(0, buf, 64, 0, 0);
    // Written but not yet made available.
    let e = read_err(&r.helper, 0, seg(0, DescSlot::Table(0), false), 0, 8);
    assert_eq!(e, CopyError::NotOwned { head: 0 });
    let mut b = [0u8; 8];
    let ae = r
        .dev
        .memory()
        .read(&seg(0, DescSlot::Table(0), false), 0, &mut b)
        .unwrap_err();
    assert_eq!(CopyError::of(&ae), Some(&CopyError::NotOwned { head: 0 }));

    // Made available: served, bytes intact.
    r.raw.publish(0);
    let c = r.dev.pop().unwrap().unwrap();
    let mut got = vec![0u8; 64];
    c.reader(r.dev.memory()).read_exact(&mut got).unwrap();
    assert_eq!(got, data);

    // Used: refused again, immediately (the helper checks used.idx on every call).
    r.dev.add_used(0, 0).unwrap();
    let e = read_err(&r.helper, 0, c.readable()[0], 0, 8);
    assert_eq!(e, CopyError::NotOwned { head: 0 });
    assert_eq!(r.raw.take_used(), vec![(0, 0)]);
    still_serves(&mut r.raw, &mut r.dev, &r.g);
    assert_eq!(peek(&r.g, buf, 64), data);
}

#[test]
fn copy_refuses_descriptors_outside_the_named_chain_or_range() {
    let mut r = copy_rig();
    let a = buffer(&r.g, &pattern(32, 2));
    let b = buffer(&r.g, &pattern(32, 3));
    let w = buffer(&r.g, &[0u8; 16]);
    // Chain at 0: readable a -> writable w. Chain at 1: readable b.
    r.raw.desc(0, a, 32, VIRTQ_DESC_F_NEXT, 2);
    r.raw.desc(2, w, 16, VIRTQ_DESC_F_WRITE, 0);
    r.raw.desc(1, b, 32, 0, 0);
    r.raw.publish(0);
    r.raw.publish(1);
    let c0 = r.dev.pop().unwrap().unwrap();
    let c1 = r.dev.pop().unwrap().unwrap();
    let h = &r.helper;

    // Descriptor 1 is owned (via head 1) but not in chain 0.
    assert_eq!(
        read_err(h, 0, seg(0, DescSlot::Table(1), false), 0, 4),
        CopyError::NotInChain {
            head: 0,
            slot: DescSlot::Table(1)
        }
    );
    assert!(matches!(
        read_err(h, 0, seg(0, DescSlot::Indirect(0), false), 0, 4),
        CopyError::NotInChain { .. }
    ));
    // Ranges past the descriptor.
    for (offset, len) in [(0, 33), (32, 1), (31, 2), (u32::MAX, 1)] {
        assert!(
            matches!(
                read_err(h, 0, seg(0, DescSlot::Table(0), false), offset, len),
                CopyError::OutOfDescriptor { desc_len: 32, .. }
            ),
            "{offset}+{len}"
        );
    }
    assert!(matches!(
        write_err(h, seg(0, DescSlot::Table(2), true), 10, &[0; 7]),
        CopyError::OutOfDescriptor { desc_len: 16, .. }
    ));
    // Wrong direction: writing a device-readable descriptor, reading a writable one
    // (even if the device claims otherwise in its segment).
    assert_eq!(
        write_err(h, seg(0, DescSlot::Table(0), true), 0, b"x"),
        CopyError::WrongDirection {
            slot: DescSlot::Table(0),
            write: true
        }
    );
    assert_eq!(
        read_err(h, 0, seg(0, DescSlot::Table(2), true), 0, 1),
        CopyError::WrongDirection {
            slot: DescSlot::Table(2),
            write: false
        }
    );
    let ae = r.dev.memory().write(&c1.readable()[0], 0, b"x").unwrap_err();
    assert!(matches!(
        CopyError::of(&ae),
        Some(CopyError::WrongDirection { write: true, .. })
    ));
    // A queue that is not open, or not even a queue.
    for q in [1, 7, CopyHelper::MAX_QUEUES, u16::MAX] {
        assert_eq!(
            read_err(h, q, seg(0, DescSlot::Table(0), false), 0, 1),
            CopyError::BadQueue(q)
        );
    }
    // A batch stops at the first refusal; the copies before it are done.
    let (mut x, mut y) = ([0u8; 4], [0u8; 4]);
    let mut ops = [
        ReadOp {
            seg: c0.readable()[0],
            offset: 0,
            dst: &mut x,
        },
        ReadOp {
            seg: seg(1, DescSlot::Table(0), false),
            offset: 0,
            dst: &mut y,
        },
    ];
    assert!(matches!(
        h.read(0, &mut ops),
        Err(CopyError::NotInChain { head: 1, .. })
    ));
    assert_eq!(x.to_vec(), pattern(4, 2));
    assert_eq!(y, [0; 4]);

    // Nothing changed: both chains are still served correctly.
    assert_eq!(peek(&r.g, a, 32), pattern(32, 2));
    assert_eq!(peek(&r.g, b, 32), pattern(32, 3));
    assert_eq!(peek(&r.g, w, 16), [0u8; 16]);
    let mut got = vec![0u8; 32];
    c0.reader(r.dev.memory()).read_exact(&mut got).unwrap();
    assert_eq!(got, pattern(32, 2));
    c0.writer(r.dev.memory()).write_all(b"reply").unwrap();
    c1.reader(r.dev.memory()).read_exact(&mut got).unwrap();
    assert_eq!(got, pattern(32, 3));
    r.dev.add_used(0, 5).unwrap();
    r.dev.add_used(1, 0).unwrap();
    assert_eq!(r.raw.take_used(), vec![(0, 5), (1, 0)]);
    assert_eq!(&peek(&r.g, w, 5), b"reply");
}

#[test]
fn copy_uses_the_trusted_descriptor_not_the_device_segment() {
    let mut r = copy_rig();
    let secret = buffer(&r.g, b"top secret");
    let public = buffer(&r.g, b"public");
    r.raw.desc(3, public, 6, 0, 0);
    r.raw.publish(3);
    let _c = r.dev.pop().unwrap().unwrap();
    // The device forges the address (and a larger length) of an owned descriptor.
    let forged = Segment::new(secret, 10, false, 3, DescSlot::Table(3));
    let mut got = [0u8; 6];
    r.dev.memory().read(&forged, 0, &mut got).unwrap();
    assert_eq!(&got, b"public");
    let mut more = [0u8; 10];
    let ae = r.dev.memory().read(&forged, 0, &mut more).unwrap_err();
    assert!(matches!(
        CopyError::of(&ae),
        Some(CopyError::OutOfDescriptor { desc_len: 6, .. })
    ));
}

#[test]
fn copy_walks_indirect_tables_and_refuses_outside_them() {
    let mut r = copy_rig();
    let a = buffer(&r.g, &pattern(40, 4));
    let w = buffer(&r.g, &[0u8; 40]);
    let table = r.g.memory().alloc(48, 16).unwrap();
    let mut t = [0u8; 48];
    // entry 0: a (readable) -> entry 2: w (writable); entry 1 unlinked.
    t[..8].copy_from_slice(&a.to_le_bytes());
    t[8..12].copy_from_slice(&40u32.to_le_bytes());
    t[12..14].copy_from_slice(&VIRTQ_DESC_F_NEXT.to_le_bytes());
    t[14..16].copy_from_slice(&2u16.to_le_bytes());
    t[16..24].copy_from_slice(&a.to_le_bytes());
    t[24..28].copy_from_slice(&40u32.to_le_bytes());
    t[32..40].copy_from_slice(&w.to_le_bytes());
    t[40..44].copy_from_slice(&40u32.to_le_bytes());
    t[44..46].copy_from_slice(&VIRTQ_DESC_F_WRITE.to_le_bytes());
    r.g.memory().write(table, &t).unwrap();
    r.raw.desc(5, table, 48, VIRTQ_DESC_F_INDIRECT, 0);
    r.raw.publish(5);
    let c = r.dev.pop().unwrap().unwrap();
    assert_eq!(c.readable()[0].slot(), DescSlot::Indirect(0));
    assert_eq!(c.writable()[0].slot(), DescSlot::Indirect(2));
    let h = &r.helper;
    assert!(matches!(
        read_err(h, 0, seg(5, DescSlot::Indirect(1), false), 0, 1),
        CopyError::NotInChain {
            head: 5,
            slot: DescSlot::Indirect(1)
        }
    ));
    assert!(matches!(
        read_err(h, 0, seg(5, DescSlot::Indirect(3), false), 0, 1),
        CopyError::NotInChain { .. }
    ));
    // The table itself is readable (that is how the ring fetched it), not writable.
    assert_eq!(
        write_err(h, seg(5, DescSlot::Table(5), true), 0, b"x"),
        CopyError::WrongDirection {
            slot: DescSlot::Table(5),
            write: true
        }
    );
    let mut got = vec![0u8; 40];
    c.reader(r.dev.memory()).read_exact(&mut got).unwrap();
    assert_eq!(got, pattern(40, 4));
    c.writer(r.dev.memory()).write_all(&got).unwrap();
    r.dev.add_used(5, 40).unwrap();
    assert_eq!(peek(&r.g, w, 40), pattern(40, 4));
    assert_eq!(r.raw.take_used(), vec![(5, 40)]);
}

#[test]
fn copy_refuses_guest_descriptors_outside_memory() {
    let mut r = copy_rig();
    r.raw.desc(0, u64::MAX - 100, 64, 0, 0);
    r.raw.publish(0);
    match r.dev.pop() {
        Err(DeviceQueueError::BadChain {
            head: 0,
            source: ChainError::Access(e),
        }) => {
            assert!(matches!(CopyError::of(&e), Some(CopyError::OutsideMemory { .. })))
        }
        other => panic!("accepted: {other:?}"),
    }
    assert_eq!(r.raw.take_used(), vec![(0, 0)]);
    still_serves(&mut r.raw, &mut r.dev, &r.g);
}

/// The permissions the MMU holds for the mapping containing `ptr`, from
/// /proc/self/maps (e.g. "r--s").
fn mmu_perms(ptr: *const u8) -> String {
    let p = ptr as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (range, perms) = (f.next().unwrap(), f.next().unwrap());
        let (lo, hi) = range.split_once('-').unwrap();
        let (lo, hi) = (
            usize::from_str_radix(lo, 16).unwrap(),
            usize::from_str_radix(hi, 16).unwrap(),
        );
        if (lo..hi).contains(&p) {
            return perms.to_string();
        }
    }
    panic!("no mapping holds {p:#x}");
}

#[test]
fn copy_device_cannot_write_the_descriptor_table_or_avail_ring() {
    let mut r = copy_rig();
    let buf = buffer(&r.g, b"intact");
    r.raw.desc(0, buf, 6, 0, 0);
    r.raw.publish(0);
    assert!(!r.ring.desc.is_writable() && !r.ring.driver.is_writable());
    assert_eq!(r.ring.desc.write(0, &[0xff; 16]), Err(RegionError::ReadOnly));
    assert_eq!(r.ring.driver.write(2, &[9, 9]), Err(RegionError::ReadOnly));
    assert_eq!(r.ring.desc.zero(0, 16), Err(RegionError::ReadOnly));
    // The region's refusal is backed by the MMU: the device's views are separate,
    // read-only mappings, not the guest's own.
    assert_eq!(&mmu_perms(r.ring.desc.as_ptr())[..2], "r-");
    assert_eq!(&mmu_perms(r.ring.driver.as_ptr())[..2], "r-");
    assert_eq!(&mmu_perms(r.ring.device.as_ptr())[..2], "rw");
    assert_ne!(r.ring.desc.as_ptr(), r.raw.ring.desc.as_ptr());
    // The device's views hold the rings and nothing more than their pages.
    let page = r.g.memory().page_size() as usize;
    assert!(r.ring.desc.len() <= page && r.ring.device.len() <= page);
    // Nothing changed: the descriptor still says what the guest wrote.
    let c = r.dev.pop().unwrap().unwrap();
    let mut got = [0u8; 6];
    c.reader(r.dev.memory()).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"intact");
}

#[test]
fn copy_bogus_used_entry_loses_ownership() {
    let mut r = copy_rig();
    let a = buffer(&r.g, &pattern(16, 5));
    let b = buffer(&r.g, &pattern(16, 6));
    r.raw.desc(0, a, 16, 0, 0);
    r.raw.desc(1, b, 16, 0, 0);
    r.raw.publish(0);
    r.raw.publish(1);
    let c0 = r.dev.pop().unwrap().unwrap();
    let c1 = r.dev.pop().unwrap().unwrap();
    // The device writes a used entry for head 1 behind the ring's back (at the slot
    // the ring will use next, so its own bookkeeping stays consistent).
    r.ring.device.write(4, &1u32.to_le_bytes()).unwrap();
    r.ring.device.write(8, &0u32.to_le_bytes()).unwrap();
    r.ring.device.write(2, &1u16.to_le_bytes()).unwrap();
    let mut got = [0u8; 16];
    let ae = r.dev.memory().read(&c1.readable()[0], 0, &mut got).unwrap_err();
    assert_eq!(CopyError::of(&ae), Some(&CopyError::NotOwned { head: 1 }));
    // Head 0 is unaffected; bogus ids that are not heads change nothing either.
    r.dev.memory().read(&c0.readable()[0], 0, &mut got).unwrap();
    assert_eq!(got.to_vec(), pattern(16, 5));
    // Now the ring completes head 1 at that slot for real, then head 0.
    r.dev.add_used(1, 0).unwrap();
    r.dev.add_used(0, 0).unwrap();
    assert_eq!(r.raw.take_used(), vec![(1, 0), (0, 0)]);
    // A used index thrown far ahead revokes everything the device holds.
    r.raw.publish(1);
    let c1 = r.dev.pop().unwrap().unwrap();
    r.ring.device.write(2, &500u16.to_le_bytes()).unwrap();
    let ae = r.dev.memory().read(&c1.readable()[0], 0, &mut got).unwrap_err();
    assert_eq!(CopyError::of(&ae), Some(&CopyError::NotOwned { head: 1 }));
    assert_eq!(peek(&r.g, a, 16), pattern(16, 5));
    assert_eq!(peek(&r.g, b, 16), pattern(16, 6));
}

#[test]
fn copy_open_queue_only_opens_what_the_driver_published() {
    let r = copy_rig();
    let secret = r.g.memory().alloc_pages(3).unwrap();
    let page = r.g.memory().page_size();
    // The device tries to point the helper's trusted view at other guest memory.
    let fake = QueueAddrs {
        desc: secret,
        avail: secret + page,
        used: secret + 2 * page,
    };
    assert!(matches!(
        r.model.open_queue(0, SIZE, fake),
        Err(ModelError::BadAddrs(_))
    ));
    assert!(matches!(
        r.model.open_queue(0, SIZE * 2, r.addrs),
        Err(ModelError::BadAddrs(_))
    ));
    assert!(matches!(
        r.model.open_queue(1, SIZE, r.addrs),
        Err(ModelError::BadAddrs(_))
    ));
    assert!(matches!(
        r.model.open_queue(CopyHelper::MAX_QUEUES, SIZE, r.addrs),
        Err(ModelError::Model(_))
    ));
}

#[test]
fn copy_stale_queue_handle_is_refused_after_reopen() {
    let mut r = copy_rig();
    let buf = buffer(&r.g, b"data");
    r.raw.desc(0, buf, 4, 0, 0);
    r.raw.publish(0);
    let c = r.dev.pop().unwrap().unwrap();
    // The device reopens the queue (a reset): the old handle is dead.
    let fresh = r.model.open_queue(0, SIZE, r.addrs).unwrap();
    let mut got = [0u8; 4];
    let ae = r.dev.memory().read(&c.readable()[0], 0, &mut got).unwrap_err();
    assert_eq!(CopyError::of(&ae), Some(&CopyError::BadQueue(0)));
    // Dropping the old handle does not close the new queue.
    drop(r.dev);
    let mut dev = SplitDevice::new(SIZE, &fresh.ring, fresh.memory, FEATURES).unwrap();
    // The new queue counts from ring position 0 again, as its device does.
    let c = dev.pop().unwrap().unwrap();
    c.reader(dev.memory()).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"data");
}

// ------------------------------------------------ model 3: ring views die with the queue

/// HOSTILE 37: the driver resets queue 0 (creates it again), which returns the old ring
/// pages to the guest's allocator, here straight to the new rings. The device kept both
/// its `SplitDevice` (with a chain in flight) and a clone of its ring regions; neither
/// may reach the pages any more.
#[test]
fn copy_ring_views_are_revoked_before_the_driver_reuses_the_ring_pages() {
    let g = guest();
    let (d, v) = copy::pair(&g).unwrap();
    let q = d.create_queue(0, SIZE).unwrap();
    let dq = v.open_queue(0, SIZE, q.addrs).unwrap();
    let kept = dq.ring.clone();
    let mut dev = SplitDevice::new(SIZE, &dq.ring, dq.memory, FEATURES).unwrap();
    let mut raw = RawQueue::new(q.ring, SIZE);
    let buf = buffer(&g, b"request");
    raw.desc(0, buf, 7, 0, 0);
    raw.publish(0);
    let chain = dev.pop().unwrap().unwrap();
    drop(raw);

    let q2 = d.create_queue(0, SIZE).unwrap();
    assert_eq!(q2.addrs, q.addrs, "the old ring pages were handed out again");
    let page = g.memory().page_size() as usize;
    let fresh = peek(&g, q2.addrs.used, page);

    // Through the device's own atomic views: whatever it reports, nothing lands.
    let _ = dev.add_used(chain.head(), 0);
    assert!(
        peek(&g, q2.addrs.used, page) == fresh,
        "the new used ring is untouched"
    );
    // Through the clone: the copies land in the scratch pages that replaced the
    // revoked mapping, never in the new used ring.
    let _ = kept.device.write(0, &[0xff; 8]);
    let _ = kept.device.zero(0, 8);
    assert!(peek(&g, q2.addrs.used, page) == fresh);

    // The new queue works as if the old device never existed.
    let dq2 = v.open_queue(0, SIZE, q2.addrs).unwrap();
    let mut dev2 = SplitDevice::new(SIZE, &dq2.ring, dq2.memory, FEATURES).unwrap();
    let mut raw2 = RawQueue::new(q2.ring, SIZE);
    assert!(raw2.take_used().is_empty());
    still_serves(&mut raw2, &mut dev2, &g);
}

/// HOSTILE 37: a device that closed its queue (dropped its `SplitDevice`) but kept a
/// clone of the ring regions cannot write the used ring once the driver has freed it
/// and the guest reused the page for its own data.
#[test]
fn copy_ring_clone_kept_past_close_cannot_write_a_reused_page() {
    let g = guest();
    let (d, v) = copy::pair(&g).unwrap();
    let q = d.create_queue(0, SIZE).unwrap();
    let dq = v.open_queue(0, SIZE, q.addrs).unwrap();
    let kept = dq.ring.clone();
    drop(SplitDevice::new(SIZE, &dq.ring, dq.memory, FEATURES).unwrap());
    drop(dq.ring);
    drop(q.ring);

    // Queue 0 again at the same place; its old pages hold the guest's secret in between
    // (the driver is free to use them as it likes once they are back).
    let q2 = d.create_queue(0, SIZE).unwrap();
    assert_eq!(q2.addrs.used, q.addrs.used);
    let page = g.memory().page_size() as usize;
    let secret = pattern(page, 7);
    g.memory().write(q2.addrs.used, &secret).unwrap();

    // Writes land in the scratch pages that replaced the revoked mapping; reads see
    // those, never the guest's secret.
    let _ = kept.device.write(0, &[0xff; 64]);
    let mut leak = [0u8; 16];
    if kept.device.read(0, &mut leak).is_ok() {
        assert_ne!(&leak[..], &secret[..16], "nor read it");
    }
    if kept.desc.read(0, &mut leak).is_ok() {
        assert!(leak.iter().all(|&b| b == 0), "the old table reads as scratch");
    }
    assert!(
        peek(&g, q2.addrs.used, page) == secret,
        "the guest page is intact"
    );
}
