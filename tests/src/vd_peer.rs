//! rcore's `virtio-drivers` 0.13 as a peer: its unmodified guest drivers (`VirtIOBlk`,
//! ...) drive our device side through a [`Transport`](VdTransport) and a
//! [`Hal`](VdHal) of ours.
//!
//! - [`VdTransport`] presents our [`InProcessTransport`] (control plane, queue
//!   registers, kick and interrupt eventfds) as a `virtio_drivers::transport::Transport`.
//!   Queue addresses pass through unchanged: they are whatever the [`DmaBacking`]
//!   handed virtio-drivers as "physical addresses", which is exactly what a
//!   descriptor `addr` means in the sharing model (docs/ARCHITECTURE.md, the seam).
//! - [`VdHal`] is virtio-drivers' DMA interface. Its methods are associated functions
//!   without `self`, so the state behind them is a per-thread [`DmaBacking`] installed
//!   with [`install`]; the driver must be created, used and dropped on that thread
//!   while the [`Installed`] guard lives.
//! - Three backings, one per model the `Hal` can express:
//!   - [`DirectBacking`] (model 2): "physical" = guest address. Rings are allocated in
//!     guest memory; a buffer that already lives in guest memory is shared by its
//!     address (no copy), any other buffer (the caller's heap, virtio-drivers' boxed
//!     indirect tables) is bounced through a guest allocation, as swiotlb would.
//!   - [`SharedPageBacking`] (model 1): "physical" = offset into the shared region.
//!     Rings go into queue 0's ring slot, buffers are bounced through queue 0's bounce
//!     area with the model's own buddy allocator. A multi-queue device whose queues
//!     each carry one direction of buffers (virtio-net) is placed by a
//!     [`QueueRouting`] instead, since the `Hal` is never told the queue.
//!   - [`GrantBacking`] (model 4): "physical" = grant address (reference and offset).
//!     Ring pages are granted for the queue's life (descriptor table and available
//!     ring read-only), each buffer is bounced into guest memory and granted for one
//!     request, and its grant is ended before the bytes are copied back.
//!
//! Model 3 cannot be expressed: see the integration test
//! `tests/interop_virtio_drivers.rs` for why.
//!
//! Costs per buffer ([`VdHal::share`] / [`VdHal::unshare`]): model 2 zero-copy is a
//! range check; every bounce is a guest allocation (a mutex and a B-tree walk, or the
//! model-1 buddy allocator, O(1) in steady state), one `memcpy` in (or a zeroing for
//! device-writable buffers) and one `memcpy` back for device-writable buffers; model 4
//! adds a grant and an end-of-access (one grant-table lock each) and one hash-map
//! insert/remove to remember the bounce. Nothing here is tuned: virtio-drivers'
//! blocking API spins on the used ring anyway.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::Arc;

use hypervisor::{Domain, DomainId, GuestMemory};
use transport_grant::{GrantRange, GrantService};
use transport_shared_page::SharedPageDriver;
use transport_shared_page::bounce::{Block, BounceAlloc, MIN_BLOCK};
use virtio_core::lifecycle::ControlPlane;
use virtio_core::model::QueueAddrs;
use virtio_core::notify::Wait;
use virtio_core::shm::Region;
use virtio_core::transport::{DeviceHandler, InProcessTransport, Transport as _};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// What [`VdHal::share`] returns when it cannot share a buffer (the `Hal` has no error
/// channel). It names nothing in any model: outside guest memory (model 2), past any
/// shared region (model 1), and with reserved bits set for a grant address (model 4),
/// so the device refuses the request instead of touching something else.
pub const POISON: PhysAddr = 0x7ff0_0000_0000_0000;

/// `PAGE_SIZE` of virtio-drivers as a `u64`.
const VD_PAGE: u64 = PAGE_SIZE as u64;

/// Why the adapter could not be set up.
#[derive(Debug)]
pub enum VdError {
    /// The device id is not one virtio-drivers knows.
    DeviceType(u32),
    /// A backing is already installed on this thread.
    AlreadyInstalled,
    /// Guest memory refused an allocation or a view.
    Memory(hypervisor::MemoryError),
    /// The shared region or a bounce area is not as expected.
    SharedRegion(&'static str),
}

impl std::fmt::Display for VdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VdError::DeviceType(id) => write!(f, "unknown virtio device id {id}"),
            VdError::AlreadyInstalled => f.write_str("a DMA backing is already installed on this thread"),
            VdError::Memory(_) => f.write_str("guest memory refused"),
            VdError::SharedRegion(why) => write!(f, "shared region unusable: {why}"),
        }
    }
}

impl std::error::Error for VdError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VdError::Memory(e) => Some(e),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------
// Transport
// ---------------------------------------------------------------------------------

/// Our in-process transport as a virtio-drivers `Transport`.
///
/// Holds an `Arc` so the test keeps its own handle (status, handler inspection) while
/// the driver owns the adapter.
pub struct VdTransport<H> {
    inner: Arc<InProcessTransport<H>>,
    device_type: DeviceType,
    config_len: usize,
}

impl<H> std::fmt::Debug for VdTransport<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VdTransport")
            .field("device_type", &self.device_type)
            .field("config_len", &self.config_len)
            .finish_non_exhaustive()
    }
}

impl<H: DeviceHandler> VdTransport<H> {
    /// Wraps `inner`; fails if its device id is unknown to virtio-drivers.
    pub fn new(inner: Arc<InProcessTransport<H>>) -> Result<Self, VdError> {
        let (id, config_len) = (inner.device_id(), inner.config_len());
        let device_type = DeviceType::try_from(id).map_err(|_| VdError::DeviceType(id))?;
        Ok(VdTransport {
            inner,
            device_type,
            config_len,
        })
    }

    /// The transport behind the adapter.
    pub fn inner(&self) -> &Arc<InProcessTransport<H>> {
        &self.inner
    }

    /// Whether `[offset, offset + len)` lies inside the config space. Our
    /// `ControlPlane::read_config` answers out-of-range reads with zeros, which
    /// virtio-drivers would take for real values; its contract wants an error.
    fn config_range(&self, offset: usize, len: usize) -> virtio_drivers::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.config_len => Ok(()),
            _ if self.config_len == 0 => Err(virtio_drivers::Error::ConfigSpaceMissing),
            _ => Err(virtio_drivers::Error::ConfigSpaceTooSmall),
        }
    }
}

impl<H: DeviceHandler> Transport for VdTransport<H> {
    fn device_type(&self) -> DeviceType {
        self.device_type
    }

    fn read_device_features(&mut self) -> u64 {
        self.inner.device_features()
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner.set_driver_features(driver_features);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        u32::from(self.inner.queue_max_size(queue))
    }

    fn notify(&mut self, queue: u16) {
        if let Err(error) = self.inner.notify_queue(queue) {
            tracing::warn!(%error, queue, "kick failed");
        }
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_retain(u32::from(self.inner.status()))
    }

    fn set_status(&mut self, status: DeviceStatus) {
        // device_status is an 8-bit register (virtio 1.2 §4.1.4.3); a wider value is
        // refused like any other illegal register write.
        match u8::try_from(status.bits()) {
            Ok(v) => self.inner.set_status(v),
            Err(_) => tracing::warn!(?status, "status does not fit the 8-bit register"),
        }
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {
        // Legacy MMIO only; this transport is modern.
    }

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        let addrs = QueueAddrs {
            desc: descriptors,
            avail: driver_area,
            used: device_area,
        };
        let result = u16::try_from(size)
            .map_err(|_| "queue size does not fit 16 bits".to_string())
            .and_then(|size| {
                self.inner
                    .setup_queue(queue, size, addrs)
                    .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))
            });
        if let Err(error) = result {
            // `queue_set` cannot fail in virtio-drivers. Give up on the device as a
            // driver must (§3.1.1 step 8: FAILED), so DRIVER_OK is refused and the
            // device never serves a half-configured queue.
            tracing::warn!(%error, queue, size, ?addrs, "queue setup refused; setting FAILED");
            let failed = self.inner.status() | virtio_core::status::DeviceStatus::FAILED.bits();
            self.inner.set_status(failed);
        }
    }

    /// There is no per-queue reset (RING_RESET is not offered), and virtio-drivers
    /// calls this right before freeing the queue's memory (`VirtIOBlk::drop`). Resetting
    /// the device is the only way to guarantee the device stops touching that memory
    /// first: our transport returns from the reset only when the device has stopped
    /// (§2.4). Every other queue goes too, which is what the drop wants anyway.
    fn queue_unset(&mut self, queue: u16) {
        tracing::debug!(queue, "queue_unset: resetting the device");
        self.inner.set_status(0);
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        // Not "desc != 0": in model 1, address 0 is the first queue's descriptor table.
        self.inner
            .with_lifecycle(|l| l.queue(queue).is_some_and(|q| q.enabled))
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        // Only used-buffer notifications exist here: the in-process transport has no
        // configuration-change interrupt to report.
        let mut any = false;
        for q in 0..self.inner.num_queues() {
            if let Ok(fd) = self.inner.interrupt(q) {
                any |= fd.take().is_ok_and(|n| n > 0);
            }
        }
        if any {
            InterruptStatus::QUEUE_INTERRUPT
        } else {
            InterruptStatus::empty()
        }
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.config_generation()
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> virtio_drivers::Result<T> {
        self.config_range(offset, size_of::<T>())?;
        let mut value = T::new_zeroed();
        self.inner.read_config(offset, value.as_mut_bytes());
        Ok(value)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        self.config_range(offset, size_of::<T>())?;
        self.inner.write_config(offset, value.as_bytes());
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Hal
// ---------------------------------------------------------------------------------

/// A buffer coming back from the device.
#[derive(Debug)]
pub enum Unshare<'a> {
    /// The device only read it: nothing to copy back.
    Read(&'a [u8]),
    /// The device may have written it: copy back into it.
    Written(&'a mut [u8]),
}

impl Unshare<'_> {
    fn addr(&self) -> usize {
        match self {
            Unshare::Read(b) => b.as_ptr() as usize,
            Unshare::Written(b) => b.as_ptr() as usize,
        }
    }

    fn len(&self) -> usize {
        match self {
            Unshare::Read(b) => b.len(),
            Unshare::Written(b) => b.len(),
        }
    }
}

/// A buffer made visible to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shared {
    /// What the descriptor's `addr` holds.
    pub addr: PhysAddr,
    /// Whether its bytes were copied (or zeroed) into memory the device reaches.
    pub bounced: bool,
}

/// One sharing model's answer to virtio-drivers' DMA questions.
pub trait DmaBacking {
    /// The model's name.
    fn model(&self) -> &'static str;

    /// `pages` zeroed, contiguous 4 KiB pages: their model address and the host
    /// pointer the driver writes through, or `None` if there is no room.
    fn alloc(&mut self, pages: usize, direction: BufferDirection) -> Option<(PhysAddr, NonNull<u8>)>;

    /// Frees what [`Self::alloc`] returned. `false` if the pages had to be kept
    /// (logged): they may still be reachable by the device.
    fn dealloc(&mut self, paddr: PhysAddr, pages: usize) -> bool;

    /// Makes `buffer` visible to the device for one request.
    fn share(&mut self, buffer: &[u8], direction: BufferDirection) -> Option<Shared>;

    /// Ends what [`Self::share`] started, copying back a device-writable buffer.
    fn unshare(&mut self, paddr: PhysAddr, buffer: Unshare<'_>);

    /// The host pointer of `size` bytes at model address `paddr`, if the model has one.
    fn phys_to_virt(&self, paddr: PhysAddr, size: usize) -> Option<NonNull<u8>>;
}

/// Counters kept by [`VdHal`] for the installed backing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HalStats {
    /// DMA pages allocated and not yet freed.
    pub dma_pages: usize,
    /// Buffers shared and not yet unshared.
    pub shares: usize,
    /// Buffers shared by copying.
    pub bounced: u64,
    /// Buffers shared in place.
    pub in_place: u64,
    /// Allocations or shares refused (the driver got `DmaError` or a [`POISON`]
    /// address).
    pub refused: u64,
    /// DMA pages that could not be returned (still reachable by the device).
    pub leaked_pages: usize,
}

struct Current {
    backing: Box<dyn DmaBacking>,
    stats: HalStats,
}

thread_local! {
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
}

fn with_current<R>(f: impl FnOnce(Option<&mut Current>) -> R) -> R {
    CURRENT.with(|c| f(c.borrow_mut().as_mut()))
}

/// Keeps a backing installed on this thread; dropping it uninstalls it.
///
/// Drop every driver using [`VdHal`] first: their queues free their DMA pages on
/// drop, which needs the backing.
#[derive(Debug)]
pub struct Installed {
    // Thread-local state: the guard must not leave its thread.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        CURRENT.with(|c| {
            if let Some(cur) = c.borrow_mut().take()
                && (cur.stats.dma_pages != 0 || cur.stats.shares != 0)
            {
                tracing::warn!(stats = ?cur.stats, model = cur.backing.model(), "backing uninstalled while in use");
            }
        });
    }
}

/// Installs `backing` as this thread's [`VdHal`] state.
pub fn install(backing: impl DmaBacking + 'static) -> Result<Installed, VdError> {
    CURRENT.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_some() {
            return Err(VdError::AlreadyInstalled);
        }
        *c = Some(Current {
            backing: Box::new(backing),
            stats: HalStats::default(),
        });
        Ok(Installed {
            _not_send: std::marker::PhantomData,
        })
    })
}

/// The counters of this thread's backing, if one is installed.
pub fn stats() -> Option<HalStats> {
    with_current(|c| c.map(|c| c.stats))
}

/// virtio-drivers' `Hal` over this thread's [`DmaBacking`].
#[derive(Debug)]
pub struct VdHal;

// SAFETY: `dma_alloc` returns pointers into guest memory mappings that the backing
// keeps alive (it holds the `GuestMemory` or the shared `Region`) until `dma_dealloc`,
// page aligned (allocations are page aligned in guest memory, and the region is), from
// allocations no one else holds, zeroed by the backing. `mmio_phys_to_virt` returns a
// pointer into the same mappings or panics. `share`/`unshare` only copy between the
// caller's buffer and memory the backing allocated for it.
unsafe impl Hal for VdHal {
    fn dma_alloc(pages: usize, direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let got = with_current(|c| {
            let c = c?;
            let got = c.backing.alloc(pages, direction);
            match got {
                Some(_) => c.stats.dma_pages += pages,
                None => c.stats.refused += 1,
            }
            got
        });
        // virtio-drivers treats physical address 0 as failure (`Error::DmaError`).
        got.unwrap_or((0, NonNull::dangling()))
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        with_current(|c| match c {
            Some(c) => {
                c.stats.dma_pages = c.stats.dma_pages.saturating_sub(pages);
                if !c.backing.dealloc(paddr, pages) {
                    c.stats.leaked_pages += pages;
                }
            }
            None => tracing::error!(paddr, pages, "DMA freed with no backing installed: leaked"),
        });
        // A nonzero return makes virtio-drivers panic in `Drop`; a leak is logged and
        // counted instead.
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // Only virtio-drivers' PCI transport maps BARs; ours has no MMIO at all.
        with_current(|c| c.and_then(|c| c.backing.phys_to_virt(paddr, size)))
            .unwrap_or_else(|| panic!("no MMIO region at {paddr:#x}+{size:#x}: this transport has none"))
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        // SAFETY: the caller guarantees a valid, non-empty range no other thread
        // accesses during this call; we only read it.
        let bytes = unsafe { std::slice::from_raw_parts(buffer.cast::<u8>().as_ptr(), buffer.len()) };
        with_current(|c| {
            let Some(c) = c else { return POISON };
            match c.backing.share(bytes, direction) {
                Some(s) => {
                    c.stats.shares += 1;
                    if s.bounced {
                        c.stats.bounced += 1;
                    } else {
                        c.stats.in_place += 1;
                    }
                    s.addr
                }
                None => {
                    c.stats.refused += 1;
                    c.stats.shares += 1;
                    POISON
                }
            }
        })
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let ptr = buffer.cast::<u8>().as_ptr();
        let back = if direction == BufferDirection::DriverToDevice {
            // SAFETY: valid for reads and not accessed elsewhere during this call
            // (caller's contract); the device only read it, so a shared view suffices.
            Unshare::Read(unsafe { std::slice::from_raw_parts(ptr, buffer.len()) })
        } else {
            // SAFETY: as above; device-writable buffers come from `&mut [u8]` in
            // virtio-drivers, so they are writable and exclusively ours for the call.
            Unshare::Written(unsafe { std::slice::from_raw_parts_mut(ptr, buffer.len()) })
        };
        with_current(|c| {
            let Some(c) = c else { return };
            c.stats.shares = c.stats.shares.saturating_sub(1);
            if paddr != POISON {
                c.backing.unshare(paddr, back);
            }
        });
    }
}

fn host_ptr(region: &Region) -> Option<NonNull<u8>> {
    NonNull::new(region.as_ptr().cast_mut())
}

fn direction_readonly(direction: BufferDirection) -> bool {
    direction == BufferDirection::DriverToDevice
}

/// Copies a buffer the device cannot reach into fresh guest memory (device-writable
/// ones are zeroed instead) and returns its guest address; the caller frees it with
/// `buffer.len().max(1)` bytes.
fn stage_in_guest(memory: &GuestMemory, buffer: &[u8], direction: BufferDirection) -> Option<u64> {
    let len = buffer.len() as u64;
    // 16: indirect tables need it (virtio 1.2 §2.7.5.3); harmless for data.
    let gpa = memory.alloc(len.max(1), 16).ok()?;
    let filled = if direction_readonly(direction) {
        memory.write(gpa, buffer)
    } else {
        // The device may write less than it was given: never show it, or hand back,
        // what an earlier user of these bytes left.
        memory.region(gpa, len).and_then(|r| Ok(r.zero(0, len)?))
    };
    if filled.is_err() {
        let _ = memory.free(gpa, len.max(1));
        return None;
    }
    Some(gpa)
}

// ---------------------------------------------------------------------------------
// Model 2: guest addresses
// ---------------------------------------------------------------------------------

/// Model 2: "physical" addresses are guest addresses (see the module docs).
#[derive(Debug)]
pub struct DirectBacking {
    memory: Arc<GuestMemory>,
    /// The guest's own view of all its memory.
    full: Region,
}

impl DirectBacking {
    /// A backing over `guest`'s memory.
    pub fn new(guest: &Arc<Domain>) -> Result<DirectBacking, VdError> {
        let memory = guest.memory().clone();
        let full = memory
            .region(memory.base(), memory.size())
            .map_err(VdError::Memory)?;
        Ok(DirectBacking { memory, full })
    }

    /// The guest address of `buf` if it lies wholly in guest memory.
    fn in_guest(&self, addr: usize, len: usize) -> Option<u64> {
        let start = self.full.as_ptr() as usize;
        let off = addr.checked_sub(start)?;
        (off.checked_add(len)? <= self.full.len()).then(|| self.memory.base() + off as u64)
    }
}

impl DmaBacking for DirectBacking {
    fn model(&self) -> &'static str {
        "direct"
    }

    fn alloc(&mut self, pages: usize, _direction: BufferDirection) -> Option<(PhysAddr, NonNull<u8>)> {
        let len = (pages as u64).checked_mul(VD_PAGE)?;
        let gpa = self.memory.alloc(len, VD_PAGE).ok()?;
        let view = self.memory.region(gpa, len).ok()?;
        // Freed guest memory keeps its old bytes; `Hal::dma_alloc` promises zeros.
        view.zero(0, len).ok()?;
        Some((gpa, host_ptr(&view)?))
    }

    fn dealloc(&mut self, paddr: PhysAddr, pages: usize) -> bool {
        let len = pages as u64 * VD_PAGE;
        match self.memory.free(paddr, len) {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(%error, paddr, pages, "freeing DMA pages failed");
                false
            }
        }
    }

    fn share(&mut self, buffer: &[u8], direction: BufferDirection) -> Option<Shared> {
        if let Some(gpa) = self.in_guest(buffer.as_ptr() as usize, buffer.len()) {
            return Some(Shared {
                addr: gpa,
                bounced: false,
            });
        }
        let gpa = stage_in_guest(&self.memory, buffer, direction)?;
        Some(Shared {
            addr: gpa,
            bounced: true,
        })
    }

    fn unshare(&mut self, paddr: PhysAddr, buffer: Unshare<'_>) {
        if self.in_guest(buffer.addr(), buffer.len()).is_some() {
            return;
        }
        let len = buffer.len() as u64;
        if let Unshare::Written(buf) = buffer
            && let Err(error) = self.memory.read(paddr, buf)
        {
            tracing::error!(%error, paddr, "copying a bounce buffer back failed");
        }
        if let Err(error) = self.memory.free(paddr, len.max(1)) {
            tracing::error!(%error, paddr, "freeing a bounce buffer failed");
        }
    }

    fn phys_to_virt(&self, paddr: PhysAddr, size: usize) -> Option<NonNull<u8>> {
        host_ptr(&self.memory.region(paddr, size as u64).ok()?)
    }
}

/// A buffer in guest memory, for sharing in place under model 2.
#[derive(Debug)]
pub struct GuestBuffer {
    memory: Arc<GuestMemory>,
    gpa: u64,
    view: Region,
}

impl GuestBuffer {
    /// Allocates `len` zeroed bytes (at least 1) of `guest`'s memory, 512-byte aligned.
    pub fn new(guest: &Arc<Domain>, len: usize) -> Result<GuestBuffer, VdError> {
        let memory = guest.memory().clone();
        let len = (len as u64).max(1);
        let gpa = memory.alloc(len, 512).map_err(VdError::Memory)?;
        let view = memory.region(gpa, len).map_err(VdError::Memory)?;
        view.zero(0, len)
            .map_err(|e| VdError::Memory(hypervisor::MemoryError::from(e)))?;
        Ok(GuestBuffer { memory, gpa, view })
    }

    /// Its guest address.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// The bytes, for handing to a virtio-drivers call.
    ///
    /// The memory is guest memory a model-2 device may write at any time, like any
    /// DMA buffer; only hand it to the device through the driver.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `view` is a live, writable mapping of `len` bytes that this value
        // allocated and nothing else in the program references (the allocator hands
        // each range out once); `&mut self` makes the slice exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.view.as_ptr().cast_mut(), self.view.len()) }
    }
}

impl Drop for GuestBuffer {
    fn drop(&mut self) {
        let _ = self.memory.free(self.gpa, self.view.len() as u64);
    }
}

// ---------------------------------------------------------------------------------
// Model 1: offsets into the shared region
// ---------------------------------------------------------------------------------

/// Which model-1 queue each ring and each buffer of virtio-drivers belongs to.
///
/// The model confines every queue's rings to that queue's ring slot and its
/// descriptors to that queue's bounce area, but `Hal::dma_alloc` and `Hal::share`
/// are told only a direction, never a queue. A device whose queues each carry one
/// direction of buffers can still be expressed: virtio-net's receive queue holds only
/// device-writable buffers, its transmit queue only device-readable ones (frames, and
/// the indirect tables virtio-drivers builds for header plus frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRouting {
    /// The queues in the order the driver creates them. virtio-drivers' modern queue
    /// layout allocates, per queue, a device-readable area (descriptor table and
    /// available ring) and then a device-writable one (used ring); each device-readable
    /// ring allocation starts the next queue of this list, cyclically, so a second
    /// driver session on the same backing lands in the same slots.
    pub ring_order: Vec<u16>,
    /// The queue whose bounce area takes device-readable buffers.
    pub readable: u16,
    /// The queue whose bounce area takes device-writable buffers.
    pub writable: u16,
}

impl QueueRouting {
    /// Everything on queue 0: a single-queue device such as `VirtIOBlk`.
    pub fn single() -> QueueRouting {
        QueueRouting {
            ring_order: vec![0],
            readable: 0,
            writable: 0,
        }
    }

    /// virtio-drivers' `VirtIONet` / `VirtIONetRaw`: it creates the transmit queue (1)
    /// before the receive queue (0); frames it sends are device-readable, receive
    /// buffers device-writable.
    pub fn net() -> QueueRouting {
        QueueRouting {
            ring_order: vec![1, 0],
            readable: 1,
            writable: 0,
        }
    }

    fn queues(&self) -> Vec<u16> {
        let mut q: Vec<u16> = self.ring_order.clone();
        q.extend([self.readable, self.writable]);
        q.sort_unstable();
        q.dedup();
        q
    }
}

/// One queue's share of the region, as this backing hands it out.
struct QueueSpace {
    queue: u16,
    /// The queue's ring slot (model addresses).
    ring_slot: Range<u64>,
    /// Which pages of the slot (virtio-drivers' page size) are handed out.
    ring_used: Vec<bool>,
    bounce: Range<u64>,
    alloc: BounceAlloc,
}

/// Model 1: "physical" addresses are offsets into the shared region (see the module
/// docs). [`SharedPageBacking::new`] serves queue 0 only, which fits a single-queue
/// device; [`SharedPageBacking::with_routing`] serves several queues where a
/// [`QueueRouting`] can tell them apart.
pub struct SharedPageBacking {
    /// Keeps the region's driver side (and its view) alive.
    _driver: SharedPageDriver,
    shared: Region,
    routing: QueueRouting,
    queues: Vec<QueueSpace>,
    /// Device-readable ring allocations so far: which queue of the routing's ring
    /// order the current one is.
    rings_started: usize,
}

impl std::fmt::Debug for SharedPageBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slots: Vec<_> = self
            .queues
            .iter()
            .map(|q| (q.queue, q.ring_slot.clone(), q.bounce.clone()))
            .collect();
        f.debug_struct("SharedPageBacking")
            .field("routing", &self.routing)
            .field("queues", &slots)
            .finish_non_exhaustive()
    }
}

impl SharedPageBacking {
    /// A backing over the guest side of a model-1 region, serving queue 0 only
    /// ([`QueueRouting::single`]). The driver model's own `create_queue` must not be
    /// used alongside: this backing owns the queue's ring slot and bounce area.
    pub fn new(driver: SharedPageDriver) -> Result<SharedPageBacking, VdError> {
        Self::with_routing(driver, QueueRouting::single())
    }

    /// A backing over the guest side of a model-1 region, placing rings and buffers
    /// by `routing`. It owns the ring slots and bounce areas of every queue named.
    pub fn with_routing(
        driver: SharedPageDriver,
        routing: QueueRouting,
    ) -> Result<SharedPageBacking, VdError> {
        if routing.ring_order.is_empty() {
            return Err(VdError::SharedRegion("no queue to place rings for"));
        }
        let layout = *driver.layout();
        let queues = routing
            .queues()
            .into_iter()
            .map(|queue| {
                let missing = || VdError::SharedRegion("routing names a queue the region lacks");
                let ring_slot = layout.ring_slot(queue).ok_or_else(missing)?;
                let bounce = layout.bounce(queue).ok_or_else(missing)?;
                if ring_slot.start % VD_PAGE != 0 {
                    return Err(VdError::SharedRegion("ring slot not 4 KiB aligned"));
                }
                let pages = usize::try_from((ring_slot.end - ring_slot.start) / VD_PAGE)
                    .map_err(|_| VdError::SharedRegion("ring slot too large"))?;
                Ok(QueueSpace {
                    queue,
                    ring_slot,
                    ring_used: vec![false; pages],
                    alloc: BounceAlloc::new(bounce.end - bounce.start),
                    bounce,
                })
            })
            .collect::<Result<Vec<_>, VdError>>()?;
        let shared = driver.shared_region().clone();
        Ok(SharedPageBacking {
            _driver: driver,
            shared,
            routing,
            queues,
            rings_started: 0,
        })
    }
}

/// The space of `queue`; a free function so the shared region stays borrowable.
fn space_of(queues: &mut [QueueSpace], queue: u16) -> Option<&mut QueueSpace> {
    queues.iter_mut().find(|q| q.queue == queue)
}

impl QueueSpace {
    /// The bounce-area block of a buffer of `len` bytes at model address `paddr`
    /// (the allocator's order is a function of the length; it refuses a wrong one).
    fn block(&self, paddr: u64, len: usize) -> Option<Block> {
        let offset = u32::try_from(paddr.checked_sub(self.bounce.start)?).ok()?;
        let blocks = (len.max(1) as u64).div_ceil(MIN_BLOCK).next_power_of_two();
        let order = u8::try_from(blocks.trailing_zeros()).ok()?;
        Some(Block { offset, order })
    }
}

impl DmaBacking for SharedPageBacking {
    fn model(&self) -> &'static str {
        "shared-page"
    }

    fn alloc(&mut self, pages: usize, direction: BufferDirection) -> Option<(PhysAddr, NonNull<u8>)> {
        let order = &self.routing.ring_order;
        let nth = if direction == BufferDirection::DeviceToDriver {
            // The used ring joins the queue whose descriptor area came just before.
            self.rings_started.saturating_sub(1)
        } else {
            self.rings_started += 1;
            self.rings_started - 1
        };
        let queue = order[nth % order.len()];
        let space = space_of(&mut self.queues, queue)?;
        // Model address 0 is never handed out: virtio-drivers takes physical address 0
        // for an allocation failure (`Dma::new` returns `DmaError`). Queue 0's ring
        // slot starts at offset 0, so its first page stays unused (a slot sized for 256
        // entries has three pages; virtio-drivers' rings need two for up to 128).
        let first = (0..space.ring_used.len()).find(|&i| {
            space.ring_slot.start + i as u64 * VD_PAGE != 0
                && space
                    .ring_used
                    .get(i..i.saturating_add(pages))
                    .is_some_and(|s| s.iter().all(|u| !u))
        })?;
        let off = space.ring_slot.start + first as u64 * VD_PAGE;
        let len = pages as u64 * VD_PAGE;
        let view = self.shared.sub(off, len).ok()?;
        view.zero(0, len).ok()?;
        space.ring_used[first..first + pages].fill(true);
        Some((off, host_ptr(&view)?))
    }

    fn dealloc(&mut self, paddr: PhysAddr, pages: usize) -> bool {
        let Some(space) = self.queues.iter_mut().find(|q| q.ring_slot.contains(&paddr)) else {
            return false;
        };
        let Ok(first) = usize::try_from((paddr - space.ring_slot.start) / VD_PAGE) else {
            return false;
        };
        match space.ring_used.get_mut(first..first.saturating_add(pages)) {
            Some(s) => {
                s.fill(false);
                true
            }
            None => false,
        }
    }

    fn share(&mut self, buffer: &[u8], direction: BufferDirection) -> Option<Shared> {
        let len = u32::try_from(buffer.len()).ok()?;
        let queue = if direction_readonly(direction) {
            self.routing.readable
        } else {
            self.routing.writable
        };
        let space = space_of(&mut self.queues, queue)?;
        let block = space.alloc.alloc(len)?;
        let addr = space.bounce.start + u64::from(block.offset);
        let filled = if direction_readonly(direction) {
            self.shared.write(addr, buffer)
        } else {
            self.shared.zero(addr, u64::from(len))
        };
        if filled.is_err() {
            space.alloc.free(block);
            return None;
        }
        Some(Shared { addr, bounced: true })
    }

    fn unshare(&mut self, paddr: PhysAddr, buffer: Unshare<'_>) {
        let Some(space) = self.queues.iter_mut().find(|q| q.bounce.contains(&paddr)) else {
            tracing::error!(paddr, "unshare of an address outside the bounce areas");
            return;
        };
        let Some(block) = space.block(paddr, buffer.len()) else {
            tracing::error!(paddr, "unshare of an address outside the bounce area");
            return;
        };
        if let Unshare::Written(buf) = buffer
            && let Err(error) = self.shared.read(paddr, buf)
        {
            tracing::error!(%error, paddr, "copying a bounce block back failed");
        }
        if !space.alloc.free(block) {
            tracing::error!(paddr, ?block, "bounce block was not live");
        }
    }

    fn phys_to_virt(&self, paddr: PhysAddr, size: usize) -> Option<NonNull<u8>> {
        host_ptr(&self.shared.sub(paddr, size as u64).ok()?)
    }
}

// ---------------------------------------------------------------------------------
// Model 4: grant addresses
// ---------------------------------------------------------------------------------

/// Model 4: "physical" addresses are grant addresses (see the module docs).
pub struct GrantBacking {
    service: Arc<GrantService>,
    memory: Arc<GuestMemory>,
    guest: DomainId,
    backend: DomainId,
    /// Live ring allocations and bounces: grant address -> (grant, guest address).
    live: HashMap<u64, (GrantRange, u64)>,
}

impl std::fmt::Debug for GrantBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantBacking")
            .field("guest", &self.guest)
            .field("backend", &self.backend)
            .field("live", &self.live.len())
            .finish_non_exhaustive()
    }
}

impl GrantBacking {
    /// A backing granting `guest`'s memory to `backend` through `service`.
    pub fn new(service: &Arc<GrantService>, guest: &Arc<Domain>, backend: DomainId) -> GrantBacking {
        GrantBacking {
            service: service.clone(),
            memory: guest.memory().clone(),
            guest: guest.id(),
            backend,
            live: HashMap::new(),
        }
    }

    /// Grants `[gpa, gpa + len)` and remembers it under its grant address.
    fn grant(&mut self, gpa: u64, len: u64, readonly: bool) -> Option<u64> {
        let granted = u32::try_from(len).ok().and_then(|l| {
            self.service
                .grant_range(self.guest, self.backend, gpa, l, readonly)
                .ok()
        });
        let Some(range) = granted else {
            let _ = self.memory.free(gpa, len.max(1));
            return None;
        };
        self.live.insert(range.addr(), (range, gpa));
        Some(range.addr())
    }

    /// Ends the grant at `paddr`. `Some(gpa)` if the memory may be reused, `None` if
    /// the device still maps it (the memory must then be kept).
    fn end(&mut self, paddr: u64) -> Option<u64> {
        let (range, gpa) = self.live.remove(&paddr)?;
        let mut mapped = false;
        if let Err(error) = self
            .service
            .end_access_range(self.guest, &range, |_| mapped = true)
        {
            tracing::error!(%error, paddr, "ending a grant failed");
            return None;
        }
        if mapped {
            tracing::error!(paddr, "grant still mapped by the device: memory kept");
            return None;
        }
        Some(gpa)
    }
}

impl DmaBacking for GrantBacking {
    fn model(&self) -> &'static str {
        "grant"
    }

    fn alloc(&mut self, pages: usize, direction: BufferDirection) -> Option<(PhysAddr, NonNull<u8>)> {
        let len = (pages as u64).checked_mul(VD_PAGE)?;
        let gpa = self.memory.alloc(len, VD_PAGE).ok()?;
        let view = self.memory.region(gpa, len).ok()?;
        view.zero(0, len).ok()?;
        // Descriptor table and available ring: the device only reads them.
        let paddr = self.grant(gpa, len, direction_readonly(direction))?;
        Some((paddr, host_ptr(&view)?))
    }

    fn dealloc(&mut self, paddr: PhysAddr, pages: usize) -> bool {
        match self.end(paddr) {
            Some(gpa) => self.memory.free(gpa, pages as u64 * VD_PAGE).is_ok(),
            None => false,
        }
    }

    fn share(&mut self, buffer: &[u8], direction: BufferDirection) -> Option<Shared> {
        let len = buffer.len() as u64;
        let gpa = stage_in_guest(&self.memory, buffer, direction)?;
        let addr = self.grant(gpa, len, direction_readonly(direction))?;
        Some(Shared { addr, bounced: true })
    }

    fn unshare(&mut self, paddr: PhysAddr, buffer: Unshare<'_>) {
        let len = buffer.len() as u64;
        // Revoke first, then read: after the grant ends the device cannot change the
        // bytes under the copy.
        let Some(gpa) = self.end(paddr) else { return };
        if let Unshare::Written(buf) = buffer
            && let Err(error) = self.memory.read(gpa, buf)
        {
            tracing::error!(%error, paddr, "copying a bounce buffer back failed");
        }
        if let Err(error) = self.memory.free(gpa, len.max(1)) {
            tracing::error!(%error, paddr, "freeing a bounce buffer failed");
        }
    }

    fn phys_to_virt(&self, _paddr: PhysAddr, _size: usize) -> Option<NonNull<u8>> {
        None
    }
}
