//! `net_ctrl`: the virtio-net control-queue command parser
//! (`virtio_core::net::CtrlCommand::parse`) over whatever a driver put in a control
//! request (virtio 1.2 §5.1.6.5).
//!
//! Input layout: `features: u64`, `class: u8`, `command: u8`, then the command's
//! data (everything left, at most `CTRL_DATA_MAX` bytes as the device reads it).
//!
//! Invariants: never a panic; an accepted command has the header it was parsed
//! from, needs only negotiated features (CTRL_RX, CTRL_MAC_ADDR, MQ), keeps its
//! queue-pair count within the spec's bounds, its MAC lists within the data, and
//! encodes back to a command that parses to itself (to the very bytes, but for the
//! booleans' non-zero values).

use virtio_core::net::{
    CTRL_DATA_MAX, CtrlCommand, MQ_VQ_PAIRS_MAX, NetFeatures, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_RX, VirtioNetCtrlHdr,
};

use super::common::{Bytes, Seed};

/// Runs one input; panics only when an invariant is broken.
pub fn run(data: &[u8]) {
    report(data);
}

/// [`run`], returning the parse result, for the seed tests.
pub fn report(data: &[u8]) -> String {
    let mut input = Bytes(data);
    let features = NetFeatures::from_bits_retain(input.u64());
    let hdr = VirtioNetCtrlHdr {
        class: input.u8(),
        command: input.u8(),
    };
    let body = &input.0[..input.0.len().min(CTRL_DATA_MAX)];
    let r = CtrlCommand::parse(hdr, body, features);
    if let Ok(cmd) = &r {
        assert_eq!(cmd.header(), hdr, "parsed into another command");
        let need = match cmd {
            CtrlCommand::Promisc(_) | CtrlCommand::AllMulti(_) | CtrlCommand::MacTable { .. } => {
                NetFeatures::CTRL_RX
            }
            CtrlCommand::MacAddr(_) => NetFeatures::CTRL_MAC_ADDR,
            CtrlCommand::VqPairs(n) => {
                assert!((1..=MQ_VQ_PAIRS_MAX).contains(n), "{n} queue pairs accepted");
                NetFeatures::MQ
            }
        };
        assert!(features.contains(need), "{cmd:?} without {need:?}");
        if let CtrlCommand::MacTable { unicast, multicast } = cmd {
            assert_eq!(
                8 + 6 * (unicast.len() + multicast.len()),
                body.len(),
                "MAC lists and data disagree"
            );
        }
        let mut out = Vec::new();
        cmd.encode_data(&mut out);
        let again = CtrlCommand::parse(hdr, &out, features).expect("encoded command parses");
        assert_eq!(&again, cmd, "round trip changed the command");
        if !matches!(cmd, CtrlCommand::Promisc(_) | CtrlCommand::AllMulti(_)) {
            assert_eq!(out, body, "encoding differs from the parsed bytes");
        }
    }
    format!("{r:?}")
}

fn input(features: NetFeatures, class: u8, command: u8, data: &[u8]) -> Vec<u8> {
    Seed::new()
        .u64(features.bits())
        .u8(class)
        .u8(command)
        .bytes(data)
        .0
}

/// The seed corpus: `(name, input, text the report must contain)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let all = NetFeatures::CTRL_VQ | NetFeatures::CTRL_RX | NetFeatures::CTRL_MAC_ADDR | NetFeatures::MQ;
    let mut table = 1u32.to_le_bytes().to_vec();
    table.extend([2, 0, 0, 0, 0, 1]);
    table.extend(2u32.to_le_bytes());
    table.extend([1, 0, 0x5e, 0, 0, 1, 0x33, 0x33, 0, 0, 0, 1]);
    vec![
        (
            "promisc",
            input(all, VIRTIO_NET_CTRL_RX, 0, &[1]),
            "Ok(Promisc(true))",
        ),
        (
            "mac-table",
            input(all, VIRTIO_NET_CTRL_MAC, 0, &table),
            "Ok(MacTable",
        ),
        (
            "mac-addr",
            input(all, VIRTIO_NET_CTRL_MAC, 1, &[2, 0, 0, 0, 0, 9]),
            "Ok(MacAddr",
        ),
        (
            "vq-pairs",
            input(all, VIRTIO_NET_CTRL_MQ, 0, &4u16.to_le_bytes()),
            "Ok(VqPairs(4))",
        ),
        (
            "vq-pairs-zero",
            input(all, VIRTIO_NET_CTRL_MQ, 0, &0u16.to_le_bytes()),
            "QueuePairs(0)",
        ),
        (
            "vq-pairs-too-many",
            input(all, VIRTIO_NET_CTRL_MQ, 0, &0x8001u16.to_le_bytes()),
            "QueuePairs(32769)",
        ),
        (
            "mac-table-count-huge",
            input(all, VIRTIO_NET_CTRL_MAC, 0, &u32::MAX.to_le_bytes()),
            "BadLength",
        ),
        (
            "mac-table-trailing",
            input(all, VIRTIO_NET_CTRL_MAC, 0, &[table.clone(), vec![0]].concat()),
            "BadLength",
        ),
        (
            "rx-not-negotiated",
            input(NetFeatures::CTRL_VQ, VIRTIO_NET_CTRL_RX, 1, &[1]),
            "NotNegotiated",
        ),
        ("unknown-class", input(all, 9, 0, &[]), "UnknownClass(9)"),
        (
            "unknown-command",
            input(all, VIRTIO_NET_CTRL_RX, 7, &[0]),
            "UnknownCommand",
        ),
    ]
}
