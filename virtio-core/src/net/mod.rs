//! The virtio-net device type (virtio 1.2 §5.1), shared by our driver and our device.
//!
//! - this module: the device ID, feature bits and their dependencies, the
//!   configuration space (`struct virtio_net_config`, §5.1.4) and queue indices;
//! - [`wire`]: what travels on the queues, the 12-byte `virtio_net_hdr` of a modern
//!   device before every frame and the control-queue commands with their ack, each as
//!   on-wire struct and typed representation with `parse` and `emit` side by side;
//! - [`csum`]: the Internet checksum that completes a partially checksummed packet
//!   (§5.1.6.2: the driver leaves the pseudo-header sum in the checksum field and the
//!   device finishes the job);
//! - [`hash`]: the symmetric flow hash for automatic receive steering (§5.1.6.5.5).
//!
//! The items of all three are re-exported here, so `virtio_core::net::VirtioNetHdr`
//! and `virtio_core::net::wire::VirtioNetHdr` are the same item. All multi-byte
//! fields are little-endian (VERSION_1 only: no legacy layouts).

pub mod csum;
pub mod hash;
pub mod wire;

pub use self::csum::*;
pub use self::hash::*;
pub use self::wire::*;

use crate::features::{Dependency, FeatureError};
use bitflags::bitflags;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Device ID of a network device (§5.1.1).
pub const DEVICE_ID: u32 = 1;

/// Bytes of an Ethernet header (destination, source, ethertype), the "low level
/// ethernet header length" that §5.1.4.1 adds to `mtu`.
pub const ETH_HDR_LEN: usize = 14;

/// Smallest `mtu` a device may report (§5.1.4.1: "between 68 and 65535 inclusive").
pub const MIN_MTU: u16 = 68;

/// Receive buffer size a driver should post without MRG_RXBUF or guest offloads
/// (§5.1.6.3.1: "buffers of at least 1526 bytes"): header plus a 1514-byte frame.
pub const MIN_RX_BUF: u32 = 1526;

bitflags! {
    /// Device-specific feature bits of the network device (virtio 1.2 §5.1.3).
    ///
    /// Build the typed view of a negotiated word with
    /// [`NetFeatures::from_bits_retain`], so device-independent bits survive.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct NetFeatures: u64 {
        /// "Device handles packets with partial checksum."
        const CSUM = 1 << 0;
        /// "Driver handles packets with partial checksum."
        const GUEST_CSUM = 1 << 1;
        /// "Control channel offloads reconfiguration support."
        const CTRL_GUEST_OFFLOADS = 1 << 2;
        /// "Device maximum MTU reporting is supported."
        const MTU = 1 << 3;
        /// "Device has given MAC address."
        const MAC = 1 << 5;
        /// "Driver can receive TSOv4."
        const GUEST_TSO4 = 1 << 7;
        /// "Driver can receive TSOv6."
        const GUEST_TSO6 = 1 << 8;
        /// "Driver can receive TSO with ECN."
        const GUEST_ECN = 1 << 9;
        /// "Driver can receive UFO."
        const GUEST_UFO = 1 << 10;
        /// "Device can receive TSOv4."
        const HOST_TSO4 = 1 << 11;
        /// "Device can receive TSOv6."
        const HOST_TSO6 = 1 << 12;
        /// "Device can receive TSO with ECN."
        const HOST_ECN = 1 << 13;
        /// "Device can receive UFO."
        const HOST_UFO = 1 << 14;
        /// "Driver can merge receive buffers."
        const MRG_RXBUF = 1 << 15;
        /// "Configuration status field is available."
        const STATUS = 1 << 16;
        /// "Control channel is available."
        const CTRL_VQ = 1 << 17;
        /// "Control channel RX mode support."
        const CTRL_RX = 1 << 18;
        /// "Control channel VLAN filtering."
        const CTRL_VLAN = 1 << 19;
        /// "Driver can send gratuitous packets."
        const GUEST_ANNOUNCE = 1 << 21;
        /// "Device supports multiqueue with automatic receive steering."
        const MQ = 1 << 22;
        /// "Set MAC address through control channel."
        const CTRL_MAC_ADDR = 1 << 23;
    }
}

const fn dep(feature: NetFeatures, requires: NetFeatures) -> Dependency {
    Dependency {
        feature: feature.bits(),
        requires: requires.bits(),
    }
}

/// The "requires" relations of §5.1.3.1 that are plain conjunctions, for
/// [`crate::features::negotiate`] and [`crate::features::select`].
///
/// GUEST_ECN and HOST_ECN require *either* of two TSO bits, which a [`Dependency`]
/// (all of `requires`) cannot say; [`check_alternatives`] checks those two.
pub const NET_DEPENDENCIES: &[Dependency] = &[
    dep(NetFeatures::GUEST_TSO4, NetFeatures::GUEST_CSUM),
    dep(NetFeatures::GUEST_TSO6, NetFeatures::GUEST_CSUM),
    dep(NetFeatures::GUEST_UFO, NetFeatures::GUEST_CSUM),
    dep(NetFeatures::HOST_TSO4, NetFeatures::CSUM),
    dep(NetFeatures::HOST_TSO6, NetFeatures::CSUM),
    dep(NetFeatures::HOST_UFO, NetFeatures::CSUM),
    dep(NetFeatures::CTRL_GUEST_OFFLOADS, NetFeatures::CTRL_VQ),
    dep(NetFeatures::CTRL_RX, NetFeatures::CTRL_VQ),
    dep(NetFeatures::CTRL_VLAN, NetFeatures::CTRL_VQ),
    dep(NetFeatures::GUEST_ANNOUNCE, NetFeatures::CTRL_VQ),
    dep(NetFeatures::MQ, NetFeatures::CTRL_VQ),
    dep(NetFeatures::CTRL_MAC_ADDR, NetFeatures::CTRL_VQ),
];

/// Checks the two "requires A or B" relations of §5.1.3.1: GUEST_ECN needs
/// GUEST_TSO4 or GUEST_TSO6, HOST_ECN needs HOST_TSO4 or HOST_TSO6.
///
/// # Errors
/// [`FeatureError::MissingDependency`] naming the ECN bit and both TSO bits.
pub fn check_alternatives(accepted: u64) -> Result<(), FeatureError> {
    let f = NetFeatures::from_bits_retain(accepted);
    let rules = [
        (
            NetFeatures::GUEST_ECN,
            NetFeatures::GUEST_TSO4 | NetFeatures::GUEST_TSO6,
        ),
        (
            NetFeatures::HOST_ECN,
            NetFeatures::HOST_TSO4 | NetFeatures::HOST_TSO6,
        ),
    ];
    for (ecn, either) in rules {
        if f.contains(ecn) && !f.intersects(either) {
            return Err(FeatureError::MissingDependency {
                feature: ecn.bits(),
                missing: either.bits(),
            });
        }
    }
    Ok(())
}

/// `status` bit: the link is up (§5.1.4).
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// `status` bit: the driver should send a gratuitous announcement.
pub const VIRTIO_NET_S_ANNOUNCE: u16 = 2;

/// The network device's configuration space, `struct virtio_net_config` (virtio 1.2
/// §5.1.4): 24 bytes. Fields are meaningful only when the feature named on them is
/// offered.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct NetConfig {
    /// The device's MAC address (MAC).
    pub mac: [u8; 6],
    /// `VIRTIO_NET_S_*` bits (STATUS).
    pub status: U16,
    /// Receive/transmit queue pairs (MQ).
    pub max_virtqueue_pairs: U16,
    /// Largest MTU the driver should use (MTU), 68..=65535.
    pub mtu: U16,
    /// Link speed in Mbit/s, `u32::MAX` unknown (SPEED_DUPLEX).
    pub speed: U32,
    /// 1 full duplex, 0 half, 0xff unknown (SPEED_DUPLEX).
    pub duplex: u8,
    /// RSS key size (RSS / HASH_REPORT).
    pub rss_max_key_size: u8,
    /// RSS indirection table length (RSS).
    pub rss_max_indirection_table_length: U16,
    /// Supported hash types (RSS / HASH_REPORT).
    pub supported_hash_types: U32,
}

impl NetConfig {
    /// Size of the configuration space in bytes.
    pub const SIZE: usize = 24;
}

/// Receive queue index of the 0-based queue pair `pair` (§5.1.2: receiveqN is
/// 2(N-1)).
pub const fn rx_queue(pair: u16) -> u32 {
    2 * pair as u32
}

/// Transmit queue index of the 0-based queue pair `pair` (§5.1.2: transmitqN is
/// 2(N-1)+1).
pub const fn tx_queue(pair: u16) -> u32 {
    2 * pair as u32 + 1
}

/// Control queue index with `max_pairs` queue pairs (§5.1.2: 2N when MQ is
/// negotiated, 2 otherwise; pass 1 without MQ).
pub const fn ctrl_queue(max_pairs: u16) -> u32 {
    2 * max_pairs as u32
}

// The configuration space's size and offsets (§5.1.4), checked at compile time.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<NetConfig>() == NetConfig::SIZE);
    assert!(offset_of!(NetConfig, status) == 6);
    assert!(offset_of!(NetConfig, max_virtqueue_pairs) == 8);
    assert!(offset_of!(NetConfig, mtu) == 10);
    assert!(offset_of!(NetConfig, speed) == 12);
    assert!(offset_of!(NetConfig, duplex) == 16);
    assert!(offset_of!(NetConfig, rss_max_key_size) == 17);
    assert!(offset_of!(NetConfig, rss_max_indirection_table_length) == 18);
    assert!(offset_of!(NetConfig, supported_hash_types) == 20);
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{Features, negotiate, select};

    #[test]
    fn feature_bits_match_the_spec() {
        let expected = [
            (NetFeatures::CSUM, 0),
            (NetFeatures::GUEST_CSUM, 1),
            (NetFeatures::CTRL_GUEST_OFFLOADS, 2),
            (NetFeatures::MTU, 3),
            (NetFeatures::MAC, 5),
            (NetFeatures::GUEST_TSO4, 7),
            (NetFeatures::GUEST_TSO6, 8),
            (NetFeatures::GUEST_ECN, 9),
            (NetFeatures::GUEST_UFO, 10),
            (NetFeatures::HOST_TSO4, 11),
            (NetFeatures::HOST_TSO6, 12),
            (NetFeatures::HOST_ECN, 13),
            (NetFeatures::HOST_UFO, 14),
            (NetFeatures::MRG_RXBUF, 15),
            (NetFeatures::STATUS, 16),
            (NetFeatures::CTRL_VQ, 17),
            (NetFeatures::CTRL_RX, 18),
            (NetFeatures::CTRL_VLAN, 19),
            (NetFeatures::GUEST_ANNOUNCE, 21),
            (NetFeatures::MQ, 22),
            (NetFeatures::CTRL_MAC_ADDR, 23),
        ];
        for (flag, bit) in expected {
            assert_eq!(flag.bits(), 1 << bit, "{flag:?}");
        }
        assert_eq!(NetFeatures::all().bits() >> 24, 0);
    }

    #[test]
    fn dependencies_drop_offloads_without_their_base() {
        let v1 = Features::VERSION_1.bits();
        let offered = v1 | NetFeatures::all().bits();
        let wanted = (NetFeatures::GUEST_TSO4 | NetFeatures::HOST_TSO4 | NetFeatures::MQ).bits();
        // Nothing they need was wanted: all three go.
        assert_eq!(select(offered, wanted, NET_DEPENDENCIES), v1);
        let with_base = wanted | (NetFeatures::GUEST_CSUM | NetFeatures::CSUM | NetFeatures::CTRL_VQ).bits();
        assert_eq!(select(offered, with_base, NET_DEPENDENCIES), v1 | with_base);
        assert!(matches!(
            negotiate(offered, v1 | NetFeatures::CTRL_RX.bits(), NET_DEPENDENCIES),
            Err(FeatureError::MissingDependency { .. })
        ));
        assert!(matches!(
            negotiate(offered, v1 | NetFeatures::HOST_UFO.bits(), NET_DEPENDENCIES),
            Err(FeatureError::MissingDependency { .. })
        ));
    }

    #[test]
    fn ecn_needs_either_tso() {
        let guest = NetFeatures::GUEST_CSUM | NetFeatures::GUEST_ECN;
        assert!(check_alternatives(guest.bits()).is_err());
        assert!(check_alternatives((guest | NetFeatures::GUEST_TSO6).bits()).is_ok());
        assert!(check_alternatives(NetFeatures::HOST_ECN.bits()).is_err());
        assert!(check_alternatives((NetFeatures::HOST_ECN | NetFeatures::HOST_TSO4).bits()).is_ok());
        assert!(check_alternatives(0).is_ok());
    }

    #[test]
    fn header_and_config_are_little_endian_at_spec_offsets() {
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x0102.into(),
            gso_size: 0x0304.into(),
            csum_start: 0x0506.into(),
            csum_offset: 0x0708.into(),
            num_buffers: 0x090a.into(),
        };
        assert_eq!(h.as_bytes(), &[1, 4, 2, 1, 4, 3, 6, 5, 8, 7, 0x0a, 9]);
        let c = NetConfig {
            mac: [1, 2, 3, 4, 5, 6],
            status: VIRTIO_NET_S_LINK_UP.into(),
            max_virtqueue_pairs: 1.into(),
            mtu: 1500.into(),
            ..NetConfig::default()
        };
        let b = c.as_bytes();
        assert_eq!(&b[..6], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(&b[6..12], &[1, 0, 1, 0, 0xdc, 0x05]);
    }

    #[test]
    fn queue_indices_follow_section_5_1_2() {
        assert_eq!((rx_queue(0), tx_queue(0)), (0, 1));
        assert_eq!((rx_queue(3), tx_queue(3)), (6, 7));
        assert_eq!(ctrl_queue(1), 2);
        assert_eq!(ctrl_queue(MQ_VQ_PAIRS_MAX), 0x10000);
        let cmd = VirtioNetCtrlHdr {
            class: VIRTIO_NET_CTRL_MQ,
            command: VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
        };
        assert_eq!(cmd.as_bytes(), &[4, 0]);
        let mq = VirtioNetCtrlMq {
            virtqueue_pairs: 0x0102.into(),
        };
        assert_eq!(mq.as_bytes(), &[2, 1]);
    }
}
