//! Virtqueues: wire layouts, descriptor chains, and both sides of the split and packed rings.

pub mod areas;
pub mod chain;
pub mod inflight;
pub mod layout;
mod order;
pub mod packed;
pub mod queue;
pub mod split;
#[cfg(test)]
mod tests;

pub use chain::{Chain, ChainError, ChainReader, ChainWriter, INDIRECT_MAX};
pub use layout::{Descriptor, SplitLayout, UsedElem};
pub use queue::{DeviceRing, DriverRing};
