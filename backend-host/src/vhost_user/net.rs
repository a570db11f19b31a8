//! [`NetDevice`] as a vhost-user-net backend: a VMM's guest on a port of our
//! [`Switch`](crate::net::Switch), beside our own guests and TAP ports.
//!
//! What QEMU hands a vhost-user-net backend: only the data queues. It serves the
//! control queue itself and passes on only the features that concern the rings
//! and the frames (`vhost_net`'s `user_feature_bits`: VERSION_1, INDIRECT_DESC,
//! EVENT_IDX, CSUM, GUEST_CSUM, MRG_RXBUF, MTU, MQ, ...), never CTRL_VQ, CTRL_RX,
//! MAC or STATUS; the MAC address and link state live in QEMU's configuration
//! space. The device then serves pair 0 (and, with MQ, every pair whose rings the
//! frontend enabled) without a control queue and without a receive filter, and
//! the switch learns the guest's address from its frames. A frontend that
//! negotiates CTRL_VQ gets the control queue served here, as in process.
//!
//! The session restarts the device whenever the set of ready rings or an eventfd
//! changes; [`NetDevice::stop_queues`] keeps the port on the switch (with the
//! addresses learnt there) and the device's state across those restarts.

use crate::net::device::NetDevice;
use crate::vhost_user::server::VhostUserDevice;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_core::DeviceModel;
use virtio_core::lifecycle::DeviceLifecycle;

impl<V> VhostUserDevice for NetDevice<V>
where
    V: DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    fn lifecycle(&self) -> DeviceLifecycle {
        NetDevice::lifecycle(self)
    }

    fn stop_queues(&mut self) -> Vec<(u16, u16)> {
        NetDevice::stop_queues(self)
    }

    /// MQ and RESET_DEVICE. Not CONFIG: QEMU serves a net device's configuration
    /// space itself (and warns about a backend offering it).
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::RESET_DEVICE
    }
}
