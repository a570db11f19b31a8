//! Prints what the shared-page model costs per buffer: expose + retire on the driver
//! side, read or write of the whole buffer on the device side, for the three buffer
//! sizes of the project's benchmark. Medians of several runs, one thread, warm cache.
//!
//! `cargo run --release -p transport-shared-page --example costs`

use hypervisor::Hypervisor;
use std::time::Instant;
use transport_shared_page::{SharedPageConfig, pair};
use virtio_core::{
    DescSlot, DeviceMemory, DeviceModel, Direction, DriverModel, DriverShare, GuestBuf, Segment,
};

const ROUNDS: usize = 9;

fn median_ns(iters: u32, mut f: impl FnMut()) -> f64 {
    let mut runs: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(iters)
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[ROUNDS / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hv = Hypervisor::new();
    let guest = hv.create_domain("costs", 64 << 20)?;
    let (drv, dev) = pair(&guest, SharedPageConfig::default())?;
    let q = drv.create_queue(0, 256)?;
    let dq = dev.open_queue(0, 256, q.addrs)?;
    let mut share = q.share;
    let mem = guest.memory();
    let buf = mem.alloc(65536, 64)?;
    let mut scratch = vec![0u8; 65536];

    println!(
        "{:>8} | {:>14} | {:>14} | {:>12} | {:>12}",
        "bytes", "out expose+ret", "in expose+ret", "dev read", "dev write"
    );
    for len in [64u32, 1514, 65536] {
        let iters = if len > 4096 { 20_000 } else { 200_000 };
        let g = GuestBuf::new(buf, len);
        let out = median_ns(iters, || {
            let e = share.expose(g, Direction::ToDevice).expect("room");
            share.retire(e.token, 0);
        });
        let inn = median_ns(iters, || {
            let e = share.expose(g, Direction::FromDevice).expect("room");
            share.retire(e.token, len);
        });
        let e = share.expose(g, Direction::FromDevice)?;
        let seg = Segment::new(e.addr, len, true, 0, DescSlot::Table(0));
        let dst = &mut scratch[..len as usize];
        let read = median_ns(iters, || {
            dq.memory.read(&seg, 0, dst).expect("in bounds");
            std::hint::black_box(&mut *dst);
        });
        let src = vec![7u8; len as usize];
        let write = median_ns(iters, || dq.memory.write(&seg, 0, &src).expect("in bounds"));
        share.retire(e.token, 0);
        println!("{len:>8} | {out:>11.0} ns | {inn:>11.0} ns | {read:>9.0} ns | {write:>9.0} ns");
    }
    Ok(())
}
