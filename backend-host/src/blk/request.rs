//! Turning a validated descriptor chain into a block request (virtio 1.2 §5.2.6),
//! enforcing every rule the device can check.
//!
//! # Layout
//!
//! The ring has already validated the chain (bounds, loops, direction order,
//! §2.7.5); this module gives its bytes block-device meaning without assuming any
//! arrangement of descriptors (§2.7.4: "The device MUST NOT make assumptions about the
//! particular arrangement of descriptors"):
//!
//! - the header is the first 16 device-readable bytes, possibly split over several
//!   descriptors; it is read once into a private copy (HOSTILE 12);
//! - the status is the last device-writable byte, its own descriptor or the tail of
//!   the last writable one;
//! - data is the rest: device-readable bytes after the header (OUT, DISCARD,
//!   WRITE_ZEROES, SECURE_ERASE) or device-writable bytes before the status (IN,
//!   GET_ID, GET_LIFETIME). Data in the other direction is a driver error.
//!
//! # Outcomes
//!
//! [`Parser::parse`] returns a [`Request`] to execute, or a [`Reject`]:
//! [`Reject::NoStatus`] when there is no writable byte to report into (the head goes
//! back with used length 0 and nothing is written, HOSTILE 13), otherwise
//! [`Reject::Status`] naming the status byte, the code (`IOERR` or `UNSUPP`) and why.
//! Parsing never writes guest memory; only [`Request::write_status`] and
//! [`Reject::write_status`] do, and only the status byte.
//!
//! # Which status for which fault
//!
//! The spec defines `UNSUPP` as "a request unsupported by device" and `IOERR` as
//! "device or driver error" (§5.2.6). So: unknown types, types whose feature was not
//! negotiated, and the flag rules that §5.2.6.2 ties to `UNSUPP` give `UNSUPP`; every
//! broken driver MUST (§5.2.6.1) and every device limit gives `IOERR`. Checks run in
//! this order, and the first failure decides: type, feature, read-only disk, data
//! direction, lengths, segment limits, ranges. For range lists, the segment count is
//! checked before any segment is read (bounded work), and the flag rules of all
//! segments before any range, so that §5.2.6.2's `UNSUPP` MUST wins over the range
//! checks' `IOERR`.

use std::ops::Range;

use virtio_core::DeviceMemory;
use virtio_core::access::{AccessError, Segment};
use virtio_core::blk::{
    BlkDiscardWriteZeroes, BlkFeatures, BlkLifetime, BlkReqHeader, DeviceId, RangeError, ReqHeader,
    RequestType, SECTOR_SIZE, SectorRange, Status,
};
use virtio_core::ring::Chain;
use zerocopy::{FromZeros, IntoBytes};

// The wire sizes as u32, for chain arithmetic (virtio_core::blk::wire).
/// Header bytes.
const HEADER_LEN: u32 = BlkReqHeader::LEN;
/// Bytes of one range segment.
const RANGE_LEN: u32 = BlkDiscardWriteZeroes::LEN;
/// Bytes of a GET_ID reply.
const ID_LEN: u32 = DeviceId::LEN;
/// Bytes of a GET_LIFETIME reply.
const LIFETIME_LEN: u32 = BlkLifetime::LEN;
/// Bytes of a sector.
const SECTOR: u32 = 512;
const _: () = assert!(SECTOR as u64 == SECTOR_SIZE);

/// What the device knows about its disk and promised in its configuration space
/// (§5.2.4). The parser enforces these limits; the device must publish the same
/// numbers in `virtio_blk_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskFacts {
    /// Size in 512-byte sectors (`capacity`).
    pub capacity_sectors: u64,
    /// The device offers VIRTIO_BLK_F_RO: every write-type request fails (§5.2.6.2).
    pub read_only: bool,
    /// `blk_size`: the disk's logical block size in bytes. Informational for the
    /// protocol (units stay 512 bytes, §5.2.5); executors use it for alignment.
    pub blk_size: u32,
    /// `size_max`: largest data bytes in one descriptor, enforced when SIZE_MAX is
    /// negotiated.
    pub size_max: u32,
    /// `seg_max`: most descriptors carrying data, enforced when SEG_MAX is negotiated.
    pub seg_max: u32,
    /// `max_discard_sectors`: largest discard range.
    pub max_discard_sectors: u32,
    /// `max_discard_seg`: most ranges in a discard request.
    pub max_discard_seg: u32,
    /// `max_write_zeroes_sectors`: largest write-zeroes range.
    pub max_write_zeroes_sectors: u32,
    /// `max_write_zeroes_seg`: most ranges in a write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// `max_secure_erase_sectors`: largest secure-erase range.
    pub max_secure_erase_sectors: u32,
    /// `max_secure_erase_seg`: most ranges in a secure-erase request.
    pub max_secure_erase_seg: u32,
}

impl DiskFacts {
    /// A writable disk of `capacity_sectors` with 512-byte blocks, no size or segment
    /// limits (`u32::MAX`), and one range per discard, write-zeroes or secure-erase
    /// request of any length.
    pub fn new(capacity_sectors: u64) -> DiskFacts {
        DiskFacts {
            capacity_sectors,
            read_only: false,
            blk_size: 512,
            size_max: u32::MAX,
            seg_max: u32::MAX,
            max_discard_sectors: u32::MAX,
            max_discard_seg: 1,
            max_write_zeroes_sectors: u32::MAX,
            max_write_zeroes_seg: 1,
            max_secure_erase_sectors: u32::MAX,
            max_secure_erase_seg: 1,
        }
    }
}

/// Which part of a chain a [`SegmentSpan`] lies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The device-readable part ([`Chain::readable`]).
    Readable,
    /// The device-writable part ([`Chain::writable`]).
    Writable,
}

/// A run of bytes inside one part of a chain: `len` bytes from byte `offset` of the
/// part, whatever descriptors they fall in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSpan {
    /// The part.
    pub part: Part,
    /// First byte, counted from the start of the part.
    pub offset: u32,
    /// Length in bytes.
    pub len: u32,
}

/// One descriptor's share of a [`SegmentSpan`]: `len` bytes of `seg` from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// The chain segment.
    pub seg: Segment,
    /// Offset inside the segment.
    pub offset: u32,
    /// Bytes of the span in this segment, non-zero.
    pub len: u32,
}

/// Why copying a [`SegmentSpan`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SpanError {
    /// The buffer is not as long as the span.
    #[error("buffer of {got} bytes for a span of {span}")]
    Length {
        /// Span length.
        span: u32,
        /// Buffer length.
        got: usize,
    },
    /// The span does not lie inside the chain it was used with.
    #[error("span outside the chain")]
    OutsideChain,
    /// The sharing model refused the access.
    #[error("descriptor memory access failed")]
    Access(#[from] AccessError),
}

impl SegmentSpan {
    /// An empty span.
    pub const EMPTY: SegmentSpan = SegmentSpan {
        part: Part::Readable,
        offset: 0,
        len: 0,
    };

    /// Whether the span has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `len` bytes of this span from its byte `from`, or `None` if they do not
    /// lie inside it.
    pub fn sub(&self, from: u32, len: u32) -> Option<SegmentSpan> {
        let end = from.checked_add(len)?;
        if end > self.len {
            return None;
        }
        Some(SegmentSpan {
            part: self.part,
            offset: self.offset.checked_add(from)?,
            len,
        })
    }

    /// The byte range inside its part.
    pub fn range(&self) -> Range<u64> {
        let start = u64::from(self.offset);
        start..start + u64::from(self.len)
    }

    /// The pieces of `chain` the span covers, in order, without allocating. Pieces of
    /// a span longer than its part simply stop at the end of the part.
    pub fn pieces<'c>(&self, chain: &'c Chain) -> Pieces<'c> {
        let segs = match self.part {
            Part::Readable => chain.readable(),
            Part::Writable => chain.writable(),
        };
        Pieces {
            segs: segs.iter(),
            pos: 0,
            want: self.range(),
        }
    }

    /// Copies the span of `chain` into `dst` (`dst.len()` must equal `len`).
    ///
    /// # Errors
    /// Wrong buffer length, a span outside the chain, or a refused access.
    pub fn read<M: DeviceMemory>(&self, chain: &Chain, mem: &M, dst: &mut [u8]) -> Result<(), SpanError> {
        self.check_len(dst.len())?;
        let mut done = 0usize;
        for p in self.pieces(chain) {
            let n = p.len as usize;
            let out = dst.get_mut(done..done + n).ok_or(SpanError::OutsideChain)?;
            mem.read(&p.seg, p.offset, out)?;
            done += n;
        }
        self.check_complete(done)
    }

    /// Copies `src` into the span of `chain` (`src.len()` must equal `len`; the span
    /// must be in the writable part).
    ///
    /// # Errors
    /// Wrong buffer length, a span outside the chain, or a refused access (a
    /// readable span is refused by the sharing model before anything is written).
    pub fn write<M: DeviceMemory>(&self, chain: &Chain, mem: &M, src: &[u8]) -> Result<(), SpanError> {
        self.check_len(src.len())?;
        if self.part != Part::Writable && !self.is_empty() {
            return Err(SpanError::Access(AccessError::Denied));
        }
        let mut done = 0usize;
        for p in self.pieces(chain) {
            let n = p.len as usize;
            let from = src.get(done..done + n).ok_or(SpanError::OutsideChain)?;
            mem.write(&p.seg, p.offset, from)?;
            done += n;
        }
        self.check_complete(done)
    }

    fn check_len(&self, got: usize) -> Result<(), SpanError> {
        if got as u64 != u64::from(self.len) {
            return Err(SpanError::Length { span: self.len, got });
        }
        Ok(())
    }

    fn check_complete(&self, done: usize) -> Result<(), SpanError> {
        if done as u64 != u64::from(self.len) {
            return Err(SpanError::OutsideChain);
        }
        Ok(())
    }
}

/// Iterator of [`SegmentSpan::pieces`].
#[derive(Debug, Clone)]
pub struct Pieces<'c> {
    segs: std::slice::Iter<'c, Segment>,
    /// Part offset of the next segment's first byte.
    pos: u64,
    want: Range<u64>,
}

impl Iterator for Pieces<'_> {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        while self.want.start < self.want.end {
            let seg = self.segs.next()?;
            let start = self.pos;
            let end = start + u64::from(seg.len());
            self.pos = end;
            if end <= self.want.start {
                continue;
            }
            let from = self.want.start.max(start);
            let to = self.want.end.min(end);
            self.want.start = to;
            // Both bounds lie inside this segment, whose length is a u32.
            let offset = u32::try_from(from - start).ok()?;
            let len = u32::try_from(to - from).ok()?;
            return Some(Piece {
                seg: *seg,
                offset,
                len,
            });
        }
        None
    }
}

/// Where the status byte goes: the last byte of the chain's writable part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusTarget {
    seg: Segment,
    offset: u32,
    writable_len: u32,
}

impl StatusTarget {
    /// The writable segment holding the status byte.
    pub fn segment(&self) -> Segment {
        self.seg
    }

    /// Offset of the status byte inside [`Self::segment`].
    pub fn offset(&self) -> u32 {
        self.offset
    }

    /// Total writable bytes of the chain; the status byte is the last of them.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }

    /// Writes `status` into the status byte.
    ///
    /// # Errors
    /// The sharing model refused the write.
    pub fn write<M: DeviceMemory>(&self, mem: &M, status: Status) -> Result<(), AccessError> {
        mem.write(&self.seg, self.offset, &[status.raw()])
    }

    /// Completes a failed request: writes `status` into the status byte only and
    /// returns the used length to report, the whole writable part (as QEMU's
    /// `virtio_blk_req_complete` does, so models that copy back only the used length
    /// deliver the status), or 0 if the sharing model refused the write.
    pub fn write_failure<M: DeviceMemory>(&self, mem: &M, status: Status) -> u32 {
        match self.write(mem, status) {
            Ok(()) => self.writable_len,
            Err(_) => 0,
        }
    }

    /// Used length when only the status byte was written: 1 if it is the whole
    /// writable part, otherwise 0. §2.7.8.2: "The device MUST write at least len bytes
    /// to descriptor, beginning at the first device-writable buffer"; a status byte
    /// behind unwritten data is not such a prefix, and the spec's note allows `len`
    /// to be an underestimate.
    pub fn status_only_used_len(&self) -> u32 {
        u32::from(self.writable_len == 1)
    }
}

/// A sector range of a DISCARD, WRITE_ZEROES or SECURE_ERASE request, validated
/// against the disk: `offset + len` is at most the capacity in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    /// First sector.
    pub sector: u64,
    /// Sectors.
    pub num_sectors: u32,
    /// Byte offset on the disk (`sector * 512`).
    pub offset: u64,
    /// Bytes (`num_sectors * 512`).
    pub len: u64,
    /// The `unmap` flag (only ever set for WRITE_ZEROES): the device may deallocate
    /// as long as the range reads back as zeroes.
    pub unmap: bool,
}

/// What a parsed request asks for. Byte offsets and lengths are validated against
/// the capacity with checked arithmetic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// VIRTIO_BLK_T_IN: read `len` bytes at byte `offset` into the data span.
    Read {
        /// First sector.
        sector: u64,
        /// Byte offset on the disk (`sector * 512`).
        offset: u64,
        /// Bytes, a multiple of 512.
        len: u32,
    },
    /// VIRTIO_BLK_T_OUT: write the data span's `len` bytes at byte `offset`.
    Write {
        /// First sector.
        sector: u64,
        /// Byte offset on the disk (`sector * 512`).
        offset: u64,
        /// Bytes, a multiple of 512.
        len: u32,
    },
    /// VIRTIO_BLK_T_FLUSH (no data).
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the data span is exactly 20 writable bytes.
    GetId,
    /// VIRTIO_BLK_T_GET_LIFETIME: the data span is exactly 6 writable bytes.
    GetLifetime,
    /// VIRTIO_BLK_T_DISCARD: one or more ranges, none with `unmap`.
    Discard(Vec<BlockRange>),
    /// VIRTIO_BLK_T_WRITE_ZEROES: one or more ranges, each with its `unmap` flag.
    WriteZeroes(Vec<BlockRange>),
    /// VIRTIO_BLK_T_SECURE_ERASE: one or more ranges, none with `unmap`.
    SecureErase(Vec<BlockRange>),
}

/// A request that passed every check: what to do, where its data is and where its
/// status goes. Only [`Parser::parse`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    kind: RequestKind,
    data: SegmentSpan,
    status: StatusTarget,
}

impl Request {
    /// What to do.
    pub fn kind(&self) -> &RequestKind {
        &self.kind
    }

    /// What to do, by value (to move range lists out).
    pub fn into_kind(self) -> RequestKind {
        self.kind
    }

    /// The data: writable for Read, GetId and GetLifetime (starting at writable byte
    /// 0, so a [`virtio_core::ring::ChainWriter`] fills it in order); readable from
    /// byte 16 for Write and the range lists (the raw segments); empty for Flush.
    pub fn data(&self) -> SegmentSpan {
        self.data
    }

    /// The status byte.
    pub fn status_target(&self) -> StatusTarget {
        self.status
    }

    /// Writes `status` and returns the used length to report.
    ///
    /// `Status::Ok` promises that the whole data span of a Read / GetId / GetLifetime
    /// was written: the used length is then the data length plus the status byte (the
    /// whole writable part). For any other request, or a failed one, only the status
    /// byte counts, when it is the whole writable part (see
    /// [`StatusTarget::status_only_used_len`]).
    ///
    /// # Errors
    /// The sharing model refused the write; report used length 0 then.
    pub fn write_status<M: DeviceMemory>(&self, mem: &M, status: Status) -> Result<u32, AccessError> {
        self.status.write(mem, status)?;
        if status == Status::Ok && self.data.part == Part::Writable {
            // The data is every writable byte before the status: all of it is written.
            return Ok(self.status.writable_len);
        }
        Ok(self.status.status_only_used_len())
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// Fewer than 16 device-readable bytes: the header is missing or (partly)
    /// device-writable (HOSTILE 14).
    #[error("header not in the device-readable part ({readable} readable bytes)")]
    HeaderNotReadable {
        /// Device-readable bytes in the chain.
        readable: u32,
    },
    /// The sharing model refused a read of the header or of a range segment.
    #[error("descriptor memory refused the read")]
    Memory,
    /// `type` is not a request type of this device (§5.2.6).
    #[error("unknown request type {0}")]
    UnknownType(u32),
    /// The request type needs a feature the driver did not negotiate.
    #[error("{0:?} request without its feature negotiated")]
    NotNegotiated(RequestType),
    /// A write-type request to a read-only disk (§5.2.6.2).
    #[error("write to a read-only disk")]
    ReadOnly,
    /// Device-readable data in a request whose data the device writes (HOSTILE 14).
    #[error("{len} device-readable data bytes in a request that returns data")]
    ReadableData {
        /// Readable bytes after the header.
        len: u32,
    },
    /// Device-writable bytes before the status in a request that returns no data.
    #[error("{len} device-writable data bytes in a request that returns none")]
    WritableData {
        /// Writable bytes before the status.
        len: u32,
    },
    /// IN/OUT data not a multiple of 512 bytes (§5.2.6.1).
    #[error("data length {len} is not a multiple of 512")]
    NotSectorMultiple {
        /// Data bytes.
        len: u32,
    },
    /// IN/OUT past the capacity, or a sector whose byte offset overflows 64 bits.
    #[error("{len} bytes at sector {sector} are outside the disk")]
    OutOfRange {
        /// Requested sector.
        sector: u64,
        /// Data bytes.
        len: u32,
    },
    /// FLUSH with a non-zero sector (§5.2.6.1: the driver MUST set it to 0).
    #[error("flush with sector {0}")]
    FlushSector(u64),
    /// FLUSH carrying data.
    #[error("flush with {len} data bytes")]
    FlushWithData {
        /// Data bytes, readable and writable.
        len: u64,
    },
    /// GET_ID data not exactly 20 bytes (§5.2.6.1).
    #[error("get-ID data of {0} bytes instead of 20")]
    GetIdLength(u32),
    /// GET_LIFETIME data not exactly the 6 bytes of `virtio_blk_lifetime`.
    #[error("get-lifetime data of {0} bytes instead of 6")]
    LifetimeLength(u32),
    /// Range list empty or not a multiple of 16 bytes (§5.2.6.1).
    #[error("range list of {0} bytes is not a non-zero multiple of 16")]
    RangeListLength(u32),
    /// More ranges than `max_*_seg` (§5.2.6.1).
    #[error("{count} ranges, at most {max} allowed")]
    TooManyRanges {
        /// Ranges in the request.
        count: u32,
        /// The device's limit.
        max: u32,
    },
    /// `unmap` on a DISCARD or SECURE_ERASE range (§5.2.6.2).
    #[error("unmap flag on a {0:?} range")]
    UnmapNotAllowed(RequestType),
    /// Reserved flag bits set on a range (§5.2.6.2).
    #[error("unknown range flags {0:#x}")]
    UnknownFlags(u32),
    /// A range longer than `max_*_sectors`.
    #[error("range of {num_sectors} sectors, at most {max} allowed")]
    RangeTooLong {
        /// Sectors in the range.
        num_sectors: u32,
        /// The device's limit.
        max: u32,
    },
    /// A range past the capacity or wrapping around 2^64.
    #[error("range of {num_sectors} sectors at sector {sector} is outside the disk")]
    RangeOutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors.
        num_sectors: u32,
    },
    /// More data descriptors than `seg_max` (SEG_MAX negotiated).
    #[error("data in {count} descriptors, at most {max} allowed")]
    TooManyDataSegments {
        /// Descriptors carrying data.
        count: u32,
        /// `seg_max`.
        max: u32,
    },
    /// A descriptor with more data bytes than `size_max` (SIZE_MAX negotiated).
    #[error("{len} data bytes in one descriptor, at most {max} allowed")]
    DataSegmentTooLarge {
        /// Data bytes in the descriptor.
        len: u32,
        /// `size_max`.
        max: u32,
    },
}

impl RejectReason {
    /// The status the spec prescribes: `UNSUPP` for "a request unsupported by device",
    /// `IOERR` for "device or driver error" (§5.2.6).
    pub fn status(&self) -> Status {
        match self {
            RejectReason::UnknownType(_)
            | RejectReason::NotNegotiated(_)
            | RejectReason::UnmapNotAllowed(_)
            | RejectReason::UnknownFlags(_) => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// A request that is not executed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// No device-writable byte at all: nothing can be reported, the head goes back
    /// with used length 0 and nothing is written (HOSTILE 13).
    #[error("request has no device-writable status byte")]
    NoStatus,
    /// Complete with [`RejectReason::status`] written to `status`.
    #[error("request rejected")]
    Status {
        /// Where the status byte goes.
        status: StatusTarget,
        /// Why.
        #[source]
        reason: RejectReason,
    },
}

impl Reject {
    /// The status to report, if there is a status byte.
    pub fn code(&self) -> Option<Status> {
        match self {
            Reject::NoStatus => None,
            Reject::Status { reason, .. } => Some(reason.status()),
        }
    }

    /// Why, if there is a status byte.
    pub fn reason(&self) -> Option<RejectReason> {
        match self {
            Reject::NoStatus => None,
            Reject::Status { reason, .. } => Some(*reason),
        }
    }

    /// Writes the status byte, if any, and returns the used length to report: 0 for
    /// [`Reject::NoStatus`], else [`StatusTarget::status_only_used_len`].
    ///
    /// # Errors
    /// The sharing model refused the write; report used length 0 then.
    pub fn write_status<M: DeviceMemory>(&self, mem: &M) -> Result<u32, AccessError> {
        match self {
            Reject::NoStatus => Ok(0),
            Reject::Status { status, reason } => {
                status.write(mem, reason.status())?;
                Ok(status.status_only_used_len())
            }
        }
    }
}

/// Parses requests for one device: the negotiated features and the disk's facts,
/// fixed between resets.
///
/// ```
/// use backend_host::blk::request::{DiskFacts, Parser, RequestKind};
/// use virtio_core::blk::{BlkFeatures, BlkReqHeader, Status, VIRTIO_BLK_T_IN};
/// use virtio_core::features::Features;
/// use virtio_core::test_utils::{Arena, IdentityShare};
/// use virtio_core::{GuestBuf, DeviceRing, DriverRing};
/// use zerocopy::IntoBytes;
///
/// let arena = Arena::new(0x10_0000, 1 << 20).unwrap();
/// let (_, ring) = arena.alloc_split_ring(8).unwrap();
/// let share = IdentityShare::new(arena.clone(), 8);
/// let mut driver = DriverRing::new(8, ring.clone(), share, Features::VERSION_1).unwrap();
/// let mut device = DeviceRing::new(8, &ring, arena.clone(), Features::VERSION_1).unwrap();
///
/// // A one-sector read of sector 2: header, 512 data bytes, status.
/// let hdr = arena.alloc(16, 8).unwrap();
/// arena.write(hdr, BlkReqHeader::new(VIRTIO_BLK_T_IN, 2).as_bytes()).unwrap();
/// let data = arena.alloc(513, 8).unwrap();
/// driver.add(&[GuestBuf::new(hdr, 16)], &[GuestBuf::new(data, 513)], ()).unwrap();
///
/// let chain = device.pop().unwrap().unwrap();
/// let parser = Parser::new(BlkFeatures::FLUSH, DiskFacts::new(8));
/// let req = parser.parse(&chain, device.memory()).unwrap();
/// assert_eq!(req.kind(), &RequestKind::Read { sector: 2, offset: 1024, len: 512 });
/// req.data().write(&chain, device.memory(), &[0xab; 512]).unwrap();
/// let used = req.write_status(device.memory(), Status::Ok).unwrap();
/// device.add_used(chain.head(), used).unwrap();
/// assert_eq!(driver.pop_used().unwrap().unwrap().len, 513);
/// ```
#[derive(Debug, Clone)]
pub struct Parser {
    features: BlkFeatures,
    disk: DiskFacts,
    /// Capacity in bytes; capacities past 2^64 bytes are clamped (no real disk).
    capacity_bytes: u64,
}

impl Parser {
    /// A parser for `features` (the negotiated word's typed view) and `disk`.
    pub fn new(features: BlkFeatures, disk: DiskFacts) -> Parser {
        let capacity_bytes = disk.capacity_sectors.saturating_mul(SECTOR_SIZE);
        Parser {
            features,
            disk,
            capacity_bytes,
        }
    }

    /// The negotiated features.
    pub fn features(&self) -> BlkFeatures {
        self.features
    }

    /// The disk's facts.
    pub fn disk(&self) -> &DiskFacts {
        &self.disk
    }

    /// Parses `chain`, reading its header (and range segments) once through `mem`.
    /// Writes nothing.
    ///
    /// # Errors
    /// A [`Reject`] saying whether and what to report.
    pub fn parse<M: DeviceMemory>(&self, chain: &Chain, mem: &M) -> Result<Request, Reject> {
        // The status is the last writable byte; without one nothing can be reported.
        let Some(last) = chain.writable().last() else {
            return Err(Reject::NoStatus);
        };
        let status = StatusTarget {
            seg: *last,
            // Segments are never empty.
            offset: last.len().saturating_sub(1),
            writable_len: chain.writable_len(),
        };
        let reject = |reason| Reject::Status { status, reason };

        let readable = chain.readable_len();
        if readable < HEADER_LEN {
            return Err(reject(RejectReason::HeaderNotReadable { readable }));
        }
        // One private copy of the header (HOSTILE 12); it may span descriptors.
        let mut reader = chain.reader(mem);
        let mut header = BlkReqHeader::new_zeroed();
        if let Err(e) = reader.read_exact(header.as_mut_bytes()) {
            tracing::debug!(error = %e, head = chain.head(), "blk header unreadable");
            return Err(reject(RejectReason::Memory));
        }

        let rdata = SegmentSpan {
            part: Part::Readable,
            offset: HEADER_LEN,
            len: readable - HEADER_LEN,
        };
        let wdata = SegmentSpan {
            part: Part::Writable,
            offset: 0,
            len: status.writable_len - 1,
        };

        // The byte format is the wire module's (virtio_core::blk::wire); what follows
        // is this device's policy.
        let ReqHeader { ty, sector } =
            ReqHeader::from_wire(&header).map_err(|e| reject(RejectReason::UnknownType(e.0)))?;
        // §5.2.3: each of these types exists only with its feature.
        if ty.required_feature().is_some_and(|f| !self.features.contains(f)) {
            return Err(reject(RejectReason::NotNegotiated(ty)));
        }
        let writes = matches!(
            ty,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes | RequestType::SecureErase
        );
        // §5.2.6.2: "A device MUST set the status byte to VIRTIO_BLK_S_IOERR for a
        // write request if the VIRTIO_BLK_F_RO feature if offered, and MUST NOT write
        // any data." Discards and erases change the disk too. FLUSH is no write.
        if writes && self.disk.read_only {
            return Err(reject(RejectReason::ReadOnly));
        }

        let (kind, data) = match ty {
            RequestType::In => {
                no_data(rdata).map_err(|len| reject(RejectReason::ReadableData { len }))?;
                let (offset, len) = self.io_range(sector, wdata.len).map_err(reject)?;
                (RequestKind::Read { sector, offset, len }, wdata)
            }
            RequestType::Out => {
                no_data(wdata).map_err(|len| reject(RejectReason::WritableData { len }))?;
                let (offset, len) = self.io_range(sector, rdata.len).map_err(reject)?;
                (RequestKind::Write { sector, offset, len }, rdata)
            }
            RequestType::Flush => {
                // §5.2.6.1: "A driver MUST set sector to 0 for a VIRTIO_BLK_T_FLUSH
                // request. A driver SHOULD NOT include any data".
                if sector != 0 {
                    return Err(reject(RejectReason::FlushSector(sector)));
                }
                let len = u64::from(rdata.len) + u64::from(wdata.len);
                if len != 0 {
                    return Err(reject(RejectReason::FlushWithData { len }));
                }
                (RequestKind::Flush, SegmentSpan::EMPTY)
            }
            RequestType::GetId => {
                no_data(rdata).map_err(|len| reject(RejectReason::ReadableData { len }))?;
                if wdata.len != ID_LEN {
                    return Err(reject(RejectReason::GetIdLength(wdata.len)));
                }
                (RequestKind::GetId, wdata)
            }
            RequestType::GetLifetime => {
                no_data(rdata).map_err(|len| reject(RejectReason::ReadableData { len }))?;
                if wdata.len != LIFETIME_LEN {
                    return Err(reject(RejectReason::LifetimeLength(wdata.len)));
                }
                (RequestKind::GetLifetime, wdata)
            }
            RequestType::Discard | RequestType::WriteZeroes | RequestType::SecureErase => {
                no_data(wdata).map_err(|len| reject(RejectReason::WritableData { len }))?;
                let ranges = self.ranges(ty, rdata, &mut reader).map_err(reject)?;
                let kind = match ty {
                    RequestType::Discard => RequestKind::Discard(ranges),
                    RequestType::WriteZeroes => RequestKind::WriteZeroes(ranges),
                    _ => RequestKind::SecureErase(ranges),
                };
                (kind, rdata)
            }
        };
        self.check_data_segments(chain, data).map_err(reject)?;
        Ok(Request { kind, data, status })
    }

    /// Validates an IN/OUT transfer of `len` bytes at `sector`; returns the byte
    /// offset and length.
    fn io_range(&self, sector: u64, len: u32) -> Result<(u64, u32), RejectReason> {
        // §5.2.6.1: "The length of data MUST be a multiple of 512 bytes for
        // VIRTIO_BLK_T_IN and VIRTIO_BLK_T_OUT requests."
        if !len.is_multiple_of(SECTOR) {
            return Err(RejectReason::NotSectorMultiple { len });
        }
        // §5.2.6.1: "A driver MUST NOT submit a request which would cause a read or
        // write beyond capacity." checked_mul, not checked_shl: a shift drops the
        // high bits of sector >= 2^55 without failing (HOSTILE 15).
        let out = RejectReason::OutOfRange { sector, len };
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(out)?;
        let end = offset.checked_add(u64::from(len)).ok_or(out)?;
        if end > self.capacity_bytes {
            return Err(out);
        }
        Ok((offset, len))
    }

    /// Reads and validates the range list of a DISCARD / WRITE_ZEROES / SECURE_ERASE
    /// request; `reader` stands right after the header.
    fn ranges<M: DeviceMemory>(
        &self,
        ty: RequestType,
        data: SegmentSpan,
        reader: &mut virtio_core::ring::ChainReader<'_, M>,
    ) -> Result<Vec<BlockRange>, RejectReason> {
        let d = &self.disk;
        let (max_seg, max_sectors) = match ty {
            RequestType::Discard => (d.max_discard_seg, d.max_discard_sectors),
            RequestType::WriteZeroes => (d.max_write_zeroes_seg, d.max_write_zeroes_sectors),
            _ => (d.max_secure_erase_seg, d.max_secure_erase_sectors),
        };
        // §5.2.6.1: a multiple of the segment size, "one or more segments".
        if data.len == 0 || !data.len.is_multiple_of(RANGE_LEN) {
            return Err(RejectReason::RangeListLength(data.len));
        }
        let count = data.len / RANGE_LEN;
        // §5.2.6.1: "MUST NOT contain more than max_*_seg ... segments". Checked before
        // reading, so the work and the allocation are bounded by the device's limit.
        if count > max_seg {
            return Err(RejectReason::TooManyRanges { count, max: max_seg });
        }
        let mut ranges = Vec::with_capacity(count as usize);
        for _ in 0..count {
            // One private copy per segment; a segment may span descriptors.
            let mut seg = BlkDiscardWriteZeroes::new_zeroed();
            if let Err(e) = reader.read_exact(seg.as_mut_bytes()) {
                tracing::debug!(error = %e, "blk range segment unreadable");
                return Err(RejectReason::Memory);
            }
            let range = SectorRange::from_wire(&seg, ty).map_err(|e| match e {
                RangeError::UnknownFlags(f) => RejectReason::UnknownFlags(f),
                RangeError::UnmapNotAllowed(t) => RejectReason::UnmapNotAllowed(t),
            })?;
            ranges.push(BlockRange {
                sector: range.sector,
                num_sectors: range.num_sectors,
                offset: 0,
                len: 0,
                unmap: range.unmap,
            });
        }
        // Flags of every segment first (UNSUPP is a device MUST), then the ranges.
        for r in &mut ranges {
            if r.num_sectors > max_sectors {
                return Err(RejectReason::RangeTooLong {
                    num_sectors: r.num_sectors,
                    max: max_sectors,
                });
            }
            let out = RejectReason::RangeOutOfRange {
                sector: r.sector,
                num_sectors: r.num_sectors,
            };
            let len = u64::from(r.num_sectors) * SECTOR_SIZE;
            let offset = r.sector.checked_mul(SECTOR_SIZE).ok_or(out)?;
            let end = offset.checked_add(len).ok_or(out)?;
            if end > self.capacity_bytes {
                return Err(out);
            }
            r.offset = offset;
            r.len = len;
        }
        Ok(ranges)
    }

    /// SEG_MAX and SIZE_MAX, when negotiated, bound the descriptors carrying data
    /// (§5.2.3: "Maximum number of segments in a request", "Maximum size of any single
    /// segment"). Header and status are not data segments (Linux adds two descriptors
    /// for them on top of `seg_max`).
    fn check_data_segments(&self, chain: &Chain, data: SegmentSpan) -> Result<(), RejectReason> {
        let seg_max = self.features.contains(BlkFeatures::SEG_MAX);
        let size_max = self.features.contains(BlkFeatures::SIZE_MAX);
        if data.is_empty() || !(seg_max || size_max) {
            return Ok(());
        }
        let mut count: u32 = 0;
        for p in data.pieces(chain) {
            count = count.saturating_add(1);
            if size_max && p.len > self.disk.size_max {
                return Err(RejectReason::DataSegmentTooLarge {
                    len: p.len,
                    max: self.disk.size_max,
                });
            }
        }
        if seg_max && count > self.disk.seg_max {
            return Err(RejectReason::TooManyDataSegments {
                count,
                max: self.disk.seg_max,
            });
        }
        Ok(())
    }
}

/// `Ok` if `span` is empty, else its length.
fn no_data(span: SegmentSpan) -> Result<(), u32> {
    if span.is_empty() { Ok(()) } else { Err(span.len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u32, writable: bool) -> Segment {
        Segment::new(addr, len, writable, 0, virtio_core::DescSlot::Table(0))
    }

    #[test]
    fn reject_codes_follow_the_spec_definitions() {
        assert_eq!(RejectReason::UnknownType(99).status(), Status::Unsupp);
        assert_eq!(
            RejectReason::NotNegotiated(RequestType::Flush).status(),
            Status::Unsupp
        );
        assert_eq!(RejectReason::UnknownFlags(2).status(), Status::Unsupp);
        assert_eq!(
            RejectReason::UnmapNotAllowed(RequestType::Discard).status(),
            Status::Unsupp
        );
        assert_eq!(RejectReason::ReadOnly.status(), Status::IoErr);
        assert_eq!(RejectReason::FlushSector(1).status(), Status::IoErr);
        assert_eq!(RejectReason::GetIdLength(19).status(), Status::IoErr);
        assert_eq!(
            RejectReason::OutOfRange { sector: 1, len: 512 }.status(),
            Status::IoErr
        );
    }

    #[test]
    fn status_only_used_len_counts_a_prefix_only() {
        let one = StatusTarget {
            seg: seg(0x1000, 1, true),
            offset: 0,
            writable_len: 1,
        };
        let behind_data = StatusTarget {
            seg: seg(0x1000, 513, true),
            offset: 512,
            writable_len: 513,
        };
        assert_eq!(one.status_only_used_len(), 1);
        assert_eq!(behind_data.status_only_used_len(), 0);
    }

    #[test]
    fn no_data_reports_the_length() {
        assert_eq!(no_data(SegmentSpan::EMPTY), Ok(()));
        let s = SegmentSpan {
            part: Part::Writable,
            offset: 0,
            len: 7,
        };
        assert_eq!(no_data(s), Err(7));
        assert_eq!(s.range(), 0..7);
    }

    #[test]
    fn disk_facts_defaults_are_permissive() {
        let d = DiskFacts::new(8);
        assert_eq!(
            (d.capacity_sectors, d.read_only, d.max_discard_seg),
            (8, false, 1)
        );
        let p = Parser::new(BlkFeatures::empty(), DiskFacts::new(u64::MAX));
        assert_eq!(p.capacity_bytes, u64::MAX);
    }
}
