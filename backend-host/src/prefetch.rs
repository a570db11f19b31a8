//! Cache prefetch hints.
//!
//! A frame handed from one worker to another was written on the other core; the
//! receiving worker stalls on its first bytes unless it asks for them early. A
//! prefetch is only a hint: it reads nothing into the program, cannot fault, and
//! costs one instruction.

/// Asks the CPU to bring the first cache line of `bytes` into this core's cache.
#[inline]
pub(crate) fn read(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: `_mm_prefetch` needs SSE, which every x86_64 CPU has (it is in
        // the target's baseline features). A prefetch never faults and never
        // changes memory or registers, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}
