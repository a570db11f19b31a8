//! VIRTIO_F_IN_ORDER on the device side: completions held back until every chain
//! taken before them is done, then returned in batches, one used entry per batch
//! (virtio 1.2 §2.7.9 for the split ring, §2.8.x "In-order use of descriptors" for
//! the packed one).
//!
//! A device that negotiated IN_ORDER promises to use buffers in the order they were
//! made available. Our devices finish work out of order (io_uring completes a
//! request when the disk does), so the ring keeps the promise for them: a device
//! calls `add_used` whenever a chain is done, and [`InOrder`] releases the
//! completed prefix, in the order the chains were taken. No device has to know.
//!
//! The driver assumes every chain of a batch but the last was used completely
//! (its whole writable length), so a chain that was not (a shorter read, a
//! rejected chain) ends its batch and gets a used entry of its own.

use crate::ring::split::UsedError;

/// One chain of the completed prefix, as [`InOrder::pop_ready`] hands it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Done {
    /// Head (split ring) or buffer id (packed ring).
    pub id: u16,
    /// Used length.
    pub len: u32,
    /// Whether the chain ends a batch: its used entry must be written, and the
    /// device skips past the batch. True for the last chain of the prefix and for
    /// a chain not used completely.
    pub ends_batch: bool,
}

/// The device's record of the chains it took and has not returned, in the order
/// it took them, with the completions that wait for an earlier chain.
///
/// The order is a fixed circular buffer of `size` entries (a queue never holds
/// more chains than its size), so taking and returning a chain costs two stores
/// and no allocation.
#[derive(Debug)]
pub(crate) struct InOrder {
    /// Heads or ids in the order they were taken, from `start`, `len` of them.
    taken: Box<[u16]>,
    start: usize,
    len: usize,
    /// Per head or id: `Some((len, complete))` once the device finished it.
    done: Box<[Option<(u32, bool)>]>,
}

impl InOrder {
    /// A record for a queue of `size` entries.
    pub(crate) fn new(size: u16) -> Self {
        let n = usize::from(size).max(1);
        InOrder {
            taken: vec![0; n].into_boxed_slice(),
            start: 0,
            len: 0,
            done: vec![None; n].into_boxed_slice(),
        }
    }

    /// The position `i` entries after `start` in the circular buffer.
    #[inline]
    fn at(&self, i: usize) -> usize {
        let p = self.start + i;
        if p >= self.taken.len() {
            p - self.taken.len()
        } else {
            p
        }
    }

    /// Records that the device took `id` (held by the caller, so below the size and
    /// not already taken: at most `size` are ever recorded).
    #[inline]
    pub(crate) fn taken(&mut self, id: u16) {
        if self.len < self.taken.len() {
            let p = self.at(self.len);
            self.taken[p] = id;
            self.len += 1;
        }
    }

    /// Records that `id` is done with `len` bytes written; `complete` says whether
    /// that is the whole writable length, which lets a later entry cover it. A
    /// second completion of the same id is the device's own misuse.
    #[inline]
    pub(crate) fn complete(&mut self, id: u16, len: u32, complete: bool) -> Result<(), UsedError> {
        match self.done.get_mut(usize::from(id)) {
            Some(slot @ None) => {
                *slot = Some((len, complete));
                Ok(())
            }
            _ => Err(UsedError::NotInFlight(id)),
        }
    }

    /// The oldest chain taken, if it is done: takes it out of the record. Called
    /// until `None`, it hands out the completed prefix in the order the chains
    /// were taken.
    #[inline]
    pub(crate) fn pop_ready(&mut self) -> Option<Done> {
        if self.len == 0 {
            return None;
        }
        let id = self.taken[self.start];
        let (len, complete) = self.done[usize::from(id)].take()?;
        self.start = self.at(1);
        self.len -= 1;
        let next_done = self.len > 0 && self.done[usize::from(self.taken[self.start])].is_some();
        Some(Done {
            id,
            len,
            ends_batch: !complete || !next_done,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flushed(o: &mut InOrder) -> Vec<(u16, u32, bool)> {
        std::iter::from_fn(|| o.pop_ready())
            .map(|d| (d.id, d.len, d.ends_batch))
            .collect()
    }

    #[test]
    fn completions_wait_for_every_earlier_chain_and_leave_in_taking_order() {
        let mut o = InOrder::new(8);
        for id in [3, 5, 1] {
            o.taken(id);
        }
        o.complete(1, 10, true).unwrap();
        o.complete(5, 20, true).unwrap();
        assert!(flushed(&mut o).is_empty(), "3 is not done: nothing leaves");
        o.complete(3, 30, true).unwrap();
        assert_eq!(flushed(&mut o), [(3, 30, false), (5, 20, false), (1, 10, true)]);
    }

    #[test]
    fn a_chain_not_used_completely_ends_its_batch() {
        let mut o = InOrder::new(8);
        for id in 0..4 {
            o.taken(id);
        }
        o.complete(0, 4, true).unwrap();
        o.complete(1, 2, false).unwrap();
        o.complete(2, 4, true).unwrap();
        o.complete(3, 4, true).unwrap();
        assert_eq!(
            flushed(&mut o),
            [(0, 4, false), (1, 2, true), (2, 4, false), (3, 4, true)]
        );
    }

    #[test]
    fn a_second_completion_of_a_waiting_id_is_refused() {
        let mut o = InOrder::new(4);
        o.taken(0);
        o.taken(1);
        o.complete(1, 0, true).unwrap();
        assert_eq!(o.complete(1, 0, true), Err(UsedError::NotInFlight(1)));
        assert_eq!(o.complete(9, 0, true), Err(UsedError::NotInFlight(9)));
        assert!(flushed(&mut o).is_empty());
    }
}
