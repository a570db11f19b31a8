//! `driver_used_ring`: the driver side of a split ring (`SplitDriver`) against a
//! hostile device that writes whatever it likes into the used ring and the
//! descriptor table (HOSTILE 31).
//!
//! Input layout (missing bytes read as zero): `size` (queue size `1 << (size % 7)`,
//! 1 to 64), `features` (bit 0 INDIRECT_DESC, bit 1 EVENT_IDX), then operations until
//! the input ends (at most 256), an op byte whose low 3 bits are one of [`op`]
//! followed by its operands.
//!
//! Invariants: never a panic; `pop_used` hands back only tokens that are
//! outstanding, each once, with a length at most the request's writable bytes; once
//! it reports the device broken it stays broken (`pop_used` and `add` both refuse);
//! `outstanding()` always equals the tokens given and not returned; `reset` returns
//! exactly the tokens still outstanding and leaves the queue usable (all
//! descriptors free).

use std::collections::BTreeMap;

use virtio_core::features::Features;
use virtio_core::ring::split::DriverQueueError;
use virtio_core::test_utils::raw::RawDriver;
use virtio_core::test_utils::{Arena, IdentityShare};
use virtio_core::{GuestBuf, SplitDriver};

use super::common::{Bytes, Seed};

/// Opcodes (low 3 bits of an op byte).
pub mod op {
    /// `outs: u8, ins: u8`: add a request of `outs % 4` readable and `ins % 4`
    /// writable buffers, each `len: u16` (modulo 4097).
    pub const ADD: u8 = 0;
    /// `pick: u8, id: u32, len: u32`: write a used element at the device's next
    /// position and publish it. Bit 3 of the op: the id is the `pick`th
    /// outstanding head instead of `id`; bit 4: the length is `len % (writable + 1)`.
    pub const USED: u8 = 1;
    /// `idx: u16`: store a raw `used.idx`.
    pub const SET_USED_IDX: u8 = 2;
    /// Pop up to `(op >> 3) + 1` used elements.
    pub const POP: u8 = 3;
    /// `flags: u16, avail_event: u16`: scribble `used.flags` and `avail_event`, then
    /// exercise the notification logic.
    pub const NOTIFY: u8 = 4;
    /// Reset the queue.
    pub const RESET: u8 = 5;
    /// `pos: u16, id: u32, len: u32`: write a used element at a raw position without
    /// publishing it.
    pub const ELEM: u8 = 6;
    /// `index: u8, addr: u64, len: u32, flags: u16, next: u16`: scribble a descriptor
    /// of the table (a device with write access to it).
    pub const DESC: u8 = 7;
}

const ARENA_BASE: u64 = 0x20_0000;
const ARENA_SIZE: usize = 4 << 20;
const MAX_OPS: usize = 256;

/// What the harness knows of an outstanding request.
#[derive(Debug, Clone, Copy)]
struct Req {
    token: u32,
    writable: u32,
}

/// Runs one input; panics only when an invariant is broken.
pub fn run(data: &[u8]) {
    report(data);
}

/// [`run`], returning one line per notable event (`used <token> <len>`, the error
/// that broke the queue), for the seed tests.
pub fn report(data: &[u8]) -> Vec<String> {
    let mut input = Bytes(data);
    let size = 1u16 << (input.u8() % 7);
    let bits = input.u8();
    let mut features = Features::VERSION_1;
    if bits & 1 != 0 {
        features |= Features::INDIRECT_DESC;
    }
    if bits & 2 != 0 {
        features |= Features::EVENT_IDX;
    }
    let arena = Arena::new(ARENA_BASE, ARENA_SIZE).expect("arena");
    let (_, ring) = arena.alloc_split_ring(size).expect("ring");
    let share = IdentityShare::new(arena.clone(), size);
    let mut driver: SplitDriver<IdentityShare, u32> =
        SplitDriver::new(size, ring.clone(), share, features).expect("driver");
    let raw = RawDriver::new(arena.clone(), size, ring).expect("raw");
    // Buffers come from a fixed pool so a long input cannot exhaust the arena.
    let pool = arena.alloc(64 * 4097, 64).expect("pool");

    let mut events = Vec::new();
    let mut outstanding: BTreeMap<u16, Req> = BTreeMap::new();
    let mut next_token = 0u32;
    let mut dev_used = 0u16;
    let mut broken: Option<DriverQueueError> = None;

    let mut ops = 0;
    while !input.is_empty() && ops < MAX_OPS {
        ops += 1;
        let op = input.u8();
        match op & 7 {
            op::ADD => {
                let outs = usize::from(input.u8() % 4);
                let ins = usize::from(input.u8() % 4);
                let mut bufs = Vec::new();
                for i in 0..outs + ins {
                    let len = u32::from(input.u16() % 4097);
                    let slot = (next_token as u64 * 8 + i as u64) % 64;
                    bufs.push(GuestBuf::new(pool + slot * 4097, len));
                }
                let (o, w) = bufs.split_at(outs);
                let writable: u32 = w.iter().map(|b| b.len).sum();
                let token = next_token;
                next_token += 1;
                match driver.add(o, w, token) {
                    Ok(head) => {
                        assert!(broken.is_none(), "add accepted on a broken queue");
                        assert!(head < size, "head {head} outside the queue");
                        let prev = outstanding.insert(head, Req { token, writable });
                        assert!(prev.is_none(), "head {head} handed out twice");
                    }
                    Err(rejected) => assert_eq!(rejected.token, token, "token not handed back"),
                }
            }
            op::USED => {
                let pick = input.u8();
                let mut id = input.u32();
                let mut len = input.u32();
                if op & 8 != 0 && !outstanding.is_empty() {
                    let (head, req) = outstanding
                        .iter()
                        .nth(usize::from(pick) % outstanding.len())
                        .expect("non-empty");
                    id = u32::from(*head);
                    if op & 16 != 0 {
                        len %= req.writable.saturating_add(1).max(1);
                    }
                }
                raw.write_used_elem(dev_used, id, len);
                dev_used = dev_used.wrapping_add(1);
                raw.set_used_idx(dev_used);
            }
            op::SET_USED_IDX => {
                dev_used = input.u16();
                raw.set_used_idx(dev_used);
            }
            op::POP => {
                for _ in 0..usize::from(op >> 3) + 1 {
                    match driver.pop_used() {
                        Ok(None) => {
                            assert!(broken.is_none(), "pop_used on a broken queue returned None");
                            break;
                        }
                        Ok(Some(used)) => {
                            assert!(broken.is_none(), "pop_used on a broken queue returned {used:?}");
                            let head = outstanding
                                .iter()
                                .find(|(_, r)| r.token == used.token)
                                .map(|(h, _)| *h)
                                .unwrap_or_else(|| panic!("token {} not outstanding", used.token));
                            let req = outstanding.remove(&head).expect("found");
                            assert!(
                                used.len <= req.writable,
                                "used length {} above {} writable bytes",
                                used.len,
                                req.writable
                            );
                            events.push(format!("used {} {}", used.token, used.len));
                        }
                        Err(e) => {
                            match broken {
                                Some(_) => assert_eq!(e, DriverQueueError::Broken),
                                None => {
                                    events.push(format!("{e:?}"));
                                    broken = Some(e);
                                }
                            }
                            assert!(driver.is_broken(), "error {e:?} without marking the queue broken");
                            break;
                        }
                    }
                }
            }
            op::NOTIFY => {
                raw.set_used_flags(input.u16());
                raw.set_avail_event(input.u16());
                let _ = driver.kick_prepare();
                driver.disable_notifications();
                let _ = driver.enable_notifications();
                let _ = driver.enable_notifications_delayed();
            }
            op::RESET => {
                let mut got = driver.reset();
                got.sort_unstable();
                let mut want: Vec<u32> = outstanding.values().map(|r| r.token).collect();
                want.sort_unstable();
                assert_eq!(got, want, "reset returned other tokens than the outstanding ones");
                outstanding.clear();
                events.push("reset".into());
                // A reset queue starts over: the device's cursor too.
                dev_used = 0;
                broken = None;
                assert!(!driver.is_broken(), "broken after reset");
                assert_eq!(driver.num_free(), size, "descriptors leaked across reset");
            }
            op::ELEM => {
                let pos = input.u16();
                let id = input.u32();
                let len = input.u32();
                raw.write_used_elem(pos, id, len);
            }
            _ => {
                let i = u16::from(input.u8()) % size;
                let addr = input.u64();
                let len = input.u32();
                let flags = input.u16();
                let next = input.u16();
                raw.write_desc(i, addr, len, flags, next);
            }
        }
        assert_eq!(
            usize::from(driver.outstanding()),
            outstanding.len(),
            "driver and harness disagree on outstanding requests"
        );
        assert!(
            driver.num_free() <= size,
            "more free descriptors than the queue has"
        );
    }
    // Whatever the device did, a reset returns every outstanding token.
    let mut got = driver.reset();
    got.sort_unstable();
    let mut want: Vec<u32> = outstanding.values().map(|r| r.token).collect();
    want.sort_unstable();
    assert_eq!(got, want, "final reset lost tokens");
    assert_eq!(driver.num_free(), size, "descriptors leaked");
    events
}

/// Seed builder.
fn seed(size_log: u8, features: u8) -> Seed {
    Seed::new().u8(size_log).u8(features)
}

fn add(s: Seed, outs: &[u16], ins: &[u16]) -> Seed {
    let mut s = s.u8(op::ADD).u8(outs.len() as u8).u8(ins.len() as u8);
    for l in outs.iter().chain(ins) {
        s = s.u16(*l);
    }
    s
}

/// The seed corpus: `(name, input, text the report must contain)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let base = || add(seed(3, 0), &[16], &[512]);
    vec![
        (
            "good-completion",
            base().u8(op::USED).u8(0).u32(0).u32(512).u8(op::POP).0,
            "used 0 512",
        ),
        (
            "31-unknown-id",
            base().u8(op::USED).u8(0).u32(5).u32(0).u8(op::POP).0,
            "UnknownId(5)",
        ),
        (
            "31-id-out-of-range",
            base().u8(op::USED).u8(0).u32(u32::MAX).u32(0).u8(op::POP).0,
            "UnknownId(4294967295)",
        ),
        (
            "31-length-too-large",
            base().u8(op::USED).u8(0).u32(0).u32(513).u8(op::POP).0,
            "LengthTooLarge",
        ),
        (
            "31-used-idx-ahead",
            base().u8(op::SET_USED_IDX).u16(2).u8(op::POP).0,
            "UsedTooFarAhead",
        ),
        (
            "31-same-id-twice",
            base()
                .u8(op::USED)
                .u8(0)
                .u32(0)
                .u32(1)
                .u8(op::USED)
                .u8(0)
                .u32(0)
                .u32(1)
                .u8(op::POP | (1 << 3))
                .0,
            "UsedTooFarAhead",
        ),
        (
            "31-broken-then-reset",
            add(
                base().u8(op::USED).u8(0).u32(7).u32(0).u8(op::POP).u8(op::RESET),
                &[16],
                &[1],
            )
            .u8(op::USED | 8 | 16)
            .u8(0)
            .u32(0)
            .u32(1)
            .u8(op::POP)
            .0,
            "used 1 1",
        ),
        (
            "31-indirect-event-idx",
            add(add(seed(2, 3), &[16, 16], &[100, 412]), &[8], &[1])
                .u8(op::NOTIFY)
                .u16(1)
                .u16(0)
                .u8(op::USED | 8 | 16)
                .u8(1)
                .u32(0)
                .u32(u32::MAX)
                .u8(op::DESC)
                .u8(0)
                .u64(u64::MAX)
                .u32(u32::MAX)
                .u16(0xffff)
                .u16(0xffff)
                .u8(op::POP | (3 << 3))
                .0,
            "used 1",
        ),
    ]
}
