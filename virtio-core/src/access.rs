//! The device half of the sharing-model seam.
//!
//! After the ring has validated a descriptor chain, the device reaches the bytes of
//! each descriptor only through a [`DeviceMemory`], which the sharing model implements:
//! model 2 reads driver memory directly (bounds-checked), model 3 asks a trusted helper
//! that checks the descriptor is owned by the device, model 4 maps or copies grants,
//! model 1 touches only the shared bounce area. The ring itself uses the same trait to
//! fetch indirect descriptor tables, so no model is bypassed.

use crate::shm::Region;

/// Where a descriptor sits: in the queue's descriptor table, or inside the indirect
/// table that a table descriptor points to. Model 3's helper uses it to look the
/// descriptor up in its trusted view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DescSlot {
    /// Entry `0` of the descriptor table.
    Table(u16),
    /// Entry `index` of the indirect table named by descriptor-table entry `table`.
    Indirect {
        /// The descriptor-table entry that carries `VIRTQ_DESC_F_INDIRECT`.
        table: u16,
        /// Position inside the indirect table.
        index: u16,
    },
}

/// One validated descriptor of a chain, as the device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// The descriptor's `addr` (meaning depends on the sharing model).
    pub addr: u64,
    /// The descriptor's `len`, non-zero.
    pub len: u32,
    /// Whether the device may write it.
    pub writable: bool,
    /// Head of the chain it belongs to.
    pub head: u16,
    /// Where the descriptor sits.
    pub slot: DescSlot,
}

/// Why the device's access to descriptor memory was refused.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The descriptor's range does not lie in memory the device may reach.
    #[error("descriptor range {addr:#x}+{len:#x} is outside reachable memory")]
    OutOfBounds {
        /// The descriptor address.
        addr: u64,
        /// The length that was asked for.
        len: u64,
    },
    /// An offset and length inside a segment went past its end.
    #[error("access {offset}+{len} past the end of a {seg_len}-byte segment")]
    PastSegment {
        /// Offset inside the segment.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Length of the segment.
        seg_len: u32,
    },
    /// A write to a device-readable segment, or a permission the model withholds.
    #[error("the sharing model does not allow this access")]
    Denied,
    /// The model refused for its own reason (ownership, grant state).
    #[error("sharing model refused the access")]
    Model(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// How the device side of a sharing model reaches descriptor memory.
///
/// Implementations must refuse (with an error, never a panic) any range outside what
/// their model lets the device touch. Callers pass segments produced by the ring's
/// validated chain walk, but implementations must not rely on that for memory safety.
pub trait DeviceMemory {
    /// Checks, before any byte moves, that the whole segment is reachable with its
    /// direction. The chain walk calls it once per descriptor.
    fn check(&self, seg: &Segment) -> Result<(), AccessError>;

    /// Copies `dst.len()` bytes from `seg` at `offset` into `dst`.
    fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError>;

    /// Copies `src` into the writable `seg` at `offset`.
    fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError>;

    /// Direct access to the segment's bytes where the model allows it (model 2), for
    /// hot loops and for handing buffers to the kernel. `None` means "copy instead".
    fn direct(&self, seg: &Segment) -> Option<Region> {
        let _ = seg;
        None
    }
}

impl<M: DeviceMemory + ?Sized> DeviceMemory for &M {
    fn check(&self, seg: &Segment) -> Result<(), AccessError> {
        (**self).check(seg)
    }
    fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError> {
        (**self).read(seg, offset, dst)
    }
    fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError> {
        (**self).write(seg, offset, src)
    }
    fn direct(&self, seg: &Segment) -> Option<Region> {
        (**self).direct(seg)
    }
}

impl<M: DeviceMemory + ?Sized> DeviceMemory for std::sync::Arc<M> {
    fn check(&self, seg: &Segment) -> Result<(), AccessError> {
        (**self).check(seg)
    }
    fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError> {
        (**self).read(seg, offset, dst)
    }
    fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError> {
        (**self).write(seg, offset, src)
    }
    fn direct(&self, seg: &Segment) -> Option<Region> {
        (**self).direct(seg)
    }
}

/// Checks that `offset + len` stays inside `seg`; shared by every model.
pub fn check_within(seg: &Segment, offset: u32, len: usize) -> Result<(), AccessError> {
    let end = u64::from(offset).checked_add(len as u64);
    match end {
        Some(end) if end <= u64::from(seg.len) => Ok(()),
        _ => Err(AccessError::PastSegment {
            offset: u64::from(offset),
            len: len as u64,
            seg_len: seg.len,
        }),
    }
}
