//! Real `SplitDriver` / `SplitDevice` traffic over the grant model.

// Test sizes and indices are small.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::{echo_reversed, features, pattern, setup, setup_with};
use std::cell::RefCell;
use std::rc::Rc;
use transport_grant::{GrantShare, PersistentPool};
use virtio_core::GuestBuf;

/// Splits `len` bytes at `addr` into `parts` buffers.
fn split(addr: u64, len: usize, parts: usize) -> Vec<GuestBuf> {
    let parts = parts.clamp(1, len.max(1));
    let step = len / parts;
    (0..parts)
        .map(|i| {
            let start = i * step;
            let end = if i + 1 == parts { len } else { start + step };
            GuestBuf::new(addr + start as u64, (end - start) as u32)
        })
        .collect()
}

#[test]
fn scatter_gather_of_every_size_round_trips_direct_and_indirect() {
    for indirect in [false, true] {
        let mut s = setup(16, common::features(indirect));
        let mem = s.guest.memory().clone();
        let baseline = s.model.active_grants();
        for (n, &len) in [1usize, 7, 64, 100, 1514, 4095, 4096, 4097, 8195, 20000, 65536]
            .iter()
            .enumerate()
        {
            for (misalign, parts) in [(0u64, 1usize), (3, 2), (4000, 3)] {
                let req = mem.alloc(len as u64 + misalign, 4096).unwrap() + misalign;
                let resp = mem.alloc(len as u64 + misalign, 4096).unwrap() + misalign;
                let data = pattern(len, n as u8);
                mem.write(req, &data).unwrap();
                mem.write(resp, &vec![0xcc; len]).unwrap();
                s.driver
                    .add(&split(req, len, parts), &split(resp, len, parts + 1), len as u32)
                    .unwrap();
                let (head, written) = echo_reversed(&mut s.device).unwrap();
                s.device.add_used(head, written).unwrap();
                let used = s.driver.pop_used().unwrap().unwrap();
                assert_eq!((used.token, used.len), (len as u32, len as u32));
                let mut got = vec![0u8; len];
                mem.read(resp, &mut got).unwrap();
                let mut want = data.clone();
                want.reverse();
                assert!(
                    got == want,
                    "len {len} misalign {misalign} parts {parts} indirect {indirect}"
                );
                assert_eq!(s.driver.share().live(), 0);
                mem.free(req - misalign, len as u64 + misalign).unwrap();
                mem.free(resp - misalign, len as u64 + misalign).unwrap();
            }
        }
        // One-shot grants all ended; only rings (and table slots) stay granted.
        let slots = s.model.active_grants() - baseline;
        assert!(if indirect { slots >= 1 } else { slots == 0 }, "{slots}");
    }
}

#[test]
fn out_of_order_completions_retire_the_right_grants() {
    let mut s = setup(8, features(true));
    let mem = s.guest.memory().clone();
    let baseline_live = s.driver.share().live();
    let mut bufs = Vec::new();
    for i in 0..8u32 {
        let len = 100 + 1000 * i as usize;
        let req = mem.alloc(len as u64, 1).unwrap();
        let resp = mem.alloc(len as u64, 1).unwrap();
        mem.write(req, &pattern(len, i as u8)).unwrap();
        s.driver
            .add(
                &[GuestBuf::new(req, len as u32)],
                &[GuestBuf::new(resp, len as u32)],
                i,
            )
            .unwrap();
        bufs.push((resp, len));
    }
    assert_eq!(s.driver.share().live(), 16);
    let mut chains = Vec::new();
    while let Some(c) = s.device.pop().unwrap() {
        chains.push(c);
    }
    assert_eq!(chains.len(), 8);
    // Complete in the order 7, 5, 3, 1, 6, 4, 2, 0.
    let order: Vec<usize> = (0..8)
        .rev()
        .step_by(2)
        .chain((0..8).rev().skip(1).step_by(2))
        .collect();
    for &k in &order {
        let c = &chains[k];
        let mut data = vec![0u8; c.readable_len() as usize];
        c.reader(s.device.memory()).read_exact(&mut data).unwrap();
        let mut w = c.writer(s.device.memory());
        w.write_all(&data).unwrap();
        s.device.add_used(c.head(), w.written()).unwrap();
        let used = s.driver.pop_used().unwrap().unwrap();
        assert_eq!(used.token as usize, k);
        let (resp, len) = bufs[k];
        let mut got = vec![0u8; len];
        mem.read(resp, &mut got).unwrap();
        assert_eq!(got, pattern(len, k as u8));
    }
    assert_eq!(s.driver.share().live(), baseline_live);
}

#[test]
fn reset_with_buffers_outstanding_ends_every_grant() {
    let mut s = setup(8, features(true));
    let mem = s.guest.memory().clone();
    // Warm up the indirect-table slots so they count in the baseline.
    for i in 0..8u32 {
        let b = mem.alloc(64, 1).unwrap();
        s.driver
            .add(&[GuestBuf::new(b, 32), GuestBuf::new(b + 32, 32)], &[], i)
            .unwrap();
    }
    while let Some(c) = s.device.pop().unwrap() {
        s.device.add_used(c.head(), 0).unwrap();
    }
    while s.driver.pop_used().unwrap().is_some() {}
    let baseline = s.model.active_grants();

    for i in 0..6u32 {
        let req = mem.alloc(70000, 1).unwrap();
        let resp = mem.alloc(5000, 1).unwrap();
        s.driver
            .add(&[GuestBuf::new(req, 70000)], &[GuestBuf::new(resp, 5000)], i)
            .unwrap();
    }
    // The device takes some of them and is then reset mid-flight.
    let _taken = [s.device.pop().unwrap().unwrap(), s.device.pop().unwrap().unwrap()];
    assert!(s.model.active_grants() > baseline);
    drop(s.device);
    let mut tokens = s.driver.reset();
    tokens.sort_unstable();
    assert_eq!(tokens, (0..6).collect::<Vec<_>>());
    assert_eq!(s.driver.share().live(), 0);
    assert_eq!(s.driver.share().deferred(), 0);
    assert_eq!(s.model.active_grants(), baseline, "no grant leaked");
}

#[test]
fn dropping_both_sides_returns_every_grant_and_page() {
    let hv = hypervisor::Hypervisor::new();
    let guest = hv.create_domain("g", 4 << 20).unwrap();
    let grants = transport_grant::GrantService::new(hv.clone());
    let free_before = guest.memory().free_bytes();
    {
        let (model, device_model) =
            transport_grant::pair(&grants, &guest, hypervisor::Hypervisor::HOST).unwrap();
        use virtio_core::{DeviceModel, DriverModel};
        let pool = model.persistent_pool(64 << 10).unwrap();
        let q = model.create_queue(0, 64).unwrap();
        let dq = device_model.open_queue(0, 64, q.addrs).unwrap();
        let f = features(true);
        let mut driver = virtio_core::SplitDriver::new(64, q.ring, q.share, f).unwrap();
        let mut device = virtio_core::SplitDevice::new(64, &dq.ring, dq.memory, f).unwrap();
        let b = pool.buf(100, 5000).unwrap();
        driver.add(&[b], &[pool.buf(8192, 5000).unwrap()], 1).unwrap();
        let (h, n) = echo_reversed(&mut device).unwrap();
        device.add_used(h, n).unwrap();
        driver.pop_used().unwrap().unwrap();
        assert!(device.memory().cached_pages() > 0);
        // The driver goes first: its ring, slot and pool grants are still mapped by
        // the device, so their revocation is deferred, and the pages kept.
        drop(driver);
        drop(pool);
        assert!(model.reap() > 0);
        assert!(guest.memory().free_bytes() < free_before);
        drop(device);
        assert_eq!(model.reap(), 0);
        assert_eq!(model.active_grants(), 0);
    }
    assert_eq!(guest.memory().free_bytes(), free_before, "every page returned");
}

#[test]
fn persistent_pool_buffers_use_no_grant_operations() {
    let pool: Rc<RefCell<Option<PersistentPool>>> = Rc::default();
    let p2 = pool.clone();
    let mut s = setup_with(
        16,
        features(true),
        move |m| *p2.borrow_mut() = Some(m.persistent_pool(256 << 10).unwrap()),
        |s: GrantShare| s,
    );
    let pool = pool.borrow_mut().take().unwrap();
    let mem = s.guest.memory().clone();
    let mut grants_before = None;
    for round in 0..4u32 {
        for (i, &len) in [1u32, 64, 1514, 4096, 9000, 65536].iter().enumerate() {
            let out = pool.buf(70_000 + 13 * i as u64, len).unwrap();
            let inn = pool.buf(140_000 + 7 * i as u64, len).unwrap();
            let data = pattern(len as usize, (round * 8 + i as u32) as u8);
            mem.write(out.addr, &data).unwrap();
            let head = s
                .driver
                .add(
                    &[
                        GuestBuf::new(out.addr, len / 2),
                        GuestBuf::new(out.addr + u64::from(len / 2), len - len / 2),
                    ],
                    &[inn],
                    len,
                )
                .unwrap();
            let _ = head;
            let (h, n) = echo_reversed(&mut s.device).unwrap();
            s.device.add_used(h, n).unwrap();
            let used = s.driver.pop_used().unwrap().unwrap();
            assert_eq!(used.len, len);
            let mut got = vec![0u8; len as usize];
            mem.read(inn.addr, &mut got).unwrap();
            let mut want = data;
            want.reverse();
            assert!(got == want, "len {len}");
            // Nothing was granted per buffer.
            assert_eq!(s.driver.share().live(), 0);
        }
        // From the second round on, the table does not change at all.
        let now = s.model.active_grants();
        assert_eq!(*grants_before.get_or_insert(now), now);
    }
    assert!(s.device.memory().cached_pages() >= 2 * 16);
    // A buffer partly outside the pool falls back to a one-shot grant.
    let edge = GuestBuf::new(pool.base() + pool.len() - 10, 10);
    let outside = mem.alloc(10, 1).unwrap();
    s.driver.add(&[edge], &[GuestBuf::new(outside, 10)], 0).unwrap();
    assert_eq!(s.driver.share().live(), 1);
    let (h, n) = echo_reversed(&mut s.device).unwrap();
    s.device.add_used(h, n).unwrap();
    s.driver.pop_used().unwrap().unwrap();
    assert_eq!(s.driver.share().live(), 0);
}
