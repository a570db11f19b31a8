//! Virtqueues: wire layouts, descriptor chains and the split ring's two sides.

pub mod areas;
pub mod chain;
pub mod layout;
pub mod queue;
pub mod split;

pub use chain::{Chain, ChainError, ChainReader, ChainWriter, INDIRECT_MAX};
pub use layout::{Descriptor, SplitLayout, UsedElem};
pub use queue::{DeviceRing, DriverRing};
