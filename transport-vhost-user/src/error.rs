//! What can go wrong between the front-end and a vhost-user back-end.

use crate::protocol::FrontendReq;
use std::io;
use std::path::PathBuf;
use std::time::Duration;
use virtio_core::notify::NotifyError;

/// Why the front-end could not talk to the back-end. Every error on the socket
/// leaves the connection unusable (a reply may be half read), so the transport
/// latches the first one and reports DEVICE_NEEDS_RESET from then on.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// Connecting to the back-end's socket failed.
    #[error("cannot connect to {}", .path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Configuring the socket failed.
    #[error("cannot configure the socket")]
    Socket(#[source] io::Error),
    /// Sending a request failed.
    #[error("cannot send {request:?}")]
    Send {
        /// The request.
        request: FrontendReq,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading a reply failed.
    #[error("cannot read the reply to {request:?}")]
    Recv {
        /// The request answered.
        request: FrontendReq,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The back-end did not take a request or answer it in time.
    #[error("back-end did not complete {request:?} within {timeout:?}")]
    TimedOut {
        /// The request.
        request: FrontendReq,
        /// The limit.
        timeout: Duration,
    },
    /// The back-end closed the connection (during `request`, if one was under way).
    #[error("back-end closed the connection{}", .request.map(|r| format!(" during {r:?}")).unwrap_or_default())]
    Disconnected {
        /// The request under way.
        request: Option<FrontendReq>,
    },
    /// A reply that does not answer the request: wrong code, flags or size.
    #[error("bad reply to {request:?}: {reason}")]
    BadReply {
        /// The request answered.
        request: FrontendReq,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The back-end answered a request with a failure (a non-zero REPLY_ACK, or an
    /// empty GET_CONFIG reply).
    #[error("back-end refused {request:?} (code {code:#x})")]
    Refused {
        /// The request.
        request: FrontendReq,
        /// The code it returned.
        code: u64,
    },
    /// The back-end sent something while no request was under way.
    #[error("back-end sent a message nobody asked for")]
    Unsolicited,
    /// The back-end lacks something this front-end needs.
    #[error("back-end does not offer {0}")]
    Missing(&'static str),
    /// GET_QUEUE_NUM answered 0 or more queues than a front-end sets up.
    #[error("back-end reports {0} queues")]
    BadQueueCount(u64),
    /// A configuration space the protocol cannot carry.
    #[error("configuration space of {0} bytes is larger than vhost-user carries")]
    ConfigTooLarge(usize),
    /// Guest memory that SET_MEM_TABLE cannot describe.
    #[error("guest memory at {base:#x} with {size} bytes cannot be shared")]
    Memory {
        /// First guest address.
        base: u64,
        /// Size.
        size: u64,
    },
    /// An eventfd could not be created or duplicated.
    #[error("eventfd")]
    Notify(#[from] NotifyError),
}
