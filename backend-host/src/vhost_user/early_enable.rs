//! SET_VRING_ENABLE served before the `vhost` crate sees it.
//!
//! QEMU (checked with 10.0.2's `vhost_user_*` trace) sends a vhost-user-net backend
//! SET_VRING_ENABLE, with NEED_REPLY, before any SET_FEATURES, and again before
//! SET_FEATURES at every start. The spec says the message "should be sent only
//! when VHOST_USER_F_PROTOCOL_FEATURES has been negotiated", and the rust-vmm
//! `vhost` crate's dispatcher holds QEMU to it: it refuses the message without a
//! reply, so QEMU waits for its ack for ever. Refusing to offer protocol features
//! instead is no way out either: QEMU's vhost-user-net then fails to start
//! (`vhost_user_set_vring_enable` returns EINVAL without them).
//!
//! So the daemon peeks at each message's header; a SET_VRING_ENABLE (which
//! carries no file descriptors) is read and answered here, on the session like
//! any other, and everything else is left on the socket for the crate. The
//! session checks the ring index and tracks the enable whether or not features
//! were set yet: it only starts rings once everything else is in place.

use crate::vhost_user::server::{Session, VhostUserDevice};
use rustix::net::RecvFlags;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, PoisonError};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;

/// vhost-user's SET_VRING_ENABLE request code.
const SET_VRING_ENABLE: u32 = 18;
/// Header flags: protocol version 1, "this is a reply", "reply wanted".
const VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 1 << 2;
const FLAG_NEED_REPLY: u32 = 1 << 3;
const HEADER: usize = 12;
/// The body: a `vhost_vring_state` (index, num).
const BODY: usize = 8;

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// If the next message on `peer` is a SET_VRING_ENABLE, reads it, applies it to
/// `session` and acknowledges it when asked to; returns whether it did. Blocks
/// until a header has arrived; returns `Ok(false)` at end of stream, leaving the
/// crate to report the disconnect.
///
/// # Errors
/// Reading or replying failed: the connection is unusable.
pub(crate) fn serve<D: VhostUserDevice>(
    peer: &mut UnixStream,
    session: &Mutex<Session<D>>,
) -> std::io::Result<bool> {
    let mut head = [0u8; HEADER];
    // A header arrives whole in practice (one sendmsg per message); WAITALL makes
    // sure of it. Peeking leaves any attached file descriptors queued for the
    // crate's own read.
    let (n, _) = rustix::net::recv(&*peer, &mut head, RecvFlags::PEEK | RecvFlags::WAITALL)?;
    if n < HEADER || word(&head, 0) != SET_VRING_ENABLE || word(&head, 8) as usize != BODY {
        return Ok(false);
    }
    let mut msg = [0u8; HEADER + BODY];
    peer.read_exact(&mut msg)?;
    let flags = word(&msg, 4);
    let (index, num) = (word(&msg, HEADER), word(&msg, HEADER + 4));
    let mut s = session.lock().unwrap_or_else(PoisonError::into_inner);
    let result = match num {
        0 | 1 => s.set_vring_enable(index, num == 1).is_ok(),
        _ => false,
    };
    if !result {
        tracing::warn!(index, num, "SET_VRING_ENABLE refused");
    }
    if flags & FLAG_NEED_REPLY != 0 && s.reply_ack() {
        let mut reply = [0u8; HEADER + 8];
        reply[0..4].copy_from_slice(&SET_VRING_ENABLE.to_ne_bytes());
        reply[4..8].copy_from_slice(&(VERSION | FLAG_REPLY).to_ne_bytes());
        reply[8..12].copy_from_slice(&8u32.to_ne_bytes());
        // REPLY_ACK: 0 for success, anything else for failure.
        reply[12..20].copy_from_slice(&u64::from(!result).to_ne_bytes());
        peer.write_all(&reply)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost_user::server::tests::session;

    fn message(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        for w in [request, flags, u32::try_from(body.len()).unwrap()] {
            m.extend_from_slice(&w.to_ne_bytes());
        }
        m.extend_from_slice(body);
        m
    }

    fn enable(index: u32, num: u32, flags: u32) -> Vec<u8> {
        let mut body = index.to_ne_bytes().to_vec();
        body.extend_from_slice(&num.to_ne_bytes());
        message(SET_VRING_ENABLE, flags, &body)
    }

    #[test]
    fn an_enable_before_set_features_is_applied_and_acknowledged() {
        let (s, _log) = session();
        let s = Mutex::new(s);
        let (mut frontend, mut backend) = UnixStream::pair().unwrap();
        frontend
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        // REPLY_ACK negotiated, then SET_VRING_ENABLE with NEED_REPLY, no features yet.
        s.lock()
            .unwrap()
            .set_protocol_features(vhost::vhost_user::message::VhostUserProtocolFeatures::REPLY_ACK.bits())
            .unwrap();
        frontend
            .write_all(&enable(1, 1, VERSION | FLAG_NEED_REPLY))
            .unwrap();
        // A request for the crate follows: it must stay on the socket.
        let get_features = message(1, VERSION, &[]);
        frontend.write_all(&get_features).unwrap();
        assert!(serve(&mut backend, &s).unwrap());
        let mut reply = [0u8; 20];
        frontend.read_exact(&mut reply).unwrap();
        assert_eq!(word(&reply, 0), SET_VRING_ENABLE);
        assert_eq!(word(&reply, 4), VERSION | FLAG_REPLY);
        assert_eq!(
            u64::from_ne_bytes(reply[12..20].try_into().unwrap()),
            0,
            "success"
        );
        assert!(!serve(&mut backend, &s).unwrap(), "GET_FEATURES is the crate's");
        let mut rest = [0u8; 12];
        backend.read_exact(&mut rest).unwrap();
        assert_eq!(rest.to_vec(), get_features);
    }

    #[test]
    fn a_bad_enable_is_refused_in_the_acknowledgement() {
        let (s, _log) = session();
        let s = Mutex::new(s);
        s.lock()
            .unwrap()
            .set_protocol_features(vhost::vhost_user::message::VhostUserProtocolFeatures::REPLY_ACK.bits())
            .unwrap();
        let (mut frontend, mut backend) = UnixStream::pair().unwrap();
        frontend
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        for bad in [
            enable(7, 1, VERSION | FLAG_NEED_REPLY),
            enable(0, 2, VERSION | FLAG_NEED_REPLY),
        ] {
            frontend.write_all(&bad).unwrap();
            assert!(serve(&mut backend, &s).unwrap());
            let mut reply = [0u8; 20];
            frontend.read_exact(&mut reply).unwrap();
            assert_ne!(
                u64::from_ne_bytes(reply[12..20].try_into().unwrap()),
                0,
                "failure"
            );
        }
        // Without NEED_REPLY nothing is written back; a closed peer is no enable.
        frontend.write_all(&enable(0, 1, VERSION)).unwrap();
        assert!(serve(&mut backend, &s).unwrap());
        drop(frontend);
        assert!(!serve(&mut backend, &s).unwrap());
    }
}
