//! The virtio-blk request parser against real chains (HOSTILE rules 13-20).
//!
//! Chains are built by a [`SplitDriver`] over an in-memory arena and popped by a
//! [`SplitDevice`] whose memory is a [`Recorder`], so every test can also prove that
//! parsing wrote nothing and that a status write touched exactly the status byte.

use std::sync::Arc;

use backend_host::blk::request::{
    BlockRange, DiskFacts, Parser, Part, Piece, Reject, RejectReason, Request, RequestKind, SegmentSpan,
};
use proptest::prelude::*;
use virtio_core::blk::{
    BlkDiscardWriteZeroes, BlkFeatures, BlkReqHeader, GET_ID_LEN, RequestType, Status, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_GET_LIFETIME, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_SECURE_ERASE, VIRTIO_BLK_T_WRITE_ZEROES, encode_device_id,
};
use virtio_core::features::Features;
use virtio_core::ring::Chain;
use virtio_core::test_utils::raw::{AccessKind, RawDriver, Recorder};
use virtio_core::test_utils::{Arena, IdentityShare};
use virtio_core::{GuestBuf, SplitDevice, SplitDriver};
use zerocopy::IntoBytes;

const QUEUE: u16 = 64;

/// One driver, one device, one arena.
struct Rig {
    arena: Arc<Arena>,
    driver: SplitDriver<IdentityShare, u32>,
    device: SplitDevice<Recorder<Arc<Arena>>>,
}

/// A chain and the guest buffers it was built from.
struct Built {
    chain: Chain,
    ins: Vec<GuestBuf>,
}

impl Rig {
    fn new(ring_features: Features) -> Rig {
        let arena = Arena::new(0x4000_0000, 2 << 20).unwrap();
        let (_, ring) = arena.alloc_split_ring(QUEUE).unwrap();
        let share = IdentityShare::new(arena.clone(), QUEUE);
        let driver = SplitDriver::new(QUEUE, ring.clone(), share, ring_features).unwrap();
        let device = SplitDevice::new(QUEUE, &ring, Recorder::new(arena.clone()), ring_features).unwrap();
        Rig {
            arena,
            driver,
            device,
        }
    }

    fn plain() -> Rig {
        Rig::new(Features::VERSION_1)
    }

    /// A buffer holding `bytes`, starting `skew` bytes past a 64-byte boundary.
    fn buf(&self, bytes: &[u8], skew: u64) -> GuestBuf {
        let len = u32::try_from(bytes.len()).unwrap();
        let at = self.arena.alloc(u64::from(len) + skew, 64).unwrap() + skew;
        self.arena.write(at, bytes).unwrap();
        GuestBuf::new(at, len)
    }

    /// Builds a chain of device-readable buffers holding `out` and device-writable
    /// buffers of `ins` bytes (filled with 0xee), and pops it.
    fn chain(&mut self, out: &[&[u8]], ins: &[u32]) -> Built {
        let out: Vec<_> = out.iter().map(|b| self.buf(b, 0)).collect();
        let ins: Vec<_> = ins
            .iter()
            .map(|&n| self.buf(&vec![0xee; n as usize], 0))
            .collect();
        self.driver.add(&out, &ins, 0).unwrap();
        let chain = self.device.pop().unwrap().unwrap();
        self.device.memory().take();
        Built { chain, ins }
    }

    fn mem(&self) -> &Recorder<Arc<Arena>> {
        self.device.memory()
    }

    /// Parses, checking that parsing wrote nothing.
    fn parse(&self, parser: &Parser, chain: &Chain) -> Result<Request, Reject> {
        let r = parser.parse(chain, self.mem());
        for a in self.mem().take() {
            assert_ne!(a.kind, AccessKind::Write, "parse wrote guest memory: {a:?}");
        }
        r
    }

    /// The writes logged since the last call, as `(addr, len)`.
    fn writes(&self) -> Vec<(u64, u64)> {
        self.mem()
            .take()
            .into_iter()
            .filter(|a| a.kind == AccessKind::Write)
            .map(|a| (a.addr, a.len))
            .collect()
    }

    fn byte(&self, addr: u64) -> u8 {
        let mut b = [0u8];
        self.arena.read(addr, &mut b).unwrap();
        b[0]
    }
}

fn header(ty: u32, sector: u64) -> Vec<u8> {
    BlkReqHeader::new(ty, sector).as_bytes().to_vec()
}

fn range(sector: u64, num_sectors: u32, flags: u32) -> Vec<u8> {
    BlkDiscardWriteZeroes::new(sector, num_sectors, flags)
        .as_bytes()
        .to_vec()
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Address of the last writable byte (the status) of a chain built from `ins`.
fn status_addr(b: &Built) -> u64 {
    let last = b.ins.iter().rev().find(|g| g.len > 0).unwrap();
    last.addr + u64::from(last.len) - 1
}

fn all_features() -> BlkFeatures {
    BlkFeatures::FLUSH | BlkFeatures::DISCARD | BlkFeatures::WRITE_ZEROES | BlkFeatures::SECURE_ERASE
}

fn parser(capacity_sectors: u64) -> Parser {
    Parser::new(all_features(), DiskFacts::new(capacity_sectors))
}

/// Asserts a reject with a status byte, writes it and checks that exactly the status
/// byte changed, to the expected code; returns the used length.
fn assert_rejected(rig: &Rig, b: &Built, r: Result<Request, Reject>, reason: RejectReason) -> u32 {
    let reject = r.expect_err("request accepted");
    assert_eq!(reject.reason(), Some(reason), "{reject:?}");
    let code = reason.status();
    assert_eq!(reject.code(), Some(code));
    let used = reject.write_status(rig.mem()).unwrap();
    let at = status_addr(b);
    assert_eq!(rig.writes(), vec![(at, 1)], "only the status byte is written");
    assert_eq!(rig.byte(at), code.raw());
    used
}

fn ioerr(rig: &Rig, b: &Built, r: Result<Request, Reject>, reason: RejectReason) -> u32 {
    assert_eq!(reason.status(), Status::IoErr);
    assert_rejected(rig, b, r, reason)
}

fn unsupp(rig: &Rig, b: &Built, r: Result<Request, Reject>, reason: RejectReason) -> u32 {
    assert_eq!(reason.status(), Status::Unsupp);
    assert_rejected(rig, b, r, reason)
}

// ---- Layout (HOSTILE 13, 14) ------------------------------------------------------

#[test]
fn header_only_has_no_status_and_is_returned_with_length_zero() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_IN, 0)], &[]);
    let r = rig.parse(&parser(8), &b.chain);
    assert_eq!(r, Err(Reject::NoStatus));
    let reject = r.unwrap_err();
    assert_eq!((reject.code(), reject.reason()), (None, None));
    assert_eq!(reject.write_status(rig.mem()).unwrap(), 0);
    assert!(rig.writes().is_empty());
    // The queue keeps working: the head goes back with length 0, the next request parses.
    rig.device.add_used(b.chain.head(), 0).unwrap();
    assert_eq!(rig.driver.pop_used().unwrap().unwrap().len, 0);
    let b = rig.chain(&[&header(VIRTIO_BLK_T_IN, 0)], &[512, 1]);
    assert!(rig.parse(&parser(8), &b.chain).is_ok());
}

#[test]
fn read_only_status_has_no_status() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_OUT, 0), &[7; 512], &[0xff]], &[]);
    let r = rig.parse(&parser(8), &b.chain);
    assert_eq!(r, Err(Reject::NoStatus));
    assert_eq!(r.unwrap_err().write_status(rig.mem()).unwrap(), 0);
    assert!(rig.writes().is_empty());
}

#[test]
fn empty_status_descriptor_has_no_status() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_FLUSH, 0)], &[0]);
    assert_eq!(rig.parse(&parser(8), &b.chain), Err(Reject::NoStatus));
}

#[test]
fn empty_status_after_read_data_leaves_an_odd_data_length() {
    // The last writable byte is the status, wherever the driver meant it to be.
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_IN, 0)], &[512, 0]);
    let r = rig.parse(&parser(8), &b.chain);
    let used = ioerr(&rig, &b, r, RejectReason::NotSectorMultiple { len: 511 });
    assert_eq!(
        used, 0,
        "a status byte behind unwritten data is no written prefix"
    );
}

#[test]
fn writable_header_is_rejected_in_the_last_writable_byte() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[], &[16, 1]);
    let r = rig.parse(&parser(8), &b.chain);
    ioerr(&rig, &b, r, RejectReason::HeaderNotReadable { readable: 0 });
}

#[test]
fn header_half_readable_half_writable_is_rejected() {
    let mut rig = Rig::plain();
    let h = header(VIRTIO_BLK_T_IN, 0);
    let b = rig.chain(&[&h[..8]], &[8, 512, 1]);
    let r = rig.parse(&parser(8), &b.chain);
    ioerr(&rig, &b, r, RejectReason::HeaderNotReadable { readable: 8 });
}

#[test]
fn read_data_in_a_readable_buffer_is_rejected_without_writing_it() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_IN, 0), &[0x11; 512]], &[1]);
    let r = rig.parse(&parser(8), &b.chain);
    let used = ioerr(&rig, &b, r, RejectReason::ReadableData { len: 512 });
    assert_eq!(used, 1);
}

#[test]
fn write_with_writable_data_is_rejected() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_OUT, 0)], &[512, 1]);
    let r = rig.parse(&parser(8), &b.chain);
    ioerr(&rig, &b, r, RejectReason::WritableData { len: 512 });
}

#[test]
fn header_split_across_descriptors_is_read_once() {
    let mut rig = Rig::plain();
    let h = header(VIRTIO_BLK_T_IN, 3);
    let b = rig.chain(&[&h[..5], &[], &h[5..13], &h[13..]], &[1024, 1]);
    let r = parser(8).parse(&b.chain, rig.mem());
    let read: u64 = rig
        .mem()
        .take()
        .iter()
        .filter(|a| a.kind == AccessKind::Read)
        .map(|a| a.len)
        .sum();
    assert_eq!(read, 16, "header bytes fetched exactly once");
    let req = r.unwrap();
    assert_eq!(
        req.kind(),
        &RequestKind::Read {
            sector: 3,
            offset: 3 * 512,
            len: 1024
        }
    );
}

#[test]
fn header_and_data_in_one_descriptor() {
    let mut rig = Rig::plain();
    let bytes = concat(&[&header(VIRTIO_BLK_T_OUT, 1), &[0x5a; 512]]);
    let b = rig.chain(&[&bytes], &[1]);
    let req = rig.parse(&parser(8), &b.chain).unwrap();
    let data = req.data();
    assert_eq!(
        data,
        SegmentSpan {
            part: Part::Readable,
            offset: 16,
            len: 512
        }
    );
    let pieces: Vec<Piece> = data.pieces(&b.chain).collect();
    assert_eq!(pieces.len(), 1);
    assert_eq!((pieces[0].offset, pieces[0].len), (16, 512));
    let mut got = vec![0u8; 512];
    data.read(&b.chain, rig.mem(), &mut got).unwrap();
    assert_eq!(got, vec![0x5a; 512]);
}

#[test]
fn status_in_the_tail_of_the_last_writable_descriptor() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_IN, 0)], &[513]);
    let req = rig.parse(&parser(8), &b.chain).unwrap();
    assert_eq!(
        req.data(),
        SegmentSpan {
            part: Part::Writable,
            offset: 0,
            len: 512
        }
    );
    let st = req.status_target();
    assert_eq!((st.offset(), st.writable_len()), (512, 513));
    req.data().write(&b.chain, rig.mem(), &[0x77; 512]).unwrap();
    assert_eq!(req.write_status(rig.mem(), Status::Ok).unwrap(), 513);
    assert_eq!(rig.byte(b.ins[0].addr + 512), 0);
    assert_eq!(rig.byte(b.ins[0].addr + 511), 0x77);
    rig.device.add_used(b.chain.head(), 513).unwrap();
}

#[test]
fn failed_read_reports_no_written_prefix() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_IN, 0)], &[512, 1]);
    let req = rig.parse(&parser(8), &b.chain).unwrap();
    assert_eq!(req.write_status(rig.mem(), Status::IoErr).unwrap(), 0);
    assert_eq!(rig.writes(), vec![(status_addr(&b), 1)]);
    assert_eq!(rig.byte(status_addr(&b)), Status::IoErr.raw());
}

// ---- Lengths and ranges (HOSTILE 15, 16) ------------------------------------------

#[test]
fn in_length_not_a_multiple_of_512_is_ioerr() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_IN, 0)], &[500, 1]);
    let r = rig.parse(&parser(8), &b.chain);
    ioerr(&rig, &b, r, RejectReason::NotSectorMultiple { len: 500 });
}

#[test]
fn out_length_not_a_multiple_of_512_is_ioerr() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_OUT, 0), &[1; 513]], &[1]);
    let r = rig.parse(&parser(8), &b.chain);
    ioerr(&rig, &b, r, RejectReason::NotSectorMultiple { len: 513 });
}

#[test]
fn sector_past_capacity_is_ioerr() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_IN, 7)], &[1024, 1]);
    let r = rig.parse(&parser(8), &b.chain);
    ioerr(&rig, &b, r, RejectReason::OutOfRange { sector: 7, len: 1024 });
    let b = rig.chain(&[&header(VIRTIO_BLK_T_OUT, 9), &[0; 512]], &[1]);
    let r = rig.parse(&parser(8), &b.chain);
    ioerr(&rig, &b, r, RejectReason::OutOfRange { sector: 9, len: 512 });
}

#[test]
fn read_ending_at_capacity_is_accepted() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_IN, 6)], &[1024, 1]);
    let req = rig.parse(&parser(8), &b.chain).unwrap();
    assert_eq!(
        req.kind(),
        &RequestKind::Read {
            sector: 6,
            offset: 3072,
            len: 1024
        }
    );
}

#[test]
fn sector_near_2_pow_64_is_ioerr() {
    // The largest capacity there is, so only the overflow checks can refuse.
    let p = parser(u64::MAX);
    let mut rig = Rig::plain();
    for sector in [u64::MAX, u64::MAX - 1, 1 << 63] {
        let b = rig.chain(&[&header(VIRTIO_BLK_T_IN, sector)], &[512, 1]);
        let r = rig.parse(&p, &b.chain);
        ioerr(&rig, &b, r, RejectReason::OutOfRange { sector, len: 512 });
    }
}

#[test]
fn sector_at_2_pow_55_overflows_the_byte_offset_and_is_ioerr() {
    let p = parser(u64::MAX);
    let mut rig = Rig::plain();
    // 2^55 * 512 = 2^64: a shift would silently give offset 0.
    let b = rig.chain(&[&header(VIRTIO_BLK_T_OUT, 1 << 55), &[0; 512]], &[1]);
    let r = rig.parse(&p, &b.chain);
    ioerr(
        &rig,
        &b,
        r,
        RejectReason::OutOfRange {
            sector: 1 << 55,
            len: 512,
        },
    );
    // The offset fits but offset + len reaches 2^64.
    let sector = (1 << 55) - 1;
    let b = rig.chain(&[&header(VIRTIO_BLK_T_OUT, sector), &[0; 512]], &[1]);
    let r = rig.parse(&p, &b.chain);
    ioerr(&rig, &b, r, RejectReason::OutOfRange { sector, len: 512 });
    // One sector lower, the transfer ends at 2^64 - 512 and is representable.
    let sector = (1 << 55) - 2;
    let b = rig.chain(&[&header(VIRTIO_BLK_T_OUT, sector), &[0; 512]], &[1]);
    let req = rig.parse(&p, &b.chain).unwrap();
    assert_eq!(
        req.kind(),
        &RequestKind::Write {
            sector,
            offset: u64::MAX - 1023,
            len: 512
        }
    );
}

#[test]
fn read_without_data_is_an_empty_read() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_IN, 8)], &[1]);
    let req = rig.parse(&parser(8), &b.chain).unwrap();
    assert_eq!(
        req.kind(),
        &RequestKind::Read {
            sector: 8,
            offset: 4096,
            len: 0
        }
    );
    assert_eq!(req.write_status(rig.mem(), Status::Ok).unwrap(), 1);
}

// ---- Types and features (HOSTILE 16, 18) ------------------------------------------

#[test]
fn unknown_type_is_unsupp() {
    let mut rig = Rig::plain();
    // Legacy SCSI (2, 3), FLUSH_OUT (5), zoned (15, 16), BARRIER (bit 31), garbage.
    for ty in [2, 3, 5, 15, 16, 0x8000_0000, 0x8000_0001, u32::MAX] {
        let b = rig.chain(&[&header(ty, 0)], &[512, 1]);
        let r = rig.parse(&parser(8), &b.chain);
        unsupp(&rig, &b, r, RejectReason::UnknownType(ty));
    }
}

#[test]
fn flush_without_negotiation_is_unsupp() {
    let mut rig = Rig::plain();
    let p = Parser::new(BlkFeatures::empty(), DiskFacts::new(8));
    let b = rig.chain(&[&header(VIRTIO_BLK_T_FLUSH, 0)], &[1]);
    let r = rig.parse(&p, &b.chain);
    let used = unsupp(&rig, &b, r, RejectReason::NotNegotiated(RequestType::Flush));
    assert_eq!(used, 1);
}

#[test]
fn other_types_without_negotiation_are_unsupp() {
    let mut rig = Rig::plain();
    let p = Parser::new(BlkFeatures::FLUSH, DiskFacts::new(8));
    let cases = [
        (VIRTIO_BLK_T_DISCARD, RequestType::Discard),
        (VIRTIO_BLK_T_WRITE_ZEROES, RequestType::WriteZeroes),
        (VIRTIO_BLK_T_SECURE_ERASE, RequestType::SecureErase),
        (VIRTIO_BLK_T_GET_LIFETIME, RequestType::GetLifetime),
    ];
    for (raw, ty) in cases {
        let b = rig.chain(&[&header(raw, 0), &range(0, 1, 0)], &[1]);
        let r = rig.parse(&p, &b.chain);
        unsupp(&rig, &b, r, RejectReason::NotNegotiated(ty));
    }
}

#[test]
fn flush_is_accepted_with_status_only() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_FLUSH, 0)], &[1]);
    let req = rig.parse(&parser(8), &b.chain).unwrap();
    assert_eq!(req.kind(), &RequestKind::Flush);
    assert!(req.data().is_empty());
    assert_eq!(req.write_status(rig.mem(), Status::Ok).unwrap(), 1);
    assert_eq!(rig.writes(), vec![(status_addr(&b), 1)]);
}

#[test]
fn flush_with_nonzero_sector_is_ioerr() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_FLUSH, 5)], &[1]);
    let r = rig.parse(&parser(8), &b.chain);
    ioerr(&rig, &b, r, RejectReason::FlushSector(5));
}

#[test]
fn flush_with_data_is_ioerr() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_FLUSH, 0), &[0; 512]], &[1]);
    let r = rig.parse(&parser(8), &b.chain);
    ioerr(&rig, &b, r, RejectReason::FlushWithData { len: 512 });
    let b = rig.chain(&[&header(VIRTIO_BLK_T_FLUSH, 0)], &[8, 1]);
    let r = rig.parse(&parser(8), &b.chain);
    ioerr(&rig, &b, r, RejectReason::FlushWithData { len: 8 });
}

#[test]
fn flush_on_read_only_disk_is_accepted() {
    let mut rig = Rig::plain();
    let p = Parser::new(
        BlkFeatures::FLUSH,
        DiskFacts {
            read_only: true,
            ..DiskFacts::new(8)
        },
    );
    let b = rig.chain(&[&header(VIRTIO_BLK_T_FLUSH, 0)], &[1]);
    assert_eq!(rig.parse(&p, &b.chain).unwrap().kind(), &RequestKind::Flush);
}

#[test]
fn get_id_of_20_bytes_is_accepted_and_answered_nul_padded() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_GET_ID, 0)], &[20, 1]);
    let req = rig.parse(&parser(8), &b.chain).unwrap();
    assert_eq!(req.kind(), &RequestKind::GetId);
    let id = encode_device_id(b"vio-disk");
    req.data().write(&b.chain, rig.mem(), &id).unwrap();
    assert_eq!(req.write_status(rig.mem(), Status::Ok).unwrap(), 21);
    let mut got = [0xffu8; GET_ID_LEN];
    rig.arena.read(b.ins[0].addr, &mut got).unwrap();
    assert_eq!(&got[..8], b"vio-disk");
    assert_eq!(&got[8..], &[0u8; 12]);
}

#[test]
fn get_id_of_19_bytes_is_ioerr() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_GET_ID, 0)], &[19, 1]);
    let r = rig.parse(&parser(8), &b.chain);
    ioerr(&rig, &b, r, RejectReason::GetIdLength(19));
}

#[test]
fn get_id_of_21_bytes_is_ioerr() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_GET_ID, 0)], &[21, 1]);
    let r = rig.parse(&parser(8), &b.chain);
    ioerr(&rig, &b, r, RejectReason::GetIdLength(21));
}

#[test]
fn get_lifetime_needs_exactly_six_bytes() {
    let mut rig = Rig::plain();
    let p = Parser::new(BlkFeatures::LIFETIME, DiskFacts::new(8));
    let b = rig.chain(&[&header(VIRTIO_BLK_T_GET_LIFETIME, 0)], &[6, 1]);
    assert_eq!(rig.parse(&p, &b.chain).unwrap().kind(), &RequestKind::GetLifetime);
    let b = rig.chain(&[&header(VIRTIO_BLK_T_GET_LIFETIME, 0)], &[8, 1]);
    let r = rig.parse(&p, &b.chain);
    ioerr(&rig, &b, r, RejectReason::LifetimeLength(8));
}

// ---- Read-only disk (HOSTILE 19) --------------------------------------------------

#[test]
fn write_to_read_only_disk_is_ioerr_and_nothing_is_written() {
    let mut rig = Rig::plain();
    let ro = DiskFacts {
        read_only: true,
        ..DiskFacts::new(8)
    };
    let p = Parser::new(all_features(), ro);
    let b = rig.chain(&[&header(VIRTIO_BLK_T_OUT, 0), &[3; 512]], &[1]);
    let r = rig.parse(&p, &b.chain);
    ioerr(&rig, &b, r, RejectReason::ReadOnly);
    for ty in [
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        VIRTIO_BLK_T_SECURE_ERASE,
    ] {
        let b = rig.chain(&[&header(ty, 0), &range(0, 1, 0)], &[1]);
        let r = rig.parse(&p, &b.chain);
        ioerr(&rig, &b, r, RejectReason::ReadOnly);
    }
    // Reads still work.
    let b = rig.chain(&[&header(VIRTIO_BLK_T_IN, 0)], &[512, 1]);
    assert!(rig.parse(&p, &b.chain).is_ok());
}

// ---- Discard, write zeroes, secure erase (HOSTILE 17) -----------------------------

#[test]
fn discard_of_one_range_is_parsed() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_DISCARD, 0), &range(2, 4, 0)], &[1]);
    let req = rig.parse(&parser(8), &b.chain).unwrap();
    assert_eq!(
        req.kind(),
        &RequestKind::Discard(vec![BlockRange {
            sector: 2,
            num_sectors: 4,
            offset: 1024,
            len: 2048,
            unmap: false
        }])
    );
    assert_eq!(req.write_status(rig.mem(), Status::Ok).unwrap(), 1);
}

#[test]
fn discard_with_unmap_is_unsupp() {
    let mut rig = Rig::plain();
    let b = rig.chain(
        &[
            &header(VIRTIO_BLK_T_DISCARD, 0),
            &range(0, 1, BlkDiscardWriteZeroes::UNMAP),
        ],
        &[1],
    );
    let r = rig.parse(&parser(8), &b.chain);
    unsupp(&rig, &b, r, RejectReason::UnmapNotAllowed(RequestType::Discard));
}

#[test]
fn secure_erase_with_unmap_is_unsupp() {
    let mut rig = Rig::plain();
    let b = rig.chain(
        &[
            &header(VIRTIO_BLK_T_SECURE_ERASE, 0),
            &range(0, 1, BlkDiscardWriteZeroes::UNMAP),
        ],
        &[1],
    );
    let r = rig.parse(&parser(8), &b.chain);
    unsupp(
        &rig,
        &b,
        r,
        RejectReason::UnmapNotAllowed(RequestType::SecureErase),
    );
}

#[test]
fn range_with_unknown_flags_is_unsupp() {
    let mut rig = Rig::plain();
    for ty in [
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        VIRTIO_BLK_T_SECURE_ERASE,
    ] {
        let b = rig.chain(&[&header(ty, 0), &range(0, 1, 0x8000_0003)], &[1]);
        let r = rig.parse(&parser(8), &b.chain);
        unsupp(&rig, &b, r, RejectReason::UnknownFlags(0x8000_0002));
    }
}

#[test]
fn unknown_flags_win_over_a_bad_range_in_an_earlier_segment() {
    let mut rig = Rig::plain();
    let p = Parser::new(
        all_features(),
        DiskFacts {
            max_discard_seg: 2,
            ..DiskFacts::new(8)
        },
    );
    let list = concat(&[&range(100, 1, 0), &range(0, 1, 4)]);
    let b = rig.chain(&[&header(VIRTIO_BLK_T_DISCARD, 0), &list], &[1]);
    let r = rig.parse(&p, &b.chain);
    unsupp(&rig, &b, r, RejectReason::UnknownFlags(4));
}

#[test]
fn write_zeroes_with_unmap_is_accepted() {
    let mut rig = Rig::plain();
    let p = Parser::new(
        all_features(),
        DiskFacts {
            max_write_zeroes_seg: 2,
            ..DiskFacts::new(8)
        },
    );
    let list = concat(&[&range(0, 2, BlkDiscardWriteZeroes::UNMAP), &range(4, 4, 0)]);
    let b = rig.chain(&[&header(VIRTIO_BLK_T_WRITE_ZEROES, 0), &list], &[1]);
    let req = rig.parse(&p, &b.chain).unwrap();
    let RequestKind::WriteZeroes(ranges) = req.kind() else {
        panic!("{req:?}")
    };
    let got: Vec<_> = ranges.iter().map(|r| (r.offset, r.len, r.unmap)).collect();
    assert_eq!(got, vec![(0, 1024, true), (2048, 2048, false)]);
}

#[test]
fn too_many_segments_is_ioerr() {
    let mut rig = Rig::plain();
    let p = Parser::new(
        all_features(),
        DiskFacts {
            max_discard_seg: 2,
            ..DiskFacts::new(8)
        },
    );
    let list = concat(&[&range(0, 1, 0), &range(1, 1, 0), &range(2, 1, 0)]);
    let b = rig.chain(&[&header(VIRTIO_BLK_T_DISCARD, 0), &list], &[1]);
    let r = rig.parse(&p, &b.chain);
    ioerr(&rig, &b, r, RejectReason::TooManyRanges { count: 3, max: 2 });
}

#[test]
fn wrapping_range_is_ioerr() {
    let mut rig = Rig::plain();
    let p = parser(u64::MAX);
    for (sector, n) in [(u64::MAX - 1, 4), (1 << 55, 1), ((1 << 55) - 1, 2)] {
        let b = rig.chain(&[&header(VIRTIO_BLK_T_DISCARD, 0), &range(sector, n, 0)], &[1]);
        let r = rig.parse(&p, &b.chain);
        ioerr(
            &rig,
            &b,
            r,
            RejectReason::RangeOutOfRange {
                sector,
                num_sectors: n,
            },
        );
    }
}

#[test]
fn range_past_capacity_is_ioerr() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_WRITE_ZEROES, 0), &range(6, 3, 0)], &[1]);
    let r = rig.parse(&parser(8), &b.chain);
    ioerr(
        &rig,
        &b,
        r,
        RejectReason::RangeOutOfRange {
            sector: 6,
            num_sectors: 3,
        },
    );
}

#[test]
fn range_longer_than_max_sectors_is_ioerr() {
    let mut rig = Rig::plain();
    let p = Parser::new(
        all_features(),
        DiskFacts {
            max_discard_sectors: 2,
            ..DiskFacts::new(8)
        },
    );
    let b = rig.chain(&[&header(VIRTIO_BLK_T_DISCARD, 0), &range(0, 3, 0)], &[1]);
    let r = rig.parse(&p, &b.chain);
    ioerr(
        &rig,
        &b,
        r,
        RejectReason::RangeTooLong {
            num_sectors: 3,
            max: 2,
        },
    );
}

#[test]
fn range_list_not_a_multiple_of_16_or_empty_is_ioerr() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_DISCARD, 0), &[0; 20]], &[1]);
    let r = rig.parse(&parser(8), &b.chain);
    ioerr(&rig, &b, r, RejectReason::RangeListLength(20));
    let b = rig.chain(&[&header(VIRTIO_BLK_T_DISCARD, 0)], &[1]);
    let r = rig.parse(&parser(8), &b.chain);
    ioerr(&rig, &b, r, RejectReason::RangeListLength(0));
}

#[test]
fn segment_split_across_two_descriptors_is_parsed() {
    let mut rig = Rig::plain();
    let p = Parser::new(
        all_features(),
        DiskFacts {
            max_discard_seg: 2,
            ..DiskFacts::new(64)
        },
    );
    let list = concat(&[&range(8, 8, 0), &range(32, 16, 0)]);
    // Header and 5 bytes of the first segment, then the rest across two descriptors.
    let first = concat(&[&header(VIRTIO_BLK_T_DISCARD, 0), &list[..5]]);
    let b = rig.chain(&[&first, &list[5..21], &list[21..]], &[1]);
    let req = rig.parse(&p, &b.chain).unwrap();
    let RequestKind::Discard(ranges) = req.kind() else {
        panic!("{req:?}")
    };
    let got: Vec<_> = ranges.iter().map(|r| (r.sector, r.num_sectors)).collect();
    assert_eq!(got, vec![(8, 8), (32, 16)]);
    assert_eq!(
        req.data(),
        SegmentSpan {
            part: Part::Readable,
            offset: 16,
            len: 32
        }
    );
}

// ---- Segment limits and odd segments (HOSTILE 20) ---------------------------------

#[test]
fn odd_segments_of_100_and_412_bytes_make_one_sector() {
    let mut rig = Rig::plain();
    // Out: the data at unaligned addresses.
    let data: Vec<u8> = (0..512u32).map(|i| (i % 251) as u8).collect();
    let hdr = rig.buf(&header(VIRTIO_BLK_T_OUT, 3), 0);
    let a = rig.buf(&data[..100], 3);
    let c = rig.buf(&data[100..], 7);
    let st = rig.buf(&[0xee], 1);
    rig.driver.add(&[hdr, a, c], &[st], 0).unwrap();
    let chain = rig.device.pop().unwrap().unwrap();
    rig.mem().take();
    let req = rig.parse(&parser(8), &chain).unwrap();
    assert_eq!(
        req.kind(),
        &RequestKind::Write {
            sector: 3,
            offset: 1536,
            len: 512
        }
    );
    let span = req.data();
    assert_eq!(
        span,
        SegmentSpan {
            part: Part::Readable,
            offset: 16,
            len: 512
        }
    );
    let pieces: Vec<_> = span
        .pieces(&chain)
        .map(|p| (p.seg.addr(), p.offset, p.len))
        .collect();
    assert_eq!(pieces, vec![(a.addr, 0, 100), (c.addr, 0, 412)]);
    let mut got = vec![0u8; 512];
    span.read(&chain, rig.mem(), &mut got).unwrap();
    assert_eq!(got, data);

    // In: the same split on the writable side.
    let b = rig.chain(&[&header(VIRTIO_BLK_T_IN, 3)], &[100, 412, 1]);
    let req = rig.parse(&parser(8), &b.chain).unwrap();
    let pieces: Vec<_> = req.data().pieces(&b.chain).map(|p| p.len).collect();
    assert_eq!(pieces, vec![100, 412]);
    req.data().write(&b.chain, rig.mem(), &data).unwrap();
    assert_eq!(req.write_status(rig.mem(), Status::Ok).unwrap(), 513);
    let mut back = vec![0u8; 412];
    rig.arena.read(b.ins[1].addr, &mut back).unwrap();
    assert_eq!(back, data[100..]);
}

#[test]
fn seg_max_limits_data_descriptors_when_negotiated() {
    let mut rig = Rig::plain();
    let facts = DiskFacts {
        seg_max: 2,
        ..DiskFacts::new(8)
    };
    let with = Parser::new(BlkFeatures::SEG_MAX, facts);
    let without = Parser::new(BlkFeatures::empty(), facts);
    let b = rig.chain(
        &[&header(VIRTIO_BLK_T_OUT, 0), &[0; 512], &[0; 512], &[0; 512]],
        &[1],
    );
    assert!(rig.parse(&without, &b.chain).is_ok());
    let r = rig.parse(&with, &b.chain);
    ioerr(
        &rig,
        &b,
        r,
        RejectReason::TooManyDataSegments { count: 3, max: 2 },
    );
    // Header and status do not count.
    let b = rig.chain(&[&header(VIRTIO_BLK_T_IN, 0)], &[512, 512, 1]);
    assert!(rig.parse(&with, &b.chain).is_ok());
}

#[test]
fn size_max_limits_data_bytes_per_descriptor_when_negotiated() {
    let mut rig = Rig::plain();
    let p = Parser::new(
        BlkFeatures::SIZE_MAX,
        DiskFacts {
            size_max: 1024,
            ..DiskFacts::new(8)
        },
    );
    let b = rig.chain(&[&header(VIRTIO_BLK_T_IN, 0)], &[1536, 1]);
    let r = rig.parse(&p, &b.chain);
    ioerr(
        &rig,
        &b,
        r,
        RejectReason::DataSegmentTooLarge { len: 1536, max: 1024 },
    );
    // The header sharing a descriptor with 1024 data bytes is within the limit.
    let bytes = concat(&[&header(VIRTIO_BLK_T_OUT, 0), &[0; 1024]]);
    let b = rig.chain(&[&bytes], &[1]);
    assert!(rig.parse(&p, &b.chain).is_ok());
}

#[test]
fn span_copies_refuse_wrong_lengths_and_readable_writes() {
    let mut rig = Rig::plain();
    let b = rig.chain(&[&header(VIRTIO_BLK_T_OUT, 0), &[0; 512]], &[1]);
    let req = rig.parse(&parser(8), &b.chain).unwrap();
    let mut short = [0u8; 100];
    assert!(req.data().read(&b.chain, rig.mem(), &mut short).is_err());
    assert!(req.data().write(&b.chain, rig.mem(), &[0; 512]).is_err());
    assert!(rig.writes().is_empty(), "nothing written into readable data");
}

#[test]
fn indirect_chains_parse_like_direct_ones() {
    let mut rig = Rig::new(Features::VERSION_1 | Features::INDIRECT_DESC);
    let h = header(VIRTIO_BLK_T_IN, 1);
    let b = rig.chain(&[&h[..7], &h[7..]], &[256, 256, 1]);
    let req = rig.parse(&parser(8), &b.chain).unwrap();
    assert_eq!(
        req.kind(),
        &RequestKind::Read {
            sector: 1,
            offset: 512,
            len: 512
        }
    );
}

#[test]
fn raw_driver_chain_with_zero_length_descriptors_parses() {
    // A layout a careful driver would not build: zero-length descriptors inside the
    // header and before the status, written straight into the descriptor table.
    use virtio_core::ring::layout::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
    let arena = Arena::new(0x4000_0000, 1 << 20).unwrap();
    let (_, ring) = arena.alloc_split_ring(8).unwrap();
    let mut raw = RawDriver::new(arena.clone(), 8, ring.clone()).unwrap();
    let mut dev = SplitDevice::new(8, &ring, Recorder::new(arena.clone()), Features::VERSION_1).unwrap();
    let h = header(VIRTIO_BLK_T_FLUSH, 0);
    let at = arena.alloc(64, 8).unwrap();
    arena.write(at, &h).unwrap();
    let st = arena.alloc(1, 1).unwrap();
    raw.write_desc(0, at, 9, VIRTQ_DESC_F_NEXT, 1);
    raw.write_desc(1, at + 9, 0, VIRTQ_DESC_F_NEXT, 2);
    raw.write_desc(2, at + 9, 7, VIRTQ_DESC_F_NEXT, 3);
    raw.write_desc(3, st, 0, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 4);
    raw.write_desc(4, st, 1, VIRTQ_DESC_F_WRITE, 0);
    raw.push_avail(0);
    let chain = dev.pop().unwrap().unwrap();
    let req = parser(8).parse(&chain, dev.memory()).unwrap();
    assert_eq!(req.kind(), &RequestKind::Flush);
    dev.memory().take();
    let used = req.write_status(dev.memory(), Status::Ok).unwrap();
    dev.add_used(chain.head(), used).unwrap();
    assert_eq!(raw.read_used(), vec![(0, 1)]);
    let mut b = [0xffu8];
    arena.read(st, &mut b).unwrap();
    assert_eq!(b, [0]);
}

// ---- Arbitrary chains -------------------------------------------------------------

/// The buffers of one generated chain: readable contents, writable lengths.
#[derive(Debug, Clone)]
struct Case {
    out: Vec<Vec<u8>>,
    ins: Vec<u32>,
}

fn any_type() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => prop_oneof![
            Just(VIRTIO_BLK_T_IN),
            Just(VIRTIO_BLK_T_OUT),
            Just(VIRTIO_BLK_T_FLUSH),
            Just(VIRTIO_BLK_T_GET_ID),
            Just(VIRTIO_BLK_T_GET_LIFETIME),
            Just(VIRTIO_BLK_T_DISCARD),
            Just(VIRTIO_BLK_T_WRITE_ZEROES),
            Just(VIRTIO_BLK_T_SECURE_ERASE),
        ],
        1 => any::<u32>(),
    ]
}

fn any_sector() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..80,
        1 => (1u64 << 55) - 4..(1u64 << 55) + 4,
        1 => any::<u64>(),
    ]
}

/// Range segments, mostly plausible.
fn any_ranges() -> impl Strategy<Value = Vec<u8>> {
    let seg = (
        any_sector(),
        prop_oneof![4 => 0u32..16, 1 => any::<u32>()],
        prop_oneof![6 => Just(0), 2 => Just(BlkDiscardWriteZeroes::UNMAP), 1 => any::<u32>()],
    );
    proptest::collection::vec(seg, 0..4)
        .prop_map(|segs| segs.into_iter().flat_map(|(s, n, f)| range(s, n, f)).collect())
}

/// Cuts `bytes` into buffers at `cuts` (indices into `0..=len`, zero-length pieces
/// allowed).
fn cut(bytes: &[u8], cuts: &[proptest::sample::Index]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    at.sort_unstable();
    let mut out = Vec::new();
    let mut prev = 0;
    for c in at.into_iter().chain([bytes.len()]) {
        out.push(bytes[prev..c].to_vec());
        prev = c;
    }
    out
}

/// A request laid out the way the spec frames it, cut at random places: header and
/// readable data (OUT data or a range list) in readable buffers, writable data and the
/// status in writable ones.
fn framed() -> impl Strategy<Value = Case> {
    let cuts = || proptest::collection::vec(any::<proptest::sample::Index>(), 0..3);
    let sector = prop_oneof![1 => Just(0u64), 2 => any_sector()];
    (any_type(), sector, 0u32..3, any_ranges(), cuts(), cuts()).prop_map(
        |(ty, sector, sectors, ranges, rcuts, wcuts)| {
            let mut readable = header(ty, sector);
            let writable = match ty {
                VIRTIO_BLK_T_IN => sectors * 512 + 1,
                VIRTIO_BLK_T_GET_ID => 21,
                VIRTIO_BLK_T_GET_LIFETIME => 7,
                _ => 1,
            };
            match ty {
                VIRTIO_BLK_T_OUT => readable.extend(vec![0x42; sectors as usize * 512]),
                VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES | VIRTIO_BLK_T_SECURE_ERASE => {
                    readable.extend(ranges)
                }
                _ => {}
            }
            let ins = cut(&vec![0; writable as usize], &wcuts)
                .iter()
                .map(|b| u32::try_from(b.len()).unwrap())
                .collect();
            Case {
                out: cut(&readable, &rcuts),
                ins,
            }
        },
    )
}

/// Request bytes poured into buffers of random lengths and directions.
fn scrambled() -> impl Strategy<Value = Case> {
    let lens = |max| {
        proptest::collection::vec(
            prop_oneof![Just(0u32), 1u32..17, Just(20), Just(512), Just(513), 0u32..1100],
            0..max,
        )
    };
    (
        any_type(),
        any::<u32>(),
        any_sector(),
        any_ranges(),
        proptest::collection::vec(any::<u8>(), 0..64),
        lens(5),
        lens(4),
    )
        .prop_map(|(ty, reserved, sector, ranges, filler, out_lens, ins)| {
            let mut h = BlkReqHeader::new(ty, sector);
            h.reserved = reserved.into();
            let bytes = concat(&[h.as_bytes(), &ranges, &filler]);
            let mut pos = 0usize;
            let mut out = Vec::new();
            for &n in &out_lens {
                let mut b = vec![0u8; n as usize];
                let end = (pos + b.len()).min(bytes.len());
                if pos < end {
                    b[..end - pos].copy_from_slice(&bytes[pos..end]);
                }
                pos += n as usize;
                out.push(b);
            }
            Case { out, ins }
        })
}

fn facts() -> impl Strategy<Value = DiskFacts> {
    (
        prop_oneof![4 => 16u64..100, 1 => 0u64..16, 1 => Just(u64::MAX), 1 => any::<u64>()],
        proptest::bool::weighted(0.2),
        1u32..4,
        prop_oneof![1u32..100, Just(u32::MAX)],
        1u32..4,
        prop_oneof![1u32..2000, Just(u32::MAX)],
    )
        .prop_map(|(cap, ro, seg_max, max_sectors, max_seg, size_max)| DiskFacts {
            capacity_sectors: cap,
            read_only: ro,
            seg_max,
            size_max,
            max_discard_sectors: max_sectors,
            max_discard_seg: max_seg,
            max_write_zeroes_sectors: max_sectors,
            max_write_zeroes_seg: max_seg,
            max_secure_erase_sectors: max_sectors,
            max_secure_erase_seg: max_seg,
            ..DiskFacts::new(cap)
        })
}

fn any_features() -> impl Strategy<Value = BlkFeatures> {
    prop_oneof![
        2 => Just(all_features() | BlkFeatures::LIFETIME),
        1 => any::<u64>().prop_map(BlkFeatures::from_bits_retain),
    ]
}

fn within_capacity(disk: &DiskFacts, offset: u64, len: u64) -> bool {
    let cap = u128::from(disk.capacity_sectors) * 512;
    u128::from(offset) + u128::from(len) <= cap
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_chains_never_panic_and_parse_or_reject_with_a_status(
        case in prop_oneof![2 => framed(), 1 => scrambled()],
        features in any_features(),
        disk in facts(),
        indirect in any::<bool>(),
    ) {
        prop_assume!(!case.out.is_empty() || !case.ins.is_empty());
        let ring = if indirect { Features::VERSION_1 | Features::INDIRECT_DESC } else { Features::VERSION_1 };
        let mut rig = Rig::new(ring);
        let out_refs: Vec<&[u8]> = case.out.iter().map(Vec::as_slice).collect();
        let b = rig.chain(&out_refs, &case.ins);
        let parser = Parser::new(features, disk);
        let r = rig.parse(&parser, &b.chain);
        let writable = b.chain.writable_len();
        let used = match &r {
            Err(Reject::NoStatus) => {
                prop_assert_eq!(writable, 0);
                prop_assert_eq!(r.as_ref().unwrap_err().write_status(rig.mem()).unwrap(), 0);
                prop_assert!(rig.writes().is_empty());
                0
            }
            Err(reject) => {
                prop_assert!(writable > 0);
                let code = reject.code().unwrap();
                prop_assert!(code == Status::IoErr || code == Status::Unsupp);
                let used = reject.write_status(rig.mem()).unwrap();
                prop_assert_eq!(rig.writes(), vec![(status_addr(&b), 1)]);
                prop_assert!(used <= 1);
                used
            }
            Ok(req) => {
                prop_assert!(writable > 0);
                let data = req.data();
                let part_len = match data.part {
                    Part::Readable => b.chain.readable_len(),
                    Part::Writable => writable - 1,
                };
                prop_assert!(data.range().end <= u64::from(part_len));
                let piece_sum: u64 = data.pieces(&b.chain).map(|p| u64::from(p.len)).sum();
                prop_assert_eq!(piece_sum, u64::from(data.len));
                match req.kind() {
                    RequestKind::Read { sector, offset, len } | RequestKind::Write { sector, offset, len } => {
                        prop_assert_eq!(u128::from(*offset), u128::from(*sector) * 512);
                        prop_assert!(within_capacity(&disk, *offset, u64::from(*len)));
                        prop_assert_eq!(*len, data.len);
                        prop_assert_eq!(len % 512, 0);
                    }
                    RequestKind::Discard(rs) | RequestKind::WriteZeroes(rs) | RequestKind::SecureErase(rs) => {
                        prop_assert!(!rs.is_empty());
                        for r in rs {
                            prop_assert_eq!(u128::from(r.offset), u128::from(r.sector) * 512);
                            prop_assert_eq!(r.len, u64::from(r.num_sectors) * 512);
                            prop_assert!(within_capacity(&disk, r.offset, r.len));
                        }
                    }
                    RequestKind::Flush => prop_assert!(data.is_empty()),
                    RequestKind::GetId => prop_assert_eq!(data.len, 20),
                    RequestKind::GetLifetime => prop_assert_eq!(data.len, 6),
                }
                if matches!(req.kind(), RequestKind::Write { .. } | RequestKind::Discard(_)
                    | RequestKind::WriteZeroes(_) | RequestKind::SecureErase(_)) {
                    prop_assert!(!disk.read_only);
                    prop_assert_eq!(writable, 1);
                }
                let used = req.write_status(rig.mem(), Status::Ok).unwrap();
                prop_assert!(used <= writable);
                prop_assert_eq!(rig.writes(), vec![(status_addr(&b), 1)]);
                used
            }
        };
        // The ring takes the used length and the queue goes on.
        rig.device.add_used(b.chain.head(), used).unwrap();
        prop_assert_eq!(rig.driver.pop_used().unwrap().unwrap().len, used);
    }
}
