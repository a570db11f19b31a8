//! The ring benchmark behind `vio ring-bench` and `vio demo`.
//!
//! Our side runs through the queue interface ([`DeviceRing`], [`DriverRing`]), as our
//! devices and drivers do, in four ring configurations ([`RINGS`]): split, packed
//! (virtio 1.2 §2.8), and each with VIRTIO_F_IN_ORDER (§2.7.9, §2.8.x) negotiated.
//! Three measurements per configuration, each repeated and reported as a median:
//!
//! 1. Device-side cost, single thread: pop one single-descriptor chain and return it as
//!    used. For the split ring, rust-vmm `virtio-queue` serves the very same ring
//!    memory (filled by our driver, outside the timed section) as a peer; it has no
//!    packed device side.
//! 2. Round trips per second with two threads (driver and device on their own cores,
//!    both polling, the queue kept full).
//! 3. Queue-depth-1 round-trip latency with both sides polling: median and p99.
//!
//! Every repetition runs the four configurations in turn, starting with another one
//! each time, so drift hits them alike; the figures of the other three are given as
//! ratios to split's from the same run, next to issue 14's goals where it sets one.

use crate::peer::SharedGuest;
use crate::progress::{Progress, in_turn};
use crate::report::{Goal, Report, median, quantile};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use virtio_core::features::Features;
use virtio_core::test_utils::{Arena, IdentityShare};
use virtio_core::{DeviceRing, DriverRing, GuestBuf, RingMemory};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

/// How long and how often to measure.
#[derive(Debug, Clone, Copy)]
pub struct RingBenchConfig {
    /// Repetitions of each measurement (medians are reported).
    pub reps: usize,
    /// Duration of one timed repetition of the two-thread measurements.
    pub run_time: Duration,
    /// Chains per repetition of the single-thread measurement.
    pub single_thread_chains: u64,
    /// Queue size.
    pub queue_size: u16,
}

impl RingBenchConfig {
    /// Defaults for a full benchmark run.
    pub fn full() -> Self {
        RingBenchConfig {
            reps: 7,
            run_time: Duration::from_millis(1000),
            single_thread_chains: 4_000_000,
            queue_size: 256,
        }
    }

    /// A short run for the demo (four ring configurations: 200 ms per two-thread
    /// run keeps the whole under five seconds).
    pub fn quick() -> Self {
        RingBenchConfig {
            reps: 3,
            run_time: Duration::from_millis(200),
            single_thread_chains: 1_000_000,
            queue_size: 256,
        }
    }
}

/// One ring configuration: how its rows are named and the feature bits it adds to
/// VERSION_1 | EVENT_IDX.
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    /// What the row names add to split's (empty for split: its rows keep their
    /// names).
    pub suffix: &'static str,
    /// Who the ratio is taken against, as the peer column says.
    pub label: &'static str,
    /// Feature bits on top of VERSION_1 | EVENT_IDX.
    pub features: Features,
    /// Issue 14's goals for this configuration.
    pub goals: Goals,
}

/// Targets for a ring's figures as ratios to split's in the same run.
#[derive(Debug, Clone, Copy)]
pub struct Goals {
    /// For the two-thread round trips per second.
    pub round_trips: Option<Goal>,
    /// For the QD1 round trip median.
    pub qd1_median: Option<Goal>,
}

/// No goal.
const NO_GOALS: Goals = Goals {
    round_trips: None,
    qd1_median: None,
};

/// The configurations measured, split first: every other one is compared with it.
pub const RINGS: [Ring; 4] = [
    Ring {
        suffix: "",
        label: "split",
        features: Features::empty(),
        goals: NO_GOALS,
    },
    Ring {
        suffix: ", packed ring",
        label: "packed",
        features: Features::RING_PACKED,
        // A packed descriptor is written and read in one cache line where split
        // touches three (descriptor, available and used rings).
        goals: Goals {
            round_trips: Some(Goal::AtLeast(1.3)),
            qd1_median: Some(Goal::AtMost(0.6)),
        },
    },
    Ring {
        suffix: ", split ring + IN_ORDER",
        label: "split + IN_ORDER",
        features: Features::IN_ORDER,
        goals: Goals {
            round_trips: Some(Goal::AtLeast(1.2)),
            qd1_median: None,
        },
    },
    Ring {
        suffix: ", packed ring + IN_ORDER",
        label: "packed + IN_ORDER",
        features: Features::RING_PACKED.union(Features::IN_ORDER),
        goals: NO_GOALS,
    },
];

/// What the peer column says for the rings compared with split.
const SPLIT_PEER: &str = "split, same run";

/// The indices of [`RINGS`] in the order repetition `rep` runs them: each starts
/// one later than the previous, so none always runs first or last.
fn rotation(rep: usize) -> impl Iterator<Item = usize> {
    (0..RINGS.len()).map(move |i| (i + rep) % RINGS.len())
}

/// Runs everything and returns the report.
pub fn run(cfg: &RingBenchConfig) -> Report {
    let ncores = cores().len();
    let base = Features::VERSION_1 | Features::EVENT_IDX;
    let features = |r: usize| base | RINGS[r].features;
    let mut report = Report::new(format!(
        "rings: split, packed, each with and without IN_ORDER; queue size {}, {} repetitions, medians",
        cfg.queue_size, cfg.reps
    ));

    // Three measurements of `reps` repetitions of every ring.
    let mut progress = Progress::new("ring benchmark", 3 * RINGS.len() * cfg.reps);
    let step = |progress: &mut Progress, what: &str, r: usize, rep: usize| {
        progress.step(format_args!(
            "{what}, {}: repetition {rep}/{}",
            RINGS[r].label, cfg.reps
        ));
    };

    // One unrecorded round of each first: page faults, caches, clock ramp-up.
    let warm = RingBenchConfig {
        single_thread_chains: cfg.single_thread_chains / 4,
        ..*cfg
    };
    pop_add_used_peer(&warm, base);
    for r in 0..RINGS.len() {
        pop_add_used_ours(&warm, features(r));
    }
    let mut pop = PerRing::default();
    let mut peer = Vec::new();
    for rep in 1..=cfg.reps {
        for r in rotation(rep) {
            step(&mut progress, "device pop + add_used, one thread", r, rep);
            if r == 0 {
                // Split against virtio-queue on the same memory, as before.
                let (o, p) = in_turn(
                    rep,
                    || pop_add_used_ours(cfg, features(0)),
                    || pop_add_used_peer(cfg, base),
                );
                pop[0].push(o);
                peer.push(p);
            } else {
                pop[r].push(pop_add_used_ours(cfg, features(r)));
            }
        }
    }

    let mut rt = PerRing::default();
    for rep in 1..=cfg.reps {
        for r in rotation(rep) {
            step(&mut progress, "round trips, two polling threads", r, rep);
            rt[r].push(round_trips(cfg, features(r)));
        }
    }

    let (mut p50, mut p99) = (PerRing::default(), PerRing::default());
    for rep in 1..=cfg.reps {
        for r in rotation(rep) {
            step(&mut progress, "QD1 latency, two polling threads", r, rep);
            let (a, b) = qd1_latency(cfg, features(r));
            p50[r].push(a);
            p99[r].push(b);
        }
    }
    progress.finish();

    // Split's rows as they always were, then each other ring against split's.
    let vq = (median(&mut peer), "virtio-queue 0.18");
    let pop_name = "device pop + add_used, 1-desc chain, 1 thread";
    add_rows(&mut report, pop_name, "ns/chain", &mut pop, Some(vq), |_| None);
    let rt_name = "round trips, 2 polling threads, queue full";
    add_rows(&mut report, rt_name, "round trips/s", &mut rt, None, |r| {
        r.goals.round_trips
    });
    let p50_name = "QD1 round trip, median";
    add_rows(&mut report, p50_name, "ns", &mut p50, None, |r| {
        r.goals.qd1_median
    });
    add_rows(&mut report, "QD1 round trip, p99", "ns", &mut p99, None, |_| None);
    report.notes.push(format!(
        "features: VERSION_1 | EVENT_IDX, plus RING_PACKED and/or IN_ORDER as named; {ncores} cores; driver and device threads pinned to separate cores; peers measured in the same run"
    ));
    report.notes.push(
        "rows of packed and IN_ORDER rings: ratio to split's figure of the same run (< 1: cheaper for ns, > 1: faster for round trips/s); goals from issue 14; each repetition runs the four rings in rotated order".into(),
    );
    report
}

/// One measurement's repetitions, per ring of [`RINGS`].
type PerRing = [Vec<f64>; RINGS.len()];

/// Adds split's row (named `name`, against `split_peer`), then every other ring's
/// against split's median, with its `goal`.
fn add_rows(
    report: &mut Report,
    name: &str,
    unit: &str,
    xs: &mut PerRing,
    split_peer: Option<(f64, &str)>,
    goal: impl Fn(&Ring) -> Option<Goal>,
) {
    let split = median(&mut xs[0]);
    report.add_median(name, unit, &mut xs[0], split_peer);
    for (ring, xs) in RINGS.iter().zip(xs.iter_mut()).skip(1) {
        report.add_median_with_goal(
            &format!("{name}{}", ring.suffix),
            unit,
            xs,
            Some((split, SPLIT_PEER)),
            goal(ring),
        );
    }
}

/// A driver and the ring memory it set up, with buffers for 1-descriptor requests.
struct Setup {
    arena: Arc<Arena>,
    addrs: (u64, u64, u64),
    ring: RingMemory,
    driver: DriverRing<IdentityShare, u16>,
    buf: GuestBuf,
}

fn setup(size: u16, features: Features) -> Setup {
    let arena = Arena::new(0x1000_0000, 8 << 20).expect("arena");
    let (addrs, ring) = arena.alloc_split_ring(size).expect("ring");
    let share = IdentityShare::new(arena.clone(), size);
    // What our drivers and devices hold: the queue interface, in the format the
    // features pick.
    let driver = DriverRing::new(size, ring.clone(), share, features).expect("driver");
    let buf = GuestBuf::new(arena.alloc(64, 64).expect("buffer"), 64);
    Setup {
        arena,
        addrs,
        ring,
        driver,
        buf,
    }
}

impl Setup {
    /// Makes the whole queue available (untimed).
    fn fill(&mut self) -> u64 {
        let mut n = 0;
        while self.driver.add(&[self.buf], &[], 0).is_ok() {
            n += 1;
        }
        n
    }

    /// Reclaims everything the device returned (untimed).
    fn drain(&mut self) {
        while let Ok(Some(_)) = self.driver.pop_used() {}
    }
}

/// Times `serve` (one device pop + add_used) over whole queues the driver filled
/// untimed; returns ns per chain.
fn time_device(cfg: &RingBenchConfig, s: &mut Setup, mut serve: impl FnMut()) -> f64 {
    let mut timed = Duration::ZERO;
    let mut chains = 0u64;
    while chains < cfg.single_thread_chains {
        let n = s.fill();
        let t = Instant::now();
        for _ in 0..n {
            serve();
        }
        timed += t.elapsed();
        chains += n;
        s.drain();
    }
    timed.as_nanos() as f64 / chains as f64
}

fn pop_add_used_ours(cfg: &RingBenchConfig, features: Features) -> f64 {
    let mut s = setup(cfg.queue_size, features);
    let mut device = DeviceRing::new(cfg.queue_size, &s.ring, s.arena.clone(), features).expect("device");
    time_device(cfg, &mut s, || {
        let c = device.pop().expect("valid ring").expect("chain");
        device.add_used(c.head(), 0).expect("in flight");
    })
}

fn pop_add_used_peer(cfg: &RingBenchConfig, features: Features) -> f64 {
    let mut s = setup(cfg.queue_size, features);
    let bridge = SharedGuest::over(s.arena.clone()).expect("vm-memory bridge");
    let event_idx = features.contains(Features::EVENT_IDX);
    let mut q: Queue = bridge
        .device_queue(cfg.queue_size, s.addrs.into(), event_idx)
        .expect("virtio-queue");
    let mem = bridge.memory();
    time_device(cfg, &mut s, || {
        let chain = q.iter(mem).expect("queue ready").next().expect("chain");
        let head = chain.head_index();
        // A device walks the chain's descriptors; ours validates them inside pop.
        for d in chain {
            std::hint::black_box(d);
        }
        q.add_used(mem, head, 0).expect("add_used");
    })
}

/// The cores this process may run on, read once (a pinned thread would only see its
/// own core).
fn cores() -> &'static [core_affinity::CoreId] {
    static CORES: OnceLock<Vec<core_affinity::CoreId>> = OnceLock::new();
    CORES.get_or_init(|| core_affinity::get_core_ids().unwrap_or_default())
}

/// Pins the current thread to the `n`-th allowed core, if there is one.
fn pin(n: usize) {
    let ids = cores();
    if let Some(id) = ids.get(n % ids.len().max(1)) {
        core_affinity::set_for_current(*id);
    }
}

/// Runs the device side in a polling thread until `stop`.
fn spawn_device(
    s: &Setup,
    size: u16,
    features: Features,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let mut device = DeviceRing::new(size, &s.ring, s.arena.clone(), features).expect("device");
    std::thread::spawn(move || {
        pin(1);
        device.disable_notifications();
        let mut heads = [0u16; 64];
        while !stop.load(Ordering::Relaxed) {
            let mut k = 0;
            while k < heads.len() {
                match device.pop() {
                    Ok(Some(c)) => {
                        heads[k] = c.head();
                        k += 1;
                    }
                    _ => break,
                }
            }
            if k == 0 {
                std::hint::spin_loop();
                continue;
            }
            let _ = device.add_used_batch(heads[..k].iter().map(|&h| (h, 0)));
        }
    })
}

/// Runs `f` on a thread of its own pinned to the first core, so the caller's thread
/// is never pinned: a pinned caller would leave every thread it starts later (the
/// other benchmarks of `vio demo`, their device workers) on one core.
fn on_pinned_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        s.spawn(|| {
            pin(0);
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn round_trips(cfg: &RingBenchConfig, features: Features) -> f64 {
    on_pinned_thread(|| round_trips_here(cfg, features))
}

fn round_trips_here(cfg: &RingBenchConfig, features: Features) -> f64 {
    let mut s = setup(cfg.queue_size, features);
    let stop = Arc::new(AtomicBool::new(false));
    let dev = spawn_device(&s, cfg.queue_size, features, stop.clone());
    s.driver.disable_notifications();
    s.fill();
    let buf = s.buf;
    let mut done = 0u64;
    let start = Instant::now();
    let mut elapsed = Duration::ZERO;
    // A short window on a loaded machine can end before the device thread was ever
    // scheduled: it then runs on until the first round trip, up to a limit so a
    // device that never answers cannot hang the benchmark (its rate is then 0).
    let limit = (cfg.run_time * 10).max(Duration::from_secs(1));
    while elapsed < cfg.run_time || (done == 0 && elapsed < limit) {
        for _ in 0..1024 {
            let mut got = 0;
            while let Ok(Some(_)) = s.driver.pop_used() {
                got += 1;
            }
            if got == 0 {
                std::hint::spin_loop();
                continue;
            }
            for _ in 0..got {
                let _ = s.driver.add(&[buf], &[], 0);
            }
            done += got;
        }
        elapsed = start.elapsed();
    }
    stop.store(true, Ordering::Relaxed);
    let _ = dev.join();
    done as f64 / elapsed.as_secs_f64()
}

fn qd1_latency(cfg: &RingBenchConfig, features: Features) -> (f64, f64) {
    on_pinned_thread(|| qd1_latency_here(cfg, features))
}

fn qd1_latency_here(cfg: &RingBenchConfig, features: Features) -> (f64, f64) {
    let mut s = setup(cfg.queue_size, features);
    let stop = Arc::new(AtomicBool::new(false));
    let dev = spawn_device(&s, cfg.queue_size, features, stop.clone());
    s.driver.disable_notifications();
    let buf = s.buf;
    let mut samples = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    // One clock read per round trip: each sample runs from the end of the previous one.
    let mut last = start;
    while last.duration_since(start) < cfg.run_time && samples.len() < (1 << 20) {
        let _ = s.driver.add(&[buf], &[], 0);
        loop {
            match s.driver.pop_used() {
                Ok(Some(_)) => break,
                Ok(None) => std::hint::spin_loop(),
                Err(e) => panic!("device broke the ring: {e}"),
            }
        }
        let now = Instant::now();
        samples.push(now.duration_since(last).as_nanos() as f64);
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = dev.join();
    (quantile(&mut samples, 0.5), quantile(&mut samples, 0.99))
}
