//! Wire layouts of the split virtqueue (virtio 1.2 §2.7).
//!
//! These types document the format and are used wherever ring memory is copied as
//! bytes (indirect tables, tests, peers). The hot ring paths read and write the same
//! fields through atomics at the offsets defined here, so each shared field is fetched
//! exactly once.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// One entry of a descriptor table (§2.7.5): 16 bytes, 16-byte aligned table.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Descriptor {
    /// Address of the buffer, in the sharing model's address space.
    pub addr: U64,
    /// Length of the buffer in bytes.
    pub len: U32,
    /// `VIRTQ_DESC_F_*` flags.
    pub flags: U16,
    /// Index of the next descriptor when `flags` has `NEXT`.
    pub next: U16,
}

impl Descriptor {
    /// Size of one descriptor in bytes.
    pub const SIZE: usize = 16;

    /// A descriptor from host-order fields.
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
        Descriptor {
            addr: addr.into(),
            len: len.into(),
            flags: flags.into(),
            next: next.into(),
        }
    }

    /// The second 8 bytes (`len`, `flags`, `next`) as one little-endian word, the way
    /// the ring reads and writes them with a single atomic access.
    pub(crate) fn pack_tail(len: u32, flags: u16, next: u16) -> u64 {
        u64::from(len) | (u64::from(flags) << 32) | (u64::from(next) << 48)
    }

    /// Splits a word written by [`Descriptor::pack_tail`] into `(len, flags, next)`.
    #[allow(clippy::cast_possible_truncation)] // deliberate field extraction
    pub(crate) fn unpack_tail(word: u64) -> (u32, u16, u16) {
        (word as u32, (word >> 32) as u16, (word >> 48) as u16)
    }
}

/// The descriptor continues via the `next` field (§2.7.5).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// The buffer is device-writable (otherwise device-readable).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// The buffer holds a table of indirect descriptors (§2.7.5.3).
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// `avail.flags`: the driver asks the device not to send used-buffer notifications
/// (§2.7.7); ignored when EVENT_IDX is negotiated.
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `used.flags`: the device asks the driver not to send available-buffer notifications
/// (§2.7.10); ignored when EVENT_IDX is negotiated.
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Header of the available ring (§2.7.6): `flags`, `idx`, then `ring[queue_size]` of
/// `U16` and, with EVENT_IDX, `used_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct AvailHeader {
    /// `VIRTQ_AVAIL_F_*` flags.
    pub flags: U16,
    /// Where the driver will put the next descriptor head (free-running).
    pub idx: U16,
}

/// Header of the used ring (§2.7.8): `flags`, `idx`, then `ring[queue_size]` of
/// [`UsedElem`] and, with EVENT_IDX, `avail_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct UsedHeader {
    /// `VIRTQ_USED_F_*` flags.
    pub flags: U16,
    /// Where the device will put the next used element (free-running).
    pub idx: U16,
}

/// One used-ring element (§2.7.8).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct UsedElem {
    /// Head index of the completed descriptor chain (`u32` for padding reasons).
    pub id: U32,
    /// Bytes written into the device-writable part of the chain.
    pub len: U32,
}

/// Byte sizes and alignments of the three split-ring areas for one queue size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitLayout {
    /// Number of descriptors (a power of two, at most 32768).
    pub size: u16,
}

impl SplitLayout {
    /// Largest split queue size (§2.7: "Queue Size ... maximum 32768").
    pub const MAX_SIZE: u16 = 32768;
    /// Descriptor table alignment.
    pub const DESC_ALIGN: u64 = 16;
    /// Available ring alignment.
    pub const AVAIL_ALIGN: u64 = 2;
    /// Used ring alignment.
    pub const USED_ALIGN: u64 = 4;

    /// Checks the queue size: non-zero, a power of two, at most [`Self::MAX_SIZE`].
    pub fn new(size: u16) -> Option<SplitLayout> {
        (size != 0 && size.is_power_of_two() && size <= Self::MAX_SIZE).then_some(SplitLayout { size })
    }

    /// Bytes of the descriptor table.
    pub fn desc_bytes(self) -> u64 {
        16 * u64::from(self.size)
    }

    /// Bytes of the available ring, including `used_event`.
    pub fn avail_bytes(self) -> u64 {
        6 + 2 * u64::from(self.size)
    }

    /// Bytes of the used ring, including `avail_event`.
    pub fn used_bytes(self) -> u64 {
        6 + 8 * u64::from(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_spec() {
        assert_eq!(std::mem::size_of::<Descriptor>(), 16);
        assert_eq!(std::mem::size_of::<UsedElem>(), 8);
        assert_eq!(std::mem::size_of::<AvailHeader>(), 4);
        let l = SplitLayout::new(256).unwrap();
        assert_eq!(l.desc_bytes(), 4096);
        assert_eq!(l.avail_bytes(), 518);
        assert_eq!(l.used_bytes(), 2054);
        assert!(SplitLayout::new(0).is_none());
        assert!(SplitLayout::new(3).is_none());
        assert!(SplitLayout::new(32768).is_some());
    }

    #[test]
    fn tail_packing_matches_the_byte_layout() {
        let d = Descriptor::new(0x1122_3344_5566_7788, 0xaabb_ccdd, 0x0102, 0x0304);
        let bytes = d.as_bytes();
        let tail = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        assert_eq!(tail, Descriptor::pack_tail(0xaabb_ccdd, 0x0102, 0x0304));
        assert_eq!(Descriptor::unpack_tail(tail), (0xaabb_ccdd, 0x0102, 0x0304));
    }
}
