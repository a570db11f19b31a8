//! The sharing-model benchmark behind `vio model-bench` and `vio demo`.
//!
//! For each model, buffers of each size move driver to device (the device copies each
//! readable buffer into its own memory) and device to driver (the device fills each
//! writable buffer from its own memory), in batches through a real split ring: the
//! driver adds a batch, the device pops it, moves the bytes with one batched call
//! ([`DeviceMemory::read_batch`] / [`DeviceMemory::write_batch`]) and returns it, the
//! driver reclaims it, all on one thread. A plain `memcpy` of the same buffers,
//! measured in the same run, is the physical reference.

use crate::conformance::Fixture;
use crate::report::{Cell, Table, median};
use std::time::{Duration, Instant};
use virtio_core::features::Features;
use virtio_core::{DeviceMemory, DeviceModel, DriverModel, GuestBuf, ReadOp, WriteOp};

/// Which way the bytes move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Driver to device: device-readable buffers.
    ToDevice,
    /// Device to driver: device-writable buffers.
    FromDevice,
}

impl Way {
    /// Short label for tables.
    pub fn label(self) -> &'static str {
        match self {
            Way::ToDevice => "driver->device",
            Way::FromDevice => "device->driver",
        }
    }
}

/// How long and how much to measure.
#[derive(Debug, Clone)]
pub struct ModelBenchConfig {
    /// Repetitions per figure (medians are reported).
    pub reps: usize,
    /// Duration of one repetition.
    pub run_time: Duration,
    /// Buffer sizes.
    pub sizes: Vec<u32>,
    /// Buffers per batch (and in flight).
    pub batch: usize,
}

impl ModelBenchConfig {
    /// Defaults for a full run.
    pub fn full() -> Self {
        ModelBenchConfig {
            reps: 5,
            run_time: Duration::from_millis(400),
            sizes: vec![64, 1514, 65536],
            batch: 64,
        }
    }

    /// A short run for the demo.
    pub fn quick() -> Self {
        ModelBenchConfig {
            reps: 1,
            run_time: Duration::from_millis(100),
            sizes: vec![64, 1514, 65536],
            batch: 64,
        }
    }
}

/// Buffers per second for one model, size and direction (median of `cfg.reps`).
///
/// `alloc` provides the driver's buffers (models with a persistent pool hand out pool
/// memory).
pub fn measure<D: DriverModel, V: DeviceModel>(
    f: &Fixture<D, V>,
    alloc: &dyn Fn(u32) -> GuestBuf,
    size: u32,
    way: Way,
    cfg: &ModelBenchConfig,
) -> f64 {
    let queue_size = u16::try_from(cfg.batch.next_power_of_two().max(2)).unwrap_or(256);
    let mut q = f.queue(0, queue_size, Features::VERSION_1);
    let bufs: Vec<GuestBuf> = (0..cfg.batch).map(|_| alloc(size)).collect();
    let mut private = vec![0x5au8; size as usize * cfg.batch];
    let mut chains = Vec::with_capacity(cfg.batch);
    let mut rates = Vec::with_capacity(cfg.reps);
    for _ in 0..cfg.reps {
        let start = Instant::now();
        let mut moved = 0u64;
        while start.elapsed() < cfg.run_time {
            for _ in 0..16 {
                for b in &bufs {
                    let r = match way {
                        Way::ToDevice => q.driver.add(&[*b], &[], 0),
                        Way::FromDevice => q.driver.add(&[], &[*b], 0),
                    };
                    r.expect("queue sized for the batch");
                }
                let _ = q.driver.kick_prepare();
                while let Some(c) = q.device.pop().expect("valid ring") {
                    chains.push(c);
                }
                let mem = q.device.memory();
                let moved_ok = match way {
                    Way::ToDevice => {
                        let mut ops: Vec<ReadOp<'_>> = chains
                            .iter()
                            .zip(private.chunks_mut(size as usize))
                            .map(|(c, dst)| ReadOp {
                                seg: c.readable()[0],
                                offset: 0,
                                dst,
                            })
                            .collect();
                        mem.read_batch(&mut ops)
                    }
                    Way::FromDevice => {
                        let ops: Vec<WriteOp<'_>> = chains
                            .iter()
                            .zip(private.chunks(size as usize))
                            .map(|(c, src)| WriteOp {
                                seg: c.writable()[0],
                                offset: 0,
                                src,
                            })
                            .collect();
                        mem.write_batch(&ops)
                    }
                };
                moved_ok.expect("model moves the batch");
                let written = if way == Way::FromDevice { size } else { 0 };
                q.device
                    .add_used_batch(chains.drain(..).map(|c| (c.head(), written)))
                    .expect("returning popped chains");
                while q.driver.pop_used().expect("sane device").is_some() {
                    moved += 1;
                }
            }
        }
        rates.push(moved as f64 / start.elapsed().as_secs_f64());
    }
    median(&mut rates)
}

/// Buffers per second of a plain memcpy of `batch` buffers of `size` between two
/// private arrays: the physical reference.
pub fn memcpy_rate(size: u32, cfg: &ModelBenchConfig) -> f64 {
    let n = size as usize * cfg.batch;
    let src = vec![0x33u8; n];
    let mut dst = vec![0u8; n];
    let mut rates = Vec::with_capacity(cfg.reps);
    for _ in 0..cfg.reps {
        let start = Instant::now();
        let mut moved = 0u64;
        while start.elapsed() < cfg.run_time {
            for _ in 0..16 {
                for (d, s) in dst.chunks_mut(size as usize).zip(src.chunks(size as usize)) {
                    d.copy_from_slice(std::hint::black_box(s));
                }
                std::hint::black_box(&mut dst);
                moved += cfg.batch as u64;
            }
        }
        rates.push(moved as f64 / start.elapsed().as_secs_f64());
    }
    median(&mut rates)
}

/// One measured row.
#[derive(Debug, Clone)]
pub struct Row {
    /// Model name (or "memcpy").
    pub model: String,
    /// Buffer size in bytes.
    pub size: u32,
    /// Direction, `None` for memcpy.
    pub way: Option<Way>,
    /// Buffers per second.
    pub rate: f64,
}

/// Renders rows as the benchmark table, each rate also relative to memcpy of the same
/// size.
pub fn table(title: &str, rows: &[Row], notes: Vec<String>) -> Table {
    let memcpy = |size| {
        rows.iter()
            .find(|r| r.way.is_none() && r.size == size)
            .map(|r| r.rate)
    };
    let rows = rows
        .iter()
        .map(|r| {
            let gbit = r.rate * f64::from(r.size) * 8.0 / 1e9;
            let vs = memcpy(r.size).filter(|m| *m > 0.0).map(|m| r.rate / m);
            vec![
                Cell::Text(r.model.clone()),
                Cell::Int(u64::from(r.size)),
                Cell::Text(r.way.map_or("(reference)", Way::label).to_string()),
                Cell::Num(r.rate),
                Cell::Num(gbit),
                vs.map_or(Cell::Text("-".into()), |v| Cell::Text(format!("{v:.2}x"))),
            ]
        })
        .collect();
    Table {
        title: title.to_string(),
        columns: ["model", "bytes", "direction", "buffers/s", "Gbit/s", "vs memcpy"]
            .map(String::from)
            .to_vec(),
        rows,
        notes,
    }
}

/// Runs every model (and memcpy) over every size and direction.
pub fn run(cfg: &ModelBenchConfig) -> Table {
    use crate::models;
    use std::cell::Cell;
    let mut rows = Vec::new();
    // Per size: memcpy, then five model rows in each direction.
    let progress = std::cell::RefCell::new(crate::progress::Progress::new(
        "model benchmark",
        cfg.sizes.len() * 11,
    ));
    for &size in &cfg.sizes {
        progress.borrow_mut().step(format_args!("memcpy, {size} B"));
        rows.push(Row {
            model: "memcpy".into(),
            size,
            way: None,
            rate: memcpy_rate(size, cfg),
        });
        for way in [Way::ToDevice, Way::FromDevice] {
            let label = way.label();
            // Each model on a fresh guest, with buffers from the guest's allocator.
            let mut plain = |model: &str, rate: &dyn Fn() -> f64| {
                progress
                    .borrow_mut()
                    .step(format_args!("model {model}, {size} B, {label}"));
                rows.push(row(model, size, way, rate()));
            };
            plain("1 shared-page", &|| {
                on_fresh(models::shared_page(), size, way, cfg)
            });
            plain("2 direct", &|| on_fresh(models::direct(), size, way, cfg));
            plain("3 hypervisor-copy", &|| {
                on_fresh(models::hypervisor_copy(), size, way, cfg)
            });
            plain("4 grant (one-shot)", &|| {
                on_fresh(models::grant(), size, way, cfg)
            });

            progress
                .borrow_mut()
                .step(format_args!("model 4 grant, persistent pool, {size} B, {label}"));
            let f = models::grant();
            // The pool exists before the queue, so the queue's share uses it.
            let pool = f
                .driver
                .persistent_pool(u64::from(size.next_multiple_of(64)) * cfg.batch as u64)
                .expect("persistent pool");
            let next = Cell::new(0u64);
            let from_pool = |len: u32| {
                let at = next.get();
                next.set(at + u64::from(len.next_multiple_of(64)));
                pool.buf(at, len).expect("pool sized for the batch")
            };
            rows.push(row(
                "4 grant (persistent)",
                size,
                way,
                measure(&f, &from_pool, size, way, cfg),
            ));
        }
    }
    progress.into_inner().finish();
    table(
        &format!(
            "sharing models: buffers moved through a split ring, batches of {}, one thread, medians of {}",
            cfg.batch, cfg.reps
        ),
        &rows,
        vec![
            "driver->device: the device copies each readable buffer into its own memory; device->driver: the reverse".into(),
            "memcpy: the same buffers copied between two private arrays, same run".into(),
        ],
    )
}

/// Measures one model on its own fixture, with buffers from the guest's allocator.
fn on_fresh<D: DriverModel, V: DeviceModel>(
    f: Fixture<D, V>,
    size: u32,
    way: Way,
    cfg: &ModelBenchConfig,
) -> f64 {
    measure(&f, &guest_alloc(&f), size, way, cfg)
}

/// Buffers from the guest's general allocator.
fn guest_alloc<D, V>(f: &Fixture<D, V>) -> impl Fn(u32) -> GuestBuf + use<D, V> {
    let mem = f.guest.memory().clone();
    move |len: u32| GuestBuf::new(mem.alloc(u64::from(len), 64).expect("guest memory"), len)
}

fn row(model: &str, size: u32, way: Way, rate: f64) -> Row {
    Row {
        model: model.to_string(),
        size,
        way: Some(way),
        rate,
    }
}
