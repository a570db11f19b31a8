//! The front-end's end of the vhost-user socket: one request at a time, each reply
//! read under a deadline and checked before its body is used.
//!
//! Nothing here waits without a limit: sends and reads both stop at the channel's
//! timeout with [`VhostUserError::TimedOut`], a closed socket is
//! [`VhostUserError::Disconnected`], and a reply body's size is bounded by
//! [`MAX_REPLY_BODY`] before anything is allocated from it.
//!
//! # Why not rust-vmm's front-end
//! The messages themselves are the `vhost` crate's (see [`crate::protocol`]), but its
//! front-end (`vhost` 0.18.0, feature `vhost-user-frontend`: `vhost_user::Frontend`,
//! the `VhostBackend` and `VhostUserFrontend` traits) cannot carry them for a
//! front-end that must survive a hostile back-end (docs/HOSTILE.md: never hang, bad input
//! is a typed error):
//!
//! - No request is bounded in time. Its socket layer (`connection.rs`,
//!   `Endpoint::send_iovec_all` and `Endpoint::recv_into_iovec_all`) retries
//!   `Error::SocketRetry` without end, and `From<vmm_sys_util::errno::Error>`
//!   (`vhost_user/mod.rs`) turns EAGAIN into `SocketRetry`: with `SO_RCVTIMEO` set on
//!   the stream given to `Frontend::from_stream`, a silent back-end still holds
//!   `get_features()` forever; there is no deadline argument.
//! - Replies are read by the size the front-end expects, not the size the header
//!   declares (`Endpoint::recv_body`, then `FrontendInternal::recv_reply`, which checks
//!   the code and flags but not `size`). A GET_FEATURES reply whose header says 0 bytes,
//!   followed by 8 more bytes, is accepted as a value; a reply shorter than expected
//!   waits for bytes that never come, and so does the empty GET_CONFIG reply with
//!   which libvhost-user (so qemu-storage-daemon) says it failed, which this channel
//!   reports as [`VhostUserError::Refused`] at once.
//! - `VhostBackend::get_vring_base` returns the reply's `num` without checking that
//!   its `index` names the ring asked about; a reset must know that ring stopped.
//! - Between requests nothing looks at the socket, so a hang-up or an unsolicited
//!   message is found only by the next request ([`Channel::probe`] finds it at the
//!   next status read).
//!
//! Each case was run against `vhost` 0.18.0 over a socket pair (`SO_RCVTIMEO` 200 ms):
//! the silent back-end, the short reply and the empty GET_CONFIG reply gave no answer
//! within 3 s; the size-0 reply gave `Ok(7)`; GET_VRING_BASE(0) answered for ring 1
//! gave `Ok`. `tests/hostile_back_end.rs` holds this channel to the refusals.

use crate::error::VhostUserError;
use crate::protocol::{FrontendReq, Header, MAX_REPLY_BODY, VERSION, VhostUserHeaderFlag, has_reply};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use zerocopy::{FromBytes, IntoBytes};

/// Most file descriptors one message carries (the protocol's limit for
/// SET_MEM_TABLE; every other request carries at most one).
const MAX_FDS: usize = 8;

/// A connected vhost-user socket.
#[derive(Debug)]
pub(crate) struct Channel {
    sock: UnixStream,
    timeout: Duration,
    /// REPLY_ACK was negotiated: requests without a reply ask for an ack.
    reply_ack: bool,
    /// Descriptors that came with the reply being read (GET_INFLIGHT_FD's
    /// buffer); any a reply did not ask for are closed with it.
    received: Vec<OwnedFd>,
}

impl Channel {
    /// Connects to the back-end listening at `path`; every later request must
    /// complete within `timeout`.
    pub(crate) fn connect(path: &Path, timeout: Duration) -> Result<Self, VhostUserError> {
        let sock = UnixStream::connect(path).map_err(|source| VhostUserError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        // Sends are small and finish at once unless the back-end stopped reading;
        // the kernel's timeout bounds each one, the deadline below the sum.
        sock.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(VhostUserError::Socket)?;
        Ok(Channel {
            sock,
            timeout,
            reply_ack: false,
            received: Vec::new(),
        })
    }

    /// From now on, requests without a reply of their own ask for a REPLY_ACK, so
    /// their failures come back to the caller instead of being lost.
    pub(crate) fn set_reply_ack(&mut self, on: bool) {
        self.reply_ack = on;
    }

    /// Sends `request` (one without a reply of its own) with `body` and `fds`, and
    /// waits for its acknowledgement if REPLY_ACK was negotiated.
    pub(crate) fn send(
        &mut self,
        request: FrontendReq,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), VhostUserError> {
        debug_assert!(!has_reply(request));
        let deadline = self.deadline();
        let flags = if self.reply_ack {
            VhostUserHeaderFlag::NEED_REPLY.bits()
        } else {
            0
        };
        self.write(request, flags, body, fds, deadline)?;
        if !self.reply_ack {
            return Ok(());
        }
        let code = self.read_u64(request, deadline)?;
        if code != 0 {
            return Err(VhostUserError::Refused { request, code });
        }
        Ok(())
    }

    /// Sends `request` (one with a reply) with `body` and returns the reply body,
    /// at most [`MAX_REPLY_BODY`] bytes.
    pub(crate) fn call(&mut self, request: FrontendReq, body: &[u8]) -> Result<Vec<u8>, VhostUserError> {
        debug_assert!(has_reply(request));
        let deadline = self.deadline();
        self.write(request, 0, body, &[], deadline)?;
        self.read_reply(request, deadline)
    }

    /// [`Self::call`] for a request whose reply carries one file descriptor
    /// (GET_INFLIGHT_FD): a reply without one is refused.
    pub(crate) fn call_with_fd(
        &mut self,
        request: FrontendReq,
        body: &[u8],
    ) -> Result<(Vec<u8>, OwnedFd), VhostUserError> {
        let reply = self.call(request, body)?;
        let mut fds = std::mem::take(&mut self.received).into_iter();
        let fd = fds.next().ok_or(VhostUserError::BadReply {
            request,
            reason: "no file descriptor with the reply",
        })?;
        if fds.next().is_some() {
            return Err(VhostUserError::BadReply {
                request,
                reason: "more than one file descriptor with the reply",
            });
        }
        Ok((reply, fd))
    }

    /// [`Self::call`] for the requests whose reply is one u64.
    pub(crate) fn call_u64(&mut self, request: FrontendReq) -> Result<u64, VhostUserError> {
        let deadline = self.deadline();
        self.write(request, 0, &[], &[], deadline)?;
        self.read_u64(request, deadline)
    }

    /// Checks, without waiting, that the back-end is still connected and quiet.
    /// Between requests it has nothing to say: readable means it hung up (or broke
    /// the protocol).
    pub(crate) fn probe(&self) -> Result<(), VhostUserError> {
        let mut fds = [PollFd::new(&self.sock, PollFlags::IN | PollFlags::RDHUP)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match poll(&mut fds, Some(&zero)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => Ok(()),
            Ok(_) => {
                let hung_up = PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR;
                if fds[0].revents().intersects(hung_up) {
                    return Err(VhostUserError::Disconnected { request: None });
                }
                let mut byte = [0u8; 1];
                match rustix::net::recv(&self.sock, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
                    Ok((_, 0)) => Err(VhostUserError::Disconnected { request: None }),
                    Ok(_) => Err(VhostUserError::Unsolicited),
                    Err(_) => Ok(()),
                }
            }
            Err(e) => Err(VhostUserError::Socket(e.into())),
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    fn timed_out(&self, request: FrontendReq) -> VhostUserError {
        VhostUserError::TimedOut {
            request,
            timeout: self.timeout,
        }
    }

    /// Writes one message; the descriptors ride on its first byte.
    fn write(
        &mut self,
        request: FrontendReq,
        flags: u32,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
        deadline: Instant,
    ) -> Result<(), VhostUserError> {
        let size = u32::try_from(body.len()).map_err(|_| VhostUserError::Send {
            request,
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        if fds.len() > MAX_FDS {
            return Err(VhostUserError::Send {
                request,
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        }
        let header = Header {
            request: request.into(),
            flags: VERSION | flags,
            size,
        };
        let mut msg = Vec::with_capacity(Header::SIZE + body.len());
        msg.extend_from_slice(header.as_bytes());
        msg.extend_from_slice(body);

        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut sent = 0;
        let mut first = true;
        while sent < msg.len() {
            let mut control = SendAncillaryBuffer::new(&mut space);
            if first && !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(VhostUserError::Send {
                    request,
                    source: io::Error::from(io::ErrorKind::InvalidInput),
                });
            }
            let iov = [IoSlice::new(&msg[sent..])];
            // NOSIGNAL: a back-end that went away is an EPIPE error, not a SIGPIPE
            // that kills a process which did not ignore it.
            match rustix::net::sendmsg(&self.sock, &iov, &mut control, SendFlags::NOSIGNAL) {
                Ok(0) => {
                    return Err(VhostUserError::Disconnected {
                        request: Some(request),
                    });
                }
                Ok(n) => {
                    sent += n;
                    first = false;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {}
                Err(rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET) => {
                    return Err(VhostUserError::Disconnected {
                        request: Some(request),
                    });
                }
                Err(e) => {
                    return Err(VhostUserError::Send {
                        request,
                        source: e.into(),
                    });
                }
            }
            if sent < msg.len() && Instant::now() >= deadline {
                return Err(self.timed_out(request));
            }
        }
        Ok(())
    }

    /// Reads a reply to `request` and returns its body.
    fn read_reply(&mut self, request: FrontendReq, deadline: Instant) -> Result<Vec<u8>, VhostUserError> {
        // Descriptors of an earlier reply that nobody took are closed here.
        self.received.clear();
        let mut raw = [0u8; Header::SIZE];
        self.read_exact(request, &mut raw, deadline)?;
        let header = Header::read_from_bytes(&raw).unwrap_or_default();
        let bad = |reason| VhostUserError::BadReply { request, reason };
        if header.request != u32::from(request) {
            return Err(bad("it answers another request"));
        }
        if header.flags & VhostUserHeaderFlag::VERSION.bits() != VERSION {
            return Err(bad("unknown protocol version"));
        }
        if header.flags & VhostUserHeaderFlag::REPLY.bits() == 0 {
            return Err(bad("reply flag not set"));
        }
        let size = usize::try_from(header.size).unwrap_or(usize::MAX);
        if size > MAX_REPLY_BODY {
            return Err(bad("body too large"));
        }
        let mut body = vec![0u8; size];
        self.read_exact(request, &mut body, deadline)?;
        Ok(body)
    }

    fn read_u64(&mut self, request: FrontendReq, deadline: Instant) -> Result<u64, VhostUserError> {
        let body = self.read_reply(request, deadline)?;
        let bytes: [u8; 8] = body.as_slice().try_into().map_err(|_| VhostUserError::BadReply {
            request,
            reason: "body is not one u64",
        })?;
        Ok(u64::from_ne_bytes(bytes))
    }

    /// Fills `buf` from the socket, polling with what is left of the deadline
    /// before every read so a silent back-end cannot hold the caller.
    fn read_exact(
        &mut self,
        request: FrontendReq,
        buf: &mut [u8],
        deadline: Instant,
    ) -> Result<(), VhostUserError> {
        let mut got = 0;
        while got < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timed_out(request));
            }
            let limit = Timespec::try_from(left).unwrap_or(Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            });
            let mut fds = [PollFd::new(&self.sock, PollFlags::IN)];
            match poll(&mut fds, Some(&limit)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => {}
                Err(e) => {
                    return Err(VhostUserError::Recv {
                        request,
                        source: e.into(),
                    });
                }
            }
            // recvmsg, not read: a reply may carry descriptors (closed on exec,
            // and closed with `received` unless the caller takes them).
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [IoSliceMut::new(&mut buf[got..])];
            match rustix::net::recvmsg(&self.sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
                Ok(r) if r.bytes == 0 => {
                    return Err(VhostUserError::Disconnected {
                        request: Some(request),
                    });
                }
                Ok(r) => got += r.bytes,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                Err(rustix::io::Errno::CONNRESET) => {
                    return Err(VhostUserError::Disconnected {
                        request: Some(request),
                    });
                }
                Err(e) => {
                    return Err(VhostUserError::Recv {
                        request,
                        source: e.into(),
                    });
                }
            }
            for m in control.drain() {
                if let RecvAncillaryMessage::ScmRights(fds) = m {
                    self.received.extend(fds);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    const FLAG_REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();
    const FLAG_NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();

    fn pair(timeout: Duration) -> (Channel, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_write_timeout(Some(timeout)).unwrap();
        (
            Channel {
                sock: a,
                timeout,
                reply_ack: false,
                received: Vec::new(),
            },
            b,
        )
    }

    fn reply(peer: &mut UnixStream, request: FrontendReq, flags: u32, body: &[u8]) {
        let h = Header {
            request: request.into(),
            flags,
            size: u32::try_from(body.len()).unwrap(),
        };
        peer.write_all(h.as_bytes()).unwrap();
        peer.write_all(body).unwrap();
    }

    #[test]
    fn a_silent_back_end_times_out() {
        let (mut ch, _peer) = pair(Duration::from_millis(50));
        let t = Instant::now();
        assert!(matches!(
            ch.call_u64(FrontendReq::GET_FEATURES),
            Err(VhostUserError::TimedOut {
                request: FrontendReq::GET_FEATURES,
                ..
            })
        ));
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_closed_socket_is_disconnected() {
        let (mut ch, peer) = pair(Duration::from_secs(5));
        drop(peer);
        assert!(matches!(
            ch.call_u64(FrontendReq::GET_FEATURES),
            Err(VhostUserError::Disconnected { .. })
        ));
        assert!(matches!(
            ch.probe(),
            Err(VhostUserError::Disconnected { request: None })
        ));
    }

    #[test]
    fn replies_are_checked() {
        let (mut ch, mut peer) = pair(Duration::from_secs(5));
        reply(
            &mut peer,
            FrontendReq::GET_FEATURES,
            VERSION | FLAG_REPLY,
            &7u64.to_ne_bytes(),
        );
        assert_eq!(ch.call_u64(FrontendReq::GET_FEATURES).unwrap(), 7);
        for (code, flags, body, what) in [
            (
                FrontendReq::GET_QUEUE_NUM,
                VERSION | FLAG_REPLY,
                &[0u8; 8][..],
                "another request",
            ),
            (FrontendReq::GET_FEATURES, VERSION, &[0u8; 8][..], "reply flag"),
            (
                FrontendReq::GET_FEATURES,
                2 | FLAG_REPLY,
                &[0u8; 8][..],
                "version",
            ),
            (
                FrontendReq::GET_FEATURES,
                VERSION | FLAG_REPLY,
                &[0u8; 4][..],
                "u64",
            ),
        ] {
            // A bad reply leaves the stream unusable: a fresh socket for each.
            let (mut ch, mut peer) = pair(Duration::from_secs(5));
            reply(&mut peer, code, flags, body);
            match ch.call_u64(FrontendReq::GET_FEATURES) {
                Err(VhostUserError::BadReply { reason, .. }) => assert!(reason.contains(what), "{reason}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        // A huge size is refused before any allocation.
        let h = Header {
            request: FrontendReq::GET_CONFIG.into(),
            flags: VERSION | FLAG_REPLY,
            size: u32::MAX,
        };
        peer.write_all(h.as_bytes()).unwrap();
        assert!(matches!(
            ch.call(FrontendReq::GET_CONFIG, &[]),
            Err(VhostUserError::BadReply {
                reason: "body too large",
                ..
            })
        ));
    }

    #[test]
    fn acks_are_awaited_and_failures_reported() {
        let (mut ch, mut peer) = pair(Duration::from_secs(5));
        ch.set_reply_ack(true);
        reply(
            &mut peer,
            FrontendReq::SET_OWNER,
            VERSION | FLAG_REPLY,
            &0u64.to_ne_bytes(),
        );
        ch.send(FrontendReq::SET_OWNER, &[], &[]).unwrap();
        reply(
            &mut peer,
            FrontendReq::SET_OWNER,
            VERSION | FLAG_REPLY,
            &1u64.to_ne_bytes(),
        );
        assert!(matches!(
            ch.send(FrontendReq::SET_OWNER, &[], &[]),
            Err(VhostUserError::Refused { code: 1, .. })
        ));
        let mut sent = [0u8; 2 * Header::SIZE];
        peer.read_exact(&mut sent).unwrap();
        let h = Header::read_from_bytes(&sent[..Header::SIZE]).unwrap();
        assert_eq!(h.flags, VERSION | FLAG_NEED_REPLY);
    }

    /// GET_INFLIGHT_FD's reply must carry the buffer's descriptor: one, not none
    /// and not two.
    #[test]
    fn a_reply_carries_exactly_the_descriptor_it_should() {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        use std::os::fd::AsFd;
        let send = |peer: &UnixStream, fds: usize| {
            let h = Header {
                request: FrontendReq::GET_INFLIGHT_FD.into(),
                flags: VERSION | FLAG_REPLY,
                size: 8,
            };
            let mut msg = h.as_bytes().to_vec();
            msg.extend_from_slice(&7u64.to_ne_bytes());
            let efds: Vec<_> = (0..fds)
                .map(|_| virtio_core::notify::EventFdNotifier::new().unwrap())
                .collect();
            let borrowed: Vec<_> = efds.iter().map(|e| e.as_fd()).collect();
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !borrowed.is_empty() {
                assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
            }
            rustix::net::sendmsg(peer, &[IoSlice::new(&msg)], &mut control, SendFlags::empty()).unwrap();
        };
        let (mut ch, peer) = pair(Duration::from_secs(5));
        send(&peer, 1);
        let (body, _fd) = ch.call_with_fd(FrontendReq::GET_INFLIGHT_FD, &[]).unwrap();
        assert_eq!(body, 7u64.to_ne_bytes());
        for (fds, reason) in [(0, "no file descriptor"), (2, "more than one")] {
            let (mut ch, peer) = pair(Duration::from_secs(5));
            send(&peer, fds);
            match ch.call_with_fd(FrontendReq::GET_INFLIGHT_FD, &[]) {
                Err(VhostUserError::BadReply { reason: r, .. }) => assert!(r.contains(reason), "{r}"),
                other => panic!("{fds} descriptors: {other:?}"),
            }
        }
    }

    #[test]
    fn descriptors_ride_with_the_message() {
        let dir = std::env::temp_dir().join(format!("vu-chan-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let listener = UnixListener::bind(&dir).unwrap();
        let mut ch = Channel::connect(&dir, Duration::from_secs(5)).unwrap();
        let (peer, _) = listener.accept().unwrap();
        let _ = std::fs::remove_file(&dir);
        let efd = virtio_core::notify::EventFdNotifier::new().unwrap();
        use std::os::fd::AsFd;
        ch.send(FrontendReq::SET_VRING_KICK, &0u64.to_ne_bytes(), &[efd.as_fd()])
            .unwrap();
        let mut buf = [0u8; 20];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let got = rustix::net::recvmsg(&peer, &mut iov, &mut control, RecvFlags::empty()).unwrap();
        assert_eq!(got.bytes, 20);
        let n: usize = control
            .drain()
            .map(|m| match m {
                rustix::net::RecvAncillaryMessage::ScmRights(fds) => fds.count(),
                _ => 0,
            })
            .sum();
        assert_eq!(n, 1, "the eventfd travels with SET_VRING_KICK");
    }
}
