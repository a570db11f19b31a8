//! What a descriptor `addr` means under the grant model.
//!
//! ```text
//!  63   62 ........ 44  43 ................ 12  11 ........ 0
//! [ P ][  must be 0  ][  grant reference    ][ offset in page ]
//! ```
//!
//! - The reference names an entry of the *driver's* grant table; the offset is where
//!   the buffer starts inside that entry's page. A descriptor's `len` may run on into
//!   the following references, as long as they belong to the same
//!   [`grant_range`](crate::GrantService::grant_range) (which grants consecutive
//!   pages under consecutive references) and stay inside the bytes it granted.
//! - `P` is a hint that the reference is persistent (blkif's persistent grants): it
//!   stays granted across requests, so the device maps it once and keeps the mapping.
//!   Without it the device copies through the hypervisor (`GNTTABOP_copy`). A wrong
//!   hint costs the driver only itself: a persistent mapping it cannot revoke until the
//!   device lets go, or a copy where a mapping was possible.
//! - Queue addresses (`queue_desc`, `queue_driver`, `queue_device`) use the same
//!   encoding, without `P`.

use crate::error::GrantError;
use crate::table::{GrantRef, PAGE_SHIFT, PAGE_SIZE};

/// The persistent-grant hint bit.
pub const PERSISTENT: u64 = 1 << 63;

/// Bits that must be zero: between the reference and the hint.
const RESERVED: u64 = !PERSISTENT & !((1u64 << (32 + PAGE_SHIFT)) - 1);

/// A decoded grant address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantAddr {
    /// The reference of the buffer's first page.
    pub gref: GrantRef,
    /// Offset of the first byte in that page.
    pub offset: u32,
    /// The persistent hint.
    pub persistent: bool,
}

/// Builds the descriptor address of `offset` (below 4096) in `gref`'s page.
pub fn encode(gref: GrantRef, offset: u32, persistent: bool) -> u64 {
    let p = if persistent { PERSISTENT } else { 0 };
    p | (u64::from(gref.0) << PAGE_SHIFT) | (u64::from(offset) & (PAGE_SIZE - 1))
}

/// Splits a descriptor address; refuses reserved bits.
#[allow(clippy::cast_possible_truncation)] // fields masked to 32 and 12 bits
pub fn decode(addr: u64) -> Result<GrantAddr, GrantError> {
    if addr & RESERVED != 0 {
        return Err(GrantError::BadAddress(addr));
    }
    let gref = ((addr & !PERSISTENT) >> PAGE_SHIFT) as u32;
    let offset = (addr & (PAGE_SIZE - 1)) as u32;
    Ok(GrantAddr {
        gref: GrantRef(gref),
        offset,
        persistent: addr & PERSISTENT != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_reserved_bits() {
        let a = encode(GrantRef(0xdead_beef), 0xabc, true);
        assert_eq!(
            decode(a).unwrap(),
            GrantAddr {
                gref: GrantRef(0xdead_beef),
                offset: 0xabc,
                persistent: true
            }
        );
        assert_eq!(encode(GrantRef(5), 0, false), 5 << 12);
        assert!(matches!(decode(1 << 44), Err(GrantError::BadAddress(_))));
        assert!(matches!(decode(1 << 62), Err(GrantError::BadAddress(_))));
        assert_eq!(decode(u64::MAX >> 20).unwrap().gref, GrantRef(u32::MAX));
    }
}
