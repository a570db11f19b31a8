//! `device_memory`: the vhost-user device's `DeviceMemory` (`TableMemory`, reached
//! through `VhostMemory::open_queue`) over a hostile memory table, read and written
//! with hostile segments (HOSTILE 5, 35, 38).
//!
//! Input layout (missing bytes read as zero):
//!
//! 1. `n`: `n % 3 + 1` regions, each `mode: u8` then either (mode bit 0 clear) a
//!    tame region, `gpa: u16` (in 256-byte units), `size: u16` (plus 1),
//!    `user: u16` (in 4 KiB units), `offset: u16`, or (bit 0 set) four raw `u64`s
//!    (guest-physical address, size, user address, file offset). Every region is
//!    backed by its own sealed 64 KiB memfd holding a known pattern;
//! 2. accesses until the input ends (at most 128): `op: u8` (low 2 bits: read,
//!    write, check, direct; bit 2 writable segment; bit 3 the address is raw),
//!    `addr: u64` (raw, or a region index and a signed 16-bit delta from its start
//!    when bit 3 is clear), `len: u16` segment length, `offset: u16` and
//!    `count: u16` for the access inside the segment.
//!
//! Invariants: a refused table maps nothing and the run ends; otherwise every
//! successful read returns exactly the file bytes behind those guest addresses (a
//! shadow copy kept by the harness), every successful write lands exactly there,
//! only on writable segments and only inside the segment; `check` succeeds only for
//! segments the table covers; `direct` hands out a view of exactly the segment,
//! read-only for a readable segment, with the right bytes. Never a panic.

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
            2 => match mem.check(&seg) {
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
            _ => match mem.direct(&seg) {
                Some(view) => {
                    ok += 1;
                    assert_eq!(view.len(), len as usize, "direct view of another length");
                    assert_eq!(view.is_writable(), writable, "direct view writability");
                    let mut got = vec![0u8; len as usize];
                    view.read(0, &mut got).expect("view read");
                    let want = shadow_read(&shadows, addr, len as usize)
                        .unwrap_or_else(|| panic!("direct view of unmapped bytes: {seg:?}"));
                    assert_eq!(got, want, "direct view shows other bytes");
                }
                None => refused += 1,
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
    const DIRECT: u8 = 3;
    const W: u8 = 4;
    const RAW: u8 = 8;
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
            "direct-across-regions-refused",
            access(two(), DIRECT, at(1, -8), 16, 0, 0).0,
            "0 ok, 1 refused",
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
    ]
}
