//! A sharing model that makes one queue hostile at its worst, deterministically,
//! for HOSTILE 34 tests of every device: the device's memory refuses every buffer
//! of that queue (so each chain is rejected at once) and, each time the device
//! looks at one, the guest has already published the next (the available index
//! moves on by one). A worker that loops "until the ring is empty" never gets out.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use virtio_core::DeviceModel;
use virtio_core::access::{AccessError, DeviceMemory, ReadOp, Segment, WriteOp};
use virtio_core::model::{DeviceQueue, ModelError, QueueAddrs};
use virtio_core::ring::areas::RingFormat;
use virtio_core::shm::Region;

/// How long a [`watched`] test may take before it is failed as hung.
pub const WATCHDOG: Duration = Duration::from_secs(20);

/// The hostile guest's side of one queue: once armed, every buffer of the queue
/// the device checks is refused, and every time the device checks a chain's head
/// descriptor the guest publishes the same head again.
#[derive(Debug, Default)]
pub struct Republisher {
    armed: AtomicBool,
    /// The queue's available ring, as the guest (driver) writes it; set it before
    /// [`Republisher::arm`].
    pub avail: OnceLock<Region>,
    /// Chains the device was handed and rejected.
    pub rejected: AtomicU64,
}

impl Republisher {
    /// Points every slot of the available ring (of a queue of `size`) at the head
    /// in slot 0, and starts.
    ///
    /// # Panics
    /// If [`Republisher::avail`] was not set or is too small (a test set-up error).
    pub fn arm(&self, size: u16) {
        let avail = self.avail.get().expect("ring set");
        let head = avail.load_u16(4, Ordering::Acquire).unwrap();
        for slot in 0..u64::from(size) {
            avail.write(4 + 2 * slot, &head.to_le_bytes()).unwrap();
        }
        self.armed.store(true, Ordering::Release);
    }

    /// Publishes one more entry (the device is looking at the last one).
    fn republish(&self) {
        let avail = self.avail.get().expect("ring set");
        let idx = avail.load_u16(2, Ordering::Acquire).unwrap();
        avail.write(2, &idx.wrapping_add(1).to_le_bytes()).unwrap();
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }
}

/// A device memory that is hostile for one queue (see [`Republisher`]).
#[derive(Debug)]
pub struct HostileMem<M> {
    inner: M,
    hostile: Option<Arc<Republisher>>,
}

impl<M: DeviceMemory> DeviceMemory for HostileMem<M> {
    fn check(&self, seg: &Segment) -> Result<(), AccessError> {
        if let Some(r) = &self.hostile
            && r.armed.load(Ordering::Acquire)
        {
            // One more chain per chain the device walks: it checks the head
            // descriptor first (the walk goes on through the rest of the chain).
            if seg.slot() == virtio_core::access::DescSlot::Table(seg.head()) {
                r.republish();
            }
            return Err(AccessError::Denied);
        }
        self.inner.check(seg)
    }
    fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError> {
        self.inner.read(seg, offset, dst)
    }
    fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError> {
        self.inner.write(seg, offset, src)
    }
    fn read_batch(&self, ops: &mut [ReadOp<'_>]) -> Result<(), AccessError> {
        self.inner.read_batch(ops)
    }
    fn write_batch(&self, ops: &[WriteOp<'_>]) -> Result<(), AccessError> {
        self.inner.write_batch(ops)
    }
}

/// A device model whose queue `queue` is hostile.
pub struct Hostile<V> {
    /// The real model.
    pub inner: V,
    /// The hostile queue.
    pub queue: u16,
    /// Its guest side.
    pub republisher: Arc<Republisher>,
}

impl<V: DeviceModel> DeviceModel for Hostile<V> {
    type Memory = HostileMem<V::Memory>;

    fn name(&self) -> &'static str {
        "hostile"
    }

    fn open_queue_in(
        &self,
        index: u16,
        format: RingFormat,
        size: u16,
        addrs: QueueAddrs,
    ) -> Result<DeviceQueue<Self::Memory>, ModelError> {
        let hostile = (index == self.queue).then(|| self.republisher.clone());
        Ok(self
            .inner
            .open_queue_in(index, format, size, addrs)?
            .map_memory(|inner| HostileMem { inner, hostile }))
    }
}

/// Runs `test` on its own thread and fails if it does not finish within
/// [`WATCHDOG`] (a worker that never stops hangs the device's reset). The hung
/// thread is left behind; the test binary ends anyway.
///
/// # Panics
/// If `test` panics or hangs.
pub fn watched(test: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        test();
        let _ = done.send(());
    });
    match finished.recv_timeout(WATCHDOG) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the test failed (see above)"),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("hung for {WATCHDOG:?}: the device's worker never returned")
        }
    }
}

/// A device model whose memory refuses every segment overlapping a range of guest
/// addresses, as a model refuses a buffer that crosses a gap between memory
/// regions, and serves the rest through the real model.
pub struct Refusing<V> {
    /// The real model.
    pub inner: V,
    /// Guest addresses the device may not reach.
    pub refused: std::ops::Range<u64>,
}

/// The memory of a [`Refusing`] model.
#[derive(Debug)]
pub struct RefusingMem<M> {
    inner: M,
    refused: std::ops::Range<u64>,
}

impl<M> RefusingMem<M> {
    fn check_range(&self, seg: &Segment) -> Result<(), AccessError> {
        let end = seg.addr().saturating_add(u64::from(seg.len()));
        if seg.addr() < self.refused.end && self.refused.start < end {
            return Err(AccessError::OutOfBounds {
                addr: seg.addr(),
                len: u64::from(seg.len()),
            });
        }
        Ok(())
    }
}

impl<M: DeviceMemory> DeviceMemory for RefusingMem<M> {
    fn check(&self, seg: &Segment) -> Result<(), AccessError> {
        self.check_range(seg)?;
        self.inner.check(seg)
    }
    fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError> {
        self.check_range(seg)?;
        self.inner.read(seg, offset, dst)
    }
    fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError> {
        self.check_range(seg)?;
        self.inner.write(seg, offset, src)
    }
}

impl<V: DeviceModel> DeviceModel for Refusing<V> {
    type Memory = RefusingMem<V::Memory>;

    fn name(&self) -> &'static str {
        "refusing"
    }

    fn open_queue_in(
        &self,
        index: u16,
        format: RingFormat,
        size: u16,
        addrs: QueueAddrs,
    ) -> Result<DeviceQueue<Self::Memory>, ModelError> {
        let refused = self.refused.clone();
        Ok(self
            .inner
            .open_queue_in(index, format, size, addrs)?
            .map_memory(|inner| RefusingMem { inner, refused }))
    }
}
