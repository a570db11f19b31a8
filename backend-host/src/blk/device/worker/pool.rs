//! The data buffers a queue worker reuses: a finished op's buffer goes back to the
//! pool and the next op of that length takes it, so the steady state of a queue
//! allocates, zeroes and frees nothing per request.

use crate::blk::engine::AlignedBuf;

/// Data buffers a queue worker keeps for reuse.
const POOL_BUFFERS: usize = 64;
/// Largest data buffer kept for reuse (larger ones are rare and costly to hoard).
const POOL_BUFFER_MAX: usize = 64 * 1024;

/// One queue worker's data buffers of finished ops, kept for reuse.
pub(super) struct BufferPool {
    buffers: Vec<AlignedBuf>,
    /// The alignment the disk needs of a buffer for direct I/O.
    mem_align: usize,
}

impl BufferPool {
    /// An empty pool whose new buffers are aligned for a disk that needs `mem_align`.
    pub(super) fn new(mem_align: usize) -> BufferPool {
        BufferPool {
            buffers: Vec::new(),
            mem_align,
        }
    }

    /// A data buffer of `len` bytes: a recycled one of that length if there is one,
    /// else a new one.
    ///
    /// Stale contents are harmless (HOSTILE 30): a read's buffer reaches the guest
    /// only when the read filled all of it, and a write's is filled from the guest
    /// before it is submitted.
    pub(super) fn take(&mut self, len: usize) -> AlignedBuf {
        if self.buffers.last().is_some_and(|b| b.len() == len)
            && let Some(buf) = self.buffers.pop()
        {
            return buf;
        }
        AlignedBuf::for_io(len, self.mem_align)
    }

    /// Keeps a finished op's buffer for reuse, within [`POOL_BUFFERS`] buffers of at
    /// most [`POOL_BUFFER_MAX`] bytes: the steady state of a queue then allocates,
    /// zeroes and frees nothing per request.
    pub(super) fn recycle(&mut self, buf: AlignedBuf) {
        if !buf.is_empty() && buf.len() <= POOL_BUFFER_MAX && self.buffers.len() < POOL_BUFFERS {
            self.buffers.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::engine::IO_BUF_ALIGN;

    /// A buffer of `len` bytes whose first byte says it was used.
    fn used(pool: &mut BufferPool, len: usize) -> AlignedBuf {
        let mut buf = pool.take(len);
        buf.as_mut_slice()[0] = 0xAB;
        buf
    }

    #[test]
    fn a_recycled_buffer_serves_the_next_op_of_its_length() {
        let mut pool = BufferPool::new(512);
        let fresh = pool.take(4096);
        assert_eq!(fresh.len(), 4096);
        assert!(fresh.is_aligned(IO_BUF_ALIGN));
        assert_eq!(fresh.as_slice()[0], 0, "a new buffer is zeroed");

        let buf = used(&mut pool, 4096);
        pool.recycle(buf);
        let again = pool.take(4096);
        assert_eq!(again.as_slice()[0], 0xAB, "the recycled buffer came back");
        assert!(pool.buffers.is_empty());
    }

    #[test]
    fn another_length_gets_a_new_buffer_and_leaves_the_pool_alone() {
        let mut pool = BufferPool::new(512);
        let buf = used(&mut pool, 4096);
        pool.recycle(buf);
        let other = pool.take(8192);
        assert_eq!(other.len(), 8192);
        assert_eq!(other.as_slice()[0], 0);
        assert_eq!(pool.buffers.len(), 1);
    }

    #[test]
    fn keeps_at_most_its_count_of_buffers_of_at_most_its_size() {
        let mut pool = BufferPool::new(512);
        pool.recycle(AlignedBuf::default());
        pool.recycle(AlignedBuf::for_io(POOL_BUFFER_MAX + 512, 512));
        assert!(pool.buffers.is_empty(), "empty and large buffers are not kept");

        pool.recycle(AlignedBuf::for_io(POOL_BUFFER_MAX, 512));
        for _ in 1..POOL_BUFFERS + 8 {
            pool.recycle(AlignedBuf::for_io(4096, 512));
        }
        assert_eq!(pool.buffers.len(), POOL_BUFFERS);
        let held: usize = pool.buffers.iter().map(AlignedBuf::len).sum();
        assert_eq!(held, POOL_BUFFER_MAX + (POOL_BUFFERS - 1) * 4096);
    }
}
