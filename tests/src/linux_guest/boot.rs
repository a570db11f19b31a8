//! One boot of the Linux guest under QEMU TCG: the command line for a [`GuestSpec`],
//! the serial console captured, the run bounded by a deadline (a dead vhost-user
//! backend makes QEMU hang rather than exit), and the script's `VIO-RESULT` lines read
//! back.

use super::initramfs::{self, EXIT_MARKER, InitramfsError};
use super::prepare::Kit;
use super::process::{self, TAIL_BYTES};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The prefix of a result line the guest's script prints: `VIO-RESULT key=value`.
pub const RESULT_MARKER: &str = "VIO-RESULT ";

/// The kernel command line: serial console, reboot (and so exit, with `-no-reboot`) on
/// panic, and quiet enough that the console holds mostly the script's output.
const CMDLINE: &str = "console=ttyS0 panic=-1 loglevel=4 rdinit=/init";

/// The TSC rate the guest is told when the host's is unknown.
const DEFAULT_TSC_KHZ: u64 = 2_000_000;

/// The host's CPU clock in kHz, from `/proc/cpuinfo`. Under TCG the guest's TSC is the
/// host's, and a guest that must calibrate it itself against the PIT fails now and
/// then on a busy host; on microvm (no HPET, no ACPI PM timer to fall back on) the
/// kernel then hangs in its timer setup. Telling it the rate (`tsc_early_khz`) skips
/// the calibration; a rate somewhat off only skews the guest's clock.
fn host_tsc_khz() -> u64 {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mhz = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("cpu MHz")?
            .split(':')
            .nth(1)?
            .trim()
            .parse::<f64>()
            .ok()
    });
    match mhz {
        // In range, so the conversion is exact enough and cannot wrap.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Some(mhz) if (1.0..1e6).contains(&mhz) => (mhz * 1000.0).round() as u64,
        _ => DEFAULT_TSC_KHZ,
    }
}

/// How long hashing an image on the host may take.
const HASH_TIMEOUT: Duration = Duration::from_secs(60);

/// The machine type and with it the virtio transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// q35 with virtio over PCI (`vhost-user-blk-pci`, `virtio-net-pci`).
    Q35,
    /// microvm with virtio over MMIO (`vhost-user-blk`, `virtio-net-device`), modern
    /// (virtio 1.x) devices only.
    Microvm,
}

impl Machine {
    /// The Linux driver of the guest's virtio transport on this machine.
    pub fn transport_driver(self) -> &'static str {
        match self {
            Machine::Q35 => "virtio-pci",
            Machine::Microvm => "virtio-mmio",
        }
    }
}

/// A vhost-user-blk disk; the guest sees the first as `/dev/vda`.
#[derive(Debug, Clone)]
pub struct BlkDisk {
    /// The backend's listening socket.
    pub socket: PathBuf,
    /// How many request queues the device offers (`num-queues`).
    pub num_queues: u16,
    /// Lets QEMU negotiate the packed ring (`packed=on`, virtio 1.2 §2.8) with the
    /// guest and the backend.
    pub packed: bool,
    /// Lets QEMU negotiate VIRTIO_F_IN_ORDER (`in_order=on`) with the guest and the
    /// backend.
    pub in_order: bool,
    /// When set, QEMU reconnects to the socket this often after the backend went
    /// away (`reconnect-ms` of the socket chardev; QEMU before 9.2 spelled it
    /// `reconnect=` in seconds), and resubmits on reconnection what the backend had
    /// in flight if the backend offers `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`. When
    /// unset, a backend that goes away leaves the device stopped for good.
    pub reconnect: Option<Duration>,
}

/// A vhost-user-net interface; the guest sees it as `eth0`.
#[derive(Debug, Clone)]
pub struct NetPort {
    /// The backend's listening socket.
    pub socket: PathBuf,
    /// The interface's MAC address.
    pub mac: [u8; 6],
    /// Lets QEMU negotiate the packed ring (`packed=on`, virtio 1.2 §2.8) on the
    /// interface's virtio-net device with the guest and the backend.
    pub packed: bool,
    /// Lets QEMU negotiate VIRTIO_F_IN_ORDER (`in_order=on`) on the interface's
    /// virtio-net device with the guest and the backend.
    pub in_order: bool,
}

/// What to boot and what to run in it.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// The machine type.
    pub machine: Machine,
    /// Guest memory in MiB, a shared memfd (vhost-user backends map it).
    pub memory_mib: u32,
    /// Virtual CPUs; a disk gets at most one queue per CPU in Linux, so 2 queues need 2.
    pub cpus: u8,
    /// vhost-user-blk disks.
    pub disks: Vec<BlkDisk>,
    /// A vhost-user-net interface.
    pub net: Option<NetPort>,
    /// The shell script `/init` runs (busybox sh) once the virtio modules are loaded;
    /// its exit status is the boot's. It reports results as `VIO-RESULT key=value`.
    pub script: String,
    /// How long the whole boot may take before QEMU is killed.
    pub timeout: Duration,
}

impl GuestSpec {
    /// A spec with 256 MiB, 2 CPUs, no devices and a 60-second deadline.
    pub fn new(machine: Machine, script: impl Into<String>) -> Self {
        Self {
            machine,
            memory_mib: 256,
            cpus: 2,
            disks: Vec::new(),
            net: None,
            script: script.into(),
            timeout: Duration::from_secs(60),
        }
    }
}

/// What a finished boot left.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// Everything the serial console printed.
    pub console: String,
    /// The `VIO-RESULT` pairs, a later one replacing an earlier one of the same key.
    pub results: BTreeMap<String, String>,
    /// How long the boot took, QEMU's start to its exit.
    pub elapsed: Duration,
}

impl GuestRun {
    /// The value the script reported for `key`.
    pub fn result(&self, key: &str) -> Option<&str> {
        self.results.get(key).map(String::as_str)
    }

    /// The value the script must have reported for `key`.
    ///
    /// # Panics
    /// When it did not, quoting the console: for tests.
    pub fn required(&self, key: &str) -> &str {
        self.result(key)
            .unwrap_or_else(|| panic!("no {key} result; console:\n{}", self.console))
    }
}

/// Why a boot did not end with the script succeeding.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A scratch file could not be written.
    #[error("Could not access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The boot's initramfs could not be built.
    #[error("Building the boot's initramfs failed")]
    Initramfs(#[from] InitramfsError),
    /// A device's socket does not exist (its backend is not up).
    #[error("No backend socket at {0}")]
    NoSocket(PathBuf),
    /// QEMU could not be started.
    #[error("Could not start QEMU")]
    Spawn(#[source] std::io::Error),
    /// The boot ran past its deadline; QEMU was killed.
    #[error("Guest did not power off within {timeout:?}; console ends with:\n{console}\nQEMU said:\n{qemu}")]
    Timeout {
        /// The deadline.
        timeout: Duration,
        /// The end of the console.
        console: String,
        /// The end of QEMU's own output.
        qemu: String,
    },
    /// QEMU exited before the script finished (a QEMU error, a kernel panic).
    #[error(
        "QEMU exited ({status}) before the script finished; console ends with:\n{console}\nQEMU said:\n{qemu}"
    )]
    Aborted {
        /// How QEMU exited.
        status: std::process::ExitStatus,
        /// The end of the console.
        console: String,
        /// The end of QEMU's own output.
        qemu: String,
    },
    /// The script exited with a failure status.
    #[error("Guest script exited with status {status}; console ends with:\n{console}")]
    ScriptFailed {
        /// Its exit status.
        status: i32,
        /// The end of the console.
        console: String,
    },
    /// Waiting for QEMU failed.
    #[error("Could not wait for QEMU")]
    Wait(#[source] std::io::Error),
}

/// `aa:bb:cc:dd:ee:ff`.
fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// QEMU's arguments for `spec`, booting `kit`'s kernel with `initrd`.
pub fn qemu_args(kit: &Kit, spec: &GuestSpec, initrd: &Path) -> Vec<OsString> {
    let mem = spec.memory_mib;
    let (machine, blk_device, net_device) = match spec.machine {
        Machine::Q35 => ("q35", "vhost-user-blk-pci", "virtio-net-pci"),
        Machine::Microvm => ("microvm", "vhost-user-blk", "virtio-net-device"),
    };
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&[
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&["-machine", &format!("{machine},memory-backend=mem")]);
    // vhost-user backends map guest memory, so it must be a shareable file.
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-m",
        &format!("{mem}M"),
    ]);
    let cmdline = format!("{CMDLINE} tsc_early_khz={}", host_tsc_khz());
    push(&[
        "-smp",
        &spec.cpus.to_string(),
        "-serial",
        "stdio",
        "-append",
        &cmdline,
    ]);
    if spec.machine == Machine::Microvm {
        // qboot instead of SeaBIOS, whose disk probing would drive the device itself;
        // modern virtio-mmio, as for our own transports.
        push(&[
            "-bios",
            &kit.qboot.to_string_lossy(),
            "-global",
            "virtio-mmio.force-legacy=false",
        ]);
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        let reconnect = disk
            .reconnect
            .map(|every| format!(",reconnect-ms={}", every.as_millis().max(1)))
            .unwrap_or_default();
        push(&[
            "-chardev",
            &format!("socket,id=blk{i},path={}{reconnect}", disk.socket.display()),
        ]);
        push(&[
            "-device",
            &format!(
                "{blk_device},chardev=blk{i},num-queues={}{}{}",
                disk.num_queues,
                if disk.packed { ",packed=on" } else { "" },
                if disk.in_order { ",in_order=on" } else { "" }
            ),
        ]);
    }
    if let Some(net) = &spec.net {
        push(&[
            "-chardev",
            &format!("socket,id=netchr0,path={}", net.socket.display()),
        ]);
        push(&["-netdev", "vhost-user,id=net0,chardev=netchr0"]);
        push(&[
            "-device",
            &format!(
                "{net_device},netdev=net0,mac={}{}{}",
                mac_text(net.mac),
                if net.packed { ",packed=on" } else { "" },
                if net.in_order { ",in_order=on" } else { "" }
            ),
        ]);
    }
    args.extend([
        "-kernel".into(),
        kit.kernel.clone().into_os_string(),
        "-initrd".into(),
        initrd.into(),
    ]);
    args
}

/// Reads the `VIO-RESULT` pairs and the script's exit status from the console.
pub fn parse_console(console: &str) -> (BTreeMap<String, String>, Option<i32>) {
    let mut results = BTreeMap::new();
    let mut status = None;
    for line in console.lines().map(|l| l.trim_end_matches('\r')) {
        // Kernel messages can land in the middle of a line, so the marker is searched
        // for rather than expected at the start.
        if let Some((_, pair)) = line.split_once(RESULT_MARKER) {
            if let Some((key, value)) = pair.split_once('=') {
                results.insert(key.trim().to_owned(), value.trim().to_owned());
            }
        } else if let Some((_, code)) = line.split_once(EXIT_MARKER) {
            status = code.trim().parse().ok();
        }
    }
    (results, status)
}

/// The kit, ready to boot guests.
#[derive(Debug, Clone)]
pub struct LinuxGuest {
    kit: Kit,
}

impl LinuxGuest {
    /// A guest kit over prepared files.
    pub fn new(kit: Kit) -> Self {
        Self { kit }
    }

    /// The prepared files.
    pub fn kit(&self) -> &Kit {
        &self.kit
    }

    /// The SHA-256 of the file at `path`, hex, by the busybox the guest has too (so the
    /// host's and the guest's checksums come from one implementation).
    pub fn sha256(&self, path: &Path) -> Result<String, process::CommandError> {
        let out = process::run(
            Command::new(&self.kit.busybox).arg("sha256sum").arg(path),
            HASH_TIMEOUT,
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.split_whitespace().next().unwrap_or_default().to_owned())
    }

    /// Boots `spec`, runs its script and waits for the guest to power off. Every
    /// device's backend must already listen on its socket.
    pub fn boot(&self, spec: &GuestSpec) -> Result<GuestRun, GuestError> {
        let sockets = spec
            .disks
            .iter()
            .map(|d| &d.socket)
            .chain(spec.net.iter().map(|n| &n.socket));
        if let Some(missing) = sockets.into_iter().find(|s| !s.exists()) {
            return Err(GuestError::NoSocket(missing.clone()));
        }
        let runs = self.kit.dir.join("runs");
        let scratch = process::scratch_dir(&runs, "boot");
        std::fs::create_dir_all(&scratch).map_err(|source| GuestError::Io {
            path: scratch.clone(),
            source,
        })?;
        let result = self.boot_in(spec, &scratch);
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }

    /// [`Self::boot`] with its scratch directory made.
    fn boot_in(&self, spec: &GuestSpec, scratch: &Path) -> Result<GuestRun, GuestError> {
        let initrd = scratch.join("initrd.cpio");
        initramfs::build_for_run(
            &self.kit.busybox,
            &self.kit.initramfs,
            &spec.script,
            scratch,
            &initrd,
        )?;
        let args = qemu_args(&self.kit, spec, &initrd);
        tracing::debug!(?args, "starting QEMU");
        let started = Instant::now();
        let mut child = Command::new(&self.kit.qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(GuestError::Spawn)?;
        let console = Arc::new(Mutex::new(Vec::new()));
        let qemu_log = Arc::new(Mutex::new(Vec::new()));
        let readers = [
            child.stdout.take().map(|p| process::collect(p, console.clone())),
            child.stderr.take().map(|p| process::collect(p, qemu_log.clone())),
        ];
        let exit = process::wait_until(&mut child, started + spec.timeout).map_err(GuestError::Wait)?;
        let elapsed = started.elapsed();
        for reader in readers.into_iter().flatten() {
            let _ = reader.join();
        }
        let text = |buf: &Arc<Mutex<Vec<u8>>>| {
            String::from_utf8_lossy(&buf.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
        };
        let (console, qemu) = (text(&console), text(&qemu_log));
        let tail = |s: &str| process::tail(s.as_bytes(), TAIL_BYTES);
        let (results, status) = parse_console(&console);
        match (exit, status) {
            (None, _) => Err(GuestError::Timeout {
                timeout: spec.timeout,
                console: tail(&console),
                qemu: tail(&qemu),
            }),
            (Some(exit), None) => Err(GuestError::Aborted {
                status: exit,
                console: tail(&console),
                qemu: tail(&qemu),
            }),
            (Some(_), Some(0)) => Ok(GuestRun {
                console,
                results,
                elapsed,
            }),
            (Some(_), Some(status)) => Err(GuestError::ScriptFailed {
                status,
                console: tail(&console),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kit() -> Kit {
        Kit {
            qemu: "/q".into(),
            qboot: "/qboot.rom".into(),
            kernel: "/vmlinuz".into(),
            initramfs: "/base".into(),
            busybox: "/bb".into(),
            dir: "/d".into(),
        }
    }

    fn joined(spec: &GuestSpec) -> String {
        qemu_args(&kit(), spec, Path::new("/i"))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn q35_uses_pci_devices_and_shared_memfd_memory() {
        let mut spec = GuestSpec::new(Machine::Q35, "true");
        spec.disks.push(BlkDisk {
            socket: "/s/blk.sock".into(),
            num_queues: 2,
            packed: false,
            in_order: false,
            reconnect: None,
        });
        spec.net = Some(NetPort {
            socket: "/s/net.sock".into(),
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            packed: false,
            in_order: false,
        });
        let line = joined(&spec);
        assert!(line.contains("-machine q35,memory-backend=mem"));
        assert!(line.contains("memory-backend-memfd,id=mem,size=256M,share=on"));
        assert!(line.contains(
            "-chardev socket,id=blk0,path=/s/blk.sock -device vhost-user-blk-pci,chardev=blk0,num-queues=2"
        ));
        assert!(line.contains("-netdev vhost-user,id=net0,chardev=netchr0 -device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56"));
        assert!(line.contains("-accel tcg") && !line.contains("qboot"));
        assert!(line.contains(" tsc_early_khz="), "the guest is told the TSC rate");
    }

    #[test]
    fn microvm_uses_mmio_devices_modern_only_and_qboot() {
        let mut spec = GuestSpec::new(Machine::Microvm, "true");
        spec.disks.push(BlkDisk {
            socket: "/s/b".into(),
            num_queues: 1,
            packed: false,
            in_order: false,
            reconnect: None,
        });
        let line = joined(&spec);
        assert!(line.contains("-machine microvm,memory-backend=mem"));
        assert!(line.contains("-bios /qboot.rom -global virtio-mmio.force-legacy=false"));
        assert!(line.contains("-device vhost-user-blk,chardev=blk0,num-queues=1"));
    }

    #[test]
    fn packed_disks_and_ports_ask_qemu_for_the_packed_ring() {
        let mut spec = GuestSpec::new(Machine::Q35, "true");
        spec.disks.push(BlkDisk {
            socket: "/s/b".into(),
            num_queues: 1,
            packed: true,
            in_order: true,
            reconnect: None,
        });
        spec.net = Some(NetPort {
            socket: "/s/n".into(),
            mac: [0x52, 0x54, 0, 0, 0, 1],
            packed: true,
            in_order: true,
        });
        let line = joined(&spec);
        assert!(line.contains("-device vhost-user-blk-pci,chardev=blk0,num-queues=1,packed=on,in_order=on"));
        assert!(
            line.contains("-device virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,packed=on,in_order=on")
        );
    }

    #[test]
    fn a_reconnecting_disk_asks_its_chardev_to_reconnect_and_others_do_not() {
        let mut spec = GuestSpec::new(Machine::Q35, "true");
        for (socket, reconnect) in [("/s/a", Some(Duration::from_millis(250))), ("/s/b", None)] {
            spec.disks.push(BlkDisk {
                socket: socket.into(),
                num_queues: 1,
                packed: false,
                in_order: false,
                reconnect,
            });
        }
        let line = joined(&spec);
        assert!(line.contains(
            "-chardev socket,id=blk0,path=/s/a,reconnect-ms=250 -device vhost-user-blk-pci,chardev=blk0,"
        ));
        assert!(line.contains("-chardev socket,id=blk1,path=/s/b -device"));
        assert_eq!(line.matches("reconnect").count(), 1, "{line}");
    }

    #[test]
    fn results_and_status_are_found_even_after_kernel_noise() {
        let console = "[ 1.0] virtio_blk virtio0: [vda] 8192 512-byte logical blocks\r\n\
            VIO-RESULT queues=2\r\n[ 1.2] random: crng initVIO-RESULT sum= abc \r\nVIO-RESULT bad\nVIO-EXIT status=0\r\n";
        let (results, status) = parse_console(console);
        assert_eq!(results.get("queues").map(String::as_str), Some("2"));
        assert_eq!(results.get("sum").map(String::as_str), Some("abc"));
        assert_eq!(results.len(), 2);
        assert_eq!(status, Some(0));
        assert_eq!(parse_console("VIO-EXIT status=3\n").1, Some(3));
        assert_eq!(parse_console("Kernel panic\n").1, None);
    }
}
