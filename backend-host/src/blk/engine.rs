//! The execution-engine seam: what the block device asks of whatever runs its I/O.
//!
//! The device turns each validated request into [`IoOp`]s, hands them to an
//! [`Engine`] (io_uring, a thread pool, or a fault-injecting wrapper around either)
//! and later reaps [`Completion`]s. Every op owns its buffer ([`AlignedBuf`]) until its
//! completion is reaped: nothing is freed or reused while the kernel may still write
//! into it. Engines resubmit short transfers and `EAGAIN` themselves, with a bound, so
//! a completion is final.

use std::os::fd::BorrowedFd;

/// What an op does to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read,
    /// Write `buf.len()` bytes from `buf` at `offset`; with `dsync`, durable at
    /// completion (`RWF_DSYNC`, for writethrough mode).
    Write {
        /// Complete only once the data is on stable storage.
        dsync: bool,
    },
    /// `fdatasync` the whole disk; `offset` and `len` are ignored.
    Flush,
    /// Deallocate `[offset, offset + len)` (punch a hole; reads return zeros).
    Discard,
    /// Make `[offset, offset + len)` read as zeros (zero-range).
    WriteZeroes,
}

/// The lowest tag bit the device never uses: bits from here up are for engines
/// that wrap another (fault injectors, seeded-bug engines) to mark their own ops.
pub const TAG_RESERVED: u64 = 1 << 56;

/// A heap buffer whose start is aligned for direct I/O.
///
/// Over-allocates by the alignment and starts at the first aligned byte, which keeps
/// it free of unsafe code.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

/// The alignment of buffers for disk transfers ([`AlignedBuf::for_io`]): a page.
pub const IO_BUF_ALIGN: usize = 4096;

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes for a disk transfer: it starts on a page
    /// boundary, or at `disk_align` if the disk needs more. The kernel accepts
    /// less for direct I/O (ext4 reports 512 bytes or fewer), but a 4 KiB buffer
    /// that starts mid-page spans two pages, so each request pins one page more
    /// and reaches the disk as one more segment: during `vio vhost-bench` at QD32,
    /// `/sys/block/vda/stat` showed the disk serving about a quarter fewer 4 KiB
    /// random reads per second at the same queue depth.
    pub fn for_io(len: usize, disk_align: usize) -> AlignedBuf {
        AlignedBuf::new(len, disk_align.max(IO_BUF_ALIGN))
    }

    /// A zeroed buffer of `len` bytes starting at a multiple of `align` (a power of two).
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let align = align.max(1);
        let storage = vec![0u8; len + align];
        let start = storage.as_ptr().align_offset(align).min(align);
        AlignedBuf { storage, start, len }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    /// Whether the start is aligned to `align`.
    pub fn is_aligned(&self, align: usize) -> bool {
        self.as_slice().as_ptr().align_offset(align.max(1)) == 0
    }
}

/// One unit of work for an engine.
#[derive(Debug)]
pub struct IoOp {
    /// What to do.
    pub kind: IoKind,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length for `Discard` and `WriteZeroes` (reads and writes use `buf.len()`).
    pub len: u64,
    /// The data buffer (empty for `Flush`, `Discard`, `WriteZeroes`).
    pub buf: AlignedBuf,
    /// The caller's tag, returned in the completion. The device's tags stay below
    /// [`TAG_RESERVED`]; engines that wrap another may mark ops with the bits above.
    pub user: u64,
}

/// The final outcome of an op.
#[derive(Debug)]
pub struct Completion {
    /// The op's `user` tag.
    pub user: u64,
    /// Bytes transferred, or the error after bounded retries.
    pub result: Result<u64, std::io::Error>,
    /// The op's buffer, handed back (filled, for reads).
    pub buf: AlignedBuf,
}

/// Runs block I/O against one open disk.
pub trait Engine: Send {
    /// A short name for logs and tables ("io_uring", "sync").
    fn name(&self) -> &'static str;

    /// Queues an op. It may not start until [`Engine::commit`].
    fn submit(&mut self, op: IoOp);

    /// Starts everything queued since the last commit (one `io_uring_enter` per batch,
    /// so a guest kick with many requests costs one system call).
    fn commit(&mut self) -> std::io::Result<()>;

    /// Moves finished ops into `out`; returns how many. Never blocks.
    fn reap(&mut self, out: &mut Vec<Completion>) -> usize;

    /// Blocks until at least one op finishes or nothing is in flight.
    fn wait(&mut self) -> std::io::Result<()>;

    /// A file descriptor that becomes readable when completions are ready, for
    /// registering with an event loop (tokio `AsyncFd`); after it fires, drain it with
    /// [`Engine::ack_ready`] and call [`Engine::reap`].
    fn ready_fd(&self) -> BorrowedFd<'_>;

    /// Consumes the readiness signal of [`Engine::ready_fd`].
    fn ack_ready(&mut self);

    /// Ops submitted and not yet reaped.
    fn in_flight(&self) -> usize;
}

/// Boxed engines are engines, so the choice of [`best_engine`] can be wrapped.
///
/// [`best_engine`]: super::engine_uring::best_engine
impl<E: Engine + ?Sized> Engine for Box<E> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn submit(&mut self, op: IoOp) {
        (**self).submit(op);
    }

    fn commit(&mut self) -> std::io::Result<()> {
        (**self).commit()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        (**self).reap(out)
    }

    fn wait(&mut self) -> std::io::Result<()> {
        (**self).wait()
    }

    fn ready_fd(&self) -> BorrowedFd<'_> {
        (**self).ready_fd()
    }

    fn ack_ready(&mut self) {
        (**self).ack_ready();
    }

    fn in_flight(&self) -> usize {
        (**self).in_flight()
    }
}

/// What an engine wrapper remembers per op it passed down, under the tag it gave
/// the inner engine: a slab whose freed tags are reused, so tags stay small and the
/// table does not grow past the ops in flight.
#[derive(Debug)]
pub struct Tags<T> {
    entries: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Tags<T> {
    fn default() -> Self {
        Tags {
            entries: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Tags<T> {
    /// Stores `t`; returns its tag.
    pub fn insert(&mut self, t: T) -> u64 {
        let idx = match self.free.pop() {
            Some(idx) => {
                self.entries[idx] = Some(t);
                idx
            }
            None => {
                self.entries.push(Some(t));
                self.entries.len() - 1
            }
        };
        idx as u64
    }

    /// The entry under `tag`, if there is one.
    pub fn get_mut(&mut self, tag: u64) -> Option<&mut T> {
        let idx = usize::try_from(tag).ok()?;
        self.entries.get_mut(idx)?.as_mut()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the entry under `tag` out, freeing the tag.
    pub fn take(&mut self, tag: u64) -> Option<T> {
        let idx = usize::try_from(tag).ok()?;
        let t = self.entries.get_mut(idx)?.take()?;
        self.free.push(idx);
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::Tags;

    #[test]
    fn tags_are_reused_and_unknown_tags_are_none() {
        let mut t = Tags::default();
        let (a, b) = (t.insert('a'), t.insert('b'));
        assert_ne!(a, b);
        assert_eq!(t.take(a), Some('a'));
        assert_eq!(t.take(a), None, "taken once");
        assert_eq!(t.insert('c'), a, "a freed tag is reused");
        assert_eq!(t.get_mut(b), Some(&mut 'b'));
        assert_eq!(t.get_mut(99), None);
        assert_eq!(t.len(), 2);
        assert_eq!(t.take(u64::MAX), None);
    }
}
