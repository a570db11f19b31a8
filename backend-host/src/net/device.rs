//! The virtio-net device: features, configuration space, the control queue, and the
//! port worker that moves frames between its guest's queues and the [`Switch`].
//!
//! One worker thread per device serves every queue it was given, so each ring has
//! one writer and no lock is taken on the ring. A scheduling round serves the
//! control queue, then up to [`SwitchConfig::budget`](super::SwitchConfig)
//! transmitted chains from each active transmit queue (checked, then forwarded
//! through the switch as one batch), then delivers up to as many frames from the
//! port's inbox (taken whole, in one short lock) into receive buffers, whose used entries are
//! published together. When a round finds nothing to do the worker polls for a
//! while if [`NetSettings::poll`] asks it to (transmit kicks off, backing off while
//! its core is shared), then re-enables notifications with a re-check and sleeps on
//! its eventfds (kicks of the active queues, inbox, stop). One thread rather than
//! one per pair: this machine kind has two cores, and a single inbox per port would
//! need a second level of queues to feed several threads. Frames do not skip the
//! receiving worker (a forwarder writing into the receiving guest's ring itself was
//! measured slower: one worker then does both halves while the other idles).
//!
//! # Multiqueue (MQ, virtio 1.2 §5.1.6.5.5)
//! With `queue_pairs` > 1 in [`NetSettings`] the device offers MQ with that many
//! pairs (queue `2k` receives and `2k + 1` transmits for pair `k`; the control
//! queue is `2N`, §5.1.2). After activation only pair 0 is used; a
//! VIRTQUEUE_PAIRS_SET of `n` (1 up to the pairs the driver enabled, which is at
//! most `max_virtqueue_pairs`) makes pairs `0..n` active. The worker then serves
//! every active transmit queue and steers each received frame to the receive
//! queue of pair [`flow_hash`]` % n`: a symmetric hash over IPv4/IPv6 addresses
//! and TCP/UDP ports, so both directions of a flow, and every frame of it, use
//! one queue; frames that are not IP go to pair 0. The spec's SHOULD, to steer a
//! flow to the queue its last transmit used, is not followed: the hash already
//! keeps a flow on one queue, and a driver that wants the two directions together
//! can transmit on pair `flow_hash % n` itself. A frame whose receive queue has no
//! buffers waits at the head of the inbox; the guest's other queues wait behind
//! it, which costs only that guest (other ports have their own inboxes).
//!
//! # Control queue (CTRL_VQ, §5.1.6.5)
//! Offered always. Each command is read once, whole, into a private buffer and
//! validated by [`CtrlCommand::parse_bytes`]; its writable part must be exactly the
//! 1-byte `ack`. Anything else is answered VIRTIO_NET_ERR (and changes nothing):
//! an unknown class or command, a feature not negotiated, data of the wrong
//! length, more than [`CTRL_DATA_MAX`] bytes, or a writable part longer than one
//! byte. A chain without a writable byte cannot be answered and is returned with
//! used length 0. What the commands change:
//! - PROMISC / ALLMULTI (CTRL_RX): the receive filter. The switch delivers a port
//!   the frames for its MAC, broadcast, multicast, and unicast it floods because
//!   the destination is unknown. With promiscuous mode on (the state after reset,
//!   as in QEMU, so drivers that never send these commands receive everything)
//!   all of it reaches the guest; off, unicast reaches it only for its own
//!   address or one in the MAC table, multicast only with all-multicast on or an
//!   address in the table, broadcast always. Filtered frames are counted
//!   ([`NetDevice::filtered_frames`]).
//! - MAC_TABLE_SET (CTRL_RX): the filter's extra addresses, at most
//!   [`MAC_TABLE_ENTRIES`] per kind; a longer list accepts that whole kind, as the
//!   spec allows.
//! - MAC_ADDR_SET (CTRL_MAC_ADDR): the address the filter accepts and
//!   [`NetDevice::mac`] reports; a group address is refused. The switch learns
//!   the new address from the guest's next frame. A port bound to its configured
//!   address ([`NetSettings::allow_any_source_mac`]) refuses any other (HOSTILE
//!   33): its frames from it would be dropped. The configuration space's `mac`
//!   follows (§5.1.6.5.2): the transport applies the change, through
//!   [`DeviceHandler::config_changes`], before the driver's next configuration
//!   read. After a reset the device goes back to its configured address, in the
//!   configuration space too.
//! - VQ_PAIRS_SET (MQ): the active pairs, as above.
//!
//! # Frames
//! Everything the guest transmits is checked before it is forwarded (HOSTILE rule
//! 28): shorter than header plus Ethernet header, longer than the MTU allows
//! (checked on the descriptor lengths, before anything is read or allocated), a GSO
//! type (none is offered) or a checksum field past the end: dropped and counted on
//! the port. On receive (rule 29) a frame is written only within the chain's
//! writable bytes; when the guest's buffers cannot hold it, it is dropped and
//! counted, and the buffer goes back with length 0. While a receive queue is empty,
//! frames wait in the bounded inbox and the worker waits for a receive kick.
//!
//! A device created with a MAC address ([`NetSettings::mac`]) is bound to it on
//! the switch unless [`NetSettings::allow_any_source_mac`] is set (HOSTILE 33):
//! frames it transmits from any other source address are dropped and counted
//! ([`DropReason::SpoofedSource`]), and no other port can take its address.
//!
//! # Budget (HOSTILE 34)
//! A scheduling round takes at most [`SwitchConfig::budget`](super::SwitchConfig)
//! chains from the control queue, from each transmit queue and from the receive
//! queues together, counting chains the ring rejected at once and chains dropped
//! unread, so a driver that keeps re-publishing chains that fail or
//! finish at once cannot hold the worker in one queue: when a budget is spent, the
//! worker runs its next round at once (without waiting for a kick), serving its
//! other queues and looking at its stop flag in between.
//!
//! [`flow_hash`]: virtio_core::net::flow_hash
//! [`CtrlCommand::parse_bytes`]: virtio_core::net::CtrlCommand::parse_bytes
//! [`CTRL_DATA_MAX`]: virtio_core::net::CTRL_DATA_MAX

use super::switch::{Batch, DropReason, Frame, Inbox, LocalPool, Port, PortId, PortStats, Switch};
use crate::poll::Poller;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use virtio_core::config::ConfigSpace;
use virtio_core::features::Features;
use virtio_core::lifecycle::DeviceLifecycle;
use virtio_core::net::{
    self, ETH_HDR_LEN, MQ_VQ_PAIRS_MAX, NET_DEPENDENCIES, NetConfig, NetFeatures, VIRTIO_NET_S_LINK_UP,
    VirtioNetHdr, check_tx_header, complete_checksum, flow_hash,
};
use virtio_core::notify::{EventFdNotifier, Notify, NotifyError, Wait};
use virtio_core::ring::Chain;
use virtio_core::ring::areas::RingFormat;
use virtio_core::ring::queue::{DeviceQueueError, RING_FEATURES};
use virtio_core::transport::{ActiveQueue, DeviceHandler};
use virtio_core::{DeviceMemory, DeviceModel, DeviceRing};
use zerocopy::{FromBytes, IntoBytes};

mod ctrl;
mod worker;
use ctrl::RxFilter;
use worker::{CtrlQueue, Ctx, Pair, Worker};
#[cfg(feature = "test-utils")]
pub use worker::{FuzzRxFate, fuzz_deliver_rx};

/// Addresses of each kind (unicast, multicast) the receive filter holds from a
/// MAC_TABLE_SET; beyond that the whole kind is accepted (§5.1.6.5.2 allows a
/// device to "silently switch to allmulti or promiscuous mode").
pub const MAC_TABLE_ENTRIES: usize = 64;

/// Device settings.
#[derive(Debug, Clone)]
pub struct NetSettings {
    /// The MAC address; default `02:00:00:00:00:<port>` (locally administered).
    /// A configured address binds the port to it (see
    /// [`NetSettings::allow_any_source_mac`]).
    pub mac: Option<[u8; 6]>,
    /// Lets a device created with a [`NetSettings::mac`] send from any source
    /// address, as a device without one does: the switch then learns whatever
    /// sources it uses. Off by default: the port is bound to its address (HOSTILE
    /// 33), so the guest can neither send from another address nor take over
    /// another port's, and MAC_ADDR_SET to another address is refused.
    pub allow_any_source_mac: bool,
    /// The MTU offered (MTU feature) and enforced on transmit.
    pub mtu: u16,
    /// Largest queue size offered.
    pub queue_size: u16,
    /// Link status reported in the configuration space.
    pub link_up: bool,
    /// Queue pairs offered, `max_virtqueue_pairs` (1..=0x8000); MQ is offered when
    /// it is above 1. Each pair costs two queues (and, in process, two eventfd
    /// pairs).
    pub queue_pairs: u16,
    /// Adaptive polling: after a round that found work, the worker keeps polling
    /// its queues and inbox (transmit kicks off) for this long before it sleeps.
    /// Zero sleeps at once. It saves the guest a kick and the worker a wake-up per
    /// burst, at the price of a core while it polls; the worker backs off while
    /// its core is shared (see the blk device's `poll` setting).
    pub poll: std::time::Duration,
}

impl Default for NetSettings {
    fn default() -> Self {
        NetSettings {
            mac: None,
            allow_any_source_mac: false,
            mtu: 1500,
            queue_size: 256,
            link_up: true,
            queue_pairs: 1,
            poll: std::time::Duration::ZERO,
        }
    }
}

/// Why the device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not enable a queue it must use: both queues of pair 0, and
    /// the control queue once CTRL_VQ is negotiated.
    #[error("queue {0} not enabled")]
    MissingQueue(u16),
    /// The MTU setting is below the spec's minimum of 68.
    #[error("MTU {0} below 68")]
    BadMtu(u16),
    /// The queue-pairs setting is outside 1..=0x8000.
    #[error("{0} queue pairs is outside 1..=32768")]
    BadQueuePairs(u16),
    /// The sharing model refused a queue.
    #[error("sharing model refused a queue")]
    Model(#[from] virtio_core::ModelError),
    /// The ring memory is unusable.
    #[error("queue memory unusable")]
    Ring(#[from] virtio_core::ring::queue::RingSetupError),
    /// The queue's inflight region does not add up.
    #[error("inflight region refused")]
    Inflight(#[from] virtio_core::ring::inflight::InflightError),
    /// An eventfd could not be made.
    #[error("eventfd")]
    Notify(#[from] NotifyError),
    /// The worker thread could not start.
    #[error("worker thread")]
    Thread(#[source] std::io::Error),
}

struct Running {
    stop: Arc<AtomicBool>,
    stop_fd: Arc<EventFdNotifier>,
    thread: Option<std::thread::JoinHandle<Stopped>>,
}

/// What a worker leaves when it stops.
struct Stopped {
    /// `(queue index, next available-ring position)` of each queue it served.
    positions: Vec<(u16, u16)>,
    parked: Parked,
}

/// The device state the worker holds, kept across [`NetDevice::stop_queues`] for
/// the next start (a reset drops it).
#[derive(Debug)]
struct Parked {
    filter: RxFilter,
    /// Active pairs (VQ_PAIRS_SET).
    active: usize,
    /// Frames taken from the port's inbox and not yet delivered.
    inbox: Inbox,
}

/// What the worker changes and the owner reads.
#[derive(Debug)]
struct Shared {
    /// The MAC address in use (configured, or set by MAC_ADDR_SET).
    mac: Mutex<[u8; 6]>,
    /// Active queue pairs; 0 while stopped.
    active_pairs: AtomicU16,
    /// Frames the receive filter dropped.
    filtered: AtomicU64,
}

/// A virtio-net device serving a guest through sharing model `V`, plugged into a
/// port of a [`Switch`].
pub struct NetDevice<V: DeviceModel> {
    model: Arc<V>,
    switch: Arc<Switch>,
    port: Arc<Port>,
    mac: [u8; 6],
    /// The MAC the configuration space holds (the transport applied it).
    config_mac: [u8; 6],
    settings: NetSettings,
    shared: Arc<Shared>,
    running: Option<Running>,
    /// State of a worker stopped by [`Self::stop_queues`], for the next start.
    parked: Option<Parked>,
}

impl<V: DeviceModel> std::fmt::Debug for NetDevice<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice")
            .field("port", &self.port.id)
            .field("mac", &self.mac)
            .field("settings", &self.settings)
            .field("running", &self.running.is_some())
            .finish_non_exhaustive()
    }
}

impl<V> NetDevice<V>
where
    V: DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    /// A device serving a guest through `model`, on a new port of `switch`, bound
    /// to [`NetSettings::mac`] when one is given (unless
    /// [`NetSettings::allow_any_source_mac`]).
    ///
    /// # Errors
    /// The port's eventfd could not be made.
    pub fn new(model: V, switch: &Arc<Switch>, settings: NetSettings) -> Result<NetDevice<V>, NotifyError> {
        let bound = settings.mac.filter(|_| !settings.allow_any_source_mac);
        let port = switch.attach(bound)?;
        // The low bytes of the port number; a default for tests and tools.
        let low = port.id.index().to_le_bytes();
        let mac = settings.mac.unwrap_or([2, 0, 0, 0, low[1], low[0]]);
        Ok(NetDevice {
            model: Arc::new(model),
            switch: switch.clone(),
            port,
            mac,
            config_mac: mac,
            settings,
            shared: Arc::new(Shared {
                mac: Mutex::new(mac),
                active_pairs: AtomicU16::new(0),
                filtered: AtomicU64::new(0),
            }),
            running: None,
            parked: None,
        })
    }

    /// The switch port.
    pub fn port(&self) -> PortId {
        self.port.id
    }

    /// The MAC address in use: the configured one, or the one the driver set with
    /// MAC_ADDR_SET since the last reset (a reset goes back to the configured one).
    pub fn mac(&self) -> [u8; 6] {
        *self.shared.mac.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue pairs in use: 1 after activation, what VQ_PAIRS_SET chose since; 0
    /// while the device is stopped.
    pub fn active_pairs(&self) -> u16 {
        self.shared.active_pairs.load(Ordering::Relaxed)
    }

    /// Frames the receive filter kept from the guest (CTRL_RX with promiscuous
    /// mode off).
    pub fn filtered_frames(&self) -> u64 {
        self.shared.filtered.load(Ordering::Relaxed)
    }

    /// The port's counters.
    pub fn stats(&self) -> PortStats {
        self.switch.stats(self.port.id).unwrap_or_default()
    }

    /// The network features this device offers: the control queue with receive
    /// modes and MAC setting, MQ when more than one pair is configured; no
    /// segmentation offload.
    pub fn offered(&self) -> NetFeatures {
        let mq = if self.settings.queue_pairs > 1 {
            NetFeatures::MQ
        } else {
            NetFeatures::empty()
        };
        NetFeatures::MAC
            | NetFeatures::STATUS
            | NetFeatures::MTU
            | NetFeatures::MRG_RXBUF
            | NetFeatures::CSUM
            | NetFeatures::GUEST_CSUM
            | NetFeatures::CTRL_VQ
            | NetFeatures::CTRL_RX
            | NetFeatures::CTRL_MAC_ADDR
            | mq
    }

    /// The control plane a transport serves: offered features, configuration space
    /// and the queue sizes (`2 * queue_pairs` data queues and the control queue).
    pub fn lifecycle(&self) -> DeviceLifecycle {
        let features = self.offered().bits() | RING_FEATURES.bits();
        let status = if self.settings.link_up {
            VIRTIO_NET_S_LINK_UP
        } else {
            0
        };
        // An out-of-range setting fails activation; the layout just stays sane.
        let pairs = self.settings.queue_pairs.clamp(1, MQ_VQ_PAIRS_MAX);
        let cfg = NetConfig {
            mac: self.mac,
            status: status.into(),
            max_virtqueue_pairs: pairs.into(),
            mtu: self.settings.mtu.into(),
            ..NetConfig::default()
        };
        let q = self.settings.queue_size;
        let sizes = vec![q; 2 * usize::from(pairs) + 1];
        DeviceLifecycle::new(
            net::DEVICE_ID,
            features,
            NET_DEPENDENCIES,
            ConfigSpace::new(cfg.as_bytes().to_vec()),
            &sizes,
        )
    }

    fn start(&mut self, features: u64, queues: Vec<ActiveQueue>) -> Result<(), ActivateError> {
        if self.settings.mtu < net::MIN_MTU {
            return Err(ActivateError::BadMtu(self.settings.mtu));
        }
        let max_pairs = self.settings.queue_pairs;
        if !(1..=MQ_VQ_PAIRS_MAX).contains(&max_pairs) {
            return Err(ActivateError::BadQueuePairs(max_pairs));
        }
        let nf = NetFeatures::from_bits_truncate(features);
        // §5.1.2: the control queue follows max_virtqueue_pairs pairs with MQ, one
        // pair without.
        let ctrl_index = if nf.contains(NetFeatures::MQ) {
            u16::try_from(net::ctrl_queue(max_pairs)).ok()
        } else {
            Some(2)
        };
        let mut slots: Vec<Option<ActiveQueue>> = Vec::new();
        let mut ctrl_q = None;
        for q in queues {
            if nf.contains(NetFeatures::CTRL_VQ) && Some(q.index) == ctrl_index {
                ctrl_q = Some(q);
                continue;
            }
            let i = usize::from(q.index);
            // Data queues beyond the offered pairs (or a control queue that was
            // not negotiated) are not served.
            let data_queues = if nf.contains(NetFeatures::MQ) {
                2 * usize::from(max_pairs)
            } else {
                2
            };
            if i < data_queues {
                if slots.len() <= i {
                    slots.resize_with(i + 1, || None);
                }
                slots[i] = Some(q);
            }
        }
        if nf.contains(NetFeatures::CTRL_VQ) && ctrl_q.is_none() {
            return Err(ActivateError::MissingQueue(ctrl_index.unwrap_or(u16::MAX)));
        }
        let f = Features::from_bits_retain(features);
        let open = |q: &mut ActiveQueue| -> Result<DeviceRing<V::Memory>, ActivateError> {
            let vq = self
                .model
                .open_queue_in(q.index, RingFormat::of(f), q.layout.size, q.addrs())?;
            Ok(q.resume(DeviceRing::new(q.layout.size, &vq.ring, vq.memory, f)?)?)
        };
        // The pairs the driver enabled: the longest run from pair 0 with both
        // queues (§5.1.5: "up to N of each kind").
        let mut pairs = Vec::new();
        let mut slots = slots.into_iter();
        while let (Some(Some(mut rx)), Some(Some(mut tx))) = (slots.next(), slots.next()) {
            pairs.push(Pair {
                rx: open(&mut rx)?,
                tx: open(&mut tx)?,
                rx_kick: rx.kick,
                tx_kick: tx.kick,
                rx_irq: rx.interrupt,
                tx_irq: tx.interrupt,
                held: Vec::new(),
                held_writable: 0,
                rx_used: Vec::new(),
                rx_broken: false,
                tx_broken: false,
            });
        }
        if pairs.is_empty() {
            return Err(ActivateError::MissingQueue(0));
        }
        let ctrl = match ctrl_q {
            Some(mut q) => Some(CtrlQueue {
                ring: open(&mut q)?,
                index: q.index,
                kick: q.kick,
                irq: q.interrupt,
                broken: false,
            }),
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop_fd = Arc::new(EventFdNotifier::new()?);
        let filtering = ctrl.is_some() && nf.contains(NetFeatures::CTRL_RX);
        // Nothing fails from here on but the thread's start: the parked state is
        // taken only now, so a start refused for its queues leaves it for the next.
        let resumed = self.parked.is_some();
        let Parked {
            mut filter,
            active,
            inbox,
        } = match self.parked.take() {
            Some(p) => p,
            None => {
                *self.shared.mac.lock().unwrap_or_else(PoisonError::into_inner) = self.mac;
                Parked {
                    filter: RxFilter::new(self.mac, filtering),
                    active: 1,
                    inbox: Inbox::default(),
                }
            }
        };
        filter.set_enabled(filtering);
        // With a control queue the driver chooses the active pairs (VQ_PAIRS_SET).
        // Without one, a vhost-user frontend that serves the control queue itself
        // (QEMU does for vhost-user-net) enables exactly the rings of the pairs in
        // use (SET_VRING_ENABLE), so every pair it started is active.
        let active = if ctrl.is_some() {
            active.clamp(1, pairs.len())
        } else {
            pairs.len()
        };
        self.shared
            .active_pairs
            .store(u16::try_from(active).unwrap_or(u16::MAX), Ordering::Relaxed);
        let worker = Worker {
            pairs,
            active,
            ctrl,
            filter,
            shared: self.shared.clone(),
            ctx: Ctx {
                port: self.port.clone(),
                switch: self.switch.clone(),
                features: nf,
                max_frame: ETH_HDR_LEN + usize::from(self.settings.mtu),
            },
            budget: self.switch.config().budget.max(1),
            stop: stop.clone(),
            stop_fd: stop_fd.clone(),
            used: Vec::new(),
            starved: None,
            cmd: Vec::new(),
            batch: Batch::default(),
            pool: LocalPool::default(),
            inbox,
            poller: Poller::new(self.settings.poll),
        };
        if !resumed {
            // A frame pushed while the port was stopping may have slipped in.
            self.port.clear(&self.switch);
        }
        self.port.set_active(true);
        let thread = std::thread::Builder::new()
            .name(format!("vio-net-{}", self.port.id.index()))
            .spawn(move || worker.run())
            .map_err(|e| {
                self.port.set_active(false);
                self.shared.active_pairs.store(0, Ordering::Relaxed);
                ActivateError::Thread(e)
            })?;
        self.running = Some(Running {
            stop,
            stop_fd,
            thread: Some(thread),
        });
        Ok(())
    }
}

impl<V: DeviceModel> NetDevice<V> {
    /// Stops every queue, keeping the device's state, and returns where each
    /// stopped: how vhost-user stops rings and starts them again (GET_VRING_BASE,
    /// or a restart because the set of rings or an eventfd changed), unlike a
    /// reset. Chains the worker holds go back first (receive chains gathered for a
    /// frame that did not fit yet are returned unused, length 0, as at a reset),
    /// so nothing is in flight. Returns `(queue index, next available-ring
    /// position)` of each queue that was running, for [`ActiveQueue::next_avail`]
    /// when the queues start again.
    ///
    /// What stays until the next start: the port on the switch (so the switch
    /// keeps the addresses it learnt there) and active, frames for it queued in
    /// its bounded inbox; the receive filter, the address MAC_ADDR_SET chose and
    /// the active pairs. A reset ([`DeviceHandler::reset`]) drops all of it.
    pub fn stop_queues(&mut self) -> Vec<(u16, u16)> {
        let Some(stopped) = self.halt() else {
            return Vec::new();
        };
        self.shared.active_pairs.store(0, Ordering::Relaxed);
        self.parked = Some(stopped.parked);
        stopped.positions
    }

    /// Stops the worker, if one runs, and returns what it left only when it no
    /// longer touches guest memory.
    fn halt(&mut self) -> Option<Stopped> {
        let mut r = self.running.take()?;
        r.stop.store(true, Ordering::Release);
        if let Err(error) = r.stop_fd.notify() {
            tracing::error!(%error, "cannot signal a net worker to stop");
        }
        match r.thread.take()?.join() {
            Ok(stopped) => Some(stopped),
            Err(_) => {
                tracing::error!(port = %self.port.id, "net worker panicked");
                None
            }
        }
    }

    /// Stops the worker and forgets the device state (a reset).
    fn stop(&mut self) {
        // Frames for this port are dropped from now on.
        self.port.set_active(false);
        let stopped = self.halt().map(|s| s.parked);
        for parked in stopped.into_iter().chain(self.parked.take()) {
            let mut inbox = parked.inbox;
            while let Some(f) = inbox.pop() {
                self.switch.recycle(f.data);
            }
        }
        // A reset undoes MAC_ADDR_SET: the configuration space never changed.
        *self.shared.mac.lock().unwrap_or_else(PoisonError::into_inner) = self.mac;
        self.shared.active_pairs.store(0, Ordering::Relaxed);
        self.port.clear(&self.switch);
    }
}

impl<V> DeviceHandler for NetDevice<V>
where
    V: DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    fn activate(
        &mut self,
        features: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.start(features, queues)?)
    }

    fn reset(&mut self) {
        self.stop();
    }

    fn config_changes(&mut self, update: &mut dyn FnMut(usize, &[u8])) {
        let mac = self.mac();
        if mac != self.config_mac {
            update(std::mem::offset_of!(NetConfig, mac), &mac);
            self.config_mac = mac;
        }
    }
}

impl<V: DeviceModel> Drop for NetDevice<V> {
    fn drop(&mut self) {
        self.stop();
        self.switch.detach(&self.port);
    }
}
