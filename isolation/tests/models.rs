//! HOSTILE 39, per model: the device half in its own process, a real virtqueue round
//! trip through it, then a hostile device process that tries to reach beyond what it
//! was given and faults or is refused, while the guest's data stays intact.

// Test sizes are small.
#![allow(clippy::cast_possible_truncation)]

use hypervisor::{Domain, Hypervisor};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use transport_shared_page::{SharedPageConfig, SharedPageDriver, pair_for_process};
use vio_isolation::owner::killed_by;
use vio_isolation::wire::{Attack, Finding, Reply, Request, Setup};
use vio_isolation::{DeviceProcess, OwnerError};
use virtio_core::features::Features;
use virtio_core::{DriverModel, DriverQueue, DriverShare, GuestBuf, SplitDriver};

const SIZE: u16 = 8;
const SIGBUS: i32 = 7;
const SECRET: &[u8] = b"the guest's secret, outside what the device was given";

fn features() -> Features {
    Features::VERSION_1
}

fn device() -> DeviceProcess {
    DeviceProcess::spawn(Path::new(env!("CARGO_BIN_EXE_vio-isolation-device"))).unwrap()
}

fn open<S: DriverShare>(dev: &DeviceProcess, q: &DriverQueue<S>) -> Result<Reply, OwnerError> {
    dev.call(
        &Request::Open {
            index: 0,
            size: SIZE,
            desc: q.addrs.desc,
            avail: q.addrs.avail,
            used: q.addrs.used,
            features: features().bits(),
        },
        &[],
    )
}

/// One request through the device process: "hello ..." in, "HELLO ..." out.
fn round_trip<S: DriverShare>(
    guest: &Domain,
    dev: &DeviceProcess,
    driver: &mut SplitDriver<S, &'static str>,
) {
    round_trip_with(guest, driver, || {
        dev.call(&Request::Kick { index: 0 }, &[]).unwrap()
    });
}

/// As [`round_trip`], notifying the device with `kick`.
fn round_trip_with<S: DriverShare>(
    guest: &Domain,
    driver: &mut SplitDriver<S, &'static str>,
    kick: impl Fn() -> Reply,
) {
    let mem = guest.memory();
    let msg = b"hello from the guest";
    let (req, resp) = (mem.alloc(64, 8).unwrap(), mem.alloc(64, 8).unwrap());
    mem.write(req, msg).unwrap();
    driver
        .add(
            &[GuestBuf::new(req, msg.len() as u32)],
            &[GuestBuf::new(resp, 64)],
            "req",
        )
        .unwrap();
    assert_eq!(kick(), Reply::Served { chains: 1 });
    let used = driver.pop_used().unwrap().expect("a used element");
    assert_eq!((used.token, used.len), ("req", msg.len() as u32));
    let mut got = vec![0u8; msg.len()];
    mem.read(resp, &mut got).unwrap();
    assert_eq!(got, msg.to_ascii_uppercase());
}

fn finding<'a>(findings: &'a [Finding], attempt: &str) -> &'a Finding {
    findings
        .iter()
        .find(|f| f.attempt == attempt)
        .unwrap_or_else(|| panic!("no finding {attempt:?} in {findings:#?}"))
}

/// The checks every hostile device process must pass, whatever its model: it holds
/// exactly `files` (memfd names), no capabilities, and the owner's /proc entries and
/// growing its files are all refused.
fn escape_is_refused(dev: &DeviceProcess, files: &[&str], sizes: &[u64]) {
    let findings = dev.attack(Attack::Escape).unwrap();
    let fds = finding(&findings, "own descriptors").result.clone().unwrap();
    let memfds: Vec<&str> = fds.lines().filter(|l| l.contains("memfd:")).collect();
    assert_eq!(memfds.len(), files.len(), "descriptors: {fds}");
    for (held, want) in memfds.iter().zip(files) {
        assert!(
            held.contains(&format!("memfd:{want}")),
            "holds {held}, expected {want}"
        );
    }
    let caps = finding(&findings, "own capabilities").result.clone().unwrap();
    for l in caps.lines() {
        if l.starts_with("CapEff") || l.starts_with("CapPrm") || l.starts_with("CapAmb") {
            assert!(l.ends_with("0000000000000000"), "{l}");
        }
        if l.starts_with("NoNewPrivs") {
            assert!(l.ends_with('1'), "{l}");
        }
    }
    for (i, size) in sizes.iter().enumerate() {
        assert_eq!(
            finding(&findings, &format!("size of file {i}")).result,
            Ok(size.to_string())
        );
    }
    let mut refusals = 0;
    for f in &findings {
        if f.attempt.starts_with("read /proc")
            || f.attempt.starts_with("open /proc")
            || f.attempt.starts_with("grow")
        {
            assert!(f.result.is_err(), "hostile device got through: {f:?}");
            refusals += 1;
        }
    }
    // mem, environ, maps, at least stdin/stdout/stderr of the owner, each file.
    assert!(refusals >= 6 + files.len(), "{findings:#?}");
}

/// Gives each ring (descriptor table, available ring, used ring, each alone on its
/// pages, at these guest addresses) a file of its own: the first two read-only.
fn ring_files(mem: &hypervisor::GuestMemory, size: u16, gpas: [u64; 3]) -> Vec<OwnedFd> {
    let l = virtio_core::ring::SplitLayout::new(size).unwrap();
    let page = mem.page_size();
    let bytes = [l.desc_bytes(), l.avail_bytes(), l.used_bytes()];
    gpas.iter()
        .zip(bytes)
        .zip([false, false, true])
        .map(|((&gpa, bytes), writable)| {
            mem.isolate_pages(gpa, bytes.div_ceil(page) * page).unwrap();
            mem.isolated_file(gpa, writable).unwrap()
        })
        .collect()
}

/// Sets `dev` up with `setup` and the three ring files.
fn set_up_rings(dev: &DeviceProcess, setup: Setup, files: &[OwnedFd]) {
    let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
    assert_eq!(
        dev.call(&Request::Setup(setup), &fds).unwrap(),
        Reply::Ready { files: 3 }
    );
}

/// A device process given three ring files: it holds exactly those, escapes
/// nowhere, and the kernel refuses a writable mapping of the descriptor table and
/// the available ring (their files are read-only); the used ring is its to write.
fn only_the_used_ring_is_writable(dev: &DeviceProcess, page: u64) {
    escape_is_refused(dev, &["vio-isolated"; 3], &[page; 3]);
    for file in [0, 1] {
        let f = dev.attack(Attack::MapWritable { file }).unwrap();
        assert!(
            f[0].result
                .as_ref()
                .is_err_and(|e| e.contains("Permission denied")),
            "{f:?}"
        );
    }
    assert!(
        dev.attack(Attack::MapWritable { file: 2 }).unwrap()[0]
            .result
            .is_ok()
    );
}

/// Once the owner takes the used ring's pages back, the device's writes through its
/// old file reach nothing of the guest; reading past its file kills it with
/// SIGBUS; and the guest's secret is intact.
fn cut_off_and_killed(dev: DeviceProcess, guest: &Domain, used: u64, secret: u64) {
    let mem = guest.memory();
    let mut used_before = vec![0u8; 64];
    mem.read(used, &mut used_before).unwrap();
    mem.rejoin_pages(used).unwrap();
    dev.attack(Attack::Scribble { file: 2 }).unwrap()[0]
        .result
        .as_ref()
        .unwrap();
    let mut used_after = vec![0u8; 64];
    mem.read(used, &mut used_after).unwrap();
    assert_eq!(
        used_after, used_before,
        "scribbles over a rejoined file reach nothing"
    );
    let status = dev.attack_fatal(Attack::TouchPastEnd { file: 0 }).unwrap();
    assert_eq!(killed_by(&status), Some(SIGBUS), "{status:?}");
    let mut s = vec![0u8; SECRET.len()];
    mem.read(secret, &mut s).unwrap();
    assert_eq!(s, SECRET);
}

// ---- model 1 -------------------------------------------------------------------

fn cfg() -> SharedPageConfig {
    SharedPageConfig {
        max_queues: 1,
        max_queue_size: SIZE,
        bounce_bytes_per_queue: 16 << 10,
    }
}

struct Model1 {
    guest: Arc<Domain>,
    drv: SharedPageDriver,
    dev: DeviceProcess,
    region_len: u64,
    secret: u64,
}

fn model1() -> Model1 {
    let hv = Hypervisor::new();
    let guest = hv.create_domain("guest-a", 4 << 20).unwrap();
    let (drv, file): (_, OwnedFd) = pair_for_process(&guest, cfg()).unwrap();
    let secret = guest.memory().alloc(SECRET.len() as u64, 1).unwrap();
    guest.memory().write(secret, SECRET).unwrap();
    let dev = device();
    let c = cfg();
    let setup = Setup::SharedPage {
        max_queues: c.max_queues,
        max_queue_size: c.max_queue_size,
        bounce_bytes_per_queue: c.bounce_bytes_per_queue,
    };
    assert_eq!(
        dev.call(&Request::Setup(setup), &[file.as_fd()]).unwrap(),
        Reply::Ready { files: 1 }
    );
    let region_len = drv.layout().len();
    Model1 {
        guest,
        drv,
        dev,
        region_len,
        secret,
    }
}

#[test]
fn model1_round_trip_through_a_device_process() {
    let m = model1();
    let q = m.drv.create_queue(0, SIZE).unwrap();
    assert_eq!(open(&m.dev, &q).unwrap(), Reply::Opened);
    let mut driver = SplitDriver::new(SIZE, q.ring, q.share, features()).unwrap();
    round_trip(&m.guest, &m.dev, &mut driver);
    round_trip(&m.guest, &m.dev, &mut driver);
    assert!(m.dev.finish().unwrap().success());
}

#[test]
fn model1_hostile_device_process_reaches_the_region_and_nothing_else() {
    let m = model1();
    escape_is_refused(&m.dev, &["vio-isolated"], &[m.region_len]);
    // It may write all of its file: that is the region, as the guest sees it...
    let f = m.dev.attack(Attack::Scribble { file: 0 }).unwrap();
    assert_eq!(f[0].result, Ok(format!("wrote {} bytes", m.region_len)));
    let mut region = vec![0u8; m.region_len as usize];
    m.drv.shared_region().read(0, &mut region).unwrap();
    assert!(
        region.iter().all(|&b| b == 0xa5),
        "the scribbles land in the region"
    );
    // ...and nothing else: the guest's secret next to it is intact.
    let mut got = vec![0u8; SECRET.len()];
    m.guest.memory().read(m.secret, &mut got).unwrap();
    assert_eq!(got, SECRET);
    // A queue over the scribbled rings is refused or faults on the driver's side,
    // never in guest memory; reading past its file kills the device process.
    let status = m.dev.attack_fatal(Attack::TouchPastEnd { file: 0 }).unwrap();
    assert_eq!(killed_by(&status), Some(SIGBUS), "{status:?}");
    m.guest.memory().read(m.secret, &mut got).unwrap();
    assert_eq!(got, SECRET);
}

// ---- model 2 -------------------------------------------------------------------

struct Model2 {
    guest: Arc<Domain>,
    other: Arc<Domain>,
    dev: DeviceProcess,
}

fn model2() -> Model2 {
    let hv = Hypervisor::new();
    let guest = hv.create_domain("guest-a", 1 << 20).unwrap();
    let other = hv.create_domain("guest-b", 1 << 20).unwrap();
    other.memory().write(Hypervisor::GUEST_BASE, SECRET).unwrap();
    let dev = device();
    let mem = guest.memory();
    let setup = Setup::Direct { base: mem.base() };
    assert_eq!(
        dev.call(&Request::Setup(setup), &[mem.fd()]).unwrap(),
        Reply::Ready { files: 1 }
    );
    Model2 { guest, other, dev }
}

#[test]
fn model2_round_trip_through_a_device_process() {
    let m = model2();
    let drv = transport_descriptors::direct::driver(&m.guest);
    let q = drv.create_queue(0, SIZE).unwrap();
    assert_eq!(open(&m.dev, &q).unwrap(), Reply::Opened);
    let mut driver = SplitDriver::new(SIZE, q.ring, q.share, features()).unwrap();
    round_trip(&m.guest, &m.dev, &mut driver);
    round_trip(&m.guest, &m.dev, &mut driver);
    assert!(m.dev.finish().unwrap().success());
}

#[test]
fn model2_hostile_device_process_reaches_its_guest_and_nothing_else() {
    let m = model2();
    let heap = SECRET.to_vec();
    escape_is_refused(&m.dev, &["guest-a"], &[m.guest.memory().size()]);
    // All of its own guest's memory is the model; another guest's is not.
    let f = m.dev.attack(Attack::Scribble { file: 0 }).unwrap();
    assert_eq!(
        f[0].result,
        Ok(format!("wrote {} bytes", m.guest.memory().size()))
    );
    let mut b = [0u8; 4];
    m.guest.memory().read(m.guest.memory().base(), &mut b).unwrap();
    assert_eq!(b, [0xa5; 4]);
    let status = m.dev.attack_fatal(Attack::TouchPastEnd { file: 0 }).unwrap();
    assert_eq!(killed_by(&status), Some(SIGBUS), "{status:?}");
    let mut got = vec![0u8; SECRET.len()];
    m.other.memory().read(Hypervisor::GUEST_BASE, &mut got).unwrap();
    assert_eq!(got, SECRET, "the other guest's memory is intact");
    assert_eq!(heap, SECRET, "the owner's heap is intact");
}

// ---- model 3 -------------------------------------------------------------------

struct Model3 {
    guest: Arc<Domain>,
    dev: DeviceProcess,
    device_model: transport_descriptors::CopyDevice,
    /// The in-process queue registration with the helper: dropping it closes the queue.
    _opened: virtio_core::DeviceQueue<transport_descriptors::CopyMemory>,
    driver: SplitDriver<transport_descriptors::DirectShare, &'static str>,
    addrs: virtio_core::QueueAddrs,
    secret: u64,
}

fn model3() -> Model3 {
    use virtio_core::DeviceModel;
    let hv = Hypervisor::new();
    let guest = hv.create_domain("guest-a", 1 << 20).unwrap();
    let mem = guest.memory();
    let secret = mem.alloc(SECRET.len() as u64, 1).unwrap();
    mem.write(secret, SECRET).unwrap();
    let (drv, device_model) = transport_descriptors::copy::pair(&guest).unwrap();
    let q = drv.create_queue(0, SIZE).unwrap();
    // Each ring is alone on its pages (model 3's layout); give each a file.
    let files = ring_files(mem, SIZE, [q.addrs.desc, q.addrs.avail, q.addrs.used]);
    // The helper starts tracking the queue for the device (its ring views in this
    // process are not used).
    let opened = device_model.open_queue(0, SIZE, q.addrs).unwrap();
    let dev = device();
    let setup = Setup::Copy {
        index: 0,
        size: SIZE,
        features: features().bits(),
    };
    set_up_rings(&dev, setup, &files);
    let addrs = q.addrs;
    let driver = SplitDriver::new(SIZE, q.ring, q.share, features()).unwrap();
    Model3 {
        guest,
        dev,
        device_model,
        _opened: opened,
        driver,
        addrs,
        secret,
    }
}

#[test]
fn model3_round_trip_through_a_device_process() {
    let mut m = model3();
    let helper = m.device_model.helper().clone();
    let dev = &m.dev;
    let kick = || dev.call_brokered(&Request::Kick { index: 0 }, &helper).unwrap();
    round_trip_with(&m.guest, &mut m.driver, kick);
    round_trip_with(&m.guest, &mut m.driver, kick);
    assert!(m.dev.finish().unwrap().success());
}

#[test]
fn model3_hostile_device_process_reads_rings_and_copies_only_what_it_owns() {
    use vio_isolation::wire::{CopyKind, CopyOp, Slot};
    let mut m = model3();
    let helper = m.device_model.helper().clone();
    let page = m.guest.memory().page_size();
    only_the_used_ring_is_writable(&m.dev, page);
    // A request the device holds: it may read the request, write only the reply.
    let mem = m.guest.memory();
    let msg = b"request bytes";
    let (req, resp) = (mem.alloc(64, 8).unwrap(), mem.alloc(64, 8).unwrap());
    mem.write(req, msg).unwrap();
    m.driver
        .add(
            &[GuestBuf::new(req, msg.len() as u32)],
            &[GuestBuf::new(resp, 64)],
            "req",
        )
        .unwrap();
    let op = |head, slot, writable, offset, kind| CopyOp {
        queue: 0,
        head,
        slot,
        writable,
        offset,
        kind,
    };
    let thefts = [
        // Write into the device-readable request.
        op(0, Slot::Table(0), true, 0, CopyKind::Write(b"FORGED".to_vec())),
        // Read past the request's descriptor.
        op(0, Slot::Table(0), false, 8, CopyKind::Read(64)),
        // A head the device does not own, a descriptor not in the chain.
        op(5, Slot::Table(5), false, 0, CopyKind::Read(1)),
        op(0, Slot::Table(7), false, 0, CopyKind::Read(1)),
        op(0, Slot::Indirect(0), false, 0, CopyKind::Read(1)),
        // More than one copy may move.
        op(0, Slot::Table(0), false, 0, CopyKind::Read(1 << 20)),
        // Another queue.
        CopyOp {
            queue: 1,
            ..op(0, Slot::Table(0), false, 0, CopyKind::Read(1))
        },
    ];
    for theft in thefts {
        let f = m.dev.attack_brokered(Attack::Copy(theft), &helper).unwrap();
        assert!(f[0].result.is_err(), "copy allowed: {f:?}");
    }
    // What it does own, it may read.
    let f = m
        .dev
        .attack_brokered(
            Attack::Copy(op(0, Slot::Table(0), false, 0, CopyKind::Read(5))),
            &helper,
        )
        .unwrap();
    assert_eq!(f[0].result, Ok("5 bytes".into()));
    let mut got = vec![0u8; msg.len()];
    mem.read(req, &mut got).unwrap();
    assert_eq!(got, msg, "the request is intact");
    cut_off_and_killed(m.dev, &m.guest, m.addrs.used, m.secret);
}

// ---- model 4 -------------------------------------------------------------------

struct Model4 {
    guest: Arc<Domain>,
    other: Arc<Domain>,
    grants: Arc<transport_grant::GrantService>,
    dev: DeviceProcess,
    broker: vio_isolation::owner::GrantBroker,
    driver: SplitDriver<transport_grant::GrantShare, &'static str>,
    /// Guest addresses of the descriptor table and the used ring.
    desc: u64,
    used: u64,
    secret: u64,
}

fn model4() -> Model4 {
    use transport_grant::addr::decode;
    use virtio_core::ring::SplitLayout;
    let hv = Hypervisor::new();
    let guest = hv.create_domain("guest-a", 1 << 20).unwrap();
    let other = hv.create_domain("guest-b", 1 << 20).unwrap();
    let mem = guest.memory();
    let secret = mem.alloc(SECRET.len() as u64, 1).unwrap();
    mem.write(secret, SECRET).unwrap();
    let grants = transport_grant::GrantService::new(hv.clone());
    let backend = Hypervisor::HOST;
    let (drv, _in_process_device) = transport_grant::pair(&grants, &guest, backend).unwrap();
    let q = drv.create_queue(0, SIZE).unwrap();
    // The rings are granted to the backend page by page (descriptor table and
    // available ring read-only); the hypervisor resolves each grant, checked as
    // the backend's access, and gives its pages a file of their own.
    let l = SplitLayout::new(SIZE).unwrap();
    let resolve = |addr: u64, bytes: u64, writable: bool| {
        let a = decode(addr).unwrap();
        grants
            .resolve(guest.id(), backend, a.gref, u64::from(a.offset), bytes, writable)
            .unwrap()
    };
    let gpas = [
        resolve(q.addrs.desc, l.desc_bytes(), false),
        resolve(q.addrs.avail, l.avail_bytes(), false),
        resolve(q.addrs.used, l.used_bytes(), true),
    ];
    let files = ring_files(mem, SIZE, gpas);
    let dev = device();
    let setup = Setup::Grant {
        index: 0,
        size: SIZE,
        features: features().bits(),
    };
    set_up_rings(&dev, setup, &files);
    let broker = vio_isolation::owner::GrantBroker::new(grants.clone(), guest.id(), backend);
    let driver = SplitDriver::new(SIZE, q.ring, q.share, features()).unwrap();
    Model4 {
        guest,
        other,
        grants,
        dev,
        broker,
        driver,
        desc: gpas[0],
        used: gpas[2],
        secret,
    }
}

#[test]
fn model4_round_trip_through_a_device_process() {
    let mut m = model4();
    let (dev, broker) = (&m.dev, &m.broker);
    let kick = || dev.call_granted(&Request::Kick { index: 0 }, broker).unwrap();
    round_trip_with(&m.guest, &mut m.driver, kick);
    round_trip_with(&m.guest, &mut m.driver, kick);
    // Every buffer grant ended with its request.
    assert_eq!(m.driver.share().live(), 0);
    assert!(m.dev.finish().unwrap().success());
}

#[test]
fn model4_hostile_device_process_copies_only_what_is_granted_to_it() {
    use transport_grant::GrantRef;
    use transport_grant::addr::{decode, encode};
    use vio_isolation::wire::{CopyKind, GrantOp};
    let mut m = model4();
    let page = m.guest.memory().page_size();
    only_the_used_ring_is_writable(&m.dev, page);
    // A request in the ring: its buffers are granted to the device for its life,
    // the request read-only.
    let mem = m.guest.memory();
    let msg = b"request bytes";
    let (req, resp) = (mem.alloc(64, 8).unwrap(), mem.alloc(64, 8).unwrap());
    mem.write(req, msg).unwrap();
    m.driver
        .add(
            &[GuestBuf::new(req, msg.len() as u32)],
            &[GuestBuf::new(resp, 64)],
            "req",
        )
        .unwrap();
    let mut d = [0u8; 8];
    mem.read(m.desc, &mut d).unwrap();
    let req_addr = u64::from_le_bytes(d);
    let req_gref = decode(req_addr).unwrap().gref;
    // A page of the guest granted to another domain.
    let to_other = m
        .grants
        .grant(m.guest.id(), m.other.id(), m.secret & !(page - 1), false)
        .unwrap();
    let op = |addr, len, writable, offset, kind| GrantOp {
        addr,
        len,
        writable,
        offset,
        kind,
    };
    let n = msg.len() as u32;
    let thefts = [
        // Write into the read-only request.
        op(req_addr, n, true, 0, CopyKind::Write(b"FORGED".to_vec())),
        // Read past the request's granted bytes.
        op(req_addr, n, false, 8, CopyKind::Read(64)),
        // A reference never granted, one granted to another domain.
        op(
            encode(GrantRef(req_gref.0 + 500), 0, false),
            1,
            false,
            0,
            CopyKind::Read(1),
        ),
        op(encode(to_other, 0, false), 1, false, 0, CopyKind::Read(1)),
        op(encode(to_other, 0, false), 64, false, 0, CopyKind::Check),
        // More than one copy may move.
        op(req_addr, n, false, 0, CopyKind::Read(1 << 20)),
    ];
    for theft in thefts {
        let f = m.dev.attack_granted(Attack::GrantCopy(theft), &m.broker).unwrap();
        assert!(f[0].result.is_err(), "grant copy allowed: {f:?}");
    }
    // What is granted to it, it may read.
    let f = m
        .dev
        .attack_granted(
            Attack::GrantCopy(op(req_addr, n, false, 0, CopyKind::Read(5))),
            &m.broker,
        )
        .unwrap();
    assert_eq!(f[0].result, Ok("5 bytes".into()));
    // Served and returned: the driver ends the request's grants, and the device's
    // old reference is refused as revoked.
    assert_eq!(
        m.dev
            .call_granted(&Request::Kick { index: 0 }, &m.broker)
            .unwrap(),
        Reply::Served { chains: 1 }
    );
    assert!(m.driver.pop_used().unwrap().is_some());
    let f = m
        .dev
        .attack_granted(
            Attack::GrantCopy(op(req_addr, n, false, 0, CopyKind::Read(5))),
            &m.broker,
        )
        .unwrap();
    assert!(
        f[0].result.as_ref().is_err_and(|e| e.contains("revoked")),
        "{f:?}"
    );
    let mut got = vec![0u8; msg.len()];
    mem.read(req, &mut got).unwrap();
    assert_eq!(got, msg, "the request is intact");
    cut_off_and_killed(m.dev, &m.guest, m.used, m.secret);
}
