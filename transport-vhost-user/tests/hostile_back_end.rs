//! Replies from a scripted back-end that rust-vmm's `vhost_user::Frontend` (vhost
//! 0.18.0) accepts or waits on forever, and that this front-end refuses at once with
//! a typed error: the reasons `src/channel.rs` gives for reading replies itself.

use hypervisor::GuestMemory;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use transport_vhost_user::{VhostUserError, VhostUserOptions, VhostUserTransport};
use virtio_core::QueueAddrs;
use virtio_core::lifecycle::ControlPlane;
use virtio_core::status::DeviceStatus;
use virtio_core::transport::Transport;

const GET_FEATURES: u32 = 1;
const GET_VRING_BASE: u32 = 11;
const GET_PROTOCOL_FEATURES: u32 = 15;
const GET_CONFIG: u32 = 24;
/// Version 1, REPLY.
const REPLY: u32 = 0x1 | 0x4;
/// VHOST_USER_F_PROTOCOL_FEATURES and VERSION_1.
const FEATURES: u64 = 1 << 30 | 1 << 32;
/// The CONFIG protocol feature only: no REPLY_ACK, no MQ.
const PROTOCOL: u64 = 1 << 9;
const MEM_BASE: u64 = 0x1_0000_0000;

fn message(request: u32, size: u32, body: &[u8]) -> Vec<u8> {
    let mut m: Vec<u8> = [request, REPLY, size]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
    m.extend_from_slice(body);
    m
}

/// A well-formed reply to `request`.
fn reply(request: u32, body: &[u8]) -> Vec<u8> {
    message(request, u32::try_from(body.len()).unwrap(), body)
}

/// A blk configuration reply, as a back-end that works sends it.
fn config_reply() -> Vec<u8> {
    let mut body: Vec<u8> = [0u32, 72, 0].iter().flat_map(|w| w.to_ne_bytes()).collect();
    body.resize(12 + 72, 0);
    reply(GET_CONFIG, &body)
}

/// A back-end that reads every message and writes what `answer` returns for it (the
/// request code and body); it keeps the socket open until the front-end closes it.
fn back_end(answer: impl Fn(u32, &[u8]) -> Option<Vec<u8>> + Send + 'static) -> (PathBuf, JoinHandle<()>) {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vu-hostile-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hdr = [0u8; 12];
        while s.read_exact(&mut hdr).is_ok() {
            let word = |i: usize| u32::from_ne_bytes(hdr[4 * i..4 * i + 4].try_into().unwrap());
            let mut body = vec![0u8; word(2) as usize];
            if s.read_exact(&mut body).is_err() {
                break;
            }
            if let Some(out) = answer(word(0), &body)
                && s.write_all(&out).is_err()
            {
                break;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
    (path, server)
}

fn connect(path: &std::path::Path) -> Result<VhostUserTransport, VhostUserError> {
    let memory = GuestMemory::new("vu-hostile", MEM_BASE, 1 << 20).unwrap();
    let opts = VhostUserOptions {
        // Far above the test's run time: a front-end that waited would fail the
        // assertions with TimedOut, not pass them late.
        timeout: Duration::from_secs(60),
        ..VhostUserOptions::blk()
    };
    VhostUserTransport::connect(path, memory, opts)
}

#[test]
fn a_reply_whose_header_says_no_body_is_refused_even_if_bytes_follow() {
    // The rest of the handshake is well formed, so a front-end that took the 8 bytes
    // as the value would connect.
    let (path, server) = back_end(|request, _| match request {
        // Size 0 in the header, then the 8 bytes a GET_FEATURES reply would carry.
        GET_FEATURES => Some(message(request, 0, &FEATURES.to_ne_bytes())),
        GET_PROTOCOL_FEATURES => Some(reply(request, &PROTOCOL.to_ne_bytes())),
        GET_CONFIG => Some(config_reply()),
        _ => None,
    });
    let err = connect(&path).expect_err("a reply without a body");
    assert!(
        matches!(
            err,
            VhostUserError::BadReply {
                reason: "body is not one u64",
                ..
            }
        ),
        "{err:?}"
    );
    server.join().unwrap();
}

#[test]
fn an_empty_config_reply_is_a_refusal_not_a_wait() {
    // libvhost-user's (so qemu-storage-daemon's) way of saying GET_CONFIG failed.
    let (path, server) = back_end(|request, _| match request {
        GET_FEATURES => Some(reply(request, &FEATURES.to_ne_bytes())),
        GET_PROTOCOL_FEATURES => Some(reply(request, &PROTOCOL.to_ne_bytes())),
        GET_CONFIG => Some(reply(request, &[])),
        _ => None,
    });
    let err = connect(&path).expect_err("GET_CONFIG failed");
    assert!(matches!(err, VhostUserError::Refused { code: 0, .. }), "{err:?}");
    server.join().unwrap();
}

#[test]
fn a_ring_stop_confirmed_for_another_ring_does_not_complete_a_reset() {
    let (path, server) = back_end(|request, body| match request {
        GET_FEATURES => Some(reply(request, &FEATURES.to_ne_bytes())),
        GET_PROTOCOL_FEATURES => Some(reply(request, &PROTOCOL.to_ne_bytes())),
        GET_CONFIG => Some(config_reply()),
        GET_VRING_BASE => {
            // Ring index + 1, next available index 0.
            let index = u32::from_ne_bytes(body[..4].try_into().unwrap());
            let state: Vec<u8> = [index + 1, 0].iter().flat_map(|w| w.to_ne_bytes()).collect();
            Some(reply(request, &state))
        }
        _ => None,
    });
    let t = connect(&path).unwrap();
    let driver = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER;
    t.set_status(driver.bits());
    t.set_driver_features(1 << 32);
    t.set_status((driver | DeviceStatus::FEATURES_OK).bits());
    let addrs = QueueAddrs {
        desc: MEM_BASE,
        avail: MEM_BASE + 0x1000,
        used: MEM_BASE + 0x2000,
    };
    t.setup_queue(0, 8, addrs).unwrap();
    t.set_status((driver | DeviceStatus::FEATURES_OK | DeviceStatus::DRIVER_OK).bits());
    assert!(t.broken().is_none());

    t.set_status(0);
    let status = DeviceStatus::from_bits_retain(t.status());
    assert!(
        status.contains(DeviceStatus::DEVICE_NEEDS_RESET),
        "the reset did not complete: {status:?}"
    );
    assert!(
        matches!(
            t.broken().as_deref(),
            Some(VhostUserError::BadReply {
                reason: "it names another ring",
                ..
            })
        ),
        "{:?}",
        t.broken()
    );
    drop(t);
    server.join().unwrap();
}
