//! Guest staging buffers for the copying convenience calls.
//!
//! (Not a bounce area: in this workspace "bounce" names only sharing model 1's
//! per-queue area the device copies through, `transport-shared-page`. A staging
//! buffer is ordinary guest memory the driver copies a caller's slice into, over
//! any model.)
//!
//! A staging buffer is guest memory owned by the driver. While its request is in
//! flight it belongs to the request's slot, not to the caller, so a cancelled future
//! or a timed-out call can never free memory the device may still write; the slot
//! hands it back to the pool when the device returns the request.

use hypervisor::GuestMemory;

/// Smallest buffer handed out: one page, so a page-granting model (grant tables)
/// never shares a page between two buffers.
const MIN_SHIFT: u32 = 12;
/// Buffers kept per size class for reuse; beyond that they go back to the guest
/// allocator.
const KEEP_PER_CLASS: usize = 8;

/// A driver-owned buffer of `cap` bytes at guest address `gpa`.
#[derive(Debug)]
pub(crate) struct Staging {
    pub gpa: u64,
    cap_shift: u32,
}

/// Power-of-two size classes of reusable buffers: after warm-up, a copying call costs
/// no allocation.
#[derive(Debug, Default)]
pub(crate) struct StagingPool {
    classes: Vec<Vec<u64>>,
}

impl StagingPool {
    /// A buffer of at least `len` bytes, page aligned.
    pub(crate) fn take(&mut self, mem: &GuestMemory, len: u32) -> Result<Staging, hypervisor::MemoryError> {
        let cap = u64::from(len).next_power_of_two().max(1 << MIN_SHIFT);
        let cap_shift = cap.trailing_zeros();
        let class = (cap_shift - MIN_SHIFT) as usize;
        if let Some(gpa) = self.classes.get_mut(class).and_then(Vec::pop) {
            return Ok(Staging { gpa, cap_shift });
        }
        let gpa = mem.alloc(cap, 1 << MIN_SHIFT)?;
        Ok(Staging { gpa, cap_shift })
    }

    /// Takes a buffer back once no device can touch it any more.
    pub(crate) fn give(&mut self, mem: &GuestMemory, b: Staging) {
        let class = (b.cap_shift - MIN_SHIFT) as usize;
        if self.classes.len() <= class {
            self.classes.resize_with(class + 1, Vec::new);
        }
        let list = &mut self.classes[class];
        if list.len() < KEEP_PER_CLASS {
            list.push(b.gpa);
        } else {
            free(mem, b.gpa, 1 << b.cap_shift);
        }
    }

    /// Returns every cached buffer to the guest allocator.
    pub(crate) fn drain(&mut self, mem: &GuestMemory) {
        for (class, list) in self.classes.iter_mut().enumerate() {
            let len = 1u64 << (u32::try_from(class).unwrap_or(0) + MIN_SHIFT);
            for gpa in list.drain(..) {
                free(mem, gpa, len);
            }
        }
    }
}

fn free(mem: &GuestMemory, gpa: u64, len: u64) {
    if let Err(error) = mem.free(gpa, len) {
        tracing::error!(%error, gpa, len, "freeing a staging buffer failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_by_size_class_and_drained() {
        let mem = GuestMemory::new("staging", 0x10_0000, 1 << 20).unwrap();
        let before = mem.free_bytes();
        let mut pool = StagingPool::default();
        let a = pool.take(&mem, 100).unwrap();
        assert_eq!(a.gpa % 4096, 0);
        let a_gpa = a.gpa;
        pool.give(&mem, a);
        assert_eq!(pool.take(&mem, 4096).unwrap().gpa, a_gpa, "same class reused");
        let big = pool.take(&mem, 5000).unwrap();
        assert_eq!(big.cap_shift, 13);
        pool.give(&mem, big);
        pool.drain(&mem);
        assert_eq!(
            mem.free_bytes(),
            before - 4096,
            "only the buffer still out is allocated"
        );
    }
}
