//! A [`smoltcp`] network device over [`NetDriver`], so a real TCP/IP stack runs on
//! our driver over any sharing model (feature `smoltcp`).
//!
//! smoltcp drives a [`Device`] through tokens: a receive token hands it one frame,
//! a transmit token lends it a buffer to build one frame in. [`NetPhy`] owns the
//! driver, one receive buffer and one transmit buffer, each the largest frame long
//! and allocated once, so the data path allocates nothing:
//!
//! - **Receive**: [`Device::receive`] takes one frame with
//!   [`NetDriver::poll_recv`]`(1, ..)` into the receive buffer. The driver has
//!   already copied the frame out of guest memory once (no double fetch); the second
//!   copy of at most one frame keeps the driver's receive lock out of smoltcp's
//!   processing, and the driver has no way to peek at a frame without taking it.
//! - **Transmit**: the transmit token's buffer goes to [`NetDriver::send`], which
//!   reclaims completed slots and copies the frame into a free one. When every slot
//!   is in flight the frame stays in the buffer, *pending*: until it is sent,
//!   [`Device::transmit`] and [`Device::receive`] (whose pair includes a transmit
//!   token) return `None`, which smoltcp takes as "exhausted, retry at the next
//!   poll". A full queue thus delays frames but never loses one.
//! - **Checksums**: smoltcp computes and verifies every checksum
//!   ([`ChecksumCapabilities::default`]). On receive the driver completes a
//!   partial checksum (GUEST_CSUM) but nobody verifies one: the device offers no
//!   DATA_VALID (virtio 1.2 §5.1.6.4.1), so smoltcp must. On transmit the device
//!   could finish TCP checksums (CSUM, [`NetDriver::send_partial_csum`]), but a
//!   peer on the same switch then completes them in its driver, in software: the
//!   work would only move, at the price of parsing every outgoing frame here.
//! - **Errors**: nothing panics. A failing driver call (a device that broke a
//!   queue, HOSTILE rule 31) is logged with `tracing`, the frame is dropped, the
//!   token call returns `None`, and the error is kept for [`NetPhy::last_error`].
//!   [`NetPhy::wait`] returns errors, so a poll loop stops on a dead device.
//!
//! [`NetPhy::wait`] sleeps until there is work: until a frame may have arrived
//! (the receive interrupt, [`NetDriver::wait_rx`]) or smoltcp's next timer is due
//! ([`Interface::poll_delay`]).

use crate::driver::NetDriver;
use crate::error::NetError;
use smoltcp::iface::{Interface, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::wire::{EthernetAddress, HardwareAddress};
use std::time::Duration;
use virtio_core::DriverModel;
use virtio_core::transport::Transport;

/// Longest [`NetPhy::wait`] sleeps while a frame waits for a transmit slot:
/// transmit completions raise no interrupt the driver listens to (it reclaims on
/// send), so the wait is a short poll until the device has taken some slots.
const PENDING_TX_SLICE: Duration = Duration::from_micros(100);

/// A [`smoltcp::phy::Device`] (Ethernet medium) over a [`NetDriver`].
///
/// ```no_run
/// use drivers_net::{NetDriver, NetPhy};
/// use smoltcp::iface::{Config, Interface, SocketSet};
/// use smoltcp::time::Instant;
/// use smoltcp::wire::{IpAddress, IpCidr};
/// use virtio_core::{DriverModel, transport::Transport};
///
/// fn run<D: DriverModel, T: Transport>(nic: NetDriver<D, T>) {
///     let mut phy = NetPhy::new(nic);
///     let mac = phy.hardware_addr().expect("the device has a MAC");
///     let mut iface = Interface::new(Config::new(mac), &mut phy, Instant::now());
///     iface.update_ip_addrs(|a| a.push(IpCidr::new(IpAddress::v4(10, 0, 0, 1), 24)).unwrap());
///     let mut sockets = SocketSet::new(Vec::new());
///     // ... add sockets ...
///     loop {
///         iface.poll(Instant::now(), &mut phy, &mut sockets);
///         // ... use the sockets ...
///         if phy.wait(&mut iface, &sockets, None).is_err() {
///             break; // the device broke
///         }
///     }
/// }
/// ```
pub struct NetPhy<D: DriverModel, T: Transport> {
    nic: NetDriver<D, T>,
    /// The frame being handed to smoltcp; capacity fixed at construction.
    rx: Vec<u8>,
    tx: TxState,
    errors: Errors,
}

/// The transmit buffer and what waits in it.
#[derive(Debug)]
struct TxState {
    /// Largest frame long; grows only if smoltcp asks for more (then `send`
    /// refuses the frame anyway).
    buf: Vec<u8>,
    /// Length of a built frame not yet accepted by the driver (queue full).
    pending: Option<usize>,
}

/// Driver errors seen by token calls.
#[derive(Debug, Default)]
struct Errors {
    last: Option<NetError>,
    count: u64,
}

impl Errors {
    /// Keeps `error` and logs it: a warning when it differs in kind from the last
    /// one (a broken device fails every call; one warning says it), else a debug
    /// line.
    fn record(&mut self, error: NetError, what: &'static str) {
        let same = self
            .last
            .as_ref()
            .is_some_and(|l| std::mem::discriminant(l) == std::mem::discriminant(&error));
        if same {
            tracing::debug!(%error, what, "virtio-net smoltcp device: frame dropped");
        } else {
            tracing::warn!(%error, what, "virtio-net smoltcp device: frame dropped");
        }
        self.count += 1;
        self.last = Some(error);
    }
}

impl<D: DriverModel, T: Transport> std::fmt::Debug for NetPhy<D, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetPhy")
            .field("nic", &self.nic)
            .field("tx_pending", &self.tx.pending)
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

impl<D: DriverModel, T: Transport> NetPhy<D, T> {
    /// A smoltcp device over `nic`, with its frame buffers allocated now.
    pub fn new(nic: NetDriver<D, T>) -> Self {
        let max = nic.info().max_frame();
        NetPhy {
            nic,
            rx: Vec::with_capacity(max),
            tx: TxState {
                buf: vec![0; max],
                pending: None,
            },
            errors: Errors::default(),
        }
    }

    /// The driver (for its counters, link state and [`NetDriver::broken`]).
    pub fn driver(&self) -> &NetDriver<D, T> {
        &self.nic
    }

    /// Gives the driver back; a frame still pending is dropped.
    pub fn into_driver(self) -> NetDriver<D, T> {
        self.nic
    }

    /// The device's MAC address as smoltcp names it, if the device has one (MAC
    /// negotiated); for [`smoltcp::iface::Config::new`].
    pub fn hardware_addr(&self) -> Option<HardwareAddress> {
        self.nic
            .info()
            .mac
            .map(|m| HardwareAddress::Ethernet(EthernetAddress(m)))
    }

    /// The last driver error a token call ran into, if any.
    pub fn last_error(&self) -> Option<&NetError> {
        self.errors.last.as_ref()
    }

    /// Driver errors token calls ran into so far (each dropped a frame or
    /// returned `None`).
    pub fn error_count(&self) -> u64 {
        self.errors.count
    }

    /// Whether a built frame waits for a transmit slot.
    pub fn tx_pending(&self) -> bool {
        self.tx.pending.is_some()
    }

    /// Sleeps until a frame may have arrived, smoltcp's next timer of `iface` and
    /// `sockets` is due, or `limit` passes (`None`: no limit), whichever is first;
    /// returns at once if smoltcp has work now. While a frame waits for a transmit
    /// slot it sleeps at most 100 µs. Returns `true` if woken by the device (or
    /// frames were already there); poll the interface in either case.
    ///
    /// # Errors
    /// As [`NetDriver::wait_rx`]: [`NetError::DeviceBroken`] once the device broke
    /// the receive queue, or a failing interrupt source.
    pub fn wait(
        &mut self,
        iface: &mut Interface,
        sockets: &SocketSet<'_>,
        limit: Option<Duration>,
    ) -> Result<bool, NetError> {
        let delay = iface
            .poll_delay(smoltcp::time::Instant::now(), sockets)
            .map(Duration::from);
        let pending = self.tx.pending.map(|_| PENDING_TX_SLICE);
        let timeout = [delay, limit, pending].into_iter().flatten().min();
        self.nic.wait_rx(timeout)
    }

    /// Hands a pending frame to the driver; returns whether the transmit path is
    /// free (nothing pending any more).
    fn flush(&mut self) -> bool {
        let Some(len) = self.tx.pending else {
            return true;
        };
        match self.nic.send(&self.tx.buf[..len]) {
            Err(NetError::QueueFull) => return false,
            Ok(()) => {}
            Err(e) => self.errors.record(e, "pending transmit"),
        }
        self.tx.pending = None;
        true
    }

    fn tx_token(&mut self) -> NetTxToken<'_, D, T> {
        NetTxToken {
            nic: &self.nic,
            tx: &mut self.tx,
            errors: &mut self.errors,
        }
    }
}

impl<D: DriverModel, T: Transport> Device for NetPhy<D, T> {
    type RxToken<'a>
        = NetRxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = NetTxToken<'a, D, T>
    where
        Self: 'a;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        // A reply may go out with the pair's transmit token: take nothing in while
        // the transmit path is blocked.
        if !self.flush() {
            return None;
        }
        let rx = &mut self.rx;
        rx.clear();
        match self.nic.poll_recv(1, |f| rx.extend_from_slice(f)) {
            Ok(_) if !rx.is_empty() => {}
            // Nothing there, or a frame the driver dropped (counted in its stats).
            Ok(_) => return None,
            Err(e) => {
                self.errors.record(e, "receive");
                return None;
            }
        }
        Some((
            NetRxToken { frame: &self.rx },
            NetTxToken {
                nic: &self.nic,
                tx: &mut self.tx,
                errors: &mut self.errors,
            },
        ))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        if !self.flush() {
            return None;
        }
        Some(self.tx_token())
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // smoltcp's Ethernet MTU includes the 14-byte header, like `max_frame`.
        caps.max_transmission_unit = self.nic.info().max_frame();
        // The receive queue bounds no burst: frames that find it full wait in the
        // device's backlog.
        caps.max_burst_size = None;
        caps.checksum = ChecksumCapabilities::default();
        caps
    }
}

/// One received frame, lent to smoltcp.
#[derive(Debug)]
pub struct NetRxToken<'a> {
    frame: &'a [u8],
}

impl phy::RxToken for NetRxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.frame)
    }
}

/// The transmit buffer, lent to smoltcp to build one frame in.
pub struct NetTxToken<'a, D: DriverModel, T: Transport> {
    nic: &'a NetDriver<D, T>,
    tx: &'a mut TxState,
    errors: &'a mut Errors,
}

impl<D: DriverModel, T: Transport> std::fmt::Debug for NetTxToken<'_, D, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetTxToken").finish_non_exhaustive()
    }
}

impl<D: DriverModel, T: Transport> phy::TxToken for NetTxToken<'_, D, T> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        // smoltcp builds frames within the MTU it was given; a longer one gets a
        // buffer all the same (`consume` cannot refuse) and `send` refuses it.
        if self.tx.buf.len() < len {
            self.tx.buf.resize(len, 0);
        }
        let r = f(&mut self.tx.buf[..len]);
        match self.nic.send(&self.tx.buf[..len]) {
            Ok(()) => {}
            // The tokens are handed out only with nothing pending, so at most one
            // frame waits; sent by the next `receive` or `transmit`.
            Err(NetError::QueueFull) => self.tx.pending = Some(len),
            Err(e) => self.errors.record(e, "transmit"),
        }
        r
    }
}

#[cfg(test)]
mod tests {
    //! The device against a scripted virtio-net device (model 2, direct) whose
    //! rings the test drives by hand: frames both ways, a transmit queue the device
    //! does not drain, and a device that breaks its rings.

    use super::*;
    use crate::{Broken, NetOptions};
    use hypervisor::Hypervisor;
    use smoltcp::phy::{RxToken as _, TxToken as _};
    use smoltcp::time::Instant;
    use std::sync::{Arc, Mutex};
    use transport_descriptors::DirectMemory;
    use transport_descriptors::direct::{self, DirectDriver};
    use virtio_core::config::ConfigSpace;
    use virtio_core::features::Features;
    use virtio_core::lifecycle::DeviceLifecycle;
    use virtio_core::net::{self, NET_DEPENDENCIES, NetConfig, NetFeatures, VirtioNetHdr};
    use virtio_core::notify::{EventFdNotifier, Notify};
    use virtio_core::ring::queue::DriverQueueError;
    use virtio_core::shm::Region;
    use virtio_core::transport::{ActiveQueue, DeviceHandler, InProcessTransport};
    use virtio_core::{DeviceModel, DeviceRing};
    use zerocopy::IntoBytes;

    const QUEUE: u16 = 8;
    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x42];

    struct Rings {
        rx: DeviceRing<DirectMemory>,
        tx: DeviceRing<DirectMemory>,
        /// The receive queue's used ring, for writing what no correct device would.
        rx_used: Region,
        /// The receive queue's used-buffer notification.
        rx_irq: EventFdNotifier,
    }

    type Shared = Arc<Mutex<Option<Rings>>>;

    struct Scripted {
        model: direct::DirectDevice,
        rings: Shared,
    }

    impl DeviceHandler for Scripted {
        fn activate(
            &mut self,
            features: u64,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let f = Features::from_bits_retain(features);
            let mut open = queues.iter().map(|q| {
                let vq = self.model.open_queue(q.index, q.layout.size, q.addrs())?;
                let used = vq.ring.device.clone();
                let ring = DeviceRing::new(q.layout.size, &vq.ring, vq.memory, f)?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((ring, used))
            });
            let (rx, rx_used) = open.next().ok_or("no receive queue")??;
            let (tx, _) = open.next().ok_or("no transmit queue")??;
            let rx_irq = queues[0].interrupt.try_clone()?;
            *self.rings.lock().unwrap() = Some(Rings {
                rx,
                tx,
                rx_used,
                rx_irq,
            });
            Ok(())
        }

        fn reset(&mut self) {
            *self.rings.lock().unwrap() = None;
        }
    }

    type Phy = NetPhy<DirectDriver, InProcessTransport<Scripted>>;

    fn setup() -> (Phy, Shared) {
        let guest = Hypervisor::new().create_domain("phy", 16 << 20).unwrap();
        let (driver, device) = direct::pair(&guest).unwrap();
        let rings = Arc::new(Mutex::new(None));
        let cfg = NetConfig {
            mac: MAC,
            mtu: 1500.into(),
            ..NetConfig::default()
        };
        let offer = NetFeatures::MAC | NetFeatures::MTU | NetFeatures::MRG_RXBUF;
        let lc = DeviceLifecycle::new(
            net::DEVICE_ID,
            offer.bits() | (Features::VERSION_1 | Features::EVENT_IDX).bits(),
            NET_DEPENDENCIES,
            ConfigSpace::new(cfg.as_bytes().to_vec()),
            &[QUEUE, QUEUE],
        );
        let handler = Scripted {
            model: device,
            rings: rings.clone(),
        };
        let t = InProcessTransport::new(lc, handler).unwrap();
        let nic = NetDriver::new(t, driver, guest.memory().clone(), NetOptions::default()).unwrap();
        (NetPhy::new(nic), rings)
    }

    fn with<R>(rings: &Shared, f: impl FnOnce(&mut Rings) -> R) -> R {
        f(rings.lock().unwrap().as_mut().expect("device active"))
    }

    /// The device delivers `frame` into the next receive buffer.
    fn deliver(rings: &Shared, frame: &[u8]) {
        with(rings, |r| {
            let c = r.rx.pop().unwrap().expect("a receive buffer");
            let bytes = [VirtioNetHdr::rx(1).as_bytes(), frame].concat();
            c.writer(r.rx.memory()).write_all(&bytes).unwrap();
            r.rx.add_used(c.head(), u32::try_from(bytes.len()).unwrap())
                .unwrap();
            if r.rx.needs_notification() {
                r.rx_irq.notify().unwrap();
            }
        });
    }

    /// The device takes every transmitted frame (header stripped) and returns its
    /// buffer.
    fn drain_tx(rings: &Shared) -> Vec<Vec<u8>> {
        with(rings, |r| {
            let mut got = Vec::new();
            while let Some(c) = r.tx.pop().unwrap() {
                let mut buf = vec![0; c.readable_len() as usize];
                c.reader(r.tx.memory()).read_exact(&mut buf).unwrap();
                got.push(buf.split_off(VirtioNetHdr::SIZE));
                r.tx.add_used(c.head(), 0).unwrap();
            }
            got
        })
    }

    /// A 60-byte broadcast frame numbered `seq`.
    fn frame(seq: u16) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend((0..44u8).map(|i| i ^ seq.to_le_bytes()[0]));
        f
    }

    /// Builds `f` in a transmit token, if the device gives one.
    fn send(phy: &mut Phy, f: &[u8]) -> bool {
        match phy.transmit(Instant::now()) {
            Some(t) => {
                t.consume(f.len(), |buf| buf.copy_from_slice(f));
                true
            }
            None => false,
        }
    }

    fn recv(phy: &mut Phy) -> Option<Vec<u8>> {
        phy.receive(Instant::now())
            .map(|(rx, _)| rx.consume(<[u8]>::to_vec))
    }

    #[test]
    fn frames_pass_both_ways_and_the_capabilities_match_the_driver() {
        let (mut phy, rings) = setup();
        let caps = phy.capabilities();
        assert_eq!(
            (caps.medium, caps.max_transmission_unit),
            (Medium::Ethernet, 1514)
        );
        assert_eq!(caps.ip_mtu(), 1500);
        assert!(caps.checksum.tcp.rx() && caps.checksum.tcp.tx() && caps.checksum.ipv4.rx());
        assert_eq!(
            phy.hardware_addr(),
            Some(HardwareAddress::Ethernet(EthernetAddress(MAC)))
        );
        assert_eq!(recv(&mut phy), None);
        for seq in 0..3 * QUEUE {
            deliver(&rings, &frame(seq));
            assert_eq!(recv(&mut phy), Some(frame(seq)));
            assert!(send(&mut phy, &frame(seq)));
            assert_eq!(drain_tx(&rings), vec![frame(seq)]);
        }
        assert_eq!(phy.error_count(), 0);
    }

    #[test]
    fn a_full_transmit_queue_holds_the_frame_back_until_slots_return() {
        let (mut phy, rings) = setup();
        for seq in 0..QUEUE {
            assert!(send(&mut phy, &frame(seq)));
        }
        assert!(!phy.tx_pending());
        // The device has taken nothing: the next frame finds no slot and waits.
        assert!(send(&mut phy, &frame(100)));
        assert!(phy.tx_pending());
        assert!(!send(&mut phy, &frame(101)), "no token while a frame waits");
        deliver(&rings, &frame(50));
        assert_eq!(recv(&mut phy), None, "no receive pair while a frame waits");
        let sent = drain_tx(&rings);
        assert_eq!(sent, (0..QUEUE).map(frame).collect::<Vec<_>>());
        // Slots came back: the waiting frame goes first, then the rest flows.
        assert_eq!(recv(&mut phy), Some(frame(50)));
        assert!(!phy.tx_pending());
        assert!(send(&mut phy, &frame(101)));
        assert_eq!(drain_tx(&rings), vec![frame(100), frame(101)]);
        assert_eq!(phy.error_count(), 0);
    }

    #[test]
    fn a_broken_device_drops_frames_and_is_reported_without_panicking() {
        let (mut phy, rings) = setup();
        // A used id that was never outstanding (HOSTILE rule 31).
        with(&rings, |r| {
            let elem = [u32::from(QUEUE + 3).to_le_bytes(), 72u32.to_le_bytes()].concat();
            r.rx_used.write(4, &elem).unwrap();
            r.rx_used.write(2, &1u16.to_le_bytes()).unwrap();
        });
        assert_eq!(recv(&mut phy), None);
        assert!(matches!(
            phy.last_error(),
            Some(NetError::DeviceBroken(Broken::Ring(DriverQueueError::UnknownId(
                11
            ))))
        ));
        assert_eq!(recv(&mut phy), None);
        assert_eq!(phy.error_count(), 2);
        let mut iface = Interface::new(
            smoltcp::iface::Config::new(phy.hardware_addr().unwrap()),
            &mut phy,
            Instant::now(),
        );
        let sockets = SocketSet::new(Vec::new());
        // A poll loop finds out through `wait` and stops.
        iface.poll(Instant::now(), &mut phy, &mut SocketSet::new(Vec::new()));
        assert!(matches!(
            phy.wait(&mut iface, &sockets, Some(Duration::from_secs(5))),
            Err(NetError::DeviceBroken(_))
        ));
        // Transmit is a separate queue and goes on.
        assert!(send(&mut phy, &frame(1)));
        assert_eq!(drain_tx(&rings), vec![frame(1)]);
    }

    #[test]
    fn wait_returns_when_a_frame_arrives_or_the_limit_passes() {
        let (mut phy, rings) = setup();
        let mut iface = Interface::new(
            smoltcp::iface::Config::new(phy.hardware_addr().unwrap()),
            &mut phy,
            Instant::now(),
        );
        let sockets = SocketSet::new(Vec::new());
        let t0 = std::time::Instant::now();
        assert!(
            !phy.wait(&mut iface, &sockets, Some(Duration::from_millis(20)))
                .unwrap()
        );
        assert!(t0.elapsed() >= Duration::from_millis(20));
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                deliver(&rings, &frame(7));
            });
            assert!(
                phy.wait(&mut iface, &sockets, Some(Duration::from_secs(10)))
                    .unwrap()
            );
        });
        assert_eq!(recv(&mut phy), Some(frame(7)));
    }
}
