//! Requests through the real split ring over the shared-page model: scatter-gather,
//! indirect tables, sizes from 1 byte to 64 KiB, out-of-order completion, bounce
//! space running out and coming back, and a driver reset with buffers outstanding.

// Test data is built with deliberate narrowing casts.
#![allow(clippy::cast_possible_truncation)]

use hypervisor::{Domain, Hypervisor};
use proptest::prelude::*;
use std::sync::Arc;
use transport_shared_page::{SharedPageConfig, SharedPageDevice, SharedPageMemory, SharedPageShare, pair};
use virtio_core::features::Features;
use virtio_core::ring::split::AddError;
use virtio_core::{DeviceModel, DriverModel, GuestBuf, QueueAddrs, ShareError, SplitDevice, SplitDriver};

const SIZES: [u32; 10] = [1, 2, 15, 63, 64, 65, 1514, 4096, 65535, 65536];
const QUEUE: u16 = 64;

struct Rig {
    guest: Arc<Domain>,
    model: SharedPageDevice,
    addrs: QueueAddrs,
    driver: SplitDriver<SharedPageShare, usize>,
    device: SplitDevice<SharedPageMemory>,
}

fn rig(features: Features) -> Rig {
    let hv = Hypervisor::new();
    let guest = hv.create_domain("guest", 64 << 20).unwrap();
    let cfg = SharedPageConfig {
        max_queues: 1,
        max_queue_size: QUEUE,
        ..SharedPageConfig::default()
    };
    let (drv, dev) = pair(&guest, cfg).unwrap();
    let q = drv.create_queue(0, QUEUE).unwrap();
    let dq = dev.open_queue(0, QUEUE, q.addrs).unwrap();
    Rig {
        driver: SplitDriver::new(QUEUE, q.ring, q.share, features).unwrap(),
        device: SplitDevice::new(QUEUE, &dq.ring, dq.memory, features).unwrap(),
        guest,
        model: dev,
        addrs: q.addrs,
    }
}

/// A tiny deterministic generator, so failures replay from the proptest seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seed * 31 + i * 7 + i / 251) as u8).collect()
}

/// A request the guest made: its buffers and what it put into the readable ones.
struct Request {
    outs: Vec<GuestBuf>,
    ins: Vec<GuestBuf>,
    sent: Vec<u8>,
}

const SENTINEL: u8 = 0xcc;

impl Request {
    fn new(guest: &Domain, rng: &mut Rng, seed: usize) -> Request {
        let mem = guest.memory();
        let buf = |len: u32| {
            // Odd alignment: the bounce copy must not care.
            let a = mem.alloc(u64::from(len) + 1, 1).unwrap() + 1;
            GuestBuf::new(a, len)
        };
        let n_out = 1 + rng.below(3);
        let n_in = 1 + rng.below(3);
        let outs: Vec<_> = (0..n_out).map(|_| buf(SIZES[rng.below(SIZES.len())])).collect();
        let ins: Vec<_> = (0..n_in).map(|_| buf(SIZES[rng.below(SIZES.len())])).collect();
        let total: usize = outs.iter().map(|b| b.len as usize).sum();
        let sent = pattern(seed, total);
        let mut at = 0;
        for b in &outs {
            mem.write(b.addr, &sent[at..at + b.len as usize]).unwrap();
            at += b.len as usize;
        }
        for b in &ins {
            mem.write(b.addr, &vec![SENTINEL; b.len as usize]).unwrap();
        }
        Request { outs, ins, sent }
    }

    fn free(&self, guest: &Domain) {
        for b in self.outs.iter().chain(&self.ins) {
            guest.memory().free(b.addr - 1, u64::from(b.len) + 1).unwrap();
        }
    }

    /// What the device replies: the request inverted, repeated to fill a reply of
    /// `n` bytes.
    fn reply(&self, n: usize) -> Vec<u8> {
        (0..n).map(|i| !self.sent[i % self.sent.len()]).collect()
    }

    /// Checks the in-buffers: exactly the first `used` bytes of the reply, sentinel
    /// after that.
    fn check(&self, guest: &Domain, used: u32) {
        let want = self.reply(used as usize);
        let mut at = 0usize;
        for b in &self.ins {
            let mut got = vec![0u8; b.len as usize];
            guest.memory().read(b.addr, &mut got).unwrap();
            for (i, byte) in got.iter().enumerate() {
                let expect = want.get(at + i).copied().unwrap_or(SENTINEL);
                assert_eq!(*byte, expect, "in-buffer byte {} of {used} used", at + i);
            }
            at += b.len as usize;
        }
    }
}

/// Serves one popped chain: reads the whole readable part, writes a reply that
/// leaves some writable bytes unwritten, and returns `(head, written)`.
fn serve(dev: &SplitDevice<SharedPageMemory>, chain: &virtio_core::ring::chain::Chain) -> (u16, u32) {
    let mut got = vec![0u8; chain.readable_len() as usize];
    chain.reader(dev.memory()).read_exact(&mut got).unwrap();
    let reply_len = chain.writable_len().min(chain.readable_len() + 7) as usize;
    let reply: Vec<u8> = (0..reply_len).map(|i| !got[i % got.len()]).collect();
    let mut w = chain.writer(dev.memory());
    w.write_all(&reply).unwrap();
    (chain.head(), w.written())
}

/// Runs `rounds` batches: adds requests until the ring or the bounce area is full,
/// the device pops them all and completes them in a random order, the driver reaps
/// and checks each.
fn exchange(features: Features, seed: u64, rounds: usize) {
    let mut r = rig(features);
    let mut rng = Rng(seed | 1);
    let capacity = r.driver.share().capacity();
    let mut seq = 0usize;
    for _ in 0..rounds {
        let mut pending: Vec<Option<Request>> = Vec::new();
        loop {
            let req = Request::new(&r.guest, &mut rng, seq);
            match r.driver.add(&req.outs, &req.ins, pending.len()) {
                Ok(_) => pending.push(Some(req)),
                Err(rej) => {
                    match rej.error {
                        AddError::NoSpace { .. } => {}
                        AddError::Share(ShareError::Exhausted(_)) => {}
                        e => panic!("unexpected refusal: {e}"),
                    }
                    req.free(&r.guest);
                    break;
                }
            }
            seq += 1;
            if pending.len() == 24 {
                break;
            }
        }
        assert!(!pending.is_empty());
        r.driver.kick_prepare();
        let mut popped = Vec::new();
        while let Some(chain) = r.device.pop().unwrap() {
            popped.push(chain);
        }
        assert_eq!(popped.len(), pending.len());
        // Out of order: a random permutation of completion.
        while !popped.is_empty() {
            let chain = popped.swap_remove(rng.below(popped.len()));
            let (head, written) = serve(&r.device, &chain);
            r.device.add_used(head, written).unwrap();
        }
        let mut reaped = 0;
        while let Some(used) = r.driver.pop_used().unwrap() {
            let req = pending[used.token].take().expect("each token once");
            req.check(&r.guest, used.len);
            req.free(&r.guest);
            reaped += 1;
        }
        assert_eq!(reaped, pending.len());
        assert_eq!(r.driver.share().live(), 0);
        assert_eq!(
            r.driver.share().free_bytes(),
            capacity,
            "bounce space fully returned"
        );
    }
}

#[test]
fn direct_chains_round_trip_out_of_order() {
    exchange(Features::VERSION_1 | Features::EVENT_IDX, 0x1234_5678, 6);
}

#[test]
fn indirect_chains_round_trip_out_of_order() {
    exchange(
        Features::VERSION_1 | Features::EVENT_IDX | Features::INDIRECT_DESC,
        0x9abc_def0,
        6,
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn random_round_trips(seed in any::<u64>(), indirect in any::<bool>()) {
        let mut f = Features::VERSION_1 | Features::EVENT_IDX;
        if indirect {
            f |= Features::INDIRECT_DESC;
        }
        exchange(f, seed, 3);
    }
}

#[test]
fn exhaustion_is_back_pressure_not_failure() {
    let mut r = rig(Features::VERSION_1 | Features::INDIRECT_DESC);
    let mem = r.guest.memory().clone();
    let buf = mem.alloc(65536, 64).unwrap();
    let big = [GuestBuf::new(buf, 65536)];
    let mut added = 0;
    let err = loop {
        match r.driver.add(&big, &big, added) {
            Ok(_) => added += 1,
            Err(rej) => break rej,
        }
    };
    // Default 4 MiB: 32 requests of two 64 KiB blocks, minus the tables' space.
    assert_eq!(added, 31);
    assert!(matches!(err.error, AddError::Share(ShareError::Exhausted(_))));
    assert_eq!(
        r.driver.num_free(),
        QUEUE - 31,
        "a refused add takes no descriptor"
    );
    let chain = r.device.pop().unwrap().unwrap();
    r.device.add_used(chain.head(), 0).unwrap();
    r.driver.pop_used().unwrap().unwrap();
    r.driver.add(&big, &big, added).expect("space came back");
}

#[test]
fn reset_with_buffers_outstanding_returns_all_bounce_space() {
    for features in [
        Features::VERSION_1 | Features::EVENT_IDX,
        Features::VERSION_1 | Features::EVENT_IDX | Features::INDIRECT_DESC,
    ] {
        let mut r = rig(features);
        let capacity = r.driver.share().capacity();
        let mut rng = Rng(77);
        let reqs: Vec<_> = (0..10).map(|i| Request::new(&r.guest, &mut rng, i)).collect();
        for (i, req) in reqs.iter().enumerate() {
            r.driver.add(&req.outs, &req.ins, i).unwrap();
        }
        // The device takes some and writes into them, but completes none.
        for _ in 0..4 {
            let chain = r.device.pop().unwrap().unwrap();
            serve(&r.device, &chain);
        }
        assert!(r.driver.share().live() > 0);
        assert!(r.driver.share().free_bytes() < capacity);

        // The device acknowledged the reset; the driver takes everything back.
        let mut tokens = r.driver.reset();
        tokens.sort_unstable();
        assert_eq!(tokens, (0..10).collect::<Vec<_>>());
        assert_eq!(r.driver.share().live(), 0);
        assert_eq!(r.driver.share().free_bytes(), capacity, "nothing leaked");
        for req in &reqs {
            // Nothing written counts after a reset: the guest's buffers are untouched.
            req.check(&r.guest, 0);
        }

        // The queue works again once the device reopens it.
        let dq = r.model.open_queue(0, QUEUE, r.addrs).unwrap();
        let mut dev = SplitDevice::new(QUEUE, &dq.ring, dq.memory, features).unwrap();
        let req = Request::new(&r.guest, &mut rng, 99);
        r.driver.add(&req.outs, &req.ins, 99).unwrap();
        let chain = dev.pop().unwrap().unwrap();
        let (head, written) = serve(&dev, &chain);
        dev.add_used(head, written).unwrap();
        let used = r.driver.pop_used().unwrap().unwrap();
        assert_eq!(used.token, 99);
        req.check(&r.guest, used.len);
        assert_eq!(r.driver.share().free_bytes(), capacity);
    }
}
