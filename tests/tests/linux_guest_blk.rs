//! A real Linux guest's virtio-blk driver against vhost-user-blk daemons: ours
//! (`vio vhost-serve`, the `vio-host blk` daemon's code) and, as the reference that
//! proves the kit itself, qemu-storage-daemon. The daemon serves a host-seeded
//! image; the guest kernel reads it, writes a new pattern with O_DIRECT and a flush,
//! and reads it back; the host checks the guest's checksums and then the image
//! itself. Over virtio-pci (q35) and virtio-mmio (microvm), with 2 queues. And a
//! QEMU killed after its guest synced a write: the next QEMU on the same daemon
//! reads it back.
//!
//! Two tests prove the kit's own failure paths: a hung guest is killed at its
//! deadline with its console in the error, and a failing script fails the boot.
//!
//! Skipped, saying so, only where the kit's prerequisites cannot be installed (not
//! root, no network) and `CI` is unset.

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use vio::linux_guest::{Backend, BlkDisk, Cleanup, GuestError, GuestSpec, Machine, backend, report, unique};

/// The image size; the guest overwrites its second half.
const IMAGE_BYTES: usize = 8 << 20;
/// The queues the device offers (and the guest has CPUs for).
const QUEUES: u16 = 2;

/// A vhost-user-blk daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Daemon {
    /// Ours: `vio vhost-serve`.
    Ours,
    /// qemu-storage-daemon.
    Qsd,
}

/// The command that runs `daemon` on `image` at `socket`.
fn blk_backend(daemon: Daemon, image: &Path, socket: &Path) -> (&'static str, Command) {
    match daemon {
        Daemon::Ours => {
            let program = Path::new(env!("CARGO_BIN_EXE_vio"));
            let mut cmd = backend::vio_blk(program, image, socket, QUEUES, Duration::ZERO);
            cmd.env("RUST_LOG", "debug");
            ("vio vhost-serve", cmd)
        }
        Daemon::Qsd => ("qemu-storage-daemon", backend::qsd_blk(image, socket, QUEUES)),
    }
}

/// A seed unique to this run, so a stale image cannot pass.
fn seed() -> u64 {
    vio::linux_guest::run_seed()
}

/// `len` bytes of xorshift64 output from `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What `yes "$token" | head -c len` prints.
fn yes_output(token: &str, len: usize) -> Vec<u8> {
    let line = format!("{token}\n");
    line.as_bytes().iter().copied().cycle().take(len).collect()
}

/// The guest's side: check the queues and the transport, checksum the seeded disk,
/// overwrite its second half with O_DIRECT and a flush, checksum it again with the
/// page cache dropped and O_DIRECT reads.
fn guest_script(token: &str) -> String {
    let half = IMAGE_BYTES / 2;
    let (mib, half_mib) = (IMAGE_BYTES >> 20, half >> 20);
    format!(
        r#"set -e
set -o pipefail
sum() {{ sha256sum | cut -d' ' -f1; }}
echo "VIO-RESULT queues=$(ls /sys/block/vda/mq | wc -l)"
echo "VIO-RESULT bytes=$(( $(cat /sys/block/vda/size) * 512 ))"
virtio_dev=$(readlink -f /sys/block/vda/device)
echo "VIO-RESULT transport=$(basename "$(readlink -f "$virtio_dev/../driver")")"
# The negotiated feature bits, one character per bit from bit 0.
echo "VIO-RESULT features=$(cat "$virtio_dev/features")"
echo "VIO-RESULT seeded=$(dd if=/dev/vda bs=1M count={mib} iflag=direct 2>/dev/null | sum)"
# yes ends on SIGPIPE when head has enough, which pipefail would count as failure.
(yes "{token}" || true) | head -c {half} > /pattern
echo "VIO-RESULT written=$(sum < /pattern)"
dd if=/pattern of=/dev/vda bs=1M seek={half_mib} oflag=direct conv=fsync,notrunc 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
echo "VIO-RESULT readback=$(dd if=/dev/vda bs=1M skip={half_mib} count={half_mib} iflag=direct 2>/dev/null | sum)"
echo "VIO-RESULT final=$(sum < /dev/vda)"
"#
    )
}

/// Seeds an image, serves it with `daemon`, boots `machine` against it and checks
/// every checksum.
fn round_trip(daemon: Daemon, machine: Machine, name: &str) {
    round_trip_with(daemon, machine, name, false);
}

/// [`round_trip`], with QEMU allowed to negotiate the packed ring when `packed`.
fn round_trip_with(daemon: Daemon, machine: Machine, name: &str, packed: bool) {
    let Some(guest) = vio::linux_guest::for_test(name) else {
        return;
    };
    // Images on the cache's disk (ext4 under the target directory: O_DIRECT works and
    // tmpfs is never used); the socket under the temporary directory, whose path is
    // short enough for sun_path.
    let images = guest.kit().dir.join("images");
    std::fs::create_dir_all(&images).expect("images directory");
    let image = unique(&images, name, "img");
    let socket = unique(&std::env::temp_dir(), &format!("vio-{name}"), "sock");
    let written = unique(&images, &format!("{name}-written"), "bin");
    let _cleanup = Cleanup(vec![image.clone(), written.clone()]);
    let seed = seed();
    let seeded = pattern(seed, IMAGE_BYTES);
    std::fs::write(&image, &seeded).expect("seed the image");
    let token = format!("vio-{name}-{seed:016x}");

    let host_seeded = guest.sha256(&image).expect("hash the seeded image");
    let (backend_name, cmd) = blk_backend(daemon, &image, &socket);
    let backend = Backend::spawn(backend_name, cmd, &socket).unwrap_or_else(|e| panic!("{}", report(&e)));
    let mut spec = GuestSpec::new(machine, guest_script(&token));
    spec.disks.push(BlkDisk {
        socket: socket.clone(),
        num_queues: QUEUES,
        packed,
        // The packed run also lets QEMU offer IN_ORDER: the guest takes it if its
        // kernel's virtio_ring does (the 6.1 kernel of the kit does not).
        in_order: packed,
        reconnect: None,
    });
    spec.timeout = Duration::from_secs(90);
    let run = match guest.boot(&spec) {
        Ok(run) => run,
        Err(e) => panic!("{}\n{backend_name} log:\n{}", report(&e), backend.log_tail()),
    };
    backend.stop().unwrap_or_else(|e| panic!("{}", report(&e)));
    eprintln!("{name}: guest booted and ran in {:.1?}", run.elapsed);

    assert_eq!(
        run.required("queues"),
        QUEUES.to_string(),
        "blk-mq hardware queues"
    );
    assert_eq!(run.required("bytes"), IMAGE_BYTES.to_string(), "capacity");
    // VIRTIO_F_RING_PACKED is bit 34.
    assert_eq!(
        run.required("features").as_bytes().get(34),
        Some(if packed { &b'1' } else { &b'0' }),
        "the ring format the guest's driver negotiated: {}",
        run.required("features")
    );
    // VIRTIO_F_IN_ORDER is bit 35: offered on the packed run, taken or not by the
    // guest's kernel; whichever, the checks below hold.
    eprintln!(
        "{name}: the guest negotiated VIRTIO_F_IN_ORDER: {}",
        run.required("features").as_bytes().get(35) == Some(&b'1')
    );
    assert_eq!(
        run.required("transport"),
        machine.transport_driver(),
        "the driver of the disk's transport"
    );
    assert_eq!(
        run.required("seeded"),
        host_seeded,
        "what the guest read of the seeded image"
    );

    let mut wanted = seeded;
    wanted[IMAGE_BYTES / 2..].copy_from_slice(&yes_output(&token, IMAGE_BYTES / 2));
    std::fs::write(&written, &wanted[IMAGE_BYTES / 2..]).expect("write the expected half");
    let host_written = guest.sha256(&written).expect("hash the expected half");
    assert_eq!(
        run.required("written"),
        host_written,
        "the pattern the guest generated"
    );
    assert_eq!(
        run.required("readback"),
        host_written,
        "what the guest read back of its write"
    );

    let image_now = std::fs::read(&image).expect("read the image back");
    assert!(
        image_now == wanted,
        "the image on the host holds the seed and then the guest's pattern"
    );
    assert_eq!(
        run.required("final"),
        guest.sha256(&image).expect("hash the final image"),
        "the guest's view"
    );
}

#[test]
fn q35_virtio_pci_guest_reads_writes_and_flushes_through_our_daemon() {
    round_trip(Daemon::Ours, Machine::Q35, "q35-ours");
}

/// A Linux guest's own packed-ring driver (virtio_ring, `packed=on` in QEMU)
/// against our daemon's packed device side: the same reads, writes and flushes.
#[test]
fn q35_guest_over_packed_rings_reads_writes_and_flushes_through_our_daemon() {
    round_trip_with(Daemon::Ours, Machine::Q35, "q35-packed", true);
}

#[test]
fn microvm_virtio_mmio_guest_reads_writes_and_flushes_through_our_daemon() {
    round_trip(Daemon::Ours, Machine::Microvm, "microvm-ours");
}

#[test]
fn q35_virtio_pci_guest_reads_writes_and_flushes_through_qsd() {
    round_trip(Daemon::Qsd, Machine::Q35, "q35");
}

#[test]
fn microvm_virtio_mmio_guest_reads_writes_and_flushes_through_qsd() {
    round_trip(Daemon::Qsd, Machine::Microvm, "microvm");
}

#[test]
fn a_hanging_guest_is_killed_at_its_deadline_with_its_console_in_the_error() {
    let Some(guest) = vio::linux_guest::for_test("hang") else {
        return;
    };
    let mut spec = GuestSpec::new(Machine::Microvm, "echo VIO-RESULT started=1\nsleep 600\n");
    spec.timeout = Duration::from_secs(20);
    let started = std::time::Instant::now();
    match guest.boot(&spec) {
        Err(GuestError::Timeout { console, .. }) => {
            assert!(
                console.contains("VIO-RESULT started=1"),
                "the script ran before the deadline:\n{console}"
            )
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "QEMU was killed at the deadline"
    );
}

#[test]
fn a_failing_script_fails_the_boot_with_its_status() {
    let Some(guest) = vio::linux_guest::for_test("fail") else {
        return;
    };
    let spec = GuestSpec::new(Machine::Microvm, "echo VIO-RESULT before=1\nexit 3\n");
    match guest.boot(&spec) {
        Err(GuestError::ScriptFailed { status, console }) => {
            assert_eq!(status, 3);
            assert!(console.contains("VIO-RESULT before=1"), "{console}");
        }
        other => panic!("expected the script's failure, got {other:?}"),
    }
}

/// The frontend dies, not the daemon: QEMU is killed while its guest sleeps after
/// an O_DIRECT write and an fsync. A second QEMU, on the same daemon process,
/// reads the synced bytes back; the host finds them in the image too.
#[test]
fn a_killed_qemu_loses_no_synced_write_and_our_daemon_serves_the_next_one() {
    let name = "killed-qemu";
    let Some(guest) = vio::linux_guest::for_test(name) else {
        return;
    };
    let images = guest.kit().dir.join("images");
    std::fs::create_dir_all(&images).expect("images directory");
    let image = unique(&images, name, "img");
    let socket = unique(&std::env::temp_dir(), &format!("vio-{name}"), "sock");
    let _cleanup = Cleanup(vec![image.clone()]);
    std::fs::write(&image, pattern(seed(), IMAGE_BYTES)).expect("seed the image");
    let token = format!("vio-{name}-{:016x}", seed());
    let (backend_name, cmd) = blk_backend(Daemon::Ours, &image, &socket);
    let backend = Backend::spawn(backend_name, cmd, &socket).unwrap_or_else(|e| panic!("{}", report(&e)));

    // One MiB of the token at 1 MiB, written with O_DIRECT and synced; then the
    // guest idles until QEMU is killed at the deadline.
    let write = format!(
        "set -e\n(yes \"{token}\" || true) | head -c 1048576 > /chunk\n\
         dd if=/chunk of=/dev/vda bs=1M seek=1 oflag=direct conv=fsync,notrunc 2>/dev/null\n\
         echo VIO-RESULT synced=1\nsleep 600\n"
    );
    let mut spec = GuestSpec::new(Machine::Microvm, write);
    spec.disks.push(BlkDisk {
        socket: socket.clone(),
        num_queues: QUEUES,
        packed: false,
        in_order: false,
        reconnect: None,
    });
    spec.timeout = Duration::from_secs(30);
    match guest.boot(&spec) {
        Err(GuestError::Timeout { console, .. }) => assert!(
            console.contains("VIO-RESULT synced=1"),
            "the guest synced before QEMU was killed:\n{console}\n{}",
            backend.log_tail()
        ),
        other => panic!("expected QEMU to be killed at the deadline, got {other:?}"),
    }

    let read = "echo \"VIO-RESULT chunk=$(dd if=/dev/vda bs=1M skip=1 count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)\"\n";
    let mut spec = GuestSpec::new(Machine::Microvm, read);
    spec.disks.push(BlkDisk {
        socket: socket.clone(),
        num_queues: QUEUES,
        packed: false,
        in_order: false,
        reconnect: None,
    });
    spec.timeout = Duration::from_secs(90);
    let run = guest
        .boot(&spec)
        .unwrap_or_else(|e| panic!("{}\n{}", report(&e), backend.log_tail()));
    let log = backend.stop().unwrap_or_else(|e| panic!("{}", report(&e)));
    let chunk = images.join(format!("{name}-{}-chunk.bin", std::process::id()));
    let _chunk_cleanup = Cleanup(vec![chunk.clone()]);
    std::fs::write(&chunk, yes_output(&token, 1 << 20)).expect("write the expected chunk");
    let want = guest.sha256(&chunk).expect("hash the expected chunk");
    assert_eq!(
        run.result("chunk"),
        Some(want.as_str()),
        "the second guest reads the synced MiB\n{log}"
    );
    let image_now = std::fs::read(&image).expect("read the image back");
    assert!(
        image_now[1 << 20..2 << 20] == yes_output(&token, 1 << 20)[..],
        "the synced MiB is in the image"
    );
    // One daemon process, spawned once above, served both QEMUs.
}
