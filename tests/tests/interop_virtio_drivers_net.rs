//! Interop with a peer nobody here wrote, over the network: rcore's `virtio-drivers`
//! 0.13 `VirtIONet`, unmodified ("guest A"), drives our `NetDevice` through the
//! [`VdTransport`] / [`VdHal`] adapter in `vio::vd_peer`, and exchanges frames with
//! our own `drivers-net` `NetDriver` ("guest B") across our learning switch.
//!
//! Each scenario: A and B each broadcast a frame the other receives; A sends [`N`]
//! frames of 60 to 1514 bytes (sequence numbers, deterministic payloads) to B's MAC
//! and B compares every byte; B does the same towards A; the switch's port counters
//! must then show every frame forwarded and delivered, none dropped. A frame over the
//! device's MTU from A is dropped and counted without stalling A, and a second
//! `VirtIONet` session on the same device (after the reset the first one's drop
//! causes) still talks to B.
//!
//! # What is negotiated
//! Our device offers VERSION_1, INDIRECT_DESC, EVENT_IDX, MAC, STATUS, MTU,
//! MRG_RXBUF, CSUM and GUEST_CSUM. virtio-drivers accepts only what it implements:
//! **VERSION_1, INDIRECT_DESC, EVENT_IDX, MAC and STATUS**. Consequences, all
//! checked here:
//! - The header is the 12-byte VERSION_1 `virtio_net_hdr` (virtio 1.2 §5.1.6: with
//!   VERSION_1 `num_buffers` is always present), not the legacy 10-byte one
//!   (virtio-drivers uses that only without VERSION_1 and MRG_RXBUF). Without
//!   MRG_RXBUF our device writes `num_buffers = 1` (§5.1.6.4) and all other fields 0.
//! - No MRG_RXBUF: each frame goes into one receive buffer whole. A's buffers are
//!   [`BUF_LEN`] = 1528 bytes, the smallest virtio-drivers accepts (it wants 1526,
//!   header plus 1514, and sizes buffers in `usize` words), so an MTU-size frame
//!   fills one to within 2 bytes.
//! - No MTU: A assumes nothing about the MTU; our device enforces its 1500 on the
//!   descriptor lengths, so a longer frame from A is dropped and counted (`over_mtu`)
//!   and its transmit buffer still comes back, so `VirtIONet::send` does not spin.
//! - No CSUM / GUEST_CSUM: frames travel with complete checksums (here: none, raw
//!   Ethernet), and B, which did negotiate GUEST_CSUM, gets plain frames.
//! - INDIRECT_DESC: A transmits header and frame as two buffers behind one indirect
//!   descriptor; receive buffers are single direct descriptors.
//!
//! # Sharing models
//! As for `VirtIOBlk` (see `tests/interop_virtio_drivers.rs`): models 2 (direct) and 4
//! (grant) work with the device's full queue size, 256; model 3 cannot be expressed
//! (virtio-drivers places its rings itself). Model 1 (shared page) needs more than
//! the block device did, because virtio-net has two queues and the model confines
//! each queue's rings and descriptors to that queue's own ring slot and bounce area,
//! while the `Hal` is never told the queue: `QueueRouting::net` places them, knowing
//! that virtio-drivers creates the transmit queue first and that each net queue
//! carries one direction of buffers. Its queue size is 128: queue 0's ring slot
//! loses its first page (virtio-drivers reads model address 0 as a failed
//! allocation), and 256-entry rings need all three pages.
//!
//! # What virtio-drivers does not do
//! `VirtIONet` posts every receive buffer at creation and never unshares those still
//! posted when it is dropped: with a bouncing `Hal` their bounce space (and, in model
//! 4, their grants) stays taken. The tests assert exactly that count, so a change in
//! the peer shows up. Its EVENT_IDX kick decision (`VirtQueue::should_notify`)
//! compares ring indices without wrap-around (`avail_idx >= avail_event + 1`, not
//! virtio 1.2 §2.7.10's `vring_need_event`), so past index 65535 it can skip a kick;
//! our device's worker would only be late (it wakes every 100 ms), and these tests
//! stay far below the wrap.
//!
//! virtio-drivers never waits for interrupts: `send` spins on the used ring with no
//! timeout, and `receive` returns `NotReady`. Receiving polls against a deadline;
//! each scenario runs under a watchdog thread, so a device that never answers fails
//! the test instead of hanging it.

// Test patterns come from small counters by deliberate truncation.
#![allow(clippy::cast_possible_truncation)]

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use backend_host::net::{NetDevice, NetSettings, PortId, PortStats, Switch, SwitchConfig};
use drivers_net::NetOptions;
use hypervisor::Hypervisor;
use transport_grant::GrantService;
use vio::conformance::Fixture;
use vio::models;
use vio::net_rig::{self, Dev, NetGuest};
use vio::vd_peer::{
    self, DirectBacking, DmaBacking, GrantBacking, QueueRouting, SharedPageBacking, VdHal, VdTransport,
};
use virtio_core::DriverModel;
use virtio_core::features::Features;
use virtio_core::lifecycle::ControlPlane;
use virtio_core::net::NetFeatures;
use virtio_core::status::DeviceStatus;
use virtio_core::transport::InProcessTransport;
use virtio_drivers::device::net::{TxBuffer, VirtIONet};

/// Frames per direction.
const N: u32 = 200;
/// Bytes per receive buffer of A: the smallest virtio-drivers accepts.
const BUF_LEN: usize = 1528;
/// The VERSION_1 header virtio-drivers negotiates.
const HDR_LEN: usize = 12;
/// Largest frame the device's default MTU (1500) allows.
const MAX_FRAME: usize = 1514;
const TIMEOUT: Duration = Duration::from_secs(10);
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const BROADCAST: [u8; 6] = [0xff; 6];

type NetTransport<V> = Arc<InProcessTransport<NetDevice<V>>>;
type VdNet<V, const Q: usize> = VirtIONet<VdHal, VdTransport<NetDevice<V>>, Q>;

/// Runs `f` on its own thread (the `Hal` state is per thread) and fails if it does
/// not finish in time.
fn watchdog<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .with_ansi(false)
        .try_init();
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(r) => {
            handle.join().unwrap();
            r
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => std::panic::resume_unwind(handle.join().unwrap_err()),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!(
                "{what}: still running after 60 s (virtio-drivers spinning on a device that never answered?)"
            )
        }
    }
}

/// An Ethernet frame of `len` bytes (at least 18) from `src` to `dst`: sequence
/// number `seq` after the EtherType, then bytes that depend on position, sequence
/// number and sender.
fn frame(dst: [u8; 6], src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(&seq.to_be_bytes());
    while f.len() < len {
        let i = f.len() as u32;
        f.push((i.wrapping_mul(167) ^ seq.wrapping_mul(31) ^ u32::from(src[5])) as u8);
    }
    f
}

/// Frame sizes: the edges first (minimum, maximum and their neighbours), then a
/// spread over the whole range.
fn size(i: u32) -> usize {
    const EDGES: [usize; 5] = [60, MAX_FRAME, 61, MAX_FRAME - 1, 64];
    EDGES
        .get(i as usize)
        .copied()
        .unwrap_or(60 + (i as usize * 211) % (MAX_FRAME - 60 + 1))
}

fn seq_of(f: &[u8]) -> u32 {
    u32::from_be_bytes(f[14..18].try_into().unwrap())
}

/// Guest B: our driver on our device, whose calls fail the test when they fail.
struct Ours<D: DriverModel, V: Dev>(NetGuest<D, V>);

impl<D: DriverModel, V: Dev> std::ops::Deref for Ours<D, V> {
    type Target = NetGuest<D, V>;
    fn deref(&self) -> &NetGuest<D, V> {
        &self.0
    }
}

fn plug<D: DriverModel, V: Dev>(f: Fixture<D, V>, switch: &Arc<Switch>) -> Ours<D, V> {
    let g = net_rig::plug(f, switch, NetSettings::default(), NetOptions::default()).unwrap();
    assert_eq!(g.nic.info().mac, Some(g.mac));
    Ours(g)
}

impl<D: DriverModel, V: Dev> Ours<D, V> {
    fn send(&self, frame: &[u8]) {
        self.0.send(frame, TIMEOUT).unwrap();
    }

    /// Receives exactly `n` frames (fails after [`TIMEOUT`]).
    fn recv(&self, n: usize) -> Vec<Vec<u8>> {
        self.0.recv(n, TIMEOUT).unwrap()
    }

    /// Asserts that nothing arrives within `wait`.
    fn recv_nothing(&self, wait: Duration) {
        self.0.recv_nothing(wait).unwrap();
    }
}

/// Guest A: virtio-drivers' `VirtIONet` on our device.
struct Theirs<V: Dev, const Q: usize> {
    nic: VdNet<V, Q>,
    dev: NetTransport<V>,
}

/// What virtio-drivers accepts of what our device offers (see the module docs).
fn expected_features() -> u64 {
    (Features::VERSION_1 | Features::INDIRECT_DESC | Features::EVENT_IDX).bits()
        | (NetFeatures::MAC | NetFeatures::STATUS).bits()
}

impl<V: Dev, const Q: usize> Theirs<V, Q> {
    /// Starts a `VirtIONet` session on `dev`; the `Hal` backing must be installed.
    fn open(dev: &NetTransport<V>, mac: [u8; 6]) -> Theirs<V, Q> {
        let nic = VirtIONet::<VdHal, _, Q>::new(VdTransport::new(dev.clone()).unwrap(), BUF_LEN).unwrap();
        let status = DeviceStatus::from_bits_retain(dev.status());
        assert!(status.contains(DeviceStatus::DRIVER_OK), "{status:?}");
        assert!(!status.contains(DeviceStatus::DEVICE_NEEDS_RESET), "{status:?}");
        let negotiated = dev.with_lifecycle(|l| l.negotiated_features());
        assert_eq!(negotiated, Some(expected_features()), "negotiated features");
        assert_eq!(nic.mac_address(), mac, "MAC from the configuration space");
        assert!(nic.can_send());
        Theirs {
            nic,
            dev: dev.clone(),
        }
    }

    fn send(&mut self, frame: &[u8]) {
        self.nic.send(TxBuffer::from(frame)).unwrap();
    }

    /// Receives exactly `n` frames by polling (fails after [`TIMEOUT`]), checking the
    /// header our device wrote in front of each.
    fn recv(&mut self, n: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + TIMEOUT;
        let mut got = Vec::new();
        while got.len() < n {
            match self.nic.receive() {
                Ok(buf) => {
                    let hdr = &buf.as_bytes()[..HDR_LEN];
                    // No flags, no GSO; num_buffers 1 (§5.1.6.4, no MRG_RXBUF).
                    assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "receive header");
                    got.push(buf.packet().to_vec());
                    self.nic.recycle_rx_buffer(buf).unwrap();
                }
                Err(virtio_drivers::Error::NotReady) => {
                    assert!(
                        Instant::now() < deadline,
                        "A received {} of {n} frames",
                        got.len()
                    );
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(e) => panic!("A: receive failed: {e:?}"),
            }
        }
        got
    }
}

/// Checks that `got` is exactly `sent`, frame by frame and byte by byte.
fn same_frames(who: &str, got: &[Vec<u8>], sent: &[Vec<u8>]) {
    assert_eq!(got.len(), sent.len(), "{who}: frame count");
    for (g, s) in got.iter().zip(sent) {
        assert_eq!(g.len(), s.len(), "{who}: length of frame {}", seq_of(s));
        assert_eq!(seq_of(g), seq_of(s), "{who}: order");
        if let Some(at) = g.iter().zip(s).position(|(x, y)| x != y) {
            panic!("{who}: frame {} differs at byte {at}", seq_of(s));
        }
    }
}

/// Waits until `now()` gives `want` (fails with the last value after [`TIMEOUT`]).
fn settled<const K: usize>(what: &str, now: impl Fn() -> [PortStats; K], want: [PortStats; K]) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let got = now();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: port counters {got:#?}, want {want:#?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How A's device side and `Hal` backing are made, inside the watchdog thread.
struct SideA<V, B> {
    device: V,
    backing: B,
    /// Keeps A's memory (and grant table) alive.
    keep: Box<dyn std::any::Any>,
}

/// The whole scenario: A (virtio-drivers, queue size `Q`) and B (ours) on one switch.
/// Returns the count of shares A's `Hal` still holds after A's sessions ended.
fn exchange<VA, D, VB, B, const Q: usize>(what: &str, a: SideA<VA, B>, fb: Fixture<D, VB>) -> usize
where
    VA: Dev,
    D: DriverModel,
    VB: Dev,
    B: DmaBacking + 'static,
{
    let sw = Switch::new(SwitchConfig::default());
    let dev = NetDevice::new(a.device, &sw, NetSettings::default()).unwrap();
    let (a_port, a_mac) = (dev.port(), dev.mac());
    let dev: NetTransport<VA> = Arc::new(InProcessTransport::new(dev.lifecycle(), dev).unwrap());
    let installed = vd_peer::install(a.backing).unwrap();
    let mut theirs = Theirs::<VA, Q>::open(&dev, a_mac);
    let ours = plug(fb, &sw);
    let stats = |p: PortId| -> PortStats { sw.stats(p).unwrap() };

    // Broadcasts both ways; the switch learns both stations.
    let bc = frame(BROADCAST, a_mac, 0, 64);
    theirs.send(&bc);
    same_frames(&format!("{what}: broadcast A to B"), &ours.recv(1), &[bc]);
    let bc = frame(BROADCAST, ours.mac, 0, 90);
    ours.send(&bc);
    same_frames(&format!("{what}: broadcast B to A"), &theirs.recv(1), &[bc]);
    assert_eq!(sw.lookup(a_mac), Some(a_port));
    assert_eq!(sw.lookup(ours.mac), Some(ours.port));

    // Batches no larger than the receiver's queue, so none may drop.
    let batch = Q.min(50);
    let to_b: Vec<Vec<u8>> = (1..=N).map(|i| frame(ours.mac, a_mac, i, size(i - 1))).collect();
    for chunk in to_b.chunks(batch) {
        for f in chunk {
            theirs.send(f);
        }
        same_frames(&format!("{what}: A to B"), &ours.recv(chunk.len()), chunk);
    }
    let to_a: Vec<Vec<u8>> = (1..=N).map(|i| frame(a_mac, ours.mac, i, size(i - 1))).collect();
    for chunk in to_a.chunks(batch) {
        for f in chunk {
            ours.send(f);
        }
        same_frames(&format!("{what}: B to A"), &theirs.recv(chunk.len()), chunk);
    }

    // A device counts a frame just after forwarding or delivering it, so the
    // receiver may hold it a moment before the counters move: wait for them.
    let frames = u64::from(N) + 1;
    let want = PortStats {
        tx_frames: frames,
        rx_frames: frames,
        ..PortStats::default()
    };
    settled(what, || [stats(a_port), stats(ours.port)], [want, want]);
    // Unicast from the first frame on: both stations were learnt by the broadcasts.
    assert_eq!((sw.unicast_frames(), sw.flooded_frames()), (2 * u64::from(N), 2));
    assert_eq!(ours.nic.broken(), None);

    // Over the MTU A never learnt: dropped on A's port, and A's send still returns.
    theirs.send(&frame(ours.mac, a_mac, 9000, MAX_FRAME + 1));
    let after = frame(ours.mac, a_mac, 9001, 60);
    theirs.send(&after);
    same_frames(
        &format!("{what}: after an oversized frame"),
        &ours.recv(1),
        &[after],
    );
    let mut dropped = PortStats {
        tx_frames: frames + 1,
        ..want
    };
    dropped.drops.over_mtu = 1;
    settled(what, || [stats(a_port)], [dropped]);
    ours.recv_nothing(Duration::from_millis(30));

    // Dropping A resets the device before its rings go; a new session works.
    drop(theirs);
    assert_eq!(dev.status(), 0, "{what}: reset on drop");
    let s = vd_peer::stats().unwrap();
    assert_eq!(
        (s.dma_pages, s.leaked_pages, s.refused),
        (0, 0, 0),
        "{what}: {s:?}"
    );
    assert_eq!(s.shares, Q, "{what}: posted receive buffers are never unshared");
    let mut again = Theirs::<VA, Q>::open(&dev, a_mac);
    let f = frame(ours.mac, a_mac, 10_000, MAX_FRAME);
    again.send(&f);
    same_frames(&format!("{what}: second session, A to B"), &ours.recv(1), &[f]);
    let f = frame(a_mac, ours.mac, 10_001, MAX_FRAME);
    ours.send(&f);
    same_frames(&format!("{what}: second session, B to A"), &again.recv(1), &[f]);
    assert_eq!(again.dev.status() & DeviceStatus::DEVICE_NEEDS_RESET.bits(), 0);
    drop(again);
    let shares = vd_peer::stats().unwrap().shares;
    drop(installed);
    drop(a.keep);
    shares
}

#[test]
fn model2_direct_with_ours_on_model2() {
    watchdog("model 2", || {
        let f = models::direct();
        let a = SideA {
            backing: DirectBacking::new(&f.guest).unwrap(),
            device: f.device,
            keep: Box::new((f.guest, f.driver)),
        };
        let shares = exchange::<_, _, _, _, 256>("model 2 / model 2", a, models::direct());
        assert_eq!(shares, 2 * 256);
    });
}

#[test]
fn model1_shared_page_with_ours_on_model4() {
    watchdog("model 1", || {
        let f = models::shared_page();
        let a = SideA {
            backing: SharedPageBacking::with_routing(f.driver, QueueRouting::net()).unwrap(),
            device: f.device,
            keep: Box::new(f.guest),
        };
        let shares = exchange::<_, _, _, _, 128>("model 1 / model 4", a, models::grant());
        assert_eq!(shares, 2 * 128);
    });
}

#[test]
fn model4_grant_with_ours_on_model3() {
    watchdog("model 4", || {
        let hv = Hypervisor::new();
        let guest = hv.create_domain("grant", models::GUEST_BYTES).unwrap();
        let service = GrantService::new(hv);
        let (driver, device) = transport_grant::pair(&service, &guest, Hypervisor::HOST).unwrap();
        let a = SideA {
            backing: GrantBacking::new(&service, &guest, Hypervisor::HOST),
            device,
            keep: Box::new((driver, guest.clone())),
        };
        let shares = exchange::<_, _, _, _, 256>("model 4 / model 3", a, models::hypervisor_copy());
        assert_eq!(shares, 2 * 256);
        // Only the receive buffers virtio-drivers left posted keep their grants: one
        // or two pages each (1528 bytes, bounced at 16-byte alignment), rings none.
        let grants = service.active_grants(guest.id());
        assert!((2 * 256..=4 * 256).contains(&grants), "{grants} grants");
    });
}

/// A small queue on A: every receive buffer is recycled many times over, and the
/// rings wrap.
#[test]
fn model2_small_queue_with_ours_on_model1() {
    watchdog("model 2, queue 16", || {
        let f = models::direct();
        let a = SideA {
            backing: DirectBacking::new(&f.guest).unwrap(),
            device: f.device,
            keep: Box::new((f.guest, f.driver)),
        };
        let shares = exchange::<_, _, _, _, 16>("model 2 (16) / model 1", a, models::shared_page());
        assert_eq!(shares, 2 * 16);
    });
}

/// Model 1 with the device's full queue size: queue 0's ring slot has no room for
/// 256-entry rings once its first page is held back (see the module docs), so
/// `VirtIONet::new` fails cleanly with a DMA error and holds no pages.
#[test]
fn model1_full_size_queue_is_a_dma_error() {
    watchdog("model 1, queue 256", || {
        let f = models::shared_page();
        let sw = Switch::new(SwitchConfig::default());
        let dev = NetDevice::new(f.device, &sw, NetSettings::default()).unwrap();
        let dev: NetTransport<_> = Arc::new(InProcessTransport::new(dev.lifecycle(), dev).unwrap());
        let backing = SharedPageBacking::with_routing(f.driver, QueueRouting::net()).unwrap();
        let _hal = vd_peer::install(backing).unwrap();
        let r = VdNet::<_, 256>::new(VdTransport::new(dev.clone()).unwrap(), BUF_LEN);
        assert_eq!(r.err(), Some(virtio_drivers::Error::DmaError));
        let s = vd_peer::stats().unwrap();
        assert_eq!((s.dma_pages, s.shares, s.refused), (0, 0, 1), "{s:?}");
        assert_eq!(dev.status() & DeviceStatus::DRIVER_OK.bits(), 0);
    });
}
