//! `device_memory`: the vhost-user device's `DeviceMemory` (`TableMemory`, reached
//! through `VhostMemory::open_queue`) over a hostile memory table, read and written
//! with hostile segments (HOSTILE 5, 35, 38).
//!
//! The first byte's top two bits pick the model: 0 `TableMemory` (below), 1
//! `CopyMemory` (the rest of the input is a `copy_helper` input: model 3's memory is
//! reached by head and slot, so that target is its `device_memory`), 2
//! `GrantMemory` ([`grant_memory`]), 3 `SharedPageMemory` ([`shared_page_memory`]).
//!
//! `TableMemory` input layout (missing bytes read as zero):
//!
//! 1. `n`: `n % 3 + 1` regions, each `mode: u8` then either (mode bit 0 clear) a
//!    tame region, `gpa: u16` (in 256-byte units), `size: u16` (plus 1),
//!    `user: u16` (in 4 KiB units), `offset: u16`, or (bit 0 set) four raw `u64`s
//!    (guest-physical address, size, user address, file offset). Every region is
//!    backed by its own sealed 64 KiB memfd holding a known pattern;
//! 2. accesses until the input ends (at most 128): `op: u8` (low 2 bits: read,
//!    write, check, check; bit 2 writable segment; bit 3 the address is raw),
//!    `addr: u64` (raw, or a region index and a signed 16-bit delta from its start
//!    when bit 3 is clear), `len: u16` segment length, `offset: u16` and
//!    `count: u16` for the access inside the segment.
//!
//! Invariants: a refused table maps nothing and the run ends; otherwise every
//! successful read returns exactly the file bytes behind those guest addresses (a
//! shadow copy kept by the harness), every successful write lands exactly there,
//! only on writable segments and only inside the segment; `check` succeeds only for
//! segments the table covers. Never a panic.

use std::cell::RefCell;
use std::fs::File;

use backend_host::vhost_user::memory::{RegionSpec, VhostMemory};
use rustix::fs::{MemfdFlags, SealFlags};
use virtio_core::{AccessError, DescSlot, DeviceMemory, DeviceModel, QueueAddrs, Segment};

use super::common::{Bytes, Seed};

const FILE_LEN: u64 = 64 << 10;
const MAX_ACCESSES: usize = 128;

/// One region as the harness models it.
#[derive(Debug, Clone)]
struct Shadow {
    spec: RegionSpec,
    /// The whole file's bytes.
    file: Vec<u8>,
}

/// The pattern region `i`'s file starts with.
fn pattern(i: usize) -> Vec<u8> {
    (0..FILE_LEN as usize)
        .map(|k| (k as u8).wrapping_mul(31) ^ (k >> 8) as u8 ^ (i as u8).wrapping_mul(0x55))
        .collect()
}

fn memfd(content: &[u8]) -> Option<File> {
    let fd =
        rustix::fs::memfd_create("vio-fuzz-mem", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).ok()?;
    rustix::fs::ftruncate(&fd, FILE_LEN).ok()?;
    rustix::io::pwrite(&fd, content, 0).ok()?;
    // Sealed as a careful frontend would; the table seals again anyway.
    let _ = rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK);
    Some(File::from(fd))
}

/// Runs one input; panics only when an invariant is broken.
pub fn run(data: &[u8]) {
    report(data);
}

/// [`run`], returning what happened (`table refused`, or counts of accesses that
/// succeeded and failed), for the seed tests.
pub fn report(data: &[u8]) -> String {
    match data.first().map_or(0, |b| b >> 6) {
        0 => {}
        1 => return super::copy_helper::report(&data[1..]),
        2 => return grant_memory(&data[1..]),
        _ => return shared_page_memory(&data[1..]),
    }
    let mut input = Bytes(data);
    let n = usize::from(input.u8() % 3) + 1;
    let mut shadows = Vec::with_capacity(n);
    let mut files = Vec::with_capacity(n);
    for i in 0..n {
        let spec = if input.u8() & 1 == 0 {
            RegionSpec {
                guest_phys_addr: 0x1_0000 + u64::from(input.u16()) * 0x100,
                memory_size: u64::from(input.u16()) + 1,
                user_addr: u64::from(input.u16()) * 0x1000,
                mmap_offset: u64::from(input.u16()),
            }
        } else {
            RegionSpec {
                guest_phys_addr: input.u64(),
                memory_size: input.u64(),
                user_addr: input.u64(),
                mmap_offset: input.u64(),
            }
        };
        let file = pattern(i);
        let Some(f) = memfd(&file) else {
            return "no memfd".into();
        };
        files.push(f);
        shadows.push(Shadow { spec, file });
    }
    let memory = VhostMemory::new();
    let specs: Vec<RegionSpec> = shadows.iter().map(|s| s.spec).collect();
    let table = match memory.map(&specs, files) {
        Ok(t) => t,
        Err(e) => return format!("table refused: {e:?}"),
    };
    // What was accepted is sane: no region past its file, none overlapping.
    for (i, a) in specs.iter().enumerate() {
        assert!(
            a.mmap_offset + a.memory_size <= FILE_LEN,
            "region {i} past its file accepted"
        );
        for b in &specs[i + 1..] {
            let disjoint = a.guest_phys_addr + a.memory_size <= b.guest_phys_addr
                || b.guest_phys_addr + b.memory_size <= a.guest_phys_addr;
            assert!(disjoint, "overlapping regions accepted: {a:?} {b:?}");
        }
    }
    assert_eq!(table.bytes(), specs.iter().map(|s| s.memory_size).sum::<u64>());
    memory.set(Some(table));

    // A queue of size 1 in the largest region gives the table's DeviceMemory.
    let big = specs.iter().max_by_key(|s| s.memory_size).expect("a region");
    let base = big.guest_phys_addr.next_multiple_of(16);
    let addrs = QueueAddrs {
        desc: base,
        avail: base + 16,
        used: base + 32,
    };
    let mem = match memory.open_queue(0, 1, addrs) {
        Ok(q) => q.memory,
        Err(_) => return "no queue".into(),
    };

    let (mut ok, mut refused) = (0u32, 0u32);
    let mut accesses = 0;
    while !input.is_empty() && accesses < MAX_ACCESSES {
        accesses += 1;
        let op = input.u8();
        let raw = input.u64();
        let addr = if op & 8 != 0 {
            raw
        } else {
            let s = &specs[(raw as usize) % specs.len()];
            let delta = i64::from((raw >> 8) as u16 as i16);
            s.guest_phys_addr.wrapping_add_signed(delta)
        };
        let len = u32::from(input.u16());
        let offset = u32::from(input.u16());
        let count = usize::from(input.u16());
        let writable = op & 4 != 0;
        let seg = Segment::new(addr, len, writable, 0, DescSlot::Table(0));
        let inside_seg = u64::from(offset) + count as u64 <= u64::from(len);
        let gpa = addr.checked_add(u64::from(offset));
        match op & 3 {
            0 => {
                let mut buf = vec![0u8; count];
                match mem.read(&seg, offset, &mut buf) {
                    Ok(()) => {
                        ok += 1;
                        assert!(inside_seg, "read outside {seg:?}: {offset}+{count}");
                        let want = shadow_read(&shadows, gpa.expect("no wrap"), count)
                            .unwrap_or_else(|| panic!("read of unmapped bytes succeeded: {seg:?}"));
                        assert_eq!(buf, want, "read returned other bytes");
                    }
                    Err(e) => {
                        refused += 1;
                        typed(&e);
                    }
                }
            }
            1 => {
                let src: Vec<u8> = (0..count).map(|k| (k as u8) ^ op).collect();
                match mem.write(&seg, offset, &src) {
                    Ok(()) => {
                        ok += 1;
                        assert!(writable, "write to a readable segment succeeded");
                        assert!(inside_seg, "write outside {seg:?}: {offset}+{count}");
                        assert!(
                            shadow_write(&mut shadows, gpa.expect("no wrap"), &src),
                            "write to unmapped bytes succeeded: {seg:?}"
                        );
                    }
                    Err(e) => {
                        refused += 1;
                        if !writable {
                            assert!(matches!(e, AccessError::Denied), "{e:?}");
                        }
                        typed(&e);
                    }
                }
            }
            _ => match mem.check(&seg) {
                Ok(()) => {
                    ok += 1;
                    assert!(
                        shadow_read(&shadows, addr, len as usize).is_some(),
                        "check passed an unmapped segment {seg:?}"
                    );
                }
                Err(e) => {
                    refused += 1;
                    typed(&e);
                }
            },
        }
    }
    format!("mapped {n}: {ok} ok, {refused} refused")
}

/// Every refusal is a typed error that names no panic path: nothing to check beyond
/// it being one of the variants (kept for the reader: `AccessError` is the type).
fn typed(e: &AccessError) {
    let _ = e.to_string();
}

/// The region and its file offset holding guest address `gpa`.
fn locate(shadows: &[Shadow], gpa: u64) -> Option<(usize, u64, u64)> {
    shadows.iter().enumerate().find_map(|(i, s)| {
        let off = gpa.checked_sub(s.spec.guest_phys_addr)?;
        (off < s.spec.memory_size).then_some((i, s.spec.mmap_offset + off, s.spec.memory_size - off))
    })
}

/// The bytes at `gpa..gpa + len` if every one is mapped (possibly across regions).
fn shadow_read(shadows: &[Shadow], mut gpa: u64, len: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let (i, at, left) = locate(shadows, gpa)?;
        let n = (len - out.len()).min(usize::try_from(left).unwrap_or(usize::MAX));
        let at = usize::try_from(at).ok()?;
        out.extend_from_slice(&shadows[i].file[at..at + n]);
        gpa = gpa.checked_add(n as u64)?;
    }
    Some(out)
}

/// Applies a write to the shadow; `false` if some byte is unmapped.
fn shadow_write(shadows: &mut [Shadow], mut gpa: u64, src: &[u8]) -> bool {
    let mut done = 0;
    while done < src.len() {
        let Some((i, at, left)) = locate(shadows, gpa) else {
            return false;
        };
        let n = (src.len() - done).min(usize::try_from(left).unwrap_or(usize::MAX));
        let at = at as usize;
        shadows[i].file[at..at + n].copy_from_slice(&src[done..done + n]);
        done += n;
        gpa += n as u64;
    }
    true
}

/// What the harness expects of one access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Allowed: must succeed, on these guest bytes.
    Must(u64),
    /// Must be refused.
    Never,
}

impl Reach {
    fn gpa(self) -> Option<u64> {
        match self {
            Reach::Must(g) => Some(g),
            Reach::Never => None,
        }
    }
}

/// Drives accesses (the same encoding as the table part, with the address operand
/// `anchor index | delta << 8` from `anchors` when bit 3 is clear) against `mem`,
/// checking each against `reach(seg, offset, count, write)` and the shadow of the
/// guest memory `guest`. Returns `(ok, refused)`.
fn drive<M: DeviceMemory>(
    input: &mut Bytes<'_>,
    mem: &M,
    guest: &hypervisor::GuestMemory,
    shadow: &mut [u8],
    anchors: &RefCell<Vec<u64>>,
    mut reach: impl FnMut(&Segment, u32, usize, bool) -> Reach,
    mut between: impl FnMut(u8, &mut Bytes<'_>, &mut [u8]),
) -> (u32, u32) {
    let base = guest.base();
    let (mut ok, mut refused) = (0u32, 0u32);
    let mut accesses = 0;
    while !input.is_empty() && accesses < MAX_ACCESSES {
        accesses += 1;
        let op = input.u8();
        if op & 0x30 != 0 {
            // A step of the model's driver side (expose, retire, ...).
            between(op, input, shadow);
            continue;
        }
        let raw = input.u64();
        let anchor = {
            let anchors = anchors.borrow();
            (!anchors.is_empty()).then(|| anchors[(raw as u8 as usize) % anchors.len()])
        };
        let addr = if op & 8 != 0 || anchor.is_none() {
            raw
        } else {
            let a = anchor.unwrap_or(0);
            let a = if op & 0x40 != 0 { a ^ (1 << 63) } else { a };
            a.wrapping_add_signed(i64::from((raw >> 8) as u16 as i16))
        };
        let len = u32::from(input.u16());
        let offset = u32::from(input.u16());
        let count = usize::from(input.u16());
        let writable = op & 4 != 0;
        let seg = Segment::new(addr, len, writable, 0, DescSlot::Table(0));
        let inside_seg = u64::from(offset) + count as u64 <= u64::from(len);
        let at = |gpa: u64| usize::try_from(gpa - base).expect("in memory");
        match op & 3 {
            0 => {
                let want = reach(&seg, offset, count, false);
                let mut buf = vec![0u8; count];
                match mem.read(&seg, offset, &mut buf) {
                    Ok(()) => {
                        ok += 1;
                        assert!(inside_seg, "read outside {seg:?}: {offset}+{count}");
                        let gpa = want
                            .gpa()
                            .unwrap_or_else(|| panic!("read of {seg:?} {offset}+{count} succeeded"));
                        assert!(
                            buf == shadow[at(gpa)..at(gpa) + count],
                            "read returned other bytes"
                        );
                    }
                    Err(e) => {
                        refused += 1;
                        assert!(
                            !matches!(want, Reach::Must(_)),
                            "read of {seg:?} {offset}+{count} refused: {e:?}"
                        );
                    }
                }
            }
            1 => {
                let want = if writable {
                    reach(&seg, offset, count, true)
                } else {
                    Reach::Never
                };
                let src: Vec<u8> = (0..count).map(|k| (k as u8) ^ op ^ 0x77).collect();
                match mem.write(&seg, offset, &src) {
                    Ok(()) => {
                        ok += 1;
                        assert!(writable, "write to a readable segment succeeded");
                        assert!(inside_seg, "write outside {seg:?}: {offset}+{count}");
                        let gpa = want
                            .gpa()
                            .unwrap_or_else(|| panic!("write of {seg:?} {offset}+{count} succeeded"));
                        shadow[at(gpa)..at(gpa) + count].copy_from_slice(&src);
                    }
                    Err(e) => {
                        refused += 1;
                        if !writable {
                            assert!(matches!(e, AccessError::Denied), "{e:?}");
                        }
                        assert!(
                            !matches!(want, Reach::Must(_)),
                            "write of {seg:?} {offset}+{count} refused: {e:?}"
                        );
                    }
                }
            }
            _ => {
                let want = reach(&seg, 0, len as usize, writable);
                match mem.check(&seg) {
                    Ok(()) => {
                        ok += 1;
                        assert!(want != Reach::Never, "check passed {seg:?}");
                    }
                    Err(e) => {
                        refused += 1;
                        assert!(!matches!(want, Reach::Must(_)), "check refused {seg:?}: {e:?}");
                    }
                }
            }
        }
    }
    (ok, refused)
}

/// The guest's whole memory, for a shadow.
fn snapshot(guest: &hypervisor::GuestMemory) -> Vec<u8> {
    let mut v = vec![0u8; guest.size() as usize];
    guest.read(guest.base(), &mut v).expect("read guest");
    v
}

/// Panics if guest memory differs from the shadow.
fn compare(guest: &hypervisor::GuestMemory, shadow: &[u8]) {
    let now = snapshot(guest);
    if let Some(i) = now.iter().zip(shadow).position(|(a, b)| a != b) {
        panic!(
            "guest byte {:#x} changed behind the model's back",
            guest.base() + i as u64
        );
    }
}

/// `SharedPageMemory` (model 1): a region with two queues' rings and bounce areas;
/// the device's memory of queue 0 must reach exactly queue 0's bounce area.
///
/// Input after the first byte: accesses as in the table part, the address operand
/// relative to one of: queue 0's bounce area, its end, queue 1's bounce area, the
/// region's start (the rings).
pub fn shared_page_memory(data: &[u8]) -> String {
    use transport_shared_page::{SharedPageConfig, pair};
    use virtio_core::DriverModel;
    let hv = hypervisor::Hypervisor::new();
    let Ok(domain) = hv.create_domain("guest", 256 << 10) else {
        return "no memory".into();
    };
    let cfg = SharedPageConfig {
        max_queues: 2,
        max_queue_size: 8,
        bounce_bytes_per_queue: 8 << 10,
    };
    let Ok((driver, device)) = pair(&domain, cfg) else {
        return "no model".into();
    };
    let (Ok(q0), Ok(q1)) = (driver.create_queue(0, 8), driver.create_queue(1, 8)) else {
        return "no queue".into();
    };
    let (Ok(d0), Ok(d1)) = (
        device.open_queue(0, 8, q0.addrs),
        device.open_queue(1, 8, q1.addrs),
    ) else {
        return "no device queue".into();
    };
    let guest = domain.memory().clone();
    // A pattern in the whole region, so reads of the wrong bytes show.
    let region = driver.shared_gpa();
    let pattern: Vec<u8> = (0..device.shared_len())
        .map(|k| (k as u8) ^ (k >> 9) as u8)
        .collect();
    guest.write(region, &pattern).expect("region");
    let mut shadow = snapshot(&guest);
    let bounce = d0.memory.bounce_range();
    let other = d1.memory.bounce_range();
    let anchors = RefCell::new(vec![bounce.start, bounce.end, other.start, 0]);
    let mut input = Bytes(data);
    let (ok, refused) = drive(
        &mut input,
        &d0.memory,
        &guest,
        &mut shadow,
        &anchors,
        |seg, offset, count, write| {
            let end = seg.addr().checked_add(u64::from(seg.len()));
            let inside = seg.addr() >= bounce.start && end.is_some_and(|e| e <= bounce.end);
            let fits = u64::from(offset) + count as u64 <= u64::from(seg.len());
            if inside && fits && (!write || seg.writable()) {
                Reach::Must(region + seg.addr() + u64::from(offset))
            } else {
                Reach::Never
            }
        },
        |_, _, _| {},
    );
    compare(&guest, &shadow);
    drop((q0, q1));
    format!("shared page: {ok} ok, {refused} refused")
}

/// One buffer the grant driver exposed.
#[derive(Debug)]
struct Exposure {
    /// The descriptor address without the persistent hint.
    addr: u64,
    len: u64,
    gpa: u64,
    writable: bool,
    /// Retired (its one-shot grant ended, or deferred while mapped).
    retired: bool,
    /// Pool buffers and the rings stay granted.
    lasting: bool,
}

/// `GrantMemory` (model 4): the device's memory of a queue whose driver exposes and
/// retires one-shot buffers, buffers inside a persistent pool, and whose device may
/// forge the persistent hint (so one-shot pages get mapped and their revocation
/// deferred, HOSTILE 37).
///
/// Input after the first byte: steps and accesses. A byte with bit 4 or 5 set is a
/// driver step (`(op >> 4) & 3`): 1 expose `at: u16` (offset in a 64 KiB buffer
/// area, bit 15: in the pool instead), `len: u16`, direction bit 7 of `op`; 2
/// retire exposure `i: u8`; 3 flush the device's cache (`op & 1`) or retry deferred
/// revocations. Otherwise an access as in the table part, its address operand
/// relative to an exposure's address (any exposed so far, the three rings first),
/// bit 6 flipping the persistent hint.
pub fn grant_memory(data: &[u8]) -> String {
    use transport_grant::addr::{PERSISTENT, decode};
    use transport_grant::{GrantService, PAGE_SIZE, pair};
    use virtio_core::{Direction, DriverModel, DriverShare, GuestBuf};

    let hv = hypervisor::Hypervisor::new();
    let Ok(domain) = hv.create_domain("guest", 256 << 10) else {
        return "no memory".into();
    };
    let service = GrantService::new(hv.clone());
    let Ok((driver, device)) = pair(&service, &domain, hypervisor::Hypervisor::HOST) else {
        return "no model".into();
    };
    let guest = domain.memory().clone();
    let Ok(pool) = driver.persistent_pool(2 * PAGE_SIZE) else {
        return "no pool".into();
    };
    // The allocator is first fit: the three ring pages come next.
    let Ok(rings) = guest.alloc_pages(3) else {
        return "no ring memory".into();
    };
    guest.free(rings, 3 * PAGE_SIZE).expect("free probe");
    let Ok(mut q) = driver.create_queue(0, 8) else {
        return "no queue".into();
    };
    let Ok(dq) = device.open_queue(0, 8, q.addrs) else {
        return "no device queue".into();
    };
    q.ring.device.write(0, &[0x5a]).expect("used ring");
    let mut probe = [0u8];
    guest.read(rings + 2 * PAGE_SIZE, &mut probe).expect("probe");
    assert_eq!(probe[0], 0x5a, "rings not where the probe said");
    let Ok(area) = guest.alloc(64 << 10, PAGE_SIZE) else {
        return "no buffer memory".into();
    };
    let pattern: Vec<u8> = (0..guest.size())
        .map(|k| (k as u8).wrapping_mul(7) ^ (k >> 10) as u8)
        .collect();
    guest.write(guest.base(), &pattern).expect("fill");
    let mut shadow = snapshot(&guest);

    let ring = |addr: u64, i: u64, writable: bool| Exposure {
        addr,
        len: PAGE_SIZE,
        gpa: rings + i * PAGE_SIZE,
        writable,
        retired: false,
        lasting: true,
    };
    let exposures = RefCell::new(vec![
        ring(q.addrs.desc, 0, false),
        ring(q.addrs.avail, 1, false),
        ring(q.addrs.used, 2, true),
        Exposure {
            addr: transport_grant::addr::encode(pool.first_ref(), 0, false),
            len: pool.len(),
            gpa: pool.base(),
            writable: true,
            retired: false,
            lasting: true,
        },
    ]);
    let tokens = RefCell::new(Vec::new());
    let mut input = Bytes(data);
    let anchors = RefCell::new(exposures.borrow().iter().map(|e| e.addr).collect());
    let (ok, refused) = {
        drive(
            &mut input,
            &dq.memory,
            &guest,
            &mut shadow,
            &anchors,
            |seg, offset, count, write| {
                if decode(seg.addr()).is_err() || u64::from(offset) + count as u64 > u64::from(seg.len()) {
                    return Reach::Never;
                }
                let start = (seg.addr() & !PERSISTENT).checked_add(u64::from(offset));
                let Some(start) = start else { return Reach::Never };
                let end = start + (count as u64).max(1);
                let exposures = exposures.borrow();
                // The grant named by the segment's address must be of the same grant
                // range as the bytes accessed (an access runs on only inside one range).
                let gref = (seg.addr() & !PERSISTENT) >> 12;
                let Some(e) = exposures.iter().rev().find(|e| {
                    start >= e.addr
                        && end <= e.addr + e.len
                        && (e.addr >> 12..=(e.addr + e.len - 1) >> 12).contains(&gref)
                }) else {
                    return Reach::Never;
                };
                let gpa = e.gpa + (start - e.addr);
                if write && !e.writable {
                    return Reach::Never;
                }
                if e.lasting || !e.retired {
                    return Reach::Must(gpa);
                }
                // Retired: a one-shot grant is copy-only, so it ended at retire
                // (no mapping could defer it), and nothing of it is reachable.
                Reach::Never
            },
            |op, input, shadow| match (op >> 4) & 3 {
                1 => {
                    let at = input.u16();
                    let len = u32::from(input.u16());
                    let dir = if op & 0x80 != 0 {
                        Direction::FromDevice
                    } else {
                        Direction::ToDevice
                    };
                    let gpa = if at & 0x8000 != 0 {
                        pool.base() + u64::from(at & 0x1fff)
                    } else {
                        area + u64::from(at)
                    };
                    if let Ok(x) = q.share.expose(GuestBuf::new(gpa, len), dir) {
                        let persistent = x.addr & PERSISTENT != 0;
                        let mut index = usize::MAX;
                        if x.len > 0 {
                            index = exposures.borrow().len();
                            exposures.borrow_mut().push(Exposure {
                                addr: x.addr & !PERSISTENT,
                                len: u64::from(x.len),
                                gpa,
                                writable: dir == Direction::FromDevice || persistent,
                                retired: false,
                                lasting: persistent,
                            });
                            anchors.borrow_mut().push(x.addr);
                        }
                        tokens.borrow_mut().push((index, Some(x.token)));
                    }
                }
                2 => {
                    let mut tokens = tokens.borrow_mut();
                    if !tokens.is_empty() {
                        let n = tokens.len();
                        let (i, t) = &mut tokens[usize::from(input.u8()) % n];
                        if let Some(t) = t.take() {
                            q.share.retire(t, 0);
                            if let Some(e) = exposures.borrow_mut().get_mut(*i) {
                                e.retired = true;
                            }
                        }
                    }
                }
                _ => {
                    if op & 1 != 0 {
                        dq.memory.flush_cache();
                    } else {
                        q.share.retry_deferred();
                    }
                    let _ = shadow;
                }
            },
        )
    };
    compare(&guest, &shadow);
    let deferred = q.share.deferred();
    drop(dq);
    format!("grant: {ok} ok, {refused} refused, {deferred} deferred")
}

fn tame(s: Seed, gpa_units: u16, size: u16, user_pages: u16, offset: u16) -> Seed {
    s.u8(0).u16(gpa_units).u16(size).u16(user_pages).u16(offset)
}

fn raw(s: Seed, gpa: u64, size: u64, user: u64, offset: u64) -> Seed {
    s.u8(1).u64(gpa).u64(size).u64(user).u64(offset)
}

/// An access: op, address (region index + delta when `op & 8 == 0`), segment
/// length, offset, count.
fn access(s: Seed, op: u8, addr: u64, len: u16, offset: u16, count: u16) -> Seed {
    s.u8(op).u64(addr).u16(len).u16(offset).u16(count)
}

/// Address operand: region `i`, `delta` bytes from its start.
fn at(i: u8, delta: i16) -> u64 {
    u64::from(i) | (u64::from(delta as u16) << 8)
}

/// The seed corpus: `(name, input, text the report must contain)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    const READ: u8 = 0;
    const WRITE: u8 = 1;
    const CHECK: u8 = 2;
    const W: u8 = 4;
    const RAW: u8 = 8;
    const P: u8 = 0x40;
    // Two adjacent regions: 0x1_0000..0x1_1000 and 0x1_1000..0x1_2000.
    let two = || tame(tame(Seed::new().u8(1), 0, 0xfff, 0, 0), 0x10, 0xfff, 1, 0x1000);
    vec![
        (
            "read-write-inside",
            access(
                access(two(), WRITE | W, at(0, 0x100), 64, 0, 64),
                READ,
                at(0, 0x100),
                64,
                0,
                64,
            )
            .0,
            "2 ok, 0 refused",
        ),
        (
            "across-two-regions",
            access(
                access(two(), WRITE | W, at(1, -8), 16, 0, 16),
                READ,
                at(1, -8),
                16,
                0,
                16,
            )
            .0,
            "2 ok, 0 refused",
        ),
        (
            "05-one-past-the-end",
            access(two(), READ, at(1, 0xff9), 8, 0, 8).0,
            "0 ok, 1 refused",
        ),
        (
            "05-wrapping-address",
            access(two(), READ | RAW, u64::MAX - 3, 16, 0, 16).0,
            "0 ok, 1 refused",
        ),
        (
            "05-offset-past-segment",
            access(two(), READ, at(0, 0), 16, 12, 8).0,
            "0 ok, 1 refused",
        ),
        (
            "write-readable-denied",
            access(
                access(two(), WRITE, at(0, 0), 16, 0, 16),
                CHECK,
                at(0, 0),
                16,
                0,
                0,
            )
            .0,
            "1 ok, 1 refused",
        ),
        (
            "38-unaligned-table",
            access(
                tame(Seed::new().u8(0), 0, 0x1001, 3, 0xfff),
                READ,
                at(0, 0xff9),
                8,
                0,
                8,
            )
            .0,
            "1 ok, 0 refused",
        ),
        (
            "38-huge-region",
            raw(Seed::new().u8(0), 0, u64::MAX, 0, 0).0,
            "table refused",
        ),
        (
            "38-wrapping-region",
            raw(Seed::new().u8(0), u64::MAX - 0xfff, 0x2000, 0, 0).0,
            "table refused",
        ),
        (
            "38-past-the-file",
            raw(Seed::new().u8(0), 0x1_0000, 0x1000, 0, FILE_LEN - 0x800).0,
            "table refused",
        ),
        (
            "38-overlap",
            tame(tame(Seed::new().u8(1), 0, 0xfff, 0, 0), 0x8, 0xfff, 1, 0).0,
            "table refused",
        ),
        (
            "38-top-of-address-space",
            access(
                raw(Seed::new().u8(0), u64::MAX - 0x1000, 0x1000, 0, 0),
                READ | RAW,
                u64::MAX - 0x10,
                0x20,
                0,
                0x20,
            )
            .0,
            "0 ok, 1 refused",
        ),
        (
            "sp-read-write-bounce",
            access(
                access(sp(), WRITE | W, at(0, 0x10), 64, 0, 64),
                READ,
                at(0, 0x10),
                64,
                0,
                64,
            )
            .0,
            "shared page: 2 ok, 0 refused",
        ),
        (
            "sp-other-queue-refused",
            access(access(sp(), READ, at(2, 0), 16, 0, 16), CHECK, at(2, 0), 16, 0, 0).0,
            "shared page: 0 ok, 2 refused",
        ),
        (
            "sp-rings-refused",
            access(sp(), READ, at(3, 0x10), 16, 0, 16).0,
            "shared page: 0 ok, 1 refused",
        ),
        (
            "sp-past-the-area",
            access(sp(), READ, at(1, -8), 16, 0, 8).0,
            "shared page: 0 ok, 1 refused",
        ),
        (
            "grant-one-shot-read-write",
            access(
                access(
                    expose(gm(), true, 0x100, 0x200),
                    WRITE | W,
                    at(4, 0),
                    0x200,
                    0,
                    0x200,
                ),
                READ,
                at(4, 0x10),
                0x100,
                0,
                0x100,
            )
            .0,
            "grant: 2 ok, 0 refused",
        ),
        (
            "grant-readable-not-written",
            access(expose(gm(), false, 0x2000, 64), WRITE | W, at(4, 0), 64, 0, 64).0,
            "grant: 0 ok, 1 refused",
        ),
        (
            "grant-outside-buffer-refused",
            access(
                access(expose(gm(), true, 0x100, 0x200), READ, at(4, -1), 2, 0, 2),
                READ,
                at(4, 0x1ff),
                2,
                0,
                2,
            )
            .0,
            "grant: 0 ok, 2 refused",
        ),
        (
            "grant-retired-refused",
            access(
                expose(gm(), true, 0x100, 0x200).u8(0x20).u8(0),
                READ,
                at(4, 0),
                1,
                0,
                1,
            )
            .0,
            "grant: 0 ok, 1 refused, 0 deferred",
        ),
        (
            "grant-forged-persistent-refused",
            access(
                access(expose(gm(), true, 0x1000, 0x1000), READ | P, at(4, 0), 8, 0, 8)
                    .u8(0x20)
                    .u8(0),
                WRITE | W | P,
                at(4, 0),
                8,
                0,
                8,
            )
            .0,
            "grant: 1 ok, 1 refused, 0 deferred",
        ),
        (
            "grant-deferred-then-revoked",
            access(
                access(expose(gm(), true, 0x1000, 0x1000), READ | P, at(4, 0), 8, 0, 8)
                    .u8(0x20)
                    .u8(0)
                    .u8(0x31)
                    .u8(0x30),
                READ | P,
                at(4, 0),
                8,
                0,
                8,
            )
            .0,
            "grant: 1 ok, 1 refused, 0 deferred",
        ),
        (
            "grant-refused-cached-write-moves-nothing",
            access(
                access(
                    access(gm(), WRITE | W | P, at(3, 0x1ff0), 32, 0, 32),
                    WRITE | W,
                    at(2, 0),
                    8,
                    0,
                    8,
                ),
                WRITE | W,
                at(0, 0),
                8,
                0,
                8,
            )
            .0,
            "grant: 1 ok, 2 refused",
        ),
    ]
}

/// A `SharedPageMemory` input (accesses follow).
fn sp() -> Seed {
    Seed::new().u8(0xc0)
}

/// A `GrantMemory` input (steps and accesses follow).
fn gm() -> Seed {
    Seed::new().u8(0x80)
}

/// A grant driver step exposing `len` bytes at `at` of the buffer area, writable by
/// the device if `writable`.
fn expose(s: Seed, writable: bool, at: u16, len: u16) -> Seed {
    s.u8(0x10 | if writable { 0x80 } else { 0 }).u16(at).u16(len)
}
