//! The driver: device initialization, sending, NAPI-style receiving, waiting.

use crate::error::{Broken, NetError};
use crate::info::{NetInfo, NetOptions};
use crate::rx::{RxMode, RxQueue, RxStats};
use crate::tx::TxQueue;
use hypervisor::GuestMemory;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use virtio_core::DriverModel;
use virtio_core::features::Features;
use virtio_core::lifecycle::{driver_ok, initialize, reset};
use virtio_core::net::{ETH_HDR_LEN, NET_DEPENDENCIES, NetConfig, VIRTIO_NET_S_LINK_UP, VirtioNetHdr};
use virtio_core::notify::{EventFdNotifier, Wait};
use virtio_core::ring::split::SplitDriver;
use virtio_core::status::DeviceStatus;
use virtio_core::transport::Transport;
use zerocopy::{FromBytes, IntoBytes};

/// Receive queue index of the first (only) queue pair (§5.1.2).
pub const RX_QUEUE: u16 = 0;
/// Transmit queue index of the first (only) queue pair (§5.1.2).
pub const TX_QUEUE: u16 = 1;

/// Smallest queue the driver uses.
const MIN_QUEUE_SIZE: u16 = 2;

/// Longest a blocked sender sleeps before it re-checks the ring: an interrupt
/// consumed elsewhere costs latency, never a hang.
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// A virtio-net driver over transport `T` and sharing model `D`, with interrupt
/// sources `W` (an [`EventFdNotifier`] by default).
///
/// Methods take `&self`: receive and transmit have a lock each, so one thread may
/// send while another receives.
pub struct NetDriver<D: DriverModel, T: Transport, W: Wait = EventFdNotifier> {
    transport: T,
    model: D,
    memory: Arc<GuestMemory>,
    info: NetInfo,
    rx: Mutex<RxQueue<D::Share>>,
    tx: Mutex<TxQueue<D::Share>>,
    rx_irq: W,
    tx_irq: W,
}

impl<D: DriverModel, T: Transport, W: Wait> std::fmt::Debug for NetDriver<D, T, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDriver")
            .field("model", &self.model.name())
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn lock<Q>(m: &Mutex<Q>) -> MutexGuard<'_, Q> {
    // Every method leaves the queue consistent before anything could panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The queue size to use: the largest power of two within both limits.
fn queue_size(transport: &impl Transport, index: u16, wanted: u16) -> Result<u16, NetError> {
    let max = transport.queue_max_size(index).min(wanted);
    if max < MIN_QUEUE_SIZE {
        return Err(NetError::NoQueue(index));
    }
    Ok(1u16 << (15 - max.leading_zeros()))
}

impl<D: DriverModel, T: Transport, W: Wait> NetDriver<D, T, W> {
    /// Initializes the device behind `transport` (virtio 1.2 §3.1.1, §5.1.5):
    /// negotiates what `opts` wants, reads MAC, status and MTU, creates receive
    /// queue 0 and transmit queue 1 through `model`, allocates their buffers in
    /// `memory` (the guest's own), fills the receive queue and sets DRIVER_OK.
    /// `interrupts` are the used-buffer notifications of queue 0 and queue 1.
    ///
    /// # Errors
    /// Initialization, configuration, queue setup or allocation failures; the device
    /// is then marked FAILED and everything allocated is freed.
    pub fn new(
        transport: T,
        model: D,
        memory: Arc<GuestMemory>,
        interrupts: Vec<W>,
        opts: NetOptions,
    ) -> Result<Self, NetError> {
        let given = interrupts.len();
        let mut irqs = interrupts.into_iter();
        let (Some(rx_irq), Some(tx_irq)) = (irqs.next(), irqs.next()) else {
            return Err(NetError::MissingInterrupts(given));
        };
        let features = initialize(
            &transport,
            virtio_core::net::DEVICE_ID,
            opts.wanted,
            NET_DEPENDENCIES,
        )?;
        let fail = |t: &T| {
            let status = t.status();
            t.set_status(status | DeviceStatus::FAILED.bits());
        };
        let queues = NetInfo::new(features, &read_config(&transport)?, &opts)
            .and_then(|info| setup(&transport, &model, &memory, features, info, &opts));
        let (info, rx, tx) = match queues {
            Ok(q) => q,
            Err(e) => {
                fail(&transport);
                return Err(e);
            }
        };
        let driver = NetDriver {
            transport,
            model,
            memory,
            info,
            rx: Mutex::new(rx),
            tx: Mutex::new(tx),
            rx_irq,
            tx_irq,
        };
        // Buffers are posted before DRIVER_OK (§5.1.5 step 3) and announced after
        // it: a driver must not notify before DRIVER_OK (§3.1.1).
        let notify = lock(&driver.rx).refill();
        let started = notify.and_then(|n| {
            driver_ok(&driver.transport)?;
            if n {
                driver.transport.notify_queue(RX_QUEUE)?;
            }
            Ok(())
        });
        match started {
            Ok(()) => Ok(driver),
            Err(e) => {
                fail(&driver.transport);
                // Drop resets the device and frees the buffers.
                Err(e)
            }
        }
    }

    /// What the device offers, as negotiated and configured.
    pub fn info(&self) -> &NetInfo {
        &self.info
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The sharing model.
    pub fn model(&self) -> &D {
        &self.model
    }

    /// The guest memory the buffers live in.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Whether the link is up: the configuration's status (STATUS negotiated, read
    /// now), else always.
    pub fn link_up(&self) -> bool {
        if !self.info.status {
            return true;
        }
        let mut raw = [0u8; 2];
        let off = std::mem::offset_of!(NetConfig, status);
        match virtio_core::lifecycle::read_config(&self.transport, off, &mut raw) {
            Ok(()) => u16::from_le_bytes(raw) & VIRTIO_NET_S_LINK_UP != 0,
            Err(_) => false,
        }
    }

    /// Why a queue stopped working, if one did (receive first).
    pub fn broken(&self) -> Option<Broken> {
        lock(&self.rx).broken().or(lock(&self.tx).broken())
    }

    /// Receive counters.
    pub fn rx_stats(&self) -> RxStats {
        lock(&self.rx).stats
    }

    /// Frames the device has taken back from the transmit queue so far (reclaimed).
    pub fn tx_completed(&self) -> u64 {
        lock(&self.tx).completed
    }

    // ---- transmit ----

    /// Sends one Ethernet frame (destination MAC first) with an empty header: the
    /// frame is copied into a transmit slot, so `frame` is free on return. Completed
    /// slots are reclaimed first.
    ///
    /// # Errors
    /// [`NetError::FrameTooShort`], [`NetError::FrameTooLong`] (checked here),
    /// [`NetError::QueueFull`] (retry later, or use [`Self::send_blocking`]),
    /// [`NetError::DeviceBroken`].
    pub fn send(&self, frame: &[u8]) -> Result<(), NetError> {
        self.check_len(frame)?;
        self.transmit(&[VirtioNetHdr::default().as_bytes(), frame])
    }

    /// Sends a frame whose checksum the device completes (CSUM, §5.1.6.2): the
    /// 16-bit field at `csum_start + csum_offset` must hold the pseudo-header sum
    /// ([`virtio_core::net::ipv4_pseudo_header_sum`]).
    ///
    /// # Errors
    /// As [`Self::send`], and [`NetError::BadChecksumRequest`] without CSUM or with
    /// a field outside the frame.
    pub fn send_partial_csum(&self, frame: &[u8], csum_start: u16, csum_offset: u16) -> Result<(), NetError> {
        self.check_len(frame)?;
        let hdr = VirtioNetHdr::partial_csum(csum_start, csum_offset);
        let features = virtio_core::net::NetFeatures::from_bits_retain(self.info.features);
        match virtio_core::net::check_tx_header(&hdr, frame.len(), features) {
            Ok(Some(_)) => self.transmit(&[hdr.as_bytes(), frame]),
            _ => Err(NetError::BadChecksumRequest),
        }
    }

    /// Sends `bytes` as the whole transmit buffer, header included, without any
    /// check but that it fits a slot: for testing how a device copes with what a
    /// hostile guest sends (HOSTILE rule 28).
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
        self.transmit(&[bytes])
    }

    /// [`Self::send`], waiting up to `timeout` (`None`: forever) for a free slot.
    ///
    /// # Errors
    /// As [`Self::send`]; [`NetError::QueueFull`] when the time is up.
    pub fn send_blocking(&self, frame: &[u8], timeout: Option<Duration>) -> Result<(), NetError> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            match self.send(frame) {
                Err(NetError::QueueFull) => {}
                other => return other,
            }
            let slice = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(r) if !r.is_zero() => r.min(WAIT_SLICE),
                    _ => return Err(NetError::QueueFull),
                },
                None => WAIT_SLICE,
            };
            self.wait_tx(slice)?;
        }
    }

    /// Takes back the transmit slots the device is done with.
    ///
    /// # Errors
    /// [`NetError::DeviceBroken`].
    pub fn reclaim_tx(&self) -> Result<(), NetError> {
        lock(&self.tx).reclaim()
    }

    /// Waits up to `timeout` for the device to finish a transmit buffer.
    fn wait_tx(&self, timeout: Duration) -> Result<(), NetError> {
        {
            let mut tx = lock(&self.tx);
            tx.reclaim()?;
            if tx.free_slots() > 0 || tx.arm() {
                tx.disarm();
                return Ok(());
            }
        }
        self.tx_irq.wait(Some(timeout))?;
        lock(&self.tx).disarm();
        Ok(())
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

    fn transmit(&self, parts: &[&[u8]]) -> Result<(), NetError> {
        let notify = lock(&self.tx).send(&self.memory, parts)?;
        if notify {
            self.transport.notify_queue(TX_QUEUE)?;
        }
        Ok(())
    }

    // ---- receive ----

    /// Hands up to `budget` received frames (Ethernet header first, virtio header
    /// stripped, checksum completed) to `f`, then re-posts the buffers. NAPI-style:
    /// used-buffer notifications are off while the ring is drained and back on,
    /// with a re-check, once it is empty; if the budget runs out first they stay
    /// off and the caller polls again. Returns the frames handled (frames the
    /// device's header made unusable are dropped, counted in [`Self::rx_stats`],
    /// and count against the budget).
    ///
    /// # Errors
    /// [`NetError::DeviceBroken`] if the device broke the queue (HOSTILE rule 31).
    pub fn poll_recv(&self, budget: usize, mut f: impl FnMut(&[u8])) -> Result<usize, NetError> {
        let mode = RxMode {
            mrg_rxbuf: self.info.mrg_rxbuf,
            guest_csum: self.info.guest_csum,
            max_frame: self.info.max_frame(),
        };
        let mut rx = lock(&self.rx);
        let handled = rx.poll(&self.memory, mode, budget, &mut f)?;
        let notify = rx.refill()?;
        drop(rx);
        if notify {
            self.transport.notify_queue(RX_QUEUE)?;
        }
        Ok(handled)
    }

    /// Blocks until received frames may be waiting or `timeout` passes (`None`:
    /// forever). Returns `true` if woken by the device (or frames were already
    /// there), `false` on timeout; poll in either case.
    ///
    /// # Errors
    /// [`NetError::DeviceBroken`]; a failing interrupt source.
    pub fn wait_rx(&self, timeout: Option<Duration>) -> Result<bool, NetError> {
        {
            let mut rx = lock(&self.rx);
            if let Some(b) = rx.broken() {
                return Err(NetError::DeviceBroken(b));
            }
            // Notifications may have been left off by a poll that ran out of
            // budget: turn them on, and don't sleep if frames are already there.
            if rx.ring.enable_notifications() {
                return Ok(true);
            }
        }
        Ok(self.rx_irq.wait(timeout)? > 0)
    }
}

/// What [`setup`] makes.
type Queues<S> = (NetInfo, RxQueue<S>, TxQueue<S>);

/// Creates both queues and their buffers; on failure frees what it allocated (the
/// device never saw DRIVER_OK, so it touched nothing).
fn setup<D: DriverModel>(
    transport: &impl Transport,
    model: &D,
    memory: &GuestMemory,
    features: u64,
    info: NetInfo,
    opts: &NetOptions,
) -> Result<Queues<D::Share>, NetError> {
    let ring_features = Features::from_bits_retain(features);
    let make = |index: u16| -> Result<(u16, SplitDriver<D::Share, u16>, _), NetError> {
        let size = queue_size(transport, index, opts.queue_size)?;
        let dq = model.create_queue(index, size)?;
        let ring = SplitDriver::new(size, dq.ring, dq.share, ring_features)?;
        Ok((size, ring, dq.addrs))
    };
    let (rx_size, rx_ring, rx_addrs) = make(RX_QUEUE)?;
    let (tx_size, tx_ring, tx_addrs) = make(TX_QUEUE)?;
    let rx_bytes = u64::from(info.rx_buf_len) * u64::from(rx_size);
    let slot_len = info.tx_slot_len();
    let tx_bytes = u64::from(slot_len) * u64::from(tx_size);
    let rx_base = memory.alloc(rx_bytes, 64)?;
    let tx_base = match memory.alloc(tx_bytes, 64) {
        Ok(b) => b,
        Err(e) => {
            let _ = memory.free(rx_base, rx_bytes);
            return Err(e.into());
        }
    };
    let rx = RxQueue::new(rx_ring, rx_base, info.rx_buf_len, info.max_frame());
    let tx = TxQueue::new(tx_ring, tx_base, slot_len);
    let registered = transport
        .setup_queue(RX_QUEUE, rx_size, rx_addrs)
        .and_then(|()| transport.setup_queue(TX_QUEUE, tx_size, tx_addrs));
    if let Err(e) = registered {
        let _ = memory.free(rx_base, rx_bytes);
        let _ = memory.free(tx_base, tx_bytes);
        return Err(e.into());
    }
    Ok((info, rx, tx))
}

impl<D: DriverModel, T: Transport, W: Wait> Drop for NetDriver<D, T, W> {
    /// Resets the device and, once it reports status 0 (it no longer touches guest
    /// memory, §2.4), takes every buffer back and frees them. If the device never
    /// acknowledges the reset, the memory is leaked rather than handed back while
    /// the device may still write it.
    fn drop(&mut self) {
        if let Err(error) = reset(&self.transport) {
            tracing::error!(%error, "device did not reset; leaking its buffer memory");
            return;
        }
        let mut rx = lock(&self.rx);
        rx.teardown();
        free(&self.memory, rx.base(), rx.bytes());
        let mut tx = lock(&self.tx);
        tx.teardown();
        free(&self.memory, tx.base(), tx.bytes());
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
fn read_config(t: &impl Transport) -> Result<NetConfig, NetError> {
    const LEN: usize = 12;
    let mut raw = [0u8; NetConfig::SIZE];
    virtio_core::config::read_consistent(
        || t.config_generation(),
        |buf| {
            t.read_config(0, &mut buf[..6]);
            for off in (6..LEN).step_by(2) {
                t.read_config(off, &mut buf[off..off + 2]);
            }
        },
        &mut raw[..LEN],
    )?;
    Ok(NetConfig::read_from_bytes(&raw).unwrap_or_default())
}
