//! `vio`: the demo and benchmark tool.
//!
//! `vio demo` runs a short version of every benchmark on built-in defaults;
//! `vio ring-bench` runs the full split-ring benchmark.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use vio::report::Report;
use vio::ring_bench::{self, RingBenchConfig};

#[derive(Parser)]
#[command(version, about = "virtio rings, drivers and devices: demo and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Short run of every benchmark on built-in defaults.
    Demo {
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Split-ring benchmark: device pop + add_used against virtio-queue, two-thread
    /// round trips per second and QD1 latency.
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
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let (report, json) = match cli.command {
        Command::Demo { json } => (ring_bench::run(&RingBenchConfig::quick()), json),
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
            (ring_bench::run(&cfg), json)
        }
    };
    finish(&report, json)
}

fn finish(report: &Report, json: Option<PathBuf>) -> std::process::ExitCode {
    print!("{}", report.table());
    if let Some(path) = json {
        if let Err(e) = report.write_json(&path) {
            eprintln!("error: writing {}: {e}", path.display());
            return std::process::ExitCode::FAILURE;
        }
        eprintln!("figures written to {}", path.display());
    }
    std::process::ExitCode::SUCCESS
}
