//! `grant_ops`: `transport_grant::GrantService`, Xen's grant-table operations, driven
//! by an operation sequence across two guests (each granting to the other, to the
//! host or to a domain that does not exist) and checked against a reference model of
//! every table and a shadow copy of both guests' memory (HOSTILE 37).
//!
//! Input layout (missing bytes read as zero): operations until the input ends (at
//! most 64), each `op: u8` (`(op & 15) % 12` picks the operation, the high bits pick
//! domains, see [`Op`]) and its operands:
//!
//! - grant a range: `gpa: u16` (byte offset into the granter's memory, which is
//!   16 pages; past it is refused), `len: u16`;
//! - grant a page: `page: u8` (bit 7: unaligned by 8 bytes);
//! - end access: `ref: u8` (see [`Model::pick`]);
//! - map: `ref: u8`, `pages: u8` (`% 4`: 0 is refused);
//! - unmap: `handle: u8`;
//! - read or write through a mapping: `handle: u8`, `offset: u16`, `len: u16`;
//! - grant copy from or to a grant: `ref: u8`, `offset: u16` (bit 15: a huge
//!   offset), `len: u16`;
//! - accept a transfer: `page: u8`;
//! - transfer: `page: u8`, `ref: u8`;
//! - the granter writes its own memory: `gpa: u16`, `len: u8`.
//!
//! Invariants: never a panic; every operation succeeds exactly when the model says
//! the grant allows it (the right state, the named domain, write only through
//! writable grants, only the granted bytes of each page, only consecutive pages of
//! one grant range, whole pages for a mapping); every byte read through a mapping
//! or a copy is the granter's (shadow), every write lands exactly where the grant
//! said; a live reference is never handed out again; after the run both guests'
//! memories equal the shadows byte for byte (nothing reached memory that was not
//! granted) and every table entry is in the model's state.

use std::collections::BTreeMap;
use std::sync::Arc;

use hypervisor::{Domain, DomainId, Hypervisor};
use transport_grant::{
    GrantCopy, GrantError, GrantMapping, GrantRange, GrantRef, GrantService, GrantState, PAGE_SIZE,
};

use super::common::{Bytes, Seed};

const MAX_OPS: usize = 64;
const PAGES: u64 = 16;
const MEM: u64 = PAGES * PAGE_SIZE;
/// A small table, so that exhaustion and the reuse of revoked entries are reached.
const TABLE_LIMIT: u32 = 24;
const BASE: u64 = Hypervisor::GUEST_BASE;
/// A domain id no domain has.
const GHOST: DomainId = DomainId(9);

/// The operations (`(op & 15) % 12`). Bit 4 of `op` picks the granter (guest A or B); bits
/// 5-6 the other party: the other guest, the host, the granter itself or [`GHOST`];
/// bit 7 asks for write access (copies and maps) or a read-only grant (grants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    GrantRange,
    Grant,
    End,
    Map,
    Unmap,
    MapRead,
    MapWrite,
    CopyFrom,
    CopyTo,
    Accept,
    Transfer,
    Scribble,
}

impl Op {
    fn of(b: u8) -> Op {
        match (b & 0x0f) % 12 {
            0 => Op::GrantRange,
            1 => Op::Grant,
            2 => Op::End,
            3 => Op::Map,
            4 => Op::Unmap,
            5 => Op::MapRead,
            6 => Op::MapWrite,
            7 => Op::CopyFrom,
            8 => Op::CopyTo,
            9 => Op::Accept,
            10 => Op::Transfer,
            _ => Op::Scribble,
        }
    }
}

/// One entry as the model knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    frame: u64,
    domain: DomainId,
    readonly: bool,
    win: (u64, u64),
    range_first: u32,
    state: GrantState,
}

impl Entry {
    fn live(&self) -> bool {
        !matches!(self.state, GrantState::Revoked | GrantState::Free)
    }

    fn usable(&self, caller: DomainId, write: bool) -> bool {
        matches!(self.state, GrantState::Granted | GrantState::Mapped(_))
            && self.domain == caller
            && !(write && self.readonly)
    }
}

/// One guest: its domain, a shadow of its memory and the model of its table.
struct Guest {
    domain: Arc<Domain>,
    shadow: Vec<u8>,
    refs: BTreeMap<u32, Entry>,
}

/// The model of both guests.
struct Model {
    guests: [Guest; 2],
}

impl Model {
    /// The reference operand `sel` names for granter `g`: below 0xe0 one the model
    /// knows (if any), else a raw small reference (0 included) or `u32::MAX`.
    fn pick(&self, g: usize, sel: u8) -> u32 {
        let refs = &self.guests[g].refs;
        if sel < 0xe0 && !refs.is_empty() {
            let i = usize::from(sel) % refs.len();
            *refs.keys().nth(i).expect("in range")
        } else if sel == 0xff {
            u32::MAX
        } else {
            u32::from(sel & 0x1f)
        }
    }

    /// The granter's guest address for an access by `caller` to `len` bytes at
    /// `offset` from `r`'s page, if the grant allows it (what `resolve` must do).
    fn resolve(&self, g: usize, caller: DomainId, r: u32, offset: u64, len: u64, write: bool) -> Option<u64> {
        let refs = &self.guests[g].refs;
        let head = refs.get(&r)?;
        if !head.usable(caller, write) {
            return None;
        }
        let end = offset.checked_add(len.max(1))?;
        let mut gpa = None;
        for p in offset / PAGE_SIZE..=(end - 1) / PAGE_SIZE {
            let idx = u32::try_from(u64::from(r).checked_add(p)?).ok()?;
            let e = refs.get(&idx)?;
            if e.range_first != head.range_first || !e.usable(caller, write) {
                return None;
            }
            let base = p * PAGE_SIZE;
            let (lo, hi) = (offset.max(base) - base, end.min(base + PAGE_SIZE) - base);
            if lo < e.win.0 || hi > e.win.1 {
                return None;
            }
            gpa.get_or_insert(e.frame + lo);
        }
        gpa
    }

    /// Whether `caller` may map `pages` entries from `r` (writable if `write`).
    fn mappable(&self, g: usize, caller: DomainId, r: u32, pages: u32, write: bool) -> bool {
        let refs = &self.guests[g].refs;
        let Some(head) = refs.get(&r) else { return false };
        pages > 0
            && (0..pages).all(|i| {
                r.checked_add(i).and_then(|k| refs.get(&k)).is_some_and(|e| {
                    e.usable(caller, write) && e.range_first == head.range_first && e.win == (0, PAGE_SIZE)
                })
            })
    }

    /// Whether some live grant of guest `g` names `page` (a transfer must refuse it).
    fn in_use(&self, g: usize, page: u64) -> bool {
        self.guests[g]
            .refs
            .values()
            .any(|e| e.frame == page && matches!(e.state, GrantState::Granted | GrantState::Mapped(_)))
    }

    /// Records a successful grant of `[gpa, gpa + range.len)` as `range`.
    fn granted(&mut self, g: usize, grantee: DomainId, gpa: u64, readonly: bool, range: GrantRange) {
        let (len, first, pages) = (u64::from(range.len), range.first.0, range.pages);
        let refs = &mut self.guests[g].refs;
        let offset = gpa % PAGE_SIZE;
        let end = offset + len;
        assert_eq!(u64::from(pages), end.div_ceil(PAGE_SIZE), "pages of a grant");
        assert!(first != 0, "reference 0 handed out");
        assert!(first + pages <= TABLE_LIMIT, "reference past the table limit");
        for i in 0..pages {
            let r = first + i;
            if let Some(old) = refs.get(&r) {
                assert!(!old.live(), "live {r} handed out again: {old:?}");
            }
            let base = u64::from(i) * PAGE_SIZE;
            refs.insert(
                r,
                Entry {
                    frame: gpa - offset + base,
                    domain: grantee,
                    readonly,
                    win: (offset.max(base) - base, end.min(base + PAGE_SIZE) - base),
                    range_first: first,
                    state: GrantState::Granted,
                },
            );
        }
    }
}

/// A live mapping and what the model expects of it.
struct Handle {
    g: usize,
    first: u32,
    pages: u32,
    frame: u64,
    writable: bool,
    mapping: GrantMapping,
}

fn off(gpa: u64) -> usize {
    (gpa - BASE) as usize
}

fn in_memory(gpa: u64, len: u64) -> bool {
    gpa >= BASE && gpa.checked_add(len).is_some_and(|e| e <= BASE + MEM)
}

/// Runs one input; panics only when an invariant is broken.
pub fn run(data: &[u8]) {
    report(data);
}

/// [`run`], returning the operations that succeeded and failed by kind, for the
/// seed tests (e.g. `ok [GrantRange, MapWrite] refused [CopyTo]`).
pub fn report(data: &[u8]) -> String {
    let hv = Hypervisor::new();
    let (Ok(a), Ok(b)) = (hv.create_domain("a", MEM), hv.create_domain("b", MEM)) else {
        return "no memory".into();
    };
    let service = GrantService::with_table_limit(hv.clone(), TABLE_LIMIT);
    let mut model = Model {
        guests: [a, b].map(|domain| {
            let shadow: Vec<u8> = (0..MEM as usize)
                .map(|k| (k as u8).wrapping_mul(13) ^ (k >> 12) as u8 ^ domain.id().0 as u8)
                .collect();
            domain.memory().write(BASE, &shadow).expect("fill");
            Guest {
                domain,
                shadow,
                refs: BTreeMap::new(),
            }
        }),
    };
    let ids = [model.guests[0].domain.id(), model.guests[1].domain.id()];
    let mut handles: Vec<Handle> = Vec::new();
    let (mut ok, mut refused) = (Vec::new(), Vec::new());
    let mut input = Bytes(data);
    let mut ops = 0;
    while !input.is_empty() && ops < MAX_OPS {
        ops += 1;
        let byte = input.u8();
        let op = Op::of(byte);
        let g = usize::from(byte >> 4 & 1);
        let me = ids[g];
        let other = match byte >> 5 & 3 {
            0 => ids[1 - g],
            1 => Hypervisor::HOST,
            2 => me,
            _ => GHOST,
        };
        let flag = byte & 0x80 != 0;
        let success = match op {
            Op::GrantRange | Op::Grant => {
                let (gpa, len, result) = if op == Op::GrantRange {
                    let gpa = BASE + u64::from(input.u16());
                    let len = input.u16();
                    (
                        gpa,
                        u64::from(len),
                        service.grant_range(me, other, gpa, u32::from(len), flag),
                    )
                } else {
                    let p = input.u8();
                    let gpa = BASE + u64::from(p & 0x1f) * PAGE_SIZE + if p & 0x80 != 0 { 8 } else { 0 };
                    let r = service.grant(me, other, gpa, flag);
                    (
                        gpa,
                        PAGE_SIZE,
                        r.map(|r| GrantRange {
                            first: r,
                            pages: 1,
                            offset: 0,
                            len: 4096,
                        }),
                    )
                };
                match result {
                    Ok(range) => {
                        assert!(
                            len > 0 && in_memory(gpa, len),
                            "grant of {gpa:#x}+{len:#x} accepted"
                        );
                        assert!(op == Op::GrantRange || gpa.is_multiple_of(PAGE_SIZE));
                        assert_eq!(u64::from(range.offset), gpa % PAGE_SIZE);
                        assert_eq!(u64::from(range.len), len);
                        model.granted(g, other, gpa, flag, range);
                        true
                    }
                    Err(GrantError::TableFull(_)) => false,
                    Err(e) => {
                        assert!(
                            len == 0 || !in_memory(gpa, len) || !gpa.is_multiple_of(PAGE_SIZE),
                            "grant of {gpa:#x}+{len:#x} refused: {e:?}"
                        );
                        false
                    }
                }
            }
            Op::End => {
                let r = model.pick(g, input.u8());
                let result = service.end_access(me, GrantRef(r));
                let entry = model.guests[g].refs.get_mut(&r);
                match (entry, result) {
                    (Some(e), Ok(())) => {
                        assert!(
                            matches!(
                                e.state,
                                GrantState::Granted
                                    | GrantState::AcceptTransfer
                                    | GrantState::TransferCompleted
                            ),
                            "end_access of {r} in {:?} succeeded",
                            e.state
                        );
                        e.state = GrantState::Revoked;
                        true
                    }
                    (None, Ok(())) => panic!("end_access of unknown {r} succeeded"),
                    (Some(e), Err(err)) => {
                        match (e.state, &err) {
                            (GrantState::Mapped(n), GrantError::StillMapped { maps, .. }) => {
                                assert_eq!(n, *maps)
                            }
                            (GrantState::Revoked, GrantError::Revoked(_)) => {}
                            (s, err) => panic!("end_access of {r} in {s:?} refused: {err:?}"),
                        }
                        false
                    }
                    (None, Err(err)) => {
                        assert!(
                            matches!(err, GrantError::BadRef(_) | GrantError::NotGranted(_)),
                            "{err:?}"
                        );
                        false
                    }
                }
            }
            Op::Map => {
                let r = model.pick(g, input.u8());
                let pages = u32::from(input.u8() % 4);
                let want = model.mappable(g, other, r, pages, flag);
                match service.map_range(other, me, GrantRef(r), pages, flag) {
                    Ok(mapping) => {
                        assert!(want, "map of {r}x{pages} by {other} (write {flag}) accepted");
                        assert_eq!(mapping.is_writable(), flag, "mapping writability");
                        assert_eq!((mapping.gref().0, mapping.pages()), (r, pages));
                        let refs = &mut model.guests[g].refs;
                        let frame = refs[&r].frame;
                        for i in r..r + pages {
                            let e = refs.get_mut(&i).expect("mapped");
                            e.state = match e.state {
                                GrantState::Mapped(n) => GrantState::Mapped(n + 1),
                                _ => GrantState::Mapped(1),
                            };
                        }
                        handles.push(Handle {
                            g,
                            first: r,
                            pages,
                            frame,
                            writable: flag,
                            mapping,
                        });
                        true
                    }
                    Err(e) => {
                        assert!(!want, "map of {r}x{pages} by {other} refused: {e:?}");
                        false
                    }
                }
            }
            Op::Unmap => {
                let h = usize::from(input.u8());
                if handles.is_empty() {
                    false
                } else {
                    let h = handles.swap_remove(h % handles.len());
                    let refs = &mut model.guests[h.g].refs;
                    for i in h.first..h.first + h.pages {
                        let e = refs.get_mut(&i).expect("mapped");
                        e.state = match e.state {
                            GrantState::Mapped(1) => GrantState::Granted,
                            GrantState::Mapped(n) => GrantState::Mapped(n - 1),
                            s => panic!("model: unmap of {i} in {s:?}"),
                        };
                    }
                    h.mapping.unmap();
                    true
                }
            }
            Op::MapRead | Op::MapWrite => {
                let h = usize::from(input.u8());
                let offset = u64::from(input.u16());
                let len = usize::from(input.u16());
                if handles.is_empty() {
                    false
                } else {
                    let h = &handles[h % handles.len()];
                    let fits = offset + len as u64 <= u64::from(h.pages) * PAGE_SIZE;
                    let at = off(h.frame) + offset as usize;
                    let shadow = &mut model.guests[h.g].shadow;
                    if op == Op::MapRead {
                        let mut buf = vec![0u8; len];
                        let r = h.mapping.read(offset, &mut buf);
                        assert_eq!(r.is_ok(), fits, "mapping read {offset}+{len}: {r:?}");
                        if r.is_ok() {
                            assert!(buf == shadow[at..at + len], "mapping read other bytes");
                        }
                        r.is_ok()
                    } else {
                        let src: Vec<u8> = (0..len).map(|k| k as u8 ^ 0xa5).collect();
                        let r = h.mapping.write(offset, &src);
                        assert_eq!(
                            r.is_ok(),
                            fits && h.writable,
                            "mapping write {offset}+{len}: {r:?}"
                        );
                        if r.is_ok() {
                            shadow[at..at + len].copy_from_slice(&src);
                        }
                        r.is_ok()
                    }
                }
            }
            Op::CopyFrom | Op::CopyTo => {
                let r = model.pick(g, input.u8());
                let o = input.u16();
                let offset = if o & 0x8000 != 0 {
                    u64::MAX - u64::from(o & 0x7fff)
                } else {
                    u64::from(o)
                };
                let len = usize::from(input.u16());
                let write = op == Op::CopyTo;
                let want = model.resolve(g, other, r, offset, len as u64, write);
                let gref = GrantRef(r);
                if write {
                    let src: Vec<u8> = (0..len).map(|k| k as u8 ^ 0x3c).collect();
                    let mut ops = [GrantCopy::ToGrant {
                        granter: me,
                        gref,
                        offset,
                        src: &src,
                    }];
                    let result = service.copy(other, &mut ops);
                    assert_eq!(
                        result.is_ok(),
                        want.is_some(),
                        "copy to {r}@{offset}+{len} by {other}: {result:?}"
                    );
                    if let Some(gpa) = want {
                        let at = off(gpa);
                        model.guests[g].shadow[at..at + len].copy_from_slice(&src);
                    }
                } else {
                    let mut dst = vec![0u8; len];
                    let mut ops = [GrantCopy::FromGrant {
                        granter: me,
                        gref,
                        offset,
                        dst: &mut dst,
                    }];
                    let result = service.copy(other, &mut ops);
                    assert_eq!(
                        result.is_ok(),
                        want.is_some(),
                        "copy from {r}@{offset}+{len} by {other}: {result:?}"
                    );
                    if let Some(gpa) = want {
                        let at = off(gpa);
                        assert!(
                            dst == model.guests[g].shadow[at..at + len],
                            "copy read other bytes"
                        );
                    }
                }
                want.is_some()
            }
            Op::Accept => {
                let page = BASE + u64::from(input.u8() & 0x1f) * PAGE_SIZE;
                match service.accept_transfer(me, other, page) {
                    Ok(r) => {
                        assert!(in_memory(page, PAGE_SIZE), "accept of {page:#x}");
                        let refs = &mut model.guests[g].refs;
                        if let Some(old) = refs.get(&r.0) {
                            assert!(!old.live(), "live {r} handed out again: {old:?}");
                        }
                        refs.insert(
                            r.0,
                            Entry {
                                frame: page,
                                domain: other,
                                readonly: false,
                                win: (0, PAGE_SIZE),
                                range_first: r.0,
                                state: GrantState::AcceptTransfer,
                            },
                        );
                        true
                    }
                    Err(GrantError::TableFull(_)) => false,
                    Err(e) => {
                        assert!(!in_memory(page, PAGE_SIZE), "accept of {page:#x} refused: {e:?}");
                        false
                    }
                }
            }
            Op::Transfer => {
                // `me` gives a page to guest `g2`, naming `g2`'s reference.
                let p = input.u8();
                let page = BASE + u64::from(p & 0x1f) * PAGE_SIZE + if p & 0x80 != 0 { 8 } else { 0 };
                let g2 = if flag { g } else { 1 - g };
                let r = model.pick(g2, input.u8());
                let target = model.guests[g2]
                    .refs
                    .get(&r)
                    .filter(|e| e.state == GrantState::AcceptTransfer && e.domain == me)
                    .map(|e| e.frame);
                let want = in_memory(page, PAGE_SIZE)
                    && page.is_multiple_of(PAGE_SIZE)
                    && !model.in_use(g, page)
                    && target.is_some();
                let result = service.transfer(me, page, ids[g2], GrantRef(r));
                assert_eq!(result.is_ok(), want, "transfer of {page:#x} to {r}: {result:?}");
                if let Some(frame) = target.filter(|_| want) {
                    let (s, d) = (off(page), off(frame));
                    let content = model.guests[g].shadow[s..s + PAGE_SIZE as usize].to_vec();
                    model.guests[g2].shadow[d..d + PAGE_SIZE as usize].copy_from_slice(&content);
                    model.guests[g].shadow[s..s + PAGE_SIZE as usize].fill(0);
                    model.guests[g2].refs.get_mut(&r).expect("target").state = GrantState::TransferCompleted;
                }
                want
            }
            Op::Scribble => {
                let at = u64::from(input.u16()) % MEM;
                let len = (u64::from(input.u8())).min(MEM - at) as usize;
                let src: Vec<u8> = (0..len).map(|k| (k as u8).wrapping_add(byte)).collect();
                model.guests[g]
                    .domain
                    .memory()
                    .write(BASE + at, &src)
                    .expect("own memory");
                model.guests[g].shadow[at as usize..at as usize + len].copy_from_slice(&src);
                true
            }
        };
        if success { ok.push(op) } else { refused.push(op) }
    }

    // Nothing reached memory the model did not allow, and the tables agree.
    for guest in &model.guests {
        let mut mem = vec![0u8; MEM as usize];
        guest.domain.memory().read(BASE, &mut mem).expect("read back");
        if let Some(i) = mem.iter().zip(&guest.shadow).position(|(a, b)| a != b) {
            panic!(
                "{}: byte {:#x} changed outside the grants",
                guest.domain.id(),
                BASE + i as u64
            );
        }
        for (&r, e) in &guest.refs {
            let state = service
                .state(guest.domain.id(), GrantRef(r))
                .expect("known entry");
            assert_eq!(state, e.state, "state of {r}");
        }
    }
    drop(handles);
    format!("ok {ok:?} refused {refused:?}")
}

/// Appends an operation byte: `op`, granter `g`, other party `who` (0 the other
/// guest, 1 the host, 2 the granter, 3 a ghost), `flag` bit 7.
trait OpSeed {
    fn op(self, op: u8, g: u8, who: u8, flag: bool) -> Seed;
}

impl OpSeed for Seed {
    fn op(self, op: u8, g: u8, who: u8, flag: bool) -> Seed {
        self.u8(op | g << 4 | who << 5 | if flag { 0x80 } else { 0 })
    }
}

/// The seed corpus: `(name, input, text the report must contain)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    const RANGE: u8 = 0;
    const GRANT: u8 = 1;
    const END: u8 = 2;
    const MAP: u8 = 3;
    const UNMAP: u8 = 4;
    const MREAD: u8 = 5;
    const MWRITE: u8 = 6;
    const CFROM: u8 = 7;
    const CTO: u8 = 8;
    const ACCEPT: u8 = 9;
    const TRANSFER: u8 = 10;
    const SCRIBBLE: u8 = 11;
    // Guest A grants 0x1800 bytes from 0x800 to B (page 0 from 0x800, page 1 whole).
    let granted = || Seed::new().op(RANGE, 0, 0, false).u16(0x800).u16(0x1800);
    let mut table_full = Seed::new();
    for _ in 0..8 {
        table_full = table_full.op(RANGE, 0, 0, false).u16(0).u16(0x3000);
    }
    vec![
        (
            "copy-to-and-from",
            granted()
                .op(CTO, 0, 0, true)
                .u8(0)
                .u16(0x900)
                .u16(0x1200)
                .op(CFROM, 0, 0, false)
                .u8(0)
                .u16(0x900)
                .u16(0x1200)
                .op(SCRIBBLE, 0, 0, false)
                .u16(0x1000)
                .u8(0x40)
                .op(CFROM, 0, 0, false)
                .u8(0)
                .u16(0xf00)
                .u16(0x200)
                .0,
            "ok [GrantRange, CopyTo, CopyFrom, Scribble, CopyFrom] refused []",
        ),
        (
            "copy-before-window-refused",
            granted().op(CFROM, 0, 0, false).u8(0).u16(0x7ff).u16(2).0,
            "refused [CopyFrom]",
        ),
        (
            "copy-past-range-refused",
            granted().op(CFROM, 0, 0, false).u8(0).u16(0x1fff).u16(2).0,
            "refused [CopyFrom]",
        ),
        (
            "copy-by-wrong-domain-refused",
            granted().op(CFROM, 0, 1, false).u8(0).u16(0x900).u16(2).0,
            "refused [CopyFrom]",
        ),
        (
            "copy-huge-offset-refused",
            granted().op(CFROM, 0, 0, false).u8(0).u16(0x8000).u16(2).0,
            "refused [CopyFrom]",
        ),
        (
            "readonly-never-written",
            Seed::new()
                .op(GRANT, 0, 0, true)
                .u8(2)
                .op(CTO, 0, 0, true)
                .u8(0)
                .u16(0)
                .u16(16)
                .op(MAP, 0, 0, true)
                .u8(0)
                .u8(1)
                .op(MAP, 0, 0, false)
                .u8(0)
                .u8(1)
                .op(MWRITE, 0, 0, false)
                .u8(0)
                .u16(0)
                .u16(1)
                .0,
            "ok [Grant, Map] refused [CopyTo, Map, MapWrite]",
        ),
        (
            "map-write-unmap-end",
            Seed::new()
                .op(GRANT, 0, 0, false)
                .u8(3)
                .op(MAP, 0, 0, true)
                .u8(0)
                .u8(1)
                .op(MWRITE, 0, 0, false)
                .u8(0)
                .u16(100)
                .u16(200)
                .op(END, 0, 0, false)
                .u8(0)
                .op(UNMAP, 0, 0, false)
                .u8(0)
                .op(END, 0, 0, false)
                .u8(0)
                .0,
            "ok [Grant, Map, MapWrite, Unmap, End] refused [End]",
        ),
        (
            "sub-page-map-refused",
            granted().op(MAP, 0, 0, false).u8(0).u8(2).0,
            "ok [GrantRange] refused [Map]",
        ),
        (
            "read-past-mapping-refused",
            Seed::new()
                .op(GRANT, 0, 0, false)
                .u8(3)
                .op(MAP, 0, 0, false)
                .u8(0)
                .u8(1)
                .op(MREAD, 0, 0, false)
                .u8(0)
                .u16(4000)
                .u16(97)
                .0,
            "ok [Grant, Map] refused [MapRead]",
        ),
        (
            "use-after-end-refused",
            Seed::new()
                .op(GRANT, 0, 0, false)
                .u8(4)
                .op(END, 0, 0, false)
                .u8(0)
                .op(CFROM, 0, 0, false)
                .u8(0)
                .u16(0)
                .u16(1)
                .0,
            "ok [Grant, End] refused [CopyFrom]",
        ),
        (
            "transfer-a-to-b",
            Seed::new()
                .op(ACCEPT, 1, 0, false)
                .u8(5)
                .op(TRANSFER, 0, 0, false)
                .u8(6)
                .u8(0)
                .0,
            "ok [Accept, Transfer] refused []",
        ),
        (
            "transfer-granted-page-refused",
            Seed::new()
                .op(ACCEPT, 1, 0, false)
                .u8(5)
                .op(GRANT, 0, 1, false)
                .u8(6)
                .op(TRANSFER, 0, 0, false)
                .u8(6)
                .u8(0)
                .0,
            "ok [Accept, Grant] refused [Transfer]",
        ),
        (
            "bad-refs-refused",
            Seed::new()
                .op(END, 0, 0, false)
                .u8(0xe0)
                .op(CFROM, 0, 0, false)
                .u8(0xff)
                .u16(0)
                .u16(1)
                .0,
            "refused [End, CopyFrom]",
        ),
        ("table-full", table_full.0, "refused [GrantRange]"),
    ]
}
