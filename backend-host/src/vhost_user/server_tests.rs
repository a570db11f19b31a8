//! The session's bookkeeping against a device that records what it is asked.

use super::*;
use crate::vhost_user::memory::MAX_REGIONS;
use rustix::fs::MemfdFlags;
use std::sync::{Arc, Mutex};
use virtio_core::config::ConfigSpace;

/// What the fake device saw: each activation's `(queue, next_avail)` pairs.
#[derive(Default, Debug)]
pub(crate) struct Log {
    pub(crate) activations: Vec<Vec<(u16, u16)>>,
    /// Each activation's queues that came with an inflight region.
    inflight: Vec<Vec<u16>>,
    stops: usize,
    resets: usize,
    config_writes: Vec<(usize, Vec<u8>)>,
}

/// Serves nothing; every stop reports each running queue 3 positions further on.
pub(crate) struct Fake {
    log: Arc<Mutex<Log>>,
    running: Vec<(u16, u16)>,
    /// Offers VIRTIO_F_RING_PACKED too.
    packed: bool,
}

impl DeviceHandler for Fake {
    fn activate(
        &mut self,
        _features: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.running = queues
            .iter()
            .map(|q| (q.index, q.next_avail.unwrap_or(0)))
            .collect();
        let mut log = self.log.lock().unwrap();
        log.activations.push(self.running.clone());
        log.inflight.push(
            queues
                .iter()
                .filter(|q| q.inflight.is_some())
                .map(|q| q.index)
                .collect(),
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.running.clear();
        self.log.lock().unwrap().resets += 1;
    }

    fn write_config(&mut self, _features: u64, offset: usize, data: &[u8]) -> bool {
        self.log
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
        offset == 1
    }
}

impl VhostUserDevice for Fake {
    fn lifecycle(&self) -> DeviceLifecycle {
        let mut offered = (Features::VERSION_1 | Features::EVENT_IDX).bits();
        if self.packed {
            offered |= Features::RING_PACKED.bits();
        }
        DeviceLifecycle::new(2, offered, &[], ConfigSpace::new(vec![1, 2, 3, 4]), &[256, 256])
    }

    fn stop_queues(&mut self) -> Vec<(u16, u16)> {
        self.log.lock().unwrap().stops += 1;
        self.running
            .drain(..)
            .map(|(q, pos)| (q, pos.wrapping_add(3)))
            .collect()
    }
}

const PF: u64 = 1 << 30;

pub(crate) fn session() -> (Session<Fake>, Arc<Mutex<Log>>) {
    let (fake, log) = fake();
    (Session::new(fake, VhostMemory::new()), log)
}

/// A device that serves nothing; config space `[1, 2, 3, 4]`, of which it lets
/// only byte 1 be written; two rings.
pub(crate) fn fake() -> (Fake, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let fake = Fake {
        log: log.clone(),
        running: Vec::new(),
        packed: false,
    };
    (fake, log)
}

fn memfd(len: u64) -> File {
    let fd =
        rustix::fs::memfd_create("session-test", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    File::from(fd)
}

fn eventfd_file() -> Option<File> {
    Some(File::from(EventFdNotifier::new().unwrap().into_owned_fd()))
}

/// Guest memory 0..64 KiB, which the frontend sees at 0x7000_0000.
fn with_memory(s: &mut Session<Fake>) {
    let region = VhostUserMemoryRegion::new(0, 0x1_0000, 0x7000_0000, 0);
    s.set_mem_table(&[region], vec![memfd(0x1_0000)], None).unwrap();
}

/// Ring `i` at its own 16 KiB of guest memory, given in frontend addresses.
fn configure(s: &mut Session<Fake>, i: u32) {
    let base = 0x7000_0000 + u64::from(i) * 0x4000;
    s.set_vring_num(i, 256).unwrap();
    s.set_vring_addr(
        i,
        VhostUserVringAddrFlags::empty(),
        base,
        base + 0x2000,
        base + 0x1000,
        0,
    )
    .unwrap();
    s.set_vring_call(u8::try_from(i).unwrap(), eventfd_file())
        .unwrap();
    s.set_vring_kick(u8::try_from(i).unwrap(), eventfd_file())
        .unwrap();
}

/// Packed rings over vhost-user (vhost-user spec, "Starting and stopping rings"):
/// sizes need not be powers of two, a ring base carries the available position and
/// its wrap counter in bits 0-15 and the used ones in bits 16-31, and a fresh ring
/// starts at slot 0 with wrap counter 1.
#[test]
fn packed_ring_sizes_and_bases_use_the_packed_encoding() {
    let (fake, log) = fake();
    let mut s = Session::new(Fake { packed: true, ..fake }, VhostMemory::new());
    s.set_features((Features::VERSION_1 | Features::RING_PACKED).bits())
        .unwrap();
    s.set_vring_num(0, 100).unwrap();
    assert!(s.set_vring_num(0, 0).is_err());
    let at: u16 = 0x8000 | 7;
    let base = u32::from(at);
    assert!(
        s.set_vring_base(0, base | (5 << 16)).is_err(),
        "used and available positions must agree: nothing is in flight between devices"
    );
    s.set_vring_base(0, base | (base << 16)).unwrap();
    with_memory(&mut s);
    configure(&mut s, 0);
    assert_eq!(log.lock().unwrap().activations, vec![vec![(0, at)]]);
    // Stopping returns the position the device reached (the fake moves 3), in both
    // halves.
    let state = s.get_vring_base(0).unwrap();
    let end = base + 3;
    assert_eq!({ state.num }, end | (end << 16));
    // A ring never started reports the packed start: slot 0, wrap counter 1.
    let state = s.get_vring_base(1).unwrap();
    assert_eq!({ state.num }, 0x8000 | (0x8000 << 16));
}

#[test]
fn features_must_be_offered_and_include_version_1() {
    let (mut s, _) = session();
    let offered = s.get_features().unwrap();
    assert_ne!(offered & PF, 0, "protocol features are offered");
    assert!(s.set_features(offered | (1 << 5)).is_err(), "an unoffered bit");
    assert!(s.set_features(PF).is_err(), "no VERSION_1");
    s.set_features(offered).unwrap();
    assert!(
        s.set_protocol_features(1 << 1).is_err(),
        "LOG_SHMFD is not offered"
    );
    s.set_protocol_features((implemented_protocol() | VhostUserProtocolFeatures::REPLY_ACK).bits())
        .unwrap();
    assert_eq!(s.get_queue_num().unwrap(), 2);
}

#[test]
fn ring_parameters_are_checked() {
    let (mut s, _) = session();
    assert!(s.set_vring_num(2, 256).is_err(), "no ring 2");
    assert!(s.set_vring_num(0, 100).is_err(), "not a power of two");
    assert!(s.set_vring_num(0, 512).is_err(), "above the maximum");
    assert!(s.set_vring_num(0, 0).is_err());
    s.set_vring_num(0, 256).unwrap();
    assert!(
        s.set_vring_base(0, 0x1_0000).is_err(),
        "a split ring index is 16 bits"
    );
    assert!(s.set_vring_kick(9, eventfd_file()).is_err());
    assert!(s.get_vring_base(7).is_err());
}

#[test]
fn with_protocol_features_rings_start_only_when_enabled() {
    let (mut s, log) = session();
    let offered = s.get_features().unwrap();
    s.set_features(offered).unwrap();
    with_memory(&mut s);
    configure(&mut s, 0);
    configure(&mut s, 1);
    assert!(log.lock().unwrap().activations.is_empty(), "rings start disabled");
    s.set_vring_enable(0, true).unwrap();
    s.set_vring_enable(1, true).unwrap();
    let log = log.lock().unwrap();
    assert_eq!(log.activations, vec![vec![(0, 0)], vec![(0, 3), (1, 0)]]);
    assert_eq!(log.stops, 1, "adding a ring restarted the device once");
}

#[test]
fn without_protocol_features_a_kick_starts_the_ring() {
    let (mut s, log) = session();
    s.set_features(Features::VERSION_1.bits()).unwrap();
    with_memory(&mut s);
    s.set_vring_base(0, 40).unwrap();
    configure(&mut s, 0);
    assert_eq!(log.lock().unwrap().activations, vec![vec![(0, 40)]]);
}

#[test]
fn get_vring_base_stops_the_ring_where_the_device_stopped() {
    let (mut s, log) = session();
    let offered = s.get_features().unwrap();
    s.set_features(offered).unwrap();
    with_memory(&mut s);
    for i in 0..2 {
        s.set_vring_base(i, 10).unwrap();
        configure(&mut s, i);
        s.set_vring_enable(i, true).unwrap();
    }
    assert!(s.set_vring_num(0, 128).is_err(), "a running ring keeps its size");
    // Each stop moves a running ring on by 3 (the fake's "progress"). Ring 0 was
    // restarted once when ring 1 joined (10 -> 13), then stops (-> 16).
    let state = s.get_vring_base(0).unwrap();
    assert_eq!({ state.num }, 16);
    // Ring 1 goes on alone from where it stopped.
    assert_eq!(log.lock().unwrap().activations.last().unwrap(), &vec![(1, 13)]);
    // Ring 0 starts again only with a new kick and enable.
    s.set_vring_base(0, 16).unwrap();
    s.set_vring_kick(0, eventfd_file()).unwrap();
    assert_eq!(log.lock().unwrap().activations.last().unwrap(), &vec![(1, 13)]);
    s.set_vring_enable(0, true).unwrap();
    assert_eq!(
        log.lock().unwrap().activations.last().unwrap(),
        &vec![(0, 16), (1, 16)]
    );
}

#[test]
fn rings_outside_the_memory_table_do_not_start() {
    let (mut s, log) = session();
    s.set_features(Features::VERSION_1.bits()).unwrap();
    configure(&mut s, 0);
    assert!(log.lock().unwrap().activations.is_empty(), "no memory table yet");
    s.set_vring_addr(1, VhostUserVringAddrFlags::empty(), 0x100, 0x200, 0x300, 0)
        .unwrap();
    with_memory(&mut s);
    assert_eq!(
        log.lock().unwrap().activations,
        vec![vec![(0, 0)]],
        "the table restarts ring 0"
    );
    s.set_vring_num(1, 256).unwrap();
    s.set_vring_kick(1, eventfd_file()).unwrap();
    // Ring 1's addresses are in no region: it is left out, and ring 0 goes on
    // without a restart.
    assert_eq!(log.lock().unwrap().activations, vec![vec![(0, 0)]]);
}

#[test]
fn a_new_call_eventfd_restarts_a_running_ring_where_it_was() {
    let (mut s, log) = session();
    s.set_features(Features::VERSION_1.bits()).unwrap();
    with_memory(&mut s);
    configure(&mut s, 0);
    s.set_vring_call(0, eventfd_file()).unwrap();
    assert_eq!(log.lock().unwrap().activations, vec![vec![(0, 0)], vec![(0, 3)]]);
}

#[test]
fn a_bad_memory_table_is_refused() {
    let (mut s, _) = session();
    let region = VhostUserMemoryRegion::new(0, 0x2000, 0, 0);
    assert!(
        s.set_mem_table(&[region], vec![memfd(0x1000)], None).is_err(),
        "file too small"
    );
    let many = vec![VhostUserMemoryRegion::new(0, 0x1000, 0, 0); MAX_REGIONS + 1];
    let files = (0..=MAX_REGIONS).map(|_| memfd(0x1000)).collect();
    assert!(s.set_mem_table(&many, files, None).is_err());
}

#[test]
fn configuration_reads_are_bounded_and_writes_go_through_the_device() {
    let (mut s, log) = session();
    let flags = VhostUserConfigFlags::WRITABLE;
    assert_eq!(s.get_config(1, 2, flags).unwrap(), vec![2, 3]);
    assert!(s.get_config(3, 2, flags).is_err());
    assert!(s.get_config(u32::MAX, 2, flags).is_err());
    s.set_config(1, &[9], flags).unwrap();
    assert_eq!(s.get_config(0, 4, flags).unwrap(), vec![1, 9, 3, 4]);
    assert!(
        s.set_config(2, &[9], flags).is_err(),
        "the device refuses offset 2"
    );
    assert_eq!(log.lock().unwrap().config_writes.len(), 2);
}

#[test]
fn the_end_of_a_session_stops_resets_and_forgets() {
    let (mut s, log) = session();
    s.set_features(Features::VERSION_1.bits()).unwrap();
    with_memory(&mut s);
    configure(&mut s, 0);
    s.end();
    {
        let log = log.lock().unwrap();
        assert_eq!((log.stops, log.resets), (1, 1));
    }
    assert!(s.memory.table().is_none());
    // A new frontend starts from position 0 with nothing remembered.
    s.set_features(Features::VERSION_1.bits()).unwrap();
    with_memory(&mut s);
    configure(&mut s, 0);
    assert_eq!(log.lock().unwrap().activations.last().unwrap(), &vec![(0, 0)]);
}

/// HOSTILE 38: a kick, call or error descriptor that is not an eventfd (a pipe
/// whose writer closed reads as ready for ever) is refused.
#[test]
fn ring_descriptors_must_be_eventfds() {
    let (mut s, _) = session();
    let pipe = || {
        let (r, _w) = std::io::pipe().unwrap();
        Some(File::from(OwnedFd::from(r)))
    };
    assert!(s.set_vring_kick(0, pipe()).is_err(), "a pipe as kick");
    assert!(
        s.set_vring_call(0, Some(memfd(0x1000))).is_err(),
        "a memfd as call"
    );
    assert!(s.set_vring_err(0, pipe()).is_err(), "a pipe as err");
    s.set_vring_kick(0, eventfd_file()).unwrap();
    s.set_vring_call(0, eventfd_file()).unwrap();
    s.set_vring_err(0, eventfd_file()).unwrap();
    s.set_vring_call(0, None).unwrap();
}

/// INFLIGHT_SHMFD: a buffer made on GET_INFLIGHT_FD reaches every ring it covers
/// when the device starts, and one handed back on SET_INFLIGHT_FD (a daemon
/// restarted under the same frontend) does too. Without the protocol feature both
/// requests are refused.
#[test]
fn the_inflight_buffer_reaches_the_rings_it_covers() {
    let (mut s, log) = session();
    let offered = s.get_features().unwrap();
    s.set_features(offered).unwrap();
    assert!(
        s.get_inflight_fd(&crate::vhost_user::inflight::tests::desc(2, 256))
            .is_err(),
        "INFLIGHT_SHMFD not negotiated"
    );
    s.set_protocol_features((implemented_protocol() | VhostUserProtocolFeatures::REPLY_ACK).bits())
        .unwrap();
    assert!(
        s.get_inflight_fd(&crate::vhost_user::inflight::tests::desc(3, 256))
            .is_err(),
        "the device has 2 rings"
    );
    let (reply, file) = s
        .get_inflight_fd(&crate::vhost_user::inflight::tests::desc(1, 256))
        .unwrap();
    assert!(reply.mmap_size >= 16 + 16 * 256);
    with_memory(&mut s);
    configure(&mut s, 0);
    configure(&mut s, 1);
    s.set_vring_enable(0, true).unwrap();
    s.set_vring_enable(1, true).unwrap();
    let last = log.lock().unwrap().inflight.last().cloned();
    assert_eq!(last, Some(vec![0]), "only ring 0 is covered");

    // The next daemon gets the same buffer back.
    let (mut s, log) = session();
    s.set_features(offered).unwrap();
    s.set_protocol_features((implemented_protocol() | VhostUserProtocolFeatures::REPLY_ACK).bits())
        .unwrap();
    s.set_inflight_fd(&reply, file).unwrap();
    with_memory(&mut s);
    configure(&mut s, 0);
    s.set_vring_enable(0, true).unwrap();
    assert_eq!(log.lock().unwrap().inflight.last(), Some(&vec![0]));

    // Over packed rings the buffer is laid out for them: larger per queue.
    let (fake, _) = fake();
    let mut s = Session::new(Fake { packed: true, ..fake }, VhostMemory::new());
    s.set_features((Features::VERSION_1 | Features::RING_PACKED).bits() | PF)
        .unwrap();
    s.set_protocol_features(implemented_protocol().bits()).unwrap();
    let (packed, _) = s
        .get_inflight_fd(&crate::vhost_user::inflight::tests::desc(2, 256))
        .unwrap();
    assert!(packed.mmap_size >= 2 * (32 + 40 * 256));
}
