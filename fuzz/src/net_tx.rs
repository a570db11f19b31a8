//! `net_tx`: the virtio-net header checks of `virtio_core::net` a device and a
//! driver apply to a frame the other side wrote (HOSTILE 28): `check_tx_header`,
//! `rx_partial_csum`, `complete_checksum` and `flow_hash`.
//!
//! Input layout: `features: u64`, the 12-byte `virtio_net_hdr`, then the frame
//! (everything left).
//!
//! Invariants: never a panic; an accepted transmit header has no GSO and no flag but
//! NEEDS_CSUM, NEEDS_CSUM only with CSUM negotiated, and a checksum field
//! (`csum_start + csum_offset + 2`) inside the frame; the receive check accepts the
//! same field positions; completing the checksum changes only the two field bytes
//! and stores the complement of the covered bytes' sum (RFC 1071: that sum plus
//! the stored checksum folds to 0xffff).

use virtio_core::net::{
    NetFeatures, TxHeaderError, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VirtioNetHdr,
    check_tx_header, complete_checksum, csum_add, csum_fold, flow_hash, rx_partial_csum,
};
use zerocopy::FromBytes;

use super::common::{Bytes, Seed};

/// Runs one input; panics only when an invariant is broken.
pub fn run(data: &[u8]) {
    report(data);
}

/// [`run`], returning the transmit check's result, for the seed tests.
pub fn report(data: &[u8]) -> String {
    let mut input = Bytes(data);
    let features = NetFeatures::from_bits_retain(input.u64());
    let hdr = VirtioNetHdr::read_from_bytes(&input.take::<12>()).expect("12 bytes");
    let frame = input.0.to_vec();
    let _ = flow_hash(&frame);

    let tx = check_tx_header(&hdr, frame.len(), features);
    let needs = hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
    let field_end = usize::from(hdr.csum_start.get()) + usize::from(hdr.csum_offset.get()) + 2;
    match &tx {
        Ok(at) => {
            assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_NONE, "GSO accepted");
            assert_eq!(hdr.flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, "flags accepted");
            assert_eq!(at.is_some(), needs);
            if needs {
                assert!(features.contains(NetFeatures::CSUM), "NEEDS_CSUM without CSUM");
                assert!(field_end <= frame.len(), "checksum field outside the frame");
            }
        }
        Err(TxHeaderError::CsumOutOfRange { .. }) => assert!(field_end > frame.len()),
        Err(_) => {}
    }

    let rx = rx_partial_csum(&hdr, frame.len());
    match &rx {
        Ok(Some(at)) => {
            assert!(needs && field_end <= frame.len());
            let mut done = frame.clone();
            complete_checksum(&mut done, *at);
            let field = at.start + at.offset;
            for (i, (a, b)) in frame.iter().zip(&done).enumerate() {
                assert!(a == b || (field..field + 2).contains(&i), "byte {i} changed");
            }
            // RFC 1071: the covered bytes as the driver left them (the field holding
            // its pseudo-header sum) plus the stored checksum fold to 0xffff. A field
            // at an odd distance from `start` is not a word of that sum: skipped.
            if at.offset % 2 == 0 {
                let before = csum_add(0, &frame[at.start..]);
                let sum = csum_fold(csum_add(before, &done[field..field + 2]));
                assert_eq!(sum, 0xffff, "checksum does not verify");
            }
        }
        Ok(None) => assert!(!needs),
        Err(_) => assert!(needs && field_end > frame.len()),
    }
    if let Ok(Some(tx_at)) = tx {
        assert_eq!(rx, Ok(Some(tx_at)), "transmit and receive disagree on the field");
    }
    format!("{tx:?}")
}

fn input(features: u64, flags: u8, gso: u8, start: u16, offset: u16, frame: &[u8]) -> Vec<u8> {
    Seed::new()
        .u64(features)
        .u8(flags)
        .u8(gso)
        .u16(0)
        .u16(0)
        .u16(start)
        .u16(offset)
        .u16(1)
        .bytes(frame)
        .0
}

/// The seed corpus: `(name, input, text the report must contain)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let csum = NetFeatures::CSUM.bits();
    let n = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    // An Ethernet + IPv4 + UDP frame: the UDP checksum at 34 + 6.
    let mut udp = vec![0u8; 12];
    udp.extend([
        0x08, 0x00, 0x45, 0, 0, 36, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ]);
    udp.extend([
        0x30, 0x39, 0x00, 0x35, 0, 16, 0x12, 0x34, b'p', b'i', b'n', b'g', b'!', b'!', b'!', b'!',
    ]);
    vec![
        ("plain", input(0, 0, 0, 0, 0, &udp), "Ok(None)"),
        (
            "needs-csum-udp",
            input(csum, n, 0, 34, 6, &udp),
            "Ok(Some(PartialCsum { start: 34, offset: 6 }))",
        ),
        (
            "28-csum-not-negotiated",
            input(0, n, 0, 34, 6, &udp),
            "CsumNotNegotiated",
        ),
        (
            "28-csum-past-the-end",
            input(csum, n, 0, 40, 0xffff, &udp),
            "CsumOutOfRange",
        ),
        (
            "28-csum-field-straddles-end",
            input(csum, n, 0, 49, 0, &udp),
            "CsumOutOfRange",
        ),
        ("28-gso", input(csum, 0, 1, 0, 0, &udp), "Gso(1)"),
        ("28-data-valid-flag", input(csum, 2, 0, 0, 0, &udp), "Flags(2)"),
        (
            "28-shorter-than-header",
            input(csum, n, 0, 0, 0, &[]),
            "CsumOutOfRange",
        ),
    ]
}
