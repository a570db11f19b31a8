//! The conformance suite: the same driver/device exchanges, written once, run over any
//! sharing model.
//!
//! Each exchange drives a real [`DriverRing`] and [`DeviceRing`] (in the ring format
//! the features pick, split or packed) over a model's [`DriverModel`] and
//! [`DeviceModel`] and returns a [`Digest`] of everything both sides observed: the
//! bytes the device read, the used lengths, the bytes the driver got back and the
//! order tokens came home in. Models and ring formats must produce identical
//! digests; the tests compare them across all four models and both formats.

// Patterns and tokens are derived from wide counters by deliberate truncation.
#![allow(clippy::cast_possible_truncation)]

use hypervisor::Domain;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use virtio_core::features::Features;
use virtio_core::ring::areas::RingFormat;
use virtio_core::ring::queue::DeviceQueueError;
use virtio_core::{DeviceModel, DeviceRing, DriverModel, DriverRing, GuestBuf};

/// What one exchange observed, hashed: equal digests mean equal behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub u64);

/// A guest and the two halves of one sharing model serving it.
pub struct Fixture<D, V> {
    /// The guest whose memory the driver owns.
    pub guest: Arc<Domain>,
    /// The model's driver side.
    pub driver: D,
    /// The model's device side.
    pub device: V,
}

/// A queue of the fixture, both sides set up.
pub struct Queue<D: DriverModel, V: DeviceModel> {
    /// Driver side, carrying `u32` tokens.
    pub driver: DriverRing<D::Share, u32>,
    /// Device side.
    pub device: DeviceRing<V::Memory>,
}

impl<D: DriverModel, V: DeviceModel> Fixture<D, V> {
    /// Creates queue `index` of `size` on both sides with `features`.
    pub fn queue(&self, index: u16, size: u16, features: Features) -> Queue<D, V> {
        let dq = self
            .driver
            .create_queue_in(index, RingFormat::of(features), size)
            .expect("driver creates the queue");
        let vq = self
            .device
            .open_queue_in(index, RingFormat::of(features), size, dq.addrs)
            .expect("device opens the queue");
        Queue {
            driver: DriverRing::new(size, dq.ring, dq.share, features).expect("driver ring"),
            device: DeviceRing::new(size, &vq.ring, vq.memory, features).expect("device ring"),
        }
    }

    /// Allocates a guest buffer of `len` bytes filled with `fill(i)`.
    pub fn buffer(&self, len: u32, fill: impl Fn(usize) -> u8) -> GuestBuf {
        let mem = self.guest.memory();
        let addr = mem.alloc(u64::from(len), 8).expect("guest memory");
        let bytes: Vec<u8> = (0..len as usize).map(fill).collect();
        mem.write(addr, &bytes).expect("guest write");
        GuestBuf::new(addr, len)
    }

    /// Reads a guest buffer back.
    pub fn contents(&self, b: GuestBuf) -> Vec<u8> {
        let mut v = vec![0u8; b.len as usize];
        self.guest.memory().read(b.addr, &mut v).expect("guest read");
        v
    }

    /// Returns buffers to the guest allocator.
    pub fn free(&self, bufs: &[GuestBuf]) {
        for b in bufs {
            self.guest.memory().free(b.addr, u64::from(b.len)).expect("free");
        }
    }
}

/// The feature sets every exchange runs under.
pub fn feature_sets() -> [Features; 4] {
    let v1 = Features::VERSION_1;
    [
        v1,
        v1 | Features::INDIRECT_DESC,
        v1 | Features::EVENT_IDX,
        v1 | Features::INDIRECT_DESC | Features::EVENT_IDX,
    ]
}

/// Byte `i` of the pattern for request `seed`.
fn pattern(seed: u64, i: usize) -> u8 {
    let x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i as u64);
    (x ^ (x >> 29)) as u8
}

/// The device's reply: it reads the readable part, and writes `reply_len` bytes derived
/// from what it read into the writable part. Returns the used length.
fn serve<M: virtio_core::DeviceMemory>(
    device: &DeviceRing<M>,
    chain: &virtio_core::ring::Chain,
    reply_len: u32,
    h: &mut DefaultHasher,
) -> u32 {
    let mut req = vec![0u8; chain.readable_len() as usize];
    chain
        .reader(device.memory())
        .read_exact(&mut req)
        .expect("device reads the request");
    req.hash(h);
    let n = reply_len.min(chain.writable_len());
    let digest = {
        let mut d = DefaultHasher::new();
        req.hash(&mut d);
        d.finish()
    };
    let reply: Vec<u8> = (0..n as usize).map(|i| pattern(digest, i)).collect();
    let mut w = chain.writer(device.memory());
    w.write_all(&reply).expect("device writes the reply");
    w.written()
}

/// One buffer each way for every size from 1 B to 64 KiB.
pub fn sizes<D: DriverModel, V: DeviceModel>(f: &Fixture<D, V>, features: Features) -> Digest {
    let mut h = DefaultHasher::new();
    let mut q = f.queue(0, 16, features);
    for (t, &len) in [
        1u32, 2, 63, 64, 65, 511, 512, 1514, 4095, 4096, 4097, 16384, 65535, 65536,
    ]
    .iter()
    .enumerate()
    {
        let out = f.buffer(len, |i| pattern(t as u64, i));
        let ins = f.buffer(len, |_| 0xee);
        q.driver.add(&[out], &[ins], t as u32).expect("add");
        let _ = q.driver.kick_prepare();
        let chain = q.device.pop().expect("valid").expect("chain");
        let used = serve(&q.device, &chain, len, &mut h);
        q.device.add_used(chain.head(), used).expect("add_used");
        let u = q.driver.pop_used().expect("sane device").expect("used");
        (u.token, u.len).hash(&mut h);
        f.contents(ins).hash(&mut h);
        f.free(&[out, ins]);
    }
    Digest(h.finish())
}

/// Scatter-gather requests: several readable and writable buffers of odd sizes, the
/// reply spanning writable buffers, partially filled.
pub fn scatter_gather<D: DriverModel, V: DeviceModel>(f: &Fixture<D, V>, features: Features) -> Digest {
    let mut h = DefaultHasher::new();
    let mut q = f.queue(0, 32, features);
    for t in 0..40u32 {
        let outs: Vec<GuestBuf> = (0..1 + t % 4)
            .map(|k| f.buffer(1 + (t * 97 + k * 31) % 3000, |i| pattern(u64::from(t * 8 + k), i)))
            .collect();
        let ins: Vec<GuestBuf> = (0..t % 4)
            .map(|k| f.buffer(1 + (t * 53 + k * 17) % 2000, |_| 0x5a))
            .collect();
        q.driver.add(&outs, &ins, t).expect("add");
        let chain = q.device.pop().expect("valid").expect("chain");
        (chain.readable().len(), chain.writable().len()).hash(&mut h);
        let reply = chain.writable_len() / 2 + t;
        let used = serve(&q.device, &chain, reply, &mut h);
        q.device.add_used(chain.head(), used).expect("add_used");
        let u = q.driver.pop_used().expect("sane device").expect("used");
        (u.token, u.len).hash(&mut h);
        for b in &ins {
            f.contents(*b).hash(&mut h);
        }
        f.free(&outs);
        f.free(&ins);
    }
    Digest(h.finish())
}

/// Many requests in flight, completed in a scrambled order.
pub fn out_of_order<D: DriverModel, V: DeviceModel>(f: &Fixture<D, V>, features: Features) -> Digest {
    let mut h = DefaultHasher::new();
    // 48 two-buffer requests: room for all of them without indirect descriptors.
    let mut q = f.queue(0, 128, features);
    let mut bufs = Vec::new();
    for t in 0..48u32 {
        let out = f.buffer(100 + t, |i| pattern(u64::from(t), i));
        let ins = f.buffer(200, |_| 0);
        q.driver.add(&[out], &[ins], t).expect("add");
        bufs.push((out, ins));
    }
    let mut chains = Vec::new();
    while let Some(c) = q.device.pop().expect("valid") {
        chains.push(c);
    }
    assert_eq!(chains.len(), 48);
    // A fixed scramble: stride 7 through the list.
    let order: Vec<usize> = (0..48).map(|i| (i * 7) % 48).collect();
    for &i in &order {
        let c = &chains[i];
        let used = serve(&q.device, c, 10 + i as u32, &mut h);
        q.device.add_used(c.head(), used).expect("add_used");
    }
    while let Some(u) = q.driver.pop_used().expect("sane device") {
        (u.token, u.len).hash(&mut h);
        f.contents(bufs[u.token as usize].1).hash(&mut h);
    }
    for (o, i) in bufs {
        f.free(&[o, i]);
    }
    Digest(h.finish())
}

/// Enough small requests through a small queue to wrap the 16-bit indices.
pub fn index_wrap<D: DriverModel, V: DeviceModel>(f: &Fixture<D, V>, features: Features) -> Digest {
    let mut h = DefaultHasher::new();
    let mut q = f.queue(0, 8, features);
    let out = f.buffer(16, |i| i as u8);
    let ins = f.buffer(16, |_| 0);
    let mut device_kicks = 0u32;
    for t in 0..70_000u32 {
        q.driver.add(&[out], &[ins], t).expect("add");
        if q.driver.kick_prepare() {
            device_kicks += 1;
        }
        let chain = q.device.pop().expect("valid").expect("chain");
        let used = (t % 16) + 1;
        let mut w = chain.writer(q.device.memory());
        w.write_all(&t.to_le_bytes().repeat(5)[..used as usize])
            .expect("write");
        q.device.add_used(chain.head(), used).expect("add_used");
        let _ = q.device.needs_notification();
        let u = q.driver.pop_used().expect("sane device").expect("used");
        assert_eq!((u.token, u.len), (t, used));
        if t % 4096 == 0 {
            (u.token, u.len).hash(&mut h);
            f.contents(ins).hash(&mut h);
        }
    }
    // With EVENT_IDX the device never re-armed, so only the first add kicked.
    device_kicks.min(2).hash(&mut h);
    f.free(&[out, ins]);
    Digest(h.finish())
}

/// Resets with buffers outstanding, repeatedly: every token comes back, and nothing
/// the model set aside for the buffers leaks (else later rounds would run out).
pub fn reset_outstanding<D: DriverModel, V: DeviceModel>(f: &Fixture<D, V>, features: Features) -> Digest {
    let mut h = DefaultHasher::new();
    let dq = f
        .driver
        .create_queue_in(0, RingFormat::of(features), 16)
        .expect("driver queue");
    let addrs = dq.addrs;
    let mut driver: DriverRing<D::Share, u32> =
        DriverRing::new(16, dq.ring, dq.share, features).expect("driver");
    let outs: Vec<GuestBuf> = (0..16).map(|k| f.buffer(65536, |i| pattern(k, i))).collect();
    let ins: Vec<GuestBuf> = (0..16).map(|_| f.buffer(65536, |_| 0)).collect();
    for round in 0..40u32 {
        // A fresh device each round, as after a device reset.
        let vq = f
            .device
            .open_queue_in(0, RingFormat::of(features), 16, addrs)
            .expect("device queue");
        let mut device = DeviceRing::new(16, &vq.ring, vq.memory, features).expect("device");
        let mut added = 0u32;
        for k in 0..8usize {
            match driver.add(&[outs[k]], &[ins[k]], round * 100 + k as u32) {
                Ok(_) => added += 1,
                Err(r) => panic!("round {round}: add failed after resets (leak?): {}", r.error),
            }
        }
        // The device takes some and completes one; the rest stay outstanding.
        let c = device.pop().expect("valid").expect("chain");
        let _ = device.pop().expect("valid");
        let used = serve(&device, &c, 100, &mut h);
        device.add_used(c.head(), used).expect("add_used");
        let mut got: Vec<u32> = Vec::new();
        if let Some(u) = driver.pop_used().expect("sane") {
            got.push(u.token);
        }
        let mut back = driver.reset();
        back.extend(got);
        back.sort_unstable();
        assert_eq!(back.len() as u32, added, "every token back exactly once");
        back.hash(&mut h);
    }
    f.free(&outs);
    f.free(&ins);
    Digest(h.finish())
}

/// A bad chain from a hostile driver: rejected with a typed error, queue still works.
pub fn survives_bad_chain<D: DriverModel, V: DeviceModel>(f: &Fixture<D, V>, features: Features) -> Digest {
    let mut h = DefaultHasher::new();
    let mut q = f.queue(0, 8, features);
    // A buffer the model refuses: it is not in guest memory at all.
    let bogus = GuestBuf::new(8, 16);
    let r = q.driver.add(&[bogus], &[], 1);
    assert!(r.is_err(), "driver side refuses a buffer outside guest memory");
    let out = f.buffer(32, |i| i as u8);
    q.driver.add(&[out], &[], 2).expect("add");
    let c = q.device.pop().expect("valid").expect("chain");
    let _ = serve(&q.device, &c, 0, &mut h);
    q.device.add_used(c.head(), 0).expect("add_used");
    let u = q.driver.pop_used().expect("sane").expect("used");
    (u.token, u.len).hash(&mut h);
    assert!(!matches!(q.device.pop(), Err(DeviceQueueError::NeedsReset(_))));
    f.free(&[out]);
    Digest(h.finish())
}

/// An exchange of the suite.
pub type Exchange<D, V> = fn(&Fixture<D, V>, Features) -> Digest;

/// The exchanges, by name.
pub fn exchanges<D: DriverModel, V: DeviceModel>() -> [(&'static str, Exchange<D, V>); 5] {
    [
        ("sizes 1 B to 64 KiB", sizes),
        ("scatter-gather", scatter_gather),
        ("out-of-order completion", out_of_order),
        ("reset with buffers outstanding", reset_outstanding),
        ("bad buffer refused", survives_bad_chain),
    ]
}

/// Every exchange under every feature set, each on a fresh fixture from `make`, in a
/// fixed order, in ring `format` (the features of [`feature_sets`] plus
/// `VIRTIO_F_RING_PACKED` for packed), with `VIRTIO_F_IN_ORDER` if `in_order`.
pub fn run_all<D: DriverModel, V: DeviceModel>(
    make: impl Fn() -> Fixture<D, V>,
    format: RingFormat,
    in_order: bool,
) -> Vec<(String, Digest)> {
    let mut ring = match format {
        RingFormat::Split => Features::empty(),
        RingFormat::Packed => Features::RING_PACKED,
    };
    ring.set(Features::IN_ORDER, in_order);
    let mut out = Vec::new();
    for features in feature_sets() {
        for (name, exchange) in exchanges::<D, V>() {
            out.push((
                format!("{name}, {features:?}"),
                exchange(&make(), features | ring),
            ));
        }
    }
    let wrap = index_wrap(&make(), Features::VERSION_1 | Features::EVENT_IDX | ring);
    out.push(("index wrap".into(), wrap));
    out
}
