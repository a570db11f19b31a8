//! The flow hash for automatic receive steering (virtio 1.2 §5.1.6.5.5): a
//! computation over a frame, not part of any wire format.

use super::ETH_HDR_LEN;

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

#[cfg(test)]
mod tests {
    use super::*;

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
        /// Any bytes: the flow hash never panics.
        #[test]
        fn flow_hash_is_total(data in proptest::collection::vec(0u8.., 0..80)) {
            let _ = flow_hash(&data);
        }
    }
}
