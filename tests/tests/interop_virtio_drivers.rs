//! Interop with a peer nobody here wrote: rcore's `virtio-drivers` 0.13. Its
//! `VirtIOBlk`, unmodified, drives our `BlkDevice` (O_DIRECT file on ext4, real
//! io_uring or thread-pool engine) through our in-process transport, via the
//! [`VdTransport`] / [`VdHal`] adapter in `vio::vd_peer`.
//!
//! What virtio-drivers' `Hal` can express, model by model:
//!
//! - **Model 2 (direct)**: works. A "physical address" is a guest address; rings are
//!   allocated in guest memory and written by virtio-drivers through host pointers
//!   into the guest's shared mapping. Buffers already in guest memory are shared in
//!   place; the caller's heap buffers (and virtio-drivers' boxed indirect tables) are
//!   bounced through guest memory, since the device can reach nothing else.
//! - **Model 1 (shared page)**: works, for single-queue devices. A "physical
//!   address" is an offset into the shared region: `dma_alloc` places the rings in
//!   queue 0's ring slot (virtio-drivers' layout, descriptor table and available ring
//!   on one page and the used ring on the next, fits the slot's rules), `share`
//!   bounces every buffer through queue 0's bounce area. The slot's first page (model
//!   address 0) stays unused: virtio-drivers reads physical address 0 as a failed
//!   allocation. `Hal::share` is not told which queue a buffer is for, and the model
//!   confines each queue's descriptors to that queue's own bounce area, so a
//!   multi-queue device works only where each queue carries one direction of buffers
//!   (virtio-net: see `QueueRouting` and `interop_virtio_drivers_net.rs`).
//! - **Model 3 (hypervisor copy)**: cannot be expressed. The copy helper serves only
//!   ring addresses the guest published through `CopyDriver::create_queue`, which
//!   also *places* the rings (descriptor table, available ring and used ring each on
//!   pages of their own); publishing is crate-private. virtio-drivers places its
//!   rings itself through `dma_alloc`, with the available ring 256 bytes after the
//!   descriptor table in the same allocation, so no `Hal` can make its rings coincide
//!   with published ones. Its layout would satisfy the model's rule (the used ring is
//!   on its own page), so a public "publish these queue addresses" call on
//!   `CopyDriver` would be enough. [`model3_refuses_unpublished_rings`] shows the
//!   device refusing cleanly: DEVICE_NEEDS_RESET at DRIVER_OK, nothing touched.
//! - **Model 4 (grant)**: works. A "physical address" is a grant address: ring pages
//!   are granted for the queue's life (the available ring is the descriptor table's
//!   grant at offset 256, the same page mapped twice, read-only), each buffer is
//!   bounced into guest memory and granted for one request, and revoked before its
//!   bytes are copied back.
//!
//! virtio-drivers' blocking calls spin on the used ring with no timeout, so each
//! scenario runs under a watchdog thread: a device that never answers fails the test
//! instead of hanging it.

// Test patterns come from small counters by deliberate truncation; sizes are small.
#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use backend_host::blk::device::{BlkDevice, BlkSettings, EngineChoice, Runtime};
use backend_host::blk::disk::{Disk, DiskOptions};
use hypervisor::Hypervisor;
use transport_grant::GrantService;
use vio::models;
use vio::vd_peer::{
    self, DirectBacking, DmaBacking, GrantBacking, GuestBuffer, SharedPageBacking, VdHal, VdTransport,
};
use virtio_core::lifecycle::ControlPlane;
use virtio_core::status::DeviceStatus;
use virtio_core::transport::InProcessTransport;
use virtio_core::{DeviceModel, blk};
use virtio_drivers::device::blk::{SECTOR_SIZE, VirtIOBlk};
use virtio_drivers::transport::Transport as _;

const DISK_BYTES: u64 = 8 << 20;
const SERIAL: &str = "serial-0123456789abcdef";

type Dev<V> = Arc<InProcessTransport<BlkDevice<V>>>;
type Blk<V> = VirtIOBlk<VdHal, VdTransport<BlkDevice<V>>>;

fn image(name: &str) -> PathBuf {
    // ext4 under the target dir: O_DIRECT is refused on tmpfs.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vd-interop");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    Disk::create_sparse(&path, DISK_BYTES).unwrap();
    path
}

/// Runs `f` on its own thread (the `Hal` state is per thread) and fails if it does
/// not finish in time.
fn watchdog<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .with_ansi(false)
        .try_init();
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(r) => {
            handle.join().unwrap();
            r
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The scenario panicked: surface its message.
            std::panic::resume_unwind(handle.join().unwrap_err())
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: virtio-drivers still spinning after 120 s (device never answered)")
        }
    }
}

fn device<V>(path: &Path, model: V, serial: &str, read_only: bool, engine: EngineChoice) -> Dev<V>
where
    V: DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    let disk = Disk::open(
        path,
        DiskOptions {
            read_only,
            ..DiskOptions::default()
        },
    )
    .unwrap();
    let settings = BlkSettings {
        serial: serial.into(),
        engine,
        ..BlkSettings::default()
    };
    let dev = BlkDevice::new(disk, model, settings, Runtime::OwnThreads);
    Arc::new(InProcessTransport::new(dev.lifecycle(), dev).unwrap())
}

fn open<V>(dev: &Dev<V>) -> Blk<V>
where
    V: DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    VirtIOBlk::<VdHal, _>::new(VdTransport::new(dev.clone()).unwrap()).unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(seed)
                .wrapping_add((i >> 9) as u8)
        })
        .collect()
}

/// Request sizes and where they go: single sectors, pages, 64 KiB, odd multiples,
/// 256 KiB; the sectors are spread so no two overlap.
const CASES: [(usize, usize); 6] = [
    (512, 3),
    (4096, 100),
    (65536, 1000),
    (512 * 7, 2001),
    (262_144, 4000),
    (512, DISK_BYTES as usize / SECTOR_SIZE - 1),
];

/// The whole scenario over one sharing model; `backing` is installed on this thread.
fn exercise<V>(model: &str, path: &Path, dev: &Dev<V>, backing: impl DmaBacking + 'static)
where
    V: DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    let installed = vd_peer::install(backing).unwrap();
    let mut disk = open(dev);
    assert_eq!(disk.capacity(), DISK_BYTES / 512, "{model}: capacity");
    assert!(!disk.readonly());
    assert_ne!(
        dev.status() & DeviceStatus::DRIVER_OK.bits(),
        0,
        "{model}: DRIVER_OK"
    );
    assert_eq!(dev.status() & DeviceStatus::DEVICE_NEEDS_RESET.bits(), 0);

    // GET_ID: 20 bytes, our serial truncated.
    let mut id = [0u8; 20];
    assert_eq!(disk.device_id(&mut id).unwrap(), 20, "{model}: id length");
    assert_eq!(&id, &SERIAL.as_bytes()[..20]);

    for (i, &(len, sector)) in CASES.iter().enumerate() {
        let data = pattern(i as u8 + 1, len);
        disk.write_blocks(sector, &data).unwrap();
        let mut back = vec![0xee; len];
        disk.read_blocks(sector, &mut back).unwrap();
        assert!(back == data, "{model}: read back {len} bytes at sector {sector}");
    }
    disk.flush().unwrap();

    // The bytes really are in the image, where the requests said.
    let file = std::fs::read(path).unwrap();
    for (i, &(len, sector)) in CASES.iter().enumerate() {
        let at = sector * SECTOR_SIZE;
        assert!(
            file[at..at + len] == pattern(i as u8 + 1, len)[..],
            "{model}: image at sector {sector}"
        );
    }
    // Never-written sectors read back as zeros (a sparse hole).
    let mut hole = vec![0xee; 4096];
    disk.read_blocks(9000, &mut hole).unwrap();
    assert!(hole.iter().all(|&b| b == 0), "{model}: hole");

    // Past the end: a clean I/O error, and the queue keeps working.
    let cap = usize::try_from(disk.capacity()).unwrap();
    let mut buf = vec![0u8; 1024];
    let io = Err(virtio_drivers::Error::IoError);
    assert_eq!(disk.read_blocks(cap, &mut buf[..512]), io, "{model}: at capacity");
    assert_eq!(
        disk.read_blocks(cap - 1, &mut buf),
        io,
        "{model}: straddling the end"
    );
    assert_eq!(
        disk.write_blocks(cap, &buf[..512]),
        io,
        "{model}: write past the end"
    );
    assert_eq!(
        disk.read_blocks(usize::MAX, &mut buf[..512]),
        io,
        "{model}: sector 2^64-1"
    );
    disk.read_blocks(CASES[0].1, &mut buf[..512]).unwrap();
    assert!(buf[..512] == pattern(1, 512)[..]);

    let s = vd_peer::stats().unwrap();
    assert_eq!((s.shares, s.refused, s.leaked_pages), (0, 0, 0), "{model}: {s:?}");
    assert!(s.dma_pages > 0);

    // Dropping the driver unsets its queue: the device resets before the rings go.
    drop(disk);
    assert_eq!(dev.status(), 0, "{model}: reset on drop");
    let s = vd_peer::stats().unwrap();
    assert_eq!(
        (s.dma_pages, s.leaked_pages),
        (0, 0),
        "{model}: rings returned: {s:?}"
    );

    // A second driver session on the same device sees the same disk.
    let mut again = open(dev);
    let mut back = vec![0u8; 65536];
    again.read_blocks(CASES[2].1, &mut back).unwrap();
    assert!(back == pattern(3, 65536), "{model}: data survives a reset");
    drop(again);
    drop(installed);
}

#[test]
fn model2_direct() {
    let path = image("direct.img");
    watchdog("model 2", move || {
        let f = models::direct();
        let dev = device(&path, f.device, SERIAL, false, EngineChoice::Auto);
        exercise("model 2", &path, &dev, DirectBacking::new(&f.guest).unwrap());
    });
}

#[test]
fn model2_direct_thread_pool_engine() {
    let path = image("direct-sync.img");
    watchdog("model 2, sync engine", move || {
        let f = models::direct();
        let dev = device(&path, f.device, SERIAL, false, EngineChoice::Sync);
        exercise(
            "model 2 (sync)",
            &path,
            &dev,
            DirectBacking::new(&f.guest).unwrap(),
        );
    });
}

#[test]
fn model1_shared_page() {
    let path = image("shared-page.img");
    watchdog("model 1", move || {
        let f = models::shared_page();
        let dev = device(&path, f.device, SERIAL, false, EngineChoice::Auto);
        exercise("model 1", &path, &dev, SharedPageBacking::new(f.driver).unwrap());
    });
}

#[test]
fn model4_grant() {
    let path = image("grant.img");
    watchdog("model 4", move || {
        let hv = Hypervisor::new();
        let guest = hv.create_domain("grant", models::GUEST_BYTES).unwrap();
        let service = GrantService::new(hv);
        let (_driver, device_model) = transport_grant::pair(&service, &guest, Hypervisor::HOST).unwrap();
        let dev = device(&path, device_model, SERIAL, false, EngineChoice::Auto);
        exercise(
            "model 4",
            &path,
            &dev,
            GrantBacking::new(&service, &guest, Hypervisor::HOST),
        );
        assert_eq!(service.active_grants(guest.id()), 0, "every grant ended");
    });
}

/// Buffers that already live in guest memory go to the device by address, with no
/// bounce (model 2's point); the short serial comes back NUL-terminated.
#[test]
fn model2_guest_buffers_are_shared_in_place() {
    let path = image("in-place.img");
    watchdog("model 2 in place", move || {
        let f = models::direct();
        let dev = device(&path, f.device, "vd-peer", false, EngineChoice::Auto);
        let _hal = vd_peer::install(DirectBacking::new(&f.guest).unwrap()).unwrap();
        let mut disk = open(&dev);

        let mut id = [0xffu8; 20];
        assert_eq!(disk.device_id(&mut id).unwrap(), 7);
        assert_eq!(&id[..7], b"vd-peer");

        let mut buf = GuestBuffer::new(&f.guest, 8192).unwrap();
        buf.as_mut_slice().copy_from_slice(&pattern(5, 8192));
        let before = vd_peer::stats().unwrap();
        disk.write_blocks(64, buf.as_mut_slice()).unwrap();
        buf.as_mut_slice().fill(0);
        disk.read_blocks(64, buf.as_mut_slice()).unwrap();
        let after = vd_peer::stats().unwrap();
        assert!(buf.as_mut_slice() == &pattern(5, 8192)[..]);
        assert_eq!(after.in_place - before.in_place, 2, "one data buffer per request");
        // Header, status and the indirect table are virtio-drivers' own (stack or
        // heap) memory: bounced.
        assert_eq!(after.bounced - before.bounced, 6);
        drop(disk);
    });
}

#[test]
fn model2_read_only_disk() {
    let path = image("read-only.img");
    std::fs::write(&path, pattern(9, DISK_BYTES as usize)).unwrap();
    watchdog("model 2 read-only", move || {
        let f = models::direct();
        let dev = device(&path, f.device, SERIAL, true, EngineChoice::Auto);
        let _hal = vd_peer::install(DirectBacking::new(&f.guest).unwrap()).unwrap();
        let mut disk = open(&dev);
        assert!(disk.readonly(), "RO negotiated");
        let mut buf = vec![0u8; 4096];
        disk.read_blocks(8, &mut buf).unwrap();
        assert!(buf[..] == pattern(9, DISK_BYTES as usize)[8 * 512..8 * 512 + 4096]);
        assert_eq!(
            disk.write_blocks(8, &buf),
            Err(virtio_drivers::Error::IoError),
            "writes to a read-only disk fail"
        );
        drop(disk);
    });
}

/// Model 3 cannot be expressed (see the module docs): its device refuses the rings
/// virtio-drivers placed, because the guest never published them to the copy
/// helper. The refusal is clean: DRIVER_OK leads to DEVICE_NEEDS_RESET and no queue
/// is served. (virtio-drivers does not look at the status after DRIVER_OK, so a
/// request now would spin forever; none is sent.)
#[test]
fn model3_refuses_unpublished_rings() {
    let path = image("copy.img");
    watchdog("model 3", move || {
        let f = models::hypervisor_copy();
        let dev = device(&path, f.device, SERIAL, false, EngineChoice::Auto);
        // The driver side of model 3 uses guest addresses, as model 2 does.
        let _hal = vd_peer::install(DirectBacking::new(&f.guest).unwrap()).unwrap();
        let disk = open(&dev);
        let status = dev.status();
        assert_ne!(
            status & DeviceStatus::DEVICE_NEEDS_RESET.bits(),
            0,
            "status {status:#x}"
        );
        drop(disk);
        assert_eq!(dev.status(), 0);
        assert_eq!(vd_peer::stats().unwrap().dma_pages, 0);
    });
}

/// Without a backing, DMA allocation fails and `VirtIOBlk::new` reports it.
#[test]
fn no_backing_is_a_dma_error() {
    let path = image("no-backing.img");
    watchdog("no backing", move || {
        let f = models::direct();
        let dev = device(&path, f.device, SERIAL, false, EngineChoice::Auto);
        let r = VirtIOBlk::<VdHal, _>::new(VdTransport::new(dev.clone()).unwrap());
        assert_eq!(r.err(), Some(virtio_drivers::Error::DmaError));
        assert!(matches!(
            vd_peer::install(DirectBacking::new(&f.guest).unwrap())
                .and_then(|_g| vd_peer::install(DirectBacking::new(&f.guest).unwrap())),
            Err(vd_peer::VdError::AlreadyInstalled)
        ));
    });
}

/// Config space reads past its end are errors, not zeros.
#[test]
fn config_space_bounds() {
    let path = image("config.img");
    let f = models::direct();
    let dev = device(&path, f.device, SERIAL, false, EngineChoice::Auto);
    let t = VdTransport::new(dev.clone()).unwrap();
    let len = dev.with_lifecycle(|l| l.config().len());
    assert_eq!(t.read_config_space::<u64>(0).unwrap(), DISK_BYTES / 512);
    assert_eq!(
        t.read_config_space::<u32>(len - 2),
        Err(virtio_drivers::Error::ConfigSpaceTooSmall)
    );
    assert_eq!(
        t.read_config_space::<u8>(usize::MAX),
        Err(virtio_drivers::Error::ConfigSpaceTooSmall)
    );
    assert_eq!(t.device_type(), virtio_drivers::transport::DeviceType::Block);
    assert_eq!(blk::DEVICE_ID, 2);
}
