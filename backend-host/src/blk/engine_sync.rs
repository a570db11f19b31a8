//! The fallback engine: a few threads doing blocking `pread`/`pwrite`.
//!
//! Used where io_uring is unavailable (disabled by `kernel.io_uring_disabled`, filtered
//! by seccomp, an old kernel). It keeps the [`Engine`] contract exactly: ops are queued
//! by [`Engine::submit`], started together by [`Engine::commit`], and announced through
//! an eventfd so [`Engine::ready_fd`] works like io_uring's.

// Every system call goes through rustix.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use rustix::fs::FallocateFlags;
use rustix::io::{Errno, ReadWriteFlags};
use virtio_core::notify::{EventFdNotifier, Notify, Wait};

use super::disk::{Disk, DiskFds};
use super::engine::{AlignedBuf, Completion, Engine, IoKind, IoOp};

/// How many times an op is retried after `EINTR`/`EAGAIN` or a transfer of zero bytes
/// before its completion reports the failure (the same bound io_uring uses).
pub const MAX_RETRIES: u32 = 8;

/// Size of the zero buffer used when `FALLOC_FL_ZERO_RANGE` is unsupported.
const ZERO_CHUNK: usize = 256 * 1024;

/// Default number of worker threads.
pub const DEFAULT_WORKERS: usize = 2;

/// State shared between the engine and its workers.
#[derive(Debug)]
struct Shared {
    disk: DiskFds,
    mem_align: usize,
    jobs: Mutex<Jobs>,
    jobs_ready: Condvar,
    done: Mutex<Vec<Completion>>,
    done_ready: Condvar,
    notifier: EventFdNotifier,
}

#[derive(Debug, Default)]
struct Jobs {
    queue: VecDeque<IoOp>,
    shutdown: bool,
}

/// A thread-pool engine over blocking system calls.
#[derive(Debug)]
pub struct SyncEngine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    staged: Vec<IoOp>,
    in_flight: usize,
}

/// A poisoned lock only means a worker panicked mid-op; the queues are still coherent
/// (every push and drain is a single call), so keep going.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SyncEngine {
    /// Starts `workers` threads (clamped to 1..=64) doing I/O on `disk`.
    pub fn new(disk: &Disk, workers: usize) -> io::Result<SyncEngine> {
        let notifier = EventFdNotifier::new().map_err(io::Error::other)?;
        let shared = Arc::new(Shared {
            disk: disk.fds()?,
            mem_align: disk.mem_align(),
            jobs: Mutex::new(Jobs::default()),
            jobs_ready: Condvar::new(),
            done: Mutex::new(Vec::new()),
            done_ready: Condvar::new(),
            notifier,
        });
        let mut engine = SyncEngine {
            shared,
            workers: Vec::new(),
            staged: Vec::new(),
            in_flight: 0,
        };
        for i in 0..workers.clamp(1, 64) {
            let shared = Arc::clone(&engine.shared);
            // On failure, `engine`'s Drop stops the workers already started.
            let handle = std::thread::Builder::new()
                .name(format!("blk-sync-{i}"))
                .spawn(move || worker(&shared))?;
            engine.workers.push(handle);
        }
        Ok(engine)
    }
}

impl Engine for SyncEngine {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn submit(&mut self, op: IoOp) {
        self.in_flight += 1;
        self.staged.push(op);
    }

    fn commit(&mut self) -> io::Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let n = self.staged.len();
        lock(&self.shared.jobs).queue.extend(self.staged.drain(..));
        if n == 1 {
            self.shared.jobs_ready.notify_one();
        } else {
            self.shared.jobs_ready.notify_all();
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut done = lock(&self.shared.done);
        let n = done.len();
        out.append(&mut done);
        self.in_flight -= n;
        n
    }

    fn wait(&mut self) -> io::Result<()> {
        // Staged ops never finish until committed; waiting for them would hang.
        self.commit()?;
        if self.in_flight == 0 {
            return Ok(());
        }
        let done = lock(&self.shared.done);
        let _done = self
            .shared
            .done_ready
            .wait_while(done, |d| d.is_empty())
            .unwrap_or_else(PoisonError::into_inner);
        Ok(())
    }

    fn ready_fd(&self) -> BorrowedFd<'_> {
        self.shared.notifier.as_fd()
    }

    fn ack_ready(&mut self) {
        if let Err(e) = self.shared.notifier.take() {
            tracing::warn!(error = %e, "could not drain the sync engine's eventfd");
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

impl Drop for SyncEngine {
    fn drop(&mut self) {
        lock(&self.shared.jobs).shutdown = true;
        self.shared.jobs_ready.notify_all();
        for handle in self.workers.drain(..) {
            // A worker that panicked has nothing left to clean up.
            let _ = handle.join();
        }
    }
}

fn worker(shared: &Shared) {
    let mut zeros = None;
    loop {
        let op = {
            let jobs = lock(&shared.jobs);
            let mut jobs = shared
                .jobs_ready
                .wait_while(jobs, |j| j.queue.is_empty() && !j.shutdown)
                .unwrap_or_else(PoisonError::into_inner);
            if jobs.shutdown {
                return;
            }
            match jobs.queue.pop_front() {
                Some(op) => op,
                None => continue,
            }
        };
        let mut op = op;
        let result = execute(&shared.disk, &mut op, &mut zeros, shared.mem_align);
        let completion = Completion {
            user: op.user,
            result,
            buf: op.buf,
        };
        let was_empty = {
            let mut done = lock(&shared.done);
            let was_empty = done.is_empty();
            done.push(completion);
            was_empty
        };
        shared.done_ready.notify_all();
        // One eventfd write per batch the reader has not yet drained: with the
        // ack-then-reap order of the Engine contract, a push onto a non-empty list is
        // covered by the notification of the push that made it non-empty.
        if was_empty && let Err(e) = shared.notifier.notify() {
            tracing::warn!(error = %e, "could not signal sync engine completion");
        }
    }
}

/// Runs one op to its final result.
fn execute(
    fds: &DiskFds,
    op: &mut IoOp,
    zeros: &mut Option<AlignedBuf>,
    mem_align: usize,
) -> io::Result<u64> {
    let offset = op.offset;
    let fd = fds.main.as_fd();
    match op.kind {
        IoKind::Read => {
            let len = len_u64(op.buf.len())?;
            check_range(offset, len)?;
            let fd = fds.for_transfer(offset, len);
            let buf = op.buf.as_mut_slice();
            transfer(buf.len(), |done| {
                rustix::io::pread(fd, &mut buf[done..], offset + len_u64(done)?)
            })
        }
        IoKind::Write { dsync } => {
            let len = len_u64(op.buf.len())?;
            check_range(offset, len)?;
            write_all(fds.for_transfer(offset, len), op.buf.as_slice(), offset, dsync)
        }
        IoKind::Flush => retry(|| rustix::fs::fdatasync(fd)).map(|()| 0),
        IoKind::Discard => {
            check_range(offset, op.len)?;
            let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            retry(|| rustix::fs::fallocate(fd, mode, offset, op.len)).map(|()| op.len)
        }
        IoKind::WriteZeroes => {
            check_range(offset, op.len)?;
            let mode = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
            match retry(|| rustix::fs::fallocate(fd, mode, offset, op.len)) {
                Err(e) if e.raw_os_error() == Some(Errno::OPNOTSUPP.raw_os_error()) => {
                    let zeros = zeros.get_or_insert_with(|| AlignedBuf::for_io(ZERO_CHUNK, mem_align));
                    write_zeros(fds.for_transfer(offset, op.len), zeros.as_slice(), offset, op.len)
                }
                other => other.map(|()| op.len),
            }
        }
    }
}

/// Writes `len` zero bytes at `offset` from a chunk of zeros.
fn write_zeros(fd: BorrowedFd<'_>, zeros: &[u8], offset: u64, len: u64) -> io::Result<u64> {
    let mut done = 0;
    while done < len {
        let chunk = usize::try_from(len - done).map_or(zeros.len(), |r| r.min(zeros.len()));
        let n = write_all(fd, &zeros[..chunk], offset + done, false)?;
        if n < len_u64(chunk)? {
            return Ok(done + n);
        }
        done += n;
    }
    Ok(done)
}

fn write_all(fd: BorrowedFd<'_>, buf: &[u8], offset: u64, dsync: bool) -> io::Result<u64> {
    let flags = if dsync {
        ReadWriteFlags::DSYNC
    } else {
        ReadWriteFlags::empty()
    };
    transfer(buf.len(), |done| {
        let at = offset + len_u64(done)?;
        if dsync {
            rustix::io::pwritev2(fd, &[io::IoSlice::new(&buf[done..])], at, flags)
        } else {
            rustix::io::pwrite(fd, &buf[done..], at)
        }
    })
}

/// Repeats `step(done)` until `len` bytes moved: short transfers continue where they
/// stopped; `EINTR`, `EAGAIN` and zero-byte transfers (end of file) are retried at most
/// [`MAX_RETRIES`] times, after which an error is returned, or the short count for a
/// transfer that stopped making progress.
fn transfer(len: usize, mut step: impl FnMut(usize) -> Result<usize, Errno>) -> io::Result<u64> {
    let mut done = 0;
    let mut retries = 0;
    while done < len {
        match step(done) {
            Ok(0) | Err(Errno::INTR | Errno::AGAIN) if retries < MAX_RETRIES => retries += 1,
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(len_u64(done)?)
}

fn retry(mut call: impl FnMut() -> Result<(), Errno>) -> io::Result<()> {
    let mut retries = 0;
    loop {
        match call() {
            Err(Errno::INTR | Errno::AGAIN) if retries < MAX_RETRIES => retries += 1,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// Rejects ranges past the kernel's `loff_t` (which would wrap into negative offsets).
fn check_range(offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if i64::try_from(end).is_ok() => Ok(()),
        _ => Err(Errno::INVAL.into()),
    }
}

fn len_u64(n: usize) -> Result<u64, Errno> {
    u64::try_from(n).map_err(|_| Errno::OVERFLOW)
}
