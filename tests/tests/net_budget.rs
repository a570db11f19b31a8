//! HOSTILE 34 on the virtio-net device: a guest that keeps re-publishing chains the
//! device rejects at once cannot hold the device's worker in one queue. The worker
//! serves each queue a budget of chains per round, so it keeps serving the guest's
//! other queues and its stop request: the reset returns.
//!
//! The hostile guest is simulated at its worst, deterministically: the device's
//! memory refuses every buffer of the hostile queue (so each chain is rejected at
//! once) and, each time the device looks at one, the guest has already published
//! the next (the available index moves on by one). A worker that loops "until the
//! ring is empty" never gets out. Each test runs on a thread of its own, watched: a
//! worker that never returns fails the test after [`WATCHDOG`] instead of hanging.

use backend_host::net::{NetDevice, NetSettings, Switch, SwitchConfig};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use vio::conformance::Fixture;
use vio::models;
use vio::net_rig;
use virtio_core::access::{AccessError, DeviceMemory, ReadOp, Segment, WriteOp};
use virtio_core::lifecycle::{ControlPlane, driver_ok, initialize};
use virtio_core::model::{DeviceQueue, ModelError, QueueAddrs};
use virtio_core::net::{NET_DEPENDENCIES, VirtioNetHdr};
use virtio_core::ring::split::SplitDriver;
use virtio_core::shm::Region;
use virtio_core::transport::{InProcessTransport, Transport};
use virtio_core::{DeviceModel, DriverModel, GuestBuf};

/// How long a test may take before it is failed as hung.
const WATCHDOG: Duration = Duration::from_secs(20);
/// How long to wait for traffic that must arrive.
const TIMEOUT: Duration = Duration::from_secs(10);
const QSIZE: u16 = 8;
const BROADCAST: [u8; 6] = [0xff; 6];

/// The hostile guest's side of one queue: once armed, every time the device checks
/// a buffer of the queue, the check fails and the guest publishes the same head
/// again.
#[derive(Debug, Default)]
struct Republisher {
    armed: AtomicBool,
    /// The queue's available ring, as the guest (driver) writes it.
    avail: OnceLock<Region>,
    /// Chains the device was handed and rejected.
    rejected: AtomicU64,
}

impl Republisher {
    /// Points every slot of the available ring at the head in slot 0, and starts.
    fn arm(&self) {
        let avail = self.avail.get().expect("ring set");
        let head = avail.load_u16(4, Ordering::Acquire).unwrap();
        for slot in 0..u64::from(QSIZE) {
            avail.write(4 + 2 * slot, &head.to_le_bytes()).unwrap();
        }
        self.armed.store(true, Ordering::Release);
    }

    /// Publishes one more entry (the device is looking at the last one).
    fn republish(&self) {
        let avail = self.avail.get().expect("ring set");
        let idx = avail.load_u16(2, Ordering::Acquire).unwrap();
        avail.write(2, &idx.wrapping_add(1).to_le_bytes()).unwrap();
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }
}

/// A device memory that is hostile for one queue (see [`Republisher`]).
#[derive(Debug)]
struct HostileMem<M> {
    inner: M,
    hostile: Option<Arc<Republisher>>,
}

impl<M: DeviceMemory> DeviceMemory for HostileMem<M> {
    fn check(&self, seg: &Segment) -> Result<(), AccessError> {
        if let Some(r) = &self.hostile
            && r.armed.load(Ordering::Acquire)
        {
            r.republish();
            return Err(AccessError::Denied);
        }
        self.inner.check(seg)
    }
    fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError> {
        self.inner.read(seg, offset, dst)
    }
    fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError> {
        self.inner.write(seg, offset, src)
    }
    fn read_batch(&self, ops: &mut [ReadOp<'_>]) -> Result<(), AccessError> {
        self.inner.read_batch(ops)
    }
    fn write_batch(&self, ops: &[WriteOp<'_>]) -> Result<(), AccessError> {
        self.inner.write_batch(ops)
    }
}

/// A device model whose queue `queue` is hostile.
struct Hostile<V> {
    inner: V,
    queue: u16,
    republisher: Arc<Republisher>,
}

impl<V: DeviceModel> DeviceModel for Hostile<V> {
    type Memory = HostileMem<V::Memory>;

    fn name(&self) -> &'static str {
        "hostile"
    }

    fn open_queue(
        &self,
        index: u16,
        size: u16,
        addrs: QueueAddrs,
    ) -> Result<DeviceQueue<Self::Memory>, ModelError> {
        let q = self.inner.open_queue(index, size, addrs)?;
        Ok(DeviceQueue {
            ring: q.ring,
            memory: HostileMem {
                inner: q.memory,
                hostile: (index == self.queue).then(|| self.republisher.clone()),
            },
        })
    }
}

/// Runs `test` on its own thread and fails if it does not finish within
/// [`WATCHDOG`] (a worker that never stops hangs the device's reset). The hung
/// thread is left behind; the test binary ends anyway.
fn watched(test: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        test();
        let _ = done.send(());
    });
    match finished.recv_timeout(WATCHDOG) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the test failed (see above)"),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("hung for {WATCHDOG:?}: the device's worker never returned")
        }
    }
}

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
            republisher.avail.set(dq.ring.avail.clone()).unwrap();
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

    republisher.arm();
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
