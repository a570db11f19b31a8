//! `vio`: the demo and benchmark tool.
//!
//! `vio demo` runs a short version of every benchmark on built-in defaults (the block
//! and network ones over the split ring, then over the packed one);
//! `vio ring-bench` runs the full ring benchmark (split and packed, each with and
//! without IN_ORDER), `vio net-loopback` the guest-to-guest network benchmark
//! against a veth pair, `vio blk-bench` our block path against fio (both over the
//! ring `--ring` names), `vio barrier-bench` the
//! block barrier consistency benchmark (crash images, seeded bugs, flush cost),
//! `vio vhost-bench` our vhost-user-blk daemon against qemu-storage-daemon.

use backend_host::blk::device::BlkSettings;
use backend_host::blk::disk::DiskOptions;
use backend_host::vhost_user::BlkServe;
use clap::builder::{PossibleValuesParser, TypedValueParser as _};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use vio::barrier::{self, BarrierConfig, BarrierReport, ThroughputConfig};
use vio::blk_bench::{self, BlkBenchConfig};
use vio::model_bench::{self, ModelBenchConfig};
use vio::net_bench::{self, Model, NetBenchConfig};
use vio::report::Table;
use vio::ring_bench::{self, RingBenchConfig};
use vio::vhost_bench::{self, VhostBenchConfig};
use virtio_core::ring::areas::RingFormat;

/// `--ring`: a ring format by name; anything else is refused with the names clap
/// lists.
fn ring_parser() -> impl clap::builder::TypedValueParser<Value = RingFormat> {
    PossibleValuesParser::new(["split", "packed"]).map(|s| match s.as_str() {
        "packed" => RingFormat::Packed,
        _ => RingFormat::Split,
    })
}

#[derive(Parser)]
#[command(version, about = "virtio rings, drivers and devices: demo and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Short run of every benchmark on built-in defaults; the block and network ones
    /// over the split ring, then over the packed one.
    Demo {
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Ring benchmark, split and packed, each with and without IN_ORDER: device pop +
    /// add_used (split against virtio-queue), two-thread round trips per second and
    /// QD1 latency, with ratios to split's in the same run.
    RingBench {
        /// Repetitions per measurement (medians are reported).
        #[arg(long, default_value_t = 7)]
        reps: usize,
        /// Milliseconds per repetition of the two-thread measurements.
        #[arg(long, default_value_t = 1000)]
        millis: u64,
        /// Queue size (a power of two up to 32768).
        #[arg(long, default_value_t = 256)]
        queue_size: u16,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Block benchmark: our virtio-blk path (model 2, io_uring, O_DIRECT) against fio on
    /// the same file: 4k randread QD1/QD32, randwrite QD32, write + flush QD1.
    BlkBench {
        /// Image file (created and filled if missing); must not be on tmpfs.
        #[arg(long, default_value = "target/vio-blk-bench.img")]
        image: PathBuf,
        /// Image size in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// Seconds per run.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        /// Repetitions (medians are reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Device adaptive-polling budget in microseconds (0 sleeps at once).
        #[arg(long, default_value_t = 100)]
        poll_us: u64,
        /// Ring format our driver asks for.
        #[arg(long, default_value = "split", value_parser = ring_parser())]
        ring: RingFormat,
        /// Ask for VIRTIO_F_IN_ORDER too (negotiated if the device offers it; the
        /// table's ring column says whether it was).
        #[arg(long)]
        in_order: bool,
        /// Also run our device with a rate limiter on every bucket far above what
        /// the disk does, in turn with the others in each repetition: the
        /// limiter's cost when it does not limit, measured in the same run.
        #[arg(long)]
        idle_limiter: bool,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Block barrier consistency benchmark: a commit-record journal over our driver
    /// and device, every crash image the durability rule allows checked, five seeded
    /// bugs that must be caught; then transactions/s with barriers honoured, unsafe
    /// and writethrough against fio's same flush pattern, and a writes-per-flush
    /// sweep plotted as SVG.
    BarrierBench {
        /// Image file (recreated per run); must not be on tmpfs.
        #[arg(long, default_value = "target/vio-barrier.img")]
        image: PathBuf,
        /// Transactions per real-backend consistency run.
        #[arg(long, default_value_t = 600)]
        txns: u64,
        /// Transactions per mutant run.
        #[arg(long, default_value_t = 40)]
        mutant_txns: u64,
        /// Seed of the sampled crash images.
        #[arg(long, default_value_t = 0x5EED)]
        seed: u64,
        /// Repetitions of the throughput runs (medians are reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Seconds per throughput run.
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
        /// Seconds per point of the writes-per-flush sweep.
        #[arg(long, default_value_t = 1.0)]
        sweep_secs: f64,
        /// Writes per flush of the sweep, comma-separated (empty: no sweep).
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
        intervals: Vec<u32>,
        /// Only the consistency part.
        #[arg(long)]
        no_throughput: bool,
        /// Device adaptive-polling budget in microseconds (0 sleeps at once).
        #[arg(long, default_value_t = 100)]
        poll_us: u64,
        /// Where to draw the throughput-vs-flush-interval plot (SVG).
        #[arg(long, default_value = "target/vio-barrier-throughput.svg")]
        plot: PathBuf,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// vhost-user block benchmark: our vhost-user-blk daemon against
    /// qemu-storage-daemon on the same image, each in its own process, driven by our
    /// driver as a vhost-user frontend: 4k randread QD1/QD32, randwrite QD32, write +
    /// flush QD1.
    VhostBench {
        /// Image file (created and filled if missing); must not be on tmpfs.
        #[arg(long, default_value = "target/vio-vhost-bench.img")]
        image: PathBuf,
        /// Image size in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// Seconds per run.
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
        /// Repetitions (medians are reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Our daemon's adaptive-polling window in microseconds (0 sleeps at once).
        #[arg(long, default_value_t = 50)]
        poll_us: u64,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Our vhost-user-blk daemon (what `vio-host blk` runs), for `vhost-bench`.
    #[command(hide = true)]
    VhostServe {
        /// Socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// Image to serve.
        #[arg(long)]
        image: PathBuf,
        /// Adaptive-polling window in microseconds.
        #[arg(long, default_value_t = 0)]
        poll_us: u64,
        /// Request queues.
        #[arg(long, default_value_t = 1)]
        queues: u16,
        /// Largest ring size accepted (QEMU's virtio-mmio offers guests 1024).
        #[arg(long, default_value_t = 1024)]
        queue_size: u16,
    },
    /// Sharing-model benchmark: 64 B, 1514 B and 64 KiB buffers moved each way over
    /// each of the four models, with memcpy measured in the same run.
    ModelBench {
        /// Repetitions per figure (medians are reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Milliseconds per repetition.
        #[arg(long, default_value_t = 400)]
        millis: u64,
        /// Buffers per batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Guest-to-guest network benchmark: a one-way stream of 60, 1514 and 65549-byte
    /// frames from guest A to guest B through our drivers, devices and switch over
    /// each sharing model, against UDP over a veth pair between two network
    /// namespaces (needs root) in the same run.
    NetLoopback {
        /// Repetitions (medians are reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Seconds per measured run.
        #[arg(long, default_value_t = 1.0)]
        secs: f64,
        /// Sharing models, comma-separated: direct, shared_page, hypervisor_copy,
        /// grant (or 1-4).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "shared_page,direct,hypervisor_copy,grant"
        )]
        models: Vec<Model>,
        /// Frame lengths in bytes (Ethernet header included, no FCS), 60 to 65549.
        #[arg(long, value_delimiter = ',', default_value = "60,1514,65549")]
        frames: Vec<usize>,
        /// Queue size of every queue.
        #[arg(long, default_value_t = 256)]
        queue_size: u16,
        /// Bytes per receive buffer (mergeable buffers; default: the driver's 2048).
        #[arg(long)]
        rx_buf_len: Option<u32>,
        /// Skip the veth peer.
        #[arg(long)]
        no_veth: bool,
        /// Skip the TCP-over-smoltcp rows.
        #[arg(long)]
        no_tcp: bool,
        /// Device adaptive-polling budget in microseconds (0 sleeps at once).
        #[arg(long, default_value_t = 50)]
        poll_us: u64,
        /// Ring format both guests' drivers ask for.
        #[arg(long, default_value = "split", value_parser = ring_parser())]
        ring: RingFormat,
        /// Ask for VIRTIO_F_IN_ORDER too (negotiated if the device offers it; the
        /// table's ring column says whether it was).
        #[arg(long)]
        in_order: bool,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a terminal: a CI log or a file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let (tables, json) = match cli.command {
        Command::Demo { json } => {
            let mut tables = vec![
                ring_bench::run(&RingBenchConfig::quick()).to_table(),
                model_bench::run(&ModelBenchConfig::quick()),
            ];
            // Block and network over each ring format, one table each with a ring
            // column; the peers (fio, veth) run no virtio ring: measured once, on
            // the split rows.
            let packed_blk = BlkBenchConfig {
                ring: RingFormat::Packed,
                fio: false,
                ..BlkBenchConfig::quick()
            };
            match both_rings(blk_bench::run(&BlkBenchConfig::quick()), || {
                blk_bench::run(&packed_blk)
            }) {
                Ok(t) => tables.extend(t),
                Err(e) => return failed("block benchmark", &e),
            }
            let packed_net = NetBenchConfig {
                ring: RingFormat::Packed,
                veth: false,
                ..NetBenchConfig::quick()
            };
            match both_rings(net_bench::run(&NetBenchConfig::quick()), || {
                net_bench::run(&packed_net)
            }) {
                Ok(t) => tables.extend(t),
                Err(e) => return failed("network benchmark", &e),
            }
            match barrier::run(&BarrierConfig::quick()) {
                Ok(r) => tables.extend(r.tables()),
                Err(e) => return failed("barrier benchmark", &e),
            }
            (tables, json)
        }
        Command::NetLoopback {
            reps,
            secs,
            models,
            frames,
            queue_size,
            rx_buf_len,
            no_veth,
            no_tcp,
            poll_us,
            ring,
            in_order,
            json,
        } => {
            if !(0.01..=600.0).contains(&secs) || virtio_core::ring::SplitLayout::new(queue_size).is_none() {
                eprintln!("error: --secs must be between 0.01 and 600, --queue-size a power of two");
                return std::process::ExitCode::from(2);
            }
            let cfg = NetBenchConfig {
                reps: reps.max(1),
                run_time: Duration::from_secs_f64(secs),
                models,
                frames,
                queue_size,
                rx_buf_len,
                veth: !no_veth,
                tcp: !no_tcp,
                device_poll: Duration::from_micros(poll_us),
                ring,
                in_order,
                ..NetBenchConfig::full()
            };
            match net_bench::run(&cfg) {
                Ok(t) => (vec![t], json),
                Err(e) => return failed("network benchmark", &e),
            }
        }
        Command::VhostServe {
            socket,
            image,
            poll_us,
            queues,
            queue_size,
        } => {
            let opts = BlkServe {
                socket,
                image,
                disk: DiskOptions::default(),
                settings: BlkSettings {
                    poll: Duration::from_micros(poll_us),
                    queues,
                    queue_size,
                    ..BlkSettings::default()
                },
            };
            return match backend_host::vhost_user::serve_blk(opts) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => failed("vhost-user daemon", e.as_ref()),
            };
        }
        Command::VhostBench {
            image,
            size_mib,
            secs,
            reps,
            poll_us,
            json,
        } => {
            if !(0.1..=600.0).contains(&secs) || size_mib == 0 {
                eprintln!("error: --secs must be between 0.1 and 600 and --size-mib positive");
                return std::process::ExitCode::from(2);
            }
            let cfg = match VhostBenchConfig::full() {
                Ok(c) => VhostBenchConfig {
                    image,
                    size: size_mib << 20,
                    run_time: Duration::from_secs_f64(secs),
                    reps: reps.max(1),
                    poll: Duration::from_micros(poll_us),
                    ..c
                },
                Err(e) => return failed("cannot find the vio binary", &e),
            };
            match vhost_bench::run(&cfg) {
                Ok(t) => (vec![t], json),
                Err(e) => return failed("vhost-user benchmark", &e),
            }
        }
        Command::BlkBench {
            image,
            size_mib,
            secs,
            reps,
            poll_us,
            ring,
            in_order,
            idle_limiter,
            json,
        } => {
            if !(0.1..=600.0).contains(&secs) || size_mib == 0 {
                eprintln!("error: --secs must be between 0.1 and 600 and --size-mib positive");
                return std::process::ExitCode::from(2);
            }
            let cfg = BlkBenchConfig {
                image,
                size: size_mib << 20,
                run_time: Duration::from_secs_f64(secs),
                reps: reps.max(1),
                poll: Duration::from_micros(poll_us),
                install_fio: true,
                fio: true,
                ring,
                in_order,
                idle_limiter,
            };
            match blk_bench::run(&cfg) {
                Ok(t) => (vec![t], json),
                Err(e) => return failed("block benchmark", &e),
            }
        }
        Command::BarrierBench {
            image,
            txns,
            mutant_txns,
            seed,
            reps,
            secs,
            sweep_secs,
            intervals,
            no_throughput,
            poll_us,
            plot,
            json,
        } => {
            if !(0.1..=600.0).contains(&secs)
                || !(0.1..=600.0).contains(&sweep_secs)
                || txns == 0
                || intervals.iter().any(|&k| !(1..=1024).contains(&k))
            {
                eprintln!(
                    "error: --secs and --sweep-secs must be between 0.1 and 600, --txns positive, intervals 1 to 1024"
                );
                return std::process::ExitCode::from(2);
            }
            let cfg = BarrierConfig {
                image,
                txns,
                mutant_txns: mutant_txns.max(8),
                seed,
                throughput: (!no_throughput).then(|| ThroughputConfig {
                    run_time: Duration::from_secs_f64(secs),
                    reps: reps.max(1),
                    intervals,
                    sweep_time: Duration::from_secs_f64(sweep_secs),
                }),
                plot: Some(plot),
                poll: Duration::from_micros(poll_us),
                ..BarrierConfig::full()
            };
            let report = match barrier::run(&cfg) {
                Ok(r) => r,
                Err(e) => return failed("barrier benchmark", &e),
            };
            let code = finish(&report.tables(), json);
            return if barrier_as_expected(&report) {
                code
            } else {
                eprintln!("error: violations on the real backend, or a mutant not caught");
                std::process::ExitCode::FAILURE
            };
        }
        Command::ModelBench {
            reps,
            millis,
            batch,
            json,
        } => {
            if !(1..=1024).contains(&batch) {
                eprintln!("error: batch must be between 1 and 1024, not {batch}");
                return std::process::ExitCode::from(2);
            }
            let cfg = ModelBenchConfig {
                reps: reps.max(1),
                run_time: Duration::from_millis(millis.max(10)),
                batch,
                ..ModelBenchConfig::full()
            };
            (vec![model_bench::run(&cfg)], json)
        }
        Command::RingBench {
            reps,
            millis,
            queue_size,
            json,
        } => {
            if virtio_core::ring::SplitLayout::new(queue_size).is_none() {
                eprintln!("error: queue size {queue_size} is not a power of two between 1 and 32768");
                return std::process::ExitCode::from(2);
            }
            let cfg = RingBenchConfig {
                reps: reps.max(1),
                run_time: Duration::from_millis(millis.max(10)),
                queue_size,
                ..RingBenchConfig::full()
            };
            (vec![ring_bench::run(&cfg).to_table()], json)
        }
    };
    finish(&tables, json)
}

/// The split table `split` with the rows of the packed run `packed` appended (as a
/// table of its own should their columns ever differ).
fn both_rings<E>(
    split: Result<Table, E>,
    packed: impl FnOnce() -> Result<Table, E>,
) -> Result<Vec<Table>, E> {
    let mut table = split?;
    Ok(match table.append(packed()?) {
        Ok(()) => vec![table],
        Err(other) => vec![table, *other],
    })
}

/// Whether the real backend had no violation and every mutant was caught.
fn barrier_as_expected(r: &BarrierReport) -> bool {
    r.scenarios.iter().all(|s| s.as_expected())
}

/// Says that `what` failed with `e` (and its causes); the exit code for it.
fn failed(what: &str, e: &dyn std::error::Error) -> std::process::ExitCode {
    eprintln!("error: {what}: {}", error_chain(e));
    std::process::ExitCode::FAILURE
}

/// An error and its causes, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s = format!("{s}: {c}");
        cause = c.source();
    }
    s
}

fn finish(tables: &[Table], json: Option<PathBuf>) -> std::process::ExitCode {
    for (i, t) in tables.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print!("{}", t.render());
    }
    if let Some(path) = json {
        let text = match serde_json::to_string_pretty(tables) {
            Ok(t) => t,
            Err(e) => return failed("encoding figures", &e),
        };
        if let Err(e) = std::fs::write(&path, text + "\n") {
            return failed(&format!("writing {}", path.display()), &e);
        }
        eprintln!("figures written to {}", path.display());
    }
    std::process::ExitCode::SUCCESS
}
