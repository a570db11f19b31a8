//! The vhost-user block benchmark behind `vio vhost-bench`: our vhost-user-blk
//! daemon against qemu-storage-daemon on the same image in the same run.
//!
//! The load generator is the same on both sides: `drivers-blk` as a vhost-user
//! frontend (`transport-vhost-user`, guest memory a memfd shared with the daemon),
//! running the closed loop of [`blk_bench::closed_loop`] on queue 0. The daemons,
//! each in a process of its own, on the same raw image with O_DIRECT and io_uring:
//!
//! - ours: `vio vhost-serve` (the `vio-host blk` daemon's code: [`BlkDevice`] behind
//!   [`Daemon`]), adaptive polling as configured;
//! - qemu-storage-daemon as [`backend::qsd_blk`] runs it: `cache.direct=on,
//!   aio=io_uring`, the export in an iothread (which polls adaptively, QEMU's
//!   default `poll-max-ns`).
//!
//! Rows: 4 KiB random reads at QD1 and QD32, 4 KiB random writes at QD32, a 4 KiB
//! write followed by a flush at QD1. Our frontend asks for inflight tracking
//! (INFLIGHT_SHMFD), as QEMU's vhost-user-blk does: our daemon tracks every request
//! it holds; qemu-storage-daemon does not offer it. A third variant runs our daemon
//! with the frontend not asking, which shows what tracking costs. The variants
//! take turns within each row, so drift in the shared disk hits all alike; medians
//! of the repetitions.
//!
//! [`BlkDevice`]: backend_host::blk::device::BlkDevice
//! [`Daemon`]: backend_host::vhost_user::Daemon

use crate::blk_bench::{self, RunResult, Workload};
use crate::linux_guest::{Backend, backend};
use crate::progress::Progress;
use crate::report::{Cell, Table, median};
use drivers_blk::{BlkDriver, BlkOptions};
use hypervisor::Hypervisor;
use std::path::{Path, PathBuf};
use std::time::Duration;
use transport_descriptors::direct;
use transport_vhost_user::{VhostUserOptions, VhostUserTransport};

pub use crate::linux_guest::backend::QSD;

/// The rows: workload and queue depth.
pub const ROWS: [(Workload, u32); 4] = [
    (Workload::RandRead, 1),
    (Workload::RandRead, 32),
    (Workload::RandWrite, 32),
    (Workload::WriteFlush, 1),
];

/// Benchmark settings.
#[derive(Debug, Clone)]
pub struct VhostBenchConfig {
    /// The image (created and filled if missing or too small); not on tmpfs.
    pub image: PathBuf,
    /// Image size in bytes.
    pub size: u64,
    /// Seconds per run.
    pub run_time: Duration,
    /// Repetitions (medians are reported).
    pub reps: usize,
    /// Our daemon's adaptive-polling window.
    pub poll: Duration,
    /// The program that runs our daemon as `PROGRAM vhost-serve ...`: the `vio`
    /// binary itself.
    pub program: PathBuf,
}

impl VhostBenchConfig {
    /// Defaults: a 256 MiB image under `target/`, 2 s runs, 3 repetitions, our
    /// daemon from the running `vio` binary.
    pub fn full() -> std::io::Result<Self> {
        Ok(VhostBenchConfig {
            image: PathBuf::from("target/vio-vhost-bench.img"),
            size: 256 << 20,
            run_time: Duration::from_secs(2),
            reps: 3,
            poll: Duration::from_micros(50),
            program: std::env::current_exe()?,
        })
    }
}

/// Which daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Ours,
    /// Ours with `--poll-us 0`: what its adaptive polling costs in CPU.
    OursNoPoll,
    Qsd,
}

/// Starts `peer` on the image with one queue; returns it once it listens, and its
/// socket.
fn start(cfg: &VhostBenchConfig, peer: Peer) -> std::io::Result<(Backend, PathBuf)> {
    let socket = std::env::temp_dir().join(format!("vio-vhost-bench-{}-{peer:?}.sock", std::process::id()));
    let (name, cmd) = match peer {
        Peer::Ours => (
            "vio vhost-serve",
            backend::vio_blk(&cfg.program, &cfg.image, &socket, 1, cfg.poll),
        ),
        Peer::OursNoPoll => (
            "vio vhost-serve --poll-us 0",
            backend::vio_blk(&cfg.program, &cfg.image, &socket, 1, Duration::ZERO),
        ),
        Peer::Qsd => ("qemu-storage-daemon", backend::qsd_blk(&cfg.image, &socket, 1)),
    };
    let daemon = Backend::spawn(name, cmd, &socket).map_err(std::io::Error::other)?;
    Ok((daemon, socket))
}

/// One run against a daemon: a fresh guest and connection (asking for inflight
/// tracking if `inflight`), the closed loop, and a reset when the driver is dropped.
/// Returns the run's figures and the daemon's CPU time per completed request in
/// microseconds (user + system, all its threads, polling included; the connection's
/// set-up and reset count too).
fn run_once(
    cfg: &VhostBenchConfig,
    (daemon, socket): (&Backend, &Path),
    (w, depth): (Workload, u32),
    inflight: bool,
) -> std::io::Result<(RunResult, f64)> {
    fn err(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
        std::io::Error::other(e)
    }
    let guest = Hypervisor::new()
        .create_domain("vhost-bench", 64 << 20)
        .map_err(err)?;
    let model = direct::driver(&guest);
    let opts = VhostUserOptions {
        inflight,
        ..VhostUserOptions::blk()
    };
    let transport = VhostUserTransport::connect(socket, guest.memory().clone(), opts).map_err(err)?;
    let gone = || std::io::Error::other(format!("{} is gone", daemon.socket().display()));
    let before = daemon.cpu_time().ok_or_else(gone)?;
    let driver =
        BlkDriver::new(transport, model, guest.memory().clone(), BlkOptions::default()).map_err(err)?;
    let r = blk_bench::closed_loop(&driver, cfg.size, cfg.run_time, w, depth);
    drop(driver);
    let cpu = daemon.cpu_time().ok_or_else(gone)?.saturating_sub(before);
    let requests = (r.iops * cfg.run_time.as_secs_f64()).max(1.0);
    Ok((r, cpu.as_secs_f64() * 1e6 / requests))
}

/// Runs every row against both daemons and returns the table.
///
/// # Errors
/// The image cannot be made, qemu-storage-daemon is missing, or a daemon does not
/// start or refuses the frontend.
pub fn run(cfg: &VhostBenchConfig) -> std::io::Result<Table> {
    if !Path::new(QSD).exists() {
        return Err(std::io::Error::other(format!(
            "{QSD} is missing: install Debian's qemu-utils (apt-get install qemu-utils)"
        )));
    }
    blk_bench::prepare_image(&cfg.image, cfg.size)?;
    // Both daemons stay up for the whole run; each run is a new frontend.
    let (ours_d, ours) = start(cfg, Peer::Ours)?;
    let (qsd_d, qsd) = start(cfg, Peer::Qsd)?;
    let (quiet_d, quiet) = start(cfg, Peer::OursNoPoll)?;
    let mut rows = Vec::new();
    // Every row, then 4k random reads at QD32 once more with our daemon not polling.
    let plan = ROWS
        .iter()
        .map(|&(w, depth)| (w, depth, false))
        .chain([(Workload::RandRead, 32, true)]);
    let mut progress = Progress::new("vhost-user benchmark", (ROWS.len() + 1) * cfg.reps);
    for (w, depth, no_poll) in plan {
        let (ours_d, ours) = if no_poll {
            (&quiet_d, &quiet)
        } else {
            (&ours_d, &ours)
        };
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        let (mut cpu_a, mut cpu_b) = (Vec::new(), Vec::new());
        for rep in 1..=cfg.reps {
            progress.step(format_args!(
                "{} QD{depth}: repetition {rep}/{}",
                w.label(),
                cfg.reps
            ));
            // Each variant goes first in turn: ours tracked, qsd, ours untracked.
            let mut got: [Option<(RunResult, f64)>; 3] = [None, None, None];
            for k in 0..3 {
                let v = (k + rep) % 3;
                let (daemon, inflight) = match v {
                    0 => ((ours_d, ours.as_path()), true),
                    1 => ((&qsd_d, qsd.as_path()), true),
                    _ => ((ours_d, ours.as_path()), false),
                };
                got[v] = Some(run_once(cfg, daemon, (w, depth), inflight)?);
            }
            let [x, y, z] = got.map(|r| r.expect("every variant ran"));
            a.push(x.0);
            b.push(y.0);
            c.push(z.0);
            cpu_a.push(x.1);
            cpu_b.push(y.1);
        }
        let med =
            |rs: &[RunResult], f: fn(&RunResult) -> f64| median(&mut rs.iter().map(f).collect::<Vec<_>>());
        let iops = (med(&a, |r| r.iops), med(&b, |r| r.iops));
        // Each repetition ran both daemons back to back: the spread of their ratios
        // shows how much of the median's ratio is noise.
        let ratios: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x.iops / y.iops).collect();
        let (lo, hi) = ratios
            .iter()
            .fold((f64::INFINITY, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        rows.push(vec![
            Cell::Text(if no_poll {
                format!("{}, ours --poll-us 0", w.label())
            } else {
                w.label().into()
            }),
            Cell::Int(u64::from(depth)),
            Cell::Num(iops.0),
            Cell::Num(iops.1),
            Cell::Text(format!("{:.2}x", iops.0 / iops.1)),
            Cell::Text(format!("{lo:.2}-{hi:.2}x")),
            Cell::Num(med(&a, |r| r.mean_us)),
            Cell::Num(med(&b, |r| r.mean_us)),
            Cell::Num(med(&a, |r| r.p99_us)),
            Cell::Num(med(&b, |r| r.p99_us)),
            Cell::Num(med(&c, |r| r.iops)),
            Cell::Text(format!("{:.2}x", iops.0 / med(&c, |r| r.iops))),
            Cell::Num(median(&mut cpu_a)),
            Cell::Num(median(&mut cpu_b)),
            Cell::Text(format!("{:.2}x", median(&mut cpu_a) / median(&mut cpu_b))),
        ]);
    }
    progress.finish();
    Ok(Table {
        title: format!(
            "vhost-user-blk: our daemon vs qemu-storage-daemon, {} MiB image, {} s runs, medians of {}",
            crate::report::fmt_int(cfg.size >> 20),
            cfg.run_time.as_secs_f64(),
            cfg.reps
        ),
        columns: [
            "workload",
            "QD",
            "IOPS ours",
            "IOPS qsd",
            "ours/qsd",
            "per-rep range",
            "mean us ours",
            "mean us qsd",
            "p99 us ours",
            "p99 us qsd",
            "IOPS ours untracked",
            "tracked/untracked",
            "CPU us/req ours",
            "CPU us/req qsd",
            "CPU ours/qsd",
        ]
        .map(String::from)
        .to_vec(),
        rows,
        notes: vec![
            "CPU us/req: the daemon process's user + system time over a run (every thread, polling included, the connection's set-up and reset too) per completed request, from /proc".to_string(),
            format!(
                "load: drivers-blk as a vhost-user frontend (memfd guest memory), polling; image {}, O_DIRECT + io_uring on both",
                cfg.image.display()
            ),
            format!(
                "ours: vio vhost-serve, adaptive polling {} us, tracking requests in flight (INFLIGHT_SHMFD; 'untracked': the frontend does not ask); qsd: export in an iothread (adaptive polling, QEMU default), no INFLIGHT_SHMFD offered; write + flush: pairs per second, latency of the flush",
                cfg.poll.as_micros()
            ),
        ],
    })
}
