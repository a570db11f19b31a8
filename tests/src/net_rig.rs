//! A guest on a switch port: our virtio-net driver over a sharing model, our device
//! behind the in-process transport, one port of a [`Switch`]. Shared by the net
//! tests, the smoltcp guests ([`crate::smol`]) and the net benchmark.

use crate::conformance::Fixture;
use backend_host::net::{NetDevice, NetSettings, PortId, PortStats, Switch};
use drivers_net::{NetDriver, NetError, NetOptions};
use hypervisor::Domain;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_core::notify::NotifyError;
use virtio_core::transport::InProcessTransport;
use virtio_core::{DeviceModel, DriverModel};

/// A device side that can serve from a worker thread.
pub trait Dev: DeviceModel<Memory: Send + 'static> + Send + Sync + 'static {}
impl<V: DeviceModel<Memory: Send + 'static> + Send + Sync + 'static> Dev for V {}

/// Why a guest could not be plugged in, or did not get what it waited for.
#[derive(Debug, thiserror::Error)]
pub enum RigError {
    /// The device's or transport's eventfds could not be made.
    #[error("Device setup failed")]
    Device(#[source] NotifyError),
    /// The driver failed.
    #[error("Driver failed")]
    Driver(#[from] NetError),
    /// Fewer frames than awaited arrived in time.
    #[error("Received {got} of {wanted} frames in time")]
    Missing {
        /// Frames received.
        got: usize,
        /// Frames awaited.
        wanted: usize,
    },
    /// A frame arrived where none was expected.
    #[error("Unexpected frame of {0} bytes")]
    Unexpected(usize),
}

/// One guest plugged into a switch.
pub struct NetGuest<D: DriverModel, V: Dev> {
    /// The guest's driver.
    pub nic: NetDriver<D, InProcessTransport<NetDevice<V>>>,
    /// The device's switch port.
    pub port: PortId,
    /// The device's MAC address.
    pub mac: [u8; 6],
    /// The switch.
    pub switch: Arc<Switch>,
    /// The guest (its memory stays mapped while the driver runs).
    pub domain: Arc<Domain>,
}

impl<D: DriverModel, V: Dev> std::fmt::Debug for NetGuest<D, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetGuest")
            .field("port", &self.port)
            .field("mac", &self.mac)
            .finish_non_exhaustive()
    }
}

/// Plugs the guest of `f` into `switch`: a device of `settings`, a transport, and
/// a driver set up with `opts`.
///
/// # Errors
/// Device, transport or driver setup failed.
pub fn plug<D: DriverModel, V: Dev>(
    f: Fixture<D, V>,
    switch: &Arc<Switch>,
    settings: NetSettings,
    opts: NetOptions,
) -> Result<NetGuest<D, V>, RigError> {
    let Fixture {
        guest,
        driver,
        device,
    } = f;
    let dev = NetDevice::new(device, switch, settings).map_err(RigError::Device)?;
    let (port, mac) = (dev.port(), dev.mac());
    let t = InProcessTransport::new(dev.lifecycle(), dev).map_err(RigError::Device)?;
    let nic = NetDriver::new(t, driver, guest.memory().clone(), opts)?;
    Ok(NetGuest {
        nic,
        port,
        mac,
        switch: switch.clone(),
        domain: guest,
    })
}

impl<D: DriverModel, V: Dev> NetGuest<D, V> {
    /// The port's counters.
    pub fn stats(&self) -> PortStats {
        self.switch.stats(self.port).unwrap_or_default()
    }

    /// Sends `frame`, waiting up to `timeout` for room.
    ///
    /// # Errors
    /// The driver's, [`NetError::QueueFull`] when the time is up.
    pub fn send(&self, frame: &[u8], timeout: Duration) -> Result<(), NetError> {
        self.nic.send_blocking(frame, Some(timeout))
    }

    /// Receives exactly `n` frames on pair 0 within `timeout`.
    ///
    /// # Errors
    /// [`RigError::Missing`] when fewer arrived; the driver's.
    pub fn recv(&self, n: usize, timeout: Duration) -> Result<Vec<Vec<u8>>, RigError> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n {
            if Instant::now() >= deadline {
                return Err(RigError::Missing {
                    got: got.len(),
                    wanted: n,
                });
            }
            self.nic.poll_recv(n - got.len(), |f| got.push(f.to_vec()))?;
            if got.len() < n {
                self.nic.wait_rx(Some(Duration::from_millis(20)))?;
            }
        }
        Ok(got)
    }

    /// Checks that nothing arrives on pair 0 within `wait`.
    ///
    /// # Errors
    /// [`RigError::Unexpected`] with the first frame's length; the driver's.
    pub fn recv_nothing(&self, wait: Duration) -> Result<(), RigError> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let mut first = None;
            self.nic.poll_recv(16, |f| {
                first.get_or_insert(f.len());
            })?;
            if let Some(len) = first {
                return Err(RigError::Unexpected(len));
            }
            self.nic.wait_rx(Some(Duration::from_millis(10)))?;
        }
        Ok(())
    }
}
