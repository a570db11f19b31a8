//! The virtio-blk wire format (virtio 1.2 §5.2), shared by our driver and our device.
//!
//! Everything here is plain data: feature bits, request types and status values, the
//! request header, the discard / write-zeroes / secure-erase segment, the lifetime
//! reply and the configuration space. All multi-byte fields are little-endian
//! (§5.2.4, §5.2.6: modern devices only, no legacy native-endian layouts).
//!
//! The device-side parser that enforces the request rules lives with the device
//! (`backend-host`'s `blk::request`); a driver builds requests from the same types.

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

/// Length of the data of a VIRTIO_BLK_T_GET_ID request (§5.2.6.1: "The length of
/// `data` MUST be 20 bytes"), a NUL-padded ASCII string.
pub const GET_ID_LEN: usize = 20;

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

/// `type` of a request (§5.2.6). Legacy (SCSI, FLUSH_OUT, BARRIER) and zoned types
/// are not request types of this modern, non-zoned device and do not convert.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestType {
    /// VIRTIO_BLK_T_IN: read sectors into `data`.
    In = 0,
    /// VIRTIO_BLK_T_OUT: write `data` to sectors.
    Out = 1,
    /// VIRTIO_BLK_T_FLUSH: commit completed writes to stable storage.
    Flush = 4,
    /// VIRTIO_BLK_T_GET_ID: fetch the device ID string.
    GetId = 8,
    /// VIRTIO_BLK_T_GET_LIFETIME: fetch a [`BlkLifetime`].
    GetLifetime = 10,
    /// VIRTIO_BLK_T_DISCARD: deallocate ranges.
    Discard = 11,
    /// VIRTIO_BLK_T_WRITE_ZEROES: make ranges read as zeroes.
    WriteZeroes = 13,
    /// VIRTIO_BLK_T_SECURE_ERASE: securely erase ranges.
    SecureErase = 14,
}

/// `VIRTIO_BLK_T_IN`.
pub const VIRTIO_BLK_T_IN: u32 = RequestType::In as u32;
/// `VIRTIO_BLK_T_OUT`.
pub const VIRTIO_BLK_T_OUT: u32 = RequestType::Out as u32;
/// `VIRTIO_BLK_T_FLUSH`.
pub const VIRTIO_BLK_T_FLUSH: u32 = RequestType::Flush as u32;
/// `VIRTIO_BLK_T_GET_ID`.
pub const VIRTIO_BLK_T_GET_ID: u32 = RequestType::GetId as u32;
/// `VIRTIO_BLK_T_GET_LIFETIME`.
pub const VIRTIO_BLK_T_GET_LIFETIME: u32 = RequestType::GetLifetime as u32;
/// `VIRTIO_BLK_T_DISCARD`.
pub const VIRTIO_BLK_T_DISCARD: u32 = RequestType::Discard as u32;
/// `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = RequestType::WriteZeroes as u32;
/// `VIRTIO_BLK_T_SECURE_ERASE`.
pub const VIRTIO_BLK_T_SECURE_ERASE: u32 = RequestType::SecureErase as u32;

impl RequestType {
    /// The wire value.
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// The request type of a wire value, if it is one.
    pub const fn from_raw(raw: u32) -> Option<RequestType> {
        Some(match raw {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_GET_LIFETIME => RequestType::GetLifetime,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            VIRTIO_BLK_T_SECURE_ERASE => RequestType::SecureErase,
            _ => return None,
        })
    }

    /// The feature a driver must have negotiated to send this type, if any.
    pub const fn required_feature(self) -> Option<BlkFeatures> {
        match self {
            RequestType::In | RequestType::Out | RequestType::GetId => None,
            RequestType::Flush => Some(BlkFeatures::FLUSH),
            RequestType::GetLifetime => Some(BlkFeatures::LIFETIME),
            RequestType::Discard => Some(BlkFeatures::DISCARD),
            RequestType::WriteZeroes => Some(BlkFeatures::WRITE_ZEROES),
            RequestType::SecureErase => Some(BlkFeatures::SECURE_ERASE),
        }
    }
}

/// A `type` value that is not a request type of this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown request type {0}")]
pub struct UnknownRequestType(pub u32);

impl TryFrom<u32> for RequestType {
    type Error = UnknownRequestType;

    fn try_from(raw: u32) -> Result<Self, Self::Error> {
        RequestType::from_raw(raw).ok_or(UnknownRequestType(raw))
    }
}

/// The `status` byte the device writes last (§5.2.6).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// VIRTIO_BLK_S_OK: success.
    Ok = 0,
    /// VIRTIO_BLK_S_IOERR: "device or driver error".
    IoErr = 1,
    /// VIRTIO_BLK_S_UNSUPP: "a request unsupported by device".
    Unsupp = 2,
}

/// `VIRTIO_BLK_S_OK`.
pub const VIRTIO_BLK_S_OK: u8 = Status::Ok as u8;
/// `VIRTIO_BLK_S_IOERR`.
pub const VIRTIO_BLK_S_IOERR: u8 = Status::IoErr as u8;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const VIRTIO_BLK_S_UNSUPP: u8 = Status::Unsupp as u8;

impl Status {
    /// The wire value.
    pub const fn raw(self) -> u8 {
        self as u8
    }

    /// The status of a wire value, if it is one (the driver reads it from memory the
    /// device wrote: anything else is a device fault).
    pub const fn from_raw(raw: u8) -> Option<Status> {
        match raw {
            VIRTIO_BLK_S_OK => Some(Status::Ok),
            VIRTIO_BLK_S_IOERR => Some(Status::IoErr),
            VIRTIO_BLK_S_UNSUPP => Some(Status::Unsupp),
            _ => None,
        }
    }
}

/// A status byte that is none of the defined values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0}")]
pub struct UnknownStatus(pub u8);

impl TryFrom<u8> for Status {
    type Error = UnknownStatus;

    fn try_from(raw: u8) -> Result<Self, Self::Error> {
        Status::from_raw(raw).ok_or(UnknownStatus(raw))
    }
}

/// The device-readable head of every request, `struct virtio_blk_req` up to `data`
/// (§5.2.6): 16 bytes.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct BlkReqHeader {
    /// A `VIRTIO_BLK_T_*` value.
    pub type_: U32,
    /// Reserved (legacy `ioprio`); ignored by the device.
    pub reserved: U32,
    /// First sector of a read or write; 0 for FLUSH (§5.2.6.1), unused otherwise.
    pub sector: U64,
}

impl BlkReqHeader {
    /// Size on the wire.
    pub const SIZE: usize = 16;

    /// A header of type `ty` at `sector`.
    pub fn new(ty: u32, sector: u64) -> BlkReqHeader {
        BlkReqHeader {
            type_: ty.into(),
            reserved: 0.into(),
            sector: sector.into(),
        }
    }
}

/// One range of a DISCARD, WRITE_ZEROES or SECURE_ERASE request,
/// `struct virtio_blk_discard_write_zeroes` (§5.2.6): 16 bytes.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct BlkDiscardWriteZeroes {
    /// First sector of the range.
    pub sector: U64,
    /// Sectors in the range.
    pub num_sectors: U32,
    /// Bit 0 is [`Self::UNMAP`]; bits 1..31 are reserved.
    pub flags: U32,
}

impl BlkDiscardWriteZeroes {
    /// Size on the wire.
    pub const SIZE: usize = 16;

    /// `unmap`: "only used in write zeroes commands and allows the device to discard
    /// the specified range, provided that following reads return zeroes" (§5.2.6).
    pub const UNMAP: u32 = 1;

    /// A segment from host-order fields.
    pub fn new(sector: u64, num_sectors: u32, flags: u32) -> BlkDiscardWriteZeroes {
        BlkDiscardWriteZeroes {
            sector: sector.into(),
            num_sectors: num_sectors.into(),
            flags: flags.into(),
        }
    }
}

/// The reply of VIRTIO_BLK_T_GET_LIFETIME, `struct virtio_blk_lifetime` (§5.2.6):
/// 6 bytes.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct BlkLifetime {
    /// Reserved blocks consumed: 0 undefined, 1 normal, 2 warning (80%), 3 urgent (90%).
    pub pre_eol_info: U16,
    /// SLC wear in 10% steps: 0 undefined, 1 up to 10% ... 11 lifetime exceeded.
    pub device_lifetime_est_typ_a: U16,
    /// MLC wear, with the same encoding.
    pub device_lifetime_est_typ_b: U16,
}

impl BlkLifetime {
    /// Size on the wire.
    pub const SIZE: usize = 6;
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

/// Encodes a device ID for a GET_ID reply: the first [`GET_ID_LEN`] bytes of `id`,
/// NUL-padded ("a NUL-padded ASCII string up to 20 bytes long. If the string is 20
/// bytes long then there is no NUL terminator", §5.2.6).
pub fn encode_device_id(id: &[u8]) -> [u8; GET_ID_LEN] {
    let mut out = [0u8; GET_ID_LEN];
    let n = id.len().min(GET_ID_LEN);
    out[..n].copy_from_slice(&id[..n]);
    out
}

// The wire sizes and offsets of §5.2.4 and §5.2.6, checked at compile time.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<BlkReqHeader>() == BlkReqHeader::SIZE);
    assert!(offset_of!(BlkReqHeader, reserved) == 4);
    assert!(offset_of!(BlkReqHeader, sector) == 8);
    assert!(size_of::<BlkDiscardWriteZeroes>() == BlkDiscardWriteZeroes::SIZE);
    assert!(offset_of!(BlkDiscardWriteZeroes, num_sectors) == 8);
    assert!(offset_of!(BlkDiscardWriteZeroes, flags) == 12);
    assert!(size_of::<BlkLifetime>() == BlkLifetime::SIZE);
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
    fn request_types_round_trip_and_unknown_values_do_not_convert() {
        let known = [
            (RequestType::In, 0),
            (RequestType::Out, 1),
            (RequestType::Flush, 4),
            (RequestType::GetId, 8),
            (RequestType::GetLifetime, 10),
            (RequestType::Discard, 11),
            (RequestType::WriteZeroes, 13),
            (RequestType::SecureErase, 14),
        ];
        for (ty, raw) in known {
            assert_eq!(ty.raw(), raw);
            assert_eq!(RequestType::try_from(raw), Ok(ty));
        }
        // Legacy SCSI (2, 3), FLUSH_OUT (5), zoned (15..=26), BARRIER (bit 31).
        for raw in [
            2,
            3,
            5,
            6,
            7,
            9,
            12,
            15,
            16,
            26,
            0x8000_0000,
            0x8000_0001,
            u32::MAX,
        ] {
            assert_eq!(RequestType::try_from(raw), Err(UnknownRequestType(raw)));
        }
        assert_eq!(RequestType::In.required_feature(), None);
        assert_eq!(RequestType::Flush.required_feature(), Some(BlkFeatures::FLUSH));
        assert_eq!(
            RequestType::SecureErase.required_feature(),
            Some(BlkFeatures::SECURE_ERASE)
        );
    }

    #[test]
    fn status_values_round_trip() {
        for (s, raw) in [(Status::Ok, 0u8), (Status::IoErr, 1), (Status::Unsupp, 2)] {
            assert_eq!(s.raw(), raw);
            assert_eq!(Status::try_from(raw), Ok(s));
        }
        assert_eq!(Status::try_from(3), Err(UnknownStatus(3)));
        assert_eq!(UnknownStatus(0xff).to_string(), "unknown status 255");
    }

    #[test]
    fn header_is_little_endian_on_the_wire() {
        let h = BlkReqHeader::new(VIRTIO_BLK_T_OUT, 0x0102_0304_0506_0708);
        assert_eq!(h.as_bytes(), &[1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
        let back = BlkReqHeader::read_from_bytes(h.as_bytes()).unwrap();
        assert_eq!((back.type_.get(), back.sector.get()), (1, 0x0102_0304_0506_0708));
    }

    #[test]
    fn discard_segment_is_little_endian_on_the_wire() {
        let s = BlkDiscardWriteZeroes::new(0x10, 0x20, BlkDiscardWriteZeroes::UNMAP);
        assert_eq!(
            s.as_bytes(),
            &[0x10, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 1, 0, 0, 0]
        );
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

    #[test]
    fn device_id_is_nul_padded_and_truncated() {
        let mut short = [0u8; GET_ID_LEN];
        short[..4].copy_from_slice(b"disk");
        assert_eq!(encode_device_id(b"disk"), short);
        assert_eq!(
            &encode_device_id(b"0123456789abcdefghijKLMN"),
            b"0123456789abcdefghij"
        );
        assert_eq!(encode_device_id(b""), [0u8; GET_ID_LEN]);
    }
}
