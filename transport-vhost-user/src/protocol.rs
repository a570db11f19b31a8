//! The vhost-user wire format, front-end side (vhost-user protocol, "Message
//! specification" and "Front-end message types" in QEMU's docs/interop/vhost-user.rst).
//!
//! The request codes, the bodies and the feature bits are rust-vmm's (`vhost` 0.18,
//! module `vhost_user::message`), the same definitions our back-end
//! (`backend_host::vhost_user`) parses. What is left here is what that crate does not
//! make public, and the limits this front-end puts on replies:
//!
//! - [`Header`]: the crate's `VhostUserMsgHeader` is `pub(super)`, so a front-end that
//!   reads replies itself (see the crate documentation for why it does) needs its own;
//! - which requests have a reply ([`has_reply`]);
//! - [`MAX_CONFIG_SIZE`]: the protocol's `VHOST_USER_MAX_CONFIG_SIZE`, which the crate
//!   does not define (its `VHOST_USER_CONFIG_SIZE` is a 4 KiB bound for its back-end).
//!
//! Every message is a 12-byte [`Header`] followed by `size` bytes of body. Numbers are
//! in host byte order (the protocol is local to one machine).

use vhost::vhost_user::message::MAX_MSG_SIZE;
pub use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserProtocolFeatures as ProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::message::{
    VhostUserConfig, VhostUserMemory, VhostUserMemoryRegion, VhostUserVringAddr, VhostUserVringState,
};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The protocol version in the low two bits ([`VhostUserHeaderFlag::VERSION`]) of every
/// header's flags.
pub const VERSION: u32 = 0x1;

/// The feature bits that belong to vhost, not to the device: `VHOST_USER_F_PROTOCOL_FEATURES`
/// (bit 30) and `VHOST_F_LOG_ALL` (bit 26, dirty logging for migration). The driver
/// never sees them.
pub const VHOST_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES
    .union(VhostUserVirtioFeatures::LOG_ALL)
    .bits();

/// Largest body this crate accepts in a reply: the protocol's message limit (the
/// largest reply asked for is GET_CONFIG's 12 + 256 bytes), so a hostile size
/// allocates nothing.
pub const MAX_REPLY_BODY: usize = MAX_MSG_SIZE;

/// Largest configuration space GET_CONFIG / SET_CONFIG carry (the protocol's
/// `VHOST_USER_MAX_CONFIG_SIZE`).
pub const MAX_CONFIG_SIZE: usize = 256;

/// Whether the protocol defines a reply for `request`. Requests without one get a
/// REPLY_ACK when [`VhostUserHeaderFlag::NEED_REPLY`] is set.
pub const fn has_reply(request: FrontendReq) -> bool {
    matches!(
        request,
        FrontendReq::GET_FEATURES
            | FrontendReq::GET_VRING_BASE
            | FrontendReq::GET_PROTOCOL_FEATURES
            | FrontendReq::GET_QUEUE_NUM
            | FrontendReq::GET_CONFIG
            | FrontendReq::GET_INFLIGHT_FD
    )
}

/// Every message starts with this.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Header {
    /// The request code.
    pub request: u32,
    /// [`VERSION`], [`VhostUserHeaderFlag::REPLY`], [`VhostUserHeaderFlag::NEED_REPLY`].
    pub flags: u32,
    /// Bytes of body that follow.
    pub size: u32,
}

impl Header {
    /// Size on the wire.
    pub const SIZE: usize = 12;
}

// The sizes the protocol fixes, checked at compile time, ours and the crate's.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<Header>() == Header::SIZE);
    assert!(size_of::<VhostUserVringState>() == 8);
    assert!(size_of::<VhostUserVringAddr>() == 40);
    assert!(size_of::<VhostUserMemory>() == 8);
    assert!(size_of::<VhostUserMemoryRegion>() == 32);
    assert!(size_of::<VhostUserConfig>() == 12);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_encodes_in_host_order() {
        let h = Header {
            request: FrontendReq::GET_CONFIG.into(),
            flags: VERSION | VhostUserHeaderFlag::NEED_REPLY.bits(),
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
        assert!(has_reply(FrontendReq::GET_VRING_BASE));
        assert!(has_reply(FrontendReq::GET_CONFIG));
        assert!(!has_reply(FrontendReq::SET_VRING_ENABLE));
        assert!(!has_reply(FrontendReq::SET_MEM_TABLE));
    }
}
