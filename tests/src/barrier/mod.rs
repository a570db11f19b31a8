//! The barrier consistency benchmark behind `vio barrier-bench`: shows, with numbers,
//! that flushes are honoured end to end and what honouring them costs.
//!
//! **Consistency.** A commit-record journal ([`journal`]) runs in the guest over
//! `drivers-blk`, sharing model 2 and [`BlkDevice`]; a [`RecordingEngine`] directly
//! above the real engine logs every write, flush, discard and write-zeroes as it
//! reaches the file, and the guest logs its acknowledgements into the same
//! sequence. From that log, [`crash`] derives every crash point's stable and
//! volatile writes and enumerates crash images (exhaustive, torn, sampled,
//! adversarial) as overlays; [`check`] checks each one. The real backend must show
//! no violation; each seeded bug ([`mutants`]) must show some.
//!
//! **Cost.** The sequential journal's transactions per second with barriers
//! honoured (writeback + flushes), with [`CacheMode::Unsafe`] (flushes acknowledged
//! without `fdatasync`) and in writethrough mode (`RWF_DSYNC`, no flushes), with
//! flush latency, against `fio` running the same flush pattern on the same file in
//! the same run; and a sweep of writes per flush (1 to 32) for ours and fio, plotted
//! ([`plot`]).

pub mod check;
pub mod crash;
pub mod journal;
pub mod mutants;
pub mod plot;
mod tables;

use crate::conformance::Fixture;
use crate::models;
use crate::progress::{Progress, in_turn};
use crate::report::{fmt_int, median, quantile};
use backend_host::blk::device::{BlkDevice, BlkSettings, CacheMode, EngineChoice, Runtime};
use backend_host::blk::disk::{Disk, DiskError, DiskOptions};
use backend_host::blk::engine::Engine;
use backend_host::blk::engine_uring::best_engine;
use backend_host::blk::fault::{FaultEngine, FaultPlan};
use backend_host::blk::record::{Recorder, RecordingEngine};
use check::{Checker, Facts, Fidelity, Violation};
use crash::{CrashState, History, ImageCounts, ImagePlan, Rng, Selection};
use drivers_blk::{BlkDriver, BlkError, BlkOptions};
use journal::{GuestCache, JournalConfig, JournalError, JournalStats, Layout, Mode, Stop};
use mutants::{MutantEngine, MutantKind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport_descriptors::direct::{DirectDevice, DirectDriver};
use virtio_core::transport::InProcessTransport;

/// What the benchmark could not do.
#[derive(Debug, thiserror::Error)]
pub enum BarrierError {
    /// The image could not be prepared or read back.
    #[error("Image file {path}")]
    Image {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The image could not be opened as a disk.
    #[error("Opening the disk")]
    Disk(#[from] DiskError),
    /// The device or the transport could not be set up.
    #[error("Setting up the device: {step}")]
    Setup {
        /// What failed.
        step: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The driver could not initialize the device.
    #[error("Initializing the driver")]
    Driver(#[from] BlkError),
    /// The workload could not start.
    #[error("Journal workload")]
    Journal(#[from] JournalError),
    /// fio failed or printed something unexpected.
    #[error("fio: {0}")]
    Fio(String),
    /// The plot could not be drawn.
    #[error("Plot")]
    Plot(#[from] plot::PlotError),
}

/// What runs below the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The real engine.
    Real,
    /// The real engine with one `fdatasync` failing (`EIO`, a [`FaultEngine`] below
    /// the recorder): the device must latch it and the journal must not acknowledge.
    RealFsyncError,
    /// A seeded bug between the device and the recorder.
    Mutant(MutantKind),
}

/// How the device's cache is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Barriers {
    /// Writeback; the guest flushes, the device runs `fdatasync`.
    Writeback,
    /// The guest switches the device to writethrough (CONFIG_WCE) and does not flush.
    Writethrough,
    /// [`CacheMode::Unsafe`]: flushes acknowledged without `fdatasync`.
    Unsafe,
}

impl Barriers {
    fn label(self) -> &'static str {
        match self {
            Barriers::Writeback => "writeback",
            Barriers::Writethrough => "writethrough",
            Barriers::Unsafe => "unsafe",
        }
    }

    fn device(self) -> CacheMode {
        match self {
            Barriers::Unsafe => CacheMode::Unsafe,
            _ => CacheMode::Writeback,
        }
    }

    fn guest(self) -> GuestCache {
        match self {
            Barriers::Writethrough => GuestCache::Writethrough,
            _ => GuestCache::Writeback,
        }
    }
}

/// One consistency run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    /// What runs below the device.
    pub backend: Backend,
    /// Cache mode.
    pub barriers: Barriers,
    /// Journal mode.
    pub mode: Mode,
    /// Transactions to begin.
    pub txns: u64,
}

/// Which flush fails in [`Backend::RealFsyncError`] and
/// [`MutantKind::FsyncErrorSwallowed`]: flush 1 formats the journal, then each
/// transaction has two, so this is transaction 2's commit flush.
pub const FAILING_FLUSH: u64 = 7;

impl Scenario {
    /// Whether a correct checker must find violations here.
    pub fn expect_violations(&self) -> bool {
        matches!(self.backend, Backend::Mutant(_)) || self.barriers == Barriers::Unsafe
    }

    /// A label for tables.
    pub fn label(&self) -> String {
        let backend = match self.backend {
            Backend::Real => "real".to_string(),
            Backend::RealFsyncError => format!("real, fsync {FAILING_FLUSH} fails (EIO)"),
            Backend::Mutant(m) => format!("mutant: {}", m.label()),
        };
        let mode = match self.mode {
            Mode::Sequential => "sequential".to_string(),
            Mode::Concurrent { depth } => format!("concurrent x{depth}"),
        };
        format!("{backend}, {}, {mode}", self.barriers.label())
    }

    /// The standard set: the real backend in writeback (sequential and concurrent)
    /// and writethrough, with a failing fsync, every mutant, and the unsafe mode.
    pub fn standard(txns: u64, mutant_txns: u64) -> Vec<Scenario> {
        let s = |backend, barriers, mode, txns| Scenario {
            backend,
            barriers,
            mode,
            txns,
        };
        let mut v = vec![
            s(Backend::Real, Barriers::Writeback, Mode::Sequential, txns),
            s(
                Backend::Real,
                Barriers::Writeback,
                Mode::Concurrent { depth: 4 },
                txns,
            ),
            s(Backend::Real, Barriers::Writethrough, Mode::Sequential, txns),
            s(
                Backend::RealFsyncError,
                Barriers::Writeback,
                Mode::Sequential,
                mutant_txns,
            ),
        ];
        for m in MutantKind::ALL {
            let barriers = if m == MutantKind::WritethroughNoDsync {
                Barriers::Writethrough
            } else {
                Barriers::Writeback
            };
            v.push(s(Backend::Mutant(m), barriers, Mode::Sequential, mutant_txns));
        }
        v.push(s(Backend::Real, Barriers::Unsafe, Mode::Sequential, mutant_txns));
        v
    }
}

/// Settings of the whole benchmark.
#[derive(Debug, Clone)]
pub struct BarrierConfig {
    /// The image file (recreated per run; must do O_DIRECT for real, not tmpfs).
    pub image: PathBuf,
    /// Image size in bytes (at least the journal's end).
    pub size: u64,
    /// The consistency runs' journal.
    pub layout: Layout,
    /// Transactions per real-backend run.
    pub txns: u64,
    /// Transactions per mutant run.
    pub mutant_txns: u64,
    /// Seed of the sampled images.
    pub seed: u64,
    /// Images per crash point.
    pub plan: ImagePlan,
    /// The device's adaptive-polling budget.
    pub poll: Duration,
    /// The throughput part; `None` skips it.
    pub throughput: Option<ThroughputConfig>,
    /// Where to draw the plot (with the throughput part).
    pub plot: Option<PathBuf>,
    /// Install fio when it is missing.
    pub install_fio: bool,
}

/// Settings of the throughput part.
#[derive(Debug, Clone)]
pub struct ThroughputConfig {
    /// Measured time per run.
    pub run_time: Duration,
    /// Repetitions (medians are reported).
    pub reps: usize,
    /// Writes per flush of the sweep.
    pub intervals: Vec<u32>,
    /// Measured time per sweep point.
    pub sweep_time: Duration,
}

impl BarrierConfig {
    /// The long run: 600 transactions per real run, 3 x 2 s throughput runs, the
    /// full sweep.
    pub fn full() -> BarrierConfig {
        BarrierConfig {
            image: PathBuf::from("target/vio-barrier.img"),
            size: 8 << 20,
            layout: Layout {
                base: 1 << 20,
                slots: 16,
                blocks: 4,
            },
            txns: 600,
            mutant_txns: 40,
            seed: 0x5EED,
            plan: ImagePlan::default(),
            poll: Duration::from_micros(100),
            throughput: Some(ThroughputConfig {
                run_time: Duration::from_secs(2),
                reps: 3,
                intervals: vec![1, 2, 4, 8, 16, 32],
                sweep_time: Duration::from_secs(1),
            }),
            plot: Some(PathBuf::from("target/vio-barrier-throughput.svg")),
            install_fio: true,
        }
    }

    /// The short version for `vio demo` and the test suite: fewer transactions,
    /// short throughput runs, no sweep, fio only if installed.
    pub fn quick() -> BarrierConfig {
        BarrierConfig {
            image: PathBuf::from("target/vio-barrier-demo.img"),
            txns: 60,
            mutant_txns: 24,
            throughput: Some(ThroughputConfig {
                run_time: Duration::from_millis(300),
                reps: 1,
                intervals: Vec::new(),
                sweep_time: Duration::from_millis(200),
            }),
            plot: None,
            install_fio: false,
            ..BarrierConfig::full()
        }
    }
}

type Dev = BlkDevice<DirectDevice>;
/// The driver over our device, model 2, in-process transport.
pub type Driver = BlkDriver<DirectDriver, InProcessTransport<Dev>>;

fn setup<E: std::error::Error + Send + Sync + 'static>(step: &'static str) -> impl Fn(E) -> BarrierError {
    move |e| BarrierError::Setup {
        step,
        source: Box::new(e),
    }
}

/// Our stack over `image`: driver, model 2, device with `cache` and `engine`.
pub fn stack(
    image: &Path,
    cache: CacheMode,
    engine: EngineChoice,
    poll: Duration,
) -> Result<Driver, BarrierError> {
    let Fixture {
        guest,
        driver,
        device,
    } = models::direct();
    let disk = Disk::open(image, DiskOptions::default())?;
    let settings = BlkSettings {
        cache,
        engine,
        queue_size: 64,
        poll,
        ..BlkSettings::default()
    };
    let dev = BlkDevice::new(disk, device, settings, Runtime::OwnThreads);
    let transport = InProcessTransport::new(dev.lifecycle(), dev).map_err(setup("transport"))?;
    let opts = BlkOptions {
        timeout: Some(Duration::from_secs(30)),
        ..BlkOptions::default()
    };
    Ok(BlkDriver::new(transport, driver, guest.memory().clone(), opts)?)
}

/// The engine stack of `backend`, logging into `rec`.
fn engine_for(backend: Backend, rec: &Arc<Recorder>) -> EngineChoice {
    let rec = rec.clone();
    EngineChoice::Custom(Arc::new(move |disk: &Disk| {
        let real = best_engine(disk, 64)?;
        let e: Box<dyn Engine> = match backend {
            Backend::Real => Box::new(RecordingEngine::new(real, rec.clone())),
            Backend::RealFsyncError => {
                let failing = FaultEngine::new(real, FaultPlan::new().fail_flush_once(FAILING_FLUSH));
                Box::new(RecordingEngine::new(failing, rec.clone()))
            }
            Backend::Mutant(m @ MutantKind::FsyncErrorSwallowed) => {
                let failing = FaultEngine::new(real, FaultPlan::new().fail_flush_once(FAILING_FLUSH));
                Box::new(MutantEngine::new(RecordingEngine::new(failing, rec.clone()), m))
            }
            Backend::Mutant(m) => Box::new(MutantEngine::new(RecordingEngine::new(real, rec.clone()), m)),
        };
        Ok(e)
    }))
}

/// What one consistency run found.
#[derive(Debug, Clone)]
pub struct ScenarioResult {
    /// The run.
    pub scenario: Scenario,
    /// Events logged.
    pub events: usize,
    /// Writes (and discards, write-zeroes) logged.
    pub writes: usize,
    /// Transactions acknowledged.
    pub acked: u64,
    /// Images checked, by kind.
    pub images: ImageCounts,
    /// Images with a violation.
    pub violating: u64,
    /// The first few violations: crash point and what.
    pub examples: Vec<(usize, Violation)>,
    /// The real file against the log.
    pub fidelity: Fidelity,
    /// Why the workload stopped early, if it did.
    pub workload_error: Option<String>,
    /// Wall time of the workload and of the check.
    pub secs: (f64, f64),
}

impl ScenarioResult {
    /// Whether the outcome is the expected one: no violation and a faithful log for
    /// the real backend, violations for mutants and the unsafe mode.
    pub fn as_expected(&self) -> bool {
        let faithful = self.fidelity.unwritten_changed == 0 && self.fidelity.written_differ == 0;
        faithful && (self.violating > 0) == self.scenario.expect_violations()
    }
}

/// Runs the journal of `sc` on a fresh image and checks every crash image.
pub fn run_scenario(cfg: &BarrierConfig, sc: &Scenario) -> Result<ScenarioResult, BarrierError> {
    let image_err = |source| BarrierError::Image {
        path: cfg.image.clone(),
        source,
    };
    check::write_base(&cfg.image, cfg.size).map_err(image_err)?;
    let rec = Recorder::new();
    let t0 = Instant::now();
    let stats = {
        let d = stack(
            &cfg.image,
            sc.barriers.device(),
            engine_for(sc.backend, &rec),
            cfg.poll,
        )?;
        let jc = JournalConfig {
            layout: cfg.layout,
            mode: sc.mode,
            cache: sc.barriers.guest(),
            stop: Stop::Txns(sc.txns),
        };
        journal::run(&d, &jc, Some(&rec))?
        // Dropping the driver resets the device, which waits for every op.
    };
    let workload_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let h = History::new(rec.snapshot());
    let checker = Checker::new(&h, cfg.layout, sc.mode == Mode::Sequential);
    let mut st = CrashState::new(&h);
    let mut facts = Facts::default();
    let mut sel = Selection::new(h.writes.len());
    let mut rng = Rng::new(cfg.seed);
    let mut images = ImageCounts::default();
    let (mut violating, mut examples) = (0u64, Vec::new());
    loop {
        let point = st.point();
        let counts = crash::for_each_image(&st, &cfg.plan, &mut rng, &mut sel, |img, _| {
            if let Some(v) = checker.check(img, &facts) {
                violating += 1;
                if examples.len() < 3 {
                    examples.push((point, v));
                }
            }
        });
        images.add(&counts);
        match st.step() {
            Some(ev) => facts.observe(ev),
            None => break,
        }
    }
    let fidelity = check::fidelity(&h, &cfg.image, cfg.size).map_err(image_err)?;
    let r = ScenarioResult {
        scenario: *sc,
        events: h.events.len(),
        writes: h.writes.len(),
        acked: facts.acked_count() as u64,
        images,
        violating,
        examples,
        fidelity,
        workload_error: stats.error,
        secs: (workload_secs, t1.elapsed().as_secs_f64()),
    };
    tracing::info!(
        "{}: {} txns acked, {} crash points, {} images, {} violating ({:.1} s + {:.1} s check)",
        sc.label(),
        r.acked,
        fmt_int(r.images.crash_points),
        fmt_int(r.images.total()),
        fmt_int(r.violating),
        r.secs.0,
        r.secs.1
    );
    Ok(r)
}

/// One throughput measurement.
#[derive(Debug, Clone, Default)]
pub struct Throughput {
    /// Transactions per second (fio: writes per second divided by the writes of a
    /// transaction).
    pub txn_per_s: f64,
    /// Writes per second.
    pub writes_per_s: f64,
    /// Flush latency p50, microseconds.
    pub flush_p50_us: f64,
    /// Flush latency p99, microseconds.
    pub flush_p99_us: f64,
}

fn ours_throughput(
    cfg: &BarrierConfig,
    barriers: Barriers,
    blocks: u32,
    run_time: Duration,
) -> Result<Throughput, BarrierError> {
    let layout = Layout { blocks, ..cfg.layout };
    let d = stack(&cfg.image, barriers.device(), EngineChoice::Auto, cfg.poll)?;
    let jc = JournalConfig {
        layout,
        mode: Mode::Sequential,
        cache: barriers.guest(),
        stop: Stop::Time(run_time),
    };
    let mut s: JournalStats = journal::run(&d, &jc, None)?;
    if let Some(e) = &s.error {
        return Err(BarrierError::Setup {
            step: "throughput run",
            source: e.clone().into(),
        });
    }
    let txn = s.txn_per_s();
    let (p50, p99) = if s.flush_us.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        (median(&mut s.flush_us), quantile(&mut s.flush_us, 0.99))
    };
    Ok(Throughput {
        txn_per_s: txn,
        writes_per_s: txn * f64::from(blocks + 1),
        flush_p50_us: p50,
        flush_p99_us: p99,
    })
}

/// fio on the same file: 4 KiB random writes at QD1, `fdatasync` every
/// `per_flush` writes (io_uring, O_DIRECT).
pub fn fio_flush_pattern(
    image: &Path,
    size: u64,
    per_flush: u32,
    run_time: Duration,
) -> Result<Throughput, BarrierError> {
    let out = Command::new("fio")
        .args([
            "--name=vio-barrier",
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=1",
            "--time_based",
            "--lat_percentiles=1",
            "--output-format=json",
        ])
        .arg(format!("--fdatasync={per_flush}"))
        .arg(format!("--filename={}", image.display()))
        .arg(format!("--size={size}"))
        .arg(format!("--runtime={}ms", run_time.as_millis().max(100)))
        .output()
        .map_err(|e| BarrierError::Fio(e.to_string()))?;
    if !out.status.success() {
        return Err(BarrierError::Fio(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| BarrierError::Fio(e.to_string()))?;
    let job = &v["jobs"][0];
    let missing = |what: &str| BarrierError::Fio(format!("output has no {what}"));
    let writes = job["write"]["iops"]
        .as_f64()
        .ok_or_else(|| missing("write iops"))?;
    let lat = &job["sync"]["lat_ns"]["percentile"];
    let p = |k: &str| lat[k].as_f64().map_or(f64::NAN, |ns| ns / 1e3);
    Ok(Throughput {
        txn_per_s: writes / (2.0 * f64::from(per_flush)),
        writes_per_s: writes,
        flush_p50_us: p("50.000000"),
        flush_p99_us: p("99.000000"),
    })
}

/// The throughput part's results.
#[derive(Debug, Clone)]
pub struct ThroughputResult {
    /// Barriers honoured, unsafe, writethrough: medians.
    pub ours: Vec<(Barriers, Throughput)>,
    /// fio with the same flush pattern (median), if it ran.
    pub fio: Option<Throughput>,
    /// Data blocks per transaction of these runs.
    pub blocks: u32,
    /// Sweep: writes per flush, ours writes/s, fio writes/s.
    pub sweep: Vec<(u32, f64, Option<f64>)>,
}

fn med_of(xs: &[Throughput], f: fn(&Throughput) -> f64) -> f64 {
    median(&mut xs.iter().map(f).collect::<Vec<_>>())
}

fn med(xs: &[Throughput]) -> Throughput {
    Throughput {
        txn_per_s: med_of(xs, |t| t.txn_per_s),
        writes_per_s: med_of(xs, |t| t.writes_per_s),
        flush_p50_us: med_of(xs, |t| t.flush_p50_us),
        flush_p99_us: med_of(xs, |t| t.flush_p99_us),
    }
}

/// Measures the cost of barriers (see the module documentation).
pub fn run_throughput(
    cfg: &BarrierConfig,
    tc: &ThroughputConfig,
    with_fio: bool,
) -> Result<ThroughputResult, BarrierError> {
    // One data block per transaction: data, flush, commit, flush is exactly
    // "write, fdatasync" twice, fio's --fdatasync=1.
    let blocks = 1;
    let image_err = |source| BarrierError::Image {
        path: cfg.image.clone(),
        source,
    };
    check::write_base(&cfg.image, cfg.size).map_err(image_err)?;
    let modes = [Barriers::Writeback, Barriers::Unsafe, Barriers::Writethrough];
    let mut ours: Vec<Vec<Throughput>> = vec![Vec::new(); modes.len()];
    let mut fio = Vec::new();
    let steps = tc.reps * (1 + tc.intervals.len());
    let mut progress = Progress::new("barrier throughput", steps);
    for rep in 1..=tc.reps {
        progress.step(format_args!(
            "three cache modes and fio --fdatasync=1: repetition {rep}/{}",
            tc.reps
        ));
        // Alternate, and which side goes first, so drift in the disk's speed and
        // whatever the first run leaves behind hit all alike.
        let (o, f) = in_turn(
            rep,
            || {
                modes
                    .iter()
                    .map(|&b| ours_throughput(cfg, b, blocks, tc.run_time))
                    .collect::<Result<Vec<_>, _>>()
            },
            || {
                with_fio
                    .then(|| fio_flush_pattern(&cfg.image, cfg.size, 1, tc.run_time))
                    .transpose()
            },
        );
        for (i, t) in o?.into_iter().enumerate() {
            ours[i].push(t);
        }
        fio.extend(f?);
    }
    let mut sweep = Vec::new();
    for &k in &tc.intervals {
        // 2k - 1 data blocks and a commit: k writes per flush, two flushes.
        let (mut o, mut f) = (Vec::new(), Vec::new());
        for rep in 1..=tc.reps {
            progress.step(format_args!(
                "sweep, {k} writes per flush: repetition {rep}/{}",
                tc.reps
            ));
            let (x, y) = in_turn(
                rep,
                || ours_throughput(cfg, Barriers::Writeback, 2 * k - 1, tc.sweep_time),
                || {
                    with_fio
                        .then(|| fio_flush_pattern(&cfg.image, cfg.size, k, tc.sweep_time))
                        .transpose()
                },
            );
            o.push(x?);
            f.extend(y?);
        }
        let fio_w = (!f.is_empty()).then(|| med(&f).writes_per_s);
        sweep.push((k, med(&o).writes_per_s, fio_w));
    }
    progress.finish();
    Ok(ThroughputResult {
        ours: modes.iter().zip(&ours).map(|(&b, xs)| (b, med(xs))).collect(),
        fio: (!fio.is_empty()).then(|| med(&fio)),
        blocks,
        sweep,
    })
}

/// Everything the benchmark found.
#[derive(Debug, Clone)]
pub struct BarrierReport {
    /// The consistency runs.
    pub scenarios: Vec<ScenarioResult>,
    /// The throughput part.
    pub throughput: Option<ThroughputResult>,
    /// Where the plot went.
    pub plot: Option<PathBuf>,
    /// The image's path.
    pub image: PathBuf,
    /// Repetitions of the throughput part.
    pub reps: usize,
}

/// Runs the standard scenarios and the throughput part.
pub fn run(cfg: &BarrierConfig) -> Result<BarrierReport, BarrierError> {
    let mut scenarios = Vec::new();
    for sc in Scenario::standard(cfg.txns, cfg.mutant_txns) {
        scenarios.push(run_scenario(cfg, &sc)?);
    }
    let mut throughput = None;
    let mut plot_path = None;
    if let Some(tc) = &cfg.throughput {
        let with_fio = if cfg.install_fio {
            crate::blk_bench::ensure_fio().map_err(|e| BarrierError::Fio(e.to_string()))?;
            true
        } else {
            crate::blk_bench::fio_present()
        };
        let t = run_throughput(cfg, tc, with_fio)?;
        if let (Some(path), false) = (&cfg.plot, t.sweep.is_empty()) {
            let mut series = vec![plot::Series {
                label: "ours (journal, barriers honoured)".into(),
                points: t.sweep.iter().map(|&(k, o, _)| (f64::from(k), o)).collect(),
            }];
            if t.sweep.iter().all(|s| s.2.is_some()) {
                series.push(plot::Series {
                    label: "fio randwrite --fdatasync=k".into(),
                    points: t
                        .sweep
                        .iter()
                        .map(|&(k, _, f)| (f64::from(k), f.unwrap_or(0.0)))
                        .collect(),
                });
            }
            plot::throughput_vs_interval(
                path,
                "4 KiB writes/s against writes per flush (QD1, O_DIRECT)",
                &series,
            )?;
            plot_path = Some(path.clone());
        }
        throughput = Some(t);
    }
    Ok(BarrierReport {
        scenarios,
        throughput,
        plot: plot_path,
        image: cfg.image.clone(),
        reps: cfg.throughput.as_ref().map_or(0, |t| t.reps),
    })
}
