//! The guest-to-guest network benchmark behind `vio net-loopback`: our virtio-net
//! path against a Linux veth pair in the same run.
//!
//! **Ours**: guest A's [`NetDriver`] sends a one-way stream of equal Ethernet frames
//! to guest B's driver through A's [`NetDevice`], the learning [`Switch`] and B's
//! device, over one sharing model (both guests on the same one). Four threads: the
//! sender (`send_blocking`: it sleeps on the transmit interrupt while the queue is
//! full), A's device worker (checks, forwards), B's device worker (delivers into
//! receive buffers) and the receiver (`poll_recv` with a budget, `wait_rx` when
//! idle). Nothing spins beyond what the driver and device do themselves. In
//! [`ours`](stream_ours).
//!
//! **Peer**: two network namespaces joined by a veth pair, created for the run and
//! removed afterwards ([`VethPair`]); a sender thread in one namespace moves UDP
//! datagrams carrying the same Ethernet frame length (`frame - 42` bytes of payload
//! after the Ethernet, IPv4 and UDP headers) to a receiver thread in the other, with
//! `sendmmsg` / `recvmmsg` batches of [`MMSG_BATCH`]. In [`veth`](stream_veth).
//!
//! For each model and frame size the two alternate, `reps` times, and the medians
//! are reported: frames per second received (a frame dropped anywhere is not
//! counted), Gbit/s of frame bytes, the share of frames dropped (by the switch, or
//! by the peer's UDP receive path) and where the CPU went (each thread's run time
//! from `/proc/self/task/<tid>/schedstat`, as a percentage of one core).
//!
//! Both guests' drivers ask for the ring format of [`NetBenchConfig::ring`] (and
//! IN_ORDER if told to); the table's `ring` column says what guest A negotiated.
//!
//! Frame lengths are the bytes a driver hands its device (no FCS: virtio-net carries
//! none): 60 B is the minimum Ethernet frame (64 B on a wire), 1514 B a full
//! standard frame, 65549 B the largest frame a 16-bit MTU allows (MTU 65535; its
//! UDP payload, 65507 B, is the largest datagram IPv4 carries). Our devices get the
//! MTU the frame needs; the veth pair has MTU 65535, so each datagram crosses it as
//! one unfragmented IP packet (no GSO: plain UDP sockets do not segment).
//!
//! [`NetDriver`]: drivers_net::NetDriver
//! [`NetDevice`]: backend_host::net::NetDevice
//! [`Switch`]: backend_host::net::Switch

mod ours;
mod tcp;
mod veth;

pub use ours::{stream_ours, stream_tcp};
pub use veth::{VethError, VethPair, stream_veth};

use crate::progress::{Progress, in_turn};
use crate::report::{Cell, Table, median, ring_label};
use backend_host::net::{PortId, SwitchConfig};
use drivers_net::{NetError, NetOptions};
use std::collections::HashSet;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use virtio_core::features::Features;
use virtio_core::ring::areas::RingFormat;

/// Bytes of Ethernet, IPv4 and UDP headers in front of a UDP payload.
pub const UDP_OVERHEAD: usize = 14 + 20 + 8;
/// The smallest frame: a minimum Ethernet frame without its FCS.
pub const SMALL_FRAME: usize = 60;
/// A full standard frame: 1500-byte MTU plus the Ethernet header.
pub const MTU_FRAME: usize = 1514;
/// The largest frame a 16-bit MTU allows.
pub const JUMBO_FRAME: usize = 14 + u16::MAX as usize;
/// Datagrams per `sendmmsg` / `recvmmsg` call on the veth peer.
pub const MMSG_BATCH: usize = 64;

/// A sharing model, both guests on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// Model 1: shared page with bounce copies.
    SharedPage,
    /// Model 2: the device reads and writes driver memory directly.
    Direct,
    /// Model 3: descriptors plus the hypervisor's copy helper.
    HypervisorCopy,
    /// Model 4: grant table (one-shot grants).
    Grant,
}

impl Model {
    /// Every model, in number order.
    pub const ALL: [Model; 4] = [
        Model::SharedPage,
        Model::Direct,
        Model::HypervisorCopy,
        Model::Grant,
    ];

    /// Label for tables.
    pub fn label(self) -> &'static str {
        match self {
            Model::SharedPage => "1 shared-page",
            Model::Direct => "2 direct",
            Model::HypervisorCopy => "3 hypervisor-copy",
            Model::Grant => "4 grant",
        }
    }
}

impl std::str::FromStr for Model {
    type Err = String;

    /// A number (`2`) or a name (`direct`; `-` and `_` alike).
    fn from_str(s: &str) -> Result<Model, String> {
        match s.replace('-', "_").as_str() {
            "1" | "shared_page" => Ok(Model::SharedPage),
            "2" | "direct" => Ok(Model::Direct),
            "3" | "hypervisor_copy" => Ok(Model::HypervisorCopy),
            "4" | "grant" => Ok(Model::Grant),
            _ => Err(format!(
                "unknown sharing model {s:?} (direct, shared_page, hypervisor_copy, grant or 1-4)"
            )),
        }
    }
}

/// What a row of the table measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// A one-way stream of Ethernet frames of this many bytes (UDP datagrams of the
    /// same frame length on the peer).
    Frames(usize),
    /// A bulk TCP stream between two smoltcp guests over our drivers (Gbit/s of
    /// payload; frames/s counts what the receiver's port took). No peer: the veth
    /// pair moves UDP.
    TcpOverSmoltcp,
}

impl Workload {
    /// Label for the size column.
    pub fn label(self) -> String {
        match self {
            Workload::Frames(len) => crate::report::fmt_int(len as u64),
            Workload::TcpOverSmoltcp => "TCP over smoltcp".into(),
        }
    }
}

/// How long and what to measure.
#[derive(Debug, Clone)]
pub struct NetBenchConfig {
    /// Repetitions per row (medians are reported).
    pub reps: usize,
    /// Measured time of one run (after a short warm-up).
    pub run_time: Duration,
    /// Sharing models.
    pub models: Vec<Model>,
    /// Frame lengths, each between [`SMALL_FRAME`] and [`JUMBO_FRAME`].
    pub frames: Vec<usize>,
    /// Queue size of both queues of both guests.
    pub queue_size: u16,
    /// Frames the receiver takes per `poll_recv` call.
    pub poll_budget: usize,
    /// Bytes per receive buffer (MRG_RXBUF); `None`: the driver's default
    /// ([`drivers_net::DEFAULT_MRG_BUF`], growing with the MTU up to
    /// [`drivers_net::MAX_MRG_BUF`]: a 65549-byte frame takes 5 buffers).
    pub rx_buf_len: Option<u32>,
    /// Measure the veth peer (needs root).
    pub veth: bool,
    /// The devices' adaptive-polling budget ([`backend_host::net::NetSettings::poll`]).
    pub device_poll: Duration,
    /// Also measure a TCP stream over smoltcp per model.
    pub tcp: bool,
    /// The ring format the drivers ask for (VIRTIO_F_RING_PACKED for packed).
    pub ring: RingFormat,
    /// Whether the drivers ask for VIRTIO_F_IN_ORDER (negotiated only if offered).
    pub in_order: bool,
}

impl NetBenchConfig {
    /// Defaults for a full run: every model, 60 / 1514 / 65549-byte frames, 1 s
    /// runs, medians of 3.
    pub fn full() -> Self {
        NetBenchConfig {
            reps: 3,
            run_time: Duration::from_secs(1),
            models: Model::ALL.to_vec(),
            frames: vec![SMALL_FRAME, MTU_FRAME, JUMBO_FRAME],
            queue_size: 256,
            poll_budget: 64,
            rx_buf_len: None,
            veth: true,
            device_poll: Duration::from_micros(50),
            tcp: true,
            ring: RingFormat::Split,
            in_order: false,
        }
    }

    /// A short run for the demo.
    pub fn quick() -> Self {
        NetBenchConfig {
            reps: 1,
            run_time: Duration::from_millis(150),
            ..NetBenchConfig::full()
        }
    }

    /// What the drivers are set up with: the default options, the queue size and
    /// receive buffers of the run, and the ring format and IN_ORDER asked for.
    pub fn driver_options(&self) -> NetOptions {
        let mut wanted = NetOptions::default().wanted;
        if self.ring == RingFormat::Packed {
            wanted |= Features::RING_PACKED.bits();
        }
        if self.in_order {
            wanted |= Features::IN_ORDER.bits();
        }
        NetOptions {
            queue_size: self.queue_size,
            rx_buf_len: self.rx_buf_len,
            wanted,
            ..NetOptions::default()
        }
    }

    /// Unrecorded time before the measured window: ARP, learning, page faults.
    fn warm_up(&self) -> Duration {
        (self.run_time / 5).min(Duration::from_millis(200))
    }
}

/// Why our side of the benchmark failed (the peer's failures are notes, not errors).
#[derive(Debug, thiserror::Error)]
pub enum NetBenchError {
    /// A frame length outside what both sides can carry.
    #[error("frame length {0} outside {SMALL_FRAME}..={JUMBO_FRAME}")]
    FrameLength(usize),
    /// The driver failed to start or broke.
    #[error("network driver")]
    Driver(#[from] NetError),
    /// A guest's memory or sharing model could not be set up.
    #[error("setting up a guest")]
    Guest(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A thread could not be started.
    #[error("starting a thread")]
    Thread(#[source] std::io::Error),
    /// The receiver got a frame of another length than was sent.
    #[error("received a {got}-byte frame in a stream of {sent}-byte frames")]
    WrongFrame {
        /// Received length.
        got: usize,
        /// Sent length.
        sent: usize,
    },
}

/// How long a blocked sender or an idle receiver sleeps before it looks at the
/// stop flag again.
const STOP_CHECK: Duration = Duration::from_millis(10);

/// Run time of one thread during a window, as a share of one core.
type CpuShare = Option<f64>;

/// One measured run.
#[derive(Debug, Clone, Default)]
pub struct Stream {
    /// Frames received whole.
    pub frames: u64,
    /// Frame bytes received.
    pub bytes: u64,
    /// Frames dropped on the way (counted by the switch, or by the peer's UDP layer).
    pub drops: u64,
    /// Length of the measured window in seconds.
    pub secs: f64,
    /// CPU share of each thread, named.
    pub cpu: Vec<(&'static str, CpuShare)>,
    /// The features our sending guest's driver negotiated (`None` for the peer).
    pub features: Option<u64>,
}

impl Stream {
    /// Frames received per second.
    pub fn frames_per_sec(&self) -> f64 {
        rate(self.frames as f64, self.secs)
    }

    /// Frame bytes received per second, in Gbit/s.
    pub fn gbit(&self) -> f64 {
        rate(self.bytes as f64 * 8.0 / 1e9, self.secs)
    }

    /// Percentage of the frames that reached the receiving side's counters that
    /// were dropped.
    pub fn drop_pct(&self) -> f64 {
        rate(self.drops as f64 * 100.0, (self.frames + self.drops) as f64)
    }
}

fn rate(x: f64, over: f64) -> f64 {
    if over > 0.0 { x / over } else { 0.0 }
}

// ---- per-thread CPU time ----

/// Run time of thread `tid` of this process so far, in ns (`schedstat`'s first field).
fn cpu_ns(tid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Thread ids of this process.
fn tasks() -> HashSet<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The worker thread of `port` started since `before` was taken: named
/// `vio-net-<port>` by the device. `None` if there is not exactly one (another
/// switch in the process started one of the same name meanwhile).
fn worker_tid(port: PortId, before: &HashSet<i32>) -> Option<i32> {
    let name = format!("vio-net-{}", port.index());
    // A new thread names itself once it runs; give it a moment.
    for _ in 0..100 {
        let mut found = tasks().into_iter().filter(|t| !before.contains(t)).filter(|t| {
            std::fs::read_to_string(format!("/proc/self/task/{t}/comm")).is_ok_and(|c| c.trim_end() == name)
        });
        if let Some(tid) = found.next() {
            return found.next().is_none().then_some(tid);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// The calling thread's id.
fn gettid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

/// A thread id published by the thread itself once it runs (0 until then).
#[derive(Default)]
struct Tid(AtomicI32);

impl Tid {
    fn set(&self) {
        self.0.store(gettid(), Ordering::Release);
    }

    fn get(&self) -> Option<i32> {
        Some(self.0.load(Ordering::Acquire)).filter(|&t| t != 0)
    }
}

/// CPU times of named threads at one instant.
struct CpuSnapshot(Vec<(&'static str, Option<u64>)>);

impl CpuSnapshot {
    fn take(threads: &[(&'static str, Option<i32>)]) -> CpuSnapshot {
        CpuSnapshot(threads.iter().map(|&(n, t)| (n, t.and_then(cpu_ns))).collect())
    }

    /// Each thread's share of one core between `self` and `later`, `secs` apart.
    fn shares(&self, later: &CpuSnapshot, secs: f64) -> Vec<(&'static str, CpuShare)> {
        self.0
            .iter()
            .zip(&later.0)
            .map(|(&(n, a), &(_, b))| {
                let share = a
                    .zip(b)
                    .map(|(a, b)| rate(b.saturating_sub(a) as f64 / 1e9, secs));
                (n, share)
            })
            .collect()
    }
}

/// Runs `f` for the measured window: after the warm-up it samples `count()`
/// (frames, bytes, drops) and the threads' CPU time, waits `run_time`, samples
/// again and returns the difference.
fn window(
    cfg: &NetBenchConfig,
    threads: &[(&'static str, Option<i32>)],
    mut count: impl FnMut() -> (u64, u64, u64),
) -> Stream {
    std::thread::sleep(cfg.warm_up());
    let (c0, cpu0, t0) = (count(), CpuSnapshot::take(threads), Instant::now());
    std::thread::sleep(cfg.run_time);
    let (c1, cpu1, secs) = (count(), CpuSnapshot::take(threads), t0.elapsed().as_secs_f64());
    Stream {
        frames: c1.0 - c0.0,
        bytes: c1.1 - c0.1,
        drops: c1.2 - c0.2,
        secs,
        cpu: cpu0.shares(&cpu1, secs),
        features: None,
    }
}

/// Frames and bytes a receiver counted, published once per batch.
#[derive(Default)]
struct Counted {
    frames: AtomicU64,
    bytes: AtomicU64,
}

impl Counted {
    fn add(&self, frames: u64, bytes: u64) {
        self.frames.fetch_add(frames, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn get(&self) -> (u64, u64) {
        (
            self.frames.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

// ---- the table ----

/// Medians of one model and workload, ours and the peer's.
#[derive(Debug, Clone)]
pub struct Row {
    /// The sharing model.
    pub model: Model,
    /// What was measured.
    pub workload: Workload,
    /// Our runs, or why there are none (the sharing model does not serve the ring
    /// format asked for).
    pub ours: Result<Vec<Stream>, String>,
    /// The peer's runs, or why there are none.
    pub peer: Result<Vec<Stream>, String>,
}

/// Median of `f` over `runs`.
fn med(runs: &[Stream], f: impl Fn(&Stream) -> f64) -> f64 {
    median(&mut runs.iter().map(f).collect::<Vec<_>>())
}

/// Median CPU shares, `a/b/c` in percent of one core (`?` where a thread could not
/// be told apart).
fn cpu_cell(runs: &[Stream]) -> Cell {
    let names = runs.first().map_or(0, |s| s.cpu.len());
    let parts: Vec<String> = (0..names)
        .map(|i| {
            let mut xs: Vec<f64> = runs.iter().filter_map(|s| s.cpu.get(i)?.1).collect();
            if xs.is_empty() {
                "?".into()
            } else {
                format!("{:.0}", median(&mut xs) * 100.0)
            }
        })
        .collect();
    Cell::Text(parts.join("/"))
}

/// The ring column: what our runs negotiated (one label unless they differed).
fn ring_cell(runs: &[Stream]) -> Cell {
    let mut labels: Vec<String> = runs.iter().filter_map(|s| s.features.map(ring_label)).collect();
    labels.dedup();
    if labels.is_empty() {
        return Cell::Text("-".into());
    }
    Cell::Text(labels.join(" / "))
}

/// Renders rows as the benchmark table.
pub fn table(title: &str, rows: &[Row], notes: Vec<String>) -> Table {
    let dash = || Cell::Text("-".into());
    let rows = rows
        .iter()
        .map(|r| {
            let Ok(runs) = &r.ours else {
                // Nothing of ours ran, so there is nothing to hold the peer against.
                let why = r.ours.as_ref().err().cloned().unwrap_or_default();
                let mut row = vec![
                    Cell::Text(r.model.label().into()),
                    Cell::Text(r.workload.label()),
                    Cell::Text(why),
                ];
                row.resize_with(12, dash);
                return row;
            };
            let ours = med(runs, Stream::frames_per_sec);
            let (peer_rate, peer_gbit, peer_drop, peer_cpu, ratio) = match &r.peer {
                Ok(p) if !p.is_empty() => {
                    let rate = med(p, Stream::frames_per_sec);
                    let ratio = (rate > 0.0).then(|| format!("{:.2}x", ours / rate));
                    (
                        Cell::Num(rate),
                        Cell::Num(med(p, Stream::gbit)),
                        Cell::Num(med(p, Stream::drop_pct)),
                        cpu_cell(p),
                        ratio.map_or_else(dash, Cell::Text),
                    )
                }
                _ => (dash(), dash(), dash(), dash(), dash()),
            };
            vec![
                Cell::Text(r.model.label().into()),
                Cell::Text(r.workload.label()),
                ring_cell(runs),
                Cell::Num(ours),
                Cell::Num(med(runs, Stream::gbit)),
                Cell::Num(med(runs, Stream::drop_pct)),
                cpu_cell(runs),
                peer_rate,
                peer_gbit,
                peer_drop,
                peer_cpu,
                ratio,
            ]
        })
        .collect();
    Table {
        title: title.to_string(),
        columns: [
            "model",
            "frame B",
            "ring",
            "ours frames/s",
            "ours Gbit/s",
            "ours drop %",
            "ours CPU % snd/devA/devB/rcv",
            "veth frames/s",
            "veth Gbit/s",
            "veth drop %",
            "veth CPU % snd/rcv",
            "ours/veth",
        ]
        .map(String::from)
        .to_vec(),
        rows,
        notes,
    }
}

/// Adds a run to a row's runs.
fn push(runs: &mut Result<Vec<Stream>, String>, s: Stream) {
    if let Ok(runs) = runs {
        runs.push(s);
    }
}

/// Runs every model over every frame length, ours and the veth peer alternating,
/// and returns the table.
///
/// # Errors
/// Our path failed ([`NetBenchError`]); the peer's failures become a note.
pub fn run(cfg: &NetBenchConfig) -> Result<Table, NetBenchError> {
    if let Some(&bad) = cfg
        .frames
        .iter()
        .find(|l| !(SMALL_FRAME..=JUMBO_FRAME).contains(*l))
    {
        return Err(NetBenchError::FrameLength(bad));
    }
    let pair = if cfg.veth {
        VethPair::create().map_err(|e| e.to_string())
    } else {
        Err(format!(
            "not measured ({} rows, --no-veth)",
            crate::report::ring_asked(cfg.ring, cfg.in_order)
        ))
    };
    let mut peer_failure = pair.as_ref().err().cloned();
    let mut rows = Vec::new();
    let cells = cfg.frames.len() + usize::from(cfg.tcp);
    let steps = cells * cfg.models.len() * cfg.reps;
    let mut progress = Progress::new("net benchmark", steps);
    for &len in &cfg.frames {
        for &model in &cfg.models {
            let (mut ours, mut peer) = (Ok(Vec::new()), Vec::new());
            for rep in 1..=cfg.reps {
                progress.step(format_args!(
                    "{}, {len} B frames: repetition {rep}/{}",
                    model.label(),
                    cfg.reps
                ));
                // Each side goes first in every other repetition.
                let (o, p) = in_turn(
                    rep,
                    || stream_ours(model, len, cfg),
                    || match (&pair, &peer_failure) {
                        (Ok(p), None) => Some(stream_veth(p, len, cfg)),
                        _ => None,
                    },
                );
                push(&mut ours, o?);
                match p {
                    Some(Ok(s)) => peer.push(s),
                    Some(Err(e)) => peer_failure = Some(e.to_string()),
                    None => {}
                }
            }
            rows.push(Row {
                model,
                workload: Workload::Frames(len),
                ours,
                peer: match &peer_failure {
                    Some(why) => Err(why.clone()),
                    None => Ok(peer),
                },
            });
        }
    }
    drop(pair);
    if cfg.tcp {
        for &model in &cfg.models {
            let mut ours = Ok(Vec::new());
            for rep in 1..=cfg.reps {
                progress.step(format_args!(
                    "{}, TCP over smoltcp: repetition {rep}/{}",
                    model.label(),
                    cfg.reps
                ));
                push(&mut ours, stream_tcp(model, cfg)?);
            }
            rows.push(Row {
                model,
                workload: Workload::TcpOverSmoltcp,
                ours,
                peer: Err("no peer for TCP".into()),
            });
        }
    }
    progress.finish();
    let mut notes = vec![
        format!(
            "ours: guest A -> switch -> guest B, both guests on the model; queues of {}, receive buffers of {} (MRG_RXBUF), receive budget {}, switch backlog {} / budget {}, device polling {} us",
            cfg.queue_size,
            cfg.rx_buf_len.map_or_else(
                || format!(
                    "the driver's default ({} B, up to {} B for larger MTUs)",
                    drivers_net::DEFAULT_MRG_BUF,
                    drivers_net::MAX_MRG_BUF
                ),
                |l| format!("{l} B")
            ),
            cfg.poll_budget,
            SwitchConfig::default().backlog,
            SwitchConfig::default().budget,
            cfg.device_poll.as_micros()
        ),
        format!(
            "frames are the bytes a driver sends (no FCS); device MTU 1500, or frame - 14 above 1514 (65535 for {JUMBO_FRAME} B)"
        ),
        format!(
            "veth: UDP datagrams of frame - {UDP_OVERHEAD} B between two netns, sendmmsg/recvmmsg x{MMSG_BATCH}, MTU 65535 (one unfragmented IP packet each, no GSO), socket buffers {} MiB",
            veth::VETH_SOCKBUF >> 20
        ),
        "drop %: of the frames that reached the receiving side (switch drop counters; UDP InErrors on veth); CPU %: thread run time / window".into(),
        format!(
            "ring: what guest A's driver negotiated (both asked for {}; model 3 shares neither packed nor in-order queues, so its driver negotiates without them)",
            crate::report::ring_asked(cfg.ring, cfg.in_order)
        ),
    ];
    if let Some(why) = peer_failure {
        notes.push(format!("veth peer: {why}"));
    }
    Ok(table(
        &format!(
            "guest-to-guest one-way stream vs a veth pair, {} s runs, medians of {}",
            cfg.run_time.as_secs_f64(),
            cfg.reps
        ),
        &rows,
        notes,
    ))
}
