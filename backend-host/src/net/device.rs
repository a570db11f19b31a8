//! The virtio-net device: features, configuration space, and the port worker that
//! moves frames between its guest's queues and the [`Switch`].
//!
//! One worker thread per device serves both queues, so each ring has one writer:
//! a scheduling round takes up to [`SwitchConfig::budget`](super::SwitchConfig)
//! transmitted chains (checked, then forwarded through the switch) and delivers up
//! to as many frames from the port's inbox into receive buffers. When a round finds
//! nothing to do the worker re-enables notifications with a re-check and sleeps on
//! its eventfds (transmit kick, receive kick, inbox, stop).
//!
//! Everything the guest transmits is checked before it is forwarded (HOSTILE rule
//! 28): shorter than header plus Ethernet header, longer than the MTU allows (checked
//! on the descriptor lengths, before anything is read or allocated), a GSO type (none
//! is offered) or a checksum field past the end: dropped and counted on the port.
//! On receive (rule 29) a frame is written only within the chain's writable bytes;
//! when the guest's buffers cannot hold it, it is dropped and counted, and the
//! buffer goes back with length 0. While the receive queue is empty, frames wait in
//! the bounded inbox and the worker waits for a receive kick.

use super::switch::{DropReason, Frame, Port, PortId, PortStats, Switch};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use virtio_core::config::ConfigSpace;
use virtio_core::features::Features;
use virtio_core::lifecycle::DeviceLifecycle;
use virtio_core::net::{
    self, ETH_HDR_LEN, NET_DEPENDENCIES, NetConfig, NetFeatures, VIRTIO_NET_S_LINK_UP, VirtioNetHdr,
    check_tx_header, complete_checksum,
};
use virtio_core::notify::{EventFdNotifier, Notify, NotifyError, Wait};
use virtio_core::ring::Chain;
use virtio_core::ring::split::DeviceQueueError;
use virtio_core::transport::{ActiveQueue, DeviceHandler};
use virtio_core::{DeviceMemory, DeviceModel, SplitDevice};
use zerocopy::{FromBytes, IntoBytes};

/// Device settings.
#[derive(Debug, Clone)]
pub struct NetSettings {
    /// The MAC address; default `02:00:00:00:00:<port>` (locally administered).
    pub mac: Option<[u8; 6]>,
    /// The MTU offered (MTU feature) and enforced on transmit.
    pub mtu: u16,
    /// Largest queue size offered.
    pub queue_size: u16,
    /// Link status reported in the configuration space.
    pub link_up: bool,
}

impl Default for NetSettings {
    fn default() -> Self {
        NetSettings {
            mac: None,
            mtu: 1500,
            queue_size: 256,
            link_up: true,
        }
    }
}

/// Why the device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not enable both queues of the pair.
    #[error("queue {0} not enabled")]
    MissingQueue(u16),
    /// The MTU setting is below the spec's minimum of 68.
    #[error("MTU {0} below 68")]
    BadMtu(u16),
    /// The sharing model refused a queue.
    #[error("sharing model refused a queue")]
    Model(#[from] virtio_core::ModelError),
    /// The ring memory is unusable.
    #[error("queue memory unusable")]
    Ring(#[from] virtio_core::ring::split::RingSetupError),
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
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A virtio-net device serving a guest through sharing model `V`, plugged into a
/// port of a [`Switch`].
pub struct NetDevice<V: DeviceModel> {
    model: Arc<V>,
    switch: Arc<Switch>,
    port: Arc<Port>,
    mac: [u8; 6],
    settings: NetSettings,
    running: Option<Running>,
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
    /// A device serving a guest through `model`, on a new port of `switch`.
    ///
    /// # Errors
    /// The port's eventfd could not be made.
    pub fn new(model: V, switch: &Arc<Switch>, settings: NetSettings) -> Result<NetDevice<V>, NotifyError> {
        let port = switch.attach()?;
        // The low bytes of the port number; a default for tests and tools.
        let low = port.id.index().to_le_bytes();
        let mac = settings.mac.unwrap_or([2, 0, 0, 0, low[1], low[0]]);
        Ok(NetDevice {
            model: Arc::new(model),
            switch: switch.clone(),
            port,
            mac,
            settings,
            running: None,
        })
    }

    /// The switch port.
    pub fn port(&self) -> PortId {
        self.port.id
    }

    /// The MAC address in the configuration space.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The port's counters.
    pub fn stats(&self) -> PortStats {
        self.switch.stats(self.port.id).unwrap_or_default()
    }

    /// The network features this device offers: no control queue, no segmentation
    /// offload.
    pub fn offered(&self) -> NetFeatures {
        NetFeatures::MAC
            | NetFeatures::STATUS
            | NetFeatures::MTU
            | NetFeatures::MRG_RXBUF
            | NetFeatures::CSUM
            | NetFeatures::GUEST_CSUM
    }

    /// The control plane a transport serves: offered features, configuration space
    /// and the two queue sizes.
    pub fn lifecycle(&self) -> DeviceLifecycle {
        let features = self.offered().bits()
            | (Features::VERSION_1 | Features::INDIRECT_DESC | Features::EVENT_IDX).bits();
        let status = if self.settings.link_up {
            VIRTIO_NET_S_LINK_UP
        } else {
            0
        };
        let cfg = NetConfig {
            mac: self.mac,
            status: status.into(),
            max_virtqueue_pairs: 1.into(),
            mtu: self.settings.mtu.into(),
            ..NetConfig::default()
        };
        let q = self.settings.queue_size;
        DeviceLifecycle::new(
            net::DEVICE_ID,
            features,
            NET_DEPENDENCIES,
            ConfigSpace::new(cfg.as_bytes().to_vec()),
            &[q, q],
        )
    }

    fn start(&mut self, features: u64, queues: Vec<ActiveQueue>) -> Result<(), ActivateError> {
        if self.settings.mtu < net::MIN_MTU {
            return Err(ActivateError::BadMtu(self.settings.mtu));
        }
        let mut rx = None;
        let mut tx = None;
        for q in queues {
            match q.index {
                0 => rx = Some(q),
                1 => tx = Some(q),
                _ => {}
            }
        }
        let rx = rx.ok_or(ActivateError::MissingQueue(0))?;
        let tx = tx.ok_or(ActivateError::MissingQueue(1))?;
        let f = Features::from_bits_retain(features);
        let open = |q: &ActiveQueue| -> Result<SplitDevice<V::Memory>, ActivateError> {
            let vq = self.model.open_queue(q.index, q.layout.size, q.addrs())?;
            Ok(SplitDevice::new(q.layout.size, &vq.ring, vq.memory, f)?)
        };
        let (rx_ring, tx_ring) = (open(&rx)?, open(&tx)?);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_fd = Arc::new(EventFdNotifier::new()?);
        let worker = Worker {
            rx: rx_ring,
            tx: tx_ring,
            rx_kick: rx.kick,
            tx_kick: tx.kick,
            rx_irq: rx.interrupt,
            tx_irq: tx.interrupt,
            stop: stop.clone(),
            stop_fd: stop_fd.clone(),
            port: self.port.clone(),
            switch: self.switch.clone(),
            features: NetFeatures::from_bits_truncate(features),
            max_frame: ETH_HDR_LEN + usize::from(self.settings.mtu),
            budget: self.switch.config().budget.max(1),
            held: Vec::new(),
            held_writable: 0,
            used: Vec::new(),
            starved: false,
            rx_broken: false,
            tx_broken: false,
        };
        // A frame pushed while the port was stopping may have slipped in.
        self.port.clear(&self.switch);
        self.port.set_active(true);
        let thread = std::thread::Builder::new()
            .name(format!("vio-net-{}", self.port.id.index()))
            .spawn(move || worker.run())
            .map_err(|e| {
                self.port.set_active(false);
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
    /// Stops the worker and returns only when it no longer touches guest memory.
    fn stop(&mut self) {
        // Frames for this port are dropped from now on.
        self.port.set_active(false);
        if let Some(mut r) = self.running.take() {
            r.stop.store(true, Ordering::Release);
            if let Err(error) = r.stop_fd.notify() {
                tracing::error!(%error, "cannot signal a net worker to stop");
            }
            if let Some(t) = r.thread.take() {
                let _ = t.join();
            }
        }
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
}

impl<V: DeviceModel> Drop for NetDevice<V> {
    fn drop(&mut self) {
        self.stop();
        self.switch.detach(&self.port);
    }
}

/// What became of a frame offered to the receive queue.
enum Delivery {
    /// Written, or dropped and counted; either way it is gone.
    Done,
    /// No receive buffer now: the frame goes back to the inbox.
    Wait(Frame),
}

/// Longest a worker sleeps without looking at its stop flag.
const SLEEP: rustix::event::Timespec = rustix::event::Timespec {
    tv_sec: 0,
    tv_nsec: 100_000_000,
};

/// The state of one port's worker thread.
struct Worker<M> {
    rx: SplitDevice<M>,
    tx: SplitDevice<M>,
    rx_kick: EventFdNotifier,
    tx_kick: EventFdNotifier,
    rx_irq: EventFdNotifier,
    tx_irq: EventFdNotifier,
    stop: Arc<AtomicBool>,
    stop_fd: Arc<EventFdNotifier>,
    port: Arc<Port>,
    switch: Arc<Switch>,
    features: NetFeatures,
    max_frame: usize,
    budget: usize,
    /// Receive chains gathered for a mergeable frame (MRG_RXBUF).
    held: Vec<Chain>,
    held_writable: u64,
    /// Used elements to publish at once.
    used: Vec<(u16, u32)>,
    /// Waiting for receive buffers (receive kicks enabled).
    starved: bool,
    rx_broken: bool,
    tx_broken: bool,
}

impl<M: DeviceMemory> Worker<M> {
    fn run(mut self) {
        // Receive kicks are wanted only while waiting for buffers.
        self.rx.disable_notifications();
        while !self.stop.load(Ordering::Acquire) {
            let tx_more = self.tx_round();
            let rx_more = self.rx_round();
            if !tx_more && !rx_more {
                self.sleep();
            }
        }
        // Chains held for a mergeable frame go back unused.
        for c in self.held.drain(..) {
            let _ = self.rx.add_used(c.head(), 0);
        }
    }

    /// Sleeps until a kick, a frame for this port, or stop.
    fn sleep(&mut self) {
        if self.starved && !self.rx_broken && self.rx.enable_notifications() {
            // Buffers arrived while we were deciding to wait.
            self.rx.disable_notifications();
            self.starved = false;
            return;
        }
        use rustix::event::{PollFd, PollFlags, poll};
        let mut fds = [
            PollFd::new(&*self.stop_fd, PollFlags::IN),
            PollFd::new(&self.tx_kick, PollFlags::IN),
            PollFd::new(&self.rx_kick, PollFlags::IN),
            PollFd::new(&self.port.wake, PollFlags::IN),
        ];
        if let Err(error) = poll(&mut fds, Some(&SLEEP)) {
            if error != rustix::io::Errno::INTR {
                tracing::error!(%error, "net worker poll failed");
            }
            return;
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        if ready[1] {
            let _ = self.tx_kick.take();
        }
        if ready[2] {
            let _ = self.rx_kick.take();
            self.rx.disable_notifications();
            self.starved = false;
        }
        if ready[3] {
            let _ = self.port.wake.take();
        }
    }

    /// Serves up to a budget of transmitted chains; returns whether more may wait.
    fn tx_round(&mut self) -> bool {
        if self.tx_broken {
            return false;
        }
        self.tx.disable_notifications();
        let mut n = 0;
        while n < self.budget {
            match self.tx.pop() {
                Ok(Some(chain)) => {
                    self.transmit(&chain);
                    self.used.push((chain.head(), 0));
                    n += 1;
                }
                Ok(None) => break,
                Err(DeviceQueueError::NeedsReset(fault)) => {
                    tracing::warn!(port = %self.port.id, %fault, "transmit queue needs reset");
                    self.tx_broken = true;
                    break;
                }
                // The ring already returned the bad chain.
                Err(error) => {
                    tracing::debug!(port = %self.port.id, %error, "transmit chain rejected");
                    n += 1;
                }
            }
        }
        if !self.used.is_empty() {
            if let Err(error) = self.tx.add_used_batch(self.used.drain(..)) {
                tracing::error!(%error, "returning transmit chains failed");
            }
            if self.tx.needs_notification() {
                let _ = self.tx_irq.notify();
            }
        }
        // Budget spent: keep kicks off and come back next round. Otherwise turn
        // them on; chains that raced in are served without sleeping.
        n >= self.budget || self.tx.enable_notifications()
    }

    /// Checks one transmitted chain and forwards its frame, or drops and counts it.
    fn transmit(&mut self, chain: &Chain) {
        let len = chain.readable_len() as usize;
        let Some(frame_len) = len.checked_sub(VirtioNetHdr::SIZE).filter(|&l| l >= ETH_HDR_LEN) else {
            return self.port.count_drop(DropReason::Short);
        };
        // Checked on the descriptor lengths, before anything is read or allocated.
        if frame_len > self.max_frame {
            return self.port.count_drop(DropReason::OverMtu);
        }
        let mut r = chain.reader(self.tx.memory());
        let mut raw = [0u8; VirtioNetHdr::SIZE];
        if r.read_exact(&mut raw).is_err() {
            return self.port.count_drop(DropReason::BadHeader);
        }
        let hdr = VirtioNetHdr::read_from_bytes(&raw).unwrap_or_default();
        let csum = match check_tx_header(&hdr, frame_len, self.features) {
            Ok(c) => c,
            Err(error) => {
                tracing::debug!(port = %self.port.id, %error, "transmit header refused");
                return self.port.count_drop(DropReason::BadHeader);
            }
        };
        let mut data = self.switch.take_buf(frame_len);
        if r.read_exact(&mut data).is_err() {
            self.switch.recycle(data);
            return self.port.count_drop(DropReason::BadHeader);
        }
        let src = self.port.id.index();
        self.switch.forward(&self.port, Frame { data, csum, src });
        // Counted once forwarded: a peer's counters are final when this one is.
        self.port.count_tx();
    }

    /// Delivers up to a budget of inbox frames; returns whether more may wait.
    fn rx_round(&mut self) -> bool {
        if self.starved {
            return false;
        }
        let mut n = 0;
        while n < self.budget {
            let Some(frame) = self.port.pop() else { break };
            match self.deliver(frame) {
                Delivery::Done => n += 1,
                Delivery::Wait(frame) => {
                    self.port.unpop(frame);
                    self.starved = true;
                    break;
                }
            }
        }
        if n > 0 && self.rx.needs_notification() {
            let _ = self.rx_irq.notify();
        }
        n >= self.budget
    }

    /// The next receive chain, `None` if the ring is empty or unusable.
    fn next_rx(&mut self) -> Option<Chain> {
        if self.rx_broken {
            return None;
        }
        loop {
            match self.rx.pop() {
                Ok(c) => return c,
                Err(DeviceQueueError::NeedsReset(fault)) => {
                    tracing::warn!(port = %self.port.id, %fault, "receive queue needs reset");
                    self.rx_broken = true;
                    return None;
                }
                Err(error) => tracing::debug!(port = %self.port.id, %error, "receive chain rejected"),
            }
        }
    }

    fn deliver(&mut self, mut frame: Frame) -> Delivery {
        if self.rx_broken {
            self.port.count_drop(DropReason::NoRxBuffer);
            self.switch.recycle(frame.data);
            return Delivery::Done;
        }
        let need = (VirtioNetHdr::SIZE + frame.data.len()) as u64;
        let mrg = self.features.contains(NetFeatures::MRG_RXBUF);
        // Gather chains until the frame fits: one without MRG_RXBUF, as many as it
        // takes with it (§5.1.6.4).
        while self.held.is_empty() || (mrg && self.held_writable < need) {
            let Some(chain) = self.next_rx() else {
                if self.rx_broken {
                    return self.drop_held(frame);
                }
                return Delivery::Wait(frame);
            };
            self.held_writable += u64::from(chain.writable_len());
            self.held.push(chain);
            if mrg && self.held_writable < need && self.held.len() >= usize::from(self.rx.size()) {
                // Every buffer of the queue would not hold it.
                return self.drop_held(frame);
            }
        }
        if self.held_writable < need {
            return self.drop_held(frame);
        }
        let mut hdr = VirtioNetHdr::rx(u16::try_from(self.held.len()).unwrap_or(u16::MAX));
        if let Some(at) = frame.csum {
            if self.features.contains(NetFeatures::GUEST_CSUM) {
                // Both came from u16 header fields.
                let start = u16::try_from(at.start).unwrap_or(u16::MAX);
                let offset = u16::try_from(at.offset).unwrap_or(u16::MAX);
                hdr = VirtioNetHdr {
                    num_buffers: hdr.num_buffers,
                    ..VirtioNetHdr::partial_csum(start, offset)
                };
            } else {
                complete_checksum(&mut frame.data, at);
            }
        }
        let parts: [&[u8]; 2] = [hdr.as_bytes(), &frame.data];
        let (mut part, mut off) = (0, 0);
        let mut failed = false;
        for chain in &self.held {
            let mut w = chain.writer(self.rx.memory());
            while part < parts.len() && w.remaining() > 0 && !failed {
                match w.write(&parts[part][off..]) {
                    // No progress although space is left: never spin.
                    Ok(0) => failed = true,
                    Ok(k) => {
                        off += k;
                        if off == parts[part].len() {
                            part += 1;
                            off = 0;
                        }
                    }
                    Err(_) => failed = true,
                }
            }
            self.used.push((chain.head(), w.written()));
        }
        self.held.clear();
        self.held_writable = 0;
        if failed {
            // A half-written frame is no frame: every buffer goes back unused, so
            // the driver never assembles a truncated one.
            for u in &mut self.used {
                u.1 = 0;
            }
        }
        if let Err(error) = self.rx.add_used_batch(self.used.drain(..)) {
            tracing::error!(%error, "returning receive chains failed");
        }
        if failed {
            self.port.count_drop(DropReason::NoRxBuffer);
        } else {
            self.port.count_rx();
        }
        self.switch.recycle(frame.data);
        Delivery::Done
    }

    /// Drops `frame` (the guest's buffers cannot take it) and returns the gathered
    /// chains unused (length 0).
    fn drop_held(&mut self, frame: Frame) -> Delivery {
        self.port.count_drop(DropReason::NoRxBuffer);
        self.switch.recycle(frame.data);
        self.used.extend(self.held.drain(..).map(|c| (c.head(), 0)));
        self.held_writable = 0;
        if !self.used.is_empty()
            && let Err(error) = self.rx.add_used_batch(self.used.drain(..))
        {
            tracing::error!(%error, "returning receive chains failed");
        }
        Delivery::Done
    }
}
