//! The guest's initramfs: busybox, the kernel's virtio modules and an `/init` that loads
//! them and runs the test's script. The base archive is built once per kernel; each
//! boot appends a small archive holding its script, since the kernel unpacks
//! concatenated newc archives in order (Documentation/driver-api/early-userspace).

use super::process::{self, CommandError};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long busybox may take to write an archive.
const CPIO_TIMEOUT: Duration = Duration::from_secs(60);

/// The virtio modules in dependency order (kernel 6.1 builds them as modules).
pub const MODULES: [&str; 10] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
];

/// Where the guest finds the test's script.
pub const SCRIPT_PATH: &str = "/vio/script.sh";

/// The line `/init` prints with the script's exit status, just before powering off.
pub const EXIT_MARKER: &str = "VIO-EXIT status=";

/// The guest's `/init`. Everything it prints goes to the serial console; the kernel
/// reboots on panic (`panic=-1`) and QEMU runs with `-no-reboot`, so every path ends
/// the VM.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in @MODULES@; do
    insmod /lib/modules/$m.ko || echo "VIO-INIT insmod $m failed"
done
echo "VIO-INIT ready"
sh @SCRIPT@
echo "@EXIT@$?"
sync
poweroff -f
sleep 5
reboot -f
"#;

/// Why an initramfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// A file could not be read, written or copied.
    #[error("Could not access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel package ships no such module (it may be built in or compressed).
    #[error("Kernel module {0}.ko not found under the unpacked kernel")]
    MissingModule(String),
    /// busybox cpio failed.
    #[error("Writing the archive failed")]
    Cpio(#[from] CommandError),
}

/// An `Io` error mapper for `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InitramfsError + use<> {
    let path = path.to_owned();
    move |source| InitramfsError::Io { path, source }
}

/// The text of `/init`.
pub fn init_script() -> String {
    INIT.replace("@MODULES@", &MODULES.join(" "))
        .replace("@SCRIPT@", SCRIPT_PATH)
        .replace("@EXIT@", EXIT_MARKER)
}

/// Finds `name.ko` anywhere under `dir`.
fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    let wanted = format!("{name}.ko");
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if entry.file_name().to_str() == Some(wanted.as_str()) {
                return Some(path);
            }
        }
    }
    None
}

/// Archives the tree at `staging` as newc into `out`, with busybox's own cpio.
fn archive(busybox: &Path, staging: &Path, out: &Path) -> Result<(), InitramfsError> {
    let script = format!(
        "'{0}' find . | '{0}' cpio -o -H newc > '{1}'",
        busybox.display(),
        out.display()
    );
    process::run(
        Command::new(busybox)
            .args(["sh", "-c", &script])
            .current_dir(staging),
        CPIO_TIMEOUT,
    )?;
    Ok(())
}

/// Builds the base archive at `out`: busybox as `/bin/busybox`, the modules of
/// [`MODULES`] found under `modules_dir` flat in `/lib/modules`, and `/init`.
pub fn build_base(busybox: &Path, modules_dir: &Path, out: &Path) -> Result<(), InitramfsError> {
    let staging = out.with_extension("staging");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    for dir in ["bin", "lib/modules", "proc", "sys", "dev", "vio"] {
        let d = staging.join(dir);
        std::fs::create_dir_all(&d).map_err(io(&d))?;
    }
    let bb = staging.join("bin/busybox");
    std::fs::copy(busybox, &bb).map_err(io(&bb))?;
    for name in MODULES {
        let module =
            find_module(modules_dir, name).ok_or_else(|| InitramfsError::MissingModule(name.to_owned()))?;
        let to = staging.join(format!("lib/modules/{name}.ko"));
        std::fs::copy(&module, &to).map_err(io(&to))?;
    }
    let init = staging.join("init");
    std::fs::write(&init, init_script()).map_err(io(&init))?;
    set_executable(&init)?;
    let partial = out.with_extension("partial");
    archive(busybox, &staging, &partial)?;
    std::fs::rename(&partial, out).map_err(io(out))?;
    std::fs::remove_dir_all(&staging).map_err(io(&staging))
}

/// Marks `path` executable (the kernel runs `/init` directly).
fn set_executable(path: &Path) -> Result<(), InitramfsError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(io(path))
}

/// Writes the initramfs of one boot at `out`: the base archive followed by one holding
/// `script` at [`SCRIPT_PATH`]. `scratch` is a directory of the boot's own.
pub fn build_for_run(
    busybox: &Path,
    base: &Path,
    script: &str,
    scratch: &Path,
    out: &Path,
) -> Result<(), InitramfsError> {
    let staging = scratch.join("script-root");
    let file = staging.join(SCRIPT_PATH.trim_start_matches('/'));
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::write(&file, script).map_err(io(&file))?;
    set_executable(&file)?;
    let extra = scratch.join("script.cpio");
    archive(busybox, &staging, &extra)?;
    let mut bytes = std::fs::read(base).map_err(io(base))?;
    // Each archive in the sequence starts on a 4-byte boundary (newc alignment).
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    bytes.extend(std::fs::read(&extra).map_err(io(&extra))?);
    std::fs::write(out, bytes).map_err(io(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_loads_every_module_then_runs_the_script_and_reports_its_status() {
        let init = init_script();
        assert!(init.contains("for m in virtio_ring virtio virtio_pci_modern_dev"));
        assert!(init.contains("sh /vio/script.sh\necho \"VIO-EXIT status=$?\""));
        assert!(!init.contains('@'), "every placeholder is filled: {init}");
    }
}
