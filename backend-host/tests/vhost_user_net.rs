//! The net device behind vhost-user sessions, driven the way QEMU drives a
//! vhost-user-net backend: data queues only, no control queue, and restarts while
//! frames flow. Two sessions, each a port of one switch, each guest's memory a memfd
//! the test reads and writes with pread/pwrite (the device maps it as a frontend's
//! memory table).
//!
//! Checked: a frame transmitted on one port lands in the other's receive buffer; a
//! restart (a new call eventfd) keeps the port on the switch and the MAC it learnt
//! there; GET_VRING_BASE reports where each ring stopped (receive queue 0 and
//! transmit queue 1 of pair 0 separately); a ring set up again at that position
//! resumes there, its used index continuing without a gap.

use backend_host::net::{NetDevice, NetSettings, PortId, Switch, SwitchConfig};
use backend_host::vhost_user::{Session, VhostMemory};
use rustix::fs::MemfdFlags;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vhost::vhost_user::message::{VhostUserMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags};
use virtio_core::features::Features;
use virtio_core::notify::{EventFdNotifier, Notify};

/// Guest memory of each session.
const MEM: u64 = 1 << 20;
/// Where the frontend has guest memory mapped (its "user address").
const FRONTEND_VA: u64 = 0x7000_0000;
/// Ring size.
const SIZE: u16 = 256;
/// Receive buffers start here, one 4 KiB page each.
const BUFS: u64 = 0x4_0000;
/// Size of a virtio-net header with VERSION_1 (§5.1.6).
const HDR: usize = 12;
/// Longest a frame may take to arrive.
const TIMEOUT: Duration = Duration::from_secs(10);
/// VIRTQ_DESC_F_WRITE.
const WRITE: u16 = 2;

/// One frontend: its session, its memory, and the kick eventfds it signals.
struct Frontend {
    session: Session<NetDevice<VhostMemory>>,
    port: PortId,
    mem: File,
    kicks: Vec<EventFdNotifier>,
}

fn ring_base(q: u16) -> u64 {
    u64::from(q) * 0x8000
}

fn eventfd() -> (EventFdNotifier, File) {
    let e = EventFdNotifier::new().unwrap();
    let file = File::from(e.try_clone().unwrap().into_owned_fd());
    (e, file)
}

impl Frontend {
    fn new(switch: &Arc<Switch>) -> Frontend {
        let memory = VhostMemory::new();
        let device = NetDevice::new(memory.clone(), switch, NetSettings::default()).unwrap();
        let port = device.port();
        let mut session = Session::new(device, memory);
        // What QEMU passes on: ring and frame features, never CTRL_VQ, MAC or STATUS.
        let features = Features::VERSION_1.bits() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        session.set_features(features).unwrap();
        let fd = rustix::fs::memfd_create(
            "vhost-user-net-test",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .unwrap();
        rustix::fs::ftruncate(&fd, MEM).unwrap();
        let mem = File::from(fd);
        let region = VhostUserMemoryRegion::new(0, MEM, FRONTEND_VA, 0);
        session
            .set_mem_table(&[region], vec![mem.try_clone().unwrap()], None)
            .unwrap();
        let mut f = Frontend {
            session,
            port,
            mem,
            kicks: Vec::new(),
        };
        for q in 0..2 {
            f.start_ring(q, 0);
        }
        f
    }

    /// SET_VRING_NUM/ADDR/BASE/CALL/KICK and enable, as QEMU starts a ring.
    fn start_ring(&mut self, q: u16, base: u16) {
        let va = FRONTEND_VA + ring_base(q);
        let s = &mut self.session;
        s.set_vring_num(q.into(), SIZE.into()).unwrap();
        s.set_vring_addr(
            q.into(),
            VhostUserVringAddrFlags::empty(),
            va,
            va + 0x2000,
            va + 0x1000,
            0,
        )
        .unwrap();
        s.set_vring_base(q.into(), base.into()).unwrap();
        s.set_vring_call(u8::try_from(q).unwrap(), Some(eventfd().1))
            .unwrap();
        let (kick, file) = eventfd();
        s.set_vring_kick(u8::try_from(q).unwrap(), Some(file)).unwrap();
        s.set_vring_enable(q.into(), true).unwrap();
        if self.kicks.len() <= usize::from(q) {
            self.kicks.resize_with(usize::from(q) + 1, || eventfd().0);
        }
        self.kicks[usize::from(q)] = kick;
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem.write_all_at(bytes, gpa).unwrap();
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        let mut b = [0; 2];
        self.mem.read_exact_at(&mut b, gpa).unwrap();
        u16::from_le_bytes(b)
    }

    /// Descriptor `i` of queue `q` as one buffer, made available at `pos`.
    fn offer(&self, q: u16, pos: u16, i: u16, addr: u64, len: u32, flags: u16) {
        let base = ring_base(q);
        let mut d = addr.to_le_bytes().to_vec();
        d.extend(len.to_le_bytes());
        d.extend(flags.to_le_bytes());
        d.extend(0u16.to_le_bytes());
        self.write(base + u64::from(i) * 16, &d);
        self.write(base + 0x1000 + 4 + 2 * u64::from(pos % SIZE), &i.to_le_bytes());
        // avail.idx last: the device reads the entry only after it sees the index.
        self.write(base + 0x1000 + 2, &pos.wrapping_add(1).to_le_bytes());
        self.kicks[usize::from(q)].notify().unwrap();
    }

    fn used_idx(&self, q: u16) -> u16 {
        self.read_u16(ring_base(q) + 0x2000 + 2)
    }

    /// The used element at `pos` of queue `q`: `(id, len)`.
    fn used(&self, q: u16, pos: u16) -> (u32, u32) {
        let mut b = [0; 8];
        let at = ring_base(q) + 0x2000 + 4 + 8 * u64::from(pos % SIZE);
        self.mem.read_exact_at(&mut b, at).unwrap();
        let (id, len) = b.split_at(4);
        (
            u32::from_le_bytes(id.try_into().unwrap()),
            u32::from_le_bytes(len.try_into().unwrap()),
        )
    }

    fn wait_used(&self, q: u16, idx: u16) {
        let deadline = Instant::now() + TIMEOUT;
        while self.used_idx(q) != idx {
            assert!(
                Instant::now() < deadline,
                "queue {q}: used.idx {} never reached {idx}",
                self.used_idx(q)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Transmits `frame` (header prepended) from descriptor `pos` at position `pos`.
    fn transmit(&self, pos: u16, frame: &[u8]) {
        let addr = 0x2_0000 + u64::from(pos) * 0x800;
        let mut buf = vec![0u8; HDR];
        buf.extend_from_slice(frame);
        self.write(addr, &buf);
        self.offer(1, pos, pos, addr, u32::try_from(buf.len()).unwrap(), 0);
    }
}

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0xa, 1];

fn frame(n: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(MAC_A);
    f.extend([0x88, 0xb5]);
    f.extend(std::iter::repeat_n(n, 46));
    f
}

#[test]
fn restarts_keep_the_port_and_rings_resume_where_they_stopped() {
    let switch = Switch::new(SwitchConfig::default());
    let mut a = Frontend::new(&switch);
    let mut b = Frontend::new(&switch);
    // B posts two receive buffers, descriptors 0 and 1.
    for i in 0..2 {
        b.offer(0, i, i, BUFS + u64::from(i) * 0x1000, 2048, WRITE);
    }

    a.transmit(0, &frame(1));
    a.wait_used(1, 1);
    b.wait_used(0, 1);
    let (id, len) = b.used(0, 0);
    assert_eq!(
        (id, len as usize),
        (0, HDR + 60),
        "B's first buffer holds the frame"
    );
    let mut got = vec![0; 60];
    b.mem.read_exact_at(&mut got, BUFS + HDR as u64).unwrap();
    assert_eq!(got, frame(1));
    assert_eq!(switch.lookup(MAC_A), Some(a.port));

    // A new call eventfd on a running ring restarts A's device.
    a.session.set_vring_call(0, Some(eventfd().1)).unwrap();
    assert_eq!(
        switch.lookup(MAC_A),
        Some(a.port),
        "the learnt MAC survives a restart"
    );
    assert!(switch.stats(a.port).is_some(), "the port stays attached");

    // B's receive ring stops where it took one buffer of two; its transmit ring
    // never moved.
    // VhostUserVringState is packed: its field is copied out, never referenced.
    let stopped_at = |f: &mut Frontend, q: u32| -> u32 { f.session.get_vring_base(q).unwrap().num };
    assert_eq!(stopped_at(&mut b, 0), 1);
    assert_eq!(stopped_at(&mut b, 1), 0);
    assert_eq!(stopped_at(&mut a, 1), 1);
    b.start_ring(1, 0);
    b.start_ring(0, 1);
    a.start_ring(1, 1);

    // The next frame goes to B's second buffer, the used index going on from 1.
    a.transmit(1, &frame(2));
    a.wait_used(1, 2);
    b.wait_used(0, 2);
    assert_eq!(b.used(0, 1), (1, u32::try_from(HDR + 60).unwrap()));
    b.mem.read_exact_at(&mut got, BUFS + 0x1000 + HDR as u64).unwrap();
    assert_eq!(got, frame(2));
    let st = switch.stats(b.port).unwrap();
    assert_eq!((st.rx_frames, st.drops.total()), (2, 0), "{st:?}");
    assert_eq!(switch.stats(a.port).unwrap().tx_frames, 2);
}
