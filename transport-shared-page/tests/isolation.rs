//! A hostile driver against the shared-page device: descriptors and ring addresses
//! that name anything but the queue's own bounce area get a typed error, the queue
//! keeps serving, and nothing outside the bounce area is read or written. Also: the
//! device's one mapping covers the shared region and nothing more of the guest.

// Test data is built with deliberate narrowing casts.
#![allow(clippy::cast_possible_truncation)]

use hypervisor::{Domain, Hypervisor};
use std::ops::Range;
use std::sync::Arc;
use transport_shared_page::{SharedPageConfig, SharedPageDevice, SharedPageDriver, SharedPageMemory, pair};
use virtio_core::features::Features;
use virtio_core::ring::chain::ChainError;
use virtio_core::ring::layout::{Descriptor, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use virtio_core::ring::split::DeviceQueueError;
use virtio_core::test_utils::Arena;
use virtio_core::test_utils::raw::RawDriver;
use virtio_core::{
    AccessError, DescSlot, DeviceMemory, DeviceModel, DriverModel, ModelError, QueueAddrs, Segment,
    SplitDevice,
};
use zerocopy::IntoBytes;

const SIZE: u16 = 16;
const SECRET: &[u8] = b"guest secret outside the shared region";

fn cfg() -> SharedPageConfig {
    SharedPageConfig {
        max_queues: 2,
        max_queue_size: SIZE,
        bounce_bytes_per_queue: 64 << 10,
    }
}

struct Hostile {
    guest: Arc<Domain>,
    drv: SharedPageDriver,
    dev: SharedPageDevice,
    addrs: QueueAddrs,
    raw: RawDriver,
    device: SplitDevice<SharedPageMemory>,
    /// Queue 0's bounce area (model addresses).
    bounce: Range<u64>,
    /// Guest address of a secret placed right after the shared region.
    secret: u64,
}

fn hostile() -> Hostile {
    let hv = Hypervisor::new();
    let guest = hv.create_domain("victim", 4 << 20).unwrap();
    let (drv, dev) = pair(&guest, cfg()).unwrap();
    let secret = guest.memory().alloc(SECRET.len() as u64, 1).unwrap();
    guest.memory().write(secret, SECRET).unwrap();
    let q = drv.create_queue(0, SIZE).unwrap();
    let dq = dev.open_queue(0, SIZE, q.addrs).unwrap();
    let features = Features::VERSION_1 | Features::INDIRECT_DESC;
    let device = SplitDevice::new(SIZE, &dq.ring, dq.memory, features).unwrap();
    // The raw driver writes the rings through the guest's own view; its arena is only
    // for indirect tables, which these tests put into the bounce area themselves.
    let spare = Arena::new(0x1000, 4096).unwrap();
    let raw = RawDriver::new(spare, SIZE, q.ring).unwrap();
    let bounce = drv.layout().bounce(0).unwrap();
    Hostile {
        guest,
        drv,
        dev,
        addrs: q.addrs,
        raw,
        device,
        bounce,
        secret,
    }
}

impl Hostile {
    /// The bytes of the region that are neither queue 0's rings nor its bounce area.
    fn outside(&self) -> Vec<u8> {
        let region = self.drv.shared_region();
        let layout = self.drv.layout();
        let mut all = Vec::new();
        for r in [layout.ring_slot(1).unwrap(), layout.bounce(1).unwrap()] {
            let mut s = vec![0u8; (r.end - r.start) as usize];
            region.read(r.start, &mut s).unwrap();
            all.extend(s);
        }
        all
    }

    /// Paints queue 1's rings and bounce area and queue 0's bounce area past its
    /// first two lines with markers the device must never change.
    fn paint(&self) -> Vec<u8> {
        let region = self.drv.shared_region();
        let layout = self.drv.layout();
        for r in [layout.ring_slot(1).unwrap(), layout.bounce(1).unwrap()] {
            let marker: Vec<u8> = (0..r.end - r.start).map(|i| (i % 251) as u8).collect();
            region.write(r.start, &marker).unwrap();
        }
        let spare = (self.bounce.end - self.bounce.start - 128) as usize;
        region.write(self.bounce.start + 128, &vec![0x5a; spare]).unwrap();
        self.outside()
    }

    /// Makes `head` available and pops it.
    fn offer(&mut self, head: u16) -> Result<Option<virtio_core::ring::chain::Chain>, DeviceQueueError> {
        self.raw.push_avail(head);
        self.device.pop()
    }

    /// A well-formed request: 16 readable bytes at the start of the bounce area, 16
    /// writable bytes after them. The device echoes the request reversed.
    fn good_request(&mut self, n: u8) {
        let region = self.drv.shared_region().clone();
        let msg = [n; 16];
        region.write(self.bounce.start, &msg).unwrap();
        region.write(self.bounce.start + 64, &[0; 16]).unwrap();
        self.raw
            .write_desc(0, self.bounce.start, 16, VIRTQ_DESC_F_NEXT, 1);
        self.raw
            .write_desc(1, self.bounce.start + 64, 16, VIRTQ_DESC_F_WRITE, 0);
        let chain = self.offer(0).expect("good chain").expect("available");
        let mut got = [0u8; 16];
        chain.reader(self.device.memory()).read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
        got.iter_mut().for_each(|b| *b = !*b);
        chain.writer(self.device.memory()).write_all(&got).unwrap();
        self.device.add_used(chain.head(), 16).unwrap();
        let used = self.raw.read_used();
        assert_eq!(used, vec![(0, 16)]);
        let mut back = [0u8; 16];
        region.read(self.bounce.start + 64, &mut back).unwrap();
        assert_eq!(back, [!n; 16]);
    }

    /// Offers the chain at head 2 and expects it refused because of its range.
    fn expect_refused(&mut self, what: &str) {
        match self.offer(2) {
            Err(DeviceQueueError::BadChain { head: 2, source }) => {
                assert!(
                    matches!(
                        source,
                        ChainError::Access(AccessError::OutOfBounds { .. }) | ChainError::AddrOverflow { .. }
                    ),
                    "{what}: unexpected rule {source}"
                );
            }
            other => panic!("{what}: expected a refused chain, got {other:?}"),
        }
        assert_eq!(
            self.raw.read_used(),
            vec![(2, 0)],
            "{what}: returned with length 0"
        );
    }
}

#[test]
fn forged_descriptors_are_refused_and_the_queue_keeps_serving() {
    let mut h = hostile();
    let marker = h.paint();
    h.good_request(1);
    let layout = *h.drv.layout();
    let q1_bounce = layout.bounce(1).unwrap();
    let end = layout.len();
    let b = h.bounce.clone();
    let cases: Vec<(&str, u64, u32, u16)> = vec![
        ("descriptor table", h.addrs.desc, 16, 0),
        ("available ring", h.addrs.avail, 4, 0),
        ("used ring, written", h.addrs.used, 16, VIRTQ_DESC_F_WRITE),
        (
            "queue 1's rings",
            layout.ring_slot(1).unwrap().start,
            64,
            VIRTQ_DESC_F_WRITE,
        ),
        ("queue 1's bounce area", q1_bounce.start, 64, 0),
        (
            "queue 1's bounce area, written",
            q1_bounce.start + 4096,
            64,
            VIRTQ_DESC_F_WRITE,
        ),
        ("one byte before the bounce area", b.start - 1, 2, 0),
        (
            "straddling the bounce area's end",
            b.end - 8,
            16,
            VIRTQ_DESC_F_WRITE,
        ),
        ("past the region", end, 1, 0),
        ("straddling the region's end", end - 8, 16, 0),
        ("far past the region", 1 << 40, 16, VIRTQ_DESC_F_WRITE),
        ("the secret's guest address", h.secret, SECRET.len() as u32, 0),
        ("addr + len overflows", u64::MAX - 4, 16, 0),
        ("addr + len overflows, written", u64::MAX, 1, VIRTQ_DESC_F_WRITE),
        ("wrapping offset", b.start.wrapping_sub(1 << 20), 1 << 21, 0),
        (
            "whole bounce area plus one",
            b.start,
            (b.end - b.start + 1) as u32,
            0,
        ),
    ];
    for (what, addr, len, flags) in cases {
        h.raw.write_desc(2, addr, len, flags, 0);
        h.expect_refused(what);
        h.good_request(2);
    }

    // The bad descriptor deep in a chain, after a good one.
    h.raw.write_desc(2, b.start, 16, VIRTQ_DESC_F_NEXT, 3);
    h.raw.write_desc(3, h.addrs.used, 8, VIRTQ_DESC_F_WRITE, 0);
    h.expect_refused("second descriptor at the used ring");
    h.good_request(3);

    // An indirect table placed on the rings, and a good table pointing at them.
    h.raw.write_desc(2, h.addrs.desc, 32, VIRTQ_DESC_F_INDIRECT, 0);
    h.expect_refused("indirect table in the descriptor table");
    h.raw.write_desc(2, q1_bounce.start, 32, VIRTQ_DESC_F_INDIRECT, 0);
    h.expect_refused("indirect table in queue 1's bounce area");
    let table = [
        Descriptor::new(b.start, 16, VIRTQ_DESC_F_NEXT, 1),
        Descriptor::new(h.addrs.used, 64, VIRTQ_DESC_F_WRITE, 0),
    ];
    h.drv
        .shared_region()
        .write(b.start + 256, table.as_bytes())
        .unwrap();
    h.raw.write_desc(2, b.start + 256, 32, VIRTQ_DESC_F_INDIRECT, 0);
    h.expect_refused("indirect entry at the used ring");
    let table = [Descriptor::new(end - 4, 16, VIRTQ_DESC_F_WRITE, 0)];
    h.drv
        .shared_region()
        .write(b.start + 256, table.as_bytes())
        .unwrap();
    h.raw.write_desc(2, b.start + 256, 16, VIRTQ_DESC_F_INDIRECT, 0);
    h.expect_refused("indirect entry past the region");

    h.good_request(4);
    assert!(h.device.fault().is_none(), "no needs-reset for a bad chain");
    assert!(h.outside() == marker, "nothing outside queue 0 changed");
    let mut mid = vec![0u8; (b.end - b.start - 128) as usize];
    h.drv.shared_region().read(b.start + 128, &mut mid).unwrap();
    // The indirect tables written above (at +256, 32 bytes) are the only change in
    // queue 0's spare bounce bytes.
    assert!(mid[..128].iter().all(|&x| x == 0x5a));
    assert!(mid[128..160].iter().any(|&x| x != 0x5a));
    assert!(
        mid[160..].iter().all(|&x| x == 0x5a),
        "queue 0's spare bounce bytes untouched"
    );
    let mut s = vec![0u8; SECRET.len()];
    h.guest.memory().read(h.secret, &mut s).unwrap();
    assert_eq!(s, SECRET);
}

#[test]
fn device_memory_rechecks_every_access() {
    let h = hostile();
    let mem = h.device.memory();
    assert_eq!(mem.bounce_range(), h.bounce);
    let seg = |addr, len, w| Segment::new(addr, len, w, 0, DescSlot::Table(0));
    let mut buf = [0u8; 16];

    // Forged segments that never went through the chain walk.
    for s in [
        seg(h.addrs.desc, 16, true),
        seg(h.bounce.end, 1, true),
        seg(h.bounce.start - 16, 32, true),
        seg(u64::MAX - 8, 16, true),
        seg(h.secret, 16, true),
    ] {
        assert!(
            matches!(mem.check(&s), Err(AccessError::OutOfBounds { .. })),
            "{s:?}"
        );
        assert!(matches!(
            mem.read(&s, 0, &mut buf[..1]),
            Err(AccessError::OutOfBounds { .. })
        ));
        assert!(matches!(
            mem.write(&s, 0, &buf[..1]),
            Err(AccessError::OutOfBounds { .. })
        ));
    }

    let last = seg(h.bounce.end - 16, 16, false);
    mem.check(&last).unwrap();
    mem.read(&last, 0, &mut buf).unwrap();
    assert!(matches!(mem.write(&last, 0, &buf), Err(AccessError::Denied)));
    assert!(matches!(
        mem.read(&last, 1, &mut buf),
        Err(AccessError::PastSegment { .. })
    ));
    assert!(matches!(
        mem.read(&last, u32::MAX, &mut buf[..1]),
        Err(AccessError::PastSegment { .. })
    ));

    let w = seg(h.bounce.start, 64, true);
    mem.write(&w, 60, b"abcd").unwrap();
    assert!(matches!(
        mem.write(&w, 61, b"abcd"),
        Err(AccessError::PastSegment { .. })
    ));
    let mut got = [0u8; 4];
    h.drv.shared_region().read(h.bounce.start + 60, &mut got).unwrap();
    assert_eq!(&got, b"abcd", "the write landed inside the shared page");
}

#[test]
fn hostile_queue_addresses_are_refused() {
    let h = hostile();
    let layout = *h.dev.layout();
    let good = layout.queue_addrs(1, SIZE).unwrap();
    h.dev
        .open_queue(1, SIZE, good)
        .expect("the driver's own placement");
    let slot1 = layout.ring_slot(1).unwrap();
    let bounce1 = layout.bounce(1).unwrap();
    let bad = [
        QueueAddrs {
            desc: good.desc + 8,
            ..good
        },
        QueueAddrs {
            avail: good.avail + 1,
            ..good
        },
        QueueAddrs {
            used: good.used + 2,
            ..good
        },
        QueueAddrs {
            used: good.desc,
            ..good
        },
        QueueAddrs {
            avail: good.desc + 16,
            ..good
        },
        QueueAddrs {
            desc: bounce1.start,
            ..good
        },
        QueueAddrs {
            used: slot1.end - 8,
            ..good
        },
        QueueAddrs {
            desc: layout.len(),
            ..good
        },
        QueueAddrs {
            used: u64::MAX - 3,
            ..good
        },
        // Queue 0's rings for queue 1.
        h.addrs,
    ];
    for addrs in bad {
        assert!(
            matches!(h.dev.open_queue(1, SIZE, addrs), Err(ModelError::BadAddrs(a)) if a == addrs),
            "{addrs:x?}"
        );
    }
    assert!(matches!(
        h.dev.open_queue(1, 0, good),
        Err(ModelError::BadSize(0))
    ));
    assert!(matches!(
        h.dev.open_queue(1, 12, good),
        Err(ModelError::BadSize(12))
    ));
    assert!(matches!(
        h.dev.open_queue(1, 2 * SIZE, good),
        Err(ModelError::Model(_))
    ));
    assert!(matches!(
        h.dev.open_queue(2, SIZE, good),
        Err(ModelError::Model(_))
    ));
    assert_eq!(h.dev.name(), "shared-page");
}

#[test]
fn device_reaches_the_shared_region_and_nothing_else() {
    let h = hostile();
    let layout = *h.drv.layout();
    let mem = h.guest.memory();
    // One mapping, exactly the region: a small part of the guest.
    assert_eq!(h.dev.shared_len(), layout.len());
    assert!(layout.len() < mem.size() / 4);
    // The secret sits in guest memory right after the region, so a device mapping
    // even one page too long would contain it.
    let region_end = h.drv.shared_gpa() + layout.len();
    assert!(h.secret >= region_end && h.secret < region_end + mem.page_size());

    // Everything the device can open: every queue's rings and bounce area.
    let mut seen = Vec::new();
    for q in 0..layout.max_queues() {
        let addrs = layout.queue_addrs(q, SIZE).unwrap();
        let dq = h.dev.open_queue(q, SIZE, addrs).unwrap();
        let bounce = dq.memory.bounce_range();
        let all = Segment::new(
            bounce.start,
            (bounce.end - bounce.start) as u32,
            true,
            0,
            DescSlot::Table(0),
        );
        let mut bytes = vec![0u8; all.len() as usize];
        dq.memory.read(&all, 0, &mut bytes).unwrap();
        assert!(dq.memory.read(&all, all.len(), &mut [0u8; 1]).is_err());
        seen.extend(bytes);
        for area in [&dq.ring.desc, &dq.ring.driver, &dq.ring.device] {
            let mut bytes = vec![0u8; area.len()];
            area.read(0, &mut bytes).unwrap();
            seen.extend(bytes);
        }
    }
    assert!(
        !seen.windows(SECRET.len()).any(|w| w == SECRET),
        "guest data outside the region is not visible to the device"
    );

    // The device's writes land in the guest's region, at the same offsets.
    let q = layout.queue_addrs(1, SIZE).unwrap();
    let dq = h.dev.open_queue(1, SIZE, q).unwrap();
    let last = Segment::new(layout.len() - 4, 4, true, 0, DescSlot::Table(0));
    dq.memory.write(&last, 0, b"tail").unwrap();
    let mut got = [0u8; 4];
    mem.read(region_end - 4, &mut got).unwrap();
    assert_eq!(&got, b"tail");
}
