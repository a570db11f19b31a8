//! Single-core rate of models 2 and 3 through the real split ring: the driver adds a
//! batch of one-buffer requests, the device pops them, reads every buffer (one batched
//! access, or one access per buffer) and returns them, the driver reclaims them.
//!
//! `cargo run --release -p transport-descriptors --example copy_rate`

use hypervisor::Hypervisor;
use std::time::Instant;
use transport_descriptors::{DirectShare, copy, direct};
use virtio_core::features::Features;
use virtio_core::ring::Chain;
use virtio_core::{DeviceMemory, DeviceModel, DriverModel, GuestBuf, ReadOp, SplitDevice, SplitDriver};

const QUEUE: u16 = 256;
const BATCH: usize = 64;

fn run<D, V>(d: &D, v: &V, mem: &hypervisor::GuestMemory, len: u32, total: usize, batched: bool) -> f64
where
    D: DriverModel<Share = DirectShare>,
    V: DeviceModel,
{
    let features = Features::VERSION_1 | Features::EVENT_IDX;
    let q = d.create_queue(0, QUEUE).unwrap();
    let mut driver: SplitDriver<DirectShare, usize> =
        SplitDriver::new(QUEUE, q.ring, q.share, features).unwrap();
    let dq = v.open_queue(0, QUEUE, q.addrs).unwrap();
    let mut device = SplitDevice::new(QUEUE, &dq.ring, dq.memory, features).unwrap();
    let bufs: Vec<GuestBuf> = (0..BATCH)
        .map(|_| GuestBuf::new(mem.alloc(u64::from(len), 64).unwrap(), len))
        .collect();
    let mut dst = vec![vec![0u8; len as usize]; BATCH];
    let mut chains: Vec<Chain> = Vec::with_capacity(BATCH);
    let mut used: Vec<(u16, u32)> = Vec::with_capacity(BATCH);
    let mut done = 0;
    let start = Instant::now();
    while done < total {
        for (i, b) in bufs.iter().enumerate() {
            driver.add(std::slice::from_ref(b), &[], i).unwrap();
        }
        driver.kick_prepare();
        chains.clear();
        while let Some(c) = device.pop().unwrap() {
            chains.push(c);
        }
        if batched {
            let mut ops: Vec<ReadOp<'_>> = chains
                .iter()
                .zip(dst.iter_mut())
                .map(|(c, d)| ReadOp {
                    seg: c.readable()[0],
                    offset: 0,
                    dst: d,
                })
                .collect();
            device.memory().read_batch(&mut ops).unwrap();
        } else {
            for (c, d) in chains.iter().zip(dst.iter_mut()) {
                device.memory().read(&c.readable()[0], 0, d).unwrap();
            }
        }
        used.clear();
        used.extend(chains.iter().map(|c| (c.head(), 0)));
        device.add_used_batch(used.iter().copied()).unwrap();
        while driver.pop_used().unwrap().is_some() {
            done += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    done as f64 / secs / 1e6
}

fn main() {
    let hv = Hypervisor::new();
    println!(
        "{:<16} {:>8} {:>10} {:>10}",
        "model", "bytes", "batched", "single"
    );
    for len in [64u32, 1514, 65536] {
        let total = if len > 4096 { 100_000 } else { 2_000_000 };
        let g = hv.create_domain("bench", 64 << 20).unwrap();
        let (d, v) = direct::pair(&g).unwrap();
        let b = run(&d, &v, g.memory(), len, total, true);
        let s = run(&d, &v, g.memory(), len, total, false);
        println!("{:<16} {:>8} {:>8.2} M/s {:>6.2} M/s", "direct", len, b, s);
        let (d, v) = copy::pair(&g).unwrap();
        let b = run(&d, &v, g.memory(), len, total, true);
        let s = run(&d, &v, g.memory(), len, total, false);
        println!(
            "{:<16} {:>8} {:>8.2} M/s {:>6.2} M/s",
            "hypervisor-copy", len, b, s
        );
    }
}
