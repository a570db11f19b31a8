//! The `vio-host` daemon end to end: drivers-blk, as a vhost-user frontend
//! (`transport-vhost-user`), drives our block device in another process through a
//! memfd and eventfds, as QEMU would.
//!
//! Images live under cargo's per-crate scratch directory (`CARGO_TARGET_TMPDIR`), on
//! the build's file system (ext4 here), so O_DIRECT is real.

// Test patterns come from small counters by deliberate truncation.
#![allow(clippy::cast_possible_truncation)]

use drivers_blk::{BlkDriver, BlkOptions};
use hypervisor::{Domain, Hypervisor};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport_descriptors::direct::{self, DirectDriver};
use transport_vhost_user::{VhostUserOptions, VhostUserTransport};
use virtio_core::blk::BlkFeatures;
use virtio_core::features::Features;

const IMAGE_BYTES: u64 = 16 << 20;
const GUEST_BYTES: u64 = 32 << 20;
const SEED_SECTOR: u64 = 64;

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|k| (k * 7 + usize::from(salt) * 13) as u8).collect()
}

/// A `vio-host blk` child serving an image; killed on drop, its log printed when
/// the test failed.
struct Host {
    child: Option<Child>,
    image: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    args: Vec<String>,
}

impl Host {
    fn start(name: &str, args: &[&str]) -> Host {
        let tag = format!("vu-{name}-{}", std::process::id());
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vhost-user");
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join(format!("{tag}.img"));
        let file = File::create(&image).unwrap();
        file.set_len(IMAGE_BYTES).unwrap();
        file.write_all_at(&pattern(4096, 1), SEED_SECTOR * 512).unwrap();
        file.sync_all().unwrap();
        // Socket paths are short (108 bytes): keep them in the temp dir.
        let socket = std::env::temp_dir().join(format!("{tag}.sock"));
        let log = dir.join(format!("{tag}.log"));
        File::create(&log).unwrap();
        let mut host = Host {
            child: None,
            image,
            socket,
            log,
            args: args.iter().map(|a| (*a).to_string()).collect(),
        };
        host.spawn();
        host
    }

    /// Starts the daemon on the host's socket and image, its log appended, and
    /// waits until it listens.
    fn spawn(&mut self) {
        let log = File::options().append(true).open(&self.log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vio-host"))
            .args(["blk", "--socket"])
            .arg(&self.socket)
            .arg("--image")
            .arg(&self.image)
            .args(&self.args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let host = &*self;
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&host.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "vio-host did not listen:\n{}",
                host.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // That probe connection was a frontend that left at once: the daemon
        // must take the next one.
    }

    /// Kills the daemon with SIGKILL (no chance to finish anything) and starts a
    /// new one on the same socket and image.
    fn kill_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        self.spawn();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        File::open(&self.image)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- vio-host log ---\n{}", self.log_text());
        }
        let _ = std::fs::remove_file(&self.image);
        let _ = std::fs::remove_file(&self.socket);
    }
}

type Driver = BlkDriver<DirectDriver, VhostUserTransport>;

/// A fresh guest whose driver connects to `socket` with `queues` queues.
fn connect(socket: &Path, queues: u16) -> (Arc<Domain>, Driver) {
    connect_with(socket, queues, Features::empty())
}

/// [`connect`], asking for the ring features in `ring` (`RING_PACKED`, `IN_ORDER`).
fn connect_with(socket: &Path, queues: u16, ring: Features) -> (Arc<Domain>, Driver) {
    let guest = Hypervisor::new().create_domain("vu-guest", GUEST_BYTES).unwrap();
    let model = direct::driver(&guest);
    let transport =
        VhostUserTransport::connect(socket, guest.memory().clone(), VhostUserOptions::blk()).unwrap();
    let opts = BlkOptions {
        queues,
        timeout: Some(Duration::from_secs(10)),
        ring_packed: ring.contains(Features::RING_PACKED),
        in_order: ring.contains(Features::IN_ORDER),
        ..BlkOptions::default()
    };
    let driver = BlkDriver::new(transport, model, guest.memory().clone(), opts).unwrap();
    (guest, driver)
}

#[test]
fn read_write_flush_discard_and_get_id_on_two_queues() {
    let host = Host::start("rw", &["--queues", "2", "--serial", "vu-test-disk"]);
    let (_guest, d) = connect(&host.socket, 2);
    assert_eq!(d.num_queues(), 2);
    assert_eq!(d.info().capacity, IMAGE_BYTES / 512);
    let f = BlkFeatures::from_bits_retain(d.info().features);
    assert!(
        f.contains(BlkFeatures::FLUSH | BlkFeatures::MQ | BlkFeatures::DISCARD | BlkFeatures::WRITE_ZEROES)
    );
    for q in 0..2 {
        let mut back = vec![0; 4096];
        d.read_bytes_blocking(q, SEED_SECTOR, &mut back).unwrap();
        assert!(back == pattern(4096, 1), "queue {q} reads the host's bytes");
    }
    for (i, len) in [512usize, 4096, 65536, 256 << 10].into_iter().enumerate() {
        let data = pattern(len, i as u8 + 2);
        let sector = 1024 + 1024 * i as u64;
        let (wq, rq) = (i as u16 % 2, (i as u16 + 1) % 2);
        d.write_bytes_blocking(wq, sector, &data).unwrap();
        let mut back = vec![0; len];
        d.read_bytes_blocking(rq, sector, &mut back).unwrap();
        assert!(back == data, "{len} bytes written on queue {wq}, read on {rq}");
        d.flush_blocking(wq).unwrap();
        assert!(
            host.image_bytes(sector * 512, len) == data,
            "{len} bytes reached the image"
        );
    }
    assert_eq!(d.get_id_blocking(1).unwrap(), "vu-test-disk");
    let at = 8192;
    d.write_bytes_blocking(0, at, &pattern(8192, 9)).unwrap();
    d.write_zeroes_blocking(1, at, 16, false).unwrap();
    let mut back = vec![1; 8192];
    d.read_bytes_blocking(0, at, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0), "write-zeroes zeroed");
    d.discard_blocking(1, at, 16).unwrap();
    // Both queues busy at once.
    std::thread::scope(|s| {
        for q in 0..2u16 {
            let d = &d;
            s.spawn(move || {
                for k in 0..32u64 {
                    let data = pattern(4096, (q * 32 + k as u16) as u8);
                    let sector = 16384 + u64::from(q) * 4096 + k * 8;
                    d.write_bytes_blocking(q, sector, &data).unwrap();
                    let mut back = vec![0; 4096];
                    d.read_bytes_blocking(q, sector, &mut back).unwrap();
                    assert!(back == data);
                }
            });
        }
    });
}

/// Inflight tracking between our two sides, as QEMU's vhost-user-blk does it: the
/// frontend asks for INFLIGHT_SHMFD, gets the daemon's buffer at FEATURES_OK and
/// hands it back before the rings start, and requests go through tracked rings of
/// both formats; a frontend told not to ask does without.
#[test]
fn our_frontend_and_daemon_track_requests_in_flight() {
    use transport_vhost_user::ProtocolFeatures;
    let host = Host::start("inflight", &["--queues", "2"]);
    for (inflight, ring) in [
        (true, Features::empty()),
        (true, Features::RING_PACKED),
        (false, Features::empty()),
    ] {
        let guest = Hypervisor::new().create_domain("vu-guest", GUEST_BYTES).unwrap();
        let opts = VhostUserOptions {
            inflight,
            ..VhostUserOptions::blk()
        };
        let transport = VhostUserTransport::connect(&host.socket, guest.memory().clone(), opts).unwrap();
        assert_eq!(
            transport
                .backend()
                .acked_protocol_features
                .contains(ProtocolFeatures::INFLIGHT_SHMFD),
            inflight
        );
        let opts = BlkOptions {
            queues: 2,
            timeout: Some(Duration::from_secs(10)),
            ring_packed: ring.contains(Features::RING_PACKED),
            ..BlkOptions::default()
        };
        let d = BlkDriver::new(transport, direct::driver(&guest), guest.memory().clone(), opts).unwrap();
        for q in 0..2u16 {
            let data = pattern(8192, 40 + q as u8);
            let sector = 4096 + u64::from(q) * 64;
            d.write_bytes_blocking(q, sector, &data).unwrap();
            let mut back = vec![0; 8192];
            d.read_bytes_blocking(q, sector, &mut back).unwrap();
            assert!(back == data, "inflight {inflight}, {ring:?}, queue {q}");
        }
        d.flush_blocking(0).unwrap();
    }
}

/// Our frontend survives its back-end's crash as QEMU does with a reconnecting
/// chardev: the daemon is killed with SIGKILL five times under two threads that
/// write and read back their own blocks; the frontend connects again, restores
/// the session with the inflight buffer, the new daemon resubmits what the dead
/// one held, and every request completes, with the right data, on the image too.
#[test]
fn our_frontend_reconnects_to_a_restarted_daemon_and_loses_no_request() {
    let mut host = Host::start("reconnect", &["--queues", "2"]);
    let guest = Hypervisor::new().create_domain("vu-guest", GUEST_BYTES).unwrap();
    let opts = VhostUserOptions {
        reconnect: Some(Duration::from_millis(20)),
        ..VhostUserOptions::blk()
    };
    let transport = VhostUserTransport::connect(&host.socket, guest.memory().clone(), opts).unwrap();
    let opts = BlkOptions {
        queues: 2,
        timeout: Some(Duration::from_secs(30)),
        ..BlkOptions::default()
    };
    let d = BlkDriver::new(transport, direct::driver(&guest), guest.memory().clone(), opts).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let block = |q: u16, k: u64| {
        (
            16384 + u64::from(q) * 8192 + (k % 1024) * 8,
            pattern(4096, (q as u8) ^ (k as u8)),
        )
    };
    let rounds = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2u16)
            .map(|q| {
                let (d, done) = (&d, &done);
                s.spawn(move || {
                    let mut k = 0u64;
                    while !done.load(std::sync::atomic::Ordering::Acquire) {
                        let (sector, data) = block(q, k);
                        d.write_bytes_blocking(q, sector, &data).unwrap();
                        let mut back = vec![0; 4096];
                        d.read_bytes_blocking(q, sector, &mut back).unwrap();
                        assert!(back == data, "queue {q}, round {k}");
                        k += 1;
                    }
                    k
                })
            })
            .collect();
        for pause in [150, 90, 230, 60, 170] {
            std::thread::sleep(Duration::from_millis(pause));
            host.kill_and_restart();
        }
        // I/O flows again after the last restart.
        std::thread::sleep(Duration::from_millis(300));
        done.store(true, std::sync::atomic::Ordering::Release);
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect::<Vec<u64>>()
    });
    d.flush_blocking(0).unwrap();
    for (q, &n) in (0u16..).zip(&rounds) {
        assert!(n > 0, "queue {q} completed nothing");
        // The last round of each block is on the image.
        for k in n.saturating_sub(1024)..n {
            let (sector, data) = block(q, k);
            if k + 1024 >= n {
                assert!(
                    host.image_bytes(sector * 512, 4096) == data,
                    "queue {q}, round {k} on the image"
                );
            }
        }
    }
    let log = host.log_text();
    let resubmitted: usize = log
        .lines()
        .filter_map(|l| {
            l.split("resubmit=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    eprintln!("rounds per queue {rounds:?}; chains resubmitted by the restarted daemons: {resubmitted}");
    assert!(
        log.matches("inflight buffer adopted").count() >= 5,
        "every new daemon got the buffer back"
    );
}

/// Packed rings over vhost-user, end to end: our frontend asks for
/// VIRTIO_F_RING_PACKED, the daemon offers it, the rings' bases travel in the
/// packed encoding, and the data reaches the image. The same with IN_ORDER, over
/// both formats: the daemon returns requests in the order they came.
#[test]
fn packed_and_in_order_rings_serve_both_queues_over_vhost_user() {
    for (name, ring) in [
        ("packed", Features::RING_PACKED),
        ("packed-io", Features::RING_PACKED | Features::IN_ORDER),
        ("split-io", Features::IN_ORDER),
    ] {
        let host = Host::start(name, &["--queues", "2"]);
        let (_guest, d) = connect_with(&host.socket, 2, ring);
        let f = Features::from_bits_retain(d.info().features);
        assert_eq!(f & (Features::RING_PACKED | Features::IN_ORDER), ring, "{name}");
        for q in 0..2u16 {
            let data = pattern(65536, 40 + q as u8);
            let sector = 2048 + 256 * u64::from(q);
            d.write_bytes_blocking(q, sector, &data).unwrap();
            let mut back = vec![0; data.len()];
            d.read_bytes_blocking(1 - q, sector, &mut back).unwrap();
            assert!(back == data, "{name}: written on queue {q}, read on the other");
            d.flush_blocking(q).unwrap();
            assert!(
                host.image_bytes(sector * 512, data.len()) == data,
                "{name}: reached the image"
            );
        }
    }
}

#[test]
fn a_read_only_image_refuses_writes_but_serves_reads() {
    let host = Host::start("ro", &["--readonly"]);
    let (_guest, d) = connect(&host.socket, 1);
    assert!(BlkFeatures::from_bits_retain(d.info().features).contains(BlkFeatures::RO));
    let mut back = vec![0; 4096];
    d.read_bytes_blocking(0, SEED_SECTOR, &mut back).unwrap();
    assert!(back == pattern(4096, 1));
    assert!(d.write_bytes_blocking(0, 0, &[7; 512]).is_err());
}

#[test]
fn the_daemon_serves_the_next_frontend_after_one_leaves_or_misbehaves() {
    let mut host = Host::start("next", &["--queues", "2"]);
    {
        let (_guest, d) = connect(&host.socket, 2);
        d.write_bytes_blocking(0, 100, &pattern(4096, 5)).unwrap();
        d.flush_blocking(0).unwrap();
    }
    // A frontend that sends garbage is disconnected; the daemon stays up.
    {
        let mut junk = UnixStream::connect(&host.socket).unwrap();
        junk.write_all(&[0xff; 64]).unwrap();
        let _ = junk.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut junk, &mut rest);
    }
    assert!(host.alive(), "vio-host died:\n{}", host.log_text());
    let (_guest, d) = connect(&host.socket, 2);
    let mut back = vec![0; 4096];
    d.read_bytes_blocking(1, 100, &mut back).unwrap();
    assert!(
        back == pattern(4096, 5),
        "the next frontend reads what the first wrote"
    );
}

/// The frontend process is killed while it writes; every write it saw
/// acknowledged, and flushed, must be on the image, and the daemon must serve the
/// next frontend.
#[test]
fn a_killed_frontend_loses_no_acknowledged_write() {
    let mut host = Host::start("kill", &["--queues", "1"]);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "frontend_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("VIO_VU_CHILD", &host.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut acked = Vec::new();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines {
        let line = line.unwrap();
        if let Some(k) = line.strip_prefix("ACKED ") {
            acked.push(k.parse::<u64>().unwrap());
            if acked.len() == 40 {
                // Mid-stream: the child is writing its next block.
                child.kill().unwrap();
                break;
            }
        }
    }
    let _ = child.wait();
    assert_eq!(
        acked.len(),
        40,
        "the child frontend did not get going:\n{}",
        host.log_text()
    );
    assert!(
        host.alive(),
        "vio-host died with its frontend:\n{}",
        host.log_text()
    );
    let (_guest, d) = connect(&host.socket, 1);
    for &k in &acked {
        let mut back = vec![0; 4096];
        d.read_bytes_blocking(0, 2048 + k * 8, &mut back).unwrap();
        assert!(
            back == pattern(4096, k as u8),
            "acknowledged block {k} is there after the frontend died"
        );
        assert!(host.image_bytes((2048 + k * 8) * 512, 4096) == back);
    }
}

/// The child half of [`a_killed_frontend_loses_no_acknowledged_write`]: writes and
/// flushes block after block, printing each one acknowledged, until killed. Run only
/// as that test's child process (ignored otherwise, not passed vacuously).
#[test]
#[ignore = "the child process of a_killed_frontend_loses_no_acknowledged_write"]
fn frontend_child() {
    let socket = std::env::var_os("VIO_VU_CHILD").expect("VIO_VU_CHILD names the daemon's socket");
    let (_guest, d) = connect(Path::new(&socket), 1);
    for k in 0..1000u64 {
        d.write_bytes_blocking(0, 2048 + k * 8, &pattern(4096, k as u8))
            .unwrap();
        d.flush_blocking(0).unwrap();
        println!("ACKED {k}");
        std::io::stdout().flush().unwrap();
    }
}

/// `vio-host blk --limit-iops` limits the device it serves (issue 16, item 4):
/// 4 KiB reads from 8 threads for a second pass about 500, where the unlimited
/// daemon serves thousands.
#[test]
fn the_daemon_limits_iops_when_asked() {
    let host = Host::start("limited", &["--limit-iops", "500"]);
    let (_guest, d) = connect(&host.socket, 1);
    let n = reads_in_a_second(&d);
    // Above: the limit (plus its burst of 5 and a request per thread in flight at
    // the end); below: loose, a loaded machine serves fewer.
    assert!((350..=520).contains(&n), "{n} reads in a second at 500 IOPS");
}

/// One command on `vio-host blk`'s control socket; returns the reply line.
fn control(path: &Path, command: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("control socket {}: {e}", path.display()),
        }
    };
    let mut w = stream.try_clone().unwrap();
    writeln!(w, "{command}").unwrap();
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).unwrap();
    reply.trim_end().to_string()
}

/// 4 KiB reads for a second from 8 threads (so the rate, not one request's round
/// trip, bounds them), after a few to spend the burst.
fn reads_in_a_second(d: &Driver) -> u32 {
    let mut buf = vec![0; 4096];
    for _ in 0..10 {
        d.read_bytes_blocking(0, SEED_SECTOR, &mut buf).unwrap();
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let mut buf = vec![0; 4096];
                    let mut n = 0;
                    while start.elapsed() < Duration::from_secs(1) {
                        d.read_bytes_blocking(0, SEED_SECTOR, &mut buf).unwrap();
                        assert!(buf == pattern(4096, 1), "the data is still the image's");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    })
}

/// `vio-host blk --control`: limits read and changed while the daemon serves; a
/// malformed command is answered with an error and changes nothing.
#[test]
fn the_control_socket_changes_the_limits_while_the_daemon_serves() {
    // Not the vhost-user socket's name (`vu-control-<pid>.sock`).
    let path = std::env::temp_dir().join(format!("vio-ctl-{}.sock", std::process::id()));
    let p = path.to_str().unwrap().to_string();
    let host = Host::start("control", &["--control", &p]);
    let (_guest, d) = connect(&host.socket, 1);
    assert_eq!(control(&path, "get"), "ok", "no limits at the start");
    assert_eq!(control(&path, "set iops=400"), "ok");
    let n = reads_in_a_second(&d);
    assert!((280..=420).contains(&n), "{n} reads in a second at 400 IOPS");
    let refused = control(&path, "set iops=lots");
    assert!(refused.starts_with("error: "), "{refused}");
    assert_eq!(
        control(&path, "get"),
        "ok iops=400",
        "the refused command changed nothing"
    );
    assert_eq!(control(&path, "set"), "ok");
    let n = reads_in_a_second(&d);
    assert!(n > 800, "{n} reads in a second with the limits lifted");
    let _ = std::fs::remove_file(&path);
}
