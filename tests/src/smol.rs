//! Guests that run a real TCP/IP stack: smoltcp over our virtio-net driver
//! ([`NetPhy`]), with the device plugged into a switch port. Shared by the TCP
//! tests and the TCP row of `vio net-loopback`.
//!
//! Each guest is driven by one thread: [`SmolGuest::run`] polls the interface,
//! hands the sockets to a step closure until it says it is done, and sleeps in
//! [`NetPhy::wait`] between rounds.

use crate::conformance::Fixture;
pub use crate::net_rig::Dev;
use crate::net_rig::{self, NetGuest, RigError};
use backend_host::net::{NetDevice, NetSettings, PortId, Switch};
use drivers_net::{NetError, NetOptions, NetPhy};
use hypervisor::Domain;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{IpAddress, IpCidr, Ipv4Address};
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_core::transport::InProcessTransport;
use virtio_core::{DriverModel, DriverShare};

/// Longest a [`SmolGuest::run`] round sleeps before it looks at its deadline.
const SLICE: Duration = Duration::from_millis(10);

/// A driver side a guest thread can own.
pub trait Drv: DriverModel<Share: DriverShare<Token: Send> + Send> + Send {}
impl<D: DriverModel<Share: DriverShare<Token: Send> + Send> + Send> Drv for D {}

/// Why a smoltcp guest could not be set up or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum SmolError {
    /// The guest could not be plugged in.
    #[error("Guest setup failed")]
    Rig(#[from] RigError),
    /// The driver broke.
    #[error("Driver failed")]
    Driver(#[from] NetError),
    /// The device has no MAC address.
    #[error("Device offers no MAC address")]
    NoMac,
    /// smoltcp refused a socket operation.
    #[error("smoltcp refused {0}")]
    Socket(String),
    /// A step did not finish in time.
    #[error("{0} timed out")]
    TimedOut(String),
}

/// One guest: its smoltcp interface and sockets over its driver, and its port.
pub struct SmolGuest<D: Drv, V: Dev> {
    /// The driver as a smoltcp device.
    pub phy: NetPhy<D, InProcessTransport<NetDevice<V>>>,
    /// The guest's interface.
    pub iface: Interface,
    /// The guest's sockets.
    pub sockets: SocketSet<'static>,
    /// The device's switch port.
    pub port: PortId,
    _domain: Arc<Domain>,
}

impl<D: Drv, V: Dev> std::fmt::Debug for SmolGuest<D, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmolGuest")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Plugs the guest of `f` into `switch` with a device of `settings` and gives it
/// the address `ip`/24.
///
/// # Errors
/// Device, transport or driver setup failed.
pub fn plug<D: Drv, V: Dev>(
    f: Fixture<D, V>,
    switch: &Arc<Switch>,
    ip: Ipv4Address,
    settings: NetSettings,
) -> Result<SmolGuest<D, V>, SmolError> {
    plug_with(f, switch, ip, settings, NetOptions::default())
}

/// [`plug`] with a driver set up by `opts` (the ring format of the TCP row of
/// `vio net-loopback`, for one).
///
/// # Errors
/// Device, transport or driver setup failed.
pub fn plug_with<D: Drv, V: Dev>(
    f: Fixture<D, V>,
    switch: &Arc<Switch>,
    ip: Ipv4Address,
    settings: NetSettings,
    opts: NetOptions,
) -> Result<SmolGuest<D, V>, SmolError> {
    let NetGuest {
        nic, port, domain, ..
    } = net_rig::plug(f, switch, settings, opts)?;
    let mut phy = NetPhy::new(nic);
    let config = Config::new(phy.hardware_addr().ok_or(SmolError::NoMac)?);
    let mut iface = Interface::new(config, &mut phy, SmolInstant::now());
    iface.update_ip_addrs(|a| {
        // A fresh interface has room for its first address.
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), 24));
    });
    Ok(SmolGuest {
        phy,
        iface,
        sockets: SocketSet::new(Vec::new()),
        port,
        _domain: domain,
    })
}

impl<D: Drv, V: Dev> SmolGuest<D, V> {
    /// Polls the interface and calls `step` with the sockets until it returns
    /// `true`, sleeping in [`NetPhy::wait`] between rounds.
    ///
    /// # Errors
    /// [`SmolError::TimedOut`] after `timeout`; the driver broke.
    pub fn run(
        &mut self,
        what: &str,
        timeout: Duration,
        mut step: impl FnMut(&mut SocketSet<'static>) -> bool,
    ) -> Result<(), SmolError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.iface
                .poll(SmolInstant::now(), &mut self.phy, &mut self.sockets);
            if step(&mut self.sockets) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SmolError::TimedOut(what.to_string()));
            }
            self.phy.wait(&mut self.iface, &self.sockets, Some(SLICE))?;
        }
    }

    /// A TCP socket with `buf` bytes of buffer each way and Nagle off.
    pub fn tcp_socket(&mut self, buf: usize) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; buf]),
            tcp::SocketBuffer::new(vec![0; buf]),
        );
        s.set_nagle_enabled(false);
        self.sockets.add(s)
    }

    /// A socket listening on `port`.
    ///
    /// # Errors
    /// smoltcp refused (the port is 0).
    pub fn listen(&mut self, port: u16, buf: usize) -> Result<SocketHandle, SmolError> {
        let h = self.tcp_socket(buf);
        self.sockets
            .get_mut::<tcp::Socket>(h)
            .listen(port)
            .map_err(|e| SmolError::Socket(format!("listening on {port}: {e}")))?;
        Ok(h)
    }

    /// A socket connecting to `to`:`port` (from local port 49152 + `port`).
    ///
    /// # Errors
    /// smoltcp refused.
    pub fn connect(&mut self, to: Ipv4Address, port: u16, buf: usize) -> Result<SocketHandle, SmolError> {
        let h = self.tcp_socket(buf);
        let cx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(h)
            .connect(cx, (IpAddress::Ipv4(to), port), 49152u16.wrapping_add(port))
            .map_err(|e| SmolError::Socket(format!("connecting to {to}:{port}: {e}")))?;
        Ok(h)
    }
}

/// Runs `a` on this thread and `b` on another one; each returns when done.
pub fn both<A: Send, B: Send>(a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B + Send) -> (A, B) {
    std::thread::scope(|s| {
        let b = s.spawn(b);
        let a = a();
        match b.join() {
            Ok(b) => (a, b),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
