//! The driver: device initialization, queue pairs, the control queue, sending,
//! NAPI-style receiving, waiting.

use crate::ctrl::{Answer, CTRL_QUEUE_SIZE, CtrlQueue, MAX_DATA, SLOT_LEN};
use crate::error::{Broken, NetError};
use crate::info::{NetInfo, NetOptions};
use crate::rx::{RxMode, RxQueue, RxStats};
use crate::tx::TxQueue;
use hypervisor::GuestMemory;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use virtio_core::DriverModel;
use virtio_core::driver::{DeviceGuard, SetupError};
use virtio_core::net::{
    CtrlAck, CtrlCommand, ETH_HDR_LEN, NET_DEPENDENCIES, NetConfig, NetFeatures, VIRTIO_NET_S_LINK_UP,
    VirtioNetCtrlHdr, VirtioNetHdr,
};
use virtio_core::notify::Wait;
use virtio_core::transport::Transport;
use zerocopy::{FromBytes, IntoBytes};

/// Receive queue index of the first queue pair (§5.1.2).
pub const RX_QUEUE: u16 = 0;
/// Transmit queue index of the first queue pair (§5.1.2).
pub const TX_QUEUE: u16 = 1;

/// Smallest queue the driver uses.
const MIN_QUEUE_SIZE: u16 = 2;

/// Longest a blocked sender sleeps before it re-checks the ring: an interrupt
/// consumed elsewhere costs latency, never a hang.
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// One receive/transmit queue pair and its interrupt sources.
struct Pair<S: virtio_core::DriverShare, W> {
    rx: Mutex<RxQueue<S>>,
    tx: Mutex<TxQueue<S>>,
    rx_irq: W,
    tx_irq: W,
}

/// The control queue, its index and its interrupt source.
struct Ctrl<S: virtio_core::DriverShare, W> {
    queue: Mutex<CtrlQueue<S>>,
    index: u16,
    irq: W,
}

/// A virtio-net driver over transport `T` and sharing model `D`. Each queue waits
/// on the used-buffer notification its transport gives ([`Transport::interrupt`]).
///
/// Methods take `&self`: every queue has its own lock, so threads may send and
/// receive on different pairs (or on both sides of one) at once.
///
/// # Queue pairs
/// Pair `k` is receive queue `2k` and transmit queue `2k + 1` (§5.1.2).
/// [`Self::send`], [`Self::poll_recv`] and [`Self::wait_rx`] use pair 0, which
/// is always in use: with one pair (every driver without MQ) that is the whole
/// device, and existing single-queue callers keep working unchanged when MQ is
/// negotiated. With more pairs in use the device steers each flow to one receive
/// queue; callers then receive with [`Self::poll_recv_on`] on every pair of
/// [`Self::queue_pairs`] (one thread per pair, or in turn) and may transmit on
/// any of them with [`Self::send_on`].
pub struct NetDriver<D: DriverModel, T: Transport> {
    /// Owns the transport; stops the device when the driver goes.
    device: DeviceGuard<T>,
    model: D,
    memory: Arc<GuestMemory>,
    info: NetInfo,
    pairs: Vec<Pair<D::Share, T::Interrupt>>,
    ctrl: Option<Ctrl<D::Share, T::Interrupt>>,
    /// Pairs in use (VQ_PAIRS_SET), 1..=pairs.len().
    active: AtomicU16,
    /// The MAC address in use: the device's, or the last one set.
    mac: Mutex<Option<[u8; 6]>>,
    control_timeout: Duration,
}

impl<D: DriverModel, T: Transport> std::fmt::Debug for NetDriver<D, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDriver")
            .field("model", &self.model.name())
            .field("info", &self.info)
            .field("pairs", &self.pairs.len())
            .finish_non_exhaustive()
    }
}

fn lock<Q>(m: &Mutex<Q>) -> MutexGuard<'_, Q> {
    // Every method leaves the queue consistent before anything could panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A queue index as a `u16` (checked against the control queue's, which fits).
fn index(i: usize) -> u16 {
    u16::try_from(i).unwrap_or(u16::MAX)
}

impl<D: DriverModel, T: Transport> NetDriver<D, T> {
    /// Initializes the device behind `transport` (virtio 1.2 §3.1.1, §5.1.5):
    /// negotiates what `opts` wants, reads MAC, status, queue pairs and MTU,
    /// creates the queues of the pairs to use (see [`NetOptions::queue_pairs`])
    /// and the control queue (CTRL_VQ) through `model`, allocates their buffers in
    /// `memory` (the guest's own), fills the receive queues and sets DRIVER_OK;
    /// then it makes [`NetOptions::active_pairs`] (default: all) active with
    /// VQ_PAIRS_SET unless that is 1.
    ///
    /// Each queue's used-buffer notification comes from the transport.
    ///
    /// # Errors
    /// [`NetError::Setup`] (initialization, configuration, queue setup), bad
    /// configuration values, allocation failures and the control errors of
    /// [`Self::set_queue_pairs`]; the device is then marked FAILED and reset
    /// (see [`DeviceGuard`]) and everything allocated is freed.
    pub fn new(transport: T, model: D, memory: Arc<GuestMemory>, opts: NetOptions) -> Result<Self, NetError> {
        // From here on, an early return drops the guard: FAILED, then a reset.
        let device = DeviceGuard::initialize(
            transport,
            virtio_core::net::DEVICE_ID,
            model.allowed(opts.wanted),
            NET_DEPENDENCIES,
        )?;
        let info = NetInfo::new(device.features(), &read_config(&device)?, &opts)?;
        let (pairs, ctrl) = setup(&device, &model, &memory, &info, &opts)?;
        let wanted_pairs = opts.active_pairs.unwrap_or(index(pairs.len()));
        // On failure from here on, the driver's drop resets the device and frees
        // the buffers.
        let mut driver = NetDriver {
            device,
            model,
            memory,
            mac: Mutex::new(info.mac),
            info,
            pairs,
            ctrl,
            active: AtomicU16::new(1),
            control_timeout: opts.control_timeout,
        };
        // Buffers are posted before DRIVER_OK (§5.1.5 step 3) and announced after
        // it: a driver must not notify before DRIVER_OK (§3.1.1).
        let mut notify = Vec::new();
        for p in &driver.pairs {
            let n = lock(&p.rx).refill()?;
            notify.push(n);
        }
        driver.device.driver_ok()?;
        for (k, n) in notify.into_iter().enumerate() {
            if let Some(next) = n {
                driver.device.notify(index(2 * k), next)?;
            }
        }
        // §5.1.5 step 4: only pair 0 is used until VQ_PAIRS_SET.
        if wanted_pairs != 1 {
            driver.set_queue_pairs(wanted_pairs)?;
        }
        driver.device.finish();
        Ok(driver)
    }

    /// What the device offers, as negotiated and configured.
    pub fn info(&self) -> &NetInfo {
        &self.info
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        self.device.transport()
    }

    /// The sharing model.
    pub fn model(&self) -> &D {
        &self.model
    }

    /// The guest memory the buffers live in.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Queue pairs in use: 1 until a VQ_PAIRS_SET succeeded.
    pub fn queue_pairs(&self) -> u16 {
        self.active.load(Ordering::Acquire)
    }

    /// Queue pairs set up (at most [`NetInfo::max_queue_pairs`]): how many
    /// [`Self::set_queue_pairs`] may make active.
    pub fn configured_pairs(&self) -> u16 {
        index(self.pairs.len())
    }

    /// The MAC address in use: the device's (MAC negotiated), or the last one
    /// [`Self::set_mac`] set.
    pub fn mac(&self) -> Option<[u8; 6]> {
        *lock(&self.mac)
    }

    /// Whether the link is up: the configuration's status (STATUS negotiated, read
    /// now), else always.
    pub fn link_up(&self) -> bool {
        if !self.info.status {
            return true;
        }
        let mut raw = [0u8; 2];
        let off = std::mem::offset_of!(NetConfig, status);
        match virtio_core::lifecycle::read_config(self.transport(), off, &mut raw) {
            Ok(()) => u16::from_le_bytes(raw) & VIRTIO_NET_S_LINK_UP != 0,
            Err(_) => false,
        }
    }

    /// Why a queue stopped working, if one did (receive queues first, then
    /// transmit queues, then the control queue).
    pub fn broken(&self) -> Option<Broken> {
        let rx = self.pairs.iter().find_map(|p| lock(&p.rx).broken());
        let tx = || self.pairs.iter().find_map(|p| lock(&p.tx).broken());
        let ctrl = || self.ctrl.as_ref().and_then(|c| lock(&c.queue).broken());
        rx.or_else(tx).or_else(ctrl)
    }

    /// Receive counters, summed over every pair.
    pub fn rx_stats(&self) -> RxStats {
        let mut sum = RxStats::default();
        for p in &self.pairs {
            sum.add(&lock(&p.rx).stats);
        }
        sum
    }

    /// Frames the device has taken back from the transmit queues so far
    /// (reclaimed), summed over every pair.
    pub fn tx_completed(&self) -> u64 {
        self.pairs.iter().map(|p| lock(&p.tx).completed).sum()
    }

    // ---- control queue ----

    /// Makes pairs `0..n` the ones in use (VQ_PAIRS_SET, §5.1.6.5.5) and waits for
    /// the device's answer. Shrinking takes effect for [`Self::send_on`] before
    /// the command is sent (the driver "MUST NOT queue packets on transmit queues
    /// greater than virtqueue_pairs" from then on); receive queues past `n` keep
    /// what they already hold and can still be polled.
    ///
    /// # Errors
    /// [`NetError::NotNegotiated`] without MQ; [`NetError::QueuePairs`] for 0 or
    /// more than [`Self::configured_pairs`] (checked here: the driver MUST NOT
    /// ask for them); the errors of [`Self::control`].
    pub fn set_queue_pairs(&self, n: u16) -> Result<(), NetError> {
        if !NetFeatures::from_bits_retain(self.info.features).contains(NetFeatures::MQ) {
            return Err(NetError::NotNegotiated(NetFeatures::MQ));
        }
        let max = self.configured_pairs();
        if n == 0 || n > max {
            return Err(NetError::QueuePairs { wanted: n, max });
        }
        let before = self.active.fetch_min(n, Ordering::AcqRel);
        match self.command(CtrlCommand::VqPairs(n)) {
            Ok(()) => {
                self.active.store(n, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                // Refused: the device keeps the old count. (After a timeout the
                // device may still apply it; the smaller count is safe either way.)
                if !matches!(e, NetError::ControlTimeout) {
                    self.active.store(before, Ordering::Release);
                }
                Err(e)
            }
        }
    }

    /// Turns promiscuous receive on or off (CTRL_RX, §5.1.6.5.1).
    ///
    /// # Errors
    /// [`NetError::NotNegotiated`] without CTRL_RX; the errors of [`Self::control`].
    pub fn set_promisc(&self, on: bool) -> Result<(), NetError> {
        self.need(NetFeatures::CTRL_RX)?;
        self.command(CtrlCommand::Promisc(on))
    }

    /// Turns all-multicast receive on or off (CTRL_RX, §5.1.6.5.1).
    ///
    /// # Errors
    /// [`NetError::NotNegotiated`] without CTRL_RX; the errors of [`Self::control`].
    pub fn set_allmulti(&self, on: bool) -> Result<(), NetError> {
        self.need(NetFeatures::CTRL_RX)?;
        self.command(CtrlCommand::AllMulti(on))
    }

    /// Sets the device's default MAC address (CTRL_MAC_ADDR, §5.1.6.5.2); on
    /// success [`Self::mac`] reports it and the caller sends from it.
    ///
    /// # Errors
    /// [`NetError::NotNegotiated`] without CTRL_MAC_ADDR; the errors of
    /// [`Self::control`].
    pub fn set_mac(&self, mac: [u8; 6]) -> Result<(), NetError> {
        self.need(NetFeatures::CTRL_MAC_ADDR)?;
        self.command(CtrlCommand::MacAddr(mac))?;
        *lock(&self.mac) = Some(mac);
        Ok(())
    }

    /// Sends any control command, `class` and `command` followed by `data`, and
    /// waits for the answer; nothing is checked but that it fits a command slot.
    /// For commands this driver has no method for, and for testing how a device
    /// copes with what a driver must not send.
    ///
    /// # Errors
    /// [`NetError::NotNegotiated`] without CTRL_VQ; [`NetError::ControlTooLong`];
    /// [`NetError::CommandRefused`] if the device answered anything but
    /// VIRTIO_NET_OK or nothing; [`NetError::ControlTimeout`];
    /// [`NetError::QueueFull`] while every slot is held by a command that timed
    /// out; [`NetError::DeviceBroken`].
    pub fn control(&self, class: u8, command: u8, data: &[u8]) -> Result<(), NetError> {
        let mut bytes = Vec::with_capacity(2 + data.len());
        bytes.extend_from_slice(VirtioNetCtrlHdr { class, command }.as_bytes());
        bytes.extend_from_slice(data);
        self.send_command(class, command, &bytes)
    }

    /// Sends a whole command (header and data) and waits for the answer.
    fn send_command(&self, class: u8, command: u8, bytes: &[u8]) -> Result<(), NetError> {
        let Some(ctrl) = &self.ctrl else {
            return Err(NetError::NotNegotiated(NetFeatures::CTRL_VQ));
        };
        let data_len = bytes.len().saturating_sub(size_of::<VirtioNetCtrlHdr>());
        if data_len > MAX_DATA {
            return Err(NetError::ControlTooLong(data_len));
        }
        // Held until the answer: commands take effect in the order issued.
        let mut q = lock(&ctrl.queue);
        let (slot, notify) = q.send(&self.memory, bytes)?;
        if let Some(next) = notify {
            self.device.notify(ctrl.index, next)?;
        }
        let deadline = Instant::now() + self.control_timeout;
        let answer = loop {
            if let Some(a) = q.answer(&self.memory, slot)? {
                break a;
            }
            let Some(left) = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
            else {
                tracing::warn!(class, command, "control command timed out");
                return Err(NetError::ControlTimeout);
            };
            // Sleep only with notifications on and the ring re-checked empty.
            if !q.ring.enable_notifications() {
                ctrl.irq.wait(Some(left.min(WAIT_SLICE)))?;
            }
            q.ring.disable_notifications();
        };
        match answer {
            Answer::Ack(ack) if CtrlAck::parse(ack) == Ok(CtrlAck::Ok) => Ok(()),
            Answer::Ack(ack) => Err(NetError::CommandRefused {
                class,
                command,
                ack: Some(ack),
            }),
            Answer::NoAck => Err(NetError::CommandRefused {
                class,
                command,
                ack: None,
            }),
        }
    }

    /// Sends a command this driver has a method for, emitted by the wire module.
    fn command(&self, cmd: CtrlCommand<'_>) -> Result<(), NetError> {
        let mut bytes = Vec::new();
        cmd.emit(&mut bytes);
        let hdr = cmd.header();
        self.send_command(hdr.class, hdr.command, &bytes)
    }

    fn need(&self, f: NetFeatures) -> Result<(), NetError> {
        if NetFeatures::from_bits_retain(self.info.features).contains(f) {
            Ok(())
        } else {
            Err(NetError::NotNegotiated(f))
        }
    }

    // ---- transmit ----

    /// Sends one Ethernet frame (destination MAC first) on pair 0 with an empty
    /// header: the frame is copied into a transmit slot, so `frame` is free on
    /// return. Completed slots are reclaimed first.
    ///
    /// # Errors
    /// [`NetError::FrameTooShort`], [`NetError::FrameTooLong`] (checked here),
    /// [`NetError::QueueFull`] (retry later, or use [`Self::send_blocking`]),
    /// [`NetError::DeviceBroken`].
    pub fn send(&self, frame: &[u8]) -> Result<(), NetError> {
        self.send_on(0, frame)
    }

    /// [`Self::send`] on the transmit queue of `pair`.
    ///
    /// # Errors
    /// As [`Self::send`]; [`NetError::NoPair`] unless `pair` is below
    /// [`Self::queue_pairs`].
    pub fn send_on(&self, pair: u16, frame: &[u8]) -> Result<(), NetError> {
        self.check_len(frame)?;
        self.transmit(pair, &[VirtioNetHdr::default().as_bytes(), frame])
    }

    /// Sends a frame on pair 0 whose checksum the device completes (CSUM,
    /// §5.1.6.2): the 16-bit field at `csum_start + csum_offset` must hold the
    /// pseudo-header sum ([`virtio_core::net::ipv4_pseudo_header_sum`]).
    ///
    /// # Errors
    /// As [`Self::send`], and [`NetError::BadChecksumRequest`] without CSUM or with
    /// a field outside the frame.
    pub fn send_partial_csum(&self, frame: &[u8], csum_start: u16, csum_offset: u16) -> Result<(), NetError> {
        self.check_len(frame)?;
        let hdr = VirtioNetHdr::partial_csum(csum_start, csum_offset);
        let features = NetFeatures::from_bits_retain(self.info.features);
        match virtio_core::net::check_tx_header(&hdr, frame.len(), features) {
            Ok(Some(_)) => self.transmit(0, &[hdr.as_bytes(), frame]),
            _ => Err(NetError::BadChecksumRequest),
        }
    }

    /// Sends `bytes` on pair 0 as the whole transmit buffer, header included,
    /// without any check but that it fits a slot: for testing how a device copes
    /// with what a hostile guest sends (HOSTILE rule 28).
    ///
    /// # Errors
    /// [`NetError::FrameTooLong`] past the slot, and as [`Self::send`].
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), NetError> {
        let max = VirtioNetHdr::SIZE + self.info.max_frame();
        if bytes.len() > max {
            return Err(NetError::FrameTooLong {
                len: bytes.len(),
                max,
            });
        }
        self.transmit(0, &[bytes])
    }

    /// [`Self::send`], waiting up to `timeout` (`None`: forever) for a free slot.
    ///
    /// # Errors
    /// As [`Self::send`]; [`NetError::QueueFull`] when the time is up.
    pub fn send_blocking(&self, frame: &[u8], timeout: Option<Duration>) -> Result<(), NetError> {
        self.send_blocking_on(0, frame, timeout)
    }

    /// [`Self::send_blocking`] on the transmit queue of `pair`.
    ///
    /// # Errors
    /// As [`Self::send_on`]; [`NetError::QueueFull`] when the time is up.
    pub fn send_blocking_on(
        &self,
        pair: u16,
        frame: &[u8],
        timeout: Option<Duration>,
    ) -> Result<(), NetError> {
        // The clock is read only once the queue is found full: most sends find room.
        let mut deadline = None;
        loop {
            match self.send_on(pair, frame) {
                Err(NetError::QueueFull) => {}
                other => return other,
            }
            let deadline =
                *deadline.get_or_insert_with(|| timeout.and_then(|t| Instant::now().checked_add(t)));
            let slice = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(r) if !r.is_zero() => r.min(WAIT_SLICE),
                    _ => return Err(NetError::QueueFull),
                },
                None => WAIT_SLICE,
            };
            self.wait_tx(pair, slice)?;
        }
    }

    /// Takes back the transmit slots the device is done with, on every pair.
    ///
    /// # Errors
    /// [`NetError::DeviceBroken`].
    pub fn reclaim_tx(&self) -> Result<(), NetError> {
        self.pairs.iter().try_for_each(|p| lock(&p.tx).reclaim())
    }

    /// Waits up to `timeout` for the device to finish transmit buffers of `pair`,
    /// after a send found no room: no free slot, or (with a bounce area or grant
    /// entries) no room in the sharing model, which also comes back only with
    /// finished buffers. Returns at once if some were finished since.
    fn wait_tx(&self, pair: u16, timeout: Duration) -> Result<(), NetError> {
        let p = self.tx_pair(pair)?;
        {
            let mut tx = lock(&p.tx);
            let before = tx.completed;
            tx.reclaim()?;
            if tx.completed != before || tx.arm() {
                tx.disarm();
                return Ok(());
            }
        }
        p.tx_irq.wait(Some(timeout))?;
        lock(&p.tx).disarm();
        Ok(())
    }

    fn tx_pair(&self, pair: u16) -> Result<&Pair<D::Share, T::Interrupt>, NetError> {
        if pair >= self.queue_pairs() {
            return Err(NetError::NoPair(pair));
        }
        self.pairs.get(usize::from(pair)).ok_or(NetError::NoPair(pair))
    }

    fn rx_pair(&self, pair: u16) -> Result<&Pair<D::Share, T::Interrupt>, NetError> {
        self.pairs.get(usize::from(pair)).ok_or(NetError::NoPair(pair))
    }

    fn check_len(&self, frame: &[u8]) -> Result<(), NetError> {
        let max = self.info.max_frame();
        if frame.len() < ETH_HDR_LEN {
            return Err(NetError::FrameTooShort(frame.len()));
        }
        if frame.len() > max {
            return Err(NetError::FrameTooLong {
                len: frame.len(),
                max,
            });
        }
        Ok(())
    }

    fn transmit(&self, pair: u16, parts: &[&[u8]]) -> Result<(), NetError> {
        let p = self.tx_pair(pair)?;
        let notify = lock(&p.tx).send(&self.memory, parts)?;
        if let Some(next) = notify {
            self.device.notify(2 * pair + 1, next)?;
        }
        Ok(())
    }

    // ---- receive ----

    /// Hands up to `budget` frames received on pair 0 (Ethernet header first,
    /// virtio header stripped, checksum completed) to `f`, then re-posts the
    /// buffers. NAPI-style: used-buffer notifications are off while the ring is
    /// drained and back on, with a re-check, once it is empty; if the budget runs
    /// out first they stay off and the caller polls again. Returns the frames
    /// handled (frames the device's header made unusable are dropped, counted in
    /// [`Self::rx_stats`], and count against the budget).
    ///
    /// # Errors
    /// [`NetError::DeviceBroken`] if the device broke the queue (HOSTILE rule 31).
    pub fn poll_recv(&self, budget: usize, f: impl FnMut(&[u8])) -> Result<usize, NetError> {
        self.poll_recv_on(0, budget, f)
    }

    /// [`Self::poll_recv`] on the receive queue of `pair`.
    ///
    /// # Errors
    /// As [`Self::poll_recv`]; [`NetError::NoPair`] unless `pair` is below
    /// [`Self::configured_pairs`].
    pub fn poll_recv_on(
        &self,
        pair: u16,
        budget: usize,
        mut f: impl FnMut(&[u8]),
    ) -> Result<usize, NetError> {
        let p = self.rx_pair(pair)?;
        let mode = RxMode {
            mrg_rxbuf: self.info.mrg_rxbuf,
            guest_csum: self.info.guest_csum,
            max_frame: self.info.max_frame(),
        };
        let mut rx = lock(&p.rx);
        let handled = rx.poll(&self.memory, mode, budget, &mut f)?;
        let notify = rx.refill()?;
        drop(rx);
        if let Some(next) = notify {
            self.device.notify(2 * pair, next)?;
        }
        Ok(handled)
    }

    /// Blocks until frames received on pair 0 may be waiting or `timeout` passes
    /// (`None`: forever). Returns `true` if woken by the device (or frames were
    /// already there), `false` on timeout; poll in either case.
    ///
    /// # Errors
    /// [`NetError::DeviceBroken`]; a failing interrupt source.
    pub fn wait_rx(&self, timeout: Option<Duration>) -> Result<bool, NetError> {
        self.wait_rx_on(0, timeout)
    }

    /// [`Self::wait_rx`] on the receive queue of `pair`.
    ///
    /// # Errors
    /// As [`Self::wait_rx`]; [`NetError::NoPair`] unless `pair` is below
    /// [`Self::configured_pairs`].
    pub fn wait_rx_on(&self, pair: u16, timeout: Option<Duration>) -> Result<bool, NetError> {
        let p = self.rx_pair(pair)?;
        {
            let mut rx = lock(&p.rx);
            if let Some(b) = rx.broken() {
                return Err(NetError::DeviceBroken(b));
            }
            // Notifications may have been left off by a poll that ran out of
            // budget: turn them on, and don't sleep if frames are already there.
            if rx.ring.enable_notifications() {
                return Ok(true);
            }
        }
        Ok(p.rx_irq.wait(timeout)? > 0)
    }
}

/// What [`setup`] makes: the pairs and the control queue.
type Queues<S, I> = (Vec<Pair<S, I>>, Option<Ctrl<S, I>>);

/// Guest allocations made during setup, freed together if setup fails (the device
/// never saw DRIVER_OK, so it touched nothing).
struct Allocs<'a> {
    memory: &'a GuestMemory,
    made: Vec<(u64, u64)>,
}

impl Allocs<'_> {
    fn alloc(&mut self, bytes: u64) -> Result<u64, NetError> {
        let base = self.memory.alloc(bytes, 64)?;
        self.made.push((base, bytes));
        Ok(base)
    }

    fn free_all(&mut self) {
        for (base, bytes) in self.made.drain(..) {
            let _ = self.memory.free(base, bytes);
        }
    }
}

/// Creates the queues of every pair to use and the control queue, with their
/// buffers and interrupts; on failure frees the buffers it allocated.
fn setup<D: DriverModel, T: Transport>(
    device: &DeviceGuard<T>,
    model: &D,
    memory: &GuestMemory,
    info: &NetInfo,
    opts: &NetOptions,
) -> Result<Queues<D::Share, T::Interrupt>, NetError> {
    if opts.queue_pairs == 0 {
        return Err(NetError::QueuePairs {
            wanted: 0,
            max: info.max_queue_pairs,
        });
    }
    let n_pairs = usize::from(opts.queue_pairs.min(info.max_queue_pairs));
    let ctrl_index = match (info.ctrl_vq, info.ctrl_queue()) {
        (true, None) => return Err(NetError::BadQueuePairs(info.max_queue_pairs)),
        (_, c) => c,
    };
    let mut allocs = Allocs {
        memory,
        made: Vec::new(),
    };
    let mut build = || -> Result<Queues<D::Share, T::Interrupt>, NetError> {
        let mut pairs = Vec::with_capacity(n_pairs);
        for k in 0..n_pairs {
            let (rxi, txi) = (index(2 * k), index(2 * k + 1));
            let rx = device.queue(model, rxi, opts.queue_size, MIN_QUEUE_SIZE)?;
            let tx = device.queue(model, txi, opts.queue_size, MIN_QUEUE_SIZE)?;
            let rx_base = allocs.alloc(u64::from(info.rx_buf_len) * u64::from(rx.size))?;
            let slot_len = info.tx_slot_len();
            let tx_base = allocs.alloc(u64::from(slot_len) * u64::from(tx.size))?;
            device.setup_queue(rxi, rx.size, rx.addrs)?;
            device.setup_queue(txi, tx.size, tx.addrs)?;
            pairs.push(Pair {
                rx: Mutex::new(RxQueue::new(rx.ring, rx_base, info.rx_buf_len, info.max_frame())),
                tx: Mutex::new(TxQueue::new(tx.ring, tx_base, slot_len)),
                rx_irq: rx.interrupt,
                tx_irq: tx.interrupt,
            });
        }
        let ctrl = match ctrl_index {
            Some(index) => {
                let q = device.queue(model, index, CTRL_QUEUE_SIZE, MIN_QUEUE_SIZE)?;
                let base = allocs.alloc(u64::from(SLOT_LEN) * u64::from(q.size))?;
                device.setup_queue(index, q.size, q.addrs)?;
                Some(Ctrl {
                    queue: Mutex::new(CtrlQueue::new(q.ring, base)),
                    index,
                    irq: q.interrupt,
                })
            }
            None => None,
        };
        Ok((pairs, ctrl))
    };
    let built = build();
    if built.is_err() {
        allocs.free_all();
    }
    built
}

impl<D: DriverModel, T: Transport> Drop for NetDriver<D, T> {
    /// Resets the device and, once it reports status 0 (it no longer touches guest
    /// memory, §2.4), takes every buffer back and frees them. If the device never
    /// acknowledged the reset, the memory is leaked rather than handed back while
    /// the device may still write it.
    fn drop(&mut self) {
        let (pairs, ctrl, memory) = (&self.pairs, &self.ctrl, &*self.memory);
        self.device.shutdown(|| {
            for p in pairs {
                let mut rx = lock(&p.rx);
                rx.teardown();
                free(memory, rx.base(), rx.bytes());
                let mut tx = lock(&p.tx);
                tx.teardown();
                free(memory, tx.base(), tx.bytes());
            }
            if let Some(c) = ctrl {
                let mut q = lock(&c.queue);
                q.teardown();
                free(memory, q.base(), q.bytes());
            }
        });
    }
}

fn free(memory: &GuestMemory, base: u64, bytes: u64) {
    if let Err(error) = memory.free(base, bytes) {
        tracing::error!(%error, "freeing network buffers failed");
    }
}

/// Reads MAC, status, queue pairs and MTU under one generation (§2.5.1), in
/// naturally aligned pieces; a shorter configuration space reads as zeroes past
/// its end.
fn read_config(device: &DeviceGuard<impl Transport>) -> Result<NetConfig, SetupError> {
    const LEN: usize = 12;
    let mut raw = [0u8; NetConfig::SIZE];
    device.read_config(&mut raw[..LEN], |t, buf| {
        t.read_config(0, &mut buf[..6]);
        for off in (6..LEN).step_by(2) {
            t.read_config(off, &mut buf[off..off + 2]);
        }
    })?;
    Ok(NetConfig::read_from_bytes(&raw).unwrap_or_default())
}
