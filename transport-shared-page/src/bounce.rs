//! The bounce-area allocator: a binary buddy allocator with per-size quick lists.
//!
//! One allocator manages one queue's bounce area. Its bookkeeping lives in the
//! driver's private memory (never in the shared region, where the device could forge
//! it) and is allocated once, when the queue is created: no heap allocation per buffer.
//!
//! - Blocks are `64 << order` bytes, aligned to their size, so every buffer starts on
//!   its own cache line (no false sharing between a buffer the device is writing and
//!   one the driver is copying) and indirect tables get their 16-byte alignment.
//! - Allocation takes the smallest non-empty free list at or above the wanted order
//!   (one bit scan over a mask of non-empty lists) and splits it down; freeing merges
//!   with the buddy while the buddy is free. Both are O(number of orders).
//! - Quick lists make the typical case O(1): a freed small block is parked, unmerged,
//!   on a short list of its size, and the next allocation of that size pops it. A
//!   queue moving one buffer size (a net queue of 1514-byte frames, a block queue of
//!   64 KiB requests) thus never splits or merges in steady state. When a request
//!   cannot be served, the quick lists are drained (merged) and the search retried,
//!   so parked blocks never make an allocation fail.
//! - Every block's head carries a tag (free, parked, allocated) and its order, so a
//!   free of something that is not a live allocation of that order is refused instead
//!   of corrupting the lists.

use crate::layout::MAX_BOUNCE_PER_QUEUE;

/// Smallest block: one cache line.
pub const MIN_BLOCK: u64 = 64;
const MIN_SHIFT: u32 = MIN_BLOCK.trailing_zeros();
/// Largest order representable; 1 GiB of 64-byte blocks needs orders up to 24.
const MAX_ORDER: u32 = 31;
const ORDERS: usize = MAX_ORDER as usize + 1;
/// Orders with quick lists: 64 B up to 64 KiB.
const QUICK_ORDERS: u32 = 11;
/// Blocks parked per quick list; the lists are preallocated to this capacity.
const QUICK_CAP: usize = 64;
const NIL: u32 = u32::MAX;

const TAG_FREE: u8 = 0x40;
const TAG_ALLOC: u8 = 0x80;
const TAG_QUICK: u8 = 0xc0;

/// A live allocation: byte offset in the area and order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Offset of the first byte from the start of the area.
    pub offset: u32,
    /// The block is `MIN_BLOCK << order` bytes.
    pub order: u8,
}

impl Block {
    /// Size of the block in bytes.
    pub fn size(self) -> u64 {
        MIN_BLOCK << self.order
    }
}

/// Buddy allocator over an area of `blocks * MIN_BLOCK` bytes.
pub struct BounceAlloc {
    blocks: u32,
    max_order: u32,
    /// Head of the free list of each order.
    heads: [u32; ORDERS],
    /// Bit `o` set when `heads[o]` is not empty.
    nonempty: u32,
    /// `[next, prev]` of each free block head, indexed by block number.
    links: Box<[[u32; 2]]>,
    /// Tag and order of each block head; 0 inside a block.
    state: Box<[u8]>,
    /// Parked blocks per order, allocated and freed without merging.
    quick: [Vec<u32>; QUICK_ORDERS as usize],
    capacity: u64,
    free_bytes: u64,
    live: usize,
}

impl std::fmt::Debug for BounceAlloc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BounceAlloc")
            .field("capacity", &self.capacity)
            .field("free_bytes", &self.free_bytes)
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

/// A block-head state byte: `tag` with `order` (below 32) in the low bits.
#[inline]
#[allow(clippy::cast_possible_truncation)] // masked to six bits
fn tag(tag: u8, order: u32) -> u8 {
    tag | (order & 0x3f) as u8
}

/// The order of the smallest block holding `len` bytes.
fn order_for(len: u32) -> u32 {
    let blocks = u64::from(len.max(1)).div_ceil(MIN_BLOCK);
    blocks.next_power_of_two().trailing_zeros()
}

impl BounceAlloc {
    /// An allocator over `len` bytes, rounded down to whole blocks and capped at
    /// [`MAX_BOUNCE_PER_QUEUE`] so that every offset fits in a `u32`.
    pub fn new(len: u64) -> BounceAlloc {
        let len = len.min(MAX_BOUNCE_PER_QUEUE);
        // At most 2^24 blocks.
        let blocks = u32::try_from(len >> MIN_SHIFT).unwrap_or(0);
        let max_order = if blocks == 0 {
            0
        } else {
            (u32::BITS - 1 - blocks.leading_zeros()).min(MAX_ORDER)
        };
        let mut a = BounceAlloc {
            blocks,
            max_order,
            heads: [NIL; ORDERS],
            nonempty: 0,
            links: vec![[NIL, NIL]; blocks as usize].into_boxed_slice(),
            state: vec![0; blocks as usize].into_boxed_slice(),
            quick: std::array::from_fn(|_| Vec::with_capacity(QUICK_CAP)),
            capacity: u64::from(blocks) << MIN_SHIFT,
            free_bytes: 0,
            live: 0,
        };
        // Carve the area into the largest aligned blocks that fit.
        let mut b = 0u32;
        while b < blocks {
            let mut o = max_order.min(b.trailing_zeros());
            while b + (1 << o) > blocks {
                o -= 1;
            }
            a.push(b, o);
            b += 1 << o;
        }
        a.free_bytes = a.capacity;
        a
    }

    /// Bytes managed.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes not allocated (parked blocks count as free).
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    /// Allocations not yet freed.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Allocates a block of at least `len` bytes, or `None` if no free range is large
    /// enough even after merging parked blocks.
    pub fn alloc(&mut self, len: u32) -> Option<Block> {
        let order = order_for(len);
        if order > self.max_order {
            return None;
        }
        let block = match self.quick.get_mut(order as usize).and_then(Vec::pop) {
            Some(b) => b,
            None => match self.take(order) {
                Some(b) => b,
                None => {
                    self.drain_quick();
                    self.take(order)?
                }
            },
        };
        self.state[block as usize] = tag(TAG_ALLOC, order);
        self.free_bytes -= MIN_BLOCK << order;
        self.live += 1;
        Some(Block {
            // `block < blocks <= 2^24`, so the offset is below 2^30.
            offset: block << MIN_SHIFT,
            order: tag(0, order),
        })
    }

    /// Frees a block returned by [`Self::alloc`]. Returns `false`, changing nothing,
    /// if it is not a live allocation of that order (a double free, a forged block).
    pub fn free(&mut self, block: Block) -> bool {
        let b = block.offset >> MIN_SHIFT;
        let order = u32::from(block.order);
        let valid = u64::from(block.offset) % MIN_BLOCK == 0
            && b < self.blocks
            && self.state.get(b as usize) == Some(&(TAG_ALLOC | block.order))
            && order <= self.max_order;
        if !valid {
            return false;
        }
        self.free_bytes += block.size();
        self.live -= 1;
        if let Some(q) = self.quick.get_mut(order as usize)
            && q.len() < QUICK_CAP
        {
            self.state[b as usize] = TAG_QUICK | block.order;
            q.push(b);
            return true;
        }
        self.release(b, order);
        true
    }

    /// Merges every parked block back into the free lists.
    pub fn drain_quick(&mut self) {
        for o in 0..QUICK_ORDERS {
            while let Some(b) = self.quick[o as usize].pop() {
                self.release(b, o);
            }
        }
    }

    /// The largest block that can be allocated right now without draining parked
    /// blocks, in bytes (0 if none).
    pub fn largest_free(&self) -> u64 {
        match self.nonempty {
            0 => 0,
            m => MIN_BLOCK << (u32::BITS - 1 - m.leading_zeros()),
        }
    }

    /// Takes a free block of exactly `order`, splitting a larger one if needed.
    fn take(&mut self, order: u32) -> Option<u32> {
        let m = self.nonempty >> order;
        if m == 0 {
            return None;
        }
        let mut o = order + m.trailing_zeros();
        let b = self.heads[o as usize];
        self.unlink(b, o);
        while o > order {
            o -= 1;
            self.push(b + (1 << o), o);
        }
        Some(b)
    }

    /// Returns block `b` of `order` to the free lists, merging with free buddies.
    fn release(&mut self, mut b: u32, mut order: u32) {
        self.state[b as usize] = 0;
        while order < self.max_order {
            let buddy = b ^ (1 << order);
            if self.state.get(buddy as usize) != Some(&(tag(TAG_FREE, order))) {
                break;
            }
            self.unlink(buddy, order);
            self.state[buddy as usize] = 0;
            b = b.min(buddy);
            order += 1;
        }
        self.push(b, order);
    }

    fn push(&mut self, b: u32, o: u32) {
        let head = self.heads[o as usize];
        self.links[b as usize] = [head, NIL];
        if head != NIL {
            self.links[head as usize][1] = b;
        }
        self.heads[o as usize] = b;
        self.nonempty |= 1 << o;
        self.state[b as usize] = tag(TAG_FREE, o);
    }

    fn unlink(&mut self, b: u32, o: u32) {
        let [next, prev] = self.links[b as usize];
        if prev == NIL {
            self.heads[o as usize] = next;
            if next == NIL {
                self.nonempty &= !(1 << o);
            }
        } else {
            self.links[prev as usize][0] = next;
        }
        if next != NIL {
            self.links[next as usize][1] = prev;
        }
    }

    /// Checks every internal invariant against the `live` blocks the caller holds:
    /// free, parked and live blocks tile the area without overlap, tags agree with
    /// the lists, and the byte counts add up.
    #[cfg(test)]
    #[allow(clippy::cast_possible_truncation)] // orders are below 32
    pub fn check(&self, live: &[Block]) {
        let mut spans: Vec<(u32, u32, u8)> = Vec::new();
        for o in 0..ORDERS as u32 {
            let mut b = self.heads[o as usize];
            let mut prev = NIL;
            assert_eq!(b != NIL, self.nonempty & (1 << o) != 0, "mask of order {o}");
            while b != NIL {
                assert_eq!(self.state[b as usize], TAG_FREE | o as u8);
                assert_eq!(self.links[b as usize][1], prev);
                assert_eq!(b % (1 << o), 0, "free block alignment");
                spans.push((b, 1 << o, TAG_FREE));
                prev = b;
                b = self.links[b as usize][0];
            }
        }
        for (o, q) in self.quick.iter().enumerate() {
            for &b in q {
                assert_eq!(self.state[b as usize], TAG_QUICK | o as u8);
                spans.push((b, 1 << o, TAG_QUICK));
            }
        }
        for l in live {
            let b = l.offset >> MIN_SHIFT;
            assert_eq!(self.state[b as usize], TAG_ALLOC | l.order);
            spans.push((b, 1 << l.order, TAG_ALLOC));
        }
        spans.sort_unstable();
        let mut at = 0;
        for &(b, n, _) in &spans {
            assert_eq!(b, at, "blocks must tile the area without gap or overlap");
            at = b + n;
        }
        assert_eq!(at, self.blocks);
        let free: u64 = spans
            .iter()
            .filter(|s| s.2 != TAG_ALLOC)
            .map(|s| u64::from(s.1) << MIN_SHIFT)
            .sum();
        assert_eq!(free, self.free_bytes);
        assert_eq!(live.len(), self.live);
        let tagged = self.state.iter().filter(|&&s| s != 0).count();
        assert_eq!(tagged, spans.len(), "no stray tags");
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test data
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn orders_round_up_to_cache_lines() {
        assert_eq!(order_for(0), 0);
        assert_eq!(order_for(1), 0);
        assert_eq!(order_for(64), 0);
        assert_eq!(order_for(65), 1);
        assert_eq!(order_for(1514), 5);
        assert_eq!(order_for(65536), 10);
        assert_eq!(order_for(u32::MAX), 26);
    }

    #[test]
    fn carves_non_power_of_two_areas_and_merges_back() {
        // 5 pages: a 16 KiB block and a 4 KiB block.
        let mut a = BounceAlloc::new(5 * 4096);
        a.check(&[]);
        assert_eq!(a.largest_free(), 16384);
        let x = a.alloc(16384).unwrap();
        let y = a.alloc(4096).unwrap();
        assert!(a.alloc(1).is_none(), "full");
        assert_eq!(a.free_bytes(), 0);
        a.check(&[x, y]);
        assert!(a.free(y));
        assert!(a.free(x));
        a.drain_quick();
        a.check(&[]);
        assert_eq!(a.largest_free(), 16384);
        assert_eq!(a.free_bytes(), 5 * 4096);
    }

    #[test]
    fn double_and_forged_frees_are_refused() {
        let mut a = BounceAlloc::new(1 << 20);
        let x = a.alloc(100).unwrap();
        assert!(!a.free(Block { order: 0, ..x }), "wrong order");
        assert!(
            !a.free(Block {
                offset: x.offset + 64,
                ..x
            }),
            "not a head"
        );
        assert!(!a.free(Block { offset: 1 << 30, ..x }), "outside");
        assert!(a.free(x));
        assert!(!a.free(x), "double free of a parked block");
        a.drain_quick();
        assert!(!a.free(x), "double free of a merged block");
        a.check(&[]);
    }

    #[test]
    fn parked_blocks_never_cause_a_failure() {
        let mut a = BounceAlloc::new(64 * 1024);
        let small: Vec<_> = (0..1024).map(|_| a.alloc(64).unwrap()).collect();
        assert!(a.alloc(1).is_none());
        for b in small {
            assert!(a.free(b));
        }
        // Up to QUICK_CAP blocks are parked, unmerged; a whole-area request still fits.
        let big = a.alloc(64 * 1024).expect("parked blocks are merged on demand");
        a.check(&[big]);
    }

    #[test]
    fn steady_state_reuses_the_same_block() {
        let mut a = BounceAlloc::new(4 << 20);
        let x = a.alloc(1514).unwrap();
        a.free(x);
        let y = a.alloc(1514).unwrap();
        assert_eq!(x, y, "quick list hit");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u32),
        Free(usize),
        Drain,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u32..=65536).prop_map(Op::Alloc),
            2 => (1u32..=256).prop_map(Op::Alloc),
            5 => any::<usize>().prop_map(Op::Free),
            1 => Just(Op::Drain),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Random alloc/free sequences never hand out overlapping live blocks, never
        /// lose bytes, and return to the initial state once everything is freed.
        #[test]
        fn never_leaks_never_overlaps(ops in proptest::collection::vec(op(), 1..400)) {
            let mut a = BounceAlloc::new(1 << 20);
            let initial_largest = a.largest_free();
            let mut live: Vec<(Block, u32)> = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Alloc(len) => {
                        if let Some(b) = a.alloc(len) {
                            prop_assert!(b.size() >= u64::from(len));
                            prop_assert_eq!(u64::from(b.offset) % 64, 0);
                            prop_assert!(u64::from(b.offset) + b.size() <= a.capacity());
                            let (s, e) = (u64::from(b.offset), u64::from(b.offset) + u64::from(len));
                            for (o, _) in &live {
                                let (os, oe) = (u64::from(o.offset), u64::from(o.offset) + o.size());
                                prop_assert!(e <= os || oe <= s, "overlap");
                            }
                            live.push((b, len));
                        } else {
                            // Refused only when no block of that order is free.
                            prop_assert!(a.largest_free() < b_size(len));
                        }
                    }
                    Op::Free(k) if !live.is_empty() => {
                        let (b, _) = live.swap_remove(k % live.len());
                        prop_assert!(a.free(b));
                    }
                    Op::Free(_) => {}
                    Op::Drain => a.drain_quick(),
                }
                if i % 16 == 0 {
                    a.check(&live.iter().map(|l| l.0).collect::<Vec<_>>());
                }
            }
            // What a queue reset does: retire everything still outstanding.
            for (b, _) in live.drain(..) {
                prop_assert!(a.free(b));
            }
            prop_assert_eq!(a.free_bytes(), a.capacity());
            prop_assert_eq!(a.live(), 0);
            a.drain_quick();
            a.check(&[]);
            prop_assert_eq!(a.largest_free(), initial_largest);
        }
    }

    fn b_size(len: u32) -> u64 {
        MIN_BLOCK << order_for(len)
    }
}
