//! The unix-socket channel between the owner and a device process: one JSON message
//! per `SOCK_SEQPACKET` record, file descriptors passed with `SCM_RIGHTS`, and the
//! messages both sides speak.
//!
//! Everything received is hostile (HOSTILE 39 puts the device in a process of its
//! own precisely because it is not trusted): a record that was truncated, carries
//! too many descriptors or does not decode is a typed [`WireError`].

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

/// Largest record either side sends or accepts.
pub const MAX_MESSAGE: usize = 64 << 10;
/// Most file descriptors one record carries.
pub const MAX_FDS: usize = 4;

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket system call failed (a receive timeout shows as `WouldBlock`).
    #[error("socket I/O failed")]
    Io(#[from] std::io::Error),
    /// The peer closed its end.
    #[error("the peer closed the channel")]
    Closed,
    /// A record or its descriptors did not fit and were cut (the rest is dropped).
    #[error("a record was truncated")]
    Truncated,
    /// A message too large to send.
    #[error("a message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// More descriptors than one record carries.
    #[error("{0} file descriptors exceed the limit")]
    TooManyFds(usize),
    /// The record is not a message of the expected kind.
    #[error("malformed message")]
    Decode(#[from] serde_json::Error),
}

/// One end of the channel.
#[derive(Debug)]
pub struct Channel {
    sock: OwnedFd,
}

impl Channel {
    /// A connected pair: the owner's end and the descriptor to give the device
    /// process. Both are close-on-exec.
    pub fn pair() -> Result<(Channel, OwnedFd), WireError> {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(std::io::Error::from)?;
        Ok((Channel { sock: a }, b))
    }

    /// Wraps a connected `SOCK_SEQPACKET` socket.
    pub fn from_fd(sock: OwnedFd) -> Channel {
        Channel { sock }
    }

    /// Makes [`Channel::recv`] give up after `limit` instead of waiting for a peer
    /// that never answers (a hostile device must not hang its owner).
    pub fn set_recv_limit(&self, limit: Duration) -> Result<(), WireError> {
        rustix::net::sockopt::set_socket_timeout(
            &self.sock,
            rustix::net::sockopt::Timeout::Recv,
            Some(limit),
        )
        .map_err(std::io::Error::from)?;
        Ok(())
    }

    /// Sends `msg` with `fds` attached.
    pub fn send<T: Serialize>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
        let bytes = serde_json::to_vec(msg)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(WireError::TooLarge(bytes.len()));
        }
        if fds.len() > MAX_FDS {
            return Err(WireError::TooManyFds(fds.len()));
        }
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(WireError::TooManyFds(fds.len()));
        }
        let iov = [IoSlice::new(&bytes)];
        let sent = rustix::net::sendmsg(&self.sock, &iov, &mut control, SendFlags::NOSIGNAL)
            .map_err(std::io::Error::from)?;
        if sent != bytes.len() {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    /// Receives one message and the descriptors that came with it.
    pub fn recv<T: for<'de> Deserialize<'de>>(&self) -> Result<(T, Vec<OwnedFd>), WireError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let got = rustix::net::recvmsg(&self.sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)
            .map_err(std::io::Error::from)?;
        // Take ownership of every descriptor first, so none leaks whatever happens.
        let mut fds = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = m {
                fds.extend(rights);
            }
        }
        if got.flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC) {
            return Err(WireError::Truncated);
        }
        if got.bytes == 0 {
            return Err(WireError::Closed);
        }
        if fds.len() > MAX_FDS {
            return Err(WireError::TooManyFds(fds.len()));
        }
        let msg = serde_json::from_slice(&buf[..got.bytes])?;
        Ok((msg, fds))
    }

    /// The socket itself.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// What the device process is set up as; the message carries the files its model
/// allows it, and nothing else reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Setup {
    /// Model 1. One file: the shared region (writable, size sealed). The device
    /// computes the region's map from the same configuration.
    SharedPage {
        /// `SharedPageConfig::max_queues`.
        max_queues: u16,
        /// `SharedPageConfig::max_queue_size`.
        max_queue_size: u16,
        /// `SharedPageConfig::bounce_bytes_per_queue`.
        bounce_bytes_per_queue: u64,
    },
    /// Model 2. One file: the guest's whole memory; `base` is the guest address of
    /// its first byte.
    Direct {
        /// Guest address of the file's first byte.
        base: u64,
    },
    /// Model 3, one queue. Three files, each the pages of one ring: the descriptor
    /// table and the available ring opened read-only (a writable mapping of them
    /// fails), the used ring writable. No buffer memory: buffer bytes move only
    /// through [`Reply::Copy`] requests, which the owner checks with its copy helper.
    Copy {
        /// Queue index.
        index: u16,
        /// Queue size.
        size: u16,
        /// Negotiated feature bits.
        features: u64,
    },
    /// Model 4, one queue: three files, one per ring (the ring grants' pages, each
    /// given a file of its own by the owner, which is the hypervisor here), as for
    /// [`Setup::Copy`]. No buffer memory: every buffer access is a grant copy the
    /// owner performs for the device's domain ([`Reply::GrantCopy`]), checked
    /// against the grant table alone.
    Grant {
        /// Queue index.
        index: u16,
        /// Queue size.
        size: u16,
        /// Negotiated feature bits.
        features: u64,
    },
}

/// A model-4 grant copy the device asks of the owner: the descriptor's grant
/// address (`transport_grant::addr`), never a guest address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantOp {
    /// The descriptor's address: a grant reference and an offset.
    pub addr: u64,
    /// The descriptor's length (what [`CopyKind::Check`] checks).
    pub len: u32,
    /// Whether the descriptor is device-writable.
    pub writable: bool,
    /// Offset inside the descriptor.
    pub offset: u32,
    /// What to do.
    pub kind: CopyKind,
}

/// Which descriptor of a chain a copy names (`virtio_core::DescSlot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Slot {
    /// Entry of the descriptor table.
    Table(u16),
    /// Entry of the chain's indirect table.
    Indirect(u16),
}

/// A model-3 device's request to move buffer bytes, checked by the owner's copy
/// helper against what the device owns. Only `(queue, head, slot)` name the
/// descriptor: its address and length come from the guest's descriptor table, never
/// from the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyOp {
    /// Queue index.
    pub queue: u16,
    /// Head of the chain.
    pub head: u16,
    /// The descriptor.
    pub slot: Slot,
    /// Whether the device means the descriptor to be device-writable.
    pub writable: bool,
    /// Offset into the descriptor.
    pub offset: u32,
    /// What to do.
    pub kind: CopyKind,
}

/// The direction of a [`CopyOp`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyKind {
    /// Only check that the device may reach the whole descriptor.
    Check,
    /// Copy this many bytes out of guest memory (at most [`MAX_COPY`]).
    Read(u32),
    /// Copy these bytes into guest memory (at most [`MAX_COPY`]).
    Write(Vec<u8>),
}

/// Largest copy one request moves (its JSON must fit in a record).
pub const MAX_COPY: usize = 8 << 10;

/// A request from the owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Set the device up (files attached).
    Setup(Setup),
    /// Open a queue at the addresses the driver wrote into its registers.
    Open {
        /// Queue index.
        index: u16,
        /// Queue size.
        size: u16,
        /// Descriptor table.
        desc: u64,
        /// Available ring.
        avail: u64,
        /// Used ring.
        used: u64,
        /// Negotiated feature bits.
        features: u64,
    },
    /// The driver notified the queue: serve every available chain (the echo
    /// service: the readable bytes, upper-cased, into the writable part).
    Kick {
        /// Queue index.
        index: u16,
    },
    /// Hostile device: try something outside what the model allows.
    Attack(Attack),
    /// The owner's answer to a [`Reply::Copy`]: the bytes read (empty for a write or
    /// a check), or why the copy helper refused.
    Copied(Result<Vec<u8>, String>),
}

/// What a hostile device process tries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Attack {
    /// Look for a way out: list its own descriptors and capabilities, open the
    /// owner's `/proc` entries (memory, descriptors, mapped files), resize the files
    /// it was given.
    Escape,
    /// Write `0xa5` over every byte of received file `file`, through a mapping of it.
    Scribble {
        /// Index among the files received.
        file: usize,
    },
    /// Map received file `file` writable.
    MapWritable {
        /// Index among the files received.
        file: usize,
    },
    /// Map the page just past the end of received file `file` and read it: the
    /// process must die of `SIGBUS`.
    TouchPastEnd {
        /// Index among the files received.
        file: usize,
    },
    /// Model 3: ask the owner for a copy it should refuse.
    Copy(CopyOp),
    /// Model 4: ask the owner for a grant copy it should refuse.
    GrantCopy(GrantOp),
}

/// One thing a hostile device tried, and what came of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// What was tried.
    pub attempt: String,
    /// `Ok(what it got)` if it worked, `Err(why not)` if it was refused.
    pub result: Result<String, String>,
}

/// A reply from the device process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Set up; `files` is how many files it holds now.
    Ready {
        /// Files received.
        files: usize,
    },
    /// The queue is open.
    Opened,
    /// Chains served by a kick.
    Served {
        /// Chains completed.
        chains: u32,
    },
    /// What an attack found.
    Findings(Vec<Finding>),
    /// The request failed on the device's side.
    Failed(String),
    /// Model 3, sent while serving a request: a copy for the owner's helper; the
    /// owner answers with [`Request::Copied`] and the device then goes on.
    Copy(CopyOp),
    /// Model 4, sent while serving a request: a grant copy for the owner; answered
    /// with [`Request::Copied`].
    GrantCopy(GrantOp),
}
