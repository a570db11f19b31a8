//! The device half of the sharing-model seam.
//!
//! After the ring has validated a descriptor chain, the device reaches the bytes of
//! each descriptor only through a [`DeviceMemory`], which the sharing model implements:
//! model 2 reads driver memory directly (bounds-checked), model 3 asks a trusted helper
//! that checks the descriptor is owned by the device, model 4 maps or copies grants,
//! model 1 touches only the shared bounce area. The ring itself uses the same trait to
//! fetch indirect descriptor tables, so no model is bypassed.

/// Where a descriptor sits: in the queue's descriptor table, or inside the indirect
/// table of its chain. Model 3's helper uses it to look the descriptor up in its
/// trusted view (an indirect table is always named by the last descriptor of the
/// chain's direct part, virtio 1.2 §2.7.5.3.1, so the head finds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DescSlot {
    /// Entry `0` of the descriptor table.
    Table(u16),
    /// Entry `0` of the chain's indirect table.
    Indirect(u16),
}

/// Marks the "writable" bit in `head_w` and the "indirect" bit in `slot`; queue sizes
/// are at most 32768, so indices never need bit 15.
const HIGH_BIT: u16 = 0x8000;

/// One validated descriptor of a chain, as the device sees it: a private copy, 16
/// bytes so that chains stay cheap to move.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Segment {
    addr: u64,
    len: u32,
    /// Head of the chain, with [`HIGH_BIT`] set when the segment is device-writable.
    head_w: u16,
    /// Position in its table, with [`HIGH_BIT`] set inside an indirect table.
    slot: u16,
}

impl Segment {
    /// A segment of `len` bytes at `addr` in the chain headed by `head`. Indices must
    /// be below 32768 (the largest queue size); higher bits are dropped.
    pub fn new(addr: u64, len: u32, writable: bool, head: u16, slot: DescSlot) -> Segment {
        let (index, indirect) = match slot {
            DescSlot::Table(i) => (i, 0),
            DescSlot::Indirect(i) => (i, HIGH_BIT),
        };
        Segment {
            addr,
            len,
            head_w: (head & !HIGH_BIT) | if writable { HIGH_BIT } else { 0 },
            slot: (index & !HIGH_BIT) | indirect,
        }
    }

    /// The descriptor's `addr` (its meaning depends on the sharing model).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The descriptor's `len`, non-zero.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Always false: zero-length descriptors never become segments.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the device may write it.
    pub fn writable(&self) -> bool {
        self.head_w & HIGH_BIT != 0
    }

    /// Head of the chain it belongs to.
    pub fn head(&self) -> u16 {
        self.head_w & !HIGH_BIT
    }

    /// Where the descriptor sits.
    pub fn slot(&self) -> DescSlot {
        let index = self.slot & !HIGH_BIT;
        if self.slot & HIGH_BIT != 0 {
            DescSlot::Indirect(index)
        } else {
            DescSlot::Table(index)
        }
    }
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("writable", &self.writable())
            .field("head", &self.head())
            .field("slot", &self.slot())
            .finish()
    }
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

/// One read of a batch: `dst.len()` bytes of `seg` from `offset`.
#[derive(Debug)]
pub struct ReadOp<'a> {
    /// The segment to read.
    pub seg: Segment,
    /// Offset inside the segment.
    pub offset: u32,
    /// Where the bytes go.
    pub dst: &'a mut [u8],
}

/// One write of a batch: `src` into `seg` at `offset`.
#[derive(Debug)]
pub struct WriteOp<'a> {
    /// The (writable) segment to write.
    pub seg: Segment,
    /// Offset inside the segment.
    pub offset: u32,
    /// The bytes to write.
    pub src: &'a [u8],
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

    /// Performs several reads in one call, in order; models whose every access costs a
    /// round trip (model 3's copy helper) override it to move the batch at once. Stops
    /// at the first refusal: the reads before it have been done.
    fn read_batch(&self, ops: &mut [ReadOp<'_>]) -> Result<(), AccessError> {
        ops.iter_mut()
            .try_for_each(|op| self.read(&op.seg, op.offset, op.dst))
    }

    /// Performs several writes in one call, in order; see [`Self::read_batch`].
    fn write_batch(&self, ops: &[WriteOp<'_>]) -> Result<(), AccessError> {
        ops.iter()
            .try_for_each(|op| self.write(&op.seg, op.offset, op.src))
    }
}

/// Forwards every method through a pointer type, so `&M` and `Arc<M>` are memories
/// too (one device memory shared by queue workers, or borrowed by a parser).
macro_rules! forward_device_memory {
    ($($ptr:ty),*) => {$(
        impl<M: DeviceMemory + ?Sized> DeviceMemory for $ptr {
            fn check(&self, seg: &Segment) -> Result<(), AccessError> {
                (**self).check(seg)
            }
            fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError> {
                (**self).read(seg, offset, dst)
            }
            fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError> {
                (**self).write(seg, offset, src)
            }
            fn read_batch(&self, ops: &mut [ReadOp<'_>]) -> Result<(), AccessError> {
                (**self).read_batch(ops)
            }
            fn write_batch(&self, ops: &[WriteOp<'_>]) -> Result<(), AccessError> {
                (**self).write_batch(ops)
            }
        }
    )*};
}

forward_device_memory!(&M, std::sync::Arc<M>);

/// Checks that `offset + len` stays inside `seg`; shared by every model.
pub fn check_within(seg: &Segment, offset: u32, len: usize) -> Result<(), AccessError> {
    let end = u64::from(offset).checked_add(len as u64);
    match end {
        Some(end) if end <= u64::from(seg.len()) => Ok(()),
        _ => Err(AccessError::PastSegment {
            offset: u64::from(offset),
            len: len as u64,
            seg_len: seg.len(),
        }),
    }
}
