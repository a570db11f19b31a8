//! virtio-net, device side (virtio 1.2 §5.1): a device per guest, each plugged into
//! a port of a learning L2 switch, so guests on one host reach each other, and TAP
//! ports, so the host's own network stack reaches them too.
//!
//! - [`switch`]: the switch (MAC learning in a bounded, aged table with ports
//!   bound to their address, flooding, per-source bounded backlogs drained round
//!   robin, drop counters per reason).
//! - [`device`]: [`NetDevice`], a [`DeviceHandler`](virtio_core::transport::DeviceHandler)
//!   whose worker thread checks what its guest transmits and delivers what the
//!   switch hands it into the guest's receive buffers.
//! - [`tap`]: [`TapPort`], a TAP interface of the host (in any network namespace)
//!   on a switch port, its frames moved both ways by a worker thread, bounded and
//!   never blocking the switch.
//!
//! Not done yet: segmentation offloads (also on the TAP port: no `IFF_VNET_HDR`).

pub mod device;
pub mod switch;
pub mod tap;

pub use device::{ActivateError, NetDevice, NetSettings};
pub use switch::{
    Clock, DropReason, Drops, ManualClock, MonotonicClock, PortId, PortStats, Switch, SwitchConfig,
};
pub use tap::{TapConfig, TapError, TapPort, TapStats};
