//! Guests talking to each other through our virtio-net driver (`drivers-net`), our
//! virtio-net device and the learning switch (`backend-host::net`), over every
//! sharing model and over mixed pairs; plus what a hostile guest transmits and a
//! receive queue that fills up while its peer floods it.

// Test patterns come from small counters by deliberate truncation.
#![allow(clippy::cast_possible_truncation)]

use backend_host::net::{NetDevice, NetSettings, Switch, SwitchConfig};
use drivers_net::{NetError, NetOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vio::conformance::Fixture;
use vio::models;
use vio::net_rig::{self, Dev, NetGuest};
use virtio_core::DriverModel;
use virtio_core::features::Features;
use virtio_core::net::{
    NetFeatures, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_GSO_TCPV4, VirtioNetHdr, csum_add, csum_fold,
    ipv4_pseudo_header_sum,
};
use virtio_core::transport::InProcessTransport;
use zerocopy::IntoBytes;

const TIMEOUT: Duration = Duration::from_secs(10);
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const BROADCAST: [u8; 6] = [0xff; 6];

/// The test's guest: a [`NetGuest`] whose calls fail the test when they fail.
struct Guest<D: DriverModel, V: Dev>(NetGuest<D, V>);

impl<D: DriverModel, V: Dev> std::ops::Deref for Guest<D, V> {
    type Target = NetGuest<D, V>;
    fn deref(&self) -> &NetGuest<D, V> {
        &self.0
    }
}

fn plug<D, V>(f: Fixture<D, V>, switch: &Arc<Switch>, settings: NetSettings, opts: NetOptions) -> Guest<D, V>
where
    D: DriverModel,
    V: Dev,
{
    let g = net_rig::plug(f, switch, settings, opts).unwrap();
    assert_eq!(g.nic.info().mac, Some(g.mac));
    assert!(g.nic.link_up());
    Guest(g)
}

fn plug_default<D, V>(f: Fixture<D, V>, switch: &Arc<Switch>) -> Guest<D, V>
where
    D: DriverModel,
    V: Dev,
{
    plug(f, switch, NetSettings::default(), NetOptions::default())
}

impl<D: DriverModel, V: Dev> Guest<D, V> {
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

/// An Ethernet frame of `len` bytes (at least 14) from `src` to `dst`, numbered `seq`.
fn frame(dst: [u8; 6], src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(&seq.to_be_bytes());
    while f.len() < len {
        f.push((f.len() as u32 ^ seq) as u8);
    }
    f.truncate(len);
    f
}

/// Polls `cond` until it holds (fails after [`TIMEOUT`]); counters move on the
/// device's worker threads.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Frames both ways, broadcast, many small frames and MTU-size frames between two
/// guests on their own switch.
fn exchange<D1, V1, D2, V2>(a: Guest<D1, V1>, b: Guest<D2, V2>)
where
    D1: DriverModel,
    V1: Dev,
    D2: DriverModel,
    V2: Dev,
{
    // A to B (unknown yet: flooded), B to A (learnt: unicast).
    let ab = frame(b.mac, a.mac, 1, 60);
    a.send(&ab);
    assert_eq!(b.recv(1), vec![ab]);
    let ba = frame(a.mac, b.mac, 2, 100);
    b.send(&ba);
    assert_eq!(a.recv(1), vec![ba]);
    assert_eq!(a.switch.lookup(a.mac), Some(a.port));
    assert_eq!(a.switch.lookup(b.mac), Some(b.port));

    let bc = frame(BROADCAST, a.mac, 3, 64);
    a.send(&bc);
    assert_eq!(b.recv(1), vec![bc]);

    // Many small frames, in batches the receive queue holds whole: none may drop.
    for batch in 0..10u32 {
        let sent: Vec<Vec<u8>> = (0..100)
            .map(|i| frame(b.mac, a.mac, batch * 100 + i, 60))
            .collect();
        for f in &sent {
            a.send(f);
        }
        assert!(b.recv(100) == sent, "batch {batch} arrives complete and in order");
    }
    // MTU-size frames both ways.
    let max = a.nic.info().max_frame();
    assert_eq!(max, 1514);
    for round in 0..4u32 {
        let to_b: Vec<Vec<u8>> = (0..20)
            .map(|i| frame(b.mac, a.mac, round * 20 + i, max))
            .collect();
        let to_a: Vec<Vec<u8>> = (0..20)
            .map(|i| frame(a.mac, b.mac, round * 20 + i, max))
            .collect();
        for (x, y) in to_b.iter().zip(&to_a) {
            a.send(x);
            b.send(y);
        }
        assert!(b.recv(20) == to_b);
        assert!(a.recv(20) == to_a);
    }
    for g in [a.stats(), b.stats()] {
        assert_eq!(g.drops.total(), 0, "{g:?}");
    }
    // A device counts its transmitted frames just after forwarding them, so the
    // receiver may hold the last ones a moment before the sender's counter moves.
    eventually("A's transmit counter", || a.stats().tx_frames == 2 + 1000 + 80);
    assert_eq!(b.stats().rx_frames, 2 + 1000 + 80);
    assert_eq!(a.nic.broken(), None);
    assert_eq!(b.nic.broken(), None);
}

fn pair<D1, V1, D2, V2>(fa: Fixture<D1, V1>, fb: Fixture<D2, V2>)
where
    D1: DriverModel,
    V1: Dev,
    D2: DriverModel,
    V2: Dev,
{
    let sw = Switch::new(SwitchConfig::default());
    let a = plug_default(fa, &sw);
    let b = plug_default(fb, &sw);
    assert!(a.nic.info().mrg_rxbuf && a.nic.info().csum && a.nic.info().guest_csum);
    exchange(a, b);
}

#[test]
fn loopback_over_direct() {
    pair(models::direct(), models::direct());
}

#[test]
fn loopback_over_shared_page() {
    pair(models::shared_page(), models::shared_page());
}

#[test]
fn loopback_over_hypervisor_copy() {
    pair(models::hypervisor_copy(), models::hypervisor_copy());
}

#[test]
fn loopback_over_grant() {
    pair(models::grant(), models::grant());
}

#[test]
fn loopback_between_shared_page_and_grant() {
    pair(models::shared_page(), models::grant());
}

/// The packed ring (virtio 1.2 §2.8) on both guests' queues, negotiated by the
/// drivers from the device's offer: the same exchange over every model that serves
/// packed rings, and over a packed guest talking to a split one.
#[test]
fn loopback_over_packed_rings() {
    fn packed_pair<D1: DriverModel, V1: Dev, D2: DriverModel, V2: Dev>(
        fa: Fixture<D1, V1>,
        fb: Fixture<D2, V2>,
        b_packed: bool,
    ) {
        let sw = Switch::new(SwitchConfig::default());
        let packed = NetOptions {
            wanted: NetOptions::default().wanted | Features::RING_PACKED.bits(),
            ..NetOptions::default()
        };
        let a = plug(fa, &sw, NetSettings::default(), packed.clone());
        let b = plug(
            fb,
            &sw,
            NetSettings::default(),
            if b_packed { packed } else { NetOptions::default() },
        );
        let negotiated = |f: u64| Features::from_bits_retain(f).contains(Features::RING_PACKED);
        assert!(negotiated(a.nic.info().features), "A negotiated the packed ring");
        assert_eq!(negotiated(b.nic.info().features), b_packed);
        exchange(a, b);
    }
    packed_pair(models::direct(), models::direct(), true);
    packed_pair(models::shared_page(), models::grant(), true);
    packed_pair(models::grant(), models::direct(), false);
}

/// IN_ORDER (virtio 1.2 §2.7.9, §2.8) on both guests' queues, split and packed,
/// and towards a guest without it: the same exchange, and each driver negotiated
/// what it asked for.
#[test]
fn loopback_over_in_order_rings() {
    fn in_order_pair<D1: DriverModel, V1: Dev, D2: DriverModel, V2: Dev>(
        fa: Fixture<D1, V1>,
        fb: Fixture<D2, V2>,
        a_ring: Features,
        b_ring: Features,
    ) {
        let sw = Switch::new(SwitchConfig::default());
        let opts = |ring: Features| NetOptions {
            wanted: NetOptions::default().wanted | ring.bits(),
            ..NetOptions::default()
        };
        let a = plug(fa, &sw, NetSettings::default(), opts(a_ring));
        let b = plug(fb, &sw, NetSettings::default(), opts(b_ring));
        let ring = |f: u64| Features::from_bits_retain(f) & (Features::RING_PACKED | Features::IN_ORDER);
        assert_eq!(ring(a.nic.info().features), a_ring);
        assert_eq!(ring(b.nic.info().features), b_ring);
        exchange(a, b);
    }
    let io = Features::IN_ORDER;
    let packed_io = Features::RING_PACKED | Features::IN_ORDER;
    in_order_pair(models::direct(), models::direct(), io, io);
    in_order_pair(models::shared_page(), models::grant(), packed_io, packed_io);
    in_order_pair(models::grant(), models::direct(), io, Features::empty());
}

#[test]
fn loopback_between_hypervisor_copy_and_direct() {
    pair(models::hypervisor_copy(), models::direct());
}

/// A model-1 guest whose bounce area holds fewer frames than its transmit queue:
/// a blocking send waits for the room to come back, as for a full queue, instead
/// of failing.
#[test]
fn a_full_bounce_area_is_waited_out_like_a_full_queue() {
    // A backlog larger than the burst: the test is about the sender waiting, and
    // on a loaded machine B's worker may not run before A has forwarded them all.
    let sw = Switch::new(SwitchConfig {
        backlog: 512,
        ..SwitchConfig::default()
    });
    let small = transport_shared_page::SharedPageConfig {
        bounce_bytes_per_queue: 128 << 10,
        ..transport_shared_page::SharedPageConfig::default()
    };
    // 256 receive buffers of 256 bytes fill half of A's receive bounce area.
    let opts = NetOptions {
        rx_buf_len: Some(256),
        ..NetOptions::default()
    };
    let a = plug(models::shared_page_with(small), &sw, NetSettings::default(), opts);
    let b = plug_default(models::direct(), &sw);
    b.send(&frame(BROADCAST, b.mac, 0, 60));
    a.recv(1);
    // 300 MTU frames: about 64 fit in A's transmit bounce area at once, against 256
    // transmit slots; B's backlog holds them all whenever its worker runs.
    let sent: Vec<Vec<u8>> = (0..300).map(|i| frame(b.mac, a.mac, i, 1514)).collect();
    for f in &sent {
        a.send(f);
    }
    assert!(b.recv(300) == sent);
    assert_eq!(b.stats().drops.total(), 0);
}

/// The same exchange with both devices polling adaptively (kicks off while they
/// poll, re-armed before they sleep), with and without EVENT_IDX (without it,
/// "kicks off" is a flag the device must clear again): nothing is lost or stranded,
/// whichever way a frame is noticed.
#[test]
fn loopback_with_polling_devices() {
    for event_idx in [true, false] {
        let sw = Switch::new(SwitchConfig::default());
        let polling = NetSettings {
            poll: Duration::from_micros(200),
            ..NetSettings::default()
        };
        let mut opts = NetOptions::default();
        if !event_idx {
            opts.wanted &= !virtio_core::features::Features::EVENT_IDX.bits();
        }
        let a = plug(models::direct(), &sw, polling.clone(), opts.clone());
        let b = plug(models::grant(), &sw, polling, opts);
        exchange(a, b);
    }
}

/// MTU-size frames spread over 256-byte mergeable buffers (6 per frame), and a
/// driver without MRG_RXBUF, over the models that copy (bounce, grant).
#[test]
fn mergeable_small_buffers_and_no_mergeable() {
    let sw = Switch::new(SwitchConfig::default());
    let small = NetOptions {
        rx_buf_len: Some(256),
        ..NetOptions::default()
    };
    let plain = NetOptions {
        wanted: NetOptions::SUPPORTED & !NetFeatures::MRG_RXBUF.bits(),
        ..NetOptions::default()
    };
    let a = plug(models::shared_page(), &sw, NetSettings::default(), small);
    let b = plug(models::grant(), &sw, NetSettings::default(), plain);
    assert!(a.nic.info().mrg_rxbuf && !b.nic.info().mrg_rxbuf);
    assert_eq!(b.nic.info().rx_buf_len, 1526);
    exchange(a, b);
}

/// The switch learns: once B is known, frames to B no longer reach C.
#[test]
fn learning_stops_flooding() {
    let sw = Switch::new(SwitchConfig::default());
    let a = plug_default(models::direct(), &sw);
    let b = plug_default(models::grant(), &sw);
    let c = plug_default(models::shared_page(), &sw);
    let first = frame(b.mac, a.mac, 1, 80);
    a.send(&first);
    assert_eq!(b.recv(1), vec![first.clone()]);
    assert_eq!(c.recv(1), vec![first], "unknown destination is flooded");
    assert_eq!(sw.flooded_frames(), 1);
    let reply = frame(a.mac, b.mac, 2, 80);
    b.send(&reply);
    assert_eq!(a.recv(1), vec![reply]);
    let second = frame(b.mac, a.mac, 3, 80);
    a.send(&second);
    assert_eq!(b.recv(1), vec![second]);
    assert_eq!((sw.unicast_frames(), sw.flooded_frames()), (2, 1));
    c.recv_nothing(Duration::from_millis(100));
    assert_eq!(c.stats().rx_frames, 1);
}

/// A UDP/IPv4 frame whose UDP checksum field holds the pseudo-header sum.
fn udp_frame(dst: [u8; 6], src: [u8; 6]) -> (Vec<u8>, u16) {
    let payload = b"checksum me, please";
    let udp_len = (8 + payload.len()) as u16;
    let (sip, dip) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = 20 + udp_len;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&sip);
    ip.extend_from_slice(&dip);
    let ipsum = !csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&ipsum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0x30, 0x39, 0x00, 0x35]);
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&ipv4_pseudo_header_sum(sip, dip, 17, udp_len).to_be_bytes());
    f.extend_from_slice(payload);
    (f, udp_len)
}

/// The sum over pseudo-header and UDP datagram of a correct packet is all ones.
fn udp_checksum_ok(f: &[u8]) -> bool {
    let udp = &f[34..];
    let mut s = csum_add(0, &f[26..34]);
    s = csum_add(s, &[0, 17]);
    s = csum_add(s, &(udp.len() as u16).to_be_bytes());
    s = csum_add(s, udp);
    csum_fold(s) == 0xffff && udp[6..8] != [0, 0]
}

/// CSUM / GUEST_CSUM: a partial checksum is completed by the receiving driver when
/// it accepted GUEST_CSUM, by the device otherwise; either way the frame arrives
/// with a correct checksum.
#[test]
fn partial_checksums_are_completed() {
    let sw = Switch::new(SwitchConfig::default());
    let no_guest_csum = NetOptions {
        wanted: NetOptions::SUPPORTED & !NetFeatures::GUEST_CSUM.bits(),
        ..NetOptions::default()
    };
    let a = plug_default(models::direct(), &sw);
    let b = plug_default(models::hypervisor_copy(), &sw);
    let c = plug(models::grant(), &sw, NetSettings::default(), no_guest_csum);
    assert!(!c.nic.info().guest_csum);
    let (f, _) = udp_frame(BROADCAST, a.mac);
    assert!(!udp_checksum_ok(&f));
    a.nic.send_partial_csum(&f, 34, 6).unwrap();
    for g in [b.recv(1), c.recv(1)] {
        assert!(udp_checksum_ok(&g[0]), "{:x?}", &g[0][34..42]);
        assert_eq!(g[0][..34], f[..34]);
        assert_eq!(g[0][42..], f[42..]);
    }
    assert!(matches!(
        a.nic.send_partial_csum(&f, 60, 6),
        Err(NetError::BadChecksumRequest)
    ));
}

/// HOSTILE rule 28: what a guest transmits is checked; bad frames are dropped and
/// counted by reason, nothing reaches the peer, and the guest keeps working.
#[test]
fn hostile_transmits_are_dropped_and_counted() {
    let sw = Switch::new(SwitchConfig::default());
    // A believes the MTU is 1500 (it does not negotiate MTU); its device enforces 1000.
    let settings = NetSettings {
        mtu: 1000,
        ..NetSettings::default()
    };
    let opts = NetOptions {
        wanted: NetOptions::SUPPORTED & !NetFeatures::MTU.bits(),
        ..NetOptions::default()
    };
    let a = plug(models::grant(), &sw, settings, opts);
    let b = plug_default(models::direct(), &sw);
    let good = frame(b.mac, a.mac, 7, 200);
    let hdr = VirtioNetHdr::default();
    let with = |h: VirtioNetHdr, body: &[u8]| [h.as_bytes(), body].concat();

    a.nic.send_raw(hdr.as_bytes()).unwrap(); // header only
    a.nic.send_raw(&[0u8; 5]).unwrap(); // shorter than the header
    a.nic.send_raw(&with(hdr, &good[..10])).unwrap(); // no room for an Ethernet header
    let gso = VirtioNetHdr {
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
        gso_size: 100.into(),
        hdr_len: 54.into(),
        ..hdr
    };
    a.nic.send_raw(&with(gso, &good)).unwrap();
    let valid = VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_DATA_VALID,
        ..hdr
    };
    a.nic.send_raw(&with(valid, &good)).unwrap();
    a.nic
        .send_raw(&with(VirtioNetHdr::partial_csum(190, 9), &good))
        .unwrap();
    a.nic
        .send_raw(&with(VirtioNetHdr::partial_csum(u16::MAX, u16::MAX), &good))
        .unwrap();
    a.nic.send(&frame(b.mac, a.mac, 8, 1200)).unwrap(); // over the device's MTU
    eventually("drops counted", || a.stats().drops.total() == 8);
    let d = a.stats().drops;
    assert_eq!((d.short, d.bad_header, d.over_mtu), (3, 4, 1), "{d:?}");
    assert_eq!(a.stats().tx_frames, 0);

    // The guest still works, and B saw only the good frame.
    a.send(&good);
    assert_eq!(b.recv(1), vec![good]);
    b.recv_nothing(Duration::from_millis(50));
    assert_eq!(b.stats().rx_frames, 1);
    assert_eq!(a.nic.broken(), None);
    eventually("transmit slots reclaimed", || {
        a.nic.reclaim_tx().unwrap();
        a.nic.tx_completed() == 9
    });
}

/// HOSTILE rule 29: receive buffers too small for a frame (no MRG_RXBUF): the frame
/// is dropped and counted, the buffer comes back unused, smaller frames still pass.
#[test]
fn receive_buffers_too_small() {
    let sw = Switch::new(SwitchConfig::default());
    let tiny = NetOptions {
        wanted: NetOptions::SUPPORTED & !NetFeatures::MRG_RXBUF.bits(),
        rx_buf_len: Some(200),
        ..NetOptions::default()
    };
    let a = plug_default(models::direct(), &sw);
    let b = plug(models::shared_page(), &sw, NetSettings::default(), tiny);
    let big = frame(b.mac, a.mac, 1, 500);
    let fits = frame(b.mac, a.mac, 2, 188);
    a.send(&big);
    a.send(&fits);
    assert_eq!(b.recv(1), vec![fits]);
    assert_eq!(b.stats().drops.no_rx_buffer, 1);
    assert_eq!(b.nic.rx_stats().unused_buffers, 1);
    assert_eq!(b.nic.broken(), None);
}

/// HOSTILE rule 29: the receiver stops polling while its peer floods. Its queue
/// fills, the switch keeps a bounded backlog and counts the rest as dropped; once
/// the receiver polls again it gets the queued frames in order and traffic resumes.
#[test]
fn receive_queue_full_while_peer_floods() {
    const QUEUE: usize = 16;
    const BACKLOG: usize = 16;
    const SENT: usize = 200;
    let sw = Switch::new(SwitchConfig {
        backlog: BACKLOG,
        budget: 8,
        ..SwitchConfig::default()
    });
    let small = NetOptions {
        queue_size: QUEUE as u16,
        ..NetOptions::default()
    };
    let a = plug_default(models::hypervisor_copy(), &sw);
    let b = plug(models::grant(), &sw, NetSettings::default(), small);
    let sent: Vec<Vec<u8>> = (0..SENT as u32).map(|i| frame(b.mac, a.mac, i, 60)).collect();
    for f in &sent {
        a.send(f);
    }
    // Once A's device forwarded everything, B's counters are final: its queue
    // holds QUEUE frames, its inbox up to BACKLOG (less if A outran B's worker),
    // its worker up to another BACKLOG it took from the inbox at once, the rest
    // was dropped.
    eventually("the flood to be forwarded", || {
        a.stats().tx_frames == SENT as u64 && b.stats().rx_frames == QUEUE as u64
    });
    let dropped = b.stats().drops.backlog_full;
    assert!(
        (SENT - QUEUE - 2 * BACKLOG..=SENT - QUEUE).contains(&(dropped as usize)),
        "{dropped}"
    );
    assert_eq!(b.stats().drops.total(), dropped);

    // The receiver comes back: queue contents, then the backlog, in order.
    let got = b.recv(SENT - dropped as usize);
    assert!(got[..QUEUE] == sent[..QUEUE], "the first frames arrive, in order");
    let seqs: Vec<u32> = got
        .iter()
        .map(|f| u32::from_be_bytes(f[14..18].try_into().unwrap()))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    b.recv_nothing(Duration::from_millis(50));
    assert_eq!(b.stats().drops.backlog_full, dropped);
    let after = frame(b.mac, a.mac, 999, 60);
    a.send(&after);
    assert_eq!(b.recv(1), vec![after]);
    assert_eq!(b.nic.broken(), None);
}

/// A flooding guest does not starve another sender: its own backlog overflows,
/// the other sender's frames keep their room and their turn.
#[test]
fn a_flooding_guest_does_not_starve_others() {
    let sw = Switch::new(SwitchConfig {
        backlog: 16,
        budget: 8,
        ..SwitchConfig::default()
    });
    let small = NetOptions {
        queue_size: 16,
        ..NetOptions::default()
    };
    let a = plug_default(models::direct(), &sw);
    let c = plug_default(models::shared_page(), &sw);
    let b = plug(models::direct(), &sw, NetSettings::default(), small);
    // B becomes known so nothing is flooded to the other sender.
    b.send(&frame(BROADCAST, b.mac, 0, 60));
    a.recv(1);
    c.recv(1);
    for i in 0..300 {
        a.send(&frame(b.mac, a.mac, i, 60));
    }
    let from_c: Vec<Vec<u8>> = (0..10).map(|i| frame(b.mac, c.mac, i, 60)).collect();
    for f in &from_c {
        c.send(f);
    }
    eventually("the flood to be forwarded", || {
        a.stats().tx_frames == 300 && c.stats().tx_frames == 10 && b.stats().rx_frames == 16
    });
    // What is not dropped is in B's 16 receive buffers, its inbox's backlog of 16
    // per source, or the worker's hands: it takes the whole inbox at once, so at
    // most another backlog's worth per source.
    let dropped = b.stats().drops.backlog_full;
    assert!((300 - 16 - 16 - 16..=300 - 16).contains(&dropped), "{dropped}");
    let got = b.recv(310 - dropped as usize);
    let got_c: Vec<Vec<u8>> = got.into_iter().filter(|f| f[6..12] == c.mac).collect();
    assert!(
        got_c == from_c,
        "every frame of the quiet sender arrives, in order"
    );
    assert_eq!(b.stats().drops.total(), dropped, "only the flooder lost frames");
}

/// HOSTILE rule 29, from a receiver that posts what no correct driver would: 1-byte
/// buffers and device-readable buffers in its receive queue. Frames for it are
/// dropped and counted, every buffer comes back with length 0 (never more than its
/// writable bytes), and the sender is unaffected.
#[test]
fn hostile_receive_buffers() {
    use virtio_core::GuestBuf;
    use virtio_core::features::Features;
    use virtio_core::lifecycle::{driver_ok, initialize};
    use virtio_core::net::NET_DEPENDENCIES;
    use virtio_core::ring::split::SplitDriver;
    use virtio_core::transport::Transport;

    for mrg in [true, false] {
        let sw = Switch::new(SwitchConfig::default());
        let a = plug_default(models::direct(), &sw);
        let Fixture {
            guest,
            driver,
            device,
        } = models::grant();
        let settings = NetSettings {
            queue_size: 8,
            ..NetSettings::default()
        };
        let dev = NetDevice::new(device, &sw, settings).unwrap();
        let port = dev.port();
        let t = InProcessTransport::new(dev.lifecycle(), dev).unwrap();
        let wanted = if mrg { NetFeatures::MRG_RXBUF.bits() } else { 0 };
        let features = initialize(
            &t,
            virtio_core::net::DEVICE_ID,
            wanted | Features::EVENT_IDX.bits(),
            NET_DEPENDENCIES,
        )
        .unwrap();
        assert_eq!(features & NetFeatures::MRG_RXBUF.bits() != 0, mrg);
        let rxq = driver.create_queue(0, 8).unwrap();
        let txq = driver.create_queue(1, 8).unwrap();
        t.setup_queue(0, 8, rxq.addrs).unwrap();
        t.setup_queue(1, 8, txq.addrs).unwrap();
        let f = Features::from_bits_retain(features);
        let mut rx = SplitDriver::new(8, rxq.ring, rxq.share, f).unwrap();
        let mem = guest.memory();
        for i in 0..8u32 {
            let addr = mem.alloc(64, 8).unwrap();
            let r = if i % 2 == 0 {
                rx.add(&[], &[GuestBuf::new(addr, 1)], i)
            } else {
                rx.add(&[GuestBuf::new(addr, 64)], &[], i)
            };
            r.unwrap();
        }
        driver_ok(&t).unwrap();
        rx.kick_prepare();
        t.notify_queue(0).unwrap();

        // With MRG_RXBUF the device gathers all 8 buffers (8 writable bytes) for one
        // frame and gives up; without, each frame takes one buffer.
        let frames = if mrg { 1 } else { 8 };
        for i in 0..frames {
            a.send(&frame(BROADCAST, a.mac, i, 60));
        }
        eventually("drops counted", || {
            sw.stats(port).unwrap().drops.no_rx_buffer == u64::from(frames)
        });
        let mut returned = 0;
        eventually("buffers returned", || {
            while let Some(u) = rx.pop_used().unwrap() {
                assert_eq!(u.len, 0, "buffer {} came back with data", u.token);
                returned += 1;
            }
            returned == 8
        });
        assert_eq!(sw.stats(port).unwrap().rx_frames, 0);
        // The sender goes on.
        let b = plug_default(models::direct(), &sw);
        let f = frame(b.mac, a.mac, 99, 60);
        a.send(&f);
        assert_eq!(b.recv(1), vec![f]);
        drop(t);
    }
}

/// HOSTILE 33 through the device: a guest created with a MAC address is bound to
/// it. Frames it sends from another source (a victim's bound address, or a
/// made-up one) are dropped and counted, MAC_ADDR_SET to the victim's address is
/// refused, and the victim's traffic keeps reaching the victim only. With
/// `allow_any_source_mac` a guest's sources are learnt as before.
#[test]
fn a_guest_cannot_claim_a_bound_address() {
    const VICTIM: [u8; 6] = [2, 0, 0, 0, 0x33, 1];
    const ATTACKER: [u8; 6] = [2, 0, 0, 0, 0x33, 2];
    let sw = Switch::new(SwitchConfig::default());
    let with_mac = |mac| NetSettings {
        mac: Some(mac),
        ..NetSettings::default()
    };
    let victim = plug(models::direct(), &sw, with_mac(VICTIM), NetOptions::default());
    let attacker = plug(
        models::grant(),
        &sw,
        with_mac(ATTACKER),
        NetOptions::multiqueue(1),
    );
    let peer = plug_default(models::shared_page(), &sw);
    attacker.send(&frame(BROADCAST, VICTIM, 0, 60));
    attacker.send(&frame(BROADCAST, [2, 0, 0, 0, 0x33, 3], 1, 60));
    eventually("the spoofed frames dropped", || {
        attacker.stats().drops.spoofed_source == 2
    });
    assert_eq!(attacker.stats().tx_frames, 0);
    assert_eq!(attacker.stats().drops.total(), 2);
    assert_eq!(sw.lookup(VICTIM), Some(victim.port));
    assert_eq!(sw.lookup([2, 0, 0, 0, 0x33, 3]), None);
    assert!(
        matches!(attacker.nic.set_mac(VICTIM), Err(NetError::CommandRefused { .. })),
        "a bound guest cannot change its address"
    );
    // The victim's traffic reaches the victim, and nobody else.
    let to_victim = frame(VICTIM, peer.mac, 2, 60);
    peer.send(&to_victim);
    assert_eq!(victim.recv(1), vec![to_victim]);
    assert_eq!(sw.flooded_frames(), 0, "nothing was flooded");
    attacker.recv_nothing(Duration::from_millis(20));
    // From its own address the attacker is an ordinary guest.
    let own = frame(peer.mac, ATTACKER, 3, 60);
    attacker.send(&own);
    assert_eq!(peer.recv(1), vec![own]);
    // Counted once the batch is forwarded, so possibly after the peer has the frame.
    eventually("the attacker's own frame counted", || {
        attacker.stats().tx_frames == 1
    });
    // Opting out: a guest with a MAC that may use any source is learnt anywhere.
    let free = plug(
        models::direct(),
        &sw,
        NetSettings {
            allow_any_source_mac: true,
            ..with_mac([2, 0, 0, 0, 0x33, 4])
        },
        NetOptions::default(),
    );
    let elsewhere = [2, 0, 0, 0, 0x33, 5];
    free.send(&frame(peer.mac, elsewhere, 4, 60));
    peer.recv(1);
    assert_eq!(sw.lookup(elsewhere), Some(free.port));
    assert_eq!(free.stats().drops.total(), 0);
}

/// A guest that goes away takes its port and its learnt addresses with it; the
/// others keep talking.
#[test]
fn a_guest_leaving_unplugs_its_port() {
    let sw = Switch::new(SwitchConfig::default());
    let a = plug_default(models::direct(), &sw);
    let b = plug_default(models::shared_page(), &sw);
    let c = plug_default(models::grant(), &sw);
    b.send(&frame(BROADCAST, b.mac, 0, 60));
    a.recv(1);
    c.recv(1);
    assert_eq!(sw.lookup(b.mac), Some(b.port));
    let (port, mac) = (b.port, b.mac);
    drop(b);
    assert_eq!(sw.stats(port), None);
    assert_eq!(sw.lookup(mac), None);
    let f = frame(mac, a.mac, 1, 60);
    a.send(&f);
    assert_eq!(c.recv(1), vec![f], "unknown again: flooded to the remaining port");
    let back = frame(a.mac, c.mac, 2, 60);
    c.send(&back);
    assert_eq!(a.recv(1), vec![back]);
}

/// Both guests send and receive at once, each direction on its own thread (the
/// driver's transmit and receive sides lock separately): every frame either arrives,
/// in order, or is counted as dropped by the switch; nothing is lost silently.
#[test]
fn concurrent_traffic_both_ways() {
    const N: u32 = 5000;
    let sw = Switch::new(SwitchConfig::default());
    let a = plug_default(models::direct(), &sw);
    let b = plug_default(models::grant(), &sw);
    // Both MACs learnt, so nothing is flooded.
    a.send(&frame(BROADCAST, a.mac, 0, 60));
    b.recv(1);
    b.send(&frame(BROADCAST, b.mac, 0, 60));
    a.recv(1);
    /// Receives until every frame of the peer arrived or was counted dropped;
    /// returns the sequence numbers and the drops.
    fn recv_all<D: DriverModel, V: Dev>(g: &Guest<D, V>) -> (Vec<u32>, u64) {
        let mut seqs = Vec::new();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            g.nic
                .poll_recv(64, |f| {
                    seqs.push(u32::from_be_bytes(f[14..18].try_into().unwrap()))
                })
                .unwrap();
            let dropped = g.stats().drops.backlog_full;
            if seqs.len() as u64 + dropped == u64::from(N) {
                return (seqs, dropped);
            }
            assert!(
                Instant::now() < deadline,
                "{} received, {dropped} dropped",
                seqs.len()
            );
            g.nic.wait_rx(Some(Duration::from_millis(5))).unwrap();
        }
    }
    fn send_all<D: DriverModel, V: Dev>(g: &Guest<D, V>, to: [u8; 6]) {
        for i in 0..N {
            g.send(&frame(to, g.mac, i, 60 + (i as usize % 1400)));
        }
    }
    std::thread::scope(|s| {
        s.spawn(|| send_all(&a, b.mac));
        s.spawn(|| send_all(&b, a.mac));
        let ra = s.spawn(|| recv_all(&a));
        let (seqs, dropped) = recv_all(&b);
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "A to B in order");
        assert_eq!(b.stats().rx_frames, u64::from(N) - dropped + 1);
        let (seqs, dropped) = ra.join().unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "B to A in order");
        assert_eq!(a.stats().rx_frames, u64::from(N) - dropped + 1);
    });
    assert_eq!(a.nic.broken(), None);
    assert_eq!(b.nic.broken(), None);
}
