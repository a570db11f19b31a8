//! The trusted copy helper: the privileged half of model 3.
//!
//! It holds the guest's memory and, per queue, a [`Tracker`] of what the device owns.
//! The device side holds only an `Arc<CopyHelper>` and can do nothing with it but ask
//! for checked copies; its fields are private to this module.

use hypervisor::GuestMemory;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use virtio_core::RingMemory;
use virtio_core::shm::Mapping;
use virtio_core::shm::Region;
use virtio_core::{DescSlot, ModelError, QueueAddrs, ReadOp, Segment, WriteOp};

use super::tracker::{Desc, Tracker};
use crate::layout::{Bounds, Span, check_addrs};

/// Why the copy helper refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// No queue with this index is open (or the handle belongs to a closed queue).
    #[error("queue {0} is not open with the copy helper")]
    BadQueue(u16),
    /// The head is not a chain the device owns: never made available, or already used.
    #[error("head {head} is not owned by the device")]
    NotOwned {
        /// The head named.
        head: u16,
    },
    /// The chain at `head` has no descriptor at `slot`.
    #[error("descriptor {slot:?} is not in the chain at head {head}")]
    NotInChain {
        /// The head named.
        head: u16,
        /// The descriptor named.
        slot: DescSlot,
    },
    /// The range runs past the descriptor.
    #[error("range {offset}+{len} runs past a {desc_len}-byte descriptor")]
    OutOfDescriptor {
        /// Offset into the descriptor.
        offset: u32,
        /// Bytes asked for.
        len: u64,
        /// The descriptor's length.
        desc_len: u32,
    },
    /// A write to a device-readable descriptor, or a read of a device-writable one.
    #[error("descriptor {slot:?} is not device-{}", if *.write { "writable" } else { "readable" })]
    WrongDirection {
        /// The descriptor named.
        slot: DescSlot,
        /// Whether a write was asked for.
        write: bool,
    },
    /// The guest's descriptor names memory outside the guest.
    #[error("descriptor range {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// The descriptor's address.
        addr: u64,
        /// Its length.
        len: u32,
    },
}

impl CopyError {
    /// The helper's refusal inside an [`AccessError`](virtio_core::AccessError), if that
    /// is what it carries.
    pub fn of(e: &virtio_core::AccessError) -> Option<&CopyError> {
        match e {
            virtio_core::AccessError::Model(b) => b.downcast_ref(),
            _ => None,
        }
    }
}

impl From<CopyError> for virtio_core::AccessError {
    fn from(e: CopyError) -> Self {
        virtio_core::AccessError::Model(Box::new(e))
    }
}

/// One queue's slot in the helper.
#[derive(Debug, Default)]
struct QueueSlot {
    /// Size and addresses the driver wrote into the queue registers.
    published: Option<(u16, QueueAddrs)>,
    /// The device's open queue, if any.
    active: Option<Box<Active>>,
    /// The ring mappings handed to the device and not yet revoked: those of the open
    /// queue, plus any whose revocation failed (retried before the pages are freed).
    device_rings: Vec<Arc<Mapping>>,
}

impl QueueSlot {
    /// Stops serving the device's queue, if open, and revokes every ring mapping the
    /// device was given, so no region it holds (clones included) reaches the ring
    /// pages any more (HOSTILE 37). Mappings whose revocation fails stay listed.
    fn shut(&mut self, queue: u16) -> std::io::Result<()> {
        self.active = None;
        let mut result = Ok(());
        self.device_rings.retain(|m| match m.revoke() {
            Ok(()) => false,
            Err(e) => {
                tracing::error!(queue, error = %e, "revoking a device ring mapping failed");
                result = Err(e);
                true
            }
        });
        result
    }
}

#[derive(Debug)]
struct Active {
    generation: u64,
    tracker: Tracker,
}

/// The hypervisor's copy helper for one guest and the device serving it.
///
/// Every copy names `(queue, head, descriptor, offset, length)`; the helper checks that
/// the head is a chain the device owns (made available, not yet used), that the
/// descriptor belongs to that chain in the trusted descriptor table, that the direction
/// matches the descriptor and that the range lies inside it, and only then copies
/// between guest memory and the device's own buffer. Everything else is a
/// [`CopyError`].
///
/// Costs per call: one uncontended lock, one two-byte load of `used.idx`; per copy, an
/// array lookup for ownership, a cache lookup for membership (a walk of the trusted
/// chain on a miss) and the `memcpy`. Nothing is allocated.
pub struct CopyHelper {
    memory: Arc<GuestMemory>,
    queues: Box<[Mutex<QueueSlot>]>,
    next_generation: AtomicU64,
}

impl std::fmt::Debug for CopyHelper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyHelper")
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

impl CopyHelper {
    /// Queue indices the helper serves (`0..MAX_QUEUES`).
    pub const MAX_QUEUES: u16 = 256;

    pub(crate) fn new(memory: Arc<GuestMemory>) -> Arc<CopyHelper> {
        Arc::new(CopyHelper {
            memory,
            queues: (0..Self::MAX_QUEUES).map(|_| Mutex::default()).collect(),
            next_generation: AtomicU64::new(1),
        })
    }

    fn slot(&self, queue: u16) -> Result<MutexGuard<'_, QueueSlot>, CopyError> {
        let m = self
            .queues
            .get(usize::from(queue))
            .ok_or(CopyError::BadQueue(queue))?;
        // A panic while holding the lock cannot leave a tracker half-updated in a way
        // that grants access: counts only ever move by one with no invariant across them.
        Ok(m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Takes queue `queue` away from the device before the driver frees its ring
    /// pages (a reset, a queue created again): closes the device's queue and revokes
    /// its ring mappings. An error means a mapping could not be revoked; the caller must
    /// then keep the pages (HOSTILE 37).
    pub(crate) fn withdraw(&self, queue: u16) -> Result<(), ModelError> {
        let mut s = self.slot(queue).map_err(|e| ModelError::Model(Box::new(e)))?;
        s.published = None;
        s.shut(queue).map_err(|e| ModelError::Model(Box::new(e)))
    }

    /// Records the queue registers the driver wrote (the transport's job): only these
    /// addresses can be opened, so the device cannot point the helper's trusted view at
    /// arbitrary guest memory. Closes the device's queue of that index, if open.
    pub(crate) fn publish(&self, queue: u16, size: u16, addrs: QueueAddrs) -> Result<(), ModelError> {
        let mut s = self.slot(queue).map_err(|e| ModelError::Model(Box::new(e)))?;
        s.published = Some((size, addrs));
        s.shut(queue).map_err(|e| ModelError::Model(Box::new(e)))
    }

    /// Opens queue `queue` for the device: checks the addresses against what the
    /// driver published and the model-3 layout rules, maps the descriptor table and the
    /// available ring read-only and the used ring writable (fresh, MMU-enforced
    /// mappings of their pages only, kept here so they can be revoked), and starts
    /// tracking ownership. A queue the device already had open at this index is closed
    /// and its ring mappings revoked first.
    pub(crate) fn open(
        &self,
        queue: u16,
        size: u16,
        addrs: QueueAddrs,
    ) -> Result<(RingMemory, u64), ModelError> {
        let mut s = self.slot(queue).map_err(|e| ModelError::Model(Box::new(e)))?;
        if s.published != Some((size, addrs)) {
            tracing::debug!(queue, size, ?addrs, published = ?s.published, "queue not published by the driver");
            return Err(ModelError::BadAddrs(addrs));
        }
        let mem = &self.memory;
        let bounds = Bounds {
            base: mem.base(),
            size: mem.size(),
            page: mem.page_size(),
        };
        let rings = check_addrs(addrs, size, bounds, true)?;
        // A failure is logged and the mapping kept for `withdraw` to retry.
        let _ = s.shut(queue);
        let model = |e| ModelError::Model(Box::new(e));
        let mut mapped = Vec::with_capacity(3);
        let mut map = |span: Span, writable: bool| -> Result<Region, ModelError> {
            let pages = span.pages(bounds.page);
            let m = mem
                .map_pages_revocable(pages.gpa, pages.bytes, writable)
                .map_err(model)?;
            let r = m.region().sub(span.gpa - pages.gpa, span.bytes);
            mapped.push(m);
            r.map_err(|e| ModelError::Model(Box::new(e)))
        };
        let device = (|| {
            Ok::<_, ModelError>(RingMemory {
                desc: map(rings.desc, false)?,
                driver: map(rings.avail, false)?,
                device: map(rings.used, true)?,
            })
        })();
        // Listed even when a later step failed: the device may never see them, but
        // `shut` revoking them costs nothing.
        s.device_rings.append(&mut mapped);
        let device = device?;
        let trusted = RingMemory {
            desc: mem.region(rings.desc.gpa, rings.desc.bytes).map_err(model)?,
            driver: mem.region(rings.avail.gpa, rings.avail.bytes).map_err(model)?,
            device: mem.region(rings.used.gpa, rings.used.bytes).map_err(model)?,
        };
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        s.active = Some(Box::new(Active {
            generation,
            tracker: Tracker::new(size, trusted),
        }));
        Ok((device, generation))
    }

    /// Stops serving the device's queue opened as `generation` and revokes its ring
    /// mappings.
    pub(crate) fn close(&self, queue: u16, generation: u64) {
        if let Ok(mut s) = self.slot(queue)
            && s.active.as_ref().is_some_and(|a| a.generation == generation)
        {
            // A failure is logged and retried by `withdraw` before the pages are freed.
            let _ = s.shut(queue);
        }
    }

    /// Runs `f` on the open queue's tracker after accounting new completions.
    #[inline]
    fn with_queue<R>(
        &self,
        queue: u16,
        generation: Option<u64>,
        f: impl FnOnce(&mut Tracker, &GuestMemory) -> Result<R, CopyError>,
    ) -> Result<R, CopyError> {
        let mut s = self.slot(queue)?;
        let active = s
            .active
            .as_mut()
            .filter(|a| generation.is_none_or(|g| g == a.generation))
            .ok_or(CopyError::BadQueue(queue))?;
        active.tracker.refresh_used();
        f(&mut active.tracker, &self.memory)
    }

    /// Copies from guest memory into each `op.dst`, in order, in one call; stops at the
    /// first refusal (the copies before it are done).
    pub fn read(&self, queue: u16, ops: &mut [ReadOp<'_>]) -> Result<(), CopyError> {
        self.read_as(queue, None, ops)
    }

    /// Copies each `op.src` into guest memory, in order, in one call; stops at the first
    /// refusal (the copies before it are done).
    pub fn write(&self, queue: u16, ops: &[WriteOp<'_>]) -> Result<(), CopyError> {
        self.write_as(queue, None, ops)
    }

    /// Checks, without copying, that the device may reach all of `seg` in its
    /// direction.
    pub fn check(&self, queue: u16, seg: &Segment) -> Result<(), CopyError> {
        self.check_as(queue, None, seg)
    }

    pub(crate) fn read_as(
        &self,
        queue: u16,
        gen_: Option<u64>,
        ops: &mut [ReadOp<'_>],
    ) -> Result<(), CopyError> {
        self.with_queue(queue, gen_, |t, mem| {
            for op in ops.iter_mut() {
                let seg = op.seg;
                let d = t.resolve(mem, seg.head(), seg.slot())?;
                let gpa = target(&d, seg.slot(), op.offset, op.dst.len(), false)?;
                mem.read(gpa, op.dst).map_err(|_| outside(&d))?;
            }
            Ok(())
        })
    }

    pub(crate) fn write_as(
        &self,
        queue: u16,
        gen_: Option<u64>,
        ops: &[WriteOp<'_>],
    ) -> Result<(), CopyError> {
        self.with_queue(queue, gen_, |t, mem| {
            for op in ops {
                let seg = op.seg;
                let d = t.resolve(mem, seg.head(), seg.slot())?;
                let gpa = target(&d, seg.slot(), op.offset, op.src.len(), true)?;
                mem.write(gpa, op.src).map_err(|_| outside(&d))?;
            }
            Ok(())
        })
    }

    pub(crate) fn check_as(&self, queue: u16, gen_: Option<u64>, seg: &Segment) -> Result<(), CopyError> {
        self.with_queue(queue, gen_, |t, mem| {
            let d = t.resolve(mem, seg.head(), seg.slot())?;
            direction(&d, seg.slot(), seg.writable())?;
            mem.offset_of(d.addr, u64::from(d.len))
                .map(|_| ())
                .ok_or(outside(&d))
        })
    }
}

fn outside(d: &Desc) -> CopyError {
    CopyError::OutsideMemory {
        addr: d.addr,
        len: d.len,
    }
}

#[inline]
fn direction(d: &Desc, slot: DescSlot, write: bool) -> Result<(), CopyError> {
    let ok = if write { d.writable() } else { d.readable(slot) };
    if ok {
        Ok(())
    } else {
        Err(CopyError::WrongDirection { slot, write })
    }
}

/// Guest address of `[offset, offset + len)` inside descriptor `d`, checked.
#[inline]
fn target(d: &Desc, slot: DescSlot, offset: u32, len: usize, write: bool) -> Result<u64, CopyError> {
    direction(d, slot, write)?;
    let past = CopyError::OutOfDescriptor {
        offset,
        len: len as u64,
        desc_len: d.len,
    };
    let end = u64::from(offset).checked_add(len as u64).ok_or(past)?;
    if end > u64::from(d.len) {
        return Err(past);
    }
    d.addr.checked_add(u64::from(offset)).ok_or(outside(d))
}
