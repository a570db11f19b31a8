//! The driver against a scripted device that does whatever the test says (HOSTILE
//! rule 31): short and overlong used lengths, impossible `num_buffers`, partial
//! checksums outside the frame, buffers returned unused, a transmit queue the
//! device never drains. Model 2 (direct) over an in-process transport.

// Test lengths are small; patterns come from counters by deliberate truncation.
#![allow(clippy::cast_possible_truncation)]

use drivers_net::{Broken, NetDriver, NetError, NetOptions};
use hypervisor::Hypervisor;
use std::sync::{Arc, Mutex};
use transport_descriptors::DirectMemory;
use transport_descriptors::direct::{self, DirectDevice, DirectDriver};
use virtio_core::config::ConfigSpace;
use virtio_core::features::Features;
use virtio_core::lifecycle::DeviceLifecycle;
use virtio_core::net::{self, NET_DEPENDENCIES, NetConfig, NetFeatures, VIRTIO_NET_S_LINK_UP, VirtioNetHdr};
use virtio_core::ring::Chain;
use virtio_core::ring::split::DriverQueueError;
use virtio_core::shm::Region;
use virtio_core::transport::{ActiveQueue, DeviceHandler, InProcessTransport};
use virtio_core::{DeviceModel, SplitDevice};
use zerocopy::IntoBytes;

const QUEUE: u16 = 8;
const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x42];

struct Rings {
    rx: SplitDevice<DirectMemory>,
    tx: SplitDevice<DirectMemory>,
    /// The used rings, for writing what no correct device would.
    raw_used: [Region; 2],
}

/// A device whose rings the test drives by hand.
struct Scripted {
    model: DirectDevice,
    rings: Arc<Mutex<Option<Rings>>>,
}

impl DeviceHandler for Scripted {
    fn activate(
        &mut self,
        features: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let f = Features::from_bits_retain(features);
        let open = |q: &ActiveQueue| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let vq = self.model.open_queue(q.index, q.layout.size, q.addrs())?;
            let used = vq.ring.device.clone();
            Ok((SplitDevice::new(q.layout.size, &vq.ring, vq.memory, f)?, used))
        };
        let (rx, rx_used) = open(&queues[0])?;
        let (tx, tx_used) = open(&queues[1])?;
        *self.rings.lock().unwrap() = Some(Rings {
            rx,
            tx,
            raw_used: [rx_used, tx_used],
        });
        Ok(())
    }

    fn reset(&mut self) {
        *self.rings.lock().unwrap() = None;
    }
}

type Driver = NetDriver<DirectDriver, InProcessTransport<Scripted>>;

struct Setup {
    nic: Driver,
    rings: Arc<Mutex<Option<Rings>>>,
}

fn setup_with(offer: NetFeatures, mtu: u16, opts: NetOptions) -> Result<Setup, NetError> {
    let guest = Hypervisor::new()
        .create_domain("hostile-device", 16 << 20)
        .unwrap();
    let (driver, device) = direct::pair(&guest).unwrap();
    let rings = Arc::new(Mutex::new(None));
    let cfg = NetConfig {
        mac: MAC,
        status: VIRTIO_NET_S_LINK_UP.into(),
        max_virtqueue_pairs: 1.into(),
        mtu: mtu.into(),
        ..NetConfig::default()
    };
    let features = offer.bits() | (Features::VERSION_1 | Features::EVENT_IDX).bits();
    let lc = DeviceLifecycle::new(
        net::DEVICE_ID,
        features,
        NET_DEPENDENCIES,
        ConfigSpace::new(cfg.as_bytes().to_vec()),
        &[QUEUE, QUEUE],
    );
    let handler = Scripted {
        model: device,
        rings: rings.clone(),
    };
    let t = InProcessTransport::new(lc, handler).unwrap();
    let nic = NetDriver::new(t, driver, guest.memory().clone(), opts)?;
    Ok(Setup { nic, rings })
}

fn setup(offer: NetFeatures) -> Setup {
    setup_with(offer, 1500, NetOptions::default()).unwrap()
}

const PLAIN: NetFeatures = NetFeatures::MAC
    .union(NetFeatures::STATUS)
    .union(NetFeatures::MTU)
    .union(NetFeatures::GUEST_CSUM)
    .union(NetFeatures::CSUM);
const MRG: NetFeatures = PLAIN.union(NetFeatures::MRG_RXBUF);

impl Setup {
    fn with<R>(&self, f: impl FnOnce(&mut Rings) -> R) -> R {
        f(self.rings.lock().unwrap().as_mut().expect("device active"))
    }

    /// Takes the next receive buffer the driver posted.
    fn rx_chain(&self) -> Chain {
        self.with(|r| r.rx.pop().unwrap().expect("a receive buffer"))
    }

    /// Writes `bytes` into `chain` and returns it with used length `len`.
    fn rx_use(&self, chain: &Chain, bytes: &[u8], len: u32) {
        self.with(|r| {
            chain.writer(r.rx.memory()).write_all(bytes).unwrap();
            r.rx.add_used(chain.head(), len).unwrap();
        });
    }

    /// Delivers one frame with `hdr` in one buffer.
    fn deliver(&self, hdr: VirtioNetHdr, frame: &[u8]) {
        let c = self.rx_chain();
        let bytes = [hdr.as_bytes(), frame].concat();
        self.rx_use(&c, &bytes, bytes.len() as u32);
    }

    /// Writes used element `pos` of queue `q` as (`id`, `len`) and sets `used.idx`
    /// to `idx`, bypassing the device ring's own checks.
    fn raw_used(&self, q: usize, pos: u16, id: u32, len: u32, idx: u16) {
        self.with(|r| {
            let at = 4 + 8 * u64::from(pos % QUEUE);
            let elem = [id.to_le_bytes(), len.to_le_bytes()].concat();
            r.raw_used[q].write(at, &elem).unwrap();
            r.raw_used[q].write(2, &idx.to_le_bytes()).unwrap();
        });
    }

    fn poll(&self) -> Result<Vec<Vec<u8>>, NetError> {
        let mut got = Vec::new();
        self.nic.poll_recv(64, |f| got.push(f.to_vec()))?;
        Ok(got)
    }
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..len.saturating_sub(14)).map(|i| i as u8));
    f
}

#[test]
fn negotiates_and_reads_the_config() {
    let s = setup(MRG);
    let info = s.nic.info();
    assert_eq!(info.mac, Some(MAC));
    assert_eq!(info.mtu, 1500);
    assert!(info.mrg_rxbuf && info.csum && info.guest_csum && info.status);
    assert!(s.nic.link_up());
    // All receive buffers were posted before DRIVER_OK.
    let n = s.with(|r| std::iter::from_fn(|| r.rx.pop().unwrap()).count());
    assert_eq!(n, usize::from(QUEUE));
}

#[test]
fn a_well_formed_frame_is_received_and_its_buffer_reposted() {
    let s = setup(PLAIN);
    for round in 0..3 * usize::from(QUEUE) {
        let f = frame(60 + round);
        s.deliver(VirtioNetHdr::rx(1), &f);
        assert_eq!(s.poll().unwrap(), vec![f]);
    }
    assert_eq!(s.nic.rx_stats().frames, 3 * u64::from(QUEUE));
}

#[test]
fn used_length_shorter_than_the_header_breaks_the_queue() {
    let s = setup(PLAIN);
    let c = s.rx_chain();
    s.rx_use(&c, &[0; 5], 5);
    assert!(matches!(
        s.poll(),
        Err(NetError::DeviceBroken(Broken::ShortUsed(5)))
    ));
    assert!(matches!(s.poll(), Err(NetError::DeviceBroken(_))));
    assert_eq!(s.nic.broken(), Some(Broken::ShortUsed(5)));
}

#[test]
fn used_length_past_the_buffer_breaks_the_queue() {
    let s = setup(PLAIN);
    let c = s.rx_chain();
    s.raw_used(0, 0, u32::from(c.head()), c.writable_len() + 1, 1);
    assert!(matches!(
        s.poll(),
        Err(NetError::DeviceBroken(Broken::Ring(
            DriverQueueError::LengthTooLarge { .. }
        )))
    ));
    assert!(s.nic.broken().is_some());
}

#[test]
fn a_used_id_not_outstanding_breaks_the_queue() {
    let s = setup(PLAIN);
    s.raw_used(0, 0, u32::from(QUEUE) + 3, 72, 1);
    assert!(matches!(
        s.poll(),
        Err(NetError::DeviceBroken(Broken::Ring(DriverQueueError::UnknownId(
            11
        ))))
    ));
}

#[test]
fn a_used_index_running_ahead_breaks_the_queue() {
    let s = setup(PLAIN);
    s.raw_used(0, 0, 0, 72, QUEUE + 1);
    assert!(matches!(
        s.poll(),
        Err(NetError::DeviceBroken(Broken::Ring(
            DriverQueueError::UsedTooFarAhead { .. }
        )))
    ));
}

#[test]
fn a_transmit_buffer_used_with_a_length_breaks_the_transmit_queue() {
    let s = setup(PLAIN);
    s.nic.send(&frame(60)).unwrap();
    let c = s.with(|r| r.tx.pop().unwrap().unwrap());
    s.raw_used(1, 0, u32::from(c.head()), 1, 1);
    assert!(matches!(s.nic.reclaim_tx(), Err(NetError::DeviceBroken(_))));
    assert!(matches!(s.nic.send(&frame(60)), Err(NetError::DeviceBroken(_))));
    // Receiving is unaffected.
    let f = frame(60);
    s.deliver(VirtioNetHdr::rx(1), &f);
    assert_eq!(s.poll().unwrap(), vec![f]);
}

#[test]
fn a_buffer_returned_with_length_zero_is_counted_and_reposted() {
    let s = setup(PLAIN);
    let c = s.rx_chain();
    s.with(|r| r.rx.add_used(c.head(), 0)).unwrap();
    assert!(s.poll().unwrap().is_empty());
    assert_eq!(s.nic.rx_stats().unused_buffers, 1);
    assert_eq!(s.nic.broken(), None);
    let n = s.with(|r| std::iter::from_fn(|| r.rx.pop().unwrap()).count());
    assert_eq!(n, usize::from(QUEUE), "every buffer is posted again");
}

#[test]
fn impossible_num_buffers_breaks_the_queue() {
    for n in [0u16, QUEUE + 1, u16::MAX] {
        let s = setup(MRG);
        s.deliver(VirtioNetHdr::rx(n), &frame(60));
        assert!(
            matches!(s.poll(), Err(NetError::DeviceBroken(Broken::NumBuffers(m))) if m == n),
            "num_buffers {n}"
        );
    }
}

#[test]
fn a_mergeable_frame_is_assembled_across_polls() {
    let small = NetOptions {
        rx_buf_len: Some(1024),
        ..NetOptions::default()
    };
    let s = setup_with(MRG, 1500, small).unwrap();
    let f = frame(1514);
    let (first, second) = (s.rx_chain(), s.rx_chain());
    let split = first.writable_len() as usize - VirtioNetHdr::SIZE;
    let head = [VirtioNetHdr::rx(2).as_bytes(), &f[..split]].concat();
    s.rx_use(&first, &head, head.len() as u32);
    assert!(s.poll().unwrap().is_empty(), "half a frame is not handed up");
    s.rx_use(&second, &f[split..], (f.len() - split) as u32);
    assert!(s.poll().unwrap() == vec![f]);
}

#[test]
fn an_oversized_mergeable_frame_is_dropped_and_counted() {
    let s = setup(MRG);
    let chains: Vec<Chain> = (0..2).map(|_| s.rx_chain()).collect();
    let hdr = VirtioNetHdr::rx(2);
    // 2 x 2048-byte buffers: more than 1514 bytes of frame.
    let full = vec![0xab; 2048];
    s.rx_use(&chains[0], &[hdr.as_bytes(), &full[12..]].concat(), 2048);
    s.rx_use(&chains[1], &full, 2048);
    assert!(s.poll().unwrap().is_empty());
    assert_eq!(s.nic.rx_stats().oversized, 1);
    let f = frame(100);
    s.deliver(VirtioNetHdr::rx(1), &f);
    assert_eq!(s.poll().unwrap(), vec![f], "the queue goes on");
}

#[test]
fn a_partial_checksum_outside_the_frame_is_dropped_and_counted() {
    let s = setup(PLAIN);
    s.deliver(VirtioNetHdr::partial_csum(50, 10), &frame(60));
    assert!(s.poll().unwrap().is_empty());
    assert_eq!(s.nic.rx_stats().bad_header, 1);
    // Inside the frame: completed.
    let mut f = frame(60);
    f[40..42].copy_from_slice(&[0, 0]);
    s.deliver(VirtioNetHdr::partial_csum(20, 20), &f);
    let got = s.poll().unwrap();
    let sum = virtio_core::net::csum_fold(virtio_core::net::csum_add(0, &got[0][20..]));
    assert_eq!(sum, 0xffff);
}

#[test]
fn a_partial_checksum_without_guest_csum_is_dropped() {
    let opts = NetOptions {
        wanted: NetOptions::SUPPORTED & !NetFeatures::GUEST_CSUM.bits(),
        ..NetOptions::default()
    };
    let s = setup_with(PLAIN, 1500, opts).unwrap();
    s.deliver(VirtioNetHdr::partial_csum(20, 20), &frame(60));
    assert!(s.poll().unwrap().is_empty());
    assert_eq!(s.nic.rx_stats().bad_header, 1);
}

#[test]
fn transmit_checks_lengths_and_fills_up_then_recovers() {
    let s = setup(PLAIN);
    assert!(matches!(s.nic.send(&[0; 13]), Err(NetError::FrameTooShort(13))));
    assert!(matches!(
        s.nic.send(&frame(1515)),
        Err(NetError::FrameTooLong { len: 1515, max: 1514 })
    ));
    for _ in 0..QUEUE {
        s.nic.send(&frame(60)).unwrap();
    }
    assert!(matches!(s.nic.send(&frame(60)), Err(NetError::QueueFull)));
    // The device reads one: header then frame.
    let f = frame(60);
    let c = s.with(|r| r.tx.pop().unwrap().unwrap());
    let mut got = vec![0u8; c.readable_len() as usize];
    s.with(|r| c.reader(r.tx.memory()).read_exact(&mut got).unwrap());
    assert_eq!(got, [VirtioNetHdr::default().as_bytes(), &f].concat());
    s.with(|r| r.tx.add_used(c.head(), 0)).unwrap();
    s.nic.send(&f).unwrap();
    assert_eq!(s.nic.tx_completed(), 1);
    assert!(matches!(
        s.nic
            .send_blocking(&f, Some(std::time::Duration::from_millis(30))),
        Err(NetError::QueueFull)
    ));
}

#[test]
fn a_partial_checksum_request_is_checked() {
    let no_csum = NetOptions {
        wanted: NetOptions::SUPPORTED & !NetFeatures::CSUM.bits(),
        ..NetOptions::default()
    };
    let s = setup_with(PLAIN, 1500, no_csum).unwrap();
    assert!(matches!(
        s.nic.send_partial_csum(&frame(60), 20, 10),
        Err(NetError::BadChecksumRequest)
    ));
}

#[test]
fn an_mtu_below_68_is_refused() {
    assert!(matches!(
        setup_with(PLAIN, 60, NetOptions::default()),
        Err(NetError::BadMtu(60))
    ));
}
