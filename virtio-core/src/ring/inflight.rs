//! Inflight I/O tracking: what a device took and has not returned,
//! kept in memory that outlives the device process, so a restarted device finishes
//! it (vhost-user's `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, "Inflight I/O tracking").
//!
//! A device that completes out of order cannot tell from the rings alone which
//! chains it took before it died: the available ring's entries of those chains may
//! already be overwritten. So it keeps one [`InflightRegion`] per queue, shared with
//! the frontend (which only holds it across the device's restarts). The vhost-user
//! spec suggests layouts; only the device reads the region (the frontend zeroes it
//! on a VM reset), so each format's layout is the device's own. Split rings use the
//! spec's split layout:
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
//! - recovering: if the region's `used_idx` differs
//!   from the ring's, the device died between publishing a batch and clearing it:
//!   the batch (as many heads as the indices differ, from `last_batch_head`) is
//!   cleared. Every head still marked is resubmitted, in counter order, and the
//!   device goes on taking available entries after the ones it had taken: the ring's
//!   used index plus the number resubmitted, since each chain taken was either
//!   returned (one used entry each, so a tracked in-order device writes one used
//!   entry per chain) or is still marked.
//!
//! Packed rings (`features` bit 0 set, so neither format is read as the other)
//! keep, per buffer id, the list's descriptors themselves: a list completed out of
//! order is overwritten in the ring by used descriptors while an older one is still
//! held, so after a crash the ring no longer holds it.
//!
//! ```text
//! queue region: features u64 (1) | version u16 | desc_num u16 | used u16 | pending u16
//!               | batch_head u16 | batch_len u16 | padding [u8; 12]
//!               ids[desc_num]: inflight u16 | first u16 | num u16 | next u16 | counter u64
//!               copies[desc_num]: addr u64 | len u32 | id u16 | flags u16 | slot u16 | link u16 | padding u32
//! ```
//!
//! - taking a list: its descriptors go into free copy entries (linked by `link`
//!   from `first`, `num` of them), then the id's counter, then its flag;
//! - returning (one used descriptor for one list, or in order for a batch): the
//!   ids are linked into the batch list and `pending` is set to the used position
//!   after it; the used descriptor is written; then the flags are cleared and
//!   `used` = `pending`;
//! - recovering: if `pending` differs from `used`, the device died around a used
//!   descriptor's write. The slot at `used` still holds the descriptor the driver
//!   made available there, marked available for that lap, exactly when the used
//!   descriptor was not written (the driver rewrites a slot only after the device
//!   used it): then the batch is dropped, else it is finished. The ids still marked
//!   are resubmitted from their copies in counter order, and the device takes
//!   available descriptors again after the slots they hold (`used` plus their
//!   descriptors). Copy entries not named by a marked id are free.
//!
//! Everything in the region is hostile (HOSTILE 50): the frontend can write it at
//! any moment. Recovery reads each field once, checks the version, the size, every
//! head and the batch length against the queue size, and the ring itself then
//! checks the resulting position against the driver's available index like any
//! other; a region that does not add up is refused with an [`InflightError`], never
//! a panic or an unbounded walk.

use crate::ring::areas::RingFormat;
use crate::ring::chain::PackedRawDesc;
use crate::shm::{Atomics, Region};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};

/// The region layout version this module writes and reads.
pub const VERSION: u16 = 1;

/// Alignment of each queue's region inside the shared buffer.
pub const ALIGN: u64 = 64;

/// `features` bit 0: the packed layout.
const PACKED_LAYOUT: u64 = 1;

const SPLIT_HEADER: usize = 16;
const SPLIT_DESC: usize = 16;
const PACKED_HEADER: usize = 32;
const PACKED_ID: usize = 16;
const PACKED_COPY: usize = 24;

fn layout_bytes(format: RingFormat, size: u16) -> usize {
    let n = usize::from(size);
    match format {
        RingFormat::Split => SPLIT_HEADER + SPLIT_DESC * n,
        RingFormat::Packed => PACKED_HEADER + (PACKED_ID + PACKED_COPY) * n,
    }
}

/// Bytes of one queue's region for a ring of `format` and `size` entries, rounded
/// up to [`ALIGN`].
#[must_use]
pub fn region_size(format: RingFormat, size: u16) -> u64 {
    (layout_bytes(format, size) as u64).div_ceil(ALIGN) * ALIGN
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
    /// A version this implementation does not know, or the other format's layout.
    #[error("inflight region version {version} with features {features:#x}: not this ring format's layout")]
    Version {
        /// `version` read.
        version: u16,
        /// `features` read.
        features: u64,
    },
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
        /// Entries the region says the batch had.
        batch: u16,
        /// The list entry that was out of range (or the list's head).
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// An `inflight` flag that is neither 0 nor 1.
    #[error("inflight flag {flag} for head {head}")]
    Flag {
        /// The head (packed: the buffer id).
        head: u16,
        /// The value read.
        flag: u16,
    },
    /// Packed: a used position outside the ring.
    #[error("inflight region's used position {0:#06x} is outside the ring")]
    Position(u16),
    /// Packed: a held list's copies do not add up (an entry out of range or
    /// shared, a count of 0, or more descriptors than the ring has).
    #[error("inflight region's copy of buffer {id} does not add up")]
    Copies {
        /// The buffer id.
        id: u16,
    },
    /// A region for one ring format given to a ring of the other.
    #[error("inflight region laid out for the other ring format")]
    Format,
}

/// One queue's inflight region: shared memory of at least [`region_size`] bytes
/// for the ring's format and size. The device ring reads and writes it (see the
/// module docs); this handle only carries it there.
pub struct InflightRegion {
    region: Region,
    size: u16,
    format: RingFormat,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("len", &self.region.len())
            .field("size", &self.size)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl InflightRegion {
    /// The region for a ring of `format` and `size` entries at the start of
    /// `region` (writable, 8-byte aligned, at least [`region_size`] bytes).
    ///
    /// # Errors
    /// [`InflightError::Region`] if `region` cannot hold it.
    pub fn new(region: Region, size: u16, format: RingFormat) -> Result<Self, InflightError> {
        let need = region_size(format, size);
        if !region.is_writable() || (region.len() as u64) < need || region.atomic_u64s(0, 1).is_err() {
            return Err(InflightError::Region {
                len: region.len(),
                size,
                need,
            });
        }
        Ok(InflightRegion { region, size, format })
    }

    /// The ring format it is laid out for.
    #[must_use]
    pub fn format(&self) -> RingFormat {
        self.format
    }
}

/// Simulated crashes, for tests only: every store into an inflight region, and
/// every store into the ring that recovery depends on (used entries, the used
/// index, packed used descriptors), passes a [`crash::point`] first, so a test can
/// end a device instance between any two of them, as SIGKILL can.
pub(crate) mod crash {
    #[cfg(test)]
    use std::cell::Cell;

    #[cfg(test)]
    thread_local! {
        /// Stores left before the crash, plus one; 0: no crash armed.
        static LEFT: Cell<u64> = const { Cell::new(0) };
    }

    /// The unwinding payload of a simulated crash.
    #[cfg(test)]
    #[derive(Debug)]
    pub(crate) struct Crash;

    /// Arms a crash right before the `n`-th store from now (`n` >= 1); 0 disarms.
    #[cfg(test)]
    pub(crate) fn arm(n: u64) {
        LEFT.set(n);
    }

    /// Called right before a store: unwinds with [`Crash`] (without running the
    /// panic hook) if this is the store the armed crash is before.
    #[cfg(test)]
    pub(crate) fn point() {
        match LEFT.get() {
            0 => {}
            1 => {
                LEFT.set(0);
                std::panic::resume_unwind(Box::new(Crash));
            }
            n => LEFT.set(n - 1),
        }
    }

    /// Nothing outside tests.
    #[cfg(not(test))]
    #[inline(always)]
    pub(crate) fn point() {}
}

/// Atomic views of a region's 16-, 32- and 64-bit words, little-endian.
struct Words {
    u16s: Atomics<AtomicU16>,
    u32s: Atomics<AtomicU32>,
    u64s: Atomics<AtomicU64>,
}

impl Words {
    fn new(r: &InflightRegion) -> Result<Words, InflightError> {
        let bytes = layout_bytes(r.format, r.size).next_multiple_of(8);
        let refused = InflightError::Region {
            len: r.region.len(),
            size: r.size,
            need: region_size(r.format, r.size),
        };
        Ok(Words {
            u16s: r.region.atomic_u16s(0, bytes / 2).map_err(|_| refused)?,
            u32s: r.region.atomic_u32s(0, bytes / 4).map_err(|_| refused)?,
            u64s: r.region.atomic_u64s(0, bytes / 8).map_err(|_| refused)?,
        })
    }

    fn get16(&self, byte: usize) -> u16 {
        u16::from_le(self.u16s[byte / 2].load(Ordering::Relaxed))
    }

    fn set16(&self, byte: usize, v: u16) {
        crash::point();
        self.u16s[byte / 2].store(v.to_le(), Ordering::Release);
    }

    fn get32(&self, byte: usize) -> u32 {
        u32::from_le(self.u32s[byte / 4].load(Ordering::Relaxed))
    }

    fn set32(&self, byte: usize, v: u32) {
        crash::point();
        self.u32s[byte / 4].store(v.to_le(), Ordering::Release);
    }

    fn get64(&self, byte: usize) -> u64 {
        u64::from_le(self.u64s[byte / 8].load(Ordering::Relaxed))
    }

    fn set64(&self, byte: usize, v: u64) {
        crash::point();
        self.u64s[byte / 8].store(v.to_le(), Ordering::Release);
    }
}

/// The chains a recovered split device must serve again, in the order it first
/// took them, and where it goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Heads of the chains taken and not returned, oldest first.
    pub resubmit: Vec<u16>,
    /// The used index the device goes on from.
    pub used: u16,
    /// The available-ring position to take next: `used` plus the chains
    /// resubmitted.
    pub next_avail: u16,
}

/// What both layouts share: the header's first fields (`features` u64, `version`
/// u16, `desc_num` u16), and one 16-byte record per head (split) or buffer id
/// (packed) from `base`: the `inflight` flag (u16) at 0, the batch list's `next`
/// (u16) at 6, the `counter` (u64) at 8.
struct Records {
    w: Words,
    size: u16,
    /// Where the records start.
    base: usize,
    /// The bits of a flag that count (split's is a byte, with padding after it).
    flag_mask: u16,
    /// Where the header keeps the head of the batch list.
    batch_head: usize,
    /// The next counter value to give a chain taken.
    counter: u64,
    /// Heads (ids) linked into the batch being returned, not yet cleared.
    batch: Vec<u16>,
}

impl Records {
    fn new(r: &InflightRegion, format: RingFormat) -> Result<Self, InflightError> {
        if r.format != format {
            return Err(InflightError::Format);
        }
        let (base, flag_mask, batch_head) = match format {
            RingFormat::Split => (SPLIT_HEADER, 0xff, 12),
            RingFormat::Packed => (PACKED_HEADER, 0xffff, 16),
        };
        Ok(Records {
            w: Words::new(r)?,
            size: r.size,
            base,
            flag_mask,
            batch_head,
            counter: 0,
            batch: Vec::new(),
        })
    }

    /// The byte offset of record `i`.
    fn rec(&self, i: u16) -> usize {
        self.base + 16 * usize::from(i)
    }

    /// Whether an earlier instance recorded the region in the layout whose
    /// `features` are `layout` (false: a fresh region, version 0), checking the
    /// version and the size it tracks.
    fn recorded(&self, layout: u64) -> Result<bool, InflightError> {
        let (version, features) = (self.w.get16(8), self.w.get64(0));
        match (version, features) {
            (0, _) => return Ok(false),
            (VERSION, f) if f == layout => {}
            _ => return Err(InflightError::Version { version, features }),
        }
        let found = self.w.get16(10);
        if found != self.size {
            return Err(InflightError::DescNum {
                found,
                size: self.size,
            });
        }
        Ok(true)
    }

    /// Writes the header's first fields for `layout`, but not the version (see
    /// [`Self::seal`]), and forgets the counter and the batch.
    fn start(&mut self, layout: u64) {
        self.w.set64(0, layout);
        self.w.set16(10, self.size);
        self.counter = 0;
        self.batch.clear();
    }

    /// The version, written last: only now does the region count as recorded.
    fn seal(&self) {
        self.w.set16(8, VERSION);
    }

    /// Clears the `batch` records of the batch list an earlier instance left
    /// unfinished, from its head.
    fn finish_batch(&self, batch: u16) -> Result<(), InflightError> {
        let mut head = self.w.get16(self.batch_head);
        let bad = |head| InflightError::Batch {
            batch,
            head,
            size: self.size,
        };
        if batch > self.size {
            return Err(bad(head));
        }
        for _ in 0..batch {
            if head >= self.size {
                return Err(bad(head));
            }
            self.w.set16(self.rec(head), 0);
            head = self.w.get16(self.rec(head) + 6);
        }
        Ok(())
    }

    /// The flag of record `i`: `Some(counter)` if set.
    fn held(&self, i: u16) -> Result<Option<u64>, InflightError> {
        match self.w.get16(self.rec(i)) & self.flag_mask {
            0 => Ok(None),
            1 => Ok(Some(self.w.get64(self.rec(i) + 8))),
            flag => Err(InflightError::Flag { head: i, flag }),
        }
    }

    /// Sorts what recovery found held, oldest first; new chains count on after
    /// the newest.
    fn order<T>(&mut self, held: &mut [(u64, u16, T)]) {
        held.sort_unstable_by_key(|&(counter, i, _)| (counter, i));
        self.counter = held.last().map_or(0, |&(c, _, _)| c.wrapping_add(1));
        self.batch.clear();
    }

    /// Marks record `i` taken: its counter, then its flag.
    fn mark(&mut self, i: u16) {
        self.w.set64(self.rec(i) + 8, self.counter);
        self.counter = self.counter.wrapping_add(1);
        self.w.set16(self.rec(i), 1);
    }

    /// Links record `i` into the batch being returned.
    fn link(&mut self, i: u16) {
        let last = self.w.get16(self.batch_head);
        self.w.set16(self.rec(i) + 6, last);
        self.w.set16(self.batch_head, i);
        self.batch.push(i);
    }

    /// Clears the flags of the batch, which is returned.
    fn clear_batch(&mut self) {
        for &i in &self.batch {
            self.w.set16(self.rec(i), 0);
        }
        self.batch.clear();
    }
}

/// A split device's bookkeeping in its region (see the module docs): the spec's
/// layout, `last_batch_head` at 12 and `used_idx` at 14.
pub(crate) struct SplitTracker {
    r: Records,
}

impl SplitTracker {
    pub(crate) fn new(r: &InflightRegion) -> Result<Self, InflightError> {
        Ok(SplitTracker {
            r: Records::new(r, RingFormat::Split)?,
        })
    }

    /// Starts the region afresh for a queue whose used index is `used_idx`: nothing
    /// in flight. The version is written last.
    fn init(&mut self, used_idx: u16) {
        let r = &mut self.r;
        r.start(0);
        r.w.set16(12, 0);
        r.w.set16(14, used_idx);
        for i in 0..r.size {
            r.w.set16(r.rec(i), 0);
            r.w.set16(r.rec(i) + 6, 0);
            r.w.set64(r.rec(i) + 8, 0);
        }
        r.seal();
    }

    /// Reads the region after a device restart, for a ring whose used index is
    /// `ring_used` in shared memory (`fresh_used` is the device's own idea of it,
    /// used if the region is new: version 0). Finishes a batch the earlier device
    /// published but did not clear, and returns the chains to serve again.
    pub(crate) fn recover(&mut self, ring_used: u16, fresh_used: u16) -> Result<Recovered, InflightError> {
        if !self.r.recorded(0)? {
            self.init(fresh_used);
            return Ok(Recovered {
                resubmit: Vec::new(),
                used: fresh_used,
                next_avail: fresh_used,
            });
        }
        let r = &mut self.r;
        let region_used = r.w.get16(14);
        if region_used != ring_used {
            // The device died after publishing a batch and before clearing it.
            r.finish_batch(ring_used.wrapping_sub(region_used))?;
            r.w.set16(14, ring_used);
        }
        let mut held = Vec::new();
        for i in 0..r.size {
            if let Some(counter) = r.held(i)? {
                held.push((counter, i, ()));
            }
        }
        r.order(&mut held);
        // At most `size` entries: fits.
        let n = u16::try_from(held.len()).unwrap_or(u16::MAX);
        Ok(Recovered {
            resubmit: held.into_iter().map(|(_, i, ())| i).collect(),
            used: ring_used,
            next_avail: ring_used.wrapping_add(n),
        })
    }

    /// Marks head `head` (below the queue size) taken.
    pub(crate) fn taken(&mut self, head: u16) {
        self.r.mark(head);
    }

    /// Links head `head` into the batch being returned: call before its used entry
    /// is published.
    pub(crate) fn returning(&mut self, head: u16) {
        self.r.link(head);
    }

    /// The batch's used entries are published and the ring's used index is
    /// `used_idx`: clears the batch.
    pub(crate) fn returned(&mut self, used_idx: u16) {
        self.r.clear_batch();
        self.r.w.set16(14, used_idx);
    }
}

/// What a recovered packed device serves again and where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PackedRecovered {
    /// Each list taken and not returned, oldest first: its buffer id and its
    /// descriptors as the driver made them available.
    pub resubmit: Vec<(u16, Vec<PackedRawDesc>)>,
    /// The used position (slot in bits 0-14, wrap counter in bit 15).
    pub used: u16,
    /// Ring slots the resubmitted lists hold (the available position is this far
    /// past `used`).
    pub slots: u16,
}

/// A packed device's bookkeeping in its region (see the module docs): `used` at
/// 12, `pending` at 14, `batch_head` at 16, `batch_len` at 18; each id's record
/// also holds its list's `first` copy entry (at 2) and length (at 4).
pub(crate) struct PackedTracker {
    r: Records,
    /// Copy entries not holding a list, for the next ones taken.
    free: Vec<u16>,
    /// The copy entries each id holds (private: the region is only written
    /// while the device runs, never read back).
    entries: Vec<Vec<u16>>,
}

impl PackedTracker {
    pub(crate) fn new(r: &InflightRegion) -> Result<Self, InflightError> {
        Ok(PackedTracker {
            r: Records::new(r, RingFormat::Packed)?,
            free: Vec::new(),
            entries: vec![Vec::new(); usize::from(r.size)],
        })
    }

    fn copy(&self, e: u16) -> usize {
        PACKED_HEADER + PACKED_ID * usize::from(self.r.size) + PACKED_COPY * usize::from(e)
    }

    fn init(&mut self, used: u16) {
        let r = &mut self.r;
        r.start(PACKED_LAYOUT);
        r.w.set16(12, used);
        r.w.set16(14, used);
        r.w.set16(16, 0);
        r.w.set16(18, 0);
        for i in 0..r.size {
            r.w.set16(r.rec(i), 0);
        }
        r.seal();
        self.free = (0..r.size).rev().collect();
        self.entries.iter_mut().for_each(Vec::clear);
    }

    /// Reads the region after a restart. `fresh_used` is where a fresh region
    /// starts (version 0); `untouched(pos)` says whether the ring slot at position
    /// `pos` is still marked available for that position's lap (no used
    /// descriptor was written over it); `in_ring(pos)` whether a position is
    /// inside the ring.
    pub(crate) fn recover(
        &mut self,
        fresh_used: u16,
        in_ring: impl Fn(u16) -> bool,
        untouched: impl Fn(u16) -> bool,
    ) -> Result<PackedRecovered, InflightError> {
        if !self.r.recorded(PACKED_LAYOUT)? {
            self.init(fresh_used);
            return Ok(PackedRecovered {
                resubmit: Vec::new(),
                used: fresh_used,
                slots: 0,
            });
        }
        let size = self.r.size;
        let used = self.r.w.get16(12);
        let pending = self.r.w.get16(14);
        for pos in [used, pending] {
            if !in_ring(pos) {
                return Err(InflightError::Position(pos));
            }
        }
        let mut used_now = used;
        if pending != used {
            if untouched(used) {
                // Died before writing the used descriptor: the batch stays held.
                self.r.w.set16(14, used);
            } else {
                // Died after: finish the batch.
                self.r.finish_batch(self.r.w.get16(18))?;
                self.r.w.set16(12, pending);
                used_now = pending;
            }
        }
        let mut owner = vec![false; usize::from(size)];
        let mut held = Vec::new();
        let mut slots: u32 = 0;
        for id in 0..size {
            let Some(counter) = self.r.held(id)? else {
                continue;
            };
            let bad = InflightError::Copies { id };
            let rec = self.r.rec(id);
            let num = self.r.w.get16(rec + 4);
            slots += u32::from(num);
            if num == 0 || slots > u32::from(size) {
                return Err(bad);
            }
            let mut descs = Vec::with_capacity(usize::from(num));
            let mut e = self.r.w.get16(rec + 2);
            self.entries[usize::from(id)].clear();
            for _ in 0..num {
                let taken = owner.get_mut(usize::from(e)).ok_or(bad)?;
                if *taken {
                    return Err(bad);
                }
                *taken = true;
                self.entries[usize::from(id)].push(e);
                let c = self.copy(e);
                let w = &self.r.w;
                descs.push((
                    w.get16(c + 16),
                    (w.get64(c), w.get32(c + 8), w.get16(c + 14), w.get16(c + 12)),
                ));
                e = w.get16(c + 18);
            }
            held.push((counter, id, descs));
        }
        self.r.order(&mut held);
        self.free = (0..size).rev().filter(|&e| !owner[usize::from(e)]).collect();
        Ok(PackedRecovered {
            resubmit: held.into_iter().map(|(_, id, d)| (id, d)).collect(),
            used: used_now,
            // At most `size` (checked above).
            slots: u16::try_from(slots).unwrap_or(size),
        })
    }

    /// Records list `descs` (at most the free copy entries: the device holds at
    /// most `size` descriptors) as taken under buffer id `id`.
    pub(crate) fn taken(&mut self, id: u16, descs: &[PackedRawDesc]) {
        let mut first = u16::MAX;
        let mut held = std::mem::take(&mut self.entries[usize::from(id)]);
        held.clear();
        // Linked back to front, so `first` ends at the list's first descriptor.
        for &(slot, (addr, len, flags, did)) in descs.iter().rev() {
            let Some(e) = self.free.pop() else {
                // The ring never lets the device hold more than `size`.
                tracing::error!(id, "inflight copies exhausted: the list is not tracked");
                self.free.append(&mut held);
                self.entries[usize::from(id)] = held;
                return;
            };
            held.push(e);
            let c = self.copy(e);
            let w = &self.r.w;
            w.set64(c, addr);
            w.set32(c + 8, len);
            w.set16(c + 12, did);
            w.set16(c + 14, flags);
            w.set16(c + 16, slot);
            w.set16(c + 18, first);
            first = e;
        }
        self.entries[usize::from(id)] = held;
        let rec = self.r.rec(id);
        self.r.w.set16(rec + 2, first);
        // Below `size` descriptors.
        self.r
            .w
            .set16(rec + 4, u16::try_from(descs.len()).unwrap_or(u16::MAX));
        self.r.mark(id);
    }

    /// Links id `id` into the batch whose used descriptor is written next.
    pub(crate) fn returning(&mut self, id: u16) {
        self.r.link(id);
    }

    /// The batch's used descriptor is about to be written; `after` is the used
    /// position past it.
    pub(crate) fn publishing(&mut self, after: u16) {
        // Below `size` ids.
        self.r
            .w
            .set16(18, u16::try_from(self.r.batch.len()).unwrap_or(u16::MAX));
        self.r.w.set16(14, after);
    }

    /// The batch's used descriptor is written: its ids and their copies are free.
    pub(crate) fn returned(&mut self, after: u16) {
        for &id in &self.r.batch {
            self.free.append(&mut self.entries[usize::from(id)]);
        }
        self.r.clear_batch();
        self.r.w.set16(12, after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::Mapping;

    /// The byte offset of split head `i`'s record.
    fn desc(i: u16) -> usize {
        SPLIT_HEADER + SPLIT_DESC * usize::from(i)
    }
    use proptest::prelude::*;

    fn region(format: RingFormat, size: u16) -> (Region, InflightRegion) {
        let m = Mapping::anonymous(usize::try_from(region_size(format, size)).unwrap()).unwrap();
        let r = m.region();
        (r.clone(), InflightRegion::new(r, size, format).unwrap())
    }

    fn split(size: u16) -> (Region, SplitTracker) {
        let (raw, r) = region(RingFormat::Split, size);
        (raw, SplitTracker::new(&r).unwrap())
    }

    fn split_again(raw: &Region, size: u16) -> SplitTracker {
        SplitTracker::new(&InflightRegion::new(raw.clone(), size, RingFormat::Split).unwrap()).unwrap()
    }

    #[test]
    fn sizes_follow_the_layouts_rounded_to_64() {
        assert_eq!(region_size(RingFormat::Split, 1), 64);
        assert_eq!(region_size(RingFormat::Split, 4), 128);
        assert_eq!(region_size(RingFormat::Split, 256), 16 + 16 * 256 + 48);
        assert_eq!(region_size(RingFormat::Packed, 256), 32 + 40 * 256 + 32);
    }

    #[test]
    fn a_fresh_region_is_initialised_and_resubmits_nothing() {
        let (_, mut r) = split(8);
        let got = r.recover(0, 5).unwrap();
        assert_eq!(
            got,
            Recovered {
                resubmit: vec![],
                used: 5,
                next_avail: 5
            }
        );
        assert_eq!(r.r.w.get16(8), VERSION);
        assert_eq!(r.r.w.get16(10), 8);
        assert_eq!(r.r.w.get16(14), 5);
    }

    #[test]
    fn heads_taken_and_not_returned_come_back_oldest_first() {
        let (raw, mut r) = split(8);
        r.recover(0, 0).unwrap();
        for h in [5, 2, 7, 0] {
            r.taken(h);
        }
        r.returning(2);
        r.returned(1);
        let mut again = split_again(&raw, 8);
        let got = again.recover(1, 0).unwrap();
        assert_eq!(got.resubmit, vec![5, 7, 0]);
        assert_eq!(got.next_avail, 4);
        // New chains count on from the oldest ones.
        again.taken(3);
        assert_eq!(again.r.w.get64(desc(3) + 8), 4);
    }

    #[test]
    fn a_batch_published_but_not_cleared_is_finished_on_recovery() {
        let (raw, mut r) = split(8);
        r.recover(10, 10).unwrap();
        for h in [1, 3, 4] {
            r.taken(h);
        }
        r.returning(3);
        r.returning(1);
        // The device dies here: the ring's used index says 12, the region 10.
        let mut again = split_again(&raw, 8);
        let got = again.recover(12, 0).unwrap();
        assert_eq!(got.resubmit, vec![4]);
        assert_eq!(got.next_avail, 13);
        assert_eq!(again.r.w.get16(14), 12);
    }

    #[test]
    fn a_region_that_does_not_add_up_is_refused() {
        let size = 8;
        let (_, mut r) = split(size);
        r.recover(0, 0).unwrap();
        r.r.w.set16(8, 7);
        assert_eq!(
            r.recover(0, 0),
            Err(InflightError::Version {
                version: 7,
                features: 0
            })
        );
        r.r.w.set16(8, VERSION);
        r.r.w.set16(10, 16);
        assert_eq!(r.recover(0, 0), Err(InflightError::DescNum { found: 16, size }));
        r.r.w.set16(10, size);
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
        r.r.w.set16(12, 3);
        r.r.w.set16(desc(3) + 6, 200);
        assert_eq!(
            r.recover(2, 0),
            Err(InflightError::Batch {
                batch: 2,
                head: 200,
                size
            })
        );
        r.r.w.set16(14, 2);
        r.r.w.set16(desc(6), 0x0102);
        assert_eq!(r.recover(2, 0), Err(InflightError::Flag { head: 6, flag: 2 }));
        // A packed region is not a split one.
        let (_, p) = region(RingFormat::Packed, size);
        assert!(matches!(SplitTracker::new(&p), Err(InflightError::Format)));
    }

    #[test]
    fn a_region_too_small_or_read_only_is_refused() {
        let m = Mapping::anonymous(4096).unwrap();
        let f = RingFormat::Split;
        assert!(InflightRegion::new(m.region().sub(0, 64).unwrap(), 8, f).is_err());
        assert!(InflightRegion::new(m.region().read_only(), 8, f).is_err());
        assert!(InflightRegion::new(m.region().sub(4, 2048).unwrap(), 8, f).is_err());
        assert!(InflightRegion::new(m.region().sub(8, 2048).unwrap(), 8, f).is_ok());
    }

    fn packed(size: u16) -> (Region, PackedTracker) {
        let (raw, r) = region(RingFormat::Packed, size);
        (raw, PackedTracker::new(&r).unwrap())
    }

    fn packed_again(raw: &Region, size: u16) -> PackedTracker {
        PackedTracker::new(&InflightRegion::new(raw.clone(), size, RingFormat::Packed).unwrap()).unwrap()
    }

    fn list(slot: u16, n: u16, id: u16) -> Vec<PackedRawDesc> {
        (0..n)
            .map(|k| {
                let flags = if k + 1 < n { 1 } else { 0 };
                (slot + k, (0x1000 * u64::from(slot + k), 512, flags, id))
            })
            .collect()
    }

    #[test]
    fn packed_lists_taken_and_not_returned_come_back_with_their_descriptors() {
        let (raw, mut t) = packed(8);
        let ok = |_| true;
        assert_eq!(t.recover(0x8000, ok, |_| false).unwrap().slots, 0);
        let (a, b, c) = (list(0, 2, 5), list(2, 1, 1), list(3, 3, 0));
        t.taken(5, &a);
        t.taken(1, &b);
        t.taken(0, &c);
        // Buffer 1 is returned: one used descriptor over slots 0 and 1 (its own
        // list has one descriptor; the position moves by it).
        t.returning(1);
        t.publishing(0x8001);
        t.returned(0x8001);
        let mut again = packed_again(&raw, 8);
        let got = again.recover(0, ok, |_| panic!("nothing pending")).unwrap();
        assert_eq!(got.used, 0x8001);
        assert_eq!(got.slots, 5);
        assert_eq!(got.resubmit, vec![(5, a), (0, c)]);
        // The copies of the lists held are not handed out again.
        assert_eq!(again.free.len(), 3);
    }

    #[test]
    fn a_packed_batch_is_finished_or_dropped_by_what_the_ring_shows() {
        for written in [false, true] {
            let (raw, mut t) = packed(8);
            t.recover(0x8000, |_| true, |_| false).unwrap();
            t.taken(3, &list(0, 1, 3));
            t.taken(4, &list(1, 1, 4));
            t.returning(4);
            t.publishing(0x8001);
            // Dies here, with the used descriptor written or not.
            let mut again = packed_again(&raw, 8);
            let got = again
                .recover(
                    0,
                    |_| true,
                    |pos| {
                        assert_eq!(pos, 0x8000);
                        !written
                    },
                )
                .unwrap();
            if written {
                assert_eq!((got.used, got.slots), (0x8001, 1));
                assert_eq!(got.resubmit, vec![(3, list(0, 1, 3))]);
            } else {
                assert_eq!((got.used, got.slots), (0x8000, 2));
                assert_eq!(got.resubmit.len(), 2);
            }
        }
    }

    #[test]
    fn packed_regions_that_do_not_add_up_are_refused() {
        let size = 8;
        let (_, mut t) = packed(size);
        let ok = |_| true;
        t.recover(0x8000, ok, |_| false).unwrap();
        t.taken(2, &list(0, 3, 2));
        // Two ids sharing copy entries.
        let first = t.r.w.get16(t.r.rec(2) + 2);
        t.r.w.set16(t.r.rec(6), 1);
        t.r.w.set16(t.r.rec(6) + 2, first);
        t.r.w.set16(t.r.rec(6) + 4, 1);
        assert_eq!(t.recover(0, ok, ok), Err(InflightError::Copies { id: 6 }));
        // More descriptors held than the ring has.
        t.r.w.set16(t.r.rec(6) + 4, 7);
        t.r.w.set16(t.r.rec(6) + 2, 7);
        assert_eq!(t.recover(0, ok, ok), Err(InflightError::Copies { id: 6 }));
        t.r.w.set16(t.r.rec(6), 0);
        t.r.w.set16(12, 0x7fff);
        assert_eq!(
            t.recover(0, |p| p & 0x7fff < size, ok),
            Err(InflightError::Position(0x7fff))
        );
        let (_, s) = region(RingFormat::Split, size);
        assert!(matches!(PackedTracker::new(&s), Err(InflightError::Format)));
    }

    /// A region's bytes for a queue of `size`: arbitrary (level 0), with this
    /// format's header and positions inside the ring (1), and also with entries
    /// that point inside the queue and flags mostly 0 or 1 (2), so recovery gets
    /// past its first checks.
    fn hostile(format: RingFormat, size: u16) -> impl Strategy<Value = Vec<u8>> {
        let len = usize::try_from(region_size(format, size)).unwrap();
        (prop::collection::vec(any::<u8>(), len), 0u8..3).prop_map(move |(mut b, level)| {
            let n = usize::from(size);
            let put = |b: &mut Vec<u8>, at: usize, v: u16| b[at..at + 2].copy_from_slice(&v.to_le_bytes());
            let get = |b: &Vec<u8>, at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
            let modulo = |b: &mut Vec<u8>, at: usize, m: u16| {
                let v = get(b, at) % m;
                put(b, at, v);
            };
            let packed = format == RingFormat::Packed;
            if level >= 1 {
                b[0..8].copy_from_slice(&u64::from(packed).to_le_bytes());
                put(&mut b, 8, VERSION);
                put(&mut b, 10, size);
                if packed {
                    // Used and pending: a slot in the ring, either wrap counter.
                    for at in [12, 14] {
                        let v = get(&b, at);
                        put(&mut b, at, (v & 0x8000) | ((v & 0x7fff) % size));
                    }
                }
            }
            if level >= 2 {
                let (entry, entries) = if packed {
                    (PACKED_ID, PACKED_HEADER)
                } else {
                    (SPLIT_DESC, SPLIT_HEADER)
                };
                for i in 0..n {
                    let at = entries + entry * i;
                    let raw = get(&b, at);
                    // Mostly 0 or 1; now and then anything.
                    put(&mut b, at, if raw % 16 == 15 { raw } else { raw % 2 });
                    if packed {
                        modulo(&mut b, at + 2, size);
                        modulo(&mut b, at + 4, 4);
                        modulo(&mut b, at + 6, size);
                        modulo(&mut b, PACKED_HEADER + PACKED_ID * n + PACKED_COPY * i + 18, size);
                    } else {
                        modulo(&mut b, at + 6, size);
                    }
                }
                if packed {
                    modulo(&mut b, 16, size);
                    modulo(&mut b, 18, size + 1);
                } else {
                    modulo(&mut b, 12, size);
                }
            }
            b
        })
    }

    fn filled(format: RingFormat, size: u16, bytes: &[u8]) -> InflightRegion {
        let m = Mapping::anonymous(bytes.len()).unwrap();
        m.region().write(0, bytes).unwrap();
        InflightRegion::new(m.region(), size, format).unwrap()
    }

    proptest! {
        /// HOSTILE 50: whatever the frontend left in a split region, recovery
        /// returns or refuses, and what it resubmits are distinct heads below the
        /// size; recovering again in the same process (a restarted device)
        /// resubmits exactly the same chains from the same position.
        #[test]
        fn any_split_region_recovers_distinct_heads_or_is_refused(
            (size, bytes) in (1u16..17).prop_flat_map(|n| (Just(n), hostile(RingFormat::Split, n))),
            ring_used in any::<u16>(),
            near in any::<bool>(),
            fresh in any::<u16>(),
        ) {
            let r = filled(RingFormat::Split, size, &bytes);
            let region_used = u16::from_le_bytes([bytes[14], bytes[15]]);
            // Mostly a ring whose used index is at most a queue ahead.
            let ring_used = if near { region_used.wrapping_add(ring_used % (size + 1)) } else { ring_used };
            let mut t = SplitTracker::new(&r).unwrap();
            if let Ok(got) = t.recover(ring_used, fresh) {
                let mut heads = got.resubmit.clone();
                heads.sort_unstable();
                heads.dedup();
                prop_assert_eq!(heads.len(), got.resubmit.len(), "a head twice: {:?}", got.resubmit);
                prop_assert!(heads.iter().all(|&h| h < size));
                let mut again = SplitTracker::new(&r).unwrap();
                prop_assert_eq!(again.recover(ring_used, fresh), Ok(got));
            }
        }

        /// HOSTILE 50, packed: recovery returns or refuses; the ids resubmitted are
        /// distinct and below the size, their lists hold `slots` descriptors in
        /// all, at most the size, the copies they keep are not handed out again,
        /// and recovering again resubmits the same.
        #[test]
        fn any_packed_region_recovers_distinct_lists_within_the_ring_or_is_refused(
            (size, bytes) in (1u16..17).prop_flat_map(|n| (Just(n), hostile(RingFormat::Packed, n))),
            written in any::<bool>(),
            fresh in any::<u16>(),
        ) {
            let r = filled(RingFormat::Packed, size, &bytes);
            let in_ring = |p: u16| p & 0x7fff < size;
            let mut t = PackedTracker::new(&r).unwrap();
            if let Ok(got) = t.recover(fresh, in_ring, |_| !written) {
                let mut ids: Vec<u16> = got.resubmit.iter().map(|(id, _)| *id).collect();
                ids.sort_unstable();
                ids.dedup();
                prop_assert_eq!(ids.len(), got.resubmit.len());
                prop_assert!(ids.iter().all(|&id| id < size));
                let descs: usize = got.resubmit.iter().map(|(_, d)| d.len()).sum();
                prop_assert!(got.resubmit.iter().all(|(_, d)| !d.is_empty()));
                prop_assert_eq!(descs, usize::from(got.slots));
                prop_assert!(got.slots <= size);
                let mut copies: Vec<u16> = t.entries.iter().flatten().chain(&t.free).copied().collect();
                prop_assert_eq!(copies.len(), usize::from(size));
                copies.sort_unstable();
                copies.dedup();
                prop_assert_eq!(copies.len(), usize::from(size), "a copy entry both held and free");
                let mut again = PackedTracker::new(&r).unwrap();
                prop_assert_eq!(again.recover(fresh, in_ring, |_| !written), Ok(got));
            }
        }
    }
}
