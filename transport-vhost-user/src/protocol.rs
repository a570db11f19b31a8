//! The vhost-user wire format, front-end side: the requests this crate sends and the
//! bodies they carry (vhost-user protocol, "Message specification" and "Front-end
//! message types" in QEMU's docs/interop/vhost-user.rst).
//!
//! Every message is a 12-byte [`Header`] followed by `size` bytes of body. Numbers
//! are in host byte order (the protocol is local to one machine), so the bodies use
//! native integer fields.

use bitflags::bitflags;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The protocol version in the low two bits of every header's flags.
pub const VERSION: u32 = 0x1;
/// Header flag: this message is a reply.
pub const FLAG_REPLY: u32 = 1 << 2;
/// Header flag: the sender wants a REPLY_ACK for a request that has no reply of its
/// own (needs [`ProtocolFeatures::REPLY_ACK`]).
pub const FLAG_NEED_REPLY: u32 = 1 << 3;
/// Mask of the version bits.
pub const VERSION_MASK: u32 = 0x3;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: a vhost-user bit in the virtio feature word
/// (bit 30, unused by virtio), never shown to the driver. Negotiating it enables
/// protocol features and makes rings start disabled until SET_VRING_ENABLE.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// `VHOST_F_LOG_ALL`: a vhost bit in the virtio feature word (bit 26, in virtio's
/// reserved range) that turns on dirty logging for migration; never shown to the
/// driver.
pub const F_LOG_ALL: u64 = 1 << 26;

/// The feature bits that belong to vhost, not to the device.
pub const VHOST_FEATURES: u64 = F_PROTOCOL_FEATURES | F_LOG_ALL;

/// Largest body this crate accepts in a reply: far above any reply it asks for
/// (the largest is GET_CONFIG's 12 + 256 bytes), so a hostile size allocates nothing.
pub const MAX_REPLY_BODY: usize = 4096;

/// Largest configuration space GET_CONFIG / SET_CONFIG carry (the protocol's
/// `VHOST_USER_MAX_CONFIG_SIZE`).
pub const MAX_CONFIG_SIZE: usize = 256;

/// `VHOST_SET_CONFIG_TYPE_FRONTEND`: a SET_CONFIG from the driver, not a migration.
pub const CONFIG_TYPE_FRONTEND: u32 = 0;

/// Front-end request codes this crate sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Request {
    /// Virtio features the back-end offers (reply: u64).
    GetFeatures = 1,
    /// Features the driver accepted, plus [`F_PROTOCOL_FEATURES`].
    SetFeatures = 2,
    /// Claims the back-end for this connection.
    SetOwner = 3,
    /// The memory regions and their file descriptors.
    SetMemTable = 5,
    /// Queue size.
    SetVringNum = 8,
    /// Ring addresses, in the front-end's address numbering.
    SetVringAddr = 9,
    /// The next available index the back-end will read.
    SetVringBase = 10,
    /// Stops the ring; the reply is the next available index it would read.
    GetVringBase = 11,
    /// The eventfd the back-end waits on for available buffers.
    SetVringKick = 12,
    /// The eventfd the back-end signals for used buffers.
    SetVringCall = 13,
    /// Protocol features the back-end offers (reply: u64).
    GetProtocolFeatures = 15,
    /// Protocol features the front-end accepted.
    SetProtocolFeatures = 16,
    /// How many queues the back-end has (reply: u64; needs MQ).
    GetQueueNum = 17,
    /// Enables or disables one ring.
    SetVringEnable = 18,
    /// Reads the device configuration space (needs CONFIG).
    GetConfig = 24,
    /// Writes the device configuration space (needs CONFIG).
    SetConfig = 25,
}

impl Request {
    /// The code on the wire.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// Whether the protocol defines a reply for this request. Requests without one
    /// get a REPLY_ACK when [`FLAG_NEED_REPLY`] is set.
    pub const fn has_reply(self) -> bool {
        matches!(
            self,
            Request::GetFeatures
                | Request::GetVringBase
                | Request::GetProtocolFeatures
                | Request::GetQueueNum
                | Request::GetConfig
        )
    }
}

bitflags! {
    /// vhost-user protocol features (GET_PROTOCOL_FEATURES).
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
    pub struct ProtocolFeatures: u64 {
        /// "Multiple queue support": GET_QUEUE_NUM.
        const MQ = 1 << 0;
        /// Dirty log in shared memory (migration).
        const LOG_SHMFD = 1 << 1;
        /// SEND_RARP (vhost-user-net migration).
        const RARP = 1 << 2;
        /// "The back-end replies to any request with NEED_REPLY set."
        const REPLY_ACK = 1 << 3;
        /// NET_SET_MTU.
        const MTU = 1 << 4;
        /// A back-end to front-end request channel.
        const BACKEND_REQ = 1 << 5;
        /// SET_VRING_ENDIAN.
        const CROSS_ENDIAN = 1 << 6;
        /// Crypto sessions.
        const CRYPTO_SESSION = 1 << 7;
        /// Post-copy migration page faults.
        const PAGEFAULT = 1 << 8;
        /// GET_CONFIG / SET_CONFIG: the device configuration space.
        const CONFIG = 1 << 9;
        /// File descriptors on the back-end channel.
        const BACKEND_SEND_FD = 1 << 10;
        /// Host notifier areas.
        const HOST_NOTIFIER = 1 << 11;
        /// Shared memory for in-flight I/O tracking (reconnect).
        const INFLIGHT_SHMFD = 1 << 12;
        /// RESET_DEVICE.
        const RESET_DEVICE = 1 << 13;
        /// Notifications over the socket instead of eventfds.
        const INBAND_NOTIFICATIONS = 1 << 14;
        /// ADD_MEM_REG / REM_MEM_REG.
        const CONFIGURE_MEM_SLOTS = 1 << 15;
        /// SET_STATUS / GET_STATUS.
        const STATUS = 1 << 16;
        /// Xen mmap flags in memory regions.
        const XEN_MMAP = 1 << 17;
        /// Shared objects (virtio-gpu).
        const SHARED_OBJECT = 1 << 18;
        /// Device state transfer (migration).
        const DEVICE_STATE = 1 << 19;
    }
}

/// Every message starts with this.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Header {
    /// The request code.
    pub request: u32,
    /// [`VERSION`], [`FLAG_REPLY`], [`FLAG_NEED_REPLY`].
    pub flags: u32,
    /// Bytes of body that follow.
    pub size: u32,
}

impl Header {
    /// Size on the wire.
    pub const SIZE: usize = 12;
}

/// A ring index and a value: SET_VRING_NUM / BASE / ENABLE, GET_VRING_BASE.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VringState {
    /// The ring.
    pub index: u32,
    /// Size, index or enable flag.
    pub num: u32,
}

/// SET_VRING_ADDR's body. Addresses are in the front-end's "user address"
/// numbering, the one SET_MEM_TABLE's `userspace_addr` uses.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VringAddr {
    /// The ring.
    pub index: u32,
    /// Bit 0: log used-ring writes (migration); never set here.
    pub flags: u32,
    /// Descriptor table.
    pub desc: u64,
    /// Used ring.
    pub used: u64,
    /// Available ring.
    pub avail: u64,
    /// Dirty log address; unused without logging.
    pub log: u64,
}

/// SET_MEM_TABLE's body starts with the region count, then that many
/// [`MemoryRegion`]s; one file descriptor per region rides along.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct MemoryHeader {
    /// Regions that follow (at most 8 in one message).
    pub regions: u32,
    /// Padding.
    pub padding: u32,
}

/// One region of the memory table.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct MemoryRegion {
    /// Guest physical address of the first byte: what descriptors contain.
    pub guest_phys_addr: u64,
    /// Bytes in the region.
    pub memory_size: u64,
    /// The same first byte in the front-end's "user address" numbering: what
    /// SET_VRING_ADDR contains.
    pub userspace_addr: u64,
    /// Where the region starts in the file descriptor.
    pub mmap_offset: u64,
}

/// GET_CONFIG / SET_CONFIG's body starts with this; `size` bytes of configuration
/// space follow.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ConfigHeader {
    /// Offset in the configuration space.
    pub offset: u32,
    /// Bytes that follow.
    pub size: u32,
    /// [`CONFIG_TYPE_FRONTEND`].
    pub flags: u32,
}

impl ConfigHeader {
    /// Size on the wire.
    pub const SIZE: usize = 12;
}

// The sizes the protocol fixes, checked at compile time.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<Header>() == Header::SIZE);
    assert!(size_of::<VringState>() == 8);
    assert!(size_of::<VringAddr>() == 40);
    assert!(size_of::<MemoryHeader>() == 8);
    assert!(size_of::<MemoryRegion>() == 32);
    assert!(size_of::<ConfigHeader>() == ConfigHeader::SIZE);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_encodes_in_host_order() {
        let h = Header {
            request: Request::GetConfig.code(),
            flags: VERSION | FLAG_NEED_REPLY,
            size: 7,
        };
        let mut want = Vec::new();
        for v in [24u32, 0x9, 7] {
            want.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(h.as_bytes(), want.as_slice());
    }

    #[test]
    fn only_get_requests_have_replies() {
        assert!(Request::GetVringBase.has_reply());
        assert!(Request::GetConfig.has_reply());
        assert!(!Request::SetVringEnable.has_reply());
        assert!(!Request::SetMemTable.has_reply());
    }
}
