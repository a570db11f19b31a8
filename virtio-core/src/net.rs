//! The virtio-net wire format (virtio 1.2 §5.1), shared by our driver and our device.
//!
//! Plain data and pure checks: feature bits and their dependencies, the 12-byte
//! `virtio_net_hdr` of a modern device, the configuration space, queue indices, the
//! control-queue commands (§5.1.6.5: [`CtrlCommand`] validates what a device reads
//! and encodes what a driver sends), the symmetric [`flow_hash`] for automatic
//! receive steering (§5.1.6.5.5), the checks a device applies to a transmitted
//! header ([`check_tx_header`]) and the Internet checksum that completes a
//! partially checksummed packet (§5.1.6.2: the driver leaves the pseudo-header sum
//! in the checksum field and the device finishes the job).
//! All multi-byte fields are little-endian (VERSION_1 only: no legacy layouts).

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

/// `flags`: "use csum_start, csum_offset" (§5.1.6).
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum of the received packet was validated (receive only).
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `flags`: coalescing information in `csum_start` / `csum_offset` (receive only).
pub const VIRTIO_NET_HDR_F_RSC_INFO: u8 = 4;

/// `gso_type`: not a GSO frame.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `gso_type`: GSO frame, IPv4 TCP (TSO).
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `gso_type`: GSO frame, IPv4 UDP (UFO).
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// `gso_type`: GSO frame, IPv6 TCP.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `gso_type`: GSO frame, UDP segmentation offload (USO).
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: TCP has ECN set.
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// `status` bit: the link is up (§5.1.4).
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// `status` bit: the driver should send a gratuitous announcement.
pub const VIRTIO_NET_S_ANNOUNCE: u16 = 2;

/// `struct virtio_net_hdr` of a modern device (§5.1.6): 12 bytes, `num_buffers`
/// always present with VERSION_1. It precedes every frame on both queues.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct VirtioNetHdr {
    /// `VIRTIO_NET_HDR_F_*` bits.
    pub flags: u8,
    /// A `VIRTIO_NET_HDR_GSO_*` value.
    pub gso_type: u8,
    /// Length of the headers to copy into each GSO segment.
    pub hdr_len: U16,
    /// Payload bytes per GSO segment.
    pub gso_size: U16,
    /// Where checksumming starts (NEEDS_CSUM).
    pub csum_start: U16,
    /// Where, counted from `csum_start`, the checksum goes (NEEDS_CSUM).
    pub csum_offset: U16,
    /// Receive buffers the frame spans (MRG_RXBUF); 1 otherwise.
    pub num_buffers: U16,
}

impl VirtioNetHdr {
    /// Size on the wire.
    pub const SIZE: usize = 12;

    /// The header of a received frame in `num_buffers` buffers, nothing offloaded.
    pub fn rx(num_buffers: u16) -> VirtioNetHdr {
        VirtioNetHdr {
            num_buffers: num_buffers.into(),
            ..VirtioNetHdr::default()
        }
    }

    /// A header asking for a partial checksum to be completed (NEEDS_CSUM).
    pub fn partial_csum(csum_start: u16, csum_offset: u16) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: csum_start.into(),
            csum_offset: csum_offset.into(),
            ..VirtioNetHdr::default()
        }
    }
}

/// Where a partial checksum must be completed, from a checked header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialCsum {
    /// First byte summed, counted from the start of the frame (after the header).
    pub start: usize,
    /// Offset of the 16-bit checksum field from `start`.
    pub offset: usize,
}

impl PartialCsum {
    /// The checksum field's position and the frame length it needs, if it fits in
    /// a frame of `len` bytes (checked arithmetic: the fields are untrusted).
    fn fits(start: u16, offset: u16, len: usize) -> Option<PartialCsum> {
        let (start, offset) = (usize::from(start), usize::from(offset));
        let end = start.checked_add(offset)?.checked_add(2)?;
        (end <= len).then_some(PartialCsum { start, offset })
    }
}

/// Why a transmitted header is refused (§5.1.6.2, HOSTILE rule 28).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxHeaderError {
    /// A GSO type that was not negotiated (or not a GSO type at all).
    #[error("gso_type {0:#04x} not negotiated")]
    Gso(u8),
    /// Flag bits a driver must not set on transmit, or that are unknown.
    #[error("flags {0:#04x} not allowed on transmit")]
    Flags(u8),
    /// NEEDS_CSUM without CSUM negotiated.
    #[error("partial checksum without CSUM")]
    CsumNotNegotiated,
    /// `csum_start` + `csum_offset` + 2 past the end of the frame.
    #[error("checksum field at {start}+{offset} outside a {len}-byte frame")]
    CsumOutOfRange {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// Frame length after the header.
        len: usize,
    },
}

/// Checks the header of a transmitted frame of `frame_len` bytes (after the header)
/// against the negotiated `features`, as a device that offers no segmentation
/// offload (no HOST_TSO*, HOST_UFO): every `gso_type` but NONE is refused, and
/// NEEDS_CSUM needs CSUM and a checksum field inside the frame.
///
/// Returns where the device must complete the checksum, if anywhere.
///
/// # Errors
/// See [`TxHeaderError`].
pub fn check_tx_header(
    hdr: &VirtioNetHdr,
    frame_len: usize,
    features: NetFeatures,
) -> Result<Option<PartialCsum>, TxHeaderError> {
    if hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE {
        return Err(TxHeaderError::Gso(hdr.gso_type));
    }
    // §5.1.6.2.1: "The driver MUST NOT set the VIRTIO_NET_HDR_F_DATA_VALID and
    // VIRTIO_NET_HDR_F_RSC_INFO bits in flags."
    if hdr.flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        return Err(TxHeaderError::Flags(hdr.flags));
    }
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
        return Ok(None);
    }
    if !features.contains(NetFeatures::CSUM) {
        return Err(TxHeaderError::CsumNotNegotiated);
    }
    let (start, offset) = (hdr.csum_start.get(), hdr.csum_offset.get());
    PartialCsum::fits(start, offset, frame_len)
        .map(Some)
        .ok_or(TxHeaderError::CsumOutOfRange {
            start,
            offset,
            len: frame_len,
        })
}

/// A NEEDS_CSUM header whose checksum field lies outside the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("checksum field at {start}+{offset} outside a {len}-byte frame")]
pub struct CsumOutOfRange {
    /// `csum_start`.
    pub start: u16,
    /// `csum_offset`.
    pub offset: u16,
    /// Frame length after the header.
    pub len: usize,
}

/// Where the checksum of a received frame must be completed, if the header asks for
/// it (NEEDS_CSUM, §5.1.6.4).
///
/// # Errors
/// [`CsumOutOfRange`] if the field does not fit in the frame: a device fault the
/// driver must not act on.
pub fn rx_partial_csum(hdr: &VirtioNetHdr, frame_len: usize) -> Result<Option<PartialCsum>, CsumOutOfRange> {
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
        return Ok(None);
    }
    let (start, offset) = (hdr.csum_start.get(), hdr.csum_offset.get());
    PartialCsum::fits(start, offset, frame_len)
        .map(Some)
        .ok_or(CsumOutOfRange {
            start,
            offset,
            len: frame_len,
        })
}

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

/// Largest `max_virtqueue_pairs` / `virtqueue_pairs` (§5.1.4, §5.1.6.5.5:
/// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX).
pub const MQ_VQ_PAIRS_MAX: u16 = 0x8000;
/// Smallest `virtqueue_pairs` (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN).
pub const MQ_VQ_PAIRS_MIN: u16 = 1;

/// The device-readable head of every control-queue command,
/// `struct virtio_net_ctrl` up to `command-specific-data` (§5.1.6.5).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct VirtioNetCtrlHdr {
    /// A `VIRTIO_NET_CTRL_*` class.
    pub class: u8,
    /// A command of that class.
    pub command: u8,
}

/// `ack` of a control command: success.
pub const VIRTIO_NET_OK: u8 = 0;
/// `ack` of a control command: failure.
pub const VIRTIO_NET_ERR: u8 = 1;

/// Class: receive filtering (CTRL_RX).
pub const VIRTIO_NET_CTRL_RX: u8 = 0;
/// Command of [`VIRTIO_NET_CTRL_RX`]: promiscuous mode on (1) or off (0).
pub const VIRTIO_NET_CTRL_RX_PROMISC: u8 = 0;
/// Command of [`VIRTIO_NET_CTRL_RX`]: all-multicast on or off.
pub const VIRTIO_NET_CTRL_RX_ALLMULTI: u8 = 1;
/// Class: MAC filtering and address.
pub const VIRTIO_NET_CTRL_MAC: u8 = 1;
/// Command of [`VIRTIO_NET_CTRL_MAC`]: set the unicast and multicast filter tables.
pub const VIRTIO_NET_CTRL_MAC_TABLE_SET: u8 = 0;
/// Command of [`VIRTIO_NET_CTRL_MAC`]: set the default MAC address (CTRL_MAC_ADDR).
pub const VIRTIO_NET_CTRL_MAC_ADDR_SET: u8 = 1;
/// Class: VLAN filtering (CTRL_VLAN).
pub const VIRTIO_NET_CTRL_VLAN: u8 = 2;
/// Class: gratuitous announcement acknowledgement (GUEST_ANNOUNCE).
pub const VIRTIO_NET_CTRL_ANNOUNCE: u8 = 3;
/// Class: multiqueue (MQ).
pub const VIRTIO_NET_CTRL_MQ: u8 = 4;
/// Command of [`VIRTIO_NET_CTRL_MQ`]: set the number of queue pairs in use.
pub const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
/// Class: guest offloads (CTRL_GUEST_OFFLOADS).
pub const VIRTIO_NET_CTRL_GUEST_OFFLOADS: u8 = 5;

/// The data of VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, `struct virtio_net_ctrl_mq`
/// (§5.1.6.5.5).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct VirtioNetCtrlMq {
    /// Queue pairs to use, [`MQ_VQ_PAIRS_MIN`]..=`max_virtqueue_pairs`.
    pub virtqueue_pairs: U16,
}

/// Longest `command-specific-data` of a control command a device needs to read:
/// a MAC_TABLE_SET with [`MAC_TABLE_WIRE_MAX`] addresses. Anything longer is
/// refused before it is read, so a hostile length never sizes an allocation.
pub const CTRL_DATA_MAX: usize = 8 + 6 * MAC_TABLE_WIRE_MAX;

/// Most addresses a MAC_TABLE_SET may carry (both tables together). A device keeps
/// fewer and falls back to accepting the whole class (§5.1.6.5.2, footnote: it "can
/// ... silently switch to allmulti or promiscuous mode if it is given too many
/// addresses"); this bound only caps what it reads.
pub const MAC_TABLE_WIRE_MAX: usize = 1024;

/// A list of 6-byte MAC addresses inside a MAC_TABLE_SET command, checked to be a
/// whole number of addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacList<'a>(&'a [u8]);

impl<'a> MacList<'a> {
    /// A list over `bytes`, `None` unless it is a whole number of addresses.
    pub fn new(bytes: &'a [u8]) -> Option<Self> {
        bytes.len().is_multiple_of(6).then_some(MacList(bytes))
    }

    /// Number of addresses.
    pub fn len(&self) -> usize {
        self.0.len() / 6
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The addresses, in order.
    pub fn iter(&self) -> impl Iterator<Item = [u8; 6]> + 'a {
        self.0
            .chunks_exact(6)
            .map(|c| <[u8; 6]>::try_from(c).unwrap_or_default())
    }
}

/// A control-queue command with its data validated (§5.1.6.5): what a device acts
/// on, and what a driver encodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtrlCommand<'a> {
    /// VIRTIO_NET_CTRL_RX_PROMISC: receive every frame (CTRL_RX).
    Promisc(bool),
    /// VIRTIO_NET_CTRL_RX_ALLMULTI: receive every multicast frame (CTRL_RX).
    AllMulti(bool),
    /// VIRTIO_NET_CTRL_MAC_TABLE_SET: extra unicast and multicast addresses to
    /// accept (CTRL_RX).
    MacTable {
        /// Unicast addresses.
        unicast: MacList<'a>,
        /// Multicast addresses.
        multicast: MacList<'a>,
    },
    /// VIRTIO_NET_CTRL_MAC_ADDR_SET: the default MAC address (CTRL_MAC_ADDR).
    MacAddr([u8; 6]),
    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: queue pairs to use (MQ), already checked
    /// to lie in [`MQ_VQ_PAIRS_MIN`]..=[`MQ_VQ_PAIRS_MAX`]; the device checks its
    /// own `max_virtqueue_pairs`.
    VqPairs(u16),
}

/// Why a control command is refused (the device answers VIRTIO_NET_ERR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CtrlError {
    /// A class this crate does not implement (VLAN, ANNOUNCE, GUEST_OFFLOADS, ...).
    #[error("unknown control class {0}")]
    UnknownClass(u8),
    /// A command its class does not have, or one this crate does not implement.
    #[error("unknown command {command} of control class {class}")]
    UnknownCommand {
        /// Class.
        class: u8,
        /// Command.
        command: u8,
    },
    /// The feature the command belongs to was not negotiated.
    #[error("command {command} of control class {class} needs a feature not negotiated")]
    NotNegotiated {
        /// Class.
        class: u8,
        /// Command.
        command: u8,
    },
    /// `command-specific-data` of the wrong length.
    #[error("command {command} of control class {class} with {len} bytes of data")]
    BadLength {
        /// Class.
        class: u8,
        /// Command.
        command: u8,
        /// Data bytes received.
        len: usize,
    },
    /// VQ_PAIRS_SET outside 1..=0x8000 (§5.1.6.5.5).
    #[error("{0} queue pairs requested")]
    QueuePairs(u16),
}

impl<'a> CtrlCommand<'a> {
    /// Validates command `hdr` with its `data` (everything device-readable after
    /// the 2-byte header) against the negotiated `features`: the class's feature
    /// must be negotiated and the data must have exactly the command's length.
    ///
    /// The 1-byte on/off of PROMISC and ALLMULTI counts any nonzero value as on,
    /// as Linux's `virtio_net.h` defines it ("zero = disable, non-zero = enable").
    ///
    /// # Errors
    /// See [`CtrlError`].
    pub fn parse(hdr: VirtioNetCtrlHdr, data: &'a [u8], features: NetFeatures) -> Result<Self, CtrlError> {
        let (class, command) = (hdr.class, hdr.command);
        let need = |f: NetFeatures| {
            if features.contains(f) {
                Ok(())
            } else {
                Err(CtrlError::NotNegotiated { class, command })
            }
        };
        let bad_len = CtrlError::BadLength {
            class,
            command,
            len: data.len(),
        };
        let unknown = CtrlError::UnknownCommand { class, command };
        match class {
            VIRTIO_NET_CTRL_RX => {
                need(NetFeatures::CTRL_RX)?;
                let [on] = data else { return Err(bad_len) };
                match command {
                    VIRTIO_NET_CTRL_RX_PROMISC => Ok(CtrlCommand::Promisc(*on != 0)),
                    VIRTIO_NET_CTRL_RX_ALLMULTI => Ok(CtrlCommand::AllMulti(*on != 0)),
                    _ => Err(unknown),
                }
            }
            VIRTIO_NET_CTRL_MAC => match command {
                VIRTIO_NET_CTRL_MAC_TABLE_SET => {
                    need(NetFeatures::CTRL_RX)?;
                    let (unicast, rest) = mac_list(data).ok_or(bad_len)?;
                    let (multicast, rest) = mac_list(rest).ok_or(bad_len)?;
                    if !rest.is_empty() {
                        return Err(bad_len);
                    }
                    Ok(CtrlCommand::MacTable { unicast, multicast })
                }
                VIRTIO_NET_CTRL_MAC_ADDR_SET => {
                    need(NetFeatures::CTRL_MAC_ADDR)?;
                    let mac = <[u8; 6]>::try_from(data).map_err(|_| bad_len)?;
                    Ok(CtrlCommand::MacAddr(mac))
                }
                _ => Err(unknown),
            },
            VIRTIO_NET_CTRL_MQ => {
                need(NetFeatures::MQ)?;
                if command != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET {
                    return Err(unknown);
                }
                let mq = VirtioNetCtrlMq::read_from_bytes(data).map_err(|_| bad_len)?;
                let n = mq.virtqueue_pairs.get();
                if !(MQ_VQ_PAIRS_MIN..=MQ_VQ_PAIRS_MAX).contains(&n) {
                    return Err(CtrlError::QueuePairs(n));
                }
                Ok(CtrlCommand::VqPairs(n))
            }
            _ => Err(CtrlError::UnknownClass(class)),
        }
    }

    /// The command's class and command bytes.
    pub fn header(&self) -> VirtioNetCtrlHdr {
        let (class, command) = match self {
            CtrlCommand::Promisc(_) => (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC),
            CtrlCommand::AllMulti(_) => (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI),
            CtrlCommand::MacTable { .. } => (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET),
            CtrlCommand::MacAddr(_) => (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET),
            CtrlCommand::VqPairs(_) => (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET),
        };
        VirtioNetCtrlHdr { class, command }
    }

    /// Appends the command's `command-specific-data` to `out`.
    pub fn encode_data(&self, out: &mut Vec<u8>) {
        match self {
            CtrlCommand::Promisc(on) | CtrlCommand::AllMulti(on) => out.push(u8::from(*on)),
            CtrlCommand::MacTable { unicast, multicast } => {
                for list in [unicast, multicast] {
                    // At most the length of a slice divided by 6.
                    let n = u32::try_from(list.len()).unwrap_or(u32::MAX);
                    out.extend_from_slice(&n.to_le_bytes());
                    out.extend_from_slice(list.0);
                }
            }
            CtrlCommand::MacAddr(mac) => out.extend_from_slice(mac),
            CtrlCommand::VqPairs(n) => out.extend_from_slice(&n.to_le_bytes()),
        }
    }
}

/// Splits one `le32 entries; u8 macs[entries][6]` table off the front of `data`
/// (checked arithmetic: `entries` is untrusted).
fn mac_list(data: &[u8]) -> Option<(MacList<'_>, &[u8])> {
    let (n, rest) = data.split_first_chunk::<4>()?;
    let bytes = usize::try_from(u32::from_le_bytes(*n)).ok()?.checked_mul(6)?;
    (bytes <= rest.len()).then(|| (MacList(&rest[..bytes]), &rest[bytes..]))
}

/// A flow hash for automatic receive steering (§5.1.6.5.5), the same for both
/// directions of a flow: over the IPv4 or IPv6 addresses and, for TCP and UDP,
/// the ports, with the two endpoints put in order first. One 802.1Q or 802.1ad
/// tag is looked through. Fragments (IPv4 MF or offset set) and IPv6 packets
/// whose first next-header is not TCP or UDP hash the addresses only, so every
/// packet of such a datagram lands on one queue. `None` for anything else (not IP,
/// truncated headers): the caller steers it to a fixed queue.
///
/// Only an input to queue selection: not a keyed hash, so a sender can aim its
/// flows at one queue, which costs that guest only its own spreading.
pub fn flow_hash(frame: &[u8]) -> Option<u32> {
    let be16 = |at: usize| frame.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let (mut ethertype, mut l3) = (be16(12)?, ETH_HDR_LEN);
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = be16(16)?;
        l3 += 4;
    }
    let ip = frame.get(l3..)?;
    let (a, b, proto, l4) = match ethertype {
        0x0800 => {
            if ip.len() < 20 || ip[0] >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            // MF and the fragment offset: any fragment hashes on addresses only.
            let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            let l4 = (ihl >= 20 && !fragment).then_some(ihl);
            (&ip[12..16], &ip[16..20], ip[9], l4)
        }
        0x86dd => {
            if ip.len() < 40 || ip[0] >> 4 != 6 {
                return None;
            }
            (&ip[8..24], &ip[24..40], ip[6], Some(40))
        }
        _ => return None,
    };
    let ports = match (proto, l4) {
        (6 | 17, Some(at)) => ip.get(at..at + 4),
        _ => None,
    };
    let (pa, pb) = ports.map_or((0, 0), |p| {
        (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]))
    });
    // Symmetric: the same order of endpoints whichever way the packet goes.
    let ((a, pa), (b, pb)) = if (a, pa) <= (b, pb) {
        ((a, pa), (b, pb))
    } else {
        ((b, pb), (a, pa))
    };
    // FNV-1a, then the murmur3 finalizer so low bits (used by `% pairs`) mix well.
    let mut h: u32 = 0x811c_9dc5;
    for bytes in [a, &pa.to_be_bytes(), b, &pb.to_be_bytes(), &[proto]] {
        for &x in bytes {
            h = (h ^ u32::from(x)).wrapping_mul(0x0100_0193);
        }
    }
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    Some(h ^ (h >> 16))
}

// The wire sizes and offsets of §5.1.4 and §5.1.6, checked at compile time.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<VirtioNetHdr>() == VirtioNetHdr::SIZE);
    assert!(offset_of!(VirtioNetHdr, gso_type) == 1);
    assert!(offset_of!(VirtioNetHdr, hdr_len) == 2);
    assert!(offset_of!(VirtioNetHdr, gso_size) == 4);
    assert!(offset_of!(VirtioNetHdr, csum_start) == 6);
    assert!(offset_of!(VirtioNetHdr, csum_offset) == 8);
    assert!(offset_of!(VirtioNetHdr, num_buffers) == 10);
    assert!(size_of::<VirtioNetCtrlHdr>() == 2);
    assert!(size_of::<VirtioNetCtrlMq>() == 2);
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

/// Adds `data` to a ones'-complement running sum (RFC 1071), big-endian 16-bit
/// words, an odd last byte padded with zero. Fold with [`csum_fold`].
pub fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum = add_carry(sum, u32::from(u16::from_be_bytes([w[0], w[1]])));
    }
    if let [last] = words.remainder() {
        sum = add_carry(sum, u32::from(*last) << 8);
    }
    sum
}

/// End-around-carry addition, so the running sum never overflows.
fn add_carry(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s + u32::from(carry)
}

/// Folds a running sum to 16 bits (not complemented).
pub fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 16 significant bits.
    u16::try_from(sum).unwrap_or(u16::MAX)
}

/// The Internet checksum of `data`: the complement of its folded ones'-complement
/// sum.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !csum_fold(csum_add(0, data))
}

/// The folded (not complemented) sum of the IPv4 pseudo-header, what a driver
/// stores in the checksum field of a NEEDS_CSUM TCP/UDP packet (§5.1.6.2: "the
/// driver ... places the partial checksum of the pseudo-header in the checksum
/// field").
pub fn ipv4_pseudo_header_sum(src: [u8; 4], dst: [u8; 4], protocol: u8, l4_len: u16) -> u16 {
    let mut sum = csum_add(0, &src);
    sum = csum_add(sum, &dst);
    sum = add_carry(sum, u32::from(protocol));
    sum = add_carry(sum, u32::from(l4_len));
    csum_fold(sum)
}

/// Completes a partial checksum in place (§5.1.6.2): sums `frame[start..]`, which
/// includes the pseudo-header sum already in the checksum field, and stores the
/// complement at `start + offset`. `at` must come from [`check_tx_header`] or
/// [`rx_partial_csum`] for this frame's length; otherwise nothing is changed.
pub fn complete_checksum(frame: &mut [u8], at: PartialCsum) {
    let field = at.start + at.offset;
    let Some(covered) = frame.get(at.start..) else {
        return;
    };
    if field + 2 > frame.len() {
        return;
    }
    let csum = !csum_fold(csum_add(0, covered));
    frame[field..field + 2].copy_from_slice(&csum.to_be_bytes());
}

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

    #[test]
    fn tx_header_checks() {
        let f = NetFeatures::CSUM;
        assert_eq!(check_tx_header(&VirtioNetHdr::default(), 60, f), Ok(None));
        let gso = VirtioNetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            ..VirtioNetHdr::default()
        };
        assert_eq!(check_tx_header(&gso, 60, f), Err(TxHeaderError::Gso(1)));
        let valid = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_DATA_VALID,
            ..VirtioNetHdr::default()
        };
        assert_eq!(check_tx_header(&valid, 60, f), Err(TxHeaderError::Flags(2)));
        let p = VirtioNetHdr::partial_csum(34, 16);
        assert_eq!(
            check_tx_header(&p, 52, f),
            Ok(Some(PartialCsum {
                start: 34,
                offset: 16
            }))
        );
        assert!(matches!(
            check_tx_header(&p, 51, f),
            Err(TxHeaderError::CsumOutOfRange { .. })
        ));
        assert_eq!(
            check_tx_header(&p, 60, NetFeatures::empty()),
            Err(TxHeaderError::CsumNotNegotiated)
        );
        let huge = VirtioNetHdr::partial_csum(u16::MAX, u16::MAX);
        assert!(check_tx_header(&huge, usize::MAX, f).is_ok_and(|c| c.is_some()));
        assert!(check_tx_header(&huge, (1 << 17) - 1, f).is_err());
        assert_eq!(
            rx_partial_csum(&p, 51),
            Err(CsumOutOfRange {
                start: 34,
                offset: 16,
                len: 51
            })
        );
        assert_eq!(rx_partial_csum(&VirtioNetHdr::rx(1), 0), Ok(None));
    }

    /// The RFC 1071 example: words 0001 f203 f4f5 f6f7 sum to ddf2.
    #[test]
    fn checksum_matches_rfc_1071() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(csum_fold(csum_add(0, &data)), 0xddf2);
        assert_eq!(internet_checksum(&data), !0xddf2);
        // Odd length pads with zero.
        assert_eq!(csum_fold(csum_add(0, &[0xab])), 0xab00);
    }

    /// A partial checksum completed by [`complete_checksum`] equals the full UDP
    /// checksum computed from scratch over pseudo-header and datagram.
    #[test]
    fn completing_a_partial_checksum_gives_the_full_one() {
        let (src, dst) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        let mut udp = vec![0x12, 0x34, 0x56, 0x78, 0, 13, 0, 0, b'h', b'e', b'l', b'l', b'o'];
        let len = u16::try_from(udp.len()).unwrap();
        let mut full = csum_add(0, &src);
        full = csum_add(full, &dst);
        full = csum_add(full, &[0, 17]);
        full = csum_add(full, &len.to_be_bytes());
        full = csum_add(full, &udp);
        let expected = !csum_fold(full);

        let pseudo = ipv4_pseudo_header_sum(src, dst, 17, len);
        udp[6..8].copy_from_slice(&pseudo.to_be_bytes());
        complete_checksum(&mut udp, PartialCsum { start: 0, offset: 6 });
        assert_eq!(u16::from_be_bytes([udp[6], udp[7]]), expected);
        // Verifying: the sum over pseudo-header and datagram is all ones.
        let mut check = csum_add(0, &src);
        check = csum_add(check, &dst);
        check = csum_add(check, &[0, 17]);
        check = csum_add(check, &len.to_be_bytes());
        check = csum_add(check, &udp);
        assert_eq!(csum_fold(check), 0xffff);
    }

    #[test]
    fn complete_checksum_ignores_a_field_past_the_end() {
        let mut f = [1u8; 4];
        complete_checksum(&mut f, PartialCsum { start: 2, offset: 1 });
        assert_eq!(f, [1; 4]);
    }

    fn ctrl(class: u8, command: u8) -> VirtioNetCtrlHdr {
        VirtioNetCtrlHdr { class, command }
    }

    #[test]
    fn control_commands_parse_exactly_and_round_trip() {
        let all = NetFeatures::CTRL_VQ | NetFeatures::CTRL_RX | NetFeatures::CTRL_MAC_ADDR | NetFeatures::MQ;
        let rx = ctrl(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC);
        assert_eq!(CtrlCommand::parse(rx, &[1], all), Ok(CtrlCommand::Promisc(true)));
        assert_eq!(CtrlCommand::parse(rx, &[0], all), Ok(CtrlCommand::Promisc(false)));
        assert!(matches!(
            CtrlCommand::parse(rx, &[], all),
            Err(CtrlError::BadLength { len: 0, .. })
        ));
        assert!(matches!(
            CtrlCommand::parse(rx, &[1, 1], all),
            Err(CtrlError::BadLength { len: 2, .. })
        ));
        assert!(matches!(
            CtrlCommand::parse(rx, &[1], NetFeatures::CTRL_VQ),
            Err(CtrlError::NotNegotiated { .. })
        ));
        let mq = ctrl(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET);
        assert_eq!(CtrlCommand::parse(mq, &[4, 0], all), Ok(CtrlCommand::VqPairs(4)));
        assert_eq!(
            CtrlCommand::parse(mq, &[0, 0], all),
            Err(CtrlError::QueuePairs(0))
        );
        assert_eq!(
            CtrlCommand::parse(mq, &[1, 0x80], all),
            Err(CtrlError::QueuePairs(0x8001))
        );
        assert!(matches!(
            CtrlCommand::parse(mq, &[2], all),
            Err(CtrlError::BadLength { .. })
        ));
        assert_eq!(
            CtrlCommand::parse(ctrl(VIRTIO_NET_CTRL_MQ, 1), &[], all),
            Err(CtrlError::UnknownCommand { class: 4, command: 1 })
        );
        assert_eq!(
            CtrlCommand::parse(ctrl(VIRTIO_NET_CTRL_VLAN, 0), &[0, 0], all),
            Err(CtrlError::UnknownClass(2))
        );
        let addr = ctrl(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET);
        assert_eq!(
            CtrlCommand::parse(addr, &[2, 0, 0, 0, 0, 9], all),
            Ok(CtrlCommand::MacAddr([2, 0, 0, 0, 0, 9]))
        );
        assert!(CtrlCommand::parse(addr, &[2, 0, 0, 0, 0, 9], NetFeatures::CTRL_RX).is_err());

        // MAC_TABLE_SET: two counted tables, exactly.
        let uni = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        let multi = [1, 0, 0x5e, 0, 0, 1];
        let cmd = CtrlCommand::MacTable {
            unicast: MacList::new(&uni).unwrap(),
            multicast: MacList::new(&multi).unwrap(),
        };
        let mut data = Vec::new();
        cmd.encode_data(&mut data);
        assert_eq!(data.len(), 4 + 12 + 4 + 6);
        let table = ctrl(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET);
        assert_eq!(cmd.header(), table);
        let parsed = CtrlCommand::parse(table, &data, all).unwrap();
        assert_eq!(parsed, cmd);
        let CtrlCommand::MacTable { unicast, .. } = parsed else {
            unreachable!()
        };
        assert_eq!(unicast.iter().nth(1), Some([2, 0, 0, 0, 0, 2]));
        for bad in [
            &data[..data.len() - 1],
            &[data.as_slice(), &[0]].concat()[..],
            &[0xff; 8][..],
        ] {
            assert!(matches!(
                CtrlCommand::parse(table, bad, all),
                Err(CtrlError::BadLength { .. })
            ));
        }
        for c in [
            CtrlCommand::Promisc(true),
            CtrlCommand::AllMulti(false),
            CtrlCommand::MacAddr([2, 1, 2, 3, 4, 5]),
            CtrlCommand::VqPairs(3),
        ] {
            let mut d = Vec::new();
            c.encode_data(&mut d);
            assert_eq!(CtrlCommand::parse(c.header(), &d, all), Ok(c));
        }
    }

    /// An IPv4 (or IPv6) TCP/UDP frame between two endpoints.
    fn ip_frame(v6: bool, proto: u8, src: (u8, u16), dst: (u8, u16), flags: u16) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        if v6 {
            f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 8, proto, 64]);
            f.extend_from_slice(&[0xfd; 15]);
            f.push(src.0);
            f.extend_from_slice(&[0xfd; 15]);
            f.push(dst.0);
        } else {
            f.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 28, 0, 0]);
            f.extend_from_slice(&flags.to_be_bytes());
            f.extend_from_slice(&[64, proto, 0, 0, 10, 0, 0, src.0, 10, 0, 0, dst.0]);
        }
        f.extend_from_slice(&src.1.to_be_bytes());
        f.extend_from_slice(&dst.1.to_be_bytes());
        f.extend_from_slice(&[0, 8, 0, 0]);
        f
    }

    #[test]
    fn flow_hash_is_symmetric_and_sees_ports() {
        for v6 in [false, true] {
            for proto in [6, 17] {
                let ab = flow_hash(&ip_frame(v6, proto, (1, 1000), (2, 53), 0)).unwrap();
                let ba = flow_hash(&ip_frame(v6, proto, (2, 53), (1, 1000), 0)).unwrap();
                assert_eq!(ab, ba, "v6 {v6} proto {proto}");
                let other = flow_hash(&ip_frame(v6, proto, (1, 1001), (2, 53), 0)).unwrap();
                assert_ne!(ab, other, "ports are part of the flow");
            }
        }
        // Other protocols and fragments: addresses only.
        let icmp = |p| flow_hash(&ip_frame(false, 1, (1, p), (2, 0), 0));
        assert_eq!(icmp(1), icmp(2));
        let frag = |p| flow_hash(&ip_frame(false, 17, (1, p), (2, 53), 0x2000));
        assert_eq!(frag(1), frag(2));
        assert_eq!(flow_hash(&[0u8; 60]), None, "not IP");
        assert_eq!(flow_hash(&ip_frame(false, 17, (1, 1), (2, 2), 0)[..30]), None);
        // Many flows spread over 4 queues.
        let mut used = [0u32; 4];
        for port in 0..400u16 {
            let h = flow_hash(&ip_frame(false, 17, (1, 1024 + port), (2, 7), 0)).unwrap();
            used[(h % 4) as usize] += 1;
        }
        assert!(used.iter().all(|&n| n > 50), "{used:?}");
    }

    proptest::proptest! {
        /// Any header and length: no panic, and an accepted checksum field lies
        /// inside the frame.
        #[test]
        fn tx_header_check_is_total(raw in proptest::array::uniform12(0u8..), len in 0usize..70_000) {
            let hdr = VirtioNetHdr::read_from_bytes(&raw).unwrap();
            if let Ok(Some(at)) = check_tx_header(&hdr, len, NetFeatures::CSUM) {
                proptest::prop_assert!(at.start + at.offset + 2 <= len);
            }
        }

        /// Any header and data: parsing never panics, and an accepted command
        /// encodes back to the same data.
        #[test]
        fn control_parse_is_total(
            class in 0u8..8,
            command in 0u8..4,
            data in proptest::collection::vec(0u8.., 0..40),
        ) {
            let hdr = VirtioNetCtrlHdr { class, command };
            let all = NetFeatures::CTRL_RX | NetFeatures::CTRL_MAC_ADDR | NetFeatures::MQ;
            if let Ok(cmd) = CtrlCommand::parse(hdr, &data, all) {
                let mut again = Vec::new();
                cmd.encode_data(&mut again);
                proptest::prop_assert_eq!(cmd.header(), hdr);
                if !matches!(cmd, CtrlCommand::Promisc(_) | CtrlCommand::AllMulti(_)) {
                    proptest::prop_assert_eq!(again, data);
                }
            }
        }

        /// Any bytes: the flow hash never panics.
        #[test]
        fn flow_hash_is_total(data in proptest::collection::vec(0u8.., 0..80)) {
            let _ = flow_hash(&data);
        }

        /// A completed checksum verifies: the pseudo-header sum plus the sum from
        /// `start` to the end is all ones (for an even offset, as TCP's 16 and UDP's 6
        /// are).
        #[test]
        fn completed_checksums_verify(
            data in proptest::collection::vec(0u8.., 2..300),
            start in 0usize..100,
            half in 0usize..100,
        ) {
            let offset = 2 * half;
            proptest::prop_assume!(start + offset + 2 <= data.len());
            let mut f = data.clone();
            complete_checksum(&mut f, PartialCsum { start, offset });
            // The field held the pseudo-header sum, which the receiver adds back by
            // summing the pseudo-header itself.
            let field = start + offset;
            let pseudo = csum_add(0, &data[field..field + 2]);
            proptest::prop_assert_eq!(csum_fold(csum_add(pseudo, &f[start..])), 0xffff);
            proptest::prop_assert_eq!(&f[..start + offset], &data[..start + offset]);
        }
    }
}
