//! The vhost-user control plane: a frontend's messages turned into what our devices
//! already understand.
//!
//! vhost-user has no status register and no DRIVER_OK: the frontend (QEMU, another
//! VMM, or our own `transport-vhost-user`) negotiates with the guest itself, then
//! tells the backend the features, the memory, and each ring's size, addresses,
//! starting position and eventfds, and starts and stops rings one by one. Our
//! devices ([`VhostUserDevice`]) are started with a set of queues and stopped as a
//! whole, so the session keeps each ring's state and restarts the device with the
//! rings that are ready whenever that set changes. A restart drains: requests in
//! flight finish and are returned to the guest before the rings stop, and each ring
//! resumes where it stopped, so nothing acknowledged or submitted is lost.
//!
//! A ring is ready when it has a size, addresses, a kick eventfd and is enabled
//! (with `VHOST_USER_F_PROTOCOL_FEATURES` rings start disabled until
//! SET_VRING_ENABLE; without it, a kick eventfd enables them). GET_VRING_BASE stops
//! the ring and returns where it stopped (vhost-user spec, "Starting and stopping
//! rings").
//!
//! Everything the frontend sends is checked: ring indices and sizes, features
//! against those offered, addresses against the memory table, configuration
//! offsets; a refused message gets an error reply where the protocol has one
//! (REPLY_ACK, an empty GET_CONFIG reply) and the session goes on (HOSTILE 38);
//! only a refused request whose reply cannot say so (GET_VRING_BASE) or a message
//! the `vhost` crate cannot parse ends the connection. Never a panic.

use crate::vhost_user::inflight::{InflightBuffer, InflightBufferError, Shape};
use crate::vhost_user::memory::{MemoryError, MemoryTable, RegionSpec, VhostMemory};
use std::fs::File;
use std::os::fd::OwnedFd;
use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut};
use virtio_core::QueueAddrs;
use virtio_core::features::Features;
use virtio_core::lifecycle::DeviceLifecycle;
use virtio_core::notify::EventFdNotifier;
use virtio_core::ring::SplitLayout;
use virtio_core::ring::areas::RingFormat;
use virtio_core::ring::queue::{fresh_position, position_in_vring_base, vring_base};
use virtio_core::transport::{ActiveQueue, DeviceHandler};

/// A device a vhost-user daemon can serve: a [`DeviceHandler`] that also describes
/// itself and can stop its queues without a reset.
pub trait VhostUserDevice: DeviceHandler {
    /// Offered features, configuration space and queue maximum sizes.
    fn lifecycle(&self) -> DeviceLifecycle;

    /// Stops every queue after finishing and returning the requests in flight,
    /// keeping the device's own state; returns `(queue index, next available-ring
    /// position)` for each queue that was running.
    fn stop_queues(&mut self) -> Vec<(u16, u16)>;

    /// The vhost-user protocol features the device is served with (the session
    /// implements MQ, CONFIG and RESET_DEVICE; REPLY_ACK comes with any). An empty
    /// set leaves `VHOST_USER_F_PROTOCOL_FEATURES` unoffered: rings then start when
    /// their kick eventfd arrives and the frontend sends no SET_VRING_ENABLE.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        implemented_protocol()
    }
}

impl<V> VhostUserDevice for crate::blk::device::BlkDevice<V>
where
    V: virtio_core::DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    fn lifecycle(&self) -> DeviceLifecycle {
        crate::blk::device::BlkDevice::lifecycle(self)
    }

    fn stop_queues(&mut self) -> Vec<(u16, u16)> {
        crate::blk::device::BlkDevice::stop_queues(self)
    }
}

/// Why the session refused a message.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A ring index the device does not have.
    #[error("the device has no ring {0}")]
    NoSuchRing(u32),
    /// A ring size that is not a power of two up to the ring's maximum.
    #[error("ring {index} cannot have {size} entries (at most {max}, a power of two)")]
    BadRingSize {
        /// The ring.
        index: u32,
        /// The size asked for.
        size: u32,
        /// The ring's maximum.
        max: u16,
    },
    /// A ring position that does not fit a split ring's 16-bit index.
    #[error("ring {index} cannot start at {base}")]
    BadBase {
        /// The ring.
        index: u32,
        /// The position asked for.
        base: u32,
    },
    /// Ring state changed while the ring runs.
    #[error("ring {0} is running; stop it first")]
    RingRunning(u32),
    /// Features that were not offered.
    #[error("features {0:#x} were not offered")]
    Unoffered(u64),
    /// Protocol features that were not offered.
    #[error("protocol features {0:#x} were not offered")]
    UnofferedProtocol(u64),
    /// An inflight-buffer request without INFLIGHT_SHMFD negotiated.
    #[error("INFLIGHT_SHMFD was not negotiated")]
    NoInflight,
    /// The inflight buffer was refused.
    #[error("inflight buffer refused")]
    InflightBuffer(#[from] InflightBufferError),
    /// The memory table was refused.
    #[error("memory table refused")]
    Memory(#[from] MemoryError),
    /// A configuration-space access outside the space, or a write the device refuses.
    #[error("configuration access {offset}+{len} refused")]
    Config {
        /// Offset.
        offset: u32,
        /// Length.
        len: usize,
    },
    /// An eventfd could not be duplicated or made.
    #[error("eventfd")]
    EventFd(#[source] std::io::Error),
    /// A kick, call or error descriptor that is not an eventfd (HOSTILE 38).
    #[error("ring {0}'s descriptor is not an eventfd")]
    NotEventFd(u8),
    /// A request this backend does not implement.
    #[error("{0} is not supported")]
    Unsupported(&'static str),
}

impl From<SessionError> for VuError {
    fn from(e: SessionError) -> VuError {
        tracing::warn!(error = %e, "vhost-user request refused");
        VuError::ReqHandlerError(std::io::Error::other(e))
    }
}

/// The frontend's addresses of a ring's three areas.
#[derive(Debug, Clone, Copy)]
struct FrontendAddrs {
    desc: u64,
    avail: u64,
    used: u64,
}

/// What the session knows of one ring.
#[derive(Debug, Default)]
struct Ring {
    size: Option<u16>,
    addrs: Option<FrontendAddrs>,
    /// Where the ring resumes (SET_VRING_BASE, or where the device stopped); `None`
    /// until then: the format's start.
    next_avail: Option<u16>,
    kick: Option<EventFdNotifier>,
    call: Option<EventFdNotifier>,
    enabled: bool,
    /// Served by the device right now.
    running: bool,
}

/// One frontend's session with a device: the state vhost-user messages build up.
pub struct Session<D: VhostUserDevice> {
    device: D,
    memory: VhostMemory,
    lifecycle: DeviceLifecycle,
    offered: u64,
    /// What the device asked for of [`implemented_protocol`].
    protocol_offered: VhostUserProtocolFeatures,
    acked: u64,
    /// The frontend acknowledged `VHOST_USER_F_PROTOCOL_FEATURES`: rings then start
    /// disabled.
    protocol_acked: bool,
    protocol: VhostUserProtocolFeatures,
    rings: Vec<Ring>,
    /// The device is serving the rings marked `running`.
    active: bool,
    /// Where the device tracks the chains it holds (INFLIGHT_SHMFD).
    inflight: Option<InflightBuffer>,
    /// The last request was refused and its reply, which has no way to say so,
    /// was not sent: the frontend waits for it, so the connection must end.
    unanswered: bool,
}

impl<D: VhostUserDevice> std::fmt::Debug for Session<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("acked", &format_args!("{:#x}", self.acked))
            .field("rings", &self.rings)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// The protocol features the session implements (REPLY_ACK is added by the
/// `vhost` crate).
pub fn implemented_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

impl<D: VhostUserDevice> Session<D> {
    /// A session for `device`, which must open its queues through `memory`.
    pub fn new(device: D, memory: VhostMemory) -> Session<D> {
        let lifecycle = device.lifecycle();
        let protocol_offered = device.protocol_features() & implemented_protocol();
        let protocol_bit = if protocol_offered.is_empty() {
            0
        } else {
            VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        };
        // A kick is an eventfd here: it carries no notification data (§2.9).
        let offered = (lifecycle.device_features() & !Features::NOTIFICATION_DATA.bits()) | protocol_bit;
        let rings = (0..lifecycle.num_queues()).map(|_| Ring::default()).collect();
        Session {
            device,
            memory,
            lifecycle,
            offered,
            protocol_offered,
            acked: 0,
            protocol_acked: false,
            protocol: VhostUserProtocolFeatures::empty(),
            rings,
            active: false,
            inflight: None,
            unanswered: false,
        }
    }

    /// Whether the request just refused left the frontend waiting for a reply the
    /// protocol gives no way to refuse (GET_VRING_BASE of a ring that does not
    /// exist): the connection cannot go on then. Clears the mark.
    pub(crate) fn take_unanswered(&mut self) -> bool {
        std::mem::take(&mut self.unanswered)
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// Whether the frontend asked for REPLY_ACK (every request with NEED_REPLY
    /// then gets an acknowledgement).
    pub fn reply_ack(&self) -> bool {
        self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK)
    }

    /// Forgets the frontend: stops the device (finishing what is in flight), resets
    /// it, and drops the memory table and the protocol features. The next frontend
    /// starts from scratch.
    pub fn end(&mut self) {
        self.reset_device_state();
        self.memory.set(None);
        self.protocol = VhostUserProtocolFeatures::empty();
    }

    /// RESET_OWNER / RESET_DEVICE: every ring stopped (what was in flight finished
    /// first), the device reset, features and ring state forgotten. The connection's
    /// own state stays: the protocol features (the `vhost` crate keeps them too, and
    /// frontends do not send them again) and the memory table.
    fn reset_device_state(&mut self) {
        self.stop_device();
        self.device.reset();
        self.lifecycle = self.device.lifecycle();
        self.acked = 0;
        self.protocol_acked = false;
        self.rings.iter_mut().for_each(|r| *r = Ring::default());
        // The rings it tracked are gone: the frontend asks for a new one.
        self.inflight = None;
    }

    /// Inflight tracking needs INFLIGHT_SHMFD negotiated.
    fn inflight_allowed(&self) -> Result<(), SessionError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            return Err(SessionError::NoInflight);
        }
        Ok(())
    }

    /// What the inflight buffer must cover: every ring, each up to the largest
    /// size the device allows, in the ring format the acked features chose
    /// (frontends send SET_FEATURES before asking for the buffer).
    fn inflight_shape(&self) -> Shape {
        let capacity = (0..self.lifecycle.num_queues())
            .filter_map(|i| {
                u16::try_from(i)
                    .ok()
                    .and_then(|i| self.lifecycle.queue(i))
                    .map(|q| q.max_size)
            })
            .max()
            .unwrap_or(0);
        Shape {
            queues: self.rings.len(),
            capacity,
            format: RingFormat::of(Features::from_bits_retain(self.acked)),
        }
    }

    fn ring(&mut self, index: u32) -> Result<&mut Ring, SessionError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.rings.get_mut(i))
            .ok_or(SessionError::NoSuchRing(index))
    }

    fn idle_ring(&mut self, index: u32) -> Result<&mut Ring, SessionError> {
        let ring = self.ring(index)?;
        if ring.running {
            return Err(SessionError::RingRunning(index));
        }
        Ok(ring)
    }

    /// Stops the device if it runs, recording where each ring stopped.
    fn stop_device(&mut self) {
        if !self.active {
            return;
        }
        for (index, next_avail) in self.device.stop_queues() {
            if let Some(r) = self.rings.get_mut(usize::from(index)) {
                r.next_avail = Some(next_avail);
            }
        }
        self.rings.iter_mut().for_each(|r| r.running = false);
        self.active = false;
    }

    /// Restarts the device with the rings that are ready and can start now, if that
    /// set differs from the running one (or `force`: a running ring's eventfd or
    /// the features changed).
    fn restart(&mut self, force: bool) {
        let table = self.memory.table();
        let startable: Vec<_> = self
            .rings
            .iter()
            .map(|r| check_ring(r, table.as_deref()))
            .collect();
        let same = self
            .rings
            .iter()
            .zip(&startable)
            .all(|(r, s)| r.running == s.is_ok());
        if same && !force {
            return;
        }
        self.stop_device();
        let mut queues = Vec::new();
        for (i, (r, s)) in self.rings.iter().zip(startable).enumerate() {
            match s.and_then(|(size, addrs)| active_queue(i, r, size, addrs, self.inflight.as_ref())) {
                Ok(q) => queues.push(q),
                Err(StartError::NotReady) => {}
                Err(error) => tracing::warn!(ring = i, %error, "ring cannot start"),
            }
        }
        if queues.is_empty() {
            return;
        }
        let started: Vec<u16> = queues.iter().map(|q| q.index).collect();
        match self.device.activate(self.acked, queues) {
            Ok(()) => {
                for i in started {
                    self.rings[usize::from(i)].running = true;
                }
                self.active = true;
                tracing::debug!(rings = ?started_rings(&self.rings), "device started");
            }
            // Not an error yet: a device may need rings that are still being set
            // up (a net queue pair's second ring); it is tried again as they come.
            Err(error) => tracing::info!(%error, "device not started with the rings ready so far"),
        }
    }
}

fn started_rings(rings: &[Ring]) -> Vec<usize> {
    rings
        .iter()
        .enumerate()
        .filter(|(_, r)| r.running)
        .map(|(i, _)| i)
        .collect()
}

/// Why a ready ring could not be handed to the device.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("no memory table")]
    NoMemory,
    #[error("size, addresses, kick eventfd or enable missing")]
    NotReady,
    #[error("ring address {0:#x} is in no memory region")]
    Unmapped(u64),
    #[error("eventfd")]
    EventFd(#[source] virtio_core::notify::NotifyError),
    #[error("inflight region: {0}")]
    Inflight(String),
}

/// The ring's size and guest-physical addresses, if it has all it needs to start: a
/// size, addresses inside the memory table, a kick eventfd, and the enable.
fn check_ring(r: &Ring, table: Option<&MemoryTable>) -> Result<(u16, QueueAddrs), StartError> {
    let (Some(size), Some(a), true, true) = (r.size, r.addrs, r.kick.is_some(), r.enabled) else {
        return Err(StartError::NotReady);
    };
    let table = table.ok_or(StartError::NoMemory)?;
    let gpa = |va: u64| table.frontend_to_guest(va).ok_or(StartError::Unmapped(va));
    let addrs = QueueAddrs {
        desc: gpa(a.desc)?,
        avail: gpa(a.avail)?,
        used: gpa(a.used)?,
    };
    Ok((size, addrs))
}

/// Ring `i`, checked to have `size` and `addrs`, with its own copies of the eventfds
/// and its region of the inflight buffer, if there is one.
fn active_queue(
    i: usize,
    r: &Ring,
    size: u16,
    addrs: QueueAddrs,
    inflight: Option<&InflightBuffer>,
) -> Result<ActiveQueue, StartError> {
    let inflight = inflight
        .and_then(|b| b.region(i, size))
        .transpose()
        .map_err(StartError::Inflight)?;
    let kick = r.kick.as_ref().ok_or(StartError::NotReady)?;
    let kick = kick.try_clone().map_err(StartError::EventFd)?;
    // A ring without a call eventfd is polled by the frontend: signal an eventfd
    // nobody reads.
    let interrupt = match &r.call {
        Some(c) => c.try_clone(),
        None => EventFdNotifier::new(),
    }
    .map_err(StartError::EventFd)?;
    let layout = virtio_core::lifecycle::QueueLayout {
        size,
        desc: addrs.desc,
        avail: addrs.avail,
        used: addrs.used,
    };
    Ok(ActiveQueue {
        index: u16::try_from(i).unwrap_or(u16::MAX),
        layout,
        kick,
        interrupt,
        next_avail: r.next_avail,
        notification: None,
        inflight,
    })
}

/// Adopts ring `index`'s kick, call or error descriptor, which must be an eventfd
/// (HOSTILE 38): anything else breaks the workers that wait on it (a pipe whose
/// writer closed polls readable for ever, and a worker would spin on it).
fn eventfd(index: u8, fd: Option<File>) -> Result<Option<EventFdNotifier>, SessionError> {
    let Some(fd) = fd else {
        return Ok(None);
    };
    if !is_eventfd(&fd) {
        return Err(SessionError::NotEventFd(index));
    }
    EventFdNotifier::from_owned_fd(OwnedFd::from(fd))
        .map(Some)
        .map_err(|e| SessionError::EventFd(std::io::Error::other(e)))
}

/// Whether `fd` is an eventfd: the kernel names its anonymous inode
/// `anon_inode:[eventfd]` (fs/eventfd.c), which /proc shows as the link target.
fn is_eventfd(fd: &File) -> bool {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

impl<D: VhostUserDevice> VhostUserBackendReqHandlerMut for Session<D> {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset_device_state();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset_device_state();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let extra = features & !self.offered;
        if extra != 0 {
            return Err(SessionError::Unoffered(extra).into());
        }
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.protocol_acked = features & protocol_bit != 0;
        let acked = features & !protocol_bit;
        if !Features::from_bits_retain(acked).contains(Features::VERSION_1) {
            // Our rings and devices are virtio 1.x only (little-endian, no legacy
            // layouts).
            return Err(SessionError::Unoffered(Features::VERSION_1.bits()).into());
        }
        if acked != self.acked {
            self.acked = acked;
            // The frontend's SET_FEATURES is the device's FEATURES_OK.
            self.device.features_ok(acked);
            if self.active {
                self.restart(true);
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let specs: Vec<RegionSpec> = ctx
            .iter()
            .map(|r| RegionSpec {
                guest_phys_addr: r.guest_phys_addr,
                memory_size: r.memory_size,
                user_addr: r.user_addr,
                mmap_offset: r.mmap_offset,
            })
            .collect();
        let table = self.memory.map(&specs, files).map_err(SessionError::from)?;
        tracing::debug!(regions = specs.len(), bytes = table.bytes(), "memory table");
        // Rings must not run on a table that is about to go away.
        let was_active = self.active;
        self.stop_device();
        self.memory.set(Some(table));
        // Running rings restart on the new table; ready ones may start now.
        self.restart(was_active);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = self
            .lifecycle
            .queue(u16::try_from(index).unwrap_or(u16::MAX))
            .map(|q| q.max_size);
        // A split ring's size is a power of two; a packed one's need not be (§2.8).
        let packed = RingFormat::of(Features::from_bits_retain(self.acked)) == RingFormat::Packed;
        let ring = self.idle_ring(index)?;
        let max = max.unwrap_or(0);
        let size = u16::try_from(num)
            .ok()
            .filter(|&s| s != 0 && s <= max && (packed || SplitLayout::new(s).is_some()));
        ring.size = Some(size.ok_or(SessionError::BadRingSize {
            index,
            size: num,
            max,
        })?);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        // Addresses are checked against the memory table when the ring starts: the
        // table may arrive, or change, after them.
        self.idle_ring(index)?.addrs = Some(FrontendAddrs {
            desc: descriptor,
            avail: available,
            used,
        });
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let format = RingFormat::of(Features::from_bits_retain(self.acked));
        let ring = self.idle_ring(index)?;
        let at = position_in_vring_base(format, base).ok_or(SessionError::BadBase { index, base })?;
        ring.next_avail = Some(at);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        if let Err(e) = self.ring(index) {
            // The reply is a ring state, with no room for a refusal.
            self.unanswered = true;
            return Err(e.into());
        }
        // Stop the device (which drains every ring), then restart the others.
        self.stop_device();
        let format = RingFormat::of(Features::from_bits_retain(self.acked));
        let ring = self.ring(index)?;
        ring.kick = None;
        ring.enabled = false;
        let next = ring.next_avail.unwrap_or(fresh_position(format));
        self.restart(false);
        Ok(VhostUserVringState::new(index, vring_base(format, next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let kick = eventfd(index, fd)?;
        let starts_enabled = !self.protocol_acked;
        let ring = self.ring(u32::from(index))?;
        ring.kick = kick;
        // Without VHOST_USER_F_PROTOCOL_FEATURES a ring starts enabled.
        if starts_enabled {
            ring.enabled = ring.kick.is_some();
        }
        // A running ring waits on the new eventfd only after a restart.
        let running = ring.running;
        self.restart(running);
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let call = eventfd(index, fd)?;
        let ring = self.ring(u32::from(index))?;
        ring.call = call;
        let running = ring.running;
        // A running ring signals the new eventfd only after a restart.
        if running {
            self.restart(true);
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        // Ring errors show in the device's logs and as a stopped ring; nothing is
        // signalled on this eventfd, but it must be one all the same.
        eventfd(index, fd)?;
        self.ring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(self.protocol_offered)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let allowed = self.protocol_offered | VhostUserProtocolFeatures::REPLY_ACK;
        let extra = features & !allowed.bits();
        if extra != 0 {
            return Err(SessionError::UnofferedProtocol(extra).into());
        }
        self.protocol = VhostUserProtocolFeatures::from_bits_truncate(features);
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.rings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.ring(index)?.enabled = enable;
        self.restart(false);
        Ok(())
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        let lifecycle = &mut self.lifecycle;
        self.device.config_changes(&mut |off, bytes| {
            if let Err(error) = lifecycle.update_config(off, bytes) {
                tracing::warn!(%error, off, "device config change does not fit the config space");
            }
        });
        let refused = SessionError::Config {
            offset,
            len: size as usize,
        };
        let mut buf = vec![0; size as usize];
        self.lifecycle
            .config()
            .read(offset as usize, &mut buf)
            .map_err(|_| refused)?;
        Ok(buf)
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        let refused = || SessionError::Config {
            offset,
            len: buf.len(),
        };
        if !self.device.write_config(self.acked, offset as usize, buf) {
            return Err(refused().into());
        }
        // The driver made this change itself: no configuration-change
        // notification is due for it.
        let _ = self
            .lifecycle
            .update_config(offset as usize, buf)
            .map_err(|_| refused())?;
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(SessionError::Unsupported("GPU_SET_SOCKET").into())
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(SessionError::Unsupported("GET_SHARED_OBJECT").into())
    }

    fn get_inflight_fd(&mut self, inflight: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        self.inflight_allowed()?;
        let (buffer, reply, file) =
            InflightBuffer::create(inflight, self.inflight_shape()).map_err(SessionError::from)?;
        tracing::debug!(
            queues = reply.num_queues,
            size = reply.queue_size,
            "inflight buffer created"
        );
        self.inflight = Some(buffer);
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        self.inflight_allowed()?;
        let buffer =
            InflightBuffer::adopt(inflight, &file, self.inflight_shape()).map_err(SessionError::from)?;
        tracing::debug!(
            queues = inflight.num_queues,
            size = inflight.queue_size,
            "inflight buffer adopted"
        );
        self.inflight = Some(buffer);
        // Running rings go on untracked until the device restarts them.
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Err(SessionError::Unsupported("GET_MAX_MEM_SLOTS").into())
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        Err(SessionError::Unsupported("ADD_MEM_REG").into())
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        Err(SessionError::Unsupported("REM_MEM_REG").into())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(SessionError::Unsupported("SET_DEVICE_STATE_FD").into())
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(SessionError::Unsupported("CHECK_DEVICE_STATE").into())
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(SessionError::Unsupported("GET_SHMEM_CONFIG").into())
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(SessionError::Unsupported("SET_LOG_BASE").into())
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
pub(crate) mod tests;
