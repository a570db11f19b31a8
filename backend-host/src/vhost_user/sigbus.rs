//! SIGBUS from a guest memory file the frontend shrank, confined to its session
//! (HOSTILE 35). The only unsafe code of the vhost-user backend.
//!
//! By default the daemon maps only regular files sealed against shrinking, which
//! cannot raise SIGBUS this way. An operator may let unsealed files in
//! (`--allow-unsealed-memory`: /dev/shm or hugetlbfs files, DAX devices); then a
//! frontend that truncates its file turns the daemon's next access past the new
//! end into SIGBUS, which by default ends the process and every session in it.
//!
//! Why a signal handler, and not something else:
//! - checking before each access cannot work: the file can shrink between the
//!   check and the access;
//! - copying through `pread`/`pwrite` instead of mapping would turn the fault into
//!   EFAULT, but costs a system call per access on the hot path for everyone;
//! - a process per session would confine it, but `vio-host net` switches frames
//!   between ports in memory.
//!
//! So each mapping of an unsealed file is registered here, and a process-wide
//! SIGBUS handler looks the faulting address up. If a registered mapping holds
//! it, the handler maps anonymous zero pages over the whole mapping (`MAP_FIXED`,
//! same address and length), which makes the faulting access and every later one
//! succeed on private zeros, and signals the session's [`FaultSignal`]; the
//! daemon then ends that session with an error. Other sessions never notice. A
//! fault at any other address goes to the handler that was installed before
//! (Rust's own stack-overflow handler) or, if none, to the default action.
//!
//! Soundness: the faulting thread is inside an access to a mapping it holds alive
//! (every [`Region`] over a guarded mapping keeps the [`Guarded`] owner alive), and
//! a mapping is deregistered before it is unmapped. A slot whose range holds the
//! faulting address, read consistently (a sequence lock), therefore describes that
//! very mapping, still mapped: `MAP_FIXED` replaces only memory we own. Nothing in
//! the handler allocates or locks: atomics, `mmap(2)` and `write(2)` only
//! (`write` is async-signal-safe; `mmap` is one system call with no user-space
//! state in glibc). Replacing memory under a `Region` is within its contract:
//! regions are only ever accessed by raw copies and atomics, any bytes may appear.

// A signal handler and the jump out of a faulting access.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Once, OnceLock};
use virtio_core::shm::{Mapping, Region};

/// Guarded mappings at once, over every session of the process (eight regions a
/// table, a replaced table briefly beside its successor).
const SLOTS: usize = 256;

/// One registered mapping.
struct Slot {
    /// Odd while the slot is being written: a reader that sees the same even value
    /// before and after reading the fields read a consistent slot.
    seq: AtomicU64,
    start: AtomicUsize,
    /// 0: no mapping.
    len: AtomicUsize,
    /// The eventfd to signal.
    fd: AtomicI32,
    /// Owned by a [`SlotGuard`].
    claimed: AtomicBool,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            seq: AtomicU64::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            fd: AtomicI32::new(-1),
            claimed: AtomicBool::new(false),
        }
    }

    fn publish(&self, start: usize, len: usize, fd: i32) {
        self.seq.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.start.store(start, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.fd.store(fd, Ordering::Relaxed);
        self.seq.fetch_add(1, Ordering::Release);
    }

    /// `(start, len, fd)` if the slot holds a mapping and was read consistently.
    fn read(&self) -> Option<(usize, usize, i32)> {
        let before = self.seq.load(Ordering::Acquire);
        if before & 1 == 1 {
            return None;
        }
        let (start, len, fd) = (
            self.start.load(Ordering::Relaxed),
            self.len.load(Ordering::Relaxed),
            self.fd.load(Ordering::Relaxed),
        );
        fence(Ordering::Acquire);
        (len != 0 && self.seq.load(Ordering::Relaxed) == before).then_some((start, len, fd))
    }
}

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];

/// The handler that was installed before ours, for faults that are not ours.
static PREVIOUS: OnceLock<Previous> = OnceLock::new();

struct Previous(libc::sigaction);

// SAFETY: a `sigaction` is plain data (a handler address, a mask, flags); it is
// written once before it is shared and only read after.
unsafe impl Sync for Previous {}
// SAFETY: as for `Sync`.
unsafe impl Send for Previous {}

/// An eventfd a contained SIGBUS is reported on: one per `VhostMemory` that lets
/// unsealed files in.
#[derive(Debug, Clone)]
pub struct FaultSignal {
    fd: Arc<OwnedFd>,
}

impl FaultSignal {
    /// A fresh, unsignalled one.
    pub(crate) fn new() -> std::io::Result<FaultSignal> {
        use rustix::event::{EventfdFlags, eventfd};
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(FaultSignal { fd: Arc::new(fd) })
    }

    /// Readable once a fault was contained.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Whether a fault was contained since the last call; clears the signal.
    pub(crate) fn take(&self) -> bool {
        let mut count = [0u8; 8];
        rustix::io::read(&*self.fd, &mut count).is_ok_and(|n| n == 8)
    }
}

/// Owns a slot; frees it when dropped.
struct SlotGuard(&'static Slot);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.publish(0, 0, -1);
        self.0.claimed.store(false, Ordering::Release);
    }
}

/// What keeps a guarded mapping alive. Fields drop in order: the slot is freed
/// before the eventfd is closed and before the mapping is unmapped.
struct Guarded {
    _slot: SlotGuard,
    _signal: Arc<OwnedFd>,
    _mapping: Arc<Mapping>,
}

/// A region over all of `mapping` whose SIGBUS faults are contained and reported
/// on `signal`.
///
/// # Errors
/// Every slot is taken, or the handler cannot be installed.
pub(crate) fn guard(mapping: Arc<Mapping>, signal: &FaultSignal) -> std::io::Result<Region> {
    install()?;
    let whole = mapping.region();
    let start = whole.as_ptr() as usize;
    let len = mapping.len();
    let slot = TABLE
        .iter()
        .find(|s| {
            s.claimed
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        })
        .ok_or_else(|| std::io::Error::other("too many guarded memory regions"))?;
    slot.publish(start, len, signal.fd.as_raw_fd());
    let owner = Arc::new(Guarded {
        _slot: SlotGuard(slot),
        _signal: signal.fd.clone(),
        _mapping: mapping,
    });
    let base = NonNull::new(whole.as_ptr().cast_mut()).ok_or(std::io::ErrorKind::InvalidInput)?;
    // SAFETY: `[base, base + len)` is `mapping`, which `owner` keeps mapped (and
    // writable if `whole` is) for as long as the region lives; the handler only
    // ever replaces it with readable, writable zero pages at the same address. The
    // region is accessed like `whole` would be: raw copies and atomics only.
    Ok(unsafe { Region::from_raw(base, len, whole.is_writable(), owner) })
}

fn install() -> std::io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: a zeroed `sigaction` is a valid value (no handler, empty mask);
        // we fill in the fields that matter.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigbus as *const () as usize;
        // SA_ONSTACK: Rust gives every thread an alternate signal stack.
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: as above.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid `sigaction`s; the handler only does what
        // the module comment allows.
        if unsafe { libc::sigaction(libc::SIGBUS, &action, &mut previous) } != 0 {
            result = Err(std::io::Error::last_os_error());
            return;
        }
        let _ = PREVIOUS.set(Previous(previous));
    });
    result
}

/// The SIGBUS handler.
extern "C" fn on_sigbus(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid `siginfo_t`; for SIGBUS
    // `si_addr` is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    if contain(addr) {
        return;
    }
    match PREVIOUS.get().map(|p| &p.0) {
        Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
            if p.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO, so its
                // address is a three-argument handler; we pass what we were given.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
                    unsafe { std::mem::transmute(p.sa_sigaction) };
                f(signal, info, context);
            } else {
                // SAFETY: without SA_SIGINFO the address is a one-argument handler.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(p.sa_sigaction) };
                f(signal);
            }
        }
        _ => {
            // The default action: restore it and return; the access faults again
            // and the kernel ends the process as it would have without us.
            // SAFETY: a zeroed `sigaction` is SIG_DFL with an empty mask.
            let mut default: libc::sigaction = unsafe { std::mem::zeroed() };
            default.sa_sigaction = libc::SIG_DFL;
            // SAFETY: a valid `sigaction`; sigaction(2) is async-signal-safe.
            unsafe { libc::sigaction(signal, &default, std::ptr::null_mut()) };
        }
    }
}

/// If a guarded mapping holds `addr`, replaces it with zero pages, signals its
/// session and returns `true`.
fn contain(addr: usize) -> bool {
    for slot in &TABLE {
        let Some((start, len, fd)) = slot.read() else {
            continue;
        };
        if addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: `[start, start + len)` is a guarded mapping the faulting thread
        // holds alive (module comment): replacing it replaces only our own memory,
        // with memory that stays readable and writable at the same address.
        let zeroes = unsafe {
            libc::mmap(
                start as *mut c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if zeroes == libc::MAP_FAILED {
            return false;
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: `fd` is the session's eventfd, kept open by the mapping's owner
        // while the slot holds it; `one` is 8 readable bytes.
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
        return true;
    }
    false
}
