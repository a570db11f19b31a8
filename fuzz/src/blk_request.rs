//! `blk_request`: the virtio-blk request parser (`backend_host::blk::request`) over
//! real chains a hostile driver builds (HOSTILE 12-18).
//!
//! Input layout (missing bytes read as zero):
//!
//! 1. `features`: bit 0 FLUSH, 1 DISCARD, 2 WRITE_ZEROES, 3 SECURE_ERASE, 4 LIFETIME,
//!    5 SEG_MAX, 6 SIZE_MAX, 7 put the chain in an indirect table;
//! 2. `disk`: bit 0 read-only, bits 1-3 pick the capacity from [`CAPACITIES`];
//! 3. `seg_max: u8`, `size_max: u16`, `max_*_seg: u8` (all three range types),
//!    `max_*_sectors: u32` (all three);
//! 4. `n`: `n % 16 + 1` descriptors follow, each `flags: u8` (bit 0 device-writable,
//!    bits 1-6 the buffer's misalignment), `len: u16` (taken modulo 4097) and, for a
//!    readable one, `len` content bytes (a writable one is filled with 0xee);
//! 5. `probe_from: u32`, `probe_len: u32`, `span: [u8; 9]`: a `sub` of the data span
//!    and a hostile span (part, offset, length) to read and write.
//!
//! Invariants: parsing never panics and writes nothing; every access names a segment
//! of the chain and stays inside it; no status byte iff no writable byte; the status
//! target is the last writable byte; the first failing check (unknown type, feature,
//! read-only) gives the reason and status the spec prescribes; a request's data span
//! lies inside its part and matches its kind (lengths, sector ranges inside the
//! capacity, no unmap outside WRITE_ZEROES, segment limits); span reads return the
//! guest's bytes and span writes touch only writable data bytes; a status write
//! changes exactly the status byte to the code and reports the used length §2.7.8.2
//! allows.

use std::sync::Arc;

use backend_host::blk::request::{
    DiskFacts, Parser, Part, Reject, RejectReason, Request, RequestKind, SegmentSpan,
};
use virtio_core::blk::{BlkFeatures, RequestType, SECTOR_SIZE, Status};
use virtio_core::features::Features;
use virtio_core::ring::Chain;
use virtio_core::ring::layout::{Descriptor, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use virtio_core::test_utils::Arena;
use virtio_core::test_utils::raw::{Access, AccessKind, RawDriver, Recorder};
use virtio_core::{DeviceRing, Segment};

use super::common::{Bytes, Seed};

/// Capacities in sectors, picked by bits 1-3 of the disk byte: empty, tiny, small,
/// the largest whose byte size fits, and sizes whose byte count overflows.
pub const CAPACITIES: [u64; 8] = [0, 1, 8, 2048, 1 << 32, (u64::MAX >> 9), 1 << 55, u64::MAX];

const QUEUE: u16 = 16;
const ARENA_BASE: u64 = 0x4000_0000;
const ARENA_SIZE: usize = 1 << 20;
/// Longest buffer an input describes.
const MAX_LEN: u16 = 4096;

/// Runs one input; panics only when an invariant is broken.
pub fn run(data: &[u8]) {
    report(data);
}

/// [`run`], returning what the parser decided (`Ok(kind)` or the rejection), for the
/// seed tests.
pub fn report(data: &[u8]) -> String {
    let mut input = Bytes(data);
    let fbits = input.u8();
    let mut features = BlkFeatures::empty();
    for (bit, f) in [
        BlkFeatures::FLUSH,
        BlkFeatures::DISCARD,
        BlkFeatures::WRITE_ZEROES,
        BlkFeatures::SECURE_ERASE,
        BlkFeatures::LIFETIME,
        BlkFeatures::SEG_MAX,
        BlkFeatures::SIZE_MAX,
    ]
    .into_iter()
    .enumerate()
    {
        if fbits & (1 << bit) != 0 {
            features |= f;
        }
    }
    let indirect = fbits & 0x80 != 0;
    let dbits = input.u8();
    let mut disk = DiskFacts::new(CAPACITIES[usize::from((dbits >> 1) & 7)]);
    disk.read_only = dbits & 1 != 0;
    disk.seg_max = u32::from(input.u8());
    disk.size_max = u32::from(input.u16());
    let max_seg = u32::from(input.u8());
    let max_sectors = input.u32();
    disk.max_discard_seg = max_seg;
    disk.max_write_zeroes_seg = max_seg;
    disk.max_secure_erase_seg = max_seg;
    disk.max_discard_sectors = max_sectors;
    disk.max_write_zeroes_sectors = max_sectors;
    disk.max_secure_erase_sectors = max_sectors;

    let arena = Arena::new(ARENA_BASE, ARENA_SIZE).expect("arena");
    let (_, ring) = arena.alloc_split_ring(QUEUE).expect("ring");
    let mut ring_features = Features::VERSION_1;
    if indirect {
        ring_features |= Features::INDIRECT_DESC;
    }
    let device = DeviceRing::new(QUEUE, &ring, Recorder::new(arena.clone()), ring_features).expect("device");
    let mut raw = RawDriver::new(arena.clone(), QUEUE, ring).expect("raw driver");

    let n = usize::from(input.u8() % 16) + 1;
    let mut descs = Vec::with_capacity(n);
    for i in 0..n {
        let flags = input.u8();
        let len = input.u16() % (MAX_LEN + 1);
        let skew = u64::from((flags >> 1) & 0x3f);
        let at = arena.alloc(u64::from(len) + skew + 1, 64).expect("buffer") + skew;
        let writable = flags & 1 != 0;
        if writable {
            Arena::write(&arena, at, &vec![0xee; usize::from(len)]).expect("fill");
        } else {
            let content = input.slice(usize::from(len));
            Arena::write(&arena, at, content).expect("content");
        }
        let mut f = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
        if i + 1 < n {
            f |= VIRTQ_DESC_F_NEXT;
        }
        // `i + 1 < n <= 16`: fits.
        let next = u16::try_from(i + 1).unwrap_or(0) % QUEUE;
        descs.push(Descriptor::new(at, u32::from(len), f, next));
    }
    if indirect {
        let table = arena.alloc(16 * n as u64, 16).expect("table");
        raw.write_indirect_table(table, &descs).expect("table write");
        raw.write_desc(0, table, 16 * n as u32, VIRTQ_DESC_F_INDIRECT, 0);
    } else {
        for (i, d) in descs.iter().enumerate() {
            raw.write_descriptor(i as u16, d);
        }
    }
    raw.push_avail(0);
    let mut device = device;
    let chain = match device.pop() {
        Ok(Some(chain)) => chain,
        // The ring refused the chain (readable after writable, too long): that is
        // the chain walk's business, fuzzed by `chain_walk`.
        Ok(None) | Err(_) => return "no chain".into(),
    };
    device.memory().take();

    let h = Check {
        arena: &arena,
        mem: device.memory(),
        chain: &chain,
    };
    let parser = Parser::new(features, disk);
    let result = parser.parse(&chain, h.mem);
    let log = h.mem.take();
    for a in &log {
        assert_ne!(a.kind, AccessKind::Write, "parse wrote guest memory: {a:?}");
        h.assert_in_chain(a);
    }
    h.check_first_reasons(&parser, &result);

    let probe_from = input.u32();
    let probe_len = input.u32();
    let span = hostile_span(&mut input);
    let out = match &result {
        Ok(req) => {
            h.check_request(&parser, req);
            h.check_span_io(req.data(), true);
            if let Some(sub) = req.data().sub(probe_from, probe_len) {
                assert_eq!(sub.part, req.data().part);
                let end = u64::from(probe_from) + u64::from(probe_len);
                assert!(
                    end <= u64::from(req.data().len),
                    "sub {sub:?} outside {:?}",
                    req.data()
                );
                assert_eq!(
                    u64::from(sub.offset),
                    u64::from(req.data().offset) + u64::from(probe_from)
                );
            }
            let used = req.write_status(h.mem, Status::Ok).expect("status write");
            h.check_status_write(
                req.status_target().segment(),
                req.status_target().offset(),
                Status::Ok,
            );
            let want = if req.data().part == Part::Writable {
                chain.writable_len()
            } else {
                u32::from(chain.writable_len() == 1)
            };
            assert_eq!(used, want, "used length of {:?}", req.kind());
            format!("Ok({:?})", req.kind())
        }
        Err(reject) => {
            let used = reject.write_status(h.mem).expect("status write");
            match reject {
                Reject::NoStatus => {
                    assert_eq!(used, 0);
                    assert!(h.mem.take().is_empty(), "NoStatus wrote");
                }
                Reject::Status { status, reason } => {
                    h.check_status_write(status.segment(), status.offset(), spec_status(reason));
                    assert_eq!(used, u32::from(chain.writable_len() == 1));
                }
            }
            format!("Err({reject:?})")
        }
    };
    h.check_span_io(span, false);
    out
}

/// A span built from 9 fuzz bytes: part, offset and a length kept below 64 KiB.
fn hostile_span(input: &mut Bytes<'_>) -> SegmentSpan {
    let part = if input.u8() & 1 == 0 {
        Part::Readable
    } else {
        Part::Writable
    };
    let offset = input.u32();
    let len = input.u32() % 0x1_0000;
    SegmentSpan { part, offset, len }
}

/// The status virtio 1.2 §5.2.6 prescribes for a rejection, stated independently of
/// the parser: UNSUPP for "a request unsupported by device" (unknown type, a type
/// without its feature, §5.2.6.2's flag rules), IOERR for "device or driver error".
fn spec_status(reason: &RejectReason) -> Status {
    match reason {
        RejectReason::UnknownType(_)
        | RejectReason::NotNegotiated(_)
        | RejectReason::UnmapNotAllowed(_)
        | RejectReason::UnknownFlags(_) => Status::Unsupp,
        _ => Status::IoErr,
    }
}

struct Check<'a> {
    arena: &'a Arc<Arena>,
    mem: &'a Recorder<Arc<Arena>>,
    chain: &'a Chain,
}

impl Check<'_> {
    fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.chain.readable().iter().chain(self.chain.writable())
    }

    /// The access names one of the chain's segments and stays inside it.
    fn assert_in_chain(&self, a: &Access) {
        assert!(
            self.segments().any(|s| *s == a.seg),
            "access to a segment not in the chain: {a:?}"
        );
        if a.ok {
            assert!(
                a.within(a.seg.addr(), u64::from(a.seg.len())),
                "access outside its segment: {a:?}"
            );
        }
    }

    /// The guest's bytes of one part, in order.
    fn part_bytes(&self, part: Part) -> Vec<u8> {
        let segs = match part {
            Part::Readable => self.chain.readable(),
            Part::Writable => self.chain.writable(),
        };
        let mut v = Vec::new();
        for s in segs {
            let mut b = vec![0u8; s.len() as usize];
            Arena::read(self.arena, s.addr(), &mut b).expect("segment in arena");
            v.extend(b);
        }
        v
    }

    fn part_len(&self, part: Part) -> u32 {
        match part {
            Part::Readable => self.chain.readable_len(),
            Part::Writable => self.chain.writable_len(),
        }
    }

    /// Checks the reasons the parser must give first, computed from the header
    /// bytes: NoStatus, a short header, an unknown type, a missing feature, a write
    /// to a read-only disk, in that order. Also that the status target is the last
    /// writable byte.
    fn check_first_reasons(&self, parser: &Parser, result: &Result<Request, Reject>) {
        let target = match result {
            Ok(req) => Some(req.status_target()),
            Err(Reject::Status { status, .. }) => Some(*status),
            Err(Reject::NoStatus) => None,
        };
        let Some(last) = self.chain.writable().last() else {
            assert!(
                matches!(result, Err(Reject::NoStatus)),
                "no writable byte but {result:?}"
            );
            return;
        };
        let target = target.expect("a writable byte but NoStatus");
        assert_eq!(target.segment(), *last, "status not in the last writable segment");
        assert_eq!(
            target.offset(),
            last.len() - 1,
            "status not the last writable byte"
        );
        assert_eq!(target.writable_len(), self.chain.writable_len());

        let reason = result.as_ref().err().and_then(Reject::reason);
        let readable = self.chain.readable_len();
        if readable < 16 {
            assert_eq!(reason, Some(RejectReason::HeaderNotReadable { readable }));
            return;
        }
        let header = self.part_bytes(Part::Readable);
        let raw_type = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let Some(ty) = RequestType::from_raw(raw_type) else {
            assert_eq!(reason, Some(RejectReason::UnknownType(raw_type)));
            return;
        };
        if ty
            .required_feature()
            .is_some_and(|f| !parser.features().contains(f))
        {
            assert_eq!(reason, Some(RejectReason::NotNegotiated(ty)));
            return;
        }
        let writes = matches!(
            ty,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes | RequestType::SecureErase
        );
        if writes && parser.disk().read_only {
            assert_eq!(reason, Some(RejectReason::ReadOnly));
        }
    }

    /// A request's kind and data span agree with the chain, the header and the disk.
    fn check_request(&self, parser: &Parser, req: &Request) {
        let data = req.data();
        let cap = parser.disk().capacity_sectors.saturating_mul(SECTOR_SIZE);
        assert!(
            data.range().end <= u64::from(self.part_len(data.part)),
            "data span {data:?} outside the chain"
        );
        let header = self.part_bytes(Part::Readable);
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let readable = self.chain.readable_len();
        let writable = self.chain.writable_len();
        let io = |offset: u64, len: u32| {
            assert_eq!(Some(offset), sector.checked_mul(SECTOR_SIZE));
            assert_eq!(u64::from(len) % SECTOR_SIZE, 0);
            assert!(offset + u64::from(len) <= cap, "I/O past the capacity");
            assert_eq!(data.len, len);
        };
        match req.kind() {
            RequestKind::Read {
                sector: s,
                offset,
                len,
            } => {
                assert_eq!(*s, sector);
                io(*offset, *len);
                assert_eq!(readable, 16, "readable data in a read");
                assert_eq!(
                    (data.part, data.offset, data.len),
                    (Part::Writable, 0, writable - 1)
                );
            }
            RequestKind::Write {
                sector: s,
                offset,
                len,
            } => {
                assert_eq!(*s, sector);
                io(*offset, *len);
                assert_eq!(writable, 1, "writable data in a write");
                assert_eq!(
                    (data.part, data.offset, data.len),
                    (Part::Readable, 16, readable - 16)
                );
            }
            RequestKind::Flush => {
                assert_eq!(sector, 0);
                assert_eq!((readable, writable), (16, 1));
                assert!(data.is_empty());
            }
            RequestKind::GetId => {
                assert_eq!((readable, writable), (16, 21));
                assert_eq!((data.part, data.offset, data.len), (Part::Writable, 0, 20));
            }
            RequestKind::GetLifetime => {
                assert_eq!((readable, writable), (16, 7));
                assert_eq!((data.part, data.offset, data.len), (Part::Writable, 0, 6));
            }
            RequestKind::Discard(r) | RequestKind::WriteZeroes(r) | RequestKind::SecureErase(r) => {
                let zeroes = matches!(req.kind(), RequestKind::WriteZeroes(_));
                assert_eq!(writable, 1, "writable data in a range request");
                assert_eq!((data.part, data.offset), (Part::Readable, 16));
                assert!(!r.is_empty() && r.len() as u64 * 16 == u64::from(data.len));
                let max_seg = parser.disk().max_discard_seg;
                assert!(r.len() as u64 <= u64::from(max_seg), "too many ranges");
                let bytes = self.part_bytes(Part::Readable);
                for (i, x) in r.iter().enumerate() {
                    let raw = &bytes[16 + 16 * i..32 + 16 * i];
                    let s = u64::from_le_bytes(raw[..8].try_into().expect("8"));
                    let num = u32::from_le_bytes(raw[8..12].try_into().expect("4"));
                    let flags = u32::from_le_bytes(raw[12..16].try_into().expect("4"));
                    assert_eq!((x.sector, x.num_sectors), (s, num), "range {i} not the guest's");
                    assert!(flags & !1 == 0, "unknown flags accepted");
                    assert_eq!(x.unmap, flags & 1 != 0);
                    assert!(!x.unmap || zeroes, "unmap outside WRITE_ZEROES");
                    assert!(x.num_sectors <= parser.disk().max_discard_sectors);
                    assert_eq!(Some(x.offset), s.checked_mul(SECTOR_SIZE));
                    assert_eq!(x.len, u64::from(num) * SECTOR_SIZE);
                    assert!(x.offset + x.len <= cap, "range past the capacity");
                }
            }
        }
        let f = parser.features();
        if !data.is_empty() && (f.contains(BlkFeatures::SEG_MAX) || f.contains(BlkFeatures::SIZE_MAX)) {
            let pieces: Vec<_> = data.pieces(self.chain).collect();
            if f.contains(BlkFeatures::SEG_MAX) {
                assert!(pieces.len() as u64 <= u64::from(parser.disk().seg_max), "seg_max");
            }
            if f.contains(BlkFeatures::SIZE_MAX) {
                assert!(pieces.iter().all(|p| p.len <= parser.disk().size_max), "size_max");
            }
        }
    }

    /// Reads and writes `span` through the parser's span API. A span inside its part
    /// (always so for a request's, `inside`) must read the guest's bytes; a write
    /// may only touch the writable bytes the span names, never the readable part.
    fn check_span_io(&self, span: SegmentSpan, inside: bool) {
        // An empty span names no byte: reading or writing it is fine wherever it
        // points.
        let fits = span.is_empty() || span.range().end <= u64::from(self.part_len(span.part));
        assert!(fits || !inside, "request span {span:?} outside its part");
        let mut buf = vec![0u8; span.len as usize];
        let r = span.read(self.chain, self.mem, &mut buf);
        let log = self.mem.take();
        log.iter().for_each(|a| self.assert_in_chain(a));
        if fits && !span.is_empty() {
            r.expect("reading a span inside the chain");
            let part = self.part_bytes(span.part);
            let range = span.range();
            assert_eq!(
                &buf[..],
                &part[range.start as usize..range.end as usize],
                "span read"
            );
        } else if fits {
            r.expect("reading an empty span");
        } else {
            assert!(r.is_err(), "read of span {span:?} outside the chain succeeded");
        }

        let pattern: Vec<u8> = (0..span.len).map(|i| (i as u8) ^ 0x5a).collect();
        let before = self.part_bytes(Part::Readable);
        let r = span.write(self.chain, self.mem, &pattern);
        let log = self.mem.take();
        assert_eq!(
            self.part_bytes(Part::Readable),
            before,
            "span write changed readable memory"
        );
        for a in &log {
            self.assert_in_chain(a);
            if a.kind == AccessKind::Write && a.ok {
                assert!(a.seg.writable(), "write to a readable segment: {a:?}");
            }
        }
        match span.part {
            Part::Readable if !span.is_empty() => assert!(r.is_err(), "write to a readable span"),
            _ if span.is_empty() => r.expect("writing an empty span"),
            _ if fits => {
                r.expect("writing a writable span inside the chain");
                let part = self.part_bytes(Part::Writable);
                let range = span.range();
                assert_eq!(&part[range.start as usize..range.end as usize], &pattern[..]);
            }
            _ => assert!(r.is_err(), "write of span {span:?} outside the chain succeeded"),
        }
    }

    /// The last status write changed exactly the status byte, to `want`.
    fn check_status_write(&self, seg: Segment, offset: u32, want: Status) {
        let log = self.mem.take();
        let writes: Vec<_> = log.iter().filter(|a| a.kind == AccessKind::Write).collect();
        assert_eq!(writes.len(), 1, "status write made {log:?}");
        let w = writes[0];
        assert!(
            w.ok && w.len == 1 && w.addr == seg.addr() + u64::from(offset),
            "{w:?}"
        );
        let last = self.chain.writable().last().expect("a status segment");
        assert_eq!(
            w.addr,
            last.addr() + u64::from(last.len()) - 1,
            "not the last writable byte"
        );
        let mut b = [0u8];
        Arena::read(self.arena, w.addr, &mut b).expect("status byte");
        assert_eq!(b[0], want.raw(), "status byte");
    }
}

/// One descriptor of a seed: `(writable, len, content)`.
type D<'a> = (bool, u16, &'a [u8]);

/// Encodes a seed: features byte, disk byte, then descriptors.
pub fn encode(features: u8, disk: u8, max_seg: u8, descs: &[D<'_>]) -> Vec<u8> {
    let mut s = Seed::new()
        .u8(features)
        .u8(disk)
        .u8(4)
        .u16(4096)
        .u8(max_seg)
        .u32(u32::MAX)
        .u8(u8::try_from(descs.len() - 1).expect("at most 16"));
    for (w, len, content) in descs {
        s = s.u8(u8::from(*w)).u16(*len);
        if !w {
            let mut c = content.to_vec();
            c.resize(usize::from(*len), 0);
            s = s.bytes(&c);
        }
    }
    s.u32(0).u32(16).bytes(&[1, 0, 0, 0, 0, 8, 0, 0, 0]).0
}

fn header(ty: u32, sector: u64) -> Vec<u8> {
    let mut h = ty.to_le_bytes().to_vec();
    h.extend([0; 4]);
    h.extend(sector.to_le_bytes());
    h
}

/// The seed corpus: `(name, input, text the report must contain)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let all = 0x1f;
    // Capacity index 3 (2048 sectors) in bits 1-3.
    let disk = 3 << 1;
    let mut range = 2u64.to_le_bytes().to_vec();
    range.extend(4u32.to_le_bytes());
    range.extend(1u32.to_le_bytes());
    let read = header(0, 2);
    let write = header(1, 2);
    let mut split_write = write.clone();
    split_write.extend([0xab; 512]);
    vec![
        (
            "read",
            encode(
                all,
                disk,
                1,
                &[(false, 16, &read), (true, 512, &[]), (true, 1, &[])],
            ),
            "Ok(Read",
        ),
        (
            "read-one-buffer-status-tail",
            encode(all, disk, 1, &[(false, 16, &read), (true, 513, &[])]),
            "Ok(Read",
        ),
        (
            "write-split-header",
            encode(
                all,
                disk,
                1,
                &[
                    (false, 7, &split_write[..7]),
                    (false, 521, &split_write[7..]),
                    (true, 1, &[]),
                ],
            ),
            "Ok(Write",
        ),
        (
            "flush",
            encode(all, disk, 1, &[(false, 16, &header(4, 0)), (true, 1, &[])]),
            "Ok(Flush",
        ),
        (
            "get-id",
            encode(
                all,
                disk,
                1,
                &[(false, 16, &header(8, 0)), (true, 20, &[]), (true, 1, &[])],
            ),
            "Ok(GetId",
        ),
        (
            "write-zeroes-unmap",
            encode(
                all,
                disk,
                1,
                &[
                    (false, 32, &[header(13, 0), range.clone()].concat()),
                    (true, 1, &[]),
                ],
            ),
            "Ok(WriteZeroes",
        ),
        (
            "13-no-status",
            encode(all, disk, 1, &[(false, 16, &read)]),
            "Err(NoStatus",
        ),
        (
            "14-header-writable",
            encode(all, disk, 1, &[(true, 16, &[]), (true, 1, &[])]),
            "HeaderNotReadable",
        ),
        (
            "14-readable-data-in-read",
            encode(all, disk, 1, &[(false, 528, &read), (true, 1, &[])]),
            "ReadableData",
        ),
        (
            "15-sector-overflow",
            encode(
                all,
                7 << 1,
                1,
                &[(false, 16, &header(0, 1 << 55)), (true, 513, &[])],
            ),
            "OutOfRange",
        ),
        (
            "16-not-sector-multiple",
            encode(all, disk, 1, &[(false, 16, &read), (true, 101, &[])]),
            "NotSectorMultiple",
        ),
        (
            "16-flush-sector",
            encode(all, disk, 1, &[(false, 16, &header(4, 3)), (true, 1, &[])]),
            "FlushSector",
        ),
        (
            "17-discard-unmap",
            encode(
                all,
                disk,
                1,
                &[
                    (false, 32, &[header(11, 0), range.clone()].concat()),
                    (true, 1, &[]),
                ],
            ),
            "UnmapNotAllowed",
        ),
        (
            "17-too-many-ranges",
            encode(
                all,
                disk,
                1,
                &[
                    (false, 48, &[header(11, 0), range.clone(), range].concat()),
                    (true, 1, &[]),
                ],
            ),
            "TooManyRanges",
        ),
        (
            "18-unknown-type",
            encode(all, disk, 1, &[(false, 16, &header(99, 0)), (true, 1, &[])]),
            "UnknownType(99)",
        ),
        (
            "18-not-negotiated",
            encode(0, disk, 1, &[(false, 16, &header(11, 0)), (true, 1, &[])]),
            "NotNegotiated",
        ),
        (
            "19-read-only",
            encode(all, disk | 1, 1, &[(false, 528, &write), (true, 1, &[])]),
            "ReadOnly",
        ),
        (
            "indirect-read",
            encode(all | 0x80, disk, 1, &[(false, 16, &read), (true, 513, &[])]),
            "Ok(Read",
        ),
    ]
}
