//! Differential tests of the queue interface: the same random sequence of requests,
//! completions and notification changes through the split and the packed ring,
//! each with and without VIRTIO_F_IN_ORDER, and the driver must see the same thing.

use crate::features::Features;
use crate::ring::Chain;
use crate::ring::queue::AddError;
use crate::ring::queue::{DeviceRing, DriverRing};
use crate::share::GuestBuf;
use crate::test_utils::{Arena, IdentityShare};
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

/// One step of a run.
#[derive(Debug, Clone)]
enum Op {
    /// The driver adds a request of these readable and writable buffer lengths.
    Add(Vec<u32>, Vec<u32>),
    /// The driver decides whether to kick.
    Kick,
    /// The device takes up to n chains.
    Pop(u8),
    /// The device completes the k-th chain it holds (mod count), writing a fraction
    /// of it (255: all of it, which lets an in-order batch cover it).
    Complete(u8, u8),
    /// The device completes the chains it holds, k-th first, in one batch.
    CompleteBatch(u8),
    /// The driver takes up to n used requests.
    Reclaim(u8),
    /// The driver goes to sleep (enables notifications, maybe delayed).
    DriverSleep(bool),
    /// The device goes to sleep.
    DeviceSleep,
}

fn op() -> impl Strategy<Value = Op> {
    let lens = || prop::collection::vec(1u32..300, 0..3);
    let fraction = prop_oneof![Just(255u8), any::<u8>()];
    prop_oneof![
        3 => (lens(), lens()).prop_map(|(o, i)| Op::Add(o, i)),
        2 => Just(Op::Kick),
        2 => (1u8..6).prop_map(Op::Pop),
        3 => (any::<u8>(), fraction).prop_map(|(k, f)| Op::Complete(k, f)),
        1 => any::<u8>().prop_map(Op::CompleteBatch),
        2 => (1u8..6).prop_map(Op::Reclaim),
        1 => any::<bool>().prop_map(Op::DriverSleep),
        1 => Just(Op::DeviceSleep),
    ]
}

/// What the driver saw, step by step: each add accepted or refused for room, each
/// request back with its length.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Added(u32),
    NoRoom,
    Back(u32, u32),
}

/// Runs `ops` on a queue of `size` entries with `features`; checks the invariants
/// every format keeps and returns what the driver saw.
fn run(size: u16, features: Features, ops: &[Op]) -> Vec<Seen> {
    let arena = Arena::new(0x10_0000, 4 << 20).unwrap();
    let (_, ring) = arena.alloc_split_ring(size).unwrap();
    let share = IdentityShare::new(arena.clone(), size.max(8));
    let mut driver = DriverRing::<_, u32>::new(size, ring.clone(), share, features).unwrap();
    let mut device: DeviceRing<Arc<Arena>> = DeviceRing::new(size, &ring, arena.clone(), features).unwrap();
    let in_order = features.contains(Features::IN_ORDER);
    let indirect = features.contains(Features::INDIRECT_DESC);
    let pool: Vec<u64> = (0..6).map(|_| arena.alloc(300, 8).unwrap()).collect();

    let mut seen = Vec::new();
    let mut next_token = 1u32;
    // token -> the length the device reported, once it did
    let mut outstanding: HashMap<u32, Option<u32>> = HashMap::new();
    let mut token_of: HashMap<u16, u32> = HashMap::new();
    let mut held: Vec<(Chain, u32)> = Vec::new();
    // The oldest token not yet back (in order: the only one that may come back).
    let mut next_back = 1u32;
    let (mut driver_asleep, mut device_asleep) = (false, false);
    let mut added_while_device_asleep = false;

    let complete = |device: &mut DeviceRing<Arc<Arena>>,
                    outstanding: &mut HashMap<u32, Option<u32>>,
                    batch: &[(Chain, u32, u8)]| {
        let before = device.in_flight();
        let mut used = Vec::new();
        for (c, t, f) in batch {
            let len = u32::try_from(u64::from(c.writable_len()) * u64::from(*f) / 255).unwrap();
            *outstanding.get_mut(t).unwrap() = Some(len);
            used.push((c.head(), len));
        }
        device.add_used_batch(used).unwrap();
        // Whether something became visible to the driver.
        device.in_flight() < before
    };

    for op in ops {
        match op {
            Op::Add(o, i) if !o.is_empty() || !i.is_empty() => {
                let out: Vec<_> = o.iter().zip(&pool).map(|(&l, &a)| GuestBuf::new(a, l)).collect();
                let ins: Vec<_> = i
                    .iter()
                    .zip(&pool[3..])
                    .map(|(&l, &a)| GuestBuf::new(a, l))
                    .collect();
                match driver.add(&out, &ins, next_token) {
                    Ok(head) => {
                        assert!(token_of.insert(head, next_token).is_none(), "head {head} reused");
                        outstanding.insert(next_token, None);
                        seen.push(Seen::Added(next_token));
                        next_token += 1;
                        added_while_device_asleep |= device_asleep;
                    }
                    Err(r) => {
                        let total = o.len() + i.len();
                        let needed = if indirect && total > 1 { 1 } else { total };
                        assert!(
                            matches!(r.error, AddError::NoSpace { .. } | AddError::TooLong(_)),
                            "{r:?}"
                        );
                        assert!(needed > usize::from(driver.num_free()) || total > usize::from(size));
                        seen.push(Seen::NoRoom);
                    }
                }
            }
            Op::Add(..) => {}
            Op::Kick => {
                let kick = driver.kick_prepare();
                if device_asleep && added_while_device_asleep {
                    assert!(kick, "device asleep, work published, no kick");
                }
                device_asleep &= !kick;
            }
            Op::Pop(n) => {
                device.disable_notifications();
                device_asleep = false;
                for _ in 0..*n {
                    match device.pop().unwrap() {
                        Some(c) => {
                            let t = token_of[&c.head()];
                            held.push((c, t));
                        }
                        None => break,
                    }
                }
            }
            Op::Complete(k, f) if !held.is_empty() => {
                let (c, t) = held.remove(usize::from(*k) % held.len());
                let published = complete(&mut device, &mut outstanding, &[(c, t, *f)]);
                let notify = device.needs_notification();
                if published && driver_asleep {
                    assert!(notify, "driver asleep, buffer used, no notification");
                }
                driver_asleep &= !notify;
            }
            Op::CompleteBatch(k) if !held.is_empty() => {
                let start = usize::from(*k) % held.len();
                held.rotate_left(start);
                let batch: Vec<_> = held.drain(..).map(|(c, t)| (c, t, 255)).collect();
                let published = complete(&mut device, &mut outstanding, &batch);
                let notify = device.needs_notification();
                if published && driver_asleep {
                    assert!(notify, "driver asleep, batch used, no notification");
                }
                driver_asleep &= !notify;
            }
            Op::Complete(..) | Op::CompleteBatch(_) => {}
            Op::Reclaim(n) => {
                driver.disable_notifications();
                driver_asleep = false;
                for _ in 0..*n {
                    let Some(u) = driver.pop_used().unwrap() else {
                        break;
                    };
                    let reported = outstanding.remove(&u.token).expect("token returned twice");
                    assert_eq!(Some(u.len), reported, "length of token {}", u.token);
                    if in_order {
                        assert_eq!(
                            u.token, next_back,
                            "in order, the oldest request comes back first"
                        );
                    }
                    next_back = u.token + 1;
                    token_of.retain(|_, t| *t != u.token);
                    seen.push(Seen::Back(u.token, u.len));
                }
            }
            Op::DriverSleep(delayed) => {
                let ready = if *delayed {
                    driver.enable_notifications_delayed()
                } else {
                    driver.enable_notifications()
                };
                // A delayed wake-up is not promised for the first chain back.
                driver_asleep = !ready && !*delayed;
            }
            Op::DeviceSleep => {
                device_asleep = !device.enable_notifications();
                added_while_device_asleep = false;
            }
        }
    }
    // Drain: everything comes back, each token once, with its reported length.
    let rest: Vec<_> = held.drain(..).map(|(c, t)| (c, t, 0)).collect();
    complete(&mut device, &mut outstanding, &rest);
    while let Some(c) = device.pop().unwrap() {
        let t = token_of[&c.head()];
        complete(&mut device, &mut outstanding, &[(c, t, 255)]);
    }
    while let Some(u) = driver.pop_used().unwrap() {
        let reported = outstanding.remove(&u.token).expect("token returned twice");
        assert_eq!(Some(u.len), reported);
        seen.push(Seen::Back(u.token, u.len));
    }
    assert!(outstanding.is_empty(), "tokens never returned: {outstanding:?}");
    assert_eq!(driver.num_free(), size);
    assert_eq!(device.in_flight(), 0);
    assert!(!driver.is_broken());
    seen
}

fn base_features() -> impl Strategy<Value = Features> {
    (any::<bool>(), any::<bool>()).prop_map(|(i, e)| {
        let mut f = Features::VERSION_1;
        f.set(Features::INDIRECT_DESC, i);
        f.set(Features::EVENT_IDX, e);
        f
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Split and packed, with and without IN_ORDER: each keeps every invariant, and
    /// with the same IN_ORDER setting the two formats are indistinguishable to the
    /// driver (same requests accepted, same results in the same order).
    #[test]
    fn split_and_packed_agree_with_and_without_in_order(
        size in prop_oneof![Just(1u16), Just(2), Just(4), Just(8), Just(16)],
        features in base_features(),
        ops in prop::collection::vec(op(), 1..300),
    ) {
        for in_order in [Features::empty(), Features::IN_ORDER] {
            let f = features | in_order;
            let split = run(size, f, &ops);
            let packed = run(size, f | Features::RING_PACKED, &ops);
            prop_assert_eq!(&split, &packed, "in order: {}", !in_order.is_empty());
        }
    }
}

/// Requests finished in reverse come back in the order they were made available,
/// through one used entry for the batch, over both formats.
#[test]
fn in_order_completions_in_reverse_come_back_oldest_first_in_one_batch() {
    for packed in [Features::empty(), Features::RING_PACKED] {
        let f = Features::VERSION_1 | Features::IN_ORDER | Features::EVENT_IDX | packed;
        let ops: Vec<Op> = (0..4)
            .map(|_| Op::Add(vec![8], vec![16]))
            .chain([Op::Kick, Op::Pop(4), Op::DriverSleep(false)])
            .chain((0..4).map(|_| Op::Complete(3, 255)))
            .chain([Op::Reclaim(5)])
            .collect();
        let seen = run(8, f, &ops);
        let back: Vec<_> = seen
            .iter()
            .filter_map(|s| match s {
                Seen::Back(t, l) => Some((*t, *l)),
                _ => None,
            })
            .collect();
        assert_eq!(back, [(1, 16), (2, 16), (3, 16), (4, 16)]);
    }
}

/// One step of [`a_device_that_dies_at_any_moment_loses_and_repeats_nothing`].
#[derive(Debug, Clone)]
enum Life {
    /// The driver makes a request available, if it has room: a token buffer,
    /// then one or two writable buffers (lists of two or three descriptors).
    Add(bool),
    /// The device takes the next chain.
    Pop,
    /// The device returns the `n`-th chain it holds (modulo how many).
    Complete(usize),
    /// The device process dies; a new instance recovers from the inflight region.
    Crash,
}

fn life() -> impl Strategy<Value = Life> {
    prop_oneof![
        3 => any::<bool>().prop_map(Life::Add),
        3 => Just(Life::Pop),
        3 => (0usize..8).prop_map(Life::Complete),
        1 => Just(Life::Crash),
    ]
}

/// The rig of the inflight tests: a driver whose requests name themselves (a
/// 4-byte token, then one or two writable buffers of 16 bytes in all), and the
/// memory a tracked device keeps across its instances.
struct Tracked {
    size: u16,
    features: Features,
    format: crate::ring::areas::RingFormat,
    arena: Arc<Arena>,
    ring: crate::ring::areas::RingMemory,
    driver: DriverRing<IdentityShare, u32>,
    /// The inflight region's memory, which outlives every device instance.
    kept: Arc<crate::shm::Mapping>,
    next_token: u32,
    outstanding: std::collections::BTreeSet<u32>,
    /// Requests the driver got back.
    done: usize,
}

/// VERSION_1 with the ring features asked for.
fn ring_features(packed: bool, in_order: bool, event_idx: bool) -> Features {
    let mut f = Features::VERSION_1;
    for (on, bit) in [
        (packed, Features::RING_PACKED),
        (in_order, Features::IN_ORDER),
        (event_idx, Features::EVENT_IDX),
    ] {
        if on {
            f |= bit;
        }
    }
    f
}

impl Tracked {
    fn new(size: u16, features: Features) -> Tracked {
        use crate::ring::areas::RingFormat;
        use crate::ring::inflight::region_size;
        let format = RingFormat::of(features);
        let arena = Arena::new(0x10_0000, 4 << 20).unwrap();
        let (_, ring) = arena.alloc_split_ring(size).unwrap();
        let share = IdentityShare::new(arena.clone(), size);
        let driver = DriverRing::new(size, ring.clone(), share, features).unwrap();
        let kept =
            crate::shm::Mapping::anonymous(usize::try_from(region_size(format, size)).unwrap()).unwrap();
        Tracked {
            size,
            features,
            format,
            arena,
            ring,
            driver,
            kept,
            next_token: 0,
            outstanding: std::collections::BTreeSet::new(),
            done: 0,
        }
    }

    /// A new device instance over the ring and the kept region.
    fn device(&self) -> Result<DeviceRing<Arc<Arena>>, crate::ring::inflight::InflightError> {
        let region = crate::ring::inflight::InflightRegion::new(self.kept.region(), self.size, self.format)?;
        DeviceRing::new(self.size, &self.ring, self.arena.clone(), self.features)
            .unwrap()
            .with_inflight(region)
    }

    /// The driver makes the next request available, if it has room.
    fn add(&mut self, two: bool) {
        let a = &self.arena;
        let token = a.alloc(4, 4).unwrap();
        a.write(token, &self.next_token.to_le_bytes()).unwrap();
        let ins: Vec<GuestBuf> = if two {
            vec![
                GuestBuf::new(a.alloc(8, 8).unwrap(), 8),
                GuestBuf::new(a.alloc(8, 8).unwrap(), 8),
            ]
        } else {
            vec![GuestBuf::new(a.alloc(16, 8).unwrap(), 16)]
        };
        match self.driver.add(&[GuestBuf::new(token, 4)], &ins, self.next_token) {
            Ok(_) => {
                self.outstanding.insert(self.next_token);
                self.next_token += 1;
            }
            Err(r) if matches!(r.error, AddError::NoSpace { .. }) => {}
            Err(r) => panic!("{:?}", r.error),
        }
    }

    /// The device's step `op` on the chains it holds, `(head, token)`: take the
    /// next chain, or return the `n`-th held with the length that names it
    /// (1 + its token % 16).
    fn serve(&self, device: &mut DeviceRing<Arc<Arena>>, held: &mut Vec<(u16, u32)>, op: &Life) {
        match op {
            Life::Pop => {
                if let Some(c) = device.pop().unwrap() {
                    let mut t = [0u8; 4];
                    c.reader(&self.arena).read_exact(&mut t).unwrap();
                    held.push((c.head(), u32::from_le_bytes(t)));
                }
            }
            Life::Complete(n) if !held.is_empty() => {
                let (head, token) = held.remove(n % held.len());
                device.add_used(head, 1 + token % 16).unwrap();
            }
            _ => {}
        }
    }

    /// The driver takes every used request: each must be outstanding, back once,
    /// with its own length.
    fn reclaim(&mut self) -> Result<(), TestCaseError> {
        loop {
            let got = self.driver.pop_used();
            prop_assert!(got.is_ok(), "driver refused a used entry: {:?}", got.err());
            let Some(u) = got.unwrap() else { return Ok(()) };
            prop_assert!(
                self.outstanding.remove(&u.token),
                "token {} returned twice",
                u.token
            );
            prop_assert_eq!(u.len, 1 + u.token % 16);
            self.done += 1;
        }
    }

    /// A last instance takes and returns everything; then every request must be
    /// back, once.
    fn finish(&mut self, mut device: DeviceRing<Arc<Arena>>) -> Result<(), TestCaseError> {
        let mut held = Vec::new();
        for _ in 0..2 * usize::from(self.size) {
            self.serve(&mut device, &mut held, &Life::Pop);
        }
        while !held.is_empty() {
            self.serve(&mut device, &mut held, &Life::Complete(0));
        }
        self.reclaim()?;
        prop_assert!(
            self.outstanding.is_empty(),
            "never returned: {:?}",
            self.outstanding
        );
        prop_assert_eq!(self.done, self.next_token as usize);
        Ok(())
    }
}

proptest! {
    /// Inflight tracking (vhost-user's INFLIGHT_SHMFD), split and packed, with and
    /// without IN_ORDER: a device instance that dies at any point, holding any
    /// chains, completed in any order, is replaced by one that recovers the region
    /// and serves exactly the chains the dead one took and did not return, then
    /// goes on with the ring. The driver, which checks every used entry against
    /// what it has outstanding, gets each request back once, with the length the
    /// device gave that very request.
    #[test]
    fn a_device_that_dies_at_any_moment_loses_and_repeats_nothing(
        steps in proptest::collection::vec(life(), 1..80),
        packed in any::<bool>(),
        in_order in any::<bool>(),
    ) {
        let mut t = Tracked::new(8, ring_features(packed, in_order, true));
        let mut device = t.device().unwrap();
        // Chains the current instance holds: (head, token read from the request).
        let mut held: Vec<(u16, u32)> = Vec::new();
        for step in &steps {
            match step {
                Life::Add(two) => t.add(*two),
                Life::Crash => {
                    drop(std::mem::replace(&mut device, t.device().unwrap()));
                    held.clear();
                }
                other => t.serve(&mut device, &mut held, other),
            }
            t.reclaim()?;
        }
        // One more crash, then the last instance finishes everything.
        drop(device);
        let last = t.device().unwrap();
        t.finish(last)?;
    }
}

/// A device instance that takes over a queue from an inflight region owes the
/// driver one used-buffer notification whatever the driver asked for: the
/// instance before it may have died between publishing used entries and
/// notifying, and the driver would wait for ever. Only one, though.
#[test]
fn a_takeover_from_an_inflight_region_notifies_the_driver_once() {
    for packed in [false, true] {
        let mut t = Tracked::new(8, ring_features(packed, false, true));
        // The driver sleeps with notifications on and nothing outstanding.
        assert!(!t.driver.enable_notifications());
        let mut device = t.device().unwrap();
        assert!(
            device.needs_notification(),
            "packed {packed}: owed after a takeover"
        );
        assert!(!device.needs_notification(), "packed {packed}: only once");
    }
}

/// One step of [`a_device_killed_between_any_two_stores_loses_and_repeats_nothing`].
#[derive(Debug, Clone)]
enum Kill {
    /// As [`Life`]'s.
    Life(Life),
    /// The device returns up to `n` of the chains it holds, from the `k`-th, in
    /// one batch (one used index published for all: split's `add_used_batch`).
    Batch(usize, usize),
    /// The device process will die right before its `n`-th store from now into
    /// the inflight region or the ring (used entries, used index, used
    /// descriptors), whichever call it is in, recovery included.
    Arm(u64),
}

fn kill() -> impl Strategy<Value = Kill> {
    prop_oneof![
        8 => life().prop_map(Kill::Life),
        2 => (1usize..5, 0usize..8).prop_map(|(n, k)| Kill::Batch(n, k)),
        2 => (1u64..24).prop_map(Kill::Arm),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    /// As [`a_device_that_dies_at_any_moment_loses_and_repeats_nothing`], but the
    /// device dies between any two of its stores, inside `pop`, `add_used`,
    /// `add_used_batch` or its own recovery: the region and the ring then hold
    /// what SIGKILL leaves, and the next instance, started only when the device
    /// is next needed (the driver may reclaim, reuse heads and make requests
    /// available meanwhile), recovers from exactly that. The driver gets each
    /// request back once, with the length the device gave it.
    #[test]
    fn a_device_killed_between_any_two_stores_loses_and_repeats_nothing(
        steps in proptest::collection::vec(kill(), 1..100),
        packed in any::<bool>(),
        in_order in any::<bool>(),
    ) {
        use crate::ring::inflight::crash;
        use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
        crash::arm(0);
        let mut t = Tracked::new(8, ring_features(packed, in_order, true));
        // A new instance; if it dies recovering, another one.
        let instance = |t: &Tracked| loop {
            match catch_unwind(AssertUnwindSafe(|| t.device().unwrap())) {
                Ok(d) => break d,
                Err(p) if p.is::<crash::Crash>() => {}
                Err(p) => resume_unwind(p),
            }
        };
        let mut device = instance(&t);
        // The last instance died; the next one starts when the device is needed.
        let mut dead = false;
        let mut held: Vec<(u16, u32)> = Vec::new();
        for step in &steps {
            match step {
                Kill::Life(Life::Add(two)) => t.add(*two),
                Kill::Life(Life::Crash) => {
                    drop(std::mem::replace(&mut device, instance(&t)));
                    held.clear();
                }
                Kill::Arm(n) => crash::arm(*n),
                other => {
                    if dead {
                        // Restarted only now: the driver may have reclaimed,
                        // reused heads and made new requests available meanwhile.
                        drop(std::mem::replace(&mut device, instance(&t)));
                        dead = false;
                    }
                    let served = catch_unwind(AssertUnwindSafe(|| match other {
                        Kill::Life(op) => t.serve(&mut device, &mut held, op),
                        Kill::Batch(n, k) if !held.is_empty() => {
                            let k = k % held.len();
                            let n = (*n).min(held.len() - k);
                            let batch: Vec<_> = held.drain(k..k + n).map(|(h, t)| (h, 1 + t % 16)).collect();
                            device.add_used_batch(batch).unwrap();
                        }
                        _ => {}
                    }));
                    match served {
                        Ok(()) => {}
                        Err(p) if p.is::<crash::Crash>() => {
                            dead = true;
                            held.clear();
                        }
                        Err(p) => resume_unwind(p),
                    }
                }
            }
            t.reclaim()?;
        }
        crash::arm(0);
        drop(device);
        let last = t.device().unwrap();
        t.finish(last)?;
    }
}

proptest! {
    /// HOSTILE 50 at the device: a ring taken over with whatever the frontend
    /// put in the inflight region either refuses to start or serves chains like
    /// any other ring: no panic, and every chain it hands out can be returned.
    #[test]
    fn a_device_over_any_inflight_region_refuses_or_serves_without_panicking(
        bytes in prop::collection::vec(any::<u8>(), 512),
        header in any::<bool>(),
        flags in prop::collection::vec(0u8..2, 8),
        packed in any::<bool>(),
        used in any::<u16>(),
        adds in 0usize..8,
    ) {
        use crate::ring::inflight::region_size;
        let size = 8u16;
        let mut t = Tracked::new(size, ring_features(packed, false, false));
        for k in 0..adds {
            let b = GuestBuf::new(t.arena.alloc(16, 8).unwrap(), 16);
            let _ = t.driver.add(&[], &[b], u32::try_from(k).unwrap());
        }
        let len = usize::try_from(region_size(t.format, size)).unwrap();
        let mut b = bytes[..len].to_vec();
        if header {
            b[0..8].copy_from_slice(&u64::from(packed).to_le_bytes());
            b[8..10].copy_from_slice(&1u16.to_le_bytes());
            b[10..12].copy_from_slice(&size.to_le_bytes());
            let put = |b: &mut Vec<u8>, at: usize, v: u16| b[at..at + 2].copy_from_slice(&v.to_le_bytes());
            if packed {
                // Used and pending positions inside the ring; ids whose copies
                // are one or two entries linked inside the ring.
                put(&mut b, 12, 0x8000 | (used & 7));
                put(&mut b, 14, 0x8000 | ((used >> 3) & 7));
                put(&mut b, 16, (used >> 6) & 7);
                put(&mut b, 18, (used >> 9) & 7);
                for (i, f) in flags.iter().enumerate() {
                    let at = 32 + 16 * i;
                    let (first, num) = (b[at + 2] % 8, 1 + b[at + 4] % 2);
                    put(&mut b, at, u16::from(*f));
                    put(&mut b, at + 2, u16::from(first));
                    put(&mut b, at + 4, u16::from(num));
                    let link = 32 + 16 * 8 + 24 * i + 18;
                    let l = b[link] % 8;
                    put(&mut b, link, u16::from(l));
                }
            } else {
                // A last batch of up to two heads unfinished (the ring's used
                // index is 0).
                put(&mut b, 12, used & 7);
                put(&mut b, 14, 0u16.wrapping_sub((used >> 3) % 3));
                for (i, f) in flags.iter().enumerate() {
                    let at = 16 + 16 * i;
                    put(&mut b, at, u16::from(*f));
                    let next = b[at + 6] % 8;
                    put(&mut b, at + 6, u16::from(next));
                }
            }
        }
        t.kept.region().write(0, &b).unwrap();
        let Ok(mut device) = t.device() else {
            return Ok(());
        };
        for _ in 0..3 * usize::from(size) {
            match device.pop() {
                Ok(Some(c)) => prop_assert_eq!(device.add_used(c.head(), 0), Ok(())),
                Ok(None) | Err(crate::ring::split::DeviceQueueError::NeedsReset(_)) => break,
                Err(_) => {}
            }
        }
    }
}
