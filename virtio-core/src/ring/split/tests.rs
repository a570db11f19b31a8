//! Tests of the split ring, driver and device side against each other and against hostile rings.

use super::*;
use crate::features::Features;
use crate::ring::Chain;
use crate::share::GuestBuf;
use crate::test_utils::{Arena, IdentityShare};
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

struct Pair {
    arena: Arc<Arena>,
    driver: SplitDriver<IdentityShare, u32>,
    device: SplitDevice<Arc<Arena>>,
}

fn pair(size: u16, features: Features) -> Pair {
    let arena = Arena::new(0x4000_0000, 4 << 20).unwrap();
    let (_, ring) = arena.alloc_split_ring(size).unwrap();
    let share = IdentityShare::new(arena.clone(), size);
    let driver = SplitDriver::new(size, ring.clone(), share, features).unwrap();
    let device = SplitDevice::new(size, &ring, arena.clone(), features).unwrap();
    Pair {
        arena,
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

#[test]
fn round_trip_direct_and_indirect() {
    for features in [PLAIN, PLAIN | Features::INDIRECT_DESC] {
        let mut p = pair(8, features);
        let out = bufs(&p.arena, &[3, 5]);
        p.arena.write(out[0].addr, b"abc").unwrap();
        p.arena.write(out[1].addr, b"defgh").unwrap();
        let ins = bufs(&p.arena, &[4, 8]);
        p.driver.add(&out, &ins, 7).unwrap();
        let expect_free = if features.contains(Features::INDIRECT_DESC) {
            7
        } else {
            4
        };
        assert_eq!(p.driver.num_free(), expect_free);

        let chain = p.device.pop().unwrap().unwrap();
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
}

#[test]
fn out_of_order_completion() {
    let mut p = pair(8, PLAIN);
    for t in 0..4 {
        let ins = bufs(&p.arena, &[64]);
        p.driver.add(&[], &ins, t).unwrap();
    }
    let chains: Vec<_> = (0..4).map(|_| p.device.pop().unwrap().unwrap()).collect();
    for (i, c) in chains.iter().enumerate().rev() {
        p.device.add_used(c.head(), u32::try_from(i).unwrap()).unwrap();
    }
    let got: Vec<_> = std::iter::from_fn(|| p.driver.pop_used().unwrap()).collect();
    let want: Vec<_> = (0..4).rev().map(|i| Used { token: i, len: i }).collect();
    assert_eq!(got, want);
}

#[test]
fn a_second_device_instance_resumes_where_the_first_stopped() {
    let features = PLAIN | Features::EVENT_IDX;
    let arena = Arena::new(0x4000_0000, 4 << 20).unwrap();
    let (_, ring) = arena.alloc_split_ring(8).unwrap();
    let share = IdentityShare::new(arena.clone(), 8);
    let mut driver: SplitDriver<IdentityShare, u32> =
        SplitDriver::new(8, ring.clone(), share, features).unwrap();
    for t in 0..3 {
        driver.add(&[], &bufs(&arena, &[16]), t).unwrap();
    }
    // The first instance serves two requests and stops with nothing in flight.
    let mut first = SplitDevice::new(8, &ring, arena.clone(), features).unwrap();
    for len in 1..=2 {
        let c = first.pop().unwrap().unwrap();
        first.add_used(c.head(), len).unwrap();
    }
    let at = first.next_avail();
    assert_eq!(at, 2);
    drop(first);
    // The second takes over there: it sees only the third request, and its used
    // entry follows the first instance's.
    let mut second = SplitDevice::new(8, &ring, arena.clone(), features)
        .unwrap()
        .starting_at(at);
    let c = second.pop().unwrap().unwrap();
    assert!(second.pop().unwrap().is_none());
    second.add_used(c.head(), 3).unwrap();
    let got: Vec<_> = std::iter::from_fn(|| driver.pop_used().unwrap()).collect();
    let want: Vec<_> = (0..3).map(|i| Used { token: i, len: i + 1 }).collect();
    assert_eq!(got, want);
    // Without `starting_at`, a new instance would serve the first request again.
    let mut wrong = SplitDevice::new(8, &ring, arena.clone(), features).unwrap();
    driver.add(&[], &bufs(&arena, &[16]), 3).unwrap();
    assert_eq!(wrong.pop().unwrap().unwrap().head(), 0);
}

#[test]
fn device_side_misuse_is_refused() {
    let mut p = pair(8, PLAIN);
    let ins = bufs(&p.arena, &[10]);
    p.driver.add(&[], &ins, 0).unwrap();
    let c = p.device.pop().unwrap().unwrap();
    assert_eq!(
        p.device.add_used(c.head(), 11),
        Err(UsedError::TooLong {
            len: 11,
            writable: 10
        })
    );
    assert_eq!(p.device.add_used(5, 0), Err(UsedError::NotInFlight(5)));
    p.device.add_used(c.head(), 10).unwrap();
    assert_eq!(
        p.device.add_used(c.head(), 0),
        Err(UsedError::NotInFlight(c.head()))
    );
}

#[test]
fn kick_suppression_without_event_idx() {
    let mut p = pair(8, PLAIN);
    let b = bufs(&p.arena, &[8]);
    assert!(!p.driver.kick_prepare(), "nothing added, nothing to kick");
    p.driver.add(&b, &[], 0).unwrap();
    assert!(p.driver.kick_prepare());
    p.device.disable_notifications();
    p.driver.add(&b, &[], 1).unwrap();
    assert!(!p.driver.kick_prepare(), "device asked for no kicks");
    assert!(p.device.enable_notifications(), "work arrived while disabled");
    p.driver.add(&b, &[], 2).unwrap();
    assert!(p.driver.kick_prepare());
}

#[test]
fn kick_suppression_with_event_idx_under_batching() {
    let mut p = pair(16, PLAIN | Features::EVENT_IDX);
    let b = bufs(&p.arena, &[8]);
    // avail_event starts at 0: the first buffer ever added triggers a kick.
    for t in 0..3 {
        p.driver.add(&b, &[], t).unwrap();
    }
    assert!(p.driver.kick_prepare());
    // The device consumes two, then asks to be kicked when entry 3 shows up.
    p.device.pop().unwrap().unwrap();
    p.device.pop().unwrap().unwrap();
    assert!(p.device.enable_notifications(), "entry 2 is still pending");
    p.device.pop().unwrap().unwrap();
    assert!(!p.device.enable_notifications());
    // A batch of several adds crossing avail_event = 3 gives one kick.
    for t in 3..6 {
        p.driver.add(&b, &[], t).unwrap();
    }
    assert!(p.driver.kick_prepare());
    // More adds without the device re-arming: no kick.
    p.driver.add(&b, &[], 6).unwrap();
    assert!(!p.driver.kick_prepare());
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
        if !features.contains(Features::EVENT_IDX) {
            assert!(!p.device.needs_notification(), "driver disabled notifications");
        } else {
            // used_event is left behind when disabling: at most one spurious notification.
            let _ = p.device.needs_notification();
        }
        assert!(
            p.driver.enable_notifications(),
            "re-check finds the second buffer"
        );
        assert_eq!(p.driver.pop_used().unwrap().unwrap().token, 1);
        assert!(!p.driver.enable_notifications());
    }
}

#[test]
fn delayed_notification_waits_for_three_quarters_of_the_outstanding_chains() {
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
    // Once that many are back already, the caller is told not to sleep.
    for t in 0..8 {
        assert_eq!(p.driver.pop_used().unwrap().unwrap().token, t);
    }
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
    // A fresh device over the zeroed ring works with the reset driver.
    let mut device = SplitDevice::new(8, p.driver.ring_memory(), p.arena.clone(), PLAIN).unwrap();
    let b = bufs(&p.arena, &[4]);
    p.driver.add(&b, &[], 9).unwrap();
    let c = device.pop().unwrap().unwrap();
    device.add_used(c.head(), 0).unwrap();
    assert_eq!(p.driver.pop_used().unwrap().unwrap().token, 9);
}

#[test]
fn rings_need_writable_areas_on_the_right_side() {
    let arena = Arena::new(0x10_0000, 1 << 20).unwrap();
    let (_, ring) = arena.alloc_split_ring(8).unwrap();
    let ro = RingMemory {
        desc: ring.desc.read_only(),
        driver: ring.driver.read_only(),
        device: ring.device.clone(),
    };
    assert!(SplitDevice::new(8, &ro, arena.clone(), PLAIN).is_ok());
    let share = IdentityShare::new(arena.clone(), 8);
    assert!(matches!(
        SplitDriver::<_, ()>::new(8, ro.clone(), share, PLAIN),
        Err(RingSetupError::NotWritable(_))
    ));
    let bad_used = RingMemory {
        device: ring.device.read_only(),
        ..ro
    };
    assert!(matches!(
        SplitDevice::new(8, &bad_used, arena.clone(), PLAIN),
        Err(RingSetupError::NotWritable(_))
    ));
    assert!(matches!(
        SplitDevice::new(6, &ring, arena.clone(), PLAIN),
        Err(RingSetupError::BadSize(6))
    ));
    assert!(matches!(
        SplitDevice::new(16, &ring, arena, PLAIN),
        Err(RingSetupError::Area { .. })
    ));
}

/// One step of a random interleaving of both sides.
#[derive(Debug, Clone)]
enum Op {
    /// Add a request with these readable and writable buffer lengths.
    Add(Vec<u32>, Vec<u32>),
    /// Publish the batch (kick if asked).
    Kick,
    /// The device takes up to n chains.
    Pop(u8),
    /// The device completes the k-th held chain (mod count), writing a fraction of it.
    Complete(u8, u8),
    /// The driver reclaims up to n used requests.
    Reclaim(u8),
    /// The driver goes to sleep (enables notifications), or the device does.
    DriverSleep,
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
        1 => Just(Op::DriverSleep),
        1 => Just(Op::DeviceSleep),
    ]
}

/// Runs `ops` after `warmup` plain round trips (to put the indices near the 16-bit
/// wrap) and checks: every token comes back exactly once with the exact length, and no
/// notification that a sleeping side needs is suppressed.
fn run_interleaving(features: Features, warmup: u32, ops: &[Op]) {
    let size = 16;
    let mut p = pair(size, features);
    let pool = bufs(&p.arena, &[300; 6]);
    for _ in 0..warmup {
        p.driver.add(&pool[..1], &pool[1..2], 0).unwrap();
        let c = p.device.pop().unwrap().unwrap();
        p.device.add_used(c.head(), 1).unwrap();
        p.driver.pop_used().unwrap().unwrap();
    }
    let _ = p.driver.kick_prepare();
    let _ = p.device.needs_notification();

    let mut next_token = 1u32;
    // token -> (writable bytes, bytes the device will report)
    let mut outstanding: HashMap<u32, (u32, Option<u32>)> = HashMap::new();
    let mut held: Vec<(Chain, u32)> = Vec::new();
    let mut driver_asleep = false;
    let mut device_asleep = false;
    let mut token_of_head: HashMap<u16, u32> = HashMap::new();
    let mut added_while_device_asleep = false;

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
                match p.driver.add(&out, &ins, next_token) {
                    Ok(head) => {
                        outstanding.insert(next_token, (i.iter().sum(), None));
                        token_of_head.insert(head, next_token);
                        next_token += 1;
                        added_while_device_asleep |= device_asleep;
                    }
                    Err(r) => assert!(matches!(r.error, AddError::NoSpace { .. }), "{r:?}"),
                }
            }
            Op::Add(..) => {}
            Op::Kick => {
                let kick = p.driver.kick_prepare();
                if device_asleep && added_while_device_asleep {
                    assert!(kick, "device asleep, work published, no kick");
                }
                if kick {
                    device_asleep = false;
                }
            }
            Op::Pop(n) => {
                // Polling: the device is awake; it stops asking for kicks while it works.
                p.device.disable_notifications();
                device_asleep = false;
                for _ in 0..*n {
                    match p.device.pop().unwrap() {
                        Some(c) => {
                            let t = token_of_head[&c.head()];
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
                if p.device.needs_notification() {
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
                        }
                        None => break,
                    }
                }
            }
            Op::DriverSleep => {
                driver_asleep = !p.driver.enable_notifications();
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
        let t = token_of_head[&c.head()];
        outstanding.get_mut(&t).unwrap().1 = Some(c.writable_len());
        p.device.add_used(c.head(), c.writable_len()).unwrap();
    }
    while let Some(u) = p.driver.pop_used().unwrap() {
        let (_, reported) = outstanding.remove(&u.token).expect("token returned twice");
        assert_eq!(Some(u.len), reported);
    }
    assert!(outstanding.is_empty(), "tokens never returned: {outstanding:?}");
    assert_eq!(p.driver.num_free(), size);
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
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_keep_every_invariant(
        features in features_strategy(),
        warmup in prop_oneof![Just(0u32), 65_500u32..65_540],
        ops in prop::collection::vec(op(), 1..200),
    ) {
        run_interleaving(features, warmup, &ops);
    }
}

/// IN_ORDER on the wire (§2.7.9): the driver takes descriptors in ring order,
/// wrapping at the end of the table; the device returns chains finished in reverse
/// as one used entry at the batch's first position, naming its last head, and moves
/// used.idx past the whole batch; a chain not used completely gets its own entry.
#[test]
fn in_order_batches_write_one_used_entry_at_the_first_position() {
    let f = PLAIN | Features::IN_ORDER;
    let arena = Arena::new(0x4000_0000, 4 << 20).unwrap();
    let (_, ring) = arena.alloc_split_ring(8).unwrap();
    let views = Views::new(8, &ring, (true, true, true)).unwrap();
    let mut driver = SplitDriver::new(8, ring.clone(), IdentityShare::new(arena.clone(), 8), f).unwrap();
    let mut device = SplitDevice::new(8, &ring, arena.clone(), f).unwrap();
    let out = bufs(&arena, &[4]);
    let ins = bufs(&arena, &[16, 16]);
    // Three chains of three descriptors, twice around a table of 8: heads in ring order.
    let mut heads = Vec::new();
    for round in 0..2u32 {
        for t in 0..2u32 {
            heads.push(driver.add(&out, &ins, round * 2 + t).unwrap());
        }
        let chains: Vec<Chain> = (0..2).map(|_| device.pop().unwrap().unwrap()).collect();
        let used_before = views.used_idx();
        for c in chains.iter().rev() {
            device.add_used(c.head(), c.writable_len()).unwrap();
        }
        assert_eq!(
            views.used_idx(),
            used_before.wrapping_add(2),
            "one step for the batch"
        );
        assert_eq!(
            views.used_elem(used_before),
            (u32::from(chains[1].head()), 32),
            "the entry at the batch's first position names its last chain"
        );
        for t in 0..2 {
            let u = driver.pop_used().unwrap().unwrap();
            assert_eq!((u.token, u.len), (round * 2 + t, 32));
        }
    }
    assert_eq!(
        heads,
        [0, 3, 6, 1],
        "descriptors in ring order, wrapping at the end"
    );
    // The chain at 6 wrapped: its descriptors are 6, 7, 0, linked as §2.7.5 says.
    assert_eq!(views.read_desc(7).3, 0);

    // A short completion ends its batch: two entries for three chains.
    let one = bufs(&arena, &[32]);
    for t in 10..13 {
        driver.add(&out, &one, t).unwrap();
    }
    let chains: Vec<Chain> = (0..3).map(|_| device.pop().unwrap().unwrap()).collect();
    let base = views.used_idx();
    device
        .add_used_batch([
            (chains[2].head(), 32),
            (chains[1].head(), 5),
            (chains[0].head(), 32),
        ])
        .unwrap();
    assert_eq!(views.used_idx(), base.wrapping_add(3));
    assert_eq!(views.used_elem(base), (u32::from(chains[1].head()), 5));
    assert_eq!(
        views.used_elem(base.wrapping_add(2)),
        (u32::from(chains[2].head()), 32)
    );
    let back: Vec<_> = std::iter::from_fn(|| driver.pop_used().unwrap())
        .map(|u| (u.token, u.len))
        .collect();
    assert_eq!(back, [(10, 32), (11, 5), (12, 32)]);
    assert_eq!((driver.num_free(), device.in_flight()), (8, 0));
}

/// A device that claims, in order, a batch longer than the used entries it
/// published, or ending at a head not outstanding, breaks the queue instead of
/// handing back requests it never finished (HOSTILE 31).
#[test]
fn in_order_batches_past_the_used_index_break_the_driver() {
    let f = PLAIN | Features::IN_ORDER;
    for claimed in [2u32, 7, 1] {
        let arena = Arena::new(0x4000_0000, 4 << 20).unwrap();
        let (_, ring) = arena.alloc_split_ring(8).unwrap();
        let views = Views::new(8, &ring, (true, true, true)).unwrap();
        let mut driver = SplitDriver::new(8, ring.clone(), IdentityShare::new(arena.clone(), 8), f).unwrap();
        let b = bufs(&arena, &[16]);
        for t in 0..3u32 {
            assert_eq!(driver.add(&[], &b, t).unwrap(), u16::try_from(t).unwrap());
        }
        views.set_used_elem(0, claimed, 16);
        views.publish_used_idx(1);
        // Head 1 or 2 ends a batch of two or three chains where one entry was
        // published; head 7 is not outstanding.
        assert_eq!(
            driver.pop_used(),
            Err(DriverQueueError::BatchPastUsed { id: claimed, used: 1 })
        );
        assert!(driver.is_broken());
    }
}
