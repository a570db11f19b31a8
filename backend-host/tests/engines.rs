//! Every block engine against real files with `O_DIRECT`.
//!
//! Images live under cargo's per-crate scratch directory (`CARGO_TARGET_TMPDIR`), which
//! must not be tmpfs: tmpfs refuses `O_DIRECT`. io_uring tests run when
//! [`UringEngine::probe`] passes; where it does not, each test says it skipped
//! io_uring ([`skip`]: past the harness's capture, and a failure under CI).

// Test sizes are small constants on a 64-bit host; `as` keeps the arithmetic readable.
#![allow(clippy::cast_possible_truncation)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use backend_host::blk::disk::{DirectMode, Disk, DiskError, DiskOptions};
use backend_host::blk::engine::{AlignedBuf, Completion, Engine, IoKind, IoOp};
use backend_host::blk::engine_sync::SyncEngine;
use backend_host::blk::engine_uring::{UringConfig, UringEngine, best_engine};
use backend_host::blk::fault::{FaultEngine, FaultPlan, OpClass, POISON};
use proptest::prelude::*;
use rustix::io::Errno;
use virtio_core::test_utils::skip;

const TMPFS_MAGIC: u64 = 0x0102_1994;
const MIB: u64 = 1 << 20;

fn is_tmpfs(path: &std::path::Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| u64::try_from(s.f_type).ok() == Some(TMPFS_MAGIC))
}

/// A fresh image path in a directory that supports `O_DIRECT`.
fn image_path(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("engines");
    std::fs::create_dir_all(&dir).unwrap();
    assert!(
        !is_tmpfs(&dir),
        "{} is tmpfs, which cannot do O_DIRECT; point CARGO_TARGET_DIR at a disk",
        dir.display()
    );
    let n = N.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{name}-{}-{n}.img", std::process::id()))
}

fn direct_image(name: &str, size: u64) -> (PathBuf, Disk) {
    let path = image_path(name);
    Disk::create_sparse(&path, size).unwrap();
    let disk = Disk::open(&path, DiskOptions::default()).unwrap();
    assert!(disk.direct());
    (path, disk)
}

/// The engines to test on `disk`: the thread pool always, io_uring where it works
/// (where it does not, the running test says once that it skipped io_uring).
fn engines(disk: &Disk) -> Vec<Box<dyn Engine>> {
    let mut all: Vec<Box<dyn Engine>> = vec![Box::new(SyncEngine::new(disk, 3).unwrap())];
    match UringEngine::probe() {
        Ok(()) => all.push(Box::new(UringEngine::new(disk, UringConfig::default()).unwrap())),
        Err(why) => {
            thread_local! {
                static SAID: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
            }
            if !SAID.replace(true) {
                // libtest runs each test on a thread named after it.
                let thread = std::thread::current();
                let test = thread.name().unwrap_or("engines");
                skip(
                    &format!("{test} (io_uring half)"),
                    format_args!("io_uring unavailable: {why}"),
                );
            }
        }
    }
    all
}

/// Runs `f` once per engine kind, each on a fresh image of `size` bytes.
fn each_engine(name: &str, size: u64, f: impl Fn(&Disk, &mut dyn Engine)) {
    let (path, disk) = direct_image(name, size);
    let kinds = engines(&disk).len();
    drop(disk);
    std::fs::remove_file(&path).unwrap();
    for k in 0..kinds {
        let (path, disk) = direct_image(name, size);
        let mut engine = engines(&disk).swap_remove(k);
        f(&disk, engine.as_mut());
        drop(engine);
        std::fs::remove_file(&path).unwrap();
    }
}

fn buf(disk: &Disk, len: usize, fill: impl Fn(usize) -> u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len, disk.mem_align());
    for (i, byte) in b.as_mut_slice().iter_mut().enumerate() {
        *byte = fill(i);
    }
    b
}

fn pattern(seed: u64) -> impl Fn(usize) -> u8 {
    move |i| (i as u64).wrapping_mul(31).wrapping_add(seed.wrapping_mul(7919)) as u8 | 1
}

fn write(disk: &Disk, offset: u64, len: usize, seed: u64, user: u64) -> IoOp {
    IoOp {
        kind: IoKind::Write { dsync: false },
        offset,
        len: 0,
        buf: buf(disk, len, pattern(seed)),
        user,
    }
}

fn read(disk: &Disk, offset: u64, len: usize, user: u64) -> IoOp {
    IoOp {
        kind: IoKind::Read,
        offset,
        len: 0,
        buf: buf(disk, len, |_| 0xEE),
        user,
    }
}

fn range_op(kind: IoKind, offset: u64, len: u64, user: u64) -> IoOp {
    IoOp {
        kind,
        offset,
        len,
        buf: AlignedBuf::default(),
        user,
    }
}

/// Submits `ops` as one batch and waits for all of them, sorted by `user`.
fn run(engine: &mut dyn Engine, ops: Vec<IoOp>) -> Vec<Completion> {
    let n = ops.len();
    for op in ops {
        engine.submit(op);
    }
    engine.commit().unwrap();
    let mut out = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "{}: ops did not complete",
            engine.name()
        );
        engine.wait().unwrap();
        engine.reap(&mut out);
    }
    assert_eq!(engine.in_flight(), 0);
    out.sort_by_key(|c| c.user);
    out
}

fn run1(engine: &mut dyn Engine, op: IoOp) -> Completion {
    run(engine, vec![op]).pop().unwrap()
}

fn errno(c: &Completion) -> Option<Errno> {
    c.result
        .as_ref()
        .err()
        .and_then(|e| e.raw_os_error())
        .map(Errno::from_raw_os_error)
}

#[test]
fn direct_disk_reports_alignment() {
    let (path, disk) = direct_image("align", MIB);
    assert_eq!(disk.size(), MIB);
    assert!(disk.mem_align().is_power_of_two() && disk.mem_align() >= 1);
    assert!(disk.offset_align().is_power_of_two() && disk.offset_align() >= 512);
    assert!(disk.block_size() >= disk.offset_align() as u64);
    eprintln!(
        "direct I/O alignment here: mem {} offset {}",
        disk.mem_align(),
        disk.offset_align()
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn filesystems_without_direct_io_are_refused_unless_buffered_is_asked_for() {
    // procfs has no O_DIRECT at all: open(2) fails with EINVAL.
    let err = Disk::open(
        "/proc/version",
        DiskOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, DiskError::DirectIoUnsupported { .. }), "{err:?}");
    let prefer = DiskOptions {
        read_only: true,
        direct: DirectMode::Prefer,
    };
    if let Err(err) = Disk::open("/proc/version", prefer) {
        assert!(!matches!(err, DiskError::DirectIoUnsupported { .. }), "{err:?}");
    }
}

#[test]
fn tmpfs_refuses_direct_io_unless_buffered_is_asked_for() {
    let shm = PathBuf::from("/dev/shm");
    if !is_tmpfs(&shm) {
        skip(
            "tmpfs_refuses_direct_io_unless_buffered_is_asked_for",
            "/dev/shm is not tmpfs here",
        );
        return;
    }
    let path = shm.join(format!("engines-tmpfs-{}.img", std::process::id()));
    Disk::create_sparse(&path, MIB).unwrap();
    let err = Disk::open(&path, DiskOptions::default()).unwrap_err();
    assert!(
        matches!(&err, DiskError::DirectIoUnsupported { path: p } if *p == path),
        "{err:?}"
    );
    let prefer = Disk::open(
        &path,
        DiskOptions {
            direct: DirectMode::Prefer,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!prefer.direct());
    let off = Disk::open(
        &path,
        DiskOptions {
            direct: DirectMode::Off,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!off.direct());
    assert_eq!(off.mem_align(), 1);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn best_engine_is_io_uring_when_the_probe_passes() {
    let (path, disk) = direct_image("best", MIB);
    let engine = best_engine(&disk, 64).unwrap();
    let expected = if UringEngine::probe().is_ok() {
        "io_uring"
    } else {
        "sync"
    };
    assert_eq!(engine.name(), expected);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn read_after_write_at_aligned_offsets() {
    each_engine("raw", 4 * MIB, |disk, engine| {
        let offsets = [0, 4096 * 7, MIB, 4 * MIB - 8192];
        let writes = offsets
            .iter()
            .enumerate()
            .map(|(i, &o)| write(disk, o, 8192, o, i as u64));
        for c in run(engine, writes.collect()) {
            assert_eq!(c.result.unwrap(), 8192, "{}", engine.name());
        }
        let reads = offsets
            .iter()
            .enumerate()
            .map(|(i, &o)| read(disk, o, 8192, i as u64));
        for (c, &o) in run(engine, reads.collect()).iter().zip(&offsets) {
            assert_eq!(*c.result.as_ref().unwrap(), 8192);
            let expected: Vec<u8> = (0..8192).map(pattern(o)).collect();
            assert_eq!(c.buf.as_slice(), &expected[..], "{} at {o}", engine.name());
        }
    });
}

#[test]
fn queue_depth_32_completes_every_op_by_tag() {
    each_engine("qd32", 8 * MIB, |disk, engine| {
        // Scattered blocks, so completions need not come back in submission order.
        let offset = |i: u64| (i * 37 % 64) * 128 * 1024;
        let writes = (0..32).map(|i| write(disk, offset(i), 65536, i, i));
        for op in writes {
            engine.submit(op);
        }
        assert_eq!(engine.in_flight(), 32);
        engine.commit().unwrap();
        let mut done = Vec::new();
        while done.len() < 32 {
            engine.wait().unwrap();
            engine.reap(&mut done);
        }
        let order: Vec<u64> = done.iter().map(|c| c.user).collect();
        assert!(done.iter().all(|c| c.result.as_ref().is_ok_and(|&n| n == 65536)));
        let reads = run(engine, (0..32).map(|i| read(disk, offset(i), 65536, i)).collect());
        for c in &reads {
            let expected: Vec<u8> = (0..65536).map(pattern(c.user)).collect();
            assert_eq!(c.buf.as_slice(), &expected[..], "{} op {}", engine.name(), c.user);
        }
        let in_order = order.windows(2).all(|w| w[0] < w[1]);
        eprintln!(
            "{}: QD32 writes completed in submission order: {in_order}",
            engine.name()
        );
    });
}

/// A dsync write, a plain write and a flush succeed, and the data reaches the file.
/// (Read back through the page cache: that cannot tell a durable write from a cached
/// one; `dsync_writes_flush_the_device_cache_and_plain_writes_do_not` can.)
#[test]
fn dsync_writes_and_flush_succeed_and_reach_the_file() {
    each_engine("dsync", MIB, |disk, engine| {
        let mut op = write(disk, 4096, 4096, 9, 1);
        op.kind = IoKind::Write { dsync: true };
        assert_eq!(run1(engine, op).result.unwrap(), 4096);
        assert_eq!(run1(engine, write(disk, 8192, 4096, 10, 2)).result.unwrap(), 4096);
        assert_eq!(run1(engine, range_op(IoKind::Flush, 0, 0, 3)).result.unwrap(), 0);
        // Through a second, buffered descriptor: the data reached the file.
        let file = std::fs::read(disk.path()).unwrap();
        let expected: Vec<u8> = (0..4096).map(pattern(9)).collect();
        assert_eq!(&file[4096..8192], &expected[..]);
    });
}

/// A loop device over a fresh image under the scratch directory; detached on drop.
struct LoopDev {
    dev: String,
    image: PathBuf,
}

impl LoopDev {
    /// `None`, the test `test` skipped saying why, where loop devices cannot be set
    /// up (not root, no loop driver).
    fn attach(test: &str, size: u64) -> Option<LoopDev> {
        let image = image_path("loop");
        Disk::create_sparse(&image, size).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image)
            .output();
        let why = match out {
            Ok(o) if o.status.success() => {
                let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
                return Some(LoopDev { dev, image });
            }
            Ok(o) => format!("losetup failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
            Err(e) => format!("cannot run losetup: {e}"),
        };
        let _ = std::fs::remove_file(&image);
        skip(test, why);
        None
    }

    /// Cache flush requests the device has completed: field 16 of its
    /// `/sys/block/<dev>/stat` (Documentation/block/stat.rst).
    fn flushes(&self) -> u64 {
        let name = self.dev.trim_start_matches("/dev/");
        let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
        let field = stat.split_whitespace().nth(15);
        field
            .expect("a kernel that counts flushes (4.19+)")
            .parse()
            .unwrap()
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// `RWF_DSYNC` makes a write durable at completion, which reading the data back
/// cannot show: the page cache and the drive's volatile cache answer reads alike,
/// and no test here can cut the power. What can be seen is how the kernel makes it
/// durable: a dsync write to a device with a volatile write cache is followed by a
/// cache flush before it completes, a plain write by none. A loop device has such a
/// cache ("write back" in its `queue/write_cache`) and counts its flushes, and only
/// this test uses it; so a dsync write must raise its flush count by the time it
/// completes, and a plain write must leave it alone (which shows the count tells
/// the two apart). An engine that drops the flag fails here.
#[test]
fn dsync_writes_flush_the_device_cache_and_plain_writes_do_not() {
    let test = "dsync_writes_flush_the_device_cache_and_plain_writes_do_not";
    let Some(lo) = LoopDev::attach(test, MIB) else {
        return;
    };
    let disk = Disk::open(&lo.dev, DiskOptions::default()).unwrap();
    for mut engine in engines(&disk) {
        let name = engine.name();
        let before = lo.flushes();
        let c = run1(engine.as_mut(), write(&disk, 0, 4096, 1, 1));
        assert_eq!(c.result.unwrap(), 4096);
        assert_eq!(lo.flushes(), before, "{name}: a plain write flushed the cache");
        let mut op = write(&disk, 4096, 4096, 2, 2);
        op.kind = IoKind::Write { dsync: true };
        assert_eq!(run1(engine.as_mut(), op).result.unwrap(), 4096);
        assert!(
            lo.flushes() > before,
            "{name}: a dsync write completed without a cache flush"
        );
    }
}

fn zeroing_op_reads_back_zeros(name: &str, kind: IoKind) {
    each_engine(name, MIB, |disk, engine| {
        assert_eq!(run1(engine, write(disk, 0, 65536, 5, 0)).result.unwrap(), 65536);
        let c = run1(engine, range_op(kind, 16384, 16384, 1));
        assert_eq!(c.result.unwrap(), 16384, "{} {kind:?}", engine.name());
        let c = run1(engine, read(disk, 0, 65536, 2));
        let data = c.buf.as_slice();
        let expected: Vec<u8> = (0..65536).map(pattern(5)).collect();
        assert_eq!(&data[..16384], &expected[..16384]);
        assert!(
            data[16384..32768].iter().all(|&b| b == 0),
            "{} {kind:?}",
            engine.name()
        );
        assert_eq!(&data[32768..], &expected[32768..]);
        assert_eq!(std::fs::metadata(disk.path()).unwrap().len(), MIB, "size kept");
    });
}

#[test]
fn discard_reads_back_zeros() {
    zeroing_op_reads_back_zeros("discard", IoKind::Discard);
}

#[test]
fn write_zeroes_reads_back_zeros() {
    zeroing_op_reads_back_zeros("zeroes", IoKind::WriteZeroes);
}

#[test]
fn read_only_disk_refuses_writes_with_ebadf() {
    let path = image_path("ro");
    Disk::create_sparse(&path, MIB).unwrap();
    let disk = Disk::open(
        &path,
        DiskOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(disk.read_only());
    for mut engine in engines(&disk) {
        let c = run1(engine.as_mut(), write(&disk, 0, 4096, 1, 7));
        assert_eq!(c.user, 7);
        assert_eq!(errno(&c), Some(Errno::BADF), "{}: {:?}", engine.name(), c.result);
        let c = run1(engine.as_mut(), range_op(IoKind::WriteZeroes, 0, 4096, 8));
        assert_eq!(errno(&c), Some(Errno::BADF), "{}: {:?}", engine.name(), c.result);
        assert_eq!(
            run1(engine.as_mut(), read(&disk, 0, 4096, 9)).result.unwrap(),
            4096
        );
    }
    std::fs::remove_file(path).unwrap();
}

#[test]
fn unaligned_direct_io_fails_with_einval() {
    each_engine("unaligned", MIB, |disk, engine| {
        // Holes are read without any alignment check: allocate the blocks first.
        assert_eq!(run1(engine, write(disk, 0, 65536, 1, 0)).result.unwrap(), 65536);
        let c = run1(engine, read(disk, 100, 4096, 1));
        assert_eq!(
            errno(&c),
            Some(Errno::INVAL),
            "{} offset: {:?}",
            engine.name(),
            c.result
        );
        let c = run1(engine, read(disk, 0, 4096 + 100, 2));
        assert_eq!(
            errno(&c),
            Some(Errno::INVAL),
            "{} length: {:?}",
            engine.name(),
            c.result
        );
        if disk.mem_align() <= 16 {
            skip(
                "unaligned_direct_io_fails_with_einval (misaligned buffer)",
                format_args!(
                    "this disk's memory alignment {} is within malloc's 16: no buffer misses it",
                    disk.mem_align()
                ),
            );
            return;
        }
        // AlignedBuf with alignment 1 starts wherever malloc put it; keep allocating
        // until one misses the direct I/O alignment.
        let mut keep = Vec::new();
        let misaligned = loop {
            let b = AlignedBuf::new(4096, 1);
            if !b.is_aligned(disk.mem_align()) {
                break b;
            }
            keep.push(b);
            assert!(keep.len() < 1000, "malloc keeps returning aligned blocks");
        };
        let op = IoOp {
            kind: IoKind::Read,
            offset: 0,
            len: 0,
            buf: misaligned,
            user: 3,
        };
        let c = run1(engine, op);
        assert_eq!(
            errno(&c),
            Some(Errno::INVAL),
            "{} buffer: {:?}",
            engine.name(),
            c.result
        );
    });
}

#[test]
fn read_across_end_of_file_is_resubmitted_then_reported_short() {
    // The kernel returns the 4096 bytes before the end, then 0 for the remainder: the
    // engine resubmits the rest (boundedly) and reports the short count as final.
    each_engine("eof", MIB, |disk, engine| {
        let c = run1(engine, read(disk, MIB - 4096, 8192, 1));
        assert_eq!(c.result.unwrap(), 4096, "{}", engine.name());
    });
}

#[test]
fn out_of_range_offsets_are_rejected_not_wrapped() {
    each_engine("range", MIB, |disk, engine| {
        let c = run1(engine, read(disk, u64::MAX - 4095, 4096, 1));
        assert_eq!(errno(&c), Some(Errno::INVAL), "{}", engine.name());
        let c = run1(engine, range_op(IoKind::Discard, u64::MAX - 4095, 8192, 2));
        assert_eq!(errno(&c), Some(Errno::INVAL), "{}", engine.name());
    });
}

#[test]
fn ready_fd_fires_and_reap_never_blocks() {
    each_engine("readyfd", MIB, |disk, engine| {
        let mut out = Vec::new();
        assert_eq!(engine.reap(&mut out), 0);
        engine.submit(write(disk, 0, 4096, 1, 42));
        engine.commit().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.is_empty() {
            assert!(Instant::now() < deadline, "{}: no completion", engine.name());
            let n = {
                let fd = engine.ready_fd();
                let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
                let timeout = rustix::event::Timespec {
                    tv_sec: 10,
                    tv_nsec: 0,
                };
                rustix::event::poll(&mut fds, Some(&timeout)).unwrap()
            };
            assert_eq!(n, 1, "{}: ready_fd never became readable", engine.name());
            engine.ack_ready();
            engine.reap(&mut out);
        }
        assert_eq!(out[0].user, 42);
        assert_eq!(engine.in_flight(), 0);
    });
}

/// Sleeps in `poll(2)` on the engine's `ready_fd` for up to ten seconds; false if it
/// never became readable (a lost wake-up).
fn sleep_on_ready_fd(engine: &dyn Engine) -> bool {
    let fd = engine.ready_fd();
    let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
    let timeout = rustix::event::Timespec {
        tv_sec: 10,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&timeout)).unwrap() == 1
}

/// The queue worker's pattern, many times over: reap without blocking, and when
/// nothing is ready but ops are in flight, sleep on `ready_fd`. Every completion
/// must wake the sleeper however the kernel posts it: inline during submission,
/// while the thread is busy in user space (io_uring's cooperative task work, which
/// is not pushed into a running thread), or while it sleeps outside the ring.
#[test]
fn ready_fd_wakes_a_sleeping_reaper_for_every_batch() {
    each_engine("wakeups", MIB, |disk, engine| {
        const BATCH: u64 = 4;
        let mut out = Vec::new();
        for round in 0..64u64 {
            let write_round = round % 2 == 0;
            for k in 0..BATCH {
                let block = (round / 2 * BATCH + k) % (MIB / 4096);
                let user = round * BATCH + k;
                engine.submit(if write_round {
                    write(disk, block * 4096, 4096, user, user)
                } else {
                    read(disk, block * 4096, 4096, user)
                });
            }
            engine.commit().unwrap();
            // Busy for a moment, as a polling worker is, so completions may arrive
            // while the thread runs in user space.
            let spin = Instant::now();
            while spin.elapsed() < Duration::from_micros(20 * (round % 4)) {
                std::hint::spin_loop();
            }
            let mut got = 0;
            loop {
                got += engine.reap(&mut out);
                if engine.in_flight() == 0 {
                    break;
                }
                assert!(
                    sleep_on_ready_fd(engine),
                    "{}: round {round}: {} ops in flight and no wake-up",
                    engine.name(),
                    engine.in_flight()
                );
                engine.ack_ready();
            }
            assert_eq!(got as u64, BATCH, "{}: round {round}", engine.name());
            for c in out.drain(..) {
                assert_eq!(c.result.unwrap(), 4096, "{}: op {}", engine.name(), c.user);
                if !write_round {
                    // Read back what the previous round wrote there.
                    let expect = buf(disk, 4096, pattern(c.user - BATCH));
                    assert!(
                        c.buf.as_slice() == expect.as_slice(),
                        "{}: op {}",
                        engine.name(),
                        c.user
                    );
                }
            }
        }
    });
}

/// Dropping an engine while the kernel still performs its ops returns only once
/// they are done: from then on the file no longer changes, and no write was made
/// from a buffer the drop had already freed (each block is either untouched or the
/// whole pattern). io_uring hands every committed op to the kernel at once (64 ops,
/// 256 ring entries), so there all of them are complete when the drop returns; the
/// thread pool finishes the ops its workers hold and drops those still queued,
/// unperformed (nobody waits for them any more).
#[test]
fn dropping_an_engine_with_ops_in_flight_waits_for_them() {
    const OPS: u64 = 64;
    const LEN: usize = 65536;
    const SIZE: u64 = 8 * MIB;
    let (path, disk) = direct_image("drop", SIZE);
    let kinds = engines(&disk).len();
    drop(disk);
    std::fs::remove_file(&path).unwrap();
    for k in 0..kinds {
        let (path, disk) = direct_image("drop", SIZE);
        let mut engine = engines(&disk).swap_remove(k);
        let name = engine.name();
        for i in 0..OPS {
            engine.submit(write(&disk, i * LEN as u64, LEN, i, i));
        }
        engine.commit().unwrap();
        // Dropped without reaping.
        drop(engine);
        let at_drop = std::fs::read(&path).unwrap();
        // Anything still writing now would land after this: changing the file's size
        // waits for every direct I/O in flight on it (`inode_dio_wait` in ext4's
        // and xfs's setattr), and the size is put back.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(SIZE + 4096).unwrap();
        file.set_len(SIZE).unwrap();
        let settled = std::fs::read(&path).unwrap();
        assert!(
            at_drop == settled,
            "{name}: the file changed after the drop returned"
        );
        let mut performed = 0;
        for i in 0..OPS {
            let at = i as usize * LEN;
            let block = &at_drop[at..at + LEN];
            if block.iter().all(|&b| b == 0) {
                continue;
            }
            let expected: Vec<u8> = (0..LEN).map(pattern(i)).collect();
            assert!(
                block == &expected[..],
                "{name}: op {i} wrote neither nothing nor its data"
            );
            performed += 1;
        }
        if name == "io_uring" {
            assert_eq!(performed, OPS, "io_uring: every op the kernel had is complete");
        }
        drop(disk);
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn more_ops_than_ring_entries_all_complete() {
    let (path, disk) = direct_image("overcommit", 8 * MIB);
    if let Err(why) = UringEngine::probe() {
        skip(
            "more_ops_than_ring_entries_all_complete",
            format_args!("io_uring unavailable: {why}"),
        );
        return;
    }
    let mut engine = UringEngine::new(&disk, UringConfig { entries: 4 }).unwrap();
    let ops = (0..100).map(|i| write(&disk, i * 8192, 4096, i, i)).collect();
    let done = run(&mut engine, ops);
    assert_eq!(done.len(), 100);
    assert!(done.iter().all(|c| c.result.as_ref().is_ok_and(|&n| n == 4096)));
    std::fs::remove_file(path).unwrap();
}

/// Runs `f` on a fault engine over each engine kind.
fn each_fault_engine(name: &str, plan: FaultPlan, f: impl Fn(&Disk, &mut FaultEngine<Box<dyn Engine>>)) {
    let (path, disk) = direct_image(name, MIB);
    let kinds = engines(&disk).len();
    drop(disk);
    std::fs::remove_file(path).unwrap();
    for k in 0..kinds {
        let (path, disk) = direct_image(name, MIB);
        let inner = engines(&disk).swap_remove(k);
        let mut engine = FaultEngine::new(inner, plan.clone());
        f(&disk, &mut engine);
        drop(engine);
        std::fs::remove_file(path).unwrap();
    }
}

#[test]
fn fault_nth_write_fails_without_being_performed() {
    for errno_in in [Errno::IO, Errno::NOSPC] {
        let plan = FaultPlan::new().fail_write(2, errno_in);
        each_fault_engine("fault-write", plan, |disk, engine| {
            let done = run(
                engine,
                (0..3).map(|i| write(disk, i * 4096, 4096, 1, i)).collect(),
            );
            assert!(done[0].result.is_ok() && done[2].result.is_ok());
            assert_eq!(errno(&done[1]), Some(errno_in), "{}", engine.name());
            assert_eq!(engine.stats().injected, 1);
            let c = run1(engine, read(disk, 4096, 4096, 9));
            assert!(
                c.buf.as_slice().iter().all(|&b| b == 0),
                "failed write was performed"
            );
        });
    }
}

#[test]
fn fault_flush_fails_once_then_succeeds() {
    each_fault_engine(
        "fault-flush",
        FaultPlan::new().fail_flush_once(1),
        |disk, engine| {
            run1(engine, write(disk, 0, 4096, 1, 0)).result.unwrap();
            let first = run1(engine, range_op(IoKind::Flush, 0, 0, 1));
            assert_eq!(errno(&first), Some(Errno::IO));
            let second = run1(engine, range_op(IoKind::Flush, 0, 0, 2));
            assert_eq!(
                second.result.unwrap(),
                0,
                "{}: Linux reports a writeback error once",
                engine.name()
            );
        },
    );
}

#[test]
fn fault_short_read_reports_less_and_poisons_the_rest() {
    let plan = FaultPlan::new()
        .short(OpClass::Read, 1, 1024)
        .short(OpClass::Write, 1, 512);
    each_fault_engine("fault-short", plan, |disk, engine| {
        assert_eq!(run1(engine, write(disk, 0, 4096, 3, 0)).result.unwrap(), 3584);
        let c = run1(engine, read(disk, 0, 4096, 1));
        assert_eq!(c.result.unwrap(), 3072, "{}", engine.name());
        let expected: Vec<u8> = (0..3072).map(pattern(3)).collect();
        assert_eq!(&c.buf.as_slice()[..3072], &expected[..]);
        assert!(c.buf.as_slice()[3072..].iter().all(|&b| b == POISON));
        assert_eq!(
            run1(engine, read(disk, 0, 4096, 2)).result.unwrap(),
            4096,
            "only the 1st"
        );
    });
}

#[test]
fn fault_eagain_is_retried_within_the_bound() {
    let plan = FaultPlan::new()
        .eagain(OpClass::Write, 1, 3)
        .eagain(OpClass::Write, 2, 20);
    each_fault_engine("fault-eagain", plan, |disk, engine| {
        let c = run1(engine, write(disk, 0, 4096, 1, 0));
        assert_eq!(
            c.result.unwrap(),
            4096,
            "{}: transient EAGAIN is absorbed",
            engine.name()
        );
        assert_eq!(engine.stats().retries, 3);
        let c = run1(engine, write(disk, 4096, 4096, 1, 1));
        assert_eq!(errno(&c), Some(Errno::AGAIN), "{}: bounded", engine.name());
        assert_eq!(engine.stats().retries, 3 + 8);
        assert_eq!(engine.stats().injected, 2);
    });
}

/// A randomly generated op on a 256 KiB image, in 4 KiB units.
#[derive(Debug, Clone)]
enum Step {
    Write {
        block: u64,
        blocks: u64,
        seed: u64,
        dsync: bool,
    },
    Discard {
        block: u64,
        blocks: u64,
    },
    Zeroes {
        block: u64,
        blocks: u64,
    },
    Flush,
}

const BLOCKS: u64 = 64;
const BLOCK: u64 = 4096;

fn step() -> impl Strategy<Value = Step> {
    let range = (0..BLOCKS).prop_flat_map(|b| (Just(b), 1..=(BLOCKS - b).min(8)));
    prop_oneof![
        4 => (range.clone(), any::<u64>(), any::<bool>())
            .prop_map(|((block, blocks), seed, dsync)| Step::Write { block, blocks, seed, dsync }),
        1 => range.clone().prop_map(|(block, blocks)| Step::Discard { block, blocks }),
        1 => range.prop_map(|(block, blocks)| Step::Zeroes { block, blocks }),
        1 => Just(Step::Flush),
    ]
}

impl Step {
    fn range(&self) -> Option<std::ops::Range<u64>> {
        match *self {
            Step::Write { block, blocks, .. }
            | Step::Discard { block, blocks }
            | Step::Zeroes { block, blocks } => Some(block * BLOCK..(block + blocks) * BLOCK),
            Step::Flush => None,
        }
    }

    fn op(&self, disk: &Disk, user: u64) -> IoOp {
        let r = self.range().unwrap_or(0..0);
        match *self {
            Step::Write { seed, dsync, .. } => IoOp {
                kind: IoKind::Write { dsync },
                offset: r.start,
                len: 0,
                buf: buf(disk, (r.end - r.start) as usize, pattern(seed)),
                user,
            },
            Step::Discard { .. } => range_op(IoKind::Discard, r.start, r.end - r.start, user),
            Step::Zeroes { .. } => range_op(IoKind::WriteZeroes, r.start, r.end - r.start, user),
            Step::Flush => range_op(IoKind::Flush, 0, 0, user),
        }
    }

    fn apply(&self, model: &mut [u8]) {
        let Some(r) = self.range() else { return };
        let bytes = &mut model[r.start as usize..r.end as usize];
        match *self {
            Step::Write { seed, .. } => {
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = pattern(seed)(i);
                }
            }
            _ => bytes.fill(0),
        }
    }
}

/// Batches of up to 8 ops, in flight together; an op overlapping an earlier one of its
/// batch starts the next batch, so the outcome is defined.
fn batches(steps: &[Step]) -> Vec<Vec<Step>> {
    let mut out: Vec<Vec<Step>> = vec![Vec::new()];
    for s in steps {
        let last = out.last_mut().unwrap();
        let overlaps = last.iter().any(|o| match (o.range(), s.range()) {
            (Some(a), Some(b)) => a.start < b.end && b.start < a.end,
            _ => false,
        });
        if overlaps || last.len() == 8 {
            out.push(Vec::new());
        }
        out.last_mut().unwrap().push(s.clone());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn engines_agree_with_a_model_on_random_sequences(steps in prop::collection::vec(step(), 1..40)) {
        let mut model = vec![0u8; (BLOCKS * BLOCK) as usize];
        for s in &steps {
            s.apply(&mut model);
        }
        let mut contents = Vec::new();
        let (path, disk) = direct_image("prop", BLOCKS * BLOCK);
        let kinds = engines(&disk).len();
        drop(disk);
        std::fs::remove_file(path).unwrap();
        for k in 0..kinds {
            let (path, disk) = direct_image("prop", BLOCKS * BLOCK);
            let mut engine = engines(&disk).swap_remove(k);
            let mut user = 0;
            for batch in batches(&steps) {
                let ops = batch.iter().map(|s| { user += 1; s.op(&disk, user) }).collect();
                for c in run(engine.as_mut(), ops) {
                    prop_assert!(c.result.is_ok(), "{}: {:?}", engine.name(), c.result);
                }
            }
            drop(engine);
            let file = std::fs::read(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            prop_assert!(file == model, "engine {k} differs from the model");
            contents.push(file);
        }
        prop_assert!(contents.windows(2).all(|w| w[0] == w[1]));
    }
}

/// IOPS of `fio` doing what [`bench_randread_4k`] does (io_uring, `O_DIRECT`, 4 KiB
/// random reads) on the same file, or `None` if fio is missing or fails.
fn fio_randread(path: &std::path::Path, size: u64, qd: usize, secs: f64) -> Option<f64> {
    let out = std::process::Command::new("fio")
        .args([
            "--name=bench",
            "--ioengine=io_uring",
            "--direct=1",
            "--bs=4k",
            "--rw=randread",
        ])
        .args(["--time_based", "--output-format=terse", "--terse-version=3"])
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--size={size}"))
        .arg(format!("--iodepth={qd}"))
        .arg(format!("--runtime={}ms", (secs * 1000.0) as u64))
        .output()
        .ok()?;
    // Terse v3: the eighth field is the read IOPS.
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success().then_some(())?;
    text.lines().last()?.split(';').nth(7)?.parse().ok()
}

/// How the benchmark loop hands resubmissions to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// One commit per round of reaped completions (one `io_uring_enter` for all).
    PerRound,
    /// One commit per op, as fio does by default (`iodepth_batch_submit=1`): the
    /// disk starts on the first resubmission while the rest are prepared.
    PerOp,
}

/// One engine's 4 KiB random-read IOPS at queue depth `qd` for `duration`, in the
/// closed loop fio runs: wait for completions, resubmit each.
fn engine_randread(
    disk: &Disk,
    engine: &mut dyn Engine,
    qd: usize,
    commit: Commit,
    duration: Duration,
) -> f64 {
    let blocks = disk.size() / 4096;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * 4096
    };
    let mut issue = |engine: &mut dyn Engine, buf: AlignedBuf| {
        engine.submit(IoOp {
            kind: IoKind::Read,
            offset: next(),
            len: 0,
            buf,
            user: 0,
        });
    };
    for _ in 0..qd {
        issue(engine, AlignedBuf::new(4096, disk.mem_align()));
    }
    engine.commit().unwrap();
    let mut out = Vec::new();
    let mut ops = 0u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        engine.wait().unwrap();
        engine.reap(&mut out);
        for c in out.drain(..) {
            assert!(c.result.is_ok());
            ops += 1;
            issue(engine, c.buf);
            if commit == Commit::PerOp {
                engine.commit().unwrap();
            }
        }
        engine.commit().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    while engine.in_flight() > 0 {
        engine.wait().unwrap();
        engine.reap(&mut out);
        out.clear();
    }
    ops as f64 / secs
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// 4 KiB random reads at QD1 and QD32 per engine, committing per round of
/// completions and per op, alternated with fio on the same file (the disk is shared
/// and noisy: only same-run ratios mean much); prints the medians. A measurement, not a test: run with
/// `cargo test --release --test engines -- --ignored --nocapture bench`.
///
/// `VIO_BENCH_IMAGE` names an existing image to use (say, the one `vio blk-bench`
/// made) instead of writing a fresh 256 MiB one; `VIO_BENCH_REPS` sets the
/// repetitions (default 3), `VIO_BENCH_SECS` their length (default 2) and
/// `VIO_BENCH_ENGINE` picks one engine by name ("io_uring", "sync"), `VIO_BENCH_QD`
/// one queue depth, and `VIO_BENCH_FIO=0` skips fio.
#[test]
#[ignore = "benchmark"]
fn bench_randread_4k() {
    let env = |name: &str| std::env::var(name).ok();
    let reps: usize = env("VIO_BENCH_REPS").map_or(3, |r| r.parse().unwrap());
    let secs: f64 = env("VIO_BENCH_SECS").map_or(2.0, |r| r.parse().unwrap());
    let (path, fresh) = match env("VIO_BENCH_IMAGE") {
        Some(p) => (PathBuf::from(p), false),
        None => (image_path("bench"), true),
    };
    if fresh {
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0x5au8; MIB as usize];
        for _ in 0..256 {
            std::io::Write::write_all(&mut file, &chunk).unwrap();
        }
        file.sync_all().unwrap();
    }
    let disk = Disk::open(&path, DiskOptions::default()).unwrap();
    let only = env("VIO_BENCH_ENGINE");
    let chosen = |disk: &Disk| {
        let mut all = engines(disk);
        all.retain(|e| only.as_deref().is_none_or(|n| n == e.name()));
        all
    };
    let runs: Vec<(&str, Commit)> = chosen(&disk)
        .iter()
        .flat_map(|e| [(e.name(), Commit::PerRound), (e.name(), Commit::PerOp)])
        .collect();
    let depths = match env("VIO_BENCH_QD") {
        Some(qd) => vec![qd.parse().unwrap()],
        None => vec![1usize, 32],
    };
    let with_fio = env("VIO_BENCH_FIO").is_none_or(|f| f != "0");
    for qd in depths {
        let mut fio = Vec::new();
        let mut ours = vec![Vec::new(); runs.len()];
        for _ in 0..reps {
            if with_fio {
                fio.extend(fio_randread(&path, disk.size(), qd, secs));
            }
            for (k, &(_, commit)) in runs.iter().enumerate() {
                let mut engine = chosen(&disk).swap_remove(k / 2);
                let duration = Duration::from_secs_f64(secs);
                ours[k].push(engine_randread(&disk, engine.as_mut(), qd, commit, duration));
            }
        }
        let fio = (!fio.is_empty()).then(|| median(&mut fio));
        match fio {
            Some(f) => eprintln!("     fio QD{qd:<2} 4k randread: {f:>7.0} IOPS"),
            None => eprintln!("     fio QD{qd:<2} 4k randread: fio unavailable"),
        }
        for (&(name, commit), iops) in runs.iter().zip(&mut ours) {
            let iops = median(iops);
            let ratio = fio.map_or(String::new(), |f| format!(", {:.2}x fio", iops / f));
            let how = match commit {
                Commit::PerRound => "commit per round",
                Commit::PerOp => "commit per op",
            };
            eprintln!(
                "{name:>8} QD{qd:<2} 4k randread, {how:<16}: {iops:>7.0} IOPS (mean latency {:.1} us{ratio})",
                1e6 / iops * qd as f64
            );
        }
    }
    drop(disk);
    if fresh {
        std::fs::remove_file(path).unwrap();
    }
}
