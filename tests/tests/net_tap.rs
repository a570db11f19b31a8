//! The host's own network stack reaching a guest through a [`TapPort`]: one guest
//! (our driver over model 2, a [`NetDevice`]) and a TAP interface on one switch,
//! the interface in a network namespace of the test's own (10.9.0.1/24, up; the
//! guest is 10.9.0.2), so nothing of the machine's own networking is touched.
//!
//! - the host pings the guest (an ICMP "ping" socket in the namespace, as ping(8)
//!   uses, so the host's stack does ARP, IP and ICMP); the guest answers ARP and
//!   ICMP echo with a small responder on raw frames written here, no TCP/IP stack;
//! - the host opens a TCP connection to the guest, which runs smoltcp over
//!   [`NetPhy`] with an echo listener, and gets 4 MiB back byte for byte;
//! - counters: frames from the host counted on the switch, frames longer than the
//!   port's MTU dropped and counted, and a guest's partial checksum completed
//!   before the host's stack sees it.
//!
//! Each test needs `/dev/net/tun` and the right to create namespaces (root); it
//! says so (`SKIPPED <test>: <why>`, past the harness's capture) and returns only
//! when one of them is missing, and fails instead under CI
//! ([`virtio_core::test_utils::skip`]).

use backend_host::net::{NetDevice, NetSettings, Switch, SwitchConfig, TapConfig, TapPort};
use drivers_net::{NetDriver, NetOptions, NetPhy};
use hypervisor::Domain;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};
use transport_descriptors::direct::{DirectDevice, DirectDriver};
use vio::models;
use virtio_core::net::{csum_add, csum_fold, ipv4_pseudo_header_sum};
use virtio_core::test_utils::skip;
use virtio_core::transport::InProcessTransport;

const TIMEOUT: Duration = Duration::from_secs(10);
const HOST_IP: [u8; 4] = [10, 9, 0, 1];
const GUEST_IP: [u8; 4] = [10, 9, 0, 2];
/// The TAP interface's name inside its namespace (which is the test's own).
const IFACE: &str = "vtap0";

// ---- a namespace of the test's own ----

/// A network namespace, deleted (with everything in it) on drop, also when the
/// test fails.
struct Netns {
    name: String,
}

fn ip_command() -> Command {
    // Root's PATH has it; a plain user's may not.
    let sbin = Path::new("/usr/sbin/ip");
    Command::new(if sbin.exists() { sbin } else { Path::new("ip") })
}

fn check(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// A fresh namespace, or `None` (saying why) when this machine cannot run the
    /// test: no `/dev/net/tun`, or no right to create namespaces.
    fn create(test: &str) -> Option<Netns> {
        if !Path::new("/dev/net/tun").exists() {
            skip(test, "/dev/net/tun is missing");
            return None;
        }
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vio-tap-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let out = ip_command().args(["netns", "add", &name]).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) if !rustix::process::geteuid().is_root() => {
                skip(
                    test,
                    format_args!(
                        "cannot create a network namespace (not root): {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                );
                return None;
            }
            Ok(o) => check("ip netns add", &o),
            Err(e) => panic!("cannot run ip: {e}"),
        }
        let ns = Netns { name };
        ns.inside(|| {
            // No IPv6 (where the kernel has it): its router solicitations and
            // reports would add frames the counters would have to tolerate.
            for conf in ["all", "default"] {
                let knob = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
                if Path::new(&knob).exists() {
                    std::fs::write(&knob, "1").unwrap();
                }
            }
            // ICMP datagram sockets for every group, as distributions set it for
            // ping(8) (a new namespace allows none).
            std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647").unwrap();
        });
        Some(ns)
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> args...`; fails the test if it fails.
    fn ip(&self, args: &[&str]) {
        let out = ip_command().args(["-n", &self.name]).args(args).output().unwrap();
        check(&format!("ip {}", args.join(" ")), &out);
    }

    /// Runs a command in the namespace and returns what it did.
    fn try_exec(&self, cmd: &[&str]) -> Output {
        ip_command()
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .unwrap()
    }

    /// Runs a command in the namespace; fails the test if it fails.
    fn exec(&self, cmd: &[&str]) -> String {
        let out = self.try_exec(cmd);
        check(&cmd.join(" "), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread inside the namespace (its sockets live there).
    fn inside<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let ns = std::fs::File::open(self.path()).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
                move_into_link_name_space(rustix::fd::AsFd::as_fd(&ns), Some(LinkNameSpaceType::Network))
                    .unwrap();
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip_command().args(["netns", "del", &self.name]).output() {
            eprintln!("cannot delete namespace {}: {e}", self.name);
        }
    }
}

// ---- the guest, the switch and the TAP port ----

type Nic = NetDriver<DirectDriver, InProcessTransport<NetDevice<DirectDevice>>>;

/// Everything one test runs on. Fields drop in order: the port (its interface
/// goes), the guest, then the namespace.
struct Lab {
    tap: TapPort,
    nic: Nic,
    guest_mac: [u8; 6],
    guest_port: backend_host::net::PortId,
    switch: Arc<Switch>,
    _domain: Arc<Domain>,
    ns: Netns,
}

impl Lab {
    /// The guest and the TAP port on a new switch, the interface configured and up.
    fn new(test: &str) -> Option<Lab> {
        let ns = Netns::create(test)?;
        let switch = Switch::new(SwitchConfig::default());
        let f = models::direct();
        let dev = NetDevice::new(f.device, &switch, NetSettings::default()).unwrap();
        let (guest_port, guest_mac) = (dev.port(), dev.mac());
        let t = InProcessTransport::new(dev.lifecycle(), dev).unwrap();
        let nic = NetDriver::new(t, f.driver, f.guest.memory().clone(), NetOptions::default()).unwrap();
        let tap = TapPort::open_in_netns(IFACE, &ns.path(), &switch, TapConfig::default()).unwrap();
        assert_eq!(tap.name(), IFACE);
        ns.ip(&["addr", "add", "10.9.0.1/24", "dev", IFACE]);
        ns.ip(&["link", "set", IFACE, "up"]);
        Some(Lab {
            tap,
            nic,
            guest_mac,
            guest_port,
            switch,
            _domain: f.guest,
            ns,
        })
    }

    /// The TAP interface's MAC address, as the host's stack uses it.
    fn host_mac(&self) -> [u8; 6] {
        let s = self.ns.exec(&["cat", &format!("/sys/class/net/{IFACE}/address")]);
        let b: Vec<u8> = s
            .trim()
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        b.try_into().unwrap()
    }
}

/// Polls `cond` until it holds (fails after [`TIMEOUT`]); counters move on worker
/// threads.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---- (a) ping, answered by hand-written ARP and ICMP ----

/// The internet checksum (RFC 1071) of `data`, ready to store.
fn inet_csum(data: &[u8]) -> u16 {
    !csum_fold(csum_add(0, data))
}

/// The ARP reply to a request for [`GUEST_IP`] (RFC 826), if `f` is one.
fn arp_reply(f: &[u8], mac: [u8; 6]) -> Option<Vec<u8>> {
    let arp = f.get(14..42)?;
    let is_request =
        f[12..14] == [0x08, 0x06] && arp[0..8] == [0, 1, 0x08, 0x00, 6, 4, 0, 1] && arp[24..28] == GUEST_IP;
    if !is_request {
        return None;
    }
    let (sha, spa) = (&arp[8..14], &arp[14..18]);
    let mut r = Vec::with_capacity(42);
    r.extend_from_slice(sha);
    r.extend_from_slice(&mac);
    r.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    r.extend_from_slice(&mac);
    r.extend_from_slice(&GUEST_IP);
    r.extend_from_slice(sha);
    r.extend_from_slice(spa);
    Some(r)
}

/// The echo reply to an ICMP echo request for [`GUEST_IP`] (RFC 792), if `f` is a
/// valid one (both checksums right, not a fragment).
fn echo_reply(f: &[u8], mac: [u8; 6]) -> Option<Vec<u8>> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let valid = ip[0] >> 4 == 4
        && ihl >= 20
        && total >= ihl + 8
        && total <= ip.len()
        && inet_csum(&ip[..ihl]) == 0
        && u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff == 0
        && ip[9] == 1
        && ip[16..20] == GUEST_IP;
    if !valid {
        return None;
    }
    let icmp = &ip[ihl..total];
    if icmp[0] != 8 || icmp[1] != 0 || inet_csum(icmp) != 0 {
        return None;
    }
    let mut r = Vec::with_capacity(34 + icmp.len());
    r.extend_from_slice(&f[6..12]);
    r.extend_from_slice(&mac);
    r.extend_from_slice(&[0x08, 0x00]);
    let mut hdr = [0u8; 20];
    hdr[0] = 0x45;
    hdr[2..4].copy_from_slice(&u16::try_from(20 + icmp.len()).unwrap().to_be_bytes());
    hdr[4..6].copy_from_slice(&ip[4..6]);
    hdr[8] = 64;
    hdr[9] = 1;
    hdr[12..16].copy_from_slice(&GUEST_IP);
    hdr[16..20].copy_from_slice(&ip[12..16]);
    let sum = inet_csum(&hdr);
    hdr[10..12].copy_from_slice(&sum.to_be_bytes());
    r.extend_from_slice(&hdr);
    let at = r.len();
    r.extend_from_slice(icmp);
    r[at] = 0;
    r[at + 2..at + 4].fill(0);
    let sum = inet_csum(&r[at..]);
    r[at + 2..at + 4].copy_from_slice(&sum.to_be_bytes());
    Some(r)
}

/// What the responder answered.
#[derive(Debug, Default)]
struct Answered {
    arp: u32,
    echo: u32,
}

/// Answers ARP and echo requests for the guest until `stop` is set.
fn respond(nic: &Nic, mac: [u8; 6], stop: &AtomicBool) -> Answered {
    let mut n = Answered::default();
    let mut frames = Vec::new();
    while !stop.load(Ordering::Acquire) {
        nic.poll_recv(16, |f| frames.push(f.to_vec())).unwrap();
        for f in frames.drain(..) {
            if let Some(r) = arp_reply(&f, mac) {
                nic.send_blocking(&r, Some(TIMEOUT)).unwrap();
                n.arp += 1;
            } else if let Some(r) = echo_reply(&f, mac) {
                nic.send_blocking(&r, Some(TIMEOUT)).unwrap();
                n.echo += 1;
            }
        }
        nic.wait_rx(Some(Duration::from_millis(20))).unwrap();
    }
    n
}

/// The host's stack pings `to` `count` times as ping(8) does, through an ICMP
/// datagram ("ping") socket of the calling thread's namespace: the kernel
/// resolves the address (ARP), sends each echo request and delivers only echo
/// replies with a correct IP and ICMP checksum. Fails unless every reply comes
/// back within 2 s with the request's sequence number and payload.
fn host_ping(to: [u8; 4], count: u16) {
    use rustix::net::sockopt::{Timeout, set_socket_timeout};
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, ipproto, recv, sendto, socket};
    let fd = socket(AddressFamily::INET, SocketType::DGRAM, Some(ipproto::ICMP)).unwrap();
    set_socket_timeout(&fd, Timeout::Recv, Some(Duration::from_secs(2))).unwrap();
    let dst = SocketAddrV4::new(Ipv4Addr::from(to), 0);
    for seq in 1..=count {
        // Type 8 (echo request); the kernel sets the identifier and checksum.
        let mut req = vec![8, 0, 0, 0, 0, 0];
        req.extend_from_slice(&seq.to_be_bytes());
        req.extend((0..56u8).map(|i| i ^ seq.to_be_bytes()[1]));
        sendto(&fd, &req, SendFlags::empty(), &dst).unwrap();
        let mut buf = [0u8; 256];
        let (_, n) = recv(&fd, &mut buf, RecvFlags::empty())
            .unwrap_or_else(|e| panic!("echo request {seq} of {count}: no reply ({e})"));
        let reply = &buf[..n];
        assert_eq!(reply[0], 0, "echo reply type");
        assert_eq!(reply[6..8], seq.to_be_bytes(), "sequence number");
        assert_eq!(reply[8..], req[8..], "payload of echo {seq}");
    }
}

/// The host pings the guest through the TAP port: ARP resolves, three echo
/// requests get three replies with correct checksums.
#[test]
fn host_pings_guest() {
    let Some(lab) = Lab::new("host_pings_guest") else {
        return;
    };
    let stop = AtomicBool::new(false);
    let answered = std::thread::scope(|s| {
        let guest = s.spawn(|| respond(&lab.nic, lab.guest_mac, &stop));
        let pinged = std::panic::catch_unwind(|| lab.ns.inside(|| host_ping(GUEST_IP, 3)));
        stop.store(true, Ordering::Release);
        let answered = guest.join().unwrap();
        if let Err(e) = pinged {
            std::panic::resume_unwind(e);
        }
        answered
    });
    assert_eq!(answered.echo, 3, "{answered:?}");
    assert!(answered.arp >= 1, "{answered:?}");
    // The host's MAC was learnt on the TAP port; the guest's on its own.
    assert_eq!(lab.switch.lookup(lab.host_mac()), Some(lab.tap.port()));
    assert_eq!(lab.switch.lookup(lab.guest_mac), Some(lab.guest_port));
    let st = lab.tap.stats();
    // At least the ARP request and three echo requests came from the host, and
    // the ARP reply and three echo replies went to it.
    assert!(st.port.tx_frames >= 4 && st.port.rx_frames >= 4, "{st:?}");
    assert_eq!(st.port.drops.total(), 0, "{st:?}");
    assert_eq!(lab.switch.stats(lab.guest_port).unwrap().drops.total(), 0);
}

// ---- (b) TCP echo over smoltcp in the guest ----

/// A deterministic pseudo-random payload (xorshift64*).
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        v.extend_from_slice(&s.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Runs a smoltcp echo server (10.9.0.2, port `port`) over `nic` until `stop`.
/// Returns the bytes it echoed.
fn echo_server(nic: Nic, port: u16, stop: &AtomicBool) -> u64 {
    use smoltcp::iface::{Config, Interface, SocketSet};
    use smoltcp::socket::tcp;
    use smoltcp::time::Instant as SmolInstant;
    use smoltcp::wire::{IpAddress, IpCidr};

    let mut phy = NetPhy::new(nic);
    let mut iface = Interface::new(
        Config::new(phy.hardware_addr().unwrap()),
        &mut phy,
        SmolInstant::now(),
    );
    let [a, b, c, d] = GUEST_IP;
    iface.update_ip_addrs(|ips| ips.push(IpCidr::new(IpAddress::v4(a, b, c, d), 24)).unwrap());
    let mut sockets = SocketSet::new(Vec::new());
    let socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 256 << 10]),
        tcp::SocketBuffer::new(vec![0; 256 << 10]),
    );
    let h = sockets.add(socket);
    sockets.get_mut::<tcp::Socket>(h).listen(port).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut echoed = 0u64;
    while !stop.load(Ordering::Acquire) {
        iface.poll(SmolInstant::now(), &mut phy, &mut sockets);
        let s = sockets.get_mut::<tcp::Socket>(h);
        let room = s.send_capacity() - s.send_queue();
        if s.can_recv() && room > 0 {
            let take = room.min(buf.len());
            let n = s.recv_slice(&mut buf[..take]).unwrap();
            assert_eq!(s.send_slice(&buf[..n]).unwrap(), n);
            echoed += n as u64;
            continue;
        }
        // The host is done sending and everything went back: close our side.
        if !s.may_recv() && s.may_send() && s.send_queue() == 0 {
            s.close();
        }
        phy.wait(&mut iface, &sockets, Some(Duration::from_millis(10)))
            .unwrap();
    }
    echoed
}

/// The host's stack opens a TCP connection to smoltcp in the guest through the
/// TAP port, sends 4 MiB and reads them back, byte for byte, then sees the
/// guest close.
#[test]
fn host_tcp_echo_through_guest_smoltcp() {
    const LEN: usize = 4 << 20;
    const PORT: u16 = 7;
    let Some(lab) = Lab::new("host_tcp_echo_through_guest_smoltcp") else {
        return;
    };
    let Lab {
        tap,
        nic,
        ns,
        _domain,
        ..
    } = lab;
    let data = payload(LEN, 0x5eed);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let echoed = std::thread::scope(|s| {
        let guest = s.spawn(|| echo_server(nic, PORT, &stop));
        let back = ns.inside(|| {
            let to = SocketAddrV4::new(Ipv4Addr::from(GUEST_IP), PORT).into();
            let mut conn = TcpStream::connect_timeout(&to, TIMEOUT).unwrap();
            conn.set_read_timeout(Some(TIMEOUT)).unwrap();
            conn.set_write_timeout(Some(TIMEOUT)).unwrap();
            let mut tx = conn.try_clone().unwrap();
            std::thread::scope(|s| {
                s.spawn(|| {
                    tx.write_all(&data).unwrap();
                    tx.shutdown(std::net::Shutdown::Write).unwrap();
                });
                let mut back = vec![0u8; LEN];
                conn.read_exact(&mut back).unwrap();
                // The guest closes once it has echoed everything.
                let mut rest = [0u8; 16];
                assert_eq!(conn.read(&mut rest).unwrap(), 0, "bytes after the echo");
                back
            })
        });
        stop.store(true, Ordering::Release);
        if let Some(i) = (0..LEN).find(|&i| back[i] != data[i]) {
            panic!("byte {i} of {LEN} differs: {:#04x} != {:#04x}", back[i], data[i]);
        }
        guest.join().unwrap()
    });
    eprintln!("4 MiB echoed through the TAP port in {:?}", started.elapsed());
    assert_eq!(echoed, LEN as u64);
    let st = tap.stats();
    assert!(st.port.tx_frames > 0 && st.port.rx_frames > 0, "{st:?}");
    eprintln!("TAP port: {st:?}");
}

// ---- (c) counters, oversize frames, checksums ----

/// An Ethernet + IPv4 + UDP frame from the guest to the host, its UDP checksum
/// left partial (the pseudo-header sum, virtio 1.2 §5.1.6.2).
fn udp_to_host(dst: [u8; 6], src: [u8; 6], port: u16, data: &[u8]) -> Vec<u8> {
    let udp_len = u16::try_from(8 + data.len()).unwrap();
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&GUEST_IP);
    ip[16..20].copy_from_slice(&HOST_IP);
    let sum = inet_csum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4321u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&ipv4_pseudo_header_sum(GUEST_IP, HOST_IP, 17, udp_len).to_be_bytes());
    f.extend_from_slice(data);
    f
}

/// Frames from the host are counted on the TAP port and reach the guest; those
/// longer than the port's MTU are dropped and counted; a guest's datagram with a
/// partial checksum reaches a host socket (the port completed the checksum, or
/// the host's stack would have dropped it).
#[test]
fn counters_oversize_and_checksums() {
    const SMALL: usize = 5;
    const BIG: usize = 3;
    const GUEST_UDP: u16 = 9999;
    let Some(lab) = Lab::new("counters_oversize_and_checksums") else {
        return;
    };
    // The interface may send more than the port takes (1500); the guest's address
    // is known, so no ARP frame adds to the counts.
    lab.ns.ip(&["link", "set", IFACE, "mtu", "4000"]);
    let mac = lab.guest_mac.map(|b| format!("{b:02x}")).join(":");
    lab.ns.ip(&[
        "neigh",
        "replace",
        "10.9.0.2",
        "lladdr",
        &mac,
        "dev",
        IFACE,
        "nud",
        "permanent",
    ]);
    let base = lab.tap.stats().port;

    let host = lab.ns.inside(|| {
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::from(HOST_IP), 0)).unwrap();
        let to = SocketAddrV4::new(Ipv4Addr::from(GUEST_IP), GUEST_UDP);
        for i in 0..SMALL {
            // 100 bytes of payload: a 142-byte frame.
            sock.send_to(&[u8::try_from(i).unwrap(); 100], to).unwrap();
            if i < BIG {
                // 2000 bytes: one 2042-byte frame (interface MTU 4000), over 1514.
                sock.send_to(&[0xee; 2000], to).unwrap();
            }
        }
        sock
    });

    // Exactly the small datagrams reach the guest, in order and intact.
    let mut got = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while got.len() < SMALL {
        assert!(Instant::now() < deadline, "received {} of {SMALL}", got.len());
        lab.nic.poll_recv(16, |f| got.push(f.to_vec())).unwrap();
        lab.nic.wait_rx(Some(Duration::from_millis(20))).unwrap();
    }
    let host_mac = lab.host_mac();
    for (i, f) in got.iter().enumerate() {
        assert_eq!(f.len(), 14 + 20 + 8 + 100, "frame {i}");
        assert_eq!(f[..12], [lab.guest_mac, host_mac].concat());
        assert_eq!(f[30..34], GUEST_IP);
        assert_eq!(f[36..38], GUEST_UDP.to_be_bytes());
        assert!(
            f[42..].iter().all(|&b| usize::from(b) == i),
            "frame {i}: {:x?}",
            &f[42..50]
        );
    }
    // The port counts forwarded frames just after forwarding them: wait for both.
    eventually("oversize drops", || {
        let port = lab.tap.stats().port;
        port.drops.over_mtu - base.drops.over_mtu == BIG as u64
            && port.tx_frames - base.tx_frames == SMALL as u64
    });
    let st = lab.tap.stats();
    assert_eq!(st.port.tx_frames - base.tx_frames, SMALL as u64, "{st:?}");
    assert_eq!(st.port.drops.total() - base.drops.total(), BIG as u64, "{st:?}");
    // Nothing else came (the big ones were not forwarded).
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        lab.nic
            .poll_recv(16, |f| panic!("unexpected frame {:x?}", &f[..42]))
            .unwrap(),
        0
    );
    let guest = lab.switch.stats(lab.guest_port).unwrap();
    assert_eq!(guest.rx_frames, SMALL as u64, "{guest:?}");

    // The other way, with a checksum only the port can complete.
    let sock = host;
    let port = sock.local_addr().unwrap().port();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let msg = b"partial checksum, completed by the TAP port";
    let f = udp_to_host(host_mac, lab.guest_mac, port, msg);
    lab.nic.send_partial_csum(&f, 34, 6).unwrap();
    let mut buf = [0u8; 128];
    let (n, from) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], msg);
    assert_eq!(from, SocketAddrV4::new(Ipv4Addr::from(GUEST_IP), 4321).into());
    eventually("the frame to the host counted", || {
        lab.tap.stats().port.rx_frames >= 1
    });
    let st = lab.tap.stats();
    assert_eq!(st.port.rx_frames, 1, "{st:?}");
    assert_eq!((st.queue_full, st.write_errors), (0, 0));
}

/// Bad settings are refused with a typed error before anything is created.
#[test]
fn bad_names_are_refused() {
    let switch = Switch::new(SwitchConfig::default());
    for name in ["", "much-too-long-name", "a/b"] {
        let err = TapPort::open(name, &switch, TapConfig::default()).unwrap_err();
        assert!(
            matches!(err, backend_host::net::TapError::BadName(_)),
            "{name:?}: {err}"
        );
    }
}

/// A name with `%d` is numbered by the kernel; the interface lives only as long
/// as its port; a namespace that cannot be entered is a typed error.
#[test]
fn interfaces_are_named_by_the_kernel_and_go_with_the_port() {
    let Some(ns) = Netns::create("interfaces_are_named_by_the_kernel_and_go_with_the_port") else {
        return;
    };
    let switch = Switch::new(SwitchConfig::default());
    let open = || TapPort::open_in_netns("vio%d", &ns.path(), &switch, TapConfig::default()).unwrap();
    let (a, b) = (open(), open());
    assert_eq!((a.name(), b.name()), ("vio0", "vio1"));
    assert_ne!(a.port(), b.port());
    ns.ip(&["link", "show", "vio0"]);
    drop(a);
    let gone = ip_command()
        .args(["-n", &ns.name, "link", "show", "vio0"])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "vio0 outlived its port");
    assert!(switch.stats(b.port()).is_some());

    let err = TapPort::open_in_netns(
        "vio%d",
        Path::new("/nonexistent/netns"),
        &switch,
        TapConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(err, backend_host::net::TapError::Netns { .. }), "{err}");
}

/// The interface deleted under a running port: the port stops serving it, frames
/// for it are dropped and counted, the guest is unaffected, and dropping the port
/// returns.
#[test]
fn a_deleted_interface_stops_the_port_cleanly() {
    let Some(lab) = Lab::new("a_deleted_interface_stops_the_port_cleanly") else {
        return;
    };
    lab.ns.ip(&["link", "del", IFACE]);
    let broadcast = [[0xff; 6].as_slice(), &lab.guest_mac, &[0x88, 0xb5], &[0; 46]].concat();
    eventually("a frame for the deleted interface dropped", || {
        lab.nic.send_blocking(&broadcast, Some(TIMEOUT)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        lab.tap.stats().port.drops.no_rx_buffer > 0
    });
    assert_eq!(lab.tap.stats().port.rx_frames, 0);
    assert_eq!(lab.nic.broken(), None);
    let started = Instant::now();
    drop(lab);
    assert!(started.elapsed() < TIMEOUT);
}
