//! [`VhostUserTransport`]: the virtio [`Transport`] of a driver whose device is a
//! vhost-user back-end in another process.
//!
//! vhost-user has no device status register, so the front-end keeps the status
//! itself (a [`StatusMachine`], as a device would) and turns its transitions into
//! messages, the way QEMU's vhost-user devices do:
//!
//! | driver action            | messages                                                     |
//! |--------------------------|--------------------------------------------------------------|
//! | connect                  | GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER, GET_CONFIG |
//! | FEATURES_OK              | SET_FEATURES, SET_MEM_TABLE (the guest memfd)                |
//! | `setup_queue`            | SET_VRING_NUM, SET_VRING_BASE (the format's start), SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL |
//! | DRIVER_OK                | SET_VRING_ENABLE(1) per set-up queue                         |
//! | reset (status 0)         | GET_VRING_BASE per started queue (it stops the ring)         |
//! | config generation / read | GET_CONFIG of the whole space, served from a cache           |
//! | config write             | SET_CONFIG, only for fields the options declare writable     |
//!
//! Any socket error, timeout or malformed reply breaks the connection for good: the
//! first error is kept ([`VhostUserTransport::broken`]), the status reads
//! DEVICE_NEEDS_RESET, and a reset that cannot confirm (GET_VRING_BASE) that the
//! back-end stopped a ring leaves the status non-zero, so a driver keeps its ring
//! memory rather than reuse what the back-end may still write.

use crate::channel::Channel;
use crate::error::VhostUserError;
use crate::protocol::{
    FrontendReq, MAX_CONFIG_SIZE, ProtocolFeatures, VHOST_FEATURES, VhostUserVirtioFeatures,
};
use hypervisor::GuestMemory;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use vhost::vhost_user::message::{
    VhostUserConfig, VhostUserConfigFlags, VhostUserInflight, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserVringAddr, VhostUserVringAddrFlags, VhostUserVringState,
};
use virtio_core::QueueAddrs;
use virtio_core::features::Features;
use virtio_core::lifecycle::{ControlPlane, QueueError};
use virtio_core::notify::{EventFdNotifier, Notify, Wait};
use virtio_core::ring::areas::{RingAreas, RingFormat};
use virtio_core::ring::queue::{fresh_position, vring_base};
use virtio_core::status::{DeviceStatus, FeaturesVerdict, StatusChange, StatusMachine};
use virtio_core::transport::{Transport, TransportError};
use vm_memory::ByteValued;

/// `VHOST_USER_F_PROTOCOL_FEATURES` in the virtio feature word (bit 30, unused by
/// virtio). Negotiating it enables protocol features and makes rings start disabled
/// until SET_VRING_ENABLE.
pub(crate) const F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// `VHOST_SET_CONFIG_TYPE_FRONTEND` (0): a configuration access from the driver, not
/// from a migration. Not the crate's `VhostUserConfigFlags::WRITABLE`, which is 1, the
/// protocol's `VHOST_SET_CONFIG_TYPE_MIGRATION`.
const CONFIG_TYPE_FRONTEND: VhostUserConfigFlags = VhostUserConfigFlags::empty();

/// Bytes of [`VhostUserConfig`] before the configuration space in GET/SET_CONFIG.
const CONFIG_HEADER: usize = size_of::<VhostUserConfig>();

/// Most queues a back-end may report; each costs two eventfds here.
pub const MAX_QUEUES: u16 = 256;

/// What the front-end needs to know that vhost-user does not say: which device is
/// behind the socket, and how its configuration space looks.
#[derive(Debug, Clone)]
pub struct VhostUserOptions {
    /// The virtio device id (§5), reported to the driver as is.
    pub device_id: u32,
    /// Bytes of configuration space to read with GET_CONFIG (at most 256).
    pub config_len: usize,
    /// Configuration ranges the device type lets the driver write. Writes elsewhere
    /// are ignored here: some back-ends (libvhost-user's) drop the connection on a
    /// SET_CONFIG they refuse.
    pub writable_config: Vec<Range<usize>>,
    /// The largest queue the driver may ask for. vhost-user has no way to ask the
    /// back-end; QEMU's vhost-user-blk uses 128 by default and libvhost-user takes
    /// up to 1024.
    pub queue_max_size: u16,
    /// Limit on each request's round trip.
    pub timeout: Duration,
    /// Ask the back-end to track the requests it holds in a buffer this
    /// front-end keeps (INFLIGHT_SHMFD, where offered), so a back-end restarted
    /// after a crash finishes them.
    pub inflight: bool,
    /// When the back-end goes away, connect again to the same socket every
    /// `reconnect` and restore the session on the new back-end: the same
    /// features, memory table, inflight buffer and rings, as QEMU does with a
    /// chardev's `reconnect-ms`. The driver notices nothing but the pause; the
    /// back-end resubmits what the dead one held. Only with inflight tracking
    /// negotiated (without it, restarting a ring can run a request twice or lose
    /// one); otherwise, and with `None`, a lost back-end breaks the transport.
    pub reconnect: Option<Duration>,
}

impl VhostUserOptions {
    /// A virtio-blk back-end: the 72-byte configuration space of virtio 1.2 §5.2.4,
    /// with `writeback` (offset 32, CONFIG_WCE) writable.
    #[allow(clippy::single_range_in_vec_init, reason = "a list of one writable field")]
    pub fn blk() -> Self {
        const WRITEBACK: usize = 32;
        VhostUserOptions {
            device_id: virtio_core::blk::DEVICE_ID,
            config_len: virtio_core::blk::BlkConfig::SIZE,
            writable_config: vec![WRITEBACK..WRITEBACK + 1],
            queue_max_size: 256,
            timeout: Duration::from_secs(5),
            inflight: true,
            reconnect: None,
        }
    }
}

/// What the back-end offered when the front-end connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendInfo {
    /// GET_FEATURES as sent, with `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30).
    pub features: u64,
    /// GET_PROTOCOL_FEATURES.
    pub protocol_features: ProtocolFeatures,
    /// The protocol features this front-end accepted (MQ, CONFIG and REPLY_ACK
    /// where offered, and INFLIGHT_SHMFD if the options ask for it).
    pub acked_protocol_features: ProtocolFeatures,
    /// GET_QUEUE_NUM (1 without MQ).
    pub queues: u16,
}

/// A virtio transport whose device is a vhost-user back-end. The driver's memory is
/// one [`GuestMemory`] memfd, handed to the back-end in SET_MEM_TABLE.
pub struct VhostUserTransport {
    inner: Arc<Mutex<Inner>>,
    shared: Arc<Shared>,
    /// With [`VhostUserOptions::reconnect`]: the thread that watches the socket and
    /// restores the session, and its stop flag.
    monitor: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

/// What never changes for the transport's life, shared with the reconnect monitor.
pub(crate) struct Shared {
    pub(crate) memory: Arc<GuestMemory>,
    pub(crate) backend: BackendInfo,
    pub(crate) opts: VhostUserOptions,
    pub(crate) path: PathBuf,
    /// Written by [`Transport::notify_queue`]; the back-end waits on it.
    kicks: Vec<EventFdNotifier>,
    /// Written by the back-end; the driver waits on it.
    calls: Vec<EventFdNotifier>,
}

impl Drop for VhostUserTransport {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.monitor.take() {
            stop.store(true, Ordering::Release);
            let _ = thread.join();
        }
    }
}

pub(crate) struct Inner {
    pub(crate) channel: Channel,
    pub(crate) machine: StatusMachine,
    pub(crate) driver_features: u64,
    pub(crate) queues: Vec<QueueSlot>,
    config: Vec<u8>,
    generation: u32,
    pub(crate) broken: Option<Arc<VhostUserError>>,
    /// The back-end's inflight buffer (its description and file), from
    /// FEATURES_OK until a reset.
    pub(crate) inflight: Option<(VhostUserInflight, OwnedFd)>,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct QueueSlot {
    /// Size and addresses were sent.
    pub(crate) set_up: bool,
    /// The ring's format, size and addresses, for a reconnect.
    pub(crate) ring: Option<(RingFormat, u16, QueueAddrs)>,
    /// SET_VRING_KICK was sent (libvhost-user starts the ring then): a reset must
    /// stop it with GET_VRING_BASE.
    started: bool,
}

impl std::fmt::Debug for VhostUserTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserTransport")
            .field("backend", &self.shared.backend)
            .field("device_id", &self.shared.opts.device_id)
            .finish_non_exhaustive()
    }
}

impl VhostUserTransport {
    /// Connects to the back-end listening at `path` and learns what it offers. The
    /// driver's rings and buffers must live in `memory`.
    ///
    /// # Errors
    /// The socket, a request or its reply failed; the back-end lacks
    /// PROTOCOL_FEATURES or the CONFIG protocol feature (there is no other way to
    /// read the configuration space); a queue count of 0 or above [`MAX_QUEUES`].
    pub fn connect(
        path: &Path,
        memory: Arc<GuestMemory>,
        opts: VhostUserOptions,
    ) -> Result<Self, VhostUserError> {
        if opts.config_len > MAX_CONFIG_SIZE {
            return Err(VhostUserError::ConfigTooLarge(opts.config_len));
        }
        let mut channel = Channel::connect(path, opts.timeout)?;
        let (features, offered, acked, queues) = handshake(&mut channel, |offered| {
            if !offered.contains(ProtocolFeatures::CONFIG) {
                return Err(VhostUserError::Missing("the CONFIG protocol feature"));
            }
            let mut wanted = ProtocolFeatures::MQ | ProtocolFeatures::CONFIG | ProtocolFeatures::REPLY_ACK;
            if opts.inflight {
                wanted |= ProtocolFeatures::INFLIGHT_SHMFD;
            }
            Ok(offered & wanted)
        })?;
        let config = get_config(&mut channel, opts.config_len)?;
        let kicks = (0..queues)
            .map(|_| EventFdNotifier::new())
            .collect::<Result<Vec<_>, _>>()?;
        let calls = (0..queues)
            .map(|_| EventFdNotifier::new())
            .collect::<Result<Vec<_>, _>>()?;
        let backend = BackendInfo {
            features,
            protocol_features: offered,
            acked_protocol_features: acked,
            queues,
        };
        tracing::debug!(?backend, "vhost-user back-end connected");
        let inner = Arc::new(Mutex::new(Inner {
            channel,
            machine: StatusMachine::new(),
            driver_features: 0,
            queues: vec![QueueSlot::default(); usize::from(queues)],
            config,
            generation: 0,
            broken: None,
            inflight: None,
        }));
        let shared = Arc::new(Shared {
            memory,
            backend,
            opts,
            path: path.to_path_buf(),
            kicks,
            calls,
        });
        let monitor = match shared.opts.reconnect {
            Some(every) if acked.contains(ProtocolFeatures::INFLIGHT_SHMFD) => {
                let stop = Arc::new(AtomicBool::new(false));
                let (i, s, st) = (inner.clone(), shared.clone(), stop.clone());
                let thread = std::thread::Builder::new()
                    .name("vio-vu-reconnect".into())
                    .spawn(move || crate::reconnect::monitor(&i, &s, &st, every))
                    .map_err(VhostUserError::Socket)?;
                Some((stop, thread))
            }
            Some(_) => {
                tracing::warn!("the back-end does not track requests in flight: no reconnect");
                None
            }
            None => None,
        };
        Ok(VhostUserTransport {
            inner,
            shared,
            monitor,
        })
    }

    /// What the back-end offered.
    pub fn backend(&self) -> &BackendInfo {
        &self.shared.backend
    }

    /// The guest memory shared with the back-end.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.shared.memory
    }

    /// The error that broke the connection, if one did.
    pub fn broken(&self) -> Option<Arc<VhostUserError>> {
        self.lock().broken.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every path leaves the state consistent before anything could panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Status 0: stop every started ring, then forget the session. If a ring cannot
    /// be confirmed stopped the status stays as it is, with DEVICE_NEEDS_RESET.
    fn reset(&self, st: &mut Inner) {
        let Inner {
            channel,
            queues,
            broken,
            machine,
            driver_features,
            ..
        } = st;
        for (i, slot) in queues.iter_mut().enumerate() {
            if !slot.started {
                continue;
            }
            if broken.is_some() {
                break;
            }
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            match stop_ring(channel, index) {
                Ok(next) => {
                    tracing::debug!(index, next, "ring stopped");
                    slot.started = false;
                }
                Err(e) => latch(broken, e),
            }
        }
        if let Some(error) = broken.as_deref()
            && queues.iter().any(|q| q.started)
        {
            tracing::error!(%error, "cannot confirm the back-end stopped its rings; reset refused");
            machine.set_needs_reset();
            return;
        }
        queues.fill(QueueSlot::default());
        // Stale notifications of the old session must not wake the next one.
        for fd in self.shared.kicks.iter().chain(&self.shared.calls) {
            let _ = fd.take();
        }
        *driver_features = 0;
        // A reset device starts with a new buffer (QEMU's vhost-user-blk too).
        st.inflight = None;
        let _ = machine.write(0, || FeaturesVerdict::Refuse);
    }
}

impl Shared {
    /// FEATURES_OK: the back-end learns the features and the memory, and with
    /// INFLIGHT_SHMFD makes its inflight buffer (kept in `inflight`) and gets it
    /// back, as QEMU's vhost-user-blk does before starting rings. Refused without
    /// a message if the driver accepted features that were not offered.
    pub(crate) fn features_ok(
        &self,
        channel: &mut Channel,
        features: u64,
        inflight: &mut Option<(VhostUserInflight, OwnedFd)>,
    ) -> Result<FeaturesVerdict, VhostUserError> {
        if features & !(self.backend.features & !VHOST_FEATURES) != 0 {
            tracing::warn!(features, "driver accepted features the back-end does not offer");
            return Ok(FeaturesVerdict::Refuse);
        }
        self.features_and_memory(channel, features)?;
        self.inflight_buffer(channel, inflight)?;
        Ok(FeaturesVerdict::Accept)
    }

    /// SET_FEATURES and SET_MEM_TABLE.
    pub(crate) fn features_and_memory(
        &self,
        channel: &mut Channel,
        features: u64,
    ) -> Result<(), VhostUserError> {
        // Rings start disabled with PROTOCOL_FEATURES; DRIVER_OK enables them.
        let with_protocol = features | F_PROTOCOL_FEATURES;
        channel.send(FrontendReq::SET_FEATURES, &with_protocol.to_ne_bytes(), &[])?;
        let mem = &self.memory;
        // One region, the whole memfd. The protocol wants each region in two
        // numberings: guest physical addresses (what descriptors hold) and the
        // front-end's "user addresses" (what SET_VRING_ADDR holds). A driver here
        // has only guest addresses, so both numberings are the guest addresses and
        // SET_VRING_ADDR carries the rings' guest addresses.
        let region = VhostUserMemoryRegion::new(mem.base(), mem.size(), mem.base(), 0);
        let mut body = VhostUserMemory::new(1).as_slice().to_vec();
        body.extend_from_slice(region.as_slice());
        channel.send(FrontendReq::SET_MEM_TABLE, &body, &[mem.fd()])?;
        Ok(())
    }

    /// With INFLIGHT_SHMFD: hands the back-end its inflight buffer (SET_INFLIGHT_FD),
    /// first asking for a new one (GET_INFLIGHT_FD) unless `inflight` holds the
    /// buffer of this device's session already (a reconnect).
    pub(crate) fn inflight_buffer(
        &self,
        channel: &mut Channel,
        inflight: &mut Option<(VhostUserInflight, OwnedFd)>,
    ) -> Result<(), VhostUserError> {
        if !self
            .backend
            .acked_protocol_features
            .contains(ProtocolFeatures::INFLIGHT_SHMFD)
        {
            return Ok(());
        }
        if let Some((got, fd)) = inflight {
            channel.send(FrontendReq::SET_INFLIGHT_FD, got.as_slice(), &[fd.as_fd()])?;
            return Ok(());
        }
        {
            let ask = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: self.backend.queues,
                queue_size: self.opts.queue_max_size,
            };
            let request = FrontendReq::GET_INFLIGHT_FD;
            let (reply, fd) = channel.call_with_fd(request, ask.as_slice())?;
            let got = VhostUserInflight::from_slice(&reply)
                .copied()
                .filter(|g| g.mmap_size != 0)
                .ok_or(VhostUserError::BadReply {
                    request,
                    reason: "not an inflight description of a non-empty buffer",
                })?;
            channel.send(FrontendReq::SET_INFLIGHT_FD, got.as_slice(), &[fd.as_fd()])?;
            tracing::debug!(size = got.mmap_size, "inflight buffer from the back-end");
            *inflight = Some((got, fd));
        }
        Ok(())
    }

    /// Sends one queue's registers and eventfds, in QEMU's order; the ring starts
    /// at position `at` (its format's start for a fresh ring).
    pub(crate) fn start_queue(
        &self,
        channel: &mut Channel,
        slot: &mut QueueSlot,
        (index, at): (u16, u16),
        (format, size): (RingFormat, u16),
        addrs: QueueAddrs,
    ) -> Result<(), VhostUserError> {
        let ring = u32::from(index);
        let state = |num| VhostUserVringState::new(ring, num);
        channel.send(FrontendReq::SET_VRING_NUM, state(u32::from(size)).as_slice(), &[])?;
        let base = vring_base(format, at);
        channel.send(FrontendReq::SET_VRING_BASE, state(base).as_slice(), &[])?;
        // No VHOST_VRING_F_LOG: no dirty logging.
        let addr = VhostUserVringAddr::new(
            ring,
            VhostUserVringAddrFlags::empty(),
            addrs.desc,
            addrs.used,
            addrs.avail,
            0,
        );
        channel.send(FrontendReq::SET_VRING_ADDR, addr.as_slice(), &[])?;
        slot.set_up = true;
        slot.started = true;
        slot.ring = Some((format, size, addrs));
        let i = usize::from(index);
        channel.send(
            FrontendReq::SET_VRING_KICK,
            &u64::from(index).to_ne_bytes(),
            &[self.kicks[i].as_fd()],
        )?;
        channel.send(
            FrontendReq::SET_VRING_CALL,
            &u64::from(index).to_ne_bytes(),
            &[self.calls[i].as_fd()],
        )?;
        Ok(())
    }
}

/// A connection's first messages, at connect and at a reconnect: GET_FEATURES
/// (which must offer `VHOST_USER_F_PROTOCOL_FEATURES`), GET_PROTOCOL_FEATURES,
/// SET_PROTOCOL_FEATURES with what `accept` makes of the offer, GET_QUEUE_NUM with
/// MQ (1 without), SET_OWNER. Returns the features, the protocol features offered
/// and accepted, and the queue count.
pub(crate) fn handshake(
    channel: &mut Channel,
    accept: impl FnOnce(ProtocolFeatures) -> Result<ProtocolFeatures, VhostUserError>,
) -> Result<(u64, ProtocolFeatures, ProtocolFeatures, u16), VhostUserError> {
    let features = channel.call_u64(FrontendReq::GET_FEATURES)?;
    if features & F_PROTOCOL_FEATURES == 0 {
        return Err(VhostUserError::Missing("VHOST_USER_F_PROTOCOL_FEATURES"));
    }
    let offered = ProtocolFeatures::from_bits_retain(channel.call_u64(FrontendReq::GET_PROTOCOL_FEATURES)?);
    let acked = accept(offered)?;
    channel.send(
        FrontendReq::SET_PROTOCOL_FEATURES,
        &acked.bits().to_ne_bytes(),
        &[],
    )?;
    channel.set_reply_ack(acked.contains(ProtocolFeatures::REPLY_ACK));
    let queues = if acked.contains(ProtocolFeatures::MQ) {
        let n = channel.call_u64(FrontendReq::GET_QUEUE_NUM)?;
        match u16::try_from(n) {
            Ok(q @ 1..=MAX_QUEUES) => q,
            _ => return Err(VhostUserError::BadQueueCount(n)),
        }
    } else {
        1
    };
    channel.send(FrontendReq::SET_OWNER, &[], &[])?;
    Ok((features, offered, acked, queues))
}

/// Keeps the first error that broke the connection.
pub(crate) fn latch(broken: &mut Option<Arc<VhostUserError>>, error: VhostUserError) {
    if broken.is_none() {
        tracing::error!(%error, "vhost-user connection broken");
        *broken = Some(Arc::new(error));
    }
}

/// GET_VRING_BASE: stops ring `index` and returns the next available index it
/// would have read.
fn stop_ring(channel: &mut Channel, index: u32) -> Result<u32, VhostUserError> {
    let request = FrontendReq::GET_VRING_BASE;
    let body = channel.call(request, VhostUserVringState::new(index, 0).as_slice())?;
    let reply = VhostUserVringState::from_slice(&body).ok_or(VhostUserError::BadReply {
        request,
        reason: "body is not a vring state",
    })?;
    // The crate's `VhostBackend::get_vring_base` does not make this check.
    if { reply.index } != index {
        return Err(VhostUserError::BadReply {
            request,
            reason: "it names another ring",
        });
    }
    Ok(reply.num)
}

/// GET_CONFIG of the first `len` bytes. Always from offset 0: qemu-storage-daemon
/// (like QEMU's own front-end) ignores the offset and copies from the start.
fn get_config(channel: &mut Channel, len: usize) -> Result<Vec<u8>, VhostUserError> {
    let request = FrontendReq::GET_CONFIG;
    let size = u32::try_from(len).map_err(|_| VhostUserError::ConfigTooLarge(len))?;
    let header = VhostUserConfig::new(0, size, CONFIG_TYPE_FRONTEND);
    let mut body = header.as_slice().to_vec();
    body.resize(CONFIG_HEADER + len, 0);
    let reply = channel.call(request, &body)?;
    if reply.is_empty() {
        // libvhost-user's way of saying the device could not produce it.
        return Err(VhostUserError::Refused { request, code: 0 });
    }
    let bad = |reason| VhostUserError::BadReply { request, reason };
    let (head, data) = reply
        .split_at_checked(CONFIG_HEADER)
        .ok_or(bad("shorter than its header"))?;
    let head = VhostUserConfig::from_slice(head).ok_or(bad("shorter than its header"))?;
    if { head.offset } != 0 || { head.size } != size || data.len() != len {
        return Err(bad("it describes another range"));
    }
    Ok(data.to_vec())
}

impl ControlPlane for VhostUserTransport {
    fn device_id(&self) -> u32 {
        self.shared.opts.device_id
    }

    fn config_len(&self) -> usize {
        self.shared.opts.config_len
    }

    fn device_features(&self) -> u64 {
        // Bits 26 and 30 are vhost's, not the device's.
        self.shared.backend.features & !VHOST_FEATURES
    }

    fn set_driver_features(&self, features: u64) {
        let mut st = self.lock();
        let status = st.machine.status();
        if !status.contains(DeviceStatus::DRIVER) || status.contains(DeviceStatus::FEATURES_OK) {
            tracing::warn!(features, status = status.bits(), "driver features write refused");
            return;
        }
        st.driver_features = features;
    }

    fn status(&self) -> u8 {
        let mut st = self.lock();
        if st.broken.is_none()
            && let Err(e) = st.channel.probe()
        {
            latch(&mut st.broken, e);
        }
        // A reset completed before the break leaves 0; anything after it needs one.
        if st.broken.is_some() && st.machine.read() != 0 {
            st.machine.set_needs_reset();
        }
        st.machine.read()
    }

    fn set_status(&self, status: u8) {
        let mut guard = self.lock();
        if status == 0 {
            self.reset(&mut guard);
            return;
        }
        let st = &mut *guard;
        let mut error = None;
        let verdict = || {
            if st.broken.is_some() {
                return FeaturesVerdict::Refuse;
            }
            self.shared
                .features_ok(&mut st.channel, st.driver_features, &mut st.inflight)
                .unwrap_or_else(|e| {
                    error = Some(e);
                    FeaturesVerdict::Refuse
                })
        };
        let change = st.machine.write(status, verdict);
        if let Some(e) = error {
            latch(&mut st.broken, e);
        }
        match change {
            Ok(StatusChange::Added(added)) if added.contains(DeviceStatus::DRIVER_OK) => {
                for (index, slot) in (0u32..).zip(&st.queues) {
                    if !slot.set_up || st.broken.is_some() {
                        continue;
                    }
                    let on = VhostUserVringState::new(index, 1);
                    if let Err(e) = st.channel.send(FrontendReq::SET_VRING_ENABLE, on.as_slice(), &[]) {
                        latch(&mut st.broken, e);
                    }
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, status, "status write refused"),
        }
        if st.broken.is_some() {
            st.machine.set_needs_reset();
        }
    }

    fn config_generation(&self) -> u32 {
        // vhost-user has no generation counter: fetch the whole space and count a
        // generation whenever it differs from the last fetch, so a read between
        // two generation reads is consistent (§2.5.1).
        let mut st = self.lock();
        if st.broken.is_none() {
            match get_config(&mut st.channel, self.shared.opts.config_len) {
                Ok(config) if config != st.config => {
                    st.config = config;
                    st.generation = st.generation.wrapping_add(1);
                }
                Ok(_) => {}
                Err(e) => latch(&mut st.broken, e),
            }
        }
        st.generation
    }

    fn read_config(&self, offset: usize, buf: &mut [u8]) {
        let st = self.lock();
        match offset
            .checked_add(buf.len())
            .and_then(|end| st.config.get(offset..end))
        {
            Some(bytes) => buf.copy_from_slice(bytes),
            None => buf.fill(0),
        }
    }

    fn write_config(&self, offset: usize, data: &[u8]) {
        let end = offset.checked_add(data.len());
        let writable = self
            .shared
            .opts
            .writable_config
            .iter()
            .any(|r| offset >= r.start && end.is_some_and(|e| e <= r.end));
        if !writable || data.is_empty() {
            tracing::debug!(
                offset,
                len = data.len(),
                "config write ignored: not a writable field"
            );
            return;
        }
        let mut st = self.lock();
        if st.broken.is_some() {
            return;
        }
        // The protocol carries u32 offsets; a field declared past that is not sent.
        let (Ok(off), Ok(size)) = (u32::try_from(offset), u32::try_from(data.len())) else {
            return;
        };
        let header = VhostUserConfig::new(off, size, CONFIG_TYPE_FRONTEND);
        let mut body = header.as_slice().to_vec();
        body.extend_from_slice(data);
        let result = st
            .channel
            .send(FrontendReq::SET_CONFIG, &body, &[])
            .and_then(|()| get_config(&mut st.channel, self.shared.opts.config_len));
        match result {
            Ok(config) => {
                if config != st.config {
                    st.config = config;
                    st.generation = st.generation.wrapping_add(1);
                }
            }
            Err(e) => latch(&mut st.broken, e),
        }
    }
}

impl Transport for VhostUserTransport {
    type Interrupt = EventFdNotifier;

    fn num_queues(&self) -> u16 {
        self.shared.backend.queues
    }

    fn queue_max_size(&self, index: u16) -> u16 {
        if index < self.shared.backend.queues {
            self.shared.opts.queue_max_size
        } else {
            0
        }
    }

    fn setup_queue(&self, index: u16, size: u16, addrs: QueueAddrs) -> Result<(), TransportError> {
        if index >= self.shared.backend.queues {
            return Err(TransportError::NoSuchQueue(index));
        }
        let refused = |source| TransportError::QueueRefused { index, source };
        let mut guard = self.lock();
        let st = &mut *guard;
        let status = st.machine.status();
        let closed = DeviceStatus::DRIVER_OK | DeviceStatus::FAILED | DeviceStatus::DEVICE_NEEDS_RESET;
        if !status.contains(DeviceStatus::FEATURES_OK) || status.intersects(closed) || st.broken.is_some() {
            return Err(refused(QueueError::NotConfigurable {
                status: status.bits(),
            }));
        }
        let format = RingFormat::of(Features::from_bits_retain(st.driver_features));
        let slot = &mut st.queues[usize::from(index)];
        if slot.set_up {
            return Err(refused(QueueError::Enabled { index }));
        }
        let max = self.shared.opts.queue_max_size;
        if size > max {
            return Err(refused(QueueError::InvalidSize { size, max }));
        }
        let areas =
            RingAreas::new(format, size, addrs).map_err(|e| refused(QueueError::from_area(e, max)))?;
        // The back-end drops the connection on a ring outside the memory table;
        // catch that here with a reason.
        for s in areas.spans() {
            if self.shared.memory.offset_of(s.addr, s.len).is_none() {
                return Err(refused(QueueError::OutsideMemory {
                    area: s.area,
                    addr: s.addr,
                    len: s.len,
                }));
            }
        }
        // Where a fresh ring starts: index 0 (split); slot 0 with wrap counter 1 for
        // both the available and the used position (packed).
        let at = fresh_position(format);
        if let Err(e) = self
            .shared
            .start_queue(&mut st.channel, slot, (index, at), (format, size), addrs)
        {
            latch(&mut st.broken, e);
            st.machine.set_needs_reset();
            // The transport error has no place for the cause: it is in `broken()`
            // and the log; the status tells the driver the device needs a reset.
            return Err(refused(QueueError::NotConfigurable {
                status: st.machine.read(),
            }));
        }
        Ok(())
    }

    fn notify_queue(&self, index: u16) -> Result<(), TransportError> {
        let kick = self
            .shared
            .kicks
            .get(usize::from(index))
            .ok_or(TransportError::NoSuchQueue(index))?;
        Ok(kick.notify()?)
    }

    /// A handle on the eventfd sent in SET_VRING_CALL.
    fn interrupt(&self, index: u16) -> Result<EventFdNotifier, TransportError> {
        let call = self
            .shared
            .calls
            .get(usize::from(index))
            .ok_or(TransportError::NoSuchQueue(index))?;
        Ok(call.try_clone()?)
    }
}
