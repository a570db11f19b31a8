//! `net_rx_mrg`: receive delivery of the virtio-net device (`backend_host`'s
//! `Pair::deliver`, through `backend_host::net::device::fuzz_deliver_rx`) into
//! receive queues a hostile driver built, with and without MRG_RXBUF (HOSTILE 29).
//!
//! Input layout: `bits: u8` (bit 0: MRG_RXBUF; bits 1-3: queue size `1 << n`),
//! `budget: u8` (receive chains the round may take), `frames: u8` (1-3 frames), a
//! `u32` length per frame (modulo 70 000, so past 65 535), `chains: u8`, then per
//! chain `descs: u8` (1-4) and per descriptor `flags: u8` (bit 0: device-writable;
//! bit 1: zero length) and `len: u16`. Descriptors stop at the queue size and at
//! [`BUFFER_BYTES`] of buffers. Frame bytes are a counter pattern.
//!
//! Invariants: never a panic; every used length is at most its chain's writable
//! bytes; the non-empty used buffers are exactly the delivered frames' buffers, in
//! order, each frame's buffers holding `virtio_net_hdr` then the whole frame
//! (nothing truncated, nothing of a dropped frame); the header's `num_buffers` is
//! the number of chains the frame spans (1 without MRG_RXBUF; a chain with no
//! writable byte the device gathered may add to it); a frame is either delivered,
//! dropped and counted, or left waiting; guest memory outside the written bytes
//! (and the used ring) is unchanged.

use std::sync::Arc;

use backend_host::net::device::{FuzzRxFate, fuzz_deliver_rx};
use virtio_core::DeviceRing;
use virtio_core::features::Features;
use virtio_core::net::{ETH_HDR_LEN, NetFeatures, VirtioNetHdr};
use virtio_core::ring::layout::{Descriptor, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use virtio_core::test_utils::Arena;
use virtio_core::test_utils::raw::RawDriver;
use zerocopy::IntoBytes;

use super::common::{Bytes, Seed};

const ARENA_BASE: u64 = 0x4000_0000;
const ARENA_SIZE: usize = 1 << 20;
/// Most bytes of receive buffers one input allocates.
pub const BUFFER_BYTES: u64 = 768 << 10;
/// Frame lengths are taken modulo this (past the 64 KiB GSO maximum).
const FRAME_MOD: u32 = 70_000;
const HDR: usize = VirtioNetHdr::SIZE;

struct Built {
    head: u16,
    /// The device-writable buffers, in chain order.
    writable: Vec<(u64, u32)>,
}

impl Built {
    fn writable_len(&self) -> u64 {
        self.writable.iter().map(|&(_, l)| u64::from(l)).sum()
    }
}

/// Runs one input; panics only when an invariant is broken.
pub fn run(data: &[u8]) {
    report(data);
}

/// [`run`], returning each frame's fate and the used ring, for the seed tests.
pub fn report(data: &[u8]) -> String {
    let mut input = Bytes(data);
    let bits = input.u8();
    let mrg = bits & 1 != 0;
    let size = 1u16 << ((bits >> 1) & 7);
    let budget = usize::from(input.u8());
    let nframes = usize::from(input.u8() % 3) + 1;
    let frames: Vec<Vec<u8>> = (0..nframes)
        .map(|f| {
            // The switch carries no frame shorter than an Ethernet header (transmit
            // and TAP drop them), so neither does the harness.
            let len = ETH_HDR_LEN + (input.u32() % (FRAME_MOD - ETH_HDR_LEN as u32)) as usize;
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(f as u8 + 1))
                .collect()
        })
        .collect();

    let arena = Arena::new(ARENA_BASE, ARENA_SIZE).expect("arena");
    let ((_, _, used_at), ring) = arena.alloc_split_ring(size).expect("ring");
    let (_, tx_ring) = arena.alloc_split_ring(1).expect("tx ring");
    let features = Features::VERSION_1;
    let rx = DeviceRing::new(size, &ring, arena.clone(), features).expect("rx");
    let tx = DeviceRing::new(1, &tx_ring, arena.clone(), features).expect("tx");
    let mut raw = RawDriver::new(arena.clone(), size, ring).expect("raw");

    let nchains = input.u8();
    let mut chains: Vec<Built> = Vec::new();
    let (mut next, mut bytes) = (0u16, 0u64);
    'chains: for _ in 0..nchains {
        let n = u16::from(input.u8() % 4) + 1;
        if next + n > size {
            break;
        }
        let head = next;
        let mut writable = Vec::new();
        for j in 0..n {
            let flags = input.u8();
            let mut len = u32::from(input.u16());
            if flags & 2 != 0 {
                len = 0;
            }
            bytes += u64::from(len) + 1;
            if bytes > BUFFER_BYTES {
                break 'chains;
            }
            let at = arena.alloc(u64::from(len) + 1, 1).expect("buffer");
            let w = flags & 1 != 0;
            Arena::write(&arena, at, &vec![if w { 0xee } else { 0x11 }; len as usize + 1]).expect("fill");
            let mut f = if w { VIRTQ_DESC_F_WRITE } else { 0 };
            if j + 1 < n {
                f |= VIRTQ_DESC_F_NEXT;
            }
            raw.write_descriptor(head + j, &Descriptor::new(at, len, f, head + j + 1));
            if w {
                writable.push((at, len));
            }
        }
        next += n;
        raw.push_avail(head);
        chains.push(Built { head, writable });
    }
    raw.publish_avail();

    // Everything allocated lies below `top`; only that much is compared.
    let top = (arena.alloc(1, 1).expect("top") - ARENA_BASE) as usize;
    let mut shadow = vec![0u8; top];
    Arena::read(&arena, ARENA_BASE, &mut shadow).expect("snapshot");
    let nf = if mrg {
        NetFeatures::MRG_RXBUF
    } else {
        NetFeatures::empty()
    };
    let fates = fuzz_deliver_rx(rx, tx, nf, frames.clone(), budget).expect("eventfds");
    assert!(fates.len() <= frames.len());
    for (i, f) in fates.iter().enumerate() {
        // Only the last frame offered may be left waiting.
        assert!(
            matches!(f, FuzzRxFate::Delivered | FuzzRxFate::Dropped) || i + 1 == fates.len(),
            "frame offered after one left waiting"
        );
    }

    let used = raw.read_used();
    let chain_of = |id: u32| {
        chains
            .iter()
            .find(|c| u32::from(c.head) == id)
            .expect("used id is a head")
    };
    for &(id, len) in &used {
        let c = chain_of(id);
        assert!(
            u64::from(len) <= c.writable_len(),
            "used length {len} past {} writable bytes",
            c.writable_len()
        );
    }
    // Every head comes back at most once.
    let mut heads: Vec<u32> = used.iter().map(|u| u.0).collect();
    heads.sort_unstable();
    heads.dedup();
    assert_eq!(heads.len(), used.len(), "a head used twice");

    // The delivered frames' streams, in order, over the non-empty used buffers.
    let mut at = 0;
    let zero_writable = chains.iter().filter(|c| c.writable_len() == 0).count();
    for (f, _) in fates
        .iter()
        .enumerate()
        .filter(|(_, f)| **f == FuzzRxFate::Delivered)
    {
        let frame = &frames[f];
        let want = HDR + frame.len();
        while at < used.len() && used[at].1 == 0 {
            at += 1;
        }
        let first = at;
        let mut stream = Vec::with_capacity(want);
        while stream.len() < want {
            assert!(
                at < used.len(),
                "frame {f}: its buffers hold {} of {want} bytes",
                stream.len()
            );
            let (id, len) = used[at];
            let mut left = len as usize;
            for &(a, l) in &chain_of(id).writable {
                let k = left.min(l as usize);
                let mut b = vec![0u8; k];
                Arena::read(&arena, a, &mut b).expect("read back");
                stream.extend_from_slice(&b);
                left -= k;
            }
            at += 1;
        }
        assert_eq!(stream.len(), want, "frame {f}: written past its end");
        let spanned = at - first;
        let hdr_bytes: [u8; HDR] = stream[..HDR].try_into().expect("header");
        let k = usize::from(u16::from_le_bytes([hdr_bytes[10], hdr_bytes[11]]));
        if mrg {
            assert!(
                k >= spanned && k <= spanned + zero_writable,
                "frame {f}: num_buffers {k}, spans {spanned} chains"
            );
        } else {
            assert_eq!((k, spanned), (1, 1), "frame {f}: without MRG_RXBUF one chain");
        }
        let k16 = u16::try_from(k).expect("u16");
        assert_eq!(hdr_bytes, VirtioNetHdr::rx(k16).as_bytes(), "frame {f}: header");
        assert_eq!(&stream[HDR..], &frame[..], "frame {f}: bytes changed");
        // The expected memory: the stream over the buffers.
        let mut s = &stream[..];
        for &(id, len) in &used[first..at] {
            let mut left = len as usize;
            for &(a, l) in &chain_of(id).writable {
                let k = left.min(l as usize);
                let off = (a - ARENA_BASE) as usize;
                shadow[off..off + k].copy_from_slice(&s[..k]);
                s = &s[k..];
                left -= k;
            }
        }
    }
    for &(id, len) in &used[at.min(used.len())..] {
        assert_eq!(
            len, 0,
            "chain {id}: bytes of no delivered frame (truncated or dropped)"
        );
    }

    // Nothing else changed (the used ring aside).
    let mut now = vec![0u8; top];
    Arena::read(&arena, ARENA_BASE, &mut now).expect("snapshot");
    // A device may write more of a buffer than the used length it reports (virtio
    // 1.2 §2.7.8.2: "MAY write more than len bytes"): past the used length, the
    // writable buffers of the chains it returned may change; nothing else may.
    for &(id, len) in &used {
        let mut skip = len as usize;
        for &(a, l) in &chain_of(id).writable {
            let k = skip.min(l as usize);
            skip -= k;
            let (from, to) = (
                (a - ARENA_BASE) as usize + k,
                (a - ARENA_BASE) as usize + l as usize,
            );
            shadow[from..to].copy_from_slice(&now[from..to]);
        }
    }
    let used_off = (used_at - ARENA_BASE) as usize;
    let used_end = used_off + 6 + 8 * usize::from(size);
    let same = now == shadow;
    for (i, (a, b)) in now.iter().zip(&shadow).enumerate().filter(|_| !same) {
        if a != b && !(used_off..used_end).contains(&i) {
            panic!(
                "guest byte at {:#x} changed outside the frames ({b:#x} -> {a:#x}; used ring at \
                 {used_at:#x}; {fates:?} used {used:?}; chains {:?})",
                ARENA_BASE + i as u64,
                chains.iter().map(|c| (c.head, &c.writable)).collect::<Vec<_>>()
            );
        }
    }
    let _: Arc<Arena> = arena;
    format!("{fates:?} used {used:?}")
}

/// A seed: `(mrg, size exponent, budget, frame lengths, chains of (writable, zero, len))`.
fn input(mrg: bool, size_exp: u8, budget: u8, frames: &[u32], chains: &[&[(bool, bool, u16)]]) -> Vec<u8> {
    let mut s = Seed::new()
        .u8(u8::from(mrg) | (size_exp << 1))
        .u8(budget)
        .u8(frames.len() as u8 - 1);
    for &f in frames {
        s = s.u32(f - ETH_HDR_LEN as u32);
    }
    s = s.u8(chains.len() as u8);
    for c in chains {
        s = s.u8(c.len() as u8 - 1);
        for &(w, z, len) in *c {
            s = s.u8(u8::from(w) | (u8::from(z) << 1)).u16(len);
        }
    }
    s.0
}

/// The seed corpus: `(name, input, text the report must contain)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let w = |len| (true, false, len);
    let big = w(60_000);
    vec![
        (
            "plain-one-chain",
            input(false, 3, 64, &[60], &[&[w(1526)]]),
            "[Delivered] used [(0, 72)]",
        ),
        (
            "29-mrg-two-chains",
            input(true, 3, 64, &[1000], &[&[w(600)], &[w(600)]]),
            "[Delivered] used [(0, 600), (1, 412)]",
        ),
        (
            "29-mrg-one-byte-buffers",
            input(true, 5, 64, &[14], &[&[w(1)] as &[_]; 32]),
            "[Delivered] used [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1), (9, 1), (10, 1), (11, 1), (12, 1), (13, 1), (14, 1), (15, 1), (16, 1), (17, 1), (18, 1), (19, 1), (20, 1), (21, 1), (22, 1), (23, 1), (24, 1), (25, 1)]",
        ),
        (
            "29-readable-buffer",
            input(
                true,
                3,
                64,
                &[100],
                &[&[(false, false, 64), w(64)], &[(false, false, 64)], &[w(128)]],
            ),
            "Delivered",
        ),
        (
            "29-zero-length-descriptor",
            input(true, 3, 64, &[100], &[&[w(64), (true, true, 0)], &[w(128)]]),
            "Delivered",
        ),
        (
            "29-no-mrg-too-small-dropped",
            input(false, 3, 64, &[1000, 20], &[&[w(600)], &[w(600)]]),
            "[Dropped, Delivered] used [(0, 0), (1, 32)]",
        ),
        (
            "29-mrg-queue-too-small-dropped",
            input(true, 1, 64, &[65_600], &[&[big], &[w(5000)]]),
            "[Dropped] used [(0, 0), (1, 0)]",
        ),
        (
            "29-64k-frame-delivered",
            input(true, 2, 64, &[65_600], &[&[big], &[w(5000)], &[w(5000)]]),
            "[Delivered] used [(0, 60000), (1, 5000), (2, 612)]",
        ),
        (
            "29-no-buffers-wait",
            input(true, 3, 64, &[100], &[]),
            "[Wait] used []",
        ),
        (
            "29-mrg-partial-then-wait",
            input(true, 3, 64, &[1000], &[&[w(100)]]),
            "[Wait] used [(0, 0)]",
        ),
        (
            "34-budget-spent-later",
            input(true, 3, 1, &[1000], &[&[w(600)], &[w(600)]]),
            "[Later] used [(0, 0)]",
        ),
    ]
}
