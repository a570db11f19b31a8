//! The ring benchmark behind `vio ring-bench` and `vio demo`.
//!
//! Our side runs through the queue interface ([`DeviceRing`], [`DriverRing`]), as our
//! devices and drivers do. Four measurements, each repeated and reported as a median:
//!
//! 1. Device-side cost, single thread: pop one single-descriptor chain and return it as
//!    used, for our split ring and for rust-vmm `virtio-queue` serving the very same
//!    ring memory (filled by our driver, outside the timed section); then for our
//!    packed ring (virtio-queue has no packed device side).
//! 2. Round trips per second with two threads (driver and device on their own cores,
//!    both polling, many requests in flight).
//! 3. Queue-depth-1 round-trip latency with both sides polling.

use crate::peer::SharedGuest;
use crate::progress::{Progress, in_turn};
use crate::report::{Report, median, quantile};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use virtio_core::features::Features;
use virtio_core::test_utils::{Arena, IdentityShare};
use virtio_core::{DeviceRing, DriverRing, GuestBuf, SplitRingMemory};
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

    /// A short run for the demo.
    pub fn quick() -> Self {
        RingBenchConfig {
            reps: 3,
            run_time: Duration::from_millis(300),
            single_thread_chains: 1_000_000,
            queue_size: 256,
        }
    }
}

/// Runs everything and returns the report.
pub fn run(cfg: &RingBenchConfig) -> Report {
    let ncores = cores().len();
    let features = Features::VERSION_1 | Features::EVENT_IDX;
    let mut report = Report::new(format!(
        "rings (split; packed where named), queue size {}, {} repetitions, medians",
        cfg.queue_size, cfg.reps
    ));

    // Three measurements of `reps` repetitions each.
    let mut progress = Progress::new("ring benchmark", 4 * cfg.reps);
    let mut ours = Vec::new();
    let mut peer = Vec::new();
    // One unrecorded round of each first: page faults, caches, clock ramp-up.
    let warm = RingBenchConfig {
        single_thread_chains: cfg.single_thread_chains / 4,
        ..*cfg
    };
    pop_add_used_ours(&warm, features);
    pop_add_used_peer(&warm, features);
    for rep in 1..=cfg.reps {
        progress.step(format_args!(
            "device pop + add_used, one thread: repetition {rep}/{}",
            cfg.reps
        ));
        let (o, p) = in_turn(
            rep,
            || pop_add_used_ours(cfg, features),
            || pop_add_used_peer(cfg, features),
        );
        ours.push(o);
        peer.push(p);
    }
    let peer = Some((median(&mut peer), "virtio-queue 0.18"));
    report.add_median(
        "device pop + add_used, 1-desc chain, 1 thread",
        "ns/chain",
        &mut ours,
        peer,
    );
    // The packed ring (§2.8) through the same interface; virtio-queue has no packed
    // device side to measure against.
    let packed = features | Features::RING_PACKED;
    pop_add_used_ours(&warm, packed);
    let mut ours_packed: Vec<f64> = (1..=cfg.reps)
        .map(|rep| {
            progress.step(format_args!(
                "packed ring, pop + add_used: repetition {rep}/{}",
                cfg.reps
            ));
            pop_add_used_ours(cfg, packed)
        })
        .collect();
    report.add_median(
        "device pop + add_used, 1-desc chain, 1 thread, packed ring",
        "ns/chain",
        &mut ours_packed,
        None,
    );

    let mut rt = repeat(cfg, &mut progress, "round trips, two polling threads", || {
        round_trips(cfg, features)
    });
    report.add_median(
        "round trips, 2 polling threads, queue full",
        "round trips/s",
        &mut rt,
        None,
    );

    let (mut p50, mut p99): (Vec<f64>, Vec<f64>) = (1..=cfg.reps)
        .map(|rep| {
            progress.step(format_args!(
                "QD1 latency, two polling threads: repetition {rep}/{}",
                cfg.reps
            ));
            qd1_latency(cfg, features)
        })
        .unzip();
    report.add_median("QD1 round trip, median", "ns", &mut p50, None);
    report.add_median("QD1 round trip, p99", "ns", &mut p99, None);
    progress.finish();
    report.notes.push(format!(
        "features: VERSION_1 | EVENT_IDX; {ncores} cores; driver and device threads pinned to separate cores; peer measured in the same run"
    ));
    report
}

/// Runs `f` once per repetition, showing progress.
fn repeat(
    cfg: &RingBenchConfig,
    progress: &mut Progress,
    what: &str,
    mut f: impl FnMut() -> f64,
) -> Vec<f64> {
    (1..=cfg.reps)
        .map(|rep| {
            progress.step(format_args!("{what}: repetition {rep}/{}", cfg.reps));
            f()
        })
        .collect()
}

/// A driver and the ring memory it set up, with buffers for 1-descriptor requests.
struct Setup {
    arena: Arc<Arena>,
    addrs: (u64, u64, u64),
    ring: SplitRingMemory,
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

/// The cores this process may run on, read once before any thread is pinned (a pinned
/// thread would only see its own core).
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

fn round_trips(cfg: &RingBenchConfig, features: Features) -> f64 {
    let mut s = setup(cfg.queue_size, features);
    let stop = Arc::new(AtomicBool::new(false));
    let dev = spawn_device(&s, cfg.queue_size, features, stop.clone());
    pin(0);
    s.driver.disable_notifications();
    s.fill();
    let buf = s.buf;
    let mut done = 0u64;
    let start = Instant::now();
    let mut elapsed = Duration::ZERO;
    while elapsed < cfg.run_time {
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
    let mut s = setup(cfg.queue_size, features);
    let stop = Arc::new(AtomicBool::new(false));
    let dev = spawn_device(&s, cfg.queue_size, features, stop.clone());
    pin(0);
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
