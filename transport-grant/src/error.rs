//! Why a grant operation was refused.

use crate::table::GrantRef;
use hypervisor::{DomainId, MemoryError};

/// Why the grant machinery refused an operation.
///
/// Every refusal happens before any byte moves: a refused copy copied nothing, a
/// refused map mapped nothing, a refused grant granted nothing.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The reference is 0 (reserved) or beyond the granter's table.
    #[error("{0} is not an entry of the grant table")]
    BadRef(GrantRef),
    /// The entry names another domain as the one allowed to use it.
    #[error("{gref} is granted to {granted_to}, not to {caller}")]
    WrongDomain {
        /// The reference.
        gref: GrantRef,
        /// The domain the granter named.
        granted_to: DomainId,
        /// The domain that tried to use it.
        caller: DomainId,
    },
    /// Write access (a writable map, a copy into the frame) through a read-only grant.
    #[error("{0} is a read-only grant")]
    ReadOnly(GrantRef),
    /// The entry is free and was never granted since it was last reused.
    #[error("{0} is not granted")]
    NotGranted(GrantRef),
    /// The granter ended access to the entry (use after `end_access`).
    #[error("{0} was revoked")]
    Revoked(GrantRef),
    /// `end_access` while the grantee still maps the frame (Xen's
    /// `gnttab_end_foreign_access_ref` failing on an in-use entry).
    #[error("{gref} is still mapped {maps} times")]
    StillMapped {
        /// The reference.
        gref: GrantRef,
        /// Live mappings.
        maps: u32,
    },
    /// A transfer to an entry that does not await one from the sender.
    #[error("{0} is not accepting a transfer")]
    NotAccepting(GrantRef),
    /// A page operation on an address that is not page aligned.
    #[error("guest address {0:#x} is not page aligned")]
    Unaligned(u64),
    /// An access outside the bytes the grant (or grant range) covers.
    #[error("{offset:#x}+{len:#x} from {gref} lies outside the granted bytes")]
    OutOfRange {
        /// The reference the access started from.
        gref: GrantRef,
        /// Offset from the start of that reference's page.
        offset: u64,
        /// Length of the access.
        len: u64,
    },
    /// A grant of memory the granter does not have.
    #[error("guest range {gpa:#x}+{len:#x} is outside the granter's memory")]
    OutsideMemory {
        /// Guest address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A map of an entry that grants only part of its page (Xen's sub-page grants
    /// can be copied, never mapped: a mapping would expose the whole page).
    #[error("{0} grants part of a page and can only be copied")]
    SubPage(GrantRef),
    /// A map of an entry its granter made for copying only (a one-shot buffer: the
    /// granter must be able to end it the moment it retires the buffer).
    #[error("{0} was granted for copying only")]
    CopyOnly(GrantRef),
    /// A grant of nothing.
    #[error("a grant must cover at least one byte")]
    Empty,
    /// The domain does not exist or has no memory (the host backend).
    #[error("{0} has no memory")]
    NoSuchDomain(DomainId),
    /// The granter's table has no run of free entries long enough.
    #[error("grant table of {0} is full")]
    TableFull(DomainId),
    /// A descriptor address that does not encode a grant reference and offset.
    #[error("descriptor address {0:#x} is not a grant address")]
    BadAddress(u64),
    /// A transfer of a page that the sender still grants to someone.
    #[error("page {0:#x} is still granted")]
    PageInUse(u64),
    /// A frame is mapped more often than a map count can hold.
    #[error("{0} is mapped too many times")]
    MapLimit(GrantRef),
    /// The guest's pages are not 4 KiB, the size grant addresses are built on.
    #[error("page size {0} is not supported")]
    PageSize(u64),
    /// The hypervisor could not map the frames.
    #[error("mapping the granted frames failed")]
    Map(#[source] MemoryError),
}
