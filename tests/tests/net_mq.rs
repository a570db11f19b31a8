//! The virtio-net control queue (CTRL_VQ) and multiqueue (MQ) end to end: our
//! driver and our device over the switch, with 2 and 4 queue pairs over model 2
//! and model 4. Flows are steered to one receive queue each and both directions of
//! a flow meet on the same queue index; only queue 0 is used before
//! VQ_PAIRS_SET; bad pair counts are refused; receive modes and MAC setting act on
//! what reaches the guest; hostile control commands written straight into the ring
//! get VIRTIO_NET_ERR or come back unused; a reset with every queue active stops
//! the device and a new session works; and the driver types a device's control
//! failures (no answer in time, ERR, no ack).

// Test patterns come from small counters by deliberate truncation.
#![allow(clippy::cast_possible_truncation)]

use backend_host::net::{NetDevice, NetSettings, PortId, PortStats, Switch, SwitchConfig};
use drivers_net::{NetDriver, NetError, NetOptions};
use hypervisor::Domain;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vio::conformance::Fixture;
use vio::models;
use virtio_core::lifecycle::ControlPlane;
use virtio_core::net::{
    NetFeatures, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_core::notify::EventFdNotifier;
use virtio_core::transport::{InProcessTransport, Transport, TransportError};
use virtio_core::{DeviceModel, DriverModel, QueueAddrs};

const TIMEOUT: Duration = Duration::from_secs(10);
const BROADCAST: [u8; 6] = [0xff; 6];

/// A device side that can serve from a worker thread.
trait Dev: DeviceModel<Memory: Send + 'static> + Send + Sync + 'static {}
impl<V: DeviceModel<Memory: Send + 'static> + Send + Sync + 'static> Dev for V {}

/// A transport the test keeps while a driver uses it, so the device outlives one
/// driver session (a reset) and can be inspected.
struct Shared<H>(Arc<InProcessTransport<H>>);

impl<H: virtio_core::transport::DeviceHandler> ControlPlane for Shared<H> {
    fn device_id(&self) -> u32 {
        self.0.device_id()
    }
    fn config_len(&self) -> usize {
        self.0.config_len()
    }
    fn device_features(&self) -> u64 {
        self.0.device_features()
    }
    fn set_driver_features(&self, features: u64) {
        self.0.set_driver_features(features);
    }
    fn status(&self) -> u8 {
        self.0.status()
    }
    fn set_status(&self, status: u8) {
        self.0.set_status(status);
    }
    fn config_generation(&self) -> u32 {
        self.0.config_generation()
    }
    fn read_config(&self, offset: usize, buf: &mut [u8]) {
        self.0.read_config(offset, buf);
    }
    fn write_config(&self, offset: usize, data: &[u8]) {
        self.0.write_config(offset, data);
    }
}

impl<H: virtio_core::transport::DeviceHandler> Transport for Shared<H> {
    type Interrupt = EventFdNotifier;

    fn num_queues(&self) -> u16 {
        self.0.num_queues()
    }
    fn queue_max_size(&self, index: u16) -> u16 {
        self.0.queue_max_size(index)
    }
    fn setup_queue(&self, index: u16, size: u16, addrs: QueueAddrs) -> Result<(), TransportError> {
        self.0.setup_queue(index, size, addrs)
    }
    fn notify_queue(&self, index: u16) -> Result<(), TransportError> {
        self.0.notify_queue(index)
    }
    fn interrupt(&self, index: u16) -> Result<EventFdNotifier, TransportError> {
        self.0.interrupt(index)
    }
}

type Net<V> = InProcessTransport<NetDevice<V>>;

/// One guest: its driver, its device's transport, its port and MAC.
struct Guest<D: DriverModel, V: Dev> {
    nic: NetDriver<D, Shared<NetDevice<V>>>,
    t: Arc<Net<V>>,
    port: PortId,
    mac: [u8; 6],
    switch: Arc<Switch>,
    domain: Arc<Domain>,
}

/// A device with `pairs` queue pairs on `switch`, behind a transport.
fn device<V: Dev>(device: V, switch: &Arc<Switch>, pairs: u16) -> (Arc<Net<V>>, PortId, [u8; 6]) {
    let settings = NetSettings {
        queue_pairs: pairs,
        ..NetSettings::default()
    };
    let dev = NetDevice::new(device, switch, settings).unwrap();
    let (port, mac) = (dev.port(), dev.mac());
    (
        Arc::new(InProcessTransport::new(dev.lifecycle(), dev).unwrap()),
        port,
        mac,
    )
}

/// A driver session over `t`.
fn session<D: DriverModel, V: Dev>(
    t: &Arc<Net<V>>,
    driver: D,
    guest: &Domain,
    opts: NetOptions,
) -> Result<NetDriver<D, Shared<NetDevice<V>>>, NetError> {
    NetDriver::new(Shared(t.clone()), driver, guest.memory().clone(), opts)
}

fn plug<D: DriverModel, V: Dev>(
    f: Fixture<D, V>,
    switch: &Arc<Switch>,
    pairs: u16,
    opts: NetOptions,
) -> Guest<D, V> {
    let (t, port, mac) = device(f.device, switch, pairs);
    let nic = session(&t, f.driver, &f.guest, opts).unwrap();
    assert_eq!(nic.mac(), Some(mac));
    Guest {
        nic,
        t,
        port,
        mac,
        switch: switch.clone(),
        domain: f.guest,
    }
}

impl<D: DriverModel, V: Dev> Guest<D, V> {
    fn stats(&self) -> PortStats {
        self.switch.stats(self.port).unwrap()
    }

    fn active_pairs(&self) -> u16 {
        self.t.with_handler(|d| d.active_pairs())
    }

    /// Receives exactly `n` frames over every receive queue set up; returns each
    /// with the pair it arrived on (fails after [`TIMEOUT`]).
    fn recv(&self, n: usize) -> Vec<(u16, Vec<u8>)> {
        let deadline = Instant::now() + TIMEOUT;
        let mut got = Vec::new();
        while got.len() < n {
            assert!(Instant::now() < deadline, "received {} of {n} frames", got.len());
            for pair in 0..self.nic.configured_pairs() {
                self.nic
                    .poll_recv_on(pair, 64, |f| got.push((pair, f.to_vec())))
                    .unwrap();
            }
            if got.len() < n {
                self.nic.wait_rx(Some(Duration::from_millis(2))).unwrap();
            }
        }
        got
    }

    /// Asserts that nothing arrives on any queue within `wait`.
    fn recv_nothing(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            for pair in 0..self.nic.configured_pairs() {
                let n = self
                    .nic
                    .poll_recv_on(pair, 16, |f| panic!("unexpected frame {:x?}", &f[..14]))
                    .unwrap();
                assert_eq!(n, 0);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// An IPv4/UDP frame of flow `flow` (source port `1024 + flow`, destination port
/// 7, or the reverse), carrying the flow and a sequence number.
fn udp(dst: [u8; 6], src: [u8; 6], flow: u16, seq: u32, reverse: bool) -> Vec<u8> {
    let (mut sip, mut dip) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    let (mut sport, mut dport) = (1024 + flow, 7u16);
    if reverse {
        (sip, dip) = (dip, sip);
        (sport, dport) = (dport, sport);
    }
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 34, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&sip);
    f.extend_from_slice(&dip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 14, 0, 0]);
    f.extend_from_slice(&flow.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f
}

/// The flow and sequence number of a frame made by [`udp`].
fn flow_seq(f: &[u8]) -> (u16, u32) {
    (
        u16::from_be_bytes([f[42], f[43]]),
        u32::from_be_bytes([f[44], f[45], f[46], f[47]]),
    )
}

/// Polls `cond` until it holds (fails after [`TIMEOUT`]).
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `from` sends `per_flow` frames of each of `flows` flows to `to`, frame `i` of
/// flow `f` on transmit pair `(f + i) % pairs`, in batches every receive queue
/// holds; `to` receives them all. Checks that each frame arrives exactly once and
/// returns the receive pair of each flow, failing if a flow used two.
fn spread<D1: DriverModel, V1: Dev, D2: DriverModel, V2: Dev>(
    from: &Guest<D1, V1>,
    to: &Guest<D2, V2>,
    flows: u16,
    per_flow: u32,
    reverse: bool,
) -> BTreeMap<u16, u16> {
    let pairs = from.nic.queue_pairs();
    let mut queue_of = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let all: Vec<(u16, u32)> = (0..per_flow)
        .flat_map(|i| (0..flows).map(move |f| (f, i)))
        .collect();
    // 128 frames fit one receive queue (256 buffers) even if all hash alike.
    for batch in all.chunks(128) {
        for &(f, i) in batch {
            let frame = udp(to.mac, from.mac, f, i, reverse);
            let pair = (u32::from(f) + i) as u16 % pairs;
            from.nic.send_blocking_on(pair, &frame, Some(TIMEOUT)).unwrap();
        }
        for (pair, frame) in to.recv(batch.len()) {
            let (f, i) = flow_seq(&frame);
            assert!(seen.insert((f, i)), "flow {f} frame {i} arrived twice");
            let q = *queue_of.entry(f).or_insert(pair);
            assert_eq!(q, pair, "flow {f} arrived on receive queues {q} and {pair}");
        }
    }
    assert_eq!(seen.len(), all.len());
    to.recv_nothing(Duration::from_millis(20));
    queue_of
}

/// Two guests with `pairs` pairs each. B starts with one active pair: everything
/// lands on receive queue 0 until its VQ_PAIRS_SET; then flows spread over the
/// queues, each on one, the reverse direction on the same queue index; pair
/// counts the device cannot take are refused.
fn steering<D1: DriverModel, V1: Dev, D2: DriverModel, V2: Dev>(
    fa: Fixture<D1, V1>,
    fb: Fixture<D2, V2>,
    pairs: u16,
) {
    let sw = Switch::new(SwitchConfig::default());
    let a = plug(fa, &sw, pairs, NetOptions::multiqueue(pairs));
    let b = plug(
        fb,
        &sw,
        pairs,
        NetOptions {
            active_pairs: Some(1),
            ..NetOptions::multiqueue(pairs)
        },
    );
    assert_eq!((a.nic.queue_pairs(), a.active_pairs()), (pairs, pairs));
    assert_eq!(
        (b.nic.configured_pairs(), b.nic.info().max_queue_pairs),
        (pairs, pairs)
    );
    assert_eq!((b.nic.queue_pairs(), b.active_pairs()), (1, 1));
    assert!(matches!(
        b.nic.send_on(1, &udp(a.mac, b.mac, 0, 0, true)),
        Err(NetError::NoPair(1))
    ));

    // Before VQ_PAIRS_SET the device uses receive queue 0 only.
    let before = spread(&a, &b, 32, 2, false);
    assert!(before.values().all(|&q| q == 0), "{before:?}");

    b.nic.set_queue_pairs(pairs).unwrap();
    assert_eq!((b.nic.queue_pairs(), b.active_pairs()), (pairs, pairs));
    let there = spread(&a, &b, 64, 4, false);
    let used: BTreeSet<u16> = there.values().copied().collect();
    assert!(used.len() > 1, "one receive queue for 64 flows: {there:?}");
    // The replies of every flow, sent on other transmit queues, meet on the
    // receive queue index the flow used at B: the hash is symmetric.
    let back = spread(&b, &a, 64, 2, true);
    assert_eq!(back, there);

    // Refused: 0 and more than the device has, each with VIRTIO_NET_ERR, and
    // the driver's own checks before anything is sent.
    for n in [0, pairs + 1] {
        let r = b.nic.control(
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &n.to_le_bytes(),
        );
        assert!(
            matches!(
                r,
                Err(NetError::CommandRefused {
                    ack: Some(VIRTIO_NET_ERR),
                    ..
                })
            ),
            "{n} pairs: {r:?}"
        );
        assert!(matches!(
            b.nic.set_queue_pairs(n),
            Err(NetError::QueuePairs { wanted, max }) if wanted == n && max == pairs
        ));
    }
    assert_eq!((b.nic.queue_pairs(), b.active_pairs()), (pairs, pairs));
    for g in [a.stats(), b.stats()] {
        assert_eq!(g.drops.total(), 0, "{g:?}");
    }
    assert_eq!((a.nic.broken(), b.nic.broken()), (None, None));
}

#[test]
fn steering_with_four_pairs_over_direct() {
    steering(models::direct(), models::direct(), 4);
}

#[test]
fn steering_with_two_pairs_over_grant() {
    steering(models::grant(), models::grant(), 2);
}

#[test]
fn steering_with_two_pairs_between_direct_and_grant() {
    steering(models::direct(), models::grant(), 2);
}

/// A driver that set up fewer pairs than the device has cannot activate more;
/// without MQ the control queue sits at index 2 and MQ commands are refused.
#[test]
fn pairs_are_bounded_by_what_the_driver_set_up() {
    let sw = Switch::new(SwitchConfig::default());
    let a = plug(models::direct(), &sw, 4, NetOptions::multiqueue(2));
    assert_eq!((a.nic.configured_pairs(), a.nic.info().max_queue_pairs), (2, 4));
    assert_eq!(a.nic.info().ctrl_queue(), Some(8));
    let r = a.nic.control(
        VIRTIO_NET_CTRL_MQ,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
        &3u16.to_le_bytes(),
    );
    assert!(matches!(r, Err(NetError::CommandRefused { .. })), "{r:?}");
    assert_eq!(a.active_pairs(), 2);
    a.nic.set_queue_pairs(1).unwrap();
    assert_eq!(a.active_pairs(), 1);
    assert!(matches!(a.nic.send_on(1, &[0; 60]), Err(NetError::NoPair(1))));

    // The driver does not want MQ: one pair, control queue 2.
    let opts = NetOptions {
        wanted: NetOptions::SUPPORTED | (NetOptions::CONTROL & !NetFeatures::MQ.bits()),
        queue_pairs: 4,
        ..NetOptions::default()
    };
    let b = plug(models::grant(), &sw, 4, opts);
    assert_eq!(
        (b.nic.configured_pairs(), b.nic.info().ctrl_queue()),
        (1, Some(2))
    );
    assert!(matches!(
        b.nic.set_queue_pairs(1),
        Err(NetError::NotNegotiated(f)) if f == NetFeatures::MQ
    ));
    let r = b.nic.control(
        VIRTIO_NET_CTRL_MQ,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
        &1u16.to_le_bytes(),
    );
    assert!(matches!(r, Err(NetError::CommandRefused { .. })), "{r:?}");
}

/// PROMISC, ALLMULTI and MAC_ADDR_SET are acknowledged and change what reaches
/// the guest; a driver without the features gets a typed error.
#[test]
fn receive_modes_and_mac_address() {
    let sw = Switch::new(SwitchConfig::default());
    let a = plug(models::grant(), &sw, 1, NetOptions::default());
    let b = plug(models::direct(), &sw, 1, NetOptions::multiqueue(1));
    assert!(b.nic.info().ctrl_rx && b.nic.info().ctrl_mac_addr);
    assert!(!NetFeatures::from_bits_retain(b.nic.info().features).contains(NetFeatures::MQ));
    let stranger = [2, 0, 0, 0, 0x77, 0x77];
    let group = [1, 0, 0x5e, 0, 0, 1];
    let frame = |dst: [u8; 6], seq: u32| udp(dst, a.mac, 0, seq, false);
    let filtered = || b.t.with_handler(|d| d.filtered_frames());

    // Promiscuous after reset: unicast flooded for an unknown address arrives.
    a.nic.send(&frame(stranger, 0)).unwrap();
    assert_eq!(b.recv(1)[0].1, frame(stranger, 0));

    b.nic.set_promisc(false).unwrap();
    for (i, dst) in [stranger, group, b.mac, BROADCAST].into_iter().enumerate() {
        a.nic.send(&frame(dst, i as u32)).unwrap();
    }
    let got: Vec<Vec<u8>> = b.recv(2).into_iter().map(|(_, f)| f).collect();
    assert_eq!(got, vec![frame(b.mac, 2), frame(BROADCAST, 3)]);
    eventually("two frames filtered", || filtered() == 2);

    b.nic.set_allmulti(true).unwrap();
    a.nic.send(&frame(group, 4)).unwrap();
    assert_eq!(b.recv(1)[0].1, frame(group, 4));

    // A new address: frames to it arrive, frames to the old one are filtered.
    let new = [2, 0, 0, 0, 0x42, 0x42];
    b.nic.set_mac(new).unwrap();
    assert_eq!(b.nic.mac(), Some(new));
    assert_eq!(b.t.with_handler(|d| d.mac()), new);
    assert_eq!(
        config_mac(&*b.t),
        new,
        "the configuration space follows (§5.1.6.5.2)"
    );
    a.nic.send(&frame(b.mac, 5)).unwrap();
    a.nic.send(&frame(new, 6)).unwrap();
    assert_eq!(b.recv(1)[0].1, frame(new, 6));
    eventually("old address filtered", || filtered() == 3);
    // A group address is not a station address.
    assert!(matches!(
        b.nic.set_mac(group),
        Err(NetError::CommandRefused { .. })
    ));
    assert_eq!(b.nic.mac(), Some(new));

    b.nic.set_promisc(true).unwrap();
    a.nic.send(&frame(stranger, 7)).unwrap();
    assert_eq!(b.recv(1)[0].1, frame(stranger, 7));
    b.recv_nothing(Duration::from_millis(20));

    // A has no control queue: typed errors, nothing sent.
    assert!(matches!(a.nic.set_promisc(true), Err(NetError::NotNegotiated(f)) if f == NetFeatures::CTRL_RX));
    assert!(matches!(a.nic.set_mac(new), Err(NetError::NotNegotiated(f)) if f == NetFeatures::CTRL_MAC_ADDR));
    assert!(
        matches!(a.nic.control(0, 0, &[1]), Err(NetError::NotNegotiated(f)) if f == NetFeatures::CTRL_VQ)
    );
    assert_eq!(b.stats().drops.total(), 0);
}

/// Control commands a hostile driver writes straight into the control ring: each
/// is answered VIRTIO_NET_ERR without effect, or returned with used length 0 when
/// it has no room for an answer; well-formed ones, however split into
/// descriptors, still work.
#[test]
fn hostile_control_commands() {
    use virtio_core::GuestBuf;
    use virtio_core::features::Features;
    use virtio_core::lifecycle::{driver_ok, initialize};
    use virtio_core::net::NET_DEPENDENCIES;
    use virtio_core::ring::split::SplitDriver;

    const Q: u16 = 16;
    let sw = Switch::new(SwitchConfig::default());
    let Fixture {
        guest,
        driver,
        device: dev,
    } = models::direct();
    let (t, _, mac) = device(dev, &sw, 2);
    let wanted = NetOptions::CONTROL | Features::EVENT_IDX.bits();
    let features = initialize(&*t, virtio_core::net::DEVICE_ID, wanted, NET_DEPENDENCIES).unwrap();
    assert_eq!(features & NetOptions::CONTROL, NetOptions::CONTROL);
    // Both pairs and the control queue (index 4); data queues stay empty.
    let mut data_queues = Vec::new();
    for i in 0..4 {
        let q = driver.create_queue(i, Q).unwrap();
        t.setup_queue(i, Q, q.addrs).unwrap();
        data_queues.push(q);
    }
    let cq = driver.create_queue(4, Q).unwrap();
    t.setup_queue(4, Q, cq.addrs).unwrap();
    let mut ctrl = SplitDriver::new(Q, cq.ring, cq.share, Features::from_bits_retain(features)).unwrap();
    driver_ok(&*t).unwrap();
    let mem = guest.memory();

    // Sends one command made of readable parts `out` and writable parts of
    // `ins` bytes; returns the used length and the first writable byte.
    let mut token = 0u32;
    let mut run = |out: &[&[u8]], ins: &[u32]| -> (u32, u8) {
        let mut bufs = Vec::new();
        for part in out {
            let addr = mem.alloc(part.len().max(1) as u64, 8).unwrap();
            mem.write(addr, part).unwrap();
            bufs.push(GuestBuf::new(addr, part.len() as u32));
        }
        let mut acks = Vec::new();
        for &len in ins {
            let addr = mem.alloc(u64::from(len), 8).unwrap();
            mem.write(addr, &vec![0xee; len as usize]).unwrap();
            acks.push(GuestBuf::new(addr, len));
        }
        token += 1;
        ctrl.add(&bufs, &acks, token).unwrap();
        if ctrl.kick_prepare() {
            t.notify_queue(4).unwrap();
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(u) = ctrl.pop_used().unwrap() {
                assert_eq!(u.token, token);
                let mut ack = [0u8];
                if let Some(b) = acks.first() {
                    mem.read(b.addr, &mut ack).unwrap();
                }
                return (u.len, ack[0]);
            }
            assert!(Instant::now() < deadline, "command {token} not returned");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let err = (1, VIRTIO_NET_ERR);
    let ok = (1, VIRTIO_NET_OK);
    let pairs_set = [VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET];
    let active = || t.with_handler(|d| d.active_pairs());

    // Header short: one byte of class.
    assert_eq!(run(&[&[VIRTIO_NET_CTRL_MQ]], &[1]), err);
    assert_eq!(run(&[], &[1]), err);
    // No writable byte for the ack: returned unused, not executed.
    assert_eq!(run(&[&pairs_set, &[2, 0]], &[]).0, 0);
    assert_eq!(active(), 1);
    // A 2-byte ack area: answered ERR in its first byte, not executed.
    assert_eq!(run(&[&pairs_set, &[2, 0]], &[2]), err);
    // Unknown class, a class not offered, an unknown command.
    assert_eq!(run(&[&[9, 0, 1]], &[1]), err);
    assert_eq!(run(&[&[VIRTIO_NET_CTRL_VLAN, 0, 1, 0]], &[1]), err);
    assert_eq!(run(&[&[VIRTIO_NET_CTRL_RX, 7, 1]], &[1]), err);
    // VQ_PAIRS_SET: short and long data, 0, more than the device has.
    assert_eq!(run(&[&pairs_set, &[2]], &[1]), err);
    assert_eq!(run(&[&pairs_set, &[2, 0, 0]], &[1]), err);
    assert_eq!(run(&[&pairs_set, &[0, 0]], &[1]), err);
    assert_eq!(run(&[&pairs_set, &[3, 0]], &[1]), err);
    assert_eq!(run(&[&pairs_set, &[0, 0x80]], &[1]), err);
    assert_eq!(active(), 1);
    // Far more data than any command: refused before it is read.
    let huge = vec![0u8; 64 << 10];
    assert_eq!(run(&[&pairs_set, &huge], &[1]), err);
    // MAC_TABLE_SET whose counts do not match its length, a group MAC address.
    let table = [VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET];
    assert_eq!(run(&[&table, &[1, 0, 0, 0, 2, 0, 0, 0, 0, 1]], &[1]), err);
    assert_eq!(run(&[&table, &[0xff, 0xff, 0xff, 0xff]], &[1]), err);
    let addr_set = [VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET];
    assert_eq!(run(&[&addr_set, &[1, 0, 0, 0, 0, 1]], &[1]), err);
    assert_eq!(t.with_handler(|d| d.mac()), mac);

    // Well-formed commands, split across descriptors as a driver may.
    assert_eq!(run(&[&pairs_set[..1], &pairs_set[1..], &[2], &[0]], &[1]), ok);
    assert_eq!(active(), 2);
    assert_eq!(
        run(&[&[VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, 0]], &[1]),
        ok
    );
    assert_eq!(
        run(&[&[VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI], &[1]], &[1]),
        ok
    );
    let two_and_one = [
        2, 0, 0, 0, 2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 1, 0, 0, 0, 1, 0, 0x5e, 0, 0, 1,
    ];
    assert_eq!(run(&[&table, &two_and_one], &[1]), ok);
    assert_eq!(run(&[&table, &[0; 8]], &[1]), ok);
    assert_eq!(run(&[&addr_set, &[2, 0, 0, 0, 0, 0x99]], &[1]), ok);
    assert_eq!(t.with_handler(|d| d.mac()), [2, 0, 0, 0, 0, 0x99]);
    assert_eq!(sw.stats(t.with_handler(|d| d.port())).unwrap().drops.total(), 0);
    drop(data_queues);
}

/// A reset while every queue is active and frames are arriving stops the device
/// (no more frames written, pairs and MAC back to their reset state); a new driver
/// session on the same device then works with all its pairs.
#[test]
fn reset_with_all_queues_active_then_new_session() {
    let sw = Switch::new(SwitchConfig::default());
    let a = plug(models::grant(), &sw, 4, NetOptions::multiqueue(4));
    let b = plug(models::direct(), &sw, 4, NetOptions::multiqueue(4));
    assert_eq!(b.active_pairs(), 4);
    let there = spread(&a, &b, 16, 2, false);
    assert!(there.values().collect::<BTreeSet<_>>().len() > 1);
    let original = b.mac;
    b.nic.set_mac([2, 0, 0, 0, 0x55, 0x55]).unwrap();

    // Frames arrive on every queue; nobody polls; reset mid-stream.
    let a_sent = a.stats().tx_frames;
    let sender = std::thread::scope(|s| {
        let h = s.spawn(|| {
            for i in 0..300u32 {
                let frame = udp(BROADCAST, a.mac, (i % 64) as u16, i, false);
                a.nic
                    .send_blocking_on((i % 4) as u16, &frame, Some(TIMEOUT))
                    .unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(2));
        let Guest {
            nic, t, domain, port, ..
        } = b;
        drop(nic);
        h.join().unwrap();
        (t, domain, port)
    });
    let (t, domain, port) = sender;
    assert_eq!(t.with_handler(|d| d.active_pairs()), 0);
    assert_eq!(t.with_handler(|d| d.mac()), original, "MAC_ADDR_SET undone");
    assert_eq!(config_mac(&*t), original, "in the configuration space too");
    let written = sw.stats(port).unwrap().rx_frames;
    let dropped = sw.stats(port).unwrap().drops.no_rx_buffer;
    for i in 0..20 {
        a.nic.send(&udp(BROADCAST, a.mac, i, i.into(), false)).unwrap();
    }
    // Every frame A sent is forwarded (and B's dropped) before the new session
    // starts, or a late one would reach its receive queues.
    eventually("A's frames forwarded", || a.stats().tx_frames == a_sent + 320);
    eventually("frames to the stopped port dropped", || {
        sw.stats(port).unwrap().drops.no_rx_buffer >= dropped + 20
    });
    assert_eq!(
        sw.stats(port).unwrap().rx_frames,
        written,
        "written after the reset"
    );

    // A new session (a new driver side of model 2 over the same guest memory).
    let driver = transport_descriptors::direct::driver(&domain);
    let nic = session(&t, driver, &domain, NetOptions::multiqueue(4)).unwrap();
    assert_eq!(nic.mac(), Some(original), "the configured address again");
    let b = Guest {
        nic,
        t,
        port,
        mac: original,
        switch: sw.clone(),
        domain,
    };
    assert_eq!((b.nic.queue_pairs(), b.active_pairs()), (4, 4));
    let again = spread(&a, &b, 64, 2, false);
    assert!(again.values().collect::<BTreeSet<_>>().len() > 1);
    assert_eq!(b.nic.broken(), None);
}

/// A device whose control queue the test serves by hand.
struct Manual {
    queues: Vec<virtio_core::transport::ActiveQueue>,
}

impl virtio_core::transport::DeviceHandler for Manual {
    fn activate(
        &mut self,
        _features: u64,
        queues: Vec<virtio_core::transport::ActiveQueue>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.queues = queues;
        Ok(())
    }

    fn reset(&mut self) {
        self.queues.clear();
    }
}

/// The driver does not trust the control queue's answers (HOSTILE rule 31): no
/// answer in time is [`NetError::ControlTimeout`] and the late answer is taken
/// back with the next command; an ack other than OK, or none (used length 0), is
/// [`NetError::CommandRefused`].
#[test]
fn driver_types_control_failures() {
    use virtio_core::SplitDevice;
    use virtio_core::config::ConfigSpace;
    use virtio_core::features::Features;
    use virtio_core::lifecycle::DeviceLifecycle;
    use virtio_core::net::{NET_DEPENDENCIES, NetConfig};
    use virtio_core::notify::Notify;
    use zerocopy::IntoBytes;

    let f = models::direct();
    let offered = NetFeatures::MAC | NetFeatures::CTRL_VQ | NetFeatures::CTRL_RX;
    let cfg = NetConfig {
        mac: [2, 0, 0, 0, 0, 1],
        ..NetConfig::default()
    };
    let lc = DeviceLifecycle::new(
        virtio_core::net::DEVICE_ID,
        offered.bits() | Features::EVENT_IDX.bits(),
        NET_DEPENDENCIES,
        ConfigSpace::new(cfg.as_bytes().to_vec()),
        &[16, 16, 16],
    );
    let t = InProcessTransport::new(lc, Manual { queues: Vec::new() }).unwrap();
    let opts = NetOptions {
        control_timeout: Duration::from_millis(100),
        ..NetOptions::multiqueue(1)
    };
    let nic = NetDriver::new(t, f.driver, f.guest.memory().clone(), opts).unwrap();
    let q = nic
        .transport()
        .with_handler(|h| h.queues.drain(..).find(|q| q.index == 2))
        .unwrap();
    let dq = f.device.open_queue(2, q.layout.size, q.addrs()).unwrap();
    let features = Features::from_bits_retain(nic.info().features);
    let mut ring = SplitDevice::new(q.layout.size, &dq.ring, dq.memory, features).unwrap();

    fn next<M: virtio_core::DeviceMemory>(ring: &mut SplitDevice<M>) -> virtio_core::ring::Chain {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(c) = ring.pop().unwrap() {
                return c;
            }
            assert!(Instant::now() < deadline, "no command");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    fn answer<M: virtio_core::DeviceMemory>(
        ring: &mut SplitDevice<M>,
        c: &virtio_core::ring::Chain,
        ack: Option<u8>,
    ) {
        let len = match ack {
            Some(a) => {
                c.writer(ring.memory()).write_all(&[a]).unwrap();
                1
            }
            None => 0,
        };
        ring.add_used(c.head(), len).unwrap();
    }
    let device = std::thread::spawn(move || {
        // The first command gets no answer before the driver gives up on it; it
        // comes back (late, OK) together with the second, refused one.
        let late = next(&mut ring);
        let refused = next(&mut ring);
        answer(&mut ring, &late, Some(VIRTIO_NET_OK));
        answer(&mut ring, &refused, Some(5));
        let _ = q.interrupt.notify();
        let mute = next(&mut ring);
        answer(&mut ring, &mute, None);
        let _ = q.interrupt.notify();
    });
    let start = Instant::now();
    assert!(matches!(nic.set_promisc(false), Err(NetError::ControlTimeout)));
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert!(matches!(
        nic.set_allmulti(true),
        Err(NetError::CommandRefused {
            class: VIRTIO_NET_CTRL_RX,
            command: VIRTIO_NET_CTRL_RX_ALLMULTI,
            ack: Some(5)
        })
    ));
    assert!(matches!(
        nic.set_promisc(true),
        Err(NetError::CommandRefused { ack: None, .. })
    ));
    device.join().unwrap();
    assert_eq!(nic.broken(), None);
}

/// The `mac` field of a device's configuration space, read as a driver does.
fn config_mac(t: &impl virtio_core::lifecycle::ControlPlane) -> [u8; 6] {
    let mut mac = [0u8; 6];
    virtio_core::lifecycle::read_config(
        t,
        std::mem::offset_of!(virtio_core::net::NetConfig, mac),
        &mut mac,
    )
    .unwrap();
    mac
}
