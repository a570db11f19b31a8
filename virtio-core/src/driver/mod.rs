//! Driver-side bring-up and teardown of a device, written once for every driver
//! (virtio 1.2 §3.1.1, §2.4).
//!
//! A driver starts with [`DeviceGuard::initialize`] (check the device id, reset,
//! ACKNOWLEDGE, DRIVER, feature negotiation, FEATURES_OK), reads its configuration
//! with [`DeviceGuard::read_config`], makes each queue with [`DeviceGuard::queue`]
//! and [`DeviceGuard::setup_queue`], sets DRIVER_OK with [`DeviceGuard::driver_ok`]
//! and, once everything it does before it hands the device to its caller
//! succeeded, calls [`DeviceGuard::finish`]. Every failure is a typed
//! [`SetupError`] that each driver's own error embeds.
//!
//! The guard owns the transport for the driver's whole life. Dropped before
//! [`DeviceGuard::finish`], it writes FAILED (§3.1.1 step 8) and resets the device;
//! dropped after, it resets it. A driver frees the memory it gave the device only
//! through [`DeviceGuard::shutdown`], which runs the teardown only once the device
//! acknowledged the reset (read back 0: it no longer touches that memory, §2.4).

use crate::config::{self, ConfigError};
use crate::features::{Dependency, Features};
use crate::lifecycle::{self, InitError};
use crate::model::{DriverModel, ModelError, QueueAddrs};
use crate::notify::NotificationData;
use crate::ring::areas::RingFormat;
use crate::ring::queue::{DriverRing, RingSetupError};
use crate::status::DeviceStatus;
use crate::transport::{Transport, TransportError};

/// Why a driver could not bring its device up. Every driver's error embeds it.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Device initialization failed.
    #[error("device initialization failed")]
    Init(#[from] InitError),
    /// The configuration space kept changing under the driver.
    #[error("configuration space unreadable")]
    Config(#[from] ConfigError),
    /// The device offers a queue smaller than the driver can use (size 0: none).
    #[error("device offers no usable queue {0}")]
    NoQueue(u16),
    /// The sharing model could not create a queue.
    #[error("sharing model could not create a queue")]
    Model(#[from] ModelError),
    /// The queue memory the model gave is unusable for a split ring.
    #[error("queue memory unusable")]
    Ring(#[from] RingSetupError),
    /// The transport refused a queue, or has no interrupt for it.
    #[error("transport failed")]
    Transport(#[from] TransportError),
}

/// A queue made by [`DeviceGuard::queue`]: its ring on the driver side, the
/// addresses for [`DeviceGuard::setup_queue`] and its used-buffer notification.
pub struct NewQueue<S: crate::DriverShare, Tok, I> {
    /// Queue index.
    pub index: u16,
    /// Number of entries.
    pub size: u16,
    /// The driver side of the split ring.
    pub ring: DriverRing<S, Tok>,
    /// What to write into the queue registers.
    pub addrs: QueueAddrs,
    /// What the driver waits on for this queue.
    pub interrupt: I,
}

impl<S: crate::DriverShare, Tok, I> std::fmt::Debug for NewQueue<S, Tok, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewQueue")
            .field("index", &self.index)
            .field("size", &self.size)
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

/// Where the device stands for the guard.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Between FEATURES_OK and [`DeviceGuard::finish`].
    BringUp,
    /// After [`DeviceGuard::finish`].
    Running,
    /// Reset, with the result.
    Stopped(Result<(), InitError>),
}

/// A device a driver is bringing up or drives: owns the transport, writes FAILED
/// if bring-up does not finish and resets the device when dropped.
pub struct DeviceGuard<T: Transport> {
    transport: T,
    features: u64,
    phase: Phase,
}

impl<T: Transport> std::fmt::Debug for DeviceGuard<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceGuard")
            .field("features", &format_args!("{:#x}", self.features))
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl<T: Transport> DeviceGuard<T> {
    /// §3.1.1 steps 1-6 through [`lifecycle::initialize`]: checks that the device
    /// is a `device_id` device (before writing anything), resets it, sets
    /// ACKNOWLEDGE and DRIVER, accepts what it offers of `wanted` with `deps`
    /// honoured, and checks that it kept FEATURES_OK. `VIRTIO_F_NOTIFICATION_DATA`
    /// is the guard's business, not the driver's: it is accepted when offered if
    /// the transport carries the data, and [`Self::notify`] sends it.
    ///
    /// # Errors
    /// [`SetupError::Init`]; FAILED is written for any failure after the reset.
    pub fn initialize(
        transport: T,
        device_id: u32,
        wanted: u64,
        deps: &[Dependency],
    ) -> Result<Self, SetupError> {
        let mut wanted = Features::from_bits_retain(wanted);
        wanted.set(Features::NOTIFICATION_DATA, transport.carries_notification_data());
        let features = lifecycle::initialize(&transport, device_id, wanted.bits(), deps)?;
        Ok(DeviceGuard {
            transport,
            features,
            phase: Phase::BringUp,
        })
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Sends queue `index` an available-buffer notification, with the ring's next
    /// position `next` ([`DriverRing::next_avail`]) as its data when
    /// `VIRTIO_F_NOTIFICATION_DATA` was negotiated (virtio 1.2 §2.9).
    ///
    /// # Errors
    /// The transport's.
    pub fn notify(&self, index: u16, next: u16) -> Result<(), TransportError> {
        if self.features & Features::NOTIFICATION_DATA.bits() != 0 {
            self.transport
                .notify_queue_data(NotificationData { vqn: index, next })
        } else {
            self.transport.notify_queue(index)
        }
    }

    /// Fills `buf` with `read` under one configuration generation (§2.5.1). `read`
    /// reads the fields in the pieces the device type wants: naturally aligned, so
    /// a configuration space shorter than `buf` reads as zeroes past its end.
    ///
    /// # Errors
    /// [`SetupError::Config`] if the generation keeps changing.
    pub fn read_config(&self, buf: &mut [u8], mut read: impl FnMut(&T, &mut [u8])) -> Result<(), SetupError> {
        let t = &self.transport;
        config::read_consistent(|| t.config_generation(), |b| read(t, b), buf)?;
        Ok(())
    }

    /// Makes queue `index` on the driver side: the largest power of two (§2.7)
    /// within the device's maximum and `wanted`, its rings from `model`, and its
    /// interrupt from the transport. The device learns of it only through
    /// [`Self::setup_queue`]; a driver keeps the ring where its teardown finds it
    /// before it calls that.
    ///
    /// # Errors
    /// [`SetupError::NoQueue`] if that size is below `min` (or 0), the model's,
    /// the ring's or the transport's error.
    pub fn queue<D: DriverModel, Tok>(
        &self,
        model: &D,
        index: u16,
        wanted: u16,
        min: u16,
    ) -> Result<NewQueue<D::Share, Tok, T::Interrupt>, SetupError> {
        let max = self.transport.queue_max_size(index).min(wanted);
        if max == 0 || max < min {
            return Err(SetupError::NoQueue(index));
        }
        // Largest power of two not above `max` (nonzero, checked above).
        let size = 1u16 << (15 - max.leading_zeros());
        let features = Features::from_bits_retain(self.features);
        let dq = model.create_queue_in(index, RingFormat::of(features), size)?;
        let ring = DriverRing::new(size, dq.ring, dq.share, features)?;
        let interrupt = self.transport.interrupt(index)?;
        Ok(NewQueue {
            index,
            size,
            ring,
            addrs: dq.addrs,
            interrupt,
        })
    }

    /// Writes queue `index`'s size and addresses and enables it (§4.1.5.1.3).
    ///
    /// # Errors
    /// [`SetupError::Transport`].
    pub fn setup_queue(&self, index: u16, size: u16, addrs: QueueAddrs) -> Result<(), SetupError> {
        Ok(self.transport.setup_queue(index, size, addrs)?)
    }

    /// Sets DRIVER_OK (§3.1.1 step 7) through [`lifecycle::driver_ok`].
    ///
    /// # Errors
    /// [`SetupError::Init`].
    pub fn driver_ok(&self) -> Result<(), SetupError> {
        Ok(lifecycle::driver_ok(&self.transport)?)
    }

    /// Bring-up is complete: from now on the guard resets the device without
    /// writing FAILED first.
    pub fn finish(&mut self) {
        if matches!(self.phase, Phase::BringUp) {
            self.phase = Phase::Running;
        }
    }

    /// Stops the device: writes FAILED if bring-up did not finish (§3.1.1 step 8),
    /// then resets it and waits until it reads back 0 (§2.4). Only the first call
    /// does anything; later ones return its result.
    ///
    /// # Errors
    /// [`InitError::ResetTimeout`] if the device never acknowledged the reset: it
    /// may still touch the memory it was given.
    pub fn stop(&mut self) -> Result<(), InitError> {
        match self.phase {
            Phase::Stopped(result) => return result,
            Phase::BringUp => {
                let status = self.transport.status();
                self.transport.set_status(status | DeviceStatus::FAILED.bits());
            }
            Phase::Running => {}
        }
        let result = lifecycle::reset(&self.transport);
        self.phase = Phase::Stopped(result);
        result
    }

    /// [`Self::stop`], then `teardown` (which frees what the device was given) only
    /// if the device acknowledged the reset. If it never did, the memory is leaked
    /// rather than handed back while the device may still write it.
    pub fn shutdown(&mut self, teardown: impl FnOnce()) {
        match self.stop() {
            Ok(()) => teardown(),
            Err(error) => tracing::error!(%error, "device did not reset; leaking the memory it was given"),
        }
    }
}

impl<T: Transport> Drop for DeviceGuard<T> {
    /// Stops the device unless the driver already did (bring-up failed before the
    /// driver had anything to tear down, or the driver forgot).
    fn drop(&mut self) {
        if matches!(self.phase, Phase::Stopped(_)) {
            return;
        }
        if let Err(error) = self.stop() {
            tracing::error!(%error, "device did not reset");
        }
    }
}

#[cfg(test)]
mod tests;
