//! Tests of the packed ring: driver against device, and each against a hostile peer.

use super::layout::*;
use super::*;
use crate::features::Features;
use crate::ring::layout::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::ring::{Chain, ChainError};
use crate::share::GuestBuf;
use crate::test_utils::{Arena, IdentityShare};
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use zerocopy::IntoBytes;

struct Pair {
    arena: Arc<Arena>,
    ring: RingMemory,
    driver: PackedDriver<IdentityShare, u32>,
    device: PackedDevice<Arc<Arena>>,
}

fn pair(size: u16, features: Features) -> Pair {
    let arena = Arena::new(0x4000_0000, 4 << 20).unwrap();
    let (_, ring) = arena.alloc_packed_ring(size).unwrap();
    let share = IdentityShare::new(arena.clone(), size.max(8));
    let driver = PackedDriver::new(size, ring.clone(), share, features).unwrap();
    let device = PackedDevice::new(size, &ring, arena.clone(), features).unwrap();
    Pair {
        arena,
        ring,
        driver,
        device,
    }
}

fn bufs(arena: &Arena, lens: &[u32]) -> Vec<GuestBuf> {
    lens.iter()
        .map(|&l| GuestBuf::new(arena.alloc(u64::from(l), 8).unwrap(), l))
        .collect()
}

const PLAIN: Features = Features::VERSION_1;
const AVAIL1: u16 = VIRTQ_DESC_F_AVAIL;
const AVAIL0: u16 = VIRTQ_DESC_F_USED;

/// Writes descriptor `d` into ring slot `slot` as a (hostile) driver would.
fn put(ring: &RingMemory, slot: u16, d: PackedDescriptor) {
    ring.desc.write(u64::from(slot) * 16, d.as_bytes()).unwrap();
}

/// Writes the driver event suppression structure as a (hostile) driver would.
fn set_driver_event(ring: &RingMemory, desc: u16, flags: u16) {
    let e = EventSuppress {
        desc: desc.into(),
        flags: flags.into(),
    };
    ring.driver.write(0, e.as_bytes()).unwrap();
}

/// Reads ring slot `slot`.
fn get(ring: &RingMemory, slot: u16) -> PackedDescriptor {
    let mut d = PackedDescriptor::default();
    ring.desc.read(u64::from(slot) * 16, d.as_mut_bytes()).unwrap();
    d
}

fn device_event(ring: &RingMemory) -> (u16, u16) {
    let mut e = EventSuppress::default();
    ring.device.read(0, e.as_mut_bytes()).unwrap();
    (e.desc.get(), e.flags.get())
}

#[test]
fn round_trip_direct_and_indirect() {
    for features in [PLAIN, PLAIN | Features::INDIRECT_DESC] {
        let mut p = pair(8, features);
        let out = bufs(&p.arena, &[3, 5]);
        p.arena.write(out[0].addr, b"abc").unwrap();
        p.arena.write(out[1].addr, b"defgh").unwrap();
        let ins = bufs(&p.arena, &[4, 8]);
        let id = p.driver.add(&out, &ins, 7).unwrap();
        let indirect = features.contains(Features::INDIRECT_DESC);
        assert_eq!(p.driver.num_free(), if indirect { 7 } else { 4 });

        let chain = p.device.pop().unwrap().unwrap();
        assert_eq!(chain.head(), id);
        assert_eq!(chain.readable().len(), 2);
        assert_eq!((chain.readable_len(), chain.writable_len()), (8, 12));
        let mut got = [0u8; 8];
        chain.reader(p.device.memory()).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abcdefgh");
        let mut w = chain.writer(p.device.memory());
        w.write_all(b"0123456").unwrap();
        assert_eq!(w.written(), 7);
        p.device.add_used(chain.head(), 7).unwrap();
        assert!(p.device.pop().unwrap().is_none());
        // One used descriptor, at slot 0, with AVAIL == USED == 1 and WRITE.
        let u = get(&p.ring, 0);
        assert_eq!((u.id.get(), u.len.get()), (id, 7));
        assert_eq!(u.flags.get(), AVAIL1 | VIRTQ_DESC_F_USED | VIRTQ_DESC_F_WRITE);

        let used = p.driver.pop_used().unwrap().unwrap();
        assert_eq!(used, Used { token: 7, len: 7 });
        let mut a = [0u8; 4];
        let mut b = [0u8; 3];
        p.arena.read(ins[0].addr, &mut a).unwrap();
        p.arena.read(ins[1].addr, &mut b).unwrap();
        assert_eq!((&a, &b), (b"0123", b"456"));
        assert_eq!(p.driver.num_free(), 8);
        assert_eq!(p.driver.share().live, 0);
        assert!(p.driver.pop_used().unwrap().is_none());
    }
}

#[test]
fn the_driver_writes_lists_the_way_the_spec_lays_them_out() {
    let mut p = pair(4, PLAIN);
    let b = bufs(&p.arena, &[16, 32, 48]);
    // Slot 0 taken and returned, so the next list of three wraps: slots 1, 2, 3.
    p.driver.add(&b[..1], &[], 0).unwrap();
    let c = p.device.pop().unwrap().unwrap();
    p.device.add_used(c.head(), 0).unwrap();
    p.driver.pop_used().unwrap().unwrap();
    let id = p.driver.add(&b[..2], &b[2..], 1).unwrap();
    let d: Vec<_> = (1..4).map(|s| get(&p.ring, s)).collect();
    assert_eq!(d[0].flags.get(), AVAIL1 | VIRTQ_DESC_F_NEXT);
    assert_eq!(d[1].flags.get(), AVAIL1 | VIRTQ_DESC_F_NEXT);
    assert_eq!(d[2].flags.get(), AVAIL1 | VIRTQ_DESC_F_WRITE);
    assert_eq!(d[2].id.get(), id, "the id is in the last descriptor");
    assert_eq!(d.iter().map(|d| d.len.get()).collect::<Vec<_>>(), [16, 32, 48]);
    // Slot 0 is next, in the second lap: AVAIL 0, USED 1.
    let c = p.device.pop().unwrap().unwrap();
    p.device.add_used(c.head(), 0).unwrap();
    p.driver.pop_used().unwrap().unwrap();
    p.driver.add(&b[..1], &[], 2).unwrap();
    assert_eq!(get(&p.ring, 0).flags.get(), AVAIL0);
    assert_eq!(p.device.next_avail(), 0);
    let c = p.device.pop().unwrap().unwrap();
    assert_eq!(c.readable_len(), 16);
    assert_eq!(p.device.next_avail(), 1);
}

#[test]
fn full_queue_refuses_and_hands_the_token_back() {
    let mut p = pair(4, PLAIN);
    let b = bufs(&p.arena, &[16, 16, 16]);
    p.driver.add(&b, &[], 1).unwrap();
    let err = p.driver.add(&b[..2], &[], 2).unwrap_err();
    assert_eq!(err.token, 2);
    assert!(matches!(err.error, AddError::NoSpace { needed: 2, free: 1 }));
    assert!(matches!(
        p.driver.add(&[], &[], 3).unwrap_err().error,
        AddError::Empty
    ));
    let five = bufs(&p.arena, &[1, 1, 1, 1, 1]);
    assert!(matches!(
        p.driver.add(&five, &[], 4).unwrap_err().error,
        AddError::TooLong(5)
    ));
    let outside = GuestBuf::new(1, 1);
    assert!(matches!(
        p.driver.add(&[outside], &[], 5).unwrap_err().error,
        AddError::Share(_)
    ));
    assert_eq!(p.driver.share().live, 3);
    // The last slot still takes a one-buffer request; then the ring is full.
    p.driver.add(&b[..1], &[], 6).unwrap();
    assert_eq!(p.driver.num_free(), 0);
}

#[test]
fn out_of_order_completion_skips_each_lists_slots() {
    let mut p = pair(8, PLAIN);
    // Lists of 1, 3, 2 and 1 descriptors: slots 0, 1-3, 4-5, 6.
    let shapes: [&[u32]; 4] = [&[64], &[8, 8, 8], &[16, 16], &[32]];
    for (t, lens) in shapes.iter().enumerate() {
        let ins = bufs(&p.arena, lens);
        p.driver.add(&[], &ins, u32::try_from(t).unwrap()).unwrap();
    }
    assert_eq!(p.driver.num_free(), 1);
    let chains: Vec<_> = (0..4).map(|_| p.device.pop().unwrap().unwrap()).collect();
    // Return in the order 2, 0, 3, 1: used descriptors at slots 0, 2, 3, 4.
    for &i in &[2usize, 0, 3, 1] {
        let c = &chains[i];
        p.device.add_used(c.head(), c.writable_len()).unwrap();
    }
    for (slot, i) in [(0, 2), (2, 0), (3, 3), (4, 1)] {
        assert_eq!(get(&p.ring, slot).id.get(), chains[i].head(), "slot {slot}");
    }
    let got: Vec<_> = std::iter::from_fn(|| p.driver.pop_used().unwrap()).collect();
    let want = [(2, 32), (0, 64), (3, 32), (1, 24)].map(|(token, len)| Used { token, len });
    assert_eq!(got, want);
    assert_eq!(p.driver.num_free(), 8);
    // The next list starts at slot 7 and wraps to slots 0 and 1, in lap 2.
    let ins = bufs(&p.arena, &[1, 2, 3]);
    p.driver.add(&[], &ins, 9).unwrap();
    let c = p.device.pop().unwrap().unwrap();
    assert_eq!(c.writable_len(), 6);
    assert_eq!(get(&p.ring, 1).flags.get(), AVAIL0 | VIRTQ_DESC_F_WRITE);
    p.device.add_used(c.head(), 6).unwrap();
    assert_eq!(p.driver.pop_used().unwrap().unwrap(), Used { token: 9, len: 6 });
}

#[test]
fn a_second_device_instance_resumes_where_the_first_stopped() {
    let features = PLAIN | Features::EVENT_IDX;
    let mut p = pair(3, features);
    let b = bufs(&p.arena, &[16]);
    // Four round trips: the first instance ends at slot 1 of lap 2 (wrap counter 0).
    for t in 0..4 {
        p.driver.add(&[], &b, t).unwrap();
        let c = p.device.pop().unwrap().unwrap();
        p.device.add_used(c.head(), 1).unwrap();
        assert_eq!(p.driver.pop_used().unwrap().unwrap().token, t);
    }
    let at = p.device.next_avail();
    assert_eq!(at, 1, "slot 1, wrap counter 0 in bit 15");
    p.driver.add(&[], &b, 4).unwrap();
    let mut second = PackedDevice::new(3, &p.ring, p.arena.clone(), features)
        .unwrap()
        .starting_at(at);
    let c = second.pop().unwrap().unwrap();
    assert!(second.pop().unwrap().is_none());
    second.add_used(c.head(), 3).unwrap();
    assert_eq!(p.driver.pop_used().unwrap().unwrap(), Used { token: 4, len: 3 });
    assert_eq!(second.next_avail(), 2);
    // A position with the wrap counter of the other lap sees nothing available:
    // each descriptor is served once.
    let mut wrong = PackedDevice::new(3, &p.ring, p.arena.clone(), features)
        .unwrap()
        .starting_at(0x8001);
    assert!(wrong.pop().unwrap().is_none());
    // A slot outside the ring is a typed fault, not a panic.
    let mut bad = PackedDevice::new(3, &p.ring, p.arena.clone(), features)
        .unwrap()
        .starting_at(3);
    assert!(matches!(
        bad.pop(),
        Err(DeviceQueueError::NeedsReset(RingFault::StartOutOfRange {
            start: 3,
            size: 3
        }))
    ));
}

#[test]
fn device_side_misuse_is_refused() {
    let mut p = pair(8, PLAIN);
    let ins = bufs(&p.arena, &[10]);
    p.driver.add(&[], &ins, 0).unwrap();
    let c = p.device.pop().unwrap().unwrap();
    assert_eq!(p.device.in_flight(), 1);
    assert_eq!(
        p.device.add_used(c.head(), 11),
        Err(UsedError::TooLong {
            len: 11,
            writable: 10
        })
    );
    assert_eq!(p.device.add_used(5, 0), Err(UsedError::NotInFlight(5)));
    assert_eq!(p.device.add_used(9, 0), Err(UsedError::NotInFlight(9)));
    p.device.add_used(c.head(), 10).unwrap();
    assert_eq!(
        p.device.add_used(c.head(), 0),
        Err(UsedError::NotInFlight(c.head()))
    );
    assert_eq!(p.device.in_flight(), 0);
}

#[test]
fn kick_suppression_without_event_idx() {
    let mut p = pair(8, PLAIN);
    let b = bufs(&p.arena, &[8]);
    assert!(!p.driver.kick_prepare(), "nothing added, nothing to kick");
    p.driver.add(&b, &[], 0).unwrap();
    assert!(p.driver.kick_prepare());
    p.device.disable_notifications();
    assert_eq!(device_event(&p.ring), (0, RING_EVENT_FLAGS_DISABLE));
    p.driver.add(&b, &[], 1).unwrap();
    assert!(!p.driver.kick_prepare(), "device asked for no kicks");
    assert!(p.device.enable_notifications(), "work arrived while disabled");
    assert_eq!(device_event(&p.ring), (0, RING_EVENT_FLAGS_ENABLE));
    p.driver.add(&b, &[], 2).unwrap();
    assert!(p.driver.kick_prepare());
}

#[test]
fn kick_suppression_with_event_idx_follows_the_descriptor_event() {
    let mut p = pair(4, PLAIN | Features::EVENT_IDX);
    let b = bufs(&p.arena, &[8]);
    // The device area starts zeroed (ENABLE): the first buffer triggers a kick.
    for t in 0..3 {
        p.driver.add(&b, &[], t).unwrap();
    }
    assert!(p.driver.kick_prepare());
    // The device takes two and asks for a kick when slot 3 of lap 1 shows up.
    for _ in 0..2 {
        let c = p.device.pop().unwrap().unwrap();
        p.device.add_used(c.head(), 0).unwrap();
    }
    assert!(p.device.enable_notifications(), "slot 2 is still pending");
    let c = p.device.pop().unwrap().unwrap();
    p.device.add_used(c.head(), 0).unwrap();
    assert!(!p.device.enable_notifications());
    assert_eq!(device_event(&p.ring), (0x8003, RING_EVENT_FLAGS_DESC));
    for _ in 0..3 {
        p.driver.pop_used().unwrap().unwrap();
    }
    // A batch crossing slot 3 (slots 3, 0, 1: the wrap) gives one kick.
    for t in 3..6 {
        p.driver.add(&b, &[], t).unwrap();
    }
    assert!(p.driver.kick_prepare());
    // More without the device re-arming: no kick.
    for _ in 0..3 {
        let c = p.device.pop().unwrap().unwrap();
        p.device.add_used(c.head(), 0).unwrap();
        p.driver.pop_used().unwrap().unwrap();
    }
    p.driver.add(&b, &[], 6).unwrap();
    assert!(!p.driver.kick_prepare());
    // The device re-arms at slot 3 of lap 2 (wrap 0); the driver passes it.
    let c = p.device.pop().unwrap().unwrap();
    p.device.add_used(c.head(), 0).unwrap();
    p.driver.pop_used().unwrap().unwrap();
    assert!(!p.device.enable_notifications());
    assert_eq!(device_event(&p.ring), (0x0003, RING_EVENT_FLAGS_DESC));
    p.driver.add(&b, &[], 7).unwrap();
    assert!(p.driver.kick_prepare());
}

#[test]
fn used_notification_suppression() {
    for features in [PLAIN, PLAIN | Features::EVENT_IDX] {
        let mut p = pair(8, features);
        let b = bufs(&p.arena, &[8]);
        p.driver.add(&[], &b, 0).unwrap();
        p.driver.add(&[], &b, 1).unwrap();
        let c0 = p.device.pop().unwrap().unwrap();
        let c1 = p.device.pop().unwrap().unwrap();
        assert!(!p.device.needs_notification(), "nothing used yet");
        p.device.add_used(c0.head(), 0).unwrap();
        assert!(p.device.needs_notification());
        // NAPI-style: the driver disables, polls, and re-enables with a re-check.
        p.driver.disable_notifications();
        assert_eq!(p.driver.pop_used().unwrap().unwrap().token, 0);
        p.device.add_used(c1.head(), 0).unwrap();
        assert!(!p.device.needs_notification(), "driver disabled notifications");
        assert!(
            p.driver.enable_notifications(),
            "re-check finds the second buffer"
        );
        assert_eq!(p.driver.pop_used().unwrap().unwrap().token, 1);
        assert!(!p.driver.enable_notifications());
    }
}

#[test]
fn delayed_notification_waits_for_three_quarters_of_the_outstanding_slots() {
    let mut p = pair(8, PLAIN | Features::EVENT_IDX);
    let b = bufs(&p.arena, &[8]);
    for t in 0..8 {
        p.driver.add(&b, &[], t).unwrap();
    }
    let chains: Vec<Chain> = std::iter::from_fn(|| p.device.pop().unwrap()).collect();
    assert_eq!(chains.len(), 8);
    assert!(!p.driver.enable_notifications_delayed(), "nothing used yet");
    // Three quarters of 8 is 6: the sixth chain back is still quiet, the seventh
    // notifies.
    for (k, c) in chains.iter().enumerate() {
        p.device.add_used(c.head(), 0).unwrap();
        assert_eq!(p.device.needs_notification(), k == 6, "after chain {k}");
    }
    for t in 0..8 {
        assert_eq!(p.driver.pop_used().unwrap().unwrap().token, t);
    }
    // Once that many are back already, the caller is told not to sleep.
    for t in 0..4 {
        p.driver.add(&b, &[], t).unwrap();
    }
    for _ in 0..4 {
        let c = p.device.pop().unwrap().unwrap();
        p.device.add_used(c.head(), 0).unwrap();
    }
    assert!(p.driver.enable_notifications_delayed());

    // Without EVENT_IDX there is nothing to delay: the first chain back notifies.
    let mut p = pair(8, PLAIN);
    for t in 0..4 {
        p.driver.add(&b, &[], t).unwrap();
    }
    assert!(!p.driver.enable_notifications_delayed());
    let c = p.device.pop().unwrap().unwrap();
    p.device.add_used(c.head(), 0).unwrap();
    assert!(p.device.needs_notification());
}

#[test]
fn reset_returns_every_token_and_retires_every_buffer() {
    let mut p = pair(8, PLAIN | Features::INDIRECT_DESC);
    for t in 0..5 {
        let ins = bufs(&p.arena, &[16, 16]);
        p.driver.add(&[], &ins, t).unwrap();
    }
    let c = p.device.pop().unwrap().unwrap();
    p.device.add_used(c.head(), 3).unwrap();
    let mut tokens = p.driver.reset();
    tokens.sort_unstable();
    assert_eq!(tokens, vec![0, 1, 2, 3, 4]);
    assert_eq!(p.driver.share().live, 0);
    assert_eq!((p.driver.num_free(), p.driver.outstanding()), (8, 0));
    assert!((0..8).all(|s| get(&p.ring, s) == PackedDescriptor::default()));
    // A fresh device over the zeroed ring works with the reset driver, from slot 0
    // and wrap counter 1 again.
    let mut device = PackedDevice::new(8, p.driver.ring_memory(), p.arena.clone(), PLAIN).unwrap();
    let b = bufs(&p.arena, &[4]);
    p.driver.add(&b, &[], 9).unwrap();
    let c = device.pop().unwrap().unwrap();
    device.add_used(c.head(), 0).unwrap();
    assert_eq!(p.driver.pop_used().unwrap().unwrap().token, 9);
}

#[test]
fn rings_need_writable_areas_on_the_right_side() {
    let arena = Arena::new(0x10_0000, 1 << 20).unwrap();
    let (_, ring) = arena.alloc_packed_ring(5).unwrap();
    let dev = RingMemory {
        driver: ring.driver.read_only(),
        ..ring.clone()
    };
    assert!(PackedDevice::new(5, &dev, arena.clone(), PLAIN).is_ok());
    let share = IdentityShare::new(arena.clone(), 8);
    assert!(matches!(
        PackedDriver::<_, ()>::new(5, dev.clone(), share, PLAIN),
        Err(RingSetupError::NotWritable("driver event suppression"))
    ));
    // Unlike a split device, a packed device writes the descriptor ring.
    let ro_desc = RingMemory {
        desc: ring.desc.read_only(),
        ..dev.clone()
    };
    assert!(matches!(
        PackedDevice::new(5, &ro_desc, arena.clone(), PLAIN),
        Err(RingSetupError::NotWritable("descriptor ring"))
    ));
    assert!(matches!(
        PackedDevice::new(0, &ring, arena.clone(), PLAIN),
        Err(RingSetupError::BadSize(0))
    ));
    assert!(matches!(
        PackedDevice::new(6, &ring, arena, PLAIN),
        Err(RingSetupError::Area {
            area: "descriptor ring",
            ..
        })
    ));
}

#[test]
fn lap_positions_wrap_and_cross_like_the_spec_says() {
    let arena = Arena::new(0x10_0000, 1 << 20).unwrap();
    let (_, ring) = arena.alloc_packed_ring(5).unwrap();
    let v = Views::new(5, &ring, (false, false, false)).unwrap();
    // Lap positions 0..5 are slots 0..5 with wrap counter 1, 5..10 with 0.
    assert_eq!((v.slot(7), v.wrap(7), v.encode(7)), (2, false, 2));
    assert_eq!((v.slot(2), v.wrap(2), v.encode(2)), (2, true, 0x8002));
    assert_eq!(v.advance(8, 3), 1);
    assert_eq!(v.advance(9, 5), 4);
    assert_eq!(v.decode(0x8004), Some(4));
    assert_eq!(v.decode(0x0004), Some(9));
    assert_eq!(v.decode(0x8005), None);
    assert_eq!(v.distance(8, 1), 3);
    // Moving 3 slots from lap position 8 passes 8, 9, 0 and not 1.
    assert!(v.crossed(8, 8, 3) && v.crossed(9, 8, 3) && v.crossed(0, 8, 3));
    assert!(!v.crossed(1, 8, 3) && !v.crossed(7, 8, 3));
    assert!(!v.crossed(8, 8, 0));
    // A whole period or more passes everything.
    assert!((0..10).all(|e| v.crossed(e, 3, 10)));
    // The availability and use rules of §2.8.1.
    assert!(Views::is_avail(AVAIL1, true) && Views::is_avail(AVAIL0, false));
    assert!(!Views::is_avail(AVAIL1, false) && !Views::is_avail(AVAIL0, true));
    assert!(!Views::is_avail(0, true) && !Views::is_avail(AVAIL1 | AVAIL0, true));
    assert!(Views::is_used(AVAIL1 | VIRTQ_DESC_F_USED, true) && Views::is_used(0, false));
    assert!(!Views::is_used(AVAIL1, true) && !Views::is_used(AVAIL0, false));
}

/// One step of a random interleaving of both sides.
#[derive(Debug, Clone)]
enum Op {
    /// Add a request with these readable and writable buffer lengths.
    Add(Vec<u32>, Vec<u32>),
    /// Ask whether to kick.
    Kick,
    /// The device takes up to n chains.
    Pop(u8),
    /// The device completes the k-th held chain (mod count), writing a fraction of it.
    Complete(u8, u8),
    /// The driver reclaims up to n used requests.
    Reclaim(u8),
    /// The driver goes to sleep (enables notifications, maybe delayed), or the device does.
    DriverSleep(bool),
    DeviceSleep,
}

fn op() -> impl Strategy<Value = Op> {
    let lens = || prop::collection::vec(1u32..300, 0..3);
    prop_oneof![
        3 => (lens(), lens()).prop_map(|(o, i)| Op::Add(o, i)),
        2 => Just(Op::Kick),
        2 => (1u8..6).prop_map(Op::Pop),
        3 => (any::<u8>(), any::<u8>()).prop_map(|(k, f)| Op::Complete(k, f)),
        2 => (1u8..6).prop_map(Op::Reclaim),
        1 => any::<bool>().prop_map(Op::DriverSleep),
        1 => Just(Op::DeviceSleep),
    ]
}

/// An independent model of one side's ring position (slot and wrap counter), to
/// check event suppression against the rule of §2.8.10 as the spec words it: a
/// notification is due when a descriptor at the event's offset and wrap counter was
/// made available (or used) since the last check.
#[derive(Debug, Clone, Copy)]
struct Pos {
    slot: u16,
    wrap: bool,
}

impl Pos {
    const START: Pos = Pos { slot: 0, wrap: true };

    /// Steps over `n` slots of a ring of `size`, recording each one passed.
    fn step(&mut self, n: u16, size: u16, passed: &mut Vec<(u16, bool)>) {
        for _ in 0..n {
            passed.push((self.slot, self.wrap));
            self.slot += 1;
            if self.slot == size {
                self.slot = 0;
                self.wrap = !self.wrap;
            }
        }
    }
}

/// What the spec says the other side asked for, given its event suppression
/// structure and the slots passed since the last decision.
fn spec_wants(desc: u16, flags: u16, event_idx: bool, passed: &[(u16, bool)]) -> bool {
    match flags {
        RING_EVENT_FLAGS_DISABLE => false,
        RING_EVENT_FLAGS_DESC if event_idx => passed.contains(&(desc & 0x7fff, desc & 0x8000 != 0)),
        _ => !passed.is_empty(),
    }
}

/// Runs `ops` on a queue of `size` and checks: every token comes back exactly once
/// with the exact length, no notification a sleeping side needs is suppressed, and
/// every notification decision on both sides is the spec's (§2.8.10).
fn run_interleaving(size: u16, features: Features, ops: &[Op]) {
    let mut p = pair(size, features);
    let event_idx = features.contains(Features::EVENT_IDX);
    let indirect = features.contains(Features::INDIRECT_DESC);
    let pool = bufs(&p.arena, &[300; 6]);

    let mut next_token = 1u32;
    // token -> (writable bytes, bytes the device will report)
    let mut outstanding: HashMap<u32, (u32, Option<u32>)> = HashMap::new();
    // token -> ring slots its list took
    let mut slots_of: HashMap<u32, u16> = HashMap::new();
    let mut held: Vec<(Chain, u32)> = Vec::new();
    let mut driver_asleep = false;
    let mut device_asleep = false;
    let mut token_of_id: HashMap<u16, u32> = HashMap::new();
    let mut added_while_device_asleep = false;
    let (mut avail_pos, mut used_pos) = (Pos::START, Pos::START);
    let mut added: Vec<(u16, bool)> = Vec::new();
    let mut used: Vec<(u16, bool)> = Vec::new();

    for op in ops {
        match op {
            Op::Add(o, i) if !o.is_empty() || !i.is_empty() => {
                let out: Vec<_> = o
                    .iter()
                    .enumerate()
                    .map(|(k, &l)| GuestBuf::new(pool[k].addr, l))
                    .collect();
                let ins: Vec<_> = i
                    .iter()
                    .enumerate()
                    .map(|(k, &l)| GuestBuf::new(pool[3 + k].addr, l))
                    .collect();
                let total = u16::try_from(o.len() + i.len()).unwrap();
                match p.driver.add(&out, &ins, next_token) {
                    Ok(id) => {
                        let n = if indirect && total > 1 { 1 } else { total };
                        avail_pos.step(n, size, &mut added);
                        outstanding.insert(next_token, (i.iter().sum(), None));
                        slots_of.insert(next_token, n);
                        assert!(token_of_id.insert(id, next_token).is_none(), "id {id} reused");
                        next_token += 1;
                        added_while_device_asleep |= device_asleep;
                    }
                    Err(r) => assert!(
                        matches!(r.error, AddError::NoSpace { .. } | AddError::TooLong(_)),
                        "{r:?}"
                    ),
                }
            }
            Op::Add(..) => {}
            Op::Kick => {
                let (desc, flags) = device_event(&p.ring);
                let want = spec_wants(desc, flags, event_idx, &added);
                added.clear();
                let kick = p.driver.kick_prepare();
                assert_eq!(kick, want, "kick decision, event {desc:#x}/{flags}");
                if device_asleep && added_while_device_asleep {
                    assert!(kick, "device asleep, work published, no kick");
                }
                if kick {
                    device_asleep = false;
                }
            }
            Op::Pop(n) => {
                p.device.disable_notifications();
                device_asleep = false;
                for _ in 0..*n {
                    match p.device.pop().unwrap() {
                        Some(c) => {
                            let t = token_of_id[&c.head()];
                            held.push((c, t));
                        }
                        None => break,
                    }
                }
            }
            Op::Complete(k, f) if !held.is_empty() => {
                let (c, t) = held.remove(usize::from(*k) % held.len());
                let len = u32::try_from(u64::from(c.writable_len()) * u64::from(*f) / 255).unwrap();
                outstanding.get_mut(&t).unwrap().1 = Some(len);
                p.device.add_used(c.head(), len).unwrap();
                used_pos.step(slots_of[&t], size, &mut used);
                let mut e = EventSuppress::default();
                p.ring.driver.read(0, e.as_mut_bytes()).unwrap();
                let want = spec_wants(e.desc.get(), e.flags.get(), event_idx, &used);
                used.clear();
                let notify = p.device.needs_notification();
                assert_eq!(notify, want, "notify decision, event {e:?}");
                if notify {
                    driver_asleep = false;
                } else {
                    assert!(!driver_asleep, "driver asleep, buffer used, no notification");
                }
            }
            Op::Complete(..) => {}
            Op::Reclaim(n) => {
                p.driver.disable_notifications();
                driver_asleep = false;
                for _ in 0..*n {
                    match p.driver.pop_used().unwrap() {
                        Some(u) => {
                            let (_, reported) = outstanding.remove(&u.token).expect("token returned twice");
                            assert_eq!(Some(u.len), reported, "length of token {}", u.token);
                            token_of_id.retain(|_, t| *t != u.token);
                        }
                        None => break,
                    }
                }
            }
            Op::DriverSleep(delayed) => {
                // A delayed wake-up is not promised for the first chain back.
                let ready = if *delayed {
                    p.driver.enable_notifications_delayed()
                } else {
                    p.driver.enable_notifications()
                };
                driver_asleep = !ready && !*delayed;
            }
            Op::DeviceSleep => {
                device_asleep = !p.device.enable_notifications();
                added_while_device_asleep = false;
            }
        }
    }
    // Drain everything: each remaining token exactly once.
    for (c, t) in held.drain(..) {
        outstanding.get_mut(&t).unwrap().1 = Some(0);
        p.device.add_used(c.head(), 0).unwrap();
    }
    while let Some(c) = p.device.pop().unwrap() {
        let t = token_of_id[&c.head()];
        outstanding.get_mut(&t).unwrap().1 = Some(c.writable_len());
        p.device.add_used(c.head(), c.writable_len()).unwrap();
    }
    while let Some(u) = p.driver.pop_used().unwrap() {
        let (_, reported) = outstanding.remove(&u.token).expect("token returned twice");
        assert_eq!(Some(u.len), reported);
    }
    assert!(outstanding.is_empty(), "tokens never returned: {outstanding:?}");
    assert_eq!(p.driver.num_free(), size);
    assert_eq!(p.device.in_flight(), 0);
    assert_eq!(p.driver.share().live, 0);
}

fn features_strategy() -> impl Strategy<Value = Features> {
    (any::<bool>(), any::<bool>()).prop_map(|(i, e)| {
        let mut f = PLAIN;
        f.set(Features::INDIRECT_DESC, i);
        f.set(Features::EVENT_IDX, e);
        f
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_keep_every_invariant(
        size in prop_oneof![Just(1u16), Just(3), Just(5), Just(8), Just(13)],
        features in features_strategy(),
        ops in prop::collection::vec(op(), 1..400),
    ) {
        run_interleaving(size, features, &ops);
    }
}

/// A long deterministic run over many laps of a small odd-sized ring, with random
/// out-of-order completion and lists of random length, direct and indirect.
#[test]
fn thousands_of_laps_with_out_of_order_completion() {
    // xorshift: reproducible without a seed file.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let ops: Vec<Op> = (0..60_000)
        .map(|_| match rnd(10) {
            0..=2 => {
                let o = (0..rnd(3))
                    .map(|_| 1 + u32::try_from(rnd(200)).unwrap())
                    .collect();
                let i = (0..rnd(3))
                    .map(|_| 1 + u32::try_from(rnd(200)).unwrap())
                    .collect();
                Op::Add(o, i)
            }
            3 => Op::Kick,
            4 | 5 => Op::Pop(u8::try_from(1 + rnd(4)).unwrap()),
            6 | 7 => Op::Complete(u8::try_from(rnd(256)).unwrap(), u8::try_from(rnd(256)).unwrap()),
            8 => Op::Reclaim(u8::try_from(1 + rnd(4)).unwrap()),
            _ => {
                if rnd(2) == 0 {
                    Op::DriverSleep(rnd(2) == 0)
                } else {
                    Op::DeviceSleep
                }
            }
        })
        .collect();
    for features in [
        PLAIN,
        PLAIN | Features::EVENT_IDX,
        PLAIN | Features::INDIRECT_DESC | Features::EVENT_IDX,
    ] {
        run_interleaving(7, features, &ops);
    }
}

// --- Hostile drivers (HOSTILE 41 to 46) and a hostile device (HOSTILE 47) ---

/// A device over a ring a test writes by hand, as a hostile driver.
fn raw(size: u16, features: Features) -> (Arc<Arena>, RingMemory, PackedDevice<Arc<Arena>>) {
    let arena = Arena::new(0x4000_0000, 1 << 20).unwrap();
    let (_, ring) = arena.alloc_packed_ring(size).unwrap();
    let device = PackedDevice::new(size, &ring, arena.clone(), features).unwrap();
    (arena, ring, device)
}

fn needs_reset(r: Result<Option<Chain>, DeviceQueueError>) -> RingFault {
    match r {
        Err(DeviceQueueError::NeedsReset(f)) => f,
        other => panic!("expected needs-reset, got {other:?}"),
    }
}

fn bad_chain(r: Result<Option<Chain>, DeviceQueueError>) -> (u16, ChainError) {
    match r {
        Err(DeviceQueueError::BadChain { head, source }) => (head, source),
        other => panic!("expected a rejected chain, got {other:?}"),
    }
}

/// HOSTILE 41.
#[test]
fn descriptors_not_marked_available_for_the_wrap_counter_are_not_consumed() {
    let (arena, ring, mut dev) = raw(4, PLAIN);
    let buf = arena.alloc(64, 8).unwrap();
    // Zeroed, marked for the other lap, marked used: none is available in lap 1.
    for flags in [0, AVAIL0, AVAIL1 | VIRTQ_DESC_F_USED] {
        put(&ring, 0, PackedDescriptor::new(buf, 64, 0, flags));
        assert!(dev.pop().unwrap().is_none(), "flags {flags:#x} consumed");
        assert!(!dev.enable_notifications());
    }
    // A driver that writes lap-2 flags ahead of the device is not heard either:
    // the device looks at one slot only, its next one.
    put(&ring, 1, PackedDescriptor::new(buf, 64, 1, AVAIL0));
    assert!(dev.pop().unwrap().is_none());
    // Honest flags for lap 1: served, once.
    for slot in 0..4 {
        put(&ring, slot, PackedDescriptor::new(buf, 64, slot, AVAIL1));
    }
    for id in 0..4 {
        let c = dev.pop().unwrap().unwrap();
        assert_eq!(c.head(), id);
        dev.add_used(id, 0).unwrap();
    }
    // Lap 2 (wrap counter 0): a driver that re-marks slot 0 with lap-1 flags, its
    // wrap counter lying, does not get it served again.
    put(&ring, 0, PackedDescriptor::new(buf, 64, 0, AVAIL1));
    assert!(dev.pop().unwrap().is_none());
    assert_eq!(dev.in_flight(), 0);
    put(&ring, 0, PackedDescriptor::new(buf, 64, 0, AVAIL0));
    assert_eq!(dev.pop().unwrap().unwrap().head(), 0);
}

/// HOSTILE 42.
#[test]
fn buffer_ids_out_of_range_or_in_flight_are_never_served() {
    let (arena, ring, mut dev) = raw(4, PLAIN);
    let buf = arena.alloc(64, 8).unwrap();
    put(&ring, 0, PackedDescriptor::new(buf, 64, 4, AVAIL1));
    assert_eq!(
        needs_reset(dev.pop()),
        RingFault::HeadOutOfRange { head: 4, size: 4 }
    );
    assert_eq!(dev.fault(), Some(RingFault::HeadOutOfRange { head: 4, size: 4 }));
    // Sticky.
    assert!(matches!(dev.pop(), Err(DeviceQueueError::NeedsReset(_))));

    let (arena, ring, mut dev) = raw(4, PLAIN);
    let buf = arena.alloc(64, 8).unwrap();
    // The id is the last descriptor's (§2.8.6), whatever the others say.
    put(
        &ring,
        0,
        PackedDescriptor::new(buf, 8, 3, AVAIL1 | VIRTQ_DESC_F_NEXT),
    );
    put(&ring, 1, PackedDescriptor::new(buf, 8, 1, AVAIL1));
    let c = dev.pop().unwrap().unwrap();
    assert_eq!((c.head(), c.readable_len()), (1, 16));
    // Id 1 again while the device holds it.
    put(&ring, 2, PackedDescriptor::new(buf, 64, 1, AVAIL1));
    assert_eq!(needs_reset(dev.pop()), RingFault::IdInFlight { id: 1 });
    assert_eq!(dev.in_flight(), 1);
    // The held chain can still be returned, once.
    dev.add_used(1, 0).unwrap();
    assert_eq!(dev.add_used(1, 0), Err(UsedError::NotInFlight(1)));
}

/// HOSTILE 43.
#[test]
fn a_list_running_past_the_free_slots_is_refused_without_a_hang() {
    let (arena, ring, mut dev) = raw(4, PLAIN);
    let buf = arena.alloc(64, 8).unwrap();
    // Every slot says NEXT: a loop around the ring.
    for slot in 0..4 {
        put(
            &ring,
            slot,
            PackedDescriptor::new(buf, 8, 0, AVAIL1 | VIRTQ_DESC_F_NEXT),
        );
    }
    assert_eq!(needs_reset(dev.pop()), RingFault::ListOverrunsRing { room: 4 });

    // With one list held, only the other three slots are the driver's.
    let (arena, ring, mut dev) = raw(4, PLAIN);
    let buf = arena.alloc(64, 8).unwrap();
    put(&ring, 0, PackedDescriptor::new(buf, 8, 0, AVAIL1));
    dev.pop().unwrap().unwrap();
    for slot in 1..4 {
        put(
            &ring,
            slot,
            PackedDescriptor::new(buf, 8, 1, AVAIL1 | VIRTQ_DESC_F_NEXT),
        );
    }
    assert_eq!(needs_reset(dev.pop()), RingFault::ListOverrunsRing { room: 3 });

    // A list filling exactly the free slots is fine.
    let (arena, ring, mut dev) = raw(3, PLAIN);
    let buf = arena.alloc(64, 8).unwrap();
    put(
        &ring,
        0,
        PackedDescriptor::new(buf, 8, 0, AVAIL1 | VIRTQ_DESC_F_NEXT),
    );
    put(
        &ring,
        1,
        PackedDescriptor::new(buf, 8, 0, AVAIL1 | VIRTQ_DESC_F_NEXT),
    );
    put(
        &ring,
        2,
        PackedDescriptor::new(buf, 8, 2, AVAIL1 | VIRTQ_DESC_F_WRITE),
    );
    let c = dev.pop().unwrap().unwrap();
    assert_eq!((c.head(), c.readable_len(), c.writable_len()), (2, 16, 8));
    // The ring is all the device's now: it does not even look.
    assert!(dev.pop().unwrap().is_none());
}

/// Writes an indirect table of packed descriptors into the arena.
fn table(arena: &Arena, entries: &[PackedDescriptor]) -> (u64, u32) {
    let bytes = entries.as_bytes();
    let addr = arena.alloc(bytes.len() as u64, 16).unwrap();
    arena.write(addr, bytes).unwrap();
    (addr, u32::try_from(bytes.len()).unwrap())
}

/// HOSTILE 44.
#[test]
fn indirect_descriptors_stand_alone_and_never_nest() {
    let features = PLAIN | Features::INDIRECT_DESC;
    let (arena, ring, mut dev) = raw(8, features);
    let buf = arena.alloc(64, 8).unwrap();
    // Entries are consecutive: NEXT flags and ids inside the table are ignored.
    let (t, tlen) = table(
        &arena,
        &[
            PackedDescriptor::new(buf, 8, 7, VIRTQ_DESC_F_NEXT),
            PackedDescriptor::new(buf + 8, 8, 9, 0),
            PackedDescriptor::new(buf + 16, 16, 0, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT),
        ],
    );
    put(
        &ring,
        0,
        PackedDescriptor::new(t, tlen, 5, AVAIL1 | VIRTQ_DESC_F_INDIRECT),
    );
    let c = dev.pop().unwrap().unwrap();
    assert_eq!((c.head(), c.readable_len(), c.writable_len()), (5, 16, 16));
    dev.add_used(5, 0).unwrap();

    // An indirect descriptor inside the table.
    let (t2, t2len) = table(
        &arena,
        &[PackedDescriptor::new(t, tlen, 0, VIRTQ_DESC_F_INDIRECT)],
    );
    put(
        &ring,
        1,
        PackedDescriptor::new(t2, t2len, 2, AVAIL1 | VIRTQ_DESC_F_INDIRECT),
    );
    let (id, e) = bad_chain(dev.pop());
    assert!(matches!((id, &e), (2, ChainError::NestedIndirect)), "{e:?}");
    // Returned at once with length 0 at the next used slot.
    let u = get(&ring, 1);
    assert_eq!((u.id.get(), u.len.get()), (2, 0));
    assert!(Views::is_used(u.flags.get(), true));

    // A direct descriptor followed by an indirect one: one list, two types.
    put(
        &ring,
        2,
        PackedDescriptor::new(buf, 8, 0, AVAIL1 | VIRTQ_DESC_F_NEXT),
    );
    put(
        &ring,
        3,
        PackedDescriptor::new(t, tlen, 3, AVAIL1 | VIRTQ_DESC_F_INDIRECT),
    );
    let (id, e) = bad_chain(dev.pop());
    assert!(matches!((id, &e), (3, ChainError::IndirectInList)), "{e:?}");
    // INDIRECT with NEXT.
    put(
        &ring,
        4,
        PackedDescriptor::new(t, tlen, 0, AVAIL1 | VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT),
    );
    put(&ring, 5, PackedDescriptor::new(buf, 8, 4, AVAIL1));
    let (id, e) = bad_chain(dev.pop());
    assert!(matches!((id, &e), (4, ChainError::IndirectWithNext)), "{e:?}");
    // Each rejected list's used descriptor skips its two slots: used descriptors
    // at slots 2 and 4, and the device goes on at slot 6.
    assert_eq!((get(&ring, 2).id.get(), get(&ring, 4).id.get()), (3, 4));
    assert_eq!(dev.next_avail(), 0x8006);
    assert_eq!(dev.in_flight(), 0);

    // INDIRECT without the feature.
    let (arena, ring, mut dev) = raw(8, PLAIN);
    let (t, tlen) = table(&arena, &[PackedDescriptor::new(0x4000_0000, 8, 0, 0)]);
    put(
        &ring,
        0,
        PackedDescriptor::new(t, tlen, 0, AVAIL1 | VIRTQ_DESC_F_INDIRECT),
    );
    let (_, e) = bad_chain(dev.pop());
    assert!(matches!(e, ChainError::IndirectNotNegotiated), "{e:?}");
}

/// A sharing model whose first range check rewrites the ring under the device: the
/// driver changing descriptors between the device's reads.
struct Scribbler {
    arena: Arc<Arena>,
    ring: RingMemory,
    done: std::sync::atomic::AtomicBool,
}

impl crate::access::DeviceMemory for Scribbler {
    fn check(&self, seg: &crate::access::Segment) -> Result<(), crate::access::AccessError> {
        if !self.done.swap(true, std::sync::atomic::Ordering::Relaxed) {
            for slot in 0..4 {
                let flags = AVAIL1 | VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE;
                put(
                    &self.ring,
                    slot,
                    PackedDescriptor::new(u64::MAX - 4, u32::MAX, 3, flags),
                );
            }
        }
        self.arena.check(seg)
    }

    fn read(
        &self,
        seg: &crate::access::Segment,
        offset: u32,
        dst: &mut [u8],
    ) -> Result<(), crate::access::AccessError> {
        crate::access::DeviceMemory::read(&*self.arena, seg, offset, dst)
    }

    fn write(
        &self,
        seg: &crate::access::Segment,
        offset: u32,
        src: &[u8],
    ) -> Result<(), crate::access::AccessError> {
        crate::access::DeviceMemory::write(&*self.arena, seg, offset, src)
    }
}

/// HOSTILE 45.
#[test]
fn a_list_changed_under_the_device_is_served_as_first_read() {
    let arena = Arena::new(0x4000_0000, 1 << 20).unwrap();
    let (_, ring) = arena.alloc_packed_ring(4).unwrap();
    let mem = Scribbler {
        arena: arena.clone(),
        ring: ring.clone(),
        done: false.into(),
    };
    let mut dev = PackedDevice::new(4, &ring, mem, PLAIN).unwrap();
    let buf = arena.alloc(64, 8).unwrap();
    put(
        &ring,
        0,
        PackedDescriptor::new(buf, 8, 0, AVAIL1 | VIRTQ_DESC_F_NEXT),
    );
    put(
        &ring,
        1,
        PackedDescriptor::new(buf + 8, 24, 1, AVAIL1 | VIRTQ_DESC_F_WRITE),
    );
    let c = dev.pop().unwrap().unwrap();
    // The whole list was copied before the first range check rewrote the ring.
    assert_eq!((c.head(), c.readable_len(), c.writable_len()), (1, 8, 24));
    assert_eq!(c.writable()[0].addr(), buf + 8);
    assert_eq!(dev.next_avail(), 0x8002, "two slots taken, not more");
    dev.add_used(1, 24).unwrap();
    let u = get(&ring, 0);
    assert_eq!((u.id.get(), u.len.get()), (1, 24));
}

/// HOSTILE 46.
#[test]
fn event_suppression_garbage_only_costs_notifications() {
    for features in [PLAIN, PLAIN | Features::EVENT_IDX] {
        let mut p = pair(4, features);
        let b = bufs(&p.arena, &[8]);
        // Reserved flags, an offset outside the ring, DESC without EVENT_IDX, an
        // event far away: never a panic, and garbage notifies rather than not.
        let cases = [
            ((0xffff, 3), true),
            ((0x7fff, RING_EVENT_FLAGS_DESC), true),
            ((0x8004, RING_EVENT_FLAGS_DESC), true),
            ((0x0000, 0xffff), true),
            ((0x1234, RING_EVENT_FLAGS_DISABLE), false),
        ];
        for ((desc, flags), want) in cases {
            p.driver.add(&[], &b, 0).unwrap();
            let c = p.device.pop().unwrap().unwrap();
            set_driver_event(&p.ring, desc, flags);
            p.device.add_used(c.head(), 8).unwrap();
            assert_eq!(p.device.needs_notification(), want, "{desc:#x}/{flags:#x}");
            assert_eq!(p.driver.pop_used().unwrap().unwrap().len, 8);
        }
        // A device scribbling on its own area only changes kicks, the same way.
        for (desc, flags) in [(0xffff, 0xffff), (0x7fff, RING_EVENT_FLAGS_DESC)] {
            p.ring
                .device
                .write(
                    0,
                    EventSuppress {
                        desc: desc.into(),
                        flags: flags.into(),
                    }
                    .as_bytes(),
                )
                .unwrap();
            p.driver.add(&[], &b, 0).unwrap();
            assert!(p.driver.kick_prepare());
            let c = p.device.pop().unwrap().unwrap();
            p.device.add_used(c.head(), 0).unwrap();
            p.driver.pop_used().unwrap().unwrap();
        }
    }
}

/// HOSTILE 47: the packed driver side never trusts the device (as HOSTILE 31).
#[test]
fn the_driver_checks_every_used_descriptor() {
    let used1 = AVAIL1 | VIRTQ_DESC_F_USED;
    // An id that is not outstanding.
    let mut p = pair(4, PLAIN);
    let b = bufs(&p.arena, &[8]);
    let id = p.driver.add(&[], &b, 0).unwrap();
    let other = (id + 1) % 4;
    put(&p.ring, 0, PackedDescriptor::new(0, 0, other, used1));
    assert_eq!(
        p.driver.pop_used(),
        Err(DriverQueueError::UnknownId(u32::from(other)))
    );
    assert!(p.driver.is_broken());
    assert!(matches!(
        p.driver.add(&[], &b, 1).unwrap_err().error,
        AddError::Broken
    ));
    assert_eq!(p.driver.pop_used(), Err(DriverQueueError::Broken));
    // Reset brings it back.
    assert_eq!(p.driver.reset(), vec![0]);
    assert!(!p.driver.is_broken());

    // A length above the writable bytes.
    let mut p = pair(4, PLAIN);
    let id = p.driver.add(&[], &b, 0).unwrap();
    put(
        &p.ring,
        0,
        PackedDescriptor::new(0, 9, id, used1 | VIRTQ_DESC_F_WRITE),
    );
    assert_eq!(
        p.driver.pop_used(),
        Err(DriverQueueError::LengthTooLarge {
            head: id,
            len: 9,
            writable: 8
        })
    );

    // Without WRITE the length is reserved (§2.8.4): nothing was written.
    let mut p = pair(4, PLAIN);
    let id = p.driver.add(&[], &b, 0).unwrap();
    put(&p.ring, 0, PackedDescriptor::new(0, 1 << 30, id, used1));
    assert_eq!(p.driver.pop_used().unwrap().unwrap(), Used { token: 0, len: 0 });

    // AVAIL and USED disagreeing, or the other lap's used bits: not used.
    let mut p = pair(4, PLAIN);
    let id = p.driver.add(&[], &b, 0).unwrap();
    for flags in [VIRTQ_DESC_F_USED, AVAIL1, 0] {
        put(&p.ring, 0, PackedDescriptor::new(0, 0, id, flags));
        assert_eq!(p.driver.pop_used(), Ok(None));
        assert!(!p.driver.enable_notifications());
    }
    // A used descriptor where nothing is outstanding.
    let mut p = pair(4, PLAIN);
    put(&p.ring, 0, PackedDescriptor::new(0, 0, 0, used1));
    assert_eq!(p.driver.pop_used(), Err(DriverQueueError::UnknownId(0)));
}

/// IN_ORDER on the wire (§2.8.x "In-order use of descriptors"): buffers finished in
/// reverse come back as one used descriptor over the batch's first descriptor, with
/// the id of its last buffer; the device skips the slots of the whole batch, and
/// the driver, which infers the rest, finds the next batch where the device put it.
#[test]
fn in_order_batches_write_one_used_descriptor_over_the_first() {
    let f = PLAIN | Features::IN_ORDER;
    let mut p = pair(5, f);
    let out = bufs(&p.arena, &[4]);
    let ins = bufs(&p.arena, &[16]);
    for lap in 0..4u32 {
        // Two lists of two slots each: laps of a 5-slot ring start anywhere.
        let first_slot = u16::try_from((lap * 4) % 5).unwrap();
        let ids: Vec<u16> = (0..2)
            .map(|t| p.driver.add(&out, &ins, lap * 2 + t).unwrap())
            .collect();
        let chains: Vec<Chain> = (0..2).map(|_| p.device.pop().unwrap().unwrap()).collect();
        p.device.add_used(chains[1].head(), 16).unwrap();
        assert_eq!(p.device.in_flight(), 2, "held until the older buffer is done");
        p.device.add_used(chains[0].head(), 16).unwrap();
        let used = get(&p.ring, first_slot);
        assert_eq!((used.id.get(), used.len.get()), (ids[1], 16));
        let second = get(&p.ring, (first_slot + 2) % 5);
        assert_eq!(
            second.id.get(),
            ids[1],
            "the second list's head is left as the driver wrote it"
        );
        assert_eq!(
            second.flags.get() & VIRTQ_DESC_F_WRITE,
            0,
            "not a used descriptor"
        );
        let back: Vec<_> = std::iter::from_fn(|| p.driver.pop_used().unwrap())
            .map(|u| (u.token, u.len))
            .collect();
        assert_eq!(back, [(lap * 2, 16), (lap * 2 + 1, 16)]);
    }
    assert_eq!((p.driver.num_free(), p.device.in_flight()), (5, 0));
}

/// In order, a used descriptor naming an id that is not outstanding breaks the
/// driver, and so does a length past the last buffer's writable bytes (HOSTILE 31).
#[test]
fn in_order_used_descriptors_are_checked_like_any_other() {
    let f = PLAIN | Features::IN_ORDER;
    for (id, len) in [(3u16, 0u32), (1, 17)] {
        let mut p = pair(4, f);
        let ins = bufs(&p.arena, &[16]);
        for t in 0..2 {
            p.driver.add(&[], &ins, t).unwrap();
        }
        put(
            &p.ring,
            0,
            PackedDescriptor::new(0, len, id, AVAIL1 | AVAIL0 | VIRTQ_DESC_F_WRITE),
        );
        let r = p.driver.pop_used();
        if id == 3 {
            assert_eq!(r, Err(DriverQueueError::UnknownId(3)));
        } else {
            assert_eq!(
                r,
                Err(DriverQueueError::LengthTooLarge {
                    head: 1,
                    len: 17,
                    writable: 16
                })
            );
        }
        assert!(p.driver.is_broken());
    }
}
