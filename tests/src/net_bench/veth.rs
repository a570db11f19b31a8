//! The peer: UDP over a veth pair between two network namespaces made for the run.

use super::{Counted, MMSG_BATCH, NetBenchConfig, STOP_CHECK, Stream, Tid, UDP_OVERHEAD, window};
use std::io::{Read, Seek};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
/// Why the veth peer could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum VethError {
    /// Namespaces and links need CAP_NET_ADMIN.
    #[error("needs root (CAP_NET_ADMIN)")]
    NotRoot,
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {stderr}")]
    Ip {
        /// The arguments.
        args: String,
        /// What it printed.
        stderr: String,
    },
    /// A system call failed.
    #[error("{op}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> VethError {
    move |source| VethError::Io { op, source }
}

/// Two network namespaces joined by a veth pair with an IPv4 address on each end;
/// both namespaces (and with them the link) are deleted on drop.
#[derive(Debug)]
pub struct VethPair {
    /// Namespace names, sender side first.
    ns: [String; 2],
    /// Addresses, sender side first.
    addrs: [Ipv4Addr; 2],
}

/// The UDP port the peer's receiver listens on.
const VETH_PORT: u16 = 9000;

fn ip(args: &[&str]) -> Result<(), VethError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(io_err("running ip(8)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(VethError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl VethPair {
    /// Creates the namespaces `vio-nb-<pid>-{a,b}`, the link between them (MTU 65535,
    /// up) and addresses 10.213.0.1/24 and 10.213.0.2/24. What was created is
    /// removed again if a later step fails.
    ///
    /// # Errors
    /// Not root; an `ip` command failed.
    pub fn create() -> Result<VethPair, VethError> {
        if !rustix::process::geteuid().is_root() {
            return Err(VethError::NotRoot);
        }
        let pid = std::process::id();
        let ns = [format!("vio-nb-{pid}-a"), format!("vio-nb-{pid}-b")];
        let pair = VethPair {
            ns,
            addrs: [Ipv4Addr::new(10, 213, 0, 1), Ipv4Addr::new(10, 213, 0, 2)],
        };
        // From here on, dropping `pair` removes whatever exists.
        let links = [format!("vnb{pid}a"), format!("vnb{pid}b")];
        for n in &pair.ns {
            ip(&["netns", "add", n])?;
        }
        ip(&[
            "link",
            "add",
            &links[0],
            "netns",
            &pair.ns[0],
            "type",
            "veth",
            "peer",
            "name",
            &links[1],
            "netns",
            &pair.ns[1],
        ])?;
        for ((ns, link), addr) in pair.ns.iter().zip(&links).zip(pair.addrs) {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", link])?;
            ip(&["-n", ns, "link", "set", link, "mtu", "65535", "up"])?;
        }
        Ok(pair)
    }

    /// Moves the calling thread into namespace `i` (setns(2)); sockets it creates
    /// afterwards live there.
    fn enter(&self, i: usize) -> Result<(), VethError> {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.ns[i]))
            .map_err(io_err("opening a netns"))?;
        rustix::thread::move_into_link_name_space(f.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
            .map_err(|e| VethError::Io {
                op: "setns",
                source: e.into(),
            })
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for n in &self.ns {
            if std::path::Path::new("/var/run/netns").join(n).exists()
                && let Err(error) = ip(&["netns", "del", n])
            {
                tracing::warn!(%error, "removing a benchmark namespace failed");
            }
        }
    }
}

/// UDP receive errors (`InErrors`, which include `RcvbufErrors`) from a
/// `/proc/<tid>/net/snmp` file opened inside the receiver's namespace (a proc net
/// file keeps the namespace it was opened in).
fn udp_in_errors(snmp: &mut std::fs::File) -> Option<u64> {
    let mut text = String::new();
    snmp.rewind().ok()?;
    snmp.read_to_string(&mut text).ok()?;
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == "InErrors")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Socket buffer size of the peer's sockets: a queue of the same order as ours
/// (256 receive buffers plus a 256-frame backlog).
pub(super) const VETH_SOCKBUF: usize = 4 << 20;

/// One run of the peer: `len`-byte frames as UDP datagrams over the veth pair.
pub fn stream_veth(pair: &VethPair, len: usize, cfg: &NetBenchConfig) -> Result<Stream, VethError> {
    let payload = len.saturating_sub(UDP_OVERHEAD);
    let to = SocketAddrV4::new(pair.addrs[1], VETH_PORT);
    let stop = AtomicBool::new(false);
    let counted = Counted::default();
    let (send_tid, recv_tid) = (Tid::default(), Tid::default());
    // The threads borrow these; the receiver's closure moves only the sender half
    // of its channel.
    let (stop, counted, send_tid, recv_tid) = (&stop, &counted, &send_tid, &recv_tid);
    std::thread::scope(|s| {
        let (ready_tx, ready) = mpsc::channel();
        let receiver = s.spawn(move || {
            recv_tid.set();
            let setup = || {
                pair.enter(1)?;
                let snmp =
                    std::fs::File::open("/proc/thread-self/net/snmp").map_err(io_err("opening snmp"))?;
                let sock = UdpSocket::bind(to).map_err(io_err("binding the receiver"))?;
                sock.set_read_timeout(Some(STOP_CHECK))
                    .map_err(io_err("SO_RCVTIMEO"))?;
                rustix::net::sockopt::set_socket_recv_buffer_size_force(&sock, VETH_SOCKBUF).map_err(
                    |e| VethError::Io {
                        op: "SO_RCVBUFFORCE",
                        source: e.into(),
                    },
                )?;
                Ok((sock, snmp))
            };
            let sock = match setup() {
                Ok((sock, snmp)) => {
                    let _ = ready_tx.send(Ok(snmp));
                    sock
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            let mut batch = sys::RecvBatch::new(MMSG_BATCH, payload.max(1));
            while !stop.load(Ordering::Relaxed) {
                match batch.recv(&sock) {
                    Ok(lens) => {
                        let whole = lens.iter().filter(|&&l| l == payload).count() as u64;
                        counted.add(whole, whole * len as u64);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(source) => {
                        return Err(VethError::Io {
                            op: "recvmmsg",
                            source,
                        });
                    }
                }
            }
            Ok(())
        });
        let mut snmp = match ready.recv() {
            Ok(Ok(snmp)) => snmp,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return receiver
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
                    .map(|()| Stream::default());
            }
        };
        let sender = s.spawn(|| {
            send_tid.set();
            pair.enter(0)?;
            let sock =
                UdpSocket::bind(SocketAddrV4::new(pair.addrs[0], 0)).map_err(io_err("binding the sender"))?;
            sock.connect(to).map_err(io_err("connecting the sender"))?;
            sock.set_write_timeout(Some(STOP_CHECK))
                .map_err(io_err("SO_SNDTIMEO"))?;
            rustix::net::sockopt::set_socket_send_buffer_size_force(&sock, VETH_SOCKBUF).map_err(|e| {
                VethError::Io {
                    op: "SO_SNDBUFFORCE",
                    source: e.into(),
                }
            })?;
            let data = vec![0x5au8; payload];
            let iov = [std::io::IoSlice::new(&data)];
            let mut controls: Vec<_> = (0..MMSG_BATCH)
                .map(|_| rustix::net::SendAncillaryBuffer::default())
                .collect();
            let mut msgs: Vec<_> = controls
                .iter_mut()
                .map(|c| rustix::net::MMsgHdr::new(&iov, c))
                .collect();
            while !stop.load(Ordering::Relaxed) {
                match rustix::net::sendmmsg(&sock, &mut msgs, rustix::net::SendFlags::empty()) {
                    // Timed out on a full send buffer; refused: an ICMP error from a
                    // moment without receiver, reported once.
                    Ok(_)
                    | Err(
                        rustix::io::Errno::AGAIN | rustix::io::Errno::INTR | rustix::io::Errno::CONNREFUSED,
                    ) => {}
                    Err(e) => {
                        return Err(VethError::Io {
                            op: "sendmmsg",
                            source: e.into(),
                        });
                    }
                }
            }
            Ok(())
        });
        while send_tid.get().is_none() || recv_tid.get().is_none() {
            std::thread::yield_now();
        }
        let threads = [("send", send_tid.get()), ("recv", recv_tid.get())];
        let errors0 = udp_in_errors(&mut snmp);
        let stream = window(cfg, &threads, || {
            let (f, b) = counted.get();
            let errors = udp_in_errors(&mut snmp).zip(errors0).map_or(0, |(e, e0)| e - e0);
            (f, b, errors)
        });
        stop.store(true, Ordering::Relaxed);
        let joined = [sender.join(), receiver.join()];
        for r in joined {
            r.unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        }
        Ok(stream)
    })
}

/// The one unsafe call: `recvmmsg(2)`, which rustix does not wrap.
mod sys {
    use std::os::fd::{AsFd, AsRawFd};

    /// `n` receive buffers of `len` bytes and the message headers describing them,
    /// built once and reused by every call.
    pub(super) struct RecvBatch {
        /// The buffers, back to back, owned here for the pointers in `iovs`; never
        /// resized, so those stay valid.
        _bufs: Vec<u8>,
        iovs: Vec<libc::iovec>,
        hdrs: Vec<libc::mmsghdr>,
        lens: Vec<usize>,
    }

    impl RecvBatch {
        pub(super) fn new(n: usize, len: usize) -> RecvBatch {
            let mut bufs = vec![0u8; n * len];
            let iovs: Vec<libc::iovec> = bufs
                .chunks_mut(len)
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            let mut batch = RecvBatch {
                _bufs: bufs,
                iovs,
                hdrs: Vec::with_capacity(n),
                lens: Vec::with_capacity(n),
            };
            for iov in &mut batch.iovs {
                // SAFETY: `mmsghdr` is a plain C struct of integers and pointers, for
                // which all zeroes (null pointers, zero lengths) is a valid value.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                batch.hdrs.push(h);
            }
            batch
        }

        /// Receives up to `n` datagrams: waits (up to the socket's receive timeout)
        /// for the first, then takes what is queued (MSG_WAITFORONE). Returns each
        /// datagram's length.
        pub(super) fn recv(&mut self, sock: &impl AsFd) -> std::io::Result<&[usize]> {
            let n = u32::try_from(self.hdrs.len()).unwrap_or(u32::MAX);
            // SAFETY: `hdrs` holds `n` initialized headers, each pointing at one
            // iovec of `iovs`, which points at a distinct `len`-byte range of `bufs`.
            // All three live in `self`, borrowed mutably for the call, and are never
            // resized, so the kernel writes only memory we own and nobody else
            // reads meanwhile. A null timeout means none.
            let got = unsafe {
                libc::recvmmsg(
                    sock.as_fd().as_raw_fd(),
                    self.hdrs.as_mut_ptr(),
                    n,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if got < 0 {
                return Err(std::io::Error::last_os_error());
            }
            self.lens.clear();
            // `got` lies in 0..=n.
            let got = usize::try_from(got).unwrap_or(0);
            self.lens.extend(self.hdrs[..got].iter().map(|h| {
                if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                    usize::MAX
                } else {
                    h.msg_len as usize
                }
            }));
            Ok(&self.lens)
        }
    }
}
