//! A real TCP/IP stack between two guests: each guest runs its own smoltcp
//! interface (10.0.0.1/24 and 10.0.0.2/24) over our virtio-net driver
//! (`drivers_net::NetPhy`, set up by `vio::smol`), and both devices are plugged
//! into one learning switch. Over every
//! sharing model and a mixed pair (direct <-> grant):
//!
//! - ARP resolution and ICMP echo: the first request waits for ARP (a broadcast the
//!   switch floods), every reply carries the request's payload back;
//! - a bulk TCP transfer from A to B of a deterministic pseudo-random stream,
//!   checked by a 64-bit FNV-1a hash of every byte on both ends and by its length;
//! - many small request/response exchanges over one TCP connection, each reply
//!   checked;
//! - no frame dropped anywhere (switch counters) and no driver error.
//!
//! Each guest runs its smoltcp loop on its own thread, sleeping in
//! `NetPhy::wait` when it has nothing to do (one thread driving both guests would
//! have to poll one of them). The bulk transfer is 64 MiB over every pair: the file
//! takes 6-9 s in a debug build on 2 cores with other work running (12-15 s with
//! two busy loops beside it), since smoltcp is optimized even in debug builds (root
//! `Cargo.toml`).

use backend_host::net::{NetSettings, Switch, SwitchConfig};
use smoltcp::iface::SocketSet;
use smoltcp::socket::{icmp, tcp};
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpAddress, Ipv4Address};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use vio::conformance::Fixture;
use vio::models;
use vio::smol::{self, Dev, Drv, SmolGuest, both};

/// Longest any phase may take.
const TIMEOUT: Duration = Duration::from_secs(60);

const IP_A: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
const IP_B: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);
const BULK_PORT: u16 = 5001;
const RPC_PORT: u16 = 5002;
/// TCP buffers per direction: the largest window without window scaling, about 45
/// full-size segments. That keeps the link busy (the round trip is tens of
/// microseconds), and it keeps the retransmissions of a receiver stalled past
/// smoltcp's 10 ms minimum RTO within the switch backlog, so the clean case drops
/// nothing even on a loaded machine.
const TCP_BUF: usize = 65535;

/// Bytes of the bulk transfer.
const BULK_BYTES: u64 = 64 << 20;
/// Request/response exchanges.
const EXCHANGES: u32 = 10_000;

/// The test's guest: a [`SmolGuest`] whose steps fail the test after [`TIMEOUT`].
type Host<D, V> = SmolGuest<D, V>;

fn plug<D: Drv, V: Dev>(f: Fixture<D, V>, switch: &Arc<Switch>, ip: Ipv4Address) -> Host<D, V> {
    smol::plug(f, switch, ip, NetSettings::default()).unwrap()
}

/// What the tests do with a guest beyond [`SmolGuest`]'s own calls.
trait TestHost {
    /// [`SmolGuest::run`] that fails the test when the step does not finish.
    fn go(&mut self, what: &str, step: impl FnMut(&mut SocketSet<'static>) -> bool);
    /// Keeps the interface running (answering ARP and pings, acknowledging) until
    /// `stop` is set.
    fn serve(&mut self, stop: &AtomicBool);
    /// Asserts the clean-case invariants: no frame dropped on the switch, no
    /// driver error.
    fn assert_clean(&self, switch: &Switch);
}

impl<D: Drv, V: Dev> TestHost for Host<D, V> {
    fn go(&mut self, what: &str, step: impl FnMut(&mut SocketSet<'static>) -> bool) {
        if let Err(e) = self.run(what, TIMEOUT, step) {
            panic!("{e}");
        }
    }

    fn serve(&mut self, stop: &AtomicBool) {
        self.go("serving", |_| stop.load(Ordering::Acquire));
    }

    fn assert_clean(&self, switch: &Switch) {
        let st = switch.stats(self.port).unwrap();
        assert_eq!(st.drops.total(), 0, "{st:?}");
        assert!(self.phy.last_error().is_none(), "{:?}", self.phy.last_error());
        assert_eq!(self.phy.driver().broken(), None);
        let rx = self.phy.driver().rx_stats();
        assert_eq!(rx.bad_header + rx.oversized + rx.unused_buffers, 0, "{rx:?}");
    }
}

// ---- payload and checksum ----

/// A deterministic pseudo-random byte stream (xorshift64*), produced in any
/// chunking.
struct Stream {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Stream {
    fn new(seed: u64) -> Stream {
        Stream {
            state: seed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() {
            if self.used == 8 {
                // Whole words straight into the buffer while they fit.
                while buf.len() - i >= 8 {
                    buf[i..i + 8].copy_from_slice(&self.next_word());
                    i += 8;
                }
                if i == buf.len() {
                    break;
                }
                self.word = self.next_word();
                self.used = 0;
            }
            let n = (8 - self.used).min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&self.word[self.used..self.used + n]);
            self.used += n;
            i += n;
        }
    }
}

/// 64-bit FNV-1a over every byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[test]
fn the_stream_is_chunking_independent_and_the_hash_sees_every_byte() {
    let mut whole = vec![0; 1000];
    Stream::new(7).fill(&mut whole);
    let mut pieces = vec![0; 1000];
    let mut s = Stream::new(7);
    let mut at = 0;
    for n in (1..).cycle() {
        let end = (at + n % 13).min(1000);
        s.fill(&mut pieces[at..end]);
        at = end;
        if at == 1000 {
            break;
        }
    }
    assert!(whole == pieces);
    let hash = |b: &[u8]| {
        let mut h = Fnv::new();
        h.update(b);
        h
    };
    let mut flipped = whole.clone();
    flipped[999] ^= 1;
    assert_ne!(hash(&whole), hash(&flipped));
    assert_ne!(hash(&whole), hash(&whole[..999]));
}

// ---- the phases ----

/// ARP, then `n` echo requests from A to B, each answered with its payload.
fn ping<D1, V1, D2, V2>(a: &mut Host<D1, V1>, b: &mut Host<D2, V2>, switch: &Switch, n: u16)
where
    D1: Drv,
    V1: Dev,
    D2: Drv,
    V2: Dev,
{
    const IDENT: u16 = 0x7ab1;
    let flooded = switch.flooded_frames();
    let h = a.sockets.add(icmp::Socket::new(
        icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0; 1024]),
        icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0; 1024]),
    ));
    a.sockets
        .get_mut::<icmp::Socket>(h)
        .bind(icmp::Endpoint::Ident(IDENT))
        .unwrap();
    let stop = AtomicBool::new(false);
    both(
        || {
            let (mut seq, mut sent) = (0u16, false);
            let csum = smoltcp::phy::ChecksumCapabilities::default();
            a.go("ping", |sockets| {
                let s = sockets.get_mut::<icmp::Socket>(h);
                let payload = |seq: u16| seq.to_be_bytes().repeat(16);
                if let Ok((bytes, from)) = s.recv() {
                    assert_eq!(from, IpAddress::Ipv4(IP_B));
                    let pkt = Icmpv4Packet::new_checked(bytes).unwrap();
                    let repr = Icmpv4Repr::parse(&pkt, &csum).unwrap();
                    let expected = Icmpv4Repr::EchoReply {
                        ident: IDENT,
                        seq_no: seq,
                        data: &payload(seq),
                    };
                    assert_eq!(repr, expected);
                    seq += 1;
                    sent = false;
                }
                // The next request goes out with the poll that follows.
                if !sent && seq < n && s.can_send() {
                    let data = payload(seq);
                    let req = Icmpv4Repr::EchoRequest {
                        ident: IDENT,
                        seq_no: seq,
                        data: &data,
                    };
                    let buf = s.send(req.buffer_len(), IpAddress::Ipv4(IP_B)).unwrap();
                    req.emit(&mut Icmpv4Packet::new_unchecked(buf), &csum);
                    sent = true;
                }
                seq == n
            });
            stop.store(true, Ordering::Release);
        },
        || b.serve(&stop),
    );
    // The ARP request for B was a broadcast: flooded. Nothing else was.
    assert_eq!(switch.flooded_frames(), flooded + 1);
    a.sockets.remove(h);
}

/// `bytes` of the pseudo-random stream from A to B over TCP; both ends hash what
/// they handled.
fn bulk<D1, V1, D2, V2>(a: &mut Host<D1, V1>, b: &mut Host<D2, V2>, bytes: u64)
where
    D1: Drv,
    V1: Dev,
    D2: Drv,
    V2: Dev,
{
    let server = b.listen(BULK_PORT, TCP_BUF).unwrap();
    let client = a.connect(IP_B, BULK_PORT, TCP_BUF).unwrap();
    let ((sent, sent_hash), (got, got_hash)) = both(
        || {
            let (mut stream, mut hash, mut sent) = (Stream::new(0x5eed), Fnv::new(), 0u64);
            a.go("bulk send", |sockets| {
                let s = sockets.get_mut::<tcp::Socket>(client);
                while sent < bytes && s.can_send() {
                    let n = s
                        .send(|buf| {
                            let n = buf.len().min(usize::try_from(bytes - sent).unwrap_or(usize::MAX));
                            stream.fill(&mut buf[..n]);
                            hash.update(&buf[..n]);
                            (n, n)
                        })
                        .unwrap();
                    sent += n as u64;
                    if n == 0 {
                        break;
                    }
                }
                if sent == bytes && s.may_send() {
                    s.close();
                }
                matches!(s.state(), tcp::State::TimeWait | tcp::State::Closed)
            });
            (sent, hash)
        },
        || {
            let (mut hash, mut got) = (Fnv::new(), 0u64);
            b.go("bulk receive", |sockets| {
                let s = sockets.get_mut::<tcp::Socket>(server);
                while s.can_recv() {
                    got += s
                        .recv(|buf| {
                            hash.update(buf);
                            (buf.len(), buf.len() as u64)
                        })
                        .unwrap();
                }
                // The peer's FIN arrived and everything before it was read.
                if s.state() == tcp::State::CloseWait {
                    s.close();
                }
                s.state() == tcp::State::Closed
            });
            (got, hash)
        },
    );
    assert_eq!(sent, bytes);
    assert_eq!(got, bytes, "B received every byte");
    assert_eq!(got_hash, sent_hash, "B received the bytes A sent");
    a.sockets.remove(client);
    b.sockets.remove(server);
}

/// `n` exchanges of a small request from A and B's reply over one TCP connection.
fn exchanges<D1, V1, D2, V2>(a: &mut Host<D1, V1>, b: &mut Host<D2, V2>, n: u32)
where
    D1: Drv,
    V1: Dev,
    D2: Drv,
    V2: Dev,
{
    /// What B answers to request `x`.
    fn reply(x: u64) -> u64 {
        x.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17)
    }
    let server = b.listen(RPC_PORT, TCP_BUF).unwrap();
    let client = a.connect(IP_B, RPC_PORT, TCP_BUF).unwrap();
    let done = AtomicBool::new(false);
    let (answered, served) = both(
        || {
            let (mut i, mut waiting) = (0u32, false);
            let mut buf = Vec::with_capacity(8);
            a.go("requests", |sockets| {
                let s = sockets.get_mut::<tcp::Socket>(client);
                if waiting && s.can_recv() {
                    s.recv(|d| {
                        let k = d.len().min(8 - buf.len());
                        buf.extend_from_slice(&d[..k]);
                        (k, ())
                    })
                    .unwrap();
                    if buf.len() == 8 {
                        let got = u64::from_be_bytes(buf[..].try_into().unwrap());
                        assert_eq!(got, reply(u64::from(i) << 32 | 0xabcd), "reply {i}");
                        buf.clear();
                        waiting = false;
                        i += 1;
                    }
                }
                // The next request goes out in this round, with the poll that
                // follows.
                if !waiting && i < n && s.can_send() {
                    let req = (u64::from(i) << 32 | 0xabcd).to_be_bytes();
                    assert_eq!(s.send_slice(&req), Ok(8));
                    waiting = true;
                }
                i == n
            });
            done.store(true, Ordering::Release);
            i
        },
        || {
            let (mut req, mut served) = (Vec::with_capacity(8), 0u32);
            b.go("replies", |sockets| {
                let s = sockets.get_mut::<tcp::Socket>(server);
                while s.can_recv() {
                    s.recv(|d| {
                        let k = d.len().min(8 - req.len());
                        req.extend_from_slice(&d[..k]);
                        (k, ())
                    })
                    .unwrap();
                    if req.len() == 8 {
                        let x = u64::from_be_bytes(req[..].try_into().unwrap());
                        assert_eq!(s.send_slice(&reply(x).to_be_bytes()), Ok(8));
                        req.clear();
                        served += 1;
                    }
                }
                done.load(Ordering::Acquire)
            });
            served
        },
    );
    assert_eq!((answered, served), (n, n));
    a.sockets.get_mut::<tcp::Socket>(client).abort();
    a.sockets.remove(client);
    b.sockets.remove(server);
}

fn pair<D1, V1, D2, V2>(fa: Fixture<D1, V1>, fb: Fixture<D2, V2>)
where
    D1: Drv,
    V1: Dev,
    D2: Drv,
    V2: Dev,
{
    let switch = Switch::new(SwitchConfig::default());
    let mut a = plug(fa, &switch, IP_A);
    let mut b = plug(fb, &switch, IP_B);
    ping(&mut a, &mut b, &switch, 4);
    bulk(&mut a, &mut b, BULK_BYTES);
    exchanges(&mut a, &mut b, EXCHANGES);
    a.assert_clean(&switch);
    b.assert_clean(&switch);
}

#[test]
fn tcp_over_direct() {
    pair(models::direct(), models::direct());
}

#[test]
fn tcp_over_shared_page() {
    pair(models::shared_page(), models::shared_page());
}

#[test]
fn tcp_over_hypervisor_copy() {
    pair(models::hypervisor_copy(), models::hypervisor_copy());
}

#[test]
fn tcp_over_grant() {
    pair(models::grant(), models::grant());
}

#[test]
fn tcp_between_direct_and_grant() {
    pair(models::direct(), models::grant());
}
