//! The virtio-blk device type (virtio 1.2 §5.2), shared by our driver and our device.
//!
//! - this module: the device ID, feature bits and the rules tying them together, and
//!   the configuration space (`struct virtio_blk_config`, §5.2.4);
//! - [`wire`]: what travels on the request queues, the request header, the range
//!   segments, the status byte and the replies, each as its on-wire struct and a
//!   typed representation with `parse` and `emit` side by side. Its items are
//!   re-exported here, so `virtio_core::blk::Status` and
//!   `virtio_core::blk::wire::Status` are the same item.
//!
//! All multi-byte fields are little-endian (§5.2.4, §5.2.6: modern devices only, no
//! legacy native-endian layouts). What the device *decides* about a well-formed
//! request (capacity, `seg_max`, `size_max`, which status for which fault) lives with
//! the device (`backend-host`'s `blk::request`); only the byte format lives here.

pub mod wire;

pub use self::wire::*;

use crate::features::Dependency;
use bitflags::bitflags;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Device ID of a block device (§5.2.1).
pub const DEVICE_ID: u32 = 2;

/// Bytes in a sector, the unit of `sector`, `capacity` and every `*_sectors` field,
/// whatever `blk_size` says (§5.2.5: "This does not affect the units used in the
/// protocol (always 512 bytes)").
pub const SECTOR_SIZE: u64 = 512;

bitflags! {
    /// Device-specific feature bits of the block device (virtio 1.2 §5.2.3).
    ///
    /// Build the typed view of a negotiated word with
    /// [`BlkFeatures::from_bits_retain`], so device-independent bits survive.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct BlkFeatures: u64 {
        /// "Maximum size of any single segment is in `size_max`."
        const SIZE_MAX = 1 << 1;
        /// "Maximum number of segments in a request is in `seg_max`."
        const SEG_MAX = 1 << 2;
        /// "Disk-style geometry specified in `geometry`."
        const GEOMETRY = 1 << 4;
        /// "Device is read-only."
        const RO = 1 << 5;
        /// "Block size of disk is in `blk_size`."
        const BLK_SIZE = 1 << 6;
        /// "Cache flush command support."
        const FLUSH = 1 << 9;
        /// "Device exports information on optimal I/O alignment."
        const TOPOLOGY = 1 << 10;
        /// "Device can toggle its cache between writeback and writethrough modes."
        const CONFIG_WCE = 1 << 11;
        /// "Device supports multiqueue."
        const MQ = 1 << 12;
        /// "Device can support discard command, maximum discard sectors size in `max_discard_sectors` and maximum discard segment number in `max_discard_seg`."
        const DISCARD = 1 << 13;
        /// "Device can support write zeroes command, maximum write zeroes sectors size in `max_write_zeroes_sectors` and maximum write zeroes segment number in `max_write_zeroes_seg`."
        const WRITE_ZEROES = 1 << 14;
        /// "Device supports providing storage lifetime information."
        const LIFETIME = 1 << 15;
        /// "Device supports secure erase command, maximum erase sectors count in `max_secure_erase_sectors` and maximum erase segment number in `max_secure_erase_seg`."
        const SECURE_ERASE = 1 << 16;
    }
}

/// Dependencies among the block feature bits, for [`crate::features::negotiate`] and
/// [`crate::features::select`]: none.
///
/// virtio 1.2 §5.2 states no "requires" relation a driver must respect. The one rule
/// tying two bits together binds the device's offer ("Devices ... MUST offer
/// VIRTIO_BLK_F_FLUSH if they offer VIRTIO_BLK_F_CONFIG_WCE", §5.2.5.2, checked by
/// [`check_offer`]); a driver may accept CONFIG_WCE without FLUSH, and the spec says
/// what the device does then ("the device MUST initialize `writeback` to 0").
pub const BLK_DEPENDENCIES: &[Dependency] = &[];

/// An offer a block device must not make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// CONFIG_WCE offered without FLUSH (§5.2.5.2).
    #[error("CONFIG_WCE offered without FLUSH")]
    ConfigWceWithoutFlush,
}

/// Checks the device's offer against the device-initialization rules of §5.2.5.2.
///
/// # Errors
/// [`OfferError::ConfigWceWithoutFlush`] if CONFIG_WCE is offered without FLUSH.
pub fn check_offer(offered: BlkFeatures) -> Result<(), OfferError> {
    if offered.contains(BlkFeatures::CONFIG_WCE) && !offered.contains(BlkFeatures::FLUSH) {
        return Err(OfferError::ConfigWceWithoutFlush);
    }
    Ok(())
}

/// `struct virtio_blk_geometry` inside [`BlkConfig`].
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct BlkGeometry {
    /// Cylinders.
    pub cylinders: U16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

/// `struct virtio_blk_topology` inside [`BlkConfig`].
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct BlkTopology {
    /// Logical blocks per physical block, log2.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in blocks.
    pub min_io_size: U16,
    /// Optimal (suggested maximum) I/O size, in blocks.
    pub opt_io_size: U32,
}

/// The block device's configuration space, `struct virtio_blk_config` (virtio 1.2
/// §5.2.4): 72 bytes. Fields other than `capacity` are meaningful only when the
/// feature named on them is offered or negotiated.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct BlkConfig {
    /// Size of the device in 512-byte sectors; always present.
    pub capacity: U64,
    /// Largest segment in bytes (SIZE_MAX).
    pub size_max: U32,
    /// Most data segments in a request (SEG_MAX).
    pub seg_max: U32,
    /// Disk geometry (GEOMETRY).
    pub geometry: BlkGeometry,
    /// Optimal block size in bytes (BLK_SIZE); the protocol unit stays 512.
    pub blk_size: U32,
    /// I/O alignment hints (TOPOLOGY).
    pub topology: BlkTopology,
    /// 1 writeback, 0 writethrough (CONFIG_WCE).
    pub writeback: u8,
    /// Padding; the device initialises it to 0 (§5.2.5.2).
    pub unused0: u8,
    /// Number of request queues (MQ).
    pub num_queues: U16,
    /// Largest discard range, in sectors (DISCARD).
    pub max_discard_sectors: U32,
    /// Most segments in a discard request (DISCARD).
    pub max_discard_seg: U32,
    /// Alignment hint for splitting discards, in sectors (DISCARD).
    pub discard_sector_alignment: U32,
    /// Largest write-zeroes range, in sectors (WRITE_ZEROES).
    pub max_write_zeroes_sectors: U32,
    /// Most segments in a write-zeroes request (WRITE_ZEROES).
    pub max_write_zeroes_seg: U32,
    /// 1 if a write-zeroes request with `unmap` can deallocate (WRITE_ZEROES).
    pub write_zeroes_may_unmap: u8,
    /// Padding; the device initialises it to 0 (§5.2.5.2).
    pub unused1: [u8; 3],
    /// Largest secure-erase range, in sectors (SECURE_ERASE).
    pub max_secure_erase_sectors: U32,
    /// Most segments in a secure-erase request (SECURE_ERASE).
    pub max_secure_erase_seg: U32,
    /// Alignment hint for splitting secure erases, in sectors (SECURE_ERASE).
    pub secure_erase_sector_alignment: U32,
}

impl BlkConfig {
    /// Size of the configuration space in bytes.
    pub const SIZE: usize = 72;
}

// The configuration space's size and offsets (§5.2.4), checked at compile time.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<BlkGeometry>() == 4);
    assert!(size_of::<BlkTopology>() == 8);
    assert!(size_of::<BlkConfig>() == BlkConfig::SIZE);
    assert!(offset_of!(BlkConfig, capacity) == 0);
    assert!(offset_of!(BlkConfig, size_max) == 8);
    assert!(offset_of!(BlkConfig, seg_max) == 12);
    assert!(offset_of!(BlkConfig, geometry) == 16);
    assert!(offset_of!(BlkConfig, geometry) + offset_of!(BlkGeometry, heads) == 18);
    assert!(offset_of!(BlkConfig, geometry) + offset_of!(BlkGeometry, sectors) == 19);
    assert!(offset_of!(BlkConfig, blk_size) == 20);
    assert!(offset_of!(BlkConfig, topology) == 24);
    assert!(offset_of!(BlkConfig, topology) + offset_of!(BlkTopology, alignment_offset) == 25);
    assert!(offset_of!(BlkConfig, topology) + offset_of!(BlkTopology, min_io_size) == 26);
    assert!(offset_of!(BlkConfig, topology) + offset_of!(BlkTopology, opt_io_size) == 28);
    assert!(offset_of!(BlkConfig, writeback) == 32);
    assert!(offset_of!(BlkConfig, unused0) == 33);
    assert!(offset_of!(BlkConfig, num_queues) == 34);
    assert!(offset_of!(BlkConfig, max_discard_sectors) == 36);
    assert!(offset_of!(BlkConfig, max_discard_seg) == 40);
    assert!(offset_of!(BlkConfig, discard_sector_alignment) == 44);
    assert!(offset_of!(BlkConfig, max_write_zeroes_sectors) == 48);
    assert!(offset_of!(BlkConfig, max_write_zeroes_seg) == 52);
    assert!(offset_of!(BlkConfig, write_zeroes_may_unmap) == 56);
    assert!(offset_of!(BlkConfig, unused1) == 57);
    assert!(offset_of!(BlkConfig, max_secure_erase_sectors) == 60);
    assert!(offset_of!(BlkConfig, max_secure_erase_seg) == 64);
    assert!(offset_of!(BlkConfig, secure_erase_sector_alignment) == 68);
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{Features, negotiate, select};

    #[test]
    fn feature_bits_match_the_spec() {
        let expected = [
            (BlkFeatures::SIZE_MAX, 1),
            (BlkFeatures::SEG_MAX, 2),
            (BlkFeatures::GEOMETRY, 4),
            (BlkFeatures::RO, 5),
            (BlkFeatures::BLK_SIZE, 6),
            (BlkFeatures::FLUSH, 9),
            (BlkFeatures::TOPOLOGY, 10),
            (BlkFeatures::CONFIG_WCE, 11),
            (BlkFeatures::MQ, 12),
            (BlkFeatures::DISCARD, 13),
            (BlkFeatures::WRITE_ZEROES, 14),
            (BlkFeatures::LIFETIME, 15),
            (BlkFeatures::SECURE_ERASE, 16),
        ];
        for (flag, bit) in expected {
            assert_eq!(flag.bits(), 1 << bit, "{flag:?}");
        }
        // Device-specific bits stay below the transport range (§6: bits 0..=23).
        assert_eq!(BlkFeatures::all().bits() >> 24, 0);
    }

    #[test]
    fn negotiation_accepts_config_wce_without_flush() {
        let v1 = Features::VERSION_1.bits();
        let wce = BlkFeatures::CONFIG_WCE.bits();
        let offered = v1 | wce | BlkFeatures::FLUSH.bits();
        assert_eq!(negotiate(offered, v1 | wce, BLK_DEPENDENCIES), Ok(v1 | wce));
        assert_eq!(select(offered, wce, BLK_DEPENDENCIES), v1 | wce);
    }

    #[test]
    fn offer_of_config_wce_needs_flush() {
        assert_eq!(
            check_offer(BlkFeatures::CONFIG_WCE),
            Err(OfferError::ConfigWceWithoutFlush)
        );
        assert_eq!(check_offer(BlkFeatures::CONFIG_WCE | BlkFeatures::FLUSH), Ok(()));
        assert_eq!(check_offer(BlkFeatures::empty()), Ok(()));
    }

    #[test]
    fn config_fields_land_at_the_spec_offsets() {
        let mut c = BlkConfig {
            capacity: 0x1122_3344_5566_7788.into(),
            ..Default::default()
        };
        c.geometry.heads = 0xaa;
        c.topology.opt_io_size = 0xdead_beef.into();
        c.num_queues = 4.into();
        c.write_zeroes_may_unmap = 1;
        c.secure_erase_sector_alignment = 0x0102_0304.into();
        let b = c.as_bytes();
        assert_eq!(b.len(), 72);
        assert_eq!(&b[0..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(b[18], 0xaa);
        assert_eq!(&b[28..32], &0xdead_beefu32.to_le_bytes());
        assert_eq!(&b[34..36], &[4, 0]);
        assert_eq!(b[56], 1);
        assert_eq!(&b[68..72], &[4, 3, 2, 1]);
    }
}
