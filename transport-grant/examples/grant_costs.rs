//! Prints what the grant model's operations cost on this machine (medians of
//! repeated batches): one-shot expose + retire, grant copy, persistent paths, and a
//! whole driver/device round trip per buffer size.
//!
//! `cargo run --release -p transport-grant --example grant_costs`

use hypervisor::Hypervisor;
use std::time::Instant;
use transport_grant::{GrantCopy, GrantService, pair};
use virtio_core::features::Features;
use virtio_core::{DeviceModel, DeviceRing, Direction, DriverModel, DriverRing, DriverShare, GuestBuf};

/// Median nanoseconds per iteration of `f` over 21 batches of `n`.
fn median_ns(n: u32, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..21)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[10]
}

fn main() {
    let hv = Hypervisor::new();
    let guest = hv.create_domain("guest", 64 << 20).unwrap();
    let grants = GrantService::new(hv.clone());
    let (model, device_model) = pair(&grants, &guest, Hypervisor::HOST).unwrap();
    let pool = model.persistent_pool(1 << 20).unwrap();
    let mem = guest.memory().clone();
    let f = Features::VERSION_1 | Features::EVENT_IDX | Features::INDIRECT_DESC;

    println!(
        "{:<44} {:>10} {:>10} {:>10}",
        "operation (ns)", "64 B", "1514 B", "64 KiB"
    );
    let sizes = [64u32, 1514, 65536];
    let row = |name: &str, v: [f64; 3]| println!("{name:<44} {:>10.0} {:>10.0} {:>10.0}", v[0], v[1], v[2]);

    let q = model.create_queue(0, 256).unwrap();
    let mut share = q.share;
    let buf = mem.alloc(65536 + 100, 4096).unwrap() + 100;
    row(
        "one-shot expose + retire",
        sizes.map(|len| {
            median_ns(2000, || {
                let e = share
                    .expose(GuestBuf::new(buf, len), Direction::FromDevice)
                    .unwrap();
                share.retire(e.token, 0);
            })
        }),
    );
    row(
        "persistent expose + retire",
        sizes.map(|len| {
            let b = pool.buf(100, len).unwrap();
            median_ns(2000, || {
                let e = share.expose(b, Direction::FromDevice).unwrap();
                share.retire(e.token, 0);
            })
        }),
    );
    let mut dst = vec![0u8; 65536];
    row(
        "GNTTABOP_copy from a one-shot grant",
        sizes.map(|len| {
            let r = grants
                .grant_range(guest.id(), Hypervisor::HOST, buf, len, true)
                .unwrap();
            let d = &mut dst[..len as usize];
            median_ns(2000, || {
                grants
                    .copy(
                        Hypervisor::HOST,
                        &mut [GrantCopy::FromGrant {
                            granter: guest.id(),
                            gref: r.first,
                            offset: u64::from(r.offset),
                            dst: &mut *d,
                        }],
                    )
                    .unwrap()
            })
        }),
    );
    let page = mem.alloc_pages(1).unwrap();
    let r = grants.grant(guest.id(), Hypervisor::HOST, page, false).unwrap();
    println!(
        "{:<44} {:>10.0}",
        "map + unmap of one page",
        median_ns(200, || drop(
            grants.map(Hypervisor::HOST, guest.id(), r, true).unwrap()
        ))
    );

    for (label, persistent) in [
        ("round trip, one-shot grants", false),
        ("round trip, persistent pool", true),
    ] {
        let q = model.create_queue(1, 256).unwrap();
        let dq = device_model.open_queue(1, 256, q.addrs).unwrap();
        let mut driver: DriverRing<_, ()> = DriverRing::new(256, q.ring, q.share, f).unwrap();
        driver.share().attach_pool(&pool);
        let mut device = DeviceRing::new(256, &dq.ring, dq.memory, f).unwrap();
        let mut scratch = vec![0u8; 65536];
        row(
            label,
            sizes.map(|len| {
                let (out, inn) = if persistent {
                    (pool.buf(0, len).unwrap(), pool.buf(1 << 19, len).unwrap())
                } else {
                    (GuestBuf::new(buf, len), GuestBuf::new(buf, len))
                };
                median_ns(500, || {
                    driver.add(&[out], &[inn], ()).unwrap();
                    let c = device.pop().unwrap().unwrap();
                    let s = &mut scratch[..len as usize];
                    c.reader(device.memory()).read_exact(s).unwrap();
                    let mut w = c.writer(device.memory());
                    w.write_all(s).unwrap();
                    let n = w.written();
                    device.add_used(c.head(), n).unwrap();
                    driver.pop_used().unwrap().unwrap();
                })
            }),
        );
    }
}
