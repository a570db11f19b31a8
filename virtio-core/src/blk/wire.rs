//! What travels on a virtio-blk request queue (virtio 1.2 §5.2.6), both directions.
//!
//! A request is `struct virtio_blk_req`: a 16-byte header the device reads, data, and
//! a status byte the device writes last. For each part this module holds the
//! on-wire struct (zerocopy, little-endian: the bytes as they are) and, where the
//! bytes carry meaning beyond their fields, a typed representation with `parse` and
//! `emit` side by side, as smoltcp pairs its `Packet` and `Repr`:
//!
//! | on the wire | typed | parse checks |
//! |---|---|---|
//! | [`BlkReqHeader`] | [`ReqHeader`] | `type` is a request type of this device |
//! | [`BlkDiscardWriteZeroes`] | [`SectorRange`] | no reserved flag; `unmap` only for WRITE_ZEROES (§5.2.6.2) |
//! | status byte | [`Status`] | one of OK, IOERR, UNSUPP |
//! | GET_ID reply | [`DeviceId`] | exactly 20 bytes |
//! | [`BlkLifetime`] | (the struct itself) | none: every value is a valid reading |
//!
//! The driver (`drivers-blk`) emits headers and segments and parses the status and
//! the replies; the device (`backend-host`) parses headers and segments and emits
//! the rest. Parsing validates once into a private copy and never panics: any bytes
//! give a typed value or a typed error, and a parsed value emits back to bytes that
//! parse to it (the property tests below check both).
//!
//! What a device *decides* about a well-formed request (capacity, `seg_max`,
//! `size_max`, feature checks, which status for which fault and in which order) is
//! device policy and stays in `backend-host`'s `blk::request`.
//!
//! # Adding a device type
//!
//! Copy this shape: `virtio-core/src/<type>/mod.rs` for the device ID, feature bits
//! and configuration space, `<type>/wire.rs` for what travels on its queues (wire
//! struct, typed representation with `parse` / `emit`, a thiserror error, a
//! property test that emit-then-parse is the identity), and modules of their own
//! for computations over the payload (as `net/csum.rs` and `net/hash.rs`).

use super::BlkFeatures;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Length of the data of a VIRTIO_BLK_T_GET_ID request (§5.2.6.1: "The length of
/// `data` MUST be 20 bytes"), a NUL-padded ASCII string.
pub const GET_ID_LEN: usize = 20;

/// Why bytes are not a valid part of a block request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlkWireError {
    /// A buffer of the wrong length for a fixed-size part.
    #[error("{got} bytes where the wire format has {want}")]
    Length {
        /// Bytes the part has on the wire.
        want: usize,
        /// Bytes given.
        got: usize,
    },
    /// The header's `type` is not a request type of this device.
    #[error(transparent)]
    Type(#[from] UnknownRequestType),
    /// A range segment breaks a flag rule.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// A status byte that is none of the defined values.
    #[error(transparent)]
    Status(#[from] UnknownStatus),
}

/// `Ok` if `bytes` is exactly `want` long.
fn exact(bytes: &[u8], want: usize) -> Result<(), BlkWireError> {
    if bytes.len() == want {
        Ok(())
    } else {
        Err(BlkWireError::Length {
            want,
            got: bytes.len(),
        })
    }
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

    /// Size on the wire as a descriptor length.
    pub const LEN: u32 = 16;

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

    /// Size on the wire as a descriptor length.
    pub const LEN: u32 = 16;

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

    /// Size on the wire as a descriptor length.
    pub const LEN: u32 = 6;
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

/// A request header with its `type` checked: the typed view of [`BlkReqHeader`].
///
/// `reserved` (legacy `ioprio`) is not represented: the device ignores it and a
/// driver emits 0. Whether `sector` is allowed for the type (0 for FLUSH,
/// §5.2.6.1) is a device check, made in its own order among the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReqHeader {
    /// The request type.
    pub ty: RequestType,
    /// First sector of a read or write; 0 otherwise.
    pub sector: u64,
}

impl ReqHeader {
    /// The typed view of a header read from the wire.
    ///
    /// # Errors
    /// [`UnknownRequestType`] for a `type` this device does not have (legacy,
    /// zoned or undefined values).
    pub fn from_wire(wire: &BlkReqHeader) -> Result<ReqHeader, UnknownRequestType> {
        Ok(ReqHeader {
            ty: RequestType::try_from(wire.type_.get())?,
            sector: wire.sector.get(),
        })
    }

    /// The header as it goes on the wire (`reserved` 0).
    pub fn to_wire(&self) -> BlkReqHeader {
        BlkReqHeader::new(self.ty.raw(), self.sector)
    }

    /// Parses exactly [`BlkReqHeader::SIZE`] bytes.
    ///
    /// # Errors
    /// [`BlkWireError::Length`] or [`BlkWireError::Type`].
    pub fn parse(bytes: &[u8]) -> Result<ReqHeader, BlkWireError> {
        exact(bytes, BlkReqHeader::SIZE)?;
        let wire = BlkReqHeader::read_from_bytes(bytes).map_err(|_| BlkWireError::Length {
            want: BlkReqHeader::SIZE,
            got: bytes.len(),
        })?;
        Ok(ReqHeader::from_wire(&wire)?)
    }

    /// Appends the header's [`BlkReqHeader::SIZE`] bytes to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.to_wire().as_bytes());
    }
}

/// Why a range segment is refused (§5.2.6.2: the device answers UNSUPP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Reserved flag bits set.
    #[error("unknown range flags {0:#x}")]
    UnknownFlags(u32),
    /// `unmap` on a range of a request other than WRITE_ZEROES.
    #[error("unmap flag on a {0:?} range")]
    UnmapNotAllowed(RequestType),
}

/// One range of a DISCARD, WRITE_ZEROES or SECURE_ERASE request with its flags
/// checked: the typed view of [`BlkDiscardWriteZeroes`]. The range is not checked
/// against any disk (that is the device's business).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SectorRange {
    /// First sector.
    pub sector: u64,
    /// Sectors in the range.
    pub num_sectors: u32,
    /// `unmap`: the device may deallocate, as long as the range reads back as
    /// zeroes (WRITE_ZEROES only).
    pub unmap: bool,
}

impl SectorRange {
    /// The typed view of a segment of a request of type `ty`.
    ///
    /// # Errors
    /// §5.2.6.2: UNSUPP "if any unknown flag is set", and for discard "if the unmap
    /// flag is set". `unmap` "is only used in write zeroes commands", so it is not a
    /// known flag of a secure erase either. Unknown flags are reported first.
    pub fn from_wire(wire: &BlkDiscardWriteZeroes, ty: RequestType) -> Result<SectorRange, RangeError> {
        let flags = wire.flags.get();
        let unknown = flags & !BlkDiscardWriteZeroes::UNMAP;
        if unknown != 0 {
            return Err(RangeError::UnknownFlags(unknown));
        }
        let unmap = flags & BlkDiscardWriteZeroes::UNMAP != 0;
        if unmap && ty != RequestType::WriteZeroes {
            return Err(RangeError::UnmapNotAllowed(ty));
        }
        Ok(SectorRange {
            sector: wire.sector.get(),
            num_sectors: wire.num_sectors.get(),
            unmap,
        })
    }

    /// The segment as it goes on the wire.
    pub fn to_wire(&self) -> BlkDiscardWriteZeroes {
        let flags = if self.unmap {
            BlkDiscardWriteZeroes::UNMAP
        } else {
            0
        };
        BlkDiscardWriteZeroes::new(self.sector, self.num_sectors, flags)
    }

    /// Parses exactly [`BlkDiscardWriteZeroes::SIZE`] bytes of a request of type
    /// `ty`.
    ///
    /// # Errors
    /// [`BlkWireError::Length`] or [`BlkWireError::Range`].
    pub fn parse(bytes: &[u8], ty: RequestType) -> Result<SectorRange, BlkWireError> {
        exact(bytes, BlkDiscardWriteZeroes::SIZE)?;
        let wire = BlkDiscardWriteZeroes::read_from_bytes(bytes).map_err(|_| BlkWireError::Length {
            want: BlkDiscardWriteZeroes::SIZE,
            got: bytes.len(),
        })?;
        Ok(SectorRange::from_wire(&wire, ty)?)
    }

    /// Appends the segment's [`BlkDiscardWriteZeroes::SIZE`] bytes to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.to_wire().as_bytes());
    }
}

/// The device ID string of a GET_ID reply: up to 20 bytes, NUL-padded (virtio 1.2
/// §5.2.6).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceId(pub [u8; GET_ID_LEN]);

impl DeviceId {
    /// Descriptor length of a GET_ID reply.
    pub const LEN: u32 = 20;

    /// The ID a device reports for `id` (see [`encode_device_id`]).
    pub fn encode(id: &[u8]) -> DeviceId {
        DeviceId(encode_device_id(id))
    }

    /// Parses exactly [`GET_ID_LEN`] bytes; every such string is an ID (the driver
    /// trusts none of it: see [`Self::to_string_lossy`]).
    ///
    /// # Errors
    /// [`BlkWireError::Length`].
    pub fn parse(bytes: &[u8]) -> Result<DeviceId, BlkWireError> {
        let raw = <[u8; GET_ID_LEN]>::try_from(bytes).map_err(|_| BlkWireError::Length {
            want: GET_ID_LEN,
            got: bytes.len(),
        })?;
        Ok(DeviceId(raw))
    }

    /// Appends the reply's [`GET_ID_LEN`] bytes to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }

    /// The bytes before the first NUL.
    pub fn as_bytes(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(GET_ID_LEN);
        &self.0[..end]
    }

    /// The ID as text (the spec says ASCII; anything else is replaced, not trusted).
    pub fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(self.as_bytes()).into_owned()
    }
}

impl std::fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceId({:?})", self.to_string_lossy())
    }
}

// The wire sizes and offsets of §5.2.6, checked at compile time.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<BlkReqHeader>() == BlkReqHeader::SIZE);
    assert!(offset_of!(BlkReqHeader, reserved) == 4);
    assert!(offset_of!(BlkReqHeader, sector) == 8);
    assert!(size_of::<BlkDiscardWriteZeroes>() == BlkDiscardWriteZeroes::SIZE);
    assert!(offset_of!(BlkDiscardWriteZeroes, num_sectors) == 8);
    assert!(offset_of!(BlkDiscardWriteZeroes, flags) == 12);
    assert!(size_of::<BlkLifetime>() == BlkLifetime::SIZE);
    assert!(BlkReqHeader::LEN as usize == BlkReqHeader::SIZE);
    assert!(BlkDiscardWriteZeroes::LEN as usize == BlkDiscardWriteZeroes::SIZE);
    assert!(BlkLifetime::LEN as usize == BlkLifetime::SIZE);
    assert!(DeviceId::LEN as usize == GET_ID_LEN);
};

#[cfg(test)]
mod tests {
    use super::*;

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

    const TYPES: [RequestType; 8] = [
        RequestType::In,
        RequestType::Out,
        RequestType::Flush,
        RequestType::GetId,
        RequestType::GetLifetime,
        RequestType::Discard,
        RequestType::WriteZeroes,
        RequestType::SecureErase,
    ];

    fn any_type() -> impl proptest::strategy::Strategy<Value = RequestType> {
        proptest::sample::select(TYPES.to_vec())
    }

    #[test]
    fn typed_parts_refuse_what_the_spec_refuses() {
        assert_eq!(
            ReqHeader::parse(&[0; 15]),
            Err(BlkWireError::Length { want: 16, got: 15 })
        );
        let mut h = BlkReqHeader::new(VIRTIO_BLK_T_OUT, 7).as_bytes().to_vec();
        h[4] = 0xaa;
        assert_eq!(
            ReqHeader::parse(&h),
            Ok(ReqHeader {
                ty: RequestType::Out,
                sector: 7
            }),
            "reserved is ignored"
        );
        assert_eq!(
            ReqHeader::parse(BlkReqHeader::new(5, 0).as_bytes()),
            Err(BlkWireError::Type(UnknownRequestType(5)))
        );
        let seg = |flags| BlkDiscardWriteZeroes::new(1, 2, flags);
        assert_eq!(
            SectorRange::from_wire(&seg(3), RequestType::WriteZeroes),
            Err(RangeError::UnknownFlags(2))
        );
        assert_eq!(
            SectorRange::from_wire(&seg(1), RequestType::Discard),
            Err(RangeError::UnmapNotAllowed(RequestType::Discard))
        );
        assert_eq!(
            SectorRange::from_wire(&seg(1), RequestType::SecureErase),
            Err(RangeError::UnmapNotAllowed(RequestType::SecureErase))
        );
        assert_eq!(
            SectorRange::from_wire(&seg(1), RequestType::WriteZeroes),
            Ok(SectorRange {
                sector: 1,
                num_sectors: 2,
                unmap: true
            })
        );
        assert!(DeviceId::parse(&[0; 19]).is_err());
        assert_eq!(DeviceId::encode(b"disk").as_bytes(), b"disk");
    }

    proptest::proptest! {
        /// Any header: emit, then parse, gives it back.
        #[test]
        fn header_emit_then_parse_is_the_identity(ty in any_type(), sector in proptest::num::u64::ANY) {
            let h = ReqHeader { ty, sector };
            let mut bytes = Vec::new();
            h.emit(&mut bytes);
            proptest::prop_assert_eq!(bytes.len(), BlkReqHeader::SIZE);
            proptest::prop_assert_eq!(ReqHeader::parse(&bytes), Ok(h));
            proptest::prop_assert_eq!(ReqHeader::from_wire(&h.to_wire()), Ok(h));
        }

        /// Any bytes: parsing never panics, and what parses emits back to bytes
        /// that parse to the same header.
        #[test]
        fn header_parse_is_total(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            if let Ok(h) = ReqHeader::parse(&bytes) {
                let mut again = Vec::new();
                h.emit(&mut again);
                proptest::prop_assert_eq!(ReqHeader::parse(&again), Ok(h));
            }
        }

        /// Any range a request of its type may carry: emit, then parse, gives it back.
        #[test]
        fn range_emit_then_parse_is_the_identity(
            ty in any_type(),
            sector in proptest::num::u64::ANY,
            num_sectors in proptest::num::u32::ANY,
            unmap in proptest::bool::ANY,
        ) {
            let r = SectorRange { sector, num_sectors, unmap: unmap && ty == RequestType::WriteZeroes };
            let mut bytes = Vec::new();
            r.emit(&mut bytes);
            proptest::prop_assert_eq!(bytes.len(), BlkDiscardWriteZeroes::SIZE);
            proptest::prop_assert_eq!(SectorRange::parse(&bytes, ty), Ok(r));
        }

        /// Any bytes, any type: parsing never panics, and what parses emits back to
        /// bytes that parse to the same range.
        #[test]
        fn range_parse_is_total(
            ty in any_type(),
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
        ) {
            if let Ok(r) = SectorRange::parse(&bytes, ty) {
                let mut again = Vec::new();
                r.emit(&mut again);
                proptest::prop_assert_eq!(SectorRange::parse(&again, ty), Ok(r));
            }
        }

        /// Any status byte: it parses to a status that emits the same byte, or
        /// is refused; any ID reply emits back the very bytes.
        #[test]
        fn status_and_id_round_trip(
            raw in proptest::num::u8::ANY,
            id in proptest::collection::vec(proptest::num::u8::ANY, 0..30),
        ) {
            match Status::try_from(raw) {
                Ok(s) => proptest::prop_assert_eq!(s.raw(), raw),
                Err(e) => proptest::prop_assert_eq!(e, UnknownStatus(raw)),
            }
            if let Ok(parsed) = DeviceId::parse(&id) {
                let mut again = Vec::new();
                parsed.emit(&mut again);
                proptest::prop_assert_eq!(again, id);
            }
        }
    }
}
