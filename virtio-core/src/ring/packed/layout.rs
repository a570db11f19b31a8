//! Wire layout of the packed virtqueue (virtio 1.2 §2.8).
//!
//! As for the split ring, these types document the format and serve wherever ring
//! memory is copied as bytes (indirect tables, tests); the ring paths read and write
//! the same fields through atomics at these offsets.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// One packed descriptor (§2.8.13, `struct pvirtq_desc`): the same 16 bytes as a split
/// descriptor, but with the buffer id where `flags` was and `flags` last.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PackedDescriptor {
    /// Address of the buffer element (unused in a used descriptor).
    pub addr: U64,
    /// Length of the element; in a used descriptor, the bytes written.
    pub len: U32,
    /// Buffer id (§2.8.6: significant in the last descriptor of a list).
    pub id: U16,
    /// `VIRTQ_DESC_F_*` flags, with the AVAIL and USED bits.
    pub flags: U16,
}

impl PackedDescriptor {
    /// A descriptor from host-order fields.
    pub fn new(addr: u64, len: u32, id: u16, flags: u16) -> PackedDescriptor {
        PackedDescriptor {
            addr: addr.into(),
            len: len.into(),
            id: id.into(),
            flags: flags.into(),
        }
    }

    /// The second 8 bytes (`len`, `id`, `flags`) as one little-endian word, the way
    /// the ring reads and writes them with a single atomic access.
    pub(crate) fn pack_tail(len: u32, id: u16, flags: u16) -> u64 {
        u64::from(len) | (u64::from(id) << 32) | (u64::from(flags) << 48)
    }

    /// Splits a word written by [`PackedDescriptor::pack_tail`] into `(len, id, flags)`.
    #[allow(clippy::cast_possible_truncation)] // deliberate field extraction
    pub(crate) fn unpack_tail(word: u64) -> (u32, u16, u16) {
        (word as u32, (word >> 32) as u16, (word >> 48) as u16)
    }
}

/// `flags`: the descriptor is available when this bit equals the driver ring wrap
/// counter and [`VIRTQ_DESC_F_USED`] does not (§2.8.1).
pub const VIRTQ_DESC_F_AVAIL: u16 = 1 << 7;
/// `flags`: the descriptor is used when this bit and [`VIRTQ_DESC_F_AVAIL`] both equal
/// the device ring wrap counter (§2.8.1).
pub const VIRTQ_DESC_F_USED: u16 = 1 << 15;

/// Event suppression `flags`: notifications wanted (§2.8.10).
pub const RING_EVENT_FLAGS_ENABLE: u16 = 0;
/// Event suppression `flags`: no notifications wanted.
pub const RING_EVENT_FLAGS_DISABLE: u16 = 1;
/// Event suppression `flags`: a notification only once the descriptor at
/// `desc_event_off` / `desc_event_wrap` is made available or used (needs
/// VIRTIO_F_EVENT_IDX).
pub const RING_EVENT_FLAGS_DESC: u16 = 2;

/// An event suppression structure (§2.8.14, `struct pvirtq_event_suppress`): the driver
/// area (written by the driver, read by the device) and the device area (the reverse)
/// each hold one.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct EventSuppress {
    /// `desc_event_off` in bits 0-14, `desc_event_wrap` in bit 15.
    pub desc: U16,
    /// `RING_EVENT_FLAGS_*` in bits 0-1; the rest reserved.
    pub flags: U16,
}

impl EventSuppress {
    /// Size of the structure in bytes.
    pub const SIZE: u64 = 4;
    /// Alignment of the structure.
    pub const ALIGN: u64 = 4;

    /// The structure as one little-endian word, for a single atomic access.
    pub(crate) fn pack(desc: u16, flags: u16) -> u32 {
        u32::from(desc) | (u32::from(flags) << 16)
    }

    /// Splits a word written by [`EventSuppress::pack`] into `(desc, flags)`.
    #[allow(clippy::cast_possible_truncation)] // deliberate field extraction
    pub(crate) fn unpack(word: u32) -> (u16, u16) {
        (word as u16, (word >> 16) as u16)
    }
}

/// Byte sizes and alignments of the three packed-ring areas for one queue size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedLayout {
    /// Number of descriptors in the ring (1 to 32768, any value).
    pub size: u16,
}

impl PackedLayout {
    /// Largest packed queue size (§2.8: "up to 2^15 entries").
    pub const MAX_SIZE: u16 = 32768;
    /// Descriptor ring alignment.
    pub const DESC_ALIGN: u64 = 16;

    /// Checks the queue size: non-zero, at most [`Self::MAX_SIZE`] (§2.8.10.1: it
    /// need not be a power of two).
    pub fn new(size: u16) -> Option<PackedLayout> {
        (size != 0 && size <= Self::MAX_SIZE).then_some(PackedLayout { size })
    }

    /// Bytes of the descriptor ring.
    pub fn desc_bytes(self) -> u64 {
        16 * u64::from(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_packing_match_the_byte_layout() {
        assert_eq!(std::mem::size_of::<PackedDescriptor>(), 16);
        assert_eq!(std::mem::size_of::<EventSuppress>(), 4);
        let d = PackedDescriptor::new(0x1122_3344_5566_7788, 0xaabb_ccdd, 0x0102, 0x8304);
        let bytes = d.as_bytes();
        let tail = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        assert_eq!(tail, PackedDescriptor::pack_tail(0xaabb_ccdd, 0x0102, 0x8304));
        assert_eq!(PackedDescriptor::unpack_tail(tail), (0xaabb_ccdd, 0x0102, 0x8304));
        let e = EventSuppress {
            desc: 0x8005.into(),
            flags: 2.into(),
        };
        let word = u32::from_le_bytes(e.as_bytes().try_into().unwrap());
        assert_eq!(word, EventSuppress::pack(0x8005, 2));
        assert_eq!(EventSuppress::unpack(word), (0x8005, 2));
        assert!(PackedLayout::new(0).is_none());
        assert_eq!(PackedLayout::new(3).unwrap().desc_bytes(), 48);
        assert!(PackedLayout::new(32768).is_some());
        assert!(PackedLayout::new(32769).is_none());
    }
}
