//! The Internet checksum (RFC 1071) and the completion of a partial checksum
//! (virtio 1.2 §5.1.6.2: the driver leaves the pseudo-header sum in the checksum
//! field and the device finishes the job). Where the field is comes from the header
//! checks of [`super::wire`]; this module only computes.

use super::wire::PartialCsum;

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
/// complement at `start + offset`. `at` must come from [`check_tx_header`](super::check_tx_header) or
/// [`rx_partial_csum`](super::rx_partial_csum) for this frame's length; otherwise nothing is changed.
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

    proptest::proptest! {
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
