//! `vhost_user_reply`: the vhost-user front-end (`transport_vhost_user`) against a
//! hostile back-end whose replies are fuzz bytes.
//!
//! A back-end thread answers on a real Unix socket: every message that wants a
//! reply (a request with one, or NEED_REPLY under REPLY_ACK) takes the next record
//! of its script; messages without one are read and dropped. At the end of the
//! script it hangs up, so no input can make the front-end wait for its timeout.
//! The front-end connects, then runs the driver-side operations the input lists
//! through `ControlPlane` and `Transport`.
//!
//! Input layout (missing bytes read as zero): `script_len: u16`, then that many
//! script bytes, then operations (at most 64), an op byte (taken modulo 10, see
//! [`frontend_op`]) and its operands.
//!
//! A script record is `mode: u8` (modulo 5) and its operands:
//! 0. `len: u16` (modulo 300), `len` bytes: a well-formed reply with that body;
//! 1. `request: u32, flags: u32, size: u32`, then `size` body bytes (zero-padded;
//!    a size above 8 KiB sends the header alone and hangs up);
//! 2. hang up;
//! 3. `cut: u8`: the first `cut % 12` bytes of a well-formed header, then hang up;
//! 4. like 0, followed by a second, unsolicited reply.
//!
//! Invariants: never a panic, never a wait on the back-end beyond the script; a
//! connected transport has a queue count of 1 to 256, an offer with
//! PROTOCOL_FEATURES and CONFIG, accepted protocol features within what was offered
//! and wanted, and never shows the driver vhost's own feature bits; once the
//! connection broke, the status the driver reads is 0 or has DEVICE_NEEDS_RESET.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hypervisor::GuestMemory;
use transport_vhost_user::protocol::{
    FrontendReq, ProtocolFeatures, VERSION, VHOST_FEATURES, VhostUserHeaderFlag, VhostUserVirtioFeatures,
};
use transport_vhost_user::{VhostUserOptions, VhostUserTransport};
use virtio_core::QueueAddrs;
use virtio_core::lifecycle::ControlPlane;
use virtio_core::transport::Transport;

use super::common::{Bytes, Seed};

/// Front-end operations (op byte modulo 10).
pub mod frontend_op {
    /// Reads the device features.
    pub const FEATURES: u8 = 0;
    /// `features: u64`: the driver's features.
    pub const SET_FEATURES: u8 = 1;
    /// `status: u8`: writes the status.
    pub const SET_STATUS: u8 = 2;
    /// Reads the status.
    pub const STATUS: u8 = 3;
    /// Reads the configuration generation.
    pub const GENERATION: u8 = 4;
    /// `offset: u8, len: u8`: reads configuration bytes.
    pub const READ_CONFIG: u8 = 5;
    /// `offset: u8, len: u8` (modulo 8), `len` bytes: writes configuration bytes.
    pub const WRITE_CONFIG: u8 = 6;
    /// `index: u8, size: u16, desc: u16, avail: u16, used: u16`: sets a queue up
    /// (addresses are 16-byte units from the memory's base).
    pub const SETUP_QUEUE: u8 = 7;
    /// `index: u8`: notifies a queue.
    pub const NOTIFY: u8 = 8;
    /// `index: u8`: reads a queue's maximum size.
    pub const QUEUE_MAX: u8 = 9;
}

const MEM_BASE: u64 = 0x1_0000_0000;
const MEM_SIZE: u64 = 1 << 20;
const MAX_OPS: usize = 64;
/// DEVICE_NEEDS_RESET (virtio 1.2 §2.1).
const NEEDS_RESET: u8 = 0x40;
const F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
const FLAG_REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();
const FLAG_NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();

fn memory() -> Arc<GuestMemory> {
    static MEM: OnceLock<Arc<GuestMemory>> = OnceLock::new();
    MEM.get_or_init(|| GuestMemory::new("vhost-user-reply-fuzz", MEM_BASE, MEM_SIZE).expect("guest memory"))
        .clone()
}

/// Runs one input; panics only when an invariant is broken.
pub fn run(data: &[u8]) {
    report(data);
}

/// [`run`], returning what happened (the connect result, then one line per
/// operation that said something), for the seed tests.
pub fn report(data: &[u8]) -> Vec<String> {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut input = Bytes(data);
    let script_len = usize::from(input.u16());
    let script = input.slice(script_len).to_vec();
    let path = std::env::temp_dir().join(format!(
        "vio-fuzz-reply-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind");
    let backend = std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            serve(stream, &script);
        }
    });
    let opts = VhostUserOptions {
        // A guard only: the back-end answers or hangs up at once.
        timeout: Duration::from_secs(10),
        ..VhostUserOptions::blk()
    };
    let result = VhostUserTransport::connect(&path, memory(), opts);
    let _ = std::fs::remove_file(&path);
    let mut events = Vec::new();
    match result {
        Err(e) => events.push(format!("connect: {e:?}")),
        Ok(t) => {
            events.push("connected".into());
            check_connected(&t);
            drive(&t, &mut input, &mut events);
        }
    }
    backend.join().expect("back-end thread");
    events
}

fn check_connected(t: &VhostUserTransport) {
    let b = t.backend();
    assert!(
        (1..=transport_vhost_user::MAX_QUEUES).contains(&b.queues),
        "{b:?}"
    );
    assert_ne!(b.features & F_PROTOCOL_FEATURES, 0, "{b:?}");
    assert!(b.protocol_features.contains(ProtocolFeatures::CONFIG), "{b:?}");
    let wanted = ProtocolFeatures::MQ | ProtocolFeatures::CONFIG | ProtocolFeatures::REPLY_ACK;
    assert!(
        wanted.contains(b.acked_protocol_features) && b.protocol_features.contains(b.acked_protocol_features),
        "{b:?}"
    );
    assert_eq!(t.num_queues(), b.queues);
    assert_eq!(
        t.device_features() & VHOST_FEATURES,
        0,
        "vhost bits shown to the driver"
    );
}

fn drive(t: &VhostUserTransport, input: &mut Bytes<'_>, events: &mut Vec<String>) {
    let mut ops = 0;
    while !input.is_empty() && ops < MAX_OPS {
        ops += 1;
        match input.u8() % 10 {
            frontend_op::FEATURES => {
                assert_eq!(t.device_features() & VHOST_FEATURES, 0, "vhost bits shown");
            }
            frontend_op::SET_FEATURES => t.set_driver_features(input.u64()),
            frontend_op::SET_STATUS => t.set_status(input.u8()),
            frontend_op::STATUS => {
                let _ = t.status();
            }
            frontend_op::GENERATION => {
                let _ = t.config_generation();
            }
            frontend_op::READ_CONFIG => {
                let offset = usize::from(input.u8());
                let mut buf = vec![0u8; usize::from(input.u8())];
                t.read_config(offset, &mut buf);
            }
            frontend_op::WRITE_CONFIG => {
                let offset = usize::from(input.u8());
                let len = usize::from(input.u8() % 8);
                let data = input.slice(len).to_vec();
                t.write_config(offset, &data);
            }
            frontend_op::SETUP_QUEUE => {
                let index = u16::from(input.u8());
                let size = input.u16();
                let mut addr = || MEM_BASE + 16 * u64::from(input.u16());
                let addrs = QueueAddrs {
                    desc: addr(),
                    avail: addr(),
                    used: addr(),
                };
                if let Err(e) = t.setup_queue(index, size, addrs) {
                    events.push(format!("setup_queue: {e:?}"));
                }
            }
            frontend_op::NOTIFY => {
                if let Err(e) = t.notify_queue(u16::from(input.u8())) {
                    events.push(format!("notify: {e:?}"));
                }
            }
            _ => {
                let _ = t.queue_max_size(u16::from(input.u8()));
            }
        }
        if let Some(e) = t.broken() {
            let status = t.status();
            assert!(
                status == 0 || status & NEEDS_RESET != 0,
                "broken ({e}) but status {status:#x}"
            );
            if !events.iter().any(|l| l.starts_with("broken")) {
                events.push(format!("broken: {e:?}"));
            }
        }
    }
}

/// Whether a message with this header waits for an answer.
fn wants_reply(request: u32, flags: u32) -> bool {
    let has_reply = [
        FrontendReq::GET_FEATURES,
        FrontendReq::GET_VRING_BASE,
        FrontendReq::GET_PROTOCOL_FEATURES,
        FrontendReq::GET_QUEUE_NUM,
        FrontendReq::GET_CONFIG,
    ]
    .into_iter()
    .any(|r| u32::from(r) == request);
    has_reply || flags & FLAG_NEED_REPLY != 0
}

fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    [request, flags, size]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect()
}

/// The back-end: answers each message that wants a reply from `script`, hangs up
/// when told to or when the script ends.
fn serve(mut s: UnixStream, script: &[u8]) {
    let mut script = Bytes(script);
    loop {
        let mut h = [0u8; 12];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let word = |i: usize| u32::from_ne_bytes(h[4 * i..4 * i + 4].try_into().expect("4 bytes"));
        let (request, flags, size) = (word(0), word(1), word(2));
        // The front-end's bodies are small; anything else is not ours to read.
        if size > 4096 {
            return;
        }
        let mut body = vec![0u8; size as usize];
        if s.read_exact(&mut body).is_err() {
            return;
        }
        if !wants_reply(request, flags) {
            continue;
        }
        if script.is_empty() {
            return;
        }
        let proper = |script: &mut Bytes<'_>| {
            let len = script.u16() % 300;
            let mut m = header(request, VERSION | FLAG_REPLY, u32::from(len));
            let mut b = script.slice(usize::from(len)).to_vec();
            b.resize(usize::from(len), 0);
            m.extend(b);
            m
        };
        let out = match script.u8() % 5 {
            0 => proper(&mut script),
            1 => {
                let (r, f, size) = (script.u32(), script.u32(), script.u32());
                let mut m = header(r, f, size);
                if size > 8192 {
                    let _ = s.write_all(&m);
                    return;
                }
                let mut b = script.slice(size as usize).to_vec();
                b.resize(size as usize, 0);
                m.extend(b);
                m
            }
            2 => return,
            3 => {
                let cut = usize::from(script.u8() % 12);
                let m = header(request, VERSION | FLAG_REPLY, 8);
                let _ = s.write_all(&m[..cut]);
                return;
            }
            _ => {
                let mut m = proper(&mut script);
                m.extend(header(request, VERSION | FLAG_REPLY, 8));
                m.extend([0u8; 8]);
                m
            }
        };
        if s.write_all(&out).is_err() {
            return;
        }
    }
}

/// A script record: a well-formed reply with `body`.
fn reply(s: Seed, body: &[u8]) -> Seed {
    s.u8(0).u16(u16::try_from(body.len()).expect("short")).bytes(body)
}

/// A blk configuration reply: header (offset 0, size 72), then 72 bytes.
fn config_body() -> Vec<u8> {
    let mut b = Vec::new();
    for w in [0u32, 72, 0] {
        b.extend(w.to_ne_bytes());
    }
    b.extend([0u8; 72]);
    b
}

/// A script that connects: features, protocol features (`proto`), queue count
/// (only with MQ in `proto`), the SET_OWNER ack (only with REPLY_ACK), the config.
fn handshake(proto: u64, queues: u64) -> Seed {
    let features = F_PROTOCOL_FEATURES | 1 << 32;
    let mut s = reply(Seed::new(), &features.to_ne_bytes());
    s = reply(s, &proto.to_ne_bytes());
    if proto & ProtocolFeatures::MQ.bits() != 0 {
        s = reply(s, &queues.to_ne_bytes());
    }
    if proto & ProtocolFeatures::REPLY_ACK.bits() != 0 {
        s = reply(s, &0u64.to_ne_bytes());
    }
    reply(s, &config_body())
}

/// The whole input: the script's length, the script, then the operations.
fn input(script: Seed, ops: &[u8]) -> Vec<u8> {
    Seed::new()
        .u16(u16::try_from(script.0.len()).expect("short"))
        .bytes(&script.0)
        .bytes(ops)
        .0
}

/// The seed corpus: `(name, input, text the report must contain)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let all = (ProtocolFeatures::MQ | ProtocolFeatures::CONFIG | ProtocolFeatures::REPLY_ACK).bits();
    let config = ProtocolFeatures::CONFIG.bits();
    // FEATURES_OK (SET_FEATURES, SET_MEM_TABLE acked), a queue (5 acked sends).
    let mut bringup = handshake(all, 2);
    for _ in 0..7 {
        bringup = reply(bringup, &0u64.to_ne_bytes());
    }
    let ops = [
        frontend_op::SET_FEATURES,
        0,
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        frontend_op::SET_STATUS,
        1,
        frontend_op::SET_STATUS,
        3,
        frontend_op::SET_STATUS,
        11,
        frontend_op::SETUP_QUEUE,
        0,
        8,
        0,
        0,
        0x10,
        0,
        0x20,
        0,
        frontend_op::STATUS,
        frontend_op::READ_CONFIG,
        0,
        72,
    ];
    vec![
        (
            "connect",
            input(handshake(all, 2), &[frontend_op::STATUS]),
            "connected",
        ),
        (
            "connect-config-only",
            input(handshake(config, 0), &[]),
            "connected",
        ),
        ("bring-up", input(bringup, &ops), "connected"),
        (
            "no-protocol-features",
            input(reply(Seed::new(), &0u64.to_ne_bytes()), &[]),
            "Missing",
        ),
        (
            "queue-count-zero",
            input(
                reply(
                    reply(Seed::new(), &F_PROTOCOL_FEATURES.to_ne_bytes()),
                    &all.to_ne_bytes(),
                )
                .pipe(|s| reply(s, &0u64.to_ne_bytes())),
                &[],
            ),
            "BadQueueCount(0)",
        ),
        (
            "reply-to-another-request",
            input(
                Seed::new().u8(1).u32(3).u32(VERSION | FLAG_REPLY).u32(8).u64(0),
                &[],
            ),
            "another request",
        ),
        (
            "body-too-large",
            input(
                Seed::new().u8(1).u32(1).u32(VERSION | FLAG_REPLY).u32(u32::MAX),
                &[],
            ),
            "body too large",
        ),
        ("cut-header", input(Seed::new().u8(3).u8(5), &[]), "Disconnected"),
        (
            "short-config",
            input(reply(handshake(config, 0).0.pipe_trunc(), &[0u8; 12]), &[]),
            "another range",
        ),
        (
            "unsolicited",
            input(
                {
                    let mut s = handshake(config, 0);
                    // The config reply is followed by a stray one.
                    let n = s.0.len() - (1 + 2 + 84);
                    s.0[n] = 4;
                    s
                },
                &[frontend_op::STATUS],
            ),
            "Unsolicited",
        ),
    ]
}

/// Small helpers for building seeds inline.
trait Pipe: Sized {
    fn pipe(self, f: impl FnOnce(Self) -> Self) -> Self {
        f(self)
    }
}

impl Pipe for Seed {}

/// `handshake(config, 0)` without its config reply.
trait Trunc {
    fn pipe_trunc(self) -> Seed;
}

impl Trunc for Vec<u8> {
    fn pipe_trunc(mut self) -> Seed {
        self.truncate(self.len() - (1 + 2 + 84));
        Seed(self)
    }
}
