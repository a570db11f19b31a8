//! A real Linux guest under QEMU TCG as a test peer: the guest kernel's own virtio
//! drivers against vhost-user backends (ours, or qemu-storage-daemon as a reference).
//!
//! - [`prepare`]: installs QEMU if missing, fetches a Debian cloud kernel and busybox,
//!   builds the base initramfs; cached on disk ([`prepare::cache_dir`]).
//! - [`initramfs`]: busybox, the virtio modules and an `/init` that loads them and
//!   runs the test's script.
//! - [`boot`]: [`LinuxGuest::boot`] runs one [`GuestSpec`] (q35 or microvm, memfd
//!   memory, vhost-user-blk disks, a vhost-user-net port, a script) under a deadline
//!   and reads back the script's `VIO-RESULT key=value` lines.
//! - [`backend`]: a vhost-user backend process ([`Backend`]) and the
//!   qemu-storage-daemon command ([`backend::qsd_blk`]).
//! - [`apt`], [`process`]: Debian packages, and child processes under a deadline.
//!
//! ```no_run
//! use vio::linux_guest::{GuestSpec, LinuxGuest, Machine};
//! let Some(guest) = vio::linux_guest::for_test("example") else { return };
//! let spec = GuestSpec::new(Machine::Microvm, "echo VIO-RESULT cpus=$(nproc)");
//! let run = guest.boot(&spec).expect("boot");
//! assert_eq!(run.result("cpus"), Some("2"));
//! ```

pub mod apt;
pub mod backend;
pub mod boot;
pub mod initramfs;
pub mod prepare;
pub mod process;

pub use backend::{Backend, BackendError};
pub use boot::{BlkDisk, GuestError, GuestRun, GuestSpec, LinuxGuest, Machine, NetPort};
pub use prepare::{Kit, PrepareError};

/// The kit for the test `name`, prepared on first use. `None` (after saying why on
/// standard error) when this machine cannot install the prerequisites; under CI
/// (`CI` set), where they must be installable, that is a failure instead.
///
/// # Panics
/// When preparation fails for any other reason, or is impossible under CI.
pub fn for_test(name: &str) -> Option<LinuxGuest> {
    match prepare::prepare() {
        Ok(kit) => Some(LinuxGuest::new(kit)),
        Err(PrepareError::Unavailable(why)) => {
            // Says so past the harness's capture; panics under CI.
            virtio_core::test_utils::skip(name, format_args!("Linux guest unavailable: {why}"));
            None
        }
        Err(e) => panic!("Linux-guest kit for {name}: {}", report(&e)),
    }
}

/// A seed unique to this run (time and process id), so a stale image cannot pass.
#[must_use]
pub fn run_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (now.as_secs() << 30) ^ u64::from(now.subsec_nanos()) ^ (u64::from(std::process::id()) << 20) | 1
}

/// A path unique to this test process in `dir`: `name-PID.ext`.
#[must_use]
pub fn unique(dir: &std::path::Path, name: &str, ext: &str) -> std::path::PathBuf {
    dir.join(format!("{name}-{}.{ext}", std::process::id()))
}

/// Files and directories a test made, removed when it ends, passed or not.
#[derive(Debug)]
pub struct Cleanup(pub Vec<std::path::PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// `e` and its chain of causes, one per line.
pub fn report(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!("\n  caused by: {c}"));
        cause = c.source();
    }
    text
}
