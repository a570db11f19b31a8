//! virtio-blk, device side (virtio 1.2 §5.2).

pub mod control;
pub mod device;
pub mod disk;
pub mod engine;
pub mod engine_sync;
pub mod engine_uring;
pub mod fault;
pub mod limit;
pub mod record;
pub mod request;
pub mod wrap;
