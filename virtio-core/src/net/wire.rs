//! What travels on virtio-net queues (virtio 1.2 §5.1.6), both directions.
//!
//! | on the wire | typed | parse checks |
//! |---|---|---|
//! | [`VirtioNetHdr`] before every frame | [`check_tx_header`], [`rx_partial_csum`] give the [`PartialCsum`] it asks for | flags, GSO type, checksum field inside the frame |
//! | [`VirtioNetCtrlHdr`] + data on the control queue | [`CtrlCommand`] | class, command, negotiated feature, exact data length, queue-pair bounds |
//! | the control command's `ack` byte | [`CtrlAck`] | OK or ERR |
//!
//! The driver (`drivers-net`) emits commands with [`CtrlCommand::emit`] and parses
//! the ack with [`CtrlAck::parse`]; the device (`backend-host`'s `net::device`)
//! parses them with [`CtrlCommand::parse_bytes`] and emits the ack. Parsing never
//! panics: any bytes give a typed value or a typed error, and a parsed value emits
//! back to bytes that parse to it (the property tests below check both).
//!
//! What a device *does* with a valid command (which MAC it accepts, how many pairs
//! it has configured, how large a filter table it keeps) is device policy and stays
//! in `backend-host`. Computations over the frame live beside this module:
//! [`super::csum`] and [`super::hash`]. A new device type copies this shape; see
//! [`crate::blk::wire`].

use super::NetFeatures;
use zerocopy::little_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

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

/// The `ack` byte the device writes after a control command (§5.1.6.5): the typed
/// view of [`VIRTIO_NET_OK`] and [`VIRTIO_NET_ERR`].
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CtrlAck {
    /// VIRTIO_NET_OK: the command was applied.
    Ok = VIRTIO_NET_OK,
    /// VIRTIO_NET_ERR: the command was refused.
    Err = VIRTIO_NET_ERR,
}

/// An `ack` byte that is neither VIRTIO_NET_OK nor VIRTIO_NET_ERR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown control ack {0}")]
pub struct UnknownAck(pub u8);

impl CtrlAck {
    /// The wire value.
    pub const fn raw(self) -> u8 {
        self as u8
    }

    /// The ack of a byte the device wrote (a driver reads it from memory the device
    /// controls: anything but the two values is refused).
    ///
    /// # Errors
    /// [`UnknownAck`].
    pub const fn parse(raw: u8) -> Result<CtrlAck, UnknownAck> {
        match raw {
            VIRTIO_NET_OK => Ok(CtrlAck::Ok),
            VIRTIO_NET_ERR => Ok(CtrlAck::Err),
            _ => Err(UnknownAck(raw)),
        }
    }

    /// The ack of a command that was applied (`true`) or refused.
    pub const fn from_applied(applied: bool) -> CtrlAck {
        if applied { CtrlAck::Ok } else { CtrlAck::Err }
    }
}

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
    /// Fewer bytes than the 2-byte class and command.
    #[error("control command of {0} bytes has no class and command")]
    Truncated(usize),
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

    /// Validates a whole command as it lies in the device-readable part of a
    /// control chain: the 2-byte [`VirtioNetCtrlHdr`], then the data (see
    /// [`Self::parse`]).
    ///
    /// # Errors
    /// [`CtrlError::Truncated`] for fewer than 2 bytes; the errors of
    /// [`Self::parse`].
    pub fn parse_bytes(bytes: &'a [u8], features: NetFeatures) -> Result<Self, CtrlError> {
        let Some(([class, command], data)) = bytes.split_first_chunk::<2>() else {
            return Err(CtrlError::Truncated(bytes.len()));
        };
        let hdr = VirtioNetCtrlHdr {
            class: *class,
            command: *command,
        };
        CtrlCommand::parse(hdr, data, features)
    }

    /// Appends the whole command to `out`: the 2-byte [`VirtioNetCtrlHdr`], then the
    /// data; what [`Self::parse_bytes`] reads back.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.header().as_bytes());
        self.encode_data(out);
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

// The wire sizes and offsets of §5.1.6, checked at compile time.
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
};

#[cfg(test)]
mod tests {
    use super::*;

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

        /// Any command: emit, then parse, gives it back.
        #[test]
        fn control_emit_then_parse_is_the_identity(
            pick in 0u8..5,
            on in proptest::bool::ANY,
            mac in proptest::array::uniform6(0u8..),
            pairs in MQ_VQ_PAIRS_MIN..=MQ_VQ_PAIRS_MAX,
            uni in proptest::collection::vec(0u8.., 0..5),
            multi in proptest::collection::vec(0u8.., 0..5),
        ) {
            // Whole addresses: each drawn byte stands for one address.
            let uni: Vec<u8> = uni.iter().flat_map(|&b| [b; 6]).collect();
            let multi: Vec<u8> = multi.iter().flat_map(|&b| [b; 6]).collect();
            let cmd = match pick {
                0 => CtrlCommand::Promisc(on),
                1 => CtrlCommand::AllMulti(on),
                2 => CtrlCommand::MacAddr(mac),
                3 => CtrlCommand::VqPairs(pairs),
                _ => CtrlCommand::MacTable {
                    unicast: MacList::new(&uni).unwrap(),
                    multicast: MacList::new(&multi).unwrap(),
                },
            };
            let all = NetFeatures::CTRL_RX | NetFeatures::CTRL_MAC_ADDR | NetFeatures::MQ;
            let mut bytes = Vec::new();
            cmd.emit(&mut bytes);
            proptest::prop_assert_eq!(CtrlCommand::parse_bytes(&bytes, all), Ok(cmd));
        }

        /// Any bytes: parsing a whole command never panics, and what parses emits
        /// back to bytes that parse to the same command.
        #[test]
        fn control_parse_bytes_is_total(
            bytes in proptest::collection::vec(0u8..8, 0..40),
            features in proptest::num::u64::ANY,
        ) {
            let features = NetFeatures::from_bits_retain(features);
            if let Ok(cmd) = CtrlCommand::parse_bytes(&bytes, features) {
                let mut again = Vec::new();
                cmd.emit(&mut again);
                proptest::prop_assert_eq!(CtrlCommand::parse_bytes(&again, features), Ok(cmd));
            }
        }

        /// Any ack byte: it parses to an ack that emits the same byte, or is refused.
        #[test]
        fn ack_parse_is_total(raw in proptest::num::u8::ANY) {
            match CtrlAck::parse(raw) {
                Ok(a) => proptest::prop_assert_eq!(a.raw(), raw),
                Err(e) => proptest::prop_assert_eq!(e, UnknownAck(raw)),
            }
        }
    }

    #[test]
    fn whole_commands_and_acks() {
        assert_eq!(
            CtrlCommand::parse_bytes(&[VIRTIO_NET_CTRL_RX], NetFeatures::CTRL_RX),
            Err(CtrlError::Truncated(1))
        );
        let mut b = Vec::new();
        CtrlCommand::VqPairs(2).emit(&mut b);
        assert_eq!(b, [VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, 2, 0]);
        assert_eq!(CtrlAck::parse(0), Ok(CtrlAck::Ok));
        assert_eq!(CtrlAck::parse(1), Ok(CtrlAck::Err));
        assert_eq!(CtrlAck::parse(2), Err(UnknownAck(2)));
        assert_eq!(CtrlAck::from_applied(false).raw(), VIRTIO_NET_ERR);
    }
}
