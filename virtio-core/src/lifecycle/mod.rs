//! The device's control plane and the driver's initialization sequence
//! (virtio 1.2 §2.4, §2.6, §3.1, §4.1.4.3).
//!
//! Device side, [`DeviceLifecycle`] holds everything a transport exposes besides the
//! rings: features, status, config space and per-queue registers, and enforces who
//! may change what and when. Driver side, [`ControlPlane`] is the driver's view of a
//! transport and [`initialize`] / [`driver_ok`] run the §3.1.1 sequence over it.
//! `Mutex<DeviceLifecycle>` implements [`ControlPlane`], an in-process transport.
//!
//! Queue layouts are validated for the split ring (§2.7), or for the packed ring
//! (§2.8) once RING_PACKED is negotiated. Per-queue reset (RING_RESET) is not
//! supported: queue registers are fixed from DRIVER_OK until the next device reset.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use thiserror::Error;
use tracing::warn;

use crate::config::{self, ConfigError, ConfigSpace};
use crate::features::{self, Dependency, Features};
use crate::model::QueueAddrs;
use crate::ring::areas::{AreaError, RingAreas};
use crate::status::{DeviceStatus, FeaturesVerdict, StatusChange, StatusError, StatusMachine};

/// Largest queue size the spec allows, split or packed (§2.7, §2.8: 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// How many times [`initialize`] reads the status after writing 0, 1 ms apart,
/// before giving up: a device may hold status nonzero while it drains in-flight
/// work (§4.1.4.3.2: the driver waits for a read of 0).
pub const RESET_POLL_LIMIT: u32 = 1000;

/// A queue's transport registers (§4.1.4.3 `queue_size`, `queue_desc`,
/// `queue_driver`, `queue_device`, `queue_enable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRegisters {
    /// Queue size the driver chose; starts at `max_size`.
    pub size: u16,
    /// Largest size the device supports for this queue; 0 means unavailable.
    pub max_size: u16,
    /// Address of the descriptor area.
    pub desc: u64,
    /// Address of the driver area (split ring: available ring).
    pub avail: u64,
    /// Address of the device area (split ring: used ring).
    pub used: u64,
    /// Whether the driver enabled the queue.
    pub enabled: bool,
}

impl QueueRegisters {
    /// Registers as they read after a reset.
    pub const fn new(max_size: u16) -> Self {
        Self {
            size: max_size,
            max_size,
            desc: 0,
            avail: 0,
            used: 0,
            enabled: false,
        }
    }
}

/// A queue's validated layout: the size is legal, each area is aligned, none wraps
/// the address space and none overlaps another. Addresses mean what the sharing
/// model says they mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// Number of descriptors.
    pub size: u16,
    /// Address of the descriptor area.
    pub desc: u64,
    /// Address of the driver area (split ring: available ring).
    pub avail: u64,
    /// Address of the device area (split ring: used ring).
    pub used: u64,
}

pub use crate::ring::areas::RingArea;

/// A queue register access or layout the device refuses (HOSTILE rule 11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum QueueError {
    /// The queue index is out of range.
    #[error("No queue {index}")]
    NoSuchQueue {
        /// The requested index.
        index: u16,
    },
    /// Queue registers are writable only after FEATURES_OK and before DRIVER_OK.
    #[error("Queue registers not writable in status {status:#04x}")]
    NotConfigurable {
        /// Device status at the time.
        status: u8,
    },
    /// The queue is enabled; its registers are fixed until reset.
    #[error("Queue {index} is enabled")]
    Enabled {
        /// The queue index.
        index: u16,
    },
    /// Size 0, above the maximum, or (split ring) not a power of two.
    #[error("Invalid queue size {size} (maximum {max})")]
    InvalidSize {
        /// The refused size.
        size: u16,
        /// The queue's maximum.
        max: u16,
    },
    /// The areas are misaligned, overflow or overlap (§2.7 / §2.8, HOSTILE 11).
    #[error(transparent)]
    Area(#[from] AreaError),
    /// An area lies outside the memory the driver shared with the device.
    #[error("{area:?} area at {addr:#x} with {len} bytes lies outside shared memory")]
    OutsideMemory {
        /// Which area.
        area: RingArea,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
    },
}

impl QueueError {
    /// The queue error for areas [`RingAreas`] refused, on a queue of at most `max`
    /// entries.
    pub fn from_area(e: AreaError, max: u16) -> QueueError {
        match e {
            AreaError::Size(size) => QueueError::InvalidSize { size, max },
            e => QueueError::Area(e),
        }
    }
}

/// A driver-features write outside the window §3.1.1 allows (after DRIVER, before
/// FEATURES_OK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("Driver features not writable in status {status:#04x}")]
pub struct DriverFeaturesError {
    /// Device status at the time.
    pub status: u8,
}

/// Whether the transport must send a configuration change notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "the transport must notify the driver when asked to"]
pub enum ConfigNotification {
    /// Send a configuration change notification now.
    Required,
    /// Nothing to send.
    NotRequired,
}

/// Device side of the control plane: features, status, config space and queue
/// registers, with the rules of §2.2, §2.1, §2.5 and §4.1.4.3.
#[derive(Debug)]
pub struct DeviceLifecycle {
    device_id: u32,
    offered: u64,
    deps: &'static [Dependency],
    driver_features: u64,
    machine: StatusMachine,
    config: ConfigSpace,
    queues: Vec<QueueRegisters>,
}

impl DeviceLifecycle {
    /// A reset device. VERSION_1 is always offered: a device MUST offer it (§6.2)
    /// and this crate is modern-only. `deps` is the device's dependency table.
    pub fn new(
        device_id: u32,
        offered: u64,
        deps: &'static [Dependency],
        config: ConfigSpace,
        queue_max_sizes: &[u16],
    ) -> Self {
        Self {
            device_id,
            offered: offered | Features::VERSION_1.bits(),
            deps,
            driver_features: 0,
            machine: StatusMachine::new(),
            config,
            queues: queue_max_sizes
                .iter()
                .map(|&max| QueueRegisters::new(max))
                .collect(),
        }
    }

    /// The virtio device id (§5).
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// Features the device offers.
    pub fn device_features(&self) -> u64 {
        self.offered
    }

    /// Features the driver last wrote (not necessarily accepted by the device).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The negotiated features, once FEATURES_OK is set.
    pub fn negotiated_features(&self) -> Option<u64> {
        self.machine
            .status()
            .contains(DeviceStatus::FEATURES_OK)
            .then_some(self.driver_features)
    }

    /// Records the driver's accepted features; checked when it sets FEATURES_OK.
    ///
    /// # Errors
    /// Outside DRIVER..FEATURES_OK (§3.1.1 steps 4-5), or after FAILED; nothing is
    /// recorded then.
    pub fn set_driver_features(&mut self, features: u64) -> Result<(), DriverFeaturesError> {
        let status = self.machine.status();
        let open = status.contains(DeviceStatus::DRIVER)
            && !status.intersects(DeviceStatus::FEATURES_OK | DeviceStatus::FAILED);
        if !open {
            return Err(DriverFeaturesError {
                status: status.bits(),
            });
        }
        self.driver_features = features;
        Ok(())
    }

    /// Applies a driver write of the status. Setting FEATURES_OK runs
    /// [`features::negotiate`]; if it fails FEATURES_OK is withheld (§2.2.2).
    /// Writing 0 resets the device: driver features and queue registers go back
    /// to their initial values; the config generation is kept so drivers never see
    /// an old generation again.
    ///
    /// # Errors
    /// [`StatusError`] for an illegal write; nothing changes then.
    pub fn write_status(&mut self, value: u8) -> Result<StatusChange, StatusError> {
        let (offered, accepted, deps) = (self.offered, self.driver_features, self.deps);
        let change = self
            .machine
            .write(value, || match features::negotiate(offered, accepted, deps) {
                Ok(_) => FeaturesVerdict::Accept,
                Err(error) => {
                    warn!(%error, "refusing FEATURES_OK");
                    FeaturesVerdict::Refuse
                }
            })?;
        if change == StatusChange::Reset {
            self.driver_features = 0;
            for queue in &mut self.queues {
                *queue = QueueRegisters::new(queue.max_size);
            }
        }
        Ok(change)
    }

    /// The device status.
    pub fn status(&self) -> DeviceStatus {
        self.machine.status()
    }

    /// Device side: the device hit an error it cannot recover from without a reset.
    /// Sets DEVICE_NEEDS_RESET and bumps the config generation; if DRIVER_OK is set
    /// the device MUST send a configuration change notification (§2.1.2).
    pub fn set_needs_reset(&mut self) -> ConfigNotification {
        if !self.machine.set_needs_reset() {
            return ConfigNotification::NotRequired;
        }
        self.config.bump_generation();
        self.config_notification()
    }

    /// The config space, for device-side reads.
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// Device side: changes config bytes (bumping the generation if they differ).
    ///
    /// # Errors
    /// [`ConfigError::OutOfBounds`]; nothing changes then.
    pub fn update_config(&mut self, offset: usize, bytes: &[u8]) -> Result<ConfigNotification, ConfigError> {
        if self.config.update(offset, bytes)? {
            Ok(self.config_notification())
        } else {
            Ok(ConfigNotification::NotRequired)
        }
    }

    fn config_notification(&self) -> ConfigNotification {
        // Before DRIVER_OK the driver reads config as part of setup anyway.
        if self.machine.status().contains(DeviceStatus::DRIVER_OK) {
            ConfigNotification::Required
        } else {
            ConfigNotification::NotRequired
        }
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// A queue's registers.
    pub fn queue(&self, index: u16) -> Option<&QueueRegisters> {
        self.queues.get(usize::from(index))
    }

    fn packed(&self) -> bool {
        self.negotiated_features()
            .is_some_and(|f| f & Features::RING_PACKED.bits() != 0)
    }

    /// The registers of a queue the driver may configure now (§3.1.1 step 7, and
    /// never after DRIVER_OK: HOSTILE rule 11).
    fn writable_queue(&mut self, index: u16) -> Result<&mut QueueRegisters, QueueError> {
        let status = self.machine.status();
        let closed = DeviceStatus::DRIVER_OK | DeviceStatus::FAILED | DeviceStatus::DEVICE_NEEDS_RESET;
        if !status.contains(DeviceStatus::FEATURES_OK) || status.intersects(closed) {
            return Err(QueueError::NotConfigurable {
                status: status.bits(),
            });
        }
        let queue = self
            .queues
            .get_mut(usize::from(index))
            .ok_or(QueueError::NoSuchQueue { index })?;
        if queue.enabled {
            return Err(QueueError::Enabled { index });
        }
        Ok(queue)
    }

    /// Sets a queue's size.
    ///
    /// # Errors
    /// Wrong state, unknown or enabled queue, or a size that is 0, above the
    /// maximum, or (split ring, §2.7) not a power of two.
    pub fn set_queue_size(&mut self, index: u16, size: u16) -> Result<(), QueueError> {
        let packed = self.packed();
        let queue = self.writable_queue(index)?;
        check_size(size, queue.max_size, packed)?;
        queue.size = size;
        Ok(())
    }

    /// Sets the descriptor area address. Layout is checked by
    /// [`validate_queue`](Self::validate_queue) and on enable.
    ///
    /// # Errors
    /// Wrong state, unknown or enabled queue.
    pub fn set_queue_desc(&mut self, index: u16, addr: u64) -> Result<(), QueueError> {
        self.writable_queue(index)?.desc = addr;
        Ok(())
    }

    /// Sets the driver area (available ring) address.
    ///
    /// # Errors
    /// Wrong state, unknown or enabled queue.
    pub fn set_queue_avail(&mut self, index: u16, addr: u64) -> Result<(), QueueError> {
        self.writable_queue(index)?.avail = addr;
        Ok(())
    }

    /// Sets the device area (used ring) address.
    ///
    /// # Errors
    /// Wrong state, unknown or enabled queue.
    pub fn set_queue_used(&mut self, index: u16, addr: u64) -> Result<(), QueueError> {
        self.writable_queue(index)?.used = addr;
        Ok(())
    }

    /// Enables a queue after validating its layout. There is no disable: the driver
    /// MUST NOT write 0 to `queue_enable` (§4.1.4.3.2); a reset disables all queues.
    ///
    /// # Errors
    /// Wrong state, unknown or already enabled queue, or an invalid layout.
    pub fn enable_queue(&mut self, index: u16) -> Result<QueueLayout, QueueError> {
        self.writable_queue(index)?;
        let layout = self.validate_queue(index)?;
        self.writable_queue(index)?.enabled = true;
        Ok(layout)
    }

    /// Checks a queue's registers and returns its layout.
    ///
    /// # Errors
    /// Unknown queue, invalid size, or an area misaligned, wrapping the address
    /// space or overlapping another.
    pub fn validate_queue(&self, index: u16) -> Result<QueueLayout, QueueError> {
        let q = self.queue(index).ok_or(QueueError::NoSuchQueue { index })?;
        let packed = self.packed();
        check_size(q.size, q.max_size, packed)?;
        let addrs = QueueAddrs {
            desc: q.desc,
            avail: q.avail,
            used: q.used,
        };
        let areas = if packed {
            RingAreas::packed(q.size, addrs)
        } else {
            RingAreas::split(q.size, addrs)
        };
        areas.map_err(|e| QueueError::from_area(e, q.max_size))?;
        Ok(QueueLayout {
            size: q.size,
            desc: q.desc,
            avail: q.avail,
            used: q.used,
        })
    }
}

fn check_size(size: u16, max: u16, packed: bool) -> Result<(), QueueError> {
    let max = max.min(MAX_QUEUE_SIZE);
    // Packed rings need not be a power of two (§2.8); split rings must (§2.7).
    if size == 0 || size > max || !(packed || size.is_power_of_two()) {
        return Err(QueueError::InvalidSize { size, max });
    }
    Ok(())
}

/// The driver's view of a transport's control registers.
///
/// Methods take `&self` so a transport can sit behind a lock or be shared. Writes
/// report nothing: as with real hardware, a device that refuses a write shows it in
/// what the driver reads back (usually the status).
pub trait ControlPlane {
    /// The virtio device id (§5: 1 network, 2 block, ...). A driver checks it before
    /// it touches anything else.
    fn device_id(&self) -> u32;
    /// The length of the device-specific configuration space in bytes. Reads past
    /// it return zeros (see [`ControlPlane::read_config`]), so a driver that must
    /// tell "absent" from "zero" compares against this.
    fn config_len(&self) -> usize;
    /// The device's offered features.
    fn device_features(&self) -> u64;
    /// Writes the driver's accepted features.
    fn set_driver_features(&self, features: u64);
    /// Reads the device status.
    fn status(&self) -> u8;
    /// Writes the device status (0 resets).
    fn set_status(&self, status: u8);
    /// Reads the config generation.
    fn config_generation(&self) -> u32;
    /// Reads config bytes; out-of-range reads fill `buf` with zeros.
    fn read_config(&self, offset: usize, buf: &mut [u8]);
    /// Writes config bytes. Only fields the device declares writable take effect
    /// (virtio-blk's `writeback` with CONFIG_WCE, for example); other writes are
    /// ignored, as a device ignores writes to read-only registers.
    fn write_config(&self, offset: usize, data: &[u8]);
}

fn locked(device: &Mutex<DeviceLifecycle>) -> MutexGuard<'_, DeviceLifecycle> {
    // Every lifecycle method leaves the state consistent before it could panic, so
    // a poisoned lock still guards a usable device.
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An in-process transport. Refused writes are logged and otherwise ignored.
impl ControlPlane for Mutex<DeviceLifecycle> {
    fn device_id(&self) -> u32 {
        locked(self).device_id()
    }

    fn config_len(&self) -> usize {
        locked(self).config().len()
    }

    fn device_features(&self) -> u64 {
        locked(self).device_features()
    }

    fn set_driver_features(&self, features: u64) {
        if let Err(error) = locked(self).set_driver_features(features) {
            warn!(%error, features, "driver features write refused");
        }
    }

    fn status(&self) -> u8 {
        locked(self).status().bits()
    }

    fn set_status(&self, status: u8) {
        if let Err(error) = locked(self).write_status(status) {
            warn!(%error, status, "status write refused");
        }
    }

    fn config_generation(&self) -> u32 {
        locked(self).config().generation()
    }

    fn read_config(&self, offset: usize, buf: &mut [u8]) {
        if let Err(error) = locked(self).config().read(offset, buf) {
            warn!(%error, "config read refused");
            buf.fill(0);
        }
    }

    fn write_config(&self, offset: usize, data: &[u8]) {
        // A bare lifecycle has no device behind it to accept a write.
        warn!(
            offset,
            len = data.len(),
            "config write ignored: no writable fields"
        );
    }
}

/// Why the driver could not initialize the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum InitError {
    /// The status did not read 0 after a reset.
    #[error("Device status {status:#04x} after reset")]
    ResetTimeout {
        /// The last status read.
        status: u8,
    },
    /// The device did not take a status bit the driver wrote.
    #[error("Device did not set {bit:?} (status {status:#04x})")]
    StatusRefused {
        /// The bit written.
        bit: DeviceStatus,
        /// The status read back.
        status: u8,
    },
    /// The transport leads to another kind of device than the driver drives.
    #[error("Device id {found} is not the expected {expected}")]
    WrongDevice {
        /// The device id the driver drives.
        expected: u32,
        /// The device id the transport reports.
        found: u32,
    },
    /// The device does not offer VERSION_1; legacy devices are not supported.
    #[error("Device does not offer VERSION_1")]
    NotModern,
    /// The device cleared FEATURES_OK: it does not accept these features (§3.1.1).
    #[error("Device refused features {features:#x}")]
    FeaturesRefused {
        /// The features the driver wrote.
        features: u64,
    },
    /// The device set DEVICE_NEEDS_RESET during initialization.
    #[error("Device needs reset (status {status:#04x})")]
    NeedsReset {
        /// The status read.
        status: u8,
    },
    /// [`driver_ok`] was called before [`initialize`] succeeded.
    #[error("Device not ready for DRIVER_OK (status {status:#04x})")]
    NotReady {
        /// The status read.
        status: u8,
    },
}

/// Writes `confirmed | bit` and reads the status back. Returns the new set of
/// bits the device confirmed. The driver's own shadow, not the device's status, is
/// what it writes, so it never echoes bits it did not set.
fn set_bit(
    ctrl: &impl ControlPlane,
    confirmed: DeviceStatus,
    bit: DeviceStatus,
) -> Result<DeviceStatus, InitError> {
    ctrl.set_status((confirmed | bit).bits());
    let status = ctrl.status();
    let read = DeviceStatus::from_bits_retain(status);
    if read.contains(DeviceStatus::DEVICE_NEEDS_RESET) {
        return Err(InitError::NeedsReset { status });
    }
    if !read.contains(bit) {
        return Err(InitError::StatusRefused { bit, status });
    }
    Ok(confirmed | bit)
}

/// Driver side: resets the device (writes 0, §2.4) and waits, polling every
/// millisecond up to [`RESET_POLL_LIMIT`] times, until it reads back 0. Only then
/// has the device stopped touching guest memory, so only then may a driver take its
/// buffers back.
///
/// # Errors
/// [`InitError::ResetTimeout`] with the last status read.
pub fn reset(ctrl: &impl ControlPlane) -> Result<(), InitError> {
    ctrl.set_status(0);
    let mut status = ctrl.status();
    for _ in 0..RESET_POLL_LIMIT {
        if status == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
        status = ctrl.status();
    }
    if status == 0 {
        Ok(())
    } else {
        Err(InitError::ResetTimeout { status })
    }
}

/// Driver side: §3.1.1 steps 1-6. Checks that the device is a `device_id` device
/// (before writing anything: a driver does not reset a device it does not drive),
/// resets it, sets ACKNOWLEDGE and DRIVER,
/// accepts [`features::select`]`(offered, wanted, deps)`, sets FEATURES_OK and
/// checks that the device kept it. Returns the negotiated features. On failure
/// after the reset, FAILED is written (§3.1.1 step 8).
///
/// The caller then reads config, sets up queues and calls [`driver_ok`].
///
/// # Errors
/// See [`InitError`].
pub fn initialize(
    ctrl: &impl ControlPlane,
    device_id: u32,
    wanted: u64,
    deps: &[Dependency],
) -> Result<u64, InitError> {
    let found = ctrl.device_id();
    if found != device_id {
        return Err(InitError::WrongDevice {
            expected: device_id,
            found,
        });
    }
    reset(ctrl)?;
    let mut confirmed = DeviceStatus::empty();
    let result = negotiate_features(ctrl, &mut confirmed, wanted, deps);
    if result.is_err() {
        ctrl.set_status((confirmed | DeviceStatus::FAILED).bits());
    }
    result
}

fn negotiate_features(
    ctrl: &impl ControlPlane,
    confirmed: &mut DeviceStatus,
    wanted: u64,
    deps: &[Dependency],
) -> Result<u64, InitError> {
    *confirmed = set_bit(ctrl, *confirmed, DeviceStatus::ACKNOWLEDGE)?;
    *confirmed = set_bit(ctrl, *confirmed, DeviceStatus::DRIVER)?;
    let offered = ctrl.device_features();
    if offered & Features::VERSION_1.bits() == 0 {
        return Err(InitError::NotModern);
    }
    let features = features::select(offered, wanted, deps);
    ctrl.set_driver_features(features);
    match set_bit(ctrl, *confirmed, DeviceStatus::FEATURES_OK) {
        Ok(bits) => *confirmed = bits,
        Err(InitError::StatusRefused { .. }) => {
            return Err(InitError::FeaturesRefused { features });
        }
        Err(other) => return Err(other),
    }
    Ok(features)
}

/// Driver side: §3.1.1 step 7, after queues are set up. Sets DRIVER_OK and checks
/// the device took it; writes FAILED if it did not.
///
/// # Errors
/// [`InitError::NotReady`] if FEATURES_OK is not set (or FAILED is),
/// [`InitError::NeedsReset`], or [`InitError::StatusRefused`].
pub fn driver_ok(ctrl: &impl ControlPlane) -> Result<(), InitError> {
    let status = ctrl.status();
    let read = DeviceStatus::from_bits_retain(status);
    if read.contains(DeviceStatus::DEVICE_NEEDS_RESET) {
        return Err(InitError::NeedsReset { status });
    }
    let ready = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
    if !read.contains(ready) || read.contains(DeviceStatus::FAILED) {
        return Err(InitError::NotReady { status });
    }
    let result = set_bit(ctrl, ready, DeviceStatus::DRIVER_OK).map(|_| ());
    if result.is_err() {
        ctrl.set_status((ready | DeviceStatus::FAILED).bits());
    }
    result
}

/// Driver side: reads config bytes consistently through the generation counter
/// (§2.5.1).
///
/// # Errors
/// [`ConfigError::Unstable`] if the generation keeps changing.
pub fn read_config(ctrl: &impl ControlPlane, offset: usize, buf: &mut [u8]) -> Result<(), ConfigError> {
    config::read_consistent(|| ctrl.config_generation(), |b| ctrl.read_config(offset, b), buf)
}

#[cfg(test)]
mod tests;
