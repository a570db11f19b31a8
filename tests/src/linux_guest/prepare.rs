//! Preparing the kit, once per machine and cached: QEMU installed with apt if missing,
//! a Debian cloud kernel and busybox-static downloaded and unpacked (not installed),
//! and the base initramfs built from them.
//!
//! The cache lives in `$VIO_LINUX_GUEST_DIR`, else in `linux-guest/` of the cargo
//! target directory the running binary was built in. A file lock there serializes
//! test binaries preparing at once; a mutex serializes the tests of one binary.

use super::apt::{self, AptError};
use super::initramfs::{self, InitramfsError};
use rustix::fs::{FlockOperation, flock};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where QEMU's x86 system emulator is installed.
const QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// The firmware microvm boots with (its default one pokes at the disk itself).
const QBOOT: &str = "/usr/share/qemu/qboot.rom";
/// The meta-package naming the current cloud kernel.
const KERNEL_META: &str = "linux-image-cloud-amd64";
/// The package holding a statically linked busybox.
const BUSYBOX_PACKAGE: &str = "busybox-static";
/// The environment variable that moves the cache.
pub const DIR_ENV: &str = "VIO_LINUX_GUEST_DIR";
/// How long to wait for another process preparing the same cache.
const LOCK_TIMEOUT: Duration = Duration::from_secs(900);

/// Why the kit could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// This machine cannot install the prerequisites (not root, no network): the
    /// Linux-guest tests are skipped, saying why.
    #[error("Linux-guest prerequisites cannot be installed: {0}")]
    Unavailable(String),
    /// A package step failed although installing is possible.
    #[error("Package step failed: {step}")]
    Apt {
        /// What was being done.
        step: &'static str,
        /// Why it failed.
        #[source]
        source: AptError,
    },
    /// The initramfs could not be built.
    #[error("Building the initramfs failed")]
    Initramfs(#[from] InitramfsError),
    /// A file of the cache could not be accessed.
    #[error("Could not access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something that should be there after installing is not.
    #[error("{0} is missing after installation")]
    Missing(PathBuf),
    /// Another process held the cache lock too long.
    #[error("Timed out waiting for the lock on {0}")]
    LockTimeout(PathBuf),
}

/// Everything a boot needs, all on local disk.
#[derive(Debug, Clone)]
pub struct Kit {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// microvm's firmware.
    pub qboot: PathBuf,
    /// The guest kernel (bzImage).
    pub kernel: PathBuf,
    /// The base initramfs.
    pub initramfs: PathBuf,
    /// A static busybox on the host, used to write the per-boot archives.
    pub busybox: PathBuf,
    /// The cache directory; boots keep their scratch files under `runs/` there.
    pub dir: PathBuf,
}

/// Reports a step on standard error, bypassing the test harness's capture, so a long
/// cold preparation shows what it is doing.
pub(crate) fn progress(msg: &str) {
    tracing::info!("{msg}");
    let _ = writeln!(std::io::stderr(), "linux-guest: {msg}");
}

/// An `Io` error mapper for `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PrepareError + use<> {
    let path = path.to_owned();
    move |source| PrepareError::Io { path, source }
}

/// The cache directory: `$VIO_LINUX_GUEST_DIR`, else `linux-guest/` in the cargo target
/// directory holding the running executable (the one with cargo's `CACHEDIR.TAG`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(DIR_ENV) {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let target = exe
        .ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf);
    target
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("linux-guest")
}

/// Prepares the kit (cached on disk and for the life of the process).
pub fn prepare() -> Result<Kit, PrepareError> {
    static DONE: Mutex<Option<Kit>> = Mutex::new(None);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(kit) = done.as_ref() {
        return Ok(kit.clone());
    }
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let _lock = lock(&dir)?;
    let started = Instant::now();
    let (qemu, qboot) = ensure_qemu()?;
    let (kernel_pkg, kernel_root) = ensure_kernel(&dir)?;
    let busybox = ensure_busybox(&dir)?;
    let kernel = find_vmlinuz(&kernel_root.join("boot"))?;
    let init_hash = fnv1a(initramfs::init_script().as_bytes());
    let base = dir.join(format!("initramfs-{kernel_pkg}-{init_hash:016x}.cpio"));
    if !base.is_file() {
        progress(&format!("building {}", base.display()));
        initramfs::build_base(&busybox, &kernel_root.join("lib/modules"), &base)?;
    }
    progress(&format!(
        "ready in {:.1?}: kernel {kernel_pkg}, cache {}",
        started.elapsed(),
        dir.display()
    ));
    let kit = Kit {
        qemu,
        qboot,
        kernel,
        initramfs: base,
        busybox,
        dir,
    };
    *done = Some(kit.clone());
    Ok(kit)
}

/// Takes the cache's file lock, waiting at most [`LOCK_TIMEOUT`].
fn lock(dir: &Path) -> Result<std::fs::File, PrepareError> {
    let path = dir.join(".lock");
    let file = std::fs::File::create(&path).map_err(io(&path))?;
    let deadline = Instant::now() + LOCK_TIMEOUT;
    let mut announced = false;
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                if !announced {
                    progress("waiting for another process preparing the same cache");
                    announced = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(PrepareError::LockTimeout(path)),
            Err(e) => {
                return Err(PrepareError::Io {
                    path,
                    source: e.into(),
                });
            }
        }
    }
}

/// Whether this process runs as root (apt-get install needs it).
fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Classifies a failed package step: no network makes it [`PrepareError::Unavailable`].
fn apt_failure(step: &'static str, source: AptError) -> PrepareError {
    let mirror = apt::machine_sources().into_iter().next().map(|s| s.uri);
    match mirror {
        Some(uri) if !apt::reachable(&uri) => {
            PrepareError::Unavailable(format!("no network ({uri} unreachable)"))
        }
        None => PrepareError::Unavailable("no apt source is configured".to_owned()),
        _ => PrepareError::Apt { step, source },
    }
}

/// QEMU and qboot, installed from the distribution's backports (derived from the
/// machine's own mirror) when missing.
fn ensure_qemu() -> Result<(PathBuf, PathBuf), PrepareError> {
    let (qemu, qboot) = (PathBuf::from(QEMU), PathBuf::from(QBOOT));
    if qemu.is_file() && qboot.is_file() {
        return Ok((qemu, qboot));
    }
    if !is_root() {
        return Err(PrepareError::Unavailable(
            "qemu-system-x86 is not installed and installing it needs root".into(),
        ));
    }
    let sources = apt::machine_sources();
    let release = apt::codename().and_then(|c| {
        let backports = format!("{c}-backports");
        if sources.iter().any(|s| s.suites.contains(&backports)) {
            return Some(backports);
        }
        let source = apt::backports_source(&sources, &c)?;
        match apt::add_source(&source) {
            Ok(path) => {
                progress(&format!(
                    "added {backports} from {} in {}",
                    source.uri,
                    path.display()
                ));
                Some(backports)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not add backports; installing the default version");
                None
            }
        }
    });
    progress("apt-get update");
    apt::update().map_err(|e| apt_failure("apt-get update", e))?;
    progress(&format!(
        "installing qemu-system-x86 from {}",
        release.as_deref().unwrap_or("the default suite")
    ));
    apt::install(&["qemu-system-x86"], release.as_deref()).map_err(|e| apt_failure("installing QEMU", e))?;
    for path in [&qemu, &qboot] {
        if !path.is_file() {
            return Err(PrepareError::Missing(path.clone()));
        }
    }
    Ok((qemu, qboot))
}

/// The versioned cloud kernel, downloaded and unpacked under `dir/kernel/`; the return
/// is its package name and unpacked root.
fn ensure_kernel(dir: &Path) -> Result<(String, PathBuf), PrepareError> {
    // A kernel unpacked before serves as it is: no apt look-up, so warm runs are quick
    // and work offline; a newer kernel comes with an emptied cache.
    let kernels = dir.join("kernel");
    let cached = std::fs::read_dir(&kernels)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    if let Some(root) = cached.filter(|p| p.join(".done").is_file()).max() {
        let package = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok((package, root));
    }
    let package = match apt::resolve(KERNEL_META) {
        Ok(p) => p,
        // An image whose package lists were never fetched knows no kernel yet.
        Err(_) if is_root() => {
            progress("apt-get update (no kernel package known)");
            apt::update().map_err(|e| apt_failure("apt-get update", e))?;
            apt::resolve(KERNEL_META).map_err(|e| apt_failure("resolving the kernel package", e))?
        }
        Err(e) => return Err(apt_failure("resolving the kernel package", e)),
    };
    let root = kernels.join(&package);
    fetch_unpacked(&package, &root, "downloading the kernel")?;
    Ok((package, root))
}

/// busybox-static, downloaded and unpacked under `dir/busybox/`.
fn ensure_busybox(dir: &Path) -> Result<PathBuf, PrepareError> {
    let root = dir.join("busybox");
    fetch_unpacked(BUSYBOX_PACKAGE, &root, "downloading busybox")?;
    let busybox = root.join("bin/busybox");
    if busybox.is_file() {
        Ok(busybox)
    } else {
        Err(PrepareError::Missing(busybox))
    }
}

/// Downloads and unpacks `package` into `root` unless a completed unpack is there.
fn fetch_unpacked(package: &str, root: &Path, step: &'static str) -> Result<(), PrepareError> {
    if root.join(".done").is_file() {
        return Ok(());
    }
    progress(&format!("{step}: {package}"));
    let partial = root.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    apt::download_and_unpack(package, &partial.join("deb"), &partial).map_err(|e| apt_failure(step, e))?;
    std::fs::remove_dir_all(partial.join("deb")).map_err(io(&partial))?;
    if root.exists() {
        std::fs::remove_dir_all(root).map_err(io(root))?;
    }
    std::fs::rename(&partial, root).map_err(io(root))?;
    std::fs::write(root.join(".done"), package).map_err(io(root))
}

/// The one `vmlinuz-*` in `boot`.
fn find_vmlinuz(boot: &Path) -> Result<PathBuf, PrepareError> {
    let entries = std::fs::read_dir(boot).map_err(io(boot))?;
    entries
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| PrepareError::Missing(boot.join("vmlinuz-*")))
}

/// FNV-1a: a hash stable across Rust releases, naming cached archives by their content.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
