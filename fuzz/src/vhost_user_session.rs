//! `vhost_user_session`: `backend_host`'s vhost-user daemon fed a hostile
//! front-end's message stream over a real Unix socket (HOSTILE 35, 38).
//!
//! Each run binds a [`Daemon`] serving a small device of the harness's own, connects,
//! sends the messages the input describes (with eventfds, memfds sealable or not,
//! `/dev/null` attached), hangs up and reads every reply until the daemon closes
//! its end. The device, when the session starts rings, opens them through the
//! session's memory table (`VhostMemory`, so `TableMemory`) and serves a few chains
//! from the guest image: memory tables with unaligned, overlapping, huge or
//! wrapping values reach the mapping and the accessors.
//!
//! Input layout (missing bytes read as zero):
//!
//! 1. `policy: u8`: bit 0 lets unsealed, non-regular memory files in;
//! 2. `image_len: u16` and that many bytes: the start of every memory
//!    file (rings and buffers the device will read);
//! 3. messages until the input ends (at most 64): `request: u8`, `flags: u8` (bit 3
//!    NEED_REPLY; bits 0-1 are XORed into the version, so 0 is valid), `len: u16`
//!    (modulo 1024), `len` body bytes, `fds: u8`: bits 0-1 the count, then two bits
//!    per descriptor from bit 2: 0 an eventfd, 1 a sealable memfd, 2 an unsealable
//!    memfd, 3 `/dev/null`. Memfds are 64 KiB.
//!
//! Invariants: never a panic, in the daemon or the device; the daemon answers or
//! closes, never hangs (the run ends when it closes the connection); no access the
//! device makes through the table escapes it (every read or write either succeeds
//! inside a mapped region or is a typed error).

use std::fs::File;
use std::io::{IoSlice, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};

use backend_host::vhost_user::Daemon;
use backend_host::vhost_user::memory::{MemoryPolicy, VhostMemory};
use backend_host::vhost_user::server::VhostUserDevice;
use rustix::fs::MemfdFlags;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
use virtio_core::config::ConfigSpace;
use virtio_core::features::Features;
use virtio_core::lifecycle::DeviceLifecycle;
use virtio_core::transport::{ActiveQueue, DeviceHandler};
use virtio_core::{DeviceModel, DeviceQueue, SplitDevice};

use super::common::{Bytes, Seed};

const MAX_MESSAGES: usize = 64;
const MEMFD_LEN: u64 = 64 << 10;
/// Most chains the device serves per queue and activation.
const MAX_CHAINS: usize = 8;

/// vhost-user request codes the seeds use.
pub mod req {
    /// GET_FEATURES.
    pub const GET_FEATURES: u8 = 1;
    /// SET_FEATURES.
    pub const SET_FEATURES: u8 = 2;
    /// SET_OWNER.
    pub const SET_OWNER: u8 = 3;
    /// SET_MEM_TABLE.
    pub const SET_MEM_TABLE: u8 = 5;
    /// SET_VRING_NUM.
    pub const SET_VRING_NUM: u8 = 8;
    /// SET_VRING_ADDR.
    pub const SET_VRING_ADDR: u8 = 9;
    /// SET_VRING_BASE.
    pub const SET_VRING_BASE: u8 = 10;
    /// GET_VRING_BASE.
    pub const GET_VRING_BASE: u8 = 11;
    /// SET_VRING_KICK.
    pub const SET_VRING_KICK: u8 = 12;
    /// SET_VRING_CALL.
    pub const SET_VRING_CALL: u8 = 13;
    /// GET_PROTOCOL_FEATURES.
    pub const GET_PROTOCOL_FEATURES: u8 = 15;
    /// SET_PROTOCOL_FEATURES.
    pub const SET_PROTOCOL_FEATURES: u8 = 16;
    /// SET_VRING_ENABLE.
    pub const SET_VRING_ENABLE: u8 = 18;
    /// GET_CONFIG.
    pub const GET_CONFIG: u8 = 24;
    /// SET_CONFIG.
    pub const SET_CONFIG: u8 = 25;
}

/// Descriptor kinds of a message's `fds` byte.
pub mod fd {
    /// An eventfd.
    pub const EVENTFD: u8 = 0;
    /// A 64 KiB memfd that can be sealed.
    pub const MEMFD: u8 = 1;
    /// A 64 KiB memfd created without sealing allowed.
    pub const UNSEALABLE: u8 = 2;
    /// `/dev/null`: not a regular file.
    pub const DEV_NULL: u8 = 3;
}

/// The harness's device: two queues; serves a few chains from the table whenever
/// it is started.
struct FuzzDevice {
    memory: VhostMemory,
    running: Vec<(u16, u16)>,
}

impl DeviceHandler for FuzzDevice {
    fn activate(
        &mut self,
        features: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.running.clear();
        for q in queues {
            let mut next = q.next_avail.unwrap_or(0);
            if let Ok(DeviceQueue { ring, memory }) =
                self.memory.open_queue(q.index, q.layout.size, q.addrs())
                && let Ok(dev) =
                    SplitDevice::new(q.layout.size, &ring, memory, Features::from_bits_retain(features))
            {
                let mut dev = dev.starting_at(next);
                serve(&mut dev);
                next = dev.next_avail();
            }
            self.running.push((q.index, next));
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.running.clear();
    }

    fn write_config(&mut self, _features: u64, offset: usize, _data: &[u8]) -> bool {
        offset == 1
    }
}

impl VhostUserDevice for FuzzDevice {
    fn lifecycle(&self) -> DeviceLifecycle {
        let offered = (Features::VERSION_1 | Features::EVENT_IDX | Features::INDIRECT_DESC).bits();
        DeviceLifecycle::new(
            2,
            offered,
            &[],
            ConfigSpace::new(vec![1, 2, 3, 4, 5, 6, 7, 8]),
            &[256, 256],
        )
    }

    fn stop_queues(&mut self) -> Vec<(u16, u16)> {
        std::mem::take(&mut self.running)
    }
}

/// Serves up to [`MAX_CHAINS`] chains: reads each readable byte and fills each
/// writable one, through the table. Accesses inside a chain must succeed (the ring
/// checked the segments against the table); errors are fine, panics are not.
fn serve<M: virtio_core::DeviceMemory>(dev: &mut SplitDevice<M>) {
    for _ in 0..MAX_CHAINS {
        let chain = match dev.pop() {
            Ok(Some(c)) => c,
            Ok(None) | Err(_) => return,
        };
        let mut buf = vec![0u8; 4096];
        let mut reader = chain.reader(dev.memory());
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        let fill = vec![0x5au8; chain.writable_len().min(4096) as usize];
        let mut writer = chain.writer(dev.memory());
        let written = writer.write(&fill).unwrap_or(0);
        let _ = dev.add_used(chain.head(), u32::try_from(written).unwrap_or(0));
    }
}

fn memfd(sealable: bool, image: &[u8]) -> Option<OwnedFd> {
    let flags = if sealable {
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING
    } else {
        MemfdFlags::CLOEXEC
    };
    let fd = rustix::fs::memfd_create("vio-fuzz", flags).ok()?;
    rustix::fs::ftruncate(&fd, MEMFD_LEN).ok()?;
    rustix::io::pwrite(&fd, image, 0).ok()?;
    Some(fd)
}

fn make_fd(kind: u8, image: &[u8]) -> Option<OwnedFd> {
    match kind {
        fd::EVENTFD => rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).ok(),
        fd::MEMFD => memfd(true, image),
        fd::UNSEALABLE => memfd(false, image),
        _ => File::open("/dev/null").ok().map(OwnedFd::from),
    }
}

/// Runs one input; panics only when an invariant is broken.
pub fn run(data: &[u8]) {
    report(data);
}

/// [`run`], returning the replies' request codes and bodies as hex, for the seed
/// tests.
pub fn report(data: &[u8]) -> Vec<String> {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut input = Bytes(data);
    let policy = MemoryPolicy {
        allow_unsealed: input.u8() & 1 != 0,
    };
    let image_len = usize::from(input.u16());
    let image = input.slice(image_len).to_vec();
    let memory = match VhostMemory::with_policy(policy) {
        Ok(m) => m,
        Err(_) => return Vec::new(),
    };
    let device = FuzzDevice {
        memory: memory.clone(),
        running: Vec::new(),
    };
    let path = std::env::temp_dir().join(format!(
        "vio-fuzz-session-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let daemon = Daemon::bind(&path, device, memory).expect("bind");
    let stop = daemon.stop_handle();
    let server = std::thread::spawn(move || daemon.run());
    let mut s = UnixStream::connect(&path).expect("connect");

    let mut msgs = 0;
    while !input.is_empty() && msgs < MAX_MESSAGES {
        msgs += 1;
        let request = u32::from(input.u8());
        let flags = u32::from(input.u8());
        let len = usize::from(input.u16() % 1024);
        let body = input.slice(len).to_vec();
        let fbits = input.u8();
        let fds: Vec<OwnedFd> = (0..fbits & 3)
            .filter_map(|i| make_fd((fbits >> (2 + 2 * i)) & 3, &image))
            .collect();
        let mut m = Vec::with_capacity(12 + body.len());
        // Bits 0-1 of `flags` XOR the version: 0 sends the valid version 1.
        let wire_flags = (flags & !3) | ((flags & 3) ^ 1);
        for w in [request, wire_flags, u32::try_from(body.len()).expect("short")] {
            m.extend(w.to_ne_bytes());
        }
        m.extend(&body);
        if !send(&s, &m, &fds) {
            break;
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    // Everything the daemon said, until it closes its end (its session ended).
    let mut replies = Vec::new();
    let _ = s.read_to_end(&mut replies);
    drop(s);
    stop.stop();
    let result = server.join().expect("the daemon panicked");
    let _ = std::fs::remove_file(&path);
    result.expect("accept failed");
    describe(&replies)
}

/// Sends one message with `fds`; `false` once the daemon hung up.
fn send(s: &UnixStream, msg: &[u8], fds: &[OwnedFd]) -> bool {
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return false;
    }
    let mut sent = 0;
    let mut first = true;
    while sent < msg.len() {
        let r = if first {
            sendmsg(
                s,
                &[IoSlice::new(&msg[sent..])],
                &mut control,
                SendFlags::NOSIGNAL,
            )
        } else {
            sendmsg(
                s,
                &[IoSlice::new(&msg[sent..])],
                &mut SendAncillaryBuffer::default(),
                SendFlags::NOSIGNAL,
            )
        };
        match r {
            Ok(0) | Err(_) => return false,
            Ok(n) => sent += n,
        }
        first = false;
    }
    true
}

/// The replies as `code:body-hex` lines (as far as they parse).
fn describe(mut bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while bytes.len() >= 12 {
        let word = |i: usize| u32::from_ne_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4"));
        let (code, size) = (word(0), word(2) as usize);
        let body = &bytes[12..(12 + size).min(bytes.len())];
        let hex: String = body.iter().map(|b| format!("{b:02x}")).collect();
        out.push(format!("{code}:{hex}"));
        bytes = &bytes[(12 + size).min(bytes.len())..];
    }
    out
}

fn msg(s: Seed, request: u8, flags: u8, body: &[u8], fds: u8) -> Seed {
    s.u8(request)
        .u8(flags)
        .u16(u16::try_from(body.len()).expect("short"))
        .bytes(body)
        .u8(fds)
}

/// One region's body: count, padding, then (gpa, size, user address, offset).
fn mem_table(regions: &[[u64; 4]]) -> Vec<u8> {
    let mut b = Seed::new().u32(u32::try_from(regions.len()).expect("few")).u32(0);
    for r in regions {
        for w in r {
            b = b.u64(*w);
        }
    }
    b.0
}

fn vring(index: u32, num: u32) -> Vec<u8> {
    Seed::new().u32(index).u32(num).0
}

/// A guest image with a one-descriptor chain in queue 0: table at 0x1000, avail at
/// 0x2000, used at 0x3000, a 64-byte writable buffer at 0x4000.
fn image() -> Vec<u8> {
    let mut img = vec![0u8; 0x4000];
    let desc = Seed::new().u64(0x4000).u32(64).u16(2).u16(0).0;
    img[0x1000..0x1010].copy_from_slice(&desc);
    // avail: flags 0, idx 1, ring[0] = 0.
    img[0x2000..0x2006].copy_from_slice(&[0, 0, 1, 0, 0, 0]);
    img
}

/// Policy byte and image.
fn prelude(policy: u8, img: &[u8]) -> Seed {
    Seed::new()
        .u8(policy)
        .u16(u16::try_from(img.len()).expect("short"))
        .bytes(img)
}

/// Negotiation: features (VERSION_1 | PROTOCOL_FEATURES), protocol features
/// (REPLY_ACK | CONFIG | MQ).
fn negotiate(s: Seed) -> Seed {
    let features = Features::VERSION_1.bits() | 1 << 30;
    let s = msg(s, req::GET_FEATURES, 0, &[], 0);
    let s = msg(s, req::SET_FEATURES, 0, &features.to_ne_bytes(), 0);
    let s = msg(s, req::GET_PROTOCOL_FEATURES, 0, &[], 0);
    let s = msg(
        s,
        req::SET_PROTOCOL_FEATURES,
        0,
        &(1u64 | 1 << 3 | 1 << 9).to_ne_bytes(),
        0,
    );
    msg(s, req::SET_OWNER, 0, &[], 0)
}

/// Ring 0 of size 8 at the image's addresses, started.
fn start_ring(s: Seed) -> Seed {
    let mut addr = Seed::new().u32(0).u32(0);
    for a in [0x1000u64, 0x3000, 0x2000, 0] {
        addr = addr.u64(a);
    }
    let s = msg(s, req::SET_VRING_NUM, 0, &vring(0, 8), 0);
    let s = msg(s, req::SET_VRING_ADDR, 0, &addr.0, 0);
    let s = msg(s, req::SET_VRING_BASE, 0, &vring(0, 0), 0);
    let s = msg(
        s,
        req::SET_VRING_KICK,
        0,
        &0u64.to_ne_bytes(),
        1 | fd::EVENTFD << 2,
    );
    let s = msg(
        s,
        req::SET_VRING_CALL,
        0,
        &0u64.to_ne_bytes(),
        1 | fd::EVENTFD << 2,
    );
    let s = msg(s, req::SET_VRING_ENABLE, 0, &vring(0, 1), 0);
    msg(s, req::GET_VRING_BASE, 0, &vring(0, 0), 0)
}

/// The seed corpus: `(name, input, text the report must contain)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let img = image();
    let one = |policy: u8, table: &[[u64; 4]], fds: u8| {
        let s = negotiate(prelude(policy, &img));
        let s = msg(s, req::SET_MEM_TABLE, 8, &mem_table(table), fds);
        start_ring(s).0
    };
    let region = [0u64, MEMFD_LEN, 0, 0];
    let memfd1 = 1 | fd::MEMFD << 2;
    vec![
        // The chain is served: GET_VRING_BASE reports position 1.
        ("served", one(0, &[region], memfd1), "11:0000000001000000"),
        // SET_MEM_TABLE acks 0 (NEED_REPLY set) when accepted...
        ("table-accepted", one(0, &[region], memfd1), "5:0000000000000000"),
        // ...and non-zero when refused: /dev/null is not a regular file (HOSTILE 35).
        (
            "35-dev-null",
            one(0, &[region], 1 | fd::DEV_NULL << 2),
            "5:0100000000000000",
        ),
        (
            "35-dev-null-allowed",
            one(1, &[region], 1 | fd::DEV_NULL << 2),
            "11:",
        ),
        (
            "35-unsealable",
            one(0, &[region], 1 | fd::UNSEALABLE << 2),
            "5:0100000000000000",
        ),
        (
            "35-unsealable-allowed",
            one(1, &[region], 1 | fd::UNSEALABLE << 2),
            "11:0000000001000000",
        ),
        (
            "38-eventfd-as-memory",
            one(0, &[region], 1 | fd::EVENTFD << 2),
            "5:0100000000000000",
        ),
        (
            "38-unaligned-offset",
            one(0, &[[0, 0x1001, 0x7000_0000, 0xfff]], memfd1),
            "5:",
        ),
        (
            "38-huge-size",
            one(0, &[[0, u64::MAX, 0, 0]], memfd1),
            "5:0100000000000000",
        ),
        (
            "38-wrapping-gpa",
            one(0, &[[u64::MAX - 0xfff, MEMFD_LEN, 0, 0]], memfd1),
            "5:0100000000000000",
        ),
        (
            "38-past-the-file",
            one(0, &[[0, MEMFD_LEN, 0, 0x1000]], memfd1),
            "5:0100000000000000",
        ),
        (
            "38-region-count-mismatch",
            one(0, &[region, [MEMFD_LEN, MEMFD_LEN, MEMFD_LEN, 0]], memfd1),
            "5:",
        ),
        (
            "38-get-vring-base-no-ring",
            msg(
                negotiate(prelude(0, &[])),
                req::GET_VRING_BASE,
                0,
                &vring(9, 0),
                0,
            )
            .0,
            "15:",
        ),
        (
            "38-config-out-of-range",
            msg(
                negotiate(prelude(0, &[])),
                req::GET_CONFIG,
                0,
                &Seed::new().u32(8).u32(4).u32(0).u32(0).0,
                0,
            )
            .0,
            "24:",
        ),
    ]
}
