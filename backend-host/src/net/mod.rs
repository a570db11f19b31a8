//! virtio-net, device side (virtio 1.2 §5.1): a device per guest, each plugged into
//! a port of a learning L2 switch, so guests on one host reach each other.
//!
//! - [`switch`]: the switch (MAC learning, flooding, per-source bounded backlogs
//!   drained round robin, drop counters per reason).
//! - [`device`]: [`NetDevice`], a [`DeviceHandler`](virtio_core::transport::DeviceHandler)
//!   whose worker thread checks what its guest transmits and delivers what the
//!   switch hands it into the guest's receive buffers.
//!
//! Not done yet: a control queue (CTRL_VQ, MQ), segmentation offloads, a TAP port.

pub mod device;
pub mod switch;

pub use device::{ActivateError, NetDevice, NetSettings};
pub use switch::{DropReason, Drops, PortId, PortStats, Switch, SwitchConfig};
