//! The block benchmark behind `vio blk-bench`: our virtio-blk path against `fio` on
//! the same file in the same run.
//!
//! Ours: the `drivers-blk` driver, polling (raw submit / kick / poll API), over
//! sharing model 2, sends requests to [`BlkDevice`] (io_uring engine, O_DIRECT)
//! through the in-process transport: driver, ring, model, backend and file. fio:
//! `ioengine=io_uring`, `direct=1`, the same file, block size, queue depth and
//! pattern. Workloads: 4 KiB random reads at QD1 and QD32, 4 KiB random writes at
//! QD32, 64 KiB sequential writes at QD8, and a 4 KiB write followed by a flush at
//! QD1 (each flush an `fdatasync` on both sides). Per row: IOPS, mean and p99
//! latency, and the ratio to fio; then our flush latency against raw `fdatasync`.
//! The driver asks for the ring format of [`BlkBenchConfig::ring`] (and IN_ORDER if
//! told to); the table's `ring` column says what was negotiated.
//!
//! fio is part of the benchmark's set-up: [`ensure_fio`] installs it with apt-get
//! when it is missing, and otherwise says how.

use crate::conformance::Fixture;
use crate::models;
use crate::progress::{Progress, in_turn};
use crate::report::{Cell, Table, median, quantile, ring_asked, ring_label};
use backend_host::blk::device::{BlkDevice, BlkSettings, EngineChoice, Runtime};
use backend_host::blk::disk::{Disk, DiskOptions};
use drivers_blk::{BlkDriver, BlkOptions, Completion, Polled, Request, RequestId};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use transport_descriptors::direct::{DirectDevice, DirectDriver};
use virtio_core::ring::areas::RingFormat;
use virtio_core::transport::{InProcessTransport, Transport};
use virtio_core::{DriverModel, GuestBuf};

/// One workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// 4 KiB random reads.
    RandRead,
    /// 4 KiB random writes.
    RandWrite,
    /// 64 KiB sequential writes.
    SeqWrite,
    /// A 4 KiB write, then a flush, one at a time.
    WriteFlush,
}

impl Workload {
    /// The row label.
    pub fn label(self) -> &'static str {
        match self {
            Workload::RandRead => "4k randread",
            Workload::RandWrite => "4k randwrite",
            Workload::SeqWrite => "64k seq write",
            Workload::WriteFlush => "4k write + flush",
        }
    }

    fn block(self) -> u64 {
        match self {
            Workload::SeqWrite => 64 << 10,
            _ => 4 << 10,
        }
    }

    fn fio_rw(self) -> &'static str {
        match self {
            Workload::RandRead => "randread",
            Workload::RandWrite | Workload::WriteFlush => "randwrite",
            Workload::SeqWrite => "write",
        }
    }

    fn reads(self) -> bool {
        self == Workload::RandRead
    }
}

/// What every block benchmark runs before it measures, on either side (fio's
/// `--ramp_time`).
pub const WARM_UP: Duration = Duration::from_millis(200);

/// The rows of the table: workload and queue depth.
pub const ROWS: [(Workload, u32); 5] = [
    (Workload::RandRead, 1),
    (Workload::RandRead, 32),
    (Workload::RandWrite, 32),
    (Workload::SeqWrite, 8),
    (Workload::WriteFlush, 1),
];

/// Benchmark settings.
#[derive(Debug, Clone)]
pub struct BlkBenchConfig {
    /// The image file (created and filled if missing or too small). Must be on a
    /// filesystem that does O_DIRECT for real (not tmpfs).
    pub image: PathBuf,
    /// Image size in bytes.
    pub size: u64,
    /// Seconds per run.
    pub run_time: Duration,
    /// Repetitions (medians are reported).
    pub reps: usize,
    /// The device's adaptive-polling budget.
    pub poll: Duration,
    /// Install fio when it is missing ([`ensure_fio`]); if false, a missing fio
    /// leaves the peer columns empty.
    pub install_fio: bool,
    /// Measure fio at all; false leaves its columns empty (a second pass over
    /// another ring format: fio's figures do not depend on it).
    pub fio: bool,
    /// The ring format the driver asks for (VIRTIO_F_RING_PACKED for packed).
    pub ring: RingFormat,
    /// Whether the driver asks for VIRTIO_F_IN_ORDER (negotiated only if offered).
    pub in_order: bool,
    /// Also run our stack with a rate limiter whose limits are far above what it
    /// can do (10 M operations and 1 TiB a second, read and write), in turn with
    /// the others in the same repetitions: what a configured, not limiting,
    /// limiter costs.
    pub idle_limiter: bool,
}

impl BlkBenchConfig {
    /// Defaults: a 256 MiB image under `target/`, 3 s per run, 3 repetitions.
    pub fn full() -> Self {
        BlkBenchConfig {
            image: PathBuf::from("target/vio-blk-bench.img"),
            size: 256 << 20,
            run_time: Duration::from_secs(3),
            reps: 3,
            poll: Duration::from_micros(100),
            install_fio: true,
            fio: true,
            ring: RingFormat::Split,
            in_order: false,
            idle_limiter: false,
        }
    }

    /// The short version for `vio demo`: a 64 MiB image, 0.3 s runs, one
    /// repetition, fio only if it is already installed.
    pub fn quick() -> Self {
        BlkBenchConfig {
            image: PathBuf::from("target/vio-blk-demo.img"),
            size: 64 << 20,
            run_time: Duration::from_millis(300),
            reps: 1,
            install_fio: false,
            ..BlkBenchConfig::full()
        }
    }
}

/// Whether fio runs here.
pub fn fio_present() -> bool {
    Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// Requests (for write + flush: pairs) per second.
    pub iops: f64,
    /// Mean latency in microseconds (for write + flush: of the flush).
    pub mean_us: f64,
    /// Median latency in microseconds (likewise).
    pub p50_us: f64,
    /// 99th-percentile latency in microseconds (likewise).
    pub p99_us: f64,
}

/// Creates the image with every block written, so reads hit the disk rather than
/// holes.
pub fn prepare_image(path: &Path, size: u64) -> std::io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() >= size) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let chunk = vec![0x5au8; 1 << 20];
    let mut f = std::fs::File::create(path)?;
    let mut done = 0;
    while done < size {
        std::io::Write::write_all(&mut f, &chunk)?;
        done += chunk.len() as u64;
    }
    f.sync_all()
}

/// Makes sure `fio` can run: installs the Debian package with apt-get when it is
/// missing, and says what to do if that fails (not root, no network).
pub fn ensure_fio() -> std::io::Result<()> {
    let present = || {
        Command::new("fio")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if present() {
        return Ok(());
    }
    tracing::info!("fio is missing: installing it with apt-get");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    // A fresh machine may have no package lists yet: update once and retry.
    let installed = apt(&["install", "-y", "-q", "fio"])
        || (apt(&["update", "-q"]) && apt(&["install", "-y", "-q", "fio"]));
    if !installed {
        return Err(std::io::Error::other(
            "fio is missing and apt-get could not install it (not root?): run `sudo apt-get install fio`",
        ));
    }
    if fio_present() {
        Ok(())
    } else {
        Err(std::io::Error::other(
            "fio still does not run after installing it",
        ))
    }
}

/// One fio run on the image, or an error if fio fails.
pub fn fio_run(cfg: &BlkBenchConfig, w: Workload, depth: u32) -> std::io::Result<RunResult> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=vio",
        "--ioengine=io_uring",
        "--direct=1",
        "--time_based",
        "--lat_percentiles=1",
        "--output-format=json",
    ])
    // The same warm-up as ours (`closed_loop`): fio discards what it measures in it.
    .arg(format!("--ramp_time={}ms", WARM_UP.as_millis()))
    .arg(format!("--bs={}", w.block()))
    .arg(format!("--filename={}", cfg.image.display()))
    .arg(format!("--size={}", cfg.size))
    .arg(format!("--rw={}", w.fio_rw()))
    .arg(format!("--iodepth={depth}"))
    .arg(format!("--runtime={}ms", cfg.run_time.as_millis()));
    if w == Workload::WriteFlush {
        cmd.arg("--fdatasync=1");
    }
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(std::io::Error::other)?;
    let job = &v["jobs"][0];
    let dir = if w.reads() { &job["read"] } else { &job["write"] };
    // Write + flush: the flush's own latency (fio's `sync` section).
    let lat = if w == Workload::WriteFlush {
        &job["sync"]["lat_ns"]
    } else {
        &dir["lat_ns"]
    };
    let missing = |what: &str| std::io::Error::other(format!("fio output has no {what}"));
    Ok(RunResult {
        iops: dir["iops"].as_f64().ok_or_else(|| missing("iops"))?,
        mean_us: lat["mean"].as_f64().ok_or_else(|| missing("mean latency"))? / 1e3,
        p50_us: lat["percentile"]["50.000000"]
            .as_f64()
            .ok_or_else(|| missing("p50 latency"))?
            / 1e3,
        p99_us: lat["percentile"]["99.000000"]
            .as_f64()
            .ok_or_else(|| missing("p99 latency"))?
            / 1e3,
    })
}

type Dev = BlkDevice<DirectDevice>;
type Driver = BlkDriver<DirectDriver, InProcessTransport<Dev>>;

/// Our stack: the driver and the device behind the in-process transport, with an
/// idle rate limiter if `limited`.
fn ours(cfg: &BlkBenchConfig, limited: bool) -> Driver {
    let Fixture {
        guest,
        driver,
        device,
    } = models::direct();
    let disk = Disk::open(&cfg.image, DiskOptions::default()).expect("O_DIRECT image");
    let limiter = limited.then(|| {
        use backend_host::blk::limit::{Bucket, Limits, RateLimiter};
        let ops = Some(Bucket::new(10_000_000));
        let bytes = Some(Bucket::new(1 << 40));
        RateLimiter::new(Limits {
            ops,
            read_ops: ops,
            write_ops: ops,
            bytes,
            read_bytes: bytes,
            write_bytes: bytes,
        })
    });
    let settings = BlkSettings {
        engine: EngineChoice::Uring,
        queue_size: 256,
        poll: cfg.poll,
        limiter,
        ..BlkSettings::default()
    };
    let dev = BlkDevice::new(disk, device, settings, Runtime::OwnThreads);
    let transport = InProcessTransport::new(dev.lifecycle(), dev).expect("transport");
    // The domain stays alive through the memory handle the driver keeps.
    let opts = BlkOptions {
        ring_packed: cfg.ring == RingFormat::Packed,
        in_order: cfg.in_order,
        ..BlkOptions::default()
    };
    BlkDriver::new(transport, driver, guest.memory().clone(), opts).expect("driver")
}

/// Which step of a slot's work is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Data,
    Flush,
}

/// One request slot of the closed loop.
#[derive(Debug)]
struct Slot {
    buf: GuestBuf,
    id: Option<RequestId>,
    step: Step,
    since: Instant,
}

/// One run of our stack, and the features its driver negotiated.
fn ours_run(cfg: &BlkBenchConfig, w: Workload, depth: u32, limited: bool) -> (RunResult, u64) {
    let d = ours(cfg, limited);
    (
        closed_loop(&d, cfg.size, cfg.run_time, w, depth),
        d.info().features,
    )
}

/// The ring column: what the runs negotiated (one label unless they differed).
pub fn rings_cell(features: &[u64]) -> Cell {
    let mut labels: Vec<String> = features.iter().map(|&f| ring_label(f)).collect();
    labels.dedup();
    Cell::Text(labels.join(" / "))
}

/// Keeps `depth` requests of workload `w` in flight on queue 0 of `d` for
/// `run_time` (after [`WARM_UP`]) over the first `size` bytes of the disk,
/// and measures them: the load generator of every block benchmark, whatever the
/// transport behind the driver.
///
/// # Panics
/// When the device fails a request or breaks: a benchmark of a broken device has
/// no figures to give.
pub fn closed_loop<D: DriverModel, T: Transport>(
    d: &BlkDriver<D, T>,
    size: u64,
    run_time: Duration,
    w: Workload,
    depth: u32,
) -> RunResult {
    let mem = d.memory().clone();
    let block = w.block();
    let mut slots: Vec<Slot> = (0..depth)
        .map(|_| Slot {
            buf: GuestBuf::new(
                mem.alloc(block, 4096).expect("guest memory"),
                u32::try_from(block).unwrap_or(4096),
            ),
            id: None,
            step: Step::Data,
            since: Instant::now(),
        })
        .collect();
    let blocks = size / block;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut seq = 0u64;
    let mut next_sector = move || {
        let b = if w == Workload::SeqWrite {
            seq = (seq + 1) % blocks;
            seq
        } else {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        };
        b * block / 512
    };
    let data = |sector: u64, buf: GuestBuf| {
        if w.reads() {
            Request::Read { sector, buf }
        } else {
            Request::Write { sector, buf }
        }
    };
    for s in &mut slots {
        s.id = Some(d.submit(0, data(next_sector(), s.buf)).expect("submit"));
        s.since = Instant::now();
    }
    d.kick(0).expect("kick");
    let mut polled: Vec<Polled> = Vec::with_capacity(depth as usize);
    let mut lat_us: Vec<f64> = Vec::with_capacity(1 << 20);
    let (mut done, start) = (0u64, Instant::now());
    let mut measured_from: Option<(Instant, u64)> = None;
    // The guest spins for completions while it has a core to itself; once it finds
    // itself preempted (a gap of a time slice between two polls: another thread
    // wants this core), it sleeps on the interrupt for a while instead, as the
    // device's worker backs off its own polling.
    let (mut last_poll, mut sleep_until) = (Instant::now(), None::<Instant>);
    loop {
        polled.clear();
        let now = Instant::now();
        if now.duration_since(last_poll) >= Duration::from_millis(1) {
            sleep_until = Some(now + Duration::from_millis(50));
        }
        let sleepy = sleep_until.is_some_and(|t| now < t);
        let n = if sleepy {
            d.poll_into(0, depth as usize, &mut polled)
        } else {
            d.poll_busy(0, depth as usize, &mut polled)
        };
        if n.expect("sane device") == 0 {
            if sleepy {
                d.wait(0, Some(Duration::from_millis(1))).expect("sane device");
            } else {
                std::hint::spin_loop();
            }
            last_poll = Instant::now();
            continue;
        }
        last_poll = Instant::now();
        for (id, result) in polled.drain(..) {
            let ok = result.expect("request failed");
            let s = slots
                .iter_mut()
                .find(|s| s.id == Some(id))
                .expect("a slot's request");
            let now = Instant::now();
            let measuring = measured_from.is_some();
            let next = match (w, s.step) {
                // The write is done; its flush follows before the pair counts.
                (Workload::WriteFlush, Step::Data) => {
                    s.step = Step::Flush;
                    s.since = now;
                    s.id = Some(d.submit(0, Request::Flush).expect("submit"));
                    continue;
                }
                _ => {
                    debug_assert!(matches!(
                        ok,
                        Completion::Read | Completion::Write | Completion::Flush
                    ));
                    if measuring {
                        lat_us.push(now.duration_since(s.since).as_secs_f64() * 1e6);
                    }
                    data(next_sector(), s.buf)
                }
            };
            done += 1;
            s.step = Step::Data;
            s.since = now;
            s.id = Some(d.submit(0, next).expect("submit"));
        }
        d.kick(0).expect("kick");
        match measured_from {
            None if start.elapsed() >= WARM_UP => measured_from = Some((Instant::now(), done)),
            Some((t0, d0)) if t0.elapsed() >= run_time => {
                let iops = (done - d0) as f64 / t0.elapsed().as_secs_f64();
                let mean_us = lat_us.iter().sum::<f64>() / lat_us.len().max(1) as f64;
                return RunResult {
                    iops,
                    mean_us,
                    p50_us: median(&mut lat_us),
                    p99_us: quantile(&mut lat_us, 0.99),
                };
            }
            _ => {}
        }
    }
}

/// Latencies in microseconds of raw `fdatasync` calls, each after a 4 KiB O_DIRECT
/// write at a random block of the image: the floor our FLUSH is measured against.
pub fn raw_fdatasync_us(cfg: &BlkBenchConfig) -> std::io::Result<Vec<f64>> {
    use backend_host::blk::engine::AlignedBuf;
    use std::os::unix::fs::OpenOptionsExt;
    let direct = i32::try_from(rustix::fs::OFlags::DIRECT.bits()).map_err(std::io::Error::other)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(direct)
        .open(&cfg.image)?;
    let mut buf = AlignedBuf::new(4096, 4096);
    buf.as_mut_slice().fill(0x77);
    let blocks = cfg.size / 4096;
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut out = Vec::new();
    let start = Instant::now();
    while start.elapsed() < cfg.run_time * u32::try_from(cfg.reps).unwrap_or(1) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rustix::io::pwrite(&file, buf.as_slice(), (rng % blocks) * 4096)?;
        let t = Instant::now();
        rustix::fs::fdatasync(&file)?;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}

/// Runs every workload on both stacks and returns the table.
pub fn run(cfg: &BlkBenchConfig) -> std::io::Result<Table> {
    let with_fio = if !cfg.fio {
        false
    } else if cfg.install_fio {
        ensure_fio()?;
        true
    } else {
        fio_present()
    };
    prepare_image(&cfg.image, cfg.size)?;
    let mut rows = Vec::new();
    let mut flush_us = Vec::new();
    let mut progress = Progress::new("blk benchmark", ROWS.len() * cfg.reps);
    for (w, depth) in ROWS {
        // Alternate the two, and which goes first, so drift in the shared disk's
        // speed and whatever the first run leaves behind hit both alike.
        let (mut fio, mut ours, mut negotiated) = (Vec::new(), Vec::new(), Vec::new());
        let mut limited = Vec::new();
        for rep in 1..=cfg.reps {
            progress.step(format_args!(
                "{} QD{depth}: repetition {rep}/{}",
                w.label(),
                cfg.reps
            ));
            // With the idle limiter, it runs first, last or between the other
            // two in turn.
            let limiter_first = cfg.idle_limiter && rep % 3 == 0;
            if limiter_first {
                limited.push(ours_run(cfg, w, depth, true).0);
            }
            let (o, f) = in_turn(
                rep,
                || ours_run(cfg, w, depth, false),
                || with_fio.then(|| fio_run(cfg, w, depth)).transpose(),
            );
            if cfg.idle_limiter && !limiter_first {
                limited.push(ours_run(cfg, w, depth, true).0);
            }
            ours.push(o.0);
            negotiated.push(o.1);
            fio.extend(f?);
        }
        if w == Workload::WriteFlush {
            flush_us.extend(ours.iter().map(|r| r.p50_us));
        }
        let med =
            |rs: &[RunResult], f: fn(&RunResult) -> f64| median(&mut rs.iter().map(f).collect::<Vec<_>>());
        let o = [
            med(&ours, |r| r.iops),
            med(&ours, |r| r.mean_us),
            med(&ours, |r| r.p99_us),
        ];
        // Without fio, its cells read "-".
        let peer = |f: fn(&RunResult) -> f64| {
            if fio.is_empty() {
                Cell::Text("-".into())
            } else {
                Cell::Num(med(&fio, f))
            }
        };
        let ratio = if fio.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2}x", o[0] / med(&fio, |r| r.iops))
        };
        let mut row = vec![
            Cell::Text(w.label().into()),
            Cell::Int(u64::from(depth)),
            rings_cell(&negotiated),
            Cell::Num(o[0]),
            peer(|r| r.iops),
            Cell::Text(ratio),
            Cell::Num(o[1]),
            peer(|r| r.mean_us),
            Cell::Num(o[2]),
            peer(|r| r.p99_us),
        ];
        if cfg.idle_limiter {
            let l = med(&limited, |r| r.iops);
            // Each repetition ran both back to back: the spread of their ratios
            // shows how much of the median's ratio is noise.
            let ratios: Vec<f64> = limited.iter().zip(&ours).map(|(x, y)| x.iops / y.iops).collect();
            let (lo, hi) = ratios
                .iter()
                .fold((f64::INFINITY, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
            row.push(Cell::Num(l));
            row.push(Cell::Text(format!("{:.3}x", l / o[0])));
            row.push(Cell::Text(format!("{lo:.2}-{hi:.2}x")));
        }
        rows.push(row);
    }
    progress.finish();
    tracing::info!("flush latency: raw fdatasync on the image");
    let mut raw_us = raw_fdatasync_us(cfg)?;
    let (ours_flush, raw_p50, raw_p99) = (
        median(&mut flush_us),
        median(&mut raw_us),
        quantile(&mut raw_us, 0.99),
    );
    Ok(Table {
        title: format!(
            "virtio-blk over model 2 vs fio (io_uring, O_DIRECT), {} MiB image, {} s runs, medians of {}",
            crate::report::fmt_int(cfg.size >> 20),
            cfg.run_time.as_secs_f64(),
            cfg.reps
        ),
        columns: [
            "workload",
            "QD",
            "ring",
            "IOPS ours",
            "IOPS fio",
            "ours/fio",
            "mean us ours",
            "mean us fio",
            "p99 us ours",
            "p99 us fio",
        ]
        .into_iter()
        .chain(
            cfg.idle_limiter
                .then_some(["IOPS ours+limiter", "limiter/plain", "per-rep range"])
                .into_iter()
                .flatten(),
        )
        .map(String::from)
        .collect(),
        rows,
        notes: [
            (cfg.fio && !with_fio)
                .then(|| "fio is not installed: no peer figures (`vio blk-bench` installs it)".to_string()),
            (!cfg.fio).then(|| format!("fio: not measured ({} rows)", ring_asked(cfg.ring, cfg.in_order))),
            Some(format!(
                "ring: the format our driver negotiated (it asked for {}; IN_ORDER only if the device offers it)",
                ring_asked(cfg.ring, cfg.in_order)
            )),
            cfg.idle_limiter
                .then(|| "ours+limiter: our stack again in the same repetitions, with a rate limiter configured on every bucket far above what the disk does (not limiting)".to_string()),
            Some(format!(
                "image {}; write + flush: IOPS count write+flush pairs (fio --fdatasync=1), latency is the flush's (fio: its fdatasync)",
                cfg.image.display()
            )),
            Some(format!(
                "ours ({}): drivers-blk polling (sleeping on the interrupt while preempted), device adaptive polling {} us; our flush p50 {:.1} us vs raw fdatasync p50 {:.1} us ({:+.1} us; raw p99 {:.1} us)",
                ring_asked(cfg.ring, cfg.in_order),
                cfg.poll.as_micros(),
                ours_flush,
                raw_p50,
                ours_flush - raw_p50,
                raw_p99
            )),
        ]
        .into_iter()
        .flatten()
        .collect(),
    })
}
