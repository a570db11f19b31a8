//! The daemon over a real socket, driven by a frontend written here message by
//! message: what a session survives and what ends it.

use super::memory::MemoryPolicy;
use super::server::tests::{Fake, fake};
use super::*;
use rustix::fs::MemfdFlags;
use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use virtio_core::{DescSlot, DeviceMemory, Segment};

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const GET_VRING_BASE: u32 = 11;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const VERSION: u32 = 1;
const NEED_REPLY: u32 = 1 << 3;
const REPLY_ACK: u64 = 1 << 3;
const CONFIG: u64 = 1 << 9;

/// A daemon serving a fake device on its own thread; stopped on drop.
struct Running {
    stop: StopHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: PathBuf,
}

impl Running {
    fn start(name: &str, memory: VhostMemory) -> Running {
        let socket = std::env::temp_dir().join(format!("vio-daemon-{name}-{}.sock", std::process::id()));
        let (device, _log) = fake();
        let daemon: Daemon<Fake> = Daemon::bind(&socket, device, memory).unwrap();
        let stop = daemon.stop_handle();
        let thread = std::thread::spawn(move || daemon.run().unwrap());
        Running {
            stop,
            thread: Some(thread),
            socket,
        }
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.socket).unwrap();
        // A guard against a hang, not a measurement: every reply comes at once.
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        s
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn message(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    for w in [request, VERSION | flags, u32::try_from(body.len()).unwrap()] {
        m.extend_from_slice(&w.to_ne_bytes());
    }
    m.extend_from_slice(body);
    m
}

fn send(s: &mut UnixStream, request: u32, flags: u32, body: &[u8]) {
    s.write_all(&message(request, flags, body)).unwrap();
}

/// The next reply's body, or `None` if the daemon closed the connection.
fn reply(s: &mut UnixStream, request: u32) -> Option<Vec<u8>> {
    let mut head = [0u8; 12];
    match s.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
        Err(e) => panic!("no reply to request {request}: {e}"),
    }
    let word = |at: usize| u32::from_ne_bytes(head[at..at + 4].try_into().unwrap());
    assert_eq!(word(0), request);
    let mut body = vec![0u8; word(8) as usize];
    s.read_exact(&mut body).unwrap();
    Some(body)
}

fn u64_reply(s: &mut UnixStream, request: u32) -> Option<u64> {
    reply(s, request).map(|b| u64::from_ne_bytes(b[..8].try_into().unwrap()))
}

fn config(offset: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for w in [offset, u32::try_from(payload.len()).unwrap(), 0] {
        b.extend_from_slice(&w.to_ne_bytes());
    }
    b.extend_from_slice(payload);
    b
}

fn closed(s: &mut UnixStream) -> bool {
    matches!(s.read(&mut [0u8; 1]), Ok(0))
}

/// HOSTILE 38: a request the session refuses gets a failure reply where the
/// protocol has one, and the session goes on (a guest writing an unwritable
/// configuration field must not cost it its device). A refusal that cannot be
/// answered (GET_VRING_BASE of a ring that does not exist) ends it.
#[test]
fn a_refused_request_gets_an_error_reply_and_the_session_goes_on() {
    let daemon = Running::start("refusals", VhostMemory::new());
    let mut s = daemon.connect();
    send(&mut s, GET_FEATURES, 0, &[]);
    let offered = u64_reply(&mut s, GET_FEATURES).unwrap();
    send(&mut s, SET_FEATURES, 0, &offered.to_ne_bytes());
    send(&mut s, GET_PROTOCOL_FEATURES, 0, &[]);
    let protocol = u64_reply(&mut s, GET_PROTOCOL_FEATURES).unwrap();
    assert_eq!(protocol & (REPLY_ACK | CONFIG), REPLY_ACK | CONFIG);
    send(
        &mut s,
        SET_PROTOCOL_FEATURES,
        0,
        &(REPLY_ACK | CONFIG).to_ne_bytes(),
    );
    // The fake device refuses writes to configuration byte 2.
    send(&mut s, SET_CONFIG, NEED_REPLY, &config(2, &[9]));
    assert_ne!(u64_reply(&mut s, SET_CONFIG), Some(0), "a failure ack");
    // Unoffered features, without an ack asked for: refused silently.
    send(&mut s, SET_FEATURES, 0, &(offered | 1 << 5).to_ne_bytes());
    send(&mut s, SET_CONFIG, NEED_REPLY, &config(1, &[7]));
    assert_eq!(u64_reply(&mut s, SET_CONFIG), Some(0), "the session went on");
    send(&mut s, GET_CONFIG, 0, &config(0, &[0; 4]));
    let body = reply(&mut s, GET_CONFIG).expect("the session went on");
    assert_eq!(body[12..], [1, 7, 3, 4]);
    // GET_VRING_BASE's reply has no room for a refusal: the frontend would wait
    // for ever, so the connection ends.
    send(&mut s, GET_VRING_BASE, 0, &[9, 0, 0, 0, 0, 0, 0, 0]);
    assert!(reply(&mut s, GET_VRING_BASE).is_none());
}

/// SET_MEM_TABLE of one region: guest-physical 0..`len` from `file`.
fn set_mem_table(s: &UnixStream, file: &File, len: u64) {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    let mut body = Vec::new();
    body.extend_from_slice(&1u32.to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    for w in [0, len, 0x7000_0000, 0] {
        body.extend_from_slice(&u64::to_ne_bytes(w));
    }
    let msg = message(SET_MEM_TABLE, 0, &body);
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    let fds = [file.as_fd()];
    assert!(ancillary.push(SendAncillaryMessage::ScmRights(&fds)));
    let n = sendmsg(s, &[IoSlice::new(&msg)], &mut ancillary, SendFlags::empty()).unwrap();
    assert_eq!(n, msg.len());
}

/// HOSTILE 35: with unsealed memory allowed by the operator, a frontend that
/// shrinks its memory file under the daemon loses its own session (the access
/// reads zeros instead of raising a fatal SIGBUS), and the daemon's other
/// sessions, in the same process, keep serving.
#[test]
fn a_shrunk_memory_file_ends_only_its_own_session() {
    const LEN: u64 = 0x4000;
    let policy = MemoryPolicy { allow_unsealed: true };
    let (mem1, mem2) = (
        VhostMemory::with_policy(policy).unwrap(),
        VhostMemory::with_policy(policy).unwrap(),
    );
    let (d1, d2) = (
        Running::start("sigbus-1", mem1.clone()),
        Running::start("sigbus-2", mem2.clone()),
    );
    let (mut s1, mut s2) = (d1.connect(), d2.connect());
    let unsealable = || {
        let fd = rustix::fs::memfd_create("unsealed", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, LEN).unwrap();
        File::from(fd)
    };
    let (f1, f2) = (unsealable(), unsealable());
    f1.write_all_at(b"one", 0x3000).unwrap();
    f2.write_all_at(b"two", 0x3000).unwrap();
    for (s, f) in [(&mut s1, &f1), (&mut s2, &f2)] {
        set_mem_table(s, f, LEN);
        // A reply after the table: it was handled.
        send(s, GET_FEATURES, 0, &[]);
        u64_reply(s, GET_FEATURES).unwrap();
    }
    let (m1, m2) = (mem1.access().unwrap(), mem2.access().unwrap());
    let seg = Segment::new(0x3000, 3, false, 0, DescSlot::Table(0));
    let mut got = [0u8; 3];
    m1.read(&seg, 0, &mut got).unwrap();
    assert_eq!(&got, b"one");
    // The frontend of session 1 cuts its file; the device's next access faults.
    rustix::fs::ftruncate(&f1, 0).unwrap();
    m1.read(&seg, 0, &mut got).unwrap();
    assert_eq!(got, [0; 3], "the faulting mapping reads as zeros");
    assert!(closed(&mut s1), "session 1 was ended");
    // Session 2 is untouched.
    m2.read(&seg, 0, &mut got).unwrap();
    assert_eq!(&got, b"two");
    send(&mut s2, GET_FEATURES, 0, &[]);
    assert!(u64_reply(&mut s2, GET_FEATURES).is_some(), "session 2 goes on");
}

/// A socket path that names a file of another kind (an image given as `--socket`
/// by mistake) is refused and the file left as it was; a stale socket is replaced.
#[test]
fn binding_never_removes_a_file_that_is_not_a_socket() {
    let dir = std::env::temp_dir().join(format!("vio-daemon-bind-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.img");
    std::fs::write(&image, b"the guest's data").unwrap();
    let (device, _log) = fake();
    assert!(Daemon::bind(&image, device, VhostMemory::new()).is_err());
    assert_eq!(std::fs::read(&image).unwrap(), b"the guest's data");
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let (device, _log) = fake();
    let daemon = Daemon::bind(&stale, device, VhostMemory::new()).expect("a stale socket is replaced");
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
