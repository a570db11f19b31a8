//! Inflight I/O tracking for split rings: what a device took and has not returned,
//! kept in memory that outlives the device process, so a restarted device finishes
//! it (vhost-user's `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, "Inflight I/O tracking").
//!
//! A device that completes out of order cannot tell from the rings alone which
//! chains it took before it died: the available ring's entries of those chains may
//! already be overwritten. So it keeps one [`InflightRegion`] per queue, shared with
//! the frontend (which only holds it across the device's restarts), in the spec's
//! split layout:
//!
//! ```text
//! queue region: features u64 | version u16 | desc_num u16 | last_batch_head u16 | used_idx u16
//!               desc[desc_num]: inflight u8 | padding [u8; 5] | next u16 | counter u64
//! ```
//!
//! - taking a chain with head `i`: `desc[i].counter` is the next value of a counter
//!   (the order of taking), then `desc[i].inflight` = 1;
//! - returning a batch of chains: each head is linked into the batch list
//!   (`desc[i].next` = `last_batch_head`, `last_batch_head` = `i`), the used index
//!   is published in the ring, then each head's `inflight` = 0 and the region's
//!   `used_idx` = the ring's used index;
//! - recovering ([`InflightRegion::recover`]): if the region's `used_idx` differs
//!   from the ring's, the device died between publishing a batch and clearing it:
//!   the batch (as many heads as the indices differ, from `last_batch_head`) is
//!   cleared. Every head still marked is resubmitted, in counter order, and the
//!   device goes on taking available entries after the ones it had taken: the ring's
//!   used index plus the number resubmitted, since each chain taken was either
//!   returned (one used entry each, so a tracked in-order device writes one used
//!   entry per chain) or is still marked.
//!
//! Everything in the region is hostile (HOSTILE 50): the frontend can write it at
//! any moment. Recovery reads each field once, checks the version, the size, every
//! head and the batch length against the queue size, and the ring itself then
//! checks the resulting position against the driver's available index like any
//! other; a region that does not add up is refused with an [`InflightError`], never
//! a panic or an unbounded walk.

use crate::shm::{Atomics, Region};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};

/// The region layout version this module writes and reads.
pub const VERSION: u16 = 1;

/// Alignment of each queue's region inside the shared buffer.
pub const ALIGN: u64 = 64;

const HEADER: usize = 16;
const DESC: usize = 16;

/// Bytes of one split queue's region for a queue of `size` entries (header and
/// descriptor states, rounded up to [`ALIGN`]).
#[must_use]
pub fn split_region_size(size: u16) -> u64 {
    ((HEADER + DESC * usize::from(size)) as u64).div_ceil(ALIGN) * ALIGN
}

/// Why an inflight region was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflightError {
    /// The region is smaller than a queue of this size needs, not writable, or not
    /// 8-byte aligned.
    #[error(
        "an inflight region of {len} bytes cannot track a queue of {size}: {need} writable, aligned bytes needed"
    )]
    Region {
        /// Bytes given.
        len: usize,
        /// Queue size.
        size: u16,
        /// Bytes needed.
        need: u64,
    },
    /// A version this implementation does not know.
    #[error("inflight region version {0}, expected 0 or {VERSION}")]
    Version(u16),
    /// The region tracks a queue of another size.
    #[error("inflight region for {found} descriptors, the queue has {size}")]
    DescNum {
        /// `desc_num` read.
        found: u16,
        /// Queue size.
        size: u16,
    },
    /// The unfinished last batch is longer than the queue, or its list leaves the
    /// queue.
    #[error("inflight region's last batch ({batch} entries from head {head}) does not fit a queue of {size}")]
    Batch {
        /// Entries the used indices say the batch had.
        batch: u16,
        /// The list entry that was out of range (or the list's head).
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// An `inflight` flag that is neither 0 nor 1.
    #[error("inflight flag {flag} for head {head}")]
    Flag {
        /// The head.
        head: u16,
        /// The value read.
        flag: u8,
    },
    /// Inflight tracking is implemented for split rings only.
    #[error("inflight tracking is implemented for split rings only")]
    Packed,
}

/// The chains a recovered device must serve again, in the order it first took
/// them, and where it goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Heads of the chains taken and not returned, oldest first.
    pub resubmit: Vec<u16>,
    /// The available-ring position to take next: the ring's used index plus the
    /// chains resubmitted.
    pub next_avail: u16,
}

/// One split queue's inflight region (see the module docs).
pub struct InflightRegion {
    region: Region,
    u16s: Atomics<AtomicU16>,
    u64s: Atomics<AtomicU64>,
    size: u16,
    /// The next counter value to give a chain taken.
    counter: u64,
    /// Heads linked into the batch being returned, not yet cleared.
    batch: Vec<u16>,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("len", &self.region.len())
            .field("size", &self.size)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl InflightRegion {
    /// The region for a queue of `size` entries at the start of `region` (writable,
    /// 8-byte aligned, at least [`split_region_size`] bytes).
    ///
    /// # Errors
    /// [`InflightError::Region`] if `region` cannot hold it.
    pub fn new(region: Region, size: u16) -> Result<Self, InflightError> {
        let need = split_region_size(size);
        let refused = InflightError::Region {
            len: region.len(),
            size,
            need,
        };
        if !region.is_writable() || (region.len() as u64) < need {
            return Err(refused);
        }
        let words = usize::try_from(need).map_err(|_| refused)?;
        let u16s = region.atomic_u16s(0, words / 2).map_err(|_| refused)?;
        let u64s = region.atomic_u64s(0, words / 8).map_err(|_| refused)?;
        Ok(InflightRegion {
            region,
            u16s,
            u64s,
            size,
            counter: 0,
            batch: Vec::new(),
        })
    }

    fn get16(&self, byte: usize) -> u16 {
        u16::from_le(self.u16s[byte / 2].load(Ordering::Relaxed))
    }

    fn set16(&self, byte: usize, v: u16) {
        self.u16s[byte / 2].store(v.to_le(), Ordering::Release);
    }

    fn desc(i: u16) -> usize {
        HEADER + DESC * usize::from(i)
    }

    /// The `inflight` byte of head `i` (with the padding byte after it, which is
    /// written as 0).
    fn flag(&self, i: u16) -> u8 {
        self.get16(Self::desc(i)).to_le_bytes()[0]
    }

    fn set_flag(&self, i: u16, on: bool) {
        self.set16(Self::desc(i), u16::from(on));
    }

    fn next(&self, i: u16) -> u16 {
        self.get16(Self::desc(i) + 6)
    }

    fn counter_of(&self, i: u16) -> u64 {
        u64::from_le(self.u64s[(Self::desc(i) + 8) / 8].load(Ordering::Relaxed))
    }

    fn set_counter(&self, i: u16, v: u64) {
        self.u64s[(Self::desc(i) + 8) / 8].store(v.to_le(), Ordering::Release);
    }

    /// Starts the region afresh for a queue whose used index is `used_idx`: nothing
    /// in flight. The version is written last.
    fn init(&mut self, used_idx: u16) {
        self.u64s[0].store(0, Ordering::Release);
        self.set16(10, self.size);
        self.set16(12, 0);
        self.set16(14, used_idx);
        for i in 0..self.size {
            self.set16(Self::desc(i), 0);
            self.set16(Self::desc(i) + 6, 0);
            self.set_counter(i, 0);
        }
        self.set16(8, VERSION);
        self.counter = 0;
        self.batch.clear();
    }

    /// Reads the region after a device restart, for a ring whose used index is
    /// `ring_used` in shared memory (`fresh_used` is the device's own idea of it,
    /// used if the region is new: version 0). Finishes a batch the earlier device
    /// published but did not clear, and returns the chains to serve again.
    ///
    /// # Errors
    /// A region that does not add up (see [`InflightError`]); the device must not
    /// start the queue then.
    pub fn recover(&mut self, ring_used: u16, fresh_used: u16) -> Result<Recovered, InflightError> {
        match self.get16(8) {
            0 => {
                self.init(fresh_used);
                return Ok(Recovered {
                    resubmit: Vec::new(),
                    next_avail: fresh_used,
                });
            }
            VERSION => {}
            v => return Err(InflightError::Version(v)),
        }
        let found = self.get16(10);
        if found != self.size {
            return Err(InflightError::DescNum {
                found,
                size: self.size,
            });
        }
        let region_used = self.get16(14);
        if region_used != ring_used {
            // The device died after publishing a batch and before clearing it.
            let batch = ring_used.wrapping_sub(region_used);
            let mut head = self.get16(12);
            if batch > self.size {
                return Err(InflightError::Batch {
                    batch,
                    head,
                    size: self.size,
                });
            }
            for _ in 0..batch {
                if head >= self.size {
                    return Err(InflightError::Batch {
                        batch,
                        head,
                        size: self.size,
                    });
                }
                self.set_flag(head, false);
                head = self.next(head);
            }
            self.set16(14, ring_used);
        }
        let mut held = Vec::new();
        for i in 0..self.size {
            match self.flag(i) {
                0 => {}
                1 => held.push((self.counter_of(i), i)),
                flag => return Err(InflightError::Flag { head: i, flag }),
            }
        }
        held.sort_unstable();
        self.counter = held.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        self.batch.clear();
        // At most `size` entries: fits.
        let n = u16::try_from(held.len()).unwrap_or(u16::MAX);
        Ok(Recovered {
            resubmit: held.into_iter().map(|(_, i)| i).collect(),
            next_avail: ring_used.wrapping_add(n),
        })
    }

    /// Marks head `head` (below the queue size) taken.
    pub(crate) fn taken(&mut self, head: u16) {
        self.set_counter(head, self.counter);
        self.counter = self.counter.wrapping_add(1);
        self.set_flag(head, true);
    }

    /// Links head `head` into the batch being returned: call before its used entry
    /// is published.
    pub(crate) fn returning(&mut self, head: u16) {
        let last = self.get16(12);
        self.set16(Self::desc(head) + 6, last);
        self.set16(12, head);
        self.batch.push(head);
    }

    /// The batch's used entries are published and the ring's used index is
    /// `used_idx`: clears the batch.
    pub(crate) fn returned(&mut self, used_idx: u16) {
        for &head in &self.batch {
            self.set_flag(head, false);
        }
        self.batch.clear();
        self.set16(14, used_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::Mapping;

    fn region(size: u16) -> InflightRegion {
        let m = Mapping::anonymous(usize::try_from(split_region_size(size)).unwrap()).unwrap();
        InflightRegion::new(m.region(), size).unwrap()
    }

    #[test]
    fn sizes_follow_the_layout_rounded_to_64() {
        assert_eq!(split_region_size(1), 64);
        assert_eq!(split_region_size(4), 128);
        assert_eq!(split_region_size(256), 16 + 16 * 256 + 48);
    }

    #[test]
    fn a_fresh_region_is_initialised_and_resubmits_nothing() {
        let mut r = region(8);
        let got = r.recover(0, 5).unwrap();
        assert_eq!(
            got,
            Recovered {
                resubmit: vec![],
                next_avail: 5
            }
        );
        assert_eq!(r.get16(8), VERSION);
        assert_eq!(r.get16(10), 8);
        assert_eq!(r.get16(14), 5);
    }

    #[test]
    fn heads_taken_and_not_returned_come_back_oldest_first() {
        let mut r = region(8);
        r.recover(0, 0).unwrap();
        for h in [5, 2, 7, 0] {
            r.taken(h);
        }
        r.returning(2);
        r.returned(1);
        let mut again = InflightRegion::new(r.region.clone(), 8).unwrap();
        let got = again.recover(1, 0).unwrap();
        assert_eq!(got.resubmit, vec![5, 7, 0]);
        assert_eq!(got.next_avail, 4);
        // New chains count on from the oldest ones.
        again.taken(3);
        assert_eq!(again.counter_of(3), 4);
    }

    #[test]
    fn a_batch_published_but_not_cleared_is_finished_on_recovery() {
        let mut r = region(8);
        r.recover(10, 10).unwrap();
        for h in [1, 3, 4] {
            r.taken(h);
        }
        r.returning(3);
        r.returning(1);
        // The device dies here: the ring's used index says 12, the region 10.
        let mut again = InflightRegion::new(r.region.clone(), 8).unwrap();
        let got = again.recover(12, 0).unwrap();
        assert_eq!(got.resubmit, vec![4]);
        assert_eq!(got.next_avail, 13);
        assert_eq!(again.get16(14), 12);
    }

    #[test]
    fn a_region_that_does_not_add_up_is_refused() {
        let size = 8;
        let mut r = region(size);
        r.recover(0, 0).unwrap();
        r.set16(8, 7);
        assert_eq!(r.recover(0, 0), Err(InflightError::Version(7)));
        r.set16(8, VERSION);
        r.set16(10, 16);
        assert_eq!(r.recover(0, 0), Err(InflightError::DescNum { found: 16, size }));
        r.set16(10, size);
        // A batch longer than the queue.
        assert_eq!(
            r.recover(9, 0),
            Err(InflightError::Batch {
                batch: 9,
                head: 0,
                size
            })
        );
        // A batch list that leaves the queue.
        r.set16(12, 3);
        r.set16(InflightRegion::desc(3) + 6, 200);
        assert_eq!(
            r.recover(2, 0),
            Err(InflightError::Batch {
                batch: 2,
                head: 200,
                size
            })
        );
        r.set16(14, 2);
        r.set16(InflightRegion::desc(6), 0x0102);
        assert_eq!(r.recover(2, 0), Err(InflightError::Flag { head: 6, flag: 2 }));
    }

    #[test]
    fn a_region_too_small_or_read_only_is_refused() {
        let m = Mapping::anonymous(4096).unwrap();
        assert!(InflightRegion::new(m.region().sub(0, 64).unwrap(), 8).is_err());
        assert!(InflightRegion::new(m.region().read_only(), 8).is_err());
        assert!(InflightRegion::new(m.region().sub(8, 2048).unwrap(), 8).is_ok());
    }
}
