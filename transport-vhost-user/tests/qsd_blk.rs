//! drivers-blk, unchanged, driving qemu-storage-daemon's vhost-user-blk export through
//! this transport: guest memory is a memfd shared with the daemon (sharing model 2),
//! the image a raw file on ext4 opened with O_DIRECT and io_uring.

// Test patterns come from small counters by deliberate truncation.
#![allow(clippy::cast_possible_truncation)]

mod qsd;

use drivers_blk::{BlkDriver, BlkError, BlkOptions};
use hypervisor::{Domain, Hypervisor};
use qsd::{GUEST_BYTES, IMAGE_BYTES, Qsd, Shared, available};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport_descriptors::direct::{self, DirectDriver};
use transport_vhost_user::{ProtocolFeatures, VhostUserError, VhostUserOptions, VhostUserTransport};
use virtio_core::blk::BlkFeatures;
use virtio_core::features::Features;
use virtio_core::lifecycle::ControlPlane;
use virtio_core::status::DeviceStatus;

const SECTORS: u64 = IMAGE_BYTES / 512;
/// Where the host seeds data before the daemon starts.
const SEED_SECTOR: u64 = 100;

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|k| (k * 31 + usize::from(salt)) as u8).collect()
}

fn guest() -> (Arc<Domain>, DirectDriver) {
    let guest = Hypervisor::new().create_domain("vu-guest", GUEST_BYTES).unwrap();
    // Only the driver half of model 2 is needed: the daemon is the device.
    let driver = direct::driver(&guest);
    (guest, driver)
}

fn opts(queues: u16, timeout: Duration) -> BlkOptions {
    BlkOptions {
        queues,
        timeout: Some(timeout),
        ..BlkOptions::default()
    }
}

fn driver(
    transport: Shared,
    model: DirectDriver,
    guest: &Domain,
    queues: u16,
    timeout: Duration,
) -> BlkDriver<DirectDriver, Shared> {
    BlkDriver::new(transport, model, guest.memory().clone(), opts(queues, timeout)).unwrap()
}

fn seeded(name: &str) -> Qsd {
    Qsd::start(name, 2, |f| {
        f.write_all_at(&pattern(4096, 7), SEED_SECTOR * 512).unwrap();
    })
}

#[test]
fn read_write_flush_discard_and_get_id_on_two_queues() {
    if !available("read_write_flush_discard_and_get_id_on_two_queues") {
        return;
    }
    let qsd = seeded("rw");
    let (guest, model) = guest();
    let t = Arc::new(qsd.connect(guest.memory().clone()));
    let b = *t.backend();
    eprintln!(
        "qemu-storage-daemon offers features {:#x}, protocol features {:?} ({:#x}), {} queues",
        b.features,
        b.protocol_features,
        b.protocol_features.bits(),
        b.queues
    );
    assert_eq!(b.queues, 2);
    assert!(
        b.acked_protocol_features
            .contains(ProtocolFeatures::MQ | ProtocolFeatures::CONFIG)
    );
    assert_eq!(b.features & (1 << 30), 1 << 30, "PROTOCOL_FEATURES offered");
    assert_eq!(
        t.device_features() & (1 << 30 | 1 << 26),
        0,
        "the driver never sees PROTOCOL_FEATURES or LOG_ALL"
    );
    let offered = BlkFeatures::from_bits_retain(t.device_features());
    assert!(offered.contains(BlkFeatures::FLUSH | BlkFeatures::DISCARD | BlkFeatures::MQ));
    assert!(t.device_features() & Features::VERSION_1.bits() != 0);

    let d = driver(
        Shared {
            inner: t.clone(),
            extra_sectors: 0,
        },
        model,
        &guest,
        2,
        Duration::from_secs(10),
    );
    eprintln!("negotiated {:#x}; {:?}", d.info().features, d.info());
    assert_eq!(d.info().capacity, SECTORS);
    assert_eq!(d.num_queues(), 2);
    assert!(d.info().flush);

    // Host-seeded data, read on each queue.
    for q in 0..2 {
        let mut back = vec![0u8; 4096];
        d.read_bytes_blocking(q, SEED_SECTOR, &mut back).unwrap();
        assert!(back == pattern(4096, 7), "queue {q} reads the seeded bytes");
    }
    // Written on one queue, read back on the other, and on the host after a flush.
    for (i, len) in [512usize, 4096, 65536].into_iter().enumerate() {
        let data = pattern(len, i as u8 + 1);
        let sector = 1000 + 256 * i as u64;
        let (wq, rq) = (i as u16 % 2, (i as u16 + 1) % 2);
        d.write_bytes_blocking(wq, sector, &data).unwrap();
        let mut back = vec![0u8; len];
        d.read_bytes_blocking(rq, sector, &mut back).unwrap();
        assert!(
            back == data,
            "{len} bytes written on queue {wq} read back on queue {rq}"
        );
        d.flush_blocking(wq).unwrap();
        assert!(
            qsd.image_bytes(sector * 512, len) == data,
            "{len} bytes reached the image file"
        );
    }
    let id = d.get_id_blocking(1).unwrap();
    eprintln!("GET_ID: {id:?}");
    assert!(!id.is_empty());

    // Discard punches a hole: the sectors read as zeros, from the driver and the host.
    let at = 4096;
    d.write_bytes_blocking(0, at, &pattern(8192, 9)).unwrap();
    d.discard_blocking(0, at, 16).unwrap();
    let mut back = vec![1u8; 8192];
    d.read_bytes_blocking(1, at, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0), "discarded sectors read as zeros");
    assert!(qsd.image_bytes(at * 512, 8192).iter().all(|&b| b == 0));
    if d.info().write_zeroes.is_some() {
        d.write_bytes_blocking(1, at, &pattern(4096, 3)).unwrap();
        d.write_zeroes_blocking(1, at, 8, false).unwrap();
        d.read_bytes_blocking(0, at, &mut back[..4096]).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0), "write-zeroes zeroed");
    }

    // Both queues at once, from two threads.
    let d = Arc::new(d);
    let workers: Vec<_> = (0..2u16)
        .map(|q| {
            let d = d.clone();
            std::thread::spawn(move || {
                for k in 0..32u64 {
                    let sector = 8192 + u64::from(q) * 1024 + k * 8;
                    let data = pattern(4096, (k as u8).wrapping_add(q as u8 * 50));
                    d.write_bytes_blocking(q, sector, &data).unwrap();
                    let mut back = vec![0u8; 4096];
                    d.read_bytes_blocking(q, sector, &mut back).unwrap();
                    assert!(back == data, "queue {q} request {k}");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // Refused locally, before the daemon sees it.
    let mut past = vec![0u8; 512];
    assert!(matches!(
        d.read_bytes_blocking(0, SECTORS, &mut past),
        Err(BlkError::OutOfRange { .. })
    ));
    assert!(t.broken().is_none());
}

#[test]
fn the_daemon_answers_a_request_past_capacity_with_ioerr() {
    if !available("the_daemon_answers_a_request_past_capacity_with_ioerr") {
        return;
    }
    let qsd = seeded("cap");
    let (guest, model) = guest();
    let t = Arc::new(qsd.connect(guest.memory().clone()));
    // The driver believes in 8 more sectors than there are, so its own range check
    // lets the request through and the daemon has to refuse it.
    let shared = Shared {
        inner: t.clone(),
        extra_sectors: 8,
    };
    let d = driver(shared, model, &guest, 1, Duration::from_secs(10));
    assert_eq!(d.info().capacity, SECTORS + 8);
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        d.read_bytes_blocking(0, SECTORS, &mut buf),
        Err(BlkError::IoError)
    ));
    assert!(matches!(
        d.write_bytes_blocking(0, SECTORS - 1, &buf),
        Err(BlkError::IoError)
    ));
    // The queue still works.
    d.read_bytes_blocking(0, SEED_SECTOR, &mut buf).unwrap();
    assert!(buf == pattern(4096, 7));
}

#[test]
fn reset_stops_the_rings_and_a_new_driver_starts_over() {
    if !available("reset_stops_the_rings_and_a_new_driver_starts_over") {
        return;
    }
    let qsd = seeded("reset");
    let (guest, model) = guest();
    let t = Arc::new(qsd.connect(guest.memory().clone()));
    let shared = || Shared {
        inner: t.clone(),
        extra_sectors: 0,
    };
    let d = driver(shared(), model, &guest, 2, Duration::from_secs(10));
    for q in 0..2 {
        d.write_bytes_blocking(q, 2000 + u64::from(q) * 8, &pattern(4096, 40 + q as u8))
            .unwrap();
    }
    let free_before = guest.memory().free_bytes();
    // Dropping the driver resets the device: GET_VRING_BASE on both rings, status
    // 0, and only then does the driver free its request memory.
    drop(d);
    assert_eq!(t.status(), 0);
    assert!(t.broken().is_none());
    assert!(
        guest.memory().free_bytes() > free_before,
        "request slots came back after the reset"
    );

    // Writeback is a writable field (CONFIG_WCE): toggle it through SET_CONFIG and
    // see the generation move.
    if t.device_features() & BlkFeatures::CONFIG_WCE.bits() != 0 {
        let mut wce = [0u8; 1];
        let g0 = t.config_generation();
        t.read_config(32, &mut wce);
        let flipped = 1 - wce[0].min(1);
        t.write_config(32, &[flipped]);
        let g1 = t.config_generation();
        let mut now = [0u8; 1];
        t.read_config(32, &mut now);
        assert_eq!(now[0], flipped, "writeback toggled");
        assert_ne!(g0, g1);
        t.write_config(32, &wce);
        // A write to a read-only field is ignored, not sent.
        t.write_config(0, &[0; 8]);
        assert!(t.broken().is_none());
    }

    // A second driver on the same connection: new rings in new memory.
    let model2 = direct::driver(&guest);
    let d = driver(shared(), model2, &guest, 2, Duration::from_secs(10));
    for q in 0..2u16 {
        let mut back = vec![0u8; 4096];
        d.read_bytes_blocking(1 - q, 2000 + u64::from(q) * 8, &mut back)
            .unwrap();
        assert!(back == pattern(4096, 40 + q as u8));
    }
    assert!(!d.get_id_blocking(0).unwrap().is_empty());
    // Re-initialization by hand, as a driver does it, also goes through.
    drop(d);
    assert!(virtio_core::lifecycle::reset(&*t).is_ok());
    let features = virtio_core::lifecycle::initialize(&*t, 2, Features::VERSION_1.bits(), &[]).unwrap();
    assert_eq!(features, Features::VERSION_1.bits());
    virtio_core::lifecycle::driver_ok(&*t).unwrap();
    assert!(virtio_core::lifecycle::reset(&*t).is_ok());
}

#[test]
fn a_daemon_that_dies_mid_run_gives_typed_errors_not_a_hang() {
    if !available("a_daemon_that_dies_mid_run_gives_typed_errors_not_a_hang") {
        return;
    }
    let mut qsd = seeded("death");
    let (guest, model) = guest();
    let t = Arc::new(qsd.connect(guest.memory().clone()));
    let shared = Shared {
        inner: t.clone(),
        extra_sectors: 0,
    };
    let d = driver(shared, model, &guest, 2, Duration::from_secs(2));
    let mut buf = vec![0u8; 4096];
    d.read_bytes_blocking(0, SEED_SECTOR, &mut buf).unwrap();
    qsd.kill();

    let started = Instant::now();
    let r = d.read_bytes_blocking(1, SEED_SECTOR, &mut buf);
    assert!(matches!(r, Err(BlkError::TimedOut)), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The transport noticed the hang-up and says so.
    let status = DeviceStatus::from_bits_retain(t.status());
    assert!(status.contains(DeviceStatus::DEVICE_NEEDS_RESET), "{status:?}");
    assert!(matches!(
        t.broken().as_deref(),
        Some(VhostUserError::Disconnected { .. })
    ));
    // Dropping the driver cannot confirm the rings stopped: it leaks its memory
    // instead of hanging or handing it back.
    let started = Instant::now();
    drop(d);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_ne!(t.status(), 0);
    // A new connection to the dead socket fails at once.
    let (guest, _) = self::guest();
    let err = VhostUserTransport::connect(&qsd.socket, guest.memory().clone(), VhostUserOptions::blk());
    assert!(matches!(err, Err(VhostUserError::Connect { .. })), "{err:?}");
}

#[test]
fn a_silent_back_end_times_out_at_connect() {
    let dir = std::env::temp_dir().join(format!("vu-silent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sock");
    let listener = UnixListener::bind(&path).unwrap();
    // Accepts and never answers.
    let holder = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let (guest, _) = guest();
    let opts = VhostUserOptions {
        timeout: Duration::from_millis(200),
        ..VhostUserOptions::blk()
    };
    let started = Instant::now();
    let err = VhostUserTransport::connect(&path, guest.memory().clone(), opts);
    assert!(matches!(err, Err(VhostUserError::TimedOut { .. })), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(holder.join());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A back-end that answers GET_FEATURES and GET_PROTOCOL_FEATURES with `features`
/// and `protocol`, GET_QUEUE_NUM with `queues`, and reads everything else.
fn scripted_back_end(
    features: u64,
    protocol: u64,
    queues: u64,
) -> (std::path::PathBuf, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let dir = std::env::temp_dir().join(format!("vu-fake-{}-{protocol:x}-{queues}", std::process::id()));
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
            let value = match word(0) {
                1 => features,
                15 => protocol,
                17 => queues,
                _ => continue,
            };
            let mut reply = Vec::new();
            for w in [word(0), 0x1 | 0x4, 8] {
                reply.extend_from_slice(&w.to_ne_bytes());
            }
            reply.extend_from_slice(&value.to_ne_bytes());
            if s.write_all(&reply).is_err() {
                break;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
    (path, server)
}

#[test]
fn back_ends_the_front_end_cannot_drive_are_refused_at_connect() {
    const PROTOCOL: u64 = 1 << 30;
    let config = ProtocolFeatures::CONFIG.bits();
    let mq = ProtocolFeatures::MQ.bits();
    for (features, protocol, queues, want) in [
        (1u64 << 32, 0, 1, "VHOST_USER_F_PROTOCOL_FEATURES"),
        (1 << 32 | PROTOCOL, mq, 1, "CONFIG"),
        (1 << 32 | PROTOCOL, mq | config, 0, "0 queues"),
        (1 << 32 | PROTOCOL, mq | config, 100_000, "100000 queues"),
    ] {
        let (path, server) = scripted_back_end(features, protocol, queues);
        let (guest, _) = guest();
        let err = VhostUserTransport::connect(&path, guest.memory().clone(), VhostUserOptions::blk())
            .expect_err(want)
            .to_string();
        assert!(err.contains(want), "{err}");
        server.join().unwrap();
    }
}
