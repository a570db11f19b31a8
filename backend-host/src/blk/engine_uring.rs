//! The io_uring engine: one ring per queue, one `io_uring_enter` per batch.
//!
//! Each op lives in a slot of the in-flight table from [`Engine::submit`] until its
//! final completion is reaped; the slot's tag ([`Tags`]) is the SQE's `user_data`. The op's buffer
//! is what the kernel reads or writes, so the slot — not the caller — owns it the whole
//! time (this is the one invariant the `unsafe` SQE push relies on, see
//! `UringEngine::push_sqe`). Short transfers and `-EAGAIN` are resubmitted from where
//! they stopped, at most [`MAX_RETRIES`] times, so a completion is final.
//!
//! The disk descriptor is registered as fixed file 0, which saves the per-op file
//! reference counting, and an eventfd is registered so [`Engine::ready_fd`] fires when
//! a CQE is posted.

// Pushing an SQE whose buffer the engine keeps alive until its completion.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};
use rustix::fs::FallocateFlags;
use rustix::io::{Errno, ReadWriteFlags};
use virtio_core::notify::{EventFdNotifier, Notify, Wait};

use super::disk::{Disk, DiskFds};
use super::engine::{AlignedBuf, Completion, Engine, IoKind, IoOp, Tags};
use super::engine_sync::{DEFAULT_WORKERS, SyncEngine};

/// Resubmissions allowed per op (short transfers and `-EAGAIN` together) before its
/// completion reports what happened so far.
pub const MAX_RETRIES: u32 = 8;

/// Default submission-queue size.
pub const DEFAULT_ENTRIES: u32 = 256;

/// Size of the zero buffer used when `FALLOC_FL_ZERO_RANGE` is unsupported.
const ZERO_CHUNK: usize = 256 * 1024;

/// The fixed-file index of the disk.
const DISK: types::Fixed = types::Fixed(0);

/// The fixed-file index of the disk's buffered fallback, registered only when the
/// disk has one (see [`DiskFds`]).
const FALLBACK: types::Fixed = types::Fixed(1);

/// The opcodes this engine issues, checked by [`UringEngine::probe`].
const OPCODES: [(u8, &str); 4] = [
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
];

/// Why io_uring cannot be used; the caller falls back to [`SyncEngine`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineUnavailable {
    /// `io_uring_setup` returned `EPERM`: disabled by `kernel.io_uring_disabled` (its
    /// value is given when readable) or by a seccomp/LSM policy.
    #[error("io_uring is disabled (kernel.io_uring_disabled = {sysctl:?})")]
    Disabled {
        /// The sysctl's value, if it could be read.
        sysctl: Option<u8>,
    },
    /// `io_uring_setup` returned `ENOSYS`: the kernel has no io_uring.
    #[error("The kernel does not provide io_uring")]
    NotSupported,
    /// The kernel's io_uring lacks an opcode this engine needs.
    #[error("The kernel's io_uring lacks the {opcode} opcode")]
    MissingOpcode {
        /// The opcode's name.
        opcode: &'static str,
    },
    /// Any other failure setting the ring up.
    #[error("Could not set up io_uring ({step})")]
    Setup {
        /// What was being done.
        step: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl EngineUnavailable {
    fn from_setup(source: io::Error) -> EngineUnavailable {
        match source.raw_os_error() {
            Some(e) if e == Errno::PERM.raw_os_error() => EngineUnavailable::Disabled {
                sysctl: std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                    .ok()
                    .and_then(|s| s.trim().parse().ok()),
            },
            Some(e) if e == Errno::NOSYS.raw_os_error() => EngineUnavailable::NotSupported,
            _ => EngineUnavailable::Setup {
                step: "io_uring_setup",
                source,
            },
        }
    }
}

/// Configuration of one ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringConfig {
    /// Submission-queue entries (the kernel rounds up to a power of two); the
    /// completion queue is twice as large, which bounds the ops in the kernel at once.
    pub entries: u32,
}

impl Default for UringConfig {
    fn default() -> Self {
        UringConfig {
            entries: DEFAULT_ENTRIES,
        }
    }
}

/// An op in the in-flight table.
#[derive(Debug)]
struct Slot {
    op: IoOp,
    /// Bytes transferred (reads, writes) or zeroed (write-zeroes fallback) so far.
    done: u64,
    retries: u32,
    /// `FALLOC_FL_ZERO_RANGE` was refused; zeros are being written instead.
    zero_fill: bool,
}

/// What to do with a slot after its CQE.
enum Next {
    Finish(io::Result<u64>),
    Resubmit,
}

/// An [`Engine`] on one io_uring instance.
pub struct UringEngine {
    ring: IoUring,
    /// Keeps the registered files open for as long as the ring may use them, and
    /// decides which one a transfer uses.
    fds: DiskFds,
    notifier: EventFdNotifier,
    mem_align: usize,
    slots: Tags<Slot>,
    /// Slots waiting for SQ space or a commit, in order.
    pending: VecDeque<u64>,
    /// Final completions not yet handed out.
    ready: Vec<Completion>,
    /// SQEs pushed whose CQE has not been reaped; kept at most the CQ size so the CQ
    /// never overflows.
    in_kernel: usize,
    cq_capacity: usize,
    /// Zeros for the write-zeroes fallback; lives (and stays put) as long as the ring.
    zeros: Option<AlignedBuf>,
    /// Scratch space for reaped CQEs.
    cqes: Vec<cqueue::Entry>,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("in_flight", &self.in_flight())
            .field("in_kernel", &self.in_kernel)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl UringEngine {
    /// Checks that io_uring works here and supports every opcode this engine issues.
    pub fn probe() -> Result<(), EngineUnavailable> {
        let ring = IoUring::new(2).map_err(EngineUnavailable::from_setup)?;
        check_opcodes(&ring)
    }

    /// Sets up a ring doing I/O on `disk`.
    pub fn new(disk: &Disk, config: UringConfig) -> Result<UringEngine, EngineUnavailable> {
        let setup = |step| move |source| EngineUnavailable::Setup { step, source };
        let entries = config.entries.clamp(1, 4096);
        // SUBMIT_ALL (5.18): an SQE that fails early gets its own error CQE instead of
        // stopping the batch, so every pushed SQE is answered by exactly one CQE.
        // COOP_TASKRUN (5.19): completions are not pushed into a busy worker with an
        // interrupt; they run at its next kernel entry. TASKRUN_FLAG tells a polling
        // worker when that is due (see `drain_cq`), so nothing waits. Measured with
        // `vio blk-bench` (QD32 random reads, polling worker), leaving both out cost
        // 10-30 %; a thread sleeping in poll(2) on the eventfd is still woken (the
        // `ready_fd_wakes_a_sleeping_reaper_for_every_batch` test).
        //
        // Not DEFER_TASKRUN (6.1), which fio 3.33 sets: it requires SINGLE_ISSUER,
        // which lets only one thread ever enter the ring (others get EEXIST), while
        // the device builds engines on the caller's thread and may run its workers
        // on a multi-threaded tokio runtime that moves them between threads. It
        // gained nothing measurable in either benchmark here.
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(2))
            .setup_submit_all()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(entries)
            .map_err(EngineUnavailable::from_setup)?;
        check_opcodes(&ring)?;
        let fds = disk.fds().map_err(setup("dup"))?;
        let files: Vec<_> = std::iter::once(&fds.main)
            .chain(&fds.fallback)
            .map(AsRawFd::as_raw_fd)
            .collect();
        ring.submitter()
            .register_files(&files)
            .map_err(setup("register_files"))?;
        let notifier = EventFdNotifier::new().map_err(|e| EngineUnavailable::Setup {
            step: "eventfd",
            source: io::Error::other(e),
        })?;
        ring.submitter()
            .register_eventfd(notifier.as_raw_fd())
            .map_err(setup("register_eventfd"))?;
        let mut ring = ring;
        let cq_capacity = ring.completion().capacity();
        Ok(UringEngine {
            ring,
            fds,
            notifier,
            mem_align: disk.mem_align(),
            slots: Tags::default(),
            pending: VecDeque::new(),
            ready: Vec::new(),
            in_kernel: 0,
            cq_capacity,
            zeros: None,
            cqes: Vec::with_capacity(cq_capacity),
        })
    }

    /// Completes an op without the kernel (a request the engine can reject itself), and
    /// raises the readiness signal so an event loop notices.
    fn finish_now(&mut self, op: IoOp, result: io::Result<u64>) {
        self.ready.push(Completion {
            user: op.user,
            result,
            buf: op.buf,
        });
        if let Err(e) = self.notifier.notify() {
            tracing::warn!(error = %e, "could not signal io_uring engine completion");
        }
    }

    /// Builds the SQE for the next step of slot `idx` (`None` if the slot is empty).
    fn sqe_for(&mut self, idx: u64) -> Option<squeue::Entry> {
        let zeros_ptr = match &self.zeros {
            Some(z) => z.as_slice().as_ptr(),
            None => std::ptr::null(),
        };
        let zeros_len = self.zeros.as_ref().map_or(0, AlignedBuf::len);
        let slot = self.slots.get_mut(idx)?;
        let done = slot.done;
        let op = &mut slot.op;
        let at = op.offset + done;
        let user_data = idx;
        let rest = |len: usize| u32::try_from(len).unwrap_or(u32::MAX);
        let fds = &self.fds;
        let file = |at: u64, len: usize| {
            if fds.misaligned(at, u64_of(len)) {
                FALLBACK
            } else {
                DISK
            }
        };
        let entry = match op.kind {
            IoKind::Read => {
                let buf = &mut op.buf.as_mut_slice()[usize_of(done)..];
                opcode::Read::new(file(at, buf.len()), buf.as_mut_ptr(), rest(buf.len()))
                    .offset(at)
                    .build()
            }
            IoKind::Write { dsync } => {
                let buf = &op.buf.as_slice()[usize_of(done)..];
                let flags = if dsync { ReadWriteFlags::DSYNC.bits() } else { 0 };
                opcode::Write::new(file(at, buf.len()), buf.as_ptr(), rest(buf.len()))
                    .offset(at)
                    .rw_flags(i32::try_from(flags).unwrap_or(0))
                    .build()
            }
            IoKind::Flush => opcode::Fsync::new(DISK)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoKind::Discard => {
                let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                fallocate(op.offset, op.len, mode)
            }
            IoKind::WriteZeroes if slot.zero_fill => {
                let chunk = usize::try_from(op.len - done).map_or(zeros_len, |r| r.min(zeros_len));
                opcode::Write::new(file(at, chunk), zeros_ptr, rest(chunk))
                    .offset(at)
                    .build()
            }
            IoKind::WriteZeroes => {
                let mode = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
                fallocate(op.offset, op.len, mode)
            }
        };
        Some(entry.user_data(user_data))
    }

    /// Moves pending slots into the SQ while it and the CQ budget have room.
    fn fill_sq(&mut self) {
        while self.in_kernel < self.cq_capacity {
            let Some(&idx) = self.pending.front() else { break };
            let Some(entry) = self.sqe_for(idx) else {
                tracing::error!(idx, "pending io_uring slot is empty");
                self.pending.pop_front();
                continue;
            };
            if !self.push_sqe(&entry) {
                break;
            }
            self.pending.pop_front();
            self.in_kernel += 1;
        }
    }

    /// Pushes one SQE; false if the SQ is full.
    fn push_sqe(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: every SQE built by `sqe_for` points either into the buffer of the op
        // in the slot of `self.slots` under `user_data`, or into `self.zeros`. That slot is owned by the
        // in-flight table until `drain_cq` reaps this SQE's CQE: nothing takes the op
        // out, replaces its buffer or touches its bytes before then (moving the `Slot`
        // when `slots` grows does not move the buffer's heap storage). `self.zeros` is
        // never replaced once created, and `Drop` waits for every CQE before the
        // buffers are freed. The fds are registered fixed files 0 and 1, kept open by
        // `self.fds`.
        unsafe { self.ring.submission().push(entry).is_ok() }
    }

    /// Handles every posted CQE: final results go to `ready`, retries to `pending`.
    fn drain_cq(&mut self) {
        if self.ring.submission().taskrun() {
            // Completions are waiting as task work: any kernel entry runs them.
            if let Err(e) = self.ring.submit() {
                tracing::debug!(error = %e, "io_uring_enter to run completions failed");
            }
        }
        // A reused scratch vector: the CQ borrows the ring, the handling needs it too.
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion());
        for cqe in cqes.drain(..) {
            self.in_kernel = self.in_kernel.saturating_sub(1);
            let idx = cqe.user_data();
            match self.after_cqe(idx, cqe.result()) {
                Some(Next::Finish(result)) => {
                    if let Some(slot) = self.slots.take(idx) {
                        let op = slot.op;
                        self.ready.push(Completion {
                            user: op.user,
                            result,
                            buf: op.buf,
                        });
                    }
                }
                Some(Next::Resubmit) => self.pending.push_back(idx),
                None => tracing::error!(idx, "CQE for an empty io_uring slot"),
            }
        }
        self.cqes = cqes;
    }

    /// Decides the fate of slot `idx` given its CQE result.
    fn after_cqe(&mut self, idx: u64, res: i32) -> Option<Next> {
        let slot = self.slots.get_mut(idx)?;
        let op = &slot.op;
        let total = match op.kind {
            IoKind::Read | IoKind::Write { .. } => u64_of(op.buf.len()),
            IoKind::Flush => 0,
            IoKind::Discard | IoKind::WriteZeroes => op.len,
        };
        let retry = |slot: &mut Slot, result: io::Result<u64>| {
            slot.retries += 1;
            if slot.retries > MAX_RETRIES {
                Next::Finish(result)
            } else {
                Next::Resubmit
            }
        };
        Some(match (op.kind, res) {
            (_, r) if r == -Errno::AGAIN.raw_os_error() || r == -Errno::INTR.raw_os_error() => {
                retry(slot, Err(Errno::from_raw_os_error(-r).into()))
            }
            (IoKind::WriteZeroes, r) if r == -Errno::OPNOTSUPP.raw_os_error() && !slot.zero_fill => {
                slot.zero_fill = true;
                if self.zeros.is_none() {
                    self.zeros = Some(AlignedBuf::for_io(ZERO_CHUNK, self.mem_align));
                }
                Next::Resubmit
            }
            (_, r) if r < 0 => Next::Finish(Err(Errno::from_raw_os_error(-r).into())),
            (IoKind::Flush, _) => Next::Finish(Ok(0)),
            (IoKind::Discard | IoKind::WriteZeroes, _) if !slot.zero_fill => Next::Finish(Ok(total)),
            (_, r) => {
                let n = u64::from(r.unsigned_abs());
                slot.done += n;
                if slot.done >= total {
                    Next::Finish(Ok(slot.done))
                } else if slot.zero_fill && n > 0 {
                    // The zero fallback writes chunk by chunk; a full chunk is no retry.
                    Next::Resubmit
                } else {
                    // A short transfer (or none, at end of file): continue from where
                    // it stopped, boundedly, then report the short count.
                    let done = slot.done;
                    retry(slot, Ok(done))
                }
            }
        })
    }

    /// One `io_uring_enter` for everything in the SQ; on `EBUSY`/`EAGAIN` (the kernel
    /// wants completions reaped first) reap and retry, boundedly.
    fn enter(&mut self, want: usize) -> io::Result<()> {
        let mut busy = 0;
        loop {
            self.fill_sq();
            let result = if want > 0 {
                self.ring.submit_and_wait(want)
            } else {
                self.ring.submit()
            };
            match result {
                Ok(_) => {
                    // Go round again only to start pending ops that fit now that the
                    // kernel consumed the SQ.
                    let more = want == 0
                        && !self.pending.is_empty()
                        && self.in_kernel < self.cq_capacity
                        && self.ring.submission().is_empty();
                    if !more {
                        return Ok(());
                    }
                }
                Err(e) if e.raw_os_error() == Some(Errno::INTR.raw_os_error()) => {}
                Err(e)
                    if (e.raw_os_error() == Some(Errno::BUSY.raw_os_error())
                        || e.raw_os_error() == Some(Errno::AGAIN.raw_os_error()))
                        && busy < MAX_RETRIES =>
                {
                    busy += 1;
                    self.drain_cq();
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Engine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn submit(&mut self, op: IoOp) {
        let len = match op.kind {
            IoKind::Read | IoKind::Write { .. } => u64_of(op.buf.len()),
            IoKind::Flush => 0,
            IoKind::Discard | IoKind::WriteZeroes => op.len,
        };
        // The kernel takes `loff_t` offsets and 32-bit lengths per SQE.
        let end = op.offset.checked_add(len).filter(|&e| i64::try_from(e).is_ok());
        if end.is_none() || u32::try_from(op.buf.len()).is_err() {
            self.finish_now(op, Err(Errno::INVAL.into()));
            return;
        }
        let slot = Slot {
            op,
            done: 0,
            retries: 0,
            zero_fill: false,
        };
        let idx = self.slots.insert(slot);
        self.pending.push_back(idx);
    }

    fn commit(&mut self) -> io::Result<()> {
        if self.pending.is_empty() && self.ring.submission().is_empty() {
            return Ok(());
        }
        self.enter(0)
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        self.drain_cq();
        if !self.pending.is_empty() {
            // Resubmissions, and ops that waited for CQ room.
            if let Err(e) = self.enter(0) {
                tracing::warn!(error = %e, "io_uring resubmission failed; retrying later");
            }
        }
        let n = self.ready.len();
        out.append(&mut self.ready);
        n
    }

    fn wait(&mut self) -> io::Result<()> {
        loop {
            self.drain_cq();
            if !self.ready.is_empty() || self.in_kernel == 0 && self.pending.is_empty() {
                return Ok(());
            }
            let want = usize::from(self.in_kernel > 0 || !self.pending.is_empty());
            self.enter(want)?;
        }
    }

    fn ready_fd(&self) -> BorrowedFd<'_> {
        self.notifier.as_fd()
    }

    fn ack_ready(&mut self) {
        if let Err(e) = self.notifier.take() {
            tracing::warn!(error = %e, "could not drain the io_uring eventfd");
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() + self.ready.len()
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The kernel may still write into buffers of ops in flight: wait for every CQE
        // before the slots are freed. If waiting fails, leak the buffers instead.
        self.pending.clear();
        while self.in_kernel > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(Errno::INTR.raw_os_error()) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring teardown failed; leaking buffers");
                    std::mem::forget(std::mem::take(&mut self.slots));
                    std::mem::forget(self.zeros.take());
                    return;
                }
            }
            let n = self.ring.completion().count();
            self.in_kernel = self.in_kernel.saturating_sub(n);
        }
    }
}

/// Chooses io_uring when it works here, otherwise the thread pool, and logs the choice.
///
/// Fails only if neither engine can be created (out of file descriptors or threads).
pub fn best_engine(disk: &Disk, depth: u32) -> io::Result<Box<dyn Engine>> {
    match UringEngine::new(disk, UringConfig { entries: depth }) {
        Ok(engine) => {
            tracing::info!(path = %disk.path().display(), depth, "block engine: io_uring");
            Ok(Box::new(engine))
        }
        Err(why) => {
            tracing::info!(
                path = %disk.path().display(), reason = %why,
                "block engine: sync thread pool (io_uring unavailable)"
            );
            Ok(Box::new(SyncEngine::new(disk, DEFAULT_WORKERS)?))
        }
    }
}

fn check_opcodes(ring: &IoUring) -> Result<(), EngineUnavailable> {
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|source| EngineUnavailable::Setup {
            step: "register_probe",
            source,
        })?;
    match OPCODES.iter().find(|(code, _)| !probe.is_supported(*code)) {
        Some(&(_, opcode)) => Err(EngineUnavailable::MissingOpcode { opcode }),
        None => Ok(()),
    }
}

fn fallocate(offset: u64, len: u64, mode: FallocateFlags) -> squeue::Entry {
    let mode = i32::try_from(mode.bits()).unwrap_or(0);
    opcode::Fallocate::new(DISK, len)
        .offset(offset)
        .mode(mode)
        .build()
}

/// Buffer lengths are checked to fit in `u32` at submit, so these cannot saturate.
fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn u64_of(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}
