//! Descriptor chains: the validating walk, and the validated [`Chain`] a device serves.
//!
//! The walk enforces every rule of virtio 1.2 §2.7.5 and §2.7.5.3 that a device can
//! check, on a private copy of each descriptor (each shared field is fetched once):
//!
//! - at most the queue size of direct descriptors (§2.7.5.2), which also stops loops
//!   in the descriptor table;
//! - at most [`INDIRECT_MAX`] entries in an indirect table, and at most
//!   `max(queue size, INDIRECT_MAX)` descriptors in the whole chain, counting the
//!   direct descriptors and the entries of the table but not the descriptor that
//!   points to it; this also stops loops inside an indirect table. §2.7.5.3.1 asks
//!   the driver for no chain longer than the queue size, but Linux sizes indirect
//!   tables by `seg_max`, which a vhost-user device publishes before it learns the
//!   queue size; QEMU accepts tables of up to 1024 entries whatever the queue size,
//!   and so do we (docs/HOSTILE.md, rules 2 and 3);
//! - `next` inside the table it indexes;
//! - `VIRTQ_DESC_F_INDIRECT` only when negotiated, never with `NEXT`, never nested,
//!   with a length that is a non-zero multiple of 16 (§2.7.5.3.1);
//! - device-readable descriptors before device-writable ones (§2.7.4.2);
//! - `addr + len` without overflow, and every range accepted by the sharing model's
//!   [`DeviceMemory::check`] before any byte moves (a refused data descriptor does
//!   not end the walk: the rest of the chain is still validated, so a device whose
//!   requests end in a status byte can report the failure there, see
//!   [`SplitDevice::with_reject_status`](crate::SplitDevice::with_reject_status));
//! - total length below 2^32;
//! - zero-length descriptors counted against the limit and otherwise skipped.
//!
//! A packed ring's list (§2.8.6, §2.8.7) goes through the same checks in
//! `walk_packed`, once the ring has copied it out: its direct descriptors are
//! consecutive ring slots, bounded by the slots the driver has free, an indirect
//! descriptor must be the whole list, and an indirect table's entries are
//! consecutive (their `NEXT` flags and ids are ignored).

use crate::access::{AccessError, DescSlot, DeviceMemory, Segment, check_within};
use crate::ring::layout::{Descriptor, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::ring::packed::layout::PackedDescriptor;
use smallvec::SmallVec;
use zerocopy::FromBytes;

/// Most entries an indirect table may have, whatever the queue size.
///
/// The same bound as QEMU's `VIRTQUEUE_MAX_SIZE`: a Linux guest builds indirect tables
/// of up to `seg_max + 2` entries, and a device that offers `seg_max` must accept
/// them even on a smaller queue. The work and the scratch buffer per chain stay
/// bounded (16 KiB of table).
pub const INDIRECT_MAX: u16 = 1024;

/// Why a descriptor chain was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// More descriptors than the limit: too long, or a loop.
    #[error("chain longer than {limit} descriptors (too long or a loop)")]
    TooLong {
        /// The limit that was hit.
        limit: u16,
    },
    /// A `next` field points outside its table.
    #[error("descriptor {index} links to {next}, outside a table of {size}")]
    NextOutOfRange {
        /// Position of the descriptor.
        index: u16,
        /// Its `next` value.
        next: u16,
        /// Size of the table it indexes.
        size: u16,
    },
    /// INDIRECT used without VIRTIO_F_INDIRECT_DESC.
    #[error("indirect descriptor used without negotiating INDIRECT_DESC")]
    IndirectNotNegotiated,
    /// An indirect table contains an indirect descriptor.
    #[error("nested indirect descriptor")]
    NestedIndirect,
    /// A descriptor carries both INDIRECT and NEXT.
    #[error("indirect descriptor also has NEXT set")]
    IndirectWithNext,
    /// A packed ring's list mixes an indirect descriptor with other descriptors
    /// (virtio 1.2 §2.8.7: each list holds descriptors of one type).
    #[error("indirect descriptor inside a packed descriptor list")]
    IndirectInList,
    /// Indirect table length 0 or not a multiple of 16.
    #[error("indirect table length {0} is not a non-zero multiple of 16")]
    IndirectLength(u32),
    /// Indirect table with more entries than allowed.
    #[error("indirect table of {entries} entries exceeds the limit of {limit}")]
    IndirectTooLarge {
        /// Entries in the table.
        entries: u32,
        /// The limit.
        limit: u16,
    },
    /// A device-readable descriptor after a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// `addr + len` wraps around the address space.
    #[error("descriptor range {addr:#x}+{len:#x} overflows")]
    AddrOverflow {
        /// Descriptor address.
        addr: u64,
        /// Descriptor length.
        len: u32,
    },
    /// The chain's total length reaches 2^32 bytes.
    #[error("chain carries 2^32 bytes or more")]
    TooManyBytes,
    /// The sharing model refused a descriptor's range.
    #[error("descriptor memory unreachable")]
    Access(#[from] AccessError),
}

/// Segments kept inline before spilling to the heap; most requests have at most 4.
const INLINE_SEGMENTS: usize = 4;

/// A validated descriptor chain, owned by the device until it is returned as used.
///
/// Holds private copies of the descriptors: nothing the driver does after the walk can
/// change what the device sees.
#[derive(Debug, Clone)]
pub struct Chain {
    head: u16,
    segs: SmallVec<[Segment; INLINE_SEGMENTS]>,
    n_readable: usize,
    readable_len: u32,
    writable_len: u32,
}

impl Chain {
    /// A chain with no segments yet, for the walk to fill.
    pub(crate) fn empty(head: u16) -> Chain {
        Chain {
            head,
            segs: SmallVec::new(),
            n_readable: 0,
            readable_len: 0,
            writable_len: 0,
        }
    }

    /// Head descriptor index, the id reported in the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Device-readable segments, in order (zero-length descriptors omitted).
    pub fn readable(&self) -> &[Segment] {
        &self.segs[..self.n_readable]
    }

    /// Device-writable segments, in order (zero-length descriptors omitted).
    pub fn writable(&self) -> &[Segment] {
        &self.segs[self.n_readable..]
    }

    /// Total device-readable bytes.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }

    /// Total device-writable bytes; the most a used length may report.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }

    /// A cursor that reads the readable part front to back through `mem`.
    pub fn reader<'a, M: DeviceMemory>(&'a self, mem: &'a M) -> ChainReader<'a, M> {
        ChainReader {
            cursor: Cursor::new(self.readable()),
            mem,
        }
    }

    /// A cursor that writes the writable part front to back through `mem`.
    pub fn writer<'a, M: DeviceMemory>(&'a self, mem: &'a M) -> ChainWriter<'a, M> {
        ChainWriter {
            cursor: Cursor::new(self.writable()),
            mem,
        }
    }
}

/// Position inside a list of segments.
struct Cursor<'a> {
    segs: &'a [Segment],
    seg: usize,
    off: u32,
    done: u64,
}

impl<'a> Cursor<'a> {
    fn new(segs: &'a [Segment]) -> Self {
        Cursor {
            segs,
            seg: 0,
            off: 0,
            done: 0,
        }
    }

    fn remaining(&self) -> u64 {
        let total: u64 = self.segs.iter().map(|s| u64::from(s.len())).sum();
        total - self.done
    }

    /// Runs `op(segment, offset, range_in_buf)` over the pieces covering `len` bytes.
    fn step(
        &mut self,
        len: usize,
        mut op: impl FnMut(&Segment, u32, std::ops::Range<usize>) -> Result<(), AccessError>,
    ) -> Result<usize, AccessError> {
        let mut moved = 0;
        while moved < len {
            let Some(seg) = self.segs.get(self.seg) else { break };
            let avail = (seg.len() - self.off) as usize;
            let n = avail.min(len - moved);
            check_within(seg, self.off, n)?;
            op(seg, self.off, moved..moved + n)?;
            moved += n;
            self.done += n as u64;
            if n == avail {
                self.seg += 1;
                self.off = 0;
            } else {
                // n < avail <= u32::MAX, so the sum stays below seg.len.
                self.off += u32::try_from(n).unwrap_or(u32::MAX);
            }
        }
        Ok(moved)
    }
}

/// Error of [`ChainReader::read_exact`] and [`ChainWriter::write_all`].
#[derive(Debug, thiserror::Error)]
pub enum ChainIoError {
    /// The chain has fewer bytes left than asked for.
    #[error("chain has {left} bytes left, {wanted} wanted")]
    Short {
        /// Bytes left in the chain part.
        left: u64,
        /// Bytes asked for.
        wanted: usize,
    },
    /// The sharing model refused the access.
    #[error("descriptor memory access failed")]
    Access(#[from] AccessError),
}

/// Reads the device-readable part of a [`Chain`] in order.
pub struct ChainReader<'a, M> {
    cursor: Cursor<'a>,
    mem: &'a M,
}

impl<M: DeviceMemory> ChainReader<'_, M> {
    /// Reads up to `buf.len()` bytes; returns how many (0 at the end).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, AccessError> {
        let mem = self.mem;
        self.cursor
            .step(buf.len(), |seg, off, r| mem.read(seg, off, &mut buf[r]))
    }

    /// Reads exactly `buf.len()` bytes or fails without guessing.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ChainIoError> {
        let left = self.cursor.remaining();
        if (buf.len() as u64) > left {
            return Err(ChainIoError::Short {
                left,
                wanted: buf.len(),
            });
        }
        self.read(buf)?;
        Ok(())
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> u64 {
        self.cursor.remaining()
    }
}

/// Writes the device-writable part of a [`Chain`] in order, counting bytes written.
pub struct ChainWriter<'a, M> {
    cursor: Cursor<'a>,
    mem: &'a M,
}

impl<M: DeviceMemory> ChainWriter<'_, M> {
    /// Writes up to `buf.len()` bytes; returns how many (0 when full).
    pub fn write(&mut self, buf: &[u8]) -> Result<usize, AccessError> {
        let mem = self.mem;
        self.cursor
            .step(buf.len(), |seg, off, r| mem.write(seg, off, &buf[r]))
    }

    /// Writes all of `buf` or fails before writing anything if it cannot fit.
    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), ChainIoError> {
        let left = self.cursor.remaining();
        if (buf.len() as u64) > left {
            return Err(ChainIoError::Short {
                left,
                wanted: buf.len(),
            });
        }
        self.write(buf)?;
        Ok(())
    }

    /// Bytes written so far: the used length to report.
    pub fn written(&self) -> u32 {
        // The writable part is below 2^32 bytes by validation.
        u32::try_from(self.cursor.done).unwrap_or(u32::MAX)
    }

    /// Bytes of writable space left.
    pub fn remaining(&self) -> u64 {
        self.cursor.remaining()
    }
}

/// What a walk that failed only because the sharing model refused some data
/// descriptor knows about the rest of the chain, which is otherwise well formed.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Refused {
    /// The chain's last device-writable descriptor, when the model accepted it.
    pub last_writable: Option<Segment>,
    /// Writable bytes of the whole chain, refused descriptors included.
    pub writable_len: u32,
}

impl Refused {
    /// The used length to report for a chain rejected for `source`, both ring
    /// formats alike: with a reject `status` (see `SplitDevice::with_reject_status`)
    /// and a chain that was well formed but named memory the model refuses, the
    /// status goes into the last writable byte, when the model accepts that
    /// descriptor, and the whole writable length is reported; otherwise 0.
    pub(crate) fn used_len<M: DeviceMemory>(&self, source: &ChainError, status: Option<u8>, mem: &M) -> u32 {
        let (ChainError::Access(_), Some(status), Some(last)) = (source, status, &self.last_writable) else {
            return 0;
        };
        // Segments are never empty.
        match mem.write(last, last.len() - 1, &[status]) {
            Ok(()) => self.writable_len,
            Err(e) => {
                tracing::debug!(error = %e, "status byte of a rejected chain unreachable");
                0
            }
        }
    }
}

/// One descriptor as fetched from shared memory: `(addr, len, flags, next)`.
pub(crate) type RawDesc = (u64, u32, u16, u16);

/// Walks the chain starting at `head`, reading table entries with `read` (indices
/// below `size` only) and indirect tables through `mem`.
/// Fills `chain`, which must be empty (see [`Chain::empty`]); on error its content
/// is meaningless. When the only fault is descriptors the sharing model refused,
/// the error is the first refusal and `refused` says what the rest of the chain
/// holds.
pub(crate) fn walk<M: DeviceMemory>(
    chain: &mut Chain,
    size: u16,
    read: impl Fn(u16) -> RawDesc,
    mem: &M,
    indirect_ok: bool,
    scratch: &mut Vec<u8>,
    refused: &mut Refused,
) -> Result<(), ChainError> {
    let mut b = Builder::new(chain);
    b.walk(size, read, mem, indirect_ok, scratch)?;
    b.finish(refused)
}

/// One packed descriptor as fetched from the ring, with its slot:
/// `(slot, (addr, len, flags, id))`.
pub(crate) type PackedRawDesc = (u16, RawDesc);

/// Validates a packed-ring list (virtio 1.2 §2.8.6, §2.8.7) whose descriptors the
/// ring already copied out, in order, into `descs` (the ring bounds their number
/// and takes the buffer id from the last one). The rules are those of [`walk`],
/// except that an indirect descriptor must be the whole list (§2.8.7), and an
/// indirect table's entries are consecutive: their `NEXT` flags and ids are
/// ignored (§2.8.7), an `INDIRECT` flag among them is refused as nested. Segments
/// name their ring slot ([`DescSlot::Table`]) or table entry; `chain`'s head is
/// the buffer id.
pub(crate) fn walk_packed<M: DeviceMemory>(
    chain: &mut Chain,
    descs: &[PackedRawDesc],
    size: u16,
    mem: &M,
    indirect_ok: bool,
    scratch: &mut Vec<u8>,
    refused: &mut Refused,
) -> Result<(), ChainError> {
    let mut b = Builder::new(chain);
    b.walk_packed(descs, size, mem, indirect_ok, scratch)?;
    b.finish(refused)
}

struct Builder<'c> {
    chain: &'c mut Chain,
    seen_writable: bool,
    /// Descriptors taken so far (zero-length ones included).
    count: u16,
    /// The first refusal of the sharing model, if any.
    refused: Option<AccessError>,
    /// The last writable descriptor seen, if the model accepted it.
    last_writable: Option<Segment>,
    /// Writable bytes in refused descriptors.
    refused_writable: u64,
    /// Readable bytes in refused descriptors: they count toward the 2^32 total
    /// as much as accepted ones (HOSTILE 7).
    refused_readable: u64,
}

impl<'c> Builder<'c> {
    fn new(chain: &'c mut Chain) -> Builder<'c> {
        Builder {
            chain,
            seen_writable: false,
            count: 0,
            refused: None,
            last_writable: None,
            refused_writable: 0,
            refused_readable: 0,
        }
    }

    /// Ends a walk whose structure was sound: fails with the first refusal of the
    /// sharing model, if any, filling `refused`.
    #[inline(always)]
    fn finish(self, refused: &mut Refused) -> Result<(), ChainError> {
        match self.refused {
            None => Ok(()),
            Some(e) => {
                let writable = u64::from(self.chain.writable_len) + self.refused_writable;
                *refused = Refused {
                    last_writable: self.last_writable,
                    // Below 2^32: the walk's total-length check counted refused bytes.
                    writable_len: u32::try_from(writable).unwrap_or(u32::MAX),
                };
                Err(ChainError::Access(e))
            }
        }
    }

    fn walk<M: DeviceMemory>(
        &mut self,
        size: u16,
        read: impl Fn(u16) -> RawDesc,
        mem: &M,
        indirect_ok: bool,
        scratch: &mut Vec<u8>,
    ) -> Result<(), ChainError> {
        let b = self;
        let mut idx = b.chain.head;
        let mut steps: u32 = 0;
        loop {
            steps += 1;
            if steps > u32::from(size) {
                return Err(ChainError::TooLong { limit: size });
            }
            let (addr, len, flags, next) = read(idx);
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if !indirect_ok {
                    return Err(ChainError::IndirectNotNegotiated);
                }
                if flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(ChainError::IndirectWithNext);
                }
                // Whatever the direct part used is no longer available to the table.
                let limit = size.max(INDIRECT_MAX);
                let left = limit - b.count;
                b.indirect(idx, addr, len, (limit, left), mem, scratch)?;
                break;
            }
            b.push(addr, len, flags, DescSlot::Table(idx), mem)?;
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                break;
            }
            if next >= size {
                return Err(ChainError::NextOutOfRange {
                    index: idx,
                    next,
                    size,
                });
            }
            idx = next;
        }
        Ok(())
    }

    #[inline(always)]
    fn push<M: DeviceMemory>(
        &mut self,
        addr: u64,
        len: u32,
        flags: u16,
        slot: DescSlot,
        mem: &M,
    ) -> Result<(), ChainError> {
        self.count += 1;
        let writable = flags & VIRTQ_DESC_F_WRITE != 0;
        if !writable && self.seen_writable {
            return Err(ChainError::ReadableAfterWritable);
        }
        self.seen_writable |= writable;
        if len == 0 {
            return Ok(());
        }
        if addr.checked_add(u64::from(len)).is_none() {
            return Err(ChainError::AddrOverflow { addr, len });
        }
        let c = &mut *self.chain;
        let total = u64::from(c.readable_len)
            + u64::from(c.writable_len)
            + self.refused_readable
            + self.refused_writable
            + u64::from(len);
        if total > u64::from(u32::MAX) {
            return Err(ChainError::TooManyBytes);
        }
        let seg = Segment::new(addr, len, writable, c.head, slot);
        if let Err(e) = mem.check(&seg) {
            // Remember it and walk on: the structure of the rest still counts.
            self.refused.get_or_insert(e);
            if writable {
                self.refused_writable += u64::from(len);
                self.last_writable = None;
            } else {
                self.refused_readable += u64::from(len);
            }
            return Ok(());
        }
        if writable {
            self.last_writable = Some(seg);
            c.writable_len += len;
        } else {
            c.readable_len += len;
            c.n_readable += 1;
        }
        c.segs.push(seg);
        Ok(())
    }

    /// Validates and walks the indirect table that descriptor `table` points to.
    #[inline(never)]
    fn indirect<M: DeviceMemory>(
        &mut self,
        table: u16,
        addr: u64,
        len: u32,
        (limit, left): (u16, u16),
        mem: &M,
        scratch: &mut Vec<u8>,
    ) -> Result<(), ChainError> {
        let n = self.fetch_table(table, addr, len, (limit, left), mem, scratch)?;
        let descs = <[Descriptor]>::ref_from_bytes(scratch).map_err(|_| ChainError::IndirectLength(len))?;
        let mut i: u16 = 0;
        for _ in 0..n {
            let d = &descs[usize::from(i)];
            let flags = d.flags.get();
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(ChainError::NestedIndirect);
            }
            self.push(d.addr.get(), d.len.get(), flags, DescSlot::Indirect(i), mem)?;
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(());
            }
            let next = d.next.get();
            if next >= n {
                return Err(ChainError::NextOutOfRange {
                    index: i,
                    next,
                    size: n,
                });
            }
            i = next;
        }
        Err(ChainError::TooLong { limit: n })
    }

    /// Checks the indirect table that descriptor `table` points to and copies it
    /// into `scratch` through `mem`; returns its number of entries.
    #[inline(always)]
    fn fetch_table<M: DeviceMemory>(
        &self,
        table: u16,
        addr: u64,
        len: u32,
        (limit, left): (u16, u16),
        mem: &M,
        scratch: &mut Vec<u8>,
    ) -> Result<u16, ChainError> {
        if len == 0 || !len.is_multiple_of(16) {
            return Err(ChainError::IndirectLength(len));
        }
        let entries = len / 16;
        if entries > u32::from(INDIRECT_MAX) {
            return Err(ChainError::IndirectTooLarge {
                entries,
                limit: INDIRECT_MAX,
            });
        }
        if entries > u32::from(left) {
            return Err(ChainError::TooLong { limit });
        }
        if addr.checked_add(u64::from(len)).is_none() {
            return Err(ChainError::AddrOverflow { addr, len });
        }
        // The table is read like any device-readable buffer (the write flag on a table
        // descriptor is ignored, §2.7.5.3.2, §2.8.7), so every model mediates it.
        let seg = Segment::new(addr, len, false, self.chain.head, DescSlot::Table(table));
        mem.check(&seg)?;
        // `len` is bounded by `INDIRECT_MAX * 16` above: no allocation sized by the driver alone.
        scratch.clear();
        scratch.resize(len as usize, 0);
        mem.read(&seg, 0, scratch)?;
        // `entries <= INDIRECT_MAX`.
        Ok(u16::try_from(entries).unwrap_or(u16::MAX))
    }

    /// [`Self::walk`] for a packed list already copied out of the ring.
    fn walk_packed<M: DeviceMemory>(
        &mut self,
        descs: &[PackedRawDesc],
        size: u16,
        mem: &M,
        indirect_ok: bool,
        scratch: &mut Vec<u8>,
    ) -> Result<(), ChainError> {
        for (k, &(slot, (addr, len, flags, _id))) in descs.iter().enumerate() {
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if !indirect_ok {
                    return Err(ChainError::IndirectNotNegotiated);
                }
                if flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(ChainError::IndirectWithNext);
                }
                if k != 0 {
                    return Err(ChainError::IndirectInList);
                }
                let limit = size.max(INDIRECT_MAX);
                return self.indirect_packed(slot, addr, len, limit, mem, scratch);
            }
            self.push(addr, len, flags, DescSlot::Table(slot), mem)?;
        }
        Ok(())
    }

    /// Validates and walks a packed indirect table: consecutive entries (§2.8.7).
    #[inline(never)]
    fn indirect_packed<M: DeviceMemory>(
        &mut self,
        table: u16,
        addr: u64,
        len: u32,
        limit: u16,
        mem: &M,
        scratch: &mut Vec<u8>,
    ) -> Result<(), ChainError> {
        let n = self.fetch_table(table, addr, len, (limit, limit), mem, scratch)?;
        let descs =
            <[PackedDescriptor]>::ref_from_bytes(scratch).map_err(|_| ChainError::IndirectLength(len))?;
        for (i, d) in (0..n).zip(descs) {
            let flags = d.flags.get();
            // Only WRITE is valid in a table entry; the rest is ignored (§2.8.7),
            // except INDIRECT, which would be a nested table (HOSTILE 3).
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(ChainError::NestedIndirect);
            }
            self.push(d.addr.get(), d.len.get(), flags, DescSlot::Indirect(i), mem)?;
        }
        Ok(())
    }
}
