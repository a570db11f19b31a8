//! `vio-host`: our devices served to a VMM over vhost-user.
//!
//! ```text
//! vio-host blk --socket /tmp/vio-blk.sock --image disk.img [--queues 2] [--cache writeback]
//! vio-host net --socket /tmp/vio-net0.sock [--mac 52:54:00:12:34:56] [--socket ...] [--mtu 1500]
//! ```
//!
//! Guest memory must come as regular files sealed against shrinking (QEMU's
//! memory-backend-memfd does this); `--allow-unsealed-memory` lets others in at
//! the risk its help describes (HOSTILE 35).
//!
//! QEMU then attaches it with `-chardev socket,id=c0,path=/tmp/vio-blk.sock
//! -device vhost-user-blk-pci,chardev=c0,num-queues=2` (guest memory must be shared:
//! `-object memory-backend-memfd,id=mem,size=512M,share=on -machine
//! ...,memory-backend=mem`). The daemon serves one frontend at a time and waits for
//! the next when it goes away. Logs go to stderr (`RUST_LOG` filters them).
//!
//! `net` plugs one port per socket into one learning switch, so the VMs on its
//! sockets share an Ethernet segment; QEMU attaches a port with `-chardev
//! socket,id=c1,path=/tmp/vio-net0.sock -netdev vhost-user,id=n0,chardev=c1
//! -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56`.
//!
//! QEMU keeps a vhost-user-net device's configuration space (and so its MAC
//! address) to itself, so the daemon learns the guest's address only from `--mac`,
//! given once per socket in the order of the `--socket`s: the same address as the
//! device's `mac=`. A port with a `--mac` is bound to it (HOSTILE 33): the guest
//! may send only from that address and no other port can take it over;
//! `--allow-any-source-mac` turns that off. A port without one learns any source
//! address, bounded and aged like every learnt entry.

use backend_host::blk::device::{BlkSettings, CacheMode, EngineChoice};
use backend_host::blk::disk::{DirectMode, DiskOptions};
use backend_host::blk::limit::{Bucket, Limits, RateLimiter};
use backend_host::net::{NetDevice, NetSettings, Switch, SwitchConfig};
use backend_host::vhost_user::BlkServe;
use backend_host::vhost_user::{Daemon, MemoryPolicy, VhostMemory};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(version, about = "vio devices served over vhost-user")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A virtio-blk device over an image file (io_uring, O_DIRECT, honoured flushes).
    Blk(BlkArgs),
    /// A learning switch with a virtio-net port on each socket.
    Net(NetArgs),
}

#[derive(clap::Args)]
struct NetArgs {
    /// Unix socket to listen on, one per port (a stale socket file there is
    /// replaced); repeat it for more ports on the same switch.
    #[arg(long = "socket", required = true)]
    sockets: Vec<PathBuf>,
    /// The guest's MAC address on each socket, in order (QEMU's `mac=` on the
    /// device, e.g. 52:54:00:12:34:56): the port is bound to it and drops frames
    /// from any other source address. Sockets past the last `--mac` are unbound.
    #[arg(long = "mac", value_parser = parse_mac)]
    macs: Vec<Mac>,
    /// Do not bind the ports given a `--mac`: their guests may send from any
    /// source address, which the switch learns.
    #[arg(long)]
    allow_any_source_mac: bool,
    /// The MTU enforced on transmit (QEMU tells the guest its own `host_mtu`).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(68..))]
    mtu: u16,
    /// Queue pairs each port offers (MQ above 1; QEMU's `queues=` on the netdev).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=32768))]
    queue_pairs: u16,
    /// Largest ring size accepted (a power of two up to 32768). The frontend picks
    /// the size: QEMU up to 1024, which virtio-mmio always offers the guest.
    #[arg(long, default_value_t = 1024, value_parser = queue_size)]
    queue_size: u16,
    /// Adaptive polling window in microseconds after each burst of work (0: sleep at
    /// once).
    #[arg(long, default_value_t = 0)]
    poll_us: u64,
    /// Accept guest memory files that cannot be sealed against shrinking, or that
    /// are not regular files (memory-backend-file on /dev/shm or hugetlbfs, DAX
    /// devices). RISK: such a frontend can shrink its file under the daemon; the
    /// SIGBUS that follows is contained (its session is ended, the device may
    /// serve zeros until then), but the guard is a process-wide signal handler.
    /// Without the flag these files are refused; QEMU's memory-backend-memfd
    /// seals its files and needs no flag.
    #[arg(long)]
    allow_unsealed_memory: bool,
}

impl BlkArgs {
    /// The rate limiter the flags ask for, if any.
    fn limiter(&self) -> Option<std::sync::Arc<RateLimiter>> {
        let ops = |r: Option<u64>| r.map(Bucket::new);
        let mib = |r: Option<u64>| r.map(|m| Bucket::new(m.saturating_mul(1 << 20)));
        let limits = Limits {
            ops: ops(self.limit_iops),
            read_ops: ops(self.limit_read_iops),
            write_ops: ops(self.limit_write_iops),
            bytes: mib(self.limit_mib),
            read_bytes: mib(self.limit_read_mib),
            write_bytes: mib(self.limit_write_mib),
        };
        // A control socket may set limits later: it needs a limiter from the start.
        (!limits.is_unlimited() || self.control.is_some()).then(|| RateLimiter::new(limits))
    }
}

#[derive(clap::Args)]
struct BlkArgs {
    /// Unix socket to listen on (a stale socket file there is replaced).
    #[arg(long)]
    socket: PathBuf,
    /// Image file or block device.
    #[arg(long)]
    image: PathBuf,
    /// Serve the image read-only (the device offers VIRTIO_BLK_F_RO).
    #[arg(long)]
    readonly: bool,
    /// Number of request queues.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    queues: u16,
    /// Largest ring size accepted (a power of two up to 32768). The frontend picks
    /// the size: QEMU up to 1024, which virtio-mmio always offers the guest.
    #[arg(long, default_value_t = 1024, value_parser = queue_size)]
    queue_size: u16,
    /// How writes reach stable storage.
    #[arg(long, value_enum, default_value_t = Cache::Writeback)]
    cache: Cache,
    /// I/O engine.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
    /// Use the page cache instead of O_DIRECT (for filesystems without direct I/O).
    #[arg(long)]
    buffered: bool,
    /// Adaptive polling window in microseconds after each burst of work (0: sleep at
    /// once).
    #[arg(long, default_value_t = 0)]
    poll_us: u64,
    /// Serial number returned by GET_ID (at most 20 bytes are sent).
    #[arg(long, default_value = "vio-blk")]
    serial: String,
    /// Most MiB of data buffers each queue holds for requests in flight, whatever
    /// the guest sends (at least 1); more requests wait in the ring.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_inflight_mib: u32,
    /// Accept guest memory files that cannot be sealed against shrinking, or that
    /// are not regular files (memory-backend-file on /dev/shm or hugetlbfs, DAX
    /// devices). RISK: such a frontend can shrink its file under the daemon; the
    /// SIGBUS that follows is contained (its session is ended, the device may
    /// serve zeros until then), but the guard is a process-wide signal handler.
    /// Without the flag these files are refused; QEMU's memory-backend-memfd
    /// seals its files and needs no flag.
    #[arg(long)]
    allow_unsealed_memory: bool,
    /// Rate limits, per second, for reads and writes together: operations.
    /// Every queue of the device shares each limit; bursts are a hundredth of a
    /// second's worth. FLUSH, DISCARD and WRITE_ZEROES are not limited.
    #[arg(long, value_name = "OPS", help_heading = "Rate limits", value_parser = clap::value_parser!(u64).range(1..))]
    limit_iops: Option<u64>,
    /// Read operations per second.
    #[arg(long, value_name = "OPS", help_heading = "Rate limits", value_parser = clap::value_parser!(u64).range(1..))]
    limit_read_iops: Option<u64>,
    /// Write operations per second.
    #[arg(long, value_name = "OPS", help_heading = "Rate limits", value_parser = clap::value_parser!(u64).range(1..))]
    limit_write_iops: Option<u64>,
    /// MiB per second, read and written together.
    #[arg(long, value_name = "MIB", help_heading = "Rate limits", value_parser = clap::value_parser!(u64).range(1..))]
    limit_mib: Option<u64>,
    /// MiB read per second.
    #[arg(long, value_name = "MIB", help_heading = "Rate limits", value_parser = clap::value_parser!(u64).range(1..))]
    limit_read_mib: Option<u64>,
    /// A unix socket on which the limits can be read and changed while the
    /// daemon serves (`get`, `set iops=3000 mib=200`; see the README), with or
    /// without limits at the start.
    #[arg(long, value_name = "PATH", help_heading = "Rate limits")]
    control: Option<PathBuf>,
    /// MiB written per second.
    #[arg(long, value_name = "MIB", help_heading = "Rate limits", value_parser = clap::value_parser!(u64).range(1..))]
    limit_write_mib: Option<u64>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Cache {
    /// Flushes run fdatasync; the guest sees a volatile write cache.
    Writeback,
    /// Every write is RWF_DSYNC.
    Writethrough,
    /// Flushes are acknowledged without syncing (throw-away images only).
    Unsafe,
}

#[derive(Clone, Copy, ValueEnum)]
enum Engine {
    /// io_uring when it works here, else the thread pool.
    Auto,
    /// io_uring only.
    Uring,
    /// The thread pool.
    Sync,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only for a terminal: a journal or a file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Blk(args) => serve_blk(args),
        Command::Net(args) => serve_net(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("vio-host: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            tracing::error!("{msg}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn serve_blk(args: BlkArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if args.control.as_ref() == Some(&args.socket) {
        return Err("--control must name another socket than --socket".into());
    }
    let limiter = args.limiter();
    if let (Some(path), Some(limiter)) = (&args.control, &limiter) {
        backend_host::blk::control::serve(path, limiter.clone())?;
    }
    let memory = MemoryPolicy {
        allow_unsealed: args.allow_unsealed_memory,
    };
    backend_host::vhost_user::serve_blk_with(
        BlkServe {
            socket: args.socket,
            image: args.image,
            disk: DiskOptions {
                read_only: args.readonly,
                direct: if args.buffered {
                    DirectMode::Off
                } else {
                    DirectMode::Require
                },
            },
            settings: BlkSettings {
                cache: match args.cache {
                    Cache::Writeback => CacheMode::Writeback,
                    Cache::Writethrough => CacheMode::Writethrough,
                    Cache::Unsafe => CacheMode::Unsafe,
                },
                queues: args.queues,
                queue_size: args.queue_size,
                serial: args.serial,
                engine: match args.engine {
                    Engine::Auto => EngineChoice::Auto,
                    Engine::Uring => EngineChoice::Uring,
                    Engine::Sync => EngineChoice::Sync,
                },
                poll: Duration::from_micros(args.poll_us),
                max_bytes_in_flight: (args.max_inflight_mib as usize) << 20,
                limiter,
            },
        },
        memory,
    )
}

fn serve_net(args: NetArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if args.macs.len() > args.sockets.len() {
        return Err(format!("{} --mac for {} --socket", args.macs.len(), args.sockets.len()).into());
    }
    let switch = Switch::new(SwitchConfig::default());
    let settings = NetSettings {
        mtu: args.mtu,
        queue_size: args.queue_size,
        queue_pairs: args.queue_pairs,
        poll: Duration::from_micros(args.poll_us),
        allow_any_source_mac: args.allow_any_source_mac,
        ..NetSettings::default()
    };
    // Every socket is bound before any is served, so a bad one fails the start.
    let mut daemons = Vec::with_capacity(args.sockets.len());
    let policy = MemoryPolicy {
        allow_unsealed: args.allow_unsealed_memory,
    };
    for (i, socket) in args.sockets.iter().enumerate() {
        let memory = VhostMemory::with_policy(policy)?;
        let mac = args.macs.get(i).map(|m| m.0);
        let settings = NetSettings {
            mac,
            ..settings.clone()
        };
        let device = NetDevice::new(memory.clone(), &switch, settings)?;
        let bound = mac.is_some() && !args.allow_any_source_mac;
        tracing::info!(socket = %socket.display(), port = %device.port(), ?mac, bound, "switch port");
        daemons.push(Daemon::bind(socket, device, memory)?);
    }
    std::thread::scope(|s| {
        let served = daemons
            .iter()
            .map(|d| {
                std::thread::Builder::new()
                    .name("vio-host-net".into())
                    .spawn_scoped(s, || d.run())
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The daemons serve until the process ends; the first that fails ends it.
        for t in served {
            match t.join() {
                Ok(result) => result?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(())
    })
}

/// A unicast MAC address from the command line.
#[derive(Debug, Clone, Copy)]
struct Mac([u8; 6]);

/// Parses `52:54:00:12:34:56` (or with `-`); a group address is refused, as no
/// station sends from one.
fn parse_mac(s: &str) -> Result<Mac, String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("{s} is not six hex bytes"));
    }
    for (b, p) in mac.iter_mut().zip(&parts) {
        *b = u8::from_str_radix(p, 16).map_err(|e| format!("{s}: {e}"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{s} is a group address"));
    }
    Ok(Mac(mac))
}

fn queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|e| format!("{e}"))?;
    if n.is_power_of_two() && n <= 32768 {
        Ok(n)
    } else {
        Err(format!("{n} is not a power of two up to 32768"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_parse_and_group_addresses_are_refused() {
        assert_eq!(
            parse_mac("52:54:00:12:34:5f").unwrap().0,
            [0x52, 0x54, 0, 0x12, 0x34, 0x5f]
        );
        assert_eq!(parse_mac("02-00-00-00-00-01").unwrap().0, [2, 0, 0, 0, 0, 1]);
        assert!(parse_mac("01:00:5e:00:00:01").is_err(), "multicast");
        assert!(parse_mac("52:54:00:12:34").is_err(), "five bytes");
        assert!(parse_mac("52:54:00:12:34:5g").is_err(), "not hex");
        let cli = Cli::try_parse_from([
            "vio-host",
            "net",
            "--socket",
            "/tmp/a",
            "--socket",
            "/tmp/b",
            "--mac",
            "52:54:00:12:34:56",
        ])
        .unwrap();
        let Command::Net(args) = cli.command else {
            panic!("not net");
        };
        assert_eq!(args.macs.len(), 1);
        assert!(!args.allow_any_source_mac);
    }
}
