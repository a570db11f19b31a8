//! Requests, their checks before sending, and the checks of what the device returned.
//!
//! Every request lives in a preallocated *slot* of guest memory (one per ring entry):
//! the 16-byte header, a payload (one discard / write-zeroes segment, or the 20-byte
//! GET_ID reply) and the status byte. Data buffers are the caller's [`GuestBuf`]s,
//! handed to the ring as they are (zero copy).

use crate::error::{BlkError, Broken};
use crate::info::BlkInfo;
use virtio_core::GuestBuf;
pub use virtio_core::blk::DeviceId;
use virtio_core::blk::{
    BlkDiscardWriteZeroes, BlkReqHeader, GET_ID_LEN, ReqHeader, RequestType, SECTOR_SIZE, SectorRange, Status,
};

/// Bytes of guest memory per request slot: header, payload, status, rounded to a
/// cache line so neighbouring slots never share one.
pub(crate) const SLOT_BYTES: u64 = 64;
/// Offset of the payload (discard segment or GET_ID reply) in a slot.
const PAYLOAD: u64 = BlkReqHeader::SIZE as u64;
/// Offset of the status byte in a slot.
const STATUS: u64 = 48;
/// What the driver writes into the status byte before sending: not a valid status,
/// so a device (or a copy-back model) that never delivers the status is caught.
pub(crate) const STATUS_SENTINEL: u8 = 0xff;

const _: () = assert!(PAYLOAD + GET_ID_LEN as u64 <= STATUS && STATUS < SLOT_BYTES);

/// One block request. Sectors are always 512 bytes (virtio 1.2 §5.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Read `buf.len` bytes (a multiple of 512) from `sector` into `buf`.
    Read {
        /// First sector.
        sector: u64,
        /// Guest buffer the device writes; must stay allocated until completion.
        buf: GuestBuf,
    },
    /// Write `buf` (a multiple of 512 bytes) at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// Guest buffer the device reads; must stay allocated until completion.
        buf: GuestBuf,
    },
    /// Make every completed write durable (needs FLUSH).
    Flush,
    /// Deallocate `sectors` sectors from `sector` (needs DISCARD).
    Discard {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u32,
    },
    /// Make `sectors` sectors from `sector` read as zeroes (needs WRITE_ZEROES);
    /// `unmap` lets the device deallocate them.
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u32,
        /// Allow deallocation.
        unmap: bool,
    },
    /// Fetch the 20-byte device ID string.
    GetId,
}

/// A request that completed with VIRTIO_BLK_S_OK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The read buffer holds the data.
    Read,
    /// The data was written (durable only after a flush in writeback mode).
    Write,
    /// Completed writes are durable.
    Flush,
    /// The range was discarded.
    Discard,
    /// The range reads as zeroes.
    WriteZeroes,
    /// The device ID.
    Id(DeviceId),
}

/// The request type, kept in the slot while the request is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
}

/// Where a slot's parts are in guest memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotAddr(pub u64);

impl SlotAddr {
    pub(crate) fn header(self) -> u64 {
        self.0
    }
    pub(crate) fn payload(self) -> u64 {
        self.0 + PAYLOAD
    }
    pub(crate) fn status(self) -> u64 {
        self.0 + STATUS
    }
}

/// What goes into the slot and the ring for one request.
pub(crate) struct Prepared {
    pub header: BlkReqHeader,
    pub segment: Option<BlkDiscardWriteZeroes>,
    pub out: [GuestBuf; 2],
    pub n_out: usize,
    pub ins: [GuestBuf; 2],
    pub n_in: usize,
    pub kind: Kind,
    /// Device-writable data bytes before the status byte.
    pub data_in: u32,
}

impl Request {
    /// Checks the request against the device before anything is sent: features,
    /// read-only, lengths, capacity and range limits, all with checked arithmetic.
    pub(crate) fn check(&self, info: &BlkInfo) -> Result<(), BlkError> {
        let in_range = |sector: u64, sectors: u64| match sector.checked_add(sectors) {
            Some(end) if end <= info.capacity => Ok(()),
            _ => Err(BlkError::OutOfRange {
                sector,
                sectors,
                capacity: info.capacity,
            }),
        };
        let data = |sector: u64, buf: &GuestBuf| {
            let len = u64::from(buf.len);
            if len == 0 || len % SECTOR_SIZE != 0 {
                return Err(BlkError::BadLength(len));
            }
            in_range(sector, len / SECTOR_SIZE)
        };
        let range = |sector: u64, sectors: u32, limits: Option<crate::info::RangeLimits>| {
            let limits = limits.ok_or(BlkError::Unsupported)?;
            if info.read_only {
                return Err(BlkError::ReadOnly);
            }
            if sectors == 0 {
                return Err(BlkError::BadLength(0));
            }
            if sectors > limits.max_sectors {
                return Err(BlkError::OutOfRange {
                    sector,
                    sectors: u64::from(sectors),
                    capacity: info.capacity,
                });
            }
            in_range(sector, u64::from(sectors))
        };
        match *self {
            Request::Read { sector, buf } => data(sector, &buf),
            Request::Write { sector, buf } => {
                if info.read_only {
                    return Err(BlkError::ReadOnly);
                }
                data(sector, &buf)
            }
            Request::Flush if info.flush => Ok(()),
            Request::Flush => Err(BlkError::Unsupported),
            Request::Discard { sector, sectors } => range(sector, sectors, info.discard),
            Request::WriteZeroes { sector, sectors, .. } => range(sector, sectors, info.write_zeroes),
            Request::GetId => Ok(()),
        }
    }

    /// The header, payload and buffer lists for a request in `slot` (virtio 1.2
    /// §5.2.6: header, then data, then status; device-readable parts first).
    pub(crate) fn prepare(&self, slot: SlotAddr) -> Prepared {
        let header = GuestBuf::new(slot.header(), BlkReqHeader::LEN);
        let status = GuestBuf::new(slot.status(), 1);
        let none = GuestBuf::new(0, 0);
        // The header and segment go through the wire module's typed emitters.
        let p = |ty, sector, kind| Prepared {
            header: ReqHeader { ty, sector }.to_wire(),
            segment: None,
            out: [header, none],
            n_out: 1,
            ins: [status, none],
            n_in: 1,
            kind,
            data_in: 0,
        };
        match *self {
            Request::Read { sector, buf } => Prepared {
                ins: [buf, status],
                n_in: 2,
                data_in: buf.len,
                ..p(RequestType::In, sector, Kind::Read)
            },
            Request::Write { sector, buf } => Prepared {
                out: [header, buf],
                n_out: 2,
                ..p(RequestType::Out, sector, Kind::Write)
            },
            // §5.2.6.1: FLUSH carries sector 0 and no data.
            Request::Flush => p(RequestType::Flush, 0, Kind::Flush),
            Request::GetId => Prepared {
                ins: [GuestBuf::new(slot.payload(), DeviceId::LEN), status],
                n_in: 2,
                data_in: DeviceId::LEN,
                ..p(RequestType::GetId, 0, Kind::GetId)
            },
            Request::Discard { sector, sectors } => {
                let range = SectorRange {
                    sector,
                    num_sectors: sectors,
                    unmap: false,
                };
                Self::ranged(RequestType::Discard, Kind::Discard, range, slot, p)
            }
            Request::WriteZeroes {
                sector,
                sectors,
                unmap,
            } => {
                let range = SectorRange {
                    sector,
                    num_sectors: sectors,
                    unmap,
                };
                Self::ranged(RequestType::WriteZeroes, Kind::WriteZeroes, range, slot, p)
            }
        }
    }

    fn ranged(
        ty: RequestType,
        kind: Kind,
        range: SectorRange,
        slot: SlotAddr,
        p: impl Fn(RequestType, u64, Kind) -> Prepared,
    ) -> Prepared {
        let seg = GuestBuf::new(slot.payload(), BlkDiscardWriteZeroes::LEN);
        let mut r = p(ty, 0, kind);
        r.segment = Some(range.to_wire());
        r.out[1] = seg;
        r.n_out = 2;
        r
    }
}

/// Checks a used element against the request it completes and turns it into a
/// result (HOSTILE rule 31).
///
/// - The used length counts the status byte, so it is at least 1 (the ring already
///   checked it is at most `data_in + 1`).
/// - The status byte is OK, IOERR or UNSUPP; anything else (including the sentinel
///   the driver wrote) means the device never delivered a status.
/// - A request that succeeded wrote all its data and the status: its used length is
///   exactly `data_in + 1` (a block device has no short reads; §2.7.8.2 forbids the
///   driver to trust bytes past the used length). A failed one may report less.
pub(crate) fn complete(
    kind: Kind,
    data_in: u32,
    len: u32,
    status: u8,
    id: impl FnOnce() -> [u8; GET_ID_LEN],
) -> Result<Completion, BlkError> {
    let writable = data_in.saturating_add(1);
    let broken = |b| Err(BlkError::DeviceBroken(b));
    if len == 0 || len > writable {
        return broken(Broken::UsedLength { len, writable });
    }
    match Status::from_raw(status) {
        None => broken(Broken::Status(status)),
        Some(Status::IoErr) => Err(BlkError::IoError),
        Some(Status::Unsupp) => Err(BlkError::Unsupported),
        Some(Status::Ok) if len != writable => broken(Broken::UsedLength { len, writable }),
        Some(Status::Ok) => Ok(match kind {
            Kind::Read => Completion::Read,
            Kind::Write => Completion::Write,
            Kind::Flush => Completion::Flush,
            Kind::Discard => Completion::Discard,
            Kind::WriteZeroes => Completion::WriteZeroes,
            Kind::GetId => Completion::Id(DeviceId(id())),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_core::blk::{BlkConfig, BlkFeatures};

    fn info(features: BlkFeatures, capacity: u64) -> BlkInfo {
        let cfg = BlkConfig {
            capacity: capacity.into(),
            max_discard_sectors: 8.into(),
            ..BlkConfig::default()
        };
        BlkInfo::new(features.bits(), &cfg)
    }

    fn buf(len: u32) -> GuestBuf {
        GuestBuf::new(0x1000, len)
    }

    #[test]
    fn lengths_capacity_and_wrapping_sectors_are_refused_before_sending() {
        let i = info(BlkFeatures::empty(), 16);
        let read = |sector, len| {
            Request::Read {
                sector,
                buf: buf(len),
            }
            .check(&i)
        };
        assert!(read(0, 512).is_ok());
        assert!(read(15, 512).is_ok());
        assert!(matches!(read(16, 512), Err(BlkError::OutOfRange { .. })));
        assert!(matches!(read(0, 0), Err(BlkError::BadLength(0))));
        assert!(matches!(read(0, 100), Err(BlkError::BadLength(100))));
        assert!(matches!(read(u64::MAX, 512), Err(BlkError::OutOfRange { .. })));
    }

    #[test]
    fn read_only_and_missing_features_are_refused_before_sending() {
        let ro = info(BlkFeatures::RO | BlkFeatures::FLUSH | BlkFeatures::DISCARD, 16);
        let w = Request::Write {
            sector: 0,
            buf: buf(512),
        };
        assert!(matches!(w.check(&ro), Err(BlkError::ReadOnly)));
        assert!(Request::Flush.check(&ro).is_ok());
        let d = Request::Discard {
            sector: 0,
            sectors: 1,
        };
        assert!(matches!(d.check(&ro), Err(BlkError::ReadOnly)));
        let plain = info(BlkFeatures::DISCARD, 16);
        assert!(matches!(Request::Flush.check(&plain), Err(BlkError::Unsupported)));
        let wz = Request::WriteZeroes {
            sector: 0,
            sectors: 1,
            unmap: true,
        };
        assert!(matches!(wz.check(&plain), Err(BlkError::Unsupported)));
        assert!(d.check(&plain).is_ok());
        let big = Request::Discard {
            sector: 0,
            sectors: 9,
        };
        assert!(matches!(big.check(&plain), Err(BlkError::OutOfRange { .. })));
    }

    #[test]
    fn prepared_chains_follow_the_spec_layout() {
        let slot = SlotAddr(0x4000);
        let p = Request::Read {
            sector: 3,
            buf: buf(1024),
        }
        .prepare(slot);
        assert_eq!(&p.out[..p.n_out], &[GuestBuf::new(0x4000, 16)]);
        assert_eq!(&p.ins[..p.n_in], &[buf(1024), GuestBuf::new(0x4000 + STATUS, 1)]);
        assert_eq!(
            (p.header.type_.get(), p.header.sector.get(), p.data_in),
            (0, 3, 1024)
        );
        let p = Request::WriteZeroes {
            sector: 7,
            sectors: 2,
            unmap: true,
        }
        .prepare(slot);
        assert_eq!(p.n_out, 2);
        assert_eq!(p.header.sector.get(), 0);
        let seg = p.segment.unwrap();
        assert_eq!(
            (seg.sector.get(), seg.num_sectors.get(), seg.flags.get()),
            (7, 2, 1)
        );
        let p = Request::GetId.prepare(slot);
        assert_eq!(p.ins[0], GuestBuf::new(0x4000 + PAYLOAD, 20));
        assert_eq!(p.data_in, 20);
    }

    #[test]
    fn completions_are_checked_against_the_request() {
        let id = || *b"serial-0123\0\0\0\0\0\0\0\0\0";
        assert_eq!(complete(Kind::Read, 512, 513, 0, id).unwrap(), Completion::Read);
        assert_eq!(complete(Kind::Write, 0, 1, 0, id).unwrap(), Completion::Write);
        let Completion::Id(got) = complete(Kind::GetId, 20, 21, 0, id).unwrap() else {
            panic!("not an id");
        };
        assert_eq!(got.to_string_lossy(), "serial-0123");
        assert!(matches!(
            complete(Kind::Read, 512, 1, 1, id),
            Err(BlkError::IoError)
        ));
        assert!(matches!(
            complete(Kind::Flush, 0, 1, 2, id),
            Err(BlkError::Unsupported)
        ));
        let broken = |r: Result<Completion, BlkError>| match r {
            Err(BlkError::DeviceBroken(b)) => b,
            other => panic!("expected broken, got {other:?}"),
        };
        assert_eq!(
            broken(complete(Kind::Write, 0, 0, 0, id)),
            Broken::UsedLength { len: 0, writable: 1 }
        );
        assert_eq!(
            broken(complete(Kind::Read, 512, 100, 0, id)),
            Broken::UsedLength {
                len: 100,
                writable: 513
            }
        );
        assert_eq!(broken(complete(Kind::Write, 0, 1, 3, id)), Broken::Status(3));
        assert_eq!(
            broken(complete(Kind::Write, 0, 1, STATUS_SENTINEL, id)),
            Broken::Status(0xff)
        );
    }

    #[test]
    fn device_id_stops_at_the_first_nul_and_survives_garbage() {
        assert_eq!(
            DeviceId(*b"abcdefghijklmnopqrst").to_string_lossy(),
            "abcdefghijklmnopqrst"
        );
        let mut raw = [0u8; 20];
        raw[..3].copy_from_slice(&[b'a', 0xff, b'b']);
        assert_eq!(DeviceId(raw).to_string_lossy(), "a\u{fffd}b");
    }
}
