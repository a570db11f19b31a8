//! Round trips through the real split ring (SplitDriver / SplitDevice) over models 2
//! and 3: scatter-gather, indirect tables, 1 B to 64 KiB, out-of-order completion,
//! batched access and reset with buffers outstanding.

// Test patterns truncate indices to bytes on purpose.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::{pattern, serve};
use hypervisor::{Domain, Hypervisor};
use std::sync::Arc;
use transport_descriptors::{CopyError, DirectShare, copy, direct};
use virtio_core::features::Features;
use virtio_core::{
    DeviceMemory, DeviceModel, DriverModel, GuestBuf, QueueAddrs, ReadOp, SplitDevice, SplitDriver, WriteOp,
};

const PLAIN: Features = Features::VERSION_1.union(Features::EVENT_IDX);
const INDIRECT: Features = PLAIN.union(Features::INDIRECT_DESC);
const SIZES: [usize; 8] = [1, 2, 7, 64, 1514, 4096, 4097, 65536];

fn guest() -> Arc<Domain> {
    Hypervisor::new().create_domain("guest", 8 << 20).unwrap()
}

struct Rig<M> {
    guest: Arc<Domain>,
    addrs: QueueAddrs,
    driver: SplitDriver<DirectShare, usize>,
    device: SplitDevice<M>,
}

fn rig<D, V>(guest: &Arc<Domain>, d: &D, v: &V, size: u16, features: Features) -> Rig<V::Memory>
where
    D: DriverModel<Share = DirectShare>,
    V: DeviceModel,
{
    let q = d.create_queue(0, size).unwrap();
    let addrs = q.addrs;
    let driver = SplitDriver::new(size, q.ring, q.share, features).unwrap();
    let dq = v.open_queue(0, size, addrs).unwrap();
    let device = SplitDevice::new(size, &dq.ring, dq.memory, features).unwrap();
    Rig {
        guest: guest.clone(),
        addrs,
        driver,
        device,
    }
}

/// Splits `len` bytes into `parts` non-empty guest buffers.
fn buffers(guest: &Domain, len: usize, parts: usize) -> Vec<GuestBuf> {
    let mem = guest.memory();
    let mut bufs = Vec::new();
    let mut start = 0;
    for p in 1..=parts {
        let end = len * p / parts;
        if end > start {
            let n = (end - start) as u64;
            bufs.push(GuestBuf::new(mem.alloc(n, 8).unwrap(), u32::try_from(n).unwrap()));
        }
        start = end;
    }
    bufs
}

fn fill(guest: &Domain, bufs: &[GuestBuf], data: &[u8]) {
    let mut at = 0;
    for b in bufs {
        guest
            .memory()
            .write(b.addr, &data[at..at + b.len as usize])
            .unwrap();
        at += b.len as usize;
    }
}

fn gather(guest: &Domain, bufs: &[GuestBuf]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in bufs {
        let mut v = vec![0u8; b.len as usize];
        guest.memory().read(b.addr, &mut v).unwrap();
        out.extend(v);
    }
    out
}

fn release(guest: &Domain, bufs: &[GuestBuf]) {
    for b in bufs {
        guest.memory().free(b.addr, u64::from(b.len)).unwrap();
    }
}

fn every_size_scatter_gather<M: DeviceMemory>(mut r: Rig<M>) {
    for (k, &len) in SIZES.iter().enumerate() {
        let data = pattern(len, k as u8);
        let out = buffers(&r.guest, len, 3);
        let ins = buffers(&r.guest, len, 2);
        fill(&r.guest, &out, &data);
        r.driver.add(&out, &ins, k).unwrap();
        r.driver.kick_prepare();
        let served = serve(&mut r.device, |d| d.iter().rev().copied().collect());
        assert_eq!(served.len(), 1, "size {len}");
        let used = r.driver.pop_used().unwrap().unwrap();
        assert_eq!((used.token, used.len as usize), (k, len));
        let mut want = data.clone();
        want.reverse();
        assert!(gather(&r.guest, &ins) == want, "size {len}: reply differs");
        release(&r.guest, &out);
        release(&r.guest, &ins);
    }
    assert_eq!(r.driver.share().live(), 0);
    assert_eq!(r.driver.num_free(), r.driver.size());
}

#[test]
fn direct_every_size_scatter_gather() {
    for features in [PLAIN, INDIRECT] {
        let g = guest();
        let (d, v) = direct::pair(&g).unwrap();
        every_size_scatter_gather(rig(&g, &d, &v, 16, features));
    }
}

#[test]
fn copy_every_size_scatter_gather() {
    for features in [PLAIN, INDIRECT] {
        let g = guest();
        let (d, v) = copy::pair(&g).unwrap();
        every_size_scatter_gather(rig(&g, &d, &v, 16, features));
    }
}

fn out_of_order<M: DeviceMemory>(mut r: Rig<M>) {
    let mut reqs = Vec::new();
    for t in 0..6 {
        let out = buffers(&r.guest, 64, 2);
        let ins = buffers(&r.guest, 64, 1);
        fill(&r.guest, &out, &pattern(64, t as u8));
        r.driver.add(&out, &ins, t).unwrap();
        reqs.push((out, ins));
    }
    let chains: Vec<_> = std::iter::from_fn(|| r.device.pop().unwrap()).collect();
    assert_eq!(chains.len(), 6);
    let order = [3, 0, 5, 1, 4, 2];
    for &i in &order {
        let c = &chains[i];
        let mut data = [0u8; 64];
        c.reader(r.device.memory()).read_exact(&mut data).unwrap();
        assert_eq!(data.to_vec(), pattern(64, i as u8));
        let mut w = c.writer(r.device.memory());
        w.write_all(&[i as u8; 10]).unwrap();
        r.device.add_used(c.head(), w.written()).unwrap();
    }
    let got: Vec<_> = std::iter::from_fn(|| r.driver.pop_used().unwrap())
        .map(|u| (u.token, u.len))
        .collect();
    assert_eq!(got, order.iter().map(|&i| (i, 10)).collect::<Vec<_>>());
    for (i, (_, ins)) in reqs.iter().enumerate() {
        assert_eq!(gather(&r.guest, ins)[..10], [i as u8; 10]);
    }
    assert_eq!(r.driver.share().live(), 0);
}

#[test]
fn out_of_order_completion_both_models() {
    for features in [PLAIN, INDIRECT] {
        let g = guest();
        let (d, v) = direct::pair(&g).unwrap();
        out_of_order(rig(&g, &d, &v, 32, features));
        let (d, v) = copy::pair(&g).unwrap();
        out_of_order(rig(&g, &d, &v, 32, features));
    }
}

/// Pops every chain, then reads all readable parts in one batch and writes all
/// writable parts in another.
fn batched<M: DeviceMemory>(mut r: Rig<M>) {
    let mut ins_all = Vec::new();
    for t in 0..4 {
        let out = buffers(&r.guest, 64, 1);
        let ins = buffers(&r.guest, 64, 1);
        fill(&r.guest, &out, &pattern(64, t as u8));
        r.driver.add(&out, &ins, t).unwrap();
        ins_all.push(ins);
    }
    let chains: Vec<_> = std::iter::from_fn(|| r.device.pop().unwrap()).collect();
    let mut bufs = [[0u8; 64]; 4];
    let mut reads: Vec<ReadOp<'_>> = chains
        .iter()
        .zip(bufs.iter_mut())
        .map(|(c, dst)| ReadOp {
            seg: c.readable()[0],
            offset: 0,
            dst,
        })
        .collect();
    r.device.memory().read_batch(&mut reads).unwrap();
    drop(reads);
    for (t, b) in bufs.iter().enumerate() {
        assert_eq!(b.to_vec(), pattern(64, t as u8));
    }
    let writes: Vec<WriteOp<'_>> = chains
        .iter()
        .zip(bufs.iter())
        .map(|(c, src)| WriteOp {
            seg: c.writable()[0],
            offset: 0,
            src,
        })
        .collect();
    r.device.memory().write_batch(&writes).unwrap();
    r.device
        .add_used_batch(chains.iter().map(|c| (c.head(), 64)))
        .unwrap();
    let mut n = 0;
    while let Some(u) = r.driver.pop_used().unwrap() {
        assert_eq!(gather(&r.guest, &ins_all[u.token]), pattern(64, u.token as u8));
        n += 1;
    }
    assert_eq!(n, 4);
}

#[test]
fn batched_access_both_models() {
    let g = guest();
    let (d, v) = direct::pair(&g).unwrap();
    batched(rig(&g, &d, &v, 8, PLAIN));
    let (d, v) = copy::pair(&g).unwrap();
    batched(rig(&g, &d, &v, 8, PLAIN));
}

/// Resets the queue with requests outstanding (some popped, one completed but not yet
/// reclaimed), reclaims everything, reopens the device side and serves again.
fn reset_outstanding<D, V>(g: &Arc<Domain>, d: &D, v: &V, features: Features)
where
    D: DriverModel<Share = DirectShare>,
    V: DeviceModel,
{
    let mut r = rig(g, d, v, 32, features);
    for t in 0..5 {
        let out = buffers(g, 100, 2);
        let ins = buffers(g, 100, 2);
        r.driver.add(&out, &ins, t).unwrap();
    }
    let a = r.device.pop().unwrap().unwrap();
    let _b = r.device.pop().unwrap().unwrap();
    r.device.add_used(a.head(), 0).unwrap();
    // Device reset: the device side goes away first (status reads 0), then the driver
    // takes every buffer back.
    let Rig {
        guest,
        addrs,
        mut driver,
        device,
        ..
    } = r;
    drop(device);
    let mut tokens = driver.reset();
    tokens.sort_unstable();
    assert_eq!(tokens, vec![0, 1, 2, 3, 4]);
    assert_eq!(driver.share().live(), 0);
    assert_eq!(driver.num_free(), 32);
    let dq = v.open_queue(0, 32, addrs).unwrap();
    let device = SplitDevice::new(32, &dq.ring, dq.memory, features).unwrap();
    every_size_scatter_gather(Rig {
        guest,
        addrs,
        driver,
        device,
    });
}

#[test]
fn reset_with_buffers_outstanding_both_models() {
    for features in [PLAIN, INDIRECT] {
        let g = guest();
        let (d, v) = direct::pair(&g).unwrap();
        reset_outstanding(&g, &d, &v, features);
        let (d, v) = copy::pair(&g).unwrap();
        reset_outstanding(&g, &d, &v, features);
    }
}

#[test]
fn two_guests_with_different_models_side_by_side() {
    let hv = Hypervisor::new();
    let a = hv.create_domain("a", 1 << 20).unwrap();
    let b = hv.create_domain("b", 1 << 20).unwrap();
    let (da, va) = direct::pair(&a).unwrap();
    let (db, vb) = copy::pair(&b).unwrap();
    assert_eq!((da.name(), va.name()), ("direct", "direct"));
    assert_eq!((db.name(), vb.name()), ("hypervisor-copy", "hypervisor-copy"));
    let mut ra = rig(&a, &da, &va, 8, INDIRECT);
    let mut rb = rig(&b, &db, &vb, 8, INDIRECT);
    for round in 0..20u8 {
        let oa = buffers(&a, 300, 2);
        let ia = buffers(&a, 300, 3);
        let ob = buffers(&b, 300, 2);
        let ib = buffers(&b, 300, 3);
        fill(&a, &oa, &pattern(300, round));
        fill(&b, &ob, &pattern(300, round ^ 0xff));
        ra.driver.add(&oa, &ia, 1).unwrap();
        rb.driver.add(&ob, &ib, 2).unwrap();
        serve(&mut ra.device, |d| d.to_vec());
        serve(&mut rb.device, |d| d.to_vec());
        assert_eq!(ra.driver.pop_used().unwrap().unwrap().len, 300);
        assert_eq!(rb.driver.pop_used().unwrap().unwrap().len, 300);
        assert_eq!(gather(&a, &ia), pattern(300, round));
        assert_eq!(gather(&b, &ib), pattern(300, round ^ 0xff));
        for (g, bufs) in [(&a, &oa), (&a, &ia), (&b, &ob), (&b, &ib)] {
            release(g, bufs);
        }
    }
    // The model-3 device never reaches guest a's queue.
    let seg = virtio_core::Segment::new(0, 1, false, 0, virtio_core::DescSlot::Table(0));
    assert_eq!(vb.helper().check(1, &seg), Err(CopyError::BadQueue(1)));
}
