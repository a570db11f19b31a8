//! HOSTILE 34 on the virtio-net device: a guest that keeps re-publishing chains the
//! device rejects at once cannot hold the device's worker in one queue. The worker
//! serves each queue a budget of chains per round, so it keeps serving the guest's
//! other queues and its stop request: the reset returns.
//!
//! The hostile guest is simulated at its worst, deterministically, by
//! [`vio::hostile_model`]. Each test runs on a thread of its own, watched: a worker
//! that never returns fails the test after a watchdog instead of hanging.

use backend_host::net::{NetDevice, NetSettings, Switch, SwitchConfig};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vio::conformance::Fixture;
use vio::hostile_model::{Hostile, Republisher, watched};
use vio::models;
use vio::net_rig;
use virtio_core::lifecycle::{ControlPlane, driver_ok, initialize};
use virtio_core::net::{NET_DEPENDENCIES, VirtioNetHdr};
use virtio_core::ring::split::SplitDriver;
use virtio_core::transport::{InProcessTransport, Transport};
use virtio_core::{DriverModel, GuestBuf};

/// How long to wait for traffic that must arrive.
const TIMEOUT: Duration = Duration::from_secs(10);
const QSIZE: u16 = 8;
const BROADCAST: [u8; 6] = [0xff; 6];

fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// An Ethernet frame of 60 bytes.
fn frame(dst: [u8; 6], src: [u8; 6], seq: u8) -> Vec<u8> {
    let mut f = vec![seq; 60];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

const RX: u16 = 0;
const TX: u16 = 1;
const CTRL: u16 = 2;

/// A guest on a switch with a peer, whose queue `hostile` rejects every chain and
/// is re-published as fast as the device looks at it. The device must still
/// serve the guest's other queue (a frame each way) and stop when reset.
fn hostile_queue(hostile: u16) {
    let sw = Switch::new(SwitchConfig::default());
    let peer = net_rig::plug(
        models::direct(),
        &sw,
        NetSettings::default(),
        drivers_net::NetOptions::default(),
    )
    .unwrap();
    let Fixture {
        guest,
        driver,
        device,
    } = models::direct();
    let republisher = Arc::new(Republisher::default());
    let model = Hostile {
        inner: device,
        queue: hostile,
        republisher: republisher.clone(),
    };
    let settings = NetSettings {
        queue_size: QSIZE,
        ..NetSettings::default()
    };
    let dev = NetDevice::new(model, &sw, settings).unwrap();
    let mac = dev.mac();
    let t = InProcessTransport::new(dev.lifecycle(), dev).unwrap();
    let queues: &[u16] = if hostile == CTRL {
        &[RX, TX, CTRL]
    } else {
        &[RX, TX]
    };
    let wanted = if hostile == CTRL {
        virtio_core::net::NetFeatures::CTRL_VQ.bits()
    } else {
        0
    };
    let features = initialize(&t, virtio_core::net::DEVICE_ID, wanted, NET_DEPENDENCIES).unwrap();
    assert_eq!(features & virtio_core::net::NetFeatures::CTRL_VQ.bits(), wanted);
    let f = virtio_core::features::Features::from_bits_retain(features);
    let mem = guest.memory();
    let mut rings = Vec::new();
    for &q in queues {
        let dq = driver.create_queue(q, QSIZE).unwrap();
        t.setup_queue(q, QSIZE, dq.addrs).unwrap();
        if q == hostile {
            republisher.avail.set(dq.ring.driver.clone()).unwrap();
        }
        rings.push(SplitDriver::<_, u32>::new(QSIZE, dq.ring, dq.share, f).unwrap());
    }
    let mut rings = rings.into_iter();
    let (mut rx, mut tx) = (rings.next().unwrap(), rings.next().unwrap());
    let ctrl = rings.next();
    let rx_buf = mem.alloc(2048, 8).unwrap();
    rx.add(&[], &[GuestBuf::new(rx_buf, 2048)], 0).unwrap();
    rx.kick_prepare();
    driver_ok(&t).unwrap();
    t.notify_queue(RX).unwrap();
    // The guest transmits one frame (to the peer), written once.
    // The header and a 60-byte frame.
    let tx_len = u32::try_from(VirtioNetHdr::SIZE + 60).unwrap();
    let hdr_len = u64::try_from(VirtioNetHdr::SIZE).unwrap();
    let tx_buf = mem.alloc(u64::from(tx_len), 8).unwrap();
    mem.write(tx_buf, &[0; VirtioNetHdr::SIZE]).unwrap();
    mem.write(tx_buf + hdr_len, &frame(peer.mac, mac, 1)).unwrap();
    let transmit = |tx: &mut SplitDriver<_, u32>, t: &InProcessTransport<_>| {
        tx.add(&[GuestBuf::new(tx_buf, tx_len)], &[], 1).unwrap();
        tx.kick_prepare();
        t.notify_queue(TX).unwrap();
    };

    republisher.arm(QSIZE);
    // Set the hostile queue going: a frame for the guest makes the device look
    // for a receive buffer; a transmitted chain makes it look at the transmit
    // queue.
    match (hostile, ctrl) {
        (RX, _) => peer.send(&frame(BROADCAST, peer.mac, 0), TIMEOUT).unwrap(),
        (TX, _) => transmit(&mut tx, &t),
        (_, Some(mut ctrl)) => {
            let cmd = mem.alloc(16, 8).unwrap();
            ctrl.add(&[GuestBuf::new(cmd, 2)], &[GuestBuf::new(cmd + 8, 1)], 0)
                .unwrap();
            ctrl.kick_prepare();
            t.notify_queue(CTRL).unwrap();
        }
        _ => unreachable!("a control queue was set up"),
    }
    eventually("the device to take the hostile chains", || {
        republisher.rejected.load(Ordering::Relaxed) > 10 * u64::from(QSIZE)
    });
    // Its other queues are still served.
    if hostile != TX {
        transmit(&mut tx, &t);
        assert_eq!(
            peer.recv(1, TIMEOUT).unwrap(),
            vec![frame(peer.mac, mac, 1)],
            "the guest's transmit queue is served"
        );
    }
    if hostile != RX {
        peer.send(&frame(mac, peer.mac, 2), TIMEOUT).unwrap();
        eventually("the frame in the guest's receive buffer", || {
            rx.pop_used().unwrap().is_some()
        });
        assert_eq!(t.with_handler(|d| d.stats()).rx_frames, 1);
    }
    // The hostile queue is still being served, and the reset stops the worker
    // and returns all the same.
    let before = republisher.rejected.load(Ordering::Relaxed);
    eventually("more hostile chains taken", || {
        republisher.rejected.load(Ordering::Relaxed) > before + 10 * u64::from(QSIZE)
    });
    t.set_status(0);
    assert_eq!(t.status(), 0);
    drop(t);
}

/// Receive buffers that fail at once, re-published endlessly while a frame waits
/// for one (HOSTILE 29 and 34).
#[test]
fn rejected_receive_chains_do_not_hold_the_worker() {
    watched(|| hostile_queue(RX));
}

/// Transmit chains that fail at once, re-published endlessly (HOSTILE 28 and 34).
#[test]
fn rejected_transmit_chains_do_not_hold_the_worker() {
    watched(|| hostile_queue(TX));
}

/// Control commands that fail at once, re-published endlessly (HOSTILE 34).
#[test]
fn rejected_control_chains_do_not_hold_the_worker() {
    watched(|| hostile_queue(CTRL));
}
