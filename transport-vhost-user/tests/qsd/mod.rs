//! A qemu-storage-daemon serving a raw image on ext4 as a vhost-user-blk export, for
//! the tests; and a transport wrapper that lets several drivers share one connection.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport_vhost_user::{VhostUserOptions, VhostUserTransport};
use virtio_core::QueueAddrs;
use virtio_core::lifecycle::ControlPlane;
use virtio_core::notify::EventFdNotifier;
use virtio_core::transport::{Transport, TransportError};

pub const QSD: &str = "/usr/bin/qemu-storage-daemon";
pub const IMAGE_BYTES: u64 = 32 << 20;
pub const GUEST_BYTES: u64 = 64 << 20;

/// Whether the daemon is installed; if not, the test `test` is skipped, saying so
/// ([`virtio_core::test_utils::skip`]: a failure under CI).
pub fn available(test: &str) -> bool {
    let found = Path::new(QSD).exists();
    if !found {
        virtio_core::test_utils::skip(
            test,
            format_args!("{QSD} is not installed (Debian package qemu-utils)"),
        );
    }
    found
}

/// A running qemu-storage-daemon; killed on drop, its log printed if the test failed.
pub struct Qsd {
    child: Option<Child>,
    pub image: PathBuf,
    pub socket: PathBuf,
    log: PathBuf,
    sock_dir: PathBuf,
}

/// A directory for images on a file system that supports O_DIRECT and hole punching:
/// the cargo target dir, unless that is tmpfs.
fn image_dir() -> PathBuf {
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&target).unwrap();
    // TMPFS_MAGIC, in whatever integer type this platform's statfs uses.
    let tmpfs = rustix::fs::statfs(&target).is_ok_and(|s| s.f_type == 0x0102_1994);
    if tmpfs { PathBuf::from("/var/tmp") } else { target }
}

impl Qsd {
    /// Creates a sparse image, lets `seed` write into it, and exports it with
    /// `queues` queues.
    pub fn start(name: &str, queues: u16, seed: impl FnOnce(&File)) -> Qsd {
        let tag = format!("vu-{name}-{}", std::process::id());
        let image = image_dir().join(format!("{tag}.img"));
        let log = image.with_extension("log");
        // Unix socket paths are short (108 bytes): keep it in the temp dir.
        let sock_dir = std::env::temp_dir().join(&tag);
        let _ = std::fs::remove_dir_all(&sock_dir);
        std::fs::create_dir_all(&sock_dir).unwrap();
        let socket = sock_dir.join("sock");
        let file = File::create(&image).unwrap();
        file.set_len(IMAGE_BYTES).unwrap();
        seed(&file);
        file.sync_all().unwrap();
        drop(file);
        let child = Command::new(QSD)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct=on,aio=io_uring,discard=unmap",
                image.display()
            ))
            .arg("--blockdev")
            .arg("driver=raw,node-name=disk0,file=file0,discard=unmap")
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("qemu-storage-daemon starts");
        let mut qsd = Qsd {
            child: Some(child),
            image,
            socket,
            log,
            sock_dir,
        };
        qsd.wait_for_socket();
        qsd
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("qemu-storage-daemon exited with {status}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "no socket after 10 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon's standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the daemon (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Connects a transport over fresh guest memory.
    pub fn connect(&self, memory: Arc<hypervisor::GuestMemory>) -> VhostUserTransport {
        VhostUserTransport::connect(&self.socket, memory, VhostUserOptions::blk())
            .unwrap_or_else(|e| panic!("connect: {e:?}\n{}", self.log()))
    }

    /// Reads `len` bytes of the image at `offset`, as the host sees them.
    pub fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        File::open(&self.image)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("qemu-storage-daemon log:\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.image);
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_dir_all(&self.sock_dir);
    }
}

/// A transport shared by successive drivers (each driver owns its transport), that
/// can also report more sectors than the device has, so a request past the real
/// capacity passes the driver's own check and reaches the device.
pub struct Shared {
    pub inner: Arc<VhostUserTransport>,
    pub extra_sectors: u64,
}

impl ControlPlane for Shared {
    fn device_id(&self) -> u32 {
        self.inner.device_id()
    }
    fn config_len(&self) -> usize {
        self.inner.config_len()
    }
    fn device_features(&self) -> u64 {
        self.inner.device_features()
    }
    fn set_driver_features(&self, features: u64) {
        self.inner.set_driver_features(features);
    }
    fn status(&self) -> u8 {
        self.inner.status()
    }
    fn set_status(&self, status: u8) {
        self.inner.set_status(status);
    }
    fn config_generation(&self) -> u32 {
        self.inner.config_generation()
    }
    fn read_config(&self, offset: usize, buf: &mut [u8]) {
        self.inner.read_config(offset, buf);
        if offset == 0 && buf.len() >= 8 && self.extra_sectors > 0 {
            let cap = u64::from_le_bytes(buf[..8].try_into().unwrap()) + self.extra_sectors;
            buf[..8].copy_from_slice(&cap.to_le_bytes());
        }
    }
    fn write_config(&self, offset: usize, data: &[u8]) {
        self.inner.write_config(offset, data);
    }
}

impl Transport for Shared {
    type Interrupt = EventFdNotifier;

    fn num_queues(&self) -> u16 {
        self.inner.num_queues()
    }
    fn queue_max_size(&self, index: u16) -> u16 {
        self.inner.queue_max_size(index)
    }
    fn setup_queue(&self, index: u16, size: u16, addrs: QueueAddrs) -> Result<(), TransportError> {
        self.inner.setup_queue(index, size, addrs)
    }
    fn notify_queue(&self, index: u16) -> Result<(), TransportError> {
        self.inner.notify_queue(index)
    }
    fn interrupt(&self, index: u16) -> Result<EventFdNotifier, TransportError> {
        self.inner.interrupt(index)
    }
}
